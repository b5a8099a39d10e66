//! One transformer block: x → x + Attn(RMSNorm(x)) → · + FFN(RMSNorm(·)), FFN dense or MoE.
//!
//! Shapes: B sequences, T positions, N = B·T, C width, NH heads.
//! - `x`, `out`, `dres`: [N, C]
//! - saved: `ln1`, `atty`, `res_mid`, `ln2` [N, C]; `ln1_rstd`, `ln2_rstd` [N]; `qkv` [N, 3C] (rotated);
//!   `att` [N, NH, T]; the FFN's own activations
//!
//! The backward runs the forward's steps in exact reverse order. It takes the gradient of the block's
//! output in `dres` and leaves the gradient of its input there (the residual connection makes that an
//! in-place accumulation).

use crate::backend::Backend;
use crate::error::KernelError;
use crate::gemm::LinearPrecision;

use super::moe::{self, MoeActs, MoeContext, MoeDims, MoeScratch};
use super::params::{BlockParams, FfnParams};
use super::rope::RopeTable;
use super::{attention, linear, rmsnorm, rope};

/// Activations of one FFN. (The MoE variant is larger, but there are only L of these, allocated once.)
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum FfnActs {
    /// Dense SwiGLU: `h13` [N, 2H], `act` [N, H].
    Dense {
        /// Gate/up pre-activations.
        h13: Vec<f32>,
        /// SwiGLU output.
        act: Vec<f32>,
    },
    /// DeepSeekMoE.
    Moe(MoeActs),
}

/// Activations one block saves for its backward.
#[derive(Clone, Debug)]
pub struct BlockActs {
    /// [N, C] RMSNorm output before attention.
    pub ln1: Vec<f32>,
    /// [N].
    pub ln1_rstd: Vec<f32>,
    /// [N, 3C] q, k (rotated), v.
    pub qkv: Vec<f32>,
    /// [N, NH, T] attention probabilities.
    pub att: Vec<f32>,
    /// [N, C] attention output before the projection.
    pub atty: Vec<f32>,
    /// [N, C] residual stream after attention.
    pub res_mid: Vec<f32>,
    /// [N, C] RMSNorm output before the FFN.
    pub ln2: Vec<f32>,
    /// [N].
    pub ln2_rstd: Vec<f32>,
    /// The FFN's activations.
    pub ffn: FfnActs,
}

/// Sizes a block needs.
#[derive(Clone, Copy, Debug)]
pub struct BlockDims {
    /// C.
    pub c: usize,
    /// NH.
    pub nh: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// MoE sizes (unused by dense blocks).
    pub moe: MoeDims,
    /// Weight of the balance loss.
    pub alpha: f32,
}

impl BlockActs {
    /// Buffers for up to `n` tokens, `b` sequences and `t_max` positions per sequence.
    pub fn new(p: &BlockParams, d: BlockDims, n: usize, b: usize, t_max: usize) -> Self {
        let c = d.c;
        let ffn = match &p.ffn {
            FfnParams::Dense(sw) => FfnActs::Dense {
                h13: vec![0.0; n * 2 * sw.hidden],
                act: vec![0.0; n * sw.hidden],
            },
            FfnParams::Moe(_) => FfnActs::Moe(MoeActs::new(d.moe, n, b)),
        };
        Self {
            ln1: vec![0.0; n * c],
            ln1_rstd: vec![0.0; n],
            qkv: vec![0.0; n * 3 * c],
            att: vec![0.0; n * d.nh * t_max],
            atty: vec![0.0; n * c],
            res_mid: vec![0.0; n * c],
            ln2: vec![0.0; n * c],
            ln2_rstd: vec![0.0; n],
            ffn,
        }
    }
}

/// Gradient scratch shared by every block's backward (sized for the largest block).
#[derive(Clone, Debug)]
pub struct BlockScratch {
    /// [N, C] gradient of a norm's output.
    pub dln: Vec<f32>,
    /// [N, C] gradient of the attention output.
    pub datty: Vec<f32>,
    /// [N, 3C].
    pub dqkv: Vec<f32>,
    /// [N] attention-weight gradient rows.
    pub datt: Vec<f32>,
    /// [max(N, R), H_max] SwiGLU output gradient.
    pub dact: Vec<f32>,
    /// [max(N, R), 2·H_max] SwiGLU input gradient.
    pub dh13: Vec<f32>,
    /// MoE routing scratch.
    pub moe: MoeScratch,
}

