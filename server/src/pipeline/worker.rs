//! One delivery attempt from start to record: load the delivery, its listener and event,
//! open the secret, sign, POST, then record the attempt together with the delivery's next
//! step in one atomic write.
//!
//! A worker never panics the pipeline and never retries on its own: every failure becomes
//! an attempt record and a scheduled next attempt (or the end). It reports what happened to
//! the dispatcher, which owns the per-listener limits: once the listener has answered (its
//! slot is free; not for ordered listeners, whose next delivery waits for the record), and
//! once the attempt is recorded.

use std::sync::Arc;
use std::time::Duration;

use super::deliver::{WebhookRequest, webhook_headers};
use super::dispatch::Turn;
use super::retry::{honours_retry_after, is_success};
use super::{AttemptOutcome, Context};
use crate::clock::now_ms;
use crate::crypto::random_bytes;
use crate::store::{
    Attempt, AttemptTrigger, Completion, DeliveryState, DueEntry, ListenerHealth, NextStep, StoreError,
};
use hookd::webhook;

/// How a worker's turn ended, as far as the dispatcher is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Succeeded,
    /// Failed; another attempt is scheduled.
    Retrying,
    /// Failed for the last time.
    FailedForGood,
    /// Nothing was sent (listener gone, delivery already finished, or a store error).
    NotSent,
}

#[derive(Debug)]
pub(crate) struct Finished {
    pub delivery_id: String,
    pub listener_id: String,
    pub outcome: Outcome,
    /// The due time of a queue entry the dispatcher must look at (again): the entry itself
    /// when it is still queued, or the delivery's next attempt.
    pub look_again_ms: Option<u64>,
    /// Set (to the entry's due time) when the worker did not finish: it unwound or was
    /// dropped, and its entry is still queued.
    pub unwound: Option<u64>,
    /// The outcome was already reported when the listener answered.
    pub answered: bool,
}

/// How long a worker waits before handing back an entry it could not record (a store
/// error), so a failing store is not retried in a tight loop.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Makes the attempt for a queue entry the dispatcher handed out.
pub(crate) async fn attempt(context: Arc<Context>, entry: DueEntry, turn: &mut Turn) -> Finished {
    let (outcome, look_again_ms) = match try_attempt(&context, &entry, turn).await {
        Ok(step) => step,
        Err(error) => {
            // The entry is still queued: it is due again once handed back.
            tracing::error!(delivery_id = %entry.delivery_id, error = &error as &dyn std::error::Error, "delivery attempt could not be recorded");
            tokio::time::sleep(ERROR_PAUSE).await;
            (Outcome::NotSent, Some(entry.due_ms))
        }
    };
    Finished {
        delivery_id: entry.delivery_id,
        listener_id: entry.listener_id,
        outcome,
        look_again_ms,
        unwound: None,
        answered: false,
    }
}

