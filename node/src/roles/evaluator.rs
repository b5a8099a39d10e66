//! The evaluator: a node that mirrors every committed checkpoint (a `--no-train` node, whose shard sync
//! fetches each commit's shards) measures each checkpoint's validation loss and publishes it, signed, in an
//! [`Evaluation`]. Metrics that need the whole model come from here, not from the coordinator, which need
//! not hold the model; the figure is reproducible by anyone with the checkpoint and the run's text
//! ([`mana_engine::round::validation_loss`]), and the signature says who measured it.
//!
//! With [`EvaluatorConfig::export`], it also keeps a directory holding the last checkpoint it evaluated as a
//! `mana train`-style model (what `mana generate` and `mana serve` load): the model assembled from the
//! shards its sync fetched from their holders, each checked against the commit's hash as it was stored.
//! The directory is replaced whole after each round (written beside it, then renamed), so a reader never
//! sees half a model; `exported.json` in it names the round and the checkpoint's manifest hash. That is how a
//! run's model leaves the network: the coordinator never holds it.
//!
//! For each commit it hears (from the run's coordinator, checked by the daemon), in round order, it waits
//! until the daemon's shard sync has stored that round, reads the shards from its store, evaluates them on a
//! blocking thread and publishes the figure. When commits come faster than it evaluates, at most
//! [`MAX_WAITING`] wait; older ones are skipped (a current figure matters more than every figure).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mana_engine::round::{RunShard, RunSpec, ShardRecord, build_trainer, validation_loss_of};
use mana_kernels::data::TextDataset;
use mana_protocol::{Evaluation, HyperParams, Message, RoundCommit};
use tokio::sync::broadcast::error::RecvError;

use super::common::publish_patiently;
use crate::daemon::{NodeError, NodeHandle, blocking};

/// How the evaluator runs.
#[derive(Debug, Clone)]
pub struct EvaluatorConfig {
    /// The run's model; must be the coordinator's.
    pub spec: RunSpec,
    /// The run's text (its validation split is what the loss is measured on).
    pub data: Arc<TextDataset>,
    /// Validation batches per evaluation (indices `0..batches`); the coordinator's metrics used 4.
    pub batches: u32,
    /// Longest wait for the shard sync to store a committed round before that round is skipped (it is
    /// skipped at once when a later round is stored first).
    pub sync_wait: Duration,
    /// Keep this directory holding the last evaluated checkpoint as a model (see the module doc).
    pub export: Option<std::path::PathBuf>,
}

impl EvaluatorConfig {
    /// Defaults around the run's `spec` and `data`: 4 batches, a minute for a round's sync, no export.
    pub fn new(spec: RunSpec, data: Arc<TextDataset>) -> EvaluatorConfig {
        EvaluatorConfig {
            spec,
            data,
            batches: 4,
            sync_wait: Duration::from_secs(60),
            export: None,
        }
    }
}

/// How often the store is looked at while a round syncs.
const SYNC_POLL: Duration = Duration::from_millis(100);

/// Round announcements kept for their batch shape (a commit uses its own round's).
const KEPT_ANNOUNCEMENTS: usize = 8;

/// Commits waiting for their evaluation at most; past that the oldest is skipped.
pub const MAX_WAITING: usize = 4;

/// Runs the evaluator on `node` until `shutdown`.
pub async fn run_evaluator(
    node: Arc<NodeHandle>,
    cfg: EvaluatorConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    tracing::Instrument::instrument(
        evaluator_loop(node, cfg, shutdown),
        tracing::error_span!("evaluator"),
    )
    .await
}

