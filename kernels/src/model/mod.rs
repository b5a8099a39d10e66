//! The DeepSeek-V3-like Mixture-of-Experts language model: byte embedding, L pre-norm blocks (RoPE
//! attention, then a dense or DeepSeekMoE FFN), a final RMSNorm and LM head, and a depth-1 multi-token
//! prediction module. Every op has a hand-written backward next to its forward (llm.c style, no autograd).
//!
//! Dimension letters, used in every op's shape comments:
//! - B sequences per batch, T positions per sequence, N = B·T tokens
//! - C model width, NH heads, HS = C / NH head width, V vocabulary
//! - E routed experts per MoE layer, K selected per token, F expert hidden, S shared-expert hidden
//!
//! Parameters, gradients (and, in the trainer, AdamW moments) are flat f32 buffers sharing one
//! [`ParamLayout`]; activations are preallocated for the largest batch seen, so a warm training step does
//! not allocate. Backward functions ADD into parameter gradients, so several micro-batches accumulate
//! before one optimizer step.

pub mod attention;
pub mod block;
pub mod config;
mod decode;
pub mod embedding;
pub mod experts;
pub mod head;
pub mod kv_cache;
pub mod linear;
pub mod loss;
pub mod moe;
pub mod mtp;
pub mod params;
pub mod rmsnorm;
pub mod rope;
pub mod shard_id;
pub mod swiglu;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use crate::backend::Backend;
use crate::data::Batch;
use crate::error::KernelError;
use crate::gemm::Precision;

use block::{BlockActs, BlockContext, BlockDims, BlockScratch};
pub use config::{ConfigError, ModelConfig};
pub use experts::{ExpertCall, ExpertKernel, ExpertRunner, KernelExperts, OutsideExperts};
use head::{HeadActs, HeadSpec};
pub use kv_cache::{CacheError, KvCache};
use loss::IGNORE;
use moe::MoeDims;
use mtp::{MtpActs, MtpContext, MtpScratch};
pub use params::{ExpertSet, ParamLayout, Span, TensorInfo};
use rope::RopeTable;
pub use shard_id::{MAX_EXPERTS_PER_LAYER, MAX_LAYERS, ShardId, ShardIdError};

/// Largest B·T a single call may ask for (bounds the activation buffers an untrusted batch can cause).
pub const MAX_BATCH_TOKENS: usize = 1 << 20;
/// Largest attention-probability buffer (B·T × NH × context floats, per block) a batch may cause: 1 GiB.
pub const MAX_ATTENTION_FLOATS: usize = 1 << 28;

/// Why a model operation was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A kernel refused its input.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The batch's token buffer does not match B × (T + 1), or B or T is zero.
    #[error("batch shape: {reason}")]
    BatchShape {
        /// What is wrong.
        reason: String,
    },
    /// T exceeds the model's context.
    #[error("sequence of {seq_len} positions exceeds the context of {context}")]
    SequenceTooLong {
        /// T.
        seq_len: usize,
        /// The configured context.
        context: usize,
    },
    /// A token id is not below the vocabulary size.
    #[error("token {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// V.
        vocab: usize,
    },
    /// The shard is not held by this model instance.
    #[error("shard {0} is not held by this model")]
    UnknownShard(ShardId),
    /// A vector given for a shard (or an output buffer) has the wrong length.
    #[error("{what}: expected {expected} values, got {actual}")]
    Length {
        /// What the vector is for.
        what: String,
        /// The required length.
        expected: usize,
        /// The given length.
        actual: usize,
    },
    /// The expert set was built for another configuration (other layer or expert counts).
    #[error("the expert set does not match the model config")]
    ExpertSetMismatch,
    /// The layer has no router (it is dense or out of range).
    #[error("layer {0} is not a MoE layer")]
    NotMoeLayer(usize),
    /// A KV-cached step was refused (see [`Model::decode`]).
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Losses of one forward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossStats {
    /// Mean next-token cross-entropy (nats).
    pub loss: f32,
    /// Mean cross-entropy of the MTP head on token t + 2 (0 without MTP).
    pub mtp_loss: f32,
    /// The α-weighted sequence-wise balance loss, summed over MoE layers.
    pub balance_loss: f32,
    /// The optimized objective: loss + λ·mtp_loss + balance_loss, computed in f64.
    pub total: f64,
    /// Tokens predicted by the main head (B·T).
    pub tokens: usize,
}

