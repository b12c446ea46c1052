//! etcd 3.4's snapshot format, both ways: the file `Maintenance.Snapshot` streams
//! (and `etcdctl snapshot save` writes) is a bbolt database of etcd's buckets
//! followed by the sha256 of the database bytes.
//!
//! Buckets (etcd 3.4.23: `mvcc/kvstore.go`, `lease/lessor.go`, `auth/store.go`,
//! `etcdserver/api/membership/store.go`, `etcdserver/api/v3alarm`):
//! - `key`: `main (8 BE) ‖ '_' ‖ sub (8 BE)` (+ `t` for a deletion) -> `mvccpb.KeyValue`
//!   (a deletion's holds only the key). concord's history rows are the same
//!   revisions; the `prev` pointer concord keeps per row is recomputed on import.
//! - `meta`: `consistent_index` (8 BE; concord writes its applied log index),
//!   `scheduledCompactRev` / `finishedCompactRev` (revision bytes) once compacted.
//! - `lease`: id (8 BE) -> `leasepb.Lease{ID, TTL, RemainingTTL}`. Attached keys are
//!   not stored: they are the keys whose `KeyValue.lease` names the lease.
//! - `auth` (`enabled` = 1 byte, `authRevision` 8 BE), `authUsers`, `authRoles`
//!   (name -> `authpb.User` / `authpb.Role`). etcd's auth revision starts at 1 where
//!   concord's starts at 0: the export adds 1 and the import takes it back.
//! - `members` (hex id -> etcd's member JSON), `members_removed`, `cluster`
//!   (`clusterVersion` = "3.4.0"), `alarm` (`AlarmMember` -> empty).
//!
//! What an import keeps: keys with their full retained history and revisions, the
//! compaction point (a compaction etcd had scheduled but not finished is finished),
//! leases (remaining TTL when etcd recorded one) with their keys, users, roles and
//! the auth flag. Members and alarms are not imported: a restore
//! makes a new cluster.

pub mod bbolt;

use std::collections::HashMap;

use prost::Message;
use redb::{ReadTransaction, ReadableTable};
use sha2::Digest;

use crate::etcd_store::auth::{AuthState, META_ENABLED, META_REVISION, ROLE_PREFIX, USER_PREFIX};
use crate::etcd_store::mvcc::keys::decode_rev_key;
use crate::etcd_store::mvcc::lease::{lease_key, LeaseRecord};
use crate::etcd_store::mvcc::records::{decode_change, encode_change, RevPtr};
use crate::etcd_store::mvcc::{META_COMPACT, META_REV};
use crate::proto::authpb::{Role, User};
use crate::proto::etcdserverpb::AlarmMember;
use crate::proto::mvccpb::KeyValue;
use crate::storage::{Rows, StorageError, HISTORY, LEASES, META};
use bbolt::Bucket;

/// Bytes of the sha256 trailer etcd appends to the database.
pub const TRAILER_BYTES: usize = 32;
/// The cluster version etcd 3.4 records.
const CLUSTER_VERSION: &str = "3.4.0";

/// etcd's `leasepb.Lease`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeasePb {
    #[prost(int64, tag = "1")]
    pub id: i64,
    #[prost(int64, tag = "2")]
    pub ttl: i64,
    #[prost(int64, tag = "3")]
    pub remaining_ttl: i64,
}

/// Why an etcd snapshot cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(transparent)]
    Bolt(#[from] bbolt::BoltError),
    #[error("etcd snapshot is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn corrupt<T>(msg: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError::Corrupt(msg.into()))
}

/// Whether `file` is a bbolt database (an etcd snapshot) rather than concord's own format.
pub fn is_etcd_snapshot(file: &[u8]) -> bool {
    bbolt::is_bbolt(file)
}

