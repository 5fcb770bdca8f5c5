//! The dispatcher: hands due deliveries to workers, in queue order, within the limits.
//!
//! It is the only owner of the per-listener [`Gate`]s (in-flight count, held and parked
//! entries, back-off) and of who has which queue entry, so their decisions need no locks and
//! no writes: workers report back through the inbox. A queue entry stays in the store while
//! it is worked on (a crash leaves it due, in order); the dispatcher remembers in memory
//! which entries are claimed and reads the queue from a cursor, so a claimed entry is not
//! read again on every pass. Whoever queues an entry behind the cursor (fan-out racing a
//! retry, a worker handing an entry back, an unparked lot, the API) rewinds it.
//!
//! A delivery whose listener is at its in-flight cap is *held*: claimed and kept in an
//! in-memory line that the listener's next free slot takes from. Beyond that line, or while
//! a listener is disabled, backed off or waiting on its order, a delivery is *parked* in its
//! listener's lot (kept in delivery order) instead of being rescanned, so one hanging
//! listener with a large backlog costs nothing per pass; finishing work or the end of a
//! back-off puts parked entries back, half a line at a time. A worker reports back twice: when
//! the listener has answered, which frees the listener's slot and the pool's worker (the
//! limits count requests, not disk writes), and when the attempt is recorded, which ends the
//! claim; the second always comes, even if the worker panics.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::worker::{self, Finished, Outcome};
use super::{Command, Context};
use crate::clock::now_ms;
use crate::store::{DueEntry, Listener, ListenerHealth, QueuePosition, StoreError};

