//! Durability: kill -9 every member at random instants while clients write; after
//! restart every acknowledged write must be present with its value, and no key
//! may hold a value that was never written.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use concord_testkit::etcd_client::GetOptions;
use concord_testkit::{ClusterOptions, ProcessCluster};

const ROUNDS: usize = 5;
const WRITERS: usize = 6;

/// A small xorshift generator; the seed is printed so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_all_members_mid_write_loses_no_acknowledged_write() {
    let seed = std::env::var("CONCORD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
    println!("durability seed: {seed} (set CONCORD_TEST_SEED to replay)");
    let mut rng = Rng(seed);
    let mut cluster =
        ProcessCluster::start(&PathBuf::from(env!("CARGO_BIN_EXE_concord")), 3, ClusterOptions::default());
    // key -> value of every acknowledged put, across all rounds.
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let mut attempted_total = 0u64;
    for round in 0..ROUNDS {
        cluster.wait_leader(Duration::from_secs(30)).await;
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let mut client = cluster.client(w % 3).await;
            let acked = acked.clone();
            writers.push(tokio::spawn(async move {
                let mut attempted = 0u64;
                for i in 0u64.. {
                    let key = format!("r{round}/w{w}/{i:06}");
                    let value = format!("{seed}-{round}-{w}-{i}");
                    attempted += 1;
                    match client.put(key.as_str(), value.as_str(), None).await {
                        Ok(_) => {
                            acked.lock().unwrap().insert(key, value);
                        }
                        // The cluster is being killed: unacknowledged is fine, stop.
                        Err(_) => break,
                    }
                }
                attempted
            }));
        }
        tokio::time::sleep(Duration::from_millis(700 + rng.next() % 1500)).await;
        for i in 0..3 {
            tokio::time::sleep(Duration::from_millis(rng.next() % 40)).await;
            cluster.kill(i);
        }
        for w in writers {
            attempted_total += w.await.unwrap();
        }
        for i in 0..3 {
            cluster.restart(i);
        }
    }
    cluster.wait_leader(Duration::from_secs(30)).await;
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "the load should have acknowledged a meaningful number of writes");
    let mut missing = Vec::new();
    for i in 0..3 {
        let mut c = cluster.client(i).await;
        let resp = c.get("r", Some(GetOptions::new().with_prefix())).await.expect("read back");
        let stored: BTreeMap<String, String> = resp
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap().to_string(), kv.value_str().unwrap().to_string()))
            .collect();
        for (k, v) in &acked {
            if stored.get(k) != Some(v) {
                missing.push(format!("member {i}: {k} = {:?}, acknowledged {v:?}", stored.get(k)));
            }
        }
        for (k, v) in &stored {
            // Unacknowledged writes may survive, but only with the value written.
            let parts: Vec<&str> = k.split('/').collect();
            let expect = format!(
                "{seed}-{}-{}-{}",
                &parts[0][1..],
                &parts[1][1..],
                parts[2].trim_start_matches('0').parse::<u64>().unwrap_or(0)
            );
            assert_eq!(v, &expect, "member {i}: {k} holds a value never written");
        }
    }
    println!(
        "durability: {ROUNDS} kill-all rounds, {attempted_total} puts attempted, {} acknowledged, {} missing",
        acked.len(),
        missing.len()
    );
    if !missing.is_empty() {
        cluster.dump_logs();
        panic!("acknowledged writes lost (seed {seed}):\n{}", missing.join("\n"));
    }
}

/// A member whose log fsync fails (EIO) must stop rather than go on
/// acknowledging: it cannot know what reached the disk. The others keep serving,
/// and once the disk is healthy again the member restarts and catches up with
/// every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_failure_stops_the_member() {
    use concord_testkit::faults::{eio_shim, EIO_TRIGGER_ENV};
    let mut cluster =
        ProcessCluster::prepare(&PathBuf::from(env!("CARGO_BIN_EXE_concord")), 3, ClusterOptions::default());
    let shim = eio_shim(cluster.dir()).expect("build the EIO shim (needs cc)");
    let trigger = cluster.dir().join("fail-fsync-now");
    cluster.set_env(2, "LD_PRELOAD", &shim.display().to_string());
    cluster.set_env(2, EIO_TRIGGER_ENV, &trigger.display().to_string());
    for i in 0..3 {
        cluster.restart(i);
    }
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let writer = if leader == 2 { 0 } else { leader };
    let mut client = cluster.client(writer).await;
    client.put("before", "1", None).await.expect("put before the fault");
    std::fs::write(&trigger, b"").expect("arm the shim");
    // Writes replicate to member 2, whose log append now cannot be made durable.
    let mut acked = Vec::new();
    for i in 0..20 {
        if client.put(format!("after/{i}"), "v", None).await.is_ok() {
            acked.push(format!("after/{i}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = cluster.wait_exit(2, Duration::from_secs(20));
    let log = cluster.log_text(2);
    assert!(
        status.is_some_and(|s| !s.success()),
        "member 2 kept running after fsync failed (status {status:?}); log:\n{log}"
    );
    assert!(log.contains("fsync failed"), "member 2's log does not say why it stopped:\n{log}");
    // The two healthy members are a majority and keep serving.
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let mut client = cluster.client(leader).await;
    client.put("while-down", "1", None).await.expect("the majority serves without member 2");
    acked.push("while-down".into());
    std::fs::remove_file(&trigger).expect("disarm the shim");
    cluster.restart(2);
    let mut c2 = cluster.client(2).await;
    let caught_up = concord_testkit::eventually(Duration::from_secs(20), || {
        let mut c2 = c2.clone();
        async move { c2.get("while-down", None).await.ok()?.kvs().first().map(|_| ()) }
    })
    .await;
    assert!(caught_up.is_some(), "member 2 did not catch up after the disk recovered");
    for k in &acked {
        let r = c2.get(k.as_str(), None).await.expect("read on member 2");
        assert_eq!(r.kvs().len(), 1, "member 2 lacks acknowledged key {k}");
    }
    println!(
        "fsync EIO: member 2 stopped with {status:?}; {} acknowledged writes all present after restart",
        acked.len()
    );
}
