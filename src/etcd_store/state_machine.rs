//! The etcd store as a [`Service`] of the Raft runtime: commands applied to the
//! MVCC store, snapshots of its state file.
//!
//! Each `apply` call runs every entry of the batch in ONE storage transaction that
//! also records the applied log id and membership, so data and applied index can
//! never disagree after a crash. Responses are sent only after that commit, so a
//! client that sees its write acknowledged can read it back.
//!
//! Snapshots: building one first makes the state durable (`Backend::persist`),
//! because openraft purges the log up to the snapshot; the bytes are written to
//! `snap/current` (meta + data, fsynced, renamed into place) and served from there.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::EntryPayload;
use prost::Message;
use redb::{ReadableTable, WriteTransaction};
use serde::{de::DeserializeOwned, Serialize};

use super::{ApplyError, Command, CommandResult};
use crate::consensus::service::{Service, SnapshotSource};
use crate::consensus::snapshot::{read_snapshot_file, write_snapshot_file_with, SnapshotFile};
use crate::consensus::{MemberId, SnapshotData, TypeConfig};
use crate::etcd_store::mvcc::index::KeyIndex;
use crate::etcd_store::mvcc::{MvccError, Rev, Writer};
use crate::proto::etcdserverpb::{CompactionRequest, DeleteRangeRequest, PutRequest, TxnRequest};
use crate::proto::etcdserverpb::{LeaseGrantResponse, LeaseKeepAliveResponse, LeaseRevokeResponse, ResponseHeader};
use crate::storage::{Backend, META};
use tokio::sync::watch;

type C = TypeConfig;

const META_APPLIED: &str = "raft/applied";
const META_MEMBERSHIP: &str = "raft/membership";
const ALARM_PREFIX: &str = "alarm/";
/// etcd's `AlarmType.NOSPACE`.
pub const ALARM_NOSPACE: i32 = 1;
/// etcd's `AlarmType.CORRUPT`.
pub const ALARM_CORRUPT: i32 = 2;

/// Applied entries between durable state-machine commits. Bounds how much of the
/// log a restart re-applies; correctness does not depend on it (the log is durable).
const PERSIST_EVERY_ENTRIES: u64 = 10_000;

fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(io::Error::other)
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    Ok(crate::consensus::decode_bounded(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?.0)
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Forgets which log produced this state and who the members were, keeping the
/// data: a restored snapshot seeds a *new* cluster whose log starts empty.
pub fn reset_raft_state(backend: &Backend) -> io::Result<()> {
    let txn = backend.begin_apply()?;
    {
        let mut meta = txn.open_table(META).map_err(io_err)?;
        meta.remove(META_APPLIED).map_err(io_err)?;
        meta.remove(META_MEMBERSHIP).map_err(io_err)?;
    }
    super::members::clear(&txn)?;
    txn.commit().map_err(io_err)?;
    backend.persist()?;
    Ok(())
}

/// The index of the last log entry applied to the state in `txn` (`None` before any).
pub fn applied_index(txn: &redb::ReadTransaction) -> io::Result<Option<u64>> {
    let meta = txn.open_table(META).map_err(io_err)?;
    let applied = meta.get(META_APPLIED).map_err(io_err)?.map(|v| decode::<LogIdOf<C>>(v.value())).transpose()?;
    Ok(applied.map(|id| id.index))
}

/// Active alarms as (member, alarm type), from any table view of META.
fn alarms_in<T: ReadableTable<&'static str, &'static [u8]>>(meta: &T) -> io::Result<Vec<(MemberId, i32)>> {
    let mut out = Vec::new();
    for row in meta.range(ALARM_PREFIX..).map_err(io_err)? {
        let (k, _) = row.map_err(io_err)?;
        let Some(rest) = k.value().strip_prefix(ALARM_PREFIX) else { break };
        let parsed = rest.split_once('/').and_then(|(m, a)| Some((u64::from_str_radix(m, 16).ok()?, a.parse().ok()?)));
        out.push(parsed.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad alarm key {rest}")))?);
    }
    Ok(out)
}

/// Active alarms as (member, alarm type).
pub fn alarms(txn: &redb::ReadTransaction) -> io::Result<Vec<(MemberId, i32)>> {
    alarms_in(&txn.open_table(META).map_err(io_err)?)
}

pub struct StateMachine {
    backend: Arc<Backend>,
    /// The key index of `backend`'s file (shared with every reader of it).
    index: Arc<KeyIndex>,
    snap_dir: PathBuf,
    applied_since_persist: u64,
    /// Publishes the current revision after each commit (see `Group::revision`).
    revision: watch::Sender<Rev>,
    /// The auth store's revision as of the last commit (see `Group::auth_revision`).
    auth_revision: Arc<AtomicU64>,
    defrag: Arc<ApplyGate>,
    stats: Arc<crate::stats::GroupStats>,
    /// Simple auth tokens registered by applied `Authenticate` entries.
    tokens: Arc<crate::etcd_store::auth::SimpleTokens>,
}

/// Entries a defragmentation may buffer while it copies the state file. Past
/// this the defragmentation gives up (the copy would never catch up).
pub const DEFRAG_MAX_BUFFERED_ENTRIES: usize = 200_000;

/// Serialises apply batches with a defragmentation's start and switch-over, and
/// records the entries applied in between (see [`defragment`]).
#[derive(Default)]
pub struct ApplyGate {
    /// `Some` while a defragmentation copies the file: the entries applied since
    /// its read snapshot, to replay into the copy. A std mutex: held across one
    /// batch's synchronous apply, never across an await.
    recording: std::sync::Mutex<Option<Vec<EntryOf<C>>>>,
}

/// Rewrites the state file densely while reads and writes continue: copy a read
/// snapshot to a new file (the slow part, outside the gate), then under the gate
/// replay the entries applied meanwhile into the copy and switch to it. Apply
/// waits only for that replay; reads never wait.
pub fn defragment(backend: &Backend, gate: &ApplyGate) -> io::Result<()> {
    let tmp = backend.path().with_extension("redb.defrag");
    let snapshot = {
        let mut rec = gate.recording.lock().expect("apply gate poisoned");
        if rec.is_some() {
            return Err(io::Error::other("a defragmentation is already running"));
        }
        *rec = Some(Vec::new());
        backend.begin_read()
    };
    let copied = snapshot.map_err(io::Error::from).and_then(|txn| Ok(Backend::copy_compacted(&txn, &tmp)?));
    let mut rec = gate.recording.lock().expect("apply gate poisoned");
    let entries = rec.take();
    let result = (|| {
        let db = copied?;
        let entries = entries.ok_or_else(|| {
            io::Error::other("defragmentation abandoned: a snapshot was installed or too many writes arrived meanwhile")
        })?;
        // The copy's own index: the live one may already have pruned versions
        // (a compaction among the entries) that replaying them needs.
        let index = KeyIndex::open(&redb::ReadableDatabase::begin_read(&db).map_err(io_err)?).map_err(io_err)?;
        let txn = db.begin_write().map_err(io_err)?;
        apply_entries(&txn, &index, &entries, None)?;
        txn.commit().map_err(io_err)?;
        backend.swap_in(db, &tmp)?;
        Ok(())
    })();
    drop(rec);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl StateMachine {
    /// The gate a defragmentation of this state machine's file goes through.
    pub fn gate(&self) -> Arc<ApplyGate> {
        self.defrag.clone()
    }

    /// The auth revision this state machine publishes after every commit.
    pub fn auth_revision(&self) -> Arc<AtomicU64> {
        self.auth_revision.clone()
    }

    pub fn new(
        backend: Arc<Backend>,
        index: Arc<KeyIndex>,
        snap_dir: PathBuf,
        stats: Arc<crate::stats::GroupStats>,
        tokens: Arc<crate::etcd_store::auth::SimpleTokens>,
    ) -> io::Result<(Self, watch::Receiver<Rev>)> {
        std::fs::create_dir_all(&snap_dir)?;
        // A corrupt snapshot file is refused at start, not when a follower needs it.
        if let Some((_, data)) = read_snapshot_file(&snap_dir.join("current"))? {
            crate::storage::decode_snapshot(&data.read_all()?)?;
        }
        let (rev, auth_rev) = current_revs(&backend)?;
        let (revision, rx) = watch::channel(rev);
        Ok((
            StateMachine {
                backend,
                index,
                snap_dir,
                applied_since_persist: 0,
                revision,
                auth_revision: Arc::new(AtomicU64::new(auth_rev)),
                defrag: Arc::default(),
                stats,
                tokens,
            },
            rx,
        ))
    }

    /// Publishes the committed KV and auth revisions. Called after every commit
    /// and before any response is sent, so a request that starts after a client
    /// saw a write (or an auth change) acknowledged sees its revision.
    fn publish_revision(&self) -> io::Result<()> {
        let (rev, auth_rev) = current_revs(&self.backend)?;
        self.auth_revision.store(auth_rev, Ordering::Release);
        self.revision.send_replace(rev);
        Ok(())
    }

    fn snapshot_path(&self) -> PathBuf {
        self.snap_dir.join("current")
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let txn = self.backend.begin_read()?;
        let meta = txn.open_table(META).map_err(io_err)?;
        match meta.get(key).map_err(io_err)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode(v.value())?)),
        }
    }
}

