//! CPU GEMM against the f64 oracle in all three forms, in f32 and FP8, on awkward shapes; plus the typed
//! errors for bad input.

use mana_kernels::gemm::reference::{matmul_f64, matmul_fp8_grouped};
use mana_kernels::gemm::{Dims, Form, Precision, matmul_f32};
use mana_kernels::quant::ScaleMode;
use mana_kernels::{Backend, CpuBackend, KernelError};

const FORMS: [Form; 3] = [Form::AB, Form::ABt, Form::AtB];

/// (m, k, n): 1×1, sizes just off 128, K not a multiple of 128, K shorter than one tile, and a K of 0.
const SHAPES: [(usize, usize, usize); 7] = [
    (1, 1, 1),
    (127, 129, 130),
    (300, 77, 65),
    (33, 300, 17),
    (129, 256, 128),
    (5, 0, 7),
    (0, 5, 3),
];

/// Unit roundoff of f32.
const U32: f64 = 1.0 / (1u64 << 24) as f64;

/// Deterministic values spread over many binades (so tiles hold both large values and values that fall in
/// the E4M3 subnormal range after scaling), with random signs.
fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let mant = 1.0 + (s >> 40) as f32 / (1u64 << 24) as f32; // [1, 2)
            let exp = ((s >> 8) % 14) as i32 - 10; // 2^-10 .. 2^3
            let sign = if s & 1 == 0 { 1.0 } else { -1.0 };
            sign * mant * 2f32.powi(exp)
        })
        .collect()
}

fn operands(form: Form, d: Dims, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let (ar, ac) = form.a_shape(d);
    let (br, bc) = form.b_shape(d);
    (data(ar * ac, seed), data(br * bc, seed + 1))
}

/// Σ_k |op(a)[i][k]|·|op(b)[k][j]| for every (i, j): the scale of the rounding error bounds.
fn abs_product(form: Form, a: &[f32], b: &[f32], d: Dims) -> Vec<f64> {
    let aa: Vec<f32> = a.iter().map(|x| x.abs()).collect();
    let bb: Vec<f32> = b.iter().map(|x| x.abs()).collect();
    matmul_f64(form, &aa, &bb, d).expect("shapes come from the form")
}

#[test]
fn f32_matches_f64_reference_in_every_form_and_shape() {
    let mut backend = CpuBackend::new();
    for form in FORMS {
        for (seed, &(m, k, n)) in SHAPES.iter().enumerate() {
            let d = Dims::new(m, k, n);
            let (a, b) = operands(form, d, seed as u64);
            let mut c = vec![f32::NAN; m * n]; // must be overwritten, not read
            backend
                .matmul(Precision::F32, form, &a, &b, &mut c, d, false)
                .expect("valid shapes");
            let exact = matmul_f64(form, &a, &b, d).expect("valid shapes");
            let scale = abs_product(form, &a, &b, d);
            // Classic dot-product bound: |fl(Σ) − Σ| ≤ γ_K Σ|a||b|, γ_K ≈ K·u; one more u for the output.
            for ((&got, &want), &s) in c.iter().zip(&exact).zip(&scale) {
                let bound = (k as f64 + 1.0) * U32 * s + 1e-30;
                assert!(
                    (got as f64 - want).abs() <= bound,
                    "{form:?} {m}x{k}x{n}: {got} vs {want} (bound {bound})"
                );
            }
        }
    }
}

#[test]
fn free_function_equals_backend_and_accumulate_adds() {
    let d = Dims::new(70, 200, 45);
    for form in FORMS {
        let (a, b) = operands(form, d, 7);
        let mut c1 = vec![0.0; d.m * d.n];
        matmul_f32(form, &a, &b, &mut c1, d, false).expect("valid shapes");
        let mut c2 = vec![0.0; d.m * d.n];
        CpuBackend::with_threads(1)
            .matmul(Precision::F32, form, &a, &b, &mut c2, d, false)
            .expect("valid shapes");
        let exact = matmul_f64(form, &a, &b, d).expect("valid shapes");
        let scale = abs_product(form, &a, &b, d);
        for i in 0..c1.len() {
            let bound = (d.k as f64 + 1.0) * U32 * scale[i];
            assert!((c1[i] as f64 - exact[i]).abs() <= bound);
            assert!((c2[i] as f64 - exact[i]).abs() <= bound);
        }
        for precision in [Precision::F32, Precision::Fp8] {
            let mut once = vec![0.0; d.m * d.n];
            let mut backend = CpuBackend::new();
            backend
                .matmul(precision, form, &a, &b, &mut once, d, false)
                .expect("valid shapes");
            let start = data(d.m * d.n, 99);
            let mut acc = start.clone();
            backend
                .matmul(precision, form, &a, &b, &mut acc, d, true)
                .expect("valid shapes");
            for i in 0..acc.len() {
                let want = start[i] + once[i];
                assert!(
                    (acc[i] - want).abs()
                        <= 4.0 * f32::EPSILON * (start[i].abs() + scale[i] as f32),
                    "{precision} {form:?}"
                );
            }
        }
    }
}

