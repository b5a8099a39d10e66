//! The event loop: the one task that owns the `Swarm`. It runs a single `select!` over swarm events, commands
//! from [`Client`](super::Client) handles and two timers (reconnect/back-off and DHT refresh). Replies to
//! commands wait in `pending_*` maps keyed by query or request id until the swarm reports the outcome. When
//! every `Client` is dropped the command channel closes and the loop returns: shutdown needs no extra flag.
//!
//! Unexpected swarm events are logged, never fatal.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageId};
use libp2p::kad;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, Swarm, identify, ping};
use tokio::sync::{mpsc, oneshot};

use super::behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL, PROVIDER_RECORD_TTL};
use super::config::NetConfig;
use super::discovery::DiscoveryPace;
use super::events::{EventSenders, NotQueued};
use super::lane::RemoteIps;
use super::limits::RateLimiter;
use super::traffic::TrafficCounters;
use super::{NetError, NetEvent, NetSnapshot, PeerSummary};
use mana_protocol::{FetchRequest, FetchResponse, Text};

/// Most of other peers' provider records kept (republications of one key by one peer included), the oldest
/// dropped first past it. Far below the provider store's [`super::behaviour::MAX_PROVIDER_KEYS`], so other peers' records never
/// take the room of this node's own announcements; and small in memory: libp2p's store keeps room for 20
/// providers inline per key (about 3 KB), so this bounds them to about 25 MB. A demo node receives about 85
/// records a round, so this holds the last ~95 rounds' (blobs live `keep_rounds`); in a large network a node
/// holds the records of its share of the keys, so each round adds fewer.
const MAX_REMOTE_PROVIDER_RECORDS: usize = 8_192;

/// Most of a peer's identify listen addresses that go into the DHT routing table.
const MAX_IDENTIFY_ADDRS: usize = 8;

/// What a verdict on a gossip message means for its sender. Mirrors gossipsub's `MessageAcceptance`, so the
/// daemon does not depend on libp2p types to judge a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid: deliver and forward.
    Accept,
    /// Invalid: drop, do not forward, and lower the sender's score.
    Reject,
    /// Not for us (stale, unknown run): drop without penalty.
    Ignore,
}

impl From<Verdict> for MessageAcceptance {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Accept => MessageAcceptance::Accept,
            Verdict::Reject => MessageAcceptance::Reject,
            Verdict::Ignore => MessageAcceptance::Ignore,
        }
    }
}

