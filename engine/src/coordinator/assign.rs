//! Expert assignment: which nodes host (and train) which routed experts in a round.
//!
//! Rules, in order:
//! 1. every routed expert gets `replication` distinct hosts (fewer only if fewer members exist: that is an
//!    error, so the coordinator waits for more members instead);
//! 2. hosts of the previous round that are still members keep their experts (a node keeps the shards it has
//!    already downloaded), so only experts whose hosts left move;
//! 3. new hosts are picked to balance load against declared capacity: the node with the lowest
//!    `(load + 1) / throughput` that still has a free slot (`Capacity::max_shards`) wins, but not a node
//!    `barred` from that expert (a holder just outvoted on it) while another node has room;
//! 4. ties, and the order in which experts are filled, come from a hash of the round seed, so the result is a
//!    pure function of (members, experts, previous assignment, seed).

use std::collections::{BTreeMap, BTreeSet};

use mana_protocol::{Capacity, PublicKey, ShardId};
use thiserror::Error;

/// Who hosts each expert: expert -> hosts, hosts sorted by key.
pub type ExpertHosts = BTreeMap<ShardId, Vec<PublicKey>>;

/// Why no assignment exists for these members.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AssignError {
    /// Fewer members than the replication factor: some expert could not get enough distinct hosts.
    #[error("{members} members cannot give each expert {replication} distinct hosts")]
    TooFewMembers {
        /// Members available.
        members: usize,
        /// Hosts required per expert.
        replication: usize,
    },
    /// The members' free slots (`max_shards`) do not cover experts x replication.
    #[error("members offer {slots} expert slots, {needed} are needed")]
    NotEnoughSlots {
        /// Slots offered in total.
        slots: u64,
        /// Slots needed.
        needed: u64,
    },
}

/// A member as the assignment sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// The node.
    pub node: PublicKey,
    /// What it declared.
    pub capacity: Capacity,
    /// Slots its other duties (the trunk) already take out of `capacity.max_shards`.
    pub reserved_slots: u32,
}

impl Candidate {
    fn slots(&self) -> u32 {
        self.capacity.max_shards.saturating_sub(self.reserved_slots)
    }

    /// Throughput used as the balancing weight; a node that declares none (or garbage) counts as 1 token/s,
    /// so it still gets a share rather than a division by zero.
    fn weight(&self) -> f64 {
        let t = f64::from(self.capacity.tokens_per_second);
        if t.is_finite() && t > 0.0 { t } else { 1.0 }
    }
}

/// A deterministic 64-bit tiebreak from the seed and some bytes.
pub(crate) fn mix(seed: u64, tag: &[u8], bytes: &[u8]) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(tag);
    h.update(bytes);
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

fn shard_bytes(shard: &ShardId) -> Vec<u8> {
    shard.to_string().into_bytes()
}

