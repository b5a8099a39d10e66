//! Round statistics of the conductor: the metrics line of a committed round and the validation loss of the
//! model it holds.

use std::collections::BTreeMap;

use mana_engine::round::{build_trainer, commit_score_seed};
use mana_protocol::{
    ContentHash, HyperParams, PublicKey, RoundAnnouncement, RoundCommit, UpdateRule,
};

use super::Role;
use super::metrics::{MemberRound, PhaseMs, RoundMetrics};
use crate::daemon::{blocking, now_ms};

impl Role {
    pub(super) fn metrics_line(
        &self,
        commit: &RoundCommit,
        ann: Option<&RoundAnnouncement>,
        rejected_reasons: BTreeMap<String, u64>,
        val_loss: Option<f32>,
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
            val_loss,
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

    /// Mean validation loss of the current model on the run's fixed validation batches.
    pub(super) async fn validation_loss(&self, hyper: Option<&HyperParams>) -> Option<f32> {
        let hyper = hyper
            .cloned()
            .unwrap_or_else(|| self.machine.config().hyper.clone());
        let (spec, data, states, n) = (
            self.cfg.spec.clone(),
            self.cfg.data.clone(),
            self.model.states.clone(),
            self.cfg.val_batches,
        );
        let result = blocking(move || {
            let (b, t) = spec.batch_shape(&hyper)?;
            let mut trainer = build_trainer(&spec, &hyper, &states)?;
            let windows = data.validation_windows(t).max(1) as u64;
            let mut sum = 0.0f64;
            for i in 0..n.max(1) {
                let batch = data.validation_batch(i % windows, b, t)?;
                sum += f64::from(trainer.evaluate(&batch)?.loss);
            }
            Ok((sum / n.max(1) as f64) as f32)
        })
        .await;
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "validation loss not measured");
                None
            }
        }
    }
}
