//! The outer update rules: how a shard's holder turns the robust mean of the round's deltas into the shard's
//! next parameters.
//!
//! Sign convention: a delta is an outer *gradient*, pointing uphill. In `sync` mode it is the gradient of the
//! node's batch; in `diloco` mode it is `theta_base - theta_local` after the inner steps. Either way the
//! update moves parameters against it.
//!
//! - `sync` ([`sync_step`]): one AdamW step (the kernels' [`AdamW`], with its per-tensor weight-decay mask) on
//!   the robust-mean gradient: synchronous data parallelism, one inner step per round.
//! - `diloco` ([`DilocoRule`]): Nesterov momentum on the robust-mean pseudo-gradient, as PyTorch's SGD with
//!   `nesterov=True` (DiLoCo: lr 0.7, momentum 0.9): `b <- mu*b + g; theta <- theta - lr*(g + mu*b)`.
//!   With lr 1 and momentum 0 this is `theta_base - mean(theta_base - theta_local)`: plain averaging.
//!
//! Sparse low-bit deltas (SparseLoCo: per-block top-k, int2/int4 values) reach this rule decoded to dense
//! shards, so the robust mean and the step are the same code; what changes is the default: the sender's
//! error feedback already carries everything earlier rounds did not send, and momentum on top of it
//! measured worse, so such runs default to lr 1 and momentum 0 (`RunSpec::hyper_with_codec`). Note that
//! with three or more sparse contributions the robust mean's starting median is mostly 0 (each coordinate
//! is sent by few nodes), so the clipping radius alone bounds what one contribution can do.

use mana_kernels::model::Span;
use mana_kernels::optim::{AdamW, OptimConfig};
use serde::{Deserialize, Serialize};

use super::clip::AggregateError;

/// DiLoCo's outer optimizer settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DilocoRule {
    /// Outer learning rate (DiLoCo: 0.7; 1 with momentum 0 is plain averaging).
    pub lr: f32,
    /// Nesterov momentum (DiLoCo: 0.9), in [0, 1).
    pub momentum: f32,
}

/// The outer momentum buffer of one shard; it persists across rounds with the shard (and must be stored with
/// it, so a new holder continues the same trajectory).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NesterovState {
    /// One value per shard parameter; empty until the first step.
    pub buffer: Vec<f32>,
}

impl DilocoRule {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), AggregateError> {
        if !self.lr.is_finite() || self.lr < 0.0 {
            return Err(AggregateError::BadConfig {
                field: "outer lr",
                reason: "must be finite and >= 0",
            });
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(AggregateError::BadConfig {
                field: "outer momentum",
                reason: "must be in [0, 1)",
            });
        }
        Ok(())
    }

    /// Applies the outer gradient `grad` (the robust mean of the shard's deltas) to the shard's `params`.
    pub fn apply(
        &self,
        params: &mut [f32],
        grad: &[f32],
        state: &mut NesterovState,
    ) -> Result<(), AggregateError> {
        self.validate()?;
        if grad.len() != params.len() {
            return Err(AggregateError::LengthMismatch {
                what: "outer gradient",
                expected: params.len(),
                got: grad.len(),
            });
        }
        if state.buffer.is_empty() {
            state.buffer = vec![0.0; params.len()];
        }
        if state.buffer.len() != params.len() {
            return Err(AggregateError::LengthMismatch {
                what: "momentum buffer",
                expected: params.len(),
                got: state.buffer.len(),
            });
        }
        let (lr, mu) = (self.lr, self.momentum);
        for ((p, &g), b) in params.iter_mut().zip(grad).zip(state.buffer.iter_mut()) {
            *b = mu * *b + g;
            *p -= lr * (g + mu * *b);
        }
        Ok(())
    }
}

