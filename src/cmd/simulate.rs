//! `mana simulate`: N training nodes in one process on the real round engine (no network), to measure what
//! training across the network costs and saves before running it: validation loss per round, the final loss
//! against two single-node baselines (the full model at the same total tokens and global batch; one node
//! alone for the same number of its own steps), and the bytes on the wire per token against an f32 ring
//! all-reduce of the full model at every optimizer step of the data-parallel baseline.
//!
//! What the byte counts mean is defined in `mana_engine::round::simulate`: wire bytes are the encoded delta
//! payloads times the peers that fetch each one (the coordinator and the other holders of its shard); the
//! all-reduce reference sends `2 (N-1)/N · 4P` bytes per node per step.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mana_engine::round::{
    RoundReport, RunSpec, SimConfig, SimReport, build_trainer, simulate_with,
};
use mana_kernels::data::builtin::{self, DEFAULT_BUILTIN_BYTES};
use mana_kernels::data::{SourceLimits, Split, TextDataset, read_corpus};
use mana_kernels::model::ModelConfig;
use mana_protocol::UpdateRule;

use super::codec::CodecArgs;
use super::rule::Rule;

/// Which model to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelPreset {
    /// The test/demo model (d_model 64, 2 blocks, 8 experts in one MoE block).
    Tiny,
    /// The default model of `mana train` (d_model 128, 4 blocks, 8 experts per MoE block).
    Default,
}

/// Arguments of `mana simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Text to train on: a UTF-8 file, a .gz file, or a directory of them. Without it, the built-in corpus
    /// generated from the seed.
    #[arg(long, env = "MANA_CORPUS")]
    corpus: Option<PathBuf>,
    /// Simulated nodes.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Holders per expert.
    #[arg(long, default_value_t = 2)]
    replication: usize,
    /// Update rule.
    #[arg(long, value_enum, default_value_t = Rule::Sync)]
    rule: Rule,
    /// H: micro-batches per round (sync) or inner steps per round (diloco).
    #[arg(long, default_value_t = 1)]
    inner_steps: u32,
    /// Rounds to run (ignored when --tokens is given).
    #[arg(long, default_value_t = 30)]
    rounds: u64,
    /// Token budget for all nodes together; sets the rounds to budget / (nodes · H · batch tokens).
    #[arg(long)]
    tokens: Option<u64>,
    /// Seed of the weights, the data assignment and the built-in corpus.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Model preset.
    #[arg(long, value_enum, default_value_t = ModelPreset::Tiny)]
    model: ModelPreset,
    /// Inner AdamW learning rate (default: the run's, 3e-3).
    #[arg(long)]
    lr: Option<f32>,
    /// Learning-rate warm-up in optimizer steps.
    #[arg(long)]
    warmup: Option<u64>,
    /// Outer learning rate (diloco).
    #[arg(long)]
    outer_lr: Option<f32>,
    /// Outer Nesterov momentum (diloco).
    #[arg(long)]
    outer_momentum: Option<f32>,
    /// Tokens per inner step on each node.
    #[arg(long)]
    batch_tokens: Option<u32>,
    /// Positions per sequence.
    #[arg(long)]
    seq_len: Option<u32>,
    /// The delta codec.
    #[command(flatten)]
    codec: CodecArgs,
    /// Send raw f32 deltas instead of the codec's FP8 payloads.
    #[arg(long)]
    no_compress: bool,
    /// Validation batches (of 16 sequences) per evaluation.
    #[arg(long, default_value_t = 8)]
    eval_batches: u64,
    /// Evaluate every this many rounds (0: at the end only).
    #[arg(long, default_value_t = 1)]
    eval_every: u64,
    /// Skip the two single-node baselines.
    #[arg(long)]
    no_baselines: bool,
    /// Each node trains the next round while the last one commits (Streaming DiLoCo's overlap; diloco only):
    /// it starts from the last base it knows moved by its own progress.
    #[arg(long)]
    overlap: bool,
    /// Start every diloco round from zero inner AdamW moments instead of carrying each node's own from its
    /// last round (what the engine did before; for comparison).
    #[arg(long)]
    reset_inner_optim: bool,
    /// How far a router bias moves per optimizer step towards balanced expert loads (the network moves
    /// them once a round from the nodes' loads; default: the model's, 0.001); 0 keeps them frozen.
    #[arg(long)]
    router_bias_gamma: Option<f32>,
    /// Save the network's final model here (a `mana train` checkpoint directory, for `mana generate`).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Print JSON: one object per round, then the report.
    #[arg(long)]
    json: bool,
}

