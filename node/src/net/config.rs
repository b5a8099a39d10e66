//! What a swarm needs to know before it starts: where to listen, whom to join, which run's topics to use,
//! whether it serves as a relay, and the timing knobs that tests shorten and deployments leave alone.

use std::time::Duration;

use libp2p::Multiaddr;
use mana_protocol::RunId;

use super::limits::Limits;

/// The settings of one swarm. [`NetConfig::default`] suits a node on the public internet; tests shorten the
/// intervals with [`NetConfig::for_tests`].
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Addresses to listen on (TCP and/or QUIC), e.g. `/ip4/0.0.0.0/tcp/4001`, `/ip4/0.0.0.0/udp/4001/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Bootstrap nodes to join through, each with its `/p2p/<peer id>` suffix.
    pub bootstrap: Vec<Multiaddr>,
    /// Peers met in earlier runs (each with its `/p2p/<peer id>` suffix), dialled with the bootstrap nodes
    /// whenever this node has no peer: a node restarted while every bootstrap is down rejoins through them.
    pub known_peers: Vec<Multiaddr>,
    /// Name of the training run: it namespaces the gossip topics.
    pub run_id: RunId,
    /// Serve as a relay for peers behind NAT (the bootstrap node does).
    pub relay_server: bool,
    /// Force the DHT into server mode. When false the swarm still switches to server mode on loopback, or
    /// once an external address is confirmed (autonat).
    pub kad_server: bool,
    /// Size and rate caps.
    pub limits: Limits,
    /// How long an unused connection stays open (the libp2p default of 10 s is too short for gossip).
    pub idle_connection_timeout: Duration,
    /// Gossipsub heartbeat (mesh maintenance and score decay tick).
    pub gossip_heartbeat: Duration,
    /// How long gossipsub remembers message ids to drop duplicates. Keep it above the protocol's clock
    /// window (30 s): then a copy forwarded late by an honest but slow peer is dropped here, or is too old
    /// for the clock check (ignored); below it, such a copy reaches the replay check and is rejected as
    /// `replayed`, costing that honest peer score.
    pub duplicate_cache_time: Duration,
    /// How long gossipsub keeps a received message while its verdict is pending: a verdict reported later
    /// no longer forwards it. The node judges most messages at once, but a parcel's header only once its
    /// envelope is fetched (the daemon's `parcel` module gives up after 8 s), so keep this above that.
    pub validation_window: Duration,
    /// How often the DHT is refreshed (random walk to find new peers) while the routing table changes; a
    /// settled table backs off to [`discovery::MAX_BACKOFF`](super::discovery::MAX_BACKOFF) times this.
    pub discovery_interval: Duration,
    /// First back-off before the bootstrap nodes are dialled again after losing every peer; it doubles up to
    /// `max_reconnect_backoff`.
    pub reconnect_backoff: Duration,
    /// Ceiling of the reconnect back-off.
    pub max_reconnect_backoff: Duration,
    /// Connect to peers found in the DHT until this many are connected.
    pub target_peers: usize,
    /// How long one transfer request may take before it counts as failed.
    pub request_timeout: Duration,
    /// Accept peers sharing one IP without the gossipsub co-location penalty (loopback test nets, LANs).
    pub trust_colocated_ips: bool,
    /// The TCP port blob lanes are served on ([`super::lane`]), on the IP of the first TCP listen address;
    /// 0 lets the OS pick one, `None` serves no lanes (peers then fetch over bulk streams).
    pub blob_lane_port: Option<u16>,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            bootstrap: Vec::new(),
            known_peers: Vec::new(),
            run_id: RunId::new("default").expect("a constant, valid run id"),
            relay_server: false,
            kad_server: false,
            limits: Limits::default(),
            idle_connection_timeout: Duration::from_secs(300),
            gossip_heartbeat: Duration::from_secs(1),
            duplicate_cache_time: Duration::from_secs(120),
            validation_window: Duration::from_secs(12),
            discovery_interval: Duration::from_secs(30),
            reconnect_backoff: Duration::from_secs(1),
            max_reconnect_backoff: Duration::from_secs(60),
            target_peers: 32,
            request_timeout: Duration::from_secs(30),
            trust_colocated_ips: false,
            blob_lane_port: Some(0),
        }
    }
}

impl NetConfig {
    /// A configuration for loopback tests: listens on `127.0.0.1` port 0 (TCP), DHT server mode, short
    /// heartbeat and discovery intervals so a test converges in seconds. The duplicate cache keeps its
    /// production length (see [`NetConfig::duplicate_cache_time`]); a test of the replay check shortens it.
    pub fn for_tests() -> Self {
        Self {
            listen: vec![loopback_tcp()],
            kad_server: true,
            gossip_heartbeat: Duration::from_millis(200),
            discovery_interval: Duration::from_millis(500),
            reconnect_backoff: Duration::from_millis(200),
            max_reconnect_backoff: Duration::from_secs(2),
            trust_colocated_ips: true,
            ..Self::default()
        }
    }
}

impl NetConfig {
    /// Where blob lanes are served: the lane port on the IP of the first TCP listen address, or `None`
    /// when lanes are off or there is no TCP listen address.
    pub fn blob_lane_addr(&self) -> Option<std::net::SocketAddr> {
        use libp2p::multiaddr::Protocol;
        let port = self.blob_lane_port?;
        self.listen.iter().find_map(|addr| {
            let mut parts = addr.iter();
            let ip = match parts.next()? {
                Protocol::Ip4(ip) => std::net::IpAddr::V4(ip),
                Protocol::Ip6(ip) => std::net::IpAddr::V6(ip),
                _ => return None,
            };
            matches!(parts.next()?, Protocol::Tcp(_)).then_some(std::net::SocketAddr::new(ip, port))
        })
    }
}

/// `/ip4/127.0.0.1/tcp/0`: a loopback TCP address on a port the OS picks.
pub fn loopback_tcp() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0"
        .parse()
        .expect("a constant, well-formed multiaddr")
}

/// `/ip4/127.0.0.1/udp/0/quic-v1`: a loopback QUIC address on a port the OS picks.
pub fn loopback_quic() -> Multiaddr {
    "/ip4/127.0.0.1/udp/0/quic-v1"
        .parse()
        .expect("a constant, well-formed multiaddr")
}
