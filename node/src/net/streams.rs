//! The node's own raw-stream protocols (bulk blob streams, blob lane setups, expert calls): streams opened to
//! a peer ([`Opener`]) and streams peers open, each handed to its protocol's queue ([`Acceptor`]).
//!
//! Both sides were libp2p-stream's, and both lost streams:
//! - its acceptor holds one stream per protocol between two polls of the task that takes them and drops the
//!   next ("Channel is full, dropping inbound stream"): a burst of streams on one connection, such as one MoE
//!   layer's expert calls to a host or a fetch's chunk streams, lost all but the first, and each of their
//!   openers saw "connection is closed". Here each protocol's queue holds up to [`QUEUED_STREAMS`] streams;
//!   the one past that (only a flood gets there: each taker spawns its work) is dropped and counted
//!   ([`Acceptor::dropped`]).
//! - its opener picks the connection on the caller's thread, from a table the swarm fills in two steps (the
//!   connection's handler is made, then the connection is recorded). A stream asked for between the two
//!   found no connection, and waited for a dial that the swarm refused (the peer is connected) and that
//!   nothing reported: the stream never opened. A client's first expert call to a host it had just dialled
//!   hung so until its timeout (CI, `infer::host` and `net_infer`); with 20 ms slept between the two steps
//!   in a patched copy, 27 of 40 such streams hung. Here a request goes to the swarm's own task
//!   ([`Behaviour`]), which routes it where the connections are known: to a connection of the peer, or,
//!   while it has none, waiting for the dial that brings one, and failing when the dial fails.
//!   A connection also opens any number of streams at once, where libp2p-stream's opened one at a time.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::channel::{mpsc, oneshot};
use futures::{SinkExt as _, StreamExt as _};
use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::{InboundUpgrade, OutboundUpgrade, UpgradeInfo};
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId,
    DialError, DialFailure, FromSwarm, NetworkBehaviour, NotifyHandler, Stream, StreamProtocol,
    StreamUpgradeError, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
    behaviour::ConnectionEstablished,
};

/// Most streams of one protocol waiting to be taken.
pub const QUEUED_STREAMS: usize = 64;

type Queue = mpsc::Sender<(PeerId, Stream)>;

/// Registers protocols to accept and delivers their streams. Cheap to clone; every clone shares the queues.
#[derive(Clone, Default)]
pub struct Acceptor {
    queues: Arc<Mutex<HashMap<StreamProtocol, Queue>>>,
    dropped: Arc<AtomicU64>,
}

/// A protocol already has a taker in this swarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this protocol's streams are already accepted")]
pub struct AlreadyAccepting;

impl Acceptor {
    /// Starts accepting streams of `protocol`: peers may open it from now on (it is offered on every
    /// connection's next inbound stream), and its streams arrive on the returned [`Incoming`] until that is
    /// dropped.
    pub fn accept(&self, protocol: StreamProtocol) -> Result<Incoming, AlreadyAccepting> {
        let mut queues = self.lock();
        queues.retain(|_, queue| !queue.is_closed());
        if queues.contains_key(&protocol) {
            return Err(AlreadyAccepting);
        }
        let (queue, taken) = mpsc::channel(QUEUED_STREAMS);
        queues.insert(protocol, queue);
        Ok(Incoming(taken))
    }

    /// Inbound streams dropped because their protocol's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The protocols accepted now.
    fn protocols(&self) -> Vec<StreamProtocol> {
        let mut queues = self.lock();
        queues.retain(|_, queue| !queue.is_closed());
        queues.keys().cloned().collect()
    }

