use super::*;
use crate::store::writer::IDEMPOTENCY_WINDOW_MS;
use crate::store::{
    Attempt, CancelledLot, Completion, Delivery, DeliveryState, DueEntry, EventFilter, FanoutCursor, HistoryStore,
    MAX_SKIPPED, NewDelivery, NextStep, PipelineStore, Refusal, SeqRange,
};

/// The key hash the test producers are created with.
fn key_of(producer: &str) -> [u8; 32] {
    crate::crypto::hash_api_key(producer)
}

/// Opens a store holding enabled producers `prd_a` and `prd_b`.
async fn open_with_producers(dir: &std::path::Path) -> Arc<SledStore> {
    let store = SledStore::open(dir).unwrap();
    for id in ["prd_a", "prd_b"] {
        let producer =
            Producer { id: id.into(), enabled: true, key_hashes: vec![key_of(id).to_vec()], ..Producer::default() };
        store.create_producer(producer, key_of(id)).await.unwrap();
    }
    store
}

fn new_event(producer: &str, key: Option<&str>, at_ms: u64) -> NewEvent {
    NewEvent {
        producer_id: producer.into(),
        key_hash: key_of(producer),
        event_type: "thing.happened".into(),
        payload: b"{}".to_vec(),
        content_type: "application/json".into(),
        idempotency_key: key.map(str::to_owned),
        created_at_ms: at_ms,
    }
}

fn listener(id: &str, producer: &str, event_type: &str) -> Listener {
    Listener {
        id: id.into(),
        producer_id: producer.into(),
        event_hash: format!("evh_{event_type}"),
        event_type: event_type.into(),
        url: "http://127.0.0.1:1/hook".into(),
        enabled: true,
        ..Listener::default()
    }
}

#[tokio::test]
async fn events_append_in_order_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    let first = store.append_event(new_event("prd_a", None, 1)).await.unwrap();
    let second = store.append_event(new_event("prd_a", None, 2)).await.unwrap();
    assert_eq!(ids::event_seq(&first.event_id), Some(0));
    assert_eq!(ids::event_seq(&second.event_id), Some(1));
    // Answered once in the journal; in sled (and so fanned out) right after.
    let applied = *store.durable_seq().wait_for(|next| *next >= 2).await.unwrap();
    assert_eq!(applied, 2, "two events are durable");
    store.close().unwrap();
    drop(store);

    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.event(&first.event_id).unwrap().unwrap().created_at_ms, 1);
    let third = store.append_event(new_event("prd_a", None, 3)).await.unwrap();
    assert_eq!(ids::event_seq(&third.event_id), Some(2), "the sequence continues after a restart");
    store.close().unwrap();
}

#[tokio::test]
async fn event_lookup_needs_the_whole_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    let appended = store.append_event(new_event("prd_a", None, 1)).await.unwrap();
    store.settled().await.unwrap();
    let forged = format!("{}{}", &appended.event_id[..20], "0".repeat(16));
    assert!(store.event(&forged).unwrap().is_none());
    assert!(store.event("evt_nope").unwrap().is_none());
    store.close().unwrap();
}

#[tokio::test]
async fn idempotency_keys_dedupe_within_the_window_and_per_producer() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    let first = store.append_event(new_event("prd_a", Some("k1"), 1_000)).await.unwrap();
    assert!(!first.duplicate);
    let again = store.append_event(new_event("prd_a", Some("k1"), 2_000)).await.unwrap();
    assert_eq!(again, Appended { event_id: first.event_id.clone(), duplicate: true });
    let other_producer = store.append_event(new_event("prd_b", Some("k1"), 2_000)).await.unwrap();
    assert!(!other_producer.duplicate);
    let after_window = store.append_event(new_event("prd_a", Some("k1"), 1_000 + IDEMPOTENCY_WINDOW_MS)).await.unwrap();
    assert!(!after_window.duplicate);
    assert_ne!(after_window.event_id, first.event_id);
    store.close().unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_with_one_key_record_one_event() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.append_event(new_event("prd_a", Some("same"), 5)).await.unwrap() })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    assert_eq!(answers.iter().filter(|a| !a.duplicate).count(), 1);
    assert!(answers.iter().all(|a| a.event_id == answers[0].event_id));
    store.close().unwrap();
    assert_eq!(*store.durable_seq().borrow(), 1, "exactly one event was appended");
}

