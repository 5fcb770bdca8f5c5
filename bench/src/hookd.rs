//! The real `hookd` binary under test: built in release mode, started on a temporary data
//! directory (or, with `--store`, a schema of its own in a PostgreSQL database) with a random
//! loopback port, measured (RSS, data size) and killed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";

/// Builds `hookd` in release mode (a no-op when it is fresh) and returns its path, or the
/// path in `HOOKD_BENCH_BINARY` if that is set.
///
/// It builds into a target directory of its own: built beside the bench, `hookd-server`'s
/// dependencies get other features unified in, and each run would rebuild both.
pub fn build() -> Result<PathBuf, String> {
    // A binary built otherwise (say with frame pointers, for a profiler) may be given instead.
    if let Some(path) = std::env::var_os("HOOKD_BENCH_BINARY") {
        return Ok(PathBuf::from(path));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let exe = std::env::current_exe().map_err(|error| error.to_string())?;
    // The bench runs from <target>/release/hookd-bench.
    let target = exe.parent().and_then(Path::parent).ok_or("the bench binary has no target directory")?;
    let own_target = target.join("bench-hookd");
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "-p", "hookd-server", "--bin", "hookd", "--target-dir"])
        .arg(&own_target)
        .status()
        .map_err(|error| format!("cannot run cargo: {error}"))?;
    if !status.success() {
        return Err("building hookd failed".into());
    }
    let path = own_target.join("release").join("hookd");
    if path.exists() { Ok(path) } else { Err(format!("no hookd binary at {}", path.display())) }
}

pub struct Hookd {
    child: Child,
    pub endpoint: String,
    /// Its Prometheus endpoint (`/metrics`), if it serves one.
    pub metrics: Option<String>,
    pub pid: u32,
}

/// The PostgreSQL database hookd runs on (`--store`); the embedded one when unset.
static STORE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Runs every hookd of this bench on the PostgreSQL database at `address`.
pub fn use_store(address: String) {
    let _ = STORE.set(address);
}

/// Whether hookd runs on PostgreSQL in this bench.
pub fn on_postgres() -> bool {
    STORE.get().is_some()
}

/// A schema of its own in the `--store` database, for one instance; dropped with it.
pub struct Schema {
    address: String,
    name: String,
}

impl Schema {
    fn new(address: &str) -> Result<Self, String> {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).expect("random source");
        let name = format!("hookd_bench_{}", u64::from_le_bytes(random));
        let schema = Self { address: address.to_owned(), name };
        schema.execute(format!("CREATE SCHEMA {}", schema.name))?;
        Ok(schema)
    }

    /// The address hookd is given: the database, working in this schema.
    fn store_url(&self) -> String {
        let separator = if self.address.contains('?') { '&' } else { '?' };
        format!("{}{separator}options=-csearch_path%3D{}", self.address, self.name)
    }

    /// Runs `sql` from a thread of its own (callers are async).
    fn execute(&self, sql: String) -> Result<(), String> {
        let address = self.address.clone();
        std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let (client, connection) =
                    tokio_postgres::connect(&address, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
                let connection = tokio::spawn(connection);
                client.batch_execute(&sql).await.map_err(|e| e.to_string())?;
                drop(client);
                let _ = connection.await;
                Ok(())
            })
        })
        .join()
        .map_err(|_| "the database statement panicked".to_owned())?
    }

    /// Bytes the schema's tables and indexes take.
    fn bytes(&self) -> u64 {
        let (address, name) = (self.address.clone(), self.name.clone());
        std::thread::spawn(move || -> Option<u64> {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&address, tokio_postgres::NoTls).await.ok()?;
                tokio::spawn(connection);
                let row = client
                    .query_one(
                        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c \
                         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'",
                        &[&name],
                    )
                    .await
                    .ok()?;
                u64::try_from(row.get::<_, i64>(0)).ok()
            })
        })
        .join()
        .ok()
        .flatten()
        .unwrap_or(0)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = self.execute(format!("DROP SCHEMA {} CASCADE", self.name));
    }
}

/// A data directory (or PostgreSQL schema) and master key that outlive one process (for
/// restarts).
pub struct Instance {
    pub binary: PathBuf,
    pub dir: tempfile::TempDir,
    pub master_key: String,
    pub schema: Option<Schema>,
}

