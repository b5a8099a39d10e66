//! A node restarts and finds its store intact: same identity, the committed round and its shard still
//! there (hash-verified), announced again in the DHT so a new peer can fetch it, and `mana node
//! --verify-store` (the real binary) finds nothing wrong.

mod net_support;

use mana_protocol::ShardId;
use std::process::Command;
use std::time::Duration;

use mana_node::store::{ManifestEntry, RoundManifest};
use mana_protocol::ContentHash;
use net_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_keeps_identity_and_store_and_serves_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let a_dir = dir.path().join("a");

    let shard = pseudo_random_bytes(4 * 1024 * 1024 + 3, 5);
    let hash = ContentHash::of(&shard);
    let a = start_node(node_config(&a_dir, &boot)).await;
    let first_id = a.peer_id();
    assert_eq!(a.host_blob(shard.clone()).await.expect("host"), hash);
    let manifest = RoundManifest {
        entries: vec![ManifestEntry {
            shard: ShardId::Expert { layer: 1, index: 2 },
            hash: hash,
            len: shard.len() as u64,
        }],
        meta: Vec::new(),
    };
    a.store()
        .commit_round(1, &manifest)
        .expect("commit round 1");
    a.shutdown().await.expect("clean shutdown");

    // The real binary checks the stopped node's store.
    let out = Command::new(env!("CARGO_BIN_EXE_mana"))
        .args(["node", "--verify-store", "--data-dir"])
        .arg(&a_dir)
        .output()
        .expect("mana runs");
    assert!(
        out.status.success(),
        "verify-store failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    let a = start_node(node_config(&a_dir, &boot)).await;
    assert_eq!(a.peer_id(), first_id, "the key file keeps the identity");
    let status = a.status().await.expect("status");
    assert_eq!(status.stored_round, Some(1));
    assert_eq!(status.hosted_experts, vec!["expert/1/2".to_owned()]);
    assert_eq!(a.store().get_blob(&hash).expect("verified read"), shard);

    // A newcomer finds the restarted node as provider of its shard and fetches it.
    let b = start_node(node_config(&dir.path().join("b"), &boot)).await;
    let len = tokio::time::timeout(Duration::from_secs(40), b.fetch_blob(hash))
        .await
        .expect("fetch in time")
        .expect("fetch from the restarted node");
    assert_eq!(len, shard.len() as u64);

    a.shutdown().await.expect("shutdown");
    b.shutdown().await.expect("shutdown");
    bootstrap.shutdown().await;
}
