//! Names on the network: gossipsub topics (one set per run) and request/response protocol ids.

use crate::ids::RunId;

/// Protocol id of blob fetching (delta payloads, checkpoint shards and manifests, by hash, in chunks).
pub const FETCH_PROTOCOL: &str = "/mana/fetch/1.0.0";

/// Protocol id of bulk blob streams: many ranges of blobs on one long-lived stream, each range's bytes sent
/// raw after a small header (the fast path for shards; [`FETCH_PROTOCOL`] stays for peers without it).
pub const BLOB_STREAM_PROTOCOL: &str = "/mana/blob/1.0.0";

/// Protocol id of blob lane setup: over this authenticated stream two peers agree the keys and ticket of a
/// blob lane, a direct TCP connection that carries the same ranges as [`BLOB_STREAM_PROTOCOL`] sealed with
/// AES-256-GCM, which costs a third of the connection's ChaCha20-Poly1305 on CPUs with AES instructions.
pub const BLOB_LANE_PROTOCOL: &str = "/mana/blob-lane/1.0.0";

/// Protocol id of remote expert calls (hidden states in, expert outputs out).
pub const EXPERT_PROTOCOL: &str = "/mana/expert/1.0.0";

/// The gossip topics of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// Round announcements, round commits and checkpoint manifests, from the coordinator.
    Rounds,
    /// Delta announcements, from nodes.
    Deltas,
    /// Heartbeats, from every node.
    Heartbeats,
}

impl TopicKind {
    /// Every topic kind, for subscribing to all of a run's topics.
    pub const ALL: [TopicKind; 3] = [TopicKind::Rounds, TopicKind::Deltas, TopicKind::Heartbeats];

    /// The last component of the topic name.
    pub fn suffix(self) -> &'static str {
        match self {
            TopicKind::Rounds => "rounds",
            TopicKind::Deltas => "deltas",
            TopicKind::Heartbeats => "heartbeats",
        }
    }
}

/// The gossipsub topic string of `kind` in `run`: `mana/<run>/<rounds|deltas|heartbeats>`.
pub fn topic(run: &RunId, kind: TopicKind) -> String {
    format!("mana/{run}/{}", kind.suffix())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        let run = RunId::new("demo").unwrap();
        assert_eq!(topic(&run, TopicKind::Rounds), "mana/demo/rounds");
        assert_eq!(topic(&run, TopicKind::Deltas), "mana/demo/deltas");
        assert_eq!(topic(&run, TopicKind::Heartbeats), "mana/demo/heartbeats");
    }
}