impl Instance {
    pub fn new(binary: &Path) -> Result<Self, String> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("random source");
        let master_key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key);
        let schema = STORE.get().map(|address| Schema::new(address)).transpose()?;
        let dir = tempfile::tempdir().map_err(|error| error.to_string())?;
        Ok(Self { binary: binary.to_owned(), dir, master_key, schema })
    }

    /// Starts hookd and waits until it serves.
    pub async fn start(&self, extra_env: &[(&str, &str)]) -> Result<Hookd, String> {
        self.start_in(self.dir.path(), extra_env).await
    }

    /// Starts another node of this instance's database with a data directory of its own.
    pub async fn start_in(&self, dir: &Path, extra_env: &[(&str, &str)]) -> Result<Hookd, String> {
        let mut child = Command::new(&self.binary)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .env("HOOKD_MASTER_KEY", &self.master_key)
            .env("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("HOOKD_METRICS_LISTEN", "127.0.0.1:0")
            .envs(self.schema.as_ref().map(|schema| ("HOOKD_STORE", schema.store_url())))
            // Only what the bench needs to read: the serving line, warnings and errors.
            .env("RUST_LOG", "warn,hookd_server=info,hookd_server::pipeline=warn")
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| format!("cannot start hookd: {error}"))?;
        let pid = child.id().ok_or("hookd exited at once")?;
        let mut lines = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
        fn addr(line: &str) -> Option<String> {
            let rest = &line[line.find("addr=")? + 5..];
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            Some(rest[..end].to_owned())
        }
        // The metrics line comes first, then the gRPC one.
        let (serving, metrics) = tokio::time::timeout(Duration::from_secs(60), async {
            let mut metrics = None;
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("metrics served") {
                    metrics = addr(&line);
                } else if let Some(serving) = addr(&line) {
                    return Some((serving, metrics));
                }
            }
            None
        })
        .await
        .map_err(|_| "hookd did not start within 60 s".to_owned())?
        .ok_or("hookd exited before serving")?;
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        // An older build (HOOKD_BENCH_BINARY) may serve none.
        let metrics = metrics.map(|metrics| format!("http://{metrics}/metrics"));
        Ok(Hookd { child, endpoint: format!("http://{serving}"), metrics, pid })
    }

    /// Size of the data directory (or of the PostgreSQL schema's tables), in MB.
    pub fn data_dir_mb(&self) -> f64 {
        if let Some(schema) = &self.schema {
            return schema.bytes() as f64 / 1e6;
        }
        fn size(path: &Path) -> u64 {
            std::fs::read_dir(path)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|entry| {
                            let path = entry.path();
                            if path.is_dir() { size(&path) } else { entry.metadata().map_or(0, |m| m.len()) }
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        size(self.dir.path()) as f64 / 1e6
    }
}

impl Hookd {
    /// Resident memory, in MB (Linux).
    pub fn rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1000.0)
    }

    /// CPU time the process has used so far, user and system, in seconds (Linux): steadier
    /// than throughput on a shared machine, for comparing two builds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid)
    }

    /// The value of an unlabelled gauge or counter in hookd's metrics, say
    /// `hookd_fanout_lag_events`.
    pub async fn metric(&self, name: &str) -> Result<f64, String> {
        let url = self.metrics.as_ref().ok_or("this hookd serves no metrics (a build before them?)")?;
        let text = reqwest::get(url)
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|error| format!("cannot scrape {url}: {error}"))?
            .text()
            .await
            .map_err(|error| error.to_string())?;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .ok_or_else(|| format!("{name} is not in hookd's metrics"))
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// CPU time (user and system, all threads) process `pid` has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the
    // 12th and 13th, in clock ticks (100 per second on Linux).
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|field| field.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU time all PostgreSQL server processes of this machine have used so far, in seconds
/// (0 when hookd runs on the embedded store): the database's share of hookd's work.
pub fn postgres_cpu_seconds() -> f64 {
    if !on_postgres() {
        return 0.0;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0.0 };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres"))
        .map(cpu_seconds)
        .sum()
}
