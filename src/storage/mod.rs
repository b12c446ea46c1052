//! The state-machine storage engine: one `redb` file per Raft group.
//!
//! Contract:
//! - Every table of a group lives in that group's single file, so one redb write
//!   transaction covers the data *and* the applied log id that produced it. A crash
//!   can therefore never leave data applied without the matching applied index.
//! - Apply transactions commit with `Durability::None` (no fsync); the Raft log is
//!   the durable record and entries after the last durable commit are re-applied on
//!   restart. [`Backend::persist`] makes everything durable and MUST run before the
//!   log is purged up to the state it covers (snapshot build does it).
//! - A snapshot is every table's rows, framed and protected by a CRC32; a snapshot
//!   that fails its checksum or framing is refused, never half-installed.

use std::path::Path;

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    TableHandle, WriteTransaction,
};

/// Small bookkeeping values: applied log id, membership, revisions, member attributes.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The live-key table of earlier versions (user key -> sub-revision ‖ `KeyValue`),
/// now always empty: which version of a key is live comes from `mvcc::index`, built
/// from [`HISTORY`]. It stays in the snapshot format so table ids keep their meaning;
/// rows in an older file or snapshot are dropped when it is opened or installed.
pub const RETIRED_LATEST: TableDefinition<&[u8], &[u8]> = TableDefinition::new("latest");
/// Every retained change, in revision order: main ‖ sub -> change record (the
/// encodings are `mvcc::records`'s).
pub const HISTORY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("changes");

/// The earlier layout's history, keyed by escaped user key ‖ main ‖ sub. Read only
/// by `mvcc::upgrade`, which converts a file or snapshot that still has it.
pub const LEGACY_HISTORY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("history");
/// The earlier layout's revision index (main ‖ sub -> user key); see [`LEGACY_HISTORY`].
pub const LEGACY_REVS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("revs");

/// Leases: id (big-endian i64) -> encoded lease record.
pub const LEASES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("leases");
/// Keys attached to leases: lease id (big-endian) ‖ user key -> empty.
pub const LEASE_KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("lease_keys");

/// A table of byte-string keys and values.
type ByteTable = TableDefinition<'static, &'static [u8], &'static [u8]>;

/// Tables in snapshot order. The position is the table's id in the snapshot format.
const BYTE_TABLES: [ByteTable; 4] = [RETIRED_LATEST, HISTORY, LEASES, LEASE_KEYS];

const SNAPSHOT_MAGIC: &[u8; 8] = b"CCSNAP02";
/// Snapshots of the earlier layout (history keyed by user key) and their tables.
/// Installing one leaves the legacy tables for `mvcc::upgrade` to convert.
const LEGACY_SNAPSHOT_MAGIC: &[u8; 8] = b"CCSNAP01";
const LEGACY_BYTE_TABLES: [ByteTable; 5] = [RETIRED_LATEST, LEGACY_HISTORY, LEGACY_REVS, LEASES, LEASE_KEYS];

/// Errors of the storage engine. Disk and corruption problems are values, not panics:
/// the caller decides whether the member can keep serving.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("snapshot is corrupt: {0}")]
    CorruptSnapshot(&'static str),
    #[error("state file {0} is corrupt: {1}")]
    CorruptFile(String, String),
}

impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::CorruptSnapshot(_) | StorageError::CorruptFile(..) => {
                std::io::Error::new(std::io::ErrorKind::InvalidData, e)
            }
            StorageError::Engine(_) => std::io::Error::other(e),
        }
    }
}

macro_rules! engine_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Engine(e.to_string())
            }
        }
    )*};
}
engine_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Memory redb may use per state file for its page cache and write buffer.
/// redb's default is 1 GiB, which a member filled with its whole file (RSS
/// tracked the data size: ~165 MiB after 90k puts of 256 B, vs ~95 MiB with
/// 16 MiB). Pages past it are read from the OS page cache with a syscall; in the
/// same run that cost ~5% of put throughput with 100k distinct keys.
pub const STATE_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// One group's state-machine file.
pub struct Backend {
    /// The open file. Replaced (never mutated) by [`Backend::swap_in`] after a
    /// defragmentation; transactions begun on the old file finish on it (redb
    /// closes it when the last one ends). A std lock: held only to clone the Arc.
    db: std::sync::RwLock<std::sync::Arc<Database>>,
    path: std::path::PathBuf,
}

