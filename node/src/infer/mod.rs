//! Inference across the network: clients generate text with the trunk run locally and each routed expert
//! computed by a node that hosts it.
//!
//! - [`wire`]: the expert call on a raw stream (`/mana/expert/1.0.0`), one frame each way.
//! - [`dispatch`]: the encodings of an expert call (FP8 hidden states and f32 answers by default, exact for
//!   an FP8 model; bf16 answers, or f32 both ways) and an in-process loopback through them, to measure what
//!   they change.
//! - [`host`]: a node answers expert calls from the committed checkpoints its store holds, within caps on
//!   calls (in all and per peer: "busy" past them) and rows, batching concurrent calls of one expert.
//! - [`remote`]: the client's expert runner: every call under a timeout, the next replica on failure; an
//!   expert no replica answered is marked missing, and the model drops it under the `k_min` rule.
//! - [`patient`]: a step in which some token kept fewer than `k_min` experts is waited for and run again.
//! - [`cache`]: hot experts: the client counts the rows routed to each expert and computes the most routed
//!   ones itself from their committed shards (`--cache-experts N`), asking the network for the rest.
//! - [`fetch`]: an expert of the committed checkpoint built here from its shard, fetched by hash.
//! - [`check`]: a drawn share of answers compared with a second replica; a disagreement settled by computing
//!   the expert from its committed shard, and the hosts that answered wrong banned.
//! - [`health`]: which hosts to ask first: healthy ones fastest first (by measured latency), failed ones
//!   after the others for a doubling back-off, peers that do not serve expert calls never again.
//! - [`client`]: learns the latest signed commit and the experts' hosts, fetches the trunk, generates.

pub mod cache;
pub mod check;
pub mod client;
pub mod dispatch;
pub mod fetch;
pub mod health;
pub mod host;
pub mod patient;
pub mod remote;
pub mod wire;

/// Locks a mutex whose data stays valid whatever a panicking holder did (counters, sets, caches): a panic
/// elsewhere leaves it usable.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub use cache::{CacheStats, CachedExperts, RoutingCounts};
pub use check::{AnswerCheck, DEFAULT_CHECK_SHARE};
pub use client::{InferClient, InferConfig, InferError, Session};
pub use dispatch::{Dispatch, DispatchBytes, Loopback};
pub use fetch::{ExpertFetchError, ExpertSource};
pub use host::{ExpertHost, HostLimits, HostStats, serve_experts};
pub use patient::Patient;
pub use remote::{CallStats, Hosts, LatencyHistogram, NetworkExperts};