impl BlockScratch {
    /// Buffers for up to `n` tokens; `h_max` is the widest FFN hidden size of any block.
    pub fn new(d: BlockDims, n: usize, h_max: usize) -> Self {
        let rows = n * d.moe.k.max(1);
        Self {
            dln: vec![0.0; n * d.c],
            datty: vec![0.0; n * d.c],
            dqkv: vec![0.0; n * 3 * d.c],
            datt: vec![0.0; n],
            dact: vec![0.0; rows * h_max],
            dh13: vec![0.0; rows * 2 * h_max],
            moe: MoeScratch::new(d.moe, n),
        }
    }
}

/// Everything a block reads besides its input, output and activations.
pub struct BlockContext<'a> {
    /// The GEMM provider.
    pub backend: &'a mut dyn Backend,
    /// Precision of each Linear GEMM kind (forward, data gradient, weight gradient).
    pub precision: LinearPrecision,
    /// The flat parameter buffer.
    pub params: &'a [f32],
    /// This block's parameters.
    pub p: &'a BlockParams,
    /// Sizes.
    pub dims: BlockDims,
    /// The RoPE table.
    pub rope: &'a RopeTable,
    /// Present routed experts of this block (empty for dense).
    pub present: &'a [bool],
    /// Router bias of this block (empty for dense).
    pub bias: &'a [f32],
    /// B.
    pub b: usize,
    /// T.
    pub t: usize,
}

/// Runs the block on `x`, writing `out` and the saved activations. Returns the block's balance loss
/// (zero for dense blocks).
pub fn forward(
    mut ctx: BlockContext<'_>,
    x: &[f32],
    out: &mut [f32],
    acts: &mut BlockActs,
) -> Result<f64, KernelError> {
    let (d, t) = (ctx.dims, ctx.t);
    let n = ctx.b * t;
    let c = d.c;
    qkv_forward(&mut ctx, x, acts, n)?;
    let qkv = &mut acts.qkv[..n * 3 * c];
    rope::forward(qkv, ctx.rope, t, c, d.nh);
    attention::forward(
        &mut acts.atty[..n * c],
        &mut acts.att[..n * d.nh * t],
        qkv,
        t,
        c,
        d.nh,
    );
    attention_out(&mut ctx, x, acts, n)?;
    let BlockActs {
        res_mid,
        ln2,
        ln2_rstd,
        ffn,
        ..
    } = acts;
    ffn_forward(&mut ctx, &res_mid[..n * c], out, ln2, ln2_rstd, ffn)
}

/// The FFN half of a block: out = FFN(RMSNorm(res_mid)) + res_mid over the context's B·T rows, saving `ln2`,
/// `ln2_rstd` and the FFN's activations. Returns the balance loss (zero for dense blocks). The training
/// forward and the cached decode step share it; it is also the unit a client that keeps the trunk could
/// hand to the holders of a MoE layer's experts.
pub fn ffn_forward(
    ctx: &mut BlockContext<'_>,
    res_mid: &[f32],
    out: &mut [f32],
    ln2: &mut [f32],
    ln2_rstd: &mut [f32],
    ffn: &mut FfnActs,
) -> Result<f64, KernelError> {
    ffn_forward_with(ctx, None, res_mid, out, ln2, ln2_rstd, ffn)
}

