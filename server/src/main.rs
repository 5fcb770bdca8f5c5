//! The `hookd` binary: parse configuration, install logging, bind the listener, turn
//! SIGINT/SIGTERM into a shutdown, and hand over to [`hookd_server::run`].

use std::process::ExitCode;

use clap::Parser;
use hookd_server::config::{self, Cli, Command};
use tokio_util::sync::CancellationToken;

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
    limit_malloc_arenas();
    return_freed_memory();
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

/// glibc gives busy threads arenas of their own and returns little of them: with many
/// short blocking threads that shows as resident memory nothing uses. Two arenas suffice.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt is called before any other thread exists and takes no pointers.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// How often freed heap memory is handed back to the system.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// glibc keeps what is freed after a burst (a large fan-out, a backlog built) in its arenas,
/// so resident memory would stay at the burst's peak: a low-priority thread hands it back
/// every [`TRIM_EVERY`]. Measured with a million pending deliveries: 327 MB resident without,
/// 286 MB with.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let trimmer = std::thread::Builder::new().name("hookd-trim".into()).spawn(|| {
            // SAFETY: setpriority (0: this thread, on Linux) takes no pointers; failing
            // leaves the priority as it is.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, 10);
            }
            loop {
                std::thread::sleep(TRIM_EVERY);
                // SAFETY: malloc_trim takes no pointers and only releases free memory.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        });
        if let Err(error) = trimmer {
            tracing::warn!("cannot start the memory trimmer: {error}");
        }
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
