//! Bulk blob streams (`/mana/blob/1.0.0`, [`BLOB_STREAM`]): the fast path of blob transfers. A fetcher opens
//! one long-lived stream per worker to a provider and asks it for ranges one after another; each answer is
//! a small header frame followed by the range's bytes, raw. So the bulk of a blob is never framed, decoded,
//! re-encoded to check canonicity or copied into a message: it goes from the provider's file to the stream,
//! and from the stream into the fetcher's buffer.
//!
//! On the wire, each frame is a 2-byte little-endian length then a protocol frame
//! ([`RangeRequest`]/[`RangeResponse`], at most [`MAX_RANGE_FRAME_BYTES`]). The fetcher sends a request;
//! the provider answers with a header and, after `Range`, exactly `len` bytes; the fetcher may then send the
//! next request on the same stream, or close it. Every frame length is checked before the frame is read.
//!
//! Serving ([`serve`]) caps the streams per peer and in all, and gives every wait a deadline (the next
//! request, each write of a piece), so a peer that opens streams and stalls holds at most its own share.
//! Bytes are counted in the swarm's [`TrafficCounters`] like fetch frames (`fetch_in`/`fetch_out`).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use mana_protocol::limits::{MAX_RANGE_BYTES, MAX_RANGE_FRAME_BYTES};
use mana_protocol::{ContentHash, RangeRequest, RangeResponse, Text};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::Client;
use super::error::{FrameTooLarge, NetError};
use super::lane::{self, SealedConn};
use super::traffic::TrafficCounters;

/// The protocol id of bulk blob streams.
pub const BLOB_STREAM: StreamProtocol = StreamProtocol::new(mana_protocol::BLOB_STREAM_PROTOCOL);

/// Bytes read from the file and written to the stream at once by a provider, and read from the stream at
/// once by a fetcher: large enough that per-piece costs vanish, small enough to double-buffer cheaply.
pub const PIECE_BYTES: usize = 1024 * 1024;

fn invalid(source: mana_protocol::ProtocolError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, source)
}

