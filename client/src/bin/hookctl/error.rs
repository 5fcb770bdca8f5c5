//! hookctl's error type: everything that makes a command fail, each with the message a user
//! reads after `error: `.
//!
//! Usage mistakes that clap can see are not here: clap reports them and exits with 2. This
//! module never prints; `main` does, once.

use std::path::PathBuf;

use tonic::Code;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// hookd answered with an error status.
    #[error("{} ({})", status_message(.0), code_name(.0.code()))]
    Status(#[from] tonic::Status),
    /// hookd could not be reached.
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The client library failed otherwise.
    #[error(transparent)]
    Client(#[from] hookd_client::Error),
    /// The command needs a credential that was not given.
    #[error("{command} needs {what}: pass {flag} or set {env}")]
    MissingCredential { command: &'static str, what: &'static str, flag: &'static str, env: &'static str },
    /// `--ca` was given for an address without TLS.
    #[error("--ca trusts a certificate authority for TLS: it needs an https:// address, not {0}")]
    CaWithoutTls(String),
    /// A file named on the command line could not be read.
    #[error("cannot read {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Standard input could not be read.
    #[error("cannot read standard input: {0}")]
    ReadStdin(#[source] std::io::Error),
    /// The receiver could not listen.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// hookd's answer lacks a part it always sends.
    #[error("hookd's answer has no {0}")]
    Incomplete(&'static str),
    /// `--wait` gave up before the work finished.
    #[error("gave up waiting after {waited}: {done} of {total} finished")]
    WaitTimedOut { waited: String, done: u64, total: u64 },
    /// A stream ended before the command was done with it.
    #[error("the server ended the stream: {}", ended_status(.0))]
    StreamEnded(Option<tonic::Status>),
}

fn status_message(status: &tonic::Status) -> &str {
    if status.message().is_empty() { "hookd gave no message" } else { status.message() }
}

fn ended_status(status: &Option<tonic::Status>) -> String {
    match status {
        Some(status) => format!("{} ({})", status_message(status), code_name(status.code())),
        None => "without an error".to_owned(),
    }
}

/// The canonical gRPC name of a status code, as grpcurl and the gRPC docs spell it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_reads_as_its_message_and_code_name() {
        let error = CliError::from(tonic::Status::permission_denied("producer prd_1 is disabled"));
        assert_eq!(error.to_string(), "producer prd_1 is disabled (PERMISSION_DENIED)");
        let error = CliError::StreamEnded(Some(tonic::Status::unavailable("hookd is shutting down")));
        assert_eq!(error.to_string(), "the server ended the stream: hookd is shutting down (UNAVAILABLE)");
    }
}
