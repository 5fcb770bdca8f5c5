//! The dispatcher: hands due deliveries to workers, in queue order, within the limits.
//!
//! It is the only owner of the per-listener [`Gate`]s (in-flight count, held and parked
//! entries, back-off), so their decisions need no locks: workers report back through the
//! inbox. A delivery whose listener is at its in-flight cap is *held*: leased and kept in a
//! short in-memory line that the listener's next free slot takes from, with no further write.
//! Beyond that line, or while a listener is disabled, backed off or waiting on its order, a
//! delivery is *parked* in its listener's lot (kept in delivery order) instead of being
//! rescanned, so one hanging listener with a large backlog costs nothing per pass; finishing
//! work or the end of a back-off puts parked entries back. Each pass's decisions are one
//! atomic write: what may go or is held is leased (a crash makes it due again), and a worker
//! always reports back, even if it panics.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::worker::{self, Finished, Outcome};
use super::{Command, Context, blocking};
use crate::clock::now_ms;
use crate::store::{DueEntry, Listener, ListenerHealth, StoreError};

/// Most queue entries considered in one pass.
const PASS_LIMIT: usize = 512;
/// Consecutive failures after which a listener is backed off as a whole.
const BACKOFF_AFTER_FAILURES: u32 = 5;
/// Longest whole-listener back-off (shorter when the retry schedule's longest delay is).
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Parked entries put back per write when a listener is deleted.
const UNPARK_CHUNK: usize = 1000;
/// Entries held in memory for one listener at its cap, and for all listeners together.
const HELD_PER_LISTENER: usize = 256;
const HELD_TOTAL: usize = 16_384;
/// A parked count not known exactly (after a restart): "some", until a lot runs dry.
const SOME_PARKED: usize = usize::MAX / 2;

/// What the dispatcher knows about one listener.
#[derive(Debug, Default)]
struct Gate {
    in_flight: usize,
    /// Entries in the listener's parking lot.
    parked: usize,
    /// Leased entries waiting in memory for a free slot, oldest first, with their lease end.
    held: VecDeque<(DueEntry, u64)>,
    /// Queue key ids taken out of the lot and not yet seen again: they may pass the parked ones.
    released: HashSet<String>,
    /// Consecutive failed attempts.
    failures: u32,
    /// Back-offs in the current run of failures.
    backoffs: u32,
    blocked_until_ms: u64,
    /// Strict order, as last seen.
    ordered: bool,
}

impl Gate {
    fn is_idle(&self) -> bool {
        self.in_flight == 0
            && self.parked == 0
            && self.held.is_empty()
            && self.released.is_empty()
            && self.failures == 0
    }

    /// How many parked entries may be put back now.
    fn room(&self, cap: usize, now: u64) -> usize {
        if self.blocked_until_ms > now {
            return 0;
        }
        let cap = if self.ordered { 1 } else { cap };
        cap.saturating_sub(self.in_flight + self.released.len() + self.held.len()).min(self.parked)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Go,
    /// Lease it and keep it in memory until the listener has a free slot.
    Hold,
    Park,
}

/// What a pass found.
#[derive(Debug, PartialEq, Eq)]
enum Pass {
    /// Something was handed out, parked or re-leased: look again at once.
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
    /// Deliveries a worker or the held line has right now.
    in_flight: HashSet<String>,
    /// How many entries are held, and by which listeners.
    held_total: usize,
    holding: BTreeSet<String>,
    /// (back-off end, listener) of listeners backed off as a whole.
    backoffs: BTreeSet<(u64, String)>,
}

/// Tells the dispatcher a worker is done, whether the worker returns or unwinds.
struct Report {
    outbox: mpsc::UnboundedSender<Command>,
    finished: Option<Finished>,
}

impl Drop for Report {
    fn drop(&mut self) {
        if let Some(finished) = self.finished.take() {
            // The dispatcher is gone only at shutdown, when nothing is left to tell.
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
            in_flight: HashSet::new(),
            held_total: 0,
            holding: BTreeSet::new(),
            backoffs: BTreeSet::new(),
        }
    }

