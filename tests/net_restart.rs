//! A node restarts and finds its store intact: same identity, the committed round and its shard still
//! there (hash-verified), announced again in the DHT so a new peer can fetch it, and `mana node
//! --verify-store` (the real binary) finds nothing wrong. And its first heartbeat after the restart carries a
//! higher sequence number than its last before, so a coordinator counts it again at once. And a node that
//! restarts while the bootstrap is down rejoins through the peers it remembered in its store.

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

/// Waits for a heartbeat from `node` signed at or after `since_ms`, and returns its sequence number and the
/// highest sequence number of the earlier ones that came in meanwhile (stragglers from before a restart).
async fn heartbeat_since(
    rx: &mut tokio::sync::broadcast::Receiver<mana_node::daemon::Accepted>,
    node: mana_protocol::PublicKey,
    since_ms: u64,
) -> (u64, u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut earlier = 0;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Err(_) => panic!("no heartbeat from the node signed after {since_ms} in 30 s"),
            Ok(Ok(m)) => {
                if let mana_protocol::Message::Heartbeat(h) = &m.message
                    && m.signer == node
                {
                    if m.envelope.timestamp_ms >= since_ms {
                        return (h.seq, earlier);
                    }
                    earlier = earlier.max(h.seq);
                }
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("observer stopped: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_heartbeats_above_its_last_sequence_number() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let observer = start_node(node_config(&dir.path().join("observer"), &boot)).await;
    let mut rx = observer.accepted();
    let a_dir = dir.path().join("a");
    let a = start_node(node_config(&a_dir, &boot)).await;
    let key = a.public_key();
    // Two heartbeats before the restart: the last one seen is what a coordinator would hold.
    let (first, _) = heartbeat_since(&mut rx, key, 0).await;
    let (second, _) = heartbeat_since(&mut rx, key, mana_node::daemon::now_ms()).await;
    assert!(second > first, "sequence numbers grow: {first}, {second}");
    a.shutdown().await.expect("clean shutdown");

    let restarted_at = mana_node::daemon::now_ms();
    let a = start_node(node_config(&a_dir, &boot)).await;
    assert_eq!(a.public_key(), key);
    let (after, stragglers) = heartbeat_since(&mut rx, key, restarted_at).await;
    let before = second.max(stragglers);
    assert!(
        after > before,
        "the first heartbeat after the restart ({after}) is above the last before it ({before})"
    );
    a.shutdown().await.expect("shutdown");
    observer.shutdown().await.expect("shutdown");
    bootstrap.shutdown().await;
}

/// Y knew X through the bootstrap; the bootstrap goes down and Y restarts with only the bootstrap's (dead)
/// address configured: Y dials the peers kept in its store and is connected to X again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_while_the_bootstrap_is_down_rejoins_through_remembered_peers() {
    use mana_node::store::RecordKind;
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let x = start_node(node_config(&dir.path().join("x"), &boot)).await;
    let x_id = x.peer_id().to_string();
    let y_dir = dir.path().join("y");
    let y = start_node(node_config(&y_dir, &boot)).await;
    wait_for(
        Duration::from_secs(30),
        "y keeps x in its peer book",
        || async {
            y.store()
                .get_record(RecordKind::Peer, x_id.as_bytes())
                .expect("store")
        },
    )
    .await;
    y.shutdown().await.expect("y stops");
    bootstrap.shutdown().await;

    let y = start_node(node_config(&y_dir, &boot)).await;
    wait_for(
        Duration::from_secs(30),
        "y connected to x without the bootstrap",
        || async {
            let status = y.status().await.ok()?;
            status.peers.iter().any(|p| p.peer_id == x_id).then_some(())
        },
    )
    .await;
    y.shutdown().await.expect("y stops");
    x.shutdown().await.expect("x stops");
}
