//! Generated protobuf and gRPC code, and nothing else.
//!
//! The schemas live in `proto/` at the repository root. `etcd/*.proto` are written
//! from etcd's documented v3 API (field numbers are the wire contract every etcd
//! client relies on); `concord/peer.proto` is concord's member-to-member service, `concord/groups.proto`
//! its group catalog and register service, `concord/queue.proto` its durable queues.

#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}

pub mod authpb {
    tonic::include_proto!("authpb");
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}

pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}

pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}

pub mod peer {
    tonic::include_proto!("concord.peer.v1");
}

pub mod groups {
    tonic::include_proto!("concord.groups.v1");
}

pub mod queue {
    tonic::include_proto!("concord.queue.v1");
}

pub mod blob {
    tonic::include_proto!("concord.blob.v1");
}