    fn cap(&self) -> usize {
        self.context.config.listener_in_flight.max(1)
    }

    /// Dispatches until `shutdown`, then waits for the workers it started.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let queue = self.context.queue.clone();
        match blocking(move || queue.recover()).await {
            Ok((released, parked)) => {
                if released > 0 {
                    tracing::info!(released, "leases of the previous run released");
                }
                // Parked lots are taken back a few at a time, like any other, so the first
                // delivery after a restart does not wait for a large backlog to move.
                for listener_id in parked {
                    self.gates.entry(listener_id.clone()).or_default().parked = SOME_PARKED;
                    let room = self.gates[&listener_id].room(self.cap(), now_ms());
                    self.unpark(&listener_id, room).await;
                }
            }
            Err(error) => tracing::error!(error = &error as &dyn std::error::Error, "cannot release old leases"),
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
                Pass::Progress => continue,
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

    /// When something next becomes due: the queue's first entry or the end of a back-off.
    async fn next_wake(&self) -> Option<u64> {
        let queue = self.context.queue.clone();
        let next_due = match blocking(move || queue.next_due_ms()).await {
            Ok(next_due) => next_due,
            // Look again soon; the error is logged by the pass that meets it.
            Err(_) => Some(now_ms() + 1000),
        };
        let next_backoff = self.backoffs.first().map(|(at_ms, _)| *at_ms);
        [next_due, next_backoff].into_iter().flatten().min()
    }

    /// Considers the due entries once: hands out, holds, parks or re-leases each.
    async fn pass(&mut self) -> Result<Pass, StoreError> {
        self.start_held_anywhere();
        let available = self.permits.available_permits();
        if available == 0 {
            return Ok(Pass::PoolFull);
        }
        let now = now_ms();
        let queue = self.context.queue.clone();
        let entries = blocking(move || queue.due(now, PASS_LIMIT)).await?;
        if entries.is_empty() {
            return Ok(Pass::Idle);
        }
        let listener_ids: HashSet<String> = entries.iter().map(|entry| entry.listener_id.clone()).collect();
        let store = self.context.store.clone();
        let listeners = blocking(move || -> Result<HashMap<String, Option<Listener>>, StoreError> {
            listener_ids.into_iter().map(|id| store.listener(&id).map(|listener| (id, listener))).collect()
        })
        .await?;

        let mut go: Vec<DueEntry> = Vec::new();
        let mut hold: Vec<DueEntry> = Vec::new();
        let mut park = Vec::new();
        let mut relet = Vec::new();
        // Releases used by this pass's decisions, to give back if its write fails.
        let mut used_releases = Vec::new();
        let mut chosen: HashSet<String> = HashSet::new();
        for entry in entries {
            if self.in_flight.contains(&entry.delivery_id) || chosen.contains(&entry.delivery_id) {
                // Its delivery is held or worked on (a lease that ran out, or a manual and a
                // scheduled attempt at once): extend, never hand one delivery out twice.
                relet.push(entry);
                continue;
            }
            if go.len() == available {
                break;
            }
            let listener = listeners.get(&entry.listener_id).and_then(Option::as_ref);
            let (verdict, used_release) = self.decide(&entry, listener, now, hold.len()).await?;
            if used_release {
                used_releases.push((entry.listener_id.clone(), entry.key_id()));
            }
            match verdict {
                Verdict::Go => {
                    chosen.insert(entry.delivery_id.clone());
                    go.push(entry);
                }
                Verdict::Hold => {
                    chosen.insert(entry.delivery_id.clone());
                    hold.push(entry);
                }
                Verdict::Park => park.push(entry),
            }
        }

        let lease_until = now + u64::try_from(self.context.lease().as_millis()).unwrap_or(u64::MAX / 2);
        let queue = self.context.queue.clone();
        let leased: Vec<DueEntry> = go.iter().chain(&hold).chain(&relet).cloned().collect();
        let parked = park.clone();
        if let Err(error) = blocking(move || queue.dispatch(&leased, &parked, lease_until)).await {
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
        let progressed = !go.is_empty() || !hold.is_empty() || !park.is_empty() || !relet.is_empty();
        for entry in hold {
            self.in_flight.insert(entry.delivery_id.clone());
            self.held_total += 1;
            self.holding.insert(entry.listener_id.clone());
            self.gates.entry(entry.listener_id.clone()).or_default().held.push_back((entry, lease_until));
        }
        for entry in go {
            self.spawn_worker(entry, lease_until);
        }
        Ok(if progressed { Pass::Progress } else { Pass::Idle })
    }

    /// Hands a leased entry (its gate already counts it in flight) to a worker.
    fn spawn_worker(&mut self, entry: DueEntry, lease_until: u64) {
        let permit = self.permits.clone().try_acquire_owned().expect("a permit was checked to be free");
        self.in_flight.insert(entry.delivery_id.clone());
        let context = self.context.clone();
        let finished = Finished {
            delivery_id: entry.delivery_id.clone(),
            listener_id: entry.listener_id.clone(),
            outcome: Outcome::NotSent,
        };
        let mut report = Report { outbox: self.outbox.clone(), finished: Some(finished) };
        self.workers.spawn(async move {
            let finished = worker::attempt(context, entry, lease_until).await;
            drop(permit);
            report.finished = Some(finished);
            drop(report);
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
            let Some((entry, lease_until)) = gate.held.pop_front() else {
                self.holding.remove(listener_id);
                return;
            };
            gate.in_flight += 1;
            if gate.held.is_empty() {
                self.holding.remove(listener_id);
            }
            self.held_total -= 1;
            self.in_flight.remove(&entry.delivery_id);
            self.spawn_worker(entry, lease_until);
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
    async fn decide(
        &mut self,
        entry: &DueEntry,
        listener: Option<&Listener>,
        now: u64,
        holding_now: usize,
    ) -> Result<(Verdict, bool), StoreError> {
        let cap = self.cap();
        // A deleted listener: the worker cancels the delivery; nothing is left to limit.
        let Some(listener) = listener else {
            self.gates.remove(&entry.listener_id);
            return Ok((Verdict::Go, false));
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
            let queue = self.context.queue.clone();
            let listener_id = entry.listener_id.clone();
            let head = blocking(move || queue.pending_head(&listener_id)).await?;
            if head.as_deref() != Some(entry.delivery_id.as_str()) {
                verdict = Verdict::Park;
            }
        }
        let gate = self.gates.entry(entry.listener_id.clone()).or_default();
        let cap = if gate.ordered { 1 } else { cap };
        // At its cap (or with others already waiting in line): wait in memory while the line
        // is short, else in the lot.
        if verdict == Verdict::Go && (gate.in_flight >= cap || !gate.held.is_empty()) {
            verdict = if gate.held.len() < HELD_PER_LISTENER && held_room { Verdict::Hold } else { Verdict::Park };
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
        Ok((verdict, released))
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Finished(finished) => self.finished(finished).await,
            Command::ListenerChanged(listener_id) => self.listener_changed(listener_id).await,
            // The next pass looks at the queue; nothing else to do.
            Command::Queued => {}
        }
    }

    /// A listener was changed through the API: start its run of failures afresh and look at
    /// its parking lot again (a deleted listener's lot is emptied; its workers cancel).
    async fn listener_changed(&mut self, listener_id: String) {
        let (store, queue, id) = (self.context.store.clone(), self.context.queue.clone(), listener_id.clone());
        let listener = blocking(move || -> Result<Option<Listener>, StoreError> {
            let listener = store.listener(&id)?;
            if listener.as_ref().is_some_and(|listener| listener.enabled) {
                queue.set_listener_health(&id, &ListenerHealth::default())?;
            }
            Ok(listener)
        })
        .await;
        match listener {
            Ok(Some(listener)) => {
                let cap = self.cap();
                let gate = self.gates.entry(listener_id.clone()).or_default();
                if !listener.enabled {
                    // Held entries of a disabled listener go back to waiting on their lease,
                    // which parks them when it ends.
                    for (entry, _) in gate.held.drain(..) {
                        self.in_flight.remove(&entry.delivery_id);
                        self.held_total -= 1;
                    }
                    self.holding.remove(&listener_id);
                }
                let gate = self.gates.entry(listener_id.clone()).or_default();
                gate.ordered = listener.ordered;
                gate.failures = 0;
                gate.backoffs = 0;
                gate.blocked_until_ms = 0;
                let room = gate.room(cap, now_ms());
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
                    for (entry, _) in gate.held {
                        self.in_flight.remove(&entry.delivery_id);
                        self.held_total -= 1;
                    }
                    self.holding.remove(&listener_id);
                }
                loop {
                    let queue = self.context.queue.clone();
                    let id = listener_id.clone();
                    match blocking(move || queue.unpark(&id, UNPARK_CHUNK)).await {
                        Ok(moved) if !moved.is_empty() => self.context.wake.notify_one(),
                        Ok(_) => break,
                        Err(error) => {
                            tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot release a deleted listener's deliveries");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                tracing::error!(%listener_id, error = &error as &dyn std::error::Error, "cannot read a changed listener");
            }
        }
    }

    async fn finished(&mut self, finished: Finished) {
        self.in_flight.remove(&finished.delivery_id);
        let now = now_ms();
        let cap = self.cap();
        let schedule = &self.context.config.retry_schedule;
        let max_backoff = MAX_BACKOFF.min(schedule.max_delay());
        let first_delay = schedule.first_delay();
        let Some(gate) = self.gates.get_mut(&finished.listener_id) else {
            return;
        };
        gate.in_flight = gate.in_flight.saturating_sub(1);
        match finished.outcome {
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
                    self.backoffs.insert((gate.blocked_until_ms, finished.listener_id.clone()));
                    tracing::debug!(listener_id = %finished.listener_id, ?backoff, failures = gate.failures, "listener backed off");
                }
            }
            Outcome::NotSent => {}
        }
        // The freed slot goes to the next held entry first (no write needed) ...
        self.start_held(&finished.listener_id);
        // ... and the freed worker to another listener's line if this one has none.
        self.start_held_anywhere();
        let Some(gate) = self.gates.get_mut(&finished.listener_id) else { return };
        // An ordered listener moves on only when its head has ended.
        let room = if gate.ordered && finished.outcome == Outcome::Retrying { 0 } else { gate.room(cap, now) };
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
            let Some(gate) = self.gates.get(&listener_id) else { continue };
            let room = gate.room(cap, now);
            if room > 0 {
                self.unpark(&listener_id, room).await;
            }
        }
    }

    /// Moves up to `count` of a listener's parked entries back to the queue, oldest delivery
    /// first, and lets them pass the ones still parked.
    async fn unpark(&mut self, listener_id: &str, count: usize) {
        let queue = self.context.queue.clone();
        let id = listener_id.to_owned();
        match blocking(move || queue.unpark(&id, count)).await {
            Ok(moved) => {
                let gate = self.gates.entry(listener_id.to_owned()).or_default();
                // Fewer than asked: the lot is empty now, whatever was counted.
                gate.parked = if moved.len() < count { 0 } else { gate.parked.saturating_sub(moved.len()) };
                gate.released.extend(moved);
                self.context.wake.notify_one();
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
    fn room_respects_cap_order_and_back_off() {
        let gate = Gate { in_flight: 2, parked: 10, ..Gate::default() };
        assert_eq!(gate.room(8, 0), 6);
        let ordered = Gate { parked: 10, ordered: true, ..Gate::default() };
        assert_eq!(ordered.room(8, 0), 1);
        let blocked = Gate { parked: 10, blocked_until_ms: 100, ..Gate::default() };
        assert_eq!(blocked.room(8, 99), 0);
        assert_eq!(blocked.room(8, 100), 8);
        let released = Gate { parked: 1, released: ["a".to_owned()].into(), ..Gate::default() };
        assert_eq!(released.room(8, 0), 1);
    }
}
