//! hookd-bench: measures the real `hookd` binary (release build, temporary data directories)
//! through `hookd-client`, each scenario beside its raw bound taken in the same run, and
//! reports. It asserts nothing: the goals are read off the report.
//!
//! `cargo run --release -p hookd-bench -- [--quick] [--json FILE] [--rounds N] [--store postgres://…] [--only SCENARIO]`
//!
//! With `--store`, every hookd runs on that PostgreSQL database, each in a schema of its own
//! (dropped after); the `store` floor, which measures the embedded store in-process, is left out.
//!
//! SCENARIO is one of [`SCENARIOS`]. With `--rounds N` every scenario runs N times and each
//! figure reported is the median of its N values (the rounds themselves are in the JSON).

mod hookd;
mod isolation;
mod nodes;
mod ordered;
mod raw;
mod receiver;
mod stats;
mod store;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hookd_client::{Client, Trigger};
use serde_json::{Value, json};

use crate::hookd::{ADMIN_TOKEN, Hookd, Instance};
use crate::receiver::Receiver;
use crate::stats::{Samples, round};

type BoxError = Box<dyn std::error::Error>;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Microseconds since the bench started: the timestamp carried in delivery payloads.
pub fn micros_since_epoch() -> u64 {
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Lowers the calling thread's CPU priority (Linux niceness is per thread). Best effort.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers; failure leaves the priority as is.
    unsafe {
        let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, thread, 10);
    }
}

/// How much work each scenario does.
struct Plan {
    name: &'static str,
    latency_calls: usize,
    throughput_for: Duration,
    stream_events: usize,
    deliveries: [(usize, usize); 2],
    backlog_pending: usize,
    /// Deliveries through the store alone (the store floor).
    store_deliveries: usize,
    /// Events to the ordered listener, alone and beside load.
    ordered_events: usize,
    /// How long the isolation scenario publishes its steady load, each time.
    isolation_for: Duration,
}

const QUICK: Plan = Plan {
    name: "quick",
    latency_calls: 500,
    throughput_for: Duration::from_secs(2),
    stream_events: 50_000,
    deliveries: [(20_000, 1), (2_000, 10)],
    backlog_pending: 200_000,
    store_deliveries: 20_000,
    ordered_events: 500,
    isolation_for: Duration::from_secs(5),
};

const FULL: Plan = Plan {
    name: "full",
    latency_calls: 3_000,
    throughput_for: Duration::from_secs(5),
    stream_events: 300_000,
    deliveries: [(100_000, 1), (10_000, 10)],
    backlog_pending: 1_000_000,
    store_deliveries: 100_000,
    ordered_events: 2_000,
    isolation_for: Duration::from_secs(15),
};

const SCENARIOS: [&str; 8] = ["trigger", "stream", "delivery", "backlog", "store", "ordered", "isolation", "nodes"];
const USAGE: &str = "usage: hookd-bench [--quick] [--json FILE] [--rounds N] [--store postgres://…] [--only \
                     trigger|stream|delivery|backlog|store|ordered|isolation|nodes]";
const LISTENER_COUNTS: [usize; 4] = [0, 1, 100, 1000];
const CONCURRENCY: usize = 64;

