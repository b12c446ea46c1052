//! The durable Raft log: one `fjall` journal shared by every group of the member.
//!
//! Layout: keyspace `log` maps (group id ‖ index, both big-endian) to a record
//! `crc32 ‖ bincode(entry)`; keyspace `meta` maps (group id ‖ name) to the vote,
//! the committed log id and the last purged log id. Keying by group lets later
//! multi-group members share one journal, so one fsync covers many groups.
//!
//! Ordering rules relied upon:
//! - An append is acknowledged to openraft (the `IOFlushed` callback) only after an
//!   fsync (`PersistMode::SyncData`) that covers it. Appends are written to fjall
//!   immediately (readable at once) and a single syncer thread fsyncs once per batch
//!   of waiting callbacks: group commit.
//! - The vote is fsynced before `save_vote` returns: a member must never forget a
//!   vote it granted.
//! - Truncation and purge need no fsync of their own: the journal is sequential, so
//!   the next fsync (which precedes any acknowledgement that depends on them) covers
//!   them. A purge lost in a crash only leaves extra entries behind.
//! - A record whose checksum does not match is an I/O error, never an entry.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{mpsc, Arc};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{OptionalSend, RaftLogReader};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::TypeConfig;

type C = TypeConfig;

/// Most callbacks one fsync acknowledges; bounds the syncer's batch memory.
const MAX_SYNC_BATCH: usize = 4096;

/// fjall's block cache (for log entries already flushed to tables; fjall's
/// default is 32 MiB). Replication reads recent entries, which are still in
/// the memtable.
const LOG_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Log bytes held in memory before fjall flushes them to a table file. fjall's
/// default, 64 MiB, kept that much of every member's log resident.
const LOG_MEMTABLE_BYTES: u64 = 8 * 1024 * 1024;

struct Inner {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    group: u64,
    /// Hands append callbacks to the syncer thread; bounded so a slow disk pushes
    /// back on the Raft core instead of growing memory.
    sync_tx: mpsc::SyncSender<IOFlushed<C>>,
}

/// The log store of one Raft group. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(io_err)
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    let (v, _) = bincode::serde::decode_from_slice(b, bincode::config::standard())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    Ok(v)
}

/// A stored record: checksum then payload.
fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn unseal<'a>(what: &str, rec: &'a [u8]) -> io::Result<&'a [u8]> {
    if rec.len() < 4 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{what}: record truncated")));
    }
    let (crc, payload) = rec.split_at(4);
    if crc32fast::hash(payload).to_be_bytes() != crc {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{what}: checksum mismatch (corrupt log)")));
    }
    Ok(payload)
}

/// Decodes one stored log record (`crc32 ‖ bincode(entry)`), refusing a
/// truncated or corrupted one.
pub fn decode_entry(rec: &[u8]) -> io::Result<EntryOf<C>> {
    decode(unseal("log entry", rec)?)
}

impl LogStore {
    /// Opens the journal at `dir` for `group`, starting its syncer thread.
    pub fn open(dir: &Path, group: u64, stats: Arc<crate::stats::GroupStats>) -> io::Result<LogStore> {
        let db = Database::builder(dir).cache_size(LOG_CACHE_BYTES).open().map_err(io_err)?;
        let log = db
            .keyspace("log", || KeyspaceCreateOptions::default().max_memtable_size(LOG_MEMTABLE_BYTES))
            .map_err(io_err)?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default).map_err(io_err)?;
        let (sync_tx, sync_rx) = mpsc::sync_channel::<IOFlushed<C>>(MAX_SYNC_BATCH);
        let syncer_db = db.clone();
        std::thread::Builder::new().name("log-sync".into()).spawn(move || syncer(syncer_db, sync_rx, stats))?;
        Ok(LogStore { inner: Arc::new(Inner { db, log, meta, group, sync_tx }) })
    }

    fn log_key(&self, index: u64) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&self.inner.group.to_be_bytes());
        k[8..].copy_from_slice(&index.to_be_bytes());
        k
    }

    fn meta_key(&self, name: &str) -> Vec<u8> {
        let mut k = self.inner.group.to_be_bytes().to_vec();
        k.extend_from_slice(name.as_bytes());
        k
    }

    fn get_meta<T: DeserializeOwned>(&self, name: &str) -> io::Result<Option<T>> {
        match self.inner.meta.get(self.meta_key(name)).map_err(io_err)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode(unseal(name, &v)?)?)),
        }
    }

    fn put_meta<T: Serialize>(&self, name: &str, v: &T) -> io::Result<()> {
        self.inner.meta.insert(self.meta_key(name), seal(&encode(v)?)).map_err(io_err)
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.db.persist(PersistMode::SyncData).map_err(io_err)
    }

    fn last_entry_log_id(&self) -> io::Result<Option<LogIdOf<C>>> {
        let lo = self.log_key(0);
        let hi = self.log_key(u64::MAX);
        match self.inner.log.range(lo..=hi).next_back() {
            None => Ok(None),
            Some(guard) => {
                let v = guard.value().map_err(io_err)?;
                let entry = decode_entry(&v)?;
                Ok(Some(entry.log_id))
            }
        }
    }

    /// Verifies every stored record's checksum; run at startup so a corrupted log
    /// is refused before the member serves anything.
    /// The index of the last entry the log holds or has purged (0 when empty).
    pub fn last_index(&self) -> io::Result<u64> {
        let purged: Option<LogIdOf<C>> = self.get_meta("purged")?;
        Ok(self.last_entry_log_id()?.or(purged).map_or(0, |l| l.index()))
    }

    pub fn verify(&self) -> io::Result<u64> {
        let lo = self.log_key(0);
        let hi = self.log_key(u64::MAX);
        let mut n = 0;
        let mut expect: Option<u64> = None;
        for guard in self.inner.log.range(lo..=hi) {
            let (k, v) = guard.into_inner().map_err(io_err)?;
            let entry = decode_entry(&v)?;
            let index = k
                .get(8..16)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed log key"))?;
            if entry.log_id.index() != index || expect.is_some_and(|e| e != index) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("log gap or misplaced entry at {index}"),
                ));
            }
            expect = Some(index + 1);
            n += 1;
        }
        Ok(n)
    }
}

