//! Fetching a content-addressed blob from the peers that provide it, from several at once: the blob is cut
//! into segments, and each provider (fastest ping first) gets up to `streams_per_provider` of them at a
//! time, each on its own bulk stream ([`super::bulk`]) whose bytes arrive raw. A provider that speaks only
//! the request-response fetch protocol (`/mana/fetch/1.0.0`, older nodes, other implementations) gets its
//! segments as chunk requests instead, so every provider can contribute.
//!
//! Pieces arrive out of order across providers; they are handed in order to a writer on a blocking thread,
//! which writes them to the sink while the next ones are on the wire. The bytes are hashed exactly once:
//! by the sink if it hashes anyway (the store's blob writer does, to name the file), otherwise by the
//! writer; the blake3 hash is checked before the caller commits anything. Memory stays bounded by a
//! write-ahead window of a few segments.
//!
//! A hostile provider costs only itself: every segment has a deadline (a trickling provider loses it), a
//! header or chunk that does not match what was asked drops the provider, sizes are checked before bytes
//! are read, and whatever it left undelivered is asked of another provider. Wrong bytes are caught by the
//! hash; when several providers contributed, each is then asked for the whole blob alone, so the liar is
//! found (and named in the log) and the blob still comes from an honest one.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use libp2p::PeerId;
use tokio::sync::mpsc;

use super::NetError;
use super::bulk::{PIECE_BYTES, RangeStream};
use super::client::Client;
use mana_protocol::{ContentHash, FetchRequest, FetchResponse, RangeRequest, RangeResponse};

/// Where fetched bytes go, in order. The store's blob writer implements it; so does `Vec<u8>`. It is moved
/// to a blocking thread for the fetch and handed back at the end.
pub trait BlobSink: Send + 'static {
    /// Appends the next bytes of the blob.
    fn write_chunk(&mut self, data: &[u8]) -> io::Result<()>;

    /// The blake3 hash of every byte written so far, when the sink computes it anyway (the store's writer
    /// does): the fetch then checks this one instead of hashing every byte a second time. `None` (the
    /// default): the fetch hashes the bytes itself.
    fn hash_so_far(&self) -> Option<blake3::Hash> {
        None
    }

    /// Empties the sink for another attempt. `false` (the default) when it cannot: a hash mismatch among
    /// several providers is then not retried provider by provider.
    fn restart(&mut self) -> io::Result<bool> {
        Ok(false)
    }
}

impl BlobSink for Vec<u8> {
    fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        self.extend_from_slice(data);
        Ok(())
    }

    fn restart(&mut self) -> io::Result<bool> {
        self.clear();
        Ok(true)
    }
}

/// How to fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Bytes per request on the request-response fallback (at most the network's `max_chunk_bytes`;
    /// providers may send less).
    pub chunk_bytes: u32,
    /// Request-response fallback: chunk requests in flight at once for one segment (with `per_provider`,
    /// the smaller counts).
    pub concurrency: usize,
    /// Request-response fallback: chunk requests in flight at once to one provider (at most the providers'
    /// `max_served_requests_per_peer`, or the rest are answered busy and asked again).
    pub per_provider: usize,
    /// Bytes per segment, the unit handed to one provider at a time (and asked again elsewhere if it
    /// fails).
    pub segment_bytes: u64,
    /// Segments in flight at once per provider, each on its own stream (two hide the round trip between
    /// one segment and the next).
    pub streams_per_provider: usize,
    /// How long one segment may take before its provider is struck and the rest asked elsewhere.
    pub segment_timeout: Duration,
    /// Use bulk streams where the provider has them (false: request-response only, for comparisons).
    pub bulk_streams: bool,
    /// Use blob lanes ([`super::lane`]) where the provider has them and is directly connected (false: bulk
    /// streams only).
    pub blob_lanes: bool,
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
            per_provider: 4,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            streams_per_provider: 2,
            segment_timeout: Duration::from_secs(30),
            bulk_streams: true,
            blob_lanes: true,
            max_len: 64 * 1024 * 1024 * 1024,
            max_strikes: 3,
            progress: false,
        }
    }
}

