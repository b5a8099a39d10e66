//! `mana node`: run a node (join the network, validate gossip, serve and sync shards; with `--coordinator`,
//! train the shards the coordinator assigns and answer clients' expert calls from the committed ones; with
//! `--serve-only`, mirror every committed checkpoint, or its `--experts`, and answer expert calls without
//! training), or with `--verify-store` check its store and exit. Every setting comes from a flag, else a
//! `MANA_*` environment variable, else the TOML file given by `--config`, else a default (see
//! `crate::config`).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use mana_engine::round::RunSpec;
use mana_node::daemon::config::{parse_public_key, parse_run};
use mana_node::daemon::{self, NodeConfig};
use mana_node::infer::{HostLimits, serve_experts};
use mana_node::roles::common::{DataSource, check_corpus, load_dataset};
use mana_node::roles::evaluator::{EvaluatorConfig, run_evaluator};
use mana_node::roles::trainer::{TrainerConfig, run_trainer};
use mana_node::store::{Store, StoreConfig};
use mana_protocol::ShardId;
use serde::Deserialize;

use super::net::{JoinArgs, Net, NetArgs, bootstrap_addrs, shutdown_signal};
use crate::config::{self, ConfigError, FileTable, FromFile, Layered};

/// Arguments of `mana node`; its TOML file (`--config`) takes the same names (with `train = false` for
/// `--no-train`, `serve_only = true` for `--serve-only`).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeArgs {
    /// Settings every network process has.
    #[command(flatten)]
    #[serde(skip)]
    pub net: NetArgs,
    /// Settings of a process in a run.
    #[command(flatten)]
    #[serde(skip)]
    pub join: JoinArgs,
    /// The run coordinator's public key (64 hex digits).
    #[arg(long, env = "MANA_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Run the DHT in server mode even before an external address is confirmed (MANA_DHT_SERVER: 1, true,
    /// yes, on or 0, false, no, off).
    #[arg(long, env = "MANA_DHT_SERVER", value_parser = config::parse_bool)]
    #[serde(skip)]
    pub dht_server: bool,
    /// Re-hash every blob of the store, print the report and exit (non-zero if damaged).
    #[arg(long)]
    #[serde(skip)]
    pub verify_store: bool,
    /// Most shards (the trunk included) this node will host and train, declared in its heartbeats
    /// (default 64).
    #[arg(long, env = "MANA_MAX_SHARDS")]
    pub max_shards: Option<u32>,
    /// Share of rounds (0 to 1, default 0.1) in which this node recomputes the coordinator's published scores
    /// of the deltas it holds, drawn at random so that a coordinator cannot foresee them. Each check fetches
    /// the round's shards this node does not hold (more traffic than its deltas); a round in which one of
    /// its own deltas was refused as low-score is always checked.
    #[arg(long, env = "MANA_RESCORE_SHARE")]
    pub rescore_share: Option<f64>,
    /// Fetch the deltas of this node's shards while their round trains, as their senders announce them, so
    /// that judging and applying the commit find them at hand (default true; MANA_PREFETCH: 1, true, yes,
    /// on or 0, false, no, off). Off, they are fetched when needed: fewer bytes when many deltas are
    /// refused, a slower commit.
    #[arg(long, env = "MANA_PREFETCH", value_parser = config::parse_bool)]
    pub prefetch: Option<bool>,
    /// The run's text, as the coordinator's: a UTF-8 file, a .gz, or a directory; default the built-in corpus.
    #[arg(long, env = "MANA_CORPUS")]
    pub corpus: Option<PathBuf>,
    /// Seed of the model's initial weights, as the coordinator's `--seed` (default the same default): the
    /// round-0 shards this node needs are made here from it and checked against the run's manifest.
    #[arg(long, env = "MANA_SEED")]
    pub seed: Option<u64>,
    /// With --evaluate: keep this directory holding the last committed model the node evaluated (a `mana
    /// train`-style checkpoint, with exported.json naming its round and checkpoint), replaced whole after
    /// each round.
    #[arg(long, env = "MANA_EXPORT")]
    pub export: Option<PathBuf>,
    /// Do not train even with a coordinator: only validate, serve and mirror every committed checkpoint
    /// (MANA_NO_TRAIN: 1, true, yes, on or 0, false, no, off; in the file, train = false).
    #[arg(long, env = "MANA_NO_TRAIN", value_parser = config::parse_bool)]
    #[serde(skip)]
    pub no_train: bool,
    /// Whether a node with a coordinator trains: only in the file (`train = false`), the flag is --no-train.
    #[arg(skip)]
    pub train: Option<bool>,
    /// With --no-train: measure each committed checkpoint's validation loss on the run's text (--corpus) and
    /// publish it, signed, for the coordinator's metrics (MANA_EVALUATE; in the file, evaluate = true).
    #[arg(long = "evaluate", env = "MANA_EVALUATE", value_parser = config::parse_bool)]
    #[serde(skip)]
    pub evaluate_flag: bool,
    /// Whether the node evaluates: only in the file (`evaluate = true`), the flag is --evaluate.
    #[arg(skip)]
    pub evaluate: Option<bool>,
    /// A pure expert server: do not train; mirror every committed checkpoint of the run (every expert of
    /// it, or those of --experts) and answer clients' expert calls from it (MANA_SERVE_ONLY: 1, true,
    /// yes, on or 0, false, no, off; in the file, serve_only = true). Needs --coordinator.
    #[arg(long = "serve-only", env = "MANA_SERVE_ONLY", value_parser = config::parse_bool)]
    #[serde(skip)]
    pub serve_only_flag: bool,
    /// Whether the node only serves: only in the file (`serve_only = true`), the flag is --serve-only.
    #[arg(skip)]
    pub serve_only: Option<bool>,
    /// With --serve-only: host only these experts of each checkpoint, fetching and answering for them alone
    /// (comma-separated shard ids such as expert/0/3, repeatable; in the file, experts = ["expert/0/3"]);
    /// default every expert. Several such nodes serve a model none of them holds whole.
    #[arg(long, env = "MANA_EXPERTS", value_delimiter = ',')]
    pub experts: Option<Vec<String>>,
    /// Expert calls answered at once; past it a call is answered "busy" and its client asks another
    /// replica (default 16).
    #[arg(long, env = "MANA_MAX_EXPERT_CALLS")]
    pub max_expert_calls: Option<usize>,
    /// Expert calls of one peer answered at once, so that one client cannot take every place (default 4).
    #[arg(long, env = "MANA_MAX_EXPERT_CALLS_PER_PEER")]
    pub max_expert_calls_per_peer: Option<usize>,
    /// Most tokens one expert call may carry, and most computed in one batch (default 4096).
    #[arg(long, env = "MANA_MAX_EXPERT_ROWS")]
    pub max_expert_rows: Option<usize>,
    /// Experts kept loaded in memory to answer calls (default 64).
    #[arg(long, env = "MANA_LOADED_EXPERTS")]
    pub loaded_experts: Option<usize>,
}

