//! What the member reports about itself: request counters, proposal counters, a
//! per-second history for the dashboard, and a timeline of notable events.
//!
//! `/metrics` renders everything in the Prometheus text format with etcd's metric
//! names where etcd has them, and `concord_*` names for what etcd lacks. The
//! monitor task ([`run_monitor`]) samples once a second into bounded rings:
//! [`HISTORY_SAMPLES`] samples and [`EVENT_HISTORY`] events.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::Node;
use crate::stats::{Histogram, REQUEST_BUCKETS_S};

/// Seconds of per-second samples kept for the dashboard's charts.
pub const HISTORY_SAMPLES: usize = 300;
/// Notable events kept for the dashboard's timeline.
pub const EVENT_HISTORY: usize = 200;
/// gRPC methods with their own counters. The names come from request paths, which
/// a client chooses: calls to methods beyond this many (only unknown ones, as
/// concord serves fewer) count in the totals but get no series of their own.
pub const MAX_GRPC_METHODS: usize = 128;
/// gRPC status codes 0 (OK) to 16 (Unauthenticated).
const GRPC_CODES: usize = 17;

/// One gRPC method's counters. Looked up once per call under a read lock and
/// updated with relaxed atomics: a call allocates nothing for its statistics.
/// Rejected: a map keyed by owned (service, method, code) strings built per call
/// (five allocations and two mutex sections each, and one new series for every
/// path a client made up).
pub struct MethodStats {
    pub service: String,
    pub method: String,
    /// Handled calls by status code.
    handled: [AtomicU64; GRPC_CODES],
    /// Handling time: time to the response headers, which for a unary call is the
    /// whole call.
    seconds: Histogram,
}

impl MethodStats {
    fn new(service: &str, method: &str) -> Self {
        MethodStats {
            service: service.to_string(),
            method: method.to_string(),
            handled: std::array::from_fn(|_| AtomicU64::new(0)),
            seconds: Histogram::new(&REQUEST_BUCKETS_S),
        }
    }

    fn total(&self) -> u64 {
        self.handled.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    pub fn record(&self, code: tonic::Code, took: Duration) {
        let slot = (code as usize).min(GRPC_CODES - 1);
        self.handled[slot].fetch_add(1, Ordering::Relaxed);
        self.seconds.observe(took);
    }
}

/// Counters shared by every request handler. All recording is relaxed atomics
/// or a short std-mutex section (no await while held).
pub struct ServerStats {
    pub proposals_failed: AtomicU64,
    pub proposals_pending: AtomicI64,
    pub leader_changes: AtomicU64,
    pub watch_streams: AtomicI64,
    pub watchers: AtomicI64,
    /// Every open watch stream's outgoing queue, to report backlogs; entries of
    /// closed streams are dropped when the queues are next read.
    pub watch_queues: Mutex<Vec<WatchQueue>>,
    /// Per-method counters by service, then method (at most [`MAX_GRPC_METHODS`]).
    grpc_methods: RwLock<BTreeMap<String, BTreeMap<String, Arc<MethodStats>>>>,
    /// Calls to methods past [`MAX_GRPC_METHODS`]: in the totals, not in `/metrics`.
    grpc_untracked: Arc<MethodStats>,
    /// Every client RPC's handling time, for the dashboard's latency chart.
    pub request_latency: Histogram,
    history: Mutex<VecDeque<Sample>>,
    events: Mutex<VecDeque<Event>>,
    /// The blob service's counters.
    pub blob: super::blob::BlobStats,
}

impl Default for ServerStats {
    fn default() -> Self {
        ServerStats {
            proposals_failed: AtomicU64::new(0),
            proposals_pending: AtomicI64::new(0),
            leader_changes: AtomicU64::new(0),
            watch_streams: AtomicI64::new(0),
            watchers: AtomicI64::new(0),
            watch_queues: Mutex::default(),
            grpc_methods: RwLock::default(),
            grpc_untracked: Arc::new(MethodStats::new("(untracked)", "(untracked)")),
            request_latency: Histogram::new(&REQUEST_BUCKETS_S),
            blob: Default::default(),
            history: Mutex::new(VecDeque::with_capacity(HISTORY_SAMPLES)),
            events: Mutex::new(VecDeque::with_capacity(EVENT_HISTORY)),
        }
    }
}

/// A watch stream's outgoing queue, held weakly (the stream owns it).
pub type WatchQueue = tokio::sync::mpsc::WeakSender<Result<crate::proto::etcdserverpb::WatchResponse, tonic::Status>>;

/// One second of the member's life, for the dashboard's charts.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub unix_ms: u64,
    /// Client RPCs completed in the second.
    pub requests_per_s: u64,
    /// Revisions created in the second (write requests that changed the store).
    pub revisions_per_s: u64,
    /// Upper bucket bound of the 99th percentile of RPC handling time in the second.
    pub p99_ms: Option<f64>,
    pub db_size_bytes: u64,
    pub watchers: i64,
    pub leases: u64,
}

