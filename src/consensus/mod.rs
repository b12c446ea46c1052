//! Consensus: the Raft runtime, openraft behind concord's own types. It knows
//! nothing of the services it runs: a group replicates opaque command bytes and
//! hands them to its [`service::Service`] (the etcd store is one, in
//! `crate::etcd_store`).
//!
//! What this layer guarantees to the services above it:
//! - Commands handed to [`Group::propose`] are applied in log order on every
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

pub mod journal;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod quiesce;
pub mod service;
pub mod snapshot;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::raft::ReadPolicy;
use serde::{Deserialize, Serialize};

/// A member's identity in the cluster (etcd's member ID).
pub type MemberId = u64;

/// Identifies a Raft group among the groups a node hosts.
pub type GroupId = u64;

/// The group every member has hosted from the start (the etcd store's; its data
/// directory is `group-1`). Peer requests that name no group are for it.
pub const FIRST_GROUP: GroupId = 1;

/// The groups this node hosts, by id: where the peer service sends each request;
/// and what the node heard from its peers' liveness pings (see [`quiesce`]).
#[derive(Clone, Default)]
pub struct GroupRegistry {
    groups: Arc<std::sync::RwLock<std::collections::BTreeMap<GroupId, Group>>>,
    liveness: Arc<quiesce::Liveness>,
}

impl GroupRegistry {
    /// Adds (or replaces) `group` under its id.
    pub fn insert(&self, group: Group) {
        self.groups.write().expect("group registry poisoned").insert(group.group_id, group);
    }

    pub fn get(&self, id: GroupId) -> Option<Group> {
        self.groups.read().expect("group registry poisoned").get(&id).cloned()
    }

    /// Stops routing requests to group `id`.
    pub fn remove(&self, id: GroupId) -> Option<Group> {
        self.groups.write().expect("group registry poisoned").remove(&id)
    }

    /// Every group hosted, in id order.
    pub fn all(&self) -> Vec<Group> {
        self.groups.read().expect("group registry poisoned").values().cloned().collect()
    }

