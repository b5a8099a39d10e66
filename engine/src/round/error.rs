//! Why a round computation failed: one typed error for the whole engine, so that callers (the trainer and
//! coordinator roles, `mana simulate`) can tell bad input (a wrong-length or non-finite delta, a garbled
//! shard blob, a participant entry that does not fit the run) from a numerical failure.

use mana_kernels::checkpoint::CheckpointError;
use mana_kernels::data::DatasetError;
use mana_kernels::model::ModelError;
use mana_kernels::train::TrainError;
use mana_protocol::CodecError;

use crate::aggregate::AggregateError;

/// Why a round computation failed. Every variant is the result of bad input or a numerical failure;
/// none leaves the caller's data changed.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// The model refused (bad config, bad shard, bad batch).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Training failed (non-finite loss or gradient, bad optimizer settings).
    #[error(transparent)]
    Train(#[from] TrainError),
    /// A shard blob is not a valid shard state (bad magic, version, shard, sizes or checksum).
    #[error("shard blob: {0}")]
    Blob(#[from] CheckpointError),
    /// The dataset cannot produce the batch asked for.
    #[error(transparent)]
    Data(#[from] DatasetError),
    /// The robust mean or the outer rule refused its input.
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    /// The delta codec refused (only in the simulator, which encodes deltas like a node does).
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A shard id does not exist in the run's model (or cannot be written on the wire).
    #[error("shard {shard} does not exist in this run's model")]
    UnknownShard {
        /// The shard, in text form.
        shard: String,
    },
    /// A shard appears twice where each must appear once.
    #[error("shard {shard} appears more than once")]
    DuplicateShard {
        /// The shard, in text form.
        shard: String,
    },
    /// The trunk is needed (every model instance holds it) but was not given.
    #[error("the trunk shard is missing")]
    MissingTrunk,
    /// A shard that the computation needs was not given.
    #[error("shard {shard} is needed but was not given")]
    MissingShard {
        /// The shard, in text form.
        shard: String,
    },
    /// A vector has the wrong length for its shard.
    #[error("{what} of {shard}: expected {expected} values, got {got}")]
    WrongLength {
        /// What the vector is (delta, parameters, moments, router bias).
        what: &'static str,
        /// The shard, in text form.
        shard: String,
        /// The shard's length.
        expected: usize,
        /// The vector's length.
        got: usize,
    },
    /// A vector holds a NaN or an infinity.
    #[error("{what} of {shard} is not finite")]
    NonFinite {
        /// What the vector is.
        what: &'static str,
        /// The shard, in text form.
        shard: String,
    },
    /// The round's settings cannot be used with this run (batch shape, rates, counts).
    #[error("bad round settings: {field}: {reason}")]
    BadSettings {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl RoundError {
    /// A [`RoundError::BadSettings`].
    pub(crate) fn settings(field: &'static str, reason: impl Into<String>) -> RoundError {
        RoundError::BadSettings {
            field,
            reason: reason.into(),
        }
    }
}
