//! One delivery attempt from start to record: load the delivery (or, for a first attempt
//! taken from the event log, the event), open the listener's secret, sign, POST, then record
//! the attempt together with the delivery's next step in one atomic write.
//!
//! A worker never panics the pipeline and never retries on its own: every failure becomes an
//! attempt record and a scheduled next attempt (or the end). It reports through its
//! [`Turn`]: a request past the slow threshold, the listener's answer (its slot is free; for
//! an ordered listener once the record is written, since its next delivery waits for it), and
//! the end. The listener's standing, health and back-off are the dispatcher's business.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing::Instrument as _;

use super::deliver::{WebhookRequest, webhook_headers};
use super::gate::Outcome;
use super::line::Work;
use super::retry::{honours_retry_after, is_success};
use super::turn::{AGAIN_AFTER_MS, Finished, Turn};
use super::{AttemptOutcome, Context};
use crate::clock::now_ms;
use crate::crypto::{Keyring, random_bytes};
use crate::store::{
    Attempt, AttemptTrigger, Completion, Delivery, DeliveryState, DueEntry, Event, Listener, NextStep, StoreError,
};
use hookd::webhook;

/// A listener as the dispatcher last read it, with its URL parsed and its secrets opened once
/// for all its attempts (a change to the listener makes a new one).
#[derive(Debug)]
pub(crate) struct Target {
    pub listener: Listener,
    /// `Err` for a URL that does not parse (hookd checks URLs when they are registered).
    pub url: Result<url::Url, String>,
    /// Its signing keys, opened at its first attempt: opening a secret was a twentieth of the
    /// pipeline's CPU per delivery. Held in memory only, never written.
    opened: OnceLock<Result<Opened, String>>,
}

/// A listener's signing keys: its secret's, and the one its last rotation replaced (`Err`
/// when that one does not open: it fails attempts only while its grace period lasts).
struct Opened {
    current: Option<Vec<u8>>,
    previous: Result<Option<Vec<u8>>, String>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Opened { .. }")
    }
}

impl Target {
    pub fn new(listener: Listener) -> Self {
        let url = url::Url::parse(&listener.url).map_err(|error| error.to_string());
        Self { listener, url, opened: OnceLock::new() }
    }

    /// The keys to sign a request started at `now_ms` with: its secret's, and the one its last
    /// rotation replaced while the grace period lasts; none without a secret. `Err` when a
    /// secret does not open (the request must then not go unsigned).
    fn signing_keys(&self, keyring: &Keyring, now_ms: u64) -> Result<Vec<&[u8]>, &str> {
        let listener = &self.listener;
        let opened = self.opened.get_or_init(|| {
            let open = |sealed: &Vec<u8>| -> Result<Option<Vec<u8>>, String> {
                if sealed.is_empty() {
                    return Ok(None);
                }
                match keyring.open(&listener.id, sealed) {
                    Ok(secret) => Ok(Some(webhook::signing_key(&secret))),
                    Err(error) => {
                        tracing::error!(listener_id = %listener.id, %error, "listener secret does not open");
                        Err(error.to_string())
                    }
                }
            };
            // The replaced secret only while it still signs, as when opened per attempt.
            let graced = listener.previous_secret_until_ms > now_ms;
            let previous = if graced { open(&listener.previous_sealed_secret) } else { Ok(None) };
            Ok(Opened { current: open(&listener.sealed_secret)?, previous })
        });
        let opened = opened.as_ref().map_err(String::as_str)?;
        let previous = if listener.previous_secret_until_ms > now_ms {
            opened.previous.as_ref().map_err(String::as_str)?.as_deref()
        } else {
            None
        };
        Ok(opened.current.as_deref().into_iter().chain(previous).collect())
    }
}

