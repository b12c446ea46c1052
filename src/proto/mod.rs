//! Generated protobuf and gRPC code, and nothing else.
//!
//! The schemas live in `proto/` at the repository root. `etcd/*.proto` are written
//! from etcd's documented v3 API (field numbers are the wire contract every etcd
//! client relies on); `concord/peer.proto` is concord's member-to-member service.

#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod authpb {
    tonic::include_proto!("authpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

pub mod peer {
    tonic::include_proto!("concord.peer.v1");
}
