//! Helpers shared by the multi-node tests (`tests/net_*.rs`): start a bootstrap and nodes on loopback with
//! port 0 and short intervals, and poll for a condition with a deadline.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use mana_bootstrap::{BootstrapConfig, BootstrapHandle};
use mana_node::daemon::{self, NodeConfig, NodeHandle};
use mana_node::net::libp2p::Multiaddr;

/// Starts a loopback bootstrap node keeping its key in `dir`.
pub async fn start_bootstrap(dir: &Path) -> BootstrapHandle {
    mana_bootstrap::start(BootstrapConfig::for_tests(dir)).await.expect("bootstrap starts")
}

/// A loopback node config in `dir`, joining through `bootstrap`.
pub fn node_config(dir: &Path, bootstrap: &[Multiaddr]) -> NodeConfig {
    let mut config = NodeConfig::for_tests(dir);
    config.net.bootstrap = bootstrap.to_vec();
    config
}

/// Starts a node.
pub async fn start_node(config: NodeConfig) -> NodeHandle {
    daemon::start(config).await.expect("node starts")
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so payloads are incompressible and reproducible.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}