/// Writes one length-prefixed frame.
pub(super) async fn write_frame<W: futures::AsyncWrite + Unpin>(
    io: &mut W,
    frame: &[u8],
) -> io::Result<()> {
    let len =
        u16::try_from(frame.len()).map_err(|_| FrameTooLarge::into_io(MAX_RANGE_FRAME_BYTES))?;
    let mut buf = Vec::with_capacity(2 + frame.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(frame);
    io.write_all(&buf).await
}

/// Reads one length-prefixed frame; `None` when the stream ends cleanly before it. A length over
/// [`MAX_RANGE_FRAME_BYTES`] is refused before anything more is read.
pub(super) async fn read_frame<R: futures::AsyncRead + Unpin>(
    io: &mut R,
) -> io::Result<Option<Vec<u8>>> {
    let mut prefix = [0u8; 2];
    let n = io.read(&mut prefix).await?;
    if n == 0 {
        return Ok(None);
    }
    if n == 1 {
        io.read_exact(&mut prefix[1..]).await?;
    }
    let len = usize::from(u16::from_le_bytes(prefix));
    if len > MAX_RANGE_FRAME_BYTES {
        return Err(FrameTooLarge::into_io(MAX_RANGE_FRAME_BYTES));
    }
    let mut frame = vec![0u8; len];
    io.read_exact(&mut frame).await?;
    Ok(Some(frame))
}

/// How a [`RangeStream`] reaches its provider.
enum Io {
    /// A bulk stream on the libp2p connection (noise, yamux): range bytes raw after each header.
    Muxed(Stream),
    /// A blob lane (direct TCP, AES-256-GCM records; see [`super::lane`]).
    Lane(Box<SealedConn>),
}

/// The fetcher's end of one ranged connection to one provider (a blob lane when one can be set up, a bulk
/// stream otherwise): ranges are asked one at a time, and each range's bytes read in pieces before the
/// next is asked.
pub struct RangeStream {
    peer: PeerId,
    io: Io,
    traffic: Arc<TrafficCounters>,
    /// Bytes of the current range not read yet (a new request is refused until it is zero).
    unread: u64,
}

impl RangeStream {
    /// Opens a lane to `peer` when `lanes` is set and the peer can give one, else a bulk stream.
    /// [`NetError::StreamUnsupported`] when the peer has neither.
    pub async fn open(client: &Client, peer: PeerId, lanes: bool) -> Result<Self, NetError> {
        let io = match lanes {
            true => match lane::open(client, peer).await {
                Ok(conn) => Some(Io::Lane(Box::new(conn))),
                Err(NetError::Closed) => return Err(NetError::Closed),
                Err(e) => {
                    tracing::debug!(%peer, error = %super::error_chain(&e), "no blob lane; using a bulk stream");
                    None
                }
            },
            false => None,
        };
        let io = match io {
            Some(io) => io,
            None => Io::Muxed(client.open_blob_stream(peer).await?),
        };
        Ok(Self {
            peer,
            io,
            traffic: client.traffic_counters().clone(),
            unread: 0,
        })
    }

    /// The provider at the other end.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Whether this is a blob lane (not a bulk stream).
    pub fn is_lane(&self) -> bool {
        matches!(self.io, Io::Lane(_))
    }

    fn failed(&self, source: io::Error) -> NetError {
        NetError::Stream {
            peer: self.peer,
            source,
        }
    }

    /// Sends `request` and reads the provider's header. After a `Range` header, its `len` bytes must be
    /// read with [`RangeStream::read_body`] before the next request.
    pub async fn request(&mut self, request: &RangeRequest) -> Result<RangeResponse, NetError> {
        if self.unread != 0 {
            return Err(self.failed(io::Error::other(
                "the previous range was not read to its end",
            )));
        }
        let mut frame = request.encode().map_err(|e| self.failed(invalid(e)))?;
        self.traffic.add_fetch_out(frame.len() + 2);
        let frame = match &mut self.io {
            Io::Muxed(io) => {
                let sent = async {
                    write_frame(io, &frame).await?;
                    io.flush().await?;
                    read_frame(io).await
                };
                match sent.await {
                    Ok(Some(frame)) => frame,
                    Ok(None) => return Err(self.failed(io::ErrorKind::UnexpectedEof.into())),
                    Err(e) => return Err(self.failed(e)),
                }
            }
            Io::Lane(conn) => {
                let sent = async {
                    conn.send(&mut frame).await?;
                    conn.receive_frame().await
                };
                match sent.await {
                    Ok(frame) => frame,
                    Err(e) => return Err(self.failed(e)),
                }
            }
        };
        self.traffic.add_fetch_in(frame.len() + 2);
        let response = RangeResponse::decode(&frame).map_err(|e| self.failed(invalid(e)))?;
        if let RangeResponse::Range { len, .. } = response {
            self.unread = len;
        }
        Ok(response)
    }

    /// Fills `buf` with the next bytes of the current range (at most what is left of it).
    pub async fn read_body(&mut self, buf: &mut [u8]) -> Result<(), NetError> {
        if buf.len() as u64 > self.unread {
            return Err(self.failed(io::Error::other("read past the end of the range")));
        }
        let read = match &mut self.io {
            Io::Muxed(io) => io.read_exact(buf).await,
            Io::Lane(conn) => read_lane_body(conn, buf).await,
        };
        read.map_err(|e| self.failed(e))?;
        self.unread -= buf.len() as u64;
        self.traffic.add_fetch_in(buf.len());
        Ok(())
    }
}

/// Fills `buf` from a lane's body records (a record may end inside `buf`, or hold more than it).
async fn read_lane_body(conn: &mut SealedConn, buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match conn.receive_into(&mut buf[filled..]).await? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "an empty record inside a range",
                ));
            }
            n => filled += n,
        }
    }
    Ok(())
}

/// One blob opened for serving ranges. `read_at` is blocking: it runs on a blocking thread.
pub trait RangeRead: Send + Sync + 'static {
    /// The blob's length in bytes.
    fn len(&self) -> u64;
    /// Whether the blob is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` with the blob's bytes from `offset` (the caller keeps `offset + buf.len()` in bounds).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Where a provider's blobs come from (the node's store); the net layer stays free of storage.
