//! DeepSeekMoE feed-forward: a shared SwiGLU expert plus E routed SwiGLU experts, of which each token uses
//! the top K. Affinities are sigmoids of a router (f32); a per-expert bias, moved by the trainer after each
//! step, changes only which experts are selected; the gates are the selected affinities normalized to sum
//! to one. A small sequence-wise balance loss α·Σ_i f_i·P_i pushes affinities towards balance.
//!
//! Shapes: N = B·T tokens, C width, E routed experts, K selected per token (K' = min(K, present experts)),
//! F expert hidden, S shared hidden, R = N·K' routed slots.
//! - `x`, `out`, `dout`, `dx`: [N, C]
//! - `s`: [N, E] sigmoid affinities; `sel`, `gates`, `slot`: [N, K']; `slot_token`: [R]
//! - gathered per-expert activations, rows grouped by expert (`offsets`): `xg`, `yg` [R, C], `h13` [R, 2F],
//!   `act` [R, F]; shared expert: `sh13` [N, 2S], `sact` [N, S]
//!
//! Experts run only on the tokens routed to them: gather → GEMM → scatter. Absent experts (not held by this
//! instance) are never selected, except at inference with [`RemoteExperts`], where they are run outside
//! (and may be dropped for a token under the `k_min` rule, see [`super::experts`]).

use crate::backend::Backend;
use crate::error::KernelError;
use crate::gemm::LinearPrecision;

use super::experts::{ExpertCall, ExpertRunner};
use super::linear;
use super::params::{MoeParams, SwigluParams};
use super::swiglu;

/// Sizes of one MoE layer.
#[derive(Clone, Copy, Debug)]
pub struct MoeDims {
    /// C.
    pub c: usize,
    /// E.
    pub e: usize,
    /// K (before clamping to the present experts).
    pub k: usize,
    /// F.
    pub f: usize,
    /// S.
    pub s: usize,
}

/// Activations one MoE layer saves for its backward, sized for a maximum token count.
#[derive(Clone, Debug, Default)]
pub struct MoeActs {
    /// [N, E] sigmoid affinities.
    pub s: Vec<f32>,
    /// K' actually selected per token.
    pub k_eff: usize,
    /// [N, K'] selected expert ids, best first.
    pub sel: Vec<u32>,
    /// [N, K'] normalized gate values.
    pub gates: Vec<f32>,
    /// [N, K'] row of each (token, choice) in the gathered buffers.
    pub slot: Vec<u32>,
    /// [R] token of each gathered row.
    pub slot_token: Vec<u32>,
    /// [E + 1] first gathered row of each expert.
    pub offsets: Vec<usize>,
    /// [E] tokens routed to each expert in this forward.
    pub counts: Vec<usize>,
    cursor: Vec<usize>,
    /// [B, E] balance-loss frequencies f_i per sequence (constants for the backward).
    pub f_seq: Vec<f32>,
    /// [N] Σ over present experts of the affinities.
    pub z: Vec<f32>,
    /// [R, C] gathered inputs.
    pub xg: Vec<f32>,
    /// [R, 2F] expert gate/up pre-activations.
    pub h13: Vec<f32>,
    /// [R, F] expert SwiGLU outputs.
    pub act: Vec<f32>,
    /// [R, C] expert outputs.
    pub yg: Vec<f32>,
    /// [N, 2S] shared-expert pre-activations.
    pub sh13: Vec<f32>,
    /// [N, S] shared-expert SwiGLU outputs.
    pub sact: Vec<f32>,
}

impl MoeActs {
    /// Buffers for up to `n` tokens in up to `b` sequences.
    pub fn new(d: MoeDims, n: usize, b: usize) -> Self {
        let r = n * d.k;
        Self {
            s: vec![0.0; n * d.e],
            k_eff: 0,
            sel: vec![0; r],
            gates: vec![0.0; r],
            slot: vec![0; r],
            slot_token: vec![0; r],
            offsets: vec![0; d.e + 1],
            counts: vec![0; d.e],
            cursor: vec![0; d.e],
            f_seq: vec![0.0; b * d.e],
            z: vec![0.0; n],
            xg: vec![0.0; r * d.c],
            h13: vec![0.0; r * 2 * d.f],
            act: vec![0.0; r * d.f],
            yg: vec![0.0; r * d.c],
            sh13: vec![0.0; n * 2 * d.s],
            sact: vec![0.0; n * d.s],
        }
    }
}