fn main() -> Result<(), BoxError> {
    // The receiver process of the idle-receiver mode (see `receiver::serve_idle`).
    if std::env::args().nth(1).as_deref() == Some("--serve-receiver") {
        return receiver::serve_idle();
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(bench())
}

async fn bench() -> Result<(), BoxError> {
    EPOCH.get_or_init(Instant::now);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let plan = if args.iter().any(|a| a == "--quick") { &QUICK } else { &FULL };
    if let Some(unknown) = args
        .iter()
        .find(|a| a.starts_with("--") && !["--quick", "--json", "--only", "--rounds", "--store"].contains(&a.as_str()))
    {
        return Err(format!("unknown option {unknown}; {USAGE}").into());
    }
    let json_path = option_value(&args, "--json")?;
    // `--store postgres://…`: every hookd runs on that database, each in a schema of its own.
    if let Some(address) = option_value(&args, "--store")? {
        hookd::use_store(address);
    }
    // `--only NAME` runs one scenario (for profiling); the report then holds only that one.
    let only = option_value(&args, "--only")?;
    if let Some(only) = &only
        && !SCENARIOS.contains(&only.as_str())
    {
        return Err(format!("unknown scenario {only}; {USAGE}").into());
    }
    let rounds = match option_value(&args, "--rounds")? {
        Some(n) => n.parse::<usize>().ok().filter(|&n| n >= 1).ok_or_else(|| format!("--rounds {n}: {USAGE}"))?,
        None => 1,
    };
    let _ = rustls::crypto::ring::default_provider().install_default();

    let binary = hookd::build()?;
    let receiver = Receiver::start().await?;
    let trivial = raw::trivial_server().await?;
    let started = Instant::now();
    eprintln!("hookd-bench ({} run) against {}", plan.name, binary.display());

    let wanted = |name: &str| only.as_deref().is_none_or(|only| only == name);
    let mut results = Vec::with_capacity(rounds);
    for number in 1..=rounds {
        if rounds > 1 {
            eprintln!("round {number} of {rounds}");
        }
        let trigger =
            if wanted("trigger") { trigger_scenario(plan, &binary, &receiver, trivial).await? } else { Value::Null };
        let stream = if wanted("stream") { stream_scenario(plan, &binary, trivial).await? } else { Value::Null };
        let delivery =
            if wanted("delivery") { delivery_scenario(plan, &binary, &receiver).await? } else { Value::Null };
        let backlog = if wanted("backlog") { backlog_scenario(plan, &binary, &receiver).await? } else { Value::Null };
        // The store floor is the embedded store's, measured in this process.
        let store = if wanted("store") && !hookd::on_postgres() {
            store::floor(plan.store_deliveries).await?
        } else {
            Value::Null
        };
        let ordered = if wanted("ordered") { ordered::scenario(plan, &binary, &receiver).await? } else { Value::Null };
        let isolation =
            if wanted("isolation") { isolation::scenario(plan, &binary, &receiver).await? } else { Value::Null };
        let nodes = if wanted("nodes") { nodes::scenario(plan, &binary, &receiver).await? } else { Value::Null };
        results.push(json!({
            "nodes": nodes,
            "trigger": trigger,
            "stream": stream,
            "delivery": delivery,
            "backlog": backlog,
            "store": store,
            "ordered": ordered,
            "isolation": isolation,
        }));
    }
    let mut report = stats::median_of(&results);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    report["machine"] = json!({ "cores": cores, "hookd_version": env!("CARGO_PKG_VERSION") });
    // Not under "store": that is the store floor's result (its name since before PostgreSQL).
    report["backend"] = json!(if hookd::on_postgres() { "postgres" } else { "embedded" });
    report["run"] = json!({ "plan": plan.name, "rounds": rounds, "seconds": round(started.elapsed().as_secs_f64()) });
    if rounds > 1 {
        report["rounds"] = Value::Array(results);
    }
    if only.is_none() {
        print_table(&report);
    }
    if let Some(path) = json_path {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

/// The word after `name` on the command line, if `name` is there.
fn option_value(args: &[String], name: &str) -> Result<Option<String>, BoxError> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(Some(args.get(i + 1).cloned().ok_or_else(|| format!("{name} needs a value; {USAGE}"))?)),
        None => Ok(None),
    }
}

/// A fresh hookd with a producer; returns the process, the instance and a producer client.
async fn fresh(binary: &std::path::Path, env: &[(&str, &str)]) -> Result<(Hookd, Instance, Client), BoxError> {
    let instance = Instance::new(binary)?;
    let hookd = instance.start(env).await?;
    let admin = Client::connect(hookd.endpoint.clone()).await?.with_api_key(ADMIN_TOKEN)?;
    let (_, key) = admin.create_producer("bench").await?;
    let producer = Client::connect(hookd.endpoint.clone()).await?.with_api_key(&key)?;
    Ok((hookd, instance, producer))
}

/// Registers `count` signed listeners of `event_type` at `url`.
async fn listeners(producer: &Client, event_type: &str, url: &str, count: usize) -> Result<(), BoxError> {
    let hash = producer.event_hash(event_type).await?;
    let mut registering = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (producer, hash, url) = (producer.clone(), hash.clone(), url.to_owned());
        registering.spawn(async move {
            for _ in (worker..count).step_by(16) {
                let request = hookd_client::v1::RegisterListenerRequest {
                    event_hash: hash.clone(),
                    url: url.clone(),
                    generate_secret: true,
                    ..Default::default()
                };
                producer.register_listener(request).await?;
            }
            Ok::<_, hookd_client::Error>(())
        });
    }
    while let Some(done) = registering.join_next().await {
        done??;
    }
    Ok(())
}

