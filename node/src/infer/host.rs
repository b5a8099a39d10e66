//! The host's side of expert calls: a node answers [`ExpertRequest`]s for the expert shards its store holds
//! in a committed round, from exactly those weights, and says which round and checkpoint it used.
//!
//! - A request names a checkpoint (a manifest hash). The host finds it among the coordinator's signed
//!   commits it heard lately (the last [`KEPT_COMMITS`]), or among its store's rounds whose manifest is that
//!   checkpoint (a mirror's), and answers from the shard blob the checkpoint names if the store holds that
//!   very blob; otherwise it answers `Unavailable`. Loaded experts are kept (at most
//!   [`HostLimits::cached_experts`], the oldest dropped first).
//! - Calls in progress are capped ([`HostLimits::max_calls`]); past the cap the host answers "busy" at
//!   once, and past a further cap ([`HostLimits::max_busy_answers`]) it drops the stream, so a flood costs
//!   the sender its calls, not the host its memory. Each request is read under the protocol's frame cap,
//!   within [`HostLimits::read_timeout`], and may hold at most [`HostLimits::max_rows`] rows.
//! - The arithmetic runs on a blocking thread ([`ExpertKernel`], the model's own decode arithmetic) on the
//!   request's input as decoded, so the output is bit-identical to the expert run inside the whole model on
//!   those values; it is sent in the encoding the request asks for ([`super::dispatch`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::PeerId;
use mana_engine::round::{RunShard, RunSpec, ShardRecord};
use mana_kernels::CpuBackend;
use mana_kernels::model::ExpertKernel;
use mana_protocol::limits::{MAX_REQUEST_BYTES, MAX_TEXT_LEN};
use mana_protocol::{
    CheckpointManifest, ContentHash, ExpertRequest, ExpertResponse, Message, ShardId, Text,
};
use tokio::sync::Semaphore;

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
    /// "Busy" answers being sent at once; past it an incoming call's stream is dropped unanswered.
    pub max_busy_answers: usize,
    /// Most rows (tokens) one request may hold.
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
            max_busy_answers: 64,
            max_rows: 4096,
            cached_experts: 64,
            read_timeout: Duration::from_secs(10),
        }
    }
}

/// How many of the latest signed commits a host remembers, to answer calls for their checkpoints.
pub const KEPT_COMMITS: usize = 8;

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
}

/// Starts answering expert calls on `node` for `spec`'s model, until the node shuts down. Call once per
/// node (a second call gets [`crate::net::NetError::AlreadyAccepting`]).
pub fn serve_experts(
    node: &NodeHandle,
    spec: RunSpec,
    limits: HostLimits,
) -> Result<(), NodeError> {
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
    });
    // Commits the node accepted, i.e. signed by the run's coordinator.
    let heard = host.clone();
    node.follow_accepted("expert host", move |a| {
        if let Message::RoundCommit(commit) = &a.message {
            heard.hear_commit(&commit.checkpoint);
        }
    });
    node.spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            if let Ok(permit) = host.calls.clone().try_acquire_owned() {
                let host = host.clone();
                tokio::spawn(async move {
                    host.serve_call(peer, stream).await;
                    drop(permit);
                });
            } else if let Ok(permit) = host.busy.clone().try_acquire_owned() {
                let timeout = host.limits.read_timeout;
                tokio::spawn(async move {
                    answer_busy(stream, timeout).await;
                    drop(permit);
                });
            } else {
                tracing::debug!(%peer, "expert call dropped: busy answers at their cap");
            }
        }
    });
    Ok(())
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
        let host = self.clone();
        let result = tokio::task::spawn_blocking(move || host.compute(&request, rows)).await;
        match result {
            Ok(Ok(response)) => response,
            Ok(Err(reason)) => unavailable(&reason),
            Err(e) => unavailable(&format!("internal: {e}")),
        }
    }

    /// Loads the expert (if needed) and runs it; on a blocking thread.
    fn compute(&self, request: &ExpertRequest, rows: usize) -> Result<ExpertResponse, String> {
        let loaded = self.expert(request.checkpoint, request.shard)?;
        let x = request.input.to_f32().map_err(|e| e.to_string())?;
        let c = self.spec.model.d_model;
        let mut out = vec![0.0f32; rows * c];
        lock(&loaded.kernel)
            .forward(&x, rows, &mut out)
            .map_err(|e| e.to_string())?;
        let output = encode_answer(request.answer, request.input.shape.clone(), &out)
            .map_err(|e| e.to_string())?;
        Ok(ExpertResponse::Output {
            round: loaded.round,
            checkpoint: request.checkpoint,
            output,
        })
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
