//! The composed libp2p behaviour of a mana node, and the one `SwarmBuilder` chain that builds the swarm:
//! TCP and QUIC transports with noise and yamux, a relay client transport, then identify, ping, Kademlia,
//! gossipsub (signed, strictly validated, scored), the transfer protocol, bulk streams, relay server (optional), dcutr,
//! autonat and connection limits.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, autonat, connection_limits, dcutr, gossipsub, identify, kad, noise,
    ping, relay, request_response, tcp, yamux,
};

use super::codec::{TRANSFER_PROTOCOL, TransferCodec};
use super::config::NetConfig;
use super::traffic::TrafficCounters;
use mana_protocol::{TopicKind, topic};

/// The Kademlia protocol id of mana's DHT (separate from the public IPFS DHT).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/mana/kad/1.0.0");

/// The identify protocol version string: names the network, not the implementation.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/mana/1.0.0";

/// The agent version sent in identify: `mana/<crate version>`.
pub fn agent_version() -> String {
    format!("mana/{}", env!("CARGO_PKG_VERSION"))
}

/// Most keys with provider records the DHT store holds, this node's and other peers' together (libp2p's
/// default, 1,024, filled after about 65 rounds of a 4-node demo and then refused every new blob). A node
/// announces only blobs its store holds and withdraws each one the store drops; other peers' records are
/// dropped when they expire (an hour after they were put) and are capped far below this (8,192, the oldest
/// first past it), so they never crowd out this node's own announcements.
pub const MAX_PROVIDER_KEYS: usize = 65_536;

/// How long a provider record lives after it was put (providers republish every 10 minutes).
pub const PROVIDER_RECORD_TTL: Duration = Duration::from_secs(3600);

/// Most characters of a peer's agent string that are kept.
pub const MAX_AGENT_CHARS: usize = 64;

/// A peer's agent string as it may be kept and shown: at most [`MAX_AGENT_CHARS`] characters, control
/// characters (terminal escape sequences, new lines) written as escapes. The string is the peer's own text,
/// up to identify's 4 KiB, and reaches `status.json`, `mana status` and the dashboard.
pub fn printable_agent(agent: &str) -> String {
    let mut out = String::new();
    for (i, c) in agent.chars().enumerate() {
        if i == MAX_AGENT_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

pub use composed::{Behaviour, BehaviourEvent};

/// Holds the derived behaviour, so the undocumented variants the derive generates (`BehaviourEvent`) can be
/// allowed in one place.
mod composed {
    #![allow(missing_docs)]

    use libp2p::swarm::NetworkBehaviour;
    use libp2p::swarm::behaviour::toggle::Toggle;
    use libp2p::{
        autonat, connection_limits, dcutr, gossipsub, identify, kad, ping, relay, request_response,
    };

    use super::TransferCodec;

    /// Every sub-behaviour of a node. The derive generates `BehaviourEvent` with one variant per field.
    #[derive(NetworkBehaviour)]
    pub struct Behaviour {
        /// Refuses connections beyond the configured limits (first, so it vetoes before others do work).
        pub limits: connection_limits::Behaviour,
        /// Refuses inbound connections past the cap per remote IP address.
        pub ip_limits: crate::net::ip_limit::IpLimits,
        /// Exchanges agent, listen addresses and protocols with every peer.
        pub identify: identify::Behaviour,
        /// Measures round-trip times (used to try the fastest providers first) and keeps connections alive.
        pub ping: ping::Behaviour,
        /// The DHT: peer discovery and provider records (who hosts expert X, who holds blob H).
        pub kad: kad::Behaviour<kad::store::MemoryStore>,
        /// Gossip of signed announcements.
        pub gossipsub: gossipsub::Behaviour,
        /// Chunked transfers of content-addressed bytes (the fallback for peers without bulk streams).
        pub transfer: request_response::Behaviour<TransferCodec>,
        /// Raw streams (bulk blob transfers, blob lane setups, expert calls): opened to peers, and accepted
        /// into a queue per protocol ([`crate::net::streams`]).
        pub streams: crate::net::streams::Behaviour,
        /// Lets this node be reached through a relay when it is behind NAT.
        pub relay_client: relay::client::Behaviour,
        /// Serves as a relay for others (bootstrap nodes only).
        pub relay_server: Toggle<relay::Behaviour>,
        /// Upgrades relayed connections to direct ones by hole punching.
        pub dcutr: dcutr::Behaviour,
        /// Asks peers whether our addresses are reachable, to learn if we can be a DHT server.
        pub autonat: autonat::Behaviour,
    }
}

/// Why the swarm could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A limit in the config is unusable.
    #[error(transparent)]
    Limits(#[from] super::limits::LimitError),
    /// The transport (noise, TCP, relay) could not be set up.
    #[error("transport: {0}")]
    Transport(String),
    /// Gossipsub refused its configuration.
    #[error("gossipsub: {0}")]
    Gossipsub(String),
}

/// Gossipsub message id: the blake3 hash of the message data, so the same announcement relayed by many
/// peers is one message, whoever forwards it.
fn content_message_id(message: &gossipsub::Message) -> gossipsub::MessageId {
    gossipsub::MessageId::from(blake3::hash(&message.data).as_bytes().to_vec())
}

/// Peer-score parameters for one of our topics: invalid messages (P4, -5 x count²) weigh heavily, so a peer
/// that sends two bad messages drops below the gossip threshold (-10) and five below the graylist one (-80). Mesh-delivery deficits (P3) are off:
/// our topics are quiet, and an honest peer with nothing to say must not be penalised.
fn topic_score_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 100.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 10.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -5.0,
        invalid_message_deliveries_decay: 0.99,
        ..gossipsub::TopicScoreParams::default()
    }
}

