//! [`PipelineStore`] on sled: the fan-out cursor, deliveries, the due queue with parking,
//! attempts and listener health.
//!
//! A first attempt taken straight from the event log is written once, when it ends: the
//! delivery's record (holding the attempt) and its listener index, plus a retry's queue entry
//! if one follows, in the recorder's batch.
//!
//! These keys live in the queue database, apart from the intake database that holds the event
//! log, so a trigger's flush never waits on fan-out and delivery writes. Every method is one
//! `apply_batch` there (atomic, crash-safe), and none flushes: sled's background flush makes
//! them durable within half a second, and a crash before that only redoes work (fan-out is
//! idempotent, delivery at least once). Events are only read, from the intake database.
//! Only the pipeline calls these, and each queue entry has one owner at a time (dispatcher,
//! then one worker, tracked in the dispatcher's memory), so plain batches need no
//! transaction.

use sled::Batch;

use super::model::{
    Attempt, DeletedListener, Delivery, DeliveryState, DueEntry, Event, FanoutCursor, Listener, ListenerHealth,
    NextStep, Quarantined, decode, encode,
};
use super::sled_store::{SledStore, corrupt, keys, prefix_end, read, read_event};
use super::{CancelledLot, Completion, NewDelivery, PipelineStore, QueuePosition, StoreError};

fn be_u64(key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| corrupt(key))?;
    Ok(u64::from_be_bytes(array))
}

fn utf8(key: &[u8], bytes: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| corrupt(key))
}

/// Where a scan of the due queue starts: just after `after`, or at the queue's start.
fn start(after: Option<&QueuePosition>) -> std::ops::Bound<Vec<u8>> {
    match after {
        Some((due_ms, key_id)) => std::ops::Bound::Excluded(keys::due(*due_ms, key_id)),
        None => std::ops::Bound::Included(keys::DUE.to_vec()),
    }
}

/// Parses a `q/` key and its value (the listener id).
fn due_entry(key: &[u8], value: &[u8]) -> Result<DueEntry, StoreError> {
    let rest = &key[keys::DUE.len()..];
    if rest.len() < 8 {
        return Err(corrupt(key));
    }
    let key_id = std::str::from_utf8(&rest[8..]).map_err(|_| corrupt(key))?;
    let (delivery_id, manual) = DueEntry::split_key_id(key_id);
    Ok(DueEntry {
        due_ms: be_u64(key, &rest[..8])?,
        delivery_id: delivery_id.to_owned(),
        listener_id: utf8(key, value)?,
        manual,
    })
}

impl SledStore {
    /// Whether a manual attempt of the delivery is in the due queue (waiting or under way),
    /// as opposed to parked.
    fn manual_attempt_queued(&self, delivery_id: &str) -> Result<bool, StoreError> {
        let prefix = keys::manual_prefix(delivery_id);
        let manual =
            DueEntry { due_ms: 0, delivery_id: delivery_id.to_owned(), listener_id: String::new(), manual: true };
        let key_id = manual.key_id();
        for entry in self.queue.scan_prefix(&prefix) {
            let (key, _) = entry?;
            let due_ms = be_u64(&key, &key[prefix.len()..])?;
            if self.queue.contains_key(keys::due(due_ms, &key_id))? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl PipelineStore for SledStore {
    fn fanout_cursor(&self) -> Result<FanoutCursor, StoreError> {
        Ok(read(&self.queue, keys::FANOUT_CURSOR)?.unwrap_or_default())
    }

    fn set_fanout_cursor(&self, cursor: &FanoutCursor) -> Result<(), StoreError> {
        self.queue.insert(keys::FANOUT_CURSOR, encode(cursor))?;
        Ok(())
    }

    fn event_at(&self, seq: u64) -> Result<Option<Event>, StoreError> {
        read_event(&self.tree, seq)
    }

    fn events_from(&self, seq: u64) -> Box<dyn Iterator<Item = Result<Event, StoreError>> + '_> {
        let start = keys::event(seq).to_vec();
        Box::new(self.tree.range::<Vec<u8>, _>((std::ops::Bound::Included(start), prefix_end(keys::EVENTS))).map(
            |entry| {
                let (key, value) = entry?;
                let seq = be_u64(&key, &key[keys::EVENTS.len()..])?;
                decode(&value).ok_or(StoreError::DamagedEvent { seq })
            },
        ))
    }

    fn quarantine_event(&self, seq: u64, reason: &str, now_ms: u64) -> Result<(), StoreError> {
        let record = Quarantined { seq, reason: reason.to_owned(), at_ms: now_ms };
        self.queue.insert(keys::quarantined(seq), encode(&record))?;
        Ok(())
    }

    fn delivery_exists(&self, delivery_id: &str) -> Result<bool, StoreError> {
        Ok(self.queue.contains_key(keys::delivery(delivery_id))?)
    }

    fn park_new(&self, deliveries: &[NewDelivery]) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for NewDelivery { delivery, ordered } in deliveries {
            batch.insert(keys::delivery(&delivery.id), encode(delivery));
            batch.insert(keys::by_listener(&delivery.listener_id, &delivery.id), &[] as &[u8]);
            batch.insert(keys::parked(&delivery.listener_id, &delivery.id), &delivery.next_attempt_at_ms.to_be_bytes());
            if *ordered {
                batch.insert(keys::pending(&delivery.listener_id, &delivery.id), &[] as &[u8]);
            }
        }
        Ok(self.queue.apply_batch(batch)?)
    }

    fn cancel_new(&self, deliveries: &[Delivery]) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for delivery in deliveries {
            let mut cancelled = delivery.clone();
            cancelled.state = DeliveryState::Cancelled as i32;
            cancelled.next_attempt_at_ms = 0;
            batch.insert(keys::delivery(&delivery.id), encode(&cancelled));
            batch.insert(keys::by_listener(&delivery.listener_id, &delivery.id), &[] as &[u8]);
        }
        Ok(self.queue.apply_batch(batch)?)
    }

