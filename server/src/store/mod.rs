//! Durable state: producers, API keys, event hashes, listeners, the event log and
//! idempotency records ([`Store`]), the delivery pipeline's state ([`PipelineStore`]) and the
//! history ([`HistoryStore`]), behind traits with two backends.
//!
//! This module is the only one that touches a database: sled (in [`sled_store`], the
//! embedded default) or PostgreSQL (in [`postgres`]); everything else sees the traits and the
//! plain records of [`model`]. Every write that a caller is answered for is
//! durable before its future resolves. A store never sees gRPC types, never decides policy
//! (validation, authorisation) and never holds a plaintext secret: listener secrets arrive
//! sealed.

#[cfg(test)]
pub(crate) mod conformance;
mod fs_sync;
mod journal;
mod listing;
pub mod model;
mod postgres;
mod producer_index;
mod sled_history;
mod sled_pipeline;
mod sled_store;
mod writer;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use model::{
    ApiKeyEntry, Appended, Attempt, AttemptTrigger, DeletedListener, Delivery, DeliveryState, DueEntry, Event,
    EventHashEntry, FanoutCursor, Listener, ListenerHealth, MAX_SKIPPED, NewEvent, NextStep, Producer, Quarantined,
    SeqRange,
};
pub use postgres::PgStore;
pub use sled_store::SledStore;
pub use writer::IDEMPOTENCY_WINDOW_MS;

/// What one step of [`PipelineStore::cancel_parked`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CancelledLot {
    /// Entries taken out of the lot (cancelled or put back in the queue).
    pub taken: usize,
    /// The earliest due time of the entries put back in the queue, if any.
    pub requeued_from_ms: Option<u64>,
}

/// A write that resolves once it is durable (or failed).
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// A change applied to one listener inside the store's serialised writer.
pub type ListenerEdit = Box<dyn FnOnce(&mut Listener) + Send + 'static>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database failed (any backend's error).
    #[error("database error: {0}")]
    Backend(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// A database server could not be reached, or lost the connection, or asked for the
    /// transaction to be tried again: the same call may well succeed shortly.
    #[error("the database is unavailable: {0}")]
    Unavailable(#[source] Arc<dyn std::error::Error + Send + Sync>),
    #[error("stored record {key} is corrupt or from an unknown version")]
    Corrupt { key: String },
    /// The event log's record at `seq` does not decode.
    #[error("the record of event {seq} is damaged and was put aside")]
    DamagedEvent { seq: u64 },
    #[error("the store is closed")]
    Closed,
    /// A write of the delivery pipeline from a node whose delivery term has ended (another
    /// node took the delivery lease over, or this one lost it): not made.
    #[error("this node no longer delivers (another holds the delivery lease): the write was not made")]
    NotDelivering,
    /// A write to disk failed and the intake line stopped; reads go on.
    #[error("{0}")]
    Failed(Arc<str>),
    #[error("recent events are still on their way into the database")]
    Behind,
    #[error("{0}")]
    Refused(Refusal),
    #[error(
        "the master key does not match this data directory: its secrets are sealed under key {expected}, \
         the configured key is {found} (to rotate, give the old key as HOOKD_PREVIOUS_MASTER_KEY or \
         --previous-master-key-file beside the new one)"
    )]
    WrongMasterKey { expected: String, found: String },
}

impl From<sled::Error> for StoreError {
    fn from(error: sled::Error) -> Self {
        StoreError::Backend(Arc::new(error))
    }
}

/// The journal's files fail like the database's.
impl From<std::io::Error> for StoreError {
    fn from(error: std::io::Error) -> Self {
        StoreError::from(sled::Error::Io(error))
    }
}

/// Most weight (see [`append_weight`]) of appends acknowledged or under way and not yet
/// applied (sled) or answered (PostgreSQL): bounds intake memory whatever the payload limit
/// and the number of callers.
pub(crate) const PENDING_BYTES: u32 = 256 * 1024 * 1024;
/// What an event weighs besides its payload: at most 65,536 events are in flight in all, a
/// second or two of sustained intake, so fan-out and reads of recent events never wait long.
const EVENT_WEIGHT: u32 = 4096;

