//! The delivery pipeline: fan-out, dispatch, delivery, retries. Tokio tasks over the event
//! log, which is the queue of first attempts, and the store's durable due queue.
//!
//! - [`fanout`] follows the event log and hands the dispatcher one (event, listener) pair
//!   per listener that wants each event, writing nothing.
//! - [`dispatch`] keeps each listener's work in a line ([`line`]) under its [`gate`] (cap,
//!   standing, strict order, back-off, disabled), parks what cannot go soon, reads retries
//!   and other queued work from the due queue, and starts requests within two budgets: one
//!   for listeners in good standing, one for slow and failing ones. It also keeps fan-out's
//!   durable position ([`progress`]).
//! - `retention` deletes what is older than the configured age.
//! - [`worker`] makes one attempt ([`deliver`] does the HTTP), has [`recorder`] write it
//!   with the delivery's next step ([`retry`] decides), and reports back through its
//!   [`turn`].
//!
//! Where several nodes share one database, the pipeline delivers only while this node holds
//! the delivery lease ([`Store::delivery_lease`]): otherwise it stands by, passes work queued
//! here on to the delivering node, and on taking over starts from the durable state, as
//! after a restart. Changes other nodes make reach it through [`Store::remote_changes`]. The
//! operator's page of a node standing by asks the delivering node how listeners are doing
//! ([`standing`]).
//!
//! The pipeline never sees gRPC types and never answers a caller; a failing request only
//! ever produces an attempt record. Cancellation is a token; on shutdown in-flight attempts
//! get a deadline and whatever is left stays queued, to be redone after a restart.
//!
//! Store calls run in place, on the pipeline's own runtime, not on the blocking pool: they
//! are short (sled reads and unflushed batches, memory work but for an occasional page
//! read), the pipeline has its threads to itself, and a hop to the blocking pool and back
//! costs two thread wake-ups per call, several calls per delivery. As these calls never
//! yield, the long-running tasks (dispatcher, fan-out) yield between steps. Long work
//! (retention) still goes to the blocking pool, and finished attempts go to the recorder's
//! thread.

pub mod deliver;
mod dispatch;
mod fanout;
mod gate;
mod line;
mod progress;
mod recent;
mod recorder;
mod retention;
pub mod retry;
mod standing;
pub mod target;
mod turn;
pub mod watchers;
mod worker;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use crate::blocking;

use crate::crypto::Keyring;
use crate::store::{
    DeletedListener, DeliveryState, HistoryStore, Note, PipelineStore, QueuePosition, RemoteChange, Store, StoreError,
};
/// How long work waits in memory before it is parked, and how much may wait: with the
/// attempt timeout, what bounds the pairs a crash makes hookd redo.
pub use dispatch::{HOLD_LIMIT_MS, MEMORY_ITEMS};
/// Batch sizes of fan-out and of the recorder, for the benchmark's store floor.
pub use fanout::CHUNK as FANOUT_CHUNK;
pub use recorder::MAX_GROUP as RECORD_GROUP;
pub use retry::RetrySchedule;
pub use standing::StandingReport;
pub use target::{PolicyKind, TargetPolicy};
pub use watchers::{TooManyWatchers, Watch, Watchers};

/// The runtime the pipeline runs on: two worker threads and a blocking pool, all at a lower
/// CPU priority than intake, so fan-out and delivery use what intake leaves.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Blocking store calls are short; a few threads keep memory (and thread churn) small.
        .max_blocking_threads(16)
        .thread_name("hookd-pipeline")
        .on_thread_start(crate::priority::background)
        .enable_all()
        .build()
}

