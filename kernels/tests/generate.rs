//! Generation: greedy and sampled output are identical with and without MTP speculation (on the real
//! model, inside and past its context, and on a scripted model whose drafts are right or wrong on purpose)
//! and with and without the KV cache (every pass's logits bit for bit, on random and briefly trained
//! models, past the context); the window rule; the counters add up, and the samplers honour temperature
//! and top-p. Streaming each token through a callback gives the same tokens, and breaking stops there.

use std::ops::ControlFlow;

use mana_kernels::CpuBackend;
use mana_kernels::data::Batch;
use mana_kernels::gemm::Precision;
use mana_kernels::generate::{
    self, CachedModel, GenerateConfig, GenerateError, Generation, LanguageModel, Sampling,
    UncachedModel, window_start,
};
use mana_kernels::model::{Model, ModelConfig, ModelError};
use mana_kernels::optim::OptimConfig;
use mana_kernels::train::Trainer;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;

/// A small model: random weights are enough to check that speculation never changes the output.
fn small_model(mtp: bool) -> Model {
    Model::new(small_config(mtp), 7, Box::new(CpuBackend::default())).expect("valid small config")
}

/// The shape of [`small_model`]: context 24, two blocks (one dense, one MoE), FP8.
fn small_config(mtp: bool) -> ModelConfig {
    ModelConfig {
        d_model: 32,
        n_layers: 2,
        n_heads: 2,
        n_dense_layers: 1,
        dense_hidden: 64,
        n_routed_experts: 4,
        top_k: 2,
        expert_hidden: 32,
        shared_hidden: 32,
        context: 24,
        mtp,
        init_std: 0.2,
        ..ModelConfig::default()
    }
}

fn run(
    model: &mut dyn LanguageModel,
    prompt: &[u32],
    max_tokens: usize,
    sampling: Sampling,
    speculative: bool,
) -> Generation {
    let cfg = GenerateConfig {
        max_tokens,
        sampling,
        seed: 42,
        speculative,
    };
    generate::generate(model, prompt, &cfg).expect("generation succeeds")
}

#[test]
fn greedy_output_is_identical_with_and_without_speculation_on_the_model() {
    let mut model = small_model(true);
    let mut model = CachedModel::new(&mut model);
    let prompt: Vec<u32> = b"add 1+2=".iter().map(|&b| u32::from(b)).collect();
    // 40 new tokens run well past the context of 24, so window re-bases are covered too.
    let plain = run(&mut model, &prompt, 40, Sampling::Greedy, false);
    let spec = run(&mut model, &prompt, 40, Sampling::Greedy, true);
    assert_eq!(plain.tokens.len(), 40);
    assert_eq!(plain.tokens, spec.tokens);
    assert_eq!(
        plain.forward_passes, 40,
        "plain decoding is one token per pass"
    );
    assert_eq!(plain.drafts, 0);
    assert!(spec.drafts > 0, "speculation verified no draft");
    assert_eq!(
        spec.forward_passes + spec.accepted,
        40,
        "each accepted draft saves one pass"
    );
}

#[test]
fn sampled_output_is_identical_with_and_without_speculation_on_the_model() {
    let mut model = small_model(true);
    let mut model = CachedModel::new(&mut model);
    let prompt = [b'k' as u32, b'v' as u32, b' ' as u32];
    for sampling in [
        Sampling::Sample {
            temperature: 0.7,
            top_p: 0.9,
        },
        Sampling::Sample {
            temperature: 1.0,
            top_p: 1.0,
        },
    ] {
        let plain = run(&mut model, &prompt, 30, sampling, false);
        let spec = run(&mut model, &prompt, 30, sampling, true);
        assert_eq!(plain.tokens, spec.tokens, "{sampling:?}");
    }
}

/// A scripted model over V = 8 tokens: the main head always predicts (last + 1) mod 8, and the MTP head's
/// draft for the token after that is right only when `mtp_right` says so for the last token.
struct Scripted {
    mtp_right: fn(u32) -> bool,
    passes: usize,
}

