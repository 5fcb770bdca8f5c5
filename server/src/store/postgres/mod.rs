//! The PostgreSQL backend (`--store postgres://…`): [`Store`] on a database that several
//! hookd nodes can share.
//!
//! Everything runs on the backend's own small runtime (`hookd-pg` threads) with a bounded
//! pool of connections, so the caller's runtime never polls a database connection. Writes
//! are transactions that resolve once committed. The control plane (producers, API keys,
//! event hashes, listeners) is also kept in memory ([`directory`]) and changed after each
//! commit, so the synchronous reads that authentication, fan-out and the API make inline
//! never wait on the database; the event log is read from the database. Triggers are
//! committed in groups by one task ([`intake`]). This module never sees a plaintext secret
//! or API key: listener secrets arrive sealed, API keys as their SHA-256.
//!
//! The delivery pipeline's state ([`pipeline`]) and the history ([`history`]) are tables too.
//! Layout: see [`schema`].
//!
//! Several nodes may share one database. Each takes triggers; its memory follows what the
//! others write ([`follow_control`]: every admin write stamps its rows with the control
//! plane's next version, see [`Control`], so a node reads only what changed since the
//! version it knows), and it hears of their triggers by `NOTIFY`
//! ([`follow_log`]), publishing a head to fan-out only once its memory holds every listener
//! change made before it (see `intake::Publication`). One node at a time delivers: the one
//! holding the delivery lease ([`hold_lease`]); the others stand by to take over.

mod directory;
mod history;
mod intake;
mod pipeline;
mod schema;
mod term;
#[cfg(test)]
pub(crate) mod tests;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_postgres::NoTls;

use self::directory::{Changes, Directory, REMOVED_KEY, REMOVED_LISTENER};
use self::intake::{Groups, Head, Intake, Job, Publication};
use super::model::{
    ApiKeyEntry, Appended, DeletedListener, Event, EventHashEntry, Listener, NewEvent, Producer, decode, encode,
};
use super::{
    ListenerEdit, NOTE_BYTES, Note, PENDING_BYTES, RemoteChange, Store, StoreError, StoreFuture, append_weight,
};
use crate::ids;

/// Connections in the pool: the intake task keeps one, admin writes take one at a time, the
/// rest serve the pipeline and reads.
const POOL_SIZE: usize = 10;
/// Longest wait for a free connection.
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long opening a connection may take, unless the address says otherwise.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest wait for the delivery lease to be given back at close (it goes with the session anyway).
const UNLOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Idle time before a connection is probed, and between probes.
const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(10);
/// How long data sent may go unacknowledged before the connection is given up.
const SILENT_PEER: std::time::Duration = std::time::Duration::from_secs(30);
/// Appends waiting for the intake task before senders wait (backpressure).
const QUEUE_CAPACITY: usize = 8192;

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> Self {
        if transient(&error) { StoreError::Unavailable(Arc::new(error)) } else { StoreError::Backend(Arc::new(error)) }
    }
}

/// Whether an error says nothing about the statement, only that the database could not take
/// it now: the connection is gone, the server is starting or stopping or out of resources, or
/// it asked for the transaction to be tried again.
fn transient(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    if error.is_closed() {
        return true;
    }
    let Some(state) = error.code() else {
        // No SQLSTATE and not closed: an I/O error of the connection.
        return error.source_io().is_some();
    };
    // Class 08: connection exception; 53: insufficient resources; 57P: operator intervention
    // (shutdown, crash, cannot connect now).
    let class = state.code();
    class.starts_with("08")
        || class.starts_with("53")
        || class.starts_with("57P")
        || *state == SqlState::T_R_SERIALIZATION_FAILURE
        || *state == SqlState::T_R_DEADLOCK_DETECTED
}

trait SourceIo {
    fn source_io(&self) -> Option<&std::io::Error>;
}

impl SourceIo for tokio_postgres::Error {
    fn source_io(&self) -> Option<&std::io::Error> {
        std::error::Error::source(self).and_then(|source| source.downcast_ref::<std::io::Error>())
    }
}

/// The pool fails only to connect (or when closed): the database is out of reach.
impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        StoreError::Unavailable(Arc::new(error))
    }
}

/// A `u64` as PostgreSQL's `bigint` (every number hookd stores is far below 2^63).
pub(super) fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A `bigint` read back.
pub(super) fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn corrupt(table: &str, key: &str) -> StoreError {
    StoreError::Corrupt { key: format!("{table}/{key}") }
}

/// The PostgreSQL-backed [`Store`].
pub struct PgStore {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: Handle,
    pool: Pool,
    directory: Arc<RwLock<Directory>>,
    publication: Arc<Publication>,
    groups: Arc<Groups>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    intake: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Admin writes (producers, keys, hashes, listeners) one at a time on this node.
    admin_lock: Arc<tokio::sync::Mutex<()>>,
    pending_bytes: Arc<Semaphore>,
    listeners_generation: Arc<AtomicU64>,
    sync_seconds: Arc<OnceLock<prometheus_client::metrics::histogram::Histogram>>,
    /// Why this node takes no more triggers, should it have to stop: only a database whose
    /// event log went back behind what this node saw ([`Rewound`]). A lost connection fails
    /// its own calls only, and the next one tries again.
    failure: Arc<watch::Sender<Option<Arc<str>>>>,
    /// The version of the control plane that `directory` reflects (see [`Control`]).
    control_version: Arc<AtomicU64>,
    /// Where every node hears of new heads, control-plane changes and notes (`NOTIFY`).
    channel: Arc<str>,
    /// This node's name on the channel, so it skips its own notes.
    node: Arc<str>,
    /// The above with the publication, for the tasks that keep them current.
    memory: Memory,
    /// Cancelled when the store is closed.
    closing: tokio_util::sync::CancellationToken,
    /// The delivery term this node holds the lease for, 0 while it holds none (see
    /// [`hold_lease`]).
    lease: watch::Receiver<u64>,
    /// The delivery term the pipeline's writes are fenced with (see [`term`]).
    term: Arc<term::Term>,
    /// The task holding or seeking the lease, waited for at close (it gives the lease back).
    lease_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Other nodes' changes for the pipeline, until taken.
    remote_changes: Mutex<Option<mpsc::UnboundedReceiver<RemoteChange>>>,
    /// Notes for the other nodes, sent in order by one task.
    notes: mpsc::Sender<Note>,
}

/// How long [`PgStore::open_alone`] waits for the delivery lease: a free one is taken at once.
const ALONE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// How often a node without the delivery lease tries for it.
const LEASE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
/// How often the lease's holder checks that its session still answers.
const LEASE_CHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// How long that check may take before the node gives delivery up. The server ends a silent
/// session (and frees the lease) only after its keepalives fail ([`LEASE_KEEPALIVES`]),
/// later than this, so the holder stops before another node can start.
const LEASE_SILENCE: std::time::Duration = std::time::Duration::from_secs(5);
/// The server's keepalives on the lease's session: a holder gone silent loses the lease in
/// about 5 + 5 × 3 = 20 s; one that died (its connection reset) at once.
const LEASE_KEEPALIVES: &str =
    "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3";
/// The lease: a session advisory lock keyed by the schema, so nodes of other hookd
/// deployments in other schemas of the same database never contend.
const TAKE_LEASE: &str = "SELECT pg_try_advisory_lock(1752133483, hashtext(current_schema()))";

/// Holds the delivery lease while it can and seeks it while it cannot, until `closing`
/// (then gives it back). Several nodes may share a database: each takes triggers and serves
/// the API, and one at a time delivers, the one holding the lease; the others try for it
/// every [`LEASE_RETRY`] and take over the event log, the due queue and the parking lots from
/// where the last holder durably left them. A node that loses its session, or whose checks
/// go unanswered for [`LEASE_SILENCE`], stops delivering at once.
///
/// `stopping` (a child of `closing`) also ends it when this node must stop delivering for good
/// (see [`Rewound`]): the lease is given back, and `lease` stays false until `closing`.
async fn hold_lease(
    config: tokio_postgres::Config,
    lease: Lease,
    stopping: tokio_util::sync::CancellationToken,
    closing: tokio_util::sync::CancellationToken,
) {
    hold_lease_until(config, &lease, stopping).await;
    // The pipeline waits on `lease` for as long as the node runs.
    closing.cancelled().await;
}

