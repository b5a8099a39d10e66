//! The norm bounds on a contribution: a delta's L2 norm must lie between `min_ratio` and `max_ratio` times a
//! reference norm taken from *other* senders' deltas, so that no sender moves its own bounds.
//!
//! The reference for a delta of `sender` to `shard`, from this round's deltas and the recently accepted ones
//! (both without any of `sender`'s):
//! - its **class** median: the trunk alone, or every expert of one MoE layer ([`norm_class`]: same shape, same
//!   kind of gradient). An expert has only `replication` holders, too few for a median of its own to outvote a
//!   forged delta; a layer's experts together have many;
//! - its **shard** median, once the shard has accepted deltas of others: it catches a scaled delta where the
//!   class is noisy, and the larger of the two is the upper reference, so that an expert that got no tokens for
//!   a while (history near 0) does not refuse every honest delta once it is routed to again.
//!
//! The lower bound applies to the trunk alone, against its class median (every participant's trunk delta:
//! their norms stay within a factor of two of each other). An expert's gradient is as large as the tokens
//! routed to it, which vary by orders of magnitude from node to node and round to round (a 50-round network
//! run refused honest expert deltas at 1% of their layer's median), so for experts only an all-zero delta is
//! refused.
//!
//! Why "without the sender": a sender whose accepted norms enter its own reference can ratchet it, each round
//! sending a little more than the last accepted; here its own history never counts for it, and among others'
//! references it is one sample of many in a median.

use std::collections::BTreeMap;

use mana_kernels::model::ShardId;
use mana_protocol::validation::median_norm;
use mana_protocol::{AggregationCall, NormRecord, PublicKey, RoundAnnouncement};
use serde::{Deserialize, Serialize};

/// Norms below this are not references: a delta of an expert that no token reached is rounding noise (a
/// 2-node run had expert deltas of 3.7e-14 beside honest ones of 2e-3), and a median over such samples would
/// put every honest delta of the shard or layer "over 10 x the median". Any real step of a shard moves it by
/// far more: one parameter moved by 1e-6 already gives 1e-6.
pub const NEGLIGIBLE_NORM: f32 = 1e-9;

/// One delta's norm, with its shard and sender.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NormSample {
    /// The shard the delta updates.
    pub shard: ShardId,
    /// Who sent it.
    pub sender: PublicKey,
    /// Its L2 norm.
    pub norm: f32,
}

/// Where a delta's norm stands against its references.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormVerdict {
    /// Within bounds (or no reference exists yet: the first deltas of a class are judged by their score).
    Within,
    /// Over `max_ratio` × `reference`.
    TooLarge {
        /// The upper reference norm.
        reference: f32,
    },
    /// Under `min_ratio` × `reference`.
    TooSmall {
        /// The lower reference norm.
        reference: f32,
    },
}

/// The sender a call's norm record of a non-participant stands for: a key nobody holds (a hash, not a point
/// anyone knows the secret of), so such a record is never anyone's own.
fn no_participant() -> PublicKey {
    PublicKey(*blake3::hash(b"mana/norm-history/no-participant").as_bytes())
}

/// A call's norm history as samples: each record's sender named by its key among `announcement`'s
/// participants (a record naming no participant, or an index past them, stands for nobody in the round).
pub fn history_of(call: &AggregationCall, announcement: &RoundAnnouncement) -> Vec<NormSample> {
    call.norms
        .iter()
        .map(|r: &NormRecord| NormSample {
            shard: r.shard,
            sender: r
                .sender
                .and_then(|i| announcement.participants.get(i as usize))
                .map_or_else(no_participant, |p| p.node),
            norm: r.norm,
        })
        .collect()
}

/// The group of shards whose delta norms are compared with each other: `None` for the trunk, the layer for
/// an expert.
pub fn norm_class(shard: &ShardId) -> Option<u16> {
    match shard {
        ShardId::Trunk => None,
        ShardId::Expert { layer, .. } => Some(*layer),
    }
}

