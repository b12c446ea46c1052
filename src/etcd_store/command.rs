//! The etcd store's replicated commands and their results.
//!
//! A command is the body of a log entry ([`crate::consensus::service::Proposal`]),
//! bincode-encoded ([`Command::encode`]). KV requests are carried in their
//! protobuf encoding so the log holds exactly what the client sent (after
//! validation). Logs written before the runtime carried service-neutral entries
//! held these commands directly; [`super::legacy`] converts them.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::members;
use crate::consensus::MemberId;

/// A replicated state-machine command. KV requests are carried in their protobuf
/// encoding so the log holds exactly what the client sent (after validation).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    Put(#[serde(with = "crate::consensus::raw_bytes")] Vec<u8>),
    DeleteRange(#[serde(with = "crate::consensus::raw_bytes")] Vec<u8>),
    Txn(#[serde(with = "crate::consensus::raw_bytes")] Vec<u8>),
    Compact(#[serde(with = "crate::consensus::raw_bytes")] Vec<u8>),
    /// A change to the member registry (see [`members`]).
    Member(members::MemberChange),
    /// The lease id is chosen by the proposing member, so every replica agrees.
    LeaseGrant {
        id: i64,
        ttl_s: i64,
    },
    LeaseRevoke {
        id: i64,
    },
    /// A keep-alive: re-bases the lease to its full TTL on every member. No longer
    /// proposed (keep-alives go in [`Command::LeaseRenewBatch`]); applied for logs
    /// written by earlier versions.
    LeaseRenew {
        id: i64,
    },
    /// The leader's remaining-TTL view of leases: (id, record version, remaining ms).
    LeaseCheckpoint(Vec<(i64, u64, i64)>),
    /// Raise (`activate`) or clear an alarm (etcd `AlarmType`) for a member.
    Alarm {
        activate: bool,
        member: MemberId,
        alarm: i32,
    },
    /// A change to users, roles or the auth switch (see [`crate::etcd_store::auth`]).
    Auth(crate::etcd_store::auth::AuthOp),
    /// A command whose permissions were checked at `auth_revision`; refused at
    /// apply if the auth store changed since.
    Authed {
        auth_revision: u64,
        cmd: Box<Command>,
    },
    /// A command member `from` forwarded to the leader under an id of its own.
    /// Found only in logs written before forwarding moved into the runtime's
    /// [`crate::consensus::service::Proposal`]; the log upgrade unwraps it, and it
    /// applies as `cmd`. Kept so that the variants after it keep their encoding.
    Forwarded {
        from: MemberId,
        id: u64,
        cmd: Box<Command>,
    },
    /// Keep-alives gathered by one member (see `crate::etcd_store::lease::Renewer`): each lease
    /// re-based to its full TTL on every member, as [`Command::LeaseRenew`] does, in
    /// one entry; an unknown id is skipped. Answered with a [`super::state_machine::LeaseRenewals`].
    LeaseRenewBatch(Vec<i64>),
    /// The leader's revoke of a lease it counted down to zero: applied only if the
    /// lease is still at record `version`, so that a keep-alive committed before it
    /// (which re-based the lease) is not undone. Answered like a revoke; a lease
    /// that is gone or was re-based is left alone (answered "not found").
    /// Last, as new variants go: the variants before it keep their encoding.
    LeaseExpire {
        id: i64,
        version: u64,
    },
    /// A change to the group catalog (see [`super::catalog`]).
    Catalog(super::catalog::CatalogChange),
}

impl Command {
    /// Bytes of the client request a KV command carries (0 for the others): what
    /// request-size limits are checked against.
    pub fn payload_bytes(&self) -> usize {
        match self.inner() {
            Command::Put(b) | Command::DeleteRange(b) | Command::Txn(b) | Command::Compact(b) => b.len(),
            _ => 0,
        }
    }

    /// The command itself, without [`Command::Authed`] or
    /// [`Command::Forwarded`] wrappers.
    pub fn inner(&self) -> &Command {
        match self {
            Command::Authed { cmd, .. } | Command::Forwarded { cmd, .. } => cmd.inner(),
            other => other,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Put(b) => write!(f, "put({}B)", b.len()),
            Command::DeleteRange(b) => write!(f, "delete_range({}B)", b.len()),
            Command::Txn(b) => write!(f, "txn({}B)", b.len()),
            Command::Compact(b) => write!(f, "compact({}B)", b.len()),
            Command::Member(c) => write!(f, "member({c:?})"),
            Command::LeaseGrant { id, ttl_s } => write!(f, "lease_grant({id:x},{ttl_s}s)"),
            Command::LeaseRevoke { id } => write!(f, "lease_revoke({id:x})"),
            Command::LeaseRenew { id } => write!(f, "lease_renew({id:x})"),
            Command::LeaseCheckpoint(l) => write!(f, "lease_checkpoint({} leases)", l.len()),
            Command::Alarm { activate, member, alarm } => write!(f, "alarm({activate},{member:x},{alarm})"),
            Command::Auth(op) => write!(f, "auth({})", op.name()),
            Command::Authed { auth_revision, cmd } => write!(f, "authed@{auth_revision}({cmd})"),
            Command::Forwarded { from, id, cmd } => write!(f, "forwarded({from:x}#{id:x},{cmd})"),
            Command::LeaseRenewBatch(ids) => write!(f, "lease_renew_batch({} leases)", ids.len()),
            Command::LeaseExpire { id, version } => write!(f, "lease_expire({id:x}@{version})"),
            Command::Catalog(c) => write!(f, "catalog({c:?})"),
        }
    }
}

/// A request-level failure decided deterministically at apply time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ApplyError {
    Compacted,
    FutureRev,
    KeyNotFound,
    LeaseNotFound,
    LeaseExists,
    /// A NOSPACE alarm is active: only reads, deletes and compaction are applied.
    NoSpace,
    MemberExists,
    PeerUrlExists,
    MemberNotFound,
    MemberNotLearner,
    Auth(crate::etcd_store::auth::AuthError),
    /// The command did not decode: only a bug or a corrupted log can cause it.
    Malformed(String),
    /// A catalog group with this id exists (or it is the etcd store's).
    GroupExists,
    GroupNotFound,
    /// The catalog holds [`super::catalog::MAX_GROUPS`] groups.
    TooManyGroups,
    /// A group's replicas must be distinct registered members, at least one.
    BadReplicas,
}

/// The result of applying one command: the protobuf-encoded etcd response
/// (header revision filled), or the request's error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CommandResult {
    Ok(#[serde(with = "crate::consensus::raw_bytes")] Vec<u8>),
    Err(ApplyError),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Most [`Command::Authed`] / [`Command::Forwarded`] wrappers one command may
/// carry: the server wraps a command at most once in each.
pub const MAX_COMMAND_NESTING: usize = 4;

/// Refuses a body whose chain of wrappers is longer than [`MAX_COMMAND_NESTING`].
/// Only the wrappers hold a command inside a command, and a wrapper's command is
/// its last field, so the chain is the body's prefix: each link is the wrapper's
/// variant tag and its integer fields (bincode varints).
fn check_nesting(body: &[u8]) -> Result<(), String> {
    static TAGS: std::sync::OnceLock<(u8, u8)> = std::sync::OnceLock::new();
    let (authed, forwarded) = *TAGS.get_or_init(|| {
        let inner = || Box::new(Command::LeaseRevoke { id: 0 });
        let tag = |c: Command| c.encode()[0];
        (
            tag(Command::Authed { auth_revision: 0, cmd: inner() }),
            tag(Command::Forwarded { from: 0, id: 0, cmd: inner() }),
        )
    });
    let mut pos = 0;
    for _ in 0..=MAX_COMMAND_NESTING {
        let fields = match body.get(pos) {
            Some(t) if *t == authed => 1,
            Some(t) if *t == forwarded => 2,
            _ => return Ok(()),
        };
        pos += 1;
        for _ in 0..fields {
            // A bincode varint: one byte below 251, else a marker and 2, 4, 8 or 16 bytes.
            pos += match body.get(pos) {
                Some(b) if *b < 251 => 1,
                Some(251) => 3,
                Some(252) => 5,
                Some(253) => 9,
                Some(254) => 17,
                _ => return Ok(()),
            };
        }
    }
    Err(format!("a command nested more than {MAX_COMMAND_NESTING} deep"))
}

impl Command {
    /// The log entry body for this command.
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, config()).expect("commands always encode")
    }

    /// A command from a log entry body; `Err` only for a body no member wrote
    /// (a bug, a corrupted log, or a hostile peer's forwarded proposal). A body
    /// nesting more than [`MAX_COMMAND_NESTING`] wrappers is refused before it is
    /// decoded: decoding recurses once per wrapper, and a megabyte of nested
    /// wrappers would overflow the stack of every member applying it.
    pub fn decode(body: &[u8]) -> Result<Command, String> {
        check_nesting(body)?;
        crate::consensus::decode_bounded(body).map(|(c, _)| c).map_err(|e| e.to_string())
    }

    /// Whether the reply can be as large as a range (a txn's reads, a delete's
    /// `prev_kv`): such commands are forwarded alone, not in a shared batch.
    pub fn reply_may_be_large(&self) -> bool {
        matches!(self.inner(), Command::Txn(_) | Command::DeleteRange(_))
    }
}

