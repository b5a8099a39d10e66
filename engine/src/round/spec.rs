//! What every member of a run must agree on beyond the protocol messages: the model's shape, the seed its
//! weights start from and the warm-up of the learning rate, plus the settings derived from them (shard
//! sizes, batch shape, the inner AdamW settings of a round).
//!
//! ## The tiny preset
//! [`RunSpec::tiny`] is the test and demo model: d_model 64, 4 heads, 2 blocks (the first dense with a
//! hidden width of 128, the second MoE with 8 routed experts of hidden width 64, top-2, and a shared expert of
//! width 64), context 64, MTP on, FP8 GEMMs. Its trunk has 152,704 parameters and each expert 12,288
//! (P = 251,008), so 4 simulated nodes run 20 sync rounds plus both single-node baselines in well under a
//! minute of CPU time in the test profile (`node/tests/round_converge.rs`).
//!
//! ## The inner optimizer ([`RunSpec::optim_config`])
//! AdamW with the round's `inner_lr` and `weight_decay`, betas (0.9, 0.95), eps 1e-8, and a learning rate
//! that warms up linearly over [`RunSpec::warmup_steps`] optimizer steps and then stays constant. A cosine
//! decay would need the run's length, which no round announcement carries (runs are open-ended), so the
//! schedule is warmup-then-constant; the single-node baselines of [`super::simulate`] use the same one.
//! The step that indexes the schedule is the shard's update count in `sync` mode and the global inner step
//! (`round · H + h`) in `diloco` mode.
//!
//! ## No gradient clipping (`grad_clip = 0`)
//! Global-norm clipping needs the norm of the whole model's gradient, which no shard holder sees, and
//! clipping each shard by its own norm would change the relative step sizes of the shards, i.e. train a
//! different model than the single-node one. AdamW is nearly invariant to the gradient's scale anyway, so
//! clipping mostly guards against outliers, and in the network that is the job of the norm check, the loss
//! check and the centered-clipping robust mean. The single-node baselines train without clipping too, so the
//! comparison is of the same mathematics.

use mana_kernels::gemm::Precision;
use mana_kernels::model::{ExpertSet, ModelConfig, ParamLayout, ShardId};
use mana_kernels::optim::OptimConfig;
use mana_protocol::{CodecOptions, HyperParams, UpdateRule};

use super::error::RoundError;

/// Outer learning rate with sparse low-bit deltas (see [`RunSpec::hyper_with_codec`]): the mean of what the
/// nodes sent is applied as it is.
pub const SPARSE_OUTER_LR: f32 = 1.0;
/// Outer Nesterov momentum with sparse low-bit deltas: none, error feedback takes its place (SparseLoCo).
/// Measured on the tiny model, 4 nodes, r = 2, H = 50 and 15: momentum 0.9 (lr 0.7) ends worse than 0 (lr
/// 1) with int2 at 1% and 3% and int4 at 3% density (docs/training.md).
pub const SPARSE_OUTER_MOMENTUM: f32 = 0.0;

/// What every member of a run agrees on, outside the protocol messages.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    /// The model's shape (and precision).
    pub model: ModelConfig,
    /// Seed of the initial weights (round 0's checkpoint is a pure function of `model` and this).
    pub init_seed: u64,
    /// Optimizer steps of linear learning-rate warm-up (then constant); see the module doc.
    pub warmup_steps: u64,
}

impl RunSpec {
    /// The test/demo preset (see the module doc): small enough for 4 nodes and a coordinator on 2 cores.
    pub fn tiny() -> RunSpec {
        let model = ModelConfig {
            vocab_size: 256,
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            n_dense_layers: 1,
            dense_hidden: 128,
            n_routed_experts: 8,
            top_k: 2,
            expert_hidden: 64,
            shared_hidden: 64,
            context: 64,
            mtp: true,
            precision: Precision::Fp8,
            ..ModelConfig::default()
        };
        RunSpec {
            model,
            init_seed: 1,
            warmup_steps: 10,
        }
    }

    /// The default hyper-parameters for this run and `rule` (what a coordinator announces unless told
    /// otherwise): inner lr 3e-3, weight decay 0.1, outer lr 1 and momentum 0 (plain averaging: clearly
    /// better than lr 0.7 / momentum 0.9 at H = 5 and within 0.01 nats at H = 20 and 50 in our KJV runs, see
    /// docs/training.md), 8 sequences of 32 tokens per inner step, dense FP8 deltas with 128-value blocks.
    pub fn hyper(&self, rule: UpdateRule) -> HyperParams {
        HyperParams {
            update_rule: rule,
            inner_lr: 3e-3,
            weight_decay: 0.1,
            outer_lr: 1.0,
            outer_momentum: 0.0,
            batch_tokens: 256,
            seq_len: 32,
            codec: CodecOptions::default(),
            router_bias_gamma: self.model.bias_gamma,
        }
    }