/// [`ffn_forward`], with a MoE layer's absent experts run by `remote` (see [`moe::RemoteExperts`]); a
/// dense block ignores it.
pub fn ffn_forward_with(
    ctx: &mut BlockContext<'_>,
    remote: Option<moe::RemoteExperts<'_>>,
    res_mid: &[f32],
    out: &mut [f32],
    ln2: &mut [f32],
    ln2_rstd: &mut [f32],
    ffn: &mut FfnActs,
) -> Result<f64, KernelError> {
    let (d, b, t, precision, params, p) =
        (ctx.dims, ctx.b, ctx.t, ctx.precision, ctx.params, ctx.p);
    let n = b * t;
    let c = d.c;
    let (ln2, ln2_rstd) = (&mut ln2[..n * c], &mut ln2_rstd[..n]);
    rmsnorm::forward(ln2, ln2_rstd, res_mid, p.ln2.of(params), c, d.eps);
    let out = &mut out[..n * c];
    let balance = match (&p.ffn, ffn) {
        (FfnParams::Dense(sw), FfnActs::Dense { h13, act }) => {
            let h = sw.hidden;
            moe::swiglu_ffn_forward(
                ctx.backend,
                precision,
                params,
                sw,
                ln2,
                &mut h13[..n * 2 * h],
                &mut act[..n * h],
                out,
                n,
                c,
            )?;
            0.0
        }
        (FfnParams::Moe(mp), FfnActs::Moe(ma)) => {
            let mctx = MoeContext {
                backend: &mut *ctx.backend,
                precision,
                params,
                p: mp,
                present: ctx.present,
                dims: d.moe,
                b,
                t,
                alpha: d.alpha,
            };
            moe::forward_with(mctx, remote, ctx.bias, ln2, out, ma)?
        }
        _ => unreachable!("block activations are built from the same params as the block"),
    };
    for (o, &r) in out.iter_mut().zip(res_mid.iter()) {
        *o += r;
    }
    Ok(balance)
}

/// The attention half of a block for a KV-cached decode step over T' = `ctx.t` new rows of one sequence
/// (`ctx.b` = 1) at positions `pos0..pos0 + T'`: writes their rotated keys and values into rows `pos0..` of
/// `keys` and `values` [P, C], attends over rows `0..pos0 + T'`, and leaves x + Attn(RMSNorm(x)) in
/// `acts.res_mid` (the input of [`ffn_forward`]). The same operations as [`forward`], in the same order,
/// so each row matches the full-window forward bit for bit when the backend's products are row-invariant.
/// The caller keeps `pos0 + T'` within P and the RoPE table.
pub fn attention_cached(
    ctx: &mut BlockContext<'_>,
    x: &[f32],
    keys: &mut [f32],
    values: &mut [f32],
    pos0: usize,
    acts: &mut BlockActs,
) -> Result<(), KernelError> {
    let d = ctx.dims;
    let n = ctx.t;
    let c = d.c;
    qkv_forward(ctx, x, acts, n)?;
    let qkv = &mut acts.qkv[..n * 3 * c];
    rope::forward_at(qkv, ctx.rope, pos0, c, d.nh);
    for (i, row) in qkv.chunks_exact(3 * c).enumerate() {
        let pos = pos0 + i;
        keys[pos * c..(pos + 1) * c].copy_from_slice(&row[c..2 * c]);
        values[pos * c..(pos + 1) * c].copy_from_slice(&row[2 * c..]);
    }
    let end = pos0 + n;
    attention::forward_cached(
        &mut acts.atty[..n * c],
        &mut acts.att,
        qkv,
        &keys[..end * c],
        &values[..end * c],
        pos0,
        c,
        d.nh,
    );
    attention_out(ctx, x, acts, n)
}

/// The attention half's input, shared by [`forward`] and [`attention_cached`]: RMSNorm of `x` [N, C] into
/// `acts.ln1` and its Q, K, V projection into `acts.qkv` [N, 3C].
fn qkv_forward(
    ctx: &mut BlockContext<'_>,
    x: &[f32],
    acts: &mut BlockActs,
    n: usize,
) -> Result<(), KernelError> {
    let (d, params, p) = (ctx.dims, ctx.params, ctx.p);
    let c = d.c;
    let (ln1, ln1_rstd) = (&mut acts.ln1[..n * c], &mut acts.ln1_rstd[..n]);
    rmsnorm::forward(ln1, ln1_rstd, x, p.ln1.of(params), c, d.eps);
    linear::forward(
        ctx.backend,
        ctx.precision,
        &mut acts.qkv[..n * 3 * c],
        ln1,
        p.wqkv.of(params),
        n,
        c,
        3 * c,
    )
}

