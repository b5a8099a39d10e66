//! Who judges a shard, and when their attestations carry it: the quorum rule of the light-coordinator design,
//! in which the holders of a shard and a few verifiers drawn from the other members score its deltas, compute
//! its next state, and sign what they found; the coordinator only counts signatures.
//!
//! - **Judges** of a shard in a round ([`draw_judges`], [`Draw`]): its holders (the participants assigned
//!   it; for a shard held by many, such as the trunk, at most [`JudgingRule::max_holder_judges`] of them,
//!   the first by blake3 of the round's public seed, the shard and the key), and
//!   [`JudgingRule::verifiers_per_shard`] verifiers drawn from the round's other participants: positions in
//!   the participants sorted by key, each from blake3 of the seed, the shard and a counter, a holder or a key
//!   drawn already skipped (all of them when there are no more than wanted). Either way the draw is the same
//!   for everyone who knows the seed and known to no one before it, and a shard costs a few hashes, not one
//!   per participant (a round of 1,409 shards and 1,000 participants took about a second the other way). The seed is the round's score seed, fixed only once the
//!   deltas are in (`crate::round::score_seed`), so the coordinator does not choose the verifiers and a
//!   member cannot know before sending its delta whether it will judge a given shard.
//! - **Quorum** ([`tally`]): a shard's result stands when a strict majority of its judges signed the same
//!   result, and at least one of them is a verifier when verifiers were drawn, so that a shard is never
//!   judged by its holders alone. Judges that signed another result are the dissenters; judges that signed
//!   nothing are absent. Without a quorum the shard keeps its previous state for the round.
//! - **What colluding Sybils can do** ([`capture_probability`], [`stall_probability`]): with a share `p` of
//!   the members, Sybils decide a shard's result only with a quorum of their own, and stall it (no quorum:
//!   the shard holds) when the honest judges are fewer than a quorum. docs/security.md tabulates both.

use std::collections::{BTreeMap, BTreeSet};

use mana_protocol::{CheckpointManifest, PublicKey, ShardId};
use serde::{Deserialize, Serialize};

/// Domain tag of the judges' draw (a new draw rule gets a new tag).
const DRAW_TAG: &[u8] = b"mana/judge-draw/v3";

/// How many judge each shard: a run setting, published with every call (see [`check_call_judges`]).
pub use mana_protocol::JudgingRule;

/// The judges of one shard in one round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Judges {
    /// Holders of the shard that judge it, in draw order.
    pub holders: Vec<PublicKey>,
    /// Verifiers drawn from the other participants, in draw order.
    pub verifiers: Vec<PublicKey>,
}

impl Judges {
    /// How many judge the shard.
    pub fn len(&self) -> usize {
        self.holders.len() + self.verifiers.len()
    }

    /// Whether nobody judges the shard (nobody holds it and nobody else could be drawn).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `key` judges the shard.
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.holders.contains(key) || self.verifiers.contains(key)
    }

    /// Signatures a result needs: a strict majority of the judges.
    pub fn quorum(&self) -> usize {
        self.len() / 2 + 1
    }
}

/// The rank of `key` in the draw for `shard` under `seed`: lower is drawn first.
fn rank(seed: u64, shard: ShardId, key: &PublicKey) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(DRAW_TAG);
    h.update(&seed.to_le_bytes());
    h.update(shard.to_string().as_bytes());
    h.update(&key.0);
    *h.finalize().as_bytes()
}

/// The first `count` of `keys` (distinct) in the draw for `shard` under `seed`.
fn drawn(
    seed: u64,
    shard: ShardId,
    keys: impl IntoIterator<Item = PublicKey>,
    count: usize,
) -> Vec<PublicKey> {
    let keys: BTreeSet<PublicKey> = keys.into_iter().collect();
    let mut ranked: Vec<([u8; 32], PublicKey)> = keys
        .into_iter()
        .map(|k| (rank(seed, shard, &k), k))
        .collect();
    ranked.sort();
    ranked.into_iter().take(count).map(|(_, k)| k).collect()
}

