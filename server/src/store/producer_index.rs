//! Which events belong to which producer: one bitmap per producer per block of [`BLOCK`]
//! sequence numbers, `eb/{producer id}/{block: u64 big-endian}` → 32 bytes, bit `i` set when
//! event `block × 256 + i` is that producer's.
//!
//! It replaces one `ep/` record per event. A producer triggering steadily costs the applier
//! one record update per batch instead of one insert per event: sled's cost is per record
//! (and its leaves split every 16 inserts). Stream bench, three runs each, alternating:
//! 37.5k, 43.4k and 41.5k events/s with `ep/`; 50.8k, 53.3k and 45.0k with bitmaps.
//!
//! Bits are set by the applier and by the journal's replay at start, and cleared by
//! retention (but for an event record that did not decode: its producer is unknown, so its
//! bit stays, and so does its block's bitmap). Each reads the stored bitmaps and writes them back in the same batch as the
//! events they index. The applier and retention run at once, so they hold the index lock
//! (`Progress::index_turn`) from the read to the write and neither undoes the other's
//! change; the replay and [`migrate_legacy`] run at open, before either. Setting a bit twice
//! changes nothing (a replay writes events again). A damaged bitmap is rebuilt from the
//! event log. This module never decides that an event exists or whose it is: readers skip a
//! set bit whose event is gone, or is another producer's.

use std::collections::{BTreeMap, HashMap};

use sled::{Batch, Tree};

use super::StoreError;
use super::model::{Event, decode};
use super::sled_store::{corrupt, keys, prefix_end};

/// Sequence numbers per bitmap.
pub(crate) const BLOCK: u64 = 256;
type Bits = [u8; (BLOCK / 8) as usize];

const PREFIX: &[u8] = b"eb/";
/// The per-event index this one replaced; [`migrate_legacy`] converts it.
const LEGACY_PREFIX: &[u8] = b"ep/";

fn producer_prefix(producer_id: &str) -> Vec<u8> {
    [PREFIX, producer_id.as_bytes(), b"/"].concat()
}

fn key(producer_id: &str, block: u64) -> Vec<u8> {
    [&producer_prefix(producer_id), &block.to_be_bytes()[..]].concat()
}

fn bit(seq: u64) -> (usize, u8) {
    let offset = seq % BLOCK;
    ((offset / 8) as usize, 1 << (offset % 8))
}

/// Bits to set and to clear, gathered for one batch.
#[derive(Default)]
pub(crate) struct Changes {
    by_producer: HashMap<String, BTreeMap<u64, (Bits, Bits)>>,
}

impl Changes {
    fn entry(&mut self, producer_id: &str, seq: u64) -> &mut (Bits, Bits) {
        if !self.by_producer.contains_key(producer_id) {
            self.by_producer.insert(producer_id.to_owned(), BTreeMap::new());
        }
        let blocks = self.by_producer.get_mut(producer_id).expect("inserted above");
        blocks.entry(seq / BLOCK).or_default()
    }

    /// Event `seq` is `producer_id`'s.
    pub(crate) fn set(&mut self, producer_id: &str, seq: u64) {
        let (byte, mask) = bit(seq);
        let (set, cleared) = self.entry(producer_id, seq);
        set[byte] |= mask;
        cleared[byte] &= !mask;
    }

    /// Event `seq` is gone.
    pub(crate) fn clear(&mut self, producer_id: &str, seq: u64) {
        let (byte, mask) = bit(seq);
        let (set, cleared) = self.entry(producer_id, seq);
        cleared[byte] |= mask;
        set[byte] &= !mask;
    }

    /// Reads each bitmap touched and puts its new value, or its removal once empty, in
    /// `batch`. The caller holds the index lock until `batch` is applied.
    pub(crate) fn write(self, tree: &Tree, batch: &mut Batch) -> Result<(), StoreError> {
        for (producer_id, blocks) in self.by_producer {
            for (block, (set, cleared)) in blocks {
                let key = key(&producer_id, block);
                let mut bits: Bits = match tree.get(&key)? {
                    Some(stored) => match stored.as_ref().try_into() {
                        Ok(bits) => bits,
                        Err(_) => rebuilt(tree, &producer_id, block)?,
                    },
                    None => Bits::default(),
                };
                for (byte, (set, cleared)) in bits.iter_mut().zip(set.iter().zip(&cleared)) {
                    *byte = (*byte | set) & !cleared;
                }
                if bits.iter().all(|&byte| byte == 0) {
                    batch.remove(key);
                } else {
                    batch.insert(key, &bits[..]);
                }
            }
        }
        Ok(())
    }
}

