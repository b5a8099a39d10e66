//! Routed experts run outside the model: the seam between a client that holds the trunk and the hosts that
//! hold a MoE layer's experts.
//!
//! Shapes: C width, F expert hidden, M rows routed to one expert in one layer.
//!
//! During KV-cached inference ([`super::Model::decode_with`]), a MoE layer routes its rows over every
//! routed expert of the config, runs the ones this instance holds itself (exactly as [`super::Model::decode`]
//! does), and hands each other expert's rows, gathered and grouped, to an [`ExpertRunner`] in one call per
//! layer. The runner fills the outputs; the layer then combines them with its own gates and shared expert.
//!
//! **Missing experts and `k_min`** (Hivemind's rule). A runner that got no answer for an expert (no host of
//! it answered in time) marks that call [`ExpertCall::missing`] instead of failing the step. The layer then
//! drops that expert for every token routed to it and renormalizes each such token's gates over the routed
//! experts it still has (held ones included): g_j = s_j / Σ s over the remaining selected experts, the same
//! normalization as the full top-k (DeepSeek-V3's sigmoid affinities, no scaling factor), provided the token
//! keeps at least `k_min` of its top-k ([`OutsideExperts::k_min`]). If any token of the step keeps fewer, the
//! step fails with [`KernelError::TooFewExperts`] and the cache is left as it was before the step, so the
//! caller may wait and run it again. With `k_min` = top-k (the default) every expert must answer, and a
//! step in which all answered is bit-identical whatever `k_min` is.
//!
//! [`ExpertKernel`] is one expert computed standalone from its shard's parameters, with the same arithmetic
//! as the model's decode step (the row-invariant backend view, weights rounded once at FP8): a host answers
//! with it, and since every row depends only on itself, its output is bit-identical to the expert run inside
//! a whole model, whatever the batch. [`KernelExperts`] is a runner made of such kernels.

use std::collections::BTreeMap;

use crate::backend::{Backend, RowInvariant};
use crate::error::KernelError;
use crate::gemm::{LinearPrecision, Precision};

use super::config::ModelConfig;
use super::moe::swiglu_ffn_forward;
use super::params::{Span, SwigluParams};
use super::{ModelError, ShardId};

/// One expert's share of a layer's routed rows: its inputs and the place for its outputs.
#[derive(Debug)]
pub struct ExpertCall<'a> {
    /// Index of the routed expert in its layer.
    pub expert: usize,
    /// M: rows routed to it.
    pub rows: usize,
    /// [M, C] the normalized hidden states routed to it.
    pub x: &'a [f32],
    /// [M, C] where its outputs go (ungated; the layer applies the gates).
    pub out: &'a mut [f32],
    /// Set by the runner when it got no answer for this expert: the layer then leaves `out` unread and drops
    /// the expert for its tokens under the `k_min` rule (see the module doc). `false` when the layer makes the
    /// call.
    pub missing: bool,
}

/// The routed experts a decode step runs outside the model: who runs them, and how many of each token's
/// top-k must have answered for the step to go on without the missing ones (see the module doc).
pub struct OutsideExperts<'a> {
    /// Runs the experts the instance does not hold.
    pub runner: &'a mut dyn ExpertRunner,
    /// The fewest of a token's top-k routed experts (held or answered) it may keep; clamped to the top-k,
    /// so `usize::MAX` (what [`OutsideExperts::all`] sets) means every one must answer. 0 lets a token
    /// lose all of them (its routed part is then zero).
    pub k_min: usize,
}

impl<'a> OutsideExperts<'a> {
    /// `runner`, with every selected expert required to answer (today's rule, and the default).
    pub fn all(runner: &'a mut dyn ExpertRunner) -> Self {
        Self {
            runner,
            k_min: usize::MAX,
        }
    }
}