/// The judges of `shard` in the round whose public seed is `seed`: up to `rule.max_holder_judges` of its
/// `holders`, and `rule.verifiers(escalated)` of the round's other `participants` (fewer when there are not
/// enough; twice the verifiers for an [`escalated`] shard). The order of `holders` and `participants` does not
/// matter, nor do duplicates. A round's many shards share one [`Draw`] instead.
pub fn draw_judges(
    seed: u64,
    shard: ShardId,
    holders: &[PublicKey],
    participants: &[PublicKey],
    rule: &JudgingRule,
    escalated: bool,
) -> Judges {
    Draw::new(seed, participants).judges(shard, holders, rule, escalated)
}

/// Whether `shard` is escalated in round `round` whose base checkpoint is `base`: its state did not move in
/// the round before (its entry is older than that round: held for want of a quorum, every delta refused, or
/// no delta at all). Then it gets twice the verifiers ([`JudgingRule::verifiers`]): two colluders who split
/// a shard's judges between them and the honest ones (no quorum: the shard holds) face a majority of honest
/// judges in the next round, are outvoted and charged, instead of holding the shard round after round at no
/// cost. Every judge holds the base checkpoint, so everyone tells the same. Round 1 (on the genesis
/// checkpoint) escalates nothing; nor does a shard the base does not list.
pub fn escalated(base: &CheckpointManifest, round: u64, shard: &ShardId) -> bool {
    base.shard(shard)
        .is_some_and(|e| e.round.saturating_add(1) < round)
}

/// One round's draw of judges: its participants sorted by key once, for every shard's draw.
pub struct Draw {
    seed: u64,
    /// The participants, sorted, distinct.
    pool: Vec<PublicKey>,
}

impl Draw {
    /// The draw of the round whose public seed is `seed` among `participants` (any order, duplicates
    /// ignored).
    pub fn new(seed: u64, participants: &[PublicKey]) -> Draw {
        let mut pool = participants.to_vec();
        pool.sort();
        pool.dedup();
        Draw { seed, pool }
    }

    /// The judges of `shard` (see [`draw_judges`]).
    pub fn judges(
        &self,
        shard: ShardId,
        holders: &[PublicKey],
        rule: &JudgingRule,
        escalated: bool,
    ) -> Judges {
        let holding: BTreeSet<PublicKey> = holders.iter().copied().collect();
        let verifiers = rule.verifiers(escalated) as usize;
        if !self.pool.is_empty() && self.pool.iter().all(|k| holding.contains(k)) {
            // Held by every participant (the trunk): nobody is left outside to verify it, and its holders are
            // not the coordinator's choice. All its judges are drawn among them, as many as holders and
            // verifiers together would be, so that the shard every token passes through is not decided by
            // three (two colluders of three would be a quorum).
            return Judges {
                holders: drawn(
                    self.seed,
                    shard,
                    holding.iter().copied(),
                    rule.max_holder_judges as usize + verifiers,
                ),
                verifiers: Vec::new(),
            };
        }
        Judges {
            holders: drawn(
                self.seed,
                shard,
                holding.iter().copied(),
                rule.max_holder_judges as usize,
            ),
            verifiers: self.verifiers(shard, &holding, verifiers),
        }
    }