impl FromFile for NodeArgs {
    fn from_file(file: &mut FileTable) -> Result<Self, ConfigError> {
        Ok(NodeArgs {
            net: file.take()?,
            join: file.take()?,
            ..file.take()?
        })
    }
}

/// Default of `--max-shards`.
pub const DEFAULT_MAX_SHARDS: u32 = 64;

/// The default data directory.
pub const DEFAULT_DATA_DIR: &str = "mana-data";

/// What `mana node` runs besides the daemon.
#[derive(Debug)]
enum Work {
    /// Nothing: it validates, serves and mirrors checkpoints.
    Mirror,
    /// A mirror that also answers expert calls from the checkpoints it mirrors (`--serve-only`).
    Serve,
    /// The trainer role.
    Train(Training),
    /// The evaluator role (on a mirror), on the run's text from this corpus (default the built-in one),
    /// exporting each checkpoint it evaluates to `export` if given.
    Evaluate {
        corpus: Option<PathBuf>,
        export: Option<PathBuf>,
    },
}

/// The trainer's settings.
#[derive(Debug)]
struct Training {
    max_shards: u32,
    rescore_share: f64,
    prefetch: bool,
    corpus: Option<PathBuf>,
}

/// Merges flags/env (already merged by clap) over the file over defaults. A node with a coordinator trains
/// unless told not to: then it syncs only its assigned shards (the trainer owns its store's rounds).
fn node_config(s: &Layered<NodeArgs>, net: &Net) -> anyhow::Result<(NodeConfig, Work)> {
    let mut config = NodeConfig::new(&net.data_dir);
    config.key_file = net.key.clone();
    config.new_key = net.new_key;
    net.apply(&mut config.net);
    config.net.bootstrap = bootstrap_addrs(&s.section(|a| &a.join))?;
    config.dashboard = super::net::dashboard_addr(&s.section(|a| &a.join))?;
    config.store_quota = s.section(|a| &a.join).get(|a| &a.store_quota);
    if let Some(run) = s.get(|a| &a.join.run) {
        config.net.run_id = parse_run(&run)?;
    }
    if let Some(key) = s.get(|a| &a.coordinator) {
        config.coordinator = Some(parse_public_key(&key)?);
    }
    config.net.kad_server = s.flags.dht_server || net.loopback;
    config.fetch.progress = true;
    let mut spec = RunSpec::tiny();
    if let Some(seed) = s.get(|a| &a.seed) {
        spec.init_seed = seed;
    }
    config.genesis = Some(spec);
    let max_shards = s.get(|a| &a.max_shards).unwrap_or(DEFAULT_MAX_SHARDS);
    anyhow::ensure!(
        max_shards >= 1,
        "--max-shards must be at least 1 (the trunk)"
    );
    let rescore_share = s
        .get(|a| &a.rescore_share)
        .unwrap_or(mana_node::roles::DEFAULT_RESCORE_SHARE);
    anyhow::ensure!(
        (0.0..=1.0).contains(&rescore_share),
        "--rescore-share must be between 0 and 1, got {rescore_share}"
    );
    let serves_only = s.flags.serve_only_flag || s.file.serve_only.unwrap_or(false);
    let trains = config.coordinator.is_some()
        && !serves_only
        && !s.flags.no_train
        && s.file.train.unwrap_or(true);
    let evaluates = s.flags.evaluate_flag || s.file.evaluate.unwrap_or(false);
    let export = s.get(|a| &a.export);
    anyhow::ensure!(
        export.is_none() || evaluates,
        "--export needs --evaluate (and --no-train): the evaluator assembles each committed model it measures"
    );
    if let Some(dir) = &export {
        super::preflight::writable_dir("--export", dir)?;
    }
    if serves_only {
        anyhow::ensure!(
            config.coordinator.is_some(),
            "--serve-only serves a run's committed experts: give the run's --coordinator key"
        );
        anyhow::ensure!(
            !evaluates,
            "--serve-only runs no role; an evaluator (--no-train --evaluate) already answers expert calls"
        );
        if let Some(experts) = s.get(|a| &a.experts) {
            config.sync_only = Some(expert_list(&experts)?);
        }
        return Ok((config, Work::Serve));
    }
    anyhow::ensure!(
        s.get(|a| &a.experts).is_none(),
        "--experts chooses what a --serve-only node hosts; a trainer hosts what the coordinator assigns it"
    );
    if evaluates {
        anyhow::ensure!(
            config.coordinator.is_some(),
            "--evaluate follows a run: give the run's --coordinator key"
        );
        anyhow::ensure!(
            !trains,
            "--evaluate needs --no-train: an evaluator mirrors every checkpoint, a trainer holds only its shards"
        );
        return Ok((
            config,
            Work::Evaluate {
                corpus: s.get(|a| &a.corpus),
                export,
            },
        ));
    }
    if !trains {
        return Ok((config, Work::Mirror));
    }
    config.sync_shards = false;
    config.capacity.max_shards = max_shards;
    Ok((
        config,
        Work::Train(Training {
            max_shards,
            rescore_share,
            prefetch: s.get(|a| &a.prefetch).unwrap_or(true),
            corpus: s.get(|a| &a.corpus),
        }),
    ))
}

