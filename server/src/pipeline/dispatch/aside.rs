//! Work that will not start soon, and work whose listener is gone.
//!
//! A first attempt that cannot go soon is not written anywhere: its listener is *detached*
//! from fan-out at that event (one record for the listener, whatever its backlog), fan-out's
//! pairs of it from there on are let go, and the listener reads them back from the event log
//! itself once it can take them (see `catch_up`). A queue entry that cannot go soon moves to
//! its listener's lot. Work of a deleted listener ends cancelled: a pair gets a cancelled
//! record, a queue entry cancels its pending delivery, and a detached listener's range is
//! cancelled where it lies in the log, in bounded steps.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Dispatcher, UNPARK_CHUNK};
use crate::clock::now_ms;
use crate::pipeline::gate::SOME_PARKED;
use crate::pipeline::line::{Pair, Work};
use crate::store::{DeletedListener, Delivery, DeliveryState, DueEntry, Listener, StoreError};

/// A listener fanned out apart from the others: its first attempts wait in the event log from
/// `since` on, and it reads them itself as it can take them.
#[derive(Debug)]
pub(super) struct Detached {
    /// As written: fan-out's pairs of it from this event on are let go (read back later).
    pub since: u64,
    /// The next event its own reading looks at.
    pub read: u64,
    /// Events of pairs it read back that are not recorded yet.
    pub outstanding: BTreeSet<u64>,
}

/// Pairs of one listener read back together (see `catch_up`), most at once.
pub(super) const CATCH_UP_CHUNK: usize = 256;

impl Dispatcher {
    /// Sets aside work that will not start soon: pairs by detaching their listener, queue
    /// entries in their listener's lot. The work has already left its line and its place in
    /// memory.
    pub(super) fn set_aside(&mut self, works: Vec<Work>) {
        let mut pairs: BTreeMap<String, Vec<Pair>> = BTreeMap::new();
        let mut entries = Vec::new();
        for work in works {
            match work {
                Work::First(pair) => pairs.entry(pair.listener_id.clone()).or_default().push(pair),
                Work::Queued(entry) => entries.push(entry),
            }
        }
        for (listener_id, pairs) in pairs {
            let from_seq = pairs.iter().map(|pair| pair.seq).min().expect("grouped pairs are there");
            match self.detach(&listener_id, from_seq) {
                Ok(()) => {
                    for pair in pairs {
                        self.let_go(pair);
                    }
                }
                Err(error) => self.write_failed(error, pairs.into_iter().map(Work::First).collect()),
            }
        }
        self.park(entries);
    }

    /// A pair that will be read back from the log later: nothing of it is written now. Its
    /// listener is detached at or before it, so letting it go is like recording it.
    fn let_go(&mut self, pair: Pair) {
        self.pair_recorded(pair);
    }

    /// Leaves a listener's first attempts from event `from_seq` on in the event log, for it to
    /// read back later: records where they start (if further back than before), and lets go
    /// of those of its pairs in memory.
    pub(super) fn detach(&mut self, listener_id: &str, from_seq: u64) -> Result<(), StoreError> {
        let current = self.lanes.get(listener_id).and_then(|lane| lane.detached.as_ref().map(|d| d.since));
        let since = current.map_or(from_seq, |since| since.min(from_seq));
        if current != Some(since) {
            self.context.queue.set_detached(listener_id, Some(since))?;
            if current.is_none() {
                tracing::debug!(%listener_id, since, "listener fanned out apart");
            }
        }
        let lane = self.lane(listener_id);
        let detached = lane.detached.get_or_insert(Detached { since, read: from_seq, outstanding: BTreeSet::new() });
        detached.since = since;
        detached.read = detached.read.min(from_seq);
        let dropped = lane.line.take_pairs_from(from_seq);
        self.memory.add_permits(dropped.len());
        for pair in dropped {
            self.let_go(pair);
        }
        Ok(())
    }

    /// Parks queue entries that will not start soon in their listeners' lots. A failed write
    /// leaves them queued, to be read again.
    pub(super) fn park(&mut self, entries: Vec<DueEntry>) {
        if entries.is_empty() {
            return;
        }
        match self.context.queue.park(&entries) {
            Ok(()) => {
                for entry in entries {
                    self.release(&entry.delivery_id);
                    // Counted in its lane (made if need be): a lot no lane counts is never put back.
                    let lane = self.lane(&entry.listener_id);
                    lane.gate.parked = lane.gate.parked.saturating_add(1);
                    // One put back went back to the lot: those released with it must not
                    // overtake it.
                    lane.gate.released.clear();
                }
            }
            Err(error) => self.write_failed(error, entries.into_iter().map(Work::Queued).collect()),
        }
    }

