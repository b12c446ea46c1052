//! The lessor: when leases expire, who renews them, and who acts on expiry.
//!
//! Contract:
//! - Every member counts every lease down. A member starts (or re-starts) counting
//!   from the replicated `remaining_ms` the moment it observes a new record version
//!   (grant, logged keep-alive, checkpoint). Because followers count too, a new
//!   leader already knows how much TTL is left: leases survive leader changes with
//!   their remaining TTL, not reset to the full TTL as etcd does.
//! - Keep-alives are answered by the leader (followers forward theirs, batched, on
//!   the peer connection; see [`renewer`]). The leader renews a lease in memory,
//!   without a log entry, when a logged renewal of that lease was proposed at most
//!   [`RENEWAL_GRACE`] ago and committed, and no checkpoint has been taken since;
//!   otherwise the keep-alive is logged (a [`Command::LeaseRenewBatch`] entry, many
//!   leases to an entry). Under steady keep-alives a lease costs one log entry per
//!   [`CHECKPOINT_INTERVAL`], whatever the keep-alive rate.
//! - Why the TTL a client is told survives a leader change: an in-memory renewal at
//!   time r promises r + TTL, and r is at most [`RENEWAL_GRACE`] after the logged
//!   renewal that every later leader holds (a record marked `renewed`). A member
//!   that becomes leader extends each lease whose base is such a renewal by
//!   [`RENEWAL_GRACE`], so it never revokes a lease earlier than promised. The
//!   price, and the staleness bound: after a leader change a lease kept alive may
//!   outlive its last keep-alive by up to [`RENEWAL_GRACE`]. Leases never renewed
//!   (or checkpointed since) get no grace: their remaining TTL carries over exactly.
//! - Only the leader acts: it proposes a revoke for each expired lease, and every
//!   [`CHECKPOINT_INTERVAL`] it proposes a checkpoint of all remaining TTLs (its
//!   in-memory renewals included) so that a member that restarts resumes from a
//!   recent value.
//! - Expiry is a replicated revoke like a client's, so all members delete the
//!   attached keys at the same revision.
//! - Time-to-live answers on a follower ask the leader, whose count includes its
//!   in-memory renewals (etcd forwards them too).

pub mod renewer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::base::BoxFuture;
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::consensus::state_machine::LeaseRenewals;
use crate::consensus::{ApplyError, Command, CommandResult, ConsensusError, Group, LeaderCalls, MemberId};
use crate::mvcc::lease::LeaseRecord;
use crate::mvcc::ReadView;
use crate::supervisor::Supervisor;
use renewer::{RenewError, Renewer};

/// How often the lessor re-reads lease records and checks expiry. Bounds how late a
/// lease can be revoked past its deadline (plus one commit).
pub const TICK: Duration = Duration::from_millis(100);
/// How often the leader persists remaining TTLs.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// How long after a logged renewal the leader may renew the same lease in memory,
/// and so the most a new leader adds to a lease last renewed by a keep-alive (see
/// the module doc).
pub const RENEWAL_GRACE: Duration = CHECKPOINT_INTERVAL;
/// How long a follower waits for the leader's count of a lease's time to live
/// before it answers from its own.
const REMAINING_ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// etcd's `MaxLeaseTTL`: 9,000,000,000 seconds.
pub const MAX_LEASE_TTL_S: i64 = 9_000_000_000;

struct Tracked {
    version: u64,
    deadline: Instant,
    ttl_s: i64,
    /// The record's base is a logged keep-alive (see [`LeaseRecord::renewed`]).
    renewed: bool,
}

#[derive(Default)]
struct State {
    tracked: HashMap<i64, Tracked>,
    /// While this member leads: when the logged renewal of each lease that allows
    /// in-memory renewals was proposed. Cleared at every checkpoint and whenever
    /// leadership is gained or lost.
    logged_at: HashMap<i64, Instant>,
    /// Bumped whenever `logged_at` is cleared: a logged renewal proposed before a
    /// clear must not enter it after.
    epoch: u64,
}

impl State {
    fn remaining_ms(&self, rec: &LeaseRecord) -> i64 {
        let full_ms = rec.ttl_s.saturating_mul(1000);
        match self.tracked.get(&rec.id) {
            Some(t) if t.version == rec.version => {
                (t.deadline.saturating_duration_since(Instant::now()).as_millis() as i64).min(full_ms)
            }
            _ => rec.remaining_ms,
        }
    }

