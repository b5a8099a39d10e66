//! Fine-grained scaling: exact values survive, errors stay within half an E4M3 ulp, edge tiles, zero tiles,
//! non-finite tiles, the three granularities agree with each other under transposition, and an FP8 weight
//! is about a quarter of its f32 size.

use mana_kernels::KernelError;
use mana_kernels::fp8::E4M3;
use mana_kernels::quant::{Granularity, QuantizedTensor, ScaleMode, TILE, quantize_dequantize};

const GRANULARITIES: [Granularity; 3] = [
    Granularity::Tile1x128,
    Granularity::Tile128x1,
    Granularity::Block128x128,
];
const MODES: [ScaleMode; 2] = [ScaleMode::Amax, ScaleMode::PowerOfTwo];
/// Shapes with edge tiles in both directions, a single element, and exact multiples of 128.
const SHAPES: [(usize, usize); 6] = [
    (1, 1),
    (300, 77),
    (130, 260),
    (128, 256),
    (7, 129),
    (257, 3),
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Index of the tile holding (r, c), in the row-major scale grid.
fn tile_of(g: Granularity, rows: usize, cols: usize, r: usize, c: usize) -> usize {
    let (_, sc) = g.scale_shape(rows, cols);
    match g {
        Granularity::Tile1x128 => r * sc + c / TILE,
        Granularity::Tile128x1 => (r / TILE) * sc + c,
        Granularity::Block128x128 => (r / TILE) * sc + c / TILE,
    }
}

/// Per-tile amax computed here, independently of the code under test.
fn tile_amax(g: Granularity, rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    let mut m = vec![0.0f32; g.scale_count(rows, cols)];
    for r in 0..rows {
        for c in 0..cols {
            let t = tile_of(g, rows, cols, r, c);
            m[t] = m[t].max(x[r * cols + c].abs());
        }
    }
    m
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

#[test]
fn exactly_representable_values_survive_unchanged() {
    let finite_codes: Vec<E4M3> = (0..=255u8)
        .map(E4M3::from_bits)
        .filter(|c| !c.is_nan())
        .collect();
    let mut rng = Rng(42);
    for mode in MODES {
        for g in GRANULARITIES {
            for &(rows, cols) in &SHAPES {
                // Tile t gets scale s_t; each element is v·s_t with v an E4M3 value, and one element per tile
                // is ±448 so that amax/448 = s_t. Amax mode: s_t has ≤ 3 significant bits, so v·s_t and
                // 448·s_t are exact in f32. PowerOfTwo mode: s_t is a power of two.
                let ntiles = g.scale_count(rows, cols);
                let scale_of = |t: usize| match mode {
                    ScaleMode::Amax => (1.0 + (t % 4) as f32 / 4.0) * 2f32.powi((t % 7) as i32 - 3),
                    ScaleMode::PowerOfTwo => 2f32.powi((t % 9) as i32 - 4),
                };
                let mut x = vec![0.0f32; rows * cols];
                let mut seen = vec![false; ntiles];
                for r in 0..rows {
                    for c in 0..cols {
                        let t = tile_of(g, rows, cols, r, c);
                        let v = if !seen[t] {
                            seen[t] = true;
                            if rng.next() & 1 == 0 { 448.0 } else { -448.0 }
                        } else {
                            finite_codes[(rng.next() % finite_codes.len() as u64) as usize].to_f32()
                        };
                        x[r * cols + c] = v * scale_of(t);
                    }
                }
                let q = QuantizedTensor::quantize(&x, rows, cols, g, mode).expect("finite input");
                for (t, &s) in q.scales().iter().enumerate() {
                    assert_eq!(s, scale_of(t), "{mode:?} {g:?} {rows}x{cols} tile {t}");
                }
                let back = q.dequantize();
                for i in 0..x.len() {
                    assert_eq!(
                        back[i].to_bits(),
                        x[i].to_bits(),
                        "{mode:?} {g:?} {rows}x{cols} [{i}]"
                    );
                }
            }
        }
    }
}

/// Values spread over 2^-20 .. 2^10 so that tiles mix E4M3 normals and subnormals.
fn spread(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed | 1);
    (0..len)
        .map(|_| {
            let s = rng.next();
            let mant = 1.0 + (s >> 40) as f32 / (1u64 << 24) as f32;
            let sign = if s & 1 == 0 { 1.0 } else { -1.0 };
            sign * mant * 2f32.powi(((s >> 8) % 31) as i32 - 20)
        })
        .collect()
}

#[test]
fn error_is_within_half_an_ulp_for_normals_and_half_a_step_for_subnormals() {
    for mode in MODES {
        for g in GRANULARITIES {
            for &(rows, cols) in &SHAPES {
                let x = spread(rows * cols, (rows * 1000 + cols) as u64);
                let q = QuantizedTensor::quantize(&x, rows, cols, g, mode).expect("finite input");
                let amax = tile_amax(g, rows, cols, &x);
                let back = q.dequantize();
                let mut normals = 0;
                for r in 0..rows {
                    for c in 0..cols {
                        let i = r * cols + c;
                        let t = tile_of(g, rows, cols, r, c);
                        let s = q.scales()[t];
                        // The scale is amax/448 (or the next power of two), computed here independently.
                        let want = amax[t] / 448.0;
                        match mode {
                            ScaleMode::Amax => assert_eq!(s, want),
                            ScaleMode::PowerOfTwo => {
                                assert!(
                                    s >= want && s < 2.0 * want && s.to_bits() & 0x7F_FFFF == 0,
                                    "{s} for {want}"
                                )
                            }
                        }
                        let err = (back[i] - x[i]).abs() as f64;
                        if (x[i] / s).abs() >= 2f32.powi(-6) {
                            normals += 1;
                            assert!(
                                err <= x[i].abs() as f64 / 16.0,
                                "{g:?} rel err {} at {i}",
                                err / x[i].abs() as f64
                            );
                        } else {
                            assert!(
                                err <= s as f64 / 1024.0 * (1.0 + 1e-6),
                                "{g:?} abs err {err} (s = {s})"
                            );
                        }
                    }
                }
                assert!(normals > 0);
            }
        }
    }
}

#[test]
fn zero_tiles_quantize_to_zero_codes() {
    for g in GRANULARITIES {
        let (rows, cols) = (200, 300);
        let mut x = spread(rows * cols, 3);
        for v in &mut x[..cols * 130] {
            *v = 0.0; // first 130 rows: whole tiles of every granularity are zero
        }
        let q =
            QuantizedTensor::quantize(&x, rows, cols, g, ScaleMode::Amax).expect("finite input");
        assert!(q.scales().iter().all(|s| s.is_finite() && *s > 0.0));
        assert!(q.codes()[..cols * 128].iter().all(|c| c.to_f32() == 0.0));
        let back = q.dequantize();
        assert!(back[..cols * 130].iter().all(|&v| v == 0.0));
        assert!(back[cols * 130..].iter().any(|&v| v != 0.0));
    }
    let q = QuantizedTensor::quantize(
        &[0.0; 5],
        1,
        5,
        Granularity::Tile1x128,
        ScaleMode::PowerOfTwo,
    )
    .expect("zeros");
    assert_eq!(q.dequantize(), vec![0.0; 5]);
}

#[test]
fn tiny_and_huge_tiles_stay_finite() {
    for v in [f32::MIN_POSITIVE / 8.0, 1e-40, f32::MAX, -f32::MAX] {
        for g in GRANULARITIES {
            let x = vec![v; 20];
            let q = QuantizedTensor::quantize(&x, 4, 5, g, ScaleMode::Amax).expect("finite input");
            let back = q.dequantize();
            assert!(back.iter().all(|b| b.is_finite()));
            assert!(
                back.iter().all(|b| (b - v).abs() <= v.abs() / 16.0 + 1e-38),
                "{v:e} -> {}",
                back[0]
            );
        }
    }
}

#[test]
fn non_finite_tile_is_a_typed_error_naming_the_tile() {
    let (rows, cols) = (300, 260);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for g in GRANULARITIES {
            let mut x = spread(rows * cols, 9);
            x[200 * cols + 140] = bad;
            let err = QuantizedTensor::quantize(&x, rows, cols, g, ScaleMode::Amax)
                .expect_err("must be rejected");
            let (row, col) = match g {
                Granularity::Tile1x128 => (200, 128),
                Granularity::Tile128x1 => (128, 140),
                Granularity::Block128x128 => (128, 128),
            };
            assert_eq!(
                err,
                KernelError::NonFinite {
                    op: "quantize",
                    row,
                    col
                },
                "{g:?}"
            );
            let mut out = vec![0.0; rows * cols];
            let mut scales = vec![0.0; g.scale_count(rows, cols)];
            let err =
                quantize_dequantize(&x, rows, cols, g, ScaleMode::Amax, &mut out, &mut scales)
                    .expect_err("must be rejected");
            assert!(matches!(err, KernelError::NonFinite { .. }));
        }
    }
}