#[test]
fn k_zero_gives_zero_or_leaves_c() {
    let d = Dims::new(3, 0, 4);
    let mut c = vec![5.0; 12];
    CpuBackend::new()
        .matmul(Precision::F32, Form::AB, &[], &[], &mut c, d, true)
        .expect("valid");
    assert!(c.iter().all(|&x| x == 5.0));
    CpuBackend::new()
        .matmul(Precision::Fp8, Form::AB, &[], &[], &mut c, d, false)
        .expect("valid");
    assert!(c.iter().all(|&x| x == 0.0));
}

/// Bound on |C_fp8 − C_exact| for one element, derived from the quantization error.
///
/// Per element, E4M3 rounding of y = x/s (round to nearest, 3 mantissa bits) gives
///   |q(y) − y| ≤ 2^-4·|y|   if |y| ≥ 2^-6 (normal: half an ulp is 2^-4 of the binade's lower edge),
///   |q(y) − y| ≤ 2^-10      if |y| < 2^-6 (subnormal: half the fixed step 2^-9),
/// so after multiplying back by s: |x̂ − x| ≤ e(x) := 2^-4·|x| + 2^-10·s. Every tile scale satisfies
/// s = amax_tile/448 ≤ amax(operand)/448 (ScaleMode::Amax), so we may use the operand-wide amax — the bound
/// then needs nothing from the code under test.
/// For one output: |Σ x̂ŷ − Σ xy| ≤ Σ (e(x)|y| + |x|e(y) + e(x)e(y)), and f32 accumulation adds at most
/// (K+1)·u·Σ|x̂||ŷ| ≤ (K+1)·u·(1+2^-4)²·Σ(|x|+2^-10 s_x)(|y|+2^-10 s_y).
/// The f32 roundings of x/s and q·s (≤ 2^-24 relative each) are covered by a factor 1.001.
fn fp8_bound(form: Form, a: &[f32], b: &[f32], d: Dims) -> Vec<f64> {
    let amax = |v: &[f32]| v.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
    let (sa, sb) = (amax(a) / 448.0, amax(b) / 448.0);
    let ea: Vec<f32> = a
        .iter()
        .map(|x| (x.abs() as f64 / 16.0 + sa / 1024.0) as f32)
        .collect();
    let eb: Vec<f32> = b
        .iter()
        .map(|x| (x.abs() as f64 / 16.0 + sb / 1024.0) as f32)
        .collect();
    let aa: Vec<f32> = a.iter().map(|x| x.abs()).collect();
    let bb: Vec<f32> = b.iter().map(|x| x.abs()).collect();
    let big_a: Vec<f32> = a
        .iter()
        .map(|x| (x.abs() as f64 + sa / 1024.0) as f32)
        .collect();
    let big_b: Vec<f32> = b
        .iter()
        .map(|x| (x.abs() as f64 + sb / 1024.0) as f32)
        .collect();
    let t1 = matmul_f64(form, &ea, &bb, d).expect("shapes");
    let t2 = matmul_f64(form, &aa, &eb, d).expect("shapes");
    let t3 = matmul_f64(form, &ea, &eb, d).expect("shapes");
    let t4 = matmul_f64(form, &big_a, &big_b, d).expect("shapes");
    let acc = (d.k as f64 + 1.0) * U32 * (1.0 + 1.0 / 16.0f64).powi(2);
    (0..t1.len())
        .map(|i| 1.001 * (t1[i] + t2[i] + t3[i] + acc * t4[i]) + 1e-30)
        .collect()
}

