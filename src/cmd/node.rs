//! `mana node`: run a node (join the network, validate gossip, serve and sync shards; with `--coordinator`,
//! train the shards the coordinator assigns), or with `--verify-store` check its store and exit. Every setting comes from a flag, else a `MANA_*` environment
//! variable, else the TOML file given by `--config`, else a default.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use mana_node::daemon::config::{FileConfig, parse_addrs, parse_public_key, parse_run};
use mana_node::daemon::{self, NodeConfig};
use mana_node::roles::common::{DataSource, load_dataset};
use mana_node::roles::trainer::{TrainerConfig, run_trainer};
use mana_engine::round::RunSpec;
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
    /// Most shards (the trunk included) this node will host and train, declared in its heartbeats
    /// (default 64).
    #[arg(long, env = "MANA_MAX_SHARDS")]
    pub max_shards: Option<u32>,
    /// The run's text, as the coordinator's: a UTF-8 file, a .gz, or a directory; default the built-in corpus.
    #[arg(long, env = "MANA_CORPUS")]
    pub corpus: Option<PathBuf>,
    /// Do not train even with a coordinator: only validate, serve and mirror every committed checkpoint.
    #[arg(long, env = "MANA_NO_TRAIN")]
    pub no_train: bool,
}

/// Default of `--max-shards`.
pub const DEFAULT_MAX_SHARDS: u32 = 64;

/// The default data directory.
pub const DEFAULT_DATA_DIR: &str = "mana-data";

/// The default listen addresses: TCP and QUIC on port 4001, all interfaces.
pub fn default_listen() -> Vec<String> {
    vec!["/ip4/0.0.0.0/tcp/4001".into(), "/ip4/0.0.0.0/udp/4001/quic-v1".into()]
}

/// What `mana node` runs besides the daemon.
struct Training {
    max_shards: u32,
    corpus: Option<PathBuf>,
}

/// Merges flags/env (already merged by clap) over the file over defaults. A node with a coordinator trains
/// unless told not to: then it syncs only its assigned shards (the trainer owns its store's rounds).
fn node_config(args: &NodeArgs) -> anyhow::Result<(NodeConfig, Option<Training>)> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let config = base_config(args, &file)?;
    let trains = config.coordinator.is_some() && !args.no_train && file.train.unwrap_or(true);
    if !trains {
        return Ok((config, None));
    }
    let max_shards = args.max_shards.or(file.max_shards).unwrap_or(DEFAULT_MAX_SHARDS);
    anyhow::ensure!(max_shards >= 1, "--max-shards must be at least 1 (the trunk)");
    let mut config = config;
    config.sync_shards = false;
    config.capacity.max_shards = max_shards;
    Ok((config, Some(Training { max_shards, corpus: args.corpus.clone().or(file.corpus.clone()) })))
}

fn base_config(args: &NodeArgs, file: &FileConfig) -> anyhow::Result<NodeConfig> {
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
    if let Some(limits) = file.limits.clone() {
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
    let (config, training) = node_config(&args)?;
    if args.verify_store {
        return verify_store(&config);
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let Some(training) = training else {
        runtime.block_on(async move { daemon::run(config, shutdown_signal()).await })?;
        return Ok(());
    };
    let data = Arc::new(load_dataset(&DataSource { corpus: training.corpus, ..DataSource::default() })?);
    let mut trainer = TrainerConfig::new(RunSpec::tiny(), data);
    trainer.max_shards = training.max_shards;
    runtime.block_on(async move {
        let handle = Arc::new(daemon::start(config).await?);
        {
            let mut out = std::io::stdout().lock();
            for addr in handle.listen_addrs().await? {
                writeln!(out, "{addr}")?;
            }
            out.flush()?;
        }
        let result = run_trainer(handle.clone(), trainer, shutdown_signal()).await;
        match Arc::try_unwrap(handle) {
            Ok(handle) => handle.shutdown().await?,
            Err(_) => tracing::warn!("node still in use at exit; not shut down cleanly"),
        }
        result?;
        anyhow::Ok(())
    })?;
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
