//! Parameter layout: every tensor of the model as a named [`Span`] of one flat f32 buffer, grouped by
//! shard.
//!
//! llm.c keeps all parameters in one allocation and cuts named views from it in a fixed order; we do the
//! same, and add one rule the network needs: the tensors of each shard are contiguous. The trunk (everything
//! that is not a routed expert) comes first, then each present expert in (layer, index) order. A shard's
//! parameters, gradients and AdamW moments are therefore one slice each of buffers that share this layout,
//! and exporting or importing a shard is a copy.

use super::config::ModelConfig;
pub use super::shard_id::ShardId;

/// A contiguous range of a flat buffer: where one tensor (or shard) lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Span {
    /// First element.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
}

impl Span {
    /// One past the last element.
    pub fn end(&self) -> usize {
        self.offset + self.len
    }
    /// The span's elements in `buf` (which must share the layout this span came from).
    pub fn of<'a>(&self, buf: &'a [f32]) -> &'a [f32] {
        &buf[self.offset..self.end()]
    }
    /// The span's elements in `buf`, mutably.
    pub fn of_mut<'a>(&self, buf: &'a mut [f32]) -> &'a mut [f32] {
        &mut buf[self.offset..self.end()]
    }
}

/// Which routed experts a model instance holds. Routing chooses only among present experts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertSet {
    /// `present[layer][index]`; empty for dense layers.
    present: Vec<Vec<bool>>,
}

impl ExpertSet {
    /// Every routed expert of every MoE layer.
    pub fn all(config: &ModelConfig) -> Self {
        let present = (0..config.n_layers)
            .map(|l| {
                if config.is_moe_layer(l) {
                    vec![true; config.n_routed_experts]
                } else {
                    Vec::new()
                }
            })
            .collect();
        Self { present }
    }

    /// No routed expert at all (only the trunk; MoE layers then run their shared expert alone).
    pub fn none(config: &ModelConfig) -> Self {
        let present = (0..config.n_layers)
            .map(|l| {
                if config.is_moe_layer(l) {
                    vec![false; config.n_routed_experts]
                } else {
                    Vec::new()
                }
            })
            .collect();
        Self { present }
    }

    /// The experts named by `shards`. A trunk id is skipped (it says nothing about experts); the first
    /// expert id that does not exist in this config is returned as the error.
    pub fn from_shards(config: &ModelConfig, shards: &[ShardId]) -> Result<Self, ShardId> {
        let mut set = Self::none(config);
        for &shard in shards {
            if let ShardId::Expert { .. } = shard {
                if !set.insert(shard) {
                    return Err(shard);
                }
            }
        }
        Ok(set)
    }

    /// Marks an expert present; false if (layer, index) is not a routed expert of this config.
    pub fn insert(&mut self, shard: ShardId) -> bool {
        match shard {
            ShardId::Trunk => false,
            ShardId::Expert { layer, index } => match self
                .present
                .get_mut(usize::from(layer))
                .and_then(|l| l.get_mut(usize::from(index)))
            {
                Some(slot) => {
                    *slot = true;
                    true
                }
                None => false,
            },
        }
    }

    /// Whether expert `index` of block `layer` is present.
    pub fn contains(&self, layer: usize, index: usize) -> bool {
        self.present
            .get(layer)
            .and_then(|l| l.get(index))
            .copied()
            .unwrap_or(false)
    }