#[test]
fn fp8_matches_f64_reference_within_the_quantization_bound() {
    for form in FORMS {
        for (seed, &(m, k, n)) in SHAPES.iter().enumerate() {
            let d = Dims::new(m, k, n);
            let (a, b) = operands(form, d, 100 + seed as u64);
            let mut c = vec![f32::NAN; m * n];
            CpuBackend::new()
                .matmul(Precision::Fp8, form, &a, &b, &mut c, d, false)
                .expect("valid shapes");
            let exact = matmul_f64(form, &a, &b, d).expect("valid shapes");
            let bound = fp8_bound(form, &a, &b, d);
            let mut worst = 0.0f64;
            for i in 0..c.len() {
                let err = (c[i] as f64 - exact[i]).abs();
                assert!(
                    err <= bound[i],
                    "{form:?} {m}x{k}x{n} [{i}]: {} vs {} (bound {})",
                    c[i],
                    exact[i],
                    bound[i]
                );
                worst = worst.max(err / bound[i]);
            }
            // The bound is not vacuous: with K ≥ 64 real quantization error uses a visible part of it.
            if k >= 64 && m * n > 0 {
                assert!(
                    worst > 1e-3,
                    "{form:?} {m}x{k}x{n}: error suspiciously small ({worst})"
                );
            }
        }
    }
}

#[test]
fn fp8_agrees_with_the_literal_per_group_kernel() {
    for mode in [ScaleMode::Amax, ScaleMode::PowerOfTwo] {
        for form in FORMS {
            for (seed, &(m, k, n)) in SHAPES.iter().enumerate() {
                let d = Dims::new(m, k, n);
                let (a, b) = operands(form, d, 200 + seed as u64);
                let mut c = vec![0.0; m * n];
                CpuBackend::new()
                    .with_scale_mode(mode)
                    .matmul(Precision::Fp8, form, &a, &b, &mut c, d, false)
                    .expect("valid");
                let grouped = matmul_fp8_grouped(form, &a, &b, d, mode).expect("valid");
                let scale = abs_product(form, &a, &b, d);
                // Both sum the same dequantized products; only the f32 rounding order and the rounding of
                // code·s differ: at most ~(K+3)·u·Σ|x̂||ŷ| apart, with Σ|x̂||ŷ| ≤ (1+2^-4)²·Σ|x||y| + slack.
                for i in 0..c.len() {
                    let bound = 2.0 * (k as f64 + 3.0) * U32 * 1.2 * scale[i] + 1e-30;
                    assert!(
                        ((c[i] - grouped[i]) as f64).abs() <= bound,
                        "{mode:?} {form:?} {m}x{k}x{n}"
                    );
                }
            }
        }
    }
}

#[test]
fn fp8_is_deterministic_and_really_quantizes() {
    let d = Dims::new(64, 384, 96);
    let (a, b) = operands(Form::ABt, d, 5);
    let mut backend = CpuBackend::new();
    let mut c1 = vec![0.0; d.m * d.n];
    let mut c2 = vec![0.0; d.m * d.n];
    let mut f = vec![0.0; d.m * d.n];
    backend
        .matmul(Precision::Fp8, Form::ABt, &a, &b, &mut c1, d, false)
        .expect("valid");
    backend
        .matmul(Precision::Fp8, Form::ABt, &a, &b, &mut c2, d, false)
        .expect("valid");
    backend
        .matmul(Precision::F32, Form::ABt, &a, &b, &mut f, d, false)
        .expect("valid");
    assert_eq!(c1, c2);
    assert_ne!(c1, f, "FP8 result equal to f32: inputs were not quantized");
}

#[test]
fn bad_shapes_are_typed_errors_and_leave_c_alone() {
    let mut backend = CpuBackend::new();
    let d = Dims::new(4, 5, 6);
    let a = vec![1.0; 20];
    let b = vec![1.0; 30];
    for precision in [Precision::F32, Precision::Fp8] {
        for form in FORMS {
            let mut c = vec![3.0; 24];
            let err = backend
                .matmul(precision, form, &a[..19], &b, &mut c, d, false)
                .expect_err("must be rejected");
            assert!(
                matches!(
                    err,
                    KernelError::ShapeMismatch {
                        what: "a",
                        expected: 20,
                        actual: 19,
                        ..
                    }
                ),
                "{err}"
            );
            let err = backend
                .matmul(precision, form, &a, &b[..29], &mut c, d, false)
                .expect_err("must be rejected");
            assert!(
                matches!(err, KernelError::ShapeMismatch { what: "b", .. }),
                "{err}"
            );
            let err = backend
                .matmul(precision, form, &a, &b, &mut c[..23], d, false)
                .expect_err("must be rejected");
            assert!(
                matches!(err, KernelError::ShapeMismatch { what: "c", .. }),
                "{err}"
            );
            assert!(c.iter().all(|&x| x == 3.0));
        }
        let huge = Dims::new(usize::MAX, 3, 2);
        let err = backend
            .matmul(precision, Form::AB, &a, &b, &mut [0.0; 4], huge, false)
            .expect_err("must be rejected");
        assert!(matches!(err, KernelError::SizeOverflow { .. }), "{err}");
    }
    let mut c = vec![3.0; 24];
    let err = matmul_f32(Form::AB, &a, &b[..1], &mut c, d, false).expect_err("must be rejected");
    assert!(matches!(
        err,
        KernelError::ShapeMismatch {
            op: "matmul_f32",
            ..
        }
    ));
}

