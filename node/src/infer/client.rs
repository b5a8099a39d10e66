//! The inference client: a node that learns the run's latest committed checkpoint and who hosts its experts,
//! fetches the trunk, runs it locally and has every routed expert computed by its hosts.
//!
//! Usage: start a node joined to the run (it needs the coordinator's key to accept commits), wrap it in an
//! [`InferClient`], [`InferClient::load`] a [`Session`] and call [`Session::generate`] from a blocking thread.
//!
//! What the client trusts:
//! - the checkpoint comes from a [`RoundCommit`] that the node accepted, i.e. signed by the run's
//!   coordinator; the trunk blob is fetched by the hash that commit names and checked against it;
//! - who hosts an expert comes from signed messages only: the participants of the coordinator's round
//!   announcements, and each node's own signed heartbeat naming the shards it hosts. A host that does not in
//!   fact serve the expert of that checkpoint answers `Unavailable` (or not at all) and the next one is asked.
//!
//! An expert that no replica answers is dropped for the tokens that chose it, each keeping at least
//! [`InferConfig::k_min`] of its top-k ([`super::remote`]); a step that cannot is tried again for up to
//! [`InferConfig::wait`] ([`super::patient`]).
//!
//! A client hears commits from the moment it joins: one started after the run's last commit waits for the
//! next (there is no catch-up request yet).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use mana_engine::round::{RunShard, RunSpec, ShardRecord};
use mana_kernels::CpuBackend;
use mana_kernels::generate::{self, CachedModel, GenerateConfig, GenerateError, Generation};
use mana_kernels::model::{ExpertRunner, ExpertSet, Model, ModelError};
use mana_protocol::{CheckpointManifest, ContentHash, Message, RoundCommit, ShardId};

use super::cache::{CacheStats, CachedExperts, RoutingCounts};
use super::check::AnswerCheck;
use super::dispatch::Dispatch;
use super::fetch::ExpertSource;
use super::lock;
use super::patient::Patient;
use super::remote::{CallStats, Hosts, NetworkExperts};
use crate::daemon::{NodeError, NodeHandle, blocking};

/// How a client behaves.
#[derive(Debug, Clone)]
pub struct InferConfig {
    /// The run's model (its shape must match the checkpoint's shards).
    pub spec: RunSpec,
    /// Time for one expert call before the next replica is asked.
    pub call_timeout: Duration,
    /// How long [`InferClient::load`] waits for a signed commit and for a host of every expert, and how
    /// long a generation step that lacks `k_min` answers for some token is tried again before generation
    /// fails ([`super::patient`]).
    pub wait: Duration,
    /// The share of expert calls also asked of a second replica, to catch hosts that answer wrong
    /// ([`super::check`]; 0 checks none, 1 every call).
    pub check_share: f64,
    /// The fewest of a token's top-k routed experts that must answer: an expert no replica answered in
    /// time is dropped for a token that keeps at least this many, its gates renormalized over them
    /// (Hivemind's rule, [`mana_kernels::model::experts`]); the model's top-k (or more) means every one.
    pub k_min: usize,
    /// Most experts the client computes itself: the ones its prompts route to most, fetched by hash from
    /// the committed checkpoint ([`super::cache`]; 0: every expert on the network).
    pub cache_experts: usize,
    /// The encodings of expert calls (the default, FP8 hidden states and f32 answers, and [`Dispatch::F32`] give output bit-identical
    /// to the whole FP8 model's).
    pub dispatch: Dispatch,
}

/// Why the client could not generate.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The node failed (fetching the trunk, reading the store).
    #[error(transparent)]
    Node(#[from] NodeError),
    /// No signed commit was heard in time.
    #[error("no signed commit of the run heard within {0:?} (is the run still committing rounds?)")]
    NoCommit(Duration),
    /// Some experts have no known host.
    #[error(
        "no host known for {missing} expert(s) of round {round}, e.g. {example}, after {after:?}"
    )]
    NoHosts {
        /// The checkpoint's round.
        round: u64,
        /// How many experts lack a host.
        missing: usize,
        /// One of them.
        example: ShardId,
        /// How long the client waited.
        after: Duration,
    },
    /// The checkpoint has no trunk.
    #[error("the checkpoint of round {0} has no trunk")]
    NoTrunk(u64),
    /// The trunk's model could not be built.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Generation failed (a step still lacking `k_min` answers for some token after the wait, two replicas
    /// that disagreed on an expert that could not be computed here, a bad prompt).
    #[error(transparent)]
    Generate(#[from] GenerateError),
}

