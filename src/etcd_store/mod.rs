//! The etcd store as a service of the Raft runtime: KV (MVCC), leases, auth,
//! alarms and the member registry, in one Raft group (group 1, data directory
//! `group-1`).
//!
//! [`EtcdStore`] is what the server above holds: the group, plus the handles the
//! etcd API reads without going through Raft (the state file, its key index, the
//! revision watch, auth tokens). Commands travel as [`Command`] bodies of the
//! runtime's proposals; [`state_machine`] applies them.

pub mod auth;
pub mod catalog;
pub mod command;
pub mod etcd_format;
pub mod lease;
pub mod legacy;
pub mod members;
pub mod mvcc;
pub mod reconcile;
pub mod state_machine;

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use command::{ApplyError, Command, CommandResult};
use members::ClusterInfo;

use crate::consensus::log_store::{LogStore, NodeLog};
use crate::consensus::network::PeerPool;
use crate::consensus::{ConsensusError, Group, GroupConfig, GroupId, MemberCalls, MemberId, PeerInfo, Raft};
use crate::etcd_store::mvcc::index::KeyIndex;
use crate::etcd_store::mvcc::Rev;
use crate::storage::Backend;

/// How long a member waits to apply the revision a HashKV check asks about.
const HASH_KV_WAIT: Duration = Duration::from_secs(5);

/// The etcd store's group on this member and its local state.
#[derive(Clone)]
pub struct EtcdStore {
    pub group: Group,
    pub backend: Arc<Backend>,
    /// The key index of `backend`'s file: what a [`crate::etcd_store::mvcc::ReadView`] needs.
    pub index: Arc<KeyIndex>,
    /// The store's current revision, updated after every applied batch; watchers
    /// and lock waiters wait on it instead of polling storage.
    pub revision: tokio::sync::watch::Receiver<Rev>,
    /// The auth store's revision as of the last applied batch: lets a request
    /// reuse the cached auth state without opening a read transaction.
    pub auth_revision: Arc<AtomicU64>,
    /// This member's copy of the replicated simple auth tokens.
    pub tokens: Arc<crate::etcd_store::auth::SimpleTokens>,
    apply_gate: Arc<state_machine::ApplyGate>,
    /// Who answers node calls here (see [`EtcdStore::serve_node_calls`]).
    node_calls: Arc<std::sync::OnceLock<Arc<dyn MemberCalls>>>,
}

/// The store is its group with etcd's state beside it: the group's methods
/// (read barriers, metrics, leadership) are the store's.
impl std::ops::Deref for EtcdStore {
    type Target = Group;

    fn deref(&self) -> &Group {
        &self.group
    }
}

/// A request one member asks of another about the etcd store (see
/// [`MemberCalls`]).
#[derive(Debug, Serialize, Deserialize)]
enum StoreCall {
    /// A joining member asks for the cluster ID and the member registry.
    ClusterInfo,
    /// The receiver's HashKV at a revision, once it has applied that revision (the
    /// leader's cross-member corruption check).
    HashKvAt(i64),
    /// A request for the member's other services (see [`EtcdStore::serve_node_calls`]);
    /// appended last, so earlier calls keep their encoding. A byte string: the
    /// same encoding as a `Vec<u8>`, decoded in one copy (a chunk is 4 MiB).
    Node(#[serde(with = "crate::consensus::raw_bytes")] Vec<u8>),
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).expect("store calls always encode")
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    crate::consensus::decode_bounded(b).map(|(v, _)| v).map_err(|e| e.to_string())
}

/// Answers [`StoreCall`]s on this member.
struct StoreCalls {
    raft: Raft,
    backend: Arc<Backend>,
    index: Arc<KeyIndex>,
    revision: tokio::sync::watch::Receiver<Rev>,
    /// Who answers [`StoreCall::Node`] here (set once by the server).
    node_calls: Arc<std::sync::OnceLock<Arc<dyn MemberCalls>>>,
}

impl MemberCalls for StoreCalls {
    fn call(&self, req: Vec<u8>) -> openraft::base::BoxFuture<'static, Result<Vec<u8>, String>> {
        let (raft, backend, index, revision) =
            (self.raft.clone(), self.backend.clone(), self.index.clone(), self.revision.clone());
        let node_calls = self.node_calls.get().cloned();
        Box::pin(async move {
            match decode::<StoreCall>(&req)? {
                StoreCall::Node(body) => match node_calls {
                    Some(handler) => handler.call(body).await,
                    None => Err("no service answers node calls on this member yet".into()),
                },
                StoreCall::ClusterInfo => Ok(encode(&local_cluster_info(&raft, &backend).map_err(|e| e.to_string()))),
                StoreCall::HashKvAt(rev) => {
                    Ok(encode(&local_hash_kv_at(&backend, &index, revision, rev, HASH_KV_WAIT).await))
                }
            }
        })
    }
}

/// The cluster ID and member registry as this member has applied them.
fn local_cluster_info(raft: &Raft, backend: &Backend) -> std::io::Result<ClusterInfo> {
    use openraft::async_runtime::WatchReceiver;
    // Ordering rule: the applied index is read before the registry, so the
    // registry reflects at least that index (apply commits before it reports).
    let applied_index = raft.metrics().borrow_watched().last_applied.as_ref().map_or(0, |l| l.index());
    let txn = backend.begin_read()?;
    let cluster_id = members::stored_cluster_id(&txn)?
        .ok_or_else(|| std::io::Error::other("this member has not joined a cluster yet"))?;
    Ok(ClusterInfo { cluster_id, members: members::records(&txn)?, applied_index })
}