/// Judges `norm`, the norm of `sender`'s delta to `shard`, against this round's other deltas (`round`, which
/// may include the sender's own: they are skipped) and the recently accepted ones (`history`).
pub fn judge_norm(
    round: &[NormSample],
    history: &[NormSample],
    shard: ShardId,
    sender: PublicKey,
    norm: f32,
    min_ratio: f32,
    max_ratio: f32,
) -> NormVerdict {
    let others = || {
        round
            .iter()
            .chain(history)
            .filter(|s| s.sender != sender && s.norm >= NEGLIGIBLE_NORM)
    };
    let class: Vec<f32> = others()
        .filter(|s| norm_class(&s.shard) == norm_class(&shard))
        .map(|s| s.norm)
        .collect();
    let class = median_norm(&class);
    let shard_has_history = history
        .iter()
        .any(|s| s.shard == shard && s.sender != sender && s.norm >= NEGLIGIBLE_NORM);
    let own = if shard_has_history {
        let own: Vec<f32> = others()
            .filter(|s| s.shard == shard)
            .map(|s| s.norm)
            .collect();
        median_norm(&own)
    } else {
        None
    };
    let upper = match (own, class) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    if let Some(reference) = upper
        && reference > 0.0
        && f64::from(norm) > f64::from(max_ratio) * f64::from(reference)
    {
        return NormVerdict::TooLarge { reference };
    }
    if let Some(reference) = class
        && shard == ShardId::Trunk
        && reference > 0.0
        && f64::from(norm) < f64::from(min_ratio) * f64::from(reference)
    {
        return NormVerdict::TooSmall { reference };
    }
    // A zero delta is never work, whatever the references say.
    if norm == 0.0 && min_ratio > 0.0 {
        return NormVerdict::TooSmall {
            reference: class.unwrap_or(0.0),
        };
    }
    NormVerdict::Within
}

/// The recently accepted norms of every shard, with their senders, at most `per_shard` a shard (the oldest go
/// first).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NormHistory {
    per_shard: usize,
    by_shard: BTreeMap<ShardId, Vec<NormSample>>,
}

impl NormHistory {
    /// An empty history keeping `per_shard` samples a shard.
    pub fn new(per_shard: usize) -> NormHistory {
        NormHistory {
            per_shard,
            by_shard: BTreeMap::new(),
        }
    }

    /// Records an accepted delta's norm.
    pub fn push(&mut self, sample: NormSample) {
        let list = self.by_shard.entry(sample.shard).or_default();
        list.push(sample);
        let excess = list.len().saturating_sub(self.per_shard);
        list.drain(..excess);
    }

    /// Keeps at most `per_shard` samples a shard from now on (the oldest go first).
    pub fn keep_per_shard(&mut self, per_shard: usize) {
        self.per_shard = per_shard;
        for list in self.by_shard.values_mut() {
            let excess = list.len().saturating_sub(per_shard);
            list.drain(..excess);
        }
    }

