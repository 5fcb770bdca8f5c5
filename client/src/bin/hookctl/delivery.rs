//! `hookctl trigger`, `events`, `event`, `deliveries`, `attempts` and `watch`: putting events
//! in and seeing what became of them.
//!
//! Read-only except `trigger`. Listings follow every page (or up to `--limit`), so what is
//! printed is the whole answer, never a first page that looks complete.

use std::path::PathBuf;

use clap::builder::RangedU64ValueParser;
use clap::{ArgGroup, Args, ValueEnum};
use hookd_client::v1::{
    DeliveryState, GetEventRequest, ListAttemptsRequest, ListDeliveriesRequest, ListEventsRequest, TriggerRequest,
    WatchDeliveriesRequest,
};
use hookd_client::{Client, v1};
use serde_json::json;
use tokio::io::AsyncReadExt;

use crate::Context;
use crate::error::CliError;
use crate::output::{
    ATTEMPT_HEADERS, DELIVERY_HEADERS, EVENT_HEADERS, attempt_json, attempt_row, bytes_as_text, delivery_json,
    delivery_row, event_json, event_row, fields, print_line, table, update_json, update_line,
};
use crate::time::{format_optional, parse_time};

#[derive(Debug, Args)]
pub struct TriggerArgs {
    /// The event type, e.g. order.placed
    event_type: String,
    /// The payload, sent to listeners as is; `-` reads it from standard input (or give --file)
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    payload: Option<String>,
    /// Read the payload from this file
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// The same key within 24 hours returns the first event's id and records nothing new:
    /// use it to retry safely
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// The content-type listeners receive (application/json when not given)
    #[arg(long, value_name = "TYPE")]
    content_type: Option<String>,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only events of this type
    #[arg(long)]
    event_type: Option<String>,
    /// Only events created at or after this time: RFC 3339 (2026-05-01T12:00:00Z) or a
    /// duration ago (2h)
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    since: Option<prost_types::Timestamp>,
    /// Only events created before this time (same forms as --since)
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    until: Option<prost_types::Timestamp>,
    /// At most this many events (the oldest first)
    #[arg(long, default_value_t = 100, value_name = "N", value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    limit: usize,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("of").required(true).args(["event", "listener"])))]
pub struct DeliveriesArgs {
    /// The deliveries of this event (evt_...)
    #[arg(long, value_name = "EVENT_ID")]
    event: Option<String>,
    /// The deliveries of this listener (lst_...)
    #[arg(long, value_name = "LISTENER_ID")]
    listener: Option<String>,
    /// Only deliveries in this state
    #[arg(long, value_enum)]
    state: Option<StateFilter>,
}

/// A delivery state as `--state` names it.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StateFilter {
    /// Waiting for its next attempt
    Pending,
    /// A 2xx answer was received
    Succeeded,
    /// Every scheduled attempt failed
    Failed,
    /// Abandoned, e.g. its listener was deleted
    Cancelled,
}

impl From<StateFilter> for DeliveryState {
    fn from(state: StateFilter) -> Self {
        match state {
            StateFilter::Pending => DeliveryState::Pending,
            StateFilter::Succeeded => DeliveryState::Succeeded,
            StateFilter::Failed => DeliveryState::Failed,
            StateFilter::Cancelled => DeliveryState::Cancelled,
        }
    }
}

pub async fn trigger(context: &Context, args: TriggerArgs) -> Result<(), CliError> {
    let payload = match (args.payload, args.file) {
        (_, Some(path)) => {
            tokio::fs::read(&path).await.map_err(|source| CliError::ReadFile { path: path.clone(), source })?
        }
        (Some(payload), None) if payload == "-" => {
            let mut payload = Vec::new();
            tokio::io::stdin().read_to_end(&mut payload).await.map_err(CliError::ReadStdin)?;
            payload
        }
        (Some(payload), None) => payload.into_bytes(),
        // clap requires one of them.
        (None, None) => Vec::new(),
    };
    let client = context.producer("trigger").await?;
    let request = TriggerRequest {
        event_type: args.event_type,
        payload,
        content_type: args.content_type.unwrap_or_default(),
        idempotency_key: args.idempotency_key.unwrap_or_default(),
    };
    let ack = client.trigger_service().trigger(request).await?.into_inner();
    context.out.print(
        || json!({ "event_id": ack.event_id, "duplicate": ack.duplicate }),
        || {
            if ack.duplicate {
                format!(
                    "{} duplicate: an earlier event had this idempotency key; nothing new was recorded",
                    ack.event_id
                )
            } else {
                ack.event_id.clone()
            }
        },
    );
    Ok(())
}

