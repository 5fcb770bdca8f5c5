//! The group-commit writer: one OS thread that owns every durable write to the sled tree.
//!
//! It takes whatever jobs are waiting, applies them in arrival order (event appends merged
//! into one `Batch`), flushes once, and only then answers every caller of the group. Being
//! the only writer makes read-modify-write jobs and sequence numbers race-free without sled
//! transactions (which cost 4–5× plain writes here), and one flush per group instead of one per
//! caller is what keeps the trigger path fast. It never awaits `flush_async` (it hung under
//! concurrent callers here) and never runs on the async threads.

use sled::{Batch, Tree};
use std::collections::HashMap;
use tokio::sync::{mpsc, oneshot, watch};

use super::model::{ApiKeyEntry, Appended, Event, IdempotencyEntry, NewEvent, Producer, decode, encode};
use super::sled_store::{keys, read};
use super::{Refusal, StoreError};
use crate::ids;

/// How long an idempotency key maps to its first event.
pub(crate) const IDEMPOTENCY_WINDOW_MS: u64 = 24 * 60 * 60 * 1000;
/// Most jobs committed under one flush; bounds the latency a group adds to its first job.
const MAX_GROUP: usize = 4096;
/// Most payload bytes committed under one flush, so one group's batch stays small.
const MAX_GROUP_BYTES: usize = 32 * 1024 * 1024;
/// Jobs waiting for the writer before senders wait (backpressure).
pub(crate) const QUEUE_CAPACITY: usize = 8192;

/// Runs after the group's flush with its outcome.
pub(crate) type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// A read-modify-write applied by the writer; returns what to do once the flush is known.
pub(crate) type WriteFn = Box<dyn FnOnce(&Tree) -> Completion + Send>;

pub(crate) enum Job {
    Append { event: NewEvent, reply: oneshot::Sender<Result<Appended, StoreError>> },
    Write(WriteFn),
}

impl Job {
    fn bytes(&self) -> usize {
        match self {
            Job::Append { event, .. } => event.payload.len(),
            Job::Write(_) => 0,
        }
    }
}

pub(crate) type JobSender = mpsc::Sender<Job>;

/// Applied groups waiting for the flusher before the writer waits too.
const FLUSHES_IN_FLIGHT: usize = 64;

/// An applied group: answered once a flush that began after it is done.
struct Flush {
    completions: Vec<Completion>,
    /// The next sequence number after the group: what is durable once it is flushed.
    next_seq: u64,
}

/// Flushes whatever groups have been applied, then answers them; stops on a failed flush.
fn flush_loop(tree: &Tree, durable_seq: &watch::Sender<u64>, groups: &std::sync::mpsc::Receiver<Flush>) {
    while let Ok(first) = groups.recv() {
        let mut waiting = vec![first];
        waiting.extend(groups.try_iter());
        let outcome = tree.flush().map(|_| ()).map_err(StoreError::from);
        if outcome.is_ok() {
            let next_seq = waiting.iter().map(|group| group.next_seq).max().unwrap_or(0);
            if next_seq > *durable_seq.borrow() {
                durable_seq.send_replace(next_seq);
            }
        }
        for group in waiting {
            for completion in group.completions {
                completion(outcome.clone());
            }
        }
        if let Err(error) = outcome {
            tracing::error!(error = &error as &dyn std::error::Error, "database flush failed; the writer stops");
            return;
        }
    }
    // Every sender is gone: one last flush for whatever was applied without an answer.
    if let Err(error) = tree.flush() {
        tracing::error!(%error, "final flush of the database failed");
    }
}

/// State the writer keeps between groups.
pub(crate) struct Writer {
    tree: Tree,
    jobs: mpsc::Receiver<Job>,
    next_seq: u64,
    /// Creation time of the newest event.
    last_created_ms: u64,
    /// How many sequence numbers are used and durable (the next event's number); fan-out
    /// follows it.
    durable_seq: watch::Sender<u64>,
}

impl Writer {
    pub(crate) fn new(
        tree: Tree,
        jobs: mpsc::Receiver<Job>,
        next_seq: u64,
        last_created_ms: u64,
        durable_seq: watch::Sender<u64>,
    ) -> Self {
        Self { tree, jobs, next_seq, last_created_ms, durable_seq }
    }

