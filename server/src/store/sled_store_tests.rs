use super::*;
use crate::store::writer::IDEMPOTENCY_WINDOW_MS;
use crate::store::{
    Attempt, Completion, Delivery, DeliveryState, DueEntry, EventFilter, FanoutCursor, HistoryStore, MAX_SKIPPED,
    NextStep, PipelineStore,
};

use crate::store::conformance::{Place, listener, new_event, with_producers};

/// A fresh data directory for each test.
struct SledPlace(tempfile::TempDir);

impl Place for SledPlace {
    type Backend = SledStore;
    fn open(&self) -> Arc<SledStore> {
        SledStore::open(self.0.path()).unwrap()
    }
}

mod conformance {
    crate::store::conformance::conformance_tests!(super::SledPlace(tempfile::tempdir().unwrap()));
}

async fn open_with_producers(dir: &std::path::Path) -> Arc<SledStore> {
    with_producers(SledStore::open(dir).unwrap()).await
}

#[tokio::test]
#[expect(clippy::await_holding_lock, reason = "the applier must wait while the appends are made")]
async fn the_idempotency_window_holds_for_events_still_on_their_way_into_sled() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    // The applier waits for the index turn, so every event below stays in flight: its key is
    // known from the writer's claims, not from sled.
    let hold = store.progress.index_turn();
    let first = store.append_event(new_event("prd_a", Some("k1"), 1_000)).await.unwrap();
    let again = store.append_event(new_event("prd_a", Some("k1"), 2_000)).await.unwrap();
    assert_eq!(again, Appended { event_id: first.event_id.clone(), duplicate: true });
    let after_window = store.append_event(new_event("prd_a", Some("k1"), 1_000 + IDEMPOTENCY_WINDOW_MS)).await.unwrap();
    assert!(!after_window.duplicate);
    let first_seq = ids::event_seq(&first.event_id).unwrap();
    assert!(store.progress.in_flight(first_seq), "the first event was still on its way");
    drop(hold);
    store.close().unwrap();
}

#[tokio::test]
#[expect(clippy::await_holding_lock, reason = "the applier must wait while the appends are made")]
async fn triggers_are_answered_while_the_applier_is_held_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    // The applier waits for the index turn (as behind a long sled batch of delivery records):
    // every event below is acknowledged from the journal, one group each, and none waits for
    // the applier to take the previous ones.
    let hold = store.progress.index_turn();
    let mut last = None;
    for n in 0..300 {
        let append = store.append_event(new_event("prd_a", None, 1_000 + n));
        let appended = tokio::time::timeout(std::time::Duration::from_secs(10), append)
            .await
            .unwrap_or_else(|_| panic!("trigger {n} waited for the applier"))
            .unwrap();
        last = Some(appended.event_id);
    }
    let last_seq = ids::event_seq(last.as_deref().unwrap()).unwrap();
    assert!(store.progress.in_flight(last_seq), "the events were still on their way into sled");
    drop(hold);
    // Let go, the applier takes them all in.
    store.settled().await.unwrap();
    assert!(store.event(last.as_deref().unwrap()).unwrap().is_some());
    store.close().unwrap();
}

#[tokio::test]
#[expect(clippy::await_holding_lock, reason = "the applier must wait while the appends are made")]
async fn events_on_their_way_into_sled_hold_intake_to_its_bound() {
    use std::future::Future as _;
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    // Room for three events: each holds its weight until the applier has written it.
    let weight = append_weight(new_event("prd_a", None, 0).payload.len()) as usize;
    store.pending_bytes.forget_permits(PENDING_BYTES as usize - 3 * weight);
    let hold = store.progress.index_turn();
    for n in 0..3 {
        let append = store.append_event(new_event("prd_a", None, 1_000 + n));
        tokio::time::timeout(std::time::Duration::from_secs(10), append).await.unwrap().unwrap();
    }
    let mut fourth = std::pin::pin!(store.append_event(new_event("prd_a", None, 2_000)));
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(fourth.as_mut().poll(&mut context).is_pending(), "three events on their way fill the room");
    drop(hold);
    // Written into sled, they make room for the fourth.
    tokio::time::timeout(std::time::Duration::from_secs(10), fourth).await.unwrap().unwrap();
    store.close().unwrap();
}

