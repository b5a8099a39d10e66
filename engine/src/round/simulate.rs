//! N simulated nodes in one process, on the same engine the network runs ([`train_local`],
//! [`apply_shard_round`]) but with no network: each round every node trains its part, encodes each delta with the
//! protocol's codec (one [`DeltaEncoder`] per node and shard, error feedback kept across rounds, exactly as
//! the trainer role does), the payloads are decoded and hashed, and each shard is updated from the decoded
//! deltas of its holders. Used by the engine's tests (convergence, equivalence, determinism) and by
//! `mana simulate` to measure the trade-off between traffic and loss.
//!
//! Two single-node baselines train the full model (every expert, router-bias balancing on, the same
//! warm-up-then-constant AdamW without clipping) on the very same micro-batches:
//! - **full**: the same total tokens at the same global batch. `sync`: one step per round over all nodes'
//!   micro-batches (nodes · H · B sequences); `diloco`: one step per inner step over all nodes' micro-batch
//!   of that step (nodes · B sequences), i.e. data parallelism with an all-reduce at every step.
//! - **alone**: one node (node 0's data) training by itself for the same number of its own optimizer steps
//!   and micro-batches (`sync`: one step of H micro-batches per round; `diloco`: H steps per round).
//!
//! ## What the traffic figures count
//! - `payload_bytes`: the sum of the encoded delta payloads, each counted once (what nodes upload).
//! - `wire_bytes`: each payload times the peers that fetch it: the coordinator (to verify it) and every other
//!   holder of its shard (to apply it), i.e. `holders(shard)` fetches. Holders compute the new shards
//!   themselves, so no shard download is counted; gossip messages (a few hundred bytes per delta) are not
//!   counted.
//! - `allreduce_bytes`: the reference, a ring all-reduce of the full model's f32 gradient (P parameters) at
//!   every optimizer step of the **full** baseline, in which each of the N nodes sends `2 (N-1) / N · 4P`
//!   bytes per step: `8 (N-1) P` bytes per step in all.
//!
//! Per token means divided by the tokens the nodes trained on (nodes · H · B · T per round).
//!
//! ## Overlap (`SimConfig::overlap`, diloco)
//! Streaming DiLoCo's answer to the idle wait: a node starts round r + 1 as soon as its round-r deltas are
//! out, before round r commits. It cannot start from round r's result, so it starts from what it knows: the
//! base of round r (the last commit it has) moved by its own round-r progress, `base_r − d_r`. Its delta for
//! round r + 1 is its progress in that round (start minus end), and the holders apply it to the latest
//! commit, exactly as without overlap; the only change is that a node's inner steps start one commit late
//! (the eager, one-step-delayed outer update). Nothing in the protocol changes: a delta is still a
//! difference the holders add to the round's base.

use std::collections::BTreeMap;

use mana_kernels::data::TextDataset;
use mana_kernels::model::ShardId;
use mana_kernels::train::Trainer;
use mana_protocol::{
    Capacity, ContentHash, Deadlines, DeltaEncoder, DeviceKind, HyperParams, Participant,
    PublicKey, RoundAnnouncement, RunId, UpdateRule, decode_delta,
};
use serde::Serialize;

use super::apply::apply_shard_round;
use super::balance::ExpertLoads;
use super::error::RoundError;
use super::local::{InnerOptim, micro_batch_key, train_local};
use super::spec::RunSpec;
use super::state::{RunShard, ShardRecord, build_trainer, build_trainer_with, initial_shards};
use crate::coordinator::{Candidate, ExpertHosts, assign_experts, experts_by_node};

/// One simulation's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Simulated nodes (each holds the trunk and a share of the experts).
    pub nodes: usize,
    /// Holders per expert (r); `replication == nodes` gives every node every expert.
    pub replication: usize,
    /// The round settings (rule, rates, batch shape, codec).
    pub hyper: HyperParams,
    /// H: micro-batches (sync) or inner steps (diloco) per round.
    pub inner_steps: u32,
    /// Rounds to run.
    pub rounds: u64,
    /// Seed of the data assignment (each node's data seed per round derives from it).
    pub data_seed: u64,
    /// Encode deltas with the codec (FP8, top-k if configured, error feedback); false sends raw f32.
    pub compress: bool,
    /// Validation batches per evaluation.
    pub eval_batches: u64,
    /// Sequences per validation batch.
    pub eval_batch_size: usize,
    /// Evaluate the network after every `eval_every` rounds (0: only at the end).
    pub eval_every: u64,
    /// Train the two single-node baselines too.
    pub baselines: bool,
    /// Each node trains round r + 1 while round r commits (see the module doc; diloco only).
    pub overlap: bool,
    /// Each node starts every diloco round from zero inner AdamW moments instead of carrying its own (the
    /// engine's behaviour before [`InnerOptim`]; kept to measure the difference).
    pub reset_inner_optim: bool,
}

