//! The PostgreSQL backend's tests, on a real server: `HOOKD_TEST_DATABASE_URL` names it (say
//! `postgres://postgres@127.0.0.1:5432/test`). Each test works in a schema of its own, dropped
//! after it. Without the variable every test here says it was skipped and passes, except
//! under `CI=true`, where a missing database is a failure.

use std::sync::Arc;

use super::{Nodes, PgStore};
use crate::store::conformance::{Place, new_event, with_producers};
use crate::store::{Store, StoreError};

/// The database the tests use, if one is configured.
pub(crate) fn database_url() -> Option<String> {
    match std::env::var("HOOKD_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let ci = std::env::var("CI").is_ok_and(|value| !value.is_empty() && value != "false");
            assert!(!ci, "HOOKD_TEST_DATABASE_URL must name a PostgreSQL database under CI");
            eprintln!("skipped: HOOKD_TEST_DATABASE_URL is not set, so this PostgreSQL test did not run");
            None
        }
    }
}

/// Runs `sql` on the database at `url`, from a thread of its own (callers may be async).
fn execute(url: &str, sql: String) {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            let connection = tokio::spawn(connection);
            client.batch_execute(&sql).await.unwrap();
            drop(client);
            let _ = connection.await;
        });
    })
    .join()
    .expect("the database statement ran");
}

/// A schema of its own in the test database, dropped with the place.
pub(crate) struct PgPlace(Option<(String, String)>);

impl PgPlace {
    pub(crate) fn new() -> Self {
        let Some(url) = database_url() else {
            return Self(None);
        };
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).unwrap();
        let schema = format!("hookd_test_{}", crate::crypto::hex(&random));
        execute(&url, format!("CREATE SCHEMA {schema}"));
        Self(Some((url, schema)))
    }

    fn try_open(&self) -> Result<Arc<PgStore>, StoreError> {
        self.open_as(Nodes::One)
    }

    fn open_as(&self, nodes: Nodes) -> Result<Arc<PgStore>, StoreError> {
        let (url, schema) = self.0.as_ref().expect("opened only when available");
        let mut config: tokio_postgres::Config = url.parse().unwrap();
        config.options(format!("-c search_path={schema}"));
        PgStore::open_config(config, nodes)
    }

    fn execute(&self, sql: &str) {
        let (url, schema) = self.0.as_ref().expect("used only when available");
        execute(url, format!("SET search_path TO {schema}; {sql}"));
    }
}

impl Drop for PgPlace {
    fn drop(&mut self) {
        if let Some((url, schema)) = self.0.take() {
            execute(&url, format!("DROP SCHEMA {schema} CASCADE"));
        }
    }
}

impl Place for PgPlace {
    type Backend = PgStore;
    fn open(&self) -> Arc<PgStore> {
        self.try_open().unwrap()
    }
    fn available(&self) -> bool {
        self.0.is_some()
    }
}

mod conformance {
    crate::store::conformance::conformance_tests!(super::PgPlace::new());
}

#[tokio::test]
async fn a_database_with_a_newer_schema_is_refused_and_left_as_it_is() {
    let place = PgPlace::new();
    if !place.available() {
        return;
    }
    place.open().close().unwrap();
    place.execute("UPDATE hookd_schema SET version = 99");
    let error = place.try_open().unwrap_err().to_string();
    assert!(error.contains("version 99, newer than this hookd knows"), "{error}");
    place.execute("UPDATE hookd_schema SET version = 1");
    place.open().close().unwrap();
}

/// Two stores on one database number their triggers from one log: every number once, no
/// hole, in the order they committed (the intake is ready for several nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_number_their_triggers_from_one_log() {
    let place = PgPlace::new();
    if !place.available() {
        return;
    }
    let shared = || place.open_as(Nodes::Shared).unwrap();
    let nodes = [with_producers(shared()).await, with_producers(shared()).await];
    let mut tasks = Vec::new();
    for round in 0..200u64 {
        for node in &nodes {
            let node = node.clone();
            tasks.push(tokio::spawn(async move { node.append_event(new_event("prd_a", None, round)).await.unwrap() }));
        }
    }
    let mut seqs = Vec::new();
    for task in tasks {
        seqs.push(crate::ids::event_seq(&task.await.unwrap().event_id).unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (0..400).collect::<Vec<u64>>());
    for node in &nodes {
        node.close().unwrap();
    }
    let store = place.open();
    let third = store.append_event(new_event("prd_a", None, 1_000)).await.unwrap();
    assert_eq!(crate::ids::event_seq(&third.event_id), Some(400));
    store.close().unwrap();
}

#[tokio::test]
async fn a_second_node_on_one_database_is_refused_until_the_first_is_closed() {
    let place = PgPlace::new();
    if !place.available() {
        return;
    }
    let first = place.open();
    let error = place.try_open().unwrap_err().to_string();
    assert!(error.contains("another hookd node is running on this database"), "{error}");
    // Another schema is another database as far as nodes go.
    let elsewhere = PgPlace::new();
    elsewhere.open().close().unwrap();
    first.close().unwrap();
    place.open().close().unwrap();
}
