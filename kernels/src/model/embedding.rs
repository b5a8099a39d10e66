//! Token embedding lookup (f32), forward and backward.
//!
//! Shapes: N = B·T tokens, V vocabulary, C width. `wte` is [V, C]; `out` and `dout` are [N, C].
//! Token ids are validated (< V) by the model before these run.

/// out[n, :] = wte[tokens[n], :]. Overwrites `out`.
pub fn forward(out: &mut [f32], tokens: &[u32], wte: &[f32], c: usize) {
    for (row, &tok) in out.chunks_exact_mut(c).zip(tokens) {
        let t = tok as usize;
        row.copy_from_slice(&wte[t * c..(t + 1) * c]);
    }
}

/// dwte[tokens[n], :] += dout[n, :]. Accumulates into `dwte` (tokens repeat, so this stays sequential).
pub fn backward(dwte: &mut [f32], dout: &[f32], tokens: &[u32], c: usize) {
    for (row, &tok) in dout.chunks_exact(c).zip(tokens) {
        let t = tok as usize;
        for (d, g) in dwte[t * c..(t + 1) * c].iter_mut().zip(row) {
            *d += g;
        }
    }
}
