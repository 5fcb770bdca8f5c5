//! Input rules shared by the API services: pure functions from raw request fields to
//! checked values, each failing with a message that says what is allowed.
//!
//! Nothing here does I/O or knows about gRPC; the API layer turns a [`Invalid`] into
//! `INVALID_ARGUMENT`.

use base64::Engine as _;

/// Longest event type, in characters.
pub const MAX_EVENT_TYPE_LEN: usize = 128;
/// Longest listener URL, in characters.
pub const MAX_URL_LEN: usize = 2048;
/// Default and largest page sizes of every List call.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;
const MAX_NAME_LEN: usize = 128;
const MAX_TEXT_LEN: usize = 512;
const MAX_HEADERISH_LEN: usize = 255;

/// Why an input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(message: impl Into<String>) -> Invalid {
    Invalid(message.into())
}

/// 1–128 characters of `[A-Za-z0-9._:-]`.
pub fn event_type(value: &str) -> Result<&str, Invalid> {
    if value.is_empty() || value.len() > MAX_EVENT_TYPE_LEN {
        return Err(invalid(format!("event_type must be 1 to {MAX_EVENT_TYPE_LEN} characters, not {}", value.len())));
    }
    if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))) {
        return Err(invalid(format!("event_type may hold only A-Z a-z 0-9 . _ : - (found {bad:?})")));
    }
    Ok(value)
}

/// An http(s) URL of at most 2048 characters, with a host and no credentials.
pub fn listener_url(value: &str) -> Result<String, Invalid> {
    if value.len() > MAX_URL_LEN {
        return Err(invalid(format!("url must be at most {MAX_URL_LEN} characters")));
    }
    let url = url::Url::parse(value).map_err(|error| invalid(format!("url is not a valid URL: {error}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!("url must be http or https, not {}", url.scheme())));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("url must not carry a user name or password"));
    }
    if url.host().is_none() {
        return Err(invalid("url must name a host"));
    }
    // Normalising can percent-encode a URL past the limit.
    if url.as_str().len() > MAX_URL_LEN {
        return Err(invalid(format!("url must be at most {MAX_URL_LEN} characters once normalised")));
    }
    Ok(url.to_string())
}

/// A signing secret: `whsec_` + base64 of 16 to 64 bytes, or any other string of 8 to 256
/// characters. Returned unchanged (it is sealed as given).
pub fn listener_secret(value: &str) -> Result<&str, Invalid> {
    if let Some(encoded) = value.strip_prefix("whsec_") {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| invalid("secret starting with whsec_ must continue with standard base64"))?;
        if !(16..=64).contains(&bytes.len()) {
            return Err(invalid(format!("a whsec_ secret must hold 16 to 64 bytes, not {}", bytes.len())));
        }
    } else if !(8..=256).contains(&value.chars().count()) {
        return Err(invalid("secret must be 8 to 256 characters (or whsec_ + base64)"));
    }
    Ok(value)
}

/// The secret choice of a request: given, generated, or none (both at once is refused).
pub fn secret_choice(secret: Option<&str>, generate: bool) -> Result<Option<SecretChoice<'_>>, Invalid> {
    match (secret, generate) {
        (Some(_), true) => Err(invalid("give either secret or generate_secret, not both")),
        (Some(secret), false) => Ok(Some(SecretChoice::Given(listener_secret(secret)?))),
        (None, true) => Ok(Some(SecretChoice::Generate)),
        (None, false) => Ok(None),
    }
}

/// Where a listener's secret comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretChoice<'a> {
    Given(&'a str),
    Generate,
}

/// A content type (default `application/json`): at most 255 printable ASCII characters.
pub fn content_type(value: &str) -> Result<String, Invalid> {
    if value.is_empty() {
        return Ok("application/json".to_owned());
    }
    headerish("content_type", value).map(str::to_owned)
}

/// An optional idempotency key: at most 255 printable ASCII characters; empty means none.
pub fn idempotency_key(value: &str) -> Result<Option<String>, Invalid> {
    if value.is_empty() {
        return Ok(None);
    }
    headerish("idempotency_key", value).map(|v| Some(v.to_owned()))
}

fn headerish<'a>(field: &str, value: &'a str) -> Result<&'a str, Invalid> {
    if value.len() > MAX_HEADERISH_LEN || !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(invalid(format!("{field} must be at most {MAX_HEADERISH_LEN} printable ASCII characters")));
    }
    Ok(value)
}

/// A producer name: 1–128 characters.
pub fn producer_name(value: &str) -> Result<&str, Invalid> {
    let len = value.chars().count();
    if len == 0 || len > MAX_NAME_LEN {
        return Err(invalid(format!("name must be 1 to {MAX_NAME_LEN} characters")));
    }
    Ok(value)
}

