//! Finite-difference checks of every op's hand-written backward, one op at a time, in f32.
//!
//! Each check builds a scalar objective L = Σ wᵢ·yᵢ (random fixed w, accumulated in f64) over the op's
//! output y, runs the backward with dy = w, and compares every input and parameter gradient with central
//! differences. The error measure is ‖analytic − numeric‖₂ / max(‖analytic‖₂, ‖numeric‖₂) over the checked
//! coordinates, which must stay under [`MAX_REL_ERR`].
#![allow(clippy::unwrap_used)]

mod model_support;

use mana_kernels::CpuBackend;
use mana_kernels::gemm::Precision;
use mana_kernels::model::moe::{self, MoeActs, MoeContext, MoeDims, MoeScratch};
use mana_kernels::model::params::{MoeParams, Span, SwigluParams};
use mana_kernels::model::rope::RopeTable;
use mana_kernels::model::{attention, embedding, linear, loss, rmsnorm, rope, swiglu};
use model_support::TestRng;

/// Largest accepted relative error of a backward against central differences.
const MAX_REL_ERR: f64 = 1e-3;
/// Central-difference step.
const H: f32 = 1e-2;

fn dot(w: &[f32], y: &[f32]) -> f64 {
    w.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Compares `analytic` with central differences of `f` around `x` on up to `max_coords` coordinates
/// (evenly spread). Returns the relative error.
fn fd_check(
    name: &str,
    x: &[f32],
    analytic: &[f32],
    max_coords: usize,
    mut f: impl FnMut(&[f32]) -> Option<f64>,
) -> f64 {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let stride = (x.len() / max_coords).max(1);
    let mut xp = x.to_vec();
    let (mut diff, mut na, mut nn) = (0.0f64, 0.0f64, 0.0f64);
    let mut skipped = 0;
    let mut checked = 0;
    for i in (0..x.len()).step_by(stride) {
        xp[i] = x[i] + H;
        let plus = f(&xp);
        xp[i] = x[i] - H;
        let minus = f(&xp);
        xp[i] = x[i];
        let (Some(p), Some(m)) = (plus, minus) else {
            skipped += 1;
            continue;
        };
        let num = (p - m) / (2.0 * H as f64);
        let a = analytic[i] as f64;
        diff += (a - num) * (a - num);
        na += a * a;
        nn += num * num;
        checked += 1;
    }
    assert!(checked > 0, "{name}: no coordinate checked");
    assert!(
        skipped * 10 <= checked,
        "{name}: too many coordinates skipped ({skipped})"
    );
    let rel = diff.sqrt() / na.sqrt().max(nn.sqrt()).max(1e-12);
    println!(
        "{name}: rel err {rel:.2e} over {checked} coords (|grad| {:.3e})",
        na.sqrt()
    );
    assert!(
        rel < MAX_REL_ERR,
        "{name}: relative error {rel:.3e} >= {MAX_REL_ERR:e}"
    );
    assert!(
        na > 0.0,
        "{name}: gradient is identically zero, check is vacuous"
    );
    rel
}

#[test]
fn embedding_backward_matches_finite_differences() {
    let (v, c) = (7, 5);
    let mut rng = TestRng(1);
    let wte = rng.vec(v * c, 1.0);
    let tokens = [3u32, 1, 3, 6, 0];
    let n = tokens.len();
    let w = rng.vec(n * c, 1.0);
    let mut dwte = vec![0.0; v * c];
    embedding::backward(&mut dwte, &w, &tokens, c);
    let mut out = vec![0.0; n * c];
    fd_check("embedding.wte", &wte, &dwte, 1000, |p| {
        embedding::forward(&mut out, &tokens, p, c);
        Some(dot(&w, &out))
    });
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let (n, c) = (6, 16);
    let mut rng = TestRng(2);
    let x = rng.vec(n * c, 2.0);
    let g = rng
        .vec(c, 1.0)
        .iter()
        .map(|v| 1.0 + 0.5 * v)
        .collect::<Vec<_>>();
    let w = rng.vec(n * c, 1.0);
    let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
    rmsnorm::forward(&mut out, &mut rstd, &x, &g, c, 1e-5);
    let (mut dx, mut dg) = (vec![0.0; n * c], vec![0.0; c]);
    rmsnorm::backward(&mut dx, &mut dg, &w, &x, &g, &rstd, c);
    fd_check("rmsnorm.x", &x, &dx, 1000, |p| {
        rmsnorm::forward(&mut out, &mut rstd, p, &g, c, 1e-5);
        Some(dot(&w, &out))
    });
    fd_check("rmsnorm.w", &g, &dg, 1000, |p| {
        rmsnorm::forward(&mut out, &mut rstd, &x, p, c, 1e-5);
        Some(dot(&w, &out))
    });
}

#[test]
fn rope_backward_matches_finite_differences() {
    let (b, t, c, nh) = (2, 5, 8, 2);
    let table = RopeTable::new(8, c / nh, 10_000.0);
    let mut rng = TestRng(3);
    let x = rng.vec(b * t * 3 * c, 1.0);
    let w = rng.vec(b * t * 3 * c, 1.0);
    let mut dx = w.clone();
    rope::backward(&mut dx, &table, t, c, nh);
    fd_check("rope.qkv", &x, &dx, 1000, |p| {
        let mut y = p.to_vec();
        rope::forward(&mut y, &table, t, c, nh);
        Some(dot(&w, &y))
    });
}

#[test]
fn attention_backward_matches_finite_differences() {
    let (b, t, c, nh) = (2, 5, 8, 2);
    let n = b * t;
    let mut rng = TestRng(4);
    let qkv = rng.vec(n * 3 * c, 1.5);
    let w = rng.vec(n * c, 1.0);
    let (mut out, mut att) = (vec![0.0; n * c], vec![0.0; n * nh * t]);
    attention::forward(&mut out, &mut att, &qkv, t, c, nh);
    let (mut dqkv, mut scratch) = (vec![0.0; n * 3 * c], vec![0.0; n]);
    attention::backward(&mut dqkv, &mut scratch, &w, &att, &qkv, t, c, nh);
    fd_check("attention.qkv", &qkv, &dqkv, 1000, |p| {
        attention::forward(&mut out, &mut att, p, t, c, nh);
        Some(dot(&w, &out))
    });
}

#[test]
fn linear_backward_matches_finite_differences() {
    let (n, ic, oc) = (5, 12, 7);
    let mut be = CpuBackend::new();
    let mut rng = TestRng(5);
    let x = rng.vec(n * ic, 1.0);
    let wt = rng.vec(oc * ic, 1.0);
    let w = rng.vec(n * oc, 1.0);
    let (mut dx, mut dw) = (vec![0.0; n * ic], vec![0.0; oc * ic]);
    linear::backward(
        &mut be,
        Precision::F32,
        &mut dx,
        false,
        &mut dw,
        &w,
        &x,
        &wt,
        n,
        ic,
        oc,
    )
    .unwrap();
    let mut out = vec![0.0; n * oc];
    fd_check("linear.x", &x, &dx, 1000, |p| {
        linear::forward(&mut be, Precision::F32, &mut out, p, &wt, n, ic, oc).unwrap();
        Some(dot(&w, &out))
    });
    fd_check("linear.w", &wt, &dw, 1000, |p| {
        linear::forward(&mut be, Precision::F32, &mut out, &x, p, n, ic, oc).unwrap();
        Some(dot(&w, &out))
    });
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let (n, h) = (4, 9);
    let mut rng = TestRng(6);
    let x = rng.vec(n * 2 * h, 3.0);
    let w = rng.vec(n * h, 1.0);
    let mut dx = vec![0.0; n * 2 * h];
    swiglu::backward(&mut dx, &w, &x, h);
    let mut out = vec![0.0; n * h];
    fd_check("swiglu.h13", &x, &dx, 1000, |p| {
        swiglu::forward(&mut out, p, h);
        Some(dot(&w, &out))
    });
}

#[test]
fn cross_entropy_backward_matches_finite_differences() {
    let (n, v) = (5, 11);
    let mut rng = TestRng(7);
    let logits = rng.vec(n * v, 3.0);
    let targets = [3u32, loss::IGNORE, 0, 10, 5];
    let scale = 0.37f32;
    let mut probs = logits.clone();
    let mut losses = vec![0.0; n];
    loss::forward(&mut probs, &mut losses, &targets, v);
    loss::backward(&mut probs, &targets, v, scale);
    fd_check("cross_entropy.logits", &logits, &probs, 1000, |p| {
        let mut q = p.to_vec();
        let (sum, _) = loss::forward(&mut q, &mut losses, &targets, v);
        Some(sum * scale as f64)
    });
}

/// A standalone MoE layer over its own flat parameter buffer.
struct MoeCase {
    params: Vec<f32>,
    p: MoeParams,
    present: Vec<bool>,
    bias: Vec<f32>,
    d: MoeDims,
    b: usize,
    t: usize,
    alpha: f32,
}

impl MoeCase {
    fn new(present: Vec<bool>) -> Self {
        let d = MoeDims {
            c: 8,
            e: 4,
            k: 2,
            f: 6,
            s: 5,
        };
        let mut at = 0;
        let mut span = |len: usize| {
            let s = Span { offset: at, len };
            at += len;
            s
        };
        let router = span(d.e * d.c);
        let shared = SwigluParams {
            w13: span(2 * d.s * d.c),
            w2: span(d.c * d.s),
            hidden: d.s,
        };
        let experts = present
            .iter()
            .map(|&p| {
                p.then(|| SwigluParams {
                    w13: span(2 * d.f * d.c),
                    w2: span(d.c * d.f),
                    hidden: d.f,
                })
            })
            .collect();
        let total = at;
        let mut rng = TestRng(8);
        Self {
            params: rng.vec(total, 0.8),
            p: MoeParams {
                router,
                shared,
                experts,
            },
            present,
            bias: vec![0.0, 0.05, -0.05, 0.0],
            d,
            b: 2,
            t: 4,
            alpha: 0.5,
        }
    }

    fn forward(
        &self,
        be: &mut CpuBackend,
        params: &[f32],
        x: &[f32],
        out: &mut [f32],
        acts: &mut MoeActs,
    ) -> f64 {
        let ctx = MoeContext {
            backend: be,
            precision: Precision::F32.into(),
            params,
            p: &self.p,
            present: &self.present,
            dims: self.d,
            b: self.b,
            t: self.t,
            alpha: self.alpha,
        };
        moe::forward(ctx, &self.bias, x, out, acts).unwrap()
    }
}

fn check_moe(present: Vec<bool>, label: &str) {
    let case = MoeCase::new(present);
    let (c, n) = (case.d.c, case.b * case.t);
    let mut be = CpuBackend::new();
    let mut rng = TestRng(9);
    let x = rng.vec(n * c, 1.5);
    let w = rng.vec(n * c, 1.0);
    let mut acts = MoeActs::new(case.d, n, case.b);
    let mut out = vec![0.0; n * c];
    case.forward(&mut be, &case.params, &x, &mut out, &mut acts);
    let base_sel = acts.sel[..n * acts.k_eff].to_vec();
    let mut sc = MoeScratch::new(case.d, n);
    let hmax = case.d.f.max(case.d.s);
    let (mut dact, mut dh13) = (
        vec![0.0; n * case.d.k * hmax],
        vec![0.0; n * case.d.k * 2 * hmax],
    );
    let mut grads = vec![0.0; case.params.len()];
    let mut dx = vec![0.0; n * c];
    let ctx = MoeContext {
        backend: &mut be,
        precision: Precision::F32.into(),
        params: &case.params,
        p: &case.p,
        present: &case.present,
        dims: case.d,
        b: case.b,
        t: case.t,
        alpha: case.alpha,
    };
    moe::backward(
        ctx, &mut grads, &x, &w, &mut dx, &acts, &mut sc, &mut dact, &mut dh13,
    )
    .unwrap();
    // The objective includes the balance loss with unit weight, as in the model. A perturbation that
    // changes the selection is a discontinuity, not a gradient: such coordinates are skipped (few).
    let mut objective = |params: &[f32], x: &[f32]| {
        let mut out = vec![0.0; n * c];
        let bal = case.forward(&mut be, params, x, &mut out, &mut acts);
        (acts.sel[..n * acts.k_eff] == base_sel[..]).then(|| dot(&w, &out) + bal)
    };
    fd_check(&format!("{label}.x"), &x, &dx, 1000, |p| {
        objective(&case.params, p)
    });
    fd_check(
        &format!("{label}.params"),
        &case.params,
        &grads,
        100_000,
        |p| objective(p, &x),
    );
    // The router gets gradient from the gates and from the balance loss: make sure it is checked alone too.
    let r = case.p.router;
    let router_grad = r.of(&grads).to_vec();
    let mut full = case.params.clone();
    fd_check(
        &format!("{label}.router"),
        r.of(&case.params),
        &router_grad,
        1000,
        |p| {
            r.of_mut(&mut full).copy_from_slice(p);
            objective(&full, &x)
        },
    );
}

#[test]
fn moe_backward_matches_finite_differences() {
    check_moe(vec![true; 4], "moe");
}

#[test]
fn moe_with_absent_experts_backward_matches_finite_differences() {
    check_moe(vec![true, false, true, true], "moe_subset");
}
