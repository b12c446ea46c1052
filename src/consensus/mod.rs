//! Consensus: openraft behind concord's own types.
//!
//! What this layer guarantees to the server above it:
//! - [`Command`]s handed to [`Group::propose`] are applied in log order on every
//!   member, exactly once per log entry, and the caller gets the applied result only
//!   after the entry is committed (durable on a majority: every log append is
//!   fsynced before it is acknowledged, see [`log_store`]).
//! - [`Group::read_barrier`] returns only when this member's state machine has applied
//!   everything committed before the call (ReadIndex through the leader), so a read
//!   that follows it is linearizable.
//! - A fatal Raft error (storage failure, panicked core task) is surfaced through
//!   [`Group::fatal`], never hidden: the server stops instead of serving stale data.
//!
//! Nothing outside this module names an openraft type except through the aliases here.

pub mod log_store;
pub mod members;
pub mod network;
pub mod reconcile;
pub mod state_machine;

use std::fmt;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::raft::ReadPolicy;
use serde::{Deserialize, Serialize};

use crate::storage::Backend;

/// A member's identity in the cluster (etcd's member ID).
pub type MemberId = u64;

/// Identifies a Raft group among the groups a node hosts.
pub type GroupId = u64;

/// The group every member has hosted from the start (the etcd store's; its data
/// directory is `group-1`). Peer requests that name no group are for it.
pub const FIRST_GROUP: GroupId = 1;

/// The groups this node hosts, by id: where the peer service sends each request.
#[derive(Clone, Default)]
pub struct GroupRegistry(Arc<std::sync::RwLock<std::collections::HashMap<GroupId, Group>>>);

impl GroupRegistry {
    /// Adds (or replaces) `group` under its id.
    pub fn insert(&self, group: Group) {
        self.0.write().expect("group registry poisoned").insert(group.group_id, group);
    }

    pub fn get(&self, id: GroupId) -> Option<Group> {
        self.0.read().expect("group registry poisoned").get(&id).cloned()
    }
}

/// What Raft knows about a member: etcd's peer URLs. The first URL is dialled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PeerInfo {
    pub peer_urls: Vec<String>,
}

impl fmt::Display for PeerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.peer_urls.join(","))
    }
}

/// Byte strings in commands and results travel as one length-prefixed run of
/// bytes, not as a sequence of `u8` values (serde's default for `Vec<u8>`, which
/// costs a call per byte: ~3% of a follower's CPU under puts). In bincode both
/// forms are the same bytes on the wire, so logs written before read the same.
mod raw_bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> serde::de::Visitor<'de> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

