//! Inference across a real loopback network: a bootstrap, a coordinator and 3 trainers (replication 2, so
//! each expert lives on 2 of the 3) train one round of the tiny model; every trainer serves expert calls from
//! its store; a client that joined before the round hears the signed commit, fetches the trunk, and generates
//! with every routed expert computed by its hosts. Under greedy decoding, with f32 dispatch and with the
//! default FP8 hidden states and f32 answers, its output equals generation with the whole committed
//! checkpoint in one process, bit for bit; with bf16 answers (`--dispatch fp8`) the positions whose greedy
//! choice changes are counted and bounded, and the output follows the whole checkpoint's up to the first of
//! them. Hosts refuse calls for a checkpoint they do not hold and
//! requests over their row limit with `Unavailable`; a host at its call cap answers "busy" and the client's
//! runner asks the next replica. A host that answers garbage (another shape than the input's) is banned at
//! its first answer. A host that answers with another expert's output is caught by the check against a
//! second replica, the client computes the expert from its committed shard, and the liar is banned. A replica
//! killed mid-generation leaves the output unchanged: the client goes on with the other one.
//!
//! All replicas gone: when the only host the client asks for an expert stops, generation with k_min below
//! the top-k goes on without that expert (each token that chose it renormalized over its other choice),
//! exactly as a local run that drops the same expert, and counts each call it dropped, also with hot
//! experts computed by the client in front; with k_min = top-k the steps that need it stall, are tried
//! again, and generation fails after the wait.
//!
//! Two more networks: a host overloaded by a flood of calls answers "busy", the client goes to the other
//! replica and its output is unchanged; and two serve-only nodes (`mana node --serve-only --experts ...`,
//! each a mirror of half the experts of every committed checkpoint that serves expert calls and trains
//! nothing) answer every expert call of a client while the trainers serve none.
//!
//! Hot experts: a client with `cache_experts` computes the most-routed experts itself, asks the network less
//! the second time, and still generates exactly what the whole checkpoint generates.