/// The default chunk of the request-response fallback: 1 MiB, with 4 requests in flight per provider.
/// Measured with `tests/net_bench.rs` against 2 and 4 MiB chunks and 16 per provider, it was the fastest on
/// loopback (each stream starts with yamux's 256 KiB window). Providers accept up to the protocol's 4 MiB
/// ([`mana_protocol::limits::MAX_FETCH_CHUNK_BYTES`]).
pub const DEFAULT_CHUNK_BYTES: u32 = 1024 * 1024;

/// The default segment: 8 MiB. Long enough that the round trip between two segments on a stream costs
/// little (and yamux's window has grown), short enough that several providers share a 50 MB shard and that
/// a failed segment costs little to ask again.
pub const DEFAULT_SEGMENT_BYTES: u64 = 8 * 1024 * 1024;

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

/// Fetches the blob `hash` from `providers` into `sink`, and checks its blake3 hash. Returns its length and
/// the sink. On any error the sink (with partial bytes) is dropped.
pub async fn fetch_blob<S: BlobSink>(
    client: &Client,
    hash: ContentHash,
    providers: Vec<PeerId>,
    sink: S,
    opts: &FetchOptions,
) -> Result<(u64, S), FetchError> {
    let ranked = rank_by_rtt(client, providers).await?;
    if ranked.is_empty() {
        return Err(FetchError::NoProvider("none known".into()));
    }
    let Failed {
        error,
        sink,
        contributors,
    } = match fetch_once(client, hash, &ranked, sink, opts).await {
        Ok(done) => return Ok(done),
        Err(failed) => failed,
    };
    let mismatch = matches!(error, FetchError::HashMismatch { .. });
    let (true, Some(mut sink)) = (mismatch && contributors.len() > 1, sink) else {
        if let (true, Some(peer)) = (mismatch, contributors.first()) {
            tracing::warn!(%peer, %hash, "provider served bytes that do not match the blob's hash");
        }
        return Err(error);
    };
    // Several providers contributed and one of them lied: ask each alone, fastest first.
    let mut last = error;
    for peer in contributors {
        if !sink.restart()? {
            return Err(last);
        }
        match fetch_once(client, hash, &[peer], sink, opts).await {
            Ok(done) => return Ok(done),
            Err(again) => {
                if matches!(again.error, FetchError::HashMismatch { .. }) {
                    tracing::warn!(%peer, %hash, "provider served bytes that do not match the blob's hash");
                }
                last = again.error;
                match again.sink {
                    Some(s) => sink = s,
                    None => return Err(last),
                }
            }
        }
    }
    Err(last)
}

/// A failed attempt: why, the sink back when it survived, and who sent bytes.
struct Failed<S> {
    error: FetchError,
    sink: Option<S>,
    /// Providers that delivered at least one byte, in rank order.
    contributors: Vec<PeerId>,
}

impl<S> Failed<S> {
    fn before_writing(error: FetchError, sink: S) -> Self {
        Self {
            error,
            sink: Some(sink),
            contributors: Vec::new(),
        }
    }
}

/// One provider during one attempt.
struct Provider {
    peer: PeerId,
    strikes: u32,
    dropped: bool,
    /// Speaks only the request-response fetch protocol.
    legacy: bool,
    /// Segments in flight.
    active: usize,
    /// Open streams between two segments.
    idle: Vec<RangeStream>,
    /// Bytes delivered in this attempt.
    delivered: u64,
}

impl Provider {
    fn new(peer: PeerId) -> Self {
        Self {
            peer,
            strikes: 0,
            dropped: false,
            legacy: false,
            active: 0,
            idle: Vec::new(),
            delivered: 0,
        }
    }
}

/// Why a segment failed, and what it costs its provider.
#[derive(Debug)]
enum Fault {
    /// The provider has no bulk streams: use request-response from now on (no strike).
    Unsupported,
    /// Our own network layer stopped: the fetch ends.
    Stopped,
    /// A failure an honest provider can have (timeout, refusal, reset): one strike.
    Strike(String),
    /// The provider answered something no honest provider sends (wrong header, not found): dropped.
    Drop(String),
}

impl From<NetError> for Fault {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Closed => Fault::Stopped,
            NetError::StreamUnsupported { .. } => Fault::Unsupported,
            e => Fault::Strike(error_chain(&e)),
        }
    }
}

