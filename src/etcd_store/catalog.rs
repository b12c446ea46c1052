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
/// Rows `gname/<service>/<name hex>` → the named object's group id.
const NAME_PREFIX: &str = "gname/";

/// Most bytes in a named group's name (a Redis key naming a stream).
pub const MAX_NAME_BYTES: usize = 64 << 10;

/// Most groups the catalog holds (each member hosts at most this many replicas
/// besides the etcd store's): bounds a member's Raft cores, tasks and files.
pub const MAX_GROUPS: usize = 1024;

/// The services a catalog group can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceKind {
    /// The replicated register map (`crate::register`).
    Register,
    /// A Redis stream (`crate::streams`), found by its name (see
    /// [`CatalogChange::CreateNamed`]).
    Stream,
    /// A blob bucket's metadata (`crate::streams::bucket`, on the stream service's
    /// ordered table), found by the bucket's name. Appended last.
    Blob,
}

impl ServiceKind {
    pub fn name(self) -> &'static str {
        match self {
            ServiceKind::Register => "register",
            ServiceKind::Stream => "stream",
            ServiceKind::Blob => "blob",
        }
    }

    pub fn parse(name: &str) -> Option<ServiceKind> {
        match name {
            "register" => Some(ServiceKind::Register),
            "stream" => Some(ServiceKind::Stream),
            "blob" => Some(ServiceKind::Blob),
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
    Create {
        id: GroupId,
        spec: GroupSpec,
    },
    Remove {
        id: GroupId,
    },
    /// Creates group `id` for the service's object called `name` (a stream),
    /// unless that name has a group already: either way the reply names the
    /// name's group, so concurrent creators agree on one. Appended last so that
    /// logs written before it decode.
    CreateNamed {
        id: GroupId,
        name: Vec<u8>,
        spec: GroupSpec,
    },
}

fn key(id: GroupId) -> String {
    format!("{GROUP_PREFIX}{id:016x}")
}

fn name_key(service: ServiceKind, name: &[u8]) -> String {
    let hex: String = name.iter().map(|b| format!("{b:02x}")).collect();
    format!("{NAME_PREFIX}{}/{hex}", service.name())
}

/// The group holding `service`'s object `name`, if the catalog has one.
pub fn named(txn: &redb::ReadTransaction, service: ServiceKind, name: &[u8]) -> io::Result<Option<GroupId>> {
    let meta = txn.open_table(META).map_err(io_err)?;
    let value = meta.get(name_key(service, name).as_str()).map_err(io_err)?;
    value.map(|v| decode(v.value())).transpose()
}

/// Every name `service` has in the catalog, with its group, in name order.
pub fn names(txn: &redb::ReadTransaction, service: ServiceKind) -> io::Result<Vec<(Vec<u8>, GroupId)>> {
    let meta = txn.open_table(META).map_err(io_err)?;
    let start = format!("{NAME_PREFIX}{}/", service.name());
    let mut out = Vec::new();
    for row in meta.range(start.as_str()..).map_err(io_err)? {
        let (k, v) = row.map_err(io_err)?;
        let Some(hex) = k.value().strip_prefix(start.as_str()) else { break };
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad catalog name key {}", k.value()));
        let name = (0..hex.len())
            .step_by(2)
            .map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(bad)?;
        out.push((name, decode(v.value())?));
    }
    Ok(out)
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
            if let Err(e) = check_new(&existing, &registered, *id, spec) {
                return err(e);
            }
            meta.insert(key(*id).as_str(), encode(spec)?.as_slice()).map_err(io_err)?;
        }
        CatalogChange::Remove { id } => {
            if meta.remove(key(*id).as_str()).map_err(io_err)?.is_none() {
                return err(ApplyError::GroupNotFound);
            }
            let names: Vec<String> = meta
                .range(NAME_PREFIX..)
                .map_err(io_err)?
                .map(|row| row.map_err(io_err))
                .take_while(|row| row.as_ref().map_or(true, |(k, _)| k.value().starts_with(NAME_PREFIX)))
                .filter_map(|row| match row {
                    Ok((k, v)) => match decode::<GroupId>(v.value()) {
                        Ok(g) if g == *id => Some(Ok(k.value().to_string())),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    },
                    Err(e) => Some(Err(e)),
                })
                .collect::<io::Result<_>>()?;
            for name in names {
                meta.remove(name.as_str()).map_err(io_err)?;
            }
        }
        CatalogChange::CreateNamed { id, name, spec } => {
            let row = name_key(spec.service, name);
            let found = meta.get(row.as_str()).map_err(io_err)?.map(|v| decode::<GroupId>(v.value())).transpose()?;
            let id = match found {
                Some(id) => id,
                None => {
                    if let Err(e) = check_new(&existing, &registered, *id, spec) {
                        return err(e);
                    }
                    meta.insert(key(*id).as_str(), encode(spec)?.as_slice()).map_err(io_err)?;
                    meta.insert(row.as_str(), encode(id)?.as_slice()).map_err(io_err)?;
                    *id
                }
            };
            return Ok(CommandResult::Ok(encode(&id)?));
        }
    }
    Ok(CommandResult::Ok(Vec::new()))
}

/// Whether group `id` with `spec` may join the catalog.
fn check_new(
    existing: &[(GroupId, GroupSpec)],
    registered: &[MemberId],
    id: GroupId,
    spec: &GroupSpec,
) -> Result<(), ApplyError> {
    if id == FIRST_GROUP || existing.iter().any(|(g, _)| *g == id) {
        return Err(ApplyError::GroupExists);
    }
    if existing.len() >= MAX_GROUPS {
        return Err(ApplyError::TooManyGroups);
    }
    let mut seen = std::collections::BTreeSet::new();
    let valid = !spec.replicas.is_empty() && spec.replicas.iter().all(|r| registered.contains(r) && seen.insert(*r));
    if !valid {
        return Err(ApplyError::BadReplicas);
    }
    Ok(())
}
