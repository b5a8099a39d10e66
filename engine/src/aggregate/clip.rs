//! The robust mean of one shard's accepted deltas: centered clipping (Karimireddy, He & Jaggi, "Learning from
//! History for Byzantine Robust Optimization", 2021).
//!
//! Starting from a robust guess `v` (the coordinate-wise median, or a caller-given point such as the last
//! round's aggregate), each iteration does `v <- v + (1/W) * sum_i w_i * clip(x_i - v, tau)` with
//! `clip(d, tau) = d * min(1, tau / ||d||)`, `w_i` contribution `i`'s weight and `W` their sum (all 1: the
//! plain `1/n`). One contribution can therefore move `v` by at most `tau * w_i / W` per iteration however
//! large it is, while honest contributions within `tau` of `v` enter unchanged. The starting median is not
//! weighted: it is the guess a minority cannot move, whatever weight it has.
//!
//! Every holder of a shard must compute bit-identical results, so contributions are processed in payload-hash
//! order (never arrival order) and every sum runs sequentially in f64.

use mana_protocol::ContentHash;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// One accepted delta of a shard.
#[derive(Debug, Clone, Copy)]
pub struct Contribution<'a> {
    /// blake3 of its encoded payload: its identity and its place in the aggregation order.
    pub payload_hash: ContentHash,
    /// The decoded delta.
    pub values: &'a [f32],
    /// Its weight in the mean (positive; 1 for all gives the plain mean).
    pub weight: f64,
}

/// Settings of centered clipping.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    /// Clipping radius, in the L2 norm of a whole shard delta. `f32::INFINITY` disables clipping (plain mean).
    pub tau: f32,
    /// Clipping iterations (Karimireddy et al. find 1-3 enough when starting near the honest mean).
    pub iterations: u32,
}

impl Default for ClipConfig {
    fn default() -> Self {
        ClipConfig {
            tau: 1.0,
            iterations: 3,
        }
    }
}

/// Why a robust mean could not be computed.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AggregateError {
    /// Nothing to aggregate.
    #[error("no contributions to aggregate")]
    NoContributions,
    /// A buffer does not have the shard's length.
    #[error("{what} has {got} values, the shard has {expected}")]
    LengthMismatch {
        /// Which buffer.
        what: &'static str,
        /// The shard's length.
        expected: usize,
        /// The buffer's length.
        got: usize,
    },
    /// A contribution holds a NaN or an infinity (validation should have refused it).
    #[error("contribution {0} is not finite")]
    NonFinite(ContentHash),
    /// The same payload was given twice (it would count double).
    #[error("contribution {0} appears twice")]
    Duplicate(ContentHash),
    /// A setting is out of range.
    #[error("aggregation setting {field}: {reason}")]
    BadConfig {
        /// The setting.
        field: &'static str,
        /// What it must satisfy.
        reason: &'static str,
    },
}

impl ClipConfig {
    /// Checks the ranges: `tau` positive (infinity allowed), at least one iteration.
    pub fn validate(&self) -> Result<(), AggregateError> {
        if self.tau.is_nan() || self.tau <= 0.0 {
            return Err(AggregateError::BadConfig {
                field: "tau",
                reason: "must be positive",
            });
        }
        if self.iterations == 0 {
            return Err(AggregateError::BadConfig {
                field: "iterations",
                reason: "must be at least 1",
            });
        }
        Ok(())
    }
}