#[tokio::test]
async fn master_key_check_is_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let (a, b, c) = (("aa".to_owned(), [1; 32]), ("bb".to_owned(), [2; 32]), ("cc".to_owned(), [3; 32]));
    store.check_master_key(std::slice::from_ref(&a)).unwrap();
    store.check_master_key(std::slice::from_ref(&a)).unwrap();
    let error = store.check_master_key(std::slice::from_ref(&b)).unwrap_err();
    assert!(
        matches!(error, StoreError::WrongMasterKey { ref expected, ref found } if expected == "aa" && found == "bb")
    );
    // During a rotation the data's key may be a previous one; once it ends, the new one.
    store.check_master_key(&[b.clone(), a.clone()]).unwrap();
    store.set_master_key(&b.0, &b.1).unwrap();
    store.check_master_key(std::slice::from_ref(&b)).unwrap();
    assert!(store.check_master_key(&[c, a]).is_err());
    store.close().unwrap();
}

#[tokio::test]
async fn listeners_are_listed_by_type_and_by_producer_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    for i in 0..5 {
        store.insert_listener(listener(&format!("lst_{i}"), "prd_a", "t.one")).await.unwrap();
    }
    store.insert_listener(listener("lst_9", "prd_a", "t.two")).await.unwrap();
    store.insert_listener(listener("lst_8", "prd_b", "t.one")).await.unwrap();

    let page = store.list_listeners("prd_a", Some("t.one"), None, 3).unwrap();
    assert_eq!(page.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(), ["lst_0", "lst_1", "lst_2"]);
    let rest = store.list_listeners("prd_a", Some("t.one"), Some("lst_2"), 3).unwrap();
    assert_eq!(rest.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(), ["lst_3", "lst_4"]);
    assert_eq!(store.list_listeners("prd_a", None, None, 100).unwrap().len(), 6);
    // "t.on" is a prefix of "t.one": the separator keeps them apart.
    assert!(store.list_listeners("prd_a", Some("t.on"), None, 100).unwrap().is_empty());

    assert!(store.delete_listener("lst_1").await.unwrap().is_some());
    assert_eq!(store.list_listeners("prd_a", Some("t.one"), None, 100).unwrap().len(), 4);
    assert_eq!(store.list_listeners("prd_a", None, None, 100).unwrap().len(), 5);
    assert!(store.delete_listener("lst_1").await.unwrap().is_none());
    store.close().unwrap();
}

#[tokio::test]
async fn key_rotation_with_and_without_grace() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let producer = Producer { id: "prd_a".into(), enabled: true, key_hashes: vec![vec![1; 32]], ..Producer::default() };
    store.create_producer(producer, [1; 32]).await.unwrap();
    assert!(store.producer_by_key(&[1; 32], 100).unwrap().is_some());

    assert!(store.rotate_producer_key("prd_a", [2; 32], 100, 50).await.unwrap());
    assert!(store.producer_by_key(&[1; 32], 149).unwrap().is_some(), "old key works during grace");
    assert!(store.producer_by_key(&[1; 32], 150).unwrap().is_none(), "old key stops after grace");
    assert!(store.producer_by_key(&[2; 32], 10_000).unwrap().is_some());

    assert!(store.rotate_producer_key("prd_a", [3; 32], 120, 0).await.unwrap());
    assert!(store.producer_by_key(&[1; 32], 120).unwrap().is_none());
    assert!(store.producer_by_key(&[2; 32], 120).unwrap().is_none(), "grace 0 stops the old key at once");
    assert!(store.producer_by_key(&[3; 32], 120).unwrap().is_some());
    assert_eq!(store.producer("prd_a").unwrap().unwrap().key_hashes, vec![vec![3u8; 32]]);
    assert!(!store.rotate_producer_key("prd_x", [4; 32], 0, 0).await.unwrap());
    store.close().unwrap();
}

