//! Fan-out: follows the event log in trigger order with a durable cursor, like a stream
//! consumer, and creates one delivery per enabled listener of each event.
//!
//! Each chunk of deliveries is committed with the cursor in one atomic write, so a crash
//! redoes at most a chunk, and delivery ids derived from (event, listener) make that redo
//! create nothing twice. Very large fan-outs are cut into chunks with a progress mark, so
//! memory stays flat. It wakes when the event log grows, never on a polling sleep, and it
//! never touches the intake path: intake only appends.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Context;
use crate::clock::now_ms;
use crate::ids;
use crate::store::{Delivery, FanoutCursor, Listener, NewDelivery, QueuePosition, StoreError};

/// Deliveries created per atomic write. Small on purpose: a sled batch holds a lock that
/// stops every other sled call in the process while it applies, and writes its log out
/// twice. Triggers take no sled lock now, yet chunks of 128 still raised a trigger's 99th
/// percentile beside a 1,000-listener fan-out from about 1.5-2.8 ms to 2.7-3.2 ms (quick
/// bench), while delivering about 15 % faster; the trigger's constant time comes first.
/// Chunks of 8 lowered it no further. Chunks of 256 only once intake had been quiet for
/// 50 ms left the trigger alone and built a 1,000,000-delivery backlog a third faster, but
/// raised hookd's RSS under that backlog from about 240 MB to 275-296 MB, so they were
/// dropped. The extra memory follows the queue database's page cache: with it at 12 MiB
/// instead of 24 the RSS was back at 227-255 MB, but with 100,000 deliveries pending
/// delivery was no cheaper than with chunks of 32 (90-104 µs of CPU each to one listener,
/// against 96-97 µs; 77-86 µs with 24 MiB), and 16 MiB landed in between on both counts.
pub const CHUNK: usize = 32;
/// Events looked at per chunk, however few deliveries they make: events nobody listens to
/// move the cursor in bounded steps, so one call never holds a pipeline thread for long
/// (store calls run in place there).
const CHUNK_EVENTS: usize = 256;

/// Follows the event log until `shutdown`.
pub(crate) async fn run(context: Arc<Context>, mut durable_seq: watch::Receiver<u64>, shutdown: CancellationToken) {
    let mut last_due_ms = 0;
    loop {
        // Only durable events: an event applied but not yet flushed may still fail its commit.
        let durable = *durable_seq.borrow_and_update();
        // Catch up with everything appended so far; a change during this is seen below.
        loop {
            // Store calls run in place (see the module docs of `pipeline`).
            let step = fan_out_chunk(&context, last_due_ms, durable);
            match step {
                Ok(Some((first, due_ms))) => {
                    last_due_ms = due_ms;
                    if let Some(first) = first {
                        context.queued(first);
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::error!(error = &error as &dyn std::error::Error, "fan-out failed; retrying");
                    if shutdown
                        .run_until_cancelled(tokio::time::sleep(std::time::Duration::from_secs(1)))
                        .await
                        .is_none()
                    {
                        return;
                    }
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
            // Store calls run in place and never yield: let the dispatcher and the workers
            // have the thread between chunks.
            tokio::task::yield_now().await;
        }
        tokio::select! {
            changed = durable_seq.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}

/// Fans out the next chunk past the cursor, among events before `durable_end`: whole events
/// until about [`CHUNK`] deliveries are gathered (a larger event is cut into chunks), written
/// with the new cursor in one atomic write. Returns a queue position just before the first
/// delivery queued (if any) and their due time, or `None` when there is nothing to do.
fn fan_out_chunk(
    context: &Context,
    last_due_ms: u64,
    durable_end: u64,
) -> Result<Option<(Option<QueuePosition>, u64)>, StoreError> {
    let mut cursor = context.queue.fanout_cursor()?;
    // Due times never go backwards, so first attempts leave in trigger order.
    let due_ms = now_ms().max(last_due_ms);
    let mut deliveries: Vec<NewDelivery> = Vec::new();
    let mut moved = false;
    // Every listener of an event type, as read for an earlier event of this chunk: a chunk
    // of events of one type reads its listeners once, not once per event.
    let mut known: HashMap<(String, String), Vec<Listener>> = HashMap::new();
    let mut log = context.queue.events_from(cursor.next_seq).take(CHUNK_EVENTS);
    while deliveries.len() < CHUNK {
        let Some(event) = log.next().transpose()?.filter(|event| event.seq < durable_end) else {
            break;
        };
        let after = if event.seq == cursor.next_seq && !cursor.after_listener.is_empty() {
            Some(cursor.after_listener.clone())
        } else {
            None
        };
        let room = CHUNK - deliveries.len();
        let kind = (event.producer_id.clone(), event.event_type.clone());
        let fetched;
        let listeners: &[Listener] = match known.get(&kind) {
            Some(all) if after.is_none() => &all[..all.len().min(room)],
            _ => {
                fetched = context.store.list_listeners(&kind.0, Some(&kind.1), after.as_deref(), room)?;
                if after.is_none() && fetched.len() < room {
                    // Fewer than asked for: that is all of them.
                    known.entry(kind).or_insert(fetched).as_slice()
                } else {
                    &fetched
                }
            }
        };
        // A listener gets the events triggered while it was registered and enabled, however
        // far behind this runs (a disabled one's deliveries wait until it is enabled).
        deliveries.extend(listeners.iter().filter(|listener| listener.wants(event.seq)).map(|listener| NewDelivery {
            delivery: Delivery::pending(ids::delivery_id(event.seq, &listener.id), &event, &listener.id, due_ms),
            ordered: listener.ordered,
        }));
        moved = true;
        cursor = match listeners.last() {
            // This event may have more listeners: continue it in the next chunk.
            Some(last) if listeners.len() == room => {
                FanoutCursor { next_seq: event.seq, after_listener: last.id.clone() }
            }
            _ => FanoutCursor { next_seq: event.seq + 1, after_listener: String::new() },
        };
        if cursor.next_seq == event.seq {
            break;
        }
    }
    if !moved {
        return Ok(None);
    }
    context.queue.commit_fanout(&deliveries, &cursor)?;
    if !deliveries.is_empty() {
        tracing::debug!(deliveries = deliveries.len(), next_seq = cursor.next_seq, "fanned out");
    }
    // A prefix of the smallest id sorts just before it: the dispatcher reads from there.
    let first = deliveries.iter().map(|new| new.delivery.id.as_str()).min().map(|id| {
        let mut before = id.to_owned();
        before.pop();
        (due_ms, before)
    });
    Ok(Some((first, due_ms)))
}
