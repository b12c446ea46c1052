//! Placement: which nodes hold the replicas of each replicated item (a range
//! shard, a stream, a catalog group), by consistent hashing with virtual nodes.
//!
//! Each node owns [`VNODES_PER_WEIGHT`] points on a 64-bit ring per unit of its
//! weight. An item's candidates are the nodes met walking clockwise from the
//! item's own point; its replicas are the first candidates that put it in a zone
//! it has no replica in yet (until every zone, or as many as it has replicas, is
//! covered), then the next distinct candidates, skipping any node already at its
//! cap (Cassandra's NetworkTopologyStrategy, with Mirrokni et al.'s bounded loads).
//!
//! What a placement guarantees (the property tests below check each):
//! - It is a pure function of the nodes (id, zone, weight), the items and the
//!   replica count: every member computes the same one. [`hash64`] and
//!   [`VNODES_PER_WEIGHT`] are therefore part of the cluster's format; changing
//!   either would move nearly every replica.
//! - An item's replicas are `min(replicas, nodes)` distinct nodes covering
//!   `min(replicas, zones)` zones.
//! - No node holds more than its cap, ⌈1.25 × its weighted share of all
//!   replicas⌉, unless zone spread leaves no other choice (a zone with too
//!   little weight for the replicas that must live there) or a node's weight is
//!   so large a part of all that its cap reaches the item count (it can hold
//!   each item once, so the others must take more).
//! - [`rebalance`] starts from where replicas are: it keeps every replica on a
//!   node still present, so a node leaving moves only its own replicas; a node
//!   joining draws replicas to itself (those whose walk reaches it first), about
//!   its share, ≈ 1/(N+1) of all, and nothing else moves; a node below 80% of
//!   its share (and more than one replica short) draws replicas from nodes
//!   above theirs. Rebalancing a rebalanced placement changes nothing.

use std::collections::BTreeMap;

/// A node's id (its member id).
pub type NodeId = u64;
/// A placed item's id (a shard's or a group's id).
pub type ItemId = u64;
/// Each item's replicas, first the one earliest on its walk.
pub type Placement = BTreeMap<ItemId, Vec<NodeId>>;

/// Ring points per unit of weight: with 128, a node's share of the ring is
/// within a few percent of its weight's share.
pub const VNODES_PER_WEIGHT: u64 = 128;

/// Largest weight a node may announce (`--weight`): bounds its ring points.
pub const MAX_WEIGHT: u64 = 1000;
/// Longest zone name (`--zone`), in bytes.
pub const MAX_ZONE_BYTES: usize = 128;

/// The bounded-load cap, as a fraction of a node's share: 5/4.
const CAP_NUM: u64 = 5;
const CAP_DEN: u64 = 4;
/// A node below this fraction of its share (4/5) draws replicas from others.
const UNDER_NUM: u64 = 4;
const UNDER_DEN: u64 = 5;

/// Salt that puts items on the ring independently of nodes' points.
const ITEM_SALT: u64 = 0x6a09_e667_f3bc_c909;

/// A node that can hold replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: NodeId,
    /// Failure domain (`--zone`): an item's replicas spread over zones first.
    pub zone: String,
    /// Relative capacity (`--weight`); 0 holds nothing.
    pub weight: u32,
}

/// SplitMix64's finalizer: a fixed bijective mix of 64 bits, the same on every
/// platform and release.
pub fn hash64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The nodes on the hash ring.
#[derive(Debug, Clone)]
pub struct Ring {
    /// In id order; indexes below refer to this list.
    nodes: Vec<Node>,
    /// Zone number of each node (zones numbered in order of name).
    zone_of: Vec<usize>,
    zones: usize,
    /// (position, node index), sorted.
    points: Vec<(u64, usize)>,
    total_weight: u64,
}