/// An error and its sources, joined (the log and `NoProvider` show the whole chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What a segment task reports when it ends.
struct SegmentDone {
    slot: usize,
    offset: u64,
    len: u64,
    /// Bytes delivered from `offset` on, contiguously (the rest is asked again).
    delivered: u64,
    /// The stream back for the next segment (bulk), or why the segment failed.
    result: Result<Option<RangeStream>, Fault>,
}

/// Piece buffers handed back by the writer for the segment tasks to fill again, so a fetch neither
/// allocates nor zeroes a fresh megabyte per piece (page faults and a memset per piece, measured in
/// `tests/net_bench.rs`). Holds at most the write-ahead window's worth.
#[derive(Clone)]
struct PiecePool {
    free: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    cap: usize,
}

impl PiecePool {
    fn new(cap: usize) -> Self {
        Self {
            free: Default::default(),
            cap,
        }
    }

    /// A buffer of exactly `len` bytes (its contents are about to be overwritten).
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut buf = reused.unwrap_or_else(|| Vec::with_capacity(PIECE_BYTES));
        buf.resize(len, 0);
        buf
    }

    /// Gives a written piece back (dropped when the pool is full or the buffer is not piece-sized).
    fn give(&self, buf: Vec<u8>) {
        if buf.capacity() < PIECE_BYTES {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.cap {
            free.push(buf);
        }
    }
}

/// What one segment task needs besides its range.
#[derive(Clone)]
struct SegmentJob {
    client: Client,
    hash: ContentHash,
    total: u64,
    pieces: mpsc::Sender<(u64, Vec<u8>)>,
    pool: PiecePool,
    chunk_bytes: u64,
    chunk_depth: usize,
    timeout: Duration,
    lanes: bool,
}

