//! A swarm that provides blobs and serves them on bulk streams the hostile way: a correct header, then the
//! bytes one at a time (trickling), or a header that claims more bytes than were asked for (oversized). It
//! speaks no blob lanes, so fetchers reach it over bulk streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mana_node::net::libp2p::identity::Keypair as Libp2pKeypair;
use mana_node::net::libp2p::{Multiaddr, PeerId};
use mana_node::net::{self, Client, NetConfig};
use mana_protocol::{ContentHash, RangeRequest, RangeResponse};

/// How a hostile bulk-stream provider misbehaves once it has told the blob's true size.
#[derive(Clone, Copy)]
pub enum Hostile {
    /// Sends a correct header, then one byte every 100 ms.
    Trickle,
    /// Claims more bytes than were asked for.
    Oversized,
}

/// The blobs a hostile provider claims to hold, and their sizes; the test adds to it as it goes.
pub type Claimed = Arc<Mutex<HashMap<ContentHash, u64>>>;

/// A hostile provider's handle: its id, its address, and its swarm (to announce blobs in the DHT).
pub struct HostileProvider {
    /// Its peer id.
    pub peer: PeerId,
    /// Its first listen address.
    pub addr: Multiaddr,
    /// Its swarm; the swarm lives as long as a clone of this does.
    pub client: Client,
    /// What it claims to hold.
    pub claimed: Claimed,
    /// Range headers it has sent (a test can check that fetchers did reach it).
    pub headers_sent: Arc<std::sync::atomic::AtomicU64>,
}

impl HostileProvider {
    /// Claims blob `hash` of `total` bytes and announces it as a DHT provider record.
    pub async fn claim(&self, hash: ContentHash, total: u64) {
        self.claimed.lock().expect("lock").insert(hash, total);
        self.client
            .start_providing(hash.0.to_vec())
            .await
            .expect("provider record");
    }
}

/// Starts a swarm joining through `boot` that answers bulk streams the `how` way for the blobs it claims
/// (`NotFound` for others).
pub async fn hostile_provider(boot: &[Multiaddr], how: Hostile) -> HostileProvider {
    use mana_node::net::libp2p::futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    let mut config = NetConfig::for_tests();
    config.bootstrap = boot.to_vec();
    let (client, mut events, event_loop) =
        net::new(Libp2pKeypair::generate_ed25519(), config).expect("swarm");
    tokio::spawn(event_loop.run());
    let mut incoming = client.accept_blob_streams().expect("accepting");
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let claimed: Claimed = Arc::default();
    let headers_sent: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let (held, sent) = (claimed.clone(), headers_sent.clone());
    tokio::spawn(async move {
        while let Some((_, mut stream)) = incoming.next().await {
            let (held, sent) = (held.clone(), sent.clone());
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 2];
                    if stream.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut frame = vec![0u8; usize::from(u16::from_le_bytes(len))];
                    if stream.read_exact(&mut frame).await.is_err() {
                        return;
                    }
                    let Ok(request) = RangeRequest::decode(&frame) else {
                        return;
                    };
                    let total = held.lock().expect("lock").get(&request.hash).copied();
                    let Some(total) = total else {
                        let frame = RangeResponse::NotFound { hash: request.hash }
                            .encode()
                            .expect("encodable");
                        let mut out = (frame.len() as u16).to_le_bytes().to_vec();
                        out.extend_from_slice(&frame);
                        if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
                            return;
                        }
                        continue;
                    };
                    let (claimed, trickle) = match how {
                        _ if request.len == 0 => (0, false),
                        Hostile::Trickle => (request.len.min(total - request.offset), true),
                        Hostile::Oversized => {
                            ((request.len + 1).min(total - request.offset), false)
                        }
                    };
                    let header = RangeResponse::Range {
                        hash: request.hash,
                        offset: request.offset,
                        total_size: total,
                        len: claimed,
                    };
                    let frame = header.encode().expect("encodable");
                    let mut out = (frame.len() as u16).to_le_bytes().to_vec();
                    out.extend_from_slice(&frame);
                    if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
                        return;
                    }
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if trickle {
                        // One byte every 100 ms until the fetcher gives up and closes the stream.
                        loop {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            if stream.write_all(&[0]).await.is_err()
                                || stream.flush().await.is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    let addr = client
        .listen_addrs(Duration::from_secs(10))
        .await
        .expect("listening")
        .remove(0);
    HostileProvider {
        peer: client.local_peer_id(),
        addr,
        client,
        claimed,
        headers_sent,
    }
}
