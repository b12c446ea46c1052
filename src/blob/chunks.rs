//! This member's chunk files: the bytes of blob objects, outside Raft.
//!
//! A chunk is a file named by the BLAKE3 hash of its bytes, under its bucket's
//! group: `member/blobs/<group id>/<first two hex digits>/<hash hex>`.
//! What it guarantees:
//! - A stored chunk was verified against its name when written, and is
//!   durable before [`ChunkStore::put`] returns: written to a scratch file,
//!   fsynced, renamed into place, and the directory fsynced (crash point: a
//!   crash before the rename leaves only a scratch file, removed at open).
//! - A read verifies the whole chunk against its name: a corrupt file is
//!   never served. It is removed (so a repair can write a good copy) and
//!   counted in [`ChunkStore::corrupt_found`].
//! - Writing a chunk that is already here (content addressing makes retries
//!   and shared chunks the same bytes) verifies the file and renews its
//!   modification time, which the collector and the sweeper read as "recently
//!   wanted": they remove a file only through [`ChunkStore::remove_if_stale`],
//!   which checks the time and removes under the same lock a write holds, so a
//!   put that found its chunk here never has it removed behind its back.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::consensus::GroupId;
use crate::streams::bucket::ChunkId;

/// Suffix of a chunk being written (never read as a chunk).
const SCRATCH_SUFFIX: &str = ".partial";

/// Why a chunk could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk bytes do not hash to {0}")]
    Mismatch(String),
    #[error("chunk {0} was corrupt here and was removed")]
    Corrupt(String),
    #[error("chunk storage: {0}")]
    Io(#[from] io::Error),
}

