//! The `mana node` runtime: ties the network layer, the store and the protocol's validation together.
//!
//! [`start`] loads (or creates) the node's key, opens the store, builds the swarm, subscribes to the run's
//! topics and spawns one task that handles network events:
//! - every gossip message is decoded, its envelope verified and judged by
//!   [`mana_protocol::validate_envelope`]; replays are caught by a window of seen message hashes; the verdict
//!   goes back to gossipsub (Accept forwards; Reject scores the forwarder down) and rejections are logged in
//!   the store with their reason;
//! - fetch requests and bulk blob streams are served from the store (hash-verified reads, cached for ranged
//!   serving);
//! - an accepted checkpoint manifest starts shard sync ([`sync`]): missing shards are found in the DHT,
//!   fetched, hash-checked, stored, announced, and the round is committed;
//! - every few seconds a signed heartbeat goes out and `status.json` is rewritten atomically in the data
//!   directory, which is how `mana status` reads a running node ([`status`]).
//!
//! [`NodeHandle`] is what callers (the CLI, tests, later the trainer) hold: publish, host and fetch blobs,
//! read the status, shut down.

pub mod checkpoint;
pub mod config;
mod dashboard;
pub mod equivocation;
pub mod hosts;
mod parcel;
pub use parcel::{ParcelCounts, SPREAD_PATIENCE};
pub mod peers;
pub mod serve;
pub mod status;
pub mod sync;
mod validate;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::PeerId;
use mana_protocol::{
    Capacity, CheckpointManifest, ContentHash, Heartbeat, Keypair, Message, SignedEnvelope, Text,
    topic,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::keyfile;
use crate::net::{self, Client, NetEvent};
use crate::store::{Store, StoreConfig};

pub use config::NodeConfig;
pub use status::NodeStatus;

/// Why the node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The key file could not be loaded or created.
    #[error(transparent)]
    Key(#[from] keyfile::KeyFileError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The network failed.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// A fetch failed (no provider, hash mismatch...).
    #[error(transparent)]
    Fetch(#[from] net::fetch::FetchError),
    /// Encoding or signing a message failed.
    #[error(transparent)]
    Protocol(#[from] mana_protocol::ProtocolError),
    /// The configuration is unusable.
    #[error("config: {0}")]
    Config(String),
    /// `--verify-store` found damage.
    #[error("store verification failed: {0}")]
    Verify(String),
    /// A task of the node panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The node's status could not be encoded, written or read back.
    #[error("status {}: {detail}", path.display())]
    Status {
        /// The status file.
        path: std::path::PathBuf,
        /// What failed.
        detail: String,
    },
    /// A round computation of the engine failed (bad shard state, wrong lengths, a model error...).
    #[error(transparent)]
    Round(#[from] mana_engine::round::RoundError),
    /// The coordinator's state machine refused its settings or its saved state.
    #[error(transparent)]
    Coordinator(#[from] mana_engine::coordinator::CoordinatorError),
    /// A delta payload could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] mana_protocol::CodecError),
    /// A contribution payload is not one (no binding, a malformed one, or a bad delta after it).
    #[error(transparent)]
    Contribution(#[from] mana_protocol::ContributionError),
    /// A blob is bigger than the caller accepts (an announced payload size, for instance).
    #[error("{what} is {len} bytes, over the {max} accepted")]
    TooLarge {
        /// What was too large.
        what: String,
        /// Its length.
        len: u64,
        /// The most accepted.
        max: u64,
    },
    /// A batch of the run's text could not be made.
    #[error(transparent)]
    Dataset(#[from] mana_kernels::data::DatasetError),
    /// The model could not be evaluated or saved.
    #[error(transparent)]
    Train(#[from] mana_kernels::train::TrainError),
    /// Something the role waited for did not come in time (a payload fetch, for instance).
    #[error("{what} took longer than {after:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        after: Duration,
    },
    /// The operating system's random number generator failed.
    #[error("operating system randomness: {0}")]
    Randomness(#[source] getrandom::Error),
    /// A file the role writes (metrics, export) could not be written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file or directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No round announcement was heard yet, so the round's settings (its batch shape) are unknown.
    #[error("round {round}: no round announcement heard yet, so its settings are unknown")]
    NoAnnouncement {
        /// The round.
        round: u64,
    },
    /// A committed checkpoint lacks a shard that the role needs (or the commit names a state it never saw).
    #[error("round {round}: no state for {shard}")]
    MissingShard {
        /// The round.
        round: u64,
        /// The shard.
        shard: mana_protocol::ShardId,
    },
}

/// A message that passed validation, as delivered to local subscribers (tests, the trainer).
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The peer that forwarded it to us.
    pub source: PeerId,
    /// The signer's public key.
    pub signer: mana_protocol::PublicKey,
    /// The message.
    pub message: Message,
    /// The signed envelope it came in, as received: what a role or a test shows others as proof (a dispute, a
    /// commit), checkable with the signer's key alone.
    pub envelope: Arc<SignedEnvelope>,
}

/// The mutable state shared by the handle and the event task. A std mutex: it is never held across an
/// `.await`.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Current round, from the last accepted round announcement. Shared, not copied: every gossip message is
    /// judged against it, and an announcement lists every participant (copied per message, it was a tenth of
    /// a crowded machine's CPU).
    pub current: Option<Arc<mana_protocol::RoundAnnouncement>>,
    /// The last accepted checkpoint manifest (the target of shard sync).
    pub manifest: Option<CheckpointManifest>,
    /// When the configured coordinator's last heartbeat was accepted.
    pub coordinator_alive: Option<std::time::Instant>,
    /// Messages judged, by verdict, since start.
    pub accepted: u64,
    /// Messages rejected since start.
    pub rejected: u64,
    /// Messages ignored since start.
    pub ignored: u64,
    /// Shard sync in progress or last error.
    pub sync_state: String,
    /// The capacity declared in heartbeats, when a role changed it from the configured one.
    pub capacity: Option<Capacity>,
    /// The trainer role's progress, when it runs.
    pub training: Option<status::TrainingStatus>,
    /// The coordinator role's progress, when it runs.
    pub coordinator: Option<status::CoordinatorStatus>,
    /// The evaluator role's progress, when it runs.
    pub evaluator: Option<status::EvaluatorStatus>,
    /// The first commit seen for each recent round, to catch a coordinator that equivocates.
    pub commits: equivocation::CommitLedger,
    /// Equivocations caught (their evidence is in the store).
    pub equivocations: Vec<equivocation::EquivocationSummary>,
    /// Commit disputes heard on gossip (holders refuting a commit), since start.
    pub disputes_heard: u64,
}

/// Everything the handle and the tasks share.
pub(crate) struct Shared {
    pub config: NodeConfig,
    pub keypair: Keypair,
    pub store: Store,
    pub client: Client,
    pub state: Mutex<State>,
    pub accepted_tx: broadcast::Sender<Accepted>,
    /// The same messages but heartbeats ([`NodeHandle::round_messages`]).
    pub rounds_tx: broadcast::Sender<Accepted>,
    pub serve_cache: serve::BlobCache,
    /// Chunk requests being answered (bounded in total and per peer).
    pub serve_permits: Arc<serve::ServePermits>,
    /// Blobs this node announced in the DHT; withdrawn when the store drops them (`sync::withdraw_dropped`).
    pub provided: Mutex<std::collections::HashSet<ContentHash>>,
    /// Who was heard to host which shard blob (judges of a result, holders in their reports).
    pub shard_hosts: Mutex<hosts::ShardHosts>,
    /// Pins of blobs hosted or fetched but not yet in a committed round.
    pub pins: Mutex<std::collections::HashMap<[u8; 32], crate::store::BlobPin>>,
    /// The parcels whose envelopes this node keeps pinned to serve them ([`parcel::PARCELS_KEPT`]).
    pub parcels: Mutex<parcel::KeptParcels>,
    /// The coordinator's round messages waiting behind an open parcel, to be taken in order.
    pub line: Mutex<parcel::Line>,
    /// Envelopes heard or signed here within the replay window: what this node published counts as seen, so
    /// a replay of its own message is refused here rather than passed on (and blamed on this node).
    pub replay: Mutex<validate::ReplayGuard>,
    /// The dashboard's bound address, once it serves.
    pub dashboard: std::sync::OnceLock<std::net::SocketAddr>,
    /// Cancelled at shutdown: every task of [`Shared::tasks`] ends when it is.
    pub cancel: CancellationToken,
    /// Every task the node (or a role, through [`NodeHandle::spawn`]) starts: shutdown waits for all of them.
    pub tasks: TaskTracker,
    /// Cancelled after the tasks have ended and the store is flushed: stops the swarm's event loop.
    pub net_cancel: CancellationToken,
    /// The swarm's event loop, tracked apart so that it outlives the tasks that still talk to it.
    pub net_tasks: TaskTracker,
}

impl Shared {
    /// Spawns `task` on the node's tracker: it ends at shutdown (cancelled at its next await point) and
    /// shutdown waits for it, so no task outlives the node and none is aborted. The task logs in the span it
    /// was spawned from: nodes sharing a process (`mana simulate`, the tests) each start in a span naming it.
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        self.tasks.spawn(
            async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = task => {}
                }
            }
            .in_current_span(),
        );
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere while holding it; the counters are still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The line of round messages behind open parcels (poisoning ignored, as for [`Shared::state`]).
    pub fn line(&self) -> MutexGuard<'_, parcel::Line> {
        self.line
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The replay window (poisoning ignored, as for [`Shared::state`]: the guard is only a cache of hashes).
    pub fn replay(&self) -> MutexGuard<'_, validate::ReplayGuard> {
        self.replay
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Releases the in-memory pins taken on these blobs (see [`NodeHandle::unpin`]).
    pub fn unpin_blobs(&self, hashes: &[ContentHash]) {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        for hash in hashes {
            pins.remove(&hash.0);
        }
    }

    /// Publishes an envelope this node signed on its topic, first noting it as seen (see [`Shared::replay`]).
    pub async fn publish_signed(
        &self,
        kind: mana_protocol::TopicKind,
        bytes: Vec<u8>,
    ) -> Result<(), NodeError> {
        self.replay().note_own(&bytes, std::time::Instant::now());
        self.client
            .publish(topic(&self.config.net.run_id, kind), bytes)
            .await?;
        Ok(())
    }
}

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs a blocking store call off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f).await?
}

/// A running node.
pub struct NodeHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("peer_id", &self.peer_id())
            .finish()
    }
}