/// Preallocated activations and gradient scratch for up to `cap_n` tokens in `cap_b` sequences.
struct Workspace {
    cap_n: usize,
    cap_b: usize,
    /// [N] input tokens, main targets, next tokens (MTP input), MTP targets.
    inputs: Vec<u32>,
    targets: Vec<u32>,
    next: Vec<u32>,
    mtp_targets: Vec<u32>,
    /// L + 1 residual streams [N, C]: the input of block l and the output of block L − 1.
    residual: Vec<Vec<f32>>,
    blocks: Vec<BlockActs>,
    head: HeadActs,
    mtp: Option<MtpActs>,
    /// [N, C] gradient of the main residual stream.
    dres: Vec<f32>,
    bsc: BlockScratch,
    msc: MtpScratch,
}

/// The model: configuration, layout, parameters and gradients, router biases, and the workspace of one
/// instance that may hold only some of the routed experts.
pub struct Model {
    config: ModelConfig,
    experts: ExpertSet,
    layout: ParamLayout,
    params: Vec<f32>,
    grads: Vec<f32>,
    /// Per block: the routing bias [E] (empty for dense blocks). Not a parameter: moved by the balancing
    /// rule, never by gradients.
    router_bias: Vec<Vec<f32>>,
    /// Per block: routed slots per expert since the last bias update.
    expert_counts: Vec<Vec<u64>>,
    backend: Box<dyn Backend>,
    rope: RopeTable,
    ws: Option<Workspace>,
    /// The parameters with every weight an FP8 product takes rounded to FP8 once, for KV-cached decode
    /// steps (see `decode.rs`). Built by the first FP8 decode step; dropped by anything that can change the
    /// parameters or the precision.
    decode_params: Option<Vec<f32>>,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Fills `out` with N(0, std²) values from a generator seeded by (seed, tensor name), so a tensor's
/// initial value does not depend on which other shards an instance holds.
fn init_normal(out: &mut [f32], seed: u64, name: &str, std: f32) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(name.as_bytes()));
    let mut uniform = move || ((rng.next_u32() >> 8) as f64 + 0.5) / (1u64 << 24) as f64;
    for pair in out.chunks_mut(2) {
        let (u1, u2) = (uniform(), uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        pair[0] = (r * a.cos()) as f32 * std;
        if pair.len() > 1 {
            pair[1] = (r * a.sin()) as f32 * std;
        }
    }
}

/// Writes the initial value of tensor `t` into `dst` (its span): ones for a norm's gain, N(0, std²) from
/// (seed, name) for a matrix, the output projections scaled down by the depth.
fn init_tensor(config: &ModelConfig, seed: u64, t: &TensorInfo, dst: &mut [f32]) {
    if t.shape.len() == 1 {
        dst.fill(1.0);
        return;
    }
    let proj_out = t.name.ends_with(".wo") || t.name.ends_with(".w2");
    let std = if proj_out {
        config.init_std * (1.0 / ((2 * config.n_layers) as f32).sqrt())
    } else {
        config.init_std
    };
    init_normal(dst, seed, &t.name, std);
}

