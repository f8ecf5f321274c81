//! Generated gRPC types and services of package `baton.v1`.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("baton.v1");

    /// Encoded descriptor set of all baton.v1 protos, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/baton_descriptor.bin"));
}