    /// Presence flags of one block's experts (empty for a dense block or an unknown layer).
    pub fn layer(&self, layer: usize) -> &[bool] {
        self.present.get(layer).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// The present experts as shard ids, in (layer, index) order.
    pub fn shards(&self) -> Vec<ShardId> {
        let mut out = Vec::new();
        for (layer, flags) in self.present.iter().enumerate() {
            for (index, &p) in flags.iter().enumerate() {
                // In bounds: a validated config has at most MAX_LAYERS layers and MAX_EXPERTS_PER_LAYER experts.
                if let (true, Ok(shard)) = (p, ShardId::expert(layer, index)) {
                    out.push(shard);
                }
            }
        }
        out
    }
}

/// One parameter tensor: its name, shape, place and shard.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Dotted name, e.g. `blocks.2.attn.wqkv` or `blocks.3.experts.5.w2`.
    pub name: String,
    /// Shape, row-major (`[out, in]` for Linear weights).
    pub shape: Vec<usize>,
    /// Where it lives in the flat buffer.
    pub span: Span,
    /// The shard it belongs to.
    pub shard: ShardId,
    /// Whether AdamW applies weight decay to it (matrices yes, norm gains no).
    pub decay: bool,
}

/// The two matrices of a SwiGLU FFN: `w13` [2H, C] (gate rows then up rows) and `w2` [C, H].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwigluParams {
    /// Gate and up projections stacked: [2H, C].
    pub w13: Span,
    /// Down projection: [C, H].
    pub w2: Span,
    /// H: hidden width.
    pub hidden: usize,
}

/// A MoE feed-forward: router, shared expert and the routed experts present in this instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoeParams {
    /// Router (affinity) weights: [E, C], f32.
    pub router: Span,
    /// The always-on shared expert.
    pub shared: SwigluParams,
    /// Routed experts; `None` where the expert is not held by this instance.
    pub experts: Vec<Option<SwigluParams>>,
}

/// A block's feed-forward: dense SwiGLU or DeepSeekMoE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FfnParams {
    /// Dense SwiGLU.
    Dense(SwigluParams),
    /// Shared + routed experts.
    Moe(MoeParams),
}

/// One transformer block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockParams {
    /// RMSNorm gain before attention: [C].
    pub ln1: Span,
    /// Query, key, value projections stacked: [3C, C].
    pub wqkv: Span,
    /// Attention output projection: [C, C].
    pub wo: Span,
    /// RMSNorm gain before the FFN: [C].
    pub ln2: Span,
    /// The feed-forward.
    pub ffn: FfnParams,
}

/// The depth-1 multi-token-prediction module (it shares the embedding and the head with the main model).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MtpParams {
    /// RMSNorm gain on the main model's last hidden state: [C].
    pub norm_h: Span,
    /// RMSNorm gain on the embedding of the next token: [C].
    pub norm_e: Span,
    /// Projection of the concatenation: [C, 2C].
    pub proj: Span,
    /// Its transformer block (dense FFN).
    pub block: BlockParams,
    /// Final RMSNorm gain before the shared head: [C].
    pub norm_out: Span,
}

/// Where every parameter of one model instance lives, in the flat buffers of parameters, gradients and
/// optimizer moments.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamLayout {
    /// Token embedding: [V, C], f32.
    pub wte: Span,
    /// The L blocks.
    pub blocks: Vec<BlockParams>,
    /// Final RMSNorm gain: [C].
    pub lnf: Span,
    /// LM head: [V, C], f32.
    pub head: Span,
    /// The MTP module, if configured.
    pub mtp: Option<MtpParams>,
    /// Every tensor, in buffer order.
    pub tensors: Vec<TensorInfo>,
    /// Every present shard and its span, trunk first.
    pub shards: Vec<(ShardId, Span)>,
    /// Total element count.
    pub total: usize,
}

struct Builder {
    tensors: Vec<TensorInfo>,
    offset: usize,
    shard: ShardId,
}

