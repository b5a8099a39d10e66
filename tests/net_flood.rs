//! A node whose event queue overflows at an announcement rejoins within two rounds, and nobody is penalised
//! for it (issue #14, sections 1 and 4), on a real loopback network with the real roles: a bootstrap, the
//! coordinator's node running the real conductor, three trainers, and a flooder.
//!
//! The flooder is a bare swarm that publishes bursts of evaluations on the rounds topic, signed two minutes in
//! the past: every node ignores them (clock skew: nothing provably invalid, so nobody's score falls), but
//! each one must be judged. (A flood of heartbeats no longer does this: heartbeats wait in a queue of their
//! own, behind everything else, and only they are dropped when it is full; see `mana_node::net::events`.)
//! The victim's queue of network events waiting for its daemon is made as small as it gets
//! (`event_queue = 1`) and its per-peer gossip rate limit is lifted, so the bursts fill the queue (in
//! production the rate limit and the 1024-event default make many flooders or a slow machine necessary). The
//! flood runs from a commit until the other trainers are in the next announced round: while the queue is
//! full, what the network sends the victim is ignored, the announcement with it when it arrives then, and
//! that message is never delivered again. Whether the announcement found room is chance, so the flood spans
//! up to three announcements until one is missed. (Since the daemon's event task does nothing but events, it
//! empties the one-event queue so fast that the announcement found room in all of 4 runs, against about half
//! before; `net_catch_up.rs` checks the missed announcement itself, deterministically.) Once the flood ends,
//! the victim trains again within two rounds, no node rejects a message, and no node scores an honest peer
//! below zero. (It found one: a node that missed an announcement rejected the other holders' reports of
//! that round as `not-coordinator`, lowering their scores; they are now ignored as `future-round`.)

mod net_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mana_node::daemon::now_ms;
use mana_node::net::libp2p::identity::Keypair as Libp2pKeypair;
use mana_node::net::{self, NetConfig};
use mana_protocol::{Keypair, SignedEnvelope, TopicKind, topic};
use net_support::*;

const HONEST: usize = 3;
/// The trainer whose queue is flooded.
const VICTIM: usize = 0;
/// Announcements the flood may span before the victim misses one.
const TRIES: u64 = 3;
/// Rounds the conductor runs: the flood starts in round 1 or 2, spans up to TRIES announcements, and two
/// more rounds must follow it.
const ROUNDS: u64 = 2 + TRIES + 3;
/// Bare swarms flooding at once.
const FLOODERS: usize = 3;
/// Messages per burst; the victim's queue holds one event.
const BURST: u64 = 200;