/// Starts a node: key, store, swarm, event task. Returns once the swarm listens.
pub async fn start(config: NodeConfig) -> Result<NodeHandle, NodeError> {
    config.validate()?;
    let may_create_key = config.may_create_key();
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| NodeError::Config(format!("data dir {}: {e}", config.data_dir.display())))?;
    let key_path = config.key_path();
    let keypair = blocking(move || Ok(keyfile::load_or_create(&key_path, may_create_key)?)).await?;
    let store_dir = config.data_dir.join("store");
    let store_config = StoreConfig {
        max_blob_bytes: config.store_quota,
        ..StoreConfig::default()
    };
    let store = blocking(move || Ok(Store::open(store_dir, store_config)?)).await?;
    if config.verify_store {
        let s = store.clone();
        let report = blocking(move || Ok(s.verify()?)).await?;
        if !report.is_ok() {
            return Err(NodeError::Verify(format!(
                "{} corrupt, {} missing blobs, {} unreadable manifests",
                report.corrupt_blobs.len(),
                report.missing_blobs.len(),
                report.unreadable_manifests.len()
            )));
        }
        tracing::info!(
            blobs = report.blobs_checked,
            bytes = report.bytes_checked,
            "store verified"
        );
    }

    // Peers met before: with them, a node restarted while every bootstrap is down still rejoins.
    let mut net_config = config.net.clone();
    let book = store.clone();
    let remembered = blocking(move || peers::remembered(&book)).await?;
    if !remembered.is_empty() {
        tracing::info!(
            peers = remembered.len(),
            "remembered peers to rejoin through"
        );
    }
    net_config.known_peers.extend(remembered);
    let (client, events, event_loop) = net::new(keypair.to_libp2p(), net_config)?;
    let (net_cancel, net_tasks) = (CancellationToken::new(), TaskTracker::new());
    {
        let stop = net_cancel.clone();
        net_tasks.spawn(
            async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = event_loop.run() => {}
                }
            }
            .in_current_span(),
        );
    }
    for kind in mana_protocol::TopicKind::ALL {
        client.subscribe(topic(&config.net.run_id, kind)).await?;
    }
    let addrs = client.listen_addrs(Duration::from_secs(10)).await?;
    for addr in &addrs {
        tracing::info!(%addr, "node listening");
    }
    let (accepted_tx, _) = broadcast::channel(1024);
    let (rounds_tx, _) = broadcast::channel(1024);
    // Proof of the coordinator's equivocation kept by an earlier run of this node still stands.
    let coordinator = config.coordinator.unwrap_or_else(|| keypair.public());
    let kept_store = store.clone();
    let equivocations = blocking(move || Ok(equivocation::kept(&kept_store, &coordinator))).await?;
    let serve_permits = serve::ServePermits::new(
        config.net.limits.max_served_requests,
        config.net.limits.max_served_requests_per_peer,
    );
    let shared = Arc::new(Shared {
        config,
        keypair,
        store,
        client,
        state: Mutex::new(State {
            equivocations,
            ..State::default()
        }),
        accepted_tx,
        rounds_tx,
        serve_cache: serve::BlobCache::new(serve::OPEN_BLOBS),
        serve_permits,
        provided: Mutex::new(std::collections::HashSet::new()),
        shard_hosts: Mutex::new(hosts::ShardHosts::default()),
        pins: Mutex::new(std::collections::HashMap::new()),
        parcels: Mutex::new(parcel::KeptParcels::default()),
        line: Mutex::new(parcel::Line::default()),
        replay: Mutex::new(validate::ReplayGuard::new(validate::replay_window())),
        dashboard: std::sync::OnceLock::new(),
        cancel: CancellationToken::new(),
        tasks: TaskTracker::new(),
        net_cancel,
        net_tasks,
    });
    if let Some(addr) = shared.config.dashboard {
        let bound = dashboard::start(shared.clone(), addr).await?;
        let _ = shared.dashboard.set(bound);
        tracing::info!(url = %format!("http://{bound}/"), "dashboard");
    }
    // Announce what we already hold (a restarted node serves its shards again).
    sync::provide_stored(&shared).await;
    // The event, heartbeat and status tasks end by themselves on cancellation (the status task after its
    // final write), so they are tracked but not wrapped by `Shared::spawn` (they log in its span too).
    let cancel = shared.cancel.clone();
    let tasks = &shared.tasks;
    tasks.spawn(run_events(shared.clone(), events, cancel.clone()).in_current_span());
    tasks.spawn(run_heartbeats(shared.clone(), cancel.clone()).in_current_span());
    tasks.spawn(run_status(shared.clone(), cancel).in_current_span());
    Ok(NodeHandle { shared })
}

