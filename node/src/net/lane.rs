//! Blob lanes: the fastest path of blob transfers. A lane is a direct TCP connection between a fetcher and
//! a provider that carries the same ranges as a bulk stream ([`super::bulk`]), each record sealed with
//! AES-256-GCM. On CPUs with AES instructions that cipher costs about a third of the ChaCha20-Poly1305 that
//! libp2p's noise uses for every connection (measured in `tests/net_bench.rs`), and a lane skips yamux's
//! 16 KiB frames, so a transfer is no longer bound by the connection's cipher.
//!
//! A lane is set up over an authenticated, encrypted libp2p stream ([`BLOB_LANE`]): the fetcher sends a
//! random key share ([`LaneRequest`]); the provider answers with its own share, a one-time ticket and its
//! lane port ([`LaneResponse`]). The fetcher connects to that port at the address its libp2p connection
//! to the provider came from and sends the ticket in clear; the provider sends an empty sealed record, which
//! only the holder of both shares can open: the lane is then as authenticated as the libp2p connection.
//! Each direction has its own key (blake3 `derive_key` of the ticket and both shares) and a record counter as
//! its nonce, so records cannot be replayed, reordered or moved between lanes or directions.
//!
//! Records are a 4-byte little-endian length, then that many bytes of ciphertext and tag; a record carries
//! at most [`MAX_RECORD_PLAINTEXT`] bytes. The fetcher's records are [`mana_protocol::RangeRequest`]
//! frames; the provider answers each with a [`mana_protocol::RangeResponse`] frame in one record and, after
//! `Range`, the range's bytes in records of their own. A lane that cannot be set up (no lane port, a
//! firewall, a relayed connection) costs one attempt: the fetcher uses a bulk stream instead and does not
//! try that provider's lane again for [`LANE_RETRY_AFTER`].

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::AsyncWriteExt;
use libp2p::{PeerId, StreamProtocol};
use mana_protocol::{LaneRequest, LaneResponse, Text};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::bulk::PIECE_BYTES;
use super::client::Client;
use super::error::NetError;

/// The protocol id of blob lane setup streams.
pub const BLOB_LANE: StreamProtocol = StreamProtocol::new(mana_protocol::BLOB_LANE_PROTOCOL);

/// Most plaintext bytes in one lane record (a piece of a range).
pub const MAX_RECORD_PLAINTEXT: usize = PIECE_BYTES;

/// Bytes of an AES-GCM tag.
const TAG_BYTES: usize = 16;

/// How long a ticket stays good after the provider issues it.
pub const TICKET_TTL: Duration = Duration::from_secs(10);

/// How long a fetcher waits for the lane's TCP connection and its first record.
pub const LANE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a fetcher uses bulk streams with a provider whose lane could not be set up.
pub const LANE_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Unauthenticated TCP connections (waiting for their ticket) a provider holds at once; more are closed.
const MAX_PENDING_LANES: usize = 32;

/// How long a provider waits for a new lane connection's ticket (an honest fetcher sends it at once).
const TICKET_WAIT: Duration = Duration::from_secs(5);

/// Key-derivation contexts (blake3 `derive_key`), one per direction.
const FETCHER_TO_PROVIDER: &str = "mana 2026-12 blob lane v1 fetcher to provider";
const PROVIDER_TO_FETCHER: &str = "mana 2026-12 blob lane v1 provider to fetcher";

/// Which end of a lane this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Asks for ranges.
    Fetcher,
    /// Serves them.
    Provider,
}

