//! Durable streams with Redis Streams semantics: a Raft service, and the
//! handle the Redis gateway (`crate::server::redis`) uses. The same ordered-table
//! service runs two more models: durable queues ([`queue`]) and blob buckets'
//! metadata ([`bucket`], in groups of catalog kind `blob`).
//!
//! Each stream is a catalog group of its own (service kind `stream`), created on
//! the first write that makes the stream exist; [`model`] holds the semantics.
//! What it guarantees:
//! - A write (XADD, XREADGROUP, XACK, ...) is answered only after its log entry
//!   is committed — fsynced by a quorum — and applied; its reply is the one the
//!   apply computed, identical on every member (the proposer's clock is in the
//!   command).
//! - Reads (XRANGE, XREAD, XPENDING, XINFO) are linearizable: a read barrier,
//!   then this member's applied state.
//! - Deliveries to consumer groups are replicated decisions (XREADGROUP is a
//!   write), so a new leader knows every pending entry and redelivers only
//!   through XCLAIM/XAUTOCLAIM.
//!
//! State: one redb file per group (`streams.redb`): the model's rows in one
//! table, and the applied log id and membership in another, committed together
//! per applied batch without an fsync (the log is the durable record; a
//! snapshot build makes the file durable before the log is purged). A snapshot
//! is every row, streamed a row at a time into the runtime's snapshot file.

pub mod bucket;
pub mod model;
pub mod queue;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::EntryPayload;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::consensus::log_store::LogStore;
use crate::consensus::service::{Entry, LogId, Service, Snapshot, SnapshotMeta, SnapshotSource, StoredMembership};
use crate::consensus::snapshot::{read_snapshot_file, write_snapshot_file_with, SnapshotFile};
use crate::consensus::{ConsensusError, Group, GroupConfig, GroupId, MemberId, SnapshotData};
use model::{StreamCommand, Value};

const ROWS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("rows");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_APPLIED: &str = "applied";
const META_MEMBERSHIP: &str = "membership";

/// Most bytes one row of a snapshot may decode to: an entry is bounded by the
/// request size limit.
const MAX_ROW_BYTES: usize = 64 << 20;

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(io::Error::other)
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    crate::consensus::decode_bounded(b).map(|(v, _)| v).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The reply to a log entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StreamReply {
    Value(Value),
    /// The body was no command (a bug or a corrupted log); nothing changed.
    Malformed(String),
    /// A queue command's reply.
    Queue(queue::QueueReply),
    /// A blob metadata command's reply.
    Blob(crate::streams::bucket::BlobReply),
}

/// The model's table (infallible) over a redb table: the first storage error
/// is kept here, and the caller checks it after the model is done. A failed
/// apply's transaction is dropped uncommitted (the group stops), a failed read
/// answers an error: a decision the model took on a failed read is never kept
/// or served.
struct Rows<T> {
    table: T,
    error: std::cell::RefCell<Option<String>>,
}

type RowPair<'a> = (redb::AccessGuard<'a, &'static [u8]>, redb::AccessGuard<'a, &'static [u8]>);

impl<T> Rows<T> {
    fn new(table: T) -> Rows<T> {
        Rows { table, error: Default::default() }
    }

    fn fail(&self, e: impl std::fmt::Display) {
        self.error.borrow_mut().get_or_insert_with(|| e.to_string());
    }

    fn checked(self) -> io::Result<T> {
        match self.error.into_inner() {
            Some(e) => Err(io::Error::other(e)),
            None => Ok(self.table),
        }
    }