impl LanguageModel for Scripted {
    fn vocab_size(&self) -> usize {
        8
    }
    fn context(&self) -> usize {
        64
    }
    fn has_mtp(&self) -> bool {
        true
    }
    fn logits(
        &mut self,
        window: &[u32],
        rows: usize,
        main_out: &mut [f32],
        mtp_out: Option<&mut [f32]>,
    ) -> Result<(), ModelError> {
        self.passes += 1;
        let last = &window[window.len() - rows..];
        main_out.fill(0.0);
        for (t, &tok) in last.iter().enumerate() {
            main_out[t * 8 + ((tok + 1) % 8) as usize] = 5.0;
        }
        if let Some(m) = mtp_out {
            m.fill(0.0);
            for (t, &tok) in last.iter().enumerate() {
                let right = (tok + 2) % 8;
                let guess = if (self.mtp_right)(tok) {
                    right
                } else {
                    (right + 3) % 8
                };
                m[t * 8 + guess as usize] = 5.0;
            }
        }
        Ok(())
    }
}

#[test]
fn perfect_drafts_give_two_tokens_per_pass() {
    let mut lm = Scripted {
        mtp_right: |_| true,
        passes: 0,
    };
    let plain = run(&mut lm, &[0], 21, Sampling::Greedy, false);
    let want: Vec<u32> = (1..=21).map(|i| i % 8).collect();
    assert_eq!(plain.tokens, want);
    let spec = run(&mut lm, &[0], 21, Sampling::Greedy, true);
    assert_eq!(spec.tokens, want);
    assert_eq!(spec.acceptance_rate(), 1.0);
    // The first pass yields one token and a draft; every later pass yields two.
    assert_eq!(spec.forward_passes, 11);
    assert!((spec.tokens_per_pass() - 21.0 / 11.0).abs() < 1e-12);
    assert_eq!(lm.passes, 21 + 11);
}

#[test]
fn wrong_drafts_never_change_the_output() {
    let mut lm = Scripted {
        mtp_right: |_| false,
        passes: 0,
    };
    let spec = run(&mut lm, &[3], 15, Sampling::Greedy, true);
    let want: Vec<u32> = (4..19).map(|i| i % 8).collect();
    assert_eq!(spec.tokens, want);
    assert_eq!(spec.accepted, 0);
    assert!(spec.drafts > 0);
    assert_eq!(spec.acceptance_rate(), 0.0);
    assert_eq!(spec.forward_passes, 15);
    // Drafts right after multiples of 3 only: a mix, still exact.
    let mut lm = Scripted {
        mtp_right: |t| t % 3 == 0,
        passes: 0,
    };
    let spec = run(&mut lm, &[3], 15, Sampling::Greedy, true);
    assert_eq!(spec.tokens, want);
    assert!(spec.accepted > 0 && spec.accepted < spec.drafts);
    assert_eq!(spec.forward_passes + spec.accepted, 15);
}

#[test]
fn bad_requests_are_refused() {
    let mut model = small_model(false);
    let mut model = CachedModel::new(&mut model);
    let cfg = GenerateConfig {
        max_tokens: 4,
        sampling: Sampling::Greedy,
        seed: 0,
        speculative: false,
    };
    assert_eq!(
        generate::generate(&mut model, &[], &cfg),
        Err(GenerateError::EmptyPrompt)
    );
    let spec = GenerateConfig {
        speculative: true,
        ..cfg
    };
    assert_eq!(
        generate::generate(&mut model, &[1], &spec),
        Err(GenerateError::NoMtp)
    );
    for (temperature, top_p) in [(0.0, 0.9), (f32::NAN, 0.9), (1.0, 0.0), (1.0, 1.5)] {
        let bad = GenerateConfig {
            sampling: Sampling::Sample { temperature, top_p },
            ..cfg
        };
        assert!(matches!(
            generate::generate(&mut model, &[1], &bad),
            Err(GenerateError::InvalidSampling(_))
        ));
    }
    assert!(matches!(
        generate::generate(&mut model, &[999], &cfg),
        Err(GenerateError::Model(_))
    ));
    assert_eq!(
        generate::generate(
            &mut model,
            &[1],
            &GenerateConfig {
                max_tokens: 0,
                ..cfg
            }
        )
        .map(|g| g.tokens),
        Ok(vec![])
    );
}

