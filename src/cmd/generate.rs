//! `mana generate`: samples text from a checkpoint written by `mana train`: greedy by default, or with a
//! temperature and nucleus (top-p) cut; `--speculative` drafts with the MTP head and verifies with the main
//! head (the output does not change), and `--compare` runs both ways and reports the speed-up. Passes run
//! through a KV cache unless `--no-kv-cache` asks for the whole window to be recomputed every pass (same
//! output, bit for bit; kept to measure what the cache gains).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use mana_kernels::CpuBackend;
use mana_kernels::gemm::Precision;
use mana_kernels::generate::{
    self, CachedModel, GenerateConfig, Generation, LanguageModel, Sampling, UncachedModel,
    bytes_to_text,
};
use mana_kernels::model::Model;
use mana_kernels::train::Trainer;

/// The most tokens one command (or one `mana serve` request) may generate.
pub(crate) const MAX_TOKENS_LIMIT: usize = 1 << 20;

/// The prompt and sampling flags `mana generate` and `mana infer` share.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Text to continue (byte tokens; must not be empty).
    #[arg(long)]
    pub prompt: String,
    /// Bytes to generate after the prompt.
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 (the default) decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (with --temperature).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampling draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Draft the token after next with the MTP head and verify it with the main head in the next pass.
    #[arg(long)]
    pub speculative: bool,
}

impl SamplingArgs {
    /// The prompt as byte tokens and the generation settings, or why the flags are refused.
    pub fn resolve(&self) -> anyhow::Result<(Vec<u32>, GenerateConfig)> {
        if self.prompt.is_empty() {
            bail!("--prompt must not be empty");
        }
        if self.max_tokens > MAX_TOKENS_LIMIT {
            bail!("--max-tokens is limited to {MAX_TOKENS_LIMIT}");
        }
        let sampling = if self.temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Sample {
                temperature: self.temperature,
                top_p: self.top_p,
            }
        };
        let prompt = self.prompt.bytes().map(u32::from).collect();
        let config = GenerateConfig {
            max_tokens: self.max_tokens,
            sampling,
            seed: self.seed,
            speculative: self.speculative,
        };
        Ok((prompt, config))
    }
}

/// Arguments of `mana generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Checkpoint directory written by `mana train --save`.
    #[arg(long, env = "MANA_CHECKPOINT")]
    checkpoint: PathBuf,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Generate both without and with speculation, check that the outputs are identical, and report the
    /// speed-up.
    #[arg(long, conflicts_with = "speculative")]
    compare: bool,
    /// Recompute the whole window at every forward pass instead of keeping a KV cache (same output; slower;
    /// for measuring the cache).
    #[arg(long)]
    no_kv_cache: bool,
    /// Override the checkpoint's GEMM precision (fp8 or f32).
    #[arg(long)]
    precision: Option<Precision>,
    /// Print one JSON object (text and counters) instead of text.
    #[arg(long)]
    json: bool,
    /// CPU threads for the GEMMs (default: all).
    #[arg(long, env = "MANA_THREADS")]
    threads: Option<usize>,
}

/// One timed generation.
struct Timed {
    generation: Generation,
    seconds: f64,
}

impl Timed {
    fn json(&self) -> serde_json::Value {
        let g = &self.generation;
        serde_json::json!({
            "tokens": g.tokens.len(),
            "forward_passes": g.forward_passes,
            "drafts": g.drafts,
            "accepted": g.accepted,
            "acceptance_rate": g.acceptance_rate(),
            "tokens_per_pass": g.tokens_per_pass(),
            "seconds": self.seconds,
            "tokens_per_s": g.tokens.len() as f64 / self.seconds.max(1e-9),
        })
    }
}

fn timed(
    model: &mut dyn LanguageModel,
    prompt: &[u32],
    config: &GenerateConfig,
) -> anyhow::Result<Timed> {
    let started = Instant::now();
    let generation = generate::generate(model, prompt, config)?;
    Ok(Timed {
        generation,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Generates and prints the text (and, with speculation, its counters).
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let (prompt, config) = args.sampling.resolve()?;
    let backend = match args.threads {
        Some(n) if n > 0 => CpuBackend::with_threads(n),
        _ => CpuBackend::new(),
    };
    let mut trainer = Trainer::load(&args.checkpoint, Box::new(backend))
        .with_context(|| format!("loading the checkpoint {}", args.checkpoint.display()))?;
    let model = trainer.model_mut();
    if let Some(p) = args.precision {
        model.set_precision(p);
    }
    warm_up(model)?;
    let mut cached;
    let mut uncached;
    let model: &mut dyn LanguageModel = if args.no_kv_cache {
        uncached = UncachedModel::new(model);
        &mut uncached
    } else {
        cached = CachedModel::new(model);
        &mut cached
    };
    if args.compare {
        let plain = timed(
            model,
            &prompt,
            &GenerateConfig {
                speculative: false,
                ..config
            },
        )?;
        let spec = timed(
            model,
            &prompt,
            &GenerateConfig {
                speculative: true,
                ..config
            },
        )?;
        if plain.generation.tokens != spec.generation.tokens {
            bail!("speculative decoding changed the output (a bug): please report it");
        }
        let speedup = plain.seconds / spec.seconds.max(1e-9);
        let text = bytes_to_text(&prompt, &spec.generation.tokens);
        if args.json {
            let out = serde_json::json!({ "text": text, "plain": plain.json(), "speculative": spec.json(), "speedup": speedup });
            println!("{out}");
        } else {
            println!("{text}");
            eprintln!(
                "plain: {} tokens in {:.2} s; speculative: {} passes, acceptance {:.1}%, {:.2} tokens/pass, {:.2} s; \
                 speed-up {speedup:.2}x (identical output)",
                plain.generation.tokens.len(),
                plain.seconds,
                spec.generation.forward_passes,
                100.0 * spec.generation.acceptance_rate(),
                spec.generation.tokens_per_pass(),
                spec.seconds,
            );
        }
        return Ok(());
    }
    let run = timed(model, &prompt, &config)?;
    let text = bytes_to_text(&prompt, &run.generation.tokens);
    if args.json {
        let mut out = run.json();
        out["text"] = serde_json::Value::String(text);
        println!("{out}");
    } else {
        println!("{text}");
        let g = &run.generation;
        let cache = if args.no_kv_cache {
            "window recomputed every pass"
        } else {
            "KV cache"
        };
        let draft = if args.sampling.speculative {
            format!(
                " ({:.2} tokens/pass, draft acceptance {:.1}%)",
                g.tokens_per_pass(),
                100.0 * g.acceptance_rate()
            )
        } else {
            String::new()
        };
        eprintln!(
            "{} tokens in {} forward passes{draft}, {:.1} tokens/s ({cache})",
            g.tokens.len(),
            g.forward_passes,
            g.tokens.len() as f64 / run.seconds.max(1e-9)
        );
    }
    Ok(())
}

/// Runs one cached step (with MTP) over a whole context, the longest step any pass takes, so that no timed
/// run pays for growing the model's activation buffers and comparisons are fair.
fn warm_up(model: &mut Model) -> anyhow::Result<()> {
    let t = model.config().context.max(1);
    let v = model.config().vocab_size;
    let mut cache = model.new_cache();
    let mut main = vec![0.0; v];
    let mut mtp = vec![0.0; v];
    let mtp_out = if model.config().mtp {
        Some(&mut mtp[..])
    } else {
        None
    };
    model.decode(&mut cache, &vec![0; t], 1, &mut main, mtp_out)?;
    Ok(())
}
