//! `mana coordinator`: coordinate a training run. It joins the network as a peer with its own key, makes (or
//! resumes from its data directory) the run's round-0 manifest, announces rounds to the nodes whose
//! heartbeats arrive, calls each shard's judges (its holders and drawn verifiers) to verdict its deltas and
//! compute its next state, and commits the result a quorum signed. It never holds the model: a mirror
//! (`mana node --no-train --export DIR`) assembles it. On stdout it prints one `addr <multiaddr>` line per
//! listen address and one `coordinator-key <hex>` line (what nodes pass as `--coordinator`). With
//! `--rounds N` it ends the run after round N and exits 0; on ctrl-c or SIGTERM it exits 0 (a restart
//! resumes the run).
//!
//! Every setting comes from a flag, else a `MANA_*` environment variable, else the TOML file given by
//! `--config`, else a default.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use mana_engine::coordinator::CoordinatorConfig;
use mana_engine::round::RunSpec;
use mana_node::daemon::config::{parse_public_key, parse_run};
use mana_node::daemon::{self, NodeConfig};
use mana_node::roles::common::{DataSource, check_corpus, load_dataset};
use mana_node::roles::conductor::{ConductorConfig, machine_config, run_conductor};
use mana_protocol::UpdateRule;
use serde::Deserialize;

use super::codec::CodecArgs;
use super::net::{JoinArgs, Net, NetArgs, bootstrap_addrs};
use crate::config::{ConfigError, FileTable, FromFile, Layered};

pub use super::rule::Rule;

/// Arguments of `mana coordinator`; its TOML file (`--config`) takes the same names.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorArgs {
    /// Settings every network process has.
    #[command(flatten)]
    #[serde(skip)]
    pub net: NetArgs,
    /// Settings of a process in a run (the run is required).
    #[command(flatten)]
    #[serde(skip)]
    pub join: JoinArgs,
    /// Update rule: sync (default) or diloco.
    #[arg(long, env = "MANA_RULE")]
    pub rule: Option<Rule>,
    /// How nodes encode their deltas (announced with every round; default dense FP8).
    #[command(flatten)]
    #[serde(skip)]
    pub codec: CodecArgs,
    /// Micro-batches (sync) or inner steps (diloco) per round; default 1 (sync) or 20 (diloco).
    #[arg(long, env = "MANA_INNER_STEPS")]
    pub inner_steps: Option<u32>,
    /// Members needed before a round starts (default 2, at least --replication).
    #[arg(long, env = "MANA_MIN_MEMBERS")]
    pub min_members: Option<usize>,
    /// Hosts per routed expert (default 2).
    #[arg(long, env = "MANA_REPLICATION")]
    pub replication: Option<usize>,
    /// End the run after this round is committed (announce the end, exit 0).
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
    /// Seconds the last commit's metrics line waits for an evaluator's validation loss when the run ends
    /// (default 30; at most 10 on ctrl-c/SIGTERM), if evaluators are named or were heard.
    #[arg(long, env = "MANA_EVALUATION_WAIT")]
    pub evaluation_wait: Option<u64>,
    /// The run's text (same for every node): a UTF-8 file, a .gz, or a directory; default the built-in corpus.
    #[arg(long, env = "MANA_CORPUS")]
    pub corpus: Option<PathBuf>,
    /// Seed of the model's initial weights.
    #[arg(long, env = "MANA_SEED")]
    pub seed: Option<u64>,
    /// Share of contributions scored by their judges, default 1 (every one); the draw is reproducible from the
    /// round's deltas.
    #[arg(long, env = "MANA_SCORE_SHARE")]
    pub score_share: Option<f64>,
    /// A scored trunk contribution must lower the score batch's loss by more than this many nats, against a
    /// zero delta (default 0).
    #[arg(long, env = "MANA_TRUNK_MIN_GAIN", allow_negative_numbers = true)]
    pub trunk_min_gain: Option<f32>,
    /// A scored trunk contribution must also gain more than this share of the other senders' median gain
    /// (default 0.15).
    #[arg(long, env = "MANA_TRUNK_SHARE")]
    pub trunk_share: Option<f32>,
    /// A scored expert contribution may raise the score batch's loss by at most this many nats (default 0.05).
    #[arg(long, env = "MANA_EXPERT_TOLERANCE")]
    pub expert_tolerance: Option<f32>,
    /// A contribution's norm must be at least this share of its class's reference norm (default 0.01).
    #[arg(long, env = "MANA_MIN_NORM_RATIO")]
    pub min_norm_ratio: Option<f32>,
    /// File of the public keys (64 hex digits a line, `#` comments) that may join; read again when it
    /// changes. Without it the run is open to any key.
    #[arg(long, env = "MANA_ALLOWLIST")]
    pub allowlist: Option<PathBuf>,
    /// Public keys (64 hex digits each, comma-separated) of the evaluators whose published validation losses
    /// go into the metrics (default: any node's, the first for a round); a later figure that differs from
    /// the one taken is logged and counted in the status.
    #[arg(long, env = "MANA_EVALUATORS")]
    pub evaluators: Option<String>,
    /// Most members at once (default 1024); new keys beyond it are not admitted.
    #[arg(long, env = "MANA_MAX_MEMBERS")]
    pub max_members: Option<usize>,
    /// Most members seen from one IP address (default 4); new keys from an address that has them are not
    /// admitted. Loopback is not counted on a loopback-only coordinator.
    #[arg(long, env = "MANA_MAX_MEMBERS_PER_IP")]
    pub max_members_per_ip: Option<usize>,
    /// Round messages whose signed envelope is over this many bytes travel as parcels (a gossiped header, the
    /// envelope fetched by hash); default 65536, at most 262144 (what gossip carries).
    #[arg(long, env = "MANA_PARCEL_OVER")]
    pub parcel_over: Option<usize>,
    /// Copies of each parcel's envelope this coordinator serves before it sends fetchers to other holders (0:
    /// every copy asked for; the default).
    #[arg(long, env = "MANA_PARCEL_COPIES")]
    pub parcel_copies: Option<u32>,
    /// Inner learning rate announced with every round (default: the run preset's).
    #[arg(long, env = "MANA_LR")]
    pub lr: Option<f32>,
    /// Resume the run in this data directory even though its rule, seed, corpus or key changed (refused
    /// otherwise, naming each change): the saved model goes on under the new ones.
    #[arg(long, env = "MANA_ACCEPT_CHANGED_SETTINGS", value_parser = crate::config::parse_bool)]
    #[serde(skip)]
    pub accept_changed_settings: bool,
}

