//! [`PipelineStore`] on sled: the fan-out cursor, deliveries, the due queue with leases and
//! parking, attempts and listener health.
//!
//! These keys live in the queue database, apart from the intake database that holds the event
//! log, so a trigger's flush never waits on fan-out and delivery writes. Every method is one
//! `apply_batch` there (atomic, crash-safe), and none flushes: sled's background flush makes
//! them durable within half a second, and a crash before that only redoes work (fan-out is
//! idempotent, delivery at least once). Events are only read, from the intake database.
//! Only the pipeline calls these, and each queue entry has one owner at a time (dispatcher,
//! then one worker), so plain batches need no transaction.

use sled::Batch;

use super::model::{
    Attempt, Delivery, DeliveryState, DueEntry, Event, FanoutCursor, ListenerHealth, NextStep, decode, encode,
};
use super::sled_store::{SledStore, corrupt, keys, prefix_end, read};
use super::{PipelineStore, StoreError};

fn be_u64(key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| corrupt(key))?;
    Ok(u64::from_be_bytes(array))
}

fn utf8(key: &[u8], bytes: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| corrupt(key))
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

/// A lease record: until when, and the entry's due time before it was leased (restored if
/// the lease is abandoned by a crash, so order survives a restart).
fn lease_value(until_ms: u64, original_due_ms: u64) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&until_ms.to_be_bytes());
    value[8..].copy_from_slice(&original_due_ms.to_be_bytes());
    value
}

fn parse_lease(key: &[u8], value: &[u8]) -> Result<(u64, u64), StoreError> {
    if value.len() != 16 {
        return Err(corrupt(key));
    }
    Ok((be_u64(key, &value[..8])?, be_u64(key, &value[8..])?))
}

impl SledStore {
    /// Adds to `batch` the end of an entry's lease: its queue entry (wherever the lease put
    /// it last, and where the worker was told) and its lease record.
    fn end_lease(&self, batch: &mut Batch, key_id: &str, given_until_ms: u64) -> Result<(), StoreError> {
        let lease_key = keys::lease(key_id);
        if let Some(value) = self.queue.get(&lease_key)? {
            let (until, _) = parse_lease(&lease_key, &value)?;
            if until != given_until_ms {
                batch.remove(keys::due(until, key_id));
            }
        }
        batch.remove(keys::due(given_until_ms, key_id));
        batch.remove(lease_key);
        Ok(())
    }
}

impl PipelineStore for SledStore {
    fn fanout_cursor(&self) -> Result<FanoutCursor, StoreError> {
        Ok(read(&self.queue, keys::FANOUT_CURSOR)?.unwrap_or_default())
    }

    fn event_at(&self, seq: u64) -> Result<Option<Event>, StoreError> {
        read(&self.tree, &keys::event(seq))
    }

    fn event_from(&self, seq: u64) -> Result<Option<Event>, StoreError> {
        let start = keys::event(seq).to_vec();
        match self.tree.range::<Vec<u8>, _>((std::ops::Bound::Included(start), prefix_end(keys::EVENTS))).next() {
            Some(entry) => {
                let (key, value) = entry?;
                decode(&value).map(Some).ok_or_else(|| corrupt(&key))
            }
            None => Ok(None),
        }
    }

