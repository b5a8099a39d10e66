//! `mana coordinator`: coordinate a training run. It joins the network as a peer with its own key, creates (or
//! resumes from its data directory) the run's checkpoint, announces rounds to the nodes whose heartbeats
//! arrive, verifies and aggregates their deltas, and commits each round. On stdout it prints one
//! `addr <multiaddr>` line per listen address and one `coordinator-key <hex>` line (what nodes pass as
//! `--coordinator`). With `--rounds N` it exports the model to `--export` after round N and exits 0; on
//! ctrl-c or SIGTERM it exports the last committed model (when `--export` is given) and exits 0.
//!
//! Every setting comes from a flag, else a `MANA_*` environment variable, else the TOML file given by
//! `--config`, else a default.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use mana_node::daemon::config::{parse_addrs, parse_run};
use mana_node::daemon::{self, NodeConfig};
use mana_node::net::Limits;
use mana_node::roles::common::{DataSource, load_dataset};
use mana_node::roles::conductor::{ConductorConfig, machine_config, run_conductor};
use mana_engine::round::RunSpec;
use mana_protocol::UpdateRule;
use serde::Deserialize;

use super::node::{all_loopback, default_listen, pick, shutdown_signal};

/// The update rule, as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// Synchronous data parallelism (one AdamW step per round on the mean gradient).
    Sync,
    /// DiLoCo (H inner steps per round, outer Nesterov step on the mean pseudo-gradient).
    Diloco,
}

/// Arguments of `mana coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// TOML config file (keys: the flags' names with underscores, plus [limits]).
    #[arg(long, env = "MANA_CONFIG")]
    pub config: Option<PathBuf>,
    /// The run to coordinate (names the gossip topics).
    #[arg(long, env = "MANA_RUN")]
    pub run: Option<String>,
    /// Address to listen on (repeatable).
    #[arg(long, env = "MANA_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Bootstrap node to join through, with /p2p/<peer id> (repeatable).
    #[arg(long, env = "MANA_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// Directory of the store (the run's checkpoints and saved state), the key and status.json.
    #[arg(long, env = "MANA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Key file (created with mode 0600 if absent); default <data dir>/node.key.
    #[arg(long, env = "MANA_KEY")]
    pub key: Option<PathBuf>,
    /// Update rule: sync (default) or diloco.
    #[arg(long, env = "MANA_RULE")]
    pub rule: Option<Rule>,
    /// Micro-batches (sync) or inner steps (diloco) per round; default 1 (sync) or 20 (diloco).
    #[arg(long, env = "MANA_INNER_STEPS")]
    pub inner_steps: Option<u32>,
    /// Members needed before a round starts (default 2, at least --replication).
    #[arg(long, env = "MANA_MIN_MEMBERS")]
    pub min_members: Option<usize>,
    /// Hosts per routed expert (default 2).
    #[arg(long, env = "MANA_REPLICATION")]
    pub replication: Option<usize>,
    /// Stop after this round is committed (export the model, exit 0).
    #[arg(long, env = "MANA_ROUNDS")]
    pub rounds: Option<u64>,
    /// Training time per round before the delta deadline, in ms (default 10000).
    #[arg(long, env = "MANA_ROUND_MS")]
    pub round_ms: Option<u64>,
    /// Time from the delta deadline to the commit deadline (verification, aggregation), in ms (default 10000).
    #[arg(long, env = "MANA_VERIFY_MS")]
    pub verify_ms: Option<u64>,
    /// Pause between a commit and the next announcement, in ms (default 500).
    #[arg(long, env = "MANA_COOLDOWN_MS")]
    pub cooldown_ms: Option<u64>,
    /// File to append one JSON line per committed round to.
    #[arg(long, env = "MANA_METRICS")]
    pub metrics: Option<PathBuf>,
    /// Directory to save the final model to (at --rounds, and on ctrl-c/SIGTERM).
    #[arg(long, env = "MANA_EXPORT")]
    pub export: Option<PathBuf>,
    /// The run's text (same for every node): a UTF-8 file, a .gz, or a directory; default the built-in corpus.
    #[arg(long, env = "MANA_CORPUS")]
    pub corpus: Option<PathBuf>,
    /// Seed of the model's initial weights.
    #[arg(long, env = "MANA_SEED")]
    pub seed: Option<u64>,
    /// Share of contributions loss-checked in sync mode (diloco checks all), default 0.25.
    #[arg(long, env = "MANA_LOSS_CHECK_SHARE")]
    pub loss_check_share: Option<f64>,
    /// Inner learning rate announced with every round (default: the run preset's).
    #[arg(long, env = "MANA_LR")]
    pub lr: Option<f32>,
}

