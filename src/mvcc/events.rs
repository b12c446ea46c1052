//! Reading the change history as watch events.
//!
//! Events come from the `REVS` index in (main, sub) order, so they are ordered and
//! each revision's events are contiguous. A caller asks for a revision window and an
//! event budget; a window is only ever cut at a revision boundary, so a watcher never
//! sees part of a revision (etcd's atomicity guarantee).

use super::keys::{decode_history_key, history_bound, history_key};
use super::{decode_kv, MvccError, ReadView, Result, Rev, TAG_PUT};
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};

/// An event with the (main, sub) revision that produced it.
pub type RevEvent = (Rev, i64, Event);

/// Events of revisions `from..=to`, stopping after the revision during which
/// `max_events` was reached. Returns the events (with their revision and
/// sub-revision) and the last revision fully covered.
pub fn read_events(view: &ReadView, from: Rev, to: Rev, max_events: usize) -> Result<(Vec<RevEvent>, Rev)> {
    assert!(from >= 1 && max_events > 0, "event window must start at a revision and allow an event");
    let mut out = Vec::new();
    if from > to {
        return Ok((out, to));
    }
    let lo = super::keys::rev_key(from, 0);
    let hi = super::keys::rev_key(to + 1, 0);
    for row in view.revs.range::<&[u8]>(lo.as_slice()..hi.as_slice())? {
        let (k, key) = row?;
        let k = k.value();
        let part =
            |r: std::ops::Range<usize>| k.get(r).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(i64::from_be_bytes);
        let (Some(main), Some(sub)) = (part(0..8), part(8..16)) else {
            return Err(MvccError::Corrupt(format!("revision key of {} bytes", k.len())));
        };
        if out.len() >= max_events && out.last().is_some_and(|(r, _, _)| *r != main) {
            let last = out.last().map(|(r, _, _)| *r).unwrap_or(to);
            return Ok((out, last));
        }
        let key = key.value();
        let rec = view
            .history
            .get(history_key(key, main, sub).as_slice())?
            .ok_or_else(|| MvccError::Corrupt(format!("revision {main}.{sub} has no history record")))?;
        let rec = rec.value();
        let kv = decode_kv(rec.get(1..).unwrap_or_default())?;
        let kind = if rec.first() == Some(&TAG_PUT) { EventType::Put } else { EventType::Delete };
        out.push((main, sub, Event { r#type: kind as i32, kv: Some(kv), prev_kv: None }));
    }
    Ok((out, to))
}

/// The version of `key` live just before revision (`main`, `sub`), if any.
pub fn prev_kv(view: &ReadView, key: &[u8], main: Rev, sub: i64) -> Result<Option<KeyValue>> {
    let lo = history_bound(key);
    let hi = history_key(key, main, sub);
    let last = view.history.range::<&[u8]>(lo.as_slice()..hi.as_slice())?.next_back();
    let Some(row) = last else { return Ok(None) };
    let (k, v) = row?;
    let (user_key, _, _) = decode_history_key(k.value()).map_err(MvccError::Corrupt)?;
    debug_assert_eq!(user_key, key);
    let v = v.value();
    if v.first() == Some(&TAG_PUT) {
        Ok(Some(decode_kv(&v[1..])?))
    } else {
        Ok(None)
    }
}
