//! The member registry: etcd's view of cluster membership, replicated through the log.
//!
//! etcd keeps its member list in the state machine; `MemberAdd` commits a record,
//! and a member that has not started yet is listed as "unstarted". concord does the
//! same: the registry (rows `member/<id hex>` in META) is what `MemberList` shows
//! and what the operator changes. Raft's own membership follows it: the leader's
//! reconciler ([`super::reconcile`]) adds registry members as learners, promotes
//! them to voters once they have caught up, and removes members the registry no
//! longer lists, always through openraft's joint consensus.
//!
//! Why a registry and not Raft's membership alone: a voter added to Raft before it
//! runs would count towards quorum at once (a 1-member cluster adding a second voter
//! stops until that member starts). Here a new voter joins Raft only once it has the
//! log, so adding a member never costs availability.
//!
//! Every check below runs at apply time, so all members reach the same verdict.

use std::io;

use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use super::{ApplyError, CommandResult};
use crate::consensus::{MemberId, Membership};
use crate::storage::META;

const MEMBER_PREFIX: &str = "member/";
/// Rows `labels/<id hex>`: each member's [`NodeLabels`].
const LABELS_PREFIX: &str = "labels/";
/// Set once the registry has been seeded from the bootstrap membership.
const META_SEEDED: &str = "members-seeded";
/// The cluster ID, fixed when the registry is seeded.
const META_CLUSTER_ID: &str = "cluster-id";

/// One member as the registry knows it.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct MemberRecord {
    /// Published by the member itself at start; empty while it is unstarted.
    pub name: String,
    pub client_urls: Vec<String>,
    pub peer_urls: Vec<String>,
    /// Requested role. A voter whose Raft role is still learner is catching up.
    pub learner: bool,
}

/// What a member tells a joining member about its cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster_id: u64,
    pub members: Vec<(MemberId, MemberRecord)>,
    /// The answering member's applied log index (read before the registry, so the
    /// registry is at least this fresh).
    pub applied_index: u64,
}

/// A change to the registry, decided by an operator request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MemberChange {
    Add {
        id: MemberId,
        peer_urls: Vec<String>,
        learner: bool,
    },
    Remove {
        id: MemberId,
    },
    Promote {
        id: MemberId,
    },
    Update {
        id: MemberId,
        peer_urls: Vec<String>,
    },
    /// The member's own announcement of its name and client URLs (etcd's publish).
    Publish {
        id: MemberId,
        name: String,
        client_urls: Vec<String>,
    },
    /// The member's own announcement of its `--zone` and `--weight` (kept beside
    /// its record, so records written by earlier releases still decode).
    Labels {
        id: MemberId,
        labels: NodeLabels,
    },
}

/// Where a member's replicas should be placed: its failure domain and its
/// capacity relative to the others' (see `crate::placement`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeLabels {
    pub zone: String,
    pub weight: u32,
}

impl Default for NodeLabels {
    /// A member that has not announced labels: no zone, weight 1.
    fn default() -> NodeLabels {
        NodeLabels { zone: String::new(), weight: 1 }
    }
}

impl NodeLabels {
    fn valid(&self) -> bool {
        use crate::placement::{MAX_WEIGHT, MAX_ZONE_BYTES};
        self.zone.len() <= MAX_ZONE_BYTES && (1..=MAX_WEIGHT).contains(&u64::from(self.weight))
    }
}

/// etcd's member ID: SHA-1 over the sorted peer URLs, the cluster token and, for a
/// member added at runtime, the Unix time of the request (so re-adding the same
/// URLs later yields a new ID).
pub fn member_id(peer_urls: &[String], token: &str, added_at_unix_s: Option<i64>) -> MemberId {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut h = Sha1::new();
    h.update(urls.concat().as_bytes());
    h.update(token.as_bytes());
    if let Some(t) = added_at_unix_s {
        h.update(t.to_string().as_bytes());
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("sha1 digest has 20 bytes"))
}

