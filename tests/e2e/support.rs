//! The end-to-end harness: real hookd servers on 127.0.0.1:0 with temporary data
//! directories, either in-process (through `hookd_server::run`) or as the real `hookd` binary,
//! and clients that talk to them over real gRPC.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use hookd_client::Client;
use hookd_client::v1::{
    CreateProducerRequest, DeriveEventHashRequest, ListEventsRequest, RegisterListenerRequest, TriggerRequest,
};
use hookd_server::config::Config;
use hookd_server::crypto::Keyring;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// Every wait in these tests is bounded by this.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A fresh random master key, base64.
pub fn master_key() -> String {
    hookd_server::crypto::mint_master_key_base64()
}

/// Runs `future` or fails the test after [`DEADLINE`].
pub async fn bounded<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(DEADLINE, future).await.unwrap_or_else(|_| panic!("{what} did not finish within {DEADLINE:?}"))
}

/// Waits until the listener's `count` deliveries all have their next attempt more than a
/// second in the past: due, and (a second on top) read by the dispatcher, which parks them
/// while the listener is disabled. Should it not have got to them yet, what the caller
/// checks next must hold either way.
pub async fn retries_due(client: &Client, listener_id: &str, count: usize) {
    let started = std::time::Instant::now();
    loop {
        let request =
            hookd_client::v1::ListDeliveriesRequest { listener_id: listener_id.to_owned(), ..Default::default() };
        let deliveries = client.delivery().list_deliveries(request).await.unwrap().into_inner().deliveries;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let due = |d: &hookd_client::v1::Delivery| {
            d.next_attempt_at.as_ref().is_some_and(|at| u64::try_from(at.seconds).is_ok_and(|at| at + 1 < now))
        };
        if deliveries.len() == count && deliveries.iter().all(due) {
            return;
        }
        let states: Vec<(i32, u32, Option<i64>)> =
            deliveries.iter().map(|d| (d.state, d.attempts, d.next_attempt_at.as_ref().map(|at| at.seconds))).collect();
        assert!(started.elapsed() < DEADLINE, "{count} retries of {listener_id} not due by now ({now}): {states:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` until it yields a value, failing the test after [`DEADLINE`]: for state
/// that only the API can observe (no event to wait on).
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let polled = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    polled.unwrap_or_else(|_| panic!("{what} did not happen within {DEADLINE:?}"))
}

/// An in-process server.
pub struct TestServer {
    pub addr: SocketAddr,
    config: Config,
    /// Held so the directory outlives the server.
    dir: Arc<tempfile::TempDir>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), hookd_server::RunError>>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Arc::new(tempfile::tempdir().unwrap()), &master_key(), |_| {}).await
    }

    /// Starts a server on `dir` with `master_key`, after `adjust` has edited the config.
    pub async fn start_with(dir: Arc<tempfile::TempDir>, master_key: &str, adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::new(dir.path(), ADMIN_TOKEN, Keyring::from_base64(master_key).unwrap());
        adjust(&mut config);
        Self::serve(dir, config, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn serve(dir: Arc<tempfile::TempDir>, config: Config, addr: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(hookd_server::run(listener, config.clone(), shutdown.clone()));
        Self { addr, config, dir, shutdown, task: Some(task) }
    }

    /// Stops the server gracefully and starts it again on the same address and data.
    pub async fn restart(self) -> Self {
        let (dir, config, addr) = (self.dir.clone(), self.config.clone(), self.addr);
        self.stop().await.unwrap();
        Self::serve(dir, config, addr).await
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A handle that keeps the data directory after the server is stopped.
    pub fn keep_dir(&self) -> Arc<tempfile::TempDir> {
        self.dir.clone()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Begins shutdown without waiting for it.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), hookd_server::RunError> {
        self.shutdown.cancel();
        let task = self.task.take().expect("stopped once");
        bounded("server shutdown", task).await.expect("server task does not panic")
    }

    pub async fn anonymous(&self) -> Client {
        bounded("connect", Client::connect(self.endpoint())).await.unwrap()
    }

    pub async fn admin(&self) -> Client {
        self.anonymous().await.with_api_key(ADMIN_TOKEN).unwrap()
    }

    /// Creates a producer; returns a client holding its key, its id and the key.
    pub async fn producer(&self, name: &str) -> (Client, String, String) {
        let created = self
            .admin()
            .await
            .admin()
            .create_producer(CreateProducerRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        let client = self.anonymous().await.with_api_key(&created.api_key).unwrap();
        (client, created.producer.unwrap().id, created.api_key)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn derive(client: &Client, event_type: &str) -> String {
    client
        .register()
        .derive_event_hash(DeriveEventHashRequest { event_type: event_type.into() })
        .await
        .unwrap()
        .into_inner()
        .event_hash
}

/// The ids of every event the caller may see, page by page through ListEvents, in order.
pub async fn listed_event_ids(client: &Client) -> Vec<String> {
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListEventsRequest { page_size: 1000, page_token, ..Default::default() };
        let page = client.delivery().list_events(request).await.unwrap().into_inner();
        ids.extend(page.events.into_iter().map(|event| event.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        page_token = page.next_page_token;
    }
}

pub fn listener_request(event_hash: &str, url: &str) -> RegisterListenerRequest {
    RegisterListenerRequest { event_hash: event_hash.into(), url: url.into(), ..Default::default() }
}

pub fn trigger_request(event_type: &str, payload: &[u8]) -> TriggerRequest {
    TriggerRequest { event_type: event_type.into(), payload: payload.to_vec(), ..Default::default() }
}

/// The real `hookd` binary, started as a child process; killed when dropped.
pub struct HookdProcess {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    /// Every line the process wrote to stderr so far (the log).
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
}

/// How a [`HookdProcess`] start ended before it served.
#[derive(Debug)]
pub struct StartFailure {
    pub status: std::process::ExitStatus,
    pub log: Vec<String>,
}

impl HookdProcess {
    /// Starts `hookd serve` on `data_dir` with a random loopback port and waits until it serves.
    pub async fn start(data_dir: &Path, env: &[(&str, &str)]) -> Result<Self, StartFailure> {
        Self::launch(data_dir, &["--listen", "127.0.0.1:0"], env).await
    }

    /// Like [`HookdProcess::start`], listening where `HOOKD_LISTEN` in `env` says.
    pub async fn start_listening(data_dir: &Path, env: &[(&str, &str)]) -> Result<Self, StartFailure> {
        Self::launch(data_dir, &[], env).await
    }

    async fn launch(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Self, StartFailure> {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_hookd"));
        command
            .arg("serve")
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("HOOKD_MASTER_KEY")
            .env_remove("HOOKD_ADMIN_TOKEN")
            .env_remove("HOOKD_STORE")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("the hookd binary starts");
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (serving_tx, mut serving_rx) = mpsc::unbounded_channel();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = log.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("hookd serving") {
                    let _ = serving_tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let started = tokio::time::timeout(DEADLINE, async {
            tokio::select! {
                Some(line) = serving_rx.recv() => Ok(line),
                status = child.wait() => Err(status.unwrap()),
            }
        })
        .await
        .expect("hookd either serves or exits within the deadline");
        match started {
            Ok(line) => {
                let addr = parse_addr(&line).unwrap_or_else(|| panic!("no address in {line:?}"));
                Ok(Self { child, addr, log })
            }
            Err(status) => {
                // The process has exited: its stderr ends, and the reader with it.
                bounded("reading the log of an exited process", reader).await.unwrap();
                Err(StartFailure { status, log: log.lock().unwrap().clone() })
            }
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        bounded("kill -9", self.child.wait()).await.unwrap();
    }

    /// SIGTERM, then waits for the exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("still running");
        let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
        assert!(status.success());
        bounded("graceful exit", self.child.wait()).await.unwrap()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

/// The `addr` field of a log line, text (`addr=...`) or JSON (`"addr":"..."`).
pub fn parse_addr(line: &str) -> Option<SocketAddr> {
    if let Some(start) = line.find("\"addr\":\"") {
        let rest = &line[start + "\"addr\":\"".len()..];
        return rest[..rest.find('"')?].parse().ok();
    }
    let start = line.find("addr=")? + "addr=".len();
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    rest[..end].trim_matches('"').parse().ok()
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

/// Whether `program` is an executable file on the `PATH`.
pub fn which(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Whether every outside tool `test` needs is there: (what, present). Where one is missing,
/// says so and the caller skips, except under CI (`CI=true`), which installs them all: there
/// a missing tool fails the test rather than hide it.
pub fn tools_present(test: &str, tools: &[(&str, bool)]) -> bool {
    let missing: Vec<&str> = tools.iter().filter(|(_, present)| !present).map(|(name, _)| *name).collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!("{test}: {} missing (.ci/run installs them)", missing.join(", "));
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
    eprintln!("SKIPPED {message}");
    false
}

/// A schema of its own in the PostgreSQL database `HOOKD_TEST_DATABASE_URL` names, for one
/// test's hookd to keep its state in (`HOOKD_STORE`); dropped with it. `None`, saying so,
/// when no database is configured (a failure under CI, which always configures one).
pub struct PgSchema {
    base: String,
    schema: String,
}

impl PgSchema {
    pub fn new(test: &str) -> Option<Self> {
        let base = std::env::var("HOOKD_TEST_DATABASE_URL").ok().filter(|url| !url.is_empty());
        if !tools_present(test, &[("a PostgreSQL database (HOOKD_TEST_DATABASE_URL)", base.is_some())]) {
            return None;
        }
        let base = base?;
        let schema = format!("hookd_e2e_{}", hookd_server::crypto::hex(&hookd_server::crypto::random_bytes::<8>()));
        let made = Self { base, schema };
        made.execute(&format!("CREATE SCHEMA {}", made.schema));
        Some(made)
    }

    /// The address hookd is given: the database, working in this schema.
    pub fn store_url(&self) -> String {
        let separator = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{separator}options=-csearch_path%3D{}", self.base, self.schema)
    }

    /// Every value stored in the schema's tables, as bytes (to search for what must not be
    /// there).
    pub fn dump(&self) -> Vec<u8> {
        let sql =
            format!("SELECT table_name::text FROM information_schema.tables WHERE table_schema = '{}'", self.schema);
        let (base, schema) = (self.base.clone(), self.schema.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await.unwrap();
                tokio::spawn(connection);
                let mut bytes = Vec::new();
                for table in client.query(&sql, &[]).await.unwrap() {
                    let table: String = table.get(0);
                    let rows = client.query(&format!("SELECT * FROM {schema}.{table}"), &[]).await.unwrap();
                    for row in rows {
                        for (index, column) in row.columns().iter().enumerate() {
                            let ty = column.type_();
                            if *ty == tokio_postgres::types::Type::BYTEA {
                                bytes.extend(row.get::<_, Option<Vec<u8>>>(index).unwrap_or_default());
                            } else if *ty == tokio_postgres::types::Type::TEXT {
                                bytes.extend(row.get::<_, Option<String>>(index).unwrap_or_default().into_bytes());
                            }
                            bytes.push(0);
                        }
                    }
                }
                bytes
            })
        })
        .join()
        .unwrap()
    }

    fn execute(&self, sql: &str) {
        let (base, sql) = (self.base.clone(), sql.to_owned());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await.unwrap();
                let connection = tokio::spawn(connection);
                client.batch_execute(&sql).await.unwrap();
                drop(client);
                let _ = connection.await;
            });
        })
        .join()
        .unwrap();
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        self.execute(&format!("DROP SCHEMA {} CASCADE", self.schema));
    }
}
