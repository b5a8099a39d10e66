//! The delta codec's acceptance figures: FP8 alone compresses at least 3.8x, the round-trip relative error
//! on Gaussian-like deltas is at most 4%, and top-k at 1-5% density keeps the accumulated error bounded
//! across rounds thanks to error feedback (while without it the loss accumulates).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use mana_protocol::codec::{DELTA_HEADER_LEN, DeltaHeader};
use mana_protocol::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The acceptance bound on ||x - x_hat|| / ||x|| for dense FP8.
const MAX_DENSE_REL_ERROR: f64 = 0.04;
/// Worst case for a single value: half an E4M3 step relative to the value (3 mantissa bits).
const MAX_ELEMENT_REL_ERROR: f64 = 1.0 / 16.0;
/// The acceptance bound on the compression ratio of dense FP8.
const MIN_DENSE_RATIO: f64 = 3.8;

/// Gaussian-like values (Box-Muller over a seeded ChaCha), scaled like a real pseudo-gradient.
fn gaussian(n: usize, seed: u64, sigma: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(1e-300);
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * sigma
        })
        .collect()
}

fn rel_error(x: &[f32], y: &[f32]) -> f64 {
    let num: f64 = x
        .iter()
        .zip(y)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum();
    let den: f64 = x.iter().map(|a| f64::from(*a).powi(2)).sum();
    (num / den).sqrt()
}

fn all_dense_options() -> Vec<CodecOptions> {
    let mut out = Vec::new();
    for block_size in [128, 256] {
        for scale in [ScaleFormat::F32, ScaleFormat::PowerOfTwo] {
            out.push(CodecOptions {
                block_size,
                scale,
                top_k_density: None,
            });
        }
    }
    out
}

#[test]
fn dense_fp8_compresses_at_least_3_8x_with_at_most_4_percent_error() {
    let n = 1 << 16;
    for (seed, sigma) in [(1u64, 1e-3f32), (2, 1.0), (3, 1e-6)] {
        let x = gaussian(n, seed, sigma);
        for options in all_dense_options() {
            let payload = encode_delta(&x, &options).unwrap();
            let ratio = (4 * n) as f64 / payload.len() as f64;
            let y = decode_delta(&payload, n).unwrap();
            let err = rel_error(&x, &y);
            println!(
                "{options:?} sigma {sigma:e}: ratio {ratio:.3}x, relative error {:.3}%",
                100.0 * err
            );
            assert!(ratio >= MIN_DENSE_RATIO, "{options:?}: ratio {ratio}");
            assert!(err <= MAX_DENSE_REL_ERROR, "{options:?}: error {err}");
        }
    }
}

#[test]
fn heavy_tailed_deltas_stay_within_bound() {
    // Laplace-like: a Gaussian times an exponential-ish factor, so some blocks have outliers.
    let n = 1 << 15;
    let g = gaussian(n, 9, 1.0);
    let h = gaussian(n, 10, 1.0);
    let x: Vec<f32> = g.iter().zip(&h).map(|(a, b)| a * b.abs() * 1e-3).collect();
    for options in all_dense_options() {
        let y = decode_delta(&encode_delta(&x, &options).unwrap(), n).unwrap();
        assert!(rel_error(&x, &y) <= MAX_DENSE_REL_ERROR, "{options:?}");
    }
}

#[test]
fn small_and_odd_lengths_and_special_values_round_trip() {
    for n in [0usize, 1, 2, 127, 128, 129, 255, 256, 257, 1000] {
        let x = gaussian(n, n as u64, 0.5);
        for options in all_dense_options() {
            let payload = encode_delta(&x, &options).unwrap();
            let header = DeltaHeader::parse(&payload).unwrap();
            assert_eq!(header.len, n);
            assert_eq!(payload.len(), header.encoded_len());
            let y = decode_delta(&payload, n).unwrap();
            assert_eq!(y.len(), n);
            // The 4% bound is statistical; a handful of values can each be off by up to half an E4M3 step
            // (1/16 relative), e.g. one value that a power-of-two scale maps just under 448.
            let bound = if n >= 100 {
                MAX_DENSE_REL_ERROR
            } else {
                MAX_ELEMENT_REL_ERROR
            };
            if n > 0 {
                assert!(rel_error(&x, &y) <= bound, "n={n} {options:?}");
            }
        }
    }
    // Zeros, a huge range within a block, values at f32's extremes.
    let x = vec![
        0.0,
        -0.0,
        1e-30,
        -3e38,
        3e38,
        1.0,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE / 2.0,
    ];
    for options in all_dense_options() {
        let y = decode_delta(&encode_delta(&x, &options).unwrap(), x.len()).unwrap();
        assert!(y.iter().all(|v| v.is_finite()));
        assert_eq!(y[0], 0.0);
        assert!(
            (y[3] / x[3] - 1.0).abs() < 0.07 && (y[4] / x[4] - 1.0).abs() < 0.07,
            "{options:?}: {y:?}"
        );
    }
    let all_zero = vec![0.0f32; 300];
    assert_eq!(
        decode_delta(
            &encode_delta(&all_zero, &CodecOptions::default()).unwrap(),
            300
        )
        .unwrap(),
        all_zero
    );
}

