//! A bucket's metadata: its objects' manifests and its chunks' reference
//! counts, as pure logic over an ordered table (the ordered-table service of
//! [`crate::streams`] replicates it, one Raft group per bucket).
//!
//! Rows:
//! - `B` → the bucket ([`BucketRecord`]).
//! - `o` ‖ key → an object's manifest ([`ObjectRecord`]): its size, ETag,
//!   content type, user metadata, and its bytes inline (small objects) or as the
//!   list of its chunks.
//! - `u` ‖ upload id → a multipart upload in progress ([`UploadRecord`]); `p` ‖
//!   upload id ‖ 0 ‖ part number (4 bytes, big-endian) → an uploaded part
//!   ([`PartRecord`]), whose chunks count as referenced until the upload is
//!   completed (the object takes them over) or aborted.
//! - `K` ‖ access key id → an S3 access key ([`KeyRecord`]), only in the
//!   [`KEYS_GROUP`] group.
//! - `z` ‖ time ‖ BLAKE3 hash → nothing: the index of chunks at zero references
//!   since that time, which collection walks oldest first.
//! - `c` ‖ BLAKE3 hash → a chunk ([`ChunkRecord`]): its size, the members
//!   holding a replica, and how many chunk references of committed objects
//!   name it. A chunk whose count reaches zero is kept for the collector's grace
//!   period, then its record goes and its files with it.
//!
//! What it guarantees (checked by the tests below):
//! - A chunk referenced by a committed object has a record with a count of at
//!   least its references: a put adds before the replaced object's references
//!   are dropped, and [`BlobCommand::Collect`] removes only records at zero
//!   references past the grace period.
//! - A put whose chunk writes started longer than [`MAX_PUT_MS`] before its
//!   commit is refused: a member's sweeper deletes unreferenced chunk files only
//!   once they are older than the grace period, so a put that commits is never
//!   left naming a chunk file swept while it ran.
//! - Every decision uses only the command and the table (the proposer's clock
//!   travels in the command): every replica computes the same reply.

use serde::{Deserialize, Serialize};

use crate::consensus::MemberId;
use crate::streams::model::Table;

/// A chunk's id: the BLAKE3 hash of its bytes.
pub type ChunkId = [u8; 32];

/// How long a chunk nothing references is kept before it is collected (a put
/// reusing it within that time keeps it).
pub const COLLECT_GRACE_MS: i64 = 10 * 60 * 1000;

/// Longest time from a put's first chunk write to its commit (half the grace
/// period, so clocks of members that differ by less than the other half do not
/// let a sweeper delete a put's fresh chunk).
pub const MAX_PUT_MS: i64 = COLLECT_GRACE_MS / 2;

const BUCKET_ROW: &[u8] = b"B";
const OBJECT: u8 = b'o';
const CHUNK: u8 = b'c';
const KEY: u8 = b'K';
const UPLOAD: u8 = b'u';
const PART: u8 = b'p';
const UNREFERENCED: u8 = b'z';

/// The group holding the S3 access keys: a catalog name no bucket can have.
pub const KEYS_GROUP: &str = "_s3keys";

/// Least size of a multipart upload's parts but the last (S3's limit).
pub const MIN_PART_BYTES: u64 = 5 << 20;

/// Most parts in a multipart upload (S3's limit).
pub const MAX_PARTS: u32 = 10_000;

/// Rows read per scan of a listing.
const SCAN_ROWS: usize = 1000;

/// The bucket a group holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRecord {
    pub name: String,
    pub created_ms: i64,
    /// Set by a delete that found it empty: puts are refused from then on,
    /// while the catalog group is removed.
    pub deleting: bool,
}

/// One chunk of an object, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub size: u32,
}

/// Where an object's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// In the manifest itself (objects up to the inline limit).
    Inline(#[serde(with = "crate::consensus::raw_bytes")] Vec<u8>),
    Chunks(Vec<ChunkRef>),
}

