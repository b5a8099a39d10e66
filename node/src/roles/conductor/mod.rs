//! The conductor: the run's coordinator state machine ([`Coordinator`], pure, in the engine) driven on a live
//! node. It is what `mana coordinator` runs; it has a name of its own so that "coordinator" names one thing in
//! the code, the state machine, and the conductor is its network driver.
//!
//! The coordinator is itself a peer with its own key (the key nodes trust with `--coordinator`). It never
//! holds the model: not in memory, not on disk. It:
//! - computes round 0's checkpoint (each shard's hash and size) one shard at a time from [`initial_shard`]
//!   and keeps only the manifest; nodes make the round-0 shards they need from the same spec and check them
//!   against it (or, restarted, resumes the saved state);
//! - feeds the machine the members' heartbeats (never its own) and the delta announcements, and ticks it
//!   every [`ConductorConfig::tick`] with fresh OS randomness as the seed;
//! - carries out its [`Action`]s: publishes announcements; publishes the call for judgments and hands the
//!   judges' signed verdicts and results to the machine ([`judgments`]: each shard's deltas are fetched,
//!   checked, scored and applied by its holders and drawn verifiers, who host the result; the machine takes
//!   a result as soon as a quorum signed it); commits: stores the new manifest (the shards' hashes, not their
//!   bytes) as a store round, hosts its manifest blob, publishes the [`RoundCommit`] and logs every refused
//!   delta with its reason in the store (so `mana status` shows it);
//! - writes one metrics line per committed round ([`metrics`]), whose validation loss comes from the run's
//!   evaluators ([`evaluations`]: mirrors that measure each committed checkpoint and sign the figure);
//! - compares every holder's published manifest (its shard hashes after a round) with the commit, counting
//!   reports and mismatches in the status;
//! - saves the machine in the store after every change, so a restarted coordinator resumes where it stopped:
//!   in a round being judged the call is published again.

pub mod admission;
mod evaluations;
pub mod identity;
mod judgments;
pub mod metrics;
mod reports;
mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mana_kernels::data::TextDataset;
use mana_protocol::{
    CheckpointManifest, ContentHash, DeltaAnnouncement, Heartbeat, Message, PublicKey,
    RoundAnnouncement, RoundCommit, ShardEntry, UpdateRule,
};
use tokio::sync::broadcast::error::RecvError;

pub use metrics::{PhaseMs, RoundMetrics};

use super::common::{PinLedger, os_seed, peer_name, publish_patiently};
use crate::daemon::checkpoint::{IfPresent, commit_checkpoint_record};
use crate::daemon::now_ms;
use crate::daemon::status::{CommitSummary, MemberStanding};
use crate::daemon::{NodeError, NodeHandle, blocking};
use crate::store::RecordKind;
use mana_engine::coordinator::{
    Action, Coordinator, CoordinatorConfig, EventError, Origin, RunState, address_block,
};
use mana_engine::round::{RunSpec, initial_shard};

/// The store record (kind [`RecordKind::RoundState`]) holding the saved state machine.
pub const STATE_KEY: &[u8] = b"coordinator/state";

/// How the coordinator role runs. Durations are in milliseconds inside [`CoordinatorConfig`] so that tests
/// can run rounds of a second.
#[derive(Debug, Clone)]
pub struct ConductorConfig {
    /// The state machine's settings: run, experts, replication, phase durations, H, hyper-parameters.
    pub machine: CoordinatorConfig,
    /// The run's model and initialisation; every node must use the same.
    pub spec: RunSpec,
    /// How often the state machine is ticked.
    pub tick: Duration,
    /// The validation batches (indices 0..n) an evaluator's figure must be the mean of to be the metrics'
    /// `val_loss` (the evaluators' default, 4).
    pub val_batches: u64,
    /// Whose [`mana_protocol::Evaluation`]s give the metrics' validation loss (`None`: any node's; the first
    /// figure published for a round is taken, and the later ones are compared with it: see
    /// [`evaluations`]).
    pub evaluators: Option<std::collections::BTreeSet<PublicKey>>,
    /// How long a round's metrics line waits for its evaluation after the last commit (or at a shutdown),
    /// when evaluators are expected (named, or heard during the run); otherwise the line is written at once.
    pub evaluation_wait: Duration,
    /// Stop after committing this round, and announce the end of the run.
    pub rounds: Option<u64>,
    /// Where to append one JSON line per committed round.
    pub metrics: Option<PathBuf>,
    /// Only the keys in this file may join ([`admission`]); the file is read again when it changes. `None`:
    /// an open run.
    pub allowlist: Option<PathBuf>,
    /// Resume even if the run's fixed settings ([`identity::RunIdentity`]) differ from the saved ones: the
    /// saved model goes on, under the new rule and corpus (a changed model is refused all the same).
    pub accept_changed_settings: bool,
}

