//! Trigger intake: validation, limits, idempotency, and RPCs not built yet.

use std::sync::Arc;

use hookd_client::v1::TriggerRequest;
use tonic::Code;

use crate::support::{TestServer, master_key, trigger_request};

#[tokio::test]
async fn triggers_are_validated_and_limited() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let server = TestServer::start_with(dir, &master_key(), |config| config.max_payload_bytes = 1024).await;
    let (producer, _, _) = server.producer("intake").await;
    let trigger = |request: TriggerRequest| {
        let producer = producer.clone();
        async move { producer.trigger_service().trigger(request).await }
    };

    let ack = trigger(trigger_request("ok.type", &[b'x'; 1024])).await.unwrap().into_inner();
    assert!(ack.event_id.starts_with("evt_") && !ack.duplicate);

    let too_big = trigger(trigger_request("ok.type", &[b'x'; 1025])).await.unwrap_err();
    assert_eq!(too_big.code(), Code::ResourceExhausted);
    assert!(too_big.message().contains("1024"), "{}", too_big.message());
    // Far over the limit, the transport refuses the message before hookd reads it: the
    // caller still gets RESOURCE_EXHAUSTED, not the transport's OUT_OF_RANGE.
    let far_too_big = trigger(trigger_request("ok.type", &vec![b'x'; 256 * 1024])).await.unwrap_err();
    assert_eq!(far_too_big.code(), Code::ResourceExhausted, "{far_too_big:?}");

    for bad_type in ["", "white space", &"t".repeat(129)] {
        let refused = trigger(trigger_request(bad_type, b"{}")).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{bad_type:?}");
    }
    let bad_content_type = TriggerRequest { content_type: "a\nb".into(), ..trigger_request("ok.type", b"{}") };
    assert_eq!(trigger(bad_content_type).await.unwrap_err().code(), Code::InvalidArgument);

    let anonymous =
        server.anonymous().await.trigger_service().trigger(trigger_request("ok.type", b"{}")).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let unknown_key = server.anonymous().await.with_api_key("hkp_unknown").unwrap();
    let refused = unknown_key.trigger_service().trigger(trigger_request("ok.type", b"{}")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_event() {
    let server = TestServer::start().await;
    let (producer, _, _) = server.producer("idem").await;
    let (other, _, _) = server.producer("other").await;
    let keyed = |key: &str| TriggerRequest { idempotency_key: key.into(), ..trigger_request("order.placed", b"{}") };

    let first = producer.trigger_service().trigger(keyed("order-1")).await.unwrap().into_inner();
    assert!(!first.duplicate);
    let again = producer.trigger_service().trigger(keyed("order-1")).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(again.event_id, first.event_id);

    let different = producer.trigger_service().trigger(keyed("order-2")).await.unwrap().into_inner();
    assert!(!different.duplicate);
    assert_ne!(different.event_id, first.event_id);
    let other_producer = other.trigger_service().trigger(keyed("order-1")).await.unwrap().into_inner();
    assert!(!other_producer.duplicate, "idempotency keys are per producer");
    let unkeyed_a =
        producer.trigger_service().trigger(trigger_request("order.placed", b"{}")).await.unwrap().into_inner();
    let unkeyed_b =
        producer.trigger_service().trigger(trigger_request("order.placed", b"{}")).await.unwrap().into_inner();
    assert_ne!(unkeyed_a.event_id, unkeyed_b.event_id);
}
