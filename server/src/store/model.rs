//! The records hookd keeps, and their versioned encoding.
//!
//! Every stored value is one version byte followed by a protobuf encoding of the record, so
//! fields can be added without a migration and a future layout gets a new version byte. These
//! are plain data: no I/O, no policy, and never a plaintext secret.

use prost::Message;

/// Version byte of the current record encoding.
const RECORD_V1: u8 = 1;

/// Encodes a record for storage: version byte, then protobuf.
pub(crate) fn encode<M: Message>(record: &M) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + record.encoded_len());
    bytes.push(RECORD_V1);
    record.encode(&mut bytes).expect("a Vec grows to fit any record");
    bytes
}

/// Whether a record that does not decode may have been written by a newer hookd: its version
/// byte is one this build does not know yet. (A damaged record may look so too.)
pub(crate) fn written_by_newer(bytes: &[u8]) -> bool {
    bytes.first().is_some_and(|version| *version > RECORD_V1)
}

/// Decodes a stored record; `None` for an unknown version or corrupt bytes.
pub(crate) fn decode<M: Message + Default>(bytes: &[u8]) -> Option<M> {
    match bytes.split_first() {
        Some((&RECORD_V1, body)) => M::decode(body).ok(),
        _ => None,
    }
}

/// A service that triggers events.
#[derive(Clone, PartialEq, Message)]
pub struct Producer {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(bool, tag = "3")]
    pub enabled: bool,
    #[prost(uint64, tag = "4")]
    pub created_at_ms: u64,
    #[prost(string, tag = "5")]
    pub disabled_reason: String,
    /// SHA-256 of every API key that currently opens this producer (the newest last).
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub key_hashes: Vec<Vec<u8>>,
}

/// What an API key hash opens, and until when.
#[derive(Clone, PartialEq, Message)]
pub struct ApiKeyEntry {
    #[prost(string, tag = "1")]
    pub producer_id: String,
    /// 0: no expiry. Otherwise the key stops working at this time (a rotation's grace).
    #[prost(uint64, tag = "2")]
    pub expires_at_ms: u64,
}

impl ApiKeyEntry {
    /// Whether the key still opens its producer at `now_ms`.
    pub fn valid_at(&self, now_ms: u64) -> bool {
        self.expires_at_ms == 0 || now_ms < self.expires_at_ms
    }
}

/// The (producer, event type) an event hash stands for.
#[derive(Clone, PartialEq, Message)]
pub struct EventHashEntry {
    #[prost(string, tag = "1")]
    pub producer_id: String,
    #[prost(string, tag = "2")]
    pub event_type: String,
}

/// A callback URL registered for an event hash.
#[derive(Clone, PartialEq, Message)]
pub struct Listener {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub producer_id: String,
    #[prost(string, tag = "3")]
    pub event_hash: String,
    #[prost(string, tag = "4")]
    pub event_type: String,
    #[prost(string, tag = "5")]
    pub url: String,
    /// The signing secret sealed under the master key (empty: unsigned).
    #[prost(bytes = "vec", tag = "6")]
    pub sealed_secret: Vec<u8>,
    #[prost(bool, tag = "7")]
    pub enabled: bool,
    #[prost(string, tag = "8")]
    pub description: String,
    #[prost(bool, tag = "9")]
    pub ordered: bool,
    #[prost(uint64, tag = "10")]
    pub created_at_ms: u64,
    #[prost(string, tag = "11")]
    pub disabled_reason: String,
    /// The number of the first event triggered since it was registered: fan-out gives it no
    /// event numbered below, however far behind fan-out runs. (Listeners re-enabled by
    /// hookd 0.1 before `skipped` existed had it moved to their re-enabling instead.)
    #[prost(uint64, tag = "12")]
    pub enabled_from_seq: u64,
    /// While disabled: the number of the first event triggered since. Events from here on
    /// are not fanned out to it; earlier ones are (their deliveries wait until it is enabled).
    #[prost(uint64, tag = "13")]
    pub disabled_from_seq: u64,
    /// The events triggered while it was disabled, one range per time it was disabled and
    /// enabled again, oldest first; at most [`MAX_SKIPPED`] are kept.
    #[prost(message, repeated, tag = "14")]
    pub skipped: Vec<SeqRange>,
    /// The secret the last rotation replaced, sealed like `sealed_secret`, while it still
    /// signs (a second signature) until `previous_secret_until_ms`; empty when none.
    #[prost(bytes = "vec", tag = "15")]
    pub previous_sealed_secret: Vec<u8>,
    #[prost(uint64, tag = "16")]
    pub previous_secret_until_ms: u64,
    /// Most requests a second to it; 0: no limit.
    #[prost(uint32, tag = "17")]
    pub max_per_second: u32,
}

