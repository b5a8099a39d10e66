//! A holder's verdict on one shard of a coordinator's commit. Every holder recomputes its shards from the
//! round's base and the commit's accepted payloads with the same deterministic function the coordinator uses
//! (`apply_weighted_round`, at the commit's weights), so a differing hash is proof that the commit is wrong — but only when the holder had every
//! accepted payload. A payload it could not fetch proves nothing: then the committed shard is fetched, as
//! before. The verdict and the dispute a holder publishes are pure and live here; the trainer does the I/O.

use mana_protocol::{CommitDispute, ContentHash, ProtocolError, RoundCommit, RunId, ShardId};

/// Marks the evidence key under which a trainer keeps the commit it refused (its status record, JSON), so
/// that it still refuses to take part in that run after a restart: see [`refusal_key`].
pub const REFUSAL_KIND: &[u8] = b"/refused-commit/";

/// The evidence key of a refusal of round `round` of run `run`: the round (8 bytes big-endian, so the oldest
/// go first when the evidence store is full), [`REFUSAL_KIND`], the run id.
pub fn refusal_key(round: u64, run: &RunId) -> Vec<u8> {
    crate::store::evidence::evidence_key(round, &[REFUSAL_KIND, run.as_str().as_bytes()])
}

/// Whether evidence key `key` holds a refusal in run `run` (a node that moves to another run is not stopped by
/// it).
pub fn is_refusal_in(key: &[u8], run: &RunId) -> bool {
    key.len() > 8 && key[8..].strip_prefix(REFUSAL_KIND) == Some(run.as_str().as_bytes())
}

/// What the holder could compute for a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recomputed {
    /// The commit accepted no delta for the shard: it must be unchanged.
    NoDeltas,
    /// The hash of the state computed from every accepted payload.
    Computed(ContentHash),
    /// An accepted payload could not be fetched: nothing can be concluded.
    Unavailable,
}

/// The holder's verdict on one shard of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardVerdict {
    /// The committed hash is what the holder computed.
    Reproduced,
    /// The committed hash is not what the accepted deltas give: the commit is wrong. `computed` is the right
    /// hash (the base's when no delta was accepted).
    Refuted {
        /// What the holder computed.
        computed: ContentHash,
    },
    /// Not checkable (a payload missing): the committed shard is fetched instead.
    Unverified,
}

/// Judges the committed hash `committed` of a shard whose base blob is `base`, given what was recomputed.
pub fn judge_shard(
    base: ContentHash,
    committed: ContentHash,
    recomputed: Recomputed,
) -> ShardVerdict {
    let expected = match recomputed {
        Recomputed::NoDeltas => base,
        Recomputed::Computed(hash) => hash,
        Recomputed::Unavailable => return ShardVerdict::Unverified,
    };
    if expected == committed {
        ShardVerdict::Reproduced
    } else {
        ShardVerdict::Refuted { computed: expected }
    }
}

/// The signed report (to be) of a refuted shard: the commit's id and entry, the accepted payloads used, the
/// base and what the holder computed.
pub fn dispute(
    commit: &RoundCommit,
    shard: ShardId,
    base: ContentHash,
    committed: ContentHash,
    computed: ContentHash,
) -> Result<CommitDispute, ProtocolError> {
    let accepted = commit
        .accepted
        .iter()
        .find(|a| a.shard == shard)
        .map(|a| a.deltas.clone())
        .unwrap_or_default();
    Ok(CommitDispute {
        run: commit.run.clone(),
        round: commit.round,
        commit: commit.hash()?,
        shard,
        base,
        committed,
        accepted,
        computed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mana_protocol::{AcceptedDeltas, CheckpointManifest, ShardEntry};

    fn h(s: &str) -> ContentHash {
        ContentHash::of(s.as_bytes())
    }

    #[test]
    fn only_a_complete_recomputation_can_refute() {
        let (base, new) = (h("base"), h("new"));
        assert_eq!(
            judge_shard(base, new, Recomputed::Computed(new)),
            ShardVerdict::Reproduced
        );
        assert_eq!(
            judge_shard(base, h("lie"), Recomputed::Computed(new)),
            ShardVerdict::Refuted { computed: new }
        );
        assert_eq!(
            judge_shard(base, base, Recomputed::NoDeltas),
            ShardVerdict::Reproduced
        );
        // No delta accepted, yet the shard changed.
        assert_eq!(
            judge_shard(base, new, Recomputed::NoDeltas),
            ShardVerdict::Refuted { computed: base }
        );
        // A missing payload proves nothing, whatever the committed hash.
        assert_eq!(
            judge_shard(base, h("lie"), Recomputed::Unavailable),
            ShardVerdict::Unverified
        );
    }

    #[test]
    fn a_refusal_is_kept_per_run() {
        let (run, other) = (
            RunId::new("r").expect("run"),
            RunId::new("r2").expect("run"),
        );
        let key = refusal_key(3, &run);
        assert!(is_refusal_in(&key, &run));
        assert!(!is_refusal_in(&key, &other));
        assert!(!is_refusal_in(b"short", &run));
    }

    #[test]
    fn a_dispute_quotes_the_commit_faithfully() {
        let run = RunId::new("r").expect("run");
        let payloads = vec![h("p1"), h("p2")];
        let commit = RoundCommit {
            run: run.clone(),
            round: 4,
            accepted: vec![AcceptedDeltas {
                shard: ShardId::Trunk,
                deltas: payloads.clone(),
                weights: vec![1; payloads.len()],
                norms: vec![1.0; payloads.len()],
            }],
            rejected: Vec::new(),
            checkpoint: CheckpointManifest {
                run,
                round: 4,
                shards: vec![ShardEntry {
                    shard: ShardId::Trunk,
                    hash: h("lie"),
                    size: 1,
                    round: 4,
                }],
            },
            scores: Vec::new(),
            seed_secret: [0; 32],
            dissent: Vec::new(),
        };
        let d = dispute(&commit, ShardId::Trunk, h("base"), h("lie"), h("new")).expect("dispute");
        assert_eq!(d.accepted, payloads);
        assert_eq!(d.commit, commit.hash().expect("id"));
        assert_eq!(d.matches(&commit), Ok(()));
    }
}
