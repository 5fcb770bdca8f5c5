//! Configuration: flags and `HOOKD_*` environment variables, validated once into an
//! immutable [`Config`].
//!
//! Flags win over environment variables, which win over defaults (clap resolves that). With
//! nothing configured, hookd runs as a local development server: a missing admin token or
//! master key is generated into the data directory, and every such choice is reported as a
//! [`Notice`] for the caller to log. This module never logs or prints a secret: notices name
//! files, not contents. Invalid input is a [`ConfigError`] with a message for a human.

use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::crypto::{self, Keyring};
use crate::listen::TlsFiles;
use crate::pipeline::retry::parse_duration;
use crate::pipeline::target::Cidr;
use crate::pipeline::{PipelineConfig, PolicyKind, RetrySchedule, TargetPolicy};

/// Largest `--max-payload-bytes` accepted (64 MiB).
const MAX_PAYLOAD_LIMIT: u64 = 64 * 1024 * 1024;
/// Shortest admin token accepted, in characters.
const MIN_ADMIN_TOKEN_LEN: usize = 16;
const DEV_ADMIN_TOKEN_FILE: &str = "dev-admin-token";
const DEV_MASTER_KEY_FILE: &str = "dev-master-key";

/// hookd: durable, signed webhook delivery over gRPC.
#[derive(Debug, Parser)]
#[command(name = "hookd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// With hookd stopped, re-seal every listener secret under the master key (give the
    /// previous one as HOOKD_PREVIOUS_MASTER_KEY or --previous-master-key-file), then exit. A
    /// server started with both keys does the same by itself, beside the traffic.
    Rekey(ServeArgs),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of `hookd serve`; each also reads the environment variable it names.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the gRPC server.
    #[arg(long, env = "HOOKD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Directory of the embedded database (created if missing); with --store, it holds only
    /// the development key files, if any.
    #[arg(long, env = "HOOKD_DATA_DIR", default_value = "./hookd-data")]
    pub data_dir: PathBuf,
    /// Where hookd keeps its state: unset for the embedded database in --data-dir, or a
    /// PostgreSQL address (`postgres://user:password@host:5432/database`), whose schema hookd
    /// creates and migrates at start.
    #[arg(long, env = "HOOKD_STORE", hide_env_values = true)]
    pub store: Option<Redacted>,
    /// Token for AdminService calls (at least 16 characters). Generated into the data
    /// directory when unset (development only).
    #[arg(long, env = "HOOKD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Redacted>,
    /// File holding the master key (base64 of 32 bytes). `HOOKD_MASTER_KEY` gives the key
    /// itself instead. With neither, a key is generated into the data directory
    /// (development only).
    #[arg(long, env = "HOOKD_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// During a master key rotation: a file holding the previous master key, still accepted to
    /// open secrets sealed under it while hookd re-seals them under the new one.
    /// `HOOKD_PREVIOUS_MASTER_KEY` gives the key itself instead.
    #[arg(long, env = "HOOKD_PREVIOUS_MASTER_KEY_FILE")]
    pub previous_master_key_file: Option<PathBuf>,
    /// The previous master key itself (read from `HOOKD_PREVIOUS_MASTER_KEY`; not shown in help,
    /// so it is not given on a command line others can read).
    #[arg(long, env = "HOOKD_PREVIOUS_MASTER_KEY", hide = true, hide_env_values = true)]
    pub previous_master_key: Option<Redacted>,
    /// Largest accepted event payload, in bytes.
    #[arg(long, env = "HOOKD_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: u64,
    /// Log format.
    #[arg(long, env = "HOOKD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Delivery requests awaiting an answer at once from listeners in good standing.
    #[arg(long, env = "HOOKD_WORKERS", default_value_t = 256)]
    pub workers: usize,
    /// Delivery requests awaiting an answer at once from slow or failing listeners (a budget
    /// of their own, so they never hold up the others).
    #[arg(long, env = "HOOKD_SUSPECT_WORKERS", default_value_t = 256)]
    pub suspect_workers: usize,
    /// A request not answered within this makes its listener slow: its requests then draw from
    /// the suspect budget until one is answered in time (e.g. 1s, 500ms).
    #[arg(long, env = "HOOKD_SLOW_AFTER", default_value = "1s", value_parser = parse_duration)]
    pub slow_after: std::time::Duration,
    /// Time limit of one delivery attempt, connecting included (e.g. 15s, 500ms).
    #[arg(long, env = "HOOKD_ATTEMPT_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub attempt_timeout: std::time::Duration,
    /// Delays after each failed attempt, comma-separated: `1s,1s,2s` means at most 4 attempts.
    #[arg(long, env = "HOOKD_RETRY_SCHEDULE", default_value = "5s,5m,30m,2h,5h,10h,10h")]
    pub retry_schedule: RetrySchedule,
    /// Delivery requests awaiting an answer at once from one listener.
    #[arg(long, env = "HOOKD_LISTENER_IN_FLIGHT", default_value_t = 8)]
    pub listener_in_flight: usize,
    /// Disable a listener after this long with nothing but failed attempts (e.g. 5d, 12h).
    #[arg(long, env = "HOOKD_DISABLE_AFTER", default_value = "5d", value_parser = parse_duration)]
    pub disable_after: std::time::Duration,
    /// Which addresses deliveries may connect to: `default` refuses link-local and cloud
    /// metadata addresses, `strict` every non-public address, `open` nothing.
    #[arg(long, env = "HOOKD_TARGET_POLICY", value_enum, default_value_t = PolicyKind::Default)]
    pub target_policy: PolicyKind,
    /// How long events, their deliveries and attempts are kept (e.g. 30d, 12h); at least 1s.
    #[arg(long, env = "HOOKD_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub retention: std::time::Duration,
    /// Address ranges always allowed as targets, comma-separated (e.g. 10.1.0.0/16,fd00::/8).
    #[arg(long, env = "HOOKD_ALLOW_TARGETS", value_delimiter = ',')]
    pub allow_targets: Vec<Cidr>,
    /// PEM file with the server's TLS certificate chain (with --tls-key). Read again on SIGHUP
    /// and when the file changes.
    #[arg(long, env = "HOOKD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key of --tls-cert.
    #[arg(long, env = "HOOKD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Client connections open at once; more wait to be accepted.
    #[arg(long, env = "HOOKD_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Calls (HTTP/2 streams) open at once on one connection.
    #[arg(long, env = "HOOKD_MAX_STREAMS_PER_CONNECTION", default_value_t = DEFAULT_MAX_STREAMS)]
    pub max_streams_per_connection: u32,
    /// Payload bytes read from TriggerStream calls and not yet acknowledged, across all streams
    /// and connections; streams stop reading while it is used up.
    #[arg(long, env = "HOOKD_STREAM_BYTES_IN_FLIGHT", default_value_t = DEFAULT_STREAM_BYTES)]
    pub stream_bytes_in_flight: u64,
    /// Delivery watchers (WatchDeliveries) one producer may have open at once.
    #[arg(long, env = "HOOKD_MAX_WATCHERS_PER_PRODUCER", default_value_t = 16)]
    pub max_watchers_per_producer: usize,
    /// Most triggers a second from one producer (a second's worth may come at once); more are
    /// answered RESOURCE_EXHAUSTED with when to retry. 0: no limit.
    #[arg(long, env = "HOOKD_PRODUCER_TRIGGER_RATE", default_value_t = 0)]
    pub producer_trigger_rate: u32,
    /// Address to serve Prometheus metrics on (`GET /metrics`), e.g. 127.0.0.1:9464. Off when
    /// unset.
    #[arg(long, env = "HOOKD_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Address to serve the operator's web page on (behind the admin token), e.g.
    /// 127.0.0.1:8081. Off when unset.
    #[arg(long, env = "HOOKD_UI_LISTEN")]
    pub ui_listen: Option<String>,
}

