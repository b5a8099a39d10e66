//! Shard sync and blob hosting: finding providers in the DHT, fetching with the hash checked before the blob
//! is installed, announcing what we hold, and committing a checkpoint's round once all its shards are here.

use std::sync::Arc;
use std::time::Duration;

use mana_protocol::{CheckpointManifest, ContentHash, ShardEntry, ShardId};

use super::{NodeError, Shared, blocking};
use crate::net::fetch::{BlobSink, fetch_blob};
use crate::store::{BlobPin, BlobWriter};

/// How long to keep asking the DHT for providers before giving up.
const PROVIDER_WAIT: Duration = Duration::from_secs(20);

/// Tries at a checkpoint's shards before its round is left incomplete.
const SYNC_ATTEMPTS: u32 = 3;

/// The pause before the shards that failed are asked again.
const SYNC_RETRY_PAUSE: Duration = Duration::from_millis(500);

struct WriterSink(BlobWriter);

impl BlobSink for WriterSink {
    fn write_chunk(&mut self, data: &[u8]) -> std::io::Result<()> {
        std::io::Write::write_all(&mut self.0, data)
    }

    /// The store's writer hashes as it writes: the fetch checks its hash instead of hashing again.
    fn hash_so_far(&self) -> Option<blake3::Hash> {
        Some(blake3::Hash::from_bytes(self.0.hash().0))
    }

    fn restart(&mut self) -> std::io::Result<bool> {
        self.0.restart()?;
        Ok(true)
    }
}

/// Keeps a blob alive (against the store's collector) for as long as the node runs, or until a round that
/// refers to it is committed.
pub(crate) fn keep_pin(shared: &Shared, pin: BlobPin) {
    shared
        .pins
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(pin.hash().0, pin);
}

/// Announces `hash` in the DHT in the background (it must not hold up whoever waits for the blob), and
/// remembers it so that it is withdrawn once the store drops the blob ([`withdraw_dropped`]).
pub(crate) fn announce(shared: &Arc<Shared>, hash: ContentHash, what: &'static str) {
    shared
        .provided
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(hash);
    let client = shared.client.clone();
    shared.spawn(async move {
        if let Err(e) = client.start_providing(hash.0.to_vec()).await {
            tracing::debug!(%hash, error = %e, what, "blob not announced");
        }
    });
}

/// Stops announcing the blobs the store no longer holds (collected after their rounds were pruned or their
/// pins released), so the DHT points at what this node can serve, and its provider store does not grow
/// with every round.
pub(crate) async fn withdraw_dropped(shared: &Arc<Shared>) {
    let announced: Vec<ContentHash> = shared
        .provided
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .collect();
    let store = shared.store.clone();
    let gone = blocking(move || {
        let mut gone = Vec::new();
        for hash in announced {
            if !store.has_blob(&hash)? {
                gone.push(hash);
            }
        }
        Ok(gone)
    })
    .await;
    let gone = match gone {
        Ok(gone) => gone,
        Err(e) => {
            tracing::warn!(error = %e, "store not readable to withdraw announcements");
            return;
        }
    };
    for hash in gone {
        shared
            .provided
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&hash);
        if let Err(e) = shared.client.stop_providing(hash.0.to_vec()).await {
            tracing::debug!(%hash, error = %e, "announcement not withdrawn");
        }
    }
}

/// Fetches blob `hash` unless the store has it, installs it only if its blake3 matches, and announces it.
pub(crate) async fn fetch_and_store(
    shared: &Arc<Shared>,
    hash: ContentHash,
    max_len: u64,
) -> Result<u64, NodeError> {
    fetch_and_store_hinted(shared, hash, max_len, Vec::new()).await
}