/// An object's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub size: u64,
    /// Quoted hex MD5 of the bytes (S3's single-part ETag).
    pub etag: String,
    pub content_type: String,
    pub metadata: Vec<(String, String)>,
    pub modified_ms: i64,
    pub body: Body,
}

impl ObjectRecord {
    pub fn chunks(&self) -> &[ChunkRef] {
        match &self.body {
            Body::Inline(_) => &[],
            Body::Chunks(c) => c,
        }
    }
}

/// A multipart upload in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRecord {
    pub key: String,
    pub content_type: String,
    pub metadata: Vec<(String, String)>,
    pub created_ms: i64,
}

/// An uploaded part of a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    pub size: u64,
    /// The part's MD5 (its ETag is the hex of it, quoted).
    pub md5: [u8; 16],
    pub chunks: Vec<ChunkRef>,
    pub modified_ms: i64,
}

impl PartRecord {
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.md5.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }
}

/// An S3 access key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub secret: String,
    pub created_ms: i64,
}

/// A chunk's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRecord {
    pub size: u32,
    /// Members holding a replica that was fsynced when it was written.
    pub replicas: Vec<MemberId>,
    /// References from committed objects (a chunk twice in one object counts twice).
    pub refs: u64,
    /// When `refs` last fell to zero.
    pub unreferenced_since_ms: Option<i64>,
}

/// A chunk of a put, with the members its write reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedChunk {
    pub id: ChunkId,
    pub size: u32,
    pub replicas: Vec<MemberId>,
}

/// A write to a bucket's metadata: one log entry's command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BlobCommand {
    /// Makes the group's bucket exist (a new group's first command).
    CreateBucket {
        name: String,
        now_ms: i64,
    },
    /// Marks an empty bucket deleting; refused while it holds an object.
    DeleteBucket,
    /// Commits an object's manifest under `key`, replacing any there.
    Put {
        key: String,
        object: ObjectRecord,
        /// Every distinct chunk of the object with the replicas written.
        placed: Vec<PlacedChunk>,
        /// When the put's first chunk write started (proposer's clock).
        started_ms: i64,
        now_ms: i64,
    },
    Delete {
        key: String,
        now_ms: i64,
    },
    /// Records the replicas a chunk has now (after a repair or a move).
    SetReplicas {
        id: ChunkId,
        replicas: Vec<MemberId>,
    },
    /// Removes up to `max` chunk records unreferenced for the grace period.
    Collect {
        now_ms: i64,
        max: usize,
    },
    CreateUpload {
        upload_id: String,
        upload: UploadRecord,
    },
    /// Records part `number` of an upload (replacing one uploaded before).
    PutPart {
        upload_id: String,
        number: u32,
        part: PartRecord,
        placed: Vec<PlacedChunk>,
        started_ms: i64,
        now_ms: i64,
    },
    /// Makes the object from the listed parts (number and ETag, ascending).
    CompleteUpload {
        upload_id: String,
        parts: Vec<(u32, String)>,
        now_ms: i64,
    },
    AbortUpload {
        upload_id: String,
        now_ms: i64,
    },
    CreateKey {
        access_key_id: String,
        key: KeyRecord,
    },
    DeleteKey {
        access_key_id: String,
    },
}

/// Why a blob command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum BlobError {
    #[error("The specified bucket does not exist")]
    NoSuchBucket,
    #[error("Your previous request to create the named bucket succeeded and you already own it.")]
    BucketExists,
    #[error("The bucket you tried to delete is not empty")]
    BucketNotEmpty,
    #[error("The specified key does not exist.")]
    NoSuchKey,
    #[error("the put took longer than {MAX_PUT_MS} ms from its first chunk to its commit; try again")]
    PutTooSlow,
    #[error("a chunk of the object has no replica")]
    Unplaced,
    #[error("The specified multipart upload does not exist. The upload ID might be invalid, or the multipart upload might have been aborted or completed.")]
    NoSuchUpload,
    #[error("One or more of the specified parts could not be found. The part might not have been uploaded, or the specified entity tag might not have matched the part's entity tag.")]
    InvalidPart,
    #[error("The list of parts was not in ascending order. Parts list must be specified in order by part number.")]
    InvalidPartOrder,
    #[error("Your proposed upload is smaller than the minimum allowed object size.")]
    EntityTooSmall,
    #[error("the access key exists")]
    KeyExists,
    #[error("The AWS access key Id you provided does not exist in our records.")]
    NoSuchAccessKey,
}

