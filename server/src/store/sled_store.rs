//! The embedded backend: two sled databases, each one tree with one key prefix per keyspace.
//!
//! One tree per database (rather than a tree per keyspace) lets a record and its indexes
//! change in one `apply_batch` — atomic without cross-tree transactions. The intake database
//! (`db/`: the rows from `m/` to `i/` below) is written only through the intake's write line
//! (`writer`): events reach it from the `journal/` files, after the trigger was answered, and
//! a restart first writes in whatever the journal has that sled lacks. The queue database
//! (`queue/`: `c/` and the rows after it) holds the pipeline's state. Neither is on the
//! trigger path: a trigger waits for the journal's sync only, so fanning an event out to a
//! thousand listeners adds nothing to it. Reads go straight to sled, except that a read of an
//! event acknowledged but not yet applied waits for it, and that API keys and their producers
//! are served from memory once read (forgotten at every write). Key layout (`/` ends each
//! prefix):
//!
//! | key | value |
//! | --- | --- |
//! | `m/keycheck` | key id + check value of the master key |
//! | `m/next_seq` | the next event sequence number (u64), kept even when old events are trimmed |
//! | `m/journal_from` | the last checkpoint (u64): events from it on are written in again from `journal/` at start |
//! | `p/{producer id}` | [`Producer`] |
//! | `k/{sha256 of api key}` | [`ApiKeyEntry`] |
//! | `h/{event hash}` | [`EventHashEntry`] |
//! | `l/{listener id}` | [`Listener`] |
//! | `lt/{producer id}/{event type}\0{listener id}` | empty: listeners of one event type |
//! | `lp/{producer id}/{listener id}` | empty: all listeners of a producer |
//! | `e/{seq: u64 big-endian}` | [`Event`]: the event log, in trigger order |
//! | `eb/{producer id}/{block: u64 big-endian}` | bitmap of 256 bits, least significant first in each byte: which of events `block × 256` to `block × 256 + 255` are the producer's (see `producer_index`) |
//! | `i/{producer id}\0{idempotency key}` | idempotency record |
//! | `ik/{created ms: u64 big-endian}{producer id}\0{idempotency key}` | empty: the idempotency record of an event retention removed before the record's 24 hours were up, to remove then |
//! | `c/fanout` | [`FanoutCursor`](super::FanoutCursor): where fan-out stands |
//! | `ld/{listener id}` | u64: the listener is fanned out apart from the others from this event on (its deliveries from there wait in the log) |
//! | `lx/{listener id}` | u64 then [`Listener`](super::Listener): a deleted listener, whose first attempts from this event on that have no record are being cancelled |
//! | `x/{seq: u64 big-endian}` | [`Quarantined`](super::Quarantined): an event whose record does not decode, put aside |
//! | `d/{delivery id}` | [`Delivery`](super::Delivery), with its first attempt; written once its first attempt ends, or when it is parked or cancelled before one |
//! | `q/{due ms: u64 big-endian}{delivery id}` | listener id: the due queue, in time order |
//! | `pk/{listener id}/{delivery id}` | original due time: parked while the listener is busy |
//! | `pl/{listener id}/{delivery id}` | empty: unfinished deliveries of a strictly ordered listener, oldest first |
//! | `mq/{delivery id}/{due ms: u64 big-endian}` | empty: a manual attempt queued or under way (retention keeps its delivery) |
//! | `dl/{listener id}/{delivery id}` | empty: every delivery of a listener |
//! | `a/{delivery id}/{attempt: u32 big-endian}` | [`Attempt`](super::Attempt): attempts after the first (in data from before `Delivery::first_attempt`, the first as well) |
//! | `lh/{listener id}` | [`ListenerHealth`](super::ListenerHealth) |

use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sled::{Batch, Tree};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use super::fs_sync::FileSystem;
use super::journal::{self, Journal};
use super::model::{
    ApiKeyEntry, Appended, DeletedListener, Event, EventHashEntry, FanoutCursor, Listener, NewEvent, Producer, decode,
    encode,
};
use super::producer_index;
use super::writer::{self, Callers, Job, JobSender, Progress, Writer};
use super::{ListenerEdit, PENDING_BYTES, Store, StoreError, StoreFuture, append_weight};
use crate::ids;