    fn forget_logged(&mut self) {
        self.logged_at.clear();
        self.epoch += 1;
    }
}

/// A request a follower's lessor sends to the leader's.
#[derive(Debug, Serialize, Deserialize)]
enum LeaderCall {
    Renew(Vec<i64>),
    /// The leader's (record version, remaining ms) of a lease, if it tracks it.
    Remaining(i64),
}

#[derive(Debug, Serialize, Deserialize)]
enum LeaderAnswer {
    Renewed(Result<Vec<i64>, RenewError>),
    Remaining(Option<(u64, i64)>),
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, ConsensusError> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(|e| ConsensusError::Fatal(e.to_string()))
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, ConsensusError> {
    bincode::serde::decode_from_slice(b, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| ConsensusError::Fatal(format!("malformed lessor message: {e}")))
}

pub struct Lessor {
    group: Group,
    min_ttl_s: i64,
    state: Mutex<State>,
    /// Leases whose revoke this member proposed, and when (retried after a while).
    revoking: Mutex<HashMap<i64, Instant>>,
    id_prefix: u64,
    id_counter: AtomicU64,
    /// While leading: batches the keep-alives that need a log entry into entries.
    logger: Renewer,
    /// While following: batches this member's keep-alives to the leader.
    forwarder: Renewer,
}

impl Lessor {
    /// `election_timeout_ms` sets etcd's minimum TTL: 1.5 election timeouts, in whole
    /// seconds rounded up. `request_timeout` bounds each batch of keep-alives.
    pub fn new(
        group: Group,
        member_id: MemberId,
        election_timeout_ms: u64,
        request_timeout: Duration,
        supervisor: &Supervisor,
    ) -> Arc<Lessor> {
        let min_ttl_s = (3 * election_timeout_ms).div_ceil(2000).max(1) as i64;
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let logged = group.clone();
        let log_batch: renewer::SendBatch = Arc::new(move |ids| {
            let group = logged.clone();
            Box::pin(async move { log_renewals(&group, ids, request_timeout).await })
        });
        let forwarded = group.clone();
        let forward_batch: renewer::SendBatch = Arc::new(move |ids| {
            let group = forwarded.clone();
            Box::pin(async move {
                let req = encode(&LeaderCall::Renew(ids)).map_err(RenewError::Consensus)?;
                let answer = group.call_leader(req, request_timeout).await.map_err(RenewError::Consensus)?;
                match decode(&answer).map_err(RenewError::Consensus)? {
                    LeaderAnswer::Renewed(r) => r,
                    other => Err(RenewError::Apply(ApplyError::Malformed(format!("renewal answered with {other:?}")))),
                }
            })
        });
        let lessor = Arc::new(Lessor {
            logger: Renewer::start(log_batch, supervisor, "lease-renewer"),
            forwarder: Renewer::start(forward_batch, supervisor, "lease-forwarder"),
            group: group.clone(),
            min_ttl_s,
            state: Mutex::default(),
            revoking: Mutex::default(),
            // etcd's id generator: member id in the top 16 bits, then a millisecond
            // timestamp and a counter, so ids from different members never collide.
            id_prefix: (member_id & 0xffff) << 48,
            id_counter: AtomicU64::new((now_ms & 0xff_ffff_ffff) << 8),
        });
        group.serve_leader_calls(Arc::new(LeaderSide(Arc::downgrade(&lessor))));
        lessor
    }

    pub fn min_ttl_s(&self) -> i64 {
        self.min_ttl_s
    }

