//! Delivery watchers: who wants to hear of each finished attempt, by producer.
//!
//! An outcome goes only to its producer's watchers (and, for a watcher of one event, only
//! that event's), so a watcher costs nothing for other producers' traffic. Each producer may
//! have at most a configured number of watchers. Handing an outcome over never waits: a
//! watcher whose queue is full is dropped and told it fell behind, so delivery never slows
//! for a reader. This module knows nothing of gRPC.
//!
//! Where several nodes share a database, one delivers and a watcher may be on any: a node
//! with watchers says which producers it watches ([`Watchers::watched_producers`], announced
//! again and again), every node keeps what the others watch for a while ([`Watchers::wanted_elsewhere`]),
//! and the delivering node writes those producers' outcomes down in text ([`encode`],
//! [`decode`]) to be told with their records ([`Watchers::wanted_by_others`]); the other
//! nodes hand them to their watchers ([`Watchers::relayed`]), whose own queues bound them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::AttemptOutcome;

/// Outcomes queued for one watcher before it counts as too slow.
pub const WATCH_QUEUE: usize = 256;
/// How long a producer counts as watched elsewhere after another node last said so; a node
/// says so every [`ANNOUNCE_EVERY`] while it has a watcher of it.
const WANTED_FOR: Duration = Duration::from_secs(15);
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(5);
/// The longest error text relayed with an outcome.
const RELAYED_ERROR: usize = 300;

#[derive(Debug)]
struct Slot {
    id: u64,
    only_event: Option<String>,
    sender: mpsc::Sender<AttemptOutcome>,
    fell_behind: Arc<AtomicBool>,
}

/// The watchers of every producer.
#[derive(Debug)]
pub struct Watchers {
    by_producer: Mutex<HashMap<String, Vec<Slot>>>,
    /// Watchers in all, read without the lock: no watcher, no work per outcome.
    count: AtomicUsize,
    next_id: AtomicU64,
    per_producer: usize,
    /// Producers other nodes' watchers want, until when.
    elsewhere: Mutex<HashMap<String, Instant>>,
    /// Entries in `elsewhere`, read without the lock: no watcher elsewhere, no work.
    elsewhere_count: AtomicUsize,
}

/// One watcher's end: outcomes as they happen, until it is dropped or falls behind.
pub struct Watch {
    pub outcomes: mpsc::Receiver<AttemptOutcome>,
    fell_behind: Arc<AtomicBool>,
    _registration: Registration,
}

/// Takes a watcher off the list when its end is dropped.
struct Registration {
    watchers: Arc<Watchers>,
    producer_id: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.watchers.remove(&self.producer_id, self.id);
    }
}

impl Watch {
    /// Whether the watcher was dropped for falling behind (rather than at shutdown).
    pub fn fell_behind(&self) -> bool {
        self.fell_behind.load(Ordering::Acquire)
    }
}

/// The producer already has as many watchers as allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this producer already has {0} delivery watchers, the most allowed (--max-watchers-per-producer)")]
pub struct TooManyWatchers(pub usize);

impl Watchers {
    pub fn new(per_producer: usize) -> Arc<Self> {
        Arc::new(Self {
            by_producer: Mutex::new(HashMap::new()),
            count: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            per_producer: per_producer.max(1),
            elsewhere: Mutex::default(),
            elsewhere_count: AtomicUsize::new(0),
        })
    }

    /// Another node has a watcher of `producer_id`.
    pub fn wanted_elsewhere(&self, producer_id: &str) {
        let mut elsewhere = self.elsewhere.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        elsewhere.insert(producer_id.to_owned(), Instant::now() + WANTED_FOR);
        self.elsewhere_count.store(elsewhere.len(), Ordering::Release);
    }

    /// Forgets producers no other node has said it watches for a while.
    pub fn forget_expired(&self) {
        let mut elsewhere = self.elsewhere.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        elsewhere.retain(|_, until| *until > now);
        self.elsewhere_count.store(elsewhere.len(), Ordering::Release);
    }

    /// The producers this node's watchers watch now.
    pub fn watched_producers(&self) -> Vec<String> {
        let by_producer = self.by_producer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        by_producer.keys().cloned().collect()
    }

    /// Another node could not relay all of `producer_id`'s outcomes: its watchers here are
    /// dropped and told they fell behind, as if their own queues had filled.
    pub fn fell_behind_elsewhere(&self, producer_id: &str) {
        let mut by_producer = self.by_producer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(slots) = by_producer.remove(producer_id) {
            for slot in &slots {
                slot.fell_behind.store(true, Ordering::Release);
            }
            self.count.fetch_sub(slots.len(), Ordering::AcqRel);
        }
    }

