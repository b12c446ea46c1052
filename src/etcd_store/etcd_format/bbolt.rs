//! A small reader and writer of bbolt database files (the format etcd 3.4 keeps its
//! backend in and streams as a snapshot), limited to what etcd uses: top-level
//! buckets holding byte keys and values, no nested buckets below them.
//!
//! The format (bbolt 1.3, little-endian, as on every platform etcd ships for):
//! - The file is a sequence of pages of `page_size` bytes; a page's header is
//!   `id u64, flags u16, count u16, overflow u32`, and a page with `overflow = n`
//!   spans `n` more pages.
//! - Pages 0 and 1 are meta pages: `magic u32 (0xED0CDAED), version u32 (2),
//!   page_size u32, flags u32, root bucket (root pgid u64, sequence u64), freelist
//!   pgid u64, high-water pgid u64, txid u64, checksum u64` where the checksum is
//!   FNV-1a 64 over the bytes before it. The valid meta with the higher txid wins.
//! - A B+tree page is a branch (`flags 0x01`: elements `pos u32, ksize u32, pgid
//!   u64`) or a leaf (`0x02`: elements `flags u32, pos u32, ksize u32, vsize u32`);
//!   `pos` is the distance from the element to its key, the value follows the key.
//!   A leaf element with flag `0x01` is a bucket, its value `root pgid u64,
//!   sequence u64` and, when the root is 0, the bucket's leaf page inline after it.
//! - The freelist page (`0x10`) lists free page ids (`count = 0xFFFF`: the count is
//!   the first u64).
//!
//! The writer produces a compact file: metas, an empty freelist, then every
//! bucket's pages (a bucket of at most a quarter page inline, as bbolt does); every page below the high-water mark is reachable, which is what
//! `bbolt`'s consistency check (run by `etcdctl snapshot status`) requires. Its
//! output depends only on its input.
//!
//! The reader is meant for untrusted files: every offset and length is checked, a
//! page may be reached only once (no cycles), recursion depth is bounded, and
//! nothing is allocated beyond what the file's own bytes hold. Any defect is a
//! [`BoltError`].

use std::borrow::Cow;
use std::collections::HashSet;

pub const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
/// The page size the writer uses (etcd's on Linux/x86-64 and arm64 with 4 KiB pages).
pub const PAGE_SIZE: usize = 4096;
const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const META_BYTES: usize = 64;
const CHECKSUM_AT: usize = 56;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const META: u16 = 0x04;
const FREELIST: u16 = 0x10;
const BUCKET_LEAF: u32 = 0x01;
/// Deeper B+trees than this are refused (a 4 KiB-page tree of 2^64 rows is ~16 deep).
const MAX_DEPTH: usize = 32;

/// Rows of one bucket, in key order.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// A top-level bucket and its rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub name: Vec<u8>,
    pub rows: Rows,
}

/// A malformed bbolt file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bbolt file is malformed: {0}")]
pub struct BoltError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, BoltError> {
    Err(BoltError(msg.into()))
}

/// Whether `data` starts like a bbolt file (the magic of meta page 0).
pub fn is_bbolt(data: &[u8]) -> bool {
    data.get(PAGE_HEADER..PAGE_HEADER + 4).is_some_and(|m| m == MAGIC.to_le_bytes())
}

