//! Catching a coordinator that equivocates: two validly signed [`RoundCommit`]s of the run for the same round
//! with different contents. Every node remembers the commit it saw first for each of the last
//! [`LEDGER_ROUNDS`] rounds (its id and signed envelope). Gossip commits are compared before they are judged,
//! so a second commit cannot slip past as a stale message; the commits this node publishes itself (the
//! conductor's) are compared too. On a conflict both envelopes are kept in the store as evidence
//! ([`crate::store::Store::keep_evidence`]), an error is logged, the status lists it
//! ([`EquivocationSummary`]), and a trainer on this node stops building on the run. Anyone can check the pair
//! with [`verify_equivocation`] and the coordinator's key alone.

use std::collections::BTreeMap;
use std::sync::Arc;

use mana_protocol::{
    ContentHash, Message, ProtocolError, PublicKey, RoundCommit, RunId, SignedEnvelope,
    decode_parcel,
};
use serde::{Deserialize, Serialize};

use super::{Shared, blocking};

/// How many recent rounds' first commits a node remembers.
pub const LEDGER_ROUNDS: usize = 16;
/// Suffix of the evidence key of an equivocation (after the round, 8 bytes big-endian).
pub const EVIDENCE_KIND: &[u8] = b"/equivocation";

/// What the status shows of one equivocation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EquivocationSummary {
    /// The round the coordinator committed twice.
    pub round: u64,
    /// Id ([`RoundCommit::hash`], hex) of the commit seen first.
    pub first_commit: String,
    /// Id (hex) of the different commit seen next.
    pub second_commit: String,
    /// The store blobs (hex) holding the two signed envelopes, in that order.
    pub evidence: Vec<String>,
}

/// Two different signed commits of one round, as seen (envelope bytes, first one first).
#[derive(Debug, Clone)]
pub(crate) struct Equivocation {
    pub round: u64,
    pub first_id: ContentHash,
    pub second_id: ContentHash,
    pub first: Vec<u8>,
    pub second: Vec<u8>,
}

/// What the ledger makes of a commit.
#[derive(Debug, PartialEq)]
pub(crate) enum Observation {
    /// The first commit seen for its round: remembered.
    First,
    /// The same commit as the one remembered (maybe re-signed).
    Same,
    /// A different commit for a round already proven equivocated: nothing more to keep.
    AlreadyProven,
    /// A different commit: the remembered envelope (bytes, id) is returned with it.
    Conflict {
        first: Vec<u8>,
        first_id: ContentHash,
    },
}

#[derive(Debug)]
struct Seen {
    id: ContentHash,
    envelope: Vec<u8>,
    proven: bool,
}

/// The first commit of each recent round (at most [`LEDGER_ROUNDS`], the highest rounds kept).
#[derive(Debug, Default)]
pub(crate) struct CommitLedger {
    by_round: BTreeMap<u64, Seen>,
}

impl CommitLedger {
    /// Compares commit `id` of `round` (signed envelope `envelope`) with the one remembered for the round.
    pub fn observe(&mut self, round: u64, id: ContentHash, envelope: &[u8]) -> Observation {
        let Some(seen) = self.by_round.get_mut(&round) else {
            self.by_round.insert(
                round,
                Seen {
                    id,
                    envelope: envelope.to_vec(),
                    proven: false,
                },
            );
            while self.by_round.len() > LEDGER_ROUNDS {
                self.by_round.pop_first();
            }
            return Observation::First;
        };
        if seen.id == id {
            Observation::Same
        } else if seen.proven {
            Observation::AlreadyProven
        } else {
            seen.proven = true;
            Observation::Conflict {
                first: seen.envelope.clone(),
                first_id: seen.id,
            }
        }
    }
}