    fn cancel_unrecorded(&self, deliveries: &[Delivery]) -> Result<(), StoreError> {
        for delivery in deliveries {
            let mut cancelled = delivery.clone();
            cancelled.state = DeliveryState::Cancelled as i32;
            cancelled.next_attempt_at_ms = 0;
            let key = keys::delivery(&delivery.id);
            let swapped = self.queue.compare_and_swap(key, None as Option<&[u8]>, Some(encode(&cancelled)))?;
            if swapped.is_ok() {
                // A crash before this line leaves the record listed by its event only.
                self.queue.insert(keys::by_listener(&delivery.listener_id, &delivery.id), &[] as &[u8])?;
            }
        }
        Ok(())
    }

    fn set_detached(&self, listener_id: &str, from_seq: Option<u64>) -> Result<(), StoreError> {
        match from_seq {
            Some(seq) => self.queue.insert(keys::detached(listener_id), &seq.to_be_bytes())?,
            None => self.queue.remove(keys::detached(listener_id))?,
        };
        Ok(())
    }

    fn detached(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.queue
            .scan_prefix(keys::DETACHED)
            .map(|entry| {
                let (key, value) = entry?;
                Ok((utf8(&key, &key[keys::DETACHED.len()..])?, be_u64(&key, &value)?))
            })
            .collect()
    }

    fn deleted_owing(&self) -> Result<Vec<DeletedListener>, StoreError> {
        self.queue
            .scan_prefix(keys::OWING)
            .map(|entry| {
                let (key, value) = entry?;
                let (from, listener) = value.split_at_checked(8).ok_or_else(|| corrupt(&key))?;
                let listener: Listener = decode(listener).ok_or_else(|| corrupt(&key))?;
                Ok(DeletedListener { listener, unsure_from_seq: be_u64(&key, from)? })
            })
            .collect()
    }

    fn forget_deleted(&self, listener_id: &str) -> Result<(), StoreError> {
        self.queue.remove(keys::owing(listener_id))?;
        Ok(())
    }

