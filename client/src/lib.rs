//! Rust client for hookd, the webhook delivery service.
//!
//! - [`Client`]: connect (plain or TLS), authenticate with a producer API key or the admin
//!   token, trigger events ([`Client::trigger`], [`Client::trigger_json`], [`Client::send`]),
//!   register listeners, manage producers, and watch deliveries as they happen.
//! - [`Publisher`]: many triggers in flight over one stream, each resolved by its own durable
//!   ack; it reconnects and re-sends on its own without recording anything twice.
//! - [`verify`]: receiver-side check of a webhook request's signature (Standard Webhooks).
//! - [`v1`]: the generated protocol types and service clients, for anything else.
//!
//! ```no_run
//! # async fn demo() -> Result<(), hookd_client::Error> {
//! use hookd_client::{Client, Trigger};
//!
//! let client = Client::connect("http://127.0.0.1:50051").await?.with_api_key("hkp_...")?;
//! let ack = client.trigger_json("order.placed", &serde_json::json!({"order": 42})).await?;
//! println!("event {} is durable", ack.event_id);
//!
//! let publisher = client.publisher();
//! let acks: Vec<_> = (0..1000)
//!     .map(|n| publisher.publish(Trigger::new("tick", format!("{{\"n\": {n}}}"))))
//!     .collect();
//! for ack in acks {
//!     ack.await?;
//! }
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod error;
mod publisher;
mod verify;

use std::pin::Pin;
use std::time::Duration;

use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

pub use error::Error;
/// The generated protocol types and service clients of package `hookd.v1`.
pub use hookd::v1;
pub use publisher::{Publisher, PublisherOptions};
pub use verify::{TOLERANCE_SECS, VerifyError, verify, verify_at};

use v1::{
    CreateProducerRequest, DeriveEventHashRequest, RegisterListenerRequest, RotateProducerKeyRequest,
    SetProducerEnabledRequest, TriggerRequest, WatchDeliveriesRequest,
};

/// Opens a channel to a hookd server, e.g. `http://127.0.0.1:50051`. An `https://` endpoint
/// uses TLS, trusting the system's root certificates (those in the PEM file `SSL_CERT_FILE`
/// names, where set) and the web's (Mozilla's list).
pub async fn connect(endpoint: impl Into<String>) -> Result<Channel, Error> {
    let endpoint = endpoint.into();
    let tls = endpoint.starts_with("https://").then(|| ClientTlsConfig::new().with_enabled_roots());
    connect_endpoint(endpoint, tls).await
}

/// Opens a TLS channel to `endpoint` (`https://...`) trusting only the certificate
/// authorities in `ca_pem` (PEM), say a private CA of your own.
pub async fn connect_with_ca(endpoint: impl Into<String>, ca_pem: impl AsRef<[u8]>) -> Result<Channel, Error> {
    let tls = ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
    connect_endpoint(endpoint.into(), Some(tls)).await
}

async fn connect_endpoint(endpoint: String, tls: Option<ClientTlsConfig>) -> Result<Channel, Error> {
    let mut target = Endpoint::from_shared(endpoint)?
        .connect_timeout(Duration::from_secs(10))
        // A connection that died without a word is noticed, and streams on it fail over.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        target = target.tls_config(tls)?;
    }
    Ok(target.connect().await?)
}

/// Adds `authorization: Bearer <key>` to every request.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Bearer(..)" } else { "Bearer(none)" })
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A generated service client whose calls carry the [`Client`]'s credentials.
pub type Authed = InterceptedService<Channel, Bearer>;

/// One trigger: an event type, its payload and options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    event_type: String,
    payload: Vec<u8>,
    content_type: String,
    idempotency_key: String,
}

