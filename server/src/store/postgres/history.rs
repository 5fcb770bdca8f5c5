//! [`HistoryStore`] on PostgreSQL: listings of events and deliveries, manual attempts,
//! replays, recovery of failed deliveries, and retention.
//!
//! Listings read an ordered index from a position (the page token) and stop at the page size
//! or at a scan budget, as on sled, so a filter that matches rarely never turns one call into
//! a full scan. Changes are transactions that lock the rows they read before they write.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use deadpool_postgres::GenericClient;

use super::directory::Directory;
use super::pipeline::{
    deleted_owing, detached, fanout_cursor, ordered_pending, put_deliveries, queue_entries, read_delivery, read_event,
};
use super::{PgStore, corrupt, one_snapshot, signed, term, unsigned};
use crate::store::listing::{implicit, merge_pages, scan_budget};
use crate::store::model::{Delivery, DeliveryState, DueEntry, Event, Listener, decode};
use crate::store::{COUNT_LIMIT, Counts, EventFilter, HistoryStore, LIST_PAGE_BYTES, Owed, Page, StoreError, Trimmed};

type Shared = Arc<RwLock<Directory>>;

/// Before this event every (event, listener) pair has a record; from it on, a pair may still
/// be waiting in the event log: fan-out's cursor, a listener fanned out apart that stands
/// further back, or a deleted listener whose owed pairs are being cancelled.
async fn unrecorded_from(client: &impl GenericClient) -> Result<u64, StoreError> {
    let cursor = fanout_cursor(client).await?.next_seq;
    let detached = detached(client).await?.into_iter().map(|(_, seq)| seq);
    let deleted = deleted_owing(client).await?.into_iter().map(|deleted| deleted.unsure_from_seq);
    Ok(detached.chain(deleted).fold(cursor, u64::min))
}

/// What retention must keep (see [`Owed`]). Fan-out's cursor is read before the detached
/// listeners: a listener detached in between stands at or past it.
async fn owed(client: &impl GenericClient) -> Result<Owed, StoreError> {
    let mut stop = fanout_cursor(client).await?.next_seq;
    let standing = detached(client).await?;
    let ids: Vec<&str> = standing.iter().map(|(listener_id, _)| listener_id.as_str()).collect();
    let rows = client.query("SELECT id, producer_id, event_type FROM listeners WHERE id = ANY($1)", &[&ids]).await?;
    let kinds: HashMap<&str, (String, String)> =
        rows.iter().map(|row| (row.get::<_, &str>(0), (row.get(1), row.get(2)))).collect();
    let mut detached_kinds = Vec::new();
    for (listener_id, from) in &standing {
        match kinds.get(listener_id.as_str()) {
            Some((producer_id, event_type)) => detached_kinds.push((*from, producer_id.clone(), event_type.clone())),
            // Gone, its owed pairs being cancelled: everything from there stays.
            None => stop = stop.min(*from),
        }
    }
    for deleted in deleted_owing(client).await? {
        stop = stop.min(deleted.unsure_from_seq);
    }
    Ok(Owed { stop, detached: detached_kinds })
}

/// Which of `ids` have a record.
async fn recorded(client: &impl GenericClient, ids: &[&str]) -> Result<HashSet<String>, StoreError> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = client.query("SELECT id FROM deliveries WHERE id = ANY($1)", &[&ids]).await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

fn listeners_of_type(directory: &Shared, producer_id: &str, event_type: &str) -> Vec<Listener> {
    directory.read().expect("the directory lock is never poisoned").list_listeners(
        producer_id,
        Some(event_type),
        None,
        usize::MAX,
    )
}

/// The deliveries `event` would have, one per listener that wants it, where that listener's
/// pairs may still lack a record; in id order. Whether each has one is not looked at.
async fn unsure_of_event(
    client: &impl GenericClient,
    directory: &Shared,
    event: &Event,
) -> Result<Vec<Delivery>, StoreError> {
    // Where each listener's pairs may lack a record: the cursor, or where it stands if it is
    // fanned out apart and further back (read once, whatever the number of listeners).
    let cursor = fanout_cursor(client).await?.next_seq;
    let apart: std::collections::HashMap<String, u64> = detached(client).await?.into_iter().collect();
    let mut candidates = Vec::new();
    for listener in listeners_of_type(directory, &event.producer_id, &event.event_type) {
        let unsure_from = apart.get(&listener.id).map_or(cursor, |&from| cursor.min(from));
        if listener.wants(event.seq) && event.seq >= unsure_from {
            candidates.push(implicit(event, &listener.id));
        }
    }
    candidates.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(candidates)
}