/// Acknowledges appends: one fsync per batch of waiting callbacks. A failed fsync
/// is reported to openraft, which stops the group: a member whose log cannot be made
/// durable must not keep acknowledging.
fn syncer(db: Database, rx: mpsc::Receiver<IOFlushed<C>>, stats: Arc<crate::stats::GroupStats>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_SYNC_BATCH {
            match rx.try_recv() {
                Ok(cb) => batch.push(cb),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let result = db.persist(PersistMode::SyncData);
        stats.wal_fsync.observe(started.elapsed());
        for cb in batch {
            match &result {
                Ok(()) => cb.io_completed(Ok(())),
                Err(e) => cb.io_completed(Err(io_err(e))),
            }
        }
        if let Err(e) = result {
            tracing::error!("log fsync failed: {e}; the raft group stops");
            return;
        }
    }
}

impl RaftLogReader<C> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<C>>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Bound::Included(self.log_key(e)),
            Bound::Excluded(&e) => Bound::Excluded(self.log_key(e)),
            Bound::Unbounded => Bound::Included(self.log_key(u64::MAX)),
        };
        let mut out = Vec::new();
        for guard in self.inner.log.range((Bound::Included(self.log_key(start)), end)) {
            let v = guard.value().map_err(io_err)?;
            out.push(decode_entry(&v)?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        self.get_meta("vote")
    }
}

impl RaftLogStorage<C> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let last_purged_log_id: Option<LogIdOf<C>> = self.get_meta("purged")?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        self.put_meta("vote", vote)?;
        // Must fsync before returning: the vote is promised to a candidate.
        self.sync()
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        self.put_meta("committed", &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        Ok(self.get_meta::<Option<LogIdOf<C>>>("committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = self.inner.db.batch();
        for entry in entries {
            batch.insert(&self.inner.log, self.log_key(entry.log_id.index()), seal(&encode(&entry)?));
        }
        batch.commit().map_err(io_err)?;
        // Acknowledged by the syncer after the fsync that covers this batch.
        self.inner.sync_tx.send(callback).map_err(|_| io_err("log syncer stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        let keys: Vec<_> = self
            .inner
            .log
            .range(self.log_key(from)..=self.log_key(u64::MAX))
            .map(|g| g.key().map_err(io_err))
            .collect::<Result<_, _>>()?;
        let mut batch = self.inner.db.batch();
        for k in keys {
            batch.remove(&self.inner.log, k);
        }
        batch.commit().map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        // Record the purge point first: a crash between the two steps leaves extra
        // entries below it, which are never read.
        self.put_meta("purged", &log_id)?;
        let keys: Vec<_> = self
            .inner
            .log
            .range(self.log_key(0)..=self.log_key(log_id.index()))
            .map(|g| g.key().map_err(io_err))
            .collect::<Result<_, _>>()?;
        let mut batch = self.inner.db.batch();
        for k in keys {
            batch.remove(&self.inner.log, k);
        }
        batch.commit().map_err(io_err)
    }
}