async fn evaluator_loop(
    node: Arc<NodeHandle>,
    cfg: EvaluatorConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    if node.config().coordinator.is_none() {
        return Err(NodeError::Config(
            "an evaluator follows a run: give it the run's coordinator key".into(),
        ));
    }
    if !node.config().sync_shards || node.config().sync_only.is_some() {
        return Err(NodeError::Config(
            "an evaluator needs every shard of each checkpoint: start the node with sync_shards = true and no sync_only (a --no-train node)".into(),
        ));
    }
    node.update_evaluator_status(|_| {});
    let mut messages = node.round_messages();
    let mut hypers: BTreeMap<u64, HyperParams> = BTreeMap::new();
    let mut waiting: std::collections::VecDeque<RoundCommit> = std::collections::VecDeque::new();
    tokio::pin!(shutdown);
    loop {
        // Every message that arrived meanwhile first.
        loop {
            match messages.try_recv() {
                Ok(a) => take(a.message, &mut hypers, &mut waiting),
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                    tracing::debug!(skipped = n, "evaluator fell behind the message stream");
                }
                Err(_) => break,
            }
        }
        if let Some(commit) = waiting.pop_front() {
            let round = commit.round;
            // A commit whose announcement this node missed (it joined late): the latest settings heard.
            let hyper = hypers
                .get(&round)
                .or_else(|| hypers.last_key_value().map(|(_, h)| h))
                .cloned();
            let work = evaluate(&node, &cfg, commit, hyper);
            tokio::select! {
                _ = &mut shutdown => break,
                result = work => match result {
                    Ok(None) => {
                        tracing::info!(round, "round not evaluated: the shard sync moved past it");
                        node.update_evaluator_status(|s| s.last_error = Some(format!("round {round}: never stored here (its sync failed), skipped")));
                    }
                    Ok(Some(e)) => {
                        tracing::info!(round, val_loss = e.val_loss, "checkpoint evaluated");
                        node.update_evaluator_status(|s| {
                            s.evaluated += 1;
                            s.last_round = Some(round);
                            s.last_val_loss = Some(e.val_loss);
                            s.last_error = None;
                        });
                    }
                    Err(e) => {
                        tracing::warn!(round, error = %e, "checkpoint not evaluated");
                        node.update_evaluator_status(|s| s.last_error = Some(format!("round {round}: {e}")));
                    }
                },
            }
            continue;
        }
        tokio::select! {
            _ = &mut shutdown => break,
            m = messages.recv() => match m {
                Ok(a) => take(a.message, &mut hypers, &mut waiting),
                Err(RecvError::Lagged(n)) => tracing::debug!(skipped = n, "evaluator fell behind the message stream"),
                Err(RecvError::Closed) => break,
            },
        }
    }
    Ok(())
}

/// Keeps what the evaluator needs from one accepted message: announcements' settings, commits to evaluate
/// (in round order, at most [`MAX_WAITING`]).
fn take(
    message: Message,
    hypers: &mut BTreeMap<u64, HyperParams>,
    waiting: &mut std::collections::VecDeque<RoundCommit>,
) {
    match message {
        Message::RoundAnnouncement(a) => {
            hypers.insert(a.round, a.hyper);
            while hypers.len() > KEPT_ANNOUNCEMENTS {
                hypers.pop_first();
            }
        }
        Message::RoundCommit(c) if waiting.back().is_none_or(|w| c.round > w.round) => {
            waiting.push_back(c);
            while waiting.len() > MAX_WAITING {
                if let Some(skipped) = waiting.pop_front() {
                    tracing::info!(round = skipped.round, "evaluator behind: round skipped");
                }
            }
        }
        _ => {}
    }
}

