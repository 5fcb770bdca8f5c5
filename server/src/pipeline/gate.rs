//! The gate: what the dispatcher knows about one listener, and the pure rules that decide
//! from that alone how much the listener may have under way, which budget its requests draw
//! from, and whether a piece of work may wait in memory or must be parked.
//!
//! No I/O and no clock (the time is a parameter): every rule here is table-tested. The
//! dispatcher owns the gates and changes them only through these methods, so each counter's
//! invariant is stated once, where the counter is declared.

use std::collections::HashSet;
use std::time::Duration;

use crate::rate::Bucket;

/// Consecutive failures after which a listener is backed off as a whole.
pub const BACKOFF_AFTER_FAILURES: u32 = 5;
/// Longest whole-listener back-off (shorter when the retry schedule's longest delay is).
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Requests at once from a listener whose last attempt failed (however many it may have
/// otherwise): a failing listener keeps its first attempts moving, in order, without holding
/// many sockets. Two, not one: one slot would also carry its retries.
pub const FAILING_CAP: usize = 2;
/// Work a listener in good standing (or not yet proven) may keep waiting in memory; beyond
/// it, work is parked.
pub const LINE_HEALTHY: usize = 65_536;
/// ...and a listener that is slow or failing: its backlog waits in its lot, so a thousand
/// hanging listeners cannot fill the memory every listener shares. A listener not yet proven
/// that turns out slow has its line cut down to this then.
pub const LINE_SUSPECT: usize = 256;
/// A parked count not known exactly (after a restart): "some", until a lot runs dry.
pub const SOME_PARKED: usize = usize::MAX / 2;

/// How a listener has been answering lately; decides its cap and budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Standing {
    /// No answer seen since hookd started (or since it was changed): one request at a time
    /// until one succeeds, so a listener that hangs from the start holds one socket, not
    /// its whole cap, before it is known to hang.
    #[default]
    Unproven,
    /// Its last answer was a success, within the slow threshold.
    Healthy,
    /// A request of it ran past the slow threshold, or its last success did.
    Slow,
    /// Its last attempt failed (an error status, a timeout, no connection).
    Failing,
}

/// The two budgets requests draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pool {
    /// Listeners in good standing (and those not yet proven).
    Healthy,
    /// Slow and failing listeners: whatever they hold, the healthy budget stays free.
    Suspect,
}

impl Pool {
    pub const ALL: [Pool; 2] = [Pool::Healthy, Pool::Suspect];

    pub fn index(self) -> usize {
        match self {
            Pool::Healthy => 0,
            Pool::Suspect => 1,
        }
    }
}

/// How an attempt ended, as far as the gate is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Failed; another attempt is scheduled (or it was a manual attempt).
    Retrying,
    /// Failed for the last time.
    FailedForGood,
    /// Nothing was sent (listener gone, delivery already finished, a store error).
    NotSent,
}

/// What becomes of a piece of work offered to a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Into the listener's line in memory, to start when it has room.
    Wait,
    /// Set aside until the listener has room: a queue entry into its durable lot, a first
    /// attempt left in the event log (its listener is detached from fan-out and reads it back).
    Park,
    /// The listener is gone: the delivery ends without an attempt.
    Cancel,
}

/// What the work is, as far as the rules go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// A manual attempt (RetryDelivery): asked for now, held by neither back-off nor order.
    pub manual: bool,
    /// Taken out of the listener's lot and not yet seen again: it may pass those still parked.
    pub released: bool,
}

