//! Compiles the gRPC contract in `proto/` without a system `protoc`: protox parses the files,
//! the encoded descriptor set is kept in `OUT_DIR` for server reflection, and tonic-prost-build
//! generates the Rust types and service stubs from the same descriptors.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/hookd/v1/admin.proto",
    "proto/hookd/v1/register.proto",
    "proto/hookd/v1/trigger.proto",
    "proto/hookd/v1/delivery.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out_dir.join("hookd_descriptor.bin"), fds.encode_to_vec())?;
    // Decode failures of requests are the caller's fault: INVALID_ARGUMENT (see src/codec.rs).
    tonic_prost_build::configure().codec_path("crate::codec::ProtoCodec").compile_fds(fds)?;
    Ok(())
}