    /// A fresh positive lease id (etcd's `reqIDGen.Next() & (1<<63 - 1)`).
    pub fn next_id(&self) -> i64 {
        loop {
            let suffix = self.id_counter.fetch_add(1, Ordering::Relaxed).wrapping_add(1) & ((1 << 48) - 1);
            let id = ((self.id_prefix | suffix) & (i64::MAX as u64)) as i64;
            if id != 0 {
                return id;
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("lessor state poisoned")
    }

    /// Milliseconds left on `rec` as this member counts it.
    pub fn remaining_ms(&self, rec: &LeaseRecord) -> i64 {
        self.state().remaining_ms(rec)
    }

    /// Milliseconds left on `rec` (read linearizably by the caller) as the leader
    /// counts it: on a follower, the leader is asked, since only it knows of its
    /// in-memory renewals; if it cannot be asked, this member's count answers.
    pub async fn time_to_live_ms(&self, rec: &LeaseRecord) -> i64 {
        if !self.group.is_leader() {
            let asked = async {
                let req = encode(&LeaderCall::Remaining(rec.id))?;
                decode::<LeaderAnswer>(&self.group.call_leader(req, REMAINING_ASK_TIMEOUT).await?)
            };
            match asked.await {
                Ok(LeaderAnswer::Remaining(Some((version, ms)))) if version == rec.version => return ms,
                Ok(_) => {}
                Err(e) => tracing::debug!("leader's count of lease {:x} not known: {e}", rec.id),
            }
        }
        self.remaining_ms(rec)
    }

    /// One keep-alive: the lease's TTL in seconds once renewed, or 0 if it does not
    /// exist or has expired (its revoke is on the way).
    pub async fn keep_alive(&self, id: i64) -> Result<i64, RenewError> {
        if self.group.is_leader() {
            match self.renew_as_leader(vec![id]).await {
                Err(RenewError::Consensus(ConsensusError::NotLeader)) => {}
                r => return r.map(|ttls| ttls[0]),
            }
        }
        self.forwarder.renew(id).await
    }

    /// Renews `ids` on the leader: in memory where allowed (see the module doc),
    /// through the log otherwise. Answers each lease's TTL, in order.
    async fn renew_as_leader(&self, ids: Vec<i64>) -> Result<Vec<i64>, RenewError> {
        if !self.group.is_leader() {
            return Err(RenewError::Consensus(ConsensusError::NotLeader));
        }
        let now = Instant::now();
        let mut ttls = vec![0; ids.len()];
        let mut to_log = Vec::new();
        let epoch = {
            let mut st = self.state();
            let State { tracked, logged_at, epoch } = &mut *st;
            for (i, id) in ids.iter().enumerate() {
                let recent = logged_at.get(id).is_some_and(|at| now.duration_since(*at) <= RENEWAL_GRACE);
                match tracked.get_mut(id) {
                    // Expired by the leader's count: its revoke is coming (etcd
                    // answers "lease not found" too).
                    Some(t) if t.deadline <= now => {}
                    Some(t) if recent => {
                        t.deadline = now + Duration::from_secs(t.ttl_s.max(0) as u64);
                        ttls[i] = t.ttl_s;
                    }
                    _ => to_log.push(i),
                }
            }
            *epoch
        };
        if to_log.is_empty() {
            return Ok(ttls);
        }
        let logged = futures::future::join_all(to_log.iter().map(|&i| self.logger.renew(ids[i]))).await;
        let mut st = self.state();
        for (i, r) in to_log.into_iter().zip(logged) {
            let ttl_s = r?;
            ttls[i] = ttl_s;
            if ttl_s > 0 {
                // `now` is before the proposal: the in-memory window ends no later
                // than RENEWAL_GRACE after the logged renewal.
                if st.epoch == epoch {
                    st.logged_at.insert(ids[i], now);
                }
                if let Some(t) = st.tracked.get_mut(&ids[i]) {
                    t.deadline = t.deadline.max(now + Duration::from_secs(ttl_s as u64));
                }
            }
        }
        Ok(ttls)
    }

    fn observe(&self, records: &[LeaseRecord]) {
        let now = Instant::now();
        let mut st = self.state();
        let live: std::collections::HashSet<i64> = records.iter().map(|r| r.id).collect();
        st.tracked.retain(|id, _| live.contains(id));
        st.logged_at.retain(|id, _| live.contains(id));
        for r in records {
            let fresh = st.tracked.get(&r.id).is_none_or(|t| t.version != r.version);
            if fresh {
                let deadline = now + Duration::from_millis(r.remaining_ms.max(0) as u64);
                let t = Tracked { version: r.version, deadline, ttl_s: r.ttl_s, renewed: r.renewed };
                st.tracked.insert(r.id, t);
            }
        }
    }

    /// On becoming leader: the previous leader may have renewed leases based on a
    /// logged keep-alive in memory since; give them [`RENEWAL_GRACE`].
    fn take_over(&self) {
        let mut st = self.state();
        st.forget_logged();
        for t in st.tracked.values_mut().filter(|t| t.renewed) {
            t.deadline += RENEWAL_GRACE;
        }
    }

    fn records(&self) -> Option<Vec<LeaseRecord>> {
        ReadView::open(&self.group.backend, &self.group.index).ok()?.leases().ok()
    }

    /// Runs until the process stops.
    pub async fn run(self: Arc<Self>) {
        let mut last_checkpoint = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        let mut leading = false;
        loop {
            tick.tick().await;
            let Some(records) = self.records() else { continue };
            self.observe(&records);
            if !self.group.is_leader() {
                if leading {
                    self.state().forget_logged();
                    leading = false;
                }
                continue;
            }
            if !leading {
                self.take_over();
                leading = true;
            }
            let now = Instant::now();
            let expired: Vec<i64> = {
                let st = self.state();
                let mut revoking = self.revoking.lock().expect("lessor map poisoned");
                revoking.retain(|id, _| st.tracked.contains_key(id));
                st.tracked
                    .iter()
                    .filter(|(id, t)| {
                        t.deadline <= now
                            && revoking.get(*id).is_none_or(|at| now.duration_since(*at) > Duration::from_secs(2))
                    })
                    .map(|(id, _)| *id)
                    .collect()
            };
            for id in expired {
                self.revoking.lock().expect("lessor map poisoned").insert(id, now);
                let group = self.group.clone();
                tokio::spawn(async move {
                    if let Err(e) = group.propose(Command::LeaseRevoke { id }, Duration::from_secs(5)).await {
                        tracing::debug!("revoke of expired lease {id:x} not done: {e}");
                    }
                });
            }
            if now.duration_since(last_checkpoint) >= CHECKPOINT_INTERVAL && !records.is_empty() {
                last_checkpoint = now;
                // Counted and cleared together: a renewal after this count must be
                // logged, as the checkpoint replaces the renewed base.
                let items: Vec<(i64, u64, i64)> = {
                    let mut st = self.state();
                    st.forget_logged();
                    records.iter().map(|r| (r.id, r.version, st.remaining_ms(r))).collect()
                };
                let group = self.group.clone();
                tokio::spawn(async move {
                    if let Err(e) = group.propose(Command::LeaseCheckpoint(items), Duration::from_secs(5)).await {
                        tracing::debug!("lease checkpoint not done: {e}");
                    }
                });
            }
        }
    }

    /// Answers a follower's [`LeaderCall`].
    async fn answer(&self, req: &[u8]) -> Result<Vec<u8>, ConsensusError> {
        if !self.group.is_leader() {
            return Err(ConsensusError::NotLeader);
        }
        let answer = match decode::<LeaderCall>(req)? {
            LeaderCall::Renew(ids) if ids.len() > renewer::MAX_RENEW_BATCH => {
                let why = format!("{} leases in one renewal (at most {})", ids.len(), renewer::MAX_RENEW_BATCH);
                LeaderAnswer::Renewed(Err(RenewError::Apply(ApplyError::Malformed(why))))
            }
            LeaderCall::Renew(ids) => match self.renew_as_leader(ids).await {
                Err(RenewError::Consensus(ConsensusError::NotLeader)) => return Err(ConsensusError::NotLeader),
                r => LeaderAnswer::Renewed(r),
            },
            LeaderCall::Remaining(id) => {
                let st = self.state();
                LeaderAnswer::Remaining(st.tracked.get(&id).map(|t| {
                    let full_ms = t.ttl_s.saturating_mul(1000);
                    (t.version, (t.deadline.saturating_duration_since(Instant::now()).as_millis() as i64).min(full_ms))
                }))
            }
        };
        encode(&answer)
    }
}

/// Proposes one batch of keep-alives as a single log entry.
async fn log_renewals(group: &Group, ids: Vec<i64>, timeout: Duration) -> Result<Vec<i64>, RenewError> {
    match group.propose(Command::LeaseRenewBatch(ids), timeout).await {
        Ok(CommandResult::Ok(bytes)) => LeaseRenewals::decode(bytes.as_slice())
            .map(|r| r.ttl_s)
            .map_err(|e| RenewError::Apply(ApplyError::Malformed(e.to_string()))),
        Ok(CommandResult::Err(e)) => Err(RenewError::Apply(e)),
        Err(e) => Err(RenewError::Consensus(e)),
    }
}

/// The lessor as the group's [`LeaderCalls`] service (weak: the group outlives
/// no lessor, and must not keep one alive).
struct LeaderSide(Weak<Lessor>);

impl LeaderCalls for LeaderSide {
    fn call(&self, req: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, ConsensusError>> {
        let lessor = self.0.clone();
        Box::pin(async move {
            match lessor.upgrade() {
                Some(lessor) => lessor.answer(&req).await,
                None => Err(ConsensusError::Fatal("the lessor stopped".into())),
            }
        })
    }
}