/// How the pipeline behaves; part of the server's configuration.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Requests awaiting an answer at once from listeners in good standing (an answered
    /// attempt is recorded after its slot is free).
    pub workers: usize,
    /// Requests awaiting an answer at once from slow or failing listeners: whatever they
    /// hold, the budget of the others stays free.
    pub suspect_workers: usize,
    /// A request not answered within this makes its listener slow: its requests draw from the
    /// suspect budget until one is answered in time.
    pub slow_after: Duration,
    /// Time limit of one HTTP attempt, connection included.
    pub attempt_timeout: Duration,
    /// Delays between attempts.
    pub retry_schedule: RetrySchedule,
    /// Requests awaiting an answer at once from one listener.
    pub listener_in_flight: usize,
    /// A listener that has had nothing but failures for this long is disabled.
    pub disable_after: Duration,
    /// Which addresses deliveries may connect to.
    pub target_policy: TargetPolicy,
    /// How long events (with their deliveries and attempts) are kept.
    pub retention: Duration,
    /// Delivery watchers (WatchDeliveries) one producer may have open at once.
    pub max_watchers_per_producer: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            workers: 256,
            suspect_workers: 256,
            slow_after: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(15),
            retry_schedule: RetrySchedule::standard(),
            listener_in_flight: 8,
            disable_after: Duration::from_secs(5 * 24 * 3600),
            target_policy: TargetPolicy::default(),
            retention: Duration::from_secs(30 * 24 * 3600),
            max_watchers_per_producer: 16,
        }
    }
}

/// What the tasks of the pipeline share.
pub(crate) struct Context {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn PipelineStore>,
    /// Writes finished attempts, many to a batch.
    pub recorder: recorder::Recorder,
    pub keyring: Keyring,
    pub sender: deliver::Sender,
    pub config: PipelineConfig,
    /// Rung when new deliveries are queued.
    pub wake: Notify,
    /// The earliest queue position written since the dispatcher last looked, so it reads
    /// again what was queued behind its cursor.
    pub queued_from: Mutex<Option<QueuePosition>>,
    /// Every attempt's outcome goes to its producer's watchers. Handing it over never waits:
    /// a watcher that falls behind is dropped (and told), the pipeline never slows for it.
    pub watchers: Arc<Watchers>,
    pub metrics: crate::metrics::Metrics,
    /// Events fan-out just read, for their first attempts (copies, bounded).
    pub recent: recent::Recent,
    /// Cancelled when this node must stop delivering at once (it lost the delivery lease,
    /// and another node may be taking over): requests in flight are dropped and not
    /// recorded, so nothing is sent or written from here after the other node starts. The
    /// node that takes over makes them again.
    pub abandon: CancellationToken,
    /// Work the dispatcher starts on tasks of its own (cancelling a deleted listener's lot or
    /// owed pairs, disabling a listener). Shutdown does not wait for it (each write is whole,
    /// and a restart goes on from what is written); leaving a term does, once it has stopped
    /// at the abandoning, so none of it writes under the term this node begins next.
    pub background: TaskTracker,
}

/// What one attempt did, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptOutcome {
    pub producer_id: String,
    pub event_id: String,
    pub delivery_id: String,
    pub listener_id: String,
    pub attempt: u32,
    /// The delivery's state after the attempt.
    pub state: DeliveryState,
    /// 0 when there was no HTTP answer.
    pub status_code: u32,
    pub error: String,
    pub at_ms: u64,
}

impl Context {
    /// A write refused because this node's delivery term ended (another node took the lease
    /// over): nothing more is sent or written from this term, whose work the node taking over
    /// redoes.
    pub(crate) fn ended_if_refused(&self, error: &StoreError) {
        if matches!(error, StoreError::NotDelivering) && !self.abandon.is_cancelled() {
            tracing::warn!("this node's delivery term ended (another node took the lease over): it stops delivering");
            self.abandon.cancel();
        }
    }

    /// Tells the dispatcher that entries at `from` or later were queued (and written).
    pub fn queued(&self, from: QueuePosition) {
        {
            let mut earliest = self.queued_from.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if earliest.as_ref().is_none_or(|earliest| from < *earliest) {
                *earliest = Some(from);
            }
        }
        self.wake.notify_one();
    }
}

