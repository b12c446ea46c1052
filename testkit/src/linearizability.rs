//! A linearizability checker for register histories (Wing & Gong's search with
//! Lowe's memoisation), per key.
//!
//! A history records, for every operation a client issued, when it was invoked,
//! when its answer arrived and what the answer was. An operation whose answer
//! never came (a timeout, a dropped connection) is *indeterminate*: it may or may
//! not have taken effect, at any time after its invocation. The history is
//! linearizable when every key's operations can be put in one order that
//! respects real time (an operation that completed before another was invoked
//! comes first), in which each completed operation's answer is what a single
//! register would have answered, and indeterminate operations either take effect
//! somewhere after their invocation or not at all.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// What a client asked of one key's register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write(u64),
    /// Compare-and-swap: write `new` if the register holds `expect`.
    Cas {
        expect: u64,
        new: u64,
    },
}

/// What the client was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The value read (`None`: the key did not exist).
    Value(Option<u64>),
    /// A write was acknowledged.
    Written,
    /// Whether a compare-and-swap succeeded.
    Swapped(bool),
    /// No answer: the operation may or may not have happened.
    Unknown,
}

/// One operation of a history. Times are any monotonic clock (e.g. nanoseconds
/// since the test started); `completed` is ignored for `Outcome::Unknown`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub client: usize,
    pub key: String,
    pub op: Op,
    pub outcome: Outcome,
    pub invoked: u64,
    pub completed: u64,
    /// The revision in the response header (etcd's store revision when the
    /// operation was served; for a write that took effect, the write's own);
    /// 0 when unknown.
    pub revision: u64,
}

impl Event {
    fn end(&self) -> u64 {
        if self.outcome == Outcome::Unknown {
            u64::MAX
        } else {
            self.completed
        }
    }
}

/// A key whose operations admit no linearization, to print with the seed of the
/// run: a minimal subset of its operations (by invocation time) that is already
/// not linearizable: dropping any one of them would make it linearizable.
#[derive(Debug, Clone)]
pub struct Violation {
    pub key: String,
    pub events: Vec<Event>,
    /// Operations on the key in the whole history.
    pub total: usize,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "history of key {:?} is not linearizable; {} of its {} operations suffice to show it:",
            self.key,
            self.events.len(),
            self.total
        )?;
        for e in &self.events {
            let end = if e.outcome == Outcome::Unknown { "?".to_string() } else { e.completed.to_string() };
            writeln!(f, "  client {:>3} [{:>12} .. {:>12}] {:?} -> {:?}", e.client, e.invoked, end, e.op, e.outcome)?;
        }
        Ok(())
    }
}

/// Writes of `value` to each of `keys` that completed at time 0, before anything
/// a history records afterwards: what a test wrote while setting up.
pub fn initial_writes(keys: impl IntoIterator<Item = String>, value: u64) -> Vec<Event> {
    keys.into_iter()
        .map(|key| Event {
            client: 0,
            key,
            op: Op::Write(value),
            outcome: Outcome::Written,
            invoked: 0,
            completed: 0,
            revision: 0,
        })
        .collect()
}

/// Checks every key of `history`; the first violation found (keys in order).
pub fn check(history: &[Event]) -> Result<(), Violation> {
    let mut by_key: BTreeMap<&str, Vec<Event>> = BTreeMap::new();
    for e in history {
        by_key.entry(&e.key).or_default().push(e.clone());
    }
    for (key, mut events) in by_key {
        events.sort_by_key(|e| (e.invoked, e.end()));
        if !linearizable(&events) {
            let total = events.len();
            return Err(Violation { key: key.to_string(), events: minimize(events), total });
        }
    }
    Ok(())
}

/// Real time must agree with revision order across all keys: an operation
/// invoked after another completed was served at a revision at least as high, and
/// strictly higher if it is a write that took effect (a put, a swap that
/// succeeded). Every etcd response carries its revision, so this catches stale
/// reads and lost ordering even where one key's register history cannot.
/// Events with revision 0 or no answer are skipped.
pub fn check_revisions(history: &[Event]) -> Result<(), String> {
    let mut known: Vec<&Event> = history.iter().filter(|e| e.revision != 0 && e.outcome != Outcome::Unknown).collect();
    let mut by_end = known.clone();
    by_end.sort_by_key(|e| e.completed);
    known.sort_by_key(|e| e.invoked);
    let mut latest: Option<&Event> = None;
    let mut ended = by_end.iter().peekable();
    for e in known {
        while let Some(done) = ended.next_if(|d| d.completed < e.invoked) {
            if latest.is_none_or(|l| done.revision > l.revision) {
                latest = Some(done);
            }
        }
        let Some(before) = latest else { continue };
        let wrote = matches!(e.outcome, Outcome::Written | Outcome::Swapped(true));
        if e.revision < before.revision || (wrote && e.revision == before.revision) {
            return Err(format!(
                "revision order violated: {before:?} completed at revision {} before {e:?} was invoked, which was served at revision {}",
                before.revision, e.revision
            ));
        }
    }
    Ok(())
}

