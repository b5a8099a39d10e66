//! Inbound streams of the node's own raw-stream protocols (bulk blob streams, blob lane setups, expert calls),
//! each handed to its protocol's queue. Streams are opened through libp2p-stream's `Control`; they are not
//! accepted through it, because its acceptor holds one stream per protocol between two polls of the task
//! that takes them and drops the next ("Channel is full, dropping inbound stream"): a burst of streams on one
//! connection, such as one MoE layer's expert calls to a host or a fetch's chunk streams, lost all but the
//! first, and each of their openers saw "connection is closed". Here each protocol's queue holds up to
//! [`QUEUED_STREAMS`] streams; the one past that (only a flood gets there: each taker spawns its work) is
//! dropped and counted ([`Acceptor::dropped`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::StreamExt as _;
use futures::channel::mpsc;
use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::{DeniedUpgrade, InboundUpgrade, UpgradeInfo};
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, Stream, StreamProtocol, SubstreamProtocol, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
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

/// The swarm's side: a handler on every connection that offers the accepted protocols and delivers what
/// peers open.
#[derive(Default)]
pub struct Behaviour {
    acceptor: Acceptor,
}

impl Behaviour {
    /// A behaviour with no protocol accepted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The handle that registers protocols and counts drops (what the node's [`super::Client`] holds).
    pub fn acceptor(&self) -> Acceptor {
        self.acceptor.clone()
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler {
            peer,
            acceptor: self.acceptor.clone(),
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

    fn on_swarm_event(&mut self, _event: FromSwarm) {}

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
        _cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// One connection's inbound side: negotiates any accepted protocol and delivers the stream.
pub struct Handler {
    peer: PeerId,
    acceptor: Acceptor,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = Protocols;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Infallible;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        SubstreamProtocol::new(Protocols(self.acceptor.protocols()), ())
    }

    fn poll(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {}
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
        if let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
            protocol: (stream, protocol),
            ..
        }) = event
        {
            self.acceptor.deliver(self.peer, stream, protocol);
        }
    }
}

/// The accepted protocols, offered on an inbound stream; the stream comes out with the one the peer chose.
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};

    use super::*;
    use crate::net::{self, Client, NetConfig};

    const PROTOCOL: StreamProtocol = StreamProtocol::new("/mana/test-inbound/1.0.0");

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
        let addr = host
            .listen_addrs(Duration::from_secs(10))
            .await
            .unwrap()
            .remove(0);
        opener.dial(addr).await.unwrap();
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
}