/// Defaults of the intake limits.
const DEFAULT_MAX_CONNECTIONS: usize = 1024;
const DEFAULT_MAX_STREAMS: u32 = 128;
const DEFAULT_STREAM_BYTES: u64 = 256 * 1024 * 1024;

/// A configured secret: printed as `Redacted(..)`, so a debug log of the arguments shows no
/// token.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redacted(..)")
    }
}

impl std::str::FromStr for Redacted {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the database lives (the embedded one; development key files in any case).
    pub data_dir: PathBuf,
    /// The database: the embedded one in `data_dir`, or PostgreSQL.
    pub store: StoreKind,
    /// SHA-256 of the admin token (the token itself is not kept).
    pub admin_token_hash: [u8; 32],
    /// The master key's derived keys.
    pub keyring: Keyring,
    /// Largest accepted event payload, in bytes.
    pub max_payload_bytes: usize,
    /// How deliveries are made.
    pub pipeline: PipelineConfig,
    /// The server's certificate and key; plaintext when `None`.
    pub tls: Option<TlsFiles>,
    /// Client connections open at once.
    pub max_connections: usize,
    /// Calls open at once on one connection.
    pub max_streams_per_connection: u32,
    /// Payload bytes of TriggerStream items read and not yet acknowledged, in all.
    pub stream_bytes_in_flight: usize,
    /// Most triggers a second per producer; 0: no limit.
    pub producer_trigger_rate: u32,
    /// Where `/metrics` is served; nowhere when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the operator's web page is served; nowhere when `None`.
    pub ui_listen: Option<SocketAddr>,
}