    /// Queues `stream` of `protocol` from `peer`, or drops it (the peer sees its stream closed).
    fn deliver(&self, peer: PeerId, stream: Stream, protocol: StreamProtocol) {
        let mut queues = self.lock();
        let Some(queue) = queues.get_mut(&protocol) else {
            tracing::debug!(%peer, %protocol, "inbound stream of a protocol no longer accepted; dropped");
            return;
        };
        match queue.try_send((peer, stream)) {
            Ok(()) => {}
            Err(e) if e.is_full() => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, %protocol, "inbound stream queue full; stream dropped");
            }
            Err(_) => {
                queues.remove(&protocol);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StreamProtocol, Queue>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The streams of one accepted protocol, with the peer that opened each.
pub struct Incoming(mpsc::Receiver<(PeerId, Stream)>);

impl futures::Stream for Incoming {
    type Item = (PeerId, Stream);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_next_unpin(cx)
    }
}

/// Stream requests queued for the swarm's task; a caller past this waits for room.
pub const QUEUED_OPENS: usize = 256;

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The peer does not serve the protocol.
    #[error("the peer does not support {0}")]
    Unsupported(StreamProtocol),
    /// No connection (the dial failed), the connection closed before the stream opened, the negotiation
    /// timed out, or the swarm stopped.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One stream asked for, and where its outcome goes.
#[derive(Debug)]
pub struct OpenRequest {
    peer: PeerId,
    protocol: StreamProtocol,
    reply: oneshot::Sender<Result<Stream, OpenError>>,
}

impl OpenRequest {
    fn fail(self, error: OpenError) {
        let _ = self.reply.send(Err(error));
    }

    /// The caller gave up (timed out, dropped its future): nothing to do for it.
    fn abandoned(&self) -> bool {
        self.reply.is_canceled()
    }
}

/// Opens streams to peers, dialling them if needed. Cheap to clone; every clone feeds the same swarm.
#[derive(Clone)]
pub struct Opener(mpsc::Sender<OpenRequest>);

impl Opener {
    /// A stream of `protocol` to `peer`, once the peer agreed to it.
    pub async fn open(&self, peer: PeerId, protocol: StreamProtocol) -> Result<Stream, OpenError> {
        let stopped = || {
            OpenError::Io(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the swarm stopped",
            ))
        };
        let (reply, outcome) = oneshot::channel();
        let request = OpenRequest {
            peer,
            protocol,
            reply,
        };
        self.0.clone().send(request).await.map_err(|_| stopped())?;
        outcome.await.unwrap_or_else(|_| {
            Err(OpenError::Io(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the connection closed before the stream opened",
            )))
        })
    }
}

/// The swarm's side: routes each stream request to a connection of its peer (dialling the peer while it has
/// none), and puts a handler on every connection that opens the streams asked of it and offers the accepted
/// protocols to what peers open.
pub struct Behaviour {
    acceptor: Acceptor,
    opener: Opener,
    requests: mpsc::Receiver<OpenRequest>,
    /// Each peer's connections, oldest first, and whether each is relayed.
    connections: HashMap<PeerId, Vec<(ConnectionId, bool)>>,
    /// Requests for peers with no connection yet, oldest first.
    waiting: HashMap<PeerId, Vec<OpenRequest>>,
    /// The dial this behaviour started for a peer with waiting requests, while it runs.
    dialing: HashMap<PeerId, ConnectionId>,
    /// What to hand the swarm next.
    out: VecDeque<ToSwarm<Infallible, OpenRequest>>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self::new()
    }
}

impl Behaviour {
    /// A behaviour with no protocol accepted yet.
    pub fn new() -> Self {
        let (sender, requests) = mpsc::channel(QUEUED_OPENS);
        Self {
            acceptor: Acceptor::default(),
            opener: Opener(sender),
            requests,
            connections: HashMap::new(),
            waiting: HashMap::new(),
            dialing: HashMap::new(),
            out: VecDeque::new(),
        }
    }

    /// The handle that registers protocols and counts drops (what the node's [`super::Client`] holds).
    pub fn acceptor(&self) -> Acceptor {
        self.acceptor.clone()
    }

    /// The handle that opens streams (what the node's [`super::Client`] holds).
    pub fn opener(&self) -> Opener {
        self.opener.clone()
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler {
            peer,
            acceptor: self.acceptor.clone(),
            to_open: VecDeque::new(),
            opening: 0,
        }
    }

    /// The connection a stream to `peer` goes on: the newest direct one, else the newest (a relayed
    /// connection is replaced by a direct one once hole punching succeeds).
    fn connection(&self, peer: &PeerId) -> Option<ConnectionId> {
        let connections = self.connections.get(peer)?;
        connections
            .iter()
            .rev()
            .find(|(_, relayed)| !relayed)
            .or(connections.last())
            .map(|(id, _)| *id)
    }

    fn send(&mut self, connection: ConnectionId, request: OpenRequest) {
        self.out.push_back(ToSwarm::NotifyHandler {
            peer_id: request.peer,
            handler: NotifyHandler::One(connection),
            event: request,
        });
    }

