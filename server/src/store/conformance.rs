//! The store conformance tests: what every backend must do, written once against the store
//! traits. A backend's tests run them all with [`conformance_tests!`], given a [`Place`]: where
//! one test's store lives, opened as often as the test likes (a reopen sees what was there).
//! Tests that look at one backend's own layout stay with that backend.

use std::sync::Arc;

use super::{
    Appended, Attempt, Backend, CancelledLot, Completion, Delivery, DeliveryState, DueEntry, Event, FanoutCursor,
    HistoryStore, Listener, NewDelivery, NewEvent, NextStep, PipelineStore, Producer, Refusal, SeqRange, Store,
    StoreError,
};
use crate::ids;
use crate::store::{EventFilter, IDEMPOTENCY_WINDOW_MS, LIST_PAGE_BYTES, MAX_SKIPPED};

/// Where one test's store lives.
pub(crate) trait Place {
    type Backend: Store;
    /// Opens the store kept here: empty the first time, as it was left after a close.
    fn open(&self) -> Arc<Self::Backend>;
    /// Whether this backend can be tested here (one needing a database server says plainly
    /// when it is skipped).
    fn available(&self) -> bool {
        true
    }
}

/// Runs the conformance tests of [`Store`] alone (producers, keys, listeners, the event log)
/// on a backend; `$place` makes a fresh [`Place`] for each.
macro_rules! store_conformance_tests {
    ($place:expr) => {
        $crate::store::conformance::conformance_tests!(@each $place, [
            events_append_in_order_and_survive_reopen,
            event_lookup_needs_the_whole_id,
            idempotency_keys_dedupe_within_the_window_and_per_producer,
            master_key_check_is_remembered,
            listeners_are_listed_by_type_and_by_producer_in_pages,
            key_rotation_with_and_without_grace,
            writes_after_close_fail_cleanly,
            appends_are_refused_once_the_producer_is_disabled_or_the_key_revoked,
        ], [
            concurrent_appends_with_one_key_record_one_event,
        ]);
    };
}
pub(crate) use store_conformance_tests;

/// Runs every conformance test on a whole [`Backend`]; `$place` makes a fresh [`Place`] for
/// each.
macro_rules! conformance_tests {
    ($place:expr) => {
        $crate::store::conformance::store_conformance_tests!($place);
        $crate::store::conformance::conformance_tests!(@each $place, [
            a_listener_is_fanned_out_the_events_triggered_while_it_was_registered_and_enabled,
            a_deleted_listener_is_answered_with_where_its_events_end_and_where_fan_out_stood,
            a_listeners_deliveries_are_listed_recorded_or_still_waiting_in_the_log_page_by_page,
            a_listener_fanned_out_apart_keeps_its_waiting_deliveries_listed_and_their_events_kept,
            a_listener_reading_back_holds_back_retention_of_its_own_events_only,
            a_listeners_failed_deliveries_are_read_a_page_at_a_time,
            a_deleted_listeners_lot_is_cancelled_where_it_lies_in_bounded_steps,
            an_idempotency_key_outlives_an_event_trimmed_within_its_window,
            a_page_of_events_stops_at_its_byte_budget,
            a_delivery_has_one_manual_attempt_queued_at_a_time,
            a_deliverys_attempts_are_read_a_page_at_a_time,
            an_events_deliveries_are_listed_recorded_or_still_waiting_page_by_page,
        ], []);
    };
    (@each $place:expr, [$($name:ident,)*], [$($multi:ident,)*]) => {
        $(
            #[tokio::test]
            async fn $name() {
                let place = $place;
                if $crate::store::conformance::Place::available(&place) {
                    $crate::store::conformance::$name(place).await
                }
            }
        )*
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $multi() {
                let place = $place;
                if $crate::store::conformance::Place::available(&place) {
                    $crate::store::conformance::$multi(place).await
                }
            }
        )*
    };
}
pub(crate) use conformance_tests;