/// The TOML file of `mana coordinator` (every key optional).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorFile {
    /// Run id.
    pub run: Option<String>,
    /// Listen addresses.
    pub listen: Option<Vec<String>>,
    /// Bootstrap addresses.
    pub bootstrap: Option<Vec<String>>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Key file.
    pub key: Option<PathBuf>,
    /// Update rule.
    pub rule: Option<Rule>,
    /// Inner steps per round.
    pub inner_steps: Option<u32>,
    /// Members needed.
    pub min_members: Option<usize>,
    /// Hosts per expert.
    pub replication: Option<usize>,
    /// Last round.
    pub rounds: Option<u64>,
    /// Training ms per round.
    pub round_ms: Option<u64>,
    /// Verification ms per round.
    pub verify_ms: Option<u64>,
    /// Cooldown ms.
    pub cooldown_ms: Option<u64>,
    /// Metrics file.
    pub metrics: Option<PathBuf>,
    /// Export directory.
    pub export: Option<PathBuf>,
    /// Corpus.
    pub corpus: Option<PathBuf>,
    /// Init seed.
    pub seed: Option<u64>,
    /// Loss-check share.
    pub loss_check_share: Option<f64>,
    /// Inner learning rate.
    pub lr: Option<f32>,
    /// Network limits.
    pub limits: Option<Limits>,
}

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

fn load_file(path: &Path) -> anyhow::Result<CoordinatorFile> {
    let meta = std::fs::metadata(path).with_context(|| path.display().to_string())?;
    anyhow::ensure!(meta.len() <= MAX_CONFIG_BYTES, "{}: larger than 1 MiB", path.display());
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    toml::from_str(&text).with_context(|| path.display().to_string())
}

/// Runs `mana coordinator`.
pub fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => load_file(path)?,
        None => CoordinatorFile::default(),
    };
    let data_dir = args.data_dir.clone().or(file.data_dir.clone()).unwrap_or_else(|| "mana-coordinator-data".into());
    let mut node = NodeConfig::new(&data_dir);
    node.key_file = args.key.clone().or(file.key.clone());
    let listen = pick(&args.listen, file.listen.as_ref()).unwrap_or_else(default_listen);
    node.net.listen = parse_addrs(&listen)?;
    node.net.bootstrap = parse_addrs(&pick(&args.bootstrap, file.bootstrap.as_ref()).unwrap_or_default())?;
    let run_name = args.run.clone().or(file.run.clone()).context("--run NAME is required")?;
    node.net.run_id = parse_run(&run_name)?;
    if let Some(limits) = file.limits {
        node.net.limits = limits;
    }
    node.net.kad_server = all_loopback(&listen);
    node.net.trust_colocated_ips = all_loopback(&listen);
    node.sync_shards = false;

    let rule = match args.rule.or(file.rule).unwrap_or(Rule::Sync) {
        Rule::Sync => UpdateRule::Sync,
        Rule::Diloco => UpdateRule::Diloco,
    };
    let mut spec = RunSpec::tiny();
    if let Some(seed) = args.seed.or(file.seed) {
        spec.init_seed = seed;
    }
    let default_h = if rule == UpdateRule::Sync { 1 } else { 20 };
    let inner_steps = args.inner_steps.or(file.inner_steps).unwrap_or(default_h);
    let mut machine = machine_config(node.net.run_id.clone(), &spec, rule, inner_steps)?;
    machine.replication = args.replication.or(file.replication).unwrap_or(machine.replication);
    machine.min_members = args.min_members.or(file.min_members).unwrap_or(machine.min_members.max(machine.replication));
    machine.train_ms = args.round_ms.or(file.round_ms).unwrap_or(10_000);
    machine.verify_ms = args.verify_ms.or(file.verify_ms).unwrap_or(10_000);
    machine.cooldown_ms = args.cooldown_ms.or(file.cooldown_ms).unwrap_or(500);
    if let Some(lr) = args.lr.or(file.lr) {
        machine.hyper.inner_lr = lr;
    }
    machine.validate()?;

    let corpus = args.corpus.clone().or(file.corpus.clone());
    let data = Arc::new(load_dataset(&DataSource { corpus, ..DataSource::default() })?);
    let mut role = ConductorConfig::new(machine, spec, data);
    role.rounds = args.rounds.or(file.rounds);
    role.metrics = args.metrics.clone().or(file.metrics.clone());
    role.export = args.export.clone().or(file.export.clone());
    if let Some(share) = args.loss_check_share.or(file.loss_check_share) {
        anyhow::ensure!((0.0..=1.0).contains(&share), "--loss-check-share must be in [0, 1]");
        role.loss_check_share = share;
    }

    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let handle = Arc::new(daemon::start(node).await?);
        {
            let mut out = std::io::stdout().lock();
            for addr in handle.listen_addrs().await? {
                writeln!(out, "addr {addr}")?;
            }
            writeln!(out, "coordinator-key {}", hex_key(&handle.public_key().0))?;
            out.flush()?;
        }
        let result = run_conductor(handle.clone(), role, shutdown_signal()).await;
        match Arc::try_unwrap(handle) {
            Ok(handle) => handle.shutdown().await?,
            Err(_) => tracing::warn!("node still in use at exit; not shut down cleanly"),
        }
        result?;
        anyhow::Ok(())
    })?;
    Ok(())
}

fn hex_key(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_parses_and_rejects_unknown_keys() {
        let f: CoordinatorFile = toml::from_str("run = \"demo\"\nrule = \"diloco\"\ninner_steps = 5\nround_ms = 800\n").expect("valid");
        assert_eq!(f.rule, Some(Rule::Diloco));
        assert_eq!(f.inner_steps, Some(5));
        assert!(toml::from_str::<CoordinatorFile>("rounds_ms = 1").is_err());
    }
}