/// The deliveries of `event` still waiting in the log (one per listener that wants it and has
/// no record of it) after `after`, in id order: at most `limit`, and where the page stopped
/// when more may follow. Records are looked up a page's worth at a time.
async fn implicit_of_event(
    client: &impl GenericClient,
    directory: &Shared,
    event: &Event,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<Delivery>, Option<String>), StoreError> {
    let mut candidates = unsure_of_event(client, directory, event).await?;
    candidates.retain(|delivery| after.is_none_or(|after| delivery.id.as_str() > after));
    let mut found = Vec::new();
    for chunk in candidates.chunks(scan_budget(limit)) {
        let ids: Vec<&str> = chunk.iter().map(|delivery| delivery.id.as_str()).collect();
        let recorded = recorded(client, &ids).await?;
        for delivery in chunk.iter().filter(|delivery| !recorded.contains(&delivery.id)) {
            found.push(delivery.clone());
            if found.len() == limit {
                // More may follow: the page ends here.
                let last = found.last().map(|delivery| delivery.id.clone());
                return Ok((found, last));
            }
        }
    }
    Ok((found, None))
}

async fn delivery_view(
    client: &impl GenericClient,
    directory: &Shared,
    delivery_id: &str,
) -> Result<Option<(Delivery, bool)>, StoreError> {
    if let Some(delivery) = read_delivery(client, delivery_id).await? {
        return Ok(Some((delivery, true)));
    }
    let Some(seq) = crate::ids::delivery_event_seq(delivery_id) else { return Ok(None) };
    if seq < unrecorded_from(client).await? {
        return Ok(None);
    }
    let Some(event) = read_event(client, seq).await? else { return Ok(None) };
    // No record of it in this snapshot (read above): waiting, if a listener would have it.
    let found = unsure_of_event(client, directory, &event).await?.into_iter().find(|d| d.id == delivery_id);
    Ok(found.map(|delivery| (delivery, false)))
}

/// A listener's deliveries still waiting in the log, after `after` (a delivery id), in id
/// order: at most `limit`, looking at no more than `budget` of its producer's events. Also
/// returns where it stopped, when more may follow.
async fn implicit_of_listener(
    client: &impl GenericClient,
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
    let start = PgStore::unsure_from(client, &listener.id).await?.max(after_seq.unwrap_or(0));
    // Columns only: a delivery still waiting shows no payload.
    let rows = client
        .query(
            "SELECT seq, event_type, id, created_ms FROM events WHERE producer_id = $1 AND seq >= $2 \
             ORDER BY seq LIMIT $3",
            &[&listener.producer_id, &signed(start), &signed(budget as u64 + 1)],
        )
        .await?;
    // Everything before this event is looked at; more may follow from it.
    let stop = rows.get(budget).map(|row| format!("dlv_{}", crate::crypto::hex(&unsigned(row.get(0)).to_be_bytes())));
    let mut candidates = Vec::new();
    for row in rows.iter().take(budget) {
        let seq = unsigned(row.get(0));
        if !listener.wants(seq) || row.get::<_, &str>(1) != listener.event_type {
            continue;
        }
        let event = Event {
            id: row.get(2),
            seq,
            producer_id: listener.producer_id.clone(),
            event_type: listener.event_type.clone(),
            created_at_ms: unsigned(row.get(3)),
            ..Event::default()
        };
        let delivery = implicit(&event, &listener.id);
        if after.is_none_or(|after| delivery.id.as_str() > after) {
            candidates.push(delivery);
        }
    }
    let ids: Vec<&str> = candidates.iter().map(|delivery| delivery.id.as_str()).collect();
    let recorded = recorded(client, &ids).await?;
    let mut found = Vec::new();
    for delivery in candidates.into_iter().filter(|delivery| !recorded.contains(&delivery.id)) {
        found.push(delivery);
        if found.len() == limit {
            // More may follow: the page ends here.
            let last = found.last().map(|delivery| delivery.id.clone());
            return Ok((found, last));
        }
    }
    Ok((found, stop))
}

