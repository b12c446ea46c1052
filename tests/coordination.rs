//! Coordination services on a real 3-member cluster: the watch guarantee checker
//! through failover and restarts, lease TTL across leader change, lock mutual
//! exclusion with fencing tokens under member kill, and 10,000 watchers with some
//! stalled.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_testkit::etcd_client::{Client, ConnectOptions, EventType, LockOptions, WatchOptions};
use concord_testkit::{eventually, ClusterOptions, ProcessCluster};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

/// (revision, key, is_put, value) as a watcher saw it.
type Seen = (i64, String, bool, String);

async fn connect(endpoint: &str) -> Option<Client> {
    let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(1)).with_timeout(Duration::from_secs(5));
    Client::connect([endpoint], Some(opts)).await.ok()
}

/// Watches `prefix` from revision 1 until `final_rev` is known and reached, moving
/// to the next member whenever its member dies. Returns the events and how many
/// times it had to resume.
async fn resilient_watch(
    endpoints: Vec<String>,
    first: usize,
    prefix: &str,
    final_rev: Arc<AtomicI64>,
) -> (Vec<Seen>, usize) {
    let mut seen: Vec<Seen> = Vec::new();
    let mut next = 1i64;
    let mut member = first;
    let mut resumes = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        assert!(Instant::now() < deadline, "watcher never reached the final revision");
        let done = |next: i64| {
            let f = final_rev.load(Ordering::Acquire);
            f > 0 && next > f
        };
        if done(next) {
            return (seen, resumes);
        }
        let Some(mut c) = connect(&endpoints[member]).await else {
            member = (member + 1) % endpoints.len();
            resumes += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let opts = WatchOptions::new().with_prefix().with_start_revision(next);
        let Ok((_w, mut stream)) = c.watch(prefix, Some(opts)).await else {
            member = (member + 1) % endpoints.len();
            resumes += 1;
            continue;
        };
        loop {
            if done(next) {
                return (seen, resumes);
            }
            let msg = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
            let resp = match msg {
                Err(_) => continue,
                Ok(Ok(Some(r))) => r,
                Ok(_) => break,
            };
            assert!(!resp.canceled() || resp.compact_revision() == 0, "unexpected compaction cancel");
            let mut last_in_resp = None;
            for ev in resp.events() {
                let kv = ev.kv().expect("event carries a kv");
                let rev = kv.mod_revision();
                assert!(rev >= next, "duplicate or reordered event: rev {rev} < next {next}");
                if let Some(prev) = seen.last() {
                    assert!(rev >= prev.0, "events out of order");
                }
                last_in_resp = Some(rev);
                seen.push((
                    rev,
                    kv.key_str().unwrap().to_string(),
                    ev.event_type() == EventType::Put,
                    kv.value_str().unwrap().to_string(),
                ));
            }
            // All events of a revision arrive in one response: resume after it.
            if let Some(r) = last_in_resp {
                next = r + 1;
            }
        }
        member = (member + 1) % endpoints.len();
        resumes += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_identical_gap_free_history_through_failover_and_restart() {
    let mut cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let endpoints = cluster.endpoints();
    let final_rev = Arc::new(AtomicI64::new(0));
    let watchers: Vec<_> =
        (0..3).map(|i| tokio::spawn(resilient_watch(endpoints.clone(), i, "h/", final_rev.clone()))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let endpoints = endpoints.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut i = 0u64;
                let mut member = w;
                while !stop.load(Ordering::Acquire) {
                    let Some(mut c) = connect(&endpoints[member]).await else {
                        member = (member + 1) % 3;
                        continue;
                    };
                    while !stop.load(Ordering::Acquire) {
                        let key = format!("h/{w}/{}", i % 7);
                        let r = if i % 5 == 4 {
                            c.delete(key, None).await.map(|_| ())
                        } else {
                            c.put(key, format!("{w}-{i}"), None).await.map(|_| ())
                        };
                        i += 1;
                        if r.is_err() {
                            member = (member + 1) % 3;
                            break;
                        }
                    }
                }
                i
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.kill(leader);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    cluster.restart(leader);
    let other = (leader + 1) % 3;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cluster.kill(other);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.restart(other);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Release);
    let mut ops = 0;
    for w in writers {
        ops += w.await.unwrap();
    }
    cluster.wait_leader(Duration::from_secs(30)).await;
    let mut c = cluster.client(0).await;
    let rev = c.get("h/", None).await.unwrap().header().unwrap().revision();
    final_rev.store(rev, Ordering::Release);
    let mut histories = Vec::new();
    let mut resumes = 0;
    for w in watchers {
        let (h, r) = w.await.unwrap();
        resumes += r;
        histories.push(h);
    }
    // A fresh watch from revision 1 replays the final history.
    let (replay, _) = resilient_watch(endpoints.clone(), 2, "h/", final_rev.clone()).await;
    println!(
        "watch checker: {ops} writes attempted, {} events up to revision {rev}, 3 watchers, {resumes} resumes across member failures",
        replay.len()
    );
    assert!(replay.len() > 20, "the workload must produce events");
    for (i, h) in histories.iter().enumerate() {
        assert_eq!(h.len(), replay.len(), "watcher {i} saw a different number of events");
        assert_eq!(h, &replay, "watcher {i} saw a different history");
    }
    // Gap-free: every write in this test is one put or delete of an h/ key (a delete
    // of an absent key makes no revision), so the events carry every revision from
    // the first write's (2) to the final one, each exactly once, in order.
    let revisions: Vec<i64> = replay.iter().map(|e| e.0).collect();
    let expected: Vec<i64> = (2..=rev).collect();
    assert_eq!(revisions, expected, "the watch history has a gap, a duplicate or a reordering");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_remaining_ttl_survives_leader_change() {
    let mut cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let mut c = cluster.client(leader).await;
    let granted_at = Instant::now();
    let lease = c.lease_grant(12, None).await.unwrap().id();
    c.put("leased", "v", Some(concord_testkit::etcd_client::PutOptions::new().with_lease(lease))).await.unwrap();
    // A second lease kept alive across the failover must not expire.
    let kept = c.lease_grant(3, None).await.unwrap().id();
    c.put("kept", "v", Some(concord_testkit::etcd_client::PutOptions::new().with_lease(kept))).await.unwrap();
    let survivor = (leader + 1) % 3;
    let mut s = cluster.client(survivor).await;
    let keeper = {
        let mut s = s.clone();
        tokio::spawn(async move {
            let (mut k, mut stream) = s.lease_keep_alive(kept).await.unwrap();
            for _ in 0..20 {
                if k.keep_alive().await.is_err() || stream.message().await.is_err() {
                    let Ok((nk, ns)) = s.lease_keep_alive(kept).await else { continue };
                    k = nk;
                    stream = ns;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.kill(leader);
    cluster.wait_leader(Duration::from_secs(30)).await;
    let ttl = s.lease_time_to_live(lease, None).await.unwrap().ttl();
    let elapsed = granted_at.elapsed().as_secs() as i64;
    println!("lease: {elapsed}s after grant and a leader change, remaining TTL {ttl}s of 12s (etcd would report ~12s)");
    assert!(ttl > 0, "lease must still be alive");
    assert!(ttl <= 12 - elapsed + 1, "remaining TTL was reset by the leader change: {ttl}s after {elapsed}s");
    // It then expires on the original schedule and takes its key with it.
    let gone = eventually(Duration::from_secs(20), || {
        let mut s = s.clone();
        async move { s.get("leased", None).await.ok().filter(|r| r.kvs().is_empty()).map(|_| ()) }
    })
    .await;
    assert!(gone.is_some(), "expired lease's key was not deleted");
    keeper.await.unwrap();
    let r = s.get("kept", None).await.unwrap();
    assert_eq!(r.kvs().len(), 1, "a lease kept alive through the failover must not expire");
}

/// A keep-alive the leader answered from memory (no log entry) still holds after
/// that leader dies: the new leader must not revoke the lease before the last
/// answered keep-alive's TTL has run out, and must revoke it after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_renewal_is_honoured_by_the_next_leader() {
    const TTL_S: i64 = 6;
    let mut cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let survivor = (leader + 1) % 3;
    let mut s = cluster.client(survivor).await;
    let lease = s.lease_grant(TTL_S, None).await.unwrap().id();
    s.put("held", "v", Some(concord_testkit::etcd_client::PutOptions::new().with_lease(lease))).await.unwrap();
    // The client sends the first keep-alive and reads its answer itself.
    let (mut keeper, mut stream) = s.lease_keep_alive(lease).await.unwrap();
    // Later keep-alives, within the in-memory window of the first (logged) one.
    let mut last_answered = Instant::now();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        keeper.keep_alive().await.unwrap();
        assert_eq!(stream.message().await.unwrap().unwrap().ttl(), TTL_S);
        last_answered = Instant::now();
    }
    // TimeToLive on a follower counts the leader's in-memory renewals.
    let ttl = s.lease_time_to_live(lease, None).await.unwrap().ttl();
    assert!(ttl >= TTL_S - 2, "a follower reported {ttl}s left just after a keep-alive to {TTL_S}s");
    drop((keeper, stream));
    cluster.kill(leader);
    // Still held one second before the promised deadline (read through the
    // surviving member, once a new leader is elected).
    let promised = last_answered + Duration::from_secs(TTL_S as u64);
    tokio::time::sleep_until((promised - Duration::from_secs(1)).into()).await;
    let held = s.get("held", None).await.unwrap().kvs().len();
    assert_eq!(held, 1, "the new leader revoked a lease before the TTL its predecessor promised ran out");
    // And it does expire: within the grace a new leader adds (5 s) and some slack.
    let gone = eventually(Duration::from_secs(15), || {
        let mut s = s.clone();
        async move { s.get("held", None).await.ok().filter(|r| r.kvs().is_empty()).map(|_| ()) }
    })
    .await;
    assert!(gone.is_some(), "the lease outlived its TTL plus the grace period");
}

/// A keep-alive stream on a follower rides through the leader's death: the
/// follower holds its keep-alives (re-sending any lost with the old leader) until
/// the new leader has taken over, and every one is answered with the full TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_streams_on_a_follower_survive_a_leader_kill() {
    const TTL_S: i64 = 10;
    let mut cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let mut s = cluster.client((leader + 1) % 3).await;
    let lease = s.lease_grant(TTL_S, None).await.unwrap().id();
    let (mut keeper, mut stream) = s.lease_keep_alive(lease).await.unwrap();
    let mut answered = 0;
    for round in 0..40 {
        if round == 10 {
            cluster.kill(leader);
        }
        keeper.keep_alive().await.expect("send a keep-alive");
        let answer = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
        let ttl = match answer {
            Ok(Ok(Some(r))) => r.ttl(),
            other => panic!("keep-alive {round} not answered across the leader change: {other:?}"),
        };
        assert_eq!(ttl, TTL_S, "keep-alive {round}");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{answered} keep-alives answered on one follower stream across a leader kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_is_mutually_exclusive_with_increasing_fencing_tokens_under_member_kill() {
    let mut cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let endpoints = cluster.endpoints();
    let held = Arc::new(AtomicBool::new(false));
    let tokens: Arc<Mutex<Vec<i64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|w| {
            let endpoints = endpoints.clone();
            let (held, tokens, stop) = (held.clone(), tokens.clone(), stop.clone());
            tokio::spawn(async move {
                let mut member = w % 3;
                let mut acquired = 0;
                while !stop.load(Ordering::Acquire) {
                    let Some(mut c) = connect(&endpoints[member]).await else {
                        member = (member + 1) % 3;
                        continue;
                    };
                    let attempt = async {
                        let lease = c.lease_grant(3, None).await?.id();
                        let resp = c.lock("the-lock", Some(LockOptions::new().with_lease(lease))).await?;
                        let key = resp.key().to_vec();
                        let token = c.get(key.clone(), None).await?.kvs()[0].create_revision();
                        assert!(!held.swap(true, Ordering::AcqRel), "two holders at once");
                        tokens.lock().unwrap().push(token);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        held.store(false, Ordering::Release);
                        c.unlock(key).await?;
                        c.lease_revoke(lease).await?;
                        Ok::<(), concord_testkit::etcd_client::Error>(())
                    };
                    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                        Ok(Ok(())) => acquired += 1,
                        _ => member = (member + 1) % 3,
                    }
                }
                acquired
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.kill(leader);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.restart(leader);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Release);
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    let tokens = tokens.lock().unwrap().clone();
    println!(
        "lock: {total} acquisitions by 4 clients across a leader kill; fencing tokens {}..{}",
        tokens[0],
        tokens[tokens.len() - 1]
    );
    assert!(total >= 10, "contention must still make progress");
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "fencing tokens must strictly increase: {tokens:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_watchers_some_stalled_keep_writes_and_memory_bounded() {
    let watchers: usize = std::env::var("CONCORD_TEST_WATCHERS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    const WRITES: usize = 20;
    let cluster = ProcessCluster::start(&bin(), 1, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(30)).await;
    let pid = cluster.members[0].pid().unwrap();
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().to_string();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
    };
    let mut c = cluster.client(0).await;
    let mut latencies_before = Vec::new();
    for i in 0..WRITES {
        let t = Instant::now();
        c.put(format!("load/{i}"), "x", None).await.unwrap();
        latencies_before.push(t.elapsed());
    }
    let rss_before = rss();
    // 10 connections with 1,000 watch streams each. The streams of connection 0 are
    // never read. (They share no connection with active streams: HTTP/2's
    // connection-level flow control would otherwise let a client's own unread
    // streams block its other streams, whatever the server does.)
    let mut active = Vec::new();
    let mut stalled = Vec::new();
    let creating = Instant::now();
    for conn in 0..10 {
        let mut wc = cluster.client(0).await;
        for _ in 0..watchers / 10 {
            let (w, s) = wc.watch("big/", Some(WatchOptions::new().with_prefix())).await.unwrap();
            if conn == 0 {
                stalled.push((w, s));
            } else {
                active.push((w, s));
            }
        }
    }
    let n_active = active.len();
    let created_in = creating.elapsed();
    // Every active stream is drained by its own task, as a real client would.
    let readers: Vec<_> = active
        .into_iter()
        .map(|(w, mut s)| {
            tokio::spawn(async move {
                let _keep = w;
                let mut n = 0;
                while n < WRITES {
                    match tokio::time::timeout(Duration::from_secs(120), s.message()).await {
                        Ok(Ok(Some(resp))) => n += resp.events().len(),
                        _ => break,
                    }
                }
                n
            })
        })
        .collect();
    let value = "v".repeat(128);
    let mut latencies = Vec::new();
    for i in 0..WRITES {
        let t = Instant::now();
        c.put(format!("big/{i}"), value.as_str(), None).await.unwrap();
        latencies.push(t.elapsed());
    }
    let mut received = 0usize;
    for r in readers {
        received += r.await.unwrap();
    }
    let rss_after = rss();
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() as f64 - 1.0) * p) as usize]
    };
    println!(
        "10k watchers: {} active, {} stalled, created in {:?}; put p50/p99 {:?}/{:?} (before watchers {:?}/{:?}); RSS {} MiB -> {} MiB; {received} events delivered",
        n_active,
        stalled.len(),
        created_in,
        pct(&mut latencies, 0.5),
        pct(&mut latencies, 0.99),
        pct(&mut latencies_before, 0.5),
        pct(&mut latencies_before, 0.99),
        rss_before,
        rss_after,
    );
    assert_eq!(received, n_active * WRITES, "every active watcher must receive every event");
    assert!(rss_after < 2048, "member RSS must stay bounded with stalled watchers: {rss_after} MiB");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_service_campaign_observe_proclaim_resign() {
    use concord_testkit::etcd_client::{ProclaimOptions, ResignOptions};
    let cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(30)).await;
    let mut a = cluster.client(0).await;
    let mut b = cluster.client(1).await;
    let la = a.lease_grant(30, None).await.unwrap().id();
    let lb = b.lease_grant(30, None).await.unwrap().id();
    let err = a.leader("job").await.unwrap_err().to_string();
    assert!(err.contains("election: no leader"), "{err}");
    let mut observe = b.observe("job").await.unwrap();
    let won = a.campaign("job", "alice", la).await.unwrap();
    let leader_a = won.leader().unwrap().clone();
    let seen = observe.message().await.unwrap().unwrap();
    assert_eq!(seen.kv().unwrap().value(), b"alice");
    // Bob queues behind Alice.
    let bob = tokio::spawn(async move { b.campaign("job", "bob", lb).await.map(|r| r.leader().unwrap().clone()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!bob.is_finished(), "bob must wait while alice leads");
    a.proclaim("alice-2", Some(ProclaimOptions::new().with_leader(leader_a.clone()))).await.unwrap();
    assert_eq!(observe.message().await.unwrap().unwrap().kv().unwrap().value(), b"alice-2");
    assert_eq!(a.leader("job").await.unwrap().kv().unwrap().value(), b"alice-2");
    a.resign(Some(ResignOptions::new().with_leader(leader_a.clone()))).await.unwrap();
    let leader_b = tokio::time::timeout(Duration::from_secs(10), bob).await.unwrap().unwrap().unwrap();
    assert!(leader_b.rev() > leader_a.rev(), "leadership revisions are fencing tokens");
    assert_eq!(observe.message().await.unwrap().unwrap().kv().unwrap().value(), b"bob");
    // A resigned leader can no longer proclaim.
    let err = a.proclaim("stale", Some(ProclaimOptions::new().with_leader(leader_a))).await.unwrap_err().to_string();
    assert!(err.contains("election: not leader"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_is_refused_to_a_waiter_whose_lease_expired() {
    let cluster = ProcessCluster::start(&bin(), 1, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(30)).await;
    let mut holder = cluster.client(0).await;
    let mut waiter = cluster.client(0).await;
    let lh = holder.lease_grant(30, None).await.unwrap().id();
    let held = holder.lock("res", Some(LockOptions::new().with_lease(lh))).await.unwrap();
    // The waiter's lease is short and never kept alive: it expires while queued.
    let lw = waiter.lease_grant(1, None).await.unwrap().id();
    let pending = tokio::spawn(async move { waiter.lock("res", Some(LockOptions::new().with_lease(lw))).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ttl = holder.lease_time_to_live(lw, None).await.unwrap().ttl();
    assert_eq!(ttl, -1, "the waiter's lease must have expired");
    holder.unlock(held.key()).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), pending).await.unwrap().unwrap();
    let err = outcome.expect_err("a lock must not be granted on an expired lease").to_string();
    assert!(err.contains("requested lease not found"), "{err}");
}

/// Keep-alives from many clients share log entries (one batch per member per
/// commit, see `concord::etcd_store::lease::renewer`), each is still answered with the full TTL
/// only after it committed, and an unknown lease is answered with TTL 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_take_a_log_entry_per_lease_not_per_keep_alive() {
    const CLIENTS: usize = 40;
    const ROUNDS: usize = 10;
    let cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let mut c = cluster.client(leader).await;
    let mut leases = Vec::new();
    for _ in 0..CLIENTS {
        leases.push(c.lease_grant(30, None).await.unwrap().id());
    }
    let (_, _, before) = cluster.status(leader).await.unwrap();
    let mut tasks = Vec::new();
    for (i, id) in leases.iter().copied().enumerate() {
        let mut client = cluster.client(i % 3).await;
        tasks.push(tokio::spawn(async move {
            let (mut keeper, mut stream) = client.lease_keep_alive(id).await.unwrap();
            let mut ttls = Vec::new();
            for _ in 0..ROUNDS {
                keeper.keep_alive().await.unwrap();
                ttls.push(stream.message().await.unwrap().expect("a keep-alive answer").ttl());
            }
            ttls
        }));
    }
    for t in tasks {
        // The first keep-alive is sent by lease_keep_alive itself.
        let ttls = t.await.unwrap();
        assert!(ttls.iter().all(|ttl| *ttl == 30), "renewed TTLs: {ttls:?}");
    }
    let (_, _, after) = cluster.status(leader).await.unwrap();
    let keep_alives = (CLIENTS * (ROUNDS + 1)) as u64;
    println!("{keep_alives} keep-alives took {} log entries", after - before);
    // Only each lease's first keep-alive needs an entry (fewer: they share
    // entries), plus the lessor's periodic checkpoints; the rest renew in the
    // leader's memory.
    let most = CLIENTS as u64 + 4;
    assert!(after - before <= most, "{keep_alives} keep-alives took {} log entries", after - before);

    // TTL 0, which the client reports as etcd's "lease not found".
    let unknown = c.lease_keep_alive(0x7777).await.map(|_| ()).map_err(|e| e.to_string());
    assert!(unknown.as_ref().is_err_and(|e| e.contains("lease not found")), "{unknown:?}");
}