/// An evaluation (of a made-up checkpoint, numbered `seq` so that each is a new message) signed two minutes ago
/// by `key`: every node ignores it (clock skew), after judging it.
fn stale_evaluation(key: &Keypair, run: &mana_protocol::RunId, seq: u64) -> Vec<u8> {
    let mut checkpoint = [0u8; 32];
    checkpoint[..8].copy_from_slice(&seq.to_le_bytes());
    let message = mana_protocol::Message::Evaluation(mana_protocol::Evaluation {
        run: run.clone(),
        round: 1,
        checkpoint: mana_protocol::ContentHash(checkpoint),
        batches: 1,
        val_loss: 1.0,
    });
    SignedEnvelope::sign(key, &message, now_ms() - 120_000)
        .expect("sign")
        .encode()
        .expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_flooded_at_an_announcement_rejoins_within_two_rounds_and_nobody_is_penalised() {
    let net = RoundNet::start_with(HONEST, |name, config| {
        if name == format!("node-{VICTIM}") {
            config.net.limits.event_queue = 1;
            config.net.limits.gossip_per_second = 1_000_000;
            config.net.limits.gossip_burst = 1_000_000;
        }
    })
    .await;
    let run = NetConfig::for_tests().run_id;
    let rounds = topic(&run, TopicKind::Rounds);

    let mut flooders = Vec::new();
    for _ in 0..FLOODERS {
        let mut config = NetConfig::for_tests();
        config.bootstrap = net.boot.clone();
        let (flooder, _events, event_loop) =
            net::new(Libp2pKeypair::generate_ed25519(), config).expect("swarm");
        tokio::spawn(event_loop.run());
        flooder.subscribe(rounds.clone()).await.expect("subscribe");
        flooders.push(flooder);
    }
    let flooder_ids: Vec<String> = flooders
        .iter()
        .map(|f| f.local_peer_id().to_string())
        .collect();

    let conductor = net.conduct(ROUNDS, HONEST);
    let victim = net.trainers[VICTIM].0.clone();
    let others = |all: &[mana_node::daemon::NodeStatus]| {
        all.iter()
            .enumerate()
            .filter(|(i, _)| *i != VICTIM)
            .map(|(_, s)| s.clone())
            .collect::<Vec<_>>()
    };
    let before = net
        .wait_trainers(
            Duration::from_secs(180),
            "every trainer applied round 1",
            |s| training(s).applied_round.is_some_and(|r| r >= 1),
        )
        .await;
    let flooded_from = before
        .iter()
        .filter_map(|s| s.current_round)
        .max()
        .expect("a round announced");

    // The flood: bursts of stale evaluations, each burst far more than the victim's queue holds.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let floods: Vec<_> = flooders
        .into_iter()
        .map(|flooder| {
            let (stop, published, topic_name, run) =
                (stop.clone(), published.clone(), rounds.clone(), run.clone());
            tokio::spawn(async move {
                let key = Keypair::generate().expect("key");
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..BURST {
                        seq += 1;
                        let bytes = stale_evaluation(&key, &run, seq);
                        if flooder.publish(topic_name.clone(), bytes).await.is_ok() {
                            published.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    // Until the others are in a round announced during the flood; whether the victim's copy of that
    // announcement found room in its queue is chance, so the flood goes on over up to TRIES announcements
    // until one is missed.
    let mut flooded_round = flooded_from;
    let mut during;
    let mut tries = 0;
    loop {
        flooded_round += 1;
        tries += 1;
        during = wait_for(
            Duration::from_secs(180),
            "the other trainers in the round announced during the flood",
            || async {
                let all = net.statuses().await;
                others(&all)
                    .iter()
                    .all(|s| s.current_round.is_some_and(|r| r >= flooded_round))
                    .then_some(all)
            },
        )
        .await;
        let victim_now = victim.status().await.expect("status");
        if tries == TRIES || victim_now.current_round.is_none_or(|r| r < flooded_round) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for flood in floods {
        flood.await.expect("flood task");
    }
    let victim_during = victim.status().await.expect("status");
    let missed = victim_during
        .current_round
        .is_none_or(|r| r < flooded_round);
    eprintln!(
        "flood over {tries} announcement(s): {} evaluations published; the victim dropped {} events, ignored {} messages, and {} the announcement of round {flooded_round}",
        published.load(Ordering::Relaxed),
        victim_during.dropped_events,
        victim_during.ignored_messages - before[VICTIM].ignored_messages,
        if missed { "missed" } else { "still got" },
    );
    assert!(
        victim_during.dropped_events > 0,
        "the flood never filled the victim's event queue"
    );
    let round_at_end = others(&during)
        .iter()
        .filter_map(|s| s.current_round)
        .max()
        .expect("others in a round");

    // Within two rounds of the flood's end, the victim trains again.
    let trained_before = training(&victim_during).rounds_trained;
    let back = wait_for(
        Duration::from_secs(240),
        "the flooded trainer trained a round after the flood",
        || async {
            let s = victim.status().await.expect("status");
            (training(&s).rounds_trained > trained_before).then_some(s)
        },
    )
    .await;
    let back_round = back.current_round.expect("a round");
    assert!(
        back_round <= round_at_end + 2,
        "the flooded trainer rejoined at round {back_round}, more than two rounds after round {round_at_end}"
    );

    tokio::time::timeout(Duration::from_secs(300), conductor)
        .await
        .expect("the run ends in time")
        .expect("coordinator task")
        .expect("coordinator ran");

    // Nothing of this was held against an honest peer: no trainer rejected a message, and neither a trainer
    // nor the coordinator scores an honest peer below zero (the flooder's own score is its business).
    let mut all = net.statuses().await;
    all.push(net.coordinator.status().await.expect("status"));
    for s in &all {
        if let Some(b) = before.iter().find(|b| b.peer_id == s.peer_id) {
            assert_eq!(
                s.rejected_messages, b.rejected_messages,
                "{} rejected a message during or after the flood: {:?}",
                s.peer_id, s.rejections.by_reason
            );
        }
    }
    assert_no_peer_scored_below_zero(&all, &flooder_ids);
    drop(victim);
    net.stop().await;
}
