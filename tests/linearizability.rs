//! Register workload under leader crashes, checked for linearizability.
//!
//! Clients spread over every member read (linearizable), write and
//! compare-and-swap a few keys (`concord_testkit::workload::register`) while the
//! leader is killed and restarted. The history must be linearizable per key and
//! in revision order (`concord_testkit::linearizability`). The seed is printed;
//! CONCORD_TEST_SEED replays the client choices. Network faults are in
//! `tests/nemesis.rs`; this test needs no root.

use std::path::Path;
use std::time::{Duration, Instant};

use concord_testkit::linearizability::{check, check_revisions, Outcome};
use concord_testkit::workload::{register, seed_from_env, RegisterConfig};
use concord_testkit::{ClusterOptions, ProcessCluster};

#[tokio::test(flavor = "multi_thread")]
async fn register_workload_across_leader_crash_is_linearizable() {
    let seed = seed_from_env();
    println!("seed {seed} (CONCORD_TEST_SEED={seed} replays the client choices)");
    let mut cluster = ProcessCluster::start(Path::new(env!("CARGO_BIN_EXE_concord")), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let epoch = Instant::now();
    let config = RegisterConfig { duration: Duration::from_secs(8), ..RegisterConfig::default() };
    let workload = tokio::spawn(register(cluster.endpoints(), config, seed, epoch));
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.kill(leader);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart(leader);
    let history = workload.await.expect("workload task");
    let unknown = history.iter().filter(|e| e.outcome == Outcome::Unknown).count();
    println!("history: {} operations ({unknown} indeterminate), 1 leader kill", history.len());
    assert!(history.len() > 100, "the workload made too little progress: {} operations", history.len());
    if let Err(v) = check(&history) {
        cluster.dump_logs();
        panic!("seed {seed}: {v}");
    }
    if let Err(v) = check_revisions(&history) {
        cluster.dump_logs();
        panic!("seed {seed}: {v}");
    }
}