async fn trigger_scenario(
    plan: &Plan,
    binary: &std::path::Path,
    receiver: &Receiver,
    trivial: std::net::SocketAddr,
) -> Result<Value, BoxError> {
    let raw_latency = raw::unary_latency(trivial, plan.latency_calls).await?;
    let raw_per_s = raw::unary_throughput(trivial, CONCURRENCY, plan.throughput_for).await?;
    let mut by_listeners = BTreeMap::new();
    let mut unary_per_s = BTreeMap::new();
    let mut beside_registration = Value::Null;
    for count in LISTENER_COUNTS {
        let (hookd, _instance, producer) = fresh(binary, &[]).await?;
        listeners(&producer, "bench.trigger", &receiver.url("/trigger"), count).await?;
        receiver.reset(false);
        let samples = trigger_latency(&producer, plan.latency_calls).await?;
        let per_s = trigger_throughput(&producer, plan.throughput_for).await?;
        eprintln!(
            "trigger, {count} listeners: p50 {:.3} ms, p99 {:.3} ms, {per_s:.0}/s at {CONCURRENCY}",
            samples.p50(),
            samples.p99()
        );
        if count == 0 {
            beside_registration = trigger_beside_registration(&hookd, &producer, plan, samples.p99()).await?;
        }
        by_listeners
            .insert(count.to_string(), json!({ "p50_ms": round(samples.p50()), "p99_ms": round(samples.p99()) }));
        unary_per_s.insert(count.to_string(), round(per_s));
        hookd.kill().await;
    }
    // The same latencies with the listeners on a receiver that takes no CPU from hookd.
    let idle = receiver::IdleReceiver::start().await?;
    let mut idle_by_listeners = BTreeMap::new();
    for count in [0, 1000] {
        let (hookd, _instance, producer) = fresh(binary, &[]).await?;
        listeners(&producer, "bench.trigger", &idle.url("/trigger"), count).await?;
        let samples = trigger_latency(&producer, plan.latency_calls).await?;
        eprintln!(
            "trigger, {count} listeners on an idle-priority receiver: p50 {:.3} ms, p99 {:.3} ms",
            samples.p50(),
            samples.p99()
        );
        idle_by_listeners
            .insert(count.to_string(), json!({ "p50_ms": round(samples.p50()), "p99_ms": round(samples.p99()) }));
        hookd.kill().await;
    }
    drop(idle);
    let ratio = |table: &BTreeMap<String, Value>| {
        let p99 = |count: &str| table[count]["p99_ms"].as_f64().unwrap_or(0.0);
        round(p99("1000") / p99("0").max(f64::MIN_POSITIVE))
    };
    Ok(json!({
        "p50_ms": by_listeners["0"]["p50_ms"],
        "p99_ms": by_listeners["0"]["p99_ms"],
        "p99_ratio_1000_vs_0": ratio(&by_listeners),
        "by_listeners": by_listeners,
        "idle_receiver": {
            "p99_ratio_1000_vs_0": ratio(&idle_by_listeners),
            "by_listeners": idle_by_listeners,
        },
        "beside_registration": beside_registration,
        "unary_per_s": unary_per_s["0"],
        "unary_per_s_by_listeners": unary_per_s,
        "raw_grpc_unary_per_s": round(raw_per_s),
        "raw_grpc_unary_p50_ms": round(raw_latency.p50()),
        "raw_grpc_unary_p99_ms": round(raw_latency.p99()),
        "concurrency": CONCURRENCY,
    }))
}