mod net_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use mana_engine::round::build_trainer;
use mana_kernels::generate::{
    self, CachedModel, GenerateConfig, Generation, LanguageModel, Sampling,
};
use mana_kernels::model::{ExpertCall, ExpertKernel, ExpertRunner, KernelExperts, ModelError};
use mana_kernels::{CpuBackend, KernelError};
use mana_node::daemon::NodeHandle;
use mana_node::infer::{
    self, AnswerCheck, CachedExperts, Dispatch, ExpertSource, HostLimits, Hosts, InferClient,
    InferConfig, NetworkExperts, Patient, Session, wire,
};
use mana_protocol::{
    CheckpointManifest, ContentHash, ExpertRequest, ExpertResponse, Message, ShardId, Tensor,
    TensorDtype, UpdateRule,
};
use net_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_generates_over_the_network_exactly_what_the_whole_checkpoint_generates() {
    let mut net = RoundNet::start(3).await;
    let limits = HostLimits {
        max_rows: 64,
        ..HostLimits::default()
    };
    for (node, _) in &net.trainers {
        infer::serve_experts(node, net.spec.clone(), limits).expect("serves expert calls");
    }
    let client_node = Arc::new(start_node(net.follower_config("client")).await);
    // Three clients on one node, one per dispatch: f32 both ways, the default FP8 hidden states with f32
    // answers (exact too: the tiny model is FP8, and the hosts' GEMMs re-quantize the FP8 input to the same
    // values), and FP8 hidden states with bf16 answers.
    let clients: Vec<InferClient> = [Dispatch::F32, Dispatch::FP8_EXACT, Dispatch::FP8]
        .into_iter()
        .map(|dispatch| {
            InferClient::new(
                client_node.clone(),
                InferConfig {
                    dispatch,
                    ..infer_config(&net, 1.0)
                },
            )
        })
        .collect();
    net.honest_rounds(1, 3).await;
    let mut sessions = Vec::new();
    for client in &clients {
        sessions.push(
            client
                .load()
                .await
                .expect("a session on the committed round"),
        );
    }
    assert_eq!(sessions[0].round, 1);
    let checkpoint = sessions[0].checkpoint;

    let prompt = prompt();
    let config = greedy(24);
    let mut ran: Vec<(Generation, infer::CallStats, Session)> = Vec::new();
    for mut session in sessions {
        let prompt = prompt.clone();
        let done = tokio::task::spawn_blocking(move || {
            let g = session
                .generate(&prompt, &config)
                .expect("network generation");
            (g, session.call_stats(), session)
        });
        ran.push(done.await.expect("generation task"));
    }
    let (remote, stats) = (ran[0].0.clone(), ran[0].1.clone());
    assert_eq!(remote.tokens.len(), 24);
    assert!(stats.answered > 0, "no expert was called");
    for (_, stats, session) in &ran {
        // Every answer was also asked of a second replica: honest hosts agree bit for bit, whatever the
        // dispatch.
        assert!(stats.checked > 0, "no answer was checked");
        assert_eq!(stats.disagreements, 0, "honest replicas disagreed");
        assert!(session.banned_hosts().is_empty());
    }

    // The reference: every shard of the same checkpoint, fetched by hash, in one local model.
    let manifest = ran[0].2.manifest.clone();
    assert_eq!(manifest.hash().expect("hashable"), checkpoint);
    let records = checkpoint_records(&client_node, &manifest, &net.spec).await;
    let spec = net.spec.clone();
    let (local, window, local_logits) = {
        let prompt = prompt.clone();
        tokio::task::spawn_blocking(move || {
            let mut trainer =
                build_trainer(&spec, &spec.hyper(UpdateRule::Sync), &records).expect("whole model");
            let mut lm = CachedModel::new(trainer.model_mut());
            let local = generate::generate(&mut lm, &prompt, &config).expect("local generation");
            let window = [prompt, local.tokens.clone()].concat();
            let logits = window_logits(&mut CachedModel::new(trainer.model_mut()), &window);
            (local, window, logits)
        })
        .await
        .expect("local task")
    };
    assert_eq!(
        remote.tokens, local.tokens,
        "network and local greedy outputs differ"
    );
    assert_eq!(
        ran[1].0.tokens, local.tokens,
        "FP8 hidden states with f32 answers changed the output of an FP8 model"
    );
    // The same calls (the same path): FP8 hidden states take 64 + 4 bytes a row instead of 256.
    assert_eq!(ran[1].1.answered, stats.answered);
    assert_eq!(ran[1].1.request_bytes * 256, stats.request_bytes * 68);
    let exact_fp8_stats = ran[1].1.clone();
    assert_eq!(ran[1].1.response_bytes, stats.response_bytes);
    assert_eq!(stats.request_bytes, stats.response_bytes);

    // bf16 answers may change a greedy choice where two tokens nearly tie: score the
    // local output teacher-forced through them, and compare each position's argmax and logits with the whole
    // model's.
    let (fp8, fp8_stats, mut session) = ran.pop().expect("three sessions");
    let fp8_logits = {
        let window = window.clone();
        tokio::task::spawn_blocking(move || window_logits(&mut session.language_model(), &window))
            .await
            .expect("scoring task")
    };
    assert_eq!(fp8_stats.response_bytes * 68, fp8_stats.request_bytes * 128);
    let v = net.spec.model.vocab_size;
    let changed: Vec<usize> = (0..window.len() - 1)
        .filter(|&i| {
            let row = i * v..(i + 1) * v;
            generate::argmax(&fp8_logits[row.clone()]) != generate::argmax(&local_logits[row])
        })
        .collect();
    let diffs: Vec<f32> = fp8_logits
        .iter()
        .zip(&local_logits)
        .map(|(a, b)| (a - b).abs())
        .collect();
    let max_logit_diff = diffs.iter().fold(0f32, |m, d| m.max(*d));
    let mean_logit_diff = diffs.iter().sum::<f32>() / diffs.len() as f32;
    let first_diff = fp8
        .tokens
        .iter()
        .zip(&local.tokens)
        .position(|(a, b)| a != b);
    let agreement = fp8
        .tokens
        .iter()
        .zip(&local.tokens)
        .filter(|(a, b)| a == b)
        .count();
    let generated = |s: &infer::CallStats| s.request_bytes + s.response_bytes;
    println!(
        "fp8 dispatch: greedy tokens equal {agreement}/{}, first difference at {first_diff:?}; \
         teacher-forced argmax changed at {changed:?} of {} positions, |logit difference| max \
         {max_logit_diff:.2e}, mean {mean_logit_diff:.2e}; bytes per generated token: f32 {}, fp8/f32 {}, \
         fp8 {}",
        local.tokens.len(),
        window.len() - 1,
        generated(&stats) / 24,
        generated(&exact_fp8_stats) / 24,
        generated(&fp8_stats) / 24,
    );
    // Greedy decoding follows the local output until the first position whose argmax the dispatch changed.
    let prompt_rows = prompt.len() - 1;
    assert_eq!(
        first_diff,
        changed
            .iter()
            .find(|&&i| i >= prompt_rows)
            .map(|i| i - prompt_rows),
        "the greedy output diverged where no argmax changed"
    );
    assert!(
        changed.len() <= MAX_CHANGED,
        "argmax changed at {changed:?}"
    );
    let session = ran.swap_remove(0).2;
    drop(ran);

    // Hosts refuse what they cannot or will not serve.
    let host = net.trainers[0].0.peer_id();
    let c = net.spec.model.d_model;
    let expert = manifest
        .shards
        .iter()
        .map(|e| e.shard)
        .find(|s| *s != ShardId::Trunk)
        .expect("an expert");
    let ask = |checkpoint: ContentHash, rows: usize| ExpertRequest {
        run: net.coordinator.config().net.run_id.clone(),
        shard: expert,
        checkpoint,
        input: Tensor::from_f32(vec![rows as u32, c as u32], &vec![0.5; rows * c]).expect("tensor"),
        answer: TensorDtype::F32,
    };
    let timeout = Duration::from_secs(10);
    for (request, why) in [
        (ask(ContentHash([7; 32]), 1), "unknown checkpoint"),
        (ask(checkpoint, 65), "over the row limit"),
    ] {
        let answer = wire::call(client_node.net(), host, &request, timeout)
            .await
            .expect("an answer");
        assert!(
            matches!(answer, ExpertResponse::Unavailable { .. }),
            "{why}: {answer:?}"
        );
    }

    // A host at its call cap answers "busy" at once, and the client's runner goes on to the next replica.
    let busy = start_node(net.follower_config("busy")).await;
    let no_calls = HostLimits {
        max_calls: 0,
        ..HostLimits::default()
    };
    infer::serve_experts(&busy, net.spec.clone(), no_calls).expect("serves expert calls");
    for addr in busy.listen_addrs().await.expect("listening") {
        let _ = client_node.net().dial(addr).await;
    }
    let answer = wire::call(
        client_node.net(),
        busy.peer_id(),
        &ask(checkpoint, 1),
        timeout,
    )
    .await
    .expect("an answer");
    match &answer {
        ExpertResponse::Unavailable { reason } => assert_eq!(reason.to_string(), "busy"),
        other => panic!("a host at its cap answered {other:?}"),
    }
    let mut hosts = Hosts::new();
    let replicas =
        std::iter::once(busy.peer_id()).chain(net.trainers.iter().map(|(n, _)| n.peer_id()));
    hosts.insert(expert, replicas.collect());
    // A runner of the checkpoint's experts on the given hosts, as the client's session builds it.
    let runner_on = |hosts: Hosts| {
        NetworkExperts::new(
            client_node.net().clone(),
            tokio::runtime::Handle::current(),
            net.coordinator.config().net.run_id.clone(),
            checkpoint,
            hosts,
            timeout,
        )
    };
    let runner = runner_on(hosts);
    let (layer, index) = expert.expert_position().expect("an expert");
    let stats = {
        let mut runner = runner.clone();
        tokio::task::spawn_blocking(move || {
            let out = call_expert(&mut runner, layer, index, &vec![0.25f32; 2 * c], 2);
            assert!(out.iter().any(|v| *v != 0.0), "the answer was written");
            runner.stats()
        })
        .await
        .expect("runner task")
    };
    assert_eq!(stats.answered, 1);
    assert!(
        stats.failed_attempts() >= 1,
        "the busy host was asked first"
    );
    busy.shutdown().await.expect("busy host shutdown");

    // A host that answers garbage (an output of another shape than the input's, which no honest host
    // gives) is banned at its first answer, and the call goes to the next replica.
    let garbage = start_node(net.follower_config("garbage")).await;
    answer_with(&garbage, |request| {
        let rows = request.input.shape[0] as usize;
        let output = Tensor::from_f32(vec![rows as u32, 3], &vec![1.0; rows * 3]).expect("tensor");
        async move { Some(output) }
    });
    for addr in garbage.listen_addrs().await.expect("listening") {
        let _ = client_node.net().dial(addr).await;
    }
    let mut hosts = Hosts::new();
    let replicas =
        std::iter::once(garbage.peer_id()).chain(net.trainers.iter().map(|(n, _)| n.peer_id()));
    hosts.insert(expert, replicas.collect());
    let runner = runner_on(hosts);
    let stats = {
        let mut runner = runner.clone();
        tokio::task::spawn_blocking(move || {
            let out = call_expert(&mut runner, layer, index, &vec![0.25f32; 2 * c], 2);
            assert!(out.iter().any(|v| *v != 0.0), "the answer was written");
            call_expert(&mut runner, layer, index, &vec![0.5f32; 2 * c], 2);
            runner.stats()
        })
        .await
        .expect("runner task")
    };
    assert_eq!(stats.answered, 2);
    assert_eq!(
        runner.banned(),
        vec![garbage.peer_id()],
        "the garbage host is banned"
    );
    assert_eq!(
        stats.failures.get(&garbage.peer_id()),
        Some(&1),
        "the banned host was asked again"
    );
    drop(runner);
    garbage.shutdown().await.expect("garbage host shutdown");

    // A host that answers with another expert's output (finite values of the right shape and encoding,
    // naming the right checkpoint: what a host that computes the wrong expert, to save loading the right
    // one, would send) is caught when its answer is checked against a second replica: the client computes
    // the expert itself from the committed shard, keeps that answer and bans the liar, whose next calls go
    // elsewhere.
    let other =
        ShardId::expert(layer, (index + 1) % net.spec.model.n_routed_experts).expect("an expert");
    let others = Arc::new(AnswerCheck::new(
        client_node.clone(),
        net.spec.clone(),
        &manifest,
        1.0,
    ));
    let liar = start_node(net.follower_config("liar")).await;
    answer_with(&liar, move |request| {
        let others = others.clone();
        async move {
            let request = ExpertRequest {
                shard: other,
                ..request
            };
            let values = others.reference(&request, Vec::new()).await.ok()?;
            Tensor::encode(request.answer, request.input.shape.clone(), &values).ok()
        }
    });
    for addr in liar.listen_addrs().await.expect("listening") {
        let _ = client_node.net().dial(addr).await;
    }
    let honest: Vec<_> = net.trainers.iter().map(|(n, _)| n.peer_id()).collect();
    let mut hosts = Hosts::new();
    hosts.insert(
        expert,
        std::iter::once(liar.peer_id()).chain(honest).collect(),
    );
    let check = Arc::new(AnswerCheck::new(
        client_node.clone(),
        net.spec.clone(),
        &manifest,
        1.0,
    ));
    // FP8 hidden states and bf16 answers, so that the check of rounded answers is covered too.
    let runner = runner_on(hosts)
        .with_dispatch(Dispatch::FP8)
        .with_check(check.clone());
    let x: Vec<f32> = (0..2 * c).map(|i| (i as f32 * 0.37).sin()).collect();
    // The call the runner makes.
    let call = ExpertRequest {
        run: net.coordinator.config().net.run_id.clone(),
        shard: expert,
        checkpoint,
        input: Dispatch::FP8.encode_input(&x, 2).expect("whole rows"),
        answer: Dispatch::FP8.answer,
    };
    let truth = check
        .reference(&call, Vec::new())
        .await
        .expect("the expert computed from its committed shard");
    // The bf16 answer is the f32 output rounded to nearest: within 2^-8 of each value, and not all exact.
    let exact = check
        .reference(
            &ExpertRequest {
                answer: TensorDtype::F32,
                ..call.clone()
            },
            Vec::new(),
        )
        .await
        .expect("the expert computed from its committed shard");
    for (rounded, x) in truth.iter().zip(&exact) {
        assert!(
            (rounded - x).abs() <= x.abs() / 256.0,
            "{x} answered as {rounded}"
        );
    }
    assert_ne!(truth, exact, "the answer was not rounded to bf16");
    let (first, second, stats) = {
        let mut runner = runner.clone();
        let x = x.clone();
        tokio::task::spawn_blocking(move || {
            let first = call_expert(&mut runner, layer, index, &x, 2);
            let after_first = runner.stats();
            let second = call_expert(&mut runner, layer, index, &x, 2);
            (first, second, (after_first, runner.stats()))
        })
        .await
        .expect("runner task")
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let lie = check
        .reference(
            &ExpertRequest {
                shard: other,
                ..call.clone()
            },
            Vec::new(),
        )
        .await
        .expect("the other expert computed");
    assert_ne!(bits(&lie), bits(&truth), "the two experts answer alike");
    assert_eq!(bits(&first), bits(&truth), "the liar's answer was used");
    assert_eq!(
        bits(&second),
        bits(&truth),
        "an honest replica answers the same"
    );
    assert_eq!(stats.0.checked, 1);
    assert_eq!(stats.0.disagreements, 1, "the liar was not caught");
    assert_eq!(
        runner.banned(),
        vec![liar.peer_id()],
        "the liar alone is banned"
    );
    assert_eq!(stats.1.checked, 2);
    assert_eq!(stats.1.disagreements, 1, "honest replicas disagreed");
    drop(runner);
    drop(check);
    liar.shutdown().await.expect("liar shutdown");

    // A replica killed mid-generation: the client goes on with the other replica of each of its experts
    // (every expert lives on 2 of the 3 trainers), and the greedy output is still the whole checkpoint's.
    let (victim, task) = net.trainers.remove(2);
    let victim_id = victim.peer_id();
    let handle = tokio::runtime::Handle::current();
    let before = session.call_stats();
    let (killed, session) = tokio::task::spawn_blocking(move || {
        let mut session = session;
        let prompt = self::prompt();
        let mut seen = 0;
        let mut on_token = |_| {
            seen += 1;
            if seen == 8 {
                handle.block_on(victim.stop()).expect("the replica stops");
            }
            std::ops::ControlFlow::Continue(())
        };
        let g = session
            .generate_each(&prompt, &config, &mut on_token)
            .expect("generation goes on without the killed replica");
        (g, session)
    })
    .await
    .expect("generation task");
    assert_eq!(
        killed.tokens, local.tokens,
        "the output changed when a replica died"
    );
    let failures_of =
        |stats: &infer::CallStats| stats.failures.get(&victim_id).copied().unwrap_or(0);
    // (It may have refused a call or two before, while it stored the commit's shards.)
    assert!(
        failures_of(&session.call_stats()) > failures_of(&before),
        "the killed replica was never asked after it died"
    );
    // Its role runs until the network's stop signal; the node under it is gone.
    task.abort();
    let _ = task.await;

    drop(session);
    drop(clients);
    Arc::into_inner(client_node)
        .expect("sole owner")
        .shutdown()
        .await
        .expect("client shutdown");
    net.stop().await;
}

/// Most positions of the scored window (39) whose argmax (greedy choice) bf16 answers may change.
/// Measured: none on this model (one round of the tiny model, several runs); 55 of 8128 positions (0.68%)
/// on the default model trained 2000 steps on the KJV (`node/examples/dispatch_error.rs`), where bf16
/// answers flip E4M3 codes and expert choices downstream. At that rate 39 positions see 0.26 changes on
/// average and more than 3 with odds under 1 in 4000; a broken encoding changes most of them.
const MAX_CHANGED: usize = 3;

/// The main-head logits [T - 1, V] of every position of `window` but the last, in one pass.
fn window_logits(lm: &mut dyn LanguageModel, window: &[u32]) -> Vec<f32> {
    let rows = window.len() - 1;
    let mut logits = vec![0.0f32; rows * lm.vocab_size()];
    lm.logits(&window[..rows], rows, &mut logits, None)
        .expect("a pass over the window");
    logits
}

/// Expert `index` of block `layer` applied to the `rows` rows of `x` through `runner`, in one call.
/// Expert `index` of block `layer` applied to the `rows` rows of `x` through `runner`, in one call.
fn call_expert(
    runner: &mut NetworkExperts,
    layer: usize,
    index: usize,
    x: &[f32],
    rows: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let mut calls = [ExpertCall {
        expert: index,
        rows,
        x,
        out: &mut out,
        missing: false,
    }];
    runner
        .run_layer(layer, &mut calls)
        .expect("a replica answers");
    out
}

/// The client settings of these tests: `check_share` of the answers checked against a second replica, every
/// selected expert needed, no expert cached.
fn infer_config(net: &RoundNet, check_share: f64) -> InferConfig {
    InferConfig {
        spec: net.spec.clone(),
        call_timeout: Duration::from_secs(10),
        wait: Duration::from_secs(60),
        check_share,
        k_min: net.spec.model.top_k,
        cache_experts: 0,
        dispatch: Dispatch::default(),
    }
}

/// A client of the run on a node of its own, joined before the rounds (it hears commits from the moment it
/// joins), checking `check_share` of the answers against a second replica.
async fn start_client(net: &RoundNet, check_share: f64) -> (Arc<NodeHandle>, InferClient) {
    start_client_with(net, infer_config(net, check_share)).await
}

/// [`start_client`] with settings of its own.
async fn start_client_with(net: &RoundNet, config: InferConfig) -> (Arc<NodeHandle>, InferClient) {
    let client_node = Arc::new(start_node(net.follower_config("client")).await);
    let client = InferClient::new(client_node.clone(), config);
    (client_node, client)
}

/// The prompt every test generates after.
fn prompt() -> Vec<u32> {
    b"In the beginning".iter().map(|&b| u32::from(b)).collect()
}

/// Greedy decoding of `max_tokens` tokens.
fn greedy(max_tokens: usize) -> GenerateConfig {
    GenerateConfig {
        max_tokens,
        sampling: Sampling::Greedy,
        seed: 0,
        speculative: false,
    }
}

/// The reference: [`prompt`] generated under `config` with every shard of `manifest`, fetched by hash
/// through `node`, in one local model.
async fn local_generation(
    node: &NodeHandle,
    net: &RoundNet,
    manifest: &CheckpointManifest,
    config: &GenerateConfig,
) -> Generation {
    let records = checkpoint_records(node, manifest, &net.spec).await;
    let (spec, config) = (net.spec.clone(), *config);
    tokio::task::spawn_blocking(move || {
        let mut trainer =
            build_trainer(&spec, &spec.hyper(UpdateRule::Sync), &records).expect("whole model");
        let mut lm = CachedModel::new(trainer.model_mut());
        generate::generate(&mut lm, &prompt(), &config).expect("local generation")
    })
    .await
    .expect("local task")
}

/// Generates [`prompt`] under `config` in `session` on a blocking thread; returns the generation, the
/// session's call counts and the session.
async fn generate_remote(
    mut session: Session,
    config: &GenerateConfig,
) -> (Generation, infer::CallStats, Session) {
    let config = *config;
    tokio::task::spawn_blocking(move || {
        let g = session
            .generate(&prompt(), &config)
            .expect("network generation");
        (g, session.call_stats(), session)
    })
    .await
    .expect("generation task")
}

/// Stops the client's node.
async fn stop_client(client_node: Arc<NodeHandle>, client: InferClient) {
    drop(client);
    Arc::into_inner(client_node)
        .expect("sole owner")
        .shutdown()
        .await
        .expect("client shutdown");
}

/// Section 6, "Busy": a host flooded with calls it cannot finish (requests that never end, holding its two
/// call slots until its read timeout) answers the client's calls "busy"; the client goes to the other
/// replica of each expert, and its greedy output is still the whole checkpoint's. Once the flood ends the
/// host answers again: its queue is bounded, not stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_host_answers_busy_and_the_output_is_unchanged() {
    let net = RoundNet::start(3).await;
    // The flooded host is the first replica the client asks for each of its experts: hosts are asked in the
    // order of their peer ids (the announcement's set), and it has the smallest.
    let flooded = net
        .trainers
        .iter()
        .map(|(n, _)| n.clone())
        .min_by_key(|n| n.peer_id())
        .expect("trainers");
    let small = HostLimits {
        max_calls: 2,
        max_calls_per_peer: 2,
        read_timeout: Duration::from_secs(600),
        ..HostLimits::default()
    };
    let mut flooded_host = None;
    for (node, _) in &net.trainers {
        let limits = if node.peer_id() == flooded.peer_id() {
            small
        } else {
            HostLimits::default()
        };
        let host = infer::serve_experts(node, net.spec.clone(), limits).expect("serves");
        if node.peer_id() == flooded.peer_id() {
            flooded_host = Some(host);
        }
    }
    let flooded_host = flooded_host.expect("the flooded host serves");
    let (client_node, client) = start_client(&net, 0.0).await;
    net.honest_rounds(1, 3).await;
    let session = client.load().await.expect("a session");
    let checkpoint = session.checkpoint;
    // An expert the flooded host holds.
    let expert: ShardId = flooded
        .status()
        .await
        .expect("status")
        .hosted_experts
        .first()
        .expect("the flooded host holds experts")
        .parse()
        .expect("a shard id");
    let request = ExpertRequest {
        run: net.coordinator.config().net.run_id.clone(),
        shard: expert,
        checkpoint,
        input: Tensor::from_f32(
            vec![1, net.spec.model.d_model as u32],
            &vec![0.5; net.spec.model.d_model],
        )
        .expect("tensor"),
        answer: TensorDtype::F32,
    };

    // The flood: calls whose request never ends, from a peer of its own, take both of the host's slots.
    let flooder = start_node(node_config(&net.dir.path().join("flooder"), &net.boot)).await;
    for addr in flooded.listen_addrs().await.expect("listening") {
        let _ = flooder.net().dial(addr).await;
    }
    let frame = request.encode().expect("encodable");
    let mut held = Vec::new();
    for _ in 0..small.max_calls {
        let mut stream = flooder
            .net()
            .open_protocol_stream(flooded.peer_id(), wire::EXPERT_STREAM)
            .await
            .expect("a stream to the host");
        stream.write_all(&frame[..8]).await.expect("written");
        stream.flush().await.expect("flushed");
        held.push(stream);
    }
    wait_for(
        Duration::from_secs(30),
        "the flood holds every slot",
        || async { (flooded_host.stats().in_progress == small.max_calls).then_some(()) },
    )
    .await;

    let config = greedy(16);
    let (remote, stats, session) = generate_remote(session, &config).await;
    let local = local_generation(&client_node, &net, &session.manifest, &config).await;
    assert_eq!(
        remote.tokens, local.tokens,
        "the output changed when a host was busy"
    );
    let host_stats = flooded_host.stats();
    assert!(
        host_stats.busy >= 1,
        "the host never answered busy: {host_stats:?}"
    );
    assert_eq!(
        host_stats.answered, 0,
        "a full host answered: {host_stats:?}"
    );
    assert!(
        stats.failures.get(&flooded.peer_id()).copied().unwrap_or(0) >= 1,
        "the client never asked the busy host: {stats:?}"
    );
    assert!(stats.answered > 0);

    // The flood ends: the host answers again.
    drop(held);
    wait_for(
        Duration::from_secs(30),
        "the flood's slots given back",
        || async { (flooded_host.stats().in_progress == 0).then_some(()) },
    )
    .await;
    let answer = wire::call(
        client_node.net(),
        flooded.peer_id(),
        &request,
        Duration::from_secs(10),
    )
    .await
    .expect("an answer");
    assert!(
        matches!(answer, ExpertResponse::Output { round: 1, .. }),
        "the host after the flood: {answer:?}"
    );

    drop(session);
    drop(flooded);
    flooder.shutdown().await.expect("flooder shutdown");
    stop_client(client_node, client).await;
    net.stop().await;
}