/// Runs a node until `shutdown` completes (the CLI passes ctrl-c).
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    let handle = start(config).await?;
    for addr in handle.listen_addrs().await? {
        println!("{addr}");
    }
    shutdown.await;
    handle.shutdown().await
}

impl NodeHandle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.client.local_peer_id()
    }

    /// This node's signing key (its public half is what peers see as the signer).
    pub fn public_key(&self) -> mana_protocol::PublicKey {
        self.shared.keypair.public()
    }

    /// The network handle, for lower-level calls.
    pub fn net(&self) -> &Client {
        &self.shared.client
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Listen addresses, with `/p2p/<peer id>`.
    pub async fn listen_addrs(&self) -> Result<Vec<libp2p::Multiaddr>, NodeError> {
        Ok(self
            .shared
            .client
            .listen_addrs(Duration::from_secs(10))
            .await?)
    }

    /// The dashboard's address, when it serves one ([`NodeConfig::dashboard`]).
    pub fn dashboard_addr(&self) -> Option<std::net::SocketAddr> {
        self.shared.dashboard.get().copied()
    }

    /// Receives every message that passes validation from now on.
    pub fn accepted(&self) -> broadcast::Receiver<Accepted> {
        self.shared.accepted_tx.subscribe()
    }

    /// Receives every message that passes validation from now on, but heartbeats: what a role that acts on
    /// rounds reads. Heartbeats are most of the gossip (every node's, every few seconds); a trainer busy for
    /// a minute on [`NodeHandle::accepted`] fell 500 messages behind among 64 members and skipped calls and
    /// commits with them, while this stream holds only the rounds' and deltas' messages.
    pub fn round_messages(&self) -> broadcast::Receiver<Accepted> {
        self.shared.rounds_tx.subscribe()
    }

    /// When the configured coordinator's last heartbeat was accepted (`None` before the first): it is up, on
    /// this run, under this key, whether or not it announces rounds.
    pub fn coordinator_alive_at(&self) -> Option<std::time::Instant> {
        self.shared.state().coordinator_alive
    }

    /// Calls `hear` with every message that passes validation from now on, on a task of the node's (until
    /// it stops). A listener that falls behind skips what it missed and says so in the log as `who`.
    pub fn follow_accepted(
        &self,
        who: &'static str,
        mut hear: impl FnMut(&Accepted) + Send + 'static,
    ) {
        let mut accepted = self.accepted();
        self.spawn(async move {
            loop {
                match accepted.recv().await {
                    Ok(a) => hear(&a),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(missed = n, "{who} lagged behind gossip");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }

    /// Signs `message` with the node's key, as [`NodeHandle::publish`] does, without publishing it: this node's
    /// own signed record of what it says (gossip never brings a node its own messages), kept beside others'.
    pub fn sign(&self, message: &Message) -> Result<SignedEnvelope, NodeError> {
        Ok(SignedEnvelope::sign(
            &self.shared.keypair,
            message,
            now_ms(),
        )?)
    }

    /// Makes `announcement` the round this node judges gossip against (unless it already follows a later one):
    /// what the round's deltas, calls and attestations are checked with. Gossip sets it when an announcement
    /// comes and [`NodeHandle::publish`] when this node announces; a coordinator restarted in the middle of a
    /// round sets it from its saved state, or the daemon would ignore the rest of that round's messages as
    /// belonging to no round it knows.
    pub fn follow_round(&self, announcement: &mana_protocol::RoundAnnouncement) {
        let mut state = self.shared.state();
        if state
            .current
            .as_ref()
            .is_none_or(|c| c.round < announcement.round)
        {
            state.current = Some(Arc::new(announcement.clone()));
        }
    }

    /// Signs `message` with the node's key and publishes it on its topic: gossiped whole, or, for a
    /// coordinator's round message over [`NodeConfig::parcel_over_bytes`], stored as a blob behind a gossiped
    /// [`mana_protocol::Parcel`] header. Fails while no peer subscribes.
    pub async fn publish(&self, message: &Message) -> Result<(), NodeError> {
        // Gossip does not echo our own messages: what we announce is the current round for us too (the
        // coordinator judges the deltas of the round it announced against it).
        if let Message::RoundAnnouncement(a) = message {
            self.follow_round(a);
        }
        let envelope = SignedEnvelope::sign(&self.shared.keypair, message, now_ms())?;
        let bytes = envelope.encode()?;
        // What this node signs counts as seen: a coordinator's node catches a second commit of its own key.
        if let Message::RoundCommit(_) = message
            && let Some(found) = equivocation::observe(&self.shared, &bytes, &envelope)
        {
            equivocation::keep(&self.shared, found).await;
        }
        if parcel::sends_as_parcel(&self.shared, message, bytes.len()) {
            return parcel::publish(&self.shared, message, bytes).await;
        }
        self.shared.publish_signed(message.topic(), bytes).await
    }

    /// The coordinator's equivocations this node caught (two different signed commits for one round), with
    /// the store blobs holding the proof. A trainer stops building on the run once this is not empty.
    pub fn equivocations(&self) -> Vec<equivocation::EquivocationSummary> {
        self.shared.state().equivocations.clone()
    }

    /// Stores `bytes` as a blob and announces it in the DHT. Returns its hash.
    pub async fn host_blob(&self, bytes: Vec<u8>) -> Result<ContentHash, NodeError> {
        let store = self.shared.store.clone();
        let pin = blocking(move || Ok(store.put_blob(&bytes)?)).await?;
        let hash = ContentHash(pin.hash().0);
        // The blob must outlive this call even before a round refers to it: keep its pin.
        sync::keep_pin(&self.shared, pin);
        self.shared
            .provided
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash);
        self.shared.client.start_providing(hash.0.to_vec()).await?;
        Ok(hash)
    }

    /// Fetches blob `hash` from its providers (found in the DHT), checks its hash, stores it and announces
    /// it. Returns its length.
    pub async fn fetch_blob(&self, hash: ContentHash) -> Result<u64, NodeError> {
        sync::fetch_and_store(&self.shared, hash, u64::MAX).await
    }

    /// [`NodeHandle::fetch_blob`], asking `providers` (peers known to hold it) before the DHT.
    pub async fn fetch_blob_from(
        &self,
        hash: ContentHash,
        providers: Vec<PeerId>,
    ) -> Result<u64, NodeError> {
        sync::fetch_and_store_hinted(&self.shared, hash, u64::MAX, providers).await
    }

    /// [`NodeHandle::fetch_blob_from`] for a blob of at most `max_len` bytes (an announced payload size): a
    /// provider claiming more is refused before the transfer starts, and the store never takes more.
    pub async fn fetch_blob_within(
        &self,
        hash: ContentHash,
        max_len: u64,
        providers: Vec<PeerId>,
    ) -> Result<u64, NodeError> {
        sync::fetch_and_store_hinted(&self.shared, hash, max_len, providers).await
    }

    /// Brings the blob of shard `entry` into the store (made here from `genesis`, the run's spec, if it is a
    /// round-0 shard; else fetched, `providers` first, at most the entry's size). Returns its length.
    pub async fn fetch_shard(
        &self,
        entry: mana_protocol::ShardEntry,
        providers: Vec<PeerId>,
        genesis: Option<&mana_engine::round::RunSpec>,
    ) -> Result<u64, NodeError> {
        sync::fetch_shard(&self.shared, entry, providers, genesis).await
    }

    /// [`NodeHandle::host_blob`] without waiting for the DHT announcement (it runs in the background): for
    /// blobs on a round's critical path, whose fetchers are told who holds them.
    pub async fn host_blob_now(&self, bytes: Vec<u8>) -> Result<ContentHash, NodeError> {
        let store = self.shared.store.clone();
        let pin = blocking(move || Ok(store.put_blob(&bytes)?)).await?;
        let hash = ContentHash(pin.hash().0);
        sync::keep_pin(&self.shared, pin);
        sync::announce(&self.shared, hash, "hosted blob");
        Ok(hash)
    }

    /// The node's status (also written to `status.json`).
    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        status::collect(&self.shared).await
    }

    /// The configuration the node was started with.
    pub fn config(&self) -> &NodeConfig {
        &self.shared.config
    }

    /// Reads a stored blob, hash-verified (off the async threads).
    pub async fn read_blob(&self, hash: ContentHash) -> Result<Vec<u8>, NodeError> {
        let store = self.shared.store.clone();
        blocking(move || Ok(store.get_blob(&hash)?)).await
    }

    /// Releases the in-memory pins [`NodeHandle::host_blob`] and [`NodeHandle::fetch_blob`] took on these
    /// blobs: once no committed round or blob reference names them either, the store's collector removes
    /// them (delta payloads of finished rounds, superseded shards).
    pub fn unpin(&self, hashes: &[ContentHash]) {
        self.shared.unpin_blobs(hashes);
    }

    /// Changes the capacity declared in the next heartbeats (a trainer declares its shard slots and its
    /// measured throughput).
    pub fn set_capacity(&self, capacity: Capacity) {
        self.shared.state().capacity = Some(capacity);
    }

    /// Brings blob `hash` (at most `max_len` bytes, `providers` first) into the store in the background, once
    /// a place in `slots` is free, giving up after `timeout`; counted in the trainer's status
    /// (`deltas_prefetched`) when it comes. What a trainer fetches ahead of need (`roles/prefetch.rs`).
    /// The task holds the node's shared state, not this handle, so that whoever owns the handle can still
    /// shut the node down while it runs; it is cancelled and awaited at shutdown like the node's own tasks.
    pub fn prefetch_blob(
        &self,
        hash: ContentHash,
        max_len: u64,
        providers: Vec<PeerId>,
        timeout: std::time::Duration,
        slots: Arc<tokio::sync::Semaphore>,
    ) {
        let shared = self.shared.clone();
        self.shared.spawn(async move {
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            let fetch = sync::fetch_and_store_hinted(&shared, hash, max_len, providers);
            match tokio::time::timeout(timeout, fetch).await {
                Ok(Ok(_)) => {
                    let mut state = shared.state();
                    let training = state.training.get_or_insert_with(Default::default);
                    training.deltas_prefetched += 1;
                }
                Ok(Err(e)) => {
                    tracing::debug!(payload = %hash, error = %e, "not prefetched; fetched when needed")
                }
                Err(_) => {
                    tracing::debug!(payload = %hash, "not prefetched in time; fetched when needed")
                }
            }
        });
    }

    /// Updates the trainer role's part of the status (created on first use).
    pub fn update_training_status(&self, f: impl FnOnce(&mut status::TrainingStatus)) {
        f(self
            .shared
            .state()
            .training
            .get_or_insert_with(Default::default));
    }

    /// Updates the coordinator role's part of the status (created on first use).
    pub fn update_coordinator_status(&self, f: impl FnOnce(&mut status::CoordinatorStatus)) {
        f(self
            .shared
            .state()
            .coordinator
            .get_or_insert_with(Default::default));
    }

    /// Updates the evaluator role's part of the status (created on first use).
    pub fn update_evaluator_status(&self, f: impl FnOnce(&mut status::EvaluatorStatus)) {
        f(self
            .shared
            .state()
            .evaluator
            .get_or_insert_with(Default::default));
    }

    /// Spawns a task of a role (a verification, a fetch) on the node's tracker: it is cancelled and awaited at
    /// shutdown like the node's own tasks.
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.shared.spawn(task);
    }

    /// Stops the node and drops the handle, which releases the store (its lock) once no other clone of an
    /// `Arc<NodeHandle>` remains: see [`NodeHandle::stop`].
    pub async fn shutdown(self) -> Result<(), NodeError> {
        self.stop().await
    }

    /// Stops the node: every task cancelled and awaited (the status task writes the final status), the store
    /// flushed, then the swarm's event loop stopped and awaited. Nothing is aborted. Callable through a shared
    /// handle (`Arc<NodeHandle>`, as the roles hold it); a second call finds everything stopped and returns at
    /// once. The store stays open until the last handle is dropped.
    pub async fn stop(&self) -> Result<(), NodeError> {
        let shared = &self.shared;
        shared.cancel.cancel();
        shared.tasks.close();
        shared.tasks.wait().await;
        let store = shared.store.clone();
        blocking(move || Ok(store.flush()?)).await?;
        shared.net_cancel.cancel();
        shared.net_tasks.close();
        shared.net_tasks.wait().await;
        Ok(())
    }
}

impl Drop for NodeHandle {
    /// A handle dropped without [`NodeHandle::shutdown`] still stops its tasks and its swarm (at their next
    /// await point; nothing waits for them).
    fn drop(&mut self) {
        self.shared.cancel.cancel();
        self.shared.net_cancel.cancel();
    }
}

/// The event task: network events, until `stop`. It does nothing else: a heartbeat or a status write that
/// waits on a busy swarm or disk (seconds, with 64 nodes on two cores) would hold up every event behind it,
/// and the queue would overflow while the node sat idle between ticks. The timers have tasks of their own
/// ([`run_heartbeats`], [`run_status`]).
async fn run_events(shared: Arc<Shared>, mut events: net::Events, stop: CancellationToken) {
    // Bulk streams are served for as long as the node handles events (the task holds the shared state, so
    // it is stopped here rather than left to end with the swarm).
    let source = Arc::new(serve::StoreBlobs(shared.clone()));
    let run = net::bulk::ServeTasks {
        tasks: shared.tasks.clone(),
        cancel: shared.cancel.clone(),
    };
    match net::bulk::serve(
        &shared.client,
        source,
        serve::stream_limits(&shared.config.net),
        run,
    ) {
        // The stream server is a tracked task: it ends on the same cancellation.
        Ok(serving) => shared.spawn(serving),
        Err(e) => {
            tracing::warn!(error = %e, "bulk streams not served; peers fall back to chunk requests")
        }
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            event = events.recv() => match event {
                Some(event) => handle_event(&shared, event).await,
                None => break,
            },
        }
    }
}