/// [`hold_lease`] until `closing`.
async fn hold_lease_until(config: tokio_postgres::Config, lease: &Lease, closing: tokio_util::sync::CancellationToken) {
    loop {
        let held = lease_session(&config, lease, &closing).await;
        let had = lease.lost();
        match held {
            Ok(()) if closing.is_cancelled() => return,
            Ok(()) if had => {
                tracing::error!("this node lost the delivery lease (its session ended): it stops delivering")
            }
            Ok(()) => {}
            Err(error) if had => {
                tracing::error!(%error, "this node lost the delivery lease: it stops delivering");
            }
            Err(error) => tracing::warn!(%error, "cannot seek the delivery lease; trying again"),
        }
        if closing.run_until_cancelled(tokio::time::sleep(LEASE_RETRY)).await.is_none() {
            return;
        }
    }
}

/// The delivery lease as this node holds it: what the pipeline waits on, and the term its
/// writes are fenced with.
struct Lease {
    watch: watch::Sender<u64>,
    term: Arc<term::Term>,
}

impl Lease {
    fn took(&self, epoch: u64) {
        self.term.took(epoch);
        self.watch.send_replace(epoch);
    }

    /// Refuses the pipeline's writes, then tells it; returns whether the lease was held.
    fn lost(&self) -> bool {
        self.term.lost();
        self.watch.send_replace(0) != 0
    }
}

/// One session of [`hold_lease`]: seeks the lease, holds it while the session answers, and
/// returns when the session ends (or, given back, at `closing`).
async fn lease_session(
    config: &tokio_postgres::Config,
    lease: &Lease,
    closing: &tokio_util::sync::CancellationToken,
) -> Result<(), StoreError> {
    let (client, connection) = config.connect(NoTls).await?;
    let ended = tokio_util::sync::CancellationToken::new();
    let driver = tokio::spawn({
        let ended = ended.clone();
        async move {
            let _ = connection.await;
            ended.cancel();
        }
    });
    let held = async {
        client.batch_execute(LEASE_KEEPALIVES).await?;
        while !client.query_one(TAKE_LEASE, &[]).await?.get::<_, bool>(0) {
            tokio::select! {
                () = ended.cancelled() => return Ok(()),
                () = tokio::time::sleep(LEASE_RETRY) => {}
            }
        }
        // Whatever the last holder has under way commits before this, or not at all.
        let epoch = term::start(&client).await?;
        tracing::info!(term = epoch, "this node holds the delivery lease: it delivers");
        lease.took(epoch);
        loop {
            tokio::select! {
                () = ended.cancelled() => return Ok(()),
                () = tokio::time::sleep(LEASE_CHECK) => {}
            }
            match tokio::time::timeout(LEASE_SILENCE, client.simple_query("SELECT 1")).await {
                Ok(answered) => drop(answered?),
                Err(_) => {
                    return Err(StoreError::Unavailable(Arc::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the database did not answer the delivery lease's check in time",
                    ))));
                }
            }
        }
    };
    let result = match closing.run_until_cancelled(held).await {
        Some(result) => {
            // Delivery stops here now, not once the connection has given up (with a query
            // unanswered that may take as long as the socket's own timeout).
            lease.lost();
            result
        }
        None => {
            // Given back before the session ends, so a node started right after this one
            // stopped finds it free.
            lease.lost();
            let unlock = client.batch_execute("SELECT pg_advisory_unlock_all()");
            if !matches!(tokio::time::timeout(UNLOCK_WAIT, unlock).await, Ok(Ok(()))) {
                tracing::warn!("cannot give the delivery lease back; it goes with the session");
            }
            Ok(())
        }
    };
    drop(client);
    driver.abort();
    result
}

/// Eight random bytes.
fn rand_bytes() -> [u8; 8] {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the system's random source works");
    bytes
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

/// Runs `work` on `handle`'s runtime and waits for it on this thread, whatever runtime this
/// thread may be part of.
fn wait_on<T: Send + 'static>(
    handle: &Handle,
    work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = reply.send(work.await);
    });
    answer.recv().unwrap_or(Err(StoreError::Closed))
}

impl PgStore {
    /// Connects to the database at `address` (a `postgres://` URL or a key=value string),
    /// brings its schema up to date and loads the control plane. Other nodes may use the
    /// same database (schema): every node takes triggers, one at a time delivers (see
    /// [`hold_lease`]).
    pub fn open(address: &str) -> Result<Arc<Self>, StoreError> {
        let config: tokio_postgres::Config = address
            .parse()
            .map_err(|error| StoreError::Failed(format!("the database address is not valid: {error}").into()))?;
        Self::open_config(config)
    }

    /// Opens the database at `address` for work no node may run beside (`hookd rekey`):
    /// refused while another node runs, which it knows by the delivery lease.
    pub fn open_alone(address: &str) -> Result<Arc<Self>, StoreError> {
        Self::alone(Self::open(address)?)
    }

    /// `store`, if no other node runs on its database (see [`PgStore::open_alone`]).
    fn alone(store: Arc<Self>) -> Result<Arc<Self>, StoreError> {
        let mut lease = store.lease.clone();
        let held = wait_on(&store.handle, async move {
            let waited = tokio::time::timeout(ALONE_WAIT, lease.wait_for(|term| *term != 0)).await;
            Ok(matches!(waited, Ok(Ok(_))))
        });
        if matches!(held, Ok(true)) {
            return Ok(store);
        }
        store.close()?;
        Err(StoreError::Failed(
            "another hookd node is running on this database (it holds the delivery lease): stop every node first"
                .into(),
        ))
    }

    pub fn open_config(config: tokio_postgres::Config) -> Result<Arc<Self>, StoreError> {
        Self::open_polling(config, CONTROL_POLL)
    }

