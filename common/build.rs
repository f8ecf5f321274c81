//! Compiles the protos in proto/ without a system protoc, keeps the descriptor set for
//! server reflection, and generates serde impls that follow the protobuf JSON mapping
//! (field names as in the protos, enums by name, timestamps as RFC 3339).
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = [
        root.join("baton/v1/api.proto"),
        root.join("baton/v1/agent.proto"),
        root.join("baton/v1/admin.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let bytes = prost::Message::encode_to_vec(&fds);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("baton_descriptor.bin"), &bytes)?;
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&bytes)?
        .preserve_proto_field_names()
        .emit_fields()
        .build(&[".baton.v1"])?;
    Ok(())
}
