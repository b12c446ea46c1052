//! Byte encodings of the MVCC tables' keys.
//!
//! History keys must sort by (user key, main, sub) under plain byte order, for keys
//! of any content and length. The user key is escaped (`00` -> `00 FF`) and ended
//! with `00 01`, which sorts below any escaped continuation, so "a" < "a\0" < "b"
//! is preserved; big-endian revisions follow.

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

fn escape_into(out: &mut Vec<u8>, key: &[u8]) {
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0, 1]);
}

/// The smallest history key of `user_key`: a scan bound.
pub fn history_bound(user_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(user_key.len() + 2);
    escape_into(&mut out, user_key);
    out
}

pub fn history_key(user_key: &[u8], main: Rev, sub: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(user_key.len() + 18);
    escape_into(&mut out, user_key);
    out.extend_from_slice(&main.to_be_bytes());
    out.extend_from_slice(&sub.to_be_bytes());
    out
}

/// Inverse of [`history_key`]; an error names what is malformed.
pub fn decode_history_key(b: &[u8]) -> Result<(Vec<u8>, Rev, i64), String> {
    let mut key = Vec::with_capacity(b.len());
    let mut i = 0;
    loop {
        match (b.get(i), b.get(i + 1)) {
            (Some(0), Some(0xFF)) => {
                key.push(0);
                i += 2;
            }
            (Some(0), Some(1)) => {
                i += 2;
                break;
            }
            (Some(&c), _) if c != 0 => {
                key.push(c);
                i += 1;
            }
            _ => return Err(format!("history key without terminator ({} bytes)", b.len())),
        }
    }
    let rest = &b[i..];
    if rest.len() != 16 {
        return Err(format!("history key revision has {} bytes", rest.len()));
    }
    let mut m = [0u8; 8];
    let mut s = [0u8; 8];
    m.copy_from_slice(&rest[..8]);
    s.copy_from_slice(&rest[8..]);
    Ok((key, i64::from_be_bytes(m), i64::from_be_bytes(s)))
}

pub fn rev_key(main: Rev, sub: i64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&main.to_be_bytes());
    out[8..].copy_from_slice(&sub.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keys_sort_like_their_parts() {
        let keys: [&[u8]; 6] = [b"", b"\0", b"\0\0", b"a", b"a\0", b"b"];
        let mut encoded = Vec::new();
        for k in keys {
            for main in [1, 2, 300] {
                for sub in [0, 1] {
                    encoded.push((history_key(k, main, sub), (k.to_vec(), main, sub)));
                }
            }
        }
        let mut sorted = encoded.clone();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(sorted, encoded, "byte order must equal (key, main, sub) order");
        for (bytes, parts) in &encoded {
            assert_eq!(&decode_history_key(bytes).unwrap(), parts);
            assert!(history_bound(&parts.0) <= *bytes);
        }
        assert!(decode_history_key(b"abc").is_err());
        assert!(decode_history_key(&[b'a', 0, 1, 0]).is_err());
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
