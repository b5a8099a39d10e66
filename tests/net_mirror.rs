//! A mirror's disk stays flat (issue #14, section 2): a node that syncs every checkpoint (`sync_shards`, what
//! `mana node --no-train` runs) keeps the last `keep_rounds` rounds and its store reclaims the shards of older
//! ones. Before, every fetched shard stayed pinned for the life of the process, so the disk grew forever.

mod net_support;

use std::time::Duration;

use mana_protocol::{CheckpointManifest, ContentHash, Message, ShardEntry, ShardId};
use net_support::*;

const ROUNDS: u64 = 8;
/// The store's default `keep_rounds`.
const KEEP: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_keeps_only_its_last_rounds_on_disk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    // The publisher signs the manifests: it is the run's coordinator for the mirror.
    let mut publisher_cfg = node_config(&dir.path().join("publisher"), &boot);
    publisher_cfg.sync_shards = false;
    let publisher = start_node(publisher_cfg).await;
    let mut mirror_cfg = node_config(&dir.path().join("mirror"), &boot);
    mirror_cfg.coordinator = Some(publisher.public_key());
    let mirror = start_node(mirror_cfg).await;
    let run = publisher.config().net.run_id.clone();

    let mut rounds: Vec<Vec<ContentHash>> = Vec::new();
    for round in 1..=ROUNDS {
        let mut shards = Vec::new();
        for index in 0..2u16 {
            let bytes = pseudo_random_bytes(64 * 1024, round * 100 + u64::from(index) * 2);
            let size = bytes.len() as u64;
            let hash = publisher.host_blob(bytes).await.expect("hosted");
            shards.push(ShardEntry {
                shard: ShardId::expert(0, index).expect("expert"),
                hash,
                size,
                round,
            });
        }
        rounds.push(shards.iter().map(|e| e.hash).collect());
        let manifest = CheckpointManifest {
            run: run.clone(),
            round,
            shards,
        };
        wait_for(
            Duration::from_secs(30),
            &format!("the mirror syncs round {round}"),
            || async {
                // Published again until it lands: the first may precede the mesh.
                let _ = publisher
                    .publish(&Message::CheckpointManifest(manifest.clone()))
                    .await;
                (mirror.status().await.ok()?.stored_round == Some(round)).then_some(())
            },
        )
        .await;
    }

    let store = mirror.store();
    for (i, hashes) in rounds.iter().enumerate() {
        let round = i as u64 + 1;
        let kept = round > ROUNDS - KEEP;
        for hash in hashes {
            assert_eq!(
                store.has_blob(hash).expect("store"),
                kept,
                "round {round}'s shard {hash}: kept {kept} expected"
            );
        }
    }
    mirror.shutdown().await.expect("mirror stops");
    publisher.shutdown().await.expect("publisher stops");
    bootstrap.shutdown().await;
}
