//! `hookd.v1.RegisterService`: event hashes and the listeners registered against them.
//!
//! Secrets are sealed (crypto) before the store sees them and are never returned, except a
//! generated one in the answer that mints it. Another producer's listeners answer NOT_FOUND,
//! so ids reveal nothing.

use hookd::v1::register_service_server::RegisterService;
use hookd::v1::{
    DeleteListenerRequest, DeleteListenerResponse, DeriveEventHashRequest, DeriveEventHashResponse, GetListenerRequest,
    ListListenersRequest, ListListenersResponse, Listener as ListenerMessage, RegisterListenerRequest,
    RegisterListenerResponse, RotateListenerSecretRequest, RotateListenerSecretResponse, UpdateListenerRequest,
};
use tonic::{Request, Response, Status};

use super::{ApiError, ApiResult, Shared, page_end};
use crate::blocking;
use crate::clock::{now_ms, timestamp};
use crate::store::{EventHashEntry, Listener, Producer};
use crate::validate::{self, SecretChoice};
use crate::{auth, crypto, ids};

/// Longest grace period of a rotated listener secret: a week.
const MAX_SECRET_GRACE_SECONDS: u32 = 7 * 24 * 60 * 60;

pub struct RegisterApi {
    shared: Shared,
}

impl RegisterApi {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    /// The caller's listener, or NOT_FOUND (also for another producer's).
    fn own_listener(&self, producer: &Producer, listener_id: &str) -> ApiResult<Listener> {
        self.shared
            .store
            .listener(listener_id)?
            .filter(|listener| listener.producer_id == producer.id)
            .ok_or(ApiError::NotFound("listener"))
    }

    /// The caller's event hash entry, or NOT_FOUND.
    fn own_event_hash(&self, producer: &Producer, event_hash: &str) -> ApiResult<EventHashEntry> {
        self.shared
            .store
            .event_hash(event_hash)?
            .filter(|entry| entry.producer_id == producer.id)
            .ok_or(ApiError::NotFound("event hash"))
    }

    /// A listener URL, checked like any other and, when its host is a literal address,
    /// against the target policy too (a name is checked when it is resolved, at each attempt).
    fn target(&self, url: &str) -> ApiResult<String> {
        let url = validate::listener_url(url)?;
        self.shared
            .config
            .pipeline
            .target_policy
            .check_literal(&url)
            .map_err(|refusal| ApiError::InvalidArgument(format!("url is {refusal}")))?;
        Ok(url)
    }

    /// Seals the chosen secret for `listener_id`; returns the envelope and, when generated,
    /// the plaintext to show once.
    fn seal(&self, listener_id: &str, choice: Option<SecretChoice<'_>>) -> (Vec<u8>, String) {
        match choice {
            None => (Vec::new(), String::new()),
            Some(SecretChoice::Given(secret)) => {
                (self.shared.config.keyring.seal(listener_id, secret.as_bytes()), String::new())
            }
            Some(SecretChoice::Generate) => {
                let secret = crypto::mint_listener_secret();
                (self.shared.config.keyring.seal(listener_id, secret.as_bytes()), secret)
            }
        }
    }
}

pub(crate) fn listener_message(listener: Listener) -> ListenerMessage {
    ListenerMessage {
        id: listener.id,
        event_hash: listener.event_hash,
        url: listener.url,
        has_secret: !listener.sealed_secret.is_empty(),
        enabled: listener.enabled,
        description: listener.description,
        ordered: listener.ordered,
        created_at: Some(timestamp(listener.created_at_ms)),
        event_type: listener.event_type,
        disabled_reason: listener.disabled_reason,
        max_per_second: listener.max_per_second,
        previous_secret_until: (!listener.previous_sealed_secret.is_empty()
            && listener.previous_secret_until_ms > now_ms())
        .then(|| timestamp(listener.previous_secret_until_ms)),
    }
}

