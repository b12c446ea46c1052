//! Quiescence: idle groups stop their Raft timers; one liveness ping per node
//! pair stands in for their heartbeats.
//!
//! A Raft group ticks to send heartbeats (leader) and to time elections
//! (followers): with dozens of groups per node that is thousands of wake-ups a
//! second and per-group heartbeat traffic, all for groups with nothing to do.
//! As CockroachDB does for idle ranges, an idle group here stops ticking
//! (openraft's runtime `tick` switch) on every replica, and the node-level
//! [`Liveness`] ping, sent once per heartbeat interval from each node to each
//! peer node whatever the number of groups, stands in for its heartbeats.
//!
//! The rules ([`Quiescer::run`] applies them once per heartbeat interval):
//! - A leader quiesces its group after [`QUIESCE_IDLE_ROUNDS`] intervals in which
//!   its log did not grow, everything was committed and applied, every replica
//!   (learners too) held every entry and no membership change was in flight. It
//!   then names the group, term and last index in its node's pings.
//! - A follower quiesces when the leader it follows names the group with the
//!   term and last index the follower has applied.
//! - A leader wakes (ticks again) when its log grows (a write, a membership
//!   change), when it no longer leads, or when a peer node restarted or came back
//!   after being silent: that node's replica is ticking and must hear heartbeats
//!   before its own election timer fires.
//! - A follower wakes when the leader's node has sent no ping for an election
//!   timeout (node down or cut off), or its ping no longer names the group (the
//!   leader woke, stepped down or stopped), or the follower's own view of the
//!   leader or term changed. Its election timer then runs again, so a leader
//!   that is gone is replaced as it would be without quiescence.
//!
//! Safety never depends on timers: a quiescent replica still takes appends,
//! votes and read-index heartbeats, so writes and linearizable reads on a
//! quiescent group work (the leader's log growing wakes it). Only liveness does,
//! and every way a leader can fail to serve ends its pings or drops the group
//! from them. A follower woken while its leader is healthy (pings delayed past
//! an election timeout) may start an election: a leader change, not an error.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Group, GroupId, GroupRegistry, MemberId, PeerInfo};

/// Heartbeat intervals of idleness after which a leader quiesces its group (one
/// second at etcd's default 100 ms interval): a group in use keeps ticking, and
/// the heartbeats sent meanwhile carry the final commit index to the followers.
pub const QUIESCE_IDLE_ROUNDS: u32 = 10;

/// A group its leader's node names in its pings as quiescent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuietGroup {
    pub group: GroupId,
    pub term: u64,
    /// The leader's last log index (committed and applied).
    pub last_index: u64,
}

/// A node's liveness ping (see the module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LivenessPing {
    pub from: MemberId,
    /// Drawn at random when the node starts: a new one means a restart.
    pub incarnation: u64,
    /// The groups the sender leads that are quiescent.
    pub quiet: Vec<QuietGroup>,
}

/// The last ping heard from one peer node.
struct Heard {
    at: Instant,
    incarnation: u64,
    quiet: BTreeMap<GroupId, QuietGroup>,
}

/// What this node heard from its peers' pings; kept by the [`GroupRegistry`] so
/// the peer service can record pings whether or not a [`Quiescer`] runs.
#[derive(Default)]
pub struct Liveness {
    heard: Mutex<BTreeMap<MemberId, Heard>>,
    /// Peers that restarted or came back after a silence since the last round.
    returned: Mutex<BTreeSet<MemberId>>,
    /// Groups on this node quiescent after the last round (for `/metrics`).
    quiet_groups: AtomicU64,
    /// How long without a ping makes a node count as gone, in milliseconds: the
    /// election timeout (set by the [`Quiescer`]; 0 until one runs).
    silence_ms: AtomicU64,
}

impl Liveness {
    /// Records `ping`, heard now.
    pub fn heard(&self, ping: LivenessPing) {
        let now = Instant::now();
        let silence = Duration::from_millis(self.silence_ms.load(Ordering::Relaxed));
        let quiet = ping.quiet.into_iter().map(|q| (q.group, q)).collect();
        let mut heard = self.heard.lock().expect("liveness poisoned");
        let returned = match heard.get(&ping.from) {
            None => true,
            Some(h) => h.incarnation != ping.incarnation || now.duration_since(h.at) >= silence,
        };
        heard.insert(ping.from, Heard { at: now, incarnation: ping.incarnation, quiet });
        drop(heard);
        if returned {
            self.returned.lock().expect("liveness poisoned").insert(ping.from);
        }
    }

