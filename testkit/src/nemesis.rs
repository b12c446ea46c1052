//! The nemesis: faults injected into a running [`ProcessCluster`] on a seeded
//! schedule, while a workload runs.
//!
//! Each step picks one fault, holds it for 2–4 s, undoes it (heal the network,
//! SIGCONT, restart) and lets the cluster settle for 1–2 s. Network faults need
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
}

/// What a nemesis run did: every fault with its start (ms since the epoch).
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub faults: Vec<(u64, Fault)>,
}

/// Injects faults into `cluster` until `duration` has passed; returns what it did.
pub async fn run(cluster: &mut ProcessCluster, seed: u64, duration: Duration, epoch: Instant) -> Report {
    let mut rng = SeededRng::new(seed);
    let mut report = Report::default();
    let deadline = Instant::now() + duration;
    let n = cluster.members.len();
    while Instant::now() < deadline {
        let fault = pick(cluster, &mut rng, n).await;
        let at_ms = epoch.elapsed().as_millis() as u64;
        eprintln!("nemesis @{at_ms} ms: {fault:?}");
        apply(cluster, &fault);
        report.faults.push((at_ms, fault.clone()));
        tokio::time::sleep(Duration::from_millis(2000 + rng.below(2000))).await;
        undo(cluster, &fault);
        eprintln!("nemesis @{} ms: healed", epoch.elapsed().as_millis());
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(1000))).await;
    }
    report
}

async fn pick(cluster: &ProcessCluster, rng: &mut SeededRng, n: usize) -> Fault {
    let networked = cluster.network.is_some();
    let kinds = if networked { 6 } else { 2 };
    let random_member = |rng: &mut SeededRng| rng.below(n as u64) as usize;
    match rng.below(kinds) {
        0 => Fault::Pause { member: random_member(rng) },
        1 => Fault::Kill { member: random_member(rng) },
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

fn apply(cluster: &mut ProcessCluster, fault: &Fault) {
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
    };
    applied.unwrap_or_else(|e| panic!("inject {fault:?}: {e}"));
}

fn undo(cluster: &mut ProcessCluster, fault: &Fault) {
    match fault {
        Fault::Pause { member } => cluster.resume(*member),
        Fault::Kill { member } => cluster.restart(*member),
        _ => {
            let net = cluster.network.as_ref().expect("network faults need ClusterOptions::netns");
            net.heal().unwrap_or_else(|e| panic!("heal after {fault:?}: {e}"));
        }
    }
}
