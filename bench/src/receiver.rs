//! The bench's loopback webhook receiver: answers 200 (or 503 while refusing), counts what it
//! gets, and measures trigger-to-receipt lag from the timestamp in each payload. Requests to
//! paths starting with `/hang` are held open and never answered.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::stats::Samples;

#[derive(Default)]
pub struct Counters {
    pub received: AtomicU64,
    refusing: AtomicBool,
    /// Micros since the bench's epoch of the first request after `reset`.
    first_at_us: AtomicU64,
    lags: Mutex<Samples>,
    /// Requests by path.
    by_path: Mutex<HashMap<String, u64>>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
}

impl Receiver {
    /// Starts the receiver on a runtime of its own whose threads run at a low CPU priority:
    /// it stands for listeners on other machines, so it should take as little as it can from
    /// the hookd under test on this one.
    pub async fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-receiver")
            .on_thread_start(crate::lower_priority)
            .enable_all()
            .build()?;
        let listener = {
            let _inside = runtime.enter();
            tokio::net::TcpListener::bind("127.0.0.1:0").await?
        };
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let shared = counters.clone();
        // The runtime lives as long as the bench.
        let runtime = Box::leak(Box::new(runtime));
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counters = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| answer(counters.clone(), request));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, counters })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Starts a new measurement: counts, lags and first-receipt time from zero.
    pub fn reset(&self, refusing: bool) {
        self.counters.received.store(0, Ordering::SeqCst);
        self.counters.first_at_us.store(0, Ordering::SeqCst);
        self.counters.refusing.store(refusing, Ordering::SeqCst);
        *self.counters.lags.lock().unwrap() = Samples::default();
        self.counters.by_path.lock().unwrap().clear();
    }

    /// Requests received at `path` since the last reset.
    pub fn received_at(&self, path: &str) -> u64 {
        self.counters.by_path.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    pub fn received(&self) -> u64 {
        self.counters.received.load(Ordering::SeqCst)
    }

    pub fn first_at_us(&self) -> u64 {
        self.counters.first_at_us.load(Ordering::SeqCst)
    }

    pub fn lags(&self) -> Samples {
        self.counters.lags.lock().unwrap().clone()
    }

    /// Waits until `count` requests arrived, or `limit` passed; returns whether they did.
    pub async fn wait_for(&self, count: u64, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.received() < count {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

async fn answer(counters: Arc<Counters>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // A listener that accepts the connection and never answers.
    if request.uri().path().starts_with("/hang") {
        return std::future::pending().await;
    }
    *counters.by_path.lock().unwrap().entry(request.uri().path().to_owned()).or_default() += 1;
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let now = crate::micros_since_epoch();
    let _ = counters.first_at_us.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
    if let Some(sent) = std::str::from_utf8(&body).ok().and_then(|text| text.trim().parse::<u64>().ok()) {
        counters.lags.lock().unwrap().push(Duration::from_micros(now.saturating_sub(sent)));
    }
    counters.received.fetch_add(1, Ordering::SeqCst);
    let status =
        if counters.refusing.load(Ordering::SeqCst) { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    Ok(response)
}

/// Runs this process as a receiver only, at the lowest CPU priority there is (`SCHED_IDLE`,
/// nice 19): it stands for listeners on other machines, which take nothing from hookd's
/// cores. Prints `receiver listening on ADDR` and serves until killed.
pub fn serve_idle() -> Result<(), crate::BoxError> {
    #[cfg(target_os = "linux")]
    // SAFETY: plain calls on this process with a valid, initialised parameter.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    runtime.block_on(async {
        let receiver = Receiver::start().await?;
        println!("receiver listening on {}", receiver.addr);
        std::future::pending::<()>().await;
        Ok::<_, crate::BoxError>(())
    })
}

/// A receiver in a process of its own (see [`serve_idle`]), killed when dropped.
pub struct IdleReceiver {
    pub addr: SocketAddr,
    _child: tokio::process::Child,
}

impl IdleReceiver {
    pub async fn start() -> Result<Self, crate::BoxError> {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("--serve-receiver")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| "the receiver process did not start")??
            .ok_or("the receiver process ended")?;
        let addr = line.rsplit(' ').next().ok_or("no address")?.parse()?;
        Ok(Self { addr, _child: child })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}
