//! Multi-version key-value semantics of the etcd v3 API over the storage tables.
//!
//! Contract (identical to etcd 3.4, `mvcc/kvstore*.go` and `etcdserver/apply.go`):
//! - One cluster-wide revision. A fresh store is at revision 1. Each write request
//!   that changes something (a Put, a DeleteRange that deletes, a Txn with at least
//!   one effective write) advances it by exactly one; all changes of that request
//!   share the new main revision and are ordered by a sub-revision.
//! - `create_revision`/`mod_revision`/`version` follow etcd: a (re)created key has
//!   version 1 and create = mod = the new revision; a deleted key is gone (version 0).
//! - Reads at an older revision see the history; a revision below the compaction
//!   point fails with [`MvccError::Compacted`], one above the current revision with
//!   [`MvccError::FutureRev`].
//! - Every function here is deterministic in its inputs, so replaying the Raft log on
//!   any member produces byte-identical state. The revision of a write is produced
//!   in one place, [`Writer::next_rev`].
//!
//! Layout: `LATEST` holds live keys (the hot path for reads at the current revision);
//! `HISTORY` holds every retained version keyed by (escaped key, main, sub) so a
//! historical range is one ordered scan; `REVS` maps (main, sub) to the key for
//! compaction and watch replay.

pub mod events;
pub mod keys;
pub mod lease;

use std::collections::BTreeSet;

use prost::Message;
use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata, Table, WriteTransaction};

use crate::proto::etcdserverpb::{
    compare, range_request, request_op, response_op, CompactionResponse, Compare, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, ResponseHeader, ResponseOp, TxnRequest,
    TxnResponse,
};
use crate::proto::mvccpb::KeyValue;
use crate::storage::{StorageError, HISTORY, LATEST, LEASES, LEASE_KEYS, META, REVS};
use keys::{decode_history_key, history_bound, history_key, rev_key, KeyRange};

/// A main revision.
pub type Rev = i64;

const META_REV: &str = "mvcc/rev";
const META_COMPACT: &str = "mvcc/compact";

pub(crate) const TAG_PUT: u8 = 0;
pub(crate) const TAG_TOMBSTONE: u8 = 1;

/// Failures a client request can cause. The server maps each to etcd's gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum MvccError {
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

macro_rules! storage_err {
    ($($t:ty),*) => {$(
        impl From<$t> for MvccError {
            fn from(e: $t) -> Self {
                MvccError::Storage(StorageError::from(e))
            }
        }
    )*};
}
storage_err!(redb::StorageError, redb::TableError);

type Result<T> = std::result::Result<T, MvccError>;

fn header(rev: Rev) -> Option<ResponseHeader> {
    Some(ResponseHeader { revision: rev, ..Default::default() })
}

pub(crate) fn decode_kv(b: &[u8]) -> Result<KeyValue> {
    KeyValue::decode(b).map_err(|e| MvccError::Corrupt(e.to_string()))
}

fn read_i64<T: ReadableTable<&'static str, &'static [u8]>>(meta: &T, key: &str, default: i64) -> Result<i64> {
    match meta.get(key)? {
        None => Ok(default),
        Some(v) => {
            let b: [u8; 8] = v.value().try_into().map_err(|_| MvccError::Corrupt(format!("meta {key}")))?;
            Ok(i64::from_be_bytes(b))
        }
    }
}

/// (current revision, compacted revision) as seen by `meta`.
fn revisions<T: ReadableTable<&'static str, &'static [u8]>>(meta: &T) -> Result<(Rev, Rev)> {
    Ok((read_i64(meta, META_REV, 1)?, read_i64(meta, META_COMPACT, 0)?))
}

/// The rows of one range read, before etcd's response shaping.
struct Fetched {
    kvs: Vec<KeyValue>,
    /// Number of keys in the range at the revision, independent of any limit.
    count: i64,
}

