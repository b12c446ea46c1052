//! Register workload under leader crashes, checked for linearizability.
//!
//! Clients spread over every member read (linearizable), write and
//! compare-and-swap a few keys while the leader is killed and restarted. Every
//! operation is recorded with its invocation and completion times; operations
//! without an answer are indeterminate. The history must be linearizable
//! (`concord_testkit::linearizability`). The seed is printed; CONCORD_TEST_SEED
//! replays the client choices.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_testkit::linearizability::{check, Event, Op, Outcome};
use concord_testkit::{ClusterOptions, ProcessCluster};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use rand::{Rng, SeedableRng};

const CLIENTS: usize = 6;
const KEYS: u64 = 3;
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// A request refused at connect never reached a server, so it cannot have taken
/// effect: it is left out of the history instead of being indeterminate (each
/// indeterminate write multiplies the checker's search).
fn never_sent(e: &etcd_client::Error) -> bool {
    e.to_string().contains("Connection refused")
}

#[tokio::test(flavor = "multi_thread")]
async fn register_workload_across_leader_crash_is_linearizable() {
    let seed: u64 = std::env::var("CONCORD_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("seed {seed} (CONCORD_TEST_SEED={seed} replays the client choices)");
    let mut cluster = ProcessCluster::start(Path::new(env!("CARGO_BIN_EXE_concord")), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let start = Instant::now();
    let history: Arc<Mutex<Vec<Event>>> = Arc::default();
    let deadline = start + Duration::from_secs(8);
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut client = cluster.client(c % 3).await;
        let history = history.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(c as u64));
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while Instant::now() < deadline {
                seq += 1;
                let key = format!("reg{}", rng.random_range(0..KEYS));
                let value = (c as u64 + 1) * 1_000_000 + seq;
                let choice = rng.random_range(0..3);
                let invoked = start.elapsed().as_nanos() as u64;
                let (op, outcome) = match choice {
                    0 => {
                        let r = tokio::time::timeout(OP_TIMEOUT, client.get(key.as_str(), None)).await;
                        match r {
                            Ok(Ok(resp)) => {
                                let v = resp.kvs().first().map(|kv| kv.value_str().unwrap().parse::<u64>().unwrap());
                                (Op::Read, Outcome::Value(v))
                            }
                            // A read without an answer tells nothing: leave it out.
                            _ => continue,
                        }
                    }
                    1 => {
                        let r =
                            tokio::time::timeout(OP_TIMEOUT, client.put(key.as_str(), value.to_string(), None)).await;
                        match r {
                            Ok(Ok(_)) => (Op::Write(value), Outcome::Written),
                            Ok(Err(e)) if never_sent(&e) => continue,
                            _ => (Op::Write(value), Outcome::Unknown),
                        }
                    }
                    _ => {
                        let expect =
                            (rng.random_range(0..CLIENTS as u64) + 1) * 1_000_000 + rng.random_range(0..seq.max(1));
                        let txn = Txn::new()
                            .when([Compare::value(key.as_str(), CompareOp::Equal, expect.to_string())])
                            .and_then([TxnOp::put(key.as_str(), value.to_string(), None)]);
                        let r = tokio::time::timeout(OP_TIMEOUT, client.txn(txn)).await;
                        let outcome = match r {
                            Ok(Ok(resp)) => Outcome::Swapped(resp.succeeded()),
                            Ok(Err(e)) if never_sent(&e) => continue,
                            _ => Outcome::Unknown,
                        };
                        (Op::Cas { expect, new: value }, outcome)
                    }
                };
                let completed = start.elapsed().as_nanos() as u64;
                history.lock().unwrap().push(Event { client: c, key, op, outcome, invoked, completed });
                if outcome == Outcome::Unknown {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.kill(leader);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart(leader);
    for t in tasks {
        t.await.unwrap();
    }
    let history = history.lock().unwrap().clone();
    let unknown = history.iter().filter(|e| e.outcome == Outcome::Unknown).count();
    println!("history: {} operations ({unknown} indeterminate), 1 leader kill", history.len());
    assert!(history.len() > 100, "the workload made too little progress: {} operations", history.len());
    if let Err(v) = check(&history) {
        cluster.dump_logs();
        panic!("seed {seed}: {v}");
    }
}