/// Most ranges of skipped events a listener keeps. When a re-enabling finds the list full,
/// ranges fan-out has durably passed are dropped; if none has been passed, the oldest is,
/// and the events of that one disabled spell are delivered after all: a delivery too many
/// rather than one lost.
pub const MAX_SKIPPED: usize = 32;

/// Event numbers from `from` up to, not including, `until`.
#[derive(Clone, Copy, PartialEq, Eq, Message)]
pub struct SeqRange {
    #[prost(uint64, tag = "1")]
    pub from: u64,
    #[prost(uint64, tag = "2")]
    pub until: u64,
}

impl Listener {
    /// Whether fan-out gives it the event numbered `seq`: one triggered while it was
    /// registered and enabled.
    pub fn wants(&self, seq: u64) -> bool {
        seq >= self.enabled_from_seq
            && (self.enabled || seq < self.disabled_from_seq)
            && !self.skipped.iter().any(|range| range.from <= seq && seq < range.until)
    }

    /// Whether re-enabling it needs to know where fan-out durably stands: ranges of skipped
    /// events are pruned only once the list is full.
    pub fn reenabling_prunes(&self) -> bool {
        self.skipped.len() >= MAX_SKIPPED
    }

    /// Moves its registration points after an edit that found it `was_enabled`, at the edit's
    /// point in the log `next_seq` (events from it on come after the edit). Events from before it was disabled that fan-out
    /// has not reached are still owed to it: only those triggered while it was disabled are
    /// skipped. `fanout_next_seq` (read only when [`Listener::reenabling_prunes`]) is where
    /// fan-out durably stands for it.
    pub fn edited(&mut self, was_enabled: bool, next_seq: u64, fanout_next_seq: u64) {
        match (was_enabled, self.enabled) {
            (false, true) => self.reenabled(next_seq, fanout_next_seq),
            (true, false) => self.disabled_from_seq = next_seq,
            _ => {}
        }
    }

    /// As its deletion at the log's point `next_seq` leaves it: disabled from
    /// there if it was enabled, so [`Listener::wants`] says which events were its.
    pub fn deleted_at(mut self, next_seq: u64) -> Self {
        if self.enabled {
            // Events numbered from here on never were its.
            self.enabled = false;
            self.disabled_from_seq = next_seq;
        }
        self
    }

    /// A copy without its secrets: what is kept of a deleted listener.
    pub fn without_secrets(&self) -> Self {
        Self { sealed_secret: Vec::new(), previous_sealed_secret: Vec::new(), ..self.clone() }
    }

    /// Records that it is enabled again at the log's point `next_seq`,
    /// forgetting the skipped ranges that fan-out (durably next at `fanout_next_seq`) has
    /// passed.
    pub fn reenabled(&mut self, next_seq: u64, fanout_next_seq: u64) {
        self.skipped.retain(|range| range.until > fanout_next_seq);
        if self.disabled_from_seq < next_seq {
            self.skipped.push(SeqRange { from: self.disabled_from_seq, until: next_seq });
        }
        if self.skipped.len() > MAX_SKIPPED {
            self.skipped.drain(..self.skipped.len() - MAX_SKIPPED);
        }
    }
}

/// An event as the trigger path hands it to the store.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub producer_id: String,
    /// SHA-256 of the API key the trigger came with: checked again when it is written.
    pub key_hash: [u8; 32],
    pub event_type: String,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub idempotency_key: Option<String>,
    pub created_at_ms: u64,
}

/// One event of the event log.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(string, tag = "1")]
    pub id: String,
    /// Position in the event log: the order fan-out follows.
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    #[prost(string, tag = "3")]
    pub producer_id: String,
    #[prost(string, tag = "4")]
    pub event_type: String,
    #[prost(bytes = "vec", tag = "5")]
    pub payload: Vec<u8>,
    #[prost(string, tag = "6")]
    pub content_type: String,
    #[prost(uint64, tag = "7")]
    pub created_at_ms: u64,
    #[prost(string, tag = "8")]
    pub idempotency_key: String,
}