/// Messages to the dispatcher.
#[derive(Debug)]
pub(crate) enum Command {
    /// A listener answered a request (for an ordered listener: its attempt is recorded): its
    /// slot and budget are free. `fast`: within the slow threshold.
    Answered { request: u64, outcome: gate::Outcome, fast: bool },
    /// A request has run past the slow threshold unanswered.
    Slow { request: u64 },
    /// A turn ended: its attempt is recorded (or was never made, or is to be made again).
    Finished(turn::Finished),
    /// A listener was enabled, disabled, changed or deleted.
    ListenerChanged(String),
    /// A listener was deleted.
    ListenerDeleted(Box<DeletedListener>),
    /// Deliveries were queued outside fan-out (replay, retry, recovery).
    Queued,
    /// How each listener the dispatcher knows is doing, for the operator.
    Inspect(tokio::sync::oneshot::Sender<Standing>),
    /// A watcher of this producer was opened here (for the other nodes; never reaches the
    /// dispatcher).
    Watching(String),
}

/// How one listener is doing, as the dispatcher sees it now. Listeners it holds nothing of
/// (no work, no run of failures) are not listed: they are idle and in good standing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerStatus {
    pub listener_id: String,
    /// `unproven`, `healthy`, `slow` or `failing`.
    pub standing: &'static str,
    /// Failed attempts in a row.
    pub failures: u32,
    /// Backed off as a whole until then (ms since the epoch).
    pub backed_off_until_ms: Option<u64>,
    pub in_flight: usize,
    /// Work waiting in memory.
    pub waiting: usize,
    /// Its first attempts wait in the event log from this event on (it is detached).
    pub detached_from_seq: Option<u64>,
}

/// What a node can tell of how its listeners are doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// This node delivers: the listeners it holds anything of (the others are idle and in
    /// good standing).
    Here(Vec<ListenerStatus>),
    /// This node stands by: another node of the shared database delivers, and this is what it
    /// answered when asked.
    Relayed(StandingReport),
    /// This node stands by, and no node that delivers answered in time (one may be taking
    /// over, or this node may have lost its own lease session).
    Elsewhere,
    /// This node should deliver but its delivery cannot start (it tries again every second;
    /// the log says why): nothing is known.
    NotStarted,
    /// The pipeline did not answer within [`STANDING_WAIT`] (too busy, or stopped): nothing
    /// is known.
    NotAnswering,
}

/// How long the operator's page waits for the pipeline to say how listeners are doing.
pub const STANDING_WAIT: Duration = Duration::from_secs(2);

/// A running pipeline: on a node that delivers, fan-out, dispatch and retention; on a node
/// standing by (another node of a shared database delivers, see
/// [`Store::delivery_lease`]), nothing but the wait to take over.
pub struct Pipeline {
    commands: mpsc::UnboundedSender<Command>,
    watchers: Arc<Watchers>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// Tells the pipeline about listener changes made through the API.
#[derive(Clone, Debug)]
pub struct PipelineHandle {
    commands: mpsc::UnboundedSender<Command>,
    watchers: Arc<Watchers>,
}

impl PipelineHandle {
    /// A listener was changed (enabled, disabled, deleted, order switched): parked
    /// deliveries are reconsidered.
    pub fn listener_changed(&self, listener_id: &str) {
        // A closed pipeline (shutting down) has nothing left to reconsider.
        let _ = self.commands.send(Command::ListenerChanged(listener_id.to_owned()));
    }

    /// A listener was deleted (as the store answered it): what it was owed and has not had
    /// ends cancelled.
    pub fn listener_deleted(&self, deleted: DeletedListener) {
        let _ = self.commands.send(Command::ListenerDeleted(Box::new(deleted)));
    }

    /// Deliveries were queued outside fan-out: look at the queue now.
    pub fn queued(&self) {
        let _ = self.commands.send(Command::Queued);
    }

