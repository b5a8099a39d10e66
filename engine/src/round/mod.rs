//! The round engine: everything a training round computes, as pure functions over shard states, deltas and
//! batches (no network, no async runtime, no clock). The roles (`crate::roles`) wire it to the network;
//! `mana simulate` and the tests run it in one process.
//!
//! One module per job:
//! - [`spec`]: what a run agrees on (model, init seed, warm-up), the tiny preset, the inner AdamW settings;
//! - [`state`]: a shard's full state as one deterministic blob, the fresh model, trainers built from states;
//! - [`local`]: a participant's work in a round (sync: mean gradient of H micro-batches; diloco: H AdamW
//!   steps, pseudo-gradient);
//! - [`apply`]: a holder's update from the committed deltas (robust mean, then AdamW or Nesterov);
//! - [`check`]: the loss check on a validation batch;
//! - [`simulate`]: N nodes in one process plus the single-node baselines;
//! - [`error`]: the engine's one error type, [`RoundError`].

pub mod apply;
pub mod check;
pub mod error;
pub mod local;
pub mod simulate;
pub mod spec;
pub mod state;

pub use apply::apply_round;
pub use check::{LossCheck, loss_check};
pub use error::RoundError;
pub use local::{LocalResult, train_local};
pub use simulate::{BaselineReport, RoundReport, SimConfig, SimReport, simulate, simulate_with};
pub use spec::RunSpec;
pub use state::{RunShard, ShardRecord, build_trainer, initial_shards};