    /// Sends `request` to a connection of its peer, or keeps it until one is established (dialling the
    /// peer if this behaviour is not already).
    fn route(&mut self, request: OpenRequest) {
        if request.abandoned() {
            return;
        }
        let peer = request.peer;
        if let Some(connection) = self.connection(&peer) {
            self.send(connection, request);
            return;
        }
        let waiting = self.waiting.entry(peer).or_default();
        waiting.retain(|r| !r.abandoned());
        waiting.push(request);
        if let std::collections::hash_map::Entry::Vacant(dial) = self.dialing.entry(peer) {
            let opts = DialOpts::peer_id(peer)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            dial.insert(opts.connection_id());
            self.out.push_back(ToSwarm::Dial { opts });
        }
    }

    /// A connection to `peer` is up: the requests waiting for one go on it.
    fn on_established(&mut self, peer: PeerId, connection: ConnectionId, relayed: bool) {
        self.connections
            .entry(peer)
            .or_default()
            .push((connection, relayed));
        if self.dialing.get(&peer) == Some(&connection) {
            self.dialing.remove(&peer);
        }
        self.release_waiting(peer, connection);
    }

    /// Sends the requests waiting for a connection to `peer` on `connection` (those whose caller is still
    /// there).
    fn release_waiting(&mut self, peer: PeerId, connection: ConnectionId) {
        for request in self.waiting.remove(&peer).unwrap_or_default() {
            if !request.abandoned() {
                self.send(connection, request);
            }
        }
    }

    fn on_closed(&mut self, peer: PeerId, connection: ConnectionId) {
        if let Some(connections) = self.connections.get_mut(&peer) {
            connections.retain(|(id, _)| *id != connection);
            if connections.is_empty() {
                self.connections.remove(&peer);
            }
        }
    }

    /// A dial to `peer` failed. If it was this behaviour's dial refused because another dial of the peer
    /// runs (or it is connected), the requests wait on for that one; if another dial failed while this
    /// behaviour's own still runs, they wait for its outcome; otherwise no connection is coming and they
    /// fail.
    fn on_dial_failure(&mut self, peer: PeerId, connection: ConnectionId, error: &DialError) {
        let ours = self.dialing.get(&peer) == Some(&connection);
        if ours {
            self.dialing.remove(&peer);
        }
        if matches!(error, DialError::DialPeerConditionFalse(_)) {
            if let Some(connected) = self.connection(&peer) {
                self.release_waiting(peer, connected);
            }
            return;
        }
        if !ours && self.dialing.contains_key(&peer) {
            return;
        }
        let reason = error.to_string();
        for request in self.waiting.remove(&peer).unwrap_or_default() {
            request.fail(OpenError::Io(io::Error::new(
                io::ErrorKind::NotConnected,
                reason.clone(),
            )));
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            }) => self.on_established(peer_id, connection_id, endpoint.is_relayed()),
            FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id,
                connection_id,
                ..
            }) => self.on_closed(peer_id, connection_id),
            FromSwarm::DialFailure(DialFailure {
                peer_id: Some(peer),
                connection_id,
                error,
            }) => self.on_dial_failure(peer, connection_id, error),
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer_id: PeerId,
        _connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            if let Some(next) = self.out.pop_front() {
                return Poll::Ready(next);
            }
            match self.requests.poll_next_unpin(cx) {
                Poll::Ready(Some(request)) => self.route(request),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The protocol an outbound stream was asked for, and where its outcome goes.
type Reply = (StreamProtocol, oneshot::Sender<Result<Stream, OpenError>>);

/// One connection's side: opens the streams asked of it (all at once), negotiates any accepted protocol a
/// peer opens and delivers that stream.
pub struct Handler {
    peer: PeerId,
    acceptor: Acceptor,
    /// Requests not yet handed to the connection.
    to_open: VecDeque<OpenRequest>,
    /// Streams being opened.
    opening: usize,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = OpenRequest;
    type ToBehaviour = Infallible;
    type InboundProtocol = Protocols;
    type OutboundProtocol = Protocols;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Reply;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        SubstreamProtocol::new(Protocols(self.acceptor.protocols()), ())
    }

    fn connection_keep_alive(&self) -> bool {
        !self.to_open.is_empty() || self.opening > 0
    }

    fn poll(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        while let Some(request) = self.to_open.pop_front() {
            if request.abandoned() {
                continue;
            }
            self.opening += 1;
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(
                    Protocols(vec![request.protocol.clone()]),
                    (request.protocol, request.reply),
                ),
            });
        }
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, request: OpenRequest) {
        self.to_open.push_back(request);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: (stream, protocol),
                ..
            }) => self.acceptor.deliver(self.peer, stream, protocol),
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: (stream, _),
                info: (_, reply),
            }) => {
                self.opening = self.opening.saturating_sub(1);
                let _ = reply.send(Ok(stream));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError {
                info: (protocol, reply),
                error,
            }) => {
                self.opening = self.opening.saturating_sub(1);
                let error = match error {
                    StreamUpgradeError::NegotiationFailed => OpenError::Unsupported(protocol),
                    StreamUpgradeError::Timeout => {
                        OpenError::Io(io::Error::from(io::ErrorKind::TimedOut))
                    }
                    StreamUpgradeError::Io(e) => OpenError::Io(e),
                    StreamUpgradeError::Apply(never) => match never {},
                };
                let _ = reply.send(Err(error));
            }
            _ => {}
        }
    }
}

