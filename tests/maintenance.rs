//! Maintenance with real processes: auto-compaction, Hash equality, corruption
//! detection. Each test owns its processes and directories.

use std::path::PathBuf;
use std::time::Duration;

use concord_testkit::etcd_client::GetOptions;
use concord_testkit::{eventually, ClusterOptions, ProcessCluster};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_auto_compaction_keeps_only_the_retention_window() {
    let options = ClusterOptions {
        extra_args: ["--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1s"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let cluster = ProcessCluster::start(&bin(), 3, options);
    let leader = cluster.wait_leader(WAIT).await;
    let mut c = cluster.client(leader).await;
    for i in 0..5 {
        c.put("k", format!("v{i}"), None).await.expect("put");
    }
    // Within a few retention periods the old revisions are compacted away on
    // every member (the leader proposes the compaction through Raft).
    for i in 0..3 {
        let compacted = eventually(WAIT, || {
            let cluster = &cluster;
            async move {
                let mut c = cluster.client(i).await;
                let opts = GetOptions::new().with_revision(2).with_serializable();
                match c.get("k", Some(opts)).await {
                    Err(e) if e.to_string().contains("required revision has been compacted") => Some(()),
                    _ => None,
                }
            }
        })
        .await;
        assert!(compacted.is_some(), "member {i} compacted revision 2");
    }
    let latest = c.get("k", None).await.expect("get latest");
    assert_eq!(latest.kvs()[0].value(), b"v4", "compaction keeps the latest version");
    assert!(cluster.log_text(leader).contains("auto-compaction"), "the leader logs its compactions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_is_equal_across_members_at_the_same_revision() {
    let cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(WAIT).await;
    let mut c = cluster.client(leader).await;
    for i in 0..50 {
        c.put(format!("k{i}"), "v", None).await.expect("put");
    }
    let lease = c.lease_grant(60, None).await.expect("lease");
    c.put("leased", "v", Some(concord_testkit::etcd_client::PutOptions::new().with_lease(lease.id())))
        .await
        .expect("put with lease");
    c.delete("k1", None).await.expect("delete");
    let rev = c.get("k0", None).await.unwrap().header().unwrap().revision();
    // The lessor's checkpoints (entries that rewrite the lease's remaining TTL but
    // no revision) can be applied on one member a moment before another, so the
    // members are asked until they agree: they must, at the same revision.
    let last = std::sync::Mutex::new(Vec::new());
    let agreed = eventually(Duration::from_secs(10), || {
        let (last, cluster) = (&last, &cluster);
        async move {
            let mut hashes = Vec::new();
            for i in 0..3 {
                let mut m = cluster.client(i).await;
                // Linearizable read first: the member has applied everything up to `rev`.
                m.get("k0", None).await.ok()?;
                let h = m.hash().await.ok()?;
                assert_eq!(h.header().unwrap().revision(), rev);
                hashes.push(h.hash());
            }
            *last.lock().expect("last hashes") = hashes.clone();
            hashes.windows(2).all(|w| w[0] == w[1]).then_some(())
        }
    })
    .await;
    assert!(agreed.is_some(), "Hash differs across members: {last:?}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Damages `file`: flips one bit inside every stored value visible in the file
/// (so live data is hit, not only stale pages), or in the middle of the file if
/// none is visible; or cuts the file in half.
fn damage(file: &std::path::Path, truncate: bool) {
    let mut bytes = std::fs::read(file).unwrap();
    if truncate {
        bytes.truncate(bytes.len() / 2);
    } else {
        let marker = b"corruption-marker-";
        let hits: Vec<usize> =
            bytes.windows(marker.len()).enumerate().filter(|(_, w)| *w == marker).map(|(i, _)| i + 4).collect();
        if hits.is_empty() {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x10;
        }
        for at in hits {
            bytes[at] ^= 0x10;
        }
    }
    std::fs::write(file, &bytes).unwrap();
}

/// The file to damage among those whose path contains `part`: one holding a
/// stored value if any does, else the biggest.
fn pick(data_dir: &std::path::Path, part: &str) -> PathBuf {
    let has_marker = |p: &PathBuf| std::fs::read(p).is_ok_and(|b| b.windows(18).any(|w| w == b"corruption-marker-"));
    files_under(data_dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(part))
        .max_by_key(|p| (has_marker(p), std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)))
        .unwrap_or_else(|| panic!("no file matching {part} under {}", data_dir.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_files_are_refused_at_start_and_never_served() {
    let options =
        ClusterOptions { extra_args: ["--snapshot-count", "50"].map(String::from).to_vec(), ..Default::default() };
    let mut cluster = ProcessCluster::start(&bin(), 3, options);
    let leader = cluster.wait_leader(WAIT).await;
    let mut c = cluster.client(leader).await;
    let expected = |i: usize| format!("corruption-marker-{i:04}");
    for i in 0..200 {
        c.put(format!("k{i:04}"), expected(i), None).await.expect("put");
    }
    let victim = (leader + 1) % 3;
    // Let the victim apply everything (and build its own snapshots) before stopping.
    let rev = c.get("k0000", None).await.unwrap().header().unwrap().revision();
    let caught_up = eventually(WAIT, || {
        let cluster = &cluster;
        async move { cluster.status(victim).await.filter(|s| s.2 > 200).map(|_| ()) }
    })
    .await;
    assert!(caught_up.is_some());
    assert!(cluster.stop(victim).is_some_and(|st| st.success()), "clean stop");
    let data_dir = cluster.members[victim].data_dir.clone();
    let pristine = cluster.dir().join("pristine");
    copy_dir(&data_dir, &pristine);
    assert!(pristine.join("member/group-1/log-end").exists(), "a clean stop records where the log ends");

    for (kind, part) in
        [("identity", "identity"), ("state machine", "state.redb"), ("raft log", "/log/"), ("snapshot", "snap/current")]
    {
        for truncate in [false, true] {
            std::fs::remove_dir_all(&data_dir).unwrap();
            copy_dir(&pristine, &data_dir);
            let file = pick(&data_dir, part);
            damage(&file, truncate);
            let how = if truncate { "truncated" } else { "bit flip" };
            let log_before = cluster.log_text(victim).len();
            cluster.restart(victim);
            match cluster.wait_exit(victim, Duration::from_secs(10)) {
                Some(st) => {
                    assert!(!st.success(), "{kind} {how}: a refusing member exits non-zero");
                    let log = cluster.log_text(victim)[log_before..].to_lowercase();
                    assert!(
                        log.contains("corrupt") || log.contains("checksum"),
                        "{kind} {how}: the log says what is wrong:\n{log}"
                    );
                    println!("{kind} {how} ({}): refused at start", file.display());
                }
                None => {
                    // It started: whatever it serves must be the true data.
                    let mut v = cluster.client(victim).await;
                    let served = eventually(WAIT, || {
                        let mut v = v.clone();
                        async move {
                            let r = v.get("k", Some(GetOptions::new().with_prefix())).await.ok()?;
                            (r.header().unwrap().revision() >= rev).then_some(r)
                        }
                    })
                    .await
                    .unwrap_or_else(|| panic!("{kind} {how}: a member that starts must serve"));
                    assert_eq!(served.kvs().len(), 200, "{kind} {how}: all keys served");
                    for (i, kv) in served.kvs().iter().enumerate() {
                        assert_eq!(kv.value_str().unwrap(), expected(i), "{kind} {how}: wrong data served");
                    }
                    let _ = v.status().await;
                    println!("{kind} {how} ({}): started; served only correct data", file.display());
                    cluster.kill(victim);
                }
            }
        }
    }
}

/// Changes one stored value on a stopped member with a valid storage write, so no
/// checksum notices: only comparing with the other members can.
fn tamper_with_history(data_dir: &std::path::Path) {
    use concord::storage::{Backend, HISTORY};
    use redb::ReadableTable;
    let backend = Backend::open(&data_dir.join("member/group-1/state.redb")).expect("open state");
    let txn = backend.begin_apply().unwrap();
    {
        let mut history = txn.open_table(HISTORY).unwrap();
        let (key, mut value) = {
            let mut rows = history.iter().unwrap();
            let (k, v) = rows.next().expect("a history row").unwrap();
            (k.value().to_vec(), v.value().to_vec())
        };
        // The user value is the last field of the encoded KeyValue.
        *value.last_mut().unwrap() ^= 0x01;
        history.insert(key.as_slice(), value.as_slice()).unwrap();
    }
    txn.commit().unwrap();
    backend.persist().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverged_member_is_found_by_the_periodic_check_and_stops_serving() {
    let options = ClusterOptions {
        extra_args: ["--experimental-corrupt-check-time", "1s"].map(String::from).to_vec(),
        ..Default::default()
    };
    let mut cluster = ProcessCluster::start(&bin(), 3, options);
    let leader = cluster.wait_leader(WAIT).await;
    let mut c = cluster.client(leader).await;
    for i in 0..20 {
        c.put(format!("k{i:02}"), "value", None).await.expect("put");
    }
    let victim = (leader + 1) % 3;
    let victim_id = cluster.client(victim).await.status().await.unwrap().header().unwrap().member_id();
    assert!(eventually(WAIT, || {
        let cluster = &cluster;
        async move { cluster.status(victim).await.filter(|s| s.2 >= 22).map(|_| ()) }
    })
    .await
    .is_some());
    assert!(cluster.stop(victim).is_some());
    tamper_with_history(&cluster.members[victim].data_dir);
    cluster.restart(victim);

    let raised = eventually(WAIT, || {
        let mut c = c.clone();
        async move {
            let alarms = c
                .alarm(
                    concord_testkit::etcd_client::AlarmAction::Get,
                    concord_testkit::etcd_client::AlarmType::None,
                    None,
                )
                .await
                .ok()?;
            alarms
                .alarms()
                .iter()
                .any(|a| a.member_id() == victim_id && a.alarm() == concord_testkit::etcd_client::AlarmType::Corrupt)
                .then_some(())
        }
    })
    .await;
    if raised.is_none() {
        cluster.dump_logs();
    }
    assert!(raised.is_some(), "CORRUPT raised for the diverged member");
    // The victim refuses once it has applied the alarm entry itself, which can be a
    // moment after the leader answered the alarm list.
    let mut v = cluster.client(victim).await;
    let refused = eventually(WAIT, || {
        let mut v = v.clone();
        async move {
            let e = v.get("k00", Some(GetOptions::new().with_serializable())).await.err()?;
            e.to_string().contains("etcdserver: corrupt cluster").then_some(())
        }
    })
    .await;
    assert!(refused.is_some(), "the diverged member refuses reads with etcdserver: corrupt cluster");
    let status = v.status().await.expect("status still answers");
    assert!(
        status.errors().iter().any(|e| e.starts_with("memberID:") && e.ends_with(" alarm:CORRUPT ")),
        "{:?}",
        status.errors()
    );
    // The healthy majority keeps serving.
    let got = c.get("k00", None).await.expect("healthy members serve");
    assert_eq!(got.kvs()[0].value(), b"value");
    assert!(cluster.log_text(leader).contains("raising CORRUPT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defragment_under_load_keeps_serving_and_shrinks_the_file() {
    let cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(WAIT).await;
    let mut c = cluster.client(leader).await;
    // Live data plus four times as much garbage: every key written five times,
    // then compacted.
    let value = "x".repeat(16 * 1024);
    for round in 0..5 {
        for i in 0..200 {
            c.put(format!("big/{i:04}"), format!("{round}{value}"), None).await.expect("fill");
        }
    }
    let rev = c.get("big/0000", None).await.unwrap().header().unwrap().revision();
    c.compact(rev, Some(concord_testkit::etcd_client::CompactionOptions::new().with_physical())).await.unwrap();

    // A writer and a reader run throughout; latencies of puts are recorded.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (mut c, stop) = (c.clone(), stop.clone());
        // A failed request is counted, not fatal: on a loaded 2-core machine a
        // leader change may happen at any time, and the test is about what the
        // acknowledged writes look like afterwards.
        tokio::spawn(async move {
            let (mut lat, mut acked, mut failed) = (Vec::new(), Vec::new(), 0u64);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = std::time::Instant::now();
                let key = format!("load/{n:06}");
                let ok = c.put(key.clone(), "v", None).await.is_ok() && c.get("big/0001", None).await.is_ok();
                if ok {
                    lat.push((t, t.elapsed()));
                    acked.push(key);
                } else {
                    failed += 1;
                }
                n += 1;
            }
            (lat, acked, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut windows = Vec::new();
    for i in 0..3 {
        let mut m = cluster.client(i).await;
        let before = m.status().await.unwrap().db_size();
        let t0 = std::time::Instant::now();
        m.defragment().await.expect("defragment");
        windows.push((t0, std::time::Instant::now()));
        let after = m.status().await.unwrap().db_size();
        println!("member {i}: db size {before} -> {after} bytes in {:?}", t0.elapsed());
        if after >= before {
            cluster.dump_logs();
        }
        assert!(after < before, "member {i}: defragmentation shrinks the file ({before} -> {after})");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (lat, acked, failed) = match load.await {
        Ok(r) => r,
        Err(e) => {
            cluster.dump_logs();
            panic!("load failed: {e}");
        }
    };

    let during = |t: &std::time::Instant| windows.iter().any(|(a, b)| t >= a && t <= b);
    let mut in_defrag: Vec<Duration> = lat.iter().filter(|(t, _)| during(t)).map(|(_, d)| *d).collect();
    let mut outside: Vec<Duration> = lat.iter().filter(|(t, _)| !during(t)).map(|(_, d)| *d).collect();
    in_defrag.sort();
    outside.sort();
    let p99 = |v: &[Duration]| v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1))).copied();
    println!(
        "put+get during defragmentation: n={} p99={:?}; otherwise: n={} p99={:?}",
        in_defrag.len(),
        p99(&in_defrag),
        outside.len(),
        p99(&outside)
    );

    // Nothing was lost or changed, and members still agree.
    let got = c.get("big/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(got.kvs().len(), 200);
    assert!(got.kvs().iter().all(|kv| kv.value().len() == value.len() + 1 && kv.value()[0] == b'4'));
    let stored = c.get("load/", Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    let keys: std::collections::HashSet<&[u8]> = stored.kvs().iter().map(|kv| kv.key()).collect();
    assert!(acked.iter().all(|k| keys.contains(k.as_bytes())), "every acknowledged put is there");
    println!("requests during the run: {} acknowledged, {failed} failed", acked.len());
    let rev = stored.header().unwrap().revision();
    let mut hashes = Vec::new();
    for i in 0..3 {
        let mut m = cluster.client(i).await;
        m.get("big/0000", None).await.unwrap();
        hashes.push(m.hash_kv(rev).await.unwrap().hash());
    }
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "HashKV differs after defragmentation: {hashes:?}");
}
