//! Multi-token prediction at depth 1: position t, knowing the main model's last hidden state h_t and the
//! next token's embedding, predicts token t + 2 through
//! [RMSNorm(h_t); RMSNorm(Emb(tok_{t+1}))] → projection (2C → C) → one dense block → shared head.
//!
//! Shapes: N = B·T tokens, C width. `h`, `emb`, `hn`, `en`, `m0`, `m1` [N, C]; `cat` [N, 2C]; `next`
//! (token t + 1 at each position) and `targets` (token t + 2, or [`IGNORE`](super::loss::IGNORE)) [N].

use crate::backend::Backend;
use crate::error::KernelError;
use crate::gemm::LinearPrecision;

use super::block::{self, BlockActs, BlockContext, BlockDims, BlockScratch};
use super::head::{self, HeadActs, HeadSpec};
use super::params::{MtpParams, Span};
use super::rope::RopeTable;
use super::{embedding, linear, rmsnorm};

/// Activations of the MTP module.
#[derive(Clone, Debug)]
pub struct MtpActs {
    /// [N, C] embeddings of the next tokens.
    pub emb: Vec<f32>,
    /// [N, C] normalized main hidden state.
    pub hn: Vec<f32>,
    /// [N].
    pub hn_rstd: Vec<f32>,
    /// [N, C] normalized next-token embedding.
    pub en: Vec<f32>,
    /// [N].
    pub en_rstd: Vec<f32>,
    /// [N, 2C] concatenation [hn; en].
    pub cat: Vec<f32>,
    /// [N, C] projection output (block input).
    pub m0: Vec<f32>,
    /// The block's activations.
    pub block: BlockActs,
    /// [N, C] block output.
    pub m1: Vec<f32>,
    /// The head's activations.
    pub head: HeadActs,
}

impl MtpActs {
    /// Buffers for up to `n` tokens in `b` sequences of at most `t_max`.
    pub fn new(p: &MtpParams, d: BlockDims, v: usize, n: usize, b: usize, t_max: usize) -> Self {
        let c = d.c;
        Self {
            emb: vec![0.0; n * c],
            hn: vec![0.0; n * c],
            hn_rstd: vec![0.0; n],
            en: vec![0.0; n * c],
            en_rstd: vec![0.0; n],
            cat: vec![0.0; n * 2 * c],
            m0: vec![0.0; n * c],
            block: BlockActs::new(&p.block, d, n, b, t_max),
            m1: vec![0.0; n * c],
            head: HeadActs::new(n, c, v),
        }
    }
}

/// Gradient scratch of the MTP module.
#[derive(Clone, Debug)]
pub struct MtpScratch {
    /// [N, C] gradient flowing through the MTP residual stream.
    pub dm: Vec<f32>,
    /// [N, 2C] gradient of the concatenation.
    pub dcat: Vec<f32>,
    /// [N, C] gradient of the next-token embeddings.
    pub demb: Vec<f32>,
}

impl MtpScratch {
    /// Buffers for up to `n` tokens.
    pub fn new(n: usize, c: usize) -> Self {
        Self {
            dm: vec![0.0; n * c],
            dcat: vec![0.0; n * 2 * c],
            demb: vec![0.0; n * c],
        }
    }
}

/// Everything the MTP module reads besides its inputs and activations.
pub struct MtpContext<'a> {
    /// The GEMM provider.
    pub backend: &'a mut dyn Backend,
    /// Precision of the projection and the block's GEMMs.
    pub precision: LinearPrecision,
    /// The flat parameter buffer.
    pub params: &'a [f32],
    /// The module's parameters.
    pub p: &'a MtpParams,
    /// The shared embedding [V, C].
    pub wte: Span,
    /// The shared head [V, C] (the norm in it is the module's own).
    pub head: HeadSpec,
    /// Block sizes.
    pub dims: BlockDims,
    /// The RoPE table.
    pub rope: &'a RopeTable,
    /// B.
    pub b: usize,
    /// T.
    pub t: usize,
}

/// Forward of the module on the main model's last hidden state `h`. Leaves logits (or, with targets,
/// probabilities) in `acts.head.logits`; returns (Σ loss, labelled rows).
pub fn forward(
    ctx: MtpContext<'_>,
    h: &[f32],
    next: &[u32],
    targets: Option<&[u32]>,
    acts: &mut MtpActs,
) -> Result<(f64, usize), KernelError> {
    let MtpContext {
        backend,
        precision,
        params,
        p,
        wte,
        head: hs,
        dims: d,
        rope,
        b,
        t,
    } = ctx;
    let n = b * t;
    let c = d.c;
    input_forward(backend, precision, params, p, wte, d, h, next, acts, n)?;
    let bctx = BlockContext {
        backend: &mut *backend,
        precision,
        params,
        p: &p.block,
        dims: d,
        rope,
        present: &[],
        bias: &[],
        b,
        t,
    };
    block::forward(bctx, &acts.m0[..n * c], &mut acts.m1, &mut acts.block)?;
    let spec = HeadSpec {
        norm: p.norm_out,
        ..hs
    };
    head::forward(
        backend,
        params,
        spec,
        &acts.m1[..n * c],
        targets,
        &mut acts.head,
        n,
    )
}

