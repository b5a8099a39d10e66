//! Linear layer without bias, y = x·Wᵀ, on the [`Backend`]'s GEMM (FP8 or f32).
//!
//! Shapes: N rows, IC inputs, OC outputs. `x`, `dx` are [N, IC]; `w`, `dw` are [OC, IC] (row-major
//! `[out, in]`); `out`, `dout` are [N, OC]. FP8 quantization (1×128 activation tiles, 128×128 weight
//! blocks) happens inside the backend's matmul.

use crate::backend::Backend;
use crate::error::KernelError;
use crate::gemm::{Dims, Form, LinearPrecision};

/// out = x·Wᵀ, in `precision.forward` (a plain [`crate::gemm::Precision`] means all kinds alike). Overwrites `out`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    backend: &mut dyn Backend,
    precision: impl Into<LinearPrecision>,
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
    let precision = precision.into();
    backend.matmul(
        precision.forward,
        Form::ABt,
        x,
        w,
        out,
        Dims { m: n, k: ic, n: oc },
        false,
    )
}

/// dW += doutᵀ·x (ACCUMULATES, llm.c style) in `precision.wgrad` and dx = dout·W in `precision.dgrad`,
/// overwriting `dx` unless `accumulate_dx`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    backend: &mut dyn Backend,
    precision: impl Into<LinearPrecision>,
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
    let precision = precision.into();
    backend.matmul(
        precision.wgrad,
        Form::AtB,
        dout,
        x,
        dw,
        Dims { m: oc, k: n, n: ic },
        true,
    )?;
    backend.matmul(
        precision.dgrad,
        Form::AB,
        dout,
        w,
        dx,
        Dims { m: n, k: oc, n: ic },
        accumulate_dx,
    )
}
