//! What the encodings of expert calls ([`Dispatch`]) do to a trained model's numbers: the figures behind
//! the default of `mana infer --dispatch` (docs/architecture.md, "FP8 dispatch").
//!
//! Usage: `cargo run -p mana-node --example dispatch_error -- CHECKPOINT_DIR [TOKENS [TEXT_FILE]]`, on a
//! checkpoint of `mana train`. The model is split as a network client splits it (the trunk here, every routed
//! expert a standalone [`ExpertKernel`]) and, for each pair of encodings (hidden states / answers):
//!
//! 1. along the greedy path of the whole model on 8 fixed prompts, every expert call is also made through
//!    the encodings ([`Loopback`]) and its output compared with the exact one: the largest absolute error,
//!    the largest error relative to its row's largest output, and the relative L2 error;
//! 2. greedy generation of TOKENS (default 64) tokens per prompt with every expert call through the
//!    encodings: tokens equal to the whole model's, the first position that differs, and the tensor bytes of
//!    the calls per generated token (the prompt's prefill included, as a network client sends it);
//! 3. with TEXT_FILE (plain text, e.g. the unzipped KJV), on 64 windows of a context's bytes spread over
//!    it, teacher-forced: the mean loss (nats per byte) and the share of positions whose argmax (the greedy
//!    choice) differs from the whole model's.

use std::error::Error;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use mana_kernels::CpuBackend;
use mana_kernels::KernelError;
use mana_kernels::generate::{self, CachedModel, GenerateConfig, Sampling};
use mana_kernels::model::{
    ExpertCall, ExpertKernel, ExpertRunner, ExpertSet, KernelExperts, Model, ShardId,
};
use mana_kernels::train::Trainer;
use mana_node::infer::{Dispatch, Loopback};
use mana_protocol::TensorDtype;

const PROMPTS: [&str; 8] = [
    "In the beginning",
    "And the LORD said unto Moses, ",
    "Blessed are the ",
    "For God so loved the world, that ",
    "And it came to pass, when ",
    "The LORD is my shepherd; ",
    "Then said Jesus unto them, ",
    "And he opened his mouth, and taught them, saying, ",
];

/// The pairs measured: (hidden states, answers).
fn variants() -> Vec<Dispatch> {
    use TensorDtype::{Bf16, E4m3Tile128 as Fp8, F32};
    [(F32, Bf16), (F32, Fp8), (Fp8, F32), (Fp8, Bf16), (Fp8, Fp8)]
        .into_iter()
        .map(|(input, answer)| Dispatch { input, answer })
        .collect()
}

/// Every routed expert of `model` as a standalone kernel.
fn kernels(model: &Model) -> Result<KernelExperts, Box<dyn Error>> {
    let mut runner = KernelExperts::new();
    for shard in model.shards() {
        if shard == ShardId::Trunk {
            continue;
        }
        let params = model.export_shard(shard)?;
        let kernel = ExpertKernel::new(model.config(), &params, Box::new(CpuBackend::new()))?;
        runner.insert(shard, kernel)?;
    }
    Ok(runner)
}

/// `model`'s trunk and router biases in a model that holds no expert.
fn trunk(model: &Model) -> Result<Model, Box<dyn Error>> {
    let cfg = model.config().clone();
    let mut t = Model::with_experts(
        cfg.clone(),
        ExpertSet::none(&cfg),
        0,
        Box::new(CpuBackend::new()),
    )?;
    t.import_shard(ShardId::Trunk, &model.export_shard(ShardId::Trunk)?)?;
    for layer in (0..cfg.n_layers).filter(|&l| cfg.is_moe_layer(l)) {
        t.set_router_bias(layer, model.router_bias(layer)?)?;
    }
    Ok(t)
}

/// A runner kept by the caller too, to read it after a generation.
struct Shared<R>(Arc<Mutex<R>>);