    fn read<R: ReadableTable<&'static [u8], &'static [u8]>>(&self, table: &R, key: &[u8]) -> Option<Vec<u8>> {
        match table.get(key) {
            Ok(v) => v.map(|v| v.value().to_vec()),
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    fn scan<R: ReadableTable<&'static [u8], &'static [u8]>>(
        &self,
        table: &R,
        from: &[u8],
        to: &[u8],
        reverse: bool,
        limit: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        if from >= to {
            return Vec::new();
        }
        let range = match table.range(from..to) {
            Ok(r) => r,
            Err(e) => {
                self.fail(e);
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        let mut take = |row: Result<RowPair<'_>, redb::StorageError>| match row {
            Ok((k, v)) => {
                out.push((k.value().to_vec(), v.value().to_vec()));
                out.len() < limit
            }
            Err(e) => {
                self.fail(e);
                false
            }
        };
        match reverse {
            false => {
                for row in range {
                    if !take(row) {
                        break;
                    }
                }
            }
            true => {
                for row in range.rev() {
                    if !take(row) {
                        break;
                    }
                }
            }
        }
        out
    }
}

/// Rows in an apply's write transaction.
type WriteRows<'a, 't> = Rows<&'a mut redb::Table<'t, &'static [u8], &'static [u8]>>;

impl model::Table for WriteRows<'_, '_> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.read(&*self.table, key)
    }
    fn put(&mut self, key: &[u8], value: &[u8]) {
        let outcome = self.table.insert(key, value).map(drop).map_err(|e| e.to_string());
        if let Err(e) = outcome {
            self.fail(e);
        }
    }
    fn delete(&mut self, key: &[u8]) {
        let outcome = self.table.remove(key).map(drop).map_err(|e| e.to_string());
        if let Err(e) = outcome {
            self.fail(e);
        }
    }
    fn range(&self, from: &[u8], to: &[u8], reverse: bool, limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.scan(&*self.table, from, to, reverse, limit)
    }
}

/// A read-only view of a stream group's rows, for reads.
struct ReadView(Rows<redb::ReadOnlyTable<&'static [u8], &'static [u8]>>);

impl model::Table for ReadView {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.read(&self.0.table, key)
    }
    fn put(&mut self, _: &[u8], _: &[u8]) {
        unreachable!("a read view is never written")
    }
    fn delete(&mut self, _: &[u8]) {
        unreachable!("a read view is never written")
    }
    fn range(&self, from: &[u8], to: &[u8], reverse: bool, limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.0.scan(&self.0.table, from, to, reverse, limit)
    }
}

/// The stream service's state machine.
pub struct StreamService {
    db: Arc<Database>,
    snap_path: PathBuf,
    /// Counts applied batches (and installed snapshots): blocked XREAD and
    /// XREADGROUP wait for it to change, so no apply between their look and
    /// their wait goes unnoticed.
    applied: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StreamService {
    pub fn open(dir: &Path) -> io::Result<StreamService> {
        std::fs::create_dir_all(dir.join("snap"))?;
        let db = Database::create(dir.join("streams.redb")).map_err(io_err)?;
        let txn = db.begin_write().map_err(io_err)?;
        txn.open_table(ROWS).map_err(io_err)?;
        txn.open_table(META).map_err(io_err)?;
        txn.commit().map_err(io_err)?;
        let service = StreamService {
            db: Arc::new(db),
            snap_path: dir.join("snap").join("current"),
            applied: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        // A corrupt snapshot file is refused at start, not when a follower needs it.
        if let Some(snapshot) = service.current_snapshot()? {
            read_rows(&mut snapshot.snapshot.reader(), &mut |_, _| Ok(()))?;
        }
        Ok(service)
    }

    fn current_snapshot(&self) -> io::Result<Option<Snapshot>> {
        Ok(read_snapshot_file(&self.snap_path)?.map(|(meta, snapshot)| Snapshot { meta, snapshot }))
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(META).map_err(io_err)?;
        let value = table.get(key).map_err(io_err)?;
        value.map(|v| decode(v.value())).transpose()
    }
}

/// A snapshot's data: the row count, then each `(key, value)` row, bincode.
fn write_rows(read: &redb::ReadTransaction, mut w: &mut dyn io::Write) -> io::Result<()> {
    use redb::ReadableTableMetadata;
    let table = read.open_table(ROWS).map_err(io_err)?;
    let config = bincode::config::standard();
    bincode::serde::encode_into_std_write(table.len().map_err(io_err)?, &mut w, config).map_err(io::Error::other)?;
    for row in table.iter().map_err(io_err)? {
        let (k, v) = row.map_err(io_err)?;
        let row: (&[u8], &[u8]) = (k.value(), v.value());
        bincode::serde::encode_into_std_write(row, &mut w, config).map_err(io::Error::other)?;
    }
    Ok(())
}

fn read_rows(r: &mut dyn io::Read, each: &mut dyn FnMut(Vec<u8>, Vec<u8>) -> io::Result<()>) -> io::Result<()> {
    let mut r = io::BufReader::new(r);
    let bad = |e: bincode::error::DecodeError| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    let config = bincode::config::standard().with_limit::<{ MAX_ROW_BYTES }>();
    let count: u64 = bincode::serde::decode_from_std_read(&mut r, config).map_err(bad)?;
    for _ in 0..count {
        // Written as byte strings: a length, then the bytes, which is how a
        // `Vec<u8>` decodes too.
        let (k, v): (Vec<u8>, Vec<u8>) = bincode::serde::decode_from_std_read(&mut r, config).map_err(bad)?;
        each(k, v)?;
    }
    if io::Read::read(&mut r, &mut [0u8; 1])? != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "stream snapshot: trailing bytes"));
    }
    Ok(())
}