    /// How the listeners the pipeline holds work of are doing, within [`STANDING_WAIT`].
    pub async fn listener_status(&self) -> Standing {
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.commands.send(Command::Inspect(reply)).is_err() {
            return Standing::NotAnswering;
        }
        match tokio::time::timeout(STANDING_WAIT, answer).await {
            Ok(Ok(standing)) => standing,
            // Stopped (shutting down), or no answer in time.
            Ok(Err(_)) | Err(_) => Standing::NotAnswering,
        }
    }

    /// The outcomes of `producer_id`'s attempts (of one event, if given) from now on,
    /// whichever node of a shared database makes them.
    pub fn watch(&self, producer_id: &str, only_event: Option<String>) -> Result<Watch, TooManyWatchers> {
        let watch = self.watchers.watch(producer_id, only_event)?;
        // The node that delivers hears of it at once (and again and again while it lasts).
        let _ = self.commands.send(Command::Watching(producer_id.to_owned()));
        Ok(watch)
    }
}

/// Why the pipeline could not start.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("cannot start the recorder thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("cannot read where fan-out stands: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// What every start of delivery is made from.
struct Parts<S> {
    store: Arc<S>,
    keyring: Keyring,
    config: PipelineConfig,
    durable_seq: tokio::sync::watch::Receiver<u64>,
    metrics: crate::metrics::Metrics,
    watchers: Arc<Watchers>,
}

/// Delivery under way on this node: its tasks and where to tell them things.
struct Delivering {
    /// The delivery term it runs in (see [`Store::delivery_lease`]).
    term: u64,
    commands: mpsc::UnboundedSender<Command>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    abandon: CancellationToken,
    /// The recorder's write under way, if any.
    writing: recorder::Writing,
    /// See [`Context::background`].
    background: TaskTracker,
}

impl Delivering {
    /// Stops taking work and waits for what is in flight (the caller bounds the wait).
    async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.wait().await;
    }

    /// Stops at once: what is in flight is dropped unrecorded (see [`Context::abandon`]).
    /// Returns once nothing of this term is being written any more, the recorder's group
    /// under way and the dispatcher's own tasks included, so a term this node begins next
    /// never writes it.
    async fn abandon(self) {
        self.abandon.cancel();
        let (writing, background) = (self.writing.clone(), self.background.clone());
        self.stop().await;
        background.close();
        background.wait().await;
        writing.finished().await;
    }
}

impl Pipeline {
    /// Starts the pipeline: delivery at once where this node delivers, else once it takes
    /// the delivery lease. `durable_seq` follows the event log's durable end.
    pub fn start<S: Store + PipelineStore + HistoryStore>(
        store: Arc<S>,
        keyring: Keyring,
        config: PipelineConfig,
        durable_seq: tokio::sync::watch::Receiver<u64>,
        metrics: crate::metrics::Metrics,
    ) -> Result<Self, PipelineError> {
        // A configuration the HTTP client refuses is refused at start, not at takeover.
        deliver::Sender::new(config.attempt_timeout, config.target_policy.clone())?;
        let watchers = Watchers::new(config.max_watchers_per_producer);
        let delivering = store.delivery_lease();
        let remote = store.remote_changes();
        let parts = Parts { store, keyring, config, durable_seq, metrics, watchers: watchers.clone() };
        // Delivery starts here at once where it can, so a start that fails says so.
        let term = *delivering.borrow();
        let now = (term != 0).then(|| parts.deliver(term)).transpose()?;
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (commands, inbox) = mpsc::unbounded_channel();
        tasks.spawn(announce_watching(parts.store.clone(), watchers.clone(), shutdown.clone()));
        tasks.spawn(supervise(parts, now, inbox, remote, delivering, shutdown.clone()));
        tasks.close();
        Ok(Self { commands, watchers, tasks, shutdown })
    }