    /// Ends work whose listener is gone: pairs are written cancelled, queue entries cancel
    /// their pending delivery (or just leave the queue).
    pub(super) fn cancel(&mut self, works: Vec<Work>) {
        let mut pairs = Vec::new();
        for work in works {
            match work {
                Work::First(pair) => pairs.push(pair),
                Work::Queued(entry) => {
                    let cancelled = match self.context.queue.delivery(&entry.delivery_id) {
                        Ok(Some(delivery)) if delivery.state == DeliveryState::Pending as i32 && !entry.manual => {
                            self.context.queue.cancel_delivery(&delivery, &entry)
                        }
                        Ok(_) => self.context.queue.drop_entry(&entry),
                        Err(error) => Err(error),
                    };
                    match cancelled {
                        Ok(()) => self.release(&entry.delivery_id),
                        Err(error) => self.write_failed(error, vec![Work::Queued(entry)]),
                    }
                }
            }
        }
        if pairs.is_empty() {
            return;
        }
        // A pair that may have a record already (after a restart, or read back) keeps it.
        let mut deliveries = Vec::with_capacity(pairs.len());
        for pair in &pairs {
            match (pair.recheck || pair.lagging).then(|| self.context.queue.delivery_exists(&pair.delivery_id)) {
                Some(Ok(true)) => {}
                Some(Err(error)) => return self.write_failed(error, pairs.into_iter().map(Work::First).collect()),
                Some(Ok(false)) | None => deliveries.push(pair.delivery()),
            }
        }
        match self.context.queue.cancel_new(&deliveries) {
            Ok(()) => {
                for pair in pairs {
                    self.let_go(pair);
                }
            }
            Err(error) => self.write_failed(error, pairs.into_iter().map(Work::First).collect()),
        }
    }

    /// A write to set work aside or end it failed: it is tried again after a pause.
    pub(super) fn write_failed(&mut self, error: StoreError, works: Vec<Work>) {
        self.ended_if_refused(&error);
        tracing::error!(error = &error as &dyn std::error::Error, "cannot set deliveries aside; trying again shortly");
        let at = now_ms() + crate::pipeline::turn::AGAIN_AFTER_MS;
        for work in works {
            match work {
                Work::First(pair) => {
                    self.hold_ordered(&pair.listener_id, at);
                    let order = self.next_request;
                    self.next_request += 1;
                    self.again.insert((at, order), Work::First(pair));
                }
                Work::Queued(entry) => {
                    // An entry deferred behind this claim (a manual attempt) is read again too.
                    self.release(&entry.delivery_id);
                    self.later.insert((at, entry.due_ms));
                }
            }
        }
    }

    /// Puts back as many of a listener's parked entries as it has room for.
    pub(super) fn refill(&mut self, listener_id: &str) {
        let (cap, now, free) = (self.cap(), now_ms(), self.memory.available_permits());
        let Some(lane) = self.lanes.get(listener_id) else { return };
        let room = lane.gate.room(cap, now, lane.line.len(), free).min(UNPARK_CHUNK);
        if room == 0 {
            return;
        }
        match self.context.queue.unpark(listener_id, room) {
            Ok(moved) => {
                if let Some(due_ms) = moved.iter().map(|(due_ms, _)| *due_ms).min() {
                    self.rewind((due_ms, String::new()));
                }
                let lane = self.lanes.get_mut(listener_id).expect("looked up above");
                // Fewer than asked: the lot is empty now, whatever was counted.
                lane.gate.parked = if moved.len() < room { 0 } else { lane.gate.parked.saturating_sub(moved.len()) };
                lane.gate.released.extend(moved.into_iter().map(|(_, key_id)| key_id));
            }
            Err(error) => {
                self.ended_if_refused(&error);
                tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot put parked deliveries back");
            }
        }
    }

    /// What the last run left set aside: lots are taken back a few at a time, so the first
    /// delivery after a restart does not wait for a large backlog to move; detached listeners
    /// read their first attempts back from where they stood.
    pub(super) fn restore(&mut self) {
        match self.context.queue.detached() {
            Ok(detached) => {
                for (listener_id, since) in detached {
                    let lane = self.lane(&listener_id);
                    if lane.gate.deleted {
                        // Deleted while its waiting deliveries were being cancelled: what is left
                        // of them is listed nowhere now its listener is gone.
                        if let Err(error) = self.context.queue.set_detached(&listener_id, None) {
                            self.ended_if_refused(&error);
                            tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot forget a deleted listener's place in the log");
                        }
                        continue;
                    }
                    lane.detached = Some(Detached { since, read: since, outstanding: BTreeSet::new() });
                }
            }
            Err(error) => {
                tracing::error!(error = &error as &dyn std::error::Error, "cannot read the detached listeners")
            }
        }
        // Deleted listeners whose owed first attempts the last run had not finished cancelling.
        match self.context.queue.deleted_owing() {
            Ok(deleted) => {
                for DeletedListener { listener, unsure_from_seq } in deleted {
                    match self.context.store.listener(&listener.id) {
                        Ok(None) => self.cancel_owed(Arc::new(listener), unsure_from_seq),
                        // Still there: its deletion did not happen (the record goes first).
                        Ok(Some(_)) => {
                            if let Err(error) = self.context.queue.forget_deleted(&listener.id) {
                                tracing::error!(listener_id = %listener.id, error = &error as &dyn std::error::Error, "cannot forget a deletion record");
                            }
                        }
                        Err(error) => {
                            tracing::error!(listener_id = %listener.id, error = &error as &dyn std::error::Error, "cannot read a listener")
                        }
                    }
                }
            }
            Err(error) => {
                tracing::error!(error = &error as &dyn std::error::Error, "cannot read the deleted listeners")
            }
        }
        match self.context.queue.parked_listeners() {
            Ok(parked) => {
                for listener_id in parked {
                    self.lane(&listener_id).gate.parked = SOME_PARKED;
                    self.refill(&listener_id);
                }
            }
            Err(error) => tracing::error!(error = &error as &dyn std::error::Error, "cannot read the parking lots"),
        }
    }