impl<R: ExpertRunner> ExpertRunner for Shared<R> {
    fn run_layer(&mut self, layer: usize, calls: &mut [ExpertCall<'_>]) -> Result<(), KernelError> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .run_layer(layer, calls)
    }
}

/// Output error of one encoding pair, accumulated over calls.
#[derive(Default, Clone, Copy)]
struct Error_ {
    max_abs: f32,
    max_row_rel: f32,
    sq_err: f64,
    sq_ref: f64,
}

/// Runs the exact experts (whose outputs the model gets) and, beside them, each pair's loopback.
struct Compare {
    exact: KernelExperts,
    through: Vec<Loopback<KernelExperts>>,
    errors: Vec<Error_>,
}

impl ExpertRunner for Compare {
    fn run_layer(&mut self, layer: usize, calls: &mut [ExpertCall<'_>]) -> Result<(), KernelError> {
        self.exact.run_layer(layer, calls)?;
        for (runner, err) in self.through.iter_mut().zip(&mut self.errors) {
            let mut outs: Vec<Vec<f32>> = calls.iter().map(|c| vec![0.0; c.out.len()]).collect();
            let mut copies: Vec<ExpertCall<'_>> = calls
                .iter()
                .zip(outs.iter_mut())
                .map(|(c, out)| ExpertCall {
                    expert: c.expert,
                    rows: c.rows,
                    x: c.x,
                    out,
                    missing: false,
                })
                .collect();
            runner.run_layer(layer, &mut copies)?;
            for (call, out) in calls.iter().zip(&outs) {
                let width = call.out.len() / call.rows.max(1);
                for (want, got) in call.out.chunks(width).zip(out.chunks(width)) {
                    let row_max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for (w, g) in want.iter().zip(got) {
                        let e = (w - g).abs();
                        err.max_abs = err.max_abs.max(e);
                        if row_max > 0.0 {
                            err.max_row_rel = err.max_row_rel.max(e / row_max);
                        }
                        err.sq_err += f64::from(e) * f64::from(e);
                        err.sq_ref += f64::from(*w) * f64::from(*w);
                    }
                }
            }
        }
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: dispatch_error CHECKPOINT_DIR [TOKENS]")?,
    );
    let tokens: usize = args.next().map_or(Ok(64), |t| t.parse())?;
    let text = args.next().map(std::fs::read).transpose()?;
    let mut whole = Trainer::load(&dir, Box::new(CpuBackend::new()))?;
    let model = whole.model_mut();
    let cfg = model.config().clone();
    println!(
        "checkpoint {}: d_model {}, {} layers, {} routed experts top-{}, precision {}",
        dir.display(),
        cfg.d_model,
        cfg.n_layers,
        cfg.n_routed_experts,
        cfg.top_k,
        cfg.precision
    );
    let config = GenerateConfig {
        max_tokens: tokens,
        sampling: Sampling::Greedy,
        seed: 0,
        speculative: false,
    };
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| p.bytes().map(u32::from).collect())
        .collect();
    let mut reference = Vec::new();
    for prompt in &prompts {
        reference.push(generate::generate(&mut CachedModel::new(model), prompt, &config)?.tokens);
    }

    // 1. Output error along the whole model's greedy paths.
    let mut split = trunk(model)?;
    let compare = Arc::new(Mutex::new(Compare {
        exact: kernels(model)?,
        through: variants()
            .into_iter()
            .map(|d| Ok(Loopback::new(kernels(model)?, d)))
            .collect::<Result<_, Box<dyn Error>>>()?,
        errors: vec![Error_::default(); variants().len()],
    }));
    for (prompt, want) in prompts.iter().zip(&reference) {
        let mut lm = CachedModel::with_experts(&mut split, Box::new(Shared(compare.clone())));
        let got = generate::generate(&mut lm, prompt, &config)?;
        if &got.tokens != want {
            return Err("the split model with exact experts differs from the whole model".into());
        }
    }
    let compare = compare.lock().unwrap_or_else(|p| p.into_inner());
    println!("\nexpert outputs along the exact greedy paths (8 prompts x {tokens} tokens):");
    println!(
        "{:>10} {:>12} {:>14} {:>10}",
        "dispatch", "max abs", "max/row max", "rel L2"
    );
    for (d, e) in variants().iter().zip(&compare.errors) {
        println!(
            "{:>10} {:>12.3e} {:>14.3e} {:>10.3e}",
            d.to_string(),
            e.max_abs,
            e.max_row_rel,
            (e.sq_err / e.sq_ref.max(f64::MIN_POSITIVE)).sqrt()
        );
    }