    pub fn handle(&self) -> PipelineHandle {
        PipelineHandle { commands: self.commands.clone(), watchers: self.watchers.clone() }
    }

    /// Stops taking new work and waits up to `deadline` for in-flight attempts; what is
    /// still in flight then stays queued and is redone after a restart.
    pub async fn stop(self, deadline: Duration) {
        self.shutdown.cancel();
        if tokio::time::timeout(deadline, self.tasks.wait()).await.is_err() {
            tracing::warn!(?deadline, "in-flight attempts did not finish in time; they will be redone after restart");
        }
    }
}

impl<S: Store + PipelineStore + HistoryStore> Parts<S> {
    /// Starts fan-out, dispatch and retention from where delivery durably stands.
    fn deliver(&self, term: u64) -> Result<Delivering, PipelineError> {
        // Every write from here on is for this term: none is made once another starts.
        self.store.begin_delivery(term);
        let store = self.store.clone();
        let config = self.config.clone();
        let sender = deliver::Sender::new(config.attempt_timeout, config.target_policy.clone())?;
        let retention = config.retention;
        let history: Arc<dyn HistoryStore> = store.clone();
        // Room for several pools' worth of attempts waiting to be recorded, so listeners get
        // their next requests while a batch lingers and is written.
        let room = config.workers.saturating_mul(recorder::ROOM_PER_WORKER);
        let abandon = CancellationToken::new();
        let recorder = recorder::Recorder::start(store.clone(), room, abandon.clone())?;
        let writing = recorder.writing();
        let background = TaskTracker::new();
        let context = Arc::new(Context {
            store: store.clone(),
            queue: store,
            recorder,
            keyring: self.keyring.clone(),
            sender,
            config,
            wake: Notify::new(),
            queued_from: Mutex::new(None),
            watchers: self.watchers.clone(),
            metrics: self.metrics.clone(),
            recent: recent::Recent::default(),
            abandon: abandon.clone(),
            background: background.clone(),
        });
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (commands, inbox) = mpsc::unbounded_channel();
        let start = context.queue.fanout_cursor()?;
        let (handed, taken) = mpsc::channel(4);
        let memory = Arc::new(tokio::sync::Semaphore::new(MEMORY_ITEMS));
        let durable_seq = self.durable_seq.clone();
        tasks.spawn(fanout::run(context.clone(), durable_seq, start.clone(), handed, memory.clone(), shutdown.clone()));
        tasks.spawn(retention::run(history, retention, shutdown.clone()));
        let dispatcher =
            dispatch::Dispatcher::new(context, inbox, commands.clone(), taken, memory, start, self.durable_seq.clone());
        tasks.spawn(dispatcher.run(shutdown.clone()));
        tasks.close();
        Ok(Delivering { term, commands, tasks, shutdown, abandon, writing, background })
    }

    /// Takes in a command while this node does not deliver: work queued and watchers are
    /// announced to the node that does; `standing` answers the operator; the rest is read
    /// afresh when delivery starts here.
    fn not_delivering(&self, command: Command, standing: Standing) {
        match command {
            Command::Queued => drop(self.store.announce(Note::Queued)),
            Command::Watching(producer_id) => drop(self.store.announce(Note::Watching(producer_id))),
            Command::Inspect(reply) => drop(reply.send(standing)),
            // The node that delivers hears of listener changes through the store.
            _ => {}
        }
    }

