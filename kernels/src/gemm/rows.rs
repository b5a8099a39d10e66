//! Row-invariant products for inference: c = a·bᵀ (the [`Form::ABt`] of a Linear layer, y = x·Wᵀ) where
//! each output row is computed from its own input row by a fixed sequence of operations, so the bits of a
//! row never depend on how many other rows the call holds or on the thread count.
//!
//! Why it exists: a KV-cached decoder runs one or two new positions per pass, while recomputing the window
//! runs all of them. The `gemm` crate picks its kernel and blocking from the matrix shape (a single row
//! takes a GEMV path; small shapes take other block sizes), so the same row comes out with different
//! rounding depending on M, and greedy decoding with and without the cache could then diverge at a
//! near-tie. Both inference paths use this product instead, and agree bit for bit. Training keeps the
//! `gemm` crate, which is much faster on large batches.
//!
//! Shapes: M rows, K contraction, N outputs. `a` [M, K], `b` [N, K] (row-major `[out, in]`), `c` [M, N].
//! Each output is a dot product over K in 16 interleaved f32 lanes (element k goes to lane k mod 16), the
//! lanes summed in a fixed tree, then the K mod 16 tail added in order. There is no fused multiply-add, so
//! the result is the same at every SIMD level ([`crate::simd`]).
//!
//! FP8 ([`matmul_rows_fp8`]) quantizes `a` in 1×128 tiles along K (a row's scales depend only on that row)
//! and `b` in 128×128 blocks, as [`super::cpu::matmul_fp8`] does, then runs the same f32 product.

use rayon::prelude::*;

use super::cpu::Fp8Workspace;
use super::{Dims, Form, check_operands};
use crate::error::KernelError;
use crate::quant::{ScaleMode, quantize_dequantize};
use crate::simd::multiversion;

/// Lanes of the interleaved dot product.
const LANES: usize = 16;
/// Output columns of one rayon task (a task is one row and this many columns).
const COLS_PER_TASK: usize = 64;

/// One dot product in the fixed order described in the module doc.
#[inline(always)]
fn dot(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (cx, cw) = (x.chunks_exact(LANES), w.chunks_exact(LANES));
    let (rx, rw) = (cx.remainder(), cw.remainder());
    for (xs, ws) in cx.zip(cw) {
        for l in 0..LANES {
            acc[l] += xs[l] * ws[l];
        }
    }
    let mut s = reduce(&acc);
    for (&xv, &wv) in rx.iter().zip(rw) {
        s += xv * wv;
    }
    s
}

/// Four dot products of `x` with `w0..w3`, each in exactly the order of [`dot`]; sharing the loads of `x`
/// and running four independent chains is what makes it fast.
#[inline(always)]
fn dot4(x: &[f32], w: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0.0f32; LANES]; 4];
    let k = x.len() - x.len() % LANES;
    let mut i = 0;
    while i < k {
        let xs = &x[i..i + LANES];
        for (a, wj) in acc.iter_mut().zip(&w) {
            let ws = &wj[i..i + LANES];
            for l in 0..LANES {
                a[l] += xs[l] * ws[l];
            }
        }
        i += LANES;
    }
    let mut out = [0.0f32; 4];
    for ((o, a), wj) in out.iter_mut().zip(&acc).zip(&w) {
        let mut s = reduce(a);
        for (&xv, &wv) in x[k..].iter().zip(&wj[k..]) {
            s += xv * wv;
        }
        *o = s;
    }
    out
}

/// Sum of the 16 lanes in a fixed tree.
#[inline(always)]
fn reduce(a: &[f32; LANES]) -> f32 {
    let mut h = [0.0f32; 8];
    for l in 0..8 {
        h[l] = a[l] + a[l + 8];
    }
    ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]))
}

/// `out[j] = x·w_j` for the rows `w_j` of `w` [out.len(), K].
#[inline(always)]
fn row_block_kernel(x: &[f32], w: &[f32], out: &mut [f32]) {
    let k = x.len();
    let mut quads = out.chunks_exact_mut(4);
    let mut wq = w.chunks_exact(4 * k);
    for (o, ws) in (&mut quads).zip(&mut wq) {
        let r = dot4(
            x,
            [&ws[..k], &ws[k..2 * k], &ws[2 * k..3 * k], &ws[3 * k..]],
        );
        o.copy_from_slice(&r);
    }
    for (o, wj) in quads
        .into_remainder()
        .iter_mut()
        .zip(wq.remainder().chunks_exact(k))
    {
        *o = dot(x, wj);
    }
}

