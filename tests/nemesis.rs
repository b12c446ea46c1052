//! Jepsen-style fault tests: members in their own network namespaces, a seeded
//! nemesis (partitions, one-way blocks, packet loss, SIGSTOP pauses, kill -9 and
//! restart, members removed and added back empty) and client histories checked
//! for linearizability.
//!
//! Every test prints its seed (`CONCORD_TEST_SEED` replays the nemesis schedule
//! and the clients' choices) and a count line: runs, operations, faults,
//! violations. `CONCORD_NEMESIS_SECS` lengthens the mixed run (the soak script
//! uses it). Needs root, `ip` and `iptables` (scripts/test installs them).

use std::path::Path;
use std::time::{Duration, Instant};

use concord_testkit::linearizability::{check, check_revisions, Outcome};
use concord_testkit::nemesis::{self, Options};
use concord_testkit::workload::{
    check_fencing, check_watches, locks, register, seed_from_env, RegisterConfig, Watchers,
};
use concord_testkit::{netns, ClusterOptions, ProcessCluster};

/// Snapshots every 1000 entries keeping 200 behind them, so that snapshots, log
/// purges and snapshot installs on restarted members happen many times in a run
/// (openraft's purge-vs-apply race, upstream issue #2116, lives there).
const SNAPSHOT_ARGS: [&str; 4] = ["--snapshot-count", "1000", "--experimental-snapshot-catchup-entries", "200"];

fn namespaced_cluster(n: usize) -> ProcessCluster {
    if let Some(why) = netns::unavailable() {
        panic!("fault tests need network namespaces: {why}");
    }
    let extra_args = SNAPSHOT_ARGS.map(String::from).to_vec();
    let options = ClusterOptions { netns: true, extra_args, ..ClusterOptions::default() };
    ProcessCluster::start(Path::new(env!("CARGO_BIN_EXE_concord")), n, options)
}

