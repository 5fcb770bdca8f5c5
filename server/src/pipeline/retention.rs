//! Retention: deletes events older than the configured age, with their deliveries, attempts
//! and index entries, in bounded steps that never hold up intake or delivery.
//!
//! Events with a pending delivery are kept (and looked at again on the next sweep), and so
//! are events fan-out has not reached. An event record that does not decode goes too, once
//! the next one that does is old enough (its own age is unknown), and stays put aside. Each step is one atomic write of at most
//! [`STEP_EVENTS`] events; sled reuses the space freed. Idempotency records stay for their
//! 24 hours even when the retention is shorter: those of events removed sooner are swept
//! once their time is up.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::blocking;
use crate::clock::now_ms;
use crate::store::{HistoryStore, IDEMPOTENCY_WINDOW_MS};

/// Events looked at per atomic step.
const STEP_EVENTS: usize = 500;

/// How often a sweep runs for a given retention: a tenth of it, between 1 second and 1 hour.
pub(crate) fn sweep_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// Sweeps until `shutdown`.
pub(crate) async fn run(history: Arc<dyn HistoryStore>, retention: Duration, shutdown: CancellationToken) {
    let interval = sweep_interval(retention);
    let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    loop {
        let now = now_ms();
        let before_ms = now.saturating_sub(retention_ms);
        // Idempotency records live 24 hours whatever the retention.
        let keys_before_ms = now.saturating_sub(IDEMPOTENCY_WINDOW_MS);
        let (mut events, mut deliveries, mut kept) = (0, 0, 0);
        let mut start_seq = 0;
        loop {
            let history = history.clone();
            match blocking(move || history.trim(before_ms, keys_before_ms, start_seq, STEP_EVENTS)).await {
                Ok(step) => {
                    events += step.events;
                    deliveries += step.deliveries;
                    kept += step.kept;
                    match step.next_seq {
                        Some(next) => start_seq = next,
                        None => break,
                    }
                }
                Err(error) => {
                    tracing::error!(error = &error as &dyn std::error::Error, "retention sweep failed; retrying later");
                    break;
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
        }
        loop {
            let history = history.clone();
            match blocking(move || history.trim_keys(keys_before_ms, STEP_EVENTS)).await {
                Ok(looked_at) if looked_at == STEP_EVENTS && !shutdown.is_cancelled() => {}
                Ok(_) => break,
                Err(error) => {
                    tracing::error!(
                        error = &error as &dyn std::error::Error,
                        "idempotency sweep failed; retrying later"
                    );
                    break;
                }
            }
        }
        if events > 0 {
            tracing::info!(events, deliveries, kept, "retention removed old events");
        }
        if shutdown.run_until_cancelled(tokio::time::sleep(interval)).await.is_none() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_run_at_a_tenth_of_the_retention_within_bounds() {
        let table = [(1, 1), (30, 3), (30 * 24 * 3600, 3600), (0, 1)];
        for (retention, interval) in table {
            assert_eq!(sweep_interval(Duration::from_secs(retention)), Duration::from_secs(interval), "{retention}s");
        }
    }
}
