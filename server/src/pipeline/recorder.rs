//! The recorder: writes finished attempts to the store in groups, on a thread of its own.
//!
//! sled writes its log buffer out twice at every batch (a disk write and a range sync each), so
//! a batch per attempt costs disk writes per attempt, and every batch also stops all other sled
//! calls while it applies. The recorder gathers the attempts that finish while it writes the
//! previous group, and those that finish within a short linger, and writes them as one batch:
//! each attempt's own writes still land together, atomically. A worker waits until its attempt
//! is written before it reports back, so the dispatcher never takes a finished entry for one
//! still to do. Attempts waiting to be written are bounded: a worker reserves room before its
//! listener's slot is freed, so a slow store slows dispatch instead of piling up attempts in
//! memory. The recorder never decides anything: it writes what it is given, in order.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit, oneshot};
use tokio_util::sync::CancellationToken;

use crate::store::{Completion, PipelineStore, StoreError};

/// Most attempts written in one batch.
pub const MAX_GROUP: usize = 256;
/// How long a group waits to fill while nobody waits on it. Listeners' slots are freed
/// before their attempts are recorded, so the linger never holds up a listener's next
/// request; it delays what follows the record: watchers hearing of the attempt, the
/// dispatcher learning of a retry or of the delivery's end, and the listener's health.
/// Every batch it saves is two log writes and a process-wide sled lock saved (batches of 3
/// became batches of 40 at 10,000 deliveries/s to one listener with 2 ms).
///
/// Groups of up to 256 gathered for 4 ms, with room for [`ROOM_PER_WORKER`] attempts per
/// worker, against 64, 2 ms and 2 per worker before: hookd's CPU per delivery to one
/// listener 69-82 µs against 71-112 µs, to ten 52-82 µs against 56-74 µs (quick bench with
/// its payloads of a few bytes, four alternating pairs), and no change in the trigger's p99
/// beside 1,000 listeners or in memory under a backlog.
const LINGER: Duration = Duration::from_millis(4);
/// Attempts waiting to be written, per worker of the pool: enough for a lingering group to
/// fill while workers go on. Groups of up to 256 gathered for 5 ms with room for only 2 per
/// worker (128 with the default pool) delivered a quarter slower to ten listeners (quick
/// bench, three alternating pairs): at 25,000 deliveries/s, 128 attempts finish within
/// 5 ms, so workers waited for room. A waiting attempt holds its response (headers and at
/// most 4 KiB of body), and a later attempt the delivery's first response too (it is kept
/// in the delivery's record), but not the event's payload.
pub(crate) const ROOM_PER_WORKER: usize = 8;

struct Job {
    completion: Completion,
    /// The outcome's line for other nodes' watchers, told as the record commits.
    told: Option<String>,
    written: oneshot::Sender<Result<(), StoreError>>,
    /// Someone waits for this record to go on (an ordered listener's next delivery): the
    /// group is written without lingering.
    urgent: bool,
}

/// Hands finished attempts to the recorder thread. The thread ends when every handle is gone.
pub(crate) struct Recorder {
    jobs: mpsc::Sender<Job>,
    /// Room for attempts waiting to be written.
    room: Semaphore,
    writing: Writing,
}

/// Held by the recorder thread from its look at `abandon` until its group is written: once
/// `abandon` is cancelled and this is taken once, nothing more of the term is written.
#[derive(Clone, Default)]
pub(crate) struct Writing(Arc<std::sync::Mutex<()>>);

impl Writing {
    /// Waits for a group being written to be written. Called once the term is abandoned, it
    /// is the last word: every later group is dropped unwritten, so a term begun after it
    /// (this node taking the lease again) never carries an old term's attempts.
    pub async fn finished(&self) {
        let writing = self.0.clone();
        // A poisoned lock is a recorder thread that panicked: it writes nothing more either.
        let _ = tokio::task::spawn_blocking(move || drop(writing.lock())).await;
    }
}

/// Room reserved for one attempt's record.
pub(crate) struct Reserved<'a> {
    recorder: &'a Recorder,
    _room: SemaphorePermit<'a>,
}

/// The group `first` starts: what is queued behind it and, unless one of them is urgent,
/// what arrives within `linger`, up to `most` attempts. With `most` no more than the room,
/// a group that holds all the room stops waiting: nothing more can arrive.
fn gather(first: Job, inbox: &mpsc::Receiver<Job>, linger: Duration, most: usize) -> Vec<Job> {
    let until = Instant::now() + linger;
    let mut urgent = first.urgent;
    let mut group = vec![first];
    while group.len() < most {
        let next = if urgent {
            inbox.try_recv().ok()
        } else {
            inbox.recv_timeout(until.saturating_duration_since(Instant::now())).ok()
        };
        let Some(job) = next else { break };
        urgent |= job.urgent;
        group.push(job);
    }
    group
}