    /// Takes in what another node said or did: watchers' business is done here, what is
    /// left is for the dispatcher (where this node delivers).
    fn remote(&self, change: RemoteChange, delivering: bool) -> Option<Command> {
        let listener_id = match change {
            // A node that does not deliver reads everything afresh when it starts to.
            RemoteChange::Listener(_) if !delivering => return None,
            RemoteChange::Listener(listener_id) => listener_id,
            RemoteChange::Note(Note::Queued) => return Some(Command::Queued),
            RemoteChange::Note(Note::Watching(producer_id)) => {
                self.watchers.wanted_elsewhere(&producer_id);
                return None;
            }
            RemoteChange::Note(Note::Behind(producer_id)) => {
                self.watchers.fell_behind_elsewhere(&producer_id);
                return None;
            }
            RemoteChange::Note(Note::Outcomes(text)) => {
                for outcome in watchers::decode(&text) {
                    self.watchers.relayed(&outcome);
                }
                return None;
            }
            // Questions and answers of the operator's page are the supervisor's business (a
            // question waiting for an answer already being made is answered by it).
            RemoteChange::Note(Note::Asking | Note::Standing { .. }) => return None,
        };
        if matches!(self.store.listener(&listener_id), Ok(None)) {
            // Deleted: what it was owed is cancelled, as where the deletion was made.
            let deleted = self.store.deleted_owing().ok().into_iter().flatten();
            if let Some(deleted) = deleted.into_iter().find(|deleted| deleted.listener.id == listener_id) {
                return Some(Command::ListenerDeleted(Box::new(deleted)));
            }
        }
        Some(Command::ListenerChanged(listener_id))
    }
}

/// How often the node delivering for a shared database reads its queue again from the start,
/// should a note of work queued elsewhere have been lost.
const RESCAN_SHARED: Duration = Duration::from_secs(5);