fn nemesis_secs() -> u64 {
    std::env::var("CONCORD_NEMESIS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(100)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_workload_under_mixed_nemesis_is_linearizable() {
    let seed = seed_from_env();
    println!("seed {seed} (CONCORD_TEST_SEED={seed} replays the nemesis schedule and client choices)");
    let mut cluster = namespaced_cluster(3);
    cluster.wait_leader(Duration::from_secs(30)).await;
    let duration = Duration::from_secs(nemesis_secs());
    let epoch = Instant::now();
    let config = RegisterConfig { clients: 6, duration, ..RegisterConfig::default() };
    // One watcher per member on the workload's keys, resuming through every fault.
    let watchers = Watchers::start(&cluster.endpoints(), "reg/", 1);
    let workload = tokio::spawn(register(cluster.endpoints(), config, seed, epoch));
    let options = Options { membership: true };
    let report = nemesis::run(&mut cluster, seed, duration, epoch, &options).await;
    let history = workload.await.expect("workload task");
    assert_no_crash(&mut cluster, seed);
    // After the last fault is undone the cluster must recover.
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let final_revision = {
        let mut c = cluster.client(leader).await;
        let r = c.get("reg/", None).await.expect("read the final revision");
        r.header().expect("response header").revision() as u64
    };
    let watch_check = match watchers.finish(final_revision, Duration::from_secs(30)).await {
        Ok(streams) => check_watches(&streams).and_then(|()| watched_all_writes(&streams[0], &history, final_revision)),
        Err(stuck) => Err(stuck),
    };
    let unknown = history.iter().filter(|e| e.outcome == Outcome::Unknown).count();
    let register_check = check(&history);
    let revision_check = check_revisions(&history);
    let violations =
        usize::from(register_check.is_err()) + usize::from(revision_check.is_err()) + usize::from(watch_check.is_err());
    println!(
        "nemesis: runs 1, operations {} ({unknown} indeterminate), faults {}, watchers 3 up to revision {final_revision}, violations {violations}",
        history.len(),
        report.faults.len()
    );
    assert!(report.faults.len() >= 5, "the nemesis injected too few faults: {:?}", report.faults);
    assert!(history.len() > 500, "the workload made too little progress: {} operations", history.len());
    if let Err(v) = register_check {
        cluster.dump_logs();
        panic!("seed {seed}: {v}");
    }
    if let Err(v) = revision_check {
        cluster.dump_logs();
        panic!("seed {seed}: {v}");
    }
    if let Err(v) = watch_check {
        cluster.dump_logs();
        panic!("seed {seed}: watch: {v}");
    }
}

/// No member may have died on its own (a panic, a fatal Raft error): the
/// nemesis restarts only what it killed.
fn assert_no_crash(cluster: &mut ProcessCluster, seed: u64) {
    let crashed = cluster.crashed();
    if !crashed.is_empty() {
        cluster.dump_logs();
        panic!("seed {seed}: members exited by themselves: {crashed:?}");
    }
}

/// The watched events are gap-free (every revision from 2 to the last, since the
/// workload is the only writer) and include every acknowledged write at its
/// revision with its value.
fn watched_all_writes(
    events: &[concord_testkit::workload::WatchedEvent],
    history: &[concord_testkit::linearizability::Event],
    final_revision: u64,
) -> Result<(), String> {
    use concord_testkit::linearizability::Op;
    let revs: Vec<u64> = events.iter().map(|e| e.0).collect();
    if revs != (2..=final_revision).collect::<Vec<_>>() {
        let missing = (2..=final_revision).find(|r| !revs.contains(r));
        return Err(format!("events are not gap-free up to {final_revision}: first missing revision {missing:?}"));
    }
    for e in history {
        let value = match (e.op, e.outcome) {
            (Op::Write(v), Outcome::Written) | (Op::Cas { new: v, .. }, Outcome::Swapped(true)) => v,
            _ => continue,
        };
        let seen = events.get((e.revision as usize).wrapping_sub(2));
        if seen != Some(&(e.revision, e.key.clone(), Some(value.to_string()))) {
            return Err(format!("acknowledged write {e:?} is not the watched event at its revision: {seen:?}"));
        }
    }
    Ok(())
}

/// Lock clients on every member under the nemesis: the fenced writes they make
/// while holding the lock must never interleave between holders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_holders_are_mutually_exclusive_under_nemesis() {
    let seed = seed_from_env();
    println!("seed {seed} (CONCORD_TEST_SEED={seed} replays the nemesis schedule)");
    let mut cluster = namespaced_cluster(3);
    cluster.wait_leader(Duration::from_secs(30)).await;
    let duration = Duration::from_secs(40);
    let epoch = Instant::now();
    let workload = tokio::spawn(locks(cluster.endpoints(), 6, "lock/res", duration));
    let report = nemesis::run(&mut cluster, seed, duration, epoch, &Options::default()).await;
    let run = workload.await.expect("lock workload");
    assert_no_crash(&mut cluster, seed);
    let verdict = check_fencing(&run.writes);
    println!(
        "locks: runs 1, acquisitions {}, fenced writes {}, fenced off {}, faults {}, violations {}",
        run.acquired,
        run.writes.len(),
        run.fenced_off,
        report.faults.len(),
        usize::from(verdict.is_err())
    );
    assert!(run.acquired >= 20, "too few lock acquisitions: {}", run.acquired);
    if let Err(v) = verdict {
        cluster.dump_logs();
        panic!("seed {seed}: {v}");
    }
}

/// The negative control: serializable reads are served from a member's local
/// state, so on a member cut off from the majority they go stale while the
/// majority moves on. The checker must report that history as not linearizable;
/// if it did not, its passing verdicts elsewhere would mean nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_reads_under_partition_are_caught_by_the_checker() {
    let seed = seed_from_env();
    println!("seed {seed}");
    let cluster = namespaced_cluster(3);
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let isolated = (leader + 1) % 3;
    let epoch = Instant::now();
    let config = RegisterConfig {
        clients: 6,
        serializable_reads: true,
        duration: Duration::from_secs(14),
        ..RegisterConfig::default()
    };
    let workload = tokio::spawn(register(cluster.endpoints(), config, seed, epoch));
    let net = cluster.network.as_ref().expect("namespaced cluster");
    let mut faults = 0;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        net.partition(&[vec![isolated], (0..3).filter(|&i| i != isolated).collect()]).expect("partition");
        faults += 1;
        tokio::time::sleep(Duration::from_secs(4)).await;
        net.heal().expect("heal");
    }
    let history = workload.await.expect("workload task");
    let register_check = check(&history);
    let revision_check = check_revisions(&history);
    println!(
        "negative control: runs 1, operations {}, faults {faults}, violations found: register {}, revision order {}",
        history.len(),
        register_check.is_err(),
        revision_check.is_err()
    );
    match register_check {
        Err(v) => println!("as expected, {v}"),
        Ok(()) => panic!("seed {seed}: stale serializable reads on an isolated member were not detected"),
    }
    assert!(revision_check.is_err(), "seed {seed}: stale revisions were not detected");
}

