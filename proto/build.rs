//! Compiles `proto/*.proto` with protox (a pure-Rust protobuf compiler), so that building needs
//! no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/artifacts.proto",
        "proto/registry.proto",
        "proto/workflows.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Chunk frames and ids as `Bytes`: decoded without a copy, sent without one.
        .bytes(".sloth.artifacts.v1")
        // Buffers sized before encoding (`src/codec.rs`).
        .codec_path("crate::codec::SizedCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
