//! The connection and serving limits hold under an inbound flood (issue #14, section 2), on loopback with real swarms:
//! - one address gets at most `max_inbound_per_ip` inbound connections, however many peers dial from it, and
//!   a closed connection frees its slot;
//! - inbound connections never take the `outbound_reserve` slots: after an inbound flood the node still dials
//!   out (an attacker who fills its inbound slots cannot eclipse it);
//! - chunk requests from one peer beyond `max_served_requests_per_peer` at once are answered busy, so what a
//!   peer's requests can pin in memory is that many chunks.
//!
//! Every refusal is counted (`inbound_denied`, `denied_connections` in status.json). Each step waits on a
//! condition: the dials are settled when the node holds or has refused every dialer.

mod net_support;

use std::time::Duration;

use mana_node::net::libp2p::identity::Keypair as Libp2pKeypair;
use mana_node::net::libp2p::{Multiaddr, multiaddr::Protocol};
use mana_node::net::{self, Client, NetConfig, NetSnapshot};
use net_support::*;

const STEP: Duration = Duration::from_secs(60);

/// A bare swarm on loopback with `config`; its events are drained.
fn swarm(config: NetConfig) -> Client {
    let (client, mut events, event_loop) =
        net::new(Libp2pKeypair::generate_ed25519(), config).expect("swarm");
    tokio::spawn(event_loop.run());
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    client
}

/// The address a peer dials to reach `client`, with its peer id.
async fn address(client: &Client) -> Multiaddr {
    let addr = client
        .listen_addrs(STEP)
        .await
        .expect("listening")
        .into_iter()
        .next()
        .expect("an address");
    addr.with(Protocol::P2p(client.local_peer_id()))
}

fn connected(snap: &NetSnapshot, peer: &Client) -> bool {
    let id = peer.local_peer_id().to_string();
    snap.peers.iter().any(|p| p.peer_id == id)
}

