//! The isolation scenario (promise 7): the lag of ten healthy listeners under a steady load,
//! alone and beside fifty listeners that accept the connection and never answer, with
//! hookd's default settings. The goal is a p99 lag within 1.5 times of the run without them.

use std::time::{Duration, Instant};

use hookd_client::{Client, Trigger};
use serde_json::{Value, json};

use crate::receiver::Receiver;
use crate::stats::round;
use crate::{BoxError, Plan, fresh, listeners, micros_since_epoch};

const HEALTHY: usize = 10;
const HANGING: usize = 50;
/// Events published per tick of [`TICK`]: 200 events, 2,000 healthy deliveries a second
/// (and 10,000 pairs a second for the hanging listeners, which go to their lots).
const PER_TICK: usize = 2;
const TICK: Duration = Duration::from_millis(10);

pub async fn scenario(plan: &Plan, binary: &std::path::Path, receiver: &Receiver) -> Result<Value, BoxError> {
    let alone = run(plan, binary, receiver, 0).await?;
    let beside = run(plan, binary, receiver, HANGING).await?;
    let ratio = beside["lag_p99_ms"].as_f64().unwrap_or(f64::NAN) / alone["lag_p99_ms"].as_f64().unwrap_or(f64::NAN);
    eprintln!("isolation: healthy listeners' lag p99 ratio beside {HANGING} hanging ones {ratio:.2}");
    Ok(json!({
        "alone": alone,
        "beside_hanging": beside,
        "lag_p99_ratio": round(ratio),
        "healthy_listeners": HEALTHY,
        "hanging_listeners": HANGING,
    }))
}

async fn run(plan: &Plan, binary: &std::path::Path, receiver: &Receiver, hanging: usize) -> Result<Value, BoxError> {
    let (hookd, _instance, producer) = fresh(binary, &[]).await?;
    listeners(&producer, "bench.isolation", &receiver.url("/isolation"), HEALTHY).await?;
    if hanging > 0 {
        listeners(&producer, "bench.isolation", &receiver.url("/hang"), hanging).await?;
    }
    receiver.reset(false);
    let published = steady(&producer, plan.isolation_for).await?;
    let expected = (published * HEALTHY) as u64;
    let complete = receiver.wait_for(expected, Duration::from_secs(120)).await;
    let lags = receiver.lags();
    hookd.kill().await;
    eprintln!(
        "isolation, {HEALTHY} healthy listeners beside {hanging} hanging: lag p50 {:.1} ms, p99 {:.1} ms{}",
        lags.p50(),
        lags.p99(),
        if complete { "" } else { " (INCOMPLETE within 2 min)" }
    );
    Ok(json!({
        "lag_p50_ms": round(lags.p50()),
        "lag_p99_ms": round(lags.p99()),
        "events": published,
        "complete": complete,
    }))
}

/// Publishes [`PER_TICK`] events every [`TICK`] for `duration`; returns how many.
async fn steady(producer: &Client, duration: Duration) -> Result<usize, BoxError> {
    let publisher = producer.publisher();
    let started = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    let mut pending = tokio::task::JoinSet::new();
    let mut published = 0;
    while started.elapsed() < duration {
        tick.tick().await;
        for _ in 0..PER_TICK {
            pending.spawn(publisher.publish(Trigger::new("bench.isolation", micros_since_epoch().to_string())));
            published += 1;
        }
    }
    while let Some(ack) = pending.join_next().await {
        ack??;
    }
    Ok(published)
}