/// The reply to a [`BlobCommand`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobReply {
    Bucket(BucketRecord),
    Done,
    Put(ObjectRecord),
    /// Whether a delete found the object.
    Deleted(bool),
    /// The collected chunks and where their replicas were.
    Collected(Vec<(ChunkId, Vec<MemberId>)>),
    Refused(BlobError),
}

/// A stored row that does not decode: the state is damaged.
#[derive(Debug, thiserror::Error)]
#[error("blob metadata row {key:?} does not decode: {why}")]
pub struct Corrupt {
    pub key: Vec<u8>,
    pub why: String,
}

impl From<Corrupt> for crate::streams::model::Corrupt {
    fn from(c: Corrupt) -> Self {
        crate::streams::model::Corrupt(c.to_string())
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).expect("in-memory encoding cannot fail")
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], b: &[u8]) -> Result<T, Corrupt> {
    crate::consensus::decode_bounded(b).map(|(v, _)| v).map_err(|e| Corrupt { key: key.to_vec(), why: e.to_string() })
}

fn object_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(OBJECT);
    k.extend_from_slice(key.as_bytes());
    k
}

fn upload_key(upload_id: &str) -> Vec<u8> {
    [&[UPLOAD], upload_id.as_bytes()].concat()
}

fn part_key(upload_id: &str, number: u32) -> Vec<u8> {
    [&[PART], upload_id.as_bytes(), &[0], &number.to_be_bytes()].concat()
}

/// The end of an upload's part rows (upload ids hold no 0 byte).
fn part_prefix_end(upload_id: &str) -> Vec<u8> {
    [&[PART], upload_id.as_bytes(), &[1]].concat()
}

/// The index of unreferenced chunks: `z` ‖ since (ms, 8 bytes big-endian) ‖ id.
fn unreferenced_key(since_ms: i64, id: &ChunkId) -> Vec<u8> {
    [&[UNREFERENCED], &(since_ms.max(0) as u64).to_be_bytes()[..], id].concat()
}

fn key_row(access_key_id: &str) -> Vec<u8> {
    [&[KEY], access_key_id.as_bytes()].concat()
}

fn chunk_key(id: &ChunkId) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(CHUNK);
    k.extend_from_slice(id);
    k
}

/// The least key greater than every key starting with `prefix` (`None`: no bound).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// One page of a listing.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub objects: Vec<(String, ObjectRecord)>,
    pub common_prefixes: Vec<String>,
    pub truncated: bool,
    /// The last key or common prefix on the page (the next page starts after it).
    pub last: Option<String>,
}

/// Reads of a bucket's metadata.
pub struct BlobView<'a, T: Table + ?Sized> {
    pub table: &'a T,
}