fn fnv64a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Rewrites both meta pages' checksums to match their contents (for fuzzing: so
/// that mutated files get past the checksum to the pages).
pub fn fix_meta_checksums(data: &mut [u8]) {
    let size = u32_at(data, PAGE_HEADER + 8).map_or(PAGE_SIZE, |s| s as usize);
    let size = if (512..=65536).contains(&size) && size.is_power_of_two() { size } else { PAGE_SIZE };
    for at in [PAGE_HEADER, size + PAGE_HEADER] {
        if let Some(m) = data.get_mut(at..at + META_BYTES) {
            let sum = fnv64a(&m[..CHECKSUM_AT]);
            m[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// The fields of a meta page the reader uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub page_size: usize,
    pub root: u64,
    pub freelist: u64,
    /// The high-water mark: pages `0..pgid` are in use; the database is this many
    /// pages long (bbolt's `Tx.Size()` is `pgid * page_size`).
    pub pgid: u64,
    pub txid: u64,
}

fn parse_meta(m: &[u8]) -> Result<Meta, BoltError> {
    let field32 = |at| u32_at(m, at).ok_or_else(|| BoltError("meta page truncated".into()));
    let field64 = |at| u64_at(m, at).ok_or_else(|| BoltError("meta page truncated".into()));
    if field32(0)? != MAGIC {
        return err("bad magic");
    }
    if field32(4)? != VERSION {
        return err(format!("unsupported version {}", field32(4)?));
    }
    let checksum = field64(CHECKSUM_AT)?;
    if checksum != fnv64a(&m[..CHECKSUM_AT]) {
        return err("meta checksum mismatch");
    }
    let page_size = field32(8)? as usize;
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return err(format!("page size {page_size}"));
    }
    Ok(Meta { page_size, root: field64(16)?, freelist: field64(32)?, pgid: field64(40)?, txid: field64(48)? })
}

/// The meta page in force: the valid one with the higher transaction id.
pub fn meta(data: &[u8]) -> Result<Meta, BoltError> {
    let first = data.get(PAGE_HEADER..PAGE_HEADER + META_BYTES).ok_or_else(|| BoltError("file too short".into()));
    let m0 = first.and_then(parse_meta);
    // Meta page 1 sits one page further, at the size meta 0 gives (or the default).
    let size1 = m0.as_ref().map_or(PAGE_SIZE, |m| m.page_size);
    let m1 = data
        .get(size1 + PAGE_HEADER..size1 + PAGE_HEADER + META_BYTES)
        .ok_or_else(|| BoltError("file too short for two meta pages".into()))
        .and_then(parse_meta)
        .and_then(|m| if m.page_size == size1 { Ok(m) } else { err("meta pages disagree on page size") });
    let meta = match (m0, m1) {
        (Ok(a), Ok(b)) => {
            if b.txid > a.txid {
                b
            } else {
                a
            }
        }
        (Ok(a), Err(_)) | (Err(_), Ok(a)) => a,
        (Err(e), Err(_)) => return Err(e),
    };
    let size = usize::try_from(meta.pgid)
        .ok()
        .and_then(|n| n.checked_mul(meta.page_size))
        .ok_or_else(|| BoltError("high-water mark overflows".into()))?;
    if meta.pgid < 3 || size > data.len() {
        return err(format!("file of {} bytes is shorter than its {} pages (truncated?)", data.len(), meta.pgid));
    }
    if meta.root < 2 || meta.root >= meta.pgid {
        return err(format!("root page {} out of range", meta.root));
    }
    Ok(meta)
}

struct Reader<'a> {
    data: &'a [u8],
    meta: Meta,
    seen: HashSet<u64>,
}

/// A page's (flags, count, bytes incl. header and overflow).
type Page<'a> = (u16, usize, &'a [u8]);

impl<'a> Reader<'a> {
    fn page(&mut self, id: u64) -> Result<Page<'a>, BoltError> {
        if id < 2 || id >= self.meta.pgid {
            return err(format!("page {id} out of range"));
        }
        let ps = self.meta.page_size;
        // id < pgid and pgid * ps <= data.len(), so these cannot overflow.
        let start = id as usize * ps;
        let head = &self.data[start..start + ps];
        if u64_at(head, 0) != Some(id) {
            return err(format!("page {id} carries another id"));
        }
        let flags = u16_at(head, 8).unwrap_or(0);
        let count = usize::from(u16_at(head, 10).unwrap_or(0));
        let overflow = u64::from(u32_at(head, 12).unwrap_or(0));
        let last = id.checked_add(overflow).filter(|l| *l < self.meta.pgid);
        let Some(last) = last else { return err(format!("page {id} overflows past the end")) };
        for p in id..=last {
            if !self.seen.insert(p) {
                return err(format!("page {p} reached twice"));
            }
        }
        let end = (last as usize + 1) * ps;
        Ok((flags, count, &self.data[start..end]))
    }

    /// Appends the leaf elements of the tree rooted at page `id` to `out` as
    /// (flags, key, value).
    fn tree(&mut self, id: u64, depth: usize, out: &mut Vec<(u32, &'a [u8], &'a [u8])>) -> Result<(), BoltError> {
        if depth > MAX_DEPTH {
            return err("tree too deep");
        }
        let (flags, count, page) = self.page(id)?;
        match flags {
            BRANCH => {
                if count == 0 {
                    return err(format!("branch page {id} is empty"));
                }
                for i in 0..count {
                    let at = PAGE_HEADER + i * ELEMENT;
                    let child = u64_at(page, at + 8).ok_or_else(|| BoltError(format!("branch page {id} truncated")))?;
                    self.tree(child, depth + 1, out)?;
                }
                Ok(())
            }
            LEAF => leaf_elements(page, count, out),
            f => err(format!("page {id} has type {f:#x}, not a branch or leaf")),
        }
    }
}