impl Builder {
    fn push(&mut self, name: String, shape: &[usize]) -> Span {
        let len = shape.iter().product();
        let span = Span {
            offset: self.offset,
            len,
        };
        self.offset += len;
        self.tensors.push(TensorInfo {
            name,
            shape: shape.to_vec(),
            span,
            shard: self.shard,
            decay: shape.len() >= 2,
        });
        span
    }
    fn swiglu(&mut self, prefix: &str, c: usize, h: usize) -> SwigluParams {
        let w13 = self.push(format!("{prefix}.w13"), &[2 * h, c]);
        let w2 = self.push(format!("{prefix}.w2"), &[c, h]);
        SwigluParams { w13, w2, hidden: h }
    }
    fn block(
        &mut self,
        prefix: &str,
        c: usize,
        ffn: Option<(usize, usize)>,
        dense_hidden: usize,
    ) -> BlockParams {
        let ln1 = self.push(format!("{prefix}.ln1"), &[c]);
        let wqkv = self.push(format!("{prefix}.attn.wqkv"), &[3 * c, c]);
        let wo = self.push(format!("{prefix}.attn.wo"), &[c, c]);
        let ln2 = self.push(format!("{prefix}.ln2"), &[c]);
        let ffn = match ffn {
            None => FfnParams::Dense(self.swiglu(&format!("{prefix}.ffn"), c, dense_hidden)),
            Some((e, shared_hidden)) => {
                let router = self.push(format!("{prefix}.router"), &[e, c]);
                let shared = self.swiglu(&format!("{prefix}.shared"), c, shared_hidden);
                FfnParams::Moe(MoeParams {
                    router,
                    shared,
                    experts: vec![None; e],
                })
            }
        };
        BlockParams {
            ln1,
            wqkv,
            wo,
            ln2,
            ffn,
        }
    }
}

impl ParamLayout {
    /// Lays out the trunk, then the experts in `experts`, for `config` (assumed validated).
    pub fn new(config: &ModelConfig, experts: &ExpertSet) -> Self {
        let c = config.d_model;
        let v = config.vocab_size;
        let mut b = Builder {
            tensors: Vec::new(),
            offset: 0,
            shard: ShardId::Trunk,
        };
        let wte = b.push("wte".into(), &[v, c]);
        let mut blocks = Vec::with_capacity(config.n_layers);
        for l in 0..config.n_layers {
            let moe = config
                .is_moe_layer(l)
                .then_some((config.n_routed_experts, config.shared_hidden));
            blocks.push(b.block(&format!("blocks.{l}"), c, moe, config.dense_hidden));
        }
        let lnf = b.push("lnf".into(), &[c]);
        let head = b.push("head".into(), &[v, c]);
        let mtp = config.mtp.then(|| {
            let norm_h = b.push("mtp.norm_h".into(), &[c]);
            let norm_e = b.push("mtp.norm_e".into(), &[c]);
            let proj = b.push("mtp.proj".into(), &[c, 2 * c]);
            let block = b.block("mtp.block", c, None, config.dense_hidden);
            let norm_out = b.push("mtp.norm_out".into(), &[c]);
            MtpParams {
                norm_h,
                norm_e,
                proj,
                block,
                norm_out,
            }
        });
        let mut shards = vec![(
            ShardId::Trunk,
            Span {
                offset: 0,
                len: b.offset,
            },
        )];
        for shard in experts.shards() {
            let Some((layer, index)) = shard.expert_position() else {
                continue;
            };
            let start = b.offset;
            b.shard = shard;
            let p = b.swiglu(
                &format!("blocks.{layer}.experts.{index}"),
                c,
                config.expert_hidden,
            );
            if let Some(FfnParams::Moe(moe)) = blocks.get_mut(layer).map(|bl| &mut bl.ffn) {
                if let Some(slot) = moe.experts.get_mut(index) {
                    *slot = Some(p);
                }
            }
            shards.push((
                shard,
                Span {
                    offset: start,
                    len: b.offset - start,
                },
            ));
        }
        ParamLayout {
            wte,
            blocks,
            lnf,
            head,
            mtp,
            total: b.offset,
            tensors: b.tensors,
            shards,
        }
    }

    /// The span of a present shard.
    pub fn shard_span(&self, shard: ShardId) -> Option<Span> {
        self.shards
            .iter()
            .find(|(s, _)| *s == shard)
            .map(|(_, span)| *span)
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}