pub async fn events(context: &Context, args: EventsArgs) -> Result<(), CliError> {
    let client = context.inspector("events").await?;
    let mut events = Vec::new();
    let mut page_token = String::new();
    // A page token left over means more may match (only an empty one says there is no more).
    let more = loop {
        let request = ListEventsRequest {
            event_type: args.event_type.clone().unwrap_or_default(),
            since: args.since,
            until: args.until,
            page_size: u32::try_from(args.limit - events.len()).unwrap_or(u32::MAX).min(1000),
            page_token,
        };
        let page = client.delivery().list_events(request).await?.into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() || events.len() >= args.limit {
            break events.len() > args.limit || !page.next_page_token.is_empty();
        }
        page_token = page.next_page_token;
    };
    events.truncate(args.limit);
    if more && !context.out.json {
        eprintln!("showing the first {} events; more may match (raise --limit, or narrow with --since)", args.limit);
    }
    context.out.print(
        || events.iter().map(|event| event_json(event, false)).collect(),
        || table(EVENT_HEADERS, &events.iter().map(event_row).collect::<Vec<_>>()),
    );
    Ok(())
}

pub async fn event(context: &Context, event_id: &str) -> Result<(), CliError> {
    let client = context.inspector("event").await?;
    let event = client.delivery().get_event(GetEventRequest { event_id: event_id.to_owned() }).await?.into_inner();
    context.out.print(
        || event_json(&event, true),
        || {
            let (payload, encoding) = bytes_as_text(&event.payload);
            let payload_label = if encoding == "utf8" { "payload" } else { "payload (base64)" };
            fields(&[
                ("id", event.id.clone()),
                ("event type", event.event_type.clone()),
                ("created", format_optional(event.created_at.as_ref())),
                ("content type", event.content_type.clone()),
                ("idempotency key", event.idempotency_key.clone()),
                ("bytes", event.payload.len().to_string()),
                (payload_label, payload),
            ])
        },
    );
    Ok(())
}

pub async fn deliveries(context: &Context, args: DeliveriesArgs) -> Result<(), CliError> {
    let client = context.inspector("deliveries").await?;
    let state = args.state.map(DeliveryState::from).unwrap_or(DeliveryState::Unspecified);
    let deliveries =
        list_deliveries(&client, args.event.unwrap_or_default(), args.listener.unwrap_or_default(), state).await?;
    context.out.print(
        || deliveries.iter().map(delivery_json).collect(),
        || table(DELIVERY_HEADERS, &deliveries.iter().map(delivery_row).collect::<Vec<_>>()),
    );
    Ok(())
}

/// Every delivery of an event or a listener (give one id, the other empty), page by page.
pub async fn list_deliveries(
    client: &Client,
    event_id: String,
    listener_id: String,
    state: DeliveryState,
) -> Result<Vec<v1::Delivery>, CliError> {
    let mut deliveries = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListDeliveriesRequest {
            event_id: event_id.clone(),
            listener_id: listener_id.clone(),
            state: state.into(),
            page_size: 1000,
            page_token,
        };
        let page = client.delivery().list_deliveries(request).await?.into_inner();
        deliveries.extend(page.deliveries);
        if page.next_page_token.is_empty() {
            return Ok(deliveries);
        }
        page_token = page.next_page_token;
    }
}

pub async fn attempts(context: &Context, delivery_id: &str) -> Result<(), CliError> {
    let client = context.inspector("attempts").await?;
    let mut attempts = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListAttemptsRequest { delivery_id: delivery_id.to_owned(), page_size: 1000, page_token };
        let page = client.delivery().list_attempts(request).await?.into_inner();
        attempts.extend(page.attempts);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    context.out.print(
        || attempts.iter().map(attempt_json).collect(),
        || table(ATTEMPT_HEADERS, &attempts.iter().map(attempt_row).collect::<Vec<_>>()),
    );
    Ok(())
}

pub async fn watch(context: &Context, event_id: Option<String>) -> Result<(), CliError> {
    let client = context.producer("watch").await?;
    let request = WatchDeliveriesRequest { event_id: event_id.unwrap_or_default() };
    let mut updates = client.trigger_service().watch_deliveries(request).await?.into_inner();
    // On stderr, so stdout holds only outcomes; a script can wait for this line to know
    // that nothing from now on is missed.
    eprintln!("watching deliveries (ctrl-c to stop)");
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let update = tokio::select! {
            update = updates.message() => update,
            _ = &mut ctrl_c => return Ok(()),
        };
        match update {
            Ok(Some(update)) => {
                let line = if context.out.json { update_json(&update).to_string() } else { update_line(&update) };
                print_line(&line);
            }
            Err(status) => return Err(CliError::StreamEnded(Some(status))),
            Ok(None) => {
                eprintln!("the server ended the stream");
                return Ok(());
            }
        }
    }
}
