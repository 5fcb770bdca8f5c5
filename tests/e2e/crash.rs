//! Crash safety with the real binary: SIGKILL right after triggers are acknowledged (while
//! their events are still on their way from the journal into the database), in the middle of
//! delivery (to unordered listeners and to an ordered one), and while a 50-listener fan-out is
//! under way, and with retries parked behind a disabled listener. After a restart on the same
//! data directory every acknowledged event is there, every (event, listener) pair arrives at
//! least once, and an ordered listener's events first arrive in trigger order. The first three
//! run on PostgreSQL too (`HOOKD_STORE`), where a kill -9 of the node loses no more.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hookd_client::Client;
use hookd_client::v1::{
    CreateProducerRequest, GetEventRequest, RegisterListenerRequest, TriggerRequest, UpdateListenerRequest,
};

use crate::receiver::{Receiver, Reply};
use crate::support::{
    ADMIN_TOKEN, DEADLINE, HookdProcess, PgSchema, bounded, derive, listed_event_ids, listener_request, master_key,
    retries_due,
};

struct Crashable {
    dir: tempfile::TempDir,
    key: String,
    /// Where the state is kept instead of the data directory.
    postgres: Option<PgSchema>,
}

impl Crashable {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap(), key: master_key(), postgres: None }
    }

    /// On PostgreSQL (`None` when no test database is configured).
    fn on_postgres(test: &str) -> Option<Self> {
        Some(Self { postgres: Some(PgSchema::new(test)?), ..Self::new() })
    }

    async fn start(&self) -> HookdProcess {
        let store = self.postgres.as_ref().map(PgSchema::store_url);
        let mut env = vec![
            ("HOOKD_MASTER_KEY", self.key.as_str()),
            ("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN),
            ("HOOKD_RETRY_SCHEDULE", "100ms,100ms,100ms,100ms,100ms"),
        ];
        if let Some(store) = &store {
            env.push(("HOOKD_STORE", store));
        }
        HookdProcess::start(self.dir.path(), &env).await.unwrap()
    }
}

/// Runs a crash test on the embedded database, and again on PostgreSQL.
macro_rules! on_both_stores {
    ($embedded:ident, $postgres:ident, $body:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $embedded() {
            $body(Crashable::new()).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            if let Some(crashable) = Crashable::on_postgres(stringify!($postgres)) {
                $body(crashable).await
            }
        }
    };
}

async fn producer(hookd: &HookdProcess) -> (Client, String) {
    let admin = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(ADMIN_TOKEN).unwrap();
    let request = CreateProducerRequest { name: "crash".into() };
    let key = admin.admin().create_producer(request).await.unwrap().into_inner().api_key;
    (Client::connect(hookd.endpoint()).await.unwrap().with_api_key(&key).unwrap(), key)
}

/// Triggers `count` events concurrently; returns their ids.
async fn trigger_many(producer: &Client, count: usize) -> Vec<String> {
    let mut in_flight = tokio::task::JoinSet::new();
    for n in 0..count {
        let producer = producer.clone();
        in_flight.spawn(async move {
            let request = TriggerRequest {
                event_type: "crash.test".into(),
                payload: format!("{n}").into_bytes(),
                ..Default::default()
            };
            producer.trigger_service().trigger(request).await.unwrap().into_inner().event_id
        });
    }
    let mut ids = Vec::new();
    while let Some(id) = bounded("triggers", in_flight.join_next()).await {
        ids.push(id.unwrap());
    }
    ids
}

/// What the receiver answered: the (event, path) pairs it answered with 200, and a switch
/// to throw once hookd is killed.
struct Answers {
    answered: Arc<Mutex<HashSet<(String, String)>>>,
    /// Every (event, path) answered with 200, in the order of the answers.
    log: Arc<Mutex<Vec<(String, String)>>>,
    killed: Arc<AtomicBool>,
}