impl SegmentJob {
    /// Fetches `offset..offset + len` from `peer`, over `stream` (bulk: an idle one, or `None` to open
    /// one) or by chunk requests (`legacy`), under the segment deadline.
    async fn run(
        self,
        slot: usize,
        peer: PeerId,
        legacy: bool,
        stream: Option<RangeStream>,
        offset: u64,
        len: u64,
    ) -> SegmentDone {
        let mut delivered = 0u64;
        let work = async {
            if legacy {
                self.chunks(peer, offset, len, &mut delivered)
                    .await
                    .map(|()| None)
            } else {
                self.range(peer, stream, offset, len, &mut delivered)
                    .await
                    .map(Some)
            }
        };
        let result = match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(Fault::Strike(format!(
                "segment not done in {:?}",
                self.timeout
            ))),
        };
        SegmentDone {
            slot,
            offset,
            len,
            delivered,
            result,
        }
    }

    /// The bulk path: one range request, its bytes read in pieces.
    async fn range(
        &self,
        peer: PeerId,
        stream: Option<RangeStream>,
        offset: u64,
        len: u64,
        delivered: &mut u64,
    ) -> Result<RangeStream, Fault> {
        let mut stream = match stream {
            Some(stream) => stream,
            None => RangeStream::open(&self.client, peer, self.lanes).await?,
        };
        let header = stream
            .request(&RangeRequest {
                hash: self.hash,
                offset,
                len,
            })
            .await?;
        let sent = match header {
            RangeResponse::Range {
                hash,
                offset: at,
                total_size,
                len: sent,
            } if hash == self.hash
                && at == offset
                && total_size == self.total
                && sent > 0
                && sent <= len =>
            {
                sent
            }
            RangeResponse::Range { .. } => {
                return Err(Fault::Drop(
                    "range header does not match the request".into(),
                ));
            }
            RangeResponse::NotFound { .. } => return Err(Fault::Drop("not found".into())),
            RangeResponse::Refused { reason } => return Err(refusal(reason.as_str())),
        };
        while *delivered < sent {
            let n = (sent - *delivered).min(PIECE_BYTES as u64) as usize;
            let mut piece = self.pool.take(n);
            stream.read_body(&mut piece).await?;
            self.pieces
                .send((offset + *delivered, piece))
                .await
                .map_err(|_| Fault::Stopped)?;
            *delivered += n as u64;
        }
        Ok(stream)
    }

    /// The request-response fallback: chunk requests, several in flight, delivered in order. A short
    /// chunk (a provider with a smaller chunk limit) ends the segment early; the rest is asked again.
    /// A provider answering `busy` is over its per-peer cap (other fetches of ours at once, or a smaller
    /// cap than our depth): that chunk is asked again after a pause, with one request fewer in flight,
    /// and only [`MAX_BUSY_IN_A_ROW`] busy answers without a chunk between them cost a strike.
    async fn chunks(
        &self,
        peer: PeerId,
        offset: u64,
        len: u64,
        delivered: &mut u64,
    ) -> Result<(), Fault> {
        let end = offset + len;
        let mut next = offset;
        let mut depth = self.chunk_depth;
        let mut busy_in_a_row = 0u32;
        let mut in_flight = FuturesOrdered::new();
        loop {
            while in_flight.len() < depth && next < end {
                let want = (end - next).min(self.chunk_bytes);
                in_flight.push_back(self.ask_chunk(peer, next, want, Duration::ZERO));
                next += want;
            }
            let Some((at, want, result)) = in_flight.next().await else {
                return Ok(());
            };
            match result? {
                FetchResponse::Chunk {
                    hash,
                    offset: got_at,
                    total_size,
                    data,
                } if hash == self.hash
                    && got_at == at
                    && total_size == self.total
                    && !data.0.is_empty()
                    && data.0.len() as u64 <= want =>
                {
                    busy_in_a_row = 0;
                    let got = data.0.len() as u64;
                    self.pieces
                        .send((at, data.0))
                        .await
                        .map_err(|_| Fault::Stopped)?;
                    *delivered += got;
                    if got < want {
                        return Ok(());
                    }
                }
                FetchResponse::Chunk { .. } => {
                    return Err(Fault::Drop("inconsistent chunk".into()));
                }
                FetchResponse::NotFound { .. } => return Err(Fault::Drop("not found".into())),
                FetchResponse::Refused { reason }
                    if reason.as_str() == BUSY && busy_in_a_row < MAX_BUSY_IN_A_ROW =>
                {
                    // The head of the queue again, so chunks are still delivered in order.
                    busy_in_a_row += 1;
                    depth = depth.saturating_sub(1).max(1);
                    in_flight.push_front(self.ask_chunk(
                        peer,
                        at,
                        want,
                        BUSY_PAUSE * busy_in_a_row,
                    ));
                }
                FetchResponse::Refused { reason } => return Err(refusal(reason.as_str())),
            }
        }
    }

    /// One chunk request, sent after `pause`; answers with the range it asked for.
    fn ask_chunk(
        &self,
        peer: PeerId,
        at: u64,
        want: u64,
        pause: Duration,
    ) -> impl Future<Output = (u64, u64, Result<FetchResponse, NetError>)> + use<> {
        let client = self.client.clone();
        let request = FetchRequest {
            hash: self.hash,
            offset: at,
            max_len: want as u32,
        };
        async move {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            (at, want, client.request(peer, request).await)
        }
    }
}

/// The reason a provider gives when it is over its cap of requests answered at once.
const BUSY: &str = "busy";

/// The reason a provider gives when it has served enough copies of a blob for now and others hold it (the
/// coordinator's parcels, [`super::bulk::BlobSource::admit`]): the fetcher takes it from another provider
/// in this attempt, and may ask this one again in a later attempt.
pub const SPREAD: &str = "spread: fetch it from another holder";

/// What a refusal costs its provider in this attempt: a strike, or for [`SPREAD`] its place in the attempt
/// (asking again at once would be refused again).
fn refusal(reason: &str) -> Fault {
    if reason == SPREAD {
        Fault::Drop(reason.to_string())
    } else {
        Fault::Strike(format!("refused: {reason}"))
    }
}

/// Busy answers one chunk path takes in a row (a pause growing by [`BUSY_PAUSE`] each) before its provider
/// is struck: about 4 s of waiting in all, well inside a segment's deadline.
const MAX_BUSY_IN_A_ROW: u32 = 12;

/// The pause before a chunk answered busy is asked again, times the busy answers in a row.
const BUSY_PAUSE: Duration = Duration::from_millis(50);