/// Sorts by payload hash and checks lengths, finiteness and duplicates.
fn ordered<'a>(
    contributions: &[Contribution<'a>],
) -> Result<(Vec<Contribution<'a>>, usize), AggregateError> {
    let first = contributions
        .first()
        .ok_or(AggregateError::NoContributions)?;
    let len = first.values.len();
    let mut sorted = contributions.to_vec();
    sorted.sort_by_key(|c| c.payload_hash);
    for (i, c) in sorted.iter().enumerate() {
        if c.values.len() != len {
            return Err(AggregateError::LengthMismatch {
                what: "contribution",
                expected: len,
                got: c.values.len(),
            });
        }
        if i > 0 && sorted[i - 1].payload_hash == c.payload_hash {
            return Err(AggregateError::Duplicate(c.payload_hash));
        }
        if c.values.iter().any(|v| !v.is_finite()) {
            return Err(AggregateError::NonFinite(c.payload_hash));
        }
        if !(c.weight.is_finite() && c.weight > 0.0) {
            return Err(AggregateError::BadConfig {
                field: "weight",
                reason: "must be positive and finite",
            });
        }
    }
    Ok((sorted, len))
}

/// The plain weighted arithmetic mean, in payload-hash order with f64 sums: the non-robust reference.
pub fn plain_mean(contributions: &[Contribution<'_>]) -> Result<Vec<f32>, AggregateError> {
    let (sorted, len) = ordered(contributions)?;
    let mut acc = vec![0f64; len];
    for c in &sorted {
        for (a, &x) in acc.iter_mut().zip(c.values) {
            *a += c.weight * f64::from(x);
        }
    }
    let n = total_weight(&sorted);
    Ok(acc.into_iter().map(|a| (a / n) as f32).collect())
}

/// The sum of the weights, in payload-hash order (so every holder adds them alike).
fn total_weight(sorted: &[Contribution<'_>]) -> f64 {
    sorted.iter().map(|c| c.weight).sum()
}

/// The coordinate-wise median (mean of the middle two for an even count): the default starting point, itself
/// robust to a minority of outliers and independent of input order.
pub fn coordinate_median(contributions: &[Contribution<'_>]) -> Result<Vec<f32>, AggregateError> {
    let (sorted, len) = ordered(contributions)?;
    let n = sorted.len();
    let mut column = vec![0f32; n];
    let mut out = Vec::with_capacity(len);
    for j in 0..len {
        for (slot, c) in column.iter_mut().zip(&sorted) {
            *slot = c.values[j];
        }
        column.sort_by(f32::total_cmp);
        let mid = n / 2;
        out.push(if n % 2 == 1 {
            column[mid]
        } else {
            ((f64::from(column[mid - 1]) + f64::from(column[mid])) / 2.0) as f32
        });
    }
    Ok(out)
}

/// The centered-clipping robust mean of `contributions` (all of one shard), starting from `start` or, when
/// `None`, from the coordinate-wise median. The result does not depend on the order of `contributions`.
pub fn robust_mean(
    contributions: &[Contribution<'_>],
    cfg: &ClipConfig,
    start: Option<&[f32]>,
) -> Result<Vec<f32>, AggregateError> {
    cfg.validate()?;
    let (sorted, len) = ordered(contributions)?;
    let mut v = match start {
        Some(s) if s.len() != len => {
            return Err(AggregateError::LengthMismatch {
                what: "start",
                expected: len,
                got: s.len(),
            });
        }
        Some(s) if s.iter().any(|x| !x.is_finite()) => {
            return Err(AggregateError::BadConfig {
                field: "start",
                reason: "must be finite",
            });
        }
        Some(s) => s.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>(),
        None => coordinate_median(&sorted)?
            .into_iter()
            .map(f64::from)
            .collect(),
    };
    let tau = f64::from(cfg.tau);
    let n = total_weight(&sorted);
    let mut acc = vec![0f64; len];
    for _ in 0..cfg.iterations {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for c in &sorted {
            let norm = c
                .values
                .iter()
                .zip(&v)
                .map(|(&x, &vj)| (f64::from(x) - vj).powi(2))
                .sum::<f64>()
                .sqrt();
            let scale = c.weight * if norm > tau { tau / norm } else { 1.0 };
            for ((a, &x), &vj) in acc.iter_mut().zip(c.values).zip(&v) {
                *a += scale * (f64::from(x) - vj);
            }
        }
        for (vj, a) in v.iter_mut().zip(&acc) {
            *vj += a / n;
        }
    }
    Ok(v.into_iter().map(|x| x as f32).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1) (splitmix64), so the tests need no rng crate.
    fn values(seed: u64, len: usize) -> Vec<f32> {
        let mut rng = mana_kernels::rng::SplitMix64(seed);
        (0..len).map(|_| rng.next_signed_unit()).collect()
    }

    fn norm(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    fn hash(i: usize) -> ContentHash {
        ContentHash::of(&i.to_le_bytes())
    }

    #[test]
    fn centered_clipping_bounds_an_outlier() {
        // Six honest deltas scattered around a common direction, plus one that is 100x an honest delta.
        let len = 512;
        let center = values(1, len);
        let honest: Vec<Vec<f32>> = (0..6)
            .map(|i| {
                center
                    .iter()
                    .zip(values(10 + i, len))
                    .map(|(c, n)| c + 0.05 * n)
                    .collect()
            })
            .collect();
        let outlier: Vec<f32> = honest[0].iter().map(|x| x * 100.0).collect();
        let honest_c: Vec<Contribution<'_>> = honest
            .iter()
            .enumerate()
            .map(|(i, v)| Contribution {
                payload_hash: hash(i),
                values: v,
                weight: 1.0,
            })
            .collect();
        let mut all = honest_c.clone();
        all.push(Contribution {
            payload_hash: hash(99),
            values: &outlier,
            weight: 1.0,
        });

        let honest_mean = plain_mean(&honest_c).unwrap();
        let naive = plain_mean(&all).unwrap();
        // tau above the honest spread (each honest delta is ~0.05 * sqrt(len/3) ~ 0.65 from the center).
        let cfg = ClipConfig {
            tau: 2.0,
            iterations: 3,
        };
        let robust = robust_mean(&all, &cfg, None).unwrap();

        let naive_shift = norm(&naive, &honest_mean);
        let robust_shift = norm(&robust, &honest_mean);
        // The outlier may move v by tau/n per iteration: 3 * 2/7 < 0.86; the median start adds a little.
        let bound = f64::from(cfg.iterations) * f64::from(cfg.tau) / all.len() as f64;
        assert!(
            naive_shift > 100.0,
            "the plain mean is dragged far away: {naive_shift}"
        );
        assert!(
            robust_shift <= bound,
            "robust mean moved {robust_shift}, bound {bound}"
        );
        assert!(robust_shift < f64::from(cfg.tau));
    }

    #[test]
    fn without_outliers_and_with_a_wide_radius_it_is_the_mean() {
        let vs: Vec<Vec<f32>> = (0..5).map(|i| values(i, 64)).collect();
        let cs: Vec<Contribution<'_>> = vs
            .iter()
            .enumerate()
            .map(|(i, v)| Contribution {
                payload_hash: hash(i),
                values: v,
                weight: 1.0,
            })
            .collect();
        let mean = plain_mean(&cs).unwrap();
        let robust = robust_mean(
            &cs,
            &ClipConfig {
                tau: f32::INFINITY,
                iterations: 1,
            },
            None,
        )
        .unwrap();
        assert!(norm(&mean, &robust) < 1e-6, "{}", norm(&mean, &robust));
    }

    #[test]
    fn bit_identical_under_permuted_input_order() {
        let vs: Vec<Vec<f32>> = (0..9)
            .map(|i| {
                values(100 + i, 1000)
                    .iter()
                    .map(|x| x * (1.0 + i as f32))
                    .collect()
            })
            .collect();
        let cs: Vec<Contribution<'_>> = vs
            .iter()
            .enumerate()
            .map(|(i, v)| Contribution {
                payload_hash: hash(i),
                values: v,
                weight: 1.0,
            })
            .collect();
        let cfg = ClipConfig {
            tau: 3.0,
            iterations: 3,
        };
        let reference = robust_mean(&cs, &cfg, None).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        for rot in 1..cs.len() {
            let mut perm = cs.clone();
            perm.rotate_left(rot);
            if rot % 2 == 0 {
                perm.reverse();
            }
            assert_eq!(
                bits(&robust_mean(&perm, &cfg, None).unwrap()),
                bits(&reference),
                "rotation {rot}"
            );
            assert_eq!(
                bits(&plain_mean(&perm).unwrap()),
                bits(&plain_mean(&cs).unwrap())
            );
        }
    }

    #[test]
    fn weights_scale_each_contributions_share() {
        static A: [f32; 3] = [1.0, 0.0, 2.0];
        static B: [f32; 3] = [3.0, 4.0, -2.0];
        let c = |i, v: &'static [f32], w| Contribution {
            payload_hash: hash(i),
            values: v,
            weight: w,
        };
        // Weights 1 and 3: a quarter of A and three quarters of B.
        let plain = plain_mean(&[c(0, &A, 1.0), c(1, &B, 3.0)]).unwrap();
        assert_eq!(plain, vec![2.5, 3.0, -1.0]);
        // Without clipping the robust mean is the weighted mean, from any start.
        let unclipped = ClipConfig {
            tau: f32::INFINITY,
            iterations: 1,
        };
        let robust = robust_mean(&[c(0, &A, 1.0), c(1, &B, 3.0)], &unclipped, None).unwrap();
        assert_eq!(robust, plain);
        // Equal weights of any size are the plain mean, bit for bit.
        let ones = robust_mean(
            &[c(0, &A, 1.0), c(1, &B, 1.0)],
            &ClipConfig::default(),
            None,
        );
        let sevens = robust_mean(
            &[c(0, &A, 7.0), c(1, &B, 7.0)],
            &ClipConfig::default(),
            None,
        );
        assert_eq!(ones, sevens);
        // A clipped outlier of weight w moves the result by at most tau * w / W.
        static FAR: [f32; 3] = [1000.0, 0.0, 0.0];
        let tight = ClipConfig {
            tau: 1.0,
            iterations: 1,
        };
        let start = [0.0f32; 3];
        let moved = robust_mean(
            &[c(0, &[0.0; 3], 3.0), c(1, &FAR, 1.0)],
            &tight,
            Some(&start),
        )
        .unwrap();
        assert!((moved[0] - 0.25).abs() < 1e-6, "{moved:?}");
        for w in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                plain_mean(&[c(0, &A, w)]),
                Err(AggregateError::BadConfig {
                    field: "weight",
                    ..
                })
            ));
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        static A: [f32; 2] = [1.0, 2.0];
        static B: [f32; 1] = [1.0];
        static NAN: [f32; 2] = [f32::NAN, 0.0];
        let (a, b, nan) = (&A, &B, &NAN);
        let cfg = ClipConfig::default();
        assert_eq!(
            robust_mean(&[], &cfg, None),
            Err(AggregateError::NoContributions)
        );
        let c = |i, v: &'static [f32]| Contribution {
            payload_hash: hash(i),
            values: v,
            weight: 1.0,
        };
        assert!(matches!(
            robust_mean(&[c(0, a), c(1, b)], &cfg, None),
            Err(AggregateError::LengthMismatch { .. })
        ));
        assert!(matches!(
            robust_mean(&[c(0, a), c(1, nan)], &cfg, None),
            Err(AggregateError::NonFinite(_))
        ));
        assert!(matches!(
            robust_mean(&[c(0, a), c(0, a)], &cfg, None),
            Err(AggregateError::Duplicate(_))
        ));
        assert!(matches!(
            robust_mean(&[c(0, a)], &cfg, Some(b)),
            Err(AggregateError::LengthMismatch { .. })
        ));
        for bad in [
            ClipConfig {
                tau: 0.0,
                iterations: 1,
            },
            ClipConfig {
                tau: f32::NAN,
                iterations: 1,
            },
            ClipConfig {
                tau: 1.0,
                iterations: 0,
            },
        ] {
            assert!(matches!(
                robust_mean(&[c(0, a)], &bad, None),
                Err(AggregateError::BadConfig { .. })
            ));
        }
    }
}
