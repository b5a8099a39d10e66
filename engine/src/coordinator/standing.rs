//! A member's standing: its record across rounds, kept by the coordinator from the verdicts it commits. It
//! decides three things:
//! - **admission**: a key whose reputation falls to the ban threshold is banned (it leaves the run and its
//!   heartbeats are ignored), and a banned key stays banned when it leaves and comes back;
//! - **assignment weight**: a member's weight in the expert assignment is earned, `1 + reputation` (capped),
//!   never declared: a claimed `tokens_per_second` alone wins nothing, and a new key starts at the smallest
//!   weight;
//! - what `mana status` and the metrics report per member.
//!
//! Reputation: +1 per accepted delta; −`fault_cost` per delta refused for something only its sender can cause
//! (a payload not bound to it, bad bytes, a norm over the bound, a low score, an unassigned shard); −1 per delta
//! refused as unavailable or too small, and per round the member was dropped from for missing its deltas (a
//! crash or a slow link looks like withholding, and an expert that got no tokens in its holder's batches has
//! an honest all-zero delta, so these cost less). Refusals that are the coordinator's own doing (a verdict it did not
//! reach in time, a shard it could not aggregate) cost nothing.

use std::collections::BTreeMap;

use mana_protocol::{PublicKey, RejectCode};
use serde::{Deserialize, Serialize};

/// How standing is earned and lost; part of the coordinator's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandingPolicy {
    /// Reputation lost per delta refused for its sender's fault.
    pub fault_cost: i64,
    /// A member whose reputation falls to or below this is banned (a negative number).
    pub ban_at: i64,
    /// Reputation above this earns no more assignment weight (so a long record cannot buy a monopoly).
    pub max_weight: i64,
    /// Most members at once; a new key beyond it is not admitted.
    pub max_members: usize,
    /// Most members seen from one IP address at once; a new key from an address that has them is not
    /// admitted, so that a flood of keys from one host cannot fill the run.
    pub max_members_per_ip: usize,
    /// Most banned keys remembered (the oldest bans are forgotten first).
    pub max_banned: usize,
}

impl Default for StandingPolicy {
    /// Fault cost 4, ban at −16 (four faults with nothing useful between them), weight capped at 64, 1024
    /// members, 4 per IP address (a host with a few GPUs, or a few users behind one NAT), 1024 remembered
    /// bans. (The whole coordinator state is saved as one store record of at most
    /// 64 KiB today, which a few hundred members and bans already fill: the liveness issue moves it to a blob.)
    fn default() -> StandingPolicy {
        StandingPolicy {
            fault_cost: 4,
            ban_at: -16,
            max_weight: 64,
            max_members: 1024,
            max_members_per_ip: 4,
            max_banned: 1024,
        }
    }
}

/// One member's record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standing {
    /// Deltas accepted.
    pub accepted: u64,
    /// Deltas refused for the sender's own fault.
    pub faults: u64,
    /// Deltas refused as unavailable, and rounds dropped from for missing deltas.
    pub missed: u64,
    /// The running score (see the module doc).
    pub reputation: i64,
}

/// The largest weight one accepted delta has in its shard's mean ([`Standing::delta_weight`]).
pub const DELTA_WEIGHT_CAP: u32 = 16;

impl Standing {
    /// The member's weight in the expert assignment: 1 for a new or faulty member, up to `1 + max_weight`.
    pub fn weight(&self, policy: &StandingPolicy) -> f32 {
        1.0 + self.reputation.clamp(0, policy.max_weight) as f32
    }

    /// The weight of the member's accepted delta in its shard's mean: `1 + reputation`, from 1 (a new or
    /// faulty member) to [`DELTA_WEIGHT_CAP`] (reached after 15 accepted deltas with no fault). A flood of
    /// fresh keys, each passing the checks with a delta that is harmful but not refused, moves a shard a
    /// sixteenth as much as the same number of members with a record; an honest newcomer's share grows with
    /// each round of useful work. The cap is low so that a long record cannot buy a monopoly either.
    pub fn delta_weight(&self) -> u32 {
        1 + self.reputation.clamp(0, i64::from(DELTA_WEIGHT_CAP) - 1) as u32
    }
}

/// How a refusal counts against its sender.
pub fn refusal_cost(code: RejectCode, policy: &StandingPolicy) -> i64 {
    match code {
        // The coordinator's own doing (or not the sender's to answer for).
        RejectCode::Late
        | RejectCode::StaleRound
        | RejectCode::FutureRound
        | RejectCode::NoRound
        | RejectCode::ClockSkew => 0,
        // A crash or a slow link looks the same as withholding; an expert that got no tokens in its holder's
        // batches has an honest all-zero delta: no work, no credit, but no fault either.
        RejectCode::Unavailable | RejectCode::NormTooSmall => 1,
        _ => policy.fault_cost,
    }
}

/// Every member's standing and the banned keys; serialized with the coordinator's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Standings {
    records: BTreeMap<PublicKey, Standing>,
    /// Banned keys, with the round they were banned in.
    banned: BTreeMap<PublicKey, u64>,
}

