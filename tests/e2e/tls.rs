//! HTTPS listeners, with the real binary and a real TLS receiver on loopback: hookd checks a
//! listener's certificate against the roots it trusts (the system's, or those in the PEM file
//! `SSL_CERT_FILE` names) and sends nothing to a listener it cannot verify. The certificates
//! are fixtures in `tests/e2e/tls/`: a test CA (`ca.pem`), a receiver certificate for
//! 127.0.0.1 that it issued, and an unrelated CA (`other-ca.pem`). Made with `openssl req
//! -x509` (P-256, valid until 2126); the CAs' keys were not kept.

use hookd_client::Client;
use hookd_client::v1::{
    CreateProducerRequest, Delivery, ListAttemptsRequest, ListDeliveriesRequest, RegisterListenerRequest,
};

use crate::receiver::Receiver;
use crate::support::{ADMIN_TOKEN, DEADLINE, HookdProcess, derive, eventually, master_key, trigger_request};

/// hookd trusting only the roots in `tests/e2e/tls/{roots}`, and a producer's client.
async fn hookd_trusting(dir: &std::path::Path, roots: &str) -> (HookdProcess, Client) {
    let roots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/tls").join(roots);
    let key = master_key();
    let env = [
        ("HOOKD_MASTER_KEY", key.as_str()),
        ("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN),
        ("SSL_CERT_FILE", roots.to_str().expect("a UTF-8 path")),
    ];
    let hookd = HookdProcess::start(dir, &env).await.unwrap();
    let admin = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(ADMIN_TOKEN).unwrap();
    let request = CreateProducerRequest { name: "tls".into() };
    let api_key = admin.admin().create_producer(request).await.unwrap().into_inner().api_key;
    let producer = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(&api_key).unwrap();
    (hookd, producer)
}

/// Registers a signed listener at `url` for `event_type` and triggers one event; returns the
/// listener's secret and the event's id.
async fn listen_and_trigger(producer: &Client, event_type: &str, url: String) -> (String, String) {
    let hash = derive(producer, event_type).await;
    let request = RegisterListenerRequest { event_hash: hash, url, generate_secret: true, ..Default::default() };
    let secret = producer.register().register_listener(request).await.unwrap().into_inner().secret;
    let ack = producer.trigger_service().trigger(trigger_request(event_type, b"{\"secure\": true}")).await.unwrap();
    (secret, ack.into_inner().event_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_listener_with_a_certificate_from_a_trusted_ca_gets_signed_deliveries() {
    let receiver = Receiver::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    let (_hookd, producer) = hookd_trusting(dir.path(), "ca.pem").await;
    let (secret, event_id) = listen_and_trigger(&producer, "order.paid", receiver.url("/secure")).await;

    receiver.wait_until("the delivery over TLS", DEADLINE, |requests| !requests.is_empty()).await;
    let request = &receiver.requests()[0];
    assert_eq!(request.body.as_ref(), b"{\"secure\": true}");
    assert_eq!(request.webhook_id(), event_id);
    hookd_client::verify(&secret, &request.headers, &request.body).expect("signed with the listener's secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_listener_whose_certificate_is_not_trusted_gets_nothing_and_the_attempt_says_why() {
    let receiver = Receiver::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    let (_hookd, producer) = hookd_trusting(dir.path(), "other-ca.pem").await;
    let (_, event_id) = listen_and_trigger(&producer, "order.paid", receiver.url("/secure")).await;

    let attempted: Delivery = eventually("a first attempt recorded", || {
        let producer = producer.clone();
        let event_id = event_id.clone();
        async move {
            let request = ListDeliveriesRequest { event_id, ..Default::default() };
            let deliveries = producer.delivery().list_deliveries(request).await.unwrap().into_inner().deliveries;
            deliveries.into_iter().find(|delivery| delivery.attempts >= 1)
        }
    })
    .await;
    let request = ListAttemptsRequest { delivery_id: attempted.id };
    let attempts = producer.delivery().list_attempts(request).await.unwrap().into_inner().attempts;
    assert_eq!(attempts[0].status_code, 0, "no HTTP answer: {:?}", attempts[0]);
    assert!(attempts[0].error.starts_with("tls:"), "the attempt says why: {:?}", attempts[0].error);
    assert!(attempts[0].error.contains("certificate"), "{:?}", attempts[0].error);
    assert!(receiver.requests().is_empty(), "no request reaches a listener hookd cannot verify");
}
