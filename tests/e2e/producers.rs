//! Producers: disable at once, rotate keys without losing listeners, admin-only access.

use hookd_client::v1::{
    DeriveEventHashRequest, GetListenerRequest, GetProducerRequest, ListListenersRequest, ListProducersRequest,
    RotateProducerKeyRequest, SetProducerEnabledRequest,
};
use tonic::Code;

use crate::support::{TestServer, derive, listener_request, trigger_request};

#[tokio::test]
async fn a_disabled_producer_is_refused_at_once_and_can_be_re_enabled() {
    let server = TestServer::start().await;
    let (producer, producer_id, _) = server.producer("billing").await;
    let hash = derive(&producer, "invoice.paid").await;
    producer.trigger_service().trigger(trigger_request("invoice.paid", b"{}")).await.unwrap();

    let disabled = server
        .admin()
        .await
        .admin()
        .set_producer_enabled(SetProducerEnabledRequest {
            producer_id: producer_id.clone(),
            enabled: false,
            reason: "key leaked in a CI log".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!disabled.enabled);
    assert_eq!(disabled.disabled_reason, "key leaked in a CI log");

    // From the moment the call returned: triggers and every other producer call are refused.
    let refused = producer.trigger_service().trigger(trigger_request("invoice.paid", b"{}")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("key leaked"), "{}", refused.message());
    let refused = producer.register().register_listener(listener_request(&hash, "http://127.0.0.1:9/x")).await;
    assert_eq!(refused.unwrap_err().code(), Code::PermissionDenied);
    let refused =
        producer.register().derive_event_hash(DeriveEventHashRequest { event_type: "invoice.paid".into() }).await;
    assert_eq!(refused.unwrap_err().code(), Code::PermissionDenied);
    let refused = producer.register().list_listeners(ListListenersRequest::default()).await;
    assert_eq!(refused.unwrap_err().code(), Code::PermissionDenied);
    let refused = producer.register().get_listener(GetListenerRequest { listener_id: "lst_x".into() }).await;
    assert_eq!(refused.unwrap_err().code(), Code::PermissionDenied);

    server
        .admin()
        .await
        .admin()
        .set_producer_enabled(SetProducerEnabledRequest {
            producer_id: producer_id.clone(),
            enabled: true,
            reason: String::new(),
        })
        .await
        .unwrap();
    producer.trigger_service().trigger(trigger_request("invoice.paid", b"{}")).await.unwrap();
    let fetched =
        server.admin().await.admin().get_producer(GetProducerRequest { producer_id }).await.unwrap().into_inner();
    assert!(fetched.enabled);
    assert_eq!(fetched.disabled_reason, "");
}

#[tokio::test]
async fn key_rotation_stops_the_old_key_and_keeps_hashes_and_listeners() {
    let server = TestServer::start().await;
    let (producer, producer_id, old_key) = server.producer("projects").await;
    let hash = derive(&producer, "project.created").await;
    let mut listener_ids = Vec::new();
    for port in 1..=3 {
        let url = format!("http://127.0.0.1:{port}/hook");
        let created = producer.register().register_listener(listener_request(&hash, &url)).await.unwrap().into_inner();
        listener_ids.push(created.listener.unwrap().id);
    }

    let new_key = server
        .admin()
        .await
        .admin()
        .rotate_producer_key(RotateProducerKeyRequest { producer_id, grace_seconds: 0 })
        .await
        .unwrap()
        .into_inner()
        .api_key;
    assert_ne!(new_key, old_key);

    let stale = producer.trigger_service().trigger(trigger_request("project.created", b"{}")).await.unwrap_err();
    assert_eq!(stale.code(), Code::Unauthenticated);

    let rotated = server.anonymous().await.with_api_key(&new_key).unwrap();
    assert_eq!(derive(&rotated, "project.created").await, hash, "a rotation changes no event hash");
    let listed = rotated
        .register()
        .list_listeners(ListListenersRequest { event_hash: hash.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut listed_ids: Vec<_> = listed.listeners.iter().map(|l| l.id.clone()).collect();
    listed_ids.sort();
    listener_ids.sort();
    assert_eq!(listed_ids, listener_ids);
    rotated.register().get_listener(GetListenerRequest { listener_id: listener_ids[0].clone() }).await.unwrap();
    rotated.trigger_service().trigger(trigger_request("project.created", b"{}")).await.unwrap();
}

#[tokio::test]
async fn key_rotation_with_grace_keeps_both_keys_working() {
    let server = TestServer::start().await;
    let (producer, producer_id, _) = server.producer("graceful").await;
    let new_key = server
        .admin()
        .await
        .admin()
        .rotate_producer_key(RotateProducerKeyRequest { producer_id: producer_id.clone(), grace_seconds: 3600 })
        .await
        .unwrap()
        .into_inner()
        .api_key;
    producer.trigger_service().trigger(trigger_request("a.b", b"1")).await.expect("old key works during its grace");
    let rotated = server.anonymous().await.with_api_key(&new_key).unwrap();
    rotated.trigger_service().trigger(trigger_request("a.b", b"2")).await.unwrap();

    let too_long = server
        .admin()
        .await
        .admin()
        .rotate_producer_key(RotateProducerKeyRequest { producer_id, grace_seconds: 31 * 24 * 3600 })
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn admin_calls_need_the_admin_token() {
    let server = TestServer::start().await;
    let (producer, producer_id, _) = server.producer("someone").await;
    let request = || GetProducerRequest { producer_id: producer_id.clone() };

    let anonymous = server.anonymous().await.admin().get_producer(request()).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let with_producer_key = producer.admin().get_producer(request()).await.unwrap_err();
    assert_eq!(with_producer_key.code(), Code::Unauthenticated);
    let wrong = server.anonymous().await.with_api_key("not-the-admin-token").unwrap();
    assert_eq!(wrong.admin().get_producer(request()).await.unwrap_err().code(), Code::Unauthenticated);

    let unknown = server
        .admin()
        .await
        .admin()
        .get_producer(GetProducerRequest { producer_id: "prd_00000000000000000000000000000000".into() })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

// Regression: the admin token on a producer call answered "unknown or expired API key".
#[tokio::test]
async fn the_admin_token_on_a_producer_call_is_told_it_needs_a_producer_key() {
    let server = TestServer::start().await;
    let admin = server.admin().await;
    let derive = admin.register().derive_event_hash(DeriveEventHashRequest { event_type: "a.b".into() }).await;
    let refused = derive.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("needs a producer API key"), "{refused:?}");
    let trigger = admin.trigger_service().trigger(trigger_request("a.b", b"{}")).await;
    assert!(trigger.unwrap_err().message().contains("needs a producer API key"));
    let wrong = server.anonymous().await.with_api_key("not-a-key-at-all").unwrap();
    let unknown = wrong.register().derive_event_hash(DeriveEventHashRequest { event_type: "a.b".into() }).await;
    assert_eq!(unknown.unwrap_err().message(), "unknown or expired API key");
}

#[tokio::test]
async fn producers_are_listed_in_pages_without_loss_or_repeat() {
    let server = TestServer::start().await;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(server.producer(&format!("p{i}")).await.1);
    }
    let admin = server.admin().await;
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .admin()
            .list_producers(ListProducersRequest { page_size: 2, page_token: page_token.clone() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.producers.len() <= 2);
        seen.extend(page.producers.into_iter().map(|p| p.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    // Ids sort by creation time to the millisecond; within one millisecond, by their random part.
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "pages come in id order");
    created.sort();
    assert_eq!(seen, created);

    let too_big = admin.admin().list_producers(ListProducersRequest { page_size: 5000, ..Default::default() }).await;
    assert_eq!(too_big.unwrap_err().code(), Code::InvalidArgument);
    let bad_token =
        admin.admin().list_producers(ListProducersRequest { page_token: "***".into(), ..Default::default() }).await;
    assert_eq!(bad_token.unwrap_err().code(), Code::InvalidArgument);
}