/// etcd's revision key: `main ‖ '_' ‖ sub`, plus `t` for a deletion.
pub fn rev_bytes(main: i64, sub: i64, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&main.to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&sub.to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

/// Inverse of [`rev_bytes`]: (main, sub, tombstone).
pub fn parse_rev_bytes(b: &[u8]) -> Option<(i64, i64, bool)> {
    let tombstone = match b.len() {
        17 => false,
        18 if b[17] == b't' => true,
        _ => return None,
    };
    if b[8] != b'_' {
        return None;
    }
    let main = i64::from_be_bytes(b[..8].try_into().ok()?);
    let sub = i64::from_be_bytes(b[9..17].try_into().ok()?);
    Some((main, sub, tombstone))
}

/// etcd's member JSON (`membership.Member`).
#[derive(serde::Serialize)]
struct MemberJson<'a> {
    id: u64,
    #[serde(rename = "peerURLs")]
    peer_urls: &'a [String],
    #[serde(rename = "isLearner", skip_serializing_if = "std::ops::Not::not")]
    is_learner: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(rename = "clientURLs", skip_serializing_if = "<[String]>::is_empty")]
    client_urls: &'a [String],
}

fn bucket(name: &str, mut rows: Rows) -> Bucket {
    rows.sort();
    Bucket { name: name.as_bytes().to_vec(), rows }
}

fn engine(e: impl std::fmt::Display) -> StorageError {
    StorageError::Engine(e.to_string())
}

/// The state in `txn` as etcd 3.4's backend database (bbolt bytes, no trailer).
pub fn export(txn: &ReadTransaction) -> Result<Vec<u8>, StorageError> {
    let meta = txn.open_table(META)?;
    let get_i64 = |k: &str| -> Result<i64, StorageError> {
        Ok(match meta.get(k)? {
            Some(v) => i64::from_be_bytes(v.value().try_into().map_err(|_| engine(format!("meta {k}")))?),
            None => 0,
        })
    };
    let compacted = get_i64(META_COMPACT)?;

    let mut keys = Rows::new();
    for row in txn.open_table(HISTORY)?.iter()? {
        let (k, v) = row?;
        let (main, sub) = decode_rev_key(k.value()).map_err(engine)?;
        let change = decode_change(v.value()).map_err(engine)?;
        let value = if change.put {
            change.kv.encode_to_vec()
        } else {
            KeyValue { key: change.kv.key, ..Default::default() }.encode_to_vec()
        };
        keys.push((rev_bytes(main, sub, !change.put), value));
    }

    let applied = crate::etcd_store::state_machine::applied_index(txn).map_err(engine)?.unwrap_or(0);
    let mut meta_rows = vec![(b"consistent_index".to_vec(), applied.to_be_bytes().to_vec())];
    if compacted > 0 {
        for name in ["scheduledCompactRev", "finishedCompactRev"] {
            meta_rows.push((name.as_bytes().to_vec(), rev_bytes(compacted, 0, false)));
        }
    }

    let mut leases = Rows::new();
    for row in txn.open_table(LEASES)?.iter()? {
        let (k, v) = row?;
        let id = i64::from_be_bytes(k.value().try_into().map_err(|_| engine("lease id"))?);
        let rec = LeaseRecord::decode(id, v.value()).map_err(engine)?;
        let full_ms = rec.ttl_s.saturating_mul(1000);
        // etcd records a remaining TTL only once checkpointed below the full TTL.
        let remaining_ttl = if rec.remaining_ms < full_ms { (rec.remaining_ms.max(1) + 999) / 1000 } else { 0 };
        leases.push((k.value().to_vec(), LeasePb { id, ttl: rec.ttl_s, remaining_ttl }.encode_to_vec()));
    }

    let auth = AuthState::load(&meta).map_err(engine)?;
    let mut auth_rows = vec![(b"authRevision".to_vec(), (auth.revision + 1).to_be_bytes().to_vec())];
    if auth.enabled {
        auth_rows.push((b"enabled".to_vec(), vec![1]));
    }
    let users = auth.users.iter().map(|(n, u)| (n.as_bytes().to_vec(), u.encode_to_vec())).collect();
    let roles = auth.roles.iter().map(|(n, r)| (n.as_bytes().to_vec(), r.encode_to_vec())).collect();

    let mut members = Rows::new();
    for (id, rec) in crate::etcd_store::members::records_in(&meta).map_err(engine)? {
        let json = MemberJson {
            id,
            peer_urls: &rec.peer_urls,
            is_learner: rec.learner,
            name: &rec.name,
            client_urls: &rec.client_urls,
        };
        members.push((format!("{id:x}").into_bytes(), serde_json::to_vec(&json).map_err(engine)?));
    }
    let alarms = crate::etcd_store::state_machine::alarms(txn)
        .map_err(engine)?
        .into_iter()
        .map(|(member_id, alarm)| (AlarmMember { member_id, alarm }.encode_to_vec(), Vec::new()))
        .collect();

    Ok(bbolt::write(&[
        bucket("alarm", alarms),
        bucket("auth", auth_rows),
        bucket("authRoles", roles),
        bucket("authUsers", users),
        bucket("cluster", vec![(b"clusterVersion".to_vec(), CLUSTER_VERSION.as_bytes().to_vec())]),
        bucket("key", keys),
        bucket("lease", leases),
        bucket("members", members),
        bucket("members_removed", Rows::new()),
        bucket("meta", meta_rows),
    ]))
}

