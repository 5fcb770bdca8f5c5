//! Work for one listener, and the line it waits in while it waits in memory.
//!
//! Work is either a first attempt taken straight from the event log (a [`Pair`]: no record,
//! no queue entry) or an entry of the durable due queue (a retry, a manual attempt, a replayed,
//! recovered or unparked delivery). A line keeps a listener's work in due order, so a first
//! attempt due since its event was triggered goes before a retry due later: neither kind can
//! starve the other. Plain data; the dispatcher owns every line.

use std::collections::BTreeMap;

use crate::store::{Delivery, DeliveryState, DueEntry};

/// One event to one listener, handed out by fan-out for its first attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub seq: u64,
    pub event_id: String,
    pub producer_id: String,
    pub delivery_id: String,
    pub listener_id: String,
    /// When it became due: its event's creation.
    pub due_ms: u64,
    /// It may have been recorded before a crash: look for its record before attempting it.
    pub recheck: bool,
    /// Read back from the log by its detached listener, not handed out by fan-out.
    pub lagging: bool,
}

impl Pair {
    /// The delivery as it is written when it is parked or cancelled before any attempt.
    pub fn delivery(&self) -> Delivery {
        Delivery {
            id: self.delivery_id.clone(),
            event_id: self.event_id.clone(),
            event_seq: self.seq,
            listener_id: self.listener_id.clone(),
            producer_id: self.producer_id.clone(),
            state: DeliveryState::Pending as i32,
            next_attempt_at_ms: self.due_ms,
            created_at_ms: self.due_ms,
            ..Delivery::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    First(Pair),
    Queued(DueEntry),
}

impl Work {
    pub fn delivery_id(&self) -> &str {
        match self {
            Work::First(pair) => &pair.delivery_id,
            Work::Queued(entry) => &entry.delivery_id,
        }
    }

    pub fn listener_id(&self) -> &str {
        match self {
            Work::First(pair) => &pair.listener_id,
            Work::Queued(entry) => &entry.listener_id,
        }
    }

    pub fn due_ms(&self) -> u64 {
        match self {
            Work::First(pair) => pair.due_ms,
            Work::Queued(entry) => entry.due_ms,
        }
    }

    pub fn manual(&self) -> bool {
        matches!(self, Work::Queued(entry) if entry.manual)
    }
}

/// Where work stands in a line: its due time, then, among equals, a first attempt by its
/// event's number (events of one millisecond keep their order: an ordered listener's pair
/// offered again after a later one was read keeps its place), then arrival.
type Key = (u64, u64, u64);

/// A listener's work waiting in memory, in due order (see [`Key`]).
#[derive(Debug, Default)]
pub struct Line {
    items: BTreeMap<Key, (Work, u64)>,
    arrivals: u64,
}

impl Line {
    /// Adds `work`, which joined at `now_ms`.
    pub fn push(&mut self, work: Work, now_ms: u64) {
        self.arrivals += 1;
        let seq = match &work {
            Work::First(pair) => pair.seq,
            Work::Queued(_) => u64::MAX,
        };
        self.items.insert((work.due_ms(), seq, self.arrivals), (work, now_ms));
    }

    pub fn front(&self) -> Option<&Work> {
        self.items.values().next().map(|(work, _)| work)
    }

    pub fn pop_front(&mut self) -> Option<Work> {
        self.items.pop_first().map(|(_, (work, _))| work)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Takes out everything (for parking or cancelling), in due order.
    pub fn take_all(&mut self) -> Vec<Work> {
        std::mem::take(&mut self.items).into_values().map(|(work, _)| work).collect()
    }

    /// Takes out what has waited since before `joined_before_ms`, but manual attempts.
    pub fn take_waiting_since(&mut self, joined_before_ms: u64) -> Vec<Work> {
        let keys: Vec<Key> = self
            .items
            .iter()
            .filter(|(_, (work, joined))| *joined < joined_before_ms && !work.manual())
            .map(|(key, _)| *key)
            .collect();
        keys.into_iter().filter_map(|key| self.items.remove(&key)).map(|(work, _)| work).collect()
    }

    /// Takes out every first attempt of an event numbered `from_seq` or later.
    pub fn take_pairs_from(&mut self, from_seq: u64) -> Vec<Pair> {
        let keys: Vec<Key> = self
            .items
            .iter()
            .filter(|(_, (work, _))| matches!(work, Work::First(pair) if pair.seq >= from_seq))
            .map(|(key, _)| *key)
            .collect();
        keys.into_iter()
            .filter_map(|key| self.items.remove(&key))
            .filter_map(|(work, _)| match work {
                Work::First(pair) => Some(pair),
                Work::Queued(_) => None,
            })
            .collect()
    }

    /// Takes out the `count` due last (the newest), but manual attempts.
    pub fn take_newest(&mut self, count: usize) -> Vec<Work> {
        let keys: Vec<Key> =
            self.items.iter().rev().filter(|(_, (work, _))| !work.manual()).take(count).map(|(key, _)| *key).collect();
        let mut taken: Vec<Work> =
            keys.into_iter().filter_map(|key| self.items.remove(&key)).map(|(work, _)| work).collect();
        taken.reverse();
        taken
    }

    /// When the longest-waiting item joined.
    pub fn oldest_join_ms(&self) -> Option<u64> {
        self.items.values().map(|(_, joined)| *joined).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first(seq: u64, due_ms: u64) -> Work {
        Work::First(Pair {
            seq,
            event_id: format!("e{seq}"),
            producer_id: "p".into(),
            delivery_id: format!("d{seq}"),
            listener_id: "l".into(),
            due_ms,
            recheck: false,
            lagging: false,
        })
    }

    fn retry(id: &str, due_ms: u64, manual: bool) -> Work {
        Work::Queued(DueEntry { due_ms, delivery_id: id.into(), listener_id: "l".into(), manual })
    }

    #[test]
    fn work_leaves_in_due_order_and_first_attempts_are_not_starved_by_retries() {
        let mut line = Line::default();
        line.push(first(1, 100), 0);
        line.push(retry("r", 5_000, false), 0);
        line.push(first(2, 200), 0);
        line.push(first(3, 200), 0);
        line.push(retry("m", 150, true), 0);
        let order: Vec<String> = std::iter::from_fn(|| line.pop_front()).map(|w| w.delivery_id().to_owned()).collect();
        assert_eq!(order, ["d1", "m", "d2", "d3", "r"]);
    }

    #[test]
    fn what_waited_too_long_is_taken_out_but_manual_attempts() {
        let mut line = Line::default();
        line.push(first(1, 1), 10);
        line.push(retry("m", 2, true), 10);
        line.push(first(2, 3), 50);
        assert_eq!(line.oldest_join_ms(), Some(10));
        let taken: Vec<String> = line.take_waiting_since(20).iter().map(|w| w.delivery_id().to_owned()).collect();
        assert_eq!(taken, ["d1"]);
        assert_eq!(line.len(), 2);
        line.push(first(3, 9), 60);
        line.push(first(4, 10), 60);
        let newest: Vec<String> = line.take_newest(2).iter().map(|w| w.delivery_id().to_owned()).collect();
        assert_eq!(newest, ["d3", "d4"], "the newest, in due order, never a manual attempt");
        assert_eq!(line.take_all().len(), 2);
        assert!(line.is_empty());
    }
}