/// Free text (description, reason): at most 512 characters.
pub fn free_text<'a>(field: &str, value: &'a str) -> Result<&'a str, Invalid> {
    if value.chars().count() > MAX_TEXT_LEN {
        return Err(invalid(format!("{field} must be at most {MAX_TEXT_LEN} characters")));
    }
    Ok(value)
}

/// Highest per-listener rate limit, in requests a second.
pub const MAX_LISTENER_RATE: u32 = 100_000;

/// A listener's rate limit: 0 (none) up to [`MAX_LISTENER_RATE`].
pub fn max_per_second(value: u32) -> Result<u32, Invalid> {
    if value > MAX_LISTENER_RATE {
        return Err(invalid(format!("max_per_second must be at most {MAX_LISTENER_RATE}, not {value}")));
    }
    Ok(value)
}

/// A page size: 0 means the default; more than the maximum is refused.
pub fn page_size(value: u32) -> Result<usize, Invalid> {
    match usize::try_from(value).unwrap_or(usize::MAX) {
        0 => Ok(DEFAULT_PAGE_SIZE),
        size if size <= MAX_PAGE_SIZE => Ok(size),
        size => Err(invalid(format!("page_size must be at most {MAX_PAGE_SIZE}, not {size}"))),
    }
}

/// Page tokens are the last id of the previous page, base64url encoded so callers treat them
/// as opaque.
pub fn encode_page_token(last_id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last_id)
}

/// The id a page token stands for; `None` for the first page.
pub fn page_token(value: &str) -> Result<Option<String>, Invalid> {
    if value.is_empty() {
        return Ok(None);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        // Positions are ids and numbers: no control characters (a database refuses NUL).
        .filter(|position| !position.chars().any(char::is_control))
        .map(Some)
        .ok_or_else(|| invalid("page_token is not one this server issued"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types() {
        for ok in ["a", "project.created", "A-b_c:d.e", &"x".repeat(128)] {
            assert_eq!(event_type(ok), Ok(ok));
        }
        for bad in ["", "has space", "slash/no", "ünicode", &"x".repeat(129), "nul\0"] {
            assert!(event_type(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn urls() {
        assert_eq!(listener_url("https://example.com/hook").unwrap(), "https://example.com/hook");
        assert!(listener_url("http://127.0.0.1:8080/x?y=1").is_ok());
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        for bad in
            ["ftp://example.com", "https://user:pw@example.com/", "https://user@example.com/", "not a url", "", &long]
        {
            assert!(listener_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secrets() {
        assert!(listener_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        assert!(listener_secret("plain-secret").is_ok());
        for bad in ["short", "whsec_!!!", "whsec_AAAA", &"x".repeat(257)] {
            assert!(listener_secret(bad).is_err(), "{bad:?}");
        }
        assert_eq!(secret_choice(None, false), Ok(None));
        assert_eq!(secret_choice(None, true), Ok(Some(SecretChoice::Generate)));
        assert_eq!(secret_choice(Some("plain-secret"), false), Ok(Some(SecretChoice::Given("plain-secret"))));
        assert!(secret_choice(Some("plain-secret"), true).is_err());
        assert!(secret_choice(Some(""), false).is_err());
    }

    #[test]
    fn content_types_and_keys() {
        assert_eq!(content_type("").unwrap(), "application/json");
        assert_eq!(content_type("text/plain; charset=utf-8").unwrap(), "text/plain; charset=utf-8");
        assert!(content_type("bad\r\nheader: injected").is_err());
        assert_eq!(idempotency_key("").unwrap(), None);
        assert_eq!(idempotency_key("order-1").unwrap().as_deref(), Some("order-1"));
        assert!(idempotency_key(&"k".repeat(256)).is_err());
    }

    #[test]
    fn pages() {
        assert_eq!(page_size(0), Ok(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(1000), Ok(1000));
        assert!(page_size(1001).is_err());
        assert_eq!(page_token(""), Ok(None));
        assert_eq!(page_token(&encode_page_token("lst_1")), Ok(Some("lst_1".into())));
        assert!(page_token("***").is_err());
        // A NUL, which PostgreSQL refuses in text: refused here as not ours.
        assert!(page_token("AA").is_err() && page_token(&encode_page_token("dlv_\u{0}")).is_err());
    }

    #[test]
    fn names_and_text() {
        assert!(producer_name("").is_err());
        assert!(producer_name("billing").is_ok());
        assert!(free_text("description", &"d".repeat(512)).is_ok());
        assert!(free_text("description", &"d".repeat(513)).is_err());
    }
}
