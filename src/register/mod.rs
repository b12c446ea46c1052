//! A replicated register map: the Raft runtime's second service, small enough to
//! check by eye, used by the tests that run many groups per node.
//!
//! Keys name `u64` registers. Writes and compare-and-swaps go through the log;
//! reads are linearizable (a read barrier, then the local state). It exists to
//! show that the runtime's [`Service`] interface carries a state machine that is
//! not the etcd store, and to give multi-group tests a history a
//! linearizability checker understands.
//!
//! State: one redb file per group (`registers.redb`) holding the registers, the
//! applied log id and the membership, committed together per batch without an
//! fsync (the log is the durable record; a snapshot build makes the file durable
//! before the log is purged, as the etcd store does). A snapshot is every
//! register, bincode-encoded, in `snap/current` (the runtime's snapshot file
//! format): this service keeps few keys, so it is built and installed in memory.

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

const REGISTERS: TableDefinition<&str, u64> = TableDefinition::new("registers");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The last applied entry's log id (absent before any).
const META_APPLIED: &str = "applied";
const META_MEMBERSHIP: &str = "membership";

/// A register command (the body of a log entry).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RegisterCommand {
    Write {
        key: String,
        value: u64,
    },
    /// Writes `value` if the register holds `expect` (`None`: does not exist).
    Cas {
        key: String,
        expect: Option<u64>,
        value: u64,
    },
}

/// The reply to a [`RegisterCommand`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegisterReply {
    Written,
    /// Whether a compare-and-swap wrote.
    Swapped(bool),
    /// The body was no command (a bug or a corrupted log); nothing changed.
    Malformed(String),
}

fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(io::Error::other)
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    crate::consensus::decode_bounded(b).map(|(v, _)| v).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// The register map's state machine.
pub struct RegisterService {
    db: Arc<Database>,
    snap_path: PathBuf,
}

/// A snapshot's data: the number of registers, then each `(name, value)`, all
/// bincode (the encoding of a `Vec<(String, u64)>`), written and read one
/// register at a time.
fn write_registers(read: &redb::ReadTransaction, mut w: &mut dyn io::Write) -> io::Result<()> {
    use redb::ReadableTableMetadata;
    let table = read.open_table(REGISTERS).map_err(io_err)?;
    let config = bincode::config::standard();
    bincode::serde::encode_into_std_write(table.len().map_err(io_err)?, &mut w, config).map_err(io::Error::other)?;
    for row in table.iter().map_err(io_err)? {
        let (k, v) = row.map_err(io_err)?;
        bincode::serde::encode_into_std_write((k.value(), v.value()), &mut w, config).map_err(io::Error::other)?;
    }
    Ok(())
}

/// Most bytes one register of a snapshot may decode to (a register's name is a
/// client's key, under the request size limit).
const MAX_RECORD_BYTES: usize = 16 << 20;

/// Reads what [`write_registers`] wrote, handing each register to `each`.
fn read_registers(r: &mut dyn io::Read, each: &mut dyn FnMut(String, u64) -> io::Result<()>) -> io::Result<()> {
    let mut r = io::BufReader::new(r);
    let bad = |e: bincode::error::DecodeError| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    // Bounded: a register is a name and a number; a hostile length prefix must not
    // make the decoder allocate more (see `consensus::decode_bounded`).
    let config = bincode::config::standard().with_limit::<{ MAX_RECORD_BYTES }>();
    let count: u64 = bincode::serde::decode_from_std_read(&mut r, config).map_err(bad)?;
    for _ in 0..count {
        let (k, v): (String, u64) = bincode::serde::decode_from_std_read(&mut r, config).map_err(bad)?;
        each(k, v)?;
    }
    if io::Read::read(&mut r, &mut [0u8; 1])? != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "register snapshot: trailing bytes"));
    }
    Ok(())
}

impl RegisterService {
    /// Opens (or creates) the state in `dir`.
    pub fn open(dir: &Path) -> io::Result<RegisterService> {
        std::fs::create_dir_all(dir.join("snap"))?;
        let db = Database::create(dir.join("registers.redb")).map_err(io_err)?;
        let txn = db.begin_write().map_err(io_err)?;
        txn.open_table(REGISTERS).map_err(io_err)?;
        txn.open_table(META).map_err(io_err)?;
        txn.commit().map_err(io_err)?;
        let service = RegisterService { db: Arc::new(db), snap_path: dir.join("snap").join("current") };
        // A corrupt snapshot file is refused at start, not when a follower needs it.
        if let Some(snapshot) = service.current_snapshot_file()? {
            read_registers(&mut snapshot.snapshot.reader(), &mut |_, _| Ok(()))?;
        }
        Ok(service)
    }