/// Gradient scratch for the MoE backward, shared by all layers.
#[derive(Clone, Debug, Default)]
pub struct MoeScratch {
    /// [R, C] gradient of the expert outputs.
    pub dyg: Vec<f32>,
    /// [R, C] gradient of the gathered inputs.
    pub dxg: Vec<f32>,
    /// [N, K] gradient of the gates.
    pub dgate: Vec<f32>,
    /// [N, E] gradient of the affinities, then of the router logits.
    pub ds: Vec<f32>,
}

impl MoeScratch {
    /// Buffers for up to `n` tokens.
    pub fn new(d: MoeDims, n: usize) -> Self {
        let r = n * d.k;
        Self {
            dyg: vec![0.0; r * d.c],
            dxg: vec![0.0; r * d.c],
            dgate: vec![0.0; r],
            ds: vec![0.0; n * d.e],
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Picks, for every token, the K' present experts with the largest `s + bias` (ties: lower index), sets
/// the normalized gates, groups the (token, choice) slots by expert and counts each expert's load.
pub fn route(acts: &mut MoeActs, present: &[bool], bias: &[f32], n: usize, d: MoeDims) {
    let e = d.e;
    let n_present = present.iter().filter(|&&p| p).count();
    let k = d.k.min(n_present);
    acts.k_eff = k;
    acts.counts.fill(0);
    for tok in 0..n {
        let s = &acts.s[tok * e..(tok + 1) * e];
        let mut z = 0.0f32;
        for (i, &sv) in s.iter().enumerate() {
            if present[i] {
                z += sv;
            }
        }
        acts.z[tok] = z;
        let sel = &mut acts.sel[tok * k..(tok + 1) * k];
        for j in 0..k {
            let mut best = usize::MAX;
            let mut best_v = f32::NEG_INFINITY;
            for i in 0..e {
                if !present[i] || sel[..j].contains(&(i as u32)) {
                    continue;
                }
                let v = s[i] + bias[i];
                if best == usize::MAX || v > best_v {
                    best = i;
                    best_v = v;
                }
            }
            sel[j] = best as u32;
            acts.counts[best] += 1;
        }
        let zs: f32 = sel.iter().map(|&i| s[i as usize]).sum();
        for j in 0..k {
            acts.gates[tok * k + j] = s[sel[j] as usize] / zs;
        }
    }
    acts.offsets[0] = 0;
    for i in 0..e {
        acts.offsets[i + 1] = acts.offsets[i] + acts.counts[i];
    }
    acts.cursor.copy_from_slice(&acts.offsets[..e]);
    for tok in 0..n {
        for j in 0..k {
            let i = acts.sel[tok * k + j] as usize;
            let row = acts.cursor[i];
            acts.cursor[i] += 1;
            acts.slot[tok * k + j] = row as u32;
            acts.slot_token[row] = tok as u32;
        }
    }
}

/// A SwiGLU FFN forward (dense block, shared expert or routed expert): out = (silu(x·W1ᵀ) ⊙ x·W3ᵀ)·W2ᵀ,
/// saving `h13` [N, 2H] and `act` [N, H] for [`swiglu_ffn_backward`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn swiglu_ffn_forward(
    backend: &mut dyn Backend,
    precision: LinearPrecision,
    params: &[f32],
    p: &SwigluParams,
    x: &[f32],
    h13: &mut [f32],
    act: &mut [f32],
    out: &mut [f32],
    rows: usize,
    c: usize,
) -> Result<(), KernelError> {
    let h = p.hidden;
    linear::forward(backend, precision, h13, x, p.w13.of(params), rows, c, 2 * h)?;
    swiglu::forward(act, h13, h);
    linear::forward(backend, precision, out, act, p.w2.of(params), rows, h, c)
}

/// Backward of a SwiGLU FFN: dW2, dW13 accumulate; `dx` is overwritten or accumulated per `accumulate_dx`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn swiglu_ffn_backward(
    backend: &mut dyn Backend,
    precision: LinearPrecision,
    params: &[f32],
    grads: &mut [f32],
    p: &SwigluParams,
    x: &[f32],
    h13: &[f32],
    act: &[f32],
    dout: &[f32],
    dx: &mut [f32],
    accumulate_dx: bool,
    dact: &mut [f32],
    dh13: &mut [f32],
    rows: usize,
    c: usize,
) -> Result<(), KernelError> {
    let h = p.hidden;
    linear::backward(
        backend,
        precision,
        dact,
        false,
        p.w2.of_mut(grads),
        dout,
        act,
        p.w2.of(params),
        rows,
        h,
        c,
    )?;
    swiglu::backward(dh13, dact, h13, h);
    linear::backward(
        backend,
        precision,
        dx,
        accumulate_dx,
        p.w13.of_mut(grads),
        dh13,
        x,
        p.w13.of(params),
        rows,
        c,
        2 * h,
    )
}

/// Everything the MoE forward reads besides its input and activations.
pub struct MoeContext<'a> {
    /// The GEMM provider.
    pub backend: &'a mut dyn Backend,
    /// Precision of the expert GEMMs (the router always runs in f32).
    pub precision: LinearPrecision,
    /// The flat parameter buffer.
    pub params: &'a [f32],
    /// Where this layer's parameters live.
    pub p: &'a MoeParams,
    /// Which experts are present.
    pub present: &'a [bool],
    /// Sizes.
    pub dims: MoeDims,
    /// B, T (N = B·T).
    pub b: usize,
    /// T.
    pub t: usize,
    /// Weight of the sequence-wise balance loss.
    pub alpha: f32,
}