/// A bitmap read again from the events of its block, for one found damaged.
fn rebuilt(tree: &Tree, producer_id: &str, block: u64) -> Result<Bits, StoreError> {
    tracing::warn!(producer_id, block, "a producer's event bitmap is damaged; rebuilding it from the event log");
    let mut bits = Bits::default();
    let first = block.saturating_mul(BLOCK);
    let range = keys::event(first)..keys::event(first.saturating_add(BLOCK));
    for entry in tree.range(range) {
        // A record that does not decode is nobody's event.
        let Some(event) = decode::<Event>(&entry?.1) else { continue };
        if event.producer_id == producer_id {
            let (byte, mask) = bit(event.seq);
            bits[byte] |= mask;
        }
    }
    Ok(bits)
}

/// The numbers of `producer_id`'s events from `start_seq` on, in order. Some may have been
/// trimmed since the caller's last look; reading them tells.
pub(crate) fn seqs(tree: &Tree, producer_id: &str, start_seq: u64) -> impl Iterator<Item = Result<u64, StoreError>> {
    let prefix = producer_prefix(producer_id);
    let from = key(producer_id, start_seq / BLOCK);
    let producer_id = producer_id.to_owned();
    let events = tree.clone();
    tree.range::<Vec<u8>, _>((std::ops::Bound::Included(from), prefix_end(&prefix))).flat_map(move |entry| {
        let in_block = entry.map_err(StoreError::from).and_then(|(key, bits)| {
            let block: [u8; 8] = key[prefix.len()..].try_into().map_err(|_| corrupt(&key))?;
            let block = u64::from_be_bytes(block);
            let first = block.checked_mul(BLOCK).ok_or_else(|| corrupt(&key))?;
            let bits: Bits = match bits.as_ref().try_into() {
                Ok(bits) => bits,
                Err(_) => rebuilt(&events, &producer_id, block)?,
            };
            Ok((0..BLOCK)
                .filter(|offset| bits[(offset / 8) as usize] & (1 << (offset % 8)) != 0)
                .map(|offset| first + offset)
                .filter(|&seq| seq >= start_seq)
                .collect::<Vec<_>>())
        });
        match in_block {
            Ok(seqs) => seqs.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(error) => vec![Err(error)],
        }
    })
}

