//! hookd's gRPC contract: the Rust types and service stubs generated from `proto/hookd/v1`,
//! the codec they use ([`codec`]) and the Standard Webhooks signature scheme ([`webhook`]).
//!
//! The server and the client crate both build on these; nothing else lives here. The
//! encoded file descriptor set is exported for server reflection.

pub mod codec;
pub mod webhook;

/// Package `hookd.v1`: every message, enum, client and server of the API.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("hookd.v1");
}

/// The encoded `FileDescriptorSet` of `proto/hookd/v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("hookd_descriptor");