/// The routed experts of one MoE layer that run outside the model (inference only): with it, routing
/// chooses among all E experts of the config, and the rows of every expert the instance does not hold go to
/// the runner. An expert the runner marks missing is dropped for its tokens, whose gates are renormalized
/// over the experts they keep, if each keeps at least `k_min` (see [`super::experts`]).
pub struct RemoteExperts<'a> {
    /// The block index, as the runner knows it.
    pub layer: usize,
    /// Computes the absent experts.
    pub runner: &'a mut dyn ExpertRunner,
    /// The fewest selected experts a token may keep (clamped to K').
    pub k_min: usize,
}

/// Drops the experts marked in `missing` [E] from the tokens that selected them: each such token's gates
/// become s_j / Σ s over the selected experts it keeps (0 for the dropped ones), the normalization
/// [`route`] applies to the full selection. Fails, changing nothing, if a token would keep fewer than
/// `k_min` (clamped to K').
fn drop_missing(
    acts: &mut MoeActs,
    missing: &[bool],
    n: usize,
    e: usize,
    layer: usize,
    k_min: usize,
) -> Result<(), KernelError> {
    let k = acts.k_eff;
    let need = k_min.min(k);
    for tok in 0..n {
        let sel = &acts.sel[tok * k..(tok + 1) * k];
        let kept = sel.iter().filter(|&&i| !missing[i as usize]).count();
        if kept < need {
            return Err(KernelError::TooFewExperts {
                layer,
                token: tok,
                kept,
                top_k: k,
                k_min: need,
                missing: (0..e).filter(|&i| missing[i]).collect(),
            });
        }
    }
    for tok in 0..n {
        let sel = &acts.sel[tok * k..(tok + 1) * k];
        if sel.iter().all(|&i| !missing[i as usize]) {
            continue;
        }
        let s = &acts.s[tok * e..(tok + 1) * e];
        let zs: f32 = sel
            .iter()
            .filter(|&&i| !missing[i as usize])
            .map(|&i| s[i as usize])
            .sum();
        let gates = &mut acts.gates[tok * k..(tok + 1) * k];
        for (g, &i) in gates.iter_mut().zip(sel) {
            let i = i as usize;
            *g = if missing[i] { 0.0 } else { s[i] / zs };
        }
    }
    Ok(())
}

/// out = shared(x) + Σ_k gate_k · expert_k(x). Overwrites `out`. `bias` [E] only affects selection.
/// Returns the (already α-weighted, batch-averaged) sequence-wise balance loss.
pub fn forward(
    ctx: MoeContext<'_>,
    bias: &[f32],
    x: &[f32],
    out: &mut [f32],
    acts: &mut MoeActs,
) -> Result<f64, KernelError> {
    forward_with(ctx, None, bias, x, out, acts)
}

