//! The intake's write path on PostgreSQL: one task per node that commits triggers in groups.
//!
//! The task takes whatever appends are waiting (up to [`MAX_GROUP`]), checks each caller
//! against the control plane in memory, and writes the group in one transaction: it locks
//! the log's head row (`log_head`, `FOR UPDATE`), checks the callers again as the database
//! has them (any node may have changed them), reads the group's idempotency records,
//! numbers the new events from the head, inserts them and their idempotency records, moves
//! the head and commits. Only then are the group's callers answered: an acknowledged trigger
//! is committed. Triggers arriving during a commit make the next group (group commit).
//! Holding the head row's lock from numbering to commit makes every node's groups commit in
//! number order, so the log has no hole that a later commit could fill: fan-out may follow
//! the committed head. A failed group is answered with the error and leaves nothing behind
//! (the transaction rolls back, numbers included).
//!
//! What keeps admin writes in step (see `PgStore::admin`): [`Publication`] holds fan-out back
//! from a listener write's point until the listener is in memory, and [`Groups`] lets an
//! admin write wait for the group under way, so a producer disabled (or a key revoked) is
//! refused from the next trigger on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};

use super::directory::Directory;
use super::{signed, unsigned};
use crate::ids;
use crate::store::model::{ApiKeyEntry, Appended, Event, NewEvent, Producer, decode, encode};
use crate::store::{IDEMPOTENCY_WINDOW_MS, Refusal, StoreError};

/// Most appends committed in one transaction.
const MAX_GROUP: usize = 1024;

pub(super) struct Job {
    pub event: NewEvent,
    /// Room in the store's bound on appends in flight, held until answered.
    pub _permit: OwnedSemaphorePermit,
    pub reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// How far fan-out may go: the committed head, held back by listener writes in progress and
/// by control-plane changes this node has not read yet.
///
/// Every head offered comes with the control plane's version as of that head ([`Head`]):
/// a listener registered, disabled or deleted on any node takes its point in the log under
/// the head's lock and moves the version in the same transaction, so once this node's memory
/// reflects that version, it knows every listener change that applies to the events below
/// the head. A head whose version this node has not read yet waits (the caller asks for a
/// reload) and is published once memory catches up. While memory is suspect (this node lost
/// the database for a while: a restore or a failover may have given the same versions other
/// contents) every head waits, until memory has been read whole.
pub(super) struct Publication {
    state: Mutex<PublicationState>,
    watch: watch::Sender<u64>,
    /// The control plane's version this node's memory reflects.
    known: Arc<AtomicU64>,
}

#[derive(Default)]
struct PublicationState {
    committed: u64,
    /// The furthest head offered that memory was not current enough for yet.
    waiting: Option<Head>,
    /// Points of the fences up, by token.
    fences: HashMap<u64, u64>,
    next_token: u64,
    /// Memory's version may not mean what the database's does (see [`Publication::suspect`]).
    suspect: bool,
}

/// The log's head as the database had it, with the control plane's version then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    pub next_seq: u64,
    pub version: u64,
}

impl Head {
    /// Both, read in one statement (one snapshot).
    pub const SQL: &str = "SELECT h.next_seq, c.version FROM log_head h, control_version c WHERE h.id = 0 AND c.id = 0";

    pub fn from_row(row: &tokio_postgres::Row) -> Self {
        Self { next_seq: unsigned(row.get(0)), version: unsigned(row.get(1)) }
    }

    /// The text other nodes are told (`NOTIFY`), and back.
    pub fn to_text(self) -> String {
        format!("{} {}", self.next_seq, self.version)
    }

    pub fn parse(text: &str) -> Option<Self> {
        let (next_seq, version) = text.split_once(' ')?;
        Some(Self { next_seq: next_seq.parse().ok()?, version: version.parse().ok()? })
    }
}

/// Holds fan-out back from `next_seq` on while it lives.
pub(super) struct Fence {
    publication: Arc<Publication>,
    token: u64,
}

impl Drop for Fence {
    fn drop(&mut self) {
        let mut state = self.publication.lock();
        state.fences.remove(&self.token);
        self.publication.publish(&state);
    }
}