    /// Every sample, shard by shard.
    pub fn samples(&self) -> Vec<NormSample> {
        self.by_shard.values().flatten().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(shard: ShardId, sender: u8, norm: f32) -> NormSample {
        NormSample {
            shard,
            sender: PublicKey([sender; 32]),
            norm,
        }
    }

    const E0: ShardId = ShardId::Expert { layer: 0, index: 0 };
    const E1: ShardId = ShardId::Expert { layer: 0, index: 1 };

    #[test]
    fn bounds_come_from_others_and_a_zero_delta_is_too_small() {
        let round = [
            s(ShardId::Trunk, 1, 1.0),
            s(ShardId::Trunk, 2, 1.2),
            s(ShardId::Trunk, 3, 0.9),
            s(ShardId::Trunk, 4, 50.0),
        ];
        let judge = |sender, norm| {
            judge_norm(
                &round,
                &[],
                ShardId::Trunk,
                PublicKey([sender; 32]),
                norm,
                0.01,
                10.0,
            )
        };
        assert_eq!(judge(1, 1.0), NormVerdict::Within);
        assert!(matches!(judge(4, 50.0), NormVerdict::TooLarge { .. }));
        assert!(matches!(judge(4, 0.0), NormVerdict::TooSmall { .. }));
        assert!(matches!(judge(4, 0.001), NormVerdict::TooSmall { .. }));
        // No reference at all: only an exact zero is refused.
        assert_eq!(
            judge_norm(&[], &[], E0, PublicKey([1; 32]), 5.0, 0.01, 10.0),
            NormVerdict::Within
        );
        assert!(matches!(
            judge_norm(&[], &[], E0, PublicKey([1; 32]), 0.0, 0.01, 10.0),
            NormVerdict::TooSmall { .. }
        ));
    }

    #[test]
    fn a_sender_cannot_ratchet_its_own_reference() {
        // Honest senders 1..=3 keep norms near 1; sender 9 each round sends just under the bound it sees.
        let mut history = NormHistory::new(8);
        let mut sent = 1.0f32;
        for _ in 0..50 {
            let round = [s(E0, 1, 1.0), s(E1, 2, 1.1), s(E1, 3, 0.9), s(E0, 9, sent)];
            let next = sent * 1.5;
            if judge_norm(
                &round,
                &history.samples(),
                E0,
                PublicKey([9; 32]),
                next,
                0.01,
                10.0,
            ) == NormVerdict::Within
            {
                sent = next;
            }
            for x in round {
                history.push(x);
            }
        }
        assert!(
            sent <= 10.0 * 1.1,
            "the attacker's accepted norm grew to {sent}"
        );
    }

    #[test]
    fn an_inflated_co_holder_does_not_push_an_honest_delta_under_the_floor() {
        let history = [s(E0, 9, 9.0), s(E1, 2, 1.0), s(E1, 3, 1.0)];
        let round = [s(E0, 9, 9.5), s(E0, 1, 1.0), s(E1, 2, 1.0)];
        assert_eq!(
            judge_norm(&round, &history, E0, PublicKey([1; 32]), 1.0, 0.2, 10.0),
            NormVerdict::Within
        );
    }

    /// The operator review's case: 2 honest nodes, and for dozens of rounds the other node's deltas to most
    /// experts of a layer were 3.7e-14 (no token routed to them). An honest delta of 2.2e-3 to one of them was
    /// refused as "over 10 x the median 3.7e-14"; the negligible norms are no reference now.
    #[test]
    fn experts_that_got_no_tokens_do_not_refuse_honest_deltas() {
        let experts: Vec<ShardId> = (0..8)
            .map(|index| ShardId::Expert { layer: 1, index })
            .collect();
        let mut history = NormHistory::new(8);
        for _ in 0..40 {
            for (i, e) in experts.iter().enumerate() {
                // Sender 2 routed tokens to expert 7 only; sender 1 to experts 0 and 7.
                history.push(s(*e, 2, if i == 7 { 1.9e-3 } else { 3.7e-14 }));
                if i == 0 || i == 7 {
                    history.push(s(*e, 1, 2.0e-3));
                }
            }
        }
        let round: Vec<NormSample> = experts.iter().map(|e| s(*e, 2, 3.7e-14)).collect();
        for e in &experts {
            assert_eq!(
                judge_norm(
                    &round,
                    &history.samples(),
                    *e,
                    PublicKey([1; 32]),
                    2.17e-3,
                    0.01,
                    10.0
                ),
                NormVerdict::Within,
                "honest delta to {e:?}"
            );
        }
        // A delta 100 x the honest scale is still refused.
        assert!(matches!(
            judge_norm(
                &round,
                &history.samples(),
                experts[0],
                PublicKey([1; 32]),
                0.2,
                0.01,
                10.0
            ),
            NormVerdict::TooLarge { .. }
        ));
        // With only negligible references, nothing bounds the delta from above (its score judges it).
        let only_noise: Vec<NormSample> = experts.iter().map(|e| s(*e, 2, 3.7e-14)).collect();
        assert_eq!(
            judge_norm(
                &only_noise,
                &only_noise,
                experts[3],
                PublicKey([1; 32]),
                2.17e-3,
                0.01,
                10.0
            ),
            NormVerdict::Within
        );
    }

    #[test]
    fn history_keeps_the_newest_per_shard() {
        let mut h = NormHistory::new(2);
        for i in 0..5u8 {
            h.push(s(E0, i, f32::from(i)));
        }
        h.push(s(E1, 7, 7.0));
        let norms: Vec<f32> = h.samples().iter().map(|x| x.norm).collect();
        assert_eq!(norms, vec![3.0, 4.0, 7.0]);
    }
}
