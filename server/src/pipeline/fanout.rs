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
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Context;
use crate::clock::now_ms;
use crate::ids;
use crate::store::{Delivery, FanoutCursor, Listener, NewDelivery, QueuePosition, StoreError};

/// Deliveries created per atomic write while triggers are arriving. Small on purpose: a sled
/// batch holds a lock that stops every other sled call in the process while it applies, and
/// writes its log out twice. Triggers take no sled lock now, yet chunks of 128 still raised a
/// trigger's 99th percentile beside a 1,000-listener fan-out from about 1.5-2.8 ms to
/// 2.7-3.2 ms (quick bench), and chunks of 256 from 1.0-1.5 ms to 1.6-2.2 ms; chunks of 8
/// lowered it no further than 32 does.
const CHUNK: usize = 32;
/// Deliveries created per atomic write once intake has been quiet for [`QUIET_AFTER`]: every
/// batch costs sled two log writes, each waking all of sled's I/O threads, so a backlog left
/// by a burst of triggers drains faster in large chunks (quick bench, alternating runs with
/// chunks of 256 throughout: 7-9 % more deliveries per second than with chunks of 32, to one
/// listener and to ten).
const QUIET_CHUNK: usize = 256;
/// How long the event log must stop growing before fan-out takes [`QUIET_CHUNK`]s; longer
/// than the gaps between one caller's triggers, so a steady trickle keeps chunks small.
const QUIET_AFTER: Duration = Duration::from_millis(50);
/// Events looked at per chunk, however few deliveries they make: events nobody listens to
/// move the cursor in bounded steps, so one call never holds a pipeline thread for long
/// (store calls run in place there).
const CHUNK_EVENTS: usize = 256;

/// Follows the event log until `shutdown`.
pub(crate) async fn run(context: Arc<Context>, mut durable_seq: watch::Receiver<u64>, shutdown: CancellationToken) {
    let mut last_due_ms = 0;
    // What is durable at the start is a backlog, not triggers arriving.
    let mut intake = Intake { durable_end: *durable_seq.borrow(), grew_at: None };
    loop {
        // Only durable events: an event applied but not yet flushed may still fail its commit.
        let mut durable = *durable_seq.borrow_and_update();
        intake.saw(durable, Instant::now());
        // Catch up with everything appended so far; a change during this is seen below.
        loop {
            // Store calls run in place (see the module docs of `pipeline`).
            let step = fan_out_chunk(&context, last_due_ms, durable, intake.chunk(Instant::now()));
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
                    if shutdown.run_until_cancelled(tokio::time::sleep(Duration::from_secs(1))).await.is_none() {
                        return;
                    }
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
            // Events that became durable meanwhile are taken in this catch-up, and tell
            // whether intake is still busy.
            durable = *durable_seq.borrow_and_update();
            intake.saw(durable, Instant::now());
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

/// Whether triggers are arriving, as fan-out sees it: when the durable end of the event log
/// last moved.
#[derive(Debug)]
struct Intake {
    durable_end: u64,
    grew_at: Option<Instant>,
}

impl Intake {
    /// Notes the durable end of the event log as of `now`.
    fn saw(&mut self, durable_end: u64, now: Instant) {
        if durable_end != self.durable_end {
            self.durable_end = durable_end;
            self.grew_at = Some(now);
        }
    }

    /// Deliveries to create per atomic write at `now`.
    fn chunk(&self, now: Instant) -> usize {
        match self.grew_at {
            Some(grew_at) if now.saturating_duration_since(grew_at) < QUIET_AFTER => CHUNK,
            _ => QUIET_CHUNK,
        }
    }
}

/// Fans out the next chunk past the cursor, among events before `durable_end`: whole events
/// until about `chunk` deliveries are gathered (a larger event is cut into chunks), written
/// with the new cursor in one atomic write. Returns a queue position just before the first
/// delivery queued (if any) and their due time, or `None` when there is nothing to do.
fn fan_out_chunk(
    context: &Context,
    last_due_ms: u64,
    durable_end: u64,
    chunk: usize,
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
    while deliveries.len() < chunk {
        let Some(event) = log.next().transpose()?.filter(|event| event.seq < durable_end) else {
            break;
        };
        let after = if event.seq == cursor.next_seq && !cursor.after_listener.is_empty() {
            Some(cursor.after_listener.clone())
        } else {
            None
        };
        let room = chunk - deliveries.len();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_stay_small_while_the_event_log_grows_and_grow_once_it_is_quiet() {
        let start = Instant::now();
        // A backlog found at the start: quiet.
        let mut intake = Intake { durable_end: 5, grew_at: None };
        assert_eq!(intake.chunk(start), QUIET_CHUNK);
        intake.saw(5, start);
        assert_eq!(intake.chunk(start), QUIET_CHUNK);
        intake.saw(10, start);
        assert_eq!(intake.chunk(start), CHUNK);
        assert_eq!(intake.chunk(start + QUIET_AFTER / 2), CHUNK);
        // The same end seen again is no growth.
        intake.saw(10, start + QUIET_AFTER / 2);
        assert_eq!(intake.chunk(start + QUIET_AFTER), QUIET_CHUNK);
        // A trigger arrives: small chunks again at once.
        intake.saw(11, start + QUIET_AFTER * 2);
        assert_eq!(intake.chunk(start + QUIET_AFTER * 2), CHUNK);
    }
}