/// `mana node --serve-only --experts ...`: two nodes that each fetch and host only their half of every
/// committed checkpoint's experts, training nothing (their heartbeats ask for no shards), serve between
/// them a model that neither holds whole. The trainers here serve no expert calls, so every answer the
/// client uses is one of the two servers', and the greedy output is the whole checkpoint's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_only_nodes_each_hosting_half_the_experts_answer_a_clients_calls() {
    let net = RoundNet::start(3).await;
    let experts = net.spec.experts();
    let halves = [
        experts[..experts.len() / 2].to_vec(),
        experts[experts.len() / 2..].to_vec(),
    ];
    let mut servers = Vec::new();
    for (i, half) in halves.iter().enumerate() {
        // What `mana node --coordinator KEY --serve-only --experts ...` starts: a mirror of those shards
        // (no capacity declared) with the expert host.
        let mut cfg = node_config(&net.dir.path().join(format!("server{i}")), &net.boot);
        cfg.coordinator = Some(net.coordinator.public_key());
        cfg.sync_only = Some(half.iter().copied().collect());
        assert!(cfg.sync_shards && cfg.capacity.max_shards == 0);
        let server = start_node(cfg).await;
        let served =
            infer::serve_experts(&server, net.spec.clone(), HostLimits::default()).expect("serves");
        servers.push((server, served));
    }
    let (client_node, client) = start_client(&net, 0.0).await;
    let heard = Heard::listen(&client_node);
    net.honest_rounds(1, 3).await;
    for ((server, _), half) in servers.iter().zip(&halves) {
        wait_for(
            Duration::from_secs(60),
            "a server keeps its share of round 1",
            || async { (server.status().await.ok()?.stored_round == Some(1)).then_some(()) },
        )
        .await;
        // It holds its experts and nothing else: no trunk, not the other half.
        let status = server.status().await.expect("status");
        let mut stored: Vec<ShardId> = status
            .stored_shards
            .iter()
            .map(|e| e.shard.parse().expect("a shard id"))
            .collect();
        stored.sort();
        assert_eq!(&stored, half, "the shards it keeps");
        assert!(status.training.is_none(), "a server trains");
        // The client learns the server's experts from its signed heartbeats: two of them naming round
        // 1's experts, so the first is in the client's directory too.
        let server_key = server.public_key();
        wait_for(
            Duration::from_secs(30),
            "the server's heartbeats",
            || async {
                let beats = heard.find(|m| match &m.message {
                    Message::Heartbeat(h)
                        if m.signer == server_key && sorted(&h.hosted) == *half =>
                    {
                        Some(())
                    }
                    _ => None,
                });
                (beats.len() >= 2).then_some(())
            },
        )
        .await;
    }

    let session = client.load().await.expect("a session");
    assert_eq!(session.round, 1);
    for (shard, hosts) in session.hosts() {
        let owner = usize::from(!halves[0].contains(shard));
        let owner_peer = servers[owner].0.peer_id();
        assert!(
            hosts.contains(&owner_peer),
            "{shard}: its server is not among its hosts {hosts:?}"
        );
        let other_peer = servers[1 - owner].0.peer_id();
        assert!(
            !hosts.contains(&other_peer),
            "{shard} is offered by the server that does not hold it"
        );
    }
    let config = greedy(16);
    let (remote, stats, session) = generate_remote(session, &config).await;
    let local = local_generation(&client_node, &net, &session.manifest, &config).await;
    assert_eq!(
        remote.tokens, local.tokens,
        "the serve-only nodes' experts give another output"
    );
    let answered: Vec<u64> = servers.iter().map(|(_, h)| h.stats().answered).collect();
    assert!(stats.answered > 0, "no expert was called");
    assert_eq!(
        answered.iter().sum::<u64>(),
        stats.answered,
        "every answer is a serve-only node's: {answered:?} {stats:?}"
    );
    // The trainers and the coordinator are named as hosts too (by assignment and heartbeats) but serve no
    // calls here, so calls to them fail; no call to a server does (none is asked for the other's half).
    for (server, _) in &servers {
        assert!(
            !stats.failures.contains_key(&server.peer_id()),
            "a call to a server failed: {stats:?}"
        );
    }

    drop(session);
    for (server, _) in servers {
        server.shutdown().await.expect("server shutdown");
    }
    stop_client(client_node, client).await;
    net.stop().await;
}

