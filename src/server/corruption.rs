//! Cross-member corruption check (etcd's `--experimental-corrupt-check-time`,
//! on by default here).
//!
//! Every interval the leader computes HashKV at its current revision and asks each
//! other member for HashKV at the same revision (a member first applies up to it).
//! Members that report the same compact revision must report the same hash; a
//! member whose hash differs from the one a strict majority agrees on has diverged
//! (disk corruption that slipped past the checksums, or a bug) and gets a CORRUPT
//! alarm through Raft. A member named in a CORRUPT alarm
//! refuses to serve reads from its state ("etcdserver: corrupt cluster") until the
//! alarm is disarmed; the others keep serving. (etcd stops the whole cluster
//! instead; here the majority that agrees stays available.)

use std::sync::Arc;
use std::time::Duration;

use super::Node;
use crate::etcd_store::state_machine::ALARM_CORRUPT;
use crate::etcd_store::Command;

/// How long the leader waits for one member's HashKV answer.
const PEER_HASH_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the periodic check for the member's lifetime; acts only while leading.
pub async fn run(node: Arc<Node>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if node.group.is_leader() {
            check_once(&node).await;
        }
    }
}

async fn check_once(node: &Node) {
    let (rev, mine) = {
        let Ok(view) = node.read_view(true).await else { return };
        let rev = view.current_rev();
        match view.hash_kv(rev) {
            Ok(h) => (rev, h),
            Err(e) => {
                tracing::warn!("corruption check: local HashKV at {rev} failed: {e}");
                return;
            }
        }
    };
    let others: Vec<u64> = node.group.raft_members().nodes.into_keys().filter(|id| *id != node.member_id).collect();
    let mut answers = vec![(node.member_id, mine.0)];
    for id in others {
        match node.group.peer_hash_kv_at(id, rev, PEER_HASH_TIMEOUT).await {
            Ok((hash, compact)) if compact == mine.1 => answers.push((id, hash)),
            Ok(_) => tracing::debug!(member = %format!("{id:x}"), "corruption check skipped: compacted differently"),
            // Unreachable or behind: nothing to compare this round.
            Err(e) => tracing::debug!(member = %format!("{id:x}"), "corruption check skipped: {e}"),
        }
    }
    for id in diverged(&answers) {
        tracing::error!(member = %format!("{id:x}"), revision = rev, "corruption check: member's HashKV differs from the majority's; raising CORRUPT");
        let alarm = Command::Alarm { activate: true, member: id, alarm: ALARM_CORRUPT };
        if let Err(e) = node.group.propose(alarm, node.config.request_timeout()).await {
            tracing::warn!("raising CORRUPT failed: {e}");
        }
    }
}

/// Members whose hash differs from the one a strict majority of `answers`
/// agrees on (the leader included: a corrupt leader is found the same way). With
/// no majority, nobody can be blamed and nothing is returned.
fn diverged(answers: &[(u64, u32)]) -> Vec<u64> {
    let majority =
        answers.iter().map(|(_, h)| *h).find(|h| answers.iter().filter(|(_, x)| x == h).count() * 2 > answers.len());
    match majority {
        Some(good) => answers.iter().filter(|(_, h)| *h != good).map(|(id, _)| *id).collect(),
        None => {
            if answers.windows(2).any(|w| w[0].1 != w[1].1) {
                tracing::error!(?answers, "corruption check: members disagree and no majority agrees");
            }
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::diverged;

    #[test]
    fn the_minority_is_blamed_never_without_a_majority() {
        assert_eq!(diverged(&[(1, 7), (2, 7), (3, 7)]), Vec::<u64>::new());
        assert_eq!(diverged(&[(1, 7), (2, 9), (3, 7)]), vec![2]);
        assert_eq!(diverged(&[(1, 9), (2, 7), (3, 7)]), vec![1], "a corrupt leader is blamed");
        assert_eq!(diverged(&[(1, 7), (2, 9)]), Vec::<u64>::new(), "no majority in a pair");
    }
}