async fn try_attempt(
    context: &Arc<Context>,
    entry: &DueEntry,
    turn: &mut Turn,
) -> Result<(Outcome, Option<u64>), StoreError> {
    // Store calls run in place (see the module docs of `pipeline`).
    let delivery = context.queue.delivery(&entry.delivery_id)?;
    let listener = context.store.listener(&entry.listener_id)?;
    let event = match &delivery {
        Some(delivery) => context.queue.event_at(delivery.event_seq)?,
        None => None,
    };
    let (Some(mut delivery), Some(event)) = (delivery, event) else {
        tracing::warn!(delivery_id = %entry.delivery_id, "queued delivery or its event is missing; dropping the entry");
        context.queue.drop_entry(entry)?;
        return Ok((Outcome::NotSent, None));
    };
    // A scheduled entry of a delivery that has ended (e.g. a manual attempt succeeded) has
    // nothing left to do; a manual one is made whatever the state.
    if !entry.manual && delivery.state != DeliveryState::Pending as i32 {
        context.queue.drop_entry(entry)?;
        return Ok((Outcome::NotSent, None));
    }
    let Some(listener) = listener else {
        // A delivery that has ended keeps its outcome: only a pending one is cancelled.
        if delivery.state != DeliveryState::Pending as i32 {
            context.queue.drop_entry(entry)?;
            return Ok((Outcome::NotSent, None));
        }
        tracing::info!(delivery_id = %delivery.id, listener_id = %entry.listener_id, "listener deleted; delivery cancelled");
        context.queue.cancel_delivery(&delivery, entry)?;
        return Ok((Outcome::NotSent, None));
    };

    if !listener.enabled && !entry.manual {
        // Disabled since it was handed out: no attempt. The entry stays queued, and the
        // dispatcher parks it until the listener is enabled again.
        return Ok((Outcome::NotSent, Some(entry.due_ms)));
    }
    let number = delivery.attempts + 1;
    let signing_key = if listener.sealed_secret.is_empty() {
        None
    } else {
        match context.keyring.open(&listener.id, &listener.sealed_secret) {
            Ok(secret) => Some(webhook::signing_key(&secret)),
            Err(error) => {
                // Never send unsigned what must be signed: record a failed attempt instead.
                tracing::error!(listener_id = %listener.id, %error, "listener secret does not open");
                let error = format!("other: the listener's secret does not open: {error}");
                let attempt =
                    Attempt { number, started_at_ms: now_ms(), error, trigger: trigger(entry), ..Attempt::default() };
                let answered =
                    Answered { succeeded: false, retry_after: None, ordered: listener.ordered, refused: false };
                return finish(context, delivery, listener.id, attempt, entry, answered, turn).await;
            }
        }
    };
    let started_at_ms = now_ms();
    let timestamp = i64::try_from(started_at_ms / 1000).unwrap_or(i64::MAX);
    let request = WebhookRequest {
        event_id: &event.id,
        event_type: &event.event_type,
        delivery_id: &delivery.id,
        attempt: number,
        content_type: &event.content_type,
        body: &event.payload,
        timestamp,
    };
    let headers = webhook_headers(&request, signing_key.as_deref());
    drop(signing_key);
    // The payload goes with the request, so no copy of it waits with the attempt's record
    // (attempts waiting to be written are bounded in number, not in bytes).
    let response = context.sender.post(&listener.url, headers, event.payload).await;

    let status = response.status.unwrap_or(0);
    let answered = Answered {
        succeeded: response.status.is_some_and(is_success),
        retry_after: response.retry_after.filter(|_| honours_retry_after(status)),
        ordered: listener.ordered,
        refused: response.refused,
    };
    let attempt = Attempt {
        number,
        started_at_ms,
        duration_ms: u64::try_from(response.duration.as_millis()).unwrap_or(u64::MAX),
        status_code: u32::from(status),
        error: response.error.unwrap_or_default(),
        response_headers: response.headers,
        response_body: response.body,
        trigger: trigger(entry),
    };
    delivery.last_status_code = u32::from(status);
    finish(context, delivery, listener.id, attempt, entry, answered, turn).await
}

/// How the listener answered, as far as the next step is concerned.
struct Answered {
    succeeded: bool,
    /// A Retry-After that the status allows to be honoured.
    retry_after: Option<Duration>,
    /// The listener keeps strict order.
    ordered: bool,
    /// The target policy refused the address: no later attempt would fare better.
    refused: bool,
}

fn trigger(entry: &DueEntry) -> i32 {
    if entry.manual { AttemptTrigger::Manual as i32 } else { AttemptTrigger::Scheduled as i32 }
}