impl SimConfig {
    /// 4 nodes, r = 2, the spec's default hyper-parameters for `rule`, compressed deltas, baselines on.
    pub fn new(spec: &RunSpec, rule: UpdateRule, inner_steps: u32, rounds: u64) -> SimConfig {
        SimConfig {
            nodes: 4,
            replication: 2,
            hyper: spec.hyper(rule),
            inner_steps,
            rounds,
            data_seed: 7,
            compress: true,
            eval_batches: 8,
            eval_batch_size: 16,
            eval_every: 1,
            baselines: true,
            overlap: false,
            reset_inner_optim: false,
        }
    }
}

/// One round of the simulated network.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundReport {
    /// The round (0-based).
    pub round: u64,
    /// Mean over nodes of the first micro-batch's training loss.
    pub train_loss: f32,
    /// Validation loss of the model after the round (NaN when not evaluated this round).
    pub val_loss: f32,
    /// The routing imbalance of the whole model on the validation batches after the round: the most routed
    /// slots of an expert over the fewest, in the worst layer (NaN when not evaluated this round).
    pub imbalance: f64,
    /// Tokens trained on by all nodes so far.
    pub tokens: u64,
    /// Encoded payload bytes of this round, each counted once.
    pub payload_bytes: u64,
    /// Bytes fetched this round (each payload times its fetchers).
    pub wire_bytes: u64,
}

/// A single-node baseline's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BaselineReport {
    /// Optimizer steps taken.
    pub steps: u64,
    /// Sequences per step.
    pub batch_sequences: u64,
    /// Tokens trained on.
    pub tokens: u64,
    /// Final validation loss.
    pub val_loss: f32,
    /// The routing imbalance at the end (as [`RoundReport::imbalance`]).
    pub imbalance: f64,
}

/// What a simulation measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimReport {
    /// The update rule.
    pub rule: String,
    /// Nodes.
    pub nodes: usize,
    /// Holders per expert.
    pub replication: usize,
    /// H.
    pub inner_steps: u32,
    /// Parameters of the full model (P).
    pub params: u64,
    /// Per round.
    pub rounds: Vec<RoundReport>,
    /// Final validation loss of the network's model.
    pub val_loss: f32,
    /// The final routing imbalance of the network's model ([`RoundReport::imbalance`]).
    pub imbalance: f64,
    /// Tokens trained on by all nodes.
    pub tokens: u64,
    /// Payload bytes, each payload once.
    pub payload_bytes: u64,
    /// Bytes fetched (see the module doc).
    pub wire_bytes: u64,
    /// Bytes the f32 ring all-reduce reference would send (see the module doc).
    pub allreduce_bytes: u64,
    /// The full model at the same total tokens and global batch.
    pub full: Option<BaselineReport>,
    /// One node alone, same number of its own steps.
    pub alone: Option<BaselineReport>,
    /// The final checkpoint: every shard's hash, in shard order.
    pub shard_hashes: Vec<(String, String)>,
    /// The final checkpoint itself (every shard's state), for callers that go on from it.
    #[serde(skip)]
    pub state: Vec<ShardRecord>,
}

impl SimReport {
    /// Wire bytes per trained token.
    pub fn wire_bytes_per_token(&self) -> f64 {
        self.wire_bytes as f64 / self.tokens.max(1) as f64
    }
    /// Payload bytes per trained token.
    pub fn payload_bytes_per_token(&self) -> f64 {
        self.payload_bytes as f64 / self.tokens.max(1) as f64
    }
    /// All-reduce reference bytes per trained token.
    pub fn allreduce_bytes_per_token(&self) -> f64 {
        self.allreduce_bytes as f64 / self.tokens.max(1) as f64
    }
    /// How many times less the network fetches than the all-reduce would send.
    pub fn traffic_ratio(&self) -> f64 {
        self.allreduce_bytes as f64 / self.wire_bytes.max(1) as f64
    }
}

/// The synthetic identity of simulated node `n`.
fn node_key(n: usize) -> PublicKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(n as u64 + 1).to_le_bytes());
    PublicKey(k)
}

/// Node `n`'s data seed in `round` (splitmix64 of the run's seed, node and round).
pub fn node_data_seed(data_seed: u64, n: usize, round: u64) -> u64 {
    use mana_kernels::rng::{GOLDEN, mix64};
    mix64(
        data_seed ^ (n as u64 + 1).wrapping_mul(GOLDEN) ^ round.wrapping_mul(0xD1B5_4A32_D192_ED03),
    )
}

