//! The disk under the Raft log: a [`Journal`] of two ordered key spaces with
//! atomic batches and an explicit fsync.
//!
//! The log store ([`super::log_store`]) is written against this narrow
//! interface, so the same code runs on `fjall` in a member ([`FjallJournal`])
//! and on a model disk in the deterministic simulation (`tests/simulation.rs`),
//! which loses what was not synced when a member crashes.
//!
//! Contract an implementation keeps (and the log store relies on):
//! - A [`Journal::write`] batch is atomic and readable at once by every later
//!   call.
//! - Durability is sequential: a crash keeps every batch up to some point after
//!   the last completed [`Journal::sync`] and none after it (fjall's journal is
//!   one append-only file; the model keeps a prefix of the unsynced batches).
//!   So a sync makes every earlier batch durable, whoever wrote it.

use std::io;
use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

/// The two key spaces of a journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Space {
    /// Log entries by (group ‖ index).
    Log,
    /// Per-group records (vote, committed, purged, format) by (group ‖ name).
    Meta,
}

/// One change in a [`Journal::write`] batch.
#[derive(Debug, Clone)]
pub enum Op {
    Put(Space, Vec<u8>, Vec<u8>),
    Delete(Space, Vec<u8>),
}

/// Visits a key and its value; returns false to stop the scan.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> io::Result<bool> + 'a;

/// A node's journal (see the module docs for the contract).
pub trait Journal: Send + Sync + 'static {
    fn get(&self, space: Space, key: &[u8]) -> io::Result<Option<Vec<u8>>>;

    /// Visits the keys in `lo..=hi` of `space` in ascending order, until `visit`
    /// returns false.
    fn scan(&self, space: Space, lo: &[u8], hi: &[u8], visit: &mut Visit<'_>) -> io::Result<()>;

    /// The greatest key in `lo..=hi` of `space`, with its value.
    fn last(&self, space: Space, lo: &[u8], hi: &[u8]) -> io::Result<Option<(Vec<u8>, Vec<u8>)>>;

    /// Applies `ops` atomically.
    fn write(&self, ops: Vec<Op>) -> io::Result<()>;

    /// Makes every batch written so far durable.
    fn sync(&self) -> io::Result<()>;

    /// Whether the log store should hand its leader appends' fsyncs to a syncer
    /// thread (group commit; a real disk) rather than a tokio task (a model disk
    /// in the single-threaded simulation, where no thread may take part).
    fn sync_on_thread(&self) -> bool;
}

/// fjall's block cache (for log entries already flushed to tables; fjall's
/// default is 32 MiB). Replication reads recent entries, which are still in
/// the memtable.
const LOG_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Log bytes held in memory before fjall flushes them to a table file. fjall's
/// default, 64 MiB, kept that much of every member's log resident.
const LOG_MEMTABLE_BYTES: u64 = 8 * 1024 * 1024;

/// The journal of a member: a `fjall` database with keyspaces `log` and `meta`.
pub struct FjallJournal {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl FjallJournal {
    pub fn open(dir: &Path) -> io::Result<FjallJournal> {
        let db = Database::builder(dir).cache_size(LOG_CACHE_BYTES).open().map_err(io_err)?;
        let log = db
            .keyspace("log", || KeyspaceCreateOptions::default().max_memtable_size(LOG_MEMTABLE_BYTES))
            .map_err(io_err)?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default).map_err(io_err)?;
        Ok(FjallJournal { db, log, meta })
    }

    fn space(&self, space: Space) -> &Keyspace {
        match space {
            Space::Log => &self.log,
            Space::Meta => &self.meta,
        }
    }
}

impl Journal for FjallJournal {
    fn get(&self, space: Space, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        Ok(self.space(space).get(key).map_err(io_err)?.map(|v| v.to_vec()))
    }

    fn scan(&self, space: Space, lo: &[u8], hi: &[u8], visit: &mut Visit<'_>) -> io::Result<()> {
        for guard in self.space(space).range(lo..=hi) {
            let (k, v) = guard.into_inner().map_err(io_err)?;
            if !visit(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    fn last(&self, space: Space, lo: &[u8], hi: &[u8]) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        match self.space(space).range(lo..=hi).next_back() {
            None => Ok(None),
            Some(guard) => {
                let (k, v) = guard.into_inner().map_err(io_err)?;
                Ok(Some((k.to_vec(), v.to_vec())))
            }
        }
    }

    fn write(&self, ops: Vec<Op>) -> io::Result<()> {
        let mut batch = self.db.batch();
        for op in ops {
            match op {
                Op::Put(space, k, v) => batch.insert(self.space(space), k, v),
                Op::Delete(space, k) => batch.remove(self.space(space), k),
            }
        }
        batch.commit().map_err(io_err)
    }

    fn sync(&self) -> io::Result<()> {
        self.db.persist(PersistMode::SyncData).map_err(io_err)
    }

    fn sync_on_thread(&self) -> bool {
        true
    }
}
