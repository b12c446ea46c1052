//! Raft membership as this member sees it, leadership hand-over, learner
//! catch-up and peer probes: what every group's membership management needs,
//! whatever its service (the etcd store's registry drives it, see
//! `crate::etcd_store::reconcile`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::{ChangeMembers, ServerState};

use super::{ConsensusError, Group, MemberId, PeerInfo};

/// A learner counts as caught up when it has at least this share of the leader's
/// log (etcd's `isLearnerReady` uses 90% of the leader's match index).
pub const LEARNER_READY_PERCENT: u64 = 90;

/// How often every member times a round trip to each peer: etcd's prober interval
/// (its peer read timeout of 5 s less one second).
pub const PEER_PROBE_INTERVAL: Duration = Duration::from_secs(4);

/// Longest a single membership change may take before the pass gives up and the
/// next pass re-evaluates (the change itself may still complete).
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Raft's view of the members: every node with its address, and the voters.
#[derive(Debug, Clone, Default)]
pub struct RaftMembers {
    pub nodes: BTreeMap<MemberId, PeerInfo>,
    pub voters: BTreeSet<MemberId>,
    /// A joint configuration is in effect (a change is half done).
    pub joint: bool,
}

impl Group {
    /// Raft's current (possibly uncommitted) membership.
    pub fn raft_members(&self) -> RaftMembers {
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        let membership = m.membership_config.membership();
        RaftMembers {
            nodes: membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
            voters: membership.voter_ids().collect(),
            joint: membership.get_joint_config().len() > 1,
        }
    }

    /// Whether the latest Raft membership lists this member, if that membership
    /// has been applied here (so it is certainly committed); `None` while it is not.
    fn applied_membership_lists_self(&self) -> Option<bool> {
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        let config_index = m.membership_config.log_id().as_ref().map(|l| l.index());
        let applied = config_index.is_some() && config_index <= m.last_applied.as_ref().map(|l| l.index());
        applied.then(|| m.membership_config.membership().get_node(&self.id).is_some())
    }

    /// Whether this member's applied Raft membership lists it. A joining member's
    /// does not until it applies the entry that added it (it replays the log from
    /// before it was added); only a member that was part of the cluster can later
    /// conclude it was removed. The registry entry precedes that Raft entry in the
    /// log, so from then on a registry without this member means it was removed.
    pub fn is_applied_member(&self) -> bool {
        self.applied_membership_lists_self() == Some(true)
    }

    /// Whether this member has applied a membership that leaves it out (so its
    /// removal is certainly committed). Meaningful only for a member that was
    /// part of the cluster ([`Group::is_applied_member`]).
    pub fn removal_applied(&self) -> bool {
        self.applied_membership_lists_self() == Some(false)
    }

    /// Probes every other Raft member every [`PEER_PROBE_INTERVAL`] for the
    /// member's lifetime, recording each round trip (the
    /// `etcd_network_peer_round_trip_time_seconds{To}` histogram). As in etcd, every
    /// member probes every peer, leader or not; a probe is one small `Admin` call on
    /// the connection the member's Raft traffic uses.
    pub async fn run_prober(self) {
        let mut tick = tokio::time::interval(PEER_PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let peers: Vec<(MemberId, PeerInfo)> =
                self.raft_members().nodes.into_iter().filter(|(id, _)| *id != self.id).collect();
            let pool = &self.peers;
            let probes = peers.iter().map(|(id, node)| async move {
                if let Err(e) = pool.probe(*id, node, PEER_PROBE_INTERVAL).await {
                    tracing::debug!(member = %format!("{id:x}"), "peer probe failed: {e}");
                }
            });
            futures::future::join_all(probes).await;
        }
    }

    /// The leader's verdict on whether learner `id` has caught up.
    pub fn local_learner_caught_up(&self, id: MemberId) -> Result<bool, ConsensusError> {
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        if m.state != ServerState::Leader {
            return Err(ConsensusError::NotLeader);
        }
        let leader_last = m.last_log_index.unwrap_or(0);
        let matched =
            m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).map(|l| l.index()).unwrap_or(0);
        Ok(matched * 100 >= leader_last * LEARNER_READY_PERCENT)
    }

    /// Whether learner `id` has caught up, asked of the leader wherever it is.
    pub async fn learner_caught_up(&self, id: MemberId, timeout: Duration) -> Result<bool, ConsensusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let leader = self.wait_leader(deadline).await?;
            let attempt = if leader == self.id {
                self.local_learner_caught_up(id)
            } else {
                let node = self.node_of(leader).ok_or(ConsensusError::NoLeader)?;
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                self.peers.learner_caught_up(&node, id, remaining).await
            };
            match attempt {
                Err(ConsensusError::NotLeader | ConsensusError::NoLeader) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// Hands leadership from this member (which must lead) to voter `to`, and waits
    /// until `to` leads or `timeout` passes.
    pub async fn transfer_leadership(&self, to: MemberId, timeout: Duration) -> Result<(), ConsensusError> {
        self.wake().await;
        self.raft.trigger().transfer_leader(to).await.map_err(|e| ConsensusError::Fatal(e.to_string()))?;
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader == Some(to), "leader transfer")
            .await
            .map(|_| ())
            .map_err(|_| ConsensusError::Timeout)
    }

    /// Whether this member currently leads.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    /// Makes one membership change through joint consensus, within [`CHANGE_TIMEOUT`].
    pub async fn change_membership(&self, change: ChangeMembers<MemberId, PeerInfo>, what: &str) -> Result<(), String> {
        tracing::info!(?change, "membership: {what}");
        self.wake().await;
        match tokio::time::timeout(CHANGE_TIMEOUT, self.raft.change_membership(change, false)).await {
            Err(_) => Err(format!("{what}: timed out")),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Ok(Ok(_)) => Ok(()),
        }
    }
}