impl Backend {
    /// Opens (or creates) the file. redb repairs an unclean shutdown from the last
    /// durable commit; then every page's checksum is verified (a full read of the
    /// file), so a bit flip or truncation is refused at start instead of served.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let corrupt = |e: String| StorageError::CorruptFile(path.display().to_string(), e);
        let mut db =
            redb::Builder::new().set_cache_size(STATE_CACHE_BYTES).create(path).map_err(|e| corrupt(e.to_string()))?;
        match db.check_integrity() {
            Ok(true) => {}
            Ok(false) => {
                return Err(corrupt("page checksums did not verify (redb rolled it back to an older commit)".into()))
            }
            Err(e) => return Err(corrupt(e.to_string())),
        }
        let backend = Backend { db: std::sync::RwLock::new(std::sync::Arc::new(db)), path: path.to_path_buf() };
        let txn = backend.db().begin_write()?;
        let retired_rows = {
            txn.open_table(META)?;
            for t in BYTE_TABLES {
                txn.open_table(t)?;
            }
            txn.open_table(RETIRED_LATEST)?.len()?
        };
        if retired_rows > 0 {
            txn.delete_table(RETIRED_LATEST)?;
            txn.open_table(RETIRED_LATEST)?;
        }
        txn.commit()?;
        Ok(backend)
    }

    fn db(&self) -> std::sync::Arc<Database> {
        self.db.read().expect("backend lock poisoned").clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes every row visible in `txn` into a new, densely packed file at `to`
    /// (replacing any file there) and returns it open. The live file keeps serving
    /// reads and writes meanwhile; rows go in sorted order in bounded batches.
    pub fn copy_compacted(txn: &ReadTransaction, to: &Path) -> Result<Database, StorageError> {
        const ROWS_PER_COMMIT: usize = 10_000;
        match std::fs::remove_file(to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::Engine(e.to_string())),
        }
        let db = redb::Builder::new().set_cache_size(STATE_CACHE_BYTES).create(to)?;
        let copy_table = |t: TableDefinition<&[u8], &[u8]>| -> Result<(), StorageError> {
            let source = txn.open_table(t)?;
            let mut rows = source.iter()?.peekable();
            while rows.peek().is_some() {
                let mut w = db.begin_write()?;
                w.set_durability(Durability::None)?;
                {
                    let mut out = w.open_table(t)?;
                    for row in rows.by_ref().take(ROWS_PER_COMMIT) {
                        let (k, v) = row?;
                        out.insert(k.value(), v.value())?;
                    }
                }
                w.commit()?;
            }
            Ok(())
        };
        for t in BYTE_TABLES {
            copy_table(t)?;
        }
        let mut w = db.begin_write()?;
        w.set_durability(Durability::Immediate)?;
        {
            let mut meta = w.open_table(META)?;
            for row in txn.open_table(META)?.iter()? {
                let (k, v) = row?;
                meta.insert(k.value(), v.value())?;
            }
            for t in BYTE_TABLES {
                w.open_table(t)?;
            }
        }
        w.commit()?;
        Ok(db)
    }

    /// Makes `db` (created by [`Backend::copy_compacted`] at `from`, with every
    /// applied change replayed into it) the state file: fsync, rename over the
    /// live file, fsync the directory, then serve from it.
    /// Crash points: before the rename the old file is intact (the leftover copy
    /// is removed at the next start); after it, the new file is complete.
    pub fn swap_in(&self, db: Database, from: &Path) -> Result<(), StorageError> {
        let io = |e: std::io::Error| StorageError::Engine(e.to_string());
        let mut w = db.begin_write()?;
        w.set_durability(Durability::Immediate)?;
        w.commit()?;
        std::fs::rename(from, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        *self.db.write().expect("backend lock poisoned") = std::sync::Arc::new(db);
        Ok(())
    }

    /// A write transaction that is durable when it commits (one fsync).
    pub fn begin_durable(&self) -> Result<WriteTransaction, StorageError> {
        let mut txn = self.db().begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.set_quick_repair(true);
        Ok(txn)
    }

    /// A write transaction for one apply batch: no fsync (see module docs).
    pub fn begin_apply(&self) -> Result<WriteTransaction, StorageError> {
        let mut txn = self.db().begin_write()?;
        txn.set_durability(Durability::None)?;
        Ok(txn)
    }

    pub fn begin_read(&self) -> Result<ReadTransaction, StorageError> {
        Ok(self.db().begin_read()?)
    }

    /// Makes every earlier commit durable (one fsync).
    pub fn persist(&self) -> Result<(), StorageError> {
        let mut txn = self.db().begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.set_quick_repair(true);
        txn.commit()?;
        Ok(())
    }

    /// Bytes the file occupies on disk (no transaction needed).
    pub fn file_size(&self) -> Result<u64, StorageError> {
        Ok(std::fs::metadata(&self.path).map_err(|e| StorageError::Engine(e.to_string()))?.len())
    }

    /// (bytes the file occupies on disk, bytes held by live data and metadata).
    /// Measuring live bytes takes a write transaction.
    pub fn sizes(&self) -> Result<(u64, u64), StorageError> {
        let on_disk = self.file_size()?;
        let txn = self.db().begin_write()?;
        let stats = txn.stats()?;
        txn.abort()?;
        Ok((on_disk, stats.stored_bytes() + stats.metadata_bytes()))
    }

    /// Serialises every table into one checksummed byte string.
    pub fn snapshot_bytes(txn: &ReadTransaction) -> Result<Vec<u8>, StorageError> {
        let mut out = Vec::new();
        encode_snapshot(txn, SNAPSHOT_MAGIC, &BYTE_TABLES, &mut out)?;
        Ok(out)
    }

    /// Writes what [`Backend::snapshot_bytes`] returns to `out`, a row at a time
    /// (never whole in memory).
    pub fn write_snapshot(txn: &ReadTransaction, out: &mut dyn std::io::Write) -> Result<(), StorageError> {
        encode_snapshot(txn, SNAPSHOT_MAGIC, &BYTE_TABLES, out)
    }

    /// A snapshot in the earlier layout's format (for tests of the conversion).
    #[cfg(test)]
    pub(crate) fn legacy_snapshot_bytes(txn: &ReadTransaction) -> Result<Vec<u8>, StorageError> {
        let mut out = Vec::new();
        encode_snapshot(txn, LEGACY_SNAPSHOT_MAGIC, &LEGACY_BYTE_TABLES, &mut out)?;
        Ok(out)
    }

    /// CRC32 over every row of every table, skipping META rows under `raft/`
    /// (applied log id and Raft membership, which depend on when a member last
    /// applied a no-op entry, not on the replicated state).
    pub fn state_hash(txn: &ReadTransaction) -> Result<u32, StorageError> {
        let mut h = crc32fast::Hasher::new();
        let mut row = |k: &[u8], v: &[u8]| {
            h.update(&(k.len() as u64).to_be_bytes());
            h.update(k);
            h.update(&(v.len() as u64).to_be_bytes());
            h.update(v);
        };
        for r in txn.open_table(META)?.iter()? {
            let (k, v) = r?;
            if !k.value().starts_with("raft/") {
                row(k.value().as_bytes(), v.value());
            }
        }
        for t in BYTE_TABLES {
            for r in txn.open_table(t)?.iter()? {
                let (k, v) = r?;
                row(k.value(), v.value());
            }
        }
        Ok(h.finalize())
    }

    /// Replaces the whole state with a snapshot, durably, in one transaction.
    /// The snapshot is fully validated before anything is changed. A snapshot of
    /// the earlier layout lands in the legacy tables: the caller converts them
    /// (`mvcc::upgrade`) before reading.
    pub fn install_snapshot(&self, data: &[u8]) -> Result<(), StorageError> {
        self.install_snapshot_from(&mut || Ok(Box::new(data)), data.len() as u64)
    }

    /// [`Backend::install_snapshot`] of a snapshot of `len` bytes read by
    /// `open` (called once per pass) a piece at a time, never whole in memory:
    /// a first pass verifies its checksum; the second parses it into one write
    /// transaction, which a malformed row aborts, so nothing changes unless the
    /// whole snapshot is good.
    pub fn install_snapshot_from<'r>(
        &self,
        open: &mut dyn FnMut() -> std::io::Result<Box<dyn std::io::Read + 'r>>,
        len: u64,
    ) -> Result<(), StorageError> {
        let defs = verify_snapshot_checksum(&mut *open().map_err(read_err)?, len)?;
        let txn = self.begin_durable()?;
        txn.delete_table(META)?;
        for t in BYTE_TABLES.iter().chain(&LEGACY_BYTE_TABLES) {
            txn.delete_table(*t)?;
        }
        {
            let mut meta = txn.open_table(META)?;
            let mut tables = defs.iter().map(|t| txn.open_table(*t)).collect::<Result<Vec<_>, _>>()?;
            let mut reader = open().map_err(read_err)?;
            scan_snapshot(&mut *reader, len, &mut |defs, table, k, v| {
                if table == 0 {
                    let k = std::str::from_utf8(k).map_err(|_| StorageError::CorruptSnapshot("meta key"))?;
                    meta.insert(k, v)?;
                } else if defs[table - 1].name() != RETIRED_LATEST.name() {
                    tables[table - 1].insert(k, v)?;
                }
                Ok(())
            })?;
        }
        txn.commit()?;
        Ok(())
    }
}

