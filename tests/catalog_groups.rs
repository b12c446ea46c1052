//! Groups created at runtime on a running cluster, through the catalog
//! (`concord.groups.v1`), run by real processes: 3 members x 64 register
//! groups, writers on every group, leaders and members killed with SIGKILL and
//! restarted, and every group's history checked for linearizability.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord::proto::groups::groups_client::GroupsClient;
use concord::proto::groups::registers_client::RegistersClient;
use concord::proto::groups::{
    CasRequest, CreateRequest, GroupSpec, ListRequest, ReadRequest, RemoveRequest, WriteRequest,
};
use concord_testkit::linearizability::{check, initial_writes, Event, Op, Outcome};
use concord_testkit::{eventually, ClusterOptions, ProcessCluster};
use rand::Rng;
use tonic::transport::Channel;

const GROUPS: u64 = 64;
const OP_TIMEOUT: Duration = Duration::from_secs(3);

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concord"))
}

async fn channel(endpoint: &str) -> Channel {
    Channel::from_shared(endpoint.to_string())
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(1))
        .timeout(OP_TIMEOUT)
        .connect_lazy()
}

/// One client's operations on its group's register, through every member in turn.
async fn client(
    channels: Vec<Channel>,
    group: u64,
    id: usize,
    started: Instant,
    run: Duration,
    history: Arc<Mutex<Vec<Event>>>,
) {
    let key = format!("g{group}");
    let mut value = (id as u64) << 32;
    let mut turn = id;
    while started.elapsed() < run {
        turn += 1;
        value += 1;
        let mut c = RegistersClient::new(channels[turn % channels.len()].clone());
        let op = match rand::rng().random_range(0..3) {
            0 => Op::Read,
            1 => Op::Write(value),
            _ => Op::Cas { expect: value - 1, new: value },
        };
        let invoked = started.elapsed().as_nanos() as u64;
        let outcome = match op {
            Op::Read => {
                c.read(ReadRequest { group, key: key.clone() }).await.map(|r| Outcome::Value(r.into_inner().value))
            }
            Op::Write(v) => c.write(WriteRequest { group, key: key.clone(), value: v }).await.map(|_| Outcome::Written),
            Op::Cas { expect, new } => c
                .cas(CasRequest { group, key: key.clone(), expect: Some(expect), value: new })
                .await
                .map(|r| Outcome::Swapped(r.into_inner().swapped)),
        };
        let completed = started.elapsed().as_nanos() as u64;
        let outcome = match outcome {
            Ok(o) => o,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Outcome::Unknown
            }
        };
        history.lock().expect("history").push(Event {
            client: id,
            key: key.clone(),
            op,
            outcome,
            invoked,
            completed,
            revision: 0,
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_groups_created_at_runtime_survive_kills_and_stay_linearizable() {
    let mut cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(30)).await;
    let endpoints = cluster.endpoints();
    let mut admin = GroupsClient::new(channel(&endpoints[0]).await);
    for id in 2..2 + GROUPS {
        let spec = GroupSpec { id, service: "register".into(), replicas: vec![] };
        let created =
            admin.create(CreateRequest { group: Some(spec), replica_count: 0 }).await.expect("create").into_inner();
        assert_eq!(created.group.expect("spec").replicas.len(), 3);
    }
    let again = admin.create(CreateRequest {
        group: Some(GroupSpec { id: 2, service: "register".into(), replicas: vec![] }),
        replica_count: 0,
    });
    assert_eq!(again.await.unwrap_err().code(), tonic::Code::AlreadyExists);
    let bad = admin.create(CreateRequest {
        group: Some(GroupSpec { id: 999, service: "queue".into(), replicas: vec![] }),
        replica_count: 0,
    });
    assert_eq!(bad.await.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(admin.list(ListRequest {}).await.expect("list").into_inner().groups.len(), GROUPS as usize);

    let mut channels = Vec::new();
    for e in &endpoints {
        channels.push(channel(e).await);
    }
    // Every group serves on every member before the faults start.
    for g in 2..2 + GROUPS {
        for ch in &channels {
            let ch = ch.clone();
            let ready = eventually(Duration::from_secs(60), || {
                let mut c = RegistersClient::new(ch.clone());
                async move { c.write(WriteRequest { group: g, key: format!("g{g}"), value: 0 }).await.ok() }
            })
            .await;
            assert!(ready.is_some(), "group {g} never served");
        }
    }

    let run = Duration::from_secs(12);
    // The writes of 0 above, all complete before anything below starts.
    let history = Arc::new(Mutex::new(initial_writes((2..2 + GROUPS).map(|g| format!("g{g}")), 0)));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for g in 2..2 + GROUPS {
        clients.spawn(client(channels.clone(), g, g as usize, started, run, history.clone()));
    }
    // Kill each member in turn (every member leads some groups) and bring it back.
    for victim in [0, 1] {
        tokio::time::sleep(Duration::from_secs(3)).await;
        cluster.kill(victim);
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.restart(victim);
    }
    while clients.join_next().await.is_some() {}
    assert!(cluster.crashed().is_empty(), "a member exited on its own");

    let history = history.lock().expect("history").clone();
    let mut answered_groups = 0;
    for g in 2..2 + GROUPS {
        let of_group: Vec<Event> = history.iter().filter(|e| e.key == format!("g{g}")).cloned().collect();
        if of_group.iter().any(|e| e.outcome != Outcome::Unknown) {
            answered_groups += 1;
        }
        if let Err(v) = check(&of_group) {
            panic!("group {g}: {v}");
        }
    }
    assert_eq!(answered_groups, GROUPS, "every group answered some operations");
    let answered = history.iter().filter(|e| e.outcome != Outcome::Unknown).count();
    eprintln!("{answered} of {} operations answered over {GROUPS} groups", history.len());

    // A removed group stops being served, on every member.
    admin.remove(RemoveRequest { id: 2 }).await.expect("remove");
    for ch in &channels {
        let gone = eventually(Duration::from_secs(10), || {
            let mut c = RegistersClient::new(ch.clone());
            async move {
                match c.read(ReadRequest { group: 2, key: "g2".into() }).await {
                    Err(s) if s.code() == tonic::Code::NotFound => Some(()),
                    _ => None,
                }
            }
        })
        .await;
        assert!(gone.is_some(), "group 2 still served after its removal");
    }
    assert_eq!(admin.remove(RemoveRequest { id: 2 }).await.unwrap_err().code(), tonic::Code::NotFound);
}

/// The command-line client: create, use and remove a group; errors say why and
/// exit non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_uses_and_removes_a_group() {
    let cluster = ProcessCluster::start(&bin(), 1, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(30)).await;
    let endpoint = cluster.endpoints()[0].clone();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .args(["--endpoints", &endpoint])
            .output()
            .expect("run concord");
        let text = String::from_utf8_lossy(if out.status.success() { &out.stdout } else { &out.stderr }).to_string();
        (out.status.success(), text.trim().to_string())
    };
    let (ok, created) = run(&["group", "create", "7"]);
    assert!(ok && created.starts_with("7, register, "), "{created}");
    assert_eq!(run(&["register", "write", "7", "x", "1"]), (true, "OK".into()));
    assert_eq!(run(&["register", "cas", "7", "x", "1", "2"]), (true, "SWAPPED".into()));
    assert_eq!(run(&["register", "cas", "7", "x", "none", "3"]), (true, "NOT SWAPPED".into()));
    assert_eq!(run(&["register", "read", "7", "x"]), (true, "2".into()));
    assert_eq!(run(&["register", "read", "7", "y"]), (true, "none".into()));
    assert_eq!(run(&["group", "ls"]), (true, created.clone()));
    assert_eq!(run(&["group", "create", "7"]), (false, "Error: concord: raft group already exists".into()));
    assert_eq!(run(&["group", "create", "1"]), (false, "Error: concord: raft group already exists".into()));
    assert_eq!(run(&["group", "rm", "7"]), (true, "Group 7 removed".into()));
    assert_eq!(run(&["register", "read", "7", "x"]), (false, "Error: concord: raft group 7 is not hosted here".into()));
    assert_eq!(run(&["group", "rm", "7"]), (false, "Error: concord: raft group not found".into()));
}

/// A catalog group whose Raft core stops (here: its snapshot cannot be written,
/// a storage failure) is restarted by the member's group host from its own data,
/// loudly (an error naming the group), while the member and its etcd store go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_group_is_restarted_from_its_data() {
    let options = ClusterOptions { extra_args: vec!["--snapshot-count".into(), "50".into()], ..Default::default() };
    let cluster = ProcessCluster::start(&bin(), 1, options);
    cluster.wait_leader(Duration::from_secs(30)).await;
    let ch = channel(&cluster.endpoints()[0]).await;
    let spec = GroupSpec { id: 3, service: "register".into(), replicas: vec![] };
    GroupsClient::new(ch.clone()).create(CreateRequest { group: Some(spec), replica_count: 0 }).await.expect("create");
    let mut c = RegistersClient::new(ch.clone());
    c.write(WriteRequest { group: 3, key: "kept".into(), value: 7 }).await.expect("write");

    // Snapshots of group 3 go to member/groups/3/snap: a file in its place makes
    // the next snapshot build fail, which stops the group's Raft core.
    let snap = cluster.members[0].data_dir.join("member/groups/3/snap");
    std::fs::remove_dir_all(&snap).expect("remove the snapshot dir");
    std::fs::write(&snap, b"not a directory").expect("block it");
    for i in 0..60 {
        let _ = c.write(WriteRequest { group: 3, key: format!("k{i}"), value: i }).await;
    }
    let stopped = eventually(Duration::from_secs(20), || async {
        cluster.log_text(0).contains("the Raft core of a hosted group stopped").then_some(())
    })
    .await;
    assert!(stopped.is_some(), "the group never failed");
    // Once it can write snapshots again, the restarted replica serves its data.
    std::fs::remove_file(&snap).expect("unblock");
    let back = eventually(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { c.read(ReadRequest { group: 3, key: "kept".into() }).await.ok().map(|r| r.into_inner().value) }
    })
    .await;
    assert_eq!(back, Some(Some(7)));
    c.write(WriteRequest { group: 3, key: "after".into(), value: 1 }).await.expect("write after the restart");
    let mut kv = cluster.client(0).await;
    kv.put("etcd", "still here", None).await.expect("the etcd store is unaffected");
}

