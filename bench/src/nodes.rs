//! The nodes scenario (`--store` only): one node against three on one PostgreSQL database.
//! Events are published through every node at once to ten listeners; the report gives the
//! deliveries per second and the trigger latency (unary calls one at a time, spread over the
//! nodes, while the deliveries flow). The goal: three nodes at least as fast as one. All
//! nodes share this machine's cores, so three nodes add no CPU: what this shows is that
//! spreading triggers over nodes costs nothing, not that it scales.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hookd_client::Client;
use serde_json::{Value, json};

use crate::hookd::{self, ADMIN_TOKEN, Hookd, Instance};
use crate::receiver::Receiver;
use crate::stats::{Samples, round};
use crate::{BoxError, Plan, listeners, micros_since_epoch, publish_all};

const LISTENERS: usize = 10;
/// Trigger calls timed in each run, at least, however soon the deliveries are done.
const MIN_CALLS: usize = 200;

pub async fn scenario(plan: &Plan, binary: &std::path::Path, receiver: &Receiver) -> Result<Value, BoxError> {
    if !hookd::on_postgres() {
        eprintln!("nodes: skipped (several nodes need --store postgres://…)");
        return Ok(Value::Null);
    }
    let one = run(plan, binary, receiver, 1).await?;
    let three = run(plan, binary, receiver, 3).await?;
    let ratio =
        three["deliveries_per_s"].as_f64().unwrap_or(f64::NAN) / one["deliveries_per_s"].as_f64().unwrap_or(f64::NAN);
    eprintln!("nodes: three nodes deliver {ratio:.2} times what one does");
    Ok(json!({ "one": one, "three": three, "deliveries_ratio_3_vs_1": round(ratio), "listeners": LISTENERS }))
}

async fn run(plan: &Plan, binary: &std::path::Path, receiver: &Receiver, count: usize) -> Result<Value, BoxError> {
    let instance = Instance::new(binary)?;
    let mut nodes: Vec<(Hookd, tempfile::TempDir)> = Vec::new();
    for _ in 0..count {
        let dir = tempfile::tempdir()?;
        nodes.push((instance.start_in(dir.path(), &[]).await?, dir));
    }
    let admin = Client::connect(nodes[0].0.endpoint.clone()).await?.with_api_key(ADMIN_TOKEN)?;
    let (_, key) = admin.create_producer("bench").await?;
    let mut producers = Vec::new();
    for (node, _) in &nodes {
        let producer = Client::connect(node.endpoint.clone()).await?.with_api_key(&key)?;
        // Each node learns of the producer by itself, within a quarter of a second.
        let deadline = Instant::now() + Duration::from_secs(10);
        while producer.event_hash("bench.nodes").await.is_err() {
            if Instant::now() > deadline {
                return Err("a node did not learn of the producer within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        producers.push(producer);
    }
    listeners(&producers[0], "bench.nodes", &receiver.url("/nodes"), LISTENERS).await?;
    receiver.reset(false);
    let events = plan.deliveries[1].0;
    let plan_calls = plan.latency_calls;
    let total = (events * LISTENERS) as u64;
    let cpu_before: Vec<f64> = nodes.iter().map(|(node, _)| node.cpu_seconds()).collect();
    let postgres_before = hookd::postgres_cpu_seconds();
    let started = Instant::now();
    let mut publishing = tokio::task::JoinSet::new();
    for (n, producer) in producers.iter().enumerate() {
        let (producer, share) = (producer.clone(), events / count + usize::from(n < events % count));
        publishing.spawn(async move { publish_all(&producer, "bench.nodes", share).await.map_err(|e| e.to_string()) });
    }
    // Trigger latency while the deliveries flow, spread over the nodes, one call at a time
    // until they have all arrived (the delivery rate is timed apart from it).
    let delivered = Arc::new(AtomicBool::new(false));
    let probe = {
        let (producers, delivered) = (producers.clone(), delivered.clone());
        tokio::spawn(async move {
            let mut samples = Samples::default();
            for call in 0..plan_calls {
                if delivered.load(Ordering::Acquire) && call >= MIN_CALLS {
                    break;
                }
                let begun = Instant::now();
                producers[call % producers.len()]
                    .trigger("bench.nodes.latency", micros_since_epoch().to_string())
                    .await?;
                samples.push(begun.elapsed());
            }
            Ok::<Samples, hookd_client::Error>(samples)
        })
    };
    while let Some(published) = publishing.join_next().await {
        published??;
    }
    let complete = receiver.wait_for(total, Duration::from_secs(600)).await;
    let seconds = started.elapsed().as_secs_f64();
    let per_s = receiver.received() as f64 / seconds;
    // CPU per delivery, of each node (the first is the one that delivers, as it started first)
    // and of the database, until the last delivery arrived.
    let per_delivery = |seconds: f64| seconds * 1e6 / total as f64;
    let cpu_us: Vec<f64> =
        nodes.iter().zip(&cpu_before).map(|((node, _), before)| per_delivery(node.cpu_seconds() - before)).collect();
    let postgres_us = per_delivery(hookd::postgres_cpu_seconds() - postgres_before);
    delivered.store(true, Ordering::Release);
    let samples = probe.await??;
    for (node, _) in nodes {
        node.kill().await;
    }
    let cpu_text: Vec<String> = cpu_us.iter().map(|us| format!("{us:.0}")).collect();
    eprintln!(
        "nodes, {count}: {per_s:.0} deliveries/s to {LISTENERS} listeners, trigger p50 {:.2} ms p99 {:.2} ms, \
         CPU per delivery: hookd {} µs, PostgreSQL {postgres_us:.0} µs{}",
        samples.p50(),
        samples.p99(),
        cpu_text.join(" + "),
        if complete { "" } else { " (INCOMPLETE within 10 min)" }
    );
    Ok(json!({
        "nodes": count,
        "deliveries_per_s": round(per_s),
        "trigger_p50_ms": round(samples.p50()),
        "trigger_p99_ms": round(samples.p99()),
        "complete": complete,
        "hookd_cpu_us_per_delivery": cpu_us.iter().map(|us| round(*us)).collect::<Vec<_>>(),
        "postgres_cpu_us_per_delivery": round(postgres_us),
    }))
}