/// What an append of a payload this long weighs against [`PENDING_BYTES`].
pub(crate) fn append_weight(payload_len: usize) -> u32 {
    u32::try_from(payload_len).unwrap_or(u32::MAX).saturating_add(EVENT_WEIGHT).min(PENDING_BYTES)
}

/// The value a store keeps to recognise the master key: the key id, a zero byte, the check
/// value.
pub(crate) fn key_check_value(key_id: &str, check: &[u8; 32]) -> Vec<u8> {
    [key_id.as_bytes(), &[0], check].concat()
}

/// Whether `stored` (see [`key_check_value`]) is one of the `accepted` keys; if not, the error
/// naming the key the data was sealed with and the keys given.
pub(crate) fn match_master_key(stored: &[u8], accepted: &[(String, [u8; 32])]) -> Result<(), StoreError> {
    if accepted.iter().any(|(key_id, check)| key_check_value(key_id, check) == stored) {
        return Ok(());
    }
    let stored_id = stored.split(|&b| b == 0).next().unwrap_or_default();
    let found: Vec<&str> = accepted.iter().map(|(key_id, _)| key_id.as_str()).collect();
    Err(StoreError::WrongMasterKey {
        expected: String::from_utf8_lossy(stored_id).into_owned(),
        found: found.join(", "),
    })
}

/// Why the store refused an append on the caller's behalf (checked where writes are serial).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the API key is no longer valid")]
    KeyRevoked,
    #[error("the producer is disabled: {0}")]
    ProducerDisabled(String),
}

/// A change made through another node that the pipeline acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteChange {
    /// A listener was registered, changed or deleted.
    Listener(String),
    /// What another node announced.
    Note(Note),
}

/// The most text one [`Note`] may carry (PostgreSQL refuses a notification of 8,000 bytes
/// or more; the rest is room for what the store adds).
pub const NOTE_BYTES: usize = 7_000;

/// What one node tells the others. The store carries it and never reads the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// Deliveries were queued outside fan-out (a retry, a replay, a recovery): the node that
    /// delivers reads its queue again.
    Queued,
    /// A watcher on the announcing node wants this producer's outcomes (for a while).
    Watching(String),
    /// Outcomes of this producer were dropped on their way from the announcing node to the
    /// other nodes' watchers: those watchers fell behind. (Sent by earlier versions, which
    /// relayed outcomes after their records through a bounded queue; still heard, for a
    /// rolling upgrade.)
    Behind(String),
    /// Attempts' outcomes, as the pipeline writes them down.
    Outcomes(String),
    /// A node standing by asks the delivering node how its listeners are doing (for the
    /// operator's page).
    Asking,
    /// One part of the delivering node's answer to [`Note::Asking`]: part `part` (from 0) of
    /// `parts`, of answer `report`, as the pipeline writes it down.
    Standing { report: u64, part: u32, parts: u32, text: String },
}

/// A whole store, as hookd runs on one: everything it keeps ([`Store`], [`PipelineStore`],
/// [`HistoryStore`]). sled is the embedded one, PostgreSQL the other; both pass the same
/// conformance tests (`conformance`).
pub trait Backend: Store + PipelineStore + HistoryStore {}

impl<T: Store + PipelineStore + HistoryStore> Backend for T {}