/// The elements of a leaf page (`page` starts at its header).
fn leaf_elements<'a>(page: &'a [u8], count: usize, out: &mut Vec<(u32, &'a [u8], &'a [u8])>) -> Result<(), BoltError> {
    let bad = |what: &str| BoltError(format!("leaf element {what} out of bounds"));
    if PAGE_HEADER + count * ELEMENT > page.len() {
        return Err(bad("table"));
    }
    out.reserve(count);
    for i in 0..count {
        let at = PAGE_HEADER + i * ELEMENT;
        let get = |o| u32_at(page, at + o).map(|v| v as usize).ok_or_else(|| bad("header"));
        let (flags, pos, ksize, vsize) = (get(0)? as u32, get(4)?, get(8)?, get(12)?);
        let k0 = at.checked_add(pos).ok_or_else(|| bad("key"))?;
        let k1 = k0.checked_add(ksize).ok_or_else(|| bad("key"))?;
        let v1 = k1.checked_add(vsize).ok_or_else(|| bad("value"))?;
        let key = page.get(k0..k1).ok_or_else(|| bad("key"))?;
        let value = page.get(k1..v1).ok_or_else(|| bad("value"))?;
        out.push((flags, key, value));
    }
    Ok(())
}

fn check_order(rows: &[(u32, &[u8], &[u8])], what: &str) -> Result<(), BoltError> {
    if rows.windows(2).any(|w| w[0].1 >= w[1].1) {
        return err(format!("keys of {what} are not in strictly ascending order"));
    }
    Ok(())
}

/// Reads every top-level bucket and its rows (in bbolt order: by name, then key).
/// Nested buckets below the top level and plain values at the top level are
/// refused (etcd has neither).
pub fn read(data: &[u8]) -> Result<Vec<Bucket>, BoltError> {
    let meta = meta(data)?;
    let mut r = Reader { data, meta, seen: HashSet::new() };
    let mut top = Vec::new();
    r.tree(meta.root, 0, &mut top)?;
    check_order(&top, "the root bucket")?;
    let mut buckets = Vec::with_capacity(top.len());
    for (flags, name, value) in top {
        let show = String::from_utf8_lossy(name);
        if flags & BUCKET_LEAF == 0 {
            return err(format!("top-level key {show:?} is not a bucket"));
        }
        let root = u64_at(value, 0).ok_or_else(|| BoltError(format!("bucket {show:?} header truncated")))?;
        let mut elements = Vec::new();
        if root == 0 {
            let page = value.get(16..).ok_or_else(|| BoltError(format!("bucket {show:?} header truncated")))?;
            if page.len() < PAGE_HEADER || u16_at(page, 8) != Some(LEAF) {
                return err(format!("inline bucket {show:?} is not a leaf"));
            }
            let count = usize::from(u16_at(page, 10).unwrap_or(0));
            leaf_elements(page, count, &mut elements)?;
        } else {
            r.tree(root, 1, &mut elements)?;
        }
        check_order(&elements, &format!("bucket {show:?}"))?;
        if elements.iter().any(|(f, _, _)| f & BUCKET_LEAF != 0) {
            return err(format!("bucket {show:?} holds a nested bucket"));
        }
        let rows = elements.into_iter().map(|(_, k, v)| (k.to_vec(), v.to_vec())).collect();
        buckets.push(Bucket { name: name.to_vec(), rows });
    }
    Ok(buckets)
}

/// A page element being written: (leaf flags, key, value or child page id).
type Element<'a> = (u32, Cow<'a, [u8]>, Cow<'a, [u8]>);

