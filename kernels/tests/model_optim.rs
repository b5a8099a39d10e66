//! AdamW, clipping and the learning-rate schedule against values computed by hand.
#![allow(clippy::unwrap_used)]

mod model_support;

use mana_kernels::CpuBackend;
use mana_kernels::model::Model;
use mana_kernels::optim::{self, AdamW, OptimConfig};
use model_support::tiny_config;

#[test]
fn schedule_warms_up_linearly_then_follows_a_cosine() {
    let c = OptimConfig {
        lr: 1.0,
        min_lr: 0.1,
        warmup_steps: 10,
        total_steps: 110,
        ..OptimConfig::default()
    };
    assert!((c.lr_at(0) - 0.1).abs() < 1e-6);
    assert!((c.lr_at(9) - 1.0).abs() < 1e-6);
    assert!((c.lr_at(10) - 1.0).abs() < 1e-6);
    assert!((c.lr_at(60) - 0.55).abs() < 1e-6, "{}", c.lr_at(60));
    assert!((c.lr_at(110) - 0.1).abs() < 1e-6);
    assert!((c.lr_at(10_000) - 0.1).abs() < 1e-6);
    let mut prev = f32::INFINITY;
    for s in 10..=110 {
        assert!(c.lr_at(s) <= prev);
        prev = c.lr_at(s);
    }
}

#[test]
fn adamw_matches_the_formula_and_skips_decay_on_gains() {
    let model = Model::new(tiny_config(), 1, Box::new(CpuBackend::new())).unwrap();
    let layout = model.layout();
    let cfg = OptimConfig {
        weight_decay: 0.5,
        ..OptimConfig::default()
    };
    let mut adam = AdamW::new(layout);
    let mut params = model.params().to_vec();
    let grads: Vec<f32> = (0..params.len())
        .map(|i| ((i % 7) as f32 - 3.0) * 0.01)
        .collect();
    let before = params.clone();
    let lr = 0.01;
    adam.update(&cfg, &mut params, &grads, lr, 1);
    adam.update(&cfg, &mut params, &grads, lr, 2);
    // Reference: two steps of the textbook update, in f64.
    for t in &layout.tensors {
        let wd = if t.shape.len() >= 2 { 0.5 } else { 0.0 };
        assert_eq!(t.decay, wd > 0.0, "{}", t.name);
        for i in [t.span.offset, t.span.end() - 1] {
            let (mut p, g) = (before[i] as f64, grads[i] as f64);
            let (mut m, mut v) = (0.0f64, 0.0f64);
            for step in 1..=2 {
                m = 0.9 * m + 0.1 * g;
                v = 0.95 * v + 0.05 * g * g;
                let mh = m / (1.0 - 0.9f64.powi(step));
                let vh = v / (1.0 - 0.95f64.powi(step));
                p -= lr as f64 * (mh / (vh.sqrt() + 1e-8) + wd * p);
            }
            assert!(
                (p - params[i] as f64).abs() < 1e-6,
                "{} [{i}]: {p} vs {}",
                t.name,
                params[i]
            );
        }
    }
}

#[test]
fn clipping_caps_the_global_norm() {
    let mut g = vec![3.0f32, 4.0];
    assert_eq!(optim::clip_grad_norm(&mut g, 0.0), 5.0);
    assert_eq!(g, vec![3.0, 4.0]);
    assert_eq!(optim::clip_grad_norm(&mut g, 1.0), 5.0);
    assert!((optim::grad_norm(&g) - 1.0).abs() < 1e-5);
    assert!(
        OptimConfig {
            beta1: 1.0,
            ..OptimConfig::default()
        }
        .validate()
        .is_err()
    );
    assert!(
        OptimConfig {
            lr: f32::NAN,
            ..OptimConfig::default()
        }
        .validate()
        .is_err()
    );
}
