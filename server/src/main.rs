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
    let Command::Serve(args) = Cli::parse().command;
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
            // The configured master key is wrong for this data directory: a configuration error.
            Err(error @ hookd_server::RunError::Store(hookd_server::store::StoreError::WrongMasterKey { .. })) => {
                tracing::error!("{error}");
                ExitCode::from(2)
            }
            Err(error) => {
                tracing::error!("{error}");
                ExitCode::FAILURE
            }
        }
    })
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