impl Recorder {
    /// Starts the recorder thread, which runs with the pipeline's (lower) CPU priority.
    /// At most `room` attempts wait to be written at once. Once `abandon` is cancelled
    /// (another node delivers now), what waits is dropped unwritten: the node taking over
    /// makes those attempts again. [`Writing::finished`] says when a group whose write had
    /// begun by then is written.
    pub fn start(queue: Arc<dyn PipelineStore>, room: usize, abandon: CancellationToken) -> std::io::Result<Self> {
        let room = room.max(1);
        let most = MAX_GROUP.min(room);
        let (jobs, inbox) = mpsc::channel::<Job>();
        let writing = Writing::default();
        let held = writing.clone();
        std::thread::Builder::new().name("hookd-recorder".into()).spawn(move || {
            crate::priority::background();
            while let Ok(first) = inbox.recv() {
                let group = gather(first, &inbox, LINGER, most);
                // Held through the write: see `Writing`.
                let _writing = held.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if abandon.is_cancelled() {
                    for job in group {
                        let _ = job.written.send(Err(StoreError::NotDelivering));
                    }
                    continue;
                }
                let mut told = String::new();
                let (completions, waiting): (Vec<Completion>, Vec<_>) = group
                    .into_iter()
                    .map(|job| {
                        told.extend(job.told);
                        (job.completion, job.written)
                    })
                    .unzip();
                let result = if told.is_empty() {
                    queue.complete_attempts(completions)
                } else {
                    queue.complete_attempts_telling(completions, told)
                };
                for written in waiting {
                    // A worker that is gone (shutdown) needs no answer.
                    let _ = written.send(result.clone());
                }
            }
        })?;
        Ok(Self { jobs, room: Semaphore::new(room), writing })
    }

    /// What says when the group being written is written (see [`Writing`]).
    pub fn writing(&self) -> Writing {
        self.writing.clone()
    }

    /// Waits until there is room for one more attempt to be written.
    pub async fn reserve(&self) -> Result<Reserved<'_>, StoreError> {
        let room = self.room.acquire().await.map_err(|_| StoreError::Closed)?;
        Ok(Reserved { recorder: self, _room: room })
    }
}