pub trait BlobSource: Send + Sync + 'static {
    /// Opens blob `hash` for range reads, or `None` when this node does not hold it.
    fn open(
        &self,
        hash: ContentHash,
    ) -> impl Future<Output = io::Result<Option<Arc<dyn RangeRead>>>> + Send;

    /// Whether a range of blob `hash` (`len` bytes from `offset`) may be served to `peer` now. A refused one
    /// is answered [`super::fetch::SPREAD`] and the fetcher takes it from another holder: a node that
    /// everyone asks for the same blob at once (the coordinator, for its parcels) serves a few copies and
    /// lets them spread. Every range is served by default.
    fn admit(&self, peer: &PeerId, hash: &ContentHash, offset: u64, len: u64) -> bool {
        let _ = (peer, hash, offset, len);
        true
    }
}

/// How much a provider lets peers take.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// Inbound bulk streams open at once, from all peers; more are reset at once.
    pub max_streams: usize,
    /// Inbound bulk streams open at once from one peer.
    pub max_streams_per_peer: usize,
    /// How long a stream may sit between requests, and how long one piece may take to be written (a
    /// fetcher that stops reading loses its stream).
    pub stall_timeout: Duration,
    /// Where blob lanes are served (port 0: one the OS picks), or `None` for bulk streams only. A lane
    /// holds one of the stream slots above.
    pub lane: Option<std::net::SocketAddr>,
}

/// Counts open inbound streams, in all and per peer.
#[derive(Default)]
struct StreamCount {
    total: usize,
    per_peer: HashMap<PeerId, usize>,
}

/// Holds a counted slot; gives it back when the stream ends.
struct Slot {
    peer: PeerId,
    count: Arc<Mutex<StreamCount>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        count.total = count.total.saturating_sub(1);
        if let Some(n) = count.per_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                count.per_peer.remove(&self.peer);
            }
        }
    }
}

fn take_slot(count: &Arc<Mutex<StreamCount>>, peer: PeerId, limits: &ServeLimits) -> Option<Slot> {
    let mut c = count.lock().unwrap_or_else(|p| p.into_inner());
    let mine = c.per_peer.get(&peer).copied().unwrap_or(0);
    if c.total >= limits.max_streams || mine >= limits.max_streams_per_peer {
        return None;
    }
    c.total += 1;
    c.per_peer.insert(peer, mine + 1);
    Some(Slot {
        peer,
        count: count.clone(),
    })
}

/// Where the serving tasks run, so that their owner can stop them and wait for them: each stream's task is
/// spawned on `tasks` and ends when `cancel` is cancelled (the node's shutdown).
#[derive(Clone)]
pub struct ServeTasks {
    /// The tracker every stream task is spawned on.
    pub tasks: TaskTracker,
    /// Cancelled to stop every stream task at its next await point.
    pub cancel: CancellationToken,
}

/// Starts accepting inbound bulk streams on `client`'s swarm and returns the future that serves them from
/// `source` (spawn it; it runs until the swarm stops). Each stream runs in its own task on `run`; one over
/// the limits is dropped at once (the peer sees it reset). Fails if streams are already accepted on this
/// swarm.
pub fn serve<S: BlobSource>(
    client: &Client,
    source: Arc<S>,
    limits: ServeLimits,
    run: ServeTasks,
) -> Result<impl Future<Output = ()> + Send + 'static, NetError> {
    let incoming = client.accept_blob_streams()?;
    let count = Arc::new(Mutex::new(StreamCount::default()));
    let traffic = client.traffic_counters().clone();
    let lanes = match limits.lane {
        None => None,
        Some(addr) => match lane::bind(addr) {
            Ok(listener) => Some((listener, client.accept_lane_streams()?)),
            Err(e) => {
                tracing::warn!(%addr, error = %e, "blob lanes not served: the lane port could not be bound; peers use bulk streams");
                None
            }
        },
    };
    let streams = serve_incoming(
        incoming,
        source.clone(),
        limits.clone(),
        traffic.clone(),
        run.clone(),
        count.clone(),
    );
    Ok(async move {
        match lanes {
            None => streams.await,
            Some((listener, setups)) => {
                let lanes = serve_lanes(listener, setups, source, limits, traffic, run, count);
                futures::join!(streams, lanes);
            }
        }
    })
}

