//! `mana node`: run a node (join the network, validate gossip, serve and sync shards), or with
//! `--verify-store` check its store and exit. Every setting comes from a flag, else a `MANA_*` environment
//! variable, else the TOML file given by `--config`, else a default.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use mana_node::daemon::config::{FileConfig, parse_addrs, parse_public_key, parse_run};
use mana_node::daemon::{self, NodeConfig};
use mana_node::store::{Store, StoreConfig};

/// Arguments of `mana node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// TOML config file (keys: listen, bootstrap, data_dir, key, run, coordinator, [limits]).
    #[arg(long, env = "MANA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (repeatable), e.g. /ip4/0.0.0.0/tcp/4001 or /ip4/0.0.0.0/udp/4001/quic-v1.
    #[arg(long, env = "MANA_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Bootstrap node to join through, with /p2p/<peer id> (repeatable).
    #[arg(long, env = "MANA_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// Directory of the store, the key (by default) and status.json.
    #[arg(long, env = "MANA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Key file (created with mode 0600 if absent); default <data dir>/node.key.
    #[arg(long, env = "MANA_KEY")]
    pub key: Option<PathBuf>,
    /// The training run to follow (names the gossip topics).
    #[arg(long, env = "MANA_RUN")]
    pub run: Option<String>,
    /// The run coordinator's public key (64 hex digits).
    #[arg(long, env = "MANA_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Run the DHT in server mode even before an external address is confirmed.
    #[arg(long, env = "MANA_DHT_SERVER")]
    pub dht_server: bool,
    /// Re-hash every blob of the store, print the report and exit (non-zero if damaged).
    #[arg(long)]
    pub verify_store: bool,
}

/// The default data directory.
pub const DEFAULT_DATA_DIR: &str = "mana-data";

/// The default listen addresses: TCP and QUIC on port 4001, all interfaces.
pub fn default_listen() -> Vec<String> {
    vec!["/ip4/0.0.0.0/tcp/4001".into(), "/ip4/0.0.0.0/udp/4001/quic-v1".into()]
}

/// Merges flags/env (already merged by clap) over the file over defaults.
fn node_config(args: &NodeArgs) -> anyhow::Result<NodeConfig> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let data_dir = args.data_dir.clone().or(file.data_dir.clone()).unwrap_or_else(|| DEFAULT_DATA_DIR.into());
    let mut config = NodeConfig::new(data_dir);
    config.key_file = args.key.clone().or(file.key.clone());
    let listen = pick(&args.listen, file.listen.as_ref()).unwrap_or_else(default_listen);
    config.net.listen = parse_addrs(&listen)?;
    config.net.bootstrap = parse_addrs(&pick(&args.bootstrap, file.bootstrap.as_ref()).unwrap_or_default())?;
    if let Some(run) = args.run.as_ref().or(file.run.as_ref()) {
        config.net.run_id = parse_run(run)?;
    }
    if let Some(key) = args.coordinator.as_ref().or(file.coordinator.as_ref()) {
        config.coordinator = Some(parse_public_key(key)?);
    }
    if let Some(limits) = file.limits {
        config.net.limits = limits;
    }
    config.net.kad_server = args.dht_server || all_loopback(&listen);
    config.net.trust_colocated_ips = all_loopback(&listen);
    config.fetch.progress = true;
    Ok(config)
}

/// The flag/env list if given, else the file's.
pub fn pick(flag: &[String], file: Option<&Vec<String>>) -> Option<Vec<String>> {
    if flag.is_empty() { file.cloned() } else { Some(flag.to_vec()) }
}

/// True when every address is on loopback (a local test net: DHT server mode, no co-location penalty).
pub fn all_loopback(addrs: &[String]) -> bool {
    !addrs.is_empty() && addrs.iter().all(|a| a.starts_with("/ip4/127.") || a.starts_with("/ip6/::1/"))
}

/// Runs `mana node`.
pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    let config = node_config(&args)?;
    if args.verify_store {
        return verify_store(&config);
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move { daemon::run(config, shutdown_signal()).await })?;
    Ok(())
}

fn verify_store(config: &NodeConfig) -> anyhow::Result<()> {
    let store = Store::open(config.data_dir.join("store"), StoreConfig::default())?;
    let report = store.verify()?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    anyhow::ensure!(report.is_ok(), "the store is damaged");
    Ok(())
}

/// Completes on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}