    /// The state file, for reads.
    pub fn database(&self) -> Arc<Database> {
        self.db.clone()
    }

    fn current_snapshot_file(&self) -> io::Result<Option<Snapshot>> {
        Ok(read_snapshot_file(&self.snap_path)?.map(|(meta, snapshot)| Snapshot { meta, snapshot }))
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(META).map_err(io_err)?;
        let value = table.get(key).map_err(io_err)?;
        value.map(|v| decode(v.value())).transpose()
    }
}

fn apply_one(registers: &mut redb::Table<&str, u64>, cmd: RegisterCommand) -> io::Result<RegisterReply> {
    Ok(match cmd {
        RegisterCommand::Write { key, value } => {
            registers.insert(key.as_str(), value).map_err(io_err)?;
            RegisterReply::Written
        }
        RegisterCommand::Cas { key, expect, value } => {
            let current = registers.get(key.as_str()).map_err(io_err)?.map(|v| v.value());
            let swap = current == expect;
            if swap {
                registers.insert(key.as_str(), value).map_err(io_err)?;
            }
            RegisterReply::Swapped(swap)
        }
    })
}

impl Service for RegisterService {
    fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        Ok((self.read_meta(META_APPLIED)?, self.read_meta(META_MEMBERSHIP)?.unwrap_or_default()))
    }

    fn apply(&mut self, entries: &[Entry]) -> io::Result<Vec<Vec<u8>>> {
        let mut txn = self.db.begin_write().map_err(io_err)?;
        txn.set_durability(Durability::None).map_err(io_err)?;
        let mut replies = Vec::with_capacity(entries.len());
        {
            let mut registers = txn.open_table(REGISTERS).map_err(io_err)?;
            let mut meta = txn.open_table(META).map_err(io_err)?;
            for entry in entries {
                let reply = match &entry.payload {
                    EntryPayload::Blank => RegisterReply::Written,
                    EntryPayload::Normal(p) => match decode::<RegisterCommand>(&p.body) {
                        Ok(cmd) => apply_one(&mut registers, cmd)?,
                        Err(e) => RegisterReply::Malformed(e.to_string()),
                    },
                    EntryPayload::Membership(m) => {
                        let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                        meta.insert(META_MEMBERSHIP, encode(&stored)?.as_slice()).map_err(io_err)?;
                        RegisterReply::Written
                    }
                };
                replies.push(encode(&reply)?);
            }
            if let Some(last) = entries.last() {
                meta.insert(META_APPLIED, encode(&last.log_id)?.as_slice()).map_err(io_err)?;
            }
        }
        txn.commit().map_err(io_err)?;
        Ok(replies)
    }

    fn snapshot_builder(&mut self) -> Box<dyn SnapshotSource> {
        Box::new(RegisterSnapshots { db: self.db.clone(), path: self.snap_path.clone() })
    }

    /// Installs a snapshot a register at a time, in one transaction (a malformed
    /// snapshot aborts it and changes nothing).
    fn install_snapshot(&mut self, meta: &SnapshotMeta, data: SnapshotData) -> io::Result<()> {
        let mut txn = self.db.begin_write().map_err(io_err)?;
        txn.set_durability(Durability::Immediate).map_err(io_err)?;
        txn.delete_table(REGISTERS).map_err(io_err)?;
        {
            let mut registers = txn.open_table(REGISTERS).map_err(io_err)?;
            read_registers(&mut data.reader(), &mut |k, v| {
                registers.insert(k.as_str(), v).map_err(io_err)?;
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
        write_snapshot_file_with(&self.snap_path, meta, &mut |w| io::copy(&mut data.reader(), w).map(|_| ()))
            .map(|_| ())
    }

    fn current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        self.current_snapshot_file()
    }
}

/// Builds a register snapshot (see [`Service::snapshot_builder`]).
struct RegisterSnapshots {
    db: Arc<Database>,
    path: PathBuf,
}

impl SnapshotSource for RegisterSnapshots {
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
        let data_len = write_snapshot_file_with(&self.path, &meta, &mut |w| write_registers(&read, w))?;
        let header = self.path.metadata()?.len() - data_len;
        let snapshot = SnapshotFile::new(std::fs::File::open(&self.path)?, header, data_len);
        Ok(Snapshot { meta, snapshot })
    }
}

