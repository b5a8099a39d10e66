//! The expert seam of inference: a model holding the trunk (and maybe some experts) whose other routed
//! experts run through an [`ExpertRunner`] made of standalone [`ExpertKernel`]s generates exactly what the
//! whole model generates (greedy and speculative, past the context, at FP8 and f32), with one runner call
//! per MoE layer per pass; a runner that fails ends the pass with a typed error and leaves the cache usable.
//! An expert the runner gets no answer for is dropped under the `k_min` rule: with every expert answering
//! the logits do not depend on `k_min`; with one missing, the pass goes on when each token keeps `k_min` of
//! its top-k, and fails with a typed error (the cache as it was) when one does not.

use mana_kernels::gemm::Precision;
use mana_kernels::generate::{self, CachedModel, GenerateConfig, Generation, Sampling};
use mana_kernels::model::{
    ExpertCall, ExpertKernel, ExpertRunner, ExpertSet, KernelExperts, Model, ModelConfig,
    ModelError, OutsideExperts, ShardId,
};
use mana_kernels::{CpuBackend, KernelError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Two blocks (one dense, one MoE of 4 experts, top 2), context 24, MTP on.
fn config(precision: Precision) -> ModelConfig {
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
        mtp: true,
        init_std: 0.2,
        precision,
        ..ModelConfig::default()
    }
}

/// The whole model, with router biases that are not zero (so that selection uses them).
fn whole(precision: Precision) -> Model {
    let mut model =
        Model::new(config(precision), 7, Box::new(CpuBackend::default())).expect("valid config");
    model
        .set_router_bias(1, &[0.05, -0.02, 0.0, 0.03])
        .expect("layer 1 is MoE");
    model
}

/// An instance of `full`'s model holding the trunk and the experts in `held`, with its weights and biases.
fn part(full: &Model, held: &[ShardId]) -> Model {
    let cfg = full.config().clone();
    let experts = ExpertSet::from_shards(&cfg, held).expect("experts of the config");
    let mut model = Model::with_experts(cfg, experts, 99, Box::new(CpuBackend::default()))
        .expect("valid config");
    for shard in model.shards() {
        let values = full.export_shard(shard).expect("held by the whole model");
        model.import_shard(shard, &values).expect("same layout");
    }
    let bias = full.router_bias(1).expect("MoE layer").to_vec();
    model.set_router_bias(1, &bias).expect("MoE layer");
    model
}

/// Kernels for every expert of `full` not in `held`.
fn kernels(full: &Model, held: &[ShardId]) -> KernelExperts {
    let mut runner = KernelExperts::new();
    for shard in full.shards() {
        if shard == ShardId::Trunk || held.contains(&shard) {
            continue;
        }
        let params = full.export_shard(shard).expect("held by the whole model");
        let kernel = ExpertKernel::new(full.config(), &params, Box::new(CpuBackend::default()))
            .expect("an expert shard");
        runner.insert(shard, kernel).expect("an expert");
    }
    runner
}

/// Every call a runner got: (layer, experts asked for).
type CallLog = Arc<Mutex<Vec<(usize, Vec<usize>)>>>;

/// Records every call a runner gets.
struct Counting {
    inner: KernelExperts,
    calls: CallLog,
}

