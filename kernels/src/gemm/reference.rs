//! Slow, obvious GEMMs kept as oracles (llm.c's `matmul_forward_naive`): the fast CPU path and, later, the
//! CUDA path are tested against them. Triple loops, no tricks; do not use them for real work.

use super::{Dims, Form, check_operands};
use crate::error::KernelError;
use crate::quant::{Granularity, QuantizedTensor, ScaleMode, TILE};

/// op(A)[i][p] as a flat index into the stored A.
fn a_index(form: Form, d: Dims, i: usize, p: usize) -> usize {
    match form {
        Form::AB | Form::ABt => i * d.k + p,
        Form::AtB => p * d.m + i,
    }
}

/// op(B)[p][j] as a flat index into the stored B.
fn b_index(form: Form, d: Dims, p: usize, j: usize) -> usize {
    match form {
        Form::AB | Form::AtB => p * d.n + j,
        Form::ABt => j * d.k + p,
    }
}

/// (row, col) in the stored A of op(A)[i][p].
fn a_pos(form: Form, i: usize, p: usize) -> (usize, usize) {
    match form {
        Form::AB | Form::ABt => (i, p),
        Form::AtB => (p, i),
    }
}

/// (row, col) in the stored B of op(B)[p][j].
fn b_pos(form: Form, p: usize, j: usize) -> (usize, usize) {
    match form {
        Form::AB | Form::AtB => (p, j),
        Form::ABt => (j, p),
    }
}

/// The scale that applies to stored element (r, c) of `q`.
fn scale_at(q: &QuantizedTensor, r: usize, c: usize) -> f32 {
    let Some(g) = q.granularity() else { return 0.0 };
    let (_, sc) = g.scale_shape(q.rows(), q.cols());
    let idx = match g {
        Granularity::Tile1x128 => r * sc + c / TILE,
        Granularity::Tile128x1 => (r / TILE) * sc + c,
        Granularity::Block128x128 => (r / TILE) * sc + c / TILE,
    };
    q.scales()[idx]
}

/// C = op(A)·op(B) in f64 from the unquantized f32 inputs: the "true" product the FP8 error is measured
/// against.
pub fn matmul_f64(form: Form, a: &[f32], b: &[f32], dims: Dims) -> Result<Vec<f64>, KernelError> {
    check_operands(
        "reference::matmul_f64",
        form,
        dims,
        a.len(),
        b.len(),
        dims.m.saturating_mul(dims.n),
    )?;
    let mut c = vec![0.0f64; dims.m * dims.n];
    for i in 0..dims.m {
        for j in 0..dims.n {
            let mut acc = 0.0f64;
            for p in 0..dims.k {
                acc += a[a_index(form, dims, i, p)] as f64 * b[b_index(form, dims, p, j)] as f64;
            }
            c[i * dims.n + j] = acc;
        }
    }
    Ok(c)
}

/// DeepSeek-V3's FP8 GEMM written out literally: quantize A and B along K (granularities as in
/// [`Form::a_granularity`] / [`Form::b_granularity`]); for each 128-group g of K form the partial sum of
/// E4M3 code products in f32, then add `sa·sb·partial` into an f32 accumulator.
pub fn matmul_fp8_grouped(
    form: Form,
    a: &[f32],
    b: &[f32],
    dims: Dims,
    mode: ScaleMode,
) -> Result<Vec<f32>, KernelError> {
    check_operands(
        "reference::matmul_fp8_grouped",
        form,
        dims,
        a.len(),
        b.len(),
        dims.m.saturating_mul(dims.n),
    )?;
    let (ar, ac) = form.a_shape(dims);
    let (br, bc) = form.b_shape(dims);
    let qa = QuantizedTensor::quantize(a, ar, ac, form.a_granularity(), mode)?;
    let qb = QuantizedTensor::quantize(b, br, bc, form.b_granularity(), mode)?;
    let mut c = vec![0.0f32; dims.m * dims.n];
    for i in 0..dims.m {
        for j in 0..dims.n {
            let mut acc = 0.0f32;
            for g0 in (0..dims.k).step_by(TILE) {
                let mut partial = 0.0f32;
                for p in g0..(g0 + TILE).min(dims.k) {
                    partial += qa.codes()[a_index(form, dims, i, p)].to_f32()
                        * qb.codes()[b_index(form, dims, p, j)].to_f32();
                }
                let (ra, ca) = a_pos(form, i, g0);
                let (rb, cb) = b_pos(form, g0, j);
                acc += scale_at(&qa, ra, ca) * scale_at(&qb, rb, cb) * partial;
            }
            c[i * dims.n + j] = acc;
        }
    }
    Ok(c)
}
