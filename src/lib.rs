//! concord: one consensus core (Raft), services as state machines on it.
//!
//! Layers, dependencies pointing downward only: `server` (the etcd gRPC
//! services, the Redis gateway, config, process) and `cli` → the services
//! (`etcd_store`, `register`, `streams`) and the RESP protocol (`resp`) →
//! `consensus` (openraft, log, peer network, the service interface) →
//! `storage`; `placement` is pure functions, `proto` generated code only.
//! See `docs/ARCHITECTURE.md`.

pub mod blob;
pub mod cli;
pub mod consensus;
pub mod etcd_store;
pub mod fuzzing;
pub mod placement;
pub mod proto;
pub mod register;
pub mod resp;
pub mod server;
pub mod stats;
pub mod storage;
pub mod streams;
pub mod supervisor;
