//! The member process: configuration, bootstrap, the client and peer gRPC
//! listeners, and supervision of the Raft group.
//!
//! Startup order (each step relies on the previous one):
//! 1. open the group's log and state machine (refusing a corrupted log);
//! 2. fresh data dir: record the member identity durably, then bootstrap Raft with
//!    `--initial-cluster` (state `new`) or wait to be added (state `existing`);
//!    existing data dir: the stored identity wins and initial-cluster flags are
//!    ignored, as etcd does;
//! 3. serve peers, then clients; publish this member's name and client URLs
//!    through Raft (etcd's `publish`);
//! 4. if the Raft group stops (storage failure, panicked core), exit non-zero —
//!    a member must never keep answering from a dead group.

pub mod auth;
pub mod blob;
pub mod cluster;
pub mod cluster_view;
pub mod compactor;
pub mod config;
pub mod corruption;
pub mod errors;
pub mod gateway;
pub mod groups;
pub mod h2_authority;
pub mod http;
pub mod kv;
pub mod lease;
pub mod metrics;
pub mod queue;
pub mod recipes;
pub mod redis;
pub mod s3;
pub mod stream_place;
pub mod tls;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::consensus::log_store::NodeLog;
use crate::consensus::network::PeerService;
use crate::consensus::{GroupConfig, GroupRegistry, MemberId, PeerInfo, FIRST_GROUP};
use crate::etcd_store::members::{cluster_id, member_id, MemberChange};
use crate::etcd_store::mvcc::ReadView;
use crate::etcd_store::{Command, CommandResult, EtcdStore};
use crate::proto::blob::blob_server::BlobServer;
use crate::proto::etcdserverpb::auth_server::AuthServer;
use crate::proto::etcdserverpb::cluster_server::ClusterServer;
use crate::proto::etcdserverpb::kv_server::KvServer;
use crate::proto::etcdserverpb::lease_server::LeaseServer;
use crate::proto::etcdserverpb::maintenance_server::MaintenanceServer;
use crate::proto::etcdserverpb::watch_server::WatchServer;
use crate::proto::etcdserverpb::ResponseHeader;
use crate::proto::groups::groups_server::GroupsServer;
use crate::proto::groups::registers_server::RegistersServer;
use crate::proto::queue::queue_server::QueueServer;
use crate::proto::v3electionpb::election_server::ElectionServer;
use crate::proto::v3lockpb::lock_server::LockServer;
use crate::supervisor::Supervisor;
use config::{ClusterState, Config};

/// The etcd release whose v3 API and behaviour concord reproduces; reported as the
/// server version so clients enable the matching features.
pub const ETCD_COMPAT_VERSION: &str = "3.4.23";

/// gRPC framing allowance on top of `--max-request-bytes` (etcd: 512 KiB).
const GRPC_OVERHEAD_BYTES: u64 = 512 * 1024;

/// The peer message limit is the quota plus this margin: an AppendEntries batch
/// may carry as many entries of the largest allowed request as fit in it (see
/// `GroupConfig::max_payload_entries`), and a peer cannot make a member buffer
/// more than one such message. Snapshots travel in 1 MiB chunks
/// (`consensus::snapshot`), not in one message.
const PEER_MESSAGE_MARGIN_BYTES: u64 = 64 * 1024 * 1024;

/// HTTP/2 streams open at once on one peer connection. A member pair shares one
/// connection for all groups, and each group keeps up to ~4 long-lived streams on
/// it (a replication stream and a heartbeat lane per follower, a follower's `Mux`
/// to its leader) besides short calls: room for every catalog group
/// (`etcd_store::catalog::MAX_GROUPS`) and the etcd store's. hyper's default, 200,
/// would stall the groups past ~50.
const MAX_PEER_STREAMS_PER_CONNECTION: u32 = 4 * (crate::etcd_store::catalog::MAX_GROUPS as u32 + 1) + 64;

/// Peer connections served at once per peer listener (a cluster has a handful
/// of members, each holding one or two connections).
const MAX_PEER_CONNECTIONS: usize = 256;

/// What a data dir remembers about its member, written once at bootstrap.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    member_id: MemberId,
    cluster_id: u64,
    /// Whether this member bootstrapped the cluster (state `new`): such a member
    /// re-issues the idempotent Raft initialisation after a crash mid-bootstrap.
    bootstrapped: bool,
    /// A log index at which the member registry listed this member: where a
    /// joining member found itself (0 for a bootstrap member). Removal is judged
    /// only against registries at least this fresh.
    listed_from: u64,
}

