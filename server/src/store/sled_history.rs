//! [`HistoryStore`] on sled: listings of events and deliveries, manual attempts, replays,
//! recovery of failed deliveries, and retention.
//!
//! Listings walk an ordered keyspace from a position (the page token) and stop at the page
//! size or at a scan budget, so a filter that matches rarely never turns one call into a
//! full scan. Every change is one `apply_batch` that updates records and their indexes
//! together, so they never disagree.

use std::ops::Bound;

use sled::Batch;

use super::listing::{implicit, merge_pages, scan_budget};
use super::model::{
    self, Delivery, DeliveryHead, DeliveryState, DueEntry, Event, IdempotencyEntry, Listener, Quarantined, decode,
    encode,
};
use super::producer_index;
use super::sled_store::{SledStore, corrupt, keys, prefix_end, read, read_event, seq_of};
use super::{EventFilter, HistoryStore, Owed, Page, PipelineStore, Store, StoreError, Trimmed};

/// Records looked at, at most, for the event that dates a run of damaged ones.
const DATING_LIMIT: usize = 100_000;

impl SledStore {
    /// The first position of the log whose event was created at or after `since_ms`
    /// (creation times never decrease along the log).
    fn first_seq_since(&self, since_ms: u64) -> Result<u64, StoreError> {
        let Some(last) = self.tree.scan_prefix(keys::EVENTS).next_back() else {
            return Ok(0);
        };
        let (mut low, mut high) = (0u64, seq_of(&last?.0, keys::EVENTS.len())? + 1);
        while low < high {
            let middle = low + (high - low) / 2;
            let start = keys::event(middle).to_vec();
            // The first record from `middle` on that decodes: a damaged one has no time of its
            // own.
            let mut found = None;
            for entry in self.tree.range::<Vec<u8>, _>((Bound::Included(start), prefix_end(keys::EVENTS))) {
                let (key, value) = entry?;
                if let Some(event) = decode::<Event>(&value) {
                    found = Some((seq_of(&key, keys::EVENTS.len())?, event.created_at_ms));
                    break;
                }
            }
            match found {
                Some((seq, created_at_ms)) if created_at_ms < since_ms => low = seq + 1,
                _ => high = middle,
            }
        }
        Ok(low)
    }

    /// Event `seq`, or `None` when it is gone or its record does not decode: for views of
    /// deliveries, which have nothing to show of an event they cannot read.
    fn readable_event(&self, seq: u64) -> Result<Option<Event>, StoreError> {
        match read_event(&self.tree, seq) {
            Err(StoreError::DamagedEvent { .. }) => Ok(None),
            read => read,
        }
    }

    /// The first event after `seq` whose record decodes, as its number and when it was
    /// created, looking at no more than [`DATING_LIMIT`] records; `None` when none does.
    fn next_readable(&self, seq: u64) -> Result<Option<(u64, u64)>, StoreError> {
        let start = keys::event(seq.saturating_add(1)).to_vec();
        let records = self.tree.range::<Vec<u8>, _>((Bound::Included(start), prefix_end(keys::EVENTS)));
        for entry in records.take(DATING_LIMIT) {
            let (key, value) = entry?;
            if let Some(event) = decode::<Event>(&value) {
                return Ok(Some((seq_of(&key, keys::EVENTS.len())?, event.created_at_ms)));
            }
        }
        Ok(None)
    }

    /// The recorded deliveries of event `seq`, or `None` while one of them is unfinished
    /// (pending, or a manual attempt asked for and not yet made).
    fn finished_deliveries_of(&self, seq: u64) -> Result<Option<Vec<DeliveryHead>>, StoreError> {
        let mut deliveries = Vec::new();
        for entry in self.queue.scan_prefix(keys::deliveries_of_event(seq)) {
            let (key, value) = entry?;
            deliveries.push(decode::<DeliveryHead>(&value).ok_or_else(|| corrupt(&key))?);
        }
        let unfinished = deliveries.iter().any(|d| d.state == DeliveryState::Pending as i32)
            || deliveries.iter().any(|d| self.queue.scan_prefix(keys::manual_prefix(&d.id)).next().is_some());
        Ok((!unfinished).then_some(deliveries))
    }

