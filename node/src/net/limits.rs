//! The limits that keep one node safe from many peers (or from one hostile peer): how many connections it
//! holds, how large a gossip message or a transfer chunk may be, and how fast one peer may send requests.
//! The numbers live here, in one place, so an operator can read them in one go (see docs/operator-guide.md).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// Size and rate caps for the network layer. Every value is checked by [`Limits::validate`] before a swarm
/// is built, so a bad config file fails at start-up, not halfway through a transfer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Established connections in total; new ones beyond this are refused.
    pub max_connections: u32,
    /// Established connections to one peer (a peer needs one; a few more tolerate simultaneous dials).
    pub max_connections_per_peer: u32,
    /// Of `max_connections`, the slots inbound connections may not take: they stay for this node's own
    /// dials, so an inbound flood cannot eclipse it.
    pub outbound_reserve: u32,
    /// Inbound connections from one remote IP address (loopback exempt when colocated processes are trusted).
    pub max_inbound_per_ip: u32,
    /// Connections still in their handshake, per direction; caps the cost of a dial flood.
    pub max_pending_connections: u32,
    /// Largest gossip message accepted on the wire, in bytes; bigger ones are dropped by gossipsub itself.
    pub max_gossip_bytes: usize,
    /// Largest chunk of a transfer, in bytes; a response claiming more is refused before it is read.
    pub max_chunk_bytes: u32,
    /// Requests one peer may make per second, on average (token bucket refill rate).
    pub requests_per_second: u32,
    /// Requests one peer may make in a burst (token bucket size).
    pub request_burst: u32,
    /// Gossip messages one peer may forward to us per second, on average; excess ones are ignored.
    pub gossip_per_second: u32,
    /// Gossip messages one peer may forward in a burst.
    pub gossip_burst: u32,
    /// Outbound transfer requests in flight at once across all fetches.
    pub max_concurrent_transfers: usize,
    /// Inbound bulk blob streams served at once, from all peers; more are reset.
    pub max_blob_streams: usize,
    /// Inbound bulk blob streams served at once to one peer (a fetcher opens two per provider).
    pub max_blob_streams_per_peer: usize,
    /// Inbound chunk requests answered at once, from all peers (each holds one chunk in memory until its
    /// response is sent); more are answered `Refused: busy`.
    pub max_served_requests: usize,
    /// Inbound chunk requests answered at once for one peer.
    pub max_served_requests_per_peer: usize,
    /// Network events (gossip to judge, requests to answer) waiting for the node. When it is this far behind,
    /// gossip is ignored (never held against its sender: the node catches up from a later message) and requests
    /// are answered busy, so a flood costs memory up to this bound and never stalls the swarm.
    pub event_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_connections_per_peer: 4,
            outbound_reserve: 32,
            max_inbound_per_ip: 8,
            max_pending_connections: 64,
            // The transport cap sits above the protocol's 256 KiB envelope cap, so an oversized envelope
            // reaches validation and costs its sender score instead of vanishing silently.
            max_gossip_bytes: 512 * 1024,
            // The protocol's largest chunk: fewer, larger requests move a shard fastest.
            max_chunk_bytes: mana_protocol::limits::MAX_FETCH_CHUNK_BYTES,
            requests_per_second: 400,
            request_burst: 800,
            gossip_per_second: 200,
            gossip_burst: 400,
            max_concurrent_transfers: 16,
            max_blob_streams: 64,
            max_blob_streams_per_peer: 8,
            max_served_requests: 32,
            max_served_requests_per_peer: 4,
            event_queue: 1024,
        }
    }
}

/// A limit that makes no sense (zero where at least one is needed, or a size beyond the hard ceilings).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid network limit {name}: {why}")]
pub struct LimitError {
    /// Which field is wrong.
    pub name: &'static str,
    /// What is wrong with it.
    pub why: &'static str,
}

/// The hard ceiling of a transfer chunk: 16 MiB. A bigger chunk would make each request hold too much memory.
pub const CHUNK_CEILING: u32 = 16 * 1024 * 1024;

