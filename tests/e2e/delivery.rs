//! Delivery end to end: a real server, a real HTTP receiver, signatures checked with the
//! `standardwebhooks` crate, retries, isolation, strict order and auto-disable.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hookd_client::Client;
use hookd_client::v1::{GetListenerRequest, RegisterListenerRequest, TriggerRequest, UpdateListenerRequest};
use hookd_server::config::Config;
use hookd_server::ids;
use hookd_server::store::{Attempt, Delivery, DeliveryState, PipelineStore, SledStore, Store};

use crate::receiver::{Receiver, Reply};
use crate::support::{DEADLINE, TestServer, derive, eventually, master_key, retries_due};

/// Starts a server whose retries come fast, with `adjust` for the rest.
async fn server_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(Arc::new(tempfile::tempdir().unwrap()), &master_key(), |config| {
        config.pipeline.retry_schedule = "200ms,200ms,200ms".parse().unwrap();
        adjust(config);
    })
    .await
}

/// Waits until the listener has `count` deliveries, all in `state`.
async fn listener_settled(client: &Client, listener_id: &str, count: usize, state: hookd_client::v1::DeliveryState) {
    eventually(&format!("{count} deliveries of {listener_id} {state:?}"), || {
        let (client, listener_id) = (client.clone(), listener_id.to_owned());
        async move {
            let request = hookd_client::v1::ListDeliveriesRequest { listener_id, ..Default::default() };
            let deliveries = client.delivery().list_deliveries(request).await.unwrap().into_inner().deliveries;
            (deliveries.len() == count && deliveries.iter().all(|d| d.state == state as i32)).then_some(())
        }
    })
    .await;
}