/// Most peers whose heartbeats a client keeps (each is signed, but keys cost nothing to make).
pub const MAX_HEARD_HOSTS: usize = 4096;

/// What the client has heard: the latest signed commit, and who hosts what.
#[derive(Debug, Default)]
struct Directory {
    commit: Option<RoundCommit>,
    /// Hosts named by the coordinator's latest announcement.
    assigned: BTreeMap<ShardId, BTreeSet<PeerId>>,
    /// Hosts by their own signed heartbeats.
    heartbeats: BTreeMap<PeerId, Vec<ShardId>>,
}

impl Directory {
    fn hear(&mut self, signer: PeerId, message: &Message) {
        match message {
            Message::RoundCommit(c)
                if self.commit.as_ref().is_none_or(|old| c.round > old.round) =>
            {
                self.commit = Some(c.clone());
            }
            Message::RoundAnnouncement(a) => {
                self.assigned.clear();
                for p in &a.participants {
                    let Ok(peer) = p.node.peer_id() else { continue };
                    for shard in &p.shards {
                        self.assigned.entry(*shard).or_default().insert(peer);
                    }
                }
            }
            Message::Heartbeat(h)
                if self.heartbeats.len() < MAX_HEARD_HOSTS
                    || self.heartbeats.contains_key(&signer) =>
            {
                self.heartbeats.insert(signer, h.hosted.clone());
            }
            _ => {}
        }
    }

    /// The hosts of every expert of `manifest` (assigned first, then by heartbeat), leaving out `me`.
    fn hosts(&self, manifest: &CheckpointManifest, me: PeerId) -> Hosts {
        let mut hosts = Hosts::new();
        for entry in &manifest.shards {
            if entry.shard.expert_position().is_none() {
                continue;
            }
            let mut peers: Vec<PeerId> = self
                .assigned
                .get(&entry.shard)
                .into_iter()
                .flatten()
                .copied()
                .collect();
            for (peer, hosted) in &self.heartbeats {
                if hosted.contains(&entry.shard) && !peers.contains(peer) {
                    peers.push(*peer);
                }
            }
            peers.retain(|p| *p != me);
            hosts.insert(entry.shard, peers);
        }
        hosts
    }
}

/// A client on a running node.
pub struct InferClient {
    node: Arc<NodeHandle>,
    cfg: InferConfig,
    directory: Arc<Mutex<Directory>>,
}

/// How often [`InferClient::load`] looks again while it waits.
const POLL: Duration = Duration::from_millis(100);

impl InferClient {
    /// Starts listening on `node` for commits, announcements and heartbeats (messages the node accepted,
    /// so signed and validated).
    pub fn new(node: Arc<NodeHandle>, cfg: InferConfig) -> Self {
        let directory = Arc::new(Mutex::new(Directory::default()));
        let heard = directory.clone();
        node.follow_accepted("inference client", move |a| {
            if let Ok(signer) = a.signer.peer_id() {
                lock(&heard).hear(signer, &a.message);
            }
        });
        Self {
            node,
            cfg,
            directory,
        }
    }