impl Standings {
    /// `node`'s record (a default one if it has none yet).
    pub fn get(&self, node: &PublicKey) -> Standing {
        self.records.get(node).copied().unwrap_or_default()
    }

    /// Every record, by key.
    pub fn records(&self) -> &BTreeMap<PublicKey, Standing> {
        &self.records
    }

    /// Whether `node` is banned.
    pub fn is_banned(&self, node: &PublicKey) -> bool {
        self.banned.contains_key(node)
    }

    /// How many keys are banned.
    pub fn banned_count(&self) -> usize {
        self.banned.len()
    }

    /// An accepted delta from `node`.
    pub fn accepted(&mut self, node: PublicKey) {
        let s = self.records.entry(node).or_default();
        s.accepted += 1;
        s.reputation = s.reputation.saturating_add(1);
    }

    /// A refused delta from `node`.
    pub fn refused(&mut self, node: PublicKey, code: RejectCode, policy: &StandingPolicy) {
        let cost = refusal_cost(code, policy);
        if cost == 0 {
            return;
        }
        let s = self.records.entry(node).or_default();
        if cost >= policy.fault_cost {
            s.faults += 1;
        } else {
            s.missed += 1;
        }
        s.reputation = s.reputation.saturating_sub(cost);
    }

    /// `node` was dropped from a round for missing its deltas.
    pub fn dropped(&mut self, node: PublicKey) {
        let s = self.records.entry(node).or_default();
        s.missed += 1;
        s.reputation = s.reputation.saturating_sub(1);
    }

    /// Bans every key at or below the threshold (in round `round`) and returns them, newly banned.
    pub fn ban_faulty(&mut self, round: u64, policy: &StandingPolicy) -> Vec<PublicKey> {
        let newly: Vec<PublicKey> = self
            .records
            .iter()
            .filter(|(k, s)| s.reputation <= policy.ban_at && !self.banned.contains_key(k))
            .map(|(k, _)| *k)
            .collect();
        for k in &newly {
            self.banned.insert(*k, round);
            self.records.remove(k);
        }
        while self.banned.len() > policy.max_banned {
            let Some(oldest) = self
                .banned
                .iter()
                .min_by_key(|(k, r)| (**r, **k))
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.banned.remove(&oldest);
        }
        newly
    }

    /// Bounds the records: members' are always kept; of the departed keys', at most `keep`, debts first
    /// (the deepest first: leaving and coming back must not clear a debt), then the best reputations (a
    /// member that restarts or loses its link for a while comes back with its record).
    pub fn forget_departed(&mut self, is_member: impl Fn(&PublicKey) -> bool, keep: usize) {
        let mut departed: Vec<(bool, i64, PublicKey)> = self
            .records
            .iter()
            .filter(|(k, _)| !is_member(k))
            .map(|(k, s)| (s.reputation >= 0, s.reputation.saturating_abs(), *k))
            .collect();
        if departed.len() <= keep {
            return;
        }
        // Debts (false) before credits, larger magnitudes first.
        departed.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        for (_, _, k) in departed.split_off(keep) {
            self.records.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_ban_and_work_earns_weight() {
        let p = StandingPolicy::default();
        let (good, bad) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let mut s = Standings::default();
        for _ in 0..100 {
            s.accepted(good);
        }
        assert_eq!(s.get(&good).weight(&p), 65.0, "capped");
        assert_eq!(
            s.get(&bad).weight(&p),
            1.0,
            "a new key starts at the smallest weight"
        );
        s.refused(bad, RejectCode::Late, &p);
        assert_eq!(
            s.get(&bad).reputation,
            0,
            "the coordinator's lateness costs nothing"
        );
        s.refused(bad, RejectCode::Unavailable, &p);
        assert_eq!(s.get(&bad).reputation, -1);
        for _ in 0..3 {
            s.refused(bad, RejectCode::LowScore, &p);
        }
        assert!(s.ban_faulty(1, &p).is_empty(), "-13 is not yet banned");
        s.refused(bad, RejectCode::NotBound, &p);
        assert_eq!(s.ban_faulty(2, &p), vec![bad]);
        assert!(s.is_banned(&bad) && !s.is_banned(&good));
    }

    #[test]
    fn debts_survive_departure_and_bans_are_bounded() {
        let p = StandingPolicy {
            max_banned: 2,
            ..StandingPolicy::default()
        };
        let mut s = Standings::default();
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let c = PublicKey([3; 32]);
        s.accepted(a);
        s.accepted(a);
        s.accepted(c);
        s.dropped(b);
        s.forget_departed(|_| false, 2);
        assert_eq!(
            s.records().len(),
            2,
            "the debtor and the best departed record are kept"
        );
        assert_eq!(s.get(&b).reputation, -1);
        assert_eq!(s.get(&a).reputation, 2);
        assert_eq!(s.get(&c), Standing::default());
        for i in 0..5u8 {
            let k = PublicKey([10 + i; 32]);
            for _ in 0..4 {
                s.refused(k, RejectCode::BadPayload, &p);
            }
            s.ban_faulty(u64::from(i), &p);
        }
        assert_eq!(s.banned_count(), 2);
        assert!(s.is_banned(&PublicKey([14; 32])) && !s.is_banned(&PublicKey([10; 32])));
    }
}