/// Why a pair of envelopes is not proof of an equivocation.
#[derive(Debug, thiserror::Error)]
pub enum EquivocationError {
    /// An envelope does not decode or its signature is bad.
    #[error("envelope: {0}")]
    Envelope(#[from] ProtocolError),
    /// An envelope is not signed by the coordinator.
    #[error("signed by {0}, not by the coordinator")]
    NotCoordinator(PublicKey),
    /// An envelope does not carry a round commit.
    #[error("a {0}, not a round commit")]
    NotACommit(&'static str),
    /// The commits are of different runs or rounds.
    #[error("commits of {0}/{1} and {2}/{3}: not the same round")]
    OtherRound(RunId, u64, RunId, u64),
    /// The two commits are the same.
    #[error("both envelopes carry the same commit")]
    SameCommit,
}

/// Checks that `first` and `second` (encoded signed envelopes) are two different round commits of the same
/// run and round, both signed by `coordinator`: proof that it equivocated. Returns the two commits.
pub fn verify_equivocation(
    coordinator: &PublicKey,
    first: &[u8],
    second: &[u8],
) -> Result<(RoundCommit, RoundCommit), EquivocationError> {
    let commit = |bytes: &[u8]| -> Result<RoundCommit, EquivocationError> {
        let envelope = decode_parcel(bytes)?;
        let message = envelope.verify()?;
        if envelope.signer != *coordinator {
            return Err(EquivocationError::NotCoordinator(envelope.signer));
        }
        match message {
            Message::RoundCommit(c) => Ok(c),
            other => Err(EquivocationError::NotACommit(other.kind())),
        }
    };
    let (a, b) = (commit(first)?, commit(second)?);
    if a.run != b.run || a.round != b.round {
        return Err(EquivocationError::OtherRound(
            a.run, a.round, b.run, b.round,
        ));
    }
    if a.hash()? == b.hash()? {
        return Err(EquivocationError::SameCommit);
    }
    Ok((a, b))
}

/// Notes a signed envelope seen on gossip or published by this node (`bytes`, decoded as `envelope`). If it
/// is a round commit of the run signed by the coordinator that differs from the first one seen for its round,
/// returns the equivocation. Anything else returns `None` (and is judged as usual).
pub(crate) fn observe(
    shared: &Shared,
    bytes: &[u8],
    envelope: &SignedEnvelope,
) -> Option<Equivocation> {
    // A node without a configured coordinator (the coordinator's own node) judges its own commits.
    let coordinator = shared
        .config
        .coordinator
        .unwrap_or_else(|| shared.keypair.public());
    if coordinator != envelope.signer {
        return None;
    }
    let Ok(Message::RoundCommit(commit)) = envelope.verify() else {
        return None;
    };
    if commit.run != shared.config.net.run_id {
        return None;
    }
    let id = commit.hash().ok()?;
    let observation = shared.state().commits.observe(commit.round, id, bytes);
    match observation {
        Observation::Conflict { first, first_id } => Some(Equivocation {
            round: commit.round,
            first_id,
            second_id: id,
            first,
            second: bytes.to_vec(),
        }),
        Observation::First | Observation::Same | Observation::AlreadyProven => None,
    }
}

/// Keeps the pair as evidence in the store, logs it and shows it in the status.
pub(crate) async fn keep(shared: &Arc<Shared>, found: Equivocation) {
    let round = found.round;
    tracing::error!(
        round,
        first = %found.first_id,
        second = %found.second_id,
        "the coordinator signed two different commits for one round: both kept as evidence; do not build on this run"
    );
    let store = shared.store.clone();
    let mut key = round.to_be_bytes().to_vec();
    key.extend_from_slice(EVIDENCE_KIND);
    let (first, second) = (found.first, found.second);
    let evidence = match blocking(move || Ok(store.keep_evidence(&key, &[&first, &second])?)).await
    {
        Ok(hashes) => hashes.iter().map(|h| h.to_string()).collect(),
        Err(e) => {
            tracing::error!(round, error = %e, "equivocation evidence not stored");
            Vec::new()
        }
    };
    let summary = EquivocationSummary {
        round,
        first_commit: found.first_id.to_string(),
        second_commit: found.second_id.to_string(),
        evidence,
    };
    let mut state = shared.state();
    let known = state.equivocations.iter().any(|e| e.round == round);
    if !known && state.equivocations.len() < crate::store::evidence::MAX_EVIDENCE {
        state.equivocations.push(summary);
    }
}

/// The equivocations kept in `store` by an earlier run of this node, re-checked against `coordinator` (a
/// piece that no longer proves anything is skipped with a warning): a restarted node still knows, and its
/// trainer still refuses to build on the run.
pub(crate) fn kept(
    store: &crate::store::Store,
    coordinator: &PublicKey,
) -> Vec<EquivocationSummary> {
    let pieces = match store.evidence() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "kept evidence unreadable");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (key, blobs) in pieces {
        if !key.ends_with(EVIDENCE_KIND) || blobs.len() != 2 {
            continue;
        }
        let check = || -> Result<EquivocationSummary, String> {
            let first = store.get_blob(&blobs[0]).map_err(|e| e.to_string())?;
            let second = store.get_blob(&blobs[1]).map_err(|e| e.to_string())?;
            let (a, b) =
                verify_equivocation(coordinator, &first, &second).map_err(|e| e.to_string())?;
            Ok(EquivocationSummary {
                round: a.round,
                first_commit: a.hash().map_err(|e| e.to_string())?.to_string(),
                second_commit: b.hash().map_err(|e| e.to_string())?.to_string(),
                evidence: blobs.iter().map(|h| h.to_string()).collect(),
            })
        };
        match check() {
            Ok(summary) => {
                tracing::error!(
                    round = summary.round,
                    "this node holds proof that the coordinator equivocated"
                );
                out.push(summary);
            }
            Err(e) => {
                tracing::warn!(key = %hex::encode(&key), error = %e, "kept evidence does not prove an equivocation")
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_flags_a_second_different_commit_once() {
        let mut ledger = CommitLedger::default();
        let (a, b, c) = (
            ContentHash::of(b"a"),
            ContentHash::of(b"b"),
            ContentHash::of(b"c"),
        );
        assert_eq!(ledger.observe(3, a, b"env-a"), Observation::First);
        assert_eq!(ledger.observe(3, a, b"env-a-resigned"), Observation::Same);
        assert_eq!(
            ledger.observe(3, b, b"env-b"),
            Observation::Conflict {
                first: b"env-a".to_vec(),
                first_id: a
            }
        );
        assert_eq!(ledger.observe(3, c, b"env-c"), Observation::AlreadyProven);
        assert_eq!(
            ledger.observe(4, b, b"env-b"),
            Observation::First,
            "rounds are apart"
        );
    }

    #[test]
    fn the_ledger_keeps_the_latest_rounds_only() {
        let mut ledger = CommitLedger::default();
        for round in 0..(LEDGER_ROUNDS as u64 + 4) {
            ledger.observe(round, ContentHash::of(&round.to_le_bytes()), b"env");
        }
        assert_eq!(ledger.by_round.len(), LEDGER_ROUNDS);
        assert_eq!(ledger.by_round.keys().next(), Some(&4));
    }

    fn commit(round: u64, rejected: usize) -> Message {
        use mana_protocol::{CheckpointManifest, RejectCode, RejectedDelta, ShardId};
        let run = RunId::new("r").expect("run id");
        Message::RoundCommit(RoundCommit {
            run: run.clone(),
            round,
            accepted: Vec::new(),
            rejected: (0..rejected)
                .map(|i| RejectedDelta {
                    shard: ShardId::Trunk,
                    node: PublicKey([i as u8; 32]),
                    payload_hash: ContentHash::of(b"p"),
                    reason: RejectCode::Late,
                })
                .collect(),
            checkpoint: CheckpointManifest {
                run,
                round,
                shards: Vec::new(),
            },
            scores: Vec::new(),
            seed_secret: [0; 32],
            dissent: Vec::new(),
        })
    }

    #[test]
    fn only_two_different_commits_of_one_round_by_the_coordinator_are_proof() {
        let coordinator = mana_protocol::Keypair::from_seed(&[7; 32]);
        let other = mana_protocol::Keypair::from_seed(&[8; 32]);
        let sign = |k: &mana_protocol::Keypair, m: &Message, t: u64| {
            SignedEnvelope::sign(k, m, t)
                .expect("sign")
                .encode()
                .expect("encode")
        };
        let key = coordinator.public();
        let (a, b) = (
            sign(&coordinator, &commit(5, 0), 1),
            sign(&coordinator, &commit(5, 1), 2),
        );
        assert!(verify_equivocation(&key, &a, &b).is_ok());
        let resigned = sign(&coordinator, &commit(5, 0), 3);
        assert!(matches!(
            verify_equivocation(&key, &a, &resigned),
            Err(EquivocationError::SameCommit)
        ));
        let later = sign(&coordinator, &commit(6, 1), 2);
        assert!(matches!(
            verify_equivocation(&key, &a, &later),
            Err(EquivocationError::OtherRound(..))
        ));
        let forged = sign(&other, &commit(5, 1), 2);
        assert!(matches!(
            verify_equivocation(&key, &a, &forged),
            Err(EquivocationError::NotCoordinator(_))
        ));
        // Kept in a store, the pair is found again (a restarted node still knows), re-checked.
        let dir = tempfile::tempdir().expect("temp dir");
        let store = crate::store::Store::open(dir.path(), crate::store::StoreConfig::default())
            .expect("store");
        let mut evidence_key = 5u64.to_be_bytes().to_vec();
        evidence_key.extend_from_slice(EVIDENCE_KIND);
        store.keep_evidence(&evidence_key, &[&a, &b]).expect("kept");
        let found = kept(&store, &key);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].round, 5);
        assert!(
            kept(&store, &other.public()).is_empty(),
            "not proof against another key"
        );
        let mut tampered = b.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            verify_equivocation(&key, &a, &tampered),
            Err(EquivocationError::Envelope(_))
        ));
    }
}