/// Mean validation loss of the model held by `trainer` over `cfg.eval_batches` fixed validation batches,
/// and the imbalance of its routing over them ([`super::balance::imbalance`]).
fn evaluate(
    trainer: &mut Trainer,
    data: &TextDataset,
    cfg: &SimConfig,
    t: usize,
) -> Result<(f32, f64), RoundError> {
    let mut sum = 0f64;
    let mut counts: Vec<Vec<u64>> = Vec::new();
    for i in 0..cfg.eval_batches {
        let batch = data.validation_batch(i, cfg.eval_batch_size, t)?;
        let (stats, routed) = trainer.model_mut().evaluate_routing(&batch)?;
        sum += f64::from(stats.loss);
        if counts.is_empty() {
            counts = routed;
        } else {
            for (acc, layer) in counts.iter_mut().zip(&routed) {
                acc.iter_mut().zip(layer).for_each(|(a, c)| *a += c);
            }
        }
    }
    Ok((
        (sum / cfg.eval_batches.max(1) as f64) as f32,
        super::balance::imbalance(&counts),
    ))
}

/// The reference of every traffic figure: the bytes a ring all-reduce of the full model's f32 gradient
/// (`params` values) among `nodes` nodes sends in all over `steps` optimizer steps, `2 (N-1)/N · 4P` per node
/// per step. The simulator and `mana demo` both compare against it.
pub fn allreduce_bytes(params: u64, nodes: u64, steps: u64) -> u64 {
    steps
        .saturating_mul(8)
        .saturating_mul(nodes.saturating_sub(1))
        .saturating_mul(params)
}

/// Runs the simulation (see the module doc).
pub fn simulate(
    spec: &RunSpec,
    data: &TextDataset,
    cfg: &SimConfig,
) -> Result<SimReport, RoundError> {
    simulate_with(spec, data, cfg, &mut |_| {})
}

