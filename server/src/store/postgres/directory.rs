//! The control plane in memory: producers, API keys, event hashes and listeners, as the
//! database holds them.
//!
//! Loaded whole at start and changed after each write to the database has committed, so
//! every read of [`Store`](crate::store::Store) that authentication, fan-out and the API make
//! inline is a memory lookup that never blocks a thread. What other nodes change is read as
//! [`Changes`]: the rows stamped with a later version than memory reflects, and the removals
//! recorded since. It is only ever a copy: the database is the truth, and nothing here is
//! written anywhere.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use deadpool_postgres::GenericClient;

use crate::store::model::{ApiKeyEntry, EventHashEntry, Listener, Producer, decode};
use crate::store::{StoreError, postgres::unsigned};

#[derive(Default)]
pub(super) struct Directory {
    pub producers: BTreeMap<String, Producer>,
    pub keys: HashMap<Vec<u8>, ApiKeyEntry>,
    pub hashes: HashMap<String, EventHashEntry>,
    listeners: BTreeMap<String, Listener>,
    /// (producer id, event type, listener id).
    by_type: BTreeSet<(String, String, String)>,
    /// (producer id, listener id).
    by_producer: BTreeSet<(String, String)>,
}

/// What changed in the control plane after some version: rows written since, and rows
/// removed since (a removal recorded before a row of the same key was written again is
/// outdone by that row, see [`Directory::apply`]).
#[derive(Default)]
pub(super) struct Changes {
    producers: Vec<Producer>,
    keys: Vec<(Vec<u8>, ApiKeyEntry)>,
    hashes: Vec<(String, EventHashEntry)>,
    listeners: Vec<Listener>,
    removed_keys: Vec<Vec<u8>>,
    removed_listeners: Vec<String>,
}

/// The kinds of row whose removal is recorded in `control_removals`.
pub(super) const REMOVED_KEY: &str = "api_key";
pub(super) const REMOVED_LISTENER: &str = "listener";

fn corrupt(table: &str, key: &str) -> StoreError {
    StoreError::Corrupt { key: format!("{table}/{key}") }
}

impl Directory {
    /// Reads the whole control plane.
    pub async fn load(client: &impl GenericClient) -> Result<Self, StoreError> {
        let mut directory = Directory::default();
        for row in client.query("SELECT id, record FROM producers", &[]).await? {
            let id: String = row.get(0);
            let producer = decode(row.get(1)).ok_or_else(|| corrupt("producers", &id))?;
            directory.producers.insert(id, producer);
        }
        for row in client.query("SELECT key_hash, producer_id, expires_at_ms FROM api_keys", &[]).await? {
            let entry = ApiKeyEntry { producer_id: row.get(1), expires_at_ms: unsigned(row.get(2)) };
            directory.keys.insert(row.get(0), entry);
        }
        for row in client.query("SELECT event_hash, producer_id, event_type FROM event_hashes", &[]).await? {
            directory.hashes.insert(row.get(0), EventHashEntry { producer_id: row.get(1), event_type: row.get(2) });
        }
        for row in client.query("SELECT id, record FROM listeners", &[]).await? {
            let id: String = row.get(0);
            let listener = decode(row.get(1)).ok_or_else(|| corrupt("listeners", &id))?;
            directory.put_listener(listener);
        }
        Ok(directory)
    }

    /// What changed after version `since`, as of the snapshot `client` reads in.
    pub async fn changes_since(client: &impl GenericClient, since: u64) -> Result<Changes, StoreError> {
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        let mut changes = Changes::default();
        for row in client.query("SELECT id, record FROM producers WHERE changed > $1", &[&since]).await? {
            let id: String = row.get(0);
            changes.producers.push(decode(row.get(1)).ok_or_else(|| corrupt("producers", &id))?);
        }
        let keys = "SELECT key_hash, producer_id, expires_at_ms FROM api_keys WHERE changed > $1";
        for row in client.query(keys, &[&since]).await? {
            let entry = ApiKeyEntry { producer_id: row.get(1), expires_at_ms: unsigned(row.get(2)) };
            changes.keys.push((row.get(0), entry));
        }
        let hashes = "SELECT event_hash, producer_id, event_type FROM event_hashes WHERE changed > $1";
        for row in client.query(hashes, &[&since]).await? {
            changes.hashes.push((row.get(0), EventHashEntry { producer_id: row.get(1), event_type: row.get(2) }));
        }
        for row in client.query("SELECT id, record FROM listeners WHERE changed > $1", &[&since]).await? {
            let id: String = row.get(0);
            changes.listeners.push(decode(row.get(1)).ok_or_else(|| corrupt("listeners", &id))?);
        }
        for row in client.query("SELECT kind, key FROM control_removals WHERE version > $1", &[&since]).await? {
            let (kind, key): (String, Vec<u8>) = (row.get(0), row.get(1));
            match kind.as_str() {
                REMOVED_KEY => changes.removed_keys.push(key),
                REMOVED_LISTENER => {
                    let id = String::from_utf8(key).map_err(|_| corrupt("control_removals", &kind))?;
                    changes.removed_listeners.push(id);
                }
                _ => return Err(corrupt("control_removals", &kind)),
            }
        }
        Ok(changes)
    }

