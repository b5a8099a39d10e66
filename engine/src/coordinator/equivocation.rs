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

/// Whether `new`, a judge's judgment of a shard, equivocates against `kept`, the judgment kept from the same
/// judge for the same shard and call: other verdicts or another result, while `kept` still stands. A copy (the
/// same judgment in another attestation) does not, and neither does anything after a void (voided once, the
/// judge stays void).
pub fn equivocates(kept: &ShardJudgment, new: &ShardJudgment) -> bool {
    !is_void(kept) && Agreement::of(kept) != Agreement::of(new)
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
        assert!(!equivocates(&accept, &accept.clone()), "a copy");
        let refuse = judgment(DeltaVerdict::Refuse(RejectCode::LowScore), 1);
        assert!(equivocates(&accept, &refuse), "another verdict");
        let other_result = judgment(DeltaVerdict::Accept { norm: 1.5 }, 2);
        assert!(equivocates(&accept, &other_result), "another result");
        let other_norm = judgment(DeltaVerdict::Accept { norm: 1.25 }, 1);
        assert!(equivocates(&accept, &other_norm), "another norm");
        let void = void_of(&accept);
        assert!(is_void(&void) && !is_void(&accept));
        assert!(!equivocates(&void, &refuse), "a void stays void");
    }
}