    /// The default hyper-parameters for `rule` with deltas encoded as `codec`: [`RunSpec::hyper`] with that
    /// codec, and with a sparse low-bit codec ([`CodecOptions::is_sparse_low_bit`]: int2/int4 values and
    /// per-block top-k, SparseLoCo) the outer optimizer [`SPARSE_OUTER_LR`] / [`SPARSE_OUTER_MOMENTUM`]
    /// whatever the dense default is: error feedback already carries what earlier rounds did not send, and
    /// Nesterov momentum on top of it measured worse (docs/training.md, "Sparse low-bit deltas").
    pub fn hyper_with_codec(&self, rule: UpdateRule, codec: CodecOptions) -> HyperParams {
        let mut hyper = self.hyper(rule);
        hyper.codec = codec;
        if codec.is_sparse_low_bit() {
            hyper.outer_lr = SPARSE_OUTER_LR;
            hyper.outer_momentum = SPARSE_OUTER_MOMENTUM;
        }
        hyper
    }

    /// The inner AdamW settings of a round (see the module doc: warm-up then constant, no clipping).
    pub fn optim_config(&self, hyper: &HyperParams) -> OptimConfig {
        let warmup = usize::try_from(self.warmup_steps).unwrap_or(usize::MAX);
        OptimConfig {
            lr: hyper.inner_lr,
            min_lr: hyper.inner_lr,
            warmup_steps: warmup,
            // total <= warmup: after the warm-up lr_at() returns min_lr (= lr), i.e. a constant rate.
            total_steps: warmup,
            weight_decay: hyper.weight_decay,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 0.0,
        }
    }

    /// Every shard of the model: the trunk, then each routed expert in (layer, index) order.
    pub fn shards(&self) -> Vec<ShardId> {
        let mut out = vec![ShardId::Trunk];
        out.extend(ExpertSet::all(&self.model).shards());
        out
    }

    /// The routed experts of the model, in (layer, index) order.
    pub fn experts(&self) -> Vec<ShardId> {
        ExpertSet::all(&self.model).shards()
    }

    /// The number of parameters of `shard` (also the length of its delta and of each optimizer moment).
    pub fn shard_len(&self, shard: ShardId) -> Result<usize, RoundError> {
        let unknown = || RoundError::UnknownShard {
            shard: shard.to_string(),
        };
        let experts = ExpertSet::from_shards(&self.model, &[shard]).map_err(|_| unknown())?;
        ParamLayout::new(&self.model, &experts)
            .shard_span(shard)
            .map(|s| s.len)
            .ok_or_else(unknown)
    }

    /// The number of parameters of the full model: the trunk and every routed expert (what an all-reduce of
    /// the full model's gradient moves, the reference of the traffic figures).
    pub fn params(&self) -> Result<u64, RoundError> {
        let mut total = self.shard_len(ShardId::Trunk)? as u64;
        for shard in self.experts() {
            total += self.shard_len(shard)? as u64;
        }
        Ok(total)
    }

    /// The number of router biases the trunk carries (E per MoE layer); 0 for an expert.
    pub fn router_bias_len(&self, shard: ShardId) -> usize {
        match shard {
            ShardId::Trunk => {
                (0..self.model.n_layers)
                    .filter(|&l| self.model.is_moe_layer(l))
                    .count()
                    * self.model.n_routed_experts
            }
            ShardId::Expert { .. } => 0,
        }
    }

    /// Sequences per inner step and positions per sequence of a round: (batch_tokens / seq_len, seq_len).
    /// Refused unless seq_len divides batch_tokens and fits the model's context.
    pub fn batch_shape(&self, hyper: &HyperParams) -> Result<(usize, usize), RoundError> {
        let t = hyper.seq_len as usize;
        let tokens = hyper.batch_tokens as usize;
        if t == 0 || t > self.model.context {
            return Err(RoundError::settings(
                "seq_len",
                format!("{t} is not in 1..={}", self.model.context),
            ));
        }
        if tokens == 0 || tokens % t != 0 {
            return Err(RoundError::settings(
                "batch_tokens",
                format!("{tokens} is not a positive multiple of seq_len {t}"),
            ));
        }
        Ok((tokens / t, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mana_protocol::{ScaleFormat, ValueFormat};

    #[test]
    fn a_sparse_low_bit_codec_gets_no_outer_momentum() {
        let spec = RunSpec::tiny();
        let sparse = CodecOptions {
            block_size: 128,
            scale: ScaleFormat::PowerOfTwo,
            top_k_density: Some(0.03),
            values: ValueFormat::Int2,
            top_k_per_block: true,
        };
        let h = spec.hyper_with_codec(UpdateRule::Diloco, sparse);
        assert_eq!(h.codec, sparse);
        assert_eq!(
            (h.outer_lr, h.outer_momentum),
            (SPARSE_OUTER_LR, SPARSE_OUTER_MOMENTUM)
        );
        // Any other codec keeps the dense default.
        let fp8 = CodecOptions {
            top_k_density: Some(0.04),
            ..CodecOptions::default()
        };
        let dense = spec.hyper(UpdateRule::Diloco);
        let h = spec.hyper_with_codec(UpdateRule::Diloco, fp8);
        assert_eq!(
            (h.outer_lr, h.outer_momentum, h.codec),
            (dense.outer_lr, dense.outer_momentum, fp8)
        );
    }
}