    fn events_of(
        &self,
        producer_id: &str,
        event_type: &str,
        from_seq: u64,
        until_seq: u64,
        scan: usize,
        limit: usize,
    ) -> Result<(Vec<Event>, u64), StoreError> {
        let mut found = Vec::new();
        let mut reached = until_seq;
        for (looked_at, seq) in super::producer_index::seqs(&self.tree, producer_id, from_seq).enumerate() {
            let seq = seq?;
            if seq >= until_seq {
                break;
            }
            if looked_at == scan {
                reached = seq;
                break;
            }
            match read_event(&self.tree, seq) {
                Ok(Some(event)) if event.producer_id == producer_id && event.event_type == event_type => {
                    found.push(event);
                    if found.len() >= limit {
                        reached = seq + 1;
                        break;
                    }
                }
                Ok(_) => {}
                // Put aside by fan-out already; nothing to deliver.
                Err(StoreError::DamagedEvent { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        Ok((found, reached))
    }

    fn due(&self, after: Option<&QueuePosition>, now_ms: u64, limit: usize) -> Result<Vec<DueEntry>, StoreError> {
        let end = keys::due(now_ms.saturating_add(1), "");
        self.queue
            .range::<Vec<u8>, _>((start(after), std::ops::Bound::Excluded(end)))
            .take(limit)
            .map(|entry| {
                let (key, value) = entry?;
                due_entry(&key, &value)
            })
            .collect()
    }

    fn next_due_ms(&self, after: Option<&QueuePosition>) -> Result<Option<u64>, StoreError> {
        match self.queue.range::<Vec<u8>, _>((start(after), prefix_end(keys::DUE))).next() {
            Some(entry) => {
                let (key, value) = entry?;
                Ok(Some(due_entry(&key, &value)?.due_ms))
            }
            None => Ok(None),
        }
    }

    fn park(&self, entries: &[DueEntry]) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for entry in entries {
            let key_id = entry.key_id();
            batch.remove(keys::due(entry.due_ms, &key_id));
            batch.insert(keys::parked(&entry.listener_id, &key_id), &entry.due_ms.to_be_bytes());
        }
        Ok(self.queue.apply_batch(batch)?)
    }

    fn unpark(&self, listener_id: &str, limit: usize) -> Result<Vec<QueuePosition>, StoreError> {
        let prefix = keys::parked_prefix(listener_id);
        let mut batch = Batch::default();
        let mut moved = Vec::new();
        for entry in self.queue.scan_prefix(&prefix).take(limit) {
            let (key, value) = entry?;
            let key_id = utf8(&key, &key[prefix.len()..])?;
            let due_ms = be_u64(&key, &value)?;
            batch.remove(key.clone());
            batch.insert(keys::due(due_ms, &key_id), listener_id.as_bytes());
            moved.push((due_ms, key_id));
        }
        self.queue.apply_batch(batch)?;
        Ok(moved)
    }

    fn pending_head(&self, listener_id: &str) -> Result<Option<String>, StoreError> {
        let prefix = keys::pending_prefix(listener_id);
        match self.queue.scan_prefix(&prefix).next() {
            Some(entry) => {
                let (key, _) = entry?;
                Ok(Some(utf8(&key, &key[prefix.len()..])?))
            }
            None => Ok(None),
        }
    }

    fn parked_listeners(&self) -> Result<Vec<String>, StoreError> {
        // One seek per listener with parked entries, however many it has.
        let mut listeners = Vec::new();
        let mut from = keys::PARKED.to_vec();
        while let Some(entry) =
            self.queue.range::<Vec<u8>, _>((std::ops::Bound::Included(from), prefix_end(keys::PARKED))).next()
        {
            let (key, _) = entry?;
            let rest = utf8(&key, &key[keys::PARKED.len()..])?;
            let (listener_id, _) = rest.split_once('/').ok_or_else(|| corrupt(&key))?;
            let lot = keys::parked_prefix(listener_id);
            listeners.push(listener_id.to_owned());
            from = match prefix_end(&lot) {
                std::ops::Bound::Excluded(end) => end,
                _ => break,
            };
        }
        Ok(listeners)
    }

    fn delivery(&self, delivery_id: &str) -> Result<Option<Delivery>, StoreError> {
        read(&self.queue, &keys::delivery(delivery_id))
    }

    fn complete_attempts(&self, completions: Vec<Completion>) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for Completion { mut delivery, attempt, entry, next, ordered } in completions {
            if attempt.number == 1 {
                delivery.first_attempt = Some(attempt);
            } else {
                batch.insert(keys::attempt(&delivery.id, attempt.number), encode(&attempt));
            }
            batch.insert(keys::delivery(&delivery.id), encode(&delivery));
            match &entry {
                Some(entry) => {
                    batch.remove(keys::due(entry.due_ms, &entry.key_id()));
                    if entry.manual {
                        batch.remove(keys::manual(&delivery.id, entry.due_ms));
                    }
                }
                // Straight from the log: the delivery is written for the first time.
                None => batch.insert(keys::by_listener(&delivery.listener_id, &delivery.id), &[] as &[u8]),
            }
            match next {
                NextStep::RetryAt(due_ms) => {
                    batch.insert(keys::due(due_ms, &delivery.id), delivery.listener_id.as_bytes());
                    if entry.is_none() && ordered {
                        batch.insert(keys::pending(&delivery.listener_id, &delivery.id), &[] as &[u8]);
                    }
                }
                NextStep::Done if entry.is_some() => {
                    batch.remove(keys::pending(&delivery.listener_id, &delivery.id));
                }
                NextStep::Done | NextStep::Keep => {}
            }
        }
        Ok(self.queue.apply_batch(batch)?)
    }

    fn drop_entry(&self, entry: &DueEntry) -> Result<(), StoreError> {
        // The state read below decides a write: a recovery (which makes failed deliveries
        // pending again) must not come in between. Dropping an entry is rare.
        let _serial = self.history_lock.lock().expect("the history lock is never poisoned");
        let mut batch = Batch::default();
        batch.remove(keys::due(entry.due_ms, &entry.key_id()));
        if entry.manual {
            batch.remove(keys::manual(&entry.delivery_id, entry.due_ms));
        }
        // A delivery that no longer exists, or has ended, must not hold its listener's order.
        let pending = read::<Delivery>(&self.queue, &keys::delivery(&entry.delivery_id))?
            .is_some_and(|delivery| delivery.state == DeliveryState::Pending as i32);
        if !pending {
            batch.remove(keys::pending(&entry.listener_id, &entry.delivery_id));
        }
        Ok(self.queue.apply_batch(batch)?)
    }

    fn cancel_delivery(&self, delivery: &Delivery, entry: &DueEntry) -> Result<(), StoreError> {
        let mut cancelled = delivery.clone();
        cancelled.state = DeliveryState::Cancelled as i32;
        cancelled.next_attempt_at_ms = 0;
        let mut batch = Batch::default();
        batch.insert(keys::delivery(&delivery.id), encode(&cancelled));
        batch.remove(keys::due(entry.due_ms, &entry.key_id()));
        if entry.manual {
            batch.remove(keys::manual(&delivery.id, entry.due_ms));
        }
        batch.remove(keys::pending(&delivery.listener_id, &delivery.id));
        Ok(self.queue.apply_batch(batch)?)
    }

    fn cancel_parked(&self, listener_id: &str, limit: usize) -> Result<CancelledLot, StoreError> {
        let prefix = keys::parked_prefix(listener_id);
        let mut batch = Batch::default();
        let mut cancelled = std::collections::HashMap::new();
        let mut lot = CancelledLot::default();
        for entry in self.queue.scan_prefix(&prefix).take(limit) {
            let (key, value) = entry?;
            let key_id = utf8(&key, &key[prefix.len()..])?;
            let (delivery_id, manual) = DueEntry::split_key_id(&key_id);
            let due_ms = be_u64(&key, &value)?;
            lot.taken += 1;
            batch.remove(key.clone());
            // A manual attempt of it may be under way (its entry is in the queue, not in the
            // lot): it writes the delivery back when it ends, so the delivery is left to the
            // queue, where the dispatcher hands it out after that attempt and its worker
            // cancels it.
            if !manual && self.manual_attempt_queued(delivery_id)? {
                batch.insert(keys::due(due_ms, &key_id), listener_id.as_bytes());
                lot.requeued_from_ms = Some(lot.requeued_from_ms.map_or(due_ms, |from: u64| from.min(due_ms)));
                continue;
            }
            if manual {
                batch.remove(keys::manual(delivery_id, due_ms));
            }
            batch.remove(keys::pending(listener_id, delivery_id));
            if !cancelled.contains_key(delivery_id)
                && let Some(mut delivery) = read::<Delivery>(&self.queue, &keys::delivery(delivery_id))?
                && delivery.state == DeliveryState::Pending as i32
            {
                delivery.state = DeliveryState::Cancelled as i32;
                delivery.next_attempt_at_ms = 0;
                cancelled.insert(delivery_id.to_owned(), delivery);
            }
        }
        for (id, delivery) in cancelled {
            batch.insert(keys::delivery(&id), encode(&delivery));
        }
        self.queue.apply_batch(batch)?;
        Ok(lot)
    }

    fn attempts(&self, delivery_id: &str, after: u32, limit: usize) -> Result<Vec<Attempt>, StoreError> {
        let first = read::<Delivery>(&self.queue, &keys::delivery(delivery_id))?.and_then(|d| d.first_attempt);
        let first_number = first.as_ref().map(|attempt| attempt.number);
        let first = first.filter(|attempt| attempt.number > after);
        let prefix = keys::attempts_prefix(delivery_id);
        let start = keys::attempt(delivery_id, after.saturating_add(1));
        let rest =
            self.queue.range::<Vec<u8>, _>((std::ops::Bound::Included(start), prefix_end(&prefix))).map(|entry| {
                let (key, value) = entry?;
                decode::<Attempt>(&value).ok_or_else(|| corrupt(&key))
            });
        // hookd writes attempt 1 only into the delivery's record; should a record of its own
        // exist too (older data), it is the same attempt: list it once.
        let rest = rest.filter(|attempt| !matches!(attempt, Ok(attempt) if Some(attempt.number) == first_number));
        first.map(Ok).into_iter().chain(rest).take(limit).collect()
    }

    fn listener_health(&self, listener_id: &str) -> Result<ListenerHealth, StoreError> {
        Ok(read(&self.queue, &keys::listener_health(listener_id))?.unwrap_or_default())
    }

    fn set_listener_health(&self, listener_id: &str, health: &ListenerHealth) -> Result<(), StoreError> {
        self.queue.insert(keys::listener_health(listener_id), encode(health))?;
        Ok(())
    }
}