pub fn hex(id: &ChunkId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_hex(s: &str) -> Option<ChunkId> {
    if s.len() != 64 {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..32).map(|i| s.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    bytes?.try_into().ok()
}

/// The chunk files of every bucket on this member.
pub struct ChunkStore {
    /// `member/blobs`.
    dir: PathBuf,
    /// Chunks found corrupt on read here since start (shared with the metrics).
    corrupt_found: Arc<AtomicU64>,
    /// Scratch file names are unique per write.
    next_scratch: AtomicU64,
    /// Locks by a chunk id's first byte: a write (or touch) and a removal of
    /// the same chunk never interleave.
    stripes: Vec<Mutex<()>>,
}

/// Lock stripes of a chunk store.
const STRIPES: usize = 64;

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl ChunkStore {
    /// Opens the store in `dir`, removing scratch files a crash left; corrupt
    /// chunks found are counted in `corrupt_found`.
    pub fn open(dir: &Path, corrupt_found: Arc<AtomicU64>) -> io::Result<ChunkStore> {
        fs::create_dir_all(dir)?;
        let store = ChunkStore {
            dir: dir.to_path_buf(),
            corrupt_found,
            next_scratch: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        };
        for bucket in store.buckets()? {
            for fan in fs::read_dir(store.bucket_dir(bucket))? {
                for f in fs::read_dir(fan?.path())? {
                    let path = f?.path();
                    if path.to_string_lossy().ends_with(SCRATCH_SUFFIX) {
                        fs::remove_file(&path)?;
                    }
                }
            }
        }
        Ok(store)
    }

    pub fn corrupt_found(&self) -> u64 {
        self.corrupt_found.load(Ordering::Relaxed)
    }

    fn bucket_dir(&self, bucket: GroupId) -> PathBuf {
        self.dir.join(format!("{bucket:016x}"))
    }

    /// Where chunk `id` of `bucket` lives.
    pub fn path(&self, bucket: GroupId, id: &ChunkId) -> PathBuf {
        let name = hex(id);
        self.bucket_dir(bucket).join(&name[..2]).join(name)
    }

    /// Stores chunk `id` durably; `data` must hash to `id`.
    pub fn put(&self, bucket: GroupId, id: &ChunkId, data: &[u8]) -> Result<(), ChunkError> {
        if blake3::hash(data).as_bytes() != id {
            return Err(ChunkError::Mismatch(hex(id)));
        }
        let path = self.path(bucket, id);
        let _stripe = self.stripe(id);
        match self.read_verified(&path, id) {
            Ok(Some(_)) => {
                File::options().write(true).open(&path)?.set_modified(SystemTime::now())?;
                return Ok(());
            }
            Ok(None) | Err(ChunkError::Corrupt(_)) => {}
            Err(e) => return Err(e),
        }
        let fan = path.parent().expect("a chunk path has a parent");
        if !fan.exists() {
            fs::create_dir_all(fan)?;
            sync_dir(&self.dir)?;
            sync_dir(&self.bucket_dir(bucket))?;
        }
        let n = self.next_scratch.fetch_add(1, Ordering::Relaxed);
        let scratch = fan.join(format!("{}.{n}{SCRATCH_SUFFIX}", hex(id)));
        let written = (|| -> io::Result<()> {
            let mut f = File::create(&scratch)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&scratch, &path)?;
            sync_dir(fan)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&scratch);
        }
        Ok(written?)
    }

    /// Chunk `id` of `bucket`, verified; `None` when this member has no copy.
    pub fn get(&self, bucket: GroupId, id: &ChunkId) -> Result<Option<Vec<u8>>, ChunkError> {
        self.read_verified(&self.path(bucket, id), id)
    }

    fn read_verified(&self, path: &Path, id: &ChunkId) -> Result<Option<Vec<u8>>, ChunkError> {
        let mut data = Vec::new();
        match File::open(path) {
            Ok(mut f) => f.read_to_end(&mut data)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if blake3::hash(&data).as_bytes() != id {
            self.corrupt_found.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(chunk = %hex(id), path = %path.display(), "corrupt chunk removed");
            fs::remove_file(path)?;
            return Err(ChunkError::Corrupt(hex(id)));
        }
        Ok(Some(data))
    }

    fn stripe(&self, id: &ChunkId) -> std::sync::MutexGuard<'_, ()> {
        self.stripes[usize::from(id[0]) % STRIPES].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes chunk `id` of `bucket` unless it was written (or found here by a
    /// write) within `age`; whether it is gone.
    pub fn remove_if_stale(&self, bucket: GroupId, id: &ChunkId, age: std::time::Duration) -> io::Result<bool> {
        let path = self.path(bucket, id);
        let _stripe = self.stripe(id);
        let modified = match fs::metadata(&path) {
            Ok(m) => m.modified()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(e),
        };
        if modified.elapsed().map_or(true, |a| a < age) {
            return Ok(false);
        }
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(true),
        }
    }

    /// Removes every chunk of `bucket`.
    pub fn remove_bucket(&self, bucket: GroupId) -> io::Result<()> {
        match fs::remove_dir_all(self.bucket_dir(bucket)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The buckets with chunks here.
    pub fn buckets(&self) -> io::Result<Vec<GroupId>> {
        let mut out = Vec::new();
        for d in fs::read_dir(&self.dir)? {
            let name = d?.file_name();
            if let Some(id) = name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok()) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Every chunk of `bucket` here, with its modification time.
    pub fn list(&self, bucket: GroupId) -> io::Result<Vec<(ChunkId, SystemTime)>> {
        let mut out = Vec::new();
        let dir = self.bucket_dir(bucket);
        let fans = match fs::read_dir(&dir) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for fan in fans {
            for f in fs::read_dir(fan?.path())? {
                let f = f?;
                if let Some(id) = f.file_name().to_str().and_then(parse_hex) {
                    out.push((id, f.metadata()?.modified()?));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_verified_on_write_and_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ChunkStore::open(dir.path(), Arc::default()).expect("open");
        let data = b"hello chunk".to_vec();
        let id = *blake3::hash(&data).as_bytes();
        assert!(matches!(store.put(7, &id, b"other bytes"), Err(ChunkError::Mismatch(_))));
        assert_eq!(store.get(7, &id).expect("get"), None);
        store.put(7, &id, &data).expect("put");
        store.put(7, &id, &data).expect("put again");
        assert_eq!(store.get(7, &id).expect("get"), Some(data.clone()));
        assert_eq!(store.list(7).expect("list").len(), 1);
        // One flipped byte: refused, counted, removed; a new write repairs it.
        let path = store.path(7, &id);
        let mut bytes = fs::read(&path).expect("read");
        bytes[3] ^= 1;
        fs::write(&path, bytes).expect("write");
        assert!(matches!(store.get(7, &id), Err(ChunkError::Corrupt(_))));
        assert_eq!(store.corrupt_found(), 1);
        assert_eq!(store.get(7, &id).expect("get"), None);
        store.put(7, &id, &data).expect("repair");
        assert_eq!(store.get(7, &id).expect("get"), Some(data));
        // Scratch files a crash left are removed at open.
        let scratch = path.with_file_name(format!("{}.9{SCRATCH_SUFFIX}", hex(&id)));
        fs::write(&scratch, b"x").expect("scratch");
        let store = ChunkStore::open(dir.path(), Arc::default()).expect("reopen");
        assert!(!scratch.exists());
        assert_eq!(store.buckets().expect("buckets"), vec![7]);
        assert!(!store.remove_if_stale(7, &id, std::time::Duration::from_secs(60)).expect("fresh"));
        assert!(store.get(7, &id).expect("get").is_some(), "a fresh chunk was removed");
        assert!(store.remove_if_stale(7, &id, std::time::Duration::ZERO).expect("stale"));
        assert_eq!(store.get(7, &id).expect("get"), None);
        store.remove_bucket(7).expect("remove");
        assert!(store.buckets().expect("buckets").is_empty());
    }

    #[test]
    fn hex_round_trips() {
        let id = [0xab; 32];
        assert_eq!(parse_hex(&hex(&id)), Some(id));
        assert_eq!(parse_hex("zz"), None);
    }
}
