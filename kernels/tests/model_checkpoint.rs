//! Checkpoints: a save/load round trip resumes bit-identically, shard by shard, and damaged or foreign
//! files are refused with typed errors.
#![allow(clippy::unwrap_used)]

mod model_support;

use std::fs;

use mana_kernels::CpuBackend;
use mana_kernels::checkpoint::{self, CheckpointError, ShardRecord};
use mana_kernels::model::{ExpertSet, Model, ModelConfig, ShardId};
use mana_kernels::optim::OptimConfig;
use mana_kernels::train::{TrainError, Trainer};
use model_support::{counting_batch, tiny_config};

fn trained(experts: Option<&[ShardId]>) -> Trainer {
    let cfg = tiny_config();
    let set = match experts {
        Some(s) => ExpertSet::from_shards(&cfg, s).unwrap(),
        None => ExpertSet::all(&cfg),
    };
    let model = Model::with_experts(cfg, set, 3, Box::new(CpuBackend::new())).unwrap();
    let mut tr = Trainer::from_model(
        model,
        OptimConfig {
            warmup_steps: 2,
            ..OptimConfig::default()
        },
        3,
    )
    .unwrap();
    for i in 0..3 {
        tr.step(&counting_batch(i, 2, 8, 32)).unwrap();
    }
    tr
}

#[test]
fn save_then_load_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = trained(None);
    a.save(dir.path()).unwrap();
    let mut b = Trainer::load(dir.path(), Box::new(CpuBackend::new())).unwrap();
    assert_eq!(b.step_count(), 3);
    assert_eq!(a.model().params(), b.model().params());
    assert_eq!(
        a.model().router_bias(1).unwrap(),
        b.model().router_bias(1).unwrap()
    );
    for i in 10..13 {
        let batch = counting_batch(i, 2, 8, 32);
        let (sa, sb) = (a.step(&batch).unwrap(), b.step(&batch).unwrap());
        assert_eq!(sa.loss.to_bits(), sb.loss.to_bits());
        assert_eq!(sa.grad_norm.to_bits(), sb.grad_norm.to_bits());
    }
}

#[test]
fn a_subset_checkpoint_loads_only_its_experts() {
    let dir = tempfile::tempdir().unwrap();
    let subset = [ShardId::Expert { layer: 1, index: 3 }];
    trained(Some(&subset)).save(dir.path()).unwrap();
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.contains(&"expert-1-3.shard".to_string())
            && names.contains(&"trunk.shard".to_string())
    );
    assert!(!names.iter().any(|n| n.ends_with(".tmp")));
    let b = Trainer::load(dir.path(), Box::new(CpuBackend::new())).unwrap();
    assert_eq!(b.model().shards(), vec![ShardId::Trunk, subset[0]]);
    // Asking for an expert whose file is missing is an I/O error, not a panic.
    let cfg = tiny_config();
    let want = ExpertSet::from_shards(&cfg, &[ShardId::Expert { layer: 1, index: 0 }]).unwrap();
    let err = Trainer::load_with_experts(dir.path(), Box::new(CpuBackend::new()), want)
        .err()
        .unwrap();
    assert!(
        matches!(err, TrainError::Checkpoint(CheckpointError::Io { .. })),
        "{err}"
    );
}

fn load_err(dir: &std::path::Path) -> CheckpointError {
    match Trainer::load(dir, Box::new(CpuBackend::new())) {
        Err(TrainError::Checkpoint(e)) => e,
        Err(e) => panic!("expected a checkpoint error, got {e}"),
        Ok(_) => panic!("a damaged checkpoint loaded"),
    }
}