/// Assigns `replication` hosts to each of `experts` among `candidates`, keeping `previous` hosts that are still
/// candidates, and giving an expert to a node `barred` from it only when no other node has room.
/// Deterministic: the order of `candidates` and `experts` does not matter, only their content and `seed`.
pub fn assign_experts(
    candidates: &[Candidate],
    experts: &[ShardId],
    replication: usize,
    previous: &ExpertHosts,
    barred: &ExpertHosts,
    seed: u64,
) -> Result<ExpertHosts, AssignError> {
    let experts: BTreeSet<ShardId> = experts.iter().copied().collect();
    let by_node: BTreeMap<PublicKey, &Candidate> = candidates.iter().map(|c| (c.node, c)).collect();
    if experts.is_empty() {
        return Ok(ExpertHosts::new());
    }
    if by_node.len() < replication {
        return Err(AssignError::TooFewMembers {
            members: by_node.len(),
            replication,
        });
    }
    let slots: u64 = by_node.values().map(|c| u64::from(c.slots())).sum();
    let needed = (experts.len() as u64).saturating_mul(replication as u64);
    if slots < needed {
        return Err(AssignError::NotEnoughSlots { slots, needed });
    }

    let mut load: BTreeMap<PublicKey, u32> = by_node.keys().map(|k| (*k, 0)).collect();
    let mut hosts: ExpertHosts = experts.iter().map(|e| (*e, Vec::new())).collect();

    // Sticky pass: surviving previous hosts keep their experts while they have room.
    for (expert, old) in previous {
        let Some(list) = hosts.get_mut(expert) else {
            continue;
        };
        let mut old: Vec<PublicKey> = old.clone();
        old.sort();
        old.dedup();
        for node in old {
            if list.len() >= replication {
                break;
            }
            let (Some(c), Some(l)) = (by_node.get(&node), load.get_mut(&node)) else {
                continue;
            };
            if *l < c.slots() {
                *l += 1;
                list.push(node);
            }
        }
    }

    // Fill pass: experts in seeded order, one replica at a time, so early experts don't take all the fast
    // nodes' slots before later ones get a first host. It looks at every candidate for every replica (at a
    // thousand participants and the 1B preset's 1,408 experts, some 3 million looks a round), so the
    // candidates are taken by index, in key order, with their load, free slots and weight side by side.
    let mut order: Vec<ShardId> = experts.iter().copied().collect();
    order.sort_by_key(|e| (mix(seed, b"expert-order", &shard_bytes(e)), *e));
    let nodes: Vec<&Candidate> = by_node.values().copied().collect();
    let slots: Vec<u32> = nodes.iter().map(|c| c.slots()).collect();
    let weights: Vec<f64> = nodes.iter().map(|c| c.weight()).collect();
    let mut loads: Vec<u32> = nodes
        .iter()
        .map(|c| load.get(&c.node).copied().unwrap_or(0))
        .collect();
    for _ in 0..replication {
        for expert in &order {
            let list = hosts
                .get_mut(expert)
                .expect("invariant: hosts has an entry for every expert");
            if list.len() >= replication {
                continue;
            }
            let room = |i: usize| loads[i] < slots[i] && !list.contains(&nodes[i].node);
            let bar = barred.get(expert).map(Vec::as_slice).unwrap_or(&[]);
            let unbarred = |i: usize| room(i) && !bar.contains(&nodes[i].node);
            // A barred node only when nobody else has room.
            let free: Vec<bool> = if bar.is_empty() || (0..nodes.len()).any(unbarred) {
                (0..nodes.len()).map(unbarred).collect()
            } else {
                (0..nodes.len()).map(room).collect()
            };
            let cost = |i: usize| f64::from(loads[i] + 1) / weights[i];
            // The lowest cost wins; among equal costs, the lowest seeded hash of the expert and the node, then
            // the lowest key (each hash computed once, and only for the tied).
            let lowest = (0..nodes.len())
                .filter(|i| free[*i])
                .map(cost)
                .min_by(f64::total_cmp);
            let tag = shard_bytes(expert);
            let best = lowest.and_then(|lowest| {
                (0..nodes.len())
                    .filter(|i| free[*i] && cost(*i).total_cmp(&lowest).is_eq())
                    .min_by_key(|i| (mix(seed, &tag, &nodes[*i].node.0), nodes[*i].node))
            });
            // Enough members and slots were checked above, but slots may sit on nodes that already host this
            // expert; report that as too few members rather than panicking.
            let Some(best) = best else {
                return Err(AssignError::TooFewMembers {
                    members: by_node.len(),
                    replication,
                });
            };
            loads[best] += 1;
            list.push(nodes[best].node);
        }
    }
    for list in hosts.values_mut() {
        list.sort();
    }
    Ok(hosts)
}