impl ConductorConfig {
    /// Defaults around `machine`: tick 100 ms, 4 validation batches, 30 s for a last evaluation, no round
    /// limit, no metrics. `data` is the run's text: every round names its hash, and a node with other text
    /// refuses to train on it.
    pub fn new(
        machine: CoordinatorConfig,
        spec: RunSpec,
        data: Arc<TextDataset>,
    ) -> ConductorConfig {
        let mut machine = machine;
        // Every round names the corpus: a node with other text refuses to train on it.
        machine.corpus = crate::roles::common::corpus_hash(&data);
        ConductorConfig {
            machine,
            spec,
            tick: Duration::from_millis(100),
            val_batches: 4,
            evaluators: None,
            evaluation_wait: Duration::from_secs(30),
            rounds: None,
            metrics: None,
            allowlist: None,
            accept_changed_settings: false,
        }
    }
}

/// The state machine's settings for `run` over every expert of `spec`, with `spec`'s hyper-parameters for
/// `rule` and `inner_steps` (the rest: [`CoordinatorConfig::new`]'s defaults).
pub fn machine_config(
    run: mana_protocol::RunId,
    spec: &RunSpec,
    rule: UpdateRule,
    inner_steps: u32,
) -> Result<CoordinatorConfig, NodeError> {
    let experts = spec.experts();
    let mut cfg = CoordinatorConfig::new(run, experts, spec.hyper(rule));
    cfg.inner_steps = inner_steps;
    Ok(cfg)
}

/// Per-round bookkeeping outside the state machine (lost on restart; only metrics depend on it).
#[derive(Default)]
struct RoundClock {
    announced: Option<Instant>,
    last_delta: Option<Instant>,
    /// From the call for judgments to the last attestation taken (the judges' fetching, checking, scoring
    /// and applying), in ms.
    apply_ms: u64,
    /// When the round's judgments were called for.
    called: Option<Instant>,
}

struct Role {
    node: Arc<NodeHandle>,
    cfg: ConductorConfig,
    me: PublicKey,
    machine: Coordinator,
    /// Attestations the state machine took, since start.
    attestations: u64,
    clock: RoundClock,
    /// The last announced round (for the commit's metrics).
    last_announcement: Option<RoundAnnouncement>,
    /// Delta announcements the machine took in the round in progress.
    round_deltas: Vec<(PublicKey, DeltaAnnouncement)>,
    saved: Vec<u8>,
    pins: PinLedger,
    accepted_total: u64,
    rejected_total: u64,
    holder_reports: u64,
    holder_mismatches: u64,
    /// Heartbeats refused (`not-admitted`) since start.
    not_admitted: u64,
    /// Heartbeat signers dialled lately to learn their address (bounded).
    dials: admission::DialBudget,
    allowlist: Option<admission::AllowlistFile>,
    /// The last validation loss an evaluator published for a commit.
    val_loss: Option<f32>,
    /// The last commits' metrics lines while they wait for their evaluation, in round order (saved in the
    /// store).
    pending: std::collections::VecDeque<metrics::RoundMetrics>,
    /// Evaluations taken since start.
    evaluations_seen: u64,
    /// An evaluation was taken in this run, since start or before a restart
    /// ([`evaluations::EVALUATORS_HEARD_KEY`]).
    evaluators_heard: bool,
    /// Evaluations that gave or matched the figure taken for their round (the first gives it), and those
    /// that did not match it.
    evaluations_agreed: u64,
    evaluations_disagreed: u64,
    /// The last commits, for the status.
    recent_commits: std::collections::VecDeque<CommitSummary>,
    /// What the state machine asked for and is not done yet: a commit that failed (a full disk, a store error)
    /// stays here with every action after it and is retried at each tick; the machine is not ticked and its
    /// state not saved until it is done, so a restart meanwhile resumes from before the commit.
    backlog: std::collections::VecDeque<Action>,
    /// Steps that failed and were retried or skipped since start (a commit, a metrics line).
    failures: u64,
    done: bool,
}

