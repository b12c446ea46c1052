//! The durable Raft log: one journal shared by every group of the member
//! (`fjall` in a member, a model disk in the simulation: see [`super::journal`]).
//!
//! Layout: key space `log` maps (group id ‖ index, both big-endian) to a record
//! `crc32 ‖ bincode(entry)`; keyspace `meta` maps (group id ‖ name) to the vote,
//! the committed log id and the last purged log id. Keying by group lets later
//! multi-group members share one journal, so one fsync covers many groups.
//!
//! Ordering rules relied upon:
//! - An append is acknowledged to openraft (the `IOFlushed` callback) only after an
//!   fsync ([`Journal::sync`]) that covers it. Appends are written to the journal
//!   immediately (readable at once). The leader's appends are fsynced by a single
//!   syncer (a thread; a task on a model disk), once per batch of waiting callbacks
//!   (group commit), in parallel
//!   with replication; a follower's append is fsynced by the call itself (see
//!   [`LogStore::append`]).
//! - The vote is fsynced before `save_vote` returns: a member must never forget a
//!   vote it granted.
//! - Truncation and purge need no fsync of their own: the journal is sequential, so
//!   the next fsync (which precedes any acknowledgement that depends on them) covers
//!   them. A purge lost in a crash only leaves extra entries behind.
//! - A record whose checksum does not match is an I/O error, never an entry.
//! - Entry format: each group's meta records the format its entries are written
//!   in ([`ENTRY_FORMAT`]). A log without the mark holds entries of the release
//!   before the runtime's service-neutral entries; it opens only after its
//!   service converted it ([`NodeLog::upgrade_legacy`]: all entries rewritten
//!   and the mark set in one batch, fsynced, so a crash leaves the old log or the
//!   new one). An empty log is marked on open; the mark needs no fsync of its
//!   own, as any entry appended after it is fsynced with it.
//!
//! Recent entries: the last appended entries are also kept decoded in memory
//! ([`Recent`], bounded by [`MAX_RECENT_ENTRIES`] and [`MAX_RECENT_BYTES`]).
//! Replication (once per follower) and apply read each entry right after it was
//! appended; from memory that read skips the journal lookup, the checksum and the
//! decode (~4% of a leader's CPU under put load). The cache only ever holds a
//! contiguous run that ends at the last appended entry, and it changes under the
//! same calls that change the journal (append, truncate, purge), so a read it
//! answers returns what the journal would.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{OptionalSend, RaftLogReader};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::journal::{FjallJournal, Journal, Op, Space};
use super::TypeConfig;

type C = TypeConfig;
/// A log id that may be absent (an empty log, nothing purged).
type OptionalLogId = Option<LogIdOf<C>>;

/// The format of the entries a group's log holds: `Entry<TypeConfig>` whose
/// commands are [`super::service::Proposal`]s. (Logs from before hold etcd
/// commands directly and carry no mark.)
pub const ENTRY_FORMAT: u32 = 2;

/// Meta name of a group's entry format mark.
const META_FORMAT: &str = "format";

/// Most callbacks one fsync acknowledges; bounds the syncer's batch memory.
const MAX_SYNC_BATCH: usize = 4096;

/// Most entries [`Recent`] keeps: ~0.4 s of writes at 10,000 puts/s, far more
/// than replication or apply lag behind a healthy member.
const MAX_RECENT_ENTRIES: usize = 4096;

/// Most encoded bytes [`Recent`] keeps (large entries leave it sooner).
const MAX_RECENT_BYTES: usize = 8 * 1024 * 1024;

/// The most recently appended entries, decoded, with their encoded sizes: a
/// contiguous run of indexes ending at the last appended entry (or empty).
#[derive(Default)]
struct Recent {
    entries: VecDeque<(EntryOf<C>, usize)>,
    bytes: usize,
}