/// Everything hookd keeps. Reads are synchronous point lookups or bounded scans; writes go
/// through the backend's durable write path and resolve once on disk. Each method is one
/// atomic operation, so a distributed backend can make each one transaction.
pub trait Store: Send + Sync + 'static {
    /// Refuses master keys none of which is the one the data was sealed with; remembers the
    /// first key's check value on first use. `accepted`: (key id, check value), the current
    /// key first, then previous keys still accepted during a rotation.
    fn check_master_key(&self, accepted: &[(String, [u8; 32])]) -> Result<(), StoreError>;
    /// Records that every secret is now sealed under this key (the end of a rotation).
    fn set_master_key(&self, key_id: &str, check: &[u8; 32]) -> Result<(), StoreError>;
    /// The event-hash key, sealed under the master key; `None` before it was first stored.
    fn sealed_hash_key(&self) -> Result<Option<Vec<u8>>, StoreError>;
    fn set_sealed_hash_key(&self, sealed: &[u8]) -> Result<(), StoreError>;

    /// Stores a new producer and the hash of its first API key.
    fn create_producer(&self, producer: Producer, key_hash: [u8; 32]) -> StoreFuture<()>;
    fn producer(&self, producer_id: &str) -> Result<Option<Producer>, StoreError>;
    /// Producers in id (creation) order, starting after `after`.
    fn list_producers(&self, after: Option<&str>, limit: usize) -> Result<Vec<Producer>, StoreError>;
    /// The producer an API key hash belongs to, if the key is known and not expired at `now_ms`.
    fn producer_by_key(&self, key_hash: &[u8; 32], now_ms: u64) -> Result<Option<Producer>, StoreError>;
    /// Adds `new_key_hash`; every older key still valid at `now_ms` keeps working for
    /// `grace_ms` more (0: it is deleted at once). Resolves to false for an unknown producer.
    fn rotate_producer_key(
        &self,
        producer_id: &str,
        new_key_hash: [u8; 32],
        now_ms: u64,
        grace_ms: u64,
    ) -> StoreFuture<bool>;
    /// Sets `enabled` and the reason; `None` for an unknown producer.
    fn set_producer_enabled(&self, producer_id: &str, enabled: bool, reason: String) -> StoreFuture<Option<Producer>>;

    /// Remembers which (producer, event type) an event hash stands for. Idempotent.
    fn put_event_hash(&self, event_hash: &str, entry: EventHashEntry) -> StoreFuture<()>;
    fn event_hash(&self, event_hash: &str) -> Result<Option<EventHashEntry>, StoreError>;

    /// Stores a new listener and its indexes.
    fn insert_listener(&self, listener: Listener) -> StoreFuture<()>;
    fn listener(&self, listener_id: &str) -> Result<Option<Listener>, StoreError>;
    /// A producer's listeners in id (creation) order, of one event type or all, after `after`.
    fn list_listeners(
        &self,
        producer_id: &str,
        event_type: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Listener>, StoreError>;
    /// Applies `edit` to the stored listener atomically; `None` if it does not exist.
    fn update_listener(&self, listener_id: &str, edit: ListenerEdit) -> StoreFuture<Option<Listener>>;
    /// Removes a listener and its indexes; the removed listener (see [`DeletedListener`]), or
    /// `None`.
    fn delete_listener(&self, listener_id: &str) -> StoreFuture<Option<DeletedListener>>;
    /// A number that changes whenever any listener is written: a copy of a listener read
    /// while it held a value is current as long as it still does.
    fn listeners_generation(&self) -> u64;

    /// Appends an event to the event log with its idempotency record, atomically. Concurrent
    /// appends share one flush. A key already used by the producer within the idempotency
    /// window resolves to the first event's id with `duplicate = true`, recording nothing.
    fn append_event(&self, event: NewEvent) -> StoreFuture<Appended>;
    /// One event by id. An event acknowledged but not yet readable answers
    /// [`StoreError::Behind`]: wait for [`Store::settled`] first.
    fn event(&self, event_id: &str) -> Result<Option<Event>, StoreError>;
    /// Resolves once every event acknowledged before the call is readable (at once, mostly:
    /// events are readable a moment after their acknowledgement), without blocking a thread.
    fn settled(&self) -> StoreFuture<()>;
    /// Why the store can no longer write, once a write to disk has failed (`None` until
    /// then). Health follows it.
    fn failure(&self) -> tokio::sync::watch::Receiver<Option<Arc<str>>>;

    /// How far fan-out may go: the next event's sequence number once everything appended so
    /// far is durable and readable (held back while a listener is being written, so fan-out
    /// never reads an event before a listener write that came first). It grows as events are
    /// appended; fan-out follows it.
    fn durable_seq(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Observes the duration of every durable write of the intake (journal sync or commit)
    /// from now on.
    fn observe_syncs(&self, histogram: prometheus_client::metrics::histogram::Histogram);

    /// The delivery term this node delivers in now, 0 while it does not. A node with a
    /// database to itself always delivers (term 1); where several nodes share one, one at a
    /// time does (it holds the delivery lease), each holding starting a new term, and the
    /// others stand by. The pipeline runs in a term until the term changes: a lease lost and
    /// taken again is another term, however quickly.
    fn delivery_lease(&self) -> tokio::sync::watch::Receiver<u64> {
        tokio::sync::watch::channel(1).1
    }
    /// The pipeline starts delivering in `term`: where nodes share the store, its writes are
    /// refused ([`StoreError::NotDelivering`]) once the term has ended.
    fn begin_delivery(&self, _term: u64) {}
    /// Changes made through other nodes, and what they tell this one, for the pipeline;
    /// `None` where no other node writes. The first caller takes them.
    fn remote_changes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<RemoteChange>> {
        None
    }
    /// Bytes the store keeps outside the data directory (a database server's tables and
    /// indexes), if it keeps any there.
    fn database_bytes(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
    /// Tells every other node sharing the database `note` (it comes out of their
    /// [`Store::remote_changes`]), at most once and never to this node; nothing where no
    /// other node can be. False when it cannot be taken now (too many wait to be sent).
    fn announce(&self, note: Note) -> bool {
        let _ = note;
        true
    }

    /// Makes everything written so far durable and stops the writer. Later writes fail with
    /// [`StoreError::Closed`].
    fn close(&self) -> Result<(), StoreError>;
}

/// A delivery written before any attempt of it (parked, cancelled, or replayed). A strictly
/// ordered listener's unfinished deliveries are also indexed in delivery order, which is the
/// order it is held to.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub delivery: Delivery,
    pub ordered: bool,
}

/// A finished attempt to record: the attempt, the delivery as it now stands, the queue entry
/// that was attempted (none for a first attempt taken straight from the event log) and what
/// comes next.
#[derive(Debug, Clone)]
pub struct Completion {
    pub delivery: Delivery,
    pub attempt: Attempt,
    pub entry: Option<DueEntry>,
    pub next: NextStep,
    /// The listener keeps strict order: a delivery left pending holds its place in it.
    pub ordered: bool,
}

/// A position in the due queue: (due time, queue key id). A scan from a position starts just
/// after it; `(t, "")` is just before every entry due at `t`.
pub type QueuePosition = (u64, String);

/// The delivery pipeline's state: the fan-out cursor, deliveries, the due queue (with
/// per-listener parking), attempts and listener health.
///
/// The event log is the queue of first attempts: a delivery has no record until its first
/// attempt ends (then the record holds it) or it is parked or cancelled before one. Retries,
/// manual attempts, replays and parked deliveries wait in the durable due queue.
///
/// These writes are atomic but not flushed on their own: delivery is at-least-once, so an
/// attempt redone after a crash is allowed, while an event is never lost because the event
/// log itself is flushed before a trigger is answered. A queue entry stays queued while it is
/// worked on (who has it is the dispatcher's business, kept in memory), so a crash leaves it
/// due, at its own time and in its own order. Methods block briefly (sled calls); async
/// callers run them on the blocking pool.
pub trait PipelineStore: Send + Sync + 'static {
    /// Where fan-out stands (the start of the log when it never ran).
    fn fanout_cursor(&self) -> Result<FanoutCursor, StoreError>;
    /// Records where fan-out stands.
    fn set_fanout_cursor(&self, cursor: &FanoutCursor) -> Result<(), StoreError>;
    /// The event log from `seq` on, in order, read as it is consumed (sequence numbers may
    /// have gaps where a group commit failed). A record that does not decode is
    /// [`StoreError::DamagedEvent`], and the log goes on after it.
    fn events_from(&self, seq: u64) -> Box<dyn Iterator<Item = Result<Event, StoreError>> + '_>;
    /// The event at exactly `seq`.
    fn event_at(&self, seq: u64) -> Result<Option<Event>, StoreError>;
    /// Puts a damaged event aside with the reason, so it is visible and fan-out goes on.
    fn quarantine_event(&self, seq: u64, reason: &str, now_ms: u64) -> Result<(), StoreError>;
    /// Whether a delivery has a record.
    fn delivery_exists(&self, delivery_id: &str) -> Result<bool, StoreError>;
    /// Writes deliveries that have no record yet as pending, each parked in its listener's
    /// lot at its `next_attempt_at_ms` (ordered ones also holding their place in the order),
    /// in one atomic write.
    fn park_new(&self, deliveries: &[NewDelivery]) -> Result<(), StoreError>;
    /// Writes deliveries that have no record yet as cancelled, in one atomic write.
    fn cancel_new(&self, deliveries: &[Delivery]) -> Result<(), StoreError>;
    /// Writes cancelled each of `deliveries` that has no record, checking and writing each
    /// delivery's record atomically: one written meanwhile (a first attempt that just ended)
    /// is kept.
    fn cancel_unrecorded(&self, deliveries: &[Delivery]) -> Result<(), StoreError>;
    /// Records that a listener is fanned out apart from the others from event `from_seq` on
    /// (it cannot take its deliveries soon: they wait in the event log, and it reads them from
    /// there itself when it can), or, with `None`, that it follows fan-out again.
    fn set_detached(&self, listener_id: &str, from_seq: Option<u64>) -> Result<(), StoreError>;
    /// Every listener fanned out apart, with where it stands.
    fn detached(&self) -> Result<Vec<(String, u64)>, StoreError>;
    /// Deleted listeners whose owed first attempts are still being cancelled, as
    /// [`Store::delete_listener`] answered them (read at startup, to finish the job).
    fn deleted_owing(&self) -> Result<Vec<DeletedListener>, StoreError>;
    /// Forgets a deleted listener once what it was owed is cancelled.
    fn forget_deleted(&self, listener_id: &str) -> Result<(), StoreError>;
    /// One producer's events of one type from `from_seq` up to `until_seq`, in order, looking at
    /// no more than `scan` of the producer's events and keeping no more than `limit`; with the
    /// position reached (the next event to look at).
    fn events_of(
        &self,
        producer_id: &str,
        event_type: &str,
        from_seq: u64,
        until_seq: u64,
        scan: usize,
        limit: usize,
    ) -> Result<(Vec<Event>, u64), StoreError>;

    /// Up to `limit` queue entries after `after` (from the start when `None`) due at or
    /// before `now_ms`, in (due time, queue key id) order.
    fn due(&self, after: Option<&QueuePosition>, now_ms: u64, limit: usize) -> Result<Vec<DueEntry>, StoreError>;
    /// When the first queue entry after `after` is due.
    fn next_due_ms(&self, after: Option<&QueuePosition>) -> Result<Option<u64>, StoreError>;
    /// Takes `entries` off the queue into their listeners' parking lots (kept in delivery
    /// order), in one atomic write.
    fn park(&self, entries: &[DueEntry]) -> Result<(), StoreError>;
    /// Puts back up to `limit` of a listener's parked entries, oldest delivery first, at their
    /// original due time. Returns where they were put (see [`DueEntry::key_id`]).
    fn unpark(&self, listener_id: &str, limit: usize) -> Result<Vec<QueuePosition>, StoreError>;
    /// The oldest recorded unfinished delivery of a listener among those it holds to strict
    /// order (the one it must finish first).
    fn pending_head(&self, listener_id: &str) -> Result<Option<String>, StoreError>;
    /// The listeners with parked entries (read at startup: the entries themselves stay
    /// parked, there may be millions).
    fn parked_listeners(&self) -> Result<Vec<String>, StoreError>;

    fn delivery(&self, delivery_id: &str) -> Result<Option<Delivery>, StoreError>;
    /// Records finished attempts in one atomic write: for each, the attempt, the delivery's
    /// new state (with its listener index when it is new), the entry attempted leaving the
    /// queue, and the delivery's next entry or its leaving the listener's unfinished ones. A
    /// delivery's first attempt is kept in the delivery's own record.
    fn complete_attempts(&self, completions: Vec<Completion>) -> Result<(), StoreError>;
    /// [`PipelineStore::complete_attempts`], telling the other nodes of a shared database
    /// `outcomes` (lines for their watchers, see [`Note::Outcomes`]) as the write commits, so
    /// an outcome recorded is an outcome told, even by a node that dies the moment after. A
    /// store no other node shares has nobody to tell.
    fn complete_attempts_telling(&self, completions: Vec<Completion>, outcomes: String) -> Result<(), StoreError> {
        let _ = outcomes;
        self.complete_attempts(completions)
    }
    /// Takes an entry with nothing left to do out of the queue.
    fn drop_entry(&self, entry: &DueEntry) -> Result<(), StoreError>;
    /// Ends a delivery without an attempt (e.g. its listener was deleted).
    fn cancel_delivery(&self, delivery: &Delivery, entry: &DueEntry) -> Result<(), StoreError>;
    /// Takes up to `limit` entries out of a deleted listener's parking lot, cancelling their
    /// deliveries that are still pending, in one atomic write. An entry of a delivery with a
    /// manual attempt queued or under way goes back to the queue instead (that attempt
    /// writes the delivery back when it ends; the entry's worker cancels it after).
    fn cancel_parked(&self, listener_id: &str, limit: usize) -> Result<CancelledLot, StoreError>;
    /// Attempts of a delivery numbered after `after`, in order, at most `limit` (the first is
    /// read from the delivery's record).
    fn attempts(&self, delivery_id: &str, after: u32, limit: usize) -> Result<Vec<Attempt>, StoreError>;

    fn listener_health(&self, listener_id: &str) -> Result<ListenerHealth, StoreError>;
    fn set_listener_health(&self, listener_id: &str, health: &ListenerHealth) -> Result<(), StoreError>;
}

