//! A real HTTP receiver on loopback (hyper) that records every request and answers as each
//! path's script says: succeed, fail, fail a few times, redirect, or hang until released.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
    pub fn webhook_id(&self) -> &str {
        self.header("webhook-id")
    }
    pub fn attempt(&self) -> u32 {
        self.header("hookd-attempt").parse().unwrap_or(0)
    }
}

/// How a path answers.
#[derive(Clone)]
pub enum Reply {
    Status(u16),
    /// A status with extra headers.
    WithHeaders(u16, Vec<(&'static str, String)>),
    /// Holds the request open until the receiver is released or dropped.
    Hang,
    /// A status, after a while.
    After(Duration, u16),
}

type Script = Arc<dyn Fn(&Received, usize) -> Reply + Send + Sync>;

struct State {
    requests: Mutex<Vec<Received>>,
    /// Requests seen so far per (path, webhook-id).
    seen: Mutex<HashMap<(String, String), usize>>,
    scripts: Mutex<Vec<(String, Script)>>,
    count: watch::Sender<usize>,
    hanging: Mutex<usize>,
    max_hanging: Mutex<usize>,
    release: CancellationToken,
}

/// The receiver; stops serving when dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
    scheme: &'static str,
}

impl Receiver {
    pub async fn start() -> Self {
        Self::serve(None).await
    }

    /// A receiver that speaks HTTPS only, with the certificate in `tests/e2e/tls/receiver.pem`
    /// (for 127.0.0.1, issued by the test CA in `ca.pem`).
    pub async fn start_tls() -> Self {
        use tokio_rustls::rustls::{self, pki_types::pem::PemObject};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/tls");
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(dir.join("receiver.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("receiver.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        Self::serve(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            requests: Mutex::new(Vec::new()),
            seen: Mutex::new(HashMap::new()),
            scripts: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
            hanging: Mutex::new(0),
            max_hanging: Mutex::new(0),
            release: CancellationToken::new(),
        });
        let stop = CancellationToken::new();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (serving_state, serving_stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    () = serving_stop.cancelled() => return,
                };
                let state = serving_state.clone();
                let stop = serving_stop.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| answer(state.clone(), request));
                    let served = async {
                        match tls {
                            Some(tls) => {
                                // A failed handshake (a client that does not trust us) ends here.
                                if let Ok(stream) = tls.accept(stream).await {
                                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                                }
                            }
                            None => {
                                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    };
                    tokio::select! {
                        () = served => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        });
        Self { addr, state, stop, scheme }
    }

    /// The URL of a path on this receiver.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// Makes requests to paths starting with `prefix` answer by `script(request, n)`, where n
    /// counts this webhook-id's requests on this path (1 for the first).
    pub fn script(&self, prefix: &str, script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static) {
        // The newest script for a path wins.
        self.state.scripts.lock().unwrap().insert(0, (prefix.to_owned(), Arc::new(script)));
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Received> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Requests to one path, in arrival order.
    pub fn requests_to(&self, path: &str) -> Vec<Received> {
        self.requests().into_iter().filter(|r| r.path == path).collect()
    }

    /// Waits until `done` holds for the requests received, or fails the test after `limit`.
    pub async fn wait_until(&self, what: &str, limit: Duration, done: impl Fn(&[Received]) -> bool) {
        let mut count = self.state.count.subscribe();
        let waited = tokio::time::timeout(limit, async {
            loop {
                if done(&self.state.requests.lock().unwrap()) {
                    return;
                }
                count.changed().await.expect("the receiver outlives its waiters");
            }
        })
        .await;
        if waited.is_err() {
            let requests = self.requests();
            let summary: Vec<_> =
                requests.iter().map(|r| (r.path.clone(), r.webhook_id().to_owned(), r.attempt())).collect();
            panic!("{what}: not reached within {limit:?}; {} requests: {summary:?}", requests.len());
        }
    }

    /// The most requests that were hanging at once.
    pub fn max_hanging(&self) -> usize {
        *self.state.max_hanging.lock().unwrap()
    }

    /// Answers every hanging request (with 503) and every later `Hang` at once.
    pub fn release(&self) {
        self.state.release.cancel();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.state.release.cancel();
        self.stop.cancel();
    }
}

async fn answer(state: Arc<State>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let headers = request.headers().clone();
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let received = Received { path: path.clone(), headers, body, at: Instant::now() };
    let nth = {
        let mut seen = state.seen.lock().unwrap();
        let n = seen.entry((path.clone(), received.webhook_id().to_owned())).or_default();
        *n += 1;
        *n
    };
    let script = state
        .scripts
        .lock()
        .unwrap()
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix.as_str()))
        .map(|(_, s)| s.clone());
    let reply = script.map_or(Reply::Status(200), |script| script(&received, nth));
    state.requests.lock().unwrap().push(received);
    state.count.send_modify(|count| *count += 1);

    let (status, extra) = match reply {
        Reply::Status(status) => (status, Vec::new()),
        Reply::WithHeaders(status, headers) => (status, headers),
        Reply::Hang => {
            {
                let mut hanging = state.hanging.lock().unwrap();
                *hanging += 1;
                let mut max = state.max_hanging.lock().unwrap();
                *max = (*max).max(*hanging);
            }
            state.release.cancelled().await;
            *state.hanging.lock().unwrap() -= 1;
            (503, Vec::new())
        }
        Reply::After(delay, status) => {
            tokio::time::sleep(delay).await;
            (status, Vec::new())
        }
    };
    let mut response = Response::new(Full::new(Bytes::from_static(b"recorded")));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    for (name, value) in extra {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    Ok(response)
}