/// A replicated state-machine command. KV requests are carried in their protobuf
/// encoding so the log holds exactly what the client sent (after validation).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    Put(#[serde(with = "raw_bytes")] Vec<u8>),
    DeleteRange(#[serde(with = "raw_bytes")] Vec<u8>),
    Txn(#[serde(with = "raw_bytes")] Vec<u8>),
    Compact(#[serde(with = "raw_bytes")] Vec<u8>),
    /// A change to the member registry (see [`members`]).
    Member(members::MemberChange),
    /// The lease id is chosen by the proposing member, so every replica agrees.
    LeaseGrant {
        id: i64,
        ttl_s: i64,
    },
    LeaseRevoke {
        id: i64,
    },
    /// A keep-alive: re-bases the lease to its full TTL on every member. No longer
    /// proposed (keep-alives go in [`Command::LeaseRenewBatch`]); applied for logs
    /// written by earlier versions.
    LeaseRenew {
        id: i64,
    },
    /// The leader's remaining-TTL view of leases: (id, record version, remaining ms).
    LeaseCheckpoint(Vec<(i64, u64, i64)>),
    /// Raise (`activate`) or clear an alarm (etcd `AlarmType`) for a member.
    Alarm {
        activate: bool,
        member: MemberId,
        alarm: i32,
    },
    /// A change to users, roles or the auth switch (see [`crate::auth`]).
    Auth(crate::auth::AuthOp),
    /// A command whose permissions were checked at `auth_revision`; refused at
    /// apply if the auth store changed since.
    Authed {
        auth_revision: u64,
        cmd: Box<Command>,
    },
    /// A command member `from` forwarded to the leader for one of its clients,
    /// under an id of its own: `from` answers the client from its own apply (see
    /// [`state_machine::LocalAnswers`]); applied as `cmd`.
    Forwarded {
        from: MemberId,
        id: u64,
        cmd: Box<Command>,
    },
    /// Keep-alives gathered by one member (see `crate::lease::Renewer`): each lease
    /// re-based to its full TTL on every member, as [`Command::LeaseRenew`] does, in
    /// one entry; an unknown id is skipped. Answered with a [`state_machine::LeaseRenewals`].
    LeaseRenewBatch(Vec<i64>),
    /// The leader's revoke of a lease it counted down to zero: applied only if the
    /// lease is still at record `version`, so that a keep-alive committed before it
    /// (which re-based the lease) is not undone. Answered like a revoke; a lease
    /// that is gone or was re-based is left alone (answered "not found").
    /// Last, as new variants go: the variants before it keep their encoding.
    LeaseExpire {
        id: i64,
        version: u64,
    },
}

impl Command {
    /// Bytes of the client request a KV command carries (0 for the others): what
    /// request-size limits are checked against.
    pub fn payload_bytes(&self) -> usize {
        match self.inner() {
            Command::Put(b) | Command::DeleteRange(b) | Command::Txn(b) | Command::Compact(b) => b.len(),
            _ => 0,
        }
    }

    /// The command itself, without [`Command::Authed`] or
    /// [`Command::Forwarded`] wrappers.
    pub fn inner(&self) -> &Command {
        match self {
            Command::Authed { cmd, .. } | Command::Forwarded { cmd, .. } => cmd.inner(),
            other => other,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Put(b) => write!(f, "put({}B)", b.len()),
            Command::DeleteRange(b) => write!(f, "delete_range({}B)", b.len()),
            Command::Txn(b) => write!(f, "txn({}B)", b.len()),
            Command::Compact(b) => write!(f, "compact({}B)", b.len()),
            Command::Member(c) => write!(f, "member({c:?})"),
            Command::LeaseGrant { id, ttl_s } => write!(f, "lease_grant({id:x},{ttl_s}s)"),
            Command::LeaseRevoke { id } => write!(f, "lease_revoke({id:x})"),
            Command::LeaseRenew { id } => write!(f, "lease_renew({id:x})"),
            Command::LeaseCheckpoint(l) => write!(f, "lease_checkpoint({} leases)", l.len()),
            Command::Alarm { activate, member, alarm } => write!(f, "alarm({activate},{member:x},{alarm})"),
            Command::Auth(op) => write!(f, "auth({})", op.name()),
            Command::Authed { auth_revision, cmd } => write!(f, "authed@{auth_revision}({cmd})"),
            Command::Forwarded { from, id, cmd } => write!(f, "forwarded({from:x}#{id:x},{cmd})"),
            Command::LeaseRenewBatch(ids) => write!(f, "lease_renew_batch({} leases)", ids.len()),
            Command::LeaseExpire { id, version } => write!(f, "lease_expire({id:x}@{version})"),
        }
    }
}

/// A request-level failure decided deterministically at apply time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ApplyError {
    Compacted,
    FutureRev,
    KeyNotFound,
    LeaseNotFound,
    LeaseExists,
    /// A NOSPACE alarm is active: only reads, deletes and compaction are applied.
    NoSpace,
    MemberExists,
    PeerUrlExists,
    MemberNotFound,
    MemberNotLearner,
    Auth(crate::auth::AuthError),
    /// The command did not decode: only a bug or a corrupted log can cause it.
    Malformed(String),
}

/// The result of applying one command: the protobuf-encoded etcd response
/// (header revision filled), or the request's error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CommandResult {
    Ok(#[serde(with = "raw_bytes")] Vec<u8>),
    Err(ApplyError),
}

/// Tokio, with openraft's randomness (election timeouts, tick jitter) drawn from a
/// seed carried by the task that starts Raft and inherited by every task Raft
/// spawns. A member seeds it from the OS ([`Group::start`]); the deterministic
/// simulation (`tests/simulation.rs`) seeds it from the run's seed, so one seed
/// replays one run. Rejected: plain `TokioRuntime`, whose thread RNG cannot be seeded.
pub type Runtime = openraft::rt::deterministic_rng::DeterministicRng<openraft::TokioRuntime>;

openraft::declare_raft_types!(
    /// concord's Raft type configuration.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = MemberId,
        Node = PeerInfo,
        AsyncRuntime = Runtime,
);

pub type Raft = openraft::Raft<TypeConfig, state_machine::StateMachine>;
pub type SnapshotData = Cursor<Vec<u8>>;
pub type Membership = openraft::Membership<MemberId, PeerInfo>;
pub type RaftMetrics = openraft::RaftMetrics<TypeConfig>;

/// Why a proposal or read barrier did not complete.
///
/// `NoLeader` and `NotLeader` mean the command was certainly not submitted (safe to
/// retry); `Timeout` and `LeaderLost` mean its outcome is unknown: it may still
/// commit, so it is never retried behind the client's back.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum ConsensusError {
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The member asked was not the leader; nothing was appended.
    #[error("etcdserver: not leader")]
    NotLeader,
    #[error("etcdserver: request timed out")]
    Timeout,
    /// Leadership changed after the entry was appended; it may or may not commit.
    #[error("etcdserver: request timed out, possibly due to previous leader failure")]
    LeaderLost,
    #[error("raft group stopped: {0}")]
    Fatal(String),
}