    /// [`PgStore::open_config`], looking for other nodes' changes every `poll` besides
    /// hearing of them.
    fn open_polling(mut config: tokio_postgres::Config, poll: std::time::Duration) -> Result<Arc<Self>, StoreError> {
        if config.get_connect_timeout().is_none() {
            // A database out of reach fails its callers in seconds rather than hang them.
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            // A connection whose peer went silent (no reset) is given up in this long,
            // rather than after the system's hours-long keepalive.
            config.keepalives_idle(KEEPALIVE_IDLE).keepalives_interval(KEEPALIVE_IDLE).tcp_user_timeout(SILENT_PEER);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hookd-pg")
            .enable_all()
            .build()
            .map_err(|error| StoreError::Failed(format!("cannot start the database threads: {error}").into()))?;
        let handle = runtime.handle().clone();
        let lock_config = config.clone();
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            // A call that finds every connection busy for this long is answered UNAVAILABLE.
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|error| StoreError::Failed(format!("cannot set up the database pool: {error}").into()))?;
        let opened = wait_on(&handle, {
            let pool = pool.clone();
            async move {
                let mut client = pool.get().await?;
                schema::check_isolation(&client).await?;
                schema::migrate(&mut client).await?;
                let (head, untracked, fresh) = snapshot(&mut client, None).await?;
                let mut directory = Directory::default();
                fresh.fill(&mut directory);
                let channel = client
                    .query_one("SELECT 'hookd_log_' || substr(md5(current_schema()), 1, 16)", &[])
                    .await?
                    .get::<_, String>(0);
                Ok((directory, head, untracked, channel))
            }
        });
        let (directory, head, untracked, channel) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                // Never blocks: opening may be called on an async thread.
                runtime.shutdown_background();
                return Err(error);
            }
        };
        let directory = Arc::new(RwLock::new(directory));
        let control_version = Arc::new(AtomicU64::new(head.version));
        let publication = Publication::new(head, control_version.clone());
        let channel: Arc<str> = channel.into();
        let reload_wanted = Arc::new(tokio::sync::Notify::new());
        let groups = Groups::new();
        let sync_seconds = Arc::new(OnceLock::new());
        let (jobs_tx, jobs_rx) = mpsc::channel(QUEUE_CAPACITY);
        let failure = Arc::new(watch::channel(None).0);
        let closing = tokio_util::sync::CancellationToken::new();
        // The lease is given up at close, and when this node must stop (see `Rewound`).
        let lease_stop = closing.child_token();
        let (lease_tx, lease) = watch::channel(0);
        let term = Arc::new(term::Term::default());
        let lease_task = handle.spawn(hold_lease(
            lock_config.clone(),
            Lease { watch: lease_tx, term: term.clone() },
            lease_stop.clone(),
            closing.clone(),
        ));
        let (changes_tx, remote_changes) = mpsc::unbounded_channel();
        let admin_lock: Arc<tokio::sync::Mutex<()>> = Arc::default();
        let listeners_generation = Arc::new(AtomicU64::new(0));
        let memory = Memory {
            directory: directory.clone(),
            generation: listeners_generation.clone(),
            known: control_version.clone(),
            untracked: Arc::new(AtomicU64::new(untracked)),
            whole_reads: Arc::default(),
            whole_next: Arc::default(),
            poll,
            publication: publication.clone(),
            reload_wanted: reload_wanted.clone(),
            changes: changes_tx,
            rewound: Rewound { failure: failure.clone(), lease_stop, last_known: Arc::default() },
        };
        handle.spawn(follow_control(pool.clone(), memory.clone(), admin_lock.clone(), closing.clone()));
        // This node's name on the channel, so it skips its own notes.
        let node: Arc<str> = crate::crypto::hex(&rand_bytes()).into();
        handle.spawn(follow_log(lock_config, channel.clone(), node.clone(), memory.clone(), closing.clone()));
        let (notes, outgoing) = mpsc::channel(NOTES_QUEUE);
        handle.spawn(announce_notes(pool.clone(), channel.clone(), node.clone(), outgoing));
        let intake = Intake {
            pool: pool.clone(),
            directory: directory.clone(),
            publication: publication.clone(),
            groups: groups.clone(),
            sync_seconds: sync_seconds.clone(),
            failure: failure.subscribe(),
            reload: reload_wanted.clone(),
            channel: channel.clone(),
            rewound: memory.rewound.clone(),
        };
        let intake = handle.spawn(intake.run(jobs_rx));
        Ok(Arc::new(Self {
            runtime: Mutex::new(Some(runtime)),
            handle,
            pool,
            directory,
            publication,
            groups,
            jobs: Mutex::new(Some(jobs_tx)),
            intake: Mutex::new(Some(intake)),
            admin_lock,
            pending_bytes: Arc::new(Semaphore::new(PENDING_BYTES as usize)),
            listeners_generation,
            control_version,
            channel,
            node,
            memory,
            sync_seconds,
            failure,
            closing,
            lease,
            term,
            lease_task: Mutex::new(Some(lease_task)),
            remote_changes: Mutex::new(Some(remote_changes)),
            notes,
        }))
    }

    fn memory(&self) -> Memory {
        self.memory.clone()
    }

    /// Outcome lines for other nodes' watchers, as notes of at most [`NOTE_BYTES`] each.
    fn outcome_notes(&self, outcomes: &str) -> Vec<String> {
        let mut notes = Vec::new();
        let mut note = String::new();
        for line in outcomes.split_inclusive('\n') {
            if !note.is_empty() && note.len() + line.len() > NOTE_BYTES {
                notes.push(note_text(&self.node, &Note::Outcomes(std::mem::take(&mut note))));
            }
            note.push_str(line);
        }
        if !note.is_empty() {
            notes.push(note_text(&self.node, &Note::Outcomes(note)));
        }
        notes
    }

    /// How many times this node read the control plane whole after it opened.
    #[cfg(test)]
    fn whole_reads(&self) -> u64 {
        self.memory.whole_reads.load(Ordering::Acquire)
    }

    /// The control plane's version this node's memory reflects.
    #[cfg(test)]
    fn known_version(&self) -> u64 {
        self.control_version.load(Ordering::Acquire)
    }

    fn directory(&self) -> std::sync::RwLockReadGuard<'_, Directory> {
        self.directory.read().expect("the directory lock is never poisoned")
    }

    fn closed(&self) -> bool {
        self.jobs.lock().expect("the intake sender lock is never poisoned").is_none()
    }

    /// A read of the database, waited for on this thread.
    fn read<T, F, Fut>(&self, read: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let pool = self.pool.clone();
        wait_on(&self.handle, async move { read(pool.get().await?).await })
    }

    /// Runs a write of producers, keys, hashes or listeners and resolves once it has
    /// committed and `write` has changed the directory: one at a time on this node and off
    /// the intake task, so no trigger waits behind it. With `fence`, this node's fan-out is
    /// held back from every event numbered from then on until `write` is done (a listener's
    /// registration or disabling point, which `write` takes with [`log_point`], must be in
    /// memory before fan-out reaches it; other nodes wait for the control plane's version).
    /// Then the intake group under way is waited for, so every trigger answered after this
    /// resolves was checked against the new state.
    fn admin<T, F, Fut>(&self, fence: bool, write: F) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object, Control) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let closed = self.closed();
        let control = Control { known: self.control_version.clone(), channel: self.channel.clone() };
        let (pool, publication, groups, serial) =
            (self.pool.clone(), self.publication.clone(), self.groups.clone(), self.admin_lock.clone());
        let memory = self.memory();
        let task = self.handle.spawn(async move {
            if closed {
                return Err(StoreError::Closed);
            }
            let _serial = serial.lock().await;
            let client = pool.get().await?;
            let fence = fence.then(|| publication.fence());
            let result = write(client, control).await;
            if matches!(result, Err(StoreError::Unavailable(_) | StoreError::Backend(_))) {
                // The commit may have happened all the same (the connection failed after it):
                // memory is read again from the database, so it does not miss a change.
                reload(&pool, &memory).await;
            }
            drop(fence);
            // What waited for this write's version to be in memory goes on.
            memory.publication.recheck();
            groups.wait_for_begun().await;
            result
        });
        Box::pin(async move { task.await.unwrap_or_else(|_| Err(StoreError::Closed)) })
    }

    /// Where fan-out's pairs may still have no record, for a listener: the cursor, or where
    /// it stands if it is fanned out apart and further back.
    async fn unsure_from(client: &impl deadpool_postgres::GenericClient, listener_id: &str) -> Result<u64, StoreError> {
        let cursor = pipeline::fanout_cursor(client).await?.next_seq;
        let detached =
            client.query_opt("SELECT from_seq FROM detached WHERE listener_id = $1", &[&listener_id]).await?;
        Ok(detached.map_or(cursor, |row| cursor.min(unsigned(row.get(0)))))
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.lock().expect("the runtime lock is never poisoned").take() {
            // Never blocks, so a store may be dropped on any thread, async ones included.
            runtime.shutdown_background();
        }
    }
}

/// What an admin write commits with: the control plane's version moves in the same
/// transaction, so every node sees that producers, keys, hashes or listeners changed, and
/// the rows it writes carry that version (`changed`), so other nodes read only those.
pub(super) struct Control {
    /// The version this node's memory reflects.
    known: Arc<AtomicU64>,
    /// Where the other nodes hear of the new version (see [`Control::commit`]).
    channel: Arc<str>,
}