#[test]
fn non_finite_inputs_and_bad_options_are_refused() {
    let opts = CodecOptions::default();
    assert_eq!(
        encode_delta(&[1.0, f32::NAN], &opts),
        Err(CodecError::NonFiniteInput { index: 1 })
    );
    assert_eq!(
        encode_delta(&[f32::INFINITY], &opts),
        Err(CodecError::NonFiniteInput { index: 0 })
    );
    for bad in [
        CodecOptions {
            block_size: 64,
            ..opts
        },
        CodecOptions {
            top_k_density: Some(0.0),
            ..opts
        },
        CodecOptions {
            top_k_density: Some(1.5),
            ..opts
        },
        CodecOptions {
            top_k_density: Some(f32::NAN),
            ..opts
        },
    ] {
        assert!(
            matches!(encode_delta(&[1.0], &bad), Err(CodecError::BadOptions(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn top_k_keeps_the_largest_values() {
    let x: Vec<f32> = (0..1000)
        .map(|i| {
            if i % 100 == 7 {
                10.0 + i as f32
            } else {
                0.001 * i as f32
            }
        })
        .collect();
    let opts = CodecOptions {
        top_k_density: Some(0.01),
        ..CodecOptions::default()
    };
    let payload = encode_delta(&x, &opts).unwrap();
    let header = DeltaHeader::parse(&payload).unwrap();
    assert!(header.sparse);
    assert_eq!(header.nnz, 10);
    let y = decode_delta(&payload, x.len()).unwrap();
    for (i, (a, b)) in x.iter().zip(&y).enumerate() {
        if i % 100 == 7 {
            assert!((a - b).abs() / a < 0.07, "kept value {i}: {a} vs {b}");
        } else {
            assert_eq!(*b, 0.0, "dropped value {i}");
        }
    }
    // 1% density: header + 10 indices + 1 scale + 10 codes.
    assert_eq!(payload.len(), DELTA_HEADER_LEN + 40 + 4 + 10);
}

/// Error feedback at 1-5% density: the sum of what the receiver decoded over R rounds tracks the sum of
/// the true deltas with an error that stops growing once the residual reaches its steady state (after
/// about 1/density rounds): that error is exactly the residual the sender still holds. Plain top-k instead
/// loses the same large share of every round for good, so its error grows with R.
#[test]
fn top_k_with_error_feedback_keeps_the_error_bounded_across_rounds() {
    let n = 2048;
    let rounds = 360;
    let window = rounds / 3;
    // A persistent direction plus fresh noise each round, like successive pseudo-gradients.
    let drift = gaussian(n, 100, 1e-3);
    for density in [0.01f32, 0.02, 0.05] {
        let opts = CodecOptions {
            top_k_density: Some(density),
            ..CodecOptions::default()
        };
        let mut with_feedback = DeltaEncoder::new(opts).unwrap();
        let mut true_sum = vec![0.0f64; n];
        let mut sum_ef = vec![0.0f64; n];
        let mut sum_plain = vec![0.0f64; n];
        let (mut errors_ef, mut errors_plain) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let noise = gaussian(n, 1000 + round as u64, 1e-3);
            let delta: Vec<f32> = drift.iter().zip(&noise).map(|(d, z)| d + z).collect();
            let got_ef = decode_delta(&with_feedback.encode(&delta).unwrap(), n).unwrap();
            let got_plain = decode_delta(&encode_delta(&delta, &opts).unwrap(), n).unwrap();
            for i in 0..n {
                true_sum[i] += f64::from(delta[i]);
                sum_ef[i] += f64::from(got_ef[i]);
                sum_plain[i] += f64::from(got_plain[i]);
            }
            let distance = |s: &[f64]| {
                true_sum
                    .iter()
                    .zip(s)
                    .map(|(t, s)| (t - s).powi(2))
                    .sum::<f64>()
                    .sqrt()
            };
            let err = distance(&sum_ef);
            // The accumulated error with feedback is exactly the residual still held by the sender.
            let held: f64 = with_feedback
                .residual()
                .iter()
                .map(|r| f64::from(*r).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(
                (held - err).abs() <= 1e-3 * err + 1e-6,
                "round {round}: residual {held} vs error {err}"
            );
            errors_ef.push(err);
            errors_plain.push(distance(&sum_plain));
        }
        let max_in = |e: &[f64], w: usize| {
            e[w * window..(w + 1) * window]
                .iter()
                .cloned()
                .fold(0.0, f64::max)
        };
        let norm: f64 = true_sum.iter().map(|t| t * t).sum::<f64>().sqrt();
        println!(
            "density {density}: max error with feedback per third of {rounds} rounds: {:.4} {:.4} {:.4}; without: {:.4} {:.4} {:.4}; \
             final relative error of the sum: {:.4} with feedback, {:.4} without",
            max_in(&errors_ef, 0),
            max_in(&errors_ef, 1),
            max_in(&errors_ef, 2),
            max_in(&errors_plain, 0),
            max_in(&errors_plain, 1),
            max_in(&errors_plain, 2),
            errors_ef[rounds - 1] / norm,
            errors_plain[rounds - 1] / norm,
        );
        // Bounded: the last third's worst error is no worse than the middle third's (up to noise)...
        assert!(
            max_in(&errors_ef, 2) <= 1.1 * max_in(&errors_ef, 1),
            "density {density}: error keeps growing"
        );
        // ...while without feedback it keeps growing with the number of rounds.
        assert!(
            max_in(&errors_plain, 2) >= 1.3 * max_in(&errors_plain, 1),
            "density {density}: plain top-k did not grow"
        );
        assert!(
            errors_ef[rounds - 1] < 0.25 * errors_plain[rounds - 1],
            "density {density}"
        );
    }
}

#[test]
fn encoder_refuses_a_change_of_length() {
    let mut enc = DeltaEncoder::new(CodecOptions::default()).unwrap();
    enc.encode(&[1.0; 10]).unwrap();
    assert_eq!(
        enc.encode(&[1.0; 11]),
        Err(CodecError::LengthChanged {
            expected: 10,
            got: 11
        })
    );
}

#[test]
fn hostile_headers_are_refused_without_allocating() {
    let good = encode_delta(&gaussian(300, 5, 1.0), &CodecOptions::default()).unwrap();
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    assert_eq!(decode_delta(&bad_magic, 300), Err(CodecError::BadMagic));
    let mut bad_version = good.clone();
    bad_version[4] = 2;
    assert_eq!(
        decode_delta(&bad_version, 300),
        Err(CodecError::UnsupportedVersion(2))
    );
    let mut bad_flags = good.clone();
    bad_flags[5] = 4;
    assert!(matches!(
        decode_delta(&bad_flags, 300),
        Err(CodecError::BadHeader(_))
    ));
    // A header claiming 2^28 values in a tiny payload: refused by length, nothing allocated.
    let mut huge = good[..DELTA_HEADER_LEN].to_vec();
    huge[8..12].copy_from_slice(&(1u32 << 28).to_le_bytes());
    huge[12..16].copy_from_slice(&(1u32 << 28).to_le_bytes());
    assert!(matches!(
        decode_delta(&huge, usize::MAX),
        Err(CodecError::Truncated { .. })
    ));
    // A sparse header with one value at a huge index: refused by the caller's max length.
    let sparse = encode_delta(
        &[0.0, 1.0],
        &CodecOptions {
            top_k_density: Some(0.5),
            ..CodecOptions::default()
        },
    )
    .unwrap();
    let mut far = sparse.clone();
    far[8..12].copy_from_slice(&(1u32 << 28).to_le_bytes());
    far[16..20].copy_from_slice(&((1u32 << 28) - 1).to_le_bytes());
    assert!(matches!(
        decode_delta(&far, 1 << 20),
        Err(CodecError::TooLong { .. })
    ));
    // Unordered sparse indices.
    let two = encode_delta(
        &[1.0, 2.0, 3.0],
        &CodecOptions {
            top_k_density: Some(0.6),
            ..CodecOptions::default()
        },
    )
    .unwrap();
    let mut swapped = two.clone();
    swapped[16..20].copy_from_slice(&2u32.to_le_bytes());
    swapped[20..24].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        decode_delta(&swapped, 3),
        Err(CodecError::BadIndex { .. })
    ));
    // A NaN code and a NaN scale.
    let mut nan_code = good.clone();
    let last = nan_code.len() - 1;
    nan_code[last] = 0x7f;
    assert!(matches!(
        decode_delta(&nan_code, 300),
        Err(CodecError::BadValue { .. })
    ));
    let mut nan_scale = good.clone();
    nan_scale[16..20].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(matches!(
        decode_delta(&nan_scale, 300),
        Err(CodecError::BadValue { .. })
    ));
    // Trailing bytes.
    let mut longer = good.clone();
    longer.push(0);
    assert_eq!(
        decode_delta(&longer, 300),
        Err(CodecError::TrailingBytes(1))
    );
}