impl Ring {
    /// A ring of `nodes` (a node of weight 0, or a repeated id, is left out).
    pub fn new(nodes: impl IntoIterator<Item = Node>) -> Ring {
        let mut nodes: Vec<Node> = nodes.into_iter().filter(|n| n.weight > 0).collect();
        nodes.sort_by_key(|n| n.id);
        nodes.dedup_by_key(|n| n.id);
        let mut zone_names: Vec<&str> = nodes.iter().map(|n| n.zone.as_str()).collect();
        zone_names.sort_unstable();
        zone_names.dedup();
        let zone_of = nodes.iter().map(|n| zone_names.binary_search(&n.zone.as_str()).unwrap_or(0)).collect();
        let zones = zone_names.len();
        let mut points = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let base = hash64(n.id);
            for v in 0..u64::from(n.weight) * VNODES_PER_WEIGHT {
                points.push((hash64(base ^ v), i));
            }
        }
        points.sort_unstable();
        let total_weight = nodes.iter().map(|n| u64::from(n.weight)).sum();
        Ring { nodes, zone_of, zones, points, total_weight }
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    fn index_of(&self, id: NodeId) -> Option<usize> {
        self.nodes.binary_search_by_key(&id, |n| n.id).ok()
    }

    /// Every node once, in the order met walking clockwise from `item`'s point.
    fn walk(&self, item: ItemId) -> Vec<usize> {
        let n = self.nodes.len();
        let start = self.points.partition_point(|p| p.0 < hash64(item ^ ITEM_SALT));
        let mut seen = vec![false; n];
        let mut order = Vec::with_capacity(n);
        for k in 0..self.points.len() {
            let i = self.points[(start + k) % self.points.len()].1;
            if !seen[i] {
                seen[i] = true;
                order.push(i);
                if order.len() == n {
                    break;
                }
            }
        }
        order
    }
}

/// Replica counts against each node's share of `total` replicas.
struct Loads {
    load: Vec<u64>,
    weight: Vec<u64>,
    total: u64,
    total_weight: u64,
}

impl Loads {
    /// ⌈1.25 × share⌉.
    fn cap(&self, i: usize) -> u64 {
        (self.total * self.weight[i] * CAP_NUM).div_ceil(self.total_weight * CAP_DEN)
    }

    /// ⌈share⌉.
    fn share_ceil(&self, i: usize) -> u64 {
        (self.total * self.weight[i]).div_ceil(self.total_weight)
    }

    /// ⌊share⌋.
    fn share_floor(&self, i: usize) -> u64 {
        self.total * self.weight[i] / self.total_weight
    }

    /// Below 80% of its share and more than one replica short of it (one
    /// replica is not worth a move).
    fn underloaded(&self, i: usize) -> bool {
        self.load[i] * self.total_weight * UNDER_DEN < self.total * self.weight[i] * UNDER_NUM
            && (self.load[i] + 1) * self.total_weight < self.total * self.weight[i]
    }

    fn above_share(&self, i: usize) -> bool {
        self.load[i] * self.total_weight > self.total * self.weight[i]
    }
}

/// How full a node may be to take a replica in one filling pass.
#[derive(Clone, Copy)]
enum Limit {
    /// Below 80% of its share: a node left short (by a join, or by holding
    /// none of a leaver's items) takes new replicas before the others, so
    /// that balancing rarely has to move a replica that is where it should be.
    Under,
    /// Below its share (rounded up).
    Share,
    /// Below its cap.
    Cap,
    None,
}

/// One item being placed: its walk and each node's rank on it.
struct Slot {
    item: ItemId,
    walk: Vec<usize>,
    rank: Vec<usize>,
    replicas: Vec<usize>,
}

impl Slot {
    /// Whether adding `node` leaves room to cover `want_zones` zones with `r` replicas.
    fn can_add(&self, ring: &Ring, node: usize, r: usize, want_zones: usize) -> bool {
        let zones = self.zones(ring, &self.replicas);
        let new_zone = self.replicas.iter().all(|&c| ring.zone_of[c] != ring.zone_of[node]);
        let left_after = r - self.replicas.len() - 1;
        new_zone || zones + left_after >= want_zones
    }

