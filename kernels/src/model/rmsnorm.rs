//! RMSNorm: y = x / rms(x) · w, forward and backward.
//!
//! Shapes: N rows of width C. `x`, `out`, `dout`, `dx` are [N, C]; `w`, `dw` are [C]; `rstd` is [N] (saved
//! by the forward for the backward: 1 / sqrt(mean(x²) + eps)).

use rayon::prelude::*;

/// out = x · rstd · w, row by row. Overwrites `out` and `rstd`.
pub fn forward(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], c: usize, eps: f32) {
    out.par_chunks_exact_mut(c)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks_exact(c))
        .for_each(|((o, r), xr)| {
            let ms: f32 = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
            let s = 1.0 / (ms + eps).sqrt();
            *r = s;
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                *o = xv * s * wv;
            }
        });
}

/// With x̂ = x · rstd: dw += Σ_n dout ⊙ x̂ and dx += rstd · (dout⊙w − x̂ · mean(dout⊙w⊙x̂)).
/// Both `dx` and `dw` ACCUMULATE: the input is usually the residual stream, whose gradient has several
/// contributions.
pub fn backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    c: usize,
) {
    dx.par_chunks_exact_mut(c)
        .zip(dout.par_chunks_exact(c))
        .zip(x.par_chunks_exact(c))
        .zip(rstd.par_iter())
        .for_each(|(((dxr, dor), xr), &s)| {
            let mut dot = 0.0f32;
            for ((&d, &xv), &wv) in dor.iter().zip(xr).zip(w) {
                dot += d * wv * xv * s;
            }
            let mean = dot / c as f32;
            for (((dxv, &d), &xv), &wv) in dxr.iter_mut().zip(dor).zip(xr).zip(w) {
                *dxv += s * (d * wv - xv * s * mean);
            }
        });
    for ((dor, xr), &s) in dout.chunks_exact(c).zip(x.chunks_exact(c)).zip(rstd) {
        for ((dwv, &d), &xv) in dw.iter_mut().zip(dor).zip(xr) {
            *dwv += d * xv * s;
        }
    }
}
