//! Member configuration: etcd's flags, `ETCD_*` environment variables and
//! `--config-file` YAML, resolved into one validated [`Config`].
//!
//! Precedence is etcd's: with `--config-file`, the file alone decides (flags and
//! environment are ignored); otherwise a flag beats its environment variable, which
//! beats the default. Go-style single-dash long flags (`-name x`) are accepted too.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::etcd_store::auth::tokens::{JwtConfig, TokenConfig};
use crate::placement::{MAX_WEIGHT, MAX_ZONE_BYTES};

/// etcd's `embed.DefaultMaxRequestBytes`: 1.5 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 1572864;
/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: u64 = 128;
/// etcd's default `--quota-backend-bytes` (0 means this default): 2 GiB.
pub const DEFAULT_QUOTA_BACKEND_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// etcd 3.4's default `--snapshot-count`.
pub const DEFAULT_SNAPSHOT_COUNT: u64 = 100_000;
/// etcd's `SnapshotCatchUpEntries`.
pub const DEFAULT_SNAPSHOT_CATCHUP_ENTRIES: u64 = 5000;

/// Default interval of the cross-member corruption check. etcd leaves it off;
/// concord checks by default (one HashKV scan per member per interval).
pub const DEFAULT_CORRUPT_CHECK: &str = "1m";

