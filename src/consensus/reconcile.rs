//! Raft membership follows the member registry ([`super::members`]).
//!
//! The leader runs [`Group::run_reconciler`]: every tick it compares the registry
//! with Raft's membership and makes at most one change, through openraft's joint
//! consensus:
//! 1. a Raft member the registry no longer lists is removed; if that is the leader
//!    itself, it first hands leadership to a caught-up voter (the new leader then
//!    removes it);
//! 2. a registry member Raft does not know yet is added as a learner (replication
//!    starts; it never votes);
//! 3. a member whose peer URLs changed gets its new address;
//! 4. a registry voter that is still a Raft learner becomes a voter once it has
//!    caught up ([`LEARNER_READY_PERCENT`]).
//!
//! Ordering rule: the registry change commits first, Raft's membership follows; a
//! leader change between the two is harmless because the next leader re-derives
//! the work from the (replicated) registry.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::{ChangeMembers, ServerState};

use super::members::{self, MemberRecord};
use super::network::ClusterInfo;
use super::{ConsensusError, Group, MemberId, PeerInfo};

/// A learner counts as caught up when it has at least this share of the leader's
/// log (etcd's `isLearnerReady` uses 90% of the leader's match index).
pub const LEARNER_READY_PERCENT: u64 = 90;

/// How often every member times a round trip to each peer: etcd's prober interval
/// (its peer read timeout of 5 s less one second).
pub const PEER_PROBE_INTERVAL: Duration = Duration::from_secs(4);

/// Pause between reconciliation passes on the leader.
const RECONCILE_INTERVAL: Duration = Duration::from_millis(100);