/// Computes a bootstrapping member's identity from `--initial-cluster` (state
/// `new`) and writes it to `<data-dir>/member/identity`. Must be durable before Raft
/// is initialised: a restart has to recognise its own identity rather than
/// bootstrap a second time.
pub fn write_bootstrap_identity(config: &Config) -> Result<Identity, BoxError> {
    let ids: Vec<MemberId> =
        config.initial_cluster.iter().map(|(_, urls)| member_id(urls, &config.initial_cluster_token, None)).collect();
    let identity = Identity {
        member_id: member_id(&config.initial_advertise_peer_urls, &config.initial_cluster_token, None),
        cluster_id: cluster_id(&ids),
        bootstrapped: true,
        listed_from: 0,
    };
    save_new_identity(config, &identity)?;
    Ok(identity)
}

fn save_new_identity(config: &Config, identity: &Identity) -> Result<(), BoxError> {
    let member_dir = config.data_dir.join("member");
    std::fs::create_dir_all(&member_dir)?;
    save_identity(&member_dir.join("identity"), identity)
}

/// How long a member joining an existing cluster keeps asking the peers in
/// `--initial-cluster` for the member list before giving up.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A member started with `--initial-cluster-state existing` learns its ID (given
/// by `MemberAdd`) and the cluster ID from a running peer, matching its own
/// `--initial-advertise-peer-urls` against the member registry, as etcd does.
async fn join_identity(config: &Config) -> Result<Identity, BoxError> {
    let pool = crate::consensus::network::PeerPool::new(1024 * 1024, None, Duration::from_secs(2), peer_tls(config)?);
    let mine: std::collections::BTreeSet<&String> = config.initial_advertise_peer_urls.iter().collect();
    let peers: Vec<&String> =
        config.initial_cluster.iter().flat_map(|(_, urls)| urls).filter(|u| !mine.contains(u)).collect();
    if peers.is_empty() {
        return Err("--initial-cluster-state existing needs at least one other member in --initial-cluster".into());
    }
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    let mut last_error = String::new();
    while tokio::time::Instant::now() < deadline {
        for url in &peers {
            match crate::etcd_store::cluster_info_at(&pool, url, Duration::from_secs(2)).await {
                Ok(info) => {
                    let found = info
                        .members
                        .iter()
                        .find(|(_, r)| r.peer_urls.iter().collect::<std::collections::BTreeSet<_>>() == mine);
                    let Some((id, _)) = found else {
                        return Err(format!(
                            "member with peer URLs {} is not in the cluster's member list; add it first (etcdctl member add)",
                            config.initial_advertise_peer_urls.join(",")
                        )
                        .into());
                    };
                    let identity = Identity {
                        member_id: *id,
                        cluster_id: info.cluster_id,
                        bootstrapped: false,
                        listed_from: info.applied_index,
                    };
                    save_new_identity(config, &identity)?;
                    return Ok(identity);
                }
                Err(e) => last_error = format!("{url}: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("could not retrieve cluster information from the given URLs ({last_error})").into())
}

/// `member/identity`: crc32 ‖ bincode(identity), written once, atomically.
fn save_identity(path: &std::path::Path, id: &Identity) -> Result<(), BoxError> {
    let body = bincode::serde::encode_to_vec(id, bincode::config::standard())?;
    Ok(crate::storage::write_checksummed(path, &body)?)
}

fn load_identity(path: &std::path::Path) -> Result<Option<Identity>, BoxError> {
    match crate::storage::read_checksummed(path)? {
        None => Ok(None),
        Some(body) => Ok(Some(crate::consensus::decode_bounded(&body)?.0)),
    }
}

/// Everything a request handler needs about this member.
pub struct Node {
    pub config: Config,
    pub group: EtcdStore,
    pub member_id: MemberId,
    pub cluster_id: u64,
    /// Bytes the state machine holds in live pages (an upper bound: the file size,
    /// while that is under half the quota), sampled every [`QUOTA_SAMPLE_INTERVAL`]
    /// (measuring takes a write transaction, too costly per request). Compared
    /// against `--quota-backend-bytes`.
    pub db_in_use_bytes: std::sync::atomic::AtomicU64,
    /// Request and proposal counters, the per-second history and event timeline.
    pub stats: Arc<metrics::ServerStats>,
    /// Token provider and auth-store cache (see [`auth`]).
    pub auth: auth::AuthContext,
    /// Every Raft group this node hosts (the etcd store's and the catalog's),
    /// and what it heard from its peers' liveness pings.
    pub registry: GroupRegistry,
    /// This member's replicas of the catalog's groups (for metrics; the services
    /// that use them hold it too).
    pub host: Arc<groups::GroupHost>,
}

/// How often the quota's size sample is refreshed: writes can overshoot the quota
/// by what is written in this interval.
pub const QUOTA_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

impl Node {
    /// A read transaction on this member's state that holds everything committed
    /// before the call (a read barrier first): linearizable reads of replicated
    /// metadata (alarms, the member registry, the group catalog).
    pub async fn linearizable_txn(&self) -> Result<redb::ReadTransaction, tonic::Status> {
        self.group.read_barrier(self.config.request_timeout()).await.map_err(errors::from_consensus)?;
        self.group.backend.begin_read().map_err(|e| tonic::Status::internal(e.to_string()))
    }

    /// Proposes a command and decodes its applied etcd response. Enforces
    /// `--max-request-bytes` on the encoded request first.
    pub async fn propose<Resp: prost::Message + Default>(&self, cmd: Command) -> Result<Resp, tonic::Status> {
        let size = cmd.payload_bytes();
        if size as u64 > self.config.max_request_bytes {
            return Err(errors::request_too_large());
        }
        let grows = matches!(cmd.inner(), Command::Put(_) | Command::Txn(_) | Command::LeaseGrant { .. });
        if grows && self.over_quota(size as u64).await {
            // etcd's quota check: refuse and raise NOSPACE cluster-wide.
            let alarm = Command::Alarm {
                activate: true,
                member: self.member_id,
                alarm: crate::etcd_store::state_machine::ALARM_NOSPACE,
            };
            if let Err(e) = self.group.propose(alarm, self.config.request_timeout()).await {
                tracing::warn!("raising NOSPACE failed: {e}");
            }
            return Err(errors::no_space());
        }
        let outcome = {
            let _pending = metrics::GaugeGuard::new(self.stats.clone(), |s| &s.proposals_pending);
            self.group.propose(cmd, self.config.request_timeout()).await
        };
        if outcome.is_err() {
            self.stats.proposals_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        match outcome {
            Ok(CommandResult::Ok(bytes)) => Resp::decode(bytes.as_slice())
                .map_err(|e| tonic::Status::internal(format!("etcdserver: undecodable applied result: {e}"))),
            Ok(CommandResult::Err(e)) => Err(errors::from_apply(e)),
            Err(e) => Err(errors::from_consensus(e)),
        }
    }

    /// Whether writing `cost` more bytes would exceed `--quota-backend-bytes`. The
    /// periodic sample answers cheaply; only a sample over the quota is re-measured,
    /// so space freed by a compaction is seen at once.
    async fn over_quota(&self, cost: u64) -> bool {
        let quota = self.config.quota_backend_bytes;
        if self.db_in_use_bytes.load(std::sync::atomic::Ordering::Relaxed) + cost <= quota {
            return false;
        }
        let backend = self.group.backend.clone();
        match tokio::task::spawn_blocking(move || backend.sizes()).await {
            Ok(Ok((_, in_use))) => {
                self.db_in_use_bytes.store(in_use, std::sync::atomic::Ordering::Relaxed);
                in_use + cost > quota
            }
            _ => true,
        }
    }

    /// A consistent local view, after a ReadIndex barrier unless `serializable`.
    /// The view pins its revision in the key index ([`crate::etcd_store::mvcc::index::Pin`]).
    pub async fn read_view(&self, serializable: bool) -> Result<ReadView, tonic::Status> {
        if !serializable {
            self.group.read_barrier(self.config.request_timeout()).await.map_err(errors::from_consensus)?;
        }
        let mut attempts = 0;
        loop {
            let txn = self.group.backend.begin_read().map_err(|e| tonic::Status::internal(e.to_string()))?;
            let alarms =
                crate::etcd_store::state_machine::alarms(&txn).map_err(|e| tonic::Status::internal(e.to_string()))?;
            if alarms.contains(&(self.member_id, crate::etcd_store::state_machine::ALARM_CORRUPT)) {
                return Err(errors::corrupt());
            }
            match ReadView::new(&txn, &self.group.index) {
                // A compaction committed between opening `txn` and pinning it: the
                // next transaction sees it.
                Err(crate::etcd_store::mvcc::MvccError::Retry)
                    if attempts < crate::etcd_store::mvcc::READ_VIEW_ATTEMPTS =>
                {
                    attempts += 1
                }
                r => return r.map_err(errors::from_mvcc),
            }
        }
    }

    /// The header of etcd's Cluster service answers: cluster, member and term, no
    /// revision (etcd's `ClusterServer.header`).
    pub fn member_header(&self) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            raft_term: self.group.current_term(),
            revision: 0,
        }
    }

    /// Fills the response header's identity fields, as etcd's `header.fill` does.
    pub fn fill_header(&self, header: &mut Option<ResponseHeader>) {
        let h = header.get_or_insert_with(ResponseHeader::default);
        h.cluster_id = self.cluster_id;
        h.member_id = self.member_id;
        h.raft_term = self.group.current_term();
        if h.revision == 0 {
            if let Ok(txn) = self.group.backend.begin_read() {
                if let Ok((rev, _)) = crate::etcd_store::mvcc::read_revisions(&txn) {
                    h.revision = rev;
                }
            }
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Resolves an `http(s)://host:port` URL to one socket address to bind.
async fn bind_addr(url: &str) -> Result<SocketAddr, BoxError> {
    let hostport = url.trim_start_matches("http://").trim_start_matches("https://").trim_end_matches('/');
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(hostport).await?.collect();
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs.first().copied().ok_or_else(|| format!("{url} resolves to no address").into())
}

/// Accepted connections with TCP_NODELAY: small gRPC frames (watch creation, votes,
/// heartbeats) must not wait for Nagle's algorithm (tens of ms per round trip).
fn incoming(l: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true))
}

/// The hosts of `urls`, for the names of an auto-TLS certificate.
fn url_hosts(urls: &[String]) -> Vec<String> {
    urls.iter()
        .filter_map(|u| u.split_once("://").map(|(_, rest)| rest.trim_end_matches('/')))
        .filter_map(|hp| hp.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']']).to_string()))
        .collect()
}

/// The TLS client configuration for dialling peers, when any peer URL is https.
fn peer_tls(config: &Config) -> Result<Option<crate::consensus::network::PeerTls>, BoxError> {
    let any_https = config
        .listen_peer_urls
        .iter()
        .chain(config.initial_cluster.iter().flat_map(|(_, u)| u))
        .any(|u| u.starts_with("https://"));
    if !any_https && !config.peer_tls.enabled() {
        return Ok(None);
    }
    let fixtures = config.data_dir.join("fixtures").join("peer");
    let hosts = url_hosts(&config.initial_advertise_peer_urls);
    Ok(Some(Arc::new(config.peer_tls.peer_client_config(&fixtures, &hosts)?)))
}

/// Serves `router` on `l`: TLS when the listen URL is https (with `tls`), plain
/// otherwise; each connection holds one of `slots` while open. `clients` marks a
/// client listener, whose connections get [`h2_authority::AuthorityFix`] (etcd's
/// clients send URL-form `:authority`); peers are concord's own and do not.
async fn serve_listener(
    router: tonic::transport::server::Router,
    l: TcpListener,
    url: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
    slots: Arc<tokio::sync::Semaphore>,
    clients: bool,
) -> Result<(), String> {
    let result = match (url.starts_with("https://"), tls) {
        (true, Some(cfg)) => router.serve_with_incoming(tls::accept_tls(l, slots, cfg, clients)).await,
        (true, None) => return Err(format!("{url}: no TLS certificate configured")),
        (false, _) => router.serve_with_incoming(tls::accept_plain(l, slots, clients)).await,
    };
    result.map_err(|e| format!("server on {url}: {e}"))
}

/// Runs a member until it is stopped by a signal (Ok) or its Raft group dies (Err).
pub async fn run(config: Config) -> Result<(), BoxError> {
    let member_dir = config.data_dir.join("member");
    let max_peer_message_bytes = (config.quota_backend_bytes + PEER_MESSAGE_MARGIN_BYTES) as usize;
    let group_config = GroupConfig {
        heartbeat_ms: config.heartbeat_ms,
        election_timeout_ms: config.election_timeout_ms,
        snapshot_count: config.snapshot_count,
        snapshot_catchup_entries: config.snapshot_catchup_entries,
        max_peer_message_bytes,
        max_request_bytes: config.max_request_bytes,
        peer_tls: peer_tls(&config)?,
        peer_channels: Default::default(),
    };
    let jwt = match &config.auth_token {
        crate::etcd_store::auth::tokens::TokenConfig::Simple => None,
        crate::etcd_store::auth::tokens::TokenConfig::Jwt(j) => {
            Some(crate::etcd_store::auth::tokens::JwtTokens::load(j)?)
        }
    };
    let peer_server_tls = if config.listen_peer_urls.iter().any(|u| u.starts_with("https://")) {
        let fixtures = config.data_dir.join("fixtures").join("peer");
        Some(config.peer_tls.server_config(&fixtures, &url_hosts(&config.initial_advertise_peer_urls), &[b"h2"])?)
    } else {
        None
    };
    let client_server_tls = if config.listen_client_urls.iter().any(|u| u.starts_with("https://")) {
        let fixtures = config.data_dir.join("fixtures").join("client");
        let hosts = url_hosts(&config.advertise_client_urls);
        Some(config.client_tls.server_config(&fixtures, &hosts, &[b"h2", b"http/1.1"])?)
    } else {
        None
    };
    // Bind before starting Raft so a port conflict fails fast and cleanly.
    let mut peer_listeners = Vec::new();
    for u in &config.listen_peer_urls {
        let addr = bind_addr(u).await?;
        peer_listeners.push((u.clone(), TcpListener::bind(addr).await.map_err(|e| format!("listen on {u}: {e}"))?));
    }
    let mut metrics_listeners = Vec::new();
    for u in &config.listen_metrics_urls {
        let addr = bind_addr(u).await?;
        metrics_listeners.push(TcpListener::bind(addr).await.map_err(|e| format!("listen on {u}: {e}"))?);
    }
    let mut s3_listeners = Vec::new();
    for u in &config.listen_s3_urls {
        let addr = config::s3_addr(u)?;
        s3_listeners.push(TcpListener::bind(&addr).await.map_err(|e| format!("listen on {u}: {e}"))?);
    }
    let mut redis_listeners = Vec::new();
    for u in &config.listen_redis_urls {
        let addr = config::redis_addr(u)?;
        redis_listeners.push(TcpListener::bind(&addr).await.map_err(|e| format!("listen on {u}: {e}"))?);
    }
    let mut client_listeners = Vec::new();
    for u in &config.listen_client_urls {
        let addr = bind_addr(u).await?;
        client_listeners.push((u.clone(), TcpListener::bind(addr).await.map_err(|e| format!("listen on {u}: {e}"))?));
    }

    std::fs::create_dir_all(&member_dir)?;
    let identity_path = member_dir.join("identity");
    let initial_members: std::collections::BTreeMap<MemberId, PeerInfo> = config
        .initial_cluster
        .iter()
        .map(|(_, urls)| (member_id(urls, &config.initial_cluster_token, None), PeerInfo { peer_urls: urls.clone() }))
        .collect();
    let identity = match load_identity(&identity_path)? {
        Some(id) => {
            tracing::info!(member = %format!("{:x}", id.member_id), "restarting member; --initial-cluster flags are ignored");
            id
        }
        None if config.initial_cluster_state == ClusterState::New => write_bootstrap_identity(&config)?,
        None => join_identity(&config).await?,
    };

    // The node's one log journal, shared by all its groups, lives where the
    // etcd store's group has always kept its log.
    let stats = Arc::new(crate::stats::GroupStats::default());
    std::fs::create_dir_all(member_dir.join("group-1"))?;
    let node_log = NodeLog::open(&member_dir.join("group-1").join("log"), stats.clone())?;
    let (group, log) = EtcdStore::open(
        identity.member_id,
        FIRST_GROUP,
        &member_dir.join("group-1"),
        &node_log,
        stats,
        &group_config,
        config.auth_token_ttl,
    )
    .await?;
    let entries = log.verify().map_err(|e| format!("raft log in {} is corrupt: {e}", member_dir.display()))?;
    tracing::info!(entries, "raft log verified");
    check_log_end(&member_dir, log.last_index()?)?;
    // A member that crashed between saving its identity and initialising Raft
    // initialises on restart; initialisation is a no-op once any member has done it.
    if identity.bootstrapped && !group.raft.is_initialized().await? {
        match group.raft.initialize(initial_members).await {
            Ok(()) => tracing::info!("bootstrapped a new cluster"),
            Err(e) => tracing::info!("raft already initialised elsewhere: {e}"),
        }
    }

    let registry = GroupRegistry::default();
    registry.insert(group.group.clone());
    let host = Arc::new(groups::GroupHost::new(
        identity.member_id,
        member_dir.join("groups"),
        node_log.clone(),
        registry.clone(),
        group_config.clone(),
    ));
    let node = Arc::new(Node {
        config: config.clone(),
        group: group.clone(),
        member_id: identity.member_id,
        cluster_id: identity.cluster_id,
        db_in_use_bytes: std::sync::atomic::AtomicU64::new(0),
        stats: Arc::default(),
        auth: auth::AuthContext::new(jwt),
        registry: registry.clone(),
        host: host.clone(),
    });
    let supervisor = Supervisor::new();
    supervisor.spawn("metrics-monitor", metrics::run_monitor(node.clone()));
    supervisor.spawn("leader-watch", metrics::watch_leader(node.clone()));
    supervisor.spawn("peer-prober", group.group.clone().run_prober());
    supervisor.spawn("db-size-sampler", sample_db_size(node.clone()));

    let quiescer = crate::consensus::quiesce::Quiescer::new(
        identity.member_id,
        registry.clone(),
        group.group.peers().clone(),
        Duration::from_millis(config.heartbeat_ms),
        Duration::from_millis(config.election_timeout_ms),
    );
    supervisor.spawn("quiescer", quiescer.run());
    let mut tasks = tokio::task::JoinSet::new();
    for (url, l) in peer_listeners {
        let router = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(MAX_PEER_STREAMS_PER_CONNECTION))
            .add_service(PeerService::server(registry.clone(), max_peer_message_bytes));
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PEER_CONNECTIONS));
        let tls = peer_server_tls.clone();
        tasks.spawn(async move { serve_listener(router, l, &url, tls, slots, false).await });
    }
    let client_slots = Arc::new(tokio::sync::Semaphore::new(config.max_client_connections));
    let lessor = crate::etcd_store::lease::Lessor::new(
        group.clone(),
        node.member_id,
        config.election_timeout_ms,
        config.request_timeout(),
        &supervisor,
    );
    supervisor.spawn("lessor", lessor.clone().run());
    let event_cache = watch::EventCache::start(node.clone(), &supervisor);
    let max_recv = (config.max_request_bytes + GRPC_OVERHEAD_BYTES) as usize;
    let queues = Arc::new(queue::QueueService::new(node.clone(), host.clone()));
    let chunk_store =
        crate::blob::chunks::ChunkStore::open(&member_dir.join("blobs"), node.stats.blob.corrupt_found.clone())?;
    let blobs = Arc::new(blob::BlobService::new(
        node.clone(),
        host.clone(),
        Arc::new(chunk_store),
        blob::BlobSettings {
            chunk_bytes: config.blob_chunk_bytes as usize,
            replicas: config.blob_replicas as usize,
            inline_max_bytes: config.blob_inline_max_bytes as usize,
            repair_delay: Duration::from_millis(config.blob_repair_delay_ms),
            scrub_bytes_per_s: config.blob_scrub_bytes_per_s,
        },
        config.blob_max_transfers as usize,
    ));
    for (url, l) in client_listeners {
        let kv = KvServer::new(kv::KvService { node: node.clone() }).max_decoding_message_size(max_recv);
        let watch = WatchServer::new(watch::WatchService {
            node: node.clone(),
            cache: event_cache.clone(),
            progress_interval: config.watch_progress_notify_interval,
        })
        .max_decoding_message_size(max_recv);
        let lease = LeaseServer::new(lease::LeaseService { node: node.clone(), lessor: lessor.clone() })
            .max_decoding_message_size(max_recv);
        let cl = ClusterServer::new(cluster::ClusterService { node: node.clone() }).max_decoding_message_size(max_recv);
        let mt = MaintenanceServer::new(cluster::MaintenanceService { node: node.clone() })
            .max_decoding_message_size(max_recv);
        let lock = LockServer::new(recipes::LockService { node: node.clone(), lessor: lessor.clone() })
            .max_decoding_message_size(max_recv);
        let election = ElectionServer::new(recipes::ElectionService { node: node.clone(), lessor: lessor.clone() })
            .max_decoding_message_size(max_recv);
        let auth = AuthServer::new(auth::AuthService { node: node.clone() }).max_decoding_message_size(max_recv);
        let catalog = GroupsServer::new(groups::GroupsService { node: node.clone(), host: host.clone() })
            .max_decoding_message_size(max_recv);
        let registers = RegistersServer::new(groups::RegistersService { node: node.clone(), host: host.clone() })
            .max_decoding_message_size(max_recv);
        let max_streams = config.max_concurrent_streams;
        let routes = tonic::service::Routes::new(kv)
            .add_service(watch)
            .add_service(lease)
            .add_service(cl)
            .add_service(mt)
            .add_service(lock)
            .add_service(election)
            .add_service(auth)
            .add_service(catalog)
            .add_service(registers)
            .add_service(QueueServer::new(queues.clone()).max_decoding_message_size(max_recv))
            .add_service(BlobServer::new(blob::BlobApi(blobs.clone())).max_decoding_message_size(max_recv))
            .into_axum_router()
            .layer(axum::middleware::from_fn_with_state(node.clone(), http::grpc_stats))
            .merge(http::routes(node.clone()))
            .merge(gateway::routes(json_gateway(&node, &lessor, &event_cache), max_recv));
        let router = tonic::transport::Server::builder()
            .max_concurrent_streams(max_streams)
            // HTTP/1.1 for /health and /metrics; gRPC stays on HTTP/2.
            .accept_http1(true)
            .add_routes(tonic::service::Routes::from(routes));
        let (tls, slots) = (client_server_tls.clone(), client_slots.clone());
        tasks.spawn(async move { serve_listener(router, l, &url, tls, slots, true).await });
    }
    for l in metrics_listeners {
        let app = http::routes(node.clone());
        tasks.spawn(async move {
            tonic::transport::Server::builder()
                .accept_http1(true)
                .add_routes(tonic::service::Routes::from(app))
                .serve_with_incoming(incoming(l))
                .await
                .map_err(|e| format!("metrics server: {e}"))
        });
    }
    tracing::info!(name = %config.name, member = %format!("{:x}", node.member_id), cluster = %format!("{:x}", node.cluster_id), "serving clients on {}", config.listen_client_urls.join(","));
    supervisor.spawn_finite("publish", publish(node.clone()));
    supervisor.spawn("membership-reconciler", group.clone().run_reconciler());
    supervisor.spawn("group-host", host.clone().run(node.clone()));
    // Every member answers stream commands forwarded by other members' gateways
    // (for the streams it holds), whether or not it listens for Redis clients.
    let gateway = Arc::new(redis::RedisGateway { node: node.clone(), host: host.clone() });
    node.group.serve_node_calls(Arc::new(stream_place::StreamCalls {
        redis: Arc::new(redis::ForwardedCalls(Arc::downgrade(&gateway))),
        queue: Arc::new(queue::ForwardedQueueCalls(Arc::downgrade(&queues))),
        blob: Arc::new(blob::ForwardedBlobCalls(Arc::downgrade(&blobs))),
    }));
    supervisor.spawn("queue-keeper", queue::run_keeper(queues.clone()));
    supervisor.spawn("blob-keeper", blob::run_keeper(blobs.clone()));
    supervisor.spawn("blob-repairer", blob::run_repairer(blobs.clone()));
    supervisor.spawn("blob-scrubber", blob::run_scrubber(blobs.clone()));
    for l in s3_listeners {
        let (blobs, max) = (blobs.clone(), config.s3_max_connections);
        supervisor.spawn("s3-listener", async move {
            if let Err(e) = s3::serve(l, blobs, max).await {
                tracing::error!("S3 API: {e}");
            }
        });
    }
    for l in redis_listeners {
        let gateway = gateway.clone();
        let limits = crate::resp::Limits {
            max_bulk_bytes: usize::try_from(config.max_request_bytes).unwrap_or(usize::MAX),
            ..crate::resp::Limits::default()
        };
        let settings = crate::resp::ServerConfig {
            max_clients: config.redis_max_clients,
            limits,
            ..crate::resp::ServerConfig::default()
        };
        supervisor.spawn("redis-listener", crate::resp::serve(l, gateway, settings));
    }
    if let Some(every) = config.corrupt_check_interval {
        supervisor.spawn("corruption-checker", corruption::run(node.clone(), every));
    }
    if let Some(policy) = config.auto_compaction {
        supervisor.spawn("auto-compactor", compactor::run(node.clone(), policy));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome: Result<(), BoxError> = tokio::select! {
        reason = group.fatal() => Err(format!("raft group stopped: {reason}").into()),
        why = supervisor.failed() => Err(why.into()),
        () = removed(group.clone(), config.election_timeout_ms, &identity) => Err("the member has been permanently removed from the cluster".into()),
        Some(res) = tasks.join_next() => match res {
            Ok(Ok(())) => Err("a server task ended unexpectedly".into()),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(format!("server task panicked: {e}").into()),
        },
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    };
    supervisor.stop();
    tasks.abort_all();
    if let Err(e) = group.raft.shutdown().await {
        tracing::warn!("raft shutdown: {e}");
    }
    if outcome.is_ok() {
        group.backend.persist()?;
        let last = log.last_index()?;
        crate::storage::write_checksummed(&member_dir.join(LOG_END_FILE), &last.to_be_bytes())?;
    }
    outcome
}