/// The control plane's version moved on, first thing in an admin write's transaction.
const BUMP: &str = "UPDATE control_version SET version = version + 1, tracked = tracked + 1 WHERE id = 0 \
                    RETURNING version, set_config('idle_in_transaction_session_timeout', $1, true)";

/// Removals are kept for this many versions of the control plane: a node further behind
/// than that reads the control plane whole. (Small in tests, so they reach it.)
const REMOVALS_KEPT: i64 = if cfg!(test) { 64 } else { 4096 };
/// Removals are pruned every this many versions.
const PRUNE_EVERY: i64 = if cfg!(test) { 16 } else { 1024 };

impl Control {
    /// Moves the version on, first thing in `tx`, and returns it: the version this write's
    /// rows are stamped with. The version's row stays locked until `tx` ends, so writes from
    /// every node commit in the order of their versions, and a node that reads the version
    /// in a snapshot sees every row stamped with it or before; so the transaction, left open
    /// idle (its node cut off mid-write), is ended by the server after a while (see
    /// [`term::idle_limit`]). Now and then it also prunes old removals.
    async fn begin(&self, tx: &deadpool_postgres::Transaction<'_>) -> Result<i64, StoreError> {
        let version: i64 = tx.query_one(BUMP, &[&term::idle_limit()]).await?.get(0);
        if version % PRUNE_EVERY == 0 {
            let floor = version - REMOVALS_KEPT;
            tx.execute("DELETE FROM control_removals WHERE version <= $1", &[&floor]).await?;
            tx.execute("UPDATE control_version SET forgotten = GREATEST(forgotten, $1) WHERE id = 0", &[&floor])
                .await?;
        }
        Ok(version)
    }

    /// Commits `tx`, begun at `version`, telling the other nodes (a head with the new version,
    /// sent as the transaction commits, so they read the change at once rather than at their
    /// next look). When nothing else changed since this node's memory was last current, it is
    /// current again with this write applied (the caller applies it).
    async fn commit(&self, tx: deadpool_postgres::Transaction<'_>, version: i64) -> Result<(), StoreError> {
        let told =
            "SELECT pg_notify($1, (SELECT next_seq FROM log_head WHERE id = 0)::text || ' ' || $2::bigint::text)";
        tx.execute(told, &[&&*self.channel, &version]).await?;
        tx.commit().await?;
        let version = unsigned(version);
        let _ = self.known.compare_exchange(version - 1, version, Ordering::AcqRel, Ordering::Acquire);
        Ok(())
    }
}

/// Records that a row of `kind` (see [`directory::REMOVED_KEY`]) was removed at `version`.
async fn removed(
    client: &impl deadpool_postgres::GenericClient,
    version: i64,
    kind: &str,
    key: &[u8],
) -> Result<(), StoreError> {
    let sql = "INSERT INTO control_removals (version, kind, key) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
    client.execute(sql, &[&version, &kind, &key]).await?;
    Ok(())
}

/// How often a node looks for changes other nodes made, and for a head it was not told of.
const CONTROL_POLL: std::time::Duration = std::time::Duration::from_millis(250);
/// Notes waiting to be sent before more are refused (see [`Store::announce`]).
const NOTES_QUEUE: usize = 256;

/// A note as sent on the channel: its kind, the sending node, and what it says. Heads are
/// sent as `<next_seq> <version>` (see [`Head::to_text`]), which no kind starts like.
fn note_text(node: &str, note: &Note) -> String {
    match note {
        Note::Queued => format!("queued {node}"),
        Note::Watching(producer_id) => format!("watching {node} {producer_id}"),
        Note::Behind(producer_id) => format!("behind {node} {producer_id}"),
        Note::Outcomes(text) => format!("outcomes {node}\n{text}"),
        Note::Asking => format!("asking {node}"),
        Note::Standing { report, part, parts, text } => format!("standing {node} {report} {part} {parts}\n{text}"),
    }
}

/// The note in `payload` and the node that sent it, if it is one.
fn read_note(payload: &str) -> Option<(&str, Note)> {
    let (head, body) = payload.split_once('\n').unwrap_or((payload, ""));
    let mut words = head.splitn(3, ' ');
    let (kind, node, rest) = (words.next()?, words.next()?, words.next());
    let note = match (kind, rest) {
        ("queued", None) => Note::Queued,
        ("watching", Some(producer_id)) => Note::Watching(producer_id.to_owned()),
        ("behind", Some(producer_id)) => Note::Behind(producer_id.to_owned()),
        ("outcomes", None) => Note::Outcomes(body.to_owned()),
        ("asking", None) => Note::Asking,
        ("standing", Some(numbers)) => {
            let mut numbers = numbers.split(' ').map(str::parse);
            let (Some(Ok(report)), Some(Ok(part)), Some(Ok(parts)), None) =
                (numbers.next(), numbers.next(), numbers.next(), numbers.next())
            else {
                return None;
            };
            let (part, parts) = (u32::try_from(part).ok()?, u32::try_from(parts).ok()?);
            Note::Standing { report, part, parts, text: body.to_owned() }
        }
        _ => return None,
    };
    Some((node, note))
}

/// Sends this node's notes, in order, on one connection of the pool.
async fn announce_notes(pool: Pool, channel: Arc<str>, node: Arc<str>, mut notes: mpsc::Receiver<Note>) {
    while let Some(note) = notes.recv().await {
        let text = note_text(&node, &note);
        let told = async {
            pool.get().await?.execute("SELECT pg_notify($1, $2)", &[&&*channel, &text]).await?;
            Ok::<(), StoreError>(())
        };
        if let Err(error) = told.await {
            tracing::warn!(%error, "cannot tell the other nodes something (a retry queued, or what watchers watch)");
        }
    }
}
/// Pause before listening again after the listening session failed.
const LISTEN_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// What a node keeps in memory of the database, and what moves with it.
#[derive(Clone)]
struct Memory {
    directory: Arc<RwLock<Directory>>,
    /// Moves on after every change of listeners in `directory`.
    generation: Arc<AtomicU64>,
    /// The control plane's version `directory` reflects.
    known: Arc<AtomicU64>,
    /// How many versions of the control plane, as of `known`, were moved by writes that
    /// stamp no rows (a hookd of an older schema during an upgrade): when the database
    /// counts more, memory is read whole.
    untracked: Arc<AtomicU64>,
    /// How many times memory was read whole after it was first loaded.
    whole_reads: Arc<AtomicU64>,
    /// Set when the session listening to the other nodes was lost: the database may have
    /// been restored or failed over meanwhile, its history then no longer the one memory
    /// followed (versions repeat with other contents), so the next read is whole.
    whole_next: Arc<std::sync::atomic::AtomicBool>,
    /// How often [`follow_control`] looks for changes it was not told of.
    poll: std::time::Duration,
    publication: Arc<Publication>,
    /// Rung when a head waits for a newer control plane than `directory` reflects.
    reload_wanted: Arc<tokio::sync::Notify>,
    /// Listener changes found by a reload (made through other nodes), and work other nodes
    /// queued, for the pipeline.
    changes: mpsc::UnboundedSender<RemoteChange>,
    rewound: Rewound,
}

