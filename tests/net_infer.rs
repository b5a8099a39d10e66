//! Inference across a real loopback network: a bootstrap, a coordinator and 3 trainers (replication 2, so
//! each expert lives on 2 of the 3) train one round of the tiny model; every trainer serves expert calls from
//! its store; a client that joined before the round hears the signed commit, fetches the trunk, and generates
//! with every routed expert computed by its hosts. Under greedy decoding its output equals generation with
//! the whole committed checkpoint in one process. Hosts refuse calls for a checkpoint they do not hold and
//! requests over their row limit with `Unavailable`; a host at its call cap answers "busy" and the client's
//! runner asks the next replica. A host that answers wrong is caught by the check against a second
//! replica, the client computes the expert from its committed shard, and the liar is banned. A replica
//! killed mid-generation leaves the output unchanged: the client goes on with the other one. A client with
//! hot experts (`cache_experts`) computes the most-routed experts itself, asks the network less the second
//! time, and still generates exactly what the whole checkpoint generates.

mod net_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mana_engine::round::{RunShard, ShardRecord, build_trainer};
use mana_kernels::CpuBackend;
use mana_kernels::generate::{self, CachedModel, GenerateConfig, Sampling};
use mana_kernels::model::{ExpertCall, ExpertKernel, ExpertRunner, KernelExperts};
use mana_node::infer::{
    self, AnswerCheck, HostLimits, Hosts, InferClient, InferConfig, NetworkExperts, wire,
};
use mana_protocol::{ContentHash, ExpertRequest, ExpertResponse, ShardId, Tensor, UpdateRule};
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
    let mut cfg = node_config(&net.dir.path().join("client"), &net.boot);
    cfg.coordinator = Some(net.coordinator.public_key());
    cfg.sync_shards = false;
    let client_node = Arc::new(start_node(cfg).await);
    let client = InferClient::new(
        client_node.clone(),
        InferConfig {
            spec: net.spec.clone(),
            call_timeout: Duration::from_secs(10),
            wait: Duration::from_secs(60),
            check_share: 1.0,
            cache_experts: 0,
        },
    );
    net.honest_rounds(1, 3).await;
    let mut session = client
        .load()
        .await
        .expect("a session on the committed round");
    assert_eq!(session.round, 1);
    let checkpoint = session.checkpoint;

    let prompt: Vec<u32> = b"In the beginning".iter().map(|&b| u32::from(b)).collect();
    let config = GenerateConfig {
        max_tokens: 24,
        sampling: Sampling::Greedy,
        seed: 0,
        speculative: false,
    };
    let (remote, stats, session) = {
        let prompt = prompt.clone();
        tokio::task::spawn_blocking(move || {
            let g = session
                .generate(&prompt, &config)
                .expect("network generation");
            let stats = session.call_stats();
            (g, stats, session)
        })
        .await
        .expect("generation task")
    };
    assert_eq!(remote.tokens.len(), 24);
    assert!(stats.answered > 0, "no expert was called");
    // Every answer was also asked of a second replica: honest hosts agree bit for bit.
    assert!(stats.checked > 0, "no answer was checked");
    assert_eq!(stats.disagreements, 0, "honest replicas disagreed");
    assert!(session.banned_hosts().is_empty());

    // The reference: every shard of the same checkpoint, fetched by hash, in one local model.
    let manifest = session.manifest.clone();
    assert_eq!(manifest.hash().expect("hashable"), checkpoint);
    let mut records = Vec::new();
    for entry in &manifest.shards {
        client_node
            .fetch_blob(entry.hash)
            .await
            .expect("shard fetched");
        let bytes = client_node.read_blob(entry.hash).await.expect("shard read");
        records.push(ShardRecord::from_bytes(&bytes, &net.spec, entry.shard).expect("shard"));
    }
    let spec = net.spec.clone();
    let local = tokio::task::spawn_blocking(move || {
        let mut trainer =
            build_trainer(&spec, &spec.hyper(UpdateRule::Sync), &records).expect("whole model");
        let mut lm = CachedModel::new(trainer.model_mut());
        generate::generate(&mut lm, &prompt, &config).expect("local generation")
    })
    .await
    .expect("local task");
    assert_eq!(
        remote.tokens, local.tokens,
        "network and local greedy outputs differ"
    );

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
    let mut busy_cfg = node_config(&net.dir.path().join("busy"), &net.boot);
    busy_cfg.coordinator = Some(net.coordinator.public_key());
    busy_cfg.sync_shards = false;
    let busy = start_node(busy_cfg).await;
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

    // A host that answers wrong (finite values of the right shape, naming the right checkpoint) is caught
    // when its answer is checked against a second replica: the client computes the expert itself from the
    // committed shard, keeps that answer and bans the liar, whose next calls go elsewhere.
    let mut liar_cfg = node_config(&net.dir.path().join("liar"), &net.boot);
    liar_cfg.coordinator = Some(net.coordinator.public_key());
    liar_cfg.sync_shards = false;
    let liar = start_node(liar_cfg).await;
    let mut incoming = liar
        .net()
        .accept_protocol_streams(wire::EXPERT_STREAM)
        .expect("accepts expert calls");
    liar.spawn(async move {
        while let Some((_, mut stream)) = incoming.next().await {
            let Ok(request) = wire::read_request(&mut stream, Duration::from_secs(5)).await else {
                continue;
            };
            let x = request.input.to_f32().expect("a decodable input");
            let wrong: Vec<f32> = x.iter().map(|v| v * 0.5 + 0.01).collect();
            let answer = ExpertResponse::Output {
                round: 1,
                checkpoint: request.checkpoint,
                output: Tensor::from_f32(request.input.shape.clone(), &wrong).expect("tensor"),
            };
            let frame = answer.encode().expect("encodable");
            let _ = wire::write_body(&mut stream, &frame).await;
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
    let runner = runner_on(hosts).with_check(check.clone());
    let x: Vec<f32> = (0..2 * c).map(|i| (i as f32 * 0.37).sin()).collect();
    let truth = check
        .reference(expert, x.clone(), 2, Vec::new())
        .await
        .expect("the expert computed from its committed shard");
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
        let prompt: Vec<u32> = b"In the beginning".iter().map(|&b| u32::from(b)).collect();
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
    drop(client);
    Arc::into_inner(client_node)
        .expect("sole owner")
        .shutdown()
        .await
        .expect("client shutdown");
    net.stop().await;
}

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
    }];
    runner
        .run_layer(layer, &mut calls)
        .expect("a replica answers");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_hot_experts_computes_the_most_routed_ones_itself_and_generates_the_same() {
    const CACHED: usize = 3;
    let net = RoundNet::start(3).await;
    for (node, _) in &net.trainers {
        infer::serve_experts(node, net.spec.clone(), HostLimits::default())
            .expect("serves expert calls");
    }
    let mut cfg = node_config(&net.dir.path().join("client"), &net.boot);
    cfg.coordinator = Some(net.coordinator.public_key());
    cfg.sync_shards = false;
    let client_node = Arc::new(start_node(cfg).await);
    let client = InferClient::new(
        client_node.clone(),
        InferConfig {
            spec: net.spec.clone(),
            call_timeout: Duration::from_secs(10),
            wait: Duration::from_secs(60),
            check_share: 0.0,
            cache_experts: CACHED,
        },
    );
    net.honest_rounds(1, 3).await;
    let session = client
        .load()
        .await
        .expect("a session on the committed round");
    assert!(session.cache_stats().held.is_empty(), "nothing routed yet");

    let prompt: Vec<u32> = b"In the beginning".iter().map(|&b| u32::from(b)).collect();
    let config = GenerateConfig {
        max_tokens: 24,
        sampling: Sampling::Greedy,
        seed: 0,
        speculative: false,
    };
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
    let mut records = Vec::new();
    for entry in &manifest.shards {
        client_node
            .fetch_blob(entry.hash)
            .await
            .expect("shard fetched");
        let bytes = client_node.read_blob(entry.hash).await.expect("shard read");
        records.push(ShardRecord::from_bytes(&bytes, &net.spec, entry.shard).expect("shard"));
    }
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
        let counts = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
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
    drop(client);
    Arc::into_inner(client_node)
        .expect("sole owner")
        .shutdown()
        .await
        .expect("client shutdown");
    net.stop().await;
}

/// A runner that counts the rows routed to each (layer, expert) and computes them with its kernels: the
/// test's own count of the routing.
struct Counting {
    inner: KernelExperts,
    rows: Arc<std::sync::Mutex<BTreeMap<(usize, usize), u64>>>,
}

impl ExpertRunner for Counting {
    fn run_layer(
        &mut self,
        layer: usize,
        calls: &mut [ExpertCall<'_>],
    ) -> Result<(), mana_kernels::KernelError> {
        {
            let mut rows = self.rows.lock().expect("counts");
            for call in calls.iter() {
                *rows.entry((layer, call.expert)).or_default() += call.rows as u64;
            }
        }
        self.inner.run_layer(layer, calls)
    }
}