/// Runs delivery while this node holds the lease, stands by while it does not, until
/// `shutdown`. Standing by, what the API tells the pipeline is for the node that delivers:
/// work queued is announced to it, the rest it hears of through the store.
async fn supervise<S: Store + PipelineStore + HistoryStore>(
    parts: Parts<S>,
    mut now: Option<Delivering>,
    mut inbox: mpsc::UnboundedReceiver<Command>,
    mut remote: Option<mpsc::UnboundedReceiver<RemoteChange>>,
    mut lease: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    // Standing by: the operator's questions put to the delivering node.
    let mut asking = Asking::default();
    // Delivering: the answer to the other nodes' questions being made, and how many were made.
    let mut answering: Option<tokio::sync::oneshot::Receiver<Standing>> = None;
    // Numbered from a random point, so answers of two nodes (before and after a takeover)
    // are never taken for one.
    let mut answers = {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_or(0, |()| u64::from_le_bytes(random))
    };
    loop {
        let delivering = match now.take() {
            Some(delivering) => delivering,
            None => {
                let term = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return,
                    () = asking.given_up(), if asking.waiting() => {
                        asking.answer(Standing::Elsewhere);
                        continue;
                    }
                    held = async { lease.wait_for(|term| *term != 0).await.map(|term| *term).ok() } => match held {
                        Some(term) => term,
                        None => return,
                    },
                    command = inbox.recv() => {
                        match command {
                            Some(Command::Inspect(reply)) => asking.ask(reply, &*parts.store),
                            Some(command) => parts.not_delivering(command, Standing::Elsewhere),
                            None => return,
                        }
                        continue;
                    }
                    change = next_change(&mut remote) => {
                        match change {
                            Some(RemoteChange::Note(Note::Standing { report, part, parts, text })) => {
                                asking.heard(report, part, parts, &text);
                            }
                            // What is for the dispatcher waits: the next start reads it all afresh.
                            Some(change) => drop(parts.remote(change, false)),
                            None => {}
                        }
                        continue;
                    }
                };
                // Those asking how listeners are doing are answered by this node from now on.
                let asked = asking.take();
                match parts.deliver(term) {
                    Ok(delivering) => {
                        for reply in asked {
                            drop(delivering.commands.send(Command::Inspect(reply)));
                        }
                        delivering
                    }
                    Err(error) => {
                        for reply in asked {
                            let _ = reply.send(Standing::NotStarted);
                        }
                        tracing::error!(
                            error = &error as &dyn std::error::Error,
                            "cannot start delivery; trying again"
                        );
                        // Meanwhile the inbox is served, so nothing waits on it or piles up.
                        let again = tokio::time::sleep(Duration::from_secs(1));
                        tokio::pin!(again);
                        loop {
                            tokio::select! {
                                biased;
                                () = shutdown.cancelled() => return,
                                () = &mut again => break,
                                command = inbox.recv() => {
                                    let Some(command) = command else { return };
                                    parts.not_delivering(command, Standing::NotStarted);
                                }
                                change = next_change(&mut remote) => {
                                    if let Some(change) = change {
                                        parts.remote(change, false);
                                    }
                                }
                            }
                        }
                        continue;
                    }
                }
            }
        };
        // A store that one node has to itself never takes the lease away (nor says more of it).
        let mut lease_open = true;
        let shared = remote.is_some();
        let mut rescan = tokio::time::interval(RESCAN_SHARED);
        rescan.tick().await;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    delivering.stop().await;
                    return;
                }
                lost = async { lease.wait_for(|term| *term != delivering.term).await.is_ok() }, if lease_open => {
                    if lost { break }
                    lease_open = false;
                }
                command = inbox.recv() => match command {
                    Some(Command::Watching(producer_id)) => drop(parts.store.announce(Note::Watching(producer_id))),
                    Some(command) => drop(delivering.commands.send(command)),
                    None => {
                        delivering.stop().await;
                        return;
                    }
                },
                change = next_change(&mut remote) => match change {
                    // One answer at a time: those asking while it is made read it too.
                    Some(RemoteChange::Note(Note::Asking)) if answering.is_none() => {
                        let (reply, answer) = tokio::sync::oneshot::channel();
                        answering = Some(answer);
                        drop(delivering.commands.send(Command::Inspect(reply)));
                    }
                    Some(change) => {
                        if let Some(command) = parts.remote(change, true) {
                            drop(delivering.commands.send(command));
                        }
                    }
                    None => {}
                },
                answer = async { answering.as_mut().expect("polled only while answering").await }, if answering.is_some() => {
                    answering = None;
                    if let Ok(Standing::Here(statuses)) = answer {
                        answers = answers.wrapping_add(1);
                        for note in standing::notes(answers, statuses) {
                            // A part not taken (too many notes wait) leaves an answer the
                            // other node drops, and its page says no answer came.
                            parts.store.announce(note);
                        }
                    }
                }
                // A note lost on its way (the listening session was being made again, say)
                // delays work queued on another node this long at most.
                _ = rescan.tick(), if shared => drop(delivering.commands.send(Command::Queued)),
            }
        }
        // Another node may take over now: nothing more is sent or recorded from here.
        tracing::warn!("delivery stops on this node: it no longer holds the delivery lease");
        answering = None;
        delivering.abandon().await;
    }
}

/// The operator's questions a node standing by put to the delivering node ([`Note::Asking`]),
/// and its answer as it comes in ([`standing`]).
#[derive(Default)]
struct Asking {
    waiting: Vec<tokio::sync::oneshot::Sender<Standing>>,
    /// When the question was put; none while nobody waits.
    since: Option<tokio::time::Instant>,
    gathering: standing::Gathering,
}

impl Asking {
    /// Puts the question, unless it is already put, and waits for its answer.
    fn ask(&mut self, reply: tokio::sync::oneshot::Sender<Standing>, store: &dyn Store) {
        self.waiting.push(reply);
        if self.since.is_none() {
            self.since = Some(tokio::time::Instant::now());
            store.announce(Note::Asking);
        }
    }

    fn waiting(&self) -> bool {
        self.since.is_some()
    }

    /// Once the answer has been waited for [`standing::ANSWER_WAIT`].
    async fn given_up(&self) {
        match self.since {
            Some(since) => tokio::time::sleep_until(since + standing::ANSWER_WAIT).await,
            None => std::future::pending().await,
        }
    }