/// Bytes of events' records a page of a listing holds at most (a page of one event excepted):
/// a page of a thousand large payloads stays well within a client's 4 MiB message limit, and
/// within bounded memory here.
pub const LIST_PAGE_BYTES: usize = 3 << 20;

/// Which events a listing wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only this producer's events (`None`: everyone's, for the admin).
    pub producer_id: Option<String>,
    pub event_type: Option<String>,
    /// Created at or after.
    pub since_ms: u64,
    /// Created before.
    pub until_ms: Option<u64>,
}

/// One page of a listing. `resume_after` is where the next page starts (the last position
/// looked at): `None` when there is nothing more. A page may hold fewer items than asked
/// when a filter skipped many records; only `resume_after` says whether more may follow.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub resume_after: Option<String>,
}

/// What one retention step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trimmed {
    pub events: usize,
    pub deliveries: usize,
    /// Old events kept because a delivery of theirs is still pending, or a listener reading
    /// back from the log may still need them (see [`Owed`]).
    pub kept: usize,
    /// Where the next step starts; `None` when everything old enough was looked at.
    pub next_seq: Option<u64>,
}

/// How much of some things the store holds, for the operator's gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub listeners: u64,
    pub disabled_listeners: u64,
    /// Queue entries, queued or parked (retries, manual attempts, replays): at most
    /// [`COUNT_LIMIT`] are counted.
    pub queued: u64,
    pub quarantined: u64,
}