/// A remembered idempotency key.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct IdempotencyEntry {
    #[prost(string, tag = "1")]
    pub event_id: String,
    #[prost(uint64, tag = "2")]
    pub created_at_ms: u64,
}

/// The answer to an append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub event_id: String,
    /// True when the idempotency key matched an earlier event, whose id this is.
    pub duplicate: bool,
}

/// A listener as its deletion found it.
#[derive(Clone, Debug)]
pub struct DeletedListener {
    /// As it was, disabled from where the deletion fell if it was enabled, so that
    /// [`Listener::wants`] says which events were its.
    pub listener: Listener,
    /// Fan-out's durable position when it was deleted: from here on fan-out may have handed
    /// out none of its pairs (it no longer sees the listener), so its first attempts from here
    /// to where the deletion fell may have no record.
    pub unsure_from_seq: u64,
}

/// Where fan-out stands in the event log.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct FanoutCursor {
    /// Every (event, listener) pair of the events before this one is recorded: attempted,
    /// parked or cancelled. Fan-out starts here after a restart.
    #[prost(uint64, tag = "1")]
    pub next_seq: u64,
    /// Written by hookd 0.1, whose fan-out could stop inside an event: the last listener of
    /// `next_seq` already given a delivery. Read as "redo the whole event" now (pairs already
    /// recorded are found and skipped).
    #[prost(string, tag = "2")]
    pub after_listener: String,
    /// Fan-out hands out no pair of an event numbered at or above this before it has written
    /// a higher one. Pairs of events below it may have been recorded before a crash, so after
    /// a restart fan-out checks for their records first.
    #[prost(uint64, tag = "3")]
    pub reserved_until: u64,
}

/// The state of a delivery. Numbers match `hookd.v1.DeliveryState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum DeliveryState {
    Unspecified = 0,
    Pending = 1,
    Succeeded = 2,
    Failed = 3,
    Cancelled = 4,
}

/// One event to one listener.
#[derive(Clone, PartialEq, Message)]
pub struct Delivery {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub event_id: String,
    #[prost(uint64, tag = "3")]
    pub event_seq: u64,
    #[prost(string, tag = "4")]
    pub listener_id: String,
    #[prost(string, tag = "5")]
    pub producer_id: String,
    #[prost(enumeration = "DeliveryState", tag = "6")]
    pub state: i32,
    /// Attempts made so far.
    #[prost(uint32, tag = "7")]
    pub attempts: u32,
    /// When the next scheduled attempt is due (pending only).
    #[prost(uint64, tag = "8")]
    pub next_attempt_at_ms: u64,
    #[prost(uint32, tag = "9")]
    pub last_status_code: u32,
    #[prost(uint64, tag = "10")]
    pub created_at_ms: u64,
    /// Of `attempts`, how many were manual: they do not move the retry schedule along.
    #[prost(uint32, tag = "11")]
    pub manual_attempts: u32,
    /// The first attempt, kept in the delivery's own record: a delivery that succeeds at
    /// once costs one write less (each sled write is several µs of CPU). Later attempts
    /// have records of their own. Data from before this field has the first attempt in a
    /// record of its own too; a hookd from before it would drop this one the next time it
    /// rewrote the record, so data written now is not for older versions.
    #[prost(message, optional, tag = "12")]
    pub first_attempt: Option<Attempt>,
}

/// The part of a [`Delivery`] record that retention needs, decoded without the rest (the
/// first attempt's response above all) when many are read at once.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct DeliveryHead {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "4")]
    pub listener_id: String,
    #[prost(enumeration = "DeliveryState", tag = "6")]
    pub state: i32,
}

impl Delivery {
    /// A new pending delivery of `event` to `listener_id`, due at `due_ms`.
    pub fn pending(id: String, event: &Event, listener_id: &str, due_ms: u64) -> Self {
        Self {
            id,
            event_id: event.id.clone(),
            event_seq: event.seq,
            listener_id: listener_id.to_owned(),
            producer_id: event.producer_id.clone(),
            state: DeliveryState::Pending as i32,
            attempts: 0,
            next_attempt_at_ms: due_ms,
            last_status_code: 0,
            created_at_ms: due_ms,
            manual_attempts: 0,
            first_attempt: None,
        }
    }
}