/// Gossipsub's message-cache length in heartbeats: at least its default (5), and enough heartbeats to span
/// [`NetConfig::validation_window`].
fn history_length(config: &NetConfig) -> usize {
    let heartbeat = config.gossip_heartbeat.as_millis().max(1);
    let span = config.validation_window.as_millis().div_ceil(heartbeat);
    usize::try_from(span).unwrap_or(usize::MAX).clamp(5, 10_000)
}

fn gossipsub_behaviour(
    keypair: &Keypair,
    config: &NetConfig,
) -> Result<gossipsub::Behaviour, BuildError> {
    let gossip_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(config.gossip_heartbeat)
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .message_id_fn(content_message_id)
        .max_transmit_size(config.limits.max_gossip_bytes)
        .duplicate_cache_time(config.duplicate_cache_time)
        // The message cache holds a message awaiting its verdict for `history_length` heartbeats.
        .history_length(history_length(config))
        // outbound_min <= mesh_n_low <= mesh_n <= mesh_n_high (small nets have few peers).
        .mesh_outbound_min(1)
        .mesh_n_low(2)
        .mesh_n(4)
        .mesh_n_high(8)
        .build()
        .map_err(|e| BuildError::Gossipsub(e.to_string()))?;
    let mut behaviour = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(keypair.clone()),
        gossip_config,
    )
    .map_err(|e| BuildError::Gossipsub(e.to_owned()))?;
    let mut params = gossipsub::PeerScoreParams::default();
    for kind in TopicKind::ALL {
        params.topics.insert(
            gossipsub::IdentTopic::new(topic(&config.run_id, kind)).hash(),
            topic_score_params(),
        );
    }
    if config.trust_colocated_ips {
        params.ip_colocation_factor_whitelist = HashSet::from([
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ]);
    }
    let thresholds = gossipsub::PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: -80.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 5.0,
    };
    behaviour
        .with_peer_score(params, thresholds)
        .map_err(BuildError::Gossipsub)?;
    Ok(behaviour)
}