impl CommandResult {
    /// The reply bytes for the runtime.
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, config()).expect("results always encode")
    }

    /// A result from reply bytes the etcd store produced.
    pub fn decode(reply: &[u8]) -> CommandResult {
        crate::consensus::decode_bounded(reply)
            .map(|(r, _)| r)
            .unwrap_or_else(|e| CommandResult::Err(ApplyError::Malformed(format!("undecodable reply: {e}"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wrappers the server makes decode; a hostile chain of 200,000 wrappers (a
    /// megabyte) is refused without decoding it, in either wrapper or mixed.
    #[test]
    fn deeply_nested_commands_are_refused_before_decoding() {
        let mut cmd = Command::Put(b"request".to_vec());
        for depth in 1..=MAX_COMMAND_NESTING {
            cmd = if depth % 2 == 0 {
                Command::Authed { auth_revision: 300 + depth as u64, cmd: Box::new(cmd) }
            } else {
                Command::Forwarded { from: u64::MAX, id: 70_000, cmd: Box::new(cmd) }
            };
            assert!(Command::decode(&cmd.encode()).is_ok(), "depth {depth}");
        }
        let too_deep = Command::Authed { auth_revision: 1, cmd: Box::new(cmd) };
        assert!(Command::decode(&too_deep.encode()).unwrap_err().contains("nested"));
        let link = Command::Authed { auth_revision: 7, cmd: Box::new(Command::LeaseRevoke { id: 0 }) }.encode();
        let mut hostile: Vec<u8> = std::iter::repeat_n(link[..2].to_vec(), 200_000).flatten().collect();
        hostile.extend_from_slice(&Command::LeaseRevoke { id: 0 }.encode());
        assert!(Command::decode(&hostile).unwrap_err().contains("nested"));
    }

    /// Commands keep the wire form they had as `u8` sequences, so existing logs,
    /// snapshots and peers decode them unchanged.
    #[test]
    fn byte_strings_encode_as_before() {
        #[derive(Serialize)]
        enum Old {
            Put(Vec<u8>),
        }
        let bytes: Vec<u8> = (0..=255u8).chain([0, 1, 250, 251, 252, 255]).collect();
        let config = bincode::config::standard();
        let old = bincode::serde::encode_to_vec(Old::Put(bytes.clone()), config).expect("encode");
        let new = bincode::serde::encode_to_vec(Command::Put(bytes.clone()), config).expect("encode");
        assert_eq!(old, new);
        let (back, _): (Command, _) = bincode::serde::decode_from_slice(&old, config).expect("decode");
        assert!(matches!(back, Command::Put(b) if b == bytes));
    }
}
