//! Logs written before the Raft runtime carried service-neutral entries.
//!
//! Those entries held the etcd store's [`Command`] directly, and a follower's
//! forwarded write was a [`Command::Forwarded`] wrapper. Converted once, when the
//! etcd store's group opens its log (see
//! [`crate::consensus::log_store::NodeLog::upgrade_legacy`]): each command becomes
//! a [`Proposal`] body; a forwarding wrapper is dropped (the member that parked
//! the answer has restarted since, so nobody waits for it).

use std::io;

use openraft::entry::RaftEntry;
use openraft::type_config::alias::EntryOf;
use openraft::EntryPayload;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Command, CommandResult};
use crate::consensus::service::Proposal;
use crate::consensus::{MemberId, PeerInfo, Runtime, TypeConfig};

openraft::declare_raft_types!(
    /// The Raft types of logs written before [`Proposal`]s: the same as
    /// [`TypeConfig`] but for the command type.
    pub LegacyTypes:
        D = Command,
        R = CommandResult,
        NodeId = MemberId,
        Node = PeerInfo,
        AsyncRuntime = Runtime,
);

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("legacy log entry: {e}"))
}

/// A value of one Raft type configuration as the same-shaped value of the other
/// (log ids and memberships do not depend on the command type).
fn recode<From: Serialize, To: DeserializeOwned>(v: &From) -> io::Result<To> {
    let bytes = bincode::serde::encode_to_vec(v, config()).map_err(invalid)?;
    crate::consensus::decode_bounded(&bytes).map(|(v, _)| v).map_err(invalid)
}

/// The entry a legacy log record's payload (`bincode(Entry<LegacyTypes>)`) becomes.
pub fn convert_entry(payload: &[u8]) -> io::Result<EntryOf<TypeConfig>> {
    let (legacy, _): (EntryOf<LegacyTypes>, _) = crate::consensus::decode_bounded(payload).map_err(invalid)?;
    let log_id = recode(&legacy.log_id)?;
    Ok(match legacy.payload {
        EntryPayload::Blank => EntryOf::<TypeConfig>::new_blank(log_id),
        EntryPayload::Normal(cmd) => {
            let cmd = match cmd {
                Command::Forwarded { cmd, .. } => *cmd,
                other => other,
            };
            EntryOf::<TypeConfig>::new_normal(log_id, Proposal { origin: None, body: cmd.encode() })
        }
        EntryPayload::Membership(m) => EntryOf::<TypeConfig>::new_membership(log_id, recode(&m)?),
    })
}

#[cfg(test)]
mod tests {
    use openraft::testing::common::log_id;

    use super::*;

    fn legacy(entry: &EntryOf<LegacyTypes>) -> Vec<u8> {
        bincode::serde::encode_to_vec(entry, config()).expect("encode")
    }

    /// Commands keep their meaning (a forwarding wrapper is dropped), blank and
    /// membership entries their content, every entry its log id.
    #[test]
    fn legacy_entries_convert_to_proposals() {
        let put = Command::Put(b"request".to_vec());
        let forwarded = Command::Forwarded { from: 5, id: 9, cmd: Box::new(put.clone()) };
        let id = log_id::<LegacyTypes>(3, 2, 7);
        for cmd in [put.clone(), forwarded] {
            let entry = convert_entry(&legacy(&EntryOf::<LegacyTypes>::new_normal(id, cmd))).expect("convert");
            assert_eq!(entry.log_id.index(), 7);
            assert_eq!(entry.log_id.leader_id.term, 3);
            let EntryPayload::Normal(p) = entry.payload else { panic!("not a normal entry") };
            assert!(p.origin.is_none());
            assert!(matches!(Command::decode(&p.body), Ok(Command::Put(b)) if b == b"request"));
        }
        let blank = convert_entry(&legacy(&EntryOf::<LegacyTypes>::new_blank(id))).expect("convert");
        assert!(matches!(blank.payload, EntryPayload::Blank));
        let nodes = std::collections::BTreeMap::from([(1, PeerInfo { peer_urls: vec!["http://a:1".into()] })]);
        let m = openraft::Membership::<MemberId, PeerInfo>::new(vec![[1].into()], nodes).expect("membership");
        let converted =
            convert_entry(&legacy(&EntryOf::<LegacyTypes>::new_membership(id, m.clone()))).expect("convert");
        assert!(matches!(converted.payload, EntryPayload::Membership(c) if c == m));
        assert!(convert_entry(b"\xff\xff\xff").is_err(), "garbage is refused, not converted");
    }
}
