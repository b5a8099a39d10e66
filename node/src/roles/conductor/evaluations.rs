//! The validation loss in the metrics comes from the run's evaluators, not from the coordinator, which holds
//! no model: an evaluator (a mirror of every committed checkpoint) measures each checkpoint on the run's fixed
//! validation batches and signs the figure ([`mana_protocol::Evaluation`]); anyone with the checkpoint and the
//! text can reproduce it.
//!
//! A committed round's metrics line waits here ("pending", saved in the store so a restart keeps it) until
//! its evaluation comes, and is written then, in round order. While evaluators are expected (named with
//! `evaluators`, or heard in the run, before a restart too: [`EVALUATORS_HEARD_KEY`]), a line waits at most
//! [`super::ConductorConfig::evaluation_wait`] after its commit, however many rounds commit meanwhile (rounds
//! may be faster than an evaluation), and the coordinator that ends the run or stops waits for the last
//! ones. Otherwise a line waits only until the next round commits. Either way at most [`MAX_PENDING`] wait,
//! and a line that runs out of time is written without a validation loss.
//!
//! Whose figure counts: with `evaluators`, only theirs; otherwise anyone's. The first figure for a round's
//! checkpoint on the coordinator's batch count is taken; every later one for that round is compared with it
//! (agreeing within [`mana_engine::round::SCORE_TOLERANCE`]: another CPU may sum in another order) and
//! counted in the status as agreed or disagreed, so an evaluator that publishes other figures than its peers
//! shows. In an open run the first figure may be anyone's: name the evaluators you trust.

use std::time::Duration;

use mana_protocol::{Evaluation, Message};
use tokio::sync::broadcast::Receiver;

use super::Role;
use super::metrics::{self, RoundMetrics};
use crate::daemon::{Accepted, blocking};
use crate::roles::common::{append_line, peer_name};
use crate::store::RecordKind;

/// The store record (kind [`RecordKind::RoundState`]) holding the metrics lines that wait for their
/// evaluation.
pub const PENDING_KEY: &[u8] = b"coordinator/pending-metrics";

/// Metrics lines that wait for their evaluation at most (a bound on the saved record whatever the rounds'
/// pace); past it the oldest is written as it is.
pub const MAX_PENDING: usize = 16;

/// The store record (kind [`RecordKind::RoundState`]) saying that an evaluation was taken in this run: a
/// restarted coordinator still expects evaluators, and waits for the evaluations of its last commits (the
/// first after a restart may come late, or after the run's last commit).
pub const EVALUATORS_HEARD_KEY: &[u8] = b"coordinator/evaluators-heard";

/// How many of the waiting `lines` (oldest first) are to be written at `now_ms`: each in turn that has its
/// evaluation, or has waited `wait_ms` since its commit while evaluators are `expected`, or has a later line
/// behind it while none are; and the oldest beyond [`MAX_PENDING`]. Lines go out in round order, so the
/// first that must wait keeps the rest.
fn lines_due(
    lines: &std::collections::VecDeque<RoundMetrics>,
    expected: bool,
    now_ms: u64,
    wait_ms: u64,
) -> usize {
    let mut due = 0;
    for (i, line) in lines.iter().enumerate() {
        let left = lines.len() - i;
        let done_waiting = if expected {
            now_ms.saturating_sub(line.unix_ms) >= wait_ms
        } else {
            left > 1
        };
        if line.val_loss.is_none() && !done_waiting && left <= MAX_PENDING {
            break;
        }
        due += 1;
    }
    due
}

impl Role {
    /// Keeps `line`, the metrics of the round just committed, until its evaluation comes or its wait is over
    /// (see the module doc). Saved: a restart finds them.
    pub(super) async fn hold_pending(&mut self, line: RoundMetrics) {
        if self.pending.iter().any(|l| l.round >= line.round) {
            // The same commit done again after a restart: its line already waits.
            return;
        }
        self.pending.push_back(line);
        self.release_pending(crate::daemon::now_ms()).await;
        self.save_pending().await;
    }

