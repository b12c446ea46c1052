//! The interface between the Raft runtime and the state machine a group runs.
//!
//! The runtime replicates [`Proposal`]s: a service's command as opaque bytes,
//! plus the runtime's own bookkeeping (which member forwarded it). It knows
//! nothing of what the bytes mean; a [`Service`] decodes and applies them. What
//! a service must guarantee, and why:
//! - [`Service::apply`] applies a batch of committed entries in ONE storage
//!   transaction that also records the last entry's log id (and the membership,
//!   when an entry changes it), so that data and applied index never disagree
//!   after a crash; [`Service::applied_state`] reads them back at start.
//!   Applying is deterministic: every member computes the same replies.
//! - A snapshot built by [`SnapshotSource::build`] is durable before it is
//!   returned (openraft purges the log up to it), and
//!   [`Service::install_snapshot`] replaces the whole state.
//!
//! The runtime answers each proposal with the reply its service computed, on the
//! member that proposed it: the leader, or the follower that forwarded it (see
//! [`LocalAnswers`]).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use super::{ConsensusError, MemberId, SnapshotData, TypeConfig};

type C = TypeConfig;

/// A committed entry as a service sees it.
pub type Entry = EntryOf<C>;
pub type LogId = LogIdOf<C>;
pub type StoredMembership = StoredMembershipOf<C>;
pub type SnapshotMeta = SnapshotMetaOf<C>;
pub type Snapshot = SnapshotOf<C, SnapshotData>;

/// One log entry's command: the service's bytes, and who waits for the answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proposal {
    /// Set when a follower forwarded the command for one of its clients: that
    /// member answers the client from its own apply (see [`LocalAnswers`]).
    pub origin: Option<Origin>,
    #[serde(with = "super::raw_bytes")]
    pub body: Vec<u8>,
}

/// The member that forwarded a proposal, and the id it waits for the answer by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub member: MemberId,
    pub id: u64,
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.origin {
            Some(o) => write!(f, "proposal({}B from {:x}#{:x})", self.body.len(), o.member, o.id),
            None => write!(f, "proposal({}B)", self.body.len()),
        }
    }
}

/// A replicated state machine (see the module docs for its contract). Methods are
/// synchronous: they run on the group's state-machine task, one at a time.
pub trait Service: Send + Sync + 'static {
    /// The log id of the last applied entry and the last applied membership, as
    /// stored with the state.
    fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)>;

    /// Applies `entries` (consecutive, committed) in one storage transaction with
    /// the last one's log id; one reply per entry (ignored for blank and
    /// membership entries). An `Err` stops the group: it is for storage failures,
    /// never for a bad command, which gets a reply saying so.
    fn apply(&mut self, entries: &[Entry]) -> io::Result<Vec<Vec<u8>>>;

    /// Something that builds a snapshot of the state as of now, possibly while
    /// later entries are applied.
    fn snapshot_builder(&mut self) -> Box<dyn SnapshotSource>;

    /// Replaces the whole state with a snapshot's.
    fn install_snapshot(&mut self, meta: &SnapshotMeta, data: SnapshotData) -> io::Result<()>;

    /// The latest snapshot built or installed, if any.
    fn current_snapshot(&mut self) -> io::Result<Option<Snapshot>>;
}

/// Builds one snapshot (see [`Service::snapshot_builder`]).
pub trait SnapshotSource: Send + Sync + 'static {
    fn build(&mut self) -> io::Result<Snapshot>;
}

/// Where the caller of a forwarded proposal waits for its reply.
pub type Answer = tokio::sync::oneshot::Sender<Result<Vec<u8>, ConsensusError>>;

/// Forwarded proposals that this member answers from its own apply, as etcd
/// answers a write sent to a follower.
///
/// A follower sends its clients' proposals to the leader with an [`Origin`]
/// naming itself and an id it parks the caller's answer under before sending.
/// Every member applies the entry; the one that forwarded it answers its caller
/// with its own reply (apply is deterministic, so it is the leader's reply too)
/// as soon as it has applied the entry. Before this, the caller waited for the
/// leader's apply and one more hop, and the follower, applying the same entry
/// meanwhile, took the leader's answer only after that (traced: ~0.1 ms of a 1 ms
/// single-client put). The leader still answers each forwarded proposal: the
/// follower takes the answer back ([`LocalAnswers::unpark`]) and sends the
/// leader's reply when it has not applied the entry by then (its apply is late,
/// it installed a snapshot past the entry, or the proposal failed).
///
/// Ids start at a random 64-bit number per process, so an entry forwarded by an
/// earlier run of this member meets an answer parked by this run only if the two
/// runs' id ranges overlap (odds of about ids used² / 2⁶⁴). Bounded by the
/// forwarded proposals in flight (`MAX_FORWARD_INFLIGHT × MAX_FORWARD_BATCH` per
/// leader, see `network`).
pub struct LocalAnswers {
    member: MemberId,
    next_id: AtomicU64,
    waiting: std::sync::Mutex<std::collections::BTreeMap<u64, Answer>>,
}