#[tonic::async_trait]
impl RegisterService for RegisterApi {
    async fn derive_event_hash(
        &self,
        request: Request<DeriveEventHashRequest>,
    ) -> Result<Response<DeriveEventHashResponse>, Status> {
        let producer = auth::producer(request.metadata(), &self.shared.config, self.shared.store.as_ref())?;
        let event_type = validate::event_type(&request.get_ref().event_type)?;
        let event_hash = self.shared.config.keyring.event_hash(&producer.id, event_type);
        // Remember what the hash stands for, so it stays valid even if the derivation changes.
        if self.shared.store.event_hash(&event_hash)?.is_none() {
            self.shared.ensure_accepting()?;
            let entry = EventHashEntry { producer_id: producer.id.clone(), event_type: event_type.to_owned() };
            self.shared.store.put_event_hash(&event_hash, entry).await?;
        }
        Ok(Response::new(DeriveEventHashResponse { event_hash }))
    }

    async fn register_listener(
        &self,
        request: Request<RegisterListenerRequest>,
    ) -> Result<Response<RegisterListenerResponse>, Status> {
        let producer = auth::producer(request.metadata(), &self.shared.config, self.shared.store.as_ref())?;
        self.shared.ensure_accepting()?;
        let request = request.into_inner();
        let url = self.target(&request.url)?;
        let description = validate::free_text("description", &request.description)?.to_owned();
        let choice = validate::secret_choice(request.secret.as_deref(), request.generate_secret)?;
        let max_per_second = validate::max_per_second(request.max_per_second)?;
        let entry = self.own_event_hash(&producer, &request.event_hash)?;

        let now = now_ms();
        let id = ids::listener_id(now);
        let (sealed_secret, minted) = self.seal(&id, choice);
        let listener = Listener {
            id,
            producer_id: producer.id,
            event_hash: request.event_hash,
            event_type: entry.event_type,
            url,
            sealed_secret,
            enabled: true,
            description,
            ordered: request.ordered,
            created_at_ms: now,
            disabled_reason: String::new(),
            // Set by the store, as the listener is written.
            enabled_from_seq: 0,
            disabled_from_seq: 0,
            skipped: Vec::new(),
            previous_sealed_secret: Vec::new(),
            previous_secret_until_ms: 0,
            max_per_second,
        };
        self.shared.store.insert_listener(listener.clone()).await?;
        tracing::info!(listener_id = %listener.id, producer_id = %listener.producer_id, "listener registered");
        Ok(Response::new(RegisterListenerResponse { listener: Some(listener_message(listener)), secret: minted }))
    }

    async fn get_listener(&self, request: Request<GetListenerRequest>) -> Result<Response<ListenerMessage>, Status> {
        let producer = auth::producer(request.metadata(), &self.shared.config, self.shared.store.as_ref())?;
        let listener = self.own_listener(&producer, &request.get_ref().listener_id)?;
        Ok(Response::new(listener_message(listener)))
    }

    async fn list_listeners(
        &self,
        request: Request<ListListenersRequest>,
    ) -> Result<Response<ListListenersResponse>, Status> {
        let producer = auth::producer(request.metadata(), &self.shared.config, self.shared.store.as_ref())?;
        let request = request.into_inner();
        let limit = validate::page_size(request.page_size)?;
        let after = validate::page_token(&request.page_token)?;
        let event_type = if request.event_hash.is_empty() {
            None
        } else {
            Some(self.own_event_hash(&producer, &request.event_hash)?.event_type)
        };
        let store = self.shared.store.clone();
        let producer_id = producer.id.clone();
        // One more than asked tells whether another page exists.
        let mut listeners =
            blocking(move || store.list_listeners(&producer_id, event_type.as_deref(), after.as_deref(), limit + 1))
                .await?;
        let next_page_token = page_end(&mut listeners, limit, |listener| &listener.id);
        let listeners = listeners.into_iter().map(listener_message).collect();
        Ok(Response::new(ListListenersResponse { listeners, next_page_token }))
    }