/// The store's current (KV revision, auth revision).
fn current_revs(backend: &Backend) -> io::Result<(Rev, u64)> {
    let txn = backend.begin_read()?;
    let rev = crate::etcd_store::mvcc::read_revisions(&txn).map_err(io_err)?.0;
    let auth_rev = crate::etcd_store::auth::revision_in(&txn.open_table(META).map_err(io_err)?)?;
    Ok((rev, auth_rev))
}

/// Applies a batch of log entries in `txn`, recording the last applied log id and
/// any membership in the same transaction; returns each entry's result. `tokens`
/// is `None` when entries are replayed into a copy (defragmentation).
fn apply_entries(
    txn: &WriteTransaction,
    index: &KeyIndex,
    entries: &[EntryOf<C>],
    tokens: Option<&crate::etcd_store::auth::SimpleTokens>,
) -> io::Result<Vec<CommandResult>> {
    let mut results = Vec::with_capacity(entries.len());
    let mut membership = None;
    let mut applier = BatchApplier::new(txn, index, tokens)?;
    for entry in entries {
        results.push(match &entry.payload {
            EntryPayload::Blank => CommandResult::Ok(Vec::new()),
            EntryPayload::Normal(proposal) => match Command::decode(&proposal.body) {
                Ok(cmd) => {
                    applier.log_index = entry.log_id.index();
                    applier.apply(&cmd)?
                }
                Err(e) => CommandResult::Err(ApplyError::Malformed(e)),
            },
            EntryPayload::Membership(m) => {
                applier.close_writer()?;
                super::members::seed_from_membership(txn, m)?;
                membership = Some(StoredMembershipOf::<C>::new(Some(entry.log_id), m.clone()));
                CommandResult::Ok(Vec::new())
            }
        });
    }
    applier.close_writer()?;
    let mut meta = txn.open_table(META).map_err(io_err)?;
    if let Some(last) = entries.last() {
        meta.insert(META_APPLIED, encode(&last.log_id)?.as_slice()).map_err(io_err)?;
    }
    if let Some(m) = &membership {
        meta.insert(META_MEMBERSHIP, encode(m)?.as_slice()).map_err(io_err)?;
    }
    Ok(results)
}

/// Applies the client commands of one batch. Consecutive KV and lease commands
/// share one [`Writer`] (its tables are opened once per batch, not per command:
/// that was a tenth of a follower's CPU under puts); a command that needs other
/// tables (alarms, members, auth) closes it first, since redb opens a table once
/// per transaction. What every command checks (the NOSPACE alarm, the auth
/// revision) is read once and re-read only after a command that changes it.
struct BatchApplier<'txn> {
    txn: &'txn WriteTransaction,
    index: &'txn KeyIndex,
    tokens: Option<&'txn crate::etcd_store::auth::SimpleTokens>,
    writer: Option<Writer<'txn>>,
    nospace: bool,
    auth_revision: u64,
    /// The log index of the entry being applied: a granted lease's first record
    /// version, so that versions never repeat across a revoke and a re-grant under
    /// the same id (every later re-base of a lease is a later entry).
    log_index: u64,
}

