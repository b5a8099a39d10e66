//! The host's side of expert calls: a node answers [`ExpertRequest`]s for the expert shards its store holds
//! in a committed round, from exactly those weights, and says which round and checkpoint it used.
//!
//! - A request names a checkpoint (a manifest hash). The host finds it among the coordinator's signed
//!   commits it heard lately (the last [`KEPT_COMMITS`]), or among its store's rounds whose manifest is that
//!   checkpoint (a mirror's), and answers from the shard blob the checkpoint names if the store holds that
//!   very blob; otherwise it answers `Unavailable`. Loaded experts are kept (at most
//!   [`HostLimits::cached_experts`], the oldest dropped first). A trainer's training never touches these
//!   weights: its store gets a round's shards only once the round is committed.
//! - Calls in progress are capped, in all ([`HostLimits::max_calls`]) and per peer
//!   ([`HostLimits::max_calls_per_peer`], so that one flooding peer cannot take every slot); past either cap
//!   the host answers "busy" at once, and past a further cap ([`HostLimits::max_busy_answers`]) it drops
//!   the stream, so a flood costs the sender its calls, not the host its memory. Each request is read under
//!   the protocol's frame cap, within [`HostLimits::read_timeout`], and may hold at most
//!   [`HostLimits::max_rows`] rows.
//! - Calls for the same expert of the same checkpoint are batched across clients: one blocking worker per
//!   (checkpoint, expert) computes a batch while the next calls queue, then takes whatever queued (up to
//!   [`HostLimits::max_rows`] rows) as its next batch: one forward over the rows of all of them, the output
//!   split back. Nothing waits to gather a batch; a lone call is computed at once.
//! - The arithmetic is [`ExpertKernel`], the model's own decode arithmetic, in which every row is computed
//!   on its own: the answer is bit-identical to the expert run inside the whole model, whatever else was in
//!   its batch. It runs in the host's own rayon pool: a client's decode step blocks a worker of the global
//!   pool while it waits for answers, so a client in the same process (tests, a node that also generates)
//!   could otherwise starve the host that would give them. It runs on the request's input as decoded, and
//!   the output is sent in the encoding the request asks for ([`super::dispatch`]).
//! - [`ExpertHost::stats`] counts what the host did (answers, refusals, busy answers, batches).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::PeerId;
use mana_engine::round::{RunShard, RunSpec, ShardRecord};
use mana_kernels::CpuBackend;
use mana_kernels::model::ExpertKernel;
use mana_protocol::limits::{MAX_REQUEST_BYTES, MAX_TEXT_LEN};
use mana_protocol::{
    CheckpointManifest, ContentHash, ExpertRequest, ExpertResponse, Message, ShardId, Tensor, Text,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::dispatch::encode_answer;
use super::lock;
use super::wire::{self, EXPERT_STREAM};
use crate::daemon::{NodeError, NodeHandle};
use crate::store::Store;

/// How much a host takes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// Calls read or computed at once; the next one is answered "busy".
    pub max_calls: usize,
    /// Calls of one peer read or computed at once; its next one is answered "busy", while other peers'
    /// calls are still taken up to `max_calls`.
    pub max_calls_per_peer: usize,
    /// "Busy" answers being sent at once; past it an incoming call's stream is dropped unanswered.
    pub max_busy_answers: usize,
    /// Most rows (tokens) one request may hold, and most rows computed in one batch.
    pub max_rows: usize,
    /// Experts kept loaded.
    pub cached_experts: usize,
    /// Time to read a whole request.
    pub read_timeout: Duration,
}

impl Default for HostLimits {
    fn default() -> Self {
        Self {
            max_calls: 16,
            max_calls_per_peer: 4,
            max_busy_answers: 64,
            max_rows: 4096,
            cached_experts: 64,
            read_timeout: Duration::from_secs(10),
        }
    }
}

/// How many of the latest signed commits a host remembers, to answer calls for their checkpoints.
pub const KEPT_COMMITS: usize = 8;

