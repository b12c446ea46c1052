//! Process-level 3-member cluster tests: replication, follower forwarding, leader
//! failover, restart from disk, snapshot install on a lagging member.
//! Each test owns its processes and directories (torn down on drop, even on panic).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use concord_testkit::etcd_client::{Client, GetOptions, PutOptions};
use concord_testkit::{eventually, ClusterOptions, ProcessCluster};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

const LEADER_WAIT: Duration = Duration::from_secs(30);

async fn keys_with_prefix(c: &mut Client, prefix: &str, serializable: bool) -> Option<Vec<(String, String, i64)>> {
    let mut opts = GetOptions::new().with_prefix();
    if serializable {
        opts = opts.with_serializable();
    }
    let resp = c.get(prefix, Some(opts)).await.ok()?;
    Some(
        resp.kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap().to_string(), kv.value_str().unwrap().to_string(), kv.mod_revision()))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_and_follower_forwarding() {
    let cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(LEADER_WAIT).await;
    // Every member accepts writes: followers forward them to the leader.
    for i in 0..3 {
        let mut c = cluster.client(i).await;
        let r = c.put(format!("k{i}"), format!("v{i}"), None).await.expect("put via member");
        assert_eq!(r.header().unwrap().revision(), 2 + i as i64, "one revision per put, in order");
    }
    // Linearizable reads on every member (followers use ReadIndex) see all writes.
    for i in 0..3 {
        let mut c = cluster.client(i).await;
        let kvs = keys_with_prefix(&mut c, "k", false).await.expect("linearizable get");
        assert_eq!(
            kvs,
            vec![("k0".into(), "v0".into(), 2), ("k1".into(), "v1".into(), 3), ("k2".into(), "v2".into(), 4)],
            "member {i} (leader is {leader})"
        );
    }
    // A follower answers a forwarded write from its own apply: the same response
    // the leader would give, previous version included.
    let follower = (leader + 1) % 3;
    let mut c = cluster.client(follower).await;
    let r = c.put("k0", "v0b", Some(PutOptions::new().with_prev_key())).await.expect("put via a follower");
    assert_eq!(r.header().unwrap().revision(), 5);
    let prev = r.prev_key().expect("prev_kv asked for");
    assert_eq!((prev.key(), prev.value(), prev.mod_revision(), prev.version()), (&b"k0"[..], &b"v0"[..], 2, 1));
    // /health and /metrics answer on the client port beside gRPC.
    for m in &cluster.members {
        let (code, body) = concord_testkit::http_get(m.client_port, "/health").unwrap();
        assert_eq!((code, body.as_str()), (200, r#"{"health":"true"}"#));
        let (code, body) = concord_testkit::http_get(m.client_port, "/metrics").unwrap();
        assert_eq!(code, 200);
        assert!(body.contains("\netcd_server_has_leader 1\n"), "{body}");
        assert!(body.contains("\nprocess_resident_memory_bytes "), "{body}");
    }
    // The member list names every member with its client URL.
    let mut c = cluster.client(0).await;
    let list = c.member_list().await.unwrap();
    let mut names: Vec<String> = list.members().iter().map(|m| m.name().to_string()).collect();
    names.sort();
    assert_eq!(names, vec!["m0", "m1", "m2"]);
    for m in list.members() {
        assert_eq!(m.client_urls().len(), 1, "{m:?}");
        assert!(!m.is_learner());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_and_rejoin() {
    let mut cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(LEADER_WAIT).await;
    let survivor = (leader + 1) % 3;
    let mut c = cluster.client(survivor).await;
    c.put("before", "1", None).await.unwrap();

    let killed_at = Instant::now();
    cluster.kill(leader);
    let c = cluster.client(survivor).await;
    let resp = eventually(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { c.put("after", "2", None).await.ok() }
    })
    .await;
    if resp.is_none() {
        cluster.dump_logs();
        panic!("no write succeeded after the leader was killed");
    }
    let took = killed_at.elapsed();
    println!("failover: first write acknowledged {took:?} after killing the leader (election timeout 500ms)");
    let new_leader = cluster.wait_leader(LEADER_WAIT).await;
    assert_ne!(new_leader, leader);

    cluster.restart(leader);
    let mut old = cluster.client(leader).await;
    let caught_up = eventually(Duration::from_secs(30), || {
        let mut old = old.clone();
        async move {
            let kvs = keys_with_prefix(&mut old, "after", true).await?;
            (kvs.len() == 1).then_some(kvs)
        }
    })
    .await;
    assert!(caught_up.is_some(), "restarted old leader never caught up");
    assert_eq!(keys_with_prefix(&mut old, "before", false).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_all_from_disk_keeps_data_and_revisions() {
    let mut cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    cluster.wait_leader(LEADER_WAIT).await;
    let mut c = cluster.client(0).await;
    for i in 0..50 {
        c.put(format!("key/{i:03}"), format!("value-{i}"), None).await.unwrap();
    }
    c.delete("key/007", None).await.unwrap();
    let before = keys_with_prefix(&mut c, "key/", false).await.unwrap();
    let rev_before = c.get("key/", None).await.unwrap().header().unwrap().revision();
    for i in 0..3 {
        cluster.kill(i);
    }
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_leader(LEADER_WAIT).await;
    for i in 0..3 {
        let mut c = cluster.client(i).await;
        let after = keys_with_prefix(&mut c, "key/", false).await.expect("read after restart");
        assert_eq!(after, before, "member {i}");
        assert_eq!(after.len(), 49);
        assert_eq!(c.get("key/", None).await.unwrap().header().unwrap().revision(), rev_before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_member_catches_up_by_snapshot() {
    let options = ClusterOptions {
        extra_args: ["--snapshot-count", "40", "--experimental-snapshot-catchup-entries", "5"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..Default::default()
    };
    let mut cluster = ProcessCluster::start(&bin(), 3, options);
    let leader = cluster.wait_leader(LEADER_WAIT).await;
    let lagger = (leader + 1) % 3;
    cluster.kill(lagger);
    let mut c = cluster.client(leader).await;
    // 3 MB of values: the snapshot travels in several 1 MiB chunks.
    for i in 0..300 {
        c.put(format!("s/{i:04}"), "x".repeat(10_000), None).await.unwrap();
    }
    let want = keys_with_prefix(&mut c, "s/", false).await.unwrap();
    // The leader purges its log behind each snapshot only when no replication is
    // reading those entries; restart the lagger once it has, so that it cannot
    // catch up from the log.
    let port = cluster.members[leader].client_port;
    let purged = eventually(Duration::from_secs(30), || async move {
        let (_, body) = concord_testkit::http_get(port, "/metrics").ok()?;
        let line = body.lines().find(|l| l.starts_with("concord_raft_log_purged_index "))?;
        let index: u64 = line.split(' ').nth(1)?.parse().ok()?;
        (index > 100).then_some(index)
    })
    .await;
    assert!(purged.is_some(), "the leader never purged its log behind a snapshot");
    cluster.restart(lagger);
    let mut lc = cluster.client(lagger).await;
    let got = eventually(Duration::from_secs(30), || {
        let mut lc = lc.clone();
        async move {
            let kvs = keys_with_prefix(&mut lc, "s/", true).await?;
            (kvs.len() == 300).then_some(kvs)
        }
    })
    .await;
    if got.is_none() {
        cluster.dump_logs();
    }
    assert_eq!(got.expect("lagging member never caught up"), want);
    assert!(
        cluster.log_text(lagger).contains("installed snapshot from leader"),
        "the lagging member must have caught up through a snapshot (log purged on the leader)"
    );
    // It keeps applying normally after the snapshot.
    c.put("s/after", "y", None).await.unwrap();
    let after = eventually(Duration::from_secs(10), || {
        let mut lc = lc.clone();
        async move { keys_with_prefix(&mut lc, "s/after", true).await.filter(|k| k.len() == 1) }
    })
    .await;
    assert!(after.is_some());
    let _ = lc.status().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_tolerate_two_failures() {
    let mut cluster = ProcessCluster::start(&bin(), 5, ClusterOptions::default());
    let leader = cluster.wait_leader(LEADER_WAIT).await;
    let mut c = cluster.client(leader).await;
    c.put("five", "1", None).await.unwrap();
    // Lose two members, one of them the leader: a majority of three remains.
    let other = (leader + 1) % 5;
    cluster.kill(leader);
    cluster.kill(other);
    let survivor = (leader + 2) % 5;
    let c = cluster.client(survivor).await;
    let ok = eventually(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { c.put("five", "2", None).await.ok() }
    })
    .await;
    assert!(ok.is_some(), "three of five members must keep accepting writes");
    let (code, _) = concord_testkit::http_get(cluster.members[survivor].client_port, "/health").unwrap();
    assert_eq!(code, 200, "a member of the majority is healthy");
    for i in 0..5 {
        if i == leader || i == other {
            continue;
        }
        let mut c = cluster.client(i).await;
        let kvs = keys_with_prefix(&mut c, "five", false).await.unwrap();
        assert_eq!(kvs[0].1, "2", "member {i}");
    }
    // Without a majority no linearizable read completes: /health says so.
    cluster.kill((leader + 3) % 5);
    let (code, body) = concord_testkit::http_get(cluster.members[survivor].client_port, "/health").unwrap();
    assert_eq!((code, body.as_str()), (503, r#"{"health":"false"}"#));
}

/// Frequent snapshots and log purges under concurrent writes (the openraft
/// purge-vs-apply race, upstream #2116, shows up as a dead member here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_purge_under_write_load_keep_members_alive_and_equal() {
    let options = ClusterOptions {
        extra_args: ["--snapshot-count", "50", "--experimental-snapshot-catchup-entries", "10"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..Default::default()
    };
    let mut cluster = ProcessCluster::start(&bin(), 3, options);
    cluster.wait_leader(LEADER_WAIT).await;
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut c = cluster.client(w % 3).await;
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < Duration::from_secs(5) {
                c.put(format!("soak/{w}/{}", n % 50), n.to_string(), None).await.expect("write under snapshot churn");
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for w in writers {
        total += w.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let mut views = Vec::new();
    for i in 0..3 {
        let mut c = cluster.client(i).await;
        views.push(keys_with_prefix(&mut c, "soak/", false).await.expect("member alive after soak"));
    }
    assert!(cluster.crashed().is_empty(), "a member exited during the soak: {:?}", cluster.crashed());
    // HashKV at one revision is equal on every member.
    let rev = cluster.client(0).await.get("soak/", None).await.unwrap().header().unwrap().revision();
    let mut hashes = Vec::new();
    for i in 0..3 {
        let c = cluster.client(i).await;
        let h = eventually(Duration::from_secs(10), || {
            let mut c = c.clone();
            async move { c.hash_kv(rev).await.ok().map(|r| r.hash()) }
        })
        .await
        .expect("hash_kv on every member");
        hashes.push(h);
    }
    assert!(hashes.iter().all(|h| *h == hashes[0]), "HashKV differs across members: {hashes:?}");
    println!("soak: {total} writes in {secs:.1}s ({:.0}/s) with a snapshot every 50 entries", total as f64 / secs);
    assert_eq!(views[0], views[1]);
    assert_eq!(views[1], views[2]);
    for i in 0..3 {
        assert!(!cluster.log_text(i).contains("panicked"), "member {i} panicked");
    }
}