impl<'txn> BatchApplier<'txn> {
    fn new(
        txn: &'txn WriteTransaction,
        index: &'txn KeyIndex,
        tokens: Option<&'txn crate::etcd_store::auth::SimpleTokens>,
    ) -> io::Result<Self> {
        let mut applier =
            BatchApplier { txn, index, tokens, writer: None, nospace: false, auth_revision: 0, log_index: 0 };
        applier.read_checks()?;
        Ok(applier)
    }

    fn read_checks(&mut self) -> io::Result<()> {
        let meta = self.txn.open_table(META).map_err(io_err)?;
        self.nospace = alarms_in(&meta)?.iter().any(|(_, a)| *a == ALARM_NOSPACE);
        self.auth_revision = crate::etcd_store::auth::revision_in(&meta)?;
        Ok(())
    }

    fn writer(&mut self) -> io::Result<&mut Writer<'txn>> {
        if self.writer.is_none() {
            self.writer = Some(Writer::new(self.txn, self.index).map_err(io_err)?);
        }
        Ok(self.writer.as_mut().expect("just opened"))
    }

    /// Ends the shared writer (persisting the revision reached), if open.
    fn close_writer(&mut self) -> io::Result<()> {
        if let Some(w) = self.writer.take() {
            w.finish().map_err(io_err)?;
        }
        Ok(())
    }

    /// Applies one client command; request-level errors become [`ApplyError`]s,
    /// while storage errors abort the batch (and stop the group).
    fn apply(&mut self, cmd: &Command) -> io::Result<CommandResult> {
        let header = |rev| Some(ResponseHeader { revision: rev, ..Default::default() });
        // etcd's capped applier: while NOSPACE is raised, nothing that can grow the
        // store is applied (puts, writing txns, lease grants); deletes and compaction are.
        let may_grow = matches!(cmd, Command::Put(_) | Command::LeaseGrant { .. } | Command::Txn(_));
        if may_grow && self.nospace {
            // Only decoded while NOSPACE is raised: a txn without writes still applies.
            let grows = match cmd {
                Command::Txn(b) => TxnRequest::decode(b.as_slice())
                    .map(|t| !crate::etcd_store::mvcc::txn_is_readonly(&t))
                    .unwrap_or(false),
                _ => true,
            };
            if grows {
                return Ok(CommandResult::Err(ApplyError::NoSpace));
            }
        }
        match cmd {
            Command::Alarm { activate, member, alarm } => {
                self.close_writer()?;
                {
                    let mut meta = self.txn.open_table(META).map_err(io_err)?;
                    let key = format!("{ALARM_PREFIX}{member:016x}/{alarm}");
                    if *activate {
                        meta.insert(key.as_str(), [].as_slice()).map_err(io_err)?;
                    } else {
                        meta.remove(key.as_str()).map_err(io_err)?;
                    }
                }
                self.read_checks()?;
                Ok(CommandResult::Ok(Vec::new()))
            }
            Command::LeaseGrant { id, ttl_s } => {
                let first_version = self.log_index;
                self.lease(|w| {
                    let rec = w.lease_grant(*id, *ttl_s, first_version)?;
                    Ok(LeaseGrantResponse {
                        header: header(w.current_rev()),
                        id: rec.id,
                        ttl: rec.ttl_s,
                        error: String::new(),
                    })
                })
            }
            Command::LeaseRevoke { id } => self.lease(|w| {
                w.lease_revoke(*id)?;
                Ok(LeaseRevokeResponse { header: header(w.current_rev()) })
            }),
            Command::LeaseExpire { id, version } => self.lease(|w| {
                match w.lease_at(*id)? {
                    Some(rec) if rec.version == *version => w.lease_revoke(*id)?,
                    _ => return Err(MvccError::LeaseNotFound),
                }
                Ok(LeaseRevokeResponse { header: header(w.current_rev()) })
            }),
            Command::LeaseRenew { id } => self.lease(|w| {
                let rec = w.lease_renew(*id)?;
                Ok(LeaseKeepAliveResponse { header: header(w.current_rev()), id: rec.id, ttl: rec.ttl_s })
            }),
            Command::LeaseRenewBatch(ids) => self.lease(|w| {
                let mut ttl_s = Vec::with_capacity(ids.len());
                for id in ids {
                    match w.lease_renew(*id) {
                        Ok(rec) => ttl_s.push(rec.ttl_s),
                        Err(MvccError::LeaseNotFound) => ttl_s.push(0),
                        Err(e) => return Err(e),
                    }
                }
                Ok(LeaseRenewals { header: header(w.current_rev()), ttl_s })
            }),
            Command::LeaseCheckpoint(items) => self.lease(|w| {
                for (id, version, remaining_ms) in items {
                    w.lease_checkpoint(*id, *version, *remaining_ms)?;
                }
                Ok(LeaseRevokeResponse { header: header(w.current_rev()) })
            }),
            Command::Put(b) => self.run(b, |w, r: &PutRequest| w.put(r)),
            Command::DeleteRange(b) => self.run(b, |w, r: &DeleteRangeRequest| w.delete_range(r)),
            Command::Txn(b) => self.run(b, |w, r: &TxnRequest| w.txn(r)),
            Command::Compact(b) => self.run(b, |w, r: &CompactionRequest| w.compact(r.revision)),
            Command::Member(change) => {
                self.close_writer()?;
                super::members::apply(self.txn, change)
            }
            Command::Catalog(change) => {
                self.close_writer()?;
                super::catalog::apply(self.txn, change)
            }
            Command::Auth(op) => {
                self.close_writer()?;
                let result = {
                    let mut meta = self.txn.open_table(META).map_err(io_err)?;
                    crate::etcd_store::auth::apply(&mut meta, op, self.tokens)?
                };
                self.read_checks()?;
                Ok(match result {
                    Ok(()) => CommandResult::Ok(Vec::new()),
                    Err(e) => CommandResult::Err(ApplyError::Auth(e)),
                })
            }
            Command::Forwarded { cmd, .. } => self.apply(cmd),
            Command::Authed { auth_revision, cmd } => {
                // Checked against an older auth store: the permission may be gone.
                if self.auth_revision != *auth_revision {
                    return Ok(CommandResult::Err(ApplyError::Auth(
                        crate::etcd_store::auth::AuthError::AuthOldRevision,
                    )));
                }
                self.apply(cmd)
            }
        }
    }

    /// One KV request: decoded, applied as its own revision in the shared writer.
    fn run<Req: Message + Default, Resp: Message>(
        &mut self,
        bytes: &[u8],
        f: impl FnOnce(&mut Writer, &Req) -> Result<Resp, MvccError>,
    ) -> io::Result<CommandResult> {
        let req = match Req::decode(bytes) {
            Ok(r) => r,
            Err(e) => return Ok(CommandResult::Err(ApplyError::Malformed(e.to_string()))),
        };
        let w = self.writer()?;
        let out = f(w, &req);
        w.end_request();
        Ok(match out {
            Ok(resp) => CommandResult::Ok(resp.encode_to_vec()),
            Err(MvccError::Compacted) => CommandResult::Err(ApplyError::Compacted),
            Err(MvccError::FutureRev) => CommandResult::Err(ApplyError::FutureRev),
            Err(MvccError::KeyNotFound) => CommandResult::Err(ApplyError::KeyNotFound),
            Err(MvccError::LeaseNotFound) => CommandResult::Err(ApplyError::LeaseNotFound),
            Err(MvccError::LeaseExists) => CommandResult::Err(ApplyError::LeaseExists),
            // The writer always reads the current file: `Retry` would be a bug.
            Err(e @ (MvccError::Storage(_) | MvccError::Corrupt(_) | MvccError::Retry)) => return Err(io_err(e)),
        })
    }

    /// One lease command in the shared writer.
    fn lease<Resp: Message>(
        &mut self,
        f: impl FnOnce(&mut Writer) -> Result<Resp, MvccError>,
    ) -> io::Result<CommandResult> {
        let w = self.writer()?;
        let out = f(w);
        w.end_request();
        Ok(match out {
            Ok(resp) => CommandResult::Ok(resp.encode_to_vec()),
            Err(MvccError::LeaseNotFound) => CommandResult::Err(ApplyError::LeaseNotFound),
            Err(MvccError::LeaseExists) => CommandResult::Err(ApplyError::LeaseExists),
            Err(e) => return Err(io_err(e)),
        })
    }
}

