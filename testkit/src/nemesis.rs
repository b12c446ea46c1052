//! The nemesis: faults injected into a running [`ProcessCluster`] on a seeded
//! schedule, while a workload runs.
//!
//! Each step picks one fault, holds it for 2–4 s, undoes it (heal the network,
//! SIGCONT, restart, add the member back) and lets the cluster settle for 1–2 s.
//! Membership faults are drawn only with [`Options::membership`]. Network faults need
//! the cluster to run in namespaces ([`ClusterOptions::netns`](crate::ClusterOptions));
//! without one only process faults are drawn. Every fault is undone before
//! [`run`] returns, also when the schedule ends mid-step.

use std::time::{Duration, Instant};

use crate::workload::SeededRng;
use crate::ProcessCluster;

/// One fault, with the members it hits.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// The given minority is cut off from the rest, both ways.
    Partition { minority: Vec<usize> },
    /// The current leader alone on one side.
    IsolateLeader { leader: usize },
    /// Packets from `from` to `to` are dropped; the other direction works.
    OneWay { from: usize, to: usize },
    /// Every packet between members is dropped with this probability.
    Loss { probability: f64 },
    /// SIGSTOP, later SIGCONT.
    Pause { member: usize },
    /// SIGKILL, later a restart on the same data dir.
    Kill { member: usize },
    /// `MemberRemove` (the member stops by itself), its data dir wiped; later
    /// `MemberAdd` of the same peer URL and a start as a new, empty member.
    Replace { member: usize },
}

/// Which faults a run may draw.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Also remove members and add them back empty (the register and watch
    /// checks do not depend on which members exist).
    pub membership: bool,
}

/// What a nemesis run did: every fault with its start (ms since the epoch).
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub faults: Vec<(u64, Fault)>,
}

/// Injects faults into `cluster` until `duration` has passed; returns what it did.
pub async fn run(
    cluster: &mut ProcessCluster,
    seed: u64,
    duration: Duration,
    epoch: Instant,
    options: &Options,
) -> Report {
    let mut rng = SeededRng::new(seed);
    let mut report = Report::default();
    let deadline = Instant::now() + duration;
    let n = cluster.members.len();
    while Instant::now() < deadline {
        let fault = pick(cluster, &mut rng, n, options).await;
        let at_ms = epoch.elapsed().as_millis() as u64;
        eprintln!("nemesis @{at_ms} ms: {fault:?}");
        apply(cluster, &fault).await;
        report.faults.push((at_ms, fault.clone()));
        tokio::time::sleep(Duration::from_millis(2000 + rng.below(2000))).await;
        undo(cluster, &fault).await;
        eprintln!("nemesis @{} ms: healed", epoch.elapsed().as_millis());
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(1000))).await;
    }
    report
}

async fn pick(cluster: &ProcessCluster, rng: &mut SeededRng, n: usize, options: &Options) -> Fault {
    let mut kinds = vec![0, 1];
    if options.membership {
        kinds.push(6);
    }
    if cluster.network.is_some() {
        kinds.extend([2, 3, 4, 5]);
    }
    let random_member = |rng: &mut SeededRng| rng.below(n as u64) as usize;
    match kinds[rng.below(kinds.len() as u64) as usize] {
        0 => Fault::Pause { member: random_member(rng) },
        1 => Fault::Kill { member: random_member(rng) },
        6 => Fault::Replace { member: random_member(rng) },
        2 => {
            let mut members: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                members.swap(i, rng.below(i as u64 + 1) as usize);
            }
            members.truncate((n - 1) / 2);
            members.sort_unstable();
            Fault::Partition { minority: members }
        }
        3 => match cluster.leader_index().await {
            Some(leader) => Fault::IsolateLeader { leader },
            None => Fault::Partition { minority: vec![random_member(rng)] },
        },
        4 => {
            let from = random_member(rng);
            let to = (from + 1 + rng.below(n as u64 - 1) as usize) % n;
            Fault::OneWay { from, to }
        }
        _ => Fault::Loss { probability: 0.2 },
    }
}