/// Reads live keys of `range` at revision `rev`. `limit` (0 = none) bounds how many
/// records are decoded; `count` is always the full number of keys.
fn fetch<L, H>(latest: &L, history: &H, range: &KeyRange, rev: Rev, current: Rev, limit: usize) -> Result<Fetched>
where
    L: ReadableTable<&'static [u8], &'static [u8]>,
    H: ReadableTable<&'static [u8], &'static [u8]>,
{
    let mut out = Fetched { kvs: Vec::new(), count: 0 };
    let want = |n: usize| limit == 0 || n < limit;
    if range.is_empty() {
        return Ok(out);
    }
    if rev >= current {
        let iter = match &range.end {
            None => {
                if let Some(v) = latest.get(range.start.as_slice())? {
                    out.count = 1;
                    if want(0) {
                        out.kvs.push(decode_kv(v.value())?);
                    }
                }
                return Ok(out);
            }
            Some(end) if end.is_empty() => latest.range::<&[u8]>(range.start.as_slice()..)?,
            Some(end) => latest.range::<&[u8]>(range.start.as_slice()..end.as_slice())?,
        };
        for row in iter {
            let (_, v) = row?;
            if want(out.kvs.len()) {
                out.kvs.push(decode_kv(v.value())?);
            }
            out.count += 1;
        }
        return Ok(out);
    }
    let lo = history_bound(&range.start);
    let hi = match &range.end {
        None => {
            let mut k = range.start.clone();
            k.push(0);
            Some(history_bound(&k))
        }
        Some(end) if end.is_empty() => None,
        Some(end) => Some(history_bound(end)),
    };
    let iter = match &hi {
        None => history.range::<&[u8]>(lo.as_slice()..)?,
        Some(hi) => history.range::<&[u8]>(lo.as_slice()..hi.as_slice())?,
    };
    // Versions of one key are adjacent and ascending; remember the newest one <= rev.
    let mut pending: Option<(Vec<u8>, Vec<u8>)> = None;
    let flush = |pending: &mut Option<(Vec<u8>, Vec<u8>)>, out: &mut Fetched| -> Result<()> {
        if let Some((_, rec)) = pending.take() {
            if rec.first() == Some(&TAG_PUT) {
                if want(out.kvs.len()) {
                    out.kvs.push(decode_kv(&rec[1..])?);
                }
                out.count += 1;
            }
        }
        Ok(())
    };
    for row in iter {
        let (k, v) = row?;
        let (user_key, main, _) = decode_history_key(k.value()).map_err(MvccError::Corrupt)?;
        if pending.as_ref().is_some_and(|(pk, _)| *pk != user_key) {
            flush(&mut pending, &mut out)?;
        }
        if main <= rev {
            pending = Some((user_key, v.value().to_vec()));
        }
    }
    flush(&mut pending, &mut out)?;
    Ok(out)
}

/// Checks a requested read revision against the store's (current, compacted) pair.
fn check_rev(rev: Rev, current: Rev, compacted: Rev) -> Result<Rev> {
    if rev <= 0 {
        return Ok(current);
    }
    if rev > current {
        return Err(MvccError::FutureRev);
    }
    if rev < compacted {
        return Err(MvccError::Compacted);
    }
    Ok(rev)
}

/// etcd's Range: fetch, filter by revisions, sort, limit, strip values.
fn range_impl<L, H>(latest: &L, history: &H, req: &RangeRequest, current: Rev, compacted: Rev) -> Result<RangeResponse>
where
    L: ReadableTable<&'static [u8], &'static [u8]>,
    H: ReadableTable<&'static [u8], &'static [u8]>,
{
    let rev = check_rev(req.revision, current, compacted)?;
    let sort_order = range_request::SortOrder::try_from(req.sort_order).unwrap_or(range_request::SortOrder::None);
    let sort_target = range_request::SortTarget::try_from(req.sort_target).unwrap_or(range_request::SortTarget::Key);
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    let fetch_limit = if req.count_only {
        1
    } else if sort_order != range_request::SortOrder::None || filtered || req.limit <= 0 {
        0
    } else {
        (req.limit as usize).saturating_add(1)
    };
    let range = KeyRange::new(&req.key, &req.range_end);
    let Fetched { mut kvs, count } = fetch(latest, history, &range, rev, current, fetch_limit)?;
    if req.count_only {
        kvs.clear();
    }
    if req.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= req.max_mod_revision);
    }
    if req.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= req.min_mod_revision);
    }
    if req.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= req.max_create_revision);
    }
    if req.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= req.min_create_revision);
    }
    let mut order = sort_order;
    if sort_target != range_request::SortTarget::Key && order == range_request::SortOrder::None {
        order = range_request::SortOrder::Ascend;
    }
    if order != range_request::SortOrder::None {
        use range_request::SortTarget as T;
        let cmp = |a: &KeyValue, b: &KeyValue| match sort_target {
            T::Key => a.key.cmp(&b.key),
            T::Version => a.version.cmp(&b.version),
            T::Create => a.create_revision.cmp(&b.create_revision),
            T::Mod => a.mod_revision.cmp(&b.mod_revision),
            T::Value => a.value.cmp(&b.value),
        };
        if order == range_request::SortOrder::Descend {
            kvs.sort_by(|a, b| cmp(b, a));
        } else {
            kvs.sort_by(cmp);
        }
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse { header: header(current), kvs, more, count })
}

