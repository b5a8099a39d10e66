//! Listen addresses checked before the swarm binds them. libp2p's TCP transport sets `SO_REUSEPORT` on its
//! listening sockets (so that dials can reuse the port), which lets a second process bind a port already in
//! use and silently share its incoming connections; and some bind failures reach the user with an empty
//! reason. So each address with a fixed port is first bound here, exclusively, by the standard library: a
//! port in use, an address not on this machine or a port below 1024 without the right to it is refused
//! with the operating system's own words.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

use super::NetError;

/// Binds `addr` once, exclusively, and releases it: an error says why the swarm could not have it to itself.
/// Addresses with port 0 (the system picks a free port), and any the standard library cannot bind directly
/// (DNS names, relay circuits, memory transports), are left to the swarm.
pub fn check_exclusive(addr: &Multiaddr) -> Result<(), NetError> {
    let Some((socket, udp)) = socket_addr(addr) else {
        return Ok(());
    };
    if socket.port() == 0 {
        return Ok(());
    }
    let bound = if udp {
        UdpSocket::bind(socket).map(drop)
    } else {
        TcpListener::bind(socket).map(drop)
    };
    bound.map_err(|source| NetError::ListenUnavailable {
        addr: addr.clone(),
        reason: reason(&source),
        source,
    })
}

/// The IP socket address of a plain TCP or UDP (QUIC) listen address, and whether it is UDP.
fn socket_addr(addr: &Multiaddr) -> Option<(SocketAddr, bool)> {
    let mut ip: Option<IpAddr> = None;
    let mut port: Option<(u16, bool)> = None;
    for protocol in addr.iter() {
        match protocol {
            Protocol::Ip4(v4) if ip.is_none() => ip = Some(v4.into()),
            Protocol::Ip6(v6) if ip.is_none() => ip = Some(v6.into()),
            Protocol::Tcp(p) if port.is_none() => port = Some((p, false)),
            Protocol::Udp(p) if port.is_none() => port = Some((p, true)),
            Protocol::QuicV1 | Protocol::P2p(_) => {}
            // Anything else (websocket, relay circuit, DNS...) is not a plain socket of ours.
            _ => return None,
        }
    }
    let (port, udp) = port?;
    Some((SocketAddr::new(ip?, port), udp))
}

/// The operator's reading of a bind error.
fn reason(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrInUse => "the port is already in use by another process",
        io::ErrorKind::AddrNotAvailable => "the address is not one of this machine's",
        io::ErrorKind::PermissionDenied => {
            "no permission to bind it (ports below 1024 need privileges)"
        }
        _ => "it cannot be bound",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_is_refused_with_its_reason() {
        let held = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = held.local_addr().expect("addr").port();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}")
            .parse()
            .expect("multiaddr");
        let err = check_exclusive(&addr).expect_err("in use");
        assert!(err.to_string().contains("already in use"), "{err}");
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("addr").port();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/udp/{port}/quic-v1")
            .parse()
            .expect("multiaddr");
        let err = check_exclusive(&addr).expect_err("in use");
        assert!(err.to_string().contains("already in use"), "{err}");
    }

    #[test]
    fn free_ports_port_zero_and_other_transports_pass() {
        for addr in [
            "/ip4/127.0.0.1/tcp/0",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "/dns4/example.org/tcp/4001",
        ] {
            check_exclusive(&addr.parse().expect("multiaddr")).expect(addr);
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        check_exclusive(
            &format!("/ip4/127.0.0.1/tcp/{port}")
                .parse()
                .expect("multiaddr"),
        )
        .expect("free again");
    }

    #[test]
    fn an_address_of_another_machine_is_refused() {
        // TEST-NET-1 (RFC 5737) is never assigned to a local interface.
        let err = check_exclusive(&"/ip4/192.0.2.1/tcp/4001".parse().expect("multiaddr"))
            .expect_err("not local");
        assert!(
            err.to_string().contains("not one of this machine's"),
            "{err}"
        );
    }
}