/// The experts of `--experts`: shard ids of experts, at least one.
fn expert_list(experts: &[String]) -> anyhow::Result<BTreeSet<ShardId>> {
    let mut list = BTreeSet::new();
    for text in experts.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let shard: ShardId = text.parse().with_context(|| {
            format!("--experts: {text:?} is not a shard id (expert/LAYER/INDEX)")
        })?;
        anyhow::ensure!(
            shard.expert_position().is_some(),
            "--experts names experts; {shard} is not one (clients run the trunk themselves)"
        );
        list.insert(shard);
    }
    anyhow::ensure!(!list.is_empty(), "--experts names no expert");
    Ok(list)
}

/// The expert host's limits: flags over the file over [`HostLimits::default`].
fn host_limits(s: &Layered<NodeArgs>) -> anyhow::Result<HostLimits> {
    let default = HostLimits::default();
    let limits = HostLimits {
        max_calls: s.get(|a| &a.max_expert_calls).unwrap_or(default.max_calls),
        max_calls_per_peer: s
            .get(|a| &a.max_expert_calls_per_peer)
            .unwrap_or(default.max_calls_per_peer),
        max_rows: s.get(|a| &a.max_expert_rows).unwrap_or(default.max_rows),
        cached_experts: s
            .get(|a| &a.loaded_experts)
            .unwrap_or(default.cached_experts),
        ..default
    };
    for (value, flag) in [
        (limits.max_calls, "--max-expert-calls"),
        (limits.max_calls_per_peer, "--max-expert-calls-per-peer"),
        (limits.max_rows, "--max-expert-rows"),
        (limits.cached_experts, "--loaded-experts"),
    ] {
        anyhow::ensure!(value >= 1, "{flag} must be at least 1");
    }
    anyhow::ensure!(
        limits.max_calls_per_peer <= limits.max_calls,
        "--max-expert-calls-per-peer ({}) must not exceed --max-expert-calls ({})",
        limits.max_calls_per_peer,
        limits.max_calls
    );
    Ok(limits)
}