    /// Whether replacing replica `from` by `to` keeps as many zones covered.
    fn keeps_zones(&self, ring: &Ring, from: usize, to: usize) -> bool {
        let others = || self.replicas.iter().filter(|&&c| c != from);
        let loses = others().all(|&c| ring.zone_of[c] != ring.zone_of[from]);
        let gains = others().all(|&c| ring.zone_of[c] != ring.zone_of[to]);
        !loses || gains
    }

    fn zones(&self, ring: &Ring, replicas: &[usize]) -> usize {
        let mut z: Vec<usize> = replicas.iter().map(|&i| ring.zone_of[i]).collect();
        z.sort_unstable();
        z.dedup();
        z.len()
    }
}

/// A fresh placement of `items` with `replicas` each on `ring`.
pub fn place(ring: &Ring, items: impl IntoIterator<Item = ItemId>, replicas: usize) -> Placement {
    let empty: Placement = items.into_iter().map(|i| (i, Vec::new())).collect();
    rebalance(ring, &empty, replicas)
}

/// Where the items of `current` should be on `ring`, moving as few replicas as
/// the guarantees in the module docs allow. Replicas on nodes not on the ring
/// are replaced; an item with more than `replicas` keeps those earliest on its walk.
pub fn rebalance(ring: &Ring, current: &Placement, replicas: usize) -> Placement {
    let n = ring.nodes.len();
    if n == 0 {
        return current.keys().map(|&item| (item, Vec::new())).collect();
    }
    let r = replicas.min(n);
    let want_zones = r.min(ring.zones);
    let mut loads = Loads {
        load: vec![0; n],
        weight: ring.nodes.iter().map(|n| u64::from(n.weight)).collect(),
        total: (current.len() * r) as u64,
        total_weight: ring.total_weight,
    };
    // Items in ring order, so that placing them is independent of their ids' order.
    let mut slots: Vec<Slot> = current
        .iter()
        .map(|(&item, nodes)| {
            let walk = ring.walk(item);
            let mut rank = vec![0; n];
            for (k, &i) in walk.iter().enumerate() {
                rank[i] = k;
            }
            let mut kept: Vec<usize> = nodes.iter().filter_map(|&id| ring.index_of(id)).collect();
            kept.sort_by_key(|&i| rank[i]);
            kept.dedup();
            kept.truncate(r);
            for &i in &kept {
                loads.load[i] += 1;
            }
            Slot { item, walk, rank, replicas: kept }
        })
        .collect();
    slots.sort_by_key(|s| (hash64(s.item ^ ITEM_SALT), s.item));

    // Nodes short of 80% of their share take missing replicas first, each the
    // item whose walk reaches it earliest (after a leave, the leaver's items go
    // to the nodes that need them, so no other replica has to move for balance).
    let mut short: Vec<usize> = (0..n).filter(|&i| loads.underloaded(i)).collect();
    short.sort_by_key(|&i| (loads.load[i] * loads.total_weight / loads.weight[i], ring.nodes[i].id));
    for u in short {
        while loads.underloaded(u) {
            let best = slots
                .iter()
                .enumerate()
                .filter(|(_, slot)| {
                    slot.replicas.len() < r && !slot.replicas.contains(&u) && slot.can_add(ring, u, r, want_zones)
                })
                .min_by_key(|(_, slot)| slot.rank[u])
                .map(|(k, _)| k);
            let Some(k) = best else { break };
            slots[k].replicas.push(u);
            loads.load[u] += 1;
        }
    }

    // Fill the rest: new zones first; within that, nodes below 80% of
    // their share first, then below their share, then under their cap, then any.
    for slot in &mut slots {
        let passes = [Limit::Under, Limit::Share, Limit::Cap, Limit::None];
        for (zone_rule, limit) in passes.iter().map(|&l| (true, l)).chain(passes.iter().map(|&l| (false, l))) {
            for k in 0..slot.walk.len() {
                let i = slot.walk[k];
                if slot.replicas.len() >= r {
                    break;
                }
                if slot.replicas.contains(&i) {
                    continue;
                }
                if zone_rule {
                    let new_zone = slot.replicas.iter().all(|&c| ring.zone_of[c] != ring.zone_of[i]);
                    if !new_zone || slot.zones(ring, &slot.replicas) >= want_zones {
                        continue;
                    }
                }
                let full = match limit {
                    Limit::Under => !loads.underloaded(i),
                    Limit::Share => loads.load[i] >= loads.share_ceil(i),
                    Limit::Cap => loads.load[i] >= loads.cap(i),
                    Limit::None => false,
                };
                if full {
                    continue;
                }
                slot.replicas.push(i);
                loads.load[i] += 1;
            }
        }
    }

    // Zone repair: an item kept on too few zones (a zone joined) moves a replica
    // from a repeated zone to the first node of a missing zone under its cap.
    for slot in &mut slots {
        while slot.zones(ring, &slot.replicas) < want_zones {
            let Some(&to) = slot.walk.iter().find(|&&i| {
                slot.replicas.iter().all(|&c| ring.zone_of[c] != ring.zone_of[i]) && loads.load[i] < loads.cap(i)
            }) else {
                break;
            };
            let from = slot
                .replicas
                .iter()
                .copied()
                .filter(|&c| slot.replicas.iter().filter(|&&o| ring.zone_of[o] == ring.zone_of[c]).count() > 1)
                .max_by_key(|&c| slot.rank[c]);
            let Some(from) = from else { break };
            swap(slot, &mut loads, from, to);
        }
    }

    // Balance: each node below 80% of its share draws replicas, up to its share,
    // from nodes above their share holding at least two more; among the items
    // it could take, the one whose walk reaches it earliest, from the fullest donor.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (loads.load[i] * loads.total_weight / loads.weight[i], ring.nodes[i].id));
    for u in order {
        if !loads.underloaded(u) {
            continue;
        }
        while loads.load[u] < loads.share_floor(u) {
            let mut best: Option<(usize, usize, usize)> = None;
            let mut best_key = (usize::MAX, 0u64);
            for (s, slot) in slots.iter().enumerate() {
                if slot.replicas.contains(&u) || slot.rank[u] > best_key.0 {
                    continue;
                }
                for &d in &slot.replicas {
                    // A donor holds more than its share and two more than the
                    // taker: every move evens loads out. (A node short of its
                    // share with no such donor is short because zone spread
                    // puts more replicas elsewhere: moving within its zone would
                    // gain nothing.)
                    if loads.load[d] < loads.load[u] + 2 || !loads.above_share(d) {
                        continue;
                    }
                    if !slot.keeps_zones(ring, d, u) {
                        continue;
                    }
                    let fullness = loads.load[d] * loads.total_weight * 1024 / loads.weight[d].max(1);
                    let key = (slot.rank[u], u64::MAX - fullness);
                    if key < best_key {
                        best_key = key;
                        best = Some((s, d, u));
                    }
                }
            }
            let Some((s, from, to)) = best else { break };
            swap(&mut slots[s], &mut loads, from, to);
        }
    }

    slots
        .into_iter()
        .map(|mut slot| {
            let rank = slot.rank;
            slot.replicas.sort_by_key(|&i| rank[i]);
            (slot.item, slot.replicas.into_iter().map(|i| ring.nodes[i].id).collect())
        })
        .collect()
}

fn swap(slot: &mut Slot, loads: &mut Loads, from: usize, to: usize) {
    for c in &mut slot.replicas {
        if *c == from {
            *c = to;
        }
    }
    loads.load[from] -= 1;
    loads.load[to] += 1;
}

/// Replicas that `after` places on a node `before` did not use for that item.
pub fn moved(before: &Placement, after: &Placement) -> usize {
    after
        .iter()
        .map(|(item, nodes)| {
            let old = before.get(item).map(Vec::as_slice).unwrap_or_default();
            nodes.iter().filter(|n| !old.contains(n)).count()
        })
        .sum()
}

#[cfg(test)]
mod tests;
