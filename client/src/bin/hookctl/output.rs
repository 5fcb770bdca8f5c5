//! How hookctl shows what hookd answered: aligned text tables and `key: value` blocks for
//! people, or JSON values for scripts (`--json`), one per command or one per line for streams.
//!
//! This module owns the conversion of protocol messages into both forms, so every command
//! prints a resource the same way. It never talks to hookd and never decides what to print:
//! the commands do.

use std::io::Write;

use base64::Engine;
use hookd_client::v1::{Attempt, AttemptTrigger, Delivery, DeliveryState, DeliveryUpdate, Event, Listener, Producer};
use serde_json::{Value, json};

use crate::time::{format_optional, format_timestamp};

/// Where a command's answer goes: text for people or JSON for scripts.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// `--json` was given.
    pub json: bool,
}

impl Output {
    /// Prints `value` as one JSON document, or `text()` for people.
    pub fn print(&self, value: impl FnOnce() -> Value, text: impl FnOnce() -> String) {
        let rendered = if self.json { value().to_string() } else { text() };
        print_line(&rendered);
    }
}

/// Prints one line to stdout and flushes it, so a reader on a pipe sees it at once. A closed
/// stdout (e.g. `hookctl watch | head -1`) is not an error worth a panic: the line is dropped.
pub fn print_line(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// An aligned text table: a header row, then one row per item; every column but the last is
/// padded to its widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let render = |cells: &mut dyn Iterator<Item = &str>| {
        let mut line = String::new();
        for (index, cell) in cells.enumerate() {
            if index > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if index + 1 < widths.len() {
                let padding = widths[index].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', padding));
            }
        }
        line.trim_end().to_owned()
    };
    let mut lines = vec![render(&mut headers.iter().copied())];
    lines.extend(rows.iter().map(|row| render(&mut row.iter().map(String::as_str))));
    lines.join("\n")
}

/// A `key: value` block with the values aligned, for one resource.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(key, _)| key.len() + 1).max().unwrap_or(0);
    let line = |(key, value): &(&str, String)| format!("{:<width$} {value}", format!("{key}:")).trim_end().to_owned();
    pairs.iter().map(line).collect::<Vec<_>>().join("\n")
}

/// `yes` or `no`, for flags in tables.
pub fn yes_no(flag: bool) -> String {
    if flag { "yes" } else { "no" }.to_owned()
}

/// The lowercase name of a delivery state, as `--state` takes it.
pub fn state_name(state: i32) -> &'static str {
    match DeliveryState::try_from(state) {
        Ok(DeliveryState::Pending) => "pending",
        Ok(DeliveryState::Succeeded) => "succeeded",
        Ok(DeliveryState::Failed) => "failed",
        Ok(DeliveryState::Cancelled) => "cancelled",
        Ok(DeliveryState::Unspecified) | Err(_) => "unknown",
    }
}

/// Bytes as text when they are UTF-8, else base64: the text and which encoding it is.
pub fn bytes_as_text(bytes: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_owned(), "utf8"),
        Err(_) => (base64::engine::general_purpose::STANDARD.encode(bytes), "base64"),
    }
}

/// Text made to fit on one table line: line breaks and tabs escaped.
pub fn one_line(text: &str) -> String {
    text.chars()
        .flat_map(|c| match c {
            '\n' | '\r' | '\t' => c.escape_default().collect::<Vec<_>>(),
            c if c.is_control() => c.escape_unicode().collect(),
            c => vec![c],
        })
        .collect()
}

fn timestamp_json(timestamp: Option<&prost_types::Timestamp>) -> Value {
    timestamp.map_or(Value::Null, |at| Value::String(format_timestamp(at)))
}

/// A producer as JSON.
pub fn producer_json(producer: &Producer) -> Value {
    json!({
        "id": producer.id,
        "name": producer.name,
        "enabled": producer.enabled,
        "created_at": timestamp_json(producer.created_at.as_ref()),
        "disabled_reason": producer.disabled_reason,
    })
}

/// The columns of a producer table, in the order of [`producer_row`].
pub const PRODUCER_HEADERS: &[&str] = &["ID", "NAME", "ENABLED", "CREATED", "DISABLED REASON"];

/// A producer as a table row.
pub fn producer_row(producer: &Producer) -> Vec<String> {
    vec![
        producer.id.clone(),
        producer.name.clone(),
        yes_no(producer.enabled),
        format_optional(producer.created_at.as_ref()),
        producer.disabled_reason.clone(),
    ]
}

