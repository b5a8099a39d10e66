//! The settings of a node, and the TOML file that can hold them. The CLI merges flags, `MANA_*` environment
//! variables and this file (in that order of precedence) into a [`NodeConfig`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::Multiaddr;
use mana_protocol::{PublicKey, RunId};
use serde::Deserialize;

use super::NodeError;
use crate::net::fetch::FetchOptions;
use crate::net::{Limits, NetConfig};

/// Everything a running node needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where the key (by default), the store and `status.json` live.
    pub data_dir: PathBuf,
    /// The key file; `<data_dir>/node.key` when `None`. Created (mode 0600) if absent.
    pub key_file: Option<PathBuf>,
    /// Network settings (listen addresses, bootstrap nodes, run, limits).
    pub net: NetConfig,
    /// The run coordinator's public key: only it may sign round announcements, commits and manifests.
    /// Without one, such messages are ignored (not followed, not penalised).
    pub coordinator: Option<PublicKey>,
    /// How often a signed heartbeat is published.
    pub heartbeat_interval: Duration,
    /// How often `status.json` is rewritten.
    pub status_interval: Duration,
    /// Re-hash every blob of the store at start-up and refuse to start if any is damaged.
    pub verify_store: bool,
    /// How shards are fetched.
    pub fetch: FetchOptions,
    /// Fetch the shards of every accepted checkpoint manifest that this node lacks (a mirror). Must be off
    /// when a role ([`crate::roles`]) owns the store's rounds: a trainer fetches only the shards it is assigned
    /// and commits its own rounds, a coordinator commits the run's checkpoints.
    pub sync_shards: bool,
    /// What the node declares in its heartbeats (the coordinator assigns experts by it). `max_shards` 0 (the
    /// default) means "assign me nothing": a mirror or a coordinator.
    pub capacity: mana_protocol::Capacity,
}

impl NodeConfig {
    /// Defaults for a node storing its data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            key_file: None,
            net: NetConfig::default(),
            coordinator: None,
            heartbeat_interval: Duration::from_secs(5),
            status_interval: Duration::from_secs(2),
            verify_store: false,
            fetch: FetchOptions::default(),
            sync_shards: true,
            capacity: mana_protocol::Capacity {
                device: mana_protocol::DeviceKind::Cpu,
                memory_bytes: 0,
                tokens_per_second: 0.0,
                max_shards: 0,
            },
        }
    }

    /// A loopback test node: port 0, short intervals.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            net: NetConfig::for_tests(),
            heartbeat_interval: Duration::from_millis(500),
            status_interval: Duration::from_millis(500),
            ..Self::new(data_dir)
        }
    }

    /// The key file's path.
    pub fn key_path(&self) -> PathBuf {
        self.key_file.clone().unwrap_or_else(|| self.data_dir.join("node.key"))
    }

    /// Checks the settings that could only fail later.
    pub fn validate(&self) -> Result<(), NodeError> {
        self.net.limits.validate().map_err(|e| NodeError::Config(e.to_string()))?;
        if self.heartbeat_interval.is_zero() || self.status_interval.is_zero() {
            return Err(NodeError::Config("intervals must be positive".into()));
        }
        if self.fetch.concurrency == 0 || self.fetch.per_provider == 0 || self.fetch.chunk_bytes == 0 {
            return Err(NodeError::Config("fetch concurrency and chunk size must be positive".into()));
        }
        for addr in &self.net.bootstrap {
            if !matches!(addr.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
                return Err(NodeError::Config(format!("bootstrap address {addr} lacks /p2p/<peer id>")));
            }
        }
        Ok(())
    }
}

/// The TOML config file of `mana node` / `mana bootstrap` (every key optional).
///
/// ```toml
/// listen = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]
/// bootstrap = ["/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."]
/// data_dir = "/var/lib/mana"
/// key = "/var/lib/mana/node.key"
/// run = "demo"
/// coordinator = "<64 hex digits>"
/// [limits]
/// max_connections = 256
/// ```
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listen addresses.
    pub listen: Option<Vec<String>>,
    /// Bootstrap addresses.
    pub bootstrap: Option<Vec<String>>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Key file.
    pub key: Option<PathBuf>,
    /// Run id.
    pub run: Option<String>,
    /// Coordinator public key, hex.
    pub coordinator: Option<String>,
    /// Network limits.
    pub limits: Option<Limits>,
    /// Most shards (trunk included) a training node hosts.
    pub max_shards: Option<u32>,
    /// The run's text (a file, a .gz or a directory); the built-in corpus if absent.
    pub corpus: Option<PathBuf>,
    /// Whether a node with a coordinator trains (default true).
    pub train: Option<bool>,
}

/// Largest config file read (a real one is a few hundred bytes).
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

impl FileConfig {
    /// Reads and parses a TOML config file.
    pub fn load(path: &Path) -> Result<FileConfig, NodeError> {
        let meta = std::fs::metadata(path).map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(NodeError::Config(format!("{}: larger than 1 MiB", path.display())));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

/// Parses multiaddrs, naming the bad one.
pub fn parse_addrs(list: &[String]) -> Result<Vec<Multiaddr>, NodeError> {
    list.iter()
        .map(|s| s.parse::<Multiaddr>().map_err(|e| NodeError::Config(format!("bad multiaddr {s:?}: {e}"))))
        .collect()
}

/// Parses a run id.
pub fn parse_run(s: &str) -> Result<RunId, NodeError> {
    RunId::new(s).map_err(|e| NodeError::Config(format!("bad run id {s:?}: {e}")))
}

/// Parses a public key from 64 hex digits.
pub fn parse_public_key(s: &str) -> Result<PublicKey, NodeError> {
    let bytes = hex::decode(s.trim()).map_err(|e| NodeError::Config(format!("bad coordinator key: {e}")))?;
    let bytes: [u8; 32] =
        bytes.try_into().map_err(|_| NodeError::Config("coordinator key must be 32 bytes (64 hex digits)".into()))?;
    Ok(PublicKey(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_config_parses_and_rejects_unknown_keys() {
        let cfg = FileConfig::parse("listen = [\"/ip4/127.0.0.1/tcp/0\"]\nrun = \"demo\"\n[limits]\nmax_connections = 9\n")
            .expect("valid config");
        assert_eq!(cfg.run.as_deref(), Some("demo"));
        assert_eq!(cfg.limits.map(|l| l.max_connections), Some(9));
        assert!(FileConfig::parse("lisen = []").is_err());
        assert!(parse_addrs(&["not an addr".into()]).is_err());
        assert!(parse_public_key("abcd").is_err());
    }

    #[test]
    fn bootstrap_needs_peer_id() {
        let mut cfg = NodeConfig::new("/tmp/x");
        cfg.net.bootstrap = parse_addrs(&["/ip4/127.0.0.1/tcp/1".into()]).expect("valid");
        assert!(cfg.validate().is_err());
    }
}
