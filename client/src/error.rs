//! The client's error type: every failure, typed, and whether trying again can help.

use tonic::Code;

/// What went wrong with a call to hookd.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The server could not be reached, or is shutting down. Retryable.
    #[error("hookd is unavailable: {0}")]
    Unavailable(String),
    /// The call ran out of time. Retryable.
    #[error("the call timed out: {0}")]
    DeadlineExceeded(String),
    /// A limit was hit: a payload too large, or too many requests.
    #[error("over a limit: {0}")]
    ResourceExhausted(String),
    /// The request is malformed: fix it before sending it again.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No key, or an unknown or expired one.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// The producer is disabled, or the call is not allowed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// No such id (or not one of the caller's).
    #[error("not found: {0}")]
    NotFound(String),
    /// The call is not built on this server.
    #[error("not implemented by this server: {0}")]
    Unimplemented(String),
    /// Anything else the server answered.
    #[error("hookd answered {code:?}: {message}")]
    Other {
        /// The gRPC status code.
        code: Code,
        /// The server's message.
        message: String,
    },
    /// The endpoint or the connection could not be set up.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// A key or token holds characters that cannot be sent as gRPC metadata.
    #[error("the API key or token cannot be sent as metadata")]
    InvalidKey,
    /// A JSON payload could not be encoded.
    #[error("cannot encode the payload as JSON: {0}")]
    Json(String),
    /// The publisher was shut down before this item was acknowledged.
    #[error("the publisher is closed")]
    PublisherClosed,
}

impl Error {
    /// Whether sending the same call again may succeed (the server was unavailable or slow).
    /// Triggers sent again should carry the same idempotency key, so nothing is recorded twice.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::DeadlineExceeded(_) | Error::Connect(_))
    }

    /// The error for a gRPC status code and message.
    pub fn from_code(code: Code, message: impl Into<String>) -> Self {
        let message = message.into();
        match code {
            Code::Unavailable | Code::Cancelled | Code::Aborted => Error::Unavailable(message),
            Code::DeadlineExceeded => Error::DeadlineExceeded(message),
            Code::ResourceExhausted => Error::ResourceExhausted(message),
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(message),
            Code::Unauthenticated => Error::Unauthenticated(message),
            Code::PermissionDenied => Error::PermissionDenied(message),
            Code::NotFound => Error::NotFound(message),
            Code::Unimplemented => Error::Unimplemented(message),
            code => Error::Other { code, message },
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::from_code(status.code(), status.message())
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(error: tonic::transport::Error) -> Self {
        // tonic's own text is only "transport error": the causes say what went wrong.
        let mut message = error.to_string();
        let mut cause = std::error::Error::source(&error);
        while let Some(error) = cause {
            // Some layers repeat their cause's text in their own: say each thing once.
            let text = error.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            cause = error.source();
        }
        Error::Connect(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_are_retryable() {
        let table = [
            (Code::Unavailable, true),
            (Code::DeadlineExceeded, true),
            (Code::Cancelled, true),
            (Code::InvalidArgument, false),
            (Code::Unauthenticated, false),
            (Code::PermissionDenied, false),
            (Code::NotFound, false),
            (Code::ResourceExhausted, false),
            (Code::Internal, false),
        ];
        for (code, retryable) in table {
            assert_eq!(Error::from_code(code, "m").is_retryable(), retryable, "{code:?}");
        }
        assert!(Error::Connect("refused".into()).is_retryable());
    }
}
