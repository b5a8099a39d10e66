//! The loss check (the Gauntlet idea, Templar): a contribution is applied, alone, to the round's base model,
//! and the loss on a held-out validation batch must not rise beyond a tolerance.
//!
//! How a delta is applied for the check: exactly as the round would apply it if it were the only
//! contribution ([`apply_round`]: the AdamW step from the shard's stored moments in `sync` mode, the outer
//! Nesterov step from its stored buffer in `diloco` mode). So the check judges what the contribution would
//! really do to the model.
//!
//! `tolerance` is in nats: the check passes when `after <= before + tolerance` and `after` is finite. A
//! negative tolerance demands an improvement.
//!
//! What it catches and what it leaves to the other checks, measured in `node/tests/round_engine.rs`:
//! - `diloco`: deltas scaled ×100 and random vectors raise the loss by nats; an honest delta lowers it.
//! - `sync`: one AdamW step is nearly scale-invariant (a gradient ×100 moves each weight by a few lr) and
//!   mostly made of the stored momentum, so a delta of any direction moves the model about alike: here the
//!   check only catches what ruins the model outright, and ranks a random vector below the honest gradient;
//!   scaled gradients are the norm check's to refuse. A probe that skipped AdamW's momentum (`θ − lr·g/√v̂`)
//!   was tried first and caught ×100 deltas, but one node's noisy gradient divided by the history of
//!   *averaged* gradients moved weights by many lr and failed honest trunk deltas in the demo.
//! - A random vector scaled to the honest norm (so that it passes the norm check) gains nothing: in `diloco`
//!   a verifier that demands part of the gain of the round's other contributions (a negative tolerance,
//!   [`LossCheck::gain`]) rejects it, as the Gauntlet does by scoring improvements. In `sync` that needs
//!   scoring contributions against each other (not done).

use mana_kernels::data::Batch;
use mana_kernels::model::ShardId;
use mana_protocol::{ContentHash, HyperParams};

use super::apply::apply_round;
use super::error::RoundError;
use super::spec::RunSpec;
use super::state::{ShardRecord, build_trainer};

/// The outcome of one loss check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossCheck {
    /// Validation loss of the base model.
    pub before: f32,
    /// Validation loss with the delta applied.
    pub after: f32,
    /// Whether the delta passed (`after` finite and at most `before + tolerance`).
    pub passed: bool,
}

impl LossCheck {
    /// How much the delta lowered the validation loss (negative: it raised it).
    pub fn gain(&self) -> f32 {
        self.before - self.after
    }
}

/// Checks one delta for `shard` against the full base model `base` (every shard) on `validation` (see the
/// module doc). Wrong-length or non-finite deltas are errors, not failed checks.
#[allow(clippy::too_many_arguments)]
pub fn loss_check(
    spec: &RunSpec,
    hyper: &HyperParams,
    round: u64,
    base: &[ShardRecord],
    shard: ShardId,
    delta: &[f32],
    validation: &Batch,
    tolerance: f32,
) -> Result<LossCheck, RoundError> {
    if !tolerance.is_finite() {
        return Err(RoundError::settings("tolerance", "must be finite"));
    }
    let target = base.iter().find(|s| s.shard == shard).ok_or_else(|| RoundError::MissingShard { shard: shard.to_string() })?;
    if delta.len() != target.params.len() {
        return Err(RoundError::WrongLength { what: "delta", shard: shard.to_string(), expected: target.params.len(), got: delta.len() });
    }
    if delta.iter().any(|x| !x.is_finite()) {
        return Err(RoundError::NonFinite { what: "delta", shard: shard.to_string() });
    }
    let mut trainer = build_trainer(spec, hyper, base)?;
    let before = trainer.evaluate(validation)?.loss;
    let probe = apply_round(spec, hyper, round, target, &[(ContentHash::of(b"loss-check"), delta.to_vec())])?.params;
    trainer.model_mut().import_shard(shard, &probe)?;
    let after = match trainer.evaluate(validation) {
        Ok(s) => s.loss,
        Err(_) => f32::INFINITY,
    };
    let passed = after.is_finite() && f64::from(after) <= f64::from(before) + f64::from(tolerance);
    Ok(LossCheck { before, after, passed })
}