/// The initial parameters of one shard (the trunk or one routed expert) of a model of `config` seeded with
/// `seed`: the values [`Model::new`] would hold in that shard's span, computed without building the model.
/// It is what lets round 0's checkpoint be made, and checked, one shard at a time by a machine that has no
/// room for the whole model (a coordinator, or a node fetching one shard).
pub fn initial_shard_params(
    config: &ModelConfig,
    seed: u64,
    shard: ShardId,
) -> Result<Vec<f32>, ModelError> {
    config.validate()?;
    let mut experts = ExpertSet::none(config);
    if matches!(shard, ShardId::Expert { .. }) && !experts.insert(shard) {
        return Err(ModelError::UnknownShard(shard));
    }
    let layout = ParamLayout::new(config, &experts);
    let span = layout
        .shard_span(shard)
        .ok_or(ModelError::UnknownShard(shard))?;
    let mut params = vec![0.0f32; span.len];
    for t in layout.tensors.iter().filter(|t| t.shard == shard) {
        let start = t.span.offset - span.offset;
        init_tensor(config, seed, t, &mut params[start..start + t.span.len]);
    }
    Ok(params)
}

impl Model {
    /// A model holding every routed expert, initialized from `seed`.
    pub fn new(
        config: ModelConfig,
        seed: u64,
        backend: Box<dyn Backend>,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let experts = ExpertSet::all(&config);
        Self::with_experts(config, experts, seed, backend)
    }