/// The answer to a [`Command::LeaseRenewBatch`]: for each id in order, the TTL it
/// was renewed to in seconds, or 0 for a lease that does not exist.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRenewals {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, repeated, tag = "2")]
    pub ttl_s: Vec<i64>,
}

impl Service for StateMachine {
    fn applied_state(&mut self) -> io::Result<(Option<LogIdOf<C>>, StoredMembershipOf<C>)> {
        let applied = self.read_meta::<LogIdOf<C>>(META_APPLIED)?;
        let membership = self.read_meta::<StoredMembershipOf<C>>(META_MEMBERSHIP)?.unwrap_or_default();
        Ok((applied, membership))
    }

    fn apply(&mut self, batch: &[EntryOf<C>]) -> io::Result<Vec<Vec<u8>>> {
        let results = {
            let mut rec = self.defrag.recording.lock().expect("apply gate poisoned");
            let txn = self.backend.begin_apply()?;
            let results = apply_entries(&txn, &self.index, batch, Some(&self.tokens))?;
            let started = std::time::Instant::now();
            txn.commit().map_err(io_err)?;
            self.stats.backend_commit.observe(started.elapsed());
            if let Some(buffer) = rec.as_mut() {
                if buffer.len() + batch.len() > DEFRAG_MAX_BUFFERED_ENTRIES {
                    *rec = None;
                } else {
                    buffer.extend(batch.iter().cloned());
                }
            }
            results
        };
        self.applied_since_persist += batch.len() as u64;
        if self.applied_since_persist >= PERSIST_EVERY_ENTRIES {
            self.backend.persist()?;
            self.applied_since_persist = 0;
        }
        // Only after the commit: an acknowledged write is visible to every later read.
        self.publish_revision()?;
        Ok(results.iter().map(CommandResult::encode).collect())
    }