/// Timing and sizing of one Raft group, from etcd's flags.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    /// Applied entries between snapshots (etcd `--snapshot-count`).
    pub snapshot_count: u64,
    /// Entries kept after a snapshot for followers to catch up from.
    pub snapshot_catchup_entries: u64,
    /// Largest peer message (a whole snapshot travels in one): bounds peer memory.
    pub max_peer_message_bytes: usize,
    /// Largest command a client can make (`--max-request-bytes`): with the peer
    /// message limit, it bounds how many entries one AppendEntries may carry.
    pub max_request_bytes: u64,
    /// Life of a simple auth token without use (`--auth-token-ttl`).
    pub auth_token_ttl: Duration,
    /// TLS for connections to peers (`None`: plain http).
    pub peer_tls: Option<network::PeerTls>,
}

/// Most entries one AppendEntries carries (openraft's default is 300). Under 1000
/// writers a leader's backlog exceeds 300, and every extra RPC costs an encode, an
/// HTTP/2 round trip and a follower fsync. A/B, put 1000/100, three runs each:
/// 9.7-10.8k -> 11.0-11.4k req/s.
pub const MAX_APPEND_ENTRIES: u64 = 2048;

/// Per-entry bytes counted besides the command when sizing AppendEntries.
const ENTRY_OVERHEAD_BYTES: u64 = 1024;

impl GroupConfig {
    /// Entries per AppendEntries: [`MAX_APPEND_ENTRIES`], fewer if that many
    /// requests of the largest allowed size would not fit in one peer message
    /// (an oversized message would fail on every retry). With etcd's default
    /// quota and request limit that is 1,407.
    pub fn max_payload_entries(&self) -> u64 {
        let per_entry = self.max_request_bytes + ENTRY_OVERHEAD_BYTES;
        (self.max_peer_message_bytes as u64 / per_entry).clamp(1, MAX_APPEND_ENTRIES)
    }