    /// Hands an outcome another node relayed to this node's watchers (never relayed again).
    pub fn relayed(&self, outcome: &AttemptOutcome) {
        self.publish_here(outcome);
    }

    /// Whether a watcher on another node wants `producer_id`'s outcomes (said within
    /// [`WANTED_FOR`]).
    pub fn wanted_by_others(&self, producer_id: &str) -> bool {
        if self.elsewhere_count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut elsewhere = self.elsewhere.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        match elsewhere.get(producer_id) {
            Some(until) if *until > now => true,
            Some(_) => {
                elsewhere.retain(|_, until| *until > now);
                self.elsewhere_count.store(elsewhere.len(), Ordering::Release);
                false
            }
            None => false,
        }
    }

    /// A new watcher of `producer_id`'s outcomes (of one event, if given).
    pub fn watch(self: &Arc<Self>, producer_id: &str, only_event: Option<String>) -> Result<Watch, TooManyWatchers> {
        let (sender, outcomes) = mpsc::channel(WATCH_QUEUE);
        let fell_behind = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut by_producer = self.by_producer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let slots = by_producer.entry(producer_id.to_owned()).or_default();
            if slots.len() >= self.per_producer {
                return Err(TooManyWatchers(self.per_producer));
            }
            slots.push(Slot { id, only_event, sender, fell_behind: fell_behind.clone() });
            self.count.fetch_add(1, Ordering::AcqRel);
        }
        let registration = Registration { watchers: self.clone(), producer_id: producer_id.to_owned(), id };
        Ok(Watch { outcomes, fell_behind, _registration: registration })
    }

    /// Hands an outcome to its producer's watchers here, dropping any that cannot take it
    /// now (other nodes' watchers are told with the record, see [`Watchers::wanted_by_others`]).
    pub fn publish(&self, outcome: &AttemptOutcome) {
        self.publish_here(outcome);
    }

    fn publish_here(&self, outcome: &AttemptOutcome) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut by_producer = self.by_producer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(slots) = by_producer.get_mut(&outcome.producer_id) else { return };
        let before = slots.len();
        slots.retain(|slot| {
            if slot.only_event.as_ref().is_some_and(|event_id| *event_id != outcome.event_id) {
                return true;
            }
            match slot.sender.try_send(outcome.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    slot.fell_behind.store(true, Ordering::Release);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        let removed = before - slots.len();
        if slots.is_empty() {
            by_producer.remove(&outcome.producer_id);
        }
        self.count.fetch_sub(removed, Ordering::AcqRel);
    }

    fn remove(&self, producer_id: &str, id: u64) {
        let mut by_producer = self.by_producer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(slots) = by_producer.get_mut(producer_id) else { return };
        let before = slots.len();
        slots.retain(|slot| slot.id != id);
        self.count.fetch_sub(before - slots.len(), Ordering::AcqRel);
        if slots.is_empty() {
            by_producer.remove(producer_id);
        }
    }

    /// Watchers of one producer now.
    #[cfg(test)]
    fn of(&self, producer_id: &str) -> usize {
        self.by_producer.lock().unwrap().get(producer_id).map_or(0, Vec::len)
    }
}

/// Outcomes written down for another node, one a line: tab-separated fields, the error
/// text shortened and with no tab or line break.
pub fn encode(outcomes: &[AttemptOutcome]) -> String {
    let mut text = String::new();
    for outcome in outcomes {
        let error: String = outcome
            .error
            .chars()
            .take(RELAYED_ERROR)
            .map(|c| if c == '\t' || c == '\n' || c == '\r' { ' ' } else { c })
            .collect();
        text.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            outcome.producer_id,
            outcome.event_id,
            outcome.delivery_id,
            outcome.listener_id,
            outcome.attempt,
            i32::from(outcome.state),
            outcome.status_code,
            outcome.at_ms,
            error
        ));
    }
    text
}

