//! The volunteer's role: train what the coordinator assigns, share compressed deltas, apply each commit and
//! check the result against the commit's hashes.
//!
//! For every [`RoundAnnouncement`] naming this node:
//! 1. the base checkpoint manifest is known from the last commit, or fetched by its hash (the coordinator
//!    hosts it); each assigned shard (the trunk and the node's experts) is taken from memory if its hash
//!    matches, else fetched by hash — a node never fetches shards it is not assigned;
//! 2. [`train_local`] runs off the async threads;
//! 3. each shard's delta goes through its own [`DeltaEncoder`] (error feedback: what compression dropped is
//!    added to the next round's delta), is stored and announced as a blob, and a signed
//!    [`DeltaAnnouncement`] is published — unless the delta deadline has passed (a late delta is refused
//!    anyway, and publishing it would cost this node gossip score).
//!
//! For every [`RoundCommit`] of a round the node was assigned in (trained or not), for each of its shards:
//! the accepted payloads are fetched and [`apply_shard_round`] (at the commit's weights, the trunk's router
//! biases moved by the accepted trunk payloads' expert loads) computes the new shard; its hash must equal the
//! commit's entry, and a shard with no accepted delta must keep its base hash ([`commit_check`]). If a
//! payload could not be fetched the committed shard is fetched instead (nothing is proven). If the node had
//! every payload and the hash differs, the commit is wrong: the node does not adopt it, publishes a signed
//! [`CommitDispute`] per refuted shard, logs an error, sets `halted` and `refused_commit` in its status and
//! takes no further part in the run. It also stops when its daemon catches the coordinator equivocating
//! (two different signed commits of one round, [`crate::daemon::equivocation`]). The new shards and the node's own
//! [`CheckpointManifest`] of them (hosted as a blob, its hash in `mana status`) go into the store as one
//! round; the daemon's heartbeats then report them as hosted. That manifest is also published on gossip (a
//! holder's report: peers pass it on but never sync from it), and the coordinator compares it with its commit.
//!
//! A node that was not assigned in a round keeps nothing of it; when it is named again it fetches the shards
//! it needs from the round's base (this is also how a late joiner starts).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::PeerId;
use mana_kernels::data::TextDataset;
use mana_protocol::{
    AggregationCall, Binding, Capacity, CheckpointManifest, CommitDispute, ContentHash,
    Contribution, DeltaAnnouncement, DeltaEncoder, DeltaScore, DeltaVerdict, DeviceKind, Message,
    Participant, PublicKey, RejectCode, RoundAnnouncement, RoundCommit, ShardAttestation,
    ShardCall, ShardEntry, ShardId, ShardJudgment, SignedEnvelope, decode_contribution,
    validation::l2_norm,
};
use tokio::sync::broadcast::error::RecvError;

use super::commit_check::{self, Recomputed, ShardVerdict};
use super::common::{
    PinLedger, corpus_hash, fetch_bytes, fetch_shard_bytes, peer_name, peer_of, publish_patiently,
};
use super::judge;
use super::prefetch::{Holding, Prefetcher};
use super::residuals;
use super::silence::{CoordinatorWatch, Silence};
use crate::daemon::checkpoint::{IfPresent, commit_checkpoint};
use crate::daemon::now_ms;
use crate::daemon::status::{RefusedCommit, RefutedShard};
use crate::daemon::{Accepted, NodeError, NodeHandle, blocking};
use crate::store::evidence::evidence_key;
use mana_engine::coordinator::audit::{Finding, audit_shard};
use mana_engine::coordinator::equivocation;
use mana_engine::coordinator::norm_ledger::{NormCheck, NormLedger};
use mana_engine::coordinator::{check_call_judges, judges_of};
use mana_engine::round::{
    ExpertLoads, InnerOptim, RunShard, RunSpec, ShardRecord, apply_shard_round, commit_score_seed,
    rescore, score_agrees, train_local,
};

/// How a trainer runs.
#[derive(Debug, Clone)]
pub struct TrainerConfig {
    /// The run's model and initialisation; must be the coordinator's.
    pub spec: RunSpec,
    /// The run's text; must be the coordinator's.
    pub data: Arc<TextDataset>,
    /// Most shards (trunk included) this node will host, declared in its heartbeats.
    pub max_shards: u32,
    /// Throughput declared before the first round measured one (tokens/s; 0 = unknown).
    pub tokens_per_second: f32,
    /// Longest wait for one blob (a base shard, a payload).
    pub fetch_timeout: Duration,
    /// Blobs fetched at once.
    pub fetch_concurrency: usize,
    /// How long without a word from the coordinator (past a round's deadline) before the node says so: a
    /// wrong `--run` or `--coordinator`, a run that ended, a coordinator that is down.
    pub coordinator_silence: Duration,
    /// Share of rounds, drawn by this node from the OS's randomness (so a coordinator cannot foresee them), in
    /// which it recomputes the published scores of the deltas at hand. Recomputing needs the round's whole
    /// base model, i.e. fetching every shard this node does not hold: done every round, that costs far more
    /// traffic than the deltas themselves. A round in which one of this node's own deltas was refused as
    /// `low-score` is always checked, whatever the share: that verdict costs this node its work.
    pub rescore_share: f64,
    /// Whether the node fetches its shards' deltas while their round trains, as they are announced
    /// ([`super::prefetch`]); off, it fetches them when it judges or applies the commit.
    pub prefetch: bool,
}

/// The default [`TrainerConfig::rescore_share`]: one round in ten. A coordinator that publishes a false score
/// of an accepted delta in k rounds escapes each of the delta's h holders with probability 0.9^(k·h).
pub const DEFAULT_RESCORE_SHARE: f64 = 0.1;

impl TrainerConfig {
    /// Defaults for `spec` and `data`: 64 shard slots, 60 s per fetch, 8 fetches at once, published scores
    /// recomputed in [`DEFAULT_RESCORE_SHARE`] of the rounds.
    pub fn new(spec: RunSpec, data: Arc<TextDataset>) -> TrainerConfig {
        TrainerConfig {
            spec,
            data,
            max_shards: 64,
            tokens_per_second: 0.0,
            fetch_timeout: Duration::from_secs(60),
            fetch_concurrency: 8,
            coordinator_silence: Duration::from_secs(60),
            rescore_share: DEFAULT_RESCORE_SHARE,
            prefetch: true,
        }
    }
}

/// The commit's weight of each fetched payload, in the order of `deltas`: each payload keeps the weight the
/// commit lists beside its hash (`accepted[i]` has `weights[i]`), whatever order the fetch returned them in.
fn weights_in_order(
    accepted: &[ContentHash],
    weights: &[u32],
    deltas: &[(ContentHash, Vec<f32>)],
) -> Vec<u32> {
    let weight_of: BTreeMap<ContentHash, u32> = accepted
        .iter()
        .copied()
        .zip(weights.iter().copied())
        .collect();
    deltas
        .iter()
        .map(|(h, _)| weight_of.get(h).copied().unwrap_or(0))
        .collect()
}

/// A shard this node holds: its state and the hash of its blob.
#[derive(Clone)]
struct Held {
    hash: ContentHash,
    state: Arc<ShardRecord>,
}

/// Longest the check of a commit's published scores may take (fetching the base shards this node does not
/// hold, then one evaluation per delta); past it the check is given up for that commit, with a warning.
const RESCORE_BUDGET: Duration = Duration::from_secs(30);

/// A round this node was assigned in, kept until its commit.
struct Assigned {
    announcement: RoundAnnouncement,
    me: Participant,
    /// The base state of every assigned shard, in the participant's order.
    base: BTreeMap<ShardId, Held>,
}

struct Trainer {
    node: Arc<NodeHandle>,
    cfg: TrainerConfig,
    me: PublicKey,
    held: BTreeMap<ShardId, Held>,
    encoders: BTreeMap<ShardId, DeltaEncoder>,
    /// The last commit's checkpoint and its hash: the base of the next round, without a fetch.
    last_checkpoint: Option<(ContentHash, CheckpointManifest)>,
    assigned: Option<Assigned>,
    pins: PinLedger,
    /// Who sent each delta payload of the round in progress (asked first when fetching it).
    senders: HashMap<ContentHash, PeerId>,
    /// Why the node stopped taking part in the run (a refuted commit, an equivocation); `None` while it trains.
    halted: Option<String>,
    /// The deltas this node sent in the round in progress (round, shard, payload hash), to read their fate in
    /// the round's commit.
    sent: Vec<(u64, ShardId, ContentHash)>,
    /// What the node's refusals suggest about a silent coordinator (found when the silence begins).
    silence_hint: String,
    /// This node's corpus hash, compared with each round's.
    corpus: ContentHash,
    /// Whether a corpus mismatch was logged already.
    said_corpus: bool,
    /// The last round, once the coordinator ended the run.
    ended: Option<u64>,
    /// The next states this node computed as a judge in the round in progress, by shard: a commit that takes
    /// the same deltas at the same weights is checked against them instead of computed again.
    judged: BTreeMap<ShardId, JudgedShard>,
    /// The call this node judged shards of in the round in progress, with the judgments seen for them: the
    /// commit is audited against their quorums ([`mana_engine::coordinator::audit`]).
    observed: Option<ObservedCall>,
    /// The accepted norms of the commits seen, which each call's norm history must be
    /// ([`mana_engine::coordinator::norm_ledger`]).
    norms: NormLedger,
    /// The attestation this node signed in the round in progress. A call published again (by a coordinator
    /// restarted while its judges work) is answered with it again, not judged again: a payload fetched the
    /// second time that was unavailable the first would give another judgment, which would count as an
    /// equivocation ([`mana_engine::coordinator::equivocation`]).
    signed: Option<ShardAttestation>,
    /// The last commit's shards this node holds but could not fetch when it applied the commit: fetched again
    /// until they come or a round is announced (whose base sync fetches what it needs). Without it a holder
    /// whose fetch failed at a run's last commit would hold an old state for good.
    unfetched: Option<Unfetched>,
    /// The run's end, heard before this node's last round was applied: if that round's commit has not come
    /// by then, the node takes its shards' final states from the end's checkpoint ([`Trainer::catch_up_end`]).
    /// Without it a member that missed the last commit would hold the round before for good.
    end_pending: Option<EndPending>,
    /// Fetches the round's deltas of this node's shards as they are announced ([`super::prefetch`]).
    prefetch: Prefetcher,
    /// The inner optimizer's moments from this node's last diloco round, carried into its next
    /// ([`mana_engine::round::local`]); empty after a restart, and while a round trains (it is moved into it).
    inner: InnerOptim,
}

