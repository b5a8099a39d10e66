//! FP8 against f32: the same model and tokens, with the Linear GEMMs in FP8 (1×128 / 128×128 scaling)
//! and then in f32. Bounds on the forward's relative error, and FP8 training still learns.
#![allow(clippy::unwrap_used)]

mod model_support;

use mana_kernels::CpuBackend;
use mana_kernels::gemm::Precision;
use mana_kernels::model::{Model, ModelConfig};
use mana_kernels::optim::OptimConfig;
use mana_kernels::train::Trainer;
use model_support::{counting_batch, random_batch, tiny_config};

/// Largest accepted ‖logits_fp8 − logits_f32‖ / ‖logits_f32‖ at initialization for an all-dense model
/// (measured 8.6e-2 main, 6.7e-2 MTP: each FP8 Linear is off by about 4%, and attention, SwiGLU and the
/// chain of layers compound it).
const MAX_DENSE_LOGITS_REL_ERR: f64 = 0.15;
/// The same with MoE layers (measured 0.12 main, 0.22 MTP): near-tied affinities at initialization let FP8
/// noise flip some routing decisions, which moves whole token outputs.
const MAX_MOE_LOGITS_REL_ERR: f64 = 0.35;
/// Largest accepted |loss_fp8 − loss_f32| / loss_f32 at initialization (measured 1.8e-4 dense, 2.4e-4
/// MoE; DeepSeek-V3 reports below 2.5e-3 against BF16 over training).
const MAX_LOSS_REL_ERR: f64 = 2e-3;

/// A config with 128-wide GEMM inputs, so the 1×128 and 128×128 tiles are full.
fn fp8_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 256,
        d_model: 128,
        n_layers: 2,
        n_heads: 4,
        n_dense_layers: 1,
        dense_hidden: 256,
        n_routed_experts: 4,
        top_k: 2,
        expert_hidden: 128,
        shared_hidden: 128,
        context: 32,
        init_std: 0.05,
        precision: Precision::Fp8,
        ..ModelConfig::default()
    }
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n).sqrt()
}

/// Runs the same model and tokens in FP8 then f32; returns the relative errors of the main logits, the
/// MTP logits and the loss.
fn fp8_vs_f32(cfg: ModelConfig) -> (f64, f64, f64) {
    let v = cfg.vocab_size;
    let mut model = Model::new(cfg, 21, Box::new(CpuBackend::new())).unwrap();
    let batch = random_batch(5, 1, 32, v);
    let tokens = &batch.tokens[..32];
    let (mut main8, mut mtp8) = (vec![0.0; 32 * v], vec![0.0; 32 * v]);
    model.logits(tokens, &mut main8, Some(&mut mtp8)).unwrap();
    let loss8 = model.evaluate(&batch).unwrap();
    model.set_precision(Precision::F32);
    let (mut main32, mut mtp32) = (vec![0.0; 32 * v], vec![0.0; 32 * v]);
    model.logits(tokens, &mut main32, Some(&mut mtp32)).unwrap();
    let loss32 = model.evaluate(&batch).unwrap();
    let (r_main, r_mtp) = (rel(&main8, &main32), rel(&mtp8, &mtp32));
    let r_loss = ((loss8.loss - loss32.loss) / loss32.loss).abs() as f64;
    println!(
        "fp8 vs f32: main logits {r_main:.3e}, mtp logits {r_mtp:.3e}, loss {} vs {} ({r_loss:.3e})",
        loss8.loss, loss32.loss
    );
    assert!(
        r_main > 0.0,
        "FP8 and f32 gave identical logits: the FP8 path did not run"
    );
    (r_main, r_mtp, r_loss)
}

#[test]
fn fp8_forward_of_a_dense_model_stays_close_to_f32() {
    let (r_main, r_mtp, r_loss) = fp8_vs_f32(ModelConfig {
        n_dense_layers: 2,
        ..fp8_config()
    });
    assert!(r_main < MAX_DENSE_LOGITS_REL_ERR && r_mtp < MAX_DENSE_LOGITS_REL_ERR);
    assert!(r_loss < MAX_LOSS_REL_ERR);
}

#[test]
fn fp8_forward_of_a_moe_model_stays_close_to_f32() {
    let (r_main, r_mtp, r_loss) = fp8_vs_f32(fp8_config());
    assert!(r_main < MAX_MOE_LOGITS_REL_ERR && r_mtp < MAX_MOE_LOGITS_REL_ERR);
    assert!(r_loss < MAX_LOSS_REL_ERR);
}

#[test]
fn fp8_training_learns_like_f32() {
    let run = |precision| {
        let cfg = ModelConfig {
            precision,
            ..tiny_config()
        };
        let optim = OptimConfig {
            lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 5,
            total_steps: 100,
            ..OptimConfig::default()
        };
        let mut tr = Trainer::new(cfg, optim, 7, Box::new(CpuBackend::new())).unwrap();
        let batch = counting_batch(1, 4, 8, 32);
        (0..40)
            .map(|_| tr.step(&batch).unwrap().loss)
            .last()
            .unwrap()
    };
    let (l8, l32) = (run(Precision::Fp8), run(Precision::F32));
    println!("loss after 40 steps: fp8 {l8}, f32 {l32}");
    assert!(l8 < 1.5, "FP8 training did not learn: {l8}");
    assert!(
        (l8 - l32).abs() < 0.25 * l32.max(0.2),
        "fp8 {l8} vs f32 {l32}"
    );
}

#[test]
fn fp8_linear_error_is_a_few_percent() {
    let (n, ic, oc) = (64, 256, 384);
    let mut rng = model_support::TestRng(3);
    let x: Vec<f32> = (0..n * ic).map(|_| rng.normal()).collect();
    let w: Vec<f32> = (0..oc * ic).map(|_| rng.normal() * 0.05).collect();
    let mut be = CpuBackend::new();
    let (mut y8, mut y32) = (vec![0.0; n * oc], vec![0.0; n * oc]);
    mana_kernels::model::linear::forward(&mut be, Precision::Fp8, &mut y8, &x, &w, n, ic, oc)
        .unwrap();
    mana_kernels::model::linear::forward(&mut be, Precision::F32, &mut y32, &x, &w, n, ic, oc)
        .unwrap();
    let r = rel(&y8, &y32);
    println!("fp8 linear rel err {r:.3e}");
    assert!(r < MAX_LINEAR_REL_ERR && r > 0.0);
}

/// Largest accepted relative error of one FP8 Linear against f32 on Gaussian data. Each E4M3 operand
/// carries a relative rounding error of at most 2⁻⁴ (RMS about 3.6%); the two operands' errors add in
/// quadrature to about 5% per product, and a dot product of independent terms keeps that ratio.
const MAX_LINEAR_REL_ERR: f64 = 0.06;
