//! Which hosts a client asks first: a host that failed is asked after the others for a back-off that doubles
//! with each failure in a row (1 s up to 60 s) and resets when it answers; a peer that does not speak the
//! expert protocol at all (named as holding a shard, but not serving calls) is not asked again in the
//! session, nor is a host caught answering wrong ([`super::check`]). A host in back-off is still asked when
//! every other host has failed, so the order never costs an answer that some host could give.
//!
//! Among the hosts not in back-off, the fastest is asked first: each answer's time feeds the host's latency
//! estimate (a moving average, [`LATENCY_WEIGHT`] to the newest call). A host not yet measured is asked
//! before measured ones, so that every replica is timed once and a fast host that joined late is found.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// The first back-off after a failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest back-off.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The weight of the newest call in a host's latency estimate (an exponential moving average: one slow
/// call moves the estimate a quarter of the way, so a single hiccup does not reorder the hosts).
pub const LATENCY_WEIGHT: f64 = 0.25;

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
    /// Each host's estimated call time, from its answers.
    latency: BTreeMap<PeerId, Duration>,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    next: Duration,
}

impl HostHealth {
    /// `hosts` in the order to ask them at `now`: those not in back-off first, then those in back-off (the
    /// soonest to expire first); within each, unmeasured hosts first, then the fastest first, ties in their
    /// given order; peers that do not serve expert calls and banned hosts left out.
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
        // Stable: hosts not in back-off (None) ahead of the others; unmeasured (None) ahead of measured.
        ordered.sort_by_key(|p| (until(p), self.latency.get(p).copied()));
        ordered
    }

    /// `peer` answered, after `took`: its back-off is over and its latency estimate moves toward `took`.
    pub fn succeeded(&mut self, peer: PeerId, took: Duration) {
        self.backoff.remove(&peer);
        let estimate = match self.latency.get(&peer) {
            Some(old) => old.mul_f64(1.0 - LATENCY_WEIGHT) + took.mul_f64(LATENCY_WEIGHT),
            None => took,
        };
        self.latency.insert(peer, estimate);
    }

    /// `peer`'s estimated call time, once it answered.
    pub fn latency(&self, peer: &PeerId) -> Option<Duration> {
        self.latency.get(peer).copied()
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
        // Both timed alike, so the latency order is the given one.
        health.succeeded(hosts[1], Duration::ZERO);
        health.succeeded(hosts[0], Duration::ZERO);
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

    #[test]
    fn the_fastest_host_is_asked_first_after_every_host_was_timed_once() {
        let hosts = peers(3);
        let mut health = HostHealth::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        health.succeeded(hosts[0], ms(40));
        // Hosts never timed come before the measured one, in their given order.
        assert_eq!(health.order(&hosts, t0), vec![hosts[1], hosts[2], hosts[0]]);
        health.succeeded(hosts[1], ms(10));
        health.succeeded(hosts[2], ms(20));
        assert_eq!(health.order(&hosts, t0), vec![hosts[1], hosts[2], hosts[0]]);
        // One slow answer moves the estimate a quarter of the way: 10 -> 17.5 ms, still ahead of 20 ms.
        health.succeeded(hosts[1], ms(40));
        let estimate = health.latency(&hosts[1]).expect("measured");
        assert!(estimate.abs_diff(Duration::from_micros(17_500)) < Duration::from_micros(1));
        assert_eq!(health.order(&hosts, t0)[0], hosts[1]);
        // A second one passes it: 17.5 -> 23.125 ms.
        health.succeeded(hosts[1], ms(40));
        assert_eq!(health.order(&hosts, t0), vec![hosts[2], hosts[1], hosts[0]]);
        // A failure still sends the fastest host behind the others until its back-off ends.
        health.failed(hosts[2], false, t0);
        assert_eq!(health.order(&hosts, t0), vec![hosts[1], hosts[0], hosts[2]]);
        assert_eq!(health.order(&hosts, t0 + FIRST_BACKOFF)[0], hosts[2]);
    }
}
