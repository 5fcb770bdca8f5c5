//! `hookctl retry`, `replay` and `recover`: sending again what did not arrive, and with
//! `--wait`, following the queued work until it is done.
//!
//! Waiting never changes anything on the server: it watches (replay) or lists (recover) and
//! gives up after `--timeout`. A progress bar is drawn only for a person: never with `--json`
//! and never when stderr is not a terminal.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::time::Duration;

use clap::Args;
use hookd_client::v1::{
    DeliveryState, RecoverListenerRequest, ReplayEventRequest, RetryDeliveryRequest, WatchDeliveriesRequest,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio::time::{Instant, MissedTickBehavior};

use crate::Context;
use crate::delivery::list_deliveries;
use crate::error::CliError;
use crate::output::{DELIVERY_HEADERS, delivery_json, delivery_row, fields, state_name, table};
use crate::time::{format_duration, format_optional, parse_duration, parse_time};

/// How often `recover --wait` lists the listener's pending deliveries.
const RECOVER_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The event's id (evt_...)
    event_id: String,
    /// Wait until every new delivery succeeded, failed for good or was cancelled (it watches
    /// with WatchDeliveries, so it needs the event's producer's --api-key)
    #[arg(long)]
    wait: bool,
    /// With --wait, give up after this long
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    timeout: Duration,
}

#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The listener's id (lst_...)
    listener_id: String,
    /// Re-queue failed deliveries created at or after this time: RFC 3339
    /// (2026-05-01T12:00:00Z) or a duration ago (2h)
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    since: prost_types::Timestamp,
    /// ...and before this time (same forms as --since)
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    until: Option<prost_types::Timestamp>,
    /// Wait until none of the listener's deliveries is pending any more
    #[arg(long)]
    wait: bool,
    /// With --wait, give up after this long
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    timeout: Duration,
}

pub async fn retry(context: &Context, delivery_id: &str) -> Result<(), CliError> {
    let client = context.inspector("retry").await?;
    let request = RetryDeliveryRequest { delivery_id: delivery_id.to_owned() };
    let answer = client.delivery().retry_delivery(request).await?.into_inner();
    let delivery = answer.delivery.ok_or(CliError::Incomplete("delivery"))?;
    let queued_at = format_optional(answer.queued_at.as_ref());
    context.out.print(
        || json!({ "delivery": delivery_json(&delivery), "queued_at": answer.queued_at.as_ref().map(|_| &queued_at) }),
        || {
            let summary = fields(&[
                ("delivery", delivery.id.clone()),
                ("event", delivery.event_id.clone()),
                ("listener", delivery.listener_id.clone()),
                ("state", state_name(delivery.state).to_owned()),
                ("attempts", delivery.attempts.to_string()),
                ("queued at", queued_at.clone()),
            ]);
            format!(
                "{summary}\na manual attempt is queued: it is made as soon as the listener has room \
                 (hookctl attempts {} shows it then)",
                delivery.id
            )
        },
    );
    Ok(())
}

