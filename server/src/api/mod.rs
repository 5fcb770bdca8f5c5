//! The gRPC services, one file each: authenticate, validate, call the store, map the answer.
//!
//! This is the only layer that sees tonic types, and [`ApiError`]'s `From` impl is the one
//! place where errors become a `tonic::Status`. It never touches sled and never decides how
//! data is laid out. Internal errors are logged with their detail and answered with a
//! generic message.

pub mod admin;
pub mod delivery;
mod oversize;
pub mod register;
pub mod trigger;
pub mod ui;

pub use oversize::OversizeLayer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::config::Config;
use crate::pipeline::PipelineHandle;
use crate::store::{HistoryStore, PipelineStore, Refusal, Store, StoreError};
use crate::validate::Invalid;

/// What every service shares.
#[derive(Clone)]
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn PipelineStore>,
    pub history: Arc<dyn HistoryStore>,
    pub config: Arc<Config>,
    pub pipeline: PipelineHandle,
    /// False once shutdown has begun: intake answers UNAVAILABLE.
    accepting: Arc<AtomicBool>,
    /// Cancelled once shutdown has begun: open streams end.
    stopping: CancellationToken,
    /// Payload bytes of TriggerStream items read and not yet acknowledged, across every
    /// stream and connection (see `trigger::serve_stream`).
    pub stream_bytes: Arc<tokio::sync::Semaphore>,
    /// Each producer's triggers a second, when limited (`--producer-trigger-rate`).
    pub trigger_rate: Option<Arc<crate::rate::Limiter>>,
    pub metrics: crate::metrics::Metrics,
}

impl Shared {
    pub fn new<S: Store + PipelineStore + HistoryStore>(
        store: Arc<S>,
        config: Arc<Config>,
        pipeline: PipelineHandle,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        Self {
            store: store.clone(),
            queue: store.clone(),
            history: store,
            stream_bytes: Arc::new(tokio::sync::Semaphore::new(config.stream_bytes_in_flight)),
            trigger_rate: (config.producer_trigger_rate > 0)
                .then(|| Arc::new(crate::rate::Limiter::new(config.producer_trigger_rate))),
            metrics,
            config,
            pipeline,
            accepting: Arc::new(AtomicBool::new(true)),
            stopping: CancellationToken::new(),
        }
    }

    /// Stops accepting new writes (shutdown has begun).
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        self.stopping.cancel();
    }

    /// Resolves once shutdown has begun.
    pub async fn stopping(&self) {
        self.stopping.cancelled().await;
    }

    /// Refuses writes once shutdown has begun.
    pub fn ensure_accepting(&self) -> Result<(), ApiError> {
        if self.accepting.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(ApiError::Unavailable("hookd is shutting down; retry against another instance or after restart"))
        }
    }
}

/// Every way a call can fail, mapped once to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    ResourceExhausted(String),
    /// Over a rate limit: the message, and when a retry would be let in.
    #[error("{message}")]
    RateLimited { message: String, retry_after_ms: u64 },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(&'static str),
    #[error("storage failure")]
    Store(#[from] StoreError),
}

impl From<Invalid> for ApiError {
    fn from(invalid: Invalid) -> Self {
        ApiError::InvalidArgument(invalid.0)
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::InvalidArgument(message) => Status::invalid_argument(message),
            ApiError::Unauthenticated(message) => Status::unauthenticated(message),
            ApiError::PermissionDenied(message) => Status::permission_denied(message),
            ApiError::NotFound(what) => Status::not_found(format!("{what} not found")),
            ApiError::ResourceExhausted(message) => Status::resource_exhausted(message),
            ApiError::RateLimited { message, retry_after_ms } => {
                let mut status = Status::resource_exhausted(message);
                // The hint, machine-readable: milliseconds until a retry is let in.
                status.metadata_mut().insert("retry-after-ms", retry_after_ms.into());
                status
            }
            ApiError::FailedPrecondition(message) => Status::failed_precondition(message),
            ApiError::Unavailable(message) => Status::unavailable(message),
            ApiError::Store(StoreError::Closed) => Status::unavailable("hookd is shutting down"),
            ApiError::Store(StoreError::DamagedEvent { seq }) => Status::data_loss(format!(
                "the record of event {seq} is damaged: it was put aside and is not delivered (see the server log)"
            )),
            ApiError::Store(StoreError::Failed(cause)) => Status::unavailable(format!(
                "hookd cannot write ({cause}); nothing was recorded. Reads still work; writes need the operator"
            )),
            ApiError::Store(StoreError::Unavailable(cause)) => Status::unavailable(format!(
                "the database is unavailable ({cause}); retry shortly (a trigger retried with its idempotency key \
                 is never recorded twice)"
            )),
            ApiError::Store(StoreError::Behind) => {
                Status::unavailable("recent events are still being written into the database; retry shortly")
            }
            ApiError::Store(StoreError::Refused(Refusal::KeyRevoked)) => {
                Status::unauthenticated("unknown or expired API key")
            }
            ApiError::Store(StoreError::Refused(Refusal::ProducerDisabled(reason))) => {
                Status::permission_denied(format!("the producer is disabled: {reason}"))
            }
            ApiError::Store(error) => {
                tracing::error!(error = &error as &dyn std::error::Error, "request failed on storage");
                Status::internal("internal storage error; see the server log")
            }
        }
    }
}

impl From<Invalid> for Status {
    fn from(invalid: Invalid) -> Self {
        ApiError::from(invalid).into()
    }
}

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        ApiError::from(error).into()
    }
}

/// Cuts a page fetched with one extra item down to `limit`; the next page token when the
/// extra item was there, else empty.
pub(crate) fn page_end<T>(items: &mut Vec<T>, limit: usize, id: impl Fn(&T) -> &str) -> String {
    if items.len() <= limit {
        return String::new();
    }
    items.truncate(limit);
    items.last().map(|last| crate::validate::encode_page_token(id(last))).unwrap_or_default()
}

/// Result of a service method body.
pub type ApiResult<T> = Result<T, ApiError>;

/// Wraps a body's result into a tonic response.
pub fn respond<T>(result: ApiResult<T>) -> Result<tonic::Response<T>, Status> {
    result.map(tonic::Response::new).map_err(Status::from)
}