/// Most queue entries considered in one pass.
const PASS_LIMIT: usize = 512;
/// Consecutive failures after which a listener is backed off as a whole.
const BACKOFF_AFTER_FAILURES: u32 = 5;
/// Longest whole-listener back-off (shorter when the retry schedule's longest delay is).
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Most parked entries put back in one write (kept short, like every pipeline batch: it
/// holds sled's process-wide lock while it applies).
const UNPARK_CHUNK: usize = 256;
/// Entries held in memory for one listener at its cap, and for all listeners together (an
/// entry held costs about 200 bytes, so at most 26 MB; a parked one two writes to park and
/// two to put back). Full bench, 100,000 deliveries to one listener, three runs each: with
/// lines of 16,384, 9,949-10,871/s at 125-138 µs of CPU each; with 65,536, 10,770-13,166/s
/// at 105-126 µs.
const HELD_PER_LISTENER: usize = 65_536;
const HELD_TOTAL: usize = 131_072;
/// How long the entry of a worker that unwound waits before it is read again.
const UNWOUND_PAUSE_MS: u64 = 1000;
/// A parked count not known exactly (after a restart): "some", until a lot runs dry.
const SOME_PARKED: usize = usize::MAX / 2;

/// What the dispatcher knows about one listener.
#[derive(Debug, Default)]
struct Gate {
    in_flight: usize,
    /// Entries in the listener's parking lot.
    parked: usize,
    /// Claimed entries waiting in memory for a free slot, oldest first.
    held: VecDeque<DueEntry>,
    /// Queue key ids taken out of the lot and not yet seen again: they may pass the parked ones.
    released: HashSet<String>,
    /// Consecutive failed attempts.
    failures: u32,
    /// Back-offs in the current run of failures.
    backoffs: u32,
    blocked_until_ms: u64,
    /// Strict order, as last seen.
    ordered: bool,
    /// The listener was found deleted and its gate's clearing is asked for.
    deleted: bool,
}

impl Gate {
    fn is_idle(&self) -> bool {
        self.in_flight == 0
            && self.parked == 0
            && self.held.is_empty()
            && self.released.is_empty()
            && self.failures == 0
    }

    /// How many parked entries may be put back now: for an ordered listener its head, else
    /// enough to fill its slots and its line, once the line is down to half (so a listener
    /// with a large backlog costs one write per half line, not one per delivery). The line
    /// takes no more than `line_free`, what the line of all listeners has left: entries put
    /// back beyond that would only be parked again.
    fn room(&self, cap: usize, now: u64, line_free: usize) -> usize {
        if self.blocked_until_ms > now {
            return 0;
        }
        let waiting = self.held.len() + self.released.len();
        if self.ordered {
            return 1usize.saturating_sub(self.in_flight + waiting).min(self.parked);
        }
        if waiting > HELD_PER_LISTENER / 2 {
            return 0;
        }
        let line = HELD_PER_LISTENER.saturating_sub(waiting).min(line_free);
        (cap.saturating_sub(self.in_flight) + line).min(self.parked)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Go,
    /// Claim it and keep it in memory until the listener has a free slot.
    Hold,
    Park,
}

/// What a pass found.
#[derive(Debug, PartialEq, Eq)]
enum Pass {
    /// Something was handed out, held or parked, or there may be more to read: look again
    /// at once.
    Progress,
    /// Nothing is due.
    Idle,
    /// Every worker is busy.
    PoolFull,
}

pub(crate) struct Dispatcher {
    context: Arc<Context>,
    inbox: mpsc::UnboundedReceiver<Command>,
    outbox: mpsc::UnboundedSender<Command>,
    permits: Arc<Semaphore>,
    workers: TaskTracker,
    gates: HashMap<String, Gate>,
    /// Deliveries a worker or the held line has right now, with the queue entry claimed.
    in_flight: HashMap<String, QueuePosition>,
    /// Deliveries with an entry skipped because another entry of theirs was claimed (a
    /// manual attempt beside the scheduled one), with the skipped entry's due time: read
    /// again when the claimed one is done.
    deferred: HashMap<String, u64>,
    /// The queue is read from just after here; everything before it is decided, claimed or
    /// deferred. `None`: from the start.
    cursor: Option<QueuePosition>,
    /// Entries past the cursor may be due that no pass has read yet (the cursor moved back,
    /// something was queued, or the last pass stopped early).
    stale: bool,
    /// When the first entry past the cursor is due, as the last pass to reach the end saw.
    next_due_ms: Option<u64>,
    /// (when, due time) of entries to read again later: those of workers that unwound.
    later: BTreeSet<(u64, u64)>,
    /// How many entries are held, and by which listeners.
    held_total: usize,
    holding: BTreeSet<String>,
    /// (back-off end, listener) of listeners backed off as a whole.
    backoffs: BTreeSet<(u64, String)>,
}

/// One attempt's hold on the dispatcher's limits, carried by the worker that makes it.
///
/// The pool's permit and the listener's slot are given back as soon as the listener has
/// answered ([`Turn::answered`]), while the attempt is still being recorded: the limits
/// count requests to listeners, and the listener's next request need not wait for a disk
/// write. The delivery stays claimed until the turn ends, so its entry is not handed out
/// again before the record lands. The end is always reported, even if the worker unwinds.
pub(crate) struct Turn {
    outbox: mpsc::UnboundedSender<Command>,
    listener_id: String,
    permit: Option<OwnedSemaphorePermit>,
    answered: bool,
    /// What is reported when the turn ends: how the worker finished or, until it returns,
    /// that it unwound (if it is dropped or panics first).
    report: Option<Finished>,
}

impl Turn {
    /// The listener has answered (or the attempt failed without a request): frees its slot
    /// and the pool's permit, and counts `outcome` toward the listener's run of failures.
    pub fn answered(&mut self, outcome: Outcome) {
        if self.answered {
            return;
        }
        self.answered = true;
        self.permit = None;
        // The dispatcher is gone only at shutdown, when nothing is left to tell.
        let _ = self.outbox.send(Command::Answered { listener_id: self.listener_id.clone(), outcome });
    }

    /// Reports how the turn ended.
    fn end(mut self, finished: Finished) {
        self.report = Some(finished);
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(mut finished) = self.report.take() {
            finished.answered = self.answered;
            let _ = self.outbox.send(Command::Finished(finished));
        }
    }
}

impl Dispatcher {
    pub fn new(
        context: Arc<Context>,
        inbox: mpsc::UnboundedReceiver<Command>,
        outbox: mpsc::UnboundedSender<Command>,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(context.config.workers.max(1)));
        Self {
            context,
            inbox,
            outbox,
            permits,
            workers: TaskTracker::new(),
            gates: HashMap::new(),
            in_flight: HashMap::new(),
            deferred: HashMap::new(),
            cursor: None,
            stale: true,
            next_due_ms: None,
            later: BTreeSet::new(),
            held_total: 0,
            holding: BTreeSet::new(),
            backoffs: BTreeSet::new(),
        }
    }

    fn cap(&self) -> usize {
        self.context.config.listener_in_flight.max(1)
    }

    /// What the line of all listeners has left.
    fn line_free(&self) -> usize {
        HELD_TOTAL.saturating_sub(self.held_total)
    }

    /// Dispatches until `shutdown`, then waits for the workers it started.
    pub async fn run(mut self, shutdown: CancellationToken) {
        match self.context.queue.parked_listeners() {
            Ok(parked) => {
                // Parked lots are taken back a few at a time, so the first delivery after a
                // restart does not wait for a large backlog to move; finished attempts take
                // back more.
                for listener_id in parked {
                    self.gates.entry(listener_id.clone()).or_default().parked = SOME_PARKED;
                    self.unpark(&listener_id, self.cap()).await;
                }
            }
            Err(error) => tracing::error!(error = &error as &dyn std::error::Error, "cannot read the parking lots"),
        }
        while !shutdown.is_cancelled() {
            while let Ok(command) = self.inbox.try_recv() {
                self.handle(command).await;
            }
            self.end_backoffs().await;
            let pass = match self.pass().await {
                Ok(pass) => pass,
                Err(error) => {
                    tracing::error!(error = &error as &dyn std::error::Error, "dispatch pass failed; retrying");
                    let pause = tokio::time::sleep(Duration::from_secs(1));
                    if shutdown.run_until_cancelled(pause).await.is_none() {
                        break;
                    }
                    continue;
                }
            };
            match pass {
                // Store calls run in place and never yield: let the workers (and a shutdown)
                // have the thread between passes.
                Pass::Progress => tokio::task::yield_now().await,
                Pass::PoolFull => {
                    tokio::select! {
                        command = self.inbox.recv() => if let Some(command) = command { self.handle(command).await },
                        () = shutdown.cancelled() => break,
                    }
                }
                Pass::Idle => {
                    let wake_at = self.next_wake().await;
                    let sleep = async {
                        match wake_at {
                            Some(at_ms) => {
                                tokio::time::sleep(Duration::from_millis(at_ms.saturating_sub(now_ms()))).await
                            }
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        command = self.inbox.recv() => if let Some(command) = command { self.handle(command).await },
                        () = self.context.wake.notified() => {}
                        () = sleep => {}
                        () = shutdown.cancelled() => break,
                    }
                }
            }
        }
        self.workers.close();
        self.workers.wait().await;
    }

    /// When something next becomes due: the queue's first entry past the cursor or the end
    /// of a back-off.
    async fn next_wake(&self) -> Option<u64> {
        let next_backoff = self.backoffs.first().map(|(at_ms, _)| *at_ms);
        let next_later = self.later.first().map(|(at_ms, _)| *at_ms);
        [self.next_due_ms, next_backoff, next_later].into_iter().flatten().min()
    }

    /// Entries due at `due_ms` or later may be new to the dispatcher: read them (again).
    fn rewind(&mut self, due_ms: u64) {
        self.rewind_to((due_ms, String::new()));
    }

    /// Entries after `to` may be new to the dispatcher: moves the cursor back there if it is
    /// past it, and makes the next pass read.
    fn rewind_to(&mut self, to: QueuePosition) {
        if self.cursor.as_ref().is_some_and(|cursor| to < *cursor) {
            self.cursor = Some(to);
        }
        self.stale = true;
    }

    /// After a pass that read every due entry past the cursor: nothing is left to read until
    /// something is queued or the next entry falls due.
    fn caught_up(&mut self) -> Result<(), StoreError> {
        let after = self.cursor.clone();
        self.next_due_ms = self.context.queue.next_due_ms(after.as_ref())?;
        self.stale = false;
        Ok(())
    }

    /// Reads the due entries past the cursor once: hands out, holds, parks or skips each.
    async fn pass(&mut self) -> Result<Pass, StoreError> {
        self.start_held_anywhere();
        let now = now_ms();
        while let Some(&(at_ms, due_ms)) = self.later.first()
            && at_ms <= now
        {
            self.later.pop_first();
            self.rewind(due_ms);
        }
        let queued_from = self.context.queued_from.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(from) = queued_from {
            self.rewind_to(from);
        }
        let available = self.permits.available_permits();
        if available == 0 {
            return Ok(Pass::PoolFull);
        }
        if !self.stale && self.next_due_ms.is_none_or(|due_ms| due_ms > now) {
            return Ok(Pass::Idle);
        }
        // Read about what can be handed out; what is read but not decided is read again.
        let limit = (available * 2).clamp(16, PASS_LIMIT);
        let entries = self.context.queue.due(self.cursor.as_ref(), now, limit)?;
        if entries.is_empty() {
            self.caught_up()?;
            return Ok(Pass::Idle);
        }
        let full_page = entries.len() == limit;
        let listener_ids: HashSet<String> = entries
            .iter()
            .filter(|entry| !self.in_flight.contains_key(&entry.delivery_id))
            .map(|entry| entry.listener_id.clone())
            .collect();
        let listeners = listener_ids
            .into_iter()
            .map(|id| self.context.store.listener(&id).map(|listener| (id, listener)))
            .collect::<Result<HashMap<String, Option<Listener>>, StoreError>>()?;
        // The heads of ordered listeners, read before any decision: a pass either fails
        // before it has decided anything or not at all, so no count is left half changed.
        let heads = listeners
            .iter()
            .filter(|(_, listener)| listener.as_ref().is_some_and(|listener| listener.ordered))
            .map(|(id, _)| self.context.queue.pending_head(id).map(|head| (id.clone(), head)))
            .collect::<Result<HashMap<String, Option<String>>, StoreError>>()?;

        let mut go: Vec<DueEntry> = Vec::new();
        let mut hold: Vec<DueEntry> = Vec::new();
        let mut park = Vec::new();
        let mut deferred = Vec::new();
        // Releases used by this pass's decisions, to give back if its write fails.
        let mut used_releases = Vec::new();
        let mut chosen: HashMap<String, QueuePosition> = HashMap::new();
        let mut last = None;
        let mut stopped_early = false;
        for entry in entries {
            let position = (entry.due_ms, entry.key_id());
            let claimed = self.in_flight.get(&entry.delivery_id).or_else(|| chosen.get(&entry.delivery_id));
            if let Some(claimed) = claimed {
                // Never hand one delivery out twice: another entry of it (a manual attempt
                // beside the scheduled one, or its next attempt already queued) waits for it.
                if *claimed != position {
                    deferred.push((entry.delivery_id.clone(), entry.due_ms));
                }
                last = Some(position);
                continue;
            }
            if go.len() == available {
                stopped_early = true;
                break;
            }
            let listener = listeners.get(&entry.listener_id).and_then(Option::as_ref);
            let head = heads.get(&entry.listener_id).and_then(Option::as_deref);
            let (verdict, used_release) = self.decide(&entry, listener, head, now, hold.len());
            if used_release {
                used_releases.push((entry.listener_id.clone(), position.1.clone()));
            }
            match verdict {
                Verdict::Go => {
                    chosen.insert(entry.delivery_id.clone(), position.clone());
                    go.push(entry);
                }
                Verdict::Hold => {
                    chosen.insert(entry.delivery_id.clone(), position.clone());
                    hold.push(entry);
                }
                Verdict::Park => park.push(entry),
            }
            last = Some(position);
        }

        if !park.is_empty()
            && let Err(error) = self.context.queue.park(&park)
        {
            // Nothing changed in the store: undo what the decisions counted.
            for entry in &go {
                if let Some(gate) = self.gates.get_mut(&entry.listener_id) {
                    gate.in_flight = gate.in_flight.saturating_sub(1);
                }
            }
            for entry in &park {
                if let Some(gate) = self.gates.get_mut(&entry.listener_id) {
                    gate.parked = gate.parked.saturating_sub(1);
                }
            }
            for (listener_id, key_id) in used_releases {
                self.gates.entry(listener_id).or_default().released.insert(key_id);
            }
            return Err(error);
        }
        if last.is_some() {
            self.cursor = last;
        }
        for (delivery_id, due_ms) in deferred {
            let due = self.deferred.entry(delivery_id).or_insert(due_ms);
            *due = (*due).min(due_ms);
        }
        let progressed = !go.is_empty() || !hold.is_empty() || !park.is_empty();
        for entry in hold {
            self.in_flight.insert(entry.delivery_id.clone(), (entry.due_ms, entry.key_id()));
            self.held_total += 1;
            self.holding.insert(entry.listener_id.clone());
            self.gates.entry(entry.listener_id.clone()).or_default().held.push_back(entry);
        }
        for entry in go {
            self.spawn_worker(entry);
        }
        if full_page || stopped_early {
            return Ok(Pass::Progress);
        }
        self.caught_up()?;
        Ok(if progressed { Pass::Progress } else { Pass::Idle })
    }

    /// Hands a claimed entry (its gate already counts it in flight) to a worker.
    fn spawn_worker(&mut self, entry: DueEntry) {
        let permit = self.permits.clone().try_acquire_owned().expect("a permit was checked to be free");
        self.in_flight.insert(entry.delivery_id.clone(), (entry.due_ms, entry.key_id()));
        let context = self.context.clone();
        // If the worker unwinds (or is dropped), the entry is still queued: it is read again
        // after a pause, never at once, so a failing worker cannot spin the dispatcher.
        let finished = Finished {
            delivery_id: entry.delivery_id.clone(),
            listener_id: entry.listener_id.clone(),
            outcome: Outcome::NotSent,
            look_again_ms: None,
            unwound: Some(entry.due_ms),
            answered: false,
        };
        let mut turn = Turn {
            outbox: self.outbox.clone(),
            listener_id: entry.listener_id.clone(),
            permit: Some(permit),
            answered: false,
            report: Some(finished),
        };
        self.workers.spawn(async move {
            let finished = worker::attempt(context, entry, &mut turn).await;
            turn.end(finished);
        });
    }

    /// Starts held entries of `listener_id` while it has free slots and the pool has workers.
    fn start_held(&mut self, listener_id: &str) {
        let cap = self.cap();
        let now = now_ms();
        loop {
            if self.permits.available_permits() == 0 {
                return;
            }
            let Some(gate) = self.gates.get_mut(listener_id) else { return };
            let cap = if gate.ordered { 1 } else { cap };
            if gate.in_flight >= cap || gate.blocked_until_ms > now {
                return;
            }
            let Some(entry) = gate.held.pop_front() else {
                self.holding.remove(listener_id);
                return;
            };
            gate.in_flight += 1;
            if gate.held.is_empty() {
                self.holding.remove(listener_id);
            }
            self.held_total -= 1;
            self.spawn_worker(entry);
        }
    }

    /// Starts held entries of every listener that has room, while the pool has workers.
    fn start_held_anywhere(&mut self) {
        let holding: Vec<String> = self.holding.iter().cloned().collect();
        for listener_id in holding {
            if self.permits.available_permits() == 0 {
                return;
            }
            self.start_held(&listener_id);
        }
    }

    /// May this entry go now, wait in memory, or wait parked? Counts what it decides in the
    /// listener's gate; also says whether the entry was one released from the parking lot.
    /// `holding_now`: entries this pass already decided to hold.
    fn decide(
        &mut self,
        entry: &DueEntry,
        listener: Option<&Listener>,
        head: Option<&str>,
        now: u64,
        holding_now: usize,
    ) -> (Verdict, bool) {
        let cap = self.cap();
        // A deleted listener: the worker cancels the delivery; nothing is left to limit. Its
        // gate (and the entries in its line) is cleared by a change notice, never in the
        // middle of a pass: the pass moves its cursor past what it reads, so entries put back
        // now would be skipped. The notice is asked for here too, in case the API's never
        // comes (a caller gone between the delete and the notice).
        let Some(listener) = listener else {
            if let Some(gate) = self.gates.get_mut(&entry.listener_id)
                && !gate.deleted
            {
                gate.deleted = true;
                let _ = self.outbox.send(Command::ListenerChanged(entry.listener_id.clone()));
            }
            return (Verdict::Go, false);
        };
        let held_room = self.held_total + holding_now < HELD_TOTAL;
        let gate = self.gates.entry(entry.listener_id.clone()).or_default();
        gate.ordered = listener.ordered;
        let released = gate.released.remove(&entry.key_id());
        let must_park = !listener.enabled
            // A manual attempt is asked for now: a back-off does not hold it.
            || (gate.blocked_until_ms > now && !entry.manual)
            // Older deliveries are parked: this one waits behind them (unordered listeners;
            // ordered ones follow their pending head below; manual attempts keep no order).
            || (!listener.ordered && !entry.manual && gate.parked > 0 && !released);
        let mut verdict = if must_park { Verdict::Park } else { Verdict::Go };
        if verdict == Verdict::Go && listener.ordered && !entry.manual {
            // Behind its head it waits. Deliveries created while the listener was unordered
            // are not indexed: older than the head (or with none), they go, one at a time.
            if head.is_some_and(|head| head < entry.delivery_id.as_str()) {
                verdict = Verdict::Park;
            }
        }
        let gate = self.gates.entry(entry.listener_id.clone()).or_default();
        let cap = if gate.ordered { 1 } else { cap };
        // At its cap (or with others already waiting in line): wait in memory while the line
        // is short, else in the lot. A failing listener gets no line: its backlog waits in
        // the lot, so memory stays flat however long it fails.
        if verdict == Verdict::Go && (gate.in_flight >= cap || !gate.held.is_empty()) {
            let line = gate.held.len() < HELD_PER_LISTENER && held_room && gate.failures == 0;
            verdict = if line { Verdict::Hold } else { Verdict::Park };
        }
        match verdict {
            Verdict::Go => gate.in_flight += 1,
            Verdict::Hold => {}
            Verdict::Park => {
                gate.parked += 1;
                if released {
                    // A released entry went back to the lot: the others released with it must
                    // not overtake it, so they wait their turn in the lot again too.
                    gate.released.clear();
                }
            }
        }
        (verdict, released)
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Answered { listener_id, outcome } => self.answered(&listener_id, outcome),
            Command::Finished(finished) => self.finished(finished).await,
            Command::ListenerChanged(listener_id) => self.listener_changed(listener_id).await,
            // Deliveries were queued outside fan-out (replay, retry, recovery), anywhere in
            // the queue: read it again from the start.
            Command::Queued => {
                self.cursor = None;
                self.stale = true;
            }
        }
    }

    /// A listener was changed through the API: start its run of failures afresh and look at
    /// its parking lot again (a deleted listener's lot is cancelled where it lies).
    async fn listener_changed(&mut self, listener_id: String) {
        let listener = self.context.store.listener(&listener_id);
        if let Ok(Some(listener)) = &listener
            && listener.enabled
            && let Err(error) = self.context.queue.set_listener_health(&listener_id, &ListenerHealth::default())
        {
            // The notice is still acted on: its lot must not wait for a write that failed.
            tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot reset a listener's run of failures");
        }
        match listener {
            Ok(Some(listener)) => {
                let cap = self.cap();
                if !listener.enabled {
                    // Held entries of a disabled listener are read again, which parks them.
                    let gate = self.gates.entry(listener_id.clone()).or_default();
                    let held: Vec<DueEntry> = gate.held.drain(..).collect();
                    self.holding.remove(&listener_id);
                    for entry in held {
                        self.release(&entry.delivery_id);
                        self.held_total -= 1;
                        self.rewind(entry.due_ms);
                    }
                }
                let line_free = self.line_free();
                let gate = self.gates.entry(listener_id.clone()).or_default();
                gate.ordered = listener.ordered;
                gate.failures = 0;
                gate.backoffs = 0;
                gate.blocked_until_ms = 0;
                let room = gate.room(cap, now_ms(), line_free);
                if room > 0 {
                    self.unpark(&listener_id, room).await;
                }
            }
            Ok(None) => {
                // Held entries of a deleted listener go to workers, which cancel them.
                if let Some(gate) = self.gates.get_mut(&listener_id) {
                    gate.in_flight = 0;
                    gate.ordered = false;
                }
                self.start_held(&listener_id);
                if let Some(gate) = self.gates.remove(&listener_id) {
                    // Those the pool had no worker for are read again (and cancelled).
                    for entry in gate.held {
                        self.release(&entry.delivery_id);
                        self.held_total -= 1;
                        self.rewind(entry.due_ms);
                    }
                }
                self.holding.remove(&listener_id);
                // Its lot (millions, perhaps) is cancelled where it lies, in short writes on a
                // task of its own: put back in the queue, its old entries would come before
                // everyone else's and keep the workers busy cancelling. Shutdown does not wait
                // for it (each write is whole; a restart finishes the job).
                let context = self.context.clone();
                tokio::spawn(async move {
                    loop {
                        match context.queue.cancel_parked(&listener_id, UNPARK_CHUNK) {
                            Ok(lot) if lot.taken == 0 => break,
                            Ok(lot) => {
                                if let Some(due_ms) = lot.requeued_from_ms {
                                    context.queued((due_ms, String::new()));
                                }
                                tokio::task::yield_now().await;
                            }
                            Err(error) => {
                                // A restart finds the lot and hands it to workers, which cancel.
                                tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot cancel a deleted listener's parked deliveries");
                                break;
                            }
                        }
                    }
                });
            }
            Err(error) => {
                tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot read a changed listener");
            }
        }
    }

    /// A delivery is no longer claimed: an entry of it that waited for that is read again.
    fn release(&mut self, delivery_id: &str) {
        self.in_flight.remove(delivery_id);
        if let Some(due_ms) = self.deferred.remove(delivery_id) {
            self.rewind(due_ms);
        }
    }

    /// A listener answered an attempt: its slot is free, and the outcome counts toward its
    /// run of failures.
    fn answered(&mut self, listener_id: &str, outcome: Outcome) {
        self.count_outcome(listener_id, outcome);
        // The freed slot goes to the next held entry first (no write needed) ...
        self.start_held(listener_id);
        // ... and the freed worker to another listener's line if this one has none.
        self.start_held_anywhere();
    }

    /// Frees a listener's slot and counts the attempt's outcome: a success ends a run of
    /// failures, enough failures in a row back the listener off.
    fn count_outcome(&mut self, listener_id: &str, outcome: Outcome) {
        let now = now_ms();
        let schedule = &self.context.config.retry_schedule;
        let max_backoff = MAX_BACKOFF.min(schedule.max_delay());
        let first_delay = schedule.first_delay();
        let Some(gate) = self.gates.get_mut(listener_id) else {
            return;
        };
        gate.in_flight = gate.in_flight.saturating_sub(1);
        match outcome {
            Outcome::Succeeded => {
                gate.failures = 0;
                gate.backoffs = 0;
                gate.blocked_until_ms = 0;
            }
            Outcome::Retrying | Outcome::FailedForGood => {
                gate.failures += 1;
                // Attempts still in flight when a back-off began do not lengthen it.
                if gate.failures >= BACKOFF_AFTER_FAILURES && gate.blocked_until_ms <= now {
                    let backoff = backoff(first_delay, gate.backoffs, max_backoff);
                    gate.backoffs += 1;
                    gate.blocked_until_ms = now + u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX / 2);
                    self.backoffs.insert((gate.blocked_until_ms, listener_id.to_owned()));
                    tracing::debug!(%listener_id, ?backoff, failures = gate.failures, "listener backed off");
                }
            }
            Outcome::NotSent => {}
        }
    }

    /// A worker's turn ended: its delivery is no longer claimed, and its listener may take
    /// more from its line or its lot.
    async fn finished(&mut self, finished: Finished) {
        self.release(&finished.delivery_id);
        if let Some(due_ms) = finished.unwound {
            self.later.insert((now_ms() + UNWOUND_PAUSE_MS, due_ms));
        }
        if let Some(due_ms) = finished.look_again_ms {
            self.rewind(due_ms);
        }
        if !finished.answered {
            self.count_outcome(&finished.listener_id, finished.outcome);
        }
        self.start_held(&finished.listener_id);
        self.start_held_anywhere();
        let (cap, line_free) = (self.cap(), self.line_free());
        let Some(gate) = self.gates.get_mut(&finished.listener_id) else { return };
        // An ordered listener moves on only when its head has ended.
        let room =
            if gate.ordered && finished.outcome == Outcome::Retrying { 0 } else { gate.room(cap, now_ms(), line_free) };
        if room > 0 {
            self.unpark(&finished.listener_id, room).await;
        } else if gate.is_idle() {
            self.gates.remove(&finished.listener_id);
        }
    }

    /// Puts back parked entries of listeners whose back-off has ended.
    async fn end_backoffs(&mut self) {
        let now = now_ms();
        let cap = self.cap();
        while let Some((at_ms, listener_id)) = self.backoffs.first().cloned() {
            if at_ms > now {
                break;
            }
            self.backoffs.pop_first();
            let Some(gate) = self.gates.get_mut(&listener_id) else { continue };
            if gate.blocked_until_ms != at_ms {
                continue;
            }
            gate.blocked_until_ms = 0;
            self.start_held(&listener_id);
            let line_free = self.line_free();
            let Some(gate) = self.gates.get(&listener_id) else { continue };
            let room = gate.room(cap, now, line_free);
            if room > 0 {
                self.unpark(&listener_id, room).await;
            }
        }
    }

    /// Moves up to `count` of a listener's parked entries back to the queue, oldest delivery
    /// first, and lets them pass the ones still parked.
    async fn unpark(&mut self, listener_id: &str, count: usize) {
        let count = count.min(UNPARK_CHUNK);
        match self.context.queue.unpark(listener_id, count) {
            Ok(moved) => {
                if let Some(due_ms) = moved.iter().map(|(due_ms, _)| *due_ms).min() {
                    self.rewind(due_ms);
                }
                let gate = self.gates.entry(listener_id.to_owned()).or_default();
                // Fewer than asked: the lot is empty now, whatever was counted.
                gate.parked = if moved.len() < count { 0 } else { gate.parked.saturating_sub(moved.len()) };
                gate.released.extend(moved.into_iter().map(|(_, key_id)| key_id));
            }
            Err(error) => {
                tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot put parked deliveries back");
            }
        }
    }
}

