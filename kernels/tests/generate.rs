//! Generation: greedy and sampled output are identical with and without MTP speculation (on the real
//! model, inside and past its context, and on a scripted model whose drafts are right or wrong on purpose),
//! the counters add up, and the samplers honour temperature and top-p.

use mana_kernels::CpuBackend;
use mana_kernels::generate::{
    self, GenerateConfig, GenerateError, Generation, LanguageModel, Sampling,
};
use mana_kernels::model::{Model, ModelConfig, ModelError};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;

/// A small model: random weights are enough to check that speculation never changes the output.
fn small_model(mtp: bool) -> Model {
    let config = ModelConfig {
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
    };
    Model::new(config, 7, Box::new(CpuBackend::default())).expect("valid small config")
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
    let prompt: Vec<u32> = b"add 1+2=".iter().map(|&b| u32::from(b)).collect();
    // 40 new tokens run well past the context of 24, so the sliding-window fallback is covered too.
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
        tokens: &[u32],
        main_out: &mut [f32],
        mtp_out: Option<&mut [f32]>,
    ) -> Result<(), ModelError> {
        self.passes += 1;
        main_out.fill(0.0);
        for (t, &tok) in tokens.iter().enumerate() {
            main_out[t * 8 + ((tok + 1) % 8) as usize] = 5.0;
        }
        if let Some(m) = mtp_out {
            m.fill(0.0);
            for (t, &tok) in tokens.iter().enumerate() {
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
