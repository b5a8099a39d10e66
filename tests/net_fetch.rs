//! Shard transfer: a node lacking a shard listed in a checkpoint manifest finds its provider in the DHT,
//! fetches it (50 MB, in chunks, several in flight), checks its blake3 hash, stores it and commits the round.
//! And a provider that serves wrong bytes is caught by the hash check: nothing is stored. One blob comes
//! from several providers at once, and hostile bulk-stream providers (trickling, oversized) cost only
//! themselves: their ranges come from an honest provider. Blob lanes (direct, AES-GCM sealed) carry the
//! ranges where a provider serves them, and bulk streams where it does not. A node whose store is at its
//! quota refuses a fetch with a clear error, keeps what it has, and fetches again once room comes back.

mod net_support;

use std::time::Duration;

use mana_node::keyfile;
use mana_node::net::libp2p::identity::Keypair as Libp2pKeypair;
use mana_node::net::{self, FetchResponse, NetConfig, NetEvent};
use mana_protocol::{
    Bytes, CheckpointManifest, ContentHash, Message, RangeRequest, RangeResponse, ShardEntry,
    ShardId,
};
use net_support::hostile_provider::{Hostile, hostile_provider};
use net_support::*;

const SHARD_BYTES: usize = 50 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_syncs_a_50mb_shard_from_a_peer_and_checks_its_hash() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();

    // Node A is the run's coordinator (its key is made first so both nodes can be told about it).
    let a_dir = dir.path().join("a");
    let coordinator = keyfile::generate(&a_dir.join("node.key"), false)
        .expect("key")
        .public();
    let mut a_config = node_config(&a_dir, &boot);
    a_config.coordinator = Some(coordinator);
    let a = start_node(a_config).await;
    let mut b_config = node_config(&dir.path().join("b"), &boot);
    b_config.coordinator = Some(coordinator);
    let b = start_node(b_config).await;

    let shard_bytes = pseudo_random_bytes(SHARD_BYTES, 7);
    let hash = a
        .host_blob(shard_bytes.clone())
        .await
        .expect("A hosts the shard");
    assert_eq!(hash, ContentHash::of(&shard_bytes));
    let shard = ShardId::expert(0, 3).expect("valid shard id");
    let manifest = Message::CheckpointManifest(CheckpointManifest {
        run: a_config_run(),
        round: 1,
        shards: vec![ShardEntry {
            shard,
            hash,
            size: SHARD_BYTES as u64,
            round: 1,
        }],
    });
    // Publishing fails until B's subscription has reached A.
    wait_for(
        Duration::from_secs(20),
        "the manifest to be published",
        || async { a.publish(&manifest).await.ok() },
    )
    .await;

    let status = wait_for(Duration::from_secs(45), "B to sync round 1", || async {
        let status = b.status().await.ok()?;
        (status.stored_round == Some(1)).then_some(status)
    })
    .await;
    assert_eq!(status.stored_shards.len(), 1);
    assert_eq!(status.stored_shards[0].hash, hash.to_string());
    assert_eq!(status.hosted_experts, vec!["expert/0/3".to_owned()]);
    let stored = b
        .store()
        .get_blob(&hash)
        .expect("B's copy reads back verified");
    assert_eq!(ContentHash::of(&stored), hash);
    assert_eq!(stored.len(), SHARD_BYTES);

    // The traffic counters saw the shard cross the wire (B read it, A wrote it) and the manifest's gossip.
    let (a_traffic, b_traffic) = (a.status().await.expect("status").traffic, status.traffic);
    println!("traffic: A {a_traffic:?}, B {b_traffic:?}");
    assert!(
        b_traffic.fetch_in >= SHARD_BYTES as u64,
        "B read the shard: {b_traffic:?}"
    );
    assert!(
        a_traffic.fetch_out >= SHARD_BYTES as u64,
        "A served the shard: {a_traffic:?}"
    );
    assert!(
        b_traffic.fetch_out > 0 && b_traffic.fetch_out < 1 << 20,
        "B sent only small requests: {b_traffic:?}"
    );
    assert!(
        a_traffic.gossip_out > 0 && b_traffic.gossip_in > 0,
        "gossip counted both ways"
    );

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
    let (liar, mut events, event_loop) =
        net::new(Libp2pKeypair::generate_ed25519(), config).expect("liar swarm");
    tokio::spawn(event_loop.run());
    let liar_serves = liar.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let NetEvent::InboundRequest {
                request, channel, ..
            } = event
            {
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
    wait_for(
        Duration::from_secs(20),
        "the liar to announce the blob",
        || async { liar.start_providing(hash.0.to_vec()).await.ok() },
    )
    .await;

    let result = b.fetch_blob(hash).await;
    let err = result.expect_err("a wrong blob must not be accepted");
    assert!(
        err.to_string().contains("hash mismatch"),
        "unexpected error: {err}"
    );
    assert!(
        !b.store().has_blob(&hash).expect("store readable"),
        "nothing stored"
    );

    b.shutdown().await.expect("shutdown");
    bootstrap.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_blob_is_fetched_from_three_providers_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let blob = pseudo_random_bytes(24 * 1024 * 1024 + 5, 13);
    let mut providers = Vec::new();
    for i in 0..3 {
        let node = start_node(node_config(&dir.path().join(format!("p{i}")), &boot)).await;
        node.host_blob_now(blob.clone()).await.expect("host");
        providers.push(node);
    }
    let mut config = node_config(&dir.path().join("b"), &boot);
    config.fetch.segment_bytes = 1024 * 1024; // 25 segments: enough for every provider to get some
    let b = start_node(config).await;
    for p in &providers {
        for addr in p.listen_addrs().await.expect("addresses") {
            b.net().dial(addr).await.expect("dial");
        }
    }
    let hash = ContentHash::of(&blob);
    let peers = providers.iter().map(|p| p.peer_id()).collect();
    assert_eq!(
        b.fetch_blob_from(hash, peers).await.expect("fetch"),
        blob.len() as u64
    );
    assert_eq!(b.read_blob(hash).await.expect("stored"), blob);
    let mut served = Vec::new();
    for p in &providers {
        served.push(p.status().await.expect("status").traffic.fetch_out);
    }
    assert!(
        served.iter().all(|&s| s >= 1024 * 1024),
        "every provider served at least a segment: {served:?}"
    );
    assert!(
        served.iter().sum::<u64>() >= blob.len() as u64,
        "the bytes came from them: {served:?}"
    );

    for node in providers.into_iter().chain([b]) {
        node.shutdown().await.expect("shutdown");
    }
    bootstrap.shutdown().await;
}