/// Something an operator wants to see on a timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub unix_ms: u64,
    pub kind: &'static str,
    pub text: String,
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Increments one of the stats' gauges now and decrements it when dropped.
pub struct GaugeGuard {
    stats: Arc<ServerStats>,
    gauge: fn(&ServerStats) -> &AtomicI64,
}

impl GaugeGuard {
    pub fn new(stats: Arc<ServerStats>, gauge: fn(&ServerStats) -> &AtomicI64) -> Self {
        gauge(&stats).fetch_add(1, Ordering::Relaxed);
        GaugeGuard { stats, gauge }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.gauge)(&self.stats).fetch_sub(1, Ordering::Relaxed);
    }
}

impl ServerStats {
    /// The counters of the gRPC method a request path (`/package.Service/Method`)
    /// names, created on its first call (once [`MAX_GRPC_METHODS`] are tracked, a
    /// shared counter that `/metrics` does not list); `None` for a path that is not
    /// a gRPC method's.
    pub fn grpc_method(&self, path: &str) -> Option<Arc<MethodStats>> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        if !service.contains('.') {
            return None;
        }
        let known =
            self.grpc_methods.read().expect("stats lock poisoned").get(service).and_then(|m| m.get(method)).cloned();
        if known.is_some() {
            return known;
        }
        let mut all = self.grpc_methods.write().expect("stats lock poisoned");
        let tracked: usize = all.values().map(BTreeMap::len).sum();
        if let Some(m) = all.get(service).and_then(|m| m.get(method)) {
            return Some(m.clone());
        }
        if tracked >= MAX_GRPC_METHODS {
            return Some(self.grpc_untracked.clone());
        }
        let stats = Arc::new(MethodStats::new(service, method));
        all.entry(service.to_string()).or_default().insert(method.to_string(), stats.clone());
        Some(stats)
    }

    pub fn event(&self, kind: &'static str, text: String) {
        tracing::info!(kind, "{text}");
        let mut e = self.events.lock().expect("stats lock poisoned");
        if e.len() == EVENT_HISTORY {
            e.pop_front();
        }
        e.push_back(Event { unix_ms: unix_ms(), kind, text });
    }

    pub fn history(&self) -> Vec<Sample> {
        self.history.lock().expect("stats lock poisoned").iter().cloned().collect()
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("stats lock poisoned").iter().cloned().collect()
    }

    /// (responses queued over all watch streams, the largest single backlog).
    pub fn watch_backlog(&self) -> (usize, usize) {
        let mut queues = self.watch_queues.lock().expect("stats lock poisoned");
        let mut total = 0;
        let mut max = 0;
        queues.retain(|q| match q.upgrade() {
            Some(tx) => {
                let backlog = tx.max_capacity() - tx.capacity();
                total += backlog;
                max = max.max(backlog);
                true
            }
            None => false,
        });
        (total, max)
    }

    fn total_rpcs(&self) -> u64 {
        let all = self.grpc_methods.read().expect("stats lock poisoned");
        all.values().flat_map(BTreeMap::values).map(|m| m.total()).sum::<u64>() + self.grpc_untracked.total()
    }
}