/// `db ‖ sha256(db)`: the file `etcdctl snapshot save` writes.
pub fn with_trailer(db: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(db.len() + TRAILER_BYTES);
    out.extend_from_slice(db);
    out.extend_from_slice(&sha2::Sha256::digest(db));
    out
}

/// The database inside a snapshot file, after checking its sha256 trailer (etcd's
/// rule: a file whose size is 32 past a multiple of 512 carries one). A file
/// without a trailer is refused unless `require_trailer` is false.
pub fn strip_trailer(file: &[u8], require_trailer: bool) -> Result<&[u8], FormatError> {
    if file.len() % 512 != TRAILER_BYTES {
        if require_trailer {
            return corrupt("no sha256 trailer (truncated?)");
        }
        return Ok(file);
    }
    let (db, digest) = file.split_at(file.len() - TRAILER_BYTES);
    if sha2::Sha256::digest(db).as_slice() != digest {
        return corrupt("sha256 checksum mismatch");
    }
    Ok(db)
}

/// What `etcdctl snapshot status` reports, computed as it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// CRC-32C over each bucket's name and then its keys and values, in bbolt order.
    pub hash: u32,
    /// The main revision of the last row of bucket `key`.
    pub revision: i64,
    /// Rows in all buckets.
    pub total_keys: usize,
    /// Pages in use times the page size.
    pub total_size: u64,
}

pub fn status(db: &[u8]) -> Result<Status, FormatError> {
    let meta = bbolt::meta(db)?;
    let buckets = bbolt::read(db)?;
    let mut crc = 0u32;
    let mut status = Status { hash: 0, revision: 0, total_keys: 0, total_size: meta.pgid * meta.page_size as u64 };
    for b in &buckets {
        crc = crc32c::crc32c_append(crc, &b.name);
        for (k, v) in &b.rows {
            crc = crc32c::crc32c_append(crc, k);
            crc = crc32c::crc32c_append(crc, v);
            status.total_keys += 1;
        }
        if b.name == b"key" {
            if let Some((k, _)) = b.rows.last() {
                let main = k.get(..8).and_then(|m| <[u8; 8]>::try_from(m).ok()).map(i64::from_be_bytes);
                status.revision = main.ok_or_else(|| FormatError::Corrupt("short revision key".into()))?;
            }
        }
    }
    status.hash = crc;
    Ok(status)
}

