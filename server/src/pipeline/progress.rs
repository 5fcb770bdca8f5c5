//! Fan-out's durable position: the first event some of whose (event, listener) pairs are not
//! yet recorded. The event log is the queue of first attempts, so this is what a restart
//! resumes from, and what retention and the listings of deliveries still waiting go by.
//!
//! Fan-out hands pairs out in log order; each is outstanding until the write that records,
//! parks or cancels it has been applied. The cursor is the first event with an outstanding
//! pair, or where fan-out has got to. It is written now and then, never ahead of what is
//! recorded; a restart may redo pairs recorded after the last write (at least once, as
//! promised). So that a redo never attempts a pair twice, fan-out reserves the events it may
//! hand out before it hands them: after a restart, pairs of events below the reservation are
//! checked for a record first. Pure bookkeeping: the dispatcher writes what this says.

use std::collections::BTreeMap;

use crate::store::FanoutCursor;

/// Events fan-out may hand out past a reservation before it writes the next one.
pub const RESERVE_EVENTS: u64 = 4096;
/// The cursor is written at most this often (and at shutdown).
pub const WRITE_EVERY_MS: u64 = 250;

#[derive(Debug)]
pub struct Progress {
    /// Pairs handed out and not yet recorded, parked or cancelled, by event. Every count is
    /// positive.
    outstanding: BTreeMap<u64, usize>,
    /// The sum of `outstanding`'s counts.
    total: usize,
    /// Every pair of the events before this one has been handed out.
    handed_until: u64,
    /// Some pairs of the event at `handed_until` are handed out, not all.
    partial: bool,
    /// What was last written (or read at start).
    written: FanoutCursor,
    written_at_ms: u64,
}

impl Progress {
    /// Starts where the stored cursor says.
    pub fn new(stored: FanoutCursor) -> Self {
        Self {
            outstanding: BTreeMap::new(),
            total: 0,
            handed_until: stored.next_seq,
            partial: false,
            written: stored,
            written_at_ms: 0,
        }
    }

    /// A pair of event `seq` was handed out.
    pub fn handed(&mut self, seq: u64) {
        *self.outstanding.entry(seq).or_default() += 1;
        self.total += 1;
    }

    /// Every pair of the events before `next_seq` has been handed out; `partial`: some pairs
    /// of event `next_seq` too.
    pub fn handed_until(&mut self, next_seq: u64, partial: bool) {
        if next_seq >= self.handed_until {
            self.partial = partial && next_seq == self.handed_until.max(next_seq);
        }
        self.handed_until = self.handed_until.max(next_seq);
    }

    /// Whether the event at [`Progress::handed_until_seq`] is partly handed out.
    pub fn partial(&self) -> bool {
        self.partial
    }

    /// A pair of event `seq` is recorded, parked or cancelled (or was found recorded).
    pub fn done(&mut self, seq: u64) {
        if let Some(count) = self.outstanding.get_mut(&seq) {
            *count -= 1;
            self.total -= 1;
            if *count == 0 {
                self.outstanding.remove(&seq);
            }
        }
    }

    /// Every pair of the events before this one has been handed out.
    pub fn handed_until_seq(&self) -> u64 {
        self.handed_until
    }

    /// Before this event every pair is recorded.
    pub fn cursor(&self) -> u64 {
        self.outstanding.keys().next().copied().unwrap_or(self.handed_until).min(self.handed_until)
    }

    /// Pairs handed out and not yet recorded.
    pub fn outstanding(&self) -> usize {
        self.total
    }

    /// The cursor to write before a pair of event `seq` is handed out, if its event lies past
    /// the reservation; [`Progress::reserved`] once it is written.
    pub fn reserve(&self, seq: u64) -> Option<FanoutCursor> {
        (seq >= self.written.reserved_until)
            .then(|| FanoutCursor { reserved_until: seq + RESERVE_EVENTS, ..self.current() })
    }

    /// A reservation from [`Progress::reserve`] is written.
    pub fn reserved(&mut self, cursor: FanoutCursor, now_ms: u64) {
        self.write(cursor, now_ms);
    }

    /// The cursor to write now, if it moved and the last write is old enough (or `force`).
    pub fn due(&mut self, now_ms: u64, force: bool) -> Option<FanoutCursor> {
        let moved = self.cursor() > self.written.next_seq || !self.written.after_listener.is_empty();
        let old_enough = now_ms >= self.written_at_ms + WRITE_EVERY_MS;
        (moved && (old_enough || force)).then(|| self.write(self.current(), now_ms))
    }

