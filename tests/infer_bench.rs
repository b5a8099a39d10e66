//! Figures for inference across the network (issue #10 §7), printed, never asserted on (ignored by default;
//! run with `cargo test --release --test infer_bench -- --ignored --nocapture`).
//!
//! A bootstrap, a coordinator and 3 trainers on loopback train the tiny model for `MANA_BENCH_ROUNDS`
//! diloco rounds (default 10, H = 50, so that the MTP head has learned enough for its acceptance rate to
//! mean something); every trainer serves expert calls. A client then generates the same prompts, greedy,
//! with the whole committed checkpoint in this process (local) and through the network, each plain and with
//! `--speculative`, and again through the network with [`ADDED_LATENCY`] more per expert call, and prints per
//! setting: tokens/s and its ratio to local in the same run, expert calls per token, request bytes per token,
//! p50/p99 call time and the MTP acceptance rate. `MANA_BENCH_DISPATCH` sets the calls' encodings (default
//! `fp8/f32`, as `mana infer --dispatch`). Each network setting runs twice: every expert on the
//! network, and with [`CACHED`] hot experts computed by the client (`--cache-experts`; the cache filled
//! after the warm-up generation, before the timed ones). No answer is checked against a second replica (check share
//! 0), so the figures are those of plain calls.
//!
//! The added latency is a sleep before each MoE layer's expert calls, which all go out at once: each call of
//! the layer waits that much longer, as over a link with that much more latency per call. (This machine has
//! no `sch_netem` for a delay in the kernel's loopback; the call times printed are measured inside the sleep,
//! so they exclude it.)

mod net_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mana_engine::round::build_trainer;
use mana_kernels::KernelError;
use mana_kernels::generate::{self, CachedModel, GenerateConfig, Generation, Sampling};
use mana_kernels::model::{ExpertCall, ExpertRunner};
use mana_node::infer::{
    self, CachedExperts, CallStats, Dispatch, HostLimits, InferClient, InferConfig,
};
use mana_protocol::{ShardId, UpdateRule};
use net_support::*;

/// Prompts generated after, each to [`TOKENS`] tokens (within the tiny model's 64-token context).
const PROMPTS: [&str; 4] = [
    "In the beginning",
    "And God said, ",
    "The LORD is my ",
    "And it came to ",
];
/// Tokens generated per prompt.
const TOKENS: usize = 44;

/// Experts the client computes itself in the hot-expert settings (of the tiny model's 8 routed experts).
const CACHED: usize = 3;

/// The latency added to every expert call in the slow-link settings.
const ADDED_LATENCY: Duration = Duration::from_millis(20);

/// The session's runner with `delay` more before each layer's calls (see the module doc).
struct Delayed {
    inner: CachedExperts,
    delay: Duration,
}

impl ExpertRunner for Delayed {
    fn run_layer(&mut self, layer: usize, calls: &mut [ExpertCall<'_>]) -> Result<(), KernelError> {
        // Only a layer with some call for the network waits: the experts the cache holds are computed here.
        let held = self.inner.stats().held;
        let remote = calls.iter().any(|call| {
            ShardId::expert(layer, call.expert).map_or(true, |shard| !held.contains(&shard))
        });
        if remote && !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        self.inner.run_layer(layer, calls)
    }
}

/// The calls counted in `after` and not yet in `before` (the counts of the timed generations alone).
fn since(before: &CallStats, after: &CallStats) -> CallStats {
    let mut latency = after.latency.clone();
    latency.subtract(&before.latency);
    CallStats {
        answered: after.answered - before.answered,
        request_bytes: after.request_bytes - before.request_bytes,
        response_bytes: after.response_bytes - before.response_bytes,
        checked: after.checked - before.checked,
        disagreements: after.disagreements - before.disagreements,
        failures: after
            .failures
            .iter()
            .map(|(peer, n)| (*peer, n - before.failures.get(peer).copied().unwrap_or(0)))
            .collect(),
        latency,
        dropped: after.dropped - before.dropped,
        stalled: after.stalled - before.stalled,
    }
}

/// One setting's totals over every prompt.
#[derive(Default)]
struct Totals {
    tokens: usize,
    seconds: f64,
    drafts: usize,
    accepted: usize,
}

impl Totals {
    fn add(&mut self, g: &Generation, seconds: f64) {
        self.tokens += g.tokens.len();
        self.seconds += seconds;
        self.drafts += g.drafts;
        self.accepted += g.accepted;
    }

    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }

    fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafts.max(1) as f64
    }
}

fn config(speculative: bool) -> GenerateConfig {
    GenerateConfig {
        max_tokens: TOKENS,
        sampling: Sampling::Greedy,
        seed: 0,
        speculative,
    }
}

