//! "What happened to my event?": listing events, deliveries and attempts; retrying,
//! replaying and recovering; ownership; retention.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hookd_client::Client;
use hookd_client::v1::{
    AttemptTrigger, Delivery, DeliveryState, GetEventRequest, ListAttemptsRequest, ListDeliveriesRequest,
    ListEventsRequest, RecoverListenerRequest, RegisterListenerRequest, ReplayEventRequest, RetryDeliveryRequest,
    TriggerRequest,
};
use hookd_server::config::Config;
use tonic::Code;

use crate::receiver::{Receiver, Reply};
use crate::support::{DEADLINE, TestServer, derive, eventually, master_key};

async fn server_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(Arc::new(tempfile::tempdir().unwrap()), &master_key(), |config| {
        config.pipeline.retry_schedule = "100ms,100ms".parse().unwrap();
        adjust(config);
    })
    .await
}

async fn listen(producer: &Client, hash: &str, url: String) -> String {
    let request = RegisterListenerRequest { event_hash: hash.into(), url, ..Default::default() };
    producer.register().register_listener(request).await.unwrap().into_inner().listener.unwrap().id
}

async fn trigger(producer: &Client, event_type: &str, payload: &str) -> String {
    let request =
        TriggerRequest { event_type: event_type.into(), payload: payload.as_bytes().to_vec(), ..Default::default() };
    producer.trigger_service().trigger(request).await.unwrap().into_inner().event_id
}

async fn deliveries_of_event(client: &Client, event_id: &str) -> Vec<Delivery> {
    let request = ListDeliveriesRequest { event_id: event_id.into(), ..Default::default() };
    client.delivery().list_deliveries(request).await.unwrap().into_inner().deliveries
}

/// Waits until retention has removed the event (GetEvent answers NOT_FOUND).
async fn trimmed(client: &Client, event_id: &str, what: &str) {
    eventually(what, || {
        let (client, event_id) = (client.clone(), event_id.to_owned());
        async move {
            let answer = client.delivery().get_event(GetEventRequest { event_id }).await;
            (answer.err()?.code() == Code::NotFound).then_some(())
        }
    })
    .await;
}