/// Inverts an assignment: node -> the experts it hosts, sorted.
pub fn experts_by_node(hosts: &ExpertHosts) -> BTreeMap<PublicKey, Vec<ShardId>> {
    let mut out: BTreeMap<PublicKey, Vec<ShardId>> = BTreeMap::new();
    for (expert, nodes) in hosts {
        for n in nodes {
            out.entry(*n).or_default().push(*expert);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mana_protocol::DeviceKind;

    fn key(i: u8) -> PublicKey {
        PublicKey([i; 32])
    }

    fn cand(i: u8, tps: f32, max_shards: u32) -> Candidate {
        Candidate {
            node: key(i),
            capacity: Capacity {
                device: DeviceKind::Cpu,
                memory_bytes: 1 << 30,
                tokens_per_second: tps,
                max_shards,
            },
            reserved_slots: 0,
        }
    }

    fn experts(layers: u16, per_layer: u16) -> Vec<ShardId> {
        (0..layers)
            .flat_map(|l| (0..per_layer).map(move |i| ShardId::Expert { layer: l, index: i }))
            .collect()
    }

    #[test]
    fn every_expert_gets_r_distinct_hosts_and_load_follows_capacity() {
        // Throughputs 1:1:2:4 over 64 experts x 2 replicas = 128 slots: ideal loads 16, 16, 32, 64.
        let cands = [
            cand(1, 100.0, 1000),
            cand(2, 100.0, 1000),
            cand(3, 200.0, 1000),
            cand(4, 400.0, 1000),
        ];
        let ex = experts(2, 32);
        let hosts =
            assign_experts(&cands, &ex, 2, &ExpertHosts::new(), &ExpertHosts::new(), 7).unwrap();
        assert_eq!(hosts.len(), ex.len());
        for (e, h) in &hosts {
            assert_eq!(h.len(), 2, "{e}");
            assert_ne!(h[0], h[1], "{e} has the same host twice");
        }
        let by_node = experts_by_node(&hosts);
        let loads: Vec<usize> = (1..=4)
            .map(|i| by_node.get(&key(i)).map_or(0, Vec::len))
            .collect();
        // One replica of an expert cannot go to the node holding the other, so allow a few slots of slack.
        for (load, ideal) in loads.iter().zip([16usize, 16, 32, 64]) {
            assert!(
                load.abs_diff(ideal) <= 2,
                "loads {loads:?} vs ideal 16/16/32/64"
            );
        }
    }

    #[test]
    fn max_shards_is_respected() {
        let cands = [cand(1, 1000.0, 3), cand(2, 1.0, 100), cand(3, 1.0, 100)];
        let hosts = assign_experts(
            &cands,
            &experts(1, 10),
            2,
            &ExpertHosts::new(),
            &ExpertHosts::new(),
            1,
        )
        .unwrap();
        assert_eq!(experts_by_node(&hosts)[&key(1)].len(), 3);
    }

    #[test]
    fn same_inputs_same_assignment_regardless_of_order() {
        let mut cands = vec![
            cand(1, 10.0, 50),
            cand(2, 20.0, 50),
            cand(3, 30.0, 50),
            cand(9, 5.0, 50),
        ];
        let ex = experts(3, 8);
        let a =
            assign_experts(&cands, &ex, 2, &ExpertHosts::new(), &ExpertHosts::new(), 42).unwrap();
        cands.reverse();
        let mut ex_rev = ex.clone();
        ex_rev.reverse();
        let b = assign_experts(
            &cands,
            &ex_rev,
            2,
            &ExpertHosts::new(),
            &ExpertHosts::new(),
            42,
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn experts_whose_hosts_left_are_reassigned_and_the_rest_stay() {
        let cands = [
            cand(1, 10.0, 100),
            cand(2, 10.0, 100),
            cand(3, 10.0, 100),
            cand(4, 10.0, 100),
        ];
        let ex = experts(1, 16);
        let before =
            assign_experts(&cands, &ex, 2, &ExpertHosts::new(), &ExpertHosts::new(), 3).unwrap();
        // Nodes 1 and 2 leave: experts hosted only by them must move; every other host stays put.
        let left = [key(1), key(2)];
        let after = assign_experts(&cands[2..], &ex, 2, &before, &ExpertHosts::new(), 4).unwrap();
        let mut orphaned = 0;
        for (e, old) in &before {
            let new = &after[e];
            assert_eq!(new.len(), 2, "{e}");
            assert!(
                new.iter().all(|n| !left.contains(n)),
                "{e} still on a departed node"
            );
            for survivor in old.iter().filter(|n| !left.contains(n)) {
                assert!(new.contains(survivor), "{e} moved away from surviving host");
            }
            orphaned += usize::from(old.iter().all(|n| left.contains(n)));
        }
        assert!(
            orphaned > 0,
            "the test should cover experts whose hosts all left"
        );
    }

    #[test]
    fn too_few_members_or_slots_is_an_error() {
        let ex = experts(1, 4);
        assert_eq!(
            assign_experts(
                &[cand(1, 1.0, 10)],
                &ex,
                2,
                &ExpertHosts::new(),
                &ExpertHosts::new(),
                0
            ),
            Err(AssignError::TooFewMembers {
                members: 1,
                replication: 2
            })
        );
        assert_eq!(
            assign_experts(
                &[cand(1, 1.0, 2), cand(2, 1.0, 2)],
                &ex,
                2,
                &ExpertHosts::new(),
                &ExpertHosts::new(),
                0
            ),
            Err(AssignError::NotEnoughSlots {
                slots: 4,
                needed: 8
            })
        );
    }

    /// The fill pass as first written (every comparison looks both nodes up and hashes both), kept as the
    /// oracle the indexed one must match pick for pick.
    fn fill_as_first_written(
        candidates: &[Candidate],
        experts: &[ShardId],
        replication: usize,
        seed: u64,
    ) -> ExpertHosts {
        let by_node: BTreeMap<PublicKey, &Candidate> =
            candidates.iter().map(|c| (c.node, c)).collect();
        let mut load: BTreeMap<PublicKey, u32> = by_node.keys().map(|k| (*k, 0)).collect();
        let mut hosts: ExpertHosts = experts.iter().map(|e| (*e, Vec::new())).collect();
        let mut order: Vec<ShardId> = experts.to_vec();
        order.sort_by_key(|e| (mix(seed, b"expert-order", &shard_bytes(e)), *e));
        for _ in 0..replication {
            for expert in &order {
                let list = hosts.get_mut(expert).unwrap();
                let best = by_node
                    .values()
                    .filter(|c| !list.contains(&c.node) && load[&c.node] < c.slots())
                    .min_by(|a, b| {
                        let la = f64::from(load[&a.node] + 1) / a.weight();
                        let lb = f64::from(load[&b.node] + 1) / b.weight();
                        la.total_cmp(&lb).then_with(|| {
                            let ta = mix(seed, &shard_bytes(expert), &a.node.0);
                            let tb = mix(seed, &shard_bytes(expert), &b.node.0);
                            ta.cmp(&tb).then(a.node.cmp(&b.node))
                        })
                    })
                    .unwrap();
                *load.get_mut(&best.node).unwrap() += 1;
                list.push(best.node);
            }
        }
        for list in hosts.values_mut() {
            list.sort();
        }
        hosts
    }

    #[test]
    fn the_indexed_fill_picks_what_the_first_one_picked() {
        // Equal throughputs (ties everywhere, broken by the hash), mixed ones, and tight slots.
        let equal: Vec<Candidate> = (1..=40).map(|i| cand(i, 50.0, 1000)).collect();
        let mixed: Vec<Candidate> = (1..=40)
            .map(|i| cand(i, f32::from(i % 7 + 1) * 25.0, 1000))
            .collect();
        let tight: Vec<Candidate> = (1..=40)
            .map(|i| cand(i, f32::from(i % 3 + 1), u32::from(i % 5) + 5))
            .collect();
        let ex = experts(4, 24);
        for (name, cands) in [("equal", &equal), ("mixed", &mixed), ("tight", &tight)] {
            for seed in 0..6 {
                let fast = assign_experts(
                    cands,
                    &ex,
                    2,
                    &ExpertHosts::new(),
                    &ExpertHosts::new(),
                    seed,
                )
                .unwrap();
                assert_eq!(
                    fast,
                    fill_as_first_written(cands, &ex, 2, seed),
                    "{name}, seed {seed}"
                );
            }
        }
    }
}
