//! `mana train`: trains the model on one machine, on the user's text or on the built-in corpus, logging one
//! JSON line per step for machines and a progress bar for people, and optionally saving a checkpoint.
//!
//! Settings come from three places, strongest first: command-line flags, `MANA_*` environment variables
//! (clap reads both), then a TOML file (`--config`) with `[model]`, `[optim]` and `[train]` tables. Whatever
//! none of them sets takes the library defaults.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mana_kernels::CpuBackend;
use mana_kernels::data::builtin::{self, DEFAULT_BUILTIN_BYTES};
use mana_kernels::data::{BYTE_VOCAB, SourceLimits, Split, TextDataset, read_corpus};
use mana_kernels::gemm::Precision;
use mana_kernels::model::ModelConfig;
use mana_kernels::optim::OptimConfig;
use mana_kernels::quant::ScaleMode;
use mana_kernels::train::Trainer;
use serde::{Deserialize, Serialize};

/// Arguments of `mana train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Text to train on: a UTF-8 file, a .gz file, or a directory of them (read recursively). Without
    /// it, mana generates its built-in corpus from the seed.
    #[arg(long, env = "MANA_CORPUS")]
    corpus: Option<PathBuf>,
    /// Optimizer steps to run.
    #[arg(long, env = "MANA_STEPS")]
    steps: Option<u64>,
    /// Precision of the model's GEMMs: fp8 (E4M3 with fine-grained scales) or f32.
    #[arg(long, env = "MANA_PRECISION")]
    precision: Option<Precision>,
    /// At fp8, whether the forward GEMMs (y = x·Wᵀ) run in FP8 (default true; false runs them in f32).
    /// With --fp8-dgrad, --fp8-wgrad and --fp8-scale it overrides the [model.fp8] table.
    #[arg(long, env = "MANA_FP8_FORWARD")]
    fp8_forward: Option<bool>,
    /// At fp8, whether the data-gradient GEMMs (dx = dy·W) run in FP8 (default true).
    #[arg(long, env = "MANA_FP8_DGRAD")]
    fp8_dgrad: Option<bool>,
    /// At fp8, whether the weight-gradient GEMMs (dW += dyᵀ·x) run in FP8 (default true).
    #[arg(long, env = "MANA_FP8_WGRAD")]
    fp8_wgrad: Option<bool>,
    /// FP8 tile scales: amax (s = amax/448, the default) or power_of_two (rounded up to a power of two).
    #[arg(long, env = "MANA_FP8_SCALE", value_parser = parse_scale_mode)]
    fp8_scale: Option<ScaleMode>,
    /// Seed of the weights, the batches and the built-in corpus.
    #[arg(long, env = "MANA_SEED")]
    seed: Option<u64>,
    /// TOML file with [model], [optim] and [train] tables (flags and MANA_* variables override it).
    #[arg(long, env = "MANA_CONFIG")]
    config: Option<PathBuf>,
    /// Directory to write the final checkpoint to (created if missing).
    #[arg(long, env = "MANA_SAVE")]
    save: Option<PathBuf>,
    /// File to write one JSON object per step to (step, loss, mtp_loss, lr, tokens_per_s, val_loss when
    /// evaluated, expert_load per MoE layer).
    #[arg(long, env = "MANA_LOG_JSON")]
    log_json: Option<PathBuf>,
    /// Sequences per batch.
    #[arg(long, env = "MANA_BATCH_SIZE")]
    batch_size: Option<usize>,
    /// Positions per sequence (at most the model's context).
    #[arg(long, env = "MANA_SEQ_LEN")]
    seq_len: Option<usize>,
    /// Peak learning rate.
    #[arg(long, env = "MANA_LR")]
    lr: Option<f32>,
    /// Evaluate on validation batches every this many steps (0: only at the end).
    #[arg(long, env = "MANA_EVAL_EVERY")]
    eval_every: Option<u64>,
    /// Validation batches per evaluation.
    #[arg(long, env = "MANA_EVAL_BATCHES")]
    eval_batches: Option<u64>,
    /// CPU threads for the GEMMs (default: all).
    #[arg(long, env = "MANA_THREADS")]
    threads: Option<usize>,
}

/// The `[train]` table: how to run, as opposed to what the model is (`[model]`) and how it is optimized
/// (`[optim]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per batch (B).
    pub batch_size: usize,
    /// Positions per sequence (T).
    pub seq_len: usize,
    /// Seed of weights, batches and the built-in corpus.
    pub seed: u64,
    /// The data shard this machine draws batches from.
    pub shard: u64,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Validation batches per evaluation.
    pub eval_batches: u64,
    /// The corpus path (none: built-in corpus).
    pub corpus: Option<PathBuf>,
    /// Bytes of built-in corpus to generate.
    pub builtin_bytes: usize,
    /// Fraction of the text held out for validation.
    pub validation_fraction: f64,
    /// GEMM threads (0: all).
    pub threads: usize,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            steps: 200,
            batch_size: 8,
            seq_len: 64,
            seed: 0,
            shard: 0,
            eval_every: 50,
            eval_batches: 4,
            corpus: None,
            builtin_bytes: DEFAULT_BUILTIN_BYTES,
            validation_fraction: Split::default().validation_fraction,
            threads: 0,
        }
    }
}

