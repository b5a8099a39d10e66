//! The delta codec's acceptance figures: FP8 alone compresses at least 3.8x, the round-trip relative error
//! on Gaussian-like deltas is at most 4%, and top-k at 1-5% density keeps the accumulated error bounded
//! across rounds thanks to error feedback (while without it the loss accumulates). The per-block low-bit
//! layout (version 2): exact sizes, the per-block top-k choice against a naive oracle, error bounds per value
//! format, determinism, error feedback, and hostile headers.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use mana_protocol::codec::{DELTA_HEADER_LEN, DeltaHeader, INT2_LEVELS};
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
                ..CodecOptions::default()
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
    for density in [0.01f32, 0.02, 0.05] {
        let opts = CodecOptions {
            top_k_density: Some(density),
            ..CodecOptions::default()
        };
        let run = FeedbackRun::measure(&opts, 360, 100, 1000);
        let label = format!("density {density}");
        run.print(&label);
        run.assert_bounded_and_better_than_plain(&label);
    }
}

/// Sums over the rounds of an error-feedback experiment: a persistent direction plus fresh noise each round
/// (like successive pseudo-gradients), sent through one encoder with feedback and through plain encoding.
struct FeedbackRun {
    /// Distance between the true sum and the feedback sum, after each round.
    errors_ef: Vec<f64>,
    /// The same without feedback.
    errors_plain: Vec<f64>,
    /// Norm of the true sum at the end.
    norm: f64,
}