#[test]
fn sampler_follows_temperature_and_top_p() {
    let logits = [2.0f32, 1.0, 0.0, -1.0];
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut scratch = Vec::new();
    let mut draw = |temperature, top_p, rng: &mut ChaCha8Rng| {
        let mut counts = [0usize; 4];
        for _ in 0..20_000 {
            counts[generate::choose(
                &logits,
                Sampling::Sample { temperature, top_p },
                rng,
                &mut scratch,
            ) as usize] += 1;
        }
        counts.map(|c| c as f64 / 20_000.0)
    };
    // Temperature 1, no cut: softmax probabilities.
    let z: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
    let freq = draw(1.0, 1.0, &mut rng);
    for (f, &x) in freq.iter().zip(&logits) {
        assert!((f - f64::from(x).exp() / z).abs() < 0.015, "{freq:?}");
    }
    // top_p = 0.5 keeps only the top token (its mass is 0.64).
    assert_eq!(draw(1.0, 0.5, &mut rng), [1.0, 0.0, 0.0, 0.0]);
    // top_p = 0.8 keeps the top two, renormalised: 0.731 / 0.269.
    let freq = draw(1.0, 0.8, &mut rng);
    assert!(
        (freq[0] - 0.731).abs() < 0.015 && freq[2] == 0.0 && freq[3] == 0.0,
        "{freq:?}"
    );
    // A low temperature is nearly greedy.
    assert!(draw(0.05, 1.0, &mut rng)[0] > 0.999);
    assert_eq!(generate::argmax(&[0.0, 3.0, 3.0, f32::NAN]), 1);
}

#[test]
fn the_window_rebases_to_its_newest_half_once_per_half_context() {
    // Context 8: the window is the whole sequence up to 8 tokens; at 9 it keeps the newest 4 and grows
    // to 8 again, re-basing at 9, 14, 19, ... (every ctx/2 + 1 tokens).
    let starts: Vec<usize> = (0..=20).map(|len| window_start(len, 8)).collect();
    assert_eq!(
        starts,
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 5, 5, 5, 5, 10, 10, 10, 10, 10, 15, 15
        ]
    );
    for ctx in [1usize, 2, 3, 7, 24, 128] {
        let keep = ctx - ctx / 2;
        let mut prev = 0;
        for len in 0..6 * ctx + 10 {
            let start = window_start(len, ctx);
            let size = len - start;
            assert!(size <= ctx, "ctx {ctx} len {len}: window of {size}");
            assert!(
                size >= keep.min(len),
                "ctx {ctx} len {len}: window of {size}"
            );
            // The start moves only when the window would overflow, and then to the newest `keep`.
            if start != prev {
                assert_eq!(len - prev, ctx + 1, "ctx {ctx} len {len}");
                assert_eq!(size, keep, "ctx {ctx} len {len}");
            }
            prev = start;
        }
    }
    // A context of 0 is treated as 1 rather than dividing by zero.
    assert_eq!(window_start(5, 0), 4);
}

/// Runs every pass both through the KV cache and by recomputing the window (on two copies of one model),
/// checks that the logits are the same bits, and hands the cached ones to the generator.
struct Twin<'a> {
    cached: CachedModel<'a>,
    uncached: UncachedModel<'a>,
    /// Passes checked.
    passes: usize,
}