/// The whole TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ConfigFile {
    model: ModelConfig,
    optim: OptimConfig,
    train: TrainSettings,
}

/// Everything a run needs, after merging flags, environment, file and defaults.
struct Plan {
    model: ModelConfig,
    optim: OptimConfig,
    train: TrainSettings,
}

/// Merges the three sources of settings and checks that they fit together.
fn plan(args: &TrainArgs) -> anyhow::Result<Plan> {
    let (mut file, optim_explicit) = match &args.config {
        Some(path) => {
            let raw = crate::config::read_toml(path)?;
            let file: ConfigFile = raw
                .clone()
                .try_into()
                .with_context(|| format!("parsing {}", path.display()))?;
            // The schedule follows the step count unless the file pins it.
            let optim = raw.get("optim").and_then(|o| o.as_table());
            let pinned = |key: &str| optim.is_some_and(|o| o.contains_key(key));
            (file, (pinned("total_steps"), pinned("warmup_steps")))
        }
        None => (ConfigFile::default(), (false, false)),
    };
    let t = &mut file.train;
    if let Some(v) = args.steps {
        t.steps = v;
    }
    if let Some(v) = args.seed {
        t.seed = v;
    }
    if let Some(v) = &args.corpus {
        t.corpus = Some(v.clone());
    }
    if let Some(v) = args.batch_size {
        t.batch_size = v;
    }
    if let Some(v) = args.seq_len {
        t.seq_len = v;
    }
    if let Some(v) = args.eval_every {
        t.eval_every = v;
    }
    if let Some(v) = args.eval_batches {
        t.eval_batches = v;
    }
    if let Some(v) = args.threads {
        t.threads = v;
    }
    if let Some(v) = args.precision {
        file.model.precision = v;
    }
    let fp8 = &mut file.model.fp8;
    for (field, flag) in [
        (&mut fp8.forward, args.fp8_forward),
        (&mut fp8.dgrad, args.fp8_dgrad),
        (&mut fp8.wgrad, args.fp8_wgrad),
    ] {
        if let Some(v) = flag {
            *field = v;
        }
    }
    if let Some(v) = args.fp8_scale {
        fp8.scale = v;
    }
    if let Some(v) = args.lr {
        file.optim.lr = v;
    }
    let steps = usize::try_from(file.train.steps).context("--steps does not fit in memory")?;
    if !optim_explicit.0 {
        file.optim.total_steps = steps.max(1);
    }
    if !optim_explicit.1 {
        file.optim.warmup_steps = file.optim.warmup_steps.min(steps / 10);
    }
    file.model.validate()?;
    file.optim.validate()?;
    let t = &file.train;
    if t.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if t.batch_size == 0 || t.seq_len == 0 {
        bail!("batch_size and seq_len must be at least 1");
    }
    if t.seq_len > file.model.context {
        bail!(
            "seq_len {} exceeds the model's context of {}",
            t.seq_len,
            file.model.context
        );
    }
    if file.model.vocab_size < BYTE_VOCAB {
        bail!(
            "the model's vocab_size {} is below the {BYTE_VOCAB} byte tokens",
            file.model.vocab_size
        );
    }
    if t.eval_batches == 0 {
        bail!("eval_batches must be at least 1");
    }
    Ok(Plan {
        model: file.model,
        optim: file.optim,
        train: file.train,
    })
}

/// Parses `--fp8-scale` (the TOML spelling: `amax` or `power_of_two`).
fn parse_scale_mode(s: &str) -> Result<ScaleMode, String> {
    match s {
        "amax" => Ok(ScaleMode::Amax),
        "power_of_two" | "pow2" => Ok(ScaleMode::PowerOfTwo),
        _ => Err(format!(
            "unknown scale mode {s:?}: expected amax or power_of_two"
        )),
    }
}

/// Builds the dataset from the corpus, or from the built-in corpus when none is given.
fn load_dataset(train: &TrainSettings) -> anyhow::Result<TextDataset> {
    let text = match &train.corpus {
        Some(path) => read_corpus(path, SourceLimits::default())?,
        None => builtin::generate(train.seed, train.builtin_bytes),
    };
    let split = Split {
        validation_fraction: train.validation_fraction,
        ..Split::default()
    };
    Ok(TextDataset::new(&text, split)?)
}