    fn commit_fanout(&self, deliveries: &[Delivery], cursor: &FanoutCursor) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for delivery in deliveries {
            let key = keys::delivery(&delivery.id);
            // A re-run after a crash must not reset a delivery that already made progress.
            if self.queue.contains_key(&key)? {
                continue;
            }
            batch.insert(key, encode(delivery));
            batch.insert(keys::due(delivery.next_attempt_at_ms, &delivery.id), delivery.listener_id.as_bytes());
            batch.insert(keys::pending(&delivery.listener_id, &delivery.id), &[] as &[u8]);
            batch.insert(keys::by_listener(&delivery.listener_id, &delivery.id), &[] as &[u8]);
        }
        batch.insert(keys::FANOUT_CURSOR, encode(cursor));
        Ok(self.queue.apply_batch(batch)?)
    }

    fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<DueEntry>, StoreError> {
        let end = keys::due(now_ms.saturating_add(1), "");
        self.queue
            .range(keys::DUE.to_vec()..end)
            .take(limit)
            .map(|entry| {
                let (key, value) = entry?;
                due_entry(&key, &value)
            })
            .collect()
    }

    fn next_due_ms(&self) -> Result<Option<u64>, StoreError> {
        match self.queue.scan_prefix(keys::DUE).next() {
            Some(entry) => {
                let (key, value) = entry?;
                Ok(Some(due_entry(&key, &value)?.due_ms))
            }
            None => Ok(None),
        }
    }

    fn dispatch(&self, lease: &[DueEntry], park: &[DueEntry], until_ms: u64) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for entry in lease {
            let key_id = entry.key_id();
            let lease_key = keys::lease(&key_id);
            // A lease extended keeps the due time from before its first lease.
            let original_due = match self.queue.get(&lease_key)? {
                Some(value) => parse_lease(&lease_key, &value)?.1,
                None => entry.due_ms,
            };
            batch.remove(keys::due(entry.due_ms, &key_id));
            batch.insert(keys::due(until_ms, &key_id), entry.listener_id.as_bytes());
            batch.insert(lease_key, &lease_value(until_ms, original_due));
        }
        for entry in park {
            let key_id = entry.key_id();
            batch.remove(keys::due(entry.due_ms, &key_id));
            batch.insert(keys::parked(&entry.listener_id, &key_id), &entry.due_ms.to_be_bytes());
        }
        Ok(self.queue.apply_batch(batch)?)
    }

    fn unpark(&self, listener_id: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let prefix = keys::parked_prefix(listener_id);
        let mut batch = Batch::default();
        let mut moved = Vec::new();
        for entry in self.queue.scan_prefix(&prefix).take(limit) {
            let (key, value) = entry?;
            let key_id = utf8(&key, &key[prefix.len()..])?;
            batch.remove(key.clone());
            batch.insert(keys::due(be_u64(&key, &value)?, &key_id), listener_id.as_bytes());
            moved.push(key_id);
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

    fn recover(&self) -> Result<(usize, Vec<String>), StoreError> {
        let mut released = 0;
        // Bounded batches keep memory flat however many leases were out.
        loop {
            let mut batch = Batch::default();
            let mut count = 0;
            for entry in self.queue.scan_prefix(keys::LEASES).take(1024) {
                let (key, value) = entry?;
                let key_id = utf8(&key, &key[keys::LEASES.len()..])?;
                let (until, original_due) = parse_lease(&key, &value)?;
                let queued = keys::due(until, &key_id);
                if let Some(listener_id) = self.queue.get(&queued)? {
                    batch.remove(queued);
                    batch.insert(keys::due(original_due, &key_id), listener_id);
                }
                batch.remove(key);
                count += 1;
            }
            if count == 0 {
                break;
            }
            self.queue.apply_batch(batch)?;
            released += count;
        }
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
        Ok((released, listeners))
    }

    fn delivery(&self, delivery_id: &str) -> Result<Option<Delivery>, StoreError> {
        read(&self.queue, &keys::delivery(delivery_id))
    }

    fn complete_attempt(
        &self,
        delivery: &Delivery,
        attempt: &Attempt,
        entry: &DueEntry,
        leased_until_ms: u64,
        next: NextStep,
    ) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        batch.insert(keys::attempt(&delivery.id, attempt.number), encode(attempt));
        batch.insert(keys::delivery(&delivery.id), encode(delivery));
        self.end_lease(&mut batch, &entry.key_id(), leased_until_ms)?;
        match next {
            NextStep::RetryAt(due_ms) => {
                batch.insert(keys::due(due_ms, &delivery.id), delivery.listener_id.as_bytes());
            }
            NextStep::Done => batch.remove(keys::pending(&delivery.listener_id, &delivery.id)),
            NextStep::Keep => {}
        }
        Ok(self.queue.apply_batch(batch)?)
    }

    fn drop_entry(&self, entry: &DueEntry, leased_until_ms: u64) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        self.end_lease(&mut batch, &entry.key_id(), leased_until_ms)?;
        // A delivery that no longer exists must not hold its listener's order.
        if !self.queue.contains_key(keys::delivery(&entry.delivery_id))? {
            batch.remove(keys::pending(&entry.listener_id, &entry.delivery_id));
        }
        Ok(self.queue.apply_batch(batch)?)
    }

    fn cancel_delivery(&self, delivery: &Delivery, entry: &DueEntry, leased_until_ms: u64) -> Result<(), StoreError> {
        let mut cancelled = delivery.clone();
        cancelled.state = DeliveryState::Cancelled as i32;
        cancelled.next_attempt_at_ms = 0;
        let mut batch = Batch::default();
        batch.insert(keys::delivery(&delivery.id), encode(&cancelled));
        self.end_lease(&mut batch, &entry.key_id(), leased_until_ms)?;
        batch.remove(keys::pending(&delivery.listener_id, &delivery.id));
        Ok(self.queue.apply_batch(batch)?)
    }

    fn attempts(&self, delivery_id: &str) -> Result<Vec<Attempt>, StoreError> {
        let prefix = keys::attempts_prefix(delivery_id);
        self.queue
            .range::<Vec<u8>, _>((std::ops::Bound::Included(prefix.clone()), prefix_end(&prefix)))
            .map(|entry| {
                let (key, value) = entry?;
                decode(&value).ok_or_else(|| corrupt(&key))
            })
            .collect()
    }

    fn listener_health(&self, listener_id: &str) -> Result<ListenerHealth, StoreError> {
        Ok(read(&self.queue, &keys::listener_health(listener_id))?.unwrap_or_default())
    }

    fn set_listener_health(&self, listener_id: &str, health: &ListenerHealth) -> Result<(), StoreError> {
        self.queue.insert(keys::listener_health(listener_id), encode(health))?;
        Ok(())
    }
}