    /// Cancels a deleted listener's lot where it lies, in short writes on a task of its own:
    /// put back in the queue, its old entries would come before everyone else's. Shutdown
    /// does not wait for it (each write is whole; a restart hands what is left of the lot to
    /// workers, which cancel it); leaving a term stops it and waits for it.
    pub(super) fn cancel_lot(&mut self, listener_id: &str) {
        let (context, listener_id) = (self.context.clone(), listener_id.to_owned());
        self.context.background.spawn(async move {
            // Abandoned, another node delivers now: what is left is its to cancel.
            while !context.abandon.is_cancelled() {
                match context.queue.cancel_parked(&listener_id, UNPARK_CHUNK) {
                    Ok(lot) if lot.taken == 0 => break,
                    Ok(lot) => {
                        if let Some(due_ms) = lot.requeued_from_ms {
                            context.queued((due_ms, String::new()));
                        }
                        tokio::task::yield_now().await;
                    }
                    Err(error) => {
                        context.ended_if_refused(&error);
                        tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot cancel a deleted listener's parked deliveries");
                        break;
                    }
                }
            }
        });
    }

    /// Cancels the first attempts a deleted listener (`listener` as it was deleted, its
    /// enabled range ending where the deletion fell) was owed and may not have had: those it
    /// had waiting in the log while detached, and those of events fan-out reached after it was
    /// deleted (from `unsure_from_seq`, fan-out's durable position then). Pairs it was handed
    /// are cancelled from its line or recorded by their attempt. Runs on a task of its own
    /// once fan-out has handed out every event before the deletion, so they are readable; a
    /// record found, or written meanwhile by an attempt that ended, is kept. The deletion's
    /// record (written with it) is forgotten once done; a restart before then starts over.
    pub(super) fn cancel_owed(&mut self, listener: Arc<Listener>, unsure_from_seq: u64) {
        let detached = self.lanes.get_mut(&listener.id).and_then(|lane| lane.detached.take());
        let from = detached.map_or(unsure_from_seq, |d| d.read.min(d.since).min(unsure_from_seq));
        let end = if listener.enabled { self.progress.handed_until_seq() } else { listener.disabled_from_seq };
        let mut handed = self.handed_watch.subscribe();
        let context = self.context.clone();
        self.context.background.spawn(async move {
            // A closed watch: the dispatcher stopped (shutdown); the next start goes on from the
            // deletion's record.
            if handed.wait_for(|until| *until >= end).await.is_err() {
                return;
            }
            let cancelled = cancel_range(&context, &listener, from, end).await;
            if let Err(error) = cancelled.and_then(|()| context.queue.forget_deleted(&listener.id)) {
                context.ended_if_refused(&error);
                if context.abandon.is_cancelled() {
                    // Another node delivers now, and goes on from the deletion's record.
                    return;
                }
                tracing::error!(listener_id = %listener.id, error = &error as &dyn std::error::Error, "cannot cancel a deleted listener's waiting deliveries");
            }
        });
    }
}

/// Writes cancelled the first attempts a deleted listener was owed from event `from` up to
/// `until` that have no record, a chunk at a time, then forgets where it stood if detached.
async fn cancel_range(
    context: &crate::pipeline::Context,
    listener: &Listener,
    mut from: u64,
    until: u64,
) -> Result<(), StoreError> {
    while from < until {
        if context.abandon.is_cancelled() {
            return Err(StoreError::NotDelivering);
        }
        let (events, reached) = context.queue.events_of(
            &listener.producer_id,
            &listener.event_type,
            from,
            until,
            CATCH_UP_CHUNK,
            CATCH_UP_CHUNK,
        )?;
        let deliveries: Vec<Delivery> = events
            .iter()
            .filter(|event| listener.wants(event.seq))
            .map(|event| {
                Delivery::pending(
                    crate::ids::delivery_id(event.seq, &listener.id),
                    event,
                    &listener.id,
                    event.created_at_ms,
                )
            })
            .collect();
        context.queue.cancel_unrecorded(&deliveries)?;
        from = reached;
        tokio::task::yield_now().await;
    }
    context.queue.set_detached(&listener.id, None)
}
