//! End-to-end tests of `hookctl`: the real binary against a real hookd server run in-process
//! on 127.0.0.1:0, with `hookctl receive` as the webhook receiver. Every wait is bounded.

use std::process::Stdio;
use std::time::Duration;

use hookd_server::config::Config;
use hookd_server::crypto::Keyring;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const ADMIN_TOKEN: &str = "hookctl-test-admin-token-0123456789";
/// The secret `hookctl receive` verifies with.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Every wait in these tests is bounded by this.
const DEADLINE: Duration = Duration::from_secs(60);

/// A hookd server run in-process on an ephemeral port, stopped when dropped.
struct Server {
    addr: String,
    shutdown: CancellationToken,
    /// Held so the data directory outlives the server.
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::from_base64(&hookd_server::crypto::mint_master_key_base64()).unwrap();
        let mut config = Config::new(dir.path(), ADMIN_TOKEN, keyring);
        // One retry, soon: a delivery that keeps failing fails for good within the test.
        config.pipeline.retry_schedule = "100ms".parse().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        tokio::spawn(hookd_server::run(listener, config, shutdown.clone()));
        Self { addr, shutdown, _dir: dir }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What one hookctl run printed and how it exited.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn succeeded(self) -> Self {
        assert_eq!(self.code, Some(0), "hookctl failed: {self:?}");
        self
    }

    fn json(self) -> Value {
        let run = self.succeeded();
        serde_json::from_str(&run.stdout).unwrap_or_else(|error| panic!("not JSON ({error}): {run:?}"))
    }
}

/// hookctl with a given address and credentials, passed by environment as a user would.
#[derive(Clone, Default)]
struct Hookctl {
    addr: Option<String>,
    token: Option<String>,
    api_key: Option<String>,
}

impl Hookctl {
    fn admin(server: &Server) -> Self {
        Self { addr: Some(server.addr.clone()), token: Some(ADMIN_TOKEN.into()), api_key: None }
    }

    fn producer(server: &Server, api_key: &str) -> Self {
        Self { addr: Some(server.addr.clone()), token: None, api_key: Some(api_key.into()) }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_hookctl"));
        command.args(args).kill_on_drop(true);
        for name in ["HOOKD_ADDR", "HOOKD_CA", "HOOKD_TOKEN", "HOOKD_API_KEY", "HOOKD_SECRET"] {
            command.env_remove(name);
        }
        let settings = [("HOOKD_ADDR", &self.addr), ("HOOKD_TOKEN", &self.token), ("HOOKD_API_KEY", &self.api_key)];
        for (name, value) in settings {
            if let Some(value) = value {
                command.env(name, value);
            }
        }
        command
    }

    async fn run_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Run {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hookctl starts");
        let mut input = child.stdin.take().expect("stdin is piped");
        input.write_all(stdin).await.unwrap();
        drop(input);
        let output = bounded(&format!("hookctl {args:?}"), child.wait_with_output()).await.unwrap();
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    async fn run(&self, args: &[&str]) -> Run {
        self.run_with_stdin(args, b"").await
    }

    /// Runs with `--json` and parses what it printed.
    async fn json(&self, args: &[&str]) -> Value {
        let args: Vec<&str> = std::iter::once("--json").chain(args.iter().copied()).collect();
        self.run(&args).await.json()
    }

    /// Starts a long-running command (receive, watch) whose output lines are read as they come.
    fn spawn(&self, args: &[&str]) -> Streaming {
        let mut child =
            self.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("hookctl starts");
        let stdout = forward_lines(child.stdout.take().expect("stdout is piped"));
        let stderr = forward_lines(child.stderr.take().expect("stderr is piped"));
        Streaming { _child: child, stdout, stderr }
    }
}

fn forward_lines(pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> mpsc::UnboundedReceiver<String> {
    let (lines_in, lines_out) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if lines_in.send(line).is_err() {
                return;
            }
        }
    });
    lines_out
}

/// A running hookctl (killed when dropped) and its output, line by line.
struct Streaming {
    _child: Child,
    stdout: mpsc::UnboundedReceiver<String>,
    stderr: mpsc::UnboundedReceiver<String>,
}

impl Streaming {
    /// The next JSON line on stdout that `wanted` accepts; earlier lines are skipped.
    async fn until(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        bounded(what, async {
            loop {
                let line = self.stdout.recv().await.unwrap_or_else(|| panic!("hookctl ended before {what}"));
                let value: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
                if wanted(&value) {
                    return value;
                }
            }
        })
        .await
    }

