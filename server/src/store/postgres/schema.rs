//! The PostgreSQL schema and its migrations, embedded in the binary and applied at start.
//!
//! Migrations run in one transaction under a transaction-level advisory lock, so several
//! nodes starting at once apply each exactly once. A database whose schema is newer than
//! this binary knows is refused: an older hookd must not write into a layout it does not
//! understand. This module never changes a migration once released: a change is a new one.
//!
//! Listings by listener and type are served from memory (see `directory`), so `listeners`
//! has no index but its key. Values that carry a record keep it in `record` as [`model`](crate::store::model) encodes
//! it (version byte, then protobuf), as on sled: fields can be added without a migration.
//! Columns exist for what is looked up, ordered or filtered on. What the SQL avoids, so that
//! PG-wire distributed databases stay within reach: no stored procedures or triggers, no
//! `SERIAL` (numbers come from `log_head`), no table inheritance; it uses `unnest` of arrays,
//! `ON CONFLICT`, `FOR UPDATE` and advisory locks (CockroachDB has no advisory locks and no
//! `LISTEN`: see README "Running on PostgreSQL").

use tokio_postgres::Client;

use crate::store::StoreError;

/// Each migration, in order: migration `n` (1-based) brings the schema to version `n`.
const MIGRATIONS: &[&str] = &[
    // 1: the control plane, the event log, idempotency records and the delivery pipeline.
    // Text keys sort as bytes (`COLLATE "C"`), as ids do on sled.
    r#"CREATE TABLE hookd_meta (name text PRIMARY KEY, value bytea NOT NULL);
     CREATE TABLE log_head (
         id smallint PRIMARY KEY CHECK (id = 0),
         next_seq bigint NOT NULL,
         last_created_ms bigint NOT NULL
     );
     INSERT INTO log_head VALUES (0, 0, 0);
     CREATE TABLE producers (id text COLLATE "C" PRIMARY KEY, record bytea NOT NULL);
     CREATE TABLE api_keys (
         key_hash bytea PRIMARY KEY,
         producer_id text COLLATE "C" NOT NULL,
         expires_at_ms bigint NOT NULL
     );
     CREATE TABLE event_hashes (
         event_hash text COLLATE "C" PRIMARY KEY,
         producer_id text COLLATE "C" NOT NULL,
         event_type text COLLATE "C" NOT NULL
     );
     CREATE TABLE listeners (
         id text COLLATE "C" PRIMARY KEY,
         producer_id text COLLATE "C" NOT NULL,
         event_type text COLLATE "C" NOT NULL,
         record bytea NOT NULL
     );
     CREATE TABLE events (
         seq bigint PRIMARY KEY,
         id text COLLATE "C" NOT NULL,
         producer_id text COLLATE "C" NOT NULL,
         event_type text COLLATE "C" NOT NULL,
         created_ms bigint NOT NULL,
         record bytea NOT NULL
     );
     CREATE INDEX events_by_producer ON events (producer_id, seq);
     CREATE INDEX events_by_time ON events (created_ms, seq);
     CREATE TABLE idempotency (
         producer_id text COLLATE "C" NOT NULL,
         key text COLLATE "C" NOT NULL,
         event_id text COLLATE "C" NOT NULL,
         created_ms bigint NOT NULL,
         PRIMARY KEY (producer_id, key)
     );
     CREATE INDEX idempotency_by_time ON idempotency (created_ms);
     CREATE TABLE fanout_cursor (id smallint PRIMARY KEY CHECK (id = 0), record bytea NOT NULL);
     CREATE TABLE detached (listener_id text COLLATE "C" PRIMARY KEY, from_seq bigint NOT NULL);
     CREATE TABLE deleted_owing (
         listener_id text COLLATE "C" PRIMARY KEY,
         unsure_from_seq bigint NOT NULL,
         record bytea NOT NULL
     );
     CREATE TABLE quarantined (seq bigint PRIMARY KEY, record bytea NOT NULL);
     CREATE TABLE deliveries (
         id text COLLATE "C" PRIMARY KEY,
         listener_id text COLLATE "C" NOT NULL,
         event_seq bigint NOT NULL,
         state smallint NOT NULL,
         created_ms bigint NOT NULL,
         record bytea NOT NULL
     );
     CREATE INDEX deliveries_by_listener ON deliveries (listener_id, id);
     CREATE INDEX deliveries_by_event ON deliveries (event_seq, id);
     CREATE TABLE due (
         due_ms bigint NOT NULL,
         key_id text COLLATE "C" NOT NULL,
         listener_id text COLLATE "C" NOT NULL,
         PRIMARY KEY (due_ms, key_id)
     );
     CREATE TABLE parked (
         listener_id text COLLATE "C" NOT NULL,
         key_id text COLLATE "C" NOT NULL,
         due_ms bigint NOT NULL,
         PRIMARY KEY (listener_id, key_id)
     );
     CREATE TABLE ordered_pending (
         listener_id text COLLATE "C" NOT NULL,
         delivery_id text COLLATE "C" NOT NULL,
         PRIMARY KEY (listener_id, delivery_id)
     );
     CREATE TABLE manual_queued (
         delivery_id text COLLATE "C" NOT NULL,
         due_ms bigint NOT NULL,
         PRIMARY KEY (delivery_id, due_ms)
     );
     CREATE TABLE attempts (
         delivery_id text COLLATE "C" NOT NULL,
         number integer NOT NULL,
         record bytea NOT NULL,
         PRIMARY KEY (delivery_id, number)
     );
     CREATE TABLE listener_health (listener_id text COLLATE "C" PRIMARY KEY, record bytea NOT NULL);"#,
    // 2: retention finds an event's idempotency record by the event, without its payload.
    "CREATE INDEX idempotency_by_event ON idempotency (event_id);",
    // 3: the control plane's version, moved by every admin write, so each node sees that
    // producers, keys, hashes or listeners changed.
    "CREATE TABLE control_version (id smallint PRIMARY KEY CHECK (id = 0), version bigint NOT NULL);
     INSERT INTO control_version VALUES (0, 0);",
    // 4: each row of the control plane says at which version it last changed, and removals
    // are kept for a while, so a node reads only what changed since the version it knows.
    // `tracked` moves with `version` on every write that stamps its rows (a hookd of schema
    // 3 still running during an upgrade moves `version` alone: the gap tells the others to
    // read everything); removals at or below `forgotten` have been pruned.
    "ALTER TABLE control_version ADD COLUMN tracked bigint NOT NULL DEFAULT 0,
         ADD COLUMN forgotten bigint NOT NULL DEFAULT 0;
     UPDATE control_version SET tracked = version, forgotten = version;
     ALTER TABLE producers ADD COLUMN changed bigint NOT NULL DEFAULT 0;
     ALTER TABLE api_keys ADD COLUMN changed bigint NOT NULL DEFAULT 0;
     ALTER TABLE event_hashes ADD COLUMN changed bigint NOT NULL DEFAULT 0;
     ALTER TABLE listeners ADD COLUMN changed bigint NOT NULL DEFAULT 0;
     CREATE INDEX producers_by_change ON producers (changed);
     CREATE INDEX api_keys_by_change ON api_keys (changed);
     CREATE INDEX event_hashes_by_change ON event_hashes (changed);
     CREATE INDEX listeners_by_change ON listeners (changed);
     CREATE TABLE control_removals (
         version bigint NOT NULL,
         kind text COLLATE \"C\" NOT NULL,
         key bytea NOT NULL,
         PRIMARY KEY (version, kind, key)
     );",
    // 5: the delivery term, moved on by each node that takes the delivery lease; every write
    // of the pipeline checks it (see `term`).
    "CREATE TABLE delivery_term (id smallint PRIMARY KEY CHECK (id = 0), epoch bigint NOT NULL);
     INSERT INTO delivery_term VALUES (0, 0);",
];

