//! Membership changes with real processes: grow 1→3→5 and shrink 5→3 under write
//! load, learner promotion refused while the learner lags, leader removal and
//! leader transfer. Each test owns its processes and directories.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_testkit::etcd_client::{Client, GetOptions, MemberAddOptions};
use concord_testkit::{eventually, ClusterOptions, ProcessCluster};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

const WAIT: Duration = Duration::from_secs(30);

/// Raft voters as members report them in `Status` (`is_learner` is Raft's view).
async fn voter_count(cluster: &ProcessCluster) -> usize {
    let mut n = 0;
    for i in 0..cluster.members.len() {
        if !cluster.members[i].is_running() {
            continue;
        }
        let mut c = cluster.client(i).await;
        if let Ok(s) = c.status().await {
            n += usize::from(!s.is_learner());
        }
    }
    n
}

/// Adds member `i` through member `via` (voter or learner), starts it, and
/// returns its member ID.
async fn add_and_start(cluster: &mut ProcessCluster, via: usize, learner: bool) -> (usize, u64) {
    let i = cluster.add_member();
    let url = cluster.peer_url(i);
    let mut c = cluster.client(via).await;
    let opts = if learner { MemberAddOptions::new().with_is_learner() } else { MemberAddOptions::new() };
    let resp = c.member_add([url.clone()], Some(opts)).await.expect("member add");
    let id = resp.member().expect("added member").id();
    assert!(
        resp.member_list().iter().any(|m| m.id() == id && m.peer_urls() == [url.clone()]),
        "response lists the new member"
    );
    cluster.restart(i);
    (i, id)
}

/// Waits until `n` members are Raft voters; shows the member logs if not.
async fn wait_voters(cluster: &ProcessCluster, n: usize) {
    if eventually(WAIT, || async { (voter_count(cluster).await == n).then_some(()) }).await.is_none() {
        cluster.dump_logs();
        panic!("expected {n} voters, have {}", voter_count(cluster).await);
    }
}