/// [`simulate`], calling `on_round` after every round (for progress output).
pub fn simulate_with(
    spec: &RunSpec,
    data: &TextDataset,
    cfg: &SimConfig,
    on_round: &mut dyn FnMut(&RoundReport),
) -> Result<SimReport, RoundError> {
    if cfg.nodes == 0 || cfg.replication == 0 || cfg.replication > cfg.nodes {
        return Err(RoundError::settings(
            "replication",
            format!("{} holders among {} nodes", cfg.replication, cfg.nodes),
        ));
    }
    if cfg.inner_steps == 0 || cfg.eval_batches == 0 || cfg.eval_batch_size == 0 {
        return Err(RoundError::settings(
            "inner_steps/eval",
            "must be at least 1",
        ));
    }
    let (b, t) = spec.batch_shape(&cfg.hyper)?;
    let h = u64::from(cfg.inner_steps);

    // The expert assignment: the coordinator's own, computed once and kept.
    let experts: Vec<mana_protocol::ShardId> = spec.experts();
    let candidates: Vec<Candidate> = (0..cfg.nodes)
        .map(|n| Candidate {
            node: node_key(n),
            capacity: Capacity {
                device: DeviceKind::Cpu,
                memory_bytes: 1 << 40,
                tokens_per_second: 1.0,
                max_shards: 1 + experts.len() as u32,
            },
            reserved_slots: 1,
        })
        .collect();
    let hosts = assign_experts(
        &candidates,
        &experts,
        cfg.replication,
        &ExpertHosts::new(),
        &ExpertHosts::new(),
        cfg.data_seed,
    )
    .map_err(|e| RoundError::settings("replication", e.to_string()))?;
    let by_node = experts_by_node(&hosts);
    let assignment: Vec<Vec<mana_protocol::ShardId>> = (0..cfg.nodes)
        .map(|n| {
            let mut s = vec![mana_protocol::ShardId::Trunk];
            s.extend(by_node.get(&node_key(n)).into_iter().flatten().copied());
            s
        })
        .collect();
    let mut holders: BTreeMap<ShardId, u64> = BTreeMap::new();
    for shards in &assignment {
        for &s in shards {
            *holders.entry(s).or_default() += 1;
        }
    }

    if cfg.overlap && cfg.hyper.update_rule != UpdateRule::Diloco {
        return Err(RoundError::settings(
            "overlap",
            "overlapping rounds needs the diloco rule (a sync gradient is taken at the round's base)",
        ));
    }
    let mut state: Vec<ShardRecord> = initial_shards(spec)?;
    // With overlap: where each node starts its next round (the last base it knows moved by its own
    // progress); `None` before its first round.
    let mut starts: Vec<Option<Vec<ShardRecord>>> = vec![None; cfg.nodes];
    let params: u64 = state.iter().map(|s| s.params.len() as u64).sum();
    let mut encoders: BTreeMap<(usize, ShardId), DeltaEncoder> = BTreeMap::new();
    let mut inner: Vec<InnerOptim> = vec![InnerOptim::new(); cfg.nodes];
    let mut rounds = Vec::new();
    let (mut tokens, mut payload_bytes, mut wire_bytes) = (0u64, 0u64, 0u64);
    let run = RunId::new("sim").map_err(|e| RoundError::settings("run", e.to_string()))?;
    for round in 0..cfg.rounds {
        let participants: Vec<Participant> = (0..cfg.nodes)
            .map(|n| Participant {
                node: node_key(n),
                shards: assignment[n].clone(),
                data_seeds: vec![node_data_seed(cfg.data_seed, n, round)],
            })
            .collect();
        let ann = RoundAnnouncement {
            run: run.clone(),
            round,
            base_checkpoint: ContentHash::of(&round.to_le_bytes()),
            participants: participants.clone(),
            inner_steps: cfg.inner_steps,
            hyper: cfg.hyper.clone(),
            max_norm_ratio: 10.0,
            deadlines: Deadlines {
                deltas_by_ms: 0,
                commit_by_ms: 0,
            },
            corpus: ContentHash([0; 32]),
            // Nothing is scored in a simulation.
            seed_commitment: ContentHash([0; 32]),
        };
        let mut received: BTreeMap<ShardId, Vec<(ContentHash, Vec<f32>)>> = BTreeMap::new();
        let mut loads = Vec::new();
        let (mut round_payload, mut round_wire) = (0u64, 0u64);
        let mut loss_sum = 0f64;
        let mut next_starts: Vec<Option<Vec<ShardRecord>>> = vec![None; cfg.nodes];
        for (n, me) in participants.iter().enumerate() {
            let start = starts[n].as_deref().unwrap_or(&state);
            if cfg.reset_inner_optim {
                inner[n] = InnerOptim::new();
            }
            let local = train_local(spec, &ann, me, start, data, &mut inner[n])?;
            if cfg.overlap {
                // Its next start: this round's base (the commit it will have by then) plus its own progress.
                let moved = state
                    .iter()
                    .filter_map(|s| {
                        let (_, d) = local.deltas.iter().find(|(shard, _)| *shard == s.shard)?;
                        let mut s = s.clone();
                        s.params.iter_mut().zip(d).for_each(|(p, d)| *p -= d);
                        Some(s)
                    })
                    .collect();
                next_starts[n] = Some(moved);
            }
            loss_sum += f64::from(local.stats.loss_before);
            tokens += local.stats.tokens;
            loads.push(ExpertLoads {
                sender: me.node,
                counts: local.expert_tokens,
            });
            for (shard, delta) in local.deltas {
                let (payload, decoded) = if cfg.compress {
                    let enc = match encoders.entry((n, shard)) {
                        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::btree_map::Entry::Vacant(e) => {
                            e.insert(DeltaEncoder::new(cfg.hyper.codec)?)
                        }
                    };
                    let payload = enc.encode(&delta)?;
                    let decoded = decode_delta(&payload, delta.len())?;
                    (payload, decoded)
                } else {
                    (
                        delta
                            .iter()
                            .flat_map(|x| x.to_le_bytes())
                            .collect::<Vec<u8>>(),
                        delta,
                    )
                };
                let size = payload.len() as u64;
                round_payload += size;
                round_wire += size * holders.get(&shard).copied().unwrap_or(1);
                received
                    .entry(shard)
                    .or_default()
                    .push((ContentHash::of(&payload), decoded));
            }
        }
        let mut next = Vec::with_capacity(state.len());
        for s in &state {
            let deltas = received.get(&s.shard).map(|v| v.as_slice()).unwrap_or(&[]);
            let weights = vec![1; deltas.len()];
            next.push(apply_shard_round(spec, &ann, s, deltas, &weights, &loads)?);
        }
        state = next;
        starts = next_starts;
        payload_bytes += round_payload;
        wire_bytes += round_wire;
        let last = round + 1 == cfg.rounds;
        let (val_loss, imbalance) =
            if last || (cfg.eval_every > 0 && (round + 1) % cfg.eval_every == 0) {
                evaluate(&mut build_trainer(spec, &cfg.hyper, &state)?, data, cfg, t)?
            } else {
                (f32::NAN, f64::NAN)
            };
        let report = RoundReport {
            round,
            train_loss: (loss_sum / cfg.nodes as f64) as f32,
            val_loss,
            imbalance,
            tokens,
            payload_bytes: round_payload,
            wire_bytes: round_wire,
        };
        on_round(&report);
        rounds.push(report);
    }

    let full_steps = match cfg.hyper.update_rule {
        UpdateRule::Sync => cfg.rounds,
        UpdateRule::Diloco => cfg.rounds * h,
    };
    let n = cfg.nodes as u64;
    let allreduce_bytes = allreduce_bytes(params, n, full_steps);
    let (full, alone) = if cfg.baselines {
        (
            Some(baseline(spec, data, cfg, (b, t), false)?.0),
            Some(baseline(spec, data, cfg, (b, t), true)?.0),
        )
    } else {
        (None, None)
    };
    Ok(SimReport {
        rule: format!("{:?}", cfg.hyper.update_rule).to_lowercase(),
        nodes: cfg.nodes,
        replication: cfg.replication,
        inner_steps: cfg.inner_steps,
        params,
        val_loss: rounds.last().map(|r| r.val_loss).unwrap_or(f32::NAN),
        imbalance: rounds.last().map(|r| r.imbalance).unwrap_or(f64::NAN),
        rounds,
        tokens,
        payload_bytes,
        wire_bytes,
        allreduce_bytes,
        full,
        alone,
        shard_hashes: state
            .iter()
            .map(|s| (s.shard.to_string(), s.hash().to_string()))
            .collect(),
        state,
    })
}

