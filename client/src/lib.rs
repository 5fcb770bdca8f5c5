//! Rust client for hookd, the webhook delivery service.
//!
//! For now a thin layer over the generated gRPC clients: [`connect`] opens a channel and
//! [`Client`] hands out each service's client with the `authorization: Bearer <key>`
//! metadata attached to every call. The protocol types are re-exported as [`v1`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = hookd_client::Client::connect("http://127.0.0.1:50051").await?.with_api_key("hkp_...")?;
//! let ack = client
//!     .trigger()
//!     .trigger(hookd_client::v1::TriggerRequest {
//!         event_type: "project.created".into(),
//!         payload: br#"{"id": 1}"#.to_vec(),
//!         ..Default::default()
//!     })
//!     .await?
//!     .into_inner();
//! println!("event {} recorded", ack.event_id);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// The generated protocol types and service clients of package `hookd.v1`.
pub use hookd::v1;

/// Errors of the client's own set-up steps (gRPC calls return `tonic::Status`).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a valid URI, or the connection failed.
    #[error("cannot connect to hookd: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The key cannot be sent as gRPC metadata.
    #[error("the API key or token holds characters that cannot be sent as metadata")]
    InvalidKey,
}

/// Opens a channel to a hookd server, e.g. `http://127.0.0.1:50051`.
pub async fn connect(endpoint: impl Into<String>) -> Result<Channel, ClientError> {
    Ok(Endpoint::from_shared(endpoint.into())?.connect().await?)
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

/// A channel to hookd with the credentials to send on it.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    bearer: Bearer,
}

impl Client {
    /// Connects to `endpoint` without credentials yet.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, ClientError> {
        Ok(Self::from_channel(connect(endpoint).await?))
    }

    /// Wraps an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self { channel, bearer: Bearer(None) }
    }

    /// Sends `key` (a producer API key or the admin token) with every call.
    pub fn with_api_key(self, key: &str) -> Result<Self, ClientError> {
        let value = format!("Bearer {key}").parse().map_err(|_| ClientError::InvalidKey)?;
        Ok(Self { bearer: Bearer(Some(value)), ..self })
    }

    /// `hookd.v1.AdminService` (needs the admin token).
    pub fn admin(&self) -> v1::admin_service_client::AdminServiceClient<InterceptedService<Channel, Bearer>> {
        v1::admin_service_client::AdminServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// `hookd.v1.RegisterService` (needs a producer API key).
    pub fn register(&self) -> v1::register_service_client::RegisterServiceClient<InterceptedService<Channel, Bearer>> {
        v1::register_service_client::RegisterServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// `hookd.v1.TriggerService` (needs a producer API key).
    pub fn trigger(&self) -> v1::trigger_service_client::TriggerServiceClient<InterceptedService<Channel, Bearer>> {
        v1::trigger_service_client::TriggerServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// `hookd.v1.DeliveryService` (a producer API key or the admin token).
    pub fn delivery(&self) -> v1::delivery_service_client::DeliveryServiceClient<InterceptedService<Channel, Bearer>> {
        v1::delivery_service_client::DeliveryServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }
}
