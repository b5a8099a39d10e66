//! GEMM throughput: f32 against FP8 (FP8 times INCLUDE quantizing both inputs; `fp8_weight` times a weight
//! already held in FP8, quantizing only the activation), at cubes and at the small model's Linear shapes.
//! Throughput is reported in elements = floating-point operations (2·M·K·N), so criterion's "Gelem/s" reads
//! as GFLOP/s. Run: `cargo bench -p mana-kernels --bench gemm`.
//! Sample counts are small: the reference machine has 2 cores shared with other work.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mana_kernels::gemm::{Dims, Form, Precision};
use mana_kernels::quant::{QuantizedTensor, ScaleMode};
use mana_kernels::{Backend, CpuBackend};

fn data(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bench_case(c: &mut Criterion, group: &str, form: Form, d: Dims) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(2 * (d.m * d.k * d.n) as u64));
    let (ar, ac) = form.a_shape(d);
    let (br, bc) = form.b_shape(d);
    let a = data(ar * ac, 1);
    let b = data(br * bc, 2);
    let mut out = vec![0.0f32; d.m * d.n];
    let mut backend = CpuBackend::new();
    let label = format!("{}x{}x{}", d.m, d.k, d.n);
    for precision in [Precision::F32, Precision::Fp8] {
        g.bench_with_input(
            BenchmarkId::new(precision.as_str(), &label),
            &precision,
            |bench, &p| {
                bench.iter(|| {
                    backend
                        .matmul(p, form, black_box(&a), black_box(&b), &mut out, d, false)
                        .expect("benchmark shapes are consistent");
                })
            },
        );
    }
    // The weight already held in FP8 (codes + 128×128-block scales): only the activation is quantized.
    if form != Form::AtB {
        let qb = QuantizedTensor::quantize(&b, br, bc, form.b_granularity(), ScaleMode::Amax)
            .expect("finite data");
        g.bench_function(BenchmarkId::new("fp8_weight", &label), |bench| {
            bench.iter(|| {
                backend
                    .matmul_quantized_b(form, black_box(&a), &qb, &mut out, d, false)
                    .expect("benchmark shapes are consistent");
            })
        });
    }
    g.finish();
}

fn cubes(c: &mut Criterion) {
    for n in [256, 1024, 2048] {
        bench_case(c, "gemm_cube_AB", Form::AB, Dims::new(n, n, n));
    }
}

fn model_shapes(c: &mut Criterion) {
    let tokens = 4096;
    // Linear forward y = x·Wᵀ with W [out, in]: d_model 128, d_ff 256, and an attention projection.
    for (k, n) in [(128, 256), (256, 128), (128, 128)] {
        bench_case(c, "gemm_linear_fwd_ABt", Form::ABt, Dims::new(tokens, k, n));
    }
    // Weight gradient dW = dyᵀ·x over the tokens.
    bench_case(
        c,
        "gemm_linear_wgrad_AtB",
        Form::AtB,
        Dims::new(256, tokens, 128),
    );
}

criterion_group!(benches, cubes, model_shapes);
criterion_main!(benches);