/// The `episode`-th whole-listener back-off of a run of failures: doubling from the
/// schedule's first delay, at most `max`.
fn backoff(first_delay: Duration, episode: u32, max: Duration) -> Duration {
    first_delay.saturating_mul(1 << episode.min(20)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_first_delay_up_to_its_limit() {
        let max = Duration::from_secs(300);
        let table = [(0, 1), (1, 2), (2, 4), (5, 32), (9, 300), (40, 300)];
        for (episode, secs) in table {
            assert_eq!(backoff(Duration::from_secs(1), episode, max), Duration::from_secs(secs), "episode {episode}");
        }
        assert_eq!(backoff(Duration::from_millis(100), 10, Duration::from_millis(200)), Duration::from_millis(200));
    }

    #[test]
    fn room_fills_slots_and_line_from_half_empty_respecting_order_and_back_off() {
        let line = 8 + HELD_PER_LISTENER;
        let all = HELD_TOTAL;
        let gate = Gate { in_flight: 2, parked: 1_000_000, ..Gate::default() };
        assert_eq!(gate.room(8, 0, all), line - 2);
        assert_eq!(gate.room(8, 0, 100), 6 + 100, "the slots, and no more of the line than all listeners have left");
        assert_eq!(gate.room(8, 0, 0), 6);
        let few = Gate { in_flight: 8, parked: 10, ..Gate::default() };
        assert_eq!(few.room(8, 0, all), 10);
        let entry =
            |n: usize| DueEntry { due_ms: 0, delivery_id: n.to_string(), listener_id: "l".into(), manual: false };
        let half: VecDeque<DueEntry> = (0..=HELD_PER_LISTENER / 2).map(entry).collect();
        let busy = Gate { in_flight: 8, parked: 1_000_000, held: half, ..Gate::default() };
        assert_eq!(busy.room(8, 0, all), 0, "no refill while the line is more than half full");
        let ordered = Gate { parked: 10, ordered: true, ..Gate::default() };
        assert_eq!(ordered.room(8, 0, all), 1);
        let ordered_busy = Gate { in_flight: 1, parked: 10, ordered: true, ..Gate::default() };
        assert_eq!(ordered_busy.room(8, 0, all), 0);
        let blocked = Gate { parked: 10, blocked_until_ms: 100, ..Gate::default() };
        assert_eq!(blocked.room(8, 99, all), 0);
        assert_eq!(blocked.room(8, 100, all), 10);
        let released = Gate { parked: 1, released: ["a".to_owned()].into(), ..Gate::default() };
        assert_eq!(released.room(8, 0, all), 1);
    }
}