#[test]
fn fused_quantize_dequantize_is_bit_identical_to_the_two_steps() {
    for mode in MODES {
        for g in GRANULARITIES {
            for &(rows, cols) in &SHAPES {
                let x = spread(rows * cols, 77 + rows as u64);
                let q = QuantizedTensor::quantize(&x, rows, cols, g, mode).expect("finite");
                let mut fused = vec![0.0; rows * cols];
                let mut scales = vec![0.0; g.scale_count(rows, cols)];
                quantize_dequantize(&x, rows, cols, g, mode, &mut fused, &mut scales)
                    .expect("finite");
                assert_eq!(scales, q.scales());
                let two_step = q.dequantize();
                for i in 0..x.len() {
                    assert_eq!(
                        fused[i].to_bits(),
                        two_step[i].to_bits(),
                        "{mode:?} {g:?} {rows}x{cols} [{i}]"
                    );
                }
            }
        }
    }
}

#[test]
fn granularities_agree_under_transposition() {
    let (rows, cols) = (260, 300);
    let x = spread(rows * cols, 11);
    let xt = transpose(&x, rows, cols);
    // 128×1 tiles of X are the 1×128 tiles of Xᵀ; 128×128 blocks of X are the blocks of Xᵀ.
    let col_tiles =
        QuantizedTensor::quantize(&x, rows, cols, Granularity::Tile128x1, ScaleMode::Amax)
            .expect("finite");
    let row_tiles_t =
        QuantizedTensor::quantize(&xt, cols, rows, Granularity::Tile1x128, ScaleMode::Amax)
            .expect("finite");
    assert_eq!(
        transpose(&col_tiles.dequantize(), rows, cols),
        row_tiles_t.dequantize()
    );
    let blocks =
        QuantizedTensor::quantize(&x, rows, cols, Granularity::Block128x128, ScaleMode::Amax)
            .expect("finite");
    let blocks_t =
        QuantizedTensor::quantize(&xt, cols, rows, Granularity::Block128x128, ScaleMode::Amax)
            .expect("finite");
    assert_eq!(
        transpose(&blocks.dequantize(), rows, cols),
        blocks_t.dequantize()
    );
}