    /// Whether `leader`'s node pinged within `silence` naming `quiet` exactly.
    fn names(&self, leader: MemberId, quiet: QuietGroup, silence: Duration) -> bool {
        let heard = self.heard.lock().expect("liveness poisoned");
        heard.get(&leader).is_some_and(|h| h.at.elapsed() < silence && h.quiet.get(&quiet.group) == Some(&quiet))
    }

    fn take_returned(&self) -> BTreeSet<MemberId> {
        std::mem::take(&mut *self.returned.lock().expect("liveness poisoned"))
    }

    /// Whether `member`'s node pinged within the silence that counts as gone
    /// (false before the first ping, or while no [`Quiescer`] runs here).
    pub fn alive(&self, member: MemberId) -> bool {
        let silence = Duration::from_millis(self.silence_ms.load(Ordering::Relaxed));
        let heard = self.heard.lock().expect("liveness poisoned");
        heard.get(&member).is_some_and(|h| h.at.elapsed() < silence)
    }

    /// Groups on this node that were quiescent after the last round.
    pub fn quiet_groups(&self) -> u64 {
        self.quiet_groups.load(Ordering::Relaxed)
    }
}

/// A replica's quiescence, kept per Raft instance (a restarted replica starts
/// awake).
#[derive(Default)]
pub(super) struct QuietState {
    mode: Option<Quiet>,
    /// The leader's last log index at the previous round, and for how many rounds
    /// in a row it stayed idle.
    idle_index: u64,
    idle_rounds: u32,
}

#[derive(Clone, Copy)]
enum Quiet {
    Leading(QuietGroup),
    Following { leader: MemberId, group: QuietGroup },
}

/// Runs quiescence and the liveness pings of one node.
pub struct Quiescer {
    member: MemberId,
    incarnation: u64,
    registry: GroupRegistry,
    /// Any connection pool on the node's shared peer connections.
    pool: super::network::PeerPool,
    heartbeat: Duration,
    election_timeout: Duration,
}

impl Quiescer {
    pub fn new(
        member: MemberId,
        registry: GroupRegistry,
        pool: super::network::PeerPool,
        heartbeat: Duration,
        election_timeout: Duration,
    ) -> Quiescer {
        let silence_ms = u64::try_from(election_timeout.as_millis()).unwrap_or(u64::MAX);
        registry.liveness().silence_ms.store(silence_ms, Ordering::Relaxed);
        Quiescer { member, incarnation: super::fresh_seed(), registry, pool, heartbeat, election_timeout }
    }

