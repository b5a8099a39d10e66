//! The model's shape and training-relevant constants, as one struct readable from TOML.
//!
//! Defaults are sized for a 2-core CPU: d_model 128, 4 layers (the first dense), 8 routed experts with
//! top-2 routing, expert hidden 256, context 128. Because a config may come from a file or a peer,
//! [`ModelConfig::validate`] bounds every size before anything is allocated.

use serde::{Deserialize, Serialize};

use crate::gemm::{Fp8Recipe, LinearPrecision, Precision};

/// Largest parameter count (elements) a config may ask for: 2^31 f32 = 8 GiB, far beyond any CPU model and
/// a guard against configs that would make us allocate absurd buffers.
pub const MAX_PARAMS: usize = 1 << 31;
/// Largest value accepted for any single dimension (vocab, width, hidden sizes, context).
pub const MAX_DIM: usize = 1 << 20;
/// Largest number of routed experts per layer a config may ask for (layers: [`super::MAX_LAYERS`]).
pub const MAX_COUNT: usize = 4096;

/// Shape and hyper-parameters of the DeepSeek-V3-like model: byte vocabulary, RMSNorm pre-norm blocks with
/// RoPE attention, dense then DeepSeekMoE feed-forward layers, and one multi-token-prediction module.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// V: vocabulary size (256 for raw bytes).
    pub vocab_size: usize,
    /// C: width of the residual stream.
    pub d_model: usize,
    /// L: number of transformer blocks in the main model.
    pub n_layers: usize,
    /// NH: attention heads per block; C / NH must be even (RoPE rotates pairs).
    pub n_heads: usize,
    /// How many leading blocks use a dense SwiGLU FFN instead of MoE.
    pub n_dense_layers: usize,
    /// Hidden width of the dense SwiGLU FFN (also used by the MTP block).
    pub dense_hidden: usize,
    /// E: routed experts per MoE layer.
    pub n_routed_experts: usize,
    /// K: experts selected per token.
    pub top_k: usize,
    /// F: hidden width of each routed SwiGLU expert.
    pub expert_hidden: usize,
    /// Hidden width of the shared expert of each MoE layer.
    pub shared_hidden: usize,
    /// Longest sequence the model accepts (T <= context); sizes the RoPE table.
    pub context: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Whether the depth-1 multi-token-prediction module exists.
    pub mtp: bool,
    /// Weight of the MTP loss in the total loss (DeepSeek-V3 starts at 0.3).
    pub mtp_lambda: f32,
    /// Weight of the sequence-wise balance loss (DeepSeek-V3: 1e-4).
    pub balance_alpha: f32,
    /// Step of the auxiliary-loss-free router bias update (DeepSeek-V3: 0.001).
    pub bias_gamma: f32,
    /// Precision of the Linear GEMMs (attention projections, FFNs, experts, MTP projection).
    pub precision: Precision,
    /// Epsilon inside RMSNorm's square root.
    pub norm_eps: f32,
    /// Standard deviation of the initial weights of matrices.
    pub init_std: f32,
    /// Which Linear GEMM kinds run in FP8 when `precision` is fp8, and how their scales are chosen
    /// (the `[model.fp8]` table; default: all of them, amax scales, as DeepSeek-V3).
    pub fp8: Fp8Recipe,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 256,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            n_dense_layers: 1,
            dense_hidden: 384,
            n_routed_experts: 8,
            top_k: 2,
            expert_hidden: 256,
            shared_hidden: 256,
            context: 128,
            rope_theta: 10_000.0,
            mtp: true,
            mtp_lambda: 0.3,
            balance_alpha: 1e-4,
            bias_gamma: 1e-3,
            precision: Precision::Fp8,
            norm_eps: 1e-5,
            init_std: 0.02,
            fp8: Fp8Recipe::default(),
        }
    }
}

/// Why a model configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The TOML text did not parse or named unknown fields.
    #[error("model config: {0}")]
    Parse(String),
    /// A field holds a value outside its allowed range.
    #[error("model config: {field} = {value} is invalid: {reason}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// Its value, printed.
        value: String,
        /// What the value must satisfy.
        reason: &'static str,
    },
}

fn invalid(field: &'static str, value: impl ToString, reason: &'static str) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason,
    }
}

