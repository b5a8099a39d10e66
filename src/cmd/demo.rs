//! `mana demo`: starts a whole training network on this machine (a bootstrap node, a coordinator and N
//! nodes, each its own process on loopback), trains for a few minutes with live progress, then writes the
//! metrics, a loss plot, every process's final shard hashes and a text sample into `--out`. The work is in
//! the `mana-demo` crate; this file is its command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use mana_demo::{DemoConfig, Stop};

use super::codec::CodecArgs;
use crate::logging::LogFormat;

/// Rounds run when neither --rounds nor --minutes is given: with the default rule and H, about 2 million
/// tokens in about 2 minutes and a half on 2 cores, enough for the model to answer some of the built-in
/// corpus's questions exactly (docs/training.md, "The demo's defaults").
pub const DEFAULT_ROUNDS: u64 = 40;
/// H when the rule is diloco and --inner-steps is not given: 50 local steps a round keep the round's fixed
/// costs (announcing, fetching, scoring, committing: about a second on loopback) small beside the training.
pub const DEFAULT_DILOCO_STEPS: u32 = 50;
/// Arguments of `mana demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Training nodes to start (each a separate process).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    nodes: u64,
    /// Members the coordinator waits for before a round starts (default: every node). Below --nodes, the run
    /// goes on while a node is down or asleep.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    min_members: Option<u64>,
    /// Rounds to train (default 40); the coordinator then exports the model and the demo ends.
    #[arg(long, conflicts_with = "minutes", value_parser = clap::value_parser!(u64).range(1..))]
    rounds: Option<u64>,
    /// Train for this many minutes instead of a number of rounds.
    #[arg(long)]
    minutes: Option<f64>,
    /// Text to train on: a UTF-8 file, a .gz file, or a directory of them. Default: the built-in corpus.
    #[arg(long, env = "MANA_CORPUS")]
    corpus: Option<PathBuf>,
    /// Update rule: diloco (H local steps per round, outer step on the mean pseudo-gradient) or sync
    /// (data-parallel: one AdamW step per round on the mean gradient).
    #[arg(long, default_value = "diloco", value_parser = ["sync", "diloco"])]
    rule: String,
    /// H: micro-batches per node per round (sync; default 1) or local steps per round (diloco; default 50).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=mana_engine::coordinator::MAX_INNER_STEPS as i64))]
    inner_steps: Option<u32>,
    /// How the nodes encode their deltas (default dense FP8; e.g. `--top-k 0.03 --top-k-per-block --values
    /// int2 --pow2-scales` for SparseLoCo's sparse 2-bit deltas).
    #[command(flatten)]
    codec: CodecArgs,
    /// Output directory (created; a previous demo's output there is replaced).
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Seed of the run (initial weights, batches, built-in corpus). Default: the coordinator's.
    #[arg(long, env = "MANA_SEED")]
    seed: Option<u64>,
    /// Prompt for sample.txt (repeatable). Default: one per kind of line of the built-in corpus, or "The "
    /// with --corpus.
    #[arg(long)]
    prompt: Vec<String>,
    /// Bytes generated per prompt.
    #[arg(long, default_value_t = 48, value_parser = clap::value_parser!(u64).range(1..=4096))]
    sample_tokens: u64,
    /// Log lines (the demo's on stderr, each child's in its log file): text or json (one object per line).
    #[arg(long, env = "MANA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Crash children while training (SIGKILL at random moments, then a restart): `all` (the default) kills
    /// training nodes, the coordinator once and the bootstrap once; `coordinator` kills only the coordinator,
    /// once per committed round at a random moment of the next. The last 3 rounds run undisturbed, and the
    /// summary says what was done.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "all")]
    chaos: Option<ChaosArg>,
    /// Skip the comparison at the end (the full model trained on one node on as many tokens as the network,
    /// scored on the same questions; built-in corpus only).
    #[arg(long)]
    no_single_node: bool,
    /// Seed of the chaos (its moments and victims). Default: --seed, or 1.
    #[arg(long, requires = "chaos")]
    chaos_seed: Option<u64>,
}

/// What `--chaos` kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ChaosArg {
    /// Training nodes, the coordinator once and the bootstrap once.
    All,
    /// Only the coordinator, once per round.
    Coordinator,
}

/// Runs `mana demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    crate::logging::init(args.log_format);
    let stop = match (args.rounds, args.minutes) {
        (_, Some(m)) => {
            anyhow::ensure!(
                m.is_finite() && m > 0.0 && m <= 24.0 * 60.0,
                "--minutes must be between 0 and 1440"
            );
            Stop::Time(Duration::from_secs_f64(m * 60.0))
        }
        (Some(r), None) => Stop::Rounds(r),
        (None, None) => Stop::Rounds(DEFAULT_ROUNDS),
    };
    let prompts = if !args.prompt.is_empty() {
        args.prompt
    } else if args.corpus.is_some() {
        vec!["The ".to_owned()]
    } else {
        mana_demo::sample::BUILTIN_PROMPTS
            .iter()
            .map(|p| (*p).to_owned())
            .collect()
    };
    let chaos = args.chaos.map(|mode| mana_demo::chaos::ChaosConfig {
        mode: match mode {
            ChaosArg::All => mana_demo::chaos::ChaosMode::Mixed,
            ChaosArg::Coordinator => mana_demo::chaos::ChaosMode::Coordinator,
        },
        seed: args.chaos_seed.or(args.seed).unwrap_or(1),
    });
    // Checked here, so that a codec the coordinator would refuse is refused before anything starts.
    args.codec.options()?;
    let codec_flags = args.codec.to_flags();
    let inner_steps = args
        .inner_steps
        .or((args.rule == "diloco").then_some(DEFAULT_DILOCO_STEPS));
    let config = DemoConfig {
        chaos,
        exe: std::env::current_exe()
            .context("finding the mana executable to start the network's processes")?,
        out: args.out,
        nodes: usize::try_from(args.nodes).context("--nodes")?,
        min_members: args
            .min_members
            .map(usize::try_from)
            .transpose()
            .context("--min-members")?,
        stop,
        corpus: args.corpus,
        rule: args.rule,
        codec_flags,
        inner_steps,
        seed: args.seed,
        prompts,
        sample_tokens: usize::try_from(args.sample_tokens).context("--sample-tokens")?,
        log_format: args.log_format.as_str().to_owned(),
        single_node: !args.no_single_node,
    };
    Ok(mana_demo::run(config)?)
}
