//! The DHT's provider records stay bounded (issue #14, section 2): a node announces only the blobs its store
//! holds and withdraws each one the store drops, and other peers' records it keeps are counted (and dropped
//! as they expire). Before, nothing was ever withdrawn and libp2p's default store (1,024 keys) filled after
//! about 65 rounds of a 4-node demo, after which no new blob was announced.

mod net_support;

use std::time::Duration;

use net_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_the_store_drops_is_withdrawn_from_the_dht() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let a = start_node(node_config(&dir.path().join("a"), &boot)).await;
    let z = start_node(node_config(&dir.path().join("z"), &boot)).await;
    wait_for(Duration::from_secs(30), "a and z meet", || async {
        let s = z.status().await.ok()?;
        s.peers
            .iter()
            .any(|p| p.peer_id == a.peer_id().to_string())
            .then_some(())
    })
    .await;

    let mut hashes = Vec::new();
    for seed in [10, 20, 30] {
        let blob = pseudo_random_bytes(10_000, seed);
        hashes.push(a.host_blob(blob).await.expect("hosted"));
    }
    wait_for(
        Duration::from_secs(30),
        "a announces its 3 blobs",
        || async { (a.status().await.ok()?.dht_provided == 3).then_some(()) },
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "z keeps a's provider records",
        || async { (z.status().await.ok()?.dht_provider_records >= 3).then_some(()) },
    )
    .await;

    // Two blobs are released and collected: a withdraws them; the third is still announced and fetched.
    a.unpin(&hashes[..2]);
    let report = a.store().gc().expect("gc");
    assert_eq!(report.blobs_removed, 2);
    wait_for(
        Duration::from_secs(30),
        "a withdraws the blobs its store dropped",
        || async { (a.status().await.ok()?.dht_provided == 1).then_some(()) },
    )
    .await;
    let len = z
        .fetch_blob(hashes[2])
        .await
        .expect("the kept blob is found");
    assert_eq!(len, 10_000);

    z.shutdown().await.expect("z stops");
    a.shutdown().await.expect("a stops");
    bootstrap.shutdown().await;
}