/// The schema version this binary writes.
pub(super) const VERSION: i32 = MIGRATIONS.len() as i32;

/// Any number: it only has to be the same on every node.
const MIGRATION_LOCK: i64 = 0x0068_6f6f_6b64;

/// How many times a migration the database turned back as transient (a deadlock with a
/// node of the previous version still running, which takes its locks in another order) is
/// tried before the start fails.
const MIGRATION_TRIES: u32 = 5;

/// Brings the schema up to [`VERSION`], or refuses a newer one. Returns the version found.
/// Refuses a database whose transactions are not `read committed` by default (a role or a
/// database set to `repeatable read` or `serializable`): the intake, the migrations and every
/// locking write are written for statements that see what committed before they ran.
pub(super) async fn check_isolation(client: &Client) -> Result<(), StoreError> {
    let row = client.query_one("SELECT current_setting('default_transaction_isolation')", &[]).await?;
    let level: String = row.get(0);
    if level == "read committed" {
        return Ok(());
    }
    Err(StoreError::Failed(
        format!(
            "hookd needs transactions at the `read committed` isolation level, and this database's role or \
             database sets `default_transaction_isolation` to `{level}`: set it back (ALTER ROLE … SET \
             default_transaction_isolation = 'read committed') or give hookd a role of its own"
        )
        .into(),
    ))
}

pub(super) async fn migrate(client: &mut Client) -> Result<i32, StoreError> {
    let mut tries = 1;
    loop {
        match migrate_to(client, VERSION).await {
            Err(StoreError::Unavailable(error)) if tries < MIGRATION_TRIES && !client.is_closed() => {
                tracing::warn!(%error, "a database migration was turned back; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(tries))).await;
                tries += 1;
            }
            done => return done,
        }
    }
}

/// Brings the schema up to `target` (at most [`VERSION`]), or refuses one newer than this
/// binary knows. Returns the version found.
pub(super) async fn migrate_to(client: &mut Client, target: i32) -> Result<i32, StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS hookd_schema (version integer NOT NULL)").await?;
    let found: i32 = match tx.query_opt("SELECT version FROM hookd_schema", &[]).await? {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO hookd_schema VALUES (0)", &[]).await?;
            0
        }
    };
    if found > VERSION {
        return Err(StoreError::Failed(
            format!(
                "the database's hookd schema is version {found}, newer than this hookd knows (version {VERSION}): \
                 run the hookd that wrote it, or a newer one"
            )
            .into(),
        ));
    }
    let (from, to) = (usize::try_from(found).unwrap_or(0), usize::try_from(target).unwrap_or(0));
    for (index, migration) in MIGRATIONS.iter().enumerate().take(to).skip(from) {
        tx.batch_execute(migration).await?;
        let version = i32::try_from(index + 1).expect("migrations are few");
        tx.execute("UPDATE hookd_schema SET version = $1", &[&version]).await?;
        tracing::info!(version, "applied a database migration");
    }
    tx.commit().await?;
    Ok(found)
}