/// The heartbeat task: one signed heartbeat every `heartbeat_interval`, until `stop`. A publish that takes
/// longer than the interval delays the next one rather than bunching them.
async fn run_heartbeats(shared: Arc<Shared>, stop: CancellationToken) {
    let mut heartbeat = tokio::time::interval(shared.config.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = heartbeat.tick() => {
                seq = next_heartbeat_seq(seq, now_ms());
                if let Err(e) = publish_heartbeat(&shared, seq).await {
                    tracing::debug!(error = %e, "heartbeat not published");
                }
            }
        }
    }
}

/// The status task: the status file every `status_interval`, the peer book, and withdrawing the DHT records
/// of dropped blobs, until `stop`; then the status file once more.
async fn run_status(shared: Arc<Shared>, stop: CancellationToken) {
    let mut status_tick = tokio::time::interval(shared.config.status_interval);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut book = peers::BookSchedule::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = status_tick.tick() => {
                // The peer book is kept from the peers the status just listed (one network snapshot a tick).
                match status::write(&shared).await {
                    Ok(connected) => {
                        if book.due(&connected, Instant::now())
                            && let Err(e) = peers::remember(&shared, &connected).await
                        {
                            tracing::warn!(error = %e, "peers not remembered");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "status file not written"),
                }
                sync::withdraw_dropped(&shared).await;
            }
        }
    }
    if let Err(e) = status::write(&shared).await {
        tracing::warn!(error = %e, "final status file not written");
    }
}