#[tokio::test]
async fn writes_after_close_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.close().unwrap();
    assert!(matches!(store.append_event(new_event("prd_a", None, 1)).await, Err(StoreError::Closed)));
}

#[tokio::test]
async fn appends_are_refused_once_the_producer_is_disabled_or_the_key_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    store.set_producer_enabled("prd_a", false, "leaked".into()).await.unwrap();
    let refused = store.append_event(new_event("prd_a", None, 1)).await.unwrap_err();
    assert!(matches!(refused, StoreError::Refused(Refusal::ProducerDisabled(ref reason)) if reason == "leaked"));

    store.rotate_producer_key("prd_b", [9; 32], 1, 0).await.unwrap();
    let refused = store.append_event(new_event("prd_b", None, 1)).await.unwrap_err();
    assert!(matches!(refused, StoreError::Refused(Refusal::KeyRevoked)));
    let mut with_new_key = new_event("prd_b", None, 1);
    with_new_key.key_hash = [9; 32];
    store.append_event(with_new_key).await.unwrap();
    store.close().unwrap();
}

#[tokio::test]
async fn a_listener_is_fanned_out_the_events_triggered_while_it_was_registered_and_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    for at in 0..3 {
        store.append_event(new_event("prd_a", None, at)).await.unwrap();
    }
    // Fan-out may not have reached events 0-2 yet; the listener must not get them.
    store.insert_listener(listener("lst_1", "prd_a", "thing.happened")).await.unwrap();
    let registered = store.listener("lst_1").unwrap().unwrap();
    assert_eq!(registered.enabled_from_seq, 3);
    assert!(!registered.wants(2) && registered.wants(3) && registered.wants(1_000));

    store.append_event(new_event("prd_a", None, 3)).await.unwrap();
    store.update_listener("lst_1", Box::new(|listener| listener.enabled = false)).await.unwrap();
    let after = store.append_event(new_event("prd_a", None, 4)).await.unwrap();
    assert_eq!(ids::event_seq(&after.event_id), Some(4));
    let disabled = store.listener("lst_1").unwrap().unwrap();
    assert_eq!((disabled.enabled_from_seq, disabled.disabled_from_seq), (3, 4));
    // Event 3 came while it was enabled: its delivery waits. Event 4 came while it was not.
    assert!(disabled.wants(3) && !disabled.wants(4));

    store.update_listener("lst_1", Box::new(|listener| listener.enabled = true)).await.unwrap();
    let enabled = store.listener("lst_1").unwrap().unwrap();
    // Enabled again: event 3, which fan-out may not have reached, is still owed to it;
    // event 4 is skipped for good, and everything from now on is wanted.
    assert_eq!(enabled.enabled_from_seq, 3);
    assert_eq!(enabled.skipped, vec![SeqRange { from: 4, until: 5 }]);
    assert!(enabled.wants(3) && !enabled.wants(4) && enabled.wants(5));
    // An edit that leaves it enabled moves nothing.
    store.append_event(new_event("prd_a", None, 5)).await.unwrap();
    store.update_listener("lst_1", Box::new(|listener| listener.ordered = true)).await.unwrap();
    assert_eq!(store.listener("lst_1").unwrap().unwrap(), Listener { ordered: true, ..enabled });

    // A second spell while fan-out is still behind both: each keeps its own range, and the
    // events between them stay owed.
    store.update_listener("lst_1", Box::new(|listener| listener.enabled = false)).await.unwrap();
    store.append_event(new_event("prd_a", None, 6)).await.unwrap();
    store.update_listener("lst_1", Box::new(|listener| listener.enabled = true)).await.unwrap();
    let twice = store.listener("lst_1").unwrap().unwrap();
    assert_eq!(twice.skipped, vec![SeqRange { from: 4, until: 5 }, SeqRange { from: 6, until: 7 }]);
    let wanted: Vec<u64> = (0..8).filter(|&seq| twice.wants(seq)).collect();
    assert_eq!(wanted, vec![3, 5, 7]);

    // Once the list is full, a re-enabling forgets the ranges fan-out has passed.
    store.set_fanout_cursor(&FanoutCursor { next_seq: 6, ..FanoutCursor::default() }).unwrap();
    for at in 7..(7 + MAX_SKIPPED as u64 - 2) {
        store.update_listener("lst_1", Box::new(|listener| listener.enabled = false)).await.unwrap();
        store.append_event(new_event("prd_a", None, at)).await.unwrap();
        store.update_listener("lst_1", Box::new(|listener| listener.enabled = true)).await.unwrap();
    }
    let full = store.listener("lst_1").unwrap().unwrap();
    assert_eq!(full.skipped.len(), MAX_SKIPPED);
    assert_eq!(full.skipped[..2], [SeqRange { from: 4, until: 5 }, SeqRange { from: 6, until: 7 }]);
    store.update_listener("lst_1", Box::new(|listener| listener.enabled = false)).await.unwrap();
    let last = store.append_event(new_event("prd_a", None, 100)).await.unwrap();
    let last = ids::event_seq(&last.event_id).unwrap();
    store.update_listener("lst_1", Box::new(|listener| listener.enabled = true)).await.unwrap();
    let pruned = store.listener("lst_1").unwrap().unwrap();
    assert_eq!(pruned.skipped.len(), MAX_SKIPPED, "one range passed and dropped, one added");
    assert_eq!(pruned.skipped[0], SeqRange { from: 6, until: 7 });
    assert_eq!(pruned.skipped.last(), Some(&SeqRange { from: last, until: last + 1 }));
    store.close().unwrap();
}

