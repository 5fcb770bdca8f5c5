//! The typed client against the real server: the streaming publisher (10,000 events, a
//! restart mid-stream), a stream with a bad item, and watching deliveries.

use std::collections::HashSet;
use std::sync::Arc;

use hookd_client::v1::trigger_stream_ack::Result as AckResult;
use hookd_client::v1::{DeliveryState, TriggerRequest, TriggerStreamRequest};
use hookd_client::{Client, Error, Trigger};
use tokio_stream::StreamExt;

use crate::receiver::{Receiver, Reply};
use crate::support::{DEADLINE, TestServer, bounded, listed_event_ids, master_key};

/// Publishes many events at once and follows their acks as they come back.
struct InFlight {
    published: tokio::task::JoinSet<Result<hookd_client::Ack, Error>>,
    acked: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl InFlight {
    fn publish(publisher: &hookd_client::Publisher, event_type: &str, count: usize) -> Self {
        let (acked_tx, acked) = tokio::sync::mpsc::unbounded_channel();
        let mut published = tokio::task::JoinSet::new();
        for n in 0..count {
            let (publish, acked_tx) = (publisher.publish(Trigger::new(event_type, n.to_string())), acked_tx.clone());
            published.spawn(async move {
                let ack = publish.await;
                let _ = acked_tx.send(());
                ack
            });
        }
        Self { published, acked }
    }

    /// Waits until `count` more acks (or errors) came back.
    async fn acked(&mut self, count: usize) {
        for _ in 0..count {
            bounded("acks", self.acked.recv()).await;
        }
    }

    /// Every publish's event id; fails the test if any publish failed.
    async fn all_acked(mut self) -> HashSet<String> {
        let mut ids = HashSet::new();
        while let Some(ack) = bounded("every ack", self.published.join_next()).await {
            ids.insert(ack.unwrap().expect("every publish succeeds across the outage").event_id);
        }
        ids
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_through_one_publisher_are_each_acked_once() {
    const EVENTS: usize = 10_000;
    let server = TestServer::start().await;
    let (producer, _, _) = server.producer("streamer").await;
    let publisher = producer.publisher();
    let acks: Vec<_> =
        (0..EVENTS).map(|n| tokio::spawn(publisher.publish(Trigger::new("bulk.item", n.to_string())))).collect();
    let mut ids = HashSet::new();
    for ack in acks {
        let ack = bounded("an ack", ack).await.unwrap().expect("acked");
        assert!(!ack.duplicate);
        assert!(ids.insert(ack.event_id), "an event id was acked twice");
    }
    assert_eq!(ids.len(), EVENTS);
    assert_eq!(listed_event_ids(&producer).await.len(), EVENTS, "each event recorded once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_recovers_from_a_server_restart_mid_stream() {
    const EVENTS: usize = 3_000;
    let receiver = Receiver::start().await;
    let server = TestServer::start_with(Arc::new(tempfile::tempdir().unwrap()), &master_key(), |_| {}).await;
    let (producer, _, key) = server.producer("resilient").await;
    let listener = producer.listen("steady.flow", &receiver.url("/flow")).await.unwrap();
    assert!(listener.secret.is_some());
    let publisher = producer.publisher();

    let mut in_flight = InFlight::publish(&publisher, "steady.flow", EVENTS);
    // Restart while items are still in flight.
    in_flight.acked(EVENTS / 3).await;
    let server = server.restart().await;
    let ids = in_flight.all_acked().await;
    assert_eq!(ids.len(), EVENTS, "one event per publish, none lost, none recorded twice");
    let producer = server.anonymous().await.with_api_key(&key).unwrap();
    assert_eq!(listed_event_ids(&producer).await.len(), EVENTS);
    receiver
        .wait_until("every event delivered", DEADLINE, |requests| {
            requests.iter().map(|r| r.webhook_id()).collect::<HashSet<_>>().len() == EVENTS
        })
        .await;
}

#[tokio::test]
async fn a_bad_item_in_a_stream_gets_its_own_error_and_the_stream_goes_on() {
    let server = TestServer::start().await;
    let (producer, _, _) = server.producer("mixed").await;
    let item = |reference: u64, event_type: &str| TriggerStreamRequest {
        r#ref: reference,
        trigger: Some(TriggerRequest { event_type: event_type.into(), payload: b"{}".to_vec(), ..Default::default() }),
    };
    let requests = vec![
        item(1, "good.one"),
        item(2, "bad type"),
        TriggerStreamRequest { r#ref: 3, trigger: None },
        item(4, "good.two"),
    ];
    let mut acks = producer.trigger_service().trigger_stream(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let mut results = std::collections::BTreeMap::new();
    while let Some(ack) = bounded("stream acks", acks.next()).await {
        let ack = ack.unwrap();
        results.insert(ack.r#ref, ack.result.unwrap());
    }
    assert_eq!(results.len(), 4, "one ack per item, and the stream ends after the last");
    assert!(matches!(results[&1], AckResult::Ack(_)));
    assert!(matches!(&results[&2], AckResult::Error(error) if error.code == tonic::Code::InvalidArgument as i32));
    assert!(matches!(&results[&3], AckResult::Error(error) if error.code == tonic::Code::InvalidArgument as i32));
    assert!(matches!(results[&4], AckResult::Ack(_)));

    // Through the publisher, a refused item fails alone with a typed, non-retryable error.
    let publisher = producer.publisher();
    let refused = publisher.publish(Trigger::new("bad type", "{}")).await.unwrap_err();
    assert!(matches!(refused, Error::InvalidArgument(_)) && !refused.is_retryable(), "{refused:?}");
    publisher.publish(Trigger::new("fine.after", "{}")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_each_delivery_succeed() {
    let receiver = Receiver::start().await;
    receiver.script("/watched", |_, nth| Reply::Status(if nth == 1 { 500 } else { 200 }));
    let server = TestServer::start_with(Arc::new(tempfile::tempdir().unwrap()), &master_key(), |config| {
        config.pipeline.retry_schedule = "100ms".parse().unwrap();
    })
    .await;
    let (producer, _, _) = server.producer("watcher").await;
    let (other, _, _) = server.producer("someone.else").await;
    producer.listen("thing.done", &receiver.url("/watched")).await.unwrap();
    other.listen("thing.done", &receiver.url("/theirs")).await.unwrap();
    let mut updates = producer.watch_deliveries(None).await.unwrap();

    let mut events = HashSet::new();
    for n in 0..5 {
        events.insert(producer.trigger("thing.done", n.to_string()).await.unwrap().event_id);
    }
    other.trigger("thing.done", "not yours").await.unwrap();
    let mut succeeded = HashSet::new();
    let mut failed_first = 0;
    while succeeded.len() < events.len() {
        let update = bounded("a delivery update", updates.next()).await.unwrap().unwrap();
        assert!(events.contains(&update.event_id), "only the caller's own events");
        match DeliveryState::try_from(update.state).unwrap() {
            DeliveryState::Succeeded => {
                assert_eq!(update.status_code, 200);
                assert_eq!(update.attempt, 2);
                succeeded.insert(update.event_id);
            }
            DeliveryState::Pending => {
                assert_eq!((update.attempt, update.status_code), (1, 500));
                failed_first += 1;
            }
            other => panic!("unexpected state {other:?}"),
        }
    }
    assert_eq!(failed_first, 5, "each failed first attempt was reported too");

    // One event only.
    let single = producer.trigger("thing.done", "single").await.unwrap().event_id;
    let mut only = producer.watch_deliveries(Some(&single)).await.unwrap();
    let update = bounded("the single event's update", only.next()).await.unwrap().unwrap();
    assert_eq!(update.event_id, single);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_stops_reading_is_dropped_and_slows_nothing() {
    const EVENTS: usize = 6_000;
    let receiver = Receiver::start().await;
    let server = TestServer::start().await;
    let (producer, _, producer_key) = server.producer("firehose").await;
    producer.listen("flood", &receiver.url("/flood")).await.unwrap();
    // A watcher on its own connection with small HTTP/2 windows, so the transport cannot
    // absorb what it does not read.
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .unwrap()
        .initial_stream_window_size(Some(4096))
        .initial_connection_window_size(Some(4096))
        .connect()
        .await
        .unwrap();
    let mut stalled =
        Client::from_channel(channel).with_api_key(&producer_key).unwrap().watch_deliveries(None).await.unwrap();

    let publisher = producer.publisher();
    let acks: Vec<_> =
        (0..EVENTS).map(|n| tokio::spawn(publisher.publish(Trigger::new("flood", n.to_string())))).collect();
    for ack in acks {
        bounded("an ack", ack).await.unwrap().unwrap();
    }
    // Deliveries flow although nobody reads the watcher.
    receiver.wait_until("every event delivered", DEADLINE, |requests| requests.len() >= EVENTS).await;

    let mut ended_with = None;
    while let Some(update) = bounded("the stalled watcher's updates", stalled.next()).await {
        if let Err(error) = update {
            ended_with = Some(error);
            break;
        }
    }
    let error = ended_with.expect("the slow watcher was told it fell behind");
    assert!(matches!(error, Error::ResourceExhausted(_)), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_survives_a_kill_9_mid_stream() {
    const EVENTS: usize = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let key = master_key();
    // A fixed port, so the publisher's channel finds the restarted server where it was.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let listen_on = format!("127.0.0.1:{port}");
    let env = [
        ("HOOKD_MASTER_KEY", key.as_str()),
        ("HOOKD_ADMIN_TOKEN", crate::support::ADMIN_TOKEN),
        ("HOOKD_LISTEN", listen_on.as_str()),
    ];
    let hookd = crate::support::HookdProcess::start_listening(dir.path(), &env).await.unwrap();
    let admin = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(crate::support::ADMIN_TOKEN).unwrap();
    let (_, api_key) = admin.create_producer("crash-publisher").await.unwrap();
    let producer = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(&api_key).unwrap();
    let publisher = producer.publisher();

    let mut in_flight = InFlight::publish(&publisher, "crash.flow", EVENTS);
    in_flight.acked(EVENTS / 4).await;
    hookd.kill9().await;
    let hookd = crate::support::HookdProcess::start_listening(dir.path(), &env).await.unwrap();
    let ids = in_flight.all_acked().await;
    assert_eq!(ids.len(), EVENTS, "one event per publish: none lost, none recorded twice");
    let producer = Client::connect(hookd.endpoint()).await.unwrap().with_api_key(&api_key).unwrap();
    assert_eq!(listed_event_ids(&producer).await.len(), EVENTS);
    hookd.kill9().await;
}

// Regression (review): a watch was admitted once, when it opened, so a leaked key went on
// watching outcomes after its producer was disabled or the key revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_once_its_producer_is_disabled_or_its_key_revoked() {
    let receiver = Receiver::start().await;
    let server = TestServer::start().await;
    let admin = server.admin().await;
    let (producer, producer_id, _) = server.producer("leaky").await;
    producer.listen("thing.done", &receiver.url("/leaky")).await.unwrap();
    let mut watch = producer.watch_deliveries(None).await.unwrap();
    let event_id = producer.trigger("thing.done", "1").await.unwrap().event_id;
    bounded("the update before", watch.next()).await.unwrap().unwrap();

    admin.disable_producer(&producer_id, "its key leaked").await.unwrap();
    // An outcome made after the producer is disabled is not told to the old watch.
    admin.delivery().replay_event(hookd_client::v1::ReplayEventRequest { event_id }).await.unwrap();
    let ended = bounded("the watch's end", watch.next()).await.expect("the watch ends with a status");
    assert!(matches!(ended, Err(Error::PermissionDenied(_))), "{ended:?}");

    admin.enable_producer(&producer_id).await.unwrap();
    let mut watch = producer.watch_deliveries(None).await.unwrap();
    admin.rotate_producer_key(&producer_id, std::time::Duration::ZERO).await.unwrap();
    let ended = bounded("the watch's end", watch.next()).await.expect("the watch ends with a status");
    assert!(matches!(ended, Err(Error::Unauthenticated(_))), "{ended:?}");
}

// Regression (review): a watch of one event took any event_id, another producer's included,
// and streamed nothing for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_of_one_event_takes_only_an_event_of_the_caller() {
    let server = TestServer::start().await;
    let (producer, _, _) = server.producer("mine").await;
    let (other, _, _) = server.producer("theirs").await;
    let theirs = other.trigger("thing.done", "{}").await.unwrap().event_id;
    let refused = producer.watch_deliveries(Some("not an event id")).await.err().expect("refused");
    assert!(matches!(refused, Error::InvalidArgument(_)), "{refused:?}");
    let refused = producer.watch_deliveries(Some(&theirs)).await.err().expect("refused");
    assert!(matches!(refused, Error::NotFound(_)), "{refused:?}");
    let mine = producer.trigger("thing.done", "{}").await.unwrap().event_id;
    let _watch = producer.watch_deliveries(Some(&mine)).await.expect("its own event, just triggered");
}

// Regression: watchers were unlimited, and each looked at every producer's outcomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_may_open_only_so_many_watchers() {
    let server = TestServer::start_with(Arc::new(tempfile::tempdir().unwrap()), &master_key(), |config| {
        config.pipeline.max_watchers_per_producer = 2;
    })
    .await;
    let (producer, _, _) = server.producer("watchful").await;
    let (other, _, _) = server.producer("neighbour").await;
    let first = producer.watch_deliveries(None).await.unwrap();
    let _second = producer.watch_deliveries(None).await.unwrap();
    let third = producer.watch_deliveries(None).await.err().expect("a third watcher is refused");
    assert!(
        matches!(&third, Error::ResourceExhausted(message) if message.contains("--max-watchers-per-producer")),
        "{third:?}"
    );
    let _others = other.watch_deliveries(None).await.expect("the cap is per producer");
    drop(first);
    // The server lets go of a watcher once its stream is gone.
    crate::support::eventually("a dropped watcher's place freed", || {
        let producer = producer.clone();
        async move { producer.watch_deliveries(None).await.ok().map(drop) }
    })
    .await;
}

/// A TriggerService whose store cannot write: every streamed item is answered UNAVAILABLE on
/// a stream that stays open (a real hookd answers so while its journal cannot be written).
struct Unwritable;

#[tonic::async_trait]
impl hookd_client::v1::trigger_service_server::TriggerService for Unwritable {
    async fn trigger(
        &self,
        _: tonic::Request<TriggerRequest>,
    ) -> Result<tonic::Response<hookd_client::v1::TriggerAck>, tonic::Status> {
        Err(tonic::Status::unavailable("writes need the operator"))
    }

    type TriggerStreamStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<hookd_client::v1::TriggerStreamAck, tonic::Status>> + Send>,
    >;

    async fn trigger_stream(
        &self,
        request: tonic::Request<tonic::Streaming<TriggerStreamRequest>>,
    ) -> Result<tonic::Response<Self::TriggerStreamStream>, tonic::Status> {
        let mut incoming = request.into_inner();
        let (acks, outgoing) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(Ok(item)) = incoming.next().await {
                let error = hookd_client::v1::Error {
                    code: tonic::Code::Unavailable as i32,
                    message: "writes need the operator".into(),
                    retry_after_ms: 0,
                };
                let ack =
                    hookd_client::v1::TriggerStreamAck { r#ref: item.r#ref, result: Some(AckResult::Error(error)) };
                if acks.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(outgoing))))
    }

    type WatchDeliveriesStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<hookd_client::v1::DeliveryUpdate, tonic::Status>> + Send>,
    >;

    async fn watch_deliveries(
        &self,
        _: tonic::Request<hookd_client::v1::WatchDeliveriesRequest>,
    ) -> Result<tonic::Response<Self::WatchDeliveriesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
}

// Regression (review): any ack counted as progress, retryable error acks included, so an
// outage answered item by item (the store cannot write) reset the give-up clock on every
// reconnect and callers waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_gives_up_on_an_outage_answered_item_by_item() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = hookd_client::v1::trigger_service_server::TriggerServiceServer::new(Unwritable);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client = Client::connect(format!("http://{addr}")).await.unwrap();
    let options = hookd_client::PublisherOptions { give_up_after: std::time::Duration::from_secs(1) };
    let publisher = client.publisher_with(options);
    let answer = bounded("the publisher gives up", publisher.publish(Trigger::new("never.written", "{}"))).await;
    assert!(matches!(answer, Err(Error::Unavailable(_))), "{answer:?}");
}

// Review: an item over the producer's trigger rate failed for good in the publisher, even one
// resent after a reconnect that had been recorded before; now the ack says when to send it
// again, and the publisher does, so every publish succeeds once and is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_waits_out_the_producers_trigger_rate() {
    const EVENTS: usize = 300;
    let server = TestServer::start_with(Arc::new(tempfile::tempdir().unwrap()), &master_key(), |config| {
        config.producer_trigger_rate = 200;
    })
    .await;
    let (producer, _, _) = server.producer("limited").await;
    let publisher = producer.publisher();
    let ids = InFlight::publish(&publisher, "paced.item", EVENTS).all_acked().await;
    assert_eq!(ids.len(), EVENTS, "one event per publish");
    assert_eq!(listed_event_ids(&producer).await.len(), EVENTS, "each recorded once");
}
