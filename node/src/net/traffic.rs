//! Counts of application bytes on the wire, kept by the network layer so that `mana status` (and `mana demo`)
//! can say how much a node sent and received: gossip message bytes published and received, and fetch
//! request/response frame bytes written and read. Atomics shared by the event loop, the fetch codec (one
//! clone per stream) and every [`Client`](super::Client), so reading them costs no round trip to the loop.
//!
//! What is counted: for gossip, the data of each message this node publishes (once per message, not once per
//! peer it goes to) and of each distinct message it receives (gossipsub drops duplicates before we see
//! them); messages forwarded on behalf of others are not counted. For fetches, every request and response
//! frame as encoded on its stream, and on bulk blob streams every header frame (with its length prefix)
//! and range byte, both directions. Transport framing (noise, yamux, gossipsub's protobuf
//! envelope) is not counted.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Bytes counted since the swarm started. A snapshot of [`TrafficCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Data bytes of the gossip messages received (each distinct message once).
    pub gossip_in: u64,
    /// Data bytes of the gossip messages this node published (each message once).
    pub gossip_out: u64,
    /// Fetch frames read: requests served plus responses received.
    pub fetch_in: u64,
    /// Fetch frames written: requests sent plus responses served.
    pub fetch_out: u64,
}

/// The live counters (one set per swarm), updated with relaxed atomics: they are statistics, never used to
/// order anything.
#[derive(Debug, Default)]
pub struct TrafficCounters {
    gossip_in: AtomicU64,
    gossip_out: AtomicU64,
    fetch_in: AtomicU64,
    fetch_out: AtomicU64,
}

impl TrafficCounters {
    /// Counts a gossip message received.
    pub fn add_gossip_in(&self, bytes: usize) {
        self.gossip_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts a gossip message published.
    pub fn add_gossip_out(&self, bytes: usize) {
        self.gossip_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts a fetch frame read.
    pub fn add_fetch_in(&self, bytes: usize) {
        self.fetch_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts a fetch frame written.
    pub fn add_fetch_out(&self, bytes: usize) {
        self.fetch_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn snapshot(&self) -> Traffic {
        Traffic {
            gossip_in: self.gossip_in.load(Ordering::Relaxed),
            gossip_out: self.gossip_out.load(Ordering::Relaxed),
            fetch_in: self.fetch_in.load(Ordering::Relaxed),
            fetch_out: self.fetch_out.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_per_direction() {
        let counters = TrafficCounters::default();
        counters.add_gossip_in(10);
        counters.add_gossip_in(5);
        counters.add_gossip_out(7);
        counters.add_fetch_in(1 << 20);
        counters.add_fetch_out(3);
        assert_eq!(
            counters.snapshot(),
            Traffic {
                gossip_in: 15,
                gossip_out: 7,
                fetch_in: 1 << 20,
                fetch_out: 3
            }
        );
    }
}