/// Samples the member once a second and records leader, membership and alarm
/// changes as events. Runs for the member's lifetime.
pub async fn run_monitor(node: Arc<Node>) {
    let stats = &node.stats;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut members: Option<Vec<(u64, bool)>> = None;
    let mut alarms: Option<Vec<(u64, i32)>> = None;
    let mut last_rpcs = 0;
    let mut last_rev = *node.group.revision.borrow();
    let mut last_buckets = stats.request_latency_buckets();
    loop {
        tick.tick().await;
        let (now_members, now_alarms, leases) = match node.group.backend.begin_read() {
            Ok(txn) => (
                crate::etcd_store::members::records(&txn)
                    .map(|r| r.into_iter().map(|(id, r)| (id, r.learner)).collect::<Vec<_>>())
                    .ok(),
                crate::etcd_store::state_machine::alarms(&txn).ok(),
                crate::etcd_store::mvcc::ReadView::new(&txn, &node.group.index)
                    .and_then(|v| v.lease_count())
                    .unwrap_or(0),
            ),
            Err(_) => (None, None, 0),
        };
        // An empty registry is one not seeded yet: its seeding is not news.
        if let (Some(before), Some(now)) = (members.as_ref().filter(|b| !b.is_empty()), &now_members) {
            for (id, learner) in now {
                match before.iter().find(|(b, _)| b == id) {
                    None => stats.event(
                        "membership",
                        format!("member {id:x} added{}", if *learner { " as learner" } else { "" }),
                    ),
                    Some((_, was)) if was != learner => stats.event("membership", format!("member {id:x} promoted")),
                    _ => {}
                }
            }
            for (id, _) in before.iter().filter(|(b, _)| !now.iter().any(|(n, _)| n == b)) {
                stats.event("membership", format!("member {id:x} removed"));
            }
        }
        if now_members.is_some() {
            members = now_members;
        }
        if let (Some(before), Some(now)) = (&alarms, &now_alarms) {
            let name =
                |a: i32| crate::proto::etcdserverpb::AlarmType::try_from(a).map_or("UNKNOWN", |t| t.as_str_name());
            for (member, a) in now.iter().filter(|x| !before.contains(x)) {
                stats.event("alarm", format!("alarm {} raised for {member:x}", name(*a)));
            }
            for (member, a) in before.iter().filter(|x| !now.contains(x)) {
                stats.event("alarm", format!("alarm {} cleared for {member:x}", name(*a)));
            }
        }
        if now_alarms.is_some() {
            alarms = now_alarms;
        }
        let rpcs = stats.total_rpcs();
        let rev = *node.group.revision.borrow();
        let buckets = stats.request_latency_buckets();
        let window: Vec<u64> = buckets.iter().zip(&last_buckets).map(|(a, b)| a - b).collect();
        let sample = Sample {
            unix_ms: unix_ms(),
            requests_per_s: rpcs - last_rpcs,
            revisions_per_s: (rev - last_rev).max(0) as u64,
            // Above every bucket bound counts as the last bound (JSON has no infinity).
            p99_ms: crate::stats::quantile_bound_s(&REQUEST_BUCKETS_S, &window, 0.99)
                .map(|s| s.min(REQUEST_BUCKETS_S[REQUEST_BUCKETS_S.len() - 1]) * 1000.0),
            db_size_bytes: node.group.backend.file_size().unwrap_or(0),
            watchers: stats.watchers.load(Ordering::Relaxed),
            leases,
        };
        (last_rpcs, last_rev, last_buckets) = (rpcs, rev, buckets);
        let mut h = stats.history.lock().expect("stats lock poisoned");
        if h.len() == HISTORY_SAMPLES {
            h.pop_front();
        }
        h.push_back(sample);
    }
}

