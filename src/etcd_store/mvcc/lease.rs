//! Replicated lease state: which leases exist, their granted TTL, the remaining TTL
//! as last checkpointed, and which keys are attached.
//!
//! Contract:
//! - Everything here is applied through the Raft log, so every member holds the same
//!   leases. Expiry *timing* is not decided here (see `crate::etcd_store::lease`); an expired lease
//!   is removed by a replicated revoke like any other.
//! - `remaining_ms` is persisted at grant, renew and checkpoint. It is what a member
//!   that restarts (or a new leader that never observed a renew) counts down from, so
//!   a lease's remaining TTL survives leader changes and restarts instead of resetting
//!   to the full TTL as in etcd.
//! - `version` changes whenever `remaining_ms` is re-based, so observers can tell a
//!   fresh base from one they already counted down.
//! - `renewed` says the base is a keep-alive (not a grant or a checkpoint): the
//!   leader may have renewed such a lease again in memory since, so a new leader
//!   gives it a grace period (see `crate::etcd_store::lease`).
//! - Revoking deletes every attached key in ONE revision (as etcd does).

use redb::ReadableTable;

use super::{DeleteRangeRequest, MvccError, ReadView, Result, TxnExec, Writer};

/// A lease as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRecord {
    pub id: i64,
    pub ttl_s: i64,
    pub remaining_ms: i64,
    pub version: u64,
    /// The base is a keep-alive's (see the module doc).
    pub renewed: bool,
}

impl LeaseRecord {
    /// ttl_s ‖ remaining_ms ‖ version (8 bytes each, big-endian) ‖ flags (bit 0:
    /// `renewed`). Records written before the flags byte existed are 24 bytes long
    /// and read as not renewed.
    pub fn encode(&self) -> [u8; 25] {
        let mut b = [0u8; 25];
        b[..8].copy_from_slice(&self.ttl_s.to_be_bytes());
        b[8..16].copy_from_slice(&self.remaining_ms.to_be_bytes());
        b[16..24].copy_from_slice(&self.version.to_be_bytes());
        b[24] = u8::from(self.renewed);
        b
    }

    pub fn decode(id: i64, b: &[u8]) -> Result<Self> {
        let renewed = match b.len() {
            24 => false,
            25 if b[24] <= 1 => b[24] == 1,
            _ => return Err(MvccError::Corrupt(format!("lease {id:x} record has {} bytes", b.len()))),
        };
        let i = |r: std::ops::Range<usize>| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[r]);
            a
        };
        Ok(LeaseRecord {
            id,
            ttl_s: i64::from_be_bytes(i(0..8)),
            remaining_ms: i64::from_be_bytes(i(8..16)),
            version: u64::from_be_bytes(i(16..24)),
            renewed,
        })
    }
}

/// `LEASE_KEYS` key: lease id ‖ user key.
pub fn lease_key(lease: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&lease.to_be_bytes());
    k.extend_from_slice(key);
    k
}

fn get_record<T: ReadableTable<&'static [u8], &'static [u8]>>(t: &T, id: i64) -> Result<Option<LeaseRecord>> {
    match t.get(id.to_be_bytes().as_slice())? {
        None => Ok(None),
        Some(v) => Ok(Some(LeaseRecord::decode(id, v.value())?)),
    }
}

fn attached<T: ReadableTable<&'static [u8], &'static [u8]>>(t: &T, id: i64) -> Result<Vec<Vec<u8>>> {
    let lo = id.to_be_bytes();
    let mut out = Vec::new();
    for row in t.range::<&[u8]>(lo.as_slice()..)? {
        let (k, _) = row?;
        let k = k.value();
        if k.len() < 8 || k[..8] != lo {
            break;
        }
        out.push(k[8..].to_vec());
    }
    Ok(out)
}

impl Writer<'_> {
    /// Grants lease `id` with record version `first_version` (at least 1): the
    /// caller keeps versions increasing across a revoke and a re-grant of one id,
    /// so that observers never take a new lease for one they already counted.
    pub fn lease_grant(&mut self, id: i64, ttl_s: i64, first_version: u64) -> Result<LeaseRecord> {
        if get_record(&self.leases, id)?.is_some() {
            return Err(MvccError::LeaseExists);
        }
        let version = first_version.max(1);
        let rec = LeaseRecord { id, ttl_s, remaining_ms: ttl_s.saturating_mul(1000), version, renewed: false };
        self.leases.insert(id.to_be_bytes().as_slice(), rec.encode().as_slice())?;
        Ok(rec)
    }

    /// The lease as stored now (inside this write).
    pub fn lease_at(&self, id: i64) -> Result<Option<LeaseRecord>> {
        get_record(&self.leases, id)
    }

    /// Removes the lease and deletes its keys in one revision.
    pub fn lease_revoke(&mut self, id: i64) -> Result<()> {
        if get_record(&self.leases, id)?.is_none() {
            return Err(MvccError::LeaseNotFound);
        }
        for key in attached(&self.lease_keys, id)? {
            let req = DeleteRangeRequest { key, ..Default::default() };
            TxnExec::delete_range(self, &req)?;
        }
        self.leases.remove(id.to_be_bytes().as_slice())?;
        Ok(())
    }

    /// Re-bases the lease to its full TTL (a keep-alive).
    pub fn lease_renew(&mut self, id: i64) -> Result<LeaseRecord> {
        let mut rec = get_record(&self.leases, id)?.ok_or(MvccError::LeaseNotFound)?;
        rec.remaining_ms = rec.ttl_s.saturating_mul(1000);
        rec.version += 1;
        rec.renewed = true;
        self.leases.insert(id.to_be_bytes().as_slice(), rec.encode().as_slice())?;
        Ok(rec)
    }

    /// Records the leader's view of a lease's remaining TTL, computed from record
    /// `version`. Skipped if the lease is gone or was re-based since (a keep-alive
    /// that raced with the checkpoint must not be undone).
    pub fn lease_checkpoint(&mut self, id: i64, version: u64, remaining_ms: i64) -> Result<()> {
        if let Some(mut rec) = get_record(&self.leases, id)?.filter(|r| r.version == version) {
            rec.remaining_ms = remaining_ms.clamp(0, rec.ttl_s.saturating_mul(1000));
            rec.version += 1;
            rec.renewed = false;
            self.leases.insert(id.to_be_bytes().as_slice(), rec.encode().as_slice())?;
        }
        Ok(())
    }
}