/// This member's (HashKV, compact revision) at `rev`, once it has applied `rev`.
async fn local_hash_kv_at(
    backend: &Arc<Backend>,
    index: &Arc<KeyIndex>,
    mut revision: tokio::sync::watch::Receiver<Rev>,
    rev: i64,
    wait: Duration,
) -> Result<(u32, i64), String> {
    tokio::time::timeout(wait, revision.wait_for(|r| *r >= rev))
        .await
        .map_err(|_| format!("revision {rev} not applied within {wait:?}"))?
        .map_err(|e| e.to_string())?;
    let view = crate::etcd_store::mvcc::ReadView::open(backend, index).map_err(|e| e.to_string())?;
    view.hash_kv(rev).map_err(|e| e.to_string())
}

/// Asks the member at `peer_url` for its cluster ID and member registry (a
/// joining member asks this before it has a group of its own).
pub async fn cluster_info_at(pool: &PeerPool, peer_url: &str, timeout: Duration) -> Result<ClusterInfo, String> {
    let node = PeerInfo { peer_urls: vec![peer_url.to_string()] };
    let reply = pool.member_call(&node, encode(&StoreCall::ClusterInfo), timeout).await?;
    decode::<Result<ClusterInfo, String>>(&reply)?
}

impl EtcdStore {
    /// Opens the etcd store's state in `dir` (converting a log written by an
    /// earlier release) and starts its group `group_id` on member `member`, its
    /// log in the node's journal `node_log`; `stats` gets its timings.
    pub async fn open(
        member: MemberId,
        group_id: GroupId,
        dir: &Path,
        node_log: &NodeLog,
        stats: Arc<crate::stats::GroupStats>,
        config: &GroupConfig,
        auth_token_ttl: Duration,
    ) -> Result<(EtcdStore, LogStore), Box<dyn std::error::Error + Send + Sync>> {
        std::fs::create_dir_all(dir)?;
        // Crash point: a defragmentation that died before its switch-over leaves
        // an unfinished copy; the live file is intact.
        match std::fs::remove_file(dir.join("state.redb.defrag")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let backend = Arc::new(Backend::open(&dir.join("state.redb"))?);
        if crate::etcd_store::mvcc::upgrade::upgrade_layout(&backend)? {
            tracing::info!(dir = %dir.display(), "converted the state file to the revision-keyed history layout");
        }
        let index = Arc::new(KeyIndex::open(&backend.begin_read()?)?);
        let converted = node_log.upgrade_legacy(group_id, &legacy::convert_entry)?;
        if converted > 0 {
            tracing::info!(entries = converted, "converted the raft log from the previous release's entry format");
        }
        let log = node_log.group(group_id, member)?;
        let tokens = Arc::new(crate::etcd_store::auth::SimpleTokens::new(auth_token_ttl));
        let (sm, revision) = state_machine::StateMachine::new(
            backend.clone(),
            index.clone(),
            dir.join("snap"),
            stats.clone(),
            tokens.clone(),
        )?;
        let apply_gate = sm.gate();
        let auth_revision = sm.auth_revision();
        let group = Group::start(member, group_id, log.clone(), Box::new(sm), &dir.join("snap"), config, stats).await?;
        let node_calls: Arc<std::sync::OnceLock<Arc<dyn MemberCalls>>> = Arc::default();
        let calls = StoreCalls {
            raft: group.raft.clone(),
            backend: backend.clone(),
            index: index.clone(),
            revision: revision.clone(),
            node_calls: node_calls.clone(),
        };
        group.serve_member_calls(Arc::new(calls));
        let store = EtcdStore { group, backend, index, revision, auth_revision, tokens, apply_gate, node_calls };
        Ok((store, log))
    }

    /// Proposes `cmd` and waits for its applied result (see [`Group::propose`]).
    /// Registers who answers [`EtcdStore::call_node`] requests on this member: the
    /// member's other services (the Redis gateway forwards a stream's commands to a
    /// member holding it). Only the first registration counts.
    pub fn serve_node_calls(&self, handler: Arc<dyn MemberCalls>) {
        let _ = self.node_calls.set(handler);
    }

    /// Has member `id`'s node-call handler answer `req`, over the peer network.
    pub async fn call_node(&self, id: MemberId, req: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, String> {
        let reply = self.group.call_member(id, encode(&StoreCall::Node(req)), timeout).await?;
        Ok(reply)
    }

    pub async fn propose(&self, cmd: Command, timeout: Duration) -> Result<CommandResult, ConsensusError> {
        let alone = cmd.reply_may_be_large();
        let reply = self.group.propose(cmd.encode(), alone, timeout).await?;
        Ok(CommandResult::decode(&reply))
    }

    /// Rewrites this member's state file densely without stopping reads or writes
    /// (see [`state_machine::defragment`]).
    pub async fn defragment(&self) -> std::io::Result<()> {
        let (backend, gate) = (self.backend.clone(), self.apply_gate.clone());
        tokio::task::spawn_blocking(move || state_machine::defragment(&backend, &gate))
            .await
            .map_err(std::io::Error::other)?
    }

    /// The cluster ID and member registry as this member has applied them.
    pub fn cluster_info(&self) -> std::io::Result<ClusterInfo> {
        local_cluster_info(&self.group.raft, &self.backend)
    }

    /// Asks member `id` for its (HashKV, compact revision) at `rev`.
    pub async fn peer_hash_kv_at(&self, id: MemberId, rev: i64, timeout: Duration) -> Result<(u32, i64), String> {
        let reply = self.group.call_member(id, encode(&StoreCall::HashKvAt(rev)), timeout).await?;
        decode::<Result<(u32, i64), String>>(&reply)?
    }
}