impl Trigger {
    /// A trigger of `event_type` with `payload` as its body (`application/json` unless told).
    pub fn new(event_type: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            event_type: event_type.into(),
            payload: payload.into(),
            content_type: String::new(),
            idempotency_key: String::new(),
        }
    }

    /// A trigger whose payload is `value` encoded as JSON.
    pub fn json(event_type: impl Into<String>, value: &impl serde::Serialize) -> Result<Self, Error> {
        let payload = serde_json::to_vec(value).map_err(|error| Error::Json(error.to_string()))?;
        Ok(Self::new(event_type, payload).content_type("application/json"))
    }

    /// The `content-type` listeners receive.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = content_type.into();
        self
    }

    /// The same key from the same producer within 24 hours returns the first event's id
    /// (with `duplicate: true`) and records nothing new: use it to retry safely.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = key.into();
        self
    }

    pub(crate) fn into_request(self) -> TriggerRequest {
        TriggerRequest {
            event_type: self.event_type,
            payload: self.payload,
            content_type: self.content_type,
            idempotency_key: self.idempotency_key,
        }
    }
}

/// A durable trigger's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The event's id; also the `webhook-id` of its requests.
    pub event_id: String,
    /// True when the idempotency key matched an earlier event (whose id this is).
    pub duplicate: bool,
}

/// A registered listener and, when one was generated, its secret (shown only here).
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    /// The listener.
    pub listener: v1::Listener,
    /// The generated `whsec_` secret, if `generate_secret` was asked for.
    pub secret: Option<String>,
}

/// A stream of delivery outcomes, as attempts finish.
pub type DeliveryUpdates = Pin<Box<dyn Stream<Item = Result<v1::DeliveryUpdate, Error>> + Send>>;

/// A channel to hookd with the credentials to send on it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    bearer: Bearer,
}

