//! Prints the outcome of every delivery attempt of the producer's events as it happens.
//!
//! `HOOKD_API_KEY=hkp_... cargo run -p hookd-client --example watch`

use hookd_client::Client;
use hookd_client::v1::DeliveryState;
use tokio_stream::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::var("HOOKD_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let key = std::env::var("HOOKD_API_KEY").map_err(|_| "set HOOKD_API_KEY to a producer API key")?;
    let client = Client::connect(endpoint).await?.with_api_key(&key)?;
    let mut updates = client.watch_deliveries(None).await?;
    while let Some(update) = updates.next().await {
        let update = update?;
        let state = DeliveryState::try_from(update.state).unwrap_or(DeliveryState::Unspecified);
        println!(
            "{} -> {}: attempt {} {:?} status {} {}",
            update.event_id, update.listener_id, update.attempt, state, update.status_code, update.error
        );
    }
    Ok(())
}