/// The hard ceiling of a gossip message: 4 MiB (gossip carries announcements; payloads go by transfer).
pub const GOSSIP_CEILING: usize = 4 * 1024 * 1024;

impl Limits {
    /// Checks that every limit is usable.
    pub fn validate(&self) -> Result<(), LimitError> {
        let err = |name, why| Err(LimitError { name, why });
        if self.max_connections == 0 {
            return err("max_connections", "must be at least 1");
        }
        if self.max_connections_per_peer == 0 {
            return err("max_connections_per_peer", "must be at least 1");
        }
        if self.outbound_reserve >= self.max_connections {
            return err(
                "outbound_reserve",
                "must be below max_connections (inbound connections need a slot)",
            );
        }
        if self.max_inbound_per_ip == 0 {
            return err("max_inbound_per_ip", "must be at least 1");
        }
        if self.max_chunk_bytes == 0 || self.max_chunk_bytes > CHUNK_CEILING {
            return err("max_chunk_bytes", "must be between 1 and 16 MiB");
        }
        if self.max_gossip_bytes < 1024 || self.max_gossip_bytes > GOSSIP_CEILING {
            return err("max_gossip_bytes", "must be between 1 KiB and 4 MiB");
        }
        if self.requests_per_second == 0 || self.request_burst == 0 {
            return err("requests_per_second", "rate and burst must be at least 1");
        }
        if self.gossip_per_second == 0 || self.gossip_burst == 0 {
            return err("gossip_per_second", "rate and burst must be at least 1");
        }
        if self.max_concurrent_transfers == 0 {
            return err("max_concurrent_transfers", "must be at least 1");
        }
        if self.max_blob_streams == 0 || self.max_blob_streams_per_peer == 0 {
            return err(
                "max_blob_streams",
                "total and per-peer stream caps must be at least 1",
            );
        }
        if self.max_served_requests == 0 || self.max_served_requests_per_peer == 0 {
            return err(
                "max_served_requests",
                "total and per-peer request caps must be at least 1",
            );
        }
        if self.event_queue == 0 || self.event_queue > EVENT_QUEUE_CEILING {
            return err("event_queue", "must be between 1 and 65536");
        }
        Ok(())
    }
}

/// The hard ceiling of the event queue: each waiting event may hold a gossip message (up to 512 KiB).
pub const EVENT_QUEUE_CEILING: usize = 65_536;

/// One token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Per-peer token buckets. The clock is passed in, so tests can drive it.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<PeerId, Bucket>,
}

impl RateLimiter {
    /// A limiter allowing `rate` events per second per peer on average, with bursts of `burst`.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `peer` at time `now`; false when the peer is over its rate.
    pub fn allow(&mut self, peer: PeerId, now: Instant) -> bool {
        let burst = self.burst;
        let bucket = self.buckets.entry(peer).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets peers whose buckets have been full for a while, so the map does not grow without bound.
    pub fn prune(&mut self, now: Instant, idle: Duration) {
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last) < idle);
    }

    /// Forgets one peer (it disconnected).
    pub fn remove(&mut self, peer: &PeerId) {
        self.buckets.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_zero_is_not() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let bad = Limits {
            max_chunk_bytes: 0,
            ..Limits::default()
        };
        assert!(bad.validate().is_err());
        let bad = Limits {
            max_chunk_bytes: CHUNK_CEILING + 1,
            ..Limits::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn bucket_allows_burst_then_refills() {
        let mut limiter = RateLimiter::new(10, 3);
        let peer = PeerId::random();
        let t0 = Instant::now();
        assert!(limiter.allow(peer, t0));
        assert!(limiter.allow(peer, t0));
        assert!(limiter.allow(peer, t0));
        assert!(!limiter.allow(peer, t0), "burst of 3 is spent");
        assert!(
            limiter.allow(peer, t0 + Duration::from_millis(150)),
            "1.5 tokens refilled"
        );
        let other = PeerId::random();
        assert!(limiter.allow(other, t0), "buckets are per peer");
    }
}
