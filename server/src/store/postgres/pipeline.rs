//! [`PipelineStore`] on PostgreSQL: the fan-out cursor, deliveries, the due queue with
//! parking, attempts and listener health.
//!
//! Each method is one transaction, and a batch of many records is one statement per table
//! (`unnest` of arrays), so a batch costs a handful of round trips whatever its size. As on
//! sled, these writes need not be durable on their own (delivery is at least once), but a
//! commit here is.

use std::collections::VecDeque;

use deadpool_postgres::GenericClient;

use super::{PgStore, corrupt, signed, term, unsigned};
use crate::store::model::{
    Attempt, DeletedListener, Delivery, DeliveryState, DueEntry, Event, FanoutCursor, ListenerHealth, NextStep,
    Quarantined, decode, encode,
};
use crate::store::{CancelledLot, Completion, NewDelivery, Note, PipelineStore, QueuePosition, Store, StoreError};

/// Events read from the log by the first query of [`PipelineStore::events_from`]; each next
/// query reads twice as many, up to [`EVENTS_PER_READ`]: a caller that takes a few events
/// reads few payloads.
const FIRST_READ: i64 = 16;
const EVENTS_PER_READ: i64 = 256;

/// Writes deliveries (new, or over their earlier record).
pub(super) async fn put_deliveries(client: &impl GenericClient, deliveries: &[&Delivery]) -> Result<(), StoreError> {
    if deliveries.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = deliveries.iter().map(|d| d.id.as_str()).collect();
    let listeners: Vec<&str> = deliveries.iter().map(|d| d.listener_id.as_str()).collect();
    let seqs: Vec<i64> = deliveries.iter().map(|d| signed(d.event_seq)).collect();
    let states: Vec<i16> = deliveries.iter().map(|d| i16::try_from(d.state).unwrap_or(0)).collect();
    let created: Vec<i64> = deliveries.iter().map(|d| signed(d.created_at_ms)).collect();
    let records: Vec<Vec<u8>> = deliveries.iter().map(|d| encode(*d)).collect();
    client
        .execute(
            "INSERT INTO deliveries (id, listener_id, event_seq, state, created_ms, record) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::smallint[], $5::bigint[], $6::bytea[]) \
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, record = excluded.record",
            &[&ids, &listeners, &seqs, &states, &created, &records],
        )
        .await?;
    Ok(())
}

fn borrowed(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs.iter().map(|(listener, delivery)| (listener.as_str(), delivery.as_str())).collect()
}

/// Puts entries in the due queue: (due time, queue key id, listener id).
pub(super) async fn queue_entries(
    client: &impl GenericClient,
    entries: &[(u64, String, &str)],
) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let due: Vec<i64> = entries.iter().map(|(due_ms, _, _)| signed(*due_ms)).collect();
    let key_ids: Vec<&str> = entries.iter().map(|(_, key_id, _)| key_id.as_str()).collect();
    let listeners: Vec<&str> = entries.iter().map(|(_, _, listener)| *listener).collect();
    client
        .execute(
            "INSERT INTO due (due_ms, key_id, listener_id) SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[]) \
             ON CONFLICT (due_ms, key_id) DO UPDATE SET listener_id = excluded.listener_id",
            &[&due, &key_ids, &listeners],
        )
        .await?;
    Ok(())
}

/// Takes entries out of the due queue: (due time, queue key id).
async fn unqueue_entries(client: &impl GenericClient, entries: &[(u64, String)]) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let due: Vec<i64> = entries.iter().map(|(due_ms, _)| signed(*due_ms)).collect();
    let key_ids: Vec<&str> = entries.iter().map(|(_, key_id)| key_id.as_str()).collect();
    client
        .execute(
            "DELETE FROM due WHERE (due_ms, key_id) IN (SELECT * FROM unnest($1::bigint[], $2::text[]))",
            &[&due, &key_ids],
        )
        .await?;
    Ok(())
}