async fn apply(cluster: &mut ProcessCluster, fault: &Fault) {
    let n = cluster.members.len();
    let net = || cluster.network.as_ref().expect("network faults need ClusterOptions::netns");
    let applied = match fault {
        Fault::Partition { minority } => {
            let rest = (0..n).filter(|i| !minority.contains(i)).collect();
            net().partition(&[minority.clone(), rest])
        }
        Fault::IsolateLeader { leader } => {
            let rest = (0..n).filter(|i| i != leader).collect();
            net().partition(&[vec![*leader], rest])
        }
        Fault::OneWay { from, to } => net().block(*from, *to),
        Fault::Loss { probability } => net().lose(*probability),
        Fault::Pause { member } => {
            cluster.pause(*member);
            Ok(())
        }
        Fault::Kill { member } => {
            cluster.kill(*member);
            Ok(())
        }
        Fault::Replace { member } => remove_member(cluster, *member).await,
    };
    applied.unwrap_or_else(|e| panic!("inject {fault:?}: {e}"));
}

/// A client of some running member other than `not`, retried for a while (the
/// cluster may be electing).
async fn admin_client(cluster: &ProcessCluster, not: usize) -> std::io::Result<etcd_client::Client> {
    for i in (0..cluster.members.len()).cycle().take(cluster.members.len() * 20) {
        if i != not && cluster.members[i].is_running() {
            if let Ok(c) = cluster.try_client(i).await {
                return Ok(c);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(std::io::Error::other("no running member to administer the cluster through"))
}

/// The member ID of the member with peer URL `url`. MemberList is served from
/// a member's own registry (as in etcd 3.4), and a member that just joined may
/// not list everyone yet: ask every other running member, a few times.
async fn member_id(cluster: &ProcessCluster, member: usize, url: &str) -> std::io::Result<u64> {
    for _ in 0..20 {
        for i in (0..cluster.members.len()).filter(|&i| i != member && cluster.members[i].is_running()) {
            let Ok(mut c) = cluster.try_client(i).await else {
                continue;
            };
            if let Ok(list) = c.member_list().await {
                if let Some(m) = list.members().iter().find(|m| m.peer_urls().iter().any(|u| u == url)) {
                    return Ok(m.id());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(std::io::Error::other(format!("no member lists {url}")))
}

/// Makes a membership change, up to `attempts` tries 500 ms apart. The refusal
/// `done` (e.g. "member not found" for a removal) counts as success only after an
/// attempt whose outcome was unknown (e.g. it timed out): that attempt took effect.
async fn change_membership<F, Fut>(attempts: usize, done: &str, mut call: F) -> std::io::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), etcd_client::Error>>,
{
    let mut last = Err(std::io::Error::other("not tried"));
    let mut uncertain = false;
    for _ in 0..attempts {
        last = match call().await {
            Ok(()) => return Ok(()),
            Err(e) if uncertain && e.to_string().contains(done) => return Ok(()),
            Err(e) => {
                uncertain |= !e.to_string().contains(done);
                Err(std::io::Error::other(e))
            }
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    last
}

async fn remove_member(cluster: &mut ProcessCluster, member: usize) -> std::io::Result<()> {
    let url = cluster.peer_url(member);
    let id = member_id(cluster, member, &url).await?;
    let client = admin_client(cluster, member).await?;
    change_membership(10, "member not found", || {
        let mut c = client.clone();
        async move { c.member_remove(id).await.map(|_| ()) }
    })
    .await?;
    // A removed member stops by itself once it learns of its removal; one cut
    // off from the others may never learn it.
    if cluster.wait_exit(member, Duration::from_secs(10)).is_none() {
        cluster.kill(member);
    }
    let dir = cluster.members[member].data_dir.clone();
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

async fn add_member_back(cluster: &mut ProcessCluster, member: usize) -> std::io::Result<()> {
    let url = cluster.peer_url(member);
    let client = admin_client(cluster, member).await?;
    change_membership(20, "Peer URLs already exists", || {
        let (mut c, url) = (client.clone(), url.clone());
        async move { c.member_add([url.as_str()], None).await.map(|_| ()) }
    })
    .await?;
    cluster.members[member].joining = true;
    cluster.restart(member);
    Ok(())
}

async fn undo(cluster: &mut ProcessCluster, fault: &Fault) {
    match fault {
        Fault::Pause { member } => cluster.resume(*member),
        Fault::Kill { member } => cluster.restart(*member),
        Fault::Replace { member } => {
            add_member_back(cluster, *member).await.unwrap_or_else(|e| panic!("undo {fault:?}: {e}"));
        }
        _ => {
            let net = cluster.network.as_ref().expect("network faults need ClusterOptions::netns");
            net.heal().unwrap_or_else(|e| panic!("heal after {fault:?}: {e}"));
        }
    }
}
