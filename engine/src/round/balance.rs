//! Expert balance across the network: the trunk's holders move the router biases from the loads that every
//! participant reports with its trunk delta, so that experts stay balanced although no node sees the whole
//! model's routing.
//!
//! DeepSeek-V3's auxiliary-loss-free rule moves each expert's router bias by a fixed step towards balance:
//! up if the expert got fewer routed slots than the mean, down if more. One node applies it after every
//! step from its own counts ([`mana_kernels::model::Model::update_router_bias`]). In a round, a participant
//! routes among the experts it holds only ([`super::local`]), so its counts say how its tokens spread over
//! *its* experts, and a bias that each node moved on its own would make the trunk's holders disagree.
//!
//! So the biases are frozen during a participant's training and moved once per round, by every holder of
//! the trunk alike, from the counts of the round's accepted trunk contributions ([`ExpertLoads`], carried
//! in the contribution payload and so bound to the sender's signature):
//! 1. for each participant and MoE layer, its *load ratio* for each expert it held there: the slots that
//!    expert got over the mean slots of the experts it held in that layer (1 is balanced); a participant
//!    that held no expert of the layer, or routed nothing, says nothing about it;
//! 2. an expert's ratio is the **median** of its holders' ratios (a sender that lies about its counts moves
//!    the median only as far as the honest holders beside it allow);
//! 3. its bias moves by the round's `router_bias_gamma` times the optimizer steps the round stands for (1
//!    for `sync`, H for `diloco`): up if the ratio is under 1, down if over, not at all if exactly 1 or
//!    nobody held it. A gamma of 0 keeps the biases frozen.
//!
//! Every step is in a fixed order on integers and f64, so every holder computes the same bytes.

use mana_kernels::model::ShardId;
use mana_protocol::{PublicKey, RoundAnnouncement, UpdateRule};

use super::error::RoundError;
use super::spec::RunSpec;
use super::state::ShardRecord;

/// One accepted trunk contribution's loads: its sender and the routed slots each expert received in its
/// training, in the layout of the trunk's router biases (MoE layers in order, `n_routed_experts` each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertLoads {
    /// Who trained (a participant of the round).
    pub sender: PublicKey,
    /// Routed slots per expert.
    pub counts: Vec<u32>,
}

/// How many values a trunk contribution's loads hold for `spec`'s model (the trunk's router bias length);
/// an expert contribution carries none.
pub fn loads_len(spec: &RunSpec, shard: ShardId) -> usize {
    spec.router_bias_len(shard)
}

/// The step a round moves a bias by: the round's `router_bias_gamma` per optimizer step it stands for.
fn round_step(ann: &RoundAnnouncement) -> f64 {
    let steps = match ann.hyper.update_rule {
        UpdateRule::Sync => 1.0,
        UpdateRule::Diloco => f64::from(ann.inner_steps.max(1)),
    };
    f64::from(ann.hyper.router_bias_gamma) * steps
}

/// Each expert's load ratio in round `ann` (see the module doc), in the router bias layout: `None` for an
/// expert nobody who reported held. Loads of unknown senders, or of the wrong length, are ignored.
pub fn load_ratios(
    spec: &RunSpec,
    ann: &RoundAnnouncement,
    loads: &[ExpertLoads],
) -> Vec<Option<f64>> {
    let e = spec.model.n_routed_experts;
    let moe_layers: Vec<usize> = (0..spec.model.n_layers)
        .filter(|&l| spec.model.is_moe_layer(l))
        .collect();
    let len = moe_layers.len() * e;
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); len];
    // Senders in key order, each once: the medians do not depend on the order the loads came in.
    let mut sorted: Vec<&ExpertLoads> = loads.iter().filter(|l| l.counts.len() == len).collect();
    sorted.sort_by_key(|l| l.sender);
    sorted.dedup_by_key(|l| l.sender);
    for l in sorted {
        let Some(p) = ann.participant(&l.sender) else {
            continue;
        };
        for (m, &layer) in moe_layers.iter().enumerate() {
            let held: Vec<usize> = p
                .shards
                .iter()
                .filter_map(|s| match *s {
                    ShardId::Expert { layer: sl, index }
                        if usize::from(sl) == layer && usize::from(index) < e =>
                    {
                        Some(usize::from(index))
                    }
                    _ => None,
                })
                .collect();
            if held.is_empty() {
                continue;
            }
            let total: u64 = held.iter().map(|&i| u64::from(l.counts[m * e + i])).sum();
            if total == 0 {
                continue;
            }
            let mean = total as f64 / held.len() as f64;
            for &i in &held {
                ratios[m * e + i].push(f64::from(l.counts[m * e + i]) / mean);
            }
        }
    }
    ratios
        .into_iter()
        .map(|mut r| {
            if r.is_empty() {
                return None;
            }
            r.sort_by(f64::total_cmp);
            let n = r.len();
            Some(if n % 2 == 1 {
                r[n / 2]
            } else {
                (r[n / 2 - 1] + r[n / 2]) / 2.0
            })
        })
        .collect()
}

