//! concord: one consensus core (Raft), services as state machines on it.
//!
//! Layers, dependencies pointing downward only:
//! `server` (etcd gRPC services, config, process) → `consensus` (openraft, log,
//! peer network, state-machine adapter) → `auth` (users, roles, tokens) and
//! `mvcc` (etcd KV semantics) → `storage` (redb file per group) ; `proto` holds generated code only.
//! See `docs/ARCHITECTURE.md`.

pub mod cli;
pub mod consensus;
pub mod etcd_store;
pub mod fuzzing;
pub mod placement;
pub mod proto;
pub mod register;
pub mod server;
pub mod stats;
pub mod storage;
pub mod streams;
pub mod supervisor;
