//! KV-cached (incremental) inference: a step runs only the new positions of one sequence, reading the keys
//! and values of the earlier ones from a [`KvCache`]. Prefill is a step over the whole prompt; a decode step
//! runs one position, or several when speculative decoding verifies a draft.
//!
//! Shapes: T' new positions at `pos0..pos0 + T'` (pos0 = the cache's length), C width, V vocabulary, R rows
//! of logits asked for (the last R of the step). The residual `x` [T', C] of the new rows flows through
//! [`Model::decode_attention`] and [`Model::decode_ffn`] per block; these are public so that a client that
//! keeps the trunk could run the attention halves itself and have a MoE layer's FFN computed where its
//! experts are.
//!
//! Every product runs on the [`RowInvariant`] view of the backend, and every other op is per row or per
//! query in a fixed order, so a row's bits depend only on the tokens up to it: a step over one new position
//! and a step over the whole window from an empty cache give identical logits for that position. The
//! full-window training forward ([`Model::forward_backward`], [`Model::logits`]) is untouched and keeps the
//! `gemm` crate's batched products.

use super::block::{self, BlockActs, BlockContext};
use super::experts::{ExpertRunner, OutsideExperts};
use super::head::{self, HeadSpec};
use super::kv_cache::{CacheError, KvCache};
use super::moe::RemoteExperts;
use super::params::{BlockParams, FfnParams, ParamLayout, Span, SwigluParams};
use super::{Model, ModelError, check_len, embedding, mtp};
use crate::backend::{Backend, RowInvariant};
use crate::gemm::Precision;

/// Every weight a Linear layer multiplies in the model's precision (attention, FFNs, experts, the MTP
/// projection and block), as (span, out, in). The router and the head always run in f32 and are not
/// listed.
fn precision_weights(layout: &ParamLayout, c: usize) -> Vec<(Span, usize, usize)> {
    let mut out = Vec::new();
    let swiglu = |sw: &SwigluParams, out: &mut Vec<(Span, usize, usize)>| {
        out.push((sw.w13, 2 * sw.hidden, c));
        out.push((sw.w2, c, sw.hidden));
    };
    let block = |b: &BlockParams, out: &mut Vec<(Span, usize, usize)>| {
        out.push((b.wqkv, 3 * c, c));
        out.push((b.wo, c, c));
        match &b.ffn {
            FfnParams::Dense(sw) => swiglu(sw, out),
            FfnParams::Moe(m) => {
                swiglu(&m.shared, out);
                for sw in m.experts.iter().flatten() {
                    swiglu(sw, out);
                }
            }
        }
    };
    for b in &layout.blocks {
        block(b, &mut out);
    }
    if let Some(m) = &layout.mtp {
        out.push((m.proj, c, 2 * c));
        block(&m.block, &mut out);
    }
    out
}

/// The parameters a decode step reads and the backend view it multiplies with: at FP8, the copy whose
/// weights are rounded once ([`Model::round_decode_weights`]); otherwise the parameters themselves.
macro_rules! decode_view {
    ($params:expr, $decode_params:expr, $backend:expr, $precision:expr) => {
        match ($decode_params.as_deref(), $precision.forward) {
            (Some(rounded), Precision::Fp8) => (
                rounded,
                RowInvariant::with_rounded_weights($backend.as_mut()),
            ),
            _ => (&$params[..], RowInvariant::new($backend.as_mut())),
        }
    };
}

