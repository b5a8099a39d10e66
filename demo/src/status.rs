//! What the demo reads from a child's `status.json` (the file `mana status --json` shows; every node and
//! the coordinator rewrite it every 2 s): the daemon's own [`NodeStatus`], read with the node crate's
//! reader. The children are this same build; the status types also default any missing field, so a file
//! from a slightly different build still reads. From it the demo takes the round each process holds, its
//! shards' hashes, its manifest hash and its traffic.

use std::path::Path;

use mana_node::daemon::NodeStatus;
use mana_node::net::Traffic;

/// Reads `<data_dir>/status.json`; `None` if it is missing, too large or not (yet) valid.
pub fn read(data_dir: &Path) -> Option<NodeStatus> {
    mana_node::daemon::status::read(data_dir).ok()
}

/// What a process holds: the round, its shards (name, hash hex) and its manifest hash.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Holdings {
    /// The round held (`None`: it reports none).
    pub round: Option<u64>,
    /// (shard name, blake3 hex) of every shard held.
    pub shards: Vec<(String, String)>,
    /// Hash (hex) of its checkpoint manifest, if it reports one.
    pub manifest: Option<String>,
}

/// The round and shard hashes this process holds: a trainer's applied round and held shards when it
/// reports them, else its store's latest round.
pub fn holdings(status: &NodeStatus) -> Holdings {
    match &status.training {
        Some(t) if t.applied_round.is_some() && !t.held_shards.is_empty() => Holdings {
            round: t.applied_round,
            shards: t.held_shards.clone(),
            manifest: t.manifest_hash.clone(),
        },
        _ => Holdings {
            round: status.stored_round,
            shards: status
                .stored_shards
                .iter()
                .map(|s| (s.shard.clone(), s.hash.clone()))
                .collect(),
            manifest: status.manifest_hash.clone(),
        },
    }
}

/// Bytes sent: gossip published plus fetch frames written.
pub fn sent(traffic: &Traffic) -> u64 {
    traffic.gossip_out.saturating_add(traffic.fetch_out)
}

/// Bytes received: gossip received plus fetch frames read.
pub fn received(traffic: &Traffic) -> u64 {
    traffic.gossip_in.saturating_add(traffic.fetch_in)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_trainer_status_and_prefers_its_applied_round() {
        let json = r#"{"pid":7,"peers":[{"peer_id":"a"},{"peer_id":"b"}],"stored_round":4,"stored_shards":[{"shard":"trunk","hash":"aa","bytes":3}],
            "manifest_hash":"m4","unknown":1,"traffic":{"gossip_in":1,"gossip_out":2,"fetch_in":30,"fetch_out":40},
            "training":{"applied_round":5,"held_shards":[["trunk","bb"],["expert/0/1","cc"]],"manifest_hash":"m5","delta_bytes_sent":99}}"#;
        let s: NodeStatus = serde_json::from_str(json).expect("parses");
        assert_eq!(s.peers.len(), 2);
        assert_eq!((sent(&s.traffic), received(&s.traffic)), (42, 31));
        let h = holdings(&s);
        assert_eq!(h.round, Some(5));
        assert_eq!(
            h.shards,
            [
                ("trunk".to_owned(), "bb".to_owned()),
                ("expert/0/1".to_owned(), "cc".to_owned())
            ]
        );
        assert_eq!(h.manifest.as_deref(), Some("m5"));
        assert_eq!(s.training.expect("training").delta_bytes_sent, 99);
    }

    #[test]
    fn falls_back_to_the_store_and_tolerates_missing_fields() {
        let s: NodeStatus = serde_json::from_str(
            r#"{"stored_round":2,"stored_shards":[{"shard":"trunk","hash":"aa"}]}"#,
        )
        .expect("parses");
        let h = holdings(&s);
        assert_eq!(
            (h.round, h.shards, h.manifest),
            (Some(2), vec![("trunk".to_owned(), "aa".to_owned())], None)
        );
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(read(dir.path()).is_none());
        std::fs::write(dir.path().join("status.json"), "{not json").expect("write");
        assert!(read(dir.path()).is_none());
    }

    #[test]
    fn reads_the_file_a_node_writes() {
        // What a node writes (the full type, serialized) is what the demo reads back.
        let mut status = NodeStatus {
            pid: 9,
            stored_round: Some(3),
            ..NodeStatus::default()
        };
        status.traffic.fetch_out = 5;
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("status.json"),
            serde_json::to_vec(&status).expect("serializes"),
        )
        .expect("write");
        assert_eq!(read(dir.path()), Some(status));
    }
}
