//! Raft membership follows the member registry ([`super::members`]).
//!
//! The leader runs [`EtcdStore::run_reconciler`]: every tick it compares the registry
//! with Raft's membership and makes at most one change, through openraft's joint
//! consensus:
//! 1. a Raft member the registry no longer lists is removed; if that is the leader
//!    itself, it first hands leadership to a caught-up voter (the new leader then
//!    removes it);
//! 2. a registry member Raft does not know yet is added as a learner (replication
//!    starts; it never votes);
//! 3. a member whose peer URLs changed gets its new address;
//! 4. a registry voter that is still a Raft learner becomes a voter once it has
//!    caught up ([`crate::consensus::membership::LEARNER_READY_PERCENT`]).
//!
//! Ordering rule: the registry change commits first, Raft's membership follows; a
//! leader change between the two is harmless because the next leader re-derives
//! the work from the (replicated) registry.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::ChangeMembers;

use super::members::{self, MemberRecord};
use super::EtcdStore;
use crate::consensus::membership::CHANGE_TIMEOUT;
use crate::consensus::{MemberId, PeerInfo};

/// Pause between reconciliation passes on the leader.
const RECONCILE_INTERVAL: Duration = Duration::from_millis(100);

impl EtcdStore {
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
            if let Ok(info) = super::cluster_info_at(self.peers(), url, Duration::from_secs(1)).await {
                if info.applied_index >= applied && !info.members.iter().any(|(id, _)| *id == self.id) {
                    return true;
                }
            }
        }
        false
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
            return self.change_membership(change, "remove members").await;
        }
        let new: BTreeMap<MemberId, PeerInfo> = registry
            .iter()
            .filter(|(id, _)| !raft.nodes.contains_key(id))
            .map(|(id, r)| (*id, PeerInfo { peer_urls: r.peer_urls.clone() }))
            .collect();
        if !new.is_empty() {
            return self.change_membership(ChangeMembers::AddNodes(new), "add learners").await;
        }
        let moved: BTreeMap<MemberId, PeerInfo> = registry
            .iter()
            .filter(|(id, r)| raft.nodes.get(id).is_some_and(|n| n.peer_urls != r.peer_urls))
            .map(|(id, r)| (*id, PeerInfo { peer_urls: r.peer_urls.clone() }))
            .collect();
        if !moved.is_empty() {
            return self.change_membership(ChangeMembers::SetNodes(moved), "update peer URLs").await;
        }
        let ready: BTreeSet<MemberId> = registry
            .iter()
            .filter(|(id, r)| !r.learner && !raft.voters.contains(id))
            .filter(|(id, _)| self.local_learner_caught_up(**id).unwrap_or(false))
            .map(|(id, _)| *id)
            .collect();
        if !ready.is_empty() {
            return self.change_membership(ChangeMembers::AddVoterIds(ready), "promote caught-up learners").await;
        }
        Ok(())
    }
}