/// Every dialer is either connected to `target` or was refused by it.
async fn settled(target: &Client, dialers: &[Client]) -> NetSnapshot {
    wait_for(STEP, "every dial held or refused", || async {
        let snap = target.snapshot().await.ok()?;
        let held = dialers.iter().filter(|d| connected(&snap, d)).count() as u64;
        (held + snap.inbound_denied >= dialers.len() as u64).then_some(snap)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share_of_inbound_connections() {
    init_tracing();
    const CAP: usize = 3;
    const DIALERS: usize = 8;
    let mut config = NetConfig::for_tests();
    // Loopback counts like any address here (a loopback-only test network trusts it by default).
    config.trust_colocated_ips = false;
    config.limits.max_inbound_per_ip = CAP as u32;
    let target = swarm(config);
    let target_addr = address(&target).await;

    let dialers: Vec<Client> = (0..DIALERS)
        .map(|_| swarm(NetConfig::for_tests()))
        .collect();
    for d in &dialers {
        d.dial(target_addr.clone()).await.expect("dial issued");
    }
    let snap = settled(&target, &dialers).await;
    let held: Vec<&Client> = dialers.iter().filter(|d| connected(&snap, d)).collect();
    assert_eq!(
        held.len(),
        CAP,
        "one address holds {} inbound connections (cap {CAP})",
        held.len()
    );
    assert!(
        snap.inbound_denied >= (DIALERS - CAP) as u64,
        "{} refusals counted for {} dialers over the cap",
        snap.inbound_denied,
        DIALERS - CAP
    );

    // A closed connection frees its slot: one held dialer leaves, a new one gets in.
    let leaving = held[0].local_peer_id().to_string();
    let dialers: Vec<Client> = dialers
        .into_iter()
        .filter(|d| d.local_peer_id().to_string() != leaving)
        .collect();
    wait_for(STEP, "the target to see the dialer leave", || async {
        let snap = target.snapshot().await.ok()?;
        (!snap.peers.iter().any(|p| p.peer_id == leaving)).then_some(())
    })
    .await;
    let newcomer = swarm(NetConfig::for_tests());
    newcomer
        .dial(target_addr.clone())
        .await
        .expect("dial issued");
    let snap = wait_for(STEP, "the newcomer to take the freed slot", || async {
        let snap = target.snapshot().await.ok()?;
        connected(&snap, &newcomer).then_some(snap)
    })
    .await;
    let held = dialers.iter().filter(|d| connected(&snap, d)).count() + 1;
    assert!(held <= CAP, "{held} inbound connections from one address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_flood_leaves_the_node_room_for_its_own_dials() {
    init_tracing();
    const TOTAL: u32 = 8;
    const RESERVE: u32 = 4;
    const DIALERS: usize = 10;
    let mut config = NetConfig::for_tests();
    config.limits.max_connections = TOTAL;
    config.limits.outbound_reserve = RESERVE;
    let target = swarm(config);
    let target_addr = address(&target).await;

    let flood: Vec<Client> = (0..DIALERS)
        .map(|_| swarm(NetConfig::for_tests()))
        .collect();
    for d in &flood {
        d.dial(target_addr.clone()).await.expect("dial issued");
    }
    let snap = settled(&target, &flood).await;
    let inbound = flood.iter().filter(|d| connected(&snap, d)).count() as u32;
    assert_eq!(
        inbound,
        TOTAL - RESERVE,
        "inbound connections took {inbound} of {TOTAL} slots (reserve {RESERVE})"
    );

    // The node's own dials still get through, into the reserved slots.
    let chosen: Vec<Client> = (0..RESERVE)
        .map(|_| swarm(NetConfig::for_tests()))
        .collect();
    for peer in &chosen {
        target.dial(address(peer).await).await.expect("dial issued");
    }
    let snap = wait_for(STEP, "the node's own dials to connect", || async {
        let snap = target.snapshot().await.ok()?;
        chosen.iter().all(|p| connected(&snap, p)).then_some(snap)
    })
    .await;
    assert!(
        snap.peers.len() as u32 <= TOTAL,
        "{} connections (cap {TOTAL})",
        snap.peers.len()
    );
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_requests_past_the_per_peer_cap_are_answered_busy() {
    use mana_protocol::{FetchRequest, FetchResponse};
    init_tracing();
    const CAP: usize = 2;
    const REQUESTS: usize = 24;
    const CHUNK: u32 = 4 * 1024 * 1024;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = node_config(dir.path(), &[]);
    config.net.limits.max_served_requests_per_peer = CAP;
    let node = start_node(config).await;
    let blob = pseudo_random_bytes(4 * CHUNK as usize, 7);
    let hash = node.store().put_blob(&blob).expect("stored").hash();
    let node_addr = node
        .listen_addrs()
        .await
        .expect("listening")
        .into_iter()
        .next()
        .expect("an address")
        .with(Protocol::P2p(node.peer_id()));

    let asker = swarm(NetConfig::for_tests());
    asker.dial(node_addr).await.expect("dial issued");
    wait_for(STEP, "connected", || async {
        let snap = asker.snapshot().await.ok()?;
        snap.peers
            .iter()
            .any(|p| p.peer_id == node.peer_id().to_string())
            .then_some(())
    })
    .await;
    // Every request at once: each answered one holds a 4 MiB chunk until it is sent.
    let mut asking = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let (asker, peer) = (asker.clone(), node.peer_id());
        asking.spawn(async move {
            asker
                .request(
                    peer,
                    FetchRequest {
                        hash,
                        offset: (i % 4) as u64 * u64::from(CHUNK),
                        max_len: CHUNK,
                    },
                )
                .await
        });
    }
    let (mut served, mut busy) = (0, 0);
    while let Some(answer) = asking.join_next().await {
        match answer.expect("request task").expect("an answer") {
            FetchResponse::Chunk { data, offset, .. } => {
                let at = offset as usize;
                assert_eq!(data.0, blob[at..at + CHUNK as usize], "served bytes");
                served += 1;
            }
            FetchResponse::Refused { reason } => {
                assert!(reason.as_str().contains("busy"), "refused: {reason:?}");
                busy += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    eprintln!("{REQUESTS} requests at once: {served} served, {busy} answered busy (cap {CAP})");
    assert!(served >= CAP, "only {served} served");
    assert!(
        busy > 0,
        "{REQUESTS} requests at once, all served: the per-peer cap of {CAP} did not hold"
    );
    node.shutdown().await.expect("shutdown");
}