/// The writer stage: a blocking task that writes pieces to the sink in order, hashing them unless the
/// sink hashes them itself.
struct Writer<S> {
    chunks: mpsc::Sender<Vec<u8>>,
    task: tokio::task::JoinHandle<(S, io::Result<blake3::Hash>)>,
}

impl<S: BlobSink> Writer<S> {
    fn spawn(mut sink: S, window: usize, pool: PiecePool) -> Self {
        let (chunks, mut rx) = mpsc::channel::<Vec<u8>>(window.max(1));
        let task = tokio::task::spawn_blocking(move || {
            let mut hasher = sink.hash_so_far().is_none().then(blake3::Hasher::new);
            while let Some(chunk) = rx.blocking_recv() {
                if let Err(e) = sink.write_chunk(&chunk) {
                    return (sink, Err(e));
                }
                if let Some(hasher) = &mut hasher {
                    hasher.update(&chunk);
                }
                pool.give(chunk);
            }
            let hash = hasher.map(|h| h.finalize()).or_else(|| sink.hash_so_far());
            let hash = hash.ok_or_else(|| io::Error::other("the sink stopped hashing"));
            (sink, hash)
        });
        Self { chunks, task }
    }

    /// Queues the next piece, waiting while the writer is a full window behind. False when the writer has
    /// stopped, which it only does on a write error ([`Writer::finish`] returns it).
    async fn write(&self, chunk: Vec<u8>) -> bool {
        self.chunks.send(chunk).await.is_ok()
    }

    /// Waits for every queued piece to be written; returns the sink (unless the writer thread died) and
    /// the hash of all bytes or the write error.
    async fn finish(self) -> (Option<S>, io::Result<blake3::Hash>) {
        drop(self.chunks);
        match self.task.await {
            Ok((sink, result)) => (Some(sink), result),
            Err(e) => (
                None,
                Err(io::Error::other(format!("blob writer failed: {e}"))),
            ),
        }
    }
}