#[tokio::test]
async fn a_deleted_listener_is_answered_with_where_its_events_end_and_where_fan_out_stood() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    store.insert_listener(listener("lst_1", "prd_a", "thing.happened")).await.unwrap();
    for at in 0..3 {
        store.append_event(new_event("prd_a", None, at)).await.unwrap();
    }
    store.settled().await.unwrap();
    store.set_fanout_cursor(&FanoutCursor { next_seq: 1, ..FanoutCursor::default() }).unwrap();
    let deleted = store.delete_listener("lst_1").await.unwrap().unwrap();
    // Events 0-2 were its, whatever fan-out had reached; nothing later is.
    assert!(!deleted.listener.enabled && deleted.listener.wants(2) && !deleted.listener.wants(3));
    assert_eq!(deleted.unsure_from_seq, 1);

    // Cancelling what may have no record keeps what has one.
    let delivery = |seq: u64| {
        let event = store.event_at(seq).unwrap().unwrap();
        Delivery::pending(ids::delivery_id(seq, "lst_1"), &event, "lst_1", 0)
    };
    store.park_new(&[NewDelivery { delivery: delivery(1), ordered: false }]).unwrap();
    store.cancel_unrecorded(&[delivery(1), delivery(2)]).unwrap();
    let state = |seq: u64| store.delivery(&ids::delivery_id(seq, "lst_1")).unwrap().unwrap().state;
    assert_eq!((state(1), state(2)), (DeliveryState::Pending as i32, DeliveryState::Cancelled as i32));
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
        store.attempts(&pending.id).unwrap().iter().map(|attempt| attempt.number).collect()
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
    let listed: Vec<u32> = store.attempts(&delivery.id).unwrap().iter().map(|attempt| attempt.number).collect();
    assert_eq!(listed, [1, 2]);

    // Both places at once (never written so, but never listed twice).
    delivery.first_attempt = Some(old(1));
    store.queue.insert(keys::delivery(&delivery.id), encode(&delivery)).unwrap();
    let listed: Vec<u32> = store.attempts(&delivery.id).unwrap().iter().map(|attempt| attempt.number).collect();
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
fn a_deleted_listeners_lot_is_cancelled_where_it_lies_in_bounded_steps() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let new = |seq: u64, listener: &str| {
        let event = Event { id: ids::event_id(seq), seq, ..Event::default() };
        NewDelivery {
            delivery: Delivery::pending(ids::delivery_id(seq, listener), &event, listener, 10),
            ordered: true,
        }
    };
    let gone: Vec<NewDelivery> = (0..5).map(|seq| new(seq, "lst_gone")).collect();
    let kept = new(9, "lst_kept");
    let all: Vec<NewDelivery> = gone.iter().cloned().chain([kept.clone()]).collect();
    store.park_new(&all).unwrap();
    // One of them already ended; another also has a manual attempt waiting, parked too.
    let mut ended = gone[4].delivery.clone();
    ended.state = DeliveryState::Succeeded as i32;
    store.queue.insert(keys::delivery(&ended.id), encode(&ended)).unwrap();
    store.queue_manual_attempt(&gone[0].delivery.id, 20).unwrap().unwrap();
    let entries = store.due(None, 100, 100).unwrap();
    assert_eq!(entries.len(), 1);
    store.park(&entries).unwrap();
    // A manual attempt of another one is queued (or under way) after that: not in the lot.
    store.queue_manual_attempt(&gone[1].delivery.id, 30).unwrap().unwrap();

    let step = |limit| store.cancel_parked("lst_gone", limit).unwrap();
    // The first step reaches gone[1]'s parked entry: it goes back to the queue, for its
    // worker to cancel once the manual attempt has ended.
    assert_eq!(step(4), CancelledLot { taken: 4, requeued_from_ms: Some(10) });
    assert_eq!(step(4), CancelledLot { taken: 2, requeued_from_ms: None });
    assert_eq!(step(4), CancelledLot::default());
    let state = |id: &str| DeliveryState::try_from(store.delivery(id).unwrap().unwrap().state).unwrap();
    for new in [&gone[0], &gone[2], &gone[3]] {
        assert_eq!(state(&new.delivery.id), DeliveryState::Cancelled);
    }
    assert_eq!(state(&gone[1].delivery.id), DeliveryState::Pending);
    assert_eq!(state(&ended.id), DeliveryState::Succeeded, "an ended delivery keeps its outcome");
    assert_eq!(store.pending_head("lst_gone").unwrap(), Some(gone[1].delivery.id.clone()));
    assert!(store.queue.scan_prefix(keys::manual_prefix(&gone[0].delivery.id)).next().is_none());
    let queued: Vec<(u64, bool)> =
        store.due(None, u64::MAX - 1, 100).unwrap().iter().map(|due| (due.due_ms, due.manual)).collect();
    assert_eq!(queued, [(10, false), (30, true)], "only gone[1]'s entries are left, both in the queue");
    // Another listener's lot is left alone.
    assert_eq!(store.parked_listeners().unwrap(), ["lst_kept"]);
    assert_eq!(state(&kept.delivery.id), DeliveryState::Pending);
    assert_eq!(store.pending_head("lst_kept").unwrap(), Some(kept.delivery.id.clone()));
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