/// Longest a single membership change may take before the pass gives up and the
/// next pass re-evaluates (the change itself may still complete).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Whether this member's own registry no longer lists it, or a peer proves it
    /// was removed: the peer has applied at least
    /// as much of the log as this member and its registry no longer lists it. A
    /// removed member usually never applies its own removal (the leader stops
    /// replicating to it once the change is appended), so it has to ask.
    ///
    /// `listed_from` is a log index at which the registry is known to have listed
    /// this member (where a joining member was found; 0 for a bootstrap member,
    /// listed from the first entry). A registry older than that proves nothing:
    /// a joining member replays the log from before it was added.
    pub async fn removal_confirmed_by_peer(&self, listed_from: u64) -> bool {
        let (mine, applied) = match self.cluster_info() {
            Ok(info) => (info.members.iter().any(|(id, _)| *id == self.id), info.applied_index),
            Err(_) => return false,
        };
        if !mine && applied >= listed_from {
            tracing::info!("this member's applied registry no longer lists it");
            return true;
        }
        let applied = applied.max(listed_from);
        let peers: Vec<PeerInfo> =
            self.raft_members().nodes.into_iter().filter(|(id, _)| *id != self.id).map(|(_, n)| n).collect();
        for peer in peers {
            let Some(url) = peer.peer_urls.first() else { continue };
            if let Ok(info) = self.peers.cluster_info(url, Duration::from_secs(1)).await {
                if info.applied_index >= applied && !info.members.iter().any(|(id, _)| *id == self.id) {
                    return true;
                }
            }
        }
        false
    }

    /// The cluster ID and member registry as this member has applied them.
    pub fn cluster_info(&self) -> std::io::Result<ClusterInfo> {
        // Ordering rule: the applied index is read before the registry, so the
        // registry reflects at least that index (apply commits before it reports).
        let applied_index = self.raft.metrics().borrow_watched().last_applied.as_ref().map_or(0, |l| l.index());
        let txn = self.backend.begin_read()?;
        let cluster_id = members::stored_cluster_id(&txn)?
            .ok_or_else(|| std::io::Error::other("this member has not joined a cluster yet"))?;
        Ok(ClusterInfo { cluster_id, members: members::records(&txn)?, applied_index })
    }

    /// This member's (HashKV, compact revision) at `rev`, once it has applied `rev`.
    pub async fn local_hash_kv_at(&self, rev: i64, wait: Duration) -> Result<(u32, i64), String> {
        let mut rx = self.revision.clone();
        tokio::time::timeout(wait, rx.wait_for(|r| *r >= rev))
            .await
            .map_err(|_| format!("revision {rev} not applied within {wait:?}"))?
            .map_err(|e| e.to_string())?;
        let view = crate::mvcc::ReadView::open(&self.backend, &self.index).map_err(|e| e.to_string())?;
        view.hash_kv(rev).map_err(|e| e.to_string())
    }

    /// Asks member `id` for its (HashKV, compact revision) at `rev`.
    pub async fn peer_hash_kv_at(&self, id: MemberId, rev: i64, timeout: Duration) -> Result<(u32, i64), String> {
        let node = self.node_of(id).ok_or_else(|| format!("{id:x} is not a Raft member"))?;
        self.peers.hash_kv_at(&node, rev, timeout).await
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

    /// Drives Raft's membership towards the registry while this member leads.
    /// Runs until the Raft core stops.
    pub async fn run_reconciler(self) {
        let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.raft.metrics().borrow_watched().running_state.is_err() {
                return;
            }
            if !self.is_leader() {
                continue;
            }
            if let Err(e) = self.reconcile_once().await {
                tracing::info!("membership change not done yet: {e}");
            }
        }
    }

    async fn reconcile_once(&self) -> Result<(), String> {
        let registry: BTreeMap<MemberId, MemberRecord> = {
            let txn = self.backend.begin_read().map_err(|e| e.to_string())?;
            members::records(&txn).map_err(|e| e.to_string())?.into_iter().collect()
        };
        let raft = self.raft_members();
        // An unseeded registry (bootstrap entry not applied yet) or a half-done
        // change: nothing to decide this pass.
        if registry.is_empty() || raft.joint {
            return Ok(());
        }
        let gone: BTreeSet<MemberId> = raft.nodes.keys().filter(|id| !registry.contains_key(id)).copied().collect();
        if gone.contains(&self.id) {
            let successor = raft
                .voters
                .iter()
                .filter(|v| **v != self.id && registry.contains_key(v))
                .find(|v| self.local_learner_caught_up(**v).unwrap_or(false));
            let Some(to) = successor else { return Err("no caught-up voter to hand leadership to".into()) };
            tracing::info!(to = %format!("{to:x}"), "this member is being removed: handing leadership over first");
            return self.transfer_leadership(*to, CHANGE_TIMEOUT).await.map_err(|e| e.to_string());
        }
        if !gone.is_empty() {
            let voters: BTreeSet<MemberId> = gone.intersection(&raft.voters).copied().collect();
            let change =
                if voters.is_empty() { ChangeMembers::RemoveNodes(gone) } else { ChangeMembers::RemoveVoters(voters) };
            return self.change(change, "remove members").await;
        }
        let new: BTreeMap<MemberId, PeerInfo> = registry
            .iter()
            .filter(|(id, _)| !raft.nodes.contains_key(id))
            .map(|(id, r)| (*id, PeerInfo { peer_urls: r.peer_urls.clone() }))
            .collect();
        if !new.is_empty() {
            return self.change(ChangeMembers::AddNodes(new), "add learners").await;
        }
        let moved: BTreeMap<MemberId, PeerInfo> = registry
            .iter()
            .filter(|(id, r)| raft.nodes.get(id).is_some_and(|n| n.peer_urls != r.peer_urls))
            .map(|(id, r)| (*id, PeerInfo { peer_urls: r.peer_urls.clone() }))
            .collect();
        if !moved.is_empty() {
            return self.change(ChangeMembers::SetNodes(moved), "update peer URLs").await;
        }
        let ready: BTreeSet<MemberId> = registry
            .iter()
            .filter(|(id, r)| !r.learner && !raft.voters.contains(id))
            .filter(|(id, _)| self.local_learner_caught_up(**id).unwrap_or(false))
            .map(|(id, _)| *id)
            .collect();
        if !ready.is_empty() {
            return self.change(ChangeMembers::AddVoterIds(ready), "promote caught-up learners").await;
        }
        Ok(())
    }

    async fn change(&self, change: ChangeMembers<MemberId, PeerInfo>, what: &str) -> Result<(), String> {
        tracing::info!(?change, "membership: {what}");
        match tokio::time::timeout(CHANGE_TIMEOUT, self.raft.change_membership(change, false)).await {
            Err(_) => Err(format!("{what}: timed out")),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Ok(Ok(_)) => Ok(()),
        }
    }
}