fn read_err(e: std::io::Error) -> StorageError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => StorageError::CorruptSnapshot("truncated"),
        _ => StorageError::Engine(e.to_string()),
    }
}

/// Writes `crc32 ‖ body` to `path` atomically and durably: temp file, fsync,
/// rename, fsync of the directory. A crash leaves the old file or the new one.
pub fn write_checksummed(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&crc32fast::hash(body).to_be_bytes())?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads a file written by [`write_checksummed`]: `None` if absent, an
/// `InvalidData` error if truncated or corrupted.
pub fn read_checksummed(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let mut bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if bytes.len() < 4 || crc32fast::hash(&bytes[4..]).to_be_bytes() != bytes[..4] {
        let msg = format!("{} is corrupt (checksum mismatch or truncated)", path.display());
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, msg));
    }
    bytes.drain(..4);
    Ok(Some(bytes))
}

/// A table's rows: (key, value) pairs.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

fn put_chunk(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// The snapshot *file* format streamed by `Maintenance.Snapshot`: `len ‖ snapshot ‖
/// zero padding ‖ sha256(all before)`, padded so the size is a multiple of 512
/// plus 32, which is what `etcdctl snapshot save` checks for.
pub fn encode_snapshot_file(snapshot: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut out = Vec::with_capacity(snapshot.len() + 8 + 512 + 32);
    out.extend_from_slice(&(snapshot.len() as u64).to_be_bytes());
    out.extend_from_slice(snapshot);
    out.resize(out.len().div_ceil(512) * 512, 0);
    let digest = sha2::Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// Verifies a snapshot file's sha256 and returns the snapshot inside it.
pub fn decode_snapshot_file(file: &[u8]) -> Result<&[u8], StorageError> {
    use sha2::Digest;
    if file.len() < 8 + 32 || !(file.len() - 32).is_multiple_of(512) {
        return Err(StorageError::CorruptSnapshot("file size is not a snapshot's (truncated?)"));
    }
    let (body, digest) = file.split_at(file.len() - 32);
    if sha2::Sha256::digest(body).as_slice() != digest {
        return Err(StorageError::CorruptSnapshot("sha256 checksum mismatch"));
    }
    let len = u64::from_be_bytes(body[..8].try_into().map_err(|_| StorageError::CorruptSnapshot("length"))?) as usize;
    let end =
        len.checked_add(8).filter(|e| *e <= body.len()).ok_or(StorageError::CorruptSnapshot("length exceeds file"))?;
    let snapshot = &body[8..end];
    if body[end..].iter().any(|b| *b != 0) {
        return Err(StorageError::CorruptSnapshot("non-zero padding"));
    }
    decode_snapshot(snapshot)?;
    Ok(snapshot)
}

/// Snapshot bytes on their way out, checksummed as they go.
struct SnapshotWriter<'a> {
    out: &'a mut dyn std::io::Write,
    crc: crc32fast::Hasher,
}

impl SnapshotWriter<'_> {
    fn put(&mut self, b: &[u8]) -> Result<(), StorageError> {
        self.crc.update(b);
        self.out.write_all(b).map_err(|e| StorageError::Engine(format!("writing a snapshot: {e}")))
    }

    fn chunk(&mut self, b: &[u8]) -> Result<(), StorageError> {
        self.put(&(b.len() as u32).to_be_bytes())?;
        self.put(b)
    }
}