/// Makes `node` answer every expert call with the output `answer` makes of its request (nothing: the
/// stream is dropped), naming the request's checkpoint and round 1: a hostile host.
fn answer_with<F, Fut>(node: &NodeHandle, answer: F)
where
    F: Fn(ExpertRequest) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<Tensor>> + Send,
{
    let mut incoming = node
        .net()
        .accept_protocol_streams(wire::EXPERT_STREAM)
        .expect("accepts expert calls");
    node.spawn(async move {
        while let Some((_, mut stream)) = incoming.next().await {
            let Ok(request) = wire::read_request(&mut stream, Duration::from_secs(5)).await else {
                continue;
            };
            let checkpoint = request.checkpoint;
            let Some(output) = answer(request).await else {
                continue;
            };
            let answer = ExpertResponse::Output {
                round: 1,
                checkpoint,
                output,
            };
            let frame = answer.encode().expect("encodable");
            let _ = wire::write_body(&mut stream, &frame).await;
        }
    });
}

/// `shards` in order.
fn sorted(shards: &[ShardId]) -> Vec<ShardId> {
    let mut shards = shards.to_vec();
    shards.sort();
    shards
}

/// Every (layer, expert) call a runner got, counted.
type Calls = Arc<Mutex<BTreeMap<(usize, usize), u64>>>;

