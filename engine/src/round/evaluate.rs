//! The validation loss of a whole checkpoint: the figure an evaluator (a node that mirrors every committed
//! checkpoint) publishes in an [`mana_protocol::Evaluation`], so that metrics which need the whole model
//! come from whoever holds it, not from the coordinator. Deterministic: the same shards, text and batch count
//! give the same loss on any machine that sums in the same order, so anyone can check a published figure.

use mana_kernels::data::TextDataset;
use mana_kernels::train::Trainer;
use mana_protocol::HyperParams;

use super::error::RoundError;
use super::spec::RunSpec;
use super::state::{ShardRecord, build_trainer};

/// The mean loss of the model made of `shards` (the trunk and every expert of a checkpoint) on the run's
/// validation batches `0..batches` (at least one), each of `hyper`'s batch shape; batch `i` is taken at
/// validation window `i` modulo the number of windows.
pub fn validation_loss(
    spec: &RunSpec,
    hyper: &HyperParams,
    data: &TextDataset,
    shards: &[ShardRecord],
    batches: u32,
) -> Result<f32, RoundError> {
    let mut trainer = build_trainer(spec, hyper, shards)?;
    validation_loss_of(&mut trainer, spec, hyper, data, batches)
}

/// [`validation_loss`] of a model already built from a checkpoint's shards (an evaluator that also exports
/// the model builds it once).
pub fn validation_loss_of(
    trainer: &mut Trainer,
    spec: &RunSpec,
    hyper: &HyperParams,
    data: &TextDataset,
    batches: u32,
) -> Result<f32, RoundError> {
    let (b, t) = spec.batch_shape(hyper)?;
    let windows = data.validation_windows(t).max(1) as u64;
    let n = batches.max(1);
    let mut sum = 0.0f64;
    for i in 0..u64::from(n) {
        let batch = data.validation_batch(i % windows, b, t)?;
        sum += f64::from(trainer.evaluate(&batch)?.loss);
    }
    Ok((sum / f64::from(n)) as f32)
}
