//! How often a node refreshes its DHT (a Kademlia bootstrap: a walk towards its own id and random ids, which
//! finds peers it does not know yet). A walk asks several peers and each answers with up to twenty others, so
//! its cost grows with the network: thirty-odd nodes in one process, each walking every half second, kept two
//! cores busy decoding each other's answers, and their heartbeats came too late to count (issue #16's 32
//! members). A node therefore walks at the configured interval while its routing table is still changing, and
//! backs off, doubling up to [`MAX_BACKOFF`] times that interval, while walks find nothing new; a change (a peer
//! found, or lost) brings it back to the configured pace from the next walk on (a wait already begun is not cut
//! short).

use std::time::Duration;

/// The slowest pace, as a multiple of the configured interval (30 s by default: a settled node walks every
/// 8 minutes, besides libp2p's own periodic walk).
pub const MAX_BACKOFF: u32 = 16;

/// When the next DHT refresh is due, from what the last ones found.
#[derive(Debug, Clone)]
pub struct DiscoveryPace {
    base: Duration,
    every: Duration,
    /// Peers in the routing table at the last refresh; `None` before the first.
    last_known: Option<usize>,
}

impl DiscoveryPace {
    /// A pace that starts at `base` (the configured discovery interval).
    pub fn new(base: Duration) -> DiscoveryPace {
        DiscoveryPace {
            base,
            every: base,
            last_known: None,
        }
    }

    /// The wait before the refresh after this one, given the peers the routing table holds now: the base
    /// interval when that number changed since the last refresh, else twice the last wait, at most
    /// [`MAX_BACKOFF`] times the base.
    pub fn next(&mut self, known_peers: usize) -> Duration {
        self.every = if self.last_known == Some(known_peers) {
            (self.every * 2).min(self.base * MAX_BACKOFF)
        } else {
            self.base
        };
        self.last_known = Some(known_peers);
        self.every
    }

    /// The routing table changed between refreshes (a peer joined it): the wait after the next refresh is the
    /// base interval again (the wait already begun runs out first).
    pub fn reset(&mut self) {
        self.every = self.base;
        self.last_known = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settled_table_backs_off_to_the_ceiling_and_a_change_restores_the_base_pace() {
        let base = Duration::from_millis(500);
        let mut pace = DiscoveryPace::new(base);
        assert_eq!(pace.next(3), base, "the first refresh keeps the base pace");
        let waits: Vec<Duration> = (0..8).map(|_| pace.next(3)).collect();
        assert_eq!(waits[0], base * 2);
        assert_eq!(waits[1], base * 4);
        assert_eq!(waits[3], base * 16);
        assert_eq!(waits[7], base * MAX_BACKOFF, "never beyond the ceiling");
        assert_eq!(pace.next(4), base, "a new peer in the table");
        assert_eq!(pace.next(4), base * 2);
        assert_eq!(pace.next(2), base, "peers lost");
        pace.next(2);
        pace.reset();
        assert_eq!(
            pace.next(2),
            base,
            "after a reset the next wait is the base again"
        );
    }
}
