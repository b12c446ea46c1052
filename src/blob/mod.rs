//! The blob store: buckets of objects whose bytes are split into chunks named
//! by their BLAKE3 hash and stored as files on several members, while only the
//! metadata goes through Raft.
//!
//! - [`meta`]: a bucket's metadata (objects' manifests, chunks' reference
//!   counts and replicas) as pure logic over an ordered table. Each bucket is a
//!   catalog group of service kind `blob` running the ordered-table service of
//!   [`crate::streams`], which replicates it.
//! - [`chunks`]: this member's chunk files, verified on every write and read.
//!
//! The client API, the chunk transfers between members and the put and get
//! pipelines are in `crate::server::blob`.

pub mod chunks;
pub mod meta;
