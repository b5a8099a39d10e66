//! The settings of a node, and the parsers of their text forms (addresses, run id, coordinator key). The
//! CLI layers flags, `MANA_*` environment variables and its TOML file (its `config` module) into a
//! [`NodeConfig`] with these parsers.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use libp2p::Multiaddr;
use mana_protocol::{PublicKey, RunId, ShardId};

use super::NodeError;
use crate::net::NetConfig;
use crate::net::fetch::FetchOptions;

/// The default of [`NodeConfig::parcel_over_bytes`].
pub const DEFAULT_PARCEL_OVER_BYTES: usize = 64 * 1024;

/// The default of [`NodeConfig::parcel_copies`].
pub const DEFAULT_PARCEL_COPIES: u32 = 0;

/// Everything a running node needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where the key (by default), the store and `status.json` live.
    pub data_dir: PathBuf,
    /// The key file; `<data_dir>/node.key` when `None`. Created (mode 0600) if absent only when `new_key`
    /// is set, or when it is the default file of a data directory that holds no store yet (a first start).
    pub key_file: Option<PathBuf>,
    /// Create the key file if it is missing, wherever it is.
    pub new_key: bool,
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
    /// Most bytes of blobs the store holds (see [`crate::store::StoreConfig::max_blob_bytes`]); `None`: as much
    /// as the disk holds. A node at its quota refuses new blobs with a clear error and takes them again once
    /// old rounds are collected.
    pub store_quota: Option<u64>,
    /// How shards are fetched.
    pub fetch: FetchOptions,
    /// Fetch the shards of every accepted checkpoint manifest that this node lacks (a mirror). Must be off
    /// when a role ([`crate::roles`]) owns the store's rounds: a trainer fetches only the shards it is assigned
    /// and commits its own rounds, a coordinator commits the run's checkpoints.
    pub sync_shards: bool,
    /// With `sync_shards`, the shards of each checkpoint to fetch and keep, the others left to other nodes
    /// (a serve-only node hosting a share of the experts: a model larger than its disk is still served
    /// whole by several such nodes); `None`: every shard (a mirror).
    pub sync_only: Option<BTreeSet<ShardId>>,
    /// What the node declares in its heartbeats (the coordinator assigns experts by it). `max_shards` 0 (the
    /// default) means "assign me nothing": a mirror or a coordinator.
    pub capacity: mana_protocol::Capacity,
    /// Where to serve the operator's dashboard (`--dashboard`; port 0: any free port), if at all.
    pub dashboard: Option<std::net::SocketAddr>,
    /// For a coordinator's node: the envelope size over which its round messages travel as parcels (a blob
    /// behind a gossiped header, [`mana_protocol::Parcel`]) rather than whole in gossip; capped at what a
    /// gossip message holds. 64 KiB by default: each mesh peer sends a node its own copy of a gossiped
    /// message, while a parcel is fetched once.
    pub parcel_over_bytes: usize,
    /// For a coordinator's node: how many copies of each of its parcels' envelopes it serves to whoever asks
    /// first; other fetchers are refused ([`crate::net::fetch::SPREAD`]) and take the envelope from the
    /// members that have it, or are served if they ask again after [`super::SPREAD_PATIENCE`]. Every
    /// member hears a header straight from the coordinator (flood publishing) and would otherwise fetch it
    /// there too: the coordinator's upload would grow with members times a message's size, itself growing
    /// with members. 0 (the default): serve every copy asked for. Off by default: on one 2-core machine
    /// running 32 members, runs with 8 have failed more often (see `docs/architecture.md`); 8 is the setting
    /// measured (`mana coordinator --parcel-copies`).
    pub parcel_copies: u32,
    /// The run's model and initial seed, when this node knows them: a round-0 shard its mirror sync needs is
    /// then made here from them rather than fetched (a trainer makes its own the same way, from its role's spec) (round 0's checkpoint is a pure
    /// function of the spec, and the bytes made must hash to the manifest's entry), and hosted for others.
    /// Nobody has to hold the fresh model whole, the coordinator included. `None`, or a spec that makes other
    /// bytes than the manifest names (another seed): the shard is fetched from whoever holds it.
    pub genesis: Option<mana_engine::round::RunSpec>,
}