    /// openraft's configuration for these settings (also used by the simulation).
    pub fn raft_config(&self) -> Result<openraft::Config, String> {
        let config = openraft::Config {
            cluster_name: "concord".to_string(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_ms,
            // openraft uses the maximum as the leader lease and twice it as the wait of
            // a member with a shorter log: 1.5x keeps failover near two election
            // timeouts while still spreading candidates apart.
            election_timeout_max: self.election_timeout_ms * 3 / 2,
            // PreVote: a partitioned member rejoining must not inflate the term and
            // depose a healthy leader.
            enable_pre_vote: Some(true),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_count),
            max_in_snapshot_log_to_keep: self.snapshot_catchup_entries,
            install_snapshot_timeout: 10_000,
            max_payload_entries: self.max_payload_entries(),
            ..Default::default()
        };
        config.validate().map_err(|e| e.to_string())
    }
}

/// Classifies a failed `client_write` by whether the entry may still commit.
pub fn client_write_error(
    e: openraft::errors::RaftError<TypeConfig, openraft::errors::ClientWriteError<TypeConfig>>,
) -> ConsensusError {
    use openraft::errors::{ClientWriteError as W, RaftError as R};
    match e {
        R::APIError(W::ForwardToLeader(_)) => ConsensusError::NotLeader,
        R::APIError(W::LogEntryDiscarded(_)) => ConsensusError::LeaderLost,
        R::APIError(e @ (W::ChangeMembershipError(_) | W::PreconditionFailed(_))) => {
            ConsensusError::Fatal(e.to_string())
        }
        R::Fatal(f) => ConsensusError::Fatal(f.to_string()),
    }
}

/// One Raft group on this member: the consensus instance plus its state machine.
#[derive(Clone)]
pub struct Group {
    pub raft: Raft,
    /// This member's id in the group.
    pub id: MemberId,
    pub group_id: GroupId,
    pub backend: Arc<Backend>,
    /// The key index of `backend`'s file: what a [`crate::mvcc::ReadView`] needs.
    pub index: Arc<crate::mvcc::index::KeyIndex>,
    /// The store's current revision, updated after every applied batch; watchers
    /// and lock waiters wait on it instead of polling storage.
    pub revision: tokio::sync::watch::Receiver<crate::mvcc::Rev>,
    /// The auth store's revision as of the last applied batch: lets a request
    /// reuse the cached auth state without opening a read transaction.
    pub auth_revision: Arc<std::sync::atomic::AtomicU64>,
    peers: network::PeerPool,
    apply_gate: Arc<state_machine::ApplyGate>,
    /// Disk and network timings for `/metrics`.
    pub stats: Arc<crate::stats::GroupStats>,
    /// This member's copy of the replicated simple auth tokens.
    pub tokens: Arc<crate::auth::SimpleTokens>,
    /// The service that answers [`Group::call_leader`] requests while this member
    /// leads (set once, after the group starts).
    leader_calls: Arc<std::sync::OnceLock<Arc<dyn LeaderCalls>>>,
}

/// Requests that only the leader can answer but that need no log entry (the
/// lessor's in-memory renewals, for example). They reach the leader on the
/// follower's existing peer connection; the bytes are the service's own.
pub trait LeaderCalls: Send + Sync {
    /// Answers `req` on this member. `Err(NotLeader)` when it does not lead: the
    /// caller retries at the current leader.
    fn call(&self, req: Vec<u8>) -> openraft::base::BoxFuture<'static, Result<Vec<u8>, ConsensusError>>;
}