impl ModelConfig {
    /// C / NH: the width of one attention head.
    pub fn head_size(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// The precision of each Linear GEMM kind: `precision` with the switches of `fp8` applied.
    pub fn linear_precision(&self) -> LinearPrecision {
        self.fp8.linear_precision(self.precision)
    }

    /// Whether block `layer` has a MoE feed-forward (the first `n_dense_layers` are dense).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.n_dense_layers && layer < self.n_layers
    }

    /// Parses a config from TOML; missing fields take their defaults, unknown fields are an error. The
    /// result is validated.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Writes the config as TOML (the inverse of [`ModelConfig::from_toml_str`]).
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Checks every field's range and that the whole model stays under [`MAX_PARAMS`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let dims: [(&'static str, usize); 7] = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("dense_hidden", self.dense_hidden),
            ("expert_hidden", self.expert_hidden),
            ("shared_hidden", self.shared_hidden),
            ("context", self.context),
            ("n_heads", self.n_heads),
        ];
        for (field, value) in dims {
            if value == 0 || value > MAX_DIM {
                return Err(invalid(field, value, "must be in 1..=2^20"));
            }
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(invalid("vocab_size", self.vocab_size, "token ids are u32"));
        }
        // Every shard must be nameable by a ShardId (layer below MAX_LAYERS, index below MAX_EXPERTS_PER_LAYER).
        if self.n_layers == 0 || self.n_layers > usize::from(super::MAX_LAYERS) {
            return Err(invalid("n_layers", self.n_layers, "must be in 1..=1024"));
        }
        if self.n_dense_layers > self.n_layers {
            return Err(invalid(
                "n_dense_layers",
                self.n_dense_layers,
                "must be <= n_layers",
            ));
        }
        if self.n_routed_experts == 0 || self.n_routed_experts > MAX_COUNT {
            return Err(invalid(
                "n_routed_experts",
                self.n_routed_experts,
                "must be in 1..=4096",
            ));
        }
        if self.top_k == 0 || self.top_k > self.n_routed_experts {
            return Err(invalid(
                "top_k",
                self.top_k,
                "must be in 1..=n_routed_experts",
            ));
        }
        if self.d_model % self.n_heads != 0 || self.head_size() % 2 != 0 {
            return Err(invalid(
                "n_heads",
                self.n_heads,
                "d_model / n_heads must be an even integer",
            ));
        }
        let finite_nonneg: [(&'static str, f32); 5] = [
            ("mtp_lambda", self.mtp_lambda),
            ("balance_alpha", self.balance_alpha),
            ("bias_gamma", self.bias_gamma),
            ("norm_eps", self.norm_eps),
            ("init_std", self.init_std),
        ];
        for (field, value) in finite_nonneg {
            if !value.is_finite() || value < 0.0 {
                return Err(invalid(field, value, "must be finite and >= 0"));
            }
        }
        if !self.rope_theta.is_finite() || self.rope_theta <= 1.0 {
            return Err(invalid(
                "rope_theta",
                self.rope_theta,
                "must be finite and > 1",
            ));
        }
        match self.param_count_upper_bound() {
            Some(n) if n <= MAX_PARAMS => Ok(()),
            _ => Err(invalid(
                "model",
                "too large",
                "parameter count must stay under 2^31",
            )),
        }
    }

    /// Parameter count of the full model (all experts present), or `None` on overflow.
    fn param_count_upper_bound(&self) -> Option<usize> {
        let c = self.d_model;
        let swiglu = |h: usize| h.checked_mul(3)?.checked_mul(c);
        let attn = c.checked_mul(c)?.checked_mul(4)?.checked_add(2 * c)?;
        let dense = attn.checked_add(swiglu(self.dense_hidden)?)?;
        let moe = attn
            .checked_add(swiglu(self.shared_hidden)?)?
            .checked_add(self.n_routed_experts.checked_mul(c)?)?
            .checked_add(
                self.n_routed_experts
                    .checked_mul(swiglu(self.expert_hidden)?)?,
            )?;
        let n_moe = self.n_layers - self.n_dense_layers.min(self.n_layers);
        let blocks = dense
            .checked_mul(self.n_dense_layers)?
            .checked_add(moe.checked_mul(n_moe)?)?;
        let io = self
            .vocab_size
            .checked_mul(c)?
            .checked_mul(2)?
            .checked_add(c)?;
        let mtp = if self.mtp {
            dense
                .checked_add(c.checked_mul(2 * c)?)?
                .checked_add(3 * c)?
        } else {
            0
        };
        blocks.checked_add(io)?.checked_add(mtp)
    }
}
