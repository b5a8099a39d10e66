//! Training rounds across a real loopback network: a bootstrap, a coordinator and 4 training nodes, each a
//! libp2p peer in this process, running the real roles (`run_conductor`, `run_trainer`) on the tiny model
//! with 8 experts, replication 2, under each update rule (sync, diloco). Checks that the validation loss
//! falls round after round (measured by an evaluator), that every commit applied deltas, that every holder of
//! each shard ends bit-identical to the commit's manifest, that the coordinator never held a shard, and that
//! the model a mirror assembled from the holders, by hash, is the committed one.

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

const NODES: usize = 4;
const ROUNDS: u64 = 5;

/// One test at a time: each runs a whole network on the machine's cores, with round deadlines.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_train_in_sync_rounds_and_agree_bit_for_bit() {
    four_nodes_train_and_agree(UpdateRule::Sync, 2).await;
}

/// The same network with the diloco rule: H inner AdamW steps per round, pseudo-gradients averaged and
/// applied with the outer optimizer by every holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_train_in_diloco_rounds_and_agree_bit_for_bit() {
    four_nodes_train_and_agree(UpdateRule::Diloco, 5).await;
}

async fn four_nodes_train_and_agree(rule: UpdateRule, inner_steps: u32) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let spec = RunSpec::tiny();
    let data = Arc::new(
        load_dataset(&DataSource {
            builtin_bytes: 512 * 1024,
            ..DataSource::default()
        })
        .expect("built-in corpus"),
    );

    let mut coord_cfg = node_config(&dir.path().join("coordinator"), &boot);
    coord_cfg.sync_shards = false;
    let coordinator = Arc::new(start_node(coord_cfg).await);
    let key = coordinator.public_key();

    let mut nodes: Vec<Arc<NodeHandle>> = Vec::new();
    for i in 0..NODES {
        let mut cfg = node_config(&dir.path().join(format!("node-{i}")), &boot);
        cfg.coordinator = Some(key);
        cfg.sync_shards = false;
        // Declared from the first heartbeat on (run_trainer sets it too, a moment later).
        cfg.capacity.max_shards = 64;
        nodes.push(Arc::new(start_node(cfg).await));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let export = dir.path().join("final-model");
    let mut evaluating = EvaluatorConfig::new(spec.clone(), data.clone());
    evaluating.export = Some(export.clone());
    let (evaluator, _evaluating) =
        start_evaluator_with(dir.path(), &boot, key, evaluating, stop_rx.clone()).await;
    let mut trainers = Vec::new();
    for node in &nodes {
        let cfg = TrainerConfig::new(spec.clone(), data.clone());
        trainers.push(tokio::spawn(run_trainer(
            node.clone(),
            cfg,
            stopped(stop_rx.clone()),
        )));
    }

    let run = coordinator.config().net.run_id.clone();
    let mut machine = machine_config(run, &spec, rule, inner_steps).expect("machine config");
    machine.min_members = NODES;
    machine.train_ms = 8_000;
    machine.verify_ms = 8_000;
    machine.cooldown_ms = 200;
    let metrics_path = dir.path().join("metrics.jsonl");
    let hyper = machine.hyper.clone();
    let mut role = ConductorConfig::new(machine, spec.clone(), data.clone());
    role.rounds = Some(ROUNDS);
    role.metrics = Some(metrics_path.clone());
    let coordinating = tokio::spawn(run_conductor(
        coordinator.clone(),
        role,
        stopped(stop_rx.clone()),
    ));
    tokio::time::timeout(Duration::from_secs(150), coordinating)
        .await
        .expect("the coordinator finishes its rounds in time")
        .expect("coordinator task")
        .expect("coordinator ran");

    // The metrics: one line per round, deltas accepted in every round, the validation loss falling.
    let text = std::fs::read_to_string(&metrics_path).expect("metrics file");
    let lines: Vec<RoundMetrics> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line"))
        .collect();
    assert_eq!(lines.len() as u64, ROUNDS, "{text}");
    for (i, m) in lines.iter().enumerate() {
        assert_eq!(m.round, i as u64 + 1);
        assert_eq!(m.participants, NODES);
        assert!(m.accepted > 0, "round {} accepted nothing: {text}", m.round);
        assert_eq!(m.rejected, 0, "an honest delta was refused: {text}");
        // Per member: the counts add up to the round's.
        let per_member: u64 = m.members.values().map(|x| x.accepted).sum();
        assert_eq!(
            per_member, m.accepted as u64,
            "round {}: {:?}",
            m.round, m.members
        );
        assert!(
            m.members.values().all(|x| x.refused == 0),
            "{:?}",
            m.members
        );
        eprintln!(
            "round {}: val {:?} train {:?} accepted {} bytes {} ms {:?}",
            m.round, m.val_loss, m.train_loss, m.accepted, m.payload_bytes, m.ms
        );
    }
    // Every line's validation loss is the evaluator's (the coordinator holds no model to measure).
    let val: Vec<f32> = lines
        .iter()
        .map(|m| m.val_loss.expect("val loss measured"))
        .collect();
    for w in val.windows(2) {
        assert!(w[1] < w[0], "validation loss did not fall: {val:?}");
    }

    // The coordinator's record of the last commit: the checkpoint, without a shard of it.
    let (_, stored) = coordinator
        .store()
        .latest()
        .expect("store")
        .expect("a committed round");
    let checkpoint =
        CheckpointManifest::from_bytes(&stored.meta).expect("the coordinator's checkpoint");
    assert_eq!(checkpoint.round, ROUNDS);
    assert!(stored.entries.is_empty(), "the coordinator keeps no shard");
    for entry in &checkpoint.shards {
        assert_eq!(
            coordinator.store().blob_len(&entry.hash).expect("store"),
            None,
            "the coordinator holds {}",
            entry.shard
        );
    }
    // The mirror (the evaluator) assembled the committed checkpoint from its holders, by hash: its shards
    // give the evaluator's figure bit for bit, and its export is that model.
    let shards = assert_exported(&evaluator, &export, &checkpoint, &spec).await;
    // The trunk's holders moved the router biases from the members' expert loads (and, below, all of them
    // hold the same trunk): the balance is the network's, not one node's.
    let trunk = shards
        .iter()
        .find(|s| s.shard == ShardId::Trunk)
        .expect("the trunk");
    assert!(
        trunk.router_bias.iter().any(|b| *b != 0.0),
        "the router biases never moved: {:?}",
        trunk.router_bias
    );
    let recomputed = mana_engine::round::validation_loss(&spec, &hyper, &data, &shards, 4)
        .expect("the loss recomputed");
    assert_eq!(lines.last().and_then(|m| m.val_loss), Some(recomputed));
    // The evaluator, which mirrors the checkpoints, published that figure, and the coordinator took it.
    let published = wait_for(
        Duration::from_secs(60),
        "the evaluator evaluates the last round",
        || async {
            let e = evaluator.status().await.ok()?.evaluator?;
            (e.last_round == Some(ROUNDS)).then_some(e.last_val_loss)
        },
    )
    .await;
    assert_eq!(published, Some(recomputed));
    let c = coordinator
        .status()
        .await
        .expect("status")
        .coordinator
        .expect("coordinator status");
    assert!(c.evaluations_agreed > 0, "{c:?}");
    assert_eq!(c.evaluations_disagreed, 0, "{c:?}");
    let committed: BTreeMap<String, String> = checkpoint
        .shards
        .iter()
        .map(|e| (e.shard.to_string(), e.hash.to_string()))
        .collect();
    // Per member in the whole run, from the metrics lines.
    let mut accepted_by_member: BTreeMap<String, u64> = BTreeMap::new();
    for m in &lines {
        for (key, x) in &m.members {
            *accepted_by_member.entry(key.clone()).or_default() += x.accepted;
        }
    }
    let mut holders: BTreeMap<String, usize> = BTreeMap::new();
    for node in &nodes {
        let key = hex::encode(node.public_key().0);
        let node = node.clone();
        let status = wait_for(
            Duration::from_secs(30),
            "every node applies the last commit",
            move || {
                let node = node.clone();
                async move {
                    let s = node.status().await.ok()?;
                    let t = s.training.clone()?;
                    (t.applied_round == Some(ROUNDS)).then_some(t)
                }
            },
        )
        .await;
        assert_eq!(
            status.hash_mismatches, 0,
            "a node computed a different shard"
        );
        // Every call's norm history was the one the commits published, and no judge signed twice.
        assert_eq!(
            (status.calls_refused, status.judges_equivocated),
            (0, 0),
            "{:?}",
            status.last_audit_finding
        );
        assert!(status.rounds_trained >= ROUNDS - 1);
        // It judged shards and signed their results (the coordinator computes none).
        assert!(status.shards_attested > 0, "{status:?}");
        // The node saw the fate of its deltas in the commits: all accepted, as the metrics say of it.
        let c = &status.contributions;
        assert_eq!((c.refused, c.unaccounted), (0, 0), "{c:?}");
        assert_eq!(c.accepted, status.deltas_sent, "{c:?}");
        assert_eq!(Some(&c.accepted), accepted_by_member.get(&key), "{c:?}");
        let share = c.share().expect("the run accepted deltas");
        assert!(share > 0.0 && share < 1.0, "{share}");
        for (shard, hash) in &status.held_shards {
            assert_eq!(
                committed.get(shard),
                Some(hash),
                "{shard} differs from the commit"
            );
            *holders.entry(shard.clone()).or_default() += 1;
        }
    }
    assert_eq!(holders.get("trunk"), Some(&NODES));
    let experts: Vec<_> = holders
        .iter()
        .filter(|(s, _)| s.starts_with("expert/"))
        .collect();
    assert_eq!(experts.len(), 8, "every expert is held: {holders:?}");
    assert!(
        experts.iter().all(|(_, n)| **n == 2),
        "each expert by 2 nodes: {holders:?}"
    );
    // The holders published their shard hashes; the coordinator compared them with its commits.
    let c = coordinator
        .status()
        .await
        .expect("status")
        .coordinator
        .expect("coordinator status");
    assert!(c.holder_reports >= NODES as u64, "{c:?}");
    // Every round's shards came from the judges' signed results: a quorum is at least two judges, each
    // signing its shards of the round in one attestation.
    assert!(c.attestations >= ROUNDS * 2, "{c:?}");
    assert_eq!(c.min_members, NODES, "{c:?}");
    assert_eq!(
        c.settings.get("rule").map(String::as_str),
        Some(if rule == UpdateRule::Sync {
            "sync"
        } else {
            "diloco"
        })
    );
    assert_eq!(
        c.recent_commits.last().map(|r| r.round),
        Some(ROUNDS),
        "{c:?}"
    );
    assert!(
        c.standings.iter().filter(|m| m.member).count() >= NODES,
        "{c:?}"
    );
    assert_eq!(c.holder_mismatches, 0, "{c:?}");

    let _ = stop_tx.send(true);
    for t in trainers {
        t.await.expect("trainer task").expect("trainer ran");
    }
    for node in nodes {
        Arc::into_inner(node)
            .expect("sole owner")
            .shutdown()
            .await
            .expect("shutdown");
    }
    Arc::into_inner(coordinator)
        .expect("sole owner")
        .shutdown()
        .await
        .expect("shutdown");
    bootstrap.shutdown().await;
}

