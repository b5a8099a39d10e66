//! Shared helpers of the model tests: tiny configs and deterministic batches.
#![allow(dead_code)]

use mana_kernels::data::Batch;
use mana_kernels::gemm::{Fp8Recipe, Precision};
use mana_kernels::model::ModelConfig;

/// A model small enough for finite differences on a 2-core machine, with every feature on: one dense and
/// one MoE block (4 experts, top-2), MTP, a visible balance loss.
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 32,
        d_model: 16,
        n_layers: 2,
        n_heads: 2,
        n_dense_layers: 1,
        dense_hidden: 24,
        n_routed_experts: 4,
        top_k: 2,
        expert_hidden: 16,
        shared_hidden: 12,
        context: 8,
        rope_theta: 10_000.0,
        mtp: true,
        mtp_lambda: 0.3,
        balance_alpha: 0.01,
        bias_gamma: 0.01,
        precision: Precision::F32,
        norm_eps: 1e-5,
        init_std: 0.2,
        fp8: Fp8Recipe::default(),
    }
}

/// A small deterministic pseudo-random generator for test data (splitmix64).
pub struct TestRng(pub u64);

impl TestRng {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut r = mana_kernels::rng::SplitMix64(self.0);
        let out = r.next_u64();
        self.0 = r.0;
        out
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// Roughly standard normal (sum of uniforms).
    pub fn normal(&mut self) -> f32 {
        (0..6).map(|_| self.uniform()).sum::<f32>() / 2.0f32.sqrt()
    }
    /// A vector of `n` uniform values scaled by `scale`.
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// A batch of B random sequences of T + 1 tokens below `vocab`.
pub fn random_batch(seed: u64, b: usize, t: usize, vocab: usize) -> Batch {
    let mut rng = TestRng(seed);
    let tokens = (0..b * (t + 1))
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect();
    Batch {
        tokens,
        batch_size: b,
        seq_len: t,
    }
}

/// A learnable batch: each row counts up from a random start, modulo `vocab`.
pub fn counting_batch(seed: u64, b: usize, t: usize, vocab: usize) -> Batch {
    let mut rng = TestRng(seed);
    let mut tokens = Vec::with_capacity(b * (t + 1));
    for _ in 0..b {
        let start = rng.next_u64() % vocab as u64;
        for i in 0..=t as u64 {
            tokens.push(((start + i) % vocab as u64) as u32);
        }
    }
    Batch {
        tokens,
        batch_size: b,
        seq_len: t,
    }
}