/// What started an attempt. Numbers match `hookd.v1.AttemptTrigger`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum AttemptTrigger {
    Unspecified = 0,
    Scheduled = 1,
    Manual = 2,
}

/// One HTTP request of a delivery and its outcome.
#[derive(Clone, PartialEq, Message)]
pub struct Attempt {
    /// 1-based.
    #[prost(uint32, tag = "1")]
    pub number: u32,
    #[prost(uint64, tag = "2")]
    pub started_at_ms: u64,
    #[prost(uint64, tag = "3")]
    pub duration_ms: u64,
    /// 0 when there was no HTTP answer.
    #[prost(uint32, tag = "4")]
    pub status_code: u32,
    /// `kind: message` of a transport error (timeout, connect, dns, tls, refused, other).
    #[prost(string, tag = "5")]
    pub error: String,
    #[prost(btree_map = "string, string", tag = "6")]
    pub response_headers: std::collections::BTreeMap<String, String>,
    /// The first 4 KiB of the response body.
    #[prost(bytes = "vec", tag = "7")]
    pub response_body: Vec<u8>,
    #[prost(enumeration = "AttemptTrigger", tag = "8")]
    pub trigger: i32,
}

/// How a listener has been doing, kept across restarts.
#[derive(Clone, PartialEq, Message)]
pub struct ListenerHealth {
    /// Start of the current run of nothing but failures; 0 while the last attempt succeeded.
    #[prost(uint64, tag = "1")]
    pub failing_since_ms: u64,
}

/// A due-queue entry: a delivery waiting for an attempt at `due_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueEntry {
    pub due_ms: u64,
    pub delivery_id: String,
    pub listener_id: String,
    /// A manual attempt (RetryDelivery): made whatever the delivery's state, never retried.
    pub manual: bool,
}

/// Suffix of the queue key of a manual attempt: it is queued, parked and worked on apart from
/// the delivery's scheduled entry, so neither overwrites the other.
const MANUAL_SUFFIX: &str = "#m";

impl DueEntry {
    /// The id this entry is queued and parked under.
    pub fn key_id(&self) -> String {
        if self.manual { format!("{}{MANUAL_SUFFIX}", self.delivery_id) } else { self.delivery_id.clone() }
    }

    /// Splits a queue key id into the delivery id and whether it is a manual attempt.
    pub fn split_key_id(key_id: &str) -> (&str, bool) {
        match key_id.strip_suffix(MANUAL_SUFFIX) {
            Some(delivery_id) => (delivery_id, true),
            None => (key_id, false),
        }
    }
}

/// Why an event of the log was put aside (its record does not decode): by fan-out instead of
/// fanned out, or by retention as it removes the record.
#[derive(Clone, PartialEq, Message)]
pub struct Quarantined {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(string, tag = "2")]
    pub reason: String,
    #[prost(uint64, tag = "3")]
    pub at_ms: u64,
}

/// What to do with a delivery after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextStep {
    /// Succeeded, or failed for good: leaves the queue.
    Done,
    /// Another attempt at this time.
    RetryAt(u64),
    /// A manual attempt that failed: whatever was scheduled before stays as it was.
    Keep,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_a_version_byte() {
        let entry = EventHashEntry { producer_id: "prd_1".into(), event_type: "a.b".into() };
        let bytes = encode(&entry);
        assert_eq!(bytes[0], RECORD_V1);
        assert_eq!(decode::<EventHashEntry>(&bytes), Some(entry));
    }

    #[test]
    fn unknown_versions_are_refused() {
        let mut bytes = encode(&EventHashEntry::default());
        bytes[0] = 99;
        assert_eq!(decode::<EventHashEntry>(&bytes), None);
        assert_eq!(decode::<EventHashEntry>(&[]), None);
    }

    #[test]
    fn key_expiry() {
        let forever = ApiKeyEntry { producer_id: "p".into(), expires_at_ms: 0 };
        assert!(forever.valid_at(u64::MAX));
        let graced = ApiKeyEntry { producer_id: "p".into(), expires_at_ms: 1_000 };
        assert!(graced.valid_at(999));
        assert!(!graced.valid_at(1_000));
    }
}
