//! CPU GEMM: the `gemm` crate's f32 kernels on all cores, and FP8 built on them.
//!
//! How the FP8 path realises DeepSeek's numerics. DeepSeek's kernel computes, for each 128-long group g of
//! K, the partial sum P_g = Σ_{k∈g} qa_k·qb_k of E4M3 code values on the tensor cores, then promotes it to
//! f32 and adds sa_g·sb_g·P_g into an f32 accumulator. Within a group the scales are constant, so
//! sa_g·sb_g·Σ qa_k·qb_k = Σ (qa_k·sa_g)·(qb_k·sb_g): applying each scale to its own codes before the product
//! ("dequantize, then multiply") is the same sum. This path therefore
//! 1. quantizes A and B along K (1×128 / 128×1 tiles, 128×128 blocks for weights) and writes the
//!    dequantized values `code·s` straight into reused f32 workspaces ([`crate::quant::quantize_dequantize`]);
//! 2. runs one f32 GEMM over all of K, accumulating in f32 (the `gemm` crate's FMA microkernels).
//!
//! Differences from the GPU kernel, all in the safe direction: each product `code·s` is rounded to f32
//! (exact with [`ScaleMode::PowerOfTwo`], else ≤ 2^-24 relative — 2^20 times smaller than the E4M3
//! quantization step), and the whole sum is accumulated in f32 instead of ~14-bit partials promoted every
//! 128 elements. [`super::reference::matmul_fp8_grouped`] computes the literal per-group form; tests check
//! the two agree to f32 rounding.

use gemm::Parallelism;

use super::{Dims, Form, check_operands, check_quantized_b};
use crate::error::KernelError;
use crate::quant::{QuantizedTensor, ScaleMode, quantize_dequantize};

/// c = op(a)·op(b), or c += op(a)·op(b) when `accumulate`, in f32 on the current rayon pool.
/// Lengths are checked against `form` and `dims`; a mismatch is a [`KernelError::ShapeMismatch`].
pub fn matmul_f32(
    form: Form,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    dims: Dims,
    accumulate: bool,
) -> Result<(), KernelError> {
    check_operands("matmul_f32", form, dims, a.len(), b.len(), c.len())?;
    gemm_f32_checked(form, a, b, c, dims, accumulate, 0);
    Ok(())
}

