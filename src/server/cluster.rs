//! The etcd `Cluster` and `Maintenance` services: membership changes (through
//! the replicated member registry, see `etcd_store::members`), status, alarms,
//! hashes, snapshots, defragmentation and leader transfer.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{Node, ETCD_COMPAT_VERSION};
use crate::consensus::MemberId;
use crate::etcd_store::members::{member_id, records, MemberChange};
use crate::etcd_store::state_machine::alarms;
use crate::etcd_store::{Command, CommandResult};
use crate::proto::etcdserverpb::cluster_server::Cluster;
use crate::proto::etcdserverpb::maintenance_server::Maintenance;
use crate::proto::etcdserverpb::{
    alarm_request, AlarmMember, AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, HashKvRequest,
    HashKvResponse, HashRequest, HashResponse, Member, MemberAddRequest, MemberAddResponse, MemberListRequest,
    MemberListResponse, MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse, MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest,
    SnapshotResponse, StatusRequest, StatusResponse,
};

/// Bytes per `Maintenance.Snapshot` message (etcd sends 32 KiB pieces).
pub const SNAPSHOT_CHUNK_BYTES: usize = 32 * 1024;

pub struct ClusterService {
    pub node: Arc<Node>,
}

impl ClusterService {
    /// The member registry as this member has applied it, in ID order.
    pub fn members(node: &Node) -> Result<Vec<Member>, Status> {
        let txn = node.group.backend.begin_read().map_err(|e| Status::internal(e.to_string()))?;
        let list = records(&txn).map_err(|e| Status::internal(e.to_string()))?;
        Ok(list
            .into_iter()
            .map(|(id, r)| Member {
                id,
                name: r.name,
                peer_ur_ls: r.peer_urls,
                client_ur_ls: r.client_urls,
                is_learner: r.learner,
            })
            .collect())
    }

    /// Commits a registry change, then waits until this member has applied it so
    /// the member list in the response includes it.
    async fn change(&self, change: MemberChange) -> Result<Vec<Member>, Status> {
        let timeout = self.node.config.request_timeout();
        match self.node.group.propose(Command::Member(change), timeout).await {
            Ok(CommandResult::Ok(_)) => {}
            Ok(CommandResult::Err(e)) => return Err(super::errors::from_apply(e)),
            Err(e) => return Err(super::errors::from_consensus(e)),
        }
        self.node.group.read_barrier(timeout).await.map_err(super::errors::from_consensus)?;
        ClusterService::members(&self.node)
    }

    fn find(&self, id: MemberId) -> Result<Member, Status> {
        ClusterService::members(&self.node)?
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(super::errors::member_not_found)
    }