    /// Whether evaluations are expected: evaluators named, or one heard in this run (before a restart too).
    fn evaluators_expected(&self) -> bool {
        self.cfg.evaluators.is_some() || self.evaluators_heard
    }

    /// Writes the waiting lines, oldest first, that are evaluated or done waiting at `now_ms` (the module
    /// doc's rule); called at each commit and tick. Saves the waiting lines when any went out.
    pub(super) async fn release_pending(&mut self, now_ms: u64) {
        let wait_ms = u64::try_from(self.cfg.evaluation_wait.as_millis()).unwrap_or(u64::MAX);
        let due = lines_due(&self.pending, self.evaluators_expected(), now_ms, wait_ms);
        for _ in 0..due {
            self.write_first().await;
        }
        if due > 0 {
            self.save_pending().await;
        }
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
    /// evaluators are expected, taking the messages that come meanwhile, then writes every line.
    pub(super) async fn await_evaluation(
        &mut self,
        messages: &mut Receiver<Accepted>,
        wait: Duration,
    ) {
        let expected = self.evaluators_expected();
        let unevaluated = |role: &Role| role.pending.iter().any(|l| l.val_loss.is_none());
        if expected && unevaluated(self) {
            let deadline = tokio::time::Instant::now() + wait;
            tracing::info!(
                wait_s = wait.as_secs_f32(),
                "waiting for the last commits' evaluations"
            );
            while unevaluated(self) {
                match tokio::time::timeout_at(deadline, messages.recv()).await {
                    Ok(Ok(accepted)) => {
                        if let Message::Evaluation(e) = accepted.message {
                            self.on_evaluation(accepted.signer, &e).await;
                        }
                    }
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                    Ok(Err(_)) | Err(_) => break,
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    fn line(round: u64, unix_ms: u64, val: Option<f32>) -> RoundMetrics {
        let mut l: RoundMetrics = serde_json::from_str(&format!(
            "{{\"round\":{round},\"train_loss\":null,\"val_loss\":null}}"
        ))
        .expect("a line");
        l.unix_ms = unix_ms;
        l.val_loss = val;
        l
    }

    #[test]
    fn lines_wait_for_their_evaluation_for_the_wait_when_evaluators_are_expected() {
        // Rounds a second apart, faster than their evaluations: none is written before its wait is over.
        let lines: VecDeque<_> = (1..=5).map(|r| line(r, r * 1_000, None)).collect();
        assert_eq!(lines_due(&lines, true, 5_000, 30_000), 0);
        assert_eq!(
            lines_due(&lines, true, 32_500, 30_000),
            2,
            "rounds 1 and 2 waited 30 s"
        );
        // An evaluated line goes out at once, but not past an older one that still waits.
        let mut lines = lines;
        lines[1].val_loss = Some(2.0);
        assert_eq!(lines_due(&lines, true, 5_000, 30_000), 0);
        lines[0].val_loss = Some(2.1);
        assert_eq!(lines_due(&lines, true, 5_000, 30_000), 2);
    }

    #[test]
    fn without_evaluators_a_line_waits_only_for_the_next_commit() {
        let lines: VecDeque<_> = (1..=3).map(|r| line(r, r * 1_000, None)).collect();
        assert_eq!(
            lines_due(&lines, false, 3_000, 30_000),
            2,
            "the last one waits"
        );
        let one: VecDeque<_> = lines.iter().take(1).cloned().collect();
        assert_eq!(lines_due(&one, false, 1_000_000, 30_000), 0);
    }

    #[test]
    fn no_more_than_max_pending_lines_wait() {
        let n = MAX_PENDING as u64 + 3;
        let lines: VecDeque<_> = (1..=n).map(|r| line(r, 1_000, None)).collect();
        assert_eq!(lines_due(&lines, true, 1_000, u64::MAX), 3);
    }
}
