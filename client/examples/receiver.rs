//! A webhook receiver that verifies every request's signature before using it.
//!
//! `HOOKD_SECRET=whsec_... cargo run -p hookd-client --example receiver` listens on
//! 127.0.0.1:8080; register `http://127.0.0.1:8080/hooks` as a listener with that secret.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

async fn handle(secret: &str, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let headers = request.headers().clone();
    let Ok(body) = request.into_body().collect().await.map(|body| body.to_bytes()) else {
        return Ok(answer(StatusCode::BAD_REQUEST, "unreadable body"));
    };
    // Verify the raw bytes before parsing anything.
    if let Err(error) = hookd_client::verify(secret, &headers, &body) {
        eprintln!("refused: {error}");
        return Ok(answer(StatusCode::UNAUTHORIZED, "bad signature"));
    }
    let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let event_type = headers.get("hookd-event-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    // Delivery is at least once: a real receiver skips ids it has already handled.
    println!("{id} {event_type}: {}", String::from_utf8_lossy(&body));
    Ok(answer(StatusCode::NO_CONTENT, ""))
}

fn answer(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret: &'static str =
        Box::leak(std::env::var("HOOKD_SECRET").map_err(|_| "set HOOKD_SECRET")?.into_boxed_str());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    println!("listening on http://127.0.0.1:8080/hooks");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(secret, request));
            if let Err(error) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                eprintln!("connection error: {error}");
            }
        });
    }
}
