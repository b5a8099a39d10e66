//! Fetching a content-addressed blob from the peers that provide it: many chunk requests in flight at once,
//! the fastest providers (by ping round trip) tried first, a failing provider dropped after a few strikes,
//! and the blake3 hash checked over the bytes before the caller commits anything.
//!
//! Chunks may arrive out of order; they are written to the sink in order, so memory stays bounded by
//! `concurrency x chunk size`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;

use super::client::Client;
use mana_protocol::{ContentHash, FetchRequest, FetchResponse};
use super::NetError;

/// Where fetched bytes go, in order. The store's blob writer implements it; so does `Vec<u8>`.
pub trait BlobSink {
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
    /// Bytes per request.
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
            chunk_bytes: 1024 * 1024,
            concurrency: 16,
            per_provider: 8,
            max_len: 64 * 1024 * 1024 * 1024,
            max_strikes: 3,
            progress: false,
        }
    }
}

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

/// Fetches the blob `hash` from `providers` into `sink`, and checks its blake3 hash. Returns its length.
/// On any error the sink holds partial bytes that the caller must discard.
pub async fn fetch_blob<S: BlobSink>(
    client: &Client,
    hash: ContentHash,
    providers: Vec<PeerId>,
    sink: &mut S,
    opts: &FetchOptions,
) -> Result<u64, FetchError> {
    let chunk = u64::from(opts.chunk_bytes.max(1));
    let mut ranked = rank_by_rtt(client, providers).await?;
    if ranked.is_empty() {
        return Err(FetchError::NoProvider("none known".into()));
    }
    let mut hasher = blake3::Hasher::new();

    // The first chunk tells the total length; providers are tried in rank order.
    let mut first = None;
    let mut last_error = String::new();
    for (i, p) in ranked.iter_mut().enumerate() {
        let req = FetchRequest { hash, offset: 0, max_len: opts.chunk_bytes };
        match client.request(p.peer, req).await {
            Ok(FetchResponse::Chunk { hash: h, offset: 0, total_size: total_len, data }) if h == hash => {
                let data = data.0;
                if total_len > opts.max_len {
                    return Err(FetchError::TooLarge(total_len));
                }
                if data.len() as u64 == total_len.min(chunk) {
                    first = Some((i, total_len, data));
                    break;
                }
                last_error = format!("{}: wrong first chunk length", p.peer);
            }
            Ok(other) => last_error = format!("{}: {other:?}", p.peer),
            Err(e) => last_error = format!("{}: {e}", p.peer),
        }
        p.strikes += 1;
    }
    let Some((_, total_len, data)) = first else {
        return Err(FetchError::NoProvider(last_error));
    };
    sink.write_chunk(&data)?;
    hasher.update(&data);

    let bar = opts.progress.then(|| {
        let bar = indicatif::ProgressBar::new(total_len);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(data.len() as u64);
        bar
    });

    let n_chunks = total_len.div_ceil(chunk);
    let mut queue: VecDeque<u64> = (1..n_chunks).collect();
    let mut ready: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut next_to_write = 1u64;
    let mut in_flight = FuturesUnordered::new();
    let mut errors: HashMap<PeerId, String> = HashMap::new();

    while next_to_write < n_chunks {
        // Fill free slots, fastest providers first; the write-ahead window bounds memory.
        while in_flight.len() < opts.concurrency
            && (ready.len() < opts.concurrency * 2 || queue.front() == Some(&next_to_write))
        {
            let Some(&index) = queue.front() else { break };
            let Some(slot) = ranked.iter().position(|p| !p.dropped && p.in_flight < opts.per_provider) else {
                break;
            };
            queue.pop_front();
            ranked[slot].in_flight += 1;
            let peer = ranked[slot].peer;
            let offset = index * chunk;
            let len = (total_len - offset).min(chunk);
            let req = FetchRequest { hash, offset, max_len: len as u32 };
            let client = client.clone();
            in_flight.push(async move { (index, slot, len, client.request(peer, req).await) });
        }
        let Some((index, slot, want, result)) = in_flight.next().await else {
            let why: Vec<String> = errors.iter().map(|(p, e)| format!("{p}: {e}")).collect();
            return Err(FetchError::NoProvider(why.join("; ")));
        };
        let provider = &mut ranked[slot];
        provider.in_flight -= 1;
        let failure = match result {
            Ok(FetchResponse::Chunk { hash: h, offset, total_size, data })
                if h == hash && offset == index * chunk && total_size == total_len && data.0.len() as u64 == want =>
            {
                ready.insert(index, data.0);
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
            queue.push_front(index);
            if ranked.iter().all(|p| p.dropped) {
                let why: Vec<String> = errors.iter().map(|(p, e)| format!("{p}: {e}")).collect();
                return Err(FetchError::NoProvider(why.join("; ")));
            }
        }
        while let Some(data) = ready.remove(&next_to_write) {
            sink.write_chunk(&data)?;
            hasher.update(&data);
            if let Some(bar) = &bar {
                bar.inc(data.len() as u64);
            }
            next_to_write += 1;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let actual = hasher.finalize();
    if actual.as_bytes() != hash.as_bytes() {
        return Err(FetchError::HashMismatch { expected: hex::encode(hash.0), actual: actual.to_hex().to_string() });
    }
    Ok(total_len)
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
