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
//! - **Inner optimizer state (diloco)**: the participant's own, carried from its last round to its next in an
//!   [`InnerOptim`] (AdamW's moments per shard it held, and how many inner steps they have seen), as every
//!   DiLoCo worker keeps its inner optimizer. A shard it did not hold last round starts from zero moments. The
//!   state is nobody else's business: no one replays a participant's training (a delta is judged by its
//!   score), so a participant that starts afresh (a new node, a restart) only trains a little worse.
//! - **Learning rate (diloco)**: the schedule's at the round's first global inner step (`round · H`), held
//!   constant through the round. (Following the schedule at each global inner step instead, so that round 0
//!   warms up as one trainer would, was measured no better: KJV, 4.19M tokens, dense H = 50, 1.4486 against
//!   1.4374.)
//! - **Router biases do not move during a participant's training** (they stay at their value in the round's
//!   base trunk): a bias that drifted per node would make the trunk's holders disagree. Instead the
//!   participant counts the routed slots each of its experts received ([`LocalResult::expert_tokens`]), its
//!   trunk contribution carries the counts, and the trunk's holders move the biases once a round from every
//!   accepted participant's counts together ([`super::balance`]).

use std::collections::BTreeMap;

use mana_kernels::data::TextDataset;
use mana_kernels::model::ShardId;
use mana_kernels::train::Trainer;
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

/// A participant's inner AdamW state between its diloco rounds (see the module doc): reset it and every
/// round starts Adam afresh, whose bias-corrected first steps move every parameter by about the full learning
/// rate whatever its gradient's noise.
#[derive(Debug, Clone, Default)]
pub struct InnerOptim {
    /// Inner steps the moments have seen (AdamW's bias correction).
    steps: u64,
    /// First and second moments per shard held in the last round trained.
    moments: BTreeMap<ShardId, (Vec<f32>, Vec<f32>)>,
}

impl InnerOptim {
    /// No state: the next round starts Adam from zero moments.
    pub fn new() -> InnerOptim {
        InnerOptim::default()
    }

    /// Inner steps the carried moments have seen (0 when there are none).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The shards whose moments are carried.
    pub fn shards(&self) -> impl Iterator<Item = ShardId> + '_ {
        self.moments.keys().copied()
    }

    /// Puts the carried moments of the shards `trainer` holds into it (a moment of the wrong length, from
    /// another model, is dropped) and its step counter at the steps they have seen.
    fn restore(&self, trainer: &mut Trainer) -> Result<(), RoundError> {
        if self.steps == 0 {
            return Ok(());
        }
        for (&shard, (m, v)) in &self.moments {
            match trainer.model().shard_span(shard) {
                Ok(span) if span.len == m.len() && span.len == v.len() => {
                    trainer.import_shard_optim(shard, m, v)?
                }
                _ => {}
            }
        }
        trainer.set_step_count(self.steps);
        Ok(())
    }

    /// Takes the moments of `shards` and the step counter from `trainer` after a round.
    fn keep(&mut self, trainer: &Trainer, shards: &[ShardId]) -> Result<(), RoundError> {
        self.moments = shards
            .iter()
            .map(|&s| Ok((s, trainer.export_shard_optim(s)?)))
            .collect::<Result<_, RoundError>>()?;
        self.steps = trainer.step_count();
        Ok(())
    }
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
/// `inner` is the participant's inner optimizer state from its last round (diloco), updated in place; sync
/// leaves it alone.
pub fn train_local(
    spec: &RunSpec,
    ann: &RoundAnnouncement,
    me: &Participant,
    base: &[ShardRecord],
    data: &TextDataset,
    inner: &mut InnerOptim,
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
            inner.restore(&mut local)?;
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
            let held: Vec<ShardId> = held.iter().map(|s| s.shard).collect();
            inner.keep(&local, &held)?;
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