    fn snapshot_builder(&mut self) -> Box<dyn SnapshotSource> {
        Box::new(SnapshotBuilder { backend: self.backend.clone(), path: self.snapshot_path() })
    }

    /// Installs the leader's snapshot from its file a piece at a time (never
    /// whole in memory): checked, then parsed into one transaction, then copied
    /// to this member's snapshot file.
    fn install_snapshot(&mut self, meta: &SnapshotMetaOf<C>, snapshot: SnapshotData) -> io::Result<()> {
        {
            // Replaces everything: a running defragmentation cannot replay this.
            let mut rec = self.defrag.recording.lock().expect("apply gate poisoned");
            *rec = None;
            // Readers of the old file must not be answered from the new index
            // (or the reverse): the index is marked before the new state commits.
            self.index.begin_replace();
            self.backend.install_snapshot_from(&mut || Ok(Box::new(snapshot.reader())), snapshot.len())?;
            crate::etcd_store::mvcc::upgrade::upgrade_layout(&self.backend).map_err(io_err)?;
            self.index.replace(&self.backend.begin_read()?).map_err(io_err)?;
        }
        let installed = self.applied_state()?;
        if installed.0 != meta.last_log_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot data is at {:?} but its meta says {:?}", installed.0, meta.last_log_id),
            ));
        }
        write_snapshot_file_with(&self.snapshot_path(), meta, &mut |w| {
            io::copy(&mut snapshot.reader(), w).map(|_| ())
        })?;
        self.applied_since_persist = 0;
        self.publish_revision()?;
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = snapshot.len(), "installed snapshot from leader");
        Ok(())
    }

    fn current_snapshot(&mut self) -> io::Result<Option<SnapshotOf<C, SnapshotData>>> {
        Ok(read_snapshot_file(&self.snapshot_path())?
            .map(|(meta, snapshot)| SnapshotOf::<C, SnapshotData> { meta, snapshot }))
    }
}

