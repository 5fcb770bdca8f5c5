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

use super::StoreError;
use super::model::{Appended, Event, IdempotencyEntry, NewEvent, decode, encode};
use super::sled_store::keys;
use crate::ids;

/// How long an idempotency key maps to its first event.
pub(crate) const IDEMPOTENCY_WINDOW_MS: u64 = 24 * 60 * 60 * 1000;
/// Most jobs committed under one flush; bounds the latency a group adds to its first job.
const MAX_GROUP: usize = 4096;
/// Jobs waiting for the writer before senders wait (backpressure, bounded memory).
pub(crate) const QUEUE_CAPACITY: usize = 8192;

/// Runs after the group's flush with its outcome.
pub(crate) type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// A read-modify-write applied by the writer; returns what to do once the flush is known.
pub(crate) type WriteFn = Box<dyn FnOnce(&Tree) -> Completion + Send>;

pub(crate) enum Job {
    Append { event: NewEvent, reply: oneshot::Sender<Result<Appended, StoreError>> },
    Write(WriteFn),
}

pub(crate) type JobSender = mpsc::Sender<Job>;

/// State the writer keeps between groups.
pub(crate) struct Writer {
    tree: Tree,
    jobs: mpsc::Receiver<Job>,
    next_seq: u64,
    /// The highest event sequence number known durable; fan-out follows it.
    durable_seq: watch::Sender<u64>,
}

impl Writer {
    pub(crate) fn new(tree: Tree, jobs: mpsc::Receiver<Job>, next_seq: u64, durable_seq: watch::Sender<u64>) -> Self {
        Self { tree, jobs, next_seq, durable_seq }
    }

    /// Serves jobs until every sender is gone, then flushes one last time.
    pub(crate) fn run(mut self) {
        let mut group = Vec::with_capacity(64);
        while let Some(first) = self.jobs.blocking_recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match self.jobs.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            self.commit(&mut group);
        }
        if let Err(error) = self.tree.flush() {
            tracing::error!(%error, "final flush of the database failed");
        }
    }

    fn commit(&mut self, group: &mut Vec<Job>) {
        let mut batch = Batch::default();
        let mut batch_len = 0usize;
        let mut completions: Vec<Completion> = Vec::with_capacity(group.len());
        // Idempotency keys claimed earlier in this same group, not yet in the tree.
        let mut claimed: HashMap<Vec<u8>, String> = HashMap::new();
        let mut failure: Option<StoreError> = None;
        let mut appended_seq = None;

        for job in group.drain(..) {
            match job {
                Job::Append { event, reply } => {
                    let answer = self.stage_append(event, &mut batch, &mut claimed);
                    match answer {
                        Ok((appended, seq)) => {
                            if seq.is_some() {
                                batch_len += 1;
                                appended_seq = seq;
                            }
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
                    // Earlier appends go first, so a write sees the state before it.
                    if batch_len > 0 {
                        if let Err(error) = self.tree.apply_batch(std::mem::take(&mut batch)) {
                            failure.get_or_insert(error.into());
                        }
                        batch_len = 0;
                    }
                    completions.push(write(&self.tree));
                }
            }
        }
        if batch_len > 0
            && let Err(error) = self.tree.apply_batch(batch)
        {
            failure.get_or_insert(error.into());
        }
        let outcome = match failure {
            Some(error) => Err(error),
            None => self.tree.flush().map(|_| ()).map_err(StoreError::from),
        };
        if let Err(error) = &outcome {
            tracing::error!(%error, jobs = completions.len(), "group commit failed");
        } else if let Some(seq) = appended_seq {
            self.durable_seq.send_replace(seq);
        }
        for completion in completions {
            completion(outcome.clone());
        }
    }

    /// Adds one event (and its idempotency record) to the batch, or finds its duplicate.
    /// Returns the answer and, for a new event, its sequence number.
    fn stage_append(
        &mut self,
        event: NewEvent,
        batch: &mut Batch,
        claimed: &mut HashMap<Vec<u8>, String>,
    ) -> Result<(Appended, Option<u64>), StoreError> {
        let idempotency = event.idempotency_key.as_deref().map(|key| keys::idempotency(&event.producer_id, key));
        if let Some(idem_key) = &idempotency {
            if let Some(event_id) = claimed.get(idem_key) {
                return Ok((Appended { event_id: event_id.clone(), duplicate: true }, None));
            }
            if let Some(bytes) = self.tree.get(idem_key)? {
                let entry: IdempotencyEntry = decode(&bytes)
                    .ok_or_else(|| StoreError::Corrupt { key: String::from_utf8_lossy(idem_key).into() })?;
                if event.created_at_ms < entry.created_at_ms.saturating_add(IDEMPOTENCY_WINDOW_MS) {
                    return Ok((Appended { event_id: entry.event_id, duplicate: true }, None));
                }
            }
        }

        let seq = self.next_seq;
        self.next_seq += 1;
        let event_id = ids::event_id(seq);
        if let Some(idem_key) = idempotency {
            let entry = IdempotencyEntry { event_id: event_id.clone(), created_at_ms: event.created_at_ms };
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
            created_at_ms: event.created_at_ms,
            idempotency_key: event.idempotency_key.unwrap_or_default(),
        };
        batch.insert(keys::event(seq).to_vec(), encode(&record));
        Ok((Appended { event_id, duplicate: false }, Some(seq)))
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
