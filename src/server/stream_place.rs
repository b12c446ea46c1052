//! Where a stream is: the catalog names each stream (Redis stream or durable
//! queue: one namespace, service kind `stream`) with the Raft group holding it.
//! Used by the Redis gateway and the queue service alike.
//!
//! A stream's group is created by the first write that makes the stream exist
//! ([`CatalogChange::CreateNamed`]), its replicas placed by the ring like any
//! catalog group. A member answers for the streams whose group it hosts; for
//! the others it learns their replicas, to forward to one of them.

use std::sync::Arc;

use super::groups::{place_new_group, GroupHost, DEFAULT_GROUP_REPLICAS};
use super::Node;
use crate::consensus::{GroupId, MemberId};
use crate::etcd_store::catalog::{self, CatalogChange, GroupSpec, ServiceKind, MAX_NAME_BYTES};
use crate::etcd_store::{ApplyError, Command, CommandResult};
use crate::streams::StreamGroup;

/// Attempts at a fresh group id for a new stream (an id collides with another
/// group's only by chance).
const CREATE_ATTEMPTS: u64 = 4;

/// Where a stream is, seen from this member.
pub enum Place {
    Here(Box<StreamGroup>),
    Missing,
    /// Held by these members (its replicas), not this one.
    Elsewhere(Vec<MemberId>),
}

/// Why a stream could not be placed. The Redis gateway answers `ERR` and
/// `TRYAGAIN`; the queue service INVALID_ARGUMENT or INTERNAL, and UNAVAILABLE.
#[derive(Debug)]
pub enum PlaceError {
    /// Refused or failed for good (too long a name, no room for a group, a storage error).
    Failed(String),
    /// No quorum or leader in time, or this member's replica is still starting: try again.
    Unavailable(String),
}

/// A group id for stream `key`, attempt `n`: spread over the id space, clear of
/// the small ids administrators give groups by hand.
fn stream_group_id(key: &[u8], n: u64) -> GroupId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = h.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | (1 << 62)
}

/// Looks streams up in the catalog and creates their groups.
pub struct StreamPlacement<'a> {
    pub node: &'a Arc<Node>,
    pub host: &'a Arc<GroupHost>,
    /// The catalog namespace: `Stream` (Redis streams and queues) or `Blob` (buckets).
    pub service: ServiceKind,
}

