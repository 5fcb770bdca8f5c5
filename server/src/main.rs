//! The `hookd` binary: parse configuration, install logging, bind the listener, turn
//! SIGINT/SIGTERM into a shutdown, and hand over to [`hookd_server::run`].

use std::process::ExitCode;

use clap::Parser;
use hookd_server::config::{self, Cli, Command};
use tokio_util::sync::CancellationToken;

/// mimalloc, not glibc's malloc: hookd allocates briskly on many threads (sled nodes, HTTP
/// requests), and glibc's arenas cost it about a third of its CPU per delivery (bench:
/// 123-164 µs per delivery with glibc, 90-102 µs with mimalloc, to one listener).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let (args, rekey) = match Cli::parse().command {
        Command::Serve(args) => (args, false),
        Command::Rekey(args) => (args, true),
    };
    hookd_server::telemetry::init(args.log_format);
    let resolved = match config::resolve(&args, std::env::var("HOOKD_MASTER_KEY").ok()) {
        Ok(resolved) => resolved,
        Err(error) => {
            tracing::error!("invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };
    for notice in &resolved.notices {
        tracing::warn!("{notice}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(64)
        // Intake: a waking thread takes a core sooner (see `priority`).
        .on_thread_start(|| {
            hookd_server::priority::short_slice();
        })
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    if rekey {
        return runtime.block_on(rekey_offline(resolved.config));
    }
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(resolved.listen).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!("cannot listen on {}: {error}", resolved.listen);
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        match hookd_server::run(listener, resolved.config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => failed(&error),
        }
    })
}

/// `hookd rekey`.
async fn rekey_offline(config: hookd_server::config::Config) -> ExitCode {
    if !config.keyring.rotating() {
        tracing::error!(
            "invalid configuration: hookd rekey needs the previous master key (HOOKD_PREVIOUS_MASTER_KEY or --previous-master-key-file) beside the new one"
        );
        return ExitCode::from(2);
    }
    match hookd_server::rekey_offline(config).await {
        Ok(done) => {
            tracing::info!(
                listeners = done.listeners,
                resealed = done.resealed,
                "every secret is sealed under the new master key; start hookd with it alone"
            );
            ExitCode::SUCCESS
        }
        Err(error) => failed(&error),
    }
}

/// Logs why hookd stopped; the exit status says whether the configuration was at fault (2).
fn failed(error: &hookd_server::RunError) -> ExitCode {
    use hookd_server::rekey::RekeyError;
    use hookd_server::store::StoreError;
    tracing::error!("{error}");
    match error {
        // The configured master keys are wrong for this data directory: a configuration error.
        hookd_server::RunError::Keys(
            RekeyError::Store(StoreError::WrongMasterKey { .. }) | RekeyError::HashKey(_) | RekeyError::Unopened(_),
        ) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn stop_on_signal(shutdown: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!("cannot watch SIGTERM: {error}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        () = terminate => {}
    }
    shutdown.cancel();
}
