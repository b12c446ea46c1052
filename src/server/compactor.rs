//! Auto-compaction: etcd's `--auto-compaction-mode` / `--auto-compaction-retention`.
//!
//! Every member samples its revision (so a newly elected leader already has the
//! history it needs); only the leader proposes compactions, through Raft like a
//! client's `Compact`, so every member compacts at the same log position.
//! - `periodic`: keeps about `retention` of history. The revision is sampled every
//!   `retention / 10`; every `min(retention, 1h)` the leader compacts to the
//!   revision sampled `retention` ago (etcd 3.4's periodic compactor).
//! - `revision`: every [`REVISION_MODE_INTERVAL`] the leader compacts to
//!   `current revision - retention`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;

use super::config::AutoCompaction;
use super::Node;
use crate::etcd_store::Command;
use crate::proto::etcdserverpb::{CompactionRequest, CompactionResponse};

/// etcd's revision-mode check interval.
pub const REVISION_MODE_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Samples of the revision a periodic compactor keeps: one per tenth of the
/// retention, plus the current one.
const PERIODIC_SAMPLES: usize = 11;
/// Longest pause between periodic compactions (etcd: one hour).
const PERIODIC_MAX_COMPACT_INTERVAL: Duration = Duration::from_secs(3600);

/// Runs the compactor for the member's lifetime.
pub async fn run(node: Arc<Node>, policy: AutoCompaction) {
    match policy {
        AutoCompaction::Periodic(retention) => periodic(node, retention).await,
        AutoCompaction::Revision(keep) => loop {
            tokio::time::sleep(REVISION_MODE_INTERVAL).await;
            let current = *node.group.revision.borrow();
            if current > keep as i64 {
                compact(&node, current - keep as i64, "revision").await;
            }
        },
    }
}

async fn periodic(node: Arc<Node>, retention: Duration) {
    let sample_every = (retention / 10).max(Duration::from_millis(100));
    let compact_every = retention.min(PERIODIC_MAX_COMPACT_INTERVAL);
    let mut samples: VecDeque<i64> = VecDeque::with_capacity(PERIODIC_SAMPLES);
    let mut since_compaction = Duration::ZERO;
    let mut tick = tokio::time::interval(sample_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if samples.len() == PERIODIC_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(*node.group.revision.borrow());
        since_compaction += sample_every;
        // The oldest sample is `retention` old once the window is full.
        if samples.len() == PERIODIC_SAMPLES && since_compaction >= compact_every {
            since_compaction = Duration::ZERO;
            compact(&node, samples[0], "periodic").await;
        }
    }
}

/// Proposes a compaction to `rev` if this member leads and `rev` is new ground.
async fn compact(node: &Node, rev: i64, mode: &str) {
    if !node.group.is_leader() || rev <= 1 {
        return;
    }
    let compacted = node.read_view(true).await.map(|v| v.compacted_rev()).unwrap_or(0);
    if rev <= compacted {
        return;
    }
    tracing::info!(revision = rev, mode, "starting auto-compaction");
    let req = CompactionRequest { revision: rev, physical: false };
    match node.propose::<CompactionResponse>(Command::Compact(req.encode_to_vec())).await {
        Ok(_) => tracing::info!(revision = rev, "completed auto-compaction"),
        Err(e) => tracing::warn!(revision = rev, "auto-compaction failed: {}", e.message()),
    }
}
