//! Plain HTTP endpoints served on the client port beside gRPC, as etcd does:
//! `GET /health` (etcd 3.4's `{"health":"true"}`, 503 when unhealthy) and
//! `GET /metrics` (Prometheus text with etcd's metric names; `etcdctl check
//! datascale` reads `process_resident_memory_bytes` from it).
//!
//! Every value reported is read from live state at request time; nothing is cached
//! or estimated.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::Node;

/// How long `/health` waits for a linearizable read before reporting unhealthy.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

pub fn routes(node: Arc<Node>) -> Router {
    Router::new().route("/health", get(health)).route("/metrics", get(metrics)).with_state(node)
}

/// Healthy means: a leader is known, no alarm is raised, and a linearizable read
/// completes in time (etcd 3.4's rules).
async fn health(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let has_leader = node.group.metrics().current_leader.is_some();
    let alarmed = node
        .group
        .backend
        .begin_read()
        .ok()
        .and_then(|t| crate::consensus::state_machine::alarms(&t).ok())
        .is_none_or(|a| !a.is_empty());
    let read_ok = has_leader && !alarmed && node.group.read_barrier(HEALTH_TIMEOUT).await.is_ok();
    let (status, body) = if read_ok {
        (StatusCode::OK, r#"{"health":"true"}"#)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, r#"{"health":"false"}"#)
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body)
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

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let m = node.group.metrics();
    let (db_size, db_in_use) = node.group.backend.sizes().unwrap_or((0, 0));
    let revision = *node.group.revision.borrow();
    let is_leader = m.current_leader == Some(node.member_id);
    let gauges: [(&str, &str, u64); 8] = [
        (
            "etcd_server_has_leader",
            "Whether or not a leader exists. 1 is existence, 0 is not.",
            u64::from(m.current_leader.is_some()),
        ),
        (
            "etcd_server_is_leader",
            "Whether or not this member is a leader. 1 if is, 0 otherwise.",
            u64::from(is_leader),
        ),
        (
            "etcd_server_proposals_committed_total",
            "The total number of consensus proposals committed.",
            m.local_committed.map(|l| l.index()).unwrap_or(0),
        ),
        (
            "etcd_server_proposals_applied_total",
            "The total number of consensus proposals applied.",
            m.last_applied.map(|l| l.index()).unwrap_or(0),
        ),
        (
            "etcd_mvcc_db_total_size_in_bytes",
            "Total size of the underlying database physically allocated in bytes.",
            db_size,
        ),
        (
            "etcd_mvcc_db_total_size_in_use_in_bytes",
            "Total size of the underlying database logically in use in bytes.",
            db_in_use,
        ),
        ("etcd_debugging_mvcc_current_revision", "The current revision of store.", revision.max(0) as u64),
        ("process_resident_memory_bytes", "Resident memory size in bytes.", resident_memory_bytes()),
    ];
    let mut out = String::new();
    for (name, help, value) in gauges {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
