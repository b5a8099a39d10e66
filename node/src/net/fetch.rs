//! Fetching a content-addressed blob from the peers that provide it: many chunk requests in flight at once,
//! the fastest providers (by ping round trip) tried first, a failing provider dropped after a few strikes,
//! and the blake3 hash checked over the bytes before the caller commits anything.
//!
//! Chunks may arrive out of order; they are handed in order to a writer on a blocking thread, which writes
//! them to the sink and hashes them while the next chunks are on the wire, so disk and hashing never stall
//! the network side. Memory stays bounded by the requests in flight plus a write-ahead window of
//! `2 x concurrency` chunks. A provider may answer with fewer bytes than asked (a smaller chunk limit): the
//! rest of that range is asked again.

use std::collections::{BTreeMap, HashMap};
use std::io;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use tokio::sync::mpsc;

use super::client::Client;
use mana_protocol::{ContentHash, FetchRequest, FetchResponse};
use super::NetError;

/// Where fetched bytes go, in order. The store's blob writer implements it; so does `Vec<u8>`. It is moved
/// to a blocking thread for the fetch and handed back at the end.
pub trait BlobSink: Send + 'static {
    /// Appends the next bytes of the blob.
    fn write_chunk(&mut self, data: &[u8]) -> io::Result<()>;
}

impl BlobSink for Vec<u8> {
    fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        self.extend_from_slice(data);
        Ok(())
    }
}

/// How to fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Bytes per request (at most the network's `max_chunk_bytes`; providers may send less).
    pub chunk_bytes: u32,
    /// Requests in flight at once, across providers.
    pub concurrency: usize,
    /// Requests in flight at once to one provider (the fastest fill theirs first).
    pub per_provider: usize,
    /// Refuse blobs longer than this (a provider could claim any length).
    pub max_len: u64,
    /// Failures after which a provider is no longer asked.
    pub max_strikes: u32,
    /// Show a progress bar on the terminal (hidden when stderr is not one).
    pub progress: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            concurrency: 16,
            per_provider: 8,
            max_len: 64 * 1024 * 1024 * 1024,
            max_strikes: 3,
            progress: false,
        }
    }
}

/// The default chunk: 1 MiB, with 8 requests in flight per provider and 16 in all. Measured with
/// `tests/net_bench.rs` against 2 and 4 MiB chunks and 16 per provider, it was the fastest on loopback (each
/// stream starts with yamux's 256 KiB window, and bigger requests mostly wait longer for window updates),
/// and it keeps at most 16 MiB in flight and 32 MiB waiting to be written per fetch. Providers accept up to
/// the protocol's 4 MiB ([`mana_protocol::limits::MAX_FETCH_CHUNK_BYTES`]).
pub const DEFAULT_CHUNK_BYTES: u32 = 1024 * 1024;