    /// Deliveries under `prefix` whose `d/` key (or index key) ends in a delivery id.
    fn deliveries_under(
        &self,
        prefix: &[u8],
        index: bool,
        state: Option<DeliveryState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<Delivery>, StoreError> {
        // Delivery-of-event keys are `d/{id}`; their prefix already holds the id's start.
        let id_start = if index { prefix.len() } else { 2 };
        // A page token is the caller's to forge: a resume point outside the prefix starts the
        // listing at the prefix, never in another event's (or producer's) deliveries.
        let start = match after.map(|after| [&prefix[..id_start], after.as_bytes()].concat()) {
            Some(resume) if resume.as_slice() >= prefix => Bound::Excluded(resume),
            _ => Bound::Included(prefix.to_vec()),
        };
        let mut items = Vec::new();
        let mut last = None;
        for entry in self.queue.range::<Vec<u8>, _>((start, prefix_end(prefix))).take(scan_budget(limit)) {
            let (key, value) = entry?;
            let id = std::str::from_utf8(&key[id_start..]).map_err(|_| corrupt(&key))?.to_owned();
            let mut delivery: Delivery = if index {
                read(&self.queue, &keys::delivery(&id))?.ok_or_else(|| corrupt(&key))?
            } else {
                decode(&value).ok_or_else(|| corrupt(&key))?
            };
            last = Some(id);
            if state.is_none_or(|state| delivery.state == state as i32) {
                // A listing shows no attempts: a page does not hold a response per delivery.
                delivery.first_attempt = None;
                items.push(delivery);
                if items.len() == limit {
                    break;
                }
            }
        }
        // Whether anything follows the last key looked at.
        let resume_after = match &last {
            Some(id) => {
                let next = Bound::Excluded([&prefix[..id_start], id.as_bytes()].concat());
                self.queue.range::<Vec<u8>, _>((next, prefix_end(prefix))).next().is_some().then(|| id.clone())
            }
            None => None,
        };
        Ok(Page { items, resume_after })
    }
}

impl SledStore {
    /// Before this event every (event, listener) pair has a record; from it on, a pair may
    /// still be waiting in the event log: fan-out's cursor, a listener fanned out apart that
    /// stands further back, or a deleted listener whose owed pairs are being cancelled.
    fn unrecorded_from(&self) -> Result<u64, StoreError> {
        let cursor = PipelineStore::fanout_cursor(self)?.next_seq;
        let detached = PipelineStore::detached(self)?.into_iter().map(|(_, seq)| seq);
        let deleted = PipelineStore::deleted_owing(self)?.into_iter().map(|deleted| deleted.unsure_from_seq);
        Ok(detached.chain(deleted).fold(cursor, u64::min))
    }

    /// What retention must keep (see [`Owed`]). Fan-out's cursor is read before the detached
    /// listeners: a listener detached in between stands at or past it.
    fn owed(&self) -> Result<Owed, StoreError> {
        let mut stop = PipelineStore::fanout_cursor(self)?.next_seq;
        let mut detached = Vec::new();
        for (listener_id, from) in PipelineStore::detached(self)? {
            match Store::listener(self, &listener_id)? {
                Some(listener) => detached.push((from, listener.producer_id, listener.event_type)),
                // Gone, its owed pairs being cancelled: everything from there stays.
                None => stop = stop.min(from),
            }
        }
        for deleted in PipelineStore::deleted_owing(self)? {
            stop = stop.min(deleted.unsure_from_seq);
        }
        Ok(Owed { stop, detached })
    }

    /// Where one listener's deliveries may start waiting in the log.
    fn unrecorded_from_for(&self, listener_id: &str) -> Result<u64, StoreError> {
        let cursor = PipelineStore::fanout_cursor(self)?.next_seq;
        Ok(match self.queue.get(keys::detached(listener_id))? {
            Some(bytes) => cursor.min(u64::from_be_bytes(bytes.as_ref().try_into().map_err(|_| corrupt(b"ld/"))?)),
            None => cursor,
        })
    }