pub(crate) mod keys {
    pub const KEY_CHECK: &[u8] = b"m/keycheck";
    /// The event-hash key, sealed under the master key.
    pub const HASH_KEY: &[u8] = b"m/hashkey";
    /// The next event sequence number (a high-water mark that survives trimming the log).
    pub const NEXT_SEQ: &[u8] = b"m/next_seq";
    /// Events from this number on may be only in the journal (the last checkpoint).
    pub const JOURNAL_FROM: &[u8] = b"m/journal_from";
    pub const PRODUCERS: &[u8] = b"p/";
    pub const LISTENERS: &[u8] = b"l/";
    pub const EVENTS: &[u8] = b"e/";

    fn join(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    pub fn producer(id: &str) -> Vec<u8> {
        join(&[PRODUCERS, id.as_bytes()])
    }
    pub fn api_key(hash: &[u8]) -> Vec<u8> {
        join(&[b"k/", hash])
    }
    pub fn event_hash(hash: &str) -> Vec<u8> {
        join(&[b"h/", hash.as_bytes()])
    }
    pub fn listener(id: &str) -> Vec<u8> {
        join(&[LISTENERS, id.as_bytes()])
    }
    /// Prefix of the listeners of one (producer, event type).
    pub fn listeners_by_type(producer_id: &str, event_type: &str) -> Vec<u8> {
        join(&[b"lt/", producer_id.as_bytes(), b"/", event_type.as_bytes(), b"\0"])
    }
    /// Prefix of all listeners of one producer.
    pub fn listeners_by_producer(producer_id: &str) -> Vec<u8> {
        join(&[b"lp/", producer_id.as_bytes(), b"/"])
    }
    pub fn event(seq: u64) -> [u8; 10] {
        let mut key = [0u8; 10];
        key[..2].copy_from_slice(EVENTS);
        key[2..].copy_from_slice(&seq.to_be_bytes());
        key
    }
    /// Prefix of the `d/` keys of one event's deliveries (ids start with the event's position).
    pub fn deliveries_of_event(seq: u64) -> Vec<u8> {
        join(&[b"d/dlv_", crate::crypto::hex(&seq.to_be_bytes()).as_bytes()])
    }
    pub fn by_listener_prefix(listener_id: &str) -> Vec<u8> {
        join(&[b"dl/", listener_id.as_bytes(), b"/"])
    }
    pub fn idempotency(producer_id: &str, key: &str) -> Vec<u8> {
        join(&[b"i/", producer_id.as_bytes(), b"\0", key.as_bytes()])
    }
    pub const KEPT_KEYS: &[u8] = b"ik/";
    /// An idempotency record kept past its event, by the event's creation time.
    pub fn kept_key(created_ms: u64, producer_id: &str, key: &str) -> Vec<u8> {
        join(&[KEPT_KEYS, &created_ms.to_be_bytes(), producer_id.as_bytes(), b"\0", key.as_bytes()])
    }

    pub const FANOUT_CURSOR: &[u8] = b"c/fanout";
    pub const QUARANTINED: &[u8] = b"x/";
    pub const DETACHED: &[u8] = b"ld/";
    pub fn detached(listener_id: &str) -> Vec<u8> {
        join(&[DETACHED, listener_id.as_bytes()])
    }
    pub const OWING: &[u8] = b"lx/";
    pub fn owing(listener_id: &str) -> Vec<u8> {
        join(&[OWING, listener_id.as_bytes()])
    }
    pub fn quarantined(seq: u64) -> Vec<u8> {
        join(&[QUARANTINED, &seq.to_be_bytes()])
    }
    pub const DUE: &[u8] = b"q/";
    pub const PARKED: &[u8] = b"pk/";

    pub fn delivery(id: &str) -> Vec<u8> {
        join(&[b"d/", id.as_bytes()])
    }
    /// Queue entry: due time (big-endian, so keys sort by time), then the delivery id.
    pub fn due(due_ms: u64, delivery_id: &str) -> Vec<u8> {
        join(&[DUE, &due_ms.to_be_bytes(), delivery_id.as_bytes()])
    }
    pub fn parked_prefix(listener_id: &str) -> Vec<u8> {
        join(&[PARKED, listener_id.as_bytes(), b"/"])
    }
    pub fn parked(listener_id: &str, delivery_id: &str) -> Vec<u8> {
        join(&[&parked_prefix(listener_id), delivery_id.as_bytes()])
    }
    /// Prefix of the manual attempts queued for one delivery.
    pub fn manual_prefix(delivery_id: &str) -> Vec<u8> {
        join(&[b"mq/", delivery_id.as_bytes(), b"/"])
    }
    /// A manual attempt queued (or under way): retention keeps its delivery until it is done.
    pub fn manual(delivery_id: &str, due_ms: u64) -> Vec<u8> {
        join(&[&manual_prefix(delivery_id), &due_ms.to_be_bytes()])
    }
    pub fn pending_prefix(listener_id: &str) -> Vec<u8> {
        join(&[b"pl/", listener_id.as_bytes(), b"/"])
    }
    pub fn pending(listener_id: &str, delivery_id: &str) -> Vec<u8> {
        join(&[&pending_prefix(listener_id), delivery_id.as_bytes()])
    }
    pub fn by_listener(listener_id: &str, delivery_id: &str) -> Vec<u8> {
        join(&[b"dl/", listener_id.as_bytes(), b"/", delivery_id.as_bytes()])
    }
    pub fn attempts_prefix(delivery_id: &str) -> Vec<u8> {
        join(&[b"a/", delivery_id.as_bytes(), b"/"])
    }
    pub fn attempt(delivery_id: &str, number: u32) -> Vec<u8> {
        join(&[&attempts_prefix(delivery_id), &number.to_be_bytes()])
    }
    pub fn listener_health(listener_id: &str) -> Vec<u8> {
        join(&[b"lh/", listener_id.as_bytes()])
    }
}

/// The sled-backed [`Store`].
pub struct SledStore {
    db: sled::Db,
    /// Intake: producers, keys, hashes, listeners, the event log, idempotency records.
    pub(super) tree: Tree,
    /// The delivery pipeline's state, in its own database (see `sled_pipeline`).
    queue_db: sled::Db,
    pub(super) queue: Tree,
    jobs: Mutex<Option<JobSender>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// How far the intake's write line has got (see `writer`).
    pub(super) progress: Arc<Progress>,
    callers: Arc<Callers>,
    /// Serialises the history changes that read before they write (retention, recovery,
    /// manual attempts, replays), so one never deletes what another just revived.
    pub(super) history_lock: Mutex<()>,
    /// Serialises writes of producers, keys, hashes and listeners (see [`SledStore::write`]).
    admin_lock: Arc<Mutex<()>>,
    /// Makes the database's writes survive a power loss (see [`FileSystem`]).
    pub(super) filesystem: Arc<FileSystem>,
    /// Appends not yet in sled, weighed by [`append_weight`]: bounds intake memory whatever
    /// the payload limit and the number of callers, and how far sled may trail the journal.
    pending_bytes: Arc<Semaphore>,
    /// Moves on after every listener write is applied (see [`Store::listeners_generation`]).
    listeners_generation: Arc<std::sync::atomic::AtomicU64>,
}

/// sled's page cache, per database. sled counts nodes by their encoded size, less than they
/// take in memory: with a million pending deliveries hookd was 285-293 MB resident with
/// 32 MiB, 259-262 MB with 24 MiB, delivering as fast (bench, with mimalloc).
const CACHE_BYTES: u64 = 24 * 1024 * 1024;

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

/// The number that follows `prefix_len` bytes of `key` (big-endian).
pub(super) fn seq_of(key: &[u8], prefix_len: usize) -> Result<u64, StoreError> {
    let bytes: [u8; 8] =
        key.get(prefix_len..prefix_len + 8).and_then(|b| b.try_into().ok()).ok_or_else(|| corrupt(key))?;
    Ok(u64::from_be_bytes(bytes))
}

pub(super) fn corrupt(key: &[u8]) -> StoreError {
    StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned() }
}

