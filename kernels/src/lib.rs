//! mana's numerics, with no networking: FP8 number formats, fine-grained (tile and block) scaling, GEMM in
//! f32 and FP8, and — built on them — the Mixture-of-Experts model, its hand-written backward pass and its
//! optimizer. Every op has a plain CPU path; a CUDA backend will sit behind the same API.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

/// Training data: batches, the byte-level text dataset and the built-in corpus.
pub mod data;

pub mod backend;
pub mod error;
pub mod fp8;
pub mod gemm;
pub mod quant;
pub mod rng;
pub mod simd;

pub use backend::{Backend, CpuBackend};
pub use error::KernelError;
/// Checkpoints: a directory of per-shard files with magic, version and checksum.
pub mod checkpoint;
/// Text generation: greedy and top-p sampling, and self-speculative decoding with the MTP head.
pub mod generate;
/// The MoE language model: config, parameter layout by shard, ops with forward and backward.
pub mod model;
/// AdamW, gradient clipping and the learning-rate schedule.
pub mod optim;
/// The trainer: one step = forward, backward, clip, AdamW, router-bias update; checkpoints.
pub mod train;