impl FromFile for CoordinatorArgs {
    fn from_file(file: &mut FileTable) -> Result<Self, ConfigError> {
        Ok(CoordinatorArgs {
            net: file.take()?,
            join: file.take()?,
            codec: file.take()?,
            ..file.take()?
        })
    }
}

/// The default data directory of a coordinator.
pub const DEFAULT_DATA_DIR: &str = "mana-coordinator-data";

/// Runs `mana coordinator`.
pub fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    let path = args.net.config.clone();
    let s = Layered::load(args, path.as_deref())?;
    let net = Net::resolve(&s.section(|a| &a.net), DEFAULT_DATA_DIR)?;
    crate::logging::init(net.log_format);
    let node = node_config(&s, &net)?;
    let (spec, machine) = machine(&s, &node)?;
    let source = DataSource {
        corpus: s.get(|a| &a.corpus),
        ..DataSource::default()
    };
    let data = Arc::new(load_dataset(&source)?);
    check_corpus(&data, &spec, &source)?;
    let mut role = ConductorConfig::new(machine, spec, data);
    role.rounds = s.get(|a| &a.rounds);
    anyhow::ensure!(
        role.rounds != Some(0),
        "--rounds must be at least 1 (round 0 is the initial checkpoint)"
    );
    role.metrics = s.get(|a| &a.metrics);
    if let Some(path) = &role.metrics {
        super::preflight::appendable_file("--metrics", path)?;
    }
    if let Some(secs) = s.get(|a| &a.evaluation_wait) {
        anyhow::ensure!(secs <= 3600, "--evaluation-wait is at most 3600 seconds");
        role.evaluation_wait = std::time::Duration::from_secs(secs);
    }
    role.allowlist = s.get(|a| &a.allowlist);
    if let Some(keys) = s.get(|a| &a.evaluators) {
        let keys = keys
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| parse_public_key(k).with_context(|| format!("--evaluators: {k}")))
            .collect::<anyhow::Result<std::collections::BTreeSet<_>>>()?;
        anyhow::ensure!(!keys.is_empty(), "--evaluators names no key");
        role.evaluators = Some(keys);
    }
    role.accept_changed_settings = s.flags.accept_changed_settings;
    if let Some(share) = s.get(|a| &a.score_share) {
        anyhow::ensure!(
            (0.0..=1.0).contains(&share),
            "--score-share must be in [0, 1]"
        );
        role.machine.verdict.score_share = share as f32;
    }
    if let Some(gain) = s.get(|a| &a.trunk_min_gain) {
        anyhow::ensure!(
            gain.is_finite(),
            "--trunk-min-gain must be a finite number of nats"
        );
        role.machine.verdict.trunk_min_gain = gain;
    }
    if let Some(share) = s.get(|a| &a.trunk_share) {
        anyhow::ensure!(
            share.is_finite() && (0.0..=1.0).contains(&share),
            "--trunk-share must be in [0, 1]"
        );
        role.machine.verdict.trunk_share = share;
    }
    if let Some(tolerance) = s.get(|a| &a.expert_tolerance) {
        anyhow::ensure!(
            tolerance.is_finite() && tolerance >= 0.0,
            "--expert-tolerance must be a finite number of nats, at least 0"
        );
        role.machine.verdict.expert_tolerance = tolerance;
    }
    if let Some(ratio) = s.get(|a| &a.min_norm_ratio) {
        anyhow::ensure!(
            ratio.is_finite() && (0.0..1.0).contains(&ratio),
            "--min-norm-ratio must be in [0, 1)"
        );
        role.machine.verdict.min_norm_ratio = ratio;
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
        let result = run_conductor(
            handle.clone(),
            role,
            super::net::shutdown_signal("coordinator"),
        )
        .await;
        // Every task of the node and its role is cancelled and awaited, even while the role still holds
        // clones of the handle.
        handle.stop().await?;
        result?;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// The coordinator's node: it joins the run, and never mirrors shards (it commits the run's checkpoints).
fn node_config(s: &Layered<CoordinatorArgs>, net: &Net) -> anyhow::Result<NodeConfig> {
    let mut node = NodeConfig::new(&net.data_dir);
    node.key_file = net.key.clone();
    node.new_key = net.new_key;
    net.apply(&mut node.net);
    node.net.bootstrap = bootstrap_addrs(&s.section(|a| &a.join))?;
    node.dashboard = super::net::dashboard_addr(&s.section(|a| &a.join))?;
    node.store_quota = s.section(|a| &a.join).get(|a| &a.store_quota);
    let run_name = s.get(|a| &a.join.run).context("--run NAME is required")?;
    node.net.run_id = parse_run(&run_name)?;
    node.net.kad_server = net.loopback;
    node.sync_shards = false;
    if let Some(bytes) = s.get(|a| &a.parcel_over) {
        let most = mana_protocol::limits::MAX_ENVELOPE_BYTES;
        anyhow::ensure!(
            bytes <= most,
            "--parcel-over is at most {most} bytes (what a gossip message carries)"
        );
        node.parcel_over_bytes = bytes;
    }
    node.parcel_copies = s.get(|a| &a.parcel_copies).unwrap_or(node.parcel_copies);
    Ok(node)
}

/// The model preset and the state machine's settings (rule, round lengths, replication...).
fn machine(
    s: &Layered<CoordinatorArgs>,
    node: &NodeConfig,
) -> anyhow::Result<(RunSpec, CoordinatorConfig)> {
    let rule = UpdateRule::from(s.get(|a| &a.rule).unwrap_or_default());
    let mut spec = RunSpec::tiny();
    if let Some(seed) = s.get(|a| &a.seed) {
        spec.init_seed = seed;
    }
    let inner_steps = s
        .get(|a| &a.inner_steps)
        .unwrap_or_else(|| mana_engine::coordinator::default_inner_steps(rule));
    let mut machine = machine_config(node.net.run_id.clone(), &spec, rule, inner_steps)?;
    // The codec, and the outer optimizer that goes with it (none for sparse low-bit deltas).
    let codec = CodecArgs::resolve(&s.section(|a| &a.codec))?;
    machine.hyper = spec.hyper_with_codec(rule, codec);
    machine.replication = s.get(|a| &a.replication).unwrap_or(machine.replication);
    machine.min_members = s
        .get(|a| &a.min_members)
        .unwrap_or(machine.min_members.max(machine.replication));
    machine.train_ms = s.get(|a| &a.round_ms).unwrap_or(10_000);
    machine.verify_ms = s.get(|a| &a.verify_ms).unwrap_or(10_000);
    machine.cooldown_ms = s.get(|a| &a.cooldown_ms).unwrap_or(500);
    machine.standing.max_members = s
        .get(|a| &a.max_members)
        .unwrap_or(machine.standing.max_members);
    machine.standing.max_members_per_ip = s
        .get(|a| &a.max_members_per_ip)
        .unwrap_or(machine.standing.max_members_per_ip);
    if let Some(lr) = s.get(|a| &a.lr) {
        machine.hyper.inner_lr = lr;
    }
    machine.validate()?;
    Ok((spec, machine))
}

fn hex_key(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `mana coordinator`'s flags alone, as clap parses them.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CoordinatorArgs,
    }

    fn settings(flags: &[&str], file: &str) -> anyhow::Result<(NodeConfig, CoordinatorConfig)> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("coordinator.toml");
        std::fs::write(&path, file)?;
        let args =
            Cli::try_parse_from(std::iter::once("coordinator").chain(flags.iter().copied()))?.args;
        let s = Layered::load(args, Some(&path))?;
        let net = Net::resolve(&s.section(|a| &a.net), DEFAULT_DATA_DIR)?;
        let node = node_config(&s, &net)?;
        Ok((node.clone(), machine(&s, &node)?.1))
    }

    #[test]
    fn file_parses_and_rejects_unknown_keys() {
        let (node, machine) = settings(
            &[],
            "run = \"demo\"\nrule = \"diloco\"\ninner_steps = 5\nround_ms = 800\n",
        )
        .expect("valid");
        assert_eq!(node.net.run_id.as_str(), "demo");
        assert_eq!(node.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(machine.inner_steps, 5);
        assert_eq!(machine.train_ms, 800);
        let err = settings(&[], "run = \"demo\"\nrounds_ms = 1")
            .expect_err("typo refused")
            .to_string();
        assert!(err.contains("unknown key `rounds_ms`"), "{err}");
    }

    #[test]
    fn the_codec_is_announced_with_its_outer_optimizer() {
        let (_, dense) = settings(&[], "run = \"demo\"\nrule = \"diloco\"\n").expect("valid");
        assert_eq!(dense.hyper.codec, mana_protocol::CodecOptions::default());
        let file = "run = \"demo\"\nrule = \"diloco\"\ntop_k = 0.03\ntop_k_per_block = true\nvalues = \"int2\"\n";
        let (_, sparse) = settings(&["--pow2-scales"], file).expect("valid");
        assert!(sparse.hyper.codec.is_sparse_low_bit());
        assert_eq!(sparse.hyper.codec.top_k_density, Some(0.03));
        assert_eq!(
            sparse.hyper.codec.scale,
            mana_protocol::ScaleFormat::PowerOfTwo
        );
        assert_eq!(sparse.hyper.outer_momentum, 0.0);
        let err = settings(&["--values", "int2"], "run = \"demo\"\n")
            .expect_err("int2 without top-k is refused")
            .to_string();
        assert!(err.contains("codec"), "{err}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = "run = \"file-run\"\nround_ms = 800\nverify_ms = 900\n";
        let (node, machine) =
            settings(&["--run", "flag-run", "--round-ms", "700"], file).expect("valid");
        assert_eq!(node.net.run_id.as_str(), "flag-run");
        assert_eq!(
            (machine.train_ms, machine.verify_ms, machine.cooldown_ms),
            (700, 900, 500)
        );
        let err = settings(&[], "")
            .expect_err("the run is required")
            .to_string();
        assert_eq!(err, "--run NAME is required");
    }

    #[test]
    fn the_member_cap_per_ip_comes_from_the_flag_or_the_file() {
        let (_, machine) = settings(&[], "run = \"demo\"\n").expect("valid");
        assert_eq!(machine.standing.max_members_per_ip, 4);
        let file = "run = \"demo\"\nmax_members_per_ip = 2\n";
        let (_, machine) = settings(&[], file).expect("valid");
        assert_eq!(machine.standing.max_members_per_ip, 2);
        let (_, machine) = settings(&["--max-members-per-ip", "8"], file).expect("valid");
        assert_eq!(machine.standing.max_members_per_ip, 8);
        let err = settings(&["--max-members-per-ip", "0"], file)
            .expect_err("0 refused")
            .to_string();
        assert!(err.contains("max_members_per_ip"), "{err}");
    }
}