#[derive(Parser, Debug, Default)]
#[command(name = "concord", version, about = "An etcd-v3-compatible replicated coordination store")]
pub struct Flags {
    /// Path to a YAML configuration file; when given, other flags and env vars are ignored.
    #[arg(long, env = "ETCD_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME")]
    pub name: Option<String>,
    /// Path to the data directory (default: ${name}.concord).
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// URLs to listen on for client traffic.
    #[arg(long, env = "ETCD_LISTEN_CLIENT_URLS")]
    pub listen_client_urls: Option<String>,
    /// Client URLs of this member advertised to the cluster.
    #[arg(long, env = "ETCD_ADVERTISE_CLIENT_URLS")]
    pub advertise_client_urls: Option<String>,
    /// URLs to listen on for peer traffic.
    #[arg(long, env = "ETCD_LISTEN_PEER_URLS")]
    pub listen_peer_urls: Option<String>,
    /// Peer URLs of this member advertised to the cluster.
    #[arg(long, env = "ETCD_INITIAL_ADVERTISE_PEER_URLS")]
    pub initial_advertise_peer_urls: Option<String>,
    /// Initial cluster configuration for bootstrapping: name=peerURL,...
    #[arg(long, env = "ETCD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Initial cluster state ('new' or 'existing').
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE")]
    pub initial_cluster_state: Option<String>,
    /// Initial cluster token for the cluster during bootstrap.
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_TOKEN")]
    pub initial_cluster_token: Option<String>,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<u64>,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT")]
    pub election_timeout: Option<u64>,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<u64>,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS")]
    pub max_txn_ops: Option<u64>,
    /// Raise alarms when backend size exceeds the given quota (0 defaults to 2 GiB).
    #[arg(long, env = "ETCD_QUOTA_BACKEND_BYTES")]
    pub quota_backend_bytes: Option<u64>,
    /// Number of committed transactions to trigger a snapshot to disk.
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT")]
    pub snapshot_count: Option<u64>,
    /// Entries a leader keeps after a snapshot so slow followers catch up from the log
    /// instead of a full snapshot transfer (etcd 3.5's experimental flag).
    #[arg(long, env = "ETCD_EXPERIMENTAL_SNAPSHOT_CATCHUP_ENTRIES")]
    pub experimental_snapshot_catchup_entries: Option<u64>,
    /// Maximum concurrent gRPC streams per client connection (etcd's default: 2^32-1).
    #[arg(long, env = "ETCD_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// Interval of watch progress notifications (Go duration, e.g. 10m, 1s, 500ms).
    #[arg(long, env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL")]
    pub experimental_watch_progress_notify_interval: Option<String>,
    /// Interpret 'auto-compaction-retention' as a period ('periodic') or a revision count ('revision').
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE")]
    pub auto_compaction_mode: Option<String>,
    /// History to keep: a duration or hours ('periodic'), or revisions ('revision'); 0 disables.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION")]
    pub auto_compaction_retention: Option<String>,
    /// Interval of the leader's cross-member HashKV check (Go duration; 0 disables).
    #[arg(long, env = "ETCD_EXPERIMENTAL_CORRUPT_CHECK_TIME")]
    pub experimental_corrupt_check_time: Option<String>,
    /// Client RPCs slower than this are logged (Go duration).
    #[arg(long, env = "ETCD_SLOW_REQUEST_THRESHOLD")]
    pub slow_request_threshold: Option<String>,
    /// Log format: 'text' or 'json'.
    #[arg(long, env = "ETCD_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Extra URLs serving only /metrics, /health, /livez and /readyz.
    #[arg(long, env = "ETCD_LISTEN_METRICS_URLS")]
    pub listen_metrics_urls: Option<String>,
    /// Log level: debug, info, warn, error, panic, or fatal.
    #[arg(long, env = "ETCD_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Auth token provider: 'simple' or 'jwt,pub-key=...,priv-key=...,sign-method=...,ttl=...'.
    #[arg(long, env = "ETCD_AUTH_TOKEN")]
    pub auth_token: Option<String>,
    /// Seconds a simple auth token lives without use.
    #[arg(long, env = "ETCD_AUTH_TOKEN_TTL")]
    pub auth_token_ttl: Option<u64>,
    /// bcrypt cost for hashing passwords (4..=31).
    #[arg(long, env = "ETCD_BCRYPT_COST")]
    pub bcrypt_cost: Option<u32>,
    /// Path to the client server TLS certificate file.
    #[arg(long, env = "ETCD_CERT_FILE")]
    pub cert_file: Option<String>,
    /// Path to the client server TLS key file.
    #[arg(long, env = "ETCD_KEY_FILE")]
    pub key_file: Option<String>,
    /// Path to the client server TLS trusted CA certificate file.
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<String>,
    /// Require client certificates signed by --trusted-ca-file.
    #[arg(long, env = "ETCD_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true")]
    pub client_cert_auth: Option<String>,
    /// Client TLS using a generated self-signed certificate.
    #[arg(long, env = "ETCD_AUTO_TLS", num_args = 0..=1, default_missing_value = "true")]
    pub auto_tls: Option<String>,
    /// Path to the peer server TLS certificate file.
    #[arg(long, env = "ETCD_PEER_CERT_FILE")]
    pub peer_cert_file: Option<String>,
    /// Path to the peer server TLS key file.
    #[arg(long, env = "ETCD_PEER_KEY_FILE")]
    pub peer_key_file: Option<String>,
    /// Path to the peer server TLS trusted CA file.
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<String>,
    /// Require peer certificates signed by --peer-trusted-ca-file.
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true")]
    pub peer_client_cert_auth: Option<String>,
    /// Peer TLS using generated self-signed certificates.
    #[arg(long, env = "ETCD_PEER_AUTO_TLS", num_args = 0..=1, default_missing_value = "true")]
    pub peer_auto_tls: Option<String>,
    /// Most client connections served at once; further connections wait in the accept queue.
    #[arg(long, env = "CONCORD_MAX_CLIENT_CONNECTIONS")]
    pub max_client_connections: Option<u64>,
    /// Threads that run the member's request handling, Raft and apply tasks
    /// (0: one fewer than the CPUs the process may use, at least one).
    #[arg(long, env = "CONCORD_WORKER_THREADS")]
    pub worker_threads: Option<u64>,
    /// This node's failure domain (a rack, a zone): replicas of a group spread
    /// over zones first.
    #[arg(long, env = "CONCORD_ZONE")]
    pub zone: Option<String>,
    /// This node's capacity relative to the others' (1-1000): it holds replicas
    /// in proportion.
    #[arg(long, env = "CONCORD_WEIGHT")]
    pub weight: Option<u64>,
    /// Where to serve the Redis Streams protocol (`redis://host:port`, comma
    /// separated; off when empty).
    #[arg(long, env = "CONCORD_LISTEN_REDIS_URLS")]
    pub listen_redis_urls: Option<String>,
    /// Where to serve the S3 API (`http://host:port`, comma separated; off
    /// when empty).
    #[arg(long, env = "CONCORD_LISTEN_S3_URLS")]
    pub listen_s3_urls: Option<String>,
    /// Most S3 connections served at once (more wait to be accepted).
    #[arg(long, env = "CONCORD_S3_MAX_CONNECTIONS")]
    pub s3_max_connections: Option<u64>,
    /// Most Redis connections served at once (Redis's `maxclients`).
    #[arg(long, env = "CONCORD_REDIS_MAX_CLIENTS")]
    pub redis_max_clients: Option<u64>,
    /// Largest queue message (payload and headers), bytes; a stream's own limit
    /// can only be lower.
    #[arg(long, env = "CONCORD_QUEUE_MAX_MSG_BYTES")]
    pub queue_max_msg_bytes: Option<u64>,
    /// Most messages one queue fetch leases.
    #[arg(long, env = "CONCORD_QUEUE_MAX_BATCH")]
    pub queue_max_batch: Option<u64>,
    /// Size of a blob object's chunks, bytes (1 MiB to 64 MiB).
    #[arg(long, env = "CONCORD_BLOB_CHUNK_BYTES")]
    pub blob_chunk_bytes: Option<u64>,
    /// Members holding each blob chunk.
    #[arg(long, env = "CONCORD_BLOB_REPLICAS")]
    pub blob_replicas: Option<u64>,
    /// Largest blob object stored inline in its manifest (through Raft), bytes.
    #[arg(long, env = "CONCORD_BLOB_INLINE_MAX_BYTES")]
    pub blob_inline_max_bytes: Option<u64>,
    /// Most chunk transfers (in and out) a member runs at once: its blob memory
    /// is at most about this many chunks.
    #[arg(long, env = "CONCORD_BLOB_MAX_TRANSFERS")]
    pub blob_max_transfers: Option<u64>,
    /// How long a member must be unreachable before its blob chunks are copied
    /// to other members, milliseconds.
    #[arg(long, env = "CONCORD_BLOB_REPAIR_DELAY_MS")]
    pub blob_repair_delay_ms: Option<u64>,
    /// Bytes per second the blob scrubber reads back and verifies (0: off).
    #[arg(long, env = "CONCORD_BLOB_SCRUB_BYTES_PER_S")]
    pub blob_scrub_bytes_per_s: Option<u64>,
}

/// Whether a fresh data dir bootstraps a new cluster or joins an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    New,
    Existing,
}

