//! The dispatcher: the one owner of every listener's [`Gate`] and [`Line`], of the two
//! request budgets, and of who has which piece of work; so none of it needs a lock, and
//! workers and fan-out tell it what happened through channels.
//!
//! Work reaches a listener's line from fan-out (first attempts straight from the event log,
//! written nowhere yet) and from the durable due queue (retries, manual attempts, replayed,
//! recovered and unparked deliveries), read from a cursor in due order. The gate decides
//! whether it waits in memory or is set aside (disabled, backed off, older work parked, line
//! full): a queue entry into the listener's lot, a first attempt back into the event log, the
//! listener then reading its own first attempts from there when it can take them (`aside`,
//! `catch_up`): a listener's backlog costs one write, not one per delivery. Work that waits in
//! memory longer than [`HOLD_LIMIT_MS`] is set aside too, so fan-out's durable position (see
//! [`Progress`]) never stays behind for long.
//!
//! Requests draw from two budgets: listeners in good standing from one, slow and failing ones
//! from the other, so listeners that hang cost healthy ones nothing. Lines ready to start are
//! taken round robin within each budget. Store calls run in place (see `pipeline`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod aside;
mod catch_up;

use super::gate::{Gate, MAX_BACKOFF, Offer, Outcome, Pool, Verdict};
use super::line::{Line, Pair, Work};
use super::progress::Progress;
use super::turn::{Finished, Turn};
use super::worker::Target;
use super::{Command, Context, worker};
use crate::clock::now_ms;
use crate::store::{FanoutCursor, Listener, ListenerHealth, QueuePosition, StoreError};

/// Work waits in memory at most this long before it is set aside: a pair not recorded holds
/// fan-out's durable position, which bounds what a crash makes hookd redo.
pub const HOLD_LIMIT_MS: u64 = 10_000;
/// Work waiting in memory, all listeners together (about 250 bytes each: 33 MB at most).
pub const MEMORY_ITEMS: usize = 131_072;
/// Queue entries read per pass.
const SCAN_LIMIT: usize = 512;
/// Most parked entries put back in one write (kept short, like every pipeline batch: it
/// holds sled's process-wide lock while it applies).
const UNPARK_CHUNK: usize = 256;
/// How often the cursor is written, held work looked at and back-offs ended.
const TICK: Duration = Duration::from_millis(250);
/// How long an ordered listener whose order could not be checked (a store error) waits before
/// the check is made again.
const ORDER_CHECK_AGAIN_MS: u64 = 1000;

/// What fan-out hands the dispatcher: pairs in log order, each holding a place in memory,
/// and how far the log is handed out.
#[derive(Debug)]
pub(crate) struct Handed {
    pub pairs: Vec<Pair>,
    /// Every pair of the events before this one is in this or an earlier hand-over.
    pub next_seq: u64,
    /// Event `next_seq` is under way: some of its listeners were looked at, and the next
    /// hand-over goes on with the others (whether or not this one holds a pair of it).
    pub partial: bool,
}

/// One listener's gate and line, and the listener as last read.
#[derive(Debug, Default)]
struct Lane {
    gate: Gate,
    line: Line,
    /// The listener and its URL parsed once, handed to each attempt.
    listener: Option<Arc<Target>>,
    /// The store's listener generation when `listener` was read.
    generation: u64,
    /// The budget whose ready list it is on, if any.
    ready_in: Option<Pool>,
    /// A disabling for too long a run of failures is under way.
    disabling: bool,
    /// Fanned out apart from the others (see `aside`).
    detached: Option<aside::Detached>,
    /// When its rate limit lets it start again, while it waits for that (in `rated`).
    rate_wake_ms: Option<u64>,
}

/// A request under way: whose, and which budget it draws from now.
struct Request {
    listener_id: String,
    pool: Pool,
}

pub(crate) struct Dispatcher {
    context: Arc<Context>,
    inbox: mpsc::UnboundedReceiver<Command>,
    outbox: mpsc::UnboundedSender<Command>,
    handed: mpsc::Receiver<Handed>,
    /// Places for work waiting in memory (see [`MEMORY_ITEMS`]): each item in a line holds
    /// one; fan-out takes them before it hands pairs over.
    memory: Arc<Semaphore>,
    workers: TaskTracker,
    lanes: HashMap<String, Lane>,
    /// Lanes that may start work, per budget, taken round robin.
    ready: [VecDeque<String>; 2],
    /// Requests under way per budget (one may exceed its limit: a request that turned slow
    /// moves to the suspect budget whatever it holds), and their limits.
    in_use: [usize; 2],
    limits: [usize; 2],
    requests: HashMap<u64, Request>,
    next_request: u64,
    /// Queue entries in a line or under way (at their position), and first attempts in hand
    /// (at `(0, "")`: no entry has an empty key), by delivery: another entry of the same
    /// delivery waits for it (see `deferred`).
    claimed: HashMap<String, QueuePosition>,
    /// Deliveries with an entry skipped because another of theirs was claimed, with the
    /// skipped entry's due time: read again once the claim ends.
    deferred: HashMap<String, u64>,
    /// The queue is read from just after here; `None`: from the start.
    cursor: Option<QueuePosition>,
    /// Entries past the cursor may be due that no pass has read.
    stale: bool,
    /// When the first entry past the cursor is due, as the last pass to reach the end saw.
    next_due_ms: Option<u64>,
    /// (when, due time) of queue entries to read again later.
    later: BTreeSet<(u64, u64)>,
    /// Pairs to offer again later (their turn could not record them), by when.
    again: BTreeMap<(u64, u64), Work>,
    /// (back-off end, listener) of listeners backed off as a whole.
    backoffs: BTreeSet<(u64, String)>,
    /// (when, listener) of listeners with work waiting for their rate limit's next token.
    rated: BTreeSet<(u64, String)>,
    progress: Progress,
    /// [`Progress::handed_until_seq`] as a watch: a deleted listener's cancelling waits for
    /// fan-out to hand out the rest of what it was owed.
    handed_watch: tokio::sync::watch::Sender<u64>,
    next_tick_ms: u64,
    /// The durable end of the log, for the fan-out lag gauges.
    durable_seq: tokio::sync::watch::Receiver<u64>,
}