impl Publication {
    pub fn new(head: Head, known: Arc<AtomicU64>) -> Arc<Self> {
        let (watch, _) = watch::channel(0);
        let publication = Arc::new(Self { state: Mutex::default(), watch, known });
        publication.offer(head);
        publication
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PublicationState> {
        self.state.lock().expect("the publication lock is never poisoned")
    }

    fn publish(&self, state: &PublicationState) {
        let end = state.fences.values().copied().fold(state.committed, u64::min);
        self.watch.send_if_modified(|published| {
            let moved = *published != end;
            *published = end;
            moved
        });
    }

    /// Takes a head read from the database (by this node's intake, another node's, or a
    /// look at the database). False when memory is behind its version: the caller gets the
    /// control plane read again, then calls [`Publication::recheck`].
    pub fn offer(&self, head: Head) -> bool {
        let mut state = self.lock();
        if !state.suspect && head.version <= self.known.load(Ordering::Acquire) {
            state.committed = state.committed.max(head.next_seq);
            if state.waiting.is_some_and(|waiting| waiting.next_seq <= head.next_seq) {
                state.waiting = None;
            }
            self.publish(&state);
            true
        } else {
            if state.waiting.is_none_or(|waiting| waiting.next_seq < head.next_seq) {
                state.waiting = Some(head);
            }
            false
        }
    }

    /// How far this node has seen the log committed.
    pub fn committed(&self) -> u64 {
        self.lock().committed
    }

    /// Holds every head back from now on, until [`Publication::trust`]: memory is to be read
    /// whole first.
    pub fn suspect(&self) {
        self.lock().suspect = true;
    }

    /// Memory has been read whole: heads go by their versions again (the caller rechecks).
    pub fn trust(&self) {
        self.lock().suspect = false;
    }

    /// Publishes what waited for memory to catch up, if it has; false if it still waits.
    pub fn recheck(&self) -> bool {
        let waiting = self.lock().waiting.take();
        waiting.is_none_or(|head| self.offer(head))
    }

    /// Puts a fence up at the next event's number.
    pub fn fence(self: &Arc<Self>) -> Fence {
        let mut state = self.lock();
        let (token, next_seq) = (state.next_token, state.committed);
        state.next_token += 1;
        state.fences.insert(token, next_seq);
        self.publish(&state);
        Fence { publication: self.clone(), token }
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.watch.subscribe()
    }
}

/// Groups begun and finished by the intake task.
pub(super) struct Groups {
    begun: std::sync::atomic::AtomicU64,
    finished: watch::Sender<u64>,
}

impl Groups {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { begun: 0.into(), finished: watch::channel(0).0 })
    }

    /// Resolves once every group begun before the call has been answered.
    pub async fn wait_for_begun(&self) {
        let begun = self.begun.load(std::sync::atomic::Ordering::SeqCst);
        let mut finished = self.finished.subscribe();
        // The sender lives as long as `self`.
        let _ = finished.wait_for(|finished| *finished >= begun).await;
    }
}

/// Everything the intake task works with.
pub(super) struct Intake {
    pub pool: deadpool_postgres::Pool,
    pub directory: Arc<RwLock<Directory>>,
    pub publication: Arc<Publication>,
    pub groups: Arc<Groups>,
    pub sync_seconds: Arc<std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>>,
    /// Why this node takes no more triggers, once it must not (see `PgStore::failure`).
    pub failure: watch::Receiver<Option<Arc<str>>>,
    /// Rung when this node's memory of the control plane is behind a head it committed.
    pub reload: Arc<tokio::sync::Notify>,
    /// Where every node hears that the log grew (`NOTIFY`).
    pub channel: Arc<str>,
    /// Stops this node should the log be shorter than it saw it (see `Rewound`).
    pub rewound: super::Rewound,
}

impl Intake {
    /// Commits groups until every sender is gone and the queue is empty.
    pub async fn run(self, mut jobs: mpsc::Receiver<Job>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        // The connection the intake keeps for itself, so no trigger waits for the pool behind
        // reads; dropped after a failed commit, and taken again for the next group.
        let mut connection = None;
        while jobs.recv_many(&mut group, MAX_GROUP).await > 0 {
            self.groups.begun.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.commit(&mut connection, std::mem::take(&mut group)).await;
            self.groups.finished.send_modify(|finished| *finished += 1);
        }
    }