/// The key hash the test producers are created with.
pub(crate) fn key_of(producer: &str) -> [u8; 32] {
    crate::crypto::hash_api_key(producer)
}

/// `store`, holding enabled producers `prd_a` and `prd_b`.
pub(crate) async fn with_producers<S: Store>(store: Arc<S>) -> Arc<S> {
    for id in ["prd_a", "prd_b"] {
        let producer =
            Producer { id: id.into(), enabled: true, key_hashes: vec![key_of(id).to_vec()], ..Producer::default() };
        store.create_producer(producer, key_of(id)).await.unwrap();
    }
    store
}

pub(crate) fn new_event(producer: &str, key: Option<&str>, at_ms: u64) -> NewEvent {
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

pub(crate) fn listener(id: &str, producer: &str, event_type: &str) -> Listener {
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

pub(crate) async fn events_append_in_order_and_survive_reopen<P: Place>(place: P) {
    let store = with_producers(place.open()).await;
    let first = store.append_event(new_event("prd_a", None, 1)).await.unwrap();
    let second = store.append_event(new_event("prd_a", None, 2)).await.unwrap();
    assert_eq!(ids::event_seq(&first.event_id), Some(0));
    assert_eq!(ids::event_seq(&second.event_id), Some(1));
    // Answered once in the journal; in sled (and so fanned out) right after.
    let applied = *store.durable_seq().wait_for(|next| *next >= 2).await.unwrap();
    assert_eq!(applied, 2, "two events are durable");
    store.close().unwrap();
    drop(store);

    let store = place.open();
    assert_eq!(store.event(&first.event_id).unwrap().unwrap().created_at_ms, 1);
    let third = store.append_event(new_event("prd_a", None, 3)).await.unwrap();
    assert_eq!(ids::event_seq(&third.event_id), Some(2), "the sequence continues after a restart");
    store.close().unwrap();
}

pub(crate) async fn event_lookup_needs_the_whole_id<P: Place>(place: P) {
    let store = with_producers(place.open()).await;
    let appended = store.append_event(new_event("prd_a", None, 1)).await.unwrap();
    store.settled().await.unwrap();
    let forged = format!("{}{}", &appended.event_id[..20], "0".repeat(16));
    assert!(store.event(&forged).unwrap().is_none());
    assert!(store.event("evt_nope").unwrap().is_none());
    store.close().unwrap();
}

pub(crate) async fn idempotency_keys_dedupe_within_the_window_and_per_producer<P: Place>(place: P) {
    let store = with_producers(place.open()).await;
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

pub(crate) async fn concurrent_appends_with_one_key_record_one_event<P: Place>(place: P) {
    let store = with_producers(place.open()).await;
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

pub(crate) async fn master_key_check_is_remembered<P: Place>(place: P) {
    let store = place.open();
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

pub(crate) async fn listeners_are_listed_by_type_and_by_producer_in_pages<P: Place>(place: P) {
    let store = place.open();
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

pub(crate) async fn key_rotation_with_and_without_grace<P: Place>(place: P) {
    let store = place.open();
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

pub(crate) async fn writes_after_close_fail_cleanly<P: Place>(place: P) {
    let store = place.open();
    store.close().unwrap();
    assert!(matches!(store.append_event(new_event("prd_a", None, 1)).await, Err(StoreError::Closed)));
}

pub(crate) async fn appends_are_refused_once_the_producer_is_disabled_or_the_key_revoked<P: Place>(place: P) {
    let store = with_producers(place.open()).await;
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

pub(crate) async fn a_listener_is_fanned_out_the_events_triggered_while_it_was_registered_and_enabled<P: Place>(
    place: P,
) where
    P::Backend: Backend,
{
    let store = with_producers(place.open()).await;
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

pub(crate) async fn a_deleted_listener_is_answered_with_where_its_events_end_and_where_fan_out_stood<P: Place>(place: P)
where
    P::Backend: Backend,
{
    let store = with_producers(place.open()).await;
    let sealed = Listener { sealed_secret: vec![7; 40], ..listener("lst_1", "prd_a", "thing.happened") };
    store.insert_listener(sealed).await.unwrap();
    for at in 0..3 {
        store.append_event(new_event("prd_a", None, at)).await.unwrap();
    }
    store.settled().await.unwrap();
    store.set_fanout_cursor(&FanoutCursor { next_seq: 1, ..FanoutCursor::default() }).unwrap();
    let deleted = store.delete_listener("lst_1").await.unwrap().unwrap();
    // Events 0-2 were its, whatever fan-out had reached; nothing later is.
    assert!(!deleted.listener.enabled && deleted.listener.wants(2) && !deleted.listener.wants(3));
    assert_eq!(deleted.unsure_from_seq, 1);
    // The deletion is recorded until what it owed is cancelled.
    let owing = store.deleted_owing().unwrap();
    assert_eq!(owing.iter().map(|d| (d.listener.id.as_str(), d.unsure_from_seq)).collect::<Vec<_>>(), [("lst_1", 1)]);
    assert!(!owing[0].listener.wants(3) && owing[0].listener.wants(0));
    assert!(owing[0].listener.sealed_secret.is_empty(), "no copy of its secret is kept");
    // Retention keeps the events whose deliveries are still to be cancelled.
    store.set_fanout_cursor(&FanoutCursor { next_seq: 3, ..FanoutCursor::default() }).unwrap();
    assert_eq!(HistoryStore::trim(&*store, u64::MAX, 0, 0, 100).unwrap().events, 1, "event 0 only");
    store.forget_deleted("lst_1").unwrap();
    assert!(store.deleted_owing().unwrap().is_empty());
    // A listener fanned out apart is unsure from where it stands, if further back.
    store.insert_listener(listener("lst_2", "prd_a", "thing.happened")).await.unwrap();
    store.set_fanout_cursor(&FanoutCursor { next_seq: 3, ..FanoutCursor::default() }).unwrap();
    store.set_detached("lst_2", Some(2)).unwrap();
    assert_eq!(store.delete_listener("lst_2").await.unwrap().unwrap().unsure_from_seq, 2);

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

/// The record of `event`'s delivery to `listener_id`, whose first attempt succeeded.
fn first_attempt_succeeded(event: &Event, listener_id: &str) -> Completion {
    let mut delivery = Delivery::pending(ids::delivery_id(event.seq, listener_id), event, listener_id, 0);
    delivery.state = DeliveryState::Succeeded as i32;
    delivery.attempts = 1;
    let attempt = Attempt { number: 1, status_code: 200, ..Attempt::default() };
    Completion { delivery, attempt, entry: None, next: NextStep::Done, ordered: false }
}

// Review: a recent event's deliveries were listed whole (every record read, every listener's
// pair looked up) before the page was cut; now a page's worth is read at a time.
pub(crate) async fn an_events_deliveries_are_listed_recorded_or_still_waiting_page_by_page<P: Place>(place: P)
where
    P::Backend: Backend,
{
    let store = with_producers(place.open()).await;
    let listeners: Vec<String> = (0..7).map(|n| format!("lst_{n}")).collect();
    for id in &listeners {
        store.insert_listener(listener(id, "prd_a", "thing")).await.unwrap();
    }
    let mut event = new_event("prd_a", None, 1);
    event.event_type = "thing".into();
    store.append_event(event).await.unwrap();
    store.settled().await.unwrap();
    let event = store.event_at(0).unwrap().unwrap();
    // Three of the seven had their first attempt; the other four still wait in the log.
    let recorded: Vec<Completion> = listeners[..3].iter().map(|id| first_attempt_succeeded(&event, id)).collect();
    store.complete_attempts(recorded).unwrap();
    let mut expected: Vec<(String, DeliveryState)> = listeners
        .iter()
        .enumerate()
        .map(|(n, id)| (ids::delivery_id(0, id), if n < 3 { DeliveryState::Succeeded } else { DeliveryState::Pending }))
        .collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    let pending = Some(DeliveryState::Pending);
    for (state, page_size) in [(None, 1), (None, 2), (None, 3), (None, 100), (pending, 1), (pending, 2), (pending, 3)] {
        let mut listed = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.deliveries_of_event(0, state, after.as_deref(), page_size).unwrap();
            assert!(page.items.len() <= page_size);
            listed.extend(page.items.into_iter().map(|d| (d.id, DeliveryState::try_from(d.state).unwrap())));
            match page.resume_after {
                Some(resume) => after = Some(resume),
                None => break,
            }
        }
        let wanted: Vec<_> =
            expected.iter().filter(|(_, listed)| state.is_none_or(|state| state == *listed)).cloned().collect();
        assert_eq!(listed, wanted, "pages of {page_size}, {state:?}");
    }
    store.close().unwrap();
}

pub(crate) async fn a_listeners_deliveries_are_listed_recorded_or_still_waiting_in_the_log_page_by_page<P: Place>(
    place: P,
) where
    P::Backend: Backend,
{
    let store = with_producers(place.open()).await;
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
        .map(|&seq| first_attempt_succeeded(&store.event_at(seq).unwrap().unwrap(), "lst_l"))
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

pub(crate) async fn a_listener_fanned_out_apart_keeps_its_waiting_deliveries_listed_and_their_events_kept<P: Place>(
    place: P,
) where
    P::Backend: Backend,
{
    let store = with_producers(place.open()).await;
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

/// A listener reading its events back from the log keeps those events from retention, and no
/// other producer's (before, it held back every later event, whoever triggered it).
pub(crate) async fn a_listener_reading_back_holds_back_retention_of_its_own_events_only<P: Place>(place: P)
where
    P::Backend: Backend,
{
    let store = with_producers(place.open()).await;
    store.insert_listener(listener("lst_behind", "prd_a", "thing.happened")).await.unwrap();
    // Events 0-5, prd_a's and prd_b's in turn, and a prd_a event of another type.
    for at in 0..6 {
        let producer = if at % 2 == 0 { "prd_a" } else { "prd_b" };
        store.append_event(new_event(producer, None, at)).await.unwrap();
    }
    let other_type = NewEvent { event_type: "other.thing".into(), ..new_event("prd_a", None, 6) };
    store.append_event(other_type).await.unwrap();
    store.settled().await.unwrap();
    store.set_fanout_cursor(&FanoutCursor { next_seq: 7, ..FanoutCursor::default() }).unwrap();
    store.set_detached("lst_behind", Some(2)).unwrap();
    let left =
        |store: &P::Backend| -> Vec<u64> { (0..7).filter(|seq| store.event_at(*seq).unwrap().is_some()).collect() };
    let trimmed = HistoryStore::trim(&*store, u64::MAX, 0, 0, 100).unwrap();
    assert_eq!((trimmed.events, trimmed.kept, trimmed.next_seq), (5, 2, None));
    assert_eq!(left(&store), [2, 4], "its own events from where it stands stay");
    // A place in the log whose listener is gone (its owed pairs being cancelled) stops the
    // sweep there, whoever's events lie beyond.
    store.set_detached("lst_behind", None).unwrap();
    store.set_detached("lst_gone", Some(3)).unwrap();
    assert_eq!(HistoryStore::trim(&*store, u64::MAX, 0, 0, 100).unwrap().events, 1);
    assert_eq!(left(&store), [4]);
    // Once nobody reads back, the rest goes too.
    store.set_detached("lst_gone", None).unwrap();
    assert_eq!(HistoryStore::trim(&*store, u64::MAX, 0, 0, 100).unwrap().events, 1);
    assert!(left(&store).is_empty());
    store.close().unwrap();
}

// Regression (review): a page held up to a thousand events whatever their payloads, so one
// listing of large events made a response of a gigabyte.
pub(crate) async fn a_page_of_events_stops_at_its_byte_budget<P: Place>(place: P)
where
    P::Backend: Backend,
{
    let store = with_producers(place.open()).await;
    let large = |at: u64| NewEvent { payload: vec![b'x'; 1 << 20], ..new_event("prd_a", None, at) };
    for at in 0..5 {
        store.append_event(large(at)).await.unwrap();
    }
    store.append_event(new_event("prd_a", None, 5)).await.unwrap();
    store.settled().await.unwrap();
    let mut pages = Vec::new();
    let mut after = None;
    for producer in [None, Some("prd_a".to_owned())] {
        let filter = EventFilter { producer_id: producer, ..EventFilter::default() };
        loop {
            let page = HistoryStore::list_events(&*store, &filter, after, 1000).unwrap();
            let bytes: usize = page.items.iter().map(|event| event.payload.len()).sum();
            assert!(bytes <= LIST_PAGE_BYTES, "a page of {bytes} bytes");
            pages.push(page.items.iter().map(|event| event.seq).collect::<Vec<_>>());
            match page.resume_after {
                Some(token) => after = Some(token.parse().unwrap()),
                None => break,
            }
        }
        after = None;
    }
    // Two large events to a page, and every event listed once, in order, by either path.
    let expected: Vec<Vec<u64>> = vec![vec![0, 1], vec![2, 3], vec![4, 5]];
    assert_eq!(pages, [expected.clone(), expected].concat());
    store.close().unwrap();
}

// Regression (review): every RetryDelivery queued one more manual attempt, so a loop queued
// as many real requests (and attempt records) as it made calls.
pub(crate) async fn a_delivery_has_one_manual_attempt_queued_at_a_time<P: Place>(place: P)
where
    P::Backend: Backend,
{
    let store = with_producers(place.open()).await;
    store.append_event(new_event("prd_a", None, 1)).await.unwrap();
    store.settled().await.unwrap();
    let event = store.event_at(0).unwrap().unwrap();
    let mut delivery = Delivery::pending(ids::delivery_id(0, "lst_m"), &event, "lst_m", 10);
    delivery.state = DeliveryState::Failed as i32;
    delivery.attempts = 1;
    let attempt = Attempt { number: 1, status_code: 500, ..Attempt::default() };
    let completion =
        Completion { delivery: delivery.clone(), attempt, entry: None, next: NextStep::Done, ordered: false };
    store.complete_attempts(vec![completion]).unwrap();

    let queued_at = |now| store.queue_manual_attempt(&delivery.id, now).unwrap().map(|(_, at)| at);
    assert_eq!(queued_at(20), Some(20));
    assert_eq!(queued_at(30), Some(20), "the one asked for first, not yet made, is the one");
    let manual: Vec<DueEntry> = store.due(None, 100, 10).unwrap().into_iter().filter(|entry| entry.manual).collect();
    assert_eq!(manual.len(), 1, "one request, whatever the calls");
    // Once it is made, another may be asked for.
    let attempt = Attempt { number: 2, status_code: 500, ..Attempt::default() };
    let entry = manual.into_iter().next();
    store
        .complete_attempts(vec![Completion {
            delivery: delivery.clone(),
            attempt,
            entry,
            next: NextStep::Done,
            ordered: false,
        }])
        .unwrap();
    assert_eq!(queued_at(40), Some(40));
    // Parked with its listener (backed off, say), it is still the one.
    store.park(&store.due(None, 100, 10).unwrap()).unwrap();
    assert_eq!(queued_at(50), Some(40));
    assert_eq!(store.queue_manual_attempt("dlv_none", 60).unwrap().map(|(_, at)| at), None);
    store.close().unwrap();
}

// Regression (review): ListAttempts answered every attempt of a delivery in one message.
pub(crate) async fn a_deliverys_attempts_are_read_a_page_at_a_time<P: Place>(place: P)
where
    P::Backend: Backend,
{
    let store = place.open();
    let event = Event { id: ids::event_id(3), seq: 3, ..Event::default() };
    let id = ids::delivery_id(3, "lst_p");
    let mut delivery = Delivery::pending(id.clone(), &event, "lst_p", 10);
    for number in 1..=4 {
        delivery.attempts = number;
        let attempt = Attempt { number, status_code: 500, ..Attempt::default() };
        let completion =
            Completion { delivery: delivery.clone(), attempt, entry: None, next: NextStep::Keep, ordered: false };
        store.complete_attempts(vec![completion]).unwrap();
        delivery = store.delivery(&id).unwrap().unwrap();
    }
    let page = |after, limit| -> Vec<u32> {
        store.attempts(&id, after, limit).unwrap().iter().map(|attempt| attempt.number).collect()
    };
    assert_eq!(page(0, 2), [1, 2], "the first, from the delivery's record, then the next");
    assert_eq!(page(2, 2), [3, 4]);
    assert!(page(4, 2).is_empty());
    assert_eq!(page(0, 100), [1, 2, 3, 4]);
    store.close().unwrap();
}

// Regression: RecoverListener gathered every failed id of a listener in one list.
pub(crate) async fn a_listeners_failed_deliveries_are_read_a_page_at_a_time<P: Place>(place: P)
where
    P::Backend: Backend,
{
    let store = place.open();
    let mut ended = Vec::new();
    let mut expected = Vec::new();
    for seq in 0..1_500u64 {
        let event = Event { id: ids::event_id(seq), seq, created_at_ms: 100 + seq, ..Event::default() };
        let mut delivery = Delivery::pending(ids::delivery_id(seq, "lst_r"), &event, "lst_r", 100 + seq);
        // Every fifth succeeded; the rest failed.
        delivery.state = if seq % 5 == 0 { DeliveryState::Succeeded } else { DeliveryState::Failed } as i32;
        if seq % 5 != 0 && seq >= 10 {
            expected.push(delivery.id.clone());
        }
        delivery.attempts = 1;
        let attempt = Attempt { number: 1, status_code: if seq % 5 == 0 { 200 } else { 500 }, ..Attempt::default() };
        ended.push(Completion { delivery, attempt, entry: None, next: NextStep::Done, ordered: false });
    }
    store.complete_attempts(ended).unwrap();
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
    store.close().unwrap();
}

pub(crate) async fn a_deleted_listeners_lot_is_cancelled_where_it_lies_in_bounded_steps<P: Place>(place: P)
where
    P::Backend: Backend,
{
    let store = place.open();
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
    ended.attempts = 1;
    let attempt = Attempt { number: 1, status_code: 200, ..Attempt::default() };
    store
        .complete_attempts(vec![Completion {
            delivery: ended.clone(),
            attempt,
            entry: None,
            next: NextStep::Done,
            ordered: true,
        }])
        .unwrap();
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
    let queued: Vec<(u64, bool)> =
        store.due(None, u64::MAX - 1, 100).unwrap().iter().map(|due| (due.due_ms, due.manual)).collect();
    assert_eq!(queued, [(10, false), (30, true)], "only gone[1]'s entries are left, both in the queue");
    // Another listener's lot is left alone.
    assert_eq!(store.parked_listeners().unwrap(), ["lst_kept"]);
    assert_eq!(state(&kept.delivery.id), DeliveryState::Pending);
    assert_eq!(store.pending_head("lst_kept").unwrap(), Some(kept.delivery.id.clone()));
    store.close().unwrap();
}

// Regression: a retention shorter than 24 hours took idempotency records with their events,
// so a retried trigger within the window recorded a second event.
pub(crate) async fn an_idempotency_key_outlives_an_event_trimmed_within_its_window<P: Place>(place: P)
where
    P::Backend: Backend,
{
    let store = with_producers(place.open()).await;
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
    let later = store.append_event(new_event("prd_a", Some("order-1"), 2_000 + IDEMPOTENCY_WINDOW_MS)).await.unwrap();
    assert!(!later.duplicate);
    store.close().unwrap();
}
