//! Training behaviour of the model: it learns, it is deterministic, the router bias balances the load,
//! a subset of experts trains and its shards round-trip.
#![allow(clippy::unwrap_used)]

mod model_support;

use mana_kernels::CpuBackend;
use mana_kernels::model::{ExpertSet, Model, ShardId};
use mana_kernels::optim::OptimConfig;
use mana_kernels::train::Trainer;
use model_support::{counting_batch, random_batch, tiny_config};

fn optim() -> OptimConfig {
    OptimConfig {
        lr: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 5,
        total_steps: 100,
        ..OptimConfig::default()
    }
}

#[test]
fn loss_falls_on_a_learnable_sequence() {
    let mut tr = Trainer::new(tiny_config(), optim(), 7, Box::new(CpuBackend::new())).unwrap();
    let batch = counting_batch(1, 4, 8, 32);
    let first = tr.step(&batch).unwrap();
    let mut last = first.clone();
    for _ in 0..60 {
        last = tr.step(&batch).unwrap();
    }
    assert!(
        first.loss > 3.0,
        "initial loss {} should be near ln 32",
        first.loss
    );
    assert!(
        last.loss < 0.5 * first.loss,
        "loss {} -> {}",
        first.loss,
        last.loss
    );
    assert!(
        last.mtp_loss < 0.7 * first.mtp_loss,
        "mtp loss {} -> {}",
        first.mtp_loss,
        last.mtp_loss
    );
    assert_eq!(last.step, 60);
    assert_eq!(last.expert_load.len(), 1);
    let total: f32 = last.expert_load[0].iter().sum();
    assert!((total - 1.0).abs() < 1e-5);
}

#[test]
fn same_seed_gives_bit_identical_loss_trace() {
    let run = |seed| {
        let mut tr =
            Trainer::new(tiny_config(), optim(), seed, Box::new(CpuBackend::new())).unwrap();
        (0..8)
            .map(|i| tr.step(&random_batch(100 + i, 2, 8, 32)).unwrap())
            .map(|s| {
                (
                    s.loss.to_bits(),
                    s.mtp_loss.to_bits(),
                    s.grad_norm.to_bits(),
                )
            })
            .collect::<Vec<_>>()
    };
    let a = run(3);
    assert_eq!(a, run(3));
    assert_ne!(a, run(4));
}

#[test]
fn bias_update_spreads_a_skewed_load() {
    // Every token is the same byte, so every position has the same hidden state and, without the bias,
    // the same two experts would take all the load forever. Parameters stay fixed (lr = 0) so only the
    // bias rule acts.
    let mut cfg = tiny_config();
    cfg.bias_gamma = 0.01;
    let frozen = OptimConfig {
        lr: 0.0,
        min_lr: 0.0,
        ..optim()
    };
    let mut tr = Trainer::new(cfg, frozen, 1, Box::new(CpuBackend::new())).unwrap();
    let batch = mana_kernels::data::Batch {
        tokens: vec![7; 4 * 9],
        batch_size: 4,
        seq_len: 8,
    };
    let first = tr.step(&batch).unwrap().expert_load[0].clone();
    let max_first = first.iter().copied().fold(0.0, f32::max);
    assert!(
        (max_first - 0.5).abs() < 1e-6,
        "a single input should load two experts fully: {first:?}"
    );
    let mut window = [0.0f32; 4];
    for i in 0..200 {
        let load = tr.step(&batch).unwrap().expert_load[0].clone();
        if i >= 100 {
            for (w, l) in window.iter_mut().zip(&load) {
                *w += l / 100.0;
            }
        }
    }
    for (i, &w) in window.iter().enumerate() {
        assert!(
            (w - 0.25).abs() < 0.08,
            "expert {i} took {w:.3} of the load over the last 100 steps: {window:?}"
        );
    }
    assert!(tr.model().router_bias(1).unwrap().iter().any(|&b| b != 0.0));
}

