//! `mana bootstrap`: run a long-lived DHT server and relay with a persistent identity. It prints its
//! addresses (with `/p2p/<peer id>`) on stdout, one per line: give one to nodes as `--bootstrap`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use mana_bootstrap::BootstrapConfig;
use mana_node::daemon::config::{FileConfig, parse_addrs};

use super::node::{all_loopback, default_listen, pick, shutdown_signal};

/// Arguments of `mana bootstrap`.
#[derive(Debug, Args)]
pub struct BootstrapArgs {
    /// TOML config file (keys: listen, data_dir, key, [limits]).
    #[arg(long, env = "MANA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (repeatable); default TCP and QUIC on port 4001.
    #[arg(long, env = "MANA_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Directory of the key file (bootstrap.key).
    #[arg(long, env = "MANA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Key file (created with mode 0600 if absent); default <data dir>/bootstrap.key.
    #[arg(long, env = "MANA_KEY")]
    pub key: Option<PathBuf>,
}

/// Runs `mana bootstrap`.
pub fn run(args: BootstrapArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let data_dir = args.data_dir.clone().or(file.data_dir.clone()).unwrap_or_else(|| "mana-bootstrap-data".into());
    let listen = pick(&args.listen, file.listen.as_ref()).unwrap_or_else(default_listen);
    let mut config = BootstrapConfig::new(data_dir, parse_addrs(&listen)?);
    config.key_file = args.key.clone().or(file.key.clone());
    if let Some(limits) = file.limits {
        config.net.limits = limits;
    }
    config.net.trust_colocated_ips = all_loopback(&listen);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(mana_bootstrap::run(config, shutdown_signal()))?;
    Ok(())
}