/// One attempt at the blob from `peers` (ranked). On failure the sink comes back when it survived.
async fn fetch_once<S: BlobSink>(
    client: &Client,
    hash: ContentHash,
    peers: &[PeerId],
    sink: S,
    opts: &FetchOptions,
) -> Result<(u64, S), Failed<S>> {
    let mut ranked: Vec<Provider> = peers.iter().map(|p| Provider::new(*p)).collect();
    let mut errors: HashMap<PeerId, String> = HashMap::new();
    let total = match probe(client, hash, &mut ranked, &mut errors, opts).await {
        Ok(total) => total,
        Err(e) => return Err(Failed::before_writing(e, sink)),
    };
    if total > opts.max_len {
        return Err(Failed::before_writing(FetchError::TooLarge(total), sink));
    }
    let segment = opts.segment_bytes.max(1);
    let streams = opts.streams_per_provider.max(1);
    let workers = streams * ranked.len();
    // Pieces buffered ahead of the writer stay under this many bytes.
    let window = segment.saturating_mul(workers as u64 + 2);
    let window_pieces = (window / PIECE_BYTES as u64).max(4) as usize;
    let pool = PiecePool::new(window_pieces);
    let writer = Writer::spawn(sink, window_pieces, pool.clone());
    let bar = opts.progress.then(|| progress_bar(total));

    let mut pending: BTreeMap<u64, u64> = BTreeMap::new();
    let mut offset = 0;
    while offset < total {
        let len = (total - offset).min(segment);
        pending.insert(offset, len);
        offset += len;
    }
    let (pieces_tx, mut pieces_rx) = mpsc::channel::<(u64, Vec<u8>)>(workers * 4);
    let job = SegmentJob {
        client: client.clone(),
        hash,
        total,
        pieces: pieces_tx,
        pool,
        chunk_bytes: u64::from(opts.chunk_bytes.max(1)),
        chunk_depth: opts.per_provider.min(opts.concurrency).max(1),
        timeout: opts.segment_timeout,
        lanes: opts.blob_lanes,
    };
    let mut ready: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    // Segment tasks belong to this fetch: dropping it (a cancelled caller) aborts them with it.
    let mut in_flight = tokio::task::JoinSet::new();
    let mut next_to_write = 0u64;
    let mut failure: Option<FetchError> = None;

    'fetch: while next_to_write < total {
        // Hand out segments, lowest first, within the window; providers with fewer strikes, then faster
        // ones, first.
        while let Some((&offset, &len)) = pending.first_key_value() {
            if offset >= next_to_write.saturating_add(window) {
                break;
            }
            let free = ranked
                .iter()
                .enumerate()
                .filter(|(_, p)| !p.dropped && p.active < if p.legacy { 1 } else { streams })
                .min_by_key(|(i, p)| (p.strikes, *i))
                .map(|(i, _)| i);
            let Some(slot) = free else { break };
            pending.remove(&offset);
            let p = &mut ranked[slot];
            p.active += 1;
            let stream = if p.legacy { None } else { p.idle.pop() };
            let task = job.clone().run(slot, p.peer, p.legacy, stream, offset, len);
            in_flight.spawn(task);
        }
        if in_flight.is_empty() && pending.is_empty() && ready.is_empty() && pieces_rx.is_empty() {
            failure = Some(FetchError::NoProvider(
                "nothing left to fetch before the end".into(),
            ));
            break;
        }
        tokio::select! {
            biased;
            Some((at, piece)) = pieces_rx.recv() => {
                ready.insert(at, piece);
                while let Some(piece) = ready.remove(&next_to_write) {
                    next_to_write += piece.len() as u64;
                    if let Some(bar) = &bar {
                        bar.set_position(next_to_write);
                    }
                    if !writer.write(piece).await {
                        break 'fetch; // the writer's error comes out of finish()
                    }
                }
            }
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                let done = match done {
                    Ok(done) => done,
                    Err(e) => {
                        failure = Some(io::Error::other(format!("segment task failed: {e}")).into());
                        break;
                    }
                };
                let p = &mut ranked[done.slot];
                p.active -= 1;
                p.delivered += done.delivered;
                let rest = (done.offset + done.delivered, done.len - done.delivered);
                let fault = match done.result {
                    Ok(stream) => {
                        p.idle.extend(stream);
                        None
                    }
                    Err(fault) => Some(fault),
                };
                if rest.1 > 0 {
                    pending.insert(rest.0, rest.1);
                }
                match fault {
                    None => {}
                    Some(Fault::Unsupported) => p.legacy = true,
                    Some(Fault::Stopped) => {
                        failure = Some(NetError::Closed.into());
                        break;
                    }
                    Some(Fault::Strike(why)) => {
                        p.strikes += 1;
                        p.dropped |= p.strikes >= opts.max_strikes;
                        tracing::debug!(peer = %p.peer, %why, strikes = p.strikes, "segment failed");
                        errors.insert(p.peer, why);
                    }
                    Some(Fault::Drop(why)) => {
                        p.dropped = true;
                        tracing::debug!(peer = %p.peer, %why, "provider dropped from the fetch");
                        errors.insert(p.peer, why);
                    }
                }
                if p.dropped {
                    p.idle.clear();
                }
                if ranked.iter().all(|p| p.dropped) {
                    failure = Some(FetchError::NoProvider(joined(&errors)));
                    break;
                }
            }
        }
    }
    drop(job);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let contributors: Vec<PeerId> = ranked
        .iter()
        .filter(|p| p.delivered > 0)
        .map(|p| p.peer)
        .collect();
    let (sink, written) = writer.finish().await;
    let fail = |error: FetchError, sink: Option<S>| Failed {
        error,
        sink,
        contributors: contributors.clone(),
    };
    if let Some(error) = failure {
        return Err(fail(error, sink));
    }
    let actual = match written {
        Ok(actual) => actual,
        Err(e) => return Err(fail(e.into(), sink)),
    };
    let Some(sink) = sink else {
        return Err(fail(io::Error::other("blob writer lost").into(), None));
    };
    if next_to_write != total {
        return Err(fail(
            io::Error::other("blob writer stopped early").into(),
            Some(sink),
        ));
    }
    if actual.as_bytes() != hash.as_bytes() {
        let error = FetchError::HashMismatch {
            expected: hex::encode(hash.0),
            actual: actual.to_hex().to_string(),
        };
        return Err(fail(error, Some(sink)));
    }
    Ok((total, sink))
}