    /// Waits for a stderr line containing `text`.
    async fn stderr_until(&mut self, text: &str) {
        bounded(text, async {
            loop {
                let line = self.stderr.recv().await.unwrap_or_else(|| panic!("hookctl ended before saying {text:?}"));
                if line.contains(text) {
                    return;
                }
            }
        })
        .await;
    }
}

async fn bounded<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(DEADLINE, future).await.unwrap_or_else(|_| panic!("{what} did not finish within {DEADLINE:?}"))
}

/// Runs `args` with `--json` until `check` finds what it waits for in the answer: for state
/// only the API shows.
async fn eventually(hookctl: &Hookctl, args: &[&str], check: impl Fn(&Value) -> bool) -> Value {
    bounded(&format!("hookctl {args:?} showing what was expected"), async {
        loop {
            let answer = hookctl.json(args).await;
            if check(&answer) {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Starts `hookctl receive` on a free port; returns it and the URL it printed.
async fn receiver() -> (Streaming, String) {
    let mut receiver = Hookctl::default().spawn(&["--json", "receive", "--listen", "127.0.0.1:0", "--secret", SECRET]);
    let listening = receiver.until("the receiver's url", |line| line.get("listening").is_some()).await;
    let url = listening["listening"].as_str().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:") && !url.ends_with(":0/"), "{url}");
    (receiver, url)
}

fn is(value: &Value, key: &str, expected: &str) -> bool {
    value[key].as_str() == Some(expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_triggers_inspects_and_mends_with_hookctl() {
    let server = Server::start().await;
    let admin = Hookctl::admin(&server);

    let created = admin.json(&["producers", "create", "shop"]).await;
    let api_key = created["api_key"].as_str().unwrap();
    let producer_id = created["producer"]["id"].as_str().unwrap();
    assert!(api_key.starts_with("hkp_"), "{created}");
    let shown = admin.run(&["producers", "create", "other"]).await.succeeded();
    assert!(shown.stdout.contains("shown only this once"), "{shown:?}");
    let producer = Hookctl::producer(&server, api_key);

    let hash = producer.json(&["hash", "order.placed"]).await;
    let event_hash = hash["event_hash"].as_str().unwrap();
    assert!(event_hash.starts_with("evh_"), "{hash}");
    assert_eq!(producer.run(&["hash", "order.placed"]).await.succeeded().stdout.trim(), event_hash);

    let (mut receiver, url) = receiver().await;
    let register = ["listeners", "register", "order.placed", &url, "--secret", SECRET, "--description", "orders"];
    let registered = producer.json(&register).await;
    let listener_id = registered["listener"]["id"].as_str().unwrap().to_owned();
    assert_eq!(registered["listener"]["has_secret"], true);
    assert_eq!(registered["listener"]["event_hash"], event_hash);
    assert!(registered.get("secret").is_none(), "a given secret is never echoed: {registered}");

    let mut watch = producer.spawn(&["--json", "watch"]);
    watch.stderr_until("watching deliveries").await;

    // A payload as an argument, from a file, and from stdin.
    let first = producer.json(&["trigger", "order.placed", r#"{"order":1}"#]).await;
    let first = first["event_id"].as_str().unwrap().to_owned();
    let got = receiver.until("the first event", |line| is(line, "webhook_id", &first)).await;
    assert_eq!(got["verified"], true, "{got}");
    assert_eq!(got["status"], 204);
    assert_eq!(got["body"], r#"{"order":1}"#);
    assert_eq!(got["event_type"], "order.placed");
    assert_eq!(got["attempt"], "1");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload.txt");
    std::fs::write(&file, "order two").unwrap();
    let args = ["trigger", "order.placed", "--file", file.to_str().unwrap(), "--content-type", "text/plain"];
    let second = producer.json(&args).await["event_id"].as_str().unwrap().to_owned();
    let got = receiver.until("the event from a file", |line| is(line, "webhook_id", &second)).await;
    assert_eq!((got["body"].as_str(), got["content_type"].as_str()), (Some("order two"), Some("text/plain")));

    let stdin_trigger = ["--json", "trigger", "order.placed", "-", "--idempotency-key", "order-3"];
    let third = producer.run_with_stdin(&stdin_trigger, br#"{"order":3}"#).await.json();
    let third_id = third["event_id"].as_str().unwrap().to_owned();
    assert_eq!(third["duplicate"], false);
    let got = receiver.until("the event from stdin", |line| is(line, "webhook_id", &third_id)).await;
    assert_eq!(got["body"], r#"{"order":3}"#);
    let again = producer.run_with_stdin(&stdin_trigger[1..], b"ignored").await.succeeded();
    assert!(again.stdout.starts_with(&third_id) && again.stdout.contains("duplicate"), "{again:?}");

    let watched = watch.until("the first outcome", |update| is(update, "event_id", &first)).await;
    assert_eq!((watched["state"].as_str(), watched["status_code"].as_u64()), (Some("succeeded"), Some(204)));

    // Inspection, with the producer's key and with the admin token.
    let events = producer.json(&["events", "--event-type", "order.placed"]).await;
    let ids: Vec<&str> = events.as_array().unwrap().iter().map(|event| event["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [first.as_str(), second.as_str(), third_id.as_str()]);
    let recent = admin.json(&["events", "--since", "1h", "--limit", "2"]).await;
    assert_eq!(recent.as_array().unwrap().len(), 2, "{recent}");
    let first_only = admin.run(&["events", "--limit", "1"]).await.succeeded();
    assert!(first_only.stdout.contains(&first) && !first_only.stdout.contains(&second), "{first_only:?}");
    assert!(first_only.stderr.contains("more may match"), "{first_only:?}");
    let table = admin.run(&["events", "--since", "2000-01-01T00:00:00Z"]).await.succeeded();
    assert!(table.stdout.starts_with("ID ") && table.stdout.contains(&second), "{table:?}");
    let shown = producer.run(&["event", &first]).await.succeeded();
    assert!(shown.stdout.contains(r#"{"order":1}"#), "{shown:?}");

    // The attempt is recorded right after the receiver answered it.
    let deliveries =
        eventually(&producer, &["deliveries", "--event", &first], |deliveries| deliveries[0]["state"] == "succeeded")
            .await;
    let delivery_id = deliveries[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(deliveries[0]["listener_id"], listener_id.as_str());
    let attempts = producer.json(&["attempts", &delivery_id]).await;
    assert_eq!(attempts.as_array().unwrap().len(), 1, "{attempts}");
    assert_eq!((attempts[0]["status_code"].as_u64(), attempts[0]["trigger"].as_str()), (Some(204), Some("scheduled")));

    let retried = producer.json(&["retry", &delivery_id]).await;
    assert_eq!(retried["delivery"]["id"], delivery_id.as_str());
    assert!(retried["queued_at"].as_str().is_some_and(|at| at.ends_with('Z')), "{retried}");
    let got = receiver.until("the manual attempt", |line| is(line, "webhook_id", &first) && is(line, "attempt", "2"));
    assert_eq!(got.await["verified"], true);

    let replayed = producer.json(&["replay", &first, "--wait"]).await;
    assert_eq!(replayed["created"], 1, "{replayed}");
    assert_eq!((replayed["finished"].as_u64(), replayed["succeeded"].as_u64()), (Some(1), Some(1)), "{replayed}");
    assert_eq!(replayed["timed_out"], false);
    let replay_id = replayed["deliveries"][0].as_str().unwrap();
    let got = receiver.until("the replay", |line| is(line, "delivery_id", replay_id)).await;
    assert_eq!(got["webhook_id"], first.as_str(), "a replay keeps the event's webhook-id");

    // Listener management.
    let updated = producer.json(&["listeners", "update", &listener_id, "--description", "all orders"]).await;
    assert_eq!(updated["description"], "all orders");
    let listed = producer.json(&["listeners", "list", "--event-type", "order.placed"]).await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["id"], listener_id.as_str());

    // A disabled producer's trigger is refused, clearly.
    let disabled = admin.run(&["producers", "disable", producer_id, "--reason", "key leaked"]).await.succeeded();
    assert!(disabled.stdout.contains("key leaked"), "{disabled:?}");
    let refused = producer.run(&["trigger", "order.placed", "{}"]).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stderr.starts_with("error: ") && refused.stderr.contains("PERMISSION_DENIED"), "{refused:?}");
    assert!(refused.stdout.is_empty(), "{refused:?}");
    let producers = admin.json(&["producers", "list"]).await;
    let shop = producers.as_array().unwrap().iter().find(|p| p["id"] == producer_id).unwrap();
    assert_eq!((shop["enabled"].as_bool(), shop["disabled_reason"].as_str()), (Some(false), Some("key leaked")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_resends_what_a_wrong_secret_failed() {
    let server = Server::start().await;
    let created = Hookctl::admin(&server).json(&["producers", "create", "billing"]).await;
    let producer = Hookctl::producer(&server, created["api_key"].as_str().unwrap());
    let (mut receiver, url) = receiver().await;
    let register = ["listeners", "register", "invoice.paid", &url, "--secret", "not-the-receivers-secret"];
    let listener_id = producer.json(&register).await["listener"]["id"].as_str().unwrap().to_owned();

    let event = producer.json(&["trigger", "invoice.paid", r#"{"invoice":7}"#]).await;
    let event = event["event_id"].as_str().unwrap().to_owned();
    let refused = receiver.until("the badly signed request", |line| is(line, "webhook_id", &event)).await;
    assert_eq!((refused["verified"].as_bool(), refused["status"].as_u64()), (Some(false), Some(401)), "{refused}");
    assert!(refused["error"].as_str().is_some_and(|error| error.contains("no signature matches")), "{refused}");
    let failed = ["deliveries", "--listener", &listener_id, "--state", "failed"];
    eventually(&producer, &failed, |deliveries| deliveries.as_array().is_some_and(|all| all.len() == 1)).await;

    // From standard input, with the line end a shell's echo leaves, rather than on a command line.
    let rotate = ["--json", "listeners", "rotate-secret", &listener_id, "--secret-file", "-"];
    let rotated = producer.run_with_stdin(&rotate, format!("{SECRET}\n").as_bytes()).await.json();
    assert_eq!(rotated["listener"]["has_secret"], true);
    // With the admin token as a flag this time, as an operator would.
    let operator = Hookctl { token: None, ..producer.clone() };
    let recover = ["--json", "--token", ADMIN_TOKEN, "recover", &listener_id, "--since", "1h", "--wait"];
    let recovered = operator.run(&recover).await.json();
    assert_eq!(recovered["requeued"], 1, "{recovered}");
    assert_eq!((recovered["pending"].as_u64(), recovered["timed_out"].as_bool()), (Some(0), Some(false)));
    let accepted =
        receiver.until("the recovered request", |line| is(line, "webhook_id", &event) && line["verified"] == true);
    assert_eq!(accepted.await["body"], r#"{"invoice":7}"#);
    let succeeded = ["deliveries", "--listener", &listener_id, "--state", "succeeded"];
    eventually(&producer, &succeeded, |deliveries| deliveries.as_array().is_some_and(|all| all.len() == 1)).await;
}

#[tokio::test]
async fn help_and_mistakes_are_clear_without_a_server() {
    let hookctl = Hookctl::default();
    let help = hookctl.run(&["--help"]).await.succeeded().stdout;
    for expected in
        ["producers", "listeners", "trigger", "deliveries", "recover", "receive", "--token", "HOOKD_API_KEY"]
    {
        assert!(help.contains(expected), "--help lacks {expected}:\n{help}");
    }
    let help = hookctl.run(&["listeners", "register", "--help"]).await.succeeded().stdout;
    for expected in
        ["EVENT_TYPE", "URL", "--secret", "--secret-file", "--generate-secret", "--ordered", "--description"]
    {
        assert!(help.contains(expected), "listeners register --help lacks {expected}:\n{help}");
    }

    let usage = hookctl.run(&["deliveries"]).await;
    assert_eq!(usage.code, Some(2), "neither --event nor --listener is a usage error: {usage:?}");
    let usage = hookctl.run(&["events", "--limit", "0"]).await;
    assert_eq!(usage.code, Some(2), "{usage:?}");
    let usage = hookctl.run(&["events", "--since", "last tuesday"]).await;
    assert_eq!(usage.code, Some(2), "{usage:?}");
    assert!(usage.stderr.contains("RFC 3339"), "{usage:?}");

    let missing = hookctl.run(&["trigger", "order.placed", "{}"]).await;
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert!(missing.stderr.contains("--api-key") && missing.stderr.contains("HOOKD_API_KEY"), "{missing:?}");
    let nowhere = Hookctl { addr: Some("http://127.0.0.1:1".into()), token: Some(ADMIN_TOKEN.into()), api_key: None };
    let unreachable = nowhere.run(&["producers", "list"]).await;
    assert_eq!(unreachable.code, Some(1), "{unreachable:?}");
    assert!(unreachable.stderr.starts_with("error: cannot connect to http://127.0.0.1:1: "), "{unreachable:?}");
}