/// The JSON gateway's own handles on the client services.
fn json_gateway(
    node: &Arc<Node>,
    lessor: &Arc<crate::etcd_store::lease::Lessor>,
    cache: &Arc<watch::EventCache>,
) -> Arc<gateway::Gateway> {
    Arc::new(gateway::Gateway {
        kv: kv::KvService { node: node.clone() },
        watch: watch::WatchService {
            node: node.clone(),
            cache: cache.clone(),
            progress_interval: node.config.watch_progress_notify_interval,
        },
        lease: lease::LeaseService { node: node.clone(), lessor: lessor.clone() },
        cluster: cluster::ClusterService { node: node.clone() },
        maintenance: cluster::MaintenanceService { node: node.clone() },
        auth: auth::AuthService { node: node.clone() },
        lock: recipes::LockService { node: node.clone(), lessor: lessor.clone() },
        election: recipes::ElectionService { node: node.clone(), lessor: lessor.clone() },
    })
}

/// Written at a clean shutdown: the last Raft log index, which was durable then.
const LOG_END_FILE: &str = "group-1/log-end";

/// A log that ends before the index recorded at the last clean shutdown has lost
/// durable (possibly acknowledged) entries, e.g. a truncated journal that recovery
/// took for a torn write; the member refuses to start. The record is removed
/// afterwards: from now on the log may legitimately shrink (a new leader truncates
/// conflicting uncommitted entries), so it is only valid until the next start.
fn check_log_end(member_dir: &std::path::Path, last: u64) -> Result<(), BoxError> {
    let path = member_dir.join(LOG_END_FILE);
    let Some(body) = crate::storage::read_checksummed(&path)? else { return Ok(()) };
    let recorded =
        u64::from_be_bytes(body.as_slice().try_into().map_err(|_| format!("{} is corrupt", path.display()))?);
    if last < recorded {
        return Err(format!(
            "raft log in {} is corrupt: it ends at index {last}, but index {recorded} was durable at the last clean shutdown (truncated or rolled-back log files)",
            member_dir.display()
        )
        .into());
    }
    std::fs::remove_file(&path)?;
    Ok(())
}

