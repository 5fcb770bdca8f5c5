//! hookd on PostgreSQL (`HOOKD_STORE`), with the real binary, where it differs from the
//! embedded database: one node per database for now. (The crash and secrets tests run on
//! PostgreSQL too; see `crash.rs` and `secrets.rs`.)

use crate::support::{ADMIN_TOKEN, HookdProcess, PgSchema, master_key};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_on_one_database_is_refused_and_a_killed_nodes_place_is_free_at_once() {
    let Some(postgres) = PgSchema::new("a_second_node_on_one_database_is_refused") else { return };
    let (store, key) = (postgres.store_url(), master_key());
    let env = [("HOOKD_STORE", store.as_str()), ("HOOKD_MASTER_KEY", key.as_str()), ("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN)];
    let (first_dir, second_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = HookdProcess::start(first_dir.path(), &env).await.unwrap();

    let refused = HookdProcess::start(second_dir.path(), &env).await.err().expect("a second node is refused");
    assert!(!refused.status.success());
    let log = refused.log.join("\n");
    assert!(log.contains("another hookd node is running on this database"), "{log}");
    assert!(!log.contains(&key), "the log shows no master key");

    // The lock is the killed node's session's: it ends with its connection.
    first.kill9().await;
    assert!(HookdProcess::start(second_dir.path(), &env).await.unwrap().terminate().await.success());
}
