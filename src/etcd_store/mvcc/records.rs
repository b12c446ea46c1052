//! Byte encodings of the MVCC tables' values.
//!
//! - `HISTORY` value (keyed by `main ‖ sub`): `tag ‖ prev ‖ KeyValue`, where `prev`
//!   (`main ‖ sub`, all zero when the key did not exist) is the revision of the
//!   version this change replaced: the key's state just before the change. A
//!   tombstone's `KeyValue` holds the key and the deletion's revision.
//!
//! A watch event's `prev_kv` is the record `prev` names, and compaction finds the
//! version an earlier compaction kept through it; which version of a key is live
//! at a revision comes from the key index (`index.rs`), built from these records
//! with [`change_key`]. Rejected: history keyed by (user key, revision), the
//! layout before: each apply transaction then copied one random B-tree leaf per
//! written key in a second table, about a third of a member's CPU under puts of
//! random keys (measured in docs/benchmarks.md, round 4).

use prost::Message;

use super::{decode_kv, MvccError, Result, Rev};
use crate::proto::mvccpb::KeyValue;

const TAG_PUT: u8 = 0;
const TAG_TOMBSTONE: u8 = 1;

/// A history record's revision: (main, sub).
pub type RevPtr = (Rev, i64);

/// One decoded history record.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub put: bool,
    /// The version this change replaced; `None` when the key did not exist.
    pub prev: Option<RevPtr>,
    pub kv: KeyValue,
}

/// Bytes of a history record before its `KeyValue`: tag, then `prev`'s main and sub.
const CHANGE_HEADER_BYTES: usize = 17;

pub fn encode_change(put: bool, prev: Option<RevPtr>, kv: &KeyValue) -> Vec<u8> {
    let (main, sub) = prev.unwrap_or((0, 0));
    let mut out = Vec::with_capacity(CHANGE_HEADER_BYTES + kv.encoded_len());
    out.push(if put { TAG_PUT } else { TAG_TOMBSTONE });
    out.extend_from_slice(&main.to_be_bytes());
    out.extend_from_slice(&sub.to_be_bytes());
    kv.encode(&mut out).expect("encoding into a Vec cannot fail");
    out
}

/// Whether an [`encode_change`] record is a put, and its user key, read without
/// decoding the value: `KeyValue.key` is field 1, which prost writes first (an
/// empty key is never written, so a record without it is corrupt).
pub fn change_key(record: &[u8]) -> Result<(bool, &[u8])> {
    let corrupt = || MvccError::Corrupt(format!("history record of {} bytes", record.len()));
    let put = match record.first() {
        Some(&TAG_PUT) => true,
        Some(&TAG_TOMBSTONE) => false,
        _ => return Err(corrupt()),
    };
    let kv = record.get(CHANGE_HEADER_BYTES..).ok_or_else(corrupt)?;
    if kv.first() != Some(&0x0a) {
        return Err(corrupt());
    }
    let mut len: u64 = 0;
    let mut at = 1;
    loop {
        let b = *kv.get(at).ok_or_else(corrupt)?;
        if at > 10 {
            return Err(corrupt());
        }
        len |= u64::from(b & 0x7f) << (7 * (at - 1));
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let len = usize::try_from(len).map_err(|_| corrupt())?;
    let key = kv.get(at..at.checked_add(len).ok_or_else(corrupt)?).ok_or_else(corrupt)?;
    Ok((put, key))
}

/// How many keys are live after `records` (change records in revision order).
pub fn live_keys<'a>(records: impl Iterator<Item = &'a [u8]>) -> Result<usize> {
    let mut live = std::collections::HashMap::new();
    for r in records {
        let (put, key) = change_key(r)?;
        live.insert(key, put);
    }
    Ok(live.values().filter(|put| **put).count())
}

/// Inverse of [`encode_change`].
pub fn decode_change(b: &[u8]) -> Result<Change> {
    let part = |r: std::ops::Range<usize>| b.get(r).and_then(|x| <[u8; 8]>::try_from(x).ok()).map(i64::from_be_bytes);
    let (Some(&tag), Some(main), Some(sub)) = (b.first(), part(1..9), part(9..17)) else {
        return Err(MvccError::Corrupt(format!("history record of {} bytes", b.len())));
    };
    let put = match tag {
        TAG_PUT => true,
        TAG_TOMBSTONE => false,
        t => return Err(MvccError::Corrupt(format!("history record tag {t}"))),
    };
    let prev = (main != 0).then_some((main, sub));
    Ok(Change { put, prev, kv: decode_kv(&b[CHANGE_HEADER_BYTES..])? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let kv = KeyValue {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            mod_revision: 9,
            create_revision: 3,
            ..Default::default()
        };
        for (put, prev) in [(true, None), (true, Some((7, 2))), (false, Some((8, 0)))] {
            let c = decode_change(&encode_change(put, prev, &kv)).unwrap();
            assert_eq!(c, Change { put, prev, kv: kv.clone() });
        }
        assert!(decode_change(&[TAG_PUT; 5]).is_err());
        let mut bad_tag = encode_change(true, None, &kv);
        bad_tag[0] = 7;
        assert!(decode_change(&bad_tag).is_err());
    }

    #[test]
    fn change_keys_are_read_without_decoding_and_garbage_is_refused() {
        for key in [b"k".to_vec(), vec![7u8; 300]] {
            let kv = KeyValue { key: key.clone(), value: b"v".to_vec(), mod_revision: 3, ..Default::default() };
            for put in [true, false] {
                let rec = encode_change(put, Some((2, 0)), &kv);
                assert_eq!(change_key(&rec).unwrap(), (put, key.as_slice()));
                let varint_bytes = if key.len() < 128 { 1 } else { 2 };
                for cut in 0..CHANGE_HEADER_BYTES + 1 + varint_bytes + key.len() {
                    assert!(change_key(&rec[..cut]).is_err(), "cut at {cut}");
                }
                let mut bad_tag = rec.clone();
                bad_tag[0] = 7;
                assert!(change_key(&bad_tag).is_err());
            }
        }
        assert!(change_key(&[0u8; CHANGE_HEADER_BYTES]).is_err());
        let kv = |k: &str| KeyValue { key: k.into(), ..Default::default() };
        let recs = [
            encode_change(true, None, &kv("a")),
            encode_change(true, None, &kv("b")),
            encode_change(false, None, &kv("a")),
        ];
        assert_eq!(live_keys(recs.iter().map(|r| r.as_slice())).unwrap(), 1);
    }
}
