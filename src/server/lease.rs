//! The etcd `Lease` service. Grants and revokes go through Raft; keep-alives and
//! time-to-live answers come from the leader's lessor (see `crate::etcd_store::lease`).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::Credentials;
use super::{errors, Node};
use crate::etcd_store::lease::renewer::RenewError;
use crate::etcd_store::lease::{Lessor, MAX_LEASE_TTL_S};
use crate::etcd_store::Command;
use crate::proto::etcdserverpb::lease_server::Lease;
use crate::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};

/// Keep-alive responses buffered per stream before the reader is waited for.
pub const KEEPALIVE_STREAM_BUFFER: usize = 16;

pub struct LeaseService {
    pub node: Arc<Node>,
    pub lessor: Arc<Lessor>,
}

/// One keep-alive, answered by the leader (see `crate::etcd_store::lease`): the TTL it was
/// renewed to, or TTL 0 for a lease that does not exist or has expired (etcd's
/// "lease not found" on a keep-alive stream).
pub async fn keep_alive(node: &Node, lessor: &Lessor, id: i64) -> Result<LeaseKeepAliveResponse, Status> {
    let ttl = match lessor.keep_alive(id).await {
        Ok(ttl) => ttl,
        Err(RenewError::Apply(e)) => return Err(errors::from_apply(e)),
        Err(RenewError::Consensus(e)) => return Err(errors::from_consensus(e)),
    };
    let mut resp = LeaseKeepAliveResponse { header: None, id, ttl };
    node.fill_header(&mut resp.header);
    Ok(resp)
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(&self, req: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        let req = req.into_inner();
        if req.ttl > MAX_LEASE_TTL_S {
            return Err(errors::lease_ttl_too_large());
        }
        let id = if req.id == 0 { self.lessor.next_id() } else { req.id };
        let ttl_s = req.ttl.max(self.lessor.min_ttl_s());
        let mut resp: LeaseGrantResponse = self.node.propose(Command::LeaseGrant { id, ttl_s }).await?;
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn lease_revoke(&self, req: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        let creds = Credentials::of(&req);
        let id = req.into_inner().id;
        // etcd's `checkLeasePuts`: revoking deletes the attached keys, so the caller
        // must be allowed to write every one of them.
        let keys = if self.node.auth_state()?.enabled {
            self.node.read_view(true).await?.lease_keys(id).map_err(errors::from_mvcc)?
        } else {
            Vec::new()
        };
        let check = |c: &super::auth::Caller| {
            keys.iter().try_for_each(|k| c.check(k, &[], crate::etcd_store::auth::Access::Write))
        };
        let mut resp: LeaseRevokeResponse = self.node.propose_as(&creds, check, Command::LeaseRevoke { id }).await?;
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<LeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(KEEPALIVE_STREAM_BUFFER);
        let node = self.node.clone();
        let lessor = self.lessor.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = tx.closed() => return,
                };
                let id = match msg {
                    Ok(Some(r)) => r.id,
                    Ok(None) | Err(_) => return,
                };
                let out = keep_alive(&node, &lessor, id).await;
                let stop = out.is_err();
                if tx.send(out).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let req = req.into_inner();
        let view = self.node.read_view(false).await?;
        let found = match view.lease(req.id).map_err(errors::from_mvcc)? {
            None => None,
            Some(rec) => {
                let keys = if req.keys { view.lease_keys(req.id).map_err(errors::from_mvcc)? } else { vec![] };
                Some((rec, keys))
            }
        };
        drop(view);
        let mut resp = match found {
            None => LeaseTimeToLiveResponse { header: None, id: req.id, ttl: -1, granted_ttl: 0, keys: vec![] },
            Some((rec, keys)) => LeaseTimeToLiveResponse {
                header: None,
                id: req.id,
                ttl: self.lessor.time_to_live_ms(&rec).await.max(0) / 1000,
                granted_ttl: rec.ttl_s,
                keys,
            },
        };
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn lease_leases(&self, _req: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        let view = self.node.read_view(false).await?;
        let leases = view.leases().map_err(errors::from_mvcc)?.into_iter().map(|r| LeaseStatus { id: r.id }).collect();
        drop(view);
        let mut resp = LeaseLeasesResponse { header: None, leases };
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }
}
