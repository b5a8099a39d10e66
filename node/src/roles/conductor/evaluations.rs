//! The validation loss in the metrics comes from the run's evaluators, not from the coordinator, which holds
//! no model: an evaluator (a mirror of every committed checkpoint) measures each checkpoint on the run's fixed
//! validation batches and signs the figure ([`mana_protocol::Evaluation`]); anyone with the checkpoint and the
//! text can reproduce it.
//!
//! A committed round's metrics line waits here ("pending", saved in the store so a restart keeps it) until
//! its evaluation comes, and is written then, in round order; at the latest it is written, without a
//! validation loss, once the next round has committed ([`MAX_PENDING`]: lines go out in order, so a longer
//! wait for one lost evaluation would hold back every line after it), or when the coordinator ends the run
//! or stops, after waiting at most [`super::ConductorConfig::evaluation_wait`] for it (only while evaluators
//! are expected: named with `evaluators`, or heard in the run, before a restart too:
//! [`EVALUATORS_HEARD_KEY`]).
//!
//! Whose figure counts: with `evaluators`, only theirs; otherwise anyone's. The first figure for a round's
//! checkpoint on the coordinator's batch count is taken; every later one for that round is compared with it
//! (agreeing within [`mana_engine::round::SCORE_TOLERANCE`]: another CPU may sum in another order) and
//! counted in the status as agreed or disagreed, so an evaluator that publishes other figures than its peers
//! shows. In an open run the first figure may be anyone's: name the evaluators you trust.

use std::time::Duration;

use mana_protocol::Evaluation;
use tokio::sync::broadcast::Receiver;

use super::Role;
use super::metrics::{self, RoundMetrics};
use crate::daemon::{Accepted, blocking};
use crate::roles::common::{append_line, peer_name};
use crate::store::RecordKind;

/// How often a coordinator whose run ended says so again while it waits for the last evaluation.
const END_REPEAT: Duration = Duration::from_secs(10);

/// The store record (kind [`RecordKind::RoundState`]) holding the metrics lines that wait for their
/// evaluation.
pub const PENDING_KEY: &[u8] = b"coordinator/pending-metrics";

/// Metrics lines that wait for their evaluation at most: a line waits until its round's evaluation comes or
/// the next round commits (an evaluator measures a checkpoint in well under a round; one that missed the
/// commit, or a run without one, costs a line its figure, never the line).
pub const MAX_PENDING: usize = 1;

/// The store record (kind [`RecordKind::RoundState`]) saying that an evaluation was taken in this run: a
/// restarted coordinator still expects evaluators, and waits for the evaluation of its last commit (the
/// first evaluation after a restart may come after the run's last commit).
pub const EVALUATORS_HEARD_KEY: &[u8] = b"coordinator/evaluators-heard";

impl Role {
    /// Keeps `line`, the metrics of the round just committed, until its evaluation comes; the oldest line
    /// waiting goes out, evaluated or not, when more than [`MAX_PENDING`] wait. Saved: a restart finds them.
    pub(super) async fn hold_pending(&mut self, line: RoundMetrics) {
        if self.pending.iter().any(|l| l.round >= line.round) {
            // The same commit done again after a restart: its line already waits.
            return;
        }
        self.pending.push_back(line);
        while self.pending.len() > MAX_PENDING
            || self.pending.front().is_some_and(|l| l.val_loss.is_some())
        {
            self.write_first().await;
        }
        self.save_pending().await;
    }

    /// Writes every waiting line, evaluated or not.
    pub(super) async fn flush_pending(&mut self) {
        while !self.pending.is_empty() {
            self.write_first().await;
        }
        self.save_pending().await;
    }

    /// Writes the waiting lines that have their evaluation, up to the first that has none (lines go out in
    /// round order).
    async fn write_evaluated(&mut self) {
        let before = self.pending.len();
        while self.pending.front().is_some_and(|l| l.val_loss.is_some()) {
            self.write_first().await;
        }
        if self.pending.len() != before {
            self.save_pending().await;
        }
    }

