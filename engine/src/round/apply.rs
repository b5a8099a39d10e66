//! What every holder of a shard (and the coordinator) does with a round's committed deltas: combine them
//! with a robust mean, then update the shard with the run's rule. Every step is deterministic (deltas in
//! payload-hash order, sequential f64 sums, the kernels' fixed-order AdamW), so all holders compute
//! bit-identical states and can compare hashes.
//!
//! ## The robust mean
//! Centered clipping ([`crate::aggregate::robust_mean`]) from the coordinate-wise median, 3 iterations, with
//! a radius set per shard and round from the deltas themselves: `tau = CLIP_RADIUS_FACTOR ·` the median L2
//! distance of the deltas to the coordinate-wise median. Honest deltas, whose distances to the median are all
//! about the same (gradient noise concentrates in high dimension), enter unchanged; one far away moves the
//! result by at most `tau / n` per iteration. A single delta is used as it is; two are averaged (their
//! distances to the median are equal, so neither is clipped).
//!
//! Each delta enters the mean at its weight (the commit's [`mana_protocol::AcceptedDeltas::weights`]: its
//! sender's standing, from 1 for a key with no record to 16), so a key that has done no useful work yet moves
//! the shard least; the median and the radius are not weighted.
//!
//! ## The update
//! - `sync`: one AdamW step ([`crate::aggregate::sync_step`], i.e. the kernels' AdamW restricted to the
//!   shard, with the same per-tensor weight-decay mask as full-model training) on the robust-mean gradient,
//!   with the moments stored in the shard state, at the learning rate of the shard's update count.
//! - `diloco`: Nesterov momentum ([`crate::aggregate::DilocoRule`]) with the round's outer lr and momentum,
//!   the buffer stored in `opt_m`.
//!
//! No deltas: the shard is returned unchanged (its step counts updates actually applied).

use mana_kernels::model::{ExpertSet, ParamLayout};
use mana_kernels::optim::AdamW;
use mana_protocol::{ContentHash, HyperParams, RoundAnnouncement, UpdateRule};

use super::balance::{ExpertLoads, balance_router};
use super::error::RoundError;
use super::spec::RunSpec;
use super::state::{RunShard, ShardRecord};
use crate::aggregate::{
    ClipConfig, Contribution, DilocoRule, NesterovState, coordinate_median, robust_mean, sync_step,
};

/// The centered-clipping radius, as a multiple of the median distance of the deltas to their
/// coordinate-wise median.
pub const CLIP_RADIUS_FACTOR: f64 = 2.0;
/// Centered-clipping iterations.
pub const CLIP_ITERATIONS: u32 = 3;

/// Applies round `round`'s accepted deltas of one shard (each with its payload hash) to `base`, with the
/// run's update rule (see the module doc), every delta at the same weight (the scorer and the simulator:
/// the network applies a commit's weights with [`apply_weighted_round`]). The result does not depend on the
/// order of `deltas`.
pub fn apply_round(
    spec: &RunSpec,
    hyper: &HyperParams,
    round: u64,
    base: &ShardRecord,
    deltas: &[(ContentHash, Vec<f32>)],
) -> Result<ShardRecord, RoundError> {
    apply_weighted_round(spec, hyper, round, base, deltas, &vec![1; deltas.len()])
}

/// A holder's whole update of one shard for round `ann`: [`apply_weighted_round`] with the commit's deltas
/// and weights, then, for the trunk, the router biases moved by the accepted trunk contributions' expert
/// `loads` ([`super::balance::balance_router`]; ignored for an expert). Every applier of a commit (the
/// coordinator, each holder, the simulator) calls this one function, so that all compute the same bytes.
pub fn apply_shard_round(
    spec: &RunSpec,
    ann: &RoundAnnouncement,
    base: &ShardRecord,
    deltas: &[(ContentHash, Vec<f32>)],
    weights: &[u32],
    loads: &[ExpertLoads],
) -> Result<ShardRecord, RoundError> {
    let mut next = apply_weighted_round(spec, &ann.hyper, ann.round, base, deltas, weights)?;
    if next.shard == mana_kernels::model::ShardId::Trunk && !deltas.is_empty() {
        balance_router(spec, ann, &mut next, loads)?;
    }
    Ok(next)
}