/// One caller's trigger latencies, `calls` of them one after the other.
async fn trigger_latency(producer: &Client, calls: usize) -> Result<Samples, BoxError> {
    let mut samples = Samples::default();
    for _ in 0..calls {
        let started = Instant::now();
        producer.trigger("bench.trigger", micros_since_epoch().to_string()).await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// Trigger latency while another producer derives the hashes of new event types in a loop
/// (each one a write of its own, flushed), against `alone_p99_ms` measured just before.
async fn trigger_beside_registration(
    hookd: &Hookd,
    producer: &Client,
    plan: &Plan,
    alone_p99_ms: f64,
) -> Result<Value, BoxError> {
    let admin = Client::connect(hookd.endpoint.clone()).await?.with_api_key(ADMIN_TOKEN)?;
    let (_, key) = admin.create_producer("bench-registrar").await?;
    let registrar = Client::connect(hookd.endpoint.clone()).await?.with_api_key(&key)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut derived = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                registrar.event_hash(&format!("bench.new.{derived}")).await?;
                derived += 1;
            }
            Ok::<_, hookd_client::Error>(derived)
        })
    };
    let started = Instant::now();
    let samples = trigger_latency(producer, plan.latency_calls).await?;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let derived = looping.await??;
    let per_s = derived as f64 / started.elapsed().as_secs_f64();
    let ratio = samples.p99() / alone_p99_ms.max(f64::MIN_POSITIVE);
    eprintln!(
        "trigger beside {per_s:.0} new event hashes/s: p50 {:.3} ms, p99 {:.3} ms ({ratio:.2} x alone)",
        samples.p50(),
        samples.p99()
    );
    Ok(json!({
        "p50_ms": round(samples.p50()),
        "p99_ms": round(samples.p99()),
        "p99_ratio": round(ratio),
        "derived_per_s": round(per_s),
    }))
}

