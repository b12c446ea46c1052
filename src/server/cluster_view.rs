//! A cluster-wide view assembled the way an operator's client would: ask any
//! reachable endpoint for the member list, then ask every member for its Status.
//! Used by `concord status` and by the dashboard (which asks its own member).

use std::time::Duration;

use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::proto::etcdserverpb::cluster_client::ClusterClient;
use crate::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::proto::etcdserverpb::{MemberListRequest, StatusRequest, StatusResponse};

/// One member as seen from outside.
#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    pub id: String,
    pub name: String,
    pub endpoint: String,
    pub peer_urls: Vec<String>,
    /// leader, follower, learner, or unreachable.
    pub role: String,
    pub healthy: bool,
    pub version: String,
    pub db_size_bytes: i64,
    pub db_in_use_bytes: i64,
    pub raft_term: u64,
    pub raft_index: u64,
    pub applied_index: u64,
    /// Entries behind the leader's log (leader's raft index − this member's applied index).
    pub lag: u64,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    pub cluster_id: String,
    pub leader: Option<String>,
    pub members: Vec<MemberView>,
    /// Why the view could not be built, when no endpoint answered.
    pub error: Option<String>,
}

fn endpoint_url(e: &str) -> String {
    if e.starts_with("http://") || e.starts_with("https://") {
        e.to_string()
    } else {
        format!("http://{e}")
    }
}

async fn channel(url: &str, timeout: Duration) -> Result<Channel, String> {
    Endpoint::from_shared(endpoint_url(url))
        .map_err(|e| format!("{url}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| format!("{url}: {e}"))
}

async fn status(url: &str, timeout: Duration) -> Result<StatusResponse, String> {
    let mut c = MaintenanceClient::new(channel(url, timeout).await?);
    c.status(StatusRequest {}).await.map(|r| r.into_inner()).map_err(|e| e.message().to_string())
}

/// Builds the view from the first endpoint that answers `MemberList`; each
/// member is then asked for its own Status (members without client URLs, i.e.
/// unstarted ones, are listed as unreachable).
pub async fn cluster_view(endpoints: &[String], timeout: Duration) -> ClusterView {
    let mut last_error = String::from("no endpoints given");
    let mut list = None;
    for e in endpoints {
        match channel(e, timeout).await {
            Ok(ch) => match ClusterClient::new(ch).member_list(MemberListRequest { linearizable: false }).await {
                Ok(r) => {
                    list = Some(r.into_inner());
                    break;
                }
                Err(s) => last_error = format!("{e}: {}", s.message()),
            },
            Err(err) => last_error = err,
        }
    }
    let Some(list) = list else {
        return ClusterView { cluster_id: String::new(), leader: None, members: Vec::new(), error: Some(last_error) };
    };
    let cluster_id = list.header.as_ref().map(|h| format!("{:x}", h.cluster_id)).unwrap_or_default();
    let mut statuses = Vec::new();
    for m in &list.members {
        let s = match m.client_ur_ls.first() {
            Some(url) => status(url, timeout).await,
            None => Err("unstarted".to_string()),
        };
        statuses.push(s);
    }
    let leader = statuses.iter().flatten().map(|s| s.leader).find(|l| *l != 0);
    let leader_index = statuses
        .iter()
        .flatten()
        .find(|s| Some(s.header.as_ref().map_or(0, |h| h.member_id)) == leader)
        .map(|s| s.raft_index);
    let members = list
        .members
        .iter()
        .zip(statuses)
        .map(|(m, s)| {
            let endpoint = m.client_ur_ls.first().cloned().unwrap_or_default();
            match s {
                Ok(s) => MemberView {
                    id: format!("{:x}", m.id),
                    name: m.name.clone(),
                    endpoint,
                    peer_urls: m.peer_ur_ls.clone(),
                    role: if s.is_learner {
                        "learner"
                    } else if Some(m.id) == leader {
                        "leader"
                    } else {
                        "follower"
                    }
                    .to_string(),
                    healthy: s.leader != 0 && s.errors.is_empty(),
                    version: s.version,
                    db_size_bytes: s.db_size,
                    db_in_use_bytes: s.db_size_in_use,
                    raft_term: s.raft_term,
                    raft_index: s.raft_index,
                    applied_index: s.raft_applied_index,
                    lag: leader_index.map_or(0, |l| l.saturating_sub(s.raft_applied_index)),
                    errors: s.errors,
                },
                Err(e) => MemberView {
                    id: format!("{:x}", m.id),
                    name: m.name.clone(),
                    endpoint,
                    peer_urls: m.peer_ur_ls.clone(),
                    role: "unreachable".to_string(),
                    healthy: false,
                    version: String::new(),
                    db_size_bytes: 0,
                    db_in_use_bytes: 0,
                    raft_term: 0,
                    raft_index: 0,
                    applied_index: 0,
                    lag: 0,
                    errors: vec![e],
                },
            }
        })
        .collect();
    ClusterView { cluster_id, leader: leader.map(|l| format!("{l:x}")), members, error: None }
}

/// etcdctl's human sizes (`20 kB`, `1.1 MB`).
pub fn human_size(bytes: i64) -> String {
    let b = bytes.max(0) as f64;
    for (unit, scale) in [("GB", 1e9), ("MB", 1e6), ("kB", 1e3)] {
        if b >= scale {
            let v = b / scale;
            return if v < 10.0 { format!("{v:.1} {unit}") } else { format!("{v:.0} {unit}") };
        }
    }
    format!("{b} B")
}

/// The view as a terminal table.
pub fn table(view: &ClusterView) -> String {
    if let Some(e) = &view.error {
        return format!("cannot reach the cluster: {e}\n");
    }
    let header =
        ["ID", "NAME", "ENDPOINT", "ROLE", "HEALTH", "TERM", "INDEX", "APPLIED", "LAG", "DB SIZE", "IN USE", "ERRORS"];
    let rows: Vec<Vec<String>> = view
        .members
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                m.name.clone(),
                m.endpoint.clone(),
                m.role.clone(),
                if m.healthy { "healthy" } else { "unhealthy" }.to_string(),
                m.raft_term.to_string(),
                m.raft_index.to_string(),
                m.applied_index.to_string(),
                m.lag.to_string(),
                human_size(m.db_size_bytes),
                human_size(m.db_in_use_bytes),
                m.errors.join("; "),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].len()).chain([header[i].len()]).max().unwrap_or(0))
        .collect();
    let line = || format!("+{}+\n", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("+"));
    let row = |cells: Vec<String>| {
        format!("|{}|\n", cells.iter().zip(&widths).map(|(c, w)| format!(" {c:<w$} ")).collect::<Vec<_>>().join("|"))
    };
    let mut out = format!("cluster {}  leader {}\n", view.cluster_id, view.leader.as_deref().unwrap_or("none"));
    out.push_str(&line());
    out.push_str(&row(header.iter().map(|s| s.to_string()).collect()));
    out.push_str(&line());
    for r in rows {
        out.push_str(&row(r));
    }
    out.push_str(&line());
    out
}