    // 2. Greedy generation through each pair.
    println!(
        "\ngreedy generation, {} prompts x {tokens} tokens, against the whole model:",
        prompts.len()
    );
    println!(
        "{:>10} {:>8} {:>10} {:>22} {:>10} {:>10} {:>12}",
        "dispatch",
        "equal",
        "agreement",
        "first diff (per prompt)",
        "req B/tok",
        "resp B/tok",
        "B/call"
    );
    let mut all = vec![Dispatch::F32];
    all.extend(variants());
    for d in all {
        let runner = Arc::new(Mutex::new(Loopback::new(kernels(model)?, d)));
        let (mut same, mut total, mut equal_prompts) = (0usize, 0usize, 0usize);
        let mut firsts = Vec::new();
        let mut generated = 0usize;
        for (prompt, want) in prompts.iter().zip(&reference) {
            let mut lm = CachedModel::with_experts(&mut split, Box::new(Shared(runner.clone())));
            let got = generate::generate(&mut lm, prompt, &config)?.tokens;
            generated += got.len();
            same += got.iter().zip(want).filter(|(a, b)| a == b).count();
            total += want.len().max(got.len());
            let first = got.iter().zip(want).position(|(a, b)| a != b);
            equal_prompts += usize::from(first.is_none() && got.len() == want.len());
            firsts.push(first.map_or("-".to_string(), |p| p.to_string()));
        }
        let b = runner.lock().unwrap_or_else(|p| p.into_inner()).bytes();
        println!(
            "{:>10} {:>5}/{:<2} {:>10.3} {:>22} {:>10.0} {:>10.0} {:>12.0}",
            d.to_string(),
            equal_prompts,
            prompts.len(),
            same as f64 / total.max(1) as f64,
            firsts.join(","),
            b.request as f64 / generated.max(1) as f64,
            b.response as f64 / generated.max(1) as f64,
            (b.request + b.response) as f64 / b.calls.max(1) as f64,
        );
    }
    if let Some(text) = text {
        teacher_forced(model, &mut split, &text)?;
    }
    Ok(())
}

/// Mean loss (nats per byte) and the logits of each position of `windows` under `lm`.
fn score(
    lm: &mut dyn generate::LanguageModel,
    windows: &[Vec<u32>],
) -> Result<(f64, Vec<f32>), Box<dyn Error>> {
    let v = lm.vocab_size();
    let (mut nll, mut n) = (0f64, 0usize);
    let mut all = Vec::new();
    for w in windows {
        let rows = w.len() - 1;
        let mut logits = vec![0f32; rows * v];
        lm.logits(&w[..rows], rows, &mut logits, None)?;
        for (row, &next) in logits.chunks(v).zip(&w[1..]) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let sum: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
            nll += sum.ln() - f64::from(row[next as usize] - max);
            n += 1;
        }
        all.extend(logits);
    }
    Ok((nll / n.max(1) as f64, all))
}

/// Section 3: teacher-forced loss and argmax changes on windows of `text`.
fn teacher_forced(model: &mut Model, split: &mut Model, text: &[u8]) -> Result<(), Box<dyn Error>> {
    let ctx = model.config().context;
    let count = 64;
    let step = text.len().saturating_sub(ctx) / count;
    let windows: Vec<Vec<u32>> = (0..count)
        .map(|i| {
            text[i * step..i * step + ctx]
                .iter()
                .map(|&b| u32::from(b))
                .collect()
        })
        .collect();
    let v = model.config().vocab_size;
    let (exact, want) = score(&mut CachedModel::new(model), &windows)?;
    let positions = want.len() / v;
    println!(
        "\nteacher-forced on {count} windows of {ctx} bytes ({positions} positions): whole model loss \
         {exact:.5}"
    );
    println!(
        "{:>10} {:>12} {:>12} {:>16} {:>14} {:>14}",
        "dispatch", "loss", "loss - exact", "argmax changed", "max |d logit|", "mean |d logit|"
    );
    let mut all = vec![Dispatch::F32];
    all.extend(variants());
    for d in all {
        let runner = Box::new(Loopback::new(kernels(model)?, d));
        let (loss, got) = score(&mut CachedModel::with_experts(split, runner), &windows)?;
        let changed = got
            .chunks(v)
            .zip(want.chunks(v))
            .filter(|(a, b)| generate::argmax(a) != generate::argmax(b))
            .count();
        let moved = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let mean = got
            .iter()
            .zip(&want)
            .map(|(a, b)| f64::from((a - b).abs()))
            .sum::<f64>()
            / want.len().max(1) as f64;
        println!(
            "{:>10} {:>12.5} {:>12.2e} {:>9}/{:<6} {:>14.2e} {:>14.2e}",
            d.to_string(),
            loss,
            loss - exact,
            changed,
            positions,
            moved,
            mean
        );
    }
    Ok(())
}
