//! Generates the `echo` messages, client and server from `proto/echo.proto`.
//!
//! protox parses the .proto into a descriptor set in pure Rust, and tonic-prost-build turns
//! that into code: no `protoc` binary is needed or downloaded.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let descriptors = protox::compile(["echo.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // The client is built over a balancer, not a connected channel: no `connect` helper.
        .build_transport(false)
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto/echo.proto");
    Ok(())
}