/// What a host did since it started, for operators and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Calls being read or computed now.
    pub in_progress: usize,
    /// Calls answered with an output.
    pub answered: u64,
    /// Calls answered `Unavailable` for another reason than "busy" (unknown checkpoint, bad request).
    pub refused: u64,
    /// Calls answered "busy" (the host's or the peer's cap reached).
    pub busy: u64,
    /// Calls whose stream was dropped unanswered (busy answers at their cap).
    pub dropped: u64,
    /// Forwards run, each over one batch of calls for one expert.
    pub batches: u64,
    /// Calls computed in a batch with at least one other call.
    pub batched_calls: u64,
}

/// A host started by [`serve_experts`]; clones share it.
#[derive(Clone)]
pub struct ExpertHost {
    host: Arc<Host>,
}

impl ExpertHost {
    /// What the host did so far.
    pub fn stats(&self) -> HostStats {
        let c = &self.host.counters;
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        HostStats {
            in_progress: self
                .host
                .limits
                .max_calls
                .saturating_sub(self.host.calls.available_permits()),
            answered: get(&c.answered),
            refused: get(&c.refused),
            busy: get(&c.busy),
            dropped: get(&c.dropped),
            batches: get(&c.batches),
            batched_calls: get(&c.batched_calls),
        }
    }
}

/// The counts behind [`HostStats`].
#[derive(Default)]
struct Counters {
    answered: AtomicU64,
    refused: AtomicU64,
    busy: AtomicU64,
    dropped: AtomicU64,
    batches: AtomicU64,
    batched_calls: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A loaded expert of one checkpoint.
struct Loaded {
    round: u64,
    kernel: Mutex<ExpertKernel>,
}

/// The experts loaded so far, by (checkpoint, shard), the oldest first in `order`.
#[derive(Default)]
struct Cache {
    map: HashMap<(ContentHash, ShardId), Arc<Loaded>>,
    order: VecDeque<(ContentHash, ShardId)>,
}

/// An expert of a checkpoint: what one batch computes.
type Lane = (ContentHash, ShardId);

/// What a batch computes for one call: the output's round and values, or why there is none.
type Computed = Result<(u64, Vec<f32>), String>;

/// A call waiting for its lane's worker.
struct Queued {
    /// [rows, C], checked.
    input: Tensor,
    rows: usize,
    reply: oneshot::Sender<Computed>,
}

/// What every call of one host shares.
struct Host {
    node_run: mana_protocol::RunId,
    spec: RunSpec,
    limits: HostLimits,
    store: Store,
    cache: Mutex<Cache>,
    /// The latest signed commits heard: (checkpoint hash, its manifest), the oldest first.
    commits: Mutex<VecDeque<(ContentHash, CheckpointManifest)>>,
    calls: Arc<Semaphore>,
    busy: Arc<Semaphore>,
    /// Where the arithmetic runs (`None` if the OS refused the threads: then on rayon's global pool).
    pool: Option<rayon::ThreadPool>,
    /// Calls in progress per peer (an entry only while it has one, so at most `max_calls` entries).
    per_peer: Mutex<HashMap<PeerId, usize>>,
    /// The calls waiting, per lane; a lane is present while its worker runs (so at most `max_calls`).
    lanes: Mutex<HashMap<Lane, VecDeque<Queued>>>,
    counters: Counters,
}

/// Starts answering expert calls on `node` for `spec`'s model, until the node shuts down. Call once per
/// node (a second call gets [`crate::net::NetError::AlreadyAccepting`]).
pub fn serve_experts(
    node: &NodeHandle,
    spec: RunSpec,
    limits: HostLimits,
) -> Result<ExpertHost, NodeError> {
    let mut incoming = node.net().accept_protocol_streams(EXPERT_STREAM)?;
    let host = Arc::new(Host {
        node_run: node.config().net.run_id.clone(),
        spec,
        limits,
        store: node.store().clone(),
        cache: Mutex::new(Cache::default()),
        commits: Mutex::new(VecDeque::new()),
        calls: Arc::new(Semaphore::new(limits.max_calls)),
        busy: Arc::new(Semaphore::new(limits.max_busy_answers)),
        pool: rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("expert-host-{i}"))
            .build()
            .ok(),
        per_peer: Mutex::new(HashMap::new()),
        lanes: Mutex::new(HashMap::new()),
        counters: Counters::default(),
    });
    // Commits the node accepted, i.e. signed by the run's coordinator.
    let heard = host.clone();
    node.follow_accepted("expert host", move |a| {
        if let Message::RoundCommit(commit) = &a.message {
            heard.hear_commit(&commit.checkpoint);
        }
    });
    let accepting = host.clone();
    node.spawn(async move {
        let host = accepting;
        while let Some((peer, stream)) = incoming.next().await {
            if let Some(slot) = Slot::take(&host, peer) {
                let host = host.clone();
                tokio::spawn(async move {
                    host.serve_call(peer, stream).await;
                    drop(slot);
                });
            } else if let Ok(permit) = host.busy.clone().try_acquire_owned() {
                bump(&host.counters.busy, 1);
                let timeout = host.limits.read_timeout;
                tokio::spawn(async move {
                    answer_busy(stream, timeout).await;
                    drop(permit);
                });
            } else {
                bump(&host.counters.dropped, 1);
                tracing::debug!(%peer, "expert call dropped: busy answers at their cap");
            }
        }
    });
    Ok(ExpertHost { host })
}