/// Bytes of a page with id `id` holding `elements`, padded to whole pages.
fn encode_page(id: u64, flags: u16, elements: &[Element<'_>]) -> Vec<u8> {
    let size = PAGE_HEADER + elements.iter().map(|(_, k, v)| ELEMENT + k.len() + v.len()).sum::<usize>();
    let blocks = size.div_ceil(PAGE_SIZE).max(1);
    let mut p = vec![0u8; blocks * PAGE_SIZE];
    p[0..8].copy_from_slice(&id.to_le_bytes());
    p[8..10].copy_from_slice(&flags.to_le_bytes());
    p[10..12].copy_from_slice(&(elements.len() as u16).to_le_bytes());
    p[12..16].copy_from_slice(&((blocks - 1) as u32).to_le_bytes());
    let mut data_at = PAGE_HEADER + elements.len() * ELEMENT;
    for (i, (eflags, k, v)) in elements.iter().enumerate() {
        let at = PAGE_HEADER + i * ELEMENT;
        let pos = (data_at - at) as u32;
        if flags == BRANCH {
            // A branch element's "value" is its child's page id.
            p[at..at + 4].copy_from_slice(&pos.to_le_bytes());
            p[at + 4..at + 8].copy_from_slice(&(k.len() as u32).to_le_bytes());
            p[at + 8..at + 16].copy_from_slice(v);
            p[data_at..data_at + k.len()].copy_from_slice(k);
            data_at += k.len();
        } else {
            p[at..at + 4].copy_from_slice(&eflags.to_le_bytes());
            p[at + 4..at + 8].copy_from_slice(&pos.to_le_bytes());
            p[at + 8..at + 12].copy_from_slice(&(k.len() as u32).to_le_bytes());
            p[at + 12..at + 16].copy_from_slice(&(v.len() as u32).to_le_bytes());
            p[data_at..data_at + k.len()].copy_from_slice(k);
            p[data_at + k.len()..data_at + k.len() + v.len()].copy_from_slice(v);
            data_at += k.len() + v.len();
        }
    }
    p
}

/// Builds pages for the writer.
struct Writer {
    /// Page-sized blocks from page 2 on (2 is the freelist).
    pages: Vec<u8>,
    next: u64,
}

impl Writer {
    /// Writes one page (plus overflow) holding `elements` and returns its id.
    fn page(&mut self, flags: u16, elements: &[Element<'_>]) -> u64 {
        let id = self.next;
        let page = encode_page(id, flags, elements);
        self.next += (page.len() / PAGE_SIZE) as u64;
        self.pages.extend_from_slice(&page);
        id
    }

    /// Writes a B+tree of `rows` (sorted, unique keys) and returns its root page.
    fn tree(&mut self, rows: Vec<Element<'_>>) -> u64 {
        let mut level = self.level(LEAF, rows);
        while level.len() > 1 {
            let children =
                level.into_iter().map(|(k, id)| (0, Cow::Owned(k), Cow::Owned(id.to_le_bytes().to_vec()))).collect();
            level = self.level(BRANCH, children);
        }
        level.first().map_or_else(|| self.page(LEAF, &[]), |(_, id)| *id)
    }

    /// Packs `elements` into pages of one level; returns (first key, page) of each.
    fn level(&mut self, flags: u16, elements: Vec<Element<'_>>) -> Vec<(Vec<u8>, u64)> {
        let cost = |(_, k, v): &Element<'_>| ELEMENT + k.len() + if flags == BRANCH { 0 } else { v.len() };
        let mut out = Vec::new();
        let mut batch: Vec<Element<'_>> = Vec::new();
        let mut size = PAGE_HEADER;
        for e in elements {
            let c = cost(&e);
            if !batch.is_empty() && (size + c > PAGE_SIZE || batch.len() == usize::from(u16::MAX - 1)) {
                out.push((batch[0].1.to_vec(), self.page(flags, &batch)));
                batch.clear();
                size = PAGE_HEADER;
            }
            size += c;
            batch.push(e);
        }
        if !batch.is_empty() || out.is_empty() {
            let first = batch.first().map_or_else(Vec::new, |e| e.1.to_vec());
            out.push((first, self.page(flags, &batch)));
        }
        out
    }
}

/// Writes a bbolt database holding `buckets` (each bucket's rows must be sorted by
/// key without duplicates; buckets are written in name order).
pub fn write(buckets: &[Bucket]) -> Vec<u8> {
    let mut w = Writer { pages: Vec::new(), next: 3 };
    let mut sorted: Vec<&Bucket> = buckets.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut top = Vec::with_capacity(sorted.len());
    for b in &sorted {
        debug_assert!(b.rows.windows(2).all(|w| w[0].0 < w[1].0), "bucket rows must be sorted and unique");
        let rows: Vec<Element<'_>> =
            b.rows.iter().map(|(k, v)| (0, Cow::Borrowed(&k[..]), Cow::Borrowed(&v[..]))).collect();
        let size = PAGE_HEADER + rows.iter().map(|(_, k, v)| ELEMENT + k.len() + v.len()).sum::<usize>();
        // Like bbolt, a bucket of at most a quarter page is stored inline, in its
        // parent's leaf: bucket header with root 0, then the page.
        let mut value = Vec::with_capacity(16 + size);
        if size <= PAGE_SIZE / 4 {
            value.extend_from_slice(&[0u8; 16]);
            let page = encode_page(0, LEAF, &rows);
            value.extend_from_slice(&page[..size]);
        } else {
            value.extend_from_slice(&w.tree(rows).to_le_bytes());
            value.extend_from_slice(&0u64.to_le_bytes());
        }
        top.push((BUCKET_LEAF, Cow::Borrowed(&b.name[..]), Cow::Owned(value)));
    }
    let root = w.tree(top);
    let mut out = vec![0u8; 3 * PAGE_SIZE];
    for (i, txid) in [(0u64, 2u64), (1, 3)] {
        let p = &mut out[i as usize * PAGE_SIZE..];
        p[0..8].copy_from_slice(&i.to_le_bytes());
        p[8..10].copy_from_slice(&META.to_le_bytes());
        let m = &mut p[PAGE_HEADER..PAGE_HEADER + META_BYTES];
        m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        m[4..8].copy_from_slice(&VERSION.to_le_bytes());
        m[8..12].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        m[16..24].copy_from_slice(&root.to_le_bytes());
        m[32..40].copy_from_slice(&2u64.to_le_bytes());
        m[40..48].copy_from_slice(&w.next.to_le_bytes());
        m[48..56].copy_from_slice(&txid.to_le_bytes());
        let sum = fnv64a(&m[..CHECKSUM_AT]);
        m[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
    }
    let free = &mut out[2 * PAGE_SIZE..];
    free[0..8].copy_from_slice(&2u64.to_le_bytes());
    free[8..10].copy_from_slice(&FREELIST.to_le_bytes());
    out.extend_from_slice(&w.pages);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(name: &str, rows: Rows) -> Bucket {
        Bucket { name: name.as_bytes().to_vec(), rows }
    }

    #[test]
    fn written_files_read_back_with_branches_and_overflow() {
        let many: Rows = (0..5000u32).map(|i| (i.to_be_bytes().to_vec(), vec![b'v'; (i % 50) as usize])).collect();
        let big: Rows = vec![(b"a".to_vec(), vec![7; 3 * PAGE_SIZE + 5]), (b"b".to_vec(), vec![])];
        let buckets = vec![bucket("empty", vec![]), bucket("key", many), bucket("big", big)];
        let file = write(&buckets);
        assert!(is_bbolt(&file));
        let m = meta(&file).unwrap();
        assert_eq!(m.pgid as usize * PAGE_SIZE, file.len());
        let mut want = buckets.clone();
        want.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(read(&file).unwrap(), want);
        assert_eq!(write(&buckets), file, "deterministic");
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let rows: Rows = (0..300u32).map(|i| (i.to_be_bytes().to_vec(), vec![1; 40])).collect();
        let file = write(&[bucket("key", rows), bucket("meta", vec![(b"x".to_vec(), vec![1; 9000])])]);
        for cut in [0, 10, PAGE_SIZE, 2 * PAGE_SIZE + 7, file.len() - 1] {
            assert!(read(&file[..cut]).is_err(), "cut at {cut}");
        }
        // Flip bytes all over (headers, element tables, metas): never a panic.
        for at in (0..file.len()).step_by(7) {
            let mut bad = file.clone();
            bad[at] ^= 0xff;
            let _ = read(&bad);
        }
        let mut bad_meta = file.clone();
        bad_meta[PAGE_HEADER + 20] ^= 1;
        bad_meta[PAGE_SIZE + PAGE_HEADER + 20] ^= 1;
        assert!(read(&bad_meta).is_err());
    }

    #[test]
    fn reads_the_etcd_fixture() {
        let file = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/etcd-3.4.23.snapshot")).unwrap();
        let db = &file[..file.len() - 32];
        let buckets = read(db).unwrap();
        let names: Vec<String> = buckets.iter().map(|b| String::from_utf8_lossy(&b.name).into_owned()).collect();
        for want in ["alarm", "auth", "authRoles", "authUsers", "cluster", "key", "lease", "members", "meta"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
    }
}
