//! Property tests of placement over seeded random clusters: every seed that
//! fails is printed, `CONCORD_PLACEMENT_SEED=N` runs only that one and
//! `CONCORD_PLACEMENT_SEEDS=N` runs the first N (300 by default).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// Seeds per property.
const SEEDS: u64 = 300;

fn seeds() -> Vec<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|s| s.parse().ok());
    match var("CONCORD_PLACEMENT_SEED") {
        Some(seed) => vec![seed],
        None => (0..var("CONCORD_PLACEMENT_SEEDS").unwrap_or(SEEDS)).collect(),
    }
}

/// A random cluster: node ids as random as member ids, zones equally weighted
/// (so that zone spread never forces a node over its cap), weights 1-3 when
/// there is one zone.
struct Case {
    nodes: Vec<Node>,
    items: Vec<ItemId>,
    replicas: usize,
}

fn case(seed: u64, min_nodes: usize) -> Case {
    let mut rng = StdRng::seed_from_u64(seed);
    let zones = rng.random_range(1..=3usize);
    let per_zone = rng.random_range(min_nodes.div_ceil(zones).max(1)..=3);
    let weighted = zones == 1 && rng.random_bool(0.5);
    let mut nodes = Vec::new();
    for z in 0..zones {
        for _ in 0..per_zone {
            let weight = if weighted { rng.random_range(1..=3) } else { 1 };
            nodes.push(Node { id: rng.random(), zone: format!("zone-{z}"), weight });
        }
    }
    let items = (0..rng.random_range(1..=200u64)).map(|i| i + 2).collect();
    Case { nodes, items, replicas: rng.random_range(1..=5) }
}

fn loads(p: &Placement) -> BTreeMap<NodeId, u64> {
    let mut l = BTreeMap::new();
    for nodes in p.values() {
        for n in nodes {
            *l.entry(*n).or_default() += 1;
        }
    }
    l
}

/// ⌈1.25 × weighted share⌉, as the module computes it.
fn cap(ring: &Ring, node: &Node, total: u64) -> u64 {
    (total * u64::from(node.weight) * 5).div_ceil(ring.total_weight * 4)
}

fn check_invariants(seed: u64, ring: &Ring, p: &Placement, replicas: usize) {
    let r = replicas.min(ring.nodes().len());
    let zones = ring.zones;
    for (item, nodes) in p {
        let mut distinct = nodes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), r, "seed {seed}: item {item} has {nodes:?}, want {r} distinct");
        let mut z: Vec<&str> =
            nodes.iter().map(|id| ring.nodes().iter().find(|n| n.id == *id).expect("on ring").zone.as_str()).collect();
        z.sort_unstable();
        z.dedup();
        assert_eq!(z.len(), r.min(zones), "seed {seed}: item {item} spans zones {z:?}");
    }
    // The cap binds where it can: a node holds each item at most once, so a
    // node whose cap is at least the item count (its weight is that large a
    // part of all) leaves the others to hold more than their shares.
    let total = (p.len() * r) as u64;
    let room = ring.nodes().iter().all(|n| cap(ring, n, total) < p.len() as u64);
    // Zone spread beats the cap: only zones of equal weight leave the cap free.
    let mut zone_weight: BTreeMap<&str, u64> = BTreeMap::new();
    for n in ring.nodes() {
        *zone_weight.entry(n.zone.as_str()).or_default() += u64::from(n.weight);
    }
    let even_zones = zone_weight.values().min() == zone_weight.values().max();
    if !room || (zones > 1 && r > 1 && !even_zones) {
        return;
    }
    for (id, load) in loads(p) {
        let node = ring.nodes().iter().find(|n| n.id == id).expect("on ring");
        assert!(load <= cap(ring, node, total), "seed {seed}: node {id:x} holds {load} > cap");
    }
}

#[test]
fn placements_are_distinct_spread_over_zones_and_capped() {
    for seed in seeds() {
        let c = case(seed, 1);
        let ring = Ring::new(c.nodes.clone());
        let p = place(&ring, c.items.iter().copied(), c.replicas);
        check_invariants(seed, &ring, &p, c.replicas);
    }
}

#[test]
fn placement_depends_on_the_nodes_not_on_their_order() {
    for seed in seeds() {
        let c = case(seed, 1);
        let mut shuffled = c.nodes.clone();
        shuffled.reverse();
        let a = place(&Ring::new(c.nodes.clone()), c.items.iter().copied(), c.replicas);
        let b = place(&Ring::new(shuffled), c.items.iter().rev().copied(), c.replicas);
        assert_eq!(a, b, "seed {seed}");
    }
}

