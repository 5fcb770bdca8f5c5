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

/// A TLS receiver, and hookd trusting only the roots in `tests/e2e/tls/{roots}` with a signed
/// listener there and one event triggered for it.
struct Sent {
    receiver: Receiver,
    producer: Client,
    secret: String,
    event_id: String,
    _hookd: HookdProcess,
    _dir: tempfile::TempDir,
}

async fn sent_over_tls(roots: &str) -> Sent {
    let receiver = Receiver::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    let roots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/tls").join(roots);
    let key = master_key();
    let env = [
        ("HOOKD_MASTER_KEY", key.as_str()),
        ("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN),
        ("SSL_CERT_FILE", roots.to_str().expect("a UTF-8 path")),
    ];
    let hookd = HookdProcess::start(dir.path(), &env).await.unwrap();
    let admin = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(ADMIN_TOKEN).unwrap();
    let request = CreateProducerRequest { name: "tls".into() };
    let api_key = admin.admin().create_producer(request).await.unwrap().into_inner().api_key;
    let producer = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(&api_key).unwrap();
    let hash = derive(&producer, "order.paid").await;
    let url = receiver.url("/secure");
    let request = RegisterListenerRequest { event_hash: hash, url, generate_secret: true, ..Default::default() };
    let secret = producer.register().register_listener(request).await.unwrap().into_inner().secret;
    let ack = producer.trigger_service().trigger(trigger_request("order.paid", b"{\"secure\": true}")).await.unwrap();
    Sent { receiver, producer, secret, event_id: ack.into_inner().event_id, _hookd: hookd, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_listener_with_a_certificate_from_a_trusted_ca_gets_signed_deliveries() {
    // Bound whole: hookd and its directory live as long as `sent`.
    let sent = sent_over_tls("ca.pem").await;
    let (receiver, secret, event_id) = (&sent.receiver, &sent.secret, &sent.event_id);

    receiver.wait_until("the delivery over TLS", DEADLINE, |requests| !requests.is_empty()).await;
    let request = &receiver.requests()[0];
    assert_eq!(request.body.as_ref(), b"{\"secure\": true}");
    assert_eq!(request.webhook_id(), event_id);
    hookd_client::verify(secret, &request.headers, &request.body).expect("signed with the listener's secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_listener_whose_certificate_is_not_trusted_gets_nothing_and_the_attempt_says_why() {
    let sent = sent_over_tls("other-ca.pem").await;
    let (receiver, producer, event_id) = (&sent.receiver, &sent.producer, &sent.event_id);

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
    let request = ListAttemptsRequest { delivery_id: attempted.id, ..Default::default() };
    let attempts = producer.delivery().list_attempts(request).await.unwrap().into_inner().attempts;
    assert_eq!(attempts[0].status_code, 0, "no HTTP answer: {:?}", attempts[0]);
    assert!(attempts[0].error.starts_with("tls:"), "the attempt says why: {:?}", attempts[0].error);
    assert!(attempts[0].error.contains("certificate"), "{:?}", attempts[0].error);
    assert!(receiver.requests().is_empty(), "no request reaches a listener hookd cannot verify");
}
