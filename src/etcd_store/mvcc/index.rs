//! The in-memory key index: for each user key, the revisions of its retained
//! changes, oldest first (etcd's `treeIndex`).
//!
//! Contract:
//! - The index holds exactly what the `HISTORY` table holds, grouped by key: one
//!   [`Version`] per retained change record. It is derived state: built by scanning
//!   the table when a state file is opened or replaced ([`KeyIndex::open`],
//!   [`KeyIndex::replace`]), and kept equal to it by the [`Writer`](super::Writer),
//!   which pushes every change it records and prunes what compaction removes.
//! - A read at revision R sees a key's newest version at or below R, so a reader
//!   whose redb snapshot is at R gets the answer of that snapshot even while the
//!   writer pushes changes at revisions above R (before they commit).
//! - Compaction prunes versions, but never what an open reader needs: each
//!   [`ReadView`](super::ReadView) pins its snapshot's revision ([`KeyIndex::pin`]),
//!   and pruning stops at the oldest pin (what it leaves, the next compaction
//!   prunes). A read at an explicit revision below the pruned point fails with
//!   [`MvccError::Compacted`], as etcd's does when a compaction overtook it.
//! - A state file replaced wholesale (snapshot install) gives the index a new
//!   generation; a [`ReadView`](super::ReadView) opened on the old file notices and
//!   fails instead of mixing the two ([`MvccError::Retry`]).
//!
//! Why: the alternative, a `latest` table of live keys in the state file, made
//! every apply transaction copy-on-write one random B-tree leaf per written key
//! (measured: with 10,000 random keys members used 5.0–5.3 CPU s per 50k puts
//! against 3.8 s with one key, docs/benchmarks.md round 6). With the index an apply
//! transaction only appends to `HISTORY`. Cost: memory per retained change
//! ([`Version`] is 16 bytes, plus the key once) and a scan of the history at start.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, RwLock};

use redb::{ReadTransaction, ReadableTable};

use super::keys::{decode_rev_key, KeyRange};
use super::records::{change_key, RevPtr};
use super::{missing_version, revisions, stored_version, MvccError, Result, Rev};
use crate::storage::{HISTORY, META};

/// One retained change of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    main: Rev,
    sub: u32,
    /// A put (`false`: a deletion).
    put: bool,
}

impl Version {
    fn ptr(&self) -> RevPtr {
        (self.main, i64::from(self.sub))
    }
}

/// What a put needs of the version it replaces, kept for each key's newest
/// version so that the writer need not read that version back from the history
/// (a random read of the change table per put, ~6% of a follower's CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    pub create_revision: Rev,
    pub version: i64,
    pub lease: i64,
}

/// One key's entry.
#[derive(Default)]
struct Versions {
    list: Vec<Version>,
    /// Of the newest version, when that is a put.
    head: Head,
}

#[derive(Default)]
struct Inner {
    keys: BTreeMap<Vec<u8>, Versions>,
    /// Versions older than the newest one at or below this revision are pruned
    /// (at most the store's compaction revision: less while a reader pinned less).
    compacted: Rev,
    /// Keys whose newest version is a put.
    live: u64,
    /// Changes whenever the state file behind the index is replaced.
    generation: u64,
    /// Set between the start and the end of a replacement: nothing may read.
    replacing: bool,
}

/// The key index of one state file. A std `RwLock`: held only while walking the
/// map, never across an await or a storage read.
#[derive(Default)]
pub struct KeyIndex {
    inner: RwLock<Inner>,
    /// Revisions open readers read at, with how many read at each. A std mutex,
    /// held for a map update, or by compaction across its pruning so that a
    /// reader pins either before it (and is spared) or after it (and sees it).
    pinned: Mutex<BTreeMap<Rev, usize>>,
}

/// An open reader's hold on the versions of revision `rev` ([`KeyIndex::pin`]).
pub struct Pin {
    index: std::sync::Arc<KeyIndex>,
    rev: Rev,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pinned = self.index.pinned.lock().expect("key index pins poisoned");
        if let Some(n) = pinned.get_mut(&self.rev) {
            *n -= 1;
            if *n == 0 {
                pinned.remove(&self.rev);
            }
        }
    }
}

/// The newest version of `versions` at or below `rev`, if that is a put.
fn live_at(versions: &[Version], rev: Rev) -> Option<RevPtr> {
    let n = versions.partition_point(|v| v.main <= rev);
    versions[..n].last().filter(|v| v.put).map(Version::ptr)
}

impl Inner {
    /// The index of the state `txn` reads.
    fn of(txn: &ReadTransaction) -> Result<Inner> {
        let compacted = revisions(&txn.open_table(META)?)?.1;
        Inner::build(&txn.open_table(HISTORY)?, compacted)
    }