impl Recent {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index())
    }

    fn push(&mut self, entry: EntryOf<C>, size: usize) {
        let index = entry.log_id.index();
        // openraft truncates a conflicting suffix before it appends over it, and
        // purges only below what it appends next, so the run stays contiguous;
        // these two cases are a safety net that keeps the invariant regardless.
        self.truncate(index);
        if self.entries.back().is_some_and(|(e, _)| e.log_id.index() + 1 != index) {
            self.entries.clear();
            self.bytes = 0;
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.entries.len() > MAX_RECENT_ENTRIES || (self.bytes > MAX_RECENT_BYTES && self.entries.len() > 1) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }

    /// Drops the entries at `from` and after (truncation).
    fn truncate(&mut self, from: u64) {
        while self.entries.back().is_some_and(|(e, _)| e.log_id.index() >= from) {
            let (_, size) = self.entries.pop_back().expect("checked non-empty");
            self.bytes -= size;
        }
    }

    /// Drops the entries up to and including `upto` (purge).
    fn purge(&mut self, upto: u64) {
        while self.first_index().is_some_and(|i| i <= upto) {
            self.pop_front();
        }
    }

    /// The entries in `start..end`, if the run holds every entry the log has from
    /// `start` on (it ends at the last appended entry).
    fn read(&self, start: u64, end: Bound<u64>) -> Option<Vec<EntryOf<C>>> {
        let first = self.first_index()?;
        if start < first {
            return None;
        }
        let skip = usize::try_from(start - first).ok()?;
        let wanted = |i: u64| match end {
            Bound::Included(e) => i <= e,
            Bound::Excluded(e) => i < e,
            Bound::Unbounded => true,
        };
        Some(
            self.entries
                .iter()
                .skip(skip)
                .take_while(|(e, _)| wanted(e.log_id.index()))
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

/// One node's journal and the syncer that every group's [`LogStore`] on the
/// node shares (see [`NodeLog`]).
struct NodeJournal {
    disk: Arc<dyn Journal>,
    /// Where fsync timings go.
    stats: Arc<crate::stats::GroupStats>,
    /// Hands append callbacks to the syncer; bounded so a slow disk pushes back
    /// on the Raft cores instead of growing memory.
    sync_tx: SyncQueue,
    /// The groups with an open [`LogStore`]: at most one store per group, or two
    /// handles would keep different views of the same keys.
    open_groups: Mutex<std::collections::HashSet<u64>>,
}

/// Where a leader's append callbacks wait for the syncer's fsync.
enum SyncQueue {
    Thread(mpsc::SyncSender<IOFlushed<C>>),
    Task(tokio::sync::mpsc::Sender<IOFlushed<C>>),
}

struct Inner {
    journal: Arc<NodeJournal>,
    group: u64,
    /// This member's id: tells a follower's append (entries of another leader)
    /// from the leader's own (see [`LogStore::append`]).
    member: u64,
    /// See [`Recent`]. A std mutex: held only to copy entries, never across an await.
    recent: Mutex<Recent>,
    /// The index of the last entry appended (0 for none), set before the append
    /// is acknowledged, and the last commit index saved: what a leader's
    /// replication streams read (see [`LogProgress`]).
    tail: Arc<AtomicU64>,
    committed: tokio::sync::watch::Sender<u64>,
}

/// How far a leader's log has been appended and committed, for its replication
/// streams: they tell from it whether the next AppendEntries can carry entries or
/// only a new commit index (see `network::Window::acquire`).
#[derive(Clone)]
pub struct LogProgress {
    tail: Arc<AtomicU64>,
    committed: tokio::sync::watch::Receiver<u64>,
}

impl LogProgress {
    /// The index of the last entry appended.
    pub fn tail(&self) -> u64 {
        self.tail.load(Ordering::Acquire)
    }

    /// The last commit index saved; this receiver has now seen it.
    pub fn committed(&mut self) -> u64 {
        *self.committed.borrow_and_update()
    }

    /// Waits for a commit index this receiver has not seen; false once the log
    /// store is gone.
    pub async fn committed_changed(&mut self) -> bool {
        self.committed.changed().await.is_ok()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.journal.open_groups.lock().expect("open groups poisoned").remove(&self.group);
    }
}

/// A node's Raft log journal, shared by the log stores of all its groups: one
/// fsync (the syncer's, or a follower append's) covers the appends of every group
/// made before it (group commit across groups). Cheap to clone.
#[derive(Clone)]
pub struct NodeLog {
    journal: Arc<NodeJournal>,
}

impl NodeLog {
    /// Opens the `fjall` journal at `dir` (see [`NodeLog::with_journal`]).
    pub fn open(dir: &Path, stats: Arc<crate::stats::GroupStats>) -> io::Result<NodeLog> {
        NodeLog::with_journal(Arc::new(FjallJournal::open(dir)?), stats)
    }

    /// The node's log on `disk`, starting its syncer (a thread, or a tokio task
    /// for a disk that asks for one, which needs a tokio runtime; either ends when
    /// the last handle on the journal is dropped). Fsync timings go to `stats`.
    pub fn with_journal(disk: Arc<dyn Journal>, stats: Arc<crate::stats::GroupStats>) -> io::Result<NodeLog> {
        let (syncer_disk, syncer_stats) = (disk.clone(), stats.clone());
        let sync_tx = if disk.sync_on_thread() {
            let (tx, rx) = mpsc::sync_channel::<IOFlushed<C>>(MAX_SYNC_BATCH);
            std::thread::Builder::new()
                .name("log-sync".into())
                .spawn(move || syncer_thread(syncer_disk, rx, syncer_stats))?;
            SyncQueue::Thread(tx)
        } else {
            let (tx, rx) = tokio::sync::mpsc::channel::<IOFlushed<C>>(MAX_SYNC_BATCH);
            tokio::spawn(syncer_task(syncer_disk, rx, syncer_stats));
            SyncQueue::Task(tx)
        };
        let journal = NodeJournal { disk, stats, sync_tx, open_groups: Mutex::default() };
        Ok(NodeLog { journal: Arc::new(journal) })
    }

    /// The log store of `group` on member `member`; refused while that group's
    /// store is open already, or when the log is not in [`ENTRY_FORMAT`].
    pub fn group(&self, group: u64, member: u64) -> io::Result<LogStore> {
        let store = self.open_store(group, member)?;
        match store.get_meta::<u32>(META_FORMAT)? {
            Some(ENTRY_FORMAT) => {}
            Some(other) => {
                let why = format!("the log of raft group {group} holds entries in format {other}, unknown here");
                return Err(io::Error::new(io::ErrorKind::InvalidData, why));
            }
            None if store.has_entries()? => {
                let why = format!("the log of raft group {group} was written by an earlier release and not converted");
                return Err(io::Error::new(io::ErrorKind::InvalidData, why));
            }
            None => store.put_meta(META_FORMAT, &ENTRY_FORMAT)?,
        }
        store.inner.tail.store(store.last_index()?, Ordering::Release);
        Ok(store)
    }

    /// Converts the log of `group` from the entries of the release before
    /// [`ENTRY_FORMAT`] with `convert` (given a record's payload, the entry it
    /// becomes), unless it is marked converted already. Returns how many entries
    /// were converted. Run before the group's store is opened.
    pub fn upgrade_legacy(&self, group: u64, convert: &dyn Fn(&[u8]) -> io::Result<EntryOf<C>>) -> io::Result<u64> {
        let store = self.open_store(group, 0)?;
        if store.get_meta::<u32>(META_FORMAT)?.is_some() || !store.has_entries()? {
            return Ok(0);
        }
        let mut batch = Vec::new();
        store.scan_log(0, u64::MAX, &mut |k, v| {
            let entry = convert(unseal("log entry", v)?)?;
            batch.push(Op::Put(Space::Log, k.to_vec(), seal(&encode(&entry)?)));
            Ok(true)
        })?;
        let n = batch.len() as u64;
        batch.push(Op::Put(Space::Meta, store.meta_key(META_FORMAT), seal(&encode(&ENTRY_FORMAT)?)));
        store.disk().write(batch)?;
        store.sync()?;
        Ok(n)
    }

    /// Deletes everything `group`'s log holds (entries, vote, marks), for a group
    /// this node no longer hosts; refused while its store is open. Fsynced: a
    /// removal lost in a crash would only leave unused keys, but a group created
    /// again under the same id must not find the old vote.
    pub fn remove_group(&self, group: u64) -> io::Result<()> {
        let store = self.open_store(group, 0)?;
        let mut batch = Vec::new();
        store.scan_log(0, u64::MAX, &mut |k, _| {
            batch.push(Op::Delete(Space::Log, k.to_vec()));
            Ok(true)
        })?;
        let (lo, hi) = (group.to_be_bytes(), (group + 1).to_be_bytes());
        store.disk().scan(Space::Meta, &lo, &hi, &mut |k, _| {
            if k.starts_with(&lo) {
                batch.push(Op::Delete(Space::Meta, k.to_vec()));
            }
            Ok(true)
        })?;
        store.disk().write(batch)?;
        store.sync()
    }

    /// A store on `group`'s keys that has read no entry yet, registered as open.
    fn open_store(&self, group: u64, member: u64) -> io::Result<LogStore> {
        if !self.journal.open_groups.lock().expect("open groups poisoned").insert(group) {
            let why = format!("the log of raft group {group} is open already");
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, why));
        }
        let (tail, committed) = (Arc::default(), tokio::sync::watch::Sender::new(0));
        let inner = Inner { journal: self.journal.clone(), group, member, recent: Mutex::default(), tail, committed };
        Ok(LogStore { inner: Arc::new(inner) })
    }
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
    let (v, _) =
        crate::consensus::decode_bounded(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
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
    /// Opens a journal of its own at `dir` for `group` of member `member` (see
    /// [`NodeLog`] for a journal shared by several groups).
    pub fn open(dir: &Path, group: u64, member: u64, stats: Arc<crate::stats::GroupStats>) -> io::Result<LogStore> {
        NodeLog::open(dir, stats)?.group(group, member)
    }

    /// How far this log has been appended and committed, kept current by every
    /// append, truncation and saved commit index.
    pub fn progress(&self) -> LogProgress {
        LogProgress { tail: self.inner.tail.clone(), committed: self.inner.committed.subscribe() }
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

    fn disk(&self) -> &dyn Journal {
        &*self.inner.journal.disk
    }

    /// Visits this group's stored records with indexes in `lo..=hi`, in order.
    fn scan_log(&self, lo: u64, hi: u64, visit: &mut super::journal::Visit<'_>) -> io::Result<()> {
        self.disk().scan(Space::Log, &self.log_key(lo), &self.log_key(hi), visit)
    }

    fn get_meta<T: DeserializeOwned>(&self, name: &str) -> io::Result<Option<T>> {
        match self.disk().get(Space::Meta, &self.meta_key(name))? {
            None => Ok(None),
            Some(v) => Ok(Some(decode(unseal(name, &v)?)?)),
        }
    }

    fn put_meta<T: Serialize>(&self, name: &str, v: &T) -> io::Result<()> {
        self.disk().write(vec![Op::Put(Space::Meta, self.meta_key(name), seal(&encode(v)?))])
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.inner.recent.lock().expect("recent entries lock poisoned")
    }

    fn sync(&self) -> io::Result<()> {
        self.disk().sync()
    }

    /// Whether the log holds any entry (read without decoding one).
    fn has_entries(&self) -> io::Result<bool> {
        Ok(self.disk().last(Space::Log, &self.log_key(0), &self.log_key(u64::MAX))?.is_some())
    }

    fn last_entry_log_id(&self) -> io::Result<Option<LogIdOf<C>>> {
        match self.disk().last(Space::Log, &self.log_key(0), &self.log_key(u64::MAX))? {
            None => Ok(None),
            Some((_, v)) => Ok(Some(decode_entry(&v)?.log_id)),
        }
    }

    /// The index of the last entry the log holds or has purged (0 when empty).
    pub fn last_index(&self) -> io::Result<u64> {
        Ok(self.log_state()?.1.map_or(0, |l| l.index()))
    }

    /// (last purged, last) log ids. An entry at or below the purge mark is not
    /// in the log (see [`LogStore::finish_purge`]): the last log id is the last
    /// entry's only when it is above the mark.
    fn log_state(&self) -> io::Result<(OptionalLogId, OptionalLogId)> {
        let purged: Option<LogIdOf<C>> = self.get_meta("purged")?;
        let last = match (self.last_entry_log_id()?, purged) {
            (Some(entry), Some(mark)) if entry.index() <= mark.index() => Some(mark),
            (entry, mark) => entry.or(mark),
        };
        Ok((purged, last))
    }

    /// Removes the entries at or below the purge mark that a crash left behind.
    /// Crash point: `purge` writes its mark, then removes the entries, neither
    /// synced; a crash can keep the mark and lose the removal. Entries below the
    /// mark may then remain, even as the whole log when the purge followed a
    /// snapshot install past everything this member held (found by the
    /// simulation, seed 1796649313877716617): they are never read, but they
    /// must not count as the log's end, nor sit below later entries as a gap.
    fn finish_purge(&self) -> io::Result<()> {
        let Some(mark) = self.get_meta::<LogIdOf<C>>("purged")? else { return Ok(()) };
        let mut below = false;
        self.scan_log(0, mark.index(), &mut |_, _| {
            below = true;
            Ok(false)
        })?;
        if below {
            tracing::info!(
                group = self.inner.group,
                purged = mark.index(),
                "removing entries an interrupted purge left"
            );
            self.remove_entries(0, mark.index())?;
        }
        Ok(())
    }

    /// Removes the entries with indexes in `lo..=hi`, in one batch.
    fn remove_entries(&self, lo: u64, hi: u64) -> io::Result<()> {
        let mut batch = Vec::new();
        self.scan_log(lo, hi, &mut |k, _| {
            batch.push(Op::Delete(Space::Log, k.to_vec()));
            Ok(true)
        })?;
        self.disk().write(batch)
    }

    /// Verifies every stored record's checksum; run at startup so a corrupted log
    /// is refused before the member serves anything.
    pub fn verify(&self) -> io::Result<u64> {
        self.finish_purge()?;
        let mut n = 0;
        let mut expect: Option<u64> = None;
        self.scan_log(0, u64::MAX, &mut |k, v| {
            let entry = decode_entry(v)?;
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
            Ok(true)
        })?;
        Ok(n)
    }
}

/// An fsync of the journal, timed for `/metrics`.
fn timed_fsync(disk: &dyn Journal, stats: &crate::stats::GroupStats) -> io::Result<()> {
    let started = std::time::Instant::now();
    let result = disk.sync();
    stats.wal_fsync.observe(started.elapsed());
    result
}

/// One fsync for `first` and the callbacks waiting behind it (taken from `more`
/// until it has none, at most [`MAX_SYNC_BATCH`] in all), and their
/// acknowledgement. A failed fsync is reported to openraft, which stops the group:
/// a member whose log cannot be made durable must not keep acknowledging. Returns
/// whether the fsync worked.
fn sync_batch(
    disk: &dyn Journal,
    first: IOFlushed<C>,
    more: &mut dyn FnMut() -> Option<IOFlushed<C>>,
    stats: &crate::stats::GroupStats,
) -> bool {
    let mut batch = vec![first];
    while batch.len() < MAX_SYNC_BATCH {
        match more() {
            Some(cb) => batch.push(cb),
            None => break,
        }
    }
    let result = timed_fsync(disk, stats);
    for cb in batch {
        match &result {
            Ok(()) => cb.io_completed(Ok(())),
            Err(e) => cb.io_completed(Err(io_err(e))),
        }
    }
    if let Err(e) = &result {
        tracing::error!("log fsync failed: {e}; the raft group stops");
    }
    result.is_ok()
}

/// The syncer on a thread: acknowledges appends, one fsync per batch of waiting
/// callbacks.
fn syncer_thread(disk: Arc<dyn Journal>, rx: mpsc::Receiver<IOFlushed<C>>, stats: Arc<crate::stats::GroupStats>) {
    while let Ok(first) = rx.recv() {
        if !sync_batch(&*disk, first, &mut || rx.try_recv().ok(), &stats) {
            return;
        }
    }
}

/// The syncer as a tokio task (see [`Journal::sync_on_thread`]).
async fn syncer_task(
    disk: Arc<dyn Journal>,
    mut rx: tokio::sync::mpsc::Receiver<IOFlushed<C>>,
    stats: Arc<crate::stats::GroupStats>,
) {
    while let Some(first) = rx.recv().await {
        if !sync_batch(&*disk, first, &mut || rx.try_recv().ok(), &stats) {
            return;
        }
    }
}

/// How the groups of [`measure_appends`] keep their logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalLayout {
    /// One [`NodeLog`] shared by every group.
    Shared,
    /// A journal per group (what a node would have without [`NodeLog`]).
    PerGroup,
}

/// What one [`measure_appends`] run did.
#[derive(Debug, Clone, Copy)]
pub struct AppendRun {
    pub entries: u64,
    pub elapsed: std::time::Duration,
    pub fsyncs: u64,
}

/// Durable appends as a node's Raft cores make them, timed (`concord bench-log`):
/// `groups` groups each append `entries_per_group` entries of `value_bytes` as
/// leader, one entry at a time, each waiting for its fsync before the next, all
/// groups at once; with `groups` = 1 the group appends `batch` entries at a time
/// instead (a leader's batch of concurrent writes). Runs in `dir`.
pub async fn measure_appends(
    dir: &Path,
    layout: JournalLayout,
    groups: u64,
    entries_per_group: u64,
    batch: u64,
    value_bytes: usize,
) -> io::Result<AppendRun> {
    use openraft::entry::RaftEntry;
    use openraft::type_config::TypeConfigExt;
    let stats = Arc::new(crate::stats::GroupStats::default());
    let shared = match layout {
        JournalLayout::Shared => Some(NodeLog::open(&dir.join("shared"), stats.clone())?),
        JournalLayout::PerGroup => None,
    };
    let mut stores = Vec::new();
    for g in 1..=groups {
        stores.push(match &shared {
            Some(node) => node.group(g, 1)?,
            None => NodeLog::open(&dir.join(format!("group-{g}")), stats.clone())?.group(g, 1)?,
        });
    }
    let value = vec![0x5a; value_bytes];
    let started = std::time::Instant::now();
    let writers = stores.into_iter().map(|mut store| {
        let value = value.clone();
        tokio::spawn(async move {
            let mut next = 1;
            while next <= entries_per_group {
                let last = (next + batch.max(1) - 1).min(entries_per_group);
                let entries: Vec<EntryOf<C>> = (next..=last)
                    .map(|i| {
                        let log_id = openraft::testing::common::log_id::<C>(1, 1, i);
                        EntryOf::<C>::new_normal(log_id, super::service::Proposal { origin: None, body: value.clone() })
                    })
                    .collect();
                let (tx, rx) = C::oneshot();
                store.append(entries, IOFlushed::signal(tx)).await?;
                rx.await.map_err(|_| io_err("syncer dropped a callback"))?.map_err(io_err)?;
                next = last + 1;
            }
            Ok::<(), io::Error>(())
        })
    });
    for w in futures::future::join_all(writers).await {
        w.map_err(io_err)??;
    }
    Ok(AppendRun { entries: groups * entries_per_group, elapsed: started.elapsed(), fsyncs: stats.wal_fsync.count() })
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
        if let Some(entries) = self.recent().read(start, range.end_bound().cloned()) {
            return Ok(entries);
        }
        let end = match range.end_bound() {
            Bound::Included(&e) => e,
            Bound::Excluded(&0) => return Ok(Vec::new()),
            Bound::Excluded(&e) => e - 1,
            Bound::Unbounded => u64::MAX,
        };
        let mut out = Vec::new();
        if start <= end {
            self.scan_log(start, end, &mut |_, v| {
                out.push(decode_entry(v)?);
                Ok(true)
            })?;
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
        self.finish_purge()?;
        let (last_purged_log_id, last_log_id) = self.log_state()?;
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
        self.put_meta("committed", &committed)?;
        self.inner.committed.send_replace(committed.map_or(0, |c| c.index()));
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        Ok(self.get_meta::<Option<LogIdOf<C>>>("committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = Vec::new();
        let mut appended = Vec::new();
        let mut from_other_leader = false;
        for entry in entries {
            from_other_leader = entry.log_id.leader_id.node_id != self.inner.member;
            let record = seal(&encode(&entry)?);
            let size = record.len();
            batch.push(Op::Put(Space::Log, self.log_key(entry.log_id.index()).to_vec(), record));
            appended.push((entry, size));
        }
        self.disk().write(batch)?;
        // Only after the journal has them: a read the cache answers must not see
        // an entry the journal could not.
        let last = appended.last().map(|(e, _)| e.log_id.index());
        {
            let mut recent = self.recent();
            for (entry, size) in appended {
                recent.push(entry, size);
            }
        }
        if let Some(last) = last {
            self.inner.tail.store(last, Ordering::Release);
        }
        if from_other_leader {
            // A follower: its Raft core answers the leader only after this fsync and
            // has nothing else to do for this leader meanwhile (one AppendEntries in
            // flight per follower), so it fsyncs here rather than hand the callback
            // to the syncer thread and wait to be woken back. On this 2-core VM each
            // of those two hand-offs waited ~40-50 µs for an idle thread to wake: ~90
            // µs of a 1-client put. The worker thread sleeps in fsync meanwhile: with
            // one worker (the default on 2 CPUs) the follower serves nothing else for
            // that long, so a slow disk stalls its clients as long as its acks.
            // Rejected: `block_in_place`, which hands the worker's other tasks to
            // another thread for the fsync: +170 µs per put (interleaved runs).
            let result = timed_fsync(self.disk(), &self.inner.journal.stats);
            if let Err(e) = &result {
                tracing::error!("log fsync failed: {e}; the raft group stops");
            }
            callback.io_completed(result);
            return Ok(());
        }
        // The leader: its entries go to the followers while the syncer fsyncs them,
        // and the syncer acknowledges them after the fsync that covers this batch.
        match &self.inner.journal.sync_tx {
            SyncQueue::Thread(tx) => tx.send(callback).map_err(|_| io_err("log syncer stopped")),
            SyncQueue::Task(tx) => tx.send(callback).await.map_err(|_| io_err("log syncer stopped")),
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        self.recent().truncate(from);
        self.inner.tail.fetch_min(from.saturating_sub(1), Ordering::AcqRel);
        self.remove_entries(from, u64::MAX)
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        // Record the purge point first: a crash between the two steps leaves extra
        // entries below it, which `finish_purge` removes at the next start.
        self.put_meta("purged", &log_id)?;
        self.recent().purge(log_id.index());
        self.remove_entries(0, log_id.index())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use openraft::entry::RaftEntry;
    use openraft::testing::common::log_id;
    use openraft::testing::log::{StoreBuilder, Suite};
    use openraft::type_config::TypeConfigExt;
    use openraft::StorageError;

    use super::*;
    use crate::consensus::service::{Proposal, ServiceMachine};
    use crate::etcd_store::state_machine::StateMachine;
    use crate::storage::Backend;

    struct Builder;

    impl StoreBuilder<C, LogStore, ServiceMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, ServiceMachine), StorageError<C>> {
            let fail = |e: &dyn std::fmt::Display| StorageError::read(C::err_from_string(e));
            let dir = tempfile::tempdir().map_err(|e| fail(&e))?;
            let stats = Arc::new(crate::stats::GroupStats::default());
            let log = LogStore::open(&dir.path().join("log"), 1, 1, stats.clone()).map_err(|e| fail(&e))?;
            let backend = Arc::new(Backend::open(&dir.path().join("state.redb")).map_err(|e| fail(&e))?);
            let tokens = Arc::new(crate::etcd_store::auth::SimpleTokens::new(Duration::from_secs(60)));
            let read = backend.begin_read().map_err(|e| fail(&e))?;
            let index = Arc::new(crate::etcd_store::mvcc::index::KeyIndex::open(&read).map_err(|e| fail(&e))?);
            let (sm, _) =
                StateMachine::new(backend, index, dir.path().join("snap"), stats, tokens).map_err(|e| fail(&e))?;
            Ok((dir, log, ServiceMachine::new(Box::new(sm), None)))
        }
    }

    /// openraft's conformance suite for log stores (and the state machine's
    /// membership and snapshot bookkeeping).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_openrafts_storage_suite() {
        Suite::test_all(Builder).await.expect("openraft storage suite");
    }

    /// A log with entries but no format mark (written before entries were
    /// service-neutral) is refused until converted; a converted one opens with
    /// every entry rewritten; a removed group leaves nothing behind, so one created
    /// again under its id starts empty, without the old vote.
    #[tokio::test]
    async fn legacy_logs_convert_once_and_removed_groups_leave_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = NodeLog::open(dir.path(), Arc::default()).expect("open journal");
        {
            let mut store = log.group(7, 1).expect("open");
            flushed_append(&mut store, (1..=3).map(|i| entry(1, i)).collect()).await;
            store.save_vote(&VoteOf::<C>::new(2, 1)).await.expect("vote");
        }
        // Remove the mark: now it looks like a log of the previous release.
        let key = {
            let store = log.open_store(7, 0).expect("raw");
            store.meta_key(META_FORMAT)
        };
        log.journal.disk.write(vec![Op::Delete(Space::Meta, key)]).expect("unmark");
        let refused = log.group(7, 1).map(|_| ()).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::InvalidData, "{refused}");
        let converted = log
            .upgrade_legacy(7, &|payload| {
                let mut e: EntryOf<C> = decode(payload)?;
                if let openraft::EntryPayload::Normal(p) = &mut e.payload {
                    p.body.push(0xAA);
                }
                Ok(e)
            })
            .expect("convert");
        assert_eq!(converted, 3);
        assert_eq!(log.upgrade_legacy(7, &|_| Err(io::Error::other("must not run again"))).expect("no-op"), 0);
        {
            let mut store = log.group(7, 1).expect("opens once converted");
            let entries = store.try_get_log_entries(1..=3).await.expect("read");
            assert!(entries
                .iter()
                .all(|e| matches!(&e.payload, openraft::EntryPayload::Normal(p) if p.body.last() == Some(&0xAA))));
        }
        log.remove_group(7).expect("remove");
        let mut again = log.group(7, 1).expect("a new group under the same id");
        assert_eq!(again.last_index().expect("index"), 0);
        assert_eq!(again.read_vote().await.expect("vote"), None);
    }

    /// The progress a leader's replication streams read follows appends,
    /// truncations and saved commit indexes, and survives a reopen.
    #[tokio::test]
    async fn progress_follows_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = Arc::new(crate::stats::GroupStats::default());
        let mut log = LogStore::open(dir.path(), 1, 1, stats.clone()).expect("open log store");
        let mut progress = log.progress();
        assert_eq!((progress.tail(), progress.committed()), (0, 0));
        flushed_append(&mut log, (1..=4).map(|i| entry(1, i)).collect()).await;
        assert_eq!(progress.tail(), 4);
        log.truncate_after(Some(log_id::<C>(1, 1, 2))).await.expect("truncate");
        assert_eq!(progress.tail(), 2);
        log.save_committed(Some(log_id::<C>(1, 1, 2))).await.expect("save committed");
        assert!(progress.committed_changed().await);
        assert_eq!(progress.committed(), 2);
        drop(log);
        let reopened = LogStore::open(dir.path(), 1, 1, stats).expect("reopen");
        assert_eq!(reopened.progress().tail(), 2);
    }

    /// A purge whose mark survived a crash and whose removal did not (here: the
    /// mark written alone, past every entry, as after a snapshot install) leaves
    /// a log whose end is the mark; the entries below it go at the next start, so
    /// later appends leave no gap.
    #[tokio::test]
    async fn an_interrupted_purge_is_finished_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = Arc::new(crate::stats::GroupStats::default());
        let mut log = LogStore::open(dir.path(), 1, 1, stats.clone()).expect("open log store");
        flushed_append(&mut log, (1..=16).map(|i| entry(1, i)).collect()).await;
        log.put_meta("purged", &log_id::<C>(1, 1, 39)).expect("mark");
        log.sync().expect("sync");
        drop(log);
        let mut log = LogStore::open(dir.path(), 1, 1, stats).expect("reopen");
        let state = log.get_log_state().await.expect("log state");
        assert_eq!(state.last_purged_log_id, Some(log_id::<C>(1, 1, 39)));
        assert_eq!(state.last_log_id, Some(log_id::<C>(1, 1, 39)), "the log ends at the mark");
        assert_eq!(log.last_index().expect("last index"), 39);
        flushed_append(&mut log, (40..=42).map(|i| entry(1, i)).collect()).await;
        assert_eq!(log.verify().expect("no gap below the new entries"), 3);
    }

    fn entry(term: u64, index: u64) -> EntryOf<C> {
        let payload = vec![(index % 251) as u8; (index % 7 * 40) as usize];
        EntryOf::<C>::new_normal(log_id::<C>(term, 1, index), Proposal { origin: None, body: payload })
    }

    async fn flushed_append(log: &mut LogStore, entries: Vec<EntryOf<C>>) {
        let (tx, rx) = C::oneshot();
        log.append(entries, IOFlushed::signal(tx)).await.expect("append");
        rx.await.expect("syncer answers").expect("fsync");
    }

    /// Groups sharing one journal keep separate logs: appends, reads, truncation,
    /// purge and votes of one never show in another; a group's store opens once
    /// at a time, and again after it is dropped, with its entries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn groups_sharing_a_journal_keep_separate_logs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = Arc::new(crate::stats::GroupStats::default());
        let node = NodeLog::open(dir.path(), stats.clone()).expect("open journal");
        let mut one = node.group(1, 1).expect("group 1");
        let mut two = node.group(2, 1).expect("group 2");
        let again = node.group(1, 1).map(|_| ()).map_err(|e| e.kind());
        assert_eq!(again, Err(io::ErrorKind::AlreadyExists));
        flushed_append(&mut one, (1..=5).map(|i| entry(1, i)).collect()).await;
        flushed_append(&mut two, (1..=3).map(|i| entry(2, i)).collect()).await;
        let indexes = |entries: Vec<EntryOf<C>>| {
            entries.iter().map(|e| (e.log_id.leader_id.term, e.log_id.index())).collect::<Vec<_>>()
        };
        assert_eq!(
            indexes(one.try_get_log_entries(1..10).await.expect("read")),
            (1..=5).map(|i| (1, i)).collect::<Vec<_>>()
        );
        assert_eq!(
            indexes(two.try_get_log_entries(1..10).await.expect("read")),
            (1..=3).map(|i| (2, i)).collect::<Vec<_>>()
        );
        one.truncate_after(Some(log_id::<C>(1, 1, 2))).await.expect("truncate");
        two.purge(log_id::<C>(2, 1, 1)).await.expect("purge");
        two.save_vote(&openraft::Vote::new(7, 1)).await.expect("vote");
        assert_eq!((one.last_index().expect("last"), two.last_index().expect("last")), (2, 3));
        assert_eq!(one.read_vote().await.expect("vote"), None);
        drop(one);
        let mut one = node.group(1, 1).expect("group 1 reopened");
        assert_eq!(indexes(one.try_get_log_entries(1..10).await.expect("read")), vec![(1, 1), (1, 2)]);
        assert_eq!(indexes(two.try_get_log_entries(0..10).await.expect("read")), vec![(2, 2), (2, 3)]);
    }

    /// A follower's append (entries of another leader) is durable when the call
    /// returns: it fsynced in the call and its callback has already fired. The
    /// leader's own append is acknowledged by the syncer thread after its fsync.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_followers_append_is_flushed_when_it_returns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = Arc::new(crate::stats::GroupStats::default());
        // Member 2; `entry` makes entries of leader 1.
        let mut log = LogStore::open(dir.path(), 1, 2, stats.clone()).expect("open log store");
        for i in 1..=3 {
            let (tx, mut rx) = C::oneshot();
            log.append(vec![entry(1, i)], IOFlushed::signal(tx)).await.expect("append");
            assert!(matches!(rx.try_recv(), Ok(Ok(()))), "append {i} acknowledged before it returned");
            assert_eq!(stats.wal_fsync.count(), i, "one fsync per follower append");
        }
        let read = log.try_get_log_entries(1..4).await.expect("read");
        assert_eq!(read.iter().map(|e| e.log_id.index()).collect::<Vec<_>>(), vec![1, 2, 3]);
        // Member 1, the leader of these entries: its appends go through the syncer.
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = Arc::new(crate::stats::GroupStats::default());
        let mut log = LogStore::open(dir.path(), 1, 1, stats.clone()).expect("open log store");
        flushed_append(&mut log, vec![entry(1, 1)]).await;
        assert_eq!(stats.wal_fsync.count(), 1);
    }

    /// Reads answered from the recent-entry cache equal the journal's, through
    /// appends, truncations (conflicting suffixes), purges and evictions; a
    /// seeded random walk, checked after every step against a store whose
    /// cache is bypassed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recent_entries_read_like_the_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log =
            LogStore::open(dir.path(), 1, 1, Arc::new(crate::stats::GroupStats::default())).expect("open log store");
        let seed: u64 = rand::random();
        let mut rng = seed;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n.max(1)
        };
        let (mut term, mut last, mut purged) = (1u64, 0u64, 0u64);
        // Reads that the cache answered, that started below it, and with it empty.
        let mut paths = [0u32; 3];
        for step in 0..400 {
            match next(20) {
                0..=11 => {
                    let n = 1 + next(if step % 25 == 0 { 3000 } else { 40 });
                    flushed_append(&mut log, (last + 1..=last + n).map(|i| entry(term, i)).collect()).await;
                    last += n;
                }
                12..=14 if last > purged + 1 => {
                    // A conflicting suffix of up to 100 entries.
                    let keep = last + 1 - 1.max(next(100.min(last - purged)));
                    log.truncate_after(Some(log_id::<C>(term, 1, keep - 1))).await.expect("truncate");
                    term += 1;
                    last = keep - 1;
                }
                15 if last > purged + 1 => {
                    purged += 1 + next((last - purged) / 4);
                    log.purge(log_id::<C>(term, 1, purged)).await.expect("purge");
                }
                // What a restart leaves: the journal, and no recent entries.
                16 => *log.recent() = Recent::default(),
                _ => {}
            }
            let start = purged + 1 + next(last.saturating_sub(purged) + 2);
            let end = start + next(500);
            match log.recent().first_index() {
                Some(first) if first <= start => paths[0] += 1,
                Some(_) => paths[1] += 1,
                None => paths[2] += 1,
            }
            let cached = log.try_get_log_entries(start..end).await.expect("read");
            let journal = {
                let saved = std::mem::take(&mut *log.recent());
                let read = log.try_get_log_entries(start..end).await.expect("read");
                *log.recent() = saved;
                read
            };
            assert_eq!(
                format!("{cached:?}"),
                format!("{journal:?}"),
                "seed {seed}: step {step}, read {start}..{end}, log ({purged}, {last}]"
            );
            let recent = log.recent();
            assert!(recent.entries.len() <= MAX_RECENT_ENTRIES && recent.bytes <= MAX_RECENT_BYTES, "seed {seed}");
            assert_eq!(recent.entries.back().map(|(e, _)| e.log_id.index()).unwrap_or(last), last, "seed {seed}");
        }
        assert!(paths.iter().all(|n| *n > 0), "seed {seed}: every read path taken: {paths:?}");
    }
}