/// What a node does when it finds the database's event log shorter than the log it has
/// already seen committed: the database was restored to an earlier point, or failed over to a
/// replica that had not received the last commits, while the node ran. The events it saw
/// are gone from the database and new ones would get their numbers again, which delivery,
/// already past those numbers here, would skip. So the node stops as a failed disk stops
/// the embedded store: it takes no more triggers (they answer `UNAVAILABLE` with the cause,
/// health says `NOT_SERVING`) and gives up the delivery lease, until it is restarted. A
/// restarted node starts from the database as it is.
///
/// Every head this node has seen was committed on the primary, so a head read afterwards on
/// the primary is never shorter unless the database went back. It is checked where numbers
/// are given (each intake group, under the head's lock, before numbering) and at every fresh
/// read of the head (each look for changes, each reload, which a new listening session
/// always brings); a shorter head seen by a plain read is confirmed under a row lock first,
/// which a read-only replica refuses (a read balanced to a lagging replica stops nothing).
///
/// Should other nodes have filled a log gone back past this node's position before it reads
/// the head again, the head is long enough again. So the node also keeps the last event it
/// knows by its id (the last its intake committed or its fan-out read, whichever is later)
/// and checks that the log still holds it at its number: at each look for changes (taken
/// before the head is read), in the statement by which the intake locks the head, and after
/// every page fan-out reads, on the same connection. A restore or a failover ends every
/// connection, so what one connection reads comes from one database: the events a node
/// numbers or hands out next follow the one it knew, and a log refilled under it stops it
/// before it numbers or delivers anything past it. (A restore into the running server, which
/// README rules out, could slip between the statements of a connection; the tests model one
/// done between a node's reads.) Fan-out takes as known only rows below a head this
/// node had seen (the part of the log it has been told of). What no node can catch: events
/// it only counted (heard of by a head) and never read or committed, and an event it knew
/// that retention has trimmed since (a missing event stops nothing).
#[derive(Clone)]
struct Rewound {
    failure: Arc<watch::Sender<Option<Arc<str>>>>,
    lease_stop: tokio_util::sync::CancellationToken,
    /// The number and id of the last event this node's intake committed or its fan-out read
    /// (below the head it had seen).
    last_known: Arc<Mutex<Option<(u64, String)>>>,
}

impl Rewound {
    /// Stops the node: the head read on the primary (`read`), after this node had seen the
    /// log reach `seen`, is behind it. The cause, once stopped (the first cause stands).
    fn stop(&self, seen: u64, read: u64) -> Arc<str> {
        self.stop_for(format!(
            "the database's event log ends at event {read}, before event {seen} this node saw committed"
        ))
    }

    fn stop_for(&self, what: String) -> Arc<str> {
        let mut first = None;
        self.failure.send_if_modified(|failure| {
            if let Some(cause) = failure {
                first = Some(cause.clone());
                return false;
            }
            let cause: Arc<str> = format!(
                "{what}: the database was restored or failed over to an earlier point while this node ran; \
                 this node takes no more triggers and does not deliver until it is restarted"
            )
            .into();
            tracing::error!(%cause, "the database went back in time");
            *failure = Some(cause.clone());
            first = Some(cause);
            true
        });
        self.lease_stop.cancel();
        first.expect("set above or before")
    }

    /// Checks a head read without a lock (`read`, begun after this node had seen the log reach
    /// `seen`): if shorter, reads it again under a row lock, which only the primary takes, and
    /// stops the node if it is shorter still.
    async fn check(&self, pool: &Pool, seen: u64, read: u64) {
        if read >= seen || self.failure.borrow().is_some() {
            return;
        }
        let confirmed = async {
            let client = pool.get().await?;
            let row = client.query_one("SELECT next_seq FROM log_head WHERE id = 0 FOR SHARE", &[]).await?;
            Ok::<u64, StoreError>(unsigned(row.get(0)))
        };
        match confirmed.await {
            Ok(head) if head < seen => drop(self.stop(seen, head)),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot confirm a log head shorter than this node saw"),
        }
    }

    /// Remembers an event this node's intake committed, or its fan-out read below the head
    /// this node had seen, if it is the latest it knows.
    fn known(&self, seq: u64, event_id: &str) {
        let mut last = self.last_known.lock().expect("the last event's lock is never poisoned");
        if last.as_ref().is_none_or(|(last_seq, _)| *last_seq < seq) {
            *last = Some((seq, event_id.to_owned()));
        }
    }

    /// Stops the node: the database holds event `found` at number `seq`, where this node knew
    /// `event_id`. The cause, once stopped.
    fn replaced(&self, seq: u64, found: &str, event_id: &str) -> Arc<str> {
        self.stop_for(format!("the database holds event {found} at number {seq}, where this node saw {event_id}"))
    }

    /// The last event this node knows (see [`Rewound::known`]), to check against a head read
    /// after this: taken before, it is below that head unless the database went back.
    fn last_known(&self) -> Option<(u64, String)> {
        self.last_known.lock().expect("the last event's lock is never poisoned").clone()
    }

    /// Stops the node if `last` (from [`Rewound::last_known`], taken before the head was
    /// read), below the head read (`read`), has another id at its number now. An event gone
    /// (trimmed by retention) stops nothing.
    async fn check_known(&self, pool: &Pool, last: Option<(u64, String)>, read: u64) {
        let Some((seq, event_id)) = last.filter(|(seq, _)| *seq < read) else { return };
        if self.failure.borrow().is_some() {
            return;
        }
        let found = async {
            let client = pool.get().await?;
            let row = client.query_opt("SELECT id FROM events WHERE seq = $1", &[&signed(seq)]).await?;
            Ok::<Option<String>, StoreError>(row.map(|row| row.get(0)))
        };
        match found.await {
            Ok(Some(found)) if found != event_id => drop(self.replaced(seq, &found, &event_id)),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot check the last event this node knows"),
        }
    }
}

/// Keeps memory current with changes other nodes make: reads the control plane again
/// whenever its version is not the one memory reflects, and publishes the head read with it,
/// every [`CONTROL_POLL`] or at once when a head waits for it, until `closing`. A head told by
/// `NOTIFY` ([`follow_log`], sent by every trigger group and admin write) is faster; this is
/// what keeps a node right without it.
async fn follow_control(
    pool: Pool,
    memory: Memory,
    serial: Arc<tokio::sync::Mutex<()>>,
    closing: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = closing.cancelled() => return,
            () = tokio::time::sleep(memory.poll) => {}
            () = memory.reload_wanted.notified() => {}
        }
        let (seen, known) = (memory.publication.committed(), memory.rewound.last_known());
        let current = async {
            let client = pool.get().await?;
            Ok::<Head, StoreError>(Head::from_row(&client.query_one(Head::SQL, &[]).await?))
        };
        let current = current.await;
        if let Ok(head) = &current {
            memory.rewound.check(&pool, seen, head.next_seq).await;
            memory.rewound.check_known(&pool, known, head.next_seq).await;
        }
        match current {
            Ok(head)
                if head.version != memory.known.load(Ordering::Acquire)
                    || memory.whole_next.load(Ordering::Acquire) =>
            {
                // Between this node's own writes, so a reload never puts older data over a
                // change this node has just applied.
                let _serial = serial.lock().await;
                reload(&pool, &memory).await;
            }
            Ok(head) => {
                memory.publication.offer(head);
            }
            Err(error) => tracing::warn!(%error, "cannot look for changes other nodes made"),
        }
    }
}

/// Listens for the heads other nodes' intakes commit (`NOTIFY` on `channel`) and publishes
/// them, or gets memory read again first when they need a newer control plane; listens
/// again after a failure, until `closing`.
async fn follow_log(
    config: tokio_postgres::Config,
    channel: Arc<str>,
    node: Arc<str>,
    memory: Memory,
    closing: tokio_util::sync::CancellationToken,
) {
    loop {
        let listened = closing.run_until_cancelled(listen(&config, &channel, &node, &memory)).await;
        match listened {
            None => return,
            Some(Err(error)) => tracing::warn!(%error, "cannot listen for other nodes' triggers; trying again"),
            Some(Ok(())) => tracing::warn!("the session listening for other nodes' triggers ended; listening again"),
        }
        // Until memory is read whole, no head is published against it.
        memory.whole_next.store(true, Ordering::Release);
        memory.publication.suspect();
        if closing.run_until_cancelled(tokio::time::sleep(LISTEN_RETRY)).await.is_none() {
            return;
        }
    }
}