/// [`apply_round`] with each delta at its weight in the mean (`weights[i]` for `deltas[i]`, each at least
/// 1: a commit's [`mana_protocol::AcceptedDeltas::weights`]). The result does not depend on the order of
/// `deltas` as long as each keeps its weight.
pub fn apply_weighted_round(
    spec: &RunSpec,
    hyper: &HyperParams,
    round: u64,
    base: &ShardRecord,
    deltas: &[(ContentHash, Vec<f32>)],
    weights: &[u32],
) -> Result<ShardRecord, RoundError> {
    base.check(spec)?;
    if weights.len() != deltas.len() || weights.contains(&0) {
        return Err(RoundError::WrongLength {
            what: "weights (one of at least 1 per delta)",
            shard: base.shard.to_string(),
            expected: deltas.len(),
            got: weights.iter().filter(|w| **w > 0).count(),
        });
    }
    if deltas.is_empty() {
        return Ok(base.clone());
    }
    let shard = base.shard;
    for (_, d) in deltas {
        if d.len() != base.params.len() {
            return Err(RoundError::WrongLength {
                what: "delta",
                shard: shard.to_string(),
                expected: base.params.len(),
                got: d.len(),
            });
        }
        if d.iter().any(|x| !x.is_finite()) {
            return Err(RoundError::NonFinite {
                what: "delta",
                shard: shard.to_string(),
            });
        }
    }
    let mean = aggregate(deltas, weights)?;
    let mut next = base.clone();
    next.step = base.step + 1;
    match hyper.update_rule {
        UpdateRule::Sync => sync_update(spec, hyper, &mut next, base, &mean)?,
        UpdateRule::Diloco => {
            let rule = DilocoRule {
                lr: hyper.outer_lr,
                momentum: hyper.outer_momentum,
            };
            let mut state = NesterovState {
                buffer: std::mem::take(&mut next.opt_m),
            };
            rule.apply(&mut next.params, &mean, &mut state)?;
            next.opt_m = state.buffer;
        }
    }
    if next
        .params
        .iter()
        .chain(&next.opt_m)
        .chain(&next.opt_v)
        .any(|x| !x.is_finite())
    {
        tracing::warn!(%shard, round, "the update produced non-finite values");
        return Err(RoundError::NonFinite {
            what: "updated state",
            shard: shard.to_string(),
        });
    }
    Ok(next)
}

/// The robust mean of the deltas, each at its weight (see the module doc).
pub fn aggregate(
    deltas: &[(ContentHash, Vec<f32>)],
    weights: &[u32],
) -> Result<Vec<f32>, RoundError> {
    let contributions: Vec<Contribution<'_>> = deltas
        .iter()
        .zip(weights)
        .map(|((h, d), w)| Contribution {
            payload_hash: *h,
            values: d.as_slice(),
            weight: f64::from(*w),
        })
        .collect();
    if contributions.len() == 1 {
        // Also validates (finite) through the common path's checks above; one delta is its own mean.
        return Ok(contributions[0].values.to_vec());
    }
    let median = coordinate_median(&contributions)?;
    let mut distances: Vec<f64> = contributions
        .iter()
        .map(|c| {
            c.values
                .iter()
                .zip(&median)
                .map(|(&x, &m)| (f64::from(x) - f64::from(m)).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    distances.sort_by(f64::total_cmp);
    let mid = distances.len() / 2;
    let med = if distances.len() % 2 == 1 {
        distances[mid]
    } else {
        (distances[mid - 1] + distances[mid]) / 2.0
    };
    let tau = (CLIP_RADIUS_FACTOR * med) as f32;
    let cfg = if tau.is_finite() && tau > 0.0 {
        ClipConfig {
            tau,
            iterations: CLIP_ITERATIONS,
        }
    } else {
        // All deltas equal the median (e.g. identical): nothing to clip.
        ClipConfig {
            tau: f32::INFINITY,
            iterations: 1,
        }
    };
    Ok(robust_mean(&contributions, &cfg, Some(&median))?)
}

/// One AdamW step of `next` (a copy of `base`) with gradient `grad`.
fn sync_update(
    spec: &RunSpec,
    hyper: &HyperParams,
    next: &mut ShardRecord,
    base: &ShardRecord,
    grad: &[f32],
) -> Result<(), RoundError> {
    let shard = base.shard;
    let unknown = || RoundError::UnknownShard {
        shard: shard.to_string(),
    };
    let experts = ExpertSet::from_shards(&spec.model, &[shard]).map_err(|_| unknown())?;
    let layout = ParamLayout::new(&spec.model, &experts);
    let span = layout.shard_span(shard).ok_or_else(unknown)?;
    let cfg = spec.optim_config(hyper);
    let mut opt = AdamW::new(&layout);
    span.of_mut(&mut opt.m).copy_from_slice(&base.opt_m);
    span.of_mut(&mut opt.v).copy_from_slice(&base.opt_v);
    let mut params = vec![0.0f32; layout.total];
    span.of_mut(&mut params).copy_from_slice(&base.params);
    let mut scratch = vec![0.0f32; layout.total];
    let lr = cfg.lr_at(base.step);
    sync_step(
        &mut opt,
        &cfg,
        span,
        &mut params,
        &mut scratch,
        grad,
        lr,
        base.step + 1,
    )?;
    next.params = span.of(&params).to_vec();
    next.opt_m = span.of(&opt.m).to_vec();
    next.opt_v = span.of(&opt.v).to_vec();
    Ok(())
}
