//! A participant's work in one round: train on its micro-batches from the round's base weights, holding
//! the trunk and its assigned experts only (so routing chooses among those), and return one delta per
//! shard it was assigned.
//!
//! - `sync`: accumulate the gradient of `H = inner_steps` micro-batches at the base weights; the delta of a
//!   shard is the node's *mean* gradient over those micro-batches. The holders average the nodes' deltas and
//!   take one AdamW step ([`super::apply`]), so a round is one step of the full model at a global batch of
//!   nodes · H · B sequences (up to FP8 delta compression and routing among held experts).
//! - `diloco`: run H AdamW steps; the delta is the pseudo-gradient `base - local`.
//!
//! ## Decisions
//! - **Micro-batches**: micro-batch `h` (0-based) is `data.batch(seed, round, h, B, T)` with
//!   `seed = data_seeds[h % data_seeds.len()]`, `B = batch_tokens / seq_len`, `T = seq_len`: a pure function
//!   of the announcement, so anyone (a verifier, the simulator's baselines) can rebuild it.
//! - **Inner optimizer state (diloco)**: reset every round. A participant's assignment can change between
//!   rounds and it may be a different node next time, so no state is assumed to survive; the inner AdamW
//!   starts from zero moments with bias correction, at the learning rate of the schedule at the round's first
//!   global inner step (`round · H`), held constant through the round.
//! - **Router biases do not move during a participant's training** (they stay at their value in the round's
//!   base trunk): a bias that drifted per node would make the trunk's holders disagree. Instead the
//!   participant counts the routed slots each of its experts received ([`LocalResult::expert_tokens`]), its
//!   trunk contribution carries the counts, and the trunk's holders move the biases once a round from every
//!   accepted participant's counts together ([`super::balance`]).

use mana_kernels::data::TextDataset;
use mana_kernels::model::ShardId;
use mana_protocol::{Participant, RoundAnnouncement, TrainingStats, UpdateRule};

use super::error::RoundError;
use super::spec::RunSpec;
use super::state::{ShardRecord, build_trainer, build_trainer_with};

/// What a participant produced in one round.
#[derive(Debug, Clone)]
pub struct LocalResult {
    /// One delta per assigned shard, in the order of the participant entry: the mean gradient (`sync`) or
    /// the pseudo-gradient `base - local` (`diloco`).
    pub deltas: Vec<(ShardId, Vec<f32>)>,
    /// Tokens trained on, first and last micro-batch losses, and the L2 norm of all deltas together.
    pub stats: TrainingStats,
    /// The routed slots each expert received in this round's training forwards, in the layout of the trunk's
    /// router biases (MoE layers in order, `n_routed_experts` each; zero for experts not held): sent with
    /// the trunk delta, for [`super::balance`].
    pub expert_tokens: Vec<u32>,
}

/// Which micro-batch `h` of `round` a participant with `data_seeds` trains on: (seed, data shard, step).
pub fn micro_batch_key(
    data_seeds: &[u64],
    round: u64,
    h: u64,
) -> Result<(u64, u64, u64), RoundError> {
    if data_seeds.is_empty() {
        return Err(RoundError::settings(
            "data_seeds",
            "the participant has no data seed",
        ));
    }
    let seed = data_seeds[(h % data_seeds.len() as u64) as usize];
    Ok((seed, round, h))
}