/// Counts leader changes as Raft reports them (not sampled: a change lasting less
/// than a second still counts) and puts them on the timeline.
pub async fn watch_leader(node: Arc<Node>) {
    let mut leader = None;
    let mut changes = node.group.role_changes();
    loop {
        let (now, term) = changes.leader_and_term();
        if now != leader {
            if let Some(l) = now {
                node.stats.leader_changes.fetch_add(1, Ordering::Relaxed);
                node.stats.event("leader", format!("leader is now {l:x} (term {term})"));
            } else if leader.is_some() {
                node.stats.event("leader", "no leader".to_string());
            }
            leader = now;
        }
        if !changes.changed().await {
            return;
        }
    }
}

impl ServerStats {
    fn request_latency_buckets(&self) -> Vec<u64> {
        self.request_latency.bucket_counts()
    }
}

/// grpc-prometheus's `grpc_type` label for the streaming methods of the etcd API.
fn grpc_type(method: &str) -> &'static str {
    match method {
        "Watch" | "LeaseKeepAlive" => "bidi_stream",
        "Snapshot" | "Observe" => "server_stream",
        _ => "unary",
    }
}

fn resident_memory_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The whole `/metrics` page, from live state.
pub fn render(node: &Node) -> String {
    let m = node.group.metrics();
    let stats = &node.stats;
    let (db_size, db_in_use) = node.group.backend.sizes().unwrap_or((0, 0));
    let revision = *node.group.revision.borrow();
    let (keys, leases) = crate::etcd_store::mvcc::ReadView::open(&node.group.backend, &node.group.index)
        .ok()
        .map(|v| (v.key_count().unwrap_or(0), v.lease_count().unwrap_or(0)))
        .unwrap_or((0, 0));
    let committed = m.local_committed.map(|l| l.index()).unwrap_or(0);
    let applied = m.last_applied.map(|l| l.index()).unwrap_or(0);
    let load = |g: &AtomicI64| g.load(Ordering::Relaxed).to_string();
    let (backlog, max_backlog) = stats.watch_backlog();
    let purged = m.purged.map(|l| l.index()).unwrap_or(0);
    let series: [(&str, &str, String); 22] = [
        (
            "etcd_server_has_leader",
            "Whether or not a leader exists. 1 is existence, 0 is not.",
            u64::from(m.current_leader.is_some()).to_string(),
        ),
        (
            "etcd_server_is_leader",
            "Whether or not this member is a leader. 1 if is, 0 otherwise.",
            u64::from(m.current_leader == Some(node.member_id)).to_string(),
        ),
        (
            "etcd_server_proposals_committed_total",
            "The total number of consensus proposals committed.",
            committed.to_string(),
        ),
        (
            "etcd_server_proposals_applied_total",
            "The total number of consensus proposals applied.",
            applied.to_string(),
        ),
        (
            "etcd_server_proposals_pending",
            "The current number of pending proposals to commit.",
            load(&stats.proposals_pending),
        ),
        (
            "etcd_mvcc_db_total_size_in_bytes",
            "Total size of the underlying database physically allocated in bytes.",
            db_size.to_string(),
        ),
        (
            "etcd_mvcc_db_total_size_in_use_in_bytes",
            "Total size of the underlying database logically in use in bytes.",
            db_in_use.to_string(),
        ),
        ("etcd_debugging_mvcc_current_revision", "The current revision of store.", revision.max(0).to_string()),
        ("etcd_debugging_mvcc_keys_total", "Total number of keys.", keys.to_string()),
        ("etcd_debugging_mvcc_watch_stream_total", "Total number of watch streams.", load(&stats.watch_streams)),
        ("etcd_debugging_mvcc_watcher_total", "Total number of watchers.", load(&stats.watchers)),
        ("process_resident_memory_bytes", "Resident memory size in bytes.", resident_memory_bytes().to_string()),
        ("concord_leases_total", "Granted, unexpired leases.", leases.to_string()),
        (
            "concord_raft_log_purged_index",
            "Highest Raft log index removed from this member's log (a member that has not reached it catches up by snapshot).",
            purged.to_string(),
        ),
        (
            "concord_apply_lag_entries",
            "Committed log entries not yet applied on this member.",
            committed.saturating_sub(applied).to_string(),
        ),
        (
            "concord_watch_backlog_responses",
            "Watch responses queued for clients, over all streams.",
            backlog.to_string(),
        ),
        (
            "concord_watch_backlog_max_responses",
            "The largest number of responses queued on one watch stream.",
            max_backlog.to_string(),
        ),
        (
            "etcd_server_leader_changes_seen_total",
            "The number of leader changes seen.",
            stats.leader_changes.load(Ordering::Relaxed).to_string(),
        ),
        (
            "etcd_server_proposals_failed_total",
            "The total number of failed proposals seen.",
            stats.proposals_failed.load(Ordering::Relaxed).to_string(),
        ),
        ("concord_client_requests_total", "Client RPCs handled since start.", stats.total_rpcs().to_string()),
        ("concord_raft_groups", "Raft groups this member hosts.", node.registry.all().len().to_string()),
        (
            "concord_raft_groups_quiescent",
            "Hosted Raft groups idle and not ticking (no heartbeats, no election timer).",
            node.registry.liveness().quiet_groups().to_string(),
        ),
    ];
    let mut out = String::new();
    for (name, help, value) in series {
        // Names ending in _total are monotonic unless etcd itself reports them as
        // gauges (proposals committed/applied, keys, watchers, streams, leases).
        let kind = if [
            "etcd_server_leader_changes_seen_total",
            "etcd_server_proposals_failed_total",
            "concord_client_requests_total",
        ]
        .contains(&name)
        {
            "counter"
        } else {
            "gauge"
        };
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
    }
    render_streams(node, &mut out);
    render_queues(node, &mut out);
    render_blobs(node, &mut out);
    let group = &node.group.stats;
    for (name, help, h) in [
        ("etcd_disk_wal_fsync_duration_seconds", "The latency distributions of fsync called by WAL.", &group.wal_fsync),
        (
            "etcd_disk_backend_commit_duration_seconds",
            "The latency distributions of commit called by backend.",
            &group.backend_commit,
        ),
    ] {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} histogram\n");
        h.render(name, "", &mut out);
    }
    let rtt = "etcd_network_peer_round_trip_time_seconds";
    let _ = write!(out, "# HELP {rtt} Round-Trip-Time histogram between peers\n# TYPE {rtt} histogram\n");
    for (peer, h) in group.peer_rtt.lock().expect("stats lock poisoned").iter() {
        h.render(rtt, &format!("To=\"{peer:x}\""), &mut out);
    }
    let handled = "grpc_server_handled_total";
    let _ = write!(out, "# HELP {handled} Total number of RPCs completed on the server, regardless of success or failure.\n# TYPE {handled} counter\n");
    let methods: Vec<Arc<MethodStats>> =
        stats.grpc_methods.read().expect("stats lock poisoned").values().flat_map(BTreeMap::values).cloned().collect();
    for m in &methods {
        let (service, method, kind) = (&m.service, &m.method, grpc_type(&m.method));
        for (code, n) in m.handled.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                let code = grpc_code_name(tonic::Code::from(code as i32));
                let _ = writeln!(out, "{handled}{{grpc_code=\"{code}\",grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{kind}\"}} {n}");
            }
        }
    }
    let seconds = "grpc_server_handling_seconds";
    let _ = write!(out, "# HELP {seconds} Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.\n# TYPE {seconds} histogram\n");
    for m in &methods {
        let (service, method, kind, h) = (&m.service, &m.method, grpc_type(&m.method), &m.seconds);
        h.render(
            seconds,
            &format!("grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{kind}\""),
            &mut out,
        );
    }
    out
}