#[test]
fn fp8_weight_takes_at_most_26_percent_of_f32() {
    // A square weight, and the small model's projection shapes ([out, in] row-major).
    for (rows, cols) in [(1024, 1024), (256, 128), (128, 256), (128, 128), (300, 77)] {
        let w = spread(rows * cols, 5);
        let q =
            QuantizedTensor::quantize(&w, rows, cols, Granularity::Block128x128, ScaleMode::Amax)
                .expect("finite");
        let f32_bytes = w.len() * std::mem::size_of::<f32>();
        let ratio = q.storage_bytes() as f64 / f32_bytes as f64;
        assert!(
            ratio <= 0.26,
            "{rows}x{cols}: FP8 weight is {:.2}% of f32",
            100.0 * ratio
        );
        assert_eq!(
            q.storage_bytes(),
            rows * cols + 4 * rows.div_ceil(128) * cols.div_ceil(128)
        );
    }
    // Activations in 1×128 tiles: 1 + 4/128 bytes per element.
    let a = spread(4096 * 256, 6);
    let q = QuantizedTensor::quantize(&a, 4096, 256, Granularity::Tile1x128, ScaleMode::Amax)
        .expect("finite");
    assert!(q.storage_bytes() as f64 / (a.len() * 4) as f64 <= 0.26);
}

#[test]
fn requantizing_reuses_buffers_and_bad_parts_are_rejected() {
    let x = spread(256 * 256, 1);
    let mut q = QuantizedTensor::quantize(&x, 256, 256, Granularity::Block128x128, ScaleMode::Amax)
        .expect("finite");
    let ptr = q.codes().as_ptr();
    q.quantize_from(
        &x[..100 * 128],
        100,
        128,
        Granularity::Tile1x128,
        ScaleMode::Amax,
    )
    .expect("finite");
    assert_eq!(q.codes().as_ptr(), ptr, "no reallocation when shrinking");
    assert_eq!(
        (q.rows(), q.cols(), q.granularity()),
        (100, 128, Some(Granularity::Tile1x128))
    );

    let err = q
        .quantize_from(&x[..10], 3, 4, Granularity::Tile1x128, ScaleMode::Amax)
        .expect_err("must be rejected");
    assert!(matches!(
        err,
        KernelError::ShapeMismatch {
            expected: 12,
            actual: 10,
            ..
        }
    ));
    let err = QuantizedTensor::quantize(&x, usize::MAX, 2, Granularity::Tile1x128, ScaleMode::Amax)
        .expect_err("must be rejected");
    assert!(matches!(err, KernelError::SizeOverflow { .. }));

    let codes = vec![E4M3::from_bits(0x38); 6];
    let ok =
        QuantizedTensor::from_parts(2, 3, Granularity::Tile1x128, codes.clone(), vec![0.5, 2.0])
            .expect("valid parts");
    assert_eq!(ok.dequantize(), vec![0.5, 0.5, 0.5, 2.0, 2.0, 2.0]);
    let mut out = vec![0.0; 5];
    assert!(matches!(
        ok.dequantize_into(&mut out),
        Err(KernelError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        QuantizedTensor::from_parts(2, 3, Granularity::Tile1x128, codes.clone(), vec![0.5]),
        Err(KernelError::ShapeMismatch { what: "scales", .. })
    ));
    assert!(matches!(
        QuantizedTensor::from_parts(
            2,
            3,
            Granularity::Tile1x128,
            codes[..5].to_vec(),
            vec![0.5, 1.0]
        ),
        Err(KernelError::ShapeMismatch { what: "codes", .. })
    ));
    for bad in [f32::NAN, f32::INFINITY, 0.0, -1.0] {
        assert!(matches!(
            QuantizedTensor::from_parts(
                2,
                3,
                Granularity::Tile1x128,
                codes.clone(),
                vec![1.0, bad]
            ),
            Err(KernelError::InvalidScale { index: 1, .. })
        ));
    }
}