/// [`forward`], with the experts the instance does not hold run by `remote` when it is given (see
/// [`RemoteExperts`]); the held experts run here exactly as in [`forward`].
pub fn forward_with(
    ctx: MoeContext<'_>,
    remote: Option<RemoteExperts<'_>>,
    bias: &[f32],
    x: &[f32],
    out: &mut [f32],
    acts: &mut MoeActs,
) -> Result<f64, KernelError> {
    let MoeContext {
        backend,
        precision,
        params,
        p,
        present,
        dims: d,
        b,
        t,
        alpha,
    } = ctx;
    let n = b * t;
    let (c, e) = (d.c, d.e);
    // With a runner every expert of the config can be chosen; without one, only the held ones.
    let everyone;
    let present = if remote.is_some() {
        everyone = vec![true; e];
        &everyone[..]
    } else {
        present
    };
    // Router in f32, then sigmoid affinities.
    let s = &mut acts.s[..n * e];
    linear::forward(
        backend,
        LinearPrecision::F32,
        s,
        x,
        p.router.of(params),
        n,
        c,
        e,
    )?;
    for v in s.iter_mut() {
        *v = sigmoid(*v);
    }
    route(acts, present, bias, n, d);
    let k = acts.k_eff;
    let r = n * k;
    // Gather the routed rows.
    for row in 0..r {
        let tok = acts.slot_token[row] as usize;
        acts.xg[row * c..(row + 1) * c].copy_from_slice(&x[tok * c..(tok + 1) * c]);
    }
    // Each held expert on its own rows.
    for (i, expert) in p.experts.iter().enumerate() {
        let Some(ep) = expert else { continue };
        let (lo, hi) = (acts.offsets[i], acts.offsets[i + 1]);
        if hi == lo {
            continue;
        }
        let f = ep.hidden;
        swiglu_ffn_forward(
            backend,
            precision,
            params,
            ep,
            &acts.xg[lo * c..hi * c],
            &mut acts.h13[lo * 2 * f..hi * 2 * f],
            &mut acts.act[lo * f..hi * f],
            &mut acts.yg[lo * c..hi * c],
            hi - lo,
            c,
        )?;
    }
    // The others, routed to the runner in one call: each expert's rows are one slice of `xg` and `yg`.
    let mut missing: Option<Vec<bool>> = None;
    if let Some(RemoteExperts {
        layer,
        runner,
        k_min,
    }) = remote
    {
        let mut calls = Vec::new();
        let mut rest = &mut acts.yg[..r * c];
        let mut at = 0;
        for (i, expert) in p.experts.iter().enumerate() {
            let (lo, hi) = (acts.offsets[i], acts.offsets[i + 1]);
            if expert.is_some() || hi == lo {
                continue;
            }
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((lo - at) * c);
            let (mine, tail) = tail.split_at_mut((hi - lo) * c);
            rest = tail;
            at = hi;
            calls.push(ExpertCall {
                expert: i,
                rows: hi - lo,
                x: &acts.xg[lo * c..hi * c],
                out: mine,
                missing: false,
            });
        }
        if !calls.is_empty() {
            runner.run_layer(layer, &mut calls)?;
        }
        if calls.iter().any(|call| call.missing) {
            let mut gone = vec![false; e];
            for call in &calls {
                gone[call.expert] |= call.missing;
            }
            drop(calls);
            drop_missing(acts, &gone, n, e, layer, k_min)?;
            missing = Some(gone);
        }
    }
    // Shared expert writes `out`, then the gated routed outputs are added.
    let sh = p.shared.hidden;
    swiglu_ffn_forward(
        backend,
        precision,
        params,
        &p.shared,
        x,
        &mut acts.sh13[..n * 2 * sh],
        &mut acts.sact[..n * sh],
        &mut out[..n * c],
        n,
        c,
    )?;
    for tok in 0..n {
        let o = &mut out[tok * c..(tok + 1) * c];
        for j in 0..k {
            // A dropped expert's rows hold whatever the runner left there.
            if missing
                .as_ref()
                .is_some_and(|m| m[acts.sel[tok * k + j] as usize])
            {
                continue;
            }
            let g = acts.gates[tok * k + j];
            let row = acts.slot[tok * k + j] as usize;
            for (ov, &yv) in o.iter_mut().zip(&acts.yg[row * c..(row + 1) * c]) {
                *ov += g * yv;
            }
        }
    }
    // Sequence-wise balance loss: f_i = E'/(K'·T) · #(tokens of the sequence choosing i), P_i = mean_t s'_i.
    let n_present = present.iter().filter(|&&p| p).count();
    let mut loss = 0.0f64;
    if k > 0 && alpha > 0.0 {
        let scale = n_present as f32 / (k * t) as f32;
        for bi in 0..b {
            let f = &mut acts.f_seq[bi * e..(bi + 1) * e];
            f.fill(0.0);
            for tok in bi * t..(bi + 1) * t {
                for j in 0..k {
                    f[acts.sel[tok * k + j] as usize] += scale;
                }
            }
            let mut seq = 0.0f64;
            for tok in bi * t..(bi + 1) * t {
                let z = acts.z[tok];
                for i in 0..e {
                    if present[i] {
                        seq += (f[i] * acts.s[tok * e + i] / z) as f64;
                    }
                }
            }
            loss += seq / t as f64;
        }
        loss *= alpha as f64 / b as f64;
    }
    Ok(loss)
}