/// (quiescent, hosted) groups of member `i`, from its `/metrics`.
fn quiescence(cluster: &ProcessCluster, i: usize) -> Option<(u64, u64)> {
    let (_, body) = concord_testkit::http_get(cluster.members[i].client_port, "/metrics").ok()?;
    let gauge =
        |name: &str| body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<u64>().ok());
    Some((gauge("concord_raft_groups_quiescent")?, gauge("concord_raft_groups")?))
}

/// Waits until every group on every running member is quiescent.
async fn all_quiescent(cluster: &ProcessCluster, groups: u64, why: &str) {
    let quiet = eventually(Duration::from_secs(30), || async {
        (0..cluster.members.len())
            .filter(|i| cluster.members[*i].is_running())
            .all(|i| quiescence(cluster, i) == Some((groups, groups)))
            .then_some(())
    })
    .await;
    let now: Vec<_> = (0..cluster.members.len()).map(|i| quiescence(cluster, i)).collect();
    assert!(quiet.is_some(), "{why}: not every group went quiescent: {now:?}");
}

/// Writes `value` to every group's register through member `via`, each within
/// `within` (retried: a group may be electing a leader).
async fn write_all(channel: &Channel, groups: std::ops::Range<u64>, value: u64, within: Duration) {
    for g in groups {
        let written = eventually(within, || {
            let mut c = RegistersClient::new(channel.clone());
            async move { c.write(WriteRequest { group: g, key: "q".into(), value }).await.ok() }
        })
        .await;
        assert!(written.is_some(), "group {g}: no write of {value} within {within:?}");
    }
}