/// A stream slot for a new lane, after the expired tickets gave theirs back.
fn take_fresh_slot(
    tickets: &lane::Tickets<Slot>,
    count: &Arc<Mutex<StreamCount>>,
    peer: PeerId,
    limits: &ServeLimits,
) -> Option<Slot> {
    tickets.prune();
    take_slot(count, peer, limits)
}

/// Serves blob lanes: setup streams issue tickets (each holding a stream slot), the lane port redeems them
/// and serves the lane's ranges like a stream's. Ends when `run` is cancelled.
async fn serve_lanes<S: BlobSource>(
    listener: tokio::net::TcpListener,
    mut setups: super::streams::Incoming,
    source: Arc<S>,
    limits: ServeLimits,
    traffic: Arc<TrafficCounters>,
    run: ServeTasks,
    count: Arc<Mutex<StreamCount>>,
) {
    let port = match listener.local_addr() {
        Ok(addr) => addr.port(),
        Err(e) => {
            tracing::warn!(error = %e, "blob lanes not served: the lane port is unknown");
            return;
        }
    };
    tracing::debug!(port, "serving blob lanes");
    let tickets = Arc::new(lane::Tickets::<Slot>::new(port));
    let issue = {
        let (tickets, limits, run) = (tickets.clone(), limits.clone(), run.clone());
        async move {
            while let Some((peer, mut stream)) = setups.next().await {
                let (tickets, count, limits) = (tickets.clone(), count.clone(), limits.clone());
                let cancel = run.cancel.clone();
                run.tasks.spawn(async move {
                    let setup = async {
                        let frame = read_frame(&mut stream)
                            .await?
                            .ok_or(io::ErrorKind::UnexpectedEof)?;
                        let response = match mana_protocol::LaneRequest::decode(&frame) {
                            Err(e) => return Err(invalid(e)),
                            Ok(request) => match take_fresh_slot(&tickets, &count, peer, &limits) {
                                Some(slot) => tickets.issue(peer, &request, slot),
                                None => lane::refused("busy"),
                            },
                        };
                        let frame = response.encode().map_err(invalid)?;
                        write_frame(&mut stream, &frame).await?;
                        stream.close().await
                    };
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        done = tokio::time::timeout(limits.stall_timeout, setup) => match done {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "lane setup failed"),
                            Err(_) => tracing::debug!(%peer, "lane setup timed out"),
                        },
                    }
                });
            }
        }
    };
    let stall = limits.stall_timeout;
    let serve = move |peer: PeerId, conn: SealedConn, slot: Slot| {
        let (source, limits, traffic) = (source.clone(), limits.clone(), traffic.clone());
        async move {
            let _slot = slot;
            if let Err(e) = serve_ranges(peer, conn, source.as_ref(), &limits, &traffic).await {
                tracing::debug!(%peer, error = %e, "blob lane ended with an error");
            }
        }
    };
    let cancel = run.cancel.clone();
    let accept = lane::accept(
        listener,
        tickets.clone(),
        stall,
        &run.tasks,
        cancel.clone(),
        serve,
    );
    let prune = async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            tickets.prune();
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = futures::future::join3(issue, accept, prune) => {}
    }
}

async fn serve_incoming<S: BlobSource>(
    mut incoming: super::streams::Incoming,
    source: Arc<S>,
    limits: ServeLimits,
    traffic: Arc<TrafficCounters>,
    run: ServeTasks,
    count: Arc<Mutex<StreamCount>>,
) {
    while let Some((peer, stream)) = incoming.next().await {
        let Some(slot) = take_slot(&count, peer, &limits) else {
            tracing::debug!(%peer, "bulk stream refused: over the stream limits");
            continue;
        };
        let (source, limits, traffic, cancel) = (
            source.clone(),
            limits.clone(),
            traffic.clone(),
            run.cancel.clone(),
        );
        run.tasks.spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = cancel.cancelled() => {}
                served = serve_ranges(peer, stream, source.as_ref(), &limits, &traffic) => {
                    if let Err(e) = served {
                        tracing::debug!(%peer, error = %e, "bulk stream ended with an error");
                    }
                }
            }
        });
    }
}