impl Client {
    /// Connects to `endpoint` (see [`connect`]) without credentials yet.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, Error> {
        Ok(Self::from_channel(connect(endpoint).await?))
    }

    /// Connects over TLS trusting only the certificate authorities in `ca_pem` (see
    /// [`connect_with_ca`]).
    pub async fn connect_with_ca(endpoint: impl Into<String>, ca_pem: impl AsRef<[u8]>) -> Result<Self, Error> {
        Ok(Self::from_channel(connect_with_ca(endpoint, ca_pem).await?))
    }

    /// Connects over TLS with your own configuration (custom roots, client certificates).
    pub async fn connect_with_tls(endpoint: impl Into<String>, tls: ClientTlsConfig) -> Result<Self, Error> {
        let channel = Endpoint::from_shared(endpoint.into())?.tls_config(tls)?.connect().await?;
        Ok(Self::from_channel(channel))
    }

    /// Wraps a channel you configured yourself.
    pub fn from_channel(channel: Channel) -> Self {
        Self { channel, bearer: Bearer(None) }
    }

    /// Sends `key` (a producer API key, or the admin token) with every call.
    pub fn with_api_key(self, key: &str) -> Result<Self, Error> {
        let value = format!("Bearer {key}").parse().map_err(|_| Error::InvalidKey)?;
        Ok(Self { bearer: Bearer(Some(value)), ..self })
    }

    /// The raw `hookd.v1.AdminService` client (admin token).
    pub fn admin(&self) -> v1::admin_service_client::AdminServiceClient<Authed> {
        v1::admin_service_client::AdminServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// The raw `hookd.v1.RegisterService` client (producer key).
    pub fn register(&self) -> v1::register_service_client::RegisterServiceClient<Authed> {
        v1::register_service_client::RegisterServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// The raw `hookd.v1.TriggerService` client (producer key).
    pub fn trigger_service(&self) -> v1::trigger_service_client::TriggerServiceClient<Authed> {
        v1::trigger_service_client::TriggerServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// The raw `hookd.v1.DeliveryService` client (producer key or admin token).
    pub fn delivery(&self) -> v1::delivery_service_client::DeliveryServiceClient<Authed> {
        v1::delivery_service_client::DeliveryServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// Triggers an event; resolves once it is durable.
    pub async fn trigger(&self, event_type: &str, payload: impl Into<Vec<u8>>) -> Result<Ack, Error> {
        self.send(Trigger::new(event_type, payload)).await
    }

    /// Triggers an event whose payload is `value` as JSON.
    pub async fn trigger_json(&self, event_type: &str, value: &impl serde::Serialize) -> Result<Ack, Error> {
        self.send(Trigger::json(event_type, value)?).await
    }

    /// Sends one [`Trigger`] (with its idempotency key and content type).
    pub async fn send(&self, trigger: Trigger) -> Result<Ack, Error> {
        let ack = self.trigger_service().trigger(trigger.into_request()).await?.into_inner();
        Ok(Ack { event_id: ack.event_id, duplicate: ack.duplicate })
    }

    /// A [`Publisher`] over one stream, with default options.
    pub fn publisher(&self) -> Publisher {
        self.publisher_with(PublisherOptions::default())
    }

    /// A [`Publisher`] over one stream.
    pub fn publisher_with(&self, options: PublisherOptions) -> Publisher {
        Publisher::start(self.clone(), options)
    }

    /// The event hash of one of the caller's event types (re-derive it; never store it).
    pub async fn event_hash(&self, event_type: &str) -> Result<String, Error> {
        let request = DeriveEventHashRequest { event_type: event_type.into() };
        Ok(self.register().derive_event_hash(request).await?.into_inner().event_hash)
    }

    /// Registers a listener (see `RegisterListenerRequest` for the secret and order options).
    pub async fn register_listener(&self, request: RegisterListenerRequest) -> Result<Registered, Error> {
        let answer = self.register().register_listener(request).await?.into_inner();
        let listener = answer
            .listener
            .ok_or_else(|| Error::Other { code: tonic::Code::Internal, message: "no listener in the answer".into() })?;
        Ok(Registered { listener, secret: Some(answer.secret).filter(|secret| !secret.is_empty()) })
    }

    /// Registers `url` for `event_type` with a generated signing secret: the listener and its
    /// secret (shown only now).
    pub async fn listen(&self, event_type: &str, url: &str) -> Result<Registered, Error> {
        let event_hash = self.event_hash(event_type).await?;
        self.register_listener(RegisterListenerRequest {
            event_hash,
            url: url.into(),
            generate_secret: true,
            ..Default::default()
        })
        .await
    }

    /// Creates a producer (admin token): the producer and its API key (shown only now).
    pub async fn create_producer(&self, name: &str) -> Result<(v1::Producer, String), Error> {
        let answer = self.admin().create_producer(CreateProducerRequest { name: name.into() }).await?.into_inner();
        let producer = answer
            .producer
            .ok_or_else(|| Error::Other { code: tonic::Code::Internal, message: "no producer in the answer".into() })?;
        Ok((producer, answer.api_key))
    }

    /// Disables a producer at once (admin token): its calls are refused from now on.
    pub async fn disable_producer(&self, producer_id: &str, reason: &str) -> Result<v1::Producer, Error> {
        let request =
            SetProducerEnabledRequest { producer_id: producer_id.into(), enabled: false, reason: reason.into() };
        Ok(self.admin().set_producer_enabled(request).await?.into_inner())
    }

    /// Enables a producer again (admin token).
    pub async fn enable_producer(&self, producer_id: &str) -> Result<v1::Producer, Error> {
        let request =
            SetProducerEnabledRequest { producer_id: producer_id.into(), enabled: true, reason: String::new() };
        Ok(self.admin().set_producer_enabled(request).await?.into_inner())
    }

    /// Mints a new API key for a producer (admin token); the old one keeps working for `grace`
    /// (zero: it stops at once).
    pub async fn rotate_producer_key(&self, producer_id: &str, grace: Duration) -> Result<String, Error> {
        let grace_seconds = u32::try_from(grace.as_secs()).unwrap_or(u32::MAX);
        let request = RotateProducerKeyRequest { producer_id: producer_id.into(), grace_seconds };
        Ok(self.admin().rotate_producer_key(request).await?.into_inner().api_key)
    }

    /// Streams the outcome of every attempt on the caller's events (or one event's) as it
    /// finishes. A watcher that reads too slowly is told and dropped; reconnect and use
    /// `ListDeliveries` to catch up.
    pub async fn watch_deliveries(&self, event_id: Option<&str>) -> Result<DeliveryUpdates, Error> {
        let request = WatchDeliveriesRequest { event_id: event_id.unwrap_or_default().into() };
        let updates = self.trigger_service().watch_deliveries(request).await?.into_inner();
        Ok(Box::pin(updates.map(|update| update.map_err(Error::from))))
    }
}
