//! The blob store's bytes: this member's chunk files ([`chunks`]), named by the
//! BLAKE3 hash of their bytes and verified on every write and read.
//!
//! A bucket's metadata (manifests, chunk reference counts) is a model of the
//! ordered-table service, `crate::streams::bucket`; the client API, the chunk
//! transfers between members and the put and get pipelines are in
//! `crate::server::blob`.

pub mod chunks;
