//! Listeners: any number per event, validation, ownership, secrets never returned.

use std::collections::HashSet;

use hookd_client::v1::{
    DeleteListenerRequest, GetListenerRequest, ListListenersRequest, RegisterListenerRequest, ReplayEventRequest,
    RotateListenerSecretRequest, UpdateListenerRequest,
};
use tonic::Code;

use crate::support::{TestServer, bounded, derive, listener_request, trigger_request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_listeners_on_one_event() {
    const LISTENERS: usize = 10_000;
    const WORKERS: usize = 32;
    let server = TestServer::start().await;
    let (producer, _, _) = server.producer("fanout").await;
    let hash = derive(&producer, "order.placed").await;

    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let producer = producer.clone();
        let hash = hash.clone();
        workers.spawn(async move {
            let mut ids = Vec::new();
            for i in (worker..LISTENERS).step_by(WORKERS) {
                let url = format!("http://127.0.0.1:9/hook/{i}");
                let created =
                    producer.register().register_listener(listener_request(&hash, &url)).await.unwrap().into_inner();
                ids.push(created.listener.unwrap().id);
            }
            ids
        });
    }
    let mut registered = HashSet::new();
    while let Some(ids) = bounded("registering listeners", workers.join_next()).await {
        registered.extend(ids.unwrap());
    }
    assert_eq!(registered.len(), LISTENERS);

    let mut listed = HashSet::new();
    let mut page_token = String::new();
    loop {
        let page = producer
            .register()
            .list_listeners(ListListenersRequest { event_hash: hash.clone(), page_size: 1000, page_token })
            .await
            .unwrap()
            .into_inner();
        for listener in page.listeners {
            assert!(listed.insert(listener.id), "a listener was listed twice");
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(listed, registered);

    // Triggering an event with 10,000 listeners is still just one durable append.
    let ack = producer.trigger_service().trigger(trigger_request("order.placed", b"{}")).await.unwrap().into_inner();
    assert!(ack.event_id.starts_with("evt_"));

    // Replaying it makes 10,000 deliveries; the answer counts them and carries the first
    // 1,000, so it stays far below the client's message limit.
    let replayed = producer
        .delivery()
        .replay_event(ReplayEventRequest { event_id: ack.event_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.created, LISTENERS as u64);
    assert_eq!(replayed.deliveries.len(), 1_000);
    let answered: HashSet<&str> = replayed.deliveries.iter().map(|d| d.listener_id.as_str()).collect();
    assert_eq!(answered.len(), 1_000, "one per listener");
    assert!(answered.iter().all(|id| registered.contains(*id)));
}

#[tokio::test]
async fn registration_checks_its_input_and_ownership() {
    let server = TestServer::start().await;
    let (producer, _, _) = server.producer("owner").await;
    let (other, _, _) = server.producer("other").await;
    let hash = derive(&producer, "thing.done").await;
    let other_hash = derive(&other, "thing.done").await;
    assert_ne!(hash, other_hash, "hashes are per producer");

    let register = |request: RegisterListenerRequest| {
        let producer = producer.clone();
        async move { producer.register().register_listener(request).await.unwrap_err().code() }
    };
    assert_eq!(register(listener_request("evh_unknown", "http://127.0.0.1:9/")).await, Code::NotFound);
    assert_eq!(register(listener_request(&other_hash, "http://127.0.0.1:9/")).await, Code::NotFound);
    assert_eq!(register(listener_request(&hash, "ftp://127.0.0.1/")).await, Code::InvalidArgument);
    assert_eq!(register(listener_request(&hash, "http://user:pw@127.0.0.1/")).await, Code::InvalidArgument);
    let long_url = format!("http://127.0.0.1/{}", "a".repeat(2048));
    assert_eq!(register(listener_request(&hash, &long_url)).await, Code::InvalidArgument);
    let both = RegisterListenerRequest {
        secret: Some("a-secret-value".into()),
        generate_secret: true,
        ..listener_request(&hash, "http://127.0.0.1:9/")
    };
    assert_eq!(register(both).await, Code::InvalidArgument);
    let short =
        RegisterListenerRequest { secret: Some("short".into()), ..listener_request(&hash, "http://127.0.0.1:9/") };
    assert_eq!(register(short).await, Code::InvalidArgument);

    let bad_type = producer
        .register()
        .derive_event_hash(hookd_client::v1::DeriveEventHashRequest { event_type: "has spaces".into() })
        .await
        .unwrap_err();
    assert_eq!(bad_type.code(), Code::InvalidArgument);

    // Another producer's listener does not exist as far as this caller can tell.
    let theirs = other
        .register()
        .register_listener(listener_request(&other_hash, "http://127.0.0.1:9/"))
        .await
        .unwrap()
        .into_inner()
        .listener
        .unwrap();
    let hidden = producer.register().get_listener(GetListenerRequest { listener_id: theirs.id.clone() }).await;
    assert_eq!(hidden.unwrap_err().code(), Code::NotFound);
    let hidden = producer.register().delete_listener(DeleteListenerRequest { listener_id: theirs.id }).await;
    assert_eq!(hidden.unwrap_err().code(), Code::NotFound);
    let hidden =
        producer.register().list_listeners(ListListenersRequest { event_hash: other_hash, ..Default::default() }).await;
    assert_eq!(hidden.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn a_listener_is_registered_updated_rotated_and_deleted() {
    let server = TestServer::start().await;
    let (producer, _, _) = server.producer("lifecycle").await;
    let hash = derive(&producer, "user.signed_up").await;

    let created = producer
        .register()
        .register_listener(RegisterListenerRequest {
            generate_secret: true,
            description: "crm sync".into(),
            ordered: true,
            ..listener_request(&hash, "https://127.0.0.1:8443/hooks")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.secret.starts_with("whsec_"), "a generated secret is shown once");
    let listener = created.listener.unwrap();
    assert!(listener.has_secret && listener.enabled && listener.ordered);
    assert_eq!(listener.event_type, "user.signed_up");
    assert_eq!(listener.description, "crm sync");

    let unsigned = producer
        .register()
        .register_listener(listener_request(&hash, "http://127.0.0.1:9/plain"))
        .await
        .unwrap()
        .into_inner();
    assert!(unsigned.secret.is_empty());
    assert!(!unsigned.listener.unwrap().has_secret);

    let updated = producer
        .register()
        .update_listener(UpdateListenerRequest {
            listener_id: listener.id.clone(),
            url: Some("https://127.0.0.1:8443/v2".into()),
            enabled: Some(false),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.url, "https://127.0.0.1:8443/v2");
    assert!(!updated.enabled);
    assert!(!updated.disabled_reason.is_empty());
    assert_eq!(updated.description, "crm sync", "unset fields are kept");
    let bad_update = producer
        .register()
        .update_listener(UpdateListenerRequest {
            listener_id: listener.id.clone(),
            url: Some("gopher://x".into()),
            ..Default::default()
        })
        .await;
    assert_eq!(bad_update.unwrap_err().code(), Code::InvalidArgument);

    let rotated = producer
        .register()
        .rotate_listener_secret(RotateListenerSecretRequest {
            listener_id: listener.id.clone(),
            generate_secret: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(rotated.secret.starts_with("whsec_"));
    assert_ne!(rotated.secret, created.secret);
    let neither = producer
        .register()
        .rotate_listener_secret(RotateListenerSecretRequest { listener_id: listener.id.clone(), ..Default::default() })
        .await;
    assert_eq!(neither.unwrap_err().code(), Code::InvalidArgument);

    producer.register().delete_listener(DeleteListenerRequest { listener_id: listener.id.clone() }).await.unwrap();
    let gone = producer.register().get_listener(GetListenerRequest { listener_id: listener.id }).await;
    assert_eq!(gone.unwrap_err().code(), Code::NotFound);
    let remaining =
        producer.register().list_listeners(ListListenersRequest::default()).await.unwrap().into_inner().listeners;
    assert_eq!(remaining.len(), 1, "only the unsigned listener is left");
}
