//! Which hosts a client asks first: a host that failed is asked after the others for a back-off that doubles
//! with each failure in a row (1 s up to 60 s) and resets when it answers; a peer that does not speak the
//! expert protocol at all (named as holding a shard, but not serving calls) is not asked again in the
//! session, nor is a host caught answering wrong ([`super::check`]). A host in back-off is still asked when
//! every other host has failed, so the order never costs an answer that some host could give.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// The first back-off after a failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest back-off.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What a client has learned about its hosts in this session.
#[derive(Debug, Default)]
pub struct HostHealth {
    /// Peers that do not serve expert calls.
    unsupported: BTreeSet<PeerId>,
    /// Hosts caught answering wrong.
    banned: BTreeSet<PeerId>,
    /// Hosts that failed: asked after the others until `until`; `next` is the back-off after another
    /// failure.
    backoff: BTreeMap<PeerId, Backoff>,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    next: Duration,
}

impl HostHealth {
    /// `hosts` in the order to ask them at `now`: those not in back-off first, then those in back-off (the
    /// soonest to expire first), each group in its given order; peers that do not serve expert calls and
    /// banned hosts left out.
    pub fn order(&self, hosts: &[PeerId], now: Instant) -> Vec<PeerId> {
        let until = |p: &PeerId| {
            self.backoff
                .get(p)
                .map(|b| b.until)
                .filter(|until| *until > now)
        };
        let mut ordered: Vec<PeerId> = hosts
            .iter()
            .copied()
            .filter(|p| !self.unsupported.contains(p) && !self.banned.contains(p))
            .collect();
        // Stable: hosts not in back-off (None) keep their order ahead of the others.
        ordered.sort_by_key(until);
        ordered
    }

    /// `peer` answered: its back-off is over.
    pub fn succeeded(&mut self, peer: PeerId) {
        self.backoff.remove(&peer);
    }

    /// `peer` failed at `now`: it does not serve expert calls at all (`unsupported`), or it failed this time
    /// (timeout, refusal, busy, a bad answer) and goes into a back-off twice as long as its last.
    pub fn failed(&mut self, peer: PeerId, unsupported: bool, now: Instant) {
        if unsupported {
            self.unsupported.insert(peer);
            self.backoff.remove(&peer);
            return;
        }
        let next = self.backoff.get(&peer).map_or(FIRST_BACKOFF, |b| b.next);
        self.backoff.insert(
            peer,
            Backoff {
                until: now + next,
                next: (next * 2).min(MAX_BACKOFF),
            },
        );
    }

    /// Bans `peer`, caught answering wrong, for the rest of the session.
    pub fn ban(&mut self, peer: PeerId) {
        if self.banned.insert(peer) {
            tracing::warn!(%peer, "expert host answered wrong; banned");
        }
    }

    /// The hosts banned so far.
    pub fn banned(&self) -> Vec<PeerId> {
        self.banned.iter().copied().collect()
    }

    /// Whether `peer` was found not to serve expert calls.
    pub fn is_unsupported(&self, peer: &PeerId) -> bool {
        self.unsupported.contains(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    #[test]
    fn a_failed_host_is_asked_last_until_its_backoff_ends() {
        let hosts = peers(3);
        let mut health = HostHealth::default();
        let t0 = Instant::now();
        assert_eq!(health.order(&hosts, t0), hosts);
        health.failed(hosts[0], false, t0);
        assert_eq!(health.order(&hosts, t0), vec![hosts[1], hosts[2], hosts[0]]);
        // Back in front once the first back-off (1 s) is over.
        assert_eq!(health.order(&hosts, t0 + FIRST_BACKOFF), hosts);
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap_and_resets_on_an_answer() {
        let hosts = peers(2);
        let mut health = HostHealth::default();
        let t0 = Instant::now();
        let mut expected = FIRST_BACKOFF;
        for _ in 0..10 {
            health.failed(hosts[0], false, t0);
            let just_before = t0 + expected - Duration::from_millis(1);
            assert_eq!(health.order(&hosts, just_before)[0], hosts[1]);
            assert_eq!(health.order(&hosts, t0 + expected)[0], hosts[0]);
            expected = (expected * 2).min(MAX_BACKOFF);
        }
        assert_eq!(expected, MAX_BACKOFF);
        health.succeeded(hosts[0]);
        assert_eq!(health.order(&hosts, t0), hosts);
        health.failed(hosts[0], false, t0);
        assert_eq!(health.order(&hosts, t0 + FIRST_BACKOFF), hosts);
    }

    #[test]
    fn hosts_in_backoff_are_still_asked_and_the_soonest_back_comes_first() {
        let hosts = peers(2);
        let mut health = HostHealth::default();
        let t0 = Instant::now();
        health.failed(hosts[0], false, t0);
        health.failed(hosts[0], false, t0); // 2 s
        health.failed(hosts[1], false, t0); // 1 s
        assert_eq!(health.order(&hosts, t0), vec![hosts[1], hosts[0]]);
    }

    #[test]
    fn a_peer_without_the_protocol_is_never_asked_again() {
        let hosts = peers(2);
        let mut health = HostHealth::default();
        let t0 = Instant::now();
        health.failed(hosts[1], true, t0);
        assert!(health.is_unsupported(&hosts[1]));
        assert_eq!(health.order(&hosts, t0 + MAX_BACKOFF * 2), vec![hosts[0]]);
    }

    #[test]
    fn a_banned_host_is_never_asked_again() {
        let hosts = peers(2);
        let mut health = HostHealth::default();
        let t0 = Instant::now();
        health.ban(hosts[0]);
        assert_eq!(health.banned(), vec![hosts[0]]);
        assert_eq!(health.order(&hosts, t0 + MAX_BACKOFF * 2), vec![hosts[1]]);
    }
}
