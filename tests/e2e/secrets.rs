//! Secrets stay secret: after real use of the real binary, neither a listener secret nor an
//! API key appears in any file of the data directory or in the log.

use base64::Engine as _;
use hookd_client::Client;
use hookd_client::v1::{
    CreateProducerRequest, RegisterListenerRequest, RotateListenerSecretRequest, RotateProducerKeyRequest,
    TriggerRequest,
};

use crate::support::{HookdProcess, bounded, contains, derive, files_under, listener_request, master_key};

#[tokio::test]
async fn no_secret_or_api_key_is_stored_or_logged_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let key = master_key();
    let admin_token = "secrets-test-admin-token";
    let env = [("HOOKD_MASTER_KEY", key.as_str()), ("HOOKD_ADMIN_TOKEN", admin_token)];
    let hookd = HookdProcess::start(dir.path(), &env).await.unwrap();

    let admin = bounded("connect", Client::connect(hookd.endpoint())).await.unwrap().with_api_key(admin_token).unwrap();
    let created =
        admin.admin().create_producer(CreateProducerRequest { name: "secretive".into() }).await.unwrap().into_inner();
    let producer_id = created.producer.unwrap().id;
    let first_key = created.api_key;
    let producer = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(&first_key).unwrap();
    let hash = derive(&producer, "payment.captured").await;

    let given_secret = "plaintext-listener-secret-7f3a9c";
    let given = producer
        .register()
        .register_listener(RegisterListenerRequest {
            secret: Some(given_secret.into()),
            ..listener_request(&hash, "http://127.0.0.1:9/given")
        })
        .await
        .unwrap()
        .into_inner()
        .listener
        .unwrap();
    let generated = producer
        .register()
        .register_listener(RegisterListenerRequest {
            generate_secret: true,
            ..listener_request(&hash, "http://127.0.0.1:9/generated")
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let rotated = producer
        .register()
        .rotate_listener_secret(RotateListenerSecretRequest {
            listener_id: given.id,
            secret: Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            // The secret replaced stays, sealed too, through its grace period.
            grace_seconds: 3600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(rotated.listener.unwrap().has_secret);
    producer
        .trigger_service()
        .trigger(TriggerRequest {
            event_type: "payment.captured".into(),
            payload: b"{}".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    let second_key = admin
        .admin()
        .rotate_producer_key(RotateProducerKeyRequest { producer_id, grace_seconds: 60 })
        .await
        .unwrap()
        .into_inner()
        .api_key;

    let log_so_far = hookd.log_text();
    assert!(hookd.terminate().await.success(), "SIGTERM is a clean exit");

    let generated_bytes = base64::engine::general_purpose::STANDARD.decode(&generated["whsec_".len()..]).unwrap();
    let whsec_bytes = base64::engine::general_purpose::STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let needles: [(&str, &[u8]); 8] = [
        ("admin token", admin_token.as_bytes()),
        ("given listener secret", given_secret.as_bytes()),
        ("generated listener secret", generated.as_bytes()),
        ("generated secret's key bytes", &generated_bytes),
        ("rotated whsec_ secret", b"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ("rotated secret's key bytes", &whsec_bytes),
        ("first API key", first_key.as_bytes()),
        ("rotated API key", second_key.as_bytes()),
    ];
    let files = files_under(dir.path());
    assert!(files.len() > 1, "the data directory holds the database: {files:?}");
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        for (what, needle) in needles {
            assert!(!contains(&bytes, needle), "the {what} is in plaintext in {}", file.display());
        }
    }
    for (what, needle) in needles {
        assert!(!contains(log_so_far.as_bytes(), needle), "the {what} is in the log");
    }
}