impl Service for StreamService {
    fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        Ok((self.read_meta(META_APPLIED)?, self.read_meta(META_MEMBERSHIP)?.unwrap_or_default()))
    }

    fn apply(&mut self, entries: &[Entry]) -> io::Result<Vec<Vec<u8>>> {
        let mut txn = self.db.begin_write().map_err(io_err)?;
        txn.set_durability(Durability::None).map_err(io_err)?;
        let mut replies = Vec::with_capacity(entries.len());
        {
            let mut rows = txn.open_table(ROWS).map_err(io_err)?;
            let mut meta = txn.open_table(META).map_err(io_err)?;
            for entry in entries {
                let reply = match &entry.payload {
                    EntryPayload::Blank => StreamReply::Value(Value::Ok),
                    EntryPayload::Normal(p) => match decode::<StreamCommand>(&p.body) {
                        Ok(StreamCommand::Queue(cmd)) => {
                            let mut table = Rows::new(&mut rows);
                            let reply = queue::Queues { table: &mut table }.apply(cmd).map_err(io_err)?;
                            table.checked()?;
                            StreamReply::Queue(reply)
                        }
                        Ok(StreamCommand::Blob(cmd)) => {
                            let mut table = Rows::new(&mut rows);
                            let reply =
                                crate::streams::bucket::BlobApply { table: &mut table }.apply(cmd).map_err(io_err)?;
                            table.checked()?;
                            StreamReply::Blob(reply)
                        }
                        Ok(cmd) => {
                            let mut table = Rows::new(&mut rows);
                            let value = model::Streams { table: &mut table }.apply(cmd).map_err(io_err)?;
                            table.checked()?;
                            StreamReply::Value(value)
                        }
                        Err(e) => StreamReply::Malformed(e.to_string()),
                    },
                    EntryPayload::Membership(m) => {
                        let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                        meta.insert(META_MEMBERSHIP, encode(&stored)?.as_slice()).map_err(io_err)?;
                        StreamReply::Value(Value::Ok)
                    }
                };
                replies.push(encode(&reply)?);
            }
            if let Some(last) = entries.last() {
                meta.insert(META_APPLIED, encode(&last.log_id)?.as_slice()).map_err(io_err)?;
            }
        }
        txn.commit().map_err(io_err)?;
        self.applied.send_modify(|n| *n = n.wrapping_add(1));
        Ok(replies)
    }

    fn snapshot_builder(&mut self) -> Box<dyn SnapshotSource> {
        Box::new(StreamSnapshots { db: self.db.clone(), path: self.snap_path.clone() })
    }

    /// Installs a snapshot a row at a time, in one transaction (a malformed
    /// snapshot aborts it and changes nothing).
    fn install_snapshot(&mut self, meta: &SnapshotMeta, data: SnapshotData) -> io::Result<()> {
        let mut txn = self.db.begin_write().map_err(io_err)?;
        txn.set_durability(Durability::Immediate).map_err(io_err)?;
        txn.delete_table(ROWS).map_err(io_err)?;
        {
            let mut rows = txn.open_table(ROWS).map_err(io_err)?;
            read_rows(&mut data.reader(), &mut |k, v| {
                rows.insert(k.as_slice(), v.as_slice()).map_err(io_err)?;
                Ok(())
            })?;
            let mut m = txn.open_table(META).map_err(io_err)?;
            match &meta.last_log_id {
                Some(id) => m.insert(META_APPLIED, encode(id)?.as_slice()).map_err(io_err)?,
                None => m.remove(META_APPLIED).map_err(io_err)?,
            };
            m.insert(META_MEMBERSHIP, encode(&meta.last_membership)?.as_slice()).map_err(io_err)?;
        }
        txn.commit().map_err(io_err)?;
        self.applied.send_modify(|n| *n = n.wrapping_add(1));
        write_snapshot_file_with(&self.snap_path, meta, &mut |w| io::copy(&mut data.reader(), w).map(|_| ()))
            .map(|_| ())
    }

    fn current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        StreamService::current_snapshot(self)
    }
}