pub(super) fn read<M: prost::Message + Default>(tree: &Tree, key: &[u8]) -> Result<Option<M>, StoreError> {
    match tree.get(key)? {
        Some(bytes) => decode(&bytes).map(Some).ok_or_else(|| corrupt(key)),
        None => Ok(None),
    }
}

/// The event at `seq` in the log; [`StoreError::DamagedEvent`] when its record does not decode.
pub(super) fn read_event(tree: &Tree, seq: u64) -> Result<Option<Event>, StoreError> {
    match tree.get(keys::event(seq))? {
        Some(bytes) => decode(&bytes).map(Some).ok_or(StoreError::DamagedEvent { seq }),
        None => Ok(None),
    }
}

/// The smallest key greater than every key that starts with `prefix`.
pub(super) fn prefix_end(prefix: &[u8]) -> Bound<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Bound::Excluded(end);
        }
    }
    Bound::Unbounded
}

/// Writes into sled again every journal record from the last checkpoint on (events
/// acknowledged before a stop, perhaps not yet in sled; writing one twice changes nothing),
/// and flushes, down to the disk (the journal's segments are deleted next: see
/// [`FileSystem`]). Returns the next sequence number and the newest creation time.
fn replay_journal(
    tree: &Tree,
    filesystem: &FileSystem,
    dir: &Path,
    next_seq: u64,
    last_created_ms: u64,
) -> Result<(u64, u64), StoreError> {
    let from = read_u64(tree, keys::JOURNAL_FROM)?.unwrap_or(0);
    let (mut next, mut last_created) = (next_seq, last_created_ms);
    let mut batch = Batch::default();
    let mut index = producer_index::Changes::default();
    let mut replayed = 0usize;
    journal::read_from(dir, from, |record| {
        let event: Event = decode(record)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "a journal record is not an event"))?;
        if event.seq >= from {
            writer::stage_records(&event, &mut batch, &mut index);
            next = next.max(event.seq + 1);
            last_created = last_created.max(event.created_at_ms);
            replayed += 1;
        }
        Ok(())
    })?;
    batch.insert(keys::NEXT_SEQ, &next.to_be_bytes());
    batch.insert(keys::JOURNAL_FROM, &next.to_be_bytes());
    index.write(tree, &mut batch)?;
    tree.apply_batch(batch)?;
    tree.flush()?;
    filesystem.sync_at_start()?;
    if replayed > 0 {
        tracing::info!(events = replayed, "wrote in the events of the journal's last checkpoint");
    }
    Ok((next, last_created))
}

