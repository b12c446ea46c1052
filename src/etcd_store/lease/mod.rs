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
//!   that becomes leader first applies everything committed, then extends each
//!   lease whose base is such a renewal by [`RENEWAL_GRACE`] ([`Lessor::take_over`];
//!   keep-alives wait until it is done), so it never revokes a lease earlier than
//!   promised, even by a deposed leader still answering from memory. Later counts
//!   never shorten that grace: a logged renewal re-bases to the later of the two
//!   deadlines, and a lease counted beyond its TTL is left out of checkpoints
//!   until it is back within it. The price, and the staleness bound: after a
//!   leader change a lease kept alive may outlive its last keep-alive by up to
//!   [`RENEWAL_GRACE`]. Leases never renewed (or checkpointed since) get no grace:
//!   their remaining TTL carries over exactly.
//! - Only the leader acts: it proposes the expiry of each lease it counted down
//!   ([`Command::LeaseExpire`], conditional on the record version it counted, so a
//!   keep-alive committed first wins), and every [`CHECKPOINT_INTERVAL`] it
//!   proposes a checkpoint of the remaining TTLs (its in-memory renewals
//!   included) so that a member that restarts resumes from a recent value.
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

use crate::consensus::{ConsensusError, LeaderCalls, MemberId};
use crate::etcd_store::mvcc::lease::LeaseRecord;
use crate::etcd_store::mvcc::ReadView;
use crate::etcd_store::state_machine::LeaseRenewals;
use crate::etcd_store::{ApplyError, Command, CommandResult, EtcdStore};
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
/// How long a new leader's lessor waits to apply what is committed before it
/// takes over (retried every tick).
const TAKE_OVER_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before a follower sends again a batch of keep-alives whose answer was lost.
const FORWARD_RETRY_PAUSE: Duration = Duration::from_millis(50);
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
    /// The term in which this member took over as the lessor's leader (see
    /// [`Lessor::take_over`]); `None` while it follows. Keep-alives are answered
    /// only once the take-over of the current term is done.
    led_term: Option<u64>,
}

impl State {
    /// Milliseconds left on `rec` by this member's count; may exceed the TTL on a
    /// new leader (the grace of [`Lessor::take_over`]).
    fn remaining_ms(&self, rec: &LeaseRecord) -> i64 {
        match self.tracked.get(&rec.id) {
            Some(t) if t.version == rec.version => {
                t.deadline.saturating_duration_since(Instant::now()).as_millis() as i64
            }
            _ => rec.remaining_ms,
        }
    }

