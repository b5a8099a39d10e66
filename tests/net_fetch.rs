//! Shard transfer: a node lacking a shard listed in a checkpoint manifest finds its provider in the DHT,
//! fetches it (50 MB, in chunks, several in flight), checks its blake3 hash, stores it and commits the round.
//! And a provider that serves wrong bytes is caught by the hash check: nothing is stored.

mod net_support;

use std::time::Duration;

use mana_node::keyfile;
use mana_node::net::libp2p::identity::Keypair as Libp2pKeypair;
use mana_node::net::{self, FetchResponse, NetConfig, NetEvent};
use mana_protocol::{Bytes, CheckpointManifest, ContentHash, Message, ShardEntry, ShardId};
use net_support::*;

const SHARD_BYTES: usize = 50 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_syncs_a_50mb_shard_from_a_peer_and_checks_its_hash() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();

    // Node A is the run's coordinator (its key is made first so both nodes can be told about it).
    let a_dir = dir.path().join("a");
    let coordinator = keyfile::generate(&a_dir.join("node.key"), false).expect("key").public();
    let mut a_config = node_config(&a_dir, &boot);
    a_config.coordinator = Some(coordinator);
    let a = start_node(a_config).await;
    let mut b_config = node_config(&dir.path().join("b"), &boot);
    b_config.coordinator = Some(coordinator);
    let b = start_node(b_config).await;

    let shard_bytes = pseudo_random_bytes(SHARD_BYTES, 7);
    let hash = a.host_blob(shard_bytes.clone()).await.expect("A hosts the shard");
    assert_eq!(hash, ContentHash::of(&shard_bytes));
    let shard = ShardId::expert(0, 3).expect("valid shard id");
    let manifest = Message::CheckpointManifest(CheckpointManifest {
        run: a_config_run(),
        round: 1,
        shards: vec![ShardEntry { shard, hash, size: SHARD_BYTES as u64, round: 1 }],
    });
    // Publishing fails until B's subscription has reached A.
    wait_for(Duration::from_secs(20), "the manifest to be published", || async {
        a.publish(&manifest).await.ok()
    })
    .await;

    let status = wait_for(Duration::from_secs(45), "B to sync round 1", || async {
        let status = b.status().await.ok()?;
        (status.stored_round == Some(1)).then_some(status)
    })
    .await;
    assert_eq!(status.stored_shards.len(), 1);
    assert_eq!(status.stored_shards[0].hash, hash.to_string());
    assert_eq!(status.hosted_experts, vec!["expert/0/3".to_owned()]);
    let stored = b.store().get_blob(&hash).expect("B's copy reads back verified");
    assert_eq!(ContentHash::of(&stored), hash);
    assert_eq!(stored.len(), SHARD_BYTES);

    // The traffic counters saw the shard cross the wire (B read it, A wrote it) and the manifest's gossip.
    let (a_traffic, b_traffic) = (a.status().await.expect("status").traffic, status.traffic);
    println!("traffic: A {a_traffic:?}, B {b_traffic:?}");
    assert!(b_traffic.fetch_in >= SHARD_BYTES as u64, "B read the shard: {b_traffic:?}");
    assert!(a_traffic.fetch_out >= SHARD_BYTES as u64, "A served the shard: {a_traffic:?}");
    assert!(b_traffic.fetch_out > 0 && b_traffic.fetch_out < 1 << 20, "B sent only small requests: {b_traffic:?}");
    assert!(a_traffic.gossip_out > 0 && b_traffic.gossip_in > 0, "gossip counted both ways");

    a.shutdown().await.expect("shutdown");
    b.shutdown().await.expect("shutdown");
    bootstrap.shutdown().await;
}

fn a_config_run() -> mana_protocol::RunId {
    NetConfig::for_tests().run_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_serving_wrong_bytes_is_caught_and_nothing_is_stored() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let b = start_node(node_config(&dir.path().join("b"), &boot)).await;

    // A liar: announces a blob it does not have and serves other bytes of the right length.
    let wanted = pseudo_random_bytes(3 * 1024 * 1024 + 17, 11);
    let hash = ContentHash::of(&wanted);
    let mut config = NetConfig::for_tests();
    config.bootstrap = boot.clone();
    let (liar, mut events, event_loop) = net::new(Libp2pKeypair::generate_ed25519(), config).expect("liar swarm");
    tokio::spawn(event_loop.run());
    let liar_serves = liar.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let NetEvent::InboundRequest { request, channel, .. } = event {
                let start = request.offset as usize;
                let end = (start + request.max_len as usize).min(wanted.len());
                let mut data = wanted[start.min(end)..end].to_vec();
                if let Some(byte) = data.first_mut() {
                    *byte ^= 0xff; // one flipped byte per chunk
                }
                let response = FetchResponse::Chunk {
                    hash: request.hash,
                    offset: request.offset,
                    total_size: wanted.len() as u64,
                    data: Bytes(data),
                };
                let _ = liar_serves.respond(channel, response).await;
            }
        }
    });
    wait_for(Duration::from_secs(20), "the liar to announce the blob", || async {
        liar.start_providing(hash.0.to_vec()).await.ok()
    })
    .await;

    let result = b.fetch_blob(hash).await;
    let err = result.expect_err("a wrong blob must not be accepted");
    assert!(err.to_string().contains("hash mismatch"), "unexpected error: {err}");
    assert!(!b.store().has_blob(&hash).expect("store readable"), "nothing stored");

    b.shutdown().await.expect("shutdown");
    bootstrap.shutdown().await;
}