impl LanguageModel for Twin<'_> {
    fn vocab_size(&self) -> usize {
        self.cached.vocab_size()
    }
    fn context(&self) -> usize {
        self.cached.context()
    }
    fn has_mtp(&self) -> bool {
        self.cached.has_mtp()
    }
    fn logits(
        &mut self,
        window: &[u32],
        rows: usize,
        main_out: &mut [f32],
        mtp_out: Option<&mut [f32]>,
    ) -> Result<(), ModelError> {
        let mut main_ref = vec![0.0; main_out.len()];
        let mut mtp_ref = mtp_out.as_ref().map(|m| vec![0.0; m.len()]);
        self.uncached
            .logits(window, rows, &mut main_ref, mtp_ref.as_deref_mut())?;
        let want_mtp = mtp_out.is_some();
        let mut mtp_got = mtp_out;
        self.cached
            .logits(window, rows, main_out, mtp_got.as_deref_mut())?;
        self.passes += 1;
        assert_eq!(
            main_out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            main_ref.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "main logits differ at pass {} (window of {}, {rows} rows)",
            self.passes,
            window.len()
        );
        if want_mtp {
            let got = mtp_got.expect("asked for");
            let want = mtp_ref.expect("asked for");
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "mtp logits differ at pass {}",
                self.passes
            );
        }
        Ok(())
    }
}

/// A copy of `model` (parameters and router biases) to run beside it.
fn copy_of(model: &Model) -> Model {
    let config = model.config().clone();
    let mut copy =
        Model::new(config.clone(), 0, Box::new(CpuBackend::default())).expect("valid config");
    copy.params_mut().copy_from_slice(model.params());
    for l in (0..config.n_layers).filter(|&l| config.is_moe_layer(l)) {
        let bias = model.router_bias(l).expect("a MoE layer").to_vec();
        copy.set_router_bias(l, &bias).expect("same shape");
    }
    copy
}

/// Generates with the twin, with and without speculation, and checks the outputs and counters against
/// plain cached decoding. Returns the plain generation and the speculative one.
fn check_cache_is_exact(
    model: &mut Model,
    prompt: &[u32],
    max_tokens: usize,
    sampling: Sampling,
) -> (Generation, Generation) {
    let mut copy = copy_of(model);
    let mut twin = Twin {
        cached: CachedModel::new(model),
        uncached: UncachedModel::new(&mut copy),
        passes: 0,
    };
    let plain = run(&mut twin, prompt, max_tokens, sampling, false);
    let spec = run(&mut twin, prompt, max_tokens, sampling, true);
    assert_eq!(plain.tokens.len(), max_tokens);
    assert_eq!(plain.tokens, spec.tokens, "speculation changed the output");
    assert_eq!(twin.passes, plain.forward_passes + spec.forward_passes);
    // The same run once more without the twin's uncached half: same counters.
    let mut again = CachedModel::new(model);
    assert_eq!(run(&mut again, prompt, max_tokens, sampling, true), spec);
    (plain, spec)
}

#[test]
fn cached_and_recomputed_windows_give_identical_logits_past_the_context() {
    for precision in [Precision::Fp8, Precision::F32] {
        let config = ModelConfig {
            precision,
            ..small_config(true)
        };
        let mut model = Model::new(config, 7, Box::new(CpuBackend::default())).expect("valid");
        // A short prompt, and one longer than the context of 24 (its window starts past token 0).
        let short: Vec<u32> = b"add 1+2=".iter().map(|&b| u32::from(b)).collect();
        let long: Vec<u32> = (0..37u32).map(|i| (i * 29 + 3) % 256).collect();
        for prompt in [&short, &long] {
            // 60 tokens re-base the window several times (every 13 tokens past 24).
            let (plain, spec) = check_cache_is_exact(&mut model, prompt, 60, Sampling::Greedy);
            assert_eq!(plain.forward_passes, 60);
            assert!(
                spec.drafts > 0,
                "{precision}: speculation verified no draft"
            );
            let sampled = Sampling::Sample {
                temperature: 0.8,
                top_p: 0.95,
            };
            check_cache_is_exact(&mut model, prompt, 45, sampled);
        }
    }
}

