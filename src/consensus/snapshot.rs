//! Snapshots as files, and how one travels between members in bounded chunks.
//!
//! A snapshot's data is a byte range of an open file ([`SnapshotFile`]): a
//! service builds it into a file and hands the runtime a handle, never the
//! bytes. Sending one is a `SnapshotStream` peer call: a head (vote, snapshot
//! meta, length), the data in chunks of at most [`SNAPSHOT_CHUNK_BYTES`], and a
//! crc32 of the data; the receiver writes the chunks to an unlinked scratch file
//! in the group's directory, checks length and checksum, and only then installs
//! it. Memory per transfer is one chunk on each side (plus gRPC's buffers),
//! whatever the snapshot's size.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::service::SnapshotMeta;
use super::TypeConfig;

/// Snapshot data bytes per peer message: what one snapshot transfer holds in
/// memory on either side.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// A snapshot's data: `len` bytes at `offset` of an open file. It holds the file
/// open, so a newer snapshot renamed over the same path does not change what
/// this one reads.
#[derive(Clone)]
pub struct SnapshotFile {
    file: Arc<std::fs::File>,
    offset: u64,
    len: u64,
}

impl std::fmt::Debug for SnapshotFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SnapshotFile({} bytes at {})", self.len, self.offset)
    }
}

impl SnapshotFile {
    pub fn new(file: std::fs::File, offset: u64, len: u64) -> SnapshotFile {
        SnapshotFile { file: Arc::new(file), offset, len }
    }

    /// A snapshot of `data`, in an unlinked file in `dir` (for services that
    /// build their snapshot in memory, and tests).
    pub fn from_bytes(dir: &Path, data: &[u8]) -> io::Result<SnapshotFile> {
        let mut file = scratch_file(dir)?;
        file.write_all(data)?;
        Ok(SnapshotFile::new(file, 0, data.len() as u64))
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole data, for a service that installs it in memory.
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        let len = usize::try_from(self.len).map_err(|_| io::Error::other("snapshot larger than memory"))?;
        let mut out = vec![0; len];
        self.file.read_exact_at(&mut out, self.offset)?;
        Ok(out)
    }

    /// A reader of the data from its start (each reader has its own position).
    pub fn reader(&self) -> SnapshotReader {
        SnapshotReader { file: self.file.clone(), pos: self.offset, end: self.offset + self.len }
    }

    /// The data in chunks of at most [`SNAPSHOT_CHUNK_BYTES`], in order.
    pub fn chunks(&self) -> impl Iterator<Item = io::Result<Vec<u8>>> + '_ {
        let chunk = SNAPSHOT_CHUNK_BYTES as u64;
        (0..self.len.div_ceil(chunk)).map(move |i| {
            let start = i * chunk;
            let mut buf = vec![0; (self.len - start).min(chunk) as usize];
            self.file.read_exact_at(&mut buf, self.offset + start)?;
            Ok(buf)
        })
    }
}

/// Reads a [`SnapshotFile`]'s data (see [`SnapshotFile::reader`]).
pub struct SnapshotReader {
    file: Arc<std::fs::File>,
    pos: u64,
    end: u64,
}

impl Read for SnapshotReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A new file in `dir`, already unlinked: it lives as long as its handles.
fn scratch_file(dir: &Path) -> io::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("incoming-{:016x}", super::fresh_seed()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

/// One message of a `SnapshotStream` call.
#[derive(Debug, Serialize, Deserialize)]
pub enum SnapshotFrame {
    /// First: what is sent, and how many data bytes follow.
    Head { vote: openraft::type_config::alias::VoteOf<TypeConfig>, meta: SnapshotMeta, len: u64 },
    /// At most [`SNAPSHOT_CHUNK_BYTES`] of data, in order.
    Chunk(#[serde(with = "super::raw_bytes")] Vec<u8>),
    /// Last: the crc32 of all the data.
    End { crc32: u32 },
}

/// A snapshot being received: chunks appended to a scratch file, checked against
/// the head's length and the sender's checksum.
pub struct IncomingSnapshot {
    file: std::fs::File,
    expected_len: u64,
    written: u64,
    crc: crc32fast::Hasher,
}

impl IncomingSnapshot {
    /// Starts receiving `len` bytes into a scratch file in `dir`.
    pub fn new(dir: &Path, len: u64) -> io::Result<IncomingSnapshot> {
        Ok(IncomingSnapshot { file: scratch_file(dir)?, expected_len: len, written: 0, crc: crc32fast::Hasher::new() })
    }

    /// Appends one chunk; refuses one larger than [`SNAPSHOT_CHUNK_BYTES`] or past
    /// the announced length.
    pub fn push(&mut self, chunk: &[u8]) -> io::Result<()> {
        if chunk.len() > SNAPSHOT_CHUNK_BYTES || self.written + chunk.len() as u64 > self.expected_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "snapshot chunk too large or past the announced length",
            ));
        }
        self.file.write_all(chunk)?;
        self.crc.update(chunk);
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// The received snapshot, if it is complete and matches `crc32`.
    pub fn finish(mut self, crc32: u32) -> io::Result<SnapshotFile> {
        if self.written != self.expected_len {
            let why = format!("snapshot ended after {} of {} bytes", self.written, self.expected_len);
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
        if self.crc.finalize() != crc32 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "snapshot checksum mismatch"));
        }
        self.file.flush()?;
        self.file.seek(SeekFrom::Start(0))?;
        Ok(SnapshotFile::new(self.file, 0, self.written))
    }
}

/// The crc32 of a snapshot's data, read in chunks.
pub fn checksum(snapshot: &SnapshotFile) -> io::Result<u32> {
    let mut crc = crc32fast::Hasher::new();
    for chunk in snapshot.chunks() {
        crc.update(&chunk?);
    }
    Ok(crc.finalize())
}