/// etcd's cluster ID: SHA-1 over the sorted IDs of the bootstrap members.
pub fn cluster_id(member_ids: &[MemberId]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort();
    let mut h = Sha1::new();
    for id in ids {
        h.update(id.to_be_bytes());
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("sha1 digest has 20 bytes"))
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn encode(r: &MemberRecord) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(r, bincode::config::standard()).map_err(io_err)
}

fn key(id: MemberId) -> String {
    format!("{MEMBER_PREFIX}{id:016x}")
}

/// All registry members in ID order, from any view of META.
pub fn records_in<T: ReadableTable<&'static str, &'static [u8]>>(
    meta: &T,
) -> io::Result<Vec<(MemberId, MemberRecord)>> {
    let mut out = Vec::new();
    for row in meta.range(MEMBER_PREFIX..).map_err(io_err)? {
        let (k, v) = row.map_err(io_err)?;
        let Some(hex) = k.value().strip_prefix(MEMBER_PREFIX) else { break };
        let id = u64::from_str_radix(hex, 16).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let rec =
            crate::consensus::decode_bounded(v.value()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?.0;
        out.push((id, rec));
    }
    Ok(out)
}

/// Every member's announced labels (members that announced none are absent).
pub fn labels(txn: &redb::ReadTransaction) -> io::Result<std::collections::BTreeMap<MemberId, NodeLabels>> {
    let meta = txn.open_table(META).map_err(io_err)?;
    let mut out = std::collections::BTreeMap::new();
    for row in meta.range(LABELS_PREFIX..).map_err(io_err)? {
        let (k, v) = row.map_err(io_err)?;
        let Some(hex) = k.value().strip_prefix(LABELS_PREFIX) else { break };
        let id = u64::from_str_radix(hex, 16).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let labels =
            crate::consensus::decode_bounded(v.value()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?.0;
        out.insert(id, labels);
    }
    Ok(out)
}

fn labels_key(id: MemberId) -> String {
    format!("{LABELS_PREFIX}{id:016x}")
}

/// All registry members in ID order.
pub fn records(txn: &redb::ReadTransaction) -> io::Result<Vec<(MemberId, MemberRecord)>> {
    records_in(&txn.open_table(META).map_err(io_err)?)
}

/// The cluster ID recorded at seeding, if the registry has been seeded.
pub fn stored_cluster_id(txn: &redb::ReadTransaction) -> io::Result<Option<u64>> {
    let meta = txn.open_table(META).map_err(io_err)?;
    let v = meta.get(META_CLUSTER_ID).map_err(io_err)?;
    v.map(|v| {
        let b: [u8; 8] =
            v.value().try_into().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad cluster id"))?;
        Ok(u64::from_be_bytes(b))
    })
    .transpose()
}

/// Seeds the registry from the first membership the log carries (the bootstrap
/// `--initial-cluster`, or the cluster a restored snapshot starts); later
/// membership entries are the reconciler's doing and do not touch the registry.
pub fn seed_from_membership(txn: &WriteTransaction, membership: &Membership) -> io::Result<()> {
    let mut meta = txn.open_table(META).map_err(io_err)?;
    if meta.get(META_SEEDED).map_err(io_err)?.is_some() {
        return Ok(());
    }
    let voters: Vec<MemberId> = membership.voter_ids().collect();
    for (id, node) in membership.nodes() {
        let rec =
            MemberRecord { peer_urls: node.peer_urls.clone(), learner: !voters.contains(id), ..Default::default() };
        meta.insert(key(*id).as_str(), encode(&rec)?.as_slice()).map_err(io_err)?;
    }
    meta.insert(META_CLUSTER_ID, cluster_id(&voters).to_be_bytes().as_slice()).map_err(io_err)?;
    meta.insert(META_SEEDED, [].as_slice()).map_err(io_err)?;
    Ok(())
}

/// Forgets the registry (a restored snapshot seeds a new cluster).
pub fn clear(txn: &WriteTransaction) -> io::Result<()> {
    let mut meta = txn.open_table(META).map_err(io_err)?;
    let ids: Vec<MemberId> = records_in(&meta)?.into_iter().map(|(id, _)| id).collect();
    for id in ids {
        meta.remove(key(id).as_str()).map_err(io_err)?;
        meta.remove(labels_key(id).as_str()).map_err(io_err)?;
    }
    meta.remove(META_SEEDED).map_err(io_err)?;
    meta.remove(META_CLUSTER_ID).map_err(io_err)?;
    Ok(())
}

/// Applies one registry change; request errors are etcd's membership errors.
pub fn apply(txn: &WriteTransaction, change: &MemberChange) -> io::Result<CommandResult> {
    let mut meta = txn.open_table(META).map_err(io_err)?;
    let all = records_in(&meta)?;
    let find = |id: MemberId| all.iter().find(|(m, _)| *m == id).map(|(_, r)| r.clone());
    let url_taken = |urls: &[String], except: Option<MemberId>| {
        all.iter().any(|(m, r)| Some(*m) != except && r.peer_urls.iter().any(|u| urls.contains(u)))
    };
    let err = |e| Ok(CommandResult::Err(e));
    let (id, rec) = match change {
        MemberChange::Add { id, peer_urls, learner } => {
            if find(*id).is_some() {
                return err(ApplyError::MemberExists);
            }
            if url_taken(peer_urls, None) {
                return err(ApplyError::PeerUrlExists);
            }
            (*id, Some(MemberRecord { peer_urls: peer_urls.clone(), learner: *learner, ..Default::default() }))
        }
        MemberChange::Remove { id } => {
            if find(*id).is_none() {
                return err(ApplyError::MemberNotFound);
            }
            (*id, None)
        }
        MemberChange::Promote { id } => match find(*id) {
            None => return err(ApplyError::MemberNotFound),
            Some(r) if !r.learner => return err(ApplyError::MemberNotLearner),
            Some(r) => (*id, Some(MemberRecord { learner: false, ..r })),
        },
        MemberChange::Update { id, peer_urls } => match find(*id) {
            None => return err(ApplyError::MemberNotFound),
            Some(_) if url_taken(peer_urls, Some(*id)) => return err(ApplyError::PeerUrlExists),
            Some(r) => (*id, Some(MemberRecord { peer_urls: peer_urls.clone(), ..r })),
        },
        // A removed member's late announcement is ignored, as etcd does.
        MemberChange::Publish { id, name, client_urls } => match find(*id) {
            None => return Ok(CommandResult::Ok(Vec::new())),
            Some(r) => (*id, Some(MemberRecord { name: name.clone(), client_urls: client_urls.clone(), ..r })),
        },
        MemberChange::Labels { id, labels } => {
            if !labels.valid() {
                return err(ApplyError::Malformed(format!("member labels out of range: {labels:?}")));
            }
            if find(*id).is_some() {
                let encoded = bincode::serde::encode_to_vec(labels, bincode::config::standard()).map_err(io_err)?;
                meta.insert(labels_key(*id).as_str(), encoded.as_slice()).map_err(io_err)?;
            }
            return Ok(CommandResult::Ok(Vec::new()));
        }
    };
    match rec {
        Some(r) => meta.insert(key(id).as_str(), encode(&r)?.as_slice()).map_err(io_err)?,
        None => {
            meta.remove(key(id).as_str()).map_err(io_err)?;
            meta.remove(labels_key(id).as_str()).map_err(io_err)?
        }
    };
    Ok(CommandResult::Ok(Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_etcd() {
        // etcd's default single member: `etcd` with no flags reports these IDs.
        let urls = vec!["http://localhost:2380".to_string()];
        let id = member_id(&urls, "etcd-cluster", None);
        assert_eq!(format!("{id:x}"), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", cluster_id(&[id])), "cdf818194e3a8c32");
        // A runtime-added member's ID depends on the time of the request.
        assert_ne!(member_id(&urls, "", Some(1)), member_id(&urls, "", Some(2)));
    }
}
