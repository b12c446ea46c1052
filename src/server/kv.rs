//! The etcd `KV` service: request validation, then consensus (writes) or a
//! barrier-protected local read (reads).
//!
//! Validation mirrors etcd 3.4's `v3rpc/key.go` and happens before anything is
//! proposed, so a rejected request changes nothing and costs no log entry.

use std::collections::HashSet;
use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::auth::{Caller, Credentials};
use super::{errors, Node};
use crate::etcd_store::auth::Access;
use crate::etcd_store::mvcc::{self, keys::KeyRange};
use crate::etcd_store::Command;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::{
    request_op, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse,
};

pub struct KvService {
    pub node: Arc<Node>,
}

pub fn check_range(r: &RangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(errors::empty_key());
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(errors::empty_key());
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(errors::value_provided());
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(errors::lease_provided());
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(errors::empty_key());
    }
    Ok(())
}

fn check_op(op: &RequestOp, max_ops: i64) -> Result<(), Status> {
    match &op.request {
        Some(request_op::Request::RequestRange(r)) => check_range(r),
        Some(request_op::Request::RequestPut(r)) => check_put(r),
        Some(request_op::Request::RequestDeleteRange(r)) => check_delete(r),
        Some(request_op::Request::RequestTxn(t)) => check_txn(t, max_ops),
        // etcd answers an empty op with "key not found".
        None => Err(errors::key_not_found()),
    }
}

/// etcd `checkTxnRequest`: the widest of compares/success/failure counts against the
/// limit; nested txns get the remaining budget.
pub fn check_txn(t: &TxnRequest, max_ops: i64) -> Result<(), Status> {
    let width = t.compare.len().max(t.success.len()).max(t.failure.len()) as i64;
    if width > max_ops {
        return Err(errors::too_many_ops());
    }
    if t.compare.iter().any(|c| c.key.is_empty()) {
        return Err(errors::empty_key());
    }
    for op in t.success.iter().chain(t.failure.iter()) {
        check_op(op, max_ops - width)?;
    }
    Ok(())
}

