//! `concord` subcommands other than serving (serving takes etcd's flags directly).

pub mod bench;
pub mod snapshot;
pub mod status;
