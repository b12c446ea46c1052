//! Converts state written with the earlier layout, where the history was keyed by
//! (escaped user key, main, sub) in `history`, a `revs` table indexed it by
//! revision, and a `latest` table held live keys as a bare `KeyValue` (now
//! retired: see `storage::RETIRED_LATEST`).
//!
//! Runs when a state file is opened and after a snapshot is installed, before
//! anything reads the state. One durable transaction: a crash midway leaves the
//! old layout, converted again at the next start.

use super::keys::{decode_rev_key, rev_key};
use super::records::{encode_change, RevPtr};
use super::{decode_kv, MvccError, Result};
use crate::storage::{Backend, HISTORY, LEGACY_HISTORY, LEGACY_REVS, RETIRED_LATEST};
use redb::{ReadableTable, TableHandle};

/// The earlier layout's record tag of a put (a deletion's was 1).
const LEGACY_TAG_PUT: u8 = 0;

/// Converts the state to this layout if it has the earlier one; returns whether
/// it did.
pub fn upgrade_layout(backend: &Backend) -> Result<bool> {
    let txn = backend.begin_durable()?;
    let legacy = txn.list_tables()?.any(|t| t.name() == LEGACY_HISTORY.name());
    if !legacy {
        txn.abort()?;
        return Ok(false);
    }
    {
        let old = txn.open_table(LEGACY_HISTORY)?;
        let mut history = txn.open_table(HISTORY)?;
        // The key whose rows are being read (a key's rows are adjacent, oldest
        // first), and its newest row's revision if that row was a put.
        let mut last: Option<(Vec<u8>, Option<RevPtr>)> = None;
        for row in old.iter()? {
            let (k, v) = row?;
            let (k, v) = (k.value(), v.value());
            let at =
                decode_rev_key(k.get(k.len().saturating_sub(16)..).unwrap_or_default()).map_err(MvccError::Corrupt)?;
            let Some((&tag, kv)) = v.split_first() else {
                return Err(MvccError::Corrupt("empty legacy history record".into()));
            };
            let kv = decode_kv(kv)?;
            let put = tag == LEGACY_TAG_PUT;
            // The version this row replaced: the key's previous row if it was a put.
            // The first row kept by a compaction gets none; nothing reads that far back.
            let prev = match &last {
                Some((key, live)) if *key == kv.key => *live,
                _ => None,
            };
            history.insert(rev_key(at.0, at.1).as_slice(), encode_change(put, prev, &kv).as_slice())?;
            last = Some((kv.key, put.then_some(at)));
        }
    }
    // The earlier layout's live keys: the key index is built from the history.
    txn.delete_table(RETIRED_LATEST)?;
    txn.open_table(RETIRED_LATEST)?;
    txn.delete_table(LEGACY_HISTORY)?;
    txn.delete_table(LEGACY_REVS)?;
    txn.commit()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd_store::mvcc::index::KeyIndex;
    use crate::etcd_store::mvcc::records::decode_change;
    use crate::etcd_store::mvcc::{ReadView, Rev, Writer};
    use crate::proto::etcdserverpb::{DeleteRangeRequest, PutRequest, RangeRequest};
    use prost::Message;

    type Rows = Vec<(Vec<u8>, Vec<u8>)>;

    fn rows(b: &Backend, t: redb::TableDefinition<&[u8], &[u8]>) -> Rows {
        let txn = b.begin_read().unwrap();
        let table = txn.open_table(t).unwrap();
        table.iter().unwrap().map(|r| r.unwrap()).map(|(k, v)| (k.value().to_vec(), v.value().to_vec())).collect()
    }

    /// The earlier layout's history key: the user key with 00 escaped as 00 FF,
    /// ended by 00 01, then main and sub big-endian.
    fn legacy_key(key: &[u8], main: Rev, sub: i64) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in key {
            out.push(b);
            if b == 0 {
                out.push(0xFF);
            }
        }
        out.extend_from_slice(&[0, 1]);
        out.extend_from_slice(&rev_key(main, sub));
        out
    }

    #[test]
    fn a_legacy_store_converts_to_the_same_tables_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let native = Backend::open(&dir.path().join("native.db")).unwrap();
        let write = |b: &Backend, f: &dyn Fn(&mut Writer)| {
            let index = KeyIndex::open(&b.begin_read().unwrap()).unwrap();
            let txn = b.begin_apply().unwrap();
            let mut w = Writer::new(&txn, &index).unwrap();
            f(&mut w);
            w.finish().unwrap();
            txn.commit().unwrap();
        };
        let view = |b: &Backend| {
            let txn = b.begin_read().unwrap();
            let index = std::sync::Arc::new(KeyIndex::open(&txn).unwrap());
            ReadView::new(&txn, &index).unwrap()
        };
        let put = |k: &[u8], v: &str| PutRequest { key: k.to_vec(), value: v.into(), ..Default::default() };
        let del = |k: &[u8]| DeleteRangeRequest { key: k.to_vec(), ..Default::default() };
        for (i, k) in [b"a".as_slice(), b"a\0", b"b", b"a", b"b", b"a\0"].iter().enumerate() {
            write(&native, &|w| drop(w.put(&put(k, &format!("v{i}"))).unwrap()));
        }
        write(&native, &|w| drop(w.delete_range(&del(b"b")).unwrap()));
        write(&native, &|w| drop(w.put(&put(b"b", "again")).unwrap()));
        write(&native, &|w| drop(w.delete_range(&del(b"a")).unwrap()));

        // The same state in the earlier layout, derived from the native tables.
        let legacy = Backend::open(&dir.path().join("legacy.db")).unwrap();
        {
            let txn = legacy.begin_durable().unwrap();
            {
                let mut meta = txn.open_table(crate::storage::META).unwrap();
                let n = native.begin_read().unwrap();
                for row in n.open_table(crate::storage::META).unwrap().iter().unwrap() {
                    let (k, v) = row.unwrap();
                    meta.insert(k.value(), v.value()).unwrap();
                }
                let mut history = txn.open_table(LEGACY_HISTORY).unwrap();
                let mut revs = txn.open_table(LEGACY_REVS).unwrap();
                for (k, v) in rows(&native, HISTORY) {
                    let (main, sub) = decode_rev_key(&k).unwrap();
                    let change = decode_change(&v).unwrap();
                    let mut rec = vec![if change.put { LEGACY_TAG_PUT } else { 1 }];
                    change.kv.encode(&mut rec).unwrap();
                    history.insert(legacy_key(&change.kv.key, main, sub).as_slice(), rec.as_slice()).unwrap();
                    revs.insert(k.as_slice(), change.kv.key.as_slice()).unwrap();
                }
                let mut latest = txn.open_table(RETIRED_LATEST).unwrap();
                let all = RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
                for kv in view(&native).range(&all).unwrap().kvs {
                    latest.insert(kv.key.as_slice(), kv.encode_to_vec().as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        // A snapshot of the earlier layout installs and converts the same way.
        let snap = Backend::legacy_snapshot_bytes(&legacy.begin_read().unwrap()).unwrap();
        let restored = Backend::open(&dir.path().join("restored.db")).unwrap();
        restored.install_snapshot(&snap).unwrap();
        assert!(upgrade_layout(&restored).unwrap(), "an installed legacy snapshot is converted");
        assert_eq!(rows(&restored, HISTORY), rows(&native, HISTORY));
        assert_eq!(rows(&restored, RETIRED_LATEST), Rows::new());

        assert!(upgrade_layout(&legacy).unwrap(), "the legacy tables are found");
        assert!(!upgrade_layout(&legacy).unwrap(), "and converted only once");
        assert_eq!(rows(&legacy, HISTORY), rows(&native, HISTORY));
        assert_eq!(rows(&legacy, RETIRED_LATEST), Rows::new(), "the earlier live-key rows are dropped");
        let txn = legacy.begin_read().unwrap();
        assert!(!txn.list_tables().unwrap().any(|t| t.name() == LEGACY_REVS.name()), "legacy tables are dropped");

        // After compacting both the same way, every readable revision reads the same.
        for b in [&native, &legacy] {
            write(b, &|w| {
                w.compact(5).unwrap();
            });
        }
        for rev in 5..=view(&native).current_rev() {
            let req = RangeRequest { key: vec![0], range_end: vec![0], revision: rev, ..Default::default() };
            assert_eq!(view(&legacy).range(&req).unwrap(), view(&native).range(&req).unwrap(), "rev {rev}");
        }
        assert_eq!(view(&legacy).hash_kv(0).unwrap(), view(&native).hash_kv(0).unwrap());
    }
}