/// The f32 GEMM proper. The caller has checked the lengths with [`check_operands`]. `threads == 0` means
/// every thread of the current rayon pool.
pub(crate) fn gemm_f32_checked(
    form: Form,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    dims: Dims,
    accumulate: bool,
    threads: usize,
) {
    let Dims { m, k, n } = dims;
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    // Strides (in elements) of op(A) (M×K) and op(B) (K×N) over the row-major storage.
    let (lhs_rs, lhs_cs) = match form {
        Form::AB | Form::ABt => (k as isize, 1),
        Form::AtB => (1, m as isize),
    };
    let (rhs_rs, rhs_cs) = match form {
        Form::AB | Form::AtB => (n as isize, 1),
        Form::ABt => (1, k as isize),
    };
    let parallelism = Parallelism::Rayon(threads);
    // SAFETY: `check_operands` proved a.len() = m·k, b.len() = k·n and c.len() = m·n, so with the strides
    // above every index the kernel forms — op(A)[i][p] at i·lhs_rs + p·lhs_cs, op(B)[p][j] at
    // p·rhs_rs + j·rhs_cs, C[i][j] at i·n + j — lies inside its slice; `c` is borrowed mutably and so does
    // not alias `a` or `b`. The crate reads `c` only when `read_dst` is true.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            lhs_cs,
            lhs_rs,
            b.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Reused buffers of the FP8 path, so a warm backend allocates nothing per call.
#[derive(Debug, Default)]
pub struct Fp8Workspace {
    a: Vec<f32>,
    b: Vec<f32>,
    a_scales: Vec<f32>,
    b_scales: Vec<f32>,
}

/// Grows `buf` to at least `len` (never shrinks, so later calls reuse it) and returns its first `len`.
fn take(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

impl Fp8Workspace {
    /// The four buffers grown to (A values, A scales, B values, B scales) lengths, for a quantizing product
    /// defined outside this module ([`super::rows`]).
    pub(crate) fn buffers(
        &mut self,
        a: usize,
        a_scales: usize,
        b: usize,
        b_scales: usize,
    ) -> (&mut [f32], &mut [f32], &mut [f32], &mut [f32]) {
        (
            take(&mut self.a, a),
            take(&mut self.a_scales, a_scales),
            take(&mut self.b, b),
            take(&mut self.b_scales, b_scales),
        )
    }

    /// The first `a` and `b` values of the dequantized operands written through [`Fp8Workspace::buffers`].
    pub(crate) fn operands(&self, a: usize, b: usize) -> (&[f32], &[f32]) {
        (&self.a[..a], &self.b[..b])
    }

    /// Bytes currently held by the workspace.
    pub fn bytes(&self) -> usize {
        (self.a.capacity()
            + self.b.capacity()
            + self.a_scales.capacity()
            + self.b_scales.capacity())
            * std::mem::size_of::<f32>()
    }
}

/// FP8 GEMM: quantizes `a` and `b` along K (granularities from [`Form::a_granularity`] and
/// [`Form::b_granularity`]) and multiplies the quantized values with f32 accumulation, as described in the
/// module doc. A NaN or infinity in either operand is a [`KernelError::NonFinite`]; `c` is then untouched.
#[allow(clippy::too_many_arguments)]
pub fn matmul_fp8(
    ws: &mut Fp8Workspace,
    mode: ScaleMode,
    form: Form,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    dims: Dims,
    accumulate: bool,
    threads: usize,
) -> Result<(), KernelError> {
    check_operands("matmul_fp8", form, dims, a.len(), b.len(), c.len())?;
    let (ar, ac) = form.a_shape(dims);
    let (br, bc) = form.b_shape(dims);
    let (ga, gb) = (form.a_granularity(), form.b_granularity());
    let qa = take(&mut ws.a, a.len());
    let sa = take(&mut ws.a_scales, ga.scale_count(ar, ac));
    let qb = take(&mut ws.b, b.len());
    let sb = take(&mut ws.b_scales, gb.scale_count(br, bc));
    // Both operands at once: a small operand (a weight of a few blocks) then does not leave cores idle.
    let (ra, rb) = rayon::join(
        || quantize_dequantize(a, ar, ac, ga, mode, qa, sa),
        || quantize_dequantize(b, br, bc, gb, mode, qb, sb),
    );
    ra?;
    rb?;
    gemm_f32_checked(
        form,
        &ws.a[..a.len()],
        &ws.b[..b.len()],
        c,
        dims,
        accumulate,
        threads,
    );
    Ok(())
}

/// FP8 GEMM whose B is already quantized (a weight held in FP8): quantizes only `a`, dequantizes `b`'s codes
/// with its own scales into the workspace, then multiplies as [`matmul_fp8`] does. Bit-identical to
/// [`matmul_fp8`] on the f32 weight `b` was quantized from (same scale mode).
#[allow(clippy::too_many_arguments)]
pub fn matmul_fp8_quantized_b(
    ws: &mut Fp8Workspace,
    mode: ScaleMode,
    form: Form,
    a: &[f32],
    b: &QuantizedTensor,
    c: &mut [f32],
    dims: Dims,
    accumulate: bool,
    threads: usize,
) -> Result<(), KernelError> {
    check_quantized_b("matmul_fp8_quantized_b", form, dims, a.len(), b, c.len())?;
    let (ar, ac) = form.a_shape(dims);
    let ga = form.a_granularity();
    let qa = take(&mut ws.a, a.len());
    let sa = take(&mut ws.a_scales, ga.scale_count(ar, ac));
    quantize_dequantize(a, ar, ac, ga, mode, qa, sa)?;
    let bn = b.codes().len();
    b.dequantize_into(take(&mut ws.b, bn))?;
    gemm_f32_checked(
        form,
        &ws.a[..a.len()],
        &ws.b[..bn],
        c,
        dims,
        accumulate,
        threads,
    );
    Ok(())
}
