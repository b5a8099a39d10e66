//! A network where nobody holds the model (issue #16 §2): training members on a preset whose routed experts
//! are most of the model, each allowed so few shards that it holds under a third of it; a coordinator that
//! holds no part of it; an evaluator (a mirror) that measures each checkpoint and exports the model. Checks
//! that training converges by the evaluator's figures, that every holder of each shard holds the committed
//! bytes, that the export is the committed checkpoint bit for bit, and that the coordinator stores no shard
//! (its blobs, the commits' manifests, are smaller than one); prints the coordinator's bytes in and out per
//! round, and its saved state's size.
//!
//! In CI: 8 members, 4 rounds. More members: `MANA_LIGHT_MEMBERS=16 cargo test --release --test
//! net_light_coordinator -- --nocapture` (about 3 minutes on 2 cores); `MANA_LIGHT_EXPERT_HIDDEN=1024` runs
//! the same network on a model twice the size (the coordinator's bytes must not change with it). With 32
//! members in one process the coordinator has not yet seen every member join on a 2-core machine (no round
//! starts; issue #16's closing note of 2026-12-06).

mod net_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mana_engine::round::RunSpec;
use mana_node::daemon::NodeHandle;
use mana_node::roles::common::{DataSource, load_dataset};
use mana_node::roles::conductor::{
    ConductorConfig, RoundMetrics, STATE_KEY, machine_config, run_conductor,
};
use mana_node::roles::evaluator::EvaluatorConfig;
use mana_node::roles::trainer::{TrainerConfig, run_trainer};
use mana_node::store::RecordKind;
use mana_protocol::{CheckpointManifest, ShardId, UpdateRule};
use net_support::*;
use tokio::sync::watch;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The test preset with 16 routed experts of `expert_hidden` (512 by default: the experts are 91% of the
/// model's parameters, the trunk 9%; 1024: 95% of a model twice the size).
fn wide_spec(expert_hidden: usize) -> RunSpec {
    let mut spec = RunSpec::tiny();
    spec.model.n_routed_experts = 16;
    spec.model.expert_hidden = expert_hidden;
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_where_nobody_holds_the_model_trains_and_exports_it() {
    init_tracing();
    let members = env_or("MANA_LIGHT_MEMBERS", 8);
    let rounds = env_or("MANA_LIGHT_ROUNDS", 4) as u64;
    let spec = wide_spec(env_or("MANA_LIGHT_EXPERT_HIDDEN", 512));
    let model_params = spec.params().expect("params");
    let shard_params = |shard: ShardId| spec.shard_len(shard).expect("a shard") as u64;
    // The most shards a member hosts: the trunk and as many experts as keep it under a third of the model.
    let (trunk, expert) = (
        shard_params(ShardId::Trunk),
        shard_params(spec.experts()[0]),
    );
    let max_experts = (model_params / 3 - trunk - 1) / expert;
    assert!(max_experts >= 1, "the trunk alone is a third of the model");
    let max_shards = 1 + max_experts as u32;
    assert!(
        members as u64 * max_experts >= 2 * spec.experts().len() as u64,
        "{members} members cannot host every expert twice with {max_experts} each"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let data = Arc::new(
        load_dataset(&DataSource {
            builtin_bytes: 512 * 1024,
            ..DataSource::default()
        })
        .expect("built-in corpus"),
    );

    let mut coord_cfg = node_config(&dir.path().join("coordinator"), &boot);
    coord_cfg.sync_shards = false;
    // The coordinator does not even know how to make the model's shards.
    coord_cfg.genesis = None;
    let coordinator = Arc::new(start_node(coord_cfg).await);
    let key = coordinator.public_key();
    let (stop_tx, stop_rx) = watch::channel(false);
    let export = dir.path().join("final-model");
    let mut evaluating = EvaluatorConfig::new(spec.clone(), data.clone());
    evaluating.export = Some(export.clone());
    let (evaluator, _evaluating) =
        start_evaluator_with(dir.path(), &boot, key, evaluating, stop_rx.clone()).await;
    let mut nodes: Vec<Arc<NodeHandle>> = Vec::new();
    let mut trainers = Vec::new();
    for i in 0..members {
        let mut cfg = node_config(&dir.path().join(format!("node-{i}")), &boot);
        cfg.coordinator = Some(key);
        cfg.sync_shards = false;
        cfg.genesis = Some(spec.clone());
        cfg.capacity.max_shards = max_shards;
        let node = Arc::new(start_node(cfg).await);
        let mut trainer = TrainerConfig::new(spec.clone(), data.clone());
        trainer.max_shards = max_shards;
        trainers.push(tokio::spawn(run_trainer(
            node.clone(),
            trainer,
            stopped(stop_rx.clone()),
        )));
        nodes.push(node);
    }

    let run = coordinator.config().net.run_id.clone();
    let mut machine = machine_config(run, &spec, UpdateRule::Diloco, 5).expect("machine config");
    machine.min_members = members;
    machine.train_ms = 30_000;
    machine.verify_ms = 30_000;
    machine.cooldown_ms = 200;
    let metrics_path = dir.path().join("metrics.jsonl");
    let mut role = ConductorConfig::new(machine, spec.clone(), data.clone());
    role.rounds = Some(rounds);
    role.metrics = Some(metrics_path.clone());
    let started = std::time::Instant::now();
    tokio::time::timeout(
        Duration::from_secs(120 + 60 * members as u64),
        run_conductor(coordinator.clone(), role, stopped(stop_rx.clone())),
    )
    .await
    .expect("the coordinator finishes its rounds in time")
    .expect("coordinator ran");
    let took = started.elapsed();

    // Training converged by the evaluator's figures, which the coordinator's metrics carry.
    let text = std::fs::read_to_string(&metrics_path).expect("metrics file");
    let lines: Vec<RoundMetrics> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line"))
        .collect();
    assert_eq!(lines.len() as u64, rounds, "{text}");
    for m in &lines {
        eprintln!(
            "round {}: participants {} accepted {} rejected {} {:?} val {:?} train {:?} ms {:?}",
            m.round,
            m.participants,
            m.accepted,
            m.rejected,
            m.rejected_reasons,
            m.val_loss,
            m.train_loss,
            m.ms
        );
        assert_eq!(m.participants, members, "{text}");
    }
    let val: Vec<f32> = lines
        .iter()
        .map(|m| m.val_loss.expect("an evaluator's figure"))
        .collect();
    assert!(
        val[val.len() - 1] < val[0],
        "validation loss did not fall: {val:?}"
    );

    // The coordinator: a record of each commit, no shard, and no blob ever received.
    let (_, stored) = coordinator
        .store()
        .latest()
        .expect("store")
        .expect("a committed round");
    let checkpoint = CheckpointManifest::from_bytes(&stored.meta).expect("the checkpoint");
    assert_eq!(checkpoint.round, rounds);
    assert!(stored.entries.is_empty());
    for entry in &checkpoint.shards {
        assert_eq!(
            coordinator.store().blob_len(&entry.hash).expect("store"),
            None
        );
    }
    let status = coordinator.status().await.expect("status");
    let traffic = &status.traffic;
    // Its blobs are the commits' manifests, together smaller than one shard.
    let smallest = checkpoint
        .shards
        .iter()
        .map(|e| e.size)
        .min()
        .expect("shards");
    assert!(
        status.store_bytes < smallest,
        "the coordinator stores {} bytes of blobs",
        status.store_bytes
    );
    // What it reads of transfers is peers' requests for a manifest: never a shard's worth.
    assert!(traffic.fetch_in / rounds < smallest, "{traffic:?}");
    let state = coordinator
        .store()
        .get_split_record(RecordKind::RoundState, STATE_KEY)
        .expect("store")
        .expect("the saved state");
    let per_round = |bytes: u64| bytes / rounds;
    eprintln!(
        "LIGHT members {members} model {model_params} params ({} KiB of shards): coordinator per round: gossip in {} B, gossip out {} B, fetch in {} B, fetch out {} B; store {} B; saved state {} B; {rounds} rounds in {:.1} s",
        checkpoint.shards.iter().map(|e| e.size).sum::<u64>() / 1024,
        per_round(traffic.gossip_in),
        per_round(traffic.gossip_out),
        per_round(traffic.fetch_in),
        per_round(traffic.fetch_out),
        status.store_bytes,
        state.len(),
        took.as_secs_f64()
    );

    // Every member held under a third of the model, and every held shard is the committed one.
    let committed: BTreeMap<String, String> = checkpoint
        .shards
        .iter()
        .map(|e| (e.shard.to_string(), e.hash.to_string()))
        .collect();
    let mut held_by: BTreeMap<String, usize> = BTreeMap::new();
    for node in &nodes {
        let node = node.clone();
        let training = wait_for(
            Duration::from_secs(60),
            "every member applies the last commit",
            move || {
                let node = node.clone();
                async move {
                    let t = node.status().await.ok()?.training?;
                    (t.applied_round == Some(rounds)).then_some(t)
                }
            },
        )
        .await;
        assert_eq!(training.hash_mismatches, 0, "{training:?}");
        let mut params = 0;
        for (shard, hash) in &training.held_shards {
            assert_eq!(committed.get(shard), Some(hash), "{shard}");
            *held_by.entry(shard.clone()).or_default() += 1;
            params += shard_params(shard.parse().expect("a shard id"));
        }
        assert!(
            params * 3 < model_params,
            "a member holds {params} of {model_params} parameters"
        );
    }
    assert_eq!(
        held_by.len(),
        checkpoint.shards.len(),
        "every shard is held"
    );

    // The mirror assembled the committed checkpoint from the holders, by hash; its export is that model.
    assert_exported(&evaluator, &export, &checkpoint, &spec).await;

    let _ = stop_tx.send(true);
    for t in trainers {
        t.await.expect("trainer task").expect("trainer ran");
    }
}
