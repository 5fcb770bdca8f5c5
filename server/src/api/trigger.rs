//! `hookd.v1.TriggerService`: the intake path.
//!
//! A trigger is authenticated, validated, appended to the event log and answered once the
//! append is durable. Nothing on this path depends on how many listeners the event has:
//! fan-out and delivery happen afterwards, off this path. `TriggerStream` and
//! `WatchDeliveries` are declared but not built yet and answer UNIMPLEMENTED.

use std::pin::Pin;

use hookd::v1::trigger_service_server::TriggerService;
use hookd::v1::{
    DeliveryUpdate, TriggerAck, TriggerRequest, TriggerStreamAck, TriggerStreamRequest, WatchDeliveriesRequest,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::{ApiError, ApiResult, Shared};
use crate::clock::now_ms;
use crate::store::{NewEvent, Producer};
use crate::{auth, validate};

pub struct TriggerApi {
    shared: Shared,
}

impl TriggerApi {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    /// Validates one trigger into the event to append.
    fn new_event(&self, producer: &Producer, key_hash: [u8; 32], request: TriggerRequest) -> ApiResult<NewEvent> {
        let event_type = validate::event_type(&request.event_type)?.to_owned();
        let limit = self.shared.config.max_payload_bytes;
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
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl TriggerService for TriggerApi {
    async fn trigger(&self, request: Request<TriggerRequest>) -> Result<Response<TriggerAck>, Status> {
        let (producer, key_hash) = auth::producer_with_key(request.metadata(), self.shared.store.as_ref())?;
        self.shared.ensure_accepting()?;
        let event = self.new_event(&producer, key_hash, request.into_inner())?;
        let appended = self.shared.store.append_event(event).await?;
        Ok(Response::new(TriggerAck { event_id: appended.event_id, duplicate: appended.duplicate }))
    }

    type TriggerStreamStream = BoxStream<TriggerStreamAck>;

    async fn trigger_stream(
        &self,
        _request: Request<Streaming<TriggerStreamRequest>>,
    ) -> Result<Response<Self::TriggerStreamStream>, Status> {
        Err(Status::unimplemented("TriggerStream is not built yet; use Trigger"))
    }

    type WatchDeliveriesStream = BoxStream<DeliveryUpdate>;

    async fn watch_deliveries(
        &self,
        _request: Request<WatchDeliveriesRequest>,
    ) -> Result<Response<Self::WatchDeliveriesStream>, Status> {
        Err(Status::unimplemented("WatchDeliveries is not built yet"))
    }
}