/// One line of `--log-json`.
#[derive(Serialize)]
struct StepLine<'a> {
    step: u64,
    loss: f32,
    mtp_loss: f32,
    balance_loss: f32,
    lr: f32,
    grad_norm: f32,
    tokens: usize,
    tokens_per_s: f64,
    elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_loss: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_mtp_loss: Option<f32>,
    precision: Precision,
    expert_load: &'a [Vec<f32>],
}

/// Mean validation losses (main, MTP) over `batches` fixed validation batches.
fn validate(
    trainer: &mut Trainer,
    data: &TextDataset,
    t: &TrainSettings,
) -> anyhow::Result<(f32, f32)> {
    let (mut loss, mut mtp, mut n) = (0.0f64, 0.0f64, 0usize);
    for i in 0..t.eval_batches {
        let batch = data.validation_batch(i, t.batch_size, t.seq_len)?;
        let stats = trainer.evaluate(&batch)?;
        loss += f64::from(stats.loss) * stats.tokens as f64;
        mtp += f64::from(stats.mtp_loss) * stats.tokens as f64;
        n += stats.tokens;
    }
    let n = n.max(1) as f64;
    Ok(((loss / n) as f32, (mtp / n) as f32))
}

/// Trains and prints a summary.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let Plan {
        model,
        optim,
        train,
    } = plan(&args)?;
    let data = load_dataset(&train)?;
    let precision = model.precision;
    let fp8 = model.fp8;
    let backend = if train.threads == 0 {
        CpuBackend::new()
    } else {
        CpuBackend::with_threads(train.threads)
    }
    .with_scale_mode(fp8.scale);
    let mut trainer = Trainer::new(model, optim, train.seed, Box::new(backend))?;
    tracing::info!(
        steps = train.steps,
        batch_size = train.batch_size,
        seq_len = train.seq_len,
        %precision,
        ?fp8,
        train_bytes = data.train_bytes().len(),
        validation_bytes = data.validation_bytes().len(),
        corpus = %train.corpus.as_ref().map_or("built-in".to_string(), |p| p.display().to_string()),
        "training"
    );
    let mut log = match &args.log_json {
        Some(path) => Some(BufWriter::new(
            File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(train.steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps {msg}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    let mut train_time = Duration::ZERO;
    let mut tokens_total = 0usize;
    let mut last = None;
    let mut last_val = None;
    for step in 0..train.steps {
        let batch = data.batch(
            train.seed,
            train.shard,
            step,
            train.batch_size,
            train.seq_len,
        )?;
        let started = Instant::now();
        let stats = trainer.step(&batch)?;
        let took = started.elapsed();
        train_time += took;
        tokens_total += stats.tokens;
        let final_step = step + 1 == train.steps;
        let eval_due = final_step || (train.eval_every > 0 && (step + 1) % train.eval_every == 0);
        let val = if eval_due {
            Some(validate(&mut trainer, &data, &train)?)
        } else {
            None
        };
        if val.is_some() {
            last_val = val;
        }
        if let Some(out) = log.as_mut() {
            let line = StepLine {
                step: stats.step,
                loss: stats.loss,
                mtp_loss: stats.mtp_loss,
                balance_loss: stats.balance_loss,
                lr: stats.lr,
                grad_norm: stats.grad_norm,
                tokens: stats.tokens,
                tokens_per_s: stats.tokens as f64 / took.as_secs_f64().max(1e-9),
                elapsed_s: train_time.as_secs_f64(),
                val_loss: val.map(|v| v.0),
                val_mtp_loss: val.map(|v| v.1),
                precision,
                expert_load: &stats.expert_load,
            };
            serde_json::to_writer(&mut *out, &line)?;
            out.write_all(b"\n")?;
        }
        bar.set_message(match val {
            Some((v, _)) => format!("loss {:.3} val {v:.3}", stats.loss),
            None => format!("loss {:.3}", stats.loss),
        });
        bar.inc(1);
        last = Some(stats);
    }
    bar.finish_and_clear();
    if let Some(mut out) = log {
        out.flush()?;
    }
    if let Some(dir) = &args.save {
        trainer.save(dir)?;
    }
    let secs = train_time.as_secs_f64().max(1e-9);
    let last = last.context("at least one step ran")?;
    let (val_loss, val_mtp) = last_val.context("the last step is always evaluated")?;
    println!(
        "trained {} steps ({} tokens, {precision}) in {:.1} s: {:.0} tokens/s",
        train.steps,
        tokens_total,
        secs,
        tokens_total as f64 / secs
    );
    println!(
        "final train loss {:.4} (mtp {:.4}); validation loss {val_loss:.4} (mtp {val_mtp:.4})",
        last.loss, last.mtp_loss
    );
    if let Some(dir) = &args.save {
        println!("checkpoint saved to {}", dir.display());
    }
    Ok(())
}
