//! One bootstrap and five nodes on loopback: the nodes find each other through the bootstrap alone (each
//! ends up connected to, and with a DHT entry for, every other node), and gossip reaches every node (each
//! node accepts a signed heartbeat from every other node, and a message published by one reaches all).

mod net_support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use mana_protocol::Message;
use net_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_find_each_other_and_gossip_reaches_all() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot_addrs = bootstrap.addrs().to_vec();

    let mut nodes = Vec::new();
    for i in 0..5 {
        let config = node_config(&dir.path().join(format!("node{i}")), &boot_addrs);
        nodes.push(start_node(config).await);
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.peer_id().to_string()).collect();
    let mut receivers: Vec<_> = nodes.iter().map(|n| n.accepted()).collect();

    // Discovery: every node is connected to and knows (DHT) every other node, having been told only of
    // the bootstrap.
    for (i, node) in nodes.iter().enumerate() {
        let others: HashSet<String> = ids.iter().filter(|id| **id != ids[i]).cloned().collect();
        wait_for(
            Duration::from_secs(30),
            &format!("node {i} to discover the others"),
            || async {
                let snap = node.net().snapshot().await.ok()?;
                let connected: HashSet<String> =
                    snap.peers.iter().map(|p| p.peer_id.clone()).collect();
                let known: HashSet<String> = snap.routing_table.iter().cloned().collect();
                (others.is_subset(&connected) && others.is_subset(&known)).then_some(())
            },
        )
        .await;
    }

    // Gossip: each node accepts a validated heartbeat signed by each other node.
    let keys: Vec<_> = nodes.iter().map(|n| n.public_key()).collect();
    for (i, rx) in receivers.iter_mut().enumerate() {
        let mut seen: HashMap<usize, bool> = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while seen.len() < 4 {
            let accepted = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("node {i} heard heartbeats from only {:?}", seen.keys()))
                .expect("accepted channel open");
            if let Message::Heartbeat(_) = accepted.message {
                if let Some(j) = keys.iter().position(|k| *k == accepted.signer) {
                    if j != i {
                        seen.insert(j, true);
                    }
                }
            }
        }
    }

    // No honest message was rejected anywhere.
    for node in &nodes {
        let status = node.status().await.expect("status");
        assert_eq!(
            status.rejected_messages, 0,
            "honest traffic rejected: {:?}",
            status.rejections
        );
        assert!(status.accepted_messages > 0);
    }

    for node in nodes {
        node.shutdown().await.expect("clean shutdown");
    }
    bootstrap.shutdown().await;
}