/// Converts a data directory's `ep/` records (one per event) into bitmaps, a chunk per
/// batch; a crash midway leaves the rest for the next start. Runs before any other writer.
pub(crate) fn migrate_legacy(tree: &Tree) -> Result<usize, StoreError> {
    const CHUNK: usize = 4096;
    let mut converted = 0;
    loop {
        let mut changes = Changes::default();
        let mut batch = Batch::default();
        let mut in_chunk = 0;
        for entry in tree.scan_prefix(LEGACY_PREFIX).keys().take(CHUNK) {
            let key = entry?;
            let split = key.len().checked_sub(9).filter(|&at| at >= LEGACY_PREFIX.len() && key[at] == b'/');
            let Some(at) = split else { return Err(corrupt(&key)) };
            let producer_id = std::str::from_utf8(&key[LEGACY_PREFIX.len()..at]).map_err(|_| corrupt(&key))?;
            let seq = u64::from_be_bytes(key[at + 1..].try_into().map_err(|_| corrupt(&key))?);
            changes.set(producer_id, seq);
            batch.remove(key);
            in_chunk += 1;
        }
        if in_chunk == 0 {
            return Ok(converted);
        }
        changes.write(tree, &mut batch)?;
        tree.apply_batch(batch)?;
        converted += in_chunk;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, Tree) {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::Config::new().path(dir.path()).open().expect("sled opens");
        let tree = db.open_tree("t").expect("tree opens");
        (dir, tree)
    }

    fn apply(tree: &Tree, changes: Changes) {
        let mut batch = Batch::default();
        changes.write(tree, &mut batch).expect("bitmaps read");
        tree.apply_batch(batch).expect("batch applied");
    }

    fn listed(tree: &Tree, producer_id: &str, start_seq: u64) -> Vec<u64> {
        seqs(tree, producer_id, start_seq).collect::<Result<_, _>>().expect("index readable")
    }

    #[test]
    fn each_producer_finds_its_own_events_in_order_across_blocks() {
        let (_dir, tree) = tree();
        let mut changes = Changes::default();
        let mut expected: HashMap<&str, Vec<u64>> = HashMap::new();
        for seq in 0..1000u64 {
            let producer = if seq.is_multiple_of(3) || (300..600).contains(&seq) { "prd_a" } else { "prd_b" };
            changes.set(producer, seq);
            expected.entry(producer).or_default().push(seq);
        }
        apply(&tree, changes);
        assert_eq!(listed(&tree, "prd_a", 0), expected["prd_a"]);
        assert_eq!(listed(&tree, "prd_b", 0), expected["prd_b"]);
        let from_257: Vec<u64> = expected["prd_b"].iter().copied().filter(|&seq| seq >= 257).collect();
        assert_eq!(listed(&tree, "prd_b", 257), from_257);
        assert!(listed(&tree, "prd_c", 0).is_empty());
    }

    #[test]
    fn setting_again_changes_nothing_and_clearing_everything_removes_the_bitmaps() {
        let (_dir, tree) = tree();
        for _ in 0..2 {
            let mut changes = Changes::default();
            for seq in [1, 255, 256, 700] {
                changes.set("prd_a", seq);
            }
            apply(&tree, changes);
        }
        assert_eq!(listed(&tree, "prd_a", 0), [1, 255, 256, 700]);
        let mut changes = Changes::default();
        changes.clear("prd_a", 255);
        changes.clear("prd_a", 256);
        apply(&tree, changes);
        assert_eq!(listed(&tree, "prd_a", 0), [1, 700]);
        assert_eq!(tree.scan_prefix(PREFIX).count(), 2, "block 1 emptied and removed");
        let mut changes = Changes::default();
        changes.clear("prd_a", 1);
        changes.clear("prd_a", 700);
        apply(&tree, changes);
        assert_eq!(tree.scan_prefix(PREFIX).count(), 0);
    }

    #[test]
    fn a_damaged_bitmap_is_rebuilt_from_the_event_log() {
        let (_dir, tree) = tree();
        for seq in 250..260u64 {
            let producer_id = if seq.is_multiple_of(2) { "prd_a" } else { "prd_b" };
            let event = Event { seq, producer_id: producer_id.into(), ..Event::default() };
            tree.insert(keys::event(seq), super::super::model::encode(&event)).expect("insert");
        }
        for block in [0, 1] {
            tree.insert(key("prd_a", block), &b"not a bitmap"[..]).expect("insert");
        }
        // Rebuilt when written (block 0) and when read (block 1).
        let mut changes = Changes::default();
        changes.set("prd_a", 240);
        apply(&tree, changes);
        assert_eq!(listed(&tree, "prd_a", 0), [240, 250, 252, 254, 256, 258]);
        assert_eq!(tree.get(key("prd_a", 1)).expect("read").expect("kept").as_ref(), b"not a bitmap");
    }

    #[test]
    fn legacy_per_event_records_become_bitmaps() {
        let (_dir, tree) = tree();
        let legacy = |producer: &str, seq: u64| [LEGACY_PREFIX, producer.as_bytes(), b"/", &seq.to_be_bytes()].concat();
        for seq in 0..5000u64 {
            let producer = if seq.is_multiple_of(2) { "prd_a" } else { "prd_b" };
            tree.insert(legacy(producer, seq), &[] as &[u8]).expect("insert");
        }
        assert_eq!(migrate_legacy(&tree).expect("migrates"), 5000);
        assert_eq!(tree.scan_prefix(LEGACY_PREFIX).count(), 0);
        assert_eq!(listed(&tree, "prd_a", 0), (0..5000).step_by(2).collect::<Vec<_>>());
        assert_eq!(listed(&tree, "prd_b", 4001), (4001..5000).step_by(2).collect::<Vec<_>>());
        assert_eq!(migrate_legacy(&tree).expect("nothing left"), 0);
    }
}
