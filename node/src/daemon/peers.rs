//! The peer book: the peers this node was connected to, kept in the store (one [`RecordKind::Peer`] record per
//! peer: a dialable address and when it was last connected), so that a node restarted while every bootstrap
//! node is down rejoins through the peers it knew. Bounded: the [`MAX_KNOWN_PEERS`] most recently connected
//! are kept, and the [`MAX_DIALLED_PEERS`] most recent of them are dialled at start.

use std::sync::Arc;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use serde::{Deserialize, Serialize};

use super::{NodeError, Shared, blocking};
use crate::net::PeerSummary;
use crate::store::{RecordKind, Store};

/// Most peers kept in the store.
pub const MAX_KNOWN_PEERS: usize = 64;
/// Most remembered peers dialled when the node has no peer.
pub const MAX_DIALLED_PEERS: usize = 16;

/// One remembered peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KnownPeer {
    /// Where it was reached, with its `/p2p/` suffix.
    addr: String,
    /// When it was last seen connected, unix milliseconds.
    seen_ms: u64,
}

/// The addresses of the peers to rejoin through, most recently connected first; unreadable records and
/// addresses without a peer id are skipped.
pub fn remembered(store: &Store) -> Result<Vec<Multiaddr>, NodeError> {
    let mut peers = known(store)?;
    peers.sort_by_key(|(_, p)| std::cmp::Reverse(p.seen_ms));
    Ok(peers
        .into_iter()
        .filter_map(|(_, p)| p.addr.parse::<Multiaddr>().ok())
        .filter(|a| matches!(a.iter().last(), Some(Protocol::P2p(_))))
        .take(MAX_DIALLED_PEERS)
        .collect())
}

/// Records the connected peers that have a dialable address as seen now, then forgets the oldest beyond
/// [`MAX_KNOWN_PEERS`]. Called on the status timer.
pub(crate) async fn remember(shared: &Arc<Shared>, peers: &[PeerSummary]) -> Result<(), NodeError> {
    let seen_ms = super::now_ms();
    let fresh: Vec<(String, KnownPeer)> = peers
        .iter()
        .filter_map(|p| {
            let addr = p.dial_addr.clone()?;
            Some((p.peer_id.clone(), KnownPeer { addr, seen_ms }))
        })
        .collect();
    if fresh.is_empty() {
        return Ok(());
    }
    let store = shared.store.clone();
    blocking(move || {
        for (peer, known) in &fresh {
            let value = serde_json::to_vec(known).map_err(|e| NodeError::Config(e.to_string()))?;
            store.put_record(RecordKind::Peer, peer.as_bytes(), &value)?;
        }
        keep_newest(&store, MAX_KNOWN_PEERS)
    })
    .await
}

/// Removes the peer records beyond the `max` most recently seen (unreadable ones first).
fn keep_newest(store: &Store, max: usize) -> Result<(), NodeError> {
    let mut all: Vec<(Vec<u8>, Option<KnownPeer>)> = store
        .records(RecordKind::Peer)?
        .into_iter()
        .map(|(key, value)| (key, serde_json::from_slice(&value).ok()))
        .collect();
    if all.len() > max {
        all.sort_by_key(|(_, p)| std::cmp::Reverse(p.as_ref().map_or(0, |p| p.seen_ms)));
        for (key, _) in &all[max..] {
            store.remove_record(RecordKind::Peer, key)?;
        }
    }
    Ok(())
}

/// How often the peer book is written although its peers did not change (their last-seen times move on).
pub const BOOK_REFRESH: std::time::Duration = std::time::Duration::from_secs(60);

/// When the peer book is written: at once when the set of dialable peers changed, else every
/// [`BOOK_REFRESH`], so that a node with stable peers does not rewrite the store every few seconds.
#[derive(Debug, Default)]
pub struct BookSchedule {
    last: Option<(std::time::Instant, Vec<String>)>,
}

impl BookSchedule {
    /// Whether to write the book now for `peers`; records the write when it says so.
    pub fn due(&mut self, peers: &[PeerSummary], now: std::time::Instant) -> bool {
        let mut dialable: Vec<String> = peers.iter().filter_map(|p| p.dial_addr.clone()).collect();
        dialable.sort();
        let due = match &self.last {
            Some((at, seen)) => *seen != dialable || now.duration_since(*at) >= BOOK_REFRESH,
            None => true,
        };
        if due {
            self.last = Some((now, dialable));
        }
        due
    }
}

/// Every peer record that decodes, with its key.
fn known(store: &Store) -> Result<Vec<(Vec<u8>, KnownPeer)>, NodeError> {
    Ok(store
        .records(RecordKind::Peer)?
        .into_iter()
        .filter_map(|(key, value)| Some((key, serde_json::from_slice(&value).ok()?)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    #[test]
    fn the_book_is_written_when_its_peers_change_or_every_minute() {
        let peer = |addr: &str| PeerSummary {
            peer_id: "p".into(),
            rtt_ms: None,
            gossip_score: None,
            agent: None,
            dial_addr: Some(addr.into()),
        };
        let t0 = std::time::Instant::now();
        let mut book = BookSchedule::default();
        assert!(book.due(&[peer("/a")], t0), "first time");
        assert!(!book.due(&[peer("/a")], t0 + std::time::Duration::from_secs(5)));
        assert!(book.due(
            &[peer("/a"), peer("/b")],
            t0 + std::time::Duration::from_secs(6)
        ));
        assert!(!book.due(
            &[peer("/b"), peer("/a")],
            t0 + std::time::Duration::from_secs(7)
        ));
        assert!(book.due(
            &[peer("/a"), peer("/b")],
            t0 + BOOK_REFRESH + std::time::Duration::from_secs(6)
        ));
    }

    #[test]
    fn the_most_recent_dialable_peers_come_first_and_garbage_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), StoreConfig::default()).expect("store");
        let peer = libp2p::PeerId::random();
        let put = |key: &str, addr: &str, seen_ms: u64| {
            let value = serde_json::to_vec(&KnownPeer {
                addr: addr.into(),
                seen_ms,
            })
            .expect("json");
            store
                .put_record(RecordKind::Peer, key.as_bytes(), &value)
                .expect("put");
        };
        put("old", &format!("/ip4/127.0.0.1/tcp/1/p2p/{peer}"), 1);
        put("new", &format!("/ip4/127.0.0.1/tcp/2/p2p/{peer}"), 2);
        put("no-id", "/ip4/127.0.0.1/tcp/3", 3);
        put("junk", "not an address", 4);
        store
            .put_record(RecordKind::Peer, b"not json", b"\xff")
            .expect("put");
        let before = remembered(&store).expect("read");
        assert_eq!(
            before.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            vec![
                format!("/ip4/127.0.0.1/tcp/2/p2p/{peer}"),
                format!("/ip4/127.0.0.1/tcp/1/p2p/{peer}")
            ],
            "most recent first; no peer id, junk and undecodable records skipped"
        );
        keep_newest(&store, 3).expect("prune");
        assert_eq!(
            store.records(RecordKind::Peer).expect("list").len(),
            3,
            "the unreadable record and the oldest go first"
        );
        assert!(
            store
                .get_record(RecordKind::Peer, b"not json")
                .expect("get")
                .is_none()
        );
        let addrs = remembered(&store).expect("read");
        let ports: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        assert_eq!(ports, vec![format!("/ip4/127.0.0.1/tcp/2/p2p/{peer}")]);
    }
}
