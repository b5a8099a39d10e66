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
//! - [`balance`]: the router biases moved once a round from every participant's expert loads;
//! - [`norms`]: the lower and upper bounds on a delta's norm, from other senders' norms only;
//! - [`score`]: a contribution's reproducible score (its gain over a zero delta on a batch fixed after the deltas are in);
//! - [`verdict`]: a judge's verdicts on one shard's deltas (payload checks, norm bounds, score, policy);
//! - [`evaluate`]: the validation loss of a whole checkpoint (what an evaluator publishes);
//! - [`simulate`]: N nodes in one process plus the single-node baselines;
//! - [`error`]: the engine's one error type, [`RoundError`].

pub mod apply;
pub mod balance;
pub mod error;
pub mod evaluate;
pub mod local;
pub mod norms;
pub mod score;
pub mod simulate;
pub mod spec;
pub mod state;
pub mod verdict;

pub use apply::{apply_round, apply_shard_round, apply_weighted_round};
pub use balance::{ExpertLoads, balance_router, imbalance, load_ratios, loads_len};
pub use error::RoundError;
pub use evaluate::{validation_loss, validation_loss_of};
pub use local::{InnerOptim, LocalResult, train_local};
pub use norms::{NormHistory, NormSample, NormVerdict, judge_norm, norm_class};
pub use score::{
    SCORE_TOLERANCE, Score, ScorePolicy, ShardScorer, commit_score_seed, is_scored, rescore,
    score_agrees, score_batch, score_seed,
};
pub use simulate::{
    BaselineReport, RoundReport, SimConfig, SimReport, allreduce_bytes, full_model_baseline,
    simulate, simulate_with,
};
pub use spec::{RunSpec, SPARSE_OUTER_LR, SPARSE_OUTER_MOMENTUM};
pub use state::{RunShard, ShardRecord, build_trainer, initial_shard, initial_shards};
pub use verdict::{Fetched, Judged, call_score_seed, default_verdict_rule, judge_deltas};
