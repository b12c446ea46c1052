//! Server-side coordination recipes: etcd's `v3lockpb.Lock` and
//! `v3electionpb.Election`, built from KV transactions on leased keys.
//!
//! A lock or candidacy is the key `<name>/<lease id in hex>`, attached to the
//! caller's lease. Holders queue in create-revision order; a waiter owns the
//! lock/leadership once no key of the same name with a smaller create revision
//! remains. That create revision is returned and is a **fencing token**: it only
//! grows, so a resource can reject requests carrying an older token.
//!
//! Unlike etcd (Jepsen, etcd #11456), ownership is re-checked at grant time: the
//! waiter's own key must still exist with its create revision — i.e. its lease has
//! not expired while it waited — or the grant is refused.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::Credentials;
use super::{errors, Node};
use crate::etcd_store::auth::Access;
use crate::etcd_store::lease::Lessor;
use crate::etcd_store::mvcc::Rev;
use crate::etcd_store::Command;
use crate::proto::etcdserverpb::{
    compare, range_request, request_op, response_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    ResponseHeader, TxnRequest, TxnResponse,
};
use crate::proto::mvccpb::KeyValue;
use crate::proto::v3electionpb::election_server::Election;
use crate::proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest, ProclaimResponse,
    ResignRequest, ResignResponse,
};
use crate::proto::v3lockpb::lock_server::Lock;
use crate::proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};

/// Leader-change notifications buffered per Observe stream.
pub const OBSERVE_STREAM_BUFFER: usize = 16;

fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn op(r: request_op::Request) -> RequestOp {
    RequestOp { request: Some(r) }
}

fn create_rev_is(key: &[u8], rev: Rev) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(rev)),
        range_end: vec![],
    }
}

async fn txn(node: &Node, req: TxnRequest) -> Result<TxnResponse, Status> {
    node.propose(Command::Txn(prost::Message::encode_to_vec(&req))).await
}

fn range_kvs(resp: &TxnResponse, i: usize) -> Vec<KeyValue> {
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseRange(r)) => r.kvs.clone(),
        _ => vec![],
    }
}

/// The oldest (first-created) key under `prefix`: the current owner.
async fn first_created(node: &Node, prefix: &[u8]) -> Result<Option<KeyValue>, Status> {
    let view = node.read_view(false).await?;
    let req = RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: range_request::SortOrder::Ascend as i32,
        sort_target: range_request::SortTarget::Create as i32,
        ..Default::default()
    };
    Ok(view.range(&req).map_err(errors::from_mvcc)?.kvs.into_iter().next())
}

/// Creates `key` on `lease` unless it exists; returns its create revision.
async fn enqueue(node: &Node, key: &[u8], value: &[u8], lease: i64) -> Result<(Rev, Option<KeyValue>), Status> {
    let put = PutRequest { key: key.to_vec(), value: value.to_vec(), lease, ..Default::default() };
    let get = RangeRequest { key: key.to_vec(), ..Default::default() };
    let resp = txn(
        node,
        TxnRequest {
            compare: vec![create_rev_is(key, 0)],
            success: vec![op(request_op::Request::RequestPut(put))],
            failure: vec![op(request_op::Request::RequestRange(get))],
        },
    )
    .await?;
    if resp.succeeded {
        return Ok((resp.header.map(|h| h.revision).unwrap_or_default(), None));
    }
    let existing = range_kvs(&resp, 0).into_iter().next().ok_or_else(|| Status::internal("queued key vanished"))?;
    Ok((existing.create_revision, Some(existing)))
}

/// Waits until no key under `prefix` has a create revision below `my_rev`.
async fn wait_turn(node: &Node, prefix: &[u8], my_rev: Rev) -> Result<(), Status> {
    let mut rev_rx = node.group.revision.clone();
    loop {
        rev_rx.borrow_and_update();
        let view = node.read_view(false).await?;
        let req = RangeRequest {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
            max_create_revision: my_rev - 1,
            count_only: false,
            limit: 1,
            ..Default::default()
        };
        let ahead = view.range(&req).map_err(errors::from_mvcc)?.kvs;
        drop(view);
        if ahead.is_empty() {
            return Ok(());
        }
        if rev_rx.changed().await.is_err() {
            return Err(Status::unavailable("etcdserver: server stopping"));
        }
    }
}

/// Re-checks at grant time that `key` still exists with create revision `rev`.
async fn still_held(node: &Node, key: &[u8], rev: Rev) -> Result<KeyValue, Status> {
    let view = node.read_view(false).await?;
    match view.get(key).map_err(errors::from_mvcc)? {
        Some(kv) if kv.create_revision == rev => Ok(kv),
        _ => Err(errors::lease_not_found()),
    }
}

