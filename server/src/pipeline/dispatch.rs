//! The dispatcher: hands due deliveries to workers, in queue order, within the limits.
//!
//! It is the only owner of the per-listener [`Gate`]s (in-flight count, parked count,
//! back-off), so their decisions need no locks: workers report back through the inbox.
//! A delivery that may not go now is *parked* in its listener's lot (kept in delivery
//! order) instead of being rescanned, so one hanging listener with a large backlog costs
//! nothing per pass; finishing work or the end of a back-off puts parked entries back.
//! What may go is leased first (a crash makes it due again) and then handed to a worker.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::worker::{self, Finished, Outcome};
use super::{Command, Context, blocking};
use crate::clock::now_ms;
use crate::store::{DueEntry, Listener, StoreError};

/// Most queue entries considered in one pass.
const PASS_LIMIT: usize = 512;
/// Consecutive failures after which a listener is backed off as a whole.
const BACKOFF_AFTER_FAILURES: u32 = 5;
/// Longest whole-listener back-off.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What the dispatcher knows about one listener.
#[derive(Debug, Default)]
struct Gate {
    in_flight: usize,
    /// Entries in the listener's parking lot.
    parked: usize,
    /// Entries taken out of the lot and not yet seen again: they may pass the parked ones.
    released: HashSet<String>,
    /// Consecutive failed attempts.
    failures: u32,
    blocked_until_ms: u64,
}

impl Gate {
    fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.parked == 0 && self.released.is_empty() && self.failures == 0
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
    /// Something was handed out or parked: look again at once.
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

    /// Dispatches until `shutdown`, then waits for the workers it started.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let queue = self.context.queue.clone();
        match blocking(move || queue.recover(now_ms())).await {
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

        let mut go = Vec::new();
        let mut park = Vec::new();
        let mut relet = Vec::new();
        for entry in entries {
            if self.in_flight.contains(&entry.delivery_id) {
                // Its lease ran out while a worker still holds it: extend, never hand out twice.
                relet.push(entry);
                continue;
            }
            if go.len() == available {
                break;
            }
            let listener = listeners.get(&entry.listener_id).and_then(Option::as_ref);
            match self.decide(&entry, listener, now).await? {
                Verdict::Go => go.push(entry),
                Verdict::Park => park.push(entry),
            }
        }

        let lease_until = now + u64::try_from(self.context.lease().as_millis()).unwrap_or(u64::MAX / 2);
        let queue = self.context.queue.clone();
        let (leased, parked, relet_count) = (go.clone(), park.clone(), relet.len());
        let written = blocking(move || -> Result<(), StoreError> {
            queue.lease(&leased, lease_until)?;
            queue.lease(&relet, lease_until)?;
            queue.park(&parked)
        })
        .await;
        if let Err(error) = written {
            // Nothing changed in the store: undo what the decisions counted.
            for entry in go.iter().chain(&park) {
                if let Some(gate) = self.gates.get_mut(&entry.listener_id) {
                    if park.contains(entry) {
                        gate.parked = gate.parked.saturating_sub(1);
                    } else {
                        gate.in_flight = gate.in_flight.saturating_sub(1);
                    }
                }
            }
            return Err(error);
        }
        let progressed = !go.is_empty() || !park.is_empty() || relet_count > 0;
        for entry in go {
            let permit = self.permits.clone().try_acquire_owned().expect("only the dispatcher takes permits");
            self.in_flight.insert(entry.delivery_id.clone());
            let context = self.context.clone();
            let outbox = self.outbox.clone();
            self.workers.spawn(async move {
                let finished = worker::attempt(context, entry, lease_until).await;
                drop(permit);
                // The dispatcher is gone only at shutdown, when nothing is left to tell.
                let _ = outbox.send(Command::Finished(finished));
            });
        }
        Ok(if progressed { Pass::Progress } else { Pass::Idle })
    }