async fn sample_db_size(node: Arc<Node>) {
    let mut tick = tokio::time::interval(QUOTA_SAMPLE_INTERVAL);
    loop {
        tick.tick().await;
        let backend = node.group.backend.clone();
        let quota = node.config.quota_backend_bytes;
        let sample = tokio::task::spawn_blocking(move || {
            // Live bytes never exceed the file. While the file is under half the
            // quota its size answers the quota check (conservatively) without a walk
            // over every table, which cost ~2.5% of a member's CPU under puts.
            let on_disk = backend.file_size()?;
            if on_disk <= quota / 2 {
                return Ok(on_disk);
            }
            backend.sizes().map(|(_, in_use)| in_use)
        });
        if let Ok(Ok(in_use)) = sample.await {
            node.db_in_use_bytes.store(in_use, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Election timeouts between asking peers whether this member was removed.
const REMOVED_PEER_CHECK_EVERY: u32 = 5;

/// Resolves once this member knows it has been removed from the cluster, like
/// etcd's removed member, which stops instead of lingering without a cluster.
/// Two signs count: an applied Raft membership without it, once an applied one
/// has listed it (a bootstrap member always was listed; a joining member replays
/// a log from before it was added), or a registry at least as fresh as where it
/// was listed that lacks it — its own or a peer's.
async fn removed(group: EtcdStore, election_timeout_ms: u64, identity: &Identity) {
    let mut tick = tokio::time::interval(Duration::from_millis(election_timeout_ms.max(100)));
    let mut ticks = 0u32;
    let mut was_member = identity.bootstrapped;
    loop {
        tick.tick().await;
        ticks += 1;
        if !was_member {
            was_member = group.is_applied_member();
        }
        if was_member && group.removal_applied() {
            return;
        }
        if ticks.is_multiple_of(REMOVED_PEER_CHECK_EVERY) && group.removal_confirmed_by_peer(identity.listed_from).await
        {
            return;
        }
    }
}

/// Publishes this member's name and client URLs, then its placement labels
/// (`--zone`, `--weight`), through Raft, each until it succeeds.
async fn publish(node: Arc<Node>) {
    let attributes = Command::Member(MemberChange::Publish {
        id: node.member_id,
        name: node.config.name.clone(),
        client_urls: node.config.advertise_client_urls.clone(),
    });
    let labels = Command::Member(MemberChange::Labels {
        id: node.member_id,
        labels: crate::etcd_store::members::NodeLabels { zone: node.config.zone.clone(), weight: node.config.weight },
    });
    for (cmd, what) in [(attributes, "member attributes"), (labels, "placement labels")] {
        loop {
            match node.group.propose(cmd.clone(), node.config.request_timeout()).await {
                Ok(_) => {
                    tracing::info!("published {what}");
                    break;
                }
                Err(e) => {
                    tracing::debug!("publishing {what} not done yet: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}
