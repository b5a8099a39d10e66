//! Output head: RMSNorm, then logits = x·W_headᵀ in f32, then softmax cross-entropy. The main model and
//! the MTP module each own a final norm and share the head matrix.
//!
//! Shapes: N tokens, C width, V vocabulary. `x`, `dx` [N, C]; `ln` [N, C], `rstd` [N]; `logits` [N, V]
//! (probabilities after a training forward, logit gradients after the backward); `losses` [N].

use crate::backend::Backend;
use crate::error::KernelError;
use crate::gemm::Precision;

use super::params::Span;
use super::{linear, loss, rmsnorm};

/// Activations of one head.
#[derive(Clone, Debug)]
pub struct HeadActs {
    /// [N, C] normalized input.
    pub ln: Vec<f32>,
    /// [N].
    pub rstd: Vec<f32>,
    /// [N, V] logits, replaced by probabilities when a loss is computed.
    pub logits: Vec<f32>,
    /// [N] per-token losses (f64 so that finite-difference checks see the model, not the rounding).
    pub losses: Vec<f64>,
}

impl HeadActs {
    /// Buffers for up to `n` tokens.
    pub fn new(n: usize, c: usize, v: usize) -> Self {
        Self {
            ln: vec![0.0; n * c],
            rstd: vec![0.0; n],
            logits: vec![0.0; n * v],
            losses: vec![0.0; n],
        }
    }
}

/// Where a head's parameters are and how big it is.
#[derive(Clone, Copy, Debug)]
pub struct HeadSpec {
    /// Final norm gain [C].
    pub norm: Span,
    /// Head matrix [V, C].
    pub head: Span,
    /// C.
    pub c: usize,
    /// V.
    pub v: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
}

/// Computes logits of `x` [N, C]; with `targets`, turns them into probabilities and returns (Σ loss,
/// labelled rows).
pub fn forward(
    backend: &mut dyn Backend,
    params: &[f32],
    h: HeadSpec,
    x: &[f32],
    targets: Option<&[u32]>,
    acts: &mut HeadActs,
    n: usize,
) -> Result<(f64, usize), KernelError> {
    let (c, v) = (h.c, h.v);
    let ln = &mut acts.ln[..n * c];
    rmsnorm::forward(ln, &mut acts.rstd[..n], x, h.norm.of(params), c, h.eps);
    let logits = &mut acts.logits[..n * v];
    linear::forward(
        backend,
        Precision::F32,
        logits,
        ln,
        h.head.of(params),
        n,
        c,
        v,
    )?;
    Ok(match targets {
        Some(tg) => loss::forward(logits, &mut acts.losses[..n], tg, v),
        None => (0.0, 0),
    })
}

/// Backward from the loss: logit gradients = `scale`·(p − onehot), head and norm gradients accumulate, and
/// the input gradient is ADDED to `dx`. `dln` [N, C] is scratch. Consumes the probabilities in `acts`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    backend: &mut dyn Backend,
    params: &[f32],
    grads: &mut [f32],
    h: HeadSpec,
    x: &[f32],
    targets: &[u32],
    scale: f32,
    acts: &mut HeadActs,
    dx: &mut [f32],
    dln: &mut [f32],
    n: usize,
) -> Result<(), KernelError> {
    let (c, v) = (h.c, h.v);
    let dlogits = &mut acts.logits[..n * v];
    loss::backward(dlogits, targets, v, scale);
    let dln = &mut dln[..n * c];
    let ln = &acts.ln[..n * c];
    linear::backward(
        backend,
        Precision::F32,
        dln,
        false,
        h.head.of_mut(grads),
        dlogits,
        ln,
        h.head.of(params),
        n,
        c,
        v,
    )?;
    rmsnorm::backward(
        &mut dx[..n * c],
        h.norm.of_mut(grads),
        dln,
        x,
        h.norm.of(params),
        &acts.rstd[..n],
        c,
    );
    Ok(())
}
