//! `hookd.v1.AdminService`: producers and their API keys, for the admin token only.

use hookd::v1::admin_service_server::AdminService;
use hookd::v1::{
    CreateProducerRequest, CreateProducerResponse, GetProducerRequest, ListProducersRequest, ListProducersResponse,
    Producer as ProducerMessage, RotateProducerKeyRequest, RotateProducerKeyResponse, SetProducerEnabledRequest,
};
use tonic::{Request, Response, Status};

use super::{ApiError, ApiResult, Shared, page_end, respond};
use crate::blocking;
use crate::clock::{now_ms, timestamp};
use crate::store::Producer;
use crate::{auth, crypto, ids, validate};

/// Longest rotation grace period: 30 days.
const MAX_GRACE_SECONDS: u32 = 30 * 24 * 60 * 60;

pub struct AdminApi {
    shared: Shared,
}

impl AdminApi {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    fn producer(&self, producer_id: &str) -> ApiResult<Producer> {
        self.shared.store.producer(producer_id)?.ok_or(ApiError::NotFound("producer"))
    }
}

pub(crate) fn producer_message(producer: Producer) -> ProducerMessage {
    ProducerMessage {
        id: producer.id,
        name: producer.name,
        enabled: producer.enabled,
        created_at: Some(timestamp(producer.created_at_ms)),
        disabled_reason: producer.disabled_reason,
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_producer(
        &self,
        request: Request<CreateProducerRequest>,
    ) -> Result<Response<CreateProducerResponse>, Status> {
        auth::admin(request.metadata(), &self.shared.config)?;
        self.shared.ensure_accepting()?;
        let name = validate::producer_name(&request.get_ref().name)?.to_owned();
        let now = now_ms();
        let key = crypto::mint_api_key();
        let producer = Producer {
            id: ids::producer_id(now),
            name,
            enabled: true,
            created_at_ms: now,
            disabled_reason: String::new(),
            key_hashes: vec![key.hash.to_vec()],
        };
        self.shared.store.create_producer(producer.clone(), key.hash).await?;
        tracing::info!(producer_id = %producer.id, "producer created");
        Ok(Response::new(CreateProducerResponse { producer: Some(producer_message(producer)), api_key: key.plaintext }))
    }

    async fn get_producer(&self, request: Request<GetProducerRequest>) -> Result<Response<ProducerMessage>, Status> {
        auth::admin(request.metadata(), &self.shared.config)?;
        respond(self.producer(&request.get_ref().producer_id).map(producer_message))
    }

    async fn list_producers(
        &self,
        request: Request<ListProducersRequest>,
    ) -> Result<Response<ListProducersResponse>, Status> {
        auth::admin(request.metadata(), &self.shared.config)?;
        let limit = validate::page_size(request.get_ref().page_size)?;
        let after = validate::page_token(&request.get_ref().page_token)?;
        let store = self.shared.store.clone();
        // One more than asked tells whether another page exists.
        let mut producers = blocking(move || store.list_producers(after.as_deref(), limit + 1)).await?;
        let next_page_token = page_end(&mut producers, limit, |producer| &producer.id);
        let producers = producers.into_iter().map(producer_message).collect();
        Ok(Response::new(ListProducersResponse { producers, next_page_token }))
    }

    async fn rotate_producer_key(
        &self,
        request: Request<RotateProducerKeyRequest>,
    ) -> Result<Response<RotateProducerKeyResponse>, Status> {
        auth::admin(request.metadata(), &self.shared.config)?;
        self.shared.ensure_accepting()?;
        let RotateProducerKeyRequest { producer_id, grace_seconds } = request.into_inner();
        if grace_seconds > MAX_GRACE_SECONDS {
            return Err(ApiError::InvalidArgument(format!("grace_seconds must be at most {MAX_GRACE_SECONDS}")).into());
        }
        let key = crypto::mint_api_key();
        let grace_ms = u64::from(grace_seconds) * 1000;
        let found = self.shared.store.rotate_producer_key(&producer_id, key.hash, now_ms(), grace_ms).await?;
        if !found {
            return Err(ApiError::NotFound("producer").into());
        }
        tracing::info!(%producer_id, grace_seconds, "producer key rotated");
        Ok(Response::new(RotateProducerKeyResponse { api_key: key.plaintext }))
    }

    async fn set_producer_enabled(
        &self,
        request: Request<SetProducerEnabledRequest>,
    ) -> Result<Response<ProducerMessage>, Status> {
        auth::admin(request.metadata(), &self.shared.config)?;
        self.shared.ensure_accepting()?;
        let SetProducerEnabledRequest { producer_id, enabled, reason } = request.into_inner();
        validate::free_text("reason", &reason)?;
        let producer = self
            .shared
            .store
            .set_producer_enabled(&producer_id, enabled, reason)
            .await?
            .ok_or(ApiError::NotFound("producer"))?;
        tracing::info!(%producer_id, enabled, "producer enabled state changed");
        Ok(Response::new(producer_message(producer)))
    }
}