/// Writes the attempt with the delivery's next step, and keeps the listener's health.
/// Returns the outcome and when the next attempt is due, if there is one.
async fn finish(
    context: &Arc<Context>,
    mut delivery: crate::store::Delivery,
    listener_id: String,
    attempt: Attempt,
    entry: &DueEntry,
    answered: Answered,
    turn: &mut Turn,
) -> Result<(Outcome, Option<u64>), StoreError> {
    let Answered { succeeded, retry_after, ordered, refused } = answered;
    let now = now_ms();
    delivery.attempts = attempt.number;
    if entry.manual {
        delivery.manual_attempts += 1;
    }
    // Where the schedule stands: scheduled attempts only.
    let scheduled_attempts = delivery.attempts - delivery.manual_attempts;
    let (next, outcome) = if succeeded {
        delivery.state = DeliveryState::Succeeded as i32;
        delivery.next_attempt_at_ms = 0;
        (NextStep::Done, Outcome::Succeeded)
    } else if entry.manual {
        // A manual attempt is not retried: the delivery stays as it was.
        (NextStep::Keep, Outcome::Retrying)
    } else if refused {
        // The policy refuses where the listener's URL leads: retrying cannot help.
        delivery.state = DeliveryState::Failed as i32;
        delivery.next_attempt_at_ms = 0;
        (NextStep::Done, Outcome::FailedForGood)
    } else {
        match context.config.retry_schedule.delay_after(scheduled_attempts, retry_after, jitter()) {
            Some(delay) => {
                let due = now.saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
                delivery.next_attempt_at_ms = due;
                (NextStep::RetryAt(due), Outcome::Retrying)
            }
            None => {
                delivery.state = DeliveryState::Failed as i32;
                delivery.next_attempt_at_ms = 0;
                (NextStep::Done, Outcome::FailedForGood)
            }
        }
    };
    if succeeded {
        tracing::debug!(delivery_id = %delivery.id, attempt = attempt.number, status = attempt.status_code, "delivered");
    } else {
        tracing::info!(
            delivery_id = %delivery.id,
            attempt = attempt.number,
            status = attempt.status_code,
            error = %attempt.error,
            final_attempt = outcome == Outcome::FailedForGood,
            "delivery attempt failed"
        );
    }
    let outcome_update = AttemptOutcome {
        producer_id: delivery.producer_id.clone(),
        event_id: delivery.event_id.clone(),
        delivery_id: delivery.id.clone(),
        listener_id: listener_id.clone(),
        attempt: attempt.number,
        state: DeliveryState::try_from(delivery.state).unwrap_or(DeliveryState::Unspecified),
        status_code: attempt.status_code,
        error: attempt.error.clone(),
        at_ms: now,
    };
    let reserved = context.recorder.reserve().await?;
    // The next delivery of an ordered listener goes once this one's end is written, and is
    // decided on what was written; for any other, the listener's slot is free now.
    if !ordered {
        turn.answered(outcome);
    }
    reserved.record(Completion { delivery, attempt, entry: entry.clone(), next }, ordered).await?;
    let disable = track_health(context, &listener_id, succeeded, now)?;
    // Watchers hear of it once it is recorded; none listening is fine.
    context.watchers.publish(&outcome_update);
    if disable {
        disable_listener(context, &listener_id).await?;
    }
    let next_due_ms = match next {
        NextStep::RetryAt(due_ms) => Some(due_ms),
        NextStep::Done | NextStep::Keep => None,
    };
    Ok((outcome, next_due_ms))
}

/// Keeps the start of a listener's run of failures; true when it has lasted long enough to
/// disable the listener. Writes only when the run starts or ends.
fn track_health(context: &Context, listener_id: &str, succeeded: bool, now: u64) -> Result<bool, StoreError> {
    let health = context.queue.listener_health(listener_id)?;
    if succeeded {
        if health.failing_since_ms != 0 {
            context.queue.set_listener_health(listener_id, &ListenerHealth { failing_since_ms: 0 })?;
        }
        return Ok(false);
    }
    if health.failing_since_ms == 0 {
        context.queue.set_listener_health(listener_id, &ListenerHealth { failing_since_ms: now })?;
        return Ok(false);
    }
    let limit = u64::try_from(context.config.disable_after.as_millis()).unwrap_or(u64::MAX);
    Ok(now.saturating_sub(health.failing_since_ms) >= limit)
}

/// Disables a listener durably, with the reason, so it gets no new deliveries.
async fn disable_listener(context: &Arc<Context>, listener_id: &str) -> Result<(), StoreError> {
    let reason = format!(
        "disabled by hookd after {} of nothing but failed attempts",
        super::retry::format_duration(context.config.disable_after)
    );
    let changed = context
        .store
        .update_listener(
            listener_id,
            Box::new(move |listener| {
                if listener.enabled {
                    listener.enabled = false;
                    listener.disabled_reason = reason;
                }
            }),
        )
        .await?;
    if changed.is_some() {
        tracing::warn!(%listener_id, "listener disabled after a long run of failures");
    }
    Ok(())
}

/// A uniform value in [-1, 1] for retry jitter.
fn jitter() -> f64 {
    let bits = u64::from_le_bytes(random_bytes::<8>()) >> 11;
    (bits as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}
