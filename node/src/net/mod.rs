//! The network layer of a mana node: libp2p 0.57 on tokio.
//!
//! Usage: [`new`] builds the swarm and returns a cloneable [`Client`], the [`Events`] to read and the
//! [`EventLoop`] that owns the swarm; spawn the loop, subscribe to topics through the client, and handle the
//! events (gossip to validate, transfer requests to serve); a node holding blobs also serves bulk streams
//! ([`bulk::serve`]) and fetches through [`fetch::fetch_blob`]. See `docs/operator-guide.md` for the protocols,
//! topics and ports.

pub mod behaviour;
pub mod bulk;
pub mod client;
pub mod codec;
pub mod config;
pub mod discovery;
pub mod error;
pub mod event_loop;
pub mod events;
pub mod fetch;
pub mod ip_limit;
pub mod lane;
pub mod limits;
pub mod listen;
pub mod streams;
pub mod traffic;

use libp2p::PeerId;
use libp2p::gossipsub::MessageId;
use libp2p::identity::Keypair;
use libp2p::request_response::ResponseChannel;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use behaviour::{BuildError, KAD_PROTOCOL, agent_version};
pub use bulk::BLOB_STREAM;
pub use client::Client;
pub use codec::TRANSFER_PROTOCOL;
pub use config::NetConfig;
pub use error::{FailureKind, FrameTooLarge, NetError, error_chain};
pub use event_loop::{EventLoop, Verdict};
pub use events::Events;
/// libp2p itself, so callers (tests, the CLI) use the same version without depending on it.
pub use libp2p;
pub use limits::Limits;
pub use mana_protocol::{FetchRequest, FetchResponse};
pub use traffic::{Traffic, TrafficCounters};

/// Capacity of the command channel: callers wait (back-pressure) when the loop is this far behind.
const COMMAND_CAPACITY: usize = 256;

/// What the network reports to the node.
#[derive(Debug)]
pub enum NetEvent {
    /// A gossip message waiting for a verdict ([`Client::report`]). Until then it is neither forwarded nor
    /// scored.
    Gossip {
        /// The peer that forwarded it to us (the one whose score the verdict changes).
        source: PeerId,
        /// The peer that signed the gossipsub message, if any.
        author: Option<PeerId>,
        /// Gossipsub message id (the blake3 hash of `data`).
        id: MessageId,
        /// Topic name.
        topic: String,
        /// The message bytes.
        data: Vec<u8>,
    },
    /// A peer asks for bytes; answer with [`Client::respond`].
    InboundRequest {
        /// Who asks.
        peer: PeerId,
        /// What is asked.
        request: FetchRequest,
        /// Where the answer goes.
        channel: ResponseChannel<FetchResponse>,
    },
    /// The first connection to a peer was established.
    PeerConnected(PeerId),
    /// The last connection to a peer closed.
    PeerDisconnected(PeerId),
    /// A peer subscribed to a topic.
    Subscribed {
        /// The peer.
        peer: PeerId,
        /// Topic name.
        topic: String,
    },
}

/// One connected peer, as shown by `mana status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerSummary {
    /// Peer id.
    pub peer_id: String,
    /// Last ping round trip, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Gossipsub score (negative: misbehaving).
    pub gossip_score: Option<f64>,
    /// Agent string from identify (e.g. `mana/0.1.0`).
    pub agent: Option<String>,
    /// An address it can be dialled at, with its `/p2p/` suffix: the one this node dialled, or the first
    /// direct address it listed in identify. Kept in the store, so a restarted node can rejoin through it.
    #[serde(default)]
    pub dial_addr: Option<String>,
}

/// The network as the event loop sees it at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetSnapshot {
    /// This node's peer id.
    pub peer_id: String,
    /// Addresses the swarm listens on.
    pub listen_addrs: Vec<String>,
    /// Listeners of configured addresses still starting (a QUIC listener may report after the TCP one).
    pub listeners_pending: usize,
    /// Addresses confirmed reachable from outside.
    pub external_addrs: Vec<String>,
    /// Connected peers.
    pub peers: Vec<PeerSummary>,
    /// Peer ids in the DHT routing table.
    pub routing_table: Vec<String>,
    /// Gossip messages ignored because their forwarder exceeded its rate.
    pub gossip_rate_limited: u64,
    /// Events dropped because the node was [`Limits::event_queue`] events behind: gossip ignored, requests
    /// answered busy. Heartbeats are not counted here.
    pub events_dropped: u64,
    /// Heartbeats ignored because the node was [`Limits::event_queue`] heartbeats behind (they wait behind
    /// every other event, see [`events`]).
    #[serde(default)]
    pub heartbeats_dropped: u64,
    /// Gossip messages to peers too slow to take them, let go (gossipsub's `SlowPeer`): a high figure means
    /// this node's peers, or its own uplink, cannot keep up.
    #[serde(default)]
    pub gossip_to_slow_peers: u64,
    /// Inbound connections refused by a limit (per IP, inbound total, per peer, pending handshakes).
    pub inbound_denied: u64,
    /// Keys this node announces as a provider in the DHT (its blobs; see [`behaviour::MAX_PROVIDER_KEYS`]).
    pub dht_provided: usize,
    /// Other peers' provider records this node holds for the DHT (each expires an hour after it was put).
    pub dht_provider_records: usize,
}

/// Builds a swarm, starts listening on `config.listen`, and returns the client handle, the event receiver
/// and the event loop (which the caller spawns).
pub fn new(keypair: Keypair, config: NetConfig) -> Result<(Client, Events, EventLoop), NetError> {
    let local_peer_id = keypair.public().to_peer_id();
    let traffic = std::sync::Arc::new(TrafficCounters::default());
    let mut swarm = behaviour::build_swarm(keypair, &config, traffic.clone())?;
    for addr in &config.listen {
        listen::check_exclusive(addr)?;
    }
    let mut listeners = std::collections::HashSet::new();
    for addr in &config.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|source| NetError::Listen {
                addr: addr.clone(),
                source,
            })?;
        listeners.insert(id);
    }
    let streams = swarm.behaviour().streams.opener();
    let inbound = swarm.behaviour().streams.acceptor();
    let (command_tx, command_rx) = mpsc::channel(COMMAND_CAPACITY);
    let heartbeat_topic =
        mana_protocol::topic(&config.run_id, mana_protocol::TopicKind::Heartbeats);
    let (event_tx, event_rx) = events::channel(config.limits.event_queue, heartbeat_topic);
    let remote_ips = std::sync::Arc::new(lane::RemoteIps::default());
    let event_loop = EventLoop::new(
        swarm,
        config,
        command_rx,
        event_tx,
        traffic.clone(),
        listeners,
        remote_ips.clone(),
    );
    Ok((
        Client::new(
            command_tx,
            local_peer_id,
            traffic,
            streams,
            inbound,
            remote_ips,
        ),
        event_rx,
        event_loop,
    ))
}