impl StreamPlacement<'_> {
    /// Where stream `key` is: looked up in the applied catalog, then (when
    /// `fresh`) in the catalog as of now (a stream another member just
    /// created), then created when `create`. `fresh` false looks only at the
    /// catalog as this member has applied it (a blocked read's later rounds: no
    /// read barrier per missing key per round).
    pub async fn place(&self, key: &[u8], create: bool, fresh: bool) -> Result<Place, PlaceError> {
        if key.len() > MAX_NAME_BYTES {
            return Err(PlaceError::Failed(format!("concord: stream names are limited to {MAX_NAME_BYTES} bytes")));
        }
        let failed = |e: String| PlaceError::Failed(e);
        let local = {
            let txn = self.node.group.backend.begin_read().map_err(|e| failed(e.to_string()))?;
            catalog::named(&txn, self.service, key).map_err(|e| failed(e.to_string()))?
        };
        let id = match local {
            Some(id) => Some(id),
            None if !fresh => None,
            None => {
                let txn =
                    self.node.linearizable_txn().await.map_err(|s| PlaceError::Unavailable(s.message().to_string()))?;
                catalog::named(&txn, self.service, key).map_err(|e| failed(e.to_string()))?
            }
        };
        let id = match (id, create) {
            (Some(id), _) => id,
            (None, false) => return Ok(Place::Missing),
            (None, true) => self.create(key).await?,
        };
        self.hosted(key, id).await
    }

    async fn create(&self, key: &[u8]) -> Result<GroupId, PlaceError> {
        let unavailable = |e: String| PlaceError::Unavailable(e);
        let timeout = self.node.config.request_timeout();
        // A bucket deleted and created again gets a new group: its chunk files
        // are kept apart from the old one's, which are being removed.
        let salt = match self.service {
            ServiceKind::Blob => rand::random::<u64>(),
            _ => 0,
        };
        for n in 0..CREATE_ATTEMPTS {
            let id = stream_group_id(key, salt.wrapping_add(n));
            let txn = self.node.linearizable_txn().await.map_err(|s| unavailable(s.message().to_string()))?;
            let replicas =
                place_new_group(&txn, id, DEFAULT_GROUP_REPLICAS).map_err(|e| PlaceError::Failed(e.to_string()))?;
            drop(txn);
            let spec = GroupSpec { service: self.service, replicas };
            let change = CatalogChange::CreateNamed { id, name: key.to_vec(), spec };
            match self.node.group.propose(Command::Catalog(change), timeout).await {
                Ok(CommandResult::Ok(bytes)) => {
                    return crate::consensus::decode_bounded::<GroupId>(&bytes)
                        .map(|(id, _)| id)
                        .map_err(|e| PlaceError::Failed(e.to_string()));
                }
                Ok(CommandResult::Err(ApplyError::GroupExists)) => continue,
                Ok(CommandResult::Err(ApplyError::TooManyGroups)) => {
                    return Err(PlaceError::Failed(format!(
                        "concord: the cluster holds {} groups, its limit; no new stream can be created",
                        catalog::MAX_GROUPS
                    )))
                }
                Ok(CommandResult::Err(e)) => return Err(PlaceError::Failed(format!("concord: {e:?}"))),
                Err(e) => return Err(unavailable(e.to_string())),
            }
        }
        Err(PlaceError::Failed("concord: no free group id for this stream".into()))
    }

    /// This member's replica of stream group `id` (waiting for it to start), or
    /// the members holding it.
    async fn hosted(&self, key: &[u8], id: GroupId) -> Result<Place, PlaceError> {
        if let Some(g) = self.host.stream(id) {
            return Ok(Place::Here(Box::new(g)));
        }
        let replicas_in = |txn: &redb::ReadTransaction| -> Result<Vec<MemberId>, PlaceError> {
            let groups = catalog::groups(txn).map_err(|e| PlaceError::Failed(e.to_string()))?;
            Ok(groups.into_iter().find(|(g, _)| *g == id).map(|(_, spec)| spec.replicas).unwrap_or_default())
        };
        let mut replicas = {
            let txn = self.node.group.backend.begin_read().map_err(|e| PlaceError::Failed(e.to_string()))?;
            replicas_in(&txn)?
        };
        if replicas.is_empty() {
            // Created through the leader a moment ago, not yet applied here.
            let txn =
                self.node.linearizable_txn().await.map_err(|s| PlaceError::Unavailable(s.message().to_string()))?;
            replicas = replicas_in(&txn)?;
        }
        if !replicas.is_empty() && !replicas.contains(&self.node.member_id) {
            return Ok(Place::Elsewhere(replicas));
        }
        self.host.settle(id, true, self.node.config.request_timeout()).await;
        self.host.stream(id).map(|g| Place::Here(Box::new(g))).ok_or_else(|| {
            PlaceError::Unavailable(format!(
                "concord: this member's replica of stream '{}' is not running yet",
                String::from_utf8_lossy(key)
            ))
        })
    }

    /// The members to ask, in order, for a call on `replicas`: those heard from
    /// lately first. A write goes to one member only: after a failed attempt it
    /// may have been applied there, and asking another would apply it twice.
    pub fn call_order(&self, replicas: &[MemberId], idempotent: bool) -> Vec<MemberId> {
        let liveness = self.node.registry.liveness();
        let mut order: Vec<MemberId> = replicas.to_vec();
        order.sort_by_key(|m| !liveness.alive(*m));
        if !idempotent {
            order.truncate(1);
        }
        order
    }
}

/// A node call for the stream services: which service answers it, and its body.
#[derive(serde::Serialize, serde::Deserialize)]
/// Bodies are byte strings: the same encoding as a `Vec<u8>`, decoded in one copy.
pub enum NodeCall {
    Redis(#[serde(with = "crate::consensus::raw_bytes")] Vec<u8>),
    Queue(#[serde(with = "crate::consensus::raw_bytes")] Vec<u8>),
    /// Appended last, so the others keep their encoding.
    Blob(#[serde(with = "crate::consensus::raw_bytes")] Vec<u8>),
}

/// Encodes `body` as a node call for the service `kind` makes.
pub fn node_call<T: serde::Serialize>(
    kind: fn(Vec<u8>) -> NodeCall,
    body: &T,
) -> Result<Vec<u8>, bincode::error::EncodeError> {
    let config = bincode::config::standard();
    bincode::serde::encode_to_vec(kind(bincode::serde::encode_to_vec(body, config)?), config)
}

/// Answers node calls: each to the service it names.
pub struct StreamCalls {
    pub redis: Arc<dyn crate::consensus::MemberCalls>,
    pub queue: Arc<dyn crate::consensus::MemberCalls>,
    pub blob: Arc<dyn crate::consensus::MemberCalls>,
}

impl crate::consensus::MemberCalls for StreamCalls {
    fn call(&self, req: Vec<u8>) -> openraft::base::BoxFuture<'static, Result<Vec<u8>, String>> {
        match crate::consensus::decode_bounded::<NodeCall>(&req) {
            Ok((NodeCall::Redis(body), _)) => self.redis.call(body),
            Ok((NodeCall::Queue(body), _)) => self.queue.call(body),
            Ok((NodeCall::Blob(body), _)) => self.blob.call(body),
            Err(e) => {
                let e = e.to_string();
                Box::pin(async move { Err(e) })
            }
        }
    }
}
