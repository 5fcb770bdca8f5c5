//! Secrets stay secret: after real use of the real binary, neither a listener secret nor an
//! API key appears in any file of the data directory, in any value of the PostgreSQL
//! database (on that backend), or in the log.

use base64::Engine as _;
use hookd_client::Client;
use hookd_client::v1::{
    CreateProducerRequest, RegisterListenerRequest, RotateListenerSecretRequest, RotateProducerKeyRequest,
    TriggerRequest,
};

use crate::receiver::Receiver;
use crate::support::{
    DEADLINE, HookdProcess, PgSchema, bounded, contains, derive, eventually, files_under, listener_request, master_key,
};

#[tokio::test]
async fn no_secret_or_api_key_is_stored_or_logged_in_plaintext() {
    stored_and_logged(None).await;
}

#[tokio::test]
async fn on_postgres_no_secret_or_api_key_reaches_the_database_or_the_log_in_plaintext() {
    let test = "on_postgres_no_secret_or_api_key_reaches_the_database_or_the_log_in_plaintext";
    if let Some(postgres) = PgSchema::new(test) {
        stored_and_logged(Some(postgres)).await;
    }
}

/// Uses every secret there is, then searches the data directory (or every value of every
/// table of the PostgreSQL schema) and the log for each.
async fn stored_and_logged(postgres: Option<PgSchema>) {
    let dir = tempfile::tempdir().unwrap();
    let key = master_key();
    let admin_token = "secrets-test-admin-token";
    let store = postgres.as_ref().map(PgSchema::store_url);
    let mut env = vec![("HOOKD_MASTER_KEY", key.as_str()), ("HOOKD_ADMIN_TOKEN", admin_token)];
    if let Some(store) = &store {
        env.push(("HOOKD_STORE", store));
    }
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
    if let Some(postgres) = &postgres {
        let stored = postgres.dump();
        assert!(contains(&stored, hash.as_bytes()), "the dump holds what hookd stored (the event hash)");
        for (what, needle) in needles {
            assert!(!contains(&stored, needle), "the {what} is in plaintext in the database");
        }
    }
    let files = files_under(dir.path());
    assert!(postgres.is_some() || files.len() > 1, "the data directory holds the database: {files:?}");
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

/// Every file under `dir` and `log`, searched for each secret.
fn assert_nowhere(dir: &std::path::Path, log: &str, secrets: &[String], when: &str) {
    for file in files_under(dir) {
        let bytes = std::fs::read(&file).unwrap();
        for secret in secrets {
            assert!(
                !contains(&bytes, secret.as_bytes()),
                "{when}: a listener secret is in plaintext in {}",
                file.display()
            );
        }
    }
    for secret in secrets {
        assert!(!contains(log.as_bytes(), secret.as_bytes()), "{when}: a listener secret is in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_key_is_rotated_without_losing_a_secret_or_an_event_hash() {
    const BULK: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let (first, second, third) = (master_key(), master_key(), master_key());
    let admin_token = "rotation-test-admin-token";
    let with = |key: &str, previous: Option<&str>| {
        let mut env = vec![("HOOKD_MASTER_KEY", key.to_owned()), ("HOOKD_ADMIN_TOKEN", admin_token.to_owned())];
        if let Some(previous) = previous {
            env.push(("HOOKD_PREVIOUS_MASTER_KEY", previous.to_owned()));
        }
        env
    };
    let start = |env: Vec<(&'static str, String)>| {
        let dir = dir.path().to_owned();
        async move {
            let env: Vec<(&str, &str)> = env.iter().map(|(name, value)| (*name, value.as_str())).collect();
            HookdProcess::start(&dir, &env).await
        }
    };
    let receiver = Receiver::start().await;

    // Under the first key: a signed listener whose secret was rotated with a grace period (two
    // envelopes), and a few hundred more with generated secrets.
    let hookd = start(with(&first, None)).await.unwrap();
    let admin = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(admin_token).unwrap();
    let created = admin.admin().create_producer(CreateProducerRequest { name: "keyed".into() }).await.unwrap();
    let api_key = created.into_inner().api_key;
    let producer = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(&api_key).unwrap();
    let hash = derive(&producer, "rotated.type").await;
    let (old_secret, new_secret) = ("first-secret-before-rotation".to_owned(), "second-secret-in-grace".to_owned());
    let signed = producer
        .register()
        .register_listener(RegisterListenerRequest {
            secret: Some(old_secret.clone()),
            ..listener_request(&hash, &receiver.url("/signed"))
        })
        .await
        .unwrap()
        .into_inner()
        .listener
        .unwrap();
    producer
        .register()
        .rotate_listener_secret(RotateListenerSecretRequest {
            listener_id: signed.id.clone(),
            secret: Some(new_secret.clone()),
            grace_seconds: 3600,
            ..Default::default()
        })
        .await
        .unwrap();
    let bulk_hash = derive(&producer, "bulk.type").await;
    let mut secrets = vec![old_secret.clone(), new_secret.clone()];
    for n in 0..BULK {
        let request = RegisterListenerRequest {
            generate_secret: true,
            ..listener_request(&bulk_hash, &format!("http://127.0.0.1:9/{n}"))
        };
        secrets.push(producer.register().register_listener(request).await.unwrap().into_inner().secret);
    }
    assert!(hookd.terminate().await.success());

    // The new key alone is refused, saying how to rotate.
    let refused = start(with(&second, None)).await.err().expect("the new key alone is refused");
    assert_eq!(refused.status.code(), Some(2));
    assert!(refused.log.join("\n").contains("HOOKD_PREVIOUS_MASTER_KEY"), "{:?}", refused.log);

    // With both: it serves at once and re-seals beside the traffic. Killed right after it
    // serves (the rotation may be anywhere), then started again, it finishes.
    start(with(&second, Some(&first))).await.unwrap().kill9().await;
    let hookd = start(with(&second, Some(&first))).await.unwrap();
    eventually("the rotation to finish", || {
        let log = hookd.log_text();
        async move { log.contains("master key rotation done").then_some(()) }
    })
    .await;
    let delivered = |hookd: &HookdProcess, n: usize| {
        let (endpoint, api_key, receiver, hash) = (hookd.endpoint(), api_key.clone(), &receiver, hash.clone());
        async move {
            let producer = Client::connect(endpoint).await.unwrap().with_api_key(&api_key).unwrap();
            assert_eq!(derive(&producer, "rotated.type").await, hash, "event hashes outlive the master key");
            let payload = format!("{{\"n\": {n}}}");
            let request = TriggerRequest {
                event_type: "rotated.type".into(),
                payload: payload.into_bytes(),
                ..Default::default()
            };
            let event_id = producer.trigger_service().trigger(request).await.unwrap().into_inner().event_id;
            receiver
                .wait_until("the delivery", DEADLINE, |requests| requests.iter().any(|r| r.webhook_id() == event_id))
                .await;
            receiver.requests().into_iter().find(|r| r.webhook_id() == event_id).unwrap()
        }
    };
    let verifies = |secret: &str, request: &crate::receiver::Received| {
        standardwebhooks::Webhook::from_bytes(secret.as_bytes().to_vec())
            .unwrap()
            .verify(&request.body, &request.headers)
            .is_ok()
    };
    let request = delivered(&hookd, 1).await;
    assert!(verifies(&new_secret, &request) && verifies(&old_secret, &request), "both secrets still sign");
    let log = hookd.log_text();
    assert!(hookd.terminate().await.success());
    assert_nowhere(dir.path(), &log, &secrets, "after the rotation");

    // The new key alone serves now; the old one alone is refused.
    let hookd = start(with(&second, None)).await.unwrap();
    assert!(verifies(&new_secret, &delivered(&hookd, 2).await));
    assert!(hookd.terminate().await.success());
    let refused = start(with(&first, None)).await.err().expect("the old key alone is refused");
    assert_eq!(refused.status.code(), Some(2));

    // Offline, with hookd stopped: `hookd rekey` to a third key.
    let rekey = tokio::process::Command::new(env!("CARGO_BIN_EXE_hookd"))
        .args(["rekey", "--data-dir"])
        .arg(dir.path())
        .env_remove("HOOKD_ADMIN_TOKEN")
        .env("HOOKD_MASTER_KEY", &third)
        .env("HOOKD_PREVIOUS_MASTER_KEY", &second)
        .output();
    let rekey = bounded("hookd rekey", rekey).await.unwrap();
    let rekey_log = String::from_utf8_lossy(&rekey.stderr).into_owned();
    assert!(rekey.status.success(), "hookd rekey failed: {rekey_log}");
    assert!(rekey_log.contains("every secret is sealed under the new master key"), "{rekey_log}");
    let hookd = start(with(&third, None)).await.unwrap();
    assert!(verifies(&new_secret, &delivered(&hookd, 3).await));
    let log = hookd.log_text();
    assert!(hookd.terminate().await.success());
    assert_nowhere(dir.path(), &format!("{log}\n{rekey_log}"), &secrets, "after hookd rekey");
}
