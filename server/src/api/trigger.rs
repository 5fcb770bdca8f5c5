//! `hookd.v1.TriggerService`: the intake path, unary and streaming, and delivery watching.
//!
//! A trigger is authenticated, validated, appended to the event log and answered once the
//! append is durable. Nothing on this path depends on how many listeners the event has:
//! fan-out and delivery happen afterwards. A stream keeps a bounded number of triggers in
//! flight and stops reading while they are, so a fast client is slowed by HTTP/2 flow
//! control, never buffered without limit. A client that goes away costs nothing: what was
//! acknowledged stays acknowledged, the rest is dropped.

use std::pin::Pin;
use std::sync::Arc;

use hookd::v1::trigger_service_server::TriggerService;
use hookd::v1::trigger_stream_ack::Result as AckResult;
use hookd::v1::{
    DeliveryUpdate, Error as ItemError, TriggerAck, TriggerRequest, TriggerStreamAck, TriggerStreamRequest,
    WatchDeliveriesRequest,
};
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{ApiError, ApiResult, Shared};
use crate::clock::{now_ms, timestamp};
use crate::pipeline::AttemptOutcome;
use crate::store::{NewEvent, Producer};
use crate::{auth, validate};

/// Triggers of one stream waiting to be durable at once.
const STREAM_IN_FLIGHT: usize = 4096;
/// Payload bytes of one stream's triggers in flight at once.
const STREAM_BYTES: usize = 64 * 1024 * 1024;
/// Updates queued for one watcher before it counts as too slow.
const WATCH_BUFFER: usize = 256;

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

/// Validates and appends one trigger; the answer once durable.
async fn accept(
    shared: &Shared,
    producer: &Producer,
    key_hash: [u8; 32],
    request: TriggerRequest,
) -> ApiResult<TriggerAck> {
    let event = new_event(shared, producer, key_hash, request)?;
    let appended = shared.store.append_event(event).await?;
    Ok(TriggerAck { event_id: appended.event_id, duplicate: appended.duplicate })
}

fn stream_ack(reference: u64, result: ApiResult<TriggerAck>) -> TriggerStreamAck {
    let result = match result {
        Ok(ack) => AckResult::Ack(ack),
        Err(error) => {
            let status = Status::from(error);
            AckResult::Error(ItemError { code: status.code() as i32, message: status.message().to_owned() })
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

#[tonic::async_trait]
impl TriggerService for TriggerApi {
    async fn trigger(&self, request: Request<TriggerRequest>) -> Result<Response<TriggerAck>, Status> {
        let (producer, key_hash) = auth::producer_with_key(request.metadata(), self.shared.store.as_ref())?;
        let ack = accept(&self.shared, &producer, key_hash, request.into_inner()).await?;
        Ok(Response::new(ack))
    }

    type TriggerStreamStream = BoxStream<TriggerStreamAck>;

    async fn trigger_stream(
        &self,
        request: Request<Streaming<TriggerStreamRequest>>,
    ) -> Result<Response<Self::TriggerStreamStream>, Status> {
        let (producer, key_hash) = auth::producer_with_key(request.metadata(), self.shared.store.as_ref())?;
        let mut incoming = request.into_inner();
        let (acks, outgoing) = mpsc::channel(STREAM_IN_FLIGHT);
        let shared = self.shared.clone();
        let producer = Arc::new(producer);
        tokio::spawn(async move {
            let in_flight = Arc::new(Semaphore::new(STREAM_IN_FLIGHT));
            let bytes = Arc::new(Semaphore::new(STREAM_BYTES));
            loop {
                // Read the next trigger only when there is room for it.
                let permit = tokio::select! {
                    permit = in_flight.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    () = acks.closed() => return,
                };
                let item = tokio::select! {
                    item = incoming.message() => match item {
                        Ok(Some(item)) => item,
                        // The client finished sending.
                        Ok(None) => break,
                        // A message the transport refused (e.g. too large) ends the stream with
                        // its status; a client that went away hears nothing.
                        Err(status) => {
                            let _ = acks.try_send(Err(super::oversize::too_large_as_exhausted(status)));
                            break;
                        }
                    },
                    // Shutting down: what was read is answered, the stream then ends.
                    () = shared.stopping() => break,
                };
                // Payload bytes held per stream are bounded too, not only the item count.
                let weight = u32::try_from(item.trigger.as_ref().map_or(0, |t| t.payload.len())).unwrap_or(u32::MAX);
                let held = match bytes.clone().acquire_many_owned(weight.clamp(1, STREAM_BYTES as u32)).await {
                    Ok(held) => held,
                    Err(_) => break,
                };
                let (shared, producer, acks) = (shared.clone(), producer.clone(), acks.clone());
                tokio::spawn(async move {
                    let result = match item.trigger {
                        Some(trigger) => accept(&shared, &producer, key_hash, trigger).await,
                        None => Err(ApiError::InvalidArgument("trigger is missing".into())),
                    };
                    drop(held);
                    // A client that went away, or stopped reading past shutdown, gets no ack;
                    // what was appended stays appended.
                    tokio::select! {
                        _ = acks.send(Ok(stream_ack(item.r#ref, result))) => {}
                        () = shared.stopping() => {}
                    }
                    drop(permit);
                });
            }
            // Every trigger read gets its ack before the stream ends.
            let _ = in_flight.acquire_many(STREAM_IN_FLIGHT as u32).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outgoing))))
    }

    type WatchDeliveriesStream = BoxStream<DeliveryUpdate>;

    async fn watch_deliveries(
        &self,
        request: Request<WatchDeliveriesRequest>,
    ) -> Result<Response<Self::WatchDeliveriesStream>, Status> {
        let producer = auth::producer(request.metadata(), self.shared.store.as_ref())?;
        let only_event = Some(request.into_inner().event_id).filter(|id| !id.is_empty());
        let mut outcomes = self.shared.pipeline.subscribe();
        let (updates, outgoing) = mpsc::channel(WATCH_BUFFER);
        // The status that ends the stream, read after everything already queued.
        let (last_word, ending) = mpsc::channel(1);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let end = loop {
                let outcome = tokio::select! {
                    outcome = outcomes.recv() => outcome,
                    () = updates.closed() => return,
                    () = shared.stopping() => break Status::unavailable("hookd is shutting down; reconnect later"),
                };
                match outcome {
                    Ok(outcome) => {
                        let wanted = outcome.producer_id == producer.id
                            && only_event.as_ref().is_none_or(|id| *id == outcome.event_id);
                        if !wanted {
                            continue;
                        }
                        match updates.try_send(Ok(update_message(outcome))) {
                            Ok(()) => {}
                            // Too slow: told and dropped, so the pipeline never waits for it.
                            Err(mpsc::error::TrySendError::Full(_)) => break too_slow(WATCH_BUFFER),
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => break too_slow(missed),
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            };
            let _ = last_word.try_send(Err(end));
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outgoing).chain(ReceiverStream::new(ending)))))
    }
}

fn too_slow(missed: impl std::fmt::Display) -> Status {
    Status::resource_exhausted(format!(
        "this watcher fell {missed} updates behind and was dropped; reconnect, and use ListDeliveries to catch up"
    ))
}