/// Runs `mana simulate`.
pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let mut spec = RunSpec::tiny();
    spec.init_seed = args.seed;
    if args.model == ModelPreset::Default {
        spec.model = ModelConfig::default();
    }
    if let Some(w) = args.warmup {
        spec.warmup_steps = w;
    }
    let rule = UpdateRule::from(args.rule);
    let mut cfg = SimConfig::new(&spec, rule, args.inner_steps, args.rounds);
    cfg.nodes = args.nodes;
    cfg.replication = args.replication;
    cfg.data_seed = args.seed;
    cfg.compress = !args.no_compress;
    cfg.eval_batches = args.eval_batches;
    cfg.eval_every = args.eval_every;
    cfg.baselines = !args.no_baselines;
    cfg.overlap = args.overlap;
    cfg.reset_inner_optim = args.reset_inner_optim;
    let h = &mut cfg.hyper;
    h.codec = args.codec.options()?;
    // The outer optimizer that goes with the codec (none for sparse low-bit deltas), unless given below.
    *h = spec.hyper_with_codec(rule, h.codec);
    if let Some(x) = args.lr {
        h.inner_lr = x;
    }
    if let Some(x) = args.outer_lr {
        h.outer_lr = x;
    }
    if let Some(x) = args.router_bias_gamma {
        h.router_bias_gamma = x;
    }
    if let Some(x) = args.outer_momentum {
        h.outer_momentum = x;
    }
    if let Some(x) = args.batch_tokens {
        h.batch_tokens = x;
    }
    if let Some(x) = args.seq_len {
        h.seq_len = x;
    }
    if args.nodes == 0 || args.inner_steps == 0 {
        bail!("--nodes and --inner-steps must be at least 1");
    }
    if let Some(budget) = args.tokens {
        let per_round =
            args.nodes as u64 * u64::from(args.inner_steps) * u64::from(cfg.hyper.batch_tokens);
        cfg.rounds = (budget / per_round.max(1)).max(1);
    }

    let text = match &args.corpus {
        Some(path) => read_corpus(path, SourceLimits::default())?,
        None => builtin::generate(args.seed, DEFAULT_BUILTIN_BYTES),
    };
    let data = TextDataset::new(&text, Split::default())?;

    let bar = if std::io::stderr().is_terminal() && !args.json {
        ProgressBar::new(cfg.rounds)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} rounds {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if !args.json {
        println!(
            "simulating {} nodes, r = {}, {:?}, H = {}, {} rounds of {} tokens per node per step",
            cfg.nodes, cfg.replication, rule, cfg.inner_steps, cfg.rounds, cfg.hyper.batch_tokens
        );
        let h = &cfg.hyper;
        println!(
            "outer lr {}, outer momentum {}, codec {:?}",
            h.outer_lr, h.outer_momentum, h.codec
        );
        println!(
            "{:>6} {:>10} {:>10} {:>10} {:>12} {:>14}",
            "round", "train", "val", "imbalance", "tokens", "wire bytes"
        );
    }
    let json = args.json;
    let mut on_round = |r: &RoundReport| {
        bar.inc(1);
        if json {
            if let Ok(line) = serde_json::to_string(r) {
                println!("{line}");
            }
        } else if !r.val_loss.is_nan() {
            bar.suspend(|| {
                println!(
                    "{:>6} {:>10.4} {:>10.4} {:>10.2} {:>12} {:>14}",
                    r.round, r.train_loss, r.val_loss, r.imbalance, r.tokens, r.wire_bytes
                )
            });
        }
    };
    let report = simulate_with(&spec, &data, &cfg, &mut on_round)?;
    bar.finish_and_clear();
    if let Some(dir) = &args.save {
        build_trainer(&spec, &cfg.hyper, &report.state)
            .context("building the final model")?
            .save(dir)
            .with_context(|| format!("saving the final model to {}", dir.display()))?;
        if !args.json {
            println!("final model saved to {}", dir.display());
        }
    }
    if json {
        println!("{}", serde_json::to_string(&summary_json(&report))?);
    } else {
        print_summary(&report);
    }
    Ok(())
}

/// The report plus its derived per-token figures, for `--json`.
fn summary_json(r: &SimReport) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or(serde_json::Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("rounds");
        o.insert(
            "wire_bytes_per_token".into(),
            r.wire_bytes_per_token().into(),
        );
        o.insert(
            "payload_bytes_per_token".into(),
            r.payload_bytes_per_token().into(),
        );
        o.insert(
            "allreduce_bytes_per_token".into(),
            r.allreduce_bytes_per_token().into(),
        );
        o.insert("traffic_ratio".into(), r.traffic_ratio().into());
        if let Some(full) = &r.full {
            o.insert(
                "gap_to_full".into(),
                ((r.val_loss - full.val_loss) / full.val_loss).into(),
            );
        }
    }
    v
}

fn print_summary(r: &SimReport) {
    println!();
    println!(
        "{:<44} {:>10} {:>8} {:>12} {:>10}",
        "", "val loss", "steps", "tokens", "imbalance"
    );
    println!(
        "{:<44} {:>10.4} {:>8} {:>12} {:>10.2}",
        format!(
            "network ({}, {} nodes, H = {})",
            r.rule, r.nodes, r.inner_steps
        ),
        r.val_loss,
        r.rounds.len(),
        r.tokens,
        r.imbalance
    );
    if let Some(f) = &r.full {
        let gap = 100.0 * (r.val_loss - f.val_loss) / f.val_loss;
        println!(
            "{:<44} {:>10.4} {:>8} {:>12} {:>10.2}   network {:+.2}%",
            format!("full model, one node, batch {} seqs", f.batch_sequences),
            f.val_loss,
            f.steps,
            f.tokens,
            f.imbalance,
            gap
        );
    }
    if let Some(a) = &r.alone {
        println!(
            "{:<44} {:>10.4} {:>8} {:>12} {:>10.2}",
            format!("one node alone, batch {} seqs", a.batch_sequences),
            a.val_loss,
            a.steps,
            a.tokens,
            a.imbalance
        );
    }
    println!();
    println!("parameters P = {}", r.params);
    println!(
        "payload bytes per token (each payload once):   {:>12.2}",
        r.payload_bytes_per_token()
    );
    println!(
        "wire bytes per token (payload x its fetchers): {:>12.2}",
        r.wire_bytes_per_token()
    );
    println!(
        "f32 ring all-reduce bytes per token:           {:>12.2}",
        r.allreduce_bytes_per_token()
    );
    println!(
        "all-reduce / wire:                             {:>12.1}x",
        r.traffic_ratio()
    );
}