    /// `count` participants that are not in `holding`, drawn by position (see the module doc).
    fn verifiers(
        &self,
        shard: ShardId,
        holding: &BTreeSet<PublicKey>,
        count: usize,
    ) -> Vec<PublicKey> {
        let n = self.pool.len();
        let held = self.pool.iter().filter(|k| holding.contains(k)).count();
        let available = n - held;
        if available <= count {
            // All of them, in the rank order of the holders' draw.
            let others = self.pool.iter().copied().filter(|k| !holding.contains(k));
            return drawn(self.seed, shard, others, count);
        }
        let mut out: Vec<PublicKey> = Vec::with_capacity(count);
        let prefix = {
            let mut h = blake3::Hasher::new();
            h.update(DRAW_TAG);
            h.update(b"/verifier");
            h.update(&self.seed.to_le_bytes());
            h.update(shard.to_string().as_bytes());
            h
        };
        // More than `count` keys are free, so each try finds a new one with odds of at least
        // 1 / n: the bound is never reached but by odds far below any hash collision.
        let most_tries = 64 * (n as u64) + 64;
        for i in 0..most_tries {
            let mut h = prefix.clone();
            h.update(&i.to_le_bytes());
            let mut first = [0u8; 8];
            first.copy_from_slice(&h.finalize().as_bytes()[..8]);
            let k = self.pool[(u64::from_le_bytes(first) % n as u64) as usize];
            if !holding.contains(&k) && !out.contains(&k) {
                out.push(k);
                if out.len() == count {
                    return out;
                }
            }
        }
        // Unreachable in practice; still a draw everyone agrees on.
        let others = self.pool.iter().copied().filter(|k| !holding.contains(k));
        drawn(self.seed, shard, others, count)
    }
}

/// Why a call's judges are not the public draw ([`check_call_judges`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrawMismatch {
    /// A delta's sender is no participant of the round.
    #[error("a delta's sender {0} is no participant of the round")]
    NoParticipant(u32),
    /// A shard's judges are not the ones drawn (participant indices, sorted).
    #[error(
        "{shard}: the call names holders {holders:?} and verifiers {verifiers:?}, the draw gives holders {drawn_holders:?} and verifiers {drawn_verifiers:?}"
    )]
    NotDrawn {
        /// The shard.
        shard: ShardId,
        /// The judging holders the call names.
        holders: Vec<u32>,
        /// The verifiers the call names.
        verifiers: Vec<u32>,
        /// The judging holders the draw gives.
        drawn_holders: Vec<u32>,
        /// The verifiers the draw gives.
        drawn_verifiers: Vec<u32>,
    },
}

/// Checks that every shard's judges in `call` (round `ann`'s, on the base checkpoint `base`) are the draw of
/// its judging rule from the round's score seed, among the participants with deltas in the call (the round's
/// participants still in it: the coordinator drops the others' deltas before it calls), holders among those
/// assigned the shard, verifiers twice as many for an [`escalated`] shard. Every judge runs it before
/// judging: a coordinator that named its own verifiers, or left out a holder, could otherwise hand a shard to
/// judges of its choice. The order in which the call lists them does not matter.
pub fn check_call_judges(
    ann: &mana_protocol::RoundAnnouncement,
    call: &mana_protocol::AggregationCall,
    base: &CheckpointManifest,
) -> Result<(), DrawMismatch> {
    let mut pool: BTreeMap<PublicKey, u32> = BTreeMap::new();
    for d in call.shards.iter().flat_map(|c| &c.deltas) {
        let p = ann
            .participants
            .get(d.sender as usize)
            .ok_or(DrawMismatch::NoParticipant(d.sender))?;
        pool.insert(p.node, d.sender);
    }
    let keys: Vec<PublicKey> = pool.keys().copied().collect();
    let draw = Draw::new(crate::round::call_score_seed(call), &keys);
    let at = |keys: &[PublicKey]| {
        let mut v: Vec<u32> = keys.iter().filter_map(|k| pool.get(k).copied()).collect();
        v.sort_unstable();
        v
    };
    let sorted = |v: &[u32]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    };
    for part in &call.shards {
        let holders: Vec<PublicKey> = ann
            .participants
            .iter()
            .filter(|p| pool.contains_key(&p.node) && p.shards.contains(&part.shard))
            .map(|p| p.node)
            .collect();
        let judges = draw.judges(
            part.shard,
            &holders,
            &call.judging,
            escalated(base, ann.round, &part.shard),
        );
        let (drawn_holders, drawn_verifiers) = (at(&judges.holders), at(&judges.verifiers));
        let (named_holders, named_verifiers) = (sorted(&part.holders), sorted(&part.verifiers));
        if named_holders != drawn_holders || named_verifiers != drawn_verifiers {
            return Err(DrawMismatch::NotDrawn {
                shard: part.shard,
                holders: named_holders,
                verifiers: named_verifiers,
                drawn_holders,
                drawn_verifiers,
            });
        }
    }
    Ok(())
}

