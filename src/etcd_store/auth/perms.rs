//! Key-range permission checks, as etcd's `rangePermCache` answers them.
//!
//! A permission or request names a key range in one of three forms:
//! - `range_end` empty: the single key `key`;
//! - `range_end` = `"\0"`: every key from `key` on;
//! - otherwise the half-open range `[key, range_end)`.
//!
//! A request is allowed when one interval of the *merged* grants contains it, so
//! `[a, c)` is covered by grants `[a, b)` and `[b, c)` together, as in etcd.

use crate::proto::authpb::{permission, Permission};

/// What a request needs on its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A half-open interval of keys; `end: None` is unbounded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    fn of(key: &[u8], range_end: &[u8]) -> Interval {
        let end = match range_end {
            [] => {
                // The single key `key` is `[key, key ‖ 0x00)`.
                let mut next = key.to_vec();
                next.push(0);
                Some(next)
            }
            [0] => None,
            e => Some(e.to_vec()),
        };
        Interval { start: key.to_vec(), end }
    }

    fn contains(&self, other: &Interval) -> bool {
        let end_ok = match (&self.end, &other.end) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => b <= a,
        };
        self.start <= other.start && end_ok
    }
}

fn grants(p: &Permission, access: Access) -> bool {
    let t = permission::Type::try_from(p.perm_type).unwrap_or(permission::Type::Read);
    match access {
        Access::Read => matches!(t, permission::Type::Read | permission::Type::Readwrite),
        Access::Write => matches!(t, permission::Type::Write | permission::Type::Readwrite),
    }
}

/// Whether the grants of kind `access` among `perms` cover `[key, range_end)`.
pub fn covers<'a>(perms: impl Iterator<Item = &'a Permission>, key: &[u8], range_end: &[u8], access: Access) -> bool {
    let mut ivs: Vec<Interval> =
        perms.filter(|p| grants(p, access)).map(|p| Interval::of(&p.key, &p.range_end)).collect();
    ivs.sort_by(|a, b| a.start.cmp(&b.start));
    let want = Interval::of(key, range_end);
    let mut merged: Option<Interval> = None;
    for iv in ivs {
        merged = Some(match merged {
            Some(mut cur) => {
                let touches = match &cur.end {
                    None => true,
                    Some(e) => iv.start <= *e,
                };
                if touches {
                    cur.end = match (cur.end, iv.end) {
                        (None, _) | (_, None) => None,
                        (Some(a), Some(b)) => Some(a.max(b)),
                    };
                    cur
                } else {
                    if cur.contains(&want) {
                        return true;
                    }
                    iv
                }
            }
            None => iv,
        });
    }
    merged.is_some_and(|m| m.contains(&want))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(t: permission::Type, key: &str, end: &str) -> Permission {
        Permission { perm_type: t as i32, key: key.into(), range_end: end.into() }
    }

    #[test]
    fn coverage_cases() {
        use permission::Type::{Read as R, Readwrite as RW, Write as W};
        let cases: &[(&[Permission], &str, &str, Access, bool)] = &[
            (&[perm(R, "foo", "")], "foo", "", Access::Read, true),
            (&[perm(R, "foo", "")], "foo", "", Access::Write, false),
            (&[perm(RW, "foo", "")], "foo", "", Access::Write, true),
            (&[perm(W, "foo", "")], "foo", "", Access::Read, false),
            (&[perm(R, "foo", "")], "fo", "", Access::Read, false),
            (&[perm(R, "foo", "")], "foo", "fop", Access::Read, false),
            (&[perm(R, "foo", "")], "foo", "foo\0", Access::Read, true),
            (&[perm(W, "k1", "k5")], "k3", "", Access::Write, true),
            (&[perm(W, "k1", "k5")], "k5", "", Access::Write, false),
            (&[perm(W, "k1", "k5")], "k1", "k5", Access::Write, true),
            (&[perm(W, "k1", "k5")], "k1", "k6", Access::Write, false),
            (&[perm(W, "k1", "k3"), perm(W, "k3", "k6")], "k1", "k6", Access::Write, true),
            (&[perm(W, "k1", "k3"), perm(W, "k4", "k6")], "k1", "k6", Access::Write, false),
            (&[perm(W, "k1", "k3"), perm(W, "k4", "k6")], "k4", "k5", Access::Write, true),
            (&[perm(R, "z", "\0")], "zz", "", Access::Read, true),
            (&[perm(R, "z", "\0")], "z", "\0", Access::Read, true),
            (&[perm(R, "z", "\0")], "y", "\0", Access::Read, false),
            (&[perm(R, "a", "b"), perm(R, "b", "\0")], "a", "\0", Access::Read, true),
            (&[perm(R, "pre/", "pre0")], "pre/x", "", Access::Read, true),
            (&[perm(R, "pre/", "pre0")], "pre", "prf", Access::Read, false),
            (&[], "a", "", Access::Read, false),
        ];
        for (i, (perms, key, end, access, want)) in cases.iter().enumerate() {
            assert_eq!(covers(perms.iter(), key.as_bytes(), end.as_bytes(), *access), *want, "case {i}");
        }
    }
}