/// A store with events 0..count created at 1,000 + n, fanned out up to `fanned_out`, and
/// the records of `damaged` overwritten with bytes that do not decode.
async fn with_damaged_events(dir: &std::path::Path, count: u64, fanned_out: u64, damaged: &[u64]) -> Arc<SledStore> {
    let store = open_with_producers(dir).await;
    for n in 0..count {
        store.append_event(new_event("prd_a", None, 1_000 + n)).await.unwrap();
    }
    store.settled().await.unwrap();
    store.set_fanout_cursor(&FanoutCursor { next_seq: fanned_out, ..FanoutCursor::default() }).unwrap();
    for &seq in damaged {
        store.damage_event(seq);
    }
    store
}

fn trim_all(store: &SledStore, before_ms: u64, start_seq: u64, max_events: usize) -> (usize, usize, Option<u64>) {
    let trimmed = HistoryStore::trim(store, before_ms, 0, start_seq, max_events).unwrap();
    (trimmed.events, trimmed.kept, trimmed.next_seq)
}

// Regression (review): one event record that did not decode failed every retention sweep at
// that record, so nothing after it was ever trimmed.
#[tokio::test]
async fn retention_removes_a_damaged_event_fan_out_has_passed_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = with_damaged_events(dir.path(), 6, 6, &[1, 3, 4]).await;
    // Fan-out put 1 aside when it met it; 3 and 4 were damaged after fan-out passed them.
    store.quarantine_event(1, "put aside by fan-out", 7).unwrap();
    assert_eq!(trim_all(&store, u64::MAX, 0, 100), (6, 0, None));
    for seq in 0..6 {
        assert!(store.event_at(seq).unwrap().is_none(), "event {seq} is trimmed");
    }
    assert_eq!(store.quarantined(), [1, 3, 4], "all stay visible to the operator as put aside");
    store.close().unwrap();
}

#[tokio::test]
async fn retention_stops_at_a_damaged_event_where_it_would_stop_at_any_other() {
    // At the end of a step: the next step starts at it.
    let dir = tempfile::tempdir().unwrap();
    let store = with_damaged_events(dir.path(), 3, 3, &[1]).await;
    assert_eq!(trim_all(&store, u64::MAX, 0, 1), (1, 0, Some(1)));
    assert_eq!(trim_all(&store, u64::MAX, 1, 100), (2, 0, None));
    store.close().unwrap();

    // Where fan-out stands: not yet put aside, it stays.
    let dir = tempfile::tempdir().unwrap();
    let store = with_damaged_events(dir.path(), 3, 1, &[1]).await;
    assert_eq!(trim_all(&store, u64::MAX, 0, 100), (1, 0, None));
    assert!(matches!(store.event_at(1), Err(StoreError::DamagedEvent { seq: 1 })));
    store.close().unwrap();

    // Its age is the next readable event's: event 2 (created at 1,002) is not older than
    // 1,002, so neither is the damaged event before it.
    let dir = tempfile::tempdir().unwrap();
    let store = with_damaged_events(dir.path(), 3, 3, &[1]).await;
    assert_eq!(trim_all(&store, 1_002, 0, 100), (1, 0, None));
    assert!(store.event_at(1).is_err());
    assert_eq!(trim_all(&store, 1_003, 0, 100), (2, 0, None));
    store.close().unwrap();
}

#[tokio::test]
async fn a_damaged_event_with_a_delivery_pending_is_kept_and_its_store_opens_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = with_damaged_events(dir.path(), 4, 4, &[]).await;
    let event = store.event_at(1).unwrap().unwrap();
    let pending = Delivery::pending(ids::delivery_id(1, "lst_a"), &event, "lst_a", 10);
    store.complete_attempts(vec![failed_attempt(&pending, 1)]).unwrap();
    store.damage_event(1);
    store.damage_event(3);
    // 1 waits for its retry; 3, the newest record, has no readable event after it to date it.
    assert_eq!(trim_all(&store, u64::MAX, 0, 100), (2, 1, None));
    assert!(store.event_at(1).is_err() && store.event_at(3).is_err());
    store.close().unwrap();
    drop(store);

    // The newest record does not decode: the store opens all the same.
    let store = SledStore::open(dir.path()).unwrap();
    let appended = store.append_event(new_event("prd_a", None, 2_000)).await.unwrap();
    assert_eq!(ids::event_seq(&appended.event_id), Some(4));
    store.close().unwrap();
}