/// A consistent read-only view: one redb read transaction.
pub struct ReadView {
    latest: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    history: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    revs: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    leases: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    lease_keys: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    current: Rev,
    compacted: Rev,
}

impl ReadView {
    pub fn new(txn: &ReadTransaction) -> Result<Self> {
        let meta = txn.open_table(META)?;
        let (current, compacted) = revisions(&meta)?;
        Ok(ReadView {
            latest: txn.open_table(LATEST)?,
            history: txn.open_table(HISTORY)?,
            revs: txn.open_table(REVS)?,
            leases: txn.open_table(LEASES)?,
            lease_keys: txn.open_table(LEASE_KEYS)?,
            current,
            compacted,
        })
    }

    pub fn current_rev(&self) -> Rev {
        self.current
    }

    /// Live keys (etcd's `etcd_debugging_mvcc_keys_total`).
    pub fn key_count(&self) -> Result<u64> {
        Ok(self.latest.len()?)
    }

    /// Granted, unexpired leases.
    pub fn lease_count(&self) -> Result<u64> {
        Ok(self.leases.len()?)
    }

    pub fn compacted_rev(&self) -> Rev {
        self.compacted
    }

    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        range_impl(&self.latest, &self.history, req, self.current, self.compacted)
    }

    /// A checksum of the key-value history up to `rev` (0: current), equal on every
    /// member that applied the same log (etcd's HashKV). Returns (hash, compacted).
    /// etcd's HashKV, bit for bit: CRC-32C over the bucket name `key` and then, in
    /// revision order up to `rev`, each stored revision's etcd key (8-byte main,
    /// `_`, 8-byte sub, plus `t` for a tombstone) and etcd value (the encoded
    /// `KeyValue`; a tombstone's holds only the key). Compaction has already removed
    /// most of what etcd skips; in addition etcd 3.4 leaves out a version kept by
    /// compaction whose key was deleted later (measured against etcd 3.4.23: its
    /// hash skips it, though reads at that revision still see it). With that rule
    /// the same history hashes the same on both servers.
    pub fn hash_kv(&self, rev: Rev) -> Result<(u32, Rev)> {
        let rev = check_rev(rev, self.current, self.compacted)?;
        let mut crc = crc32c::crc32c(b"key");
        for row in self.revs.iter()? {
            let (k, user_key) = row?;
            let k = k.value();
            let (main, sub) = match (k.get(..8), k.get(8..16)) {
                (Some(m), Some(s)) => (
                    i64::from_be_bytes(m.try_into().expect("8 bytes")),
                    i64::from_be_bytes(s.try_into().expect("8 bytes")),
                ),
                _ => return Err(MvccError::Corrupt("malformed revision key".into())),
            };
            if main > rev {
                break;
            }
            let stored = self
                .history
                .get(history_key(user_key.value(), main, sub).as_slice())?
                .ok_or_else(|| MvccError::Corrupt(format!("revision {main}.{sub} has no history row")))?;
            let stored = stored.value();
            let tombstone = stored.first() == Some(&TAG_TOMBSTONE);
            if main <= self.compacted && !tombstone && self.deleted_after(user_key.value(), main, sub)? {
                continue;
            }
            let mut etcd_key = Vec::with_capacity(18);
            etcd_key.extend_from_slice(&main.to_be_bytes());
            etcd_key.push(b'_');
            etcd_key.extend_from_slice(&sub.to_be_bytes());
            let value = if tombstone {
                etcd_key.push(b't');
                KeyValue { key: user_key.value().to_vec(), ..Default::default() }.encode_to_vec()
            } else {
                stored[1..].to_vec()
            };
            crc = crc32c::crc32c_append(crc, &etcd_key);
            crc = crc32c::crc32c_append(crc, &value);
        }
        Ok((crc, self.compacted))
    }

    /// Whether `key` has a deletion after revision `main.sub`.
    fn deleted_after(&self, key: &[u8], main: Rev, sub: i64) -> Result<bool> {
        let lo = history_key(key, main, sub + 1);
        let mut next = key.to_vec();
        next.push(0);
        let hi = history_bound(&next);
        for row in self.history.range::<&[u8]>(lo.as_slice()..hi.as_slice())? {
            if row?.1.value().first() == Some(&TAG_TOMBSTONE) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A Txn without writes, served from this view (etcd serves these without Raft).
    pub fn txn_readonly(&self, req: &TxnRequest) -> Result<TxnResponse> {
        assert!(txn_is_readonly(req), "txn_readonly called with a write txn");
        let mut exec = ReadOnlyExec(self);
        run_txn(&mut exec, req)
    }
}

/// True when no branch of the txn (at any depth) writes.
pub fn txn_is_readonly(req: &TxnRequest) -> bool {
    req.success.iter().chain(req.failure.iter()).all(|op| match &op.request {
        Some(request_op::Request::RequestPut(_)) | Some(request_op::Request::RequestDeleteRange(_)) => false,
        Some(request_op::Request::RequestTxn(t)) => txn_is_readonly(t),
        _ => true,
    })
}

/// The operations a Txn executes, implemented by the writer and by a read view.
trait TxnExec {
    fn range(&self, req: &RangeRequest) -> Result<RangeResponse>;
    /// The revision reads in this txn observe (begin revision, +1 once it wrote).
    fn rev(&self) -> Rev;
    fn compacted(&self) -> Rev;
    fn key_exists(&self, key: &[u8]) -> Result<bool>;
    fn lease_exists(&self, id: i64) -> Result<bool>;
    fn put(&mut self, req: &PutRequest) -> Result<PutResponse>;
    fn delete_range(&mut self, req: &DeleteRangeRequest) -> Result<DeleteRangeResponse>;
}

struct ReadOnlyExec<'a>(&'a ReadView);