struct StreamSnapshots {
    db: Arc<Database>,
    path: PathBuf,
}

impl SnapshotSource for StreamSnapshots {
    fn build(&mut self) -> io::Result<Snapshot> {
        // Durable before openraft purges the log up to this snapshot.
        let mut txn = self.db.begin_write().map_err(io_err)?;
        txn.set_durability(Durability::Immediate).map_err(io_err)?;
        txn.commit().map_err(io_err)?;
        let read = self.db.begin_read().map_err(io_err)?;
        let meta_table = read.open_table(META).map_err(io_err)?;
        let get = |k: &str| -> io::Result<Option<Vec<u8>>> {
            Ok(meta_table.get(k).map_err(io_err)?.map(|v| v.value().to_vec()))
        };
        let last_log_id = get(META_APPLIED)?.map(|b| decode::<LogId>(&b)).transpose()?;
        let last_membership = get(META_MEMBERSHIP)?.map(|b| decode(&b)).transpose()?.unwrap_or_default();
        let meta = SnapshotMeta { last_log_id, last_membership };
        let data_len = write_snapshot_file_with(&self.path, &meta, &mut |w| write_rows(&read, w))?;
        let header = self.path.metadata()?.len() - data_len;
        let snapshot = SnapshotFile::new(std::fs::File::open(&self.path)?, header, data_len);
        Ok(Snapshot { meta, snapshot })
    }
}

/// Why a stream operation did not complete.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
    #[error("stream state: {0}")]
    Storage(String),
}

