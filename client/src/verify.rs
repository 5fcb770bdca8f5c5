//! Receiver-side verification of hookd's webhook requests (Standard Webhooks).
//!
//! Use it in any HTTP handler that gives access to the headers (`http::HeaderMap`, as in axum
//! and hyper) and the raw body bytes, before parsing the body.

use std::time::{SystemTime, UNIX_EPOCH};

pub use hookd::webhook::{TOLERANCE_SECS, VerifyError};

/// Checks that a request came from hookd with the listener's `secret` (as registered:
/// `whsec_...` or a plain string): one of the `webhook-signature` values matches the body,
/// and `webhook-timestamp` is within five minutes of now (older requests are refused, which
/// stops replays).
///
/// ```
/// # fn handler(headers: &http::HeaderMap, body: &[u8]) -> Result<(), hookd_client::VerifyError> {
/// hookd_client::verify("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", headers, body)?;
/// // The body is authentic: parse and handle it; deduplicate by the webhook-id header.
/// # Ok(())
/// # }
/// ```
pub fn verify(secret: &str, headers: &http::HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    verify_at(secret, headers, body, i64::try_from(now).unwrap_or(i64::MAX))
}

/// [`verify`] at a given time (unix seconds), for tests and replays of recorded requests.
pub fn verify_at(secret: &str, headers: &http::HeaderMap, body: &[u8], now_secs: i64) -> Result<(), VerifyError> {
    let header = |name: &'static str| {
        headers.get(name).and_then(|value| value.to_str().ok()).ok_or(VerifyError::MissingHeader(name))
    };
    hookd::webhook::verify(
        secret.as_bytes(),
        header("webhook-id")?,
        header("webhook-timestamp")?,
        header("webhook-signature")?,
        body,
        now_secs,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(id: &str, timestamp: i64, signature: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("webhook-id", id.parse().unwrap());
        headers.insert("webhook-timestamp", timestamp.to_string().parse().unwrap());
        headers.insert("webhook-signature", signature.parse().unwrap());
        headers
    }

    #[test]
    fn accepts_what_the_standardwebhooks_crate_signs() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let now = 1_700_000_000;
        let body = br#"{"order": 1}"#;
        let signature = standardwebhooks::Webhook::new(secret).unwrap().sign("evt_1", now, body).unwrap();
        let signed = headers("evt_1", now, &signature);
        assert_eq!(verify_at(secret, &signed, body, now), Ok(()));

        assert_eq!(verify_at(secret, &signed, br#"{"order": 2}"#, now), Err(VerifyError::Mismatch), "tampered body");
        assert_eq!(verify_at("whsec_b3RoZXJzZWNyZXQ=", &signed, body, now), Err(VerifyError::Mismatch), "wrong secret");
        assert_eq!(verify_at(secret, &signed, body, now + 3600), Err(VerifyError::Stale(3600)), "old timestamp");
        assert_eq!(
            verify_at(secret, &http::HeaderMap::new(), body, now),
            Err(VerifyError::MissingHeader("webhook-id"))
        );
    }

    #[test]
    fn plain_secrets_verify_too() {
        let now = 1_700_000_000;
        let signature = hookd::webhook::sign(b"a-plain-secret", "evt_2", now, b"{}");
        let signed = headers("evt_2", now, &format!("v1,c29tZXRoaW5nIGVsc2U= {signature}"));
        assert_eq!(verify_at("a-plain-secret", &signed, b"{}", now), Ok(()), "one of several signatures");
    }
}