impl LocalAnswers {
    pub fn new(member: MemberId) -> Self {
        LocalAnswers { member, next_id: AtomicU64::new(super::fresh_seed()), waiting: Default::default() }
    }

    /// Wraps `body` for forwarding and parks `answer` until the entry is applied
    /// here; returns the proposal and the id to take the answer back by.
    pub fn park(&self, body: Vec<u8>, answer: Answer) -> (Proposal, u64) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.waiting.lock().expect("local answers poisoned").insert(id, answer);
        (Proposal { origin: Some(Origin { member: self.member, id }), body }, id)
    }

    /// Takes back the answer parked under `id`, unless it has been answered.
    pub fn unpark(&self, id: u64) -> Option<Answer> {
        self.waiting.lock().expect("local answers poisoned").remove(&id)
    }

    /// The answer parked for `proposal`, if this member forwarded it and waits for it.
    fn take(&self, proposal: &Proposal) -> Option<Answer> {
        match proposal.origin {
            Some(Origin { member, id }) if member == self.member => self.unpark(id),
            _ => None,
        }
    }
}

/// openraft's state machine over a [`Service`]: hands it batches, sends replies.
pub struct ServiceMachine {
    service: Box<dyn Service>,
    /// Forwarded proposals answered from this member's apply; `None` where nothing
    /// forwards (tests that drive a state machine alone).
    answers: Option<Arc<LocalAnswers>>,
}

impl ServiceMachine {
    pub fn new(service: Box<dyn Service>, answers: Option<Arc<LocalAnswers>>) -> Self {
        ServiceMachine { service, answers }
    }
}

impl RaftStateMachine<C> for ServiceMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Builder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        self.service.applied_state()
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            batch.push(entry);
            responders.push(responder);
        }
        // On the leader (the only member with callers to answer), let the tasks
        // already woken run first: among them the sends of the new commit index,
        // which followers apply (and answer their forwarded proposals) in parallel
        // with this apply; they used to leave only after it (traced: the commit
        // index reached a follower ~0.13 ms after the leader's commit).
        if responders.iter().any(Option::is_some) {
            tokio::task::yield_now().await;
        }
        let replies = self.service.apply(&batch)?;
        assert_eq!(replies.len(), batch.len(), "a service answers every entry of a batch");
        for ((entry, r), reply) in batch.iter().zip(responders).zip(replies) {
            if let Some(r) = r {
                r.send(reply);
            } else if let (Some(answers), EntryPayload::Normal(proposal)) = (&self.answers, &entry.payload) {
                if let Some(answer) = answers.take(proposal) {
                    let _ = answer.send(Ok(reply));
                }
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Builder {
        Builder(self.service.snapshot_builder())
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), io::Error> {
        self.service.install_snapshot(meta, snapshot)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        self.service.current_snapshot()
    }
}

/// openraft's snapshot builder over a [`SnapshotSource`].
pub struct Builder(Box<dyn SnapshotSource>);

impl RaftSnapshotBuilder<C> for Builder {
    type SnapshotData = SnapshotData;

    /// Builds on this thread, but on a multi-threaded runtime first hands the
    /// thread's other tasks to another worker (`block_in_place`): a build writes
    /// every row of the service and fsyncs, which took the only worker of a
    /// 2-core member for long enough that its groups' heartbeats lapsed and
    /// elections followed (seen as "no leader" answers in `scripts/bench-queue`).
    /// On a current-thread runtime (the simulation) it builds inline.
    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(|| self.0.build()),
            _ => self.0.build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forwarded ids differ between runs of a member, so an entry forwarded before
    /// a restart cannot be taken for a proposal parked after it.
    #[test]
    fn forwarded_ids_start_anew_per_run() {
        let first: Vec<u64> = (0..2).map(|_| LocalAnswers::new(1).next_id.load(Ordering::Relaxed)).collect();
        assert_ne!(first[0], first[1]);
    }

    /// Only the member that forwarded a proposal takes its parked answer, once.
    #[test]
    fn a_parked_answer_is_taken_once_by_its_member() {
        let answers = LocalAnswers::new(2);
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let (mine, id) = answers.park(b"x".to_vec(), tx);
        let other = Proposal { origin: Some(Origin { member: 3, id }), body: Vec::new() };
        assert!(answers.take(&other).is_none());
        assert!(answers.take(&mine).is_some());
        assert!(answers.take(&mine).is_none());
        assert!(answers.unpark(id).is_none());
    }
}
