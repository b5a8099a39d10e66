//! Inbound connections per remote IP address. One machine (a host running many keys, or a flood from one
//! address) may hold at most `max_per_ip` inbound connections, so it cannot take the slots of everyone else;
//! the cap on inbound connections in all (below the total, see [`super::Limits::outbound_reserve`]) is
//! libp2p's `connection_limits`, so slots always stay for this node's own dials and an inbound flood cannot
//! eclipse it. Loopback is exempt when colocated processes are trusted (`trust_colocated_ips`: the demo and
//! the tests run every node on 127.0.0.1).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::{ConnectionClosed, ListenFailure};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("{ip} already holds {held} inbound connections, the most one address may")]
pub struct TooManyFromIp {
    /// The remote address.
    pub ip: IpAddr,
    /// Inbound connections it holds.
    pub held: usize,
}

/// Counts inbound connections by remote IP and refuses one past the cap (before its handshake when it can).
pub struct IpLimits {
    max_per_ip: usize,
    exempt_loopback: bool,
    inbound: HashMap<IpAddr, usize>,
    by_connection: HashMap<ConnectionId, IpAddr>,
}

impl IpLimits {
    /// At most `max_per_ip` inbound connections per remote address; loopback unlimited when
    /// `exempt_loopback`.
    pub fn new(max_per_ip: usize, exempt_loopback: bool) -> IpLimits {
        IpLimits {
            max_per_ip,
            exempt_loopback,
            inbound: HashMap::new(),
            by_connection: HashMap::new(),
        }
    }

    /// Addresses holding inbound connections now (the map is pruned as they close).
    pub fn addresses(&self) -> usize {
        self.inbound.len()
    }

    /// The address to count `remote` under, or `None` when it is not counted.
    fn counted(&self, remote: &Multiaddr) -> Option<IpAddr> {
        let ip = remote.iter().find_map(|p| match p {
            Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
            Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
            _ => None,
        })?;
        (!(self.exempt_loopback && ip.is_loopback())).then_some(ip)
    }

    fn check(&self, remote: &Multiaddr) -> Result<Option<IpAddr>, ConnectionDenied> {
        let Some(ip) = self.counted(remote) else {
            return Ok(None);
        };
        let held = self.inbound.get(&ip).copied().unwrap_or(0);
        if held >= self.max_per_ip {
            return Err(ConnectionDenied::new(TooManyFromIp { ip, held }));
        }
        Ok(Some(ip))
    }

    fn forget(&mut self, connection: ConnectionId) {
        let Some(ip) = self.by_connection.remove(&connection) else {
            return;
        };
        if let Some(held) = self.inbound.get_mut(&ip) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.inbound.remove(&ip);
            }
        }
    }
}

impl NetworkBehaviour for IpLimits {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.check(remote).map(|_| ())
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if let Some(ip) = self.check(remote)? {
            *self.inbound.entry(ip).or_insert(0) += 1;
            self.by_connection.insert(connection, ip);
        }
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. })
            | FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.forget(connection_id)
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> Multiaddr {
        text.parse().expect("multiaddr")
    }

    fn inbound(limits: &mut IpLimits, id: ConnectionId, remote: &str) -> bool {
        let remote = addr(remote);
        let local = addr("/ip4/10.0.0.9/tcp/4001");
        limits
            .handle_pending_inbound_connection(id, &local, &remote)
            .is_ok()
            && limits
                .handle_established_inbound_connection(id, PeerId::random(), &local, &remote)
                .is_ok()
    }

    #[test]
    fn an_address_holds_at_most_its_share_and_closing_frees_it() {
        let mut limits = IpLimits::new(2, true);
        let ids: Vec<ConnectionId> = (0..6)
            .map(|_| ConnectionId::new_unchecked(rand_id()))
            .collect();
        assert!(inbound(&mut limits, ids[0], "/ip4/203.0.113.5/tcp/1000"));
        assert!(inbound(
            &mut limits,
            ids[1],
            "/ip4/203.0.113.5/udp/1001/quic-v1"
        ));
        assert!(
            !inbound(&mut limits, ids[2], "/ip4/203.0.113.5/tcp/1002"),
            "a third from one address"
        );
        assert!(inbound(&mut limits, ids[3], "/ip6/2001:db8::1/tcp/1000"));
        // Loopback is exempt here (trusted colocated processes).
        for id in &ids[4..] {
            assert!(inbound(&mut limits, *id, "/ip4/127.0.0.1/tcp/1000"));
        }
        assert_eq!(limits.addresses(), 2);
        limits.forget(ids[0]);
        assert!(inbound(
            &mut limits,
            ConnectionId::new_unchecked(rand_id()),
            "/ip4/203.0.113.5/tcp/1003"
        ));
        limits.forget(ids[3]);
        assert_eq!(
            limits.addresses(),
            1,
            "an address without connections is forgotten"
        );
        // Without the exemption, loopback counts like any address.
        let mut strict = IpLimits::new(1, false);
        assert!(inbound(
            &mut strict,
            ConnectionId::new_unchecked(1),
            "/ip4/127.0.0.1/tcp/1"
        ));
        assert!(!inbound(
            &mut strict,
            ConnectionId::new_unchecked(2),
            "/ip4/127.0.0.1/tcp/2"
        ));
    }

    /// Connection ids that do not collide within a test.
    fn rand_id() -> usize {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(1000);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }
}
