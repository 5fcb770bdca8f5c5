//! Durability across restarts: a clean restart keeps everything, kill -9 loses no
//! acknowledged event, and a wrong master key is refused at startup.

use std::sync::Arc;

use hookd_client::Client;
use hookd_client::v1::{
    CreateProducerRequest, GetProducerRequest, ListListenersRequest, RegisterListenerRequest, TriggerRequest,
};
use hookd_server::store::StoreError;

use crate::support::{ADMIN_TOKEN, HookdProcess, TestServer, bounded, derive, listener_request, master_key};

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
    let first = producer.trigger().trigger(keyed("inv-1")).await.unwrap().into_inner();
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
    let again = producer.trigger().trigger(keyed("inv-1")).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(again.event_id, first.event_id);
    let next = producer.trigger().trigger(keyed("inv-2")).await.unwrap().into_inner();
    assert!(next.event_id > first.event_id, "the event log continues in order");
}

#[tokio::test]
async fn a_wrong_master_key_is_refused_at_startup() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let server = TestServer::start_with(dir.clone(), &master_key(), |_| {}).await;
    server.producer("someone").await;
    server.stop().await.unwrap();

    let refused = TestServer::start_with(dir, &master_key(), |_| {}).await.stop().await;
    assert!(matches!(refused, Err(hookd_server::RunError::Store(StoreError::WrongMasterKey { .. }))), "{refused:?}");
}

#[tokio::test]
async fn the_binary_refuses_a_wrong_master_key_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let right = master_key();
    let hookd = HookdProcess::start(dir.path(), &[("HOOKD_MASTER_KEY", &right)]).await.unwrap();
    assert!(hookd.terminate().await.success());

    let wrong = master_key();
    let failure = HookdProcess::start(dir.path(), &[("HOOKD_MASTER_KEY", &wrong)]).await.err().expect("refused");
    assert!(!failure.status.success());
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
async fn kill_9_loses_no_acknowledged_trigger() {
    const TRIGGERS: usize = 300;
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

    // Many triggers in flight at once share group commits; each ack means durable.
    let mut in_flight = tokio::task::JoinSet::new();
    for i in 0..TRIGGERS {
        let producer = producer.clone();
        in_flight.spawn(async move {
            let key = format!("k-{i}");
            let ack = producer.trigger().trigger(keyed(&key)).await.unwrap().into_inner();
            (key, ack.event_id)
        });
    }
    let mut acked = Vec::new();
    while let Some(done) = bounded("triggers", in_flight.join_next()).await {
        acked.push(done.unwrap());
    }
    hookd.kill9().await;

    let hookd = HookdProcess::start(dir.path(), &env).await.unwrap();
    let producer = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(&api_key).unwrap();
    for (key, event_id) in acked {
        let again = producer.trigger().trigger(keyed(&key)).await.unwrap().into_inner();
        assert!(again.duplicate, "acknowledged trigger {key} was lost by kill -9");
        assert_eq!(again.event_id, event_id);
    }
    hookd.kill9().await;
}