/// Idle groups stop ticking on every member (the etcd store's too) and still
/// serve: a write wakes a group, which goes quiet again; when a member stops
/// (SIGSTOP, then SIGKILL) while its groups are quiescent, the groups it led
/// elect new leaders and serve through the others; a member that comes back
/// catches up and every group goes quiet again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiescent_groups_serve_and_fail_over() {
    const N: u64 = 8;
    let mut cluster = ProcessCluster::start(&bin(), 3, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(30)).await;
    let endpoints = cluster.endpoints();
    let mut admin = GroupsClient::new(channel(&endpoints[0]).await);
    for id in 2..2 + N {
        let spec = GroupSpec { id, service: "register".into(), replicas: vec![] };
        admin.create(CreateRequest { group: Some(spec), replica_count: 0 }).await.expect("create");
    }
    let mut channels = Vec::new();
    for e in &endpoints {
        channels.push(channel(e).await);
    }
    let hosted = N + 1;
    write_all(&channels[0], 2..2 + N, 1, Duration::from_secs(30)).await;
    all_quiescent(&cluster, hosted, "idle after creation").await;

    // Quiescent groups take writes and linearizable reads (which wake them).
    write_all(&channels[1], 2..2 + N, 2, Duration::from_secs(5)).await;
    for g in 2..2 + N {
        let read = RegistersClient::new(channels[2].clone()).read(ReadRequest { group: g, key: "q".into() }).await;
        assert_eq!(read.expect("read").into_inner().value, Some(2), "group {g}");
    }
    all_quiescent(&cluster, hosted, "idle after writes").await;

    // A frozen member: the groups it led elect leaders among the other two.
    cluster.pause(0);
    write_all(&channels[1], 2..2 + N, 3, Duration::from_secs(20)).await;
    let mut kv = cluster.client(1).await;
    kv.put("quiet", "failover", None).await.expect("the etcd store serves without member 0");
    cluster.resume(0);
    write_all(&channels[0], 2..2 + N, 4, Duration::from_secs(20)).await;
    all_quiescent(&cluster, hosted, "idle after the pause").await;

    // A killed member, and its restart.
    cluster.kill(1);
    write_all(&channels[2], 2..2 + N, 5, Duration::from_secs(20)).await;
    cluster.restart(1);
    write_all(&channels[1], 2..2 + N, 6, Duration::from_secs(30)).await;
    all_quiescent(&cluster, hosted, "idle after the restart").await;
    for g in 2..2 + N {
        for ch in &channels {
            let read = RegistersClient::new(ch.clone()).read(ReadRequest { group: g, key: "q".into() }).await;
            assert_eq!(read.expect("read").into_inner().value, Some(6), "group {g}");
        }
    }
    assert!(cluster.crashed().is_empty(), "a member exited on its own");
}

