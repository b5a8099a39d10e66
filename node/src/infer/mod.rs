//! Inference across the network: clients generate text with the trunk run locally and each routed expert
//! computed by a node that hosts it.
//!
//! - [`wire`]: the expert call on a raw stream (`/mana/expert/1.0.0`), one frame each way.
//! - [`dispatch`]: the encodings of an expert call (FP8 hidden states and bf16 answers by default, f32 for
//!   exact agreement) and an in-process loopback through them, to measure what they change.
//! - [`host`]: a node answers expert calls from the committed checkpoints its store holds.
//! - [`remote`]: the client's expert runner: every call under a timeout, the next replica on failure.
//! - [`check`]: a drawn share of answers compared with a second replica; a disagreement settled by computing
//!   the expert from its committed shard, and the hosts that answered wrong banned.
//! - [`health`]: which hosts to ask first: failed ones after the others for a doubling back-off, peers that
//!   do not serve expert calls never again.
//! - [`client`]: learns the latest signed commit and the experts' hosts, fetches the trunk, generates.

pub mod check;
pub mod client;
pub mod dispatch;
pub mod health;
pub mod host;
pub mod remote;
pub mod wire;

/// Locks a mutex whose data stays valid whatever a panicking holder did (counters, sets, caches): a panic
/// elsewhere leaves it usable.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub use check::{AnswerCheck, DEFAULT_CHECK_SHARE, ReferenceError};
pub use client::{InferClient, InferConfig, InferError, Session};
pub use dispatch::{Dispatch, DispatchBytes, Loopback};
pub use host::{HostLimits, serve_experts};
pub use remote::{CallStats, Hosts, NetworkExperts};
