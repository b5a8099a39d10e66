//! Softmax cross-entropy over the vocabulary, fused llm.c style: the forward turns logits into
//! probabilities in place, the backward turns those probabilities into logit gradients in place.
//!
//! Shapes: N rows, V classes. `logits`/`probs` are [N, V], `targets` and `losses` are [N]. A target equal
//! to [`IGNORE`] marks a row without a label (the last MTP position): its loss and gradient are zero.

use rayon::prelude::*;

/// Target id meaning "this row has no label".
pub const IGNORE: u32 = u32::MAX;

/// Replaces each row of `logits` by its softmax and writes −log p[target] to `losses` (0 for ignored
/// rows). Returns the sum of the losses, in f64, and the number of labelled rows.
pub fn forward(logits: &mut [f32], losses: &mut [f64], targets: &[u32], v: usize) -> (f64, usize) {
    logits
        .par_chunks_exact_mut(v)
        .zip(losses.par_iter_mut())
        .zip(targets.par_iter())
        .for_each(|((row, loss), &tg)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let target_logit = if tg == IGNORE {
                0.0
            } else {
                (row[tg as usize] - max) as f64
            };
            let mut sum = 0.0f64;
            for x in row.iter_mut() {
                let e = (*x - max).exp();
                *x = e;
                sum += e as f64;
            }
            let inv = (1.0 / sum) as f32;
            for x in row.iter_mut() {
                *x *= inv;
            }
            // −log p = log Σ exp(logit − max) − (logit[target] − max), exact even when p underflows.
            *loss = if tg == IGNORE {
                0.0
            } else {
                sum.ln() - target_logit
            };
        });
    let total: f64 = losses.iter().sum();
    let count = targets.iter().filter(|&&t| t != IGNORE).count();
    (total, count)
}

/// dlogits = scale · (p − onehot(target)), in place over the probabilities; zero for ignored rows.
/// `scale` is d(total loss)/d(row loss), e.g. 1/N for a mean.
pub fn backward(probs: &mut [f32], targets: &[u32], v: usize, scale: f32) {
    probs
        .par_chunks_exact_mut(v)
        .zip(targets.par_iter())
        .for_each(|(row, &tg)| {
            if tg == IGNORE {
                row.fill(0.0);
                return;
            }
            for x in row.iter_mut() {
                *x *= scale;
            }
            row[tg as usize] -= scale;
        });
}
