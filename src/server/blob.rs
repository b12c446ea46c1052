//! The blob store's service: `concord.blob.v1` on the client port, the chunk
//! transfers between members (node calls), and the keeper that collects what
//! nothing references.
//!
//! A bucket is a catalog group of kind `blob` named by the bucket (placed by
//! the ring like a stream); its metadata is [`crate::streams::bucket`]. An object's
//! bytes are cut into chunks of `--blob-chunk-bytes`; each chunk goes to the
//! `--blob-replicas` members the ring gives its hash (zones first).
//!
//! What it guarantees:
//! - A put is answered only after every chunk is fsynced on a quorum of its
//!   replicas ([`ChunkStore::put`]) and the manifest is committed through the
//!   bucket's group (a quorum fsynced it). Objects up to
//!   `--blob-inline-max-bytes` live in the manifest.
//! - A get verifies every chunk against its hash, on the member that stores it
//!   and again here: a corrupt or missing replica is passed over, the next one
//!   serves, and the bad one is rewritten from the good copy (a repair).
//! - Memory: a put holds at most [`PUT_PIPELINE`] chunks, a get one chunk, and
//!   the member at most `--blob-max-transfers` chunk writes of its own puts and
//!   as many chunk transfers it serves, at once.
//! - Repair (the repairer, every [`REPAIR_INTERVAL`]): a bucket's leader copies
//!   each referenced chunk with fewer live replicas than wanted (a replica on a
//!   member gone: removed, or unreachable for `--blob-repair-delay-ms`; or a put
//!   that reached only a quorum) from a live replica to other members, up to the
//!   replica count, and records where the replicas are now.
//! - Scrubbing (the scrubber, continuously at `--blob-scrub-bytes-per-s`): every
//!   chunk file here is read back and verified; a corrupt one is rewritten from
//!   another replica.
//! - Collection (the keeper, every [`KEEP_INTERVAL`]): a bucket's leader drops
//!   the records of chunks unreferenced for the grace period and removes their
//!   files; every member removes chunk files older than the grace period that
//!   no record names (a put that failed before its commit), and the files of
//!   buckets no longer in the catalog.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::stream::{FuturesOrdered, StreamExt};
use md5::Digest;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status, Streaming};

use super::groups::GroupHost;
use super::stream_place::{NodeCall, Place, PlaceError, StreamPlacement};
use super::Node;
use crate::blob::chunks::{hex, ChunkError, ChunkStore};
use crate::consensus::raw_bytes::ByteString;
use crate::consensus::{GroupId, MemberId};
use crate::etcd_store::catalog::{self, CatalogChange, ServiceKind};
use crate::etcd_store::{members, Command, CommandResult};
use crate::proto::blob as pb;
use crate::proto::blob::blob_server::Blob;
use crate::streams::bucket::{
    BlobCommand, BlobError, BlobReply, Body, BucketRecord, ChunkId, ChunkRecord, ChunkRef, KeyRecord, ObjectRecord,
    PartRecord, PlacedChunk, UploadRecord, COLLECT_GRACE_MS, KEYS_GROUP, MAX_PARTS,
};
use crate::streams::StreamGroup;

/// Chunks a put has in flight to their replicas at once.
pub const PUT_PIPELINE: usize = 2;

/// Largest piece of an object in one Get response message.
const GET_FRAME_BYTES: usize = 1 << 20;

/// Pause between the keeper's rounds.
const KEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Pause between the repairer's rounds.
const REPAIR_INTERVAL: Duration = Duration::from_secs(5);

/// Chunk records the repairer reads at a time.
const REPAIR_PAGE: usize = 500;

/// Pause after the scrubber has read every chunk file here once.
const SCRUB_PASS_PAUSE: Duration = Duration::from_secs(10);

/// Chunk records one collection round drops per bucket.
const COLLECT_MAX: usize = 1000;

/// Objects one fsck page reads.
const FSCK_PAGE: usize = 500;

/// Longest S3 object key, bytes.
pub const MAX_KEY_BYTES: usize = 1024;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Why a blob operation failed, as the gRPC and S3 front ends need it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Failure {
    Refused(BlobError),
    Invalid(String),
    /// A byte range outside the object.
    InvalidRange(String),
    /// The bytes do not match the checksum the client sent.
    BadDigest(String),
    Unavailable(String),
    Internal(String),
}

impl From<Failure> for Status {
    fn from(f: Failure) -> Status {
        match f {
            Failure::Refused(e) => match e {
                BlobError::NoSuchBucket
                | BlobError::NoSuchKey
                | BlobError::NoSuchUpload
                | BlobError::NoSuchAccessKey => Status::not_found(e.to_string()),
                BlobError::BucketExists | BlobError::KeyExists => Status::already_exists(e.to_string()),
                BlobError::BucketNotEmpty => Status::failed_precondition(e.to_string()),
                BlobError::InvalidPart | BlobError::InvalidPartOrder | BlobError::EntityTooSmall => {
                    Status::invalid_argument(e.to_string())
                }
                BlobError::PutTooSlow | BlobError::Unplaced => Status::unavailable(e.to_string()),
            },
            Failure::Invalid(m) => Status::invalid_argument(m),
            Failure::InvalidRange(m) => Status::out_of_range(m),
            Failure::BadDigest(m) => Status::invalid_argument(m),
            Failure::Unavailable(m) => Status::unavailable(m),
            Failure::Internal(m) => Status::internal(m),
        }
    }
}

fn place_failure(e: PlaceError) -> Failure {
    match e {
        PlaceError::Failed(m) => Failure::Internal(m),
        PlaceError::Unavailable(m) => Failure::Unavailable(m),
    }
}

fn stream_failure(e: crate::streams::StreamError) -> Failure {
    match e {
        crate::streams::StreamError::Consensus(c) => Failure::Unavailable(c.to_string()),
        crate::streams::StreamError::Storage(m) => Failure::Internal(m),
    }
}

