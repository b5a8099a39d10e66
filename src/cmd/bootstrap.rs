//! `mana bootstrap`: run a long-lived DHT server and relay with a persistent identity. It prints its
//! addresses (with `/p2p/<peer id>`) on stdout, one per line: give one to nodes as `--bootstrap`.

use anyhow::Context;
use clap::Args;
use mana_bootstrap::BootstrapConfig;

use super::net::{Net, NetArgs};
use crate::config::{ConfigError, FileTable, FromFile, Layered};

/// Arguments of `mana bootstrap`; its TOML file (`--config`) takes the same names.
#[derive(Debug, Clone, Default, Args)]
pub struct BootstrapArgs {
    /// Settings every network process has (a bootstrap joins no run: no --bootstrap, no --run).
    #[command(flatten)]
    pub net: NetArgs,
}

impl FromFile for BootstrapArgs {
    fn from_file(file: &mut FileTable) -> Result<Self, ConfigError> {
        Ok(BootstrapArgs { net: file.take()? })
    }
}

/// The default data directory of a bootstrap node.
pub const DEFAULT_DATA_DIR: &str = "mana-bootstrap-data";

/// The bootstrap node's settings.
fn bootstrap_config(net: &Net) -> BootstrapConfig {
    let mut config = BootstrapConfig::new(&net.data_dir, Vec::new());
    config.key_file = net.key.clone();
    config.new_key = net.new_key;
    net.apply(&mut config.net);
    config
}

/// Runs `mana bootstrap`.
pub fn run(args: BootstrapArgs) -> anyhow::Result<()> {
    let path = args.net.config.clone();
    let s = Layered::load(args, path.as_deref())?;
    let net = Net::resolve(&s.section(|a| &a.net), DEFAULT_DATA_DIR)?;
    crate::logging::init(net.log_format);
    let config = bootstrap_config(&net);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(mana_bootstrap::run(
        config,
        super::net::shutdown_signal("bootstrap"),
    ))?;
    Ok(())
}