impl Answers {
    /// Makes `receiver` answer the first `before_kill` (event, path) pairs with 200 and hang on
    /// every later request until the kill is reported, then answer everything with 200. So
    /// the kill always finds the deliveries it should, however fast hookd delivers.
    fn script(receiver: &Receiver, before_kill: usize) -> Self {
        let answers = Self { answered: Arc::default(), log: Arc::default(), killed: Arc::default() };
        let (answered, log, killed) = (answers.answered.clone(), answers.log.clone(), answers.killed.clone());
        receiver.script("/", move |request, _| {
            let mut answered = answered.lock().unwrap();
            if answered.len() < before_kill || killed.load(Ordering::SeqCst) {
                let pair = (request.webhook_id().to_owned(), request.path.clone());
                answered.insert(pair.clone());
                log.lock().unwrap().push(pair);
                Reply::Status(200)
            } else {
                Reply::Hang
            }
        });
        answers
    }

    /// hookd is dead: answer from now on. Returns how many pairs were answered before.
    fn killed(&self) -> usize {
        self.killed.store(true, Ordering::SeqCst);
        self.answered.lock().unwrap().len()
    }

    /// Waits until every (event, path) pair was answered with 200 (a request that hung at the
    /// kill does not count: it must be made again).
    async fn wait_for_all(&self, receiver: &Receiver, events: &[String], paths: &[String]) {
        let expected: HashSet<(String, String)> =
            events.iter().flat_map(|e| paths.iter().map(move |p| (e.clone(), p.clone()))).collect();
        receiver
            .wait_until("every (event, listener) pair answered", DEADLINE * 2, |_| {
                expected.is_subset(&self.answered.lock().unwrap())
            })
            .await;
    }
}

on_both_stores!(
    kill_9_right_after_the_acks_keeps_every_acknowledged_event,
    on_postgres_kill_9_right_after_the_acks_keeps_every_acknowledged_event,
    right_after_the_acks
);

async fn right_after_the_acks(crashable: Crashable) {
    const EVENTS: usize = 2_000;
    let hookd = crashable.start().await;
    let (producer, key) = producer(&hookd).await;
    let events = trigger_many(&producer, EVENTS).await;
    // The database is flushed once a second: most of these are only in the journal now.
    hookd.kill9().await;

    let hookd = crashable.start().await;
    let producer = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(&key).unwrap();
    let mut missing = Vec::new();
    for event_id in &events {
        let answer = producer.delivery().get_event(GetEventRequest { event_id: event_id.clone() }).await;
        if answer.is_err() {
            missing.push(event_id.clone());
        }
    }
    assert!(missing.is_empty(), "{} of {EVENTS} acknowledged events lost, e.g. {:?}", missing.len(), missing.first());
    // The producer's own listing (its index was written in again from the journal too).
    let listed = listed_event_ids(&producer).await;
    assert_eq!(listed.len(), EVENTS, "each acknowledged event listed once");
    assert_eq!(listed.iter().collect::<HashSet<_>>(), events.iter().collect::<HashSet<_>>());
    let next = trigger_many(&producer, 1).await;
    assert!(!events.contains(&next[0]), "event ids are not reused after the restart");
}

on_both_stores!(
    kill_9_in_the_middle_of_delivery_loses_nothing,
    on_postgres_kill_9_in_the_middle_of_delivery_loses_nothing,
    in_the_middle_of_delivery
);