/// Moves the router biases of `trunk` (the round's new trunk state) by the round's loads (see the module
/// doc). Returns how many biases moved.
pub fn balance_router(
    spec: &RunSpec,
    ann: &RoundAnnouncement,
    trunk: &mut ShardRecord,
    loads: &[ExpertLoads],
) -> Result<usize, RoundError> {
    if trunk.shard != ShardId::Trunk {
        return Err(RoundError::settings(
            "balance_router",
            "router biases live in the trunk",
        ));
    }
    let ratios = load_ratios(spec, ann, loads);
    if trunk.router_bias.len() != ratios.len() {
        return Err(RoundError::WrongLength {
            what: "router bias",
            shard: trunk.shard.to_string(),
            expected: ratios.len(),
            got: trunk.router_bias.len(),
        });
    }
    let step = round_step(ann);
    if step == 0.0 {
        return Ok(0);
    }
    let mut moved = 0;
    for (bias, ratio) in trunk.router_bias.iter_mut().zip(ratios) {
        let delta = match ratio {
            Some(r) if r < 1.0 => step,
            Some(r) if r > 1.0 => -step,
            _ => continue,
        };
        *bias = (f64::from(*bias) + delta) as f32;
        moved += 1;
    }
    Ok(moved)
}

/// The largest over the smallest share of routed slots among the experts of one MoE layer, the worst layer
/// of `counts` (per layer, as [`mana_kernels::model::Model::expert_counts`] gives them): how unbalanced a
/// model's routing is (1 is perfect balance; infinite when an expert got nothing).
pub fn imbalance(counts: &[Vec<u64>]) -> f64 {
    counts
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| {
            let max = c.iter().copied().max().unwrap_or(0) as f64;
            let min = c.iter().copied().min().unwrap_or(0) as f64;
            if max == 0.0 { 1.0 } else { max / min }
        })
        .fold(1.0, f64::max)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mana_protocol::{ContentHash, Deadlines, Participant, RunId};

    fn key(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    fn expert(layer: u16, index: u16) -> ShardId {
        ShardId::Expert { layer, index }
    }

    /// The tiny preset, and a round where node 1 holds experts 0 and 1 of the first MoE layer and node 2
    /// holds experts 1 and 2.
    fn setup() -> (RunSpec, RoundAnnouncement, usize, usize) {
        let spec = RunSpec::tiny();
        let layer = (0..spec.model.n_layers)
            .find(|&l| spec.model.is_moe_layer(l))
            .unwrap() as u16;
        let ann = RoundAnnouncement {
            run: RunId::new("balance").unwrap(),
            round: 3,
            base_checkpoint: ContentHash([0; 32]),
            participants: Vec::new(),
            inner_steps: 4,
            hyper: spec.hyper(UpdateRule::Diloco),
            max_norm_ratio: 10.0,
            deadlines: Deadlines {
                deltas_by_ms: 1,
                commit_by_ms: 2,
            },
            corpus: ContentHash([0; 32]),
            seed_commitment: ContentHash([0; 32]),
        };
        let mut ann = ann;
        ann.participants = vec![
            Participant {
                node: key(1),
                shards: vec![ShardId::Trunk, expert(layer, 0), expert(layer, 1)],
                data_seeds: vec![1],
            },
            Participant {
                node: key(2),
                shards: vec![ShardId::Trunk, expert(layer, 1), expert(layer, 2)],
                data_seeds: vec![2],
            },
        ];
        let len = spec.router_bias_len(ShardId::Trunk);
        (spec.clone(), ann, len, spec.model.n_routed_experts)
    }

    fn loads(sender: u8, len: usize, at: &[(usize, u32)]) -> ExpertLoads {
        let mut counts = vec![0; len];
        for &(i, c) in at {
            counts[i] = c;
        }
        ExpertLoads {
            sender: key(sender),
            counts,
        }
    }

    #[test]
    fn an_underloaded_expert_moves_up_and_an_overloaded_one_down() {
        let (spec, ann, len, _) = setup();
        // Node 1 sent 30 slots to expert 0 and 10 to expert 1; node 2 sent 20 and 20 to experts 1 and 2.
        let all = [
            loads(1, len, &[(0, 30), (1, 10)]),
            loads(2, len, &[(1, 20), (2, 20)]),
        ];
        let ratios = load_ratios(&spec, &ann, &all);
        assert_eq!(ratios[0], Some(1.5));
        // Expert 1: ratios 0.5 (node 1) and 1.0 (node 2): the median of two is their mean.
        assert_eq!(ratios[1], Some(0.75));
        assert_eq!(ratios[2], Some(1.0));
        assert_eq!(ratios[3], None);
        let mut trunk = crate::round::initial_shards(&spec).unwrap().remove(0);
        let before = trunk.router_bias.clone();
        let moved = balance_router(&spec, &ann, &mut trunk, &all).unwrap();
        assert_eq!(moved, 2);
        let step = round_step(&ann) as f32;
        assert!(step > 0.0);
        assert_eq!(trunk.router_bias[0], before[0] - step);
        assert_eq!(trunk.router_bias[1], before[1] + step);
        assert_eq!(trunk.router_bias[2], before[2]);
        assert_eq!(trunk.router_bias[3], before[3]);
    }

    #[test]
    fn the_result_does_not_depend_on_the_order_or_on_strangers() {
        let (spec, ann, len, _) = setup();
        let a = loads(1, len, &[(0, 30), (1, 10)]);
        let b = loads(2, len, &[(1, 20), (2, 21)]);
        let stranger = loads(9, len, &[(0, 1000)]);
        let short = ExpertLoads {
            sender: key(2),
            counts: vec![5; len - 1],
        };
        let one = load_ratios(&spec, &ann, &[a.clone(), b.clone()]);
        let other = load_ratios(&spec, &ann, &[short, b.clone(), stranger, a.clone()]);
        assert_eq!(one, other);
        // A count for an expert the sender did not hold says nothing.
        let mut lying = a.clone();
        lying.counts[3] = 7;
        assert_eq!(load_ratios(&spec, &ann, &[lying, b]), one);
    }

    #[test]
    fn nothing_routed_moves_nothing() {
        let (spec, ann, len, _) = setup();
        let mut trunk = crate::round::initial_shards(&spec).unwrap().remove(0);
        let before = trunk.clone();
        assert_eq!(
            balance_router(&spec, &ann, &mut trunk, &[loads(1, len, &[])]).unwrap(),
            0
        );
        assert_eq!(trunk, before);
        assert_eq!(balance_router(&spec, &ann, &mut trunk, &[]).unwrap(), 0);
        let mut not_trunk = crate::round::initial_shards(&spec).unwrap().remove(1);
        assert!(balance_router(&spec, &ann, &mut not_trunk, &[]).is_err());
    }

    #[test]
    fn imbalance_is_max_over_min_in_the_worst_layer() {
        assert_eq!(imbalance(&[vec![], vec![2, 4, 8]]), 4.0);
        assert_eq!(imbalance(&[vec![0, 0]]), 1.0);
        assert!(imbalance(&[vec![0, 3]]).is_infinite());
    }
}
