//! Generates the gRPC code for the etcd v3 API and concord's peer service.
//! A vendored `protoc` is used so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure().build_client(true).build_server(true).compile_protos(
        &[
            "proto/etcd/kv.proto",
            "proto/etcd/auth.proto",
            "proto/etcd/rpc.proto",
            "proto/etcd/v3lock.proto",
            "proto/etcd/v3election.proto",
            "proto/concord/peer.proto",
        ],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
