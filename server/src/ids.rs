//! Identifiers: each kind of record has its own prefix on the wire (`prd_`, `lst_`, `evt_`).
//!
//! Producer and listener ids start with the creation time in milliseconds, so they sort by
//! creation and pages over them are stable; the rest is random. An event id carries its
//! position in the event log, so looking an event up needs no index, plus random bytes so
//! ids cannot be enumerated. This module only makes and parses strings; it stores nothing.

use crate::crypto::{hex, random_bytes};

pub const PRODUCER_PREFIX: &str = "prd_";
pub const LISTENER_PREFIX: &str = "lst_";
pub const EVENT_PREFIX: &str = "evt_";
pub const DELIVERY_PREFIX: &str = "dlv_";

/// A time-ordered id: prefix + hex(8-byte big-endian milliseconds ‖ 8 random bytes).
fn time_ordered(prefix: &str, now_ms: u64) -> String {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&now_ms.to_be_bytes());
    bytes[8..].copy_from_slice(&random_bytes::<8>());
    format!("{prefix}{}", hex(&bytes))
}

pub fn producer_id(now_ms: u64) -> String {
    time_ordered(PRODUCER_PREFIX, now_ms)
}

pub fn listener_id(now_ms: u64) -> String {
    time_ordered(LISTENER_PREFIX, now_ms)
}

/// The id of the event at `seq` in the event log.
pub fn event_id(seq: u64) -> String {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&seq.to_be_bytes());
    bytes[8..].copy_from_slice(&random_bytes::<8>());
    format!("{EVENT_PREFIX}{}", hex(&bytes))
}

/// The id of the delivery of event `seq` to `listener_id`: the same every time it is
/// computed, so a fan-out redone after a crash creates no duplicate. It starts with the
/// event's position, so a listener's deliveries sort in trigger order.
pub fn delivery_id(seq: u64, listener_id: &str) -> String {
    use sha2::Digest as _;
    let listener_part = sha2::Sha256::digest(listener_id.as_bytes());
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&seq.to_be_bytes());
    bytes[8..].copy_from_slice(&listener_part[..8]);
    format!("{DELIVERY_PREFIX}{}", hex(&bytes))
}

/// The id of a replayed delivery of event `seq`: random after the event's position, so every
/// replay is a new delivery while the id still sorts with its event.
pub fn replay_delivery_id(seq: u64) -> String {
    format!("{DELIVERY_PREFIX}{}{}", hex(&seq.to_be_bytes()), hex(&random_bytes::<8>()))
}

/// The event-log position a delivery id starts with.
pub fn delivery_event_seq(delivery_id: &str) -> Option<u64> {
    let digits = delivery_id.strip_prefix(DELIVERY_PREFIX)?;
    if digits.len() != 32 {
        return None;
    }
    let bytes = data_encoding::HEXLOWER.decode(&digits.as_bytes()[..16]).ok()?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// The event-log position an event id claims (the caller still compares the whole id).
pub fn event_seq(event_id: &str) -> Option<u64> {
    let digits = event_id.strip_prefix(EVENT_PREFIX)?;
    if digits.len() != 32 {
        return None;
    }
    let bytes = data_encoding::HEXLOWER.decode(digits.as_bytes()).ok()?;
    Some(u64::from_be_bytes(bytes[..8].try_into().ok()?))
}

/// Whether `id` has the shape of an id with `prefix` (prefix + 32 lowercase hex digits).
pub fn is_well_formed(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|digits| {
        digits.len() == 32 && digits.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_creation_time() {
        let early = listener_id(1_000);
        let late = listener_id(2_000);
        assert!(early < late);
        assert!(is_well_formed(&early, LISTENER_PREFIX));
        assert!(!is_well_formed(&early, PRODUCER_PREFIX));
        assert_ne!(listener_id(1_000), listener_id(1_000));
    }

    #[test]
    fn delivery_ids_are_deterministic_and_sort_by_event() {
        let a = delivery_id(7, "lst_a");
        assert_eq!(a, delivery_id(7, "lst_a"));
        assert_ne!(a, delivery_id(7, "lst_b"));
        assert!(delivery_id(7, "lst_z") < delivery_id(8, "lst_a"));
        assert!(is_well_formed(&a, DELIVERY_PREFIX));
        assert_eq!(delivery_event_seq(&a), Some(7));
        let replay = replay_delivery_id(7);
        assert!(is_well_formed(&replay, DELIVERY_PREFIX));
        assert_eq!(delivery_event_seq(&replay), Some(7));
        assert_ne!(replay, replay_delivery_id(7));
    }

    #[test]
    fn event_ids_carry_their_sequence() {
        for seq in [0, 1, 255, u64::MAX] {
            let id = event_id(seq);
            assert!(is_well_formed(&id, EVENT_PREFIX));
            assert_eq!(event_seq(&id), Some(seq));
        }
        assert_eq!(event_seq("evt_123"), None);
        assert_eq!(event_seq("lst_00000000000000000000000000000000"), None);
        assert_eq!(event_seq("evt_zz000000000000000000000000000000"), None);
    }
}