/// Shrinks a non-linearizable history to a 1-minimal one: removes chunks of
/// operations, halving the chunk size, as long as what remains still fails. A
/// write whose value a remaining operation observes stays: otherwise every read
/// would shrink to the misleading "read a value nobody wrote".
fn minimize(mut events: Vec<Event>) -> Vec<Event> {
    let writes = |h: &[Event]| -> HashSet<u64> {
        h.iter()
            .filter_map(|e| match e.op {
                Op::Write(v) | Op::Cas { new: v, .. } => Some(v),
                Op::Read => None,
            })
            .collect()
    };
    let all_written = writes(&events);
    let keeps_writers = |h: &[Event]| {
        let written = writes(h);
        h.iter().all(|e| {
            let observed = match (e.op, e.outcome) {
                (Op::Read, Outcome::Value(Some(v))) => Some(v),
                (Op::Cas { expect, .. }, Outcome::Swapped(true)) => Some(expect),
                _ => None,
            };
            observed.is_none_or(|v| !all_written.contains(&v) || written.contains(&v))
        })
    };
    let mut chunk = events.len().div_ceil(2).max(1);
    loop {
        let mut start = 0;
        while start < events.len() {
            let mut trial = events.clone();
            trial.drain(start..(start + chunk).min(events.len()));
            if !trial.is_empty() && keeps_writers(&trial) && !linearizable(&trial) {
                events = trial;
            } else {
                start += chunk;
            }
        }
        if chunk == 1 {
            return events;
        }
        chunk = chunk.div_ceil(2);
    }
}

/// The register's answer to `op` in state `value`, and the state after it.
fn step(value: Option<u64>, op: Op) -> (Outcome, Option<u64>) {
    match op {
        Op::Read => (Outcome::Value(value), value),
        Op::Write(v) => (Outcome::Written, Some(v)),
        Op::Cas { expect, new } if value == Some(expect) => (Outcome::Swapped(true), Some(new)),
        Op::Cas { .. } => (Outcome::Swapped(false), value),
    }
}