/// The protocols offered on a stream (all accepted ones inbound, the one asked for outbound); the stream
/// comes out with the one negotiated.
pub struct Protocols(Vec<StreamProtocol>);

impl UpgradeInfo for Protocols {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.clone().into_iter()
    }
}

impl InboundUpgrade<Stream> for Protocols {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, stream: Stream, protocol: Self::Info) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

impl OutboundUpgrade<Stream> for Protocols {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, stream: Stream, protocol: Self::Info) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod routing_tests {
    use std::task::Context;

    use futures::task::noop_waker_ref;
    use libp2p::core::ConnectedPoint;
    use libp2p::core::transport::PortUse;

    use super::*;

    const PROTOCOL: StreamProtocol = StreamProtocol::new("/mana/test-routing/1.0.0");

    /// A request for a stream to `peer`, and where its outcome arrives.
    fn request(peer: PeerId) -> (OpenRequest, oneshot::Receiver<Result<Stream, OpenError>>) {
        let (reply, outcome) = oneshot::channel();
        let request = OpenRequest {
            peer,
            protocol: PROTOCOL,
            reply,
        };
        (request, outcome)
    }

    /// What the behaviour hands the swarm until it has nothing more: (the connection each request went to,
    /// the dials started).
    fn drain(behaviour: &mut Behaviour) -> (Vec<ConnectionId>, Vec<ConnectionId>) {
        let mut cx = Context::from_waker(noop_waker_ref());
        let (mut sent, mut dials) = (Vec::new(), Vec::new());
        while let Poll::Ready(event) = behaviour.poll(&mut cx) {
            match event {
                ToSwarm::NotifyHandler {
                    handler: NotifyHandler::One(connection),
                    ..
                } => sent.push(connection),
                ToSwarm::Dial { opts } => dials.push(opts.connection_id()),
                _ => panic!("an unexpected event"),
            }
        }
        (sent, dials)
    }

