//! `hookctl hash` and `hookctl listeners ...`: the RegisterService commands, with a producer's
//! API key.
//!
//! Commands take event types, never event hashes: the hash is re-derived on each call, as
//! hookd asks (it is a capability, not something to keep). A secret is printed only when hookd
//! minted it, in the one answer that carries it.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Subcommand};
use hookd_client::Client;
use hookd_client::v1::{
    DeleteListenerRequest, GetListenerRequest, ListListenersRequest, Listener, RegisterListenerRequest,
    RotateListenerSecretRequest, UpdateListenerRequest,
};
use serde_json::json;

use crate::Context;
use crate::error::CliError;
use crate::output::{LISTENER_HEADERS, listener_fields, listener_json, listener_row, table};

#[derive(Debug, Subcommand)]
pub enum ListenersCommand {
    /// Register a URL to receive an event type's events (the event hash is derived for you)
    Register(RegisterArgs),
    /// List your listeners (every page), oldest first
    List {
        /// Only the listeners of this event type
        #[arg(long)]
        event_type: Option<String>,
    },
    /// Show one listener (never its secret)
    Get {
        /// The listener's id (lst_...)
        listener_id: String,
    },
    /// Change a listener's URL, state, order or description; what is not given is kept
    Update(UpdateArgs),
    /// Remove a listener: it gets no new deliveries
    Delete {
        /// The listener's id (lst_...)
        listener_id: String,
    },
    /// Replace a listener's signing secret with a given or a generated one
    RotateSecret(RotateSecretArgs),
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The event type, e.g. order.placed
    event_type: String,
    /// Where deliveries are POSTed: http or https, no user name or password
    url: String,
    /// Sign every request with this secret: whsec_<base64> or any string of 8 to 256
    /// characters (Standard Webhooks)
    #[arg(long, conflicts_with = "generate_secret")]
    secret: Option<String>,
    /// Read the secret from this file, `-` for standard input (a command line is seen by
    /// every user of the machine)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["secret", "generate_secret"])]
    secret_file: Option<PathBuf>,
    /// Let hookd mint a whsec_ secret and print it (shown only this once)
    #[arg(long)]
    generate_secret: bool,
    /// Strict order: the next event waits until the previous one succeeded or failed for good
    #[arg(long)]
    ordered: bool,
    /// Free text for people, at most 512 characters
    #[arg(long)]
    description: Option<String>,
    /// Most requests a second to it (retries included); hookd keeps the rest waiting
    #[arg(long, value_name = "N")]
    max_per_second: Option<u32>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("change").required(true).multiple(true)))]
pub struct UpdateArgs {
    /// The listener's id (lst_...)
    listener_id: String,
    /// New URL (same rules as at registration)
    #[arg(long, group = "change")]
    url: Option<String>,
    /// Enable it (clears its disabled reason)
    #[arg(long, group = "change", conflicts_with = "disable")]
    enable: bool,
    /// Disable it: it gets no deliveries until enabled
    #[arg(long, group = "change")]
    disable: bool,
    /// Switch strict order on or off
    #[arg(long, group = "change", value_name = "true|false")]
    ordered: Option<bool>,
    /// New description
    #[arg(long, group = "change")]
    description: Option<String>,
    /// New rate limit in requests a second; 0 lifts it
    #[arg(long, group = "change", value_name = "N")]
    max_per_second: Option<u32>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("new_secret").required(true).args(["secret", "secret_file", "generate_secret"])))]
pub struct RotateSecretArgs {
    /// The listener's id (lst_...)
    listener_id: String,
    /// The new secret: whsec_<base64> or any string of 8 to 256 characters
    #[arg(long)]
    secret: Option<String>,
    /// Read the new secret from this file, `-` for standard input (a command line is seen by
    /// every user of the machine)
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// Let hookd mint a whsec_ secret and print it (shown only this once)
    #[arg(long)]
    generate_secret: bool,
    /// Keep signing with the old secret too (a second signature) for this long, e.g. 1h or 2d
    /// (at most 7d), so the receiver can switch at its own pace; without it the old secret
    /// stops at once
    #[arg(long, value_name = "DURATION", value_parser = crate::time::parse_duration)]
    grace: Option<std::time::Duration>,
}

/// `hookctl hash EVENT_TYPE`.
pub async fn hash(context: &Context, event_type: &str) -> Result<(), CliError> {
    let client = context.producer("hash").await?;
    let event_hash = client.event_hash(event_type).await?;
    context.out.print(|| json!({ "event_type": event_type, "event_hash": event_hash }), || event_hash.clone());
    Ok(())
}

