//! Byte encodings of the MVCC tables' values.
//!
//! - `LATEST` value: `sub ‖ KeyValue`. The sub-revision of the live version (its
//!   main revision is the `KeyValue`'s `mod_revision`), so the change that replaces
//!   it can point at its history record.
//! - `HISTORY` value (keyed by `main ‖ sub`): `tag ‖ prev ‖ KeyValue`, where `prev`
//!   (`main ‖ sub`, all zero when the key did not exist) is the revision of the
//!   version this change replaced: the key's state just before the change. A
//!   tombstone's `KeyValue` holds the key and the deletion's revision.
//!
//! That one pointer answers every historical question without a table keyed by
//! user key: a key's state at revision R is what its first change after R
//! replaced (or its live version when nothing changed it since); a watch event's
//! `prev_kv` is the record `prev` names; compaction finds the version an earlier
//! compaction kept through it. Rejected: history keyed by (user key, revision), the
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

/// The `LATEST` value of a live version written at sub-revision `sub`.
pub fn encode_live(sub: i64, kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + kv.encoded_len());
    out.extend_from_slice(&sub.to_be_bytes());
    kv.encode(&mut out).expect("encoding into a Vec cannot fail");
    out
}

/// Inverse of [`encode_live`]: the live version's history revision and value.
pub fn decode_live(b: &[u8]) -> Result<(RevPtr, KeyValue)> {
    let sub = b.get(..8).and_then(|s| <[u8; 8]>::try_from(s).ok()).map(i64::from_be_bytes);
    let Some(sub) = sub else {
        return Err(MvccError::Corrupt(format!("live record of {} bytes", b.len())));
    };
    let kv = decode_kv(&b[8..])?;
    Ok(((kv.mod_revision, sub), kv))
}

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

/// The `LATEST` value ([`encode_live`]) of the put that `change` (an
/// [`encode_change`] output) records at `sub`: a copy of its encoded `KeyValue`,
/// so a put encodes the value once for both tables.
pub fn live_from_change(sub: i64, change: &[u8]) -> Vec<u8> {
    assert!(change.len() >= CHANGE_HEADER_BYTES, "a change record has a header");
    let kv = &change[CHANGE_HEADER_BYTES..];
    let mut out = Vec::with_capacity(8 + kv.len());
    out.extend_from_slice(&sub.to_be_bytes());
    out.extend_from_slice(kv);
    out
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
        assert_eq!(decode_live(&encode_live(4, &kv)).unwrap(), ((9, 4), kv.clone()));
        assert_eq!(live_from_change(4, &encode_change(true, Some((7, 2)), &kv)), encode_live(4, &kv));
        for (put, prev) in [(true, None), (true, Some((7, 2))), (false, Some((8, 0)))] {
            let c = decode_change(&encode_change(put, prev, &kv)).unwrap();
            assert_eq!(c, Change { put, prev, kv: kv.clone() });
        }
        assert!(decode_live(b"short").is_err());
        assert!(decode_change(&[TAG_PUT; 5]).is_err());
        let mut bad_tag = encode_change(true, None, &kv);
        bad_tag[0] = 7;
        assert!(decode_change(&bad_tag).is_err());
    }
}
