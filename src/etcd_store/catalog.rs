//! The group catalog: the Raft groups the cluster runs besides the etcd store's,
//! each with its service and the members that host a replica.
//!
//! It is replicated in the etcd store's group (rows `group/<id hex>` in META,
//! beside the member registry), so that every member agrees on it and a member
//! that restarts finds it again; each member's group host
//! (`crate::server::groups`) starts and stops its replicas to match. Checks run
//! at apply time, so every member reaches the same verdict.

use std::io;

use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{ApplyError, CommandResult};
use crate::consensus::{GroupId, MemberId, FIRST_GROUP};
use crate::storage::META;

const GROUP_PREFIX: &str = "group/";

/// Most groups the catalog holds (each member hosts at most this many replicas
/// besides the etcd store's): bounds a member's Raft cores, tasks and files.
pub const MAX_GROUPS: usize = 1024;

/// The services a catalog group can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceKind {
    /// The replicated register map (`crate::register`).
    Register,
}

impl ServiceKind {
    pub fn name(self) -> &'static str {
        match self {
            ServiceKind::Register => "register",
        }
    }

    pub fn parse(name: &str) -> Option<ServiceKind> {
        match name {
            "register" => Some(ServiceKind::Register),
            _ => None,
        }
    }
}

/// One catalog group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    pub service: ServiceKind,
    /// Members hosting a replica; the first one initialises the group's Raft.
    pub replicas: Vec<MemberId>,
}

/// A change to the catalog.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CatalogChange {
    Create { id: GroupId, spec: GroupSpec },
    Remove { id: GroupId },
}

fn key(id: GroupId) -> String {
    format!("{GROUP_PREFIX}{id:016x}")
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(io_err)
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    crate::consensus::decode_bounded(b).map(|(v, _)| v).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn groups_in<T: ReadableTable<&'static str, &'static [u8]>>(meta: &T) -> io::Result<Vec<(GroupId, GroupSpec)>> {
    let mut out = Vec::new();
    for row in meta.range(GROUP_PREFIX..).map_err(io_err)? {
        let (k, v) = row.map_err(io_err)?;
        let Some(hex) = k.value().strip_prefix(GROUP_PREFIX) else { break };
        let id = u64::from_str_radix(hex, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad catalog key {hex}")))?;
        out.push((id, decode(v.value())?));
    }
    Ok(out)
}

/// The catalog, by group id.
pub fn groups(txn: &redb::ReadTransaction) -> io::Result<Vec<(GroupId, GroupSpec)>> {
    groups_in(&txn.open_table(META).map_err(io_err)?)
}

/// Applies one catalog change. Replicas must be registered members.
pub fn apply(txn: &WriteTransaction, change: &CatalogChange) -> io::Result<CommandResult> {
    let registered: Vec<MemberId> =
        super::members::records_in(&txn.open_table(META).map_err(io_err)?)?.into_iter().map(|(id, _)| id).collect();
    let mut meta = txn.open_table(META).map_err(io_err)?;
    let existing = groups_in(&meta)?;
    let err = |e| Ok(CommandResult::Err(e));
    match change {
        CatalogChange::Create { id, spec } => {
            if *id == FIRST_GROUP || existing.iter().any(|(g, _)| g == id) {
                return err(ApplyError::GroupExists);
            }
            if existing.len() >= MAX_GROUPS {
                return err(ApplyError::TooManyGroups);
            }
            let mut seen = std::collections::BTreeSet::new();
            let valid =
                !spec.replicas.is_empty() && spec.replicas.iter().all(|r| registered.contains(r) && seen.insert(*r));
            if !valid {
                return err(ApplyError::BadReplicas);
            }
            meta.insert(key(*id).as_str(), encode(spec)?.as_slice()).map_err(io_err)?;
        }
        CatalogChange::Remove { id } => {
            if meta.remove(key(*id).as_str()).map_err(io_err)?.is_none() {
                return err(ApplyError::GroupNotFound);
            }
        }
    }
    Ok(CommandResult::Ok(Vec::new()))
}