    /// Waits (up to the configured time) for a signed commit and a known host of each of its experts, then
    /// fetches the trunk by the commit's hash and builds the session.
    pub async fn load(&self) -> Result<Session, InferError> {
        let wait = self.cfg.wait;
        let deadline = tokio::time::Instant::now() + wait;
        let me = self.node.peer_id();
        let (manifest, hosts) = loop {
            let found = {
                let dir = lock(&self.directory);
                dir.commit.as_ref().map(|c| {
                    let hosts = dir.hosts(&c.checkpoint, me);
                    (c.checkpoint.clone(), hosts)
                })
            };
            let now = tokio::time::Instant::now();
            match found {
                Some((manifest, hosts)) => {
                    let missing: Vec<ShardId> = hosts
                        .iter()
                        .filter(|(_, peers)| peers.is_empty())
                        .map(|(s, _)| *s)
                        .collect();
                    if missing.is_empty() {
                        break (manifest, hosts);
                    }
                    if now >= deadline {
                        return Err(InferError::NoHosts {
                            round: manifest.round,
                            missing: missing.len(),
                            example: missing[0],
                            after: wait,
                        });
                    }
                }
                None if now >= deadline => return Err(InferError::NoCommit(wait)),
                None => {}
            }
            tokio::time::sleep(POLL).await;
        };
        let checkpoint = manifest.hash().map_err(NodeError::from)?;
        let trunk = manifest
            .shard(&ShardId::Trunk)
            .ok_or(InferError::NoTrunk(manifest.round))?;
        // Fetched by the hash the signed commit names: the fetch checks the bytes against it.
        self.node.fetch_blob(trunk.hash).await?;
        let bytes = self.node.read_blob(trunk.hash).await?;
        let spec = self.cfg.spec.clone();
        let model = blocking(move || {
            let record = ShardRecord::from_bytes(&bytes, &spec, ShardId::Trunk)?;
            trunk_model(&spec, &record)
                .map_err(|e| NodeError::Round(mana_engine::round::RoundError::from(e)))
        })
        .await?;
        let runtime = tokio::runtime::Handle::current();
        let network = NetworkExperts::new(
            self.node.net().clone(),
            runtime.clone(),
            self.node.config().net.run_id.clone(),
            checkpoint,
            hosts,
            self.cfg.call_timeout,
        )
        .with_dispatch(self.cfg.dispatch)
        .with_check(Arc::new(AnswerCheck::new(
            self.node.clone(),
            self.cfg.spec.clone(),
            &manifest,
            self.cfg.check_share,
        )));
        let source = ExpertSource::new(self.node.clone(), self.cfg.spec.clone(), &manifest);
        let experts = CachedExperts::new(network, source, runtime, self.cfg.cache_experts);
        tracing::info!(round = manifest.round, %checkpoint, "inference session loaded");
        Ok(Session {
            round: manifest.round,
            checkpoint,
            manifest,
            model,
            experts,
            k_min: self.cfg.k_min,
            wait: self.cfg.wait,
        })
    }
}

/// `model` (the trunk) with `runner` computing the experts it lacks, under the `k_min` rule, a stalled step
/// run again for up to `wait` (counted in `experts`' network stats).
fn patient_model<'a>(
    model: &'a mut Model,
    runner: Box<dyn ExpertRunner>,
    k_min: usize,
    experts: &CachedExperts,
    wait: Duration,
) -> Patient<CachedModel<'a>> {
    let lm = CachedModel::with_experts(model, runner).with_k_min(k_min);
    Patient::new(lm, experts.network().clone(), wait)
}

/// The trunk of `spec`'s model with `record`'s parameters and router biases, holding no expert.
pub fn trunk_model(spec: &RunSpec, record: &ShardRecord) -> Result<Model, ModelError> {
    let cfg = spec.model.clone();
    let mut model = Model::with_experts(
        cfg.clone(),
        ExpertSet::none(&cfg),
        spec.init_seed,
        Box::new(CpuBackend::new()),
    )?;
    model.import_shard(ShardId::Trunk, &record.params)?;
    let e = cfg.n_routed_experts;
    let mut biases = record.router_bias.chunks_exact(e.max(1));
    for layer in (0..cfg.n_layers).filter(|&l| cfg.is_moe_layer(l)) {
        let bias = biases.next().ok_or(ModelError::Length {
            what: "router bias".into(),
            expected: spec.router_bias_len(ShardId::Trunk),
            actual: record.router_bias.len(),
        })?;
        model.set_router_bias(layer, bias)?;
    }
    Ok(model)
}

/// A loaded checkpoint: the trunk here, the experts on their hosts (and the most routed ones here too, with a
/// cache).
pub struct Session {
    /// The round whose commit made the checkpoint.
    pub round: u64,
    /// The checkpoint (manifest hash).
    pub checkpoint: ContentHash,
    /// The checkpoint's manifest, from the signed commit.
    pub manifest: CheckpointManifest,
    model: Model,
    experts: CachedExperts,
    /// [`InferConfig::k_min`].
    k_min: usize,
    /// How long a stalled step is tried again ([`InferConfig::wait`]).
    wait: Duration,
}