async fn listen(config: &tokio_postgres::Config, channel: &str, node: &str, memory: &Memory) -> Result<(), StoreError> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (notes, mut heard) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(note))) => {
                    if notes.send(note.payload().to_owned()).is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            }
        }
    });
    let listening = async {
        // A session gone silent (its node dead without a reset) must not hold notes back.
        client.batch_execute(LEASE_KEEPALIVES).await?;
        client.batch_execute(&format!("LISTEN \"{channel}\"")).await?;
        // Heads committed before listening began are read once.
        memory.publication.offer(Head::from_row(&client.query_one(Head::SQL, &[]).await?));
        memory.reload_wanted.notify_one();
        while let Some(payload) = heard.recv().await {
            if let Some((from, note)) = read_note(&payload) {
                if from != node {
                    let _ = memory.changes.send(RemoteChange::Note(note));
                }
                continue;
            }
            match Head::parse(&payload) {
                Some(head) => {
                    if !memory.publication.offer(head) {
                        memory.reload_wanted.notify_one();
                    }
                }
                None => tracing::warn!(%payload, "a notification of the log's head does not parse"),
            }
        }
        Ok::<(), StoreError>(())
    };
    let result = listening.await;
    driver.abort();
    result
}

/// The control plane as read from the database: whole, or what changed since memory's version.
enum Fresh {
    Whole(Directory),
    Changes(Changes),
}

impl Fresh {
    /// Brings `directory` up to date; returns the listeners that changed.
    fn fill(self, directory: &mut Directory) -> Vec<String> {
        match self {
            Fresh::Whole(fresh) => {
                let changed = directory.changed_listeners(&fresh);
                *directory = fresh;
                changed
            }
            Fresh::Changes(changes) => directory.apply(changes),
        }
    }
}

/// Whether memory, at version `known` with `untracked` versions moved by writes that stamp
/// no rows, can be brought to the database's snapshot (`version`, `untracked_now`, removals
/// pruned up to `forgotten`) by reading what changed since `known`.
fn changes_suffice(known: u64, untracked: u64, version: u64, untracked_now: u64, forgotten: u64) -> bool {
    untracked_now == untracked && known >= forgotten && known <= version
}

/// A read-only transaction on `client` that sees one snapshot of the database: a listing
/// that reads the records and then what still waits in the log shows a delivery recorded in
/// between once, as recorded or as waiting, never in neither half; a node reading the
/// control plane whole reads it as of one version. Left open idle (its node
/// cut off mid-listing), it ends as a write does (see [`term::limit_idle`]), rather than hold
/// vacuum and a migration's locks back for hours.
pub(super) async fn one_snapshot(
    client: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    term::limit_idle(&tx).await?;
    Ok(tx)
}

/// The log's head with the control plane's version, how many versions writes that stamp no
/// rows moved, and the control plane as of that version: whole, or, given memory's version
/// and untracked count (`memory_at`), what changed since when that suffices. One read-only
/// snapshot, so they agree.
async fn snapshot(
    client: &mut deadpool_postgres::Object,
    memory_at: Option<(u64, u64)>,
) -> Result<(Head, u64, Fresh), StoreError> {
    let tx = one_snapshot(client).await?;
    let head = Head::from_row(&tx.query_one(Head::SQL, &[]).await?);
    let row = tx.query_one("SELECT version - tracked, forgotten FROM control_version WHERE id = 0", &[]).await?;
    let (untracked, forgotten) = (unsigned(row.get(0)), unsigned(row.get(1)));
    let fresh = match memory_at {
        Some((known, was)) if changes_suffice(known, was, head.version, untracked, forgotten) => {
            Fresh::Changes(Directory::changes_since(&tx, known).await?)
        }
        _ => Fresh::Whole(Directory::load(&tx).await?),
    };
    tx.commit().await?;
    Ok((head, untracked, fresh))
}

/// Reads what changed in the control plane since the version memory reflects (all of it
/// when that cannot tell, see [`changes_suffice`]) into memory, with the version it now
/// reflects, and publishes the head read with it, when memory may have missed a change. Called one at a time with
/// this node's admin writes. Logs and keeps what it has (and the version it had, so the next
/// look tries again) when the database cannot say.
async fn reload(pool: &Pool, memory: &Memory) {
    // Whatever this node saw committed before the read, the read must see too.
    let seen = memory.publication.committed();
    let whole = memory.whole_next.swap(false, Ordering::AcqRel);
    let memory_at = (memory.known.load(Ordering::Acquire), memory.untracked.load(Ordering::Acquire));
    let fresh = async {
        let mut client = pool.get().await?;
        snapshot(&mut client, (!whole).then_some(memory_at)).await
    };
    match fresh.await {
        Ok((head, untracked, fresh)) => {
            memory.rewound.check(pool, seen, head.next_seq).await;
            let read_whole = matches!(fresh, Fresh::Whole(_));
            if read_whole {
                memory.whole_reads.fetch_add(1, Ordering::AcqRel);
            }
            let changed = fresh.fill(&mut memory.directory.write().expect("the directory lock is never poisoned"));
            memory.untracked.store(untracked, Ordering::Release);
            for listener_id in changed {
                // Nobody may listen (a node that never delivers); that is no error.
                let _ = memory.changes.send(RemoteChange::Listener(listener_id));
            }
            memory.generation.fetch_add(1, Ordering::AcqRel);
            memory.known.store(head.version, Ordering::Release);
            if read_whole {
                memory.publication.trust();
            }
            memory.publication.offer(head);
            memory.publication.recheck();
        }
        Err(error) => {
            memory.whole_next.fetch_or(whole, Ordering::AcqRel);
            tracing::warn!(%error, "cannot read producers and listeners again");
        }
    }
}

/// Where a listener write (registration, disabling, deletion) stands in the log: the number
/// the next event will get, under a shared lock on the head until the write commits, so no
/// group of triggers commits between reading it and committing (the point is exact on every
/// node, see [`Publication`]).
async fn log_point(tx: &deadpool_postgres::Transaction<'_>) -> Result<u64, StoreError> {
    let row = tx.query_one("SELECT next_seq FROM log_head WHERE id = 0 FOR SHARE", &[]).await?;
    Ok(unsigned(row.get(0)))
}

async fn read_meta(client: &impl deadpool_postgres::GenericClient, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(client.query_opt("SELECT value FROM hookd_meta WHERE name = $1", &[&name]).await?.map(|row| row.get(0)))
}

async fn write_meta(
    client: &impl deadpool_postgres::GenericClient,
    name: &str,
    value: &[u8],
) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO hookd_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            &[&name, &value],
        )
        .await?;
    Ok(())
}

/// Writes `listener`, stamped with the control plane's `version` (see [`Control::begin`]).
async fn write_listener(
    client: &impl deadpool_postgres::GenericClient,
    listener: &Listener,
    version: i64,
) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO listeners (id, producer_id, event_type, record, changed) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET record = excluded.record, changed = excluded.changed",
            &[&listener.id, &listener.producer_id, &listener.event_type, &encode(listener), &version],
        )
        .await?;
    Ok(())
}

async fn locked_listener(
    client: &impl deadpool_postgres::GenericClient,
    listener_id: &str,
) -> Result<Option<Listener>, StoreError> {
    match client.query_opt("SELECT record FROM listeners WHERE id = $1 FOR UPDATE", &[&listener_id]).await? {
        Some(row) => decode(row.get(0)).map(Some).ok_or_else(|| corrupt("listeners", listener_id)),
        None => Ok(None),
    }
}

async fn locked_producer(
    client: &impl deadpool_postgres::GenericClient,
    producer_id: &str,
) -> Result<Option<Producer>, StoreError> {
    match client.query_opt("SELECT record FROM producers WHERE id = $1 FOR UPDATE", &[&producer_id]).await? {
        Some(row) => decode(row.get(0)).map(Some).ok_or_else(|| corrupt("producers", producer_id)),
        None => Ok(None),
    }
}

