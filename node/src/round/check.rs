//! The loss check (the Gauntlet idea, Templar): a contribution is applied, alone, to the round's base model,
//! and the loss on a held-out validation batch must not rise beyond a tolerance.
//!
//! How a delta is applied for the check:
//! - `diloco`: exactly as the round would apply it if it were the only contribution (the outer Nesterov
//!   step from the shard's stored buffer), so a scaled or random pseudo-gradient moves the weights by its
//!   own size and direction.
//! - `sync`: an AdamW step would hide the delta's scale (AdamW is scale-invariant in one step: a gradient
//!   ×100 still moves each weight by about lr, while it would poison the second moments for many rounds),
//!   so the check takes a gradient step normalised, per weight, by the run's history instead:
//!   `θ'_i = θ_i − lr · g_i / sqrt(max(v̂_i, (1 − β2) · g_i²))`, where `v̂ = v / (1 − β2^step)` is the
//!   bias-corrected second moment recorded in the shard's AdamW state. An honest gradient then moves each
//!   weight by about lr (like an AdamW step) downhill; a ×100 one by up to `lr / sqrt(1 − β2)` (≈ 30·lr); a
//!   random one sideways. The floor `(1 − β2) · g_i²` bounds the step where the history is empty or tiny
//!   (a weight that never had a gradient), as AdamW's own update of `v` would. At the shard's first update
//!   (no history at all) the step is `lr · g / rms(g)`: scale-free, so that round relies on the norm check. (A single scalar reference, the RMS of the whole shard's `v`, was tried first: on the trunk,
//!   whose tensors' gradients differ by orders of magnitude, it moved some weights by 100·lr and failed a
//!   quarter of honest deltas in the demo.)
//!
//! `tolerance` is in nats: the check passes when `after <= before + tolerance` and `after` is finite. A
//! negative tolerance demands an improvement.
//!
//! What it catches, measured in `node/tests/round_engine.rs`: random vectors raise the loss (rejected at
//! tolerance 0), and so do deltas scaled ×100 in `diloco` mode; in `sync` mode the probe bounds a ×100
//! gradient's step per weight, as AdamW would, and the norm check is what refuses it. An honest delta lowers
//! the loss. A random vector scaled to the honest norm (so that it passes the norm check) is nearly harmless
//! in one step in `sync` mode (a step of about lr per weight in a random direction changes the loss by ~1e-4
//! nats), so it may pass a tolerance of 0; it gains
//! nothing, though, so a verifier that demands part of the gain of the round's other contributions (a
//! negative tolerance, [`LossCheck::gain`]) rejects it, as the Gauntlet does by scoring improvements.

use mana_kernels::data::Batch;
use mana_kernels::model::ShardId;
use mana_protocol::{ContentHash, HyperParams, UpdateRule};

use super::apply::apply_round;
use super::error::RoundError;
use super::spec::RunSpec;
use super::state::{ShardState, build_trainer};

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
    base: &[ShardState],
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
    let probe = match hyper.update_rule {
        UpdateRule::Diloco => apply_round(spec, hyper, round, target, &[(ContentHash::of(b"loss-check"), delta.to_vec())])?.params,
        UpdateRule::Sync => sync_probe(spec, hyper, target, delta),
    };
    trainer.model_mut().import_shard(shard, &probe)?;
    let after = match trainer.evaluate(validation) {
        Ok(s) => s.loss,
        Err(_) => f32::INFINITY,
    };
    let passed = after.is_finite() && f64::from(after) <= f64::from(before) + f64::from(tolerance);
    Ok(LossCheck { before, after, passed })
}

/// `θ_i − lr · g_i / sqrt(max(v̂_i, (1 − β2) · g_i²))` (see the module doc).
fn sync_probe(spec: &RunSpec, hyper: &HyperParams, target: &ShardState, g: &[f32]) -> Vec<f32> {
    let cfg = spec.optim_config(hyper);
    let lr = f64::from(cfg.lr_at(target.step));
    let beta2 = f64::from(cfg.beta2);
    if target.step == 0 {
        // No history at all: a scale-free step of about lr per weight (that round relies on the norm check).
        let rms = (g.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / g.len().max(1) as f64).sqrt();
        let scale = if rms > 0.0 && rms.is_finite() { lr / rms } else { 0.0 };
        return target.params.iter().zip(g).map(|(&p, &d)| (f64::from(p) - scale * f64::from(d)) as f32).collect();
    }
    let correction = 1.0 - beta2.powi(i32::try_from(target.step).unwrap_or(i32::MAX));
    let floor = 1.0 - beta2;
    target
        .params
        .iter()
        .zip(g)
        .enumerate()
        .map(|(i, (&p, &d))| {
            let d = f64::from(d);
            let v_hat = target.opt_v.get(i).map_or(0.0, |&v| f64::from(v) / correction);
            let denom = v_hat.max(floor * d * d).sqrt();
            let step = if denom > 0.0 && denom.is_finite() { lr * d / denom } else { 0.0 };
            (f64::from(p) - step) as f32
        })
        .collect()
}