    /// One round per heartbeat interval: quiesce or wake each hosted group, then
    /// ping every peer node. Never ends.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let groups = self.registry.all();
            let liveness = self.registry.liveness();
            let returned = liveness.take_returned();
            let mut quiet = Vec::new();
            let mut peers: BTreeMap<MemberId, PeerInfo> = BTreeMap::new();
            let mut quiet_groups = 0;
            for group in &groups {
                let step = self.step(group, &returned);
                if let Some(Quiet::Leading(q)) = step {
                    quiet.push(q);
                }
                quiet_groups += u64::from(step.is_some());
                let m = group.raft.metrics();
                for (id, node) in m.borrow_watched().membership_config.membership().nodes() {
                    if *id != self.member {
                        peers.entry(*id).or_insert_with(|| node.clone());
                    }
                }
            }
            liveness.quiet_groups.store(quiet_groups, Ordering::Relaxed);
            let ping = LivenessPing { from: self.member, incarnation: self.incarnation, quiet };
            let pool = &self.pool;
            let sends = peers.values().map(|node| {
                let ping = &ping;
                async move {
                    if let Err(e) = pool.liveness(node, ping, self.heartbeat).await {
                        tracing::trace!("liveness ping to {node} failed: {e}");
                    }
                }
            });
            futures::future::join_all(sends).await;
        }
    }

    /// Quiesces or wakes `group` by the module's rules; returns its mode after.
    fn step(&self, group: &Group, returned: &BTreeSet<MemberId>) -> Option<Quiet> {
        let liveness = self.registry.liveness();
        let silence = self.election_timeout;
        let rx = group.raft.metrics();
        let m = rx.borrow_watched();
        let mut state = group.quiet.lock().expect("quiet state poisoned");
        let last_index = m.last_log_index.unwrap_or(0);
        let leading =
            m.running_state.is_ok() && m.state == ServerState::Leader && m.current_leader == Some(self.member);
        let awake = match state.mode {
            None => true,
            Some(Quiet::Leading(q)) => {
                let members = m.membership_config.membership();
                let woken_peer = returned.iter().any(|id| members.get_node(id).is_some());
                !leading || q.term != m.current_term || q.last_index != last_index || woken_peer
            }
            Some(Quiet::Following { leader, group: q }) => {
                m.running_state.is_err()
                    || m.current_leader != Some(leader)
                    || m.current_term != q.term
                    || !liveness.names(leader, q, silence)
            }
        };
        if !awake {
            return state.mode;
        }
        if state.mode.take().is_some() {
            group.raft.runtime_config().tick(true);
            state.idle_rounds = 0;
        }
        if m.running_state.is_err() {
            return None;
        }
        if leading {
            let settled = m.cluster_committed.map(|c| c.index()) == m.last_log_index
                && m.last_applied.map(|a| a.index()) == m.last_log_index
                && m.membership_config.log_id() == m.committed_membership_config.log_id()
                && m.membership_config.membership().get_joint_config().len() == 1
                && m.replication.as_ref().is_some_and(|r| {
                    m.membership_config.membership().nodes().all(|(id, _)| {
                        *id == self.member || r.get(id).cloned().flatten().map(|l| l.index()) == Some(last_index)
                    })
                });
            if settled && state.idle_index == last_index {
                state.idle_rounds += 1;
            } else {
                state.idle_index = last_index;
                state.idle_rounds = 0;
            }
            if state.idle_rounds >= QUIESCE_IDLE_ROUNDS {
                let q = QuietGroup { group: group.group_id, term: m.current_term, last_index };
                group.raft.runtime_config().tick(false);
                state.mode = Some(Quiet::Leading(q));
            }
        } else if let Some(leader) = m.current_leader.filter(|l| *l != self.member) {
            state.idle_rounds = 0;
            let q = QuietGroup { group: group.group_id, term: m.current_term, last_index };
            let caught_up = m.last_applied.map(|a| a.index()) == Some(last_index);
            if caught_up && liveness.names(leader, q, silence) {
                group.raft.runtime_config().tick(false);
                state.mode = Some(Quiet::Following { leader, group: q });
            }
        }
        state.mode
    }
}

impl Group {
    /// Whether this replica is quiescent (not ticking).
    pub fn is_quiescent(&self) -> bool {
        self.quiet.lock().expect("quiet state poisoned").mode.is_some()
    }

    /// Readies a quiescent leader for a leader-only operation (a write, a
    /// membership change): it ticks again, and confirms its leadership with a
    /// quorum at once, which renews the leader lease that lapsed while it was
    /// quiet (openraft refuses writes on an expired lease). A no-op otherwise.
    /// Bounded by [`Group::leadership_check_timeout`]; the write that follows
    /// then fails or succeeds on its own terms.
    pub async fn wake(&self) {
        {
            let mut state = self.quiet.lock().expect("quiet state poisoned");
            if !matches!(state.mode, Some(Quiet::Leading(_))) {
                return;
            }
            state.mode = None;
            state.idle_rounds = 0;
        }
        self.raft.runtime_config().tick(true);
        let confirm = self.raft.get_read_linearizer(openraft::raft::ReadPolicy::ReadIndex);
        match tokio::time::timeout(self.leadership_check_timeout(), confirm).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(group = self.group_id, "a woken leader did not confirm its leadership: {e}"),
            Err(_) => tracing::debug!(group = self.group_id, "a woken leader heard no quorum in time"),
        }
    }
}