/// A call's place among those in progress: one of the host's `max_calls` and one of its peer's
/// `max_calls_per_peer`, both given back when dropped.
struct Slot {
    host: Arc<Host>,
    peer: PeerId,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    /// A place for a call of `peer`, unless the peer or the host is at its cap.
    fn take(host: &Arc<Host>, peer: PeerId) -> Option<Slot> {
        let mut per_peer = lock(&host.per_peer);
        let count = per_peer.get(&peer).copied().unwrap_or(0);
        if count >= host.limits.max_calls_per_peer {
            return None;
        }
        let permit = host.calls.clone().try_acquire_owned().ok()?;
        per_peer.insert(peer, count + 1);
        Some(Slot {
            host: host.clone(),
            peer,
            _permit: permit,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_peer = lock(&self.host.per_peer);
        if let Some(count) = per_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}

/// An `Unavailable` answer saying `reason` (cut to the protocol's text cap).
fn unavailable(reason: &str) -> ExpertResponse {
    let mut cut = reason.to_string();
    if cut.len() > MAX_TEXT_LEN {
        let mut end = MAX_TEXT_LEN;
        while !cut.is_char_boundary(end) {
            end -= 1;
        }
        cut.truncate(end);
    }
    ExpertResponse::Unavailable {
        reason: Text::new(cut).unwrap_or_else(|_| Text::new("").expect("empty text is valid")),
    }
}

/// Answers "busy" without reading the request into memory (its bytes, at most a request frame's worth, are
/// discarded as they come).
async fn answer_busy(mut stream: libp2p::Stream, timeout: Duration) {
    let mut sink = futures::io::sink();
    let mut capped = futures::AsyncReadExt::take(&mut stream, MAX_REQUEST_BYTES as u64 + 1);
    let drain = futures::io::copy(&mut capped, &mut sink);
    if tokio::time::timeout(timeout, drain).await.is_err() {
        return;
    }
    if let Ok(frame) = unavailable("busy").encode() {
        let _ = wire::write_body(&mut stream, &frame).await;
    }
}

/// The first calls of `queue` whose rows add up to at most `max_rows` (the first one always: a request
/// never holds more).
fn take_batch(queue: &mut VecDeque<Queued>, max_rows: usize) -> Vec<Queued> {
    let mut batch = Vec::new();
    let mut rows = 0;
    while let Some(next) = queue.front() {
        if !batch.is_empty() && rows + next.rows > max_rows {
            break;
        }
        rows += next.rows;
        batch.extend(queue.pop_front());
    }
    batch
}

/// Ends a lane whose worker unwinds (a panic in the arithmetic): its waiting calls are dropped, so their
/// callers get an answer ("internal") instead of waiting forever, and the next call starts a new worker.
struct LaneGuard<'a> {
    host: &'a Host,
    lane: Lane,
}

impl Drop for LaneGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            lock(&self.host.lanes).remove(&self.lane);
        }
    }
}

impl Host {
    /// Remembers a committed checkpoint (the last [`KEPT_COMMITS`]).
    fn hear_commit(&self, manifest: &CheckpointManifest) {
        let Ok(hash) = manifest.hash() else { return };
        let mut commits = lock(&self.commits);
        if commits.iter().any(|(h, _)| *h == hash) {
            return;
        }
        commits.push_back((hash, manifest.clone()));
        while commits.len() > KEPT_COMMITS {
            commits.pop_front();
        }
    }