impl ExpertRunner for Counting {
    fn run_layer(&mut self, layer: usize, calls: &mut [ExpertCall<'_>]) -> Result<(), KernelError> {
        let experts = calls.iter().map(|c| c.expert).collect();
        self.calls
            .lock()
            .expect("no panic while held")
            .push((layer, experts));
        self.inner.run_layer(layer, calls)
    }
}

/// Never answers.
struct Failing;

impl ExpertRunner for Failing {
    fn run_layer(&mut self, layer: usize, calls: &mut [ExpertCall<'_>]) -> Result<(), KernelError> {
        Err(KernelError::ExpertUnavailable {
            layer,
            expert: calls[0].expert,
            reason: "no host answered".into(),
        })
    }
}

/// Answers every call but those for `gone` (of any layer), which it marks missing; counts them.
struct Dropping {
    inner: KernelExperts,
    gone: usize,
    dropped: Arc<AtomicUsize>,
}

impl ExpertRunner for Dropping {
    fn run_layer(&mut self, layer: usize, calls: &mut [ExpertCall<'_>]) -> Result<(), KernelError> {
        for call in calls.iter_mut() {
            if call.expert == self.gone {
                call.missing = true;
                self.dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                self.inner.run_layer(layer, std::slice::from_mut(call))?;
            }
        }
        Ok(())
    }
}

fn run(model: &mut CachedModel<'_>, speculative: bool, sampling: Sampling) -> Generation {
    let prompt: Vec<u32> = b"add 1+2=".iter().map(|&b| u32::from(b)).collect();
    let cfg = GenerateConfig {
        // Past the context of 24, so window re-bases (prefills of half a context) are covered.
        max_tokens: 40,
        sampling,
        seed: 42,
        speculative,
    };
    generate::generate(model, &prompt, &cfg).expect("generation succeeds")
}

fn expert(index: u16) -> ShardId {
    ShardId::expert(1u16, index).expect("in range")
}

#[test]
fn trunk_with_a_kernel_runner_generates_exactly_what_the_whole_model_does() {
    for precision in [Precision::Fp8, Precision::F32] {
        let mut full = whole(precision);
        let sampled = Sampling::Sample {
            temperature: 0.9,
            top_p: 0.95,
        };
        let ways = [
            (false, Sampling::Greedy),
            (true, Sampling::Greedy),
            (false, sampled),
        ];
        let reference: Vec<Vec<u32>> = ways
            .iter()
            .map(|&(spec, sampling)| run(&mut CachedModel::new(&mut full), spec, sampling).tokens)
            .collect();
        // The trunk alone, and the trunk with half of the experts: the rest come from the runner.
        for held in [vec![], vec![expert(0), expert(2)]] {
            let mut trunk = part(&full, &held);
            for (&(spec, sampling), want) in ways.iter().zip(&reference) {
                let runner = Box::new(kernels(&full, &held));
                let got = run(
                    &mut CachedModel::with_experts(&mut trunk, runner),
                    spec,
                    sampling,
                );
                assert_eq!(
                    &got.tokens, want,
                    "{precision:?}, held {held:?}, speculative {spec}, {sampling:?}"
                );
            }
        }
    }
}

#[test]
fn the_runner_gets_one_call_per_moe_layer_per_pass_with_each_expert_once() {
    let mut full = whole(Precision::Fp8);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let runner = Counting {
        inner: kernels(&full, &[]),
        calls: calls.clone(),
    };
    let mut trunk = part(&full, &[]);
    let got = run(
        &mut CachedModel::with_experts(&mut trunk, Box::new(runner)),
        false,
        Sampling::Greedy,
    );
    let want = run(&mut CachedModel::new(&mut full), false, Sampling::Greedy);
    assert_eq!(got.tokens, want.tokens);
    let calls = calls.lock().expect("no panic while held");
    // One MoE layer: one call per pass (the prefill sends the whole prompt at once).
    assert_eq!(calls.len(), got.forward_passes);
    for (layer, experts) in calls.iter() {
        assert_eq!(*layer, 1);
        assert!(!experts.is_empty() && experts.len() <= 4);
        assert!(experts.windows(2).all(|w| w[0] < w[1]), "{experts:?}");
    }
}

#[test]
fn a_failing_runner_ends_the_pass_with_a_typed_error_and_the_cache_stays_usable() {
    let full = whole(Precision::Fp8);
    let mut trunk = part(&full, &[]);
    let mut cache = trunk.new_cache();
    let v = trunk.config().vocab_size;
    let mut logits = vec![0.0; v];
    let err = trunk
        .decode_with(
            &mut cache,
            &[1, 2, 3],
            1,
            &mut logits,
            None,
            Some(&mut Failing),
        )
        .expect_err("no expert answers");
    assert!(
        matches!(
            err,
            ModelError::Kernel(KernelError::ExpertUnavailable { layer: 1, .. })
        ),
        "{err}"
    );
    assert_eq!(cache.len(), 0, "a failed step leaves the cache as it was");
    let mut runner = kernels(&full, &[]);
    trunk
        .decode_with(
            &mut cache,
            &[1, 2, 3],
            1,
            &mut logits,
            None,
            Some(&mut runner),
        )
        .expect("the same step with a working runner");
    assert_eq!(cache.len(), 3);
}

#[test]
fn an_expert_kernel_refuses_wrong_lengths() {
    let cfg = config(Precision::Fp8);
    let err = ExpertKernel::new(&cfg, &[0.0; 10], Box::new(CpuBackend::default()))
        .err()
        .expect("too short");
    assert!(matches!(err, ModelError::Length { .. }), "{err}");
    let full = whole(Precision::Fp8);
    let params = full.export_shard(expert(1)).expect("held");
    let mut kernel =
        ExpertKernel::new(&cfg, &params, Box::new(CpuBackend::default())).expect("expert shard");
    let c = kernel.width();
    let mut out = vec![0.0; 2 * c];
    assert!(kernel.forward(&vec![0.0; 3 * c], 2, &mut out).is_err());
    assert!(kernel.forward(&vec![0.0; 2 * c], 2, &mut out).is_ok());
}

#[test]
fn with_every_expert_answering_the_logits_do_not_depend_on_k_min() {
    let full = whole(Precision::Fp8);
    let mut trunk = part(&full, &[expert(1)]);
    let v = trunk.config().vocab_size;
    let tokens = [5, 9, 2, 7];
    let step = |trunk: &mut Model, k_min: Option<usize>| {
        let mut runner = kernels(&full, &[expert(1)]);
        let mut cache = trunk.new_cache();
        let mut logits = vec![0.0f32; 4 * v];
        match k_min {
            None => trunk.decode_with(&mut cache, &tokens, 4, &mut logits, None, Some(&mut runner)),
            Some(k_min) => {
                let outside = OutsideExperts {
                    runner: &mut runner,
                    k_min,
                };
                trunk.decode_remote(&mut cache, &tokens, 4, &mut logits, None, outside)
            }
        }
        .expect("every expert answers");
        logits.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    };
    let want = step(&mut trunk, None);
    for k_min in [0, 1, 2] {
        assert_eq!(step(&mut trunk, Some(k_min)), want, "k_min {k_min}");
    }
}

#[test]
fn a_missing_expert_is_dropped_while_every_token_keeps_k_min_and_fails_the_pass_otherwise() {
    let mut full = whole(Precision::Fp8);
    let want = run(&mut CachedModel::new(&mut full), false, Sampling::Greedy);
    let mut trunk = part(&full, &[]);
    let dropping = |dropped: &Arc<AtomicUsize>| Dropping {
        inner: kernels(&full, &[]),
        gone: 2,
        dropped: dropped.clone(),
    };
    // k_min = 1 of top 2: each token that chose expert 2 goes on with its other choice alone.
    let dropped = Arc::new(AtomicUsize::new(0));
    let got = run(
        &mut CachedModel::with_experts(&mut trunk, Box::new(dropping(&dropped))).with_k_min(1),
        false,
        Sampling::Greedy,
    );
    assert_eq!(got.tokens.len(), want.tokens.len());
    assert!(
        dropped.load(Ordering::Relaxed) > 0,
        "expert 2 was never chosen"
    );

    // k_min = 2: the prompt's tokens that chose expert 2 cannot go on; the pass fails, the cache unchanged.
    let v = trunk.config().vocab_size;
    let mut cache = trunk.new_cache();
    let mut logits = vec![0.0f32; v];
    let prompt: Vec<u32> = b"add 1+2=".iter().map(|&b| u32::from(b)).collect();
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut runner = dropping(&dropped);
    let outside = OutsideExperts {
        runner: &mut runner,
        k_min: 2,
    };
    let err = trunk
        .decode_remote(&mut cache, &prompt, 1, &mut logits, None, outside)
        .expect_err("a token keeps one expert of two");
    match &err {
        ModelError::Kernel(KernelError::TooFewExperts {
            layer: 1,
            kept: 1,
            top_k: 2,
            k_min: 2,
            missing,
            ..
        }) => assert_eq!(missing, &vec![2]),
        other => panic!("{other}"),
    }
    assert_eq!(dropped.load(Ordering::Relaxed), 1);
    assert_eq!(cache.len(), 0, "a failed step leaves the cache as it was");
    let mut runner = kernels(&full, &[]);
    trunk
        .decode_with(&mut cache, &prompt, 1, &mut logits, None, Some(&mut runner))
        .expect("the same step with every expert answering");
}
