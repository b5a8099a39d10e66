//! A shard's full state as one deterministic blob, and the model instances built from such states.
//!
//! A shard's state is the kernels' [`ShardRecord`]: what a checkpoint manifest's `ShardEntry` hashes (the
//! parameters, the optimizer state that lives with the shard, its update count and, for the trunk, the router
//! biases). Its bytes are the kernels' shard-file format ([`mana_kernels::checkpoint::encode_shard`]: magic, version, shard id, sizes,
//! little-endian f32s, checksum), so one blob serves as a network payload, a store record and a checkpoint
//! file alike, and every holder that computes the same state writes the same bytes.
//!
//! What `opt_m` / `opt_v` hold depends on the run's update rule: in `sync` mode they are the shard's AdamW
//! moments; in `diloco` mode `opt_m` is the outer Nesterov buffer and `opt_v` stays zero (the inner AdamW
//! state is local to each participant and reset every round, see [`super::local`]). Both always have the
//! parameters' length, so the blob layout does not depend on the rule.
//!
//! Router biases ride with the trunk; they move once a round, by the trunk's holders, from the participants'
//! expert loads ([`super::balance`]).

use std::path::Path;

use mana_kernels::CpuBackend;
pub use mana_kernels::checkpoint::ShardRecord;
use mana_kernels::checkpoint::decode_shard;
use mana_kernels::model::{ExpertSet, Model, ShardId, initial_shard_params};
use mana_kernels::train::Trainer;
use mana_protocol::{ContentHash, HyperParams, UpdateRule};

use super::error::RoundError;
use super::spec::RunSpec;

/// What a run does with a [`ShardRecord`] beyond the kernels' file format: hash it as a manifest entry does,
/// and decode and check it against the run's model. (A trait, since the record is the kernels' type and the
/// hash and the run spec are not theirs.)
pub trait RunShard: Sized {
    /// blake3 of [`ShardRecord::to_bytes`]: the hash a `ShardEntry` carries.
    fn hash(&self) -> ContentHash;
    /// Decodes a blob that must hold `shard` of `spec`'s model: the header, every length and the checksum
    /// are checked before use, and non-finite values are refused, so any bad input is a typed error.
    fn from_bytes(bytes: &[u8], spec: &RunSpec, shard: ShardId) -> Result<Self, RoundError>;
    /// Checks lengths against `spec` and that every value is finite.
    fn check(&self, spec: &RunSpec) -> Result<(), RoundError>;
}

impl RunShard for ShardRecord {
    fn hash(&self) -> ContentHash {
        ContentHash::of(&self.to_bytes())
    }

    fn from_bytes(bytes: &[u8], spec: &RunSpec, shard: ShardId) -> Result<ShardRecord, RoundError> {
        let len = spec.shard_len(shard)?;
        let bias_len = spec.router_bias_len(shard);
        let label = format!("<{shard} blob>");
        let rec = decode_shard(bytes, Path::new(&label), shard, len, bias_len)?;
        rec.check(spec)?;
        Ok(rec)
    }