/// Writes a snapshot file: `crc32 ‖ len(meta) ‖ meta ‖ data`, replaced
/// atomically and durably (see [`crate::storage::write_checksummed`]).
pub fn write_snapshot_file(path: &Path, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
    write_snapshot_file_with(path, meta, &mut |w| w.write_all(data)).map(|_| ())
}

/// Writes a snapshot file as [`write_snapshot_file`] does, its data streamed
/// by `data` (never held whole in memory): written to a temporary file through
/// a buffer, the checksum filled in last, fsynced, renamed over `path`, and the
/// directory fsynced, so a crash leaves the old file or the new one. Returns the
/// data's length.
pub fn write_snapshot_file_with(
    path: &Path,
    meta: &SnapshotMeta,
    data: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
) -> io::Result<u64> {
    let meta_bytes = bincode::serde::encode_to_vec(meta, bincode::config::standard()).map_err(io::Error::other)?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&[0; 4])?;
    let mut body = ChecksumWriter { out: io::BufWriter::new(file), crc: crc32fast::Hasher::new(), written: 0 };
    body.write_all(&(meta_bytes.len() as u64).to_be_bytes())?;
    body.write_all(&meta_bytes)?;
    let header = body.written;
    data(&mut body)?;
    let data_len = body.written - header;
    let crc = body.crc.finalize();
    let mut file = body.out.into_inner().map_err(|e| e.into_error())?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&crc.to_be_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(data_len)
}

/// A writer that checksums and counts what passes through it.
struct ChecksumWriter<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> Write for ChecksumWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.crc.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Opens a snapshot file written by [`write_snapshot_file`]: `None` if absent;
/// its checksum is verified (reading it in chunks) and a truncated or corrupted
/// file is an `InvalidData` error, never a snapshot.
pub fn read_snapshot_file(path: &Path) -> io::Result<Option<(SnapshotMeta, SnapshotFile)>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let corrupt = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {what}", path.display()));
    let total = file.metadata()?.len();
    if total < 12 {
        return Err(corrupt("truncated snapshot file"));
    }
    let mut head = [0u8; 12];
    file.read_exact(&mut head)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[4..]);
    let mut buf = vec![0; SNAPSHOT_CHUNK_BYTES];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
    }
    if crc.finalize().to_be_bytes() != head[..4] {
        return Err(corrupt("checksum mismatch (corrupt snapshot file)"));
    }
    let meta_len = u64::from_be_bytes(head[4..12].try_into().map_err(io::Error::other)?);
    if total - 12 < meta_len {
        // (meta_len came from the file; compared by subtraction so it cannot overflow)
        return Err(corrupt("snapshot meta truncated"));
    }
    let mut meta_bytes = vec![0; meta_len as usize];
    file.seek(SeekFrom::Start(12))?;
    file.read_exact(&mut meta_bytes)?;
    let (meta, _): (SnapshotMeta, _) =
        crate::consensus::decode_bounded(&meta_bytes).map_err(|e| corrupt(&format!("snapshot meta: {e}")))?;
    Ok(Some((meta, SnapshotFile::new(file, 12 + meta_len, total - 12 - meta_len))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_travels_in_chunks_and_arrives_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..(SNAPSHOT_CHUNK_BYTES * 2 + 123)).map(|i| (i % 251) as u8).collect();
        let sent = SnapshotFile::from_bytes(dir.path(), &data).expect("snapshot");
        let chunks: Vec<Vec<u8>> = sent.chunks().collect::<io::Result<_>>().expect("chunks");
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.len() <= SNAPSHOT_CHUNK_BYTES));
        let crc = checksum(&sent).expect("crc");

        let mut incoming = IncomingSnapshot::new(dir.path(), sent.len()).expect("incoming");
        for c in &chunks {
            incoming.push(c).expect("push");
        }
        assert_eq!(incoming.finish(crc).expect("finish").read_all().expect("read"), data);

        // Short, corrupted, oversized or overlong transfers are refused.
        let mut short = IncomingSnapshot::new(dir.path(), sent.len()).expect("incoming");
        short.push(&chunks[0]).expect("push");
        assert!(short.finish(crc).is_err());
        let mut bad = IncomingSnapshot::new(dir.path(), sent.len()).expect("incoming");
        for c in &chunks {
            bad.push(c).expect("push");
        }
        assert!(bad.finish(crc ^ 1).is_err());
        let mut big = IncomingSnapshot::new(dir.path(), u64::MAX).expect("incoming");
        assert!(big.push(&vec![0; SNAPSHOT_CHUNK_BYTES + 1]).is_err());
        let mut long = IncomingSnapshot::new(dir.path(), 10).expect("incoming");
        assert!(long.push(&[0; 11]).is_err());
        // Scratch files are unlinked: nothing is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }

    #[test]
    fn snapshot_files_are_checked_when_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("current");
        assert!(read_snapshot_file(&path).expect("absent").is_none());
        let meta = SnapshotMeta::default();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        write_snapshot_file(&path, &meta, &data).expect("write");
        let (read_meta, file) = read_snapshot_file(&path).expect("read").expect("present");
        assert_eq!(read_meta, meta);
        assert_eq!(file.read_all().expect("data"), data);
        let mut bytes = std::fs::read(&path).expect("bytes");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&path, &bytes).expect("corrupt");
        assert_eq!(read_snapshot_file(&path).unwrap_err().kind(), io::ErrorKind::InvalidData);
        std::fs::write(&path, &bytes[..8]).expect("truncate");
        assert_eq!(read_snapshot_file(&path).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