#[test]
fn damaged_files_are_refused_with_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    trained(None).save(dir.path()).unwrap();
    let trunk = dir.path().join("trunk.shard");
    let good = fs::read(&trunk).unwrap();

    let mut bytes = good.clone();
    bytes[100] ^= 0x40;
    fs::write(&trunk, &bytes).unwrap();
    assert!(matches!(
        load_err(dir.path()),
        CheckpointError::Checksum { .. }
    ));

    fs::write(&trunk, &good[..good.len() - 1]).unwrap();
    assert!(matches!(load_err(dir.path()), CheckpointError::Size { .. }));

    let mut bytes = good.clone();
    bytes[0] = b'X';
    fs::write(&trunk, &bytes).unwrap();
    assert!(matches!(
        load_err(dir.path()),
        CheckpointError::BadMagic { .. }
    ));

    let mut bytes = good.clone();
    bytes[8] = 9;
    fs::write(&trunk, &bytes).unwrap();
    assert!(matches!(
        load_err(dir.path()),
        CheckpointError::UnsupportedVersion { version: 9, .. }
    ));

    // An expert file renamed to stand in for another expert names the wrong shard in its header.
    fs::write(&trunk, &good).unwrap();
    fs::copy(
        dir.path().join("expert-1-0.shard"),
        dir.path().join("expert-1-1.shard"),
    )
    .unwrap();
    assert!(matches!(
        load_err(dir.path()),
        CheckpointError::WrongShard { .. }
    ));
    trained(None).save(dir.path()).unwrap();

    // A config that does not match the shards' sizes.
    let cfg_path = dir.path().join("config.toml");
    let cfg_text = fs::read_to_string(&cfg_path).unwrap();
    fs::write(
        &cfg_path,
        cfg_text.replace("expert_hidden = 16", "expert_hidden = 17"),
    )
    .unwrap();
    assert!(matches!(load_err(dir.path()), CheckpointError::Size { .. }));
    fs::write(&cfg_path, "d_model = \"wide\"").unwrap();
    assert!(matches!(load_err(dir.path()), CheckpointError::Text { .. }));
    fs::write(&cfg_path, "n_heads = 3").unwrap();
    assert!(matches!(load_err(dir.path()), CheckpointError::Text { .. }));
    fs::remove_file(&cfg_path).unwrap();
    assert!(matches!(load_err(dir.path()), CheckpointError::Io { .. }));
}

#[test]
fn shard_records_round_trip_and_reject_garbage() {
    let rec = ShardRecord {
        shard: ShardId::Expert { layer: 2, index: 5 },
        step: 77,
        params: vec![1.0, -2.5, f32::MIN_POSITIVE],
        opt_m: vec![0.1, 0.2, 0.3],
        opt_v: vec![1e-8, 2e-8, 3e-8],
        router_bias: vec![],
    };
    let bytes = checkpoint::encode_shard(&rec);
    let path = std::path::Path::new("mem");
    assert_eq!(
        checkpoint::decode_shard(&bytes, path, rec.shard, 3, 0).unwrap(),
        rec
    );
    assert!(checkpoint::decode_shard(&bytes, path, ShardId::Trunk, 3, 0).is_err());
    assert!(checkpoint::decode_shard(&bytes, path, rec.shard, 4, 0).is_err());
    for cut in [0, 7, 47, 48, bytes.len() - 1] {
        assert!(
            checkpoint::decode_shard(&bytes[..cut], path, rec.shard, 3, 0).is_err(),
            "cut at {cut}"
        );
    }
    // Huge declared counts are refused before any allocation.
    let mut huge = bytes.clone();
    huge[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(checkpoint::decode_shard(&huge, path, rec.shard, 3, 0).is_err());
}

#[test]
fn config_round_trips_through_toml_and_rejects_bad_values() {
    let cfg = tiny_config();
    let text = cfg.to_toml_string().unwrap();
    assert_eq!(ModelConfig::from_toml_str(&text).unwrap(), cfg);
    assert_eq!(
        ModelConfig::from_toml_str("").unwrap(),
        ModelConfig::default()
    );
    assert_eq!(
        ModelConfig::from_toml_str("precision = \"f32\"")
            .unwrap()
            .precision,
        mana_kernels::gemm::Precision::F32
    );
    for bad in [
        "d_model = 0",
        "top_k = 9",
        "n_heads = 5",
        "n_dense_layers = 9",
        "unknown_field = 1",
        "mtp_lambda = -1.0",
        "vocab_size = 1000000000",
        "d_model = 1048576\nn_heads = 1\nvocab_size = 1048576",
        "precision = \"fp4\"",
    ] {
        assert!(
            ModelConfig::from_toml_str(bad).is_err(),
            "{bad:?} was accepted"
        );
    }
}

#[test]
fn a_shards_initial_parameters_are_made_alone_exactly_as_the_whole_model_holds_them() {
    let cfg = tiny_config();
    let model = Model::new(cfg.clone(), 11, Box::new(CpuBackend::new())).unwrap();
    for shard in model.shards() {
        let alone = mana_kernels::model::initial_shard_params(&cfg, 11, shard).unwrap();
        let whole = model.export_shard(shard).unwrap();
        assert_eq!(
            alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            whole.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{shard}"
        );
    }
    // Another seed gives other values; a shard the model does not have is refused.
    let other = mana_kernels::model::initial_shard_params(&cfg, 12, ShardId::Trunk).unwrap();
    assert_ne!(other, model.export_shard(ShardId::Trunk).unwrap());
    let beyond = ShardId::Expert {
        layer: cfg.n_layers as u16,
        index: 0,
    };
    assert!(mana_kernels::model::initial_shard_params(&cfg, 11, beyond).is_err());
}
