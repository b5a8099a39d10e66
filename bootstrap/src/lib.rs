//! The bootstrap node: a thin layer on `mana-node`'s network layer that runs only the DHT in server mode and
//! the relay, so that new nodes have a well-known place to join and home routers are no obstacle.
//!
//! It keeps a persistent identity (a key file in its data directory), so its `/p2p/<peer id>` address stays
//! valid across restarts; nodes join with `mana node --bootstrap <that address>`. It subscribes to no gossip
//! topic and holds no blobs: fetch requests get `NotFound`.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::path::PathBuf;
use std::time::Duration;

use libp2p::Multiaddr;
use mana_node::keyfile;
use mana_node::net::{self, Client, NetConfig, NetEvent};
use mana_protocol::FetchResponse;
use tokio::task::JoinHandle;

/// Settings of a bootstrap node.
#[derive(Debug, Clone)]
pub struct BootstrapConfig {
    /// Where the key file lives.
    pub data_dir: PathBuf,
    /// The key file; `<data_dir>/bootstrap.key` when `None`. Created (mode 0600) if absent, unless it was
    /// named explicitly and `new_key` is not set (a typo in a key path must not become a new identity).
    pub key_file: Option<PathBuf>,
    /// Create an explicitly named key file if it is missing.
    pub new_key: bool,
    /// Network settings; [`BootstrapConfig::new`] turns on the relay server and DHT server mode.
    pub net: NetConfig,
}

impl BootstrapConfig {
    /// A bootstrap node listening on `listen`, keeping its key in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>, listen: Vec<Multiaddr>) -> Self {
        let net = NetConfig {
            listen,
            relay_server: true,
            kad_server: true,
            ..NetConfig::default()
        };
        Self {
            data_dir: data_dir.into(),
            key_file: None,
            new_key: false,
            net,
        }
    }

    /// A loopback test bootstrap (port 0, short intervals).
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Self {
        let net = NetConfig {
            relay_server: true,
            kad_server: true,
            ..NetConfig::for_tests()
        };
        Self {
            data_dir: data_dir.into(),
            key_file: None,
            new_key: false,
            net,
        }
    }

    fn key_path(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("bootstrap.key"))
    }
}

/// Why the bootstrap node failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The key file could not be loaded or created.
    #[error(transparent)]
    Key(#[from] keyfile::KeyFileError),
    /// The network failed.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// The data directory could not be created.
    #[error("data dir {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
}

/// A running bootstrap node.
#[derive(Debug)]
pub struct BootstrapHandle {
    client: Client,
    addrs: Vec<Multiaddr>,
    events: JoinHandle<()>,
    net: JoinHandle<()>,
}

/// Starts a bootstrap node and waits until it listens.
pub async fn start(config: BootstrapConfig) -> Result<BootstrapHandle, BootstrapError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| BootstrapError::DataDir(config.data_dir.clone(), e))?;
    let key_path = config.key_path();
    let may_create = config.new_key || config.key_file.is_none();
    let keypair = keyfile::load_or_create(&key_path, may_create)?;
    let (client, events, event_loop) = net::new(keypair.to_libp2p(), config.net)?;
    let net = tokio::spawn(event_loop.run());
    let addrs = client.listen_addrs(Duration::from_secs(10)).await?;
    let events = tokio::spawn(drain_events(client.clone(), events));
    Ok(BootstrapHandle {
        client,
        addrs,
        events,
        net,
    })
}

/// Runs a bootstrap node until `shutdown` completes, printing its addresses (one per line, with
/// `/p2p/<peer id>`) on stdout first.
pub async fn run(
    config: BootstrapConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), BootstrapError> {
    let handle = start(config).await?;
    for addr in handle.addrs() {
        println!("{addr}");
    }
    shutdown.await;
    handle.shutdown().await;
    Ok(())
}

impl BootstrapHandle {
    /// The addresses nodes should pass to `--bootstrap`.
    pub fn addrs(&self) -> &[Multiaddr] {
        &self.addrs
    }

    /// The network handle.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Stops the node.
    pub async fn shutdown(self) {
        self.events.abort();
        let BootstrapHandle {
            client, mut net, ..
        } = self;
        drop(client);
        if tokio::time::timeout(Duration::from_secs(2), &mut net)
            .await
            .is_err()
        {
            tracing::warn!("bootstrap event loop did not stop in time; aborting it");
            net.abort();
            let _ = net.await;
        }
    }
}

/// A bootstrap holds nothing and follows no topic: it answers every fetch with `NotFound` and logs peers.
async fn drain_events(client: Client, mut events: net::Events) {
    let mut peers = 0usize;
    while let Some(event) = events.recv().await {
        match event {
            NetEvent::InboundRequest {
                request, channel, ..
            } => {
                let _ = client
                    .respond(channel, FetchResponse::NotFound { hash: request.hash })
                    .await;
            }
            NetEvent::Gossip { id, source, .. } => {
                let _ = client.report(id, source, net::Verdict::Ignore).await;
            }
            NetEvent::PeerConnected(peer) => {
                peers += 1;
                tracing::info!(%peer, peers, "peer connected");
            }
            NetEvent::PeerDisconnected(peer) => {
                peers = peers.saturating_sub(1);
                tracing::info!(%peer, peers, "peer disconnected");
            }
            NetEvent::Subscribed { .. } => {}
        }
    }
}
