//! Durable state: producers, API keys, event hashes, listeners, the event log and
//! idempotency records, behind the [`Store`] trait.
//!
//! This module is the only one that touches sled (in [`sled_store`]); everything else sees
//! the trait and the plain records of [`model`]. Every write that a caller is answered for is
//! durable before its future resolves. A store never sees gRPC types, never decides policy
//! (validation, authorisation) and never holds a plaintext secret: listener secrets arrive
//! sealed.

pub mod model;
mod sled_store;
mod writer;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use model::{ApiKeyEntry, Appended, Event, EventHashEntry, Listener, NewEvent, Producer};
pub use sled_store::SledStore;

/// A write that resolves once it is durable (or failed).
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// A change applied to one listener inside the store's serialised writer.
pub type ListenerEdit = Box<dyn FnOnce(&mut Listener) + Send + 'static>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Backend(#[source] Arc<sled::Error>),
    #[error("stored record {key} is corrupt or from an unknown version")]
    Corrupt { key: String },
    #[error("the store is closed")]
    Closed,
    #[error(
        "the master key does not match this data directory: it was created with key {expected}, \
         the configured key is {found}"
    )]
    WrongMasterKey { expected: String, found: String },
}

impl From<sled::Error> for StoreError {
    fn from(error: sled::Error) -> Self {
        StoreError::Backend(Arc::new(error))
    }
}

/// Everything hookd keeps. Reads are synchronous point lookups or bounded scans; writes go
/// through the backend's durable write path and resolve once on disk. Each method is one
/// atomic operation, so a distributed backend can make each one transaction.
pub trait Store: Send + Sync + 'static {
    /// Refuses a master key other than the one the data was sealed with; remembers the key's
    /// check value on first use.
    fn check_master_key(&self, key_id: &str, check: &[u8; 32]) -> Result<(), StoreError>;

    /// Stores a new producer and the hash of its first API key.
    fn create_producer(&self, producer: Producer, key_hash: [u8; 32]) -> StoreFuture<()>;
    fn producer(&self, producer_id: &str) -> Result<Option<Producer>, StoreError>;
    /// Producers in id (creation) order, starting after `after`.
    fn list_producers(&self, after: Option<&str>, limit: usize) -> Result<Vec<Producer>, StoreError>;
    /// The producer an API key hash belongs to, if the key is known and not expired at `now_ms`.
    fn producer_by_key(&self, key_hash: &[u8; 32], now_ms: u64) -> Result<Option<Producer>, StoreError>;
    /// Adds `new_key_hash`; every older key still valid at `now_ms` keeps working for
    /// `grace_ms` more (0: it is deleted at once). Resolves to false for an unknown producer.
    fn rotate_producer_key(
        &self,
        producer_id: &str,
        new_key_hash: [u8; 32],
        now_ms: u64,
        grace_ms: u64,
    ) -> StoreFuture<bool>;
    /// Sets `enabled` and the reason; `None` for an unknown producer.
    fn set_producer_enabled(&self, producer_id: &str, enabled: bool, reason: String) -> StoreFuture<Option<Producer>>;

    /// Remembers which (producer, event type) an event hash stands for. Idempotent.
    fn put_event_hash(&self, event_hash: &str, entry: EventHashEntry) -> StoreFuture<()>;
    fn event_hash(&self, event_hash: &str) -> Result<Option<EventHashEntry>, StoreError>;

    /// Stores a new listener and its indexes.
    fn insert_listener(&self, listener: Listener) -> StoreFuture<()>;
    fn listener(&self, listener_id: &str) -> Result<Option<Listener>, StoreError>;
    /// A producer's listeners in id (creation) order, of one event type or all, after `after`.
    fn list_listeners(
        &self,
        producer_id: &str,
        event_type: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Listener>, StoreError>;
    /// Applies `edit` to the stored listener atomically; `None` if it does not exist.
    fn update_listener(&self, listener_id: &str, edit: ListenerEdit) -> StoreFuture<Option<Listener>>;
    /// Removes a listener and its indexes; the removed listener, or `None`.
    fn delete_listener(&self, listener_id: &str) -> StoreFuture<Option<Listener>>;

    /// Appends an event to the event log with its idempotency record, atomically. Concurrent
    /// appends share one flush. A key already used by the producer within the idempotency
    /// window resolves to the first event's id with `duplicate = true`, recording nothing.
    fn append_event(&self, event: NewEvent) -> StoreFuture<Appended>;
    /// One event by id.
    fn event(&self, event_id: &str) -> Result<Option<Event>, StoreError>;

    /// Makes everything written so far durable and stops the writer. Later writes fail with
    /// [`StoreError::Closed`].
    fn close(&self) -> Result<(), StoreError>;
}