/// One AdamW step of the shard at `span` with the robust-mean gradient `shard_grad`.
///
/// `params` and `opt` cover the whole model layout (the kernels keep one flat buffer per model), and
/// `grads` is a scratch gradient buffer of the same length: the shard's part is overwritten with `shard_grad`,
/// the rest is left alone and not read. `step` is the 1-based count of updates of this shard.
#[allow(clippy::too_many_arguments)]
pub fn sync_step(
    opt: &mut AdamW,
    cfg: &OptimConfig,
    span: Span,
    params: &mut [f32],
    grads: &mut [f32],
    shard_grad: &[f32],
    lr: f32,
    step: u64,
) -> Result<(), AggregateError> {
    if cfg.validate().is_err() || !lr.is_finite() || lr < 0.0 {
        return Err(AggregateError::BadConfig {
            field: "sync optimizer",
            reason: "invalid AdamW settings or learning rate",
        });
    }
    let len = params.len();
    for (what, got) in [
        ("gradient buffer", grads.len()),
        ("AdamW m", opt.m.len()),
        ("AdamW v", opt.v.len()),
    ] {
        if got != len {
            return Err(AggregateError::LengthMismatch {
                what,
                expected: len,
                got,
            });
        }
    }
    if span.end() > len {
        return Err(AggregateError::LengthMismatch {
            what: "shard span end",
            expected: len,
            got: span.end(),
        });
    }
    if shard_grad.len() != span.len {
        return Err(AggregateError::LengthMismatch {
            what: "shard gradient",
            expected: span.len,
            got: shard_grad.len(),
        });
    }
    span.of_mut(grads).copy_from_slice(shard_grad);
    opt.update_span(cfg, span, params, grads, lr, step);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::aggregate::clip::{ClipConfig, Contribution, plain_mean, robust_mean};
    use mana_kernels::model::{ExpertSet, ModelConfig, ParamLayout};
    use mana_protocol::ContentHash;

    fn ramp(len: usize, k: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 * 0.37 + k).sin()) * 0.1)
            .collect()
    }

    #[test]
    fn diloco_with_lr_1_and_momentum_0_is_plain_averaging() {
        let len = 300;
        let base = ramp(len, 0.0);
        let locals: Vec<Vec<f32>> = (1..=4)
            .map(|k| {
                base.iter()
                    .zip(ramp(len, k as f32))
                    .map(|(b, d)| b + d)
                    .collect()
            })
            .collect();
        let deltas: Vec<Vec<f32>> = locals
            .iter()
            .map(|l| base.iter().zip(l).map(|(b, x)| b - x).collect())
            .collect();
        let cs: Vec<Contribution<'_>> = deltas
            .iter()
            .enumerate()
            .map(|(i, d)| Contribution {
                payload_hash: ContentHash::of(&[i as u8]),
                values: d,
                weight: 1.0,
            })
            .collect();
        let g = robust_mean(
            &cs,
            &ClipConfig {
                tau: f32::INFINITY,
                iterations: 1,
            },
            None,
        )
        .unwrap();
        let mean_delta = plain_mean(&cs).unwrap();

        let mut params = base.clone();
        let rule = DilocoRule {
            lr: 1.0,
            momentum: 0.0,
        };
        rule.apply(&mut params, &mean_delta, &mut NesterovState::default())
            .unwrap();
        // Exactly base - mean(delta), and (up to rounding) the mean of the local models.
        let expected: Vec<f32> = base.iter().zip(&mean_delta).map(|(b, m)| b - m).collect();
        assert_eq!(params, expected);
        for j in 0..len {
            let mean_local = locals.iter().map(|l| f64::from(l[j])).sum::<f64>() / 4.0;
            assert!((f64::from(params[j]) - mean_local).abs() < 1e-6, "{j}");
        }
        // The robust mean with an infinite radius agrees with the plain mean.
        let mut via_robust = base.clone();
        rule.apply(&mut via_robust, &g, &mut NesterovState::default())
            .unwrap();
        assert!(
            via_robust
                .iter()
                .zip(&params)
                .all(|(a, b)| (a - b).abs() < 1e-6)
        );
    }

    #[test]
    fn nesterov_matches_hand_computed_steps() {
        let rule = DilocoRule {
            lr: 0.5,
            momentum: 0.9,
        };
        let mut p = vec![1.0f32];
        let mut s = NesterovState::default();
        rule.apply(&mut p, &[0.2], &mut s).unwrap();
        // b = 0.2; p = 1 - 0.5 * (0.2 + 0.9 * 0.2) = 0.81
        assert!((p[0] - 0.81).abs() < 1e-6 && (s.buffer[0] - 0.2).abs() < 1e-7);
        rule.apply(&mut p, &[0.1], &mut s).unwrap();
        // b = 0.9 * 0.2 + 0.1 = 0.28; p = 0.81 - 0.5 * (0.1 + 0.9 * 0.28) = 0.634
        assert!((p[0] - 0.634).abs() < 1e-6, "{}", p[0]);
        assert!(rule.apply(&mut p, &[0.1, 0.2], &mut s).is_err());
        assert!(
            DilocoRule {
                lr: 1.0,
                momentum: 1.0
            }
            .apply(&mut p, &[0.1], &mut s)
            .is_err()
        );
    }

    #[test]
    fn sync_step_is_the_kernels_adamw_on_the_shard() {
        let cfg = ModelConfig::default();
        let layout = ParamLayout::new(&cfg, &ExpertSet::all(&cfg));
        let (_, span) = layout.shards[1];
        let ocfg = OptimConfig::default();
        let params0 = ramp(layout.total, 0.3);
        let shard_grad = ramp(span.len, 1.7);

        let mut opt = AdamW::new(&layout);
        let mut params = params0.clone();
        let mut scratch = vec![0.0; layout.total];
        sync_step(
            &mut opt,
            &ocfg,
            span,
            &mut params,
            &mut scratch,
            &shard_grad,
            1e-3,
            1,
        )
        .unwrap();

        // Reference: a full AdamW update whose gradient is the shard's inside it and zero outside, then only
        // the shard's parameters compared (outside, sync_step must not touch anything).
        let mut ref_opt = AdamW::new(&layout);
        let mut ref_params = params0.clone();
        let mut full = vec![0.0; layout.total];
        span.of_mut(&mut full).copy_from_slice(&shard_grad);
        ref_opt.update(&ocfg, &mut ref_params, &full, 1e-3, 1);
        assert_eq!(span.of(&params), span.of(&ref_params));
        assert_ne!(
            span.of(&params),
            span.of(&params0),
            "the step changed the shard"
        );
        for (i, (a, b)) in params.iter().zip(&params0).enumerate() {
            if i < span.offset || i >= span.end() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "parameter {i} outside the shard changed"
                );
            }
        }
        assert!(
            sync_step(
                &mut opt,
                &ocfg,
                span,
                &mut params,
                &mut scratch,
                &shard_grad[1..],
                1e-3,
                2
            )
            .is_err()
        );
    }
}