    fn build<H: ReadableTable<&'static [u8], &'static [u8]>>(history: &H, compacted: Rev) -> Result<Inner> {
        let mut inner = Inner { compacted, ..Default::default() };
        for row in history.iter()? {
            let (k, v) = row?;
            let (main, sub) = decode_rev_key(k.value()).map_err(MvccError::Corrupt)?;
            let sub = u32::try_from(sub).map_err(|_| MvccError::Corrupt(format!("sub-revision {sub}")))?;
            let (put, key) = change_key(v.value())?;
            let versions = &mut inner.keys.entry(key.to_vec()).or_default().list;
            if versions.last().is_some_and(|last| (last.main, last.sub) >= (main, sub)) {
                return Err(MvccError::Corrupt(format!("history of a key out of order at {main}.{sub}")));
            }
            versions.push(Version { main, sub, put });
        }
        for entry in inner.keys.values_mut() {
            let Some(newest) = entry.list.last().filter(|v| v.put) else { continue };
            let at = newest.ptr();
            let kv = stored_version(history, at)?.ok_or_else(|| missing_version(at))?;
            entry.head = Head { create_revision: kv.create_revision, version: kv.version, lease: kv.lease };
            inner.live += 1;
        }
        Ok(inner)
    }

    /// Fails reads at `rev` that the index can no longer answer, or answers from
    /// another state file than the reader's (`generation`).
    fn check(&self, rev: Rev, generation: u64) -> Result<()> {
        if self.replacing || self.generation != generation {
            return Err(MvccError::Retry);
        }
        if rev < self.compacted {
            return Err(MvccError::Compacted);
        }
        Ok(())
    }
}

impl KeyIndex {
    /// Builds the index of the state `txn` reads.
    pub fn open(txn: &ReadTransaction) -> Result<KeyIndex> {
        Ok(KeyIndex { inner: RwLock::new(Inner::of(txn)?), ..Default::default() })
    }

    /// Keeps the versions a reader at `rev` needs until the pin is dropped. Fails
    /// with [`MvccError::Retry`] when a compaction pruned past `rev` before the pin
    /// (the reader's snapshot is then older than the index: open a new one).
    pub fn pin(self: &std::sync::Arc<Self>, rev: Rev) -> Result<Pin> {
        let mut pinned = self.pinned.lock().expect("key index pins poisoned");
        if self.read().compacted > rev {
            return Err(MvccError::Retry);
        }
        *pinned.entry(rev).or_default() += 1;
        Ok(Pin { index: self.clone(), rev })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().expect("key index poisoned")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().expect("key index poisoned")
    }

    /// The generation a reader opening a redb snapshot now must present.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// Starts replacing the state file: from now on no read is answered until
    /// [`KeyIndex::replace`]. Must run before the new state commits.
    pub fn begin_replace(&self) {
        let mut inner = self.write();
        inner.replacing = true;
        inner.generation += 1;
    }

    /// Rebuilds the index from the new state, which `txn` reads (after it committed).
    pub fn replace(&self, txn: &ReadTransaction) -> Result<()> {
        let built = Inner::of(txn);
        let mut inner = self.write();
        let generation = inner.generation + 1;
        match built {
            Ok(new) => {
                *inner = Inner { generation, ..new };
                Ok(())
            }
            Err(e) => {
                inner.generation = generation;
                Err(e)
            }
        }
    }

    /// The version `key` had at `rev`, if it was live.
    pub fn get(&self, key: &[u8], rev: Rev, generation: u64) -> Result<Option<RevPtr>> {
        let inner = self.read();
        inner.check(rev, generation)?;
        Ok(inner.keys.get(key).and_then(|v| live_at(&v.list, rev)))
    }

    /// The versions live at `rev` of the keys in `range`, in key order: at most
    /// `limit` of them (0: all), and how many there are in all.
    pub fn range(&self, range: &KeyRange, rev: Rev, limit: usize, generation: u64) -> Result<(Vec<RevPtr>, i64)> {
        let inner = self.read();
        inner.check(rev, generation)?;
        let mut out = Vec::new();
        let mut count = 0i64;
        if range.is_empty() {
            return Ok((out, 0));
        }
        let start = range.start.as_slice();
        let mut take = |versions: &Versions| {
            if let Some(at) = live_at(&versions.list, rev) {
                if limit == 0 || out.len() < limit {
                    out.push(at);
                }
                count += 1;
            }
        };
        match &range.end {
            None => inner.keys.get(start).into_iter().for_each(&mut take),
            Some(end) => {
                let upper = if end.is_empty() { Bound::Unbounded } else { Bound::Excluded(end.as_slice()) };
                let bounds: (Bound<&[u8]>, Bound<&[u8]>) = (Bound::Included(start), upper);
                inner.keys.range::<[u8], _>(bounds).for_each(|(_, v)| take(v))
            }
        }
        Ok((out, count))
    }

    /// Keys live at the newest revision.
    pub fn live_keys(&self) -> u64 {
        self.read().live
    }

