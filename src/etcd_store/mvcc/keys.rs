//! Byte encodings of the MVCC tables' keys: key ranges as etcd requests express
//! them, and revision keys (`main ‖ sub`, big-endian, so byte order is revision
//! order) for the history table.

use super::Rev;

/// A key interval as etcd requests express it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Vec<u8>,
    /// `None`: the single key `start`. `Some(empty)`: every key >= `start`
    /// (etcd's `range_end = "\0"`). Otherwise the exclusive upper bound.
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        let end = match range_end {
            [] => None,
            [0] => Some(Vec::new()),
            e => Some(e.to_vec()),
        };
        KeyRange { start: key.to_vec(), end }
    }

    /// True when no key can fall inside (an end at or below the start).
    pub fn is_empty(&self) -> bool {
        matches!(&self.end, Some(e) if !e.is_empty() && e.as_slice() <= self.start.as_slice())
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            None => key == self.start.as_slice(),
            Some(e) => key >= self.start.as_slice() && (e.is_empty() || key < e.as_slice()),
        }
    }
}

pub fn rev_key(main: Rev, sub: i64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&main.to_be_bytes());
    out[8..].copy_from_slice(&sub.to_be_bytes());
    out
}

/// Inverse of [`rev_key`]; an error says what is malformed.
pub fn decode_rev_key(b: &[u8]) -> Result<(Rev, i64), String> {
    let part = |r: std::ops::Range<usize>| b.get(r).and_then(|x| <[u8; 8]>::try_from(x).ok()).map(i64::from_be_bytes);
    match (b.len(), part(0..8), part(8..16)) {
        (16, Some(main), Some(sub)) => Ok((main, sub)),
        (n, _, _) => Err(format!("revision key of {n} bytes")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_keys_sort_like_revisions_and_decode() {
        let revs = [(1, 0), (1, 1), (2, 0), (256, 0), (256, 7), (i64::MAX, 0)];
        let encoded: Vec<[u8; 16]> = revs.iter().map(|&(m, s)| rev_key(m, s)).collect();
        let mut sorted = encoded.clone();
        sorted.sort();
        assert_eq!(sorted, encoded, "byte order must equal (main, sub) order");
        for (bytes, rev) in encoded.iter().zip(revs) {
            assert_eq!(decode_rev_key(bytes), Ok(rev));
        }
        assert!(decode_rev_key(b"short").is_err());
    }

    #[test]
    fn key_range_cases() {
        type Case = (&'static [u8], &'static [u8], &'static [u8], bool);
        let cases: [Case; 8] = [
            (b"a", b"", b"a", true),
            (b"a", b"", b"ab", false),
            (b"a", b"c", b"b", true),
            (b"a", b"c", b"c", false),
            (b"a", b"\0", b"zzz", true),
            (b"b", b"\0", b"a", false),
            (b"\0", b"\0", b"anything", true),
            (b"c", b"a", b"b", false),
        ];
        for (key, end, probe, want) in cases {
            assert_eq!(KeyRange::new(key, end).contains(probe), want, "{key:?} {end:?} {probe:?}");
        }
        assert!(KeyRange::new(b"c", b"a").is_empty());
        assert!(!KeyRange::new(b"a", b"\0").is_empty());
    }
}