    async fn commit(&self, connection: &mut Option<deadpool_postgres::Object>, group: Vec<Job>) {
        // A connection the server ended meanwhile (a restart, an idle timeout) is not used.
        if connection.as_ref().is_some_and(|client| client.is_closed()) {
            *connection = None;
        }
        if let Some(cause) = self.failure.borrow().clone() {
            for job in group {
                let _ = job.reply.send(Err(StoreError::Failed(cause.clone())));
            }
            return;
        }
        // First against memory, so a refused caller costs the database nothing.
        let mut accepted = Vec::with_capacity(group.len());
        {
            let directory = self.directory.read().expect("the directory lock is never poisoned");
            for job in group {
                let key = directory.keys.get(&job.event.key_hash[..]);
                let producer = directory.producers.get(&job.event.producer_id);
                match check_caller(key, producer, &job.event) {
                    Ok(()) => accepted.push(job),
                    Err(refusal) => {
                        let _ = job.reply.send(Err(refusal));
                    }
                }
            }
        }
        if accepted.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        // Whatever this node saw committed before this group began, the head it locks must
        // have reached.
        let seen = self.publication.committed();
        let written = match connection.as_mut() {
            Some(client) => self.write(client, &accepted, seen).await,
            None => match self.pool.get().await {
                // An acknowledged trigger is on disk, whatever the server's default says.
                Ok(client) => match client.batch_execute("SET synchronous_commit = on").await {
                    Ok(()) => self.write(connection.insert(client), &accepted, seen).await,
                    Err(error) => Err(error.into()),
                },
                Err(error) => Err(error.into()),
            },
        };
        if written.is_err() {
            *connection = None;
        }
        match written {
            Ok((answers, head, last)) => {
                if let Some(histogram) = self.sync_seconds.get() {
                    histogram.observe(started.elapsed().as_secs_f64());
                }
                if !self.publication.offer(head) {
                    self.reload.notify_one();
                }
                if let Some((seq, event_id)) = last {
                    self.rewound.known(seq, &event_id);
                }
                for (job, answer) in accepted.into_iter().zip(answers) {
                    let _ = job.reply.send(answer);
                }
            }
            Err(error) => {
                tracing::warn!(%error, triggers = accepted.len(), "a group of triggers failed to commit");
                for job in accepted {
                    let _ = job.reply.send(Err(error.clone()));
                }
                // The commit may have happened all the same (the connection failed after it):
                // fan-out follows the head the database has.
                if let Ok(client) = self.pool.get().await
                    && let Ok(row) = client.query_one(Head::SQL, &[]).await
                    && !self.publication.offer(Head::from_row(&row))
                {
                    self.reload.notify_one();
                }
            }
        }
    }

