//! Reading the change history as watch events.
//!
//! Events come from `HISTORY` in (main, sub) order, so they are ordered and each
//! revision's events are contiguous. A caller asks for a revision window and an
//! event budget; a window is only ever cut at a revision boundary, so a watcher never
//! sees part of a revision (etcd's atomicity guarantee).

use super::keys::{decode_rev_key, rev_key};
use super::records::{decode_change, RevPtr};
use super::{missing_version, stored_version, MvccError, ReadView, Result, Rev};
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};

/// An event with its main revision and the version it replaced (for `prev_kv`).
pub type RevEvent = (Rev, Option<RevPtr>, Event);

/// Events of revisions `from..=to`, stopping after the revision during which
/// `max_events` was reached. Returns the events and the last revision fully covered.
pub fn read_events(view: &ReadView, from: Rev, to: Rev, max_events: usize) -> Result<(Vec<RevEvent>, Rev)> {
    assert!(from >= 1 && max_events > 0, "event window must start at a revision and allow an event");
    let mut out = Vec::new();
    if from > to {
        return Ok((out, to));
    }
    let lo = rev_key(from, 0);
    let hi = rev_key(to + 1, 0);
    for row in view.history.range::<&[u8]>(lo.as_slice()..hi.as_slice())? {
        let (k, v) = row?;
        let (main, _) = decode_rev_key(k.value()).map_err(MvccError::Corrupt)?;
        if out.len() >= max_events && out.last().is_some_and(|(r, _, _)| *r != main) {
            let last = out.last().map(|(r, _, _)| *r).unwrap_or(to);
            return Ok((out, last));
        }
        let change = decode_change(v.value())?;
        let kind = if change.put { EventType::Put } else { EventType::Delete };
        out.push((main, change.prev, Event { r#type: kind as i32, kv: Some(change.kv), prev_kv: None }));
    }
    Ok((out, to))
}

/// The version an event replaced (`prev`, from [`read_events`]), if the key existed.
/// `None` too when compaction removed it: only possible for an event at the
/// compaction revision itself, whose earlier versions are gone.
pub fn prev_kv(view: &ReadView, prev: Option<RevPtr>) -> Result<Option<KeyValue>> {
    let Some(at) = prev else { return Ok(None) };
    match stored_version(&view.history, at)? {
        Some(kv) => Ok(Some(kv)),
        None if at.0 < view.compacted => Ok(None),
        None => Err(missing_version(at)),
    }
}