/// Groups created without a replica list are placed by the hash ring over the
/// members' announced `--zone` and `--weight`: each group gets 3 distinct
/// members covering both zones, exactly where `concord::placement` puts it given
/// the groups before it, and `concord nodes` lists the labels with replica and
/// leader counts that add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_placed_by_the_ring_over_zones_and_nodes_lists_them() {
    use concord::placement::{rebalance, Node, Placement, Ring};
    let zones = ["east", "east", "west", "west"];
    let mut cluster = ProcessCluster::prepare(&bin(), 4, ClusterOptions::default());
    for (i, zone) in zones.iter().enumerate() {
        let weight = if i == 3 { "2" } else { "1" };
        cluster.set_extra_args(i, vec!["--zone".into(), (*zone).into(), "--weight".into(), weight.into()]);
        cluster.restart(i);
    }
    cluster.wait_leader(Duration::from_secs(30)).await;
    let endpoint = cluster.endpoints()[0].clone();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .args(["--endpoints", &endpoint])
            .output()
            .expect("run concord");
        let text = String::from_utf8_lossy(if out.status.success() { &out.stdout } else { &out.stderr }).to_string();
        assert!(out.status.success(), "concord {args:?}: {text}");
        text
    };
    let nodes = || -> Vec<serde_json::Value> { serde_json::from_str(&run(&["nodes", "-w", "json"])).expect("json") };
    // Every member has announced its labels.
    let labelled = eventually(Duration::from_secs(20), || async {
        let n = nodes();
        (n.len() == 4 && n.iter().all(|m| m["zone"] != "")).then_some(n)
    })
    .await
    .expect("every member announces its zone");
    let ring = Ring::new(labelled.iter().map(|m| Node {
        id: u64::from_str_radix(m["id"].as_str().expect("id"), 16).expect("hex id"),
        zone: m["zone"].as_str().expect("zone").to_string(),
        weight: m["weight"].as_u64().expect("weight") as u32,
    }));
    let zone_of = |id: u64| ring.nodes().iter().find(|n| n.id == id).map(|n| n.zone.clone()).expect("a member");

    let mut expected = Placement::new();
    for group in 2..=9u64 {
        let count = if group == 9 { 2 } else { 3 };
        let created = run(&["group", "create", &group.to_string(), "--replica-count", &count.to_string()]);
        let replicas: Vec<u64> = created
            .trim()
            .rsplit(", ")
            .next()
            .expect("replicas")
            .split(' ')
            .map(|h| u64::from_str_radix(h, 16).expect("hex"))
            .collect();
        expected.insert(group, Vec::new());
        let placed = rebalance(&ring, &expected, count)[&group].clone();
        assert_eq!(replicas, placed, "group {group} is where placement puts it");
        expected.insert(group, placed);
        let mut distinct = replicas.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), count, "group {group}: {created}");
        let mut spanned: Vec<String> = replicas.iter().map(|r| zone_of(*r)).collect();
        spanned.sort();
        spanned.dedup();
        assert_eq!(spanned, ["east", "west"], "group {group} spans both zones");
    }

    // Replica counts add up (every member also holds the etcd store's group),
    // and once every group has a leader, leader counts do too.
    let listed = eventually(Duration::from_secs(30), || async {
        let n = nodes();
        let leaders: u64 = n.iter().map(|m| m["leaders"].as_u64().unwrap_or(0)).sum();
        (leaders == 9).then_some(n)
    })
    .await
    .expect("every group's leader is reported");
    let replicas: u64 = listed.iter().map(|m| m["replicas"].as_u64().expect("replicas")).sum();
    assert_eq!(replicas, 7 * 3 + 2 + 4);
    for m in &listed {
        let id = u64::from_str_radix(m["id"].as_str().expect("id"), 16).expect("hex");
        let held = expected.values().filter(|r| r.contains(&id)).count() as u64 + 1;
        assert_eq!(m["replicas"].as_u64(), Some(held), "{m}");
    }
    let table = run(&["nodes"]);
    assert!(table.contains("ZONE") && table.contains("east") && table.contains("west"), "{table}");
}