/// The next heartbeat's sequence number: the wall clock in milliseconds, or one more than the last if the
/// clock is behind it. It grows across restarts (the clock went on while the node was down), so a
/// coordinator, which ignores a heartbeat not above the last it saw from that key, recognises a restarted
/// node at its first heartbeat instead of once the old member has timed out.
fn next_heartbeat_seq(last: u64, now_ms: u64) -> u64 {
    now_ms.max(last.saturating_add(1))
}

async fn publish_heartbeat(shared: &Shared, seq: u64) -> Result<(), NodeError> {
    let hosted = sync::hosted_shards(shared).await?;
    let message = Message::Heartbeat(Heartbeat {
        run: shared.config.net.run_id.clone(),
        seq,
        hosted,
        capacity: shared.state().capacity.unwrap_or(shared.config.capacity),
        software_version: Text::new(net::agent_version())?,
    });
    let envelope = SignedEnvelope::sign(&shared.keypair, &message, now_ms())?;
    shared
        .publish_signed(message.topic(), envelope.encode()?)
        .await
}

async fn handle_event(shared: &Arc<Shared>, event: NetEvent) {
    match event {
        NetEvent::Gossip {
            source,
            id,
            topic,
            data,
            ..
        } => {
            if parcel::must_wait(shared, &topic, &data) {
                parcel::wait_in_line(shared, id, source, topic, data);
                return;
            }
            let heard_ms = now_ms();
            let verdict = validate::judge(shared, source, &topic, &data, heard_ms);
            if let validate::Judgement::Accept(accepted) = &verdict
                && let Message::Parcel(header) = &accepted.message
            {
                // Its verdict waits for the envelope it names.
                parcel::open(shared, id, source, header.clone(), heard_ms);
                return;
            }
            if let Err(e) = shared.client.report(id, source, verdict.verdict()).await {
                tracing::debug!(error = %e, "verdict not reported");
            }
            validate::record(shared, source, verdict).await;
        }
        NetEvent::InboundRequest {
            peer,
            request,
            channel,
        } => {
            let Some(permit) = shared.serve_permits.try_acquire(peer) else {
                let busy = mana_protocol::FetchResponse::Refused {
                    reason: mana_protocol::Text::new("busy").expect("a short constant text"),
                };
                if let Err(e) = shared.client.respond(channel, busy).await {
                    tracing::debug!(%peer, error = %e, "busy response not sent");
                }
                return;
            };
            let task_shared = shared.clone();
            shared.spawn(async move {
                let _permit = permit;
                let shared = task_shared;
                let response = serve::answer(&shared, peer, &request).await;
                if let Err(e) = shared.client.respond(channel, response).await {
                    tracing::debug!(%peer, error = %e, "fetch response not sent");
                }
            });
        }
        NetEvent::PeerConnected(peer) => tracing::debug!(%peer, "peer connected"),
        NetEvent::PeerDisconnected(peer) => tracing::debug!(%peer, "peer disconnected"),
        NetEvent::Subscribed { peer, topic } => tracing::debug!(%peer, %topic, "peer subscribed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_seq_follows_the_clock_and_never_goes_back() {
        assert_eq!(next_heartbeat_seq(0, 1_700_000_000_000), 1_700_000_000_000);
        assert_eq!(
            next_heartbeat_seq(1_700_000_000_000, 1_700_000_000_500),
            1_700_000_000_500
        );
        // A clock stepped back: still above the last.
        assert_eq!(
            next_heartbeat_seq(1_700_000_000_500, 1_600_000_000_000),
            1_700_000_000_501
        );
        assert_eq!(next_heartbeat_seq(u64::MAX, 0), u64::MAX);
    }
}