fn bytes(prompt: &str) -> Vec<u32> {
    prompt.bytes().map(u32::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_network_inference_against_local_generation() {
    let rounds: u64 = std::env::var("MANA_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dispatch: Dispatch = std::env::var("MANA_BENCH_DISPATCH")
        .ok()
        .map(|v| {
            v.parse()
                .expect("MANA_BENCH_DISPATCH: f32, fp8, or <input>/<answer>")
        })
        .unwrap_or_default();
    let net = RoundNet::start(3).await;
    for (node, _) in &net.trainers {
        infer::serve_experts(node, net.spec.clone(), HostLimits::default())
            .expect("serves expert calls");
    }
    let client_node = Arc::new(start_node(net.follower_config("client")).await);
    let infer_config = InferConfig {
        spec: net.spec.clone(),
        call_timeout: Duration::from_secs(10),
        wait: Duration::from_secs(60),
        check_share: 0.0,
        k_min: net.spec.model.top_k,
        cache_experts: 0,
        dispatch,
    };
    let client = InferClient::new(client_node.clone(), infer_config.clone());
    let cached_client = InferClient::new(
        client_node.clone(),
        InferConfig {
            cache_experts: CACHED,
            ..infer_config
        },
    );

    let started = Instant::now();
    let hyper = net.spec.hyper(UpdateRule::Diloco);
    let diloco = |machine: &mut mana_engine::coordinator::CoordinatorConfig| {
        machine.hyper = hyper;
        machine.inner_steps = 50;
    };
    net.rounds_with(rounds, 3, diloco, Duration::from_secs(1800))
        .await;
    eprintln!(
        "trained {rounds} diloco rounds (H = 50, 3 trainers) in {:.0} s; dispatch {dispatch}",
        started.elapsed().as_secs_f64()
    );

    // The local reference: every shard of the committed checkpoint, fetched by hash, in one model.
    let manifest = client.load().await.expect("a session").manifest;
    let records = checkpoint_records(&client_node, &manifest, &net.spec).await;
    let spec = net.spec.clone();
    let local: Vec<(Totals, Vec<Vec<u32>>)> = tokio::task::spawn_blocking(move || {
        let mut trainer =
            build_trainer(&spec, &spec.hyper(UpdateRule::Sync), &records).expect("whole model");
        [false, true]
            .iter()
            .map(|&speculative| {
                // A first generation, not timed, so that the timed ones do not pay for first-use costs
                // (thread pool, allocations).
                let mut lm = CachedModel::new(trainer.model_mut());
                generate::generate(&mut lm, &bytes(PROMPTS[0]), &config(speculative))
                    .expect("local warm-up");
                let mut totals = Totals::default();
                let mut outputs = Vec::new();
                for prompt in PROMPTS {
                    let mut lm = CachedModel::new(trainer.model_mut());
                    let t = Instant::now();
                    let g = generate::generate(&mut lm, &bytes(prompt), &config(speculative))
                        .expect("local generation");
                    totals.add(&g, t.elapsed().as_secs_f64());
                    outputs.push(g.tokens);
                }
                (totals, outputs)
            })
            .collect()
    })
    .await
    .expect("local task");

    let settings = [Duration::ZERO, ADDED_LATENCY]
        .into_iter()
        .flat_map(|delay| {
            [(false, 0), (true, 0), (false, CACHED), (true, CACHED)]
                .map(|(speculative, cached)| (delay, speculative, cached))
        });
    for (delay, speculative, cached) in settings {
        let (local, local_outputs) = &local[usize::from(speculative)];
        let client = if cached == 0 { &client } else { &cached_client };
        let session = client.load().await.expect("a session");
        // A first generation, not timed (first-use costs; the cache's first routing counts), then the cache
        // filled with the most-routed experts before the timed ones.
        let session = tokio::task::spawn_blocking(move || {
            let mut session = session;
            let warm_up = Box::new(Delayed {
                inner: session.experts(),
                delay,
            });
            session
                .generate_with(&bytes(PROMPTS[0]), &config(speculative), warm_up)
                .expect("network warm-up");
            session
        })
        .await
        .expect("warm-up task");
        session.settle_cache().await;
        let (totals, outputs, stats, cache, session) = tokio::task::spawn_blocking(move || {
            let mut session = session;
            let before = (session.call_stats(), session.cache_stats().local_calls);
            let mut totals = Totals::default();
            let mut outputs = Vec::new();
            for prompt in PROMPTS {
                let t = Instant::now();
                let runner = Box::new(Delayed {
                    inner: session.experts(),
                    delay,
                });
                let g = session
                    .generate_with(&bytes(prompt), &config(speculative), runner)
                    .expect("network generation");
                totals.add(&g, t.elapsed().as_secs_f64());
                outputs.push(g.tokens);
            }
            let stats = since(&before.0, &session.call_stats());
            let cache = session.cache_stats();
            let local_calls = cache.local_calls - before.1;
            (totals, outputs, stats, (local_calls, cache), session)
        })
        .await
        .expect("network task");
        drop(session);
        let ms = |q: f64| {
            stats
                .latency
                .quantile(q)
                .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
        };
        let name = if speculative { "speculative" } else { "plain" };
        let (local_calls, cache) = cache;
        eprintln!(
            "{name}, {} ms added per call, {cached} experts cached (held {}, {} fetched): local {:.1} tokens/s; \
             network {:.1} tokens/s ({:.3}x local); {:.2} expert calls on the network and {:.2} here per \
             token, {:.0} request and {:.0} answer bytes per token; call time p50 {:.2} ms, p99 {:.2} ms; {} failed attempts; \
             MTP acceptance {:.1}% (local {:.1}%); same tokens as local: {}",
            delay.as_millis(),
            cache.held.len(),
            cache.fetched,
            local.tokens_per_s(),
            totals.tokens_per_s(),
            totals.tokens_per_s() / local.tokens_per_s(),
            stats.answered as f64 / totals.tokens as f64,
            local_calls as f64 / totals.tokens as f64,
            stats.request_bytes as f64 / totals.tokens as f64,
            stats.response_bytes as f64 / totals.tokens as f64,
            ms(0.5),
            ms(0.99),
            stats.failed_attempts(),
            100.0 * totals.acceptance(),
            100.0 * local.acceptance(),
            outputs == *local_outputs,
        );
    }
    drop(cached_client);
    client_node.stop().await.expect("client stop");
    net.stop().await;
}