/// One stream group's replica on this member: propose, read, wait.
#[derive(Clone)]
pub struct StreamGroup {
    pub group: Group,
    db: Arc<Database>,
    applied: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StreamGroup {
    /// Opens the stream service's state in `dir` and starts its group.
    pub async fn start(
        member: MemberId,
        group_id: GroupId,
        dir: &Path,
        log: LogStore,
        config: &GroupConfig,
    ) -> Result<StreamGroup, Box<dyn std::error::Error + Send + Sync>> {
        let service = StreamService::open(dir)?;
        let db = service.db.clone();
        let applied = service.applied.clone();
        let stats = Arc::new(crate::stats::GroupStats::default());
        let group = Group::start(member, group_id, log, Box::new(service), &dir.join("snap"), config, stats).await?;
        Ok(StreamGroup { group, db, applied })
    }

    /// Replicates a write; its reply.
    pub async fn write(&self, cmd: &StreamCommand, timeout: Duration) -> Result<Value, StreamError> {
        let body = encode(cmd).map_err(|e| StreamError::Storage(e.to_string()))?;
        let reply = self.group.propose(body, false, timeout).await?;
        match decode::<StreamReply>(&reply).map_err(|e| StreamError::Storage(e.to_string()))? {
            StreamReply::Value(v) => Ok(v),
            StreamReply::Malformed(why) => Err(StreamError::Storage(format!("malformed stream command: {why}"))),
            other => Err(StreamError::Storage(format!("not a stream reply to a stream command: {other:?}"))),
        }
    }

    /// Replicates a queue write; its reply.
    pub async fn queue_write(
        &self,
        cmd: queue::QueueCommand,
        timeout: Duration,
    ) -> Result<queue::QueueReply, StreamError> {
        let body = encode(&StreamCommand::Queue(cmd)).map_err(|e| StreamError::Storage(e.to_string()))?;
        let reply = self.group.propose(body, false, timeout).await?;
        match decode::<StreamReply>(&reply).map_err(|e| StreamError::Storage(e.to_string()))? {
            StreamReply::Queue(r) => Ok(r),
            StreamReply::Malformed(why) => Err(StreamError::Storage(format!("malformed queue command: {why}"))),
            other => Err(StreamError::Storage(format!("not a queue reply to a queue command: {other:?}"))),
        }
    }

    /// Replicates a blob metadata write; its reply.
    pub async fn blob_write(
        &self,
        cmd: crate::streams::bucket::BlobCommand,
        timeout: Duration,
    ) -> Result<crate::streams::bucket::BlobReply, StreamError> {
        let body = encode(&StreamCommand::Blob(cmd)).map_err(|e| StreamError::Storage(e.to_string()))?;
        let reply = self.group.propose(body, false, timeout).await?;
        match decode::<StreamReply>(&reply).map_err(|e| StreamError::Storage(e.to_string()))? {
            StreamReply::Blob(r) => Ok(r),
            StreamReply::Malformed(why) => Err(StreamError::Storage(format!("malformed blob command: {why}"))),
            other => Err(StreamError::Storage(format!("not a blob reply to a blob command: {other:?}"))),
        }
    }

    /// `f` over this member's applied blob metadata; linearizable when `barrier`.
    pub async fn blob_read<T>(
        &self,
        timeout: Duration,
        barrier: bool,
        f: impl FnOnce(
            &crate::streams::bucket::BlobView<'_, dyn model::Table>,
        ) -> Result<T, crate::streams::bucket::Corrupt>,
    ) -> Result<T, StreamError> {
        if barrier {
            self.group.read_barrier(timeout).await?;
        }
        self.with_rows(|table| {
            f(&crate::streams::bucket::BlobView { table: table as &dyn model::Table }).map_err(model::Corrupt::from)
        })
    }

    /// `f` over this member's applied queue state; linearizable when `barrier`.
    pub async fn queue_read<T>(
        &self,
        timeout: Duration,
        barrier: bool,
        f: impl FnOnce(&queue::QueueView<'_, dyn model::Table>) -> Result<T, model::Corrupt>,
    ) -> Result<T, StreamError> {
        if barrier {
            self.group.read_barrier(timeout).await?;
        }
        self.read_queue_local(f)
    }

    /// `f` over this member's applied queue state, without a barrier.
    pub fn read_queue_local<T>(
        &self,
        f: impl FnOnce(&queue::QueueView<'_, dyn model::Table>) -> Result<T, model::Corrupt>,
    ) -> Result<T, StreamError> {
        self.with_rows(|table| f(&queue::QueueView { table: table as &dyn model::Table }))
    }

    /// A linearizable read: a read barrier, then `f` over this member's state.
    pub async fn read<T>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&model::View<'_, dyn model::Table>) -> Result<T, model::Corrupt>,
    ) -> Result<T, StreamError> {
        self.group.read_barrier(timeout).await?;
        self.read_local(f)
    }

    /// `f` over this member's applied state, without a barrier (for re-checks
    /// after a barrier already taken, such as a blocked read waking up).
    pub fn read_local<T>(
        &self,
        f: impl FnOnce(&model::View<'_, dyn model::Table>) -> Result<T, model::Corrupt>,
    ) -> Result<T, StreamError> {
        self.with_rows(|table| f(&model::View { table: table as &dyn model::Table }))
    }

    /// `f` over this member's applied rows; a storage error it met is the answer.
    fn with_rows<T>(&self, f: impl FnOnce(&ReadView) -> Result<T, model::Corrupt>) -> Result<T, StreamError> {
        let storage = |e: redb::Error| StreamError::Storage(e.to_string());
        let txn = self.db.begin_read().map_err(|e| storage(e.into()))?;
        let table = ReadView(Rows::new(txn.open_table(ROWS).map_err(|e| storage(e.into()))?));
        let value = f(&table).map_err(|e| StreamError::Storage(e.to_string()))?;
        table.0.checked().map_err(|e| StreamError::Storage(e.to_string()))?;
        Ok(value)
    }

    /// Changes with every batch applied here from now on: take it before
    /// looking at the state, then wait on it.
    pub fn applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot's rows read back as written; trailing or truncated data is refused.
    #[test]
    fn stream_snapshots_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let service = StreamService::open(dir.path()).expect("open");
        {
            let txn = service.db.begin_write().expect("write");
            {
                let mut t = txn.open_table(ROWS).expect("table");
                for i in 0..300u32 {
                    t.insert(format!("k{i:04}").as_bytes(), vec![i as u8; (i % 7) as usize].as_slice())
                        .expect("insert");
                }
            }
            txn.commit().expect("commit");
        }
        let mut streamed = Vec::new();
        write_rows(&service.db.begin_read().expect("read"), &mut streamed).expect("write");
        let mut back = Vec::new();
        read_rows(&mut streamed.as_slice(), &mut |k, v| {
            back.push((k, v));
            Ok(())
        })
        .expect("read back");
        assert_eq!(back.len(), 300);
        assert_eq!(back[5], (b"k0005".to_vec(), vec![5u8; 5]));
        streamed.push(0);
        assert!(read_rows(&mut streamed.as_slice(), &mut |_, _| Ok(())).is_err(), "trailing bytes accepted");
        assert!(read_rows(&mut &streamed[..10], &mut |_, _| Ok(())).is_err(), "truncated data accepted");
    }
}
