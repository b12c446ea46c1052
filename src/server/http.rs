//! Plain HTTP endpoints served on the client port beside gRPC (and on
//! `--listen-metrics-urls`), as etcd does: `GET /health` (etcd 3.4's
//! `{"health":"true"}`, 503 when unhealthy), `/livez` and `/readyz` (etcd 3.5's
//! text answers), and `GET /metrics` (Prometheus text with etcd's metric names;
//! `etcdctl check datascale` reads `process_resident_memory_bytes` from it).
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

use super::{metrics, Node};

/// How long `/health` waits for a linearizable read before reporting unhealthy.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

pub fn routes(node: Arc<Node>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard))
        .route("/dashboard/", get(dashboard))
        .route("/dashboard/api/state", get(dashboard_state))
        .with_state(node)
}

/// Healthy means: a leader is known, no alarm is raised, and a linearizable read
/// completes in time (etcd 3.4's rules).
async fn health(State(node): State<Arc<Node>>) -> impl IntoResponse {
    // The quorum read comes first, so the alarms read next include every alarm
    // committed before this request, whichever member raised it.
    let has_leader = node.group.metrics().current_leader.is_some();
    let read_ok = has_leader && node.group.read_barrier(HEALTH_TIMEOUT).await.is_ok();
    let alarmed = node
        .group
        .backend
        .begin_read()
        .ok()
        .and_then(|t| crate::etcd_store::state_machine::alarms(&t).ok())
        .is_none_or(|a| !a.is_empty());
    let read_ok = read_ok && !alarmed;
    let (status, body) = if read_ok {
        (StatusCode::OK, r#"{"health":"true"}"#)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, r#"{"health":"false"}"#)
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body)
}

/// The dashboard page: one self-contained file compiled into the binary (no CDN,
/// no external assets); its script polls `/dashboard/api/state` every second.
const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");

async fn dashboard() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], DASHBOARD_HTML)
}

/// How long the dashboard's cluster view waits for each member's Status.
const DASHBOARD_MEMBER_TIMEOUT: Duration = Duration::from_millis(800);

/// Everything the dashboard shows, as JSON: the cluster as this member's
/// clients see it, plus this member's per-second history and event timeline.
async fn dashboard_state(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let endpoints = node.config.advertise_client_urls.clone();
    let view = super::cluster_view::cluster_view(&endpoints, DASHBOARD_MEMBER_TIMEOUT).await;
    let alarms: Vec<String> = node
        .group
        .backend
        .begin_read()
        .ok()
        .and_then(|t| crate::etcd_store::state_machine::alarms(&t).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|(m, a)| {
            let name = crate::proto::etcdserverpb::AlarmType::try_from(a).map_or("UNKNOWN", |t| t.as_str_name());
            format!("{name} on {m:x}")
        })
        .collect();
    let queues: Vec<serde_json::Value> = super::metrics::hosted_queues(&node)
        .into_iter()
        .map(|(m, consumers)| {
            serde_json::json!({
                "name": m.config.name,
                "retention": format!("{:?}", m.config.retention).to_lowercase(),
                "messages": m.msgs,
                "bytes": m.bytes,
                "first_seq": if m.msgs == 0 { 0 } else { m.first_seq },
                "last_seq": m.last_seq,
                "dead_waiting": m.dead_waiting,
                "dead_lettered": m.dead_lettered,
                "consumers": consumers.iter().map(|(c, pending)| serde_json::json!({
                    "name": c.config.name,
                    "ack_pending": c.pending,
                    "num_pending": pending,
                    "redelivered": c.redelivered,
                    "acked": c.acked,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut blob: serde_json::Map<String, serde_json::Value> = super::metrics::blob_counters(&node)
        .into_iter()
        .map(|(name, _, value)| (name.trim_start_matches("concord_blob_").to_string(), value.into()))
        .collect();
    blob.insert(
        "chunks_under_replicated".into(),
        node.stats.blob.under_replicated.load(std::sync::atomic::Ordering::Relaxed).into(),
    );
    let body = serde_json::json!({
        "queues": queues,
        "blob": blob,
        "member_id": format!("{:x}", node.member_id),
        "member_name": node.config.name,
        "quota_bytes": node.config.quota_backend_bytes,
        "view": view,
        "history": node.stats.history(),
        "events": node.stats.events(),
        "alarms": alarms,
    });
    ([(header::CONTENT_TYPE, "application/json")], body.to_string())
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], super::metrics::render(&node))
}

/// etcd 3.5's `/livez`: the process is alive and its Raft group has not stopped.
async fn livez(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let m = node.group.metrics();
    match &m.running_state {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("[-]raft failed: {e}\nlivez check failed")),
    }
}

/// etcd 3.5's `/readyz`: ready to serve, i.e. no alarm, a leader, and a
/// linearizable read completes in time. `?verbose` lists every check.
async fn readyz(State(node): State<Arc<Node>>, uri: axum::http::Uri) -> impl IntoResponse {
    // The quorum read first: the alarms read after it are current cluster-wide.
    let read = node.group.read_barrier(HEALTH_TIMEOUT).await.map_err(|e| e.to_string());
    let alarms = node.group.backend.begin_read().ok().and_then(|t| crate::etcd_store::state_machine::alarms(&t).ok());
    let corrupt = crate::etcd_store::state_machine::ALARM_CORRUPT;
    let checks: [(&str, Result<(), String>); 4] = [
        (
            "data_corruption",
            match &alarms {
                Some(a) if a.iter().any(|(_, t)| *t == corrupt) => Err("alarm CORRUPT is raised".into()),
                Some(_) => Ok(()),
                None => Err("cannot read alarms".into()),
            },
        ),
        (
            "alarm",
            match &alarms {
                Some(a) if a.iter().any(|(_, t)| *t != corrupt) => Err("an alarm is raised".into()),
                _ => Ok(()),
            },
        ),
        ("leader", if node.group.metrics().current_leader.is_some() { Ok(()) } else { Err("no leader".into()) }),
        ("linearizable_read", read),
    ];
    let verbose = uri.query().is_some_and(|q| q.split('&').any(|p| p == "verbose" || p.starts_with("verbose=")));
    let failed = checks.iter().any(|(_, r)| r.is_err());
    let mut body = String::new();
    for (name, r) in &checks {
        match r {
            Ok(()) if verbose => body.push_str(&format!("[+]{name} ok\n")),
            Err(e) => body.push_str(&format!("[-]{name} failed: {e}\n")),
            Ok(()) => {}
        }
    }
    if failed {
        body.push_str("readyz check failed");
        (StatusCode::SERVICE_UNAVAILABLE, body)
    } else {
        body.push_str("ok");
        (StatusCode::OK, body)
    }
}

/// Counts every client RPC by service, method and gRPC status code, and logs
/// requests slower than `--slow-request-threshold`. The code is read from the
/// response headers: tonic puts an error's status there ("trailers-only"); a call
/// that succeeds reports it in trailers, so no header means OK.
pub async fn grpc_stats(
    State(node): State<Arc<Node>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let Some(method) = node.stats.grpc_method(req.uri().path()) else { return next.run(req).await };
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let took = started.elapsed();
    let code = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from);
    node.stats.request_latency.observe(took);
    method.record(code, took);
    if took >= node.config.slow_request_threshold {
        let (service, method) = (method.service.as_str(), method.method.as_str());
        tracing::warn!(
            service,
            method,
            code = metrics::grpc_code_name(code),
            took_ms = took.as_millis() as u64,
            "slow request"
        );
    }
    resp
}