/// Adds (or, with `add` false, removes) (listener id, delivery id) pairs of strictly ordered
/// listeners' unfinished deliveries.
pub(super) async fn ordered_pending(
    client: &impl GenericClient,
    pairs: &[(&str, &str)],
    add: bool,
) -> Result<(), StoreError> {
    if pairs.is_empty() {
        return Ok(());
    }
    let listeners: Vec<&str> = pairs.iter().map(|(listener, _)| *listener).collect();
    let deliveries: Vec<&str> = pairs.iter().map(|(_, delivery)| *delivery).collect();
    let sql = if add {
        "INSERT INTO ordered_pending (listener_id, delivery_id) SELECT * FROM unnest($1::text[], $2::text[]) \
         ON CONFLICT DO NOTHING"
    } else {
        "DELETE FROM ordered_pending WHERE (listener_id, delivery_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
    };
    client.execute(sql, &[&listeners, &deliveries]).await?;
    Ok(())
}

async fn unmark_manual(client: &impl GenericClient, delivery_id: &str, due_ms: u64) -> Result<(), StoreError> {
    client
        .execute("DELETE FROM manual_queued WHERE delivery_id = $1 AND due_ms = $2", &[&delivery_id, &signed(due_ms)])
        .await?;
    Ok(())
}

pub(super) async fn read_delivery(client: &impl GenericClient, id: &str) -> Result<Option<Delivery>, StoreError> {
    match client.query_opt("SELECT record FROM deliveries WHERE id = $1", &[&id]).await? {
        Some(row) => decode(row.get(0)).map(Some).ok_or_else(|| corrupt("deliveries", id)),
        None => Ok(None),
    }
}

pub(super) async fn read_event(client: &impl GenericClient, seq: u64) -> Result<Option<Event>, StoreError> {
    match client.query_opt("SELECT record FROM events WHERE seq = $1", &[&signed(seq)]).await? {
        Some(row) => decode(row.get(0)).map(Some).ok_or(StoreError::DamagedEvent { seq }),
        None => Ok(None),
    }
}

pub(super) async fn fanout_cursor(client: &impl GenericClient) -> Result<FanoutCursor, StoreError> {
    match client.query_opt("SELECT record FROM fanout_cursor WHERE id = 0", &[]).await? {
        Some(row) => decode(row.get(0)).ok_or_else(|| corrupt("fanout_cursor", "0")),
        None => Ok(FanoutCursor::default()),
    }
}

pub(super) async fn detached(client: &impl GenericClient) -> Result<Vec<(String, u64)>, StoreError> {
    let rows = client.query("SELECT listener_id, from_seq FROM detached ORDER BY listener_id", &[]).await?;
    Ok(rows.iter().map(|row| (row.get(0), unsigned(row.get(1)))).collect())
}

pub(super) async fn deleted_owing(client: &impl GenericClient) -> Result<Vec<DeletedListener>, StoreError> {
    let rows = client
        .query("SELECT listener_id, unsure_from_seq, record FROM deleted_owing ORDER BY listener_id", &[])
        .await?;
    rows.iter()
        .map(|row| {
            let id: &str = row.get(0);
            let listener = decode(row.get(2)).ok_or_else(|| corrupt("deleted_owing", id))?;
            Ok(DeletedListener { listener, unsure_from_seq: unsigned(row.get(1)) })
        })
        .collect()
}

/// Whether a manual attempt of the delivery is in the due queue (waiting or under way), as
/// opposed to parked.
async fn manual_attempt_queued(client: &impl GenericClient, delivery_id: &str) -> Result<bool, StoreError> {
    let key_id =
        DueEntry { due_ms: 0, delivery_id: delivery_id.to_owned(), listener_id: String::new(), manual: true }.key_id();
    let row = client
        .query_opt(
            "SELECT 1 FROM manual_queued m JOIN due d ON d.due_ms = m.due_ms AND d.key_id = $2 \
             WHERE m.delivery_id = $1 LIMIT 1",
            &[&delivery_id, &key_id],
        )
        .await?;
    Ok(row.is_some())
}