/// Unary triggers per second with [`CONCURRENCY`] callers.
async fn trigger_throughput(producer: &Client, duration: Duration) -> Result<f64, BoxError> {
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let producer = producer.clone();
        callers.spawn(async move {
            let mut done = 0u64;
            while started.elapsed() < duration {
                producer.trigger("bench.trigger", micros_since_epoch().to_string()).await?;
                done += 1;
            }
            Ok::<_, hookd_client::Error>(done)
        });
    }
    let mut total = 0;
    while let Some(done) = callers.join_next().await {
        total += done??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Publishes `count` events through one publisher; returns the seconds until the last ack.
async fn publish_all(producer: &Client, event_type: &str, count: usize) -> Result<f64, BoxError> {
    let publisher = producer.publisher();
    let started = Instant::now();
    let mut pending = tokio::task::JoinSet::new();
    for _ in 0..count {
        pending.spawn(publisher.publish(Trigger::new(event_type, micros_since_epoch().to_string())));
    }
    while let Some(ack) = pending.join_next().await {
        ack??;
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn stream_scenario(
    plan: &Plan,
    binary: &std::path::Path,
    trivial: std::net::SocketAddr,
) -> Result<Value, BoxError> {
    let (hookd, _instance, producer) = fresh(binary, &[]).await?;
    let seconds = publish_all(&producer, "bench.stream", plan.stream_events).await?;
    hookd.kill().await;
    let events_per_s = plan.stream_events as f64 / seconds;
    let raw = raw::bidi_echo(trivial, plan.stream_events, 4096).await?;
    eprintln!("stream: {events_per_s:.0} events/s durable (raw bidi echo {raw:.0}/s)");
    Ok(json!({ "events_per_s": round(events_per_s), "raw_grpc_bidi_per_s": round(raw), "events": plan.stream_events }))
}

async fn delivery_scenario(plan: &Plan, binary: &std::path::Path, receiver: &Receiver) -> Result<Value, BoxError> {
    let mut cases = Vec::new();
    for (events, listener_count) in plan.deliveries {
        let (hookd, _instance, producer) = fresh(binary, &[]).await?;
        listeners(&producer, "bench.delivery", &receiver.url("/delivery"), listener_count).await?;
        receiver.reset(false);
        let total = (events * listener_count) as u64;
        let (cpu_before, postgres_before) = (hookd.cpu_seconds(), hookd::postgres_cpu_seconds());
        let started = Instant::now();
        publish_all(&producer, "bench.delivery", events).await?;
        let complete = receiver.wait_for(total, Duration::from_secs(600)).await;
        let seconds = started.elapsed().as_secs_f64();
        let cpu_us = (hookd.cpu_seconds() - cpu_before) * 1e6 / total as f64;
        let postgres_us = (hookd::postgres_cpu_seconds() - postgres_before) * 1e6 / total as f64;
        hookd.kill().await;
        let per_s = receiver.received() as f64 / seconds;
        let lags = receiver.lags();
        // The raw bound: the same bodies, the same receiver, hookd's own concurrency.
        let concurrency = CONCURRENCY.min(8 * listener_count);
        receiver.reset(false);
        let raw = raw::http_posts(&receiver.url("/raw"), total as usize, concurrency).await?;
        eprintln!(
            "delivery, {events} x {listener_count}: {per_s:.0}/s (raw {raw:.0}/s), lag p50 {:.1} ms p99 {:.1} ms, hookd CPU {cpu_us:.0} µs per delivery{}{}",
            lags.p50(),
            lags.p99(),
            if hookd::on_postgres() { format!(" (PostgreSQL {postgres_us:.0} µs)") } else { String::new() },
            if complete { "" } else { " (INCOMPLETE within 10 min)" }
        );
        cases.push(json!({
            "events": events,
            "listeners": listener_count,
            "deliveries_per_s": round(per_s),
            "raw_per_s": round(raw),
            "ratio": round(per_s / raw),
            "lag_p50_ms": round(lags.p50()),
            "lag_p99_ms": round(lags.p99()),
            "complete": complete,
            "raw_concurrency": concurrency,
            "hookd_cpu_us_per_delivery": round(cpu_us),
            "postgres_cpu_us_per_delivery": round(postgres_us),
        }));
    }
    let first = cases[0].clone();
    Ok(json!({
        "deliveries_per_s": first["deliveries_per_s"],
        "raw_per_s": first["raw_per_s"],
        "ratio": first["ratio"],
        "lag_p50_ms": first["lag_p50_ms"],
        "lag_p99_ms": first["lag_p99_ms"],
        "cases": cases,
    }))
}

async fn backlog_scenario(plan: &Plan, binary: &std::path::Path, receiver: &Receiver) -> Result<Value, BoxError> {
    const LISTENERS: usize = 10;
    let events = plan.backlog_pending / LISTENERS;
    let (hookd, instance, producer) = fresh(binary, &[]).await?;
    listeners(&producer, "bench.backlog", &receiver.url("/backlog"), LISTENERS).await?;
    receiver.reset(true);
    let started = Instant::now();
    let publisher = producer.publisher();
    let mut pending = tokio::task::JoinSet::new();
    for _ in 0..events {
        pending.spawn(publisher.publish(Trigger::new("bench.backlog", "{}")));
    }
    while let Some(ack) = pending.join_next().await {
        ack??;
    }
    // Built once fan-out has handed out every acknowledged event. The gauge is refreshed every
    // 250 ms, so a reading counts only from a refresh after the last acknowledgement.
    let acked = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if acked.elapsed() > Duration::from_millis(300) && hookd.metric("hookd_fanout_lag_events").await? == 0.0 {
            break;
        }
    }
    let built_in = started.elapsed().as_secs_f64();
    // Let the refused first attempts settle into their back-off before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_mb = hookd.rss_mb();
    let data_dir_mb = instance.data_dir_mb();
    hookd.kill().await;

    receiver.reset(false);
    let restarted = micros_since_epoch();
    let hookd = instance.start(&[]).await?;
    let first = receiver.wait_for(1, Duration::from_secs(120)).await;
    let restart_ms = if first { (receiver.first_at_us().saturating_sub(restarted)) as f64 / 1000.0 } else { f64::NAN };
    hookd.kill().await;
    eprintln!(
        "backlog: {} pending deliveries built in {built_in:.1} s; RSS {rss_mb:.0} MB, data {data_dir_mb:.0} MB; first delivery {restart_ms:.0} ms after restart",
        events * LISTENERS
    );
    Ok(json!({
        "pending": events * LISTENERS,
        "rss_mb": round(rss_mb),
        "data_dir_mb": round(data_dir_mb),
        "restart_to_first_delivery_ms": round(restart_ms),
        "build_seconds": round(built_in),
    }))
}

fn print_table(report: &Value) {
    let t = &report["trigger"];
    println!();
    println!("| scenario | hookd | raw bound | goal |");
    println!("| --- | --- | --- | --- |");
    for count in LISTENER_COUNTS {
        let case = &t["by_listeners"][count.to_string()];
        println!(
            "| trigger p50 / p99, {count} listeners (1 caller) | {} / {} ms | {} / {} ms | |",
            case["p50_ms"], case["p99_ms"], t["raw_grpc_unary_p50_ms"], t["raw_grpc_unary_p99_ms"]
        );
    }
    println!(
        "| trigger p99 ratio, 1000 vs 0 listeners, receiver sharing the cores | {} | | |",
        t["p99_ratio_1000_vs_0"]
    );
    println!(
        "| trigger p99 ratio, 1000 vs 0 listeners, receiver at idle priority | {} | | ≤ 1.2 |",
        t["idle_receiver"]["p99_ratio_1000_vs_0"]
    );
    println!(
        "| trigger p99 beside new event hashes in a loop ({}/s), vs alone | {} ms ({} x) | | ≤ 1.2 x |",
        t["beside_registration"]["derived_per_s"],
        t["beside_registration"]["p99_ms"],
        t["beside_registration"]["p99_ratio"]
    );
    for count in LISTENER_COUNTS {
        println!(
            "| unary triggers/s, {count} listeners ({CONCURRENCY} callers) | {} | {} | |",
            t["unary_per_s_by_listeners"][count.to_string()],
            t["raw_grpc_unary_per_s"]
        );
    }
    let s = &report["stream"];
    println!(
        "| durable events/s, one publisher stream | {} | {} | ≥ 50,000 |",
        s["events_per_s"], s["raw_grpc_bidi_per_s"]
    );
    for case in report["delivery"]["cases"].as_array().into_iter().flatten() {
        println!(
            "| deliveries/s, {} events x {} listeners (lag p50 / p99 {} / {} ms) | {} | {} (ratio {}) | ≥ 10,000/s, ratio ≥ 0.6 |",
            case["events"],
            case["listeners"],
            case["lag_p50_ms"],
            case["lag_p99_ms"],
            case["deliveries_per_s"],
            case["raw_per_s"],
            case["ratio"]
        );
    }
    println!(
        "| queue store alone: CPU per delivery, {} deliveries (the store floor) | {} µs | | |",
        report["store"]["deliveries"], report["store"]["cpu_us_per_delivery"]
    );
    for case in report["delivery"]["cases"].as_array().into_iter().flatten() {
        println!(
            "| hookd CPU per delivery, {} events x {} listeners | {} µs | | |",
            case["events"], case["listeners"], case["hookd_cpu_us_per_delivery"]
        );
    }
    let o = &report["ordered"];
    println!(
        "| one ordered listener, {} events: deliveries/s alone / beside {} deliveries/s to {} others | {} / {} | | |",
        o["events"], o["load_deliveries_per_s"], o["load_listeners"], o["alone_per_s"], o["beside_load_per_s"]
    );
    let i = &report["isolation"];
    println!(
        "| healthy listeners' lag p50 / p99 alone, and beside {} hanging listeners | {} / {} ms; {} / {} ms (p99 ratio {}) | | ≤ 1.5 |",
        i["hanging_listeners"],
        i["alone"]["lag_p50_ms"],
        i["alone"]["lag_p99_ms"],
        i["beside_hanging"]["lag_p50_ms"],
        i["beside_hanging"]["lag_p99_ms"],
        i["lag_p99_ratio"]
    );
    let b = &report["backlog"];
    println!("| RSS with {} pending deliveries | {} MB | | ≤ 300 MB |", b["pending"], b["rss_mb"]);
    println!("| data directory with {} pending deliveries | {} MB | | |", b["pending"], b["data_dir_mb"]);
    println!("| first delivery after kill -9 and restart | {} ms | | ≤ 2,000 ms |", b["restart_to_first_delivery_ms"]);
    println!();
    println!("machine: {} cores; hookd {}", report["machine"]["cores"], report["machine"]["hookd_version"]);
}