/// PreVote: a member cut off from the others cannot win an election, so it does
/// not raise its term while alone, and when the partition heals it rejoins
/// without deposing the leader (no term inflation, no needless election).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healed_minority_rejoins_without_an_election() {
    let cluster = namespaced_cluster(5);
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let (_, term_before, _) = cluster.status(leader).await.expect("leader status");
    let minority = vec![(leader + 1) % 5, (leader + 2) % 5];
    let majority: Vec<usize> = (0..5).filter(|i| !minority.contains(i)).collect();
    let net = cluster.network.as_ref().expect("namespaced cluster");
    net.partition(&[minority.clone(), majority]).expect("partition");
    // Ten election timeouts alone: without PreVote each would start an election.
    let mut client = cluster.client(leader).await;
    for i in 0..10 {
        client.put(format!("during/{i}"), "x", None).await.expect("the majority keeps serving");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for &m in &minority {
        let (_, term, _) = cluster.status(m).await.expect("isolated member answers status");
        assert_eq!(term, term_before, "isolated member {m} raised its term while alone");
        // The partition is real: the isolated member has none of the majority's writes.
        let mut c = cluster.client(m).await;
        let r = c.get("during/0", Some(etcd_client::GetOptions::new().with_serializable())).await.expect("local read");
        assert!(r.kvs().is_empty(), "isolated member {m} saw a write made during the partition");
    }
    let net = cluster.network.as_ref().expect("namespaced cluster");
    net.heal().expect("heal");
    // The minority catches up with the majority's writes under the same leader.
    let caught_up = concord_testkit::eventually(Duration::from_secs(15), || async {
        for &m in &minority {
            let mut c = cluster.client(m).await;
            let r = c.get("during/9", Some(etcd_client::GetOptions::new().with_serializable())).await.ok()?;
            r.kvs().first()?;
        }
        Some(())
    })
    .await;
    assert!(caught_up.is_some(), "the healed minority did not catch up");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..5 {
        let (_, term, _) = cluster.status(i).await.expect("status after heal");
        assert_eq!(term, term_before, "member {i}: term changed by the heal");
    }
    assert_eq!(cluster.leader_index().await, Some(leader), "the members do not all follow the old leader");
    println!("no term inflation: runs 1, faults 1 (2 of 5 isolated for 5 s), term {term_before} before and after");
}

/// A leader cut off from its peers (clients can still reach it) keeps answering
/// keep-alives from memory for a while: the leader the others elect meanwhile
/// must not revoke the lease before the TTL those answers promised has run out,
/// not even through its first checkpoint; and it must revoke it after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_answered_by_a_cut_off_leader_are_honoured_by_the_next() {
    const TTL_S: i64 = 6;
    let cluster = namespaced_cluster(3);
    let old = cluster.wait_leader(Duration::from_secs(30)).await;
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let mut c = cluster.client(old).await;
    let lease = c.lease_grant(TTL_S, None).await.expect("grant").id();
    let leased = etcd_client::PutOptions::new().with_lease(lease);
    c.put("held", "v", Some(leased)).await.expect("put with the lease");
    // The first keep-alive is logged; the next ones are answered from memory.
    let (mut keeper, mut stream) = c.lease_keep_alive(lease).await.expect("keep-alive stream");
    let mut last_answered = Instant::now();
    let mut from_memory = 0;
    let net = cluster.network.as_ref().expect("namespaced cluster");
    net.partition(&[vec![old], others.clone()]).expect("partition");
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let answered = async {
            keeper.keep_alive().await.ok()?;
            stream.message().await.ok()?
        };
        match tokio::time::timeout(Duration::from_secs(1), answered).await {
            Ok(Some(r)) if r.ttl() == TTL_S => {
                last_answered = Instant::now();
                from_memory += 1;
            }
            _ => break,
        }
    }
    drop((keeper, stream));
    let mut s = cluster.client(others[0]).await;
    let promised = last_answered + Duration::from_secs(TTL_S as u64);
    tokio::time::sleep_until((promised - Duration::from_secs(1)).into()).await;
    let held = s.get("held", None).await.expect("read through the majority").kvs().len();
    assert_eq!(held, 1, "the new leader revoked a lease before the TTL the cut-off leader promised ran out");
    let gone = concord_testkit::eventually(Duration::from_secs(15), || {
        let mut s = s.clone();
        async move { s.get("held", None).await.ok().filter(|r| r.kvs().is_empty()).map(|_| ()) }
    })
    .await;
    net.heal().expect("heal");
    assert!(gone.is_some(), "the lease outlived its TTL plus the grace period");
    println!(
        "cut-off leader: runs 1, faults 1 (leader isolated), {from_memory} keep-alives answered by it while cut off, lease held until the promised deadline, then revoked"
    );
}