impl Config {
    /// A configuration from explicit values, with defaults for the rest.
    pub fn new(data_dir: impl Into<PathBuf>, admin_token: &str, keyring: Keyring) -> Self {
        Self {
            data_dir: data_dir.into(),
            store: StoreKind::Embedded,
            admin_token_hash: crypto::hash_api_key(admin_token),
            keyring,
            max_payload_bytes: 1024 * 1024,
            pipeline: PipelineConfig::default(),
            tls: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_streams_per_connection: DEFAULT_MAX_STREAMS,
            stream_bytes_in_flight: DEFAULT_STREAM_BYTES as usize,
            producer_trigger_rate: 0,
            metrics_listen: None,
            ui_listen: None,
        }
    }
}

/// Which database hookd runs on.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// sled in the data directory.
    Embedded,
    /// PostgreSQL at this address.
    Postgres(String),
}

impl StoreKind {
    /// Where the state is, as a log line may show it: no password.
    pub fn describe(&self, data_dir: &Path) -> String {
        match self {
            StoreKind::Embedded => data_dir.display().to_string(),
            StoreKind::Postgres(address) => match url::Url::parse(address) {
                Ok(mut url) => {
                    if url.password().is_some() {
                        let _ = url.set_password(Some("..."));
                    }
                    url.to_string()
                }
                Err(_) => "the PostgreSQL database".to_owned(),
            },
        }
    }
}

impl std::fmt::Debug for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreKind::Embedded => f.write_str("Embedded"),
            StoreKind::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

/// Reads `--store`.
fn store_kind(store: Option<&Redacted>) -> Result<StoreKind, ConfigError> {
    let Some(Redacted(address)) = store.filter(|store| !store.0.trim().is_empty()) else {
        return Ok(StoreKind::Embedded);
    };
    if !(address.starts_with("postgres://") || address.starts_with("postgresql://")) {
        let shown = address.split_once("://").map_or("no scheme", |(scheme, _)| scheme);
        return Err(ConfigError::Store(format!("found {shown}")));
    }
    address
        .parse::<tokio_postgres::Config>()
        .map_err(|error| ConfigError::Store(format!("it does not parse: {error}")))?;
    Ok(StoreKind::Postgres(address.clone()))
}