impl TxnExec for ReadOnlyExec<'_> {
    fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        self.0.range(req)
    }
    fn rev(&self) -> Rev {
        self.0.current
    }
    fn compacted(&self) -> Rev {
        self.0.compacted
    }
    fn key_exists(&self, key: &[u8]) -> Result<bool> {
        Ok(self.0.latest.get(key)?.is_some())
    }
    fn lease_exists(&self, id: i64) -> Result<bool> {
        Ok(self.0.leases.get(id.to_be_bytes().as_slice())?.is_some())
    }
    fn put(&mut self, _: &PutRequest) -> Result<PutResponse> {
        unreachable!("read-only txn contains no put (checked by txn_is_readonly)")
    }
    fn delete_range(&mut self, _: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        unreachable!("read-only txn contains no delete (checked by txn_is_readonly)")
    }
}

/// Applies write requests inside one redb write transaction. A `Writer` applies a
/// sequence of etcd write requests (an apply batch: the tables are opened once);
/// each request advances the revision at most once, in [`Writer::end_request`].
pub struct Writer<'txn> {
    meta: Table<'txn, &'static str, &'static [u8]>,
    latest: Table<'txn, &'static [u8], &'static [u8]>,
    history: Table<'txn, &'static [u8], &'static [u8]>,
    revs: Table<'txn, &'static [u8], &'static [u8]>,
    leases: Table<'txn, &'static [u8], &'static [u8]>,
    lease_keys: Table<'txn, &'static [u8], &'static [u8]>,
    begin_rev: Rev,
    compacted: Rev,
    /// Changes made so far by the current request; also the next sub-revision.
    sub: i64,
    /// Whether an ended request advanced the revision (written once, in `finish`).
    advanced: bool,
}

impl<'txn> Writer<'txn> {
    pub fn new(txn: &'txn WriteTransaction) -> Result<Self> {
        let meta = txn.open_table(META)?;
        let (begin_rev, compacted) = revisions(&meta)?;
        Ok(Writer {
            meta,
            latest: txn.open_table(LATEST)?,
            history: txn.open_table(HISTORY)?,
            revs: txn.open_table(REVS)?,
            leases: txn.open_table(LEASES)?,
            lease_keys: txn.open_table(LEASE_KEYS)?,
            begin_rev,
            compacted,
            sub: 0,
            advanced: false,
        })
    }