/// Gradient of the MoE FFN (and of the balance loss, with unit weight on it). Overwrites `dx`; parameter
/// gradients (router, shared expert, routed experts) accumulate. `dact`/`dh13` are SwiGLU scratch with room
/// for max(N, R) rows of the widest hidden size.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    ctx: MoeContext<'_>,
    grads: &mut [f32],
    x: &[f32],
    dout: &[f32],
    dx: &mut [f32],
    acts: &MoeActs,
    sc: &mut MoeScratch,
    dact: &mut [f32],
    dh13: &mut [f32],
) -> Result<(), KernelError> {
    let MoeContext {
        backend,
        precision,
        params,
        p,
        present,
        dims: d,
        b,
        t,
        alpha,
    } = ctx;
    let n = b * t;
    let (c, e) = (d.c, d.e);
    let k = acts.k_eff;
    // Shared expert: the first writer of dx.
    let sh = p.shared.hidden;
    swiglu_ffn_backward(
        backend,
        precision,
        params,
        grads,
        &p.shared,
        x,
        &acts.sh13[..n * 2 * sh],
        &acts.sact[..n * sh],
        dout,
        dx,
        false,
        &mut dact[..n * sh],
        &mut dh13[..n * 2 * sh],
        n,
        c,
    )?;
    // Through the gated sum: expert outputs and gate values.
    for tok in 0..n {
        let d_o = &dout[tok * c..(tok + 1) * c];
        for j in 0..k {
            let g = acts.gates[tok * k + j];
            let row = acts.slot[tok * k + j] as usize;
            let y = &acts.yg[row * c..(row + 1) * c];
            sc.dgate[tok * k + j] = d_o.iter().zip(y).map(|(a, b)| a * b).sum();
            for (dy, &go) in sc.dyg[row * c..(row + 1) * c].iter_mut().zip(d_o) {
                *dy = g * go;
            }
        }
    }
    // Each expert on its rows, then scatter back to the tokens.
    for (i, expert) in p.experts.iter().enumerate() {
        let Some(ep) = expert else { continue };
        let (lo, hi) = (acts.offsets[i], acts.offsets[i + 1]);
        if hi == lo {
            continue;
        }
        let f = ep.hidden;
        let rows = hi - lo;
        swiglu_ffn_backward(
            backend,
            precision,
            params,
            grads,
            ep,
            &acts.xg[lo * c..hi * c],
            &acts.h13[lo * 2 * f..hi * 2 * f],
            &acts.act[lo * f..hi * f],
            &sc.dyg[lo * c..hi * c],
            &mut sc.dxg[lo * c..hi * c],
            false,
            &mut dact[..rows * f],
            &mut dh13[..rows * 2 * f],
            rows,
            c,
        )?;
    }
    for row in 0..n * k {
        let tok = acts.slot_token[row] as usize;
        for (dv, &g) in dx[tok * c..(tok + 1) * c]
            .iter_mut()
            .zip(&sc.dxg[row * c..(row + 1) * c])
        {
            *dv += g;
        }
    }
    // Affinity gradients: gate normalization g_j = s_j / Σ_sel s, plus the balance loss through
    // s'_i = s_i / Σ_present s. Selection and f_i carry no gradient.
    let ds = &mut sc.ds[..n * e];
    ds.fill(0.0);
    for tok in 0..n {
        let s = &acts.s[tok * e..(tok + 1) * e];
        let dsr = &mut ds[tok * e..(tok + 1) * e];
        if k > 0 {
            let sel = &acts.sel[tok * k..(tok + 1) * k];
            let dg = &sc.dgate[tok * k..(tok + 1) * k];
            let zs: f32 = sel.iter().map(|&i| s[i as usize]).sum();
            let dot: f32 = sel.iter().zip(dg).map(|(&i, &g)| g * s[i as usize]).sum();
            for (&i, &g) in sel.iter().zip(dg) {
                dsr[i as usize] += g / zs - dot / (zs * zs);
            }
        }
        if k > 0 && alpha > 0.0 {
            let bi = tok / t;
            let f = &acts.f_seq[bi * e..(bi + 1) * e];
            let z = acts.z[tok];
            let coef = alpha / (b * t) as f32;
            let fs: f32 = (0..e).filter(|&i| present[i]).map(|i| f[i] * s[i]).sum();
            for i in 0..e {
                if present[i] {
                    dsr[i] += coef * (f[i] / z - fs / (z * z));
                }
            }
        }
        for i in 0..e {
            dsr[i] = if present[i] {
                dsr[i] * s[i] * (1.0 - s[i])
            } else {
                0.0
            };
        }
    }
    linear::backward(
        backend,
        LinearPrecision::F32,
        dx,
        true,
        p.router.of_mut(grads),
        ds,
        x,
        p.router.of(params),
        n,
        c,
        e,
    )
}