pub struct SnapshotBuilder {
    backend: Arc<Backend>,
    path: PathBuf,
}

impl SnapshotSource for SnapshotBuilder {
    fn build(&mut self) -> io::Result<SnapshotOf<C, SnapshotData>> {
        // Must be durable before openraft purges the log up to this snapshot.
        self.backend.persist()?;
        let txn = self.backend.begin_read()?;
        let meta_table = txn.open_table(META).map_err(io_err)?;
        let get = |k: &str| -> io::Result<Option<Vec<u8>>> {
            Ok(meta_table.get(k).map_err(io_err)?.map(|v| v.value().to_vec()))
        };
        let last_log_id = get(META_APPLIED)?.map(|b| decode::<LogIdOf<C>>(&b)).transpose()?;
        let last_membership =
            get(META_MEMBERSHIP)?.map(|b| decode::<StoredMembershipOf<C>>(&b)).transpose()?.unwrap_or_default();
        let meta = SnapshotMetaOf::<C> { last_log_id, last_membership };
        // Streamed from the read transaction into the file, a row at a time.
        let data_len = write_snapshot_file_with(&self.path, &meta, &mut |w| Ok(Backend::write_snapshot(&txn, w)?))?;
        let header = self.path.metadata()?.len() - data_len;
        let snapshot = SnapshotFile::new(std::fs::File::open(&self.path)?, header, data_len);
        Ok(SnapshotOf::<C, SnapshotData> { meta, snapshot })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use openraft::entry::RaftEntry;
    use openraft::storage::{EntryResponder, RaftStateMachine};
    use openraft::testing::common::log_id;

    use super::*;
    use crate::consensus::service::{LocalAnswers, Origin, Proposal, ServiceMachine};
    use crate::proto::etcdserverpb::PutResponse;

    fn state_machine(dir: &std::path::Path) -> (StateMachine, watch::Receiver<Rev>) {
        let backend = Arc::new(Backend::open(&dir.join("state.redb")).expect("open"));
        let index = Arc::new(KeyIndex::open(&backend.begin_read().expect("read")).expect("index"));
        let stats = Arc::new(crate::stats::GroupStats::default());
        let tokens = Arc::new(crate::etcd_store::auth::SimpleTokens::new(Duration::from_secs(60)));
        StateMachine::new(backend, index, dir.join("snap"), stats, tokens).expect("state machine")
    }

    fn put(key: &str) -> Command {
        Command::Put(PutRequest { key: key.into(), value: b"v".to_vec(), ..Default::default() }.encode_to_vec())
    }

    fn proposal(cmd: &Command) -> Proposal {
        Proposal { origin: None, body: cmd.encode() }
    }

    /// Applies `proposals` as entries `first..` of leader 1, as a follower does
    /// (no responders).
    async fn apply_as_follower(sm: &mut ServiceMachine, first: u64, proposals: Vec<Proposal>) {
        let entries: Vec<io::Result<EntryResponder<C>>> = proposals
            .into_iter()
            .enumerate()
            .map(|(i, p)| Ok((EntryOf::<C>::new_normal(log_id::<C>(1, 1, first + i as u64), p), None)))
            .collect();
        sm.apply(futures::stream::iter(entries)).await.expect("apply");
    }

    fn revision_of(answer: Result<Vec<u8>, crate::consensus::ConsensusError>) -> i64 {
        match answer.map(|r| CommandResult::decode(&r)) {
            Ok(CommandResult::Ok(b)) => {
                PutResponse::decode(b.as_slice()).expect("put response").header.expect("header").revision
            }
            other => panic!("expected a put response, got {other:?}"),
        }
    }

    /// The member that forwarded a write answers its caller with the result of
    /// its own apply of that entry, once; an entry another member forwarded under
    /// the same id, and a write whose answer was taken back, are applied as the
    /// writes they carry and answer nobody.
    #[tokio::test]
    async fn a_forwarded_write_is_answered_from_the_forwarding_members_apply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let answers = Arc::new(LocalAnswers::new(2));
        let (sm, revision) = state_machine(dir.path());
        let mut sm = ServiceMachine::new(Box::new(sm), Some(answers.clone()));

        let (mine, mine_rx) = tokio::sync::oneshot::channel();
        let (wrapped, id) = answers.park(put("a").encode(), mine);
        let (taken, _taken_rx) = tokio::sync::oneshot::channel();
        let (taken_wrapped, taken_id) = answers.park(put("b").encode(), taken);
        assert!(answers.unpark(taken_id).is_some(), "parked until taken back");
        let other = Proposal { origin: Some(Origin { member: 3, id }), body: put("c").encode() };
        apply_as_follower(&mut sm, 1, vec![proposal(&put("x")), other, wrapped, taken_wrapped]).await;

        // put("x") is revision 2, the other member's write 3, this one 4.
        assert_eq!(revision_of(mine_rx.await.expect("answered")), 4);
        assert!(answers.unpark(id).is_none(), "answered once, then gone");
        // All four were applied as puts: the other member's and the taken-back one too.
        assert_eq!(*revision.borrow(), 5);
    }