/// S3's bucket naming rules: 3 to 63 characters of lowercase letters, digits,
/// dots and hyphens, beginning and ending with a letter or digit.
pub fn check_bucket_name(name: &str) -> Result<(), Failure> {
    let ok = (3..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    match ok {
        true => Ok(()),
        false => Err(Failure::Invalid("The specified bucket is not valid.".into())),
    }
}

pub fn check_key(key: &str) -> Result<(), Failure> {
    match key.is_empty() || key.len() > MAX_KEY_BYTES {
        true => Err(Failure::Invalid(format!("object keys are 1 to {MAX_KEY_BYTES} bytes"))),
        false => Ok(()),
    }
}

/// A read of a bucket's metadata, run on a member holding it (and sent there).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MetaRead {
    Bucket,
    Object(String),
    /// The object and the records of its distinct chunks.
    ObjectChunks(String),
    List {
        prefix: String,
        delimiter: String,
        start_after: String,
        max_keys: usize,
    },
    Objects {
        after: Option<String>,
        limit: usize,
    },
    /// Which of these chunks have a record.
    Known(Vec<ChunkId>),
    Chunk(ChunkId),
    Upload(String),
    Parts {
        upload_id: String,
        after: u32,
        limit: usize,
    },
    Keys,
    Key(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MetaAnswer {
    Bucket(Option<BucketRecord>),
    Object(Option<ObjectRecord>),
    ObjectChunks(Option<(ObjectRecord, Vec<(ChunkId, ChunkRecord)>)>),
    List { objects: Vec<(String, ObjectRecord)>, common_prefixes: Vec<String>, truncated: bool, last: Option<String> },
    Objects(Vec<(String, ObjectRecord)>),
    Known(Vec<bool>),
    Chunk(Option<ChunkRecord>),
    Upload(Option<UploadRecord>),
    Parts(Option<(UploadRecord, Vec<(u32, PartRecord)>)>),
    Keys(Vec<(String, KeyRecord)>),
    Key(Option<KeyRecord>),
}

/// What one replica found when asked to check a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkState {
    Good,
    Missing,
    Corrupt,
}

/// A member-to-member call of the blob service.
#[derive(Debug, Serialize, Deserialize)]
enum BlobCall {
    PutChunk {
        bucket: GroupId,
        id: ChunkId,
        #[serde(with = "crate::consensus::raw_bytes")]
        data: Vec<u8>,
    },
    GetChunk {
        bucket: GroupId,
        id: ChunkId,
    },
    CheckChunks {
        bucket: GroupId,
        ids: Vec<ChunkId>,
    },
    RemoveChunks {
        bucket: GroupId,
        ids: Vec<ChunkId>,
    },
    Write {
        bucket: String,
        cmd: BlobCommand,
    },
    Read {
        bucket: String,
        read: MetaRead,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum CallAnswer {
    Done,
    Chunk(Option<ByteString>),
    States(Vec<ChunkState>),
    Reply(BlobReply),
    Answer(MetaAnswer),
}

/// Settings from the command line.
#[derive(Debug, Clone)]
pub struct BlobSettings {
    pub chunk_bytes: usize,
    pub replicas: usize,
    pub inline_max_bytes: usize,
    /// How long a member must be unreachable before its chunks are copied
    /// elsewhere (a restart within it causes no copying).
    pub repair_delay: Duration,
    /// Bytes per second the scrubber reads back (0: no scrubbing).
    pub scrub_bytes_per_s: u64,
}

/// Counters since start, for the metrics.
#[derive(Default)]
pub struct BlobStats {
    /// Chunks found corrupt on this member (their files removed).
    pub corrupt_found: Arc<AtomicU64>,
    /// Chunk replicas this member copied to other members after one was lost.
    pub rereplicated: AtomicU64,
    /// Chunks of the buckets this member leads with fewer live replicas than
    /// wanted, after the repairer's last round (a gauge).
    pub under_replicated: AtomicU64,
    /// Replicas rewritten from a good copy by this member.
    pub repaired: AtomicU64,
    pub repair_failed: AtomicU64,
    pub collected: AtomicU64,
    pub orphans_removed: AtomicU64,
}

/// The blob service of this member.
pub struct BlobService {
    node: Arc<Node>,
    host: Arc<GroupHost>,
    pub chunks: Arc<ChunkStore>,
    settings: BlobSettings,
    /// Bounds the chunk writes this member's puts have in flight.
    sending: Arc<tokio::sync::Semaphore>,
    /// Bounds the chunk transfers this member serves for others (and itself).
    /// Apart from `sending`: a put holding a sending permit waits on serving
    /// permits here and on other members, so one pool would deadlock.
    serving: Arc<tokio::sync::Semaphore>,
    /// Members found unreachable, and since when (see [`BlobService::gone`]).
    down_since: std::sync::Mutex<BTreeMap<MemberId, std::time::Instant>>,
}

/// An object's bytes as they arrive.
pub type Source<'a> = Pin<Box<dyn futures::Stream<Item = Result<Vec<u8>, Failure>> + Send + 'a>>;

/// Run once the bytes are in, before the commit (a client's checksum).
pub type Check<'a> = Box<dyn FnOnce() -> Result<(), Failure> + Send + 'a>;

/// An object's or part's bytes, written to their replicas, not yet committed.
struct Stored {
    size: u64,
    md5: [u8; 16],
    body: Body,
    placed: Vec<PlacedChunk>,
    started_ms: i64,
}

fn quoted_hex(md5: &[u8; 16]) -> String {
    format!("\"{}\"", md5.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

impl BlobService {
    pub fn new(
        node: Arc<Node>,
        host: Arc<GroupHost>,
        chunks: Arc<ChunkStore>,
        settings: BlobSettings,
        max_transfers: usize,
    ) -> BlobService {
        BlobService {
            node,
            host,
            chunks,
            settings,
            sending: Arc::new(tokio::sync::Semaphore::new(max_transfers)),
            serving: Arc::new(tokio::sync::Semaphore::new(max_transfers)),
            down_since: std::sync::Mutex::default(),
        }
    }

    fn timeout(&self) -> Duration {
        self.node.config.request_timeout()
    }

    fn placement(&self) -> StreamPlacement<'_> {
        StreamPlacement { node: &self.node, host: &self.host, service: ServiceKind::Blob }
    }

    /// With auth enabled, a call needs an etcd user's token (any user: buckets
    /// have no permissions of their own yet); etcd's error without one.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let caller = self.node.caller(&super::auth::Credentials::of(req))?;
        match (caller.state.enabled, caller.user) {
            (true, None) => Err(super::errors::from_auth(crate::etcd_store::auth::AuthError::UserEmpty)),
            _ => Ok(()),
        }
    }

    /// The group holding bucket `name`, if the catalog has one.
    async fn bucket_group(&self, name: &str) -> Result<Option<GroupId>, Failure> {
        let internal = |e: std::io::Error| Failure::Internal(e.to_string());
        {
            let txn = self.node.group.backend.begin_read().map_err(|e| Failure::Internal(e.to_string()))?;
            if let Some(id) = catalog::named(&txn, ServiceKind::Blob, name.as_bytes()).map_err(internal)? {
                return Ok(Some(id));
            }
        }
        let txn = self.node.linearizable_txn().await.map_err(|s| Failure::Unavailable(s.message().to_string()))?;
        catalog::named(&txn, ServiceKind::Blob, name.as_bytes()).map_err(internal)
    }

    /// Runs a metadata write on bucket `name`'s group, here or at a replica.
    pub async fn meta_write(&self, name: &str, cmd: BlobCommand, create: bool) -> Result<BlobReply, Failure> {
        match self.placement().place(name.as_bytes(), create, true).await.map_err(place_failure)? {
            Place::Here(g) => g.blob_write(cmd, self.timeout()).await.map_err(stream_failure),
            Place::Missing => Err(Failure::Refused(BlobError::NoSuchBucket)),
            Place::Elsewhere(replicas) => {
                match self.forward(&replicas, BlobCall::Write { bucket: name.to_string(), cmd }, false).await? {
                    CallAnswer::Reply(r) => Ok(r),
                    other => Err(Failure::Internal(format!("a blob write answered {other:?}"))),
                }
            }
        }
    }

    /// Runs a linearizable metadata read on bucket `name`, here or at a replica.
    pub async fn meta_read(&self, name: &str, read: MetaRead) -> Result<MetaAnswer, Failure> {
        match self.placement().place(name.as_bytes(), false, true).await.map_err(place_failure)? {
            Place::Here(g) => read_here(&g, read, self.timeout()).await,
            Place::Missing => Err(Failure::Refused(BlobError::NoSuchBucket)),
            Place::Elsewhere(replicas) => {
                match self.forward(&replicas, BlobCall::Read { bucket: name.to_string(), read }, true).await? {
                    CallAnswer::Answer(a) => Ok(a),
                    other => Err(Failure::Internal(format!("a blob read answered {other:?}"))),
                }
            }
        }
    }

    async fn forward(&self, replicas: &[MemberId], call: BlobCall, idempotent: bool) -> Result<CallAnswer, Failure> {
        let body =
            super::stream_place::node_call(NodeCall::Blob, &call).map_err(|e| Failure::Internal(e.to_string()))?;
        let mut last = String::from("no replica");
        for member in self.placement().call_order(replicas, idempotent) {
            match self.node.group.call_node(member, body.clone(), self.timeout() * 2).await {
                Ok(bytes) => match crate::consensus::decode_bounded::<Result<CallAnswer, Failure>>(&bytes) {
                    Ok((answer, _)) => return answer,
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e,
            }
        }
        Err(Failure::Unavailable(format!("concord: no member holding the bucket answered: {last}")))
    }

    /// Asks member `to` (this one included) a chunk call.
    async fn chunk_call(&self, to: MemberId, call: BlobCall) -> Result<CallAnswer, Failure> {
        if to == self.node.member_id {
            return self.run_call(call).await;
        }
        let body =
            super::stream_place::node_call(NodeCall::Blob, &call).map_err(|e| Failure::Internal(e.to_string()))?;
        let bytes = self
            .node
            .group
            .call_node(to, body, self.timeout())
            .await
            .map_err(|e| Failure::Unavailable(e.to_string()))?;
        crate::consensus::decode_bounded::<Result<CallAnswer, Failure>>(&bytes)
            .map_err(|e| Failure::Internal(e.to_string()))?
            .0
    }

    /// Answers a call another member (or this one) made.
    async fn run_call(&self, call: BlobCall) -> Result<CallAnswer, Failure> {
        let chunks = self.chunks.clone();
        let blocking = |f: Box<dyn FnOnce() -> Result<CallAnswer, Failure> + Send>| async move {
            tokio::task::spawn_blocking(f).await.map_err(|e| Failure::Internal(e.to_string()))?
        };
        match call {
            BlobCall::PutChunk { bucket, id, data } => {
                let _permit = self.serving.acquire().await.map_err(|e| Failure::Internal(e.to_string()))?;
                if self.bucket_name(bucket).await?.is_none() {
                    return Err(Failure::Refused(BlobError::NoSuchBucket));
                }
                blocking(Box::new(move || {
                    chunks.put(bucket, &id, &data).map_err(|e| match e {
                        ChunkError::Mismatch(m) => Failure::Invalid(format!("chunk bytes do not hash to {m}")),
                        e => Failure::Internal(e.to_string()),
                    })?;
                    Ok(CallAnswer::Done)
                }))
                .await
            }
            BlobCall::GetChunk { bucket, id } => {
                let _permit = self.serving.acquire().await.map_err(|e| Failure::Internal(e.to_string()))?;
                blocking(Box::new(move || match chunks.get(bucket, &id) {
                    Ok(data) => Ok(CallAnswer::Chunk(data.map(ByteString))),
                    // A corrupt copy was removed here: to the caller it is missing.
                    Err(ChunkError::Corrupt(_)) => Ok(CallAnswer::Chunk(None)),
                    Err(e) => Err(Failure::Internal(e.to_string())),
                }))
                .await
            }
            BlobCall::CheckChunks { bucket, ids } => {
                blocking(Box::new(move || {
                    let states = ids
                        .iter()
                        .map(|id| match chunks.get(bucket, id) {
                            Ok(Some(_)) => Ok(ChunkState::Good),
                            Ok(None) => Ok(ChunkState::Missing),
                            Err(ChunkError::Corrupt(_)) => Ok(ChunkState::Corrupt),
                            Err(e) => Err(Failure::Internal(e.to_string())),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(CallAnswer::States(states))
                }))
                .await
            }
            BlobCall::RemoveChunks { bucket, ids } => {
                // A file a put wrote or found within the grace period stays: that
                // put's commit will name it again (or the sweeper takes it later).
                let grace = Duration::from_millis(COLLECT_GRACE_MS as u64);
                blocking(Box::new(move || {
                    for id in &ids {
                        chunks.remove_if_stale(bucket, id, grace).map_err(|e| Failure::Internal(e.to_string()))?;
                    }
                    Ok(CallAnswer::Done)
                }))
                .await
            }
            BlobCall::Write { bucket, cmd } => {
                match self.placement().place(bucket.as_bytes(), false, true).await.map_err(place_failure)? {
                    Place::Here(g) => {
                        g.blob_write(cmd, self.timeout()).await.map(CallAnswer::Reply).map_err(stream_failure)
                    }
                    Place::Missing => Err(Failure::Refused(BlobError::NoSuchBucket)),
                    Place::Elsewhere(_) => {
                        Err(Failure::Unavailable("a forwarded call reached a member without the bucket".into()))
                    }
                }
            }
            BlobCall::Read { bucket, read } => {
                match self.placement().place(bucket.as_bytes(), false, true).await.map_err(place_failure)? {
                    Place::Here(g) => read_here(&g, read, self.timeout()).await.map(CallAnswer::Answer),
                    Place::Missing => Err(Failure::Refused(BlobError::NoSuchBucket)),
                    Place::Elsewhere(_) => {
                        Err(Failure::Unavailable("a forwarded call reached a member without the bucket".into()))
                    }
                }
            }
        }
    }

    /// The name of the bucket group `id` holds, from the applied catalog (or
    /// the catalog as of now when it is not there yet).
    async fn bucket_name(&self, id: GroupId) -> Result<Option<String>, Failure> {
        let find = |txn: &redb::ReadTransaction| -> Result<Option<String>, Failure> {
            let names = catalog::names(txn, ServiceKind::Blob).map_err(|e| Failure::Internal(e.to_string()))?;
            Ok(names.into_iter().find(|(_, g)| *g == id).map(|(n, _)| String::from_utf8_lossy(&n).into_owned()))
        };
        {
            let txn = self.node.group.backend.begin_read().map_err(|e| Failure::Internal(e.to_string()))?;
            if let Some(name) = find(&txn)? {
                return Ok(Some(name));
            }
        }
        let txn = self.node.linearizable_txn().await.map_err(|s| Failure::Unavailable(s.message().to_string()))?;
        find(&txn)
    }

    /// The members a chunk's replicas go to: the ring over the voting members.
    fn chunk_targets(&self, id: &ChunkId) -> Result<Vec<MemberId>, Failure> {
        let internal = |e: std::io::Error| Failure::Internal(e.to_string());
        let txn = self.node.group.backend.begin_read().map_err(|e| Failure::Internal(e.to_string()))?;
        let labels = members::labels(&txn).map_err(internal)?;
        let nodes = members::records(&txn).map_err(internal)?.into_iter().filter(|(_, r)| !r.learner).map(|(m, _)| {
            let l = labels.get(&m).cloned().unwrap_or_default();
            crate::placement::Node { id: m, zone: l.zone, weight: l.weight }
        });
        let ring = crate::placement::Ring::new(nodes);
        let item = u64::from_le_bytes(id[..8].try_into().expect("a chunk id has 8 bytes"));
        let mut placed = crate::placement::place(&ring, [item], self.settings.replicas);
        Ok(placed.remove(&item).unwrap_or_default())
    }

    /// Writes one chunk to its replicas; answers once a quorum of them fsynced it.
    async fn upload(&self, bucket: GroupId, id: ChunkId, data: Arc<Vec<u8>>) -> Result<PlacedChunk, Failure> {
        let _permit = self.sending.acquire().await.map_err(|e| Failure::Internal(e.to_string()))?;
        let targets = self.chunk_targets(&id)?;
        if targets.is_empty() {
            return Err(Failure::Unavailable("concord: no member can hold a chunk".into()));
        }
        let writes = targets.iter().map(|m| {
            let call = BlobCall::PutChunk { bucket, id, data: data.as_ref().clone() };
            async move { (*m, self.chunk_call(*m, call).await) }
        });
        let results = futures::future::join_all(writes).await;
        let mut replicas = Vec::new();
        let mut last = String::new();
        for (m, r) in results {
            match r {
                Ok(_) => replicas.push(m),
                Err(e) => last = format!("{e:?}"),
            }
        }
        if replicas.len() < targets.len() / 2 + 1 {
            return Err(Failure::Unavailable(format!(
                "concord: chunk {} reached {} of {} replicas: {last}",
                hex(&id),
                replicas.len(),
                targets.len()
            )));
        }
        let size = u32::try_from(data.len()).map_err(|_| Failure::Internal("a chunk over 4 GiB".into()))?;
        Ok(PlacedChunk { id, size, replicas })
    }

    /// Stores an object from `source` (the put pipeline): chunks written as they
    /// fill, then `check` (a client's checksum), then the manifest committed.
    pub async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        content_type: String,
        metadata: Vec<(String, String)>,
        source: Source<'_>,
        check: Check<'_>,
    ) -> Result<ObjectRecord, Failure> {
        check_key(key)?;
        let group = self.live_bucket(bucket).await?;
        let stored = self.store(group, source, self.settings.inline_max_bytes).await?;
        check()?;
        let object = ObjectRecord {
            size: stored.size,
            etag: quoted_hex(&stored.md5),
            content_type,
            metadata,
            modified_ms: 0,
            body: stored.body,
        };
        let cmd = BlobCommand::Put {
            key: key.to_string(),
            object,
            placed: stored.placed,
            started_ms: stored.started_ms,
            now_ms: now_ms(),
        };
        match self.meta_write(bucket, cmd, false).await? {
            BlobReply::Put(o) => Ok(o),
            BlobReply::Refused(e) => Err(Failure::Refused(e)),
            other => Err(Failure::Internal(format!("a put answered {other:?}"))),
        }
    }

    /// Whether bucket `bucket` exists and is not being deleted.
    pub async fn check_live_bucket(&self, bucket: &str) -> Result<(), Failure> {
        self.live_bucket(bucket).await.map(drop)
    }

    /// The group of bucket `bucket`, which must exist and not be being deleted.
    async fn live_bucket(&self, bucket: &str) -> Result<GroupId, Failure> {
        check_bucket_name(bucket)?;
        let group = self.bucket_group(bucket).await?.ok_or(Failure::Refused(BlobError::NoSuchBucket))?;
        match self.meta_read(bucket, MetaRead::Bucket).await? {
            MetaAnswer::Bucket(Some(b)) if !b.deleting => Ok(group),
            _ => Err(Failure::Refused(BlobError::NoSuchBucket)),
        }
    }

    /// Cuts `source` into chunks and writes each to its replicas as it fills
    /// ([`PUT_PIPELINE`] at a time); bytes up to `inline_max` stay inline.
    async fn store(&self, group: GroupId, mut source: Source<'_>, inline_max: usize) -> Result<Stored, Failure> {
        let started_ms = now_ms();
        let chunk_bytes = self.settings.chunk_bytes;
        let mut md5 = md5::Md5::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut size = 0u64;
        let mut refs: Vec<ChunkRef> = Vec::new();
        let mut placed: BTreeMap<ChunkId, PlacedChunk> = BTreeMap::new();
        let mut uploads = FuturesOrdered::new();
        let mut done = false;
        while !done {
            let piece = match source.next().await {
                Some(p) => p?,
                None => {
                    done = true;
                    Vec::new()
                }
            };
            size += piece.len() as u64;
            let mut rest = piece.as_slice();
            loop {
                let take = rest.len().min(chunk_bytes - buf.len());
                buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                let full = buf.len() == chunk_bytes;
                let tail = done && !buf.is_empty() && (!refs.is_empty() || buf.len() > inline_max);
                if !full && !tail {
                    break;
                }
                let chunk = std::mem::take(&mut buf);
                let (m, id, chunk) = tokio::task::spawn_blocking(move || {
                    md5.update(&chunk);
                    let id = *blake3::hash(&chunk).as_bytes();
                    (md5, id, chunk)
                })
                .await
                .map_err(|e| Failure::Internal(e.to_string()))?;
                md5 = m;
                refs.push(ChunkRef { id, size: chunk.len() as u32 });
                if uploads.len() >= PUT_PIPELINE {
                    let p: PlacedChunk = uploads.next().await.expect("uploads in flight")?;
                    placed.insert(p.id, p);
                }
                if !placed.contains_key(&id) {
                    uploads.push_back(self.upload(group, id, Arc::new(chunk)));
                }
                if rest.is_empty() {
                    break;
                }
            }
        }
        while let Some(p) = uploads.next().await {
            let p = p?;
            placed.insert(p.id, p);
        }
        let body = match refs.is_empty() {
            true => {
                md5.update(&buf);
                Body::Inline(buf)
            }
            false => Body::Chunks(refs),
        };
        Ok(Stored { size, md5: md5.finalize().into(), body, placed: placed.into_values().collect(), started_ms })
    }

    /// Starts a multipart upload of `key`; its id.
    pub async fn create_upload(
        &self,
        bucket: &str,
        key: &str,
        content_type: String,
        metadata: Vec<(String, String)>,
    ) -> Result<String, Failure> {
        check_key(key)?;
        self.live_bucket(bucket).await?;
        let upload_id: String = (0..32).map(|_| format!("{:x}", rand::random::<u8>() % 16)).collect();
        let upload = UploadRecord { key: key.to_string(), content_type, metadata, created_ms: now_ms() };
        match self.meta_write(bucket, BlobCommand::CreateUpload { upload_id: upload_id.clone(), upload }, false).await?
        {
            BlobReply::Done => Ok(upload_id),
            BlobReply::Refused(e) => Err(Failure::Refused(e)),
            other => Err(Failure::Internal(format!("an upload create answered {other:?}"))),
        }
    }

    /// Stores part `number` of an upload; its record.
    pub async fn upload_part(
        &self,
        bucket: &str,
        upload_id: &str,
        number: u32,
        source: Source<'_>,
        check: Check<'_>,
    ) -> Result<PartRecord, Failure> {
        if !(1..=MAX_PARTS).contains(&number) {
            return Err(Failure::Invalid(format!(
                "Part number must be an integer between 1 and {MAX_PARTS}, inclusive"
            )));
        }
        let group = self.live_bucket(bucket).await?;
        match self.meta_read(bucket, MetaRead::Upload(upload_id.to_string())).await? {
            MetaAnswer::Upload(Some(_)) => {}
            _ => return Err(Failure::Refused(BlobError::NoSuchUpload)),
        }
        let stored = self.store(group, source, 0).await?;
        check()?;
        let chunks = match stored.body {
            Body::Chunks(c) => c,
            Body::Inline(_) => Vec::new(),
        };
        let part = PartRecord { size: stored.size, md5: stored.md5, chunks, modified_ms: 0 };
        let cmd = BlobCommand::PutPart {
            upload_id: upload_id.to_string(),
            number,
            part: part.clone(),
            placed: stored.placed,
            started_ms: stored.started_ms,
            now_ms: now_ms(),
        };
        match self.meta_write(bucket, cmd, false).await? {
            BlobReply::Done => Ok(part),
            BlobReply::Refused(e) => Err(Failure::Refused(e)),
            other => Err(Failure::Internal(format!("a part answered {other:?}"))),
        }
    }

    /// Completes an upload from the listed (number, ETag) parts; the object and its key.
    pub async fn complete_upload(
        &self,
        bucket: &str,
        upload_id: &str,
        parts: Vec<(u32, String)>,
    ) -> Result<(String, ObjectRecord), Failure> {
        check_bucket_name(bucket)?;
        let key = match self.meta_read(bucket, MetaRead::Upload(upload_id.to_string())).await? {
            MetaAnswer::Upload(Some(u)) => u.key,
            _ => return Err(Failure::Refused(BlobError::NoSuchUpload)),
        };
        let cmd = BlobCommand::CompleteUpload { upload_id: upload_id.to_string(), parts, now_ms: now_ms() };
        match self.meta_write(bucket, cmd, false).await? {
            BlobReply::Put(o) => Ok((key, o)),
            BlobReply::Refused(e) => Err(Failure::Refused(e)),
            other => Err(Failure::Internal(format!("an upload completion answered {other:?}"))),
        }
    }

    pub async fn abort_upload(&self, bucket: &str, upload_id: &str) -> Result<(), Failure> {
        check_bucket_name(bucket)?;
        let cmd = BlobCommand::AbortUpload { upload_id: upload_id.to_string(), now_ms: now_ms() };
        match self.meta_write(bucket, cmd, false).await? {
            BlobReply::Done => Ok(()),
            BlobReply::Refused(e) => Err(Failure::Refused(e)),
            other => Err(Failure::Internal(format!("an upload abort answered {other:?}"))),
        }
    }

    /// An upload's key and up to `limit` parts numbered above `after`.
    pub async fn list_parts(
        &self,
        bucket: &str,
        upload_id: &str,
        after: u32,
        limit: usize,
    ) -> Result<(UploadRecord, Vec<(u32, PartRecord)>), Failure> {
        check_bucket_name(bucket)?;
        let read = MetaRead::Parts { upload_id: upload_id.to_string(), after, limit };
        match self.meta_read(bucket, read).await? {
            MetaAnswer::Parts(Some((u, parts))) => Ok((u, parts)),
            MetaAnswer::Parts(None) => Err(Failure::Refused(BlobError::NoSuchUpload)),
            other => Err(Failure::Internal(format!("a read answered {other:?}"))),
        }
    }

    /// A new S3 access key pair.
    pub async fn create_key(&self) -> Result<(String, KeyRecord), Failure> {
        const ID_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        const SECRET_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let pick = |set: &[u8], n: usize| -> String {
            (0..n).map(|_| set[rand::random_range(0..set.len())] as char).collect()
        };
        let id = format!("CK{}", pick(ID_CHARS, 18));
        let key = KeyRecord { secret: pick(SECRET_CHARS, 40), created_ms: now_ms() };
        let cmd = BlobCommand::CreateKey { access_key_id: id.clone(), key: key.clone() };
        match self.meta_write(KEYS_GROUP, cmd, true).await? {
            BlobReply::Done => Ok((id, key)),
            BlobReply::Refused(e) => Err(Failure::Refused(e)),
            other => Err(Failure::Internal(format!("a key create answered {other:?}"))),
        }
    }

    /// Every S3 access key.
    pub async fn list_keys(&self) -> Result<Vec<(String, KeyRecord)>, Failure> {
        match self.meta_read(KEYS_GROUP, MetaRead::Keys).await {
            Ok(MetaAnswer::Keys(k)) => Ok(k),
            Err(Failure::Refused(BlobError::NoSuchBucket)) => Ok(Vec::new()),
            Ok(other) => Err(Failure::Internal(format!("a read answered {other:?}"))),
            Err(e) => Err(e),
        }
    }

    /// The secret of access key `id`.
    pub async fn key_secret(&self, id: &str) -> Result<Option<String>, Failure> {
        match self.meta_read(KEYS_GROUP, MetaRead::Key(id.to_string())).await {
            Ok(MetaAnswer::Key(k)) => Ok(k.map(|k| k.secret)),
            Err(Failure::Refused(BlobError::NoSuchBucket)) => Ok(None),
            Ok(other) => Err(Failure::Internal(format!("a read answered {other:?}"))),
            Err(e) => Err(e),
        }
    }

    pub async fn delete_key(&self, id: &str) -> Result<(), Failure> {
        match self.meta_write(KEYS_GROUP, BlobCommand::DeleteKey { access_key_id: id.to_string() }, false).await {
            Ok(BlobReply::Done) => Ok(()),
            Ok(BlobReply::Refused(e)) => Err(Failure::Refused(e)),
            Err(Failure::Refused(BlobError::NoSuchBucket)) => Err(Failure::Refused(BlobError::NoSuchAccessKey)),
            Ok(other) => Err(Failure::Internal(format!("a key delete answered {other:?}"))),
            Err(e) => Err(e),
        }
    }

    /// An object's info and records, for a get.
    async fn object_for_get(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<(GroupId, ObjectRecord, BTreeMap<ChunkId, ChunkRecord>), Failure> {
        check_bucket_name(bucket)?;
        let group = self.bucket_group(bucket).await?.ok_or(Failure::Refused(BlobError::NoSuchBucket))?;
        match self.meta_read(bucket, MetaRead::ObjectChunks(key.to_string())).await? {
            MetaAnswer::ObjectChunks(Some((o, chunks))) => Ok((group, o, chunks.into_iter().collect())),
            MetaAnswer::ObjectChunks(None) => Err(Failure::Refused(BlobError::NoSuchKey)),
            other => Err(Failure::Internal(format!("a read answered {other:?}"))),
        }
    }

    /// A chunk's bytes from the first replica holding a good copy; replicas
    /// found without one are rewritten from it.
    pub async fn fetch_chunk(&self, bucket: GroupId, id: ChunkId, replicas: &[MemberId]) -> Result<Vec<u8>, Failure> {
        let mut order: Vec<MemberId> = replicas.to_vec();
        order.sort_by_key(|m| *m != self.node.member_id);
        let mut bad = Vec::new();
        let mut last = String::from("no replica recorded");
        for m in order {
            match self.chunk_call(m, BlobCall::GetChunk { bucket, id }).await {
                Ok(CallAnswer::Chunk(Some(ByteString(data)))) => {
                    // A replica's word is not taken: the bytes are checked here too.
                    if blake3::hash(&data).as_bytes() == &id {
                        if !bad.is_empty() {
                            self.repair(bucket, id, &data, &bad).await;
                        }
                        return Ok(data);
                    }
                    last = format!("{m:x} sent bytes that do not hash to the chunk");
                    bad.push(m);
                }
                Ok(CallAnswer::Chunk(None)) => {
                    last = format!("{m:x} has no good copy");
                    bad.push(m);
                }
                Ok(other) => last = format!("{m:x} answered {other:?}"),
                Err(e) => last = format!("{m:x}: {e:?}"),
            }
        }
        Err(Failure::Unavailable(format!("concord: no replica of chunk {} answered with it: {last}", hex(&id))))
    }

    /// Rewrites a chunk on the members that lacked a good copy.
    async fn repair(&self, bucket: GroupId, id: ChunkId, data: &[u8], members: &[MemberId]) {
        for m in members {
            let call = BlobCall::PutChunk { bucket, id, data: data.to_vec() };
            match self.chunk_call(*m, call).await {
                Ok(_) => {
                    self.node.stats.blob.repaired.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(chunk = %hex(&id), member = %format!("{m:x}"), "repaired a chunk replica");
                }
                Err(e) => {
                    self.node.stats.blob.repair_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(chunk = %hex(&id), member = %format!("{m:x}"), "chunk repair failed: {e:?}");
                }
            }
        }
    }

    /// Deletes an empty bucket: marked deleting in its group, then its group
    /// leaves the catalog (and every member's keeper removes its chunk files).
    pub async fn delete_bucket(&self, name: &str) -> Result<(), Failure> {
        check_bucket_name(name)?;
        let group = self.bucket_group(name).await?.ok_or(Failure::Refused(BlobError::NoSuchBucket))?;
        match self.meta_write(name, BlobCommand::DeleteBucket, false).await? {
            BlobReply::Done => {}
            BlobReply::Refused(e) => return Err(Failure::Refused(e)),
            other => return Err(Failure::Internal(format!("a bucket delete answered {other:?}"))),
        }
        let change = Command::Catalog(CatalogChange::Remove { id: group });
        match self.node.group.propose(change, self.timeout()).await {
            Ok(CommandResult::Ok(_)) | Ok(CommandResult::Err(crate::etcd_store::ApplyError::GroupNotFound)) => Ok(()),
            Ok(CommandResult::Err(e)) => Err(Failure::Internal(format!("{e:?}"))),
            Err(e) => Err(Failure::Unavailable(e.to_string())),
        }
    }

    /// Creates bucket `name`.
    pub async fn create_bucket(&self, name: &str) -> Result<BucketRecord, Failure> {
        check_bucket_name(name)?;
        match self
            .meta_write(name, BlobCommand::CreateBucket { name: name.to_string(), now_ms: now_ms() }, true)
            .await?
        {
            BlobReply::Bucket(b) => Ok(b),
            BlobReply::Refused(e) => Err(Failure::Refused(e)),
            other => Err(Failure::Internal(format!("a bucket create answered {other:?}"))),
        }
    }

    /// Every bucket, by name.
    pub async fn list_buckets(&self) -> Result<Vec<BucketRecord>, Failure> {
        let names = {
            let txn = self.node.linearizable_txn().await.map_err(|s| Failure::Unavailable(s.message().to_string()))?;
            catalog::names(&txn, ServiceKind::Blob).map_err(|e| Failure::Internal(e.to_string()))?
        };
        let mut out = Vec::new();
        for (name, _) in names {
            let name = String::from_utf8_lossy(&name).into_owned();
            if name == KEYS_GROUP {
                continue;
            }
            match self.meta_read(&name, MetaRead::Bucket).await {
                Ok(MetaAnswer::Bucket(Some(b))) if !b.deleting => out.push(b),
                Ok(_) | Err(Failure::Refused(BlobError::NoSuchBucket)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    pub async fn head(&self, bucket: &str, key: &str) -> Result<ObjectRecord, Failure> {
        check_bucket_name(bucket)?;
        match self.meta_read(bucket, MetaRead::Object(key.to_string())).await? {
            MetaAnswer::Object(Some(o)) => Ok(o),
            MetaAnswer::Object(None) => Err(Failure::Refused(BlobError::NoSuchKey)),
            other => Err(Failure::Internal(format!("a head answered {other:?}"))),
        }
    }

    pub async fn delete(&self, bucket: &str, key: &str) -> Result<bool, Failure> {
        check_bucket_name(bucket)?;
        match self.meta_write(bucket, BlobCommand::Delete { key: key.to_string(), now_ms: now_ms() }, false).await? {
            BlobReply::Deleted(found) => Ok(found),
            BlobReply::Refused(e) => Err(Failure::Refused(e)),
            other => Err(Failure::Internal(format!("a delete answered {other:?}"))),
        }
    }

    pub async fn list(
        &self,
        bucket: &str,
        prefix: String,
        delimiter: String,
        start_after: String,
        max_keys: usize,
    ) -> Result<MetaAnswer, Failure> {
        check_bucket_name(bucket)?;
        self.meta_read(bucket, MetaRead::List { prefix, delimiter, start_after, max_keys }).await
    }

    /// An object's bytes `[offset, offset + length)` as a stream of pieces, and
    /// its record. The range must lie within the object.
    pub async fn get_object(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        offset: u64,
        length: Option<u64>,
    ) -> Result<(ObjectRecord, tokio::sync::mpsc::Receiver<Result<Vec<u8>, Failure>>), Failure> {
        let (group, object, records) = self.object_for_get(bucket, key).await?;
        let end = match length {
            Some(n) => offset.checked_add(n).filter(|e| *e <= object.size),
            None => Some(object.size),
        };
        let end = match end {
            Some(e) if offset <= object.size => e,
            _ => {
                return Err(Failure::InvalidRange(format!(
                    "The requested range is not satisfiable: the object is {} bytes",
                    object.size
                )))
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let me = self.clone();
        let o = object.clone();
        tokio::spawn(async move {
            let send = |piece: &[u8]| {
                let tx = tx.clone();
                let piece = piece.to_vec();
                async move { tx.send(Ok(piece)).await.is_ok() }
            };
            match &o.body {
                Body::Inline(data) => {
                    let _ = send(&data[offset as usize..end as usize]).await;
                }
                Body::Chunks(chunks) => {
                    let mut at = 0u64;
                    for c in chunks {
                        let (from, to) = (at, at + u64::from(c.size));
                        at = to;
                        if to <= offset || from >= end {
                            continue;
                        }
                        let replicas = records.get(&c.id).map(|r| r.replicas.clone()).unwrap_or_default();
                        let data = match me.fetch_chunk(group, c.id, &replicas).await {
                            Ok(d) => d,
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        };
                        let lo = (offset.max(from) - from) as usize;
                        let hi = (end.min(to) - from) as usize;
                        for piece in data[lo..hi].chunks(GET_FRAME_BYTES) {
                            if !send(piece).await {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok((object, rx))
    }

    /// Copies an object: by reference within a bucket (its chunks are shared),
    /// else through the put pipeline.
    pub async fn copy(&self, src_bucket: &str, src_key: &str, bucket: &str, key: &str) -> Result<ObjectRecord, Failure>
    where
        Self: Sized,
    {
        check_key(key)?;
        let (src_group, object, records) = self.object_for_get(src_bucket, src_key).await?;
        if src_bucket == bucket {
            let cmd = BlobCommand::Put {
                key: key.to_string(),
                object: object.clone(),
                placed: Vec::new(),
                started_ms: now_ms(),
                now_ms: now_ms(),
            };
            match self.meta_write(bucket, cmd, false).await? {
                BlobReply::Put(o) => return Ok(o),
                // A chunk was collected meanwhile: copy the bytes instead.
                BlobReply::Refused(BlobError::Unplaced) => {}
                BlobReply::Refused(e) => return Err(Failure::Refused(e)),
                other => return Err(Failure::Internal(format!("a copy answered {other:?}"))),
            }
        }
        let source: Source<'_> = match object.body.clone() {
            Body::Inline(data) => Box::pin(futures::stream::iter([Ok(data)])),
            Body::Chunks(chunks) => Box::pin(futures::stream::iter(chunks).then(move |c| {
                let replicas = records.get(&c.id).map(|r| r.replicas.clone()).unwrap_or_default();
                async move { self.fetch_chunk(src_group, c.id, &replicas).await }
            })),
        };
        let (content_type, metadata) = (object.content_type.clone(), object.metadata.clone());
        self.put_object(bucket, key, content_type, metadata, source, Box::new(|| Ok(()))).await
    }

    /// Checks every chunk of every object of `bucket` (or of all buckets) on each
    /// of its replicas.
    pub async fn fsck(&self, bucket: Option<&str>) -> Result<pb::FsckResponse, Failure> {
        let buckets = match bucket {
            Some(b) => vec![b.to_string()],
            None => self.list_buckets().await?.into_iter().map(|b| b.name).collect(),
        };
        let mut out = pb::FsckResponse::default();
        for name in buckets {
            let group = self.bucket_group(&name).await?.ok_or(Failure::Refused(BlobError::NoSuchBucket))?;
            let mut after = None;
            loop {
                let page =
                    match self.meta_read(&name, MetaRead::Objects { after: after.clone(), limit: FSCK_PAGE }).await? {
                        MetaAnswer::Objects(p) => p,
                        other => return Err(Failure::Internal(format!("a read answered {other:?}"))),
                    };
                let Some((last, _)) = page.last() else { break };
                after = Some(last.clone());
                for (key, object) in page {
                    out.objects += 1;
                    let distinct: BTreeSet<ChunkId> = object.chunks().iter().map(|c| c.id).collect();
                    let (_, _, records) = match self.object_for_get(&name, &key).await {
                        Ok(r) => r,
                        Err(Failure::Refused(BlobError::NoSuchKey)) => continue,
                        Err(e) => return Err(e),
                    };
                    for id in distinct {
                        out.chunks += 1;
                        let replicas = records.get(&id).map(|r| r.replicas.clone()).unwrap_or_default();
                        let mut good = 0;
                        for m in &replicas {
                            let state =
                                match self.chunk_call(*m, BlobCall::CheckChunks { bucket: group, ids: vec![id] }).await
                                {
                                    Ok(CallAnswer::States(s)) => s.first().copied().unwrap_or(ChunkState::Missing),
                                    _ => ChunkState::Missing,
                                };
                            match state {
                                ChunkState::Good => good += 1,
                                ChunkState::Missing | ChunkState::Corrupt => out.problems.push(pb::FsckProblem {
                                    bucket: name.clone(),
                                    key: key.clone(),
                                    chunk: hex(&id),
                                    problem: if state == ChunkState::Corrupt { "corrupt" } else { "missing" }.into(),
                                    members: vec![self.member_name(*m)],
                                }),
                            }
                        }
                        let want = self.settings.replicas.min(self.voters().max(1));
                        if good < want {
                            out.problems.push(pb::FsckProblem {
                                bucket: name.clone(),
                                key: key.clone(),
                                chunk: hex(&id),
                                problem: "under-replicated".into(),
                                members: replicas.iter().map(|m| self.member_name(*m)).collect(),
                            });
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Whether member `m` is gone for the chunks it holds: no longer a voter,
    /// or unreachable for the repair delay.
    fn gone(&self, m: MemberId, voters: &BTreeSet<MemberId>) -> bool {
        if m == self.node.member_id {
            return false;
        }
        if !voters.contains(&m) {
            return true;
        }
        let mut down = self.down_since.lock().expect("down members poisoned");
        if self.node.registry.liveness().alive(m) {
            down.remove(&m);
            return false;
        }
        down.entry(m).or_insert_with(std::time::Instant::now).elapsed() >= self.settings.repair_delay
    }

    fn voter_set(&self) -> BTreeSet<MemberId> {
        let Ok(txn) = self.node.group.backend.begin_read() else { return BTreeSet::new() };
        members::records(&txn)
            .map_or_else(|_| BTreeSet::new(), |r| r.into_iter().filter(|(_, r)| !r.learner).map(|(m, _)| m).collect())
    }

    /// One round of the repairer: for each bucket this member leads, every
    /// referenced chunk with fewer live replicas than wanted is copied to live
    /// members up to the replica count, and its record updated.
    async fn repair_round(&self) -> Result<(), Failure> {
        let groups: Vec<GroupId> = {
            let txn = self.node.group.backend.begin_read().map_err(|e| Failure::Internal(e.to_string()))?;
            let names = catalog::names(&txn, ServiceKind::Blob).map_err(|e| Failure::Internal(e.to_string()))?;
            names.into_iter().map(|(_, g)| g).collect()
        };
        let voters = self.voter_set();
        let mut under = 0u64;
        for g in groups {
            let Some(sg) = self.host.stream(g) else { continue };
            if !sg.group.is_leader() {
                continue;
            }
            let mut after: Option<ChunkId> = None;
            loop {
                let page = sg
                    .blob_read(self.timeout(), false, |v| v.chunks(after.as_ref(), REPAIR_PAGE))
                    .await
                    .map_err(stream_failure)?;
                let Some((last, _)) = page.last() else { break };
                after = Some(*last);
                let alive_voters = voters.iter().filter(|m| !self.gone(**m, &voters)).count();
                let want = self.settings.replicas.min(alive_voters);
                for (id, rec) in page {
                    if rec.refs == 0 {
                        continue;
                    }
                    let mut live: Vec<MemberId> =
                        rec.replicas.iter().copied().filter(|m| !self.gone(*m, &voters)).collect();
                    if live.len() == rec.replicas.len() && live.len() >= want {
                        continue;
                    }
                    if live.len() < want {
                        let data = match self.fetch_chunk(g, id, &live).await {
                            Ok(d) => d,
                            Err(e) => {
                                tracing::warn!(chunk = %hex(&id), "no live replica to repair from: {e:?}");
                                continue;
                            }
                        };
                        let mut candidates = self.chunk_targets(&id)?;
                        candidates.extend(voters.iter().copied());
                        let mut tried = BTreeSet::new();
                        for c in candidates {
                            if live.len() >= want {
                                break;
                            }
                            if live.contains(&c) || self.gone(c, &voters) || !tried.insert(c) {
                                continue;
                            }
                            let call = BlobCall::PutChunk { bucket: g, id, data: data.clone() };
                            if self.chunk_call(c, call).await.is_ok() {
                                live.push(c);
                                self.node.stats.blob.rereplicated.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    if live.len() < want {
                        under += 1;
                    }
                    // Unchanged (no copy could be made yet): no write.
                    if live != rec.replicas {
                        let cmd = BlobCommand::SetReplicas { id, replicas: live };
                        sg.blob_write(cmd, self.timeout()).await.map_err(stream_failure)?;
                    }
                }
            }
        }
        self.node.stats.blob.under_replicated.store(under, Ordering::Relaxed);
        Ok(())
    }

    /// One pass of the scrubber over this member's chunk files, at most
    /// `--blob-scrub-bytes-per-s`: each is read and verified; a corrupt one
    /// (removed by the read) is fetched from another replica and rewritten.
    async fn scrub_pass(&self) -> Result<(), Failure> {
        let rate = self.settings.scrub_bytes_per_s.max(1);
        let internal = |e: std::io::Error| Failure::Internal(e.to_string());
        let chunks = self.chunks.clone();
        let buckets = tokio::task::spawn_blocking(move || chunks.buckets())
            .await
            .map_err(|e| Failure::Internal(e.to_string()))?
            .map_err(internal)?;
        for bucket in buckets {
            let chunks = self.chunks.clone();
            let files = tokio::task::spawn_blocking(move || chunks.list(bucket))
                .await
                .map_err(|e| Failure::Internal(e.to_string()))?
                .map_err(internal)?;
            for (id, _) in files {
                let chunks = self.chunks.clone();
                let read = tokio::task::spawn_blocking(move || chunks.get(bucket, &id))
                    .await
                    .map_err(|e| Failure::Internal(e.to_string()))?;
                let bytes = match read {
                    Ok(data) => data.map_or(0, |d| d.len() as u64),
                    Err(ChunkError::Corrupt(_)) => {
                        if let Err(e) = self.heal(bucket, id).await {
                            self.node.stats.blob.repair_failed.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(chunk = %hex(&id), "scrub: corrupt chunk not repaired: {e:?}");
                        }
                        self.settings.chunk_bytes as u64
                    }
                    Err(e) => return Err(Failure::Internal(e.to_string())),
                };
                tokio::time::sleep(Duration::from_secs_f64(bytes as f64 / rate as f64)).await;
            }
        }
        Ok(())
    }

    /// Rewrites this member's copy of a chunk from another replica.
    async fn heal(&self, bucket: GroupId, id: ChunkId) -> Result<(), Failure> {
        let Some(name) = self.bucket_name(bucket).await? else { return Ok(()) };
        let record = match self.meta_read(&name, MetaRead::Chunk(id)).await? {
            MetaAnswer::Chunk(Some(r)) => r,
            // Collected meanwhile: nothing to heal.
            MetaAnswer::Chunk(None) => return Ok(()),
            other => return Err(Failure::Internal(format!("a read answered {other:?}"))),
        };
        let others: Vec<MemberId> = record.replicas.iter().copied().filter(|m| *m != self.node.member_id).collect();
        let data = self.fetch_chunk(bucket, id, &others).await?;
        let chunks = self.chunks.clone();
        tokio::task::spawn_blocking(move || chunks.put(bucket, &id, &data))
            .await
            .map_err(|e| Failure::Internal(e.to_string()))?
            .map_err(|e| Failure::Internal(e.to_string()))?;
        self.node.stats.blob.repaired.fetch_add(1, Ordering::Relaxed);
        tracing::info!(chunk = %hex(&id), "scrub: rewrote a corrupt chunk from another replica");
        Ok(())
    }

    fn voters(&self) -> usize {
        let Ok(txn) = self.node.group.backend.begin_read() else { return 0 };
        members::records(&txn).map_or(0, |r| r.into_iter().filter(|(_, r)| !r.learner).count())
    }

    fn member_name(&self, id: MemberId) -> String {
        let name = self
            .node
            .group
            .backend
            .begin_read()
            .ok()
            .and_then(|txn| members::records(&txn).ok()?.into_iter().find(|(m, _)| *m == id).map(|(_, r)| r.name));
        match name {
            Some(n) if !n.is_empty() => n,
            _ => format!("{id:x}"),
        }
    }

    /// One round of the keeper (see the module docs).
    async fn keep(&self) -> Result<(), Failure> {
        let names = {
            let txn = self.node.linearizable_txn().await.map_err(|s| Failure::Unavailable(s.message().to_string()))?;
            catalog::names(&txn, ServiceKind::Blob).map_err(|e| Failure::Internal(e.to_string()))?
        };
        let by_group: BTreeMap<GroupId, String> =
            names.into_iter().map(|(n, g)| (g, String::from_utf8_lossy(&n).into_owned())).collect();
        // Chunk files of buckets gone from the catalog.
        let chunks = self.chunks.clone();
        let here = tokio::task::spawn_blocking(move || chunks.buckets())
            .await
            .map_err(|e| Failure::Internal(e.to_string()))?
            .map_err(|e| Failure::Internal(e.to_string()))?;
        for g in &here {
            if !by_group.contains_key(g) {
                self.chunks.remove_bucket(*g).map_err(|e| Failure::Internal(e.to_string()))?;
                tracing::info!(group = g, "removed the chunk files of a deleted bucket");
            }
        }
        // Collection by the bucket groups this member leads.
        for (g, name) in &by_group {
            let Some(sg) = self.host.stream(*g) else { continue };
            if !sg.group.is_leader() {
                continue;
            }
            let reply =
                sg.blob_write(BlobCommand::Collect { now_ms: now_ms(), max: COLLECT_MAX }, self.timeout()).await;
            if let Ok(BlobReply::Collected(gone)) = reply {
                let mut per_member: BTreeMap<MemberId, Vec<ChunkId>> = BTreeMap::new();
                for (id, replicas) in &gone {
                    for m in replicas {
                        per_member.entry(*m).or_default().push(*id);
                    }
                }
                for (m, ids) in per_member {
                    // A member that misses this removes them as orphans later.
                    let _ = self.chunk_call(m, BlobCall::RemoveChunks { bucket: *g, ids }).await;
                }
                self.node.stats.blob.collected.fetch_add(gone.len() as u64, Ordering::Relaxed);
                if !gone.is_empty() {
                    tracing::info!(bucket = %name, chunks = gone.len(), "collected unreferenced chunks");
                }
            }
        }
        // Orphans: chunk files past the grace period that no record names.
        let grace = Duration::from_millis(COLLECT_GRACE_MS as u64);
        for g in here.into_iter().filter(|g| by_group.contains_key(g)) {
            let chunks = self.chunks.clone();
            let files = tokio::task::spawn_blocking(move || chunks.list(g))
                .await
                .map_err(|e| Failure::Internal(e.to_string()))?
                .map_err(|e| Failure::Internal(e.to_string()))?;
            let old: Vec<ChunkId> =
                files.into_iter().filter(|(_, t)| t.elapsed().is_ok_and(|age| age > grace)).map(|(id, _)| id).collect();
            for batch in old.chunks(1000) {
                let known = match self.meta_read(&by_group[&g], MetaRead::Known(batch.to_vec())).await? {
                    MetaAnswer::Known(k) => k,
                    other => return Err(Failure::Internal(format!("a read answered {other:?}"))),
                };
                for (id, known) in batch.iter().zip(known) {
                    if !known
                        && self.chunks.remove_if_stale(g, id, grace).map_err(|e| Failure::Internal(e.to_string()))?
                    {
                        self.node.stats.blob.orphans_removed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A metadata read on this member's replica of a bucket's group.
async fn read_here(g: &StreamGroup, read: MetaRead, timeout: Duration) -> Result<MetaAnswer, Failure> {
    g.blob_read(timeout, true, |v| {
        Ok(match read {
            MetaRead::Bucket => MetaAnswer::Bucket(v.bucket()?),
            MetaRead::Object(key) => MetaAnswer::Object(v.live_bucket()?.and(v.object(&key)?)),
            MetaRead::ObjectChunks(key) => {
                let found = match v.live_bucket()?.and(v.object(&key)?) {
                    None => None,
                    Some(o) => {
                        let ids: BTreeSet<ChunkId> = o.chunks().iter().map(|c| c.id).collect();
                        let mut records = Vec::new();
                        for id in ids {
                            if let Some(r) = v.chunk(&id)? {
                                records.push((id, r));
                            }
                        }
                        Some((o, records))
                    }
                };
                MetaAnswer::ObjectChunks(found)
            }
            MetaRead::List { prefix, delimiter, start_after, max_keys } => {
                let l = v.list(&prefix, &delimiter, &start_after, max_keys)?;
                MetaAnswer::List {
                    objects: l.objects,
                    common_prefixes: l.common_prefixes,
                    truncated: l.truncated,
                    last: l.last,
                }
            }
            MetaRead::Objects { after, limit } => MetaAnswer::Objects(v.objects(after.as_deref(), limit)?),
            MetaRead::Known(ids) => {
                let mut known = Vec::with_capacity(ids.len());
                for id in &ids {
                    known.push(v.chunk(id)?.is_some());
                }
                MetaAnswer::Known(known)
            }
            MetaRead::Upload(id) => MetaAnswer::Upload(v.live_bucket()?.and(v.upload(&id)?)),
            MetaRead::Parts { upload_id, after, limit } => {
                let found = match v.live_bucket()?.and(v.upload(&upload_id)?) {
                    None => None,
                    Some(u) => Some((u, v.parts(&upload_id, after, limit)?)),
                };
                MetaAnswer::Parts(found)
            }
            MetaRead::Chunk(id) => MetaAnswer::Chunk(v.chunk(&id)?),
            MetaRead::Keys => MetaAnswer::Keys(v.keys()?),
            MetaRead::Key(id) => MetaAnswer::Key(v.key(&id)?),
        })
    })
    .await
    .map_err(stream_failure)
}

/// Runs the keeper for the member's lifetime.
pub async fn run_keeper(service: Arc<BlobService>) {
    let mut tick = tokio::time::interval(KEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = service.keep().await {
            tracing::debug!("blob keeper round: {e:?}");
        }
    }
}

/// Runs the scrubber for the member's lifetime (when a scrub rate is set).
pub async fn run_scrubber(service: Arc<BlobService>) {
    if service.settings.scrub_bytes_per_s == 0 {
        return std::future::pending().await;
    }
    loop {
        if let Err(e) = service.scrub_pass().await {
            tracing::debug!("blob scrub pass: {e:?}");
        }
        tokio::time::sleep(SCRUB_PASS_PAUSE).await;
    }
}

/// Runs the repairer for the member's lifetime.
pub async fn run_repairer(service: Arc<BlobService>) {
    let mut tick = tokio::time::interval(REPAIR_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = service.repair_round().await {
            tracing::debug!("blob repair round: {e:?}");
        }
    }
}

/// Answers the blob calls other members forward here.
pub struct ForwardedBlobCalls(pub std::sync::Weak<BlobService>);

impl crate::consensus::MemberCalls for ForwardedBlobCalls {
    fn call(&self, req: Vec<u8>) -> openraft::base::BoxFuture<'static, Result<Vec<u8>, String>> {
        let service = self.0.upgrade();
        Box::pin(async move {
            let service = service.ok_or("the blob service has stopped")?;
            let (call, _) = crate::consensus::decode_bounded::<BlobCall>(&req).map_err(|e| e.to_string())?;
            let answer = service.run_call(call).await;
            bincode::serde::encode_to_vec(&answer, bincode::config::standard()).map_err(|e| e.to_string())
        })
    }
}

fn info(bucket: &str, key: &str, o: &ObjectRecord) -> pb::ObjectInfo {
    pb::ObjectInfo {
        bucket: bucket.to_string(),
        key: key.to_string(),
        size: o.size,
        etag: o.etag.clone(),
        content_type: o.content_type.clone(),
        modified_ms: o.modified_ms,
        metadata: o.metadata.iter().cloned().collect(),
        chunks: o.chunks().len() as u32,
    }
}

/// `concord.blob.v1.Blob` over the member's [`BlobService`].
pub struct BlobApi(pub Arc<BlobService>);

type GetStream = Pin<Box<dyn futures::Stream<Item = Result<pb::GetResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Blob for BlobApi {
    async fn create_bucket(
        &self,
        req: Request<pb::CreateBucketRequest>,
    ) -> Result<Response<pb::CreateBucketResponse>, Status> {
        self.0.authorize(&req)?;
        let b = self.0.create_bucket(&req.get_ref().bucket).await?;
        Ok(Response::new(pb::CreateBucketResponse {
            bucket: Some(pb::Bucket { name: b.name, created_ms: b.created_ms }),
        }))
    }

    async fn delete_bucket(
        &self,
        req: Request<pb::DeleteBucketRequest>,
    ) -> Result<Response<pb::DeleteBucketResponse>, Status> {
        self.0.authorize(&req)?;
        self.0.delete_bucket(&req.get_ref().bucket).await?;
        Ok(Response::new(pb::DeleteBucketResponse {}))
    }

    async fn list_buckets(
        &self,
        req: Request<pb::ListBucketsRequest>,
    ) -> Result<Response<pb::ListBucketsResponse>, Status> {
        self.0.authorize(&req)?;
        let buckets = self.0.list_buckets().await?;
        let buckets = buckets.into_iter().map(|b| pb::Bucket { name: b.name, created_ms: b.created_ms }).collect();
        Ok(Response::new(pb::ListBucketsResponse { buckets }))
    }

    async fn put(&self, req: Request<Streaming<pb::PutRequest>>) -> Result<Response<pb::PutResponse>, Status> {
        self.0.authorize(&req)?;
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(pb::PutRequest { part: Some(pb::put_request::Part::Header(h)) }) => h,
            _ => return Err(Status::invalid_argument("the first message of a put is its header")),
        };
        let source: Source<'_> = Box::pin(stream.map(|m| match m {
            Ok(pb::PutRequest { part: Some(pb::put_request::Part::Data(d)) }) => Ok(d),
            Ok(_) => Err(Failure::Invalid("a put has one header, first".into())),
            Err(s) => Err(Failure::Invalid(format!("the put's stream failed: {}", s.message()))),
        }));
        let metadata = header.metadata.into_iter().collect();
        let o = self
            .0
            .put_object(&header.bucket, &header.key, header.content_type, metadata, source, Box::new(|| Ok(())))
            .await?;
        Ok(Response::new(pb::PutResponse { object: Some(info(&header.bucket, &header.key, &o)) }))
    }

    type GetStream = GetStream;

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<GetStream>, Status> {
        self.0.authorize(&req)?;
        let r = req.into_inner();
        let (o, rx) = self.0.get_object(&r.bucket, &r.key, r.offset, r.length).await?;
        let first = pb::GetResponse { object: Some(info(&r.bucket, &r.key, &o)), data: Vec::new() };
        let rest = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|piece| piece.map(|data| pb::GetResponse { object: None, data }).map_err(Status::from));
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(first)]).chain(rest))))
    }

    async fn head(&self, req: Request<pb::HeadRequest>) -> Result<Response<pb::HeadResponse>, Status> {
        self.0.authorize(&req)?;
        let r = req.get_ref();
        let o = self.0.head(&r.bucket, &r.key).await?;
        Ok(Response::new(pb::HeadResponse { object: Some(info(&r.bucket, &r.key, &o)) }))
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        self.0.authorize(&req)?;
        let r = req.into_inner();
        let max = match r.max_keys {
            0 => 1000,
            n => n as usize,
        };
        let answer = self.0.list(&r.bucket, r.prefix, r.delimiter, r.start_after, max).await?;
        let MetaAnswer::List { objects, common_prefixes, truncated, last } = answer else {
            return Err(Status::internal("a list answered something else"));
        };
        Ok(Response::new(pb::ListResponse {
            objects: objects.iter().map(|(k, o)| info(&r.bucket, k, o)).collect(),
            common_prefixes,
            truncated,
            next_start_after: if truncated { last.unwrap_or_default() } else { String::new() },
        }))
    }

    async fn copy(&self, req: Request<pb::CopyRequest>) -> Result<Response<pb::PutResponse>, Status> {
        self.0.authorize(&req)?;
        let r = req.get_ref();
        let o = self.0.copy(&r.src_bucket, &r.src_key, &r.bucket, &r.key).await?;
        Ok(Response::new(pb::PutResponse { object: Some(info(&r.bucket, &r.key, &o)) }))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        self.0.authorize(&req)?;
        let r = req.get_ref();
        self.0.delete(&r.bucket, &r.key).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_key(&self, req: Request<pb::CreateKeyRequest>) -> Result<Response<pb::CreateKeyResponse>, Status> {
        self.0.authorize(&req)?;
        let (access_key_id, key) = self.0.create_key().await?;
        Ok(Response::new(pb::CreateKeyResponse {
            access_key_id,
            secret_access_key: key.secret,
            created_ms: key.created_ms,
        }))
    }

    async fn list_keys(&self, req: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.0.authorize(&req)?;
        let keys = self.0.list_keys().await?;
        let keys =
            keys.into_iter().map(|(id, k)| pb::KeyInfo { access_key_id: id, created_ms: k.created_ms }).collect();
        Ok(Response::new(pb::ListKeysResponse { keys }))
    }

    async fn delete_key(&self, req: Request<pb::DeleteKeyRequest>) -> Result<Response<pb::DeleteKeyResponse>, Status> {
        self.0.authorize(&req)?;
        self.0.delete_key(&req.get_ref().access_key_id).await?;
        Ok(Response::new(pb::DeleteKeyResponse {}))
    }

    async fn fsck(&self, req: Request<pb::FsckRequest>) -> Result<Response<pb::FsckResponse>, Status> {
        self.0.authorize(&req)?;
        let bucket = req.get_ref().bucket.clone();
        let out = self.0.fsck((!bucket.is_empty()).then_some(bucket.as_str())).await?;
        Ok(Response::new(out))
    }
}