impl Group {
    /// Opens the durable state of group `group_id` in `dir` and starts its Raft core.
    pub async fn start(
        id: MemberId,
        group_id: GroupId,
        dir: &std::path::Path,
        config: &GroupConfig,
    ) -> Result<(Group, log_store::LogStore), Box<dyn std::error::Error + Send + Sync>> {
        std::fs::create_dir_all(dir)?;
        // Crash point: a defragmentation that died before its switch-over leaves
        // an unfinished copy; the live file is intact.
        match std::fs::remove_file(dir.join("state.redb.defrag")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let backend = Arc::new(Backend::open(&dir.join("state.redb"))?);
        if crate::mvcc::upgrade::upgrade_layout(&backend)? {
            tracing::info!(dir = %dir.display(), "converted the state file to the revision-keyed history layout");
        }
        let index = Arc::new(crate::mvcc::index::KeyIndex::open(&backend.begin_read()?)?);
        let stats = Arc::new(crate::stats::GroupStats::default());
        let log = log_store::LogStore::open(&dir.join("log"), group_id, id, stats.clone())?;
        let tokens = Arc::new(crate::auth::SimpleTokens::new(config.auth_token_ttl));
        let answers = Arc::new(state_machine::LocalAnswers::new(id));
        let (sm, revision) = state_machine::StateMachine::new(
            backend.clone(),
            index.clone(),
            dir.join("snap"),
            stats.clone(),
            tokens.clone(),
        )?;
        let sm = sm.with_local_answers(answers.clone());
        let apply_gate = sm.gate();
        let auth_revision = sm.auth_revision();
        // Raft RPCs get at least two election timeouts (see `PeerPool::min_rpc_timeout`).
        let min_rpc_timeout = Duration::from_millis(config.election_timeout_ms * 2);
        let peers = network::PeerPool::new(
            config.max_peer_message_bytes,
            Some(stats.clone()),
            min_rpc_timeout,
            config.peer_tls.clone(),
        )
        .with_local_answers(answers)
        .with_log_progress(log.progress())
        .with_group(group_id);
        let raft_config = Arc::new(config.raft_config()?);
        // Raft's tasks draw their randomness from this seed (see [`Runtime`]).
        let raft = Runtime::scope(rand::random(), openraft::Raft::new(id, raft_config, peers.clone(), log.clone(), sm))
            .await?;
        let group = Group {
            raft,
            id,
            group_id,
            backend,
            index,
            revision,
            auth_revision,
            peers,
            apply_gate,
            stats,
            tokens,
            leader_calls: Arc::default(),
        };
        Ok((group, log))
    }

    /// Proposes a command and waits for its applied result. Followers forward it to
    /// the leader over the peer service.
    pub async fn propose(&self, cmd: Command, timeout: Duration) -> Result<CommandResult, ConsensusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let cmd = &cmd;
        let local = || async move {
            match tokio::time::timeout_at(deadline, self.raft.client_write(cmd.clone())).await {
                Err(_) => Err(ConsensusError::Timeout),
                Ok(Ok(resp)) => Ok(resp.data),
                Ok(Err(e)) => Err(client_write_error(e)),
            }
        };
        let remote = |node: PeerInfo, left| async move { self.peers.propose(&node, cmd, left).await };
        self.at_leader(deadline, local, remote).await
    }