impl<T: Table + ?Sized> BlobView<'_, T> {
    pub fn bucket(&self) -> Result<Option<BucketRecord>, Corrupt> {
        self.table.get(BUCKET_ROW).map(|v| decode(BUCKET_ROW, &v)).transpose()
    }

    /// The bucket, if it exists and is not being deleted.
    pub fn live_bucket(&self) -> Result<Option<BucketRecord>, Corrupt> {
        Ok(self.bucket()?.filter(|b| !b.deleting))
    }

    pub fn object(&self, key: &str) -> Result<Option<ObjectRecord>, Corrupt> {
        let k = object_key(key);
        self.table.get(&k).map(|v| decode(&k, &v)).transpose()
    }

    pub fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkRecord>, Corrupt> {
        let k = chunk_key(id);
        self.table.get(&k).map(|v| decode(&k, &v)).transpose()
    }

    /// Whether the bucket holds any object or upload in progress.
    pub fn has_objects(&self) -> bool {
        !self.table.range(&[OBJECT], &[OBJECT + 1], false, 1).is_empty()
            || !self.table.range(&[UPLOAD], &[UPLOAD + 1], false, 1).is_empty()
    }

    pub fn upload(&self, upload_id: &str) -> Result<Option<UploadRecord>, Corrupt> {
        let k = upload_key(upload_id);
        self.table.get(&k).map(|v| decode(&k, &v)).transpose()
    }

    /// Up to `limit` parts of an upload numbered above `after`, in order.
    pub fn parts(&self, upload_id: &str, after: u32, limit: usize) -> Result<Vec<(u32, PartRecord)>, Corrupt> {
        let from = part_key(upload_id, after.saturating_add(1));
        let end = part_prefix_end(upload_id);
        let mut out = Vec::new();
        if after == u32::MAX {
            return Ok(out);
        }
        for (k, v) in self.table.range(&from, &end, false, limit) {
            let n = k.len().checked_sub(4).and_then(|at| k[at..].try_into().ok()).map(u32::from_be_bytes);
            let n = n.ok_or_else(|| Corrupt { key: k.clone(), why: "a part key without a number".into() })?;
            out.push((n, decode(&k, &v)?));
        }
        Ok(out)
    }

    pub fn key(&self, access_key_id: &str) -> Result<Option<KeyRecord>, Corrupt> {
        let k = key_row(access_key_id);
        self.table.get(&k).map(|v| decode(&k, &v)).transpose()
    }

    /// Every access key, by id.
    pub fn keys(&self) -> Result<Vec<(String, KeyRecord)>, Corrupt> {
        let mut out = Vec::new();
        for (k, v) in self.table.range(&[KEY], &[KEY + 1], false, usize::MAX) {
            out.push((self.key_of(&k)?, decode(&k, &v)?));
        }
        Ok(out)
    }

    /// Up to `limit` chunk records with ids after `after`, in id order.
    pub fn chunks(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<(ChunkId, ChunkRecord)>, Corrupt> {
        let from = match after {
            Some(id) => {
                let mut k = chunk_key(id);
                k.push(0);
                k
            }
            None => vec![CHUNK],
        };
        let mut out = Vec::new();
        for (k, v) in self.table.range(&from, &[CHUNK + 1], false, limit) {
            let id: ChunkId =
                k[1..].try_into().map_err(|_| Corrupt { key: k.clone(), why: "a chunk id is not 32 bytes".into() })?;
            out.push((id, decode(&k, &v)?));
        }
        Ok(out)
    }

    /// Up to `limit` objects with keys after `after`, in key order.
    pub fn objects(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, ObjectRecord)>, Corrupt> {
        let from = match after {
            Some(a) => {
                let mut k = object_key(a);
                k.push(0);
                k
            }
            None => vec![OBJECT],
        };
        let mut out = Vec::new();
        for (k, v) in self.table.range(&from, &[OBJECT + 1], false, limit) {
            out.push((self.key_of(&k)?, decode(&k, &v)?));
        }
        Ok(out)
    }

    fn key_of(&self, row: &[u8]) -> Result<String, Corrupt> {
        String::from_utf8(row[1..].to_vec()).map_err(|e| Corrupt { key: row.to_vec(), why: e.to_string() })
    }

    /// S3's ListObjectsV2 over the bucket: keys starting with `prefix` and after
    /// `start_after`; with a `delimiter`, the keys that hold it past the prefix
    /// are rolled into common prefixes (each counting once toward `max_keys`).
    pub fn list(&self, prefix: &str, delimiter: &str, start_after: &str, max_keys: usize) -> Result<Listing, Corrupt> {
        let mut listing = Listing::default();
        let end = match prefix_end(&object_key(prefix)) {
            Some(e) => e,
            None => vec![OBJECT + 1],
        };
        let mut from = object_key(prefix);
        if start_after.as_bytes() >= prefix.as_bytes() {
            from = object_key(start_after);
            from.push(0);
        }
        loop {
            let rows = self.table.range(&from, &end, false, SCAN_ROWS);
            let full = rows.len() == SCAN_ROWS;
            let mut next = match rows.last() {
                Some((last, _)) if full => [last.as_slice(), &[0]].concat(),
                _ => end.clone(),
            };
            for (k, v) in &rows {
                let key = self.key_of(k)?;
                let common = match delimiter.is_empty() {
                    true => None,
                    false => key[prefix.len()..]
                        .find(delimiter)
                        .map(|at| key[..prefix.len() + at + delimiter.len()].to_string()),
                };
                // A common prefix the previous page ended on is not repeated.
                let repeated = common.as_deref() == Some(start_after);
                if !repeated && listing.objects.len() + listing.common_prefixes.len() >= max_keys {
                    listing.truncated = true;
                    return Ok(listing);
                }
                match common {
                    Some(cp) => {
                        // Every key under the common prefix is skipped.
                        next = prefix_end(&object_key(&cp)).unwrap_or_else(|| end.clone());
                        if !repeated {
                            listing.last = Some(cp.clone());
                            listing.common_prefixes.push(cp);
                        }
                        break;
                    }
                    None => {
                        listing.last = Some(key.clone());
                        listing.objects.push((key, decode(k, v)?));
                    }
                }
            }
            if next >= end {
                return Ok(listing);
            }
            from = next;
        }
    }
}

