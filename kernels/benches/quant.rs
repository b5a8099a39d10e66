//! Quantization throughput in GB/s of f32 input: codes + scales (`QuantizedTensor::quantize_from`, buffers
//! reused), the fused quantize-dequantize the CPU FP8 GEMM uses, and dequantization, for each granularity.
//! Run: `cargo bench -p mana-kernels --bench quant`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mana_kernels::fp8::E4M3;
use mana_kernels::quant::{Granularity, QuantizedTensor, ScaleMode, quantize_dequantize};

fn data(len: usize) -> Vec<f32> {
    let mut s = 0x1234_5677u32;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn quant(c: &mut Criterion) {
    let mut g = c.benchmark_group("quant");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (rows, cols) in [(1024, 1024), (4096, 256)] {
        let x = data(rows * cols);
        g.throughput(Throughput::Bytes((x.len() * 4) as u64));
        for (name, gran) in [
            ("1x128", Granularity::Tile1x128),
            ("128x1", Granularity::Tile128x1),
            ("128x128", Granularity::Block128x128),
        ] {
            let label = format!("{name}/{rows}x{cols}");
            let mut q = QuantizedTensor::quantize(&x, rows, cols, gran, ScaleMode::Amax)
                .expect("finite data");
            g.bench_function(BenchmarkId::new("quantize", &label), |b| {
                b.iter(|| {
                    q.quantize_from(black_box(&x), rows, cols, gran, ScaleMode::Amax)
                        .expect("finite data")
                })
            });
            let mut out = vec![0.0f32; x.len()];
            let mut scales = vec![0.0f32; gran.scale_count(rows, cols)];
            g.bench_function(BenchmarkId::new("quantize_dequantize", &label), |b| {
                b.iter(|| {
                    quantize_dequantize(
                        black_box(&x),
                        rows,
                        cols,
                        gran,
                        ScaleMode::Amax,
                        &mut out,
                        &mut scales,
                    )
                    .expect("finite data")
                })
            });
            g.bench_function(BenchmarkId::new("dequantize", &label), |b| {
                b.iter(|| q.dequantize_into(black_box(&mut out)).expect("same shape"))
            });
        }
        let mut codes = vec![E4M3::ZERO; x.len()];
        g.bench_function(
            BenchmarkId::new("encode_slice_e4m3", format!("{rows}x{cols}")),
            |b| b.iter(|| E4M3::encode_slice(black_box(&x), &mut codes).expect("same length")),
        );
    }
    g.finish();
}

criterion_group!(benches, quant);
criterion_main!(benches);
