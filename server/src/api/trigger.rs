//! `hookd.v1.TriggerService`: the intake path, unary and streaming, and delivery watching.
//!
//! A trigger is authenticated, validated, appended to the event log and answered once the
//! append is durable. Nothing on this path depends on how many listeners the event has:
//! fan-out and delivery happen afterwards. A stream keeps a bounded number of triggers in
//! flight and stops reading while they are, so a fast client is slowed by HTTP/2 flow
//! control, never buffered without limit. A client that goes away costs nothing: what was
//! acknowledged stays acknowledged, the rest is dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use hookd::v1::trigger_service_server::TriggerService;
use hookd::v1::trigger_stream_ack::Result as AckResult;
use hookd::v1::{
    DeliveryUpdate, Error as ItemError, TriggerAck, TriggerRequest, TriggerStreamAck, TriggerStreamRequest,
    WatchDeliveriesRequest,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{ApiError, ApiResult, Shared};
use crate::clock::{now_ms, timestamp};
use crate::pipeline::AttemptOutcome;
use crate::pipeline::watchers::WATCH_QUEUE;
use crate::store::{NewEvent, Producer};
use crate::{auth, validate};

/// Triggers of one stream waiting to be durable at once.
const STREAM_IN_FLIGHT: usize = 4096;

pub struct TriggerApi {
    shared: Shared,
}

impl TriggerApi {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

/// Validates one trigger into the event to append.
fn new_event(shared: &Shared, producer: &Producer, key_hash: [u8; 32], request: TriggerRequest) -> ApiResult<NewEvent> {
    shared.ensure_accepting()?;
    let event_type = validate::event_type(&request.event_type)?.to_owned();
    let limit = shared.config.max_payload_bytes;
    if request.payload.len() > limit {
        return Err(ApiError::ResourceExhausted(format!(
            "payload is {} bytes; the limit is {limit} (--max-payload-bytes)",
            request.payload.len()
        )));
    }
    Ok(NewEvent {
        producer_id: producer.id.clone(),
        key_hash,
        event_type,
        payload: request.payload,
        content_type: validate::content_type(&request.content_type)?,
        idempotency_key: validate::idempotency_key(&request.idempotency_key)?,
        created_at_ms: now_ms(),
    })
}

/// Lets `event` through if its producer is within `--producer-trigger-rate`.
fn within_rate(shared: &Shared, producer: &Producer, event: NewEvent) -> ApiResult<NewEvent> {
    let Some(limiter) = &shared.trigger_rate else { return Ok(event) };
    match limiter.take(&producer.id, event.created_at_ms) {
        Ok(()) => Ok(event),
        Err(retry_after_ms) => Err(ApiError::RateLimited {
            message: format!(
                "producer {} is over its {} triggers a second; retry in {retry_after_ms} ms",
                producer.id,
                limiter.rate()
            ),
            retry_after_ms,
        }),
    }
}

/// Validates and appends one trigger; the answer once durable.
async fn accept(
    shared: &Shared,
    producer: &Producer,
    key_hash: [u8; 32],
    request: TriggerRequest,
) -> ApiResult<TriggerAck> {
    let result =
        match new_event(shared, producer, key_hash, request).and_then(|event| within_rate(shared, producer, event)) {
            Ok(event) => shared.store.append_event(event).await.map_err(ApiError::from),
            Err(error) => Err(error),
        };
    shared.metrics.trigger(match &result {
        Ok(appended) if appended.duplicate => "duplicate",
        Ok(_) => "accepted",
        Err(ApiError::InvalidArgument(_) | ApiError::ResourceExhausted(_)) => "invalid",
        Err(ApiError::RateLimited { .. }) => "rate_limited",
        Err(ApiError::Store(crate::store::StoreError::Refused(_))) => "refused",
        Err(_) => "unavailable",
    });
    let appended = result?;
    Ok(TriggerAck { event_id: appended.event_id, duplicate: appended.duplicate })
}

fn stream_ack(reference: u64, result: ApiResult<TriggerAck>) -> TriggerStreamAck {
    let result = match result {
        Ok(ack) => AckResult::Ack(ack),
        Err(error) => {
            let retry_after_ms = match &error {
                ApiError::RateLimited { retry_after_ms, .. } => (*retry_after_ms).max(1),
                _ => 0,
            };
            let status = Status::from(error);
            AckResult::Error(ItemError {
                code: status.code() as i32,
                message: status.message().to_owned(),
                retry_after_ms,
            })
        }
    };
    TriggerStreamAck { r#ref: reference, result: Some(result) }
}

fn update_message(outcome: AttemptOutcome) -> DeliveryUpdate {
    DeliveryUpdate {
        event_id: outcome.event_id,
        delivery_id: outcome.delivery_id,
        listener_id: outcome.listener_id,
        attempt: outcome.attempt,
        state: outcome.state as i32,
        status_code: outcome.status_code,
        error: outcome.error,
        at: Some(timestamp(outcome.at_ms)),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The payload bytes all streams may hold at once (read and not yet acknowledged), and the
/// room one item is given before it is read: the most an item may weigh.
struct StreamBudget {
    bytes: Arc<Semaphore>,
    item_room: u32,
}

/// Reads one TriggerStream's items and answers each as `answer` says, as soon as it is ready.
///
/// An item is read only when the stream has fewer than [`STREAM_IN_FLIGHT`] items in flight
/// and the budget shared by every stream has room for an item of the largest size; once read,
/// the item keeps what it weighs and gives back the rest. So payloads held by all streams
/// together stay within the budget, and a client that sends faster than hookd acknowledges is
/// slowed by HTTP/2 flow control, never buffered.
async fn serve_stream<S, A, F>(
    mut incoming: S,
    budget: StreamBudget,
    acks: mpsc::Sender<Result<TriggerStreamAck, Status>>,
    stopping: CancellationToken,
    answer: A,
) where
    S: Stream<Item = Result<TriggerStreamRequest, Status>> + Unpin,
    A: Fn(TriggerStreamRequest) -> F,
    F: Future<Output = TriggerStreamAck> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(STREAM_IN_FLIGHT));
    let mut ended = None;
    // The caller's key revoked or its producer disabled, as an item's answer says: nothing
    // more is read, and the stream ends with that status once what was read is answered.
    let refused: Arc<std::sync::OnceLock<Status>> = Arc::default();
    let refusing = CancellationToken::new();
    loop {
        let slot = tokio::select! {
            slot = in_flight.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = acks.closed() => return,
        };
        // Biased: a refusal or a shutdown seen stops the reading, whatever else is ready.
        let mut room = tokio::select! {
            biased;
            () = refusing.cancelled() => break,
            () = stopping.cancelled() => break,
            () = acks.closed() => return,
            room = budget.bytes.clone().acquire_many_owned(budget.item_room) => room.expect("the budget is never closed"),
        };
        let item = tokio::select! {
            biased;
            () = refusing.cancelled() => break,
            // Shutting down: what was read is answered, the stream then ends.
            () = stopping.cancelled() => break,
            item = incoming.next() => match item {
                Some(Ok(item)) => item,
                // The client finished sending.
                None => break,
                // A message the transport refused (e.g. too large) ends the stream with its
                // status, once the items read before it have their acks (a status ends the
                // response stream: sent first, it would leave durable items unanswered).
                Some(Err(status)) => {
                    ended = Some(super::oversize::too_large_as_exhausted(status));
                    break;
                }
            },
        };
        // An item weighs its payload and what it takes to hold it (its task, its event), so
        // items of a few bytes are bounded too.
        let weight = item.trigger.as_ref().map_or(0, |trigger| trigger.payload.len());
        let weight = crate::store::append_weight(weight).clamp(1, budget.item_room);
        let held = room.split(weight as usize).expect("an item weighs no more than the room it was given");
        drop(room);
        let (acks, stopping, answering) = (acks.clone(), stopping.clone(), answer(item));
        let (refused, refusing) = (refused.clone(), refusing.clone());
        tokio::spawn(async move {
            let ack = answering.await;
            if let Some(AckResult::Error(error)) = &ack.result
                && matches!(tonic::Code::from(error.code), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
            {
                let _ = refused.set(Status::new(tonic::Code::from(error.code), error.message.clone()));
                refusing.cancel();
            }
            drop(held);
            // A client that went away, or stopped reading past shutdown, gets no ack; what was
            // appended stays appended. Sent first when it can be, shutdown or not.
            tokio::select! {
                biased;
                _ = acks.send(Ok(ack)) => {}
                () = stopping.cancelled() => {}
            }
            drop(slot);
        });
    }
    // Every item read gets its ack before the stream ends.
    let _ = in_flight.acquire_many(STREAM_IN_FLIGHT as u32).await;
    if let Some(status) = ended.or_else(|| refused.get().cloned()) {
        tokio::select! {
            biased;
            _ = acks.send(Err(status)) => {}
            () = stopping.cancelled() => {}
        }
    }
}

#[tonic::async_trait]
impl TriggerService for TriggerApi {
    async fn trigger(&self, request: Request<TriggerRequest>) -> Result<Response<TriggerAck>, Status> {
        let (producer, key_hash) =
            auth::producer_with_key(request.metadata(), &self.shared.config, self.shared.store.as_ref())?;
        let ack = accept(&self.shared, &producer, key_hash, request.into_inner()).await?;
        Ok(Response::new(ack))
    }

    type TriggerStreamStream = BoxStream<TriggerStreamAck>;

    async fn trigger_stream(
        &self,
        request: Request<Streaming<TriggerStreamRequest>>,
    ) -> Result<Response<Self::TriggerStreamStream>, Status> {
        let (producer, key_hash) =
            auth::producer_with_key(request.metadata(), &self.shared.config, self.shared.store.as_ref())?;
        let incoming = request.into_inner();
        let (acks, outgoing) = mpsc::channel(STREAM_IN_FLIGHT);
        let shared = self.shared.clone();
        let producer = Arc::new(producer);
        let budget = StreamBudget {
            bytes: shared.stream_bytes.clone(),
            // The largest item with what holding it takes, within the whole budget.
            item_room: crate::store::append_weight(shared.config.max_payload_bytes)
                .min(u32::try_from(shared.config.stream_bytes_in_flight).unwrap_or(u32::MAX))
                .max(1),
        };
        let stopping = shared.stopping.clone();
        let answer = move |item: TriggerStreamRequest| {
            let (shared, producer) = (shared.clone(), producer.clone());
            async move {
                let result = match item.trigger {
                    Some(trigger) => accept(&shared, &producer, key_hash, trigger).await,
                    None => Err(ApiError::InvalidArgument("trigger is missing".into())),
                };
                stream_ack(item.r#ref, result)
            }
        };
        tokio::spawn(serve_stream(incoming, budget, acks, stopping, answer));
        Ok(Response::new(Box::pin(ReceiverStream::new(outgoing))))
    }

    type WatchDeliveriesStream = BoxStream<DeliveryUpdate>;

    async fn watch_deliveries(
        &self,
        request: Request<WatchDeliveriesRequest>,
    ) -> Result<Response<Self::WatchDeliveriesStream>, Status> {
        let (producer, key_hash) =
            auth::producer_with_key(request.metadata(), &self.shared.config, self.shared.store.as_ref())?;
        let only_event = Some(request.into_inner().event_id).filter(|id| !id.is_empty());
        if let Some(event_id) = &only_event {
            if !crate::ids::is_well_formed(event_id, crate::ids::EVENT_PREFIX) {
                return Err(
                    ApiError::InvalidArgument("event_id is not an event id (evt_ and 32 hex digits)".into()).into()
                );
            }
            // Another producer's event is not found, as everywhere else.
            self.shared.store.settled().await.map_err(ApiError::from)?;
            let (store, id) = (self.shared.store.clone(), event_id.clone());
            let event = crate::blocking(move || store.event(&id)).await.map_err(ApiError::from)?;
            if event.is_none_or(|event| event.producer_id != producer.id) {
                return Err(ApiError::NotFound("event").into());
            }
        }
        let mut watch = self
            .shared
            .pipeline
            .watch(&producer.id, only_event)
            .map_err(|too_many| ApiError::ResourceExhausted(too_many.to_string()))?;
        let (updates, outgoing) = mpsc::channel(WATCH_QUEUE);
        // The status that ends the stream, read after everything already queued.
        let (last_word, ending) = mpsc::channel(1);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut recheck = tokio::time::interval(WATCH_RECHECK);
            let end = loop {
                let outcome = tokio::select! {
                    outcome = watch.outcomes.recv() => outcome,
                    () = updates.closed() => return,
                    () = shared.stopping() => break Status::unavailable("hookd is shutting down; reconnect later"),
                    _ = recheck.tick() => match still_admitted(&shared, &key_hash) {
                        Ok(()) => continue,
                        Err(status) => break status,
                    },
                };
                // Nothing is told once the key is revoked or the producer disabled.
                if let Err(status) = still_admitted(&shared, &key_hash) {
                    break status;
                }
                let Some(outcome) = outcome else {
                    // The pipeline let go of this watcher: it fell behind (or hookd stopped).
                    if watch.fell_behind() {
                        break too_slow(WATCH_QUEUE);
                    }
                    break Status::unavailable("hookd is shutting down; reconnect later");
                };
                match updates.try_send(Ok(update_message(outcome))) {
                    Ok(()) => {}
                    // The client does not read: told and dropped, never waited for.
                    Err(mpsc::error::TrySendError::Full(_)) => break too_slow(WATCH_QUEUE),
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            };
            let _ = last_word.try_send(Err(end));
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outgoing).chain(ReceiverStream::new(ending)))))
    }
}

/// How often an idle watch checks that its key still admits it.
const WATCH_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether the key a watch was opened with still admits its producer: a watch opened with a
/// key that leaked ends once the key is revoked (or expires) or the producer is disabled.
/// A store that cannot say (it is failing) ends no watch.
fn still_admitted(shared: &Shared, key_hash: &[u8; 32]) -> Result<(), Status> {
    match shared.store.producer_by_key(key_hash, now_ms()) {
        Ok(Some(producer)) if producer.enabled => Ok(()),
        Ok(Some(producer)) => {
            Err(Status::permission_denied(format!("producer {} was disabled; this watch ends", producer.id)))
        }
        Ok(None) => {
            Err(Status::unauthenticated("the API key of this watch was revoked or has expired; this watch ends"))
        }
        Err(_) => Ok(()),
    }
}

fn too_slow(missed: impl std::fmt::Display) -> Status {
    Status::resource_exhausted(format!(
        "this watcher fell more than {missed} updates behind and was dropped; reconnect, and use ListDeliveries to \
         catch up"
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hookd::v1::TriggerRequest;

    use super::*;

    // Regression: every stream could hold 64 MiB of payloads, and streams were unlimited.
    #[tokio::test]
    async fn streams_together_hold_no_more_payload_than_their_shared_budget() {
        const ITEM: usize = 1024;
        let shared_bytes = Arc::new(Semaphore::new(3 * ITEM));
        // Answers wait here until the test opens the gate.
        let gate = Arc::new(Semaphore::new(0));
        let (answering, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let mut receivers = Vec::new();
        for stream in 0..3u64 {
            let items: Vec<Result<TriggerStreamRequest, Status>> = (0..10u64)
                .map(|n| {
                    let trigger = TriggerRequest { payload: vec![0; ITEM], ..Default::default() };
                    Ok(TriggerStreamRequest { r#ref: stream * 100 + n, trigger: Some(trigger) })
                })
                .collect();
            let (acks, received) = mpsc::channel(STREAM_IN_FLIGHT);
            receivers.push(received);
            let budget = StreamBudget { bytes: shared_bytes.clone(), item_room: ITEM as u32 };
            let (gate, answering, peak, started_tx) =
                (gate.clone(), answering.clone(), peak.clone(), started_tx.clone());
            let answer = move |item: TriggerStreamRequest| {
                let (gate, answering, peak, started_tx) =
                    (gate.clone(), answering.clone(), peak.clone(), started_tx.clone());
                async move {
                    let now = answering.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let _ = started_tx.send(());
                    gate.acquire().await.unwrap().forget();
                    answering.fetch_sub(1, Ordering::SeqCst);
                    stream_ack(item.r#ref, Ok(TriggerAck::default()))
                }
            };
            let incoming = tokio_stream::iter(items);
            tokio::spawn(serve_stream(incoming, budget, acks, CancellationToken::new(), answer));
        }
        for _ in 0..3 {
            started.recv().await.unwrap();
        }
        assert_eq!(shared_bytes.available_permits(), 0, "three items hold the whole budget");
        gate.add_permits(30);
        let mut acked = 0;
        for mut received in receivers {
            while let Some(ack) = received.recv().await {
                ack.unwrap();
                acked += 1;
            }
        }
        assert_eq!(acked, 30, "every item is answered once the budget frees up");
        assert!(peak.load(Ordering::SeqCst) <= 3, "never more items read than the budget holds");
        assert_eq!(shared_bytes.available_permits(), 3 * ITEM, "every byte is given back");
    }

    // Review: a stream whose key was revoked (or whose producer was disabled) went on reading,
    // each item refused one by one, holding the store's intake and budget for nothing.
    #[tokio::test]
    async fn a_stream_refused_for_its_caller_ends_with_that_status() {
        let items: Vec<Result<TriggerStreamRequest, Status>> = (1..=3u64)
            .map(|reference| Ok(TriggerStreamRequest { r#ref: reference, trigger: Some(TriggerRequest::default()) }))
            .collect();
        let asked = Arc::new(AtomicUsize::new(0));
        let answer = {
            let asked = asked.clone();
            move |item: TriggerStreamRequest| {
                asked.fetch_add(1, Ordering::SeqCst);
                async move {
                    let refused = ApiError::PermissionDenied("the producer is disabled".into());
                    stream_ack(item.r#ref, if item.r#ref == 1 { Ok(TriggerAck::default()) } else { Err(refused) })
                }
            }
        };
        // One item in flight at a time, so the third is read only after the second's answer.
        let (acks, mut received) = mpsc::channel(STREAM_IN_FLIGHT);
        let budget = StreamBudget { bytes: Arc::new(Semaphore::new(8192)), item_room: 8192 };
        serve_stream(tokio_stream::iter(items), budget, acks, CancellationToken::new(), answer).await;
        let mut answered = Vec::new();
        while let Some(answer) = received.recv().await {
            answered.push(answer);
        }
        assert!(matches!(&answered[0], Ok(ack) if ack.r#ref == 1));
        assert!(matches!(&answered[1], Ok(ack) if ack.r#ref == 2 && matches!(ack.result, Some(AckResult::Error(_)))));
        let ended = answered[2].as_ref().expect_err("the stream ends with the refusal");
        assert_eq!(ended.code(), tonic::Code::PermissionDenied);
        assert_eq!(answered.len(), 3);
        assert_eq!(asked.load(Ordering::SeqCst), 2, "nothing more is read");
    }

    // Review: a message the transport refused ended the stream at once with its status,
    // ahead of the acks of items read before it, which were durable but never answered.
    #[tokio::test]
    async fn a_refused_message_ends_the_stream_after_the_acks_of_what_was_read_before() {
        let items = vec![
            Ok(TriggerStreamRequest { r#ref: 1, trigger: Some(TriggerRequest::default()) }),
            Err(Status::resource_exhausted("message too large")),
        ];
        let gate = Arc::new(Semaphore::new(0));
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let answer = {
            let gate = gate.clone();
            move |item: TriggerStreamRequest| {
                let (gate, started_tx) = (gate.clone(), started_tx.clone());
                async move {
                    let _ = started_tx.send(());
                    gate.acquire().await.unwrap().forget();
                    stream_ack(item.r#ref, Ok(TriggerAck::default()))
                }
            }
        };
        let (acks, mut received) = mpsc::channel(STREAM_IN_FLIGHT);
        let budget = StreamBudget { bytes: Arc::new(Semaphore::new(1 << 20)), item_room: 1 << 16 };
        let serving =
            tokio::spawn(serve_stream(tokio_stream::iter(items), budget, acks, CancellationToken::new(), answer));
        started.recv().await.unwrap();
        // The refused message is read while the first item is still being answered.
        gate.add_permits(1);
        let first = received.recv().await.unwrap().expect("the item read before is answered");
        assert_eq!(first.r#ref, 1);
        let ended = received.recv().await.unwrap().expect_err("then the stream ends with the status");
        assert_eq!(ended.code(), tonic::Code::ResourceExhausted);
        assert!(received.recv().await.is_none());
        serving.await.unwrap();
    }
}
