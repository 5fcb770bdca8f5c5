//! hookd's own gRPC listener over TLS, with the real binary: clients that trust its CA get
//! in, others (and plaintext) do not, and a new certificate is taken up on SIGHUP and when
//! the files change, without a restart. Fixtures in `tests/e2e/tls/`: `receiver.pem` (for
//! 127.0.0.1, issued by `ca.pem`) and `server2.pem` (for 127.0.0.1, issued by `ca2.pem`); made
//! with `openssl` (P-256, valid until 2126), the CAs' keys not kept.

use std::path::{Path, PathBuf};

use hookd_client::Client;
use hookd_client::v1::{CreateProducerRequest, ListProducersRequest};

use crate::support::{ADMIN_TOKEN, HookdProcess, eventually, master_key};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/tls").join(name)
}

/// Puts a certificate and key in place as one would: each written to a new file, then renamed.
fn install(dir: &Path, cert: &str, key: &str) {
    for (from, to) in [(cert, "cert.pem"), (key, "key.pem")] {
        let staged = dir.join(format!("{to}.new"));
        std::fs::copy(fixture(from), &staged).unwrap();
        std::fs::rename(staged, dir.join(to)).unwrap();
    }
}

/// Whether an admin call succeeds over TLS trusting only `ca`.
async fn admitted(endpoint: &str, ca: &str) -> bool {
    let Ok(client) = Client::connect_with_ca(endpoint, std::fs::read(fixture(ca)).unwrap()).await else {
        return false;
    };
    let client = client.with_api_key(ADMIN_TOKEN).unwrap();
    client.admin().list_producers(ListProducersRequest::default()).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_listener_speaks_tls_and_takes_up_a_new_certificate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    install(&certs, "receiver.pem", "receiver.key");
    let key = master_key();
    let (cert_path, key_path) = (certs.join("cert.pem"), certs.join("key.pem"));
    let env = [
        ("HOOKD_MASTER_KEY", key.as_str()),
        ("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN),
        ("HOOKD_TLS_CERT", cert_path.to_str().unwrap()),
        ("HOOKD_TLS_KEY", key_path.to_str().unwrap()),
    ];
    let hookd = HookdProcess::start(&dir.path().join("data"), &env).await.expect("hookd starts with TLS");
    let endpoint = format!("https://{}", hookd.addr);

    let client = Client::connect_with_ca(&endpoint, std::fs::read(fixture("ca.pem")).unwrap()).await.unwrap();
    let admin = client.with_api_key(ADMIN_TOKEN).unwrap();
    admin.admin().create_producer(CreateProducerRequest { name: "over-tls".into() }).await.unwrap();
    assert!(!admitted(&endpoint, "ca2.pem").await, "a client trusting another CA is refused");
    let plaintext = Client::connect(hookd.endpoint()).await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(client) => client
            .with_api_key(ADMIN_TOKEN)
            .unwrap()
            .admin()
            .list_producers(ListProducersRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "plaintext gets nothing from a TLS listener");

    // A new certificate from another CA, then SIGHUP: new connections get it.
    install(&certs, "server2.pem", "server2.key");
    let pid = hookd.child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    eventually("the certificate reloaded on SIGHUP", || admitted_now(&endpoint, "ca2.pem")).await;
    assert!(!admitted(&endpoint, "ca.pem").await, "the old certificate is no longer served");
    assert!(hookd.log_text().contains("TLS certificate reloaded"));

    // Changed files are noticed without a signal too.
    install(&certs, "receiver.pem", "receiver.key");
    eventually("the certificate reloaded after the files changed", || admitted_now(&endpoint, "ca.pem")).await;
    // An unreadable pair keeps the certificate in use.
    std::fs::write(&cert_path, "not a certificate").unwrap();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    eventually("the failed reload reported", || {
        let log = hookd.log_text();
        async move { log.contains("TLS certificate not reloaded").then_some(()) }
    })
    .await;
    assert!(admitted(&endpoint, "ca.pem").await, "still served with the last good certificate");
}

async fn admitted_now(endpoint: &str, ca: &str) -> Option<()> {
    admitted(endpoint, ca).await.then_some(())
}

#[tokio::test]
async fn a_certificate_that_does_not_load_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.pem");
    std::fs::write(&bogus, "not a certificate").unwrap();
    let key = master_key();
    let env = [
        ("HOOKD_MASTER_KEY", key.as_str()),
        ("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN),
        ("HOOKD_TLS_CERT", bogus.to_str().unwrap()),
        ("HOOKD_TLS_KEY", bogus.to_str().unwrap()),
    ];
    let failure = HookdProcess::start(&dir.path().join("data"), &env).await.err().expect("hookd refuses to start");
    assert_eq!(failure.status.code(), Some(2));
    assert!(failure.log.iter().any(|line| line.contains("TLS certificate chain")), "{:?}", failure.log);
}