    /// Every listener of one producer's event type.
    fn listeners_of_type(&self, producer_id: &str, event_type: &str) -> Result<Vec<Listener>, StoreError> {
        let mut all = Vec::new();
        loop {
            let after = all.last().map(|listener: &Listener| listener.id.clone());
            let page =
                crate::store::Store::list_listeners(self, producer_id, Some(event_type), after.as_deref(), 1000)?;
            let done = page.len() < 1000;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// The deliveries of `event` still waiting in the log: one per listener that wants it
    /// and has no record of it.
    fn implicit_of_event(&self, event: &Event) -> Result<Vec<Delivery>, StoreError> {
        let mut found = Vec::new();
        for listener in self.listeners_of_type(&event.producer_id, &event.event_type)? {
            if listener.wants(event.seq) && event.seq >= self.unrecorded_from_for(&listener.id)? {
                let delivery = implicit(event, &listener.id);
                if !self.queue.contains_key(keys::delivery(&delivery.id))? {
                    found.push(delivery);
                }
            }
        }
        Ok(found)
    }

    /// One delivery by id, recorded or still waiting in the log.
    pub(super) fn delivery_view(&self, delivery_id: &str) -> Result<Option<(Delivery, bool)>, StoreError> {
        if let Some(delivery) = read::<Delivery>(&self.queue, &keys::delivery(delivery_id))? {
            return Ok(Some((delivery, true)));
        }
        let Some(seq) = crate::ids::delivery_event_seq(delivery_id) else { return Ok(None) };
        if seq < self.unrecorded_from()? {
            return Ok(None);
        }
        let Some(event) = self.readable_event(seq)? else { return Ok(None) };
        let found = self.implicit_of_event(&event)?.into_iter().find(|delivery| delivery.id == delivery_id);
        Ok(found.map(|delivery| (delivery, false)))
    }

    /// A listener's deliveries still waiting in the log, after `after` (a delivery id), in id
    /// order: at most `limit`, looking at no more than `budget` of its producer's events.
    /// Also returns where it stopped, when more may follow.
    fn implicit_of_listener(
        &self,
        listener: &Listener,
        after: Option<&str>,
        limit: usize,
        budget: usize,
    ) -> Result<(Vec<Delivery>, Option<String>), StoreError> {
        // A position is a delivery id, or where an earlier page stopped: `dlv_` and an event's
        // number.
        let after_seq = after
            .and_then(|after| after.strip_prefix(crate::ids::DELIVERY_PREFIX))
            .and_then(|digits| digits.get(..16))
            .and_then(|digits| u64::from_str_radix(digits, 16).ok());
        let start = self.unrecorded_from_for(&listener.id)?.max(after_seq.unwrap_or(0));
        let mut found = Vec::new();
        for (looked_at, seq) in producer_index::seqs(&self.tree, &listener.producer_id, start).enumerate() {
            let seq = seq?;
            if looked_at == budget {
                // Everything before this event was looked at.
                let position = format!("dlv_{}", crate::crypto::hex(&seq.to_be_bytes()));
                return Ok((found, Some(position)));
            }
            if !listener.wants(seq) {
                continue;
            }
            let Some(event) = self.readable_event(seq)? else { continue };
            if event.producer_id != listener.producer_id || event.event_type != listener.event_type {
                continue;
            }
            let delivery = implicit(&event, &listener.id);
            if after.is_some_and(|after| delivery.id.as_str() <= after)
                || self.queue.contains_key(keys::delivery(&delivery.id))?
            {
                continue;
            }
            found.push(delivery);
            if found.len() == limit {
                // More may follow: the page ends here.
                let last = found.last().map(|delivery| delivery.id.clone());
                return Ok((found, last));
            }
        }
        Ok((found, None))
    }
}

impl HistoryStore for SledStore {
    fn list_events(
        &self,
        filter: &EventFilter,
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Page<Event>, StoreError> {
        // A caller that was just answered for a trigger finds its event.
        self.progress.settle()?;
        let start_seq = match after_seq {
            Some(seq) => seq.saturating_add(1),
            None if filter.since_ms > 0 => self.first_seq_since(filter.since_ms)?,
            None => 0,
        };
        // A producer's own events come through its bitmaps, the rest straight from the log.
        let mut events: Box<dyn Iterator<Item = Result<Event, StoreError>> + '_> = match &filter.producer_id {
            Some(producer_id) => Box::new(
                producer_index::seqs(&self.tree, producer_id, start_seq)
                    .map(|seq| seq.and_then(|seq| read_event(&self.tree, seq)))
                    // Trimmed since the index was read (or, were the index wrong, not theirs).
                    .filter_map(Result::transpose)
                    .filter(move |event| event.as_ref().map_or(true, |event| event.producer_id == *producer_id)),
            ),
            None => PipelineStore::events_from(self, start_seq),
        };
        let mut items = Vec::new();
        let mut last = None;
        let mut reached_until = false;
        let mut bytes = 0;
        for event in events.by_ref().take(scan_budget(limit)) {
            let event = match event {
                Ok(event) => event,
                // Put aside; it must not break the listing of the others.
                Err(StoreError::DamagedEvent { seq }) => {
                    tracing::error!(seq, "listing skips an event whose record does not decode");
                    last = Some(seq);
                    continue;
                }
                Err(error) => return Err(error),
            };
            if filter.until_ms.is_some_and(|until| event.created_at_ms >= until) {
                // Nothing later in the log is older.
                reached_until = true;
                break;
            }
            let wanted = event.created_at_ms >= filter.since_ms
                && filter.event_type.as_ref().is_none_or(|t| *t == event.event_type);
            let size = prost::Message::encoded_len(&event);
            if wanted && !items.is_empty() && bytes + size > super::LIST_PAGE_BYTES {
                // The page is full: this event starts the next one.
                return Ok(Page { items, resume_after: last.map(|seq: u64| seq.to_string()) });
            }
            last = Some(event.seq);
            if wanted {
                bytes += size;
                items.push(event);
                if items.len() == limit {
                    break;
                }
            }
        }
        let resume_after = match last {
            // A damaged record next is more to come too.
            Some(seq) if !reached_until => match events.next() {
                None => None,
                Some(Ok(_) | Err(StoreError::DamagedEvent { .. })) => Some(seq.to_string()),
                Some(Err(error)) => return Err(error),
            },
            _ => None,
        };
        Ok(Page { items, resume_after })
    }

    fn deliveries_of_event(
        &self,
        event_seq: u64,
        state: Option<DeliveryState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<Delivery>, StoreError> {
        let prefix = keys::deliveries_of_event(event_seq);
        let waiting = state.is_none_or(|state| state == DeliveryState::Pending);
        let event =
            if waiting && event_seq >= self.unrecorded_from()? { self.readable_event(event_seq)? } else { None };
        let Some(event) = event else {
            return self.deliveries_under(&prefix, false, state, after, limit);
        };
        // A recent event: its deliveries are those recorded and those still waiting in the
        // log, one per listener at most (an event has as many as it has listeners, plus
        // replays, so reading them all is bounded).
        let mut all: Vec<Delivery> = Vec::new();
        for entry in self.queue.scan_prefix(&prefix) {
            let (key, value) = entry?;
            let mut delivery: Delivery = decode(&value).ok_or_else(|| corrupt(&key))?;
            delivery.first_attempt = None;
            all.push(delivery);
        }
        all.extend(self.implicit_of_event(&event)?);
        all.retain(|delivery| {
            state.is_none_or(|state| delivery.state == state as i32)
                && after.is_none_or(|after| delivery.id.as_str() > after)
        });
        Ok(merge_pages(all, Vec::new(), [None, None], limit))
    }

    fn deliveries_of_listener(
        &self,
        listener_id: &str,
        state: Option<DeliveryState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<Delivery>, StoreError> {
        let stored = self.deliveries_under(&keys::by_listener_prefix(listener_id), true, state, after, limit)?;
        let waiting = state.is_none_or(|state| state == DeliveryState::Pending);
        let listener = if waiting { crate::store::Store::listener(self, listener_id)? } else { None };
        let Some(listener) = listener else {
            return Ok(stored);
        };
        let (implicit, stopped) = self.implicit_of_listener(&listener, after, limit, scan_budget(limit))?;
        Ok(merge_pages(stored.items, implicit, [stored.resume_after, stopped], limit))
    }

    fn delivery_view(&self, delivery_id: &str) -> Result<Option<(Delivery, bool)>, StoreError> {
        SledStore::delivery_view(self, delivery_id)
    }

    fn queue_manual_attempt(&self, delivery_id: &str, now_ms: u64) -> Result<Option<(Delivery, u64)>, StoreError> {
        let _serial = self.history_lock.lock().expect("the history lock is never poisoned");
        let Some(delivery) = read::<Delivery>(&self.queue, &keys::delivery(delivery_id))? else {
            return Ok(None);
        };
        let entry = DueEntry {
            due_ms: now_ms,
            delivery_id: delivery_id.to_owned(),
            listener_id: delivery.listener_id.clone(),
            manual: true,
        };
        let key_id = entry.key_id();
        let mut batch = Batch::default();
        // One asked for earlier is still queued (or under way), or parked with its listener.
        // A mark without its entry (two manual attempts parked at once before, whose lot
        // entry was one) is stale: it goes.
        let prefix = keys::manual_prefix(delivery_id);
        for mark in self.queue.scan_prefix(&prefix).keys() {
            let mark = mark?;
            let due_ms = seq_of(&mark, prefix.len())?;
            if self.queue.contains_key(keys::due(due_ms, &key_id))?
                || self.queue.contains_key(keys::parked(&entry.listener_id, &key_id))?
            {
                return Ok(Some((delivery, due_ms)));
            }
            batch.remove(mark);
        }
        batch.insert(keys::due(now_ms, &key_id), entry.listener_id.as_bytes());
        batch.insert(keys::manual(delivery_id, now_ms), &[] as &[u8]);
        self.queue.apply_batch(batch)?;
        self.queue.flush()?;
        self.filesystem.sync()?;
        Ok(Some((delivery, now_ms)))
    }

    fn create_deliveries(&self, deliveries: &[Delivery]) -> Result<bool, StoreError> {
        let _serial = self.history_lock.lock().expect("the history lock is never poisoned");
        let mut batch = Batch::default();
        for delivery in deliveries {
            // Retention may have removed the event since the caller read it.
            if !self.tree.contains_key(keys::event(delivery.event_seq))? {
                return Ok(false);
            }
            batch.insert(keys::delivery(&delivery.id), encode(delivery));
            batch.insert(keys::due(delivery.next_attempt_at_ms, &delivery.id), delivery.listener_id.as_bytes());
            batch.insert(keys::pending(&delivery.listener_id, &delivery.id), &[] as &[u8]);
            batch.insert(keys::by_listener(&delivery.listener_id, &delivery.id), &[] as &[u8]);
        }
        self.queue.apply_batch(batch)?;
        // A replay is answered to a caller: make it durable first.
        self.queue.flush()?;
        self.filesystem.sync()?;
        Ok(true)
    }

    fn failed_deliveries(
        &self,
        listener_id: &str,
        since_ms: u64,
        until_ms: Option<u64>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<String>, StoreError> {
        let prefix = keys::by_listener_prefix(listener_id);
        let start = match after {
            Some(after) => Bound::Excluded([prefix.as_slice(), after.as_bytes()].concat()),
            // Delivery ids start with their event's position, and positions follow creation
            // time: start at the first event of the window.
            None => {
                let first_id = format!("dlv_{}", crate::crypto::hex(&self.first_seq_since(since_ms)?.to_be_bytes()));
                Bound::Included([prefix.as_slice(), first_id.as_bytes()].concat())
            }
        };
        let mut items = Vec::new();
        let mut last = None;
        for entry in self.queue.range::<Vec<u8>, _>((start, prefix_end(&prefix))).take(scan_budget(limit)) {
            let (key, _) = entry?;
            let id = std::str::from_utf8(&key[prefix.len()..]).map_err(|_| corrupt(&key))?.to_owned();
            let delivery = read::<Delivery>(&self.queue, &keys::delivery(&id))?;
            if let Some(delivery) = delivery {
                if until_ms.is_some_and(|until| delivery.created_at_ms >= until) {
                    // Later deliveries of this listener were created later still.
                    return Ok(Page { items, resume_after: None });
                }
                if delivery.created_at_ms >= since_ms && delivery.state == DeliveryState::Failed as i32 {
                    items.push(delivery.id);
                }
            }
            last = Some(id);
            if items.len() == limit {
                break;
            }
        }
        let resume_after = match last {
            Some(id) => {
                let next = Bound::Excluded([prefix.as_slice(), id.as_bytes()].concat());
                self.queue.range::<Vec<u8>, _>((next, prefix_end(&prefix))).next().is_some().then_some(id)
            }
            None => None,
        };
        Ok(Page { items, resume_after })
    }

    fn requeue_failed(&self, delivery_ids: &[String], now_ms: u64) -> Result<usize, StoreError> {
        let _serial = self.history_lock.lock().expect("the history lock is never poisoned");
        let mut batch = Batch::default();
        let mut requeued = 0;
        for id in delivery_ids {
            let Some(mut delivery) = read::<Delivery>(&self.queue, &keys::delivery(id))? else { continue };
            if delivery.state != DeliveryState::Failed as i32 {
                continue;
            }
            // A manual attempt queued or under way writes the delivery back as it read it
            // when it ends, which would undo this: such a delivery is left to that attempt.
            if self.queue.scan_prefix(keys::manual_prefix(id)).next().transpose()?.is_some() {
                continue;
            }
            delivery.state = DeliveryState::Pending as i32;
            delivery.next_attempt_at_ms = now_ms;
            batch.insert(keys::delivery(id), encode(&delivery));
            batch.insert(keys::due(now_ms, id), delivery.listener_id.as_bytes());
            batch.insert(keys::pending(&delivery.listener_id, id), &[] as &[u8]);
            requeued += 1;
        }
        self.queue.apply_batch(batch)?;
        self.queue.flush()?;
        self.filesystem.sync()?;
        Ok(requeued)
    }

    fn trim(
        &self,
        before_ms: u64,
        keys_before_ms: u64,
        start_seq: u64,
        max_events: usize,
    ) -> Result<Trimmed, StoreError> {
        let _serial = self.history_lock.lock().expect("the history lock is never poisoned");
        // Events with deliveries still waiting in the log stay.
        let owed = self.owed()?;
        let mut trimmed = Trimmed::default();
        // Deliveries go first (queue database), then their events (intake database): a crash
        // in between leaves an event without deliveries, which the next sweep removes.
        let mut deliveries_batch = Batch::default();
        let mut events_batch = Batch::default();
        let mut index = producer_index::Changes::default();
        // Idempotency records of the trimmed events: (event, whether its 24 hours are up).
        let mut keyed: Vec<(Event, bool)> = Vec::new();
        let start = keys::event(start_seq).to_vec();
        let events = self.tree.range::<Vec<u8>, _>((Bound::Included(start), prefix_end(keys::EVENTS)));
        // The first readable event after the damaged records met: (number, creation time).
        let mut dated: Option<(u64, u64)> = None;
        let mut removed_damaged = false;
        for (looked_at, entry) in events.enumerate() {
            let (key, value) = entry?;
            let seq = seq_of(&key, keys::EVENTS.len())?;
            let event = decode::<Event>(&value);
            if event.is_none() && model::written_by_newer(&value) {
                // Not damaged, perhaps: written by a newer hookd (run before this one). It
                // stays, and so does everything after it.
                tracing::warn!(seq, "retention stops at an event record of a newer format than this hookd knows");
                trimmed.next_seq = None;
                break;
            }
            // A damaged record's own age is unknown: it is old enough once the next event
            // that decodes is (creation times never decrease along the log). A run of damaged
            // records is dated by the one event after it, looked for once.
            let old_enough = match &event {
                Some(event) => event.created_at_ms < before_ms,
                None => {
                    if dated.is_none_or(|(readable, _)| readable < seq) {
                        dated = self.next_readable(seq)?;
                        if dated.is_none() {
                            tracing::warn!(
                                seq,
                                "retention stops at a damaged event record: no event after it dates it"
                            );
                        }
                    }
                    dated.is_some_and(|(_, created)| created < before_ms)
                }
            };
            if !old_enough || seq >= owed.stop {
                trimmed.next_seq = None;
                break;
            }
            if looked_at == max_events {
                trimmed.next_seq = Some(seq);
                break;
            }
            if event.as_ref().is_some_and(|event| owed.keeps(seq, &event.producer_id, &event.event_type)) {
                trimmed.kept += 1;
                continue;
            }
            let Some(deliveries) = self.finished_deliveries_of(seq)? else {
                trimmed.kept += 1;
                continue;
            };
            for delivery in &deliveries {
                deliveries_batch.remove(keys::delivery(&delivery.id));
                deliveries_batch.remove(keys::by_listener(&delivery.listener_id, &delivery.id));
                for attempt in self.queue.scan_prefix(keys::attempts_prefix(&delivery.id)).keys() {
                    deliveries_batch.remove(attempt?);
                }
            }
            events_batch.remove(key);
            trimmed.events += 1;
            trimmed.deliveries += deliveries.len();
            let Some(event) = event else {
                // Fan-out put it aside when it met it; one damaged after fan-out passed it is
                // put aside here, so the operator still sees it once its record is gone. Its
                // producer is unknown: its bit in the producer's bitmap stays, and readers
                // skip a bit whose event is gone.
                tracing::warn!(seq, "retention removes an event record that does not decode");
                if !self.queue.contains_key(keys::quarantined(seq))? {
                    let reason = "the event's record does not decode (found by retention)".to_owned();
                    let record = Quarantined { seq, reason, at_ms: crate::clock::now_ms() };
                    deliveries_batch.insert(keys::quarantined(seq), encode(&record));
                }
                removed_damaged = true;
                continue;
            };
            index.clear(&event.producer_id, seq);
            if !event.idempotency_key.is_empty() {
                let expired = event.created_at_ms < keys_before_ms;
                keyed.push((event, expired));
            }
        }
        self.queue.apply_batch(deliveries_batch)?;
        if removed_damaged {
            // Its record put aside must outlive a power loss that keeps the removal (the two
            // databases reach the disk on their own).
            self.queue.flush()?;
            self.filesystem.sync()?;
        }
        // The applier may be writing a bitmap trimmed here (retention reached its block), or
        // a newer record for one of these idempotency keys: both are read under its lock.
        let _index = self.progress.index_turn();
        for (event, expired) in keyed {
            let idempotency = keys::idempotency(&event.producer_id, &event.idempotency_key);
            let points_here =
                read::<IdempotencyEntry>(&self.tree, &idempotency)?.is_some_and(|e| e.event_id == event.id);
            match (points_here, expired) {
                (true, true) => events_batch.remove(idempotency),
                // Its 24 hours are not up: kept, and removed once they are.
                (true, false) => events_batch.insert(
                    keys::kept_key(event.created_at_ms, &event.producer_id, &event.idempotency_key),
                    &[] as &[u8],
                ),
                (false, _) => {}
            }
        }
        index.write(&self.tree, &mut events_batch)?;
        self.tree.apply_batch(events_batch)?;
        Ok(trimmed)
    }

    fn counts(&self) -> Result<super::Counts, StoreError> {
        let mut counts = super::Counts::default();
        for entry in self.tree.scan_prefix(keys::LISTENERS).take(super::COUNT_LIMIT) {
            let (key, value) = entry?;
            let listener: Listener = decode(&value).ok_or_else(|| corrupt(&key))?;
            counts.listeners += 1;
            counts.disabled_listeners += u64::from(!listener.enabled);
        }
        let count = |prefix: &[u8]| self.queue.scan_prefix(prefix).keys().take(super::COUNT_LIMIT).count() as u64;
        counts.queued = count(keys::DUE) + count(keys::PARKED);
        counts.quarantined = count(keys::QUARANTINED);
        Ok(counts)
    }

    fn trim_keys(&self, keys_before_ms: u64, max: usize) -> Result<usize, StoreError> {
        let end = Bound::Excluded([keys::KEPT_KEYS, &keys_before_ms.to_be_bytes()[..]].concat());
        let _index = self.progress.index_turn();
        let mut batch = Batch::default();
        let mut looked_at = 0;
        for entry in self.tree.range::<Vec<u8>, _>((Bound::Included(keys::KEPT_KEYS.to_vec()), end)).take(max) {
            let (key, _) = entry?;
            looked_at += 1;
            let rest = &key[keys::KEPT_KEYS.len()..];
            let created_ms =
                u64::from_be_bytes(rest.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| corrupt(&key))?);
            let idempotency = [b"i/".as_slice(), &rest[8..]].concat();
            // A later event may have taken the key since (after the window): its record stays.
            if read::<IdempotencyEntry>(&self.tree, &idempotency)?.is_some_and(|e| e.created_at_ms == created_ms) {
                batch.remove(idempotency);
            }
            batch.remove(key);
        }
        self.tree.apply_batch(batch)?;
        Ok(looked_at)
    }
}
