//! AdamW with decoupled weight decay, global-norm gradient clipping and a warmup + cosine learning-rate
//! schedule, over flat f32 buffers.
//!
//! The moments `m` and `v` share the model's [`ParamLayout`](crate::model::ParamLayout), so a shard's
//! optimizer state is one slice of each, and [`AdamW::update_span`] can step a single shard (the
//! network's sync mode applies AdamW on whichever node holds the shard).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::{ParamLayout, Span};

/// Optimizer hyper-parameters, readable from TOML.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate (reached at the end of warmup).
    pub lr: f32,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f32,
    /// Steps of linear warmup from ~0 to `lr`.
    pub warmup_steps: usize,
    /// Step at which the cosine decay reaches `min_lr` (and stays there).
    pub total_steps: usize,
    /// Decoupled weight decay, applied to matrices only.
    pub weight_decay: f32,
    /// AdamW first-moment decay.
    pub beta1: f32,
    /// AdamW second-moment decay.
    pub beta2: f32,
    /// AdamW epsilon.
    pub eps: f32,
    /// Maximum global gradient L2 norm; 0 disables clipping.
    pub grad_clip: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 50,
            total_steps: 2000,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }
}

/// Why an optimizer configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("optimizer config: {field} = {value} is invalid: {reason}")]
pub struct OptimConfigError {
    /// The offending field.
    pub field: &'static str,
    /// Its value, printed.
    pub value: String,
    /// What it must satisfy.
    pub reason: &'static str,
}

impl OptimConfig {
    /// Checks the ranges (finite, non-negative rates, betas in [0, 1)).
    pub fn validate(&self) -> Result<(), OptimConfigError> {
        let bad = |field, value: f32, reason| {
            Err(OptimConfigError {
                field,
                value: value.to_string(),
                reason,
            })
        };
        for (field, value) in [
            ("lr", self.lr),
            ("min_lr", self.min_lr),
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
        ] {
            if !value.is_finite() || value < 0.0 {
                return bad(field, value, "must be finite and >= 0");
            }
        }
        for (field, value) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return bad(field, value, "must be in [0, 1)");
            }
        }
        if !self.eps.is_finite() || self.eps <= 0.0 {
            return bad("eps", self.eps, "must be finite and > 0");
        }
        Ok(())
    }

    /// Learning rate at (0-based) `step`: linear warmup over `warmup_steps`, then cosine from `lr` to
    /// `min_lr` at `total_steps`, then `min_lr`.
    pub fn lr_at(&self, step: u64) -> f32 {
        let step = step as f64;
        let warm = self.warmup_steps as f64;
        if step < warm {
            return (self.lr as f64 * (step + 1.0) / warm) as f32;
        }
        let total = self.total_steps as f64;
        if step >= total || total <= warm {
            return self.min_lr;
        }
        let progress = (step - warm) / (total - warm);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (self.min_lr as f64 + (self.lr as f64 - self.min_lr as f64) * cos) as f32
    }
}

/// L2 norm of all gradients, accumulated in f64 in a fixed order (a parallel reduction could associate
/// differently from run to run and break bit-identical replays; this pass is cheap next to the step).
pub fn grad_norm(grads: &[f32]) -> f32 {
    let sq: f64 = grads.iter().map(|&g| (g as f64) * (g as f64)).sum();
    sq.sqrt() as f32
}

/// Scales `grads` so that their global norm is at most `max_norm` (0 disables). Returns the norm before
/// clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = grad_norm(grads);
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        grads.par_iter_mut().for_each(|g| *g *= scale);
    }
    norm
}

/// AdamW moments for every parameter of one model instance, mirroring its layout.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    /// First moments.
    pub m: Vec<f32>,
    /// Second moments.
    pub v: Vec<f32>,
    /// Per tensor: its span and whether it is weight-decayed.
    tensors: Vec<(Span, bool)>,
}

impl AdamW {
    /// Zeroed moments for `layout`.
    pub fn new(layout: &ParamLayout) -> Self {
        Self {
            m: vec![0.0; layout.total],
            v: vec![0.0; layout.total],
            tensors: layout.tensors.iter().map(|t| (t.span, t.decay)).collect(),
        }
    }

    /// One AdamW update of every parameter. `step` is the 1-based count of updates so far including this
    /// one (for bias correction).
    pub fn update(
        &mut self,
        cfg: &OptimConfig,
        params: &mut [f32],
        grads: &[f32],
        lr: f32,
        step: u64,
    ) {
        let all = Span {
            offset: 0,
            len: params.len(),
        };
        self.update_span(cfg, all, params, grads, lr, step);
    }

    /// One AdamW update restricted to `span` (e.g. one shard); tensors that straddle it are clipped to it.
    pub fn update_span(
        &mut self,
        cfg: &OptimConfig,
        span: Span,
        params: &mut [f32],
        grads: &[f32],
        lr: f32,
        step: u64,
    ) {
        let step = step.max(1) as i32;
        let bc1 = 1.0 - (cfg.beta1 as f64).powi(step);
        let bc2 = 1.0 - (cfg.beta2 as f64).powi(step);
        let (b1, b2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
        let (bc1, bc2) = (bc1 as f32, bc2 as f32);
        for &(t, decay) in &self.tensors {
            let lo = t.offset.max(span.offset);
            let hi = t.end().min(span.end());
            if lo >= hi {
                continue;
            }
            let wd = if decay { cfg.weight_decay } else { 0.0 };
            params[lo..hi]
                .par_iter_mut()
                .zip(&grads[lo..hi])
                .zip(&mut self.m[lo..hi])
                .zip(&mut self.v[lo..hi])
                .for_each(|(((p, &g), m), v)| {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let mh = *m / bc1;
                    let vh = *v / bc2;
                    *p -= lr * (mh / (vh.sqrt() + eps) + wd * *p);
                });
        }
    }
}