impl Reserved<'_> {
    /// Writes one finished attempt (with others finishing about now); resolves once it is
    /// written. `urgent`: someone waits on it, so its group does not linger. `told`: the
    /// outcome's line for other nodes' watchers, told with the write.
    pub async fn record(self, completion: Completion, urgent: bool, told: Option<String>) -> Result<(), StoreError> {
        let (written, answer) = oneshot::channel();
        self.recorder.jobs.send(Job { completion, told, written, urgent }).map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Attempt, Delivery, DueEntry, NextStep};

    fn job(urgent: bool) -> Job {
        let entry = DueEntry { due_ms: 0, delivery_id: "d".into(), listener_id: "l".into(), manual: false };
        let completion = Completion {
            delivery: Delivery::default(),
            attempt: Attempt::default(),
            entry: Some(entry),
            next: NextStep::Done,
            ordered: false,
        };
        Job { completion, told: None, written: oneshot::channel().0, urgent }
    }

    #[test]
    fn a_group_takes_what_is_queued_up_to_its_limit() {
        let (jobs, inbox) = mpsc::channel();
        for _ in 0..MAX_GROUP + 5 {
            jobs.send(job(false)).unwrap();
        }
        let first = inbox.recv().unwrap();
        // Full before the linger could matter.
        assert_eq!(gather(first, &inbox, Duration::from_secs(3600), MAX_GROUP).len(), MAX_GROUP);
        assert_eq!(inbox.try_iter().count(), 5);
    }

    #[tokio::test]
    async fn attempts_waiting_to_be_written_are_bounded_by_the_room() {
        use std::future::Future as _;
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn PipelineStore> = crate::store::SledStore::open(dir.path()).unwrap();
        let recorder = Recorder::start(store, 2, CancellationToken::new()).unwrap();
        let first = recorder.reserve().await.unwrap();
        let _second = recorder.reserve().await.unwrap();
        let mut third = std::pin::pin!(recorder.reserve());
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(third.as_mut().poll(&mut context).is_pending(), "the room is full");
        drop(first);
        assert!(third.as_mut().poll(&mut context).is_ready(), "a reservation given back makes room");
    }

    // Regression (review): attempts waiting to be written when a node stopped delivering were
    // written all the same, after another node had taken over.
    #[tokio::test]
    async fn once_abandoned_the_recorder_writes_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStore::open(dir.path()).unwrap();
        let abandon = CancellationToken::new();
        let recorder = Recorder::start(store.clone(), 4, abandon.clone()).unwrap();
        let event = crate::store::Event { seq: 1, ..Default::default() };
        let completion = |id: &str| Completion {
            delivery: Delivery::pending(id.into(), &event, "lst_a", 10),
            attempt: Attempt { number: 1, status_code: 200, ..Attempt::default() },
            entry: None,
            next: NextStep::Done,
            ordered: false,
        };
        recorder.reserve().await.unwrap().record(completion("dlv_before"), true, None).await.unwrap();
        abandon.cancel();
        let refused = recorder.reserve().await.unwrap().record(completion("dlv_after"), true, None).await;
        assert!(matches!(refused, Err(StoreError::NotDelivering)), "{refused:?}");
        assert!(store.delivery_exists("dlv_before").unwrap());
        assert!(!store.delivery_exists("dlv_after").unwrap(), "nothing is written once abandoned");
        crate::store::Store::close(&*store).unwrap();
    }

    // Regression (review): a group the recorder had begun to write when the term was
    // abandoned could commit after this node took the lease again, under its new term. Now
    // the abandoning waits for it, and a group waiting for the write to end is dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[expect(clippy::await_holding_lock, reason = "the test holds the lock as a write under way would")]
    async fn once_abandoned_a_write_under_way_ends_before_the_term_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStore::open(dir.path()).unwrap();
        let abandon = CancellationToken::new();
        let recorder = Arc::new(Recorder::start(store.clone(), 4, abandon.clone()).unwrap());
        let event = crate::store::Event { seq: 1, ..Default::default() };
        let completion = Completion {
            delivery: Delivery::pending("dlv_waiting".into(), &event, "lst_a", 10),
            attempt: Attempt { number: 1, status_code: 200, ..Attempt::default() },
            entry: None,
            next: NextStep::Done,
            ordered: false,
        };
        // A write under way, as the recorder's own would be.
        let writing = recorder.writing();
        let held = writing.0.clone();
        let under_way = held.lock().unwrap();
        let waiting = {
            let recorder = recorder.clone();
            tokio::spawn(async move { recorder.reserve().await.unwrap().record(completion, true, None).await })
        };
        abandon.cancel();
        let (done, finished) = oneshot::channel();
        tokio::spawn(async move {
            writing.finished().await;
            let _ = done.send(());
        });
        let mut finished = std::pin::pin!(finished);
        let early = tokio::time::timeout(Duration::from_millis(100), finished.as_mut()).await;
        assert!(early.is_err(), "the term is not left while a write is under way");
        drop(under_way);
        finished.await.unwrap();
        let refused = waiting.await.unwrap();
        assert!(matches!(refused, Err(StoreError::NotDelivering)), "{refused:?}");
        assert!(!store.delivery_exists("dlv_waiting").unwrap(), "a group looked at after the abandoning is dropped");
        crate::store::Store::close(&*store).unwrap();
    }

    #[test]
    fn a_group_that_holds_all_the_room_does_not_wait_for_more() {
        // The sender stays open: a lingering group would wait the whole hour for more.
        let (jobs, inbox) = mpsc::channel();
        for _ in 0..3 {
            jobs.send(job(false)).unwrap();
        }
        let first = inbox.recv().unwrap();
        assert_eq!(gather(first, &inbox, Duration::from_secs(3600), 3).len(), 3);
    }

    #[test]
    fn an_urgent_record_does_not_wait_for_its_group_to_fill() {
        // The sender stays open: a lingering group would wait the whole hour for more.
        let (jobs, inbox) = mpsc::channel();
        jobs.send(job(false)).unwrap();
        jobs.send(job(true)).unwrap();
        jobs.send(job(false)).unwrap();
        let first = inbox.recv().unwrap();
        assert_eq!(gather(first, &inbox, Duration::from_secs(3600), MAX_GROUP).len(), 3);
        jobs.send(job(true)).unwrap();
        let first = inbox.recv().unwrap();
        assert_eq!(gather(first, &inbox, Duration::from_secs(3600), MAX_GROUP).len(), 1);
    }
}