    /// Serves jobs until every sender is gone, then flushes one last time.
    ///
    /// Applying and flushing overlap: this thread applies a group and hands its answers to
    /// the flusher thread, then applies the next group while the flusher's flush (which covers
    /// every group applied before it began) is under way; the flusher answers the groups once
    /// their flush is done. A group that fails to apply or flush stops the writer: its callers
    /// get the error, later ones find the store closed (UNAVAILABLE) rather than writes that
    /// may or may not be on disk.
    pub(crate) fn run(mut self) {
        let (flushes, flusher_jobs) = std::sync::mpsc::sync_channel::<Flush>(FLUSHES_IN_FLIGHT);
        let flusher = {
            let (tree, durable_seq) = (self.tree.clone(), self.durable_seq.clone());
            std::thread::Builder::new()
                .name("hookd-flusher".into())
                .spawn(move || flush_loop(&tree, &durable_seq, &flusher_jobs))
                .expect("the flusher thread starts")
        };
        let mut group = Vec::with_capacity(64);
        while let Some(first) = self.jobs.blocking_recv() {
            let mut bytes = first.bytes();
            group.push(first);
            while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
                match self.jobs.try_recv() {
                    Ok(job) => {
                        bytes += job.bytes();
                        group.push(job);
                    }
                    Err(_) => break,
                }
            }
            let Some(flush) = self.commit(&mut group) else {
                break;
            };
            if flushes.send(flush).is_err() {
                // The flusher stopped on a failed flush.
                break;
            }
        }
        drop(flushes);
        if flusher.join().is_err() {
            tracing::error!("the database flusher thread panicked");
        }
    }

    /// Applies a group; returns what its flush must answer, or `None` (after answering the
    /// group with the error) when applying failed.
    fn commit(&mut self, group: &mut Vec<Job>) -> Option<Flush> {
        let mut batch = Batch::default();
        let mut staged = 0usize;
        let mut completions: Vec<Completion> = Vec::with_capacity(group.len());
        // Idempotency keys claimed earlier in this same group, not yet in the tree.
        let mut claimed: HashMap<Vec<u8>, String> = HashMap::new();
        // Callers already checked in this group (a stream sends many triggers with one key).
        let mut checked: HashMap<(String, [u8; 32]), Result<(), StoreError>> = HashMap::new();
        let mut failure: Option<StoreError> = None;

        for job in group.drain(..) {
            if let Some(error) = &failure {
                // Nothing more is applied after a failure.
                answer_unapplied(job, error.clone());
                continue;
            }
            match job {
                Job::Append { event, reply } => {
                    match self.stage_append(event, &mut batch, &mut claimed, &mut checked) {
                        Ok((appended, new)) => {
                            staged += usize::from(new);
                            completions.push(Box::new(move |flushed| {
                                let _ = reply.send(flushed.map(|()| appended));
                            }));
                        }
                        Err(error) => {
                            let _ = reply.send(Err(error));
                        }
                    }
                }
                Job::Write(write) => {
                    // A write may disable a producer or revoke a key: check callers afresh.
                    checked.clear();
                    // Earlier appends go first, so a write sees the state before it.
                    if staged > 0 {
                        if let Err(error) = self.apply(std::mem::take(&mut batch)) {
                            failure = Some(error);
                            drop(write);
                            continue;
                        }
                        staged = 0;
                    }
                    // A panicking edit fails its own caller, not the writer.
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(&self.tree))) {
                        Ok(completion) => completions.push(completion),
                        Err(_) => tracing::error!("a database write job panicked; its caller gets an error"),
                    }
                }
            }
        }
        if staged > 0
            && failure.is_none()
            && let Err(error) = self.apply(batch)
        {
            failure = Some(error);
        }
        if let Some(error) = failure {
            tracing::error!(error = &error as &dyn std::error::Error, "database write failed; the writer stops");
            for completion in completions {
                completion(Err(error.clone()));
            }
            return None;
        }
        Some(Flush { completions, next_seq: self.next_seq })
    }

    /// Applies the staged appends together with the sequence high-water mark, so numbers are
    /// never reused even after old events are trimmed.
    fn apply(&self, mut batch: Batch) -> Result<(), StoreError> {
        batch.insert(keys::NEXT_SEQ, &self.next_seq.to_be_bytes());
        Ok(self.tree.apply_batch(batch)?)
    }

    /// Adds one event (and its idempotency record) to the batch, or finds its duplicate.
    /// Returns the answer and whether a new event was staged.
    ///
    /// The caller's key and its producer are checked again here, where writes are serial:
    /// a trigger authorised just before its producer was disabled (or its key rotated away)
    /// is refused rather than acknowledged after the admin call returned.
    fn stage_append(
        &mut self,
        event: NewEvent,
        batch: &mut Batch,
        claimed: &mut HashMap<Vec<u8>, String>,
        checked: &mut HashMap<(String, [u8; 32]), Result<(), StoreError>>,
    ) -> Result<(Appended, bool), StoreError> {
        let caller = (event.producer_id.clone(), event.key_hash);
        match checked.get(&caller) {
            Some(verdict) => verdict.clone()?,
            None => {
                let verdict = self.check_caller(&event);
                checked.insert(caller, verdict.clone());
                verdict?;
            }
        }
        let idempotency = event.idempotency_key.as_deref().map(|key| keys::idempotency(&event.producer_id, key));
        if let Some(idem_key) = &idempotency {
            if let Some(event_id) = claimed.get(idem_key) {
                return Ok((Appended { event_id: event_id.clone(), duplicate: true }, false));
            }
            if let Some(bytes) = self.tree.get(idem_key)? {
                let entry: IdempotencyEntry = decode(&bytes)
                    .ok_or_else(|| StoreError::Corrupt { key: String::from_utf8_lossy(idem_key).into() })?;
                if event.created_at_ms < entry.created_at_ms.saturating_add(IDEMPOTENCY_WINDOW_MS) {
                    return Ok((Appended { event_id: entry.event_id, duplicate: true }, false));
                }
            }
        }

        let seq = self.next_seq;
        self.next_seq += 1;
        // Creation times never go backwards along the log, so time windows map to log ranges.
        self.last_created_ms = self.last_created_ms.max(event.created_at_ms);
        let event_id = ids::event_id(seq);
        if let Some(idem_key) = idempotency {
            let entry = IdempotencyEntry { event_id: event_id.clone(), created_at_ms: self.last_created_ms };
            batch.insert(idem_key.clone(), encode(&entry));
            claimed.insert(idem_key, event_id.clone());
        }
        let record = Event {
            id: event_id.clone(),
            seq,
            producer_id: event.producer_id,
            event_type: event.event_type,
            payload: event.payload,
            content_type: event.content_type,
            created_at_ms: self.last_created_ms,
            idempotency_key: event.idempotency_key.unwrap_or_default(),
        };
        batch.insert(keys::event_of_producer(&record.producer_id, seq), &[] as &[u8]);
        batch.insert(keys::event(seq).to_vec(), encode(&record));
        Ok((Appended { event_id, duplicate: false }, true))
    }

    fn check_caller(&self, event: &NewEvent) -> Result<(), StoreError> {
        let key = keys::api_key(&event.key_hash);
        let entry: Option<ApiKeyEntry> = read(&self.tree, &key)?;
        if !entry.is_some_and(|entry| entry.producer_id == event.producer_id && entry.valid_at(event.created_at_ms)) {
            return Err(StoreError::Refused(Refusal::KeyRevoked));
        }
        let producer: Option<Producer> = read(&self.tree, &keys::producer(&event.producer_id))?;
        match producer {
            Some(producer) if producer.enabled => Ok(()),
            Some(producer) => Err(StoreError::Refused(Refusal::ProducerDisabled(producer.disabled_reason))),
            None => Err(StoreError::Refused(Refusal::KeyRevoked)),
        }
    }
}

/// Answers a job of a group that failed before the job was applied.
fn answer_unapplied(job: Job, error: StoreError) {
    match job {
        Job::Append { reply, .. } => {
            let _ = reply.send(Err(error));
        }
        // Dropping a write unapplied drops its reply sender: the caller sees the store closed.
        Job::Write(write) => drop(write),
    }
}

/// Sends a read-modify-write to the writer and waits until its group is durable.
pub(crate) async fn write<T, F>(jobs: &JobSender, apply: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Tree) -> Result<T, StoreError> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    let job: WriteFn = Box::new(move |tree| {
        let result = apply(tree);
        Box::new(move |flushed| {
            let _ = reply.send(flushed.and(result));
        })
    });
    jobs.send(Job::Write(job)).await.map_err(|_| StoreError::Closed)?;
    answer.await.map_err(|_| StoreError::Closed)?
}
