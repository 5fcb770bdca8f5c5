//! Publishes events over one stream and prints each durable ack.
//!
//! `HOOKD_ENDPOINT=http://127.0.0.1:50051 HOOKD_API_KEY=hkp_... cargo run -p hookd-client --example publish`

use hookd_client::{Client, Trigger};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::var("HOOKD_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let key = std::env::var("HOOKD_API_KEY").map_err(|_| "set HOOKD_API_KEY to a producer API key")?;
    let client = Client::connect(endpoint).await?.with_api_key(&key)?;

    // One unary trigger, safe to retry thanks to its idempotency key.
    let ack = client
        .send(Trigger::json("order.placed", &serde_json::json!({"order": 1}))?.idempotency_key("order-1"))
        .await?;
    println!("order-1 -> {} (duplicate: {})", ack.event_id, ack.duplicate);

    // Many in flight over one stream; each future resolves with its own ack.
    let publisher = client.publisher();
    let pending: Vec<_> = (2..=100)
        .map(|order| publisher.publish(Trigger::new("order.placed", format!("{{\"order\": {order}}}"))))
        .collect();
    for (order, ack) in (2..).zip(pending) {
        match ack.await {
            Ok(ack) => println!("order-{order} -> {}", ack.event_id),
            Err(error) if error.is_retryable() => eprintln!("order-{order}: hookd unavailable, try later: {error}"),
            Err(error) => eprintln!("order-{order}: refused: {error}"),
        }
    }
    Ok(())
}