/// What an attempt came to.
struct Step {
    outcome: Outcome,
    fast: bool,
    /// The due time of the delivery's next queue entry.
    look_again_ms: Option<u64>,
    /// Nothing was done and the work goes back to its listener now (it was disabled
    /// meanwhile): the dispatcher decides again, and parks it.
    again_now: bool,
}

impl Step {
    fn not_sent() -> Self {
        Self { outcome: Outcome::NotSent, fast: true, look_again_ms: None, again_now: false }
    }
}

/// Makes the attempt for work the dispatcher handed out; `target` as the dispatcher last
/// read it (`None`: the listener is deleted).
pub(crate) async fn attempt(
    context: Arc<Context>,
    request: u64,
    work: Work,
    target: Option<Arc<Target>>,
    turn: &mut Turn,
) -> Finished {
    let span = tracing::info_span!(
        "attempt",
        delivery_id = %work.delivery_id(),
        event_id = tracing::field::Empty,
        attempt = tracing::field::Empty
    );
    let (step, again_after_ms) = match try_attempt(&context, &work, target, turn).instrument(span).await {
        Ok(step) => {
            let again = step.again_now.then_some(0);
            (step, again)
        }
        Err(error @ StoreError::NotDelivering) => {
            // Another node delivers now, and this one has not yet heard: nothing more is
            // sent from this term (every attempt under way or to come is dropped unrecorded).
            context.ended_if_refused(&error);
            (Step::not_sent(), None)
        }
        Err(error) => {
            tracing::error!(delivery_id = %work.delivery_id(), error = &error as &dyn std::error::Error, "delivery attempt could not be recorded");
            (Step::not_sent(), Some(AGAIN_AFTER_MS))
        }
    };
    Finished {
        request,
        work,
        outcome: step.outcome,
        fast: step.fast,
        again_after_ms,
        look_again_ms: step.look_again_ms,
        answered: false,
    }
}

/// The delivery to attempt, its queue entry (none for a first attempt from the log) and its
/// event; `None` when there is nothing to attempt.
fn load(context: &Context, work: &Work) -> Result<Option<(Delivery, Option<DueEntry>, Event)>, StoreError> {
    match work {
        Work::First(pair) => {
            // Recorded before a crash (the cursor had not passed it yet): done already.
            if pair.recheck && context.queue.delivery_exists(&pair.delivery_id)? {
                return Ok(None);
            }
            let kept = context.recent.get(pair.seq);
            let Some(event) = kept.map_or_else(|| context.queue.event_at(pair.seq), |event| Ok(Some(event)))? else {
                tracing::warn!(delivery_id = %pair.delivery_id, "the event of a delivery waiting in the log is gone");
                return Ok(None);
            };
            let delivery = Delivery::pending(pair.delivery_id.clone(), &event, &pair.listener_id, event.created_at_ms);
            Ok(Some((delivery, None, event)))
        }
        Work::Queued(entry) => {
            let delivery = context.queue.delivery(&entry.delivery_id)?;
            let event = match &delivery {
                Some(delivery) => context.queue.event_at(delivery.event_seq)?,
                None => None,
            };
            let (Some(delivery), Some(event)) = (delivery, event) else {
                tracing::warn!(delivery_id = %entry.delivery_id, "queued delivery or its event is missing; dropping the entry");
                context.queue.drop_entry(entry)?;
                return Ok(None);
            };
            // A scheduled entry of a delivery that has ended (a manual attempt succeeded, say)
            // has nothing left to do; a manual one is made whatever the state.
            if !entry.manual && delivery.state != DeliveryState::Pending as i32 {
                context.queue.drop_entry(entry)?;
                return Ok(None);
            }
            Ok(Some((delivery, Some(entry.clone()), event)))
        }
    }
}

