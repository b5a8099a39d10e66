//! What the demo reads from a child's `status.json` (the file `mana status --json` shows; every node and
//! the coordinator rewrite it every 2 s). The demo reads the JSON into its own lenient view rather than the
//! node crate's `NodeStatus`, so a status written by a slightly different version still gives what the demo
//! needs: the round each process holds, its shards' hashes, its manifest hash and its traffic.

use std::path::Path;

use serde::Deserialize;

/// Largest status file read (the node's own reader uses the same bound).
const MAX_STATUS_BYTES: u64 = 16 * 1024 * 1024;

/// One stored shard as the status lists it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ShardView {
    /// `trunk` or `expert/<layer>/<index>`.
    pub shard: String,
    /// blake3 of the shard's bytes, hex.
    pub hash: String,
}

/// The trainer role's part of the status.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct TrainingView {
    /// Rounds this node trained in.
    pub rounds_trained: u64,
    /// Delta announcements published.
    pub deltas_sent: u64,
    /// Bytes of delta payloads published.
    pub delta_bytes_sent: u64,
    /// The last round whose commit it applied.
    pub applied_round: Option<u64>,
    /// Hash of its own manifest of held shards after that round.
    pub manifest_hash: Option<String>,
    /// Held shards after that round: (name, hash hex).
    pub held_shards: Vec<(String, String)>,
    /// Recomputed shards that differed from the commit.
    pub hash_mismatches: u64,
    /// Loss of its last local round.
    pub last_train_loss: Option<f64>,
    /// What it is doing.
    pub activity: String,
}

/// The coordinator role's part of the status.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct CoordinatorView {
    /// The state machine's phase.
    pub phase: String,
    /// Members whose heartbeats arrive.
    pub members: usize,
    /// The last committed round.
    pub committed_round: Option<u64>,
    /// Hash of the last committed checkpoint manifest.
    pub checkpoint: Option<String>,
}

/// Application bytes on the wire since the process started (the network layer's counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, Deserialize)]
#[serde(default)]
pub struct TrafficView {
    /// Gossip data received (each distinct message once).
    pub gossip_in: u64,
    /// Gossip data published.
    pub gossip_out: u64,
    /// Fetch frames read.
    pub fetch_in: u64,
    /// Fetch frames written.
    pub fetch_out: u64,
}

impl TrafficView {
    /// Bytes sent: gossip published plus fetch frames written.
    pub fn sent(&self) -> u64 {
        self.gossip_out.saturating_add(self.fetch_out)
    }

    /// Bytes received: gossip received plus fetch frames read.
    pub fn received(&self) -> u64 {
        self.gossip_in.saturating_add(self.fetch_in)
    }
}

/// The parts of a status file the demo uses.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct StatusView {
    /// Process id.
    pub pid: u32,
    /// Connected peers (only counted).
    pub peers: Vec<serde_json::Value>,
    /// The latest round committed to its store.
    pub stored_round: Option<u64>,
    /// The shards of that round.
    pub stored_shards: Vec<ShardView>,
    /// Hash of the checkpoint manifest of that round.
    pub manifest_hash: Option<String>,
    /// Bytes on the wire, when the node reports them.
    pub traffic: Option<TrafficView>,
    /// Present on a training node.
    pub training: Option<TrainingView>,
    /// Present on the coordinator.
    pub coordinator: Option<CoordinatorView>,
}

impl StatusView {
    /// The round and shard hashes this process holds: a trainer's applied round and held shards when it
    /// reports them, else its store's latest round.
    pub fn holdings(&self) -> (Option<u64>, Vec<(String, String)>, Option<String>) {
        match &self.training {
            Some(t) if t.applied_round.is_some() && !t.held_shards.is_empty() => {
                (t.applied_round, t.held_shards.clone(), t.manifest_hash.clone())
            }
            _ => (
                self.stored_round,
                self.stored_shards.iter().map(|s| (s.shard.clone(), s.hash.clone())).collect(),
                self.manifest_hash.clone(),
            ),
        }
    }
}

/// Reads `<data_dir>/status.json`; `None` if it is missing, too large or not (yet) valid.
pub fn read(data_dir: &Path) -> Option<StatusView> {
    let path = data_dir.join("status.json");
    if std::fs::metadata(&path).ok()?.len() > MAX_STATUS_BYTES {
        return None;
    }
    let bytes = std::fs::read(&path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_trainer_status_and_prefers_its_applied_round() {
        let json = r#"{"pid":7,"peers":[{},{}],"stored_round":4,"stored_shards":[{"shard":"trunk","hash":"aa","bytes":3}],
            "manifest_hash":"m4","unknown":1,"traffic":{"gossip_in":1,"gossip_out":2,"fetch_in":30,"fetch_out":40},
            "training":{"applied_round":5,"held_shards":[["trunk","bb"],["expert/0/1","cc"]],"manifest_hash":"m5","delta_bytes_sent":99}}"#;
        let s: StatusView = serde_json::from_str(json).expect("parses");
        assert_eq!(s.peers.len(), 2);
        let traffic = s.traffic.expect("traffic");
        assert_eq!((traffic.sent(), traffic.received()), (42, 31));
        let (round, shards, manifest) = s.holdings();
        assert_eq!(round, Some(5));
        assert_eq!(shards, [("trunk".to_owned(), "bb".to_owned()), ("expert/0/1".to_owned(), "cc".to_owned())]);
        assert_eq!(manifest.as_deref(), Some("m5"));
        assert_eq!(s.training.expect("training").delta_bytes_sent, 99);
    }

    #[test]
    fn falls_back_to_the_store_and_tolerates_missing_fields() {
        let s: StatusView = serde_json::from_str(r#"{"stored_round":2,"stored_shards":[{"shard":"trunk","hash":"aa"}]}"#).expect("parses");
        assert_eq!(s.holdings(), (Some(2), vec![("trunk".to_owned(), "aa".to_owned())], None));
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(read(dir.path()).is_none());
        std::fs::write(dir.path().join("status.json"), "{not json").expect("write");
        assert!(read(dir.path()).is_none());
    }
}