#[tokio::test]
async fn a_damaged_event_goes_while_a_listener_reading_back_keeps_the_events_around_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = with_damaged_events(dir.path(), 5, 5, &[2]).await;
    store.insert_listener(listener("lst_behind", "prd_a", "thing.happened")).await.unwrap();
    store.set_detached("lst_behind", Some(0)).unwrap();
    // Whose it was is unknown, and nobody can be handed it: only the readable ones are owed.
    assert_eq!(trim_all(&store, u64::MAX, 0, 100), (1, 4, None));
    assert!(store.event_at(2).unwrap().is_none());
    assert!((0..5).filter(|seq| *seq != 2).all(|seq| store.event_at(seq).unwrap().is_some()));
    store.close().unwrap();
}

#[tokio::test]
async fn a_record_of_a_newer_format_stops_retention_and_a_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = with_damaged_events(dir.path(), 4, 4, &[]).await;
    let newer = |seq: u64| store.tree.insert(keys::event(seq), &b"\x02a newer record"[..]).unwrap();
    newer(1);
    newer(3);
    // Perhaps not damaged: a hookd rolled back keeps what it cannot read.
    assert_eq!(trim_all(&store, u64::MAX, 0, 100), (1, 0, None));
    assert!(store.event_at(1).is_err() && store.event_at(2).unwrap().is_some());
    store.close().unwrap();
    drop(store);
    assert!(matches!(SledStore::open(dir.path()), Err(StoreError::Corrupt { .. })));
}

#[tokio::test]
async fn listing_goes_past_a_damaged_event() {
    let dir = tempfile::tempdir().unwrap();
    // The first probe of the search for a time lands on 4.
    let store = with_damaged_events(dir.path(), 8, 8, &[4]).await;
    let since = |since_ms: u64| -> Vec<u64> {
        let filter = EventFilter { since_ms, ..EventFilter::default() };
        HistoryStore::list_events(&*store, &filter, None, 10).unwrap().items.iter().map(|e| e.seq).collect()
    };
    assert_eq!(since(1_006), [6, 7]);
    assert_eq!(since(1_004), [5, 6, 7]);
    assert_eq!(since(1_002), [2, 3, 5, 6, 7]);
    assert!(store.failed_deliveries("lst_x", 1_006, None, None, 10).unwrap().items.is_empty());
    // A page that ends just before it says more may follow, and the next page goes past it.
    let page = HistoryStore::list_events(&*store, &EventFilter::default(), None, 4).unwrap();
    assert_eq!(page.resume_after.as_deref(), Some("3"));
    assert_eq!(listed_seqs(&store, None, 4), [0, 1, 2, 3, 5, 6, 7]);
    store.close().unwrap();
}

// Regression (review): two manual attempts parked at once (possible before one was queued at
// a time) share one lot entry, and the mark of the other stayed: it must not stand for a
// manual attempt for ever.
#[tokio::test]
async fn a_manual_attempts_stale_mark_does_not_stand_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = with_damaged_events(dir.path(), 1, 1, &[]).await;
    let event = store.event_at(0).unwrap().unwrap();
    let pending = Delivery::pending(ids::delivery_id(0, "lst_a"), &event, "lst_a", 10);
    store.complete_attempts(vec![failed_attempt(&pending, 1)]).unwrap();
    store.queue.insert(keys::manual(&pending.id, 5), &[] as &[u8]).unwrap();
    let queued = store.queue_manual_attempt(&pending.id, 20).unwrap().map(|(_, at)| at);
    assert_eq!(queued, Some(20), "a new one is queued");
    assert!(!store.queue.contains_key(keys::manual(&pending.id, 5)).unwrap(), "and the stale mark is gone");
    store.close().unwrap();
}

#[test]
fn a_listener_keeps_a_bounded_number_of_skipped_ranges_and_drops_the_oldest() {
    let mut listener = Listener { enabled: true, ..Listener::default() };
    // Disabled at 10, 20, ... and enabled again five events later each time.
    for spell in 0..(MAX_SKIPPED as u64 + 3) {
        listener.disabled_from_seq = 10 * spell;
        listener.reenabled(10 * spell + 5, 0);
    }
    assert_eq!(listener.skipped.len(), MAX_SKIPPED);
    // The three oldest spells are forgotten: their events are delivered after all.
    assert!(listener.wants(0) && listener.wants(21) && !listener.wants(31) && listener.wants(35));
    // A spell that saw no event leaves no range.
    listener.disabled_from_seq = 1_000;
    listener.reenabled(1_000, 0);
    assert_eq!(listener.skipped.len(), MAX_SKIPPED);
}