async fn try_attempt(
    context: &Arc<Context>,
    work: &Work,
    target: Option<Arc<Target>>,
    turn: &mut Turn,
) -> Result<Step, StoreError> {
    // Store calls run in place (see the module docs of `pipeline`).
    let Some((mut delivery, entry, event)) = load(context, work)? else {
        return Ok(Step::not_sent());
    };
    let manual = entry.as_ref().is_some_and(|entry| entry.manual);
    let Some(target) = target else {
        // Deleted. A delivery that has ended keeps its outcome: only a pending one is cancelled.
        match &entry {
            Some(entry) if delivery.state != DeliveryState::Pending as i32 => context.queue.drop_entry(entry)?,
            Some(entry) => context.queue.cancel_delivery(&delivery, entry)?,
            None => context.queue.cancel_new(std::slice::from_ref(&delivery))?,
        }
        tracing::info!(delivery_id = %delivery.id, "listener deleted; delivery cancelled");
        return Ok(Step::not_sent());
    };
    let listener = &target.listener;
    if !listener.enabled && !manual {
        // Disabled since it was handed out: no attempt; the dispatcher parks it.
        return Ok(Step { again_now: true, ..Step::not_sent() });
    }
    let number = delivery.attempts + 1;
    let trigger = if manual { AttemptTrigger::Manual } else { AttemptTrigger::Scheduled } as i32;
    let signing_keys = match target.signing_keys(&context.keyring, now_ms()) {
        Ok(keys) => keys,
        Err(error) => {
            // Never send unsigned what must be signed: record a failed attempt instead.
            let error = format!("other: the listener's secret does not open: {error}");
            let attempt = Attempt { number, started_at_ms: now_ms(), error, trigger, ..Attempt::default() };
            let answer = Answer { succeeded: false, fast: true, retry_after: None, refused: false };
            return finish(context, delivery, listener, attempt, entry, answer, turn).await;
        }
    };
    let url = match &target.url {
        Ok(url) => url,
        Err(error) => {
            let error = format!("other: the listener's URL does not parse: {error}");
            let attempt = Attempt { number, started_at_ms: now_ms(), error, trigger, ..Attempt::default() };
            let answer = Answer { succeeded: false, fast: true, retry_after: None, refused: false };
            return finish(context, delivery, listener, attempt, entry, answer, turn).await;
        }
    };
    // The span of the attempt (see `attempt`) learns which event and attempt it is.
    let span = tracing::Span::current();
    span.record("event_id", tracing::field::display(&delivery.event_id));
    span.record("attempt", number);
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
    let headers = webhook_headers(&request, &signing_keys);
    drop(signing_keys);
    // The payload goes with the request, so no copy of it waits with the attempt's record
    // (attempts waiting to be written are bounded in number, not in bytes).
    let slow_after = context.config.slow_after;
    let post = context.sender.post(url, headers, event.payload);
    tokio::pin!(post);
    let response = tokio::select! {
        response = &mut post => response,
        () = tokio::time::sleep(slow_after) => {
            // Past the threshold: the listener's requests draw from the suspect budget now.
            turn.went_slow();
            post.await
        }
    };
    let status = response.status.unwrap_or(0);
    let answer = Answer {
        succeeded: response.status.is_some_and(is_success),
        fast: response.duration < slow_after,
        retry_after: response.retry_after.filter(|_| honours_retry_after(status)),
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
        trigger,
    };
    delivery.last_status_code = u32::from(status);
    context.metrics.attempt(crate::metrics::attempt_class(status, &attempt.error), response.duration);
    finish(context, delivery, listener, attempt, entry, answer, turn).await
}

/// How the listener answered, as far as the next step is concerned.
struct Answer {
    succeeded: bool,
    /// Within the slow threshold.
    fast: bool,
    /// A Retry-After that the status allows to be honoured.
    retry_after: Option<Duration>,
    /// The target policy refused the address: no later attempt would fare better.
    refused: bool,
}

