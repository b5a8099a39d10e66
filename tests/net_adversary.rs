//! A peer that sends invalid gossip (garbage, a bad signature, an oversized envelope, a replay) has every
//! such message rejected with its reason logged, loses gossipsub score (below the publish threshold), while
//! honest traffic between the other nodes goes on.
//!
//! Every step waits on a condition (a subscription seen, a rejection logged) with a generous deadline, never
//! on a fixed sleep alone, so a loaded machine slows the test down without failing it.

mod net_support;

use std::collections::BTreeMap;
use std::time::Duration;

use mana_node::net::libp2p::identity::Keypair as Libp2pKeypair;
use mana_node::net::{self, NetConfig, NetEvent, Verdict};
use mana_protocol::{Keypair, Message, SignedEnvelope, TopicKind, decode_envelope, topic};
use net_support::*;
use tokio::sync::mpsc;

/// How long any one step may take on a loaded machine.
const STEP: Duration = Duration::from_secs(60);

/// gossipsub's publish threshold in mana's scoring (see node/src/net/behaviour.rs): below it a peer gets no
/// gossip and no published messages from us, and a negative score prunes it from our mesh.
const PUBLISH_THRESHOLD: f64 = -50.0;

/// The duplicate caches of this test's nodes: short, so a replay reaches the replay check.
const REPLAY_CACHE: Duration = Duration::from_secs(2);

fn heartbeat(run: &mana_protocol::RunId) -> Message {
    idle_heartbeat(run, 1, "attacker")
}