/// Recorded deliveries of one listener or one event, in id order after `after`.
async fn recorded_page(
    client: &impl GenericClient,
    of: Of<'_>,
    state: Option<DeliveryState>,
    after: Option<&str>,
    limit: usize,
) -> Result<Page<Delivery>, StoreError> {
    let budget = scan_budget(limit);
    let after = after.unwrap_or("");
    let fetch = signed(budget as u64 + 1);
    // Ids and states only; the records of the page's deliveries are read after.
    let rows = match of {
        Of::Listener(listener_id) => {
            client
                .query(
                    "SELECT id, state FROM deliveries WHERE listener_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                    &[&listener_id, &after, &fetch],
                )
                .await?
        }
        Of::Event(seq) => {
            client
                .query(
                    "SELECT id, state FROM deliveries WHERE event_seq = $1 AND id > $2 ORDER BY id LIMIT $3",
                    &[&signed(seq), &after, &fetch],
                )
                .await?
        }
    };
    let mut chosen: Vec<&str> = Vec::new();
    let mut last = None;
    for (index, row) in rows.iter().take(budget).enumerate() {
        last = Some(index);
        if state.is_none_or(|state| i32::from(row.get::<_, i16>(1)) == state as i32) {
            chosen.push(row.get(0));
            if chosen.len() == limit {
                break;
            }
        }
    }
    let mut items = Vec::with_capacity(chosen.len());
    let records = client.query("SELECT id, record FROM deliveries WHERE id = ANY($1) ORDER BY id", &[&chosen]).await?;
    for row in &records {
        let id: &str = row.get(0);
        let mut delivery: Delivery = decode(row.get(1)).ok_or_else(|| corrupt("deliveries", id))?;
        // A listing shows no attempts: a page does not hold a response per delivery.
        delivery.first_attempt = None;
        items.push(delivery);
    }
    let resume_after = last.filter(|&index| rows.len() > index + 1).map(|index| rows[index].get::<_, String>(0));
    Ok(Page { items, resume_after })
}

#[derive(Clone, Copy)]
enum Of<'a> {
    Listener(&'a str),
    Event(u64),
}

/// The first position of the log whose event was created at or after `since_ms` (creation
/// times never decrease along the log).
async fn first_seq_since(client: &impl GenericClient, since_ms: u64) -> Result<u64, StoreError> {
    let row = client
        .query_one(
            "SELECT coalesce((SELECT seq FROM events WHERE created_ms >= $1 ORDER BY created_ms, seq LIMIT 1), \
             (SELECT next_seq FROM log_head WHERE id = 0))",
            &[&signed(since_ms)],
        )
        .await?;
    Ok(unsigned(row.get(0)))
}

/// Whether one of an event's deliveries (rows of id, state) is unfinished: pending, or with a
/// manual attempt asked for and not yet made.
async fn unfinished(client: &impl GenericClient, deliveries: &[tokio_postgres::Row]) -> Result<bool, StoreError> {
    if deliveries.iter().any(|row| i32::from(row.get::<_, i16>(1)) == DeliveryState::Pending as i32) {
        return Ok(true);
    }
    let ids: Vec<&str> = deliveries.iter().map(|row| row.get(0)).collect();
    any_manual(client, &ids).await
}

/// Whether a manual attempt of one of `ids` is queued or under way.
async fn any_manual(client: &impl GenericClient, ids: &[&str]) -> Result<bool, StoreError> {
    if ids.is_empty() {
        return Ok(false);
    }
    Ok(client.query_opt("SELECT 1 FROM manual_queued WHERE delivery_id = ANY($1) LIMIT 1", &[&ids]).await?.is_some())
}

