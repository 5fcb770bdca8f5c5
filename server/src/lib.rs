//! hookd: a webhook delivery service. This library is the whole server; the `hookd` binary
//! only parses configuration, installs logging and wires signals to [`run`].
//!
//! Modules, each the single owner of its concern: [`config`] (flags and environment),
//! [`store`] (all durable state; the only one that touches sled), [`crypto`] (keys, sealed
//! secrets, event hashes), [`auth`] (who is calling), [`validate`] (input rules), `api` (the
//! gRPC services; the only one that sees tonic types), [`pipeline`] (fan-out, dispatch,
//! delivery, retries, retention; never sees gRPC types), [`ids`], [`clock`], [`telemetry`]
//! (logging).

mod api;
pub mod auth;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod ids;
pub mod listen;
pub mod metrics;
pub mod pipeline;
pub mod priority;
#[cfg(test)]
mod properties;
pub mod rate;
pub mod rekey;
mod side_http;
pub mod store;
pub mod telemetry;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use hookd::v1::admin_service_server::AdminServiceServer;
use hookd::v1::delivery_service_server::DeliveryServiceServer;
use hookd::v1::register_service_server::RegisterServiceServer;
use hookd::v1::trigger_service_server::TriggerServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

pub use config::Config;
use config::StoreKind;
use pipeline::Pipeline;
use store::{Backend, PgStore, SledStore, Store, StoreError};