/// The outcomes [`encode`] wrote; lines that do not read back are left out.
pub fn decode(text: &str) -> Vec<AttemptOutcome> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(9, '\t');
            let mut next = || fields.next();
            Some(AttemptOutcome {
                producer_id: next()?.to_owned(),
                event_id: next()?.to_owned(),
                delivery_id: next()?.to_owned(),
                listener_id: next()?.to_owned(),
                attempt: next()?.parse().ok()?,
                state: crate::store::DeliveryState::try_from(next()?.parse::<i32>().ok()?).ok()?,
                status_code: next()?.parse().ok()?,
                at_ms: next()?.parse().ok()?,
                error: next()?.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DeliveryState;

    fn outcome(producer_id: &str, event_id: &str) -> AttemptOutcome {
        AttemptOutcome {
            producer_id: producer_id.into(),
            event_id: event_id.into(),
            delivery_id: "dlv".into(),
            listener_id: "lst".into(),
            attempt: 1,
            state: DeliveryState::Succeeded,
            status_code: 200,
            error: String::new(),
            at_ms: 0,
        }
    }

    #[test]
    fn outcomes_reach_only_their_producers_watchers_and_one_events_watcher_only_that_event() {
        let watchers = Watchers::new(4);
        let mut all = watchers.watch("prd_a", None).unwrap();
        let mut one = watchers.watch("prd_a", Some("evt_2".into())).unwrap();
        let mut other = watchers.watch("prd_b", None).unwrap();
        watchers.publish(&outcome("prd_a", "evt_1"));
        watchers.publish(&outcome("prd_a", "evt_2"));
        assert_eq!(all.outcomes.try_recv().unwrap().event_id, "evt_1");
        assert_eq!(all.outcomes.try_recv().unwrap().event_id, "evt_2");
        assert_eq!(one.outcomes.try_recv().unwrap().event_id, "evt_2");
        assert!(one.outcomes.try_recv().is_err());
        assert!(other.outcomes.try_recv().is_err());
    }

    #[test]
    fn a_producer_may_have_only_so_many_watchers_and_a_dropped_one_frees_its_place() {
        let watchers = Watchers::new(2);
        let first = watchers.watch("prd_a", None).unwrap();
        let _second = watchers.watch("prd_a", None).unwrap();
        assert_eq!(watchers.watch("prd_a", None).err(), Some(TooManyWatchers(2)));
        assert!(watchers.watch("prd_b", None).is_ok(), "the cap is per producer");
        drop(first);
        assert_eq!(watchers.of("prd_a"), 1);
        assert!(watchers.watch("prd_a", None).is_ok());
    }

    #[test]
    fn outcomes_read_back_as_written_with_errors_made_safe_for_one_line() {
        let mut failed = outcome("prd_a", "evt_1");
        failed.state = DeliveryState::Pending;
        failed.status_code = 0;
        failed.error = format!("connect:\tconnection refused\nby peer {}", "é".repeat(400));
        let text = encode(&[outcome("prd_a", "evt_2"), failed.clone()]);
        let back = decode(&text);
        assert_eq!(back.len(), 2);
        assert_eq!(back[0], outcome("prd_a", "evt_2"));
        assert_eq!(back[1].state, DeliveryState::Pending);
        assert!(back[1].error.starts_with("connect: connection refused by peer é"), "{}", back[1].error);
        assert_eq!(back[1].error.chars().count(), RELAYED_ERROR);
        assert!(decode("not\tan outcome\n").is_empty(), "a line that does not read back is left out");
    }

    #[test]
    fn only_producers_watched_elsewhere_are_told_to_other_nodes() {
        let watchers = Watchers::new(4);
        assert!(!watchers.wanted_by_others("prd_a"), "nobody elsewhere watches");
        watchers.wanted_elsewhere("prd_a");
        assert!(watchers.wanted_by_others("prd_a"));
        assert!(!watchers.wanted_by_others("prd_b"), "per producer");
        let _here = watchers.watch("prd_b", None).unwrap();
        assert!(!watchers.wanted_by_others("prd_b"), "a watcher here is not one elsewhere");
    }

    #[test]
    fn outcomes_from_another_node_reach_watchers_here_and_one_that_fell_behind_drops_them() {
        let watchers = Watchers::new(4);
        let mut watch = watchers.watch("prd_a", None).unwrap();
        watchers.relayed(&outcome("prd_a", "evt_1"));
        assert_eq!(watch.outcomes.try_recv().unwrap().event_id, "evt_1");
        assert_eq!(watchers.watched_producers(), ["prd_a"]);
        watchers.fell_behind_elsewhere("prd_a");
        assert!(watch.fell_behind());
        assert_eq!(watchers.of("prd_a"), 0);
    }

    #[test]
    fn a_watcher_that_falls_behind_is_dropped_and_told_so() {
        let watchers = Watchers::new(2);
        let mut slow = watchers.watch("prd_a", None).unwrap();
        for _ in 0..=WATCH_QUEUE {
            watchers.publish(&outcome("prd_a", "evt_1"));
        }
        assert_eq!(watchers.of("prd_a"), 0, "dropped, so delivery never waits for it");
        assert!(slow.fell_behind());
        let mut received = 0;
        while slow.outcomes.try_recv().is_ok() {
            received += 1;
        }
        assert_eq!(received, WATCH_QUEUE, "what was queued is still read, then the stream ends");
    }
}
