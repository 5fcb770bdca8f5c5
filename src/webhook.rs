//! Standard Webhooks signatures, shared by the server (which signs) and the client crate
//! (whose receivers verify).
//!
//! `webhook-signature: v1,<base64 of HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>`.
//! A secret `whsec_<base64>` signs with the base64's bytes; any other secret with its UTF-8
//! bytes. Pure functions: no clock (callers pass the time), no I/O.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// How far a `webhook-timestamp` may be from now, in seconds, before it is refused.
pub const TOLERANCE_SECS: i64 = 5 * 60;

/// The bytes that sign for a listener secret.
pub fn signing_key(secret: &[u8]) -> Vec<u8> {
    match secret.strip_prefix(b"whsec_") {
        // A `whsec_` secret that fails to decode signs as given, like any other string.
        Some(encoded) => STANDARD.decode(encoded).unwrap_or_else(|_| secret.to_vec()),
        None => secret.to_vec(),
    }
}

fn mac(key: &[u8], webhook_id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(webhook_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// The `webhook-signature` header value of one request.
pub fn sign(key: &[u8], webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
    format!("v1,{}", STANDARD.encode(mac(key, webhook_id, timestamp, body)))
}

/// Why a webhook request was not accepted as authentic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A `webhook-*` header is missing or not text.
    #[error("the {0} header is missing")]
    MissingHeader(&'static str),
    /// `webhook-timestamp` is not a number of seconds.
    #[error("the webhook-timestamp header is not a unix time")]
    BadTimestamp,
    /// The timestamp is more than five minutes from now: a replay, or a clock far off.
    #[error("the webhook-timestamp is too far from now ({0} s)")]
    Stale(i64),
    /// No `v1` signature in the header matches.
    #[error("no signature matches")]
    Mismatch,
}

/// Checks one request: the timestamp within [`TOLERANCE_SECS`] of `now_secs`, and one of the
/// space-separated signatures in `signatures` matching the body under `secret`.
pub fn verify(
    secret: &[u8],
    webhook_id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now_secs: i64,
) -> Result<(), VerifyError> {
    let timestamp: i64 = timestamp.trim().parse().map_err(|_| VerifyError::BadTimestamp)?;
    let skew = now_secs.saturating_sub(timestamp);
    if skew.abs() > TOLERANCE_SECS {
        return Err(VerifyError::Stale(skew));
    }
    let expected = mac(&signing_key(secret), webhook_id, timestamp, body);
    let matches = signatures.split(' ').filter_map(|part| part.split_once(',')).any(|(version, encoded)| {
        version == "v1"
            && STANDARD.decode(encoded).is_ok_and(|given| {
                given.len() == expected.len()
                    && given.iter().zip(expected.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
            })
    });
    if matches { Ok(()) } else { Err(VerifyError::Mismatch) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // Checked with the reference Python library.
        assert_eq!(sign(&signing_key(SECRET), ID, TIMESTAMP, BODY), SIGNATURE);
    }

    #[test]
    fn plain_secrets_sign_with_their_bytes() {
        assert_eq!(signing_key(b"plain-secret"), b"plain-secret");
        let a = sign(b"plain-secret", "evt_1", 1, b"{}");
        assert_ne!(a, sign(b"other-secret", "evt_1", 1, b"{}"));
        assert_ne!(a, sign(b"plain-secret", "evt_1", 2, b"{}"));
        assert_ne!(a, sign(b"plain-secret", "evt_1", 1, b"{ }"));
    }

    #[test]
    fn verification() {
        let ts = TIMESTAMP.to_string();
        assert_eq!(verify(SECRET, ID, &ts, SIGNATURE, BODY, TIMESTAMP + 10), Ok(()));
        let several = format!("v1,bm90IGl0 v2,ignored {SIGNATURE}");
        assert_eq!(verify(SECRET, ID, &ts, &several, BODY, TIMESTAMP), Ok(()), "any of several signatures");
        assert_eq!(verify(SECRET, ID, &ts, SIGNATURE, b"{\"test\": 1}", TIMESTAMP), Err(VerifyError::Mismatch));
        assert_eq!(verify(b"whsec_b3RoZXI=", ID, &ts, SIGNATURE, BODY, TIMESTAMP), Err(VerifyError::Mismatch));
        assert_eq!(verify(SECRET, "msg_other", &ts, SIGNATURE, BODY, TIMESTAMP), Err(VerifyError::Mismatch));
        assert_eq!(verify(SECRET, ID, &ts, SIGNATURE, BODY, TIMESTAMP + 301), Err(VerifyError::Stale(301)));
        assert_eq!(verify(SECRET, ID, &ts, SIGNATURE, BODY, TIMESTAMP - 301), Err(VerifyError::Stale(-301)));
        assert_eq!(verify(SECRET, ID, "soon", SIGNATURE, BODY, TIMESTAMP), Err(VerifyError::BadTimestamp));
        assert_eq!(verify(SECRET, ID, &ts, "v1,!!!", BODY, TIMESTAMP), Err(VerifyError::Mismatch));
    }
}