    /// The revision of every change made by this request: the one place a write's
    /// revision is decided.
    fn next_rev(&self) -> Rev {
        self.begin_rev + 1
    }

    fn record_change(&mut self, key: &[u8], tag: u8, kv: &KeyValue) -> Result<()> {
        let rev = self.next_rev();
        let mut rec = Vec::with_capacity(1 + kv.encoded_len());
        rec.push(tag);
        kv.encode(&mut rec).expect("encoding into a Vec cannot fail");
        self.history.insert(history_key(key, rev, self.sub).as_slice(), rec.as_slice())?;
        self.revs.insert(rev_key(rev, self.sub).as_slice(), key)?;
        self.sub += 1;
        Ok(())
    }

    fn get_latest(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        match self.latest.get(key)? {
            Some(v) => Ok(Some(decode_kv(v.value())?)),
            None => Ok(None),
        }
    }

    fn put_unchecked(&mut self, req: &PutRequest) -> Result<PutResponse> {
        let prev = self.get_latest(&req.key)?;
        if (req.ignore_value || req.ignore_lease) && prev.is_none() {
            return Err(MvccError::KeyNotFound);
        }
        let rev = self.next_rev();
        let (create_revision, version) = match &prev {
            Some(p) => (p.create_revision, p.version + 1),
            None => (rev, 1),
        };
        let value = match (&prev, req.ignore_value) {
            (Some(p), true) => p.value.clone(),
            _ => req.value.clone(),
        };
        let lease = match (&prev, req.ignore_lease) {
            (Some(p), true) => p.lease,
            _ => req.lease,
        };
        let kv = KeyValue { key: req.key.clone(), create_revision, mod_revision: rev, version, value, lease };
        let old_lease = prev.as_ref().map(|p| p.lease).unwrap_or(0);
        if old_lease != lease {
            self.detach(old_lease, &req.key)?;
            if lease != 0 {
                self.lease_keys.insert(lease::lease_key(lease, &req.key).as_slice(), [].as_slice())?;
            }
        }
        self.latest.insert(req.key.as_slice(), kv.encode_to_vec().as_slice())?;
        self.record_change(&req.key, TAG_PUT, &kv)?;
        Ok(PutResponse { header: header(rev), prev_kv: if req.prev_kv { prev } else { None } })
    }

    fn detach(&mut self, lease: i64, key: &[u8]) -> Result<()> {
        if lease != 0 {
            self.lease_keys.remove(lease::lease_key(lease, key).as_slice())?;
        }
        Ok(())
    }

    /// A top-level Put: an attached lease must exist (checked before the key).
    pub fn put(&mut self, req: &PutRequest) -> Result<PutResponse> {
        if req.lease != 0 && !self.lease_exists(req.lease)? {
            return Err(MvccError::LeaseNotFound);
        }
        TxnExec::put(self, req)
    }

    pub fn delete_range(&mut self, req: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        TxnExec::delete_range(self, req)
    }

    pub fn txn(&mut self, req: &TxnRequest) -> Result<TxnResponse> {
        run_txn(self, req)
    }

    /// Compacts history below `rev`: for each key, the newest version at or below
    /// `rev` is kept unless it is a deletion; everything older is removed.
    pub fn compact(&mut self, rev: Rev) -> Result<CompactionResponse> {
        if rev <= self.compacted {
            return Err(MvccError::Compacted);
        }
        if rev > self.begin_rev {
            return Err(MvccError::FutureRev);
        }
        let mut touched = BTreeSet::new();
        {
            let lo = rev_key(self.compacted + 1, 0);
            let hi = rev_key(rev + 1, 0);
            for row in self.revs.range::<&[u8]>(lo.as_slice()..hi.as_slice())? {
                let (_, k) = row?;
                touched.insert(k.value().to_vec());
            }
        }
        for key in touched {
            let mut versions = Vec::new();
            let lo = history_bound(&key);
            let mut next = key.clone();
            next.push(0);
            let hi = history_bound(&next);
            for row in self.history.range::<&[u8]>(lo.as_slice()..hi.as_slice())? {
                let (k, v) = row?;
                let (_, main, sub) = decode_history_key(k.value()).map_err(MvccError::Corrupt)?;
                if main > rev {
                    break;
                }
                versions.push((main, sub, v.value().first() == Some(&TAG_TOMBSTONE)));
            }
            let keep_last = versions.last().is_some_and(|(_, _, tomb)| !tomb);
            let n = versions.len() - usize::from(keep_last);
            for (main, sub, _) in &versions[..n] {
                self.history.remove(history_key(&key, *main, *sub).as_slice())?;
                self.revs.remove(rev_key(*main, *sub).as_slice())?;
            }
        }
        self.compacted = rev;
        self.meta.insert(META_COMPACT, rev.to_be_bytes().as_slice())?;
        Ok(CompactionResponse { header: header(self.begin_rev) })
    }