fn read_u64(tree: &Tree, key: &[u8]) -> Result<Option<u64>, StoreError> {
    match tree.get(key)? {
        Some(bytes) => Ok(Some(u64::from_be_bytes(bytes.as_ref().try_into().map_err(|_| corrupt(key))?))),
        None => Ok(None),
    }
}

/// Keys under `prefix`, after `prefix ++ after` when given, at most `limit`.
fn scan_after(
    tree: &Tree,
    prefix: &[u8],
    after: Option<&str>,
    limit: usize,
) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), sled::Error>> {
    let start = match after {
        Some(after) => Bound::Excluded([prefix, after.as_bytes()].concat()),
        None => Bound::Included(prefix.to_vec()),
    };
    tree.range::<Vec<u8>, _>((start, prefix_end(prefix))).take(limit)
}

/// How long opening waits for a data directory locked by a database still closing.
const LOCK_WAIT: Duration = Duration::from_secs(5);
const LOCK_POLL: Duration = Duration::from_millis(20);

impl SledStore {
    /// Opens (or creates) the database under `dir` and starts its writer thread.
    pub fn open(dir: &Path) -> Result<Arc<Self>, StoreError> {
        let open = |name: &str| {
            let config = sled::Config::new()
                .path(dir.join(name))
                .mode(sled::Mode::HighThroughput)
                // sled's page cache defaults to 1 GiB; the hot set (queue heads, recent
                // events, listeners) is far smaller, and memory must stay flat under a backlog.
                .cache_capacity(CACHE_BYTES);
            // The directory's lock outlives a closed database for a moment (sled's I/O
            // threads finish their last writes), and a hookd restarted at once, or a second
            // one, finds it held: wait a little for it before giving up.
            let deadline = std::time::Instant::now() + LOCK_WAIT;
            loop {
                match config.open() {
                    Err(sled::Error::Io(error))
                        if error.to_string().contains("could not acquire lock")
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(LOCK_POLL);
                    }
                    opened => break opened,
                }
            }
        };
        let db = open("db")?;
        let tree = db.open_tree("hookd")?;
        let queue_db = open("queue")?;
        let queue = queue_db.open_tree("queue")?;
        let after_last_event = match tree.scan_prefix(keys::EVENTS).next_back() {
            Some(entry) => {
                let (key, value) = entry?;
                // A hookd started on the data of a newer one (rolled back) stops here rather
                // than take newer records for damaged ones.
                if decode::<Event>(&value).is_none() && super::model::written_by_newer(&value) {
                    return Err(corrupt(&key));
                }
                seq_of(&key, keys::EVENTS.len())? + 1
            }
            None => 0,
        };
        // From the newest record that decodes: a damaged one has no time.
        let mut last_created_ms = 0;
        for value in tree.scan_prefix(keys::EVENTS).values().rev() {
            if let Some(last) = decode::<Event>(&value?) {
                last_created_ms = last.created_at_ms;
                break;
            }
        }
        let high_water = read_u64(&tree, keys::NEXT_SEQ)?.unwrap_or(0);
        let sled_next_seq = after_last_event.max(high_water);
        let migrated = producer_index::migrate_legacy(&tree)?;
        if migrated > 0 {
            tracing::info!(records = migrated, "converted the per-event producer index into bitmaps");
        }
        let journal_dir = dir.join("journal");
        // Opened now, so that it reports any failed write-back of the database from here on.
        let filesystem = Arc::new(FileSystem::open(&dir.join("db"), &dir.join("queue"))?);
        let (next_seq, last_created_ms) =
            replay_journal(&tree, &filesystem, &journal_dir, sled_next_seq, last_created_ms)?;
        let journal = Journal::start(&journal_dir, next_seq, journal::SEGMENT_BYTES)?;
        let progress = Progress::new(next_seq);
        let callers = Arc::new(Callers::default());
        let (jobs_tx, jobs_rx) = mpsc::channel(writer::QUEUE_CAPACITY);
        let writer = Writer::new(
            tree.clone(),
            jobs_rx,
            (journal, filesystem.clone()),
            (next_seq, last_created_ms),
            progress.clone(),
            callers.clone(),
        );
        let handle = std::thread::Builder::new().name("hookd-writer".into()).spawn(move || writer.run())?;
        Ok(Arc::new(Self {
            db,
            tree,
            queue_db,
            queue,
            jobs: Mutex::new(Some(jobs_tx)),
            writer: Mutex::new(Some(handle)),
            progress,
            callers,
            pending_bytes: Arc::new(Semaphore::new(PENDING_BYTES as usize)),
            history_lock: Mutex::new(()),
            admin_lock: Arc::default(),
            filesystem,
            listeners_generation: Arc::default(),
        }))
    }

    fn sender(&self) -> Result<JobSender, StoreError> {
        self.jobs.lock().expect("writer sender lock is never poisoned").clone().ok_or_else(|| self.progress.stopped())
    }

    /// Runs a read-modify-write of producers, keys, hashes or listeners, and resolves once it
    /// is flushed: off the intake's line, so no trigger waits behind it, and one at a time.
    /// `apply` gets where acknowledged events end ([`Progress::point`]). With `fence`, fan-out
    /// is held back from every event from there on until `apply` has written (a listener's
    /// registration or disabling point must be in place before fan-out reaches it). Once
    /// written, cached callers are forgotten and the intake group under way is waited for, so
    /// every trigger answered after this returns was checked against the new state.
    fn write<T, F>(&self, fence: bool, apply: F) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(&Tree, u64) -> Result<T, StoreError> + Send + 'static,
    {
        let (tree, progress, callers, serial) =
            (self.tree.clone(), self.progress.clone(), self.callers.clone(), self.admin_lock.clone());
        let filesystem = self.filesystem.clone();
        let closed = self.jobs.lock().expect("writer sender lock is never poisoned").is_none();
        Box::pin(async move {
            if closed {
                return Err(StoreError::Closed);
            }
            crate::blocking(move || {
                let _serial = serial.lock().expect("the admin write lock is never poisoned");
                let result = if fence {
                    let fence = progress.fence();
                    apply(&tree, fence.next_seq)
                } else {
                    apply(&tree, progress.point())
                };
                // On disk before the answer, a power loss included (sled's flush alone is not).
                let flushed = tree.flush().map_err(StoreError::from).and_then(|_| Ok(filesystem.sync()?));
                callers.forget_all();
                progress.wait_for_groups();
                flushed?;
                result
            })
            .await
        })
    }
}