pub async fn replay(context: &Context, args: ReplayArgs) -> Result<(), CliError> {
    if !args.wait {
        let client = context.inspector("replay").await?;
        let answer =
            client.delivery().replay_event(ReplayEventRequest { event_id: args.event_id.clone() }).await?.into_inner();
        context.out.print(
            || {
                json!({
                    "event_id": args.event_id,
                    "created": answer.created,
                    "deliveries": answer.deliveries.iter().map(delivery_json).collect::<Vec<_>>(),
                })
            },
            || {
                let rows: Vec<_> = answer.deliveries.iter().map(delivery_row).collect();
                format!(
                    "replayed {}: {} new deliveries\n{}",
                    args.event_id,
                    answer.created,
                    table(DELIVERY_HEADERS, &rows)
                )
            },
        );
        return Ok(());
    }

    // Outcomes are watched before the replay is asked for, so none can finish unseen.
    let client = context.producer("replay --wait").await?;
    let watch = WatchDeliveriesRequest { event_id: args.event_id.clone() };
    let mut updates = client.trigger_service().watch_deliveries(watch).await?.into_inner();
    let answer =
        client.delivery().replay_event(ReplayEventRequest { event_id: args.event_id.clone() }).await?.into_inner();
    // The answer lists at most the first 1,000 new deliveries: past that, any delivery of the
    // event that reaches a final state counts (an older one still retrying could be counted).
    let created_ids: Option<HashSet<String>> = (u64::try_from(answer.deliveries.len()) == Ok(answer.created))
        .then(|| answer.deliveries.iter().map(|delivery| delivery.id.clone()).collect());
    let total = answer.created;
    let progress = Progress::new(context, total, format!("replaying {}", args.event_id));
    let mut finished: HashSet<String> = HashSet::new();
    let mut by_state = [0u64; 3];
    let deadline = Instant::now() + args.timeout;
    let mut timed_out = false;
    while (finished.len() as u64) < total {
        let update = tokio::select! {
            update = updates.message() => update,
            () = tokio::time::sleep_until(deadline) => {
                timed_out = true;
                break;
            }
        };
        let update = match update {
            Ok(Some(update)) => update,
            Ok(None) => return Err(CliError::StreamEnded(None)),
            Err(status) => return Err(CliError::StreamEnded(Some(status))),
        };
        let slot = match DeliveryState::try_from(update.state) {
            Ok(DeliveryState::Succeeded) => 0,
            Ok(DeliveryState::Failed) => 1,
            Ok(DeliveryState::Cancelled) => 2,
            _ => continue,
        };
        let ours = created_ids.as_ref().is_none_or(|ids| ids.contains(&update.delivery_id));
        if ours && finished.insert(update.delivery_id) {
            by_state[slot] += 1;
            progress.set(finished.len() as u64);
        }
    }
    progress.finish();
    let done = finished.len() as u64;
    let [succeeded, failed, cancelled] = by_state;
    context.out.print(
        || {
            json!({
                "event_id": args.event_id,
                "created": total,
                "finished": done,
                "succeeded": succeeded,
                "failed": failed,
                "cancelled": cancelled,
                "timed_out": timed_out,
                "deliveries": answer.deliveries.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
            })
        },
        || {
            format!(
                "replayed {}: {total} new deliveries; {succeeded} succeeded, {failed} failed, {cancelled} cancelled",
                args.event_id
            )
        },
    );
    if timed_out {
        return Err(CliError::WaitTimedOut { waited: format_duration(args.timeout), done, total });
    }
    Ok(())
}

pub async fn recover(context: &Context, args: RecoverArgs) -> Result<(), CliError> {
    let client = context.inspector("recover").await?;
    let request =
        RecoverListenerRequest { listener_id: args.listener_id.clone(), since: Some(args.since), until: args.until };
    let requeued = client.delivery().recover_listener(request).await?.into_inner().requeued;
    if !args.wait {
        context.out.print(
            || json!({ "listener_id": args.listener_id, "requeued": requeued }),
            || format!("re-queued {requeued} failed deliveries of {}", args.listener_id),
        );
        return Ok(());
    }

    // Progress is how many of the re-queued are no longer pending; new first attempts of the
    // listener pending meanwhile hold it back, which errs on the side of waiting.
    let progress = Progress::new(context, requeued, format!("recovering {}", args.listener_id));
    let deadline = Instant::now() + args.timeout;
    let mut ticks = tokio::time::interval(RECOVER_POLL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (pending, timed_out) = loop {
        ticks.tick().await;
        let pending = list_deliveries(&client, String::new(), args.listener_id.clone(), DeliveryState::Pending)
            .await?
            .len() as u64;
        progress.set(requeued - pending.min(requeued));
        if pending == 0 {
            break (pending, false);
        }
        if Instant::now() >= deadline {
            break (pending, true);
        }
    };
    progress.finish();
    context.out.print(
        || json!({ "listener_id": args.listener_id, "requeued": requeued, "pending": pending, "timed_out": timed_out }),
        || format!("re-queued {requeued} failed deliveries of {}; {pending} still pending", args.listener_id),
    );
    if timed_out {
        let done = requeued - pending.min(requeued);
        return Err(CliError::WaitTimedOut { waited: format_duration(args.timeout), done, total: requeued });
    }
    Ok(())
}

/// A progress bar on stderr when a person is there to read it; nothing otherwise.
struct Progress(Option<ProgressBar>);

impl Progress {
    fn new(context: &Context, total: u64, message: String) -> Self {
        if context.out.json || !std::io::stderr().is_terminal() {
            return Self(None);
        }
        let bar = ProgressBar::new(total).with_message(message);
        // The template is a constant: should it ever be refused, the default style still works.
        if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} finished ({elapsed})") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Self(Some(bar))
    }

    fn set(&self, done: u64) {
        if let Some(bar) = &self.0 {
            bar.set_position(done);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    // A wait that ends in an error leaves no stale bar above the error line.
    fn drop(&mut self) {
        self.finish();
    }
}