/// A fully resolved and validated member configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen_client_urls: Vec<String>,
    pub advertise_client_urls: Vec<String>,
    pub listen_peer_urls: Vec<String>,
    pub initial_advertise_peer_urls: Vec<String>,
    /// name -> peer URLs, in flag order of first appearance.
    pub initial_cluster: Vec<(String, Vec<String>)>,
    pub initial_cluster_state: ClusterState,
    pub initial_cluster_token: String,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    pub max_request_bytes: u64,
    pub max_txn_ops: u64,
    pub quota_backend_bytes: u64,
    pub snapshot_count: u64,
    pub snapshot_catchup_entries: u64,
    pub watch_progress_notify_interval: std::time::Duration,
    pub max_concurrent_streams: u32,
    /// `None` when auto-compaction is off (etcd's default retention "0").
    pub auto_compaction: Option<AutoCompaction>,
    /// `None` when the periodic corruption check is off.
    pub corrupt_check_interval: Option<std::time::Duration>,
    pub slow_request_threshold: std::time::Duration,
    /// Logs as JSON lines instead of text.
    pub log_json: bool,
    pub listen_metrics_urls: Vec<String>,
    pub log_level: String,
    /// `--auth-token`: simple (replicated random tokens) or JWT.
    pub auth_token: TokenConfig,
    /// `--auth-token-ttl`: a simple token's life without use.
    pub auth_token_ttl: std::time::Duration,
    /// `--bcrypt-cost`: work factor of password hashes.
    pub bcrypt_cost: u32,
    /// TLS of the client listeners (`https://` URLs).
    pub client_tls: crate::server::tls::TlsSettings,
    /// TLS of the peer listeners and of connections to peers.
    pub peer_tls: crate::server::tls::TlsSettings,
    /// Client connections served at once (a slow or hostile client holds one slot).
    pub max_client_connections: usize,
    /// Worker threads of the member's async runtime (see [`default_worker_threads`]).
    pub worker_threads: usize,
    /// `--zone` and `--weight`, published in the member registry for placement.
    pub zone: String,
    pub weight: u32,
    /// `--listen-redis-urls`: where the Redis Streams gateway listens (none: off).
    pub listen_redis_urls: Vec<String>,
    /// `--redis-max-clients`: Redis connections served at once.
    pub redis_max_clients: usize,
    /// `--queue-max-msg-bytes`: the largest queue message (default 1 MiB, at
    /// most `--max-request-bytes`).
    pub queue_max_msg_bytes: u64,
    /// `--queue-max-batch`: most messages one fetch leases (default 256).
    pub queue_max_batch: u64,
    /// `--listen-s3-urls`: where the S3 API listens (none: off).
    pub listen_s3_urls: Vec<String>,
    /// `--s3-max-connections`: S3 connections served at once (default 1024).
    pub s3_max_connections: usize,
    /// `--blob-chunk-bytes`: size of a blob object's chunks (default 4 MiB).
    pub blob_chunk_bytes: u64,
    /// `--blob-replicas`: members holding each chunk (default 3).
    pub blob_replicas: u64,
    /// `--blob-inline-max-bytes`: largest object kept in its manifest (default 4 KiB).
    pub blob_inline_max_bytes: u64,
    /// `--blob-max-transfers`: chunk transfers a member runs at once (default 16).
    pub blob_max_transfers: u64,
    /// `--blob-repair-delay-ms`: how long a member is unreachable before its
    /// chunks are copied elsewhere (default 60 s).
    pub blob_repair_delay_ms: u64,
    /// `--blob-scrub-bytes-per-s`: the scrubber's read rate (default 8 MiB/s; 0: off).
    pub blob_scrub_bytes_per_s: u64,
}

/// Most worker threads `--worker-threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Worker threads when `--worker-threads` is 0: one fewer than the CPUs this
/// process may use (`available_parallelism` honours CPU affinity and cgroup
/// quotas), at least one. A member keeps threads busy outside the runtime — the
/// leader's log-sync thread, fjall's flushes, the kernel's socket work for every
/// peer and client message — and a worker per CPU oversubscribed them: with two
/// workers on two CPUs, nearly every task hand-off (gRPC task, Raft core,
/// replication, apply, answer) woke the idle worker to steal it, a futex or
/// eventfd wake-up each, ~16 per put on the leader (strace). Measured on 2 CPUs
/// (3 members and the load generator, interleaved runs): one worker against two,
/// 1-client put p50 on the leader 0.77/0.78 vs 0.85 ms, put 1000/100 34.2k/32.5k
/// vs 28.0k/31.5k req/s with 8-14% less member CPU, linearizable range 1000/100
/// equal (48.6k/46.8k vs 48.2k/48.0k). Rejected: keeping a worker per CPU and
/// re-enabling tokio's LIFO slot (latency unchanged, puts/s 3-10% lower).
/// Not measured here: machines with more than two CPUs.
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

/// The settings as strings before defaults and validation, from flags or a file.
#[derive(Default, Debug)]
struct Raw {
    values: BTreeMap<&'static str, String>,
}

impl Raw {
    fn set(&mut self, key: &'static str, v: Option<impl ToString>) {
        if let Some(v) = v {
            self.values.insert(key, v.to_string());
        }
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }
}

const KNOWN_KEYS: [&str; 54] = [
    "name",
    "data-dir",
    "listen-client-urls",
    "advertise-client-urls",
    "listen-peer-urls",
    "initial-advertise-peer-urls",
    "initial-cluster",
    "initial-cluster-state",
    "initial-cluster-token",
    "heartbeat-interval",
    "election-timeout",
    "max-request-bytes",
    "max-txn-ops",
    "quota-backend-bytes",
    "snapshot-count",
    "experimental-snapshot-catchup-entries",
    "experimental-watch-progress-notify-interval",
    "max-concurrent-streams",
    "auto-compaction-mode",
    "auto-compaction-retention",
    "experimental-corrupt-check-time",
    "slow-request-threshold",
    "log-format",
    "listen-metrics-urls",
    "log-level",
    "auth-token",
    "auth-token-ttl",
    "bcrypt-cost",
    "cert-file",
    "key-file",
    "trusted-ca-file",
    "client-cert-auth",
    "auto-tls",
    "peer-cert-file",
    "peer-key-file",
    "peer-trusted-ca-file",
    "peer-client-cert-auth",
    "peer-auto-tls",
    "max-client-connections",
    "worker-threads",
    "zone",
    "weight",
    "listen-redis-urls",
    "redis-max-clients",
    "queue-max-msg-bytes",
    "queue-max-batch",
    "listen-s3-urls",
    "s3-max-connections",
    "blob-chunk-bytes",
    "blob-replicas",
    "blob-inline-max-bytes",
    "blob-max-transfers",
    "blob-repair-delay-ms",
    "blob-scrub-bytes-per-s",
];