/// Runs the coordinator on `node` until `shutdown` completes or, with `cfg.rounds`, until that round is
/// committed (and its evaluation in, or given up). The node must not sync checkpoints itself
/// (`sync_shards = false`) and should declare no capacity (the default), so it is never assigned work.
pub async fn run_conductor(
    node: Arc<NodeHandle>,
    cfg: ConductorConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    // Its log lines say which role wrote them (a span at error level: shown whatever the log level).
    tracing::Instrument::instrument(
        conductor_loop(node, cfg, shutdown),
        tracing::error_span!("coordinator"),
    )
    .await
}

async fn conductor_loop(
    node: Arc<NodeHandle>,
    cfg: ConductorConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    if node.config().sync_shards {
        return Err(NodeError::Config(
            "the coordinator commits its own rounds: start its node with sync_shards = false"
                .into(),
        ));
    }
    if cfg.machine.run != node.config().net.run_id {
        return Err(NodeError::Config(format!(
            "the coordinator runs {} but its node follows {}",
            cfg.machine.run,
            node.config().net.run_id
        )));
    }
    let mut role = Role::start(node, cfg).await?;
    if role
        .cfg
        .rounds
        .is_some_and(|n| role.machine.checkpoint().round >= n)
    {
        // Resumed a run that already reached its last round: nothing to train.
        role.flush_pending().await;
        return Ok(());
    }
    let mut messages = role.node.accepted();
    let mut ticker = tokio::time::interval(role.cfg.tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                role.save().await;
                let wait = role.cfg.evaluation_wait.min(SHUTDOWN_EVALUATION_WAIT);
                role.await_evaluation(&mut messages, wait).await;
                // With what came while it waited.
                role.save().await;
                break;
            }
            _ = ticker.tick() => role.tick().await,
            m = messages.recv() => match m {
                Ok(accepted) => role.on_message(accepted.signer, accepted.message).await,
                Err(RecvError::Lagged(n)) => tracing::warn!(skipped = n, "coordinator fell behind the message stream"),
                Err(RecvError::Closed) => break,
            },
        }
        role.save().await;
        role.update_status();
        if role.done {
            role.announce_end().await;
            let wait = role.cfg.evaluation_wait;
            role.await_evaluation(&mut messages, wait).await;
            break;
        }
    }
    role.update_status();
    Ok(())
}

/// The longest a stopping coordinator (ctrl-c, SIGTERM) waits for its last commit's evaluation: a stop must
/// stay prompt.
const SHUTDOWN_EVALUATION_WAIT: Duration = Duration::from_secs(10);