/// Takes up to `limit` entries out of a listener's parking lot, oldest delivery first: their
/// (due time, queue key id).
async fn take_from_lot(
    client: &impl GenericClient,
    listener_id: &str,
    limit: usize,
) -> Result<Vec<QueuePosition>, StoreError> {
    let rows = client
        .query(
            "DELETE FROM parked WHERE (listener_id, key_id) IN \
             (SELECT listener_id, key_id FROM parked WHERE listener_id = $1 ORDER BY key_id LIMIT $2) \
             RETURNING due_ms, key_id",
            &[&listener_id, &signed(limit as u64)],
        )
        .await?;
    let mut taken: Vec<QueuePosition> = rows.iter().map(|row| (unsigned(row.get(0)), row.get(1))).collect();
    taken.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(taken)
}

fn cancelled(delivery: &Delivery) -> Delivery {
    Delivery { state: DeliveryState::Cancelled as i32, next_attempt_at_ms: 0, ..delivery.clone() }
}

fn position(after: Option<&QueuePosition>) -> (i64, String) {
    match after {
        Some((due_ms, key_id)) => (signed(*due_ms), key_id.clone()),
        None => (-1, String::new()),
    }
}

/// The event log from a position on, read a page at a time as it is consumed.
struct EventsFrom<'a> {
    store: &'a PgStore,
    next: u64,
    buffer: VecDeque<Result<Event, StoreError>>,
    done: bool,
    /// Events the next query reads.
    read: i64,
}

impl Iterator for EventsFrom<'_> {
    type Item = Result<Event, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buffer.is_empty() && !self.done {
            let (from, read) = (signed(self.next), self.read);
            self.read = (self.read * 2).min(EVENTS_PER_READ);
            // After the page, on the same connection (a restore or failover ends it, so both
            // come from one database), the id the log holds at the number of the last event
            // this node knows: the events read must follow that one (see `Rewound`). Sent
            // after the page, so it sees the log at least as late as the page did.
            let known = self.store.memory.rewound.last_known();
            let known_seq = known.as_ref().map(|(seq, _)| signed(*seq));
            let rows = self.store.read(move |client| async move {
                let (page_sql, id_sql) = tokio::try_join!(
                    biased;
                    client.prepare_cached("SELECT seq, record FROM events WHERE seq >= $1 ORDER BY seq LIMIT $2"),
                    client.prepare_cached("SELECT id FROM events WHERE seq = $1"),
                )?;
                let page = async { client.query(&page_sql, &[&from, &read]).await };
                let found = async {
                    let Some(seq) = known_seq else { return Ok(None) };
                    let row = client.query_opt(&id_sql, &[&seq]).await?;
                    Ok::<_, tokio_postgres::Error>(row.map(|row| row.get::<_, String>(0)))
                };
                Ok(tokio::try_join!(biased; page, found)?)
            });
            let rows = rows.and_then(|(rows, found)| match (known, found) {
                (Some((seq, event_id)), Some(found)) if found != event_id => {
                    Err(StoreError::Failed(self.store.memory.rewound.replaced(seq, &found, &event_id)))
                }
                _ => Ok(rows),
            });
            match rows {
                Ok(rows) => {
                    self.done = rows.len() < usize::try_from(read).unwrap_or(0);
                    // For the check that the log did not go back: the last event read below
                    // the head this node had seen.
                    let seen = self.store.publication.committed();
                    let mut last_seen = None;
                    for row in rows {
                        let seq = unsigned(row.get(0));
                        self.next = seq + 1;
                        let event = decode::<Event>(row.get(1)).ok_or(StoreError::DamagedEvent { seq });
                        if event.is_ok() && seq < seen {
                            last_seen = Some(self.buffer.len());
                        }
                        self.buffer.push_back(event);
                    }
                    if let Some(Ok(event)) = last_seen.and_then(|at| self.buffer.get(at)) {
                        self.store.memory.rewound.known(event.seq, &event.id);
                    }
                }
                Err(error) => {
                    self.done = true;
                    return Some(Err(error));
                }
            }
        }
        self.buffer.pop_front()
    }
}

impl PipelineStore for PgStore {
    fn fanout_cursor(&self) -> Result<FanoutCursor, StoreError> {
        self.read(|client| async move { fanout_cursor(&client).await })
    }