    /// Runs a request at the current leader: `local` when this member leads, else
    /// `remote` with the leader's peer info and the time left. Retried while the
    /// member asked is not the leader or none is known (the request was then not
    /// submitted anywhere), until `deadline`, after which it fails with `NoLeader`.
    async fn at_leader<T, L, LF, R, RF>(
        &self,
        deadline: tokio::time::Instant,
        local: L,
        remote: R,
    ) -> Result<T, ConsensusError>
    where
        L: Fn() -> LF,
        LF: std::future::Future<Output = Result<T, ConsensusError>>,
        R: Fn(PeerInfo, Duration) -> RF,
        RF: std::future::Future<Output = Result<T, ConsensusError>>,
    {
        loop {
            let leader = self.wait_leader(deadline).await?;
            let attempt = if leader == self.id {
                local().await
            } else {
                let node = self.node_of(leader).ok_or(ConsensusError::NoLeader)?;
                remote(node, deadline.saturating_duration_since(tokio::time::Instant::now())).await
            };
            match attempt {
                Err(ConsensusError::NotLeader | ConsensusError::NoLeader) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ConsensusError::NoLeader);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// Registers the service that answers [`Group::call_leader`] on this member.
    /// Only the first registration counts.
    pub fn serve_leader_calls(&self, service: Arc<dyn LeaderCalls>) {
        let _ = self.leader_calls.set(service);
    }

    /// Answers a [`LeaderCalls`] request on this member (a follower's forwarded one,
    /// or this member's own while it leads).
    pub async fn local_leader_call(&self, req: Vec<u8>) -> Result<Vec<u8>, ConsensusError> {
        match self.leader_calls.get() {
            Some(service) => service.call(req).await,
            None => Err(ConsensusError::Fatal("no service answers leader calls on this member".into())),
        }
    }

    /// Has the current leader answer `req` (see [`LeaderCalls`]); retried at the
    /// next leader while the one asked is not the leader, until `timeout`.
    pub async fn call_leader(&self, req: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, ConsensusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let req = &req;
        let local = || async move {
            match tokio::time::timeout_at(deadline, self.local_leader_call(req.clone())).await {
                Ok(r) => r,
                Err(_) => Err(ConsensusError::Timeout),
            }
        };
        let remote = |node: PeerInfo, left| async move { self.peers.call_leader(&node, req.clone(), left).await };
        self.at_leader(deadline, local, remote).await
    }

    /// Waits until the local state machine has applied everything committed before
    /// this call (ReadIndex: the leader confirms its leadership with a quorum).
    pub async fn read_barrier(&self, timeout: Duration) -> Result<(), ConsensusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let index = loop {
            let leader = self.wait_leader(deadline).await?;
            let attempt = if leader == self.id {
                self.local_read_index().await
            } else {
                let node = self.node_of(leader).ok_or(ConsensusError::NoLeader)?;
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                self.peers.read_index(&node, remaining).await
            };
            match attempt {
                Ok(i) => break i,
                // A read has no side effect: any failure to get an index is retried.
                Err(ConsensusError::NotLeader | ConsensusError::NoLeader | ConsensusError::LeaderLost) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ConsensusError::Timeout);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.raft
            .wait(Some(remaining))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map_err(|_| ConsensusError::Timeout)?;
        Ok(())
    }

    /// The leader's side of ReadIndex: confirm leadership, return the read index.
    pub async fn local_read_index(&self) -> Result<u64, ConsensusError> {
        match self.raft.get_read_linearizer(ReadPolicy::ReadIndex).await {
            Ok(lin) => Ok(lin.read_log_id().index()),
            Err(openraft::errors::RaftError::APIError(openraft::errors::LinearizableReadError::ForwardToLeader(_))) => {
                Err(ConsensusError::NotLeader)
            }
            Err(openraft::errors::RaftError::APIError(e)) => {
                tracing::debug!("read index not confirmed: {e}");
                Err(ConsensusError::NoLeader)
            }
            Err(e) => Err(ConsensusError::Fatal(e.to_string())),
        }
    }

    async fn wait_leader(&self, deadline: tokio::time::Instant) -> Result<MemberId, ConsensusError> {
        let mut rx = self.raft.metrics();
        loop {
            {
                let m = rx.borrow_and_update();
                if let Err(e) = &m.running_state {
                    return Err(ConsensusError::Fatal(e.to_string()));
                }
                if let Some(l) = m.current_leader {
                    return Ok(l);
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ConsensusError::Fatal("raft metrics closed".into())),
                Err(_) => return Err(ConsensusError::NoLeader),
            }
        }
    }

    fn node_of(&self, id: MemberId) -> Option<PeerInfo> {
        self.raft.metrics().borrow_watched().membership_config.membership().get_node(&id).cloned()
    }

    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow_watched().clone()
    }

    /// Rewrites this member's state file densely without stopping reads or writes
    /// (see [`state_machine::defragment`]).
    pub async fn defragment(&self) -> std::io::Result<()> {
        let (backend, gate) = (self.backend.clone(), self.apply_gate.clone());
        tokio::task::spawn_blocking(move || state_machine::defragment(&backend, &gate))
            .await
            .map_err(std::io::Error::other)?
    }

    /// A subscription to changes of this member's role, vote (term), leader or
    /// membership.
    pub fn role_changes(&self) -> RoleChanges {
        RoleChanges(self.raft.server_metrics())
    }

    /// The current Raft term, without copying the whole metrics (every response
    /// header carries it).
    pub fn current_term(&self) -> u64 {
        self.raft.metrics().borrow_watched().current_term
    }

    /// Resolves when the Raft core has stopped for good, with the reason.
    pub async fn fatal(&self) -> String {
        // The core drops its metrics senders when it stops (after recording the
        // reason in `running_state`), which ends the subscription.
        let mut changes = self.role_changes();
        loop {
            if let Err(e) = &self.raft.metrics().borrow_watched().running_state {
                return e.to_string();
            }
            if !changes.changed().await {
                return match &self.raft.metrics().borrow_watched().running_state {
                    Err(e) => e.to_string(),
                    Ok(()) => "raft core stopped".into(),
                };
            }
        }
    }
}

/// Changes of a member's role, vote, leader or membership (openraft's server
/// metrics). Waiters that care only about those use this rather than Raft's full
/// metrics, which change several times per write (log, commit and apply indexes):
/// a task waiting on those was woken, and the process's main thread too, on
/// every write (traced: ~4 futex wake-ups of the main thread per 1-client put).
pub struct RoleChanges(
    openraft::type_config::alias::WatchReceiverOf<TypeConfig, openraft::metrics::RaftServerMetrics<TypeConfig>>,
);

impl RoleChanges {
    /// The leader and term as of the latest change, which counts as seen.
    pub fn leader_and_term(&mut self) -> (Option<MemberId>, u64) {
        let m = self.0.borrow_and_update();
        (m.current_leader, m.vote.leader_id().term)
    }

