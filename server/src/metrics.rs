//! Metrics: hookd's counters, gauges and histograms, and their exposition in the Prometheus
//! text format on `GET /metrics` of a listener of its own (`--metrics-listen`, off unless
//! given).
//!
//! Each part of hookd updates the metrics it owns through [`Metrics`]; gauges that need a
//! look at the store (listeners, queued retries, bytes on disk) are refreshed by a task every
//! [`STATS_EVERY`]. Labels take a handful of fixed values only (outcomes, classes, budgets):
//! never an id, a URL or an event type, so the number of series stays bounded. This module
//! never decides anything; it counts.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How often the gauges that read the store are refreshed.
pub const STATS_EVERY: Duration = Duration::from_secs(10);

/// A label set of one fixed name and value.
pub type Label = [(&'static str, &'static str); 1];

/// Every metric hookd keeps. Cheap to clone: each metric shares its value.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Triggers answered, by outcome: `accepted`, `duplicate`, `invalid`, `refused`,
    /// `unavailable`.
    pub triggers: Family<Label, Counter>,
    /// Seconds each intake journal sync (`fdatasync`) took.
    pub journal_sync: Histogram,
    /// Attempts made, by outcome class: `2xx` ... `5xx`, or the transport error's kind.
    pub attempts: Family<Label, Counter>,
    /// Seconds each attempt took, answer or not.
    pub attempt_duration: Histogram,
    /// Events acknowledged and not yet handed out by fan-out, and how old the oldest is.
    pub fanout_lag_events: Gauge,
    pub fanout_lag_seconds: Gauge<f64, AtomicU64>,
    /// Deliveries waiting, by kind: `first_attempt` (in memory, plus those left in the log by
    /// detached listeners, counted in events), `retry` (queued or parked).
    pub pending: Family<Label, Gauge>,
    /// Requests awaiting an answer, by budget: `healthy`, `suspect`.
    pub in_flight: Family<Label, Gauge>,
    /// Listeners by state: `registered`, `disabled`, `backed_off`, `detached`.
    pub listeners: Family<Label, Gauge>,
    /// Bytes on disk, by part: `journal`, `db`, `queue`.
    pub store_bytes: Family<Label, Gauge>,
    /// Events whose record did not decode and were put aside.
    pub quarantined: Gauge,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hookd");
        let triggers = Family::<Label, Counter>::default();
        registry.register("triggers", "Triggers answered, by outcome", triggers.clone());
        // 50 µs to about 1.6 s.
        let journal_sync = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        registry.register("journal_sync_seconds", "Time each intake journal sync took", journal_sync.clone());
        let attempts = Family::<Label, Counter>::default();
        registry.register("attempts", "Delivery attempts made, by outcome class", attempts.clone());
        // 1 ms to about 65 s.
        let attempt_duration = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register("attempt_duration_seconds", "Time each delivery attempt took", attempt_duration.clone());
        let fanout_lag_events = Gauge::default();
        registry.register("fanout_lag_events", "Events acknowledged and not yet fanned out", fanout_lag_events.clone());
        let fanout_lag_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "fanout_lag_seconds",
            "Age of the oldest event not yet fanned out (0 when caught up)",
            fanout_lag_seconds.clone(),
        );
        let pending = Family::<Label, Gauge>::default();
        registry.register("pending_deliveries", "Deliveries waiting, by kind", pending.clone());
        let in_flight = Family::<Label, Gauge>::default();
        registry.register("requests_in_flight", "Delivery requests awaiting an answer, by budget", in_flight.clone());
        let listeners = Family::<Label, Gauge>::default();
        registry.register("listeners", "Listeners, by state", listeners.clone());
        let store_bytes = Family::<Label, Gauge>::default();
        registry.register("store_bytes", "Bytes on disk, by part", store_bytes.clone());
        let quarantined = Gauge::default();
        registry.register(
            "events_quarantined",
            "Events put aside because their record does not decode",
            quarantined.clone(),
        );
        Self {
            triggers,
            journal_sync,
            attempts,
            attempt_duration,
            fanout_lag_events,
            fanout_lag_seconds,
            pending,
            in_flight,
            listeners,
            store_bytes,
            quarantined,
            registry: Arc::new(registry),
        }
    }

    /// Counts a trigger's answer.
    pub fn trigger(&self, outcome: &'static str) {
        self.triggers.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// Counts a finished attempt: its class and how long it took.
    pub fn attempt(&self, class: &'static str, duration: Duration) {
        self.attempts.get_or_create(&[("outcome", class)]).inc();
        self.attempt_duration.observe(duration.as_secs_f64());
    }

    /// The exposition in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// Sets the gauge of `family` labelled `label` to `value`.
pub fn set(family: &Family<Label, Gauge>, label: (&'static str, &'static str), value: u64) {
    family.get_or_create(&[label]).set(i64::try_from(value).unwrap_or(i64::MAX));
}

/// The outcome class of an attempt: its status class, or its transport error's kind.
pub fn attempt_class(status: u16, error: &str) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => match error.split(':').next().unwrap_or_default() {
            "timeout" => "timeout",
            "connect" => "connect",
            "refused" => "refused",
            "dns" => "dns",
            "tls" => "tls",
            _ => "other",
        },
    }
}

/// Bytes of every file under `dir`.
pub fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => bytes_under(&entry.path()),
            Ok(metadata) => metadata.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: Metrics, shutdown: CancellationToken) {
    crate::side_http::serve(listener, "metrics", move |request| answer(metrics.clone(), request), shutdown).await;
}

async fn answer(metrics: Metrics, request: Request<Incoming>) -> Response<Full<bytes::Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&hyper::Method::GET, "/metrics") => {
            (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", metrics.render())
        }
        _ => (StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "try GET /metrics\n".to_owned()),
    };
    let mut response = Response::new(Full::new(bytes::Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_classed_by_status_or_transport_error() {
        let table = [
            (200, "", "2xx"),
            (204, "", "2xx"),
            (302, "", "3xx"),
            (404, "", "4xx"),
            (503, "", "5xx"),
            (0, "timeout: operation timed out", "timeout"),
            (0, "connect: connection refused", "connect"),
            (0, "refused: 10.0.0.1 is private", "refused"),
            (0, "dns: failed to lookup", "dns"),
            (0, "tls: certificate", "tls"),
            (0, "other: whatever", "other"),
        ];
        for (status, error, class) in table {
            assert_eq!(attempt_class(status, error), class, "{status} {error}");
        }
    }

    #[test]
    fn the_exposition_names_every_metric_with_its_prefix() {
        let metrics = Metrics::new();
        metrics.trigger("accepted");
        metrics.attempt("2xx", Duration::from_millis(3));
        let text = metrics.render();
        for name in [
            "hookd_triggers_total{outcome=\"accepted\"} 1",
            "hookd_attempts_total{outcome=\"2xx\"} 1",
            "hookd_attempt_duration_seconds_count 1",
            "hookd_journal_sync_seconds_count 0",
            "hookd_fanout_lag_events",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