    fn check(&self, spec: &RunSpec) -> Result<(), RoundError> {
        let len = spec.shard_len(self.shard)?;
        let bias_len = spec.router_bias_len(self.shard);
        let parts: [(&'static str, &[f32], usize); 4] = [
            ("parameters", &self.params, len),
            ("first moments", &self.opt_m, len),
            ("second moments", &self.opt_v, len),
            ("router bias", &self.router_bias, bias_len),
        ];
        for (what, values, expected) in parts {
            if values.len() != expected {
                return Err(RoundError::WrongLength {
                    what,
                    shard: self.shard.to_string(),
                    expected,
                    got: values.len(),
                });
            }
            if values.iter().any(|v| !v.is_finite()) {
                return Err(RoundError::NonFinite {
                    what,
                    shard: self.shard.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// Every shard of the fresh model (round 0's checkpoint): parameters from `spec.init_seed`, zero optimizer
/// state, step 0, zero router biases. The trunk comes first, then the experts in (layer, index) order.
pub fn initial_shards(spec: &RunSpec) -> Result<Vec<ShardRecord>, RoundError> {
    spec.shards()
        .into_iter()
        .map(|shard| initial_shard(spec, shard))
        .collect()
}

/// One shard of the fresh model, made alone (it never builds the rest): a coordinator computes round 0's
/// checkpoint one shard at a time with it, and a node makes the round-0 shards it needs instead of fetching
/// them (the bytes are a pure function of the spec, and their hash is the manifest's).
pub fn initial_shard(spec: &RunSpec, shard: ShardId) -> Result<ShardRecord, RoundError> {
    let params = initial_shard_params(&spec.model, spec.init_seed, shard)?;
    let n = params.len();
    Ok(ShardRecord {
        shard,
        step: 0,
        params,
        opt_m: vec![0.0; n],
        opt_v: vec![0.0; n],
        router_bias: vec![0.0; spec.router_bias_len(shard)],
    })
}

/// Checks that `shards` hold the trunk exactly once and each expert at most once; returns the experts.
pub(crate) fn expert_set(spec: &RunSpec, shards: &[&ShardRecord]) -> Result<ExpertSet, RoundError> {
    let mut trunk = 0;
    let mut set = ExpertSet::none(&spec.model);
    for s in shards {
        match s.shard {
            ShardId::Trunk => trunk += 1,
            ShardId::Expert { layer, index } => {
                if set.contains(usize::from(layer), usize::from(index)) {
                    return Err(RoundError::DuplicateShard {
                        shard: s.shard.to_string(),
                    });
                }
                if !set.insert(s.shard) {
                    return Err(RoundError::UnknownShard {
                        shard: s.shard.to_string(),
                    });
                }
            }
        }
    }
    match trunk {
        0 => Err(RoundError::MissingTrunk),
        1 => Ok(set),
        _ => Err(RoundError::DuplicateShard {
            shard: ShardId::Trunk.to_string(),
        }),
    }
}

/// A [`Trainer`] holding exactly the given shards (the trunk is required, plus any experts), with their
/// parameters and router biases imported. Routing then chooses only among the held experts. In `sync` mode
/// the AdamW moments and step count are imported too (so the trainer is the checkpoint, e.g. to save it);
/// in `diloco` mode `opt_m` is the outer buffer, not an AdamW moment, so the trainer's AdamW state starts at
/// zero.
pub fn build_trainer(
    spec: &RunSpec,
    hyper: &HyperParams,
    shards: &[ShardRecord],
) -> Result<Trainer, RoundError> {
    let sync = hyper.update_rule == UpdateRule::Sync;
    build_trainer_with(spec, spec.optim_config(hyper), sync, shards)
}

/// [`build_trainer`] with an explicit optimizer config, importing the shards' `opt_m`/`opt_v` and the
/// trunk's step as AdamW state only when `import_optim`.
pub(crate) fn build_trainer_with(
    spec: &RunSpec,
    optim: mana_kernels::optim::OptimConfig,
    import_optim: bool,
    shards: &[ShardRecord],
) -> Result<Trainer, RoundError> {
    let refs: Vec<&ShardRecord> = shards.iter().collect();
    let experts = expert_set(spec, &refs)?;
    for s in shards {
        s.check(spec)?;
    }
    let model = Model::with_experts(
        spec.model.clone(),
        experts,
        spec.init_seed,
        Box::new(CpuBackend::new()),
    )?;
    let mut trainer = Trainer::from_model(model, optim, spec.init_seed)?;
    for s in shards {
        trainer.model_mut().import_shard(s.shard, &s.params)?;
        if import_optim {
            trainer.import_shard_optim(s.shard, &s.opt_m, &s.opt_v)?;
        }
        if s.shard == ShardId::Trunk {
            set_router_bias(spec, trainer.model_mut(), &s.router_bias)?;
            if import_optim {
                trainer.set_step_count(s.step);
            }
        }
    }
    Ok(trainer)
}

/// Writes the trunk's concatenated router biases into the model's MoE layers.
fn set_router_bias(spec: &RunSpec, model: &mut Model, all: &[f32]) -> Result<(), RoundError> {
    let e = spec.model.n_routed_experts;
    let mut at = 0;
    for l in (0..spec.model.n_layers).filter(|&l| spec.model.is_moe_layer(l)) {
        let part = all.get(at..at + e).ok_or_else(|| RoundError::WrongLength {
            what: "router bias",
            shard: ShardId::Trunk.to_string(),
            expected: spec.router_bias_len(ShardId::Trunk),
            got: all.len(),
        })?;
        model.set_router_bias(l, part)?;
        at += e;
    }
    Ok(())
}
