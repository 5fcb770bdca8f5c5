//! Gives an oversized request hookd's own answer. tonic refuses a message above the decode
//! limit with OUT_OF_RANGE before any service sees it; callers of hookd are promised
//! RESOURCE_EXHAUSTED for "over a limit", so this layer rewrites that one status on its way
//! out. It touches no other response.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

/// The status tonic gives a message over the decode limit.
const OUT_OF_RANGE: &str = "11";
const RESOURCE_EXHAUSTED: &str = "8";
/// The start of tonic's message for that case (tonic-0.14 `codec/decode.rs`).
const TOO_LARGE: &str = "Error, decoded message length too large";

#[derive(Debug, Clone, Copy, Default)]
pub struct OversizeLayer;

impl<S> Layer<S> for OversizeLayer {
    type Service = Oversize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Oversize(inner)
    }
}

#[derive(Debug, Clone)]
pub struct Oversize<S>(S);

impl<S, RequestBody, ResponseBody> Service<Request<RequestBody>> for Oversize<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        let answer = self.0.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            rewrite(response.headers_mut());
            Ok(response)
        })
    }
}

fn rewrite(headers: &mut http::HeaderMap) {
    let too_large = headers.get("grpc-status").is_some_and(|status| status == OUT_OF_RANGE)
        && headers
            .get("grpc-message")
            .and_then(|message| message.to_str().ok())
            .is_some_and(|message| percent_decoded(message).starts_with(TOO_LARGE));
    if too_large {
        headers.insert("grpc-status", HeaderValue::from_static(RESOURCE_EXHAUSTED));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("the request is larger than this server accepts (see --max-payload-bytes)"),
        );
    }
}

/// The same rewrite for a status met inside a stream (a message too large mid-stream).
pub fn too_large_as_exhausted(status: tonic::Status) -> tonic::Status {
    if status.code() == tonic::Code::OutOfRange && status.message().starts_with(TOO_LARGE) {
        tonic::Status::resource_exhausted("a message is larger than this server accepts (see --max-payload-bytes)")
    } else {
        status
    }
}

/// Undoes the percent-encoding gRPC applies to `grpc-message`.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = bytes.get(index + 1..index + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[index], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                index += 3;
            }
            (byte, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_too_large_status_is_rewritten() {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from_static("11"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("Error,%20decoded%20message%20length%20too%20large:%20found%209%20bytes"),
        );
        rewrite(&mut headers);
        assert_eq!(headers["grpc-status"], "8");

        let mut other = http::HeaderMap::new();
        other.insert("grpc-status", HeaderValue::from_static("11"));
        other.insert("grpc-message", HeaderValue::from_static("something else"));
        rewrite(&mut other);
        assert_eq!(other["grpc-status"], "11");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decoded("a%20b%zz%"), "a b%zz%");
    }
}