/// The run ended with this node's round `round` not applied.
struct EndPending {
    round: u64,
    /// The run's final checkpoint (its manifest's hash), as the end named it.
    checkpoint: ContentHash,
    /// When to stop waiting for the commit (or to try the checkpoint again).
    due: Instant,
}

/// How long a trainer that heard the run's end waits for its last round's commit before taking the final
/// checkpoint instead: the coordinator sends the commit first, so a commit still missing by then was lost.
const END_GRACE: Duration = Duration::from_secs(10);

/// A commit applied but for some of this node's shards, whose committed states could not be fetched.
struct Unfetched {
    round: u64,
    checkpoint: CheckpointManifest,
    entries: Vec<ShardEntry>,
    /// When to try again (backing off: [`REFETCH_FIRST`] doubling up to [`REFETCH_MOST`]).
    next_try: Instant,
    wait: Duration,
}

/// The first wait before fetching a commit's shards again.
const REFETCH_FIRST: Duration = Duration::from_secs(2);
/// The longest wait between two tries.
const REFETCH_MOST: Duration = Duration::from_secs(60);

/// Most attestations kept for the audit of one round (each judged shard has at most 64 judges).
const MAX_OBSERVED_ATTESTATIONS: usize = 4096;

/// A call this node judged, and the judgments its judges signed for the shards this node judged, as seen on
/// gossip (the first each judge signed for a shard), with their envelopes (the evidence of a finding).
struct ObservedCall {
    call: Arc<AggregationCall>,
    id: ContentHash,
    envelope: Arc<SignedEnvelope>,
    /// The shards this node judged.
    judged: Vec<ShardId>,
    seen: BTreeMap<ShardId, BTreeMap<PublicKey, (ShardJudgment, Arc<SignedEnvelope>)>>,
    kept: usize,
}

/// A shard's next state as this node computed it when it judged the shard, with what it was computed from.
struct JudgedShard {
    /// The accepted payloads, in the call's order, and their weights.
    accepted: Vec<ContentHash>,
    weights: Vec<u32>,
    /// The new state and its blob's hash (hosted and pinned for the round).
    next: Held,
    /// The accepted deltas, decoded (for the check of the commit's published scores).
    payloads: Vec<(ContentHash, Arc<Vec<f32>>)>,
}

/// Runs the trainer on `node` until `shutdown` completes. The node must follow a coordinator
/// (`NodeConfig::coordinator`) and must not sync every checkpoint (`NodeConfig::sync_shards = false`).
pub async fn run_trainer(
    node: Arc<NodeHandle>,
    cfg: TrainerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    // Its log lines say which role wrote them (a span at error level: shown whatever the log level).
    tracing::Instrument::instrument(
        trainer_loop(node, cfg, shutdown),
        tracing::error_span!("trainer"),
    )
    .await
}

async fn trainer_loop(
    node: Arc<NodeHandle>,
    cfg: TrainerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    if node.config().coordinator.is_none() {
        return Err(NodeError::Config(
            "a trainer needs the run's coordinator key".into(),
        ));
    }
    if node.config().sync_shards {
        return Err(NodeError::Config(
            "a trainer fetches only its assigned shards: start the node with sync_shards = false"
                .into(),
        ));
    }
    node.set_capacity(Capacity {
        device: DeviceKind::Cpu,
        memory_bytes: 0,
        tokens_per_second: cfg.tokens_per_second,
        max_shards: cfg.max_shards,
    });
    node.update_training_status(|s| s.activity = "waiting for a round".into());
    let mut messages = node.round_messages();
    let me = node.public_key();
    let cfg_data = cfg.data.clone();
    let cfg_fetch_concurrency = cfg.fetch_concurrency;
    let mut trainer = Trainer {
        node,
        cfg,
        me,
        held: BTreeMap::new(),
        encoders: BTreeMap::new(),
        last_checkpoint: None,
        assigned: None,
        pins: PinLedger::default(),
        senders: HashMap::new(),
        halted: None,
        sent: Vec::new(),
        silence_hint: String::new(),
        corpus: corpus_hash(&cfg_data),
        said_corpus: false,
        ended: None,
        judged: BTreeMap::new(),
        observed: None,
        norms: NormLedger::new(),
        signed: None,
        unfetched: None,
        end_pending: None,
        prefetch: Prefetcher::new(cfg_fetch_concurrency),
        inner: InnerOptim::new(),
    };
    trainer.resume_refusal().await;
    let mut watch = CoordinatorWatch::new(Instant::now(), trainer.cfg.coordinator_silence);
    let mut watch_tick = tokio::time::interval(Duration::from_secs(1));
    watch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    // Messages that came while a call was judged, taken before any newer one.
    let mut backlog: VecDeque<Accepted> = VecDeque::new();
    loop {
        let accepted = if let Some(kept) = backlog.pop_front() {
            Ok(kept)
        } else {
            tokio::select! {
            _ = &mut shutdown => break,
            m = messages.recv() => m,
            _ = watch_tick.tick() => {
                if let Some(at) = trainer.node.coordinator_alive_at() {
                    watch.alive(at);
                }
                if trainer.halted.is_none() {
                    trainer.say_silence(&mut watch).await;
                    trainer.refetch().await;
                    trainer.catch_up_end().await;
                }
                continue;
            }
            }
        };
        let (signer, message, envelope) = match accepted {
            Ok(a) => (a.signer, a.message, a.envelope),
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(skipped = n, "trainer fell behind the message stream");
                continue;
            }
            Err(RecvError::Closed) => break,
        };
        trainer.check_equivocation();
        if trainer.halted.is_some() {
            if let Message::RoundAnnouncement(ann) = &message {
                trainer.decline(ann);
            }
            continue;
        }
        match &message {
            Message::RoundAnnouncement(ann) => {
                let quiet =
                    Duration::from_millis(ann.deadlines.commit_by_ms.saturating_sub(now_ms()));
                watch.heard(Instant::now(), ann.round, quiet);
            }
            Message::RoundCommit(commit) => {
                watch.heard(Instant::now(), commit.round, Duration::ZERO)
            }
            _ => {}
        }
        // The coordinator's rounds rebuild the norm history its calls must carry.
        if trainer.node.config().coordinator == Some(signer) {
            match &message {
                Message::RoundAnnouncement(ann) => trainer.norms.announced(ann),
                Message::AggregationCall(call) => trainer.norms.called(call),
                Message::RoundCommit(commit) => trainer.norms.committed(commit),
                _ => {}
            }
        }
        let result = match message {
            Message::RoundAnnouncement(ann) => trainer.on_announcement(ann).await,
            Message::RoundCommit(commit) => trainer.on_commit(commit, envelope).await,
            Message::AggregationCall(call) => {
                // Judged while the messages that follow are kept for after; once the round is committed (or a
                // later one begun) the judgment would no longer count, and the next round must not wait for it.
                let round = call.round;
                tokio::select! {
                    judged = trainer.on_call(call, envelope) => judged,
                    () = superseded(&mut messages, &mut backlog, round) => {
                        tracing::info!(round, "judging given up: the round was committed, or a later one begun, first");
                        trainer.node.update_training_status(|s| {
                            s.judgings_given_up += 1;
                            s.activity = format!("round {round}: judging given up (the round committed first)");
                        });
                        Ok(())
                    }
                }
            }
            Message::ShardAttestation(a) => {
                trainer.on_attestation(signer, a, envelope).await;
                Ok(())
            }
            Message::RunEnd(end) => {
                trainer.on_run_end(&end);
                Ok(())
            }
            Message::DeltaAnnouncement(d) => {
                if let Some(peer) = peer_of(&signer) {
                    trainer.senders.insert(d.payload_hash, peer);
                }
                trainer.prefetch_delta(&signer, &d);
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "trainer step failed");
            trainer
                .node
                .update_training_status(|s| s.activity = format!("error: {e}"));
        }
    }
    Ok(())
}