/// Writes META and `tables`, in that order, after `magic`, with a CRC32 at the
/// end, to `out` a row at a time.
fn encode_snapshot(
    txn: &ReadTransaction,
    magic: &[u8; 8],
    tables: &[ByteTable],
    out: &mut dyn std::io::Write,
) -> Result<(), StorageError> {
    let mut w = SnapshotWriter { out, crc: crc32fast::Hasher::new() };
    w.put(magic)?;
    let meta = txn.open_table(META)?;
    w.put(&meta.len()?.to_be_bytes())?;
    for row in meta.iter()? {
        let (k, v) = row?;
        w.chunk(k.value().as_bytes())?;
        w.chunk(v.value())?;
    }
    for t in tables {
        let table = txn.open_table(*t)?;
        w.put(&table.len()?.to_be_bytes())?;
        for row in table.iter()? {
            let (k, v) = row?;
            w.chunk(k.value())?;
            w.chunk(v.value())?;
        }
    }
    let crc = w.crc.finalize();
    w.out.write_all(&crc.to_be_bytes()).map_err(|e| StorageError::Engine(format!("writing a snapshot: {e}")))
}

/// Checks the magic and the trailing CRC32 of a snapshot of `len` bytes read
/// from `r` (a piece at a time); returns the tables of its format.
fn verify_snapshot_checksum(r: &mut dyn std::io::Read, len: u64) -> Result<&'static [ByteTable], StorageError> {
    let short = StorageError::CorruptSnapshot("bad magic or too short");
    if len < SNAPSHOT_MAGIC.len() as u64 + 4 {
        return Err(short);
    }
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(read_err)?;
    let defs = snapshot_tables(&magic)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&magic);
    let mut left = len - 4 - magic.len() as u64;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        r.read_exact(&mut buf[..n]).map_err(read_err)?;
        crc.update(&buf[..n]);
        left -= n as u64;
    }
    let mut stored = [0u8; 4];
    r.read_exact(&mut stored).map_err(read_err)?;
    if crc.finalize() != u32::from_be_bytes(stored) {
        return Err(StorageError::CorruptSnapshot("checksum mismatch"));
    }
    Ok(defs)
}

