//! A trainer says why it does not train: a coordinator key that matches nothing it hears ("check --run and
//! --coordinator"), a coordinator that is up but waits for enough members, a corpus other than the run's (it
//! sits the round out), and the end of the run, announced by the coordinator after its last round. Loopback
//! only; the silence wait is 2 s here (60 s by default).

mod net_support;

use std::sync::Arc;
use std::time::Duration;

use mana_engine::round::RunSpec;
use mana_node::daemon::NodeHandle;
use mana_node::roles::common::{DataSource, load_dataset};
use mana_node::roles::conductor::{ConductorConfig, machine_config, run_conductor};
use mana_node::roles::trainer::{TrainerConfig, run_trainer};
use mana_protocol::UpdateRule;
use net_support::*;

/// Waits until `node`'s trainer activity contains every one of `words`.
async fn activity_says(node: &Arc<NodeHandle>, words: &[&str]) -> String {
    let what = format!("the trainer's activity to say {words:?}");
    wait_for(Duration::from_secs(60), &what, || async {
        let activity = node.status().await.ok()?.training?.activity;
        words
            .iter()
            .all(|w| activity.contains(w))
            .then_some(activity)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_says_why_no_round_comes() {
    init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let spec = RunSpec::tiny();
    let data = Arc::new(
        load_dataset(&DataSource {
            builtin_bytes: 256 * 1024,
            ..DataSource::default()
        })
        .expect("built-in corpus"),
    );
    let mut coord_cfg = node_config(&dir.path().join("coordinator"), &boot);
    coord_cfg.sync_shards = false;
    let coordinator = Arc::new(start_node(coord_cfg).await);
    let key = coordinator.public_key();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let other_text = Arc::new(
        load_dataset(&DataSource {
            builtin_bytes: 256 * 1024,
            seed: 99,
            ..DataSource::default()
        })
        .expect("another built-in corpus"),
    );
    let start_trainer = |name: &str, key, data: &Arc<mana_kernels::data::TextDataset>| {
        let cfg = member_config(dir.path(), &boot, name, key);
        let (spec, data, stop_rx) = (spec.clone(), data.clone(), stop_rx.clone());
        async move {
            let node = Arc::new(start_node(cfg).await);
            let mut trainer = TrainerConfig::new(spec, data);
            trainer.coordinator_silence = Duration::from_secs(2);
            let task = tokio::spawn(run_trainer(node.clone(), trainer, stopped(stop_rx)));
            (node, task)
        }
    };
    let (right, right_task) = start_trainer("right", key, &data).await;
    let (wrong, wrong_task) =
        start_trainer("wrong", mana_protocol::PublicKey([7; 32]), &data).await;
    let (other, other_task) = start_trainer("other-text", key, &other_text).await;
    // A mistyped run: the right coordinator, but another run's topics.
    let mut cfg = member_config(dir.path(), &boot, "other-run", key);
    cfg.net.run_id = mana_protocol::RunId::new("defualt").expect("run id");
    let typo = Arc::new(start_node(cfg).await);
    let mut typo_cfg = TrainerConfig::new(spec.clone(), data.clone());
    typo_cfg.coordinator_silence = Duration::from_secs(2);
    let typo_task = tokio::spawn(run_trainer(
        typo.clone(),
        typo_cfg,
        stopped(stop_rx.clone()),
    ));

    // The mistyped run: nothing it hears is of its run.
    let said = activity_says(
        &typo,
        &["no round from coordinator", "on run defualt", "check --run"],
    )
    .await;
    println!("wrong run: {said}");
    // The mistyped key: nothing it hears is from "its" coordinator.
    let said = activity_says(
        &wrong,
        &[
            "no round from coordinator 0707",
            "check --run and --coordinator",
        ],
    )
    .await;
    println!("wrong key: {said}");
    // The right key, before the run starts: the coordinator's heartbeats arrive, no round yet.
    let said = activity_says(&right, &["coordinator is up", "waits for enough members"]).await;
    println!("right key, waiting: {said}");

    // A run of one round with all three members (the one with the wrong key heartbeats on the run too, so it
    // is one), then the coordinator ends the run. The member with other text sits the round out.
    let run = coordinator.config().net.run_id.clone();
    let mut machine = machine_config(run, &spec, UpdateRule::Sync, 1).expect("machine config");
    machine.min_members = 3;
    machine.replication = 1;
    machine.train_ms = 8_000;
    machine.verify_ms = 8_000;
    machine.cooldown_ms = 200;
    let mut role = ConductorConfig::new(machine, spec.clone(), data.clone());
    role.rounds = Some(1);
    let coordinating = tokio::spawn(run_conductor(
        coordinator.clone(),
        role,
        stopped(stop_rx.clone()),
    ));
    let said = activity_says(
        &other,
        &["round 1: not training", "corpus", "is not the run's"],
    )
    .await;
    println!("other text: {said}");
    tokio::time::timeout(Duration::from_secs(120), coordinating)
        .await
        .expect("the round is committed in time")
        .expect("coordinator task")
        .expect("coordinator ran");
    let sent = other
        .status()
        .await
        .expect("status")
        .training
        .expect("training")
        .deltas_sent;
    assert_eq!(sent, 0, "the node with other text sent deltas");
    let said = activity_says(&right, &["the run ended after round 1", "final checkpoint"]).await;
    println!("after the run: {said}");
    let status = right
        .status()
        .await
        .expect("status")
        .training
        .expect("training");
    assert_eq!(status.applied_round, Some(1), "{status:?}");

    let _ = stop_tx.send(true);
    for task in [right_task, wrong_task, other_task, typo_task] {
        task.await.expect("trainer task").expect("trainer ran");
    }
    for node in [right, wrong, other, typo, coordinator] {
        Arc::try_unwrap(node)
            .ok()
            .expect("sole owner")
            .shutdown()
            .await
            .expect("shutdown");
    }
    bootstrap.shutdown().await;
}