/// Rewrites Go-style `-flag` into `--flag` so etcd command lines work unchanged.
pub fn normalize_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let single_dash_long = a.starts_with('-') && !a.starts_with("--") && a.len() > 2;
            if i > 0 && single_dash_long && a[1..].chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

/// A configured auto-compaction policy (etcd's `--auto-compaction-mode` and
/// `--auto-compaction-retention`; run by `super::compactor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Keep this much history by time.
    Periodic(Duration),
    /// Keep this many revisions.
    Revision(u64),
}

impl AutoCompaction {
    /// Parses etcd's mode and retention; `None` when the retention is zero (off).
    /// In periodic mode a bare number is hours, as in etcd.
    pub fn parse(mode: &str, retention: &str) -> Result<Option<AutoCompaction>, String> {
        let retention = retention.trim();
        match mode {
            "periodic" => {
                if let Ok(hours) = retention.parse::<u64>() {
                    return Ok((hours > 0).then(|| AutoCompaction::Periodic(Duration::from_secs(hours * 3600))));
                }
                if retention.trim_start_matches(['0', '.']).is_empty() || retention == "0s" {
                    return Ok(None);
                }
                parse_duration(retention)
                    .map(|d| Some(AutoCompaction::Periodic(d)))
                    .map_err(|e| format!("invalid --auto-compaction-retention: {e}"))
            }
            "revision" => {
                let n: u64 = retention.parse().map_err(|_| {
                    format!("invalid --auto-compaction-retention {retention:?}: expected a revision count")
                })?;
                Ok((n > 0).then_some(AutoCompaction::Revision(n)))
            }
            other => Err(format!("invalid --auto-compaction-mode {other:?}: expected 'periodic' or 'revision'")),
        }
    }
}

/// Parses a Go duration (`1h2m3s`, `500ms`, `10m`); zero is refused.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let mut total = std::time::Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let (num, tail) = rest.split_at(digits);
        let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration"))?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let secs = match unit {
            "ns" => n / 1e9,
            "us" | "µs" => n / 1e6,
            "ms" => n / 1e3,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return Err(format!("{s:?} has unknown unit {unit:?}")),
        };
        total += std::time::Duration::from_secs_f64(secs);
        rest = tail;
    }
    if total.is_zero() {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(total)
}

/// Parses etcd's `--auth-token` value.
fn parse_auth_token(s: &str) -> Result<TokenConfig, String> {
    let mut parts = s.split(',');
    match parts.next().unwrap_or_default() {
        "simple" | "" => Ok(TokenConfig::Simple),
        "jwt" => {
            let (mut pub_key, mut priv_key, mut sign_method, mut ttl) =
                (None, None, None, std::time::Duration::from_secs(300));
            for opt in parts {
                let (k, v) = opt.split_once('=').ok_or_else(|| format!("invalid --auth-token option {opt:?}"))?;
                match k {
                    "pub-key" => pub_key = Some(PathBuf::from(v)),
                    "priv-key" => priv_key = Some(PathBuf::from(v)),
                    "sign-method" => sign_method = Some(v.to_string()),
                    "ttl" => ttl = parse_duration(v)?,
                    _ => return Err(format!("unknown --auth-token jwt option {k:?}")),
                }
            }
            let sign_method = sign_method.ok_or("--auth-token jwt needs sign-method=")?;
            crate::etcd_store::auth::tokens::algorithm(&sign_method)?;
            Ok(TokenConfig::Jwt(JwtConfig {
                pub_key: pub_key.ok_or("--auth-token jwt needs pub-key=")?,
                priv_key,
                sign_method,
                ttl,
            }))
        }
        other => Err(format!("unknown --auth-token type {other:?} (simple or jwt)")),
    }
}

fn split_urls(s: &str) -> Vec<String> {
    s.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect()
}

fn parse_u64(raw: &Raw, key: &str, default: u64) -> Result<u64, String> {
    match raw.get(key) {
        None => Ok(default),
        Some(v) => {
            v.trim().parse().map_err(|_| format!("invalid value {v:?} for --{key}: expected an unsigned integer"))
        }
    }
}

/// Whether `host:port` (the part of a URL after the scheme) names a host and a
/// valid port, with no path.
pub fn valid_host_port(hostport: &str) -> bool {
    hostport
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && !hostport.contains('/') && port.parse::<u16>().is_ok())
}

fn check_url(flag: &str, u: &str) -> Result<(), String> {
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
        .ok_or_else(|| format!("--{flag}: URL {u:?} must start with http:// or https://"))?;
    let hostport = rest.trim_end_matches('/');
    if !hostport.contains(':') {
        return Err(format!("--{flag}: URL {u:?} has no port"));
    }
    if !valid_host_port(hostport) {
        return Err(format!("--{flag}: invalid URL {u:?}"));
    }
    Ok(())
}

/// The `host:port` of a `redis://host:port` URL.
pub fn redis_addr(u: &str) -> Result<String, String> {
    let hostport = u
        .strip_prefix("redis://")
        .ok_or_else(|| format!("--listen-redis-urls: URL {u:?} must start with redis://"))?
        .trim_end_matches('/');
    if !hostport.contains(':') || !valid_host_port(hostport) {
        return Err(format!("--listen-redis-urls: invalid URL {u:?} (want redis://host:port)"));
    }
    Ok(hostport.to_string())
}

/// The `host:port` of an `http://host:port` S3 URL.
pub fn s3_addr(u: &str) -> Result<String, String> {
    let hostport = u
        .strip_prefix("http://")
        .ok_or_else(|| format!("--listen-s3-urls: URL {u:?} must start with http:// (https is not served yet)"))?
        .trim_end_matches('/');
    if !hostport.contains(':') || !valid_host_port(hostport) {
        return Err(format!("--listen-s3-urls: invalid URL {u:?} (want http://host:port)"));
    }
    Ok(hostport.to_string())
}

