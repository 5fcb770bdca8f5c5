//! A disk that fills up: the real binary on a small tmpfs. Once a journal or database write
//! fails, hookd says so (health NOT_SERVING, UNAVAILABLE with the cause, an error in the
//! log), acknowledges nothing more, and loses nothing it acknowledged before.
//!
//! Mounting a tmpfs needs root (CI runs as root). Where it cannot be mounted the test says
//! so and passes without checking anything.

use std::path::{Path, PathBuf};

use hookd_client::v1::{CreateProducerRequest, GetEventRequest};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{ADMIN_TOKEN, HookdProcess, bounded, master_key, trigger_request};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(at).map_err(|error| error.to_string())?;
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|error| error.to_string())?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
        }
        Ok(Self(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_intake_visibly_and_loses_no_acknowledged_event() {
    let scratch = tempfile::tempdir().unwrap();
    let mount = match Tmpfs::mount(&scratch.path().join("small"), "24m") {
        Ok(mount) => mount,
        Err(why) => {
            eprintln!("SKIPPED a_full_disk_stops_intake_visibly: cannot mount a tmpfs here ({why}); needs root");
            return;
        }
    };
    let data = mount.0.join("data");
    let key = master_key();
    let env = [("HOOKD_MASTER_KEY", key.as_str()), ("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN)];
    let hookd = HookdProcess::start(&data, &env).await.expect("hookd starts on the small disk");
    let admin = hookd_client::Client::connect(hookd.endpoint()).await.unwrap().with_api_key(ADMIN_TOKEN).unwrap();
    let created = admin.admin().create_producer(CreateProducerRequest { name: "filler".into() }).await.unwrap();
    let producer = admin.clone().with_api_key(&created.into_inner().api_key).unwrap();

    // 64 KiB events until the disk is full: each is in the journal and in the database.
    let payload = vec![b'x'; 64 * 1024];
    let mut acknowledged = Vec::new();
    let refusal = loop {
        assert!(acknowledged.len() < 4096, "24 MiB never filled up");
        match producer.trigger_service().trigger(trigger_request("fill", &payload)).await {
            Ok(ack) => acknowledged.push(ack.into_inner().event_id),
            Err(status) => break status,
        }
    };
    assert!(!acknowledged.is_empty(), "some events fit before the disk was full");
    eprintln!("{} acknowledged, then {refusal:?}", acknowledged.len());
    assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
    assert!(refusal.message().contains("cannot write"), "the answer says what failed: {refusal:?}");
    assert!(refusal.message().to_lowercase().contains("no space left"), "{refusal:?}");

    // Nothing is acknowledged after the failure, whatever the payload's size.
    for payload in [&b"{}"[..], &payload] {
        let status = producer.trigger_service().trigger(trigger_request("fill", payload)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let channel = tonic::transport::Endpoint::from_shared(hookd.endpoint()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    let status = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    let log = hookd.log_text();
    assert!(
        log.lines().any(|line| line.contains("ERROR") && line.contains("hookd can no longer write")),
        "the log says it at error level:\n{log}"
    );

    // Every acknowledged event is there after a restart on a disk with room.
    hookd.kill9().await;
    let roomy = scratch.path().join("roomy");
    let copied = std::process::Command::new("cp").arg("-a").arg(&data).arg(&roomy).status().unwrap();
    assert!(copied.success());
    drop(mount);
    let hookd = HookdProcess::start(&roomy, &env).await.expect("hookd starts from the copy");
    let admin = hookd_client::Client::connect(hookd.endpoint()).await.unwrap().with_api_key(ADMIN_TOKEN).unwrap();
    for event_id in &acknowledged {
        let request = GetEventRequest { event_id: event_id.clone() };
        let event = bounded("GetEvent", admin.delivery().get_event(request)).await.unwrap().into_inner();
        assert_eq!(event.payload.len(), payload.len(), "{event_id}");
    }
}
