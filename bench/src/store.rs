//! The store floor: what the store's own work costs per delivery, with no HTTP, no dispatch
//! and no other thread of hookd. It makes, on hookd's own store, the calls a delivery that
//! succeeds at its first attempt makes now that the event log is the queue of first attempts:
//! fan-out's read of the log in chunks of hookd's size (it writes nothing), the worker's read
//! of the event, and the recorder's one write of the delivery in groups of hookd's size. The
//! events are appended first and not counted. The two phases run one after the other, not
//! side by side, so this is a lower bound. Measured as this process's CPU time (sled's own
//! threads included).

use std::time::Instant;

use hookd_server::clock::now_ms;
use hookd_server::ids;
use hookd_server::pipeline::{FANOUT_CHUNK, RECORD_GROUP};
use hookd_server::store::{
    Attempt, AttemptTrigger, Completion, Delivery, DeliveryState, NewEvent, NextStep, PipelineStore, Producer,
    SledStore, Store,
};
use serde_json::{Value, json};

use crate::BoxError;
use crate::stats::round;

/// Runs `deliveries` deliveries to one listener through the store; reports CPU per delivery.
pub async fn floor(deliveries: usize) -> Result<Value, BoxError> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    let due_ms = now_ms();
    let listener_id = ids::listener_id(due_ms);
    let producer_id = ids::producer_id(due_ms);
    let key_hash = [7u8; 32];
    let producer = Producer { id: producer_id.clone(), name: "bench".into(), enabled: true, ..Producer::default() };
    store.create_producer(producer, key_hash).await?;
    let appends: Vec<_> = (0..deliveries)
        .map(|_| {
            store.append_event(NewEvent {
                producer_id: producer_id.clone(),
                key_hash,
                event_type: "bench.store".into(),
                payload: b"{}".to_vec(),
                content_type: "application/json".into(),
                idempotency_key: None,
                created_at_ms: due_ms,
            })
        })
        .collect();
    for append in appends {
        append.await?;
    }
    store.settled().await?;
    let cpu_before = crate::hookd::cpu_seconds(std::process::id());
    let started = Instant::now();

    // Fan-out reads the log and the listener; it writes nothing.
    let mut seqs = Vec::with_capacity(deliveries);
    let mut next = 0;
    loop {
        let chunk: Vec<_> = store.events_from(next).take(FANOUT_CHUNK).collect::<Result<_, _>>()?;
        let Some(last) = chunk.last() else { break };
        next = last.seq + 1;
        seqs.extend(chunk.iter().map(|event| event.seq));
    }
    let cpu_fanned_out = crate::hookd::cpu_seconds(std::process::id());
    for group in seqs.chunks(RECORD_GROUP) {
        let mut completions = Vec::with_capacity(group.len());
        for &seq in group {
            let event = store.event_at(seq)?.ok_or("an appended event is missing")?;
            let mut delivery = Delivery::pending(ids::delivery_id(seq, &listener_id), &event, &listener_id, due_ms);
            delivery.attempts = 1;
            delivery.state = DeliveryState::Succeeded as i32;
            delivery.next_attempt_at_ms = 0;
            delivery.last_status_code = 200;
            let attempt = Attempt {
                number: 1,
                started_at_ms: due_ms,
                duration_ms: 1,
                status_code: 200,
                response_headers: [("content-length".to_owned(), "0".to_owned())].into(),
                trigger: AttemptTrigger::Scheduled as i32,
                ..Attempt::default()
            };
            completions.push(Completion { delivery, attempt, entry: None, next: NextStep::Done, ordered: false });
        }
        store.complete_attempts(completions)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let per_delivery = |cpu_seconds: f64| cpu_seconds * 1e6 / deliveries as f64;
    let cpu_us = per_delivery(crate::hookd::cpu_seconds(std::process::id()) - cpu_before);
    let fanout_us = per_delivery(cpu_fanned_out - cpu_before);
    let per_s = deliveries as f64 / seconds;
    eprintln!(
        "store floor, {deliveries} deliveries: {per_s:.0}/s, {cpu_us:.1} µs of CPU per delivery ({fanout_us:.1} µs reading the log, {:.1} µs reading the event and recording)",
        cpu_us - fanout_us
    );
    store.close()?;
    Ok(json!({
        "deliveries": deliveries,
        "deliveries_per_s": round(per_s),
        "cpu_us_per_delivery": round(cpu_us),
        "fanout_cpu_us_per_delivery": round(fanout_us),
        "record_cpu_us_per_delivery": round(cpu_us - fanout_us),
        "fanout_chunk": FANOUT_CHUNK,
        "record_group": RECORD_GROUP,
    }))
}