/// The auxiliary-loss-free balancing rule: each present expert's bias moves by +γ if it got fewer than the
/// mean number of routed slots in `counts`, by −γ if it got more.
pub fn update_bias(bias: &mut [f32], counts: &[u64], present: &[bool], gamma: f32) {
    let n_present = present.iter().filter(|&&p| p).count();
    if n_present == 0 {
        return;
    }
    let total: u64 = counts
        .iter()
        .zip(present)
        .filter(|(_, p)| **p)
        .map(|(c, _)| *c)
        .sum();
    let mean = total as f64 / n_present as f64;
    for ((b, &c), &p) in bias.iter_mut().zip(counts).zip(present) {
        if !p {
            continue;
        }
        let load = c as f64;
        if load < mean {
            *b += gamma;
        } else if load > mean {
            *b -= gamma;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::model::ModelConfig;
    use crate::model::params::{ExpertSet, FfnParams, ParamLayout};

    /// One MoE block (after a dense one) of 6 experts, top 3, every expert outside the instance.
    fn config() -> ModelConfig {
        ModelConfig {
            d_model: 16,
            n_layers: 2,
            n_heads: 2,
            n_dense_layers: 1,
            dense_hidden: 16,
            n_routed_experts: 6,
            top_k: 3,
            expert_hidden: 8,
            shared_hidden: 8,
            context: 8,
            mtp: false,
            ..ModelConfig::default()
        }
    }

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// A stand-in for remote experts: expert i maps a row x to (i + 1)·x/4 + i/100, or to zeros when
    /// `zeros`; the experts in `gone` get no answer (their outputs are left NaN, which must not be read).
    struct Stand {
        zeros: bool,
        gone: Vec<usize>,
    }

    fn stand(expert: usize, x: f32) -> f32 {
        (expert + 1) as f32 * x / 4.0 + expert as f32 / 100.0
    }

    impl ExpertRunner for Stand {
        fn run_layer(
            &mut self,
            _layer: usize,
            calls: &mut [ExpertCall<'_>],
        ) -> Result<(), KernelError> {
            for call in calls.iter_mut() {
                if self.gone.contains(&call.expert) {
                    call.out.fill(f32::NAN);
                    call.missing = true;
                    continue;
                }
                for (o, &x) in call.out.iter_mut().zip(call.x) {
                    *o = if self.zeros {
                        0.0
                    } else {
                        stand(call.expert, x)
                    };
                }
            }
            Ok(())
        }
    }

    /// Tokens of one sequence through the MoE layer with `runner` and `k_min`: (out, affinities, selection).
    fn layer(
        runner: &mut Stand,
        k_min: usize,
    ) -> (Result<Vec<f32>, KernelError>, Vec<f32>, Vec<u32>) {
        let cfg = config();
        let n = 5;
        let layout = ParamLayout::new(&cfg, &ExpertSet::none(&cfg));
        let FfnParams::Moe(p) = &layout.blocks[1].ffn else {
            panic!("block 1 is MoE")
        };
        let params = values(layout.total, 3);
        let d = MoeDims {
            c: cfg.d_model,
            e: cfg.n_routed_experts,
            k: cfg.top_k,
            f: cfg.expert_hidden,
            s: cfg.shared_hidden,
        };
        let mut backend = CpuBackend::new();
        let ctx = MoeContext {
            backend: &mut backend,
            precision: cfg.linear_precision(),
            params: &params,
            p,
            present: &[false; 6],
            dims: d,
            b: 1,
            t: n,
            alpha: 0.0,
        };
        let x = values(n * d.c, 11);
        let mut out = vec![0.0; n * d.c];
        let mut acts = MoeActs::new(d, n, 1);
        let remote = RemoteExperts {
            layer: 1,
            runner,
            k_min,
        };
        let result = forward_with(ctx, Some(remote), &[0.0; 6], &x, &mut out, &mut acts);
        let sel = acts.sel[..n * acts.k_eff].to_vec();
        (result.map(|_| out), acts.s[..n * d.e].to_vec(), sel)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn with_every_expert_answering_k_min_changes_nothing() {
        let all = |k_min| {
            let mut runner = Stand {
                zeros: false,
                gone: Vec::new(),
            };
            layer(&mut runner, k_min).0.expect("all answered")
        };
        let want = all(usize::MAX);
        for k_min in [0, 1, 2, 3] {
            assert_eq!(bits(&all(k_min)), bits(&want), "k_min {k_min}");
        }
    }

    #[test]
    fn a_missing_expert_is_dropped_and_its_tokens_gates_renormalized() {
        let cfg = config();
        let (c, e, k) = (cfg.d_model, cfg.n_routed_experts, cfg.top_k);
        let mut full = Stand {
            zeros: false,
            gone: Vec::new(),
        };
        let (_, _, sel) = layer(&mut full, usize::MAX);
        let gone = sel[0] as usize;
        let mut dropping = Stand {
            zeros: false,
            gone: vec![gone],
        };
        let (got, s, sel) = layer(&mut dropping, k - 1);
        let got = got.expect("every token keeps k - 1 experts");
        // The shared expert alone: every routed expert answering zeros.
        let mut zeros = Stand {
            zeros: true,
            gone: Vec::new(),
        };
        let shared = layer(&mut zeros, usize::MAX).0.expect("all answered");
        let x = values(5 * c, 11);
        let mut dropped_somewhere = false;
        for tok in 0..5 {
            let chosen = &sel[tok * k..(tok + 1) * k];
            let kept: Vec<usize> = chosen
                .iter()
                .map(|&i| i as usize)
                .filter(|&i| i != gone)
                .collect();
            dropped_somewhere |= kept.len() < k;
            let z: f32 = kept.iter().map(|&i| s[tok * e + i]).sum();
            for ch in 0..c {
                let routed: f32 = kept
                    .iter()
                    .map(|&i| s[tok * e + i] / z * stand(i, x[tok * c + ch]))
                    .sum();
                let want = shared[tok * c + ch] + routed;
                let have = got[tok * c + ch];
                assert!(
                    (have - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "token {tok}, channel {ch}: {have} against {want}"
                );
            }
        }
        assert!(
            dropped_somewhere,
            "the missing expert was chosen by token 0"
        );
    }

    #[test]
    fn a_token_keeping_fewer_than_k_min_fails_the_layer_with_a_typed_error() {
        let k = config().top_k;
        let (_, _, sel) = layer(
            &mut Stand {
                zeros: false,
                gone: Vec::new(),
            },
            usize::MAX,
        );
        let gone = vec![sel[0] as usize, sel[1] as usize];
        let mut runner = Stand {
            zeros: false,
            gone: gone.clone(),
        };
        let err = layer(&mut runner, k - 1).0.expect_err("token 0 keeps one");
        match err {
            KernelError::TooFewExperts {
                layer,
                token,
                kept,
                top_k,
                k_min,
                missing,
            } => {
                assert_eq!((layer, token, kept, top_k, k_min), (1, 0, 1, k, k - 1));
                let mut want = gone;
                want.sort_unstable();
                assert_eq!(missing, want);
            }
            other => panic!("{other}"),
        }
        // One kept is enough at k_min = 1, and k_min past the top-k means all of them.
        assert!(layer(&mut runner, 1).0.is_ok());
        assert!(layer(&mut runner, usize::MAX).0.is_err());
    }
}
