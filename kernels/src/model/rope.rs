//! Rotary position embedding on the query and key parts of the fused QKV activation.
//!
//! Shapes: B sequences of T positions, C width, NH heads of HS = C / NH channels. `qkv` is [B, T, 3C] with
//! q, k, v of width C each, head h at channels [h·HS, (h+1)·HS). Channel pairs (2i, 2i+1) of a head at
//! position t rotate by the angle t · θ^(−2i/HS). The rotation is orthogonal, so the backward is the
//! inverse rotation of the gradient and needs no saved activation.

use rayon::prelude::*;

/// cos and sin of every (position, pair) angle, computed once per model for the configured context.
#[derive(Clone, Debug)]
pub struct RopeTable {
    /// [Tmax, HS/2].
    cos: Vec<f32>,
    /// [Tmax, HS/2].
    sin: Vec<f32>,
    half: usize,
    max_t: usize,
}

impl RopeTable {
    /// Table for positions 0..max_t and heads of `head_size` channels (even).
    pub fn new(max_t: usize, head_size: usize, theta: f32) -> Self {
        let half = head_size / 2;
        let mut cos = Vec::with_capacity(max_t * half);
        let mut sin = Vec::with_capacity(max_t * half);
        for t in 0..max_t {
            for i in 0..half {
                let freq = (theta as f64).powf(-2.0 * i as f64 / head_size as f64);
                let a = t as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self {
            cos,
            sin,
            half,
            max_t,
        }
    }

    /// Longest sequence this table covers.
    pub fn max_t(&self) -> usize {
        self.max_t
    }
}

/// Rotates every row of `qkv` by its position: `pos0 + n mod t` for row n (the training forward has
/// `pos0 = 0`; a cached decode step runs one sequence of new rows starting at `pos0`).
#[allow(clippy::too_many_arguments)]
fn rotate(
    qkv: &mut [f32],
    table: &RopeTable,
    pos0: usize,
    t: usize,
    c: usize,
    nh: usize,
    sign: f32,
) {
    let hs = c / nh;
    let half = table.half;
    debug_assert!(pos0 + t <= table.max_t, "rope: position past the table");
    qkv.par_chunks_exact_mut(3 * c)
        .enumerate()
        .for_each(|(n, row)| {
            let pos = pos0 + n % t;
            let cs = &table.cos[pos * half..(pos + 1) * half];
            let sn = &table.sin[pos * half..(pos + 1) * half];
            // q and k (the first 2C channels); v is not rotated.
            for head in row[..2 * c].chunks_exact_mut(hs) {
                for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (x0, x1) = (pair[0], pair[1]);
                    let (co, si) = (cs[i], sign * sn[i]);
                    pair[0] = x0 * co - x1 * si;
                    pair[1] = x0 * si + x1 * co;
                }
            }
        });
    let _ = nh;
}

/// Rotates q and k of `qkv` [B, T, 3C] in place by their positions (n mod T).
pub fn forward(qkv: &mut [f32], table: &RopeTable, t: usize, c: usize, nh: usize) {
    rotate(qkv, table, 0, t, c, nh, 1.0);
}

/// Rotates q and k of `qkv` [T', 3C], the rows of one sequence at positions `pos0..pos0 + T'` (a KV-cached
/// decode step). The caller keeps `pos0 + T'` within [`RopeTable::max_t`].
pub fn forward_at(qkv: &mut [f32], table: &RopeTable, pos0: usize, c: usize, nh: usize) {
    let rows = qkv.len() / (3 * c);
    rotate(qkv, table, pos0, rows.max(1), c, nh, 1.0);
}

/// Rotates dq and dk of `dqkv` [B, T, 3C] back in place (the transpose of the forward rotation).
pub fn backward(dqkv: &mut [f32], table: &RopeTable, t: usize, c: usize, nh: usize) {
    rotate(dqkv, table, 0, t, c, nh, -1.0);
}