impl NodeConfig {
    /// Defaults for a node storing its data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            key_file: None,
            new_key: false,
            net: NetConfig::default(),
            coordinator: None,
            heartbeat_interval: Duration::from_secs(5),
            status_interval: Duration::from_secs(2),
            verify_store: false,
            store_quota: None,
            fetch: FetchOptions::default(),
            sync_shards: true,
            sync_only: None,
            capacity: mana_protocol::Capacity {
                device: mana_protocol::DeviceKind::Cpu,
                memory_bytes: 0,
                tokens_per_second: 0.0,
                max_shards: 0,
            },
            dashboard: None,
            parcel_over_bytes: DEFAULT_PARCEL_OVER_BYTES,
            parcel_copies: DEFAULT_PARCEL_COPIES,
            genesis: None,
        }
    }

    /// A loopback test node: port 0, short intervals.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            net: NetConfig::for_tests(),
            heartbeat_interval: Duration::from_millis(500),
            status_interval: Duration::from_millis(500),
            // The tests' runs use the test preset.
            genesis: Some(mana_engine::round::RunSpec::tiny()),
            ..Self::new(data_dir)
        }
    }

    /// Whether a missing key file may be created: asked for, or the default file of a data directory with
    /// no store yet (a node's first start). An explicit `key_file` that is missing is a typo until told
    /// otherwise, and so is a default key missing beside an existing store (the key was lost or moved).
    pub fn may_create_key(&self) -> bool {
        self.new_key || (self.key_file.is_none() && !self.data_dir.join("store").exists())
    }

    /// The key file's path.
    pub fn key_path(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("node.key"))
    }

    /// Checks the settings that could only fail later.
    pub fn validate(&self) -> Result<(), NodeError> {
        self.net
            .limits
            .validate()
            .map_err(|e| NodeError::Config(e.to_string()))?;
        if self.sync_only.as_ref().is_some_and(|only| only.is_empty()) {
            return Err(NodeError::Config(
                "a node that syncs only some shards must name at least one".into(),
            ));
        }
        if self.heartbeat_interval.is_zero() || self.status_interval.is_zero() {
            return Err(NodeError::Config("intervals must be positive".into()));
        }
        if self.fetch.concurrency == 0
            || self.fetch.per_provider == 0
            || self.fetch.chunk_bytes == 0
        {
            return Err(NodeError::Config(
                "fetch concurrency and chunk size must be positive".into(),
            ));
        }
        for addr in &self.net.bootstrap {
            if !matches!(
                addr.iter().last(),
                Some(libp2p::multiaddr::Protocol::P2p(_))
            ) {
                return Err(NodeError::Config(format!(
                    "bootstrap address {addr} lacks /p2p/<peer id>"
                )));
            }
        }
        Ok(())
    }
}

/// Parses multiaddrs, naming the bad one.
pub fn parse_addrs(list: &[String]) -> Result<Vec<Multiaddr>, NodeError> {
    list.iter()
        .map(|s| {
            s.parse::<Multiaddr>()
                .map_err(|e| NodeError::Config(format!("bad multiaddr {s:?}: {e}")))
        })
        .collect()
}

/// Parses a run id.
pub fn parse_run(s: &str) -> Result<RunId, NodeError> {
    RunId::new(s).map_err(|e| NodeError::Config(format!("bad run id {s:?}: {e}")))
}

/// Parses a public key from 64 hex digits.
pub fn parse_public_key(s: &str) -> Result<PublicKey, NodeError> {
    let bytes = hex::decode(s.trim())
        .map_err(|e| NodeError::Config(format!("bad public key {:?}: {e}", truncate(s))))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| NodeError::Config("a public key is 32 bytes (64 hex digits)".into()))?;
    Ok(PublicKey(bytes))
}

/// At most 80 characters of `s`, for an error message about untrusted text.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_created_on_a_first_start_or_when_asked_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = NodeConfig::new(dir.path());
        assert!(
            config.may_create_key(),
            "a first start with the default key"
        );
        config.key_file = Some(dir.path().join("other.key"));
        assert!(
            !config.may_create_key(),
            "an explicit key file that is missing"
        );
        config.new_key = true;
        assert!(config.may_create_key(), "unless asked");
        let mut config = NodeConfig::new(dir.path());
        std::fs::create_dir_all(dir.path().join("store")).expect("a store");
        assert!(
            !config.may_create_key(),
            "a default key missing beside a store"
        );
        config.new_key = true;
        assert!(config.may_create_key());
    }

    #[test]
    fn bad_text_is_refused() {
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