    /// Takes in one part of an answer (of the delivering node to whoever asked); answers
    /// everyone waiting once it is whole.
    fn heard(&mut self, report: u64, part: u32, parts: u32, text: &str) {
        if !self.waiting() {
            return;
        }
        if let Some(whole) = self.gathering.heard(report, part, parts, text) {
            self.answer(Standing::Relayed(whole));
        }
    }

    fn answer(&mut self, standing: Standing) {
        for reply in self.take() {
            let _ = reply.send(standing.clone());
        }
    }

    /// Those waiting, no longer waiting here.
    fn take(&mut self) -> Vec<tokio::sync::oneshot::Sender<Standing>> {
        self.since = None;
        self.gathering.clear();
        std::mem::take(&mut self.waiting)
    }
}

/// Tells the other nodes which producers this node's watchers watch, every
/// [`watchers::ANNOUNCE_EVERY`], and forgets what theirs no longer do, until `shutdown`. (The
/// delivering node tells them those producers' outcomes with their records.)
async fn announce_watching<S: Store>(store: Arc<S>, watchers: Arc<Watchers>, shutdown: CancellationToken) {
    let mut announce = tokio::time::interval(watchers::ANNOUNCE_EVERY);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = announce.tick() => {
                for producer_id in watchers.watched_producers() {
                    store.announce(Note::Watching(producer_id));
                }
                watchers.forget_expired();
            }
        }
    }
}

/// The next change another node made; never, where none can.
async fn next_change(remote: &mut Option<mpsc::UnboundedReceiver<RemoteChange>>) -> Option<RemoteChange> {
    match remote {
        Some(changes) => match changes.recv().await {
            Some(change) => Some(change),
            None => {
                *remote = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
impl Context {
    /// A context over `store` with the default configuration, for tests of the tasks.
    pub(crate) fn for_tests<S: Store + PipelineStore>(store: Arc<S>) -> Arc<Self> {
        let config = PipelineConfig::default();
        let abandon = CancellationToken::new();
        Arc::new(Self {
            store: store.clone(),
            queue: store.clone(),
            recorder: recorder::Recorder::start(store, 64, abandon.clone()).expect("the recorder starts"),
            keyring: Keyring::from_base64(&crate::crypto::mint_master_key_base64()).expect("a fresh key"),
            sender: deliver::Sender::new(config.attempt_timeout, config.target_policy.clone()).expect("a client"),
            config,
            wake: Notify::new(),
            queued_from: Mutex::new(None),
            watchers: Watchers::new(1),
            metrics: crate::metrics::Metrics::new(),
            recent: recent::Recent::default(),
            abandon,
            background: TaskTracker::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipeline that does not answer (too busy, say) leaves the operator's page waiting
    /// [`STANDING_WAIT`] at most, and it says nothing is known.
    #[tokio::test]
    async fn the_operator_is_told_when_delivery_does_not_answer() {
        let (commands, mut inbox) = mpsc::unbounded_channel();
        let handle = PipelineHandle { commands, watchers: Watchers::new(1) };
        let asked = std::time::Instant::now();
        assert_eq!(handle.listener_status().await, Standing::NotAnswering);
        assert!(asked.elapsed() >= STANDING_WAIT);
        assert!(matches!(inbox.try_recv(), Ok(Command::Inspect(_))), "it was asked");
    }

    /// A write refused because the term ended stops the term's sending and writing; any other
    /// failure is tried again as before.
    #[tokio::test]
    async fn a_write_refused_for_an_ended_term_abandons_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStore::open(dir.path()).unwrap();
        let context = Context::for_tests(store.clone());
        context.ended_if_refused(&StoreError::Behind);
        assert!(!context.abandon.is_cancelled());
        context.ended_if_refused(&StoreError::NotDelivering);
        assert!(context.abandon.is_cancelled());
        store.close().unwrap();
    }
}