/// A Prometheus label value: `\\`, `"` and newlines escaped.
fn label_value(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The streams whose groups this member hosts (each replica reports its own
/// applied state): their count, and per stream its entries, consumer groups and
/// pending entries.
fn render_streams(node: &Node, out: &mut String) {
    let mut summaries = Vec::new();
    for g in node.host.streams() {
        match g.read_local(|v| v.summaries()) {
            Ok(s) => summaries.extend(s),
            Err(e) => tracing::warn!("stream metrics: {e}"),
        }
    }
    let _ = write!(
        out,
        "# HELP concord_streams Redis streams whose Raft group this member hosts.\n# TYPE concord_streams gauge\nconcord_streams {}\n",
        summaries.len()
    );
    for (name, help, value) in [
        (
            "concord_stream_entries",
            "Entries in a stream (XLEN).",
            (|s: &crate::streams::model::StreamSummary| s.length) as fn(&_) -> u64,
        ),
        ("concord_stream_consumer_groups", "Consumer groups of a stream.", |s| s.groups),
        ("concord_stream_pending_entries", "Entries delivered to a stream's consumers and not acknowledged.", |s| {
            s.pending
        }),
    ] {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n");
        for s in &summaries {
            let _ = writeln!(out, "{name}{{stream=\"{}\"}} {}", label_value(&s.name), value(s));
        }
    }
}

/// A queue stream as this member's replica holds it, with each consumer and the
/// messages it has still to be delivered.
pub type HostedQueue = (crate::streams::queue::QueueMeta, Vec<(crate::streams::queue::Consumer, u64)>);

/// The durable queues whose groups this member hosts, as applied here.
pub fn hosted_queues(node: &Node) -> Vec<HostedQueue> {
    let mut rows = Vec::new();
    for g in node.host.streams() {
        let read = g.read_queue_local(|v| {
            let mut found = Vec::new();
            for name in v.names()? {
                let (Some(meta), Some(consumers)) = (v.meta(&name)?, v.consumer_states(&name, None)?) else { continue };
                found.push((meta, consumers));
            }
            Ok(found)
        });
        match read {
            Ok(found) => rows.extend(found),
            Err(e) => tracing::warn!("queue state: {e}"),
        }
    }
    rows
}

/// The blob service's counters on this member, and the under-replicated gauge.
fn render_blobs(node: &Node, out: &mut String) {
    for (name, help, value) in blob_counters(node) {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n");
    }
    let name = "concord_blob_chunks_under_replicated";
    let _ = write!(
        out,
        "# HELP {name} Chunks of buckets this member leads with fewer live replicas than wanted (after the last repair round).\n# TYPE {name} gauge\n{name} {}\n",
        node.stats.blob.under_replicated.load(Ordering::Relaxed)
    );
}

/// The blob service's counters: (metric name, help, value).
pub fn blob_counters(node: &Node) -> [(&'static str, &'static str, u64); 6] {
    let b = &node.stats.blob;
    let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
    [
        (
            "concord_blob_chunks_corrupt_total",
            "Chunk replicas found corrupt on this member (and removed).",
            v(&b.corrupt_found),
        ),
        ("concord_blob_chunks_repaired_total", "Chunk replicas this member rewrote from a good copy.", v(&b.repaired)),
        (
            "concord_blob_chunks_rereplicated_total",
            "Chunk replicas this member copied to others after a member was lost.",
            v(&b.rereplicated),
        ),
        (
            "concord_blob_chunk_repairs_failed_total",
            "Chunk repairs this member attempted that failed.",
            v(&b.repair_failed),
        ),
        (
            "concord_blob_chunks_collected_total",
            "Unreferenced chunks collected by buckets this member leads.",
            v(&b.collected),
        ),
        (
            "concord_blob_orphans_removed_total",
            "Chunk files no object named, removed from this member.",
            v(&b.orphans_removed),
        ),
    ]
}

/// The durable queues whose groups this member hosts (each replica reports its
/// own applied state): per stream its messages, bytes, last sequence and dead
/// letters waiting; per consumer its outstanding leases, messages still to
/// deliver and redeliveries.
fn render_queues(node: &Node, out: &mut String) {
    let rows = hosted_queues(node);
    let _ = write!(
        out,
        "# HELP concord_queues Durable queue streams whose Raft group this member hosts.\n# TYPE concord_queues gauge\nconcord_queues {}\n",
        rows.len()
    );
    type Meta = crate::streams::queue::QueueMeta;
    for (name, help, value) in [
        ("concord_queue_messages", "Messages kept in a queue stream.", (|m: &Meta| m.msgs) as fn(&Meta) -> u64),
        ("concord_queue_bytes", "Payload and header bytes kept in a queue stream.", |m| m.bytes),
        ("concord_queue_last_seq", "A queue stream's last sequence.", |m| m.last_seq),
        ("concord_queue_dead_waiting", "Dead letters waiting to move to the dead-letter stream.", |m| m.dead_waiting),
    ] {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n");
        for (m, _) in &rows {
            let _ = writeln!(out, "{name}{{stream=\"{}\"}} {}", label_value(m.config.name.as_bytes()), value(m));
        }
    }
    type Consumer = (crate::streams::queue::Consumer, u64);
    for (name, kind, help, value) in [
        (
            "concord_queue_consumer_ack_pending",
            "gauge",
            "Messages leased to a consumer and not acknowledged.",
            (|c: &Consumer| c.0.pending) as fn(&Consumer) -> u64,
        ),
        ("concord_queue_consumer_num_pending", "gauge", "Messages a consumer has still to be delivered.", |c| c.1),
        ("concord_queue_consumer_redelivered_total", "counter", "Redeliveries to a consumer.", |c| c.0.redelivered),
    ] {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for (m, consumers) in &rows {
            for c in consumers {
                let _ = writeln!(
                    out,
                    "{name}{{stream=\"{}\",consumer=\"{}\"}} {}",
                    label_value(m.config.name.as_bytes()),
                    label_value(c.0.config.name.as_bytes()),
                    value(c)
                );
            }
        }
    }
}

/// grpc-go's names for status codes (as Prometheus labels show them).
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_methods_are_counted_per_method_and_bounded() {
        let stats = ServerStats::default();
        assert!(stats.grpc_method("/metrics").is_none());
        assert!(stats.grpc_method("/health/x").is_none(), "a service name without a package is not gRPC");
        let put = stats.grpc_method("/etcdserverpb.KV/Put").expect("a gRPC path");
        put.record(tonic::Code::Ok, Duration::from_millis(1));
        let again = stats.grpc_method("/etcdserverpb.KV/Put").expect("a gRPC path");
        assert!(Arc::ptr_eq(&put, &again), "one counter per method");
        again.record(tonic::Code::InvalidArgument, Duration::from_millis(1));
        assert_eq!((put.service.as_str(), put.method.as_str()), ("etcdserverpb.KV", "Put"));
        assert_eq!(put.handled[0].load(Ordering::Relaxed), 1);
        assert_eq!(put.handled[tonic::Code::InvalidArgument as usize].load(Ordering::Relaxed), 1);
        for i in 1..MAX_GRPC_METHODS + 10 {
            let m = stats.grpc_method(&format!("/x.Y/M{i}")).expect("a gRPC path");
            m.record(tonic::Code::Unimplemented, Duration::ZERO);
        }
        let tracked: usize = stats.grpc_methods.read().expect("lock").values().map(BTreeMap::len).sum();
        assert_eq!(tracked, MAX_GRPC_METHODS);
        assert_eq!(stats.grpc_untracked.total(), 10);
        assert_eq!(stats.total_rpcs(), 2 + (MAX_GRPC_METHODS as u64 - 1) + 10);
    }
}
