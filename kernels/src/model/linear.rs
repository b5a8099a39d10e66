//! Linear layer without bias, y = x·Wᵀ, on the [`Backend`]'s GEMM (FP8 or f32).
//!
//! Shapes: N rows, IC inputs, OC outputs. `x`, `dx` are [N, IC]; `w`, `dw` are [OC, IC] (row-major
//! `[out, in]`); `out`, `dout` are [N, OC]. FP8 quantization (1×128 activation tiles, 128×128 weight
//! blocks) happens inside the backend's matmul.

use crate::backend::Backend;
use crate::error::KernelError;
use crate::gemm::{Dims, Form, Precision};

/// out = x·Wᵀ. Overwrites `out`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    backend: &mut dyn Backend,
    precision: Precision,
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    ic: usize,
    oc: usize,
) -> Result<(), KernelError> {
    if n == 0 {
        return Ok(());
    }
    backend.matmul(
        precision,
        Form::ABt,
        x,
        w,
        out,
        Dims { m: n, k: ic, n: oc },
        false,
    )
}

/// dW += doutᵀ·x (ACCUMULATES, llm.c style) and dx = dout·W, overwriting `dx` unless `accumulate_dx`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    backend: &mut dyn Backend,
    precision: Precision,
    dx: &mut [f32],
    accumulate_dx: bool,
    dw: &mut [f32],
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    ic: usize,
    oc: usize,
) -> Result<(), KernelError> {
    if n == 0 {
        return Ok(());
    }
    backend.matmul(
        precision,
        Form::AtB,
        dout,
        x,
        dw,
        Dims { m: oc, k: n, n: ic },
        true,
    )?;
    backend.matmul(
        precision,
        Form::AB,
        dout,
        w,
        dx,
        Dims { m: n, k: oc, n: ic },
        accumulate_dx,
    )
}
