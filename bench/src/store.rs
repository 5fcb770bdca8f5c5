//! The store floor: what the queue database's own work costs per delivery, with no HTTP,
//! no dispatch, no event log and no other thread of hookd. It makes, on hookd's own store,
//! the calls a delivery that succeeds at its first attempt makes: fan-out's commit in
//! chunks of hookd's size, the worker's read of the delivery, and the recorder's commit in
//! groups of hookd's size. The two phases run one after the other, not side by side, so
//! this is a lower bound: what any delivery costs hookd as long as its queue is built
//! this way. Measured as this process's CPU time (sled's own threads included).

use std::time::Instant;

use hookd_server::clock::now_ms;
use hookd_server::ids;
use hookd_server::pipeline::{FANOUT_CHUNK, RECORD_GROUP};
use hookd_server::store::{
    Attempt, AttemptTrigger, Completion, Delivery, DeliveryState, DueEntry, Event, FanoutCursor, NewDelivery, NextStep,
    PipelineStore, SledStore,
};
use serde_json::{Value, json};

use crate::BoxError;
use crate::stats::round;

/// Runs `deliveries` deliveries to one listener through the store; reports CPU per delivery.
pub fn floor(deliveries: usize) -> Result<Value, BoxError> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    let due_ms = now_ms();
    let listener_id = ids::listener_id(due_ms);
    let producer_id = ids::producer_id(due_ms);
    let event = |seq: u64| Event {
        id: ids::event_id(seq),
        seq,
        producer_id: producer_id.clone(),
        event_type: "bench.store".into(),
        content_type: "application/json".into(),
        created_at_ms: due_ms,
        ..Event::default()
    };
    let cpu_before = crate::hookd::cpu_seconds(std::process::id());
    let started = Instant::now();

    let seqs: Vec<u64> = (1..=deliveries as u64).collect();
    for chunk in seqs.chunks(FANOUT_CHUNK) {
        let new: Vec<NewDelivery> = chunk
            .iter()
            .map(|&seq| NewDelivery {
                delivery: Delivery::pending(ids::delivery_id(seq, &listener_id), &event(seq), &listener_id, due_ms),
                ordered: false,
            })
            .collect();
        let cursor = FanoutCursor { next_seq: chunk[chunk.len() - 1] + 1, after_listener: String::new() };
        store.commit_fanout(&new, &cursor)?;
    }
    let cpu_fanned_out = crate::hookd::cpu_seconds(std::process::id());
    for group in seqs.chunks(RECORD_GROUP) {
        let mut completions = Vec::with_capacity(group.len());
        for &seq in group {
            let id = ids::delivery_id(seq, &listener_id);
            let mut delivery = store.delivery(&id)?.ok_or("a delivery fan-out wrote is missing")?;
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
            let entry = DueEntry { due_ms, delivery_id: id, listener_id: listener_id.clone(), manual: false };
            completions.push(Completion { delivery, attempt, entry, next: NextStep::Done });
        }
        store.complete_attempts(completions)?;
    }

    let seconds = started.elapsed().as_secs_f64();
    let per_delivery = |cpu_seconds: f64| cpu_seconds * 1e6 / deliveries as f64;
    let cpu_us = per_delivery(crate::hookd::cpu_seconds(std::process::id()) - cpu_before);
    let fanout_us = per_delivery(cpu_fanned_out - cpu_before);
    let per_s = deliveries as f64 / seconds;
    eprintln!(
        "store floor, {deliveries} deliveries: {per_s:.0}/s, {cpu_us:.1} µs of CPU per delivery ({fanout_us:.1} µs fan-out, {:.1} µs reading and recording)",
        cpu_us - fanout_us
    );
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