/// Most entries [`HistoryStore::counts`] counts in one keyspace.
pub const COUNT_LIMIT: usize = 1_000_000;

/// What retention must keep, read where it starts a step: every event from `stop` on (where
/// fan-out durably stands, or a deleted listener's owed pairs are still being cancelled), and
/// past where each detached listener stands, the events of its producer and type (it reads
/// them back from the log). Other producers' events are not held back by such a listener.
#[derive(Debug, Default)]
pub(crate) struct Owed {
    pub stop: u64,
    /// Where each detached listener stands, with its producer and event type.
    pub detached: Vec<(u64, String, String)>,
}

impl Owed {
    /// Whether event `seq` (below `stop`) of this producer and type may still be read back.
    pub fn keeps(&self, seq: u64, producer_id: &str, event_type: &str) -> bool {
        self.detached.iter().any(|(from, producer, kind)| seq >= *from && producer == producer_id && kind == event_type)
    }
}

/// The history of events, deliveries and attempts: what inspection, replay, recovery and
/// retention need. Same rules as [`PipelineStore`]: atomic batches, no flush of their own,
/// blocking calls for the blocking pool.
pub trait HistoryStore: Send + Sync + 'static {
    /// Events in log (trigger) order, after `after_seq`.
    fn list_events(
        &self,
        filter: &EventFilter,
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Page<Event>, StoreError>;
    /// One delivery by id and whether it has a record: one without is still waiting in the
    /// event log for its first attempt (pending, no attempts).
    fn delivery_view(&self, delivery_id: &str) -> Result<Option<(Delivery, bool)>, StoreError>;
    /// The deliveries of one event, in delivery id order, after `after`, those still waiting
    /// in the event log included.
    fn deliveries_of_event(
        &self,
        event_seq: u64,
        state: Option<DeliveryState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<Delivery>, StoreError>;
    /// The deliveries of one listener, oldest event first, after `after`, those still waiting
    /// in the event log included.
    fn deliveries_of_listener(
        &self,
        listener_id: &str,
        state: Option<DeliveryState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<Delivery>, StoreError>;
    /// Queues one manual attempt of a delivery, due at `now_ms`, durably, unless one asked
    /// for earlier is still queued or under way (then nothing more is queued): the delivery
    /// and when its manual attempt was asked for, or `None` for no such delivery.
    fn queue_manual_attempt(&self, delivery_id: &str, now_ms: u64) -> Result<Option<(Delivery, u64)>, StoreError>;
    /// Creates new deliveries (a replay), each due at its `next_attempt_at_ms`, durably.
    /// False (and nothing written) when their event no longer exists.
    fn create_deliveries(&self, deliveries: &[Delivery]) -> Result<bool, StoreError>;
    /// Ids of a listener's failed deliveries created in [since, until), oldest first, after
    /// `after`: a page of at most `limit`, which may hold fewer when many were not failed
    /// (only `resume_after` says whether more may follow).
    fn failed_deliveries(
        &self,
        listener_id: &str,
        since_ms: u64,
        until_ms: Option<u64>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<String>, StoreError>;
    /// Makes failed deliveries pending again, due at `now_ms`, except those with a manual
    /// attempt queued or under way (it would write its delivery back as failed). Returns how
    /// many were.
    fn requeue_failed(&self, delivery_ids: &[String], now_ms: u64) -> Result<usize, StoreError>;
    /// Deletes up to `max_events` events created before `before_ms` (from `start_seq` on),
    /// with their deliveries, attempts and index entries, except events with a pending
    /// delivery or not yet fanned out. An event's idempotency record goes with it only if the
    /// event was created before `keys_before_ms`; otherwise it stays, to be removed by
    /// [`HistoryStore::trim_keys`] once it is that old (a retention shorter than the
    /// idempotency window does not shorten the window).
    fn trim(
        &self,
        before_ms: u64,
        keys_before_ms: u64,
        start_seq: u64,
        max_events: usize,
    ) -> Result<Trimmed, StoreError>;
    /// Removes up to `max` idempotency records left behind by [`HistoryStore::trim`] whose
    /// events were created before `keys_before_ms`; returns how many it looked at (fewer than
    /// `max`: none is left that old).
    fn trim_keys(&self, keys_before_ms: u64, max: usize) -> Result<usize, StoreError>;
    /// Counts for the operator's gauges. Reads whole keyspaces (up to [`COUNT_LIMIT`] each):
    /// for now and then, off the async threads.
    fn counts(&self) -> Result<Counts, StoreError>;
}