#[test]
fn rebalancing_a_balanced_placement_moves_nothing() {
    for seed in seeds() {
        let c = case(seed, 1);
        let ring = Ring::new(c.nodes.clone());
        let p = place(&ring, c.items.iter().copied(), c.replicas);
        assert_eq!(rebalance(&ring, &p, c.replicas), p, "seed {seed}");
    }
}

#[test]
fn a_leaving_node_moves_only_its_replicas() {
    for seed in seeds() {
        let c = case(seed, 2);
        let ring = Ring::new(c.nodes.clone());
        let before = place(&ring, c.items.iter().copied(), c.replicas);
        let leaver = c.nodes[(seed as usize) % c.nodes.len()].id;
        let rest: Vec<Node> = c.nodes.iter().filter(|n| n.id != leaver).cloned().collect();
        let smaller = Ring::new(rest);
        let after = rebalance(&smaller, &before, c.replicas);
        check_invariants(seed, &smaller, &after, c.replicas);
        let r_before = c.replicas.min(c.nodes.len());
        let r_after = c.replicas.min(c.nodes.len() - 1);
        if r_before != r_after {
            continue; // fewer nodes than replicas: every item just loses one
        }
        let mut moved_items = 0;
        for (item, nodes) in &after {
            let old = &before[item];
            let new: Vec<&NodeId> = nodes.iter().filter(|n| !old.contains(n)).collect();
            if old.contains(&leaver) {
                assert_eq!(new.len(), 1, "seed {seed}: item {item} {old:?} -> {nodes:?}");
                moved_items += 1;
            } else {
                assert!(new.is_empty(), "seed {seed}: item {item} moved without the leaver: {old:?} -> {nodes:?}");
            }
        }
        assert_eq!(moved_items, loads(&before).get(&leaver).copied().unwrap_or(0) as usize, "seed {seed}");
    }
}

#[test]
fn a_joining_node_draws_about_its_share_and_nothing_else_moves() {
    for seed in seeds() {
        let c = case(seed, 1);
        let ring = Ring::new(c.nodes.clone());
        let before = place(&ring, c.items.iter().copied(), c.replicas);
        let mut rng = StdRng::seed_from_u64(seed ^ 0xabcd);
        let zone = c.nodes[rng.random_range(0..c.nodes.len())].zone.clone();
        let joiner = Node { id: rng.random(), zone, weight: 1 };
        let mut grown = c.nodes.clone();
        grown.push(joiner.clone());
        let bigger = Ring::new(grown.clone());
        let after = rebalance(&bigger, &before, c.replicas);
        if c.replicas > c.nodes.len() {
            continue; // the joiner adds a replica to every item
        }
        check_invariants(seed, &bigger, &after, c.replicas);
        let total = (c.items.len() * c.replicas) as u64;
        let bound = (total * 5).div_ceil(4 * grown.len() as u64);
        let moved = moved(&before, &after) as u64;
        assert!(moved <= bound, "seed {seed}: a join moved {moved} replicas, bound {bound}");
        for (item, nodes) in &after {
            for n in nodes.iter().filter(|n| !before[item].contains(n)) {
                assert_eq!(*n, joiner.id, "seed {seed}: item {item} moved to a node other than the joiner");
            }
        }
    }
}

/// With enough replicas per node, every node ends within ±25% of its share,
/// after joins and leaves alike (in one zone: zones of unequal weight force
/// their nodes' loads apart).
#[test]
fn loads_stay_within_a_quarter_of_each_share() {
    for seed in seeds() {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut nodes: Vec<Node> = (0..rng.random_range(3..=6))
            .map(|_| Node { id: rng.random(), zone: "zone-0".to_string(), weight: 1 })
            .collect();
        let items: Vec<ItemId> = (2..rng.random_range(150..400)).collect();
        let mut p = place(&Ring::new(nodes.clone()), items.iter().copied(), 3);
        for step in 0..4 {
            if step % 2 == 0 {
                nodes.push(Node { id: rng.random(), zone: "zone-0".to_string(), weight: 1 });
            } else {
                nodes.remove(rng.random_range(0..nodes.len()));
            }
            let ring = Ring::new(nodes.clone());
            p = rebalance(&ring, &p, 3);
            check_invariants(seed, &ring, &p, 3);
            let mean = (items.len() * 3) as f64 / nodes.len() as f64;
            for node in &nodes {
                let load = loads(&p).get(&node.id).copied().unwrap_or(0) as f64;
                assert!(
                    (load - mean).abs() <= 0.25 * mean,
                    "seed {seed} step {step}: node {:x} holds {load}, mean {mean:.1}",
                    node.id
                );
            }
        }
    }
}