/// Writes `producer`, stamped with the control plane's `version` (see [`Control::begin`]).
async fn write_producer(
    client: &impl deadpool_postgres::GenericClient,
    producer: &Producer,
    version: i64,
) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO producers (id, record, changed) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET record = excluded.record, changed = excluded.changed",
            &[&producer.id, &encode(producer), &version],
        )
        .await?;
    Ok(())
}

impl Store for PgStore {
    fn check_master_key(&self, accepted: &[(String, [u8; 32])]) -> Result<(), StoreError> {
        let (key_id, check) = accepted.first().expect("a master key is configured");
        let first = super::key_check_value(key_id, check);
        let stored = self.read(move |client| async move {
            client
                .execute(
                    "INSERT INTO hookd_meta (name, value) VALUES ('keycheck', $1) ON CONFLICT (name) DO NOTHING",
                    &[&first],
                )
                .await?;
            Ok(read_meta(&client, "keycheck").await?.unwrap_or_default())
        })?;
        super::match_master_key(&stored, accepted)
    }

    fn set_master_key(&self, key_id: &str, check: &[u8; 32]) -> Result<(), StoreError> {
        let value = super::key_check_value(key_id, check);
        self.read(move |client| async move { write_meta(&client, "keycheck", &value).await })
    }

    fn sealed_hash_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|client| async move { read_meta(&client, "hashkey").await })
    }

    fn set_sealed_hash_key(&self, sealed: &[u8]) -> Result<(), StoreError> {
        let sealed = sealed.to_vec();
        self.read(move |client| async move { write_meta(&client, "hashkey", &sealed).await })
    }

    fn create_producer(&self, producer: Producer, key_hash: [u8; 32]) -> StoreFuture<()> {
        let directory = self.directory.clone();
        self.admin(false, move |mut client, control| async move {
            let tx = client.transaction().await?;
            let version = control.begin(&tx).await?;
            // Producer before key, the order the intake locks them in.
            write_producer(&tx, &producer, version).await?;
            tx.execute(
                "INSERT INTO api_keys (key_hash, producer_id, expires_at_ms, changed) VALUES ($1, $2, 0, $3) \
                 ON CONFLICT (key_hash) DO UPDATE SET producer_id = excluded.producer_id, expires_at_ms = 0, \
                 changed = excluded.changed",
                &[&&key_hash[..], &producer.id, &version],
            )
            .await?;
            control.commit(tx, version).await?;
            let mut directory = directory.write().expect("the directory lock is never poisoned");
            directory
                .keys
                .insert(key_hash.to_vec(), ApiKeyEntry { producer_id: producer.id.clone(), expires_at_ms: 0 });
            directory.producers.insert(producer.id.clone(), producer);
            Ok(())
        })
    }

    fn producer(&self, producer_id: &str) -> Result<Option<Producer>, StoreError> {
        Ok(self.directory().producers.get(producer_id).cloned())
    }

    fn list_producers(&self, after: Option<&str>, limit: usize) -> Result<Vec<Producer>, StoreError> {
        let directory = self.directory();
        let after = after.unwrap_or("");
        Ok(directory
            .producers
            .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .take(limit)
            .map(|(_, producer)| producer.clone())
            .collect())
    }

    fn producer_by_key(&self, key_hash: &[u8; 32], now_ms: u64) -> Result<Option<Producer>, StoreError> {
        let directory = self.directory();
        let Some(key) = directory.keys.get(&key_hash[..]).filter(|key| key.valid_at(now_ms)) else {
            return Ok(None);
        };
        Ok(directory.producers.get(&key.producer_id).cloned())
    }

    fn rotate_producer_key(
        &self,
        producer_id: &str,
        new_key_hash: [u8; 32],
        now_ms: u64,
        grace_ms: u64,
    ) -> StoreFuture<bool> {
        let (producer_id, directory) = (producer_id.to_owned(), self.directory.clone());
        self.admin(false, move |mut client, control| async move {
            let tx = client.transaction().await?;
            let version = control.begin(&tx).await?;
            let Some(mut producer) = locked_producer(&tx, &producer_id).await? else {
                return Ok(false);
            };
            let mut kept = Vec::new();
            let mut changes: Vec<(Vec<u8>, Option<ApiKeyEntry>)> = Vec::new();
            for old in producer.key_hashes.drain(..) {
                let row = tx.query_opt("SELECT expires_at_ms FROM api_keys WHERE key_hash = $1", &[&old]).await?;
                let entry = row
                    .map(|row| ApiKeyEntry { producer_id: producer_id.clone(), expires_at_ms: unsigned(row.get(0)) });
                match entry {
                    Some(mut entry) if grace_ms > 0 && entry.valid_at(now_ms) => {
                        // A key already expiring sooner keeps its earlier end.
                        let end = now_ms.saturating_add(grace_ms);
                        entry.expires_at_ms = if entry.expires_at_ms == 0 { end } else { entry.expires_at_ms.min(end) };
                        tx.execute(
                            "UPDATE api_keys SET expires_at_ms = $2, changed = $3 WHERE key_hash = $1",
                            &[&old, &signed(entry.expires_at_ms), &version],
                        )
                        .await?;
                        changes.push((old.clone(), Some(entry)));
                        kept.push(old);
                    }
                    _ => {
                        tx.execute("DELETE FROM api_keys WHERE key_hash = $1", &[&old]).await?;
                        removed(&tx, version, REMOVED_KEY, &old).await?;
                        changes.push((old, None));
                    }
                }
            }
            tx.execute(
                "INSERT INTO api_keys (key_hash, producer_id, expires_at_ms, changed) VALUES ($1, $2, 0, $3) \
                 ON CONFLICT (key_hash) DO UPDATE SET producer_id = excluded.producer_id, expires_at_ms = 0, \
                 changed = excluded.changed",
                &[&&new_key_hash[..], &producer_id, &version],
            )
            .await?;
            changes.push((
                new_key_hash.to_vec(),
                Some(ApiKeyEntry { producer_id: producer_id.clone(), expires_at_ms: 0 }),
            ));
            kept.push(new_key_hash.to_vec());
            producer.key_hashes = kept;
            write_producer(&tx, &producer, version).await?;
            control.commit(tx, version).await?;
            let mut directory = directory.write().expect("the directory lock is never poisoned");
            for (hash, entry) in changes {
                match entry {
                    Some(entry) => directory.keys.insert(hash, entry),
                    None => directory.keys.remove(&hash),
                };
            }
            directory.producers.insert(producer_id, producer);
            Ok(true)
        })
    }

    fn set_producer_enabled(&self, producer_id: &str, enabled: bool, reason: String) -> StoreFuture<Option<Producer>> {
        let (producer_id, directory) = (producer_id.to_owned(), self.directory.clone());
        self.admin(false, move |mut client, control| async move {
            let tx = client.transaction().await?;
            let version = control.begin(&tx).await?;
            let Some(mut producer) = locked_producer(&tx, &producer_id).await? else {
                return Ok(None);
            };
            producer.enabled = enabled;
            producer.disabled_reason = if enabled { String::new() } else { reason };
            write_producer(&tx, &producer, version).await?;
            control.commit(tx, version).await?;
            let mut directory = directory.write().expect("the directory lock is never poisoned");
            directory.producers.insert(producer_id, producer.clone());
            Ok(Some(producer))
        })
    }

    fn put_event_hash(&self, event_hash: &str, entry: EventHashEntry) -> StoreFuture<()> {
        let (event_hash, directory) = (event_hash.to_owned(), self.directory.clone());
        self.admin(false, move |mut client, control| async move {
            let tx = client.transaction().await?;
            let version = control.begin(&tx).await?;
            tx.execute(
                "INSERT INTO event_hashes (event_hash, producer_id, event_type, changed) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (event_hash) DO UPDATE SET producer_id = excluded.producer_id, \
                 event_type = excluded.event_type, changed = excluded.changed",
                &[&event_hash, &entry.producer_id, &entry.event_type, &version],
            )
            .await?;
            control.commit(tx, version).await?;
            directory.write().expect("the directory lock is never poisoned").hashes.insert(event_hash, entry);
            Ok(())
        })
    }

    fn event_hash(&self, event_hash: &str) -> Result<Option<EventHashEntry>, StoreError> {
        Ok(self.directory().hashes.get(event_hash).cloned())
    }

    fn insert_listener(&self, mut listener: Listener) -> StoreFuture<()> {
        let (directory, generation) = (self.directory.clone(), self.listeners_generation.clone());
        self.admin(true, move |mut client, control| async move {
            let tx = client.transaction().await?;
            let version = control.begin(&tx).await?;
            listener.enabled_from_seq = log_point(&tx).await?;
            write_listener(&tx, &listener, version).await?;
            control.commit(tx, version).await?;
            directory.write().expect("the directory lock is never poisoned").put_listener(listener);
            generation.fetch_add(1, Ordering::AcqRel);
            Ok(())
        })
    }

    fn listener(&self, listener_id: &str) -> Result<Option<Listener>, StoreError> {
        Ok(self.directory().listener(listener_id).cloned())
    }

    fn list_listeners(
        &self,
        producer_id: &str,
        event_type: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Listener>, StoreError> {
        Ok(self.directory().list_listeners(producer_id, event_type, after, limit))
    }

    fn update_listener(&self, listener_id: &str, edit: ListenerEdit) -> StoreFuture<Option<Listener>> {
        let (listener_id, directory, generation) =
            (listener_id.to_owned(), self.directory.clone(), self.listeners_generation.clone());
        self.admin(true, move |mut client, control| async move {
            let tx = client.transaction().await?;
            let version = control.begin(&tx).await?;
            let next_seq = log_point(&tx).await?;
            let Some(mut listener) = locked_listener(&tx, &listener_id).await? else {
                return Ok(None);
            };
            let was_enabled = listener.enabled;
            edit(&mut listener);
            let fanout_next_seq = if !was_enabled && listener.enabled && listener.reenabling_prunes() {
                PgStore::unsure_from(&tx, &listener.id).await?
            } else {
                0
            };
            listener.edited(was_enabled, next_seq, fanout_next_seq);
            write_listener(&tx, &listener, version).await?;
            control.commit(tx, version).await?;
            directory.write().expect("the directory lock is never poisoned").put_listener(listener.clone());
            generation.fetch_add(1, Ordering::AcqRel);
            Ok(Some(listener))
        })
    }

    fn delete_listener(&self, listener_id: &str) -> StoreFuture<Option<DeletedListener>> {
        let (listener_id, directory, generation) =
            (listener_id.to_owned(), self.directory.clone(), self.listeners_generation.clone());
        // Behind the fence, like disabling: no event numbered from the deletion point on is
        // fanned out before the removal is in memory, so none reaches the deleted listener.
        self.admin(true, move |mut client, control| async move {
            let tx = client.transaction().await?;
            let version = control.begin(&tx).await?;
            let next_seq = log_point(&tx).await?;
            let Some(listener) = locked_listener(&tx, &listener_id).await? else {
                return Ok(None);
            };
            let unsure_from_seq = PgStore::unsure_from(&tx, &listener_id).await?;
            let ended = listener.deleted_at(next_seq);
            // What it was owed is cancelled from here, even after a crash: the record commits
            // with the removal. It keeps which events were the listener's, no secret.
            let kept = ended.without_secrets();
            tx.execute(
                "INSERT INTO deleted_owing (listener_id, unsure_from_seq, record) VALUES ($1, $2, $3) \
                 ON CONFLICT (listener_id) DO UPDATE SET unsure_from_seq = excluded.unsure_from_seq, record = excluded.record",
                &[&listener_id, &signed(unsure_from_seq), &encode(&kept)],
            )
            .await?;
            tx.execute("DELETE FROM listeners WHERE id = $1", &[&listener_id]).await?;
            removed(&tx, version, REMOVED_LISTENER, listener_id.as_bytes()).await?;
            control.commit(tx, version).await?;
            directory.write().expect("the directory lock is never poisoned").remove_listener(&listener_id);
            generation.fetch_add(1, Ordering::AcqRel);
            Ok(Some(DeletedListener { listener: ended, unsure_from_seq }))
        })
    }

    fn listeners_generation(&self) -> u64 {
        self.listeners_generation.load(Ordering::Acquire)
    }

    fn append_event(&self, event: NewEvent) -> StoreFuture<Appended> {
        let sender = self.jobs.lock().expect("the intake sender lock is never poisoned").clone();
        let pending_bytes = self.pending_bytes.clone();
        let weight = append_weight(event.payload.len());
        let (reply, answer) = oneshot::channel();
        Box::pin(async move {
            let sender = sender.ok_or(StoreError::Closed)?;
            let permit = pending_bytes.acquire_many_owned(weight).await.map_err(|_| StoreError::Closed)?;
            sender.send(Job { event, _permit: permit, reply }).await.map_err(|_| StoreError::Closed)?;
            answer.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn event(&self, event_id: &str) -> Result<Option<Event>, StoreError> {
        let Some(seq) = ids::event_seq(event_id) else {
            return Ok(None);
        };
        let event = self.read(move |client| async move {
            match client.query_opt("SELECT record FROM events WHERE seq = $1", &[&signed(seq)]).await? {
                Some(row) => decode::<Event>(row.get(0)).map(Some).ok_or(StoreError::DamagedEvent { seq }),
                None => Ok(None),
            }
        })?;
        // The random half of the id must match too: ids cannot be enumerated.
        Ok(event.filter(|event| event.id == event_id))
    }

    /// An acknowledged event is committed, and so readable: nothing to wait for.
    fn settled(&self) -> StoreFuture<()> {
        Box::pin(async { Ok(()) })
    }

    fn failure(&self) -> watch::Receiver<Option<Arc<str>>> {
        self.failure.subscribe()
    }

    fn durable_seq(&self) -> watch::Receiver<u64> {
        self.publication.subscribe()
    }

    fn observe_syncs(&self, histogram: prometheus_client::metrics::histogram::Histogram) {
        let _ = self.sync_seconds.set(histogram);
    }

    fn delivery_lease(&self) -> watch::Receiver<u64> {
        self.lease.clone()
    }

    fn begin_delivery(&self, term: u64) {
        self.term.begin(term);
    }

    fn remote_changes(&self) -> Option<mpsc::UnboundedReceiver<RemoteChange>> {
        self.remote_changes.lock().expect("the remote changes' lock is never poisoned").take()
    }

    fn database_bytes(&self) -> Result<Option<u64>, StoreError> {
        self.read(|client| async move {
            let row = client
                .query_one(
                    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relkind = 'r'",
                    &[],
                )
                .await?;
            Ok(Some(unsigned(row.get(0))))
        })
    }

    fn announce(&self, note: Note) -> bool {
        self.notes.try_send(note).is_ok()
    }

    fn close(&self) -> Result<(), StoreError> {
        self.closing.cancel();
        // Without senders the intake task commits what is queued and ends.
        drop(self.jobs.lock().expect("the intake sender lock is never poisoned").take());
        if let Some(intake) = self.intake.lock().expect("the intake handle lock is never poisoned").take() {
            wait_on(&self.handle, async move {
                intake.await.map_err(|_| StoreError::Failed("the intake task panicked".into()))
            })?;
        }
        self.pool.close();
        // The lease is given back before this returns, so a node started right after this one
        // stopped finds it free.
        if let Some(lease_task) = self.lease_task.lock().expect("the lease task's lock is never poisoned").take() {
            let _ = wait_on(&self.handle, async move {
                let _ = tokio::time::timeout(UNLOCK_WAIT * 2, lease_task).await;
                Ok(())
            });
        }
        Ok(())
    }
}