/// The provider's end of a ranged connection: a bulk stream or a blob lane. Both carry the same requests
/// and answers; they differ in how frames and range bytes are put on the wire.
trait ServeIo: Send {
    /// The next request frame; `None` when the fetcher closed the connection cleanly.
    fn next_request(&mut self) -> impl Future<Output = io::Result<Option<Vec<u8>>>> + Send;
    /// Sends a header frame.
    fn send_header(&mut self, frame: Vec<u8>) -> impl Future<Output = io::Result<()>> + Send;
    /// Sends a piece of a range (the buffer's contents may be overwritten).
    fn send_piece(&mut self, piece: &mut Vec<u8>) -> impl Future<Output = io::Result<()>> + Send;
    /// Pushes out what is buffered at the end of a range.
    fn end_range(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

impl ServeIo for Stream {
    async fn next_request(&mut self) -> io::Result<Option<Vec<u8>>> {
        read_frame(self).await
    }
    async fn send_header(&mut self, frame: Vec<u8>) -> io::Result<()> {
        write_frame(self, &frame).await?;
        AsyncWriteExt::flush(self).await
    }
    async fn send_piece(&mut self, piece: &mut Vec<u8>) -> io::Result<()> {
        self.write_all(piece).await
    }
    async fn end_range(&mut self) -> io::Result<()> {
        AsyncWriteExt::flush(self).await
    }
}

impl ServeIo for SealedConn {
    async fn next_request(&mut self) -> io::Result<Option<Vec<u8>>> {
        match self.receive_frame().await {
            Ok(frame) => Ok(Some(frame)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && self.pending().is_empty() => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
    async fn send_header(&mut self, mut frame: Vec<u8>) -> io::Result<()> {
        self.send(&mut frame).await
    }
    async fn send_piece(&mut self, piece: &mut Vec<u8>) -> io::Result<()> {
        self.send(piece).await
    }
    async fn end_range(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Answers the requests of one connection in turn, until the fetcher closes it or stalls.
async fn serve_ranges<S: BlobSource, I: ServeIo>(
    peer: PeerId,
    mut io: I,
    source: &S,
    limits: &ServeLimits,
    traffic: &TrafficCounters,
) -> io::Result<()> {
    let stall = limits.stall_timeout;
    let timed_out = || io::Error::from(io::ErrorKind::TimedOut);
    loop {
        let frame = match tokio::time::timeout(stall, io.next_request()).await {
            Err(_) => return Err(timed_out()),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(frame))) => frame,
            Ok(Err(e)) => return Err(e),
        };
        traffic.add_fetch_in(frame.len() + 2);
        let request = match RangeRequest::decode(&frame) {
            Ok(request) => request,
            Err(e) => {
                respond(&mut io, &refused("bad request"), traffic).await?;
                return Err(invalid(e));
            }
        };
        if !source.admit(&peer, &request.hash, request.offset, request.len) {
            respond(&mut io, &refused(super::fetch::SPREAD), traffic).await?;
            continue;
        }
        let blob = match source.open(request.hash).await {
            Ok(Some(blob)) => blob,
            Ok(None) => {
                respond(
                    &mut io,
                    &RangeResponse::NotFound { hash: request.hash },
                    traffic,
                )
                .await?;
                continue;
            }
            Err(e) => {
                tracing::warn!(hash = %request.hash, error = %e, "blob could not be opened for a bulk stream");
                respond(&mut io, &refused("store error"), traffic).await?;
                continue;
            }
        };
        let total_size = blob.len();
        if request.offset > total_size {
            respond(&mut io, &refused("offset past the end"), traffic).await?;
            continue;
        }
        let len = request
            .len
            .min(MAX_RANGE_BYTES)
            .min(total_size - request.offset);
        let header = RangeResponse::Range {
            hash: request.hash,
            offset: request.offset,
            total_size,
            len,
        };
        respond(&mut io, &header, traffic).await?;
        send_range(&mut io, blob, request.offset, len, stall, traffic).await?;
    }
}

fn refused(reason: &str) -> RangeResponse {
    RangeResponse::Refused {
        reason: Text::new(reason).expect("reasons are short constants"),
    }
}

async fn respond<I: ServeIo>(
    io: &mut I,
    response: &RangeResponse,
    traffic: &TrafficCounters,
) -> io::Result<()> {
    let frame = response.encode().map_err(invalid)?;
    traffic.add_fetch_out(frame.len() + 2);
    io.send_header(frame).await
}

/// Reads one piece on a blocking thread, into `buf` (resized to `len`), and hands the buffer back.
fn read_piece(
    blob: Arc<dyn RangeRead>,
    offset: u64,
    len: usize,
    mut buf: Vec<u8>,
) -> tokio::task::JoinHandle<io::Result<Vec<u8>>> {
    tokio::task::spawn_blocking(move || {
        buf.resize(len, 0);
        blob.read_at(offset, &mut buf)?;
        Ok(buf)
    })
}

/// Sends bytes `offset..offset + len` of `blob`: the next piece is read from the file while the current
/// one is sent.
async fn send_range<I: ServeIo>(
    io: &mut I,
    blob: Arc<dyn RangeRead>,
    offset: u64,
    len: u64,
    stall: Duration,
    traffic: &TrafficCounters,
) -> io::Result<()> {
    let piece = |at: u64| (len - at).min(PIECE_BYTES as u64) as usize;
    let mut spare = Some(Vec::with_capacity(PIECE_BYTES + 16));
    let mut sent = 0u64;
    let mut next = (len > 0).then(|| {
        read_piece(
            blob.clone(),
            offset,
            piece(0),
            Vec::with_capacity(PIECE_BYTES + 16),
        )
    });
    while let Some(reading) = next.take() {
        let mut buf = reading.await.map_err(io::Error::other)??;
        let n = buf.len();
        let after = sent + n as u64;
        if after < len {
            let spare = spare.take().unwrap_or_default();
            next = Some(read_piece(
                blob.clone(),
                offset + after,
                piece(after),
                spare,
            ));
        }
        match tokio::time::timeout(stall, io.send_piece(&mut buf)).await {
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            Ok(result) => result?,
        }
        traffic.add_fetch_out(n);
        sent = after;
        spare = Some(buf);
    }
    io.end_range().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    #[test]
    fn frames_roundtrip_and_oversized_lengths_are_refused_unread() {
        let frame = RangeRequest {
            hash: ContentHash([1; 32]),
            offset: 5,
            len: 7,
        }
        .encode()
        .expect("encodable");
        let mut wire = futures::io::Cursor::new(Vec::new());
        block_on(write_frame(&mut wire, &frame)).expect("written");
        block_on(write_frame(&mut wire, &frame)).expect("written");
        let mut rd = futures::io::Cursor::new(wire.into_inner());
        for _ in 0..2 {
            let got = block_on(read_frame(&mut rd))
                .expect("read")
                .expect("a frame");
            assert_eq!(got, frame);
        }
        assert!(block_on(read_frame(&mut rd)).expect("clean end").is_none());

        let over = (MAX_RANGE_FRAME_BYTES as u16 + 1).to_le_bytes();
        let err = block_on(read_frame(&mut futures::io::Cursor::new(over.to_vec())))
            .expect_err("too long");
        assert_eq!(
            super::super::error::io_kind(&err),
            super::super::FailureKind::TooLarge
        );
        let cut = [4u8, 0, 1, 2];
        assert!(
            block_on(read_frame(&mut futures::io::Cursor::new(cut.to_vec()))).is_err(),
            "truncated frame"
        );
    }

    #[test]
    fn slots_are_capped_per_peer_and_in_all_and_given_back() {
        let limits = ServeLimits {
            max_streams: 3,
            max_streams_per_peer: 2,
            stall_timeout: Duration::from_secs(1),
            lane: None,
        };
        let count = Arc::new(Mutex::new(StreamCount::default()));
        let (a, b) = (PeerId::random(), PeerId::random());
        let a1 = take_slot(&count, a, &limits).expect("first");
        let _a2 = take_slot(&count, a, &limits).expect("second");
        assert!(take_slot(&count, a, &limits).is_none(), "two per peer");
        let _b1 = take_slot(&count, b, &limits).expect("another peer");
        assert!(take_slot(&count, b, &limits).is_none(), "three in all");
        drop(a1);
        assert!(
            take_slot(&count, b, &limits).is_some(),
            "a freed slot is reusable"
        );
    }
}