    /// The (record version, milliseconds left, at most the TTL) this member counts
    /// for lease `id`, if it tracks it.
    fn count_of(&self, id: i64) -> Option<(u64, i64)> {
        self.tracked.get(&id).map(|t| {
            let left_ms = t.deadline.saturating_duration_since(Instant::now()).as_millis() as i64;
            (t.version, left_ms.min(t.ttl_s.saturating_mul(1000)))
        })
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
    Renewed(Result<renewer::Renewals, RenewError>),
    Remaining(Option<(u64, i64)>),
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, ConsensusError> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(|e| ConsensusError::Fatal(e.to_string()))
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, ConsensusError> {
    crate::consensus::decode_bounded(b)
        .map(|(v, _)| v)
        .map_err(|e| ConsensusError::Fatal(format!("malformed lessor message: {e}")))
}

pub struct Lessor {
    group: EtcdStore,
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
        group: EtcdStore,
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
                let answer = forward_renewals(&group, req, request_timeout).await.map_err(RenewError::Consensus)?;
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

    /// Milliseconds left on `rec` as this member counts it (at most its TTL).
    pub fn remaining_ms(&self, rec: &LeaseRecord) -> i64 {
        self.state().remaining_ms(rec).min(rec.ttl_s.saturating_mul(1000))
    }

    /// Whether this member leads and has taken over as the lessor's leader in
    /// the current term.
    fn in_charge(&self, st: &State) -> bool {
        self.group.is_leader() && st.led_term == Some(self.group.current_term())
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
        match self.renew_as_leader(vec![id]).await {
            Err(RenewError::Consensus(ConsensusError::NotLeader)) => self.forwarder.renew(id).await,
            Err(e) => Err(e),
            Ok(mut each) => each.pop().unwrap_or(Ok(0)),
        }
    }

    /// Renews `ids` on the leader: in memory where allowed (see the module doc),
    /// through the log otherwise. Answers each lease's outcome, in order;
    /// `NotLeader` for all of them until this member has taken over.
    async fn renew_as_leader(&self, ids: Vec<i64>) -> Result<renewer::Renewals, RenewError> {
        // Checked before the lock too: a follower's keep-alives pass by here.
        if !self.group.is_leader() {
            return Err(RenewError::Consensus(ConsensusError::NotLeader));
        }
        let now = Instant::now();
        let mut each: renewer::Renewals = vec![Ok(0); ids.len()];
        let mut to_log = Vec::new();
        let epoch = {
            let mut st = self.state();
            if !self.in_charge(&st) {
                return Err(RenewError::Consensus(ConsensusError::NotLeader));
            }
            let State { tracked, logged_at, epoch, .. } = &mut *st;
            for (i, id) in ids.iter().enumerate() {
                let recent = logged_at.get(id).is_some_and(|at| now.duration_since(*at) <= RENEWAL_GRACE);
                match tracked.get_mut(id) {
                    // Expired by the leader's count: its revoke is coming (etcd
                    // answers "lease not found" too).
                    Some(t) if t.deadline <= now => {}
                    Some(t) if recent => {
                        // Never shortened: a new leader's grace may reach further.
                        t.deadline = t.deadline.max(now + Duration::from_secs(t.ttl_s.max(0) as u64));
                        each[i] = Ok(t.ttl_s);
                    }
                    _ => to_log.push(i),
                }
            }
            *epoch
        };
        if to_log.is_empty() {
            return Ok(each);
        }
        let logged = futures::future::join_all(to_log.iter().map(|&i| self.logger.renew(ids[i]))).await;
        let mut st = self.state();
        for (i, r) in to_log.into_iter().zip(logged) {
            each[i] = r.clone();
            let Ok(ttl_s) = r else { continue };
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
        Ok(each)
    }

    fn observe(&self, records: &[LeaseRecord]) {
        let now = Instant::now();
        let mut st = self.state();
        let live: std::collections::HashSet<i64> = records.iter().map(|r| r.id).collect();
        st.tracked.retain(|id, _| live.contains(id));
        st.logged_at.retain(|id, _| live.contains(id));
        for r in records {
            let known = st.tracked.get(&r.id);
            if known.is_some_and(|t| t.version == r.version) {
                continue;
            }
            let mut deadline = now + Duration::from_millis(r.remaining_ms.max(0) as u64);
            if r.renewed {
                // A logged keep-alive never cuts short a deadline a take-over's
                // grace (or an in-memory renewal) set.
                deadline = known.map_or(deadline, |t| t.deadline.max(deadline));
            } else {
                // A grant or checkpoint base: in-memory renewals need a fresh
                // logged one (a re-grant under the same id starts anew).
                st.logged_at.remove(&r.id);
            }
            let t = Tracked { version: r.version, deadline, ttl_s: r.ttl_s, renewed: r.renewed };
            st.tracked.insert(r.id, t);
        }
    }

    /// On becoming leader in `term`: first applies everything committed (so that
    /// every logged keep-alive of earlier leaders is counted), then gives each
    /// lease whose base is a logged keep-alive [`RENEWAL_GRACE`] (an earlier leader
    /// may have renewed it in memory since). Until this is done, keep-alives on
    /// this member wait (`NotLeader`, retried).
    async fn take_over(&self, term: u64) -> bool {
        if let Err(e) = self.group.read_barrier(TAKE_OVER_TIMEOUT).await {
            tracing::debug!("lessor take-over in term {term} not done yet: {e}");
            return false;
        }
        let Some(records) = self.records() else { return false };
        self.observe(&records);
        let mut st = self.state();
        st.forget_logged();
        for t in st.tracked.values_mut().filter(|t| t.renewed) {
            t.deadline += RENEWAL_GRACE;
        }
        st.led_term = Some(term);
        true
    }

    fn records(&self) -> Option<Vec<LeaseRecord>> {
        ReadView::open(&self.group.backend, &self.group.index).ok()?.leases().ok()
    }

    /// Runs until the process stops.
    pub async fn run(self: Arc<Self>) {
        // `None`: a checkpoint is due (a new leader persists its count at once).
        let mut last_checkpoint: Option<Instant> = Some(Instant::now());
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let term = self.group.current_term();
            let led_term = self.state().led_term;
            if !self.group.is_leader() {
                if led_term.is_some() {
                    let mut st = self.state();
                    st.led_term = None;
                    st.forget_logged();
                }
            } else if led_term != Some(term) {
                if !self.take_over(term).await {
                    continue;
                }
                last_checkpoint = None;
            }
            let Some(records) = self.records() else { continue };
            self.observe(&records);
            if !self.in_charge(&self.state()) {
                continue;
            }
            let now = Instant::now();
            let expired: Vec<(i64, u64)> = {
                let st = self.state();
                let mut revoking = self.revoking.lock().expect("lessor map poisoned");
                revoking.retain(|id, _| st.tracked.contains_key(id));
                st.tracked
                    .iter()
                    .filter(|(id, t)| {
                        t.deadline <= now
                            && revoking.get(*id).is_none_or(|at| now.duration_since(*at) > Duration::from_secs(2))
                    })
                    .map(|(id, t)| (*id, t.version))
                    .collect()
            };
            for (id, version) in expired {
                self.revoking.lock().expect("lessor map poisoned").insert(id, now);
                let group = self.group.clone();
                tokio::spawn(async move {
                    // Conditional on the version counted down: a keep-alive
                    // committed first re-based the lease and wins.
                    let expire = Command::LeaseExpire { id, version };
                    if let Err(e) = group.propose(expire, Duration::from_secs(5)).await {
                        tracing::debug!("revoke of expired lease {id:x} not done: {e}");
                    }
                });
            }
            let due = last_checkpoint.is_none_or(|at| now.duration_since(at) >= CHECKPOINT_INTERVAL);
            if due && !records.is_empty() {
                last_checkpoint = Some(now);
                // Counted and cleared together: a renewal after this count must be
                // logged, as the checkpoint replaces the renewed base. A lease
                // counted beyond its TTL (a take-over's grace) keeps its renewed
                // base until it is back within it: a checkpoint would clamp it.
                let items: Vec<(i64, u64, i64)> = {
                    let mut st = self.state();
                    st.forget_logged();
                    records
                        .iter()
                        .filter_map(|r| {
                            let ms = st.remaining_ms(r);
                            (ms <= r.ttl_s.saturating_mul(1000)).then_some((r.id, r.version, ms))
                        })
                        .collect()
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
        if !self.in_charge(&self.state()) {
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
            LeaderCall::Remaining(id) => LeaderAnswer::Remaining(self.state().count_of(id)),
        };
        encode(&answer)
    }
}

/// Sends a follower's batch of keep-alives to the leader. A batch whose answer was
/// lost (the leader failed or stepped down with it in flight) is sent again until
/// `timeout`: renewing a lease twice is harmless, and the client's keep-alive
/// stream then survives a leader change instead of ending with a timeout.
async fn forward_renewals(group: &EtcdStore, req: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, ConsensusError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match group.call_leader(req.clone(), left).await {
            Err(ConsensusError::Timeout | ConsensusError::LeaderLost) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(FORWARD_RETRY_PAUSE).await;
            }
            other => return other,
        }
    }
}

/// Proposes one batch of keep-alives as a single log entry.
async fn log_renewals(group: &EtcdStore, ids: Vec<i64>, timeout: Duration) -> Result<renewer::Renewals, RenewError> {
    match group.propose(Command::LeaseRenewBatch(ids), timeout).await {
        Ok(CommandResult::Ok(bytes)) => LeaseRenewals::decode(bytes.as_slice())
            .map(|r| r.ttl_s.into_iter().map(Ok).collect())
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