    fn current(&self) -> FanoutCursor {
        FanoutCursor {
            next_seq: self.cursor().max(self.written.next_seq),
            after_listener: String::new(),
            reserved_until: self.written.reserved_until,
        }
    }

    fn write(&mut self, cursor: FanoutCursor, now_ms: u64) -> FanoutCursor {
        self.written = cursor.clone();
        self.written_at_ms = now_ms;
        cursor
    }

    /// A write of `cursor` failed: it is written again next time.
    pub fn unwritten(&mut self) {
        self.written_at_ms = 0;
        self.written.next_seq = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(next_seq: u64, reserved_until: u64) -> FanoutCursor {
        FanoutCursor { next_seq, after_listener: String::new(), reserved_until }
    }

    #[test]
    fn the_cursor_stops_at_the_first_event_with_a_pair_outstanding() {
        let mut progress = Progress::new(stored(10, 0));
        assert_eq!(progress.cursor(), 10);
        for seq in [10, 10, 11, 13] {
            progress.handed(seq);
        }
        progress.handed_until(14, false);
        assert_eq!(progress.cursor(), 10);
        progress.done(10);
        assert_eq!(progress.cursor(), 10, "one pair of event 10 is still out");
        progress.done(10);
        assert_eq!(progress.cursor(), 11);
        progress.done(13);
        assert_eq!(progress.cursor(), 11, "an earlier event holds it");
        progress.done(11);
        assert_eq!(progress.cursor(), 14, "all handed out are done: where fan-out has got to");
        assert_eq!(progress.outstanding(), 0);
    }

    #[test]
    fn an_event_partly_handed_out_holds_the_cursor() {
        let mut progress = Progress::new(stored(0, 0));
        progress.handed(5);
        progress.handed_until(5, true);
        assert!(progress.partial());
        progress.done(5);
        assert_eq!(progress.cursor(), 5, "event 5 has pairs still to hand out");
        progress.handed_until(6, false);
        assert!(!progress.partial());
        assert_eq!(progress.cursor(), 6);
    }

    #[test]
    fn the_cursor_is_written_when_it_moved_at_most_so_often() {
        let mut progress = Progress::new(stored(0, 0));
        assert_eq!(progress.due(1_000, false), None, "it did not move");
        progress.handed_until(3, false);
        assert_eq!(progress.due(1_000, false).map(|c| c.next_seq), Some(3));
        progress.handed_until(5, false);
        assert_eq!(progress.due(1_100, false), None, "written less than a moment ago");
        assert_eq!(progress.due(1_100, true).map(|c| c.next_seq), Some(5), "unless forced (shutdown)");
        progress.handed_until(9, false);
        assert_eq!(progress.due(1_100 + WRITE_EVERY_MS, false).map(|c| c.next_seq), Some(9));
        progress.unwritten();
        assert_eq!(progress.due(1_400, false).map(|c| c.next_seq), Some(9), "a failed write is made again");
    }

    #[test]
    fn events_are_reserved_before_pairs_of_them_are_handed_out() {
        let mut progress = Progress::new(stored(0, 100));
        assert_eq!(progress.reserve(99), None, "reserved at start");
        let reserved = progress.reserve(100).unwrap();
        assert_eq!(reserved.reserved_until, 100 + RESERVE_EVENTS);
        assert_eq!(reserved.next_seq, 0, "the cursor itself does not move ahead of the records");
        assert!(progress.reserve(150).is_some(), "not yet written: asked for again");
        progress.reserved(reserved, 0);
        assert_eq!(progress.reserve(100 + RESERVE_EVENTS - 1), None);
        progress.handed_until(7, false);
        assert_eq!(progress.due(WRITE_EVERY_MS, false).unwrap().reserved_until, 100 + RESERVE_EVENTS, "kept");
    }

    #[test]
    fn a_cursor_of_hookd_0_1_stopped_inside_an_event_is_rewritten_whole() {
        let mut old = stored(4, 0);
        old.after_listener = "lst_x".into();
        let mut progress = Progress::new(old);
        let written = progress.due(1_000, false).unwrap();
        assert_eq!((written.next_seq, written.after_listener.as_str()), (4, ""));
    }
}
