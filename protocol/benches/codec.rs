//! Throughput of the delta codec on a 1M-value shard (dense FP8 and top-k 1%, encode and decode), next to
//! a plain copy of the same f32 buffer as the baseline measured in the same run.
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mana_protocol::{CodecOptions, decode_delta, encode_delta};
use std::hint::black_box;

fn values(n: usize) -> Vec<f32> {
    // A cheap deterministic pseudo-Gaussian (sum of sines), enough for timing.
    (0..n)
        .map(|i| ((i as f32) * 0.618).sin() * 1e-3 + ((i as f32) * 0.017).cos() * 5e-4)
        .collect()
}

fn codec(c: &mut Criterion) {
    let n = 1 << 20;
    let x = values(n);
    let dense = CodecOptions::default();
    let sparse = CodecOptions {
        top_k_density: Some(0.01),
        ..CodecOptions::default()
    };
    let dense_payload = encode_delta(&x, &dense).unwrap();
    let sparse_payload = encode_delta(&x, &sparse).unwrap();
    let mut group = c.benchmark_group("delta_codec_1M");
    group.throughput(Throughput::Bytes((4 * n) as u64));
    group.bench_function("baseline_copy_f32", |b| b.iter(|| black_box(x.clone())));
    group.bench_function("encode_dense_e4m3", |b| {
        b.iter(|| encode_delta(black_box(&x), &dense).unwrap())
    });
    group.bench_function("decode_dense_e4m3", |b| {
        b.iter(|| decode_delta(black_box(&dense_payload), n).unwrap())
    });
    group.bench_function("encode_topk_1pct", |b| {
        b.iter(|| encode_delta(black_box(&x), &sparse).unwrap())
    });
    group.bench_function("decode_topk_1pct", |b| {
        b.iter(|| decode_delta(black_box(&sparse_payload), n).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(2));
    targets = codec
}
criterion_main!(benches);
