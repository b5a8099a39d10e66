//! The cloneable handle to the network. Each method sends a [`Command`] on a bounded channel with a oneshot
//! for the reply, and awaits it; the [`EventLoop`](super::EventLoop) does the work. Dropping every clone stops
//! the loop.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use libp2p::gossipsub::MessageId;
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use super::bulk::BLOB_STREAM;
use super::event_loop::{Command, Verdict};
use super::lane::{BLOB_LANE, LaneFailures, RemoteIps};
use super::streams::{Acceptor, Incoming, OpenError, Opener};
use super::traffic::{Traffic, TrafficCounters};
use super::{NetError, NetSnapshot};
use mana_protocol::{FetchRequest, FetchResponse};

/// A handle to one node's swarm. Cheap to clone; every clone talks to the same event loop.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    traffic: Arc<TrafficCounters>,
    /// Opens raw streams (through the swarm's task, not the event loop's commands).
    streams: Opener,
    /// Accepts them, into a queue per protocol.
    inbound: Acceptor,
    /// Each connected peer's IP (kept by the event loop), where its blob lane is.
    remote_ips: Arc<RemoteIps>,
    /// Providers whose lane failed lately.
    lane_failures: Arc<LaneFailures>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("local_peer_id", &self.local_peer_id)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub(super) fn new(
        commands: mpsc::Sender<Command>,
        local_peer_id: PeerId,
        traffic: Arc<TrafficCounters>,
        streams: Opener,
        inbound: Acceptor,
        remote_ips: Arc<RemoteIps>,
    ) -> Self {
        Self {
            commands,
            local_peer_id,
            traffic,
            streams,
            inbound,
            remote_ips,
            lane_failures: Arc::default(),
        }
    }

    /// The IP of `peer`'s direct connection, if it has one (relayed connections have none): where its blob
    /// lane is, and the address the coordinator counts its key against (the per-IP member cap).
    pub fn remote_ip(&self, peer: &PeerId) -> Option<std::net::IpAddr> {
        self.remote_ips.get(peer)
    }

    /// Providers whose blob lane failed lately.
    pub(super) fn lane_failures(&self) -> &LaneFailures {
        &self.lane_failures
    }

    /// Opens a blob lane setup stream to `peer`.
    pub(super) async fn open_lane_stream(&self, peer: PeerId) -> Result<libp2p::Stream, NetError> {
        self.open_stream(peer, BLOB_LANE).await
    }

    /// Starts accepting blob lane setup streams (once per swarm).
    pub(super) fn accept_lane_streams(&self) -> Result<Incoming, NetError> {
        self.accept(BLOB_LANE)
    }

    /// The shared traffic counters (the bulk stream code counts its frames and bytes there).
    pub(super) fn traffic_counters(&self) -> &Arc<TrafficCounters> {
        &self.traffic
    }

    /// Opens a bulk stream (`/mana/blob/1.0.0`) to `peer`, dialling it if needed.
    /// [`NetError::StreamUnsupported`] means the peer serves only the request-response fetch protocol.
    pub async fn open_blob_stream(&self, peer: PeerId) -> Result<libp2p::Stream, NetError> {
        self.open_stream(peer, BLOB_STREAM).await
    }

    /// Opens a stream of `protocol` to `peer`, dialling it if needed: for protocols carried on raw streams
    /// above this layer (expert calls). [`NetError::StreamUnsupported`] means the peer does not serve it.
    pub async fn open_protocol_stream(
        &self,
        peer: PeerId,
        protocol: libp2p::StreamProtocol,
    ) -> Result<libp2p::Stream, NetError> {
        self.open_stream(peer, protocol).await
    }

    /// Starts accepting inbound streams of `protocol` (once per protocol and swarm: a second call gets
    /// [`NetError::AlreadyAccepting`]).
    pub fn accept_protocol_streams(
        &self,
        protocol: libp2p::StreamProtocol,
    ) -> Result<Incoming, NetError> {
        self.accept(protocol)
    }

    fn accept(&self, protocol: libp2p::StreamProtocol) -> Result<Incoming, NetError> {
        self.inbound
            .accept(protocol)
            .map_err(|_| NetError::AlreadyAccepting)
    }

    /// Inbound raw streams dropped because their protocol's queue was full (a flood).
    pub fn dropped_inbound_streams(&self) -> u64 {
        self.inbound.dropped()
    }

    async fn open_stream(
        &self,
        peer: PeerId,
        protocol: libp2p::StreamProtocol,
    ) -> Result<libp2p::Stream, NetError> {
        self.streams
            .open(peer, protocol)
            .await
            .map_err(|e| match e {
                OpenError::Unsupported(protocol) => NetError::StreamUnsupported { peer, protocol },
                OpenError::Io(source) => NetError::Stream { peer, source },
            })
    }

    /// Starts accepting inbound bulk streams (once per swarm: a second call gets
    /// [`NetError::AlreadyAccepting`]). Until this is called, peers opening one are told the protocol is
    /// unsupported and fall back to request-response.
    pub fn accept_blob_streams(&self) -> Result<Incoming, NetError> {
        self.accept(BLOB_STREAM)
    }

    /// Application bytes sent and received since the swarm started (read directly, no round trip to the
    /// event loop; see [`super::traffic`] for what is counted).
    pub fn traffic(&self) -> Traffic {
        self.traffic.snapshot()
    }

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NetError::Closed)?;
        rx.await.map_err(|_| NetError::Closed)
    }

    /// Dials an address (`/p2p/<id>` suffix recommended: it also seeds the DHT).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.call(|reply| Command::Dial { addr, reply }).await?
    }

    /// Dials `peer` by id at the addresses the swarm knows for it (the DHT's), unless it is connected or being
    /// dialled already; succeeds once the dial has started. The coordinator uses it to learn the address of a
    /// key it only heard through gossip.
    pub async fn dial_peer(&self, peer: PeerId) -> Result<(), NetError> {
        self.call(|reply| Command::DialPeer { peer, reply }).await?
    }

    /// Subscribes to a topic by its full name.
    pub async fn subscribe(&self, topic: String) -> Result<(), NetError> {
        self.call(|reply| Command::Subscribe { topic, reply })
            .await?
    }

    /// Publishes bytes on a topic. Fails with [`NetError::Publish`] while no peer is subscribed yet.
    pub async fn publish(&self, topic: String, data: Vec<u8>) -> Result<MessageId, NetError> {
        self.call(|reply| Command::Publish { topic, data, reply })
            .await?
    }

    /// Reports the verdict on a received gossip message; gossipsub forwards it (Accept) or scores its
    /// sender down (Reject).
    pub async fn report(
        &self,
        id: MessageId,
        source: PeerId,
        verdict: Verdict,
    ) -> Result<(), NetError> {
        self.commands
            .send(Command::ReportValidation {
                id,
                source,
                verdict,
            })
            .await
            .map_err(|_| NetError::Closed)
    }

    /// Announces in the DHT that this node provides `key` (a blob hash, an expert id).
    pub async fn start_providing(&self, key: Vec<u8>) -> Result<(), NetError> {
        self.call(|reply| Command::StartProviding { key, reply })
            .await?
    }

    /// Stops announcing `key`.
    pub async fn stop_providing(&self, key: Vec<u8>) -> Result<(), NetError> {
        self.commands
            .send(Command::StopProviding { key })
            .await
            .map_err(|_| NetError::Closed)
    }

    /// Finds the providers of `key` in the DHT.
    pub async fn get_providers(&self, key: Vec<u8>) -> Result<HashSet<PeerId>, NetError> {
        self.call(|reply| Command::GetProviders { key, reply })
            .await
    }

    /// Sends one transfer request and awaits the response.
    pub async fn request(
        &self,
        peer: PeerId,
        request: FetchRequest,
    ) -> Result<FetchResponse, NetError> {
        self.call(|reply| Command::Request {
            peer,
            request,
            reply,
        })
        .await?
    }

    /// Answers an inbound transfer request.
    pub async fn respond(
        &self,
        channel: ResponseChannel<FetchResponse>,
        response: FetchResponse,
    ) -> Result<(), NetError> {
        self.commands
            .send(Command::Respond { channel, response })
            .await
            .map_err(|_| NetError::Closed)
    }

    /// Peers, addresses and scores, as the event loop sees them now.
    pub async fn snapshot(&self) -> Result<NetSnapshot, NetError> {
        self.call(|reply| Command::Snapshot { reply }).await
    }

    /// The peers in this node's gossip mesh for `topic` (its full name): the few it exchanges that topic's
    /// messages with, so likely holders of what a message there names (a parcel's envelope).
    pub async fn mesh_peers(&self, topic: String) -> Result<Vec<PeerId>, NetError> {
        self.call(|reply| Command::MeshPeers { topic, reply }).await
    }

    /// Waits until every configured listener reports its address (at least one, by `timeout`), and returns
    /// them (with `/p2p/<id>`).
    pub async fn listen_addrs(&self, timeout: Duration) -> Result<Vec<Multiaddr>, NetError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let snap = self.snapshot().await?;
            let addrs: Vec<Multiaddr> = snap
                .listen_addrs
                .iter()
                .filter_map(|a| a.parse::<Multiaddr>().ok())
                .map(|a| a.with_p2p(self.local_peer_id).unwrap_or_else(|a| a))
                .collect();
            // Every configured listener has reported (or failed): all addresses are known.
            if !addrs.is_empty() && snap.listeners_pending == 0 {
                return Ok(addrs);
            }
            if tokio::time::Instant::now() >= deadline {
                return if addrs.is_empty() {
                    Err(NetError::NotListening)
                } else {
                    Ok(addrs)
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