use mana_node::daemon::now_ms;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_gossip_is_rejected_and_costs_the_sender_score() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    // Duplicate caches of 2 s (production keeps 120 s, past the clock window), so that the replay below gets
    // past them to A's replay check within the test.
    let short_cache = |name: &str| {
        let mut config = node_config(&dir.path().join(name), &boot);
        config.net.duplicate_cache_time = REPLAY_CACHE;
        config
    };
    let a = start_node(short_cache("a")).await;
    let b = start_node(short_cache("b")).await;
    let run = NetConfig::for_tests().run_id;
    let heartbeats = topic(&run, TopicKind::Heartbeats);

    // The attacker: a bare swarm that may publish up to 1 MiB, subscribed to the heartbeat topic.
    let mut config = NetConfig::for_tests();
    config.duplicate_cache_time = REPLAY_CACHE;
    config.bootstrap = boot.clone();
    config.limits.max_gossip_bytes = 1024 * 1024;
    let (mallory, mut events, event_loop) =
        net::new(Libp2pKeypair::generate_ed25519(), config).expect("swarm");
    let mallory_id = mallory.local_peer_id().to_string();
    tokio::spawn(event_loop.run());
    mallory
        .subscribe(heartbeats.clone())
        .await
        .expect("subscribe");
    // Mallory passes on what it hears (like an honest peer), keeps copies for replaying, and notes which peers
    // subscribed to the heartbeat topic.
    let (heard_tx, mut heard) = mpsc::channel::<Vec<u8>>(64);
    let (subscribed_tx, mut subscribed) = mpsc::unbounded_channel::<String>();
    let reporter = mallory.clone();
    let heartbeat_topic = heartbeats.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                NetEvent::Gossip {
                    id, source, data, ..
                } => {
                    let _ = reporter.report(id, source, Verdict::Accept).await;
                    let _ = heard_tx.try_send(data);
                }
                NetEvent::Subscribed { peer, topic } if topic == heartbeat_topic => {
                    let _ = subscribed_tx.send(peer.to_string());
                }
                _ => {}
            }
        }
    });

    // Mallory connects to A directly, and A's subscription must have reached it before it publishes.
    for addr in a.listen_addrs().await.expect("addrs") {
        mallory.dial(addr).await.expect("dial A");
    }
    wait_for(STEP, "A to see mallory", || async {
        let snap = a.net().snapshot().await.ok()?;
        snap.peers
            .iter()
            .any(|p| p.peer_id == mallory_id)
            .then_some(())
    })
    .await;
    // Mallory's messages must go to A itself (not only to B, which would drop them unforwarded): wait until
    // A's subscription has reached Mallory.
    let a_id = a.peer_id().to_string();
    tokio::time::timeout(STEP, async {
        while subscribed.recv().await.expect("mallory's event task runs") != a_id {}
    })
    .await
    .expect("A's heartbeat subscription reaches mallory");

    // An honest heartbeat of B, kept for replaying later. (B's: a replay of A's own message would be dropped by
    // A's gossipsub as self-origin before validation.) Kept before the attack: once Mallory's score falls, its
    // peers stop passing it gossip.
    let b_key = b.public_key();
    let honest = tokio::time::timeout(STEP, async {
        loop {
            let data = heard.recv().await.expect("channel open");
            if decode_envelope(&data)
                .map(|e| e.signer == b_key)
                .unwrap_or(false)
            {
                break data;
            }
        }
    })
    .await
    .expect("mallory hears an honest heartbeat of B");

    // Each invalid message costs Mallory 5 x (its count of them)² at A: the graylist (-80, where A stops
    // hearing it) lies past the fourth. Three go first, the replay last, so that all four are heard.
    // 1. Garbage.
    wait_for(STEP, "mallory to publish garbage", || async {
        mallory
            .publish(heartbeats.clone(), b"definitely not an envelope".to_vec())
            .await
            .ok()
    })
    .await;
    // 2. A well-formed envelope with a broken signature.
    let key = Keypair::generate().expect("key");
    let mut forged = SignedEnvelope::sign(&key, &heartbeat(&run), now_ms()).expect("sign");
    forged.signature.0[0] ^= 0x01;
    mallory
        .publish(heartbeats.clone(), forged.encode().expect("encode"))
        .await
        .expect("publish forged");
    // 3. An envelope-sized blob over the 256 KiB envelope cap.
    mallory
        .publish(heartbeats.clone(), vec![0x01; 300 * 1024])
        .await
        .expect("publish oversized");
    // 4. The replay of B's heartbeat. It must pass both gossipsub duplicate caches (Mallory's refuses to
    // publish it, A's drops it unjudged) before A's replay window can catch it. The caches forget after 2 s in
    // tests, but only at a gossipsub heartbeat, which a loaded machine delays: so try again every few seconds
    // until A logs it. (B itself refuses the copy Mallory sends it, as its own message: it does not pass it on.)
    wait_for(STEP, "A to reject mallory's replay", || {
        let (honest, heartbeats, mallory, a, mallory_id) =
            (&honest, &heartbeats, &mallory, &a, &mallory_id);
        async move {
            let logged = |status: &mana_node::daemon::NodeStatus| {
                status.rejections.by_peer.iter().any(|p| {
                    p.peer == *mallory_id && p.reasons.iter().any(|r| r.reason == "replayed")
                })
            };
            if logged(&a.status().await.ok()?) {
                return Some(());
            }
            tokio::time::sleep(Duration::from_millis(2600)).await;
            // A refusal here is Mallory's own duplicate cache: the next try goes again. A replay that went out
            // gets a long while to be judged before another is sent.
            mallory
                .publish(heartbeats.clone(), honest.clone())
                .await
                .ok()?;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if logged(&a.status().await.ok()?) {
                    return Some(());
                }
            }
            None
        }
    })
    .await;
    // A rejected each of them, blaming Mallory, with the right reasons.
    let reasons = wait_for(STEP, "A to log every rejection", || async {
        let status = a.status().await.ok()?;
        let by_peer: Vec<_> = status
            .rejections
            .by_peer
            .iter()
            .map(|p| {
                (
                    &p.peer,
                    p.reasons
                        .iter()
                        .map(|r| (r.reason.as_str(), r.entry.count))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        println!(
            "A: {} rejected (mallory is {mallory_id}); by peer {by_peer:?}",
            status.rejected_messages
        );
        let from_mallory = status
            .rejections
            .by_peer
            .iter()
            .find(|p| p.peer == mallory_id)?;
        let reasons: BTreeMap<String, u64> = from_mallory
            .reasons
            .iter()
            .map(|r| (r.reason.clone(), r.entry.count))
            .collect();
        let enough = reasons.get("bad-envelope").copied().unwrap_or(0) >= 2
            && reasons.contains_key("too-large")
            && reasons.contains_key("replayed");
        enough.then_some(reasons)
    })
    .await;
    println!("rejections of mallory at A: {reasons:?}");

    // Mallory keeps sending garbage: its score at A falls below the publish threshold (gossipsub counts only
    // some of the rejections above at once, and decays the count); B's does not go negative.
    let b_id = b.peer_id().to_string();
    let mut more = 0u32;
    wait_for(STEP, "mallory's score to fall", || {
        more += 1;
        let (n, mallory, heartbeats, a, mallory_id, b_id) =
            (more, &mallory, &heartbeats, &a, &mallory_id, &b_id);
        async move {
            let _ = mallory
                .publish(heartbeats.clone(), format!("garbage #{n}").into_bytes())
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let snap = a.net().snapshot().await.ok()?;
            let score = |id: &str| {
                snap.peers
                    .iter()
                    .find(|p| p.peer_id == id)
                    .and_then(|p| p.gossip_score)
            };
            let (m, b) = (score(&mallory_id)?, score(&b_id)?);
            println!("scores at A: mallory {m:.1}, b {b:.1}");
            (m < PUBLISH_THRESHOLD && b >= 0.0).then_some(())
        }
    })
    .await;

    // Nothing was blamed on B: it refused the replay of its own heartbeat instead of passing it on.
    let status = a.status().await.expect("status");
    assert!(
        status.rejections.by_peer.iter().all(|p| p.peer != b_id),
        "A blamed the honest B: {:?}",
        status.rejections.by_peer
    );

    // Honest traffic goes on: A still accepts B's heartbeats.
    let mut accepted = a.accepted();
    tokio::time::timeout(STEP, async {
        loop {
            if let Ok(msg) = accepted.recv().await {
                if msg.signer == b_key {
                    break;
                }
            }
        }
    })
    .await
    .expect("A accepts B's heartbeats after the attack");

    a.shutdown().await.expect("shutdown");
    b.shutdown().await.expect("shutdown");
    bootstrap.shutdown().await;
}