#[test]
fn fp8_rejects_non_finite_operands() {
    let d = Dims::new(4, 200, 6);
    let mut backend = CpuBackend::new();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for form in FORMS {
            let (mut a, mut b) = operands(form, d, 1);
            let mut c = vec![3.0; 24];
            a[150] = bad;
            let err = backend
                .matmul(Precision::Fp8, form, &a, &b, &mut c, d, false)
                .expect_err("must be rejected");
            assert!(matches!(err, KernelError::NonFinite { .. }), "{err}");
            a[150] = 1.0;
            b[7] = bad;
            let err = backend
                .matmul(Precision::Fp8, form, &a, &b, &mut c, d, false)
                .expect_err("must be rejected");
            assert!(matches!(err, KernelError::NonFinite { .. }), "{err}");
            assert!(c.iter().all(|&x| x == 3.0));
        }
    }
}

#[test]
fn precision_parses_and_serialises_lowercase() {
    assert_eq!("fp8".parse::<Precision>(), Ok(Precision::Fp8));
    assert_eq!("F32".parse::<Precision>(), Ok(Precision::F32));
    assert!(matches!(
        "bf16".parse::<Precision>(),
        Err(KernelError::UnknownPrecision { .. })
    ));
    assert_eq!(Precision::Fp8.to_string(), "fp8");
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Cfg {
        precision: Precision,
    }
    let text = toml::to_string(&Cfg {
        precision: Precision::Fp8,
    })
    .expect("serialises");
    assert_eq!(text.trim(), "precision = \"fp8\"");
    let back: Cfg = toml::from_str("precision = \"f32\"").expect("parses");
    assert_eq!(back.precision, Precision::F32);
}

#[test]
fn backend_is_usable_as_a_trait_object() {
    let mut backends: Vec<Box<dyn Backend>> = vec![
        Box::new(CpuBackend::default()),
        Box::new(CpuBackend::with_threads(2)),
    ];
    for be in &mut backends {
        assert!(be.name().starts_with("cpu"));
        let mut c = [0.0f32; 1];
        be.matmul(
            Precision::F32,
            Form::AB,
            &[2.0],
            &[3.0],
            &mut c,
            Dims::new(1, 1, 1),
            false,
        )
        .expect("valid");
        assert_eq!(c[0], 6.0);
    }
}

/// A backend that only implements `matmul`, to exercise the trait's default `matmul_quantized_b`.
struct OnlyMatmul(CpuBackend);

impl Backend for OnlyMatmul {
    fn name(&self) -> &str {
        "only-matmul"
    }
    fn matmul(
        &mut self,
        p: Precision,
        f: Form,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        d: Dims,
        acc: bool,
    ) -> Result<(), KernelError> {
        self.0.matmul(p, f, a, b, c, d, acc)
    }
}