#[test]
fn cached_and_recomputed_windows_agree_on_a_briefly_trained_model() {
    // 30 steps on a repeated sentence: enough for confident predictions and drafts the main head accepts.
    let config = ModelConfig {
        context: 32,
        ..small_config(true)
    };
    let optim = OptimConfig {
        lr: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 5,
        total_steps: 30,
        ..OptimConfig::default()
    };
    let mut trainer =
        Trainer::new(config, optim, 3, Box::new(CpuBackend::default())).expect("valid config");
    let text: Vec<u32> = b"the cat sat on the mat. "
        .iter()
        .cycle()
        .take(4 * 33)
        .map(|&b| u32::from(b))
        .collect();
    let batch = Batch::new(text, 4, 32).expect("4 rows of 33");
    let first = trainer.step(&batch).expect("trains").loss;
    let mut last = first;
    for _ in 1..30 {
        last = trainer.step(&batch).expect("trains").loss;
    }
    assert!(
        last < 0.5 * first,
        "loss {first} -> {last}: the model did not learn"
    );
    let prompt: Vec<u32> = b"the cat".iter().map(|&b| u32::from(b)).collect();
    let (_, spec) = check_cache_is_exact(trainer.model_mut(), &prompt, 80, Sampling::Greedy);
    assert!(
        spec.acceptance_rate() > 0.5,
        "a trained model's drafts should mostly be accepted ({})",
        spec.acceptance_rate()
    );
}

#[test]
fn the_cache_is_used_and_reused() {
    let mut model = small_model(true);
    let mut cached = CachedModel::new(&mut model);
    let prompt: Vec<u32> = b"abc".iter().map(|&b| u32::from(b)).collect();
    let first = run(&mut cached, &prompt, 10, Sampling::Greedy, true);
    // Prompt + 10 tokens, all inside the context: every position is cached (the last one is fed next).
    assert_eq!(cached.cache().len(), prompt.len() + 9);
    // The same prompt again: the whole window is already cached, yet its last position must run again.
    let second = run(&mut cached, &prompt, 10, Sampling::Greedy, true);
    assert_eq!(first, second);
    assert!(
        cached.cache().bytes() >= 2 * 2 * 24 * 32 * 4,
        "two blocks' keys and values"
    );
    // A pass asking for more rows than the window holds is refused, not a panic.
    let mut out = vec![0.0; 2 * 256];
    assert!(cached.logits(&[1], 2, &mut out, None).is_err());
    assert!(cached.logits(&[1], 0, &mut [], None).is_err());
    let too_long = vec![1u32; 25];
    assert!(cached.logits(&too_long, 1, &mut out[..256], None).is_err());
}

#[test]
fn each_token_is_handed_over_as_committed_and_a_break_stops_there() {
    let mut model = small_model(true);
    let mut model = CachedModel::new(&mut model);
    let prompt: Vec<u32> = b"kv k1=".iter().map(|&b| u32::from(b)).collect();
    let sampled = Sampling::Sample {
        temperature: 0.9,
        top_p: 0.9,
    };
    for (sampling, speculative) in [
        (Sampling::Greedy, false),
        (Sampling::Greedy, true),
        (sampled, false),
        (sampled, true),
    ] {
        let cfg = GenerateConfig {
            max_tokens: 40,
            sampling,
            seed: 42,
            speculative,
        };
        let whole = generate::generate(&mut model, &prompt, &cfg).expect("generation succeeds");
        let mut seen = Vec::new();
        let streamed = generate::generate_each(&mut model, &prompt, &cfg, &mut |t| {
            seen.push(t);
            ControlFlow::Continue(())
        })
        .expect("generation succeeds");
        assert_eq!(streamed, whole, "{sampling:?}, speculative {speculative}");
        assert_eq!(seen, whole.tokens);
        for stop_after in [1, 2, 7, 40] {
            let mut seen = Vec::new();
            let stopped = generate::generate_each(&mut model, &prompt, &cfg, &mut |t| {
                seen.push(t);
                if seen.len() == stop_after {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .expect("generation succeeds");
            assert_eq!(stopped.tokens, whole.tokens[..stop_after]);
            assert_eq!(seen, stopped.tokens);
        }
    }
}