// Regression: RecoverListener gathered every failed id of a listener in one list.
#[test]
fn a_listeners_failed_deliveries_are_read_a_page_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let mut expected = Vec::new();
    for seq in 0..1_500u64 {
        let event = Event { id: ids::event_id(seq), seq, created_at_ms: 100 + seq, ..Event::default() };
        let mut delivery = Delivery::pending(ids::delivery_id(seq, "lst_r"), &event, "lst_r", 100 + seq);
        // Every fifth succeeded; the rest failed.
        delivery.state = if seq % 5 == 0 { DeliveryState::Succeeded } else { DeliveryState::Failed } as i32;
        if seq % 5 != 0 && seq >= 10 {
            expected.push(delivery.id.clone());
        }
        store.queue.insert(keys::delivery(&delivery.id), encode(&delivery)).unwrap();
        store.queue.insert(keys::by_listener("lst_r", &delivery.id), &[] as &[u8]).unwrap();
    }
    let mut found = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store.failed_deliveries("lst_r", 110, None, after.as_deref(), 500).unwrap();
        assert!(page.items.len() <= 500);
        found.extend(page.items);
        pages += 1;
        match page.resume_after {
            Some(resume) => after = Some(resume),
            None => break,
        }
    }
    assert_eq!(found, expected, "every failed delivery since the time, once, oldest first");
    assert!(pages >= 3, "{pages} pages");
    let until = store.failed_deliveries("lst_r", 110, Some(120), None, 500).unwrap();
    assert_eq!(until.items.len(), 8, "[110, 120) holds 10 deliveries, 2 of them succeeded");
    assert_eq!(until.resume_after, None);
}