    /// Waits for a change not yet seen; false once the Raft core is gone.
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commands keep the wire form they had as `u8` sequences, so existing logs,
    /// snapshots and peers decode them unchanged.
    #[test]
    fn byte_strings_encode_as_before() {
        #[derive(Serialize)]
        enum Old {
            Put(Vec<u8>),
        }
        let bytes: Vec<u8> = (0..=255u8).chain([0, 1, 250, 251, 252, 255]).collect();
        let config = bincode::config::standard();
        let old = bincode::serde::encode_to_vec(Old::Put(bytes.clone()), config).expect("encode");
        let new = bincode::serde::encode_to_vec(Command::Put(bytes.clone()), config).expect("encode");
        assert_eq!(old, new);
        let (back, _): (Command, _) = bincode::serde::decode_from_slice(&old, config).expect("decode");
        assert!(matches!(back, Command::Put(b) if b == bytes));
    }

    #[test]
    fn append_entries_fit_in_a_peer_message() {
        let config = |peer: usize, request: u64| GroupConfig {
            heartbeat_ms: 100,
            election_timeout_ms: 1000,
            snapshot_count: 100_000,
            snapshot_catchup_entries: 5000,
            max_peer_message_bytes: peer,
            max_request_bytes: request,
            auth_token_ttl: Duration::from_secs(300),
            peer_tls: None,
        };
        let default = config((2 << 30) + (64 << 20), 1_572_864);
        assert_eq!(default.max_payload_entries(), 1407);
        assert_eq!(config(1 << 40, 1024).max_payload_entries(), MAX_APPEND_ENTRIES);
        assert_eq!(config(1 << 20, 8 << 20).max_payload_entries(), 1);
        for c in [default, config(64 << 20, 1 << 20)] {
            let worst = c.max_payload_entries() * (c.max_request_bytes + ENTRY_OVERHEAD_BYTES);
            assert!(worst <= c.max_peer_message_bytes as u64);
            assert_eq!(c.raft_config().expect("valid").max_payload_entries, c.max_payload_entries());
        }
    }
}