/// How a shard's attestations came out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tally<R> {
    /// A quorum signed `result`.
    Quorum {
        /// The result they signed.
        result: R,
        /// Who signed it, sorted.
        signers: Vec<PublicKey>,
        /// Judges who signed another result, sorted.
        dissenters: Vec<PublicKey>,
        /// Judges who signed nothing, sorted.
        absent: Vec<PublicKey>,
    },
    /// No result has a quorum: the shard keeps its previous state.
    NoQuorum {
        /// Each result signed, with its signers (sorted), most signed first.
        split: Vec<(R, Vec<PublicKey>)>,
        /// Judges who signed nothing, sorted.
        absent: Vec<PublicKey>,
    },
}

/// Counts the results the judges of a shard signed (`signed`: at most one result per signer; signers who are
/// not judges are ignored). A result stands with [`Judges::quorum`] signatures, among which at least one
/// verifier's when verifiers were drawn.
pub fn tally<R: Ord + Clone>(judges: &Judges, signed: &BTreeMap<PublicKey, R>) -> Tally<R> {
    let mut groups: BTreeMap<&R, Vec<PublicKey>> = BTreeMap::new();
    for (signer, result) in signed {
        if judges.contains(signer) {
            groups.entry(result).or_default().push(*signer);
        }
    }
    let absent: Vec<PublicKey> = {
        let mut a: Vec<PublicKey> = judges
            .holders
            .iter()
            .chain(&judges.verifiers)
            .filter(|k| !signed.contains_key(k))
            .copied()
            .collect();
        a.sort();
        a.dedup();
        a
    };
    let carries = |signers: &[PublicKey]| {
        signers.len() >= judges.quorum()
            && (judges.verifiers.is_empty() || signers.iter().any(|k| judges.verifiers.contains(k)))
    };
    // A quorum is a strict majority, so at most one result has one.
    if let Some((result, signers)) = groups.iter().find(|(_, s)| carries(s)) {
        let result = (*result).clone();
        let signers = signers.clone();
        let mut dissenters: Vec<PublicKey> = groups
            .iter()
            .filter(|(r, _)| **r != &result)
            .flat_map(|(_, s)| s.iter().copied())
            .collect();
        dissenters.sort();
        return Tally::Quorum {
            result,
            signers,
            dissenters,
            absent,
        };
    }
    let mut split: Vec<(R, Vec<PublicKey>)> =
        groups.into_iter().map(|(r, s)| (r.clone(), s)).collect();
    split.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(&b.0)));
    Tally::NoQuorum { split, absent }
}

/// Binomial probabilities P(X = k) for X ~ Bin(n, p), k = 0..=n.
fn binomial(n: usize, p: f64) -> Vec<f64> {
    let mut out = vec![0.0; n + 1];
    for (k, slot) in out.iter_mut().enumerate() {
        let mut c = 1.0f64;
        for i in 0..k {
            c = c * (n - i) as f64 / (i + 1) as f64;
        }
        *slot = c * p.powi(k as i32) * (1.0 - p).powi((n - k) as i32);
    }
    out
}

/// The probability that Sybils holding a share `p` of the members decide a shard's result (a quorum of their
/// own, with one of their verifiers in it when verifiers are drawn), for `holders` judging holders and
/// `verifiers` drawn verifiers, each judge a Sybil with probability `p` independently (holders are assigned
/// by capacity and standing, verifiers drawn; counting both as draws is the Sybils' best case when they
/// earned standing like honest members).
pub fn capture_probability(holders: usize, verifiers: usize, p: f64) -> f64 {
    let quorum = (holders + verifiers) / 2 + 1;
    let (h, v) = (binomial(holders, p), binomial(verifiers, p));
    let mut total = 0.0;
    for (a, ph) in h.iter().enumerate() {
        for (b, pv) in v.iter().enumerate() {
            if a + b >= quorum && (verifiers == 0 || b >= 1) {
                total += ph * pv;
            }
        }
    }
    total
}