/// A fetcher asking more chunks at once than the provider answers for one peer (the provider's cap is 1,
/// the fetcher keeps 8 in flight) gets `busy` for the rest: those are asked again after a pause, never
/// counted as the provider's failures, and the blob arrives whole. (Counted as failures, three busy answers
/// dropped the only provider and the fetch failed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_answered_busy_are_asked_again_and_the_fetch_completes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let blob = pseudo_random_bytes(6 * 1024 * 1024 + 3, 23);
    let mut config = node_config(&dir.path().join("p"), &boot);
    config.net.limits.max_served_requests_per_peer = 1;
    let provider = start_node(config).await;
    provider.host_blob_now(blob.clone()).await.expect("host");
    let mut config = node_config(&dir.path().join("b"), &boot);
    config.fetch.bulk_streams = false; // request-response only: chunk requests, several in flight
    config.fetch.chunk_bytes = 256 * 1024;
    config.fetch.per_provider = 8;
    config.fetch.concurrency = 8;
    let b = start_node(config).await;
    for addr in provider.listen_addrs().await.expect("addresses") {
        b.net().dial(addr).await.expect("dial");
    }
    let hash = ContentHash::of(&blob);
    assert_eq!(
        b.fetch_blob_from(hash, vec![provider.peer_id()])
            .await
            .expect("fetch"),
        blob.len() as u64
    );
    assert_eq!(b.read_blob(hash).await.expect("stored"), blob);
    for node in [b, provider] {
        node.shutdown().await.expect("shutdown");
    }
    bootstrap.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_lanes_carry_ranges_where_served_and_bulk_streams_elsewhere() {
    use mana_node::net::bulk::RangeStream;
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let blob = pseudo_random_bytes(12 * 1024 * 1024 + 7, 19);
    let hash = ContentHash::of(&blob);
    let with_lane = start_node(node_config(&dir.path().join("lane"), &boot)).await;
    let mut config = node_config(&dir.path().join("streams"), &boot);
    config.net.blob_lane_port = None;
    let without_lane = start_node(config).await;
    let mut config = node_config(&dir.path().join("b"), &boot);
    config.fetch.segment_bytes = 1024 * 1024;
    let b = start_node(config).await;
    for p in [&with_lane, &without_lane] {
        p.host_blob_now(blob.clone()).await.expect("host");
        for addr in p.listen_addrs().await.expect("addresses") {
            b.net().dial(addr).await.expect("dial");
        }
    }

    // One range over each, the way a fetch asks for it.
    for (provider, lane) in [(&with_lane, true), (&without_lane, false)] {
        let mut stream = RangeStream::open(b.net(), provider.peer_id(), true)
            .await
            .expect("a ranged connection");
        assert_eq!(stream.is_lane(), lane, "a lane exactly where one is served");
        let header = stream
            .request(&RangeRequest {
                hash,
                offset: 3,
                len: 2 * 1024 * 1024 + 1,
            })
            .await
            .expect("a header");
        assert!(
            matches!(header, RangeResponse::Range { offset: 3, len, .. } if len == 2 * 1024 * 1024 + 1),
            "{header:?}"
        );
        let mut body = vec![0u8; 2 * 1024 * 1024 + 1];
        let (first, rest) = body.split_at_mut(1000); // reads need not match the provider's records
        stream.read_body(first).await.expect("body");
        stream.read_body(rest).await.expect("body");
        assert_eq!(body, blob[3..3 + body.len()]);
        let missing = stream
            .request(&RangeRequest {
                hash: ContentHash([9; 32]),
                offset: 0,
                len: 1,
            })
            .await
            .expect("an answer on the same connection");
        assert!(
            matches!(missing, RangeResponse::NotFound { .. }),
            "{missing:?}"
        );
    }

    // A whole fetch from both: each serves part of it.
    let before = [
        with_lane.status().await.expect("status").traffic.fetch_out,
        without_lane
            .status()
            .await
            .expect("status")
            .traffic
            .fetch_out,
    ];
    let peers = vec![with_lane.peer_id(), without_lane.peer_id()];
    assert_eq!(
        b.fetch_blob_from(hash, peers).await.expect("fetch"),
        blob.len() as u64
    );
    assert_eq!(b.read_blob(hash).await.expect("stored"), blob);
    let lane_served = with_lane.status().await.expect("status").traffic.fetch_out - before[0];
    let stream_served = without_lane
        .status()
        .await
        .expect("status")
        .traffic
        .fetch_out
        - before[1];
    assert!(
        lane_served >= 1024 * 1024 && stream_served >= 1024 * 1024,
        "both served segments: lane {lane_served}, streams {stream_served}"
    );

    for node in [b, with_lane, without_lane] {
        node.shutdown().await.expect("shutdown");
    }
    bootstrap.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_and_oversized_providers_are_dropped_and_their_ranges_come_from_an_honest_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let blob = pseudo_random_bytes(6 * 1024 * 1024 + 3, 17);
    let hash = ContentHash::of(&blob);
    let honest = start_node(node_config(&dir.path().join("honest"), &boot)).await;
    honest.host_blob_now(blob.clone()).await.expect("host");
    let trickler = hostile_provider(&boot, Hostile::Trickle).await;
    let oversized = hostile_provider(&boot, Hostile::Oversized).await;
    for p in [&trickler, &oversized] {
        p.claim(hash, blob.len() as u64).await;
    }

    let mut config = node_config(&dir.path().join("b"), &boot);
    config.fetch.segment_bytes = 1024 * 1024;
    config.fetch.segment_timeout = Duration::from_secs(2); // the trickler never finishes a segment
    let b = start_node(config).await;
    let mut peers = Vec::new();
    for p in [&trickler, &oversized] {
        b.net().dial(p.addr.clone()).await.expect("dial");
        peers.push(p.peer);
    }
    for addr in honest.listen_addrs().await.expect("addresses") {
        b.net().dial(addr).await.expect("dial");
    }
    peers.push(honest.peer_id());
    assert_eq!(
        b.fetch_blob_from(hash, peers)
            .await
            .expect("fetched from the honest provider"),
        blob.len() as u64
    );
    assert_eq!(b.read_blob(hash).await.expect("stored"), blob);
    let served = honest.status().await.expect("status").traffic.fetch_out;
    assert!(
        served >= blob.len() as u64,
        "every range the hostile ones held came from the honest one: {served}"
    );

    b.shutdown().await.expect("shutdown");
    honest.shutdown().await.expect("shutdown");
    bootstrap.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_at_its_store_quota_refuses_a_fetch_and_recovers_when_room_comes_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let provider = start_node(node_config(&dir.path().join("provider"), &boot)).await;
    let mut cfg = node_config(&dir.path().join("full"), &boot);
    cfg.store_quota = Some(100_000);
    let full = start_node(cfg).await;

    let kept = provider
        .host_blob(pseudo_random_bytes(60_000, 40))
        .await
        .expect("hosted");
    let next = provider
        .host_blob(pseudo_random_bytes(60_000, 42))
        .await
        .expect("hosted");
    let fetch = |hash: ContentHash| {
        let full = &full;
        let provider = provider.peer_id();
        async move {
            wait_for(Duration::from_secs(30), "the fetch ends", || async {
                match full.fetch_blob_from(hash, vec![provider]).await {
                    Ok(len) => Some(Ok(len)),
                    Err(e) if e.to_string().contains("full") => Some(Err(e.to_string())),
                    // The provider may not be connected yet: try again.
                    Err(_) => None,
                }
            })
            .await
        }
    };
    assert_eq!(fetch(kept).await, Ok(60_000));
    let refused = fetch(next).await.expect_err("past the quota");
    assert!(refused.contains("the store is full"), "{refused}");
    assert!(refused.contains("--store-quota"), "{refused}");
    // Nothing it held was touched, and the refusal is visible in its status.
    assert_eq!(
        full.store().get_blob(&kept).expect("kept blob intact"),
        pseudo_random_bytes(60_000, 40)
    );
    let status = full.status().await.expect("status");
    assert_eq!(status.store_quota, Some(100_000));
    assert_eq!(
        status.store_bytes, 60_000,
        "the refused write gave its bytes back"
    );

    // Room comes back (the kept blob released and collected): the same fetch now succeeds.
    full.unpin(&[kept]);
    full.store().gc().expect("gc");
    assert_eq!(fetch(next).await, Ok(60_000));
    full.shutdown().await.expect("stops");
    provider.shutdown().await.expect("stops");
    bootstrap.shutdown().await;
}