impl Dispatcher {
    pub fn new(
        context: Arc<Context>,
        inbox: mpsc::UnboundedReceiver<Command>,
        outbox: mpsc::UnboundedSender<Command>,
        handed: mpsc::Receiver<Handed>,
        memory: Arc<Semaphore>,
        start: FanoutCursor,
        durable_seq: tokio::sync::watch::Receiver<u64>,
    ) -> Self {
        let limits = [context.config.workers.max(1), context.config.suspect_workers.max(1)];
        Self {
            context,
            inbox,
            outbox,
            handed,
            memory,
            workers: TaskTracker::new(),
            lanes: HashMap::new(),
            ready: [VecDeque::new(), VecDeque::new()],
            in_use: [0, 0],
            limits,
            requests: HashMap::new(),
            next_request: 0,
            claimed: HashMap::new(),
            deferred: HashMap::new(),
            cursor: None,
            stale: true,
            next_due_ms: None,
            later: BTreeSet::new(),
            again: BTreeMap::new(),
            backoffs: BTreeSet::new(),
            rated: BTreeSet::new(),
            handed_watch: tokio::sync::watch::channel(start.next_seq).0,
            progress: Progress::new(start),
            next_tick_ms: 0,
            durable_seq,
        }
    }

    fn cap(&self) -> usize {
        self.context.config.listener_in_flight
    }