fn parse_initial_cluster(s: &str) -> Result<Vec<(String, Vec<String>)>, String> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, url) =
            part.split_once('=').ok_or_else(|| format!("--initial-cluster: {part:?} is not of the form name=URL"))?;
        check_url("initial-cluster", url)?;
        match out.iter_mut().find(|(n, _)| n == name) {
            Some((_, urls)) => urls.push(url.to_string()),
            None => out.push((name.to_string(), vec![url.to_string()])),
        }
    }
    if out.is_empty() {
        return Err("--initial-cluster is empty".into());
    }
    Ok(out)
}

impl Config {
    /// Resolves flags (or the config file they name) into a validated config.
    pub fn from_flags(flags: Flags) -> Result<Config, String> {
        let raw = match &flags.config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read --config-file {}: {e}", path.display()))?;
                raw_from_yaml(&text)?
            }
            None => raw_from_flags(flags),
        };
        Config::from_raw(&raw)
    }

    fn from_raw(raw: &Raw) -> Result<Config, String> {
        let name = raw.get("name").unwrap_or("default").to_string();
        let data_dir = PathBuf::from(raw.get("data-dir").map(str::to_string).unwrap_or(format!("{name}.concord")));
        let urls = |key: &'static str, default: &str| -> Result<Vec<String>, String> {
            let v = split_urls(raw.get(key).unwrap_or(default));
            if v.is_empty() {
                return Err(format!("--{key} must not be empty"));
            }
            for u in &v {
                check_url(key, u)?;
            }
            Ok(v)
        };
        let listen_client_urls = urls("listen-client-urls", "http://localhost:2379")?;
        let advertise_client_urls = urls("advertise-client-urls", "http://localhost:2379")?;
        let listen_peer_urls = urls("listen-peer-urls", "http://localhost:2380")?;
        let initial_advertise_peer_urls = urls("initial-advertise-peer-urls", "http://localhost:2380")?;
        let initial_cluster = match raw.get("initial-cluster") {
            Some(s) => parse_initial_cluster(s)?,
            // etcd: without --initial-cluster, the cluster is this member alone.
            None => vec![(name.clone(), initial_advertise_peer_urls.clone())],
        };
        let initial_cluster_state = match raw.get("initial-cluster-state").unwrap_or("new") {
            "new" => ClusterState::New,
            "existing" => ClusterState::Existing,
            other => {
                return Err(format!(
                    "invalid value {other:?} for --initial-cluster-state: expected 'new' or 'existing'"
                ))
            }
        };
        let initial_cluster_token = raw.get("initial-cluster-token").unwrap_or("etcd-cluster").to_string();
        let heartbeat_ms = parse_u64(raw, "heartbeat-interval", 100)?;
        let election_timeout_ms = parse_u64(raw, "election-timeout", 1000)?;
        if heartbeat_ms == 0 {
            return Err("--heartbeat-interval must be positive".into());
        }
        if 5 * heartbeat_ms > election_timeout_ms {
            return Err(format!(
                "--election-timeout[{election_timeout_ms}ms] should be at least as 5 times as --heartbeat-interval[{heartbeat_ms}ms]"
            ));
        }
        if election_timeout_ms > 50_000 {
            return Err(format!(
                "--election-timeout[{election_timeout_ms}ms] is too long, and should be set less than 50 seconds"
            ));
        }
        let max_request_bytes = parse_u64(raw, "max-request-bytes", DEFAULT_MAX_REQUEST_BYTES)?;
        if max_request_bytes == 0 {
            return Err("--max-request-bytes must be positive".into());
        }
        let max_txn_ops = parse_u64(raw, "max-txn-ops", DEFAULT_MAX_TXN_OPS)?;
        let quota = parse_u64(raw, "quota-backend-bytes", 0)?;
        let quota_backend_bytes = if quota == 0 { DEFAULT_QUOTA_BACKEND_BYTES } else { quota };
        let snapshot_count = parse_u64(raw, "snapshot-count", DEFAULT_SNAPSHOT_COUNT)?;
        if snapshot_count == 0 {
            return Err("--snapshot-count must be positive".into());
        }
        let snapshot_catchup_entries =
            parse_u64(raw, "experimental-snapshot-catchup-entries", DEFAULT_SNAPSHOT_CATCHUP_ENTRIES)?;
        let watch_progress_notify_interval =
            parse_duration(raw.get("experimental-watch-progress-notify-interval").unwrap_or("10m"))
                .map_err(|e| format!("invalid value for --experimental-watch-progress-notify-interval: {e}"))?;
        let max_concurrent_streams = u32::try_from(parse_u64(raw, "max-concurrent-streams", u32::MAX as u64)?)
            .map_err(|_| "--max-concurrent-streams must fit in 32 bits".to_string())?;
        let auto_compaction = AutoCompaction::parse(
            raw.get("auto-compaction-mode").unwrap_or("periodic"),
            raw.get("auto-compaction-retention").unwrap_or("0"),
        )?;
        let corrupt_check_interval = match raw.get("experimental-corrupt-check-time").unwrap_or(DEFAULT_CORRUPT_CHECK) {
            "0" | "0s" => None,
            v => Some(
                parse_duration(v).map_err(|e| format!("invalid value for --experimental-corrupt-check-time: {e}"))?,
            ),
        };
        let slow_request_threshold = parse_duration(raw.get("slow-request-threshold").unwrap_or("1s"))
            .map_err(|e| format!("invalid value for --slow-request-threshold: {e}"))?;
        let log_json = match raw.get("log-format").unwrap_or("text") {
            "text" => false,
            "json" => true,
            other => return Err(format!("invalid value {other:?} for --log-format: expected 'text' or 'json'")),
        };
        let listen_metrics_urls = split_urls(raw.get("listen-metrics-urls").unwrap_or(""));
        for u in &listen_metrics_urls {
            check_url("listen-metrics-urls", u)?;
        }
        let log_level = raw.get("log-level").unwrap_or("info").to_string();
        if !["debug", "info", "warn", "error", "dpanic", "panic", "fatal"].contains(&log_level.as_str()) {
            return Err(format!("invalid value {log_level:?} for --log-level"));
        }
        let auth_token = parse_auth_token(raw.get("auth-token").unwrap_or("simple"))?;
        let auth_token_ttl = std::time::Duration::from_secs(parse_u64(raw, "auth-token-ttl", 300)?);
        if auth_token_ttl.is_zero() {
            return Err("--auth-token-ttl must be positive".into());
        }
        let bcrypt_cost = u32::try_from(parse_u64(raw, "bcrypt-cost", crate::etcd_store::auth::BCRYPT_COST as u64)?)
            .ok()
            .filter(|c| (4..=31).contains(c))
            .ok_or("--bcrypt-cost must be between 4 and 31")?;
        let client_tls = crate::server::tls::TlsSettings::from_raw(|k| raw.get(k), "")?;
        let peer_tls = crate::server::tls::TlsSettings::from_raw(|k| raw.get(k), "peer-")?;
        for (urls, tls, flag) in [
            (&listen_client_urls, &client_tls, "listen-client-urls"),
            (&listen_peer_urls, &peer_tls, "listen-peer-urls"),
        ] {
            if urls.iter().any(|u| u.starts_with("https://")) && !tls.enabled() {
                return Err(format!(
                    "--{flag} has an https URL but no certificate: set --{p}cert-file/--{p}key-file or --{p}auto-tls",
                    p = if flag.starts_with("listen-peer") { "peer-" } else { "" }
                ));
            }
        }
        let max_client_connections = usize::try_from(parse_u64(raw, "max-client-connections", 10_000)?)
            .ok()
            .filter(|n| *n > 0)
            .ok_or("--max-client-connections must be positive")?;
        let listen_redis_urls = split_urls(raw.get("listen-redis-urls").unwrap_or(""));
        for u in &listen_redis_urls {
            redis_addr(u)?;
        }
        let redis_max_clients = usize::try_from(parse_u64(raw, "redis-max-clients", 10_000)?)
            .ok()
            .filter(|n| *n > 0)
            .ok_or("--redis-max-clients must be positive")?;
        let queue_max_msg_bytes = parse_u64(raw, "queue-max-msg-bytes", 1 << 20)?;
        if queue_max_msg_bytes == 0 || queue_max_msg_bytes > max_request_bytes {
            return Err(format!(
                "--queue-max-msg-bytes must be between 1 and --max-request-bytes ({max_request_bytes})"
            ));
        }
        let queue_max_batch = parse_u64(raw, "queue-max-batch", 256)?;
        if !(1..=100_000).contains(&queue_max_batch) {
            return Err("--queue-max-batch must be between 1 and 100000".into());
        }
        let listen_s3_urls = split_urls(raw.get("listen-s3-urls").unwrap_or(""));
        for u in &listen_s3_urls {
            s3_addr(u)?;
        }
        let s3_max_connections = usize::try_from(parse_u64(raw, "s3-max-connections", 1024)?)
            .ok()
            .filter(|n| *n > 0)
            .ok_or("--s3-max-connections must be positive")?;
        let blob_chunk_bytes = parse_u64(raw, "blob-chunk-bytes", 4 << 20)?;
        if !((1 << 20)..=(64 << 20)).contains(&blob_chunk_bytes) {
            return Err("--blob-chunk-bytes must be between 1 MiB and 64 MiB".into());
        }
        let blob_replicas = parse_u64(raw, "blob-replicas", 3)?;
        if !(1..=7).contains(&blob_replicas) {
            return Err("--blob-replicas must be between 1 and 7".into());
        }
        let blob_inline_max_bytes = parse_u64(raw, "blob-inline-max-bytes", 4096)?;
        if blob_inline_max_bytes > (64 << 10) {
            return Err("--blob-inline-max-bytes must be at most 64 KiB".into());
        }
        let blob_max_transfers = parse_u64(raw, "blob-max-transfers", 16)?;
        if !(1..=1024).contains(&blob_max_transfers) {
            return Err("--blob-max-transfers must be between 1 and 1024".into());
        }
        let blob_repair_delay_ms = parse_u64(raw, "blob-repair-delay-ms", 60_000)?;
        let blob_scrub_bytes_per_s = parse_u64(raw, "blob-scrub-bytes-per-s", 8 << 20)?;
        let zone = raw.get("zone").unwrap_or_default().to_string();
        if zone.len() > MAX_ZONE_BYTES {
            return Err(format!("--zone must be at most {MAX_ZONE_BYTES} bytes"));
        }
        let weight = u32::try_from(parse_u64(raw, "weight", 1)?)
            .ok()
            .filter(|w| (1..=MAX_WEIGHT).contains(&u64::from(*w)))
            .ok_or(format!("--weight must be between 1 and {MAX_WEIGHT}"))?;
        let worker_threads = match parse_u64(raw, "worker-threads", 0)? {
            0 => default_worker_threads(),
            n => usize::try_from(n)
                .ok()
                .filter(|n| *n <= MAX_WORKER_THREADS)
                .ok_or(format!("--worker-threads must be at most {MAX_WORKER_THREADS}"))?,
        };
        let config = Config {
            name,
            data_dir,
            listen_client_urls,
            advertise_client_urls,
            listen_peer_urls,
            initial_advertise_peer_urls,
            initial_cluster,
            initial_cluster_state,
            initial_cluster_token,
            heartbeat_ms,
            election_timeout_ms,
            max_request_bytes,
            max_txn_ops,
            quota_backend_bytes,
            snapshot_count,
            snapshot_catchup_entries,
            watch_progress_notify_interval,
            max_concurrent_streams,
            auto_compaction,
            corrupt_check_interval,
            slow_request_threshold,
            log_json,
            listen_metrics_urls,
            log_level,
            auth_token,
            auth_token_ttl,
            bcrypt_cost,
            client_tls,
            peer_tls,
            max_client_connections,
            worker_threads,
            zone,
            listen_redis_urls,
            redis_max_clients,
            queue_max_msg_bytes,
            queue_max_batch,
            listen_s3_urls,
            s3_max_connections,
            blob_chunk_bytes,
            blob_replicas,
            blob_inline_max_bytes,
            blob_max_transfers,
            blob_repair_delay_ms,
            blob_scrub_bytes_per_s,
            weight,
        };
        config.check_self_in_cluster()?;
        Ok(config)
    }

    /// etcd refuses to bootstrap when this member's name or peer URLs disagree with
    /// `--initial-cluster`.
    fn check_self_in_cluster(&self) -> Result<(), String> {
        let Some((_, urls)) = self.initial_cluster.iter().find(|(n, _)| *n == self.name) else {
            return Err(format!("couldn't find local name {:?} in the initial cluster configuration", self.name));
        };
        let mut a = urls.clone();
        let mut b = self.initial_advertise_peer_urls.clone();
        a.sort();
        b.sort();
        if a != b {
            return Err(format!(
                "--initial-cluster has {}={} but missing from --initial-advertise-peer-urls={} (URLs must match exactly)",
                self.name,
                urls.join(","),
                self.initial_advertise_peer_urls.join(",")
            ));
        }
        Ok(())
    }

    /// How long a client request may wait for consensus (etcd: 5 s + 2 elections).
    pub fn request_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(5000 + 2 * self.election_timeout_ms)
    }
}