/// Every page of `producer`'s events (or everyone's), as sequence numbers.
fn listed_seqs(store: &SledStore, producer: Option<&str>, page: usize) -> Vec<u64> {
    let filter = EventFilter { producer_id: producer.map(str::to_owned), ..EventFilter::default() };
    let (mut seqs, mut after) = (Vec::new(), None);
    loop {
        let listed = HistoryStore::list_events(store, &filter, after, page).unwrap();
        seqs.extend(listed.items.iter().map(|event| event.seq));
        match listed.resume_after {
            Some(token) => after = Some(token.parse().unwrap()),
            None => return seqs,
        }
    }
}

#[tokio::test]
async fn a_producer_lists_its_own_events_after_a_restart_and_none_once_retention_trimmed_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    // Runs of each producer, long and short, across several bitmaps of 256 numbers.
    let owner = |seq: u64| if seq.is_multiple_of(7) || (300..700).contains(&seq) { "prd_a" } else { "prd_b" };
    for seq in 0..1000 {
        store.append_event(new_event(owner(seq), None, 1)).await.unwrap();
    }
    let mine = |producer: &str| (0..1000).filter(|&seq| owner(seq) == producer).collect::<Vec<u64>>();
    assert_eq!(listed_seqs(&store, Some("prd_a"), 33), mine("prd_a"));
    store.close().unwrap();
    drop(store);

    // The same after a restart.
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(listed_seqs(&store, Some("prd_a"), 33), mine("prd_a"));
    assert_eq!(listed_seqs(&store, Some("prd_b"), 1000), mine("prd_b"));
    assert_eq!(listed_seqs(&store, None, 400), (0..1000).collect::<Vec<u64>>());

    // Retention trims what fan-out has passed: here the first 500 events.
    PipelineStore::set_fanout_cursor(&*store, &FanoutCursor { next_seq: 500, ..FanoutCursor::default() }).unwrap();
    let trimmed = HistoryStore::trim(&*store, 2, 2, 0, 10_000).unwrap();
    assert_eq!(trimmed.events, 500);
    let rest = |producer: &str| mine(producer).into_iter().filter(|&seq| seq >= 500).collect::<Vec<u64>>();
    assert_eq!(listed_seqs(&store, Some("prd_a"), 33), rest("prd_a"));
    assert_eq!(listed_seqs(&store, Some("prd_b"), 33), rest("prd_b"));
    // Bitmaps of blocks whose events are all gone are gone too.
    assert_eq!(store.tree.scan_prefix(b"eb/prd_a/").count(), 3, "block 0 is gone; 1 keeps 500-511");
    PipelineStore::set_fanout_cursor(&*store, &FanoutCursor { next_seq: 1000, ..FanoutCursor::default() }).unwrap();
    HistoryStore::trim(&*store, 2, 2, 0, 10_000).unwrap();
    assert!(listed_seqs(&store, Some("prd_a"), 33).is_empty());
    assert_eq!(store.tree.scan_prefix(b"eb/").count(), 0);
    store.close().unwrap();
}

#[tokio::test]
async fn a_data_directory_with_the_per_event_producer_index_is_converted_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    for seq in 0..300u64 {
        store.append_event(new_event(if seq.is_multiple_of(2) { "prd_a" } else { "prd_b" }, None, 1)).await.unwrap();
    }
    store.close().unwrap();
    drop(store);
    // Rewrite the index as older versions kept it: `ep/{producer}/{seq}`, one record each.
    {
        let tree = sled::open(dir.path().join("db")).unwrap().open_tree("hookd").unwrap();
        for key in tree.scan_prefix(b"eb/").keys() {
            tree.remove(key.unwrap()).unwrap();
        }
        for seq in 0..300u64 {
            let producer = if seq.is_multiple_of(2) { "prd_a" } else { "prd_b" };
            tree.insert([b"ep/", producer.as_bytes(), b"/", &seq.to_be_bytes()].concat(), &[] as &[u8]).unwrap();
        }
        tree.flush().unwrap();
    }
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(listed_seqs(&store, Some("prd_a"), 100), (0..300).step_by(2).collect::<Vec<u64>>());
    assert_eq!(store.tree.scan_prefix(b"ep/").count(), 0);
    store.close().unwrap();
}

