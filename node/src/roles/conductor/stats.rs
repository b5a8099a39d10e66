//! Round statistics of the conductor: the metrics line of a committed round (its validation loss comes
//! later, from an evaluator: [`super::evaluations`]).

use std::collections::BTreeMap;

use mana_engine::round::commit_score_seed;
use mana_protocol::{ContentHash, PublicKey, RoundAnnouncement, RoundCommit, UpdateRule};

use super::Role;
use super::metrics::{MemberRound, PhaseMs, RoundMetrics};
use crate::daemon::now_ms;

impl Role {
    /// The metrics line of `commit` (its validation loss not yet known).
    pub(super) fn metrics_line(
        &self,
        commit: &RoundCommit,
        ann: Option<&RoundAnnouncement>,
        rejected_reasons: BTreeMap<String, u64>,
        checkpoint: ContentHash,
    ) -> RoundMetrics {
        let deltas = &self.round_deltas;
        // Per-node statistics: each node reports the same stats with each of its shards.
        let mut per_node: BTreeMap<PublicKey, mana_protocol::TrainingStats> = BTreeMap::new();
        for (node, d) in deltas {
            per_node.entry(*node).or_insert(d.stats);
        }
        let losses: Vec<f32> = per_node.values().map(|s| s.loss_before).collect();
        let train_loss =
            (!losses.is_empty()).then(|| losses.iter().sum::<f32>() / losses.len() as f32);
        let announced = self.clock.announced;
        let train = match (announced, self.clock.last_delta) {
            (Some(a), Some(l)) => l.saturating_duration_since(a).as_millis() as u64,
            _ => 0,
        };
        let mut members: BTreeMap<String, MemberRound> = BTreeMap::new();
        for (node, d) in deltas {
            let applied = commit
                .accepted
                .iter()
                .any(|a| a.shard == d.shard && a.deltas.contains(&d.payload_hash));
            if applied {
                members.entry(hex::encode(node.0)).or_default().accepted += 1;
            }
        }
        for r in &commit.rejected {
            let member = members.entry(hex::encode(r.node.0)).or_default();
            member.refused += 1;
            *member
                .refused_reasons
                .entry(r.reason.as_str().to_owned())
                .or_default() += 1;
        }
        RoundMetrics {
            members,
            round: commit.round,
            rule: match ann.map(|a| a.hyper.update_rule) {
                Some(UpdateRule::Diloco) => "diloco".into(),
                _ => "sync".into(),
            },
            participants: ann.map(|a| a.participants.len()).unwrap_or(0),
            accepted: commit.accepted.iter().map(|a| a.deltas.len()).sum(),
            rejected: commit.rejected.len(),
            rejected_reasons,
            train_loss,
            val_loss: None,
            tokens: per_node.values().map(|s| s.tokens).sum(),
            payload_bytes: deltas.iter().map(|(_, d)| d.payload_size).sum(),
            checkpoint: checkpoint.to_string(),
            ms: PhaseMs {
                train,
                apply: self.clock.apply_ms,
                ..PhaseMs::default()
            },
            scored: commit.scores.len() as u64,
            score_seed: Some(format!("{:016x}", commit_score_seed(commit))),
            unix_ms: now_ms(),
        }
    }
}