/// The two keys of a lane, from the ticket and both shares.
fn keys(
    side: Side,
    ticket: &[u8; 16],
    fetcher_share: &[u8; 32],
    provider_share: &[u8; 32],
) -> (LessSafeKey, LessSafeKey) {
    let mut material = [0u8; 80];
    material[..16].copy_from_slice(ticket);
    material[16..48].copy_from_slice(fetcher_share);
    material[48..].copy_from_slice(provider_share);
    let key = |context: &str| {
        let bytes = blake3::derive_key(context, &material);
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).expect("a 32-byte AES-256 key"))
    };
    let (f2p, p2f) = (key(FETCHER_TO_PROVIDER), key(PROVIDER_TO_FETCHER));
    match side {
        Side::Fetcher => (f2p, p2f),
        Side::Provider => (p2f, f2p),
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(bytes)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// One end of an open lane: sealed records over a TCP connection.
pub struct SealedConn {
    tcp: TcpStream,
    seal: LessSafeKey,
    open: LessSafeKey,
    sent: u64,
    received: u64,
    /// The last record read, opened in place; `plain` is the part of it not consumed yet.
    record: Vec<u8>,
    plain: std::ops::Range<usize>,
}

impl SealedConn {
    fn new(tcp: TcpStream, side: Side, ticket: &[u8; 16], f: &[u8; 32], p: &[u8; 32]) -> Self {
        let (seal, open) = keys(side, ticket, f, p);
        Self {
            tcp,
            seal,
            open,
            sent: 0,
            received: 0,
            record: vec![0u8; MAX_RECORD_PLAINTEXT + TAG_BYTES],
            plain: 0..0,
        }
    }

    /// Seals `buf` in place (its contents are ciphertext afterwards) and sends it as one record.
    pub async fn send(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        if buf.len() > MAX_RECORD_PLAINTEXT {
            return Err(invalid("lane record too large to send"));
        }
        let counter = self.sent;
        self.sent = self
            .sent
            .checked_add(1)
            .ok_or_else(|| invalid("lane nonce exhausted"))?;
        let tag = self
            .seal
            .seal_in_place_separate_tag(nonce(counter), Aad::empty(), buf)
            .map_err(|_| invalid("lane record not sealed"))?;
        buf.extend_from_slice(tag.as_ref());
        let prefix = (buf.len() as u32).to_le_bytes();
        self.tcp.write_all(&prefix).await?;
        self.tcp.write_all(buf).await
    }

    /// Reads and opens the next record; its plaintext becomes [`SealedConn::pending`]. A record that is too
    /// long, too short or not authentic ends the lane with an error.
    pub async fn receive(&mut self) -> io::Result<()> {
        let len = self.read_len().await?;
        self.read_record(len).await
    }

    /// Reads the next record's length (ciphertext and tag), refused out of bounds before anything more is
    /// read.
    async fn read_len(&mut self) -> io::Result<usize> {
        let mut prefix = [0u8; 4];
        self.tcp.read_exact(&mut prefix).await?;
        let len = u32::from_le_bytes(prefix) as usize;
        if !(TAG_BYTES..=MAX_RECORD_PLAINTEXT + TAG_BYTES).contains(&len) {
            return Err(invalid("lane record length out of bounds"));
        }
        Ok(len)
    }

    /// Fills the front of `out` from the lane: first from the pending plaintext, else from the next record,
    /// opened straight into `out` when it fits (no copy), through the record buffer when it does not.
    /// Returns how many bytes were written (0 only for an empty record).
    pub async fn receive_into(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pending().is_empty() {
            let len = self.read_len().await?;
            let plain = len - TAG_BYTES;
            if plain <= out.len() {
                let mut tag = [0u8; TAG_BYTES];
                self.tcp.read_exact(&mut out[..plain]).await?;
                self.tcp.read_exact(&mut tag).await?;
                let counter = self.next_received()?;
                self.open
                    .open_in_place_separate_tag(
                        nonce(counter),
                        Aad::empty(),
                        Tag::from(tag),
                        &mut out[..plain],
                        0..,
                    )
                    .map_err(|_| invalid("lane record not authentic"))?;
                return Ok(plain);
            }
            self.read_record(len).await?;
        }
        let n = self.pending().len().min(out.len());
        out[..n].copy_from_slice(&self.pending()[..n]);
        self.consume(n);
        Ok(n)
    }

    fn next_received(&mut self) -> io::Result<u64> {
        let counter = self.received;
        self.received = self
            .received
            .checked_add(1)
            .ok_or_else(|| invalid("lane nonce exhausted"))?;
        Ok(counter)
    }

    /// Reads the `len` bytes of a record into the record buffer and opens them there.
    async fn read_record(&mut self, len: usize) -> io::Result<()> {
        self.tcp.read_exact(&mut self.record[..len]).await?;
        let counter = self.next_received()?;
        let record = &mut self.record[..len];
        let plain = self
            .open
            .open_in_place(nonce(counter), Aad::empty(), record)
            .map_err(|_| invalid("lane record not authentic"))?;
        self.plain = 0..plain.len();
        Ok(())
    }

    /// The plaintext of the last record not consumed yet.
    pub fn pending(&self) -> &[u8] {
        &self.record[self.plain.clone()]
    }

    /// Marks `n` bytes of [`SealedConn::pending`] consumed.
    pub fn consume(&mut self, n: usize) {
        self.plain.start = (self.plain.start + n).min(self.plain.end);
    }

    /// Reads one whole record and returns its plaintext (a header frame); pending bytes are an error.
    pub async fn receive_frame(&mut self) -> io::Result<Vec<u8>> {
        if !self.pending().is_empty() {
            return Err(invalid("unread bytes before a lane frame"));
        }
        self.receive().await?;
        let frame = self.pending().to_vec();
        self.consume(frame.len());
        Ok(frame)
    }
}

/// Lanes a fetcher could not set up recently, so that it does not try them on every segment.
#[derive(Default)]
pub struct LaneFailures(Mutex<HashMap<PeerId, Instant>>);

impl LaneFailures {
    fn recently_failed(&self, peer: &PeerId) -> bool {
        let mut failed = self.0.lock().unwrap_or_else(|p| p.into_inner());
        failed.retain(|_, at| at.elapsed() < LANE_RETRY_AFTER);
        failed.contains_key(peer)
    }

    fn note(&self, peer: PeerId) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, Instant::now());
    }
}