    /// A model holding only the routed experts in `experts` (plus the trunk). Each tensor is initialized
    /// from (seed, its name), so instances holding different subsets agree on the shared parameters.
    pub fn with_experts(
        config: ModelConfig,
        experts: ExpertSet,
        seed: u64,
        backend: Box<dyn Backend>,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        if experts
            != ExpertSet::from_shards(&config, &experts.shards())
                .map_err(ModelError::UnknownShard)?
        {
            return Err(ModelError::ExpertSetMismatch);
        }
        let layout = ParamLayout::new(&config, &experts);
        let mut params = vec![0.0f32; layout.total];
        for t in &layout.tensors {
            init_tensor(&config, seed, t, t.span.of_mut(&mut params));
        }
        let grads = vec![0.0f32; layout.total];
        let e = config.n_routed_experts;
        let per_layer = |l: usize| if config.is_moe_layer(l) { e } else { 0 };
        let router_bias = (0..config.n_layers)
            .map(|l| vec![0.0; per_layer(l)])
            .collect();
        let expert_counts = (0..config.n_layers)
            .map(|l| vec![0; per_layer(l)])
            .collect();
        let rope = RopeTable::new(config.context, config.head_size(), config.rope_theta);
        Ok(Self {
            config,
            experts,
            layout,
            params,
            grads,
            router_bias,
            expert_counts,
            backend,
            rope,
            ws: None,
            decode_params: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Which routed experts this instance holds.
    pub fn experts(&self) -> &ExpertSet {
        &self.experts
    }

    /// Where every parameter lives.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// The backend's name (e.g. `"cpu"`).
    pub fn backend_name(&self) -> &str {
        self.backend.name()
    }

    /// Changes the precision of the Linear GEMMs (e.g. to compare FP8 against f32).
    pub fn set_precision(&mut self, precision: Precision) {
        self.decode_params = None;
        self.config.precision = precision;
    }

    /// All parameters, flat, in layout order.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// All parameters, mutably (the optimizer and tests write here).
    pub fn params_mut(&mut self) -> &mut [f32] {
        self.decode_params = None;
        &mut self.params
    }

    /// All gradients, flat, mirroring [`Model::params`].
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    /// All gradients, mutably (clipping, imports).
    pub fn grads_mut(&mut self) -> &mut [f32] {
        &mut self.grads
    }

    /// Parameters and gradients at once (the optimizer needs both).
    pub fn params_and_grads_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        self.decode_params = None;
        (&mut self.params, &mut self.grads)
    }

    /// Sets every gradient to zero (the start of an accumulation window).
    pub fn zero_grads(&mut self) {
        self.grads.fill(0.0);
    }

    /// The shards this instance holds: the trunk first, then its experts in (layer, index) order.
    pub fn shards(&self) -> Vec<ShardId> {
        self.layout.shards.iter().map(|(s, _)| *s).collect()
    }

    fn span(&self, shard: ShardId) -> Result<Span, ModelError> {
        self.layout
            .shard_span(shard)
            .ok_or(ModelError::UnknownShard(shard))
    }

    /// Number of f32 values in a shard (of its parameters, gradient, or each AdamW moment).
    pub fn shard_len(&self, shard: ShardId) -> Result<usize, ModelError> {
        Ok(self.span(shard)?.len)
    }

    /// Size in bytes of a shard's parameters as f32.
    pub fn shard_bytes(&self, shard: ShardId) -> Result<usize, ModelError> {
        Ok(self.shard_len(shard)? * std::mem::size_of::<f32>())
    }

    /// The span of a shard in the flat buffers.
    pub fn shard_span(&self, shard: ShardId) -> Result<Span, ModelError> {
        self.span(shard)
    }

    /// A copy of a shard's parameters.
    pub fn export_shard(&self, shard: ShardId) -> Result<Vec<f32>, ModelError> {
        Ok(self.span(shard)?.of(&self.params).to_vec())
    }

    /// Overwrites a shard's parameters; `values` must have [`Model::shard_len`] elements.
    pub fn import_shard(&mut self, shard: ShardId, values: &[f32]) -> Result<(), ModelError> {
        let span = self.span(shard)?;
        check_len(&format!("parameters of {shard}"), span.len, values.len())?;
        self.decode_params = None;
        span.of_mut(&mut self.params).copy_from_slice(values);
        Ok(())
    }

    /// A copy of a shard's accumulated gradient.
    pub fn export_shard_grad(&self, shard: ShardId) -> Result<Vec<f32>, ModelError> {
        Ok(self.span(shard)?.of(&self.grads).to_vec())
    }

    /// Overwrites a shard's gradient (e.g. with an average received from peers).
    pub fn import_shard_grad(&mut self, shard: ShardId, values: &[f32]) -> Result<(), ModelError> {
        let span = self.span(shard)?;
        check_len(&format!("gradient of {shard}"), span.len, values.len())?;
        span.of_mut(&mut self.grads).copy_from_slice(values);
        Ok(())
    }

    /// The routing bias of MoE block `layer`.
    pub fn router_bias(&self, layer: usize) -> Result<&[f32], ModelError> {
        match self.router_bias.get(layer) {
            Some(b) if !b.is_empty() => Ok(b),
            _ => Err(ModelError::NotMoeLayer(layer)),
        }
    }

    /// Overwrites the routing bias of MoE block `layer`.
    pub fn set_router_bias(&mut self, layer: usize, bias: &[f32]) -> Result<(), ModelError> {
        match self.router_bias.get_mut(layer) {
            Some(b) if !b.is_empty() => {
                check_len(
                    &format!("router bias of layer {layer}"),
                    b.len(),
                    bias.len(),
                )?;
                b.copy_from_slice(bias);
                Ok(())
            }
            _ => Err(ModelError::NotMoeLayer(layer)),
        }
    }

    /// Per layer (empty for dense layers), the routed slots each expert received in training forwards since
    /// the last [`Model::update_router_bias`] or [`Model::reset_expert_counts`]: what a network participant
    /// reports with its trunk delta, so that the trunk's holders can move the router biases from the loads
    /// of every participant together.
    pub fn expert_counts(&self) -> &[Vec<u64>] {
        &self.expert_counts
    }

    /// Sets every expert count to zero (a participant's round starts from none).
    pub fn reset_expert_counts(&mut self) {
        self.expert_counts.iter_mut().for_each(|c| c.fill(0));
    }

    /// Per MoE block, the fraction of routed slots each expert received since the last bias update.
    pub fn expert_load(&self) -> Vec<Vec<f32>> {
        self.expert_counts
            .iter()
            .filter(|c| !c.is_empty())
            .map(|c| {
                let total: u64 = c.iter().sum();
                c.iter()
                    .map(|&x| {
                        if total == 0 {
                            0.0
                        } else {
                            x as f32 / total as f32
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Applies the auxiliary-loss-free balancing rule to every MoE block from the loads counted by
    /// training forwards since the last call, then resets the counts. Returns the loads it used (as
    /// [`Model::expert_load`]).
    pub fn update_router_bias(&mut self) -> Vec<Vec<f32>> {
        let load = self.expert_load();
        for l in 0..self.config.n_layers {
            if self.router_bias[l].is_empty() {
                continue;
            }
            moe::update_bias(
                &mut self.router_bias[l],
                &self.expert_counts[l],
                self.experts.layer(l),
                self.config.bias_gamma,
            );
            self.expert_counts[l].fill(0);
        }
        load
    }

    fn block_dims(&self) -> BlockDims {
        let c = &self.config;
        BlockDims {
            c: c.d_model,
            nh: c.n_heads,
            eps: c.norm_eps,
            moe: MoeDims {
                c: c.d_model,
                e: c.n_routed_experts,
                k: c.top_k,
                f: c.expert_hidden,
                s: c.shared_hidden,
            },
            alpha: c.balance_alpha,
        }
    }

    fn head_spec(&self) -> HeadSpec {
        HeadSpec {
            norm: self.layout.lnf,
            head: self.layout.head,
            c: self.config.d_model,
            v: self.config.vocab_size,
            eps: self.config.norm_eps,
        }
    }

    /// Makes sure the workspace holds `b` sequences of `t` positions, allocating only when it grows.
    fn ensure_workspace(&mut self, b: usize, t: usize) {
        let n = b * t;
        if let Some(ws) = &self.ws {
            if ws.cap_n >= n && ws.cap_b >= b {
                return;
            }
        }
        let (cap_n, cap_b) = match &self.ws {
            Some(ws) => (ws.cap_n.max(n), ws.cap_b.max(b)),
            None => (n, b),
        };
        let d = self.block_dims();
        let cfg = &self.config;
        let (c, v, tm) = (cfg.d_model, cfg.vocab_size, cfg.context);
        let blocks = self
            .layout
            .blocks
            .iter()
            .map(|p| BlockActs::new(p, d, cap_n, cap_b, tm))
            .collect();
        let mtp = self
            .layout
            .mtp
            .as_ref()
            .map(|p| MtpActs::new(p, d, v, cap_n, cap_b, tm));
        let h_max = cfg
            .dense_hidden
            .max(cfg.expert_hidden)
            .max(cfg.shared_hidden);
        self.ws = Some(Workspace {
            cap_n,
            cap_b,
            inputs: vec![0; cap_n],
            targets: vec![0; cap_n],
            next: vec![0; cap_n],
            mtp_targets: vec![0; cap_n],
            residual: (0..=cfg.n_layers).map(|_| vec![0.0; cap_n * c]).collect(),
            blocks,
            head: HeadActs::new(cap_n, c, v),
            mtp,
            dres: vec![0.0; cap_n * c],
            bsc: BlockScratch::new(d, cap_n, h_max),
            msc: MtpScratch::new(cap_n, c),
        });
    }

    /// Checks a batch and copies it into the workspace's token arrays. Returns (B, T).
    fn load_batch(&mut self, batch: &Batch) -> Result<(usize, usize), ModelError> {
        let (b, t) = (batch.batch_size, batch.seq_len);
        if b == 0 || t == 0 {
            return Err(ModelError::BatchShape {
                reason: format!("B = {b} and T = {t} must both be positive"),
            });
        }
        if t > self.config.context {
            return Err(ModelError::SequenceTooLong {
                seq_len: t,
                context: self.config.context,
            });
        }
        let n = b
            .checked_mul(t)
            .filter(|&n| n <= MAX_BATCH_TOKENS)
            .ok_or_else(|| ModelError::BatchShape {
                reason: format!("B·T must stay under {MAX_BATCH_TOKENS}"),
            })?;
        self.check_attention_size(n)?;
        let expected = b * (t + 1);
        if batch.tokens.len() != expected {
            return Err(ModelError::BatchShape {
                reason: format!(
                    "{} tokens, expected B·(T+1) = {expected}",
                    batch.tokens.len()
                ),
            });
        }
        self.check_tokens(&batch.tokens)?;
        self.ensure_workspace(b, t);
        let ws = self
            .ws
            .as_mut()
            .expect("ensure_workspace just created the workspace");
        for bi in 0..b {
            let row = &batch.tokens[bi * (t + 1)..(bi + 1) * (t + 1)];
            for ti in 0..t {
                let i = bi * t + ti;
                ws.inputs[i] = row[ti];
                ws.targets[i] = row[ti + 1];
                ws.next[i] = row[ti + 1];
                ws.mtp_targets[i] = if ti + 2 <= t { row[ti + 2] } else { IGNORE };
            }
        }
        debug_assert_eq!(n, b * t);
        Ok((b, t))
    }

    /// Refuses token counts whose attention buffers would exceed [`MAX_ATTENTION_FLOATS`].
    fn check_attention_size(&self, n: usize) -> Result<(), ModelError> {
        let att = n
            .checked_mul(self.config.n_heads)
            .and_then(|x| x.checked_mul(self.config.context));
        if att.is_none_or(|x| x > MAX_ATTENTION_FLOATS) {
            return Err(ModelError::BatchShape {
                reason: format!(
                    "B·T·heads·context must stay under {MAX_ATTENTION_FLOATS} (attention buffer)"
                ),
            });
        }
        Ok(())
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), ModelError> {
        let vocab = self.config.vocab_size;
        match tokens.iter().find(|&&tok| tok as usize >= vocab) {
            Some(&token) => Err(ModelError::TokenOutOfRange { token, vocab }),
            None => Ok(()),
        }
    }

    /// Forward pass of the main model over the workspace's tokens. With `with_loss`, the head turns logits
    /// into probabilities. Returns (Σ main loss, labelled rows, balance loss).
    fn forward_main(
        &mut self,
        b: usize,
        t: usize,
        with_loss: bool,
        count_load: bool,
    ) -> Result<(f64, usize, f64), ModelError> {
        let n = b * t;
        let d = self.block_dims();
        let hspec = self.head_spec();
        let c = self.config.d_model;
        let precision = self.config.linear_precision();
        let Model {
            params,
            layout,
            backend,
            rope,
            ws,
            router_bias,
            experts,
            expert_counts,
            config,
            ..
        } = self;
        let ws = ws
            .as_mut()
            .expect("callers run ensure_workspace before forward");
        let backend: &mut dyn Backend = backend.as_mut();
        embedding::forward(
            &mut ws.residual[0][..n * c],
            &ws.inputs[..n],
            layout.wte.of(params),
            c,
        );
        let mut balance = 0.0f64;
        for (l, p) in layout.blocks.iter().enumerate() {
            let (left, right) = ws.residual.split_at_mut(l + 1);
            let ctx = BlockContext {
                backend: &mut *backend,
                precision,
                params,
                p,
                dims: d,
                rope,
                present: experts.layer(l),
                bias: &router_bias[l],
                b,
                t,
            };
            balance += block::forward(ctx, &left[l][..n * c], &mut right[0], &mut ws.blocks[l])?;
            if count_load {
                if let block::FfnActs::Moe(ma) = &ws.blocks[l].ffn {
                    for (acc, &cnt) in expert_counts[l].iter_mut().zip(&ma.counts) {
                        *acc += cnt as u64;
                    }
                }
            }
        }
        let last = &ws.residual[config.n_layers][..n * c];
        let targets = with_loss.then_some(&ws.targets[..n]);
        let (sum, count) = head::forward(backend, params, hspec, last, targets, &mut ws.head, n)?;
        Ok((sum, count, balance))
    }

    /// Forward pass of the MTP module (after [`Model::forward_main`]). Returns (Σ MTP loss, labelled rows),
    /// zeros without an MTP module.
    fn forward_mtp(
        &mut self,
        b: usize,
        t: usize,
        with_loss: bool,
    ) -> Result<(f64, usize), ModelError> {
        let n = b * t;
        let d = self.block_dims();
        let hspec = self.head_spec();
        let c = self.config.d_model;
        let precision = self.config.linear_precision();
        let Model {
            params,
            layout,
            backend,
            rope,
            ws,
            config,
            ..
        } = self;
        let ws = ws
            .as_mut()
            .expect("callers run ensure_workspace before forward");
        let (Some(mp), Some(ma)) = (&layout.mtp, &mut ws.mtp) else {
            return Ok((0.0, 0));
        };
        let last = &ws.residual[config.n_layers][..n * c];
        let ctx = MtpContext {
            backend: backend.as_mut(),
            precision,
            params,
            p: mp,
            wte: layout.wte,
            head: hspec,
            dims: d,
            rope,
            b,
            t,
        };
        let targets = with_loss.then_some(&ws.mtp_targets[..n]);
        Ok(mtp::forward(ctx, last, &ws.next[..n], targets, ma)?)
    }

    /// Full forward with losses.
    fn forward(&mut self, b: usize, t: usize, count_load: bool) -> Result<LossStats, ModelError> {
        let (main_sum, main_count, balance) = self.forward_main(b, t, true, count_load)?;
        let (mtp_sum, mtp_count) = self.forward_mtp(b, t, true)?;
        let loss = if main_count > 0 {
            main_sum / main_count as f64
        } else {
            0.0
        };
        let mtp_loss = if mtp_count > 0 {
            mtp_sum / mtp_count as f64
        } else {
            0.0
        };
        Ok(LossStats {
            loss: loss as f32,
            mtp_loss: mtp_loss as f32,
            balance_loss: balance as f32,
            total: loss + self.config.mtp_lambda as f64 * mtp_loss + balance,
            tokens: b * t,
        })
    }

    /// Backward of [`Model::forward`] (which must have run with `with_loss`): ADDS the gradient of
    /// `LossStats::total` into the gradients.
    fn backward(&mut self, b: usize, t: usize) -> Result<(), ModelError> {
        let n = b * t;
        let d = self.block_dims();
        let hspec = self.head_spec();
        let c = self.config.d_model;
        let precision = self.config.linear_precision();
        let lambda = self.config.mtp_lambda;
        let Model {
            params,
            grads,
            layout,
            backend,
            rope,
            ws,
            router_bias,
            experts,
            config,
            ..
        } = self;
        let ws = ws
            .as_mut()
            .expect("callers run ensure_workspace before backward");
        let backend: &mut dyn Backend = backend.as_mut();
        let dres = &mut ws.dres[..n * c];
        dres.fill(0.0);
        let last = &ws.residual[config.n_layers][..n * c];
        if let (Some(mp), Some(ma)) = (&layout.mtp, &mut ws.mtp) {
            let count = ws.mtp_targets[..n].iter().filter(|&&x| x != IGNORE).count();
            if count > 0 {
                let ctx = MtpContext {
                    backend: &mut *backend,
                    precision,
                    params,
                    p: mp,
                    wte: layout.wte,
                    head: hspec,
                    dims: d,
                    rope,
                    b,
                    t,
                };
                let scale = lambda / count as f32;
                mtp::backward(
                    ctx,
                    grads,
                    last,
                    &ws.next[..n],
                    &ws.mtp_targets[..n],
                    scale,
                    ma,
                    dres,
                    &mut ws.msc,
                    &mut ws.bsc,
                )?;
            }
        }
        let scale = 1.0 / n as f32;
        head::backward(
            &mut *backend,
            params,
            grads,
            hspec,
            last,
            &ws.targets[..n],
            scale,
            &mut ws.head,
            dres,
            &mut ws.bsc.dln,
            n,
        )?;
        for (l, p) in layout.blocks.iter().enumerate().rev() {
            let ctx = BlockContext {
                backend: &mut *backend,
                precision,
                params,
                p,
                dims: d,
                rope,
                present: experts.layer(l),
                bias: &router_bias[l],
                b,
                t,
            };
            block::backward(
                ctx,
                grads,
                &ws.residual[l][..n * c],
                dres,
                &ws.blocks[l],
                &mut ws.bsc,
            )?;
        }
        embedding::backward(layout.wte.of_mut(grads), dres, &ws.inputs[..n], c);
        Ok(())
    }

    /// Forward and backward on one batch: ADDS the gradient of the total loss into the gradients (call
    /// [`Model::zero_grads`] to start a new accumulation window) and counts expert loads for the next
    /// [`Model::update_router_bias`]. Does not touch the parameters.
    pub fn forward_backward(&mut self, batch: &Batch) -> Result<LossStats, ModelError> {
        let (b, t) = self.load_batch(batch)?;
        let stats = self.forward(b, t, true)?;
        self.backward(b, t)?;
        Ok(stats)
    }

    /// Losses on one batch, and the routed slots each expert received on it (per layer, empty for dense
    /// layers): how balanced the model's routing is, measured without training. The counts kept for
    /// [`Model::update_router_bias`] are left as they were.
    pub fn evaluate_routing(
        &mut self,
        batch: &Batch,
    ) -> Result<(LossStats, Vec<Vec<u64>>), ModelError> {
        let kept = self.expert_counts.clone();
        self.reset_expert_counts();
        let (b, t) = self.load_batch(batch)?;
        let result = self.forward(b, t, true);
        let counts = std::mem::replace(&mut self.expert_counts, kept);
        Ok((result?, counts))
    }

    /// Losses on one batch, without gradients or load counting.
    pub fn evaluate(&mut self, batch: &Batch) -> Result<LossStats, ModelError> {
        let (b, t) = self.load_batch(batch)?;
        self.forward(b, t, false)
    }

    /// Inference on one sequence of T tokens: writes the main head's logits [T, V] (position t predicts
    /// token t + 1) and, when asked and the model has an MTP module, the MTP head's logits [T, V] (position
    /// t predicts token t + 2, using token t + 1 as its input; at the last position that input is the main
    /// head's argmax, as in speculative decoding).
    pub fn logits(
        &mut self,
        tokens: &[u32],
        main_out: &mut [f32],
        mtp_out: Option<&mut [f32]>,
    ) -> Result<(), ModelError> {
        let t = tokens.len();
        let v = self.config.vocab_size;
        if t == 0 {
            return Err(ModelError::BatchShape {
                reason: "no tokens".into(),
            });
        }
        if t > self.config.context {
            return Err(ModelError::SequenceTooLong {
                seq_len: t,
                context: self.config.context,
            });
        }
        self.check_tokens(tokens)?;
        self.check_attention_size(t)?;
        check_len("main logits", t * v, main_out.len())?;
        if let Some(m) = &mtp_out {
            check_len("mtp logits", t * v, m.len())?;
        }
        self.ensure_workspace(1, t);
        {
            let ws = self
                .ws
                .as_mut()
                .expect("ensure_workspace just created the workspace");
            ws.inputs[..t].copy_from_slice(tokens);
            ws.next[..t - 1].copy_from_slice(&tokens[1..]);
        }
        self.forward_main(1, t, false, false)?;
        if mtp_out.is_some() && self.layout.mtp.is_some() {
            let ws = self
                .ws
                .as_mut()
                .expect("ensure_workspace just created the workspace");
            ws.next[t - 1] = decode::argmax_row(&ws.head.logits[(t - 1) * v..t * v]);
            self.forward_mtp(1, t, false)?;
        }
        let ws = self
            .ws
            .as_ref()
            .expect("ensure_workspace just created the workspace");
        main_out.copy_from_slice(&ws.head.logits[..t * v]);
        if let (Some(out), Some(ma)) = (mtp_out, &ws.mtp) {
            out.copy_from_slice(&ma.head.logits[..t * v]);
        }
        Ok(())
    }
}

fn check_len(what: &str, expected: usize, actual: usize) -> Result<(), ModelError> {
    if expected == actual {
        Ok(())
    } else {
        Err(ModelError::Length {
            what: what.to_string(),
            expected,
            actual,
        })
    }
}