/// Runs the routed experts a model instance does not hold. One call per MoE layer per step, with every
/// expert that layer needs, so an implementation can run them concurrently (a network client sends one
/// request per expert at once). `Send`, because a decode step runs on a rayon worker.
pub trait ExpertRunner: Send {
    /// Fills every call's `out` with expert `call.expert` of block `layer` applied to `call.x`, or marks
    /// the call [`ExpertCall::missing`] when no answer for it came (the layer then applies the `k_min` rule,
    /// see the module doc). An error stops the step (the model's cache is left as it was before the step).
    fn run_layer(&mut self, layer: usize, calls: &mut [ExpertCall<'_>]) -> Result<(), KernelError>;
}

/// One routed expert computed on its own, from the parameters of its shard.
pub struct ExpertKernel {
    /// w13 then w2 (the shard's layout); rounded to FP8 once at FP8 precision.
    params: Vec<f32>,
    /// Spans of `params`.
    p: SwigluParams,
    /// C.
    c: usize,
    precision: LinearPrecision,
    backend: Box<dyn Backend>,
    /// [M, 2F] and [M, F] scratch, grown to the largest call.
    h13: Vec<f32>,
    act: Vec<f32>,
}

impl ExpertKernel {
    /// The expert whose shard parameters are `params` (w13 [2F, C], then w2 [C, F]) under `config`. When
    /// the forward GEMM runs in FP8 (the model's precision and FP8 recipe) the weights are rounded once, as
    /// [`super::Model::decode`] rounds them.
    pub fn new(
        config: &ModelConfig,
        params: &[f32],
        mut backend: Box<dyn Backend>,
    ) -> Result<Self, ModelError> {
        let (c, f) = (config.d_model, config.expert_hidden);
        let expected = 3 * f * c;
        if params.len() != expected {
            return Err(ModelError::Length {
                what: "expert shard parameters".into(),
                expected,
                actual: params.len(),
            });
        }
        let p = SwigluParams {
            w13: Span {
                offset: 0,
                len: 2 * f * c,
            },
            w2: Span {
                offset: 2 * f * c,
                len: f * c,
            },
            hidden: f,
        };
        let precision = config.linear_precision();
        let params = if precision.forward == Precision::Fp8 {
            let mut rounded = vec![0.0; params.len()];
            backend.round_weight_fp8(p.w13.of(params), 2 * f, c, p.w13.of_mut(&mut rounded))?;
            backend.round_weight_fp8(p.w2.of(params), c, f, p.w2.of_mut(&mut rounded))?;
            rounded
        } else {
            params.to_vec()
        };
        Ok(Self {
            params,
            p,
            c,
            precision,
            backend,
            h13: Vec::new(),
            act: Vec::new(),
        })
    }

    /// C, the width of a row in and out.
    pub fn width(&self) -> usize {
        self.c
    }

    /// `out` [M, C] = the expert applied to `x` [M, C], each row on its own.
    pub fn forward(&mut self, x: &[f32], rows: usize, out: &mut [f32]) -> Result<(), KernelError> {
        let (c, f) = (self.c, self.p.hidden);
        for (what, len) in [("x", x.len()), ("out", out.len())] {
            if len != rows * c {
                return Err(KernelError::ShapeMismatch {
                    op: "expert kernel",
                    what,
                    expected: rows * c,
                    actual: len,
                });
            }
        }
        if self.h13.len() < rows * 2 * f {
            self.h13.resize(rows * 2 * f, 0.0);
            self.act.resize(rows * f, 0.0);
        }
        let mut view = if self.precision.forward == Precision::Fp8 {
            RowInvariant::with_rounded_weights(self.backend.as_mut())
        } else {
            RowInvariant::new(self.backend.as_mut())
        };
        swiglu_ffn_forward(
            &mut view,
            self.precision,
            &self.params,
            &self.p,
            x,
            &mut self.h13[..rows * 2 * f],
            &mut self.act[..rows * f],
            out,
            rows,
            c,
        )
    }
}

/// An [`ExpertRunner`] holding its experts as [`ExpertKernel`]s in this process: the in-process stand-in for
/// remote hosts (tests), and what a host that serves several experts keeps.
#[derive(Default)]
pub struct KernelExperts {
    kernels: BTreeMap<(usize, usize), ExpertKernel>,
}

impl KernelExperts {
    /// No experts yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) expert `shard`.
    pub fn insert(&mut self, shard: ShardId, kernel: ExpertKernel) -> Result<(), ModelError> {
        let pos = shard
            .expert_position()
            .ok_or(ModelError::UnknownShard(shard))?;
        self.kernels.insert(pos, kernel);
        Ok(())
    }

    /// Takes expert `shard` out, if held.
    pub fn remove(&mut self, shard: ShardId) -> Option<ExpertKernel> {
        self.kernels.remove(&shard.expert_position()?)
    }

    /// Whether expert `expert` of block `layer` is held.
    pub fn holds(&self, layer: usize, expert: usize) -> bool {
        self.kernels.contains_key(&(layer, expert))
    }

    /// The experts held, in shard order.
    pub fn held(&self) -> Vec<ShardId> {
        self.kernels
            .keys()
            .filter_map(|&(layer, index)| ShardId::expert(layer, index).ok())
            .collect()
    }

    /// How many experts are held.
    pub fn len(&self) -> usize {
        self.kernels.len()
    }

    /// Whether no expert is held.
    pub fn is_empty(&self) -> bool {
        self.kernels.is_empty()
    }
}

impl ExpertRunner for KernelExperts {
    fn run_layer(&mut self, layer: usize, calls: &mut [ExpertCall<'_>]) -> Result<(), KernelError> {
        for call in calls.iter_mut() {
            let kernel = self.kernels.get_mut(&(layer, call.expert)).ok_or_else(|| {
                KernelError::ExpertUnavailable {
                    layer,
                    expert: call.expert,
                    reason: "not held by this runner".into(),
                }
            })?;
            kernel.forward(call.x, call.rows, call.out)?;
        }
        Ok(())
    }
}