/// Learns the blob's length from the first provider that answers (a header-only range on a bulk stream,
/// or an empty chunk over request-response for providers without streams); that provider keeps its stream.
async fn probe(
    client: &Client,
    hash: ContentHash,
    ranked: &mut [Provider],
    errors: &mut HashMap<PeerId, String>,
    opts: &FetchOptions,
) -> Result<u64, FetchError> {
    for p in ranked.iter_mut() {
        let outcome = if opts.bulk_streams && !p.legacy {
            probe_stream(client, hash, p.peer, opts).await
        } else {
            Err(Fault::Unsupported)
        };
        let outcome = match outcome {
            Err(Fault::Unsupported) => {
                p.legacy = true;
                probe_chunk(client, hash, p.peer).await
            }
            other => other.map(|(total, stream)| {
                p.idle.push(stream);
                total
            }),
        };
        match outcome {
            Ok(total) => return Ok(total),
            Err(Fault::Stopped) => return Err(NetError::Closed.into()),
            Err(Fault::Drop(why)) => {
                p.dropped = true;
                errors.insert(p.peer, why);
            }
            Err(Fault::Strike(why)) => {
                p.strikes += 1;
                errors.insert(p.peer, why);
            }
            Err(Fault::Unsupported) => {
                p.dropped = true;
                errors.insert(p.peer, "speaks no fetch protocol".into());
            }
        }
    }
    Err(FetchError::NoProvider(joined(errors)))
}

async fn probe_stream(
    client: &Client,
    hash: ContentHash,
    peer: PeerId,
    opts: &FetchOptions,
) -> Result<(u64, RangeStream), Fault> {
    let timeout = opts.segment_timeout;
    let work = async {
        let mut stream = RangeStream::open(client, peer, opts.blob_lanes).await?;
        match stream
            .request(&RangeRequest {
                hash,
                offset: 0,
                len: 0,
            })
            .await?
        {
            RangeResponse::Range {
                hash: h,
                offset: 0,
                total_size,
                len: 0,
            } if h == hash => Ok((total_size, stream)),
            RangeResponse::Range { .. } => Err(Fault::Drop(
                "range header does not match the request".into(),
            )),
            RangeResponse::NotFound { .. } => Err(Fault::Drop("not found".into())),
            RangeResponse::Refused { reason } => Err(refusal(reason.as_str())),
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(Fault::Strike("no header in time".into())))
}

async fn probe_chunk(client: &Client, hash: ContentHash, peer: PeerId) -> Result<u64, Fault> {
    match client
        .request(
            peer,
            FetchRequest {
                hash,
                offset: 0,
                max_len: 0,
            },
        )
        .await?
    {
        FetchResponse::Chunk {
            hash: h,
            offset: 0,
            total_size,
            data,
        } if h == hash && data.0.is_empty() => Ok(total_size),
        FetchResponse::Chunk { .. } => Err(Fault::Drop("inconsistent chunk".into())),
        FetchResponse::NotFound { .. } => Err(Fault::Drop("not found".into())),
        FetchResponse::Refused { reason } => Err(refusal(reason.as_str())),
    }
}

fn joined(errors: &HashMap<PeerId, String>) -> String {
    let mut why: Vec<String> = errors.iter().map(|(p, e)| format!("{p}: {e}")).collect();
    why.sort();
    why.join("; ")
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Orders providers by their last ping round trip, fastest first; unmeasured ones go last.
async fn rank_by_rtt(client: &Client, providers: Vec<PeerId>) -> Result<Vec<PeerId>, NetError> {
    let snap = client.snapshot().await?;
    let rtt: HashMap<String, f64> = snap
        .peers
        .iter()
        .filter_map(|p| p.rtt_ms.map(|r| (p.peer_id.clone(), r)))
        .collect();
    let mut ranked: Vec<(f64, PeerId)> = providers
        .into_iter()
        .filter(|p| *p != client.local_peer_id())
        .map(|p| (rtt.get(&p.to_string()).copied().unwrap_or(f64::INFINITY), p))
        .collect();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut seen = std::collections::HashSet::new();
    ranked.retain(|(_, p)| seen.insert(*p));
    Ok(ranked.into_iter().map(|(_, peer)| peer).collect())
}