multiversion! {
    /// [`row_block_kernel`] compiled for the running CPU's SIMD level.
    fn row_block<>(x: &[f32], w: &[f32], out: &mut [f32]) -> () = row_block_kernel;
}

/// c = a·bᵀ in f32, row-invariant (see the module doc). The caller has checked the lengths.
fn rows_f32_checked(a: &[f32], b: &[f32], c: &mut [f32], dims: Dims) {
    let Dims { m, k, n } = dims;
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    c.par_chunks_mut(n)
        .zip(a.par_chunks(k))
        .for_each(|(crow, x)| {
            crow.par_chunks_mut(COLS_PER_TASK)
                .enumerate()
                .for_each(|(blk, out)| {
                    let j0 = blk * COLS_PER_TASK;
                    row_block(x, &b[j0 * k..(j0 + out.len()) * k], out);
                });
        });
}

/// c = a·bᵀ in f32 (`a` [M, K], `b` [N, K], `c` [M, N], overwritten); each row of `c` depends only on the
/// same row of `a` and on `b`. Runs on the current rayon pool.
pub fn matmul_rows_f32(a: &[f32], b: &[f32], c: &mut [f32], dims: Dims) -> Result<(), KernelError> {
    check_operands(
        "matmul_rows_f32",
        Form::ABt,
        dims,
        a.len(),
        b.len(),
        c.len(),
    )?;
    rows_f32_checked(a, b, c, dims);
    Ok(())
}

/// FP8 c = a·bᵀ: `a` quantized in 1×128 tiles, `b` (a weight) in 128×128 blocks, into `ws`, then the
/// row-invariant f32 product. A NaN or infinity in either operand is a [`KernelError::NonFinite`]; `c` is
/// then untouched.
pub fn matmul_rows_fp8(
    ws: &mut Fp8Workspace,
    mode: ScaleMode,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    dims: Dims,
) -> Result<(), KernelError> {
    check_operands(
        "matmul_rows_fp8",
        Form::ABt,
        dims,
        a.len(),
        b.len(),
        c.len(),
    )?;
    let form = Form::ABt;
    let (ar, ac) = form.a_shape(dims);
    let (br, bc) = form.b_shape(dims);
    let a_scales = form.a_granularity().scale_count(ar, ac);
    let b_scales = form.b_granularity().scale_count(br, bc);
    let (qa, sa, qb, sb) = ws.buffers(a.len(), a_scales, b.len(), b_scales);
    let (ra, rb) = rayon::join(
        || quantize_dequantize(a, ar, ac, form.a_granularity(), mode, qa, sa),
        || quantize_dequantize(b, br, bc, form.b_granularity(), mode, qb, sb),
    );
    ra?;
    rb?;
    let (qa, qb) = ws.operands(a.len(), b.len());
    rows_f32_checked(qa, qb, c, dims);
    Ok(())
}

/// FP8 c = a·bᵀ where `b` already holds a weight rounded to FP8 (dequantized values, as
/// [`quantize_dequantize`] in 128×128 blocks leaves them): only `a` is quantized, in 1×128 tiles. Bit-identical
/// to [`matmul_rows_fp8`] on the weight `b` was rounded from with the same scale mode; inference rounds
/// each weight once instead of at every product.
pub fn matmul_rows_fp8_rounded_b(
    ws: &mut Fp8Workspace,
    mode: ScaleMode,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    dims: Dims,
) -> Result<(), KernelError> {
    check_operands(
        "matmul_rows_fp8_rounded_b",
        Form::ABt,
        dims,
        a.len(),
        b.len(),
        c.len(),
    )?;
    let form = Form::ABt;
    let (ar, ac) = form.a_shape(dims);
    let a_scales = form.a_granularity().scale_count(ar, ac);
    let (qa, sa, _, _) = ws.buffers(a.len(), a_scales, 0, 0);
    quantize_dequantize(a, ar, ac, form.a_granularity(), mode, qa, sa)?;
    let (qa, _) = ws.operands(a.len(), 0);
    rows_f32_checked(qa, b, c, dims);
    Ok(())
}
