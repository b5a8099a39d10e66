//! Generation speed with and without the KV cache (issue #10): tokens per second at 64 and 512 generated
//! tokens, plain and self-speculative greedy decoding, each way measured in the same run so the ratios are
//! fair on a busy machine. Three ways of running a pass:
//! - `cached`: [`CachedModel`], the KV cache (what `mana generate` uses);
//! - `uncached`: [`UncachedModel`], the whole window recomputed every pass through the same row-invariant
//!   code (`mana generate --no-kv-cache`; the output is bit-identical to `cached`, which is checked here);
//! - `batched`: the full-window forward [`Model::logits`] on the `gemm` crate's batched products, i.e. how
//!   passes ran before the cache (same windows; its logits differ from the others by f32 rounding, so its
//!   text may differ).
//!
//! The model is the default shape (d_model 128, 4 layers, 8 experts top-2, context 128, FP8) with random
//! weights, or the checkpoint in `MANA_BENCH_CHECKPOINT` (a `mana train --save` directory; a trained model
//! accepts far more drafts), with the prompt `MANA_BENCH_PROMPT` (default "And God said, Let there be") and
//! the precision `MANA_BENCH_PRECISION` (fp8 or f32; default the model's). Each figure is the best of
//! `MANA_BENCH_REPS` runs (default 3 at 64 tokens, 1 at 512). A plain harness rather than criterion: one configuration takes up to a minute, and the point
//! is the ratio of ways measured side by side. Run: `cargo bench -p mana-kernels --bench generate`.

use std::path::Path;
use std::time::Instant;

use mana_kernels::CpuBackend;
use mana_kernels::generate::{
    self, CachedModel, GenerateConfig, Generation, LanguageModel, Sampling, UncachedModel,
};
use mana_kernels::model::{Model, ModelConfig, ModelError};
use mana_kernels::optim::OptimConfig;
use mana_kernels::train::Trainer;

/// Passes as they ran before the KV cache: [`Model::logits`] over the whole window, keeping the last rows.
struct Batched<'m> {
    model: &'m mut Model,
    main: Vec<f32>,
    mtp: Vec<f32>,
}

impl LanguageModel for Batched<'_> {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }
    fn context(&self) -> usize {
        self.model.config().context
    }
    fn has_mtp(&self) -> bool {
        self.model.config().mtp
    }
    fn logits(
        &mut self,
        window: &[u32],
        rows: usize,
        main_out: &mut [f32],
        mtp_out: Option<&mut [f32]>,
    ) -> Result<(), ModelError> {
        let (t, v) = (window.len(), self.vocab_size());
        self.main.resize(t * v, 0.0);
        self.mtp.resize(t * v, 0.0);
        let want_mtp = mtp_out.is_some();
        self.model.logits(
            window,
            &mut self.main,
            want_mtp.then_some(&mut self.mtp[..]),
        )?;
        main_out.copy_from_slice(&self.main[(t - rows) * v..]);
        if let Some(out) = mtp_out {
            out.copy_from_slice(&self.mtp[(t - rows) * v..]);
        }
        Ok(())
    }
}

/// The best (shortest) of `reps` runs, with its generation.
fn best_of(
    reps: usize,
    model: &mut dyn LanguageModel,
    prompt: &[u32],
    config: &GenerateConfig,
) -> (f64, Generation) {
    let mut best: Option<(f64, Generation)> = None;
    for _ in 0..reps {
        let started = Instant::now();
        let g = generate::generate(model, prompt, config).expect("generation runs");
        let s = started.elapsed().as_secs_f64();
        if best.as_ref().is_none_or(|(b, _)| s < *b) {
            best = Some((s, g));
        }
    }
    best.expect("at least one run")
}

/// The checkpoint in `MANA_BENCH_CHECKPOINT`, or the default model with random weights (inside a trainer,
/// which owns the model either way).
fn load() -> Trainer {
    match std::env::var_os("MANA_BENCH_CHECKPOINT") {
        Some(dir) => Trainer::load(Path::new(&dir), Box::new(CpuBackend::new()))
            .expect("MANA_BENCH_CHECKPOINT holds a checkpoint"),
        None => {
            let config = ModelConfig {
                init_std: 0.1,
                ..ModelConfig::default()
            };
            Trainer::new(
                config,
                OptimConfig::default(),
                1,
                Box::new(CpuBackend::new()),
            )
            .expect("the default config is valid")
        }
    }
}

fn main() {
    let mut trainer = load();
    let model = trainer.model_mut();
    if let Ok(p) = std::env::var("MANA_BENCH_PRECISION") {
        model.set_precision(p.parse().expect("MANA_BENCH_PRECISION is fp8 or f32"));
    }
    let reps_env = std::env::var("MANA_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok());
    let prompt: Vec<u32> = std::env::var("MANA_BENCH_PROMPT")
        .unwrap_or_else(|_| "And God said, Let there be".into())
        .bytes()
        .map(u32::from)
        .collect();
    println!(
        "model: d_model {}, {} layers, context {}, {}; {} threads",
        model.config().d_model,
        model.config().n_layers,
        model.config().context,
        model.config().precision,
        rayon::current_num_threads()
    );
    println!(
        "| tokens | decoding | passes | acceptance | uncached tok/s | batched tok/s | cached tok/s | cached / uncached | cached / batched |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for max_tokens in [64usize, 512] {
        let reps = reps_env.unwrap_or(if max_tokens <= 64 { 3 } else { 1 });
        for speculative in [false, true] {
            let config = GenerateConfig {
                max_tokens,
                sampling: Sampling::Greedy,
                seed: 0,
                speculative,
            };
            let (t_unc, g_unc) = best_of(reps, &mut UncachedModel::new(model), &prompt, &config);
            let (t_bat, _) = best_of(
                reps,
                &mut Batched {
                    model: &mut *model,
                    main: Vec::new(),
                    mtp: Vec::new(),
                },
                &prompt,
                &config,
            );
            let (t_cac, g_cac) = best_of(reps, &mut CachedModel::new(model), &prompt, &config);
            assert_eq!(g_cac, g_unc, "the KV cache changed the output (a bug)");
            let rate = |s: f64| max_tokens as f64 / s;
            println!(
                "| {max_tokens} | {} | {} | {:.1}% | {:.1} | {:.1} | {:.1} | {:.2}x | {:.2}x |",
                if speculative { "speculative" } else { "plain" },
                g_cac.forward_passes,
                100.0 * g_cac.acceptance_rate(),
                rate(t_unc),
                rate(t_bat),
                rate(t_cac),
                t_unc / t_cac,
                t_bat / t_cac,
            );
        }
    }
}
