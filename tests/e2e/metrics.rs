//! Metrics over HTTP with the real binary: `/metrics` is scraped during a run and the
//! counters move by exactly what the run did.

use std::collections::HashMap;

use hookd_client::Client;
use hookd_client::v1::{CreateProducerRequest, TriggerRequest};

use crate::receiver::{Receiver, Reply};
use crate::support::{ADMIN_TOKEN, DEADLINE, HookdProcess, derive, eventually, listener_request, master_key};

/// The samples of a Prometheus text exposition: `name{labels}` to value.
async fn scrape(addr: &str) -> HashMap<String, f64> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn value(samples: &HashMap<String, f64>, name: &str) -> f64 {
    samples.get(name).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    const EVENTS: usize = 12;
    let receiver = Receiver::start().await;
    receiver.script("/down", |_, _| Reply::Status(503));
    let dir = tempfile::tempdir().unwrap();
    let key = master_key();
    let env = [
        ("HOOKD_MASTER_KEY", key.as_str()),
        ("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN),
        ("HOOKD_METRICS_LISTEN", "127.0.0.1:0"),
        ("HOOKD_RETRY_SCHEDULE", "1h"),
    ];
    let hookd = HookdProcess::start(dir.path(), &env).await.unwrap();
    let line = hookd.log_text().lines().find(|line| line.contains("metrics served")).unwrap().to_owned();
    let addr = line.split("addr=").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    let before = scrape(&addr).await;
    assert_eq!(value(&before, "hookd_triggers_total{outcome=\"accepted\"}"), 0.0);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let not_found = reqwest::get(format!("http://{addr}/other")).await.unwrap();
    assert_eq!(not_found.status(), 404);

    let admin = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(ADMIN_TOKEN).unwrap();
    let created = admin.admin().create_producer(CreateProducerRequest { name: "counted".into() }).await.unwrap();
    let producer = admin.clone().with_api_key(&created.into_inner().api_key).unwrap();
    let hash = derive(&producer, "counted").await;
    for path in ["/up", "/down"] {
        producer.register().register_listener(listener_request(&hash, &receiver.url(path))).await.unwrap();
    }
    for n in 0..EVENTS {
        let request = TriggerRequest {
            event_type: "counted".into(),
            payload: n.to_string().into_bytes(),
            idempotency_key: format!("k{n}"),
            ..Default::default()
        };
        producer.trigger_service().trigger(request.clone()).await.unwrap();
        if n % 4 == 0 {
            assert!(producer.trigger_service().trigger(request).await.unwrap().into_inner().duplicate);
        }
    }
    let invalid = TriggerRequest { event_type: "bad type!".into(), ..Default::default() };
    producer.trigger_service().trigger(invalid).await.unwrap_err();
    // The failing listener is backed off after five failures in a row (a sixth may have been
    // under way by then): its other events wait.
    receiver
        .wait_until("every event at the healthy listener, five at the failing one", DEADLINE, |r| {
            r.iter().filter(|r| r.path == "/up").count() == EVENTS
                && r.iter().filter(|r| r.path == "/down").count() >= 5
        })
        .await;
    // Counted against what the receiver saw by then: a request under way when the wait ended
    // may arrive (and be counted) a moment later.
    let (after, failed) = eventually("the attempts counted", || {
        let (addr, failed) = (addr.clone(), receiver.requests_to("/down").len());
        async move {
            let samples = scrape(&addr).await;
            let counted = value(&samples, "hookd_attempts_total{outcome=\"5xx\"}") == failed as f64
                && value(&samples, "hookd_attempts_total{outcome=\"2xx\"}") == EVENTS as f64;
            counted.then_some((samples, failed))
        }
    })
    .await;
    assert_eq!(value(&after, "hookd_triggers_total{outcome=\"accepted\"}"), EVENTS as f64);
    assert_eq!(value(&after, "hookd_triggers_total{outcome=\"duplicate\"}"), EVENTS.div_ceil(4) as f64);
    assert_eq!(value(&after, "hookd_triggers_total{outcome=\"invalid\"}"), 1.0);
    assert_eq!(value(&after, "hookd_attempt_duration_seconds_count"), (EVENTS + failed) as f64);
    assert!(value(&after, "hookd_journal_sync_seconds_count") >= 1.0, "each accepted trigger was synced");
    assert!(value(&after, "hookd_journal_sync_seconds_count") <= EVENTS as f64);
    // Gauges refreshed now and then: the 503s wait for their retry an hour away, the rest of
    // the failing listener's events wait in the log while it is backed off.
    let (gauges, failed) = eventually("the gauges refreshed", || {
        let (addr, failed) = (addr.clone(), receiver.requests_to("/down").len().max(failed));
        async move {
            let samples = scrape(&addr).await;
            let fresh = value(&samples, "hookd_listeners{state=\"registered\"}") == 2.0
                && value(&samples, "hookd_pending_deliveries{kind=\"retry\"}") == failed as f64;
            fresh.then_some((samples, failed))
        }
    })
    .await;
    assert_eq!(value(&gauges, "hookd_listeners{state=\"backed_off\"}"), 1.0);
    assert_eq!(value(&gauges, "hookd_pending_deliveries{kind=\"first_attempt\"}"), (EVENTS - failed) as f64);
    assert_eq!(value(&gauges, "hookd_fanout_lag_events"), 0.0);
    assert!(value(&gauges, "hookd_store_bytes{part=\"journal\"}") > 0.0);
    assert!(value(&gauges, "hookd_store_bytes{part=\"db\"}") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_each_attempts_event_delivery_and_number() {
    let receiver = Receiver::start().await;
    receiver.script("/fail", |_, _| Reply::Status(500));
    let dir = tempfile::tempdir().unwrap();
    let key = master_key();
    let env = [
        ("HOOKD_MASTER_KEY", key.as_str()),
        ("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN),
        ("HOOKD_LOG_FORMAT", "json"),
        ("RUST_LOG", "info,hookd_server::pipeline=debug"),
        ("HOOKD_RETRY_SCHEDULE", "1h"),
    ];
    let hookd = HookdProcess::start(dir.path(), &env).await.unwrap();
    let admin = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(ADMIN_TOKEN).unwrap();
    let created = admin.admin().create_producer(CreateProducerRequest { name: "logged".into() }).await.unwrap();
    let producer = admin.clone().with_api_key(&created.into_inner().api_key).unwrap();
    let hash = derive(&producer, "logged").await;
    for path in ["/ok", "/fail"] {
        producer.register().register_listener(listener_request(&hash, &receiver.url(path))).await.unwrap();
    }
    let request = TriggerRequest { event_type: "logged".into(), payload: b"{}".to_vec(), ..Default::default() };
    let event_id = producer.trigger_service().trigger(request).await.unwrap().into_inner().event_id;
    // Each finished attempt is one line: a success at debug, a failure at info with its cause,
    // both inside the attempt's span.
    let lines = eventually("a line per finished attempt", || {
        let log = hookd.log_text();
        async move {
            let lines: Vec<serde_json::Value> = log
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter(|line| {
                    let message = line["fields"]["message"].as_str().unwrap_or_default();
                    message == "delivered" || message == "delivery attempt failed"
                })
                .collect();
            (lines.len() == 2).then_some(lines)
        }
    })
    .await;
    for line in &lines {
        assert_eq!(line["span"]["name"], "attempt", "{line}");
        assert_eq!(line["span"]["event_id"], event_id.as_str(), "{line}");
        assert_eq!(line["span"]["attempt"], 1, "{line}");
        assert!(line["span"]["delivery_id"].as_str().unwrap().starts_with("dlv_"), "{line}");
    }
    let failed = lines.iter().find(|line| line["fields"]["message"] == "delivery attempt failed").unwrap();
    assert_eq!(failed["level"], "INFO");
    assert_eq!(failed["fields"]["status"], 500);
    let delivered = lines.iter().find(|line| line["fields"]["message"] == "delivered").unwrap();
    assert_eq!(delivered["level"], "DEBUG");
}