/// Every expert of a checkpoint computed here from its shard, except `gone`, which it marks missing; counts
/// the calls per expert.
struct Local {
    kernels: KernelExperts,
    gone: Option<(usize, usize)>,
    calls: Calls,
}

impl ExpertRunner for Local {
    fn run_layer(&mut self, layer: usize, calls: &mut [ExpertCall<'_>]) -> Result<(), KernelError> {
        for call in calls.iter_mut() {
            *self
                .calls
                .lock()
                .expect("no panic while held")
                .entry((layer, call.expert))
                .or_default() += 1;
            if self.gone == Some((layer, call.expert)) {
                call.missing = true;
            } else {
                self.kernels.run_layer(layer, std::slice::from_mut(call))?;
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_replica_of_an_expert_is_gone_generation_goes_on_under_the_k_min_rule() {
    let mut net = RoundNet::start(3).await;
    for (node, _) in &net.trainers {
        infer::serve_experts(node, net.spec.clone(), HostLimits::default())
            .expect("serves expert calls");
    }
    let top_k = net.spec.model.top_k;
    let (client_node, client) = start_client_with(
        &net,
        InferConfig {
            call_timeout: Duration::from_secs(3),
            k_min: 1,
            ..infer_config(&net, 0.0)
        },
    )
    .await;
    net.honest_rounds(1, 3).await;
    let session = client
        .load()
        .await
        .expect("a session on the committed round");
    let (checkpoint, manifest, known) = (
        session.checkpoint,
        session.manifest.clone(),
        session.hosts().clone(),
    );
    drop(session);

    // Every shard of the checkpoint, fetched by hash: the trunk for the client, the experts for local runs.
    let mut trunk = None;
    let mut kernels = Vec::new();
    for record in checkpoint_records(&client_node, &manifest, &net.spec).await {
        if record.shard == ShardId::Trunk {
            trunk = Some(record);
        } else {
            kernels.push((record.shard, record.params));
        }
    }
    let trunk = trunk.expect("the checkpoint has a trunk");
    let spec = net.spec.clone();
    let local_experts = move || {
        let mut runner = KernelExperts::new();
        for (shard, params) in &kernels {
            let kernel = ExpertKernel::new(&spec.model, params, Box::new(CpuBackend::new()))
                .expect("an expert shard");
            runner.insert(*shard, kernel).expect("an expert");
        }
        runner
    };
    let prompt = prompt();
    let config = greedy(12);
    // Locally: which expert is called most, then generation without it under k_min = 1 and its calls.
    let spec = net.spec.clone();
    let (gone, local, expected_drops) = {
        let (trunk, prompt) = (trunk.clone(), prompt.clone());
        tokio::task::spawn_blocking(move || {
            let mut model = infer::client::trunk_model(&spec, &trunk).expect("trunk model");
            let mut run = |gone| {
                let calls = Calls::default();
                let runner = Local {
                    kernels: local_experts(),
                    gone,
                    calls: calls.clone(),
                };
                let mut lm = CachedModel::with_experts(&mut model, Box::new(runner)).with_k_min(1);
                let g = generate::generate(&mut lm, &prompt, &config).expect("local generation");
                let calls = calls.lock().expect("no panic while held").clone();
                (g, calls)
            };
            let (_, calls) = run(None);
            let (&gone, _) = calls
                .iter()
                .max_by_key(|(_, n)| **n)
                .expect("experts were called");
            let (without, calls) = run(Some(gone));
            (gone, without, calls[&gone])
        })
        .await
        .expect("local task")
    };
    assert!(expected_drops > 0);
    let gone_shard = ShardId::expert(gone.0, gone.1).expect("an expert");

    // The client asks one host for that expert, and the others for the rest; then that host stops.
    let victim_id = known[&gone_shard][0];
    let mut hosts = Hosts::new();
    for (shard, peers) in &known {
        let peers: Vec<_> = if *shard == gone_shard {
            vec![victim_id]
        } else {
            peers.iter().copied().filter(|p| *p != victim_id).collect()
        };
        assert!(!peers.is_empty(), "{shard} keeps a replica");
        hosts.insert(*shard, peers);
    }
    let at = net
        .trainers
        .iter()
        .position(|(n, _)| n.peer_id() == victim_id)
        .expect("the victim is a trainer");
    let (victim, task) = net.trainers.remove(at);
    victim.stop().await.expect("the replica stops");
    task.abort();
    let _ = task.await;

    let runner = NetworkExperts::new(
        client_node.net().clone(),
        tokio::runtime::Handle::current(),
        net.coordinator.config().net.run_id.clone(),
        checkpoint,
        hosts,
        Duration::from_secs(3),
    );
    // Generation through `experts` (the network runner, or a cache in front of it) under `k_min`, each step
    // waited for up to `wait`: the output, and the calls the network runner dropped and the steps stalled.
    let generate_with = |experts: Box<dyn ExpertRunner + Send>, k_min: usize, wait: Duration| {
        let (runner, trunk, spec, prompt) = (
            runner.clone(),
            trunk.clone(),
            net.spec.clone(),
            prompt.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let before = runner.stats();
            let mut model = infer::client::trunk_model(&spec, &trunk).expect("trunk model");
            let lm = CachedModel::with_experts(&mut model, experts).with_k_min(k_min);
            let mut lm = Patient::new(lm, runner.clone(), wait);
            let g = generate::generate(&mut lm, &prompt, &config);
            let after = runner.stats();
            (
                g,
                after.dropped - before.dropped,
                after.stalled - before.stalled,
            )
        })
    };

    // k_min = 1: the expert is dropped for the tokens that chose it, exactly as the local run drops it.
    let (remote, dropped, stalled) =
        generate_with(Box::new(runner.clone()), 1, Duration::from_secs(60))
            .await
            .expect("generation task");
    let remote = remote.expect("generation goes on without the gone expert");
    assert_eq!(
        remote.tokens, local.tokens,
        "network and local outputs without the expert differ"
    );
    assert_eq!(
        dropped, expected_drops,
        "every call of the gone expert dropped"
    );
    assert_eq!(stalled, 0, "every token kept one expert");

    // k_min = top-k: the first step that needs the expert stalls, is tried again, and fails after the wait.
    let (failed, dropped, stalled) =
        generate_with(Box::new(runner.clone()), top_k, Duration::from_secs(1))
            .await
            .expect("generation task");
    let err = failed.expect_err("no step can go on without the expert");
    assert!(
        matches!(
            &err,
            generate::GenerateError::Model(ModelError::Kernel(KernelError::TooFewExperts { k_min, missing, .. }))
                if *k_min == top_k && missing == &vec![gone.1]
        ),
        "{err}"
    );
    assert!(err.to_string().contains("k_min"), "{err}");
    assert!(stalled >= 1, "the step was not tried again");
    assert_eq!(
        dropped,
        stalled + 1,
        "one unanswered call per try of the step"
    );

    // The same with hot experts: the cache holds the most-routed experts it can fetch (the gone one's
    // shard is kept from it, as if every copy were gone), so a layer's calls split between local kernels
    // and the network, and the network part's unanswered call still reaches the k_min rule.
    let mut without_gone = manifest.clone();
    without_gone.shards.retain(|e| e.shard != gone_shard);
    let source = ExpertSource::new(client_node.clone(), net.spec.clone(), &without_gone);
    let cached = CachedExperts::new(runner.clone(), source, tokio::runtime::Handle::current(), 2);
    let generate_cached = || async {
        let (g, dropped, _) = generate_with(Box::new(cached.clone()), 1, Duration::from_secs(60))
            .await
            .expect("generation task");
        (g.expect("generation goes on"), dropped)
    };
    // A first pass ranks the experts; the cache then fetches the top it can.
    let (first, _) = generate_cached().await;
    assert_eq!(first.tokens, local.tokens, "the ranking pass's output");
    cached.settle().await;
    let held = cached.stats().held;
    assert_eq!(
        held.len(),
        2,
        "the cache holds its two experts: {:?}",
        cached.stats()
    );
    assert!(!held.contains(&gone_shard), "the gone expert was fetched");
    let local_before = cached.stats().local_calls;
    let (with_cache, dropped) = generate_cached().await;
    assert!(
        cached.stats().local_calls > local_before,
        "no call computed by the cache: {:?}",
        cached.stats()
    );
    assert_eq!(
        with_cache.tokens, local.tokens,
        "with hot experts, the output without the gone expert differs"
    );
    assert_eq!(
        dropped, expected_drops,
        "every call of the gone expert dropped, with the cache in front"
    );

    drop(cached);
    drop(runner);
    stop_client(client_node, client).await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_hot_experts_computes_the_most_routed_ones_itself_and_generates_the_same() {
    const CACHED: usize = 3;
    let net = RoundNet::start(3).await;
    for (node, _) in &net.trainers {
        infer::serve_experts(node, net.spec.clone(), HostLimits::default())
            .expect("serves expert calls");
    }
    let (client_node, client) = start_client_with(
        &net,
        InferConfig {
            cache_experts: CACHED,
            ..infer_config(&net, 0.0)
        },
    )
    .await;
    net.honest_rounds(1, 3).await;
    let session = client
        .load()
        .await
        .expect("a session on the committed round");
    assert!(session.cache_stats().held.is_empty(), "nothing routed yet");

    let prompt = prompt();
    let config = greedy(24);
    let generate_on = |mut session: infer::Session| {
        let prompt = prompt.clone();
        tokio::task::spawn_blocking(move || {
            let g = session
                .generate(&prompt, &config)
                .expect("network generation");
            (g, session)
        })
    };
    let (first, session) = generate_on(session).await.expect("generation task");
    let (calls_1, cache_1) = (session.call_stats(), session.cache_stats());
    session.settle_cache().await;
    let routing_1 = session.routing();
    let top = routing_1.top(CACHED, &BTreeSet::new());
    assert_eq!(
        top.len(),
        CACHED,
        "fewer experts routed than the cache holds"
    );
    let held: BTreeSet<_> = session.cache_stats().held.into_iter().collect();
    assert_eq!(
        held,
        top.iter().copied().collect(),
        "the cache does not hold the most-routed experts"
    );

    let (second, session) = generate_on(session).await.expect("generation task");
    let (calls_2, cache_2) = (session.call_stats(), session.cache_stats());
    let network_1 = calls_1.answered;
    let network_2 = calls_2.answered - calls_1.answered;
    let local_2 = cache_2.local_calls - cache_1.local_calls;
    // The same tokens route the same way: the second generation makes as many calls in all, more of them
    // here, and fewer on the network (the first one's prompt pass ran before anything was cached).
    assert_eq!(
        network_2 + local_2,
        network_1 + cache_1.local_calls,
        "the two generations routed differently"
    );
    assert!(local_2 > 0, "no call was computed here");
    assert!(
        network_2 < network_1,
        "the second generation asked the network {network_2} times, the first {network_1}"
    );
    assert!(cache_2.held.len() <= CACHED);
    assert_eq!(cache_2.fetch_failures, 0);
    assert_eq!(first.tokens, second.tokens, "the cache changed the output");

    // The references: the whole checkpoint in one model, and the trunk with every expert run here by a
    // runner that counts the rows routed to each, independently of the client.
    let manifest = session.manifest.clone();
    let records = checkpoint_records(&client_node, &manifest, &net.spec).await;
    let spec = net.spec.clone();
    let (local, counted) = tokio::task::spawn_blocking(move || {
        let mut trainer =
            build_trainer(&spec, &spec.hyper(UpdateRule::Sync), &records).expect("whole model");
        let mut lm = CachedModel::new(trainer.model_mut());
        let local = generate::generate(&mut lm, &prompt, &config).expect("local generation");
        let mut kernels = KernelExperts::new();
        let mut trunk = None;
        for record in &records {
            match record.shard {
                ShardId::Trunk => {
                    trunk = Some(infer::client::trunk_model(&spec, record).expect("trunk"))
                }
                shard => kernels
                    .insert(
                        shard,
                        ExpertKernel::new(&spec.model, &record.params, Box::new(CpuBackend::new()))
                            .expect("expert"),
                    )
                    .expect("an expert shard"),
            }
        }
        let mut trunk = trunk.expect("the checkpoint has a trunk");
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let runner = Box::new(Counting {
            inner: kernels,
            rows: counts.clone(),
        });
        let mut lm = CachedModel::with_experts(&mut trunk, runner);
        let counted = generate::generate(&mut lm, &prompt, &config).expect("counted generation");
        assert_eq!(counted.tokens, local.tokens);
        let rows = counts.lock().expect("counts").clone();
        (local, rows)
    })
    .await
    .expect("local task");
    assert_eq!(
        first.tokens, local.tokens,
        "cached and local greedy outputs differ"
    );
    // The client counted what was routed: twice the one generation's rows, expert by expert.
    let routing_2 = session.routing();
    for (&(layer, index), &rows) in &counted {
        let shard = ShardId::expert(layer, index).expect("an expert");
        assert_eq!(routing_2.rows(shard), 2 * rows, "rows routed to {shard}");
        assert_eq!(routing_1.rows(shard), rows, "rows routed to {shard}");
    }
    assert_eq!(routing_2.ranked().len(), counted.len());

    drop(session);
    stop_client(client_node, client).await;
    net.stop().await;
}

/// A runner that counts the rows routed to each (layer, expert) and computes them with its kernels: the
/// test's own count of the routing.
struct Counting {
    inner: KernelExperts,
    rows: Arc<Mutex<BTreeMap<(usize, usize), u64>>>,
}

impl ExpertRunner for Counting {
    fn run_layer(&mut self, layer: usize, calls: &mut [ExpertCall<'_>]) -> Result<(), KernelError> {
        {
            let mut rows = self.rows.lock().expect("counts");
            for call in calls.iter() {
                *rows.entry((layer, call.expert)).or_default() += call.rows as u64;
            }
        }
        self.inner.run_layer(layer, calls)
    }
}