/// What the dispatcher knows about one listener.
#[derive(Debug, Default)]
pub struct Gate {
    /// Requests sent and not yet answered (for an ordered listener: not yet recorded). One
    /// per turn handed out for this listener and not yet reported answered.
    pub in_flight: usize,
    /// Entries in the listener's lot ([`SOME_PARKED`] when unknown).
    pub parked: usize,
    /// Queue key ids taken out of the lot and not yet read back.
    pub released: HashSet<String>,
    pub standing: Standing,
    /// Consecutive failed attempts; 0 after a success.
    pub failures: u32,
    /// Back-offs in the current run of failures.
    pub backoffs: u32,
    /// While later than now, nothing but manual attempts starts.
    pub blocked_until_ms: u64,
    /// An ordered listener's first attempt waits to be offered again at this time (its record
    /// failed), or its order could not be checked: until the dispatcher's tick that offers it
    /// again sets this back to 0 (not merely until the time passes), nothing but manual
    /// attempts starts, nothing is read back or taken from its lot. Unlike a back-off, no
    /// outcome and no change of the listener lifts it.
    pub held_until_ms: u64,
    /// Start of the current run of nothing but failures, as stored; 0 while none.
    pub failing_since_ms: u64,
    /// The listener keeps strict order.
    pub ordered: bool,
    /// The listener exists and is enabled.
    pub enabled: bool,
    /// The listener no longer exists.
    pub deleted: bool,
    /// Its deliveries a second, when it set a limit: a request starts only with a token.
    pub rate: Option<Bucket>,
    /// An attempt of it has ended (answered, failed or timed out) since it was (re)started:
    /// a slow listener that never answered keeps one request at a time.
    pub answered: bool,
}

impl Gate {
    /// Requests this listener may have under way at once.
    pub fn cap(&self, configured: usize) -> usize {
        let configured = configured.max(1);
        match (self.ordered, self.standing) {
            (true, _) | (false, Standing::Unproven) => 1,
            // Slow before any answer: hanging, for all anyone knows; one socket, not its cap.
            (false, Standing::Slow) if !self.answered => 1,
            (false, Standing::Failing) => FAILING_CAP.min(configured),
            (false, Standing::Healthy | Standing::Slow) => configured,
        }
    }

    /// The budget its next request draws from.
    pub fn pool(&self) -> Pool {
        match self.standing {
            Standing::Unproven | Standing::Healthy => Pool::Healthy,
            Standing::Slow | Standing::Failing => Pool::Suspect,
        }
    }

    /// Work it may keep waiting in memory.
    pub fn line_limit(&self) -> usize {
        match self.standing {
            Standing::Unproven | Standing::Healthy => LINE_HEALTHY,
            Standing::Slow | Standing::Failing => LINE_SUSPECT,
        }
    }

    pub fn backed_off(&self, now_ms: u64) -> bool {
        self.blocked_until_ms > now_ms
    }

    /// Backed off, or held for its order.
    fn waiting_out(&self, now_ms: u64) -> bool {
        self.backed_off(now_ms) || self.held_until_ms != 0
    }

    /// Whether one more request may start now (the budget aside); `manual`: a manual attempt,
    /// which a back-off does not hold.
    pub fn may_start(&self, configured_cap: usize, now_ms: u64, manual: bool) -> bool {
        self.enabled
            && (manual || !self.waiting_out(now_ms))
            && self.in_flight < self.cap(configured_cap)
            && self.rate.is_none_or(|bucket| bucket.allows(now_ms))
    }

    /// Milliseconds until its rate limit lets a request start (0: it does now, or it has none).
    pub fn rate_wait_ms(&self, now_ms: u64) -> u64 {
        self.rate.map_or(0, |bucket| bucket.wait_ms(now_ms))
    }

    /// Counts a request started now: one more under way, one token spent.
    pub fn started(&mut self, now_ms: u64) {
        self.in_flight += 1;
        if let Some(bucket) = &mut self.rate {
            // may_start saw a token; a limit lowered since then still counts this request.
            let _ = bucket.take(now_ms);
        }
    }

    /// Takes the listener's limit (0: none), keeping what its bucket has saved.
    pub fn set_rate(&mut self, per_second: u32, now_ms: u64) {
        self.rate = match (per_second, self.rate) {
            (0, _) => None,
            (rate, Some(mut bucket)) => {
                bucket.set_rate(rate, now_ms);
                Some(bucket)
            }
            (rate, None) => Some(Bucket::new(rate, now_ms)),
        };
    }

    /// Where a piece of work offered to this listener goes, with `waiting` in its line now.
    pub fn admit(&self, offer: Offer, waiting: usize, now_ms: u64) -> Verdict {
        if self.deleted {
            return Verdict::Cancel;
        }
        let must_park = !self.enabled
            || (!offer.manual && self.waiting_out(now_ms))
            // Older work is parked: this waits behind it (manual attempts keep no order; an
            // ordered listener's order is checked when its work starts, against its oldest
            // unfinished delivery, parked ones included).
            || (!offer.manual && !self.ordered && self.parked > 0 && !offer.released)
            || waiting >= self.line_limit();
        if must_park { Verdict::Park } else { Verdict::Wait }
    }