/// Receives a snapshot's rows: the format's tables, the row's table (0 = META,
/// i + 1 = the i-th of them), key and value.
type RowVisitor<'a> = dyn FnMut(&'static [ByteTable], usize, &[u8], &[u8]) -> Result<(), StorageError> + 'a;

/// Parses a snapshot of `len` bytes read from `r`, handing each row to `row`
/// with the format's tables and the row's table (0 = META, i + 1 = the i-th of
/// them), in order. Bounds every allocation by the bytes left; checks the
/// structure and, at the end, the checksum (callers that must not act on a
/// corrupt snapshot verify it first, see [`verify_snapshot_checksum`]).
fn scan_snapshot(
    r: &mut dyn std::io::Read,
    len: u64,
    row: &mut RowVisitor<'_>,
) -> Result<&'static [ByteTable], StorageError> {
    struct Stream<'a> {
        r: &'a mut dyn std::io::Read,
        left: u64,
        crc: crc32fast::Hasher,
    }
    impl Stream<'_> {
        fn take(&mut self, buf: &mut Vec<u8>, n: u64) -> Result<(), StorageError> {
            if n > self.left {
                return Err(StorageError::CorruptSnapshot("truncated"));
            }
            buf.resize(n as usize, 0);
            self.r.read_exact(buf).map_err(read_err)?;
            self.crc.update(buf);
            self.left -= n;
            Ok(())
        }
        fn u64(&mut self, buf: &mut Vec<u8>) -> Result<u64, StorageError> {
            self.take(buf, 8)?;
            Ok(u64::from_be_bytes(buf[..8].try_into().map_err(|_| StorageError::CorruptSnapshot("truncated"))?))
        }
        fn chunk(&mut self, buf: &mut Vec<u8>) -> Result<(), StorageError> {
            self.take(buf, 4)?;
            let n = u32::from_be_bytes(buf[..4].try_into().map_err(|_| StorageError::CorruptSnapshot("truncated"))?);
            self.take(buf, u64::from(n))
        }
    }
    if len < SNAPSHOT_MAGIC.len() as u64 + 4 {
        return Err(StorageError::CorruptSnapshot("bad magic or too short"));
    }
    let mut s = Stream { r, left: len - 4, crc: crc32fast::Hasher::new() };
    let (mut key, mut value) = (Vec::new(), Vec::new());
    s.take(&mut key, SNAPSHOT_MAGIC.len() as u64)?;
    let defs = snapshot_tables(&key)?;
    for table in 0..1 + defs.len() {
        let n = s.u64(&mut key)?;
        for _ in 0..n {
            s.chunk(&mut key)?;
            s.chunk(&mut value)?;
            row(defs, table, &key, &value)?;
        }
    }
    if s.left != 0 {
        return Err(StorageError::CorruptSnapshot("trailing bytes"));
    }
    let mut stored = [0u8; 4];
    s.r.read_exact(&mut stored).map_err(read_err)?;
    if s.crc.finalize() != u32::from_be_bytes(stored) {
        return Err(StorageError::CorruptSnapshot("checksum mismatch"));
    }
    Ok(defs)
}

