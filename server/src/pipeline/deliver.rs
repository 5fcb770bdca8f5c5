//! One HTTP attempt: build the signed request, POST it, and describe what came back.
//!
//! Owns the shared reqwest client (connection pooling, no redirects, a per-attempt timeout)
//! and the header layout of a webhook request. It never decides what happens next (that is
//! the retry policy) and never writes to the store. The opened signing key lives only for the
//! duration of one call.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::target::{GuardedResolver, TargetPolicy};
use hookd::webhook;

/// How much of a response body is kept.
pub const RESPONSE_BODY_LIMIT: usize = 4096;
/// Response headers kept with an attempt.
const KEPT_HEADERS: [&str; 6] = ["content-type", "content-length", "retry-after", "location", "server", "x-request-id"];

/// What a webhook request carries besides its URL.
#[derive(Debug, Clone)]
pub struct WebhookRequest<'a> {
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub delivery_id: &'a str,
    pub attempt: u32,
    pub content_type: &'a str,
    pub body: &'a [u8],
    /// Unix seconds, fresh for every attempt.
    pub timestamp: i64,
}

/// The headers of a webhook request, with `webhook-signature` when keys are given: one
/// signature per key, space-separated, as Standard Webhooks allows (a receiver accepts the
/// request when any of them verifies; two while a rotated secret is in its grace period).
pub fn webhook_headers(request: &WebhookRequest<'_>, signing_keys: &[&[u8]]) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("webhook-id", request.event_id.to_owned()),
        ("webhook-timestamp", request.timestamp.to_string()),
        ("hookd-event-type", request.event_type.to_owned()),
        ("hookd-delivery-id", request.delivery_id.to_owned()),
        ("hookd-attempt", request.attempt.to_string()),
        ("content-type", request.content_type.to_owned()),
        ("user-agent", concat!("hookd/", env!("CARGO_PKG_VERSION")).to_owned()),
    ];
    if !signing_keys.is_empty() {
        let signatures: Vec<String> = signing_keys
            .iter()
            .map(|key| webhook::sign(key, request.event_id, request.timestamp, request.body))
            .collect();
        headers.push(("webhook-signature", signatures.join(" ")));
    }
    headers
}

/// Why an attempt got no HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportError {
    /// The target policy refused the address: nothing was sent.
    Refused,
    Timeout,
    Dns,
    Connect,
    Tls,
    Other,
}

impl TransportError {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportError::Refused => "refused",
            TransportError::Timeout => "timeout",
            TransportError::Dns => "dns",
            TransportError::Connect => "connect",
            TransportError::Tls => "tls",
            TransportError::Other => "other",
        }
    }
}

/// What one attempt produced.
#[derive(Debug, Clone, Default)]
pub struct Response {
    /// The HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// `kind: message` when there was none (or the answer broke off). Never holds the URL's
    /// query or credentials (they may carry tokens, and this text is logged).
    pub error: Option<String>,
    /// The target policy refused the address: nothing was sent, and trying again changes
    /// nothing.
    pub refused: bool,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// The listener's `Retry-After`, in seconds form only.
    pub retry_after: Option<Duration>,
    pub duration: Duration,
}

/// Sends webhook requests over one pooled client.
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
    policy: Arc<TargetPolicy>,
}

impl Sender {
    /// A client that follows no redirects, gives each attempt `timeout` in all, and connects
    /// only to addresses `policy` allows.
    pub fn new(timeout: Duration, policy: TargetPolicy) -> Result<Self, reqwest::Error> {
        let policy = Arc::new(policy);
        // reqwest is built without a default TLS provider; ring is ours. A second install
        // (another server in the same process) is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .no_proxy()
            .dns_resolver(GuardedResolver::new(policy.clone()))
            .build()?;
        Ok(Self { client, policy })
    }

