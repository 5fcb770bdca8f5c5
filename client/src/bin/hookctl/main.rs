//! `hookctl`: hookd from the command line. Manage producers and listeners, trigger events,
//! see what happened to them, mend what failed, and receive webhooks locally.
//!
//! This file owns the command line (clap) and the choice of credentials and connection; each
//! command lives in the module of its resource. Nothing here prints an answer: the commands
//! do, through `output`. Exit codes: 0 done, 1 the command failed (`error: ...` on stderr),
//! 2 the command line is wrong (clap's own report).

mod delivery;
mod error;
mod listeners;
mod mend;
mod output;
mod producers;
mod receive;
mod time;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use hookd_client::Client;

use error::CliError;
use output::Output;

const EXAMPLES: &str = "\
Examples:
  hookctl --token \"$ADMIN_TOKEN\" producers create shop      # prints the producer's API key once
  export HOOKD_API_KEY=hkp_...
  hookctl receive --listen 127.0.0.1:0 --secret my-signing-secret   # in another terminal
  hookctl listeners register order.placed http://127.0.0.1:PORT/ --secret my-signing-secret
  hookctl trigger order.placed '{\"order\": 42}'
  hookctl deliveries --event evt_...
  hookctl attempts dlv_...";

/// Manage and inspect a hookd webhook delivery server.
///
/// Which credential a command uses:
///   producers ...                      the admin token (--token, HOOKD_TOKEN)
///   hash, listeners, trigger, watch    a producer's API key (--api-key, HOOKD_API_KEY)
///   events, event, deliveries,         the admin token when given (every producer's events),
///   attempts, retry, replay, recover   else the API key (that producer's only)
///   receive                            none
#[derive(Debug, Parser)]
#[command(name = "hookctl", version, max_term_width = 100, verbatim_doc_comment, after_long_help = EXAMPLES)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
struct Global {
    /// hookd's gRPC address; an https:// address uses TLS (with the system's and the web's
    /// root certificates, unless --ca says otherwise)
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "HOOKD_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,
    /// Trust only the certificate authority in this PEM file (for an https:// address)
    #[arg(long, global = true, help_heading = "Global options", env = "HOOKD_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The admin token: needed by `producers`, preferred by the delivery commands
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "HOOKD_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// A producer's API key: needed by hash, listeners, trigger and watch
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "HOOKD_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    api_key: Option<String>,
    /// Print JSON for scripts instead of tables: one JSON value per command, or one JSON
    /// object per line for `watch` and `receive`
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, disable, enable producers and rotate their API keys (admin token)
    Producers {
        #[command(subcommand)]
        command: producers::ProducersCommand,
    },
    /// Print the event hash of an event type (DeriveEventHash; API key)
    Hash {
        /// The event type, e.g. order.placed
        event_type: String,
    },
    /// Register, list, update and delete listeners (API key)
    Listeners {
        #[command(subcommand)]
        command: listeners::ListenersCommand,
    },
    /// Trigger an event; prints its id once it is durable (API key)
    Trigger(delivery::TriggerArgs),
    /// List events, oldest first (admin token or API key)
    Events(delivery::EventsArgs),
    /// Show one event with its payload (admin token or API key)
    Event {
        /// The event's id (evt_...)
        event_id: String,
    },
    /// List the deliveries of an event or of a listener (admin token or API key)
    Deliveries(delivery::DeliveriesArgs),
    /// List the attempts of a delivery: when, outcome, duration, response body (admin token or
    /// API key)
    Attempts {
        /// The delivery's id (dlv_...)
        delivery_id: String,
    },
    /// Make one manual attempt of a delivery now, whatever its state (admin token or API key)
    Retry {
        /// The delivery's id (dlv_...)
        delivery_id: String,
    },
    /// Deliver an event again to its current listeners, as new deliveries (admin token or API
    /// key)
    Replay(mend::ReplayArgs),
    /// Re-queue a listener's failed deliveries created in a time window (admin token or API
    /// key)
    Recover(mend::RecoverArgs),
    /// Print each delivery outcome of your events as it happens, until Ctrl-C (API key)
    Watch {
        /// Only this event's deliveries
        #[arg(long, value_name = "EVENT_ID")]
        event: Option<String>,
    },
    /// Run a local webhook receiver that prints (and with a secret, verifies) each request
    Receive(receive::ReceiveArgs),
}

