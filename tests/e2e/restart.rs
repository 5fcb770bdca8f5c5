//! Durability across restarts: a clean restart keeps everything, kill -9 loses no
//! acknowledged event, and a wrong master key is refused at startup.

use std::sync::Arc;

use hookd_client::Client;
use hookd_client::v1::{
    CreateProducerRequest, GetProducerRequest, ListListenersRequest, RegisterListenerRequest, TriggerRequest,
};
use hookd_server::store::{SledStore, Store, StoreError};

use crate::receiver::{Receiver, Reply};
use crate::support::{
    ADMIN_TOKEN, DEADLINE, HookdProcess, TestServer, bounded, derive, eventually, listener_request, master_key,
};

fn keyed(key: &str) -> TriggerRequest {
    TriggerRequest {
        event_type: "invoice.created".into(),
        payload: format!("{{\"key\":\"{key}\"}}").into_bytes(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_restart_on_the_same_data_directory_keeps_everything() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let key = master_key();
    let server = TestServer::start_with(dir.clone(), &key, |_| {}).await;
    let (producer, producer_id, api_key) = server.producer("durable").await;
    let hash = derive(&producer, "invoice.created").await;
    let listener = producer
        .register()
        .register_listener(RegisterListenerRequest {
            generate_secret: true,
            ..listener_request(&hash, "http://127.0.0.1:9/hook")
        })
        .await
        .unwrap()
        .into_inner()
        .listener
        .unwrap();
    let first = producer.trigger_service().trigger(keyed("inv-1")).await.unwrap().into_inner();
    server.stop().await.unwrap();

    let server = TestServer::start_with(dir, &key, |_| {}).await;
    let producer = server.anonymous().await.with_api_key(&api_key).unwrap();
    let fetched =
        server.admin().await.admin().get_producer(GetProducerRequest { producer_id }).await.unwrap().into_inner();
    assert_eq!(fetched.name, "durable");
    assert_eq!(derive(&producer, "invoice.created").await, hash);
    let listed = producer
        .register()
        .list_listeners(ListListenersRequest { event_hash: hash, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .listeners;
    assert_eq!(listed, vec![listener]);
    // The event is still there: its idempotency key still points at it.
    let again = producer.trigger_service().trigger(keyed("inv-1")).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(again.event_id, first.event_id);
    let next = producer.trigger_service().trigger(keyed("inv-2")).await.unwrap().into_inner();
    assert!(next.event_id > first.event_id, "the event log continues in order");
}

#[tokio::test]
async fn a_wrong_master_key_is_refused_at_startup() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let server = TestServer::start_with(dir.clone(), &master_key(), |_| {}).await;
    server.producer("someone").await;
    server.stop().await.unwrap();

    let refused = TestServer::start_with(dir, &master_key(), |_| {}).await.stop().await;
    assert!(
        matches!(
            refused,
            Err(hookd_server::RunError::Keys(hookd_server::rekey::RekeyError::Store(
                StoreError::WrongMasterKey { .. }
            )))
        ),
        "{refused:?}"
    );
}

#[tokio::test]
async fn the_binary_refuses_a_wrong_master_key_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let right = master_key();
    let hookd = HookdProcess::start(dir.path(), &[("HOOKD_MASTER_KEY", &right)]).await.unwrap();
    assert!(hookd.terminate().await.success());

    let wrong = master_key();
    let failure = HookdProcess::start(dir.path(), &[("HOOKD_MASTER_KEY", &wrong)]).await.err().expect("refused");
    assert_eq!(failure.status.code(), Some(2), "a wrong master key is a configuration error");
    let log = failure.log.join("\n");
    assert!(log.contains("master key does not match"), "{log}");

    // With the right key it starts again.
    let hookd = HookdProcess::start(dir.path(), &[("HOOKD_MASTER_KEY", &right)]).await.unwrap();
    assert!(hookd.terminate().await.success());
}

#[tokio::test]
async fn the_binary_starts_with_no_configuration_and_says_what_it_generated() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hookd-data");
    let hookd = HookdProcess::start(&data, &[]).await.unwrap();
    let log = hookd.log_text();
    assert!(log.contains("dev-admin-token") && log.contains("dev-master-key"), "{log}");
    assert!(log.contains("development only"), "{log}");
    let token = std::fs::read_to_string(data.join("dev-admin-token")).unwrap();
    let admin = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(token.trim()).unwrap();
    admin.admin().create_producer(CreateProducerRequest { name: "dev".into() }).await.unwrap();
    assert!(hookd.terminate().await.success());
}

#[tokio::test]
async fn invalid_configuration_exits_non_zero_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let failure = HookdProcess::start(dir.path(), &[("HOOKD_MASTER_KEY", "not-a-key")]).await.err().expect("refused");
    assert_eq!(failure.status.code(), Some(2));
    assert!(failure.log.join("\n").contains("HOOKD_MASTER_KEY"), "{:?}", failure.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_triggers_in_flight_loses_no_acknowledged_one() {
    const WRITERS: usize = 16;
    const KILL_AFTER: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let key = master_key();
    let env = [("HOOKD_MASTER_KEY", key.as_str()), ("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN)];
    let hookd = HookdProcess::start(dir.path(), &env).await.unwrap();
    let admin = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(ADMIN_TOKEN).unwrap();
    let api_key = admin
        .admin()
        .create_producer(CreateProducerRequest { name: "crashy".into() })
        .await
        .unwrap()
        .into_inner()
        .api_key;
    let producer = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(&api_key).unwrap();

    // Writers trigger without pause, many in flight sharing group commits; the kill lands
    // while they are still going. Every ack that came back must survive it.
    let (acks_tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let (producer, acks_tx) = (producer.clone(), acks_tx.clone());
        writers.spawn(async move {
            for n in 0.. {
                let key = format!("w{writer}-{n}");
                match producer.trigger_service().trigger(keyed(&key)).await {
                    Ok(ack) => {
                        let _ = acks_tx.send((key, ack.into_inner().event_id));
                    }
                    // The server died under this call: nothing was acknowledged.
                    Err(_) => return,
                }
            }
        });
    }
    drop(acks_tx);
    let mut acked = Vec::new();
    while acked.len() < KILL_AFTER {
        acked.push(bounded("acks", acks.recv()).await.expect("writers keep acking"));
    }
    hookd.kill9().await;
    while let Some(done) = bounded("writers stop", writers.join_next()).await {
        done.unwrap();
    }
    // Acks that arrived between the count and the kill are acknowledged too.
    while let Ok(late) = acks.try_recv() {
        acked.push(late);
    }

    let hookd = HookdProcess::start(dir.path(), &env).await.unwrap();
    let producer = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(&api_key).unwrap();
    for (key, event_id) in acked {
        let again = producer.trigger_service().trigger(keyed(&key)).await.unwrap().into_inner();
        assert!(again.duplicate, "acknowledged trigger {key} was lost by kill -9");
        assert_eq!(again.event_id, event_id);
    }
    hookd.kill9().await;
}

/// Backup and restore as README describes them: stop hookd, copy its data directory, start
/// a hookd on the copy elsewhere with the same master key: every event and listener is there,
/// and the copy delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_stopped_data_directory_starts_elsewhere_with_everything() {
    let receiver = crate::receiver::Receiver::start().await;
    let first = tempfile::tempdir().unwrap();
    let key = master_key();
    let env = [("HOOKD_MASTER_KEY", key.as_str()), ("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN)];
    let hookd = HookdProcess::start(first.path(), &env).await.unwrap();
    let admin = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(ADMIN_TOKEN).unwrap();
    let created =
        admin.admin().create_producer(CreateProducerRequest { name: "backed-up".into() }).await.unwrap().into_inner();
    let producer = admin.clone().with_api_key(&created.api_key).unwrap();
    let hash = derive(&producer, "invoice.created").await;
    let listener = producer
        .register()
        .register_listener(RegisterListenerRequest {
            generate_secret: true,
            ..listener_request(&hash, &receiver.url("/restored"))
        })
        .await
        .unwrap()
        .into_inner()
        .listener
        .unwrap();
    let mut events = Vec::new();
    for n in 0..20 {
        events
            .push(producer.trigger_service().trigger(keyed(&format!("inv-{n}"))).await.unwrap().into_inner().event_id);
    }
    assert!(hookd.terminate().await.success(), "a graceful stop");

    let elsewhere = tempfile::tempdir().unwrap();
    let copy = elsewhere.path().join("data");
    assert!(std::process::Command::new("cp").arg("-a").arg(first.path()).arg(&copy).status().unwrap().success());
    drop(first);
    let hookd = HookdProcess::start(&copy, &env).await.unwrap();
    let admin = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(ADMIN_TOKEN).unwrap();
    let producer = admin.clone().with_api_key(&created.api_key).unwrap();
    let listed = producer
        .register()
        .list_listeners(ListListenersRequest { event_hash: hash, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .listeners;
    assert_eq!(listed, vec![listener]);
    for event_id in &events {
        let event = admin.delivery().get_event(hookd_client::v1::GetEventRequest { event_id: event_id.clone() }).await;
        assert!(event.is_ok(), "{event_id} is in the copy");
    }
    // The keys' idempotency records came along too.
    let again = producer.trigger_service().trigger(keyed("inv-0")).await.unwrap().into_inner();
    assert!(again.duplicate);
    // Every event reaches the listener, from the original or from the copy.
    receiver
        .wait_until("every event delivered", crate::support::DEADLINE, |requests| {
            let ids: std::collections::HashSet<&str> = requests.iter().map(|r| r.webhook_id()).collect();
            events.iter().all(|event| ids.contains(event.as_str()))
        })
        .await;
}

// Regression: a listener deleted just before hookd stopped (or was killed) kept no record of
// what it was owed, so the deliveries the pipeline had not reached were listed nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_listeners_owed_deliveries_are_cancelled_after_a_restart() {
    const EVENTS: usize = 20;
    let receiver = Receiver::start().await;
    receiver.script("/", |_, _| Reply::Hang);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let key = master_key();
    let adjust = |config: &mut hookd_server::config::Config| {
        config.pipeline.attempt_timeout = std::time::Duration::from_secs(2);
        config.pipeline.retry_schedule = "200ms".parse().unwrap();
    };
    let server = TestServer::start_with(dir.clone(), &key, adjust).await;
    let (producer, _, _) = server.producer("leaver").await;
    let hash = derive(&producer, "invoice.created").await;
    let request = listener_request(&hash, &receiver.url("/leaver"));
    let listener_id = producer.register().register_listener(request).await.unwrap().into_inner().listener.unwrap().id;
    for n in 0..EVENTS {
        producer.trigger_service().trigger(keyed(&format!("inv-{n}"))).await.unwrap();
    }
    // Its first request hangs; the rest wait behind it, written nowhere.
    receiver.wait_until("the first request", DEADLINE, |requests| !requests.is_empty()).await;
    server.stop().await.unwrap();
    // Deleted while the pipeline cannot hear of it, as a crash right after the deletion leaves it.
    let store = SledStore::open(dir.path()).unwrap();
    store.delete_listener(&listener_id).await.unwrap().expect("it was there");
    store.close().unwrap();
    drop(store);

    let server = TestServer::start_with(dir, &key, adjust).await;
    let admin = server.admin().await;
    eventually("every delivery of the deleted listener cancelled", || {
        let (admin, listener_id) = (admin.clone(), listener_id.clone());
        async move {
            let request = hookd_client::v1::ListDeliveriesRequest { listener_id, ..Default::default() };
            let deliveries = admin.delivery().list_deliveries(request).await.unwrap().into_inner().deliveries;
            let cancelled = hookd_client::v1::DeliveryState::Cancelled as i32;
            (deliveries.len() == EVENTS && deliveries.iter().all(|d| d.state == cancelled)).then_some(())
        }
    })
    .await;
}