impl Role {
    /// Resumes the saved state, or starts the run from round 0's checkpoint.
    async fn start(node: Arc<NodeHandle>, cfg: ConductorConfig) -> Result<Role, NodeError> {
        // A run whose round messages could outgrow a parcel (or break the protocol's counts) would stall at its
        // first large round (the tick fails on encoding the call or the commit, every tick): refused here, with
        // what to change.
        let bound = mana_engine::coordinator::check_round_messages(&cfg.machine)
            .map_err(|e| NodeError::from(mana_engine::coordinator::CoordinatorError::from(e)))?;
        tracing::debug!(?bound, "largest round messages of this run, in bytes");
        let store = node.store().clone();
        let (saved, saved_identity, pending, evaluators_heard) = blocking(move || {
            Ok((
                store.get_split_record(RecordKind::RoundState, STATE_KEY)?,
                store.get_record(RecordKind::RoundState, identity::IDENTITY_KEY)?,
                store.get_record(RecordKind::RoundState, evaluations::PENDING_KEY)?,
                store
                    .get_record(RecordKind::RoundState, evaluations::EVALUATORS_HEARD_KEY)?
                    .is_some(),
            ))
        })
        .await?;
        let identity = identity::RunIdentity::of(
            &cfg.spec,
            cfg.machine.hyper.update_rule,
            cfg.machine.corpus,
            &node.public_key(),
        );
        let machine = match saved {
            Some(bytes) => {
                let mut machine = Coordinator::from_bytes(&bytes).map_err(NodeError::from)?;
                if machine.config().run != cfg.machine.run {
                    return Err(NodeError::Config(format!(
                        "this data directory coordinates run {}, not {}",
                        machine.config().run,
                        cfg.machine.run
                    )));
                }
                // A data directory from before identities were kept: its identity is this one.
                if let Some(saved) = saved_identity
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<identity::RunIdentity>(b).ok())
                {
                    let changes = identity.changes_from(&saved);
                    if changes.iter().any(|c| c.0 == "model") {
                        return Err(NodeError::Config(format!(
                            "cannot resume run {} with another model: {}",
                            cfg.machine.run,
                            identity::describe(&changes)
                        )));
                    }
                    if !changes.is_empty() && !cfg.accept_changed_settings {
                        return Err(NodeError::Config(format!(
                            "run {} was started with other settings: {} (pass --accept-changed-settings if the change is meant)",
                            cfg.machine.run,
                            identity::describe(&changes)
                        )));
                    }
                    if !changes.is_empty() {
                        tracing::warn!(changes = %identity::describe(&changes), "resuming with changed run settings, as asked");
                        let mut config = machine.config().clone();
                        config.hyper.update_rule = cfg.machine.hyper.update_rule;
                        machine.reconfigure(config).map_err(NodeError::from)?;
                    }
                }
                // The verdict rule is the operator's to tune between restarts: every call publishes the one
                // in force, so the judges follow it and anyone can see when it changed.
                let (verdict, history) = (cfg.machine.verdict, cfg.machine.norm_history);
                if machine.config().verdict != verdict || machine.config().norm_history != history {
                    tracing::info!(
                        ?verdict,
                        norm_history = history,
                        "resuming with the verdict rule given now"
                    );
                    let mut config = machine.config().clone();
                    config.verdict = verdict;
                    config.norm_history = history;
                    machine.reconfigure(config).map_err(NodeError::from)?;
                }
                tracing::info!(
                    round = machine.checkpoint().round,
                    phase = machine.state().name(),
                    "coordinator resumed"
                );
                machine
            }
            None => {
                let checkpoint = create_initial(&node, &cfg).await?;
                Coordinator::new(cfg.machine.clone(), checkpoint).map_err(NodeError::from)?
            }
        };
        let value = serde_json::to_vec(&identity).map_err(|e| NodeError::Config(e.to_string()))?;
        let store = node.store().clone();
        blocking(move || {
            store.put_record(RecordKind::RoundState, identity::IDENTITY_KEY, &value)?;
            Ok(())
        })
        .await?;
        // The manifest blob is served again (a restart lost its pin; its store reference keeps it).
        let manifest = machine.checkpoint().to_bytes()?;
        let manifest_hash = node.host_blob(manifest).await?;
        let me = node.public_key();
        let mut machine = machine;
        // A loopback-only node hears only processes on its own host (the demo, the tests): like the network's
        // per-IP limits, the member cap per address does not count them.
        machine.set_trust_colocated(node.config().net.trust_colocated_ips);
        let allowlist = match cfg.allowlist.clone() {
            Some(path) => {
                let (file, keys) = admission::AllowlistFile::open(path)?;
                tracing::info!(keys = keys.len(), "admission: allowlist");
                machine.set_allowlist(Some(keys));
                Some(file)
            }
            None => None,
        };
        let mut role = Role {
            node,
            cfg,
            me,
            machine,
            attestations: 0,
            clock: RoundClock::default(),
            last_announcement: None,
            round_deltas: Vec::new(),
            saved: Vec::new(),
            pins: PinLedger::default(),
            accepted_total: 0,
            rejected_total: 0,
            holder_reports: 0,
            holder_mismatches: 0,
            not_admitted: 0,
            dials: admission::DialBudget::default(),
            allowlist,
            val_loss: None,
            pending: pending
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_default(),
            evaluations_seen: 0,
            evaluators_heard,
            evaluations_agreed: 0,
            evaluations_disagreed: 0,
            recent_commits: std::collections::VecDeque::new(),
            backlog: std::collections::VecDeque::new(),
            failures: 0,
            done: false,
        };
        // The manifest served again is released like a round's blobs once later rounds replace it; left out
        // of the ledger it stayed pinned, and on disk, for good.
        let start_round = role.machine.checkpoint().round;
        role.pins.add(start_round, manifest_hash);
        if let Some(active) = role.machine.state().round() {
            // The round under way is this node's current round again: its deltas and attestations are judged
            // against it.
            role.node.follow_round(&active.announcement);
            role.last_announcement = Some(active.announcement.clone());
            role.round_deltas = active
                .deltas
                .iter()
                .map(|((_, n), d)| (*n, d.clone()))
                .collect();
        }
        role.resume_work().await;
        role.save().await;
        role.update_status();
        Ok(role)
    }

    /// After a restart mid-round: while the judges work, the call is published again (a judge may have
    /// missed it).
    async fn resume_work(&mut self) {
        if let RunState::RoundAggregate(round) = self.machine.state().clone()
            && let Some(called) = round.call
        {
            self.call_results(called.call).await;
        }
    }

    /// Advances the state machine and does what it asks, in order. A failure that concerns one payload or one
    /// shard was already dealt with where it happened (the delta unavailable, the shard not aggregated); only a
    /// commit can fail here, and it is retried at the next tick (see `backlog`). Nothing here ends the role.
    async fn tick(&mut self) {
        if let Some(keys) = self
            .allowlist
            .as_mut()
            .and_then(admission::AllowlistFile::reload_if_changed)
        {
            self.machine.set_allowlist(Some(keys));
        }
        if self.backlog.is_empty() {
            let actions = os_seed().and_then(|seed| Ok(self.machine.tick(now_ms(), seed)?));
            match actions {
                Ok(actions) => self.backlog.extend(actions),
                Err(e) => {
                    self.failures += 1;
                    tracing::error!(error = %e, "coordinator tick failed; trying again at the next tick");
                    return;
                }
            }
        }
        while let Some(action) = self.backlog.pop_front() {
            if let Err(e) = self.execute(action.clone()).await {
                self.failures += 1;
                tracing::error!(error = %e, "round step failed; trying again at the next tick");
                self.backlog.push_front(action);
                break;
            }
        }
    }

    /// True while a commit the machine asked for is not durable yet.
    fn commit_unfinished(&self) -> bool {
        self.backlog
            .iter()
            .any(|a| matches!(a, Action::CommitRound(_)))
    }

    /// Does one action. Only a commit returns an error (it is retried); announcing and calling for judgments
    /// deal with their own failures.
    async fn execute(&mut self, action: Action) -> Result<(), NodeError> {
        match action {
            Action::AnnounceRound(ann) => {
                let round = ann.round;
                self.clock = RoundClock {
                    announced: Some(Instant::now()),
                    ..RoundClock::default()
                };
                self.round_deltas.clear();
                self.last_announcement = Some(ann.clone());
                let patience =
                    Duration::from_millis(ann.deadlines.deltas_by_ms.saturating_sub(now_ms()));
                let participants = ann.participants.len();
                // Saved before publishing: a restart must never announce the same round twice.
                self.save().await;
                match publish_patiently(&self.node, &Message::RoundAnnouncement(ann), patience)
                    .await
                {
                    Ok(()) => tracing::info!(round, participants, "round announced"),
                    Err(e) => tracing::warn!(round, error = %e, "round announcement not published"),
                }
            }
            Action::CallAggregation(call) => self.call_results(call).await,
            Action::CommitRound(commit) => self.commit(commit).await?,
        }
        Ok(())
    }

    async fn commit(&mut self, commit: RoundCommit) -> Result<(), NodeError> {
        let round = commit.round;
        let checkpoint = commit.checkpoint.clone();
        let checkpoint_hash = checkpoint.hash()?;
        // Durable first (store round + manifest blob), then announced.
        let manifest_hash = self.node.host_blob_now(checkpoint.to_bytes()?).await?;
        // Pinned until later commits replace it (its store reference keeps it while the round is retained); a
        // soak found every commit's manifest pinned for good (1,607 in 30 minutes, each announced in the DHT).
        self.pins.add(round, manifest_hash);
        // A crash may have come after the store commit and before the state was saved: the same checkpoint
        // already stored is this commit done.
        let first_time = commit_checkpoint_record(
            self.node.store(),
            &checkpoint,
            manifest_hash,
            IfPresent::SameOnly,
        )
        .await?;
        if !first_time {
            tracing::info!(
                round,
                "the store already held this commit (a restart after it): finishing it"
            );
        }
        // The state is saved last (below), after the commit is stored, published and in the metrics: a crash
        // anywhere before makes the restarted coordinator do the whole commit again, each step of which is
        // idempotent (the same checkpoint in the store, the same commit published, no second metrics line).
        if let Err(e) = publish_patiently(
            &self.node,
            &Message::RoundCommit(commit.clone()),
            Duration::from_secs(5),
        )
        .await
        {
            tracing::warn!(round, error = %e, "round commit not published");
        }

        // The rejection log, the metrics, the round limit. The log counts a commit's refusals at most once: a
        // commit finished again after a restart logged them the first time (a crash between the store commit
        // and this loses them from the log; the signed commit, which lists them, is the record).
        let mut rejected_reasons: BTreeMap<String, u64> = BTreeMap::new();
        for r in &commit.rejected {
            let reason = r.reason.as_str().to_owned();
            let detail = if r.reason == mana_protocol::RejectCode::Late {
                format!(
                    "round {round}, shard {}: its judges reached no quorum in time",
                    r.shard
                )
            } else {
                format!(
                    "round {round}, shard {}: payload {} refused by a quorum of its judges",
                    r.shard, r.payload_hash
                )
            };
            *rejected_reasons.entry(reason.clone()).or_default() += 1;
            if !first_time {
                continue;
            }
            let (store, peer) = (self.node.store().clone(), peer_name(&r.node));
            if let Err(e) =
                blocking(move || Ok(store.record_rejection(&peer, &reason, &detail)?)).await
            {
                tracing::warn!(error = %e, "rejection not logged");
            }
        }
        let accepted: usize = commit.accepted.iter().map(|a| a.deltas.len()).sum();
        self.accepted_total += accepted as u64;
        self.rejected_total += commit.rejected.len() as u64;
        let ann = self.last_announcement.clone().filter(|a| a.round == round);
        self.recent_commits.push_back(CommitSummary {
            round,
            accepted: accepted as u64,
            refused: commit.rejected.len() as u64,
            val_loss: None,
            checkpoint: checkpoint_hash.to_string(),
        });
        while self.recent_commits.len() > crate::daemon::status::RECENT_ROUNDS {
            self.recent_commits.pop_front();
        }
        tracing::info!(round, accepted, rejected = commit.rejected.len(), checkpoint = %checkpoint_hash, "round committed");
        // This round's line waits for its evaluation (the oldest waiting goes out if too many wait).
        let line = self.metrics_line(&commit, ann.as_ref(), rejected_reasons, checkpoint_hash);
        let written = |path: &std::path::Path| {
            !first_time && metrics::last_round(path).is_some_and(|r| r >= round)
        };
        if !self.cfg.metrics.as_deref().is_some_and(written) {
            self.hold_pending(line).await;
        }
        self.pins
            .release_before(&self.node, round.saturating_sub(1), &[manifest_hash]);
        if self.cfg.rounds.is_some_and(|n| round >= n) {
            self.done = true;
        }
        self.save().await;
        Ok(())
    }

    /// A heartbeat, counted against the IP address of this node's direct connection to its signer; without
    /// one, the signer is dialled so that its next heartbeat finds it (see [`admission`]).
    async fn on_heartbeat(&mut self, signer: PublicKey, hb: &Heartbeat) {
        let (origin, peer) = admission::origin_of(&self.node, &signer);
        if let Err(EventError::Refused(code)) =
            self.machine.node_heartbeat(now_ms(), signer, origin, hb)
        {
            // Not logged in the store: a banned or unlisted key heartbeats every few seconds.
            tracing::debug!(node = %peer_name(&signer), %code, ?origin, "heartbeat refused");
            self.not_admitted += 1;
        }
        if origin == Origin::Unknown
            && !self.node.config().net.trust_colocated_ips
            && self.machine.admits(&signer)
            && let Some(peer) = peer
            && self.dials.take(peer, Instant::now())
        {
            admission::learn_address(&self.node, peer).await;
        }
    }

    async fn on_message(&mut self, signer: PublicKey, message: Message) {
        if signer == self.me {
            return;
        }
        match message {
            Message::Heartbeat(hb) => self.on_heartbeat(signer, &hb).await,
            Message::CheckpointManifest(report) => self.on_holder_report(signer, &report),
            Message::Evaluation(e) => self.on_evaluation(signer, &e).await,
            Message::ShardAttestation(a) => self.on_attestation(signer, &a),
            Message::DeltaAnnouncement(d) => {
                let (round, hash, size) = (d.round, d.payload_hash, d.payload_size);
                let keep = d.clone();
                match self.machine.delta_announced(now_ms(), signer, d) {
                    Ok(()) => {
                        self.clock.last_delta = Some(Instant::now());
                        self.round_deltas.push((signer, keep));
                        tracing::debug!(round, payload = %hash, size, "delta announced");
                    }
                    Err(EventError::Refused(code)) => {
                        let detail =
                            format!("round {round}: delta {hash} refused by the coordinator");
                        let (store, peer) = (self.node.store().clone(), peer_name(&signer));
                        let reason = code.as_str().to_owned();
                        if let Err(e) =
                            blocking(move || Ok(store.record_rejection(&peer, &reason, &detail)?))
                                .await
                        {
                            tracing::warn!(error = %e, "rejection not logged");
                        }
                        self.rejected_total += 1;
                    }
                }
            }
            _ => {}
        }
    }

    /// Saves the state machine in the store if it changed.
    async fn save(&mut self) {
        if self.commit_unfinished() {
            // The machine already counts the round as committed; the store does not hold it yet. A restart must
            // resume from before the commit, so the state on disk stays the one saved before it.
            return;
        }
        let bytes = match self.machine.to_bytes() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "coordinator state not encodable");
                return;
            }
        };
        if bytes == self.saved {
            return;
        }
        let store = self.node.store().clone();
        let value = bytes.clone();
        match blocking(move || {
            // Flushed by the store before it returns.
            store.put_split_record(RecordKind::RoundState, STATE_KEY, &value)?;
            Ok(())
        })
        .await
        {
            Ok(()) => self.saved = bytes,
            Err(e) => {
                tracing::error!(error = %e, bytes = bytes.len(), "coordinator state not saved")
            }
        }
    }

    fn update_status(&self) {
        let state = self.machine.state();
        let round = state
            .round()
            .map(|r| r.announcement.round)
            .or(Some(self.machine.checkpoint().round));
        let checkpoint = self.machine.checkpoint();
        let hash = checkpoint.hash().ok().map(|h| h.to_string());
        let (members, committed) = (self.machine.members().len(), checkpoint.round);
        let (accepted, rejected, val_loss) =
            (self.accepted_total, self.rejected_total, self.val_loss);
        let (evaluations_agreed, evaluations_disagreed) =
            (self.evaluations_agreed, self.evaluations_disagreed);
        let (reports, mismatches) = (self.holder_reports, self.holder_mismatches);
        let attestations = self.attestations;
        let standings = self.machine.standings();
        let banned = standings.banned_count();
        let (not_admitted, failures) = (self.not_admitted, self.failures);
        let mut members_standing: Vec<MemberStanding> = standings
            .records()
            .iter()
            .map(|(k, s)| MemberStanding {
                node: hex::encode(k.0),
                accepted: s.accepted,
                faults: s.faults,
                missed: s.missed,
                reputation: s.reputation,
                member: self.machine.members().contains_key(k),
                address: self.machine.members().get(k).and_then(|m| match m.origin {
                    Origin::Ip(ip) => Some(address_block(ip).to_string()),
                    Origin::Unknown => None,
                }),
            })
            .collect();
        members_standing.sort_by_key(|m| m.reputation);
        let config = self.machine.config();
        let min_members = config.min_members;
        let rule = match config.hyper.update_rule {
            mana_protocol::UpdateRule::Sync => "sync",
            mana_protocol::UpdateRule::Diloco => "diloco",
        };
        let settings: BTreeMap<String, String> = [
            ("rule", rule.to_owned()),
            ("inner_steps", config.inner_steps.to_string()),
            ("replication", config.replication.to_string()),
            ("min_members", config.min_members.to_string()),
            ("round_ms", config.train_ms.to_string()),
            ("verify_ms", config.verify_ms.to_string()),
            ("inner_lr", config.hyper.inner_lr.to_string()),
            ("seed", self.cfg.spec.init_seed.to_string()),
            (
                "rounds",
                self.cfg
                    .rounds
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "unbounded".into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let recent_commits: Vec<CommitSummary> = self.recent_commits.iter().cloned().collect();
        self.node.update_coordinator_status(|s| {
            s.round = round;
            s.phase = state.name().to_owned();
            s.members = members;
            s.committed_round = Some(committed);
            s.checkpoint = hash;
            s.accepted_deltas = accepted;
            s.rejected_deltas = rejected;
            s.val_loss = val_loss;
            s.evaluations_agreed = evaluations_agreed;
            s.evaluations_disagreed = evaluations_disagreed;
            s.attestations = attestations;
            s.holder_reports = reports;
            s.holder_mismatches = mismatches;
            s.banned = banned;
            s.not_admitted = not_admitted;
            s.failures = failures;
            s.standings = members_standing;
            s.min_members = min_members;
            s.settings = settings;
            s.recent_commits = recent_commits;
        });
    }

    /// Tells the nodes that the run is over (its last round and final checkpoint), so that they say so instead
    /// of waiting for a next round, and so that a member that missed the last commit takes its shards from the
    /// final checkpoint. Said again every few seconds while the coordinator waits for the last evaluation; a
    /// node that misses every time sees the coordinator fall silent.
    async fn announce_end(&self) {
        let checkpoint = self.machine.checkpoint();
        let Ok(hash) = checkpoint.hash() else {
            return;
        };
        let end = Message::RunEnd(mana_protocol::RunEnd {
            run: self.cfg.machine.run.clone(),
            round: checkpoint.round,
            checkpoint: hash,
        });
        match publish_patiently(&self.node, &end, Duration::from_secs(5)).await {
            Ok(()) => {
                tracing::info!(round = checkpoint.round, checkpoint = %hash, "run ended: announced")
            }
            Err(e) => tracing::warn!(error = %e, "the end of the run was not announced"),
        }
    }
}

/// Round 0's checkpoint: each shard of the fresh model made from the spec, hashed and dropped one at a time
/// (never the whole model at once, never stored: nodes make the round-0 shards they need from the same spec
/// and check them against this manifest); the manifest is hosted and committed to the store.
async fn create_initial(
    node: &NodeHandle,
    cfg: &ConductorConfig,
) -> Result<CheckpointManifest, NodeError> {
    let spec = cfg.spec.clone();
    let shards = blocking(move || {
        let mut shards = Vec::new();
        for shard in spec.shards() {
            let bytes = initial_shard(&spec, shard)?.to_bytes();
            shards.push(ShardEntry {
                shard,
                hash: ContentHash::of(&bytes),
                size: bytes.len() as u64,
                round: 0,
            });
        }
        Ok(shards)
    })
    .await?;
    let mut checkpoint = CheckpointManifest {
        run: cfg.machine.run.clone(),
        round: 0,
        shards,
    };
    checkpoint.shards.sort_by_key(|e| e.shard);
    let manifest_hash = node.host_blob_now(checkpoint.to_bytes()?).await?;
    commit_checkpoint_record(node.store(), &checkpoint, manifest_hash, IfPresent::Keep).await?;
    tracing::info!(shards = checkpoint.shards.len(), manifest = %manifest_hash, "round 0 checkpoint made (its shards' hashes; nodes make the shards)");
    Ok(checkpoint)
}
