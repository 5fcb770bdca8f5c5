//! A turn: one attempt's hold on the dispatcher's limits, carried by the worker that makes it.
//!
//! The worker reports through it three times at most: when a request has run past the slow
//! threshold (its listener then draws from the suspect budget), when the listener has
//! answered (its slot and budget are free again: the limits count requests to listeners, not
//! disk writes; for an ordered listener this waits for the record, as its next delivery
//! does), and when the turn ends, with what became of the work. The end is always reported,
//! even if the worker unwinds: the work is then done again after a pause.

use tokio::sync::mpsc;

use super::Command;
use super::gate::Outcome;
use super::line::Work;

/// How long work whose worker unwound, or could not record it, waits before it is done again,
/// so a failing worker or store is not retried in a tight loop.
pub const AGAIN_AFTER_MS: u64 = 1000;

/// How a turn ended, for the dispatcher.
#[derive(Debug)]
pub(crate) struct Finished {
    pub request: u64,
    /// What was worked on.
    pub work: Work,
    pub outcome: Outcome,
    /// The listener answered within the slow threshold.
    pub fast: bool,
    /// Set when the work was not done (the worker unwound, or a store write failed): it is
    /// done again this long after. A queue entry is still queued; a pair still outstanding.
    pub again_after_ms: Option<u64>,
    /// The due time of a queue entry to look at: the delivery's next attempt.
    pub look_again_ms: Option<u64>,
    /// The outcome was already reported when the listener answered.
    pub answered: bool,
}

pub(crate) struct Turn {
    outbox: mpsc::UnboundedSender<Command>,
    request: u64,
    answered: bool,
    slow: bool,
    /// What is reported when the turn ends: how the worker finished or, until it returns,
    /// that it unwound (if it is dropped or panics first).
    report: Option<Finished>,
}

impl Turn {
    pub fn new(outbox: mpsc::UnboundedSender<Command>, request: u64, work: Work) -> Self {
        let unwound = Finished {
            request,
            work,
            outcome: Outcome::NotSent,
            fast: true,
            again_after_ms: Some(AGAIN_AFTER_MS),
            look_again_ms: None,
            answered: false,
        };
        Self { outbox, request, answered: false, slow: false, report: Some(unwound) }
    }

    /// The request has run past the slow threshold without an answer.
    pub fn went_slow(&mut self) {
        if !self.slow && !self.answered {
            self.slow = true;
            // The dispatcher is gone only at shutdown, when nothing is left to tell.
            let _ = self.outbox.send(Command::Slow { request: self.request });
        }
    }

    /// The listener has answered (or the attempt failed without a request): frees its slot
    /// and budget, and counts `outcome` toward its standing.
    pub fn answered(&mut self, outcome: Outcome, fast: bool) {
        if self.answered {
            return;
        }
        self.answered = true;
        let _ = self.outbox.send(Command::Answered { request: self.request, outcome, fast });
    }

    /// Reports how the turn ended.
    pub fn end(mut self, finished: Finished) {
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