fn subset() -> Vec<ShardId> {
    vec![
        ShardId::Expert { layer: 1, index: 0 },
        ShardId::Expert { layer: 1, index: 2 },
    ]
}

#[test]
fn subset_model_trains_and_routes_only_to_present_experts() {
    let cfg = tiny_config();
    let experts = ExpertSet::from_shards(&cfg, &subset()).unwrap();
    let model = Model::with_experts(cfg, experts, 7, Box::new(CpuBackend::new())).unwrap();
    let mut expected = vec![ShardId::Trunk];
    expected.extend(subset());
    assert_eq!(model.shards(), expected);
    let mut tr = Trainer::from_model(model, optim(), 7).unwrap();
    let batch = counting_batch(1, 4, 8, 32);
    let first = tr.step(&batch).unwrap();
    let mut last = first.clone();
    for _ in 0..60 {
        last = tr.step(&batch).unwrap();
        let load = &last.expert_load[0];
        assert_eq!(load[1], 0.0);
        assert_eq!(load[3], 0.0);
        assert!(
            (load[0] - 0.5).abs() < 1e-6 && (load[2] - 0.5).abs() < 1e-6,
            "top-2 of 2 present: {load:?}"
        );
    }
    assert!(
        last.loss < 0.5 * first.loss,
        "loss {} -> {}",
        first.loss,
        last.loss
    );
}

#[test]
fn shards_agree_across_instances_and_round_trip_losslessly() {
    let cfg = tiny_config();
    let full = Model::new(cfg.clone(), 9, Box::new(CpuBackend::new())).unwrap();
    let experts = ExpertSet::from_shards(&cfg, &subset()).unwrap();
    let mut part =
        Model::with_experts(cfg.clone(), experts.clone(), 9, Box::new(CpuBackend::new())).unwrap();
    // Same seed: the instances agree on every shard they share, whatever else they hold.
    for shard in part.shards() {
        assert_eq!(
            full.export_shard(shard).unwrap(),
            part.export_shard(shard).unwrap(),
            "{shard}"
        );
        assert_eq!(
            part.shard_bytes(shard).unwrap(),
            4 * part.shard_len(shard).unwrap()
        );
    }
    assert!(
        part.export_shard(ShardId::Expert { layer: 1, index: 1 })
            .is_err()
    );
    assert!(part.import_shard(ShardId::Trunk, &[0.0; 3]).is_err());

    // Train the partial model a little, then move all of its state into a differently seeded instance.
    let unclipped = OptimConfig {
        grad_clip: 0.0,
        ..optim()
    };
    let mut tr = Trainer::from_model(part, unclipped.clone(), 9).unwrap();
    let batch = counting_batch(2, 2, 8, 32);
    for _ in 0..3 {
        tr.step(&batch).unwrap();
    }
    tr.model_mut().zero_grads();
    tr.accumulate(&batch).unwrap();
    let other = Model::with_experts(cfg, experts, 1234, Box::new(CpuBackend::new())).unwrap();
    let mut tr2 = Trainer::from_model(other, unclipped, 1234).unwrap();
    for shard in tr.model().shards() {
        let p = tr.model().export_shard(shard).unwrap();
        let g = tr.model().export_shard_grad(shard).unwrap();
        let (m, v) = tr.export_shard_optim(shard).unwrap();
        tr2.model_mut().import_shard(shard, &p).unwrap();
        tr2.model_mut().import_shard_grad(shard, &g).unwrap();
        tr2.import_shard_optim(shard, &m, &v).unwrap();
        assert_eq!(tr2.model().export_shard(shard).unwrap(), p);
        assert_eq!(tr2.model().export_shard_grad(shard).unwrap(), g);
        assert_eq!(tr2.export_shard_optim(shard).unwrap(), (m, v));
    }
    tr2.model_mut()
        .set_router_bias(1, tr.model().router_bias(1).unwrap())
        .unwrap();
    tr2.set_step_count(tr.step_count());
    assert_eq!(tr.model().params(), tr2.model().params());
    // Same state, same update: apply AdamW shard by shard on one, all at once on the other.
    let step = tr.step_count();
    for shard in tr2.model().shards() {
        tr2.apply_shard_update(shard, step).unwrap();
    }
    tr.apply_update().unwrap();
    assert_eq!(tr.model().params(), tr2.model().params());
}

