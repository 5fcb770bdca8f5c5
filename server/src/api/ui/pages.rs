//! The pages and the buttons' actions of the operator's web page. Reads and changes go through
//! the same calls as the gRPC API (made as the admin); HTML is written here, every value
//! escaped.

use std::collections::HashMap;
use std::fmt::Write as _;

use hookd::v1::{
    Attempt, Delivery, DeliveryState, Event, GetEventRequest, ListAttemptsRequest, ListDeliveriesRequest,
    ListEventsRequest, RecoverListenerRequest, ReplayEventRequest, RetryDeliveryRequest,
};
use hyper::StatusCode;

use super::{ADMIN, Shown, Ui, Visitor, html};
use crate::api::ApiError;
use crate::blocking;
use crate::clock::{now_ms, parse_rfc3339, rfc3339, timestamp};
use crate::pipeline::Standing;
use crate::store::{EventFilter, Listener};

/// Escapes text for HTML, attributes included.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn when(at: Option<&prost_types::Timestamp>) -> String {
    at.map_or_else(String::new, |at| rfc3339(u64::try_from(at.seconds).unwrap_or(0) * 1000))
}

fn state_name(state: i32) -> &'static str {
    match DeliveryState::try_from(state) {
        Ok(DeliveryState::Pending) => "pending",
        Ok(DeliveryState::Succeeded) => "succeeded",
        Ok(DeliveryState::Failed) => "failed",
        Ok(DeliveryState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0}td,th{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}\
th{background:#f4f4f4}code,pre{font:12px ui-monospace,monospace}pre{background:#f7f7f7;padding:.5em;max-width:60em;overflow:auto;white-space:pre-wrap}\
nav a{margin-right:1em}form.inline{display:inline}.succeeded{color:#17692a}.failed{color:#a11}.pending{color:#8a6100}.cancelled{color:#666}\
.bad{color:#a11;font-weight:bold}";

/// A whole page: title, navigation (and the form to log out) and content.
fn layout(title: &str, visitor: Option<&Visitor>, content: &str) -> String {
    let nav = match visitor {
        Some(visitor) => format!(
            "<nav><a href=\"/\">Events</a><a href=\"/listeners\">Listeners</a>\
             <form class=\"inline\" method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"form\" value=\"{}\">\
             <button>Log out</button></form></nav>",
            esc(&visitor.form_token)
        ),
        None => String::new(),
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · hookd</title><style>{STYLE}</style></head>\
         <body>{nav}<h1>{}</h1>{content}</body></html>",
        esc(title),
        esc(title)
    )
}

pub fn login(problem: Option<&str>) -> String {
    let problem = problem.map_or_else(String::new, |problem| format!("<p class=\"bad\">{}</p>", esc(problem)));
    layout(
        "Log in",
        None,
        &format!(
            "{problem}<form method=\"post\" action=\"/login\"><label>Admin token <input type=\"password\" name=\"token\" \
             autofocus size=\"40\"></label> <button>Log in</button></form>"
        ),
    )
}

pub fn message(title: &str, text: &str) -> String {
    layout(title, None, &format!("<p>{}</p><p><a href=\"/\">Back to the events</a></p>", esc(text)))
}

/// A button posting to `action` with the visitor's form token and `extra` fields.
fn button(visitor: &Visitor, action: &str, label: &str, extra: &str) -> String {
    format!(
        "<form class=\"inline\" method=\"post\" action=\"{}\"><input type=\"hidden\" name=\"form\" value=\"{}\">{extra}\
         <button>{}</button></form>",
        esc(action),
        esc(&visitor.form_token),
        esc(label)
    )
}

impl Ui {
    /// Events, newest pages last, filtered by producer, type and time.
    pub(super) async fn events(&self, visitor: &Visitor, query: &HashMap<String, String>) -> Shown {
        let field = |name: &str| query.get(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let since = field("since").map(|text| parse_rfc3339(&text).ok_or(text));
        let until = field("until").map(|text| parse_rfc3339(&text).ok_or(text));
        for bad in [&since, &until].into_iter().flatten() {
            if let Err(text) = bad {
                return Err(ApiError::InvalidArgument(format!("{text:?} is not a time like 2026-12-06T20:00")));
            }
        }
        let since = since.and_then(Result::ok);
        let until = until.and_then(Result::ok);
        let event_type = field("type");
        let producer = field("producer");
        let after = field("after").and_then(|after| after.parse::<u64>().ok());
        let events = match &producer {
            // Another producer's filter: read from the store, as ListEvents does for each.
            Some(producer_id) => {
                if let Some(event_type) = &event_type {
                    crate::validate::event_type(event_type)?;
                }
                let filter = EventFilter {
                    producer_id: Some(producer_id.clone()),
                    event_type: event_type.clone(),
                    since_ms: since.unwrap_or(0),
                    until_ms: until,
                };
                let history = self.shared.history.clone();
                let page = blocking(move || history.list_events(&filter, after, 50)).await?;
                let next = page.resume_after;
                (page.items.into_iter().map(crate::api::delivery::event_message).collect::<Vec<Event>>(), next)
            }
            None => {
                let request = ListEventsRequest {
                    event_type: event_type.clone().unwrap_or_default(),
                    since: since.map(timestamp),
                    until: until.map(timestamp),
                    page_size: 50,
                    page_token: after
                        .map(|after| crate::validate::encode_page_token(&after.to_string()))
                        .unwrap_or_default(),
                };
                let page = self.delivery.list_events_as(&ADMIN, request).await?;
                let next = (!page.next_page_token.is_empty())
                    .then(|| crate::validate::page_token(&page.next_page_token).ok().flatten())
                    .flatten();
                (page.events, next)
            }
        };
        let (events, next) = events;
        let value = |name: &str| esc(query.get(name).map(String::as_str).unwrap_or_default());
        let mut content = format!(
            "<form method=\"get\" action=\"/\">Producer <input name=\"producer\" value=\"{}\" size=\"36\"> \
             Type <input name=\"type\" value=\"{}\"> Since <input name=\"since\" value=\"{}\" placeholder=\"2026-12-06T20:00\"> \
             Until <input name=\"until\" value=\"{}\"> <button>Show</button></form>",
            value("producer"),
            value("type"),
            value("since"),
            value("until")
        );
        content.push_str("<table><tr><th>Event</th><th>Type</th><th>Created</th><th>Idempotency key</th></tr>");
        for event in &events {
            let _ = write!(
                content,
                "<tr><td><a href=\"/events/{id}\"><code>{id}</code></a></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&event.event_type),
                when(event.created_at.as_ref()),
                esc(&event.idempotency_key),
                id = esc(&event.id)
            );
        }
        content.push_str("</table>");
        if events.is_empty() {
            content.push_str("<p>No events.</p>");
        }
        if let Some(next) = next {
            let mut query: Vec<(String, String)> =
                query.iter().filter(|(name, _)| *name != "after").map(|(n, v)| (n.clone(), v.clone())).collect();
            query.push(("after".into(), next));
            let query = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(query).finish();
            let _ = write!(content, "<p><a href=\"/?{}\">More</a></p>", esc(&query));
        }
        Ok(html(StatusCode::OK, layout("Events", Some(visitor), &content)))
    }

    /// One event, its payload and its deliveries.
    pub(super) async fn event(&self, visitor: &Visitor, event_id: &str) -> Shown {
        let event = self.delivery.get_event_as(&ADMIN, GetEventRequest { event_id: event_id.to_owned() }).await?;
        let deliveries =
            self.all_deliveries_of(ListDeliveriesRequest { event_id: event.id.clone(), ..Default::default() }).await?;
        let payload = String::from_utf8(event.payload.clone())
            .unwrap_or_else(|_| format!("({} bytes that are not UTF-8)", event.payload.len()));
        let mut content = format!(
            "<p>Type <b>{}</b>, created {}, content type <code>{}</code>.</p><pre>{}</pre>{}",
            esc(&event.event_type),
            when(event.created_at.as_ref()),
            esc(&event.content_type),
            esc(&payload.chars().take(8192).collect::<String>()),
            button(visitor, &format!("/events/{}/replay", event.id), "Replay to its listeners", "")
        );
        content.push_str("<h2>Deliveries</h2>");
        content.push_str(&deliveries_table(&deliveries));
        Ok(html(StatusCode::OK, layout(&format!("Event {}", event.id), Some(visitor), &content)))
    }

    async fn all_deliveries_of(&self, mut request: ListDeliveriesRequest) -> Result<Vec<Delivery>, ApiError> {
        let mut all = Vec::new();
        request.page_size = 1000;
        // An event has as many deliveries as listeners: a few pages at most for the page.
        for _ in 0..20 {
            let page = self.delivery.list_deliveries_as(&ADMIN, request.clone()).await?;
            all.extend(page.deliveries);
            if page.next_page_token.is_empty() {
                break;
            }
            request.page_token = page.next_page_token;
        }
        Ok(all)
    }

    /// One delivery's attempts, with its response headers and body.
    pub(super) async fn delivery(&self, visitor: &Visitor, delivery_id: &str) -> Shown {
        let attempts = self
            .delivery
            .list_attempts_as(&ADMIN, ListAttemptsRequest { delivery_id: delivery_id.to_owned(), ..Default::default() })
            .await?;
        let mut content = format!(
            "<p>{}</p>",
            button(visitor, &format!("/deliveries/{delivery_id}/retry"), "Retry now (one manual attempt)", "")
        );
        if attempts.attempts.is_empty() {
            content.push_str("<p>No attempt yet: its first attempt is on its way, in trigger order.</p>");
        }
        content.push_str(
            "<table><tr><th>#</th><th>How</th><th>Started</th><th>Status</th><th>Took</th><th>Response</th></tr>",
        );
        for attempt in &attempts.attempts {
            content.push_str(&attempt_row(attempt));
        }
        content.push_str("</table>");
        Ok(html(StatusCode::OK, layout(&format!("Delivery {delivery_id}"), Some(visitor), &content)))
    }

    /// Every listener, with its health as the pipeline sees it now.
    pub(super) async fn listeners(&self, visitor: &Visitor) -> Shown {
        let store = self.shared.store.clone();
        let listeners = blocking(move || -> Result<Vec<Listener>, ApiError> {
            let mut all = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let producers = store.list_producers(after.as_deref(), 500)?;
                for producer in &producers {
                    if all.len() >= 5000 {
                        break;
                    }
                    let mut from: Option<String> = None;
                    loop {
                        let page = store.list_listeners(&producer.id, None, from.as_deref(), 500)?;
                        from = page.last().map(|listener| listener.id.clone());
                        let more = page.len() == 500;
                        all.extend(page);
                        if !more || all.len() >= 5000 {
                            break;
                        }
                    }
                }
                match producers.last() {
                    Some(last) if producers.len() == 500 && all.len() < 5000 => after = Some(last.id.clone()),
                    _ => return Ok(all),
                }
            }
        })
        .await?;
        // Where this node does not know how listeners are doing, it says so rather than show
        // them idle; a listener the answer leaves out reads `unlisted`.
        let (status, why, unlisted) = match self.shared.pipeline.listener_status().await {
            Standing::Here(status) => (status, String::new(), "idle"),
            Standing::Relayed(report) => {
                let mut why = "Another node of this database delivers: how each listener is doing is shown as \
                               that node told it just now."
                    .to_owned();
                let cut = report.total > report.statuses.len();
                if cut {
                    let _ = write!(
                        why,
                        " It holds work of {} listeners and told of the {} doing worst.",
                        report.total,
                        report.statuses.len()
                    );
                }
                (report.statuses, why, if cut { "not told" } else { "idle" })
            }
            Standing::Elsewhere => (
                Vec::new(),
                "This node does not hold the delivery lease, and no node that delivers answered in time \
                 (another node may be taking over, or this node may have lost its database session): how \
                 each listener is doing (slow, failing, backed off) is shown on the delivering node's page."
                    .to_owned(),
                "on the delivering node",
            ),
            Standing::NotStarted => (
                Vec::new(),
                "Delivery cannot start on this node (it tries again every second; the node's log says \
                 why), so how each listener is doing is not known."
                    .to_owned(),
                "not known",
            ),
            Standing::NotAnswering => (
                Vec::new(),
                "Delivery on this node did not answer in time, so how each listener is doing is not shown.".to_owned(),
                "not known",
            ),
        };
        let status: HashMap<String, crate::pipeline::ListenerStatus> =
            status.into_iter().map(|status| (status.listener_id.clone(), status)).collect();
        let a_day_ago = rfc3339(now_ms().saturating_sub(24 * 3600 * 1000));
        let mut content = String::new();
        if !why.is_empty() {
            let _ = write!(content, "<p>{why}</p>");
        }
        content.push_str(
            "<table><tr><th>Listener</th><th>Producer · type</th><th>URL</th><th>State</th><th>Health</th><th></th></tr>",
        );
        for listener in &listeners {
            let health = match status.get(&listener.id) {
                Some(status) => {
                    let mut health =
                        format!("{}, {} in flight, {} waiting", status.standing, status.in_flight, status.waiting);
                    if status.failures > 0 {
                        let _ = write!(health, ", {} failures in a row", status.failures);
                    }
                    if let Some(until) = status.backed_off_until_ms {
                        let _ = write!(health, "; <span class=\"bad\">backed off until {}</span>", rfc3339(until));
                    }
                    if let Some(seq) = status.detached_from_seq {
                        let _ = write!(health, "; its deliveries from event {seq} on wait in the log");
                    }
                    health
                }
                None => unlisted.to_owned(),
            };
            let state = if listener.enabled {
                "enabled".to_owned()
            } else {
                format!("<span class=\"bad\">disabled</span>: {}", esc(&listener.disabled_reason))
            };
            let mut actions = String::new();
            if !listener.enabled {
                actions.push_str(&button(visitor, &format!("/listeners/{}/enable", listener.id), "Enable", ""));
            }
            actions.push_str(&button(
                visitor,
                &format!("/listeners/{}/recover", listener.id),
                "Recover failures since",
                &format!("<input name=\"since\" value=\"{}\" size=\"20\"> ", esc(&a_day_ago)),
            ));
            let _ = write!(
                content,
                "<tr><td><a href=\"/?{}\"><code>{}</code></a>{}</td><td><code>{}</code><br>{}</td><td><code>{}</code></td>\
                 <td>{state}</td><td>{health}</td><td>{actions}</td></tr>",
                esc(&format!("producer={}", listener.producer_id)),
                esc(&listener.id),
                if listener.ordered { " (ordered)" } else { "" },
                esc(&listener.producer_id),
                esc(&listener.event_type),
                esc(&crate::pipeline::deliver::redacted(&listener.url)),
            );
        }
        content.push_str("</table>");
        Ok(html(StatusCode::OK, layout("Listeners", Some(visitor), &content)))
    }

    pub(super) async fn retry(&self, delivery_id: &str) -> Shown {
        self.delivery.retry_delivery_as(&ADMIN, RetryDeliveryRequest { delivery_id: delivery_id.to_owned() }).await?;
        tracing::info!(%delivery_id, "web page: manual attempt queued");
        Ok(super::redirect(&format!("/deliveries/{delivery_id}")))
    }

    pub(super) async fn replay(&self, event_id: &str) -> Shown {
        let answer =
            self.delivery.replay_event_as(&ADMIN, ReplayEventRequest { event_id: event_id.to_owned() }).await?;
        tracing::info!(%event_id, created = answer.created, "web page: event replayed");
        Ok(super::redirect(&format!("/events/{event_id}")))
    }

    pub(super) async fn recover(&self, listener_id: &str, form: &HashMap<String, String>) -> Shown {
        let since = form.get("since").map(String::as_str).unwrap_or_default();
        let since = parse_rfc3339(since)
            .ok_or_else(|| ApiError::InvalidArgument(format!("{since:?} is not a time like 2026-12-06T20:00")))?;
        let request =
            RecoverListenerRequest { listener_id: listener_id.to_owned(), since: Some(timestamp(since)), until: None };
        let answer = self.delivery.recover_listener_as(&ADMIN, request).await?;
        Ok(super::html(
            StatusCode::OK,
            message_with_back(&format!("{} failed deliveries queued again.", answer.requeued), "/listeners"),
        ))
    }

    pub(super) async fn enable(&self, listener_id: &str) -> Shown {
        let edit = Box::new(|listener: &mut Listener| {
            listener.enabled = true;
            listener.disabled_reason.clear();
        });
        self.shared.store.update_listener(listener_id, edit).await?.ok_or(ApiError::NotFound("listener"))?;
        self.shared.pipeline.listener_changed(listener_id);
        tracing::info!(%listener_id, "web page: listener enabled");
        Ok(super::redirect("/listeners"))
    }
}

fn message_with_back(text: &str, back: &str) -> String {
    layout("Done", None, &format!("<p>{}</p><p><a href=\"{}\">Back</a></p>", esc(text), esc(back)))
}

fn deliveries_table(deliveries: &[Delivery]) -> String {
    let mut table = String::from(
        "<table><tr><th>Delivery</th><th>Listener</th><th>State</th><th>Attempts</th><th>Last status</th><th>Next attempt</th></tr>",
    );
    for delivery in deliveries {
        let state = state_name(delivery.state);
        let _ = write!(
            table,
            "<tr><td><a href=\"/deliveries/{id}\"><code>{id}</code></a></td><td><code>{}</code></td>\
             <td class=\"{state}\">{state}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&delivery.listener_id),
            delivery.attempts,
            if delivery.last_status_code == 0 { String::new() } else { delivery.last_status_code.to_string() },
            when(delivery.next_attempt_at.as_ref()),
            id = esc(&delivery.id)
        );
    }
    table.push_str("</table>");
    if deliveries.is_empty() {
        table.push_str("<p>No deliveries: the event's type has no listener.</p>");
    }
    table
}

fn attempt_row(attempt: &Attempt) -> String {
    let how = if attempt.trigger == hookd::v1::AttemptTrigger::Manual as i32 { "manual" } else { "scheduled" };
    let status = if attempt.status_code == 0 {
        format!("<span class=\"bad\">{}</span>", esc(&attempt.error))
    } else {
        attempt.status_code.to_string()
    };
    let mut headers: Vec<_> = attempt.response_headers.iter().collect();
    headers.sort();
    let headers: String = headers.into_iter().map(|(name, value)| format!("{name}: {value}\n")).collect();
    let body = String::from_utf8_lossy(&attempt.response_body);
    format!(
        "<tr><td>{}</td><td>{how}</td><td>{}</td><td>{status}</td><td>{} ms</td><td><pre>{}{}</pre></td></tr>",
        attempt.number,
        when(attempt.started_at.as_ref()),
        attempt.duration_ms,
        esc(&headers),
        esc(&body)
    )
}
