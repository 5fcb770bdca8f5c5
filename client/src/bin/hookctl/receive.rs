//! `hookctl receive`: a local HTTP receiver for trying listeners out. It prints every request
//! it gets and, given the listener's secret, checks its Standard Webhooks signature first.
//!
//! It answers 204 to what it accepts and 401 to a request whose signature does not verify,
//! so hookd records a failed attempt exactly as it would for a real receiver. It never talks
//! to hookd and never keeps what it receives.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::Context;
use crate::error::CliError;
use crate::output::{Output, bytes_as_text, one_line, print_line};

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// The address to listen on; port 0 picks a free one (the URL is printed first)
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDRESS")]
    listen: String,
    /// The listener's secret (whsec_... or the plain string it was registered with): every
    /// request's signature is verified and a bad one is answered 401. Without it, requests
    /// are printed unchecked
    #[arg(long, env = "HOOKD_SECRET", hide_env_values = true)]
    secret: Option<String>,
}

pub async fn run(context: &Context, args: ReceiveArgs) -> Result<(), CliError> {
    let listen_error = |source| CliError::Listen { address: args.listen.clone(), source };
    let listener = tokio::net::TcpListener::bind(&args.listen).await.map_err(listen_error)?;
    let url = format!("http://{}/", listener.local_addr().map_err(listen_error)?);
    context.out.print(
        || json!({ "listening": url }),
        || format!("listening on {url} (register this url as a listener; ctrl-c to stop)"),
    );
    let secret: Option<Arc<str>> = args.secret.map(Arc::from);
    let out = context.out;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: this connection is lost, not the receiver.
                Err(error) => {
                    eprintln!("cannot accept a connection: {error}");
                    continue;
                }
            },
            _ = &mut ctrl_c => return Ok(()),
        };
        let secret = secret.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(out, secret.clone(), request));
            if let Err(error) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                eprintln!("connection error: {error}");
            }
        });
    }
}

async fn handle(
    out: Output,
    secret: Option<Arc<str>>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let headers = request.headers().clone();
    let Ok(body) = request.into_body().collect().await.map(|body| body.to_bytes()) else {
        eprintln!("cannot read a request body");
        return Ok(answer(StatusCode::BAD_REQUEST, "unreadable body"));
    };
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or_default().to_owned();
    // The raw bytes are verified before anything else is made of them.
    let verdict = secret.as_deref().map(|secret| hookd_client::verify(secret, &headers, &body));
    let status = match verdict {
        Some(Err(_)) => StatusCode::UNAUTHORIZED,
        _ => StatusCode::NO_CONTENT,
    };
    let (text, encoding) = bytes_as_text(&body);
    let signature = match &verdict {
        None => "unchecked".to_owned(),
        Some(Ok(())) => "verified".to_owned(),
        Some(Err(error)) => format!("refused ({error}), answered 401"),
    };
    let line = if out.json {
        json!({
            "webhook_id": header("webhook-id"),
            "event_type": header("hookd-event-type"),
            "delivery_id": header("hookd-delivery-id"),
            "attempt": header("hookd-attempt"),
            "content_type": header("content-type"),
            "verified": verdict.as_ref().map(Result::is_ok),
            "error": verdict.as_ref().and_then(|verdict| verdict.as_ref().err()).map(ToString::to_string),
            "status": status.as_u16(),
            "body": text,
            "body_encoding": encoding,
        })
        .to_string()
    } else {
        let body = if encoding == "utf8" { one_line(&text) } else { format!("(base64) {text}") };
        format!(
            "{}  {}  attempt {}  {signature}  {body}",
            header("webhook-id"),
            header("hookd-event-type"),
            header("hookd-attempt")
        )
    };
    print_line(&line);
    Ok(answer(status, if status == StatusCode::UNAUTHORIZED { "bad signature" } else { "" }))
}

fn answer(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}