/// A snapshot (as [`Backend::snapshot_bytes`] makes) of the given rows: META's,
/// then `history`, `leases` and `lease_keys` (each sorted by key).
pub fn snapshot_from_rows(meta: &[(String, Vec<u8>)], history: &Rows, leases: &Rows, lease_keys: &Rows) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&(meta.len() as u64).to_be_bytes());
    for (k, v) in meta {
        put_chunk(&mut out, k.as_bytes());
        put_chunk(&mut out, v);
    }
    let retired = Rows::new();
    for rows in [&retired, history, leases, lease_keys] {
        out.extend_from_slice(&(rows.len() as u64).to_be_bytes());
        for (k, v) in rows {
            put_chunk(&mut out, k);
            put_chunk(&mut out, v);
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// The tables of a snapshot, by its magic: this layout's or the earlier one's.
fn snapshot_tables(data: &[u8]) -> Result<&'static [ByteTable], StorageError> {
    match data.get(..SNAPSHOT_MAGIC.len()) {
        Some(m) if m == SNAPSHOT_MAGIC => Ok(&BYTE_TABLES),
        Some(m) if m == LEGACY_SNAPSHOT_MAGIC => Ok(&LEGACY_BYTE_TABLES),
        _ => Err(StorageError::CorruptSnapshot("bad magic or too short")),
    }
}

/// The rows of table `def` in `tables` (what [`decode_snapshot`] returned for
/// `data`), if the snapshot's format has that table.
pub fn snapshot_rows<'t>(data: &[u8], tables: &'t [Rows], def: ByteTable) -> Option<&'t Rows> {
    let i = snapshot_tables(data).ok()?.iter().position(|t| t.name() == def.name())?;
    tables.get(i + 1)
}