#[cfg(test)]
impl SledStore {
    /// Overwrites the log's record of event `seq` with bytes that do not decode.
    pub(crate) fn damage_event(&self, seq: u64) {
        self.tree.insert(keys::event(seq), &b"\x01not an event"[..]).unwrap();
    }

    /// The events put aside, by number.
    pub(crate) fn quarantined(&self) -> Vec<u64> {
        self.queue
            .scan_prefix(keys::QUARANTINED)
            .keys()
            .map(|key| u64::from_be_bytes(key.unwrap()[keys::QUARANTINED.len()..].try_into().unwrap()))
            .collect()
    }
}

impl Store for SledStore {
    fn observe_syncs(&self, histogram: prometheus_client::metrics::histogram::Histogram) {
        let _ = self.progress.sync_seconds.set(histogram);
    }

    /// Held back while a listener is being written (see `Progress::fence`).
    fn durable_seq(&self) -> watch::Receiver<u64> {
        self.progress.fanout_end_watch()
    }

    fn check_master_key(&self, accepted: &[(String, [u8; 32])]) -> Result<(), StoreError> {
        let (key_id, check) = accepted.first().expect("a master key is configured");
        let first = super::key_check_value(key_id, check);
        match self.tree.compare_and_swap(keys::KEY_CHECK, None as Option<&[u8]>, Some(first))? {
            Ok(()) => {
                self.tree.flush()?;
                self.filesystem.sync()?;
                Ok(())
            }
            Err(existing) => super::match_master_key(existing.current.as_deref().unwrap_or_default(), accepted),
        }
    }