    /// Reads one call, answers it and closes the stream.
    async fn serve_call(self: Arc<Self>, peer: PeerId, mut stream: libp2p::Stream) {
        let response = match wire::read_request(&mut stream, self.limits.read_timeout).await {
            Ok(request) => self.clone().answer(request).await,
            Err(reason) => {
                tracing::debug!(%peer, %reason, "bad expert request");
                unavailable(&format!("bad request: {reason}"))
            }
        };
        let counter = match response {
            ExpertResponse::Output { .. } => &self.counters.answered,
            ExpertResponse::Unavailable { .. } => &self.counters.refused,
        };
        bump(counter, 1);
        match response.encode() {
            Ok(frame) => {
                if let Err(e) = wire::write_body(&mut stream, &frame).await {
                    tracing::debug!(%peer, error = %e, "expert answer not sent");
                }
            }
            Err(e) => tracing::warn!(%peer, error = %e, "expert answer not encodable"),
        }
    }

    /// The answer to a decoded request.
    async fn answer(self: Arc<Self>, request: ExpertRequest) -> ExpertResponse {
        if request.run != self.node_run {
            return unavailable("another run");
        }
        let c = self.spec.model.d_model;
        let rows = match request.input.shape.as_slice() {
            [rows, width] if *width as usize == c => *rows as usize,
            shape => return unavailable(&format!("input shape {shape:?} is not [rows, {c}]")),
        };
        if rows == 0 || rows > self.limits.max_rows {
            return unavailable(&format!(
                "{rows} rows, expected 1..={}",
                self.limits.max_rows
            ));
        }
        if request.shard.expert_position().is_none() {
            return unavailable("not an expert shard");
        }
        let (shape, answer) = (request.input.shape.clone(), request.answer);
        let computed = self
            .submit((request.checkpoint, request.shard), request.input, rows)
            .await;
        match computed.and_then(|(round, out)| {
            encode_answer(answer, shape, &out)
                .map(|output| (round, output))
                .map_err(|e| e.to_string())
        }) {
            Ok((round, output)) => ExpertResponse::Output {
                round,
                checkpoint: request.checkpoint,
                output,
            },
            Err(reason) => unavailable(&reason),
        }
    }

    /// Queues a call on its lane, starting the lane's worker if none runs, and waits for its output.
    async fn submit(self: Arc<Self>, lane: Lane, input: Tensor, rows: usize) -> Computed {
        let (reply, answer) = oneshot::channel();
        let queued = Queued { input, rows, reply };
        // A lane is present while its worker runs: a call finding it is taken in the worker's next batch.
        let start = match lock(&self.lanes).entry(lane) {
            Entry::Occupied(mut queue) => {
                queue.get_mut().push_back(queued);
                false
            }
            Entry::Vacant(empty) => {
                empty.insert(VecDeque::from([queued]));
                true
            }
        };
        if start {
            let host = self.clone();
            tokio::task::spawn_blocking(move || host.run_lane(lane));
        }
        answer
            .await
            .unwrap_or_else(|_| Err("internal: the expert's worker failed".into()))
    }

    /// A lane's worker (on a blocking thread): computes batches of its queued calls until none is left,
    /// then ends the lane.
    fn run_lane(&self, lane: Lane) {
        let _guard = LaneGuard { host: self, lane };
        loop {
            let batch = {
                let mut lanes = lock(&self.lanes);
                let Some(queue) = lanes.get_mut(&lane) else {
                    return;
                };
                if queue.is_empty() {
                    lanes.remove(&lane);
                    return;
                }
                take_batch(queue, self.limits.max_rows)
            };
            self.compute_batch(lane, batch);
        }
    }

