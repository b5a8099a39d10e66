//! The training roles, wired onto a running node ([`crate::daemon::NodeHandle`]):
//! - [`conductor`]: what `mana coordinator` runs: drives the run's state machine
//!   ([`mana_engine::coordinator::Coordinator`]), publishes announcements, calls for judgments and commits what
//!   a quorum of each shard's judges signed, writes per-round metrics, and resumes from its store after a
//!   restart;
//! - [`trainer`]: a volunteer: trains its assigned shards on each round it is named in, publishes compressed
//!   deltas, judges the shards it holds or is drawn to verify (`judge`: fetch, check and score each delta,
//!   compute the next state, sign), applies each commit to the shards it holds and checks its result against
//!   the commit's hashes;
//! - [`evaluator`]: on a node that mirrors every checkpoint, measures each committed checkpoint's validation
//!   loss and publishes it, signed (the figure the coordinator's metrics and the demo show).
//!
//! Both run the same engine ([`mana_engine::round`]) on the same [`RunSpec`] and corpus, so every holder of a shard
//! (and the coordinator) computes bit-identical new weights. Neither role lets the daemon's automatic shard
//! sync run: a role owns its store's rounds (start the node with `sync_shards = false`). The evaluator is the
//! opposite: it reads what the daemon's shard sync stores.

pub mod commit_check;
pub mod common;
pub mod conductor;
pub mod evaluator;
mod judge;
mod prefetch;
mod residuals;
pub mod silence;
pub mod trainer;

pub use common::{DataSource, load_dataset};
pub use conductor::{ConductorConfig, run_conductor};
pub use evaluator::{EvaluatorConfig, run_evaluator};
pub use trainer::{DEFAULT_RESCORE_SHARE, TrainerConfig, run_trainer};

pub use mana_engine::round::RunSpec;
