//! Generates the gRPC code for the etcd v3 API and concord's peer and groups services, and
//! serde (proto3 JSON) impls for the etcd messages, used by the JSON gateway.
//! A vendored `protoc` is used so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let descriptors = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("descriptors.bin");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .file_descriptor_set_path(&descriptors)
        .compile_protos(
            &[
                "proto/etcd/kv.proto",
                "proto/etcd/auth.proto",
                "proto/etcd/rpc.proto",
                "proto/etcd/v3lock.proto",
                "proto/etcd/v3election.proto",
                "proto/concord/peer.proto",
                "proto/concord/groups.proto",
                "proto/concord/queue.proto",
                "proto/concord/blob.proto",
            ],
            &["proto"],
        )?;
    // grpc-gateway's encoding as etcd configures it: original (snake_case) field
    // names, int64 as strings, bytes as base64, enums by name, defaults omitted.
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .preserve_proto_field_names()
        .build(&[".etcdserverpb", ".mvccpb", ".authpb", ".v3lockpb", ".v3electionpb"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