    /// Writes the oldest waiting line (to the metrics file and the status's loss curve) and forgets it.
    async fn write_first(&mut self) {
        let Some(line) = self.pending.pop_front() else {
            return;
        };
        let round = line.round;
        let point = crate::daemon::status::LossPoint {
            round,
            train: line.train_loss,
            val: line.val_loss,
        };
        self.node.update_coordinator_status(|s| {
            crate::daemon::status::push_loss(&mut s.loss_curve, point)
        });
        // A line already in the file (a restart between writing it and forgetting it) is not written twice.
        let written =
            |path: &std::path::Path| metrics::last_round(path).is_some_and(|r| r >= round);
        if let Some(path) = self.cfg.metrics.clone().filter(|p| !written(p)) {
            match serde_json::to_string(&line) {
                Ok(json) => {
                    if let Err(e) = append_line(&path, json).await {
                        self.failures += 1;
                        tracing::warn!(round, path = %path.display(), error = %e, "metrics line not written");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "metrics line not encoded"),
            }
        }
    }

    /// At the end of the run (or a stop): waits at most `wait` for the waiting lines' evaluations while
    /// evaluators are expected, taking every message that comes meanwhile, then writes every line.
    pub(super) async fn await_evaluation(
        &mut self,
        messages: &mut Receiver<Accepted>,
        wait: Duration,
    ) {
        let expected = self.cfg.evaluators.is_some() || self.evaluators_heard;
        let unevaluated = |role: &Role| role.pending.iter().any(|l| l.val_loss.is_none());
        if expected && unevaluated(self) {
            let deadline = tokio::time::Instant::now() + wait;
            tracing::info!(
                wait_s = wait.as_secs_f32(),
                "waiting for the last commits' evaluations"
            );
            // A run that ended says so again now and then meanwhile: a member that missed the end (and
            // perhaps the last commit) still hears it, and takes the final checkpoint.
            let mut again =
                tokio::time::interval_at(tokio::time::Instant::now() + END_REPEAT, END_REPEAT);
            while unevaluated(self) {
                tokio::select! {
                    m = tokio::time::timeout_at(deadline, messages.recv()) => match m {
                        // Every message is taken, not only evaluations: what a stopping coordinator hears
                        // of the round under way (deltas, attestations) is in the state it saves.
                        Ok(Ok(accepted)) => self.on_message(accepted.signer, accepted.message).await,
                        Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                        Ok(Err(_)) | Err(_) => break,
                    },
                    _ = again.tick(), if self.done => self.announce_end().await,
                }
            }
        }
        for line in self.pending.iter().filter(|l| l.val_loss.is_none()) {
            tracing::info!(
                round = line.round,
                "metrics written without a validation loss: no evaluation came"
            );
        }
        self.flush_pending().await;
    }

    /// An evaluator's signed figure: the round's validation loss if it is the first for that round's
    /// checkpoint (its waiting line is written once the lines before it are); compared with the figure
    /// taken otherwise.
    pub(super) async fn on_evaluation(&mut self, signer: mana_protocol::PublicKey, e: &Evaluation) {
        if self
            .cfg
            .evaluators
            .as_ref()
            .is_some_and(|keys| !keys.contains(&signer))
            || e.run != self.cfg.machine.run
        {
            return;
        }
        let Some(commit) = self.recent_commits.iter_mut().find(|c| c.round == e.round) else {
            return;
        };
        if commit.checkpoint != e.checkpoint.to_string()
            || u64::from(e.batches) != self.cfg.val_batches
        {
            tracing::debug!(round = e.round, evaluator = %peer_name(&signer), batches = e.batches, "an evaluation of another checkpoint or batch count: not taken");
            return;
        }
        self.evaluations_seen += 1;
        match commit.val_loss {
            Some(taken) => {
                if (taken - e.val_loss).abs() <= mana_engine::round::SCORE_TOLERANCE {
                    self.evaluations_agreed += 1;
                } else {
                    self.evaluations_disagreed += 1;
                    tracing::warn!(round = e.round, evaluator = %peer_name(&signer), published = e.val_loss, taken, "an evaluator's validation loss differs from the one taken for the round");
                }
            }
            None => {
                commit.val_loss = Some(e.val_loss);
                self.val_loss = Some(e.val_loss);
                self.evaluations_agreed += 1;
                tracing::info!(round = e.round, val_loss = e.val_loss, evaluator = %peer_name(&signer), "round evaluated");
                if let Some(line) = self.pending.iter_mut().find(|l| l.round == e.round) {
                    line.val_loss = Some(e.val_loss);
                    self.write_evaluated().await;
                }
            }
        }
        if !self.evaluators_heard {
            self.evaluators_heard = true;
            self.save_evaluators_heard().await;
        }
    }

    /// Records in the store that this run has evaluators ([`EVALUATORS_HEARD_KEY`]).
    async fn save_evaluators_heard(&mut self) {
        let store = self.node.store().clone();
        let result = blocking(move || {
            store.put_record(RecordKind::RoundState, EVALUATORS_HEARD_KEY, b"1")?;
            Ok(())
        })
        .await;
        if let Err(e) = result {
            self.failures += 1;
            tracing::warn!(error = %e, "that the run has evaluators not saved");
        }
    }

    /// Saves the waiting lines in the store (removes the record when none waits).
    async fn save_pending(&mut self) {
        let lines: Vec<&RoundMetrics> = self.pending.iter().collect();
        let value = match (!lines.is_empty())
            .then(|| serde_json::to_vec(&lines))
            .transpose()
        {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "metrics lines not encoded");
                return;
            }
        };
        let store = self.node.store().clone();
        let result = blocking(move || {
            match value {
                Some(v) => store.put_record(RecordKind::RoundState, PENDING_KEY, &v)?,
                None => {
                    store.remove_record(RecordKind::RoundState, PENDING_KEY)?;
                }
            }
            Ok(())
        })
        .await;
        if let Err(e) = result {
            self.failures += 1;
            tracing::warn!(error = %e, "the waiting metrics line not saved");
        }
    }
}