    /// May this entry go now? Counts what it decides in the listener's gate.
    async fn decide(&mut self, entry: &DueEntry, listener: Option<&Listener>, now: u64) -> Result<Verdict, StoreError> {
        let cap = self.context.config.listener_in_flight.max(1);
        // A deleted listener: the worker cancels the delivery.
        let Some(listener) = listener else {
            return Ok(Verdict::Go);
        };
        let gate = self.gates.entry(entry.listener_id.clone()).or_default();
        let released = gate.released.remove(&entry.delivery_id);
        let wait = !listener.enabled
            || gate.blocked_until_ms > now
            || gate.in_flight >= cap
            // Older deliveries are parked: this one waits behind them (unordered listeners;
            // ordered ones follow their pending head below).
            || (!listener.ordered && gate.parked > 0 && !released);
        if wait {
            gate.parked += 1;
            return Ok(Verdict::Park);
        }
        if listener.ordered {
            let queue = self.context.queue.clone();
            let listener_id = entry.listener_id.clone();
            let head = blocking(move || queue.pending_head(&listener_id)).await?;
            let gate = self.gates.entry(entry.listener_id.clone()).or_default();
            if head.as_deref() != Some(entry.delivery_id.as_str()) {
                gate.parked += 1;
                return Ok(Verdict::Park);
            }
            gate.in_flight += 1;
            return Ok(Verdict::Go);
        }
        gate.in_flight += 1;
        Ok(Verdict::Go)
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Finished(finished) => self.finished(finished).await,
            Command::ListenerChanged(listener_id) => {
                if self.gates.get(&listener_id).is_some_and(|gate| gate.parked > 0) {
                    let gate = self.gates.get_mut(&listener_id).expect("checked above");
                    // A changed listener (re-enabled, deleted, order switched) looks at its
                    // whole lot again: the entries that still cannot go are parked again.
                    let all = gate.parked;
                    gate.blocked_until_ms = 0;
                    self.unpark(&listener_id, all).await;
                }
            }
        }
    }

    async fn finished(&mut self, finished: Finished) {
        self.in_flight.remove(&finished.delivery_id);
        let now = now_ms();
        let first_delay = self.context.config.retry_schedule.first_delay();
        let cap = self.context.config.listener_in_flight.max(1);
        let Some(gate) = self.gates.get_mut(&finished.listener_id) else {
            return;
        };
        gate.in_flight = gate.in_flight.saturating_sub(1);
        match finished.outcome {
            Outcome::Succeeded => {
                gate.failures = 0;
                gate.blocked_until_ms = 0;
            }
            Outcome::Retrying | Outcome::FailedForGood => {
                gate.failures += 1;
                if gate.failures >= BACKOFF_AFTER_FAILURES {
                    let backoff = backoff(first_delay, gate.failures);
                    gate.blocked_until_ms = now + u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX / 2);
                    self.backoffs.insert((gate.blocked_until_ms, finished.listener_id.clone()));
                    tracing::debug!(listener_id = %finished.listener_id, ?backoff, failures = gate.failures, "listener backed off");
                }
            }
            Outcome::NotSent => {}
        }
        let room = if gate.blocked_until_ms > now {
            0
        } else {
            cap.saturating_sub(gate.in_flight + gate.released.len()).min(gate.parked)
        };
        if room > 0 {
            self.unpark(&finished.listener_id, room).await;
        } else if gate.is_idle() {
            self.gates.remove(&finished.listener_id);
        }
    }

    /// Puts back parked entries of listeners whose back-off has ended.
    async fn end_backoffs(&mut self) {
        let now = now_ms();
        while let Some((at_ms, listener_id)) = self.backoffs.first().cloned() {
            if at_ms > now {
                break;
            }
            self.backoffs.pop_first();
            let cap = self.context.config.listener_in_flight.max(1);
            let Some(gate) = self.gates.get_mut(&listener_id) else { continue };
            if gate.blocked_until_ms != at_ms {
                continue;
            }
            gate.blocked_until_ms = 0;
            let room = cap.saturating_sub(gate.in_flight + gate.released.len()).min(gate.parked);
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

/// Whole-listener back-off after `failures` consecutive failures: doubling from the
/// schedule's first delay, at most five minutes.
fn backoff(first_delay: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(BACKOFF_AFTER_FAILURES).min(16);
    first_delay.saturating_mul(1 << doublings).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_first_delay_up_to_five_minutes() {
        let table = [(5, 1), (6, 2), (7, 4), (10, 32), (40, 300)];
        for (failures, secs) in table {
            assert_eq!(backoff(Duration::from_secs(1), failures), Duration::from_secs(secs), "{failures} failures");
        }
    }
}