/// A key's live version while the import walks the history.
struct Live {
    at: RevPtr,
    create: i64,
    version: i64,
    lease: i64,
}

/// The rows of bucket `name`, if present.
fn rows<'b>(buckets: &'b [Bucket], name: &str) -> Option<&'b Rows> {
    buckets.iter().find(|b| b.name == name.as_bytes()).map(|b| &b.rows)
}

/// Converts an etcd backend database into a concord snapshot (as
/// `storage::Backend::snapshot_bytes` makes) of the same keys, history, leases
/// and auth store. Any inconsistency is an error.
pub fn import(db: &[u8]) -> Result<Vec<u8>, FormatError> {
    let buckets = bbolt::read(db)?;
    let (Some(keys), Some(meta)) = (rows(&buckets, "key"), rows(&buckets, "meta")) else {
        return corrupt("no `key` or `meta` bucket: not an etcd backend");
    };
    let meta_value = |name: &str| meta.iter().find(|(k, _)| k == name.as_bytes()).map(|(_, v)| v.as_slice());
    let compact_rev = |name: &str| match meta_value(name) {
        None => Ok(0),
        Some(v) => match parse_rev_bytes(v) {
            Some((main, _, false)) if main >= 0 => Ok(main),
            _ => corrupt(name),
        },
    };
    // A compaction etcd scheduled but had not finished is finished here (etcd
    // finishes it at start): rows at or below it other than each key's newest
    // version there are dropped below.
    let compacted = compact_rev("finishedCompactRev")?.max(compact_rev("scheduledCompactRev")?);

    // History, with each row's `prev`: the key's live version just before it.
    let mut live: HashMap<Vec<u8>, Live> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut history = Rows::with_capacity(keys.len());
    let mut kept_by_compaction: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut dropped: Vec<usize> = Vec::new();
    let mut current = compacted.max(1);
    let mut last: Option<RevPtr> = None;
    for (k, v) in keys {
        let Some((main, sub, tombstone)) = parse_rev_bytes(k) else {
            return corrupt(format!("revision key {k:02x?}"));
        };
        if main < 1 || !(0..=i64::from(u32::MAX)).contains(&sub) || last.is_some_and(|l| l >= (main, sub)) {
            return corrupt(format!("revision {main}.{sub} out of order"));
        }
        last = Some((main, sub));
        current = current.max(main);
        let kv = KeyValue::decode(v.as_slice()).map_err(|e| FormatError::Corrupt(format!("revision {main}: {e}")))?;
        if kv.key.is_empty() {
            return corrupt(format!("revision {main}.{sub} has an empty key"));
        }
        // The row must continue the key's history as etcd writes it: a deletion of a
        // live key; a put that is the key's next version, or a new generation
        // (version 1, created now), or, for the oldest row compaction kept, any
        // version created earlier.
        let prev = live.get(&kv.key).map(|l| l.at);
        let inconsistent =
            || FormatError::Corrupt(format!("revision {main}.{sub}: inconsistent with the key's history"));
        let (put, record) = if tombstone {
            if live.remove(&kv.key).is_none() {
                return Err(inconsistent());
            }
            seen.insert(kv.key.clone());
            (false, KeyValue { key: kv.key, mod_revision: main, ..Default::default() })
        } else {
            let fits = match live.get(&kv.key) {
                Some(l) => kv.create_revision == l.create && kv.version == l.version.saturating_add(1),
                None if main > compacted || seen.contains(&kv.key) => kv.version == 1 && kv.create_revision == main,
                None => kv.version >= 1 && (1..=main).contains(&kv.create_revision),
            };
            if kv.mod_revision != main || !fits {
                return Err(inconsistent());
            }
            let entry = Live { at: (main, sub), create: kv.create_revision, version: kv.version, lease: kv.lease };
            live.insert(kv.key.clone(), entry);
            seen.insert(kv.key.clone());
            (true, kv)
        };
        if main <= compacted {
            // Only the newest version at or below the compaction point survives it.
            if let Some(i) = kept_by_compaction.insert(record.key.clone(), history.len()) {
                dropped.push(i);
            }
            if !put {
                dropped.push(history.len());
            }
        }
        history.push((crate::etcd_store::mvcc::keys::rev_key(main, sub).to_vec(), encode_change(put, prev, &record)));
    }

    if !dropped.is_empty() {
        dropped.sort_unstable();
        let mut at = 0;
        let mut i = 0;
        history.retain(|_| {
            let drop = dropped.get(at) == Some(&i);
            at += usize::from(drop);
            i += 1;
            !drop
        });
    }

    let mut leases = Rows::new();
    let mut lease_ids = std::collections::HashSet::new();
    for (k, v) in rows(&buckets, "lease").into_iter().flatten() {
        let id = <[u8; 8]>::try_from(k.as_slice()).map(i64::from_be_bytes).or_else(|_| corrupt("lease id"))?;
        let pb = LeasePb::decode(v.as_slice()).map_err(|e| FormatError::Corrupt(format!("lease {id:x}: {e}")))?;
        if pb.id != id || pb.ttl < 0 || pb.remaining_ttl < 0 {
            return corrupt(format!("lease {id:x} record"));
        }
        let remaining_s = if pb.remaining_ttl > 0 { pb.remaining_ttl } else { pb.ttl };
        let rec = LeaseRecord {
            id,
            ttl_s: pb.ttl,
            remaining_ms: remaining_s.saturating_mul(1000),
            version: 1,
            renewed: false,
        };
        leases.push((k.clone(), rec.encode().to_vec()));
        lease_ids.insert(id);
    }
    let mut lease_keys: Rows = live
        .into_iter()
        .filter(|(_, l)| l.lease != 0 && lease_ids.contains(&l.lease))
        .map(|(key, l)| (lease_key(l.lease, &key), Vec::new()))
        .collect();
    lease_keys.sort();

    let mut meta_rows: Vec<(String, Vec<u8>)> = vec![(META_REV.to_string(), current.to_be_bytes().to_vec())];
    if compacted > 0 {
        meta_rows.push((META_COMPACT.to_string(), compacted.to_be_bytes().to_vec()));
    }
    let auth = rows(&buckets, "auth");
    let auth_value = |name: &str| auth.and_then(|r| r.iter().find(|(k, _)| k == name.as_bytes())).map(|(_, v)| v);
    if auth_value("enabled").is_some_and(|v| v.as_slice() == [1]) {
        meta_rows.push((META_ENABLED.to_string(), vec![1]));
    }
    if let Some(v) = auth_value("authRevision") {
        let rev = <[u8; 8]>::try_from(v.as_slice()).map(u64::from_be_bytes).or_else(|_| corrupt("authRevision"))?;
        meta_rows.push((META_REVISION.to_string(), rev.saturating_sub(1).to_be_bytes().to_vec()));
    }
    for (bucket_name, prefix, is_user) in [("authUsers", USER_PREFIX, true), ("authRoles", ROLE_PREFIX, false)] {
        for (k, v) in rows(&buckets, bucket_name).into_iter().flatten() {
            let name = std::str::from_utf8(k).or_else(|_| corrupt(format!("{bucket_name}: name is not UTF-8")))?;
            let stored = if is_user {
                User::decode(v.as_slice()).map(|u| u.name)
            } else {
                Role::decode(v.as_slice()).map(|r| r.name)
            };
            if !stored.is_ok_and(|n| n == *k) {
                return corrupt(format!("{bucket_name}: record of {name:?} is corrupt or not its own"));
            }
            meta_rows.push((format!("{prefix}{name}"), v.clone()));
        }
    }
    Ok(crate::storage::snapshot_from_rows(&meta_rows, &history, &leases, &lease_keys))
}

#[cfg(test)]
mod tests;
