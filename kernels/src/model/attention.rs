//! Causal multi-head self-attention on a fused, already rotated QKV activation; softmax in f32.
//!
//! Shapes: B sequences, T positions, N = B·T, C width, NH heads of HS = C / NH channels.
//! - `qkv`, `dqkv`: [N, 3C] (q, k, v of width C each; head h at channels [h·HS, (h+1)·HS) of each part)
//! - `att`: [N, NH, T] attention probabilities, saved by the forward (row (n, h) holds the T weights of
//!   query n in head h; entries past the query's position are zero)
//! - `out`, `dout`: [N, C], heads side by side
//!
//! The forward runs one rayon task per query token, the backward one per sequence (a query's gradient
//! flows to the keys and values of earlier tokens of the same sequence only).

use rayon::prelude::*;

/// Dot product with eight independent partial sums, so the compiler can keep it in SIMD registers (a
/// single running sum is a serial dependency chain it may not reorder). The order is fixed, so the result
/// is still deterministic.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// y += a·x.
#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

// Index loops mirror the math (t2 walks the weights of one query and the keys and values they weigh).
/// One query of one head: `arow[t2]` = softmax over t2 ≤ `ti` of q·k(t2)·`scale` (zero past `ti`), and
/// `oh` = Σ arow[t2]·v(t2). The full-window forward and the KV-cached forward both call this, so a
/// position's output is the same bits in either, given the same keys and values.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn attend<'a>(
    q: &[f32],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    ti: usize,
    scale: f32,
    arow: &mut [f32],
    oh: &mut [f32],
) {
    let mut max = f32::NEG_INFINITY;
    for t2 in 0..=ti {
        let s = dot(q, key(t2)) * scale;
        arow[t2] = s;
        max = max.max(s);
    }
    let mut sum = 0.0f32;
    for x in &mut arow[..=ti] {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in &mut arow[..=ti] {
        *x *= inv;
    }
    arow[ti + 1..].fill(0.0);
    oh.fill(0.0);
    for t2 in 0..=ti {
        axpy(oh, arow[t2], value(t2));
    }
}

/// out[n, h] = Σ_{t2 ≤ t} softmax_t2(q·k / √HS) · v. Overwrites `out` and `att`.
pub fn forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], t: usize, c: usize, nh: usize) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let c3 = 3 * c;
    out.par_chunks_exact_mut(c)
        .zip(att.par_chunks_exact_mut(nh * t))
        .enumerate()
        .for_each(|(n, (o, a))| {
            let ti = n % t;
            let base = n - ti;
            for h in 0..nh {
                let q = &qkv[n * c3 + h * hs..n * c3 + (h + 1) * hs];
                let key = |t2: usize| {
                    let k0 = (base + t2) * c3 + c + h * hs;
                    &qkv[k0..k0 + hs]
                };
                let value = |t2: usize| {
                    let v0 = (base + t2) * c3 + 2 * c + h * hs;
                    &qkv[v0..v0 + hs]
                };
                let arow = &mut a[h * t..(h + 1) * t];
                attend(q, key, value, ti, scale, arow, &mut o[h * hs..(h + 1) * hs]);
            }
        });
}

/// The KV-cached forward: T' new queries of one sequence, at positions `pos0..pos0 + T'`, attend to the
/// cached keys and values of positions `0..=` their own. Shapes: `qkv` [T', 3C] (only q is read; its k
/// and v must already be in the cache), `keys`, `values` [P, C] with P ≥ pos0 + T' (rotated keys, as the
/// full-window forward has them), `out` [T', C], `att` [T', NH, pos0 + T'] (scratch). Overwrites `out`
/// and `att`. Row i equals row pos0 + i of [`forward`] over the whole sequence, bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn forward_cached(
    out: &mut [f32],
    att: &mut [f32],
    qkv: &[f32],
    keys: &[f32],
    values: &[f32],
    pos0: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let c3 = 3 * c;
    let rows = out.len() / c;
    let p = pos0 + rows;
    out.par_chunks_exact_mut(c)
        .zip(att[..rows * nh * p].par_chunks_exact_mut(nh * p))
        .enumerate()
        .for_each(|(i, (o, a))| {
            for h in 0..nh {
                let q = &qkv[i * c3 + h * hs..i * c3 + (h + 1) * hs];
                let key = |t2: usize| &keys[t2 * c + h * hs..t2 * c + (h + 1) * hs];
                let value = |t2: usize| &values[t2 * c + h * hs..t2 * c + (h + 1) * hs];
                let arow = &mut a[h * p..(h + 1) * p];
                attend(
                    q,
                    key,
                    value,
                    pos0 + i,
                    scale,
                    arow,
                    &mut o[h * hs..(h + 1) * hs],
                );
            }
        });
}

#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
/// Gradients of q, k and v from `dout`. Overwrites `dqkv`. `scratch` must hold at least N floats (one row
/// of attention-weight gradients per sequence).
pub fn backward(
    dqkv: &mut [f32],
    scratch: &mut [f32],
    dout: &[f32],
    att: &[f32],
    qkv: &[f32],
    t: usize,
    c: usize,
    nh: usize,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let c3 = 3 * c;
    let n_total = dout.len() / c;
    dqkv.par_chunks_exact_mut(t * c3)
        .zip(scratch[..n_total].par_chunks_exact_mut(t))
        .enumerate()
        .for_each(|(bi, (dq, datt))| {
            dq.fill(0.0);
            let base = bi * t;
            for h in 0..nh {
                for ti in 0..t {
                    let n = base + ti;
                    let arow = &att[(n * nh + h) * t..(n * nh + h + 1) * t];
                    let dor = &dout[n * c + h * hs..n * c + (h + 1) * hs];
                    // Through out = Σ a·v: the weights' gradient and the values' gradient.
                    for t2 in 0..=ti {
                        let v0 = (base + t2) * c3 + 2 * c + h * hs;
                        let v = &qkv[v0..v0 + hs];
                        datt[t2] = dot(dor, v);
                        let dv0 = t2 * c3 + 2 * c + h * hs;
                        axpy(&mut dq[dv0..dv0 + hs], arow[t2], dor);
                    }
                    // Through the softmax: dpre = a ⊙ (datt − Σ a·datt).
                    let dotp: f32 = arow[..=ti]
                        .iter()
                        .zip(&datt[..=ti])
                        .map(|(a, d)| a * d)
                        .sum();
                    let q = &qkv[n * c3 + h * hs..n * c3 + (h + 1) * hs];
                    // Split the sequence's gradient rows so that dq of row ti and dk of rows t2 ≤ ti are
                    // disjoint borrows: rows before ti, then row ti's q part, then the rest of row ti.
                    let (before, row) = dq.split_at_mut(ti * c3);
                    let (q_part, after_q) = row.split_at_mut(c);
                    let dqh = &mut q_part[h * hs..(h + 1) * hs];
                    for t2 in 0..=ti {
                        let dpre = arow[t2] * (datt[t2] - dotp) * scale;
                        if dpre == 0.0 {
                            continue;
                        }
                        let k0 = (base + t2) * c3 + c + h * hs;
                        axpy(dqh, dpre, &qkv[k0..k0 + hs]);
                        let dk = if t2 < ti {
                            &mut before[t2 * c3 + c + h * hs..t2 * c3 + c + (h + 1) * hs]
                        } else {
                            &mut after_q[h * hs..(h + 1) * hs]
                        };
                        axpy(dk, dpre, q);
                    }
                }
            }
        });
}