/// Parses and verifies a snapshot produced by [`Backend::snapshot_bytes`] (or by
/// the earlier layout's): META's rows, then each table's in [`snapshot_tables`] order.
pub fn decode_snapshot(data: &[u8]) -> Result<Vec<Rows>, StorageError> {
    verify_snapshot_checksum(&mut &data[..], data.len() as u64)?;
    let mut tables: Vec<Rows> = Vec::new();
    let defs = scan_snapshot(&mut &data[..], data.len() as u64, &mut |defs, table, k, v| {
        if tables.is_empty() {
            tables.resize(1 + defs.len(), Rows::new());
        }
        tables[table].push((k.to_vec(), v.to_vec()));
        Ok(())
    })?;
    tables.resize(1 + defs.len(), Rows::new());
    Ok(tables)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_flipped_byte_in_the_state_file_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let marker = b"concord-corruption-marker-value";
        {
            let b = Backend::open(&path).unwrap();
            let txn = b.begin_apply().unwrap();
            {
                let mut t = txn.open_table(HISTORY).unwrap();
                for i in 0..100u32 {
                    t.insert(i.to_be_bytes().as_slice(), marker.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
            b.persist().unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(marker.len()).position(|w| w == marker).expect("marker on disk");
        bytes[at + 3] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let err = Backend::open(&path).err().expect("corruption detected");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    use super::*;

    #[test]
    fn checksummed_files_refuse_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        assert!(read_checksummed(&p).unwrap().is_none());
        write_checksummed(&p, b"hello").unwrap();
        assert_eq!(read_checksummed(&p).unwrap().unwrap(), b"hello");
        let good = std::fs::read(&p).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 1;
            std::fs::write(&p, &bad).unwrap();
            assert!(read_checksummed(&p).is_err(), "flip at {i} accepted");
        }
        std::fs::write(&p, &good[..3]).unwrap();
        assert!(read_checksummed(&p).is_err());
    }

    #[test]
    fn snapshot_round_trip_and_corruption_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Backend::open(&dir.path().join("a.db")).unwrap();
        {
            let txn = a.begin_apply().unwrap();
            {
                let mut t = txn.open_table(HISTORY).unwrap();
                t.insert(b"k".as_slice(), b"v".as_slice()).unwrap();
                // What an earlier version kept there: dropped by install.
                let mut retired = txn.open_table(RETIRED_LATEST).unwrap();
                retired.insert(b"k".as_slice(), b"old".as_slice()).unwrap();
                let mut m = txn.open_table(META).unwrap();
                m.insert("rev", 7i64.to_be_bytes().as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let snap = Backend::snapshot_bytes(&a.begin_read().unwrap()).unwrap();
        let b = Backend::open(&dir.path().join("b.db")).unwrap();
        b.install_snapshot(&snap).unwrap();
        let r = b.begin_read().unwrap();
        assert_eq!(r.open_table(HISTORY).unwrap().get(b"k".as_slice()).unwrap().unwrap().value(), b"v");
        assert!(r.open_table(RETIRED_LATEST).unwrap().is_empty().unwrap());
        drop(r);
        // An older file's rows there are dropped when it is opened.
        drop(a);
        let a = Backend::open(&dir.path().join("a.db")).unwrap();
        assert!(a.begin_read().unwrap().open_table(RETIRED_LATEST).unwrap().is_empty().unwrap());

        for i in [0, 9, snap.len() / 2, snap.len() - 1] {
            let mut bad = snap.clone();
            bad[i] ^= 0x40;
            assert!(decode_snapshot(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(decode_snapshot(&snap[..snap.len() - 3]).is_err());
    }

    /// The streamed snapshot is byte for byte the in-memory one; a streamed
    /// install refuses a corrupt, truncated or malformed (checksum intact)
    /// snapshot and leaves the state as it was.
    #[test]
    fn streamed_snapshots_match_and_bad_ones_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = Backend::open(&dir.path().join("a.db")).unwrap();
        {
            let txn = a.begin_apply().unwrap();
            {
                let mut t = txn.open_table(HISTORY).unwrap();
                for i in 0..2000u32 {
                    t.insert(i.to_be_bytes().as_slice(), vec![7u8; 100].as_slice()).unwrap();
                }
                let mut m = txn.open_table(META).unwrap();
                m.insert("rev", 7i64.to_be_bytes().as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let snap = Backend::snapshot_bytes(&a.begin_read().unwrap()).unwrap();
        let mut streamed = Vec::new();
        Backend::write_snapshot(&a.begin_read().unwrap(), &mut streamed).unwrap();
        assert_eq!(streamed, snap);

        let b = Backend::open(&dir.path().join("b.db")).unwrap();
        let install = |data: &[u8], len: u64| b.install_snapshot_from(&mut || Ok(Box::new(data)), len);
        let hash = || Backend::state_hash(&b.begin_read().unwrap()).unwrap();
        let empty = hash();
        let mut flipped = snap.clone();
        flipped[snap.len() / 2] ^= 1;
        assert!(matches!(install(&flipped, snap.len() as u64), Err(StorageError::CorruptSnapshot(_))));
        assert!(matches!(install(&snap[..snap.len() - 10], snap.len() as u64), Err(StorageError::CorruptSnapshot(_))));
        // A row longer than the snapshot, under a valid checksum.
        let mut malformed = SNAPSHOT_MAGIC.to_vec();
        malformed.extend_from_slice(&1u64.to_be_bytes());
        malformed.extend_from_slice(&u32::MAX.to_be_bytes());
        malformed.extend_from_slice(&crc32fast::hash(&malformed).to_be_bytes());
        assert!(matches!(install(&malformed, malformed.len() as u64), Err(StorageError::CorruptSnapshot(_))));
        assert_eq!(hash(), empty, "a refused snapshot changed the state");
        install(&snap, snap.len() as u64).unwrap();
        assert_eq!(hash(), Backend::state_hash(&a.begin_read().unwrap()).unwrap());
    }
}