impl FeedbackRun {
    /// Runs `rounds` rounds of 2048 values under `opts`, checking every round that the feedback sum's error
    /// is exactly the residual the sender still holds.
    fn measure(
        opts: &CodecOptions,
        rounds: usize,
        drift_seed: u64,
        noise_seed: u64,
    ) -> FeedbackRun {
        let n = 2048;
        let drift = gaussian(n, drift_seed, 1e-3);
        let mut encoder = DeltaEncoder::new(*opts).unwrap();
        let (mut true_sum, mut sum_ef, mut sum_plain) =
            (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
        let (mut errors_ef, mut errors_plain) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let noise = gaussian(n, noise_seed + round as u64, 1e-3);
            let delta: Vec<f32> = drift.iter().zip(&noise).map(|(d, z)| d + z).collect();
            let got = decode_delta(&encoder.encode(&delta).unwrap(), n).unwrap();
            let plain = decode_delta(&encode_delta(&delta, opts).unwrap(), n).unwrap();
            for i in 0..n {
                true_sum[i] += f64::from(delta[i]);
                sum_ef[i] += f64::from(got[i]);
                sum_plain[i] += f64::from(plain[i]);
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
            let held = encoder
                .residual()
                .iter()
                .map(|r| f64::from(*r).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(
                (held - err).abs() <= 1e-3 * err + 1e-6,
                "{opts:?} round {round}: residual {held} vs error {err}"
            );
            errors_ef.push(err);
            errors_plain.push(distance(&sum_plain));
        }
        let norm = true_sum.iter().map(|t| t * t).sum::<f64>().sqrt();
        FeedbackRun {
            errors_ef,
            errors_plain,
            norm,
        }
    }

    /// The worst error of `errors` in third `w` (0, 1, 2) of the rounds.
    fn max_in(errors: &[f64], w: usize) -> f64 {
        let window = errors.len() / 3;
        errors[w * window..(w + 1) * window]
            .iter()
            .cloned()
            .fold(0.0, f64::max)
    }

    fn last(errors: &[f64]) -> f64 {
        errors.last().copied().unwrap_or(0.0)
    }

    fn print(&self, label: &str) {
        let (ef, plain) = (&self.errors_ef, &self.errors_plain);
        println!(
            "{label}: max error with feedback per third of {} rounds: {:.4} {:.4} {:.4}; without: {:.4} {:.4} {:.4}; \
             final relative error of the sum: {:.4} with feedback, {:.4} without",
            ef.len(),
            Self::max_in(ef, 0),
            Self::max_in(ef, 1),
            Self::max_in(ef, 2),
            Self::max_in(plain, 0),
            Self::max_in(plain, 1),
            Self::max_in(plain, 2),
            Self::last(ef) / self.norm,
            Self::last(plain) / self.norm,
        );
    }

    /// With feedback the error stops growing (the last third's worst no worse than the middle third's, up to
    /// noise); without, it keeps growing; and at the end feedback is far closer to the true sum.
    fn assert_bounded_and_better_than_plain(&self, label: &str) {
        let (ef, plain) = (&self.errors_ef, &self.errors_plain);
        assert!(
            Self::max_in(ef, 2) <= 1.1 * Self::max_in(ef, 1),
            "{label}: error keeps growing"
        );
        assert!(
            Self::max_in(plain, 2) >= 1.3 * Self::max_in(plain, 1),
            "{label}: plain encoding did not drift"
        );
        assert!(Self::last(ef) < 0.25 * Self::last(plain), "{label}");
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
    bad_version[4] = 3;
    assert_eq!(
        decode_delta(&bad_version, 300),
        Err(CodecError::UnsupportedVersion(3))
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

// ---- version 2: per-block top-k with int2 / int4 / FP8 values ----

/// Worst relative L2 error of the kept values of int2 on Gaussian-like data (measured 12-15%, see
/// `INT2_LEVELS`), with room for power-of-two scales, whose rounding moves both levels by up to 41%.
const MAX_INT2_KEPT_REL_ERROR: f64 = 0.40;
/// Int4 with an f32 scale (amax): each kept value is within one step, amax/8, of the truth (half a step
/// above amax/8, a whole one below it, where the smallest level is amax/8). A power-of-two scale is up to
/// 2·amax, so twice that.
const INT4_F32_BOUND: f32 = 1.0 / 8.0;

fn block_options(
    values: ValueFormat,
    density: Option<f32>,
    block_size: u16,
    scale: ScaleFormat,
) -> CodecOptions {
    CodecOptions {
        block_size,
        scale,
        top_k_density: density,
        values,
        top_k_per_block: density.is_some(),
    }
}

fn all_block_options() -> Vec<CodecOptions> {
    let mut out = Vec::new();
    for values in [ValueFormat::Int2, ValueFormat::Int4, ValueFormat::Fp8] {
        for density in [Some(0.01f32), Some(0.03), Some(0.05), None] {
            for block_size in [128u16, 256] {
                for scale in [ScaleFormat::F32, ScaleFormat::PowerOfTwo] {
                    if values != ValueFormat::Int4 && density.is_none() {
                        continue; // dense FP8 is version 1's; dense int2 is refused
                    }
                    out.push(block_options(values, density, block_size, scale));
                }
            }
        }
    }
    out
}

/// The naive oracle of per-block top-k: in each block, sort positions by (|v| descending, position) and keep
/// the first k.
fn oracle_kept(x: &[f32], block: usize, k: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for (b, chunk) in x.chunks(block).enumerate() {
        let mut order: Vec<usize> = (0..chunk.len()).collect();
        order.sort_by(|&i, &j| chunk[j].abs().total_cmp(&chunk[i].abs()).then(i.cmp(&j)));
        let mut kept: Vec<usize> = order.into_iter().take(k).map(|p| b * block + p).collect();
        kept.sort();
        out.extend(kept);
    }
    out
}

#[test]
fn per_block_top_k_keeps_each_blocks_largest_values_within_the_format_bound() {
    for n in [1usize, 100, 128, 129, 300, 4096, 5000] {
        let x = gaussian(n, 40 + n as u64, 1e-3);
        for options in all_block_options() {
            let payload = encode_delta(&x, &options).unwrap();
            let header = DeltaHeader::parse(&payload).unwrap();
            let block = usize::from(options.block_size);
            let k = options.per_block_k();
            assert_eq!(payload[4], codec::DELTA_VERSION_BLOCKS);
            assert_eq!(
                (header.len, header.block_k, header.values),
                (n, Some(k), options.values)
            );
            assert_eq!(payload.len(), header.encoded_len());
            assert_eq!(payload.len(), codec::encoded_len(n, &options).unwrap());
            let kept = oracle_kept(&x, block, k);
            assert_eq!(header.nnz, kept.len(), "{options:?}");
            let y = decode_delta(&payload, n).unwrap();
            let is_kept: Vec<bool> = {
                let mut v = vec![false; n];
                kept.iter().for_each(|&i| v[i] = true);
                v
            };
            for i in 0..n {
                if !is_kept[i] {
                    assert_eq!(y[i], 0.0, "{options:?} n={n}: dropped value {i}");
                } else {
                    assert!(
                        y[i] == 0.0 || y[i].signum() == x[i].signum(),
                        "{options:?}: sign of {i}"
                    );
                }
            }
            for (b, chunk) in x.chunks(block).enumerate() {
                let kept_here: Vec<usize> =
                    kept.iter().copied().filter(|&i| i / block == b).collect();
                let amax = kept_here.iter().fold(0.0f32, |m, &i| m.max(x[i].abs()));
                for &i in &kept_here {
                    let err = (x[i] - y[i]).abs();
                    match options.values {
                        ValueFormat::Fp8 => assert!(
                            err <= x[i].abs() / 16.0 + amax * 1e-5,
                            "{options:?}: value {i} {} vs {}",
                            x[i],
                            y[i]
                        ),
                        ValueFormat::Int4 => {
                            let bound = if options.scale == ScaleFormat::F32 {
                                amax * INT4_F32_BOUND
                            } else {
                                2.0 * amax * INT4_F32_BOUND
                            };
                            assert!(
                                err <= bound * 1.0001,
                                "{options:?}: value {i} {} vs {}",
                                x[i],
                                y[i]
                            );
                        }
                        ValueFormat::Int2 => {}
                    }
                }
                let _ = chunk;
            }
            if options.values == ValueFormat::Int2 && n >= 4096 {
                let (xs, ys): (Vec<f32>, Vec<f32>) = kept.iter().map(|&i| (x[i], y[i])).unzip();
                let err = rel_error(&xs, &ys);
                println!(
                    "{options:?} n={n}: int2 relative error of the kept values {:.1}%",
                    100.0 * err
                );
                assert!(err <= MAX_INT2_KEPT_REL_ERROR, "{options:?}: {err}");
            }
        }
    }
}

#[test]
fn per_block_payload_sizes_are_exact_and_small() {
    // 4096 values, block 128, density 3%: k = 4 per block, 32 blocks, 128 kept values.
    let x = gaussian(4096, 77, 1.0);
    let expect = |values: ValueFormat, scale: ScaleFormat, bits: usize| {
        let options = block_options(values, Some(0.03), 128, scale);
        let len = encode_delta(&x, &options).unwrap().len();
        let scale_bytes = if scale == ScaleFormat::F32 { 4 } else { 1 };
        assert_eq!(
            len,
            DELTA_HEADER_LEN + 32 * scale_bytes + 128 * 7 / 8 + 128 * bits / 8,
            "{values:?} {scale:?}"
        );
        let per_value = (len - DELTA_HEADER_LEN) as f64 / 128.0;
        println!(
            "{values:?} {scale:?}, block 128, k 4: {len} bytes, {per_value:.3} bytes per kept value \
             (0.875 of them the position), {:.1}x smaller than f32",
            (4 * 4096) as f64 / len as f64
        );
        per_value
    };
    assert!(expect(ValueFormat::Int2, ScaleFormat::PowerOfTwo, 2) <= 1.4);
    assert!(expect(ValueFormat::Int2, ScaleFormat::F32, 2) <= 2.2);
    expect(ValueFormat::Int4, ScaleFormat::PowerOfTwo, 4);
    expect(ValueFormat::Int4, ScaleFormat::F32, 4);
    expect(ValueFormat::Fp8, ScaleFormat::F32, 8);
    // Version 1's global top-k of the same 128 values: 4-byte indices, one byte per code.
    let global = encode_delta(
        &x,
        &CodecOptions {
            top_k_density: Some(128.0 / 4096.0),
            ..CodecOptions::default()
        },
    )
    .unwrap();
    assert_eq!(global.len(), DELTA_HEADER_LEN + 128 * 4 + 4 + 128);
    // Dense int4 (no top-k): no positions, half a byte per value.
    let dense4 = encode_delta(
        &x,
        &block_options(ValueFormat::Int4, None, 128, ScaleFormat::F32),
    )
    .unwrap();
    assert_eq!(dense4.len(), DELTA_HEADER_LEN + 32 * 4 + 4096 / 2);
}

#[test]
fn per_block_encoding_is_deterministic_and_breaks_ties_by_position() {
    let x = gaussian(3000, 8, 0.1);
    for options in all_block_options() {
        assert_eq!(
            encode_delta(&x, &options).unwrap(),
            encode_delta(&x, &options).unwrap()
        );
    }
    // Every magnitude equal: each block keeps its first k positions.
    let flat: Vec<f32> = (0..300)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let options = block_options(ValueFormat::Int2, Some(0.03), 128, ScaleFormat::F32);
    let y = decode_delta(&encode_delta(&flat, &options).unwrap(), 300).unwrap();
    let nonzero: Vec<usize> = (0..300).filter(|&i| y[i] != 0.0).collect();
    assert_eq!(
        nonzero,
        vec![0, 1, 2, 3, 128, 129, 130, 131, 256, 257, 258, 259]
    );
    // Int2 with every kept magnitude equal to the mean is exact up to the lower level.
    assert!(
        nonzero
            .iter()
            .all(|&i| (y[i] - flat[i] * INT2_LEVELS[0]).abs() < 1e-6)
    );
}

#[test]
fn per_block_zeros_extremes_and_short_blocks_round_trip_finite() {
    let mut x = vec![0.0f32; 300];
    x[5] = 3e38;
    x[6] = -3e38;
    x[200] = f32::MIN_POSITIVE;
    x[299] = -1e-30;
    for options in all_block_options() {
        let y = decode_delta(&encode_delta(&x, &options).unwrap(), 300).unwrap();
        assert!(y.iter().all(|v| v.is_finite()), "{options:?}");
        // Int2 keeps up to 13 values here, 11 of them zeros: its mean-based levels land at 1.3 * 6e38 / 13.
        assert!(
            y[5] > 5e37 && y[6] < -5e37,
            "{options:?}: {} {}",
            y[5],
            y[6]
        );
    }
    let zeros = vec![0.0f32; 300];
    for options in all_block_options() {
        let y = decode_delta(&encode_delta(&zeros, &options).unwrap(), 300).unwrap();
        // f32 scales decode an all-zero block to zeros; a power-of-two scale to at most 1.3 * 2^-126.
        assert!(
            y.iter().all(|v| v.abs() <= 1.3 * f32::MIN_POSITIVE),
            "{options:?}"
        );
        if options.scale == ScaleFormat::F32 {
            assert!(y.iter().all(|&v| v == 0.0), "{options:?}");
        }
    }
    assert!(
        decode_delta(
            &encode_delta(
                &[],
                &block_options(ValueFormat::Int2, Some(0.01), 128, ScaleFormat::F32)
            )
            .unwrap(),
            0
        )
        .unwrap()
        .is_empty()
    );
}

#[test]
fn options_check_the_new_combinations() {
    let bad = [
        // Low-bit values with global top-k.
        CodecOptions {
            top_k_density: Some(0.03),
            values: ValueFormat::Int2,
            ..CodecOptions::default()
        },
        // Per-block top-k without a density.
        CodecOptions {
            top_k_per_block: true,
            ..CodecOptions::default()
        },
        // Dense int2.
        CodecOptions {
            values: ValueFormat::Int2,
            ..CodecOptions::default()
        },
        CodecOptions {
            top_k_per_block: true,
            top_k_density: Some(0.0),
            values: ValueFormat::Int4,
            ..CodecOptions::default()
        },
    ];
    for options in bad {
        assert!(options.check().is_err(), "{options:?}");
        assert!(matches!(
            encode_delta(&[1.0], &options),
            Err(CodecError::BadOptions(_))
        ));
    }
    let sparse = block_options(ValueFormat::Int2, Some(0.01), 128, ScaleFormat::F32);
    assert!(sparse.check().is_ok() && sparse.is_sparse_low_bit() && sparse.uses_blocks());
    assert_eq!(sparse.per_block_k(), 2);
    assert_eq!(
        block_options(ValueFormat::Int2, Some(0.03), 256, ScaleFormat::F32).per_block_k(),
        8
    );
    assert!(!CodecOptions::default().uses_blocks() && !CodecOptions::default().is_sparse_low_bit());
}

/// Error feedback with int2 per-block top-k: the sum of what receivers decoded tracks the sum of the true
/// deltas, and the gap is exactly the residual the sender holds; it stays bounded over the rounds, while
/// the same codec without feedback drifts away.
#[test]
fn sparse_low_bit_error_feedback_keeps_the_sum_of_sent_deltas_close_to_the_true_sum() {
    for (values, density) in [
        (ValueFormat::Int2, 0.01f32),
        (ValueFormat::Int2, 0.03),
        (ValueFormat::Int4, 0.03),
    ] {
        let opts = block_options(values, Some(density), 128, ScaleFormat::PowerOfTwo);
        let run = FeedbackRun::measure(&opts, 300, 200, 5000);
        let label = format!("{values:?} density {density}");
        run.print(&label);
        run.assert_bounded_and_better_than_plain(&label);
        assert!(
            FeedbackRun::last(&run.errors_ef) < 0.1 * run.norm,
            "{label}"
        );
    }
}

#[test]
fn an_encoder_restored_from_its_residual_continues_identically() {
    let opts = block_options(ValueFormat::Int2, Some(0.03), 128, ScaleFormat::F32);
    let mut running = DeltaEncoder::new(opts).unwrap();
    for round in 0..5 {
        running.encode(&gaussian(1000, round, 1e-2)).unwrap();
    }
    let mut restored = DeltaEncoder::from_residual(opts, running.residual().to_vec()).unwrap();
    for round in 5..8 {
        let d = gaussian(1000, round, 1e-2);
        assert_eq!(running.encode(&d).unwrap(), restored.encode(&d).unwrap());
    }
    assert_eq!(running.clone().into_residual(), restored.residual());
    assert_eq!(
        DeltaEncoder::from_residual(opts, vec![0.0, f32::NAN]).unwrap_err(),
        CodecError::NonFiniteInput { index: 1 }
    );
    let mut short = DeltaEncoder::from_residual(opts, vec![0.0; 10]).unwrap();
    assert_eq!(
        short.encode(&[1.0; 11]),
        Err(CodecError::LengthChanged {
            expected: 10,
            got: 11
        })
    );
}

#[test]
fn hostile_per_block_headers_are_refused() {
    let x = gaussian(300, 9, 1.0);
    let opts = block_options(ValueFormat::Int2, Some(0.03), 128, ScaleFormat::F32);
    let good = encode_delta(&x, &opts).unwrap();
    assert!(decode_delta(&good, 300).is_ok());
    let with = |at: usize, v: u8| {
        let mut b = good.clone();
        b[at] = v;
        b
    };
    for (what, bytes) in [
        ("sparse flag is version 1's", with(5, 1)),
        ("3 bits per value", with(14, 3)),
        ("reserved byte", with(15, 1)),
        ("k = 0", with(12, 0)),
        ("block size 64", with(6, 64)),
    ] {
        assert!(
            matches!(decode_delta(&bytes, 300), Err(CodecError::BadHeader(_))),
            "{what}"
        );
    }
    let mut big_k = good.clone();
    big_k[12..14].copy_from_slice(&129u16.to_le_bytes());
    assert!(matches!(
        decode_delta(&big_k, 300),
        Err(CodecError::BadHeader(_))
    ));
    // A different k changes the implied length: truncated or trailing.
    assert!(matches!(
        decode_delta(&with(12, 5), 300),
        Err(CodecError::Truncated { .. })
    ));
    assert!(matches!(
        decode_delta(&with(12, 3), 300),
        Err(CodecError::TrailingBytes(_))
    ));
    // A huge len: refused by length before allocating.
    let mut huge = good.clone();
    huge[8..12].copy_from_slice(&(1u32 << 28).to_le_bytes());
    assert!(matches!(
        decode_delta(&huge, usize::MAX),
        Err(CodecError::Truncated { .. })
    ));
    let mut over = good.clone();
    over[8..12].copy_from_slice(&((1u32 << 28) + 1).to_le_bytes());
    assert!(matches!(
        decode_delta(&over, usize::MAX),
        Err(CodecError::TooLong { .. })
    ));
    assert!(matches!(
        decode_delta(&good, 299),
        Err(CodecError::TooLong { .. })
    ));
    // Positions: scales at 16..28, positions 28..39 (12 x 7 bits), codes 39..42.
    let positions_at = DELTA_HEADER_LEN + 3 * 4;
    let mut equal = good.clone();
    equal[positions_at] = 0; // positions 0 and (low bits of) the next one: force the first two to repeat
    equal[positions_at + 1] &= 0xc0;
    assert!(
        matches!(decode_delta(&equal, 300), Err(CodecError::BadIndex { .. })),
        "{:?}",
        decode_delta(&equal, 300)
    );
    // The last block has 44 positions: a position of 127 there is out of range.
    let mut beyond = good.clone();
    let last_pos_bits = positions_at * 8 + 11 * 7;
    for bit in 0..7 {
        let at = last_pos_bits + bit;
        beyond[at / 8] |= 1 << (at % 8);
    }
    assert!(matches!(
        decode_delta(&beyond, 300),
        Err(CodecError::BadIndex { .. })
    ));
    // Padding bits: 12 x 7 = 84 bits, so the last 4 bits of the position section must be 0.
    let mut padded = good.clone();
    padded[positions_at + 10] |= 0x80;
    assert!(matches!(
        decode_delta(&padded, 300),
        Err(CodecError::BadHeader(_))
    ));
    let mut nan_scale = good.clone();
    nan_scale[16..20].copy_from_slice(&f32::NAN.to_le_bytes());
    assert_eq!(
        decode_delta(&nan_scale, 300),
        Err(CodecError::BadValue { block: 0 })
    );
    let mut negative = good.clone();
    negative[20..24].copy_from_slice(&(-1.0f32).to_le_bytes());
    assert_eq!(
        decode_delta(&negative, 300),
        Err(CodecError::BadValue { block: 1 })
    );
    let mut overflow = good.clone();
    overflow[16..20].copy_from_slice(&f32::MAX.to_le_bytes());
    overflow[positions_at + 11] = 0xff; // block 0's four codes: negative, upper level: -1.3 * f32::MAX
    assert_eq!(
        decode_delta(&overflow, 300),
        Err(CodecError::BadValue { block: 0 })
    );
    // A NaN E4M3 code in a version 2 FP8 payload.
    let fp8 = encode_delta(
        &x,
        &block_options(ValueFormat::Fp8, Some(0.03), 128, ScaleFormat::F32),
    )
    .unwrap();
    let mut nan_code = fp8.clone();
    let last = nan_code.len() - 1;
    nan_code[last] = 0x7f;
    assert!(matches!(
        decode_delta(&nan_code, 300),
        Err(CodecError::BadValue { .. })
    ));
    // Every truncation is an error.
    for cut in 0..good.len() {
        assert!(decode_delta(&good[..cut], 300).is_err(), "cut at {cut}");
    }
}