/// The attention half's output, shared by [`forward`] and [`attention_cached`]: the projection of
/// `acts.atty` [N, C] plus the residual `x`, into `acts.res_mid`.
fn attention_out(
    ctx: &mut BlockContext<'_>,
    x: &[f32],
    acts: &mut BlockActs,
    n: usize,
) -> Result<(), KernelError> {
    let c = ctx.dims.c;
    let res_mid = &mut acts.res_mid[..n * c];
    linear::forward(
        ctx.backend,
        ctx.precision,
        res_mid,
        &acts.atty[..n * c],
        ctx.p.wo.of(ctx.params),
        n,
        c,
        c,
    )?;
    for (r, &xv) in res_mid.iter_mut().zip(x) {
        *r += xv;
    }
    Ok(())
}

/// Backward of [`forward`]: on entry `dres` [N, C] holds d(out); on exit it holds d(x). Parameter
/// gradients accumulate into `grads`.
pub fn backward(
    ctx: BlockContext<'_>,
    grads: &mut [f32],
    x: &[f32],
    dres: &mut [f32],
    acts: &BlockActs,
    sc: &mut BlockScratch,
) -> Result<(), KernelError> {
    let BlockContext {
        backend,
        precision,
        params,
        p,
        dims: d,
        rope: table,
        present,
        bias: _,
        b,
        t,
    } = ctx;
    let n = b * t;
    let c = d.c;
    let dres = &mut dres[..n * c];
    let dln = &mut sc.dln[..n * c];
    let ln2 = &acts.ln2[..n * c];
    match (&p.ffn, &acts.ffn) {
        (FfnParams::Dense(sw), FfnActs::Dense { h13, act }) => {
            let h = sw.hidden;
            moe::swiglu_ffn_backward(
                backend,
                precision,
                params,
                grads,
                sw,
                ln2,
                &h13[..n * 2 * h],
                &act[..n * h],
                dres,
                dln,
                false,
                &mut sc.dact[..n * h],
                &mut sc.dh13[..n * 2 * h],
                n,
                c,
            )?;
        }
        (FfnParams::Moe(mp), FfnActs::Moe(ma)) => {
            let ctx = MoeContext {
                backend,
                precision,
                params,
                p: mp,
                present,
                dims: d.moe,
                b,
                t,
                alpha: d.alpha,
            };
            moe::backward(
                ctx,
                grads,
                ln2,
                dres,
                dln,
                ma,
                &mut sc.moe,
                &mut sc.dact,
                &mut sc.dh13,
            )?;
        }
        _ => unreachable!("block activations are built from the same params as the block"),
    }
    let res_mid = &acts.res_mid[..n * c];
    rmsnorm::backward(
        dres,
        p.ln2.of_mut(grads),
        dln,
        res_mid,
        p.ln2.of(params),
        &acts.ln2_rstd[..n],
        c,
    );
    let datty = &mut sc.datty[..n * c];
    linear::backward(
        backend,
        precision,
        datty,
        false,
        p.wo.of_mut(grads),
        dres,
        &acts.atty[..n * c],
        p.wo.of(params),
        n,
        c,
        c,
    )?;
    let dqkv = &mut sc.dqkv[..n * 3 * c];
    let qkv = &acts.qkv[..n * 3 * c];
    attention::backward(
        dqkv,
        &mut sc.datt,
        datty,
        &acts.att[..n * d.nh * t],
        qkv,
        t,
        c,
        d.nh,
    );
    rope::backward(dqkv, table, t, c, d.nh);
    let ln1 = &acts.ln1[..n * c];
    linear::backward(
        backend,
        precision,
        dln,
        false,
        p.wqkv.of_mut(grads),
        dqkv,
        ln1,
        p.wqkv.of(params),
        n,
        c,
        3 * c,
    )?;
    rmsnorm::backward(
        dres,
        p.ln1.of_mut(grads),
        dln,
        x,
        p.ln1.of(params),
        &acts.ln1_rstd[..n],
        c,
    );
    Ok(())
}