/// Why a fetch failed. Nothing is committed in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No provider was known, or every provider failed.
    #[error("no provider could serve the blob ({0})")]
    NoProvider(String),
    /// The bytes received do not hash to the requested hash.
    #[error("hash mismatch: expected {expected}, got {actual}")]
    HashMismatch {
        /// Requested hash (hex).
        expected: String,
        /// Hash of the bytes received (hex).
        actual: String,
    },
    /// A provider claimed a length beyond `max_len`.
    #[error("blob too large: {0} bytes")]
    TooLarge(u64),
    /// The sink failed to write.
    #[error("writing the blob: {0}")]
    Sink(#[from] io::Error),
    /// The network stopped.
    #[error(transparent)]
    Net(#[from] NetError),
}

struct Provider {
    peer: PeerId,
    in_flight: usize,
    strikes: u32,
    dropped: bool,
}

/// The writer stage: a blocking task that writes chunks to the sink in order and hashes them.
struct Writer<S> {
    chunks: mpsc::Sender<Vec<u8>>,
    task: tokio::task::JoinHandle<io::Result<(S, blake3::Hash)>>,
}

impl<S: BlobSink> Writer<S> {
    fn spawn(mut sink: S, window: usize) -> Self {
        let (chunks, mut rx) = mpsc::channel::<Vec<u8>>(window.max(1));
        let task = tokio::task::spawn_blocking(move || {
            let mut hasher = blake3::Hasher::new();
            while let Some(chunk) = rx.blocking_recv() {
                sink.write_chunk(&chunk)?;
                hasher.update(&chunk);
            }
            Ok((sink, hasher.finalize()))
        });
        Self { chunks, task }
    }

    /// Queues the next chunk, waiting while the writer is a full window behind. False when the writer has
    /// stopped, which it only does on a write error ([`Writer::stopped`] returns it).
    async fn write(&self, chunk: Vec<u8>) -> bool {
        self.chunks.send(chunk).await.is_ok()
    }

    /// The error that stopped the writer early.
    async fn stopped(self) -> FetchError {
        match self.finish().await {
            Err(e) => e,
            Ok(_) => io::Error::other("blob writer stopped early").into(),
        }
    }

    /// Waits for every queued chunk to be written; returns the sink and the hash of all bytes.
    async fn finish(self) -> Result<(S, blake3::Hash), FetchError> {
        drop(self.chunks);
        match self.task.await {
            Ok(result) => Ok(result?),
            Err(e) => Err(FetchError::Sink(io::Error::other(format!("blob writer failed: {e}")))),
        }
    }
}

/// Fetches the blob `hash` from `providers` into `sink`, and checks its blake3 hash. Returns its length and
/// the sink. On any error the sink (with partial bytes) is dropped.
pub async fn fetch_blob<S: BlobSink>(
    client: &Client,
    hash: ContentHash,
    providers: Vec<PeerId>,
    sink: S,
    opts: &FetchOptions,
) -> Result<(u64, S), FetchError> {
    let chunk = u64::from(opts.chunk_bytes.max(1));
    let concurrency = opts.concurrency.max(1);
    let mut ranked = rank_by_rtt(client, providers).await?;
    if ranked.is_empty() {
        return Err(FetchError::NoProvider("none known".into()));
    }

    // The first chunk tells the total length; providers are tried in rank order.
    let mut first = None;
    let mut last_error = String::new();
    for p in ranked.iter_mut() {
        let req = FetchRequest { hash, offset: 0, max_len: opts.chunk_bytes };
        match client.request(p.peer, req).await {
            Ok(FetchResponse::Chunk { hash: h, offset: 0, total_size: total_len, data }) if h == hash => {
                let data = data.0;
                if total_len > opts.max_len {
                    return Err(FetchError::TooLarge(total_len));
                }
                let len = data.len() as u64;
                if len <= total_len.min(chunk) && (len > 0 || total_len == 0) {
                    first = Some((total_len, data));
                    break;
                }
                last_error = format!("{}: wrong first chunk length", p.peer);
            }
            Ok(other) => last_error = format!("{}: {other:?}", p.peer),
            Err(e) => last_error = format!("{}: {e}", p.peer),
        }
        p.strikes += 1;
    }
    let Some((total_len, data)) = first else {
        return Err(FetchError::NoProvider(last_error));
    };

    let bar = opts.progress.then(|| {
        let bar = indicatif::ProgressBar::new(total_len);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(data.len() as u64);
        bar
    });
    let mut next_to_write = data.len() as u64;
    let writer = Writer::spawn(sink, concurrency);
    if !writer.write(data).await {
        return Err(writer.stopped().await);
    }

    // Ranges still to ask for, offset -> length, asked lowest first (so the range the writer waits for is
    // always either in flight or first here).
    let mut pending: BTreeMap<u64, u64> = BTreeMap::new();
    let mut offset = next_to_write;
    while offset < total_len {
        let len = (total_len - offset).min(chunk);
        pending.insert(offset, len);
        offset += len;
    }
    let mut ready: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut in_flight = FuturesUnordered::new();
    let mut errors: HashMap<PeerId, String> = HashMap::new();

    while next_to_write < total_len {
        // Fill free slots, fastest providers first; the write-ahead window bounds memory (the range the
        // writer waits for is always let through).
        while in_flight.len() < concurrency {
            let Some((&offset, &len)) = pending.first_key_value() else { break };
            if ready.len() >= concurrency * 2 && offset != next_to_write {
                break;
            }
            let Some(slot) = ranked.iter().position(|p| !p.dropped && p.in_flight < opts.per_provider) else {
                break;
            };
            pending.remove(&offset);
            ranked[slot].in_flight += 1;
            let peer = ranked[slot].peer;
            let req = FetchRequest { hash, offset, max_len: len as u32 };
            let client = client.clone();
            in_flight.push(async move { (offset, len, slot, client.request(peer, req).await) });
        }
        let Some((offset, want, slot, result)) = in_flight.next().await else {
            let why: Vec<String> = errors.iter().map(|(p, e)| format!("{p}: {e}")).collect();
            return Err(FetchError::NoProvider(why.join("; ")));
        };
        let provider = &mut ranked[slot];
        provider.in_flight -= 1;
        let failure = match result {
            Ok(FetchResponse::Chunk { hash: h, offset: at, total_size, data })
                if h == hash && at == offset && total_size == total_len && !data.0.is_empty()
                    && data.0.len() as u64 <= want =>
            {
                let got = data.0.len() as u64;
                if got < want {
                    // A smaller chunk limit at the provider: ask for the rest next.
                    pending.insert(offset + got, want - got);
                }
                ready.insert(offset, data.0);
                None
            }
            Ok(FetchResponse::Chunk { .. }) => Some(("inconsistent chunk".to_owned(), true)),
            Ok(FetchResponse::NotFound { .. }) => Some(("not found".to_owned(), true)),
            Ok(FetchResponse::Refused { reason }) => Some((format!("refused: {reason}"), false)),
            Err(NetError::Closed) => return Err(NetError::Closed.into()),
            Err(e) => Some((e.to_string(), false)),
        };
        if let Some((why, fatal)) = failure {
            provider.strikes += 1;
            if fatal || provider.strikes >= opts.max_strikes {
                provider.dropped = true;
            }
            errors.insert(provider.peer, why);
            pending.insert(offset, want);
            if ranked.iter().all(|p| p.dropped) {
                let why: Vec<String> = errors.iter().map(|(p, e)| format!("{p}: {e}")).collect();
                return Err(FetchError::NoProvider(why.join("; ")));
            }
        }
        while let Some(data) = ready.remove(&next_to_write) {
            next_to_write += data.len() as u64;
            if let Some(bar) = &bar {
                bar.set_position(next_to_write);
            }
            if !writer.write(data).await {
                return Err(writer.stopped().await);
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let (sink, actual) = writer.finish().await?;
    if actual.as_bytes() != hash.as_bytes() {
        return Err(FetchError::HashMismatch { expected: hex::encode(hash.0), actual: actual.to_hex().to_string() });
    }
    Ok((total_len, sink))
}

/// Orders providers by their last ping round trip, fastest first; unmeasured ones go last.
async fn rank_by_rtt(client: &Client, providers: Vec<PeerId>) -> Result<Vec<Provider>, NetError> {
    let snap = client.snapshot().await?;
    let rtt: HashMap<String, f64> =
        snap.peers.iter().filter_map(|p| p.rtt_ms.map(|r| (p.peer_id.clone(), r))).collect();
    let mut ranked: Vec<(f64, PeerId)> = providers
        .into_iter()
        .filter(|p| *p != client.local_peer_id())
        .map(|p| (rtt.get(&p.to_string()).copied().unwrap_or(f64::INFINITY), p))
        .collect();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
    ranked.dedup_by(|a, b| a.1 == b.1);
    Ok(ranked.into_iter().map(|(_, peer)| Provider { peer, in_flight: 0, strikes: 0, dropped: false }).collect())
}