/// The full model trained on one node on the same tokens as `cfg`'s network: the same global batch per
/// optimizer step (every node's micro-batches of a round in sync, of one inner step in diloco) and the same
/// number of steps (see the module doc). Returns its report and the trained model, e.g. for `mana demo` to
/// compare what the network learned with what one machine learns from the same text.
pub fn full_model_baseline(
    spec: &RunSpec,
    data: &TextDataset,
    cfg: &SimConfig,
) -> Result<(BaselineReport, Trainer), RoundError> {
    let shape = spec.batch_shape(&cfg.hyper)?;
    baseline(spec, data, cfg, shape, false)
}

/// Trains one single-node baseline on the full model (see the module doc): `alone` uses node 0's data only.
fn baseline(
    spec: &RunSpec,
    data: &TextDataset,
    cfg: &SimConfig,
    (b, t): (usize, usize),
    alone: bool,
) -> Result<(BaselineReport, Trainer), RoundError> {
    // The router biases move by the run's gamma after every step, as one node training alone moves them.
    let mut spec = spec.clone();
    spec.model.bias_gamma = cfg.hyper.router_bias_gamma;
    let spec = &spec;
    let init = initial_shards(spec)?;
    let mut trainer = build_trainer_with(spec, spec.optim_config(&cfg.hyper), true, &init)?;
    let nodes = if alone { 1 } else { cfg.nodes };
    let h = u64::from(cfg.inner_steps);
    // Per optimizer step: the (node, round, micro-batch) triples it accumulates.
    let mut steps: Vec<Vec<(usize, u64, u64)>> = Vec::new();
    for round in 0..cfg.rounds {
        match cfg.hyper.update_rule {
            UpdateRule::Sync => steps.push(
                (0..nodes)
                    .flat_map(|n| (0..h).map(move |i| (n, round, i)))
                    .collect(),
            ),
            UpdateRule::Diloco => {
                for i in 0..h {
                    steps.push((0..nodes).map(|n| (n, round, i)).collect());
                }
            }
        }
    }
    let mut tokens = 0u64;
    let batch_sequences = steps.first().map(|s| s.len() * b).unwrap_or(0) as u64;
    for micro in &steps {
        trainer.model_mut().zero_grads();
        for &(n, round, i) in micro {
            let (seed, shard, step) =
                micro_batch_key(&[node_data_seed(cfg.data_seed, n, round)], round, i)?;
            trainer.accumulate(&data.batch(seed, shard, step, b, t)?)?;
            tokens += (b * t) as u64;
        }
        let k = micro.len() as f32;
        trainer
            .model_mut()
            .grads_mut()
            .iter_mut()
            .for_each(|g| *g /= k);
        trainer.apply_update()?;
        trainer.model_mut().update_router_bias();
    }
    let (val_loss, imbalance) = evaluate(&mut trainer, data, cfg, t)?;
    let report = BaselineReport {
        steps: steps.len() as u64,
        batch_sequences,
        imbalance,
        tokens,
        val_loss,
    };
    Ok((report, trainer))
}