impl HistoryStore for PgStore {
    fn list_events(
        &self,
        filter: &EventFilter,
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Page<Event>, StoreError> {
        let filter = filter.clone();
        self.read(move |client| async move {
            let start_seq = match after_seq {
                Some(seq) => seq.saturating_add(1),
                None if filter.since_ms > 0 => first_seq_since(&client, filter.since_ms).await?,
                None => 0,
            };
            let budget = scan_budget(limit);
            let fetch = signed(budget as u64 + 1);
            // Columns only: the payloads of the page's events are read after.
            let rows = match &filter.producer_id {
                Some(producer_id) => {
                    client
                        .query(
                            "SELECT seq, event_type, created_ms, octet_length(record) FROM events \
                             WHERE producer_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
                            &[producer_id, &signed(start_seq), &fetch],
                        )
                        .await?
                }
                None => {
                    client
                        .query(
                            "SELECT seq, event_type, created_ms, octet_length(record) FROM events WHERE seq >= $1 \
                             ORDER BY seq LIMIT $2",
                            &[&signed(start_seq), &fetch],
                        )
                        .await?
                }
            };
            let mut chosen: Vec<i64> = Vec::new();
            let mut last = None;
            let mut reached_until = false;
            let (mut bytes, mut full) = (0, false);
            for (index, row) in rows.iter().take(budget).enumerate() {
                let (seq, event_type, created_ms) = (row.get::<_, i64>(0), row.get::<_, &str>(1), unsigned(row.get(2)));
                if filter.until_ms.is_some_and(|until| created_ms >= until) {
                    // Nothing later in the log is older.
                    reached_until = true;
                    break;
                }
                let wanted =
                    created_ms >= filter.since_ms && filter.event_type.as_deref().is_none_or(|t| t == event_type);
                let size = usize::try_from(row.get::<_, i32>(3)).unwrap_or(0);
                if wanted && !chosen.is_empty() && bytes + size > LIST_PAGE_BYTES {
                    // The page is full: this event starts the next one.
                    full = true;
                    break;
                }
                last = Some((index, seq));
                if wanted {
                    bytes += size;
                    chosen.push(seq);
                    if chosen.len() == limit {
                        break;
                    }
                }
            }
            let mut items = Vec::with_capacity(chosen.len());
            let records =
                client.query("SELECT seq, record FROM events WHERE seq = ANY($1) ORDER BY seq", &[&chosen]).await?;
            for row in &records {
                let seq = unsigned(row.get(0));
                match decode::<Event>(row.get(1)) {
                    Some(event) => items.push(event),
                    // Put aside by fan-out; it must not break the listing of the others.
                    None => tracing::error!(seq, "listing skips an event whose record does not decode"),
                }
            }
            let resume_after = match last {
                Some((_, seq)) if full => Some(seq.to_string()),
                Some((index, seq)) if !reached_until && rows.len() > index + 1 => Some(seq.to_string()),
                _ => None,
            };
            Ok(Page { items, resume_after })
        })
    }

    fn deliveries_of_event(
        &self,
        event_seq: u64,
        state: Option<DeliveryState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<Delivery>, StoreError> {
        let (after, directory) = (after.map(str::to_owned), self.directory.clone());
        self.read(move |mut client| async move {
            let tx = one_snapshot(&mut client).await?;
            let waiting = state.is_none_or(|state| state == DeliveryState::Pending);
            let event = if waiting && event_seq >= unrecorded_from(&tx).await? {
                read_event(&tx, event_seq).await?
            } else {
                None
            };
            let stored = recorded_page(&tx, Of::Event(event_seq), state, after.as_deref(), limit).await?;
            let Some(event) = event else {
                return Ok(stored);
            };
            // A recent event: its deliveries are those recorded and those still waiting in the
            // log, one per listener at most (as many as it has listeners, plus replays).
            let (implicit, stopped) = implicit_of_event(&tx, &directory, &event, after.as_deref(), limit).await?;
            Ok(merge_pages(stored.items, implicit, [stored.resume_after, stopped], limit))
        })
    }

    fn deliveries_of_listener(
        &self,
        listener_id: &str,
        state: Option<DeliveryState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<Delivery>, StoreError> {
        let waiting = state.is_none_or(|state| state == DeliveryState::Pending);
        let listener = if waiting { crate::store::Store::listener(self, listener_id)? } else { None };
        let (listener_id, after) = (listener_id.to_owned(), after.map(str::to_owned));
        self.read(move |mut client| async move {
            let tx = one_snapshot(&mut client).await?;
            let stored = recorded_page(&tx, Of::Listener(&listener_id), state, after.as_deref(), limit).await?;
            let Some(listener) = listener else {
                return Ok(stored);
            };
            let (implicit, stopped) =
                implicit_of_listener(&tx, &listener, after.as_deref(), limit, scan_budget(limit)).await?;
            Ok(merge_pages(stored.items, implicit, [stored.resume_after, stopped], limit))
        })
    }

    fn delivery_view(&self, delivery_id: &str) -> Result<Option<(Delivery, bool)>, StoreError> {
        let (id, directory) = (delivery_id.to_owned(), self.directory.clone());
        self.read(
            move |mut client| async move { delivery_view(&one_snapshot(&mut client).await?, &directory, &id).await },
        )
    }

    fn queue_manual_attempt(&self, delivery_id: &str, now_ms: u64) -> Result<Option<(Delivery, u64)>, StoreError> {
        let id = delivery_id.to_owned();
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::limit_idle(&tx).await?;
            // Locked, so retention cannot take the delivery, nor a recovery requeue it,
            // before the manual attempt is on record; and so two asking at once queue one.
            let row = tx.query_opt("SELECT record FROM deliveries WHERE id = $1 FOR UPDATE", &[&id]).await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let delivery: Delivery = decode(row.get(0)).ok_or_else(|| corrupt("deliveries", &id))?;
            let entry = DueEntry {
                due_ms: now_ms,
                delivery_id: id.clone(),
                listener_id: delivery.listener_id.clone(),
                manual: true,
            };
            // One asked for earlier is still queued (or under way), or parked with its
            // listener. A mark without its entry (two manual attempts parked at once before,
            // whose lot entry was one) is stale: it goes.
            let earlier = tx
                .query_opt(
                    "SELECT m.due_ms FROM manual_queued m WHERE m.delivery_id = $1 \
                     AND (EXISTS (SELECT 1 FROM due d WHERE d.due_ms = m.due_ms AND d.key_id = $2) \
                     OR EXISTS (SELECT 1 FROM parked p WHERE p.listener_id = $3 AND p.key_id = $2)) LIMIT 1",
                    &[&id, &entry.key_id(), &entry.listener_id],
                )
                .await?;
            if let Some(earlier) = earlier {
                return Ok(Some((delivery, unsigned(earlier.get(0)))));
            }
            tx.execute("DELETE FROM manual_queued WHERE delivery_id = $1", &[&id]).await?;
            queue_entries(&tx, &[(now_ms, entry.key_id(), &entry.listener_id)]).await?;
            tx.execute(
                "INSERT INTO manual_queued (delivery_id, due_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&id, &signed(now_ms)],
            )
            .await?;
            tx.commit().await?;
            Ok(Some((delivery, now_ms)))
        })
    }

    fn create_deliveries(&self, deliveries: &[Delivery]) -> Result<bool, StoreError> {
        let deliveries = deliveries.to_vec();
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::limit_idle(&tx).await?;
            let mut seqs: Vec<i64> = deliveries.iter().map(|delivery| signed(delivery.event_seq)).collect();
            seqs.sort_unstable();
            seqs.dedup();
            // Retention may have removed the event since the caller read it; locked, so it
            // cannot go before this commits.
            let found = tx.query("SELECT seq FROM events WHERE seq = ANY($1) FOR SHARE", &[&seqs]).await?;
            if found.len() != seqs.len() {
                return Ok(false);
            }
            put_deliveries(&tx, &deliveries.iter().collect::<Vec<_>>()).await?;
            let entries: Vec<(u64, String, &str)> = deliveries
                .iter()
                .map(|delivery| (delivery.next_attempt_at_ms, delivery.id.clone(), delivery.listener_id.as_str()))
                .collect();
            queue_entries(&tx, &entries).await?;
            let pairs: Vec<(&str, &str)> =
                deliveries.iter().map(|delivery| (delivery.listener_id.as_str(), delivery.id.as_str())).collect();
            ordered_pending(&tx, &pairs, true).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn failed_deliveries(
        &self,
        listener_id: &str,
        since_ms: u64,
        until_ms: Option<u64>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<String>, StoreError> {
        let (listener_id, after) = (listener_id.to_owned(), after.map(str::to_owned));
        self.read(move |client| async move {
            let budget = scan_budget(limit);
            // Delivery ids start with their event's position, and positions follow creation
            // time: a first page starts at the first event of the window.
            let (from, inclusive) = match after {
                Some(after) => (after, false),
                None => {
                    let first = first_seq_since(&client, since_ms).await?;
                    (format!("dlv_{}", crate::crypto::hex(&first.to_be_bytes())), true)
                }
            };
            let sql = if inclusive {
                "SELECT id, state, created_ms FROM deliveries WHERE listener_id = $1 AND id >= $2 ORDER BY id LIMIT $3"
            } else {
                "SELECT id, state, created_ms FROM deliveries WHERE listener_id = $1 AND id > $2 ORDER BY id LIMIT $3"
            };
            let rows = client.query(sql, &[&listener_id, &from, &signed(budget as u64 + 1)]).await?;
            let mut items = Vec::new();
            let mut last = None;
            for (index, row) in rows.iter().take(budget).enumerate() {
                let created_ms = unsigned(row.get(2));
                if until_ms.is_some_and(|until| created_ms >= until) {
                    // Later deliveries of this listener were created later still.
                    return Ok(Page { items, resume_after: None });
                }
                if created_ms >= since_ms && i32::from(row.get::<_, i16>(1)) == DeliveryState::Failed as i32 {
                    items.push(row.get(0));
                }
                last = Some(index);
                if items.len() == limit {
                    break;
                }
            }
            let resume_after = last.filter(|&index| rows.len() > index + 1).map(|index| rows[index].get(0));
            Ok(Page { items, resume_after })
        })
    }

    fn requeue_failed(&self, delivery_ids: &[String], now_ms: u64) -> Result<usize, StoreError> {
        let ids = delivery_ids.to_vec();
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::limit_idle(&tx).await?;
            let rows = tx.query("SELECT id, record FROM deliveries WHERE id = ANY($1) FOR UPDATE", &[&ids]).await?;
            let mut requeued = Vec::new();
            for row in &rows {
                let id: &str = row.get(0);
                let mut delivery: Delivery = decode(row.get(1)).ok_or_else(|| corrupt("deliveries", id))?;
                // A manual attempt queued or under way writes the delivery back as it read it
                // when it ends, which would undo this: such a delivery is left to that attempt.
                if delivery.state != DeliveryState::Failed as i32 || any_manual(&tx, &[id]).await? {
                    continue;
                }
                delivery.state = DeliveryState::Pending as i32;
                delivery.next_attempt_at_ms = now_ms;
                requeued.push(delivery);
            }
            put_deliveries(&tx, &requeued.iter().collect::<Vec<_>>()).await?;
            let entries: Vec<(u64, String, &str)> =
                requeued.iter().map(|delivery| (now_ms, delivery.id.clone(), delivery.listener_id.as_str())).collect();
            queue_entries(&tx, &entries).await?;
            let pairs: Vec<(&str, &str)> =
                requeued.iter().map(|delivery| (delivery.listener_id.as_str(), delivery.id.as_str())).collect();
            ordered_pending(&tx, &pairs, true).await?;
            tx.commit().await?;
            Ok(requeued.len())
        })
    }

    fn trim(
        &self,
        before_ms: u64,
        keys_before_ms: u64,
        start_seq: u64,
        max_events: usize,
    ) -> Result<Trimmed, StoreError> {
        let term = self.term.for_write()?;
        self.read(move |mut client| async move {
            let tx = client.transaction().await?;
            term::check(&tx, term).await?;
            // Events with deliveries still waiting in the log stay.
            let owed = owed(&tx).await?;
            // Their columns only: payloads are never read to be deleted.
            let rows = tx
                .query(
                    "SELECT seq, id, created_ms, producer_id, event_type FROM events WHERE seq >= $1 ORDER BY seq LIMIT $2",
                    &[&signed(start_seq), &signed(max_events as u64 + 1)],
                )
                .await?;
            let mut trimmed = Trimmed::default();
            for (looked_at, row) in rows.iter().enumerate() {
                let (seq, event_id, created_ms) = (unsigned(row.get(0)), row.get::<_, &str>(1), unsigned(row.get(2)));
                if created_ms >= before_ms || seq >= owed.stop {
                    trimmed.next_seq = None;
                    break;
                }
                if looked_at == max_events {
                    trimmed.next_seq = Some(seq);
                    break;
                }
                if owed.keeps(seq, row.get(3), row.get(4)) {
                    trimmed.kept += 1;
                    continue;
                }
                // Looked at without locks first, so a pending delivery (which the recorder may
                // be writing) is not locked here (but for one a replay commits while this waits
                // for the event, below); those to delete are locked and checked again.
                let unlocked =
                    tx.query("SELECT id, state FROM deliveries WHERE event_seq = $1", &[&signed(seq)]).await?;
                if unfinished(&tx, &unlocked).await? {
                    trimmed.kept += 1;
                    continue;
                }
                // The event before its deliveries: a replay holds it `FOR SHARE` while it adds
                // deliveries, so they are committed (and read below) before this goes on, or
                // the replay waits and then finds the event gone.
                tx.execute("SELECT seq FROM events WHERE seq = $1 FOR UPDATE", &[&signed(seq)]).await?;
                let deliveries = tx
                    .query("SELECT id, state FROM deliveries WHERE event_seq = $1 FOR UPDATE", &[&signed(seq)])
                    .await?;
                if unfinished(&tx, &deliveries).await? {
                    trimmed.kept += 1;
                    continue;
                }
                let ids: Vec<&str> = deliveries.iter().map(|row| row.get(0)).collect();
                tx.execute("DELETE FROM attempts WHERE delivery_id = ANY($1)", &[&ids]).await?;
                tx.execute("DELETE FROM deliveries WHERE event_seq = $1", &[&signed(seq)]).await?;
                tx.execute("DELETE FROM events WHERE seq = $1", &[&signed(seq)]).await?;
                trimmed.events += 1;
                trimmed.deliveries += ids.len();
                // Its idempotency record goes once its 24 hours are up; until then it stays,
                // for `trim_keys`. A newer event may have taken the key since: not this one's.
                if created_ms < keys_before_ms {
                    tx.execute("DELETE FROM idempotency WHERE event_id = $1", &[&event_id]).await?;
                }
            }
            tx.commit().await?;
            Ok(trimmed)
        })
    }

    /// Any idempotency record older than the window is gone here, its event trimmed or not: it
    /// can no longer match a trigger.
    fn trim_keys(&self, keys_before_ms: u64, max: usize) -> Result<usize, StoreError> {
        self.read(move |client| async move {
            let removed = client
                .execute(
                    "DELETE FROM idempotency WHERE created_ms < $1 AND (producer_id, key) IN \
                     (SELECT producer_id, key FROM idempotency WHERE created_ms < $1 ORDER BY created_ms LIMIT $2)",
                    &[&signed(keys_before_ms), &signed(max as u64)],
                )
                .await?;
            Ok(usize::try_from(removed).unwrap_or(usize::MAX))
        })
    }

    fn counts(&self) -> Result<Counts, StoreError> {
        let (listeners, disabled_listeners) = {
            let directory = self.directory.read().expect("the directory lock is never poisoned");
            directory.listener_counts()
        };
        self.read(move |client| async move {
            let limit = signed(COUNT_LIMIT as u64);
            let count = |sql: &'static str| {
                let client = &client;
                async move { Ok::<u64, StoreError>(unsigned(client.query_one(sql, &[&limit]).await?.get(0))) }
            };
            let due = count("SELECT count(*) FROM (SELECT 1 FROM due LIMIT $1) AS counted").await?;
            let parked = count("SELECT count(*) FROM (SELECT 1 FROM parked LIMIT $1) AS counted").await?;
            let quarantined = count("SELECT count(*) FROM (SELECT 1 FROM quarantined LIMIT $1) AS counted").await?;
            Ok(Counts { listeners, disabled_listeners, queued: due + parked, quarantined })
        })
    }
}