/// [`fetch_and_store`], asking `hints` (peers known to hold the blob: a delta's sender, the coordinator)
/// first; the DHT is asked only if they all fail. Saves a provider lookup on the round's critical path.
pub(crate) async fn fetch_and_store_hinted(
    shared: &Arc<Shared>,
    hash: ContentHash,
    max_len: u64,
    hints: Vec<libp2p::PeerId>,
) -> Result<u64, NodeError> {
    let store = shared.store.clone();
    if let Some(len) = blocking(move || Ok(store.blob_len(&hash)?)).await? {
        return Ok(len);
    }
    let me = shared.client.local_peer_id();
    let hints: Vec<_> = hints.into_iter().filter(|p| *p != me).collect();
    if !hints.is_empty() {
        match fetch_from(shared, hash, max_len, hints).await {
            Ok(len) => return Ok(len),
            Err(e) => tracing::debug!(%hash, error = %e, "hinted providers failed; asking the DHT"),
        }
    }
    let deadline = tokio::time::Instant::now() + PROVIDER_WAIT;
    let providers = loop {
        let found = shared.client.get_providers(hash.0.to_vec()).await?;
        let found: Vec<_> = found
            .into_iter()
            .filter(|p| *p != shared.client.local_peer_id())
            .collect();
        if !found.is_empty() {
            break found;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(crate::net::fetch::FetchError::NoProvider(format!(
                "no provider of {hash} in the DHT"
            ))
            .into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    fetch_from(shared, hash, max_len, providers).await
}

/// Brings shard `entry`'s blob into the store and returns its length: from the store if there; made here
/// from `genesis`, the run's spec, if it is a round-0 shard and the spec is known; else fetched
/// ([`fetch_and_store_hinted`]: `hints` first, then the peers heard to host it, [`super::hosts`], then the
/// DHT), at most the entry's size.
pub(crate) async fn fetch_shard(
    shared: &Arc<Shared>,
    entry: ShardEntry,
    mut hints: Vec<libp2p::PeerId>,
    genesis: Option<&mana_engine::round::RunSpec>,
) -> Result<u64, NodeError> {
    let heard = shared
        .shard_hosts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .of(&entry.hash);
    for peer in heard {
        if !hints.contains(&peer) {
            hints.push(peer);
        }
    }
    if entry.round == 0
        && let Some(spec) = genesis.cloned()
    {
        let store = shared.store.clone();
        if let Some(len) = blocking(move || Ok(store.blob_len(&entry.hash)?)).await? {
            return Ok(len);
        }
        match make_initial(shared, spec, entry).await {
            Ok(len) => return Ok(len),
            Err(e) => {
                tracing::warn!(shard = %entry.shard, error = %e, "round 0's shard made here is not the manifest's (is this node's --seed the coordinator's?); fetching it")
            }
        }
    }
    fetch_and_store_hinted(shared, entry.hash, entry.size, hints).await
}

/// Makes round 0's state of `entry`'s shard from `spec`, and stores and announces it if its bytes are the
/// entry's (same size, same blake3).
async fn make_initial(
    shared: &Arc<Shared>,
    spec: mana_engine::round::RunSpec,
    entry: ShardEntry,
) -> Result<u64, NodeError> {
    let store = shared.store.clone();
    let pin = blocking(move || {
        let bytes = mana_engine::round::initial_shard(&spec, entry.shard)?.to_bytes();
        let hash = ContentHash::of(&bytes);
        if bytes.len() as u64 != entry.size || hash != entry.hash {
            return Err(NodeError::Config(format!(
                "{}: made {hash} ({} bytes), the manifest names {} ({} bytes)",
                entry.shard,
                bytes.len(),
                entry.hash,
                entry.size
            )));
        }
        Ok(store.put_blob(&bytes)?)
    })
    .await?;
    keep_pin(shared, pin);
    announce(shared, entry.hash, "round-0 shard made here");
    tracing::debug!(shard = %entry.shard, hash = %entry.hash, "round 0's shard made from the run's spec");
    Ok(entry.size)
}

/// Fetches blob `hash` from `providers`, installs it (hash checked) and announces it.
pub(crate) async fn fetch_from(
    shared: &Arc<Shared>,
    hash: ContentHash,
    max_len: u64,
    providers: Vec<libp2p::PeerId>,
) -> Result<u64, NodeError> {
    let store = shared.store.clone();
    let writer = blocking(move || Ok(store.blob_writer(max_len)?)).await?;
    let mut options = shared.config.fetch.clone();
    // A provider that claims more than the caller accepts is refused before a byte is asked for.
    options.max_len = options.max_len.min(max_len);
    options.progress = options.progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Never ask for more than we accept (an operator may lower `max_chunk_bytes` below the default chunk).
    options.chunk_bytes = options
        .chunk_bytes
        .min(shared.config.net.limits.max_chunk_bytes);
    let (len, WriterSink(writer)) = fetch_blob(
        &shared.client,
        hash,
        providers,
        WriterSink(writer),
        &options,
    )
    .await?;
    // fetch_blob checked the writer's hash (each byte hashed once, as it was written); the store checks the
    // same hash again as it installs the file, without reading the bytes again.
    let pin = blocking(move || Ok(writer.finish_expecting(&hash)?)).await?;
    keep_pin(shared, pin);
    announce(shared, hash, "fetched blob");
    tracing::debug!(%hash, bytes = len, "blob fetched and stored");
    Ok(len)
}

/// Brings the store to `manifest`: fetches missing shards (a few at a time), then commits the round.
pub(crate) async fn sync_manifest(shared: &Arc<Shared>, manifest: CheckpointManifest) {
    let round = manifest.round;
    let set_state = |s: String| shared.state().sync_state = s;
    let store = shared.store.clone();
    if let Ok(Some(current)) = blocking(move || Ok(store.current_round()?)).await {
        if current >= round {
            return;
        }
    }
    // A node that hosts a share of each checkpoint fetches only that share (the others' holders serve them).
    let wanted: Vec<mana_protocol::ShardEntry> = match &shared.config.sync_only {
        Some(only) => manifest
            .shards
            .iter()
            .filter(|e| only.contains(&e.shard))
            .copied()
            .collect(),
        None => manifest.shards.clone(),
    };
    set_state(format!("syncing round {round}: {} shards", wanted.len()));
    // Shards whose fetch failed are asked again (a connection closed under a fetch is common while peers
    // come and go), up to SYNC_ATTEMPTS times in all, before the round is left incomplete.
    let mut todo = wanted.clone();
    let mut failures = Vec::new();
    for attempt in 1..=SYNC_ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(SYNC_RETRY_PAUSE).await;
        }
        failures.clear();
        let mut failed = Vec::new();
        for chunk in todo.chunks(4) {
            let fetches = chunk.iter().map(|entry| {
                let shared = shared.clone();
                let entry = *entry;
                async move {
                    (
                        entry,
                        fetch_shard(&shared, entry, Vec::new(), shared.config.genesis.as_ref())
                            .await,
                    )
                }
            });
            for (entry, result) in futures::future::join_all(fetches).await {
                match result {
                    Ok(len) if len == entry.size => {}
                    Ok(len) => failures.push(format!(
                        "{}: {len} bytes, manifest says {}",
                        entry.shard, entry.size
                    )),
                    Err(e) => {
                        failures.push(format!("{}: {e}", entry.shard));
                        failed.push(entry);
                    }
                }
            }
        }
        if failures.is_empty() || failed.len() < failures.len() {
            // Done, or a blob of the wrong size: asking again would get the same bytes.
            break;
        }
        tracing::debug!(round, attempt, failures = ?failures, "shard sync: asking again");
        todo = failed;
    }
    if !failures.is_empty() {
        tracing::warn!(round, failures = ?failures, "shard sync incomplete");
        set_state(format!("round {round} incomplete: {}", failures.join("; ")));
        return;
    }
    // Every shard (a mirror) or this node's share, under the whole checkpoint's manifest.
    match super::checkpoint::commit_checkpoint_part(&shared.store, &manifest, &wanted).await {
        Ok(_) => {
            // The round refers to its shards now: their fetch pins go, so the store's collector reclaims
            // them once keep_rounds has pruned the round (a mirror's disk stays flat however long it runs).
            {
                let mut pins = shared.pins.lock().unwrap_or_else(|p| p.into_inner());
                for entry in &wanted {
                    pins.remove(&entry.hash.0);
                }
            }
            set_state(format!("round {round} complete"));
            tracing::info!(
                round,
                shards = wanted.len(),
                "checkpoint synced and committed"
            );
        }
        Err(e) => set_state(format!("round {round}: commit failed: {e}")),
    }
}

/// Announces in the DHT every shard of the latest stored round (after a restart, the node serves again).
pub(crate) async fn provide_stored(shared: &Arc<Shared>) {
    let store = shared.store.clone();
    let latest = match blocking(move || Ok(store.latest()?)).await {
        Ok(latest) => latest,
        Err(e) => {
            tracing::warn!(error = %e, "store not readable for announcements");
            return;
        }
    };
    let Some((_, manifest)) = latest else { return };
    for entry in manifest.entries {
        announce(shared, entry.hash, "stored shard");
    }
}

/// The shards of the latest stored round, as protocol shard ids (for heartbeats and status).
pub(crate) async fn hosted_shards(shared: &Shared) -> Result<Vec<ShardId>, NodeError> {
    let store = shared.store.clone();
    let latest = blocking(move || Ok(store.latest()?)).await?;
    let mut shards: Vec<ShardId> = latest
        .map(|(_, m)| m.entries.iter().map(|e| e.shard).collect())
        .unwrap_or_default();
    shards.truncate(mana_protocol::limits::MAX_SHARDS_PER_NODE);
    Ok(shards)
}