    /// Waits (bounded by the request timeout) until Raft's membership reflects
    /// `done`; the registry change is already committed, so a timeout here is not
    /// an error: the leader's reconciler finishes the change.
    async fn settle(&self, done: impl Fn(&crate::consensus::membership::RaftMembers) -> bool) {
        let deadline = tokio::time::Instant::now() + self.node.config.request_timeout() / 2;
        while !done(&self.node.group.raft_members()) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Peer URLs as etcd accepts them in `MemberAdd`/`MemberUpdate`: at least one,
/// each `http(s)://host:port` with nothing after the port.
fn valid_peer_urls(urls: &[String]) -> bool {
    !urls.is_empty()
        && urls.iter().all(|u| {
            let rest = u.strip_prefix("http://").or_else(|| u.strip_prefix("https://"));
            rest.is_some_and(super::config::valid_host_port)
        })
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(&self, req: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        self.node.require_admin(&req)?;
        let req = req.into_inner();
        if !valid_peer_urls(&req.peer_ur_ls) {
            return Err(super::errors::member_bad_urls());
        }
        let now_s =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let id = member_id(&req.peer_ur_ls, "", Some(now_s));
        let change = MemberChange::Add { id, peer_urls: req.peer_ur_ls.clone(), learner: req.is_learner };
        let members = self.change(change).await?;
        let member = Member { id, peer_ur_ls: req.peer_ur_ls, is_learner: req.is_learner, ..Default::default() };
        Ok(Response::new(MemberAddResponse { header: Some(self.node.member_header()), member: Some(member), members }))
    }

    async fn member_remove(&self, req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        self.node.require_admin(&req)?;
        let id = req.into_inner().id;
        let target = self.find(id)?;
        let voters_left = ClusterService::members(&self.node)?.iter().filter(|m| !m.is_learner && m.id != id).count();
        if !target.is_learner && voters_left == 0 {
            return Err(Status::failed_precondition(
                "etcdserver: re-configuration failed due to not enough started members",
            ));
        }
        let members = self.change(MemberChange::Remove { id }).await?;
        // A member removing itself answers at once: it is about to stop.
        if id != self.node.member_id {
            self.settle(|r| !r.nodes.contains_key(&id) && !r.joint).await;
        }
        Ok(Response::new(MemberRemoveResponse { header: Some(self.node.member_header()), members }))
    }

    async fn member_update(&self, req: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        self.node.require_admin(&req)?;
        let req = req.into_inner();
        if !valid_peer_urls(&req.peer_ur_ls) {
            return Err(super::errors::member_bad_urls());
        }
        let members = self.change(MemberChange::Update { id: req.id, peer_urls: req.peer_ur_ls }).await?;
        Ok(Response::new(MemberUpdateResponse { header: Some(self.node.member_header()), members }))
    }

    async fn member_list(&self, _req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let members = ClusterService::members(&self.node)?;
        Ok(Response::new(MemberListResponse { header: Some(self.node.member_header()), members }))
    }

    /// etcd refuses to promote a learner that has not caught up with the leader;
    /// the leader decides, wherever the request arrives.
    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        self.node.require_admin(&req)?;
        let id = req.into_inner().id;
        if !self.find(id)?.is_learner {
            return Err(super::errors::member_not_learner());
        }
        let timeout = self.node.config.request_timeout();
        let ready = self.node.group.learner_caught_up(id, timeout).await.map_err(super::errors::from_consensus)?;
        if !ready {
            return Err(super::errors::learner_not_ready());
        }
        let members = self.change(MemberChange::Promote { id }).await?;
        self.settle(|r| r.voters.contains(&id) && !r.joint).await;
        Ok(Response::new(MemberPromoteResponse { header: Some(self.node.member_header()), members }))
    }
}

/// etcd's Status `errors`: one per active alarm, as etcd prints an `AlarmMember`
/// (protobuf text format, trailing space included): `memberID:<id> alarm:<TYPE> `.
fn alarm_errors(node: &Node) -> Result<Vec<String>, Status> {
    let txn = node.group.backend.begin_read().map_err(|e| Status::internal(e.to_string()))?;
    let list = alarms(&txn).map_err(|e| Status::internal(e.to_string()))?;
    Ok(list
        .into_iter()
        .map(|(member, a)| {
            let name = crate::proto::etcdserverpb::AlarmType::try_from(a).map(|t| t.as_str_name()).unwrap_or("UNKNOWN");
            format!("memberID:{member} alarm:{name} ")
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
                let txn = self.node.linearizable_txn().await?;
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
        // etcd's applier answers alarms without a header.
        Ok(Response::new(AlarmResponse { header: None, alarms }))
    }

    type SnapshotStream = tokio_stream::wrappers::ReceiverStream<Result<SnapshotResponse, Status>>;

    /// Streams a consistent snapshot of this member's state (one read transaction)
    /// as etcd 3.4 does: its backend database in etcd's bbolt format
    /// (`etcd_format`) in `SNAPSHOT_CHUNK_BYTES` pieces with `remaining_bytes`
    /// counting down, then one message with the database's sha256. No header.
    async fn snapshot(&self, req: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        use sha2::Digest;
        self.node.require_admin_maintenance(&req)?;
        let txn = self.node.group.backend.begin_read().map_err(|e| Status::internal(e.to_string()))?;
        let db = tokio::task::spawn_blocking(move || crate::etcd_store::etcd_format::export(&txn))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut sent = 0;
            for chunk in db.chunks(SNAPSHOT_CHUNK_BYTES) {
                sent += chunk.len();
                let resp =
                    SnapshotResponse { header: None, remaining_bytes: (db.len() - sent) as u64, blob: chunk.to_vec() };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
            let sha = sha2::Sha256::digest(&db).to_vec();
            let _ = tx.send(Ok(SnapshotResponse { header: None, remaining_bytes: 0, blob: sha })).await;
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// etcd's `Hash`: a CRC over the whole replicated state (data, leases, member
    /// registry, alarms), equal on members that applied the same log prefix.
    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.node.require_admin_maintenance(&req)?;
        let txn = self.node.group.backend.begin_read().map_err(|e| Status::internal(e.to_string()))?;
        let hash = crate::storage::Backend::state_hash(&txn).map_err(|e| Status::internal(e.to_string()))?;
        let rev = crate::etcd_store::mvcc::read_revisions(&txn).map_err(|e| Status::internal(e.to_string()))?.0;
        drop(txn);
        let mut resp = HashResponse {
            header: Some(crate::proto::etcdserverpb::ResponseHeader { revision: rev, ..Default::default() }),
            hash,
        };
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    /// Rewrites this member's state file densely; reads and writes keep being
    /// served meanwhile (etcd blocks them for the whole defragmentation).
    async fn defragment(&self, req: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        self.node.require_admin_maintenance(&req)?;
        let started = std::time::Instant::now();
        let before = self.node.group.backend.file_size().map_err(|e| Status::internal(e.to_string()))?;
        self.node.group.defragment().await.map_err(|e| Status::internal(format!("etcdserver: defragment: {e}")))?;
        let after = self.node.group.backend.file_size().map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(before, after, took_ms = started.elapsed().as_millis() as u64, "defragmented the state file");
        // etcd answers a defragmentation without a header (client suites check it).
        Ok(Response::new(DefragmentResponse { header: None }))
    }

    /// etcd's `MoveLeader`: only the leader accepts it; the target must be a voter.
    async fn move_leader(&self, req: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        let target = req.into_inner().target_id;
        let group = &self.node.group;
        if !group.is_leader() {
            return Err(super::errors::not_leader());
        }
        if !group.raft_members().voters.contains(&target) {
            return Err(super::errors::bad_leader_transferee());
        }
        if target != self.node.member_id {
            group
                .transfer_leadership(target, self.node.config.request_timeout())
                .await
                .map_err(|_| super::errors::leader_transfer_timeout())?;
        }
        // As etcd's: no header.
        Ok(Response::new(MoveLeaderResponse { header: None }))
    }

    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        self.node.require_admin_maintenance(&req)?;
        let view = self.node.read_view(true).await?;
        let (hash, compacted) = view.hash_kv(req.into_inner().revision).map_err(super::errors::from_mvcc)?;
        // etcd reports -1 until the first compaction (its `compactMainRev` starts there).
        let compact_revision = if compacted == 0 { -1 } else { compacted };
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
