//! A judge that signs two different judgments of one shard for one call equivocates: it could show one
//! result to the coordinator and another to the shard's other observers, so that each counts a quorum the
//! other does not see. Its two signed attestations are the proof, which anyone can check. Whoever sees both
//! (the coordinator, or a judge auditing the commit) voids the judge's judgment of that shard: the judge
//! then counts as having signed nothing ([`super::tally_judgments`] leaves a void out), whatever order the
//! two arrived in, so every observer that saw both counts the same quorum. The coordinator records the judge
//! among the shard's dissenters in the commit and charges it as one.
//!
//! A void is kept in place of the judgment (the shard's entry with no verdict): the state machine's saved
//! form is unchanged, and a third judgment from the same judge changes nothing.

use mana_protocol::ShardJudgment;

use super::Agreement;

/// What a judge's judgment of a shard is, next to the one kept from it for the same call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Again {
    /// The same verdicts and result (a copy, or the same judgment in another attestation): nothing to do.
    Same,
    /// Other verdicts or another result: the kept judgment is to be voided.
    Equivocates,
    /// The kept judgment was already voided.
    AlreadyVoid,
}

/// Compares `new` with `kept`, the judgment kept from the same judge for the same shard and call.
pub fn judged_again(kept: &ShardJudgment, new: &ShardJudgment) -> Again {
    if is_void(kept) {
        Again::AlreadyVoid
    } else if Agreement::of(kept) == Agreement::of(new) {
        Again::Same
    } else {
        Again::Equivocates
    }
}

/// The void kept in place of an equivocating judge's judgment: the shard's entry, no verdict, no score. A
/// call names only shards with deltas, so no counted judgment is without verdicts.
pub fn void_of(judgment: &ShardJudgment) -> ShardJudgment {
    ShardJudgment {
        entry: judgment.entry,
        verdicts: Vec::new(),
        scores: Vec::new(),
    }
}

/// Whether `judgment` is a void ([`void_of`]).
pub fn is_void(judgment: &ShardJudgment) -> bool {
    judgment.verdicts.is_empty()
}

#[cfg(test)]
mod tests {
    use mana_protocol::{ContentHash, DeltaVerdict, RejectCode, ShardEntry, ShardId};

    use super::*;

    fn judgment(verdict: DeltaVerdict, hash: u8) -> ShardJudgment {
        ShardJudgment {
            entry: ShardEntry {
                shard: ShardId::Trunk,
                round: 3,
                hash: ContentHash::of(&[hash]),
                size: 100,
            },
            verdicts: vec![verdict],
            scores: Vec::new(),
        }
    }

    #[test]
    fn another_verdict_or_result_is_an_equivocation_and_a_void_stays_void() {
        let accept = judgment(DeltaVerdict::Accept { norm: 1.5 }, 1);
        assert_eq!(judged_again(&accept, &accept.clone()), Again::Same);
        let refuse = judgment(DeltaVerdict::Refuse(RejectCode::LowScore), 1);
        assert_eq!(judged_again(&accept, &refuse), Again::Equivocates);
        let other_result = judgment(DeltaVerdict::Accept { norm: 1.5 }, 2);
        assert_eq!(judged_again(&accept, &other_result), Again::Equivocates);
        let other_norm = judgment(DeltaVerdict::Accept { norm: 1.25 }, 1);
        assert_eq!(judged_again(&accept, &other_norm), Again::Equivocates);
        let void = void_of(&accept);
        assert!(is_void(&void) && !is_void(&accept));
        assert_eq!(judged_again(&void, &accept), Again::AlreadyVoid);
    }
}