/// A producer as a `key: value` block.
pub fn producer_fields(producer: &Producer) -> String {
    let mut pairs = vec![
        ("id", producer.id.clone()),
        ("name", producer.name.clone()),
        ("enabled", yes_no(producer.enabled)),
        ("created", format_optional(producer.created_at.as_ref())),
    ];
    if !producer.disabled_reason.is_empty() {
        pairs.push(("disabled reason", producer.disabled_reason.clone()));
    }
    fields(&pairs)
}

/// A listener as JSON (never a secret: hookd does not return it).
pub fn listener_json(listener: &Listener) -> Value {
    json!({
        "id": listener.id,
        "event_type": listener.event_type,
        "event_hash": listener.event_hash,
        "url": listener.url,
        "has_secret": listener.has_secret,
        "enabled": listener.enabled,
        "ordered": listener.ordered,
        "description": listener.description,
        "created_at": timestamp_json(listener.created_at.as_ref()),
        "disabled_reason": listener.disabled_reason,
        "previous_secret_until": timestamp_json(listener.previous_secret_until.as_ref()),
        "max_per_second": listener.max_per_second,
    })
}

/// The columns of a listener table, in the order of [`listener_row`].
pub const LISTENER_HEADERS: &[&str] =
    &["ID", "EVENT TYPE", "URL", "ENABLED", "SIGNED", "ORDERED", "CREATED", "DESCRIPTION"];

/// A listener as a table row.
pub fn listener_row(listener: &Listener) -> Vec<String> {
    vec![
        listener.id.clone(),
        listener.event_type.clone(),
        listener.url.clone(),
        yes_no(listener.enabled),
        yes_no(listener.has_secret),
        yes_no(listener.ordered),
        format_optional(listener.created_at.as_ref()),
        one_line(&listener.description),
    ]
}

/// A listener as a `key: value` block.
pub fn listener_fields(listener: &Listener) -> String {
    let mut pairs = vec![
        ("id", listener.id.clone()),
        ("event type", listener.event_type.clone()),
        ("event hash", listener.event_hash.clone()),
        ("url", listener.url.clone()),
        ("enabled", yes_no(listener.enabled)),
        ("signed", yes_no(listener.has_secret)),
        ("ordered", yes_no(listener.ordered)),
        ("created", format_optional(listener.created_at.as_ref())),
        ("description", one_line(&listener.description)),
    ];
    if !listener.disabled_reason.is_empty() {
        pairs.push(("disabled reason", listener.disabled_reason.clone()));
    }
    if listener.max_per_second > 0 {
        pairs.push(("at most a second", listener.max_per_second.to_string()));
    }
    if listener.previous_secret_until.is_some() {
        pairs.push(("old secret signs until", format_optional(listener.previous_secret_until.as_ref())));
    }
    fields(&pairs)
}

/// An event as JSON, with its payload (text or base64) when `with_payload`.
pub fn event_json(event: &Event, with_payload: bool) -> Value {
    let mut value = json!({
        "id": event.id,
        "event_type": event.event_type,
        "content_type": event.content_type,
        "created_at": timestamp_json(event.created_at.as_ref()),
        "idempotency_key": event.idempotency_key,
        "payload_bytes": event.payload.len(),
    });
    if with_payload {
        let (payload, encoding) = bytes_as_text(&event.payload);
        value["payload"] = Value::String(payload);
        value["payload_encoding"] = Value::String(encoding.to_owned());
    }
    value
}

/// The columns of an event table, in the order of [`event_row`].
pub const EVENT_HEADERS: &[&str] = &["ID", "EVENT TYPE", "CREATED", "BYTES", "CONTENT TYPE", "IDEMPOTENCY KEY"];

/// An event as a table row (its size, not its payload).
pub fn event_row(event: &Event) -> Vec<String> {
    vec![
        event.id.clone(),
        event.event_type.clone(),
        format_optional(event.created_at.as_ref()),
        event.payload.len().to_string(),
        event.content_type.clone(),
        event.idempotency_key.clone(),
    ]
}

/// A delivery as JSON.
pub fn delivery_json(delivery: &Delivery) -> Value {
    json!({
        "id": delivery.id,
        "event_id": delivery.event_id,
        "listener_id": delivery.listener_id,
        "state": state_name(delivery.state),
        "attempts": delivery.attempts,
        "last_status_code": delivery.last_status_code,
        "next_attempt_at": timestamp_json(delivery.next_attempt_at.as_ref()),
        "created_at": timestamp_json(delivery.created_at.as_ref()),
    })
}