/// Opens a lane to `peer`, or says why not (the caller then opens a bulk stream). A provider that refuses or
/// cannot be reached is not tried again for [`LANE_RETRY_AFTER`].
pub async fn open(client: &Client, peer: PeerId) -> Result<SealedConn, NetError> {
    let failures = client.lane_failures();
    if failures.recently_failed(&peer) {
        return Err(NetError::LaneUnavailable {
            peer,
            why: "its lane failed recently".into(),
        });
    }
    let result = tokio::time::timeout(LANE_CONNECT_TIMEOUT, open_now(client, peer))
        .await
        .unwrap_or_else(|_| {
            Err(NetError::LaneUnavailable {
                peer,
                why: format!("not open in {LANE_CONNECT_TIMEOUT:?}"),
            })
        });
    // Remembered: the peer has no lanes, or its lane port cannot be reached from here. Not remembered: a
    // refusal (busy) or a setup stream lost with its connection, which the next attempt may not meet.
    let lasting = match &result {
        Err(NetError::StreamUnsupported { .. }) => true,
        Err(NetError::LaneUnavailable { why, .. }) => !why.starts_with(REFUSED),
        _ => false,
    };
    if lasting {
        failures.note(peer);
    }
    result
}

/// How a [`NetError::LaneUnavailable`] for a provider's refusal starts.
const REFUSED: &str = "refused: ";

async fn open_now(client: &Client, peer: PeerId) -> Result<SealedConn, NetError> {
    let unavailable = |why: String| NetError::LaneUnavailable { peer, why };
    // The setup stream first: it dials the peer if needed, so its connection's address is known after.
    let mut setup = client.open_lane_stream(peer).await?;
    let share: [u8; 32] = random_bytes();
    let failed = |source: io::Error| NetError::Stream { peer, source };
    let frame = LaneRequest { share }
        .encode()
        .map_err(|e| failed(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    super::bulk::write_frame(&mut setup, &frame)
        .await
        .map_err(failed)?;
    setup.flush().await.map_err(failed)?;
    let frame = super::bulk::read_frame(&mut setup)
        .await
        .map_err(failed)?
        .ok_or_else(|| failed(io::ErrorKind::UnexpectedEof.into()))?;
    let _ = setup.close().await;
    let Some(ip) = client.remote_ip(&peer) else {
        return Err(unavailable("no direct connection (relayed)".into()));
    };
    let (port, ticket, provider_share) = match LaneResponse::decode(&frame)
        .map_err(|e| failed(io::Error::new(io::ErrorKind::InvalidData, e)))?
    {
        LaneResponse::Open {
            port,
            ticket,
            share,
        } => (port, ticket, share),
        LaneResponse::Refused { reason } => return Err(unavailable(format!("{REFUSED}{reason}"))),
    };
    let addr = SocketAddr::new(ip, port);
    let mut tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| unavailable(format!("{addr}: {e}")))?;
    tcp.set_nodelay(true).map_err(failed)?;
    tcp.write_all(&ticket).await.map_err(failed)?;
    let mut conn = SealedConn::new(tcp, Side::Fetcher, &ticket, &share, &provider_share);
    conn.receive().await.map_err(failed)?;
    if !conn.pending().is_empty() {
        return Err(failed(invalid("the lane's first record is not empty")));
    }
    Ok(conn)
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS random source");
    bytes
}

/// A ticket issued and not used yet.
struct Ticket<S> {
    peer: PeerId,
    fetcher_share: [u8; 32],
    provider_share: [u8; 32],
    issued: Instant,
    /// What the lane holds while it is open (the provider's stream slot).
    slot: S,
}

/// The provider's tickets, issued on setup streams and redeemed on the lane port.
pub struct Tickets<S> {
    port: u16,
    issued: Mutex<HashMap<[u8; 16], Ticket<S>>>,
}

impl<S> Tickets<S> {
    /// The tickets of lanes served on `port`.
    pub fn new(port: u16) -> Self {
        Self {
            port,
            issued: Mutex::new(HashMap::new()),
        }
    }

    /// Drops the tickets that expired unused, and the slots they held. Called before every new ticket and
    /// once a second, so a peer that asks for tickets and never comes holds slots for [`TICKET_TTL`] at most.
    pub fn prune(&self) {
        self.issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, t| t.issued.elapsed() < TICKET_TTL);
    }

    /// Answers a setup request from `peer` holding `slot` for the lane: a fresh ticket and share.
    pub fn issue(&self, peer: PeerId, request: &LaneRequest, slot: S) -> LaneResponse {
        let (ticket, share) = (random_bytes::<16>(), random_bytes::<32>());
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        issued.retain(|_, t| t.issued.elapsed() < TICKET_TTL);
        issued.insert(
            ticket,
            Ticket {
                peer,
                fetcher_share: request.share,
                provider_share: share,
                issued: Instant::now(),
                slot,
            },
        );
        LaneResponse::Open {
            port: self.port,
            ticket,
            share,
        }
    }

    /// Redeems `ticket` once: the peer, the lane's connection and the slot, or `None` when it is unknown or
    /// expired.
    fn redeem(&self, ticket: &[u8; 16], tcp: TcpStream) -> Option<(PeerId, SealedConn, S)> {
        let t = self
            .issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(ticket)?;
        if t.issued.elapsed() >= TICKET_TTL {
            return None;
        }
        let conn = SealedConn::new(
            tcp,
            Side::Provider,
            ticket,
            &t.fetcher_share,
            &t.provider_share,
        );
        Some((t.peer, conn, t.slot))
    }
}