    async fn update_listener(
        &self,
        request: Request<UpdateListenerRequest>,
    ) -> Result<Response<ListenerMessage>, Status> {
        let producer = auth::producer(request.metadata(), &self.shared.config, self.shared.store.as_ref())?;
        self.shared.ensure_accepting()?;
        let request = request.into_inner();
        let url = request.url.as_deref().map(|url| self.target(url)).transpose()?;
        let description = match request.description.as_deref() {
            Some(text) => Some(validate::free_text("description", text)?.to_owned()),
            None => None,
        };
        let max_per_second = request.max_per_second.map(validate::max_per_second).transpose()?;
        self.own_listener(&producer, &request.listener_id)?;
        let (enabled, ordered) = (request.enabled, request.ordered);
        let updated = self
            .shared
            .store
            .update_listener(
                &request.listener_id,
                Box::new(move |listener| {
                    if let Some(url) = url {
                        listener.url = url;
                    }
                    if let Some(description) = description {
                        listener.description = description;
                    }
                    if let Some(ordered) = ordered {
                        listener.ordered = ordered;
                    }
                    if let Some(max_per_second) = max_per_second {
                        listener.max_per_second = max_per_second;
                    }
                    match enabled {
                        Some(true) => {
                            listener.enabled = true;
                            listener.disabled_reason.clear();
                        }
                        Some(false) if listener.enabled => {
                            listener.enabled = false;
                            listener.disabled_reason = "disabled by UpdateListener".to_owned();
                        }
                        _ => {}
                    }
                }),
            )
            .await?
            .ok_or(ApiError::NotFound("listener"))?;
        self.shared.pipeline.listener_changed(&updated.id);
        Ok(Response::new(listener_message(updated)))
    }

    async fn delete_listener(
        &self,
        request: Request<DeleteListenerRequest>,
    ) -> Result<Response<DeleteListenerResponse>, Status> {
        let producer = auth::producer(request.metadata(), &self.shared.config, self.shared.store.as_ref())?;
        self.shared.ensure_accepting()?;
        let listener_id = &request.get_ref().listener_id;
        self.own_listener(&producer, listener_id)?;
        // The deletion and its notice to the pipeline go to the end on a task of their own:
        // a caller that goes away half-way must not leave a deleted listener's waiting
        // deliveries uncancelled.
        let (store, pipeline, id) = (self.shared.store.clone(), self.shared.pipeline.clone(), listener_id.clone());
        let deleting = tokio::spawn(async move {
            let deleted = store.delete_listener(&id).await?;
            if let Some(deleted) = &deleted {
                pipeline.listener_deleted(deleted.clone());
            }
            Ok::<_, crate::store::StoreError>(deleted)
        });
        let deleted = deleting.await.map_err(|_| Status::internal("the deletion task failed"))??;
        deleted.ok_or(ApiError::NotFound("listener"))?;
        tracing::info!(%listener_id, "listener deleted");
        Ok(Response::new(DeleteListenerResponse { listener_id: listener_id.clone() }))
    }

    async fn rotate_listener_secret(
        &self,
        request: Request<RotateListenerSecretRequest>,
    ) -> Result<Response<RotateListenerSecretResponse>, Status> {
        let producer = auth::producer(request.metadata(), &self.shared.config, self.shared.store.as_ref())?;
        self.shared.ensure_accepting()?;
        let request = request.into_inner();
        let choice = validate::secret_choice(request.secret.as_deref(), request.generate_secret)?
            .ok_or_else(|| ApiError::InvalidArgument("give a secret or set generate_secret".into()))?;
        if request.grace_seconds > MAX_SECRET_GRACE_SECONDS {
            return Err(ApiError::InvalidArgument(format!(
                "grace_seconds is at most {MAX_SECRET_GRACE_SECONDS} (a week)"
            ))
            .into());
        }
        self.own_listener(&producer, &request.listener_id)?;
        let (sealed_secret, minted) = self.seal(&request.listener_id, Some(choice));
        let grace_until_ms = now_ms() + u64::from(request.grace_seconds) * 1000;
        let graced = request.grace_seconds > 0;
        let updated = self
            .shared
            .store
            .update_listener(
                &request.listener_id,
                Box::new(move |listener| {
                    // The secret replaced keeps signing through the grace period; one that
                    // was itself in its grace period is dropped.
                    let replaced = std::mem::replace(&mut listener.sealed_secret, sealed_secret);
                    (listener.previous_sealed_secret, listener.previous_secret_until_ms) =
                        if graced && !replaced.is_empty() { (replaced, grace_until_ms) } else { (Vec::new(), 0) };
                }),
            )
            .await?
            .ok_or(ApiError::NotFound("listener"))?;
        self.shared.pipeline.listener_changed(&updated.id);
        tracing::info!(listener_id = %updated.id, grace_seconds = request.grace_seconds, "listener secret rotated");
        Ok(Response::new(RotateListenerSecretResponse { listener: Some(listener_message(updated)), secret: minted }))
    }
}
