//! Rate limits: a listener's `max_per_second` paces its requests without holding up other
//! listeners; `--producer-trigger-rate` answers a producer over it RESOURCE_EXHAUSTED with
//! when to retry, and leaves other producers alone.
//!
//! Timing is asserted only as a lower bound (a limit can only make things slower, whatever
//! the machine's speed) or as an order between a paced listener and an unpaced one.

use std::sync::Arc;
use std::time::Duration;

use hookd_client::v1::{
    GetListenerRequest, RegisterListenerRequest, TriggerStreamRequest, UpdateListenerRequest, trigger_stream_ack,
};
use tonic::Code;

use crate::receiver::Receiver;
use crate::support::{DEADLINE, TestServer, bounded, derive, listener_request, master_key, trigger_request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listeners_rate_limit_paces_it_and_no_other() {
    const EVENTS: usize = 15;
    const RATE: u32 = 5;
    let receiver = Receiver::start().await;
    let server = TestServer::start().await;
    let (producer, _, _) = server.producer("paced").await;
    let hash = derive(&producer, "tick").await;
    let paced = producer
        .register()
        .register_listener(RegisterListenerRequest {
            max_per_second: RATE,
            ..listener_request(&hash, &receiver.url("/paced"))
        })
        .await
        .unwrap()
        .into_inner()
        .listener
        .unwrap();
    assert_eq!(paced.max_per_second, RATE);
    producer.register().register_listener(listener_request(&hash, &receiver.url("/free"))).await.unwrap();
    let too_fast = producer
        .register()
        .register_listener(RegisterListenerRequest {
            max_per_second: 100_001,
            ..listener_request(&hash, &receiver.url("/x"))
        })
        .await
        .unwrap_err();
    assert_eq!(too_fast.code(), Code::InvalidArgument);

    for n in 0..EVENTS {
        producer.trigger_service().trigger(trigger_request("tick", format!("{n}").as_bytes())).await.unwrap();
    }
    receiver
        .wait_until("every event at both listeners", DEADLINE, |requests| {
            ["/paced", "/free"].iter().all(|path| requests.iter().filter(|r| r.path == *path).count() == EVENTS)
        })
        .await;
    let paced_at: Vec<_> = receiver.requests_to("/paced").iter().map(|r| r.at).collect();
    let free_at: Vec<_> = receiver.requests_to("/free").iter().map(|r| r.at).collect();
    // A second's burst of 5, then one every 200 ms: the last of 15 no sooner than 2 s after
    // the first (less a little for the bucket's millisecond rounding).
    let span = *paced_at.last().unwrap() - paced_at[0];
    assert!(span >= Duration::from_millis(1_900), "15 requests at 5 a second took only {span:?}");
    // The other listener did not wait for it: all its requests came before the paced one's
    // tenth, which its limit held back a second at least.
    assert!(free_at.iter().max().unwrap() < &paced_at[9], "the unpaced listener waited behind the paced one");

    // Lifted: what comes next goes as fast as it can (only that it all arrives is asserted).
    let request =
        UpdateListenerRequest { listener_id: paced.id.clone(), max_per_second: Some(0), ..Default::default() };
    producer.register().update_listener(request).await.unwrap();
    let listener = producer.register().get_listener(GetListenerRequest { listener_id: paced.id }).await.unwrap();
    assert_eq!(listener.into_inner().max_per_second, 0);
    for n in 0..EVENTS {
        producer.trigger_service().trigger(trigger_request("tick", format!("again {n}").as_bytes())).await.unwrap();
    }
    receiver
        .wait_until("the second round at the unpaced listener", DEADLINE, |requests| {
            requests.iter().filter(|r| r.path == "/paced").count() == 2 * EVENTS
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_over_its_trigger_rate_is_told_when_to_retry() {
    const RATE: u32 = 5;
    let server = TestServer::start_with(Arc::new(tempfile::tempdir().unwrap()), &master_key(), |config| {
        config.producer_trigger_rate = RATE;
    })
    .await;
    let (eager, _, _) = server.producer("eager").await;
    let (other, _, _) = server.producer("other").await;

    // A second's worth goes at once; the next is refused with a hint.
    for n in 0..RATE {
        eager.trigger_service().trigger(trigger_request("burst", format!("{n}").as_bytes())).await.unwrap();
    }
    let refused = eager.trigger_service().trigger(trigger_request("burst", b"one too many")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("retry in"), "{}", refused.message());
    let retry_after_ms: u64 = refused.metadata().get("retry-after-ms").unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=1000 / u64::from(RATE)).contains(&retry_after_ms), "{retry_after_ms}");
    // Another producer has a bucket of its own.
    other.trigger_service().trigger(trigger_request("burst", b"mine")).await.unwrap();

    // Waiting as told lets the next one in.
    tokio::time::sleep(Duration::from_millis(retry_after_ms)).await;
    eager.trigger_service().trigger(trigger_request("burst", b"after the wait")).await.unwrap();

    // On a stream, an item over the rate gets an error ack and the stream goes on.
    let items: Vec<TriggerStreamRequest> = (0..2 * RATE as u64)
        .map(|r#ref| TriggerStreamRequest { r#ref, trigger: Some(trigger_request("streamed", b"{}")) })
        .collect();
    let acks = bounded("the stream's acks", async {
        let mut stream = other.trigger_service().trigger_stream(tokio_stream::iter(items)).await.unwrap().into_inner();
        let mut acks = Vec::new();
        while let Some(ack) = stream.message().await.unwrap() {
            acks.push(ack);
        }
        acks
    })
    .await;
    assert_eq!(acks.len(), 2 * RATE as usize, "every item is answered");
    let limited = acks
        .iter()
        .filter(|ack| matches!(&ack.result, Some(trigger_stream_ack::Result::Error(error)) if error.code == Code::ResourceExhausted as i32))
        .count();
    assert!(limited >= 1, "a burst of twice the rate meets the limit");
    assert!(limited < 2 * RATE as usize, "and not every item");
}