    /// The revision reads in this request observe: the begin revision, or the new
    /// one once the request changed something.
    pub fn current_rev(&self) -> Rev {
        TxnExec::rev(self)
    }

    /// Ends the current request: if it changed anything, the store is now at its
    /// revision and the next request writes at the one after.
    pub fn end_request(&mut self) {
        if self.sub > 0 {
            self.begin_rev = self.next_rev();
            self.sub = 0;
            self.advanced = true;
        }
    }

    /// Ends the last request and persists the revision reached; returns it.
    pub fn finish(mut self) -> Result<Rev> {
        self.end_request();
        if self.advanced {
            self.meta.insert(META_REV, self.begin_rev.to_be_bytes().as_slice())?;
        }
        Ok(self.begin_rev)
    }
}

impl TxnExec for Writer<'_> {
    fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        range_impl(&self.latest, &self.history, req, self.rev(), self.compacted)
    }
    fn rev(&self) -> Rev {
        if self.sub > 0 {
            self.next_rev()
        } else {
            self.begin_rev
        }
    }
    fn compacted(&self) -> Rev {
        self.compacted
    }
    fn key_exists(&self, key: &[u8]) -> Result<bool> {
        Ok(self.latest.get(key)?.is_some())
    }
    fn lease_exists(&self, id: i64) -> Result<bool> {
        Ok(self.leases.get(id.to_be_bytes().as_slice())?.is_some())
    }
    fn put(&mut self, req: &PutRequest) -> Result<PutResponse> {
        self.put_unchecked(req)
    }
    fn delete_range(&mut self, req: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        let range = KeyRange::new(&req.key, &req.range_end);
        let all = RangeRequest { key: req.key.clone(), range_end: req.range_end.clone(), ..Default::default() };
        let victims = TxnExec::range(self, &all)?.kvs;
        debug_assert!(victims.iter().all(|kv| range.contains(&kv.key)));
        let rev = self.next_rev();
        for kv in &victims {
            self.latest.remove(kv.key.as_slice())?;
            self.detach(kv.lease, &kv.key)?;
            let tomb = KeyValue { key: kv.key.clone(), mod_revision: rev, ..Default::default() };
            self.record_change(&kv.key, TAG_TOMBSTONE, &tomb)?;
        }
        let deleted = victims.len() as i64;
        Ok(DeleteRangeResponse {
            header: header(self.rev()),
            deleted,
            prev_kvs: if req.prev_kv { victims } else { Vec::new() },
        })
    }
}

