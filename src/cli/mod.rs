//! `concord` subcommands other than serving (serving takes etcd's flags directly).

pub mod bench;
pub mod bench_log;
pub mod bench_queue;
pub mod bench_streams;
pub mod blob;
pub mod group;
pub mod health;
pub mod nodes;
pub mod queue;
pub mod snapshot;
pub mod status;