/// The module's input for N rows: m0 = Proj([RMSNorm(h); RMSNorm(Emb(next))]) into `acts.m0` [N, C],
/// saving the norms and the concatenation. Shared by [`forward`] and the KV-cached decode step, which runs
/// it on the new rows only.
#[allow(clippy::too_many_arguments)]
pub(crate) fn input_forward(
    backend: &mut dyn Backend,
    precision: LinearPrecision,
    params: &[f32],
    p: &MtpParams,
    wte: Span,
    d: BlockDims,
    h: &[f32],
    next: &[u32],
    acts: &mut MtpActs,
    n: usize,
) -> Result<(), KernelError> {
    let c = d.c;
    let emb = &mut acts.emb[..n * c];
    embedding::forward(emb, next, wte.of(params), c);
    let hn = &mut acts.hn[..n * c];
    rmsnorm::forward(hn, &mut acts.hn_rstd[..n], h, p.norm_h.of(params), c, d.eps);
    let en = &mut acts.en[..n * c];
    rmsnorm::forward(
        en,
        &mut acts.en_rstd[..n],
        emb,
        p.norm_e.of(params),
        c,
        d.eps,
    );
    let cat = &mut acts.cat[..n * 2 * c];
    for ((row, a), e) in cat
        .chunks_exact_mut(2 * c)
        .zip(hn.chunks_exact(c))
        .zip(en.chunks_exact(c))
    {
        row[..c].copy_from_slice(a);
        row[c..].copy_from_slice(e);
    }
    let m0 = &mut acts.m0[..n * c];
    linear::forward(backend, precision, m0, cat, p.proj.of(params), n, 2 * c, c)
}

/// Backward of [`forward`] from its loss scaled by `scale`: ADDS d(h) into `dh` and accumulates every
/// parameter gradient (including the shared embedding and head).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    ctx: MtpContext<'_>,
    grads: &mut [f32],
    h: &[f32],
    next: &[u32],
    targets: &[u32],
    scale: f32,
    acts: &mut MtpActs,
    dh: &mut [f32],
    sc: &mut MtpScratch,
    bsc: &mut BlockScratch,
) -> Result<(), KernelError> {
    let MtpContext {
        backend,
        precision,
        params,
        p,
        wte,
        head: hs,
        dims: d,
        rope,
        b,
        t,
    } = ctx;
    let n = b * t;
    let c = d.c;
    let dm = &mut sc.dm[..n * c];
    dm.fill(0.0);
    let spec = HeadSpec {
        norm: p.norm_out,
        ..hs
    };
    head::backward(
        backend,
        params,
        grads,
        spec,
        &acts.m1[..n * c],
        targets,
        scale,
        &mut acts.head,
        dm,
        &mut bsc.dln,
        n,
    )?;
    let bctx = BlockContext {
        backend: &mut *backend,
        precision,
        params,
        p: &p.block,
        dims: d,
        rope,
        present: &[],
        bias: &[],
        b,
        t,
    };
    block::backward(bctx, grads, &acts.m0[..n * c], dm, &acts.block, bsc)?;
    let dcat = &mut sc.dcat[..n * 2 * c];
    linear::backward(
        backend,
        precision,
        dcat,
        false,
        p.proj.of_mut(grads),
        dm,
        &acts.cat[..n * 2 * c],
        p.proj.of(params),
        n,
        2 * c,
        c,
    )?;
    let dln = &mut bsc.dln[..n * c];
    for (dst, src) in dln.chunks_exact_mut(c).zip(dcat.chunks_exact(2 * c)) {
        dst.copy_from_slice(&src[..c]);
    }
    rmsnorm::backward(
        &mut dh[..n * c],
        p.norm_h.of_mut(grads),
        dln,
        h,
        p.norm_h.of(params),
        &acts.hn_rstd[..n],
        c,
    );
    for (dst, src) in dln.chunks_exact_mut(c).zip(dcat.chunks_exact(2 * c)) {
        dst.copy_from_slice(&src[c..]);
    }
    let demb = &mut sc.demb[..n * c];
    demb.fill(0.0);
    rmsnorm::backward(
        demb,
        p.norm_e.of_mut(grads),
        dln,
        &acts.emb[..n * c],
        p.norm_e.of(params),
        &acts.en_rstd[..n],
        c,
    );
    embedding::backward(wte.of_mut(grads), demb, next, c);
    Ok(())
}