    /// Dispatches until `shutdown` (or until the term is abandoned), then writes where fan-out
    /// stands and waits for the workers it started.
    pub async fn run(mut self, shutdown: CancellationToken) {
        self.restore();
        let abandon = self.context.abandon.clone();
        while !shutdown.is_cancelled() && !abandon.is_cancelled() {
            while let Ok(command) = self.inbox.try_recv() {
                self.handle(command);
            }
            while let Ok(handed) = self.handed.try_recv() {
                self.take_handed(handed);
            }
            let now = now_ms();
            while let Some((at_ms, listener_id)) = self.rated.first().cloned()
                && at_ms <= now
            {
                self.rated.pop_first();
                if let Some(lane) = self.lanes.get_mut(&listener_id) {
                    lane.rate_wake_ms = None;
                }
                self.mark(&listener_id);
            }
            if now >= self.next_tick_ms {
                self.tick(now);
                self.next_tick_ms = now + TICK.as_millis() as u64;
            }
            let more = match self.scan_queue(now) {
                Ok(more) => more,
                Err(error) => {
                    tracing::error!(error = &error as &dyn std::error::Error, "reading the due queue failed; retrying");
                    self.later.insert((now + 1000, 0));
                    false
                }
            };
            self.pump();
            if more {
                // Store calls run in place and never yield: let the workers have the thread.
                tokio::task::yield_now().await;
                continue;
            }
            let wake_at = self.next_wake();
            tokio::select! {
                command = self.inbox.recv() => if let Some(command) = command { self.handle(command) },
                handed = self.handed.recv() => if let Some(handed) = handed { self.take_handed(handed) },
                () = self.context.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(wake_at.saturating_sub(now_ms()))) => {}
                () = shutdown.cancelled() => {}
                () = abandon.cancelled() => {}
            }
        }
        // Abandoned, another node delivers now: the cursor is its to move.
        if !self.context.abandon.is_cancelled() {
            self.write_cursor(now_ms(), true);
        }
        self.workers.close();
        self.workers.wait().await;
    }

    /// When something next needs doing without being told: the next tick while anything is
    /// held or outstanding, the queue's next entry, a back-off's end.
    fn next_wake(&self) -> u64 {
        let busy = !self.lanes.is_empty() || self.progress.outstanding() > 0 || !self.again.is_empty();
        let tick = busy.then_some(self.next_tick_ms);
        let due = self.next_due_ms.filter(|_| !self.stale);
        let soon = [
            tick,
            due,
            self.backoffs.first().map(|(at, _)| *at),
            self.later.first().map(|(at, _)| *at),
            self.rated.first().map(|(at, _)| *at),
        ];
        soon.into_iter().flatten().min().unwrap_or(u64::MAX / 2).min(now_ms() + 60_000)
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Answered { request, outcome, fast } => self.answered(request, outcome, fast),
            Command::Slow { request } => self.slow(request),
            Command::Finished(finished) => self.finished(finished),
            Command::ListenerChanged(listener_id) => self.listener_changed(&listener_id),
            Command::ListenerDeleted(deleted) => {
                self.listener_changed(&deleted.listener.id);
                self.cancel_owed(Arc::new(deleted.listener), deleted.unsure_from_seq);
            }
            // Deliveries were queued outside fan-out (replay, retry, recovery), anywhere in
            // the queue: read it again from the start.
            Command::Queued => {
                self.cursor = None;
                self.stale = true;
            }
            Command::Inspect(reply) => {
                let _ = reply.send(super::Standing::Here(self.status()));
            }
            // The pipeline's supervisor tells the other nodes; nothing for the dispatcher.
            Command::Watching(_) => {}
        }
    }

    /// How each lane is doing, for the operator.
    fn status(&self) -> Vec<super::ListenerStatus> {
        let now = now_ms();
        self.lanes
            .iter()
            .map(|(listener_id, lane)| super::ListenerStatus {
                listener_id: listener_id.clone(),
                standing: match lane.gate.standing {
                    super::gate::Standing::Unproven => "unproven",
                    super::gate::Standing::Healthy => "healthy",
                    super::gate::Standing::Slow => "slow",
                    super::gate::Standing::Failing => "failing",
                },
                failures: lane.gate.failures,
                // Held for its order (a first attempt to be offered again) shows as waiting
                // until then too.
                backed_off_until_ms: (lane.gate.backed_off(now) || lane.gate.held_until_ms != 0)
                    .then_some(lane.gate.blocked_until_ms.max(lane.gate.held_until_ms)),
                in_flight: lane.gate.in_flight,
                waiting: lane.line.len(),
                detached_from_seq: lane.detached.as_ref().map(|detached| detached.read.min(detached.since)),
            })
            .collect()
    }

    // ---- lanes ------------------------------------------------------------------------

    /// The lane of `listener_id`, read from the store when new or when listeners changed.
    fn lane(&mut self, listener_id: &str) -> &mut Lane {
        let generation = self.context.store.listeners_generation();
        let stale = self.lanes.get(listener_id).is_none_or(|lane| lane.generation != generation);
        if stale {
            let (listener, read) = match self.context.store.listener(listener_id) {
                Ok(listener) => (listener, true),
                Err(error) => {
                    tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot read a listener");
                    // Kept as it was (none for a new lane: nothing of it starts), and read
                    // again at the next look.
                    let kept = self
                        .lanes
                        .get(listener_id)
                        .and_then(|lane| lane.listener.as_ref().map(|target| target.listener.clone()));
                    (kept, false)
                }
            };
            let new = !self.lanes.contains_key(listener_id);
            let health = if new {
                self.context.queue.listener_health(listener_id).unwrap_or_default()
            } else {
                ListenerHealth::default()
            };
            let lane = self.lanes.entry(listener_id.to_owned()).or_default();
            if new {
                lane.gate.failing_since_ms = health.failing_since_ms;
            }
            lane.gate.enabled = listener.as_ref().is_some_and(|listener| listener.enabled);
            lane.gate.ordered = listener.as_ref().is_some_and(|listener| listener.ordered);
            lane.gate.set_rate(listener.as_ref().map_or(0, |listener| listener.max_per_second), now_ms());
            // A listener that could not be read is not taken for deleted (its work would be
            // cancelled); it is read again at the next look.
            lane.gate.deleted = read && listener.is_none();
            lane.listener = listener.map(|listener| Arc::new(Target::new(listener)));
            lane.generation = if read { generation } else { u64::MAX };
        }
        self.lanes.get_mut(listener_id).expect("made above")
    }

    /// Puts the lane on its budget's ready list if its next work may start.
    fn mark(&mut self, listener_id: &str) {
        let (cap, now) = (self.cap(), now_ms());
        let Some(lane) = self.lanes.get_mut(listener_id) else { return };
        if lane.ready_in.is_some() {
            return;
        }
        let startable = lane.line.front().is_some_and(|work| lane.gate.may_start(cap, now, work.manual()));
        if startable {
            let pool = lane.gate.pool();
            lane.ready_in = Some(pool);
            self.ready[pool.index()].push_back(listener_id.to_owned());
        } else if !lane.line.is_empty() && lane.rate_wake_ms.is_none() {
            // Held by its rate limit: marked again when the next token is there.
            let wait = lane.gate.rate_wait_ms(now);
            if wait > 0 {
                lane.rate_wake_ms = Some(now + wait);
                self.rated.insert((now + wait, listener_id.to_owned()));
            }
        }
    }

    /// Forgets a lane with nothing left to remember.
    fn forget_if_idle(&mut self, listener_id: &str) {
        let now = now_ms();
        // A detached lane is never forgotten: where it stands lives only here (and in `ld/`).
        let idle = |lane: &Lane| {
            lane.gate.is_idle(now)
                && lane.line.is_empty()
                && lane.rate_wake_ms.is_none()
                && lane.ready_in.is_none()
                && !lane.disabling
                && lane.detached.is_none()
        };
        if self.lanes.get(listener_id).is_some_and(idle) {
            self.lanes.remove(listener_id);
        }
    }

    /// Offers work to its listener: into the line, or back to the caller to park or cancel.
    /// Work offered holds a place in memory, given back when it is not kept.
    fn offer(&mut self, work: Work, released: bool, now: u64) -> Option<(Verdict, Work)> {
        let listener_id = work.listener_id().to_owned();
        let offer = Offer { manual: work.manual(), released };
        let lane = self.lane(&listener_id);
        match lane.gate.admit(offer, lane.line.len(), now) {
            Verdict::Wait => {
                lane.line.push(work, now);
                self.mark(&listener_id);
                None
            }
            verdict => {
                self.memory.add_permits(1);
                Some((verdict, work))
            }
        }
    }

    // ---- starting work ----------------------------------------------------------------

    /// Starts work while the budgets last, one piece per ready lane at a time.
    fn pump(&mut self) {
        for pool in Pool::ALL {
            while self.in_use[pool.index()] < self.limits[pool.index()] {
                let Some(listener_id) = self.ready[pool.index()].pop_front() else { break };
                let same_pool = match self.lanes.get_mut(&listener_id) {
                    Some(lane) => {
                        lane.ready_in = None;
                        lane.gate.pool() == pool
                    }
                    None => false,
                };
                if same_pool {
                    self.start_next(&listener_id);
                }
                // Round robin: back on a list, at its end, if it may start more.
                self.mark(&listener_id);
            }
        }
    }

    /// Starts the next work of a lane if it may start; true when something started.
    fn start_next(&mut self, listener_id: &str) -> bool {
        let (cap, now) = (self.cap(), now_ms());
        loop {
            let lane = self.lane(listener_id);
            let Some(work) = lane.line.front() else { return false };
            if !lane.gate.may_start(cap, now, work.manual()) {
                return false;
            }
            // Strict order: nothing starts while an older delivery of it is unfinished; such
            // work waits in the lot, which keeps delivery order.
            let check_order = (lane.gate.ordered && !work.manual()).then(|| work.delivery_id().to_owned());
            if let Some(delivery_id) = check_order {
                let older = match self.context.queue.pending_head(listener_id) {
                    Ok(head) => head.is_some_and(|head| head < delivery_id),
                    Err(error) => {
                        tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot read an ordered listener's head; trying again in a second");
                        // Set aside for a while: left startable, the lane would be taken up
                        // again at once, and the dispatcher would go round it for ever.
                        let at = now + ORDER_CHECK_AGAIN_MS;
                        let lane = self.lanes.get_mut(listener_id).expect("read above");
                        lane.gate.held_until_ms = lane.gate.held_until_ms.max(at);
                        self.backoffs.insert((at, listener_id.to_owned()));
                        return false;
                    }
                };
                if older {
                    let lane = self.lanes.get_mut(listener_id).expect("read above");
                    let work = lane.line.pop_front().expect("a front exists");
                    self.memory.add_permits(1);
                    self.set_aside(vec![work]);
                    continue;
                }
            }
            let lane = self.lanes.get_mut(listener_id).expect("read above");
            let work = lane.line.pop_front().expect("a front exists");
            lane.gate.started(now);
            let pool = lane.gate.pool();
            let listener = lane.listener.clone();
            self.memory.add_permits(1);
            let request = self.next_request;
            self.next_request += 1;
            self.in_use[pool.index()] += 1;
            self.requests.insert(request, Request { listener_id: listener_id.to_owned(), pool });
            let mut turn = Turn::new(self.outbox.clone(), request, work.clone());
            let context = self.context.clone();
            self.workers.spawn(async move {
                let abandon = context.abandon.clone();
                let finished = tokio::select! {
                    biased;
                    // Dropped mid-request: nothing sent from here on, nothing recorded.
                    () = abandon.cancelled() => None,
                    // Boxed: the attempt's state (3.9 KB, reqwest's request in it) is then made
                    // once, where it stays, instead of being copied into the task and moved
                    // with it (about 3 % less CPU per delivery to one listener, quick bench).
                    finished = Box::pin(worker::attempt(context, request, work, listener, &mut turn)) => Some(finished),
                };
                if let Some(finished) = finished {
                    turn.end(finished);
                }
            });
            return true;
        }
    }

    // ---- what workers report ----------------------------------------------------------

    /// A listener answered (or a turn ended unanswered): its slot and budget are free, and
    /// the outcome counts toward its standing, back-off and health.
    fn answered(&mut self, request: u64, outcome: Outcome, fast: bool) {
        let Some(Request { listener_id, pool }) = self.requests.remove(&request) else { return };
        self.in_use[pool.index()] -= 1;
        let now = now_ms();
        let schedule = &self.context.config.retry_schedule;
        let (first_delay, max_backoff) = (schedule.first_delay(), MAX_BACKOFF.min(schedule.max_delay()));
        let lane = self.lane(&listener_id);
        lane.gate.in_flight -= 1;
        let backoff = lane.gate.count(outcome, fast, now, first_delay, max_backoff);
        let waiting = match backoff {
            Some(until) => {
                tracing::debug!(%listener_id, until, failures = lane.gate.failures, "listener backed off");
                // What waits for it waits in its lot meanwhile (manual attempts stay).
                lane.line.take_waiting_since(u64::MAX)
            }
            None => Vec::new(),
        };
        if let Some(until) = backoff {
            self.backoffs.insert((until, listener_id.clone()));
            self.memory.add_permits(waiting.len());
            self.set_aside(waiting);
        }
        self.trim(&listener_id);
        self.track_health(&listener_id, outcome, now);
        self.mark(&listener_id);
    }

    /// A request ran past the slow threshold: it and its listener move to the suspect budget.
    fn slow(&mut self, request: u64) {
        let Some(entry) = self.requests.get_mut(&request) else { return };
        if entry.pool == Pool::Healthy {
            entry.pool = Pool::Suspect;
            self.in_use[Pool::Healthy.index()] -= 1;
            self.in_use[Pool::Suspect.index()] += 1;
        }
        let listener_id = entry.listener_id.clone();
        if let Some(lane) = self.lanes.get_mut(&listener_id) {
            lane.gate.went_slow();
        }
        self.trim(&listener_id);
    }

    /// Cuts a listener's line down to what its standing allows, parking the newest.
    fn trim(&mut self, listener_id: &str) {
        let Some(lane) = self.lanes.get_mut(listener_id) else { return };
        let over = lane.line.len().saturating_sub(lane.gate.line_limit());
        if over == 0 {
            return;
        }
        let works = lane.line.take_newest(over);
        self.memory.add_permits(works.len());
        self.set_aside(works);
    }

    /// A turn ended: its work is recorded (or to be done again), its claim ends, and its
    /// listener may take more from its line or its lot.
    fn finished(&mut self, finished: Finished) {
        if !finished.answered {
            self.answered(finished.request, finished.outcome, finished.fast);
        }
        let now = now_ms();
        let listener_id = finished.work.listener_id().to_owned();
        if let Some(due_ms) = finished.look_again_ms {
            self.rewind((due_ms, String::new()));
        }
        match finished.work {
            Work::First(pair) => match finished.again_after_ms {
                // Not recorded: still outstanding and claimed, done again after a pause.
                Some(after) => self.again_later(pair, now + after),
                None => self.pair_recorded(pair),
            },
            Work::Queued(entry) => {
                self.release(&entry.delivery_id);
                // The entry is still queued: read again, at once or after a pause.
                if let Some(after) = finished.again_after_ms {
                    self.later.insert((now + after, entry.due_ms));
                }
            }
        }
        self.refill(&listener_id);
        self.catch_up(&listener_id);
        self.mark(&listener_id);
        self.forget_if_idle(&listener_id);
    }

    /// A first attempt's turn could not record it: it is done again at `at`. An ordered
    /// listener's goes back to the front of its line and the listener waits until then (its
    /// next delivery must not overtake it); any other's waits apart.
    fn again_later(&mut self, pair: Pair, at: u64) {
        let ordered = self.lanes.get(&pair.listener_id).is_some_and(|lane| lane.gate.ordered);
        let placed = ordered && self.memory.try_acquire().map(tokio::sync::SemaphorePermit::forget).is_ok();
        if placed {
            let listener_id = pair.listener_id.clone();
            self.lane(&listener_id).line.push(Work::First(pair), at);
            self.hold_ordered(&listener_id, at);
            return;
        }
        self.hold_ordered(&pair.listener_id, at);
        let order = self.next_request;
        self.next_request += 1;
        self.again.insert((at, order), Work::First(pair));
    }

    /// An ordered listener's first attempt waits to be offered again at `at` (in its line, or
    /// apart when memory had no place for it): nothing of the listener starts before then, so
    /// its next delivery does not overtake it. At `at` the back-off ends in the same tick that
    /// offers the waiting pair again, before anything starts, and its line keeps due order.
    pub(super) fn hold_ordered(&mut self, listener_id: &str, at: u64) {
        // Its lane is made if need be (an idle listener has none), and is not forgotten while
        // the hold lasts; one made for another listener is let go again.
        let lane = self.lane(listener_id);
        if !lane.gate.ordered {
            self.forget_if_idle(listener_id);
            return;
        }
        lane.gate.held_until_ms = lane.gate.held_until_ms.max(at);
        self.backoffs.insert((at, listener_id.to_owned()));
    }

    /// A first attempt is recorded (or found recorded, or cancelled): it is no longer
    /// outstanding anywhere.
    pub(super) fn pair_recorded(&mut self, pair: Pair) {
        self.release(&pair.delivery_id);
        // A detached listener's reading may have marked it too, passing it while it was under way.
        if let Some(detached) = self.lanes.get_mut(&pair.listener_id).and_then(|lane| lane.detached.as_mut()) {
            detached.outstanding.remove(&pair.seq);
        }
        if !pair.lagging {
            self.progress.done(pair.seq);
        }
    }

    /// A delivery is no longer claimed: an entry of it that waited for that is read again.
    fn release(&mut self, delivery_id: &str) {
        self.claimed.remove(delivery_id);
        if let Some(due_ms) = self.deferred.remove(delivery_id) {
            self.rewind((due_ms, String::new()));
        }
    }

    /// Keeps the start of a listener's run of failures, durably, writing only when a run
    /// starts or ends; disables the listener once the run has lasted `--disable-after`.
    fn track_health(&mut self, listener_id: &str, outcome: Outcome, now: u64) {
        let limit = u64::try_from(self.context.config.disable_after.as_millis()).unwrap_or(u64::MAX);
        let Some(lane) = self.lanes.get_mut(listener_id) else { return };
        let since = match outcome {
            Outcome::Succeeded if lane.gate.failing_since_ms != 0 => 0,
            Outcome::Retrying | Outcome::FailedForGood if lane.gate.failing_since_ms == 0 => now,
            Outcome::Retrying | Outcome::FailedForGood => {
                let due =
                    now.saturating_sub(lane.gate.failing_since_ms) >= limit && !lane.disabling && lane.gate.enabled;
                if due {
                    lane.disabling = true;
                    self.disable(listener_id);
                }
                return;
            }
            _ => return,
        };
        lane.gate.failing_since_ms = since;
        if let Err(error) =
            self.context.queue.set_listener_health(listener_id, &ListenerHealth { failing_since_ms: since })
        {
            self.ended_if_refused(&error);
            tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot record a listener's health");
        }
    }

    /// Disables a listener durably, with the reason, on a task of its own; the change comes
    /// back as a notice.
    fn disable(&self, listener_id: &str) {
        let reason = format!(
            "disabled by hookd after {} of nothing but failed attempts",
            super::retry::format_duration(self.context.config.disable_after)
        );
        let (context, outbox, listener_id) = (self.context.clone(), self.outbox.clone(), listener_id.to_owned());
        self.context.background.spawn(async move {
            let edit = Box::new(move |listener: &mut Listener| {
                if listener.enabled {
                    listener.enabled = false;
                    listener.disabled_reason = reason;
                }
            });
            match context.store.update_listener(&listener_id, edit).await {
                Ok(_) => tracing::warn!(%listener_id, "listener disabled after a long run of failures"),
                Err(error) => {
                    tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot disable a failing listener")
                }
            }
            let _ = outbox.send(Command::ListenerChanged(listener_id));
        });
    }

    /// A listener was changed through the API (or disabled by hookd): its line follows what
    /// it is now.
    fn listener_changed(&mut self, listener_id: &str) {
        let was_enabled = self.lanes.get(listener_id).is_some_and(|lane| lane.gate.enabled);
        // Read afresh whatever the generation says.
        if let Some(lane) = self.lanes.get_mut(listener_id) {
            lane.generation = u64::MAX;
            lane.disabling = false;
        }
        let lane = self.lane(listener_id);
        let (deleted, enabled) = (lane.gate.deleted, lane.gate.enabled);
        if deleted || !enabled {
            let works = lane.line.take_all();
            self.memory.add_permits(works.len());
            if deleted {
                // What it has waiting in the log is cancelled once the deletion's own notice
                // says where that ends (see `cancel_owed`).
                self.cancel(works);
                self.cancel_lot(listener_id);
            } else {
                self.set_aside(works);
            }
        } else {
            if !was_enabled || lane.gate.failures > 0 {
                // Enabled again, or changed: its run of failures starts afresh.
                lane.gate.reset();
                if let Err(error) = self.context.queue.set_listener_health(listener_id, &ListenerHealth::default()) {
                    self.ended_if_refused(&error);
                    tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot reset a listener's run of failures");
                }
            }
            self.refill(listener_id);
            self.catch_up(listener_id);
        }
        self.mark(listener_id);
        self.forget_if_idle(listener_id);
    }

    // ---- fan-out and the queue --------------------------------------------------------

    /// Takes pairs from fan-out into their listeners' lines (or lots).
    fn take_handed(&mut self, handed: Handed) {
        let now = now_ms();
        let reservation = handed.pairs.last().and_then(|last| self.progress.reserve(last.seq));
        let reserved = reservation.map(|reservation| match self.context.queue.set_fanout_cursor(&reservation) {
            Ok(()) => {
                self.progress.reserved(reservation, now);
                Ok(())
            }
            Err(error) => Err(error),
        });
        if let Some(Err(error)) = reserved {
            // Nothing of it may start before the reservation is written: offered again later
            // (claimed meanwhile, and checked then against detached listeners).
            let partial = handed.partial;
            for pair in &handed.pairs {
                self.progress.handed(pair.seq);
                self.claimed.insert(pair.delivery_id.clone(), (0, String::new()));
            }
            self.handed_until(handed.next_seq, partial);
            self.memory.add_permits(handed.pairs.len());
            let works = handed.pairs.into_iter().map(Work::First).collect();
            self.write_failed(error, works);
            return;
        }
        let (mut park, mut cancel) = (Vec::new(), Vec::new());
        // The last event is continued in the next hand-over (fan-out cut it in chunks), even
        // where this one holds none of its pairs: a listener's pair of it may have been let
        // go in an earlier one.
        let partial = handed.partial;
        for pair in handed.pairs {
            self.progress.handed(pair.seq);
            // A detached listener reads this one back itself, later.
            let covered = self.lane(&pair.listener_id).detached.as_ref().is_some_and(|d| pair.seq >= d.since);
            // Claimed already: its record exists and its queue entry is in hand (a recheck).
            if covered || self.claimed.contains_key(&pair.delivery_id) {
                self.progress.done(pair.seq);
                self.memory.add_permits(1);
                continue;
            }
            self.claimed.insert(pair.delivery_id.clone(), (0, String::new()));
            match self.offer(Work::First(pair), false, now) {
                None => {}
                Some((Verdict::Cancel, work)) => cancel.push(work),
                Some((_, work)) => park.push(work),
            }
        }
        self.handed_until(handed.next_seq, partial);
        self.set_aside(park);
        self.cancel(cancel);
    }

    fn handed_until(&mut self, next_seq: u64, partial: bool) {
        self.progress.handed_until(next_seq, partial);
        let handed_until = self.progress.handed_until_seq();
        self.handed_watch.send_if_modified(|until| std::mem::replace(until, handed_until) != handed_until);
    }

    /// Entries due at or after `from` may be new to the dispatcher: read them (again).
    fn rewind(&mut self, from: QueuePosition) {
        if self.cursor.as_ref().is_some_and(|cursor| from < *cursor) {
            self.cursor = Some(from);
        }
        self.stale = true;
    }

    /// Reads one page of due queue entries past the cursor into their listeners' lines (or
    /// lots). True when there may be more due right now.
    fn scan_queue(&mut self, now: u64) -> Result<bool, StoreError> {
        while let Some(&(at_ms, due_ms)) = self.later.first()
            && at_ms <= now
        {
            self.later.pop_first();
            self.rewind((due_ms, String::new()));
        }
        let queued_from = self.context.queued_from.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(from) = queued_from {
            self.rewind(from);
        }
        if !self.stale && self.next_due_ms.is_none_or(|due_ms| due_ms > now) {
            return Ok(false);
        }
        let entries = self.context.queue.due(self.cursor.as_ref(), now, SCAN_LIMIT)?;
        let full = entries.len() == SCAN_LIMIT;
        let (mut park, mut cancel) = (Vec::new(), Vec::new());
        for entry in entries {
            let position = (entry.due_ms, entry.key_id());
            self.cursor = Some(position.clone());
            if let Some(claimed) = self.claimed.get(&entry.delivery_id) {
                // Never two of one delivery at once: this one waits for the other to end.
                if *claimed != position {
                    let due = self.deferred.entry(entry.delivery_id.clone()).or_insert(entry.due_ms);
                    *due = (*due).min(entry.due_ms);
                }
                continue;
            }
            let released =
                self.lanes.get_mut(&entry.listener_id).is_some_and(|lane| lane.gate.released.remove(&position.1));
            // A place in memory, or the lot.
            let Ok(place) = self.memory.try_acquire() else {
                park.push(Work::Queued(entry));
                continue;
            };
            place.forget();
            self.claimed.insert(entry.delivery_id.clone(), position);
            match self.offer(Work::Queued(entry), released, now) {
                None => {}
                Some((Verdict::Cancel, work)) => cancel.push(work),
                Some((_, work)) => park.push(work),
            }
        }
        self.set_aside(park);
        self.cancel(cancel);
        if !full {
            self.next_due_ms = self.context.queue.next_due_ms(self.cursor.as_ref())?;
            self.stale = false;
        }
        Ok(full)
    }

    // ---- now and then -----------------------------------------------------------------

    /// Writes where fan-out stands, parks work held too long, ends back-offs and offers
    /// again what is due to be.
    fn tick(&mut self, now: u64) {
        self.write_cursor(now, false);
        self.write_detached();
        self.gauge(now);
        // Back-offs first: a listener whose back-off ends reads its first attempts back before
        // its retries are read from the queue, so the oldest work goes first.
        while let Some((at_ms, listener_id)) = self.backoffs.first().cloned()
            && at_ms <= now
        {
            self.backoffs.pop_first();
            if let Some(lane) = self.lanes.get_mut(&listener_id)
                && (lane.gate.blocked_until_ms == at_ms || lane.gate.held_until_ms == at_ms)
            {
                if lane.gate.blocked_until_ms == at_ms {
                    lane.gate.blocked_until_ms = 0;
                }
                if lane.gate.held_until_ms == at_ms {
                    lane.gate.held_until_ms = 0;
                }
                self.refill(&listener_id);
                self.catch_up(&listener_id);
                self.mark(&listener_id);
            }
        }
        // A lot is refilled as turns end; a listener with nothing under way and nothing in its
        // line (its retries parked while memory was short, say) has no turn to end, so it is
        // refilled here, once memory has room (taken back with none, they would be parked
        // again at once, at every tick).
        let memory_free = self.memory.available_permits() > 0;
        let idle_with_lot: Vec<String> = self
            .lanes
            .iter()
            .filter(|_| memory_free)
            .filter(|(_, lane)| {
                lane.gate.parked > 0
                    && lane.gate.in_flight == 0
                    && lane.line.is_empty()
                    && lane.gate.enabled
                    && !lane.gate.deleted
                    && !lane.gate.backed_off(now)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for listener_id in idle_with_lot {
            self.refill(&listener_id);
            self.catch_up(&listener_id);
            self.mark(&listener_id);
        }
        let overdue: Vec<String> = self
            .lanes
            .iter()
            .filter(|(_, lane)| lane.line.oldest_join_ms().is_some_and(|joined| joined + HOLD_LIMIT_MS < now))
            .map(|(id, _)| id.clone())
            .collect();
        for listener_id in overdue {
            let lane = self.lanes.get_mut(&listener_id).expect("listed above");
            let works = lane.line.take_waiting_since(now - HOLD_LIMIT_MS);
            let deleted = lane.gate.deleted;
            self.memory.add_permits(works.len());
            if deleted { self.cancel(works) } else { self.set_aside(works) }
        }
        // A rate-limited lane outlives its last request until its bucket is full again.
        let limited: Vec<String> =
            self.lanes.iter().filter(|(_, lane)| lane.gate.rate.is_some()).map(|(id, _)| id.clone()).collect();
        for listener_id in limited {
            self.forget_if_idle(&listener_id);
        }
        let detached: Vec<String> =
            self.lanes.iter().filter(|(_, lane)| lane.detached.is_some()).map(|(id, _)| id.clone()).collect();
        for listener_id in detached {
            self.catch_up(&listener_id);
        }
        while let Some(entry) = self.again.first_entry()
            && entry.key().0 <= now
        {
            let work = entry.remove();
            // Its listener is gone: whatever it is, it ends cancelled (never set aside, which
            // would detach a deleted listener).
            if self.lane(work.listener_id()).gate.deleted {
                self.cancel(vec![work]);
                continue;
            }
            // A detached listener reads it back itself: from here, for certain.
            if let Work::First(pair) = &work
                && !pair.lagging
                && self.lane(&pair.listener_id).detached.as_ref().is_some_and(|d| pair.seq >= d.since)
            {
                self.set_aside(vec![work]);
                continue;
            }
            // Back in a line if memory has a place for it, else set aside.
            let Ok(place) = self.memory.try_acquire() else {
                self.set_aside(vec![work]);
                continue;
            };
            place.forget();
            match self.offer(work, false, now) {
                None => {}
                Some((Verdict::Cancel, work)) => self.cancel(vec![work]),
                Some((_, work)) => self.set_aside(vec![work]),
            }
        }
    }

    /// Refreshes the gauges the dispatcher knows: fan-out's lag, requests in flight, work
    /// waiting, listeners backed off and detached.
    fn gauge(&self, now: u64) {
        use crate::metrics::set;
        let metrics = &self.context.metrics;
        let handed = self.progress.handed_until_seq();
        let lag = self.durable_seq.borrow().saturating_sub(handed);
        metrics.fanout_lag_events.set(i64::try_from(lag).unwrap_or(i64::MAX));
        let age = match lag {
            0 => 0.0,
            _ => match self.context.queue.event_at(handed) {
                Ok(Some(event)) => now.saturating_sub(event.created_at_ms) as f64 / 1000.0,
                _ => 0.0,
            },
        };
        metrics.fanout_lag_seconds.set(age);
        set(&metrics.in_flight, ("budget", "healthy"), self.in_use[Pool::Healthy.index()] as u64);
        set(&metrics.in_flight, ("budget", "suspect"), self.in_use[Pool::Suspect.index()] as u64);
        let (mut backed_off, mut detached, mut left_in_log) = (0u64, 0u64, 0u64);
        for lane in self.lanes.values() {
            backed_off += u64::from(lane.gate.backed_off(now));
            if let Some(lane_detached) = &lane.detached {
                detached += 1;
                left_in_log += handed.saturating_sub(lane_detached.read) + lane_detached.outstanding.len() as u64;
            }
        }
        let first_attempts = self.progress.outstanding() as u64 + left_in_log;
        set(&metrics.pending, ("kind", "first_attempt"), first_attempts);
        set(&metrics.listeners, ("state", "backed_off"), backed_off);
        set(&metrics.listeners, ("state", "detached"), detached);
    }

    fn write_cursor(&mut self, now: u64, force: bool) {
        if let Some(cursor) = self.progress.due(now, force)
            && let Err(error) = self.context.queue.set_fanout_cursor(&cursor)
        {
            self.progress.unwritten();
            self.ended_if_refused(&error);
            tracing::error!(error = &error as &dyn std::error::Error, "cannot record where fan-out stands");
        }
    }

    /// A write refused because this node's delivery term ended: nothing more is sent or
    /// written from this term (the node taking over redoes what is left).
    pub(super) fn ended_if_refused(&self, error: &StoreError) {
        self.context.ended_if_refused(error);
    }
}