    fn set_fanout_cursor(&self, cursor: &FanoutCursor) -> Result<(), StoreError> {
        let record = encode(cursor);
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            tx.execute(
                "INSERT INTO fanout_cursor (id, record) VALUES (0, $1) ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                &[&record],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn events_from(&self, seq: u64) -> Box<dyn Iterator<Item = Result<Event, StoreError>> + '_> {
        Box::new(EventsFrom { store: self, next: seq, buffer: VecDeque::new(), done: false, read: FIRST_READ })
    }

    fn event_at(&self, seq: u64) -> Result<Option<Event>, StoreError> {
        self.read(move |client| async move { read_event(&client, seq).await })
    }

    fn quarantine_event(&self, seq: u64, reason: &str, now_ms: u64) -> Result<(), StoreError> {
        let record = encode(&Quarantined { seq, reason: reason.to_owned(), at_ms: now_ms });
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            tx.execute(
                "INSERT INTO quarantined (seq, record) VALUES ($1, $2) ON CONFLICT (seq) DO UPDATE SET record = excluded.record",
                &[&signed(seq), &record],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn delivery_exists(&self, delivery_id: &str) -> Result<bool, StoreError> {
        let id = delivery_id.to_owned();
        self.read(move |client| async move {
            Ok(client.query_opt("SELECT 1 FROM deliveries WHERE id = $1", &[&id]).await?.is_some())
        })
    }

    fn park_new(&self, deliveries: &[NewDelivery]) -> Result<(), StoreError> {
        let deliveries = deliveries.to_vec();
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            put_deliveries(&tx, &deliveries.iter().map(|new| &new.delivery).collect::<Vec<_>>()).await?;
            let lots: Vec<&str> = deliveries.iter().map(|new| new.delivery.listener_id.as_str()).collect();
            let ids: Vec<&str> = deliveries.iter().map(|new| new.delivery.id.as_str()).collect();
            let due: Vec<i64> = deliveries.iter().map(|new| signed(new.delivery.next_attempt_at_ms)).collect();
            tx.execute(
                "INSERT INTO parked (listener_id, key_id, due_ms) SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) \
                 ON CONFLICT (listener_id, key_id) DO UPDATE SET due_ms = excluded.due_ms",
                &[&lots, &ids, &due],
            )
            .await?;
            let ordered: Vec<(&str, &str)> = deliveries
                .iter()
                .filter(|new| new.ordered)
                .map(|new| (new.delivery.listener_id.as_str(), new.delivery.id.as_str()))
                .collect();
            ordered_pending(&tx, &ordered, true).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn cancel_new(&self, deliveries: &[Delivery]) -> Result<(), StoreError> {
        let cancelled: Vec<Delivery> = deliveries.iter().map(cancelled).collect();
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            put_deliveries(&tx, &cancelled.iter().collect::<Vec<_>>()).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn cancel_unrecorded(&self, deliveries: &[Delivery]) -> Result<(), StoreError> {
        let cancelled: Vec<Delivery> = deliveries.iter().map(cancelled).collect();
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {
            if cancelled.is_empty() {
                return Ok(());
            }
            let ids: Vec<&str> = cancelled.iter().map(|d| d.id.as_str()).collect();
            let listeners: Vec<&str> = cancelled.iter().map(|d| d.listener_id.as_str()).collect();
            let seqs: Vec<i64> = cancelled.iter().map(|d| signed(d.event_seq)).collect();
            let states: Vec<i16> = cancelled.iter().map(|d| i16::try_from(d.state).unwrap_or(0)).collect();
            let created: Vec<i64> = cancelled.iter().map(|d| signed(d.created_at_ms)).collect();
            let records: Vec<Vec<u8>> = cancelled.iter().map(encode).collect();
            // A record written meanwhile (a first attempt that just ended) is kept.
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            tx.execute(
                "INSERT INTO deliveries (id, listener_id, event_seq, state, created_ms, record) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::smallint[], $5::bigint[], $6::bytea[]) \
                 ON CONFLICT (id) DO NOTHING",
                &[&ids, &listeners, &seqs, &states, &created, &records],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn set_detached(&self, listener_id: &str, from_seq: Option<u64>) -> Result<(), StoreError> {
        let id = listener_id.to_owned();
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            match from_seq {
                Some(seq) => {
                    tx.execute(
                        "INSERT INTO detached (listener_id, from_seq) VALUES ($1, $2) \
                         ON CONFLICT (listener_id) DO UPDATE SET from_seq = excluded.from_seq",
                        &[&id, &signed(seq)],
                    )
                    .await?
                }
                None => tx.execute("DELETE FROM detached WHERE listener_id = $1", &[&id]).await?,
            };
            tx.commit().await?;
            Ok(())
        })
    }

    fn detached(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.read(|client| async move { detached(&client).await })
    }

    fn deleted_owing(&self) -> Result<Vec<DeletedListener>, StoreError> {
        self.read(|client| async move { deleted_owing(&client).await })
    }

    fn forget_deleted(&self, listener_id: &str) -> Result<(), StoreError> {
        let id = listener_id.to_owned();
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            tx.execute("DELETE FROM deleted_owing WHERE listener_id = $1", &[&id]).await?;
            tx.commit().await?;
            Ok(())
        })
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
        let (producer_id, event_type) = (producer_id.to_owned(), event_type.to_owned());
        self.read(move |client| async move {
            // The producer's events of every type count against `scan`, as on sled; columns
            // only, and the records of those kept are read after.
            let rows = client
                .query(
                    "SELECT seq, event_type FROM events WHERE producer_id = $1 AND seq >= $2 AND seq < $3 \
                     ORDER BY seq LIMIT $4",
                    &[&producer_id, &signed(from_seq), &signed(until_seq), &signed(scan as u64 + 1)],
                )
                .await?;
            let mut chosen: Vec<i64> = Vec::new();
            let mut reached = until_seq;
            for (looked_at, row) in rows.iter().enumerate() {
                let seq = unsigned(row.get(0));
                if looked_at == scan {
                    reached = seq;
                    break;
                }
                if row.get::<_, &str>(1) == event_type {
                    chosen.push(signed(seq));
                    if chosen.len() >= limit {
                        reached = seq + 1;
                        break;
                    }
                }
            }
            let records =
                client.query("SELECT record FROM events WHERE seq = ANY($1) ORDER BY seq", &[&chosen]).await?;
            // A record that does not decode was put aside by fan-out already.
            let found = records.iter().filter_map(|row| decode::<Event>(row.get(0))).collect();
            Ok((found, reached))
        })
    }

    fn due(&self, after: Option<&QueuePosition>, now_ms: u64, limit: usize) -> Result<Vec<DueEntry>, StoreError> {
        let (from_ms, from_key) = position(after);
        self.read(move |client| async move {
            let rows = client
                .query(
                    "SELECT due_ms, key_id, listener_id FROM due WHERE (due_ms, key_id) > ($1, $2) AND due_ms <= $3 \
                     ORDER BY due_ms, key_id LIMIT $4",
                    &[&from_ms, &from_key, &signed(now_ms), &signed(limit as u64)],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|row| {
                    let (delivery_id, manual) = DueEntry::split_key_id(row.get(1));
                    DueEntry {
                        due_ms: unsigned(row.get(0)),
                        delivery_id: delivery_id.to_owned(),
                        listener_id: row.get(2),
                        manual,
                    }
                })
                .collect())
        })
    }

    fn next_due_ms(&self, after: Option<&QueuePosition>) -> Result<Option<u64>, StoreError> {
        let (from_ms, from_key) = position(after);
        self.read(move |client| async move {
            let row = client
                .query_opt(
                    "SELECT due_ms FROM due WHERE (due_ms, key_id) > ($1, $2) ORDER BY due_ms, key_id LIMIT 1",
                    &[&from_ms, &from_key],
                )
                .await?;
            Ok(row.map(|row| unsigned(row.get(0))))
        })
    }

    fn park(&self, entries: &[DueEntry]) -> Result<(), StoreError> {
        let entries = entries.to_vec();
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            let keys: Vec<(u64, String)> = entries.iter().map(|entry| (entry.due_ms, entry.key_id())).collect();
            unqueue_entries(&tx, &keys).await?;
            let lots: Vec<&str> = entries.iter().map(|entry| entry.listener_id.as_str()).collect();
            let key_ids: Vec<&str> = keys.iter().map(|(_, key_id)| key_id.as_str()).collect();
            let due: Vec<i64> = entries.iter().map(|entry| signed(entry.due_ms)).collect();
            tx.execute(
                "INSERT INTO parked (listener_id, key_id, due_ms) SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) \
                 ON CONFLICT (listener_id, key_id) DO UPDATE SET due_ms = excluded.due_ms",
                &[&lots, &key_ids, &due],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn unpark(&self, listener_id: &str, limit: usize) -> Result<Vec<QueuePosition>, StoreError> {
        let listener_id = listener_id.to_owned();
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            let moved = take_from_lot(&tx, &listener_id, limit).await?;
            let entries: Vec<(u64, String, &str)> =
                moved.iter().map(|(due_ms, key_id)| (*due_ms, key_id.clone(), listener_id.as_str())).collect();
            queue_entries(&tx, &entries).await?;
            tx.commit().await?;
            Ok(moved)
        })
    }

    fn pending_head(&self, listener_id: &str) -> Result<Option<String>, StoreError> {
        let listener_id = listener_id.to_owned();
        self.read(move |client| async move {
            let row = client
                .query_opt(
                    "SELECT delivery_id FROM ordered_pending WHERE listener_id = $1 ORDER BY delivery_id LIMIT 1",
                    &[&listener_id],
                )
                .await?;
            Ok(row.map(|row| row.get(0)))
        })
    }

    fn parked_listeners(&self) -> Result<Vec<String>, StoreError> {
        self.read(|client| async move {
            // One index seek per listener with parked entries, however many it has.
            let mut listeners: Vec<String> = Vec::new();
            loop {
                let after = listeners.last().cloned().unwrap_or_default();
                let row = client
                    .query_opt(
                        "SELECT listener_id FROM parked WHERE listener_id > $1 ORDER BY listener_id LIMIT 1",
                        &[&after],
                    )
                    .await?;
                match row {
                    Some(row) => listeners.push(row.get(0)),
                    None => return Ok(listeners),
                }
            }
        })
    }

    fn delivery(&self, delivery_id: &str) -> Result<Option<Delivery>, StoreError> {
        let id = delivery_id.to_owned();
        self.read(move |client| async move { read_delivery(&client, &id).await })
    }

    fn complete_attempts(&self, completions: Vec<Completion>) -> Result<(), StoreError> {
        self.record_attempts(completions, Vec::new())
    }

    fn complete_attempts_telling(&self, completions: Vec<Completion>, outcomes: String) -> Result<(), StoreError> {
        let notes = self.outcome_notes(&outcomes);
        if notes.is_empty() {
            return self.record_attempts(completions, notes);
        }
        match self.record_attempts(completions.clone(), notes) {
            Ok(()) => Ok(()),
            // Refused whether told or not.
            Err(StoreError::NotDelivering) => Err(StoreError::NotDelivering),
            Err(error) => {
                // The record never depends on the telling (PostgreSQL refuses notifications
                // when its queue is full, say): it is written untold, and the other nodes'
                // watchers of those producers are told they fell behind.
                tracing::warn!(%error, "attempts could not be recorded with their outcomes told; recording them untold");
                self.record_attempts(completions, Vec::new())?;
                let producers: std::collections::BTreeSet<&str> =
                    outcomes.lines().filter_map(|line| line.split('\t').next()).collect();
                for producer_id in producers {
                    self.announce(Note::Behind(producer_id.to_owned()));
                }
                Ok(())
            }
        }
    }

    fn drop_entry(&self, entry: &DueEntry) -> Result<(), StoreError> {
        let entry = entry.clone();
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            unqueue_entries(&tx, &[(entry.due_ms, entry.key_id())]).await?;
            if entry.manual {
                unmark_manual(&tx, &entry.delivery_id, entry.due_ms).await?;
            }
            // A delivery that no longer exists, or has ended, must not hold its listener's
            // order. Locked, so a recovery cannot make it pending in between.
            let state = tx
                .query_opt("SELECT state FROM deliveries WHERE id = $1 FOR UPDATE", &[&entry.delivery_id])
                .await?
                .map(|row| i32::from(row.get::<_, i16>(0)));
            if state != Some(DeliveryState::Pending as i32) {
                ordered_pending(&tx, &[(&entry.listener_id, &entry.delivery_id)], false).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn cancel_delivery(&self, delivery: &Delivery, entry: &DueEntry) -> Result<(), StoreError> {
        let (cancelled, entry) = (cancelled(delivery), entry.clone());
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            put_deliveries(&tx, &[&cancelled]).await?;
            unqueue_entries(&tx, &[(entry.due_ms, entry.key_id())]).await?;
            if entry.manual {
                unmark_manual(&tx, &cancelled.id, entry.due_ms).await?;
            }
            ordered_pending(&tx, &[(&cancelled.listener_id, &cancelled.id)], false).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn cancel_parked(&self, listener_id: &str, limit: usize) -> Result<CancelledLot, StoreError> {
        let listener_id = listener_id.to_owned();
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            let taken = take_from_lot(&tx, &listener_id, limit).await?;
            let mut lot = CancelledLot::default();
            let mut cancelled_ids = std::collections::HashSet::new();
            let mut to_cancel = Vec::new();
            let mut requeued = Vec::new();
            for (due_ms, key_id) in taken {
                let (delivery_id, manual) = DueEntry::split_key_id(&key_id);
                lot.taken += 1;
                // A manual attempt of it may be under way (its entry is in the queue, not in
                // the lot): it writes the delivery back when it ends, so the delivery is left
                // to the queue, where its worker cancels it after that attempt.
                if !manual && manual_attempt_queued(&tx, delivery_id).await? {
                    requeued.push((due_ms, key_id.clone(), listener_id.as_str()));
                    lot.requeued_from_ms = Some(lot.requeued_from_ms.map_or(due_ms, |from: u64| from.min(due_ms)));
                    continue;
                }
                if manual {
                    unmark_manual(&tx, delivery_id, due_ms).await?;
                }
                ordered_pending(&tx, &[(&listener_id, delivery_id)], false).await?;
                if cancelled_ids.insert(delivery_id.to_owned())
                    && let Some(delivery) = read_delivery(&tx, delivery_id).await?
                    && delivery.state == DeliveryState::Pending as i32
                {
                    to_cancel.push(cancelled(&delivery));
                }
            }
            queue_entries(&tx, &requeued).await?;
            put_deliveries(&tx, &to_cancel.iter().collect::<Vec<_>>()).await?;
            tx.commit().await?;
            Ok(lot)
        })
    }

    fn attempts(&self, delivery_id: &str, after: u32, limit: usize) -> Result<Vec<Attempt>, StoreError> {
        let id = delivery_id.to_owned();
        self.read(move |client| async move {
            let first = read_delivery(&client, &id).await?.and_then(|delivery| delivery.first_attempt);
            let first_number = first.as_ref().map(|attempt| attempt.number);
            // One more than a page, should the first be listed again below.
            let fetch = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
            let after = i32::try_from(after).unwrap_or(i32::MAX);
            let rows = client
                .query(
                    "SELECT number, record FROM attempts WHERE delivery_id = $1 AND number > $2 ORDER BY number LIMIT $3",
                    &[&id, &after, &fetch],
                )
                .await?;
            let mut attempts: Vec<Attempt> =
                first.into_iter().filter(|attempt| i64::from(attempt.number) > i64::from(after)).collect();
            for row in rows {
                let attempt: Attempt = decode(row.get(1)).ok_or_else(|| corrupt("attempts", &id))?;
                // Attempt 1 lives in the delivery's record; a record of its own would be the same.
                if Some(attempt.number) != first_number {
                    attempts.push(attempt);
                }
            }
            attempts.truncate(limit);
            Ok(attempts)
        })
    }

    fn listener_health(&self, listener_id: &str) -> Result<ListenerHealth, StoreError> {
        let id = listener_id.to_owned();
        self.read(move |client| async move {
            match client.query_opt("SELECT record FROM listener_health WHERE listener_id = $1", &[&id]).await? {
                Some(row) => decode(row.get(0)).ok_or_else(|| corrupt("listener_health", &id)),
                None => Ok(ListenerHealth::default()),
            }
        })
    }

    fn set_listener_health(&self, listener_id: &str, health: &ListenerHealth) -> Result<(), StoreError> {
        let (id, record) = (listener_id.to_owned(), encode(health));
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            tx.execute(
                "INSERT INTO listener_health (listener_id, record) VALUES ($1, $2) \
                 ON CONFLICT (listener_id) DO UPDATE SET record = excluded.record",
                &[&id, &record],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }
}

impl PgStore {
    /// Records finished attempts in one transaction (see [`PipelineStore::complete_attempts`])
    /// and sends `notes` on the nodes' channel as it commits.
    fn record_attempts(&self, completions: Vec<Completion>, notes: Vec<String>) -> Result<(), StoreError> {
        let channel = self.channel.clone();
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {

            let mut deliveries = Vec::with_capacity(completions.len());
            let mut attempts: Vec<(String, i32, Vec<u8>)> = Vec::new();
            let mut unqueued: Vec<(u64, String)> = Vec::new();
            let mut manual_done: Vec<(String, u64)> = Vec::new();
            let mut queued: Vec<(u64, String, String)> = Vec::new();
            let mut now_ordered: Vec<(String, String)> = Vec::new();
            let mut no_longer_ordered: Vec<(String, String)> = Vec::new();
            for Completion { mut delivery, attempt, entry, next, ordered } in completions {
                if attempt.number == 1 {
                    delivery.first_attempt = Some(attempt);
                } else {
                    attempts.push((delivery.id.clone(), i32::try_from(attempt.number).unwrap_or(i32::MAX), encode(&attempt)));
                }
                if let Some(entry) = &entry {
                    unqueued.push((entry.due_ms, entry.key_id()));
                    if entry.manual {
                        manual_done.push((delivery.id.clone(), entry.due_ms));
                    }
                }
                match next {
                    NextStep::RetryAt(due_ms) => {
                        queued.push((due_ms, delivery.id.clone(), delivery.listener_id.clone()));
                        if entry.is_none() && ordered {
                            now_ordered.push((delivery.listener_id.clone(), delivery.id.clone()));
                        }
                    }
                    NextStep::Done if entry.is_some() => {
                        no_longer_ordered.push((delivery.listener_id.clone(), delivery.id.clone()));
                    }
                    NextStep::Done | NextStep::Keep => {}
                }
                deliveries.push(delivery);
            }
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            put_deliveries(&tx, &deliveries.iter().collect::<Vec<_>>()).await?;
            if !attempts.is_empty() {
                let ids: Vec<&str> = attempts.iter().map(|(id, _, _)| id.as_str()).collect();
                let numbers: Vec<i32> = attempts.iter().map(|(_, number, _)| *number).collect();
                let records: Vec<&[u8]> = attempts.iter().map(|(_, _, record)| record.as_slice()).collect();
                tx.execute(
                    "INSERT INTO attempts (delivery_id, number, record) SELECT * FROM unnest($1::text[], $2::int[], $3::bytea[]) \
                     ON CONFLICT (delivery_id, number) DO UPDATE SET record = excluded.record",
                    &[&ids, &numbers, &records],
                )
                .await?;
            }
            unqueue_entries(&tx, &unqueued).await?;
            for (delivery_id, due_ms) in &manual_done {
                unmark_manual(&tx, delivery_id, *due_ms).await?;
            }
            let queued: Vec<(u64, String, &str)> =
                queued.iter().map(|(due_ms, id, listener)| (*due_ms, id.clone(), listener.as_str())).collect();
            queue_entries(&tx, &queued).await?;
            ordered_pending(&tx, &borrowed(&now_ordered), true).await?;
            ordered_pending(&tx, &borrowed(&no_longer_ordered), false).await?;
            // Sent as the transaction commits, and only then.
            for note in &notes {
                tx.execute("SELECT pg_notify($1, $2)", &[&&*channel, note]).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }
}