/// Depth-first search over linearization orders, skipping (set of linearized
/// operations, register value) states already explored.
fn linearizable(events: &[Event]) -> bool {
    let n = events.len();
    let must: usize = events.iter().filter(|e| e.outcome != Outcome::Unknown).count();
    let mut seen: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    // Each frame: linearized set, register value, completed ops linearized, next candidate to try.
    let mut stack: Vec<(Vec<u64>, Option<u64>, usize, usize)> = vec![(vec![0; n.div_ceil(64)], None, 0, 0)];
    while let Some((done, value, completed_done, from)) = stack.pop() {
        if completed_done == must {
            return true;
        }
        let is_done = |i: usize| done[i / 64] & (1 << (i % 64)) != 0;
        // An operation may go next only if no pending operation completed before it began.
        let bound = (0..n).filter(|&i| !is_done(i)).map(|i| events[i].end()).min().unwrap_or(u64::MAX);
        let mut next = None;
        for i in from..n {
            if is_done(i) || events[i].invoked > bound {
                continue;
            }
            let (answer, after) = step(value, events[i].op);
            let unknown = events[i].outcome == Outcome::Unknown;
            if !unknown && answer != events[i].outcome {
                continue;
            }
            let mut d = done.clone();
            d[i / 64] |= 1 << (i % 64);
            if seen.insert((d.clone(), after)) {
                next = Some((i, d, after, completed_done + usize::from(!unknown)));
                break;
            }
        }
        if let Some((i, d, after, c)) = next {
            // Come back to this frame for the candidates after `i`.
            stack.push((done, value, completed_done, i + 1));
            stack.push((d, after, c, 0));
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(client: usize, op: Op, outcome: Outcome, invoked: u64, completed: u64) -> Event {
        Event { client, key: "k".into(), op, outcome, invoked, completed, revision: 0 }
    }
    use Op::*;
    use Outcome::*;

    #[test]
    fn revisions_must_follow_real_time() {
        let at =
            |op, outcome, invoked, completed, revision| Event { revision, ..ev(0, op, outcome, invoked, completed) };
        let ok = vec![
            at(Write(1), Written, 0, 1, 2),
            at(Read, Value(Some(1)), 2, 3, 2),
            at(Write(2), Written, 4, 5, 3),
            // Concurrent with the write above: may be served before it.
            at(Read, Value(Some(1)), 4, 6, 2),
        ];
        assert!(check_revisions(&ok).is_ok());
        // A read served at an older revision than a write that completed before it began.
        let stale = vec![at(Write(1), Written, 0, 1, 5), at(Read, Value(None), 2, 3, 4)];
        assert!(check_revisions(&stale).is_err());
        // A later write reusing an earlier write's revision.
        let dup = vec![at(Write(1), Written, 0, 1, 5), at(Write(2), Written, 2, 3, 5)];
        assert!(check_revisions(&dup).unwrap_err().contains("revision order"));
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            ev(0, Read, Value(None), 0, 1),
            ev(0, Write(1), Written, 2, 3),
            ev(1, Read, Value(Some(1)), 4, 5),
            ev(1, Cas { expect: 1, new: 2 }, Swapped(true), 6, 7),
            ev(0, Cas { expect: 1, new: 3 }, Swapped(false), 8, 9),
            ev(0, Read, Value(Some(2)), 10, 11),
        ];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // Two overlapping writes; reads after both see one of them, consistently.
        let h = vec![
            ev(0, Write(1), Written, 0, 10),
            ev(1, Write(2), Written, 1, 9),
            ev(2, Read, Value(Some(1)), 11, 12),
            ev(3, Read, Value(Some(1)), 13, 14),
        ];
        assert!(check(&h).is_ok());
        // A read overlapping a write may see the old or the new value.
        let h =
            vec![ev(0, Write(1), Written, 0, 10), ev(1, Read, Value(None), 1, 2), ev(2, Read, Value(Some(1)), 3, 4)];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn stale_read_after_a_completed_write_is_a_violation() {
        let h = vec![
            ev(0, Write(1), Written, 0, 1),
            ev(1, Read, Value(Some(1)), 2, 3),
            // Both the write and a read of its value completed before this began.
            ev(2, Read, Value(None), 4, 5),
        ];
        let v = check(&h).unwrap_err();
        // The read of 1 is not needed to show the violation.
        assert_eq!(v.events.len(), 2);
        assert_eq!(v.total, 3);
        assert!(v.to_string().contains("not linearizable"), "{v}");
    }

    #[test]
    fn reads_that_go_back_in_time_are_a_violation() {
        // The register flips 1 -> 2 once; one client sees 2 then 1 later.
        let h = vec![
            ev(0, Write(1), Written, 0, 1),
            ev(1, Write(2), Written, 2, 20),
            ev(2, Read, Value(Some(2)), 3, 4),
            ev(2, Read, Value(Some(1)), 5, 6),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn indeterminate_operations_may_or_may_not_have_happened() {
        // A timed-out write later observed: it took effect.
        let h = vec![ev(0, Write(7), Unknown, 0, 0), ev(1, Read, Value(Some(7)), 50, 51)];
        assert!(check(&h).is_ok());
        // A timed-out write never observed: it did not.
        let h = vec![ev(0, Write(7), Unknown, 0, 0), ev(1, Read, Value(None), 50, 51)];
        assert!(check(&h).is_ok());
        // But it cannot take effect before it was invoked.
        let h = vec![ev(1, Read, Value(Some(7)), 0, 1), ev(0, Write(7), Unknown, 5, 0)];
        assert!(check(&h).is_err());
        // A value nobody wrote is a violation.
        let h = vec![ev(0, Write(1), Written, 0, 1), ev(1, Read, Value(Some(9)), 2, 3)];
        assert!(check(&h).is_err());
    }

    #[test]
    fn compare_and_swap_answers_must_match_the_register() {
        // Two clients race a CAS from 0: only one may win.
        let h = vec![
            ev(0, Write(0), Written, 0, 1),
            ev(1, Cas { expect: 0, new: 1 }, Swapped(true), 2, 10),
            ev(2, Cas { expect: 0, new: 2 }, Swapped(true), 3, 9),
        ];
        assert!(check(&h).is_err());
        let h = vec![
            ev(0, Write(0), Written, 0, 1),
            ev(1, Cas { expect: 0, new: 1 }, Swapped(true), 2, 10),
            ev(2, Cas { expect: 0, new: 2 }, Swapped(false), 3, 9),
            ev(3, Read, Value(Some(1)), 11, 12),
        ];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn keys_are_checked_independently_and_many_clients_stay_tractable() {
        // 40 clients each write their id and read it back concurrently on its own key,
        // plus 12 overlapping writes on one shared key read at the end (the search is
        // exponential in the number of mutually concurrent operations on one key).
        let mut h = Vec::new();
        for c in 0..40u64 {
            h.push(Event {
                client: c as usize,
                key: format!("own{c}"),
                op: Write(c),
                outcome: Written,
                invoked: c,
                completed: 100 + c,
                revision: 0,
            });
            h.push(Event {
                client: c as usize,
                key: format!("own{c}"),
                op: Read,
                outcome: Value(Some(c)),
                invoked: 200 + c,
                completed: 300 + c,
                revision: 0,
            });
        }
        for c in 0..12u64 {
            h.push(Event {
                client: c as usize,
                key: "shared".into(),
                op: Write(c),
                outcome: Written,
                invoked: c,
                completed: 1000 - c,
                revision: 0,
            });
        }
        h.push(Event {
            client: 99,
            key: "shared".into(),
            op: Read,
            outcome: Value(Some(7)),
            invoked: 2000,
            completed: 2001,
            revision: 0,
        });
        assert!(check(&h).is_ok());
    }
}
