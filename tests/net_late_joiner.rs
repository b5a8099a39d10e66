//! A node that joins a run after round 10 trains within two rounds, and nobody is penalised for it (issue
//! #14, section 4), on a real loopback network with the real roles: a bootstrap, the coordinator's node
//! running the real conductor, three trainers from the start and a fourth started once every trainer has
//! applied round 10.
//!
//! The joiner arrives in the middle of a round it was never told of: the messages of that round are ignored
//! (`no-round`), not held against the peers that pass them on. It fetches the base it is assigned, trains the
//! next round it is named in and applies its commit like the others; no node rejects a message, and no node
//! scores an honest peer below zero.

mod net_support;

use std::time::Duration;

use net_support::*;

const HONEST: usize = 3;
/// The round every trainer has applied when the joiner starts.
const JOIN_AFTER: u64 = 10;
/// Rounds the conductor runs: the joiner's two rounds of grace, and one to spare.
const ROUNDS: u64 = JOIN_AFTER + 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_after_round_10_trains_within_two_rounds_and_nobody_is_penalised() {
    let mut net = RoundNet::start(HONEST).await;
    let conductor = net.conduct(ROUNDS, HONEST);
    let before = net
        .wait_trainers(
            Duration::from_secs(300),
            "every trainer applied round 10",
            |s| training(s).applied_round.is_some_and(|r| r >= JOIN_AFTER),
        )
        .await;
    let joined_in = before
        .iter()
        .filter_map(|s| s.current_round)
        .max()
        .expect("a round announced");

    let config = member_config(
        net.dir.path(),
        &net.boot,
        "node-late",
        net.coordinator.public_key(),
    );
    let late = net.add_trainer(config).await;
    let trained = wait_for(
        Duration::from_secs(180),
        "the late joiner trained a round",
        || async {
            let s = late.status().await.expect("status");
            // No training status until its trainer role has started: not yet, rather than a panic.
            let trained = s.training.as_ref().is_some_and(|t| t.rounds_trained >= 1);
            trained.then_some(s)
        },
    )
    .await;
    let round = trained.current_round.expect("a round");
    assert!(
        round <= joined_in + 2,
        "the joiner started in round {joined_in} and first trained round {round}"
    );
    wait_for(
        Duration::from_secs(120),
        "the late joiner applied the commit of the round it trained",
        || async {
            let s = late.status().await.expect("status");
            training(&s)
                .applied_round
                .is_some_and(|r| r >= round)
                .then_some(())
        },
    )
    .await;

    tokio::time::timeout(Duration::from_secs(300), conductor)
        .await
        .expect("the run ends in time")
        .expect("coordinator task")
        .expect("coordinator ran");
    let mut all = net.statuses().await;
    all.push(net.coordinator.status().await.expect("status"));
    for s in &all {
        let rejected_before = before
            .iter()
            .find(|b| b.peer_id == s.peer_id)
            .map_or(0, |b| b.rejected_messages);
        if s.peer_id != net.coordinator.peer_id().to_string() {
            assert_eq!(
                s.rejected_messages,
                rejected_before,
                "{} (the joiner: {}) rejected a message after the joiner came: {:?} from {:?}",
                s.peer_id,
                s.peer_id == late.peer_id().to_string(),
                s.rejections.by_reason,
                s.rejections.by_peer
            );
        }
    }
    assert_no_peer_scored_below_zero(&all, &[]);
    drop(late);
    net.stop().await;
}