fn raw_from_flags(f: Flags) -> Raw {
    let mut raw = Raw::default();
    raw.set("name", f.name);
    raw.set("data-dir", f.data_dir.map(|p| p.display().to_string()));
    raw.set("listen-client-urls", f.listen_client_urls);
    raw.set("advertise-client-urls", f.advertise_client_urls);
    raw.set("listen-peer-urls", f.listen_peer_urls);
    raw.set("initial-advertise-peer-urls", f.initial_advertise_peer_urls);
    raw.set("initial-cluster", f.initial_cluster);
    raw.set("initial-cluster-state", f.initial_cluster_state);
    raw.set("initial-cluster-token", f.initial_cluster_token);
    raw.set("heartbeat-interval", f.heartbeat_interval);
    raw.set("election-timeout", f.election_timeout);
    raw.set("max-request-bytes", f.max_request_bytes);
    raw.set("max-txn-ops", f.max_txn_ops);
    raw.set("quota-backend-bytes", f.quota_backend_bytes);
    raw.set("snapshot-count", f.snapshot_count);
    raw.set("experimental-snapshot-catchup-entries", f.experimental_snapshot_catchup_entries);
    raw.set("experimental-watch-progress-notify-interval", f.experimental_watch_progress_notify_interval);
    raw.set("max-concurrent-streams", f.max_concurrent_streams);
    raw.set("auto-compaction-mode", f.auto_compaction_mode);
    raw.set("auto-compaction-retention", f.auto_compaction_retention);
    raw.set("experimental-corrupt-check-time", f.experimental_corrupt_check_time);
    raw.set("slow-request-threshold", f.slow_request_threshold);
    raw.set("log-format", f.log_format);
    raw.set("listen-metrics-urls", f.listen_metrics_urls);
    raw.set("log-level", f.log_level);
    raw.set("auth-token", f.auth_token);
    raw.set("auth-token-ttl", f.auth_token_ttl);
    raw.set("bcrypt-cost", f.bcrypt_cost);
    raw.set("cert-file", f.cert_file);
    raw.set("key-file", f.key_file);
    raw.set("trusted-ca-file", f.trusted_ca_file);
    raw.set("client-cert-auth", f.client_cert_auth);
    raw.set("auto-tls", f.auto_tls);
    raw.set("peer-cert-file", f.peer_cert_file);
    raw.set("peer-key-file", f.peer_key_file);
    raw.set("peer-trusted-ca-file", f.peer_trusted_ca_file);
    raw.set("peer-client-cert-auth", f.peer_client_cert_auth);
    raw.set("peer-auto-tls", f.peer_auto_tls);
    raw.set("max-client-connections", f.max_client_connections);
    raw.set("worker-threads", f.worker_threads);
    raw.set("zone", f.zone);
    raw.set("weight", f.weight);
    raw.set("listen-redis-urls", f.listen_redis_urls);
    raw.set("redis-max-clients", f.redis_max_clients);
    raw.set("queue-max-msg-bytes", f.queue_max_msg_bytes);
    raw.set("queue-max-batch", f.queue_max_batch);
    raw.set("listen-s3-urls", f.listen_s3_urls);
    raw.set("s3-max-connections", f.s3_max_connections);
    raw.set("blob-chunk-bytes", f.blob_chunk_bytes);
    raw.set("blob-replicas", f.blob_replicas);
    raw.set("blob-inline-max-bytes", f.blob_inline_max_bytes);
    raw.set("blob-max-transfers", f.blob_max_transfers);
    raw.set("blob-repair-delay-ms", f.blob_repair_delay_ms);
    raw.set("blob-scrub-bytes-per-s", f.blob_scrub_bytes_per_s);
    raw
}