/// Completes once a message comes that makes round `round`'s judging pointless: its commit, a later round's
/// announcement, or the run's end. Every message received meanwhile, that one included, is kept in `backlog`,
/// in order, for the loop to take after (a lagging or closed stream ends nothing: the judging then finishes).
async fn superseded(
    messages: &mut tokio::sync::broadcast::Receiver<Accepted>,
    backlog: &mut VecDeque<Accepted>,
    round: u64,
) {
    loop {
        match messages.recv().await {
            Ok(accepted) => {
                let over = match &accepted.message {
                    Message::RoundCommit(c) => c.round >= round,
                    Message::RoundAnnouncement(a) => a.round > round,
                    Message::RunEnd(_) => true,
                    _ => false,
                };
                backlog.push_back(accepted);
                if over {
                    return;
                }
            }
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(skipped = n, "trainer fell behind the message stream");
            }
            Err(RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

impl Trainer {
    /// Hands a delta announcement to the prefetcher (see [`super::prefetch`]), pinning what it fetches for
    /// the round.
    fn prefetch_delta(&mut self, signer: &PublicKey, delta: &DeltaAnnouncement) {
        let Some(assigned) = self.assigned.as_ref().filter(|_| self.cfg.prefetch) else {
            return;
        };
        let holds = Holding {
            spec: &self.cfg.spec,
            ann: &assigned.announcement,
            shards: &assigned.me.shards,
            me: &self.me,
        };
        let started =
            self.prefetch
                .offer(&self.node, &holds, signer, delta, self.cfg.fetch_timeout);
        if let Some(hash) = started {
            self.pins.add(delta.round, hash);
        }
    }

    /// The coordinator ended the run: say so (for good; a new run is another run id). The last round's
    /// assignment stays until its commit is applied: the end may overtake the commit on its way (they travel
    /// as two messages, by whatever paths gossip takes), and a holder that dropped it would never apply the
    /// last commit.
    fn on_run_end(&mut self, end: &mana_protocol::RunEnd) {
        if self.ended == Some(end.round) {
            // Said again (a coordinator repeats it while it waits for the last evaluation).
            return;
        }
        match self.assigned.as_ref().map(|a| a.announcement.round) {
            Some(round) if round == end.round => {
                self.end_pending = Some(EndPending {
                    round,
                    checkpoint: end.checkpoint,
                    due: Instant::now() + END_GRACE,
                });
            }
            Some(_) => self.assigned = None,
            None => {}
        }
        self.ended = Some(end.round);
        let text = format!(
            "the run ended after round {} (final checkpoint {})",
            end.round,
            &end.checkpoint.to_string()[..16]
        );
        tracing::info!("{text}");
        let round = end.round;
        self.node.update_training_status(|s| {
            s.activity = text;
            s.run_ended = Some(round);
        });
    }

    /// Says (in the status, and once in the log) that the coordinator has not been heard, and what may be
    /// wrong.
    async fn say_silence(&mut self, watch: &mut CoordinatorWatch) {
        if self.ended.is_some() {
            return;
        }
        let text = match watch.check(Instant::now()) {
            Silence::Heard => return,
            Silence::NeverHeard(waited) => {
                let run = self.node.config().net.run_id.clone();
                let key = self
                    .node
                    .config()
                    .coordinator
                    .map(|k| hex::encode(k.0))
                    .unwrap_or_default();
                format!(
                    "no round from coordinator {key} on run {run} in {} s: check --run and --coordinator",
                    waited.as_secs()
                )
            }
            Silence::Waiting(waited) => format!(
                "the coordinator is up but has announced no round in {} s: it waits for enough members",
                waited.as_secs()
            ),
            Silence::Silent { round, for_ } => format!(
                "coordinator silent for {} s since round {round}: the run may have ended, or the coordinator is down",
                for_.as_secs()
            ),
        };
        if watch.first_time() {
            // What this node refused says more: announcements signed by another key, or for another run.
            self.silence_hint = match self.node.status().await {
                Ok(s) => {
                    let count = |code: &str| s.rejections.by_reason.get(code).copied().unwrap_or(0);
                    let (key, run) = (count("not-coordinator"), count("unknown-run"));
                    let mut hint = String::new();
                    if key > 0 {
                        hint.push_str(&format!(
                            " ({key} message(s) signed by another coordinator key were refused)"
                        ));
                    }
                    if run > 0 {
                        hint.push_str(&format!(" ({run} message(s) of another run were refused)"));
                    }
                    hint
                }
                Err(_) => String::new(),
            };
            tracing::warn!("{text}{}", self.silence_hint);
        }
        let activity = format!("{text}{}", self.silence_hint);
        self.node.update_training_status(|s| s.activity = activity);
    }

    /// Stops taking part in the run for `reason` (said in the log and the status); for good.
    fn halt(&mut self, reason: String) {
        tracing::error!(%reason, "trainer stops taking part in the run");
        self.assigned = None;
        let why = reason.clone();
        self.node.update_training_status(|s| {
            s.activity = format!("stopped: {why}");
            s.halted = Some(why);
        });
        self.halted = Some(reason);
    }

    /// Halts again if an earlier run of this node refused a commit of this run (kept in its store).
    async fn resume_refusal(&mut self) {
        let store = self.node.store().clone();
        let run = self.node.config().net.run_id.clone();
        let found = blocking(move || {
            for (key, blobs) in store.evidence()? {
                if commit_check::is_refusal_in(&key, &run)
                    && let Some(hash) = blobs.first()
                    && let Ok(refused) =
                        serde_json::from_slice::<RefusedCommit>(&store.get_blob(hash)?)
                {
                    return Ok(Some(refused));
                }
            }
            Ok(None)
        })
        .await;
        match found {
            Ok(Some(refused)) => {
                let reason = format!(
                    "round {}: this node refused the coordinator's commit earlier (kept in its store); not building on this run",
                    refused.round
                );
                self.node
                    .update_training_status(|s| s.refused_commit = Some(refused));
                self.halt(reason);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "kept refusals unreadable"),
        }
    }

    /// Halts if the daemon caught the coordinator equivocating.
    fn check_equivocation(&mut self) {
        if self.halted.is_some() {
            return;
        }
        if let Some(e) = self.node.equivocations().first() {
            self.halt(format!(
                "the coordinator signed two different commits for round {} (evidence in the store); not building on this run",
                e.round
            ));
        }
    }

    /// A round announced after the node stopped: not taken part in, and said so.
    fn decline(&mut self, ann: &RoundAnnouncement) {
        if ann.participant(&self.me).is_none() {
            return;
        }
        let round = ann.round;
        tracing::warn!(round, reason = ?self.halted, "named in a round after stopping; not taking part");
        self.node.update_training_status(|s| {
            s.rounds_declined += 1;
            s.activity = format!("round {round}: not taking part (stopped)");
        });
    }

    /// The coordinator's peer: it hosts the checkpoint manifests (never a shard or a payload).
    fn coordinator_peer(&self) -> Vec<PeerId> {
        self.node
            .config()
            .coordinator
            .as_ref()
            .and_then(peer_of)
            .into_iter()
            .collect()
    }

    async fn on_announcement(&mut self, ann: RoundAnnouncement) -> Result<(), NodeError> {
        self.senders.clear();
        self.judged.clear();
        self.observed = None;
        self.signed = None;
        // The round's base sync fetches what the last commit's apply could not.
        self.unfetched = None;
        self.end_pending = None;
        self.forget_sent_before(ann.round);
        let Some(me) = ann.participant(&self.me).cloned() else {
            self.assigned = None;
            self.prefetch.stop();
            return Ok(());
        };
        let round = ann.round;
        if ann.corpus != ContentHash([0; 32]) && ann.corpus != self.corpus {
            // Training on other text would send deltas that pull the model elsewhere (a node given another
            // corpus contributed at loss 3.09 beside 1.5): say so, and sit the round out.
            self.assigned = None;
            self.prefetch.stop();
            let text = format!(
                "round {round}: not training: this node's corpus (hash {}) is not the run's ({}); start it with the run's --corpus",
                &self.corpus.to_string()[..16],
                &ann.corpus.to_string()[..16]
            );
            if !self.said_corpus {
                tracing::error!("{text}");
                self.said_corpus = true;
            }
            self.node.update_training_status(|s| s.activity = text);
            return Ok(());
        }
        self.node
            .update_training_status(|s| s.activity = format!("round {round}: fetching the base"));
        // How long this node had left when it took the round up, and what its base cost: a node that trains
        // past the deadline says which of the two (its loop behind, or its fetches slow) took the time.
        let left_s = ann.deadlines.deltas_by_ms.saturating_sub(now_ms()) as f64 / 1000.0;
        let fetching = Instant::now();
        let manifest = self.base_manifest(ann.base_checkpoint, round).await?;
        let base = self.base_shards(&manifest, &me.shards, round).await?;
        let base_s = fetching.elapsed().as_secs_f64();
        // What this node no longer hosts is dropped, with its error-feedback residual.
        self.held.retain(|s, _| me.shards.contains(s));
        let dropped: Vec<ShardId> = self
            .encoders
            .keys()
            .filter(|s| !me.shards.contains(s))
            .copied()
            .collect();
        for shard in dropped {
            self.encoders.remove(&shard);
            residuals::forget(&self.node, &ann.run, shard).await;
        }
        self.assigned = Some(Assigned {
            announcement: ann.clone(),
            me: me.clone(),
            base: base.clone(),
        });
        self.prefetch.begin(round);
        if now_ms() > ann.deadlines.deltas_by_ms {
            // Deltas made now would be refused as late: the CPU goes to the others (the node still judges and
            // applies the round as a holder).
            tracing::warn!(
                round,
                left_s,
                base_s,
                "took the round up past its delta deadline; not training in it"
            );
            self.node.update_training_status(|s| {
                s.rounds_missed += 1;
                s.activity = format!("round {round}: taken up too late to train");
            });
            return Ok(());
        }

        self.node
            .update_training_status(|s| s.activity = format!("round {round}: training"));
        let started = Instant::now();
        let spec = self.cfg.spec.clone();
        let data = self.cfg.data.clone();
        let states: Vec<ShardRecord> = me
            .shards
            .iter()
            .filter_map(|s| base.get(s))
            .map(|h| (*h.state).clone())
            .collect();
        let (ann2, me2) = (ann.clone(), me.clone());
        let mut inner = std::mem::take(&mut self.inner);
        let (result, inner) = blocking(move || {
            let result = train_local(&spec, &ann2, &me2, &states, &data, &mut inner);
            result.map(|r| (r, inner)).map_err(NodeError::from)
        })
        .await?;
        self.inner = inner;
        let train_s = started.elapsed().as_secs_f64();
        if now_ms() > ann.deadlines.deltas_by_ms {
            tracing::warn!(
                round,
                left_s,
                base_s,
                train_s,
                "trained past the delta deadline; deltas not sent"
            );
            self.node.update_training_status(|s| {
                s.activity = format!("round {round}: too slow for the deadline")
            });
            return Ok(());
        }
        if train_s > 0.0 && result.stats.tokens > 0 {
            self.node.set_capacity(Capacity {
                device: DeviceKind::Cpu,
                memory_bytes: 0,
                tokens_per_second: (result.stats.tokens as f64 / train_s) as f32,
                max_shards: self.cfg.max_shards,
            });
        }
        // The daemon may have caught the coordinator equivocating while this node trained.
        self.check_equivocation();
        if self.halted.is_some() {
            return Ok(());
        }
        let mut sent = 0u64;
        let mut bytes = 0u64;
        for (kshard, delta) in result.deltas {
            let shard = kshard;
            // The residual goes on from the store after a restart (see `residuals`).
            if !self.encoders.contains_key(&shard) {
                let restored =
                    residuals::load(&self.node, &ann.run, shard, ann.hyper.codec, delta.len())
                        .await?;
                self.encoders.insert(shard, restored);
            }
            let Some(encoder) = self.encoders.get_mut(&shard) else {
                continue;
            };
            if encoder.options() != &ann.hyper.codec {
                *encoder = DeltaEncoder::new(ann.hyper.codec).map_err(NodeError::from)?;
            }
            let binding = Binding {
                run: ann.run.clone(),
                round,
                shard,
                sender: self.node.public_key(),
            };
            // The trunk's contribution carries the expert loads of this node's training (for the router
            // biases, see `mana_engine::round::balance`); an expert's carries none.
            let loads: &[u32] = if shard == ShardId::Trunk {
                &result.expert_tokens
            } else {
                &[]
            };
            let payload = binding.wrap(loads, &encoder.encode(&delta).map_err(NodeError::from)?)?;
            if let Err(e) = residuals::save(&self.node, &ann.run, shard, round, encoder).await {
                tracing::warn!(round, %shard, error = %e, "error-feedback residual not stored; a restart would lose it");
            }
            let mut stats = result.stats;
            stats.delta_norm = l2_norm(&delta);
            let size = payload.len() as u64;
            let hash = self.node.host_blob_now(payload).await?;
            self.pins.add(round, hash);
            let announcement = DeltaAnnouncement {
                run: ann.run.clone(),
                round,
                shard,
                base_checkpoint: ann.base_checkpoint,
                payload_hash: hash,
                payload_size: size,
                stats,
            };
            let patience =
                Duration::from_millis(ann.deadlines.deltas_by_ms.saturating_sub(now_ms()));
            publish_patiently(
                &self.node,
                &Message::DeltaAnnouncement(announcement),
                patience,
            )
            .await?;
            sent += 1;
            bytes += size;
            self.sent.push((round, shard, hash));
        }
        let loss = result.stats.loss_before;
        tracing::info!(
            round,
            deltas = sent,
            bytes,
            loss,
            train_s,
            "deltas published"
        );
        self.node.update_training_status(|s| {
            s.rounds_trained += 1;
            s.deltas_sent += sent;
            s.delta_bytes_sent += bytes;
            s.last_train_loss = Some(loss);
            crate::daemon::status::push_loss(
                &mut s.loss_curve,
                crate::daemon::status::LossPoint {
                    round,
                    train: Some(loss),
                    val: None,
                },
            );
            s.activity = format!("round {round}: deltas sent, waiting for the commit");
        });
        Ok(())
    }

    /// The manifest whose hash is `hash`: the last commit's, or fetched (and then pinned for `round`).
    async fn base_manifest(
        &mut self,
        hash: ContentHash,
        round: u64,
    ) -> Result<CheckpointManifest, NodeError> {
        if let Some((h, m)) = &self.last_checkpoint
            && *h == hash
        {
            return Ok(m.clone());
        }
        let bytes = fetch_bytes(
            &self.node,
            hash,
            self.coordinator_peer(),
            self.cfg.fetch_timeout,
        )
        .await?;
        self.pins.add(round, hash);
        let manifest = CheckpointManifest::from_bytes(&bytes)?;
        self.last_checkpoint = Some((hash, manifest.clone()));
        Ok(manifest)
    }

    /// The base state of each of `shards` in `manifest`: held ones whose hash matches, the others fetched.
    async fn base_shards(
        &mut self,
        manifest: &CheckpointManifest,
        shards: &[ShardId],
        round: u64,
    ) -> Result<BTreeMap<ShardId, Held>, NodeError> {
        let mut out = BTreeMap::new();
        let mut missing = Vec::new();
        for shard in shards {
            let entry = manifest.shard(shard).ok_or(NodeError::MissingShard {
                round,
                shard: *shard,
            })?;
            // Held at the base's hash; else fetched.
            match self.held.get(shard).filter(|h| h.hash == entry.hash) {
                Some(h) => {
                    out.insert(*shard, h.clone());
                }
                None => missing.push(*entry),
            }
        }
        let fetched = self.fetch_shards(&missing, round).await?;
        for (entry, state) in fetched {
            let held = Held {
                hash: entry.hash,
                state: Arc::new(state),
            };
            self.held.insert(entry.shard, held.clone());
            out.insert(entry.shard, held);
        }
        Ok(out)
    }

    /// Fetches and decodes shard blobs, a few at a time.
    async fn fetch_shards(
        &mut self,
        entries: &[ShardEntry],
        round: u64,
    ) -> Result<Vec<(ShardEntry, ShardRecord)>, NodeError> {
        let mut out = Vec::new();
        for (entry, result) in self.fetch_each(entries, round).await {
            out.push((entry, result?));
        }
        Ok(out)
    }

    /// Fetches and decodes shard blobs, a few at a time: each one's outcome (the fetched ones pinned for
    /// `round`).
    async fn fetch_each(
        &mut self,
        entries: &[ShardEntry],
        round: u64,
    ) -> Vec<(ShardEntry, Result<ShardRecord, NodeError>)> {
        let node = self.node.clone();
        let (timeout, spec) = (self.cfg.fetch_timeout, self.cfg.spec.clone());
        let results: Vec<(ShardEntry, Result<ShardRecord, NodeError>)> =
            futures::stream::iter(entries.iter().copied())
                .map(|entry| {
                    let (node, spec) = (node.clone(), spec.clone());
                    // A round-0 shard is made here; a later one is asked of the judges that signed it and
                    // the holders that reported it (the daemon heard them), then of the DHT's providers.
                    async move {
                        let state = async {
                            let bytes = fetch_shard_bytes(&node, entry, &spec, timeout).await?;
                            blocking(move || {
                                ShardRecord::from_bytes(&bytes, &spec, entry.shard)
                                    .map_err(NodeError::from)
                            })
                            .await
                        }
                        .await;
                        (entry, state)
                    }
                })
                .buffer_unordered(self.cfg.fetch_concurrency.max(1))
                .collect()
                .await;
        for (entry, state) in &results {
            if state.is_ok() {
                self.pins.add(round, entry.hash);
            }
        }
        results
    }

    /// The coordinator's call for the round's judgments (it is the only one who may sign one: validation
    /// checks the signer). For each shard this node judges (as a holder, or as a drawn verifier), checks and
    /// scores every delta and computes the shard's next state from the ones it accepts ([`judge::judge_shard`]),
    /// hosts the new blob and signs its verdicts and results in one [`ShardAttestation`]. A verifier fetches
    /// the shard's base state by its hash in the base checkpoint, and the trunk's if it does not hold it. A
    /// shard whose base cannot be had is left out: a judge signs only what it computed. A call that does not
    /// reveal the seed secret the announcement committed to is not answered (the score batches would be the
    /// coordinator's choice), nor one whose norm history is not what the commits published, nor one whose
    /// judges are not the public draw (`check_call_judges`): each of those is counted and kept as evidence.
    async fn on_call(
        &mut self,
        call: AggregationCall,
        envelope: Arc<SignedEnvelope>,
    ) -> Result<(), NodeError> {
        let Some(assigned) = self.assigned.as_ref() else {
            return Ok(());
        };
        let ann = assigned.announcement.clone();
        if ann.run != call.run
            || ann.round != call.round
            || ann.base_checkpoint != call.base_checkpoint
        {
            return Ok(());
        }
        if !call.reveals_seed_of(&ann) {
            tracing::error!(
                round = call.round,
                "the call's seed secret is not the one the announcement committed to; not judged"
            );
            return Ok(());
        }
        let Some(me) = ann.participants.iter().position(|p| p.node == self.me) else {
            return Ok(());
        };
        if let NormCheck::Forged(what) = self.norms.check(&call) {
            // The norm bounds would follow a history the commits never published: judging by it would sign
            // the coordinator's verdicts. The signed call is the evidence (the commits are public).
            let why = format!("its norm history is not what the commits published: {what}");
            self.refuse_call(call.round, &envelope, b"/norm-history-forged", why)
                .await;
            return Ok(());
        }
        // The base checkpoint tells which shards are escalated (twice the verifiers) in the draw.
        let manifest = self.base_manifest(ann.base_checkpoint, call.round).await?;
        if let Err(mismatch) = check_call_judges(&ann, &call, &manifest) {
            // The coordinator named judges of its own choosing: a quorum of them could carry any result. The
            // signed call is the evidence (the draw is public: the seed secret is in it).
            let why = format!("its judges are not the public draw: {mismatch}");
            self.refuse_call(call.round, &envelope, b"/judges-not-drawn", why)
                .await;
            return Ok(());
        }
        let me = me as u32;
        let Some(assigned) = self.assigned.as_ref() else {
            return Ok(());
        };
        let held: BTreeMap<ShardId, Arc<ShardRecord>> = assigned
            .base
            .iter()
            .map(|(s, h)| (*s, h.state.clone()))
            .collect();
        let round = call.round;
        let call = Arc::new(call);
        let id = call.hash()?;
        if let Some(signed) = self.signed.clone().filter(|a| a.call == id) {
            // The same call again: the same judgment again (see `signed`).
            tracing::info!(
                round,
                "the call published again: the judgment signed for it sent again"
            );
            let message = Message::ShardAttestation(signed);
            publish_patiently(&self.node, &message, Duration::from_secs(5)).await?;
            return Ok(());
        }
        let mine: Vec<&ShardCall> = call
            .shards
            .iter()
            .filter(|p| p.holders.contains(&me) || p.verifiers.contains(&me))
            .collect();
        let judged_shards: Vec<ShardId> = mine.iter().map(|p| p.shard).collect();
        // Kept before judging: other judges' attestations may come while this node still works.
        self.observed = Some(ObservedCall {
            call: call.clone(),
            id,
            envelope,
            judged: judged_shards,
            seen: BTreeMap::new(),
            kept: 0,
        });
        let mut results = Vec::new();
        let mut judged = 0u64;
        for part in mine {
            let shard = part.shard;
            let Some(base_entry) = manifest.shard(&shard).copied() else {
                tracing::warn!(round, %shard, "a called shard is not in the round's base checkpoint; not judged");
                continue;
            };
            let mut base = Vec::new();
            let needed = if shard == ShardId::Trunk {
                vec![ShardId::Trunk]
            } else {
                vec![ShardId::Trunk, shard]
            };
            for needed in needed {
                let state = match held.get(&needed) {
                    Some(state) => state.clone(),
                    None => match self.judged_base(&ann, needed).await {
                        Ok(state) => state,
                        Err(e) => {
                            tracing::warn!(round, shard = %needed, error = %e, "the base of a shard to judge could not be had; not judged");
                            base.clear();
                            break;
                        }
                    },
                };
                base.push((*state).clone());
            }
            if base.is_empty() {
                continue;
            }
            // Each payload's fetch gets at most half of what is left of the window, so that the scores and
            // the new state of what did arrive are still signed before the commit deadline.
            let left = ann
                .deadlines
                .commit_by_ms
                .saturating_sub(now_ms())
                .max(2000);
            let input = judge::ShardInput {
                announcement: ann.clone(),
                call: call.clone(),
                shard,
                base,
                spec: self.cfg.spec.clone(),
                data: self.cfg.data.clone(),
                fetch_budget: self.cfg.fetch_timeout.min(Duration::from_millis(left / 2)),
                concurrency: self.cfg.fetch_concurrency,
            };
            let outcome = match judge::judge_shard(self.node.clone(), input).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(round, %shard, error = %e, "shard not judged");
                    continue;
                }
            };
            for hash in &outcome.fetched {
                self.pins.add(round, *hash);
            }
            judged += part.deltas.len() as u64;
            let refused = outcome
                .verdicts
                .iter()
                .filter(|v| matches!(v, DeltaVerdict::Refuse(_)))
                .count();
            tracing::info!(round, %shard, deltas = part.deltas.len(), refused, transfer_ms = outcome.transfer_ms, judge_ms = outcome.judge_ms, "shard judged");
            let entry = match outcome.next {
                Some(next) => {
                    let bytes = next.to_bytes();
                    let size = bytes.len() as u64;
                    let hash = self.node.host_blob_now(bytes).await?;
                    self.pins.add(round, hash);
                    let hashes: Vec<ContentHash> =
                        outcome.accepted.iter().map(|(h, _)| *h).collect();
                    self.judged.insert(
                        shard,
                        JudgedShard {
                            accepted: hashes,
                            weights: outcome.weights,
                            next: Held {
                                hash,
                                state: Arc::new(next),
                            },
                            payloads: outcome
                                .accepted
                                .into_iter()
                                .map(|(h, d)| (h, Arc::new(d)))
                                .collect(),
                        },
                    );
                    ShardEntry {
                        shard,
                        hash,
                        size,
                        round,
                    }
                }
                // No delta accepted: the shard stays as it was.
                None => base_entry,
            };
            results.push(ShardJudgment {
                entry,
                verdicts: outcome.verdicts,
                scores: outcome.scores,
            });
        }
        if results.is_empty() {
            return Ok(());
        }
        let n = results.len() as u64;
        let attestation = ShardAttestation {
            run: call.run.clone(),
            round,
            call: id,
            results,
        };
        let message = Message::ShardAttestation(attestation.clone());
        // Its own judgment counts in the audit of the commit like the others' (gossip does not echo it).
        match self.node.sign(&message) {
            Ok(own) => {
                self.on_attestation(self.me, attestation.clone(), Arc::new(own))
                    .await
            }
            Err(e) => tracing::warn!(round, error = %e, "own attestation not kept for the audit"),
        }
        self.signed = Some(attestation);
        publish_patiently(&self.node, &message, Duration::from_secs(5)).await?;
        self.node.update_training_status(|s| {
            s.shards_attested += n;
            s.deltas_judged += judged;
            s.activity = format!("round {round}: judgments signed");
        });
        Ok(())
    }

    /// The holders' update of one shard in `ann`'s round for a commit's check (a judge that computed the same
    /// update keeps it: [`JudgedShard`]): the `accepted` payloads, fetched, decoded and pinned for the round,
    /// applied to `base` at `weights` ([`apply_shard_round`]). Returns the new state with the decoded
    /// payloads (kept for the score check), or, inside, the error of a payload that could not be had (which
    /// proves nothing about the shard); the outer error is the update's own failure.
    async fn next_state(
        &mut self,
        ann: &RoundAnnouncement,
        base: Arc<ShardRecord>,
        accepted: &[ContentHash],
        weights: &[u32],
    ) -> Result<Result<(ShardRecord, Vec<(ContentHash, Vec<f32>)>), NodeError>, NodeError> {
        let fetched = self.fetch_deltas(accepted, base.params.len()).await;
        for hash in accepted {
            self.pins.add(ann.round, *hash);
        }
        let (deltas, loads) = match fetched {
            Ok(d) => d,
            Err(e) => return Ok(Err(e)),
        };
        let weights = weights_in_order(accepted, weights, &deltas);
        let (spec, ann) = (self.cfg.spec.clone(), ann.clone());
        // The payloads come back from the update (no copy).
        let applied = blocking(move || {
            let next = apply_shard_round(&spec, &ann, &base, &deltas, &weights, &loads)?;
            Ok((next, deltas))
        })
        .await?;
        Ok(Ok(applied))
    }

    /// The round's base state of `shard`, which this node does not hold: fetched by its hash in the round's
    /// base checkpoint (a drawn verifier's case).
    async fn judged_base(
        &mut self,
        ann: &RoundAnnouncement,
        shard: ShardId,
    ) -> Result<Arc<ShardRecord>, NodeError> {
        let manifest = self.base_manifest(ann.base_checkpoint, ann.round).await?;
        let entry = *manifest.shard(&shard).ok_or(NodeError::MissingShard {
            round: ann.round,
            shard,
        })?;
        let mut fetched = self.fetch_shards(&[entry], ann.round).await?;
        match fetched.pop() {
            Some((_, state)) => Ok(Arc::new(state)),
            None => Err(NodeError::MissingShard {
                round: ann.round,
                shard,
            }),
        }
    }

    /// A judge's attestation seen on gossip (this node's own included): kept for the audit of the commit when
    /// it answers the call this node judged, for a shard this node judged, from one of that shard's judges.
    /// A judge that signs another judgment of a shard than the one kept from it equivocated: its judgment is
    /// voided, as the coordinator voids it ([`equivocation`]), and its two signed attestations are kept in
    /// the store as the proof.
    async fn on_attestation(
        &mut self,
        signer: PublicKey,
        attestation: ShardAttestation,
        envelope: Arc<SignedEnvelope>,
    ) {
        let round = attestation.round;
        let mut equivocated = Vec::new();
        let Some(observed) = self.observed.as_mut() else {
            return;
        };
        let Some(ann) = self.assigned.as_ref().map(|a| &a.announcement) else {
            return;
        };
        if attestation.call != observed.id || observed.kept >= MAX_OBSERVED_ATTESTATIONS {
            return;
        }
        for judgment in attestation.results {
            let shard = judgment.entry.shard;
            let Some(part) = observed.call.shard(&shard) else {
                continue;
            };
            if !observed.judged.contains(&shard) || !judges_of(ann, part).contains(&signer) {
                continue;
            }
            let seen = observed.seen.entry(shard).or_default();
            match seen.get_mut(&signer) {
                None => {
                    seen.insert(signer, (judgment, envelope.clone()));
                    observed.kept += 1;
                }
                Some((kept, first)) => {
                    if equivocation::equivocates(kept, &judgment) {
                        *kept = equivocation::void_of(kept);
                        equivocated.push((shard, first.clone()));
                    }
                }
            }
        }
        for (shard, first) in equivocated {
            let text = format!(
                "round {round}, {shard}: judge {} signed two judgments (both void; the two attestations are kept)",
                peer_name(&signer)
            );
            tracing::warn!("{text}");
            if let (Ok(a), Ok(b)) = (first.encode(), envelope.encode()) {
                let shard_name = shard.to_string();
                let key = evidence_key(
                    round,
                    &[
                        b"/judge-equivocated/",
                        shard_name.as_bytes(),
                        b"/",
                        &signer.0,
                    ],
                );
                self.keep_evidence(key, vec![a, b]).await;
            }
            self.node.update_training_status(|s| {
                s.judges_equivocated += 1;
                s.last_audit_finding = Some(text);
            });
        }
    }

    /// Audits `commit` against the quorums this node saw for the shards it judged: a commit that records
    /// other verdicts or another result than a quorum signed is logged as an error, counted and kept with
    /// its evidence (the signed call, the quorum's attestations, the signed commit); one that holds a shard a
    /// quorum signed is logged and counted. Neither stops the node: a judge that signed two judgments could
    /// make the coordinator and this node see different quorums, and the holders' recomputation of the
    /// commit stands beside it.
    async fn audit_commit(
        &mut self,
        commit: &RoundCommit,
        commit_envelope: &SignedEnvelope,
        base: &CheckpointManifest,
    ) {
        let Some(observed) = self.observed.take() else {
            return;
        };
        let Some(ann) = self.assigned.as_ref().map(|a| a.announcement.clone()) else {
            return;
        };
        if observed.call.round != commit.round {
            return;
        }
        let round = commit.round;
        let (mut contradicted, mut dropped, mut last) = (0u64, 0u64, None);
        for shard in &observed.judged {
            let (Some(part), Some(entry)) = (observed.call.shard(shard), base.shard(shard)) else {
                continue;
            };
            let seen = observed.seen.get(shard);
            let signed: BTreeMap<PublicKey, ShardJudgment> = seen
                .into_iter()
                .flatten()
                .map(|(k, (j, _))| (*k, j.clone()))
                .collect();
            match audit_shard(&ann, part, &signed, *entry, commit) {
                Finding::Agrees | Finding::NoQuorumSeen => {}
                Finding::Dropped { signers } => {
                    let text = format!(
                        "round {round}, {shard}: the commit holds the shard although {} of its judges signed one judgment",
                        signers.len()
                    );
                    tracing::warn!("{text}");
                    dropped += 1;
                    last = Some(text);
                }
                Finding::Contradicts { signers, what } => {
                    let text = format!(
                        "round {round}, {shard}: the commit is not what a quorum of its judges signed: {what}"
                    );
                    tracing::error!("{text}");
                    contradicted += 1;
                    last = Some(text);
                    let envelopes: Vec<Vec<u8>> = signers
                        .iter()
                        .filter_map(|k| seen.and_then(|s| s.get(k)))
                        .filter_map(|(_, e)| e.encode().ok())
                        .collect();
                    let items = (
                        commit_envelope.encode(),
                        observed.envelope.encode(),
                        serde_json::to_vec(&envelopes),
                    );
                    if let (Ok(c), Ok(k), Ok(a)) = items {
                        let shard_name = shard.to_string();
                        let key =
                            evidence_key(round, &[b"/quorum-contradicted/", shard_name.as_bytes()]);
                        self.keep_evidence(key, vec![c, k, a]).await;
                    }
                }
            }
        }
        if contradicted + dropped > 0 {
            self.node.update_training_status(|s| {
                s.quorums_contradicted += contradicted;
                s.quorums_dropped += dropped;
                s.last_audit_finding = last;
            });
        }
    }

    async fn on_commit(
        &mut self,
        commit: RoundCommit,
        envelope: Arc<SignedEnvelope>,
    ) -> Result<(), NodeError> {
        let sent: Vec<(ShardId, ContentHash)> = self
            .sent
            .iter()
            .filter(|(round, ..)| *round == commit.round)
            .map(|(_, shard, hash)| (*shard, *hash))
            .collect();
        self.sent.retain(|(round, ..)| *round > commit.round);
        if self
            .unfetched
            .as_ref()
            .is_some_and(|u| u.round < commit.round)
        {
            self.unfetched = None;
        }
        if self
            .end_pending
            .as_ref()
            .is_some_and(|e| e.round <= commit.round)
        {
            self.end_pending = None;
        }
        let me = self.me;
        self.node
            .update_training_status(|s| s.contributions.record_commit(&commit, &me, &sent));
        let checkpoint_hash = commit.checkpoint.hash()?;
        // Audited first, against the round's base manifest (the last commit's, or the one fetched for it).
        if let Some((hash, base)) = self.last_checkpoint.clone()
            && self.assigned.as_ref().is_some_and(|a| {
                a.announcement.round == commit.round && a.announcement.base_checkpoint == hash
            })
        {
            self.audit_commit(&commit, &envelope, &base).await;
        }
        self.observed = None;
        let Some(assigned) = self.assigned.take() else {
            self.last_checkpoint = Some((checkpoint_hash, commit.checkpoint.clone()));
            return Ok(());
        };
        if assigned.announcement.round != commit.round {
            self.last_checkpoint = Some((checkpoint_hash, commit.checkpoint.clone()));
            return Ok(());
        }
        let round = commit.round;
        self.node
            .update_training_status(|s| s.activity = format!("round {round}: applying the commit"));
        let applying = Instant::now();
        let mut recomputed_shards = 0u64;
        let ann = &assigned.announcement;
        let mut new_held = BTreeMap::new();
        let mut matches = 0u64;
        let mut to_refetch = Vec::new();
        let mut refuted: Vec<CommitDispute> = Vec::new();
        // Decoded payloads at hand, for checking the commit's published scores afterwards.
        let mut at_hand: BTreeMap<ContentHash, Arc<Vec<f32>>> = BTreeMap::new();
        for shard in &assigned.me.shards {
            let Some(base) = assigned.base.get(shard) else {
                continue;
            };
            let Some(entry) = commit.checkpoint.shard(shard).copied() else {
                tracing::warn!(round, %shard, "the commit's checkpoint lacks an assigned shard");
                continue;
            };
            let (accepted, weights) = commit
                .accepted
                .iter()
                .find(|a| a.shard == *shard)
                .map(|a| (a.deltas.clone(), a.weights.clone()))
                .unwrap_or_default();
            // What this node computes for the shard: unchanged without deltas, else the round's update (the one
            // it computed as a judge of the shard, when it judged the same deltas at the same weights).
            let mut computed = None;
            let mut kept = None;
            let judged = self
                .judged
                .remove(shard)
                .filter(|j| j.accepted == accepted && j.weights == weights);
            let recomputed = if accepted.is_empty() {
                Recomputed::NoDeltas
            } else if let Some(j) = judged {
                at_hand.extend(j.payloads);
                let hash = j.next.hash;
                kept = Some(j.next);
                Recomputed::Computed(hash)
            } else {
                recomputed_shards += 1;
                match self
                    .next_state(ann, base.state.clone(), &accepted, &weights)
                    .await?
                {
                    Ok((new_state, deltas)) => {
                        at_hand.extend(deltas.into_iter().map(|(h, d)| (h, Arc::new(d))));
                        let bytes = new_state.to_bytes();
                        let hash = ContentHash::of(&bytes);
                        computed = Some((bytes, new_state));
                        Recomputed::Computed(hash)
                    }
                    Err(e) => {
                        tracing::warn!(round, %shard, error = %e, "accepted deltas unavailable; fetching the committed shard");
                        Recomputed::Unavailable
                    }
                }
            };
            match commit_check::judge_shard(base.hash, entry.hash, recomputed) {
                ShardVerdict::Reproduced => {
                    matches += 1;
                    match (kept, computed) {
                        (Some(held), _) => {
                            // Hosted and pinned when it was judged.
                            new_held.insert(*shard, held);
                        }
                        (None, computed) => match computed {
                            Some((bytes, state)) => {
                                let hosted = self.node.host_blob_now(bytes).await?;
                                self.pins.add(round, hosted);
                                new_held.insert(
                                    *shard,
                                    Held {
                                        hash: entry.hash,
                                        state: Arc::new(state),
                                    },
                                );
                            }
                            None => {
                                new_held.insert(*shard, base.clone());
                            }
                        },
                    }
                }
                ShardVerdict::Refuted { computed } => {
                    tracing::error!(
                        round, %shard, ours = %computed, committed = %entry.hash, deltas = accepted.len(),
                        "the commit's shard does not reproduce from its accepted deltas: the commit is wrong"
                    );
                    refuted.push(commit_check::dispute(
                        &commit, *shard, base.hash, entry.hash, computed,
                    )?);
                }
                ShardVerdict::Unverified => to_refetch.push(entry),
            }
        }
        if !refuted.is_empty() {
            return self.refuse(&commit, refuted).await;
        }
        // Published scores are recomputed in drawn rounds and whenever this node's own delta was refused for
        // its score. A score needs only the round's base trunk and the scored shard, and every delta at hand
        // is to one of this node's shards: nothing is fetched for it.
        let own_refused = sent.iter().any(|(_, hash)| {
            commit.rejected.iter().any(|r| {
                r.payload_hash == *hash && r.node == self.me && r.reason == RejectCode::LowScore
            })
        });
        let drawn = own_refused || self.draw_rescore();
        let apply_s = applying.elapsed().as_secs_f64();
        let checking = Instant::now();
        self.check_scores(&commit, &assigned, &sent, at_hand, drawn)
            .await;
        // What applying a commit costs this node (the next round waits for it): its shards computed again
        // (those it did not judge), and the score check of drawn rounds.
        tracing::info!(
            round,
            recomputed_shards,
            apply_s,
            scores_s = checking.elapsed().as_secs_f64(),
            "commit applied"
        );
        self.last_checkpoint = Some((checkpoint_hash, commit.checkpoint.clone()));
        self.node
            .update_training_status(|s| s.hash_matches += matches);
        self.held = new_held;
        self.unfetched = Some(Unfetched {
            round,
            checkpoint: commit.checkpoint.clone(),
            entries: to_refetch,
            next_try: Instant::now(),
            wait: REFETCH_FIRST,
        });
        self.refetch().await;
        Ok(())
    }

    /// Counts as unaccounted the deltas this node sent in rounds before `round` (their commit never reached it,
    /// so their fate is unknown), and forgets them.
    fn forget_sent_before(&mut self, round: u64) {
        let missed = self.sent.iter().filter(|(r, ..)| *r < round).count() as u64;
        if missed > 0 {
            self.sent.retain(|(r, ..)| *r >= round);
            self.node
                .update_training_status(|s| s.contributions.unaccounted += missed);
        }
    }

    /// The run ended with this node's last round not applied, and the round's commit has not come within
    /// [`END_GRACE`]: takes each of its shards' states from the run's final checkpoint, where this node can
    /// vouch for one (the state it computed itself as a judge of the shard, or a state that another judge of
    /// the shard signed in the round and this node saw), and applies the round with them as a commit would
    /// ([`Unfetched`]). A state nobody it heard signed is not taken: the coordinator is trusted with order,
    /// not with the model, and its end's checkpoint carries no judge's signature.
    async fn catch_up_end(&mut self) {
        let Some(end) = self.end_pending.take() else {
            return;
        };
        let now = Instant::now();
        if now < end.due {
            self.end_pending = Some(end);
            return;
        }
        let round = end.round;
        let Some(assigned) = self.assigned.take_if(|a| a.announcement.round == round) else {
            return;
        };
        self.node.update_training_status(|s| {
            s.activity =
                format!("round {round}: its commit never came; taking the run's final checkpoint")
        });
        let manifest = match self.base_manifest(end.checkpoint, round).await {
            Ok(manifest) if manifest.round == round => manifest,
            Ok(manifest) => {
                let text = format!(
                    "round {round}: the run's final checkpoint is of round {}, not this node's last round; the round is not applied",
                    manifest.round
                );
                tracing::error!("{text}");
                self.node.update_training_status(|s| s.activity = text);
                return;
            }
            Err(e) => {
                tracing::warn!(round, error = %e, "the run's final checkpoint not fetched; trying again");
                self.node.update_training_status(|s| {
                    s.activity = format!(
                        "round {round}: its commit never came, and the run's final checkpoint was not fetched ({e}); trying again"
                    )
                });
                self.assigned = Some(assigned);
                self.end_pending = Some(EndPending {
                    due: now + END_GRACE,
                    ..end
                });
                return;
            }
        };
        // The fate of its deltas stays unknown (the commit said it).
        self.forget_sent_before(round + 1);
        let mut computed = Vec::new();
        let mut to_fetch = Vec::new();
        let mut unvouched = Vec::new();
        for shard in &assigned.me.shards {
            let Some(entry) = manifest.shard(shard).copied() else {
                continue;
            };
            if self.held.get(shard).is_some_and(|h| h.hash == entry.hash) {
                continue;
            }
            if let Some(judged) = self.judged.get(shard).filter(|j| j.next.hash == entry.hash) {
                computed.push((*shard, judged.next.clone()));
                continue;
            }
            let signed = self
                .observed
                .as_ref()
                .and_then(|o| o.seen.get(shard))
                .is_some_and(|seen| seen.values().any(|(j, _)| j.entry == entry));
            if signed {
                to_fetch.push(entry);
            } else {
                unvouched.push(shard.to_string());
            }
        }
        self.observed = None;
        if !unvouched.is_empty() {
            let text = format!(
                "round {round}: its commit never came, and the run's final checkpoint names states of {} that no judge this node heard signed: not taken; the round is not applied",
                unvouched.join(", ")
            );
            tracing::error!("{text}");
            self.node.update_training_status(|s| s.activity = text);
            return;
        }
        // Held only now that every shard is vouched for: a refused checkpoint leaves the held states alone.
        self.held.extend(computed);
        tracing::info!(
            round,
            fetch = to_fetch.len(),
            "the last commit never came: the run's final checkpoint taken instead"
        );
        self.unfetched = Some(Unfetched {
            round,
            checkpoint: manifest,
            entries: to_fetch,
            next_try: now,
            wait: REFETCH_FIRST,
        });
        self.refetch().await;
    }

    /// Fetches the last commit's shards that this node holds and does not have yet ([`Unfetched`]), if it is
    /// time to; once it has them all, the commit is applied: its own manifest stored and published, and the
    /// status says so.
    async fn refetch(&mut self) {
        let Some(mut pending) = self.unfetched.take() else {
            return;
        };
        if Instant::now() < pending.next_try {
            self.unfetched = Some(pending);
            return;
        }
        let round = pending.round;
        let mut failed = Vec::new();
        for (entry, result) in self.fetch_each(&pending.entries, round).await {
            match result {
                Ok(state) => {
                    self.held.insert(
                        entry.shard,
                        Held {
                            hash: entry.hash,
                            state: Arc::new(state),
                        },
                    );
                }
                Err(e) => failed.push((entry, e)),
            }
        }
        if !failed.is_empty() {
            let shards: Vec<String> = failed.iter().map(|(e, _)| e.shard.to_string()).collect();
            tracing::warn!(
                round, shards = ?shards, error = %failed[0].1, retry_in_s = pending.wait.as_secs(),
                "committed shards not fetched; trying again"
            );
            let text = format!(
                "round {round}: {} committed shard(s) not fetched yet ({}), trying again",
                failed.len(),
                failed[0].1
            );
            self.node.update_training_status(|s| s.activity = text);
            pending.entries = failed.into_iter().map(|(e, _)| e).collect();
            pending.next_try = Instant::now() + pending.wait;
            pending.wait = (pending.wait * 2).min(REFETCH_MOST);
            self.unfetched = Some(pending);
            return;
        }
        if let Err(e) = self.commit_store(round, &pending.checkpoint).await {
            tracing::warn!(round, error = %e, "the applied commit was not stored");
            self.node
                .update_training_status(|s| s.activity = format!("error: {e}"));
            return;
        }
        let ended = self.ended == Some(round);
        self.node.update_training_status(|s| {
            s.applied_round = Some(round);
            s.activity = if ended {
                format!("round {round}: applied; the run ended with it")
            } else {
                format!("round {round}: applied")
            };
        });
        let keep: Vec<ContentHash> = self.held.values().map(|h| h.hash).collect();
        self.pins
            .release_before(&self.node, round.saturating_sub(1), &keep);
    }

    /// Checks the verifier's published verdicts that this node can reproduce (section "Every verdict can be
    /// re-checked" of docs/security.md): the commit must reveal the seed secret the announcement committed to,
    /// each of this node's own deltas refused as `low-score` must have a published score, and every published
    /// score of a delta at hand (its own, and the accepted deltas of its shards) must come out the same when
    /// recomputed from the round's base trunk and shard (in the rounds drawn by [`TrainerConfig::rescore_share`],
    /// and always when one of its own deltas was refused as `low-score`). A false one is logged as an error and
    /// counted in the status (`score_mismatches`); the node does not stop for it (unlike a shard hash that does not reproduce,
    /// which is proof), as another CPU may sum a loss in another order, within [`mana_engine::round::SCORE_TOLERANCE`].
    async fn check_scores(
        &mut self,
        commit: &RoundCommit,
        assigned: &Assigned,
        sent: &[(ShardId, ContentHash)],
        mut at_hand: BTreeMap<ContentHash, Arc<Vec<f32>>>,
        drawn: bool,
    ) {
        let ann = &assigned.announcement;
        let round = commit.round;
        let mut false_ones: Vec<String> = Vec::new();
        if !commit.reveals_seed_of(ann) {
            false_ones.push(format!(
                "round {round}: the commit's seed secret is not the one the announcement committed to"
            ));
        }
        let published = |hash: &ContentHash| commit.scores.iter().find(|s| s.payload_hash == *hash);
        for (shard, hash) in sent {
            let low = commit.rejected.iter().any(|r| {
                r.payload_hash == *hash && r.node == self.me && r.reason == RejectCode::LowScore
            });
            if low && published(hash).is_none() {
                false_ones.push(format!(
                    "round {round}: this node's delta {hash} to {shard} was refused as low-score with no published score"
                ));
            }
            if !at_hand.contains_key(hash)
                && published(hash).is_some()
                && let Some(len) = self.cfg.spec.shard_len(*shard).ok()
            {
                match self.fetch_deltas(&[*hash], len).await {
                    Ok((mut d, _)) if d.len() == 1 => {
                        let (h, v) = d.remove(0);
                        at_hand.insert(h, Arc::new(v));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(round, payload = %hash, error = %e, "own payload not read back for the score check")
                    }
                }
            }
        }
        if !drawn {
            tracing::debug!(
                round,
                "published scores not recomputed this round (not drawn)"
            );
        }
        let items: Vec<(DeltaScore, Arc<Vec<f32>>)> = if false_ones.is_empty() && drawn {
            commit
                .scores
                .iter()
                .filter_map(|s| at_hand.get(&s.payload_hash).map(|d| (*s, d.clone())))
                .collect()
        } else {
            Vec::new()
        };
        let mut checked = 0u64;
        if !items.is_empty() {
            // Bounded, so a base shard slow to come never holds up the next round.
            match tokio::time::timeout(RESCORE_BUDGET, self.rescore(commit, assigned, items))
                .await
                .unwrap_or_else(|_| {
                    Err(NodeError::Timeout {
                        what: "recomputing the published scores".into(),
                        after: RESCORE_BUDGET,
                    })
                }) {
                Ok(results) => {
                    for (p, s) in results {
                        if score_agrees(&p, &s) {
                            checked += 1;
                        } else {
                            false_ones.push(format!(
                                "round {round}: the published score of {} on {} is false: loss {} against {} published, {} against {} recomputed",
                                p.payload_hash, p.shard, p.loss, p.null_loss, s.loss, s.null_loss
                            ));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(round, error = %e, "the commit's scores could not be recomputed")
                }
            }
        }
        for text in &false_ones {
            tracing::error!("{text}: the coordinator's verdicts do not follow from public data");
        }
        let last = false_ones.last().cloned();
        let found = false_ones.len() as u64;
        self.node.update_training_status(|s| {
            s.scores_checked += checked;
            s.score_mismatches += found;
            if last.is_some() {
                s.last_score_mismatch = last;
            }
        });
    }

    /// Whether this round's published scores are recomputed: true in [`TrainerConfig::rescore_share`] of the
    /// rounds, drawn from the OS's randomness (true if it cannot be read: checking is the safe side).
    fn draw_rescore(&self) -> bool {
        super::common::draw_share(self.cfg.rescore_share)
    }

    /// Recomputes published scores from the round's base states of the shards this node holds: a score
    /// needs only the trunk and the scored shard ([`mana_engine::round::ShardScorer`]), and every delta at
    /// hand is to one of this node's shards (a score of another shard is left out), so nothing is fetched.
    async fn rescore(
        &mut self,
        commit: &RoundCommit,
        assigned: &Assigned,
        items: Vec<(DeltaScore, Arc<Vec<f32>>)>,
    ) -> Result<Vec<(DeltaScore, mana_engine::round::Score)>, NodeError> {
        let ann = &assigned.announcement;
        let round = ann.round;
        let items: Vec<(DeltaScore, Arc<Vec<f32>>)> = items
            .into_iter()
            .filter(|(p, _)| assigned.base.contains_key(&p.shard))
            .collect();
        let model: Vec<ShardRecord> = assigned
            .base
            .values()
            .filter(|h| {
                h.state.shard == ShardId::Trunk
                    || items.iter().any(|(p, _)| p.shard == h.state.shard)
            })
            .map(|h| (*h.state).clone())
            .collect();
        let (spec, hyper, data) = (
            self.cfg.spec.clone(),
            ann.hyper.clone(),
            self.cfg.data.clone(),
        );
        let seed = commit_score_seed(commit);
        blocking(move || {
            let deltas: Vec<(DeltaScore, &[f32])> =
                items.iter().map(|(p, d)| (*p, d.as_slice())).collect();
            Ok(rescore(&spec, &hyper, &data, round, seed, &model, &deltas)?)
        })
        .await
    }

    /// Refuses a commit that does not reproduce: nothing of it is adopted (the held shards and the store stay
    /// at the previous round), one signed dispute per refuted shard goes out on gossip, and the node halts.
    async fn refuse(
        &mut self,
        commit: &RoundCommit,
        disputes: Vec<CommitDispute>,
    ) -> Result<(), NodeError> {
        let round = commit.round;
        let mut published = 0u64;
        for dispute in &disputes {
            match publish_patiently(
                &self.node,
                &Message::CommitDispute(dispute.clone()),
                Duration::from_secs(5),
            )
            .await
            {
                Ok(()) => published += 1,
                Err(e) => {
                    tracing::warn!(round, shard = %dispute.shard, error = %e, "commit dispute not published")
                }
            }
        }
        let refused = RefusedCommit {
            round,
            commit: commit.hash()?.to_string(),
            shards: disputes
                .iter()
                .map(|d| RefutedShard {
                    shard: d.shard.to_string(),
                    committed: d.committed.to_string(),
                    computed: d.computed.to_string(),
                    accepted: d.accepted.len(),
                })
                .collect(),
            disputes_published: published,
        };
        let shards: Vec<&str> = refused.shards.iter().map(|s| s.shard.as_str()).collect();
        let reason = format!(
            "round {round}: the coordinator's commit is wrong for {} (does not reproduce from its accepted deltas); refused, not building on it",
            shards.join(", ")
        );
        // Kept, so that a restarted node still refuses to build on the run.
        let key = commit_check::refusal_key(round, &commit.run);
        match serde_json::to_vec(&refused) {
            Ok(record) => self.keep_evidence(key, vec![record]).await,
            Err(e) => tracing::warn!(round, error = %e, "refusal not encoded"),
        }
        let n = disputes.len() as u64;
        self.node.update_training_status(|s| {
            s.hash_mismatches += n;
            s.refused_commit = Some(refused);
        });
        self.halt(reason);
        Ok(())
    }

    /// The accepted payloads of one shard, decoded, sorted by payload hash (the aggregation order), and the
    /// expert loads they carry (the trunk's).
    async fn fetch_deltas(
        &self,
        hashes: &[ContentHash],
        len: usize,
    ) -> Result<(Vec<(ContentHash, Vec<f32>)>, Vec<ExpertLoads>), NodeError> {
        let node = self.node.clone();
        let timeout = self.cfg.fetch_timeout;
        let results: Vec<Result<(ContentHash, Contribution), NodeError>> =
            futures::stream::iter(hashes.iter().copied())
                .map(|hash| {
                    let node = node.clone();
                    // Its sender hosts it (the coordinator never holds a payload).
                    let hints: Vec<PeerId> = self.senders.get(&hash).copied().into_iter().collect();
                    async move {
                        let bytes = fetch_bytes(&node, hash, hints, timeout).await?;
                        let c = blocking(move || Ok(decode_contribution(&bytes, len)?)).await?;
                        Ok((hash, c))
                    }
                })
                .buffer_unordered(self.cfg.fetch_concurrency.max(1))
                .collect()
                .await;
        let mut fetched = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        fetched.sort_by_key(|d| d.0);
        let mut loads = Vec::new();
        let mut deltas = Vec::with_capacity(fetched.len());
        for (hash, c) in fetched {
            if !c.loads.is_empty() {
                loads.push(ExpertLoads {
                    sender: c.binding.sender,
                    counts: c.loads,
                });
            }
            deltas.push((hash, c.delta));
        }
        Ok((deltas, loads))
    }

    /// Stores the held shards as round `round` with this node's own manifest of them, hosted as a blob.
    async fn commit_store(
        &mut self,
        round: u64,
        committed: &CheckpointManifest,
    ) -> Result<(), NodeError> {
        let shards: Vec<ShardEntry> = self
            .held
            .iter()
            .map(|(shard, h)| {
                let entry = committed.shard(shard).copied();
                ShardEntry {
                    shard: *shard,
                    hash: h.hash,
                    size: entry.map(|e| e.size).unwrap_or(0),
                    round: entry.map(|e| e.round).unwrap_or(round),
                }
            })
            .collect();
        let own = CheckpointManifest {
            run: committed.run.clone(),
            round,
            shards,
        };
        let own_hash = self.node.host_blob_now(own.to_bytes()?).await?;
        self.pins.add(round, own_hash);
        // A restarted node may already hold a later round; its own rounds then simply continue.
        let stored =
            commit_checkpoint(self.node.store(), &own, Some(own_hash), IfPresent::Keep).await?;
        if !stored {
            tracing::warn!(
                round,
                "store already holds this round or a later one; not committed"
            );
        }
        // Every holder publishes its shard hashes, so the coordinator (and anyone) can compare them.
        if let Err(e) = publish_patiently(
            &self.node,
            &Message::CheckpointManifest(own.clone()),
            Duration::from_secs(2),
        )
        .await
        {
            tracing::debug!(round, error = %e, "own manifest not published");
        }
        let held: Vec<(String, String)> = own
            .shards
            .iter()
            .map(|e| (e.shard.to_string(), e.hash.to_string()))
            .collect();
        self.node.update_training_status(|s| {
            s.manifest_hash = Some(own_hash.to_string());
            s.held_shards = held;
        });
        Ok(())
    }

    /// Keeps `items` in the store as the evidence of a finding (`key`, see [`evidence_key`]), before the
    /// finding is counted: whoever reads the count finds its proof kept. A store that refuses loses the proof,
    /// never the finding: logged, not fatal.
    /// A call of round `round` not judged, for `why`: logged as an error, counted (`calls_refused`, the last
    /// finding), and its signed `envelope` kept as evidence under the round's key ending in `tag`.
    async fn refuse_call(&self, round: u64, envelope: &SignedEnvelope, tag: &[u8], why: String) {
        let text = format!("round {round}: the call is not judged, {why}");
        tracing::error!("{text}");
        if let Ok(bytes) = envelope.encode() {
            self.keep_evidence(evidence_key(round, &[tag]), vec![bytes])
                .await;
        }
        self.node.update_training_status(|s| {
            s.calls_refused += 1;
            s.last_audit_finding = Some(text);
        });
    }

    async fn keep_evidence(&self, key: Vec<u8>, items: Vec<Vec<u8>>) {
        let store = self.node.store().clone();
        let kept = blocking(move || {
            let items: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
            Ok(store.keep_evidence(&key, &items)?)
        })
        .await;
        if let Err(e) = kept {
            tracing::warn!(error = %e, "evidence not kept in the store");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mana_protocol::{Keypair, RunEnd, RunId, TrainingStats};
    use tokio::sync::broadcast;

    fn accepted(key: &Keypair, message: Message) -> Accepted {
        let envelope = SignedEnvelope::sign(key, &message, 1).expect("signed");
        Accepted {
            source: key.peer_id(),
            signer: key.public(),
            message,
            envelope: Arc::new(envelope),
        }
    }

    fn delta(round: u64) -> Message {
        Message::DeltaAnnouncement(DeltaAnnouncement {
            run: RunId::new("judging").expect("run id"),
            round,
            shard: ShardId::Trunk,
            base_checkpoint: ContentHash::of(b"base"),
            payload_hash: ContentHash::of(&round.to_le_bytes()),
            payload_size: 8,
            stats: TrainingStats {
                tokens: 1,
                loss_before: 1.0,
                loss_after: 1.0,
                delta_norm: 1.0,
            },
        })
    }

    #[tokio::test]
    async fn judging_goes_on_until_its_round_is_over_and_every_message_meanwhile_is_kept_in_order()
    {
        let key = Keypair::from_seed(&[7; 32]);
        let (tx, mut rx) = broadcast::channel(16);
        let mut backlog = VecDeque::new();
        let end = Message::RunEnd(RunEnd {
            run: RunId::new("judging").expect("run id"),
            round: 3,
            checkpoint: ContentHash::of(b"final"),
        });
        for m in [delta(3), delta(4), end, delta(5)] {
            tx.send(accepted(&key, m)).expect("sent");
        }
        // Deltas do not end a round's judging; the run's end does, and what came after it stays queued.
        tokio::time::timeout(Duration::from_secs(5), superseded(&mut rx, &mut backlog, 3))
            .await
            .expect("the run's end ends the judging");
        let kinds: Vec<(&str, Option<u64>)> = backlog
            .iter()
            .map(|a| (a.message.kind(), a.message.round()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("delta-announcement", Some(3)),
                ("delta-announcement", Some(4)),
                ("run-end", Some(3)),
            ]
        );
        // Only deltas left: the judging is not cut short.
        let mut rest = VecDeque::new();
        let waited = tokio::time::timeout(
            Duration::from_millis(200),
            superseded(&mut rx, &mut rest, 3),
        )
        .await;
        assert!(waited.is_err(), "a delta ended the judging");
        assert_eq!(rest.len(), 1);
    }
}
