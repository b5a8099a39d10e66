//! Who holds a shard's blob, learnt from what the daemon hears: a judge that signed a result in a
//! `ShardAttestation` hosts the blob it computed, and a holder that published its `CheckpointManifest` holds
//! every shard it names. A node that needs a shard asks them first ([`super::sync::fetch_shard`]), before a
//! DHT lookup: the coordinator holds no shard, so without these hints every shard of every round would cost a
//! provider search.

use std::collections::{HashMap, VecDeque};

use libp2p::PeerId;
use mana_protocol::ContentHash;

/// Blobs remembered at most (the oldest is forgotten first).
pub const MAX_HOSTED_BLOBS: usize = 4096;

/// Hosts remembered per blob at most (the first heard are kept).
pub const MAX_HOSTS_PER_BLOB: usize = 16;

/// The peers heard to host each of the last [`MAX_HOSTED_BLOBS`] shard blobs.
#[derive(Debug, Default)]
pub struct ShardHosts {
    by_blob: HashMap<ContentHash, Vec<PeerId>>,
    order: VecDeque<ContentHash>,
}

impl ShardHosts {
    /// `peer` hosts blob `hash`.
    pub fn note(&mut self, hash: ContentHash, peer: PeerId) {
        let hosts = self.by_blob.entry(hash).or_insert_with(|| {
            self.order.push_back(hash);
            Vec::new()
        });
        if hosts.len() < MAX_HOSTS_PER_BLOB && !hosts.contains(&peer) {
            hosts.push(peer);
        }
        while self.order.len() > MAX_HOSTED_BLOBS {
            if let Some(old) = self.order.pop_front() {
                self.by_blob.remove(&old);
            }
        }
    }

    /// The peers heard to host blob `hash`.
    pub fn of(&self, hash: &ContentHash) -> Vec<PeerId> {
        self.by_blob.get(hash).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_kept_per_blob_within_bounds_and_the_oldest_blob_goes_first() {
        let mut hosts = ShardHosts::default();
        let peer = PeerId::random();
        let blob = |i: usize| ContentHash::of(&i.to_le_bytes());
        hosts.note(blob(0), peer);
        hosts.note(blob(0), peer);
        assert_eq!(hosts.of(&blob(0)), vec![peer]);
        for _ in 0..MAX_HOSTS_PER_BLOB + 3 {
            hosts.note(blob(1), PeerId::random());
        }
        assert_eq!(hosts.of(&blob(1)).len(), MAX_HOSTS_PER_BLOB);
        for i in 2..MAX_HOSTED_BLOBS + 2 {
            hosts.note(blob(i), peer);
        }
        assert!(hosts.of(&blob(0)).is_empty(), "the oldest is forgotten");
        assert_eq!(hosts.of(&blob(2)), vec![peer]);
        assert_eq!(hosts.by_blob.len(), MAX_HOSTED_BLOBS);
    }
}
