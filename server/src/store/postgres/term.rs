//! The delivery term: fencing for the writes of the node that delivers.
//!
//! The delivery lease is a session advisory lock, but the pipeline writes over other
//! connections of the pool. A node that lost the lease (its session reset, or gone silent)
//! could still commit what it had under way after another node took over: an attempt's
//! record written over the new holder's, a retry queued again behind an ordered listener's
//! next delivery, a fan-out cursor moved back. So every holder of the lease starts a new
//! term: it moves `delivery_term.epoch` on, in the lease's session, before it delivers. Every
//! write of the pipeline (fan-out, dispatch, recording, retention) runs in a transaction that
//! first locks that row `FOR SHARE` at the epoch of its own term, and is refused
//! ([`StoreError::NotDelivering`]) when the epoch has moved on. The new holder's move waits
//! for the old holder's writes under way, and every later one is refused: nothing of an old
//! term commits after a new one starts.
//!
//! A node writes for the term its pipeline began ([`Term::begin`]), not for the lease it
//! holds now, and the pipeline follows the term (not merely whether a lease is held): a node
//! that loses the lease and takes it again, however quickly, starts its pipeline again in the
//! new term. Stores no pipeline runs on (tests, `hookd rekey`)
//! never begin a term, and their writes are not fenced. This module never decides who
//! delivers; the lease does.

use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::GenericClient;

use super::signed;
use crate::store::StoreError;

/// The writes of a store whose pipeline never began a term: not fenced.
const UNFENCED: u64 = u64::MAX;
/// No term: this node does not deliver, and the pipeline's writes are refused.
const NONE: u64 = 0;

/// This node's lease and the term its pipeline writes for.
#[derive(Debug)]
pub(super) struct Term {
    /// The epoch this node's lease started, or [`NONE`] while it holds none.
    held: AtomicU64,
    /// The epoch the pipeline's writes are checked against, [`NONE`] or [`UNFENCED`].
    writing: AtomicU64,
}

impl Default for Term {
    fn default() -> Self {
        Self { held: AtomicU64::new(NONE), writing: AtomicU64::new(UNFENCED) }
    }
}

impl Term {
    /// This node took the lease and moved the epoch to `epoch`.
    pub(super) fn took(&self, epoch: u64) {
        self.held.store(epoch, Ordering::SeqCst);
    }

    /// This node no longer holds the lease: the pipeline's writes are refused from now on,
    /// before the pipeline hears of it.
    pub(super) fn lost(&self) {
        self.held.store(NONE, Ordering::SeqCst);
        // A store that never began a term stays unfenced.
        let _ = self
            .writing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |writing| (writing != UNFENCED).then_some(NONE));
    }

    /// The pipeline starts delivering in term `epoch`: its writes are for that term, unless
    /// the lease was lost or taken again since (the pipeline then hears the term changed, and
    /// begins again).
    pub(super) fn begin(&self, epoch: u64) {
        self.writing.store(epoch, Ordering::SeqCst);
        // A loss in between may have come before the store above: undone here.
        if self.held.load(Ordering::SeqCst) != epoch {
            let _ = self.writing.compare_exchange(epoch, NONE, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// The epoch a pipeline write is checked against: `None` when not fenced.
    pub(super) fn for_write(&self) -> Result<Option<u64>, StoreError> {
        match self.writing.load(Ordering::SeqCst) {
            UNFENCED => Ok(None),
            NONE => Err(StoreError::NotDelivering),
            epoch => Ok(Some(epoch)),
        }
    }

    /// Writes for the term `epoch` from now on, as a node that has not yet noticed it lost
    /// the lease would.
    #[cfg(test)]
    pub(super) fn write_as(&self, epoch: u64) {
        self.writing.store(epoch, Ordering::SeqCst);
    }
}

/// Starts a new term, in the lease's session once it holds the lock: waits for the writes
/// of the previous term under way, and refuses its later ones. A write of the last holder
/// left open (its node cut off mid-transaction) ends once idle for [`IDLE_IN_WRITE`] (each
/// checked write sets it for its own transaction); meanwhile this waits, saying so every
/// [`START_WAIT`] (the session's `lock_timeout`).
pub(super) async fn start(client: &tokio_postgres::Client) -> Result<u64, StoreError> {
    client.batch_execute(&format!("SET lock_timeout = {}", START_WAIT.as_millis())).await?;
    loop {
        match client.query_one("UPDATE delivery_term SET epoch = epoch + 1 WHERE id = 0 RETURNING epoch", &[]).await {
            Ok(row) => return Ok(super::unsigned(row.get(0))),
            Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                tracing::warn!("the new delivery term waits for a write of the last one still open");
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// For a transaction outside the pipeline that locks rows the pipeline writes (a manual
/// attempt, a replay, a recovery): left open, idle, it ends after [`IDLE_IN_WRITE`] too, so a
/// node cut off in the middle of one does not hold the recorder back for long.
pub(super) async fn limit_idle(tx: &impl GenericClient) -> Result<(), StoreError> {
    tx.execute("SELECT set_config('idle_in_transaction_session_timeout', $1, true)", &[&idle_limit()]).await?;
    Ok(())
}

/// [`IDLE_IN_WRITE`] as `idle_in_transaction_session_timeout` takes it, for a statement that
/// sets it for its own transaction: the intake's group and the control plane's writes set it
/// in their first statement, as they lock rows every node's triggers and writes wait for.
pub(super) fn idle_limit() -> String {
    IDLE_IN_WRITE.as_millis().to_string()
}

/// How long the start of a term waits for the last term's writes before it says so.
const START_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A checked write's transaction left open this long, idle, is ended by the server: so a node
/// cut off mid-write holds back the next term about this long.
const IDLE_IN_WRITE: std::time::Duration = std::time::Duration::from_secs(15);

/// The first statement of a pipeline write's transaction: goes on only while `epoch` is the
/// term in force, and keeps a new one from starting until the transaction ends.
pub(super) async fn check(tx: &impl GenericClient, epoch: Option<u64>) -> Result<(), StoreError> {
    let Some(epoch) = epoch else { return Ok(()) };
    // The transaction, left open, ends after IDLE_IN_WRITE (set for it alone).
    let idle = idle_limit();
    let row = tx
        .query_opt(
            "SELECT set_config('idle_in_transaction_session_timeout', $2, true) FROM delivery_term \
             WHERE id = 0 AND epoch = $1 FOR SHARE",
            &[&signed(epoch), &idle],
        )
        .await?;
    row.map(drop).ok_or(StoreError::NotDelivering)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_is_written_for_only_while_it_lasts_and_a_new_one_only_once_begun() {
        let term = Term::default();
        assert_eq!(term.for_write().unwrap(), None, "never begun: not fenced");
        term.took(5);
        term.begin(5);
        assert_eq!(term.for_write().unwrap(), Some(5));
        // Lost and taken again before the pipeline heard: nothing is written until it begins
        // the new term, and a late start of the old one does not write either.
        term.lost();
        term.took(6);
        assert!(matches!(term.for_write(), Err(StoreError::NotDelivering)));
        term.begin(5);
        assert!(matches!(term.for_write(), Err(StoreError::NotDelivering)));
        term.begin(6);
        assert_eq!(term.for_write().unwrap(), Some(6));
        term.lost();
        assert!(matches!(term.for_write(), Err(StoreError::NotDelivering)));
    }
}