/// A recorded attempt `number` of `delivery`, which then waits for its next attempt at 50.
/// The first is taken straight from the event log; later ones from their queue entry.
fn failed_attempt(delivery: &Delivery, number: u32) -> Completion {
    let mut delivery = delivery.clone();
    delivery.attempts = number;
    let attempt = Attempt { number, status_code: 503, ..Attempt::default() };
    let entry = (number > 1).then(|| DueEntry {
        due_ms: delivery.next_attempt_at_ms,
        delivery_id: delivery.id.clone(),
        listener_id: delivery.listener_id.clone(),
        manual: false,
    });
    delivery.next_attempt_at_ms = 50;
    Completion { delivery, attempt, entry, next: NextStep::RetryAt(50), ordered: false }
}

#[test]
fn the_first_attempt_lives_in_the_delivery_record_and_later_ones_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let event = Event { id: ids::event_id(7), seq: 7, ..Event::default() };
    let pending = Delivery::pending(ids::delivery_id(7, "lst_a"), &event, "lst_a", 10);
    // Nothing is written of a delivery before its first attempt ends.
    assert!(!store.delivery_exists(&pending.id).unwrap());

    store.complete_attempts(vec![failed_attempt(&pending, 1)]).unwrap();
    let delivery = store.delivery(&pending.id).unwrap().unwrap();
    let retries: Vec<(u64, String)> =
        store.due(None, 100, 10).unwrap().into_iter().map(|e| (e.due_ms, e.delivery_id)).collect();
    assert_eq!(retries, [(50, pending.id.clone())], "its retry is queued with it");
    let listed = store.deliveries_of_listener("lst_a", None, None, 10).unwrap();
    assert_eq!(listed.items.len(), 1, "and indexed by its listener");
    assert_eq!(delivery.first_attempt.as_ref().map(|attempt| attempt.number), Some(1));
    assert!(store.queue.scan_prefix(keys::attempts_prefix(&pending.id)).next().is_none(), "one write less");

    store.complete_attempts(vec![failed_attempt(&delivery, 2)]).unwrap();
    let numbers = |store: &SledStore| -> Vec<u32> {
        store.attempts(&pending.id, 0, usize::MAX).unwrap().iter().map(|attempt| attempt.number).collect()
    };
    assert_eq!(numbers(&store), [1, 2]);
    // The record rewritten for the second attempt keeps the first.
    assert!(store.delivery(&pending.id).unwrap().unwrap().first_attempt.is_some());
    // A listing page carries no responses.
    let page = store.deliveries_of_event(7, None, None, 10).unwrap();
    assert_eq!(page.items.len(), 1);
    assert!(page.items[0].first_attempt.is_none());
}

#[test]
fn a_first_attempt_recorded_on_its_own_before_is_still_listed_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let event = Event { id: ids::event_id(3), seq: 3, ..Event::default() };
    let mut delivery = Delivery::pending(ids::delivery_id(3, "lst_a"), &event, "lst_a", 10);
    delivery.attempts = 2;
    // As hookd wrote attempts before the first one moved into the delivery's record.
    let old = |number: u32| Attempt { number, status_code: 500, ..Attempt::default() };
    store.queue.insert(keys::delivery(&delivery.id), encode(&delivery)).unwrap();
    for number in [1, 2] {
        store.queue.insert(keys::attempt(&delivery.id, number), encode(&old(number))).unwrap();
    }
    let listed: Vec<u32> =
        store.attempts(&delivery.id, 0, usize::MAX).unwrap().iter().map(|attempt| attempt.number).collect();
    assert_eq!(listed, [1, 2]);

    // Both places at once (never written so, but never listed twice).
    delivery.first_attempt = Some(old(1));
    store.queue.insert(keys::delivery(&delivery.id), encode(&delivery)).unwrap();
    let listed: Vec<u32> =
        store.attempts(&delivery.id, 0, usize::MAX).unwrap().iter().map(|attempt| attempt.number).collect();
    assert_eq!(listed, [1, 2]);
}

