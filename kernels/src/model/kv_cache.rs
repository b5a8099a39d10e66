//! The KV cache of incremental inference: for every attention layer, the rotated keys and the values of the
//! positions already run, so that a new position costs one row of work instead of the whole window.
//!
//! Shapes: P = capacity (the model's context), C width, L blocks.
//! - per block and for the MTP block: `keys`, `values` [P, C] (keys after RoPE, as attention reads them)
//! - `hidden` [P, C]: the main model's last hidden state per position (the MTP module's input)
//! - `tokens` [len]: the token at each cached position
//!
//! The MTP module at position t reads token t + 1, which is known only once the next position has been
//! run. Its cache therefore holds the positions whose next token is known, `mtp_len ≤ len − 1`; the last
//! position's MTP row is recomputed by the next step with the token that was really appended.
//!
//! A cache belongs to one model shape and one window: position p of the cache is position p of the
//! window, and RoPE rotates keys by it. [`crate::model::Model::decode`] fills it;
//! [`KvCache::truncate`] drops positions (a rejected speculative draft, or a window that no longer shares a
//! prefix with the cache).

use super::ModelConfig;

/// Why a cache refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// The new positions would not fit in the cache (its capacity is the model's context).
    #[error("{new} new positions after {len} cached ones exceed the cache's {capacity}")]
    Full {
        /// Positions already cached.
        len: usize,
        /// Positions asked for.
        new: usize,
        /// The capacity.
        capacity: usize,
    },
    /// A decode step was given no tokens.
    #[error("a decode step needs at least one new token")]
    NoTokens,
    /// The step asked for logits of more rows than it runs, or of none.
    #[error("asked for the logits of {rows} rows of a step of {tokens} tokens")]
    Rows {
        /// Rows asked for.
        rows: usize,
        /// New tokens of the step.
        tokens: usize,
    },
    /// The cache was built for a model of another shape.
    #[error("the cache was built for another model shape ({what})")]
    Mismatch {
        /// What differs.
        what: &'static str,
    },
    /// A layer index past the model's blocks.
    #[error("layer {layer} is past the model's {layers} blocks")]
    Layer {
        /// The index given.
        layer: usize,
        /// L.
        layers: usize,
    },
    /// A residual buffer that is not a whole number of rows of width C, or has none.
    #[error("a residual of {len} values is not one or more rows of width {c}")]
    Residual {
        /// Its length.
        len: usize,
        /// C.
        c: usize,
    },
}

/// Keys and values of one attention layer.
#[derive(Clone, Debug)]
pub(crate) struct LayerKv {
    /// [P, C] rotated keys.
    pub(crate) keys: Vec<f32>,
    /// [P, C] values.
    pub(crate) values: Vec<f32>,
}

impl LayerKv {
    fn new(p: usize, c: usize) -> Self {
        Self {
            keys: vec![0.0; p * c],
            values: vec![0.0; p * c],
        }
    }
}

/// The cache of one model shape: per-block keys and values, the MTP block's, and the hidden states the MTP
/// module reads. Allocated once, for the whole context; [`KvCache::bytes`] says how much.
#[derive(Clone, Debug)]
pub struct KvCache {
    /// C.
    c: usize,
    /// P.
    capacity: usize,
    /// [len] token of each cached position.
    pub(crate) tokens: Vec<u32>,
    /// L layers.
    pub(crate) layers: Vec<LayerKv>,
    /// [P, C] main model's last hidden state per position.
    pub(crate) hidden: Vec<f32>,
    /// The MTP block's keys and values (None without MTP).
    pub(crate) mtp: Option<LayerKv>,
    /// Positions whose MTP keys and values are cached (≤ len − 1).
    pub(crate) mtp_len: usize,
}

impl KvCache {
    /// An empty cache for a model of this configuration, holding up to `config.context` positions.
    pub fn new(config: &ModelConfig) -> Self {
        let (p, c) = (config.context, config.d_model);
        Self {
            c,
            capacity: p,
            tokens: Vec::with_capacity(p),
            layers: (0..config.n_layers).map(|_| LayerKv::new(p, c)).collect(),
            hidden: vec![0.0; p * c],
            mtp: config.mtp.then(|| LayerKv::new(p, c)),
            mtp_len: 0,
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The most positions the cache holds (the model's context).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The tokens of the cached positions, in order: a caller compares them with its window to find how
    /// much of the cache it can keep.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Keeps the first `len` positions (no-op when `len` ≥ [`KvCache::len`]). Cheap: nothing is cleared,
    /// later steps overwrite the rows.
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
        self.mtp_len = self.mtp_len.min(self.tokens.len().saturating_sub(1));
    }

    /// Drops every position (a new window).
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Bytes held by the cache's buffers.
    pub fn bytes(&self) -> usize {
        let layer = |l: &LayerKv| (l.keys.len() + l.values.len()) * std::mem::size_of::<f32>();
        self.layers.iter().map(layer).sum::<usize>()
            + self.mtp.as_ref().map_or(0, layer)
            + self.hidden.len() * std::mem::size_of::<f32>()
            + self.tokens.capacity() * std::mem::size_of::<u32>()
    }

    /// Refuses a cache built for another model shape.
    pub(crate) fn check_shape(&self, config: &ModelConfig) -> Result<(), CacheError> {
        let what = if self.c != config.d_model {
            "width"
        } else if self.capacity != config.context {
            "context"
        } else if self.layers.len() != config.n_layers {
            "layer count"
        } else if self.mtp.is_some() != config.mtp {
            "MTP module"
        } else {
            return Ok(());
        };
        Err(CacheError::Mismatch { what })
    }

    /// Refuses `new` positions that would not fit after the cached ones.
    pub(crate) fn check_room(&self, new: usize) -> Result<(), CacheError> {
        if new == 0 {
            return Err(CacheError::NoTokens);
        }
        if self
            .len()
            .checked_add(new)
            .is_none_or(|end| end > self.capacity)
        {
            return Err(CacheError::Full {
                len: self.len(),
                new,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// Appends the tokens of positions that have just been run through every block.
    pub(crate) fn push_tokens(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }
}
