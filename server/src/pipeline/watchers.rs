//! Delivery watchers: who wants to hear of each finished attempt, by producer.
//!
//! An outcome goes only to its producer's watchers (and, for a watcher of one event, only
//! that event's), so a watcher costs nothing for other producers' traffic. Each producer may
//! have at most a configured number of watchers. Handing an outcome over never waits: a
//! watcher whose queue is full is dropped and told it fell behind, so delivery never slows
//! for a reader. This module knows nothing of gRPC.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::AttemptOutcome;

/// Outcomes queued for one watcher before it counts as too slow.
pub const WATCH_QUEUE: usize = 256;

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
        })
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

    /// Hands an outcome to its producer's watchers, dropping any that cannot take it now.
    pub fn publish(&self, outcome: &AttemptOutcome) {
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