impl Session {
    /// Generates after `prompt` (blocking: it waits on expert calls; run it off the async threads). An
    /// expert no replica answers is dropped under the `k_min` rule; a step that cannot go on is tried again
    /// for up to the session's wait, then generation fails with
    /// [`mana_kernels::KernelError::TooFewExperts`].
    pub fn generate(
        &mut self,
        prompt: &[u32],
        config: &GenerateConfig,
    ) -> Result<Generation, GenerateError> {
        self.generate_each(prompt, config, &mut |_| std::ops::ControlFlow::Continue(()))
    }

    /// The trunk here with every routed expert asked of its hosts (or computed by the cache), under the
    /// `k_min` rule and patient with stalls, as a [`generate::LanguageModel`]: the logits of any window (to
    /// score a text, or compare them with another model's). Blocking, like [`Session::generate`].
    pub fn language_model(&mut self) -> Patient<CachedModel<'_>> {
        let runner = Box::new(self.experts.clone());
        patient_model(
            &mut self.model,
            runner,
            self.k_min,
            &self.experts,
            self.wait,
        )
    }

    /// Like [`Session::generate`], handing each token over as it is committed (see
    /// [`generate::generate_each`]). With a cache, the ranking of the experts is looked at after every
    /// token and at the end ([`CachedExperts::refresh`]; fetches run in the background).
    pub fn generate_each(
        &mut self,
        prompt: &[u32],
        config: &GenerateConfig,
        on_token: &mut dyn FnMut(u32) -> std::ops::ControlFlow<()>,
    ) -> Result<Generation, GenerateError> {
        let runner = Box::new(self.experts());
        self.run(prompt, config, runner, on_token)
    }

    /// Generates after `prompt` with `runner` computing the experts in place of the session's own network
    /// runner: for a program that wraps [`Session::experts`] (to time, trace or delay its calls) or puts
    /// experts of its own in front of it. Blocking, and under the same `k_min` rule and wait, like
    /// [`Session::generate`].
    pub fn generate_with(
        &mut self,
        prompt: &[u32],
        config: &GenerateConfig,
        runner: Box<dyn ExpertRunner>,
    ) -> Result<Generation, GenerateError> {
        self.run(prompt, config, runner, &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
    }

    /// Generation through `runner`, with the trunk here, under the `k_min` rule, patient with stalls; the
    /// cache's ranking looked at after every token and at the end.
    fn run(
        &mut self,
        prompt: &[u32],
        config: &GenerateConfig,
        runner: Box<dyn ExpertRunner>,
        on_token: &mut dyn FnMut(u32) -> std::ops::ControlFlow<()>,
    ) -> Result<Generation, GenerateError> {
        let experts = &self.experts;
        let mut lm = patient_model(&mut self.model, runner, self.k_min, experts, self.wait);
        let mut each = |token| {
            experts.refresh();
            on_token(token)
        };
        let generation = generate::generate_each(&mut lm, prompt, config, &mut each);
        experts.refresh();
        generation
    }

    /// The session's expert runner (the cache in front of the network); clones share its held experts,
    /// routing counts, host order, bans and counts.
    pub fn experts(&self) -> CachedExperts {
        self.experts.clone()
    }

    /// The model's configuration (vocabulary, context).
    pub fn model_config(&self) -> &mana_kernels::model::ModelConfig {
        self.model.config()
    }

    /// Expert calls made on the network so far.
    pub fn call_stats(&self) -> CallStats {
        self.experts.network().stats()
    }

    /// The experts held here and the calls they answered.
    pub fn cache_stats(&self) -> CacheStats {
        self.experts.stats()
    }

    /// Who the session asks for each expert, as learned from signed messages when it loaded.
    pub fn hosts(&self) -> &Hosts {
        self.experts.network().hosts()
    }

    /// The rows routed to each expert so far (what the cache ranks by).
    pub fn routing(&self) -> RoutingCounts {
        self.experts.routing()
    }

    /// Waits until the cache holds the most-routed experts so far (see [`CachedExperts::settle`]); call it
    /// between generations, from async code.
    pub async fn settle_cache(&self) {
        self.experts.settle().await
    }

    /// The hosts caught answering wrong (asked nothing more in this session).
    pub fn banned_hosts(&self) -> Vec<PeerId> {
        self.experts.network().banned()
    }
}