    pub fn liveness(&self) -> &quiesce::Liveness {
        &self.liveness
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
pub mod raw_bytes {
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

    /// A `Vec<u8>` that (de)serializes as a byte string: for a byte string that
    /// is a whole message or a `Result`'s value (same encoding as the `Vec<u8>`).
    #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    pub struct ByteString(#[serde(with = "self")] pub Vec<u8>);
}

/// Tokio, with openraft's randomness (election timeouts, tick jitter) drawn from a
/// seed carried by the task that starts Raft and inherited by every task Raft
/// spawns. A member seeds it from the OS ([`Group::start`]); the deterministic
/// simulation (`tests/simulation.rs`) seeds it from the run's seed, so one seed
/// replays one run. Rejected: plain `TokioRuntime`, whose thread RNG cannot be seeded.
pub type Runtime = openraft::rt::deterministic_rng::DeterministicRng<openraft::TokioRuntime>;

/// bincode decoding in the standard configuration (what every encoder here
/// uses) that input cannot make allocate more than a small multiple of its own
/// size. bincode allocates a string or byte buffer at the length its prefix
/// claims before reading it, so an unbounded decode of 20 hostile bytes could ask
/// for exabytes and abort the process (found by the `peer_message` fuzz target).
/// A decoder's claims (in-memory sizes: at most 16 bytes per input byte for an
/// integer, the exact length for bytes and strings) are capped at the first rung
/// of a ladder of limits at or above 16 × the input's length, so legitimate
/// input always decodes. Returns the value and the bytes read, as
/// `decode_from_slice` does.
pub fn decode_bounded<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<(T, usize), bincode::error::DecodeError> {
    let need = (b.len() as u64).saturating_mul(16).saturating_add(4096);
    macro_rules! ladder {
        ($($limit:expr),*) => {$(
            if need <= $limit {
                return bincode::serde::decode_from_slice(b, bincode::config::standard().with_limit::<{ $limit as usize }>());
            }
        )*};
    }
    ladder!(
        1u64 << 16,
        1u64 << 18,
        1u64 << 20,
        1u64 << 22,
        1u64 << 24,
        1u64 << 26,
        1u64 << 28,
        1u64 << 30,
        1u64 << 32,
        1u64 << 34,
        1u64 << 36
    );
    bincode::serde::decode_from_slice(b, bincode::config::standard().with_limit::<{ 1usize << 40 }>())
}

thread_local! {
    /// Where [`fresh_seed`] draws from on this thread, when set (see
    /// [`seed_this_thread`]).
    static SEEDS: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// A seed for the runtime's randomness (openraft's timers, the ids of forwarded
/// proposals, a node's incarnation): from the OS, or from the sequence
/// [`seed_this_thread`] started, so a single-threaded simulation draws the same
/// seeds in every run of one seed.
pub fn fresh_seed() -> u64 {
    SEEDS.with(|s| match s.get() {
        None => rand::random(),
        Some(state) => {
            // SplitMix64.
            let next = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            s.set(Some(next));
            let z = (next ^ (next >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    })
}

/// Makes [`fresh_seed`] on this thread a sequence starting from `seed` (for the
/// deterministic simulation, whose tasks all run on its thread).
pub fn seed_this_thread(seed: u64) {
    SEEDS.with(|s| s.set(Some(seed)));
}

openraft::declare_raft_types!(
    /// concord's Raft type configuration: entries carry a service's bytes.
    pub TypeConfig:
        D = service::Proposal,
        R = Vec<u8>,
        NodeId = MemberId,
        Node = PeerInfo,
        AsyncRuntime = Runtime,
);

pub type Raft = openraft::Raft<TypeConfig, service::ServiceMachine>;
pub type SnapshotData = snapshot::SnapshotFile;
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
    /// Largest peer message (an AppendEntries batch; snapshots travel in chunks,
    /// see [`snapshot`]): bounds peer memory.
    pub max_peer_message_bytes: usize,
    /// Largest command a client can make (`--max-request-bytes`): with the peer
    /// message limit, it bounds how many entries one AppendEntries may carry.
    pub max_request_bytes: u64,
    /// TLS for connections to peers (`None`: plain http).
    pub peer_tls: Option<network::PeerTls>,
    /// The node's connections to its peers, shared by all its groups (a group
    /// started with a config clone uses the same connections).
    pub peer_channels: network::PeerChannels,
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

/// One Raft group on this member: the consensus instance over its service.
#[derive(Clone)]
pub struct Group {
    pub raft: Raft,
    /// This member's id in the group.
    pub id: MemberId,
    pub group_id: GroupId,
    peers: network::PeerPool,
    /// Disk and network timings for `/metrics`.
    pub stats: Arc<crate::stats::GroupStats>,
    /// The service that answers [`Group::call_leader`] requests while this member
    /// leads (set once, after the group starts).
    leader_calls: Arc<std::sync::OnceLock<Arc<dyn LeaderCalls>>>,
    /// The service that answers [`Group::call_member`] requests (set once).
    member_calls: Arc<std::sync::OnceLock<Arc<dyn MemberCalls>>>,
    /// Where snapshots sent by the leader are received (unlinked scratch files).
    snapshot_dir: Arc<std::path::PathBuf>,
    /// Whether this replica is quiescent (see [`quiesce`]): per Raft instance, so
    /// a restarted replica starts awake.
    quiet: Arc<std::sync::Mutex<quiesce::QuietState>>,
}

/// Requests that only the leader can answer but that need no log entry (the
/// lessor's in-memory renewals, for example). They reach the leader on the
/// follower's existing peer connection; the bytes are the service's own.
pub trait LeaderCalls: Send + Sync {
    /// Answers `req` on this member. `Err(NotLeader)` when it does not lead: the
    /// caller retries at the current leader.
    fn call(&self, req: Vec<u8>) -> openraft::base::BoxFuture<'static, Result<Vec<u8>, ConsensusError>>;
}

/// Requests a service sends to one chosen member (a joining member's question
/// for the member registry, a corruption check's HashKV), on the `Admin` peer
/// call; the bytes are the service's own.
pub trait MemberCalls: Send + Sync {
    fn call(&self, req: Vec<u8>) -> openraft::base::BoxFuture<'static, Result<Vec<u8>, String>>;
}

impl Group {
    /// Starts the Raft core of group `group_id` over `log` and `service`;
    /// snapshots from the leader are received in `snapshot_dir`. `stats` gets the
    /// group's disk and network timings.
    pub async fn start(
        id: MemberId,
        group_id: GroupId,
        log: log_store::LogStore,
        service: Box<dyn service::Service>,
        snapshot_dir: &std::path::Path,
        config: &GroupConfig,
        stats: Arc<crate::stats::GroupStats>,
    ) -> Result<Group, Box<dyn std::error::Error + Send + Sync>> {
        let answers = Arc::new(service::LocalAnswers::new(id));
        let sm = service::ServiceMachine::new(service, Some(answers.clone()));
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
        .with_channels(config.peer_channels.clone())
        .with_group(group_id);
        let raft_config = Arc::new(config.raft_config()?);
        // Raft's tasks draw their randomness from this seed (see [`Runtime`]).
        let raft = Runtime::scope(fresh_seed(), openraft::Raft::new(id, raft_config, peers.clone(), log, sm)).await?;
        let snapshot_dir = Arc::new(snapshot_dir.to_path_buf());
        Ok(Group {
            raft,
            id,
            group_id,
            peers,
            stats,
            leader_calls: Arc::default(),
            member_calls: Arc::default(),
            snapshot_dir,
            quiet: Arc::default(),
        })
    }

    /// Where snapshots sent by the leader are received.
    pub fn snapshot_dir(&self) -> &std::path::Path {
        &self.snapshot_dir
    }

    /// The connections this group's requests to peers go out on.
    pub fn peers(&self) -> &network::PeerPool {
        &self.peers
    }

    /// Proposes a service's command and waits for its applied reply. Followers
    /// forward it to the leader over the peer service; `alone` when the reply may
    /// be large (it then does not share a forwarding RPC with others).
    pub async fn propose(&self, body: Vec<u8>, alone: bool, timeout: Duration) -> Result<Vec<u8>, ConsensusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let body = &body;
        let local = || async move {
            self.wake().await;
            let proposal = service::Proposal { origin: None, body: body.clone() };
            match tokio::time::timeout_at(deadline, self.raft.client_write(proposal)).await {
                Err(_) => Err(ConsensusError::Timeout),
                Ok(Ok(resp)) => Ok(resp.data),
                Ok(Err(e)) => Err(client_write_error(e)),
            }
        };
        let remote = |node: PeerInfo, left| async move { self.peers.propose(&node, body, alone, left).await };
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
            // A member of a just-created group may know its leader before the
            // membership naming the leader's address: not submitted, so retried.
            let attempt = match (leader == self.id, self.node_of(leader)) {
                (true, _) => local().await,
                (false, Some(node)) => {
                    remote(node, deadline.saturating_duration_since(tokio::time::Instant::now())).await
                }
                (false, None) => Err(ConsensusError::NoLeader),
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

    /// Registers the service that answers [`Group::call_member`] on this member.
    /// Only the first registration counts.
    pub fn serve_member_calls(&self, service: Arc<dyn MemberCalls>) {
        let _ = self.member_calls.set(service);
    }

    /// Answers a [`MemberCalls`] request on this member.
    pub async fn local_member_call(&self, req: Vec<u8>) -> Result<Vec<u8>, String> {
        match self.member_calls.get() {
            Some(service) => service.call(req).await,
            None => Err("no service answers member calls on this member yet".into()),
        }
    }

    /// Has member `id` answer `req` (see [`MemberCalls`]).
    pub async fn call_member(&self, id: MemberId, req: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, String> {
        if id == self.id {
            return self.local_member_call(req).await;
        }
        let node = self.node_of(id).ok_or_else(|| format!("{id:x} is not a Raft member"))?;
        self.peers.member_call(&node, req, timeout).await
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
            let attempt = match (leader == self.id, self.node_of(leader)) {
                (true, _) => self.local_read_index().await,
                (false, Some(node)) => {
                    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                    self.peers.read_index(&node, remaining).await
                }
                // The leader's address is not known here yet (a just-created group).
                (false, None) => Err(ConsensusError::NoLeader),
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
    /// Bounded by [`Group::leadership_check_timeout`]: a leader that cannot hear
    /// a quorum by then answers `NoLeader`, and the reader asks again.
    pub async fn local_read_index(&self) -> Result<u64, ConsensusError> {
        let check = self.raft.get_read_linearizer(ReadPolicy::ReadIndex);
        let Ok(answer) = tokio::time::timeout(self.leadership_check_timeout(), check).await else {
            return Err(ConsensusError::NoLeader);
        };
        match answer {
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

    /// How long a leader waits for a quorum to confirm its leadership (a read
    /// index, a wake): twice the longest election timeout, after which a leader
    /// cut off from its followers has been replaced anyway.
    pub fn leadership_check_timeout(&self) -> Duration {
        Duration::from_millis(self.raft.config().election_timeout_max.saturating_mul(2))
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

    pub fn node_of(&self, id: MemberId) -> Option<PeerInfo> {
        self.raft.metrics().borrow_watched().membership_config.membership().get_node(&id).cloned()
    }

    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow_watched().clone()
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

    /// A hostile length prefix is an error, not an allocation that aborts the
    /// process; legitimate values decode, also ones whose in-memory size is many
    /// times their encoding (small integers in a vector).
    #[test]
    fn bounded_decoding_refuses_huge_claims_and_keeps_real_values() {
        // A string claiming ~2^62 bytes (the peer_message fuzz target's first find).
        let hostile = [0xfd_u8, 0, 0, 0, 0, 0, 0, 0, 0x36, 0xab, 0x0e];
        assert!(decode_bounded::<String>(&hostile).is_err());
        assert!(decode_bounded::<Vec<u8>>(&[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]).is_err());
        let config = bincode::config::standard();
        let numbers: Vec<u64> = (0..100_000).map(|i| i % 200).collect();
        let bytes = bincode::serde::encode_to_vec(&numbers, config).expect("encode");
        assert_eq!(decode_bounded::<Vec<u64>>(&bytes).expect("decode").0, numbers);
        let big = (vec![7u8; 5 << 20], "name".to_string(), vec![(1i64, 2u64, 3i64); 1000]);
        let bytes = bincode::serde::encode_to_vec(&big, config).expect("encode");
        assert_eq!(decode_bounded::<(Vec<u8>, String, Vec<(i64, u64, i64)>)>(&bytes).expect("decode").0, big);
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
            peer_tls: None,
            peer_channels: Default::default(),
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