/// Applies blob commands to a bucket's table.
pub struct BlobApply<'a, T: Table + ?Sized> {
    pub table: &'a mut T,
}

impl<T: Table + ?Sized> BlobApply<'_, T> {
    fn view(&self) -> BlobView<'_, T> {
        BlobView { table: &*self.table }
    }

    fn put_chunk(&mut self, id: &ChunkId, rec: &ChunkRecord) {
        self.table.put(&chunk_key(id), &encode(rec));
    }

    pub fn apply(&mut self, cmd: BlobCommand) -> Result<BlobReply, Corrupt> {
        let bucket = self.view().bucket()?;
        let refused = |e| Ok(BlobReply::Refused(e));
        match cmd {
            BlobCommand::CreateBucket { name, now_ms } => {
                if let Some(b) = bucket {
                    return match b.deleting {
                        true => refused(BlobError::NoSuchBucket),
                        false => refused(BlobError::BucketExists),
                    };
                }
                let b = BucketRecord { name, created_ms: now_ms, deleting: false };
                self.table.put(BUCKET_ROW, &encode(&b));
                Ok(BlobReply::Bucket(b))
            }
            BlobCommand::DeleteBucket => {
                let Some(mut b) = bucket else { return refused(BlobError::NoSuchBucket) };
                if self.view().has_objects() {
                    return refused(BlobError::BucketNotEmpty);
                }
                b.deleting = true;
                self.table.put(BUCKET_ROW, &encode(&b));
                Ok(BlobReply::Done)
            }
            BlobCommand::Put { key, object, placed, started_ms, now_ms } => {
                if bucket.is_none_or(|b| b.deleting) {
                    return refused(BlobError::NoSuchBucket);
                }
                if now_ms.saturating_sub(started_ms) > MAX_PUT_MS {
                    return refused(BlobError::PutTooSlow);
                }
                if !self.acquire(object.chunks(), &placed)? {
                    return refused(BlobError::Unplaced);
                }
                let mut object = object;
                object.modified_ms = now_ms;
                if let Some(old) = self.view().object(&key)? {
                    self.release(&old, now_ms)?;
                }
                self.table.put(&object_key(&key), &encode(&object));
                Ok(BlobReply::Put(object))
            }
            BlobCommand::Delete { key, now_ms } => {
                if bucket.is_none_or(|b| b.deleting) {
                    return refused(BlobError::NoSuchBucket);
                }
                match self.view().object(&key)? {
                    None => Ok(BlobReply::Deleted(false)),
                    Some(old) => {
                        self.release(&old, now_ms)?;
                        self.table.delete(&object_key(&key));
                        Ok(BlobReply::Deleted(true))
                    }
                }
            }
            BlobCommand::SetReplicas { id, replicas } => {
                if let Some(mut rec) = self.view().chunk(&id)? {
                    rec.replicas = replicas;
                    self.put_chunk(&id, &rec);
                }
                Ok(BlobReply::Done)
            }
            BlobCommand::Collect { now_ms, max } => {
                // The index of unreferenced chunks, oldest first, up to those
                // unreferenced for the grace period: no scan of every chunk.
                let due = unreferenced_key(now_ms.saturating_sub(COLLECT_GRACE_MS).saturating_add(1), &[0; 32]);
                let mut collected = Vec::new();
                for (k, _) in self.table.range(&[UNREFERENCED], &due, false, max) {
                    self.table.delete(&k);
                    let id: ChunkId = k[9..].try_into().map_err(|_| Corrupt {
                        key: k.clone(),
                        why: "an unreferenced-index key without a chunk id".into(),
                    })?;
                    if let Some(rec) = self.view().chunk(&id)?.filter(|r| r.refs == 0) {
                        self.table.delete(&chunk_key(&id));
                        collected.push((id, rec.replicas));
                    }
                }
                Ok(BlobReply::Collected(collected))
            }
            BlobCommand::CreateUpload { upload_id, upload } => {
                if bucket.is_none_or(|b| b.deleting) {
                    return refused(BlobError::NoSuchBucket);
                }
                self.table.put(&upload_key(&upload_id), &encode(&upload));
                Ok(BlobReply::Done)
            }
            BlobCommand::PutPart { upload_id, number, part, placed, started_ms, now_ms } => {
                if bucket.is_none_or(|b| b.deleting) {
                    return refused(BlobError::NoSuchBucket);
                }
                if self.view().upload(&upload_id)?.is_none() {
                    return refused(BlobError::NoSuchUpload);
                }
                if now_ms.saturating_sub(started_ms) > MAX_PUT_MS {
                    return refused(BlobError::PutTooSlow);
                }
                if !self.acquire(&part.chunks, &placed)? {
                    return refused(BlobError::Unplaced);
                }
                let k = part_key(&upload_id, number);
                if let Some(old) = self.table.get(&k) {
                    let old: PartRecord = decode(&k, &old)?;
                    self.release_chunks(&old.chunks, now_ms)?;
                }
                let mut part = part;
                part.modified_ms = now_ms;
                self.table.put(&k, &encode(&part));
                Ok(BlobReply::Done)
            }
            BlobCommand::CompleteUpload { upload_id, parts, now_ms } => {
                if bucket.is_none_or(|b| b.deleting) {
                    return refused(BlobError::NoSuchBucket);
                }
                let Some(upload) = self.view().upload(&upload_id)? else { return refused(BlobError::NoSuchUpload) };
                if parts.is_empty() {
                    return refused(BlobError::InvalidPart);
                }
                if parts.windows(2).any(|w| w[0].0 >= w[1].0) {
                    return refused(BlobError::InvalidPartOrder);
                }
                let stored: std::collections::BTreeMap<u32, PartRecord> =
                    self.view().parts(&upload_id, 0, usize::MAX)?.into_iter().collect();
                let mut chosen = Vec::with_capacity(parts.len());
                for (i, (n, etag)) in parts.iter().enumerate() {
                    let Some(p) = stored.get(n) else { return refused(BlobError::InvalidPart) };
                    if p.etag().trim_matches('"') != etag.trim_matches('"') {
                        return refused(BlobError::InvalidPart);
                    }
                    if i + 1 < parts.len() && p.size < MIN_PART_BYTES {
                        return refused(BlobError::EntityTooSmall);
                    }
                    chosen.push(p);
                }
                let mut md5s = Vec::with_capacity(16 * chosen.len());
                for p in &chosen {
                    md5s.extend_from_slice(&p.md5);
                }
                use md5::Digest;
                let digest: String = md5::Md5::digest(&md5s).iter().map(|b| format!("{b:02x}")).collect();
                let object = ObjectRecord {
                    size: chosen.iter().map(|p| p.size).sum(),
                    etag: format!("\"{digest}-{}\"", chosen.len()),
                    content_type: upload.content_type,
                    metadata: upload.metadata,
                    modified_ms: now_ms,
                    body: Body::Chunks(chosen.iter().flat_map(|p| p.chunks.iter().copied()).collect()),
                };
                // The object takes over the chosen parts' references; the others go.
                let chosen_numbers: std::collections::BTreeSet<u32> = parts.iter().map(|(n, _)| *n).collect();
                for (n, p) in &stored {
                    if !chosen_numbers.contains(n) {
                        self.release_chunks(&p.chunks, now_ms)?;
                    }
                    self.table.delete(&part_key(&upload_id, *n));
                }
                self.table.delete(&upload_key(&upload_id));
                if let Some(old) = self.view().object(&upload.key)? {
                    self.release(&old, now_ms)?;
                }
                self.table.put(&object_key(&upload.key), &encode(&object));
                Ok(BlobReply::Put(object))
            }
            BlobCommand::AbortUpload { upload_id, now_ms } => {
                if self.view().upload(&upload_id)?.is_none() {
                    return refused(BlobError::NoSuchUpload);
                }
                for (n, p) in self.view().parts(&upload_id, 0, usize::MAX)? {
                    self.release_chunks(&p.chunks, now_ms)?;
                    self.table.delete(&part_key(&upload_id, n));
                }
                self.table.delete(&upload_key(&upload_id));
                Ok(BlobReply::Done)
            }
            BlobCommand::CreateKey { access_key_id, key } => {
                if self.view().key(&access_key_id)?.is_some() {
                    return refused(BlobError::KeyExists);
                }
                self.table.put(&key_row(&access_key_id), &encode(&key));
                Ok(BlobReply::Done)
            }
            BlobCommand::DeleteKey { access_key_id } => {
                if self.view().key(&access_key_id)?.is_none() {
                    return refused(BlobError::NoSuchAccessKey);
                }
                self.table.delete(&key_row(&access_key_id));
                Ok(BlobReply::Done)
            }
        }
    }

    /// Adds a reference to each of `chunks`, recording the replicas `placed`
    /// names; false (and nothing changed) when a chunk is neither placed now
    /// nor known already.
    fn acquire(&mut self, chunks: &[ChunkRef], placed: &[PlacedChunk]) -> Result<bool, Corrupt> {
        for c in chunks {
            let here = placed.iter().any(|p| p.id == c.id && !p.replicas.is_empty());
            if !here && self.view().chunk(&c.id)?.is_none() {
                return Ok(false);
            }
        }
        for c in chunks {
            let written = placed.iter().find(|p| p.id == c.id);
            let mut rec = match self.view().chunk(&c.id)? {
                Some(r) => r,
                None => ChunkRecord { size: c.size, replicas: Vec::new(), refs: 0, unreferenced_since_ms: None },
            };
            if let Some(p) = written {
                for m in &p.replicas {
                    if !rec.replicas.contains(m) {
                        rec.replicas.push(*m);
                    }
                }
            }
            if let Some(since) = rec.unreferenced_since_ms.take() {
                self.table.delete(&unreferenced_key(since, &c.id));
            }
            rec.refs += 1;
            self.put_chunk(&c.id, &rec);
        }
        Ok(true)
    }

    /// Drops an object's references to its chunks.
    fn release(&mut self, object: &ObjectRecord, now_ms: i64) -> Result<(), Corrupt> {
        self.release_chunks(object.chunks(), now_ms)
    }

    fn release_chunks(&mut self, chunks: &[ChunkRef], now_ms: i64) -> Result<(), Corrupt> {
        for c in chunks {
            if let Some(mut rec) = self.view().chunk(&c.id)? {
                if rec.refs == 0 {
                    continue;
                }
                rec.refs -= 1;
                if rec.refs == 0 {
                    rec.unreferenced_since_ms = Some(now_ms);
                    self.table.put(&unreferenced_key(now_ms, &c.id), &[]);
                }
                self.put_chunk(&c.id, &rec);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