/// The coordinator stops after round 2 (its node shut down), then starts again on the same data directory
/// and key: it resumes from its stored state and checkpoint (no new round 0), and the same trainers carry on
/// through round 4 with every holder still bit-identical to the commits.
///
/// The stop is made the worst one: right after round 2's store commit, before the state that says so was
/// saved. The test keeps the state the coordinator saved with round 2 aggregated and not yet committed, and
/// puts it back before the restart. The restarted coordinator commits round 2 again: the store holds that very
/// checkpoint, so the commit is finished (the new shard states read back from the store), not refused as a
/// stale round, and round 2's metrics line is not written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_coordinator_resumes_the_run() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let spec = RunSpec::tiny();
    let data = Arc::new(
        load_dataset(&DataSource {
            builtin_bytes: 512 * 1024,
            ..DataSource::default()
        })
        .expect("built-in corpus"),
    );
    let coord_dir = dir.path().join("coordinator");
    let coord_config = || {
        let mut cfg = node_config(&coord_dir, &boot);
        cfg.sync_shards = false;
        cfg
    };
    let coordinator = Arc::new(start_node(coord_config()).await);
    let key = coordinator.public_key();
    let mut nodes: Vec<Arc<NodeHandle>> = Vec::new();
    for i in 0..2 {
        let mut cfg = node_config(&dir.path().join(format!("node-{i}")), &boot);
        cfg.coordinator = Some(key);
        cfg.sync_shards = false;
        cfg.capacity.max_shards = 64;
        nodes.push(Arc::new(start_node(cfg).await));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let trainers: Vec<_> = nodes
        .iter()
        .map(|n| {
            tokio::spawn(run_trainer(
                n.clone(),
                TrainerConfig::new(spec.clone(), data.clone()),
                stopped(stop_rx.clone()),
            ))
        })
        .collect();
    let metrics_path = dir.path().join("metrics.jsonl");
    let role = |rounds: u64| {
        let run = coordinator_run();
        let mut machine = machine_config(run, &spec, UpdateRule::Sync, 1).expect("machine config");
        machine.min_members = 2;
        machine.train_ms = 8_000;
        machine.verify_ms = 8_000;
        machine.cooldown_ms = 200;
        let mut role = ConductorConfig::new(machine, spec.clone(), data.clone());
        role.rounds = Some(rounds);
        role.metrics = Some(metrics_path.clone());
        role
    };
    let first = tokio::spawn(run_conductor(
        coordinator.clone(),
        role(2),
        stopped(stop_rx.clone()),
    ));
    let before_commit = tokio::spawn(state_before_commit(coordinator.clone(), 2));
    tokio::time::timeout(Duration::from_secs(90), first)
        .await
        .expect("rounds 1-2 in time")
        .expect("task")
        .expect("ran");
    let before_commit = tokio::time::timeout(Duration::from_secs(5), before_commit)
        .await
        .expect("the watcher ends with the run")
        .expect("watcher task");
    coordinator
        .store()
        .put_split_record(RecordKind::RoundState, STATE_KEY, &before_commit)
        .expect("the crash: the state saved before round 2's commit");
    Arc::into_inner(coordinator)
        .expect("sole owner")
        .shutdown()
        .await
        .expect("shutdown");

    let coordinator = Arc::new(start_node(coord_config()).await);
    assert_eq!(
        coordinator.public_key(),
        key,
        "same key file, same coordinator"
    );
    let second = tokio::spawn(run_conductor(
        coordinator.clone(),
        role(4),
        stopped(stop_rx.clone()),
    ));
    tokio::time::timeout(Duration::from_secs(90), second)
        .await
        .expect("rounds 3-4 in time")
        .expect("task")
        .expect("ran");

    let text = std::fs::read_to_string(&metrics_path).expect("metrics file");
    let rounds: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<RoundMetrics>(l).expect("line").round)
        .collect();
    assert_eq!(
        rounds,
        vec![1, 2, 3, 4],
        "the restarted coordinator continued the run: {text}"
    );
    let (_, stored) = coordinator
        .store()
        .latest()
        .expect("store")
        .expect("a committed round");
    let checkpoint = CheckpointManifest::from_bytes(&stored.meta).expect("checkpoint");
    assert_eq!(checkpoint.round, 4);
    for node in &nodes {
        let node = node.clone();
        let t = wait_for(
            Duration::from_secs(30),
            "the trainers apply round 4",
            move || {
                let node = node.clone();
                async move {
                    let t = node.status().await.ok()?.training?;
                    (t.applied_round == Some(4)).then_some(t)
                }
            },
        )
        .await;
        assert_eq!(t.hash_mismatches, 0);
        for (shard, hash) in &t.held_shards {
            let entry = checkpoint
                .shards
                .iter()
                .find(|e| e.shard.to_string() == *shard)
                .expect("shard in checkpoint");
            assert_eq!(entry.hash.to_string(), *hash);
        }
    }
    let _ = stop_tx.send(true);
    for t in trainers {
        t.await.expect("trainer task").expect("trainer ran");
    }
    for node in nodes {
        Arc::into_inner(node)
            .expect("sole owner")
            .shutdown()
            .await
            .expect("shutdown");
    }
    Arc::into_inner(coordinator)
        .expect("sole owner")
        .shutdown()
        .await
        .expect("shutdown");
    bootstrap.shutdown().await;
}

/// The coordinator's saved state as it was with `round` aggregated and not yet committed: polled from its
/// store until the store holds `round`'s commit.
async fn state_before_commit(coordinator: Arc<NodeHandle>, round: u64) -> Vec<u8> {
    use mana_engine::coordinator::{Coordinator, RunState};
    let mut kept = None;
    loop {
        let store = coordinator.store();
        if let Some(bytes) = store
            .get_split_record(RecordKind::RoundState, STATE_KEY)
            .expect("state record")
        {
            let machine = Coordinator::from_bytes(&bytes).expect("saved state decodes");
            if let RunState::RoundAggregate(r) = machine.state()
                && r.announcement.round == round
                && !r.results.is_empty()
                && r.call
                    .as_ref()
                    .is_some_and(|c| r.results.len() == c.call.shards.len())
            {
                kept = Some(bytes);
            }
        }
        if store.current_round().expect("store round") >= Some(round)
            && let Some(bytes) = kept.take()
        {
            return bytes;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The run id the test nodes follow (`NodeConfig::for_tests`'s).
fn coordinator_run() -> mana_protocol::RunId {
    mana_node::daemon::NodeConfig::for_tests("/unused")
        .net
        .run_id
}