/// Waits for the commit's round in the store, evaluates its checkpoint and publishes the figure. `None` when
/// the store moved past the round without it (its sync failed and a later round's succeeded): it will not come.
async fn evaluate(
    node: &Arc<NodeHandle>,
    cfg: &EvaluatorConfig,
    commit: RoundCommit,
    hyper: Option<HyperParams>,
) -> Result<Option<Evaluation>, NodeError> {
    let round = commit.round;
    let manifest = commit.checkpoint;
    let checkpoint = manifest.hash()?;
    // The daemon's shard sync stores the round once it has every shard.
    let stored = tokio::time::timeout(cfg.sync_wait, async {
        loop {
            let store = node.store().clone();
            let (this, current) =
                blocking(move || Ok((store.manifest(round)?, store.current_round()?))).await?;
            if this.is_some() {
                return Ok::<bool, NodeError>(true);
            }
            if current.is_some_and(|c| c > round) {
                return Ok(false);
            }
            tokio::time::sleep(SYNC_POLL).await;
        }
    })
    .await;
    match stored {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return Ok(None),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(NodeError::Timeout {
                what: format!("the shard sync of round {round}"),
                after: cfg.sync_wait,
            });
        }
    }
    let mut shards = Vec::with_capacity(manifest.shards.len());
    for entry in &manifest.shards {
        let bytes = node.read_blob(entry.hash).await?;
        let (spec, shard) = (cfg.spec.clone(), entry.shard);
        shards.push(
            blocking(move || {
                ShardRecord::from_bytes(&bytes, &spec, shard).map_err(NodeError::from)
            })
            .await?,
        );
    }
    let hyper = hyper.ok_or(NodeError::NoAnnouncement { round })?;
    let (spec, data, batches) = (cfg.spec.clone(), cfg.data.clone(), cfg.batches);
    let export = cfg.export.clone();
    let val_loss = blocking(move || {
        // One model for both: saved before it is evaluated.
        let mut trainer = build_trainer(&spec, &hyper, &shards)?;
        if let Some(dir) = export {
            export_model(&trainer, &dir, round, checkpoint)?;
        }
        Ok(validation_loss_of(
            &mut trainer,
            &spec,
            &hyper,
            &data,
            batches,
        )?)
    })
    .await?;
    if cfg.export.is_some() {
        tracing::info!(round, checkpoint = %checkpoint, "model exported");
        node.update_evaluator_status(|s| s.exported_round = Some(round));
    }
    let evaluation = Evaluation {
        run: commit.run,
        round,
        checkpoint,
        batches,
        val_loss,
    };
    publish_patiently(
        node,
        &Message::Evaluation(evaluation.clone()),
        Duration::from_secs(5),
    )
    .await?;
    Ok(Some(evaluation))
}

/// What `exported.json` in an export directory says: which committed checkpoint the model is.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExportedCheckpoint {
    /// The committed round.
    pub round: u64,
    /// Its checkpoint's manifest hash (hex), as the coordinator's commit names it.
    pub checkpoint: String,
}

/// The file in an export directory naming the checkpoint it holds.
pub const EXPORTED_FILE: &str = "exported.json";

/// Writes `trainer`'s model (every shard of a checkpoint) to `dir` as a `mana train` checkpoint with an
/// [`EXPORTED_FILE`], replacing what `dir` held only once the new model is complete: it is written to a
/// sibling directory first, then swapped in by renames.
fn export_model(
    trainer: &mana_kernels::train::Trainer,
    dir: &std::path::Path,
    round: u64,
    checkpoint: mana_protocol::ContentHash,
) -> Result<(), NodeError> {
    let io = |path: &std::path::Path, e: std::io::Error| {
        NodeError::Config(format!("exporting the model to {}: {e}", path.display()))
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let sibling = |tag: &str| dir.with_file_name(format!(".{name}.{tag}"));
    let (fresh, old) = (sibling("partial"), sibling("old"));
    for stale in [&fresh, &old] {
        if stale.exists() {
            std::fs::remove_dir_all(stale).map_err(|e| io(stale, e))?;
        }
    }
    trainer.save(&fresh)?;
    let named = ExportedCheckpoint {
        round,
        checkpoint: checkpoint.to_string(),
    };
    let json = serde_json::to_vec_pretty(&named).map_err(|e| NodeError::Config(e.to_string()))?;
    std::fs::write(fresh.join(EXPORTED_FILE), json).map_err(|e| io(&fresh, e))?;
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| io(dir, e))?;
    }
    std::fs::rename(&fresh, dir).map_err(|e| io(dir, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
    }
    Ok(())
}