    fn set_master_key(&self, key_id: &str, check: &[u8; 32]) -> Result<(), StoreError> {
        self.tree.insert(keys::KEY_CHECK, super::key_check_value(key_id, check))?;
        self.tree.flush()?;
        self.filesystem.sync()?;
        Ok(())
    }

    fn sealed_hash_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(keys::HASH_KEY)?.map(|value| value.to_vec()))
    }

    fn set_sealed_hash_key(&self, sealed: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(keys::HASH_KEY, sealed)?;
        self.tree.flush()?;
        self.filesystem.sync()?;
        Ok(())
    }

    fn create_producer(&self, producer: Producer, key_hash: [u8; 32]) -> StoreFuture<()> {
        self.write(false, move |tree, _| {
            let mut batch = Batch::default();
            let entry = ApiKeyEntry { producer_id: producer.id.clone(), expires_at_ms: 0 };
            batch.insert(keys::api_key(&key_hash), encode(&entry));
            batch.insert(keys::producer(&producer.id), encode(&producer));
            Ok(tree.apply_batch(batch)?)
        })
    }

    fn producer(&self, producer_id: &str) -> Result<Option<Producer>, StoreError> {
        read(&self.tree, &keys::producer(producer_id))
    }

    fn list_producers(&self, after: Option<&str>, limit: usize) -> Result<Vec<Producer>, StoreError> {
        scan_after(&self.tree, keys::PRODUCERS, after, limit)
            .map(|entry| {
                let (key, value) = entry?;
                decode(&value).ok_or_else(|| corrupt(&key))
            })
            .collect()
    }

    fn producer_by_key(&self, key_hash: &[u8; 32], now_ms: u64) -> Result<Option<Producer>, StoreError> {
        // From memory after the first call: authentication reads no sled per trigger.
        let Some(caller) = self.callers.get(&self.tree, key_hash)? else {
            return Ok(None);
        };
        Ok(caller.producer.filter(|_| caller.key.valid_at(now_ms)))
    }

    fn rotate_producer_key(
        &self,
        producer_id: &str,
        new_key_hash: [u8; 32],
        now_ms: u64,
        grace_ms: u64,
    ) -> StoreFuture<bool> {
        let producer_id = producer_id.to_owned();
        self.write(false, move |tree, _| {
            let Some(mut producer) = read::<Producer>(tree, &keys::producer(&producer_id))? else {
                return Ok(false);
            };
            let mut batch = Batch::default();
            let mut kept = Vec::new();
            for old in producer.key_hashes.drain(..) {
                let key = keys::api_key(&old);
                match read::<ApiKeyEntry>(tree, &key)? {
                    Some(mut entry) if grace_ms > 0 && entry.valid_at(now_ms) => {
                        // A key already expiring sooner keeps its earlier end.
                        let end = now_ms.saturating_add(grace_ms);
                        entry.expires_at_ms = if entry.expires_at_ms == 0 { end } else { entry.expires_at_ms.min(end) };
                        batch.insert(key, encode(&entry));
                        kept.push(old);
                    }
                    _ => batch.remove(key),
                }
            }
            let entry = ApiKeyEntry { producer_id: producer_id.clone(), expires_at_ms: 0 };
            batch.insert(keys::api_key(&new_key_hash), encode(&entry));
            kept.push(new_key_hash.to_vec());
            producer.key_hashes = kept;
            batch.insert(keys::producer(&producer_id), encode(&producer));
            tree.apply_batch(batch)?;
            Ok(true)
        })
    }

    fn set_producer_enabled(&self, producer_id: &str, enabled: bool, reason: String) -> StoreFuture<Option<Producer>> {
        let producer_id = producer_id.to_owned();
        self.write(false, move |tree, _| {
            let key = keys::producer(&producer_id);
            let Some(mut producer) = read::<Producer>(tree, &key)? else {
                return Ok(None);
            };
            producer.enabled = enabled;
            producer.disabled_reason = if enabled { String::new() } else { reason };
            tree.insert(key, encode(&producer))?;
            Ok(Some(producer))
        })
    }

    fn put_event_hash(&self, event_hash: &str, entry: EventHashEntry) -> StoreFuture<()> {
        let key = keys::event_hash(event_hash);
        self.write(false, move |tree, _| {
            tree.insert(key, encode(&entry))?;
            Ok(())
        })
    }

    fn event_hash(&self, event_hash: &str) -> Result<Option<EventHashEntry>, StoreError> {
        read(&self.tree, &keys::event_hash(event_hash))
    }

    fn insert_listener(&self, mut listener: Listener) -> StoreFuture<()> {
        let generation = self.listeners_generation.clone();
        self.write(true, move |tree, next_seq| {
            listener.enabled_from_seq = next_seq;
            let mut batch = Batch::default();
            index_listener(&mut batch, &listener, true);
            batch.insert(keys::listener(&listener.id), encode(&listener));
            tree.apply_batch(batch)?;
            generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            Ok(())
        })
    }

    fn listeners_generation(&self) -> u64 {
        self.listeners_generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn listener(&self, listener_id: &str) -> Result<Option<Listener>, StoreError> {
        read(&self.tree, &keys::listener(listener_id))
    }

    fn list_listeners(
        &self,
        producer_id: &str,
        event_type: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Listener>, StoreError> {
        let prefix = match event_type {
            Some(event_type) => keys::listeners_by_type(producer_id, event_type),
            None => keys::listeners_by_producer(producer_id),
        };
        let mut listeners = Vec::with_capacity(limit.min(1024));
        for entry in scan_after(&self.tree, &prefix, after, limit) {
            let (key, _) = entry?;
            let id = std::str::from_utf8(&key[prefix.len()..]).map_err(|_| corrupt(&key))?;
            // The index and the record change in one batch, so a missing record is corruption.
            listeners.push(self.listener(id)?.ok_or_else(|| corrupt(&key))?);
        }
        Ok(listeners)
    }

    fn update_listener(&self, listener_id: &str, edit: ListenerEdit) -> StoreFuture<Option<Listener>> {
        let key = keys::listener(listener_id);
        let (queue, filesystem) = (self.queue.clone(), self.filesystem.clone());
        let generation = self.listeners_generation.clone();
        self.write(true, move |tree, next_seq| {
            let Some(mut listener) = read::<Listener>(tree, &key)? else {
                return Ok(None);
            };
            let was_enabled = listener.enabled;
            edit(&mut listener);
            // Ranges are pruned only behind the fan-out cursor on disk (after a crash fan-out
            // redoes from there): so this writer thread, which intake shares, flushes the
            // queue database only when the list is full.
            let fanout_next_seq = if !was_enabled && listener.enabled && listener.reenabling_prunes() {
                queue.flush()?;
                filesystem.sync()?;
                let cursor = read::<FanoutCursor>(&queue, keys::FANOUT_CURSOR)?.unwrap_or_default().next_seq;
                // A listener fanned out apart still reads from where it stands.
                match queue.get(keys::detached(&listener.id))? {
                    Some(bytes) => cursor.min(u64::from_be_bytes(
                        bytes.as_ref().try_into().map_err(|_| corrupt(&keys::detached(&listener.id)))?,
                    )),
                    None => cursor,
                }
            } else {
                0
            };
            listener.edited(was_enabled, next_seq, fanout_next_seq);
            tree.insert(key, encode(&listener))?;
            generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            Ok(Some(listener))
        })
    }

    fn delete_listener(&self, listener_id: &str) -> StoreFuture<Option<DeletedListener>> {
        let key = keys::listener(listener_id);
        let generation = self.listeners_generation.clone();
        let (queue, filesystem) = (self.queue.clone(), self.filesystem.clone());
        // Behind the fence, like disabling: no event numbered from the deletion point on is
        // fanned out before the removal can be read, so none reaches the deleted listener.
        self.write(true, move |tree, next_seq| {
            let Some(listener) = read::<Listener>(tree, &key)? else {
                return Ok(None);
            };
            // Read before the removal: fan-out has handed out its pairs up to here at least,
            // except those it left in the log for the listener to read back itself.
            let cursor: FanoutCursor = read(&queue, keys::FANOUT_CURSOR)?.unwrap_or_default();
            let detached = queue.get(keys::detached(&listener.id))?.and_then(|since| since.as_ref().try_into().ok());
            let unsure_from_seq =
                detached.map_or(cursor.next_seq, |since| cursor.next_seq.min(u64::from_be_bytes(since)));
            let ended = listener.clone().deleted_at(next_seq);
            // What it was owed is cancelled from here, even after a crash: the record is on
            // disk before the removal (one left for a listener that still exists, should the
            // removal not happen, is dropped at the next start). It keeps which events were
            // the listener's, no copy of its secrets.
            let kept = ended.without_secrets();
            queue.insert(keys::owing(&listener.id), [&unsure_from_seq.to_be_bytes()[..], &encode(&kept)].concat())?;
            queue.flush()?;
            filesystem.sync()?;
            let mut batch = Batch::default();
            index_listener(&mut batch, &listener, false);
            batch.remove(key);
            tree.apply_batch(batch)?;
            generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            let listener = ended;
            Ok(Some(DeletedListener { listener, unsure_from_seq }))
        })
    }

    fn append_event(&self, event: NewEvent) -> StoreFuture<Appended> {
        let sender = self.sender();
        let pending_bytes = self.pending_bytes.clone();
        let progress = self.progress.clone();
        let weight = append_weight(event.payload.len());
        Box::pin(async move {
            if let Some(cause) = progress.failure() {
                return Err(StoreError::Failed(cause));
            }
            let sender = sender?;
            // Room is waited for with the writer's failure in view: a line that stopped frees
            // no more room, and its callers must hear why rather than wait.
            let mut failure = progress.failure_watch();
            let permit = tokio::select! {
                permit = pending_bytes.acquire_many_owned(weight) => permit.map_err(|_| progress.stopped())?,
                _ = failure.wait_for(Option::is_some) => return Err(progress.stopped()),
            };
            let (reply, answer) = oneshot::channel();
            sender.send(Job::Append { event, permit, reply }).await.map_err(|_| progress.stopped())?;
            answer.await.map_err(|_| progress.stopped())?
        })
    }

    fn settled(&self) -> StoreFuture<()> {
        let progress = self.progress.clone();
        Box::pin(async move { progress.settled().await })
    }

    fn failure(&self) -> watch::Receiver<Option<Arc<str>>> {
        self.progress.failure_watch()
    }

    fn event(&self, event_id: &str) -> Result<Option<Event>, StoreError> {
        let Some(seq) = ids::event_seq(event_id) else {
            return Ok(None);
        };
        if self.progress.in_flight(seq) {
            // Acknowledged, on its way into sled: the caller waits with `settled` first.
            return Err(self.progress.failure().map_or(StoreError::Behind, StoreError::Failed));
        }
        let event = read_event(&self.tree, seq)?;
        // The random half of the id must match too: ids cannot be enumerated.
        Ok(event.filter(|event| event.id == event_id))
    }

    fn close(&self) -> Result<(), StoreError> {
        // Dropping the last sender lets the writer finish its queue, flush and exit.
        drop(self.jobs.lock().expect("writer sender lock is never poisoned").take());
        if let Some(handle) = self.writer.lock().expect("writer handle lock is never poisoned").take()
            && handle.join().is_err()
        {
            tracing::error!("the database writer thread panicked");
        }
        self.db.flush()?;
        self.queue_db.flush()?;
        Ok(())
    }
}

/// Adds (or removes) the index entries of a listener.
fn index_listener(batch: &mut Batch, listener: &Listener, add: bool) {
    let by_type =
        [keys::listeners_by_type(&listener.producer_id, &listener.event_type), listener.id.clone().into_bytes()]
            .concat();
    let by_producer = [keys::listeners_by_producer(&listener.producer_id), listener.id.clone().into_bytes()].concat();
    for key in [by_type, by_producer] {
        if add {
            batch.insert(key, &[] as &[u8]);
        } else {
            batch.remove(key);
        }
    }
}

#[cfg(test)]
#[path = "sled_store_tests.rs"]
mod tests;