/// A refusal of a lane setup.
pub fn refused(reason: &str) -> LaneResponse {
    LaneResponse::Refused {
        reason: Text::new(reason).expect("reasons are short constants"),
    }
}

/// Binds the provider's lane port at `addr`.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Accepts lane connections until cancelled: each must send a good ticket within [`TICKET_WAIT`] (or `stall`
/// if shorter), then gets an empty sealed record and is handed to `serve` with its peer and slot. At most
/// [`MAX_PENDING_LANES`] wait for their ticket at once, so idle connections can hold off lanes for seconds
/// at most, and never bulk streams.
pub async fn accept<S, F, Fut>(
    listener: TcpListener,
    tickets: Arc<Tickets<S>>,
    stall: Duration,
    tasks: &tokio_util::task::TaskTracker,
    cancel: tokio_util::sync::CancellationToken,
    serve: F,
) where
    S: Send + 'static,
    F: Fn(PeerId, SealedConn, S) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_LANES));
    loop {
        let (mut tcp, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "lane accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            tracing::debug!(%from, "lane connection closed: too many waiting for their ticket");
            continue;
        };
        let (tickets, serve, cancel) = (tickets.clone(), serve.clone(), cancel.clone());
        tasks.spawn(async move {
            let lane = async {
                let mut ticket = [0u8; 16];
                let wait = TICKET_WAIT.min(stall);
                let read = tokio::time::timeout(wait, tcp.read_exact(&mut ticket)).await;
                if !matches!(read, Ok(Ok(_))) {
                    return;
                }
                let _ = tcp.set_nodelay(true);
                let Some((peer, mut conn, slot)) = tickets.redeem(&ticket, tcp) else {
                    tracing::debug!(%from, "lane connection closed: unknown or expired ticket");
                    return;
                };
                drop(permit);
                if conn.send(&mut Vec::new()).await.is_ok() {
                    serve(peer, conn, slot).await;
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = lane => {}
            }
        });
    }
}

/// The IP address a peer's direct connection came from (none for relayed connections), kept by the event
/// loop for the lanes.
#[derive(Default)]
pub struct RemoteIps(Mutex<HashMap<PeerId, IpAddr>>);