#[test]
fn bad_batches_and_buffers_are_typed_errors() {
    use mana_kernels::data::Batch;
    use mana_kernels::model::ModelError;
    let mut model = Model::new(tiny_config(), 1, Box::new(CpuBackend::new())).unwrap();
    let bad = [
        Batch {
            tokens: vec![1; 9],
            batch_size: 1,
            seq_len: 9,
        },
        Batch {
            tokens: vec![1; 8],
            batch_size: 1,
            seq_len: 8,
        },
        Batch {
            tokens: vec![],
            batch_size: 0,
            seq_len: 8,
        },
        Batch {
            tokens: vec![1; 100],
            batch_size: usize::MAX / 2,
            seq_len: 8,
        },
    ];
    for b in &bad {
        assert!(
            matches!(
                model.forward_backward(b),
                Err(ModelError::BatchShape { .. } | ModelError::SequenceTooLong { .. })
            ),
            "{b:?}"
        );
    }
    let oov = Batch {
        tokens: vec![32; 9],
        batch_size: 1,
        seq_len: 8,
    };
    assert!(matches!(
        model.evaluate(&oov),
        Err(ModelError::TokenOutOfRange {
            token: 32,
            vocab: 32
        })
    ));
    let mut out = vec![0.0; 3 * 32];
    assert!(matches!(
        model.logits(&[1, 2, 3], &mut out[..10], None),
        Err(ModelError::Length { .. })
    ));
    assert!(matches!(
        model.logits(&[1; 9], &mut vec![0.0; 9 * 32], None),
        Err(ModelError::SequenceTooLong { .. })
    ));
    assert!(matches!(
        model.logits(&[], &mut [], None),
        Err(ModelError::BatchShape { .. })
    ));
    model.logits(&[1, 2, 3], &mut out, None).unwrap();
    assert!(out.iter().all(|x| x.is_finite()));
    assert!(matches!(
        model.router_bias(0),
        Err(ModelError::NotMoeLayer(0))
    ));
    assert!(matches!(
        model.set_router_bias(1, &[0.0; 3]),
        Err(ModelError::Length { .. })
    ));
}

#[test]
fn logits_match_the_training_forward() {
    // The inference path and the training path compute the same function: the loss recomputed from
    // `logits` equals `evaluate`'s.
    let mut model = Model::new(tiny_config(), 2, Box::new(CpuBackend::new())).unwrap();
    let batch = random_batch(4, 1, 8, 32);
    let eval = model.evaluate(&batch).unwrap();
    let mut main = vec![0.0f32; 8 * 32];
    let mut mtp = vec![0.0f32; 8 * 32];
    model
        .logits(&batch.tokens[..8], &mut main, Some(&mut mtp))
        .unwrap();
    let ce = |logits: &[f32], target: u32| {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = logits
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        lse - logits[target as usize] as f64
    };
    let main_loss: f64 = (0..8)
        .map(|t| ce(&main[t * 32..(t + 1) * 32], batch.tokens[t + 1]))
        .sum::<f64>()
        / 8.0;
    let mtp_loss: f64 = (0..7)
        .map(|t| ce(&mtp[t * 32..(t + 1) * 32], batch.tokens[t + 2]))
        .sum::<f64>()
        / 7.0;
    assert!(
        (main_loss - eval.loss as f64).abs() < 1e-5,
        "{main_loss} vs {}",
        eval.loss
    );
    assert!(
        (mtp_loss - eval.mtp_loss as f64).abs() < 1e-5,
        "{mtp_loss} vs {}",
        eval.mtp_loss
    );
}