/// Runs `mana node`.
pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    let path = args.net.config.clone();
    let settings = Layered::load(args, path.as_deref())?;
    let net = Net::resolve(&settings.section(|a| &a.net), DEFAULT_DATA_DIR)?;
    crate::logging::init(net.log_format);
    let (config, work) = node_config(&settings, &net)?;
    let limits = host_limits(&settings)?;
    if settings.flags.verify_store {
        return verify_store(&config);
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let spec = config.genesis.clone().unwrap_or_else(RunSpec::tiny);
    let training = match work {
        Work::Train(training) => training,
        Work::Mirror => {
            if config.coordinator.is_none() {
                tracing::warn!(
                    "no --coordinator given: this node validates, serves and mirrors checkpoints, but will not train"
                );
            } else {
                tracing::info!(
                    "--no-train: this node validates, serves and mirrors checkpoints, but will not train"
                );
            }
            runtime.block_on(async move { daemon::run(config, shutdown_signal("node")).await })?;
            return Ok(());
        }
        Work::Serve => {
            match &config.sync_only {
                Some(experts) => tracing::info!(
                    experts = experts.len(),
                    "--serve-only: this node hosts its --experts of every committed checkpoint and answers expert calls for them, but will not train"
                ),
                None => tracing::info!(
                    "--serve-only: this node mirrors every committed checkpoint and answers expert calls from it, but will not train"
                ),
            }
            return runtime.block_on(async move {
                let handle = daemon::start(config).await?;
                print_listen_addrs(&handle).await?;
                serve_experts(&handle, spec.clone(), limits)?;
                shutdown_signal("node").await;
                handle.shutdown().await?;
                anyhow::Ok(())
            });
        }
        Work::Evaluate { corpus, export } => {
            let source = DataSource {
                corpus,
                ..DataSource::default()
            };
            let data = Arc::new(load_dataset(&source)?);
            check_corpus(&data, &spec, &source)?;
            let mut evaluator = EvaluatorConfig::new(spec.clone(), data);
            evaluator.export = export;
            tracing::info!(
                "--evaluate: this node mirrors every committed checkpoint and publishes its validation loss"
            );
            return runtime.block_on(async move {
                let handle = Arc::new(daemon::start(config).await?);
                print_listen_addrs(&handle).await?;
                serve_experts(&handle, spec.clone(), limits)?;
                let result =
                    run_evaluator(handle.clone(), evaluator, shutdown_signal("node")).await;
                handle.stop().await?;
                result?;
                anyhow::Ok(())
            });
        }
    };
    let source = DataSource {
        corpus: training.corpus,
        ..DataSource::default()
    };
    let data = Arc::new(load_dataset(&source)?);
    check_corpus(&data, &spec, &source)?;
    let mut trainer = TrainerConfig::new(spec.clone(), data);
    trainer.max_shards = training.max_shards;
    trainer.rescore_share = training.rescore_share;
    trainer.prefetch = training.prefetch;
    runtime.block_on(async move {
        let handle = Arc::new(daemon::start(config).await?);
        print_listen_addrs(&handle).await?;
        // Clients generate with the experts this node holds in its committed rounds.
        serve_experts(&handle, spec.clone(), limits)?;
        let result = run_trainer(handle.clone(), trainer, shutdown_signal("node")).await;
        // Every task of the node and its role is cancelled and awaited, even while the role still holds
        // clones of the handle.
        handle.stop().await?;
        result?;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// Prints the node's listen addresses on stdout, one a line (what scripts and the demo read).
async fn print_listen_addrs(handle: &daemon::NodeHandle) -> anyhow::Result<()> {
    let addrs = handle.listen_addrs().await?;
    let mut out = std::io::stdout().lock();
    for addr in addrs {
        writeln!(out, "{addr}")?;
    }
    out.flush()?;
    Ok(())
}

fn verify_store(config: &NodeConfig) -> anyhow::Result<()> {
    let store = Store::open(config.data_dir.join("store"), StoreConfig::default())?;
    let report = store.verify()?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    anyhow::ensure!(report.is_ok(), "the store is damaged");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `mana node`'s flags alone, as clap parses them.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: NodeArgs,
    }

    fn settings(flags: &[&str], file: &str) -> anyhow::Result<(NodeConfig, Option<Training>)> {
        settings_work(flags, file).map(|(c, w)| match w {
            Work::Train(t) => (c, Some(t)),
            _ => (c, None),
        })
    }

    fn settings_work(flags: &[&str], file: &str) -> anyhow::Result<(NodeConfig, Work)> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("node.toml");
        std::fs::write(&path, file)?;
        let args = Cli::try_parse_from(std::iter::once("node").chain(flags.iter().copied()))?.args;
        let s = Layered::load(args, Some(&path))?;
        let net = Net::resolve(&s.section(|a| &a.net), DEFAULT_DATA_DIR)?;
        node_config(&s, &net)
    }

    const KEY: &str = "0101010101010101010101010101010101010101010101010101010101010101";

    #[test]
    fn the_file_parses_and_unknown_keys_are_refused() {
        let (config, training) = settings(
            &[],
            "listen = [\"/ip4/127.0.0.1/tcp/0\"]\nrun = \"demo\"\n[limits]\nmax_connections = 9\n",
        )
        .expect("valid config");
        assert_eq!(config.net.run_id.as_str(), "demo");
        assert_eq!(config.net.limits.max_connections, 9);
        assert!(
            config.net.kad_server && config.net.trust_colocated_ips,
            "loopback only"
        );
        assert!(training.is_none(), "no coordinator, no training");
        let err = settings(&[], "lisen = []")
            .expect_err("typo refused")
            .to_string();
        assert!(err.contains("unknown key `lisen`"), "{err}");
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file = format!(
            "listen = [\"/ip4/127.0.0.3/tcp/0\"]\ndata_dir = \"file-dir\"\ncoordinator = \"{KEY}\"\nmax_shards = 5\n"
        );
        let (config, training) = settings(&[], &file).expect("valid");
        assert_eq!(config.data_dir, PathBuf::from("file-dir"));
        assert_eq!(config.net.listen[0].to_string(), "/ip4/127.0.0.3/tcp/0");
        assert_eq!(training.expect("trains with a coordinator").max_shards, 5);
        assert_eq!(config.net.run_id.as_str(), "default");

        let flags = [
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-dir",
            "flag-dir",
            "--max-shards",
            "7",
        ];
        let (config, training) = settings(&flags, &file).expect("valid");
        assert_eq!(config.data_dir, PathBuf::from("flag-dir"));
        assert_eq!(config.net.listen.len(), 1);
        assert_eq!(config.net.listen[0].to_string(), "/ip4/127.0.0.1/tcp/0");
        assert_eq!(training.expect("trains").max_shards, 7);

        let (_, training) = settings(&["--no-train"], &file).expect("valid");
        assert!(training.is_none());
        let (_, training) = settings(&[], &format!("{file}train = false\n")).expect("valid");
        assert!(training.is_none());

        let (config, _) = settings(&[], "").expect("an empty file is every default");
        assert_eq!(config.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(config.net.listen.len(), 2);
        assert!(!config.net.kad_server);
    }

    #[test]
    fn an_evaluator_is_a_mirror_of_a_run() {
        let with_coordinator = ["--coordinator", KEY, "--no-train", "--evaluate"];
        let (config, work) = settings_work(&with_coordinator, "").expect("valid");
        assert!(matches!(
            work,
            Work::Evaluate {
                corpus: None,
                export: None
            }
        ));
        assert!(config.sync_shards, "an evaluator syncs every shard");
        let (_, work) = settings_work(&["--coordinator", KEY], "train = false\nevaluate = true\n")
            .expect("valid");
        assert!(matches!(work, Work::Evaluate { .. }));
        let err = settings_work(&["--coordinator", KEY, "--evaluate"], "")
            .expect_err("a trainer does not evaluate")
            .to_string();
        assert!(err.contains("--no-train"), "{err}");
        let err = settings_work(&["--no-train", "--evaluate"], "")
            .expect_err("no run to follow")
            .to_string();
        assert!(err.contains("--coordinator"), "{err}");
    }

    #[test]
    fn a_serve_only_node_is_a_mirror_of_a_run_that_answers_expert_calls() {
        for (flags, file) in [
            (vec!["--coordinator", KEY, "--serve-only"], ""),
            (vec!["--coordinator", KEY, "--serve-only", "--no-train"], ""),
            (
                vec![],
                &*format!("coordinator = \"{KEY}\"\nserve_only = true\n"),
            ),
        ] {
            let (config, work) = settings_work(&flags, file).expect("valid");
            assert!(matches!(work, Work::Serve), "{flags:?} {file:?}: {work:?}");
            assert!(config.sync_shards, "it mirrors every checkpoint");
            assert_eq!(
                config.capacity.max_shards, 0,
                "it asks to be assigned nothing"
            );
        }
        let err = settings_work(&["--serve-only"], "")
            .expect_err("no run to serve")
            .to_string();
        assert!(err.contains("--coordinator"), "{err}");
        let err = settings_work(
            &[
                "--coordinator",
                KEY,
                "--serve-only",
                "--no-train",
                "--evaluate",
            ],
            "",
        )
        .expect_err("an evaluator already serves")
        .to_string();
        assert!(err.contains("--serve-only"), "{err}");
    }

    #[test]
    fn a_serve_only_node_hosts_the_experts_it_is_given() {
        let serve = ["--coordinator", KEY, "--serve-only"];
        let (config, _) = settings_work(&serve, "").expect("valid");
        assert_eq!(config.sync_only, None, "every expert by default");
        let flags = [
            &serve[..],
            &[
                "--experts",
                "expert/0/3,expert/1/0",
                "--experts",
                "expert/0/3",
            ],
        ]
        .concat();
        let (config, _) = settings_work(&flags, "").expect("valid");
        let want: BTreeSet<ShardId> = [ShardId::expert(0, 3), ShardId::expert(1, 0)]
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("expert ids");
        assert_eq!(config.sync_only, Some(want.clone()));
        let (config, _) = settings_work(&serve, "experts = [\"expert/1/0\", \"expert/0/3\"]\n")
            .expect("valid file");
        assert_eq!(config.sync_only, Some(want));
        for (bad, says) in [
            ("trunk", "not one"),
            ("expert/0", "not a shard id"),
            (",", "no expert"),
        ] {
            let flags = [&serve[..], &["--experts", bad]].concat();
            let err = settings_work(&flags, "").expect_err(bad).to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let err = settings_work(&["--coordinator", KEY, "--experts", "expert/0/0"], "")
            .expect_err("a trainer is assigned its experts")
            .to_string();
        assert!(err.contains("--serve-only"), "{err}");
    }

    #[test]
    fn the_expert_hosts_limits_come_from_flags_then_the_file() {
        let limits = |flags: &[&str], file: &str| {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("node.toml");
            std::fs::write(&path, file)?;
            let args =
                Cli::try_parse_from(std::iter::once("node").chain(flags.iter().copied()))?.args;
            host_limits(&Layered::load(args, Some(&path))?)
        };
        let default = HostLimits::default();
        let got = limits(&[], "").expect("defaults");
        assert_eq!(
            (
                got.max_calls,
                got.max_calls_per_peer,
                got.max_rows,
                got.cached_experts
            ),
            (
                default.max_calls,
                default.max_calls_per_peer,
                default.max_rows,
                default.cached_experts
            )
        );
        let file = "max_expert_calls = 8\nmax_expert_calls_per_peer = 2\nmax_expert_rows = 512\nloaded_experts = 5\n";
        let got = limits(&["--max-expert-calls", "32"], file).expect("valid");
        assert_eq!(
            (
                got.max_calls,
                got.max_calls_per_peer,
                got.max_rows,
                got.cached_experts
            ),
            (32, 2, 512, 5)
        );
        for (flags, says) in [
            (&["--max-expert-calls", "0"][..], "--max-expert-calls must"),
            (&["--max-expert-rows", "0"][..], "--max-expert-rows"),
            (&["--loaded-experts", "0"][..], "--loaded-experts"),
            (
                &[
                    "--max-expert-calls",
                    "2",
                    "--max-expert-calls-per-peer",
                    "3",
                ][..],
                "must not exceed",
            ),
        ] {
            let err = limits(flags, "").expect_err(says).to_string();
            assert!(err.contains(says), "{flags:?}: {err}");
        }
        assert!(limits(&["--max-expert-calls", "-1"], "").is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(settings(&[], "max_shards = \"x\"").is_err());
        assert!(settings(&["--max-shards", "0", "--coordinator", KEY], "").is_err());
        assert!(settings(&["--listen", "not an addr"], "").is_err());
        assert!(settings(&["--dht-server=maybe"], "").is_err());
    }
}