impl RemoteIps {
    /// Notes the address of a new connection to `peer`.
    pub fn connected(&self, peer: PeerId, addr: &libp2p::Multiaddr) {
        use libp2p::multiaddr::Protocol;
        if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
            return;
        }
        let ip = addr.iter().find_map(|p| match p {
            Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
            Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
            _ => None,
        });
        if let Some(ip) = ip {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(peer, ip);
        }
    }

    /// Forgets `peer` when its last connection closed.
    pub fn disconnected(&self, peer: &PeerId) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer);
    }

    /// The IP of `peer`'s direct connection.
    pub fn get(&self, peer: &PeerId) -> Option<IpAddr> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (SealedConn, SealedConn) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (a, (b, _)) = (a.expect("connect"), b.expect("accept"));
        let (t, f, p) = ([1u8; 16], [2u8; 32], [3u8; 32]);
        (
            SealedConn::new(a, Side::Fetcher, &t, &f, &p),
            SealedConn::new(b, Side::Provider, &t, &f, &p),
        )
    }

    #[tokio::test]
    async fn records_roundtrip_both_ways_and_empty_records_are_records() {
        let (mut fetcher, mut provider) = pair().await;
        for n in [0usize, 1, 1000, MAX_RECORD_PLAINTEXT] {
            let plain: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let mut buf = plain.clone();
            provider.send(&mut buf).await.expect("sent");
            fetcher.receive().await.expect("received");
            assert_eq!(fetcher.pending(), &plain[..]);
            fetcher.consume(n);
            let mut buf = plain.clone();
            fetcher.send(&mut buf).await.expect("sent");
            assert_eq!(provider.receive_frame().await.expect("received"), plain);
        }
        let mut big = vec![0u8; MAX_RECORD_PLAINTEXT + 1];
        assert!(provider.send(&mut big).await.is_err(), "too large to send");
    }

    #[tokio::test]
    async fn records_open_straight_into_the_reader_or_through_the_buffer() {
        let (mut fetcher, mut provider) = pair().await;
        let plain: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        for piece in [&plain[..3000], &plain[3000..]] {
            provider.send(&mut piece.to_vec()).await.expect("sent");
        }
        // 4000 bytes asked: the first record (3000) opens in place, then the second (2000) does not fit in
        // the 1000 left, so it goes through the buffer and its rest comes out of it.
        let mut out = vec![0u8; 4000];
        assert_eq!(fetcher.receive_into(&mut out).await.expect("read"), 3000);
        assert_eq!(
            fetcher.receive_into(&mut out[3000..]).await.expect("read"),
            1000
        );
        assert_eq!(out, plain[..4000]);
        let mut rest = vec![0u8; 1000];
        assert_eq!(fetcher.receive_into(&mut rest).await.expect("read"), 1000);
        assert_eq!(rest, plain[4000..]);
        // A flipped bit is caught on the no-copy path too.
        let (mut a, mut b) = pair().await;
        let mut record = b"abc".to_vec();
        let tag = a
            .seal
            .seal_in_place_separate_tag(nonce(0), Aad::empty(), &mut record)
            .expect("sealed");
        record.extend_from_slice(tag.as_ref());
        record[1] ^= 1;
        let mut wire = (record.len() as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(&record);
        a.tcp.write_all(&wire).await.expect("written");
        let err = b.receive_into(&mut [0u8; 16]).await.expect_err("forged");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    /// Raw bytes written where a sealed record is expected.
    async fn refused_after(raw: Vec<u8>) -> io::Error {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut a, (b, _)) = (a.expect("connect"), b.expect("accept"));
        a.write_all(&raw).await.expect("written");
        drop(a);
        let mut conn = SealedConn::new(b, Side::Fetcher, &[1; 16], &[2; 32], &[3; 32]);
        conn.receive().await.expect_err("refused")
    }

    #[tokio::test]
    async fn forged_replayed_reordered_and_oversized_records_are_refused() {
        // A record sealed by the provider with the right keys, captured off the wire.
        let (t, f, p) = ([1u8; 16], [2u8; 32], [3u8; 32]);
        let (seal, _) = keys(Side::Provider, &t, &f, &p);
        let sealed = |counter: u64, plain: &[u8]| {
            let mut buf = plain.to_vec();
            let tag = seal
                .seal_in_place_separate_tag(nonce(counter), Aad::empty(), &mut buf)
                .expect("sealed");
            buf.extend_from_slice(tag.as_ref());
            let mut wire = (buf.len() as u32).to_le_bytes().to_vec();
            wire.extend_from_slice(&buf);
            wire
        };
        // The right record opens; record 1 in place of record 0 (reordered or replayed) does not.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut a, (b, _)) = (a.expect("connect"), b.expect("accept"));
        let mut wire = sealed(0, b"first");
        wire.extend_from_slice(&sealed(0, b"first"));
        a.write_all(&wire).await.expect("written");
        let mut conn = SealedConn::new(b, Side::Fetcher, &t, &f, &p);
        conn.receive().await.expect("the genuine record");
        assert_eq!(conn.pending(), b"first");
        let replay = conn.receive().await.expect_err("a replayed record");
        assert_eq!(replay.kind(), io::ErrorKind::InvalidData);

        let err = refused_after(sealed(1, b"second")).await;
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "out of order");
        let mut flipped = sealed(0, b"first");
        flipped[6] ^= 1;
        assert_eq!(
            refused_after(flipped).await.kind(),
            io::ErrorKind::InvalidData,
            "a flipped bit"
        );
        // Sealed with the other direction's key (a record reflected back at its sender).
        let (reflect, _) = keys(Side::Fetcher, &t, &f, &p);
        let mut buf = b"first".to_vec();
        let tag = reflect
            .seal_in_place_separate_tag(nonce(0), Aad::empty(), &mut buf)
            .expect("sealed");
        buf.extend_from_slice(tag.as_ref());
        let mut wire = (buf.len() as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(&buf);
        assert_eq!(
            refused_after(wire).await.kind(),
            io::ErrorKind::InvalidData,
            "reflected"
        );
        let huge = ((MAX_RECORD_PLAINTEXT + TAG_BYTES + 1) as u32)
            .to_le_bytes()
            .to_vec();
        assert_eq!(
            refused_after(huge).await.kind(),
            io::ErrorKind::InvalidData,
            "a length over the bound is refused before anything is read"
        );
        let short = 5u32.to_le_bytes().to_vec();
        assert_eq!(
            refused_after(short).await.kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn tickets_are_good_once_and_keys_differ_per_direction() {
        let (seal_f, _) = keys(Side::Fetcher, &[1; 16], &[2; 32], &[3; 32]);
        let (_, open_p) = keys(Side::Provider, &[1; 16], &[2; 32], &[3; 32]);
        let mut buf = b"x".to_vec();
        let tag = seal_f
            .seal_in_place_separate_tag(nonce(0), Aad::empty(), &mut buf)
            .expect("sealed");
        buf.extend_from_slice(tag.as_ref());
        assert_eq!(
            open_p
                .open_in_place(nonce(0), Aad::empty(), &mut buf.clone())
                .expect("the provider opens the fetcher's record"),
            b"x"
        );
        let (seal_p, _) = keys(Side::Provider, &[1; 16], &[2; 32], &[3; 32]);
        let mut other = b"x".to_vec();
        let _tag = seal_p
            .seal_in_place_separate_tag(nonce(0), Aad::empty(), &mut other)
            .expect("sealed");
        assert_ne!(other[0], buf[0], "each direction has its own key stream");
    }

    #[tokio::test]
    async fn a_ticket_is_redeemed_once() {
        let tickets = Tickets::new(9);
        let peer = PeerId::random();
        let LaneResponse::Open { ticket, port, .. } =
            tickets.issue(peer, &LaneRequest { share: [5; 32] }, ())
        else {
            panic!("a ticket");
        };
        assert_eq!(port, 9);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let conn = || async { TcpStream::connect(addr).await.expect("connect") };
        let (got, _) = tickets
            .redeem(&ticket, conn().await)
            .map(|(p, _, s)| (p, s))
            .expect("good once");
        assert_eq!(got, peer);
        assert!(tickets.redeem(&ticket, conn().await).is_none(), "not twice");
        assert!(tickets.redeem(&[0; 16], conn().await).is_none(), "unknown");
    }

    #[test]
    fn expired_tickets_give_their_slots_back() {
        let tickets = Tickets::new(9);
        let slot = Arc::new(());
        tickets.issue(
            PeerId::random(),
            &LaneRequest { share: [5; 32] },
            slot.clone(),
        );
        tickets.prune();
        assert_eq!(Arc::strong_count(&slot), 2, "a live ticket keeps its slot");
        tickets
            .issued
            .lock()
            .expect("lock")
            .values_mut()
            .for_each(|t| {
                t.issued = t
                    .issued
                    .checked_sub(TICKET_TTL)
                    .expect("an instant 10 s back")
            });
        tickets.prune();
        assert_eq!(Arc::strong_count(&slot), 1, "an expired one gives it back");
    }
}