// Regression: a retention shorter than 24 hours took idempotency records with their events,
// so a retried trigger within the window recorded a second event.
#[tokio::test]
async fn an_idempotency_key_outlives_an_event_trimmed_within_its_window() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    let first = store.append_event(new_event("prd_a", Some("order-1"), 1_000)).await.unwrap();
    store.append_event(new_event("prd_a", None, 1_000)).await.unwrap();
    store.settled().await.unwrap();
    PipelineStore::set_fanout_cursor(&*store, &FanoutCursor { next_seq: 2, ..FanoutCursor::default() }).unwrap();
    // Retention of one second, at 5,000: both events go, the key's 24 hours are not up.
    let trimmed = HistoryStore::trim(&*store, 2_000, 5_000u64.saturating_sub(IDEMPOTENCY_WINDOW_MS), 0, 100).unwrap();
    assert_eq!(trimmed.events, 2);
    assert!(store.event(&first.event_id).unwrap().is_none());
    let retried = store.append_event(new_event("prd_a", Some("order-1"), 5_000)).await.unwrap();
    assert_eq!(retried, Appended { event_id: first.event_id.clone(), duplicate: true });
    // Nothing to sweep before the 24 hours are up; then the record goes.
    assert_eq!(HistoryStore::trim_keys(&*store, 1_000, 100).unwrap(), 0);
    assert_eq!(HistoryStore::trim_keys(&*store, 1_001, 100).unwrap(), 1);
    assert_eq!(store.tree.scan_prefix(keys::KEPT_KEYS).count(), 0);
    let later = store.append_event(new_event("prd_a", Some("order-1"), 2_000 + IDEMPOTENCY_WINDOW_MS)).await.unwrap();
    assert!(!later.duplicate);
    store.close().unwrap();
}

#[tokio::test]
async fn a_listeners_deliveries_are_listed_recorded_or_still_waiting_in_the_log_page_by_page() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    store.insert_listener(listener("lst_l", "prd_a", "thing")).await.unwrap();
    let mut events = Vec::new();
    for at in 0..7 {
        let mut event = new_event("prd_a", None, at);
        event.event_type = if at == 3 { "other".into() } else { "thing".into() };
        events.push(store.append_event(event).await.unwrap().event_id);
    }
    store.settled().await.unwrap();
    // Events 0, 2 and 4 had their first attempt (succeeded); the rest still wait in the log
    // (3 is another type).
    let recorded: Vec<Completion> = [0u64, 2, 4]
        .iter()
        .map(|&seq| {
            let event = store.event_at(seq).unwrap().unwrap();
            let mut delivery = Delivery::pending(ids::delivery_id(seq, "lst_l"), &event, "lst_l", 0);
            delivery.state = DeliveryState::Succeeded as i32;
            delivery.attempts = 1;
            let attempt = Attempt { number: 1, status_code: 200, ..Attempt::default() };
            Completion { delivery, attempt, entry: None, next: NextStep::Done, ordered: false }
        })
        .collect();
    store.complete_attempts(recorded).unwrap();
    for page_size in [1, 2, 3, 100] {
        let mut listed = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.deliveries_of_listener("lst_l", None, after.as_deref(), page_size).unwrap();
            assert!(page.items.len() <= page_size);
            listed.extend(page.items.into_iter().map(|d| (d.event_seq, DeliveryState::try_from(d.state).unwrap())));
            match page.resume_after {
                Some(resume) => after = Some(resume),
                None => break,
            }
        }
        let expected: Vec<(u64, DeliveryState)> = [0, 1, 2, 4, 5, 6]
            .iter()
            .map(|&seq| (seq, if [0, 2, 4].contains(&seq) { DeliveryState::Succeeded } else { DeliveryState::Pending }))
            .collect();
        assert_eq!(listed, expected, "pages of {page_size}");
    }
    let pending = store.deliveries_of_listener("lst_l", Some(DeliveryState::Pending), None, 100).unwrap();
    assert_eq!(pending.items.iter().map(|d| d.event_seq).collect::<Vec<_>>(), [1, 5, 6]);
    // Once fan-out's cursor has passed them, only records are listed.
    store.set_fanout_cursor(&FanoutCursor { next_seq: 7, ..FanoutCursor::default() }).unwrap();
    assert_eq!(store.deliveries_of_listener("lst_l", None, None, 100).unwrap().items.len(), 3);
    // One event's: recorded or not, and one by id.
    store.set_fanout_cursor(&FanoutCursor::default()).unwrap();
    assert_eq!(store.deliveries_of_event(5, None, None, 10).unwrap().items.len(), 1);
    let (waiting, recorded) = store.delivery_view(&ids::delivery_id(5, "lst_l")).unwrap().unwrap();
    assert!(!recorded && waiting.state == DeliveryState::Pending as i32 && waiting.event_id == events[5]);
    assert!(store.delivery_view(&ids::delivery_id(3, "lst_l")).unwrap().is_none(), "not a type it listens to");
    assert!(store.delivery_view(&ids::delivery_id(0, "lst_l")).unwrap().unwrap().1);
    store.close().unwrap();
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