/// Something the operator should know about the configuration that was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    GeneratedAdminToken(PathBuf),
    ReusedDevAdminToken(PathBuf),
    GeneratedMasterKey(PathBuf),
    /// The master key file sits inside the data directory: anyone with a copy of the
    /// directory can open the secrets in it.
    MasterKeyInsideDataDir(PathBuf),
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::GeneratedAdminToken(path) => write!(
                f,
                "no admin token configured: generated one into {} (development only; set HOOKD_ADMIN_TOKEN in production)",
                path.display()
            ),
            Notice::ReusedDevAdminToken(path) => write!(
                f,
                "no admin token configured: using the development token in {} (set HOOKD_ADMIN_TOKEN in production)",
                path.display()
            ),
            Notice::GeneratedMasterKey(path) => write!(
                f,
                "no master key configured: generated one into {} (development only; use HOOKD_MASTER_KEY or --master-key-file outside the data directory in production)",
                path.display()
            ),
            Notice::MasterKeyInsideDataDir(path) => write!(
                f,
                "the master key file {} is inside the data directory: this is for development only, since a copy of the directory then opens every secret in it",
                path.display()
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--listen / HOOKD_LISTEN: {0:?} is not an address like 127.0.0.1:50051")]
    Listen(String),
    #[error("--metrics-listen / HOOKD_METRICS_LISTEN: {0:?} is not an address like 127.0.0.1:9464")]
    MetricsListen(String),
    #[error("--ui-listen / HOOKD_UI_LISTEN: {0:?} is not an address like 127.0.0.1:8081")]
    UiListen(String),
    #[error("--admin-token / HOOKD_ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_LEN} characters")]
    AdminTokenTooShort,
    #[error("--max-payload-bytes / HOOKD_MAX_PAYLOAD_BYTES must be between 1 and {MAX_PAYLOAD_LIMIT}, not {0}")]
    MaxPayload(u64),
    #[error("give the master key by HOOKD_MASTER_KEY or by --master-key-file / HOOKD_MASTER_KEY_FILE, not both")]
    TwoMasterKeys,
    #[error(
        "give the previous master key by HOOKD_PREVIOUS_MASTER_KEY or by --previous-master-key-file / \
         HOOKD_PREVIOUS_MASTER_KEY_FILE, not both"
    )]
    TwoPreviousMasterKeys,
    #[error(
        "--workers, --suspect-workers, --listener-in-flight and --max-watchers-per-producer (HOOKD_WORKERS, \
         HOOKD_SUSPECT_WORKERS, HOOKD_LISTENER_IN_FLIGHT, HOOKD_MAX_WATCHERS_PER_PRODUCER) must be 1 to 10000"
    )]
    Workers,
    #[error("--slow-after / HOOKD_SLOW_AFTER must be between 10ms and --attempt-timeout")]
    SlowAfter,
    #[error("--attempt-timeout / HOOKD_ATTEMPT_TIMEOUT must be between 100ms and 10m")]
    AttemptTimeout,
    #[error("--retention / HOOKD_RETENTION must be at least 1s")]
    Retention,
    #[error("--store / HOOKD_STORE: give a PostgreSQL address starting with postgres:// or postgresql:// ({0})")]
    Store(String),
    #[error("HOOKD_MASTER_KEY is set but empty")]
    BlankMasterKey,
    #[error(transparent)]
    Tls(#[from] crate::listen::TlsError),
    #[error(
        "--max-connections / HOOKD_MAX_CONNECTIONS and --max-streams-per-connection / \
         HOOKD_MAX_STREAMS_PER_CONNECTION must be 1 to 1000000"
    )]
    Connections,
    #[error(
        "--stream-bytes-in-flight / HOOKD_STREAM_BYTES_IN_FLIGHT must be at least --max-payload-bytes ({0}) and at \
         most 4 GiB"
    )]
    StreamBytes(u64),
    #[error("{source_name}: {error}")]
    MasterKey {
        source_name: String,
        #[source]
        error: crypto::CryptoError,
    },
    #[error("{action} {path}: {error}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ConfigError + 'a {
    move |error| ConfigError::Io { action, path: path.to_owned(), error }
}

/// What [`resolve`] produces: the configuration, the listen address and what to tell the
/// operator.
#[derive(Debug)]
pub struct Resolved {
    pub config: Config,
    pub listen: SocketAddr,
    pub notices: Vec<Notice>,
}

