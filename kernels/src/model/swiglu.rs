//! SwiGLU activation: out = silu(gate) ⊙ up, with gate and up side by side in one buffer.
//!
//! Shapes: N rows, H hidden. `h13` and `dh13` are [N, 2H] (gate in the first H columns, up in the last H);
//! `out` and `dout` are [N, H].

use rayon::prelude::*;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// out = silu(g) ⊙ u. Overwrites `out`.
pub fn forward(out: &mut [f32], h13: &[f32], h: usize) {
    out.par_chunks_exact_mut(h)
        .zip(h13.par_chunks_exact(2 * h))
        .for_each(|(o, row)| {
            let (g, u) = row.split_at(h);
            for ((o, &gv), &uv) in o.iter_mut().zip(g).zip(u) {
                *o = gv * sigmoid(gv) * uv;
            }
        });
}

/// dg = dout ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))), du = dout ⊙ silu(g). Overwrites `dh13` (its only consumer is
/// the GEMM that produced `h13`).
pub fn backward(dh13: &mut [f32], dout: &[f32], h13: &[f32], h: usize) {
    dh13.par_chunks_exact_mut(2 * h)
        .zip(dout.par_chunks_exact(h))
        .zip(h13.par_chunks_exact(2 * h))
        .for_each(|((d, dor), row)| {
            let (g, u) = row.split_at(h);
            let (dg, du) = d.split_at_mut(h);
            for i in 0..h {
                let s = sigmoid(g[i]);
                dg[i] = dor[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                du[i] = dor[i] * g[i] * s;
            }
        });
}
