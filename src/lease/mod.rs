//! The lessor: when leases expire, and who acts on it.
//!
//! Contract:
//! - Every member counts every lease down. A member starts (or re-starts) counting
//!   from the replicated `remaining_ms` the moment it observes a new record version
//!   (grant, keep-alive, checkpoint). Because followers count too, a new leader
//!   already knows how much TTL is left: leases survive leader changes with their
//!   remaining TTL, not reset to the full TTL as etcd does.
//! - Only the leader acts: it proposes a revoke for each expired lease, and every
//!   [`CHECKPOINT_INTERVAL`] it proposes a checkpoint of all remaining TTLs so that a
//!   member that restarts resumes from a recent value.
//! - Expiry is a replicated revoke like a client's, so all members delete the
//!   attached keys at the same revision.

pub mod renewer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::consensus::{Command, Group, MemberId};
use crate::mvcc::lease::LeaseRecord;
use crate::mvcc::ReadView;

/// How often the lessor re-reads lease records and checks expiry. Bounds how late a
/// lease can be revoked past its deadline (plus one commit).
pub const TICK: Duration = Duration::from_millis(100);
/// How often the leader persists remaining TTLs.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// etcd's `MaxLeaseTTL`: 9,000,000,000 seconds.
pub const MAX_LEASE_TTL_S: i64 = 9_000_000_000;

struct Tracked {
    version: u64,
    deadline: Instant,
}

pub struct Lessor {
    group: Group,
    min_ttl_s: i64,
    tracked: Mutex<HashMap<i64, Tracked>>,
    /// Leases whose revoke this member proposed, and when (retried after a while).
    revoking: Mutex<HashMap<i64, Instant>>,
    id_prefix: u64,
    id_counter: AtomicU64,
    /// Batches this member's keep-alives into log entries.
    pub renewer: renewer::Renewer,
}

impl Lessor {
    /// `election_timeout_ms` sets etcd's minimum TTL: 1.5 election timeouts, in whole
    /// seconds rounded up.
    /// `request_timeout` bounds each batch of keep-alives (see [`renewer`]).
    pub fn new(group: Group, member_id: MemberId, election_timeout_ms: u64, request_timeout: Duration) -> Arc<Lessor> {
        let min_ttl_s = (3 * election_timeout_ms).div_ceil(2000).max(1) as i64;
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Arc::new(Lessor {
            renewer: renewer::Renewer::start(group.clone(), request_timeout),
            group,
            min_ttl_s,
            tracked: Mutex::default(),
            revoking: Mutex::default(),
            // etcd's id generator: member id in the top 16 bits, then a millisecond
            // timestamp and a counter, so ids from different members never collide.
            id_prefix: (member_id & 0xffff) << 48,
            id_counter: AtomicU64::new((now_ms & 0xff_ffff_ffff) << 8),
        })
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

    /// Milliseconds left on `rec` as this member counts it.
    pub fn remaining_ms(&self, rec: &LeaseRecord) -> i64 {
        let tracked = self.tracked.lock().expect("lessor map poisoned");
        match tracked.get(&rec.id) {
            Some(t) if t.version == rec.version => {
                t.deadline.saturating_duration_since(Instant::now()).as_millis() as i64
            }
            _ => rec.remaining_ms,
        }
    }

    /// True once this member's countdown for `rec` has run out.
    pub fn is_expired(&self, rec: &LeaseRecord) -> bool {
        self.remaining_ms(rec) <= 0
    }

    fn observe(&self, records: &[LeaseRecord]) {
        let now = Instant::now();
        let mut tracked = self.tracked.lock().expect("lessor map poisoned");
        let live: std::collections::HashSet<i64> = records.iter().map(|r| r.id).collect();
        tracked.retain(|id, _| live.contains(id));
        for r in records {
            let fresh = tracked.get(&r.id).is_none_or(|t| t.version != r.version);
            if fresh {
                let deadline = now + Duration::from_millis(r.remaining_ms.max(0) as u64);
                tracked.insert(r.id, Tracked { version: r.version, deadline });
            }
        }
    }

    fn records(&self) -> Option<Vec<LeaseRecord>> {
        ReadView::open(&self.group.backend, &self.group.index).ok()?.leases().ok()
    }

    /// Runs until the process stops.
    pub async fn run(self: Arc<Self>) {
        let mut last_checkpoint = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            let Some(records) = self.records() else { continue };
            self.observe(&records);
            if !self.group.raft.is_leader() {
                continue;
            }
            let now = Instant::now();
            let expired: Vec<i64> = {
                let tracked = self.tracked.lock().expect("lessor map poisoned");
                let mut revoking = self.revoking.lock().expect("lessor map poisoned");
                revoking.retain(|id, _| tracked.contains_key(id));
                tracked
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
                let items: Vec<(i64, u64, i64)> =
                    records.iter().map(|r| (r.id, r.version, self.remaining_ms(r))).collect();
                let group = self.group.clone();
                tokio::spawn(async move {
                    if let Err(e) = group.propose(Command::LeaseCheckpoint(items), Duration::from_secs(5)).await {
                        tracing::debug!("lease checkpoint not done: {e}");
                    }
                });
            }
        }
    }
}