    /// POSTs `body` to `url` with `headers` and reports what happened. Never fails: every
    /// problem is described in the [`Response`].
    pub async fn post(&self, url: &url::Url, headers: Vec<(&'static str, String)>, body: Vec<u8>) -> Response {
        let started = Instant::now();
        // Literal IPs skip the resolver: check them here.
        if let Err(refusal) = self.policy.check_url(url) {
            return Response {
                error: Some(refusal),
                refused: true,
                duration: started.elapsed(),
                ..Response::default()
            };
        }
        let mut header_map = HeaderMap::with_capacity(headers.len());
        for (name, value) in headers {
            match HeaderValue::from_str(&value) {
                Ok(value) => {
                    header_map.insert(HeaderName::from_static(name), value);
                }
                Err(_) => {
                    return Response {
                        error: Some(format!("other: header {name} holds characters HTTP cannot carry")),
                        duration: started.elapsed(),
                        ..Response::default()
                    };
                }
            }
        }
        let mut answer = match self.client.post(url.clone()).headers(header_map).body(body).send().await {
            Ok(answer) => answer,
            Err(error) => {
                let (kind, message) = describe(error);
                return Response {
                    error: Some(message),
                    refused: kind == TransportError::Refused,
                    duration: started.elapsed(),
                    ..Response::default()
                };
            }
        };
        let status = answer.status().as_u16();
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for name in KEPT_HEADERS {
            if let Some(value) = answer.headers().get(name).and_then(|v| v.to_str().ok()) {
                headers.insert(name.to_owned(), value.chars().take(256).collect());
            }
        }
        let retry_after =
            headers.get("retry-after").and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
        let mut body = Vec::new();
        let mut error = None;
        while body.len() < RESPONSE_BODY_LIMIT {
            match answer.chunk().await {
                Ok(Some(chunk)) => {
                    let room = RESPONSE_BODY_LIMIT - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) => break,
                Err(read_error) => {
                    // The status counts; a body that breaks off is only noted.
                    error = Some(describe(read_error).1);
                    break;
                }
            }
        }
        Response {
            status: Some(status),
            error,
            refused: false,
            headers,
            body,
            retry_after,
            duration: started.elapsed(),
        }
    }
}

/// The kind and `kind: message` of a reqwest error, with its cause chain. The URL in it keeps
/// its scheme, host, port and path only: a query or user info may hold a token.
fn describe(mut error: reqwest::Error) -> (TransportError, String) {
    if let Some(url) = error.url_mut() {
        redact(url);
    }
    let mut chain = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    let lower = chain.to_lowercase();
    let kind = if lower.contains("target policy") {
        TransportError::Refused
    } else if error.is_timeout() {
        TransportError::Timeout
    } else if lower.contains("dns error") || lower.contains("failed to lookup") || lower.contains("name or service") {
        TransportError::Dns
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
        TransportError::Tls
    } else if error.is_connect() {
        TransportError::Connect
    } else {
        TransportError::Other
    };
    let message: String = chain.chars().take(512).collect();
    (kind, format!("{}: {message}", kind.as_str()))
}

/// Drops what a URL may carry besides where it points: its query, fragment and user info.
pub fn redact(url: &mut url::Url) {
    url.set_query(None);
    url.set_fragment(None);
    let _ = url.set_username("");
    let _ = url.set_password(None);
}

/// A listener URL as it may be logged (see [`redact`]); the text as given if it does not parse.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            redact(&mut parsed);
            parsed.to_string()
        }
        Err(_) => "(unparsable url)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> WebhookRequest<'static> {
        WebhookRequest {
            event_id: "evt_1",
            event_type: "order.placed",
            delivery_id: "dlv_1",
            attempt: 3,
            content_type: "application/json",
            body: b"{}",
            timestamp: 1_700_000_000,
        }
    }

    #[test]
    fn headers_of_a_signed_request() {
        let key = b"plain-secret";
        let headers: BTreeMap<_, _> = webhook_headers(&request(), &[&key[..]]).into_iter().collect();
        assert_eq!(headers["webhook-id"], "evt_1");
        assert_eq!(headers["webhook-timestamp"], "1700000000");
        assert_eq!(headers["hookd-event-type"], "order.placed");
        assert_eq!(headers["hookd-delivery-id"], "dlv_1");
        assert_eq!(headers["hookd-attempt"], "3");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["user-agent"], format!("hookd/{}", env!("CARGO_PKG_VERSION")));
        assert_eq!(headers["webhook-signature"], webhook::sign(key, "evt_1", 1_700_000_000, b"{}"));
    }

    #[test]
    fn unsigned_requests_carry_no_signature() {
        let headers = webhook_headers(&request(), &[]);
        assert!(headers.iter().all(|(name, _)| *name != "webhook-signature"));
        assert_eq!(headers.len(), 7);
    }

    #[test]
    fn two_keys_make_two_signatures_in_one_header() {
        let (new, old) = (b"new-secret".to_vec(), b"old-secret".to_vec());
        let headers: BTreeMap<_, _> = webhook_headers(&request(), &[&new[..], &old[..]]).into_iter().collect();
        let expected = format!(
            "{} {}",
            webhook::sign(&new, "evt_1", 1_700_000_000, b"{}"),
            webhook::sign(&old, "evt_1", 1_700_000_000, b"{}")
        );
        assert_eq!(headers["webhook-signature"], expected);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let sender = Sender::new(Duration::from_secs(5), TargetPolicy::default()).unwrap();
        let response = sender.post(&format!("http://{addr}/").parse().unwrap(), vec![], b"{}".to_vec()).await;
        assert_eq!(response.status, None);
        assert!(response.error.as_deref().unwrap().starts_with("connect:"), "{:?}", response.error);
    }

    // Regression: reqwest's error text carried the whole URL, query tokens included, into
    // attempt records and log lines.
    #[tokio::test]
    async fn error_text_never_carries_the_query_or_credentials() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let sender = Sender::new(Duration::from_secs(5), TargetPolicy::default()).unwrap();
        let url = format!("http://user:hunter2@{addr}/hooks?token=sekrit#frag");
        let response = sender.post(&url.parse().unwrap(), vec![], b"{}".to_vec()).await;
        let error = response.error.unwrap();
        assert!(error.starts_with("connect:"), "{error}");
        assert!(error.contains(&format!("{addr}/hooks")), "the URL stays recognisable: {error}");
        for secret in ["sekrit", "token", "hunter2", "user", "frag"] {
            assert!(!error.contains(secret), "{secret} in {error}");
        }
        assert_eq!(redacted(&url), format!("http://{addr}/hooks"));
    }

    #[tokio::test]
    async fn refused_targets_are_never_contacted() {
        let sender = Sender::new(Duration::from_secs(5), TargetPolicy::default()).unwrap();
        let response =
            sender.post(&"http://169.254.169.254/latest/meta-data".parse().unwrap(), vec![], Vec::new()).await;
        assert!(response.error.as_deref().unwrap().starts_with("refused:"), "{:?}", response.error);
        assert!(response.refused);

        let strict = TargetPolicy { kind: super::super::target::PolicyKind::Strict, allow: Vec::new() };
        let sender = Sender::new(Duration::from_secs(5), strict).unwrap();
        let response = sender.post(&"http://localhost:9/".parse().unwrap(), vec![], Vec::new()).await;
        assert!(response.error.as_deref().unwrap().starts_with("refused:"), "{:?}", response.error);
        assert!(response.refused, "a name resolved to refused addresses is refused too");
    }
}