/// Reads etcd's YAML config keys. Keys concord does not implement are refused by
/// name, so a setting is never silently ignored.
fn raw_from_yaml(text: &str) -> Result<Raw, String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| format!("--config-file: invalid YAML: {e}"))?;
    let mut raw = Raw::default();
    let map = match doc {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => return Ok(raw),
        _ => return Err("--config-file: expected a mapping of settings".into()),
    };
    // etcd nests TLS settings: `client-transport-security: {cert-file: ...}` and
    // `peer-transport-security: {...}` map to the flat flag names.
    let mut flat = Vec::new();
    for (k, v) in map {
        let key = k.as_str().ok_or("--config-file: setting names must be strings")?.to_string();
        let prefix = match key.as_str() {
            "client-transport-security" => Some(""),
            "peer-transport-security" => Some("peer-"),
            _ => None,
        };
        match (prefix, v) {
            (Some(p), serde_yaml::Value::Mapping(inner)) => {
                for (ik, iv) in inner {
                    let ik = ik.as_str().ok_or("--config-file: setting names must be strings")?;
                    flat.push((format!("{p}{ik}"), iv));
                }
            }
            (Some(_), serde_yaml::Value::Null) => {}
            (Some(_), _) => return Err(format!("--config-file: {key:?} must be a mapping")),
            (None, v) => flat.push((key, v)),
        }
    }
    for (key, v) in flat {
        let key = key.as_str();
        let known = KNOWN_KEYS
            .iter()
            .find(|kk| **kk == key)
            .ok_or_else(|| format!("--config-file: unknown setting {key:?}"))?;
        let value = match v {
            serde_yaml::Value::Null => continue,
            serde_yaml::Value::String(s) => s,
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            _ => return Err(format!("--config-file: setting {key:?} must be a scalar")),
        };
        raw.values.insert(known, value);
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let argv = normalize_args(std::iter::once("concord").chain(args.iter().copied()).map(String::from));
        let flags = Flags::try_parse_from(argv).map_err(|e| e.to_string())?;
        Config::from_flags(flags)
    }

    #[test]
    fn parses_etcd_auto_compaction_retention() {
        let p = AutoCompaction::parse;
        assert_eq!(p("periodic", "0"), Ok(None));
        assert_eq!(p("periodic", "1"), Ok(Some(AutoCompaction::Periodic(Duration::from_secs(3600)))));
        assert_eq!(p("periodic", "30m"), Ok(Some(AutoCompaction::Periodic(Duration::from_secs(1800)))));
        assert_eq!(p("revision", "1000"), Ok(Some(AutoCompaction::Revision(1000))));
        assert_eq!(p("revision", "0"), Ok(None));
        assert!(p("revision", "1h").is_err());
        assert!(p("hourly", "1").is_err());
    }

    #[test]
    fn defaults_match_etcd() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.name, "default");
        assert_eq!(c.data_dir, PathBuf::from("default.concord"));
        assert_eq!(c.listen_client_urls, vec!["http://localhost:2379"]);
        assert_eq!(c.initial_cluster, vec![("default".to_string(), vec!["http://localhost:2380".to_string()])]);
        assert_eq!(
            (c.heartbeat_ms, c.election_timeout_ms, c.max_request_bytes, c.max_txn_ops),
            (100, 1000, 1572864, 128)
        );
        assert_eq!(c.worker_threads, default_worker_threads());
    }

    #[test]
    fn worker_threads() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(default_worker_threads(), (cpus - 1).max(1));
        assert_eq!(parse(&["--worker-threads", "0"]).unwrap().worker_threads, default_worker_threads());
        assert_eq!(parse(&["--worker-threads", "3"]).unwrap().worker_threads, 3);
        assert_eq!(parse(&["--worker-threads", "1024"]).unwrap().worker_threads, MAX_WORKER_THREADS);
        for (arg, want) in [("1025", "at most 1024"), ("-1", "unexpected argument"), ("two", "invalid value")] {
            let err = parse(&["--worker-threads", arg]).unwrap_err();
            assert!(err.contains(want), "{arg}: {err}");
        }
    }

    #[test]
    fn flag_cases() {
        let three = "a=http://127.0.0.1:2380,b=http://127.0.0.1:2480,c=http://127.0.0.1:2580";
        let ok = parse(&[
            "--name",
            "b",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2480",
            "--initial-cluster",
            three,
        ])
        .unwrap();
        assert_eq!(ok.initial_cluster.len(), 3);
        let go_style =
            parse(&["-name", "x", "-initial-advertise-peer-urls", "http://127.0.0.1:9", "-data-dir", "/tmp/x"])
                .unwrap();
        assert_eq!(go_style.initial_cluster[0].0, "x");
        let errors: [(&[&str], &str); 6] = [
            (&["--bogus-flag", "1"], "unexpected argument"),
            (&["--name", "zz", "--initial-cluster", three], "couldn't find local name"),
            (&["--heartbeat-interval", "300"], "at least as 5 times"),
            (&["--initial-cluster-state", "maybe"], "initial-cluster-state"),
            (&["--snapshot-count", "x"], "invalid value"),
            (&["--listen-client-urls", "localhost:2379"], "http://"),
        ];
        for (args, want) in errors {
            let err = parse(args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn go_durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h2m3s").unwrap(), Duration::from_secs(3723));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn yaml_config_file() {
        let raw =
            raw_from_yaml("name: n1\ndata-dir: /tmp/n1\nheartbeat-interval: 50\nelection-timeout: 500\n").unwrap();
        let c = Config::from_raw(&raw);
        // n1's peer URL must be in the implicit initial cluster, which it is.
        let c = c.unwrap();
        assert_eq!((c.name.as_str(), c.heartbeat_ms, c.election_timeout_ms), ("n1", 50, 500));
        assert!(raw_from_yaml("enable-v2: true\n").unwrap_err().contains("unknown setting"));
    }
}