async fn in_the_middle_of_delivery(crashable: Crashable) {
    const EVENTS: usize = 300;
    const ANSWERED_BEFORE: usize = 50;
    let receiver = Receiver::start().await;
    let answers = Answers::script(&receiver, ANSWERED_BEFORE);
    let hookd = crashable.start().await;
    let (producer, _) = producer(&hookd).await;
    let hash = derive(&producer, "crash.test").await;
    let paths = vec!["/a".to_owned(), "/b".to_owned()];
    for path in &paths {
        producer.register().register_listener(listener_request(&hash, &receiver.url(path))).await.unwrap();
    }
    let events = trigger_many(&producer, EVENTS).await;
    receiver.wait_until("a delivery hanging", DEADLINE, |requests| requests.len() > ANSWERED_BEFORE).await;
    hookd.kill9().await;
    assert_eq!(answers.killed(), ANSWERED_BEFORE, "the kill came in the middle of delivery");

    let _hookd = crashable.start().await;
    answers.wait_for_all(&receiver, &events, &paths).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_50_listener_fan_out_loses_nothing() {
    const LISTENERS: usize = 50;
    const EVENTS: usize = 40;
    let receiver = Receiver::start().await;
    // Nothing is answered before the kill, so no delivery can be finished by then.
    let answers = Answers::script(&receiver, 0);
    let crashable = Crashable::new();
    let hookd = crashable.start().await;
    let (producer, _) = producer(&hookd).await;
    let hash = derive(&producer, "crash.test").await;
    let paths: Vec<String> = (0..LISTENERS).map(|n| format!("/l{n}")).collect();
    for path in &paths {
        producer.register().register_listener(listener_request(&hash, &receiver.url(path))).await.unwrap();
    }
    let events = trigger_many(&producer, EVENTS).await;
    // Right after the acks: fan-out of 2,000 deliveries has barely begun.
    hookd.kill9().await;
    assert_eq!(answers.killed(), 0);

    let _hookd = crashable.start().await;
    answers.wait_for_all(&receiver, &events, &paths).await;
}

on_both_stores!(
    kill_9_with_an_ordered_listener_resumes_in_order,
    on_postgres_kill_9_with_an_ordered_listener_resumes_in_order,
    with_an_ordered_listener
);

async fn with_an_ordered_listener(crashable: Crashable) {
    const EVENTS: usize = 40;
    const ANSWERED_BEFORE: usize = 10;
    let receiver = Receiver::start().await;
    let answers = Answers::script(&receiver, ANSWERED_BEFORE);
    let hookd = crashable.start().await;
    let (producer, _) = producer(&hookd).await;
    let hash = derive(&producer, "crash.test").await;
    let ordered = RegisterListenerRequest { ordered: true, ..listener_request(&hash, &receiver.url("/ordered")) };
    producer.register().register_listener(ordered).await.unwrap();
    let events = trigger_many(&producer, EVENTS).await;
    // The eleventh hangs, and the ordered listener's later deliveries wait behind it.
    receiver.wait_until("a delivery hanging", DEADLINE, |requests| requests.len() > ANSWERED_BEFORE).await;
    hookd.kill9().await;
    assert_eq!(answers.killed(), ANSWERED_BEFORE, "the kill came in the middle of delivery");

    let _hookd = crashable.start().await;
    answers.wait_for_all(&receiver, &events, &["/ordered".to_owned()]).await;
    // At least once, and in order across the restart: each event was first answered after
    // every event triggered before it (one answered just before the kill may come again).
    let mut seen = HashSet::new();
    let firsts: Vec<u64> = answers
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|(event, _)| seen.insert(event.clone()))
        .map(|(event, _)| hookd_server::ids::event_seq(event).expect("an event id"))
        .collect();
    assert_eq!(firsts.len(), EVENTS);
    assert!(firsts.is_sorted(), "first answers out of trigger order: {firsts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_retries_parked_while_their_listener_is_disabled_loses_none() {
    const EVENTS: usize = 20;
    let receiver = Receiver::start().await;
    receiver.script("/paused", |_, _| Reply::Status(500));
    let crashable = Crashable::new();
    // Retries a second apart: none is due before the listener is disabled, and none runs out.
    let env = [
        ("HOOKD_MASTER_KEY", crashable.key.as_str()),
        ("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN),
        ("HOOKD_RETRY_SCHEDULE", "1s,1s,1s,1s,1s,1s,1s,1s"),
    ];
    let hookd = HookdProcess::start(crashable.dir.path(), &env).await.unwrap();
    let (producer, key) = producer(&hookd).await;
    let hash = derive(&producer, "crash.test").await;
    let registered =
        producer.register().register_listener(listener_request(&hash, &receiver.url("/paused"))).await.unwrap();
    let listener_id = registered.into_inner().listener.unwrap().id;
    let events = trigger_many(&producer, EVENTS).await;
    receiver.wait_until("a first attempt of every event", DEADLINE, |requests| requests.len() >= EVENTS).await;
    let set_enabled = |client: Client, enabled: bool| {
        let listener_id = listener_id.clone();
        async move {
            let request = UpdateListenerRequest { listener_id, enabled: Some(enabled), ..Default::default() };
            client.register().update_listener(request).await.unwrap();
        }
    };
    set_enabled(producer.clone(), false).await;
    // Their retries fall due while the listener is disabled: they wait in its lot.
    retries_due(&producer, &listener_id, EVENTS).await;
    hookd.kill9().await;

    let answered: Arc<Mutex<HashSet<String>>> = Arc::default();
    let seen = answered.clone();
    receiver.script("/paused", move |request, _| {
        seen.lock().unwrap().insert(request.webhook_id().to_owned());
        Reply::Status(200)
    });
    let hookd = HookdProcess::start(crashable.dir.path(), &env).await.unwrap();
    let producer = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(&key).unwrap();
    set_enabled(producer, true).await;
    let expected: HashSet<String> = events.into_iter().collect();
    receiver
        .wait_until("every event delivered once the listener is enabled again", DEADLINE, |_| {
            expected.is_subset(&answered.lock().unwrap())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_an_attempt_in_flight_exits_cleanly_and_the_attempt_is_redone() {
    let receiver = Receiver::start().await;
    receiver.script("/slow", |_, nth| if nth == 1 { Reply::Hang } else { Reply::Status(200) });
    let crashable = Crashable::new();
    let env = [
        ("HOOKD_MASTER_KEY", crashable.key.as_str()),
        ("HOOKD_ADMIN_TOKEN", ADMIN_TOKEN),
        // Shutdown gives in-flight attempts up to the attempt timeout.
        ("HOOKD_ATTEMPT_TIMEOUT", "30s"),
    ];
    let hookd = HookdProcess::start(crashable.dir.path(), &env).await.unwrap();
    let (producer, _) = producer(&hookd).await;
    let hash = derive(&producer, "crash.test").await;
    producer.register().register_listener(listener_request(&hash, &receiver.url("/slow"))).await.unwrap();
    let events = trigger_many(&producer, 1).await;
    receiver.wait_until("the first attempt hanging", DEADLINE, |requests| requests.len() == 1).await;

    // The hanging attempt cannot finish: shutdown waits its deadline, then exits 0 with the
    // delivery still queued.
    assert!(hookd.terminate().await.success(), "SIGTERM is a clean exit");
    receiver.release();

    let _hookd = HookdProcess::start(crashable.dir.path(), &env).await.unwrap();
    receiver
        .wait_until("the attempt redone after the restart", DEADLINE, |requests| {
            requests.iter().any(|r| r.webhook_id() == events[0] && r.attempt() == 1 && r.path == "/slow")
                && requests.len() >= 2
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_first_attempts_in_flight_to_fast_and_hanging_listeners_loses_no_pair() {
    const EVENTS: usize = 400;
    let receiver = Receiver::start().await;
    // Before the kill, /fast answers at once and /hang never does; after it, both answer.
    let killed = Arc::new(AtomicBool::new(false));
    let answered: Arc<Mutex<HashSet<(String, String)>>> = Arc::default();
    let (script_killed, script_answered) = (killed.clone(), answered.clone());
    receiver.script("/", move |request, _| {
        if request.path == "/hang" && !script_killed.load(Ordering::SeqCst) {
            return Reply::Hang;
        }
        script_answered.lock().unwrap().insert((request.webhook_id().to_owned(), request.path.clone()));
        Reply::Status(200)
    });
    let crashable = Crashable::new();
    let hookd = crashable.start().await;
    let (producer, _) = producer(&hookd).await;
    let hash = derive(&producer, "crash.test").await;
    let paths = vec!["/fast".to_owned(), "/hang".to_owned()];
    for path in &paths {
        producer.register().register_listener(listener_request(&hash, &receiver.url(path))).await.unwrap();
    }
    let events = trigger_many(&producer, EVENTS).await;
    // Part way: many first attempts to /fast are recorded, /hang holds its request, and more
    // of both are waiting in memory, written nowhere.
    receiver
        .wait_until("half the fast listener's deliveries", DEADLINE, |requests| {
            requests.iter().filter(|r| r.path == "/fast").count() >= EVENTS / 2
        })
        .await;
    hookd.kill9().await;
    killed.store(true, Ordering::SeqCst);
    assert!(answered.lock().unwrap().len() < EVENTS * 2, "the kill came in the middle of delivery");

    let _hookd = crashable.start().await;
    let expected: HashSet<(String, String)> =
        events.iter().flat_map(|e| paths.iter().map(move |p| (e.clone(), p.clone()))).collect();
    receiver
        .wait_until("every (event, listener) pair answered", DEADLINE * 2, |_| {
            expected.is_subset(&answered.lock().unwrap())
        })
        .await;
}