    /// How many parked entries may be put back now: for an ordered listener one (its next in
    /// order) once nothing is under way; for any other, enough to fill its slots and its line
    /// once the line is down to half (so a large backlog costs one write per half line, not
    /// one per delivery), no more than `line_free`, what memory has left for all listeners.
    /// `waiting`: work in its line now.
    pub fn room(&self, configured_cap: usize, now_ms: u64, waiting: usize, line_free: usize) -> usize {
        if !self.enabled || self.deleted || self.waiting_out(now_ms) || self.parked == 0 {
            return 0;
        }
        let waiting = waiting + self.released.len();
        if self.ordered {
            return usize::from(self.in_flight + waiting == 0);
        }
        let limit = self.line_limit();
        if waiting > limit / 2 {
            return 0;
        }
        let cap = self.cap(configured_cap);
        let line = limit.saturating_sub(waiting).min(line_free);
        (cap.saturating_sub(self.in_flight) + line).min(self.parked)
    }

    /// First attempts a detached listener may read back from the log into its line now, with
    /// `waiting` there already. A listener in good standing reads half a line at a time; a
    /// slow or failing one no more than its slots take twice over, so what it reads back does
    /// not wait in memory behind requests that hang (and go back to the log after the hold
    /// limit, to be read again).
    pub fn read_back_room(&self, configured_cap: usize, now_ms: u64, waiting: usize) -> usize {
        if !self.enabled || self.deleted || self.waiting_out(now_ms) || self.parked > 0 {
            return 0;
        }
        if self.ordered {
            return usize::from(self.in_flight + waiting == 0);
        }
        match self.pool() {
            Pool::Healthy => (self.line_limit() / 2).saturating_sub(waiting),
            Pool::Suspect => (2 * self.cap(configured_cap)).saturating_sub(self.in_flight + waiting),
        }
    }

    /// A request of it ran past the slow threshold without an answer.
    pub fn went_slow(&mut self) {
        if matches!(self.standing, Standing::Unproven | Standing::Healthy) {
            self.standing = Standing::Slow;
        }
    }

    /// Counts an answered (or never sent) attempt: `fast` when it came within the slow
    /// threshold. Returns the end of a back-off that starts now, if one does: a listener
    /// failing [`BACKOFF_AFTER_FAILURES`] times in a row is backed off as a whole, from the
    /// schedule's first delay, doubling, at most `max_backoff`.
    pub fn count(
        &mut self,
        outcome: Outcome,
        fast: bool,
        now_ms: u64,
        first_delay: Duration,
        max_backoff: Duration,
    ) -> Option<u64> {
        if outcome != Outcome::NotSent {
            self.answered = true;
        }
        match outcome {
            Outcome::Succeeded => {
                self.standing = if fast { Standing::Healthy } else { Standing::Slow };
                self.failures = 0;
                self.backoffs = 0;
                self.blocked_until_ms = 0;
                None
            }
            Outcome::Retrying | Outcome::FailedForGood => {
                self.standing = Standing::Failing;
                self.failures += 1;
                // Attempts still under way when a back-off began do not lengthen it.
                if self.failures < BACKOFF_AFTER_FAILURES || self.backed_off(now_ms) {
                    return None;
                }
                let backoff = backoff(first_delay, self.backoffs, max_backoff);
                self.backoffs += 1;
                self.blocked_until_ms = now_ms + u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX / 2);
                Some(self.blocked_until_ms)
            }
            Outcome::NotSent => None,
        }
    }

    /// Starts afresh after the listener was changed (enabled again, say).
    pub fn reset(&mut self) {
        self.standing = Standing::Unproven;
        self.answered = false;
        self.failures = 0;
        self.backoffs = 0;
        self.blocked_until_ms = 0;
        self.failing_since_ms = 0;
    }

    /// Nothing here that a fresh gate would not know: it may be forgotten. A rate limit's
    /// bucket counts until it is full again, or forgetting it would grant a fresh burst.
    pub fn is_idle(&self, now_ms: u64) -> bool {
        self.in_flight == 0
            && self.held_until_ms == 0
            && self.parked == 0
            && self.released.is_empty()
            && self.failures == 0
            && self.failing_since_ms == 0
            && self.rate.is_none_or(|bucket| bucket.is_full(now_ms))
    }
}