/// Trains one participant's part of round `ann.round` (see the module doc). `base` must hold the trunk and
/// every shard `me` is assigned (it may hold more; they are ignored). Routes among the assigned experts only.
pub fn train_local(
    spec: &RunSpec,
    ann: &RoundAnnouncement,
    me: &Participant,
    base: &[ShardRecord],
    data: &TextDataset,
) -> Result<LocalResult, RoundError> {
    let (b, t) = spec.batch_shape(&ann.hyper)?;
    let h_steps = u64::from(ann.inner_steps);
    if h_steps == 0 {
        return Err(RoundError::settings("inner_steps", "must be at least 1"));
    }
    micro_batch_key(&me.data_seeds, ann.round, 0)?;
    let assigned: Vec<ShardId> = me.shards.clone();
    let find = |shard: ShardId| -> Result<&ShardRecord, RoundError> {
        base.iter()
            .find(|s| s.shard == shard)
            .ok_or_else(|| RoundError::MissingShard {
                shard: shard.to_string(),
            })
    };
    let mut held: Vec<ShardRecord> = vec![find(ShardId::Trunk)?.clone()];
    for &shard in &assigned {
        if shard != ShardId::Trunk {
            if held.iter().any(|s| s.shard == shard) {
                return Err(RoundError::DuplicateShard {
                    shard: shard.to_string(),
                });
            }
            held.push(find(shard)?.clone());
        }
    }
    let mut first_loss = f32::NAN;
    let mut last_loss = f32::NAN;
    let batch = |h: u64| {
        let (seed, shard, step) = micro_batch_key(&me.data_seeds, ann.round, h)?;
        Ok::<_, RoundError>(data.batch(seed, shard, step, b, t)?)
    };
    let counts = |model: &mana_kernels::model::Model| -> Vec<u32> {
        model
            .expert_counts()
            .iter()
            .flatten()
            .map(|&c| u32::try_from(c).unwrap_or(u32::MAX))
            .collect()
    };
    let (deltas, expert_tokens): (Vec<(ShardId, Vec<f32>)>, Vec<u32>) = match ann.hyper.update_rule
    {
        UpdateRule::Sync => {
            let mut trainer = build_trainer(spec, &ann.hyper, &held)?;
            trainer.model_mut().zero_grads();
            for h in 0..h_steps {
                let stats = trainer.accumulate(&batch(h)?)?;
                if h == 0 {
                    first_loss = stats.loss;
                }
                last_loss = stats.loss;
            }
            let scale = h_steps as f32;
            let deltas = assigned
                .iter()
                .map(|&shard| {
                    let mut g = trainer.model().export_shard_grad(shard)?;
                    g.iter_mut().for_each(|x| *x /= scale);
                    Ok((shard, g))
                })
                .collect::<Result<_, RoundError>>()?;
            (deltas, counts(trainer.model()))
        }
        UpdateRule::Diloco => {
            // Constant through the round, at the schedule's value for the round's first global inner step.
            let mut optim = spec.optim_config(&ann.hyper);
            let lr = optim.lr_at(ann.round.saturating_mul(h_steps));
            optim.lr = lr;
            optim.min_lr = lr;
            optim.warmup_steps = 0;
            optim.total_steps = 0;
            let mut local = build_trainer_with(spec, optim, false, &held)?;
            for h in 0..h_steps {
                local.model_mut().zero_grads();
                let stats = local.accumulate(&batch(h)?)?;
                local.apply_update()?;
                if h == 0 {
                    first_loss = stats.loss;
                }
                last_loss = stats.loss;
            }
            let deltas = assigned
                .iter()
                .map(|&shard| {
                    let now = local.model().export_shard(shard)?;
                    let base = &find(shard)?.params;
                    Ok((shard, base.iter().zip(&now).map(|(b, n)| b - n).collect()))
                })
                .collect::<Result<_, RoundError>>()?;
            (deltas, counts(local.model()))
        }
    };
    let mut sq = 0f64;
    for (shard, d) in &deltas {
        if d.iter().any(|x| !x.is_finite()) {
            return Err(RoundError::NonFinite {
                what: "delta",
                shard: shard.to_string(),
            });
        }
        sq += d.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
    }
    let stats = TrainingStats {
        tokens: h_steps * (b * t) as u64,
        loss_before: first_loss,
        loss_after: last_loss,
        delta_norm: sq.sqrt() as f32,
    };
    Ok(LocalResult {
        deltas,
        stats,
        expert_tokens,
    })
}