/// A request to the event loop, with a oneshot for its reply where one is expected.
#[derive(Debug)]
pub enum Command {
    /// Dial a peer by id, at the addresses the swarm knows for it (the DHT's), unless it is connected or
    /// being dialled already.
    DialPeer {
        /// The peer.
        peer: PeerId,
        /// Whether the dial could be started.
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    /// Dial an address (with or without `/p2p/`).
    Dial {
        /// Where to dial.
        addr: Multiaddr,
        /// Whether the dial could be started.
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    /// Subscribe to a topic by full name.
    Subscribe {
        /// Topic name.
        topic: String,
        /// Whether gossipsub accepted the subscription.
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    /// Publish bytes on a topic by full name.
    Publish {
        /// Topic name.
        topic: String,
        /// The message (a signed envelope, for our topics).
        data: Vec<u8>,
        /// The message id, or why it could not be published (e.g. no peer subscribed yet).
        reply: oneshot::Sender<Result<MessageId, NetError>>,
    },
    /// Report the verdict on a received gossip message (validate_messages mode).
    ReportValidation {
        /// Gossipsub id of the message.
        id: MessageId,
        /// The peer that forwarded it to us.
        source: PeerId,
        /// The verdict.
        verdict: Verdict,
    },
    /// Announce in the DHT that we provide `key`.
    StartProviding {
        /// DHT key (e.g. a blob hash).
        key: Vec<u8>,
        /// When the announcement query finished.
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    /// Stop announcing `key`.
    StopProviding {
        /// DHT key.
        key: Vec<u8>,
    },
    /// Find providers of `key` in the DHT.
    GetProviders {
        /// DHT key.
        key: Vec<u8>,
        /// The providers found (possibly none).
        reply: oneshot::Sender<HashSet<PeerId>>,
    },
    /// Send a transfer request to a peer.
    Request {
        /// The peer.
        peer: PeerId,
        /// The request.
        request: FetchRequest,
        /// Its response, or the failure.
        reply: oneshot::Sender<Result<FetchResponse, NetError>>,
    },
    /// Answer an inbound transfer request.
    Respond {
        /// The channel from [`NetEvent::InboundRequest`].
        channel: ResponseChannel<FetchResponse>,
        /// The answer.
        response: FetchResponse,
    },
    /// A snapshot of peers, addresses and scores.
    Snapshot {
        /// The snapshot.
        reply: oneshot::Sender<NetSnapshot>,
    },
    /// The peers in this node's gossip mesh for a topic.
    MeshPeers {
        /// The topic's full name.
        topic: String,
        /// The mesh peers.
        reply: oneshot::Sender<Vec<PeerId>>,
    },
}

/// The loop itself. Build it with [`super::new`] and `tokio::spawn(event_loop.run())`.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    config: NetConfig,
    commands: mpsc::Receiver<Command>,
    events: EventSenders,
    pending_providing: HashMap<kad::QueryId, oneshot::Sender<Result<(), NetError>>>,
    pending_providers: HashMap<kad::QueryId, (HashSet<PeerId>, oneshot::Sender<HashSet<PeerId>>)>,
    pending_requests: HashMap<OutboundRequestId, oneshot::Sender<Result<FetchResponse, NetError>>>,
    listen_addrs: Vec<Multiaddr>,
    /// Listeners of the configured addresses that have not reported an address yet (nor failed).
    pending_listeners: HashSet<ListenerId>,
    rtt: HashMap<PeerId, Duration>,
    agents: HashMap<PeerId, String>,
    /// Other peers' provider records kept in the DHT store, oldest first, with when they expire.
    remote_providers: std::collections::VecDeque<(Instant, kad::RecordKey, PeerId)>,
    /// An address each connected peer can be dialled at (see [`PeerSummary::dial_addr`]).
    dial_addrs: HashMap<PeerId, Multiaddr>,
    request_limiter: RateLimiter,
    gossip_limiter: RateLimiter,
    /// When to dial the bootstrap nodes next (set while we have no peers).
    next_bootstrap_dial: Option<Instant>,
    /// Current reconnect back-off (doubles on each empty attempt, reset on a connection).
    backoff: Duration,
    /// When the next DHT refresh is due (slower while the routing table is settled).
    discovery: DiscoveryPace,
    gossip_rate_limited: u64,
    events_dropped: u64,
    heartbeats_dropped: u64,
    /// Gossip this node meant to send that waited in a slow peer's queue past gossipsub's limit and was let go.
    gossip_to_slow_peers: u64,
    inbound_denied: u64,
    /// Whether relay reservations were requested (once autonat says we are private).
    relayed: bool,
    /// Gossip bytes are counted here; fetch frames in the codec.
    traffic: Arc<TrafficCounters>,
    /// Each connected peer's IP, for blob lanes (shared with the clients).
    remote_ips: Arc<RemoteIps>,
}

impl EventLoop {
    pub(super) fn new(
        swarm: Swarm<Behaviour>,
        config: NetConfig,
        commands: mpsc::Receiver<Command>,
        events: EventSenders,
        traffic: Arc<TrafficCounters>,
        pending_listeners: HashSet<ListenerId>,
        remote_ips: Arc<RemoteIps>,
    ) -> Self {
        let limits = config.limits.clone();
        let backoff = config.reconnect_backoff;
        let discovery = DiscoveryPace::new(config.discovery_interval);
        let next_bootstrap_dial =
            (!config.bootstrap.is_empty() || !config.known_peers.is_empty()).then(Instant::now);
        Self {
            swarm,
            config,
            commands,
            events,
            pending_providing: HashMap::new(),
            pending_providers: HashMap::new(),
            pending_requests: HashMap::new(),
            listen_addrs: Vec::new(),
            pending_listeners,
            rtt: HashMap::new(),
            agents: HashMap::new(),
            remote_providers: std::collections::VecDeque::new(),
            dial_addrs: HashMap::new(),
            request_limiter: RateLimiter::new(limits.requests_per_second, limits.request_burst),
            gossip_limiter: RateLimiter::new(limits.gossip_per_second, limits.gossip_burst),
            next_bootstrap_dial,
            backoff,
            discovery,
            gossip_rate_limited: 0,
            events_dropped: 0,
            heartbeats_dropped: 0,
            gossip_to_slow_peers: 0,
            inbound_denied: 0,
            relayed: false,
            traffic,
            remote_ips,
        }
    }

    /// Runs until every [`Client`](super::Client) is dropped.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let discovery = tokio::time::sleep(self.config.discovery_interval);
        tokio::pin!(discovery);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.handle_event(event),
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_command(command),
                    None => {
                        tracing::debug!("every client dropped; network event loop stops");
                        return;
                    }
                },
                _ = tick.tick() => self.maybe_redial_bootstrap(),
                _ = &mut discovery => {
                    let wait = self.refresh_dht();
                    discovery.as_mut().reset(tokio::time::Instant::now() + wait);
                }
            }
        }
    }

    fn maybe_redial_bootstrap(&mut self) {
        let Some(when) = self.next_bootstrap_dial else {
            return;
        };
        let now = Instant::now();
        if now < when {
            return;
        }
        if self.swarm.connected_peers().next().is_some() {
            self.next_bootstrap_dial = None;
            return;
        }
        tracing::info!(
            backoff_ms = self.backoff.as_millis() as u64,
            known_peers = self.config.known_peers.len(),
            "no peers: dialling bootstrap nodes and known peers"
        );
        let entries: Vec<Multiaddr> = self
            .config
            .bootstrap
            .iter()
            .chain(&self.config.known_peers)
            .cloned()
            .collect();
        for addr in entries {
            if let Err(e) = self.dial(addr.clone()) {
                tracing::warn!(%addr, error = %e, "dial to rejoin failed to start");
            }
        }
        self.next_bootstrap_dial = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(self.config.max_reconnect_backoff);
        self.request_limiter.prune(now, Duration::from_secs(600));
        self.gossip_limiter.prune(now, Duration::from_secs(600));
    }

    /// Drops other peers' provider records that expired (libp2p drops them only when a lookup meets them), so
    /// that records of blobs nobody asks for again do not fill the store; past [`MAX_REMOTE_PROVIDER_RECORDS`]
    /// the oldest go first.
    fn prune_expired_providers(&mut self) {
        use libp2p::kad::store::RecordStore;
        let now = Instant::now();
        let mut dropped = 0usize;
        while let Some(&(expires, _, _)) = self.remote_providers.front() {
            let over = self.remote_providers.len() > MAX_REMOTE_PROVIDER_RECORDS;
            if expires > now && !over {
                break;
            }
            let Some((_, key, provider)) = self.remote_providers.pop_front() else {
                break;
            };
            // A record republished since (a later expiry) is kept, unless the oldest must go past the cap.
            let store = self.swarm.behaviour_mut().kad.store_mut();
            let current = store
                .providers(&key)
                .into_iter()
                .find(|r| r.provider == provider);
            if current.is_some_and(|r| over || r.expires.is_none_or(|e| e <= now)) {
                store.remove_provider(&key, &provider);
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::debug!(dropped, "expired provider records dropped");
        }
    }

    /// Drops expired provider records and walks the DHT; returns the wait until the next refresh.
    fn refresh_dht(&mut self) -> Duration {
        self.prune_expired_providers();
        if self.swarm.connected_peers().next().is_some() {
            // NoKnownPeers is normal while the routing table is still empty.
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
        let known: usize = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|bucket| bucket.num_entries())
            .sum();
        self.discovery.next(known)
    }

    /// Dials `addr`; when it names a peer, the address also goes into the DHT's routing table.
    fn dial(&mut self, addr: Multiaddr) -> Result<(), NetError> {
        if let Some(Protocol::P2p(peer)) = addr.iter().last() {
            let mut bare = addr.clone();
            bare.pop();
            self.swarm.behaviour_mut().kad.add_address(&peer, bare);
        }
        Ok(self.swarm.dial(addr)?)
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Dial { addr, reply } => {
                let _ = reply.send(self.dial(addr));
            }
            Command::DialPeer { peer, reply } => {
                let opts = DialOpts::peer_id(peer)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                let _ = reply.send(self.swarm.dial(opts).map_err(NetError::from));
            }
            Command::Subscribe { topic, reply } => {
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .subscribe(&IdentTopic::new(topic))
                    .map(|_| ())
                    .map_err(NetError::from);
                let _ = reply.send(result);
            }
            Command::Publish { topic, data, reply } => {
                let len = data.len();
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(IdentTopic::new(topic), data)
                    .map_err(NetError::from);
                if result.is_ok() {
                    self.traffic.add_gossip_out(len);
                }
                let _ = reply.send(result);
            }
            Command::ReportValidation {
                id,
                source,
                verdict,
            } => {
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id, &source, verdict.into());
            }
            Command::StartProviding { key, reply } => {
                match self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .start_providing(kad::RecordKey::new(&key))
                {
                    Ok(id) => {
                        self.pending_providing.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Provide(e)));
                    }
                }
            }
            Command::StopProviding { key } => {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .stop_providing(&kad::RecordKey::new(&key));
            }
            Command::GetProviders { key, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(kad::RecordKey::new(&key));
                self.pending_providers.insert(id, (HashSet::new(), reply));
            }
            Command::Request {
                peer,
                request,
                reply,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .transfer
                    .send_request(&peer, request);
                self.pending_requests.insert(id, reply);
            }
            Command::Respond { channel, response } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .transfer
                    .send_response(channel, response)
                    .is_err()
                {
                    tracing::debug!("transfer response not sent: the requester is gone");
                }
            }
            Command::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Command::MeshPeers { topic, reply } => {
                let hash = IdentTopic::new(topic).hash();
                let peers = self
                    .swarm
                    .behaviour()
                    .gossipsub
                    .mesh_peers(&hash)
                    .copied()
                    .collect();
                let _ = reply.send(peers);
            }
        }
    }

    fn snapshot(&mut self) -> NetSnapshot {
        let mut routing_table: Vec<String> = Vec::new();
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                routing_table.push(entry.node.key.preimage().to_string());
            }
        }
        routing_table.sort();
        let gossip = &self.swarm.behaviour().gossipsub;
        let mut peers: Vec<PeerSummary> = self
            .swarm
            .connected_peers()
            .map(|peer| PeerSummary {
                peer_id: peer.to_string(),
                rtt_ms: self.rtt.get(peer).map(|d| d.as_secs_f64() * 1000.0),
                gossip_score: gossip.peer_score(peer),
                agent: self.agents.get(peer).cloned(),
                dial_addr: self.dial_addrs.get(peer).map(|a| a.to_string()),
            })
            .collect();
        peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        let dht_provided = {
            use libp2p::kad::store::RecordStore;
            self.swarm
                .behaviour_mut()
                .kad
                .store_mut()
                .provided()
                .count()
        };
        NetSnapshot {
            dht_provided,
            dht_provider_records: self.remote_providers.len(),
            peer_id: self.swarm.local_peer_id().to_string(),
            listen_addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
            listeners_pending: self.pending_listeners.len(),
            external_addrs: self
                .swarm
                .external_addresses()
                .map(|a| a.to_string())
                .collect(),
            peers,
            routing_table,
            gossip_rate_limited: self.gossip_rate_limited,
            events_dropped: self.events_dropped,
            heartbeats_dropped: self.heartbeats_dropped,
            gossip_to_slow_peers: self.gossip_to_slow_peers,
            inbound_denied: self.inbound_denied,
        }
    }

    /// Hands an event to the node without waiting; a full queue gives it back (and is counted).
    fn emit(&mut self, event: NetEvent) -> Result<(), NetEvent> {
        self.events.try_send(event).map_err(|e| match e {
            NotQueued::Full { event, heartbeat } => {
                if heartbeat {
                    self.heartbeats_dropped += 1;
                } else {
                    self.events_dropped += 1;
                }
                event
            }
            NotQueued::Closed(event) => event,
        })
    }

    fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(event) => self.handle_behaviour_event(event),
            SwarmEvent::NewListenAddr {
                address,
                listener_id,
            } => {
                tracing::info!(%address, "listening");
                self.listen_addrs.push(address);
                self.pending_listeners.remove(&listener_id);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                addresses,
            } => {
                if let Err(e) = reason {
                    tracing::warn!(?addresses, error = %e, "a listener closed");
                }
                self.pending_listeners.remove(&listener_id);
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                tracing::warn!(error = %error, "listener error");
                self.pending_listeners.remove(&listener_id);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                tracing::debug!(%peer_id, addr = %endpoint.get_remote_address(), "connected");
                self.remote_ips
                    .connected(peer_id, endpoint.get_remote_address());
                self.backoff = self.config.reconnect_backoff;
                self.next_bootstrap_dial = None;
                if num_established.get() == 1 {
                    let _ = self.emit(NetEvent::PeerConnected(peer_id));
                }
                if let ConnectedPoint::Dialer { address, .. } = endpoint {
                    self.dial_addrs
                        .insert(peer_id, with_peer_id(address.clone(), peer_id));
                    if self
                        .config
                        .bootstrap
                        .iter()
                        .chain(&self.config.known_peers)
                        .any(|b| b.iter().last() == Some(Protocol::P2p(peer_id)))
                    {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, address);
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(%peer_id, ?cause, "connection closed");
                if num_established == 0 {
                    self.remote_ips.disconnected(&peer_id);
                    self.agents.remove(&peer_id);
                    self.dial_addrs.remove(&peer_id);
                    self.rtt.remove(&peer_id);
                    self.request_limiter.remove(&peer_id);
                    self.gossip_limiter.remove(&peer_id);
                    let _ = self.emit(NetEvent::PeerDisconnected(peer_id));
                    self.schedule_reconnect_if_alone();
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                let to_bootstrap = peer_id.is_some_and(|p| {
                    self.config
                        .bootstrap
                        .iter()
                        .any(|b| b.iter().last() == Some(Protocol::P2p(p)))
                });
                // Alone, or failing to reach a bootstrap node, the operator needs the reason (a wrong port or
                // peer id would otherwise only show as "no peers" forever).
                if to_bootstrap || self.swarm.connected_peers().next().is_none() {
                    let peer = peer_id
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "unknown".into());
                    tracing::warn!(%peer, reason = %dial_failure_reason(&error), "dial failed");
                } else {
                    tracing::debug!(?peer_id, %error, "outgoing connection failed");
                }
                self.schedule_reconnect_if_alone();
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                if matches!(error, libp2p::swarm::ListenError::Denied { .. }) {
                    self.inbound_denied += 1;
                }
                tracing::debug!(%error, "incoming connection failed");
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
            }
            other => tracing::trace!(?other, "swarm event"),
        }
    }

    /// Behind NAT: reserve a slot on each bootstrap node's relay, so peers can reach us through it (and
    /// dcutr can then upgrade the relayed connection to a direct one).
    fn listen_via_relays(&mut self) {
        if self.relayed {
            return;
        }
        self.relayed = true;
        for addr in self.config.bootstrap.clone() {
            let circuit = addr.with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(_) => tracing::info!(%circuit, "listening through relay"),
                Err(e) => tracing::warn!(%circuit, error = %e, "relay listen failed"),
            }
        }
    }

    fn schedule_reconnect_if_alone(&mut self) {
        let nobody_to_dial = self.config.bootstrap.is_empty() && self.config.known_peers.is_empty();
        if nobody_to_dial || self.swarm.connected_peers().next().is_some() {
            return;
        }
        if self.next_bootstrap_dial.is_none() {
            self.next_bootstrap_dial = Some(Instant::now() + self.backoff);
        }
    }

    fn handle_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Gossipsub(event) => self.handle_gossip(event),
            BehaviourEvent::Kad(event) => self.handle_kad(event),
            BehaviourEvent::Transfer(event) => self.handle_transfer(event),
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocols.iter().any(|p| *p == KAD_PROTOCOL) {
                    // A peer lists its own addresses: a few are enough to reach it, and the DHT keeps them.
                    for addr in info.listen_addrs.iter().take(MAX_IDENTIFY_ADDRS).cloned() {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
                // Only for connected peers (dropped on disconnect), and cut: the text is the peer's own.
                if self.swarm.is_connected(&peer_id) {
                    if let Some(addr) = direct_addr(&info.listen_addrs) {
                        self.dial_addrs
                            .entry(peer_id)
                            .or_insert_with(|| with_peer_id(addr, peer_id));
                    }
                    self.agents.insert(
                        peer_id,
                        super::behaviour::printable_agent(&info.agent_version),
                    );
                }
            }
            BehaviourEvent::Identify(other) => tracing::trace!(?other, "identify"),
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                self.rtt.insert(peer, rtt);
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Err(e),
                ..
            }) => {
                tracing::debug!(%peer, error = %e, "ping failed");
            }
            BehaviourEvent::Autonat(libp2p::autonat::Event::StatusChanged { old, new }) => {
                tracing::info!(?old, ?new, "reachability changed");
                if matches!(new, libp2p::autonat::NatStatus::Private) {
                    self.listen_via_relays();
                }
            }
            BehaviourEvent::Autonat(event) => tracing::debug!(?event, "autonat"),
            BehaviourEvent::RelayClient(event) => tracing::debug!(?event, "relay client"),
            BehaviourEvent::RelayServer(event) => tracing::debug!(?event, "relay server"),
            BehaviourEvent::Dcutr(event) => tracing::debug!(?event, "dcutr"),
            BehaviourEvent::Limits(never) => match never {},
            BehaviourEvent::Streams(never) => match never {},
        }
    }

    fn handle_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                self.traffic.add_gossip_in(message.data.len());
                if !self
                    .gossip_limiter
                    .allow(propagation_source, Instant::now())
                {
                    self.gossip_rate_limited += 1;
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            MessageAcceptance::Ignore,
                        );
                    return;
                }
                let event = NetEvent::Gossip {
                    source: propagation_source,
                    author: message.source,
                    id: message_id.clone(),
                    topic: message.topic.into_string(),
                    data: message.data,
                };
                if self.emit(event).is_err() {
                    // The daemon is behind: drop without penalising the sender.
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            MessageAcceptance::Ignore,
                        );
                }
            }
            gossipsub::Event::Subscribed { peer_id, topic } => {
                let _ = self.emit(NetEvent::Subscribed {
                    peer: peer_id,
                    topic: topic.into_string(),
                });
            }
            // A peer too slow to take what this node sends (its queue full, or a message waiting past
            // gossipsub's publish or forward limit): those messages never reach it from here.
            gossipsub::Event::SlowPeer {
                peer_id,
                failed_messages,
            } => {
                let dropped = failed_messages.priority + failed_messages.non_priority;
                self.gossip_to_slow_peers += dropped as u64;
                tracing::debug!(peer = %peer_id, dropped, "gossip to a slow peer let go");
            }
            other => tracing::debug!(?other, "gossipsub"),
        }
    }

    fn handle_kad(&mut self, event: kad::Event) {
        match event {
            // Other peers' provider records are stored here (record filtering), so their expiry is known.
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::AddProvider {
                        record: Some(record),
                    },
            } => {
                use libp2p::kad::store::RecordStore;
                let expires = Instant::now() + PROVIDER_RECORD_TTL;
                let (key, provider) = (record.key.clone(), record.provider);
                match self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .store_mut()
                    .add_provider(record)
                {
                    Ok(()) => {
                        self.remote_providers.push_back((expires, key, provider));
                        if self.remote_providers.len() > MAX_REMOTE_PROVIDER_RECORDS {
                            self.prune_expired_providers();
                        }
                    }
                    Err(e) => tracing::debug!(%provider, error = %e, "provider record not kept"),
                }
            }
            // Value records are not part of mana's protocol: a peer's are not kept.
            kad::Event::InboundRequest {
                request: kad::InboundRequest::PutRecord { .. },
            } => {}
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                kad::QueryResult::StartProviding(result) => {
                    if let Some(reply) = self.pending_providing.remove(&id) {
                        // With few peers the put may reach none; the local record still stands.
                        let _ = reply.send(result.map(|_| ()).or_else(|e| match e {
                            kad::AddProviderError::Timeout { .. } => Ok(()),
                        }));
                    }
                }
                kad::QueryResult::GetProviders(result) => {
                    if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result {
                        if let Some((found, _)) = self.pending_providers.get_mut(&id) {
                            found.extend(providers);
                        }
                    }
                    if step.last {
                        if let Some((found, reply)) = self.pending_providers.remove(&id) {
                            let _ = reply.send(found);
                        }
                    }
                }
                kad::QueryResult::Bootstrap(result) => tracing::trace!(?result, "dht refresh"),
                other => tracing::trace!(?other, "kad query"),
            },
            kad::Event::RoutingUpdated {
                peer,
                addresses,
                is_new_peer,
                ..
            } => {
                if is_new_peer {
                    self.discovery.reset();
                }
                let connected = self.swarm.connected_peers().count();
                if is_new_peer
                    && !self.swarm.is_connected(&peer)
                    && connected < self.config.target_peers
                {
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addresses.into_vec())
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(%peer, error = %e, "dial of discovered peer failed");
                    }
                }
            }
            other => tracing::trace!(?other, "kad"),
        }
    }

    fn handle_transfer(&mut self, event: request_response::Event<FetchRequest, FetchResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    if !self.request_limiter.allow(peer, Instant::now()) {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .transfer
                            .send_response(channel, busy());
                        return;
                    }
                    if let Err(NetEvent::InboundRequest { channel, .. }) =
                        self.emit(NetEvent::InboundRequest {
                            peer,
                            request,
                            channel,
                        })
                    {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .transfer
                            .send_response(channel, busy());
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending_requests.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(%peer, %error, "transfer request failed");
                if let Some(reply) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Request {
                        peer,
                        source: error,
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound transfer failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}

/// The answer to a peer over its request rate (or when the node is too far behind to serve it).
fn busy() -> FetchResponse {
    FetchResponse::Refused {
        reason: Text::new("busy").expect("a short constant text"),
    }
}

/// Why a dial failed, in the operator's words: refused, timed out, or the address answering as another peer.
pub(crate) fn dial_failure_reason(error: &libp2p::swarm::DialError) -> String {
    use libp2p::swarm::DialError;
    match error {
        DialError::WrongPeerId { obtained, .. } => {
            format!("the address answers as peer {obtained}, not as the peer id in the address")
        }
        DialError::Transport(attempts) => attempts
            .iter()
            .map(|(addr, e)| format!("{addr}: {}", transport_reason(e)))
            .collect::<Vec<_>>()
            .join("; "),
        other => super::error::error_chain(other),
    }
}

fn transport_reason(e: &libp2p::TransportError<std::io::Error>) -> String {
    match e {
        libp2p::TransportError::MultiaddrNotSupported(_) => {
            "no transport for this address".to_owned()
        }
        libp2p::TransportError::Other(io) => {
            // The cause is often wrapped (noise, multistream-select...): the innermost i/o kind says most.
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(io);
            while let Some(e) = source {
                if let Some(io) = e.downcast_ref::<std::io::Error>() {
                    match io.kind() {
                        std::io::ErrorKind::ConnectionRefused => {
                            return "connection refused (nothing listens there)".to_owned();
                        }
                        std::io::ErrorKind::TimedOut => return "timed out".to_owned(),
                        std::io::ErrorKind::HostUnreachable
                        | std::io::ErrorKind::NetworkUnreachable => {
                            return "unreachable".to_owned();
                        }
                        _ => {}
                    }
                }
                source = e.source();
            }
            super::error::error_chain(io)
        }
    }
}

/// `addr` ending in `/p2p/<peer>`.
fn with_peer_id(mut addr: Multiaddr, peer: PeerId) -> Multiaddr {
    if !matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.push(Protocol::P2p(peer));
    }
    addr
}

/// The first address a peer lists that can be dialled directly: not through a relay, not unspecified.
fn direct_addr(listed: &[Multiaddr]) -> Option<Multiaddr> {
    listed
        .iter()
        .find(|a| {
            !a.iter().any(|p| {
                matches!(p, Protocol::P2pCircuit)
                    || matches!(p, Protocol::Ip4(ip) if ip.is_unspecified())
                    || matches!(p, Protocol::Ip6(ip) if ip.is_unspecified())
            })
        })
        .cloned()
}
