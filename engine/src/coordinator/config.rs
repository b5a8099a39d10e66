//! The coordinator's settings: the run, the experts to host, replication, phase durations and the training
//! hyper-parameters it announces. Readable from TOML (the operator's coordinator section).

use mana_protocol::{ContentHash, HyperParams, RunId, ShardId, VerdictRule};
use serde::{Deserialize, Serialize};

use super::judges::JudgingRule;
use super::standing::StandingPolicy;
use thiserror::Error;

/// Why a coordinator configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("coordinator config: {field} {reason}")]
pub struct ConfigError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// Most micro-batches (sync) or inner steps (DiLoCo) in one round: DiLoCo runs use hundreds; far more would
/// leave every trainer computing long past any sensible deadline.
pub const MAX_INNER_STEPS: u32 = 10_000;

/// Accepted norms kept per shard for the norm bounds by default.
pub const DEFAULT_NORM_HISTORY: u32 = 8;

/// Most accepted norms kept per shard (each is published with every call): the protocol's bound.
pub use mana_protocol::limits::MAX_NORM_HISTORY;

/// H when a run does not say: one micro-batch a round for `sync` (one step of the full model), 20 local
/// steps for `diloco`. `mana coordinator` uses it, and `mana demo` to train its single-node comparison on
/// as many tokens as the network.
pub fn default_inner_steps(rule: mana_protocol::UpdateRule) -> u32 {
    match rule {
        mana_protocol::UpdateRule::Sync => 1,
        mana_protocol::UpdateRule::Diloco => 20,
    }
}

/// How the coordinator runs rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorConfig {
    /// The run coordinated.
    pub run: RunId,
    /// Every routed expert of the model (`expert/<layer>/<index>`); each is hosted by `replication` nodes.
    pub experts: Vec<ShardId>,
    /// Hosts per routed expert (2 by default), so one departure never loses an expert's training.
    pub replication: usize,
    /// Members that can take shards needed before a round starts (at least `replication`); members that
    /// declare no shard capacity (mirrors, evaluators) do not count.
    pub min_members: usize,
    /// Whether every participant also trains the trunk (the dense part). It takes one of its shard slots.
    pub trunk_everywhere: bool,
    /// Time from a round's announcement to its delta deadline, in ms.
    pub train_ms: u64,
    /// Time from the delta deadline to the commit deadline (verification and aggregation), in ms.
    pub verify_ms: u64,
    /// Pause between a commit and the next announcement, in ms (lets nodes fetch the new checkpoint).
    pub cooldown_ms: u64,
    /// A member silent for longer than this has left (INTELLECT-1 uses 10 s with 2 s heartbeats).
    pub member_timeout_ms: u64,
    /// Inner optimizer steps per round.
    pub inner_steps: u32,
    /// Data-shard seeds given to each participant per round.
    pub data_seeds_per_node: u32,
    /// Deltas over this many times the shard's median norm are refused.
    pub max_norm_ratio: f32,
    /// Training settings announced with every round.
    pub hyper: HyperParams,
    /// How members earn and lose standing, and the member cap.
    pub standing: StandingPolicy,
    /// The run's corpus hash, announced with every round (all zeros: not stated).
    pub corpus: ContentHash,
    /// Who judges each shard's next state (up to how many holders, how many drawn verifiers), and so the
    /// quorum that commits it.
    pub judging: JudgingRule,
    /// How the judges decide on each delta (norm bounds, the share scored, the score a delta needs):
    /// published with every call.
    pub verdict: VerdictRule,
    /// Accepted norms kept per shard for the norm bounds' history (published with every call).
    pub norm_history: u32,
}

