//! Events fan-out has just read, kept for the attempts that follow them: a first attempt
//! usually starts moments after fan-out handed it over, and reading its event back from the
//! database again (a lookup and a decode, payload and all) was a tenth of the pipeline's CPU
//! per delivery. Bounded by payload bytes; the oldest events go first. A miss costs what it
//! cost before: the worker reads the database. Holds copies only: never the source of truth.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::store::Event;

/// Payload bytes kept at most (events of any size count at least 256 bytes each).
pub const RECENT_BYTES: usize = 32 * 1024 * 1024;
const MIN_WEIGHT: usize = 256;

#[derive(Debug, Default)]
pub struct Recent {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    events: BTreeMap<u64, Arc<Event>>,
    bytes: usize,
}

fn weight(event: &Event) -> usize {
    event.payload.len().max(MIN_WEIGHT)
}

impl Recent {
    /// Keeps `event`, letting the oldest go past the budget. An event larger than the budget
    /// is not kept.
    pub fn keep(&self, event: &Event) {
        let adding = weight(event);
        if adding > RECENT_BYTES {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.events.contains_key(&event.seq) {
            return;
        }
        while inner.bytes + adding > RECENT_BYTES {
            let Some((_, oldest)) = inner.events.pop_first() else { break };
            inner.bytes -= weight(&oldest);
        }
        inner.bytes += adding;
        inner.events.insert(event.seq, Arc::new(event.clone()));
    }

    /// A copy of event `seq`, if it is still kept.
    pub fn get(&self, seq: u64) -> Option<Event> {
        let kept = self.inner.lock().unwrap_or_else(PoisonError::into_inner).events.get(&seq).cloned();
        kept.map(|event| Event::clone(&event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, bytes: usize) -> Event {
        Event { seq, id: format!("evt_{seq}"), payload: vec![7; bytes], ..Event::default() }
    }

    #[test]
    fn keeps_recent_events_within_its_budget_oldest_out_first() {
        let recent = Recent::default();
        let big = RECENT_BYTES / 4;
        for seq in 1..=4 {
            recent.keep(&event(seq, big));
        }
        assert_eq!(recent.get(1).map(|e| e.id), Some("evt_1".into()));
        recent.keep(&event(5, big));
        assert!(recent.get(1).is_none(), "the oldest went to make room");
        assert_eq!(recent.get(5).unwrap().payload.len(), big);
        recent.keep(&event(6, RECENT_BYTES + 1));
        assert!(recent.get(6).is_none(), "larger than the budget: not kept");
        assert!(recent.get(2).is_some(), "and nothing was let go for it");
        // Small events count at least 256 bytes, so their number is bounded too.
        let small = Recent::default();
        for seq in 0..(RECENT_BYTES / MIN_WEIGHT + 10) as u64 {
            small.keep(&event(seq, 1));
        }
        assert!(small.get(0).is_none() && small.get(9).is_none() && small.get(10).is_some());
    }
}