/// etcd `checkIntervals`: within one branch (including nested txns), no key may be
/// put twice or put inside a deleted range. Returns (puts, deleted ranges).
pub fn check_intervals(ops: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<KeyRange>), Status> {
    let mut dels: Vec<KeyRange> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(request_op::Request::RequestDeleteRange(d)) => Some(KeyRange::new(&d.key, &d.range_end)),
            _ => None,
        })
        .collect();
    let deleted = |dels: &[KeyRange], k: &[u8]| dels.iter().any(|r| r.contains(k));
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in ops {
        let Some(request_op::Request::RequestTxn(t)) = &op.request else { continue };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(errors::duplicate_key());
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            // then/else are mutually exclusive: the same key in both is fine.
            if (puts.contains(k) && !puts_then.contains(k)) || deleted(&dels, k) {
                return Err(errors::duplicate_key());
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(request_op::Request::RequestPut(p)) = &op.request else { continue };
        if puts.contains(&p.key) || deleted(&dels, &p.key) {
            return Err(errors::duplicate_key());
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

/// etcd's `checkPutAuth`: write on the key, and read too when the old value is returned.
fn auth_put(c: &Caller, r: &PutRequest) -> Result<(), Status> {
    c.check(&r.key, &[], Access::Write)?;
    if r.prev_kv {
        c.check(&r.key, &[], Access::Read)?;
    }
    Ok(())
}

fn auth_delete(c: &Caller, r: &DeleteRangeRequest) -> Result<(), Status> {
    c.check(&r.key, &r.range_end, Access::Write)?;
    if r.prev_kv {
        c.check(&r.key, &r.range_end, Access::Read)?;
    }
    Ok(())
}

/// etcd's `checkTxnAuth`: read on every compared key, and every op of both
/// branches (recursively), whichever branch runs.
pub fn auth_txn(c: &Caller, t: &TxnRequest) -> Result<(), Status> {
    for cmp in &t.compare {
        c.check(&cmp.key, &cmp.range_end, Access::Read)?;
    }
    for op in t.success.iter().chain(t.failure.iter()) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => c.check(&r.key, &r.range_end, Access::Read)?,
            Some(request_op::Request::RequestPut(r)) => auth_put(c, r)?,
            Some(request_op::Request::RequestDeleteRange(r)) => auth_delete(c, r)?,
            Some(request_op::Request::RequestTxn(t)) => auth_txn(c, t)?,
            None => {}
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let creds = Credentials::of(&req);
        let req = req.into_inner();
        check_range(&req)?;
        let view = self.node.read_view(req.serializable).await?;
        // After the read barrier: checked against an auth store at least as new.
        self.node.caller(&creds)?.check(&req.key, &req.range_end, Access::Read)?;
        let mut resp = view.range(&req).map_err(errors::from_mvcc)?;
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let creds = Credentials::of(&req);
        let req = req.into_inner();
        check_put(&req)?;
        let cmd = Command::Put(req.encode_to_vec());
        let mut resp: PutResponse = self.node.propose_as(&creds, |c| auth_put(c, &req), cmd).await?;
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let creds = Credentials::of(&req);
        let req = req.into_inner();
        check_delete(&req)?;
        let cmd = Command::DeleteRange(req.encode_to_vec());
        let mut resp: DeleteRangeResponse = self.node.propose_as(&creds, |c| auth_delete(c, &req), cmd).await?;
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let creds = Credentials::of(&req);
        let req = req.into_inner();
        check_txn(&req, self.node.config.max_txn_ops as i64)?;
        check_intervals(&req.success)?;
        check_intervals(&req.failure)?;
        let mut resp = if mvcc::txn_is_readonly(&req) {
            // etcd serves read-only txns without a log entry; serializable only if
            // every range in it asks for it.
            let view = self.node.read_view(txn_is_serializable(&req)).await?;
            auth_txn(&self.node.caller(&creds)?, &req)?;
            view.txn_readonly(&req).map_err(errors::from_mvcc)?
        } else {
            let cmd = Command::Txn(req.encode_to_vec());
            self.node.propose_as::<TxnResponse>(&creds, |c| auth_txn(c, &req), cmd).await?
        };
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let req = req.into_inner();
        let mut resp: CompactionResponse = self.node.propose(Command::Compact(req.encode_to_vec())).await?;
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }
}

/// etcd `isTxnSerializable`: every range op (at any depth) is serializable.
fn txn_is_serializable(t: &TxnRequest) -> bool {
    t.success.iter().chain(t.failure.iter()).all(|op| match &op.request {
        Some(request_op::Request::RequestRange(r)) => r.serializable,
        Some(request_op::Request::RequestTxn(t)) => txn_is_serializable(t),
        _ => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::Compare;

    fn put(k: &str) -> RequestOp {
        RequestOp { request: Some(request_op::Request::RequestPut(PutRequest { key: k.into(), ..Default::default() })) }
    }
    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }
    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp { request: Some(request_op::Request::RequestTxn(TxnRequest { compare: vec![], success, failure })) }
    }

    #[test]
    fn interval_cases() {
        let cases: Vec<(&str, Vec<RequestOp>, bool)> = vec![
            ("distinct puts", vec![put("a"), put("b")], true),
            ("same key twice", vec![put("a"), put("a")], false),
            ("put inside delete", vec![del("a", "c"), put("b")], false),
            ("put outside delete", vec![del("a", "c"), put("c")], true),
            ("deletes may overlap", vec![del("a", "c"), del("b", "d")], true),
            ("nested then/else same key", vec![txn(vec![put("x")], vec![put("x")])], true),
            ("nested and outer same key", vec![txn(vec![put("x")], vec![]), put("x")], false),
            ("nested delete covers outer put", vec![txn(vec![del("a", "z")], vec![]), put("m")], false),
        ];
        for (name, ops, ok) in cases {
            assert_eq!(check_intervals(&ops).is_ok(), ok, "{name}");
        }
    }

    #[test]
    fn txn_limits() {
        let many: Vec<RequestOp> = (0..129).map(|i| put(&format!("k{i}"))).collect();
        let t = TxnRequest { compare: vec![], success: many, failure: vec![] };
        assert_eq!(check_txn(&t, 128).unwrap_err().message(), "etcdserver: too many operations in txn request");
        let t = TxnRequest { compare: vec![Compare::default()], success: vec![], failure: vec![] };
        assert_eq!(check_txn(&t, 128).unwrap_err().message(), "etcdserver: key is not provided");
        let t = TxnRequest { compare: vec![], success: vec![RequestOp { request: None }], failure: vec![] };
        assert_eq!(check_txn(&t, 128).unwrap_err().message(), "etcdserver: key not found");
    }
}