    fn established(
        behaviour: &mut Behaviour,
        peer: PeerId,
        connection: ConnectionId,
        relayed: bool,
    ) {
        let mut address: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        if relayed {
            address.push(libp2p::multiaddr::Protocol::P2pCircuit);
        }
        let endpoint = ConnectedPoint::Dialer {
            address,
            role_override: Endpoint::Dialer,
            port_use: PortUse::Reuse,
        };
        behaviour.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
            peer_id: peer,
            connection_id: connection,
            endpoint: &endpoint,
            failed_addresses: &[],
            other_established: 0,
        }));
    }

    fn dial_failed(
        behaviour: &mut Behaviour,
        peer: PeerId,
        connection: ConnectionId,
        error: DialError,
    ) {
        behaviour.on_swarm_event(FromSwarm::DialFailure(DialFailure {
            peer_id: Some(peer),
            error: &error,
            connection_id: connection,
        }));
    }

    /// The order of events in which libp2p-stream's opener lost a stream: asked for while no connection is
    /// recorded, its dial refused because the peer is being dialled (or just got connected), then the
    /// connection recorded. Here the request waits for the connection and goes on it.
    #[test]
    fn a_stream_asked_for_while_the_peer_connects_goes_on_its_connection() {
        let mut behaviour = Behaviour::new();
        let peer = PeerId::random();
        let (asked, mut outcome) = request(peer);
        behaviour.route(asked);
        let (sent, dials) = drain(&mut behaviour);
        assert!(sent.is_empty());
        assert_eq!(dials.len(), 1, "the peer is dialled");
        dial_failed(
            &mut behaviour,
            peer,
            dials[0],
            DialError::DialPeerConditionFalse(PeerCondition::DisconnectedAndNotDialing),
        );
        assert_eq!(drain(&mut behaviour), (vec![], vec![]));
        assert!(matches!(outcome.try_recv(), Ok(None)), "still waiting");

        let connection = ConnectionId::new_unchecked(7);
        established(&mut behaviour, peer, connection, false);
        assert_eq!(drain(&mut behaviour), (vec![connection], vec![]));
        // A later request goes straight to the connection, without a dial.
        behaviour.route(request(peer).0);
        assert_eq!(drain(&mut behaviour), (vec![connection], vec![]));
    }

    /// A dial's failure fails the streams waiting for it, and only its own: another dial of the peer
    /// failing meanwhile leaves them waiting for this one.
    #[test]
    fn the_waiting_streams_fail_with_their_own_dial() {
        let mut behaviour = Behaviour::new();
        let peer = PeerId::random();
        let (first, mut first_outcome) = request(peer);
        let (second, mut second_outcome) = request(peer);
        behaviour.route(first);
        behaviour.route(second);
        let (_, dials) = drain(&mut behaviour);
        assert_eq!(dials.len(), 1, "one dial for both");
        dial_failed(
            &mut behaviour,
            peer,
            ConnectionId::new_unchecked(99),
            DialError::NoAddresses,
        );
        assert!(
            matches!(first_outcome.try_recv(), Ok(None)),
            "another dial's failure"
        );
        dial_failed(&mut behaviour, peer, dials[0], DialError::NoAddresses);
        for outcome in [&mut first_outcome, &mut second_outcome] {
            match outcome.try_recv() {
                Ok(Some(Err(OpenError::Io(e)))) => {
                    assert_eq!(e.kind(), io::ErrorKind::NotConnected)
                }
                other => panic!("not failed: {other:?}"),
            }
        }
        // The next request dials again.
        behaviour.route(request(peer).0);
        assert_eq!(drain(&mut behaviour).1.len(), 1);
    }

    /// Streams go on the newest direct connection (the relayed one a hole punch replaced is left), and a
    /// closed connection is never used again.
    #[test]
    fn streams_go_on_the_newest_direct_connection_that_is_open() {
        let mut behaviour = Behaviour::new();
        let peer = PeerId::random();
        let [direct, relayed, newer] = [1, 2, 3].map(ConnectionId::new_unchecked);
        established(&mut behaviour, peer, direct, false);
        established(&mut behaviour, peer, relayed, true);
        behaviour.route(request(peer).0);
        assert_eq!(drain(&mut behaviour).0, vec![direct]);
        established(&mut behaviour, peer, newer, false);
        behaviour.route(request(peer).0);
        assert_eq!(drain(&mut behaviour).0, vec![newer]);
        for closed in [newer, direct] {
            behaviour.on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id: peer,
                connection_id: closed,
                endpoint: &ConnectedPoint::Dialer {
                    address: "/ip4/127.0.0.1/tcp/1".parse().unwrap(),
                    role_override: Endpoint::Dialer,
                    port_use: PortUse::Reuse,
                },
                cause: None,
                remaining_established: 1,
            }));
        }
        behaviour.route(request(peer).0);
        assert_eq!(drain(&mut behaviour).0, vec![relayed]);
        // A request whose caller gave up is dropped, not sent.
        let (abandoned, outcome) = request(peer);
        drop(outcome);
        behaviour.route(abandoned);
        assert_eq!(drain(&mut behaviour), (vec![], vec![]));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};

    use super::*;
    use crate::net::{self, Client, NetConfig};

    const PROTOCOL: StreamProtocol = StreamProtocol::new("/mana/test-streams/1.0.0");

    /// The first address `host` listens on.
    async fn first_address(host: &Client) -> libp2p::Multiaddr {
        host.listen_addrs(Duration::from_secs(10))
            .await
            .unwrap()
            .remove(0)
    }

    /// A swarm on loopback, its event loop running.
    fn swarm() -> Client {
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let (client, _events, event_loop) = net::new(keypair, NetConfig::for_tests()).unwrap();
        tokio::spawn(event_loop.run());
        client
    }

    /// A burst of streams opened at once on one connection all reach the taker, each answered: libp2p-stream's
    /// acceptor kept one and dropped the rest whenever they came faster than its taker was polled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_streams_on_one_connection_all_arrive() {
        let (host, opener) = (swarm(), swarm());
        let mut incoming = host.accept_protocol_streams(PROTOCOL).unwrap();
        assert!(matches!(
            host.accept_protocol_streams(PROTOCOL),
            Err(crate::net::NetError::AlreadyAccepting)
        ));
        // The taker echoes one byte per stream, slowly enough that the burst queues up behind it.
        tokio::spawn(async move {
            while let Some((_, mut stream)) = incoming.next().await {
                tokio::time::sleep(Duration::from_millis(2)).await;
                let mut byte = [0u8; 1];
                if stream.read_exact(&mut byte).await.is_ok() {
                    let _ = stream.write_all(&byte).await;
                    let _ = stream.close().await;
                }
            }
        });
        opener.dial(first_address(&host).await).await.unwrap();
        let peer = host.local_peer_id();
        const BURST: u8 = 48;
        let answers = futures::future::join_all((0..BURST).map(|i| {
            let opener = opener.clone();
            async move {
                let mut stream = opener.open_protocol_stream(peer, PROTOCOL).await?;
                stream.write_all(&[i]).await?;
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(byte[0])
            }
        }))
        .await;
        let answered: Vec<u8> = answers
            .into_iter()
            .map(|a| a.expect("every stream answered"))
            .collect();
        assert_eq!(answered, (0..BURST).collect::<Vec<_>>());
        assert_eq!(host.dropped_inbound_streams(), 0);
    }

    /// Streams asked for while the connection is still being set up (a dial just started, as a client's first
    /// expert call right after it dials a host) all open, on every fresh pair of nodes; a protocol the peer
    /// does not serve is refused as such, and a peer that cannot be reached fails the stream instead of
    /// leaving it waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_asked_for_during_the_dial_open_and_failures_are_told() {
        for pair in 0..12u64 {
            let (host, opener) = (swarm(), swarm());
            let mut incoming = host.accept_protocol_streams(PROTOCOL).unwrap();
            tokio::spawn(async move {
                while let Some((_, mut stream)) = incoming.next().await {
                    let _ = stream.write_all(b"k").await;
                    let _ = stream.close().await;
                }
            });
            let peer = host.local_peer_id();
            opener.dial(first_address(&host).await).await.unwrap();
            // Asked for at once and a little later, across the handshake.
            let opened = futures::future::join_all((0..4u64).map(|i| {
                let opener = opener.clone();
                async move {
                    tokio::time::sleep(Duration::from_micros((pair * 4 + i) * 250)).await;
                    let open = async {
                        let mut stream = opener.open_protocol_stream(peer, PROTOCOL).await?;
                        let mut byte = [0u8; 1];
                        stream.read_exact(&mut byte).await?;
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(byte[0])
                    };
                    tokio::time::timeout(Duration::from_secs(20), open).await
                }
            }))
            .await;
            for (i, answer) in opened.into_iter().enumerate() {
                let answer =
                    answer.unwrap_or_else(|_| panic!("pair {pair}, stream {i}: never opened"));
                assert_eq!(answer.unwrap(), b'k');
            }
            let other = StreamProtocol::new("/mana/test-unserved/1.0.0");
            assert!(matches!(
                opener.open_protocol_stream(peer, other).await,
                Err(crate::net::NetError::StreamUnsupported { .. })
            ));
        }
        let unknown = PeerId::random();
        let lonely = swarm();
        let refused = tokio::time::timeout(
            Duration::from_secs(20),
            lonely.open_protocol_stream(unknown, PROTOCOL),
        )
        .await
        .expect("a peer with no address fails at once");
        assert!(
            matches!(refused, Err(crate::net::NetError::Stream { .. })),
            "{refused:?}"
        );
    }
}