impl CoordinatorConfig {
    /// A configuration with the defaults (replication 2, 10 s member timeout) for `run`, `experts` and `hyper`.
    pub fn new(run: RunId, experts: Vec<ShardId>, hyper: HyperParams) -> CoordinatorConfig {
        CoordinatorConfig {
            run,
            experts,
            replication: 2,
            min_members: 2,
            trunk_everywhere: true,
            train_ms: 60_000,
            verify_ms: 30_000,
            cooldown_ms: 5_000,
            member_timeout_ms: 10_000,
            inner_steps: 100,
            data_seeds_per_node: 1,
            max_norm_ratio: 10.0,
            hyper,
            standing: StandingPolicy::default(),
            corpus: ContentHash([0; 32]),
            judging: JudgingRule::default(),
            verdict: crate::round::default_verdict_rule(),
            norm_history: DEFAULT_NORM_HISTORY,
        }
    }

    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: &str| {
            Err(ConfigError {
                field,
                reason: reason.to_string(),
            })
        };
        if self.replication == 0 {
            return bad("replication", "must be at least 1");
        }
        if !(1..=MAX_INNER_STEPS).contains(&self.inner_steps) {
            return bad(
                "inner_steps",
                &format!(
                    "must be between 1 and {MAX_INNER_STEPS}: a round of 0 steps trains nothing"
                ),
            );
        }
        if self.min_members < self.replication {
            return bad("min_members", "must be at least `replication`");
        }
        if self.experts.contains(&ShardId::Trunk) {
            return bad(
                "experts",
                "must list routed experts only (the trunk is `trunk_everywhere`)",
            );
        }
        if self.experts.is_empty() && !self.trunk_everywhere {
            return bad(
                "experts",
                "is empty and the trunk is not trained: a round would train nothing",
            );
        }
        if self.train_ms == 0 || self.verify_ms == 0 {
            return bad("train_ms/verify_ms", "must be positive");
        }
        if self.member_timeout_ms == 0 {
            return bad("member_timeout_ms", "must be positive");
        }
        if !self.max_norm_ratio.is_finite() || self.max_norm_ratio <= 0.0 {
            return bad("max_norm_ratio", "must be finite and positive");
        }
        let st = &self.standing;
        if st.fault_cost < 1 || st.ban_at >= 0 || st.max_weight < 0 {
            return bad(
                "standing",
                "needs fault_cost >= 1, a negative ban_at and max_weight >= 0",
            );
        }
        if st.max_members < self.min_members {
            return bad("standing.max_members", "must be at least `min_members`");
        }
        if st.max_members_per_ip == 0 {
            return bad("standing.max_members_per_ip", "must be at least 1");
        }
        let h = &self.hyper;
        for (field, v) in [
            ("hyper.inner_lr", h.inner_lr),
            ("hyper.outer_lr", h.outer_lr),
            ("hyper.weight_decay", h.weight_decay),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(field, "must be finite and >= 0");
            }
        }
        if !(0.0..1.0).contains(&h.outer_momentum) {
            return bad("hyper.outer_momentum", "must be in [0, 1)");
        }
        let v = &self.verdict;
        let figures = [
            v.min_norm_ratio,
            v.score_share,
            v.trunk_min_gain,
            v.trunk_share,
            v.expert_tolerance,
        ];
        if figures.iter().any(|x| !x.is_finite())
            || !(0.0..=1.0).contains(&v.score_share)
            || v.min_norm_ratio < 0.0
            || v.expert_tolerance < 0.0
        {
            return bad(
                "verdict",
                "needs finite figures, score_share in [0, 1], min_norm_ratio >= 0 and expert_tolerance >= 0",
            );
        }
        if !(1..=MAX_NORM_HISTORY).contains(&self.norm_history) {
            return bad(
                "norm_history",
                &format!("must be between 1 and {MAX_NORM_HISTORY}"),
            );
        }
        let j = &self.judging;
        if j.max_holder_judges == 0 {
            return bad(
                "judging.max_holder_judges",
                "must be at least 1: a shard's holders judge it",
            );
        }
        if j.most_judges() > mana_protocol::limits::MAX_SHARD_JUDGES as u64 {
            return bad(
                "judging",
                &format!(
                    "at most {} judges per shard, escalated (twice the verifiers) or not",
                    mana_protocol::limits::MAX_SHARD_JUDGES
                ),
            );
        }
        Ok(())
    }
}