#[test]
fn weight_held_in_fp8_gives_the_same_product() {
    use mana_kernels::quant::{Granularity, QuantizedTensor};
    for form in FORMS {
        for &(m, k, n) in &[(1, 1, 1), (127, 129, 130), (300, 77, 65)] {
            let d = Dims::new(m, k, n);
            let (a, b) = operands(form, d, 300);
            let (br, bc) = form.b_shape(d);
            let qb = QuantizedTensor::quantize(&b, br, bc, form.b_granularity(), ScaleMode::Amax)
                .expect("finite");
            let mut want = vec![0.0; m * n];
            CpuBackend::new()
                .matmul(Precision::Fp8, form, &a, &b, &mut want, d, false)
                .expect("valid");
            let mut got = vec![f32::NAN; m * n];
            CpuBackend::new()
                .matmul_quantized_b(form, &a, &qb, &mut got, d, false)
                .expect("valid");
            assert_eq!(got, want, "{form:?} {m}x{k}x{n}");
            let mut via_default = vec![f32::NAN; m * n];
            OnlyMatmul(CpuBackend::new())
                .matmul_quantized_b(form, &a, &qb, &mut via_default, d, false)
                .expect("valid");
            assert_eq!(via_default, want, "{form:?} {m}x{k}x{n} (default impl)");
        }
    }
    // Wrong tiling, wrong shape, wrong lengths: typed errors.
    let d = Dims::new(4, 130, 6);
    let a = vec![1.0; 4 * 130];
    let w = vec![0.5; 6 * 130];
    let tiles = QuantizedTensor::quantize(&w, 6, 130, Granularity::Tile1x128, ScaleMode::Amax)
        .expect("finite");
    let mut c = vec![0.0; 24];
    let err = CpuBackend::new()
        .matmul_quantized_b(Form::ABt, &a, &tiles, &mut c, d, false)
        .expect_err("must be rejected");
    assert!(
        matches!(err, KernelError::GranularityMismatch { .. }),
        "{err}"
    );
    let transposed =
        QuantizedTensor::quantize(&w, 130, 6, Granularity::Block128x128, ScaleMode::Amax)
            .expect("finite");
    let err = CpuBackend::new()
        .matmul_quantized_b(Form::ABt, &a, &transposed, &mut c, d, false)
        .expect_err("must be rejected");
    assert!(matches!(err, KernelError::ShapeMismatch { .. }), "{err}");
    let blocks = QuantizedTensor::quantize(&w, 6, 130, Granularity::Block128x128, ScaleMode::Amax)
        .expect("finite");
    let err = CpuBackend::new()
        .matmul_quantized_b(Form::ABt, &a[1..], &blocks, &mut c, d, false)
        .expect_err("must be rejected");
    assert!(
        matches!(err, KernelError::ShapeMismatch { what: "a", .. }),
        "{err}"
    );
    CpuBackend::new()
        .matmul_quantized_b(Form::ABt, &a, &blocks, &mut c, d, false)
        .expect("valid");
}

/// Shapes of the row-invariant product (Form::ABt): K below, at and past one 16-lane chunk with tails, N
/// not a multiple of the 4-column block nor of one task's 64 columns, and the empty cases.
const ROW_SHAPES: [(usize, usize, usize); 7] = [
    (1, 1, 1),
    (7, 15, 3),
    (40, 129, 130),
    (65, 300, 67),
    (3, 17, 256),
    (5, 0, 7),
    (0, 5, 3),
];

#[test]
fn row_invariant_product_matches_the_f64_reference() {
    let mut backend = CpuBackend::new();
    for (seed, &(m, k, n)) in ROW_SHAPES.iter().enumerate() {
        let d = Dims::new(m, k, n);
        let (a, b) = operands(Form::ABt, d, 500 + seed as u64);
        let mut c = vec![f32::NAN; m * n];
        backend
            .matmul_rows(Precision::F32, &a, &b, &mut c, d)
            .expect("valid shapes");
        let exact = matmul_f64(Form::ABt, &a, &b, d).expect("valid shapes");
        let scale = abs_product(Form::ABt, &a, &b, d);
        for ((&got, &want), &s) in c.iter().zip(&exact).zip(&scale) {
            let bound = (k as f64 + 1.0) * U32 * s + 1e-30;
            assert!(
                (got as f64 - want).abs() <= bound,
                "{m}x{k}x{n}: {got} vs {want} (bound {bound})"
            );
        }
        let mut c8 = vec![f32::NAN; m * n];
        backend
            .matmul_rows(Precision::Fp8, &a, &b, &mut c8, d)
            .expect("valid shapes");
        let bound = fp8_bound(Form::ABt, &a, &b, d);
        for i in 0..c8.len() {
            assert!(
                (c8[i] as f64 - exact[i]).abs() <= bound[i],
                "fp8 {m}x{k}x{n} [{i}]: {} vs {}",
                c8[i],
                exact[i]
            );
        }
    }
}