/// Deletes a queued key if the waiter gives up (client cancel or error), as etcd's
/// mutex does; disarmed once the key is granted.
struct Abandon {
    node: Arc<Node>,
    key: Option<Vec<u8>>,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let node = self.node.clone();
            tokio::spawn(async move {
                let del = DeleteRangeRequest { key, ..Default::default() };
                let _ = node
                    .propose::<crate::proto::etcdserverpb::DeleteRangeResponse>(Command::DeleteRange(
                        prost::Message::encode_to_vec(&del),
                    ))
                    .await;
            });
        }
    }
}

fn queue_key(name: &[u8], lease: i64) -> (Vec<u8>, Vec<u8>) {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    let mut key = prefix.clone();
    key.extend_from_slice(format!("{lease:x}").as_bytes());
    (prefix, key)
}

/// A lock or campaign writes its own key and reads the whole queue: the caller
/// needs both (etcd's recipes run as the caller's own KV requests).
fn check_queue(node: &Node, creds: &Credentials, prefix: &[u8], key: &[u8]) -> Result<(), Status> {
    let caller = node.caller(creds)?;
    caller.check(key, &[], Access::Write).map_err(as_recipe_error)?;
    caller.check(prefix, &prefix_end(prefix), Access::Read).map_err(as_recipe_error)
}

/// etcd's lock and election services call the KV API as a client and return its
/// errors with code `Unknown`; clients see exactly that.
fn as_recipe_error(s: Status) -> Status {
    Status::unknown(s.message().to_string())
}

/// Lifetime of the lease a lock or campaign gets when the request names none:
/// etcd runs them in a `concurrency.Session`, which then grants a lease of the
/// default session TTL and never keeps it alive (the session is orphaned).
const SESSION_TTL_S: i64 = 60;

async fn session_lease(node: &Node, lessor: &Lessor, lease: i64) -> Result<i64, Status> {
    if lease != 0 {
        return Ok(lease);
    }
    let id = lessor.next_id();
    let ttl_s = SESSION_TTL_S.max(lessor.min_ttl_s());
    let _: crate::proto::etcdserverpb::LeaseGrantResponse = node.propose(Command::LeaseGrant { id, ttl_s }).await?;
    Ok(id)
}

pub struct LockService {
    pub node: Arc<Node>,
    pub lessor: Arc<Lessor>,
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let creds = Credentials::of(&req);
        let mut req = req.into_inner();
        req.lease = session_lease(&self.node, &self.lessor, req.lease).await?;
        let (prefix, key) = queue_key(&req.name, req.lease);
        check_queue(&self.node, &creds, &prefix, &key)?;
        let (my_rev, _) = enqueue(&self.node, &key, b"", req.lease).await?;
        let mut guard = Abandon { node: self.node.clone(), key: Some(key.clone()) };
        wait_turn(&self.node, &prefix, my_rev).await?;
        still_held(&self.node, &key, my_rev).await?;
        guard.key = None;
        let mut header = Some(ResponseHeader { revision: my_rev, ..Default::default() });
        self.node.fill_header(&mut header);
        Ok(Response::new(LockResponse { header, key }))
    }

    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let creds = Credentials::of(&req);
        let del = DeleteRangeRequest { key: req.into_inner().key, ..Default::default() };
        self.node.caller(&creds)?.check(&del.key, &[], Access::Write).map_err(as_recipe_error)?;
        let resp: crate::proto::etcdserverpb::DeleteRangeResponse =
            self.node.propose(Command::DeleteRange(prost::Message::encode_to_vec(&del))).await?;
        let mut header = resp.header;
        self.node.fill_header(&mut header);
        Ok(Response::new(UnlockResponse { header }))
    }
}

pub struct ElectionService {
    pub node: Arc<Node>,
    pub lessor: Arc<Lessor>,
}

fn not_leader() -> Status {
    Status::unknown("election: not leader")
}

fn missing_leader() -> Status {
    Status::unknown("\"leader\" field must be provided")
}

