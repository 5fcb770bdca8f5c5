//! The dispatcher: hands due deliveries to workers, in queue order, within the limits.
//!
//! It is the only owner of the per-listener [`Gate`]s (in-flight count, parked count,
//! back-off), so their decisions need no locks: workers report back through the inbox.
//! A delivery that may not go now is *parked* in its listener's lot (kept in delivery
//! order) instead of being rescanned, so one hanging listener with a large backlog costs
//! nothing per pass; finishing work or the end of a back-off puts parked entries back. Each
//! pass's decisions are one atomic write: what may go is leased (a crash makes it due again)
//! and then handed to a worker, which always reports back, even if it panics.

use std::collections::{BTreeSet, HashMap, HashSet};
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

/// What the dispatcher knows about one listener.
#[derive(Debug, Default)]
struct Gate {
    in_flight: usize,
    /// Entries in the listener's parking lot.
    parked: usize,
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
        self.in_flight == 0 && self.parked == 0 && self.released.is_empty() && self.failures == 0
    }

    /// How many parked entries may be put back now.
    fn room(&self, cap: usize, now: u64) -> usize {
        if self.blocked_until_ms > now {
            return 0;
        }
        let cap = if self.ordered { 1 } else { cap };
        cap.saturating_sub(self.in_flight + self.released.len()).min(self.parked)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Go,
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
    /// Deliveries a worker holds right now.
    in_flight: HashSet<String>,
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
            Ok(0) => {}
            Ok(released) => tracing::info!(released, "queue entries of the previous run released"),
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

    /// Considers the due entries once: hands out, parks or re-leases each.
    async fn pass(&mut self) -> Result<Pass, StoreError> {
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
        let mut park = Vec::new();
        let mut relet = Vec::new();
        // Releases used by this pass's decisions, to give back if its write fails.
        let mut used_releases = Vec::new();
        for entry in entries {
            let taken =
                self.in_flight.contains(&entry.delivery_id) || go.iter().any(|g| g.delivery_id == entry.delivery_id);
            if taken {
                // Its delivery is held by a worker (a lease that ran out, or a manual and a
                // scheduled attempt at once): extend, never hand one delivery out twice.
                relet.push(entry);
                continue;
            }
            if go.len() == available {
                break;
            }
            let listener = listeners.get(&entry.listener_id).and_then(Option::as_ref);
            let (verdict, used_release) = self.decide(&entry, listener, now).await?;
            if used_release {
                used_releases.push((entry.listener_id.clone(), entry.key_id()));
            }
            match verdict {
                Verdict::Go => go.push(entry),
                Verdict::Park => park.push(entry),
            }
        }

        let lease_until = now + u64::try_from(self.context.lease().as_millis()).unwrap_or(u64::MAX / 2);
        let queue = self.context.queue.clone();
        let leased: Vec<DueEntry> = go.iter().chain(&relet).cloned().collect();
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
        let progressed = !go.is_empty() || !park.is_empty() || !relet.is_empty();
        for entry in go {
            let permit = self.permits.clone().try_acquire_owned().expect("only the dispatcher takes permits");
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
        Ok(if progressed { Pass::Progress } else { Pass::Idle })
    }

    /// May this entry go now? Counts what it decides in the listener's gate; also says
    /// whether the entry was one released from the parking lot.
    async fn decide(
        &mut self,
        entry: &DueEntry,
        listener: Option<&Listener>,
        now: u64,
    ) -> Result<(Verdict, bool), StoreError> {
        let cap = self.cap();
        // A deleted listener: the worker cancels the delivery; nothing is left to limit.
        let Some(listener) = listener else {
            self.gates.remove(&entry.listener_id);
            return Ok((Verdict::Go, false));
        };
        let gate = self.gates.entry(entry.listener_id.clone()).or_default();
        gate.ordered = listener.ordered;
        let released = gate.released.remove(&entry.key_id());
        let wait = !listener.enabled
            // A manual attempt is asked for now: a back-off does not hold it.
            || (gate.blocked_until_ms > now && !entry.manual)
            || gate.in_flight >= cap
            // Older deliveries are parked: this one waits behind them (unordered listeners;
            // ordered ones follow their pending head below; manual attempts keep no order).
            || (!listener.ordered && !entry.manual && gate.parked > 0 && !released);
        let mut verdict = if wait { Verdict::Park } else { Verdict::Go };
        if verdict == Verdict::Go && listener.ordered && !entry.manual {
            let queue = self.context.queue.clone();
            let listener_id = entry.listener_id.clone();
            let head = blocking(move || queue.pending_head(&listener_id)).await?;
            if head.as_deref() != Some(entry.delivery_id.as_str()) {
                verdict = Verdict::Park;
            }
        }
        let gate = self.gates.entry(entry.listener_id.clone()).or_default();
        match verdict {
            Verdict::Go => gate.in_flight += 1,
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
                self.gates.remove(&listener_id);
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
                gate.parked = gate.parked.saturating_sub(moved.len());
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