    /// Writes one group in one transaction; the answers, in order, the head after it, and the
    /// number and id of the last event it added, if it added any.
    async fn write(
        &self,
        client: &mut deadpool_postgres::Object,
        group: &[Job],
        seen: u64,
    ) -> Result<(Vec<Result<Appended, StoreError>>, Head, Option<(u64, String)>), StoreError> {
        let tx = client.transaction().await?;
        // Statements are prepared once per connection, and those that do not wait for one
        // another go out together (tokio-postgres pipelines them): a group costs five round
        // trips (begin, head, reads, writes, commit) whatever its size.
        let known = self.rewound.last_known();
        let known_seq = known.as_ref().map_or(-1, |(seq, _)| signed(*seq));
        let head = tx.prepare_cached(HEAD).await?;
        let head = tx.query_one(&head, &[&known_seq, &super::term::idle_limit()]).await?;
        let (mut next_seq, mut last_created_ms) = (unsigned(head.get(0)), unsigned(head.get(1)));
        if next_seq < seen {
            // Numbering from here would give events numbers delivery has already passed.
            return Err(StoreError::Failed(self.rewound.stop(seen, next_seq)));
        }
        // The log refilled past this node's position after going back: the event it knew is
        // another one now. Read by the statement that locks the head, on this group's
        // connection (which a restore or failover ends), so the events this group adds follow
        // the one this node knew (see `Rewound`).
        let found: Option<String> = head.get(2);
        if let (Some((seq, event_id)), Some(found)) = (&known, found)
            && found != *event_id
        {
            return Err(StoreError::Failed(self.rewound.replaced(*seq, &found, event_id)));
        }

        // The callers again, as the database has them now, whichever node changed them: a
        // producer disabled or a key rotated away on any node is refused from the next group
        // on. Shared locks make a change wait for this group's commit (or this group for the
        // change), so a trigger answered after the change returned was checked against it.
        // Producers before keys, the order admin writes lock them in too (the server runs
        // pipelined statements in the order they were sent).
        let producer_ids: Vec<&str> = group.iter().map(|job| job.event.producer_id.as_str()).collect();
        let hashes: Vec<&[u8]> = group.iter().map(|job| &job.event.key_hash[..]).collect();
        // The group's idempotency records, read under the head's lock: no other node can add
        // one meanwhile.
        let (keyed_producers, keyed_keys): (Vec<&str>, Vec<&str>) = group
            .iter()
            .filter_map(|job| Some((job.event.producer_id.as_str(), job.event.idempotency_key.as_deref()?)))
            .unzip();
        let (producers_sql, keys_sql, claims_sql, version_sql) = tokio::try_join!(
            biased;
            tx.prepare_cached(PRODUCERS),
            tx.prepare_cached(KEYS),
            tx.prepare_cached(CLAIMS),
            tx.prepare_cached(VERSION)
        )?;
        // The control plane's version, read after the head's lock is held: every listener
        // change whose point is at or below this group's numbers committed before it (those
        // take their point under a shared lock on the head) and is counted in it.
        let (version_row, producer_rows, key_rows, claim_rows) = tokio::try_join!(
            biased;
            async { tx.query_one(&version_sql, &[]).await },
            async { tx.query(&producers_sql, &[&producer_ids]).await },
            async { tx.query(&keys_sql, &[&hashes]).await },
            async {
                if keyed_keys.is_empty() {
                    Ok(Vec::new())
                } else {
                    tx.query(&claims_sql, &[&keyed_producers, &keyed_keys]).await
                }
            },
        )?;
        let mut producers: HashMap<String, Producer> = HashMap::new();
        for row in producer_rows {
            let id: String = row.get(0);
            let producer = decode(row.get(1)).ok_or_else(|| StoreError::Corrupt { key: format!("producers/{id}") })?;
            producers.insert(id, producer);
        }
        let keys: HashMap<Vec<u8>, ApiKeyEntry> = key_rows
            .iter()
            .map(|row| (row.get(0), ApiKeyEntry { producer_id: row.get(1), expires_at_ms: unsigned(row.get(2)) }))
            .collect();
        let claims: HashMap<(String, String), (String, u64)> =
            claim_rows.iter().map(|row| ((row.get(0), row.get(1)), (row.get(2), unsigned(row.get(3))))).collect();

        let mut answers = Vec::with_capacity(group.len());
        let mut events: Vec<Event> = Vec::with_capacity(group.len());
        let mut new_claims: HashMap<(String, String), (String, u64)> = HashMap::new();
        for job in group {
            let event = &job.event;
            if let Err(refusal) = check_caller(keys.get(&event.key_hash[..]), producers.get(&event.producer_id), event)
            {
                answers.push(Err(refusal));
                continue;
            }
            let claim_key = event.idempotency_key.as_ref().map(|key| (event.producer_id.clone(), key.clone()));
            if let Some(claim_key) = &claim_key
                && let Some((event_id, created_ms)) = new_claims.get(claim_key).or_else(|| claims.get(claim_key))
                && event.created_at_ms < created_ms.saturating_add(IDEMPOTENCY_WINDOW_MS)
            {
                answers.push(Ok(Appended { event_id: event_id.clone(), duplicate: true }));
                continue;
            }
            // Creation times never go backwards along the log, so time windows map to ranges.
            let created_at_ms = last_created_ms.max(event.created_at_ms);
            let event_id = ids::event_id(next_seq);
            events.push(Event {
                id: event_id.clone(),
                seq: next_seq,
                producer_id: event.producer_id.clone(),
                event_type: event.event_type.clone(),
                payload: event.payload.clone(),
                content_type: event.content_type.clone(),
                created_at_ms,
                idempotency_key: event.idempotency_key.clone().unwrap_or_default(),
            });
            if let Some(claim_key) = claim_key {
                new_claims.insert(claim_key, (event_id.clone(), created_at_ms));
            }
            answers.push(Ok(Appended { event_id, duplicate: false }));
            next_seq += 1;
            last_created_ms = created_at_ms;
        }

        let seqs: Vec<i64> = events.iter().map(|event| signed(event.seq)).collect();
        let ids: Vec<&str> = events.iter().map(|event| event.id.as_str()).collect();
        let event_producers: Vec<&str> = events.iter().map(|event| event.producer_id.as_str()).collect();
        let types: Vec<&str> = events.iter().map(|event| event.event_type.as_str()).collect();
        let created: Vec<i64> = events.iter().map(|event| signed(event.created_at_ms)).collect();
        let records: Vec<Vec<u8>> = events.iter().map(encode).collect();
        let (mut claim_producers, mut claim_keys, mut claim_events, mut claim_created) =
            (vec![], vec![], vec![], vec![]);
        for ((producer, key), (event_id, created_ms)) in &new_claims {
            claim_producers.push(producer.as_str());
            claim_keys.push(key.as_str());
            claim_events.push(event_id.as_str());
            claim_created.push(signed(*created_ms));
        }
        let head = Head { next_seq, version: unsigned(version_row.get(0)) };
        let (insert_events, insert_claims, move_head, notify) = tokio::try_join!(
            biased;
            tx.prepare_cached(INSERT_EVENTS),
            tx.prepare_cached(INSERT_CLAIMS),
            tx.prepare_cached(MOVE_HEAD),
            tx.prepare_cached(NOTIFY)
        )?;
        tokio::try_join!(
            biased;
            async {
                if events.is_empty() {
                    Ok(0)
                } else {
                    tx.execute(&insert_events, &[&seqs, &ids, &event_producers, &types, &created, &records]).await
                }
            },
            async {
                if new_claims.is_empty() {
                    Ok(0)
                } else {
                    tx.execute(&insert_claims, &[&claim_producers, &claim_keys, &claim_events, &claim_created]).await
                }
            },
            async { tx.execute(&move_head, &[&signed(next_seq), &signed(last_created_ms)]).await },
            async {
                // Sent to every node at commit (and never if it rolls back).
                if events.is_empty() { Ok(0) } else { tx.execute(&notify, &[&&*self.channel, &head.to_text()]).await }
            },
        )?;
        tx.commit().await?;
        let last = events.last().map(|event| (event.seq, event.id.clone()));
        Ok((answers, head, last))
    }
}

