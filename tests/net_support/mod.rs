//! Helpers shared by the multi-node tests (`tests/net_*.rs`): start a bootstrap and nodes on loopback with
//! port 0 and short intervals, and poll for a condition with a deadline.
#![allow(dead_code)]

pub mod hostile_provider;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use mana_bootstrap::{BootstrapConfig, BootstrapHandle};
use mana_node::daemon::{self, NodeConfig, NodeHandle};
use mana_node::net::libp2p::Multiaddr;

/// Starts a loopback bootstrap node keeping its key in `dir`.
pub async fn start_bootstrap(dir: &Path) -> BootstrapHandle {
    mana_bootstrap::start(BootstrapConfig::for_tests(dir))
        .await
        .expect("bootstrap starts")
}

/// A loopback node config in `dir`, joining through `bootstrap`.
pub fn node_config(dir: &Path, bootstrap: &[Multiaddr]) -> NodeConfig {
    let mut config = NodeConfig::for_tests(dir);
    config.net.bootstrap = bootstrap.to_vec();
    config
}

/// Starts a node.
pub async fn start_node(config: NodeConfig) -> NodeHandle {
    daemon::start(config).await.expect("node starts")
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so payloads are incompressible and reproducible.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What an honest participant `part` computes in round `ann`: the round's base (its manifest and the assigned
/// shards, fetched from the network, returned with the result) trained with the trainer's own local step. A fetch is retried (in
/// the first round a fetch can fail on a closed connection); `None` if the base manifest cannot be fetched.
/// The adversaries of the round tests start from it and send poisoned variants.
pub async fn honest_local_round(
    node: &NodeHandle,
    ann: &mana_protocol::RoundAnnouncement,
    part: &mana_protocol::Participant,
    spec: &mana_engine::round::RunSpec,
    data: &std::sync::Arc<mana_kernels::data::TextDataset>,
) -> Option<(
    mana_protocol::CheckpointManifest,
    mana_engine::round::LocalResult,
)> {
    use mana_engine::round::{InnerOptim, RunShard, ShardRecord, train_local};
    use mana_node::roles::common::fetch_bytes;
    // Tried again like the shards below: the first fetch of a run can fail on a connection still opening.
    let mut manifest_bytes = None;
    for _ in 0..5 {
        if let Ok(b) = fetch_bytes(
            node,
            ann.base_checkpoint,
            Vec::new(),
            Duration::from_secs(20),
        )
        .await
        {
            manifest_bytes = Some(b);
            break;
        }
    }
    let manifest_bytes = manifest_bytes?;
    let manifest = mana_protocol::CheckpointManifest::from_bytes(&manifest_bytes)
        .expect("coordinator manifest");
    let mut base = Vec::new();
    for shard in &part.shards {
        let entry = manifest
            .shard(shard)
            .expect("assigned shard in the manifest");
        // A round-0 shard is made here, as every node does, rather than fetched.
        if entry.round == 0
            && let Ok(state) = mana_engine::round::initial_shard(spec, *shard)
            && mana_protocol::ContentHash::of(&state.to_bytes()) == entry.hash
        {
            base.push(state);
            continue;
        }
        let mut bytes = Err(None);
        for _ in 0..5 {
            match fetch_bytes(node, entry.hash, Vec::new(), Duration::from_secs(20)).await {
                Ok(b) => {
                    bytes = Ok(b);
                    break;
                }
                Err(e) => bytes = Err(Some(e)),
            }
        }
        let bytes = bytes.expect("base shard");
        base.push(ShardRecord::from_bytes(&bytes, spec, *shard).expect("base shard decodes"));
    }
    let (spec, ann, part, data) = (spec.clone(), ann.clone(), part.clone(), data.clone());
    let local = tokio::task::spawn_blocking(move || {
        train_local(&spec, &ann, &part, &base, &data, &mut InnerOptim::new())
    })
    .await
    .expect("training task")
    .expect("honest local training");
    Some((manifest, local))
}

/// Publishes, as `node`, its deltas of round `ann` from `local` (what [`honest_local_round`] computed), each
/// hosted and announced: honest, through the shard's encoder in `encoders` (its error feedback carried from
/// round to round), or, for a shard where `scale` gives a factor, that many times the honest delta through a
/// fresh encoder (a poisoned delta, bound and encoded like an honest one). Returns each shard's payload hash
/// and whether it was scaled.
#[allow(dead_code)]
pub async fn publish_deltas(
    node: &NodeHandle,
    ann: &mana_protocol::RoundAnnouncement,
    local: &mana_engine::round::LocalResult,
    encoders: &mut std::collections::BTreeMap<mana_protocol::ShardId, mana_protocol::DeltaEncoder>,
    scale: impl Fn(mana_protocol::ShardId) -> Option<f32>,
) -> Vec<(mana_protocol::ShardId, mana_protocol::ContentHash, bool)> {
    use mana_protocol::{Binding, DeltaAnnouncement, DeltaEncoder, Message, ShardId};
    let me = node.public_key();
    let mut out = Vec::new();
    for (shard, delta) in &local.deltas {
        let loads: &[u32] = if *shard == ShardId::Trunk {
            &local.expert_tokens
        } else {
            &[]
        };
        let binding = Binding {
            run: ann.run.clone(),
            round: ann.round,
            shard: *shard,
            sender: me,
        };
        let factor = scale(*shard);
        let payload = if let Some(factor) = factor {
            let bad: Vec<f32> = delta.iter().map(|x| x * factor).collect();
            let mut encoder = DeltaEncoder::new(ann.hyper.codec).expect("codec");
            binding.wrap(loads, &encoder.encode(&bad).expect("encode"))
        } else {
            let encoder = encoders
                .entry(*shard)
                .or_insert_with(|| DeltaEncoder::new(ann.hyper.codec).expect("codec"));
            binding.wrap(loads, &encoder.encode(delta).expect("encode"))
        }
        .expect("bind");
        let size = payload.len() as u64;
        let hash = node.host_blob_now(payload).await.expect("host");
        let announcement = DeltaAnnouncement {
            run: ann.run.clone(),
            round: ann.round,
            shard: *shard,
            base_checkpoint: ann.base_checkpoint,
            payload_hash: hash,
            payload_size: size,
            stats: local.stats,
        };
        if node
            .publish(&Message::DeltaAnnouncement(announcement))
            .await
            .is_ok()
        {
            out.push((*shard, hash, factor.is_some()));
        }
    }
    out
}

/// Logs of the roles to the test's output, filtered by `RUST_LOG` (e.g. `RUST_LOG=mana_node=info` shows every
/// refusal with its detail); once per test binary.
/// A heartbeat of a node that hosts nothing and offers nothing (`software_version` names the test's role in
/// it): what the flood, adversary and bench tests publish, since every node judges it and no coordinator
/// gives it work.
pub fn idle_heartbeat(
    run: &mana_protocol::RunId,
    seq: u64,
    software_version: &str,
) -> mana_protocol::Message {
    mana_protocol::Message::Heartbeat(mana_protocol::Heartbeat {
        run: run.clone(),
        seq,
        hosted: Vec::new(),
        capacity: mana_protocol::Capacity {
            device: mana_protocol::DeviceKind::Cpu,
            memory_bytes: 0,
            tokens_per_second: 0.0,
            max_shards: 0,
        },
        software_version: mana_protocol::Text::new(software_version).expect("a short version text"),
    })
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Ends when `rx` turns true: the shutdown future a test gives a role.
pub async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// A member of the run that `coordinator` coordinates: it trains what it is assigned and fetches only that
/// (no shard sync of its own), and hosts up to 64 shards.
pub fn member_config(
    dir: &Path,
    boot: &[Multiaddr],
    name: &str,
    coordinator: mana_protocol::PublicKey,
) -> NodeConfig {
    let mut cfg = node_config(&dir.join(name), boot);
    cfg.coordinator = Some(coordinator);
    cfg.sync_shards = false;
    cfg.capacity.max_shards = 64;
    cfg
}

/// A role running as a task of the test.
pub type RoleTask = tokio::task::JoinHandle<Result<(), mana_node::daemon::NodeError>>;

/// An evaluator of the run that `coordinator` coordinates, in `dir/evaluator`: a mirror (it syncs every
/// committed checkpoint) running [`mana_node::roles::evaluator::run_evaluator`] until `stop` turns true, so
/// that the coordinator's metrics get their validation loss.
pub async fn start_evaluator(
    dir: &Path,
    boot: &[Multiaddr],
    coordinator: mana_protocol::PublicKey,
    spec: &mana_engine::round::RunSpec,
    data: &std::sync::Arc<mana_kernels::data::TextDataset>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (std::sync::Arc<NodeHandle>, RoleTask) {
    let cfg = mana_node::roles::evaluator::EvaluatorConfig::new(spec.clone(), data.clone());
    start_evaluator_with(dir, boot, coordinator, cfg, stop).await
}

/// [`start_evaluator`] with the evaluator's settings given (an export directory, say).
#[allow(dead_code)]
pub async fn start_evaluator_with(
    dir: &Path,
    boot: &[Multiaddr],
    coordinator: mana_protocol::PublicKey,
    evaluator: mana_node::roles::evaluator::EvaluatorConfig,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (std::sync::Arc<NodeHandle>, RoleTask) {
    let mut cfg = node_config(&dir.join("evaluator"), boot);
    cfg.coordinator = Some(coordinator);
    cfg.sync_shards = true;
    // It makes the round-0 shards of the run's model.
    cfg.genesis = Some(evaluator.spec.clone());
    let node = std::sync::Arc::new(start_node(cfg).await);
    let task = tokio::spawn(mana_node::roles::evaluator::run_evaluator(
        node.clone(),
        evaluator,
        stopped(stop),
    ));
    (node, task)
}

/// The network of the round tests, on loopback: a bootstrap, the coordinator's node (its role is the test's to
/// start), and honest trainers running [`mana_node::roles::trainer::run_trainer`] until `stop_tx` sends true,
/// all on the tiny model and 512 KiB of the built-in corpus.
pub struct RoundNet {
    /// Every node's data directory.
    pub dir: tempfile::TempDir,
    pub bootstrap: BootstrapHandle,
    /// The bootstrap's addresses.
    pub boot: Vec<Multiaddr>,
    pub coordinator: std::sync::Arc<NodeHandle>,
    pub trainers: Vec<(std::sync::Arc<NodeHandle>, RoleTask)>,
    pub spec: mana_engine::round::RunSpec,
    pub data: std::sync::Arc<mana_kernels::data::TextDataset>,
    pub stop_tx: tokio::sync::watch::Sender<bool>,
    pub stop_rx: tokio::sync::watch::Receiver<bool>,
    /// The trainers' `rescore_share` (1 unless a test says otherwise: tests check every round's scores).
    pub rescore_share: f64,
    /// The trainers' `fetch_timeout`, when a test shortens it.
    pub fetch_timeout: Option<Duration>,
}

impl RoundNet {
    /// Starts the bootstrap, the coordinator's node and `honest` trainers.
    pub async fn start(honest: usize) -> RoundNet {
        Self::start_with(honest, |_, _| {}).await
    }

    /// [`RoundNet::start`] with trainers that recompute the published scores in `share` of the rounds.
    pub async fn start_rescoring(honest: usize, share: f64) -> RoundNet {
        Self::build(honest, share, |_, _| {}).await
    }

    /// [`RoundNet::start`] with trainers that give up a fetch after `timeout`.
    pub async fn start_fetching_within(honest: usize, timeout: Duration) -> RoundNet {
        let mut net = Self::build(0, 1.0, |_, _| {}).await;
        net.fetch_timeout = Some(timeout);
        net.add_trainers(honest, |_, _| {}).await;
        net
    }

    /// [`RoundNet::start`], with `tweak(name, config)` applied to each node's config before it starts (names:
    /// `coordinator`, then `node-0`, `node-1`...).
    pub async fn start_with(honest: usize, tweak: impl Fn(&str, &mut NodeConfig)) -> RoundNet {
        Self::build(honest, 1.0, tweak).await
    }

    async fn build(honest: usize, share: f64, tweak: impl Fn(&str, &mut NodeConfig)) -> RoundNet {
        use mana_node::roles::common::{DataSource, load_dataset};
        use std::sync::Arc;
        init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
        let boot = bootstrap.addrs().to_vec();
        let spec = mana_engine::round::RunSpec::tiny();
        let data = Arc::new(
            load_dataset(&DataSource {
                builtin_bytes: 512 * 1024,
                ..DataSource::default()
            })
            .expect("corpus"),
        );
        let mut coord_cfg = node_config(&dir.path().join("coordinator"), &boot);
        coord_cfg.sync_shards = false;
        tweak("coordinator", &mut coord_cfg);
        let coordinator = Arc::new(start_node(coord_cfg).await);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut net = RoundNet {
            dir,
            bootstrap,
            boot,
            coordinator,
            trainers: Vec::new(),
            spec,
            data,
            stop_tx,
            stop_rx,
            rescore_share: share,
            fetch_timeout: None,
        };
        net.add_trainers(honest, tweak).await;
        net
    }

    /// Starts `honest` trainers named `node-0`, `node-1`..., with `tweak(name, config)` applied to each.
    async fn add_trainers(&mut self, honest: usize, tweak: impl Fn(&str, &mut NodeConfig)) {
        let key = self.coordinator.public_key();
        for i in 0..honest {
            let name = format!("node-{i}");
            let mut config = member_config(self.dir.path(), &self.boot, &name, key);
            tweak(&name, &mut config);
            self.add_trainer(config).await;
        }
    }

    /// Starts one more honest trainer (a member of the run) with `config`, at any time: a late joiner. It
    /// declares `config.capacity.max_shards` shards of room (when not 0).
    pub async fn add_trainer(&mut self, config: NodeConfig) -> std::sync::Arc<NodeHandle> {
        use mana_node::roles::trainer::{TrainerConfig, run_trainer};
        let mut cfg = TrainerConfig::new(self.spec.clone(), self.data.clone());
        if config.capacity.max_shards > 0 {
            cfg.max_shards = config.capacity.max_shards;
        }
        let node = std::sync::Arc::new(start_node(config).await);
        cfg.rescore_share = self.rescore_share;
        if let Some(timeout) = self.fetch_timeout {
            cfg.fetch_timeout = timeout;
        }
        let task = tokio::spawn(run_trainer(
            node.clone(),
            cfg,
            stopped(self.stop_rx.clone()),
        ));
        self.trainers.push((node.clone(), task));
        node
    }
}

impl RoundNet {
    /// The config of a node named `name` that follows the run without syncing shards of its own (an
    /// inference client, or a host a test plays): it trusts the coordinator's signed commits.
    pub fn follower_config(&self, name: &str) -> NodeConfig {
        let mut cfg = node_config(&self.dir.path().join(name), &self.boot);
        cfg.coordinator = Some(self.coordinator.public_key());
        cfg.sync_shards = false;
        cfg
    }
}

/// Every shard of `manifest`, fetched by hash through `node` and read as `spec`'s records: the whole
/// checkpoint, for a local reference to compare a network run with.
pub async fn checkpoint_records(
    node: &NodeHandle,
    manifest: &mana_protocol::CheckpointManifest,
    spec: &mana_engine::round::RunSpec,
) -> Vec<mana_engine::round::ShardRecord> {
    use mana_engine::round::{RunShard, ShardRecord};
    let mut records = Vec::new();
    for entry in &manifest.shards {
        node.fetch_blob(entry.hash).await.expect("shard fetched");
        let bytes = node.read_blob(entry.hash).await.expect("shard read");
        records.push(ShardRecord::from_bytes(&bytes, spec, entry.shard).expect("shard"));
    }
    records
}

impl RoundNet {
    /// The real conductor on the coordinator's node, for `rounds` rounds (or until the test stops it), starting
    /// a round once `min_members` members heartbeat; sync rule, replication 2.
    pub fn conduct(&self, rounds: u64, min_members: usize) -> RoleTask {
        self.conduct_with(rounds, min_members, |_| {})
    }

    /// [`RoundNet::conduct`], with `tweak` applied to the state machine's settings.
    pub fn conduct_with(
        &self,
        rounds: u64,
        min_members: usize,
        tweak: impl FnOnce(&mut mana_engine::coordinator::CoordinatorConfig),
    ) -> RoleTask {
        use mana_node::roles::conductor::{ConductorConfig, machine_config, run_conductor};
        let run = self.coordinator.config().net.run_id.clone();
        let mut machine = machine_config(run, &self.spec, mana_protocol::UpdateRule::Sync, 2)
            .expect("machine config");
        machine.min_members = min_members;
        // Room for the first round, in which every node fetches the base model on a debug build and two cores.
        machine.train_ms = 15_000;
        machine.verify_ms = 10_000;
        machine.cooldown_ms = 200;
        tweak(&mut machine);
        let mut role = ConductorConfig::new(machine, self.spec.clone(), self.data.clone());
        role.rounds = Some(rounds);
        tokio::spawn(run_conductor(
            self.coordinator.clone(),
            role,
            stopped(self.stop_rx.clone()),
        ))
    }

    /// `rounds` honest rounds by the real conductor (each started once `min_members` members heartbeat), then
    /// waits until every trainer applied the last one (a trainer may miss the first round: its first fetch can
    /// fail on a connection still being set up; it catches up in the next). Returns the trainers' statuses.
    pub async fn honest_rounds(
        &self,
        rounds: u64,
        min_members: usize,
    ) -> Vec<mana_node::daemon::NodeStatus> {
        self.rounds_with(rounds, min_members, |_| {}, Duration::from_secs(180))
            .await
    }

    /// [`RoundNet::honest_rounds`] with `tweak` applied to the state machine's settings (another update
    /// rule, more inner steps), the conductor given up to `timeout`.
    pub async fn rounds_with(
        &self,
        rounds: u64,
        min_members: usize,
        tweak: impl FnOnce(&mut mana_engine::coordinator::CoordinatorConfig),
        timeout: Duration,
    ) -> Vec<mana_node::daemon::NodeStatus> {
        tokio::time::timeout(timeout, self.conduct_with(rounds, min_members, tweak))
            .await
            .expect("the rounds in time")
            .expect("coordinator task")
            .expect("coordinator ran");
        self.wait_trainers(
            Duration::from_secs(60),
            "every trainer applied the last round",
            |s| training(s).applied_round == Some(rounds),
        )
        .await
    }

    /// Publishes `ann` as the coordinator, as a test that plays the coordinator does.
    pub async fn announce(&self, ann: &mana_protocol::RoundAnnouncement) {
        mana_node::roles::common::publish_patiently(
            &self.coordinator,
            &mana_protocol::Message::RoundAnnouncement(ann.clone()),
            Duration::from_secs(10),
        )
        .await
        .expect("the round announced");
    }

    /// Every trainer's status, in order.
    pub async fn statuses(&self) -> Vec<mana_node::daemon::NodeStatus> {
        let mut out = Vec::new();
        for (node, _) in &self.trainers {
            out.push(node.status().await.expect("status"));
        }
        out
    }

    /// Waits until every trainer's status satisfies `check`.
    pub async fn wait_trainers(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&mana_node::daemon::NodeStatus) -> bool,
    ) -> Vec<mana_node::daemon::NodeStatus> {
        wait_for(timeout, what, || async {
            let all = self.statuses().await;
            all.iter().all(&check).then_some(all)
        })
        .await
    }

    /// Stops the roles (through `stop_tx`), then every node and the bootstrap.
    pub async fn stop(self) {
        let _ = self.stop_tx.send(true);
        for (node, task) in self.trainers {
            task.await.expect("trainer task").expect("trainer ran");
            std::sync::Arc::into_inner(node)
                .expect("sole owner")
                .shutdown()
                .await
                .expect("shutdown");
        }
        std::sync::Arc::into_inner(self.coordinator)
            .expect("sole owner")
            .shutdown()
            .await
            .expect("shutdown");
        self.bootstrap.shutdown().await;
    }
}

/// A trainer's part of its status.
pub fn training(s: &mana_node::daemon::NodeStatus) -> &mana_node::daemon::status::TrainingStatus {
    s.training.as_ref().expect("a trainer reports its training")
}

/// Every message a node accepts, kept for the test to look at.
#[derive(Clone, Default)]
pub struct Heard(std::sync::Arc<std::sync::Mutex<Vec<mana_node::daemon::Accepted>>>);

impl Heard {
    /// Starts keeping what `node` accepts from now on.
    pub fn listen(node: &mana_node::daemon::NodeHandle) -> Heard {
        let heard = Heard::default();
        let (mut rx, kept) = (node.accepted(), heard.0.clone());
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(m) => kept.lock().expect("lock").push(m),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        heard
    }

    /// What `f` picks out of the messages kept so far, in arrival order.
    pub fn find<T>(&self, f: impl Fn(&mana_node::daemon::Accepted) -> Option<T>) -> Vec<T> {
        self.0.lock().expect("lock").iter().filter_map(f).collect()
    }

    /// The announcement and the commit of `round`, as heard.
    pub fn round(
        &self,
        round: u64,
    ) -> (mana_protocol::RoundAnnouncement, mana_protocol::RoundCommit) {
        use mana_protocol::Message;
        let ann = self
            .find(|m| match &m.message {
                Message::RoundAnnouncement(a) if a.round == round => Some(a.clone()),
                _ => None,
            })
            .pop()
            .expect("the round announced");
        let commit = self
            .find(|m| match &m.message {
                Message::RoundCommit(c) if c.round == round => Some(c.clone()),
                _ => None,
            })
            .pop()
            .expect("the round committed");
        (ann, commit)
    }

    /// Waits until `senders` distinct keys announced a trunk delta for `round`; returns them with their
    /// payload hashes, sorted.
    pub async fn trunk_deltas(
        &self,
        round: u64,
        senders: usize,
    ) -> Vec<(mana_protocol::PublicKey, mana_protocol::ContentHash)> {
        use mana_protocol::{Message, ShardId};
        wait_for(
            Duration::from_secs(60),
            &format!("{senders} trunk deltas of round {round}"),
            || async {
                let mut deltas = self.find(|m| match &m.message {
                    Message::DeltaAnnouncement(d)
                        if d.round == round && d.shard == ShardId::Trunk =>
                    {
                        Some((m.signer, d.payload_hash))
                    }
                    _ => None,
                });
                deltas.sort();
                deltas.dedup();
                (deltas.len() == senders).then_some(deltas)
            },
        )
        .await
    }
}

/// A finished run as a test sees it: the coordinator's metrics lines, and the commits, announcements and
/// calls one node heard.
#[allow(dead_code)]
pub struct RoundsHeard {
    pub lines: Vec<mana_node::roles::conductor::RoundMetrics>,
    pub commits: Vec<mana_protocol::RoundCommit>,
    pub announcements: Vec<mana_protocol::RoundAnnouncement>,
    pub calls: Vec<mana_protocol::AggregationCall>,
}

/// Waits up to `within` for the conductor task `coordinating` to finish its `rounds` rounds, checks that
/// it wrote a metrics line for each to `metrics`, and waits (10 s at most) until `heard` has every commit.
#[allow(dead_code)]
pub async fn rounds_heard(
    coordinating: RoleTask,
    within: Duration,
    metrics: &Path,
    heard: &Heard,
    rounds: u64,
) -> RoundsHeard {
    use mana_protocol::Message;
    tokio::time::timeout(within, coordinating)
        .await
        .expect("the coordinator finishes its rounds in time")
        .expect("coordinator task")
        .expect("coordinator ran");
    let lines: Vec<mana_node::roles::conductor::RoundMetrics> = std::fs::read_to_string(metrics)
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line"))
        .collect();
    assert_eq!(lines.len() as u64, rounds);
    let commits = wait_for(Duration::from_secs(10), "every commit heard", || {
        let heard = heard.clone();
        async move {
            let c = heard.find(|m| match &m.message {
                Message::RoundCommit(c) => Some(c.clone()),
                _ => None,
            });
            (c.len() as u64 >= rounds).then_some(c)
        }
    })
    .await;
    let announcements = heard.find(|m| match &m.message {
        Message::RoundAnnouncement(a) => Some(a.clone()),
        _ => None,
    });
    let calls = heard.find(|m| match &m.message {
        Message::AggregationCall(c) => Some(c.clone()),
        _ => None,
    });
    RoundsHeard {
        lines,
        commits,
        announcements,
        calls,
    }
}

/// Round `round` as a test playing the coordinator announces it after `prev`: the same participants and
/// settings, starting from checkpoint `base`, with deadlines a minute and a half away.
pub fn next_announcement(
    prev: &mana_protocol::RoundAnnouncement,
    round: u64,
    base: &mana_protocol::CheckpointManifest,
) -> mana_protocol::RoundAnnouncement {
    let now = daemon::now_ms();
    mana_protocol::RoundAnnouncement {
        round,
        base_checkpoint: base.hash().expect("manifest hash"),
        deadlines: mana_protocol::Deadlines {
            deltas_by_ms: now + 60_000,
            commit_by_ms: now + 90_000,
        },
        ..prev.clone()
    }
}

/// Asserts that no node in `statuses` scores a peer below zero, peers in `except` (the test's own attackers)
/// aside: the honest ones were not penalised.
pub fn assert_no_peer_scored_below_zero(
    statuses: &[mana_node::daemon::NodeStatus],
    except: &[String],
) {
    for s in statuses {
        for peer in s.peers.iter().filter(|p| !except.contains(&p.peer_id)) {
            assert!(
                peer.gossip_score.unwrap_or(0.0) >= 0.0,
                "{} scores {} at {:?}",
                s.peer_id,
                peer.peer_id,
                peer.gossip_score
            );
        }
    }
}

/// Waits for `evaluator` to export `checkpoint` to `export`, then checks the export: `exported.json` names
/// the checkpoint, and the model holds, bit for bit, every shard of it as the evaluator mirrored it (from its
/// holders, by hash). Returns those shards.
#[allow(dead_code)]
pub async fn assert_exported(
    evaluator: &NodeHandle,
    export: &Path,
    checkpoint: &mana_protocol::CheckpointManifest,
    spec: &mana_engine::round::RunSpec,
) -> Vec<mana_engine::round::ShardRecord> {
    use mana_engine::round::{RunShard, ShardRecord};
    use mana_node::roles::evaluator::{EXPORTED_FILE, ExportedCheckpoint};
    let round = checkpoint.round;
    wait_for(
        Duration::from_secs(60),
        "the evaluator exports the last round",
        || async {
            let e = evaluator.status().await.ok()?.evaluator?;
            (e.exported_round == Some(round)).then_some(())
        },
    )
    .await;
    let named: ExportedCheckpoint =
        serde_json::from_slice(&std::fs::read(export.join(EXPORTED_FILE)).expect("exported.json"))
            .expect("exported.json parses");
    assert_eq!(
        named,
        ExportedCheckpoint {
            round,
            checkpoint: checkpoint.hash().expect("hash").to_string(),
        }
    );
    let exported =
        mana_kernels::train::Trainer::load(export, Box::new(mana_kernels::CpuBackend::new()))
            .expect("the exported model loads");
    let mut shards = Vec::new();
    for entry in &checkpoint.shards {
        let bytes = evaluator
            .read_blob(entry.hash)
            .await
            .expect("a committed shard, mirrored");
        let shard = ShardRecord::from_bytes(&bytes, spec, entry.shard).expect("a shard state");
        let params = exported
            .model()
            .export_shard(entry.shard)
            .expect("a shard of the model");
        assert!(
            params
                .iter()
                .map(|v| v.to_bits())
                .eq(shard.params.iter().map(|v| v.to_bits())),
            "the export's {} is not the committed one",
            entry.shard
        );
        shards.push(shard);
    }
    shards
}
