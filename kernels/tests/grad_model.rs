//! Finite-difference check of the whole model's backward (embedding, attention, dense and MoE blocks with
//! routing, balance loss, MTP module, shared head), in f32 with losses accumulated in f64.
//!
//! The objective is the model's total loss (main + λ·MTP + balance). For every parameter tensor a dozen
//! coordinates are perturbed (its largest-gradient entries and a few spread evenly); the error of a tensor is ‖analytic − numeric‖₂ / max(‖analytic‖₂,
//! ‖numeric‖₂) over its checked coordinates.
#![allow(clippy::unwrap_used)]

mod model_support;

use mana_kernels::CpuBackend;
use mana_kernels::model::{ExpertSet, Model, ModelConfig, ShardId};
use model_support::{random_batch, tiny_config};

/// Largest accepted relative error per tensor.
const MAX_REL_ERR: f64 = 1e-3;
/// Central-difference step on a parameter: large enough that f32 rounding in the forward stays small
/// against the difference, small enough that no routing decision flips (2e-2 flips one on this config).
const H: f32 = 1e-2;
/// Coordinates checked per tensor.
const COORDS_PER_TENSOR: usize = 12;
/// Of those, how many are spread evenly over the tensor (the rest are its largest-gradient entries).
const SPREAD_COORDS: usize = 4;

fn check_model(mut model: Model, label: &str) {
    let cfg = model.config().clone();
    let batch = random_batch(11, 2, 6, cfg.vocab_size);
    model.zero_grads();
    let base = model.forward_backward(&batch).unwrap();
    assert!(base.balance_loss > 0.0 || cfg.n_layers == cfg.n_dense_layers);
    let grads = model.grads().to_vec();
    let tensors = model.layout().tensors.clone();
    let mut worst = 0.0f64;
    for t in &tensors {
        // The coordinates with the largest analytic gradients (where f32 rounding noise in the forward is
        // smallest relative to the signal), plus a few spread evenly (so small entries are looked at too).
        let mut by_size: Vec<usize> = (t.span.offset..t.span.end()).collect();
        by_size.sort_by(|&a, &b| grads[b].abs().total_cmp(&grads[a].abs()));
        let mut coords: Vec<usize> = by_size
            .into_iter()
            .take(COORDS_PER_TENSOR - SPREAD_COORDS)
            .collect();
        let stride = (t.span.len / SPREAD_COORDS).max(1);
        coords.extend(
            (t.span.offset..t.span.end())
                .step_by(stride)
                .take(SPREAD_COORDS),
        );
        coords.sort_unstable();
        coords.dedup();
        let (mut diff, mut na, mut nn) = (0.0f64, 0.0f64, 0.0f64);
        for &i in &coords {
            let x = model.params()[i];
            model.params_mut()[i] = x + H;
            let plus = model.evaluate(&batch).unwrap().total;
            model.params_mut()[i] = x - H;
            let minus = model.evaluate(&batch).unwrap().total;
            model.params_mut()[i] = x;
            let num = (plus - minus) / (2.0 * H as f64);
            let a = grads[i] as f64;
            diff += (a - num) * (a - num);
            na += a * a;
            nn += num * num;
        }
        let rel = diff.sqrt() / na.sqrt().max(nn.sqrt()).max(1e-12);
        println!(
            "{label} {:<28} rel err {rel:.2e}  |grad| {:.2e}",
            t.name,
            na.sqrt()
        );
        assert!(
            na > 0.0,
            "{label} {}: zero gradient, check is vacuous",
            t.name
        );
        worst = worst.max(rel);
    }
    println!("{label}: worst {worst:.2e}");
    assert!(
        worst < MAX_REL_ERR,
        "{label}: worst relative error {worst:.3e}"
    );
}

#[test]
fn whole_model_backward_matches_finite_differences() {
    let model = Model::new(tiny_config(), 5, Box::new(CpuBackend::new())).unwrap();
    check_model(model, "full");
}

#[test]
fn subset_model_backward_matches_finite_differences() {
    let cfg: ModelConfig = tiny_config();
    let experts = ExpertSet::from_shards(
        &cfg,
        &[
            ShardId::Expert { layer: 1, index: 0 },
            ShardId::Expert { layer: 1, index: 2 },
            ShardId::Expert { layer: 1, index: 3 },
        ],
    )
    .unwrap();
    let model = Model::with_experts(cfg, experts, 5, Box::new(CpuBackend::new())).unwrap();
    check_model(model, "subset");
}