fn compare_holds(c: &Compare, kv: &KeyValue) -> bool {
    use compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let ord = match T::try_from(c.target).unwrap_or(T::Version) {
        T::Value => {
            let v: &[u8] = match &c.target_union {
                Some(U::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(v)
        }
        T::Create => kv.create_revision.cmp(&match c.target_union {
            Some(U::CreateRevision(r)) => r,
            _ => 0,
        }),
        T::Mod => kv.mod_revision.cmp(&match c.target_union {
            Some(U::ModRevision(r)) => r,
            _ => 0,
        }),
        T::Version => kv.version.cmp(&match c.target_union {
            Some(U::Version(r)) => r,
            _ => 0,
        }),
        T::Lease => kv.lease.cmp(&match c.target_union {
            Some(U::Lease(r)) => r,
            _ => 0,
        }),
    };
    match R::try_from(c.result).unwrap_or(R::Equal) {
        R::Equal => ord.is_eq(),
        R::NotEqual => ord.is_ne(),
        R::Greater => ord.is_gt(),
        R::Less => ord.is_lt(),
    }
}

fn compare_passes<E: TxnExec>(exec: &E, c: &Compare) -> Result<bool> {
    let req = RangeRequest { key: c.key.clone(), range_end: c.range_end.clone(), ..Default::default() };
    let kvs = exec.range(&req)?.kvs;
    if kvs.is_empty() {
        // A value compare against a missing key always fails: proto3 cannot tell an
        // empty value from an absent one (etcd `applyCompare`).
        if c.target == compare::CompareTarget::Value as i32 {
            return Ok(false);
        }
        return Ok(compare_holds(c, &KeyValue::default()));
    }
    Ok(kvs.iter().all(|kv| compare_holds(c, kv)))
}

/// Evaluates the compares of the txn and of every nested txn on the chosen
/// branches, all against the state before any op runs (etcd `compareToPath`).
fn txn_path<E: TxnExec>(exec: &E, req: &TxnRequest, path: &mut Vec<bool>) -> Result<()> {
    let mut ok = true;
    for c in &req.compare {
        if !compare_passes(exec, c)? {
            ok = false;
            break;
        }
    }
    path.push(ok);
    let ops = if ok { &req.success } else { &req.failure };
    for op in ops {
        if let Some(request_op::Request::RequestTxn(t)) = &op.request {
            txn_path(exec, t, path)?;
        }
    }
    Ok(())
}

/// Pre-execution checks on the chosen branches (etcd `checkRequests`): puts that
/// need an existing key or lease, then range revisions. Nothing has changed yet.
fn check_ops<E: TxnExec>(exec: &E, req: &TxnRequest, path: &[bool], writes: bool) -> Result<usize> {
    let ops = if path[0] { &req.success } else { &req.failure };
    let mut used = 1;
    for op in ops {
        match &op.request {
            Some(request_op::Request::RequestPut(p)) if writes => {
                if (p.ignore_value || p.ignore_lease) && !exec.key_exists(&p.key)? {
                    return Err(MvccError::KeyNotFound);
                }
                if p.lease != 0 && !exec.lease_exists(p.lease)? {
                    return Err(MvccError::LeaseNotFound);
                }
            }
            Some(request_op::Request::RequestRange(r)) if !writes && r.revision != 0 => {
                if r.revision > exec.rev() {
                    return Err(MvccError::FutureRev);
                }
                if r.revision < exec.compacted() {
                    return Err(MvccError::Compacted);
                }
            }
            Some(request_op::Request::RequestTxn(t)) => {
                used += check_ops(exec, t, &path[used..], writes)?;
            }
            _ => {}
        }
    }
    Ok(used)
}

fn apply_ops<E: TxnExec>(exec: &mut E, req: &TxnRequest, path: &[bool]) -> Result<(TxnResponse, usize)> {
    let succeeded = path[0];
    let ops = if succeeded { &req.success } else { &req.failure };
    let mut used = 1;
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let response = match &op.request {
            Some(request_op::Request::RequestRange(r)) => response_op::Response::ResponseRange(exec.range(r)?),
            Some(request_op::Request::RequestPut(p)) => response_op::Response::ResponsePut(exec.put(p)?),
            Some(request_op::Request::RequestDeleteRange(d)) => {
                response_op::Response::ResponseDeleteRange(exec.delete_range(d)?)
            }
            Some(request_op::Request::RequestTxn(t)) => {
                let (resp, n) = apply_ops(exec, t, &path[used..])?;
                used += n;
                response_op::Response::ResponseTxn(resp)
            }
            None => continue,
        };
        responses.push(ResponseOp { response: Some(response) });
    }
    Ok((TxnResponse { header: Some(ResponseHeader::default()), succeeded, responses }, used))
}

fn run_txn<E: TxnExec>(exec: &mut E, req: &TxnRequest) -> Result<TxnResponse> {
    let mut path = Vec::new();
    txn_path(exec, req, &mut path)?;
    if !txn_is_readonly(req) {
        check_ops(exec, req, &path, true)?;
    }
    check_ops(exec, req, &path, false)?;
    let (mut resp, _) = apply_ops(exec, req, &path)?;
    resp.header = header(exec.rev());
    Ok(resp)
}

/// Reads (current revision, compacted revision) from a read transaction.
pub fn read_revisions(txn: &ReadTransaction) -> Result<(Rev, Rev)> {
    revisions(&txn.open_table(META)?)
}

#[cfg(test)]
mod tests;