/// Replaces the leader's value if it still holds its candidacy.
async fn proclaim(node: &Node, leader: &LeaderKey, value: &[u8]) -> Result<TxnResponse, Status> {
    let put = PutRequest { key: leader.key.clone(), value: value.to_vec(), lease: leader.lease, ..Default::default() };
    let resp = txn(
        node,
        TxnRequest {
            compare: vec![create_rev_is(&leader.key, leader.rev)],
            success: vec![op(request_op::Request::RequestPut(put))],
            failure: vec![],
        },
    )
    .await?;
    if !resp.succeeded {
        return Err(not_leader());
    }
    Ok(resp)
}

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(&self, req: Request<CampaignRequest>) -> Result<Response<CampaignResponse>, Status> {
        let creds = Credentials::of(&req);
        let mut req = req.into_inner();
        req.lease = session_lease(&self.node, &self.lessor, req.lease).await?;
        let (prefix, key) = queue_key(&req.name, req.lease);
        check_queue(&self.node, &creds, &prefix, &key)?;
        let (rev, existing) = enqueue(&self.node, &key, &req.value, req.lease).await?;
        let leader = LeaderKey { name: req.name.clone(), key: key.clone(), rev, lease: req.lease };
        if existing.is_some_and(|kv| kv.value != req.value) {
            proclaim(&self.node, &leader, &req.value).await?;
        }
        let mut guard = Abandon { node: self.node.clone(), key: Some(key.clone()) };
        wait_turn(&self.node, &prefix, rev).await?;
        still_held(&self.node, &key, rev).await?;
        guard.key = None;
        let mut header = Some(ResponseHeader { revision: rev, ..Default::default() });
        self.node.fill_header(&mut header);
        Ok(Response::new(CampaignResponse { header, leader: Some(leader) }))
    }

    async fn proclaim(&self, req: Request<ProclaimRequest>) -> Result<Response<ProclaimResponse>, Status> {
        let creds = Credentials::of(&req);
        let req = req.into_inner();
        let leader = req.leader.ok_or_else(missing_leader)?;
        self.node.caller(&creds)?.check(&leader.key, &[], Access::Write).map_err(as_recipe_error)?;
        let mut header = proclaim(&self.node, &leader, &req.value).await?.header;
        self.node.fill_header(&mut header);
        Ok(Response::new(ProclaimResponse { header }))
    }

    async fn leader(&self, req: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        let creds = Credentials::of(&req);
        let (prefix, _) = queue_key(&req.into_inner().name, 0);
        self.node.caller(&creds)?.check(&prefix, &prefix_end(&prefix), Access::Read).map_err(as_recipe_error)?;
        let kv = first_created(&self.node, &prefix).await?.ok_or_else(|| Status::unknown("election: no leader"))?;
        let mut header = None;
        self.node.fill_header(&mut header);
        Ok(Response::new(LeaderResponse { header, kv: Some(kv) }))
    }

    type ObserveStream = ReceiverStream<Result<LeaderResponse, Status>>;

    async fn observe(&self, req: Request<LeaderRequest>) -> Result<Response<Self::ObserveStream>, Status> {
        let creds = Credentials::of(&req);
        let (prefix, _) = queue_key(&req.into_inner().name, 0);
        self.node.caller(&creds)?.check(&prefix, &prefix_end(&prefix), Access::Read).map_err(as_recipe_error)?;
        let (tx, rx) = mpsc::channel(OBSERVE_STREAM_BUFFER);
        let node = self.node.clone();
        tokio::spawn(async move {
            let mut rev_rx = node.group.revision.clone();
            let mut last: Option<(Vec<u8>, Rev)> = None;
            loop {
                rev_rx.borrow_and_update();
                match first_created(&node, &prefix).await {
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    Ok(Some(kv)) => {
                        let id = (kv.key.clone(), kv.mod_revision);
                        if last.as_ref() != Some(&id) {
                            last = Some(id);
                            let mut header = None;
                            node.fill_header(&mut header);
                            if tx.send(Ok(LeaderResponse { header, kv: Some(kv) })).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) => {}
                }
                tokio::select! {
                    changed = rev_rx.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn resign(&self, req: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        let creds = Credentials::of(&req);
        let leader = req.into_inner().leader.ok_or_else(missing_leader)?;
        self.node.caller(&creds)?.check(&leader.key, &[], Access::Write).map_err(as_recipe_error)?;
        let del = DeleteRangeRequest { key: leader.key.clone(), ..Default::default() };
        let mut header = txn(
            &self.node,
            TxnRequest {
                compare: vec![create_rev_is(&leader.key, leader.rev)],
                success: vec![op(request_op::Request::RequestDeleteRange(del))],
                failure: vec![],
            },
        )
        .await?
        .header;
        self.node.fill_header(&mut header);
        Ok(Response::new(ResignResponse { header }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_cases() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(queue_key(b"job", 0x1f), (b"job/".to_vec(), b"job/1f".to_vec()));
    }
}
