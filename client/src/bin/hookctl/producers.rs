//! `hookctl producers ...`: the AdminService commands, all with the admin token.
//!
//! An API key appears only in the answer that mints it (create, rotate-key), and this module
//! says so to the user; it never stores or logs a key.

use std::time::Duration;

use clap::Subcommand;
use hookd_client::v1::{GetProducerRequest, ListProducersRequest, Producer, RotateProducerKeyRequest};
use serde_json::json;

use crate::Context;
use crate::error::CliError;
use crate::output::{PRODUCER_HEADERS, producer_fields, producer_json, producer_row, table};
use crate::time::{format_duration, parse_duration};

#[derive(Debug, Subcommand)]
pub enum ProducersCommand {
    /// Create a producer and mint its API key (shown only this once)
    Create {
        /// A name for people, 1 to 128 characters
        name: String,
    },
    /// List every producer, oldest first
    List,
    /// Show one producer
    Get {
        /// The producer's id (prd_...)
        producer_id: String,
    },
    /// Disable a producer at once: its calls are refused with PERMISSION_DENIED from now on
    /// (its listeners are kept)
    Disable {
        /// The producer's id (prd_...)
        producer_id: String,
        /// Why, kept and shown with the producer (at most 512 characters)
        #[arg(long)]
        reason: String,
    },
    /// Enable a disabled producer again
    Enable {
        /// The producer's id (prd_...)
        producer_id: String,
    },
    /// Mint a new API key (shown only this once); listeners and event hashes are unchanged
    RotateKey {
        /// The producer's id (prd_...)
        producer_id: String,
        /// How long the old key keeps working, e.g. 1h (at most 30d); 0 stops it at once,
        /// as after a leak
        #[arg(long, default_value = "0", value_parser = parse_duration)]
        grace: Duration,
    },
}

pub async fn run(context: &Context, command: ProducersCommand) -> Result<(), CliError> {
    let client = context.admin("producers").await?;
    let out = context.out;
    match command {
        ProducersCommand::Create { name } => {
            let (producer, api_key) = client.create_producer(&name).await?;
            out.print(
                || json!({ "producer": producer_json(&producer), "api_key": api_key }),
                || {
                    format!(
                        "created producer {} ({})\napi key: {api_key}\nthe api key is shown only this once: keep it now",
                        producer.id, producer.name
                    )
                },
            );
        }
        ProducersCommand::List => {
            let producers = list_all(&client).await?;
            out.print(
                || producers.iter().map(producer_json).collect(),
                || table(PRODUCER_HEADERS, &producers.iter().map(producer_row).collect::<Vec<_>>()),
            );
        }
        ProducersCommand::Get { producer_id } => {
            let producer = client.admin().get_producer(GetProducerRequest { producer_id }).await?.into_inner();
            print_producer(context, &producer);
        }
        ProducersCommand::Disable { producer_id, reason } => {
            let producer = client.disable_producer(&producer_id, &reason).await?;
            print_producer(context, &producer);
        }
        ProducersCommand::Enable { producer_id } => {
            let producer = client.enable_producer(&producer_id).await?;
            print_producer(context, &producer);
        }
        ProducersCommand::RotateKey { producer_id, grace } => {
            // The server takes whole seconds; a longer grace than it allows is its to refuse.
            let grace_seconds = u32::try_from(grace.as_secs()).unwrap_or(u32::MAX);
            let request = RotateProducerKeyRequest { producer_id: producer_id.clone(), grace_seconds };
            let api_key = client.admin().rotate_producer_key(request).await?.into_inner().api_key;
            let old_key = if grace.is_zero() {
                "the old key stopped working".to_owned()
            } else {
                format!("the old key keeps working for {}", format_duration(grace))
            };
            out.print(
                || json!({ "producer_id": producer_id, "api_key": api_key, "grace_seconds": grace_seconds }),
                || format!("new api key: {api_key}\nit is shown only this once: keep it now; {old_key}"),
            );
        }
    }
    Ok(())
}

fn print_producer(context: &Context, producer: &Producer) {
    context.out.print(|| producer_json(producer), || producer_fields(producer));
}

async fn list_all(client: &hookd_client::Client) -> Result<Vec<Producer>, CliError> {
    let mut producers = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListProducersRequest { page_size: 1000, page_token };
        let page = client.admin().list_producers(request).await?.into_inner();
        producers.extend(page.producers);
        if page.next_page_token.is_empty() {
            return Ok(producers);
        }
        page_token = page.next_page_token;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rotate_key_reads_grace_as_a_duration() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Probe {
            #[command(subcommand)]
            command: super::ProducersCommand,
        }
        let parsed = Probe::try_parse_from(["p", "rotate-key", "prd_1", "--grace", "1h"]).unwrap();
        let super::ProducersCommand::RotateKey { grace, .. } = parsed.command else { panic!("not rotate-key") };
        assert_eq!(grace, std::time::Duration::from_secs(3600));
        assert!(Probe::try_parse_from(["p", "rotate-key", "prd_1", "--grace", "soon"]).is_err());
        assert!(Probe::try_parse_from(["p", "disable", "prd_1"]).is_err(), "--reason is required");
    }
}
