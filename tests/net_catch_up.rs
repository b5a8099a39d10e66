//! Nothing that is missed is lost (issue #14, section 1), on a real loopback network with the real roles: a
//! bootstrap, the coordinator's node running the real conductor for two honest rounds, and three trainers.
//!
//! Then every trainer misses an announcement: the test, as the coordinator (it publishes through the
//! coordinator's own node, which signs with the coordinator's key), announces round 4 after round 2, as a
//! network that slept or lost round 3's announcement would see it. Every trainer takes round 4 and trains it
//! (before, a round more than one ahead was refused as `future-round` and the trainer was wedged until it
//! restarted). A commit for a round whose announcement was missed is taken too. Messages for a round ahead of a
//! node are ignored, never held against the honest peer that passed them on: no trainer rejects a message,
//! and no peer's gossip score falls below zero.

mod net_support;

use std::time::Duration;

use mana_node::roles::common::publish_patiently;
use mana_protocol::{Message, RoundCommit, ShardId};
use net_support::*;

const HONEST: usize = 3;
const HONEST_ROUNDS: u64 = 2;
/// The round the test announces next: round 3's announcement is the one every node missed.
const SKIPPED_TO: u64 = HONEST_ROUNDS + 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainers_catch_up_after_a_missed_announcement_and_nobody_is_penalised() {
    let net = RoundNet::start(HONEST).await;
    let seen_by_trainer = Heard::listen(&net.trainers[0].0);
    let seen_by_coordinator = Heard::listen(&net.coordinator);

    let before = net.honest_rounds(HONEST_ROUNDS, HONEST).await;
    let (honest_ann, honest_commit) = seen_by_trainer.round(HONEST_ROUNDS);

    // Round 3 was never heard of: the next announcement every node sees is round 4's.
    let base = honest_commit.checkpoint.clone();
    let ann = next_announcement(&honest_ann, SKIPPED_TO, &base);
    net.announce(&ann).await;
    wait_for(
        Duration::from_secs(60),
        "every trainer trained the round after the one it missed",
        || async {
            let now = net.statuses().await;
            now.iter()
                .zip(&before)
                .all(|(a, b)| {
                    a.current_round == Some(SKIPPED_TO)
                        && training(a).rounds_trained == training(b).rounds_trained + 1
                })
                .then_some(())
        },
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "every trainer's trunk delta of round 4",
        || async {
            let mut signers = seen_by_coordinator.find(|m| match &m.message {
                Message::DeltaAnnouncement(d)
                    if d.round == SKIPPED_TO && d.shard == ShardId::Trunk =>
                {
                    Some(m.signer)
                }
                _ => None,
            });
            signers.sort();
            signers.dedup();
            (signers.len() == HONEST).then_some(())
        },
    )
    .await;

    // A commit whose announcement was missed (round 6 while the nodes are at round 4) is taken: it names the
    // checkpoint every holder moves to. Here it changes nothing (no delta accepted), so nobody disputes it.
    let mut checkpoint = base.clone();
    checkpoint.round = SKIPPED_TO + 2;
    let commit = RoundCommit {
        round: SKIPPED_TO + 2,
        accepted: Vec::new(),
        rejected: Vec::new(),
        checkpoint,
        ..honest_commit.clone()
    };
    publish_patiently(
        &net.coordinator,
        &Message::RoundCommit(commit),
        Duration::from_secs(10),
    )
    .await
    .expect("round 6 committed");
    wait_for(
        Duration::from_secs(30),
        "the commit of a round whose announcement was missed",
        || async {
            (!seen_by_trainer
                .find(|m| match &m.message {
                    Message::RoundCommit(c) if c.round == SKIPPED_TO + 2 => Some(()),
                    _ => None,
                })
                .is_empty())
            .then_some(())
        },
    )
    .await;

    // Nothing of this was held against anyone: no trainer rejected a message, none scores a peer below zero.
    let now = net.statuses().await;
    for s in &now {
        let before = before
            .iter()
            .find(|b| b.peer_id == s.peer_id)
            .expect("same trainer");
        assert_eq!(
            s.rejected_messages, before.rejected_messages,
            "{} rejected a message of a round ahead of it",
            s.peer_id
        );
    }
    assert_no_peer_scored_below_zero(&now, &[]);
    net.stop().await;
}
