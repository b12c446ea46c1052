//! The etcd `Cluster` and `Maintenance` services (the parts etcdctl needs for
//! `member list`, `endpoint status` and `endpoint health`).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{Node, ETCD_COMPAT_VERSION};
use crate::consensus::state_machine::{alarms, member_attrs};
use crate::consensus::Command;
use crate::proto::etcdserverpb::cluster_server::Cluster;
use crate::proto::etcdserverpb::maintenance_server::Maintenance;
use crate::proto::etcdserverpb::{
    alarm_request, AlarmMember, AlarmRequest, AlarmResponse, HashKvRequest, HashKvResponse, Member, MemberListRequest,
    MemberListResponse, SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};

/// Bytes per `Maintenance.Snapshot` message (etcd sends 32 KiB pieces).
pub const SNAPSHOT_CHUNK_BYTES: usize = 32 * 1024;

pub struct ClusterService {
    pub node: Arc<Node>,
}

impl ClusterService {
    /// Members from the Raft membership, named by their published attributes.
    pub fn members(node: &Node) -> Result<Vec<Member>, Status> {
        let metrics = node.group.metrics();
        let membership = metrics.membership_config.membership().clone();
        let txn = node.group.backend.begin_read().map_err(|e| Status::internal(e.to_string()))?;
        let attrs = member_attrs(&txn).map_err(|e| Status::internal(e.to_string()))?;
        let voters: Vec<u64> = membership.voter_ids().collect();
        let mut out: Vec<Member> = membership
            .nodes()
            .map(|(id, info)| {
                let attr = attrs.iter().find(|(a, _)| a == id).map(|(_, a)| a.clone()).unwrap_or_default();
                Member {
                    id: *id,
                    name: attr.name,
                    peer_ur_ls: info.peer_urls.clone(),
                    client_ur_ls: attr.client_urls,
                    is_learner: !voters.contains(id),
                }
            })
            .collect();
        out.sort_by_key(|m| m.id);
        Ok(out)
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(&self, _req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let members = ClusterService::members(&self.node)?;
        let mut resp = MemberListResponse { header: None, members };
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }
}

/// etcd's Status `errors`: one `alarm:<TYPE>` per active alarm.
fn alarm_errors(node: &Node) -> Result<Vec<String>, Status> {
    let txn = node.group.backend.begin_read().map_err(|e| Status::internal(e.to_string()))?;
    let list = alarms(&txn).map_err(|e| Status::internal(e.to_string()))?;
    Ok(list
        .into_iter()
        .map(|(_, a)| {
            let name = crate::proto::etcdserverpb::AlarmType::try_from(a).map(|t| t.as_str_name()).unwrap_or("UNKNOWN");
            format!("alarm:{name}")
        })
        .collect())
}

pub struct MaintenanceService {
    pub node: Arc<Node>,
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let req = req.into_inner();
        let action = alarm_request::AlarmAction::try_from(req.action)
            .map_err(|_| Status::invalid_argument("etcdserver: unknown alarm action"))?;
        let alarms = match action {
            alarm_request::AlarmAction::Get => {
                // Linearizable, as etcd's (which goes through Raft): an alarm raised on
                // another member is visible as soon as that member reported it.
                self.node
                    .group
                    .read_barrier(self.node.config.request_timeout())
                    .await
                    .map_err(super::errors::from_consensus)?;
                let txn = self.node.group.backend.begin_read().map_err(|e| Status::internal(e.to_string()))?;
                alarms(&txn)
                    .map_err(|e| Status::internal(e.to_string()))?
                    .into_iter()
                    .map(|(m, a)| AlarmMember { member_id: m, alarm: a })
                    .collect()
            }
            alarm_request::AlarmAction::Activate | alarm_request::AlarmAction::Deactivate => {
                let activate = action == alarm_request::AlarmAction::Activate;
                let cmd = Command::Alarm { activate, member: req.member_id, alarm: req.alarm };
                match self.node.group.propose(cmd, self.node.config.request_timeout()).await {
                    Ok(_) => vec![AlarmMember { member_id: req.member_id, alarm: req.alarm }],
                    Err(e) => return Err(super::errors::from_consensus(e)),
                }
            }
        };
        let mut resp = AlarmResponse { header: None, alarms };
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    type SnapshotStream = tokio_stream::wrappers::ReceiverStream<Result<SnapshotResponse, Status>>;

    /// Streams a consistent snapshot of this member's state (one read transaction)
    /// in `SNAPSHOT_CHUNK_BYTES` pieces; the data carries its own checksum.
    async fn snapshot(&self, _req: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let txn = self.node.group.backend.begin_read().map_err(|e| Status::internal(e.to_string()))?;
        let data = crate::storage::Backend::snapshot_bytes(&txn).map_err(|e| Status::internal(e.to_string()))?;
        drop(txn);
        let data = crate::storage::encode_snapshot_file(&data);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let node = self.node.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            for chunk in data.chunks(SNAPSHOT_CHUNK_BYTES) {
                sent += chunk.len();
                let mut header = None;
                node.fill_header(&mut header);
                let resp =
                    SnapshotResponse { header, remaining_bytes: (data.len() - sent) as u64, blob: chunk.to_vec() };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        let view = self.node.read_view(true).await?;
        let (hash, compact_revision) = view.hash_kv(req.into_inner().revision).map_err(super::errors::from_mvcc)?;
        let mut resp = HashKvResponse { header: None, hash, compact_revision };
        resp.header =
            Some(crate::proto::etcdserverpb::ResponseHeader { revision: view.current_rev(), ..Default::default() });
        drop(view);
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let m = self.node.group.metrics();
        let (db_size, db_in_use) = self.node.group.backend.sizes().map_err(|e| Status::internal(e.to_string()))?;
        let is_learner = !m.membership_config.membership().voter_ids().any(|id| id == self.node.member_id);
        let mut resp = StatusResponse {
            header: None,
            version: ETCD_COMPAT_VERSION.to_string(),
            db_size: db_size as i64,
            leader: m.current_leader.unwrap_or(0),
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.current_term,
            raft_applied_index: m.last_applied.map(|l| l.index()).unwrap_or(0),
            errors: alarm_errors(&self.node)?,
            db_size_in_use: db_in_use as i64,
            is_learner,
        };
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }
}