    /// A body that is no command (only a bug or a corrupted log makes one) is
    /// answered as malformed and changes nothing; the batch goes on.
    #[tokio::test]
    async fn an_undecodable_body_is_answered_malformed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut sm, revision) = state_machine(dir.path());
        let entries = vec![
            EntryOf::<C>::new_normal(log_id::<C>(1, 1, 1), Proposal { origin: None, body: vec![0xff; 3] }),
            EntryOf::<C>::new_normal(log_id::<C>(1, 1, 2), proposal(&put("a"))),
        ];
        let replies = Service::apply(&mut sm, &entries).expect("apply");
        assert!(matches!(CommandResult::decode(&replies[0]), CommandResult::Err(ApplyError::Malformed(_))));
        assert!(matches!(CommandResult::decode(&replies[1]), CommandResult::Ok(_)));
        assert_eq!(*revision.borrow(), 2);
    }

    /// The leader's expiry of a lease applies only to the record version it
    /// counted down: a keep-alive committed before it re-based the lease and wins.
    /// A re-grant under the same id starts at a version never used before.
    #[tokio::test]
    async fn an_expiry_is_skipped_when_a_keep_alive_re_based_the_lease_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sm, revision) = state_machine(dir.path());
        let (backend, index) = (sm.backend.clone(), sm.index.clone());
        let mut sm = ServiceMachine::new(Box::new(sm), None);
        let lease_put = |key: &str| {
            let req = PutRequest { key: key.into(), value: b"v".to_vec(), lease: 7, ..Default::default() };
            Command::Put(req.encode_to_vec())
        };
        let cmds = [
            Command::LeaseGrant { id: 7, ttl_s: 10 },
            lease_put("held"),
            Command::LeaseRenewBatch(vec![7]),
            // Counted down at version 1, but version 2 is live: left alone.
            Command::LeaseExpire { id: 7, version: 1 },
        ];
        apply_as_follower(&mut sm, 1, cmds.iter().map(proposal).collect()).await;
        let view = || crate::etcd_store::mvcc::ReadView::open(&backend, &index).expect("view");
        assert_eq!(view().lease(7).expect("read").map(|r| r.version), Some(2));
        assert_eq!(*revision.borrow(), 2, "the skipped expiry deleted nothing");
        // At the live version it revokes, and the attached key goes with it.
        apply_as_follower(&mut sm, 5, vec![proposal(&Command::LeaseExpire { id: 7, version: 2 })]).await;
        assert_eq!(view().lease(7).expect("read"), None);
        assert_eq!(*revision.borrow(), 3);
        // Granted again under the same id: a version no observer has counted yet
        // (the entry's log index), not 1 again.
        apply_as_follower(&mut sm, 6, vec![proposal(&Command::LeaseGrant { id: 7, ttl_s: 10 })]).await;
        assert_eq!(view().lease(7).expect("read").map(|r| r.version), Some(6));
    }
}