/// The property inference relies on: a row's bits do not depend on the other rows of the call (how many,
/// which) nor on the thread count, in f32 and FP8, on the backend and on the trait's one-row default.
#[test]
fn row_invariant_product_gives_each_row_the_same_bits_in_any_batch() {
    for precision in [Precision::F32, Precision::Fp8] {
        for &(m, k, n) in &[(40usize, 129usize, 130usize), (9, 300, 67), (70, 128, 384)] {
            let d = Dims::new(m, k, n);
            let (a, b) = operands(Form::ABt, d, 700 + m as u64);
            let mut reference = vec![0.0; m * n];
            CpuBackend::new()
                .matmul_rows(precision, &a, &b, &mut reference, d)
                .expect("valid shapes");
            let mut backends: Vec<Box<dyn Backend>> = vec![
                Box::new(CpuBackend::with_threads(1)),
                Box::new(CpuBackend::with_threads(3)),
                Box::new(OnlyMatmul(CpuBackend::new())),
            ];
            for backend in &mut backends {
                let mut all = vec![0.0; m * n];
                backend
                    .matmul_rows(precision, &a, &b, &mut all, d)
                    .expect("valid shapes");
                if backend.name() != "only-matmul" {
                    // The CPU kernel does not depend on the thread count. (The trait's default runs the
                    // `gemm` crate one row at a time, whose rounding differs; it is only row-invariant.)
                    assert_eq!(
                        all,
                        reference,
                        "{precision} {m}x{k}x{n} on {}",
                        backend.name()
                    );
                }
                // One row alone, the last alone, and a slice of two from the middle.
                for (lo, hi) in [(0, 1), (m - 1, m), (m / 3, m / 3 + 2)] {
                    let part = Dims::new(hi - lo, k, n);
                    let mut c = vec![0.0; (hi - lo) * n];
                    backend
                        .matmul_rows(precision, &a[lo * k..hi * k], &b, &mut c, part)
                        .expect("valid shapes");
                    assert_eq!(
                        c,
                        all[lo * n..hi * n],
                        "{precision} {m}x{k}x{n}: rows {lo}..{hi} on {}",
                        backend.name()
                    );
                }
            }
        }
    }
}

#[test]
fn row_invariant_product_refuses_bad_shapes_and_non_finite_operands() {
    let mut backend = CpuBackend::new();
    let d = Dims::new(2, 3, 4);
    let mut c = vec![7.0; 8];
    assert!(matches!(
        backend.matmul_rows(Precision::F32, &[0.0; 5], &[0.0; 12], &mut c, d),
        Err(KernelError::ShapeMismatch { .. })
    ));
    let mut a = vec![1.0; 6];
    a[4] = f32::INFINITY;
    assert!(matches!(
        backend.matmul_rows(Precision::Fp8, &a, &[1.0; 12], &mut c, d),
        Err(KernelError::NonFinite { .. })
    ));
    assert_eq!(c, [7.0; 8], "c is left alone on an error");
}

/// Inference rounds each weight to FP8 once (`round_weight_fp8`) and then quantizes only the activations
/// (`matmul_rows_rounded_b`): the same bits as quantizing both at every product, for both scale modes and
/// for the trait's defaults.
#[test]
fn a_weight_rounded_once_gives_the_same_row_product() {
    use mana_kernels::quant::ScaleMode;
    let mut backends: Vec<Box<dyn Backend>> = vec![
        Box::new(CpuBackend::new()),
        Box::new(CpuBackend::new().with_scale_mode(ScaleMode::PowerOfTwo)),
        Box::new(OnlyMatmul(CpuBackend::new())),
    ];
    for backend in &mut backends {
        for &(m, k, n) in &[(1usize, 129usize, 130usize), (9, 300, 67), (3, 128, 384)] {
            let d = Dims::new(m, k, n);
            let (a, b) = operands(Form::ABt, d, 900 + k as u64);
            let mut rounded = vec![0.0; b.len()];
            backend
                .round_weight_fp8(&b, n, k, &mut rounded)
                .expect("finite weight");
            assert_ne!(rounded, b, "rounding to FP8 changes a weight");
            for precision in [Precision::Fp8, Precision::F32] {
                let mut want = vec![0.0; m * n];
                let weight = if precision == Precision::Fp8 {
                    &b
                } else {
                    &rounded
                };
                backend
                    .matmul_rows(precision, &a, weight, &mut want, d)
                    .expect("valid shapes");
                let mut got = vec![0.0; m * n];
                backend
                    .matmul_rows_rounded_b(precision, &a, &rounded, &mut got, d)
                    .expect("valid shapes");
                assert_eq!(got, want, "{precision} {m}x{k}x{n} on {}", backend.name());
            }
        }
    }
}