/// The `episode`-th whole-listener back-off of a run of failures: doubling from the
/// schedule's first delay, at most `max`.
pub fn backoff(first_delay: Duration, episode: u32, max: Duration) -> Duration {
    first_delay.saturating_mul(1 << episode.min(20)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gate in `standing`, enabled, having had an answer unless it is unproven.
    fn gate(standing: Standing) -> Gate {
        Gate { standing, enabled: true, answered: standing != Standing::Unproven, ..Gate::default() }
    }

    const PLAIN: Offer = Offer { manual: false, released: false };
    const MANUAL: Offer = Offer { manual: true, released: false };
    const RELEASED: Offer = Offer { manual: false, released: true };

    #[test]
    fn a_rate_limit_holds_starts_to_its_pace_and_is_remembered_until_full() {
        let mut limited = gate(Standing::Healthy);
        limited.set_rate(2, 0);
        assert!(limited.may_start(8, 0, false));
        limited.started(0);
        limited.started(0);
        assert!(!limited.may_start(8, 0, false), "two a second: the third waits");
        assert!(!limited.may_start(8, 0, true), "a manual attempt keeps the pace too");
        assert_eq!(limited.rate_wait_ms(0), 500);
        assert!(limited.may_start(8, 500, false));
        limited.in_flight = 0;
        assert!(!limited.is_idle(500), "a spent bucket is not forgotten");
        assert!(limited.is_idle(1_000));
        // Lifting the limit frees it at once.
        limited.set_rate(0, 500);
        assert!(limited.may_start(8, 0, false));
        assert_eq!(limited.rate_wait_ms(0), 0);
    }

    #[test]
    fn a_slow_listener_that_never_answered_keeps_one_request() {
        let mut silent = gate(Standing::Unproven);
        silent.went_slow();
        assert!(!silent.answered);
        assert_eq!((silent.standing, silent.cap(8), silent.pool()), (Standing::Slow, 1, Pool::Suspect));
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(300));
        silent.count(Outcome::Succeeded, false, 0, first, max);
        assert_eq!((silent.standing, silent.cap(8)), (Standing::Slow, 8), "answered, if slowly: its cap");
        silent.reset();
        silent.went_slow();
        assert_eq!(silent.cap(8), 1, "changed: unproven again");
    }

    #[test]
    fn read_back_room_keeps_suspect_listeners_short() {
        // (gate, waiting, room) with 8 configured
        let hanging = Gate { in_flight: 1, answered: false, ..gate(Standing::Slow) };
        let failing = Gate { in_flight: 2, ..gate(Standing::Failing) };
        let slow = Gate { in_flight: 3, ..gate(Standing::Slow) };
        let table = [
            (gate(Standing::Healthy), 0, LINE_HEALTHY / 2),
            (gate(Standing::Healthy), LINE_HEALTHY / 2, 0),
            (gate(Standing::Unproven), 10, LINE_HEALTHY / 2 - 10),
            (hanging, 0, 1),
            (Gate { in_flight: 1, answered: false, ..gate(Standing::Slow) }, 1, 0),
            (failing, 0, 2),
            (slow, 4, 16 - 7),
            (Gate { ordered: true, ..gate(Standing::Healthy) }, 0, 1),
            (Gate { ordered: true, in_flight: 1, ..gate(Standing::Healthy) }, 0, 0),
            (Gate { parked: 3, ..gate(Standing::Healthy) }, 0, 0),
            (Gate { enabled: false, ..gate(Standing::Healthy) }, 0, 0),
        ];
        for (gate, waiting, room) in table {
            assert_eq!(gate.read_back_room(8, 0, waiting), room, "{gate:?} waiting {waiting}");
        }
        let backed_off = Gate { blocked_until_ms: 10, ..gate(Standing::Failing) };
        assert_eq!(backed_off.read_back_room(8, 5, 0), 0);
        assert_eq!(backed_off.read_back_room(8, 10, 0), 2 * FAILING_CAP);
    }

    #[test]
    fn cap_and_budget_follow_the_standing() {
        // (standing, ordered, cap with 8 configured, pool)
        let table = [
            (Standing::Unproven, false, 1, Pool::Healthy),
            (Standing::Healthy, false, 8, Pool::Healthy),
            (Standing::Slow, false, 8, Pool::Suspect),
            (Standing::Failing, false, FAILING_CAP, Pool::Suspect),
            (Standing::Healthy, true, 1, Pool::Healthy),
            (Standing::Failing, true, 1, Pool::Suspect),
        ];
        for (standing, ordered, cap, pool) in table {
            let gate = Gate { ordered, ..gate(standing) };
            assert_eq!(gate.cap(8), cap, "{standing:?} ordered={ordered}");
            assert_eq!(gate.pool(), pool, "{standing:?}");
        }
        assert_eq!(gate(Standing::Failing).cap(1), 1, "never more than configured");
        assert_eq!(gate(Standing::Healthy).line_limit(), LINE_HEALTHY);
        assert_eq!(gate(Standing::Unproven).line_limit(), LINE_HEALTHY, "a burst waits for the first answer");
        assert_eq!(gate(Standing::Slow).line_limit(), LINE_SUSPECT);
    }

    #[test]
    fn standing_moves_with_answers_and_slowness() {
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(300));
        // (from, outcome, fast, to)
        let table = [
            (Standing::Unproven, Outcome::Succeeded, true, Standing::Healthy),
            (Standing::Unproven, Outcome::Succeeded, false, Standing::Slow),
            (Standing::Healthy, Outcome::Retrying, true, Standing::Failing),
            (Standing::Failing, Outcome::Succeeded, true, Standing::Healthy),
            (Standing::Slow, Outcome::Succeeded, true, Standing::Healthy),
            (Standing::Healthy, Outcome::NotSent, true, Standing::Healthy),
            (Standing::Failing, Outcome::FailedForGood, false, Standing::Failing),
        ];
        for (from, outcome, fast, to) in table {
            let mut gate = gate(from);
            gate.count(outcome, fast, 0, first, max);
            assert_eq!(gate.standing, to, "{from:?} + {outcome:?} (fast {fast})");
        }
        let mut hanging = gate(Standing::Healthy);
        hanging.went_slow();
        assert_eq!(hanging.standing, Standing::Slow);
        let mut failing = gate(Standing::Failing);
        failing.went_slow();
        assert_eq!(failing.standing, Standing::Failing, "slowness does not hide failures");
    }

    #[test]
    fn five_failures_in_a_row_back_a_listener_off_doubling_up_to_the_limit() {
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(3));
        let mut gate = gate(Standing::Healthy);
        for n in 1..BACKOFF_AFTER_FAILURES {
            assert_eq!(gate.count(Outcome::Retrying, true, 0, first, max), None, "failure {n}");
        }
        assert_eq!(gate.count(Outcome::Retrying, true, 0, first, max), Some(1_000));
        assert_eq!(gate.count(Outcome::Retrying, true, 500, first, max), None, "under way when it began");
        assert_eq!(gate.count(Outcome::Retrying, true, 1_000, first, max), Some(3_000), "doubled");
        assert_eq!(gate.count(Outcome::Retrying, true, 3_000, first, max), Some(6_000), "at most the limit");
        gate.count(Outcome::Succeeded, true, 6_000, first, max);
        assert_eq!((gate.failures, gate.backoffs, gate.blocked_until_ms), (0, 0, 0));
    }

    #[test]
    fn backoff_doubles_from_the_first_delay_up_to_its_limit() {
        let max = Duration::from_secs(300);
        let table = [(0, 1), (1, 2), (2, 4), (5, 32), (9, 300), (40, 300)];
        for (episode, secs) in table {
            assert_eq!(backoff(Duration::from_secs(1), episode, max), Duration::from_secs(secs), "episode {episode}");
        }
    }

    #[test]
    fn work_waits_in_memory_unless_the_listener_cannot_take_it_soon() {
        let backed_off = Gate { blocked_until_ms: 100, ..gate(Standing::Failing) };
        let disabled = Gate { enabled: false, ..gate(Standing::Healthy) };
        let deleted = Gate { deleted: true, ..gate(Standing::Healthy) };
        let lot = Gate { parked: 3, ..gate(Standing::Healthy) };
        let ordered_lot = Gate { parked: 3, ordered: true, ..gate(Standing::Healthy) };
        let failing = gate(Standing::Failing);
        let healthy = gate(Standing::Healthy);
        // (gate, offer, waiting in its line, now, verdict)
        let table = [
            (&healthy, PLAIN, 0, 0, Verdict::Wait),
            (&backed_off, PLAIN, 0, 50, Verdict::Park),
            (&backed_off, MANUAL, 0, 50, Verdict::Wait),
            (&backed_off, PLAIN, 0, 100, Verdict::Wait),
            (&disabled, MANUAL, 0, 0, Verdict::Park),
            (&deleted, PLAIN, 0, 0, Verdict::Cancel),
            (&lot, PLAIN, 0, 0, Verdict::Park),
            (&lot, RELEASED, 0, 0, Verdict::Wait),
            (&lot, MANUAL, 0, 0, Verdict::Wait),
            (&ordered_lot, PLAIN, 0, 0, Verdict::Wait),
            (&failing, PLAIN, LINE_SUSPECT, 0, Verdict::Park),
            (&healthy, PLAIN, LINE_SUSPECT, 0, Verdict::Wait),
            (&healthy, PLAIN, LINE_HEALTHY, 0, Verdict::Park),
        ];
        for (index, (gate, offer, waiting, now, verdict)) in table.into_iter().enumerate() {
            assert_eq!(gate.admit(offer, waiting, now), verdict, "case {index}");
        }
    }

    #[test]
    fn a_request_starts_within_the_cap_unless_held() {
        let busy = Gate { in_flight: 1, ..gate(Standing::Unproven) };
        let backed_off = Gate { blocked_until_ms: 10, ..gate(Standing::Failing) };
        let disabled = Gate { enabled: false, ..gate(Standing::Healthy) };
        assert!(gate(Standing::Unproven).may_start(8, 0, false));
        assert!(!busy.may_start(8, 0, false), "one at a time until proven");
        assert!(Gate { in_flight: 7, ..gate(Standing::Healthy) }.may_start(8, 0, false));
        assert!(!Gate { in_flight: 8, ..gate(Standing::Healthy) }.may_start(8, 0, false));
        assert!(!Gate { in_flight: FAILING_CAP, ..gate(Standing::Failing) }.may_start(8, 0, false));
        assert!(!backed_off.may_start(8, 5, false));
        assert!(backed_off.may_start(8, 5, true), "a manual attempt is not held by a back-off");
        assert!(!disabled.may_start(8, 0, true));
    }

    #[test]
    fn room_fills_slots_and_line_from_half_empty_keeping_order_and_back_off() {
        let all = 131_072;
        let healthy = Gate { in_flight: 2, parked: 1_000_000, ..gate(Standing::Healthy) };
        assert_eq!(healthy.room(8, 0, 0, all), 6 + LINE_HEALTHY);
        assert_eq!(healthy.room(8, 0, 0, 100), 6 + 100, "no more of the line than memory has left");
        assert_eq!(healthy.room(8, 0, LINE_HEALTHY / 2 + 1, all), 0, "no refill while the line is more than half full");
        assert_eq!(healthy.room(8, 0, LINE_HEALTHY / 2, all), 6 + LINE_HEALTHY / 2);
        let failing = Gate { in_flight: 1, parked: 1_000_000, ..gate(Standing::Failing) };
        assert_eq!(failing.room(8, 0, 0, all), 1 + LINE_SUSPECT);
        let few = Gate { in_flight: 8, parked: 10, ..gate(Standing::Healthy) };
        assert_eq!(few.room(8, 0, 0, all), 10);
        let ordered = Gate { parked: 10, ordered: true, ..gate(Standing::Healthy) };
        assert_eq!(ordered.room(8, 0, 0, all), 1);
        assert_eq!(ordered.room(8, 0, 1, all), 0, "its next one is already in its line");
        let ordered_busy = Gate { in_flight: 1, ..ordered };
        assert_eq!(ordered_busy.room(8, 0, 0, all), 0);
        let blocked = Gate { parked: 10, blocked_until_ms: 100, ..gate(Standing::Failing) };
        assert_eq!(blocked.room(8, 99, 0, all), 0);
        assert_eq!(blocked.room(8, 100, 0, all), 10);
        let disabled = Gate { parked: 10, enabled: false, ..gate(Standing::Healthy) };
        assert_eq!(disabled.room(8, 0, 0, all), 0);
    }
}