async fn listen(producer: &Client, hash: &str, url: String, secret: Option<&str>, ordered: bool) -> (String, String) {
    let created = producer
        .register()
        .register_listener(RegisterListenerRequest {
            event_hash: hash.into(),
            url,
            secret: secret.map(str::to_owned),
            ordered,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (created.listener.unwrap().id, created.secret)
}

async fn trigger(producer: &Client, event_type: &str, payload: String) -> String {
    producer
        .trigger_service()
        .trigger(TriggerRequest { event_type: event_type.into(), payload: payload.into_bytes(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .event_id
}

/// Stops the server and reads what it recorded about one delivery.
async fn recorded(server: TestServer, pairs: &[(&str, &str)]) -> Vec<(Delivery, Vec<Attempt>)> {
    let dir = server.data_dir().to_owned();
    let keep_dir = server.keep_dir();
    server.stop().await.unwrap();
    let store = SledStore::open(&dir).unwrap();
    let found = pairs
        .iter()
        .map(|(event_id, listener_id)| {
            let id = ids::delivery_id(ids::event_seq(event_id).unwrap(), listener_id);
            let delivery = store.delivery(&id).unwrap().unwrap_or_else(|| panic!("no delivery {id}"));
            (delivery, store.attempts(&id, 0, usize::MAX).unwrap())
        })
        .collect();
    store.close().unwrap();
    drop(keep_dir);
    found
}

/// Rotates `listener_id`'s secret to `secret` with `grace_seconds`, and returns until when the
/// old one still signs, as the listener shows it.
async fn rotate(
    producer: &Client,
    listener_id: &str,
    secret: &str,
    grace_seconds: u32,
) -> Option<prost_types::Timestamp> {
    let request = hookd_client::v1::RotateListenerSecretRequest {
        listener_id: listener_id.into(),
        secret: Some(secret.into()),
        grace_seconds,
        ..Default::default()
    };
    producer
        .register()
        .rotate_listener_secret(request)
        .await
        .unwrap()
        .into_inner()
        .listener
        .unwrap()
        .previous_secret_until
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_signs_beside_the_old_one_through_its_grace_period() {
    let receiver = Receiver::start().await;
    let server = server_with(|_| {}).await;
    let (producer, _, _) = server.producer("rotating").await;
    let hash = derive(&producer, "order.placed").await;
    let (first, second, third) = (
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "second-secret-of-the-listener",
        "whsec_c2Vjb25kLXJvdGF0aW9uLWtleS0xMjM0",
    );
    let (listener_id, _) = listen(&producer, &hash, receiver.url("/rotating"), Some(first), false).await;
    let key = |secret: &str| match secret.strip_prefix("whsec_") {
        Some(_) => standardwebhooks::Webhook::new(secret).unwrap(),
        None => standardwebhooks::Webhook::from_bytes(secret.as_bytes().to_vec()).unwrap(),
    };
    // Delivers one event and returns its request.
    let deliver = |n: usize| {
        let (producer, receiver) = (producer.clone(), &receiver);
        async move {
            let event_id = trigger(&producer, "order.placed", format!("{{\"n\": {n}}}")).await;
            receiver
                .wait_until("the event", DEADLINE, |requests| requests.iter().any(|r| r.webhook_id() == event_id))
                .await;
            receiver.requests().into_iter().find(|r| r.webhook_id() == event_id).unwrap()
        }
    };

    // A rotation with a grace period: both secrets sign, either verifies.
    let until = rotate(&producer, &listener_id, second, 3600).await.expect("the grace period is shown");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now + 3590..=now + 3610).contains(&until.seconds), "grace ends in an hour: {until:?}");
    let both = deliver(1).await;
    assert_eq!(both.header("webhook-signature").split(' ').count(), 2, "{:?}", both.headers);
    key(first).verify(&both.body, &both.headers).expect("the old secret still verifies");
    key(second).verify(&both.body, &both.headers).expect("the new secret verifies");
    assert!(key(third).verify(&both.body, &both.headers).is_err());

    // Rotated again without grace: the new secret alone signs; the one before stops at once,
    // and so does the one still in its grace period.
    assert_eq!(rotate(&producer, &listener_id, third, 0).await, None);
    let one = deliver(2).await;
    assert_eq!(one.header("webhook-signature").split(' ').count(), 1);
    key(third).verify(&one.body, &one.headers).expect("the newest secret verifies");
    assert!(key(second).verify(&one.body, &one.headers).is_err());
    assert!(key(first).verify(&one.body, &one.headers).is_err());

    // A grace period longer than a week is refused.
    let request = hookd_client::v1::RotateListenerSecretRequest {
        listener_id: listener_id.clone(),
        generate_secret: true,
        grace_seconds: 8 * 24 * 3600,
        ..Default::default()
    };
    let refused = producer.register().rotate_listener_secret(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_gets_every_event_signed() {
    let receiver = Receiver::start().await;
    let server = server_with(|_| {}).await;
    let (producer, _, _) = server.producer("shop").await;
    let hash = derive(&producer, "order.placed").await;
    let generated = producer
        .register()
        .register_listener(RegisterListenerRequest {
            event_hash: hash.clone(),
            url: receiver.url("/generated"),
            generate_secret: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    listen(&producer, &hash, receiver.url("/plain"), Some("a-plain-text-secret"), false).await;
    listen(&producer, &hash, receiver.url("/unsigned"), None, false).await;
    // Another event type's listener gets none of these.
    let other_hash = derive(&producer, "order.cancelled").await;
    listen(&producer, &other_hash, receiver.url("/other"), None, false).await;

    let mut events = Vec::new();
    for n in 0..20 {
        let payload = format!("{{\"order\": {n}}}");
        events.push((trigger(&producer, "order.placed", payload.clone()).await, payload));
    }
    receiver
        .wait_until("20 events at each of 3 listeners", DEADLINE, |requests| {
            ["/generated", "/plain", "/unsigned"].iter().all(|path| {
                requests.iter().filter(|r| r.path == *path).map(|r| r.webhook_id()).collect::<HashSet<_>>().len() == 20
            })
        })
        .await;

    let generated_key = standardwebhooks::Webhook::new(&generated).unwrap();
    let plain_key = standardwebhooks::Webhook::from_bytes(b"a-plain-text-secret".to_vec()).unwrap();
    for request in receiver.requests() {
        let (event_id, payload) = events.iter().find(|(id, _)| id == request.webhook_id()).expect("a triggered event");
        assert_eq!(request.body, payload.as_bytes(), "the body is the payload as triggered");
        assert_eq!(request.header("hookd-event-type"), "order.placed");
        assert_eq!(request.header("hookd-attempt"), "1");
        assert_eq!(request.header("content-type"), "application/json");
        assert!(request.header("user-agent").starts_with("hookd/"));
        assert!(request.header("hookd-delivery-id").starts_with("dlv_"));
        assert_eq!(request.webhook_id(), event_id);
        match request.path.as_str() {
            "/generated" => generated_key.verify(&request.body, &request.headers).expect("signature verifies"),
            "/plain" => {
                plain_key.verify(&request.body, &request.headers).expect("signature verifies");
                assert!(generated_key.verify(&request.body, &request.headers).is_err(), "the wrong key fails");
            }
            "/unsigned" => assert!(request.headers.get("webhook-signature").is_none()),
            other => panic!("unexpected request to {other}"),
        }
    }
    // The same event carries the same webhook-id to every listener.
    let ids_at =
        |path: &str| receiver.requests_to(path).iter().map(|r| r.webhook_id().to_owned()).collect::<HashSet<_>>();
    assert_eq!(ids_at("/generated"), ids_at("/unsigned"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_schedule_and_every_attempt_is_recorded() {
    let receiver = Receiver::start().await;
    receiver.script("/flaky", |_, nth| Reply::Status(if nth <= 2 { 500 } else { 200 }));
    receiver.script("/down", |_, _| Reply::Status(500));
    receiver.script("/redirect", |_, _| Reply::WithHeaders(302, vec![("location", "/elsewhere".into())]));
    receiver.script("/busy", |_, nth| {
        if nth == 1 { Reply::WithHeaders(503, vec![("retry-after", "1".into())]) } else { Reply::Status(204) }
    });
    let server = server_with(|_| {}).await;
    let (producer, _, _) = server.producer("retries").await;
    let hash = derive(&producer, "job.done").await;
    let (flaky, _) = listen(&producer, &hash, receiver.url("/flaky"), None, false).await;
    let (down, _) = listen(&producer, &hash, receiver.url("/down"), None, false).await;
    let (redirect, _) = listen(&producer, &hash, receiver.url("/redirect"), None, false).await;
    let (busy, _) = listen(&producer, &hash, receiver.url("/busy"), None, false).await;
    let event = trigger(&producer, "job.done", "{}".into()).await;

    receiver
        .wait_until("3 flaky, 4 down, 4 redirect and 2 busy attempts", DEADLINE, |requests| {
            let count = |path: &str| requests.iter().filter(|r| r.path == path).count();
            count("/flaky") == 3 && count("/down") == 4 && count("/redirect") == 4 && count("/busy") == 2
        })
        .await;

    for path in ["/flaky", "/down", "/redirect", "/busy"] {
        let requests = receiver.requests_to(path);
        let numbers: Vec<u32> = requests.iter().map(|r| r.attempt()).collect();
        assert_eq!(numbers, (1..=numbers.len() as u32).collect::<Vec<_>>(), "{path}: hookd-attempt counts up");
        let timestamps: HashSet<&str> = requests.iter().map(|r| r.header("webhook-timestamp")).collect();
        assert!(timestamps.iter().all(|t| t.parse::<i64>().is_ok()), "{path}: fresh unix timestamps");
        assert!(requests.iter().all(|r| r.webhook_id() == event), "{path}: the webhook-id never changes");
        // Never earlier than the schedule allows (200 ms, less 20 % jitter).
        for pair in requests.windows(2) {
            assert!(pair[1].at - pair[0].at >= Duration::from_millis(160), "{path}: a retry came too early");
        }
    }
    let busy_requests = receiver.requests_to("/busy");
    assert!(
        busy_requests[1].at - busy_requests[0].at >= Duration::from_millis(390),
        "Retry-After: 1 is honoured up to twice the scheduled 200 ms"
    );
    assert!(receiver.requests_to("/elsewhere").is_empty(), "redirects are not followed");

    let found = recorded(server, &[(&event, &flaky), (&event, &down), (&event, &redirect), (&event, &busy)]).await;
    let states: Vec<(i32, u32)> = found.iter().map(|(d, _)| (d.state, d.attempts)).collect();
    assert_eq!(
        states,
        [
            (DeliveryState::Succeeded as i32, 3),
            (DeliveryState::Failed as i32, 4),
            (DeliveryState::Failed as i32, 4),
            (DeliveryState::Succeeded as i32, 2)
        ]
    );
    let statuses = |index: usize| found[index].1.iter().map(|a| a.status_code).collect::<Vec<_>>();
    assert_eq!(statuses(0), [500, 500, 200]);
    assert_eq!(statuses(1), [500, 500, 500, 500]);
    assert_eq!(statuses(2), [302, 302, 302, 302]);
    assert_eq!(statuses(3), [503, 204]);
    let first = &found[0].1[0];
    assert_eq!(first.response_body, b"recorded", "the response body is kept");
    assert!(first.response_headers.contains_key("content-length"));
    assert_eq!(found[3].1[0].response_headers.get("retry-after").map(String::as_str), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_listener_costs_only_its_own_deliveries() {
    const EVENTS: usize = 40;
    let receiver = Receiver::start().await;
    receiver.script("/hang", |_, _| Reply::Hang);
    let server = server_with(|config| {
        config.pipeline.workers = 8;
        config.pipeline.listener_in_flight = 4;
        // Longer than this test waits: the hanging requests hold their slots throughout.
        config.pipeline.attempt_timeout = DEADLINE * 2;
    })
    .await;
    let (producer, _, _) = server.producer("isolation").await;
    let hash = derive(&producer, "tick").await;
    listen(&producer, &hash, receiver.url("/hang"), None, false).await;
    listen(&producer, &hash, receiver.url("/healthy"), None, false).await;
    for n in 0..EVENTS {
        trigger(&producer, "tick", format!("{{\"n\": {n}}}")).await;
    }
    receiver
        .wait_until("every event at the healthy listener", DEADLINE, |requests| {
            requests.iter().filter(|r| r.path == "/healthy").count() == EVENTS
        })
        .await;
    // A listener that has never answered gets one request at a time until one succeeds: the
    // hanging one holds a single request, whatever its cap.
    assert_eq!(receiver.requests_to("/hang").len(), 1, "the hanging listener holds one request");
    assert_eq!(receiver.max_hanging(), 1);
    receiver.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_failing_five_times_in_a_row_is_backed_off_as_a_whole() {
    const BACKOFF: Duration = Duration::from_secs(2);
    let receiver = Receiver::start().await;
    receiver.script("/down", |_, _| Reply::Status(500));
    // One attempt at a time, so the five failures come strictly before the sixth event.
    let server = server_with(|config| {
        config.pipeline.listener_in_flight = 1;
        config.pipeline.retry_schedule = "2s,2s".parse().unwrap();
    })
    .await;
    let (producer, _, _) = server.producer("flaky").await;
    let hash = derive(&producer, "tick").await;
    listen(&producer, &hash, receiver.url("/down"), None, false).await;
    for n in 0..6 {
        trigger(&producer, "tick", n.to_string()).await;
    }
    let first_attempt = |requests: &[crate::receiver::Received], n: usize| {
        requests.iter().find(|r| r.body == n.to_string().as_bytes() && r.attempt() == 1).map(|r| r.at)
    };
    receiver
        .wait_until("the sixth event's first attempt", DEADLINE, |requests| first_attempt(requests, 5).is_some())
        .await;
    let requests = receiver.requests();
    // The fifth failure in a row, whichever attempt it was: on a loaded machine a retry of the
    // first event (due 2 s after it) may come before the fifth event's first attempt.
    let mut times: Vec<_> = requests.iter().map(|r| r.at).collect();
    times.sort();
    let fifth_failure = times[4];
    let sixth = first_attempt(&requests, 5).expect("the sixth event was attempted");
    // The back-off starts after the fifth failure is recorded, so the sixth cannot come sooner;
    // without it, the sixth would follow the fifth at once.
    assert!(
        sixth.duration_since(fifth_failure) >= BACKOFF,
        "the sixth event came {:?} after the fifth failure, inside the back-off",
        sixth.duration_since(fifth_failure)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_switched_to_strict_order_finishes_its_older_deliveries_then_keeps_order() {
    const BEFORE: usize = 4;
    const AFTER: usize = 6;
    let receiver = Receiver::start().await;
    let switched = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let delivered = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let (flag, done) = (switched.clone(), delivered.clone());
    // Events from before the switch fail until it has happened, so they are still pending
    // when the listener starts keeping order; after it, every third event fails once.
    receiver.script("/switch", move |request, nth| {
        let n: usize = std::str::from_utf8(&request.body).unwrap().parse().unwrap();
        let fails =
            if n < BEFORE { !flag.load(std::sync::atomic::Ordering::SeqCst) } else { n.is_multiple_of(3) && nth == 1 };
        if !fails {
            done.lock().unwrap().insert(n);
        }
        Reply::Status(if fails { 500 } else { 200 })
    });
    let server = server_with(|config| config.pipeline.retry_schedule = ["200ms"; 10].join(",").parse().unwrap()).await;
    let (producer, _, _) = server.producer("switching").await;
    let hash = derive(&producer, "step").await;
    let (listener_id, _) = listen(&producer, &hash, receiver.url("/switch"), None, false).await;
    for n in 0..BEFORE {
        trigger(&producer, "step", n.to_string()).await;
    }
    receiver.wait_until("a first attempt of each early event", DEADLINE, |requests| requests.len() >= BEFORE).await;
    let update = UpdateListenerRequest { listener_id, ordered: Some(true), ..Default::default() };
    producer.register().update_listener(update).await.unwrap();
    switched.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut events = Vec::new();
    for n in BEFORE..BEFORE + AFTER {
        events.push(trigger(&producer, "step", n.to_string()).await);
    }
    receiver
        .wait_until("every event delivered, from before the switch and after", DEADLINE, |_| {
            delivered.lock().unwrap().len() == BEFORE + AFTER
        })
        .await;
    // Events after the switch arrive in trigger order, a failed attempt always followed by
    // the same event's retry.
    let arrivals: Vec<(String, u32)> = receiver
        .requests()
        .iter()
        .filter(|r| events.iter().any(|event| event == r.webhook_id()))
        .map(|r| (r.webhook_id().to_owned(), r.attempt()))
        .collect();
    let mut expected = Vec::new();
    for (offset, event) in events.iter().enumerate() {
        expected.push((event.clone(), 1));
        if (BEFORE + offset).is_multiple_of(3) {
            expected.push((event.clone(), 2));
        }
    }
    assert_eq!(arrivals, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_listener_gets_each_event_only_after_the_previous_one_succeeded() {
    const EVENTS: usize = 12;
    let receiver = Receiver::start().await;
    // Every third event fails its first attempt.
    receiver.script("/ordered", |request, nth| {
        let n: usize = std::str::from_utf8(&request.body).unwrap().parse().unwrap();
        Reply::Status(if n.is_multiple_of(3) && nth == 1 { 500 } else { 200 })
    });
    let server = server_with(|_| {}).await;
    let (producer, _, _) = server.producer("ordered").await;
    let hash = derive(&producer, "step").await;
    listen(&producer, &hash, receiver.url("/ordered"), None, true).await;
    let mut events = Vec::new();
    for n in 0..EVENTS {
        events.push(trigger(&producer, "step", n.to_string()).await);
    }
    receiver
        .wait_until("every event delivered to the ordered listener", DEADLINE, |requests| {
            requests.len() == EVENTS + EVENTS.div_ceil(3)
        })
        .await;
    // Arrivals: each event's attempts together, events in trigger order, a failed first
    // attempt always followed by the same event's retry.
    let arrivals: Vec<(String, u32)> =
        receiver.requests().iter().map(|r| (r.webhook_id().to_owned(), r.attempt())).collect();
    let mut expected = Vec::new();
    for (n, event) in events.iter().enumerate() {
        expected.push((event.clone(), 1));
        if n.is_multiple_of(3) {
            expected.push((event.clone(), 2));
        }
    }
    assert_eq!(arrivals, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_failing_for_too_long_is_disabled_and_can_be_re_enabled() {
    let receiver = Receiver::start().await;
    receiver.script("/broken", |_, _| Reply::Status(500));
    let server = server_with(|config| {
        config.pipeline.retry_schedule = "100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms".parse().unwrap();
        config.pipeline.disable_after = Duration::from_millis(500);
    })
    .await;
    let (producer, _, _) = server.producer("breaker").await;
    let hash = derive(&producer, "ping").await;
    let (listener_id, _) = listen(&producer, &hash, receiver.url("/broken"), None, false).await;
    trigger(&producer, "ping", "{}".into()).await;

    let disabled = eventually("the listener disabled after half a second of failures", || {
        let (producer, listener_id) = (producer.clone(), listener_id.clone());
        async move {
            let request = GetListenerRequest { listener_id };
            let listener = producer.register().get_listener(request).await.unwrap().into_inner();
            (!listener.enabled).then_some(listener)
        }
    })
    .await;
    assert!(disabled.disabled_reason.contains("failed attempts"), "{}", disabled.disabled_reason);

    // While disabled it gets no new deliveries: fan-out skips it.
    let while_disabled = trigger(&producer, "ping", "{\"while\": \"disabled\"}".into()).await;

    // Re-enabled and still failing, it is not disabled again at once: its run of failures
    // starts afresh.
    producer
        .register()
        .update_listener(UpdateListenerRequest {
            listener_id: listener_id.clone(),
            enabled: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    let fresh = trigger(&producer, "ping", "{\"after\": true}".into()).await;
    receiver
        .wait_until("the event after re-enabling", DEADLINE, |requests| {
            requests.iter().any(|r| r.webhook_id() == fresh)
        })
        .await;
    let listener = producer
        .register()
        .get_listener(GetListenerRequest { listener_id: listener_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(listener.enabled, "one failure after re-enabling does not disable it again");

    receiver.script("/broken", |_, _| Reply::Status(200));
    let healthy = trigger(&producer, "ping", "{\"healthy\": true}".into()).await;
    receiver
        .wait_until("delivered once the listener answers", DEADLINE, |requests| {
            requests.iter().any(|r| r.webhook_id() == healthy)
        })
        .await;
    assert!(
        receiver.requests().iter().all(|r| r.webhook_id() != while_disabled),
        "no delivery was made for the event triggered while the listener was disabled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_waiting_while_a_listener_is_disabled_go_once_it_is_enabled_again() {
    const EVENTS: usize = 3;
    let receiver = Receiver::start().await;
    receiver.script("/later", |_, _| Reply::Status(500));
    // Enough attempts that the schedule never runs out during the test.
    let server =
        server_with(|config| config.pipeline.retry_schedule = vec!["300ms"; 30].join(",").parse().unwrap()).await;
    let (producer, _, _) = server.producer("paused").await;
    let hash = derive(&producer, "job").await;
    let (listener_id, _) = listen(&producer, &hash, receiver.url("/later"), None, false).await;
    for n in 0..EVENTS {
        trigger(&producer, "job", n.to_string()).await;
    }
    receiver.wait_until("a first attempt of every event", DEADLINE, |requests| requests.len() >= EVENTS).await;
    let set_enabled = |enabled: bool| {
        let (producer, listener_id) = (producer.clone(), listener_id.clone());
        async move {
            let request = UpdateListenerRequest { listener_id, enabled: Some(enabled), ..Default::default() };
            producer.register().update_listener(request).await.unwrap();
        }
    };
    set_enabled(false).await;
    receiver.script("/later", |_, _| Reply::Status(200));
    set_enabled(true).await;
    listener_settled(&producer, &listener_id, EVENTS, hookd_client::v1::DeliveryState::Succeeded).await;
    assert_eq!(receiver.requests().iter().map(|r| r.webhook_id()).collect::<HashSet<_>>().len(), EVENTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_gets_only_the_events_triggered_after_it_was_registered() {
    const BEFORE: usize = 200;
    let receiver = Receiver::start().await;
    let server = server_with(|_| {}).await;
    let (producer, _, _) = server.producer("latecomer").await;
    let hash = derive(&producer, "news").await;
    // A burst fan-out may still be working through when the listener arrives.
    let mut triggering = tokio::task::JoinSet::new();
    for n in 0..BEFORE {
        let producer = producer.clone();
        triggering.spawn(async move { trigger(&producer, "news", format!("{{\"before\": {n}}}")).await });
    }
    while let Some(done) = triggering.join_next().await {
        done.unwrap();
    }
    listen(&producer, &hash, receiver.url("/late"), None, false).await;
    let after = trigger(&producer, "news", "{\"after\": true}".into()).await;
    receiver.wait_until("the event after registering", DEADLINE, |requests| !requests.is_empty()).await;
    let ids: Vec<String> = receiver.requests().iter().map(|r| r.webhook_id().to_owned()).collect();
    assert_eq!(ids, [after], "none of the events triggered before it registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_attempts_leave_in_trigger_order() {
    const EVENTS: usize = 30;
    let receiver = Receiver::start().await;
    // One attempt at a time to the listener: the order they leave in is the order they arrive.
    let server = server_with(|config| config.pipeline.listener_in_flight = 1).await;
    let (producer, _, _) = server.producer("order").await;
    let hash = derive(&producer, "seq").await;
    listen(&producer, &hash, receiver.url("/in-order"), None, false).await;
    let mut events = Vec::new();
    for n in 0..EVENTS {
        events.push(trigger(&producer, "seq", n.to_string()).await);
    }
    receiver.wait_until("every event", DEADLINE, |requests| requests.len() == EVENTS).await;
    let arrived: Vec<String> = receiver.requests().iter().map(|r| r.webhook_id().to_owned()).collect();
    assert_eq!(arrived, events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_larger_than_one_chunk_reaches_every_listener() {
    const LISTENERS: usize = 1_200;
    let receiver = Receiver::start().await;
    let server = server_with(|_| {}).await;
    let (producer, _, _) = server.producer("wide").await;
    let hash = derive(&producer, "broadcast").await;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (producer, hash, base) = (producer.clone(), hash.clone(), receiver.url("/l"));
        workers.spawn(async move {
            for n in (worker..LISTENERS).step_by(16) {
                listen(&producer, &hash, format!("{base}{n}"), None, false).await;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }
    let event = trigger(&producer, "broadcast", "{}".into()).await;
    receiver
        .wait_until("the event at every listener", DEADLINE, |requests| {
            requests.iter().filter(|r| r.webhook_id() == event).map(|r| r.path.as_str()).collect::<HashSet<_>>().len()
                == LISTENERS
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_two_types_fanned_out_in_shared_chunks_reach_each_of_their_listeners_once() {
    // 20 and 7 listeners do not divide a chunk of 32 deliveries: events are cut across
    // chunks, and a chunk's events of one type share the listeners it read once.
    const EVENTS: usize = 12;
    let receiver = Receiver::start().await;
    let server = server_with(|_| {}).await;
    let (producer, _, _) = server.producer("mixed").await;
    let mut expected = HashSet::new();
    let mut listeners_of = Vec::new();
    for (event_type, count) in [("wide", 20), ("narrow", 7)] {
        let hash = derive(&producer, event_type).await;
        let paths: Vec<String> = (0..count).map(|n| format!("/{event_type}/{n}")).collect();
        for path in &paths {
            listen(&producer, &hash, receiver.url(path), None, false).await;
        }
        listeners_of.push((event_type, paths));
    }
    for n in 0..EVENTS {
        let (event_type, paths) = &listeners_of[n % 2];
        let event = trigger(&producer, event_type, n.to_string()).await;
        expected.extend(paths.iter().map(|path| (event.clone(), path.clone())));
    }
    receiver
        .wait_until("every event at each of its listeners", DEADLINE, |requests| requests.len() >= expected.len())
        .await;
    let requests = receiver.requests();
    let received: Vec<(String, String)> =
        requests.iter().map(|r| (r.webhook_id().to_owned(), r.path.clone())).collect();
    let distinct: HashSet<(String, String)> = received.iter().cloned().collect();
    assert_eq!(distinct, expected, "each event at exactly its own type's listeners");
    assert_eq!(received.len(), expected.len(), "no delivery made twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_recorded_as_such_and_each_attempt_is_signed_afresh() {
    let receiver = Receiver::start().await;
    receiver.script("/slow", |_, nth| if nth == 1 { Reply::Hang } else { Reply::Status(200) });
    let server = server_with(|config| config.pipeline.attempt_timeout = Duration::from_millis(300)).await;
    let (producer, _, _) = server.producer("timeouts").await;
    let hash = derive(&producer, "slowpoke").await;
    let (listener, _) = listen(&producer, &hash, receiver.url("/slow"), Some("timeout-test-secret"), false).await;
    let event = trigger(&producer, "slowpoke", "{\"slow\": true}".into()).await;
    receiver.wait_until("the retry after the timeout", DEADLINE, |requests| requests.len() == 2).await;
    receiver.release();

    let key = standardwebhooks::Webhook::from_bytes(b"timeout-test-secret".to_vec()).unwrap();
    for request in receiver.requests() {
        key.verify(&request.body, &request.headers).expect("each attempt's signature verifies, timestamp included");
    }
    let found = recorded(server, &[(&event, &listener)]).await;
    let (delivery, attempts) = &found[0];
    assert_eq!(delivery.state, DeliveryState::Succeeded as i32);
    assert!(attempts[0].error.starts_with("timeout:"), "{:?}", attempts[0].error);
    assert_eq!(attempts[0].status_code, 0);
    assert_eq!(attempts[1].status_code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_listener_cancels_the_deliveries_waiting_in_its_line() {
    const EVENTS: usize = 6;
    let receiver = Receiver::start().await;
    receiver.script("/busy", |_, _| Reply::Hang);
    let server = server_with(|config| {
        config.pipeline.listener_in_flight = 1;
        config.pipeline.retry_schedule = "300ms,300ms".parse().unwrap();
    })
    .await;
    let (producer, _, _) = server.producer("liner").await;
    let hash = derive(&producer, "queued").await;
    let (listener, _) = listen(&producer, &hash, receiver.url("/busy"), None, false).await;
    for n in 0..EVENTS {
        trigger(&producer, "queued", n.to_string()).await;
    }
    // One attempt hangs in the listener's only slot; the other events wait in its line, once
    // fan-out has made their deliveries (an event it has not reached gets none once the
    // listener is gone).
    receiver.wait_until("the first attempt hanging", DEADLINE, |requests| !requests.is_empty()).await;
    let admin = server.admin().await;
    let deliveries = |admin: hookd_client::Client, listener_id: String| async move {
        let request = hookd_client::v1::ListDeliveriesRequest { listener_id, ..Default::default() };
        admin.delivery().list_deliveries(request).await.unwrap().into_inner().deliveries
    };
    eventually("a delivery of every event", || {
        let (admin, listener) = (admin.clone(), listener.clone());
        async move { (deliveries(admin, listener).await.len() == EVENTS).then_some(()) }
    })
    .await;
    let request = hookd_client::v1::DeleteListenerRequest { listener_id: listener.clone() };
    producer.register().delete_listener(request).await.unwrap();
    receiver.release();

    listener_settled(&admin, &listener, EVENTS, hookd_client::v1::DeliveryState::Cancelled).await;
    assert_eq!(receiver.requests_to("/busy").len(), 1, "nothing more went to the deleted listener");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_listener_cancels_its_pending_deliveries() {
    let receiver = Receiver::start().await;
    receiver.script("/gone", |_, _| Reply::Status(500));
    let server =
        server_with(|config| config.pipeline.retry_schedule = "300ms,300ms,300ms,300ms,300ms".parse().unwrap()).await;
    let (producer, _, _) = server.producer("deleter").await;
    let hash = derive(&producer, "doomed").await;
    let (listener, _) = listen(&producer, &hash, receiver.url("/gone"), None, false).await;
    trigger(&producer, "doomed", "{}".into()).await;
    receiver.wait_until("a first failed attempt", DEADLINE, |requests| !requests.is_empty()).await;
    let request = hookd_client::v1::DeleteListenerRequest { listener_id: listener.clone() };
    producer.register().delete_listener(request).await.unwrap();

    let admin = server.admin().await;
    listener_settled(&admin, &listener, 1, hookd_client::v1::DeliveryState::Cancelled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_disabled_listener_cancels_the_deliveries_waiting_in_its_lot() {
    const EVENTS: usize = 5;
    let receiver = Receiver::start().await;
    receiver.script("/paused", |_, _| Reply::Status(500));
    let server = server_with(|config| config.pipeline.retry_schedule = "200ms,200ms,200ms".parse().unwrap()).await;
    let (producer, _, _) = server.producer("pauser").await;
    let hash = derive(&producer, "parked").await;
    let (listener, _) = listen(&producer, &hash, receiver.url("/paused"), None, false).await;
    for n in 0..EVENTS {
        trigger(&producer, "parked", n.to_string()).await;
    }
    receiver.wait_until("a first attempt of every event", DEADLINE, |requests| requests.len() >= EVENTS).await;
    // Disabled: the retries, due soon, wait in the listener's lot.
    let disable = hookd_client::v1::UpdateListenerRequest {
        listener_id: listener.clone(),
        enabled: Some(false),
        ..Default::default()
    };
    producer.register().update_listener(disable).await.unwrap();
    // Let the retries fall due while it is disabled, so the dispatcher parks them (should it
    // not have got to them, its workers cancel them instead: the outcome checked is the same).
    let admin = server.admin().await;
    retries_due(&admin, &listener, EVENTS).await;
    let request = hookd_client::v1::DeleteListenerRequest { listener_id: listener.clone() };
    producer.register().delete_listener(request).await.unwrap();

    listener_settled(&admin, &listener, EVENTS, hookd_client::v1::DeliveryState::Cancelled).await;
}

// Regression: a failed manual attempt of an older delivery was counted as the ordered head
// retrying, so the head's retry, parked meanwhile, was never put back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_listeners_head_is_still_attempted_after_a_failed_manual_attempt_of_an_older_one() {
    let receiver = Receiver::start().await;
    let older = Arc::new(std::sync::Mutex::new(String::new()));
    let slow = older.clone();
    // Everything fails; the manual attempt of the older delivery takes a while, so the head's
    // retry falls due while it is under way.
    receiver.script("/strict", move |request, _| {
        if request.webhook_id() == *slow.lock().unwrap() && request.attempt() == 3 {
            Reply::After(Duration::from_millis(1500), 500)
        } else {
            Reply::Status(500)
        }
    });
    let server = server_with(|config| config.pipeline.retry_schedule = "1s".parse().unwrap()).await;
    let (producer, _, _) = server.producer("strict").await;
    let hash = derive(&producer, "step").await;
    let (listener, _) = listen(&producer, &hash, receiver.url("/strict"), None, true).await;
    let first = trigger(&producer, "step", "0".into()).await;
    listener_settled(&producer, &listener, 1, hookd_client::v1::DeliveryState::Failed).await;
    *older.lock().unwrap() = first.clone();
    let head = trigger(&producer, "step", "1".into()).await;
    receiver.wait_until("the head's first attempt", DEADLINE, |r| r.iter().any(|r| r.webhook_id() == head)).await;
    let request = hookd_client::v1::ListDeliveriesRequest { event_id: first.clone(), ..Default::default() };
    let older_delivery = producer.delivery().list_deliveries(request).await.unwrap().into_inner().deliveries.remove(0);
    let retry = hookd_client::v1::RetryDeliveryRequest { delivery_id: older_delivery.id };
    producer.delivery().retry_delivery(retry).await.unwrap();
    // The manual attempt fails and is not retried; the head's retry still comes, and it ends.
    receiver
        .wait_until("the head's retry", DEADLINE, |r| r.iter().any(|r| r.webhook_id() == head && r.attempt() == 2))
        .await;
    listener_settled(&producer, &listener, 2, hookd_client::v1::DeliveryState::Failed).await;
    let manual = receiver.requests().iter().filter(|r| r.webhook_id() == first && r.attempt() == 3).count();
    assert_eq!(manual, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_listeners_waiting_first_attempts_go_once_enabled_or_are_cancelled_once_deleted() {
    const EVENTS: usize = 30;
    let receiver = Receiver::start().await;
    receiver.script("/", |_, _| Reply::Hang);
    let server = server_with(|config| config.pipeline.attempt_timeout = DEADLINE * 2).await;
    let (producer, _, _) = server.producer("waiter").await;
    let hash = derive(&producer, "later").await;
    let (kept, _) = listen(&producer, &hash, receiver.url("/kept"), None, false).await;
    let (gone, _) = listen(&producer, &hash, receiver.url("/gone"), None, false).await;
    for n in 0..EVENTS {
        trigger(&producer, "later", n.to_string()).await;
    }
    // Each listener's first request hangs (one at a time until one is answered); the rest wait.
    receiver.wait_until("a request hanging at each", DEADLINE, |requests| requests.len() == 2).await;
    for listener_id in [&kept, &gone] {
        let disable =
            UpdateListenerRequest { listener_id: listener_id.clone(), enabled: Some(false), ..Default::default() };
        producer.register().update_listener(disable).await.unwrap();
    }
    // What waited is left in the log, listed as pending all the same.
    let admin = server.admin().await;
    let listed = |listener_id: String, state: hookd_client::v1::DeliveryState| {
        let admin = admin.clone();
        async move {
            let request =
                hookd_client::v1::ListDeliveriesRequest { listener_id, state: state as i32, ..Default::default() };
            admin.delivery().list_deliveries(request).await.unwrap().into_inner().deliveries.len()
        }
    };
    assert_eq!(listed(kept.clone(), hookd_client::v1::DeliveryState::Pending).await, EVENTS);

    let delete = hookd_client::v1::DeleteListenerRequest { listener_id: gone.clone() };
    producer.register().delete_listener(delete).await.unwrap();
    receiver.script("/", |_, _| Reply::Status(200));
    // The hanging requests fail (503) and their retries follow the schedule.
    receiver.release();
    let enable = UpdateListenerRequest { listener_id: kept.clone(), enabled: Some(true), ..Default::default() };
    producer.register().update_listener(enable).await.unwrap();
    listener_settled(&admin, &kept, EVENTS, hookd_client::v1::DeliveryState::Succeeded).await;
    listener_settled(&admin, &gone, EVENTS, hookd_client::v1::DeliveryState::Cancelled).await;
    assert_eq!(receiver.requests_to("/gone").len(), 1, "nothing more went to the deleted listener");
}

// Regression: a listener deleted before fan-out reached all of its events kept cancelled
// records of those fan-out had handed it and none of the rest, which then were listed nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_a_deleted_listener_was_owed_ends_delivered_or_cancelled() {
    use tokio_stream::StreamExt;
    const EVENTS: u64 = 2_000;
    let receiver = Receiver::start().await;
    let server = server_with(|_| {}).await;
    let (producer, _, _) = server.producer("quitter").await;
    let hash = derive(&producer, "burst").await;
    let (listener, _) = listen(&producer, &hash, receiver.url("/quitter"), None, false).await;
    let items = (0..EVENTS).map(|n| hookd_client::v1::TriggerStreamRequest {
        r#ref: n,
        trigger: Some(TriggerRequest { event_type: "burst".into(), payload: b"{}".to_vec(), ..Default::default() }),
    });
    let mut acks = producer.trigger_service().trigger_stream(tokio_stream::iter(items)).await.unwrap().into_inner();
    let mut acked = 0;
    while let Some(ack) = acks.next().await {
        assert!(matches!(ack.unwrap().result, Some(hookd_client::v1::trigger_stream_ack::Result::Ack(_))));
        acked += 1;
    }
    assert_eq!(acked, EVENTS);
    // Deleted at once: fan-out is usually still on its way through the burst.
    let delete = hookd_client::v1::DeleteListenerRequest { listener_id: listener.clone() };
    producer.register().delete_listener(delete).await.unwrap();
    let admin = server.admin().await;
    eventually("every event of the deleted listener delivered or cancelled", || {
        let (admin, listener) = (admin.clone(), listener.clone());
        async move {
            let (mut ended, mut page_token) = (0, String::new());
            loop {
                let request = hookd_client::v1::ListDeliveriesRequest {
                    listener_id: listener.clone(),
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                };
                let page = admin.delivery().list_deliveries(request).await.unwrap().into_inner();
                ended += page
                    .deliveries
                    .iter()
                    .filter(|d| {
                        [hookd_client::v1::DeliveryState::Succeeded, hookd_client::v1::DeliveryState::Cancelled]
                            .map(|state| state as i32)
                            .contains(&d.state)
                    })
                    .count();
                page_token = page.next_page_token;
                if page_token.is_empty() {
                    break;
                }
            }
            (ended as u64 == EVENTS).then_some(())
        }
    })
    .await;
}

// Regression (review): a detached listener whose last request then succeeded looked idle and
// was forgotten with where it stood, so its waiting first attempts never went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_disabled_while_its_last_request_succeeds_gets_the_rest_once_enabled() {
    const EVENTS: usize = 10;
    let receiver = Receiver::start().await;
    receiver.script("/slow", |_, _| Reply::After(Duration::from_millis(500), 200));
    let server = server_with(|_| {}).await;
    let (producer, _, _) = server.producer("slowpoke").await;
    let hash = derive(&producer, "tick").await;
    let (listener, _) = listen(&producer, &hash, receiver.url("/slow"), None, false).await;
    for n in 0..EVENTS {
        trigger(&producer, "tick", n.to_string()).await;
    }
    receiver.wait_until("the first request", DEADLINE, |requests| !requests.is_empty()).await;
    let disable = UpdateListenerRequest { listener_id: listener.clone(), enabled: Some(false), ..Default::default() };
    producer.register().update_listener(disable).await.unwrap();
    // The request under way succeeds; nothing more goes while disabled.
    let admin = server.admin().await;
    eventually("the request under way recorded", || {
        let (admin, listener) = (admin.clone(), listener.clone());
        async move {
            let request = hookd_client::v1::ListDeliveriesRequest {
                listener_id: listener,
                state: hookd_client::v1::DeliveryState::Succeeded as i32,
                ..Default::default()
            };
            let done = admin.delivery().list_deliveries(request).await.unwrap().into_inner().deliveries;
            (!done.is_empty()).then_some(())
        }
    })
    .await;
    let enable = UpdateListenerRequest { listener_id: listener.clone(), enabled: Some(true), ..Default::default() };
    producer.register().update_listener(enable).await.unwrap();
    listener_settled(&admin, &listener, EVENTS, hookd_client::v1::DeliveryState::Succeeded).await;
}