/// Validates `args` (with `master_key_env`, the value of `HOOKD_MASTER_KEY`), creates the data
/// directory, and fills in development defaults where nothing was configured.
pub fn resolve(args: &ServeArgs, master_key_env: Option<String>) -> Result<Resolved, ConfigError> {
    let listen: SocketAddr = args.listen.parse().map_err(|_| ConfigError::Listen(args.listen.clone()))?;
    let metrics_listen = match &args.metrics_listen {
        Some(addr) => Some(addr.parse::<SocketAddr>().map_err(|_| ConfigError::MetricsListen(addr.clone()))?),
        None => None,
    };
    let ui_listen = match &args.ui_listen {
        Some(addr) => Some(addr.parse::<SocketAddr>().map_err(|_| ConfigError::UiListen(addr.clone()))?),
        None => None,
    };
    if args.max_payload_bytes == 0 || args.max_payload_bytes > MAX_PAYLOAD_LIMIT {
        return Err(ConfigError::MaxPayload(args.max_payload_bytes));
    }
    if args.admin_token.as_ref().is_some_and(|t| t.0.len() < MIN_ADMIN_TOKEN_LEN) {
        return Err(ConfigError::AdminTokenTooShort);
    }
    if !(1..=10_000).contains(&args.workers)
        || !(1..=10_000).contains(&args.suspect_workers)
        || !(1..=10_000).contains(&args.listener_in_flight)
        || !(1..=10_000).contains(&args.max_watchers_per_producer)
    {
        return Err(ConfigError::Workers);
    }
    if args.attempt_timeout < std::time::Duration::from_millis(100)
        || args.attempt_timeout > std::time::Duration::from_secs(600)
    {
        return Err(ConfigError::AttemptTimeout);
    }
    if args.slow_after < std::time::Duration::from_millis(10) || args.slow_after > args.attempt_timeout {
        return Err(ConfigError::SlowAfter);
    }
    if args.retention < std::time::Duration::from_secs(1) {
        return Err(ConfigError::Retention);
    }
    if !(1..=1_000_000).contains(&args.max_connections) || !(1..=1_000_000).contains(&args.max_streams_per_connection) {
        return Err(ConfigError::Connections);
    }
    // One item of the largest size must fit, or a stream could never read it.
    if args.stream_bytes_in_flight < args.max_payload_bytes || args.stream_bytes_in_flight > 4 << 30 {
        return Err(ConfigError::StreamBytes(args.max_payload_bytes));
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let files = TlsFiles { cert: cert.clone(), key: key.clone() };
            // Checked now, so a bad certificate is a configuration error (exit 2).
            crate::listen::server_config(&files)?;
            Some(files)
        }
        _ => None,
    };
    // Set but blank (e.g. a secret that failed to mount) must not fall back to a dev key.
    if master_key_env.as_ref().is_some_and(|key| key.trim().is_empty()) {
        return Err(ConfigError::BlankMasterKey);
    }
    if master_key_env.is_some() && args.master_key_file.is_some() {
        return Err(ConfigError::TwoMasterKeys);
    }

    let store = store_kind(args.store.as_ref())?;
    let data_dir = &args.data_dir;
    fs::create_dir_all(data_dir).map_err(io_error("cannot create the data directory", data_dir))?;
    let mut notices = Vec::new();

    let keyring = match (master_key_env, &args.master_key_file) {
        (Some(text), _) => Keyring::from_base64(&text)
            .map_err(|error| ConfigError::MasterKey { source_name: "HOOKD_MASTER_KEY".into(), error })?,
        (None, Some(path)) => {
            let text = fs::read_to_string(path).map_err(io_error("cannot read the master key file", path))?;
            if is_inside(path, data_dir) {
                notices.push(Notice::MasterKeyInsideDataDir(path.clone()));
            }
            Keyring::from_base64(&text).map_err(|error| ConfigError::MasterKey {
                source_name: format!("master key file {}", path.display()),
                error,
            })?
        }
        (None, None) => {
            let path = data_dir.join(DEV_MASTER_KEY_FILE);
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    let text = crypto::mint_master_key_base64();
                    write_private(&path, &text)?;
                    notices.push(Notice::GeneratedMasterKey(path.clone()));
                    text
                }
                Err(error) => return Err(io_error("cannot read the master key file", &path)(error)),
            };
            notices.push(Notice::MasterKeyInsideDataDir(path.clone()));
            Keyring::from_base64(&text).map_err(|error| ConfigError::MasterKey {
                source_name: format!("master key file {}", path.display()),
                error,
            })?
        }
    };
    let keyring = match (&args.previous_master_key, &args.previous_master_key_file) {
        (Some(_), Some(_)) => return Err(ConfigError::TwoPreviousMasterKeys),
        (Some(text), None) => keyring.with_previous(
            &Keyring::from_base64(&text.0)
                .map_err(|error| ConfigError::MasterKey { source_name: "HOOKD_PREVIOUS_MASTER_KEY".into(), error })?,
        ),
        (None, Some(path)) => {
            let text = fs::read_to_string(path).map_err(io_error("cannot read the previous master key file", path))?;
            keyring.with_previous(&Keyring::from_base64(&text).map_err(|error| ConfigError::MasterKey {
                source_name: format!("previous master key file {}", path.display()),
                error,
            })?)
        }
        (None, None) => keyring,
    };

    let admin_token = match &args.admin_token {
        Some(token) => token.0.clone(),
        None => {
            let path = data_dir.join(DEV_ADMIN_TOKEN_FILE);
            match fs::read_to_string(&path) {
                Ok(token) if token.trim().len() >= MIN_ADMIN_TOKEN_LEN => {
                    notices.push(Notice::ReusedDevAdminToken(path));
                    token.trim().to_owned()
                }
                Ok(_) => return Err(ConfigError::AdminTokenTooShort),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    let token = crypto::mint_token();
                    write_private(&path, &token)?;
                    notices.push(Notice::GeneratedAdminToken(path));
                    token
                }
                Err(error) => return Err(io_error("cannot read the admin token file", &path)(error)),
            }
        }
    };

    let mut config = Config::new(data_dir.clone(), &admin_token, keyring);
    config.store = store;
    config.max_payload_bytes = usize::try_from(args.max_payload_bytes).expect("limit checked above fits usize");
    config.pipeline = PipelineConfig {
        workers: args.workers,
        suspect_workers: args.suspect_workers,
        slow_after: args.slow_after,
        max_watchers_per_producer: args.max_watchers_per_producer,
        attempt_timeout: args.attempt_timeout,
        retry_schedule: args.retry_schedule.clone(),
        listener_in_flight: args.listener_in_flight,
        disable_after: args.disable_after,
        target_policy: TargetPolicy { kind: args.target_policy, allow: args.allow_targets.clone() },
        retention: args.retention,
    };
    config.tls = tls;
    config.metrics_listen = metrics_listen;
    config.ui_listen = ui_listen;
    config.max_connections = args.max_connections;
    config.max_streams_per_connection = args.max_streams_per_connection;
    config.stream_bytes_in_flight = usize::try_from(args.stream_bytes_in_flight).expect("checked to be at most 4 GiB");
    config.producer_trigger_rate = args.producer_trigger_rate;
    Ok(Resolved { config, listen, notices })
}