#[tokio::test]
async fn a_listener_fanned_out_apart_keeps_its_waiting_deliveries_listed_and_their_events_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_producers(dir.path()).await;
    store.insert_listener(listener("lst_behind", "prd_a", "thing")).await.unwrap();
    store.insert_listener(listener("lst_ahead", "prd_a", "thing")).await.unwrap();
    for at in 0..6 {
        let mut event = new_event("prd_a", None, at);
        event.event_type = "thing".into();
        store.append_event(event).await.unwrap();
    }
    store.settled().await.unwrap();
    // Fan-out has passed every event; one listener was detached at event 2.
    store.set_fanout_cursor(&FanoutCursor { next_seq: 6, ..FanoutCursor::default() }).unwrap();
    store.set_detached("lst_behind", Some(2)).unwrap();
    assert_eq!(store.detached().unwrap(), [("lst_behind".to_owned(), 2)]);
    let seqs = |listener_id: &str| -> Vec<u64> {
        store.deliveries_of_listener(listener_id, None, None, 100).unwrap().items.iter().map(|d| d.event_seq).collect()
    };
    assert_eq!(seqs("lst_behind"), [2, 3, 4, 5], "from where it stands, waiting in the log");
    assert!(seqs("lst_ahead").is_empty(), "nothing recorded, nothing waiting");
    assert_eq!(store.deliveries_of_event(3, None, None, 10).unwrap().items.len(), 1);
    let (events, reached) = store.events_of("prd_a", "thing", 2, 6, 100, 100).unwrap();
    assert_eq!((events.iter().map(|e| e.seq).collect::<Vec<_>>(), reached), (vec![2, 3, 4, 5], 6));
    let (events, reached) = store.events_of("prd_a", "thing", 2, 6, 2, 100).unwrap();
    assert_eq!((events.len(), reached), (2, 4), "a scan limit stops it part way");
    let (events, reached) = store.events_of("prd_a", "thing", 2, 6, 100, 3).unwrap();
    assert_eq!((events.iter().map(|e| e.seq).collect::<Vec<_>>(), reached), (vec![2, 3, 4], 5), "so does a limit");
    // Retention keeps the events whose deliveries wait.
    let trimmed = HistoryStore::trim(&*store, u64::MAX, 0, 0, 100).unwrap();
    assert_eq!(trimmed.events, 2);
    store.set_detached("lst_behind", None).unwrap();
    assert!(seqs("lst_behind").is_empty());
    store.close().unwrap();
}
