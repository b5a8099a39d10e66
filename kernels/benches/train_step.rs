//! Training throughput of the default model (d_model 128, 4 layers, 8 experts top-2, context 128): one
//! full step (forward, backward, clip, AdamW, bias update) on B = 4 sequences of T = 128, in FP8 and in
//! f32 in the same run. Throughput is in tokens (B·T), so criterion's "Kelem/s" reads as thousands of
//! tokens per second. Run: `cargo bench -p mana-kernels --bench train_step`.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mana_kernels::CpuBackend;
use mana_kernels::data::Batch;
use mana_kernels::gemm::Precision;
use mana_kernels::model::ModelConfig;
use mana_kernels::optim::OptimConfig;
use mana_kernels::train::Trainer;

fn batch(b: usize, t: usize) -> Batch {
    let mut s: u32 = 0x1234_5678;
    let tokens = (0..b * (t + 1))
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s % 256
        })
        .collect();
    Batch {
        tokens,
        batch_size: b,
        seq_len: t,
    }
}

fn train_step(c: &mut Criterion) {
    let (b, t) = (4, 128);
    let data = batch(b, t);
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements((b * t) as u64));
    for precision in [Precision::F32, Precision::Fp8] {
        let cfg = ModelConfig {
            precision,
            ..ModelConfig::default()
        };
        let mut trainer =
            match Trainer::new(cfg, OptimConfig::default(), 1, Box::new(CpuBackend::new())) {
                Ok(t) => t,
                Err(e) => panic!("default config must build: {e}"),
            };
        g.bench_with_input(
            BenchmarkId::new(precision.as_str(), format!("B{b}xT{t}")),
            &precision,
            |bench, _| {
                bench.iter(|| match trainer.step(&data) {
                    Ok(s) => s.loss,
                    Err(e) => panic!("training step failed: {e}"),
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
