//! The ordered scenario: how fast one strictly ordered listener gets its deliveries, alone
//! and beside steady load to ten other listeners. An ordered listener's next delivery waits
//! until the previous one is recorded, and its record shares the recorder's group with the
//! others' attempts, so this shows what that sharing costs it. Not one of the goals:
//! a measurement of a trade-off.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hookd_client::v1::RegisterListenerRequest;
use hookd_client::{Client, Trigger};
use serde_json::{Value, json};

use crate::receiver::Receiver;
use crate::stats::round;
use crate::{BoxError, Plan, fresh, listeners, micros_since_epoch, publish_all};

const LOAD_LISTENERS: usize = 10;
/// Load events published every tick of [`LOAD_TICK`]: 1,000 events, 10,000 deliveries a
/// second, about two thirds of what hookd delivers to ten listeners here, so it keeps up
/// while the recorder's groups are busy. (At 15,000 a second, about all it delivers, the
/// ordered listener got 140-1,030 deliveries a second, from run to run.)
const LOAD_PER_TICK: usize = 10;
const LOAD_TICK: Duration = Duration::from_millis(10);

pub async fn scenario(plan: &Plan, binary: &std::path::Path, receiver: &Receiver) -> Result<Value, BoxError> {
    let (hookd, _instance, producer) = fresh(binary, &[]).await?;
    let request = RegisterListenerRequest {
        event_hash: producer.event_hash("bench.ordered").await?,
        url: receiver.url("/ordered"),
        generate_secret: true,
        ordered: true,
        ..Default::default()
    };
    producer.register_listener(request).await?;
    listeners(&producer, "bench.load", &receiver.url("/load"), LOAD_LISTENERS).await?;

    receiver.reset(false);
    let alone = ordered_run(&producer, receiver, plan.ordered_events).await?;

    receiver.reset(false);
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(steady_load(producer.clone(), stop.clone()));
    // Let the load reach the receiver before the ordered events start.
    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.received_at("/load") < 1_000 {
        if Instant::now() >= deadline || load.is_finished() {
            return Err("the steady load did not reach the receiver within a minute".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let load_before = receiver.received_at("/load");
    let started = Instant::now();
    let beside = ordered_run(&producer, receiver, plan.ordered_events).await?;
    let load_per_s = (receiver.received_at("/load") - load_before) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    load.await?.map_err(|error| format!("load event refused: {error}"))?;
    hookd.kill().await;
    eprintln!(
        "ordered listener, {} events: {alone:.0}/s alone, {beside:.0}/s beside {load_per_s:.0} deliveries/s to {LOAD_LISTENERS} others",
        plan.ordered_events
    );
    Ok(json!({
        "events": plan.ordered_events,
        "alone_per_s": round(alone),
        "beside_load_per_s": round(beside),
        "load_deliveries_per_s": round(load_per_s),
        "load_listeners": LOAD_LISTENERS,
    }))
}

/// Publishes `events` ordered events; returns their deliveries per second, from the first
/// publish to the last receipt.
async fn ordered_run(producer: &Client, receiver: &Receiver, events: usize) -> Result<f64, BoxError> {
    let started = Instant::now();
    publish_all(producer, "bench.ordered", events).await?;
    let deadline = started + Duration::from_secs(600);
    while receiver.received_at("/ordered") < events as u64 {
        if Instant::now() >= deadline {
            return Err("the ordered listener's deliveries did not all arrive within 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// Publishes load events at a steady pace until `stop`.
async fn steady_load(producer: Client, stop: Arc<AtomicBool>) -> Result<(), hookd_client::Error> {
    let publisher = producer.publisher();
    let mut tick = tokio::time::interval(LOAD_TICK);
    let mut pending = tokio::task::JoinSet::new();
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        for _ in 0..LOAD_PER_TICK {
            pending.spawn(publisher.publish(Trigger::new("bench.load", micros_since_epoch().to_string())));
        }
        while let Some(ack) = pending.try_join_next() {
            ack.expect("a publish task never panics")?;
        }
    }
    while let Some(ack) = pending.join_next().await {
        ack.expect("a publish task never panics")?;
    }
    Ok(())
}