fn kad_behaviour(keypair: &Keypair, config: &NetConfig) -> kad::Behaviour<kad::store::MemoryStore> {
    let peer_id = keypair.public().to_peer_id();
    let mut kad_config = kad::Config::new(KAD_PROTOCOL);
    kad_config.set_query_timeout(Duration::from_secs(30));
    // Providers re-announce themselves; stale records expire.
    kad_config.set_provider_record_ttl(Some(PROVIDER_RECORD_TTL));
    // Other peers' records go through the event loop, which keeps their expiry and drops them when it passes.
    kad_config.set_record_filtering(kad::StoreInserts::FilterBoth);
    kad_config.set_provider_publication_interval(Some(Duration::from_secs(600)));
    let store = kad::store::MemoryStore::with_config(
        peer_id,
        kad::store::MemoryStoreConfig {
            max_provided_keys: MAX_PROVIDER_KEYS,
            ..Default::default()
        },
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
    if config.kad_server {
        kad.set_mode(Some(kad::Mode::Server));
    }
    kad
}

/// Builds the swarm: identity, tokio, TCP (noise, yamux), QUIC, relay client, behaviour, swarm settings.
/// Fetch frames are counted in `traffic`.
pub fn build_swarm(
    keypair: Keypair,
    config: &NetConfig,
    traffic: Arc<TrafficCounters>,
) -> Result<Swarm<Behaviour>, BuildError> {
    config.limits.validate()?;
    let limits = config.limits.clone();
    let gossipsub = gossipsub_behaviour(&keypair, config)?;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| BuildError::Transport(e.to_string()))?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| BuildError::Transport(e.to_string()))?
        .with_behaviour(|keypair, relay_client| {
            let peer_id = keypair.public().to_peer_id();
            let connection_limits = connection_limits::ConnectionLimits::default()
                .with_max_established(Some(limits.max_connections))
                .with_max_established_per_peer(Some(limits.max_connections_per_peer))
                .with_max_established_incoming(Some(
                    limits
                        .max_connections
                        .saturating_sub(limits.outbound_reserve),
                ))
                .with_max_pending_incoming(Some(limits.max_pending_connections))
                .with_max_pending_outgoing(Some(limits.max_pending_connections));
            let identify = identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_owned(), keypair.public())
                    .with_agent_version(agent_version())
                    .with_push_listen_addr_updates(true),
            );
            let transfer = request_response::Behaviour::with_codec(
                TransferCodec::new(limits.max_chunk_bytes, traffic),
                [(TRANSFER_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(config.request_timeout)
                    .with_max_concurrent_streams(limits.max_concurrent_transfers.max(1) * 4),
            );
            let relay_server = config
                .relay_server
                .then(|| relay::Behaviour::new(peer_id, relay::Config::default()));
            Behaviour {
                limits: connection_limits::Behaviour::new(connection_limits),
                ip_limits: super::ip_limit::IpLimits::new(
                    limits.max_inbound_per_ip as usize,
                    config.trust_colocated_ips,
                ),
                identify,
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(5)),
                ),
                kad: kad_behaviour(keypair, config),
                gossipsub,
                transfer,
                streams: super::streams::Behaviour::new(),
                relay_client,
                relay_server: Toggle::from(relay_server),
                dcutr: dcutr::Behaviour::new(peer_id),
                autonat: autonat::Behaviour::new(peer_id, autonat::Config::default()),
            }
        })
        .map_err(|e| BuildError::Transport(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_connection_timeout))
        .build();
    Ok(swarm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_strings_are_cut_and_lose_their_control_characters() {
        assert_eq!(printable_agent("mana/0.1.0"), "mana/0.1.0");
        assert_eq!(
            printable_agent("evil\x1b[2J\x1b]0;pwned\x07\nline"),
            "evil\\u{1b}[2J\\u{1b}]0;pwned\\u{7}\\nline"
        );
        let long = "a".repeat(5000);
        let shown = printable_agent(&long);
        assert_eq!(shown.chars().count(), MAX_AGENT_CHARS + 1);
        assert!(shown.ends_with('…'));
    }
}