/// The probability that Sybils with a share `p` of the members stall a shard for a round (the honest judges
/// fall short of a quorum, or no honest verifier is among them), under the same model as
/// [`capture_probability`]. A stalled shard keeps its previous state: progress lost, nothing wrong committed.
pub fn stall_probability(holders: usize, verifiers: usize, p: f64) -> f64 {
    let quorum = (holders + verifiers) / 2 + 1;
    let (h, v) = (binomial(holders, p), binomial(verifiers, p));
    let mut total = 0.0;
    for (a, ph) in h.iter().enumerate() {
        for (b, pv) in v.iter().enumerate() {
            let honest = (holders - a) + (verifiers - b);
            let honest_verifier = verifiers == 0 || verifiers - b >= 1;
            if honest < quorum || !honest_verifier {
                total += ph * pv;
            }
        }
    }
    total
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn keys(ns: std::ops::Range<u8>) -> Vec<PublicKey> {
        ns.map(key).collect()
    }

    #[test]
    fn the_draw_is_deterministic_order_free_and_keeps_holders_out_of_the_verifiers() {
        let rule = JudgingRule {
            verifiers_per_shard: 3,
            max_holder_judges: 2,
        };
        let shard = ShardId::Expert { layer: 1, index: 2 };
        let holders = keys(0..4);
        let participants = keys(0..20);
        let a = draw_judges(7, shard, &holders, &participants, &rule, false);
        let mut reversed = participants.clone();
        reversed.reverse();
        reversed.extend(keys(0..3)); // duplicates change nothing
        let b = draw_judges(7, shard, &holders, &reversed, &rule, false);
        assert_eq!(a, b);
        assert_eq!((a.holders.len(), a.verifiers.len()), (2, 3));
        assert!(a.holders.iter().all(|k| holders.contains(k)));
        assert!(a.verifiers.iter().all(|k| !holders.contains(k)));
        // Another seed or another shard draws others (with 16 candidates, the same three by chance is rare).
        assert_ne!(
            draw_judges(8, shard, &holders, &participants, &rule, false).verifiers,
            a.verifiers
        );
        assert_ne!(
            draw_judges(7, ShardId::Trunk, &holders, &participants, &rule, false).verifiers,
            a.verifiers
        );
        // Too few others: all of them.
        let few = draw_judges(7, shard, &holders, &keys(0..5), &rule, false);
        assert_eq!(few.verifiers, vec![key(4)]);
        // Held by every participant: holders and verifiers together, all drawn among the holders; twice
        // the verifiers when escalated; all of them when there are fewer.
        let everyone = draw_judges(
            7,
            ShardId::Trunk,
            &participants,
            &participants,
            &rule,
            false,
        );
        assert_eq!((everyone.holders.len(), everyone.verifiers.len()), (5, 0));
        let escalated = draw_judges(7, ShardId::Trunk, &participants, &participants, &rule, true);
        assert_eq!((escalated.holders.len(), escalated.verifiers.len()), (8, 0));
        assert!(
            everyone
                .holders
                .iter()
                .all(|k| escalated.holders.contains(k))
        );
        let four = keys(0..4);
        assert_eq!(
            draw_judges(7, ShardId::Trunk, &four, &four, &rule, false)
                .holders
                .len(),
            4
        );
    }

    #[test]
    fn every_member_is_drawn_about_equally_often() {
        let rule = JudgingRule {
            verifiers_per_shard: 2,
            max_holder_judges: 2,
        };
        let participants = keys(0..10);
        let mut counts = BTreeMap::<PublicKey, u32>::new();
        for seed in 0..2000u64 {
            for v in draw_judges(seed, ShardId::Trunk, &[], &participants, &rule, false).verifiers {
                *counts.entry(v).or_default() += 1;
            }
        }
        // 4000 draws over 10 keys: 400 each on average.
        assert!(
            counts.values().all(|&c| (320..=480).contains(&c)),
            "{counts:?}"
        );
    }

    fn judges(holders: u8, verifiers: u8) -> Judges {
        Judges {
            holders: keys(0..holders),
            verifiers: keys(100..100 + verifiers),
        }
    }

    #[test]
    fn a_majority_with_a_verifier_carries_a_shard() {
        let j = judges(2, 2); // quorum 3
        let signed: BTreeMap<PublicKey, u8> = [
            (key(0), 1),
            (key(1), 1),
            (key(100), 1),
            (key(101), 2),
            (key(50), 2),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            tally(&j, &signed),
            Tally::Quorum {
                result: 1,
                signers: vec![key(0), key(1), key(100)],
                dissenters: vec![key(101)], // key(50) judges nothing: ignored
                absent: vec![],
            }
        );
    }

    #[test]
    fn holders_alone_or_a_split_do_not_carry_a_shard() {
        // Three holders agree, the only verifier is silent: a majority of four, but no verifier in it.
        let j = judges(3, 1);
        let signed: BTreeMap<PublicKey, u8> = [(key(0), 1), (key(1), 1), (key(2), 1)]
            .into_iter()
            .collect();
        assert_eq!(
            tally(&j, &signed),
            Tally::NoQuorum {
                split: vec![(1, vec![key(0), key(1), key(2)])],
                absent: vec![key(100)],
            }
        );
        // Two colluding holders against an honest holder and the verifier: two against two, no quorum.
        let signed: BTreeMap<PublicKey, u8> =
            [(key(0), 9), (key(1), 9), (key(2), 1), (key(100), 1)]
                .into_iter()
                .collect();
        let Tally::NoQuorum { split, absent } = tally(&j, &signed) else {
            panic!("no quorum expected");
        };
        assert_eq!(split.len(), 2);
        assert!(absent.is_empty());
        // Without verifiers drawn (too few members), a majority of holders carries it.
        let j = judges(3, 0);
        assert!(matches!(
            tally(&j, &signed),
            Tally::Quorum { result: 9, .. }
        ));
    }

    /// The table in docs/security.md: `cargo test -p mana-engine --lib print_the_odds -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "prints the odds table of docs/security.md"]
    fn print_the_odds() {
        let shares = [0.05, 0.10, 0.20, 1.0 / 3.0];
        for (r, v) in [
            (2, 0),
            (2, 1),
            (2, 2),
            (2, 3),
            (2, 4),
            (3, 2),
            (3, 3),
            (3, 0),
            (5, 0),
            (7, 0),
        ] {
            let q = (r + v) / 2 + 1;
            let cells: Vec<String> = shares
                .iter()
                .map(|&p| {
                    format!(
                        "{:.1e} / {:.2}",
                        capture_probability(r, v, p),
                        stall_probability(r, v, p)
                    )
                })
                .collect();
            println!(
                "| r = {r}, v = {v} ({q} of {}) | {} |",
                r + v,
                cells.join(" | ")
            );
        }
    }

    #[test]
    fn sybil_odds_follow_the_binomial() {
        // No Sybils: no capture, no stall; all Sybils: always.
        assert_eq!(capture_probability(2, 2, 0.0), 0.0);
        assert_eq!(stall_probability(2, 2, 0.0), 0.0);
        assert!((capture_probability(2, 2, 1.0) - 1.0).abs() < 1e-12);
        // Two holders, no verifier (quorum 2): both must be Sybils.
        assert!((capture_probability(2, 0, 0.1) - 0.01).abs() < 1e-12);
        // More judges, fewer captures at a minority share.
        let p = 0.2;
        assert!(capture_probability(2, 4, p) < capture_probability(2, 2, p));
        assert!(capture_probability(2, 2, p) < capture_probability(2, 0, p));
        // Against a direct count over every assignment of 4 judges.
        let mut direct = 0.0;
        for mask in 0u32..16 {
            let sybils = mask.count_ones() as usize;
            let verifier_sybil = mask & 0b1100 != 0;
            if sybils >= 3 && verifier_sybil {
                direct += p.powi(sybils as i32) * (1.0 - p).powi(4 - sybils as i32);
            }
        }
        assert!((capture_probability(2, 2, p) - direct).abs() < 1e-12);
    }
}
