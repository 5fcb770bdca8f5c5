//! Raw bounds measured in the same run: what the machine does with no hookd logic at all.
//! An empty unary RPC (gRPC health check) and a bidirectional echo (gRPC reflection) on a
//! trivial tonic server inside the bench, and a plain reqwest loop against the receiver.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

use crate::stats::Samples;

/// Starts the trivial server; returns its address.
pub async fn trivial_server() -> Result<SocketAddr, Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (_, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure().build_v1()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Ok(addr)
}

async fn channel(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("a valid URI").connect().await
}

/// Latency of empty unary calls, one at a time.
pub async fn unary_latency(addr: SocketAddr, calls: usize) -> Result<Samples, Box<dyn std::error::Error>> {
    let mut client = HealthClient::new(channel(addr).await?);
    let mut samples = Samples::default();
    for _ in 0..calls {
        let started = Instant::now();
        client.check(HealthCheckRequest { service: String::new() }).await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// Empty unary calls per second with `concurrency` callers for `duration`.
pub async fn unary_throughput(
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
) -> Result<f64, Box<dyn std::error::Error>> {
    let client = HealthClient::new(channel(addr).await?);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (mut client, done) = (client.clone(), done.clone());
        callers.spawn(async move {
            while started.elapsed() < duration {
                if client.check(HealthCheckRequest { service: String::new() }).await.is_err() {
                    return;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while callers.join_next().await.is_some() {}
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Messages per second through a bidirectional echo, `window` in flight.
pub async fn bidi_echo(addr: SocketAddr, messages: usize, window: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let mut client = ServerReflectionClient::new(channel(addr).await?);
    let (requests, outgoing) = tokio::sync::mpsc::channel(window);
    let started = Instant::now();
    let feeder = tokio::spawn(async move {
        for _ in 0..messages {
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            if requests.send(request).await.is_err() {
                return;
            }
        }
    });
    let mut answers = client.server_reflection_info(ReceiverStream::new(outgoing)).await?.into_inner();
    let mut received = 0;
    while received < messages {
        match answers.next().await {
            Some(Ok(_)) => received += 1,
            _ => break,
        }
    }
    feeder.abort();
    Ok(received as f64 / started.elapsed().as_secs_f64())
}

/// Requests per second of a plain reqwest loop posting `bodies` to `url`, `concurrency` at once.
pub async fn http_posts(url: &str, requests: usize, concurrency: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut posters = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, next, url) = (client.clone(), next.clone(), url.to_owned());
        posters.spawn(async move {
            while (next.fetch_add(1, Ordering::Relaxed) as usize) < requests {
                let body = crate::micros_since_epoch().to_string();
                let _ = client.post(&url).header("content-type", "application/json").body(body).send().await;
            }
        });
    }
    while posters.join_next().await.is_some() {}
    Ok(requests as f64 / started.elapsed().as_secs_f64())
}