pub async fn run(context: &Context, command: ListenersCommand) -> Result<(), CliError> {
    let client = context.producer("listeners").await?;
    match command {
        ListenersCommand::Register(args) => register(context, &client, args).await,
        ListenersCommand::List { event_type } => {
            let listeners = list_all(&client, event_type.as_deref()).await?;
            context.out.print(
                || listeners.iter().map(listener_json).collect(),
                || table(LISTENER_HEADERS, &listeners.iter().map(listener_row).collect::<Vec<_>>()),
            );
            Ok(())
        }
        ListenersCommand::Get { listener_id } => {
            let listener = client.register().get_listener(GetListenerRequest { listener_id }).await?.into_inner();
            print_listener(context, &listener);
            Ok(())
        }
        ListenersCommand::Update(args) => {
            let enabled = match (args.enable, args.disable) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            let request = UpdateListenerRequest {
                listener_id: args.listener_id,
                url: args.url,
                description: args.description,
                enabled,
                ordered: args.ordered,
                max_per_second: args.max_per_second,
            };
            let listener = client.register().update_listener(request).await?.into_inner();
            print_listener(context, &listener);
            Ok(())
        }
        ListenersCommand::Delete { listener_id } => {
            let deleted = client.register().delete_listener(DeleteListenerRequest { listener_id }).await?.into_inner();
            context.out.print(
                || json!({ "deleted": deleted.listener_id }),
                || format!("deleted listener {}", deleted.listener_id),
            );
            Ok(())
        }
        ListenersCommand::RotateSecret(args) => {
            let request = RotateListenerSecretRequest {
                listener_id: args.listener_id,
                secret: secret_given(args.secret, args.secret_file).await?,
                generate_secret: args.generate_secret,
                grace_seconds: args.grace.map_or(0, |grace| u32::try_from(grace.as_secs()).unwrap_or(u32::MAX)),
            };
            let answer = client.register().rotate_listener_secret(request).await?.into_inner();
            let listener = answer.listener.ok_or(CliError::Incomplete("listener"))?;
            print_with_secret(context, &listener, &answer.secret, "the listener's new secret");
            Ok(())
        }
    }
}

async fn register(context: &Context, client: &Client, args: RegisterArgs) -> Result<(), CliError> {
    let event_hash = client.event_hash(&args.event_type).await?;
    let request = RegisterListenerRequest {
        event_hash,
        url: args.url,
        secret: secret_given(args.secret, args.secret_file).await?,
        generate_secret: args.generate_secret,
        description: args.description.unwrap_or_default(),
        ordered: args.ordered,
        max_per_second: args.max_per_second.unwrap_or(0),
    };
    let answer = client.register().register_listener(request).await?.into_inner();
    let listener = answer.listener.ok_or(CliError::Incomplete("listener"))?;
    print_with_secret(context, &listener, &answer.secret, "the listener's secret");
    Ok(())
}

/// The secret given on the command line, or read from `file` (`-`: standard input) without
/// the line end that closes it.
async fn secret_given(secret: Option<String>, file: Option<PathBuf>) -> Result<Option<String>, CliError> {
    use tokio::io::AsyncReadExt as _;
    let Some(path) = file else { return Ok(secret) };
    let mut text = String::new();
    if path.as_os_str() == "-" {
        tokio::io::stdin().read_to_string(&mut text).await.map_err(CliError::ReadStdin)?;
    } else {
        let bytes = tokio::fs::read(&path).await.map_err(|source| CliError::ReadFile { path: path.clone(), source })?;
        text = String::from_utf8(bytes).map_err(|_| CliError::ReadFile {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
        })?;
    }
    let line = text.strip_suffix('\n').map_or(text.as_str(), |text| text.strip_suffix('\r').unwrap_or(text));
    Ok(Some(line.to_owned()))
}

/// Prints a listener and, when hookd minted one, its secret with the warning that it is
/// shown only now.
fn print_with_secret(context: &Context, listener: &Listener, secret: &str, what: &str) {
    context.out.print(
        || {
            let mut value = json!({ "listener": listener_json(listener) });
            if !secret.is_empty() {
                value["secret"] = json!(secret);
            }
            value
        },
        || {
            let mut text = listener_fields(listener);
            if !secret.is_empty() {
                text.push_str(&format!("\n\n{what}: {secret}\nit is shown only this once: keep it now"));
            }
            text
        },
    );
}

fn print_listener(context: &Context, listener: &Listener) {
    context.out.print(|| listener_json(listener), || listener_fields(listener));
}

async fn list_all(client: &Client, event_type: Option<&str>) -> Result<Vec<Listener>, CliError> {
    let event_hash = match event_type {
        Some(event_type) => client.event_hash(event_type).await?,
        None => String::new(),
    };
    let mut listeners = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListListenersRequest { event_hash: event_hash.clone(), page_size: 1000, page_token };
        let page = client.register().list_listeners(request).await?.into_inner();
        listeners.extend(page.listeners);
        if page.next_page_token.is_empty() {
            return Ok(listeners);
        }
        page_token = page.next_page_token;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Probe {
        #[command(subcommand)]
        command: super::ListenersCommand,
    }

    fn parses(args: &[&str]) -> bool {
        Probe::try_parse_from(std::iter::once("p").chain(args.iter().copied())).is_ok()
    }

    #[test]
    fn options_that_exclude_each_other_are_refused() {
        let table = [
            (&["register", "a.b", "http://x", "--secret", "s3cret-s3cret"][..], true),
            (&["register", "a.b", "http://x", "--secret", "s3cret-s3cret", "--generate-secret"], false),
            (&["update", "lst_1"], false),
            (&["update", "lst_1", "--ordered", "true"], true),
            (&["update", "lst_1", "--ordered", "maybe"], false),
            (&["update", "lst_1", "--enable", "--disable"], false),
            (&["rotate-secret", "lst_1"], false),
            (&["rotate-secret", "lst_1", "--generate-secret"], true),
            (&["rotate-secret", "lst_1", "--generate-secret", "--secret", "s3cret-s3cret"], false),
        ];
        for (args, ok) in table {
            assert_eq!(parses(args), ok, "{args:?}");
        }
    }
}