/// The index of the largest value, the lowest among ties: the token the MTP module assumes at the last
/// position. [`Model::logits`] picks it the same way.
pub(crate) fn argmax_row(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

impl Model {
    /// An empty KV cache shaped for this model (its context, width, blocks and MTP module).
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.config)
    }

    /// Runs `tokens` as the next positions of the sequence held by `cache` and appends them to it. Writes
    /// the main head's logits of the step's last `rows` positions into `main_out` [R, V] (row i predicts
    /// the token after position len − R + i) and, when `mtp_out` is given and the model has an MTP module,
    /// the MTP head's logits of the same rows into it [R, V] (the last row assumes the main head's argmax
    /// as the next token, as [`Model::logits`] does). Without an MTP module `mtp_out` is left untouched.
    ///
    /// The logits are bit-identical to those of a step over the cache's tokens plus `tokens` from an empty
    /// cache. Bad input (no tokens, more positions than the cache holds, a token outside the vocabulary,
    /// `rows` not in 1..=T', wrong buffer lengths, a cache of another model) is refused before anything
    /// runs, and the cache is left as it was.
    pub fn decode(
        &mut self,
        cache: &mut KvCache,
        tokens: &[u32],
        rows: usize,
        main_out: &mut [f32],
        mtp_out: Option<&mut [f32]>,
    ) -> Result<(), ModelError> {
        self.decode_with(cache, tokens, rows, main_out, mtp_out, None)
    }

    /// [`Model::decode`], with the routed experts this instance does not hold run by `experts` when it is
    /// given: every MoE layer then routes over all the config's experts, runs the held ones itself and hands
    /// the rest, grouped per expert, to the runner in one call per layer (see [`super::experts`]). A
    /// trunk-only instance with a runner that computes the experts exactly gives the logits of the whole
    /// model, bit for bit. Every selected expert must answer: a runner error, or an expert it marks missing,
    /// ends the step with [`crate::KernelError::ExpertUnavailable`] (or whatever it returned) or
    /// [`crate::KernelError::TooFewExperts`], and leaves the cache as it was.
    pub fn decode_with(
        &mut self,
        cache: &mut KvCache,
        tokens: &[u32],
        rows: usize,
        main_out: &mut [f32],
        mtp_out: Option<&mut [f32]>,
        experts: Option<&mut dyn ExpertRunner>,
    ) -> Result<(), ModelError> {
        let outside = experts.map(OutsideExperts::all);
        self.decode_step(cache, tokens, rows, main_out, mtp_out, outside)
    }

    /// [`Model::decode_with`] under the `k_min` rule of `experts` ([`OutsideExperts::k_min`]): an expert the
    /// runner marks missing is dropped for the tokens routed to it, whose gates are renormalized over the
    /// experts they keep, as long as every token keeps `k_min` of its top-k; otherwise the step fails with
    /// [`crate::KernelError::TooFewExperts`] and the cache is left as it was. When every expert answers, the
    /// logits are those of [`Model::decode_with`], bit for bit.
    pub fn decode_remote(
        &mut self,
        cache: &mut KvCache,
        tokens: &[u32],
        rows: usize,
        main_out: &mut [f32],
        mtp_out: Option<&mut [f32]>,
        experts: OutsideExperts<'_>,
    ) -> Result<(), ModelError> {
        self.decode_step(cache, tokens, rows, main_out, mtp_out, Some(experts))
    }

    /// [`Model::decode_with`] and [`Model::decode_remote`]: the checks, then the step on a rayon worker.
    fn decode_step(
        &mut self,
        cache: &mut KvCache,
        tokens: &[u32],
        rows: usize,
        main_out: &mut [f32],
        mtp_out: Option<&mut [f32]>,
        experts: Option<OutsideExperts<'_>>,
    ) -> Result<(), ModelError> {
        let k = tokens.len();
        let v = self.config.vocab_size;
        cache.check_shape(&self.config)?;
        cache.check_room(k)?;
        if rows == 0 || rows > k {
            return Err(CacheError::Rows { rows, tokens: k }.into());
        }
        self.check_tokens(tokens)?;
        check_len("main logits", rows * v, main_out.len())?;
        if let Some(m) = &mtp_out {
            check_len("mtp logits", rows * v, m.len())?;
        }
        let mtp_out = mtp_out.filter(|_| self.layout.mtp.is_some());
        let pos0 = cache.len();
        let end = pos0 + k;
        // The MTP module catches up from the first position whose next token it has not seen.
        let mtp_rows = if mtp_out.is_some() {
            end - cache.mtp_len
        } else {
            0
        };
        self.check_attention_size(k.max(mtp_rows))?;
        self.round_decode_weights()?;
        self.ensure_workspace(1, k.max(mtp_rows));
        // A step is many small parallel ops. Called from outside the rayon pool, each would hand its work
        // to the pool and sleep until it is done (two thread switches per op, which measured as much as
        // the arithmetic); run from inside a worker, small ones run inline. Where it runs does not change
        // any result.
        rayon::scope(|_| self.decode_checked(cache, tokens, rows, main_out, mtp_out, experts))
    }

    /// [`Model::decode`] after its checks, on a rayon worker.
    fn decode_checked(
        &mut self,
        cache: &mut KvCache,
        tokens: &[u32],
        rows: usize,
        main_out: &mut [f32],
        mtp_out: Option<&mut [f32]>,
        mut experts: Option<OutsideExperts<'_>>,
    ) -> Result<(), ModelError> {
        let k = tokens.len();
        let (c, v) = (self.config.d_model, self.config.vocab_size);
        let pos0 = cache.len();
        let end = pos0 + k;
        let ws = self
            .ws
            .as_mut()
            .expect("ensure_workspace just created the workspace");
        // The residual stream of the new rows leaves the workspace while the per-block steps (which borrow
        // the model) update it, and goes back whatever they return.
        let mut x = std::mem::take(&mut ws.residual[0]);
        let x_new = &mut x[..k * c];
        embedding::forward(x_new, tokens, self.layout.wte.of(&self.params), c);
        let mut run = || -> Result<(), ModelError> {
            for l in 0..self.config.n_layers {
                self.attention_step(l, cache, x_new)?;
                let remote = experts.as_mut().map(|outside| RemoteExperts {
                    layer: l,
                    runner: &mut *outside.runner,
                    k_min: outside.k_min,
                });
                self.ffn_step(l, x_new, remote)?;
            }
            cache.hidden[pos0 * c..end * c].copy_from_slice(x_new);
            cache.push_tokens(tokens);
            self.head_step(&x_new[(k - rows) * c..], rows, main_out)
        };
        let result = run();
        self.ws
            .as_mut()
            .expect("the workspace outlives a step")
            .residual[0] = x;
        result?;
        if let Some(out) = mtp_out {
            let last = &main_out[(rows - 1) * v..];
            let guess = argmax_row(last);
            self.mtp_step(cache, guess, rows, out)?;
        }
        Ok(())
    }

    /// The attention half of block `layer` for the new rows `x` [T', C] of a step, at positions
    /// `cache.len()..`: writes their keys and values into the cache and replaces `x` with
    /// x + Attn(RMSNorm(x)). [`Model::decode`] runs it, then [`Model::decode_ffn`], for every block; the
    /// cache's length moves only when the whole step is done.
    pub fn decode_attention(
        &mut self,
        layer: usize,
        cache: &mut KvCache,
        x: &mut [f32],
    ) -> Result<(), ModelError> {
        cache.check_shape(&self.config)?;
        let k = self.check_step_rows(layer, x)?;
        cache.check_room(k)?;
        self.check_attention_size(k)?;
        self.round_decode_weights()?;
        self.ensure_workspace(1, k);
        self.attention_step(layer, cache, x)
    }

    /// The FFN half of block `layer` (dense or MoE) for the new rows `x` [T', C] of a step: replaces `x`
    /// with x + FFN(RMSNorm(x)). Each row depends only on itself, so this half needs no cache; it is the
    /// part of a block a networked client could have computed by the holders of the layer's experts.
    pub fn decode_ffn(&mut self, layer: usize, x: &mut [f32]) -> Result<(), ModelError> {
        let k = self.check_step_rows(layer, x)?;
        self.check_attention_size(k)?;
        self.round_decode_weights()?;
        self.ensure_workspace(1, k);
        self.ffn_step(layer, x, None)
    }

    /// At FP8, makes the copy of the parameters whose weights are rounded to FP8 once, as every FP8
    /// product would round them ([`crate::Backend::round_weight_fp8`]), unless it is already there: a
    /// decode step then quantizes only its activations, which is the same arithmetic for a fraction of
    /// the work (one new row against a whole weight). Costs one more copy of the parameters.
    fn round_decode_weights(&mut self) -> Result<(), ModelError> {
        if self.config.linear_precision().forward != Precision::Fp8 || self.decode_params.is_some()
        {
            return Ok(());
        }
        let mut rounded = self.params.clone();
        for (span, rows, cols) in precision_weights(&self.layout, self.config.d_model) {
            self.backend.round_weight_fp8(
                span.of(&self.params),
                rows,
                cols,
                span.of_mut(&mut rounded),
            )?;
        }
        self.decode_params = Some(rounded);
        Ok(())
    }

    /// Checks a per-block step's layer and residual; returns T'.
    fn check_step_rows(&self, layer: usize, x: &[f32]) -> Result<usize, ModelError> {
        let (c, layers) = (self.config.d_model, self.config.n_layers);
        if layer >= layers {
            return Err(CacheError::Layer { layer, layers }.into());
        }
        if x.is_empty() || !x.len().is_multiple_of(c) {
            return Err(CacheError::Residual { len: x.len(), c }.into());
        }
        Ok(x.len() / c)
    }

    /// [`Model::decode_attention`] after its checks (the workspace holds T' rows, the cache has room).
    fn attention_step(
        &mut self,
        layer: usize,
        cache: &mut KvCache,
        x: &mut [f32],
    ) -> Result<(), ModelError> {
        let k = x.len() / self.config.d_model;
        let pos0 = cache.len();
        self.block_step(layer, k, |ctx, acts| {
            let kv = &mut cache.layers[layer];
            block::attention_cached(ctx, x, &mut kv.keys, &mut kv.values, pos0, acts)?;
            x.copy_from_slice(&acts.res_mid[..x.len()]);
            Ok(())
        })
    }

    /// [`Model::decode_ffn`] after its checks, with the absent experts run by `remote` if given.
    fn ffn_step(
        &mut self,
        layer: usize,
        x: &mut [f32],
        remote: Option<RemoteExperts<'_>>,
    ) -> Result<(), ModelError> {
        let k = x.len() / self.config.d_model;
        self.block_step(layer, k, |ctx, acts| {
            let BlockActs {
                res_mid,
                ln2,
                ln2_rstd,
                ffn,
                ..
            } = acts;
            let n = x.len();
            res_mid[..n].copy_from_slice(x);
            block::ffn_forward_with(ctx, remote, &res_mid[..n], x, ln2, ln2_rstd, ffn)?;
            Ok(())
        })
    }

    /// Runs `step` with block `layer`'s context for `k` new positions of one sequence, on the decode view
    /// of the parameters and backend ([`decode_view!`]), and the block's saved activations.
    fn block_step<R>(
        &mut self,
        layer: usize,
        k: usize,
        step: impl FnOnce(&mut BlockContext<'_>, &mut BlockActs) -> Result<R, ModelError>,
    ) -> Result<R, ModelError> {
        let dims = self.block_dims();
        let precision = self.config.linear_precision();
        let Model {
            params,
            decode_params,
            layout,
            backend,
            rope,
            ws,
            router_bias,
            experts,
            ..
        } = self;
        let ws = ws.as_mut().expect("callers run ensure_workspace first");
        let (params, mut rows) = decode_view!(params, decode_params, backend, precision);
        let mut ctx = BlockContext {
            backend: &mut rows,
            precision,
            params,
            p: &layout.blocks[layer],
            dims,
            rope,
            present: experts.layer(layer),
            bias: &router_bias[layer],
            b: 1,
            t: k,
        };
        step(&mut ctx, &mut ws.blocks[layer])
    }

    /// The main head on the last hidden states `h` [R, C] of a step, into `out` [R, V].
    fn head_step(&mut self, h: &[f32], rows: usize, out: &mut [f32]) -> Result<(), ModelError> {
        let v = self.config.vocab_size;
        let spec = self.head_spec();
        let precision = self.config.linear_precision();
        let Model {
            params,
            decode_params,
            backend,
            ws,
            ..
        } = self;
        let ws = ws.as_mut().expect("callers run ensure_workspace first");
        let (params, mut view) = decode_view!(params, decode_params, backend, precision);
        head::forward(&mut view, params, spec, h, None, &mut ws.head, rows)?;
        out.copy_from_slice(&ws.head.logits[..rows * v]);
        Ok(())
    }

    /// The MTP module over the positions `cache.mtp_len..len` (the ones whose next token it has not yet
    /// seen, plus the last, whose next token is taken to be `guess`): writes their MTP keys and values,
    /// the MTP logits of the last `rows` positions into `out` [R, V], and marks all but the last position
    /// as cached.
    fn mtp_step(
        &mut self,
        cache: &mut KvCache,
        guess: u32,
        rows: usize,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let (c, v) = (self.config.d_model, self.config.vocab_size);
        let dims = self.block_dims();
        let hspec = self.head_spec();
        let precision = self.config.linear_precision();
        let Model {
            params,
            decode_params,
            layout,
            backend,
            rope,
            ws,
            ..
        } = self;
        let (params, mut view) = decode_view!(params, decode_params, backend, precision);
        let (Some(mp), Some(kv)) = (&layout.mtp, cache.mtp.as_mut()) else {
            return Ok(());
        };
        let ws = ws.as_mut().expect("callers run ensure_workspace first");
        let Some(ma) = ws.mtp.as_mut() else {
            return Ok(());
        };
        let (first, end) = (cache.mtp_len, cache.tokens.len());
        let m = end - first;
        let next = &mut ws.next[..m];
        next[..m - 1].copy_from_slice(&cache.tokens[first + 1..end]);
        next[m - 1] = guess;
        let backend: &mut dyn Backend = &mut view;
        let h = &cache.hidden[first * c..end * c];
        mtp::input_forward(
            backend, precision, params, mp, layout.wte, dims, h, next, ma, m,
        )?;
        let mut ctx = BlockContext {
            backend: &mut *backend,
            precision,
            params,
            p: &mp.block,
            dims,
            rope,
            present: &[],
            bias: &[],
            b: 1,
            t: m,
        };
        block::attention_cached(
            &mut ctx,
            &ma.m0[..m * c],
            &mut kv.keys,
            &mut kv.values,
            first,
            &mut ma.block,
        )?;
        let BlockActs {
            res_mid,
            ln2,
            ln2_rstd,
            ffn,
            ..
        } = &mut ma.block;
        block::ffn_forward(&mut ctx, &res_mid[..m * c], &mut ma.m1, ln2, ln2_rstd, ffn)?;
        let spec = HeadSpec {
            norm: mp.norm_out,
            ..hspec
        };
        let last = &ma.m1[(m - rows) * c..m * c];
        head::forward(backend, params, spec, last, None, &mut ma.head, rows)?;
        out.copy_from_slice(&ma.head.logits[..rows * v]);
        cache.mtp_len = end - 1;
        Ok(())
    }
}