/// Writes the attempt with the delivery's next step, and tells watchers.
async fn finish(
    context: &Arc<Context>,
    mut delivery: Delivery,
    listener: &Listener,
    attempt: Attempt,
    entry: Option<DueEntry>,
    answer: Answer,
    turn: &mut Turn,
) -> Result<Step, StoreError> {
    let Answer { succeeded, fast, retry_after, refused } = answer;
    let manual = entry.as_ref().is_some_and(|entry| entry.manual);
    let now = now_ms();
    delivery.attempts = attempt.number;
    if manual {
        delivery.manual_attempts += 1;
    }
    // Where the schedule stands: scheduled attempts only.
    let scheduled_attempts = delivery.attempts - delivery.manual_attempts;
    let (next, outcome) = if succeeded {
        delivery.state = DeliveryState::Succeeded as i32;
        delivery.next_attempt_at_ms = 0;
        (NextStep::Done, Outcome::Succeeded)
    } else if manual {
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
        tracing::debug!(listener_id = %listener.id, status = attempt.status_code, duration_ms = attempt.duration_ms, "delivered");
    } else {
        tracing::info!(
            listener_id = %listener.id,
            status = attempt.status_code,
            error = %attempt.error,
            final_attempt = outcome == Outcome::FailedForGood,
            "delivery attempt failed"
        );
    }
    let update = AttemptOutcome {
        producer_id: delivery.producer_id.clone(),
        event_id: delivery.event_id.clone(),
        delivery_id: delivery.id.clone(),
        listener_id: listener.id.clone(),
        attempt: attempt.number,
        state: DeliveryState::try_from(delivery.state).unwrap_or(DeliveryState::Unspecified),
        status_code: attempt.status_code,
        error: attempt.error.clone(),
        at_ms: now,
    };
    let reserved = context.recorder.reserve().await?;
    // An ordered listener's next delivery goes once this one's end is written, and is decided
    // on what was written; for any other, the listener's slot is free now.
    if !listener.ordered {
        turn.answered(outcome, fast);
    }
    let completion = Completion { delivery, attempt, entry, next, ordered: listener.ordered };
    // Other nodes' watchers hear of it as the record commits (see
    // `PipelineStore::complete_attempts_telling`), this node's once it is recorded; none
    // listening is fine.
    let told = context
        .watchers
        .wanted_by_others(&update.producer_id)
        .then(|| super::watchers::encode(std::slice::from_ref(&update)));
    reserved.record(completion, listener.ordered, told).await?;
    turn.answered(outcome, fast);
    context.watchers.publish(&update);
    let look_again_ms = match next {
        NextStep::RetryAt(due_ms) => Some(due_ms),
        NextStep::Done | NextStep::Keep => None,
    };
    Ok(Step { outcome, fast, look_again_ms, again_now: false })
}

/// A uniform value in [-1, 1] for retry jitter.
fn jitter() -> f64 {
    let bits = u64::from_le_bytes(random_bytes::<8>()) >> 11;
    (bits as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    // Regression (review): a replaced secret that did not open was remembered as a failure for
    // the listener's whole version, so attempts kept failing after its grace period ended.
    #[test]
    fn a_replaced_secret_that_does_not_open_fails_attempts_only_during_its_grace() {
        let keyring = Keyring::from_base64(&crate::crypto::mint_master_key_base64()).unwrap();
        let listener = Listener {
            id: "lst_a".into(),
            sealed_secret: keyring.seal("lst_a", b"whsec_current"),
            previous_sealed_secret: vec![1, 2, 3],
            previous_secret_until_ms: 1_000,
            ..Listener::default()
        };
        let target = Target::new(listener);
        assert!(target.signing_keys(&keyring, 500).is_err(), "never unsigned nor half-signed in the grace");
        assert_eq!(target.signing_keys(&keyring, 1_000).unwrap().len(), 1, "the current secret once it ends");

        let plain = Target::new(Listener { id: "lst_b".into(), ..Listener::default() });
        assert!(plain.signing_keys(&keyring, 0).unwrap().is_empty(), "no secret, no signature");
    }
}