/// Whether `path` lies inside `dir` (both resolved when they exist).
fn is_inside(path: &Path, dir: &Path) -> bool {
    let resolve = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    resolve(path).starts_with(resolve(dir))
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, contents: &str) -> Result<(), ConfigError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io_error("cannot create", path))?;
    file.write_all(contents.as_bytes()).map_err(io_error("cannot write", path))?;
    file.sync_all().map_err(io_error("cannot sync", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(data_dir: &Path, extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["hookd", "serve", "--data-dir", data_dir.to_str().unwrap()];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).expect("arguments parse").command {
            Command::Serve(args) | Command::Rekey(args) => args,
        }
    }

    #[test]
    fn defaults_start_a_development_server() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let resolved = resolve(&args(&data, &[]), None).unwrap();
        assert_eq!(resolved.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(resolved.config.max_payload_bytes, 1024 * 1024);
        assert_eq!(resolved.config.pipeline.retry_schedule, RetrySchedule::standard());
        assert_eq!(resolved.config.pipeline.attempt_timeout, std::time::Duration::from_secs(15));
        assert_eq!(resolved.config.pipeline.workers, 256);
        assert_eq!(resolved.config.pipeline.suspect_workers, 256);
        assert_eq!(resolved.config.pipeline.slow_after, std::time::Duration::from_secs(1));
        assert_eq!(resolved.config.pipeline.max_watchers_per_producer, 16);
        assert_eq!(resolved.config.pipeline.listener_in_flight, 8);
        assert!(resolved.notices.contains(&Notice::GeneratedMasterKey(data.join(DEV_MASTER_KEY_FILE))));
        assert!(resolved.notices.contains(&Notice::GeneratedAdminToken(data.join(DEV_ADMIN_TOKEN_FILE))));

        // A second start reuses what the first generated.
        let again = resolve(&args(&data, &[]), None).unwrap();
        assert_eq!(again.config.keyring.key_id(), resolved.config.keyring.key_id());
        assert_eq!(again.config.admin_token_hash, resolved.config.admin_token_hash);
        assert!(again.notices.contains(&Notice::ReusedDevAdminToken(data.join(DEV_ADMIN_TOKEN_FILE))));
    }

    #[test]
    fn explicit_values_are_used() {
        let dir = tempfile::tempdir().unwrap();
        let key = crypto::mint_master_key_base64();
        let token = "a-long-enough-admin-token";
        let resolved = resolve(
            &args(
                dir.path(),
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--admin-token",
                    token,
                    "--max-payload-bytes",
                    "10",
                    "--retry-schedule",
                    "100ms,1s",
                    "--disable-after",
                    "2h",
                    "--target-policy",
                    "strict",
                    "--allow-targets",
                    "10.0.0.0/8,::1",
                ],
            ),
            Some(key.clone()),
        )
        .unwrap();
        assert_eq!(resolved.config.admin_token_hash, crypto::hash_api_key(token));
        assert_eq!(resolved.config.keyring.key_id(), Keyring::from_base64(&key).unwrap().key_id());
        assert_eq!(resolved.config.max_payload_bytes, 10);
        assert_eq!(resolved.config.pipeline.retry_schedule.max_attempts(), 3);
        assert_eq!(resolved.config.pipeline.disable_after, std::time::Duration::from_secs(7200));
        let policy = &resolved.config.pipeline.target_policy;
        assert_eq!(policy.kind, PolicyKind::Strict);
        assert_eq!(policy.allow, vec!["10.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()]);
        assert!(resolved.notices.is_empty());
    }

    #[test]
    fn the_admin_token_never_shows_in_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let parsed = args(dir.path(), &["--admin-token", "visible-if-leaked-123"]);
        assert!(!format!("{parsed:?}").contains("visible-if-leaked-123"));
    }

    #[test]
    fn master_key_file_inside_the_data_dir_is_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        fs::write(&path, crypto::mint_master_key_base64()).unwrap();
        let resolved = resolve(
            &args(dir.path(), &["--admin-token", "0123456789abcdef", "--master-key-file", path.to_str().unwrap()]),
            None,
        )
        .unwrap();
        assert_eq!(resolved.notices, vec![Notice::MasterKeyInsideDataDir(path)]);
    }

    #[test]
    fn invalid_values_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(Vec<&str>, Option<String>, &str)> = vec![
            (vec!["--listen", "nowhere"], None, "--listen"),
            (vec!["--admin-token", "short"], None, "at least 16"),
            (vec!["--max-payload-bytes", "0"], None, "HOOKD_MAX_PAYLOAD_BYTES"),
            (vec!["--workers", "0"], None, "HOOKD_WORKERS"),
            (vec!["--suspect-workers", "0"], None, "HOOKD_SUSPECT_WORKERS"),
            (vec!["--slow-after", "1h"], None, "HOOKD_SLOW_AFTER"),
            (vec!["--attempt-timeout", "1ms"], None, "HOOKD_ATTEMPT_TIMEOUT"),
            (vec!["--retention", "10ms"], None, "HOOKD_RETENTION"),
            (vec![], Some("bm90IDMyIGJ5dGVz".into()), "HOOKD_MASTER_KEY"),
            (vec!["--master-key-file", "/nonexistent/key"], None, "cannot read the master key file"),
            (vec!["--master-key-file", "/nonexistent/key"], Some(crypto::mint_master_key_base64()), "not both"),
            (vec![], Some("  ".into()), "set but empty"),
        ];
        for (extra, env, expected) in cases {
            let error = resolve(&args(dir.path(), &extra), env).unwrap_err().to_string();
            assert!(error.contains(expected), "{extra:?}: {error:?} should mention {expected:?}");
        }
    }

    #[test]
    fn malformed_values_are_refused_by_the_parser() {
        for bad in [
            ["--max-payload-bytes", "notanumber"],
            ["--retry-schedule", "soon"],
            ["--disable-after", "5"],
            ["--target-policy", "lax"],
            ["--allow-targets", "10.0.0.0/99"],
        ] {
            let parsed = Cli::try_parse_from(["hookd", "serve", bad[0], bad[1]]);
            assert!(parsed.is_err(), "{bad:?}");
        }
    }
}