impl ReadView {
    pub fn lease(&self, id: i64) -> Result<Option<LeaseRecord>> {
        get_record(&self.leases, id)
    }

    pub fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        attached(&self.lease_keys, id)
    }

    pub fn leases(&self) -> Result<Vec<LeaseRecord>> {
        let mut out = Vec::new();
        for row in self.leases.iter()? {
            let (k, v) = row?;
            let id = i64::from_be_bytes(
                k.value().try_into().map_err(|_| MvccError::Corrupt("lease id is not 8 bytes".into()))?,
            );
            out.push(LeaseRecord::decode(id, v.value())?);
        }
        Ok(out)
    }

    /// The live key-value of `key`, if any.
    pub fn get(&self, key: &[u8]) -> Result<Option<crate::proto::mvccpb::KeyValue>> {
        Ok(self.keys().live(&self.history, key, self.current)?.map(|(_, kv)| kv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd_store::mvcc::index::KeyIndex;
    use crate::proto::etcdserverpb::{PutRequest, RangeRequest};
    use crate::storage::Backend;

    #[test]
    fn grant_attach_revoke_in_one_revision() {
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::open(&dir.path().join("sm.db")).unwrap();
        let index = std::sync::Arc::new(KeyIndex::open(&b.begin_read().unwrap()).unwrap());
        let open_view = || ReadView::new(&b.begin_read().unwrap(), &index).unwrap();
        let write = |f: &mut dyn FnMut(&mut Writer) -> Result<()>| {
            let txn = b.begin_apply().unwrap();
            {
                let mut w = Writer::new(&txn, &index).unwrap();
                f(&mut w).unwrap();
                w.finish().unwrap();
            }
            txn.commit().unwrap();
        };
        write(&mut |w| w.lease_grant(7, 10, 1).map(|_| ()));
        let put = |k: &str, lease: i64| PutRequest { key: k.into(), value: b"v".to_vec(), lease, ..Default::default() };
        write(&mut |w| w.put(&put("a", 7)).map(|_| ()));
        write(&mut |w| w.put(&put("b", 7)).map(|_| ()));
        write(&mut |w| w.put(&put("c", 0)).map(|_| ()));
        // Re-putting "b" without the lease detaches it.
        write(&mut |w| w.put(&put("b", 0)).map(|_| ()));
        let view = open_view();
        assert_eq!(view.lease_keys(7).unwrap(), vec![b"a".to_vec()]);
        assert_eq!(view.current_rev(), 5);
        write(&mut |w| w.put(&put("d", 7)).map(|_| ()));
        write(&mut |w| w.lease_revoke(7));
        let view = open_view();
        assert_eq!(view.current_rev(), 7, "revoke of two keys is one revision");
        let all = RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
        let keys: Vec<Vec<u8>> = view.range(&all).unwrap().kvs.into_iter().map(|kv| kv.key).collect();
        assert_eq!(keys, vec![b"b".to_vec(), b"c".to_vec()]);
        assert!(view.lease(7).unwrap().is_none());
        assert!(view.lease_keys(7).unwrap().is_empty());
        // Unknown leases are refused and change nothing.
        let txn = b.begin_apply().unwrap();
        {
            let mut w = Writer::new(&txn, &index).unwrap();
            assert!(matches!(w.lease_revoke(7), Err(MvccError::LeaseNotFound)));
            assert!(matches!(w.put(&put("e", 7)), Err(MvccError::LeaseNotFound)));
            assert!(matches!(w.lease_renew(7), Err(MvccError::LeaseNotFound)));
            w.lease_grant(8, 5, 1).unwrap();
            assert!(matches!(w.lease_grant(8, 5, 1), Err(MvccError::LeaseExists)));
            w.lease_checkpoint(8, 1, 1234).unwrap();
            w.lease_checkpoint(8, 1, 99).unwrap();
            assert_eq!(w.finish().unwrap(), 7);
        }
        txn.commit().unwrap();
        let view = open_view();
        let rec = view.lease(8).unwrap().unwrap();
        assert_eq!((rec.ttl_s, rec.remaining_ms, rec.version), (5, 1234, 2));
    }
}