/// The head, locked, with the id the log holds at the number of the last event this node
/// knows (`$1`; none for -1), read in the same statement: see `Rewound`. Every node's triggers
/// wait for that lock, so the group's transaction, left open idle (its node cut off mid-group),
/// is ended by the server after `$2` ms.
pub(super) const HEAD: &str = "SELECT h.next_seq, h.last_created_ms, (SELECT e.id FROM events e WHERE e.seq = $1), \
                    set_config('idle_in_transaction_session_timeout', $2, true) \
                    FROM log_head h WHERE h.id = 0 FOR UPDATE OF h";
const PRODUCERS: &str = "SELECT id, record FROM producers WHERE id = ANY($1) FOR SHARE";
const KEYS: &str = "SELECT key_hash, producer_id, expires_at_ms FROM api_keys WHERE key_hash = ANY($1) FOR SHARE";
const CLAIMS: &str = "SELECT i.producer_id, i.key, i.event_id, i.created_ms FROM idempotency i \
                      JOIN unnest($1::text[], $2::text[]) AS k(producer_id, key) \
                      ON i.producer_id = k.producer_id AND i.key = k.key";
const INSERT_EVENTS: &str = "INSERT INTO events (seq, id, producer_id, event_type, created_ms, record) \
                             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bytea[])";
const INSERT_CLAIMS: &str = "INSERT INTO idempotency (producer_id, key, event_id, created_ms) \
                             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) \
                             ON CONFLICT (producer_id, key) DO UPDATE SET event_id = excluded.event_id, created_ms = excluded.created_ms";
const VERSION: &str = "SELECT version FROM control_version WHERE id = 0";
const NOTIFY: &str = "SELECT pg_notify($1, $2)";
const MOVE_HEAD: &str = "UPDATE log_head SET next_seq = $1, last_created_ms = $2 WHERE id = 0";

/// The caller's key and its producer, checked where appends are serial: a trigger
/// authorised just before its producer was disabled (or its key rotated away) is refused.
fn check_caller(key: Option<&ApiKeyEntry>, producer: Option<&Producer>, event: &NewEvent) -> Result<(), StoreError> {
    let revoked = StoreError::Refused(Refusal::KeyRevoked);
    let Some(key) = key else {
        return Err(revoked);
    };
    if key.producer_id != event.producer_id || !key.valid_at(event.created_at_ms) {
        return Err(revoked);
    }
    match producer {
        Some(producer) if producer.enabled => Ok(()),
        Some(producer) => Err(StoreError::Refused(Refusal::ProducerDisabled(producer.disabled_reason.clone()))),
        None => Err(revoked),
    }
}
