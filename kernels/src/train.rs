//! The trainer: a model, its AdamW state and the step counter. One [`Trainer::step`] is forward, backward,
//! gradient clipping, AdamW and the router-bias update; the pieces are also public separately
//! ([`Trainer::accumulate`], [`Trainer::apply_update`]) so that a caller can accumulate several
//! micro-batches, exchange per-shard gradients, and then step.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::checkpoint::{self, CheckpointError, ShardRecord};
use crate::data::Batch;
use crate::model::{ExpertSet, LossStats, Model, ModelConfig, ModelError, ShardId};
use crate::optim::{self, AdamW, OptimConfig, OptimConfigError};

/// Why a training operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The model refused (bad config, bad batch, unknown shard, kernel error).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The optimizer config is invalid.
    #[error(transparent)]
    Optim(#[from] OptimConfigError),
    /// The loss or the gradient norm is NaN or infinite; the parameters were left untouched.
    #[error("step {step}: non-finite {what}; parameters not updated")]
    NonFinite {
        /// The step that failed.
        step: u64,
        /// "loss" or "gradient norm".
        what: &'static str,
    },
    /// Reading or writing a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// What one training step did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepStats {
    /// The step's index (0-based; the number of steps taken before it).
    pub step: u64,
    /// Mean next-token cross-entropy.
    pub loss: f32,
    /// Mean MTP cross-entropy (token t + 2).
    pub mtp_loss: f32,
    /// α-weighted balance loss, summed over MoE layers.
    pub balance_loss: f32,
    /// Learning rate used.
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Tokens trained on (B·T).
    pub tokens: usize,
    /// Per MoE layer: the fraction of routed slots each expert received in this step.
    pub expert_load: Vec<Vec<f32>>,
}

/// Losses on a held-out batch.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalStats {
    /// Mean next-token cross-entropy.
    pub loss: f32,
    /// Mean MTP cross-entropy.
    pub mtp_loss: f32,
    /// Tokens evaluated.
    pub tokens: usize,
}

/// `trainer.toml` in a checkpoint directory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct TrainerFile {
    step: u64,
    seed: u64,
    optim: OptimConfig,
}

/// Model + AdamW moments + step counter.
pub struct Trainer {
    model: Model,
    optim: OptimConfig,
    adam: AdamW,
    step: u64,
    seed: u64,
}

impl Trainer {
    /// A fresh model holding every expert, initialized from `seed`.
    pub fn new(
        model: ModelConfig,
        optim: OptimConfig,
        seed: u64,
        backend: Box<dyn Backend>,
    ) -> Result<Self, TrainError> {
        Self::from_model(Model::new(model, seed, backend)?, optim, seed)
    }

