//! Whether a commit took, for a shard, what the shard's judges signed: the check any observer of the rounds
//! topic can run (a judge of the shard runs it on every commit), since the call and every attestation travel
//! there signed. The coordinator only counts signatures; this is how anyone sees that it counted them right.
//!
//! From the judgments the observer saw for the shard ([`tally`] over the call's judges):
//! - a quorum seen, and the commit records exactly its verdicts and result: [`Finding::Agrees`];
//! - a quorum seen, and the commit records other verdicts or another result: [`Finding::Contradicts`]: the
//!   quorum's signed attestations, the call and the signed commit prove the coordinator committed what
//!   nobody's quorum signed;
//! - a quorum seen, and the commit holds the shard (its deltas `late`): [`Finding::Dropped`]: the coordinator
//!   dropped the quorum's attestations, or never received them, or could not fetch the result's blob from its
//!   signers; not a proof (gossip may bring an attestation here and not there), but on record;
//! - no quorum seen: [`Finding::NoQuorumSeen`]: gossip may not have brought every attestation here, so nothing
//!   follows (a holder's recomputation of the commit still catches a wrong result).

use std::collections::BTreeMap;

use mana_protocol::{
    DeltaVerdict, PublicKey, RejectCode, RoundAnnouncement, RoundCommit, ShardCall, ShardEntry,
    ShardJudgment,
};

use super::judges::Tally;
use super::tally_judgments;

/// What an observer finds when it compares a commit's record of one shard with the judgments it saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    /// The commit records the quorum's verdicts and result.
    Agrees,
    /// The observer saw no quorum for the shard (nothing to compare).
    NoQuorumSeen,
    /// A quorum signed, and the commit holds the shard instead (every delta `late`).
    Dropped {
        /// The quorum's signers.
        signers: Vec<PublicKey>,
    },
    /// A quorum signed, and the commit records something else.
    Contradicts {
        /// The quorum's signers.
        signers: Vec<PublicKey>,
        /// What differs, for the log.
        what: String,
    },
}

/// Compares `commit`'s record of `part`'s shard (its entry in the checkpoint, its accepted and refused
/// deltas) with the judgments `signed` (by signer) that the observer saw for the shard in the round of
/// `announcement`, whose base entry for the shard is `base`.
pub fn audit_shard(
    announcement: &RoundAnnouncement,
    part: &ShardCall,
    signed: &BTreeMap<PublicKey, ShardJudgment>,
    base: ShardEntry,
    commit: &RoundCommit,
) -> Finding {
    let (quorum, signers) = match tally_judgments(announcement, part, signed) {
        Tally::Quorum {
            result, signers, ..
        } => (result, signers),
        Tally::NoQuorum { .. } => return Finding::NoQuorumSeen,
    };
    let shard = part.shard;
    let committed = commit.checkpoint.shard(&shard).copied();
    let sender = |i: u32| announcement.participants.get(i as usize).map(|p| p.node);
    // What the commit says of each called delta: accepted (with weight and norm), refused (with a code), or
    // nothing.
    let accepted = commit.accepted.iter().find(|a| a.shard == shard);
    let refused = |node: PublicKey, hash| {
        commit
            .rejected
            .iter()
            .find(|r| r.shard == shard && r.node == node && r.payload_hash == hash)
            .map(|r| r.reason)
    };
    let held = committed == Some(base)
        && accepted.is_none()
        && part.deltas.iter().all(|d| {
            sender(d.sender).is_none_or(|n| refused(n, d.payload_hash) == Some(RejectCode::Late))
        });
    if held {
        return Finding::Dropped { signers };
    }
    let contradiction = |what: String| Finding::Contradicts {
        signers: signers.clone(),
        what,
    };
    if committed != Some(quorum.entry) {
        return contradiction(format!(
            "the commit's entry is {committed:?}, the quorum signed {:?}",
            quorum.entry
        ));
    }
    let mut expected_accepted = Vec::new();
    for (d, v) in part.deltas.iter().zip(&quorum.verdicts) {
        let Some(node) = sender(d.sender) else {
            continue;
        };
        match v {
            DeltaVerdict::Accept { norm } => {
                expected_accepted.push((d.payload_hash, d.weight, norm.to_bits()));
            }
            DeltaVerdict::Refuse(code) => {
                if refused(node, d.payload_hash) != Some(*code) {
                    return contradiction(format!(
                        "the quorum refused {} as {code}, the commit says {:?}",
                        d.payload_hash,
                        refused(node, d.payload_hash)
                    ));
                }
            }
        }
    }
    let listed: Vec<_> = accepted
        .map(|a| {
            a.deltas
                .iter()
                .zip(&a.weights)
                .zip(&a.norms)
                .map(|((h, w), n)| (*h, *w, n.to_bits()))
                .collect()
        })
        .unwrap_or_default();
    if listed != expected_accepted {
        return contradiction(format!(
            "the commit accepts {} deltas of the shard, the quorum {}",
            listed.len(),
            expected_accepted.len()
        ));
    }
    Finding::Agrees
}
