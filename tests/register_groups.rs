//! Many Raft groups per node, running a service that is not the etcd store.
//!
//! Three nodes in this process, each with one peer listener (the real peer
//! network: one connection per node pair carries every group, tagged by group
//! id) and one log journal shared by all its groups (the real log store). Every
//! group runs the register service; clients write, compare-and-swap and read on
//! every group at once while some groups lose their leader replica, and each
//! group's history must be linearizable.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord::consensus::log_store::NodeLog;
use concord::consensus::network::PeerService;
use concord::consensus::{GroupConfig, GroupId, GroupRegistry, MemberId, PeerInfo};
use concord::register::Registers;
use concord_testkit::linearizability::{check, initial_writes, Event, Op, Outcome};
use rand::Rng;

const GROUPS: u64 = 8;
const NODES: u64 = 3;
const OP_TIMEOUT: Duration = Duration::from_secs(3);
const RUN: Duration = Duration::from_secs(4);

fn config() -> GroupConfig {
    GroupConfig {
        heartbeat_ms: 50,
        election_timeout_ms: 500,
        snapshot_count: 200,
        snapshot_catchup_entries: 50,
        max_peer_message_bytes: 16 << 20,
        max_request_bytes: 1 << 20,
        peer_tls: None,
        peer_channels: Default::default(),
    }
}

struct Node {
    registers: BTreeMap<GroupId, Registers>,
    /// Where the node's peer service finds its groups.
    registry: GroupRegistry,
    _server: tokio::task::JoinHandle<()>,
}

/// Peer URLs of the nodes (ids 1..=NODES), with their bound listeners.
async fn listeners() -> Vec<(MemberId, String, tokio::net::TcpListener)> {
    let mut out = Vec::new();
    for id in 1..=NODES {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        out.push((id, url, l));
    }
    out
}

async fn start_node(id: MemberId, dir: &std::path::Path, listener: tokio::net::TcpListener) -> Node {
    let log = NodeLog::open(&dir.join("log"), Arc::default()).expect("open the node's journal");
    let registry = GroupRegistry::default();
    let mut registers = BTreeMap::new();
    // One config for all the node's groups: they share its peer connections.
    let config = config();
    for g in 2..2 + GROUPS {
        let store = log.group(g, id).expect("group log");
        let r = Registers::start(id, g, &dir.join(format!("group-{g}")), store, &config).await.expect("start group");
        registry.insert(r.group.clone());
        registers.insert(g, r);
    }
    let router = tonic::transport::Server::builder().add_service(PeerService::server(registry.clone(), 16 << 20));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(async move {
        let _ = router.serve_with_incoming(incoming).await;
    });
    Node { registers, registry, _server: server }
}

/// Replicas the test stopped, as (node, group): clients no longer use them.
type Down = Arc<Mutex<std::collections::HashSet<(MemberId, GroupId)>>>;

/// One client's operations on its group's register, via random nodes whose
/// replica runs. A failed read is left out of the history (it had no effect); a
/// failed write may or may not have happened, and the client pauses after one so
/// that such operations stay few (each one widens the checker's search).
async fn client(
    nodes: Arc<BTreeMap<MemberId, Node>>,
    down: Down,
    group: GroupId,
    client: usize,
    started: Instant,
    history: Arc<Mutex<Vec<Event>>>,
) {
    let key = format!("g{group}");
    let mut next_value = (client as u64) << 32;
    while started.elapsed() < RUN {
        let (via, op) = {
            let mut rng = rand::rng();
            let up: Vec<MemberId> =
                (1..=NODES).filter(|n| !down.lock().expect("down").contains(&(*n, group))).collect();
            let via = up[rng.random_range(0..up.len())];
            next_value += 1;
            let op = match rng.random_range(0..3) {
                0 => Op::Read,
                1 => Op::Write(next_value),
                _ => Op::Cas { expect: next_value - 1, new: next_value },
            };
            (via, op)
        };
        let r = &nodes[&via].registers[&group];
        let invoked = started.elapsed().as_nanos() as u64;
        let outcome = match op {
            Op::Read => r.read(&key, OP_TIMEOUT).await.map(Outcome::Value),
            Op::Write(v) => r.write(&key, v, OP_TIMEOUT).await.map(|()| Outcome::Written),
            Op::Cas { expect, new } => r.cas(&key, Some(expect), new, OP_TIMEOUT).await.map(Outcome::Swapped),
        };
        let completed = started.elapsed().as_nanos() as u64;
        let outcome = match outcome {
            Ok(o) => o,
            Err(_) if op == Op::Read => continue,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Outcome::Unknown
            }
        };
        history.lock().expect("history").push(Event {
            client,
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
async fn register_groups_stay_linearizable_while_leaders_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bound = listeners().await;
    let members: BTreeMap<MemberId, PeerInfo> =
        bound.iter().map(|(id, url, _)| (*id, PeerInfo { peer_urls: vec![url.clone()] })).collect();
    let mut nodes = BTreeMap::new();
    for (id, _, listener) in bound {
        nodes.insert(id, start_node(id, &dir.path().join(format!("node-{id}")), listener).await);
    }
    for r in nodes[&1].registers.values() {
        r.group.raft.initialize(members.clone()).await.expect("initialize");
    }
    let nodes = Arc::new(nodes);
    for g in 2..2 + GROUPS {
        let r = &nodes[&1].registers[&g];
        r.write(&format!("g{g}"), 0, Duration::from_secs(10)).await.expect("first write");
    }

    // The writes of 0 above, all complete before anything below starts.
    let history = Arc::new(Mutex::new(initial_writes((2..2 + GROUPS).map(|g| format!("g{g}")), 0)));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    let down = Down::default();
    for g in 2..2 + GROUPS {
        for c in 0..2 {
            clients.spawn(client(nodes.clone(), down.clone(), g, (g as usize) * 10 + c, started, history.clone()));
        }
    }
    // Half the groups lose the replica that leads them, mid-run, as a member's
    // group host stops one: no longer routed to, then stopped.
    tokio::time::sleep(RUN / 3).await;
    let mut stopped = 0;
    for g in (2..2 + GROUPS).step_by(2) {
        let leader = nodes[&1].registers[&g].group.metrics().current_leader;
        if let Some(l) = leader {
            down.lock().expect("down").insert((l, g));
            nodes[&l].registry.remove(g);
            nodes[&l].registers[&g].group.raft.shutdown().await.expect("shutdown");
            stopped += 1;
        }
    }
    while clients.join_next().await.is_some() {}

    let history = history.lock().expect("history").clone();
    for g in 2..2 + GROUPS {
        let of_group: Vec<Event> = history.iter().filter(|e| e.key == format!("g{g}")).cloned().collect();
        let answered = of_group.iter().filter(|e| e.outcome != Outcome::Unknown).count();
        assert!(answered > 10, "group {g}: only {answered} operations answered");
        if let Err(v) = check(&of_group) {
            panic!("group {g}: {v}");
        }
    }
    assert!(stopped >= (GROUPS / 2) - 1, "leaders stopped: {stopped}");
}