    /// Wraps an existing model (e.g. one holding a subset of the experts) with zeroed AdamW state.
    pub fn from_model(model: Model, optim: OptimConfig, seed: u64) -> Result<Self, TrainError> {
        optim.validate()?;
        let adam = AdamW::new(model.layout());
        Ok(Self {
            model,
            optim,
            adam,
            step: 0,
            seed,
        })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model, mutably.
    pub fn model_mut(&mut self) -> &mut Model {
        &mut self.model
    }

    /// The optimizer config.
    pub fn optim_config(&self) -> &OptimConfig {
        &self.optim
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The seed the model was initialized from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// One full training step on `batch`: zero gradients, forward + backward, clip, AdamW, router bias.
    pub fn step(&mut self, batch: &Batch) -> Result<StepStats, TrainError> {
        self.model.zero_grads();
        let loss = self.accumulate(batch)?;
        let (lr, grad_norm) = self.apply_update()?;
        let expert_load = self.model.update_router_bias();
        Ok(StepStats {
            step: self.step - 1,
            loss: loss.loss,
            mtp_loss: loss.mtp_loss,
            balance_loss: loss.balance_loss,
            lr,
            grad_norm,
            tokens: loss.tokens,
            expert_load,
        })
    }

    /// Forward + backward on `batch`, ADDING into the gradients (no zeroing, no update).
    pub fn accumulate(&mut self, batch: &Batch) -> Result<LossStats, TrainError> {
        let stats = self.model.forward_backward(batch)?;
        if !stats.total.is_finite() {
            self.model.zero_grads();
            return Err(TrainError::NonFinite {
                step: self.step,
                what: "loss",
            });
        }
        Ok(stats)
    }

    /// Clips the accumulated gradients and applies AdamW to every held shard at the scheduled learning
    /// rate; advances the step counter. Returns (lr, gradient norm before clipping). The router bias is
    /// not touched (see [`Model::update_router_bias`]).
    pub fn apply_update(&mut self) -> Result<(f32, f32), TrainError> {
        let clip = self.optim.grad_clip;
        let norm = optim::clip_grad_norm(self.model.grads_mut(), clip);
        if !norm.is_finite() {
            self.model.zero_grads();
            return Err(TrainError::NonFinite {
                step: self.step,
                what: "gradient norm",
            });
        }
        let lr = self.optim.lr_at(self.step);
        let step = self.step + 1;
        let (params, grads) = self.model.params_and_grads_mut();
        self.adam.update(&self.optim, params, grads, lr, step);
        self.step = step;
        Ok((lr, norm))
    }

    /// Applies AdamW to one shard only, from the gradient currently in the model (e.g. imported with
    /// [`Model::import_shard_grad`]), at the learning rate of step `step` (0-based). No clipping: the
    /// caller decides on a global norm it alone can see. Does not advance the step counter.
    pub fn apply_shard_update(&mut self, shard: ShardId, step: u64) -> Result<f32, TrainError> {
        let span = self.model.shard_span(shard)?;
        let lr = self.optim.lr_at(step);
        let (params, grads) = self.model.params_and_grads_mut();
        self.adam
            .update_span(&self.optim, span, params, grads, lr, step + 1);
        Ok(lr)
    }

    /// Sets the step counter (after shard-wise updates driven from outside).
    pub fn set_step_count(&mut self, step: u64) {
        self.step = step;
    }

    /// Losses on `batch` without touching gradients, parameters or expert loads.
    pub fn evaluate(&mut self, batch: &Batch) -> Result<EvalStats, TrainError> {
        let s = self.model.evaluate(batch)?;
        Ok(EvalStats {
            loss: s.loss,
            mtp_loss: s.mtp_loss,
            tokens: s.tokens,
        })
    }

    /// A shard's AdamW moments (m, v).
    pub fn export_shard_optim(&self, shard: ShardId) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
        let span = self.model.shard_span(shard)?;
        Ok((
            span.of(&self.adam.m).to_vec(),
            span.of(&self.adam.v).to_vec(),
        ))
    }

    /// Overwrites a shard's AdamW moments.
    pub fn import_shard_optim(
        &mut self,
        shard: ShardId,
        m: &[f32],
        v: &[f32],
    ) -> Result<(), TrainError> {
        let span = self.model.shard_span(shard)?;
        for (what, x) in [("adam m", m), ("adam v", v)] {
            if x.len() != span.len {
                return Err(ModelError::Length {
                    what: format!("{what} of {shard}"),
                    expected: span.len,
                    actual: x.len(),
                }
                .into());
            }
        }
        span.of_mut(&mut self.adam.m).copy_from_slice(m);
        span.of_mut(&mut self.adam.v).copy_from_slice(v);
        Ok(())
    }

    fn all_router_bias(&self) -> Vec<f32> {
        let cfg = self.model.config();
        (0..cfg.n_layers)
            .filter_map(|l| self.model.router_bias(l).ok())
            .flatten()
            .copied()
            .collect()
    }

    fn set_all_router_bias(&mut self, all: &[f32]) -> Result<(), TrainError> {
        let cfg = self.model.config().clone();
        let e = cfg.n_routed_experts;
        let mut at = 0;
        for l in (0..cfg.n_layers).filter(|&l| cfg.is_moe_layer(l)) {
            self.model.set_router_bias(l, &all[at..at + e])?;
            at += e;
        }
        Ok(())
    }

    /// Writes a checkpoint directory: config.toml, trainer.toml and one file per held shard.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let text_err = |path: &Path, e: String| CheckpointError::Text {
            path: path.to_path_buf(),
            reason: e,
        };
        let cfg_path = dir.join("config.toml");
        let cfg_text = self
            .model
            .config()
            .to_toml_string()
            .map_err(|e| text_err(&cfg_path, e.to_string()))?;
        checkpoint::write_atomic(&cfg_path, cfg_text.as_bytes())?;
        let tr_path = dir.join("trainer.toml");
        let tr = TrainerFile {
            step: self.step,
            seed: self.seed,
            optim: self.optim.clone(),
        };
        let tr_text = toml::to_string(&tr).map_err(|e| text_err(&tr_path, e.to_string()))?;
        checkpoint::write_atomic(&tr_path, tr_text.as_bytes())?;
        for shard in self.model.shards() {
            let (opt_m, opt_v) = self.export_shard_optim(shard)?;
            let rec = ShardRecord {
                shard,
                step: self.step,
                params: self.model.export_shard(shard)?,
                opt_m,
                opt_v,
                router_bias: if shard == ShardId::Trunk {
                    self.all_router_bias()
                } else {
                    Vec::new()
                },
            };
            checkpoint::write_shard(&dir.join(checkpoint::shard_file_name(shard)), &rec)?;
        }
        Ok(())
    }

    /// Loads a checkpoint directory, holding exactly the experts whose files are present.
    pub fn load(dir: &Path, backend: Box<dyn Backend>) -> Result<Self, TrainError> {
        Self::load_inner(dir, backend, None)
    }

    /// Loads a checkpoint directory but holds only the experts in `experts` (each must have its file).
    pub fn load_with_experts(
        dir: &Path,
        backend: Box<dyn Backend>,
        experts: ExpertSet,
    ) -> Result<Self, TrainError> {
        Self::load_inner(dir, backend, Some(experts))
    }

    fn load_inner(
        dir: &Path,
        backend: Box<dyn Backend>,
        experts: Option<ExpertSet>,
    ) -> Result<Self, TrainError> {
        let cfg_path = dir.join("config.toml");
        let config =
            ModelConfig::from_toml_str(&checkpoint::read_text(&cfg_path)?).map_err(|e| {
                CheckpointError::Text {
                    path: cfg_path.clone(),
                    reason: e.to_string(),
                }
            })?;
        let tr_path = dir.join("trainer.toml");
        let tr: TrainerFile = toml::from_str(&checkpoint::read_text(&tr_path)?).map_err(|e| {
            CheckpointError::Text {
                path: tr_path.clone(),
                reason: e.to_string(),
            }
        })?;
        let experts = match experts {
            Some(set) => set,
            None => {
                let mut set = ExpertSet::none(&config);
                for l in (0..config.n_layers).filter(|&l| config.is_moe_layer(l)) {
                    for i in 0..config.n_routed_experts {
                        let Ok(shard) = ShardId::expert(l, i) else {
                            continue;
                        };
                        if dir.join(checkpoint::shard_file_name(shard)).is_file() {
                            set.insert(shard);
                        }
                    }
                }
                set
            }
        };
        let model = Model::with_experts(config.clone(), experts, tr.seed, backend)?;
        let mut trainer = Self::from_model(model, tr.optim, tr.seed)?;
        trainer.step = tr.step;
        let n_bias = (0..config.n_layers)
            .filter(|&l| config.is_moe_layer(l))
            .count()
            * config.n_routed_experts;
        for shard in trainer.model.shards() {
            let len = trainer.model.shard_len(shard)?;
            let bias_len = if shard == ShardId::Trunk { n_bias } else { 0 };
            let path = dir.join(checkpoint::shard_file_name(shard));
            let rec = checkpoint::read_shard(&path, shard, len, bias_len)?;
            trainer.model.import_shard(shard, &rec.params)?;
            trainer.import_shard_optim(shard, &rec.opt_m, &rec.opt_v)?;
            if shard == ShardId::Trunk {
                trainer.set_all_router_bias(&rec.router_bias)?;
            }
        }
        Ok(trainer)
    }
}