/// A register group on this member: propose and read.
#[derive(Clone)]
pub struct Registers {
    pub group: Group,
    db: Arc<Database>,
}

/// Why a register operation did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
    #[error("register state: {0}")]
    Storage(String),
    #[error("malformed register command: {0}")]
    Malformed(String),
}

impl Registers {
    /// Opens the register service's state in `dir` and starts its group on
    /// member `member`, over `log`.
    pub async fn start(
        member: MemberId,
        group_id: GroupId,
        dir: &Path,
        log: LogStore,
        config: &GroupConfig,
    ) -> Result<Registers, Box<dyn std::error::Error + Send + Sync>> {
        let service = RegisterService::open(dir)?;
        let db = service.database();
        let stats = Arc::new(crate::stats::GroupStats::default());
        let group = Group::start(member, group_id, log, Box::new(service), &dir.join("snap"), config, stats).await?;
        Ok(Registers { group, db })
    }

    async fn propose(&self, cmd: &RegisterCommand, timeout: Duration) -> Result<RegisterReply, RegisterError> {
        let body = encode(cmd).map_err(|e| RegisterError::Storage(e.to_string()))?;
        let reply = self.group.propose(body, false, timeout).await?;
        match decode::<RegisterReply>(&reply).map_err(|e| RegisterError::Storage(e.to_string()))? {
            RegisterReply::Malformed(why) => Err(RegisterError::Malformed(why)),
            reply => Ok(reply),
        }
    }

    pub async fn write(&self, key: &str, value: u64, timeout: Duration) -> Result<(), RegisterError> {
        self.propose(&RegisterCommand::Write { key: key.into(), value }, timeout).await.map(|_| ())
    }

    /// Writes `value` if the register holds `expect`; whether it did.
    pub async fn cas(
        &self,
        key: &str,
        expect: Option<u64>,
        value: u64,
        timeout: Duration,
    ) -> Result<bool, RegisterError> {
        match self.propose(&RegisterCommand::Cas { key: key.into(), expect, value }, timeout).await? {
            RegisterReply::Swapped(swapped) => Ok(swapped),
            other => Err(RegisterError::Storage(format!("a compare-and-swap answered {other:?}"))),
        }
    }

    /// A linearizable read: a read barrier, then this member's state.
    pub async fn read(&self, key: &str, timeout: Duration) -> Result<Option<u64>, RegisterError> {
        self.group.read_barrier(timeout).await?;
        let storage = |e: redb::Error| RegisterError::Storage(e.to_string());
        let txn = self.db.begin_read().map_err(|e| storage(e.into()))?;
        let table = txn.open_table(REGISTERS).map_err(|e| storage(e.into()))?;
        let value = table.get(key).map_err(|e| storage(e.into()))?;
        Ok(value.map(|v| v.value()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot's data is the bincode of the registers as a `Vec<(String,
    /// u64)>` (what snapshots written before streaming hold), and reads back.
    #[test]
    fn register_snapshots_stream_in_the_vec_encoding() {
        let dir = tempfile::tempdir().expect("tempdir");
        let service = RegisterService::open(dir.path()).expect("open");
        let expected: Vec<(String, u64)> = (0..300u64).map(|i| (format!("r{i:04}"), i * 7)).collect();
        {
            let txn = service.db.begin_write().expect("write");
            {
                let mut t = txn.open_table(REGISTERS).expect("table");
                for (k, v) in &expected {
                    t.insert(k.as_str(), *v).expect("insert");
                }
            }
            txn.commit().expect("commit");
        }
        let mut streamed = Vec::new();
        write_registers(&service.db.begin_read().expect("read"), &mut streamed).expect("write");
        assert_eq!(streamed, encode(&expected).expect("encode"));
        let mut back = Vec::new();
        read_registers(&mut streamed.as_slice(), &mut |k, v| {
            back.push((k, v));
            Ok(())
        })
        .expect("read back");
        assert_eq!(back, expected);
        streamed.push(0);
        assert!(read_registers(&mut streamed.as_slice(), &mut |_, _| Ok(())).is_err(), "trailing bytes accepted");
        assert!(read_registers(&mut &streamed[..10], &mut |_, _| Ok(())).is_err(), "truncated data accepted");
    }
}