    /// Brings this up to date with `changes`; returns the listeners that changed (added,
    /// changed or removed). Removals go first: a row that exists in the snapshot the changes
    /// were read in exists now, whatever was removed before it.
    pub fn apply(&mut self, changes: Changes) -> Vec<String> {
        let Changes { producers, keys, hashes, listeners, removed_keys, removed_listeners } = changes;
        let mut changed = Vec::new();
        for key in removed_keys {
            self.keys.remove(&key);
        }
        for id in removed_listeners {
            if self.listeners.contains_key(&id) {
                self.remove_listener(&id);
                changed.push(id);
            }
        }
        for producer in producers {
            self.producers.insert(producer.id.clone(), producer);
        }
        self.keys.extend(keys);
        self.hashes.extend(hashes);
        for listener in listeners {
            if self.listeners.get(&listener.id) != Some(&listener) {
                changed.push(listener.id.clone());
                // Its producer and type never change, but the indexes follow the record.
                self.remove_listener(&listener.id);
                self.put_listener(listener);
            }
        }
        changed.sort_unstable();
        changed.dedup();
        changed
    }

    /// How many listeners there are, and how many of them are disabled.
    pub fn listener_counts(&self) -> (u64, u64) {
        let disabled = self.listeners.values().filter(|listener| !listener.enabled).count();
        (self.listeners.len() as u64, disabled as u64)
    }

    pub fn listener(&self, id: &str) -> Option<&Listener> {
        self.listeners.get(id)
    }

    /// The listeners that differ between this and `fresh`: added, changed or removed.
    pub fn changed_listeners(&self, fresh: &Directory) -> Vec<String> {
        let changed_or_removed =
            self.listeners.iter().filter(|(id, old)| fresh.listeners.get(*id) != Some(*old)).map(|(id, _)| id);
        let added = fresh.listeners.keys().filter(|id| !self.listeners.contains_key(*id));
        changed_or_removed.chain(added).cloned().collect()
    }

    pub fn put_listener(&mut self, listener: Listener) {
        self.by_type.insert((listener.producer_id.clone(), listener.event_type.clone(), listener.id.clone()));
        self.by_producer.insert((listener.producer_id.clone(), listener.id.clone()));
        self.listeners.insert(listener.id.clone(), listener);
    }

    pub fn remove_listener(&mut self, id: &str) {
        if let Some(listener) = self.listeners.remove(id) {
            self.by_type.remove(&(listener.producer_id.clone(), listener.event_type, listener.id.clone()));
            self.by_producer.remove(&(listener.producer_id, listener.id));
        }
    }

    /// A producer's listeners in id order, of one event type or all, after `after`.
    pub fn list_listeners(
        &self,
        producer_id: &str,
        event_type: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Vec<Listener> {
        let after = after.unwrap_or("");
        let ids: Vec<&String> = match event_type {
            Some(event_type) => {
                let from = (producer_id.to_owned(), event_type.to_owned(), after.to_owned());
                self.by_type
                    .range(from..)
                    .take_while(|(producer, kind, _)| producer == producer_id && kind == event_type)
                    .filter(|(_, _, id)| id.as_str() > after)
                    .take(limit)
                    .map(|(_, _, id)| id)
                    .collect()
            }
            None => self
                .by_producer
                .range((producer_id.to_owned(), after.to_owned())..)
                .take_while(|(producer, _)| producer == producer_id)
                .filter(|(_, id)| id.as_str() > after)
                .take(limit)
                .map(|(_, id)| id)
                .collect(),
        };
        ids.into_iter().filter_map(|id| self.listeners.get(id).cloned()).collect()
    }
}