/// The columns of a delivery table, in the order of [`delivery_row`].
pub const DELIVERY_HEADERS: &[&str] =
    &["ID", "EVENT", "LISTENER", "STATE", "ATTEMPTS", "LAST STATUS", "NEXT ATTEMPT", "CREATED"];

/// A delivery as a table row.
pub fn delivery_row(delivery: &Delivery) -> Vec<String> {
    vec![
        delivery.id.clone(),
        delivery.event_id.clone(),
        delivery.listener_id.clone(),
        state_name(delivery.state).to_owned(),
        delivery.attempts.to_string(),
        status_text(delivery.last_status_code),
        format_optional(delivery.next_attempt_at.as_ref()),
        format_optional(delivery.created_at.as_ref()),
    ]
}

fn status_text(status_code: u32) -> String {
    if status_code == 0 { "-".to_owned() } else { status_code.to_string() }
}

fn trigger_name(trigger: i32) -> &'static str {
    match AttemptTrigger::try_from(trigger) {
        Ok(AttemptTrigger::Scheduled) => "scheduled",
        Ok(AttemptTrigger::Manual) => "manual",
        Ok(AttemptTrigger::Unspecified) | Err(_) => "unknown",
    }
}

/// What an attempt came to: its HTTP status, or the transport error when there was none.
fn attempt_outcome(status_code: u32, error: &str) -> String {
    match (status_code, error) {
        (0, "") => "no answer".to_owned(),
        (0, error) => error.to_owned(),
        (status, _) => status.to_string(),
    }
}

/// An attempt as JSON, with its whole recorded response body.
pub fn attempt_json(attempt: &Attempt) -> Value {
    let (body, encoding) = bytes_as_text(&attempt.response_body);
    json!({
        "number": attempt.number,
        "started_at": timestamp_json(attempt.started_at.as_ref()),
        "trigger": trigger_name(attempt.trigger),
        "status_code": attempt.status_code,
        "error": attempt.error,
        "duration_ms": attempt.duration_ms,
        "response_headers": attempt.response_headers,
        "response_body": body,
        "response_body_encoding": encoding,
    })
}

/// The columns of an attempt table, in the order of [`attempt_row`].
pub const ATTEMPT_HEADERS: &[&str] = &["NUMBER", "STARTED", "TRIGGER", "OUTCOME", "DURATION", "RESPONSE BODY"];

/// An attempt as a table row.
pub fn attempt_row(attempt: &Attempt) -> Vec<String> {
    // hookd keeps the first 4 KiB of the body; shown as text, with what is not UTF-8 replaced.
    let body = String::from_utf8_lossy(&attempt.response_body);
    vec![
        attempt.number.to_string(),
        format_optional(attempt.started_at.as_ref()),
        trigger_name(attempt.trigger).to_owned(),
        attempt_outcome(attempt.status_code, &attempt.error),
        format!("{}ms", attempt.duration_ms),
        one_line(&body),
    ]
}

/// A delivery outcome from WatchDeliveries as JSON.
pub fn update_json(update: &DeliveryUpdate) -> Value {
    json!({
        "event_id": update.event_id,
        "delivery_id": update.delivery_id,
        "listener_id": update.listener_id,
        "attempt": update.attempt,
        "state": state_name(update.state),
        "status_code": update.status_code,
        "error": update.error,
        "at": timestamp_json(update.at.as_ref()),
    })
}

/// One line per delivery outcome, for `watch`.
pub fn update_line(update: &DeliveryUpdate) -> String {
    format!(
        "{}  {}  {}  {}  attempt {}  {}  {}",
        format_optional(update.at.as_ref()),
        update.event_id,
        update.delivery_id,
        update.listener_id,
        update.attempt,
        state_name(update.state),
        attempt_outcome(update.status_code, &update.error),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_every_column_but_the_last() {
        let rows = vec![
            vec!["a".to_owned(), "long cell".to_owned(), "x".to_owned()],
            vec!["bbbb".to_owned(), "c".to_owned(), String::new()],
        ];
        let expected = "ID    NAME       LAST\na     long cell  x\nbbbb  c";
        assert_eq!(table(&["ID", "NAME", "LAST"], &rows), expected);
    }

    #[test]
    fn bytes_are_text_when_they_can_be() {
        assert_eq!(bytes_as_text(b"{\"a\":1}"), ("{\"a\":1}".to_owned(), "utf8"));
        assert_eq!(bytes_as_text(&[0xff, 0x00]), ("/wA=".to_owned(), "base64"));
        assert_eq!(one_line("a\nb\tc"), "a\\nb\\tc");
    }
}