/// How long in-flight calls get to finish once shutdown has begun.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Room for the non-payload fields of a trigger above `max_payload_bytes`, so an oversized
/// payload gets hookd's own clear error rather than a transport one.
const REQUEST_OVERHEAD_BYTES: usize = 64 * 1024;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the database ({dir}): {source}")]
    Open { dir: String, source: StoreError },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keys(#[from] rekey::RekeyError),
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reflection descriptors are invalid: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Pipeline(#[from] pipeline::PipelineError),
    #[error("cannot start the delivery runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Tls(#[from] listen::TlsError),
    #[error("cannot serve the web page on {addr}: {source}")]
    Ui {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How long a gRPC connection may be idle before hookd pings it, and how long the ping may
/// go unanswered before hookd closes it.
const PING_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
const PING_ANSWER: std::time::Duration = std::time::Duration::from_secs(20);

/// Serves hookd on `listener` until `shutdown` is cancelled, then stops intake, lets
/// in-flight calls finish (up to a grace period), flushes the database and returns.
pub async fn run(listener: TcpListener, config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    match &config.store {
        StoreKind::Embedded => run_on(open(&config, SledStore::open).await?, listener, config, shutdown).await,
        StoreKind::Postgres(address) => {
            let address = address.clone();
            let store = open(&config, move |_| PgStore::open(&address)).await?;
            run_on(store, listener, config, shutdown).await
        }
    }
}

/// Opens the configured store off the async threads.
async fn open<B, F>(config: &Config, open: F) -> Result<Arc<B>, RunError>
where
    B: Backend,
    F: FnOnce(&std::path::Path) -> Result<Arc<B>, StoreError> + Send + 'static,
{
    let dir = config.data_dir.clone();
    tokio::task::spawn_blocking(move || open(&dir))
        .await
        .expect("opening the store does not panic")
        .map_err(|source| RunError::Open { dir: config.store.describe(&config.data_dir), source })
}

async fn run_on<B: Backend>(
    store: Arc<B>,
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut config = config;
    let opened = {
        let (store, mut keyring) = (store.clone(), config.keyring.clone());
        tokio::task::spawn_blocking(move || rekey::open(store.as_ref(), &mut keyring).map(|()| keyring))
            .await
            .expect("does not panic")
    };
    match opened {
        Ok(keyring) => config.keyring = keyring,
        Err(error) => {
            if let Err(close_error) = store.close() {
                tracing::error!(error = &close_error as &dyn std::error::Error, "closing the database failed");
            }
            return Err(error.into());
        }
    }
    if config.keyring.rotating() {
        // Re-seal beside the traffic; a stop midway is finished at the next start.
        let (store, keyring) = (store.clone(), config.keyring.clone());
        tokio::spawn(async move {
            tracing::info!(key_id = %keyring.key_id(), "re-sealing listener secrets under the new master key");
            match rekey::rekey(store.as_ref(), &keyring).await {
                Ok(done) => tracing::info!(
                    key_id = %keyring.key_id(),
                    listeners = done.listeners,
                    resealed = done.resealed,
                    "master key rotation done: every secret is sealed under the new key; the previous key is no longer needed"
                ),
                Err(error) => tracing::error!(error = &error as &dyn std::error::Error, "master key rotation stopped"),
            }
        });
    }
    let result = serve(listener, config, store.clone(), shutdown).await;
    let closed = tokio::task::spawn_blocking(move || store.close()).await.expect("closing the store does not panic");
    result?;
    closed?;
    tracing::info!("hookd stopped");
    Ok(())
}

/// `hookd rekey`: with hookd stopped, re-seals every listener secret in `config`'s data
/// directory under its master key (the previous one given beside it), then returns what it did.
pub async fn rekey_offline(config: Config) -> Result<rekey::Rekeyed, RunError> {
    match &config.store {
        StoreKind::Embedded => rekey_on(open(&config, SledStore::open).await?, config).await,
        StoreKind::Postgres(address) => {
            let address = address.clone();
            rekey_on(open(&config, move |_| PgStore::open_alone(&address)).await?, config).await
        }
    }
}

async fn rekey_on<B: Backend>(store: Arc<B>, config: Config) -> Result<rekey::Rekeyed, RunError> {
    let mut keyring = config.keyring.clone();
    let result = async {
        rekey::open(store.as_ref(), &mut keyring)?;
        rekey::rekey(store.as_ref(), &keyring).await
    }
    .await;
    let closed = tokio::task::spawn_blocking(move || store.close()).await.expect("closing the store does not panic");
    let done = result?;
    closed?;
    Ok(done)
}

async fn serve<B: Backend>(
    listener: TcpListener,
    config: Config,
    store: Arc<B>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    // Cancelled by the caller, or by this function once the server has ended for any reason.
    let shutdown = shutdown.child_token();
    let max_message = config.max_payload_bytes + REQUEST_OVERHEAD_BYTES;
    let local_addr = listener.local_addr().ok();
    let tls = config.tls.clone().map(listen::Tls::load).transpose()?;
    if let Some(tls) = &tls {
        tokio::spawn(tls.clone().watch(shutdown.clone()));
    }
    if let Some(warning) = plaintext_warning(local_addr, tls.is_some()) {
        tracing::warn!("{warning}");
    }
    let metrics = metrics::Metrics::new();
    store.observe_syncs(metrics.journal_sync.clone());
    if let Some(addr) = config.metrics_listen {
        let listener = metrics::bind(addr).await.map_err(|source| RunError::Metrics { addr, source })?;
        tracing::info!(addr = %listener.local_addr().map_or(addr, |a| a), "metrics served on /metrics");
        tokio::spawn(metrics::serve(listener, metrics.clone(), shutdown.clone()));
        tokio::spawn(stats(store.clone(), config.data_dir.clone(), metrics.clone(), shutdown.clone()));
    }
    let (max_connections, max_streams) = (config.max_connections, config.max_streams_per_connection);
    tracing::info!(
        addr = %local_addr.map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
        tls = tls.is_some(),
        store = %config.store.describe(&config.data_dir),
        master_key_id = %config.keyring.key_id(),
        "hookd serving"
    );
    // Delivery work runs on its own runtime whose threads yield the CPU to intake: a trigger
    // is answered as fast with a thousand listeners fanning out as with none.
    let mut pipeline_runtime = PipelineRuntime(Some(pipeline::runtime().map_err(RunError::Runtime)?));
    let pipeline = {
        let _inside = pipeline_runtime.0.as_ref().expect("held until shutdown").enter();
        Pipeline::start(
            store.clone(),
            config.keyring.clone(),
            config.pipeline.clone(),
            store.durable_seq(),
            metrics.clone(),
        )?
    };
    let drain_deadline = config.pipeline.attempt_timeout.min(SHUTDOWN_GRACE);
    let pipeline_handle = pipeline.handle();
    // Delivery stops as soon as shutdown begins, alongside the draining of calls.
    let pipeline_stopped = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            pipeline.stop(drain_deadline).await;
        })
    };
    let ui_listen = config.ui_listen;
    let shared = api::Shared::new(store.clone(), Arc::new(config), pipeline_handle, metrics);
    if let Some(addr) = ui_listen {
        let listener = TcpListener::bind(addr).await.map_err(|source| RunError::Ui { addr, source })?;
        if !addr.ip().is_loopback() {
            tracing::warn!("the web page is served without TLS beyond loopback: put it behind a TLS proxy");
        }
        tracing::info!(addr = %listener.local_addr().map_or(addr, |a| a), "operator's web page served");
        tokio::spawn(api::ui::serve(listener, shared.clone(), shutdown.clone()));
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    let services = [
        "",
        <AdminServiceServer<api::admin::AdminApi> as tonic::server::NamedService>::NAME,
        <RegisterServiceServer<api::register::RegisterApi> as tonic::server::NamedService>::NAME,
        <TriggerServiceServer<api::trigger::TriggerApi> as tonic::server::NamedService>::NAME,
        <DeliveryServiceServer<api::delivery::DeliveryApi> as tonic::server::NamedService>::NAME,
    ];
    for name in services {
        health.set_service_status(name, ServingStatus::Serving).await;
    }
    // A write to disk that failed stops intake for good (the store says why, at error level,
    // and every write call answers UNAVAILABLE with the cause): health says so too, so a
    // load balancer or an orchestrator can act.
    let failure_watch = {
        let health = health.clone();
        let mut failure = Store::failure(store.as_ref());
        tokio::spawn(async move {
            if failure.wait_for(Option::is_some).await.is_ok() {
                for name in services {
                    health.set_service_status(name, ServingStatus::NotServing).await;
                }
            }
        })
    };
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hookd::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hookd::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let stopping = {
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            tracing::info!("shutting down: intake stopped, finishing in-flight calls");
            shared.stop_accepting();
            for name in services {
                health.set_service_status(name, ServingStatus::NotServing).await;
            }
        }
    };
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(max_streams)
        // A client gone silent (a dropped NAT entry, a machine switched off) gives its
        // connection slot back within a minute, rather than hold it until the system's
        // TCP keepalive gives up, hours later: hookd pings connections idle this long.
        .http2_keepalive_interval(Some(PING_IDLE))
        .http2_keepalive_timeout(Some(PING_ANSWER))
        .layer(api::OversizeLayer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            AdminServiceServer::new(api::admin::AdminApi::new(shared.clone())).max_decoding_message_size(max_message),
        )
        .add_service(
            RegisterServiceServer::new(api::register::RegisterApi::new(shared.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            TriggerServiceServer::new(api::trigger::TriggerApi::new(shared.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(DeliveryServiceServer::new(api::delivery::DeliveryApi::new(shared.clone())))
        .serve_with_incoming_shutdown(listen::incoming(listener, max_connections, tls), stopping);
    let mut server = tokio::spawn(server);
    let served = tokio::select! {
        joined = &mut server => joined.expect("the server task does not panic"),
        () = async { shutdown.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "in-flight calls did not finish in time; closing them");
            server.abort();
            Ok(())
        }
    };
    // Whatever ended the server, the pipeline stops before the store closes.
    failure_watch.abort();
    shutdown.cancel();
    pipeline_stopped.await.expect("stopping the pipeline does not panic");
    // A runtime is dropped off the async threads; what is left of it (attempts past the
    // deadline) is abandoned, to be redone after a restart.
    let runtime = pipeline_runtime.0.take().expect("held until shutdown");
    tokio::task::spawn_blocking(move || runtime.shutdown_timeout(Duration::from_millis(100)))
        .await
        .expect("shutting the pipeline runtime down does not panic");
    Ok(served?)
}

/// The pipeline's runtime. Should `serve` itself be dropped before it shuts the runtime down
/// (its caller's runtime ending first, as in tests), the runtime is let go without waiting: a
/// runtime may not be dropped on an async thread.
struct PipelineRuntime(Option<tokio::runtime::Runtime>);

impl Drop for PipelineRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Refreshes the gauges that look at the store and the data directory, until `shutdown`.
async fn stats<B: Backend>(
    store: Arc<B>,
    data_dir: std::path::PathBuf,
    metrics: metrics::Metrics,
    shutdown: CancellationToken,
) {
    loop {
        let (store, dir) = (store.clone(), data_dir.clone());
        let read = blocking(move || {
            let counts = store::HistoryStore::counts(store.as_ref());
            let bytes = ["journal", "db", "queue"].map(|part| (part, metrics::bytes_under(&dir.join(part))));
            (counts, bytes, Store::database_bytes(store.as_ref()))
        })
        .await;
        match read {
            (Ok(counts), bytes, database) => {
                match database {
                    Ok(Some(database)) => metrics::set(&metrics.store_bytes, ("part", "database"), database),
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(error = &error as &dyn std::error::Error, "cannot read the database's size")
                    }
                }
                metrics::set(&metrics.listeners, ("state", "registered"), counts.listeners);
                metrics::set(&metrics.listeners, ("state", "disabled"), counts.disabled_listeners);
                metrics::set(&metrics.pending, ("kind", "retry"), counts.queued);
                metrics.quarantined.set(i64::try_from(counts.quarantined).unwrap_or(i64::MAX));
                for (part, bytes) in bytes {
                    metrics::set(&metrics.store_bytes, ("part", part), bytes);
                }
            }
            (Err(error), _, _) => {
                tracing::warn!(error = &error as &dyn std::error::Error, "cannot count for the metrics")
            }
        }
        if shutdown.run_until_cancelled(tokio::time::sleep(metrics::STATS_EVERY)).await.is_none() {
            return;
        }
    }
}

/// What to say when hookd listens without TLS where others can reach it.
fn plaintext_warning(addr: Option<std::net::SocketAddr>, tls: bool) -> Option<&'static str> {
    (!tls && addr.is_some_and(|addr| !addr.ip().is_loopback())).then_some(
        "listening without TLS on a non-loopback address: API keys and payloads cross the network in the clear; \
         give --tls-cert and --tls-key (plaintext is for development on loopback only)",
    )
}

/// Runs blocking work (store calls that scan or write) off the async threads, keeping the
/// tracing span.
pub(crate) async fn blocking<T, F>(work: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work)).await.expect("blocking store work does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_warned_about_beyond_loopback_only() {
        let at = |text: &str| Some(text.parse().unwrap());
        assert!(plaintext_warning(at("0.0.0.0:50051"), false).is_some());
        assert!(plaintext_warning(at("[::]:50051"), false).is_some());
        assert!(plaintext_warning(at("10.1.2.3:50051"), false).is_some());
        assert!(plaintext_warning(at("0.0.0.0:50051"), true).is_none());
        assert!(plaintext_warning(at("127.0.0.1:50051"), false).is_none());
        assert!(plaintext_warning(at("[::1]:50051"), false).is_none());
    }
}