    /// Runs one forward over the rows of every call in `batch` (inputs decoded here, off the async
    /// threads) and hands each call its rows of the output.
    fn compute_batch(&self, (checkpoint, shard): Lane, batch: Vec<Queued>) {
        let c = self.spec.model.d_model;
        let mut calls = Vec::with_capacity(batch.len());
        let mut x = Vec::new();
        for queued in batch {
            match queued.input.to_f32() {
                Ok(values) if values.len() == queued.rows * c => {
                    x.extend_from_slice(&values);
                    calls.push((queued.rows, queued.reply));
                }
                Ok(values) => {
                    let reason = format!("{} values for {} rows", values.len(), queued.rows);
                    let _ = queued.reply.send(Err(reason));
                }
                Err(e) => {
                    let _ = queued.reply.send(Err(e.to_string()));
                }
            }
        }
        if calls.is_empty() {
            return;
        }
        let rows: usize = calls.iter().map(|(r, _)| r).sum();
        let computed = self.expert(checkpoint, shard).and_then(|loaded| {
            let mut out = vec![0.0f32; rows * c];
            let mut run = || lock(&loaded.kernel).forward(&x, rows, &mut out);
            match &self.pool {
                Some(pool) => pool.install(run),
                None => run(),
            }
            .map_err(|e| e.to_string())?;
            Ok((loaded.round, out))
        });
        bump(&self.counters.batches, 1);
        if calls.len() > 1 {
            bump(&self.counters.batched_calls, calls.len() as u64);
        }
        match computed {
            Ok((round, out)) => {
                let mut parts = out.chunks_exact(c);
                for (rows, reply) in calls {
                    let part: Vec<f32> = parts.by_ref().take(rows).flatten().copied().collect();
                    let _ = reply.send(Ok((round, part)));
                }
            }
            Err(reason) => {
                for (_, reply) in calls {
                    let _ = reply.send(Err(reason.clone()));
                }
            }
        }
    }

    /// The loaded expert `shard` of `checkpoint`, loading it from the store if needed.
    fn expert(&self, checkpoint: ContentHash, shard: ShardId) -> Result<Arc<Loaded>, String> {
        let key = (checkpoint, shard);
        if let Some(found) = self.lock_cache().map.get(&key) {
            return Ok(found.clone());
        }
        let (round, hash) = self
            .find(checkpoint, shard)
            .map_err(|e| format!("store: {e}"))?
            .ok_or_else(|| format!("{shard} of checkpoint {checkpoint} is not held here"))?;
        let bytes = self
            .store
            .get_blob(&hash)
            .map_err(|e| format!("store: {e}"))?;
        let record =
            ShardRecord::from_bytes(&bytes, &self.spec, shard).map_err(|e| e.to_string())?;
        let kernel = ExpertKernel::new(
            &self.spec.model,
            &record.params,
            Box::new(CpuBackend::new()),
        )
        .map_err(|e| e.to_string())?;
        let loaded = Arc::new(Loaded {
            round,
            kernel: Mutex::new(kernel),
        });
        let mut cache = self.lock_cache();
        if cache.map.insert(key, loaded.clone()).is_none() {
            cache.order.push_back(key);
        }
        while cache.order.len() > self.limits.cached_experts.max(1) {
            if let Some(old) = cache.order.pop_front() {
                cache.map.remove(&old);
            }
        }
        Ok(loaded)
    }