#[test]
fn recovery_leaves_a_delivery_to_its_manual_attempt_and_an_ended_delivery_holds_no_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let event = Event { id: ids::event_id(4), seq: 4, ..Event::default() };
    let mut failed = Delivery::pending(ids::delivery_id(4, "lst_o"), &event, "lst_o", 10);
    failed.state = DeliveryState::Failed as i32;
    // Its first attempt, straight from the log, failed for good: nothing holds the order.
    let attempt = Attempt { number: 1, status_code: 500, ..Attempt::default() };
    let completion = Completion { delivery: failed.clone(), attempt, entry: None, next: NextStep::Done, ordered: true };
    store.complete_attempts(vec![completion]).unwrap();
    assert_eq!(store.pending_head("lst_o").unwrap(), None);

    // A manual attempt is queued: recovery leaves the delivery to it, since that attempt
    // writes the delivery back as it read it (failed) when it ends.
    store.queue_manual_attempt(&failed.id, 20).unwrap().unwrap();
    assert_eq!(store.requeue_failed(std::slice::from_ref(&failed.id), 30).unwrap(), 0);
    assert_eq!(store.delivery(&failed.id).unwrap().unwrap().state, DeliveryState::Failed as i32);
    assert_eq!(store.pending_head("lst_o").unwrap(), None, "nothing holds the ordered listener");

    // Should an ended delivery still head an ordered listener's line (as recovery racing a
    // manual attempt left it before), dropping its stale entry frees the line.
    let mut requeued = failed.clone();
    requeued.state = DeliveryState::Pending as i32;
    store.queue.insert(keys::pending("lst_o", &failed.id), &[] as &[u8]).unwrap();
    store.queue.insert(keys::due(30, &failed.id), b"lst_o".as_slice()).unwrap();
    let stale = DueEntry { due_ms: 30, delivery_id: failed.id.clone(), listener_id: "lst_o".into(), manual: false };
    store.drop_entry(&stale).unwrap();
    assert_eq!(store.pending_head("lst_o").unwrap(), None);
    assert!(store.due(None, 100, 10).unwrap().iter().all(|due| due.manual), "only the manual entry is left");

    // A pending delivery's entry dropped (say, a manual one) keeps its place in the order.
    store.queue.insert(keys::delivery(&failed.id), encode(&requeued)).unwrap();
    store.queue.insert(keys::pending("lst_o", &failed.id), &[] as &[u8]).unwrap();
    let manual = store.due(None, 100, 10).unwrap().pop().unwrap();
    store.drop_entry(&manual).unwrap();
    assert_eq!(store.pending_head("lst_o").unwrap(), Some(failed.id.clone()));
}

#[test]
fn opening_waits_for_a_data_directory_still_held_by_a_closing_database() {
    let dir = tempfile::tempdir().unwrap();
    let first = SledStore::open(dir.path()).unwrap();
    let path = dir.path().to_owned();
    let second = std::thread::spawn(move || SledStore::open(&path).map(|store| store.close()));
    // The second open finds the directory locked until the first database is gone.
    std::thread::sleep(Duration::from_millis(200));
    first.close().unwrap();
    drop(first);
    second.join().unwrap().expect("opened once the first let go").unwrap();
}

// Registration and admin writes used to run on the intake's line, and a trigger waited for
// them and their flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_never_waits_behind_a_listener_write_which_holds_fan_out_back_until_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    store.append_event(new_event("prd_a", None, 1)).await.unwrap();
    store.settled().await.unwrap();
    let (entered, mut inside) = tokio::sync::mpsc::unbounded_channel();
    let (hold, held) = std::sync::mpsc::channel::<()>();
    // A listener write (it puts the fence up) that stops half-way until told to go on.
    let write = store.write(true, move |_, next_seq| {
        entered.send(next_seq).unwrap();
        held.recv().unwrap();
        Ok(())
    });
    let write = tokio::spawn(write);
    let point = inside.recv().await.unwrap();
    assert_eq!(point, 1, "the next event's number");
    // Triggers are answered meanwhile...
    let during = tokio::time::timeout(Duration::from_secs(30), store.append_event(new_event("prd_a", None, 2)))
        .await
        .expect("a trigger is answered while a listener write is under way")
        .unwrap();
    assert_eq!(ids::event_seq(&during.event_id), Some(1));
    store.settled().await.unwrap();
    // ...but fan-out does not reach them before the listener is written.
    assert_eq!(*store.durable_seq().borrow(), 1, "held back at the fence");
    hold.send(()).unwrap();
    write.await.unwrap().unwrap();
    assert_eq!(*store.durable_seq().borrow(), 2, "the fence is down once written");
    store.close().unwrap();
}