    /// The newest version of `key` and its [`Head`], if that version is a put:
    /// what the writer, which has seen every change, replaces.
    pub fn newest(&self, key: &[u8]) -> Option<(RevPtr, Head)> {
        let inner = self.read();
        let entry = inner.keys.get(key)?;
        entry.list.last().filter(|v| v.put).map(|v| (v.ptr(), entry.head))
    }

    /// Records a change of `key` at `at` (newer than any it has): a put with its
    /// [`Head`], or a deletion (`None`).
    pub fn push(&self, key: &[u8], at: RevPtr, head: Option<Head>) {
        let sub = u32::try_from(at.1).expect("a sub-revision fits 32 bits");
        let version = Version { main: at.0, sub, put: head.is_some() };
        let mut inner = self.write();
        let entry = match inner.keys.get_mut(key) {
            Some(entry) => entry,
            None => inner.keys.entry(key.to_vec()).or_default(),
        };
        let was_live = entry.list.last().is_some_and(|v| v.put);
        assert!(
            entry.list.last().is_none_or(|v| (v.main, v.sub) < (version.main, version.sub)),
            "changes of a key are pushed in revision order"
        );
        entry.list.push(version);
        if let Some(head) = head {
            entry.head = head;
        }
        match (was_live, version.put) {
            (false, true) => inner.live += 1,
            (true, false) => inner.live -= 1,
            _ => {}
        }
    }

    /// Prunes what compacting at `rev` removes from the history: every version
    /// older than a key's newest one at or below `rev`, and that one too if it is
    /// a deletion. Stops at the oldest pinned revision if that is lower.
    pub fn compact(&self, rev: Rev) {
        let pinned = self.pinned.lock().expect("key index pins poisoned");
        let rev = pinned.keys().next().map_or(rev, |&oldest| oldest.min(rev));
        let mut inner = self.write();
        inner.keys.retain(|_, entry| {
            let versions = &mut entry.list;
            let n = versions.partition_point(|v| v.main <= rev);
            if n > 0 {
                let keep_from = if versions[n - 1].put { n - 1 } else { n };
                versions.drain(..keep_from);
            }
            !versions.is_empty()
        });
        inner.compacted = inner.compacted.max(rev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_see_the_newest_version_at_their_revision_and_compaction_prunes() {
        let index = KeyIndex::default();
        let head = |version| Some(Head { create_revision: 2, version, lease: 0 });
        index.push(b"a", (2, 0), head(1));
        index.push(b"a", (3, 0), head(2));
        index.push(b"b", (3, 1), head(1));
        index.push(b"a", (5, 0), None);
        assert_eq!(index.newest(b"a"), None);
        index.push(b"a", (7, 0), head(1));
        assert_eq!(index.newest(b"a"), Some(((7, 0), head(1).unwrap())));
        let g = index.generation();
        assert_eq!(index.get(b"a", 1, g).unwrap(), None);
        assert_eq!(index.get(b"a", 4, g).unwrap(), Some((3, 0)));
        assert_eq!(index.get(b"a", 6, g).unwrap(), None);
        assert_eq!(index.get(b"a", 9, g).unwrap(), Some((7, 0)));
        let all = KeyRange::new(b"a", b"\0");
        assert_eq!(index.range(&all, 4, 0, g).unwrap(), (vec![(3, 0), (3, 1)], 2));
        assert_eq!(index.range(&all, 4, 1, g).unwrap(), (vec![(3, 0)], 2));
        assert_eq!(index.range(&all, 6, 0, g).unwrap(), (vec![(3, 1)], 1));
        assert_eq!(index.live_keys(), 2);
        index.compact(6);
        assert!(matches!(index.get(b"a", 5, g), Err(MvccError::Compacted)));
        assert_eq!(index.get(b"a", 6, g).unwrap(), None);
        assert_eq!(index.get(b"b", 6, g).unwrap(), Some((3, 1)));
        assert_eq!(index.get(b"a", 7, g).unwrap(), Some((7, 0)));
        assert_eq!(index.read().keys[b"a".as_slice()].list.len(), 1, "the deletion at 5 and all before it are gone");
        let index = std::sync::Arc::new(index);
        {
            let _reader = index.pin(7).unwrap();
            index.compact(8);
            assert_eq!(index.get(b"b", 7, g).unwrap(), Some((3, 1)), "a pinned reader keeps its versions");
            assert!(matches!(index.pin(6), Err(MvccError::Retry)), "pruned past 6 already");
        }
        index.push(b"b", (9, 0), None);
        index.compact(9);
        assert!(matches!(index.get(b"b", 8, g), Err(MvccError::Compacted)), "unpinned: pruned to 9");
        index.begin_replace();
        assert!(matches!(index.get(b"b", 9, g), Err(MvccError::Retry)));
    }
}