/// What a command needs to run: the global options and where its answer goes.
pub struct Context {
    addr: String,
    ca: Option<PathBuf>,
    token: Option<String>,
    api_key: Option<String>,
    /// How to print answers.
    pub out: Output,
}

impl Context {
    /// A client holding the admin token, for `producers` commands.
    pub async fn admin(&self, command: &'static str) -> Result<Client, CliError> {
        let token = self.token.as_deref().ok_or(CliError::MissingCredential {
            command,
            what: "the admin token",
            flag: "--token",
            env: "HOOKD_TOKEN",
        })?;
        Ok(self.connect().await?.with_api_key(token)?)
    }

    /// A client holding the producer's API key.
    pub async fn producer(&self, command: &'static str) -> Result<Client, CliError> {
        let key = self.api_key.as_deref().ok_or(CliError::MissingCredential {
            command,
            what: "a producer's API key",
            flag: "--api-key",
            env: "HOOKD_API_KEY",
        })?;
        Ok(self.connect().await?.with_api_key(key)?)
    }

    /// A client for DeliveryService calls: the admin token when given (it sees every event),
    /// else the producer's API key.
    pub async fn inspector(&self, command: &'static str) -> Result<Client, CliError> {
        let key = self.token.as_deref().or(self.api_key.as_deref()).ok_or(CliError::MissingCredential {
            command,
            what: "the admin token or a producer's API key",
            flag: "--token or --api-key",
            env: "HOOKD_TOKEN or HOOKD_API_KEY",
        })?;
        Ok(self.connect().await?.with_api_key(key)?)
    }

    async fn connect(&self) -> Result<Client, CliError> {
        let connected = match &self.ca {
            Some(path) => {
                if !self.addr.starts_with("https://") {
                    return Err(CliError::CaWithoutTls(self.addr.clone()));
                }
                let pem = std::fs::read(path).map_err(|source| CliError::ReadFile { path: path.clone(), source })?;
                Client::connect_with_ca(self.addr.clone(), pem).await
            }
            None => Client::connect(self.addr.clone()).await,
        };
        connected.map_err(|error| match error {
            hookd_client::Error::Connect(reason) => CliError::Connect { addr: self.addr.clone(), reason },
            other => CliError::Client(other),
        })
    }
}

// One thread is plenty for one command; the receiver's requests interleave on it.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let Global { addr, ca, token, api_key, json } = cli.global;
    // An empty variable (`HOOKD_TOKEN=`) means none, not an empty credential.
    let (token, api_key) = (token.filter(|token| !token.is_empty()), api_key.filter(|key| !key.is_empty()));
    let context = Context { addr, ca, token, api_key, out: Output { json } };
    match run(&context, cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(context: &Context, command: Command) -> Result<(), CliError> {
    match command {
        Command::Producers { command } => producers::run(context, command).await,
        Command::Hash { event_type } => listeners::hash(context, &event_type).await,
        Command::Listeners { command } => listeners::run(context, command).await,
        Command::Trigger(args) => delivery::trigger(context, args).await,
        Command::Events(args) => delivery::events(context, args).await,
        Command::Event { event_id } => delivery::event(context, &event_id).await,
        Command::Deliveries(args) => delivery::deliveries(context, args).await,
        Command::Attempts { delivery_id } => delivery::attempts(context, &delivery_id).await,
        Command::Retry { delivery_id } => mend::retry(context, &delivery_id).await,
        Command::Replay(args) => mend::replay(context, args).await,
        Command::Recover(args) => mend::recover(context, args).await,
        Command::Watch { event } => delivery::watch(context, event).await,
        Command::Receive(args) => receive::run(context, args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
