//! Which hosts a client asks first: the healthy ones ranked by measured latency, then a host that failed,
//! asked after the others for a back-off that doubles with each failure in a row (1 s up to 60 s) and
//! resets when it answers; a peer that does not speak the expert protocol at all (named as holding a shard,
//! but not serving calls) is not asked again in the session, nor is a host caught answering wrong
//! ([`super::check`]). A host in back-off is still asked when every other host has failed, so the order
//! never costs an answer that some host could give.
//!
//! **Latency.** Each answered call's duration (request sent to answer read, whatever its row count) moves
//! the host's estimate, an exponentially weighted mean in which the newest call weighs [`LATENCY_WEIGHT`].
//! Among healthy hosts, those not yet measured come first (in their given order), then the measured ones,
//! fastest first: a host that was never asked may be the fastest, and asking it once costs one call, while
//! putting it last would leave the first host that answered in front for good, however slow.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// The first back-off after a failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest back-off.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How much the newest answered call weighs in a host's latency estimate.
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
    /// Hosts that answered: the weighted mean of their calls' durations.
    latency: BTreeMap<PeerId, Duration>,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    next: Duration,
}

impl HostHealth {
    /// `hosts` in the order to ask them at `now`: those not in back-off first (the unmeasured ones in their
    /// given order, then the measured ones fastest first), then those in back-off (the soonest to expire
    /// first); peers that do not serve expert calls and banned hosts left out.
    pub fn order(&self, hosts: &[PeerId], now: Instant) -> Vec<PeerId> {
        let mut ordered: Vec<PeerId> = hosts
            .iter()
            .copied()
            .filter(|p| !self.unsupported.contains(p) && !self.banned.contains(p))
            .collect();
        // Stable, and None sorts first: hosts not in back-off ahead of the others, unmeasured ones ahead of
        // measured ones, ties in their given order.
        ordered.sort_by_key(|p| (self.backoff_until(p, now), self.latency(p)));
        ordered
    }

    /// Whether every host of `hosts` that may be asked is in back-off at `now` (true when none may be): all
    /// failed lately, so a caller need not wait for them to recover within one call.
    pub fn all_failing(&self, hosts: &[PeerId], now: Instant) -> bool {
        self.order(hosts, now)
            .iter()
            .all(|p| self.backoff_until(p, now).is_some())
    }

    /// When `peer`'s back-off ends, if it is in one at `now`.
    fn backoff_until(&self, peer: &PeerId, now: Instant) -> Option<Instant> {
        self.backoff
            .get(peer)
            .map(|b| b.until)
            .filter(|until| *until > now)
    }

    /// `peer` answered a call that took `took`: its back-off is over, and its latency estimate moves.
    pub fn succeeded(&mut self, peer: PeerId, took: Duration) {
        self.backoff.remove(&peer);
        let estimate = match self.latency.get(&peer) {
            Some(old) => old.mul_f64(1.0 - LATENCY_WEIGHT) + took.mul_f64(LATENCY_WEIGHT),
            None => took,
        };
        self.latency.insert(peer, estimate);
    }

    /// `peer`'s latency estimate, if it answered a call yet.
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

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap_and_resets_on_an_answer() {
        let hosts = peers(2);
        let mut health = HostHealth::default();
        let t0 = Instant::now();
        // hosts[1] answered slowly once: ranked after hosts[0] while hosts[0] is healthy.
        health.succeeded(hosts[1], ms(200));
        let mut expected = FIRST_BACKOFF;
        for _ in 0..10 {
            health.failed(hosts[0], false, t0);
            let just_before = t0 + expected - Duration::from_millis(1);
            assert_eq!(health.order(&hosts, just_before)[0], hosts[1]);
            assert_eq!(health.order(&hosts, t0 + expected)[0], hosts[0]);
            expected = (expected * 2).min(MAX_BACKOFF);
        }
        assert_eq!(expected, MAX_BACKOFF);
        health.succeeded(hosts[0], ms(10));
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
    fn healthy_hosts_are_asked_unmeasured_first_then_fastest_first() {
        let hosts = peers(4);
        let mut health = HostHealth::default();
        let t0 = Instant::now();
        health.succeeded(hosts[0], ms(300));
        health.succeeded(hosts[1], ms(20));
        // hosts[2] and hosts[3] were never measured: asked first, in their given order.
        assert_eq!(
            health.order(&hosts, t0),
            vec![hosts[2], hosts[3], hosts[1], hosts[0]]
        );
        health.succeeded(hosts[2], ms(100));
        health.succeeded(hosts[3], ms(5));
        assert_eq!(
            health.order(&hosts, t0),
            vec![hosts[3], hosts[1], hosts[2], hosts[0]]
        );
        // A failing host goes after every healthy one, however fast it was.
        health.failed(hosts[3], false, t0);
        assert_eq!(
            health.order(&hosts, t0),
            vec![hosts[1], hosts[2], hosts[0], hosts[3]]
        );
        // A banned one is never asked.
        health.ban(hosts[1]);
        assert_eq!(health.order(&hosts, t0), vec![hosts[2], hosts[0], hosts[3]]);
    }

    #[test]
    fn the_latency_estimate_is_a_weighted_mean_of_the_answered_calls() {
        let host = PeerId::random();
        let mut health = HostHealth::default();
        assert_eq!(health.latency(&host), None);
        health.succeeded(host, ms(100));
        assert_eq!(health.latency(&host), Some(ms(100)));
        health.succeeded(host, ms(500));
        // 0.75 · 100 ms + 0.25 · 500 ms.
        let estimate = health.latency(&host).expect("measured");
        assert!(
            estimate.abs_diff(ms(200)) < Duration::from_micros(1),
            "{estimate:?}"
        );
        // A host that got slow falls behind one that stayed at 150 ms after a few calls.
        let other = PeerId::random();
        health.succeeded(other, ms(150));
        assert_eq!(
            health.order(&[host, other], Instant::now()),
            vec![other, host]
        );
    }

    #[test]
    fn all_failing_means_every_askable_host_is_in_backoff() {
        let hosts = peers(2);
        let mut health = HostHealth::default();
        let t0 = Instant::now();
        assert!(!health.all_failing(&hosts, t0));
        health.failed(hosts[0], false, t0);
        assert!(!health.all_failing(&hosts, t0));
        health.failed(hosts[1], false, t0);
        assert!(health.all_failing(&hosts, t0));
        assert!(!health.all_failing(&hosts, t0 + FIRST_BACKOFF));
        assert!(health.all_failing(&[], t0));
    }
}