/// Waits until the event's deliveries are all in `state`; returns them.
async fn settled(client: &Client, event_id: &str, count: usize, state: DeliveryState) -> Vec<Delivery> {
    eventually(&format!("{count} deliveries of {event_id} {state:?}"), || {
        let (client, event_id) = (client.clone(), event_id.to_owned());
        async move {
            let deliveries = deliveries_of_event(&client, &event_id).await;
            (deliveries.len() == count && deliveries.iter().all(|d| d.state == state as i32)).then_some(deliveries)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_is_listed_with_its_outcome() {
    let receiver = Receiver::start().await;
    receiver.script("/flaky", |_, nth| Reply::Status(if nth <= 2 { 500 } else { 200 }));
    let server = server_with(|_| {}).await;
    let (producer, _, _) = server.producer("inspect").await;
    let hash = derive(&producer, "order.paid").await;
    let listener = listen(&producer, &hash, receiver.url("/flaky")).await;
    let event = trigger(&producer, "order.paid", "{\"order\": 7}").await;

    let delivered = settled(&producer, &event, 1, DeliveryState::Succeeded).await;
    assert_eq!(delivered[0].attempts, 3);
    assert_eq!(delivered[0].listener_id, listener);
    assert_eq!(delivered[0].last_status_code, 200);
    let attempts = producer
        .delivery()
        .list_attempts(ListAttemptsRequest { delivery_id: delivered[0].id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .attempts;
    assert_eq!(attempts.iter().map(|a| a.status_code).collect::<Vec<_>>(), [500, 500, 200]);
    assert_eq!(attempts.iter().map(|a| a.number).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(attempts.iter().all(|a| a.trigger == AttemptTrigger::Scheduled as i32));
    // A page at a time.
    let page = |page_token: String| {
        let request = ListAttemptsRequest { delivery_id: delivered[0].id.clone(), page_size: 2, page_token };
        let producer = producer.clone();
        async move { producer.delivery().list_attempts(request).await.unwrap().into_inner() }
    };
    let first = page(String::new()).await;
    assert_eq!(first.attempts.iter().map(|a| a.number).collect::<Vec<_>>(), [1, 2]);
    let second = page(first.next_page_token).await;
    assert_eq!(second.attempts.iter().map(|a| a.number).collect::<Vec<_>>(), [3]);
    assert!(second.next_page_token.is_empty(), "the last page says so");
    assert!(attempts.iter().all(|a| a.response_body == b"recorded"));

    let fetched =
        producer.delivery().get_event(GetEventRequest { event_id: event.clone() }).await.unwrap().into_inner();
    assert_eq!(fetched.payload, b"{\"order\": 7}");
    assert_eq!(fetched.event_type, "order.paid");
    let by_listener = producer
        .delivery()
        .list_deliveries(ListDeliveriesRequest { listener_id: listener, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(by_listener, delivered);
    let both = ListDeliveriesRequest { event_id: event, listener_id: "lst_x".into(), ..Default::default() };
    assert_eq!(producer.delivery().list_deliveries(both).await.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_is_retried_by_hand_once_its_listener_recovers() {
    let receiver = Receiver::start().await;
    receiver.script("/down", |_, _| Reply::Status(503));
    let server = server_with(|_| {}).await;
    let (producer, _, _) = server.producer("manual").await;
    let hash = derive(&producer, "invoice.sent").await;
    listen(&producer, &hash, receiver.url("/down")).await;
    let event = trigger(&producer, "invoice.sent", "{}").await;
    let failed = settled(&producer, &event, 1, DeliveryState::Failed).await;
    assert_eq!(failed[0].attempts, 3);

    // Still down: a manual attempt is made once and not retried.
    producer.delivery().retry_delivery(RetryDeliveryRequest { delivery_id: failed[0].id.clone() }).await.unwrap();
    let attempts = eventually("the manual attempt", || {
        let (producer, id) = (producer.clone(), failed[0].id.clone());
        async move {
            let request = ListAttemptsRequest { delivery_id: id, ..Default::default() };
            let attempts = producer.delivery().list_attempts(request).await.unwrap().into_inner().attempts;
            (attempts.len() == 4).then_some(attempts)
        }
    })
    .await;
    assert_eq!(attempts[3].trigger, AttemptTrigger::Manual as i32);
    assert_eq!(deliveries_of_event(&producer, &event).await[0].state, DeliveryState::Failed as i32);

    receiver.script("/down", |_, _| Reply::Status(200));
    producer.delivery().retry_delivery(RetryDeliveryRequest { delivery_id: failed[0].id.clone() }).await.unwrap();
    let succeeded = settled(&producer, &event, 1, DeliveryState::Succeeded).await;
    assert_eq!(succeeded[0].attempts, 5);
    assert_eq!(receiver.requests_to("/down").len(), 5, "the failed manual attempt was not retried");

    // A disabled listener takes no manual attempts: the caller is told, nothing is queued.
    let listener_id = succeeded[0].listener_id.clone();
    let disable = hookd_client::v1::UpdateListenerRequest { listener_id, enabled: Some(false), ..Default::default() };
    producer.register().update_listener(disable).await.unwrap();
    let refused = producer.delivery().retry_delivery(RetryDeliveryRequest { delivery_id: failed[0].id.clone() }).await;
    assert_eq!(refused.unwrap_err().code(), Code::FailedPrecondition);

    // Nor does a deleted one, and its delivery keeps the outcome it had.
    let delete = hookd_client::v1::DeleteListenerRequest { listener_id: succeeded[0].listener_id.clone() };
    producer.register().delete_listener(delete).await.unwrap();
    let refused = producer.delivery().retry_delivery(RetryDeliveryRequest { delivery_id: failed[0].id.clone() }).await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("deleted"), "{}", refused.message());
    assert_eq!(deliveries_of_event(&producer, &event).await[0].state, DeliveryState::Succeeded as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_listener_resends_its_failures_since_a_time() {
    let receiver = Receiver::start().await;
    receiver.script("/outage", |_, _| Reply::Status(500));
    let server = server_with(|_| {}).await;
    let (producer, _, _) = server.producer("recover").await;
    let hash = derive(&producer, "job.finished").await;
    let listener = listen(&producer, &hash, receiver.url("/outage")).await;
    let before_outage = prost_types::Timestamp::from(std::time::SystemTime::now() - Duration::from_secs(5));
    let mut events = Vec::new();
    for n in 0..5 {
        let event = trigger(&producer, "job.finished", &n.to_string()).await;
        settled(&producer, &event, 1, DeliveryState::Failed).await;
        events.push(event);
    }

    receiver.script("/outage", |_, _| Reply::Status(200));
    let requeued = producer
        .delivery()
        .recover_listener(RecoverListenerRequest {
            listener_id: listener.clone(),
            since: Some(before_outage),
            until: None,
        })
        .await
        .unwrap()
        .into_inner()
        .requeued;
    assert_eq!(requeued, 5);
    // Answered once all are queued again: none is still failed.
    for event in &events {
        let state = deliveries_of_event(&producer, event).await[0].state;
        assert_ne!(state, DeliveryState::Failed as i32, "{event} is still failed after the answer");
    }
    for event in &events {
        settled(&producer, event, 1, DeliveryState::Succeeded).await;
    }
    let later = prost_types::Timestamp::from(std::time::SystemTime::now() + Duration::from_secs(60));
    let none = producer
        .delivery()
        .recover_listener(RecoverListenerRequest { listener_id: listener, since: Some(later), until: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.requeued, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_delivers_an_event_again_to_its_current_listeners() {
    let receiver = Receiver::start().await;
    let server = server_with(|_| {}).await;
    let (producer, _, _) = server.producer("replay").await;
    let hash = derive(&producer, "user.created").await;
    listen(&producer, &hash, receiver.url("/first")).await;
    let event = trigger(&producer, "user.created", "{\"user\": 1}").await;
    settled(&producer, &event, 1, DeliveryState::Succeeded).await;
    listen(&producer, &hash, receiver.url("/second")).await;

    let replayed =
        producer.delivery().replay_event(ReplayEventRequest { event_id: event.clone() }).await.unwrap().into_inner();
    assert_eq!(replayed.created, 2, "one new delivery per current listener");
    assert_eq!(replayed.deliveries.len(), 2);
    receiver
        .wait_until("the replay at both listeners", DEADLINE, |requests| {
            requests.iter().filter(|r| r.path == "/first").count() == 2 && requests.iter().any(|r| r.path == "/second")
        })
        .await;
    assert!(receiver.requests().iter().all(|r| r.webhook_id() == event), "a replay keeps the webhook-id");
    let all = settled(&producer, &event, 3, DeliveryState::Succeeded).await;
    assert_eq!(all.iter().map(|d| d.id.clone()).collect::<HashSet<_>>().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_page_without_loss_or_repeat_while_new_ones_arrive() {
    let server = server_with(|_| {}).await;
    let (producer, _, _) = server.producer("pages").await;
    let (other, _, _) = server.producer("other").await;
    let mut triggered = Vec::new();
    for n in 0..250 {
        let event_type = if n % 5 == 0 { "rare.kind" } else { "common.kind" };
        triggered.push((trigger(&producer, event_type, &n.to_string()).await, event_type));
    }
    trigger(&other, "common.kind", "not yours").await;

    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut arrived_meanwhile = Vec::new();
    loop {
        let request = ListEventsRequest { page_size: 40, page_token: page_token.clone(), ..Default::default() };
        let page = producer.delivery().list_events(request).await.unwrap().into_inner();
        seen.extend(page.events.into_iter().map(|e| e.id));
        // New events arrive while the caller pages.
        if arrived_meanwhile.len() < 3 {
            arrived_meanwhile.push(trigger(&producer, "common.kind", "late").await);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let expected: Vec<String> = triggered.iter().map(|(id, _)| id.clone()).chain(arrived_meanwhile).collect();
    assert_eq!(seen, expected, "oldest first, each once, the other producer's never");

    let rare = producer
        .delivery()
        .list_events(ListEventsRequest { event_type: "rare.kind".into(), page_size: 1000, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    let expected_rare: Vec<String> =
        triggered.iter().filter(|(_, kind)| *kind == "rare.kind").map(|(id, _)| id.clone()).collect();
    assert_eq!(rare.into_iter().map(|e| e.id).collect::<Vec<_>>(), expected_rare);

    let future = prost_types::Timestamp::from(std::time::SystemTime::now() + Duration::from_secs(3600));
    let none = producer
        .delivery()
        .list_events(ListEventsRequest { since: Some(future), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(none.events.is_empty() && none.next_page_token.is_empty());
    let all_time =
        server.admin().await.delivery().list_events(ListEventsRequest { page_size: 1000, ..Default::default() }).await;
    assert_eq!(all_time.unwrap().into_inner().events.len(), seen.len() + 1, "the admin sees every producer's events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_producer_cannot_see_or_touch_what_it_does_not_own() {
    let receiver = Receiver::start().await;
    let server = server_with(|_| {}).await;
    let (owner, _, _) = server.producer("owner").await;
    let (stranger, _, _) = server.producer("stranger").await;
    let hash = derive(&owner, "secret.thing").await;
    let listener = listen(&owner, &hash, receiver.url("/owner")).await;
    let event = trigger(&owner, "secret.thing", "{}").await;
    let delivery = settled(&owner, &event, 1, DeliveryState::Succeeded).await.remove(0);

    let delivery_api = stranger.delivery();
    let codes = [
        delivery_api.clone().get_event(GetEventRequest { event_id: event.clone() }).await.map(|_| ()),
        delivery_api
            .clone()
            .list_deliveries(ListDeliveriesRequest { event_id: event.clone(), ..Default::default() })
            .await
            .map(|_| ()),
        delivery_api
            .clone()
            .list_deliveries(ListDeliveriesRequest { listener_id: listener.clone(), ..Default::default() })
            .await
            .map(|_| ()),
        delivery_api
            .clone()
            .list_attempts(ListAttemptsRequest { delivery_id: delivery.id.clone(), ..Default::default() })
            .await
            .map(|_| ()),
        delivery_api
            .clone()
            .retry_delivery(RetryDeliveryRequest { delivery_id: delivery.id.clone() })
            .await
            .map(|_| ()),
        delivery_api.clone().replay_event(ReplayEventRequest { event_id: event.clone() }).await.map(|_| ()),
        delivery_api
            .clone()
            .recover_listener(RecoverListenerRequest {
                listener_id: listener.clone(),
                since: Some(Default::default()),
                until: None,
            })
            .await
            .map(|_| ()),
    ];
    for (index, answer) in codes.into_iter().enumerate() {
        assert_eq!(answer.unwrap_err().code(), Code::NotFound, "call {index}");
    }
    let theirs = stranger.delivery().list_events(ListEventsRequest::default()).await.unwrap().into_inner();
    assert!(theirs.events.is_empty());
    // A forged page token cannot move a listing into another event's deliveries.
    let stranger_hash = derive(&stranger, "own.thing").await;
    listen(&stranger, &stranger_hash, receiver.url("/stranger")).await;
    let own_event = trigger(&stranger, "own.thing", "{}").await;
    let forged = ListDeliveriesRequest {
        event_id: own_event,
        page_token: base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, "dlv_0"),
        page_size: 1000,
        ..Default::default()
    };
    let listed = stranger.delivery().list_deliveries(forged).await.unwrap().into_inner().deliveries;
    assert!(listed.iter().all(|d| d.id != delivery.id), "another producer's delivery leaked through a forged token");
    // The admin token sees it.
    let admin = server.admin().await;
    admin.delivery().get_event(GetEventRequest { event_id: event }).await.unwrap();
    let anonymous = server.anonymous().await.delivery().list_events(ListEventsRequest::default()).await;
    assert_eq!(anonymous.unwrap_err().code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_the_policy_refuses_are_refused_at_registration_or_failed_for_good_unsent() {
    let receiver = Receiver::start().await;
    let server = server_with(|config| {
        config.pipeline.retry_schedule = "50ms,50ms".parse().unwrap();
        config.pipeline.target_policy.kind = hookd_server::pipeline::PolicyKind::Strict;
    })
    .await;
    let (producer, _, _) = server.producer("ssrf").await;
    let hash = derive(&producer, "probe").await;
    // A literal address the policy refuses is refused at once, in every form, naming the rule.
    let port = receiver.addr.port();
    for (url, rule) in [
        (receiver.url("/literal"), "loopback"),
        (format!("http://[::ffff:127.0.0.1]:{port}/mapped"), "loopback"),
        ("http://169.254.169.254/latest/meta-data".to_owned(), "link-local"),
        ("http://[64:ff9b::a9fe:a9fe]/".to_owned(), "NAT64"),
        ("http://10.0.0.1/".to_owned(), "private"),
    ] {
        let request = RegisterListenerRequest { event_hash: hash.clone(), url: url.clone(), ..Default::default() };
        let refused = producer.register().register_listener(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{url}");
        assert!(
            refused.message().contains(rule) && refused.message().contains("--target-policy strict"),
            "{url}: {refused:?}"
        );
    }
    // UpdateListener checks a new URL the same way.
    let named = listen(&producer, &hash, format!("http://localhost:{port}/named")).await;
    let update = hookd_client::v1::UpdateListenerRequest {
        listener_id: named.clone(),
        url: Some("http://[fe80::1]/".into()),
        ..Default::default()
    };
    assert_eq!(producer.register().update_listener(update).await.unwrap_err().code(), Code::InvalidArgument);
    // A name is checked where it resolves, at the attempt: refused there, the delivery fails
    // for good at once instead of being retried.
    let event = trigger(&producer, "probe", "{}").await;
    let [delivery] = settled(&producer, &event, 1, DeliveryState::Failed).await.try_into().unwrap();
    assert_eq!(delivery.listener_id, named);
    let request = ListAttemptsRequest { delivery_id: delivery.id, ..Default::default() };
    let attempts = producer.delivery().list_attempts(request).await.unwrap().into_inner().attempts;
    assert_eq!(attempts.len(), 1, "a refused target is not retried: {attempts:?}");
    assert!(attempts[0].status_code == 0 && attempts[0].error.starts_with("refused:"), "{attempts:?}");
    assert!(attempts[0].error.contains("loopback"), "{attempts:?}");
    assert!(receiver.requests().is_empty(), "nothing reached the receiver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_events_but_keeps_pending_deliveries() {
    let receiver = Receiver::start().await;
    receiver.script("/stuck", |_, _| Reply::Status(500));
    let server = server_with(|config| {
        config.pipeline.retention = Duration::from_secs(1);
        // The stuck delivery stays pending for the whole test.
        config.pipeline.retry_schedule = "1h".parse().unwrap();
    })
    .await;
    let (producer, _, _) = server.producer("retention").await;
    let hash = derive(&producer, "short.lived").await;
    listen(&producer, &hash, receiver.url("/ok")).await;
    let stuck_hash = derive(&producer, "stuck.kind").await;
    listen(&producer, &stuck_hash, receiver.url("/stuck")).await;
    let old = trigger(&producer, "short.lived", "{}").await;
    settled(&producer, &old, 1, DeliveryState::Succeeded).await;
    let stuck = trigger(&producer, "stuck.kind", "{}").await;
    receiver.wait_until("the stuck delivery's first attempt", DEADLINE, |r| r.iter().any(|r| r.path == "/stuck")).await;

    trimmed(&producer, &old, "the old event trimmed").await;
    assert!(deliveries_of_event(&server.admin().await, &stuck).await.len() == 1, "a pending delivery is kept");
    producer.delivery().get_event(GetEventRequest { event_id: stuck }).await.expect("its event is kept too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_a_failed_delivery_while_a_manual_attempt_of_it_is_pending() {
    let receiver = Receiver::start().await;
    // The three scheduled attempts fail; the manual one hangs until released, then succeeds.
    receiver.script("/down", |_, nth| match nth {
        1..=3 => Reply::Status(500),
        4 => Reply::Hang,
        _ => Reply::Status(200),
    });
    let server = server_with(|config| config.pipeline.retention = Duration::from_secs(1)).await;
    let (producer, _, _) = server.producer("manual").await;
    let hash = derive(&producer, "kept.kind").await;
    listen(&producer, &hash, receiver.url("/down")).await;
    let kept = trigger(&producer, "kept.kind", "{}").await;
    let failed = settled(&producer, &kept, 1, DeliveryState::Failed).await;
    producer.delivery().retry_delivery(RetryDeliveryRequest { delivery_id: failed[0].id.clone() }).await.unwrap();
    receiver.wait_until("the manual attempt under way", DEADLINE, |requests| requests.len() == 4).await;

    // An event after it that nobody listens to: once that is trimmed, a sweep went past.
    let later = trigger(&producer, "nobody.listens", "{}").await;
    trimmed(&producer, &later, "a sweep past the failed delivery").await;
    producer.delivery().get_event(GetEventRequest { event_id: kept.clone() }).await.expect("its event is kept");
    let deliveries = deliveries_of_event(&producer, &kept).await;
    assert_eq!(deliveries.len(), 1, "and its delivery");
    let request = ListAttemptsRequest { delivery_id: deliveries[0].id.clone(), ..Default::default() };
    let attempts = producer.delivery().list_attempts(request).await.unwrap().into_inner().attempts;
    assert_eq!(attempts.len(), 3, "and the attempts made so far: {attempts:?}");
    // Once the manual attempt is done, nothing holds the event any longer.
    receiver.release();
    trimmed(&producer, &kept, "the event trimmed once the manual attempt is done").await;
    assert_eq!(receiver.requests().iter().filter(|r| r.path == "/down").count(), 4, "the manual attempt was made once");
}

/// Total size of the files under `dir`.
fn dir_size(dir: &std::path::Path) -> u64 {
    crate::support::files_under(dir).iter().map(|file| std::fs::metadata(file).map_or(0, |m| m.len())).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_short_retention_the_data_directory_stops_growing_under_steady_load() {
    const ROUNDS: usize = 24;
    const PER_ROUND: usize = 200;
    let receiver = Receiver::start().await;
    let server = server_with(|config| config.pipeline.retention = Duration::from_secs(1)).await;
    let (producer, _, _) = server.producer("steady").await;
    let hash = derive(&producer, "tick").await;
    listen(&producer, &hash, receiver.url("/sink")).await;
    let payload = "x".repeat(8 * 1024);
    let mut sizes = Vec::new();
    let mut first_of_round = Vec::new();
    for round in 0..ROUNDS {
        let mut ids = Vec::new();
        for _ in 0..PER_ROUND {
            ids.push(trigger(&producer, "tick", &payload).await);
        }
        first_of_round.push(ids[0].clone());
        // Steady state: the round before last has been trimmed by now.
        if round >= 2 {
            let old = first_of_round[round - 2].clone();
            trimmed(&producer, &old, "an older round trimmed").await;
        }
        sizes.push(dir_size(server.data_dir()));
    }
    // Over the last third of the run the directory grows by a part of what was written
    // meanwhile (sled reuses freed space lazily, by segment, so the part varies: 8 to 45 %
    // here); without retention it grows by all of it and more (about 175 % here).
    let window = ROUNDS / 3;
    let written = (window * PER_ROUND * payload.len()) as u64;
    let growth = sizes[ROUNDS - 1].saturating_sub(sizes[ROUNDS - 1 - window]);
    assert!(
        growth < written * 80 / 100,
        "the data directory kept growing: +{growth} bytes while {written} payload bytes were written; sizes {sizes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_attempts_still_to_come_are_listed_as_pending() {
    const EVENTS: usize = 5;
    let receiver = Receiver::start().await;
    receiver.script("/busy", |_, _| Reply::Hang);
    // One request at a time: the first event's attempt hangs, the others wait their turn in
    // memory, written nowhere yet.
    let server = server_with(|config| {
        config.pipeline.listener_in_flight = 1;
        config.pipeline.attempt_timeout = DEADLINE * 2;
    })
    .await;
    let (producer, _, _) = server.producer("waiting").await;
    let hash = derive(&producer, "queued").await;
    let listener = listen(&producer, &hash, receiver.url("/busy")).await;
    let mut events = Vec::new();
    for n in 0..EVENTS {
        events.push(trigger(&producer, "queued", &n.to_string()).await);
    }
    receiver.wait_until("the first attempt hanging", DEADLINE, |requests| !requests.is_empty()).await;

    let by_listener = ListDeliveriesRequest { listener_id: listener.clone(), page_size: 2, ..Default::default() };
    let mut listed = Vec::new();
    let mut request = by_listener.clone();
    loop {
        let page = producer.delivery().list_deliveries(request.clone()).await.unwrap().into_inner();
        listed.extend(page.deliveries);
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    let listed_events: Vec<&str> = listed.iter().map(|d| d.event_id.as_str()).collect();
    assert_eq!(listed_events, events.iter().map(String::as_str).collect::<Vec<_>>(), "one per event, in order");
    assert!(listed.iter().all(|d| d.state == DeliveryState::Pending as i32 && d.attempts == 0), "{listed:?}");
    let pending_only = ListDeliveriesRequest { state: DeliveryState::Pending as i32, ..by_listener.clone() };
    assert!(!producer.delivery().list_deliveries(pending_only).await.unwrap().into_inner().deliveries.is_empty());
    let failed_only = ListDeliveriesRequest { state: DeliveryState::Failed as i32, ..by_listener };
    assert!(producer.delivery().list_deliveries(failed_only).await.unwrap().into_inner().deliveries.is_empty());

    let waiting = deliveries_of_event(&producer, &events[EVENTS - 1]).await;
    assert_eq!(waiting.len(), 1);
    assert_eq!((waiting[0].state, waiting[0].attempts), (DeliveryState::Pending as i32, 0));
    assert_eq!(waiting[0].id, listed[EVENTS - 1].id, "the same delivery, however it is listed");
    let attempts = producer
        .delivery()
        .list_attempts(ListAttemptsRequest { delivery_id: waiting[0].id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .attempts;
    assert!(attempts.is_empty());
    let refused = producer.delivery().retry_delivery(RetryDeliveryRequest { delivery_id: waiting[0].id.clone() }).await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("first attempt"), "{refused:?}");
    // Another producer sees none of it.
    let (stranger, _, _) = server.producer("stranger").await;
    let peek = stranger
        .delivery()
        .list_attempts(ListAttemptsRequest { delivery_id: waiting[0].id.clone(), ..Default::default() })
        .await;
    assert_eq!(peek.unwrap_err().code(), Code::NotFound);

    // Once answered, each is recorded and the listings say so.
    receiver.script("/busy", |_, _| Reply::Status(200));
    receiver.release();
    for event in &events {
        settled(&producer, event, 1, DeliveryState::Succeeded).await;
    }
}