async fn member_ids(c: &mut Client) -> Vec<u64> {
    let mut ids: Vec<u64> = c.member_list().await.expect("member list").members().iter().map(|m| m.id()).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_one_to_five_and_shrink_to_three_under_load_without_losing_writes() {
    let mut cluster = ProcessCluster::start(&bin(), 1, ClusterOptions::default());
    cluster.wait_leader(WAIT).await;

    // Writer: unique keys through member 0 (never removed in this test).
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let mut c = cluster.client(0).await;
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w/{n:06}");
                if c.put(key.clone(), "v", None).await.is_ok() {
                    acked.lock().unwrap().push(key);
                }
                n += 1;
            }
        })
    };

    // 1 → 3 voters.
    let (m1, _) = add_and_start(&mut cluster, 0, false).await;
    let (m2, _) = add_and_start(&mut cluster, 0, false).await;
    wait_voters(&cluster, 3).await;

    // 3 → 5: two learners; promotion is refused while a learner has not started.
    let lagging = cluster.add_member();
    let mut c0 = cluster.client(0).await;
    let url = cluster.peer_url(lagging);
    let resp = c0.member_add([url], Some(MemberAddOptions::new().with_is_learner())).await.expect("add learner");
    let lagging_id = resp.member().unwrap().id();
    let err = c0.member_promote(lagging_id).await.expect_err("promoting a learner that has no log must fail");
    assert!(
        err.to_string().contains("etcdserver: can only promote a learner member which is in sync with leader"),
        "etcd's error, got {err}"
    );
    cluster.restart(lagging);
    let (m4, m4_id) = add_and_start(&mut cluster, m1, true).await;
    for id in [lagging_id, m4_id] {
        let promoted = eventually(WAIT, || {
            let mut c = c0.clone();
            async move { c.member_promote(id).await.ok() }
        })
        .await;
        assert!(promoted.is_some(), "learner {id:x} is promoted once caught up");
    }
    wait_voters(&cluster, 5).await;
    // A learner serves serializable reads (and the promoted members still do).
    let mut c4 = cluster.client(m4).await;
    c4.get("w/", Some(GetOptions::new().with_prefix().with_serializable().with_count_only())).await.expect("read");

    // 5 → 3: remove the two newest members; their processes stop by themselves.
    for (i, id) in [(m4, m4_id), (lagging, lagging_id)] {
        let resp = c0.member_remove(id).await.expect("member remove");
        assert!(!resp.members().iter().any(|m| m.id() == id), "removed member not listed");
        let exit = cluster.wait_exit(i, WAIT);
        if exit.is_none_or(|st| st.success()) {
            cluster.dump_logs();
            panic!("removed member {i} did not exit with an error: {exit:?}");
        }
        assert!(cluster.log_text(i).contains("permanently removed"), "removed member says why");
    }
    wait_voters(&cluster, 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    // Every acknowledged write is on every remaining member; states hash equal.
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "the writer made progress during the changes: {}", acked.len());
    let mut hashes = Vec::new();
    for i in [0, m1, m2] {
        let mut c = cluster.client(i).await;
        let resp =
            c.get("w/", Some(GetOptions::new().with_prefix().with_keys_only())).await.expect("linearizable read");
        let keys: std::collections::HashSet<String> =
            resp.kvs().iter().map(|kv| kv.key_str().unwrap().to_string()).collect();
        let missing: Vec<&String> = acked.iter().filter(|k| !keys.contains(*k)).collect();
        assert!(missing.is_empty(), "member {i} lost acknowledged writes: {:?}", &missing[..missing.len().min(5)]);
        let rev = resp.header().unwrap().revision();
        hashes.push(c.hash_kv(rev).await.expect("hashkv").hash());
    }
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "HashKV differs: {hashes:?}");
    println!("acknowledged writes during membership changes: {}", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_and_remove_the_leader() {
    let mut cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(WAIT).await;
    let mut lc = cluster.client(leader).await;
    let ids = member_ids(&mut lc).await;
    let leader_id = lc.status().await.unwrap().leader();

    // MoveLeader is refused by a follower and by the leader for a non-member.
    let follower = (leader + 1) % 3;
    let mut fc = cluster.client(follower).await;
    let target = fc.status().await.unwrap().header().unwrap().member_id();
    let err = fc.move_leader(target).await.expect_err("a follower refuses move-leader");
    assert!(err.to_string().contains("etcdserver: not leader"), "{err}");
    let err = lc.move_leader(12345).await.expect_err("unknown transferee");
    assert!(err.to_string().contains("etcdserver: bad leader transferee"), "{err}");
    lc.move_leader(target).await.expect("move leader");
    // MoveLeader returns once the old leader sees the target lead; the target's
    // own status (Raft metrics, published in batches) may lag by a moment.
    eventually(Duration::from_secs(1), || {
        let mut fc = fc.clone();
        async move { (fc.status().await.ok()?.leader() == target).then_some(()) }
    })
    .await;
    assert_eq!(fc.status().await.unwrap().leader(), target, "leadership moved to the target");

    // Remove the (new) leader: it hands leadership over, leaves, and stops.
    lc.put("before", "1", None).await.expect("put");
    let resp = fc.member_remove(target).await.expect("remove the leader");
    assert_eq!(resp.members().len(), 2);
    if cluster.wait_exit(follower, WAIT).is_none() {
        cluster.dump_logs();
        panic!("the removed leader did not stop");
    }
    let left: Vec<u64> = ids.iter().copied().filter(|id| *id != target).collect();
    assert!(left.contains(&leader_id));
    let mut c = cluster.client(leader).await;
    let put = eventually(WAIT, || {
        let mut c = c.clone();
        async move { c.put("after", "2", None).await.ok() }
    })
    .await;
    assert!(put.is_some(), "the remaining two members elect a leader and accept writes");
    assert_eq!(member_ids(&mut c).await, left);
    let got = c.get("before", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"1");
}