    /// The round that committed `checkpoint` and the blob of `shard` it names, if the store holds that blob:
    /// from a signed commit heard, else from a store round whose manifest is `checkpoint`.
    fn find(
        &self,
        checkpoint: ContentHash,
        shard: ShardId,
    ) -> Result<Option<(u64, ContentHash)>, crate::store::StoreError> {
        let heard = lock(&self.commits)
            .iter()
            .find(|(h, _)| *h == checkpoint)
            .map(|(_, m)| (m.round, m.shard(&shard).map(|e| e.hash)));
        if let Some((round, entry)) = heard {
            return Ok(match entry {
                Some(hash) if self.store.has_blob(&hash)? => Some((round, hash)),
                _ => None,
            });
        }
        for round in self.store.rounds()?.into_iter().rev() {
            let Some(manifest) = self.store.manifest(round)? else {
                continue;
            };
            if ContentHash::of(&manifest.meta) != checkpoint {
                continue;
            }
            let Some(entry) = manifest.entries.iter().find(|e| e.shard == shard) else {
                return Ok(None);
            };
            if !self.store.has_blob(&entry.hash)? {
                return Ok(None);
            }
            return Ok(Some((round, entry.hash)));
        }
        Ok(None)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        lock(&self.cache)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::daemon::checkpoint::{IfPresent, commit_checkpoint};
    use crate::daemon::{self, NodeConfig};
    use futures::AsyncWriteExt;
    use mana_engine::round::initial_shards;
    use mana_protocol::{ShardEntry, limits::MAX_SHARDS_PER_NODE};

    /// A node on loopback in `dir`.
    async fn node(dir: &std::path::Path) -> NodeHandle {
        daemon::start(NodeConfig::for_tests(dir)).await.unwrap()
    }

    /// A host whose store holds round 0 of the tiny model (every shard) as a committed checkpoint, serving
    /// under `limits`; returns the node, its host and a call of one of its experts.
    async fn host(dir: &std::path::Path, limits: HostLimits) -> (NodeHandle, ExpertHost, Call) {
        let node = node(dir).await;
        let spec = RunSpec::tiny();
        let mut shards = Vec::new();
        for state in initial_shards(&spec).unwrap() {
            let bytes = state.to_bytes();
            let size = bytes.len() as u64;
            let hash = node.host_blob_now(bytes).await.unwrap();
            shards.push(ShardEntry {
                shard: state.shard,
                hash,
                size,
                round: 0,
            });
        }
        assert!(shards.len() <= MAX_SHARDS_PER_NODE);
        let checkpoint = CheckpointManifest {
            run: node.config().net.run_id.clone(),
            round: 0,
            shards,
        };
        commit_checkpoint(node.store(), &checkpoint, None, IfPresent::Commit)
            .await
            .unwrap();
        let host = serve_experts(&node, spec, limits).unwrap();
        let call = Call {
            run: checkpoint.run.clone(),
            checkpoint: checkpoint.hash().unwrap(),
            expert: checkpoint
                .shards
                .iter()
                .map(|e| e.shard)
                .find(|s| *s != ShardId::Trunk)
                .unwrap(),
        };
        (node, host, call)
    }

    /// A node on loopback in `dir`, connected to `host` (through the first of its addresses that answers).
    async fn client(dir: &std::path::Path, host: &NodeHandle) -> NodeHandle {
        let client = node(dir).await;
        for addr in host.listen_addrs().await.unwrap() {
            if client.net().dial(addr).await.is_ok() {
                break;
            }
        }
        client
    }

    /// What the tests call: one expert of a checkpoint of a run.
    struct Call {
        run: mana_protocol::RunId,
        checkpoint: ContentHash,
        expert: ShardId,
    }

    impl Call {
        /// A request for `rows` rows of inputs drawn from `seed`.
        fn request(&self, rows: usize, seed: usize) -> ExpertRequest {
            let c = RunSpec::tiny().model.d_model;
            let x: Vec<f32> = (0..rows * c)
                .map(|i| ((i * 7 + seed * 13) as f32 * 0.37).sin())
                .collect();
            ExpertRequest {
                run: self.run.clone(),
                shard: self.expert,
                checkpoint: self.checkpoint,
                input: Tensor::from_f32(vec![rows as u32, c as u32], &x).unwrap(),
                answer: mana_protocol::TensorDtype::F32,
            }
        }
    }

    const CALL: Duration = Duration::from_secs(30);

    /// Polls `host`'s stats every 20 ms until `ready` holds, or panics after 30 s naming `what`.
    async fn wait_stats(host: &ExpertHost, what: &str, ready: impl Fn(&HostStats) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !ready(&host.stats()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                host.stats()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn is_busy(answer: &ExpertResponse) -> bool {
        matches!(answer, ExpertResponse::Unavailable { reason } if reason.to_string() == "busy")
    }

    #[test]
    fn a_batch_takes_the_queued_calls_up_to_its_rows() {
        let queued = |rows| Queued {
            input: Tensor::from_f32(vec![0, 0], &[]).unwrap(),
            rows,
            reply: oneshot::channel().0,
        };
        let mut queue: VecDeque<Queued> = [3, 4, 2, 5].into_iter().map(queued).collect();
        let rows = |b: &[Queued]| b.iter().map(|q| q.rows).collect::<Vec<_>>();
        assert_eq!(rows(&take_batch(&mut queue, 9)), vec![3, 4, 2]);
        assert_eq!(rows(&take_batch(&mut queue, 4)), vec![5], "one call always");
        assert!(take_batch(&mut queue, 4).is_empty());
    }

    /// A peer that holds its calls open (a request never finished) gets "busy" past its own cap, while
    /// another peer is still served: without the per-peer cap, the flood would take every slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_flooding_peer_does_not_starve_another() {
        let dir = tempfile::tempdir().unwrap();
        let limits = HostLimits {
            max_calls: 3,
            max_calls_per_peer: 2,
            read_timeout: Duration::from_secs(120),
            ..HostLimits::default()
        };
        let (node, host, call) = host(&dir.path().join("host"), limits).await;
        let flooder = client(&dir.path().join("flooder"), &node).await;
        let other = client(&dir.path().join("other"), &node).await;
        let frame = call.request(1, 0).encode().unwrap();

        // Three calls left unfinished: two take the flooder's slots, the third is answered "busy" (once its
        // request ends, which it never does).
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut stream = flooder
                .net()
                .open_protocol_stream(node.peer_id(), EXPERT_STREAM)
                .await
                .unwrap();
            stream.write_all(&frame[..8]).await.unwrap();
            stream.flush().await.unwrap();
            held.push(stream);
        }
        wait_stats(&host, "the flood's calls taken", |s| {
            s.in_progress == 2 && s.busy == 1
        })
        .await;

        let answer = wire::call(flooder.net(), node.peer_id(), &call.request(1, 1), CALL)
            .await
            .unwrap();
        assert!(is_busy(&answer), "the flooder past its cap: {answer:?}");
        let answer = wire::call(other.net(), node.peer_id(), &call.request(1, 1), CALL)
            .await
            .unwrap();
        assert!(
            matches!(answer, ExpertResponse::Output { round: 0, .. }),
            "another peer is served: {answer:?}"
        );

        // The flood ends: the flooder is served again.
        drop(held);
        wait_stats(&host, "the flood's calls ended", |s| s.in_progress == 0).await;
        let answer = wire::call(flooder.net(), node.peer_id(), &call.request(1, 1), CALL)
            .await
            .unwrap();
        assert!(
            matches!(answer, ExpertResponse::Output { .. }),
            "{answer:?}"
        );
        let stats = host.stats();
        assert_eq!((stats.answered, stats.busy), (2, 2), "{stats:?}");

        for n in [flooder, other, node] {
            n.shutdown().await.unwrap();
        }
    }

    /// Calls of several clients for one expert, made at once, are computed in shared batches, and each
    /// caller gets exactly the answer it gets alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_are_batched_and_answered_as_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (node, host, call) = host(&dir.path().join("host"), HostLimits::default()).await;
        let clients = [
            client(&dir.path().join("a"), &node).await,
            client(&dir.path().join("b"), &node).await,
        ];
        // Four calls per client (its cap), of 1 to 64 rows.
        let calls: Vec<(usize, ExpertRequest)> = (0..8)
            .map(|i| (i % 2, call.request([1, 64, 7, 32][i / 2], i)))
            .collect();
        let output = |answer: ExpertResponse| match answer {
            ExpertResponse::Output {
                output, round: 0, ..
            } => output,
            other => panic!("no output: {other:?}"),
        };
        let mut alone = Vec::new();
        for (client, request) in &calls {
            let answer = wire::call(clients[*client].net(), node.peer_id(), request, CALL).await;
            alone.push(output(answer.unwrap()));
        }
        assert_eq!(host.stats().batched_calls, 0, "one call at a time");
        let alone_batches = host.stats().batches;
        assert_eq!(alone_batches, calls.len() as u64);

        // Made at once until some were computed together (each time, every answer is checked).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut tries = 0;
        while host.stats().batched_calls == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never batched in {tries} tries"
            );
            tries += 1;
            let answers = futures::future::join_all(calls.iter().map(|(client, request)| {
                wire::call(clients[*client].net(), node.peer_id(), request, CALL)
            }))
            .await;
            for (answer, alone) in answers.into_iter().zip(&alone) {
                assert_eq!(&output(answer.unwrap()), alone, "a batched answer differs");
            }
        }
        let stats = host.stats();
        assert!(
            stats.batches < stats.answered,
            "fewer forwards than calls: {stats:?}"
        );
        for n in clients {
            n.shutdown().await.unwrap();
        }
        node.shutdown().await.unwrap();
    }
}
