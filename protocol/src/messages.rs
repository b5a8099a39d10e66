//! The gossiped messages: what coordinators and nodes tell each other about a round. Each travels inside a
//! [`crate::SignedEnvelope`]. Bulk data (delta payloads, checkpoint shards) never rides on gossip: messages
//! carry its blake3 hash and size, and peers fetch it with [`crate::reqresp`].
//!
//! Times are unix milliseconds chosen by the sender; this crate never reads a clock.

use serde::{Deserialize, Serialize};

use crate::codec::CodecOptions;
use crate::error::ProtocolError;
use crate::identity::PublicKey;
use crate::ids::{ContentHash, RunId, ShardId, Text};
use crate::limits::{
    MAX_CALL_NORMS, MAX_COMMIT_DELTAS, MAX_DATA_SEEDS_PER_NODE, MAX_DISPUTE_DELTAS,
    MAX_EVALUATION_BATCHES, MAX_MANIFEST_SHARDS, MAX_PARTICIPANTS, MAX_SHARD_JUDGES,
    MAX_SHARDS_PER_NODE,
};
use crate::validation::RejectCode;

/// How the aggregator turns a round's deltas into the next checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateRule {
    /// Synchronous data parallelism: each node sends the gradient it accumulated over `inner_steps`
    /// micro-batches at the round's fixed weights, and every holder of a shard applies one AdamW step to the
    /// robust mean of the accepted gradients (the optimizer state travels with the shard).
    Sync,
    /// DiLoCo: the averaged delta is an outer gradient for Nesterov momentum.
    Diloco,
}

/// The training settings of one round, chosen by the coordinator so that every node trains alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HyperParams {
    /// How deltas are combined.
    pub update_rule: UpdateRule,
    /// AdamW learning rate of the inner steps.
    pub inner_lr: f32,
    /// AdamW weight decay of the inner steps.
    pub weight_decay: f32,
    /// Outer learning rate (DiLoCo uses 0.7).
    pub outer_lr: f32,
    /// Outer Nesterov momentum (DiLoCo uses 0.9; ignored by `Sync`).
    pub outer_momentum: f32,
    /// Tokens per inner step on each node.
    pub batch_tokens: u32,
    /// Sequence length of the training samples.
    pub seq_len: u32,
    /// How nodes must encode their deltas.
    pub codec: CodecOptions,
    /// How far a router bias moves per optimizer step the round stands for, towards balanced expert loads
    /// (DeepSeek-V3's auxiliary-loss-free rule: 0.001); the trunk's holders move the biases once a round
    /// from the loads the participants report. 0 keeps the biases frozen.
    pub router_bias_gamma: f32,
}

/// One node's part in a round: which shards it trains and which data it reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Participant {
    /// The node, by its signing key (its PeerId derives from it).
    pub node: PublicKey,
    /// The shards it hosts and must send deltas for (at most [`MAX_SHARDS_PER_NODE`]).
    pub shards: Vec<ShardId>,
    /// Seeds of the data shards it trains on (at most [`MAX_DATA_SEEDS_PER_NODE`]).
    pub data_seeds: Vec<u64>,
}

/// When a round's phases end, in unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadlines {
    /// Delta announcements signed after this are late and refused.
    pub deltas_by_ms: u64,
    /// The coordinator commits the round by this time.
    pub commit_by_ms: u64,
}

/// From the coordinator: round `round` of run `run` starts from checkpoint `base_checkpoint`, with these
/// participants and settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundAnnouncement {
    /// The run.
    pub run: RunId,
    /// The round number; strictly increasing within a run.
    pub round: u64,
    /// Hash of the [`CheckpointManifest`] every participant starts from.
    pub base_checkpoint: ContentHash,
    /// Who trains what (at most [`MAX_PARTICIPANTS`]).
    pub participants: Vec<Participant>,
    /// Inner (local) optimizer steps before sending a delta.
    pub inner_steps: u32,
    /// Training settings.
    pub hyper: HyperParams,
    /// A delta whose L2 norm exceeds this many times the round's median norm (per shard) is refused.
    pub max_norm_ratio: f32,
    /// Phase deadlines.
    pub deadlines: Deadlines,
    /// blake3 of the run's corpus (its training and validation bytes): a node whose corpus hashes otherwise
    /// would train on other text, so it refuses to. All zeros: not stated.
    pub corpus: ContentHash,
    /// blake3 of the round's seed secret, which the commit reveals ([`RoundCommit::seed_secret`]). The secret
    /// enters the seed of the round's score batches, so no sender can know the batch its delta is judged
    /// on, nor steer it by grinding its own payload; committing to it here stops the coordinator from
    /// choosing it after the deltas are in.
    pub seed_commitment: ContentHash,
}

impl RoundAnnouncement {
    /// The participant entry of `node`, if it takes part in this round.
    pub fn participant(&self, node: &PublicKey) -> Option<&Participant> {
        self.participants.iter().find(|p| &p.node == node)
    }
}

/// Statistics a node reports with its delta, for monitoring and sanity checks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainingStats {
    /// Tokens trained on this round.
    pub tokens: u64,
    /// Mean training loss over the first inner step.
    pub loss_before: f32,
    /// Mean training loss over the last inner step.
    pub loss_after: f32,
    /// L2 norm of the delta the node computed (before compression).
    pub delta_norm: f32,
}

/// From a node: my delta for `shard` in `round`, computed from `base_checkpoint`, is the blob with
/// `payload_hash` and `payload_size` bytes (an encoded [`crate::codec`] payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaAnnouncement {
    /// The run.
    pub run: RunId,
    /// The round the delta belongs to.
    pub round: u64,
    /// The shard the delta updates.
    pub shard: ShardId,
    /// The checkpoint the node started from; must be the round's.
    pub base_checkpoint: ContentHash,
    /// blake3 of the encoded delta payload.
    pub payload_hash: ContentHash,
    /// Length of the encoded delta payload in bytes.
    pub payload_size: u64,
    /// Training statistics.
    pub stats: TrainingStats,
}

/// The deltas accepted for one shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcceptedDeltas {
    /// The shard.
    pub shard: ShardId,
    /// Payload hashes of the accepted deltas, in the order they were applied.
    pub deltas: Vec<ContentHash>,
    /// Each delta's weight in the shard's mean (the same order as `deltas`, each from 1 to
    /// [`MAX_DELTA_WEIGHT`]): its sender's standing when it was accepted, so that a key with no record of
    /// useful work moves the model less than one with a long record. Every holder applies these weights,
    /// so all compute the same shard.
    pub weights: Vec<u32>,
    /// Each delta's L2 norm (the same order as `deltas`), as its judges measured it: the norm bounds of later
    /// rounds take their history from these ([`AggregationCall::norms`]).
    pub norms: Vec<f32>,
}

/// The largest weight a delta can have in its shard's mean.
pub const MAX_DELTA_WEIGHT: u32 = 1024;

/// One delta's score as its verifier measured it ([`RoundCommit::scores`]): the loss on the shard's score
/// batch after the round's update with this delta alone, at weight `1 / in_mean`, against the same update
/// with a zero delta. Anyone who holds the round's base shards and the run's text recomputes it from the
/// commit (which reveals the seed) and the payload: a verdict is a reproducible record, not the verifier's
/// word.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DeltaScore {
    /// The shard.
    pub shard: ShardId,
    /// The delta's payload hash.
    pub payload_hash: ContentHash,
    /// How many deltas of the shard were scored as parts of one mean (the delta was applied at `1 / in_mean`).
    pub in_mean: u32,
    /// The loss after the update with a zero delta.
    pub null_loss: f32,
    /// The loss after the update with this delta (infinite if it ruined the model).
    pub loss: f32,
}

/// A delta the coordinator refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedDelta {
    /// The shard.
    pub shard: ShardId,
    /// The node that sent it.
    pub node: PublicKey,
    /// Its payload hash.
    pub payload_hash: ContentHash,
    /// The reason, as a stable code.
    pub reason: RejectCode,
}

/// From the coordinator: round `round` is closed; these deltas were applied, these refused, and the result
/// is `checkpoint`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundCommit {
    /// The run.
    pub run: RunId,
    /// The round being closed.
    pub round: u64,
    /// Accepted deltas, per shard.
    pub accepted: Vec<AcceptedDeltas>,
    /// Refused deltas.
    pub rejected: Vec<RejectedDelta>,
    /// The checkpoint that results from applying the accepted deltas.
    pub checkpoint: CheckpointManifest,
    /// The score of every delta that was scored, accepted or refused, sorted by shard and payload hash.
    pub scores: Vec<DeltaScore>,
    /// The round's seed secret, whose blake3 the announcement committed to
    /// ([`RoundAnnouncement::seed_commitment`]).
    pub seed_secret: [u8; 32],
    /// The judges of each shard whose quorum was taken that signed something else (dissenters) or nothing
    /// (absent), sorted by shard; shards where every judge signed the quorum's judgment are left out. A judge
    /// that signed two different judgments of a shard is a dissenter, for a shard without a quorum too (then
    /// the only judges listed). The record of who disagreed, beside the standing they lost for it.
    pub dissent: Vec<ShardDissent>,
}

/// The judges of one shard that did not sign its quorum's judgment ([`RoundCommit::dissent`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardDissent {
    /// The shard.
    pub shard: ShardId,
    /// Judges that signed another judgment, sorted.
    pub dissenters: Vec<PublicKey>,
    /// Judges that signed nothing, sorted.
    pub absent: Vec<PublicKey>,
}

/// The commitment to a round's seed secret that its announcement carries: blake3 of the secret.
pub fn seed_commitment(secret: &[u8; 32]) -> ContentHash {
    ContentHash::of(secret)
}

impl RoundCommit {
    /// Whether the commit reveals the secret that `announcement` (of the same round) committed to.
    pub fn reveals_seed_of(&self, announcement: &RoundAnnouncement) -> bool {
        announcement.run == self.run
            && announcement.round == self.round
            && seed_commitment(&self.seed_secret) == announcement.seed_commitment
    }

    /// The commit's own id: blake3 of its canonical encoding (the structure alone, without the message tag).
    /// Two commits for one round with different ids are an equivocation; a [`CommitDispute`] names the commit
    /// it refutes by this id.
    pub fn hash(&self) -> Result<ContentHash, ProtocolError> {
        Ok(ContentHash::of(&crate::wire::encode::<
            _,
            { crate::limits::MAX_PARCEL_MESSAGE_BYTES },
        >(self, "round commit")?))
    }
}

/// From the coordinator, once a round's deltas are in (at the delta deadline): every delta announced for each
/// shard, and who judges each shard. Every judge of a shard fetches its deltas, checks and scores each one by
/// the call's [`VerdictRule`] on the round's base trunk and the shard alone, computes the shard's next state
/// from the deltas it accepts, and signs its verdicts and result ([`ShardAttestation`]); the commit takes, per
/// shard, what a quorum of its judges signed. So the coordinator never fetches a payload, scores a delta, or
/// computes or holds a shard's new state: it sequences and counts signatures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggregationCall {
    /// The run.
    pub run: RunId,
    /// The round.
    pub round: u64,
    /// Manifest hash of the round's base checkpoint (the announcement's): the states the deltas apply to.
    pub base_checkpoint: ContentHash,
    /// The round's seed secret, revealed now that the deltas are in: its blake3 is the announcement's
    /// [`RoundAnnouncement::seed_commitment`], and with the payload hashes of every delta of the call it
    /// fixes the score batches (so no sender could know them when it sent its delta).
    pub seed_secret: [u8; 32],
    /// The rule every verdict follows.
    pub rule: VerdictRule,
    /// How many judge each shard: every judge redraws each shard's judges from the round's score seed with
    /// this rule and refuses a call whose judges are not the draw, so the coordinator cannot pick them.
    pub judging: JudgingRule,
    /// How many of each shard's most recently accepted norms the coordinator keeps for the bounds (its
    /// setting, 1 to [`crate::limits::MAX_NORM_HISTORY`]): `norms` carries, of each shard, that many or all
    /// there are. Published so that a node that saw the commits can tell a history cut short from the
    /// setting.
    pub norm_history: u32,
    /// The recently committed norms of accepted deltas (at most a few per shard), with their senders among
    /// the round's participants: the norm bounds' history, the same for every judge. Anyone can rebuild it
    /// from the last commits, which publish each accepted delta's norm.
    pub norms: Vec<NormRecord>,
    /// One entry per shard with deltas, sorted by shard.
    pub shards: Vec<ShardCall>,
}

/// How a delta is judged: the norm bounds' lower ratio (the upper is the announcement's `max_norm_ratio`),
/// the share of deltas scored and what score a delta needs. Fixed by the run's coordinator settings and
/// published with each call, so that every judge reaches the same verdicts and anyone can check them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VerdictRule {
    /// A delta's norm must be at least this share of its reference (trunk deltas; an all-zero delta is always
    /// refused).
    pub min_norm_ratio: f32,
    /// Share of the deltas scored, 0 to 1 (drawn from the round's score seed).
    pub score_share: f32,
    /// The least gain over a zero delta, in nats, a trunk delta needs.
    pub trunk_min_gain: f32,
    /// A trunk delta must also gain at least this share of the median gain of the other trunk deltas.
    pub trunk_share: f32,
    /// How much an expert delta may raise the loss, in nats, and still be accepted.
    pub expert_tolerance: f32,
}

/// How many judge each shard of a round: the run's setting, published with every call so that anyone can
/// redo the draw of each shard's judges from the round's score seed (a call whose judges are not that draw is
/// not judged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JudgingRule {
    /// Verifiers drawn per shard from the participants that do not hold it.
    pub verifiers_per_shard: u32,
    /// Most holders of one shard that judge it (a shard every participant holds, like the trunk, would
    /// otherwise cost every participant every delta of it); drawn when there are more.
    pub max_holder_judges: u32,
}

impl JudgingRule {
    /// Verifiers drawn for a shard: `verifiers_per_shard`, or twice that (at least 2) for an `escalated`
    /// shard, one whose state did not move in the round before (held for want of a quorum, every delta
    /// refused, or none sent), so that judges who split a shard between them face more judges next time.
    pub fn verifiers(&self, escalated: bool) -> u32 {
        if escalated {
            self.verifiers_per_shard.max(1).saturating_mul(2)
        } else {
            self.verifiers_per_shard
        }
    }

    /// The most judges a shard can have under this rule (an escalated one's).
    pub fn most_judges(&self) -> u64 {
        u64::from(self.max_holder_judges) + u64::from(self.verifiers(true))
    }
}

impl Default for JudgingRule {
    /// Two verifiers per shard and up to three judging holders: with two holders per expert, four judges and
    /// a quorum of three, so no two colluders decide a shard (docs/security.md has the figures).
    fn default() -> Self {
        JudgingRule {
            verifiers_per_shard: 2,
            max_holder_judges: 3,
        }
    }
}

/// One committed norm of an accepted delta, as a call carries it: its shard, its sender if that sender takes
/// part in the call's round, and its L2 norm.
///
/// A sender matters to the norm bounds only as the one whose own norms are left out of its delta's bounds,
/// and only a participant of the round sends a delta in it: a participant is named by its index (a varint of
/// one to three bytes instead of a 32-byte key, so a full history of every shard of a large model fits in
/// the call), anyone else is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NormRecord {
    /// The shard the delta updated.
    pub shard: ShardId,
    /// Who sent it: an index into the call's round announcement's participants, or `None` when the sender
    /// takes no part in that round.
    pub sender: Option<u32>,
    /// Its L2 norm.
    pub norm: f32,
}

/// One delta of an [`AggregationCall`]'s shard: who sent it and its payload, as announced, and its weight in
/// the shard's mean if its judges accept it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalledDelta {
    /// Its sender: an index into the round announcement's participants.
    pub sender: u32,
    /// Its payload's blake3, as announced.
    pub payload_hash: ContentHash,
    /// Its payload's size, as announced.
    pub payload_size: u64,
    /// Its weight in the shard's mean if accepted (1 to [`MAX_DELTA_WEIGHT`]): its sender's standing at the
    /// delta deadline.
    pub weight: u32,
}

/// One shard's part of an [`AggregationCall`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCall {
    /// The shard.
    pub shard: ShardId,
    /// Every delta announced for it by a participant still in the round, sorted by payload hash, then sender:
    /// the order in which the accepted ones are applied.
    pub deltas: Vec<CalledDelta>,
    /// The holders that judge it: indices into the round announcement's participants (so that the call of a
    /// round with thousands of shards fits in one message).
    pub holders: Vec<u32>,
    /// The verifiers drawn to judge it (participants that do not hold it), as indices like `holders`.
    pub verifiers: Vec<u32>,
}

impl AggregationCall {
    /// The call's id: blake3 of its canonical encoding. An attestation names the call it answers by this id,
    /// so a signature covers the very deltas, weights and rule it was computed from.
    pub fn hash(&self) -> Result<ContentHash, ProtocolError> {
        Ok(ContentHash::of(&crate::wire::encode::<
            _,
            { crate::limits::MAX_PARCEL_MESSAGE_BYTES },
        >(self, "aggregation call")?))
    }

    /// The part of the call about `shard`, if it has deltas (a binary search: `shards` is sorted by shard, as
    /// validation checks).
    pub fn shard(&self, shard: &ShardId) -> Option<&ShardCall> {
        self.shards
            .binary_search_by(|c| c.shard.cmp(shard))
            .ok()
            .map(|i| &self.shards[i])
    }

    /// Whether the call reveals the secret that `announcement` (of the same round) committed to.
    pub fn reveals_seed_of(&self, announcement: &RoundAnnouncement) -> bool {
        announcement.run == self.run
            && announcement.round == self.round
            && seed_commitment(&self.seed_secret) == announcement.seed_commitment
    }
}

/// A judge's verdict on one delta of a call.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum DeltaVerdict {
    /// Accepted; its L2 norm (for the norm bounds of the rounds to come).
    Accept {
        /// The decoded delta's L2 norm.
        norm: f32,
    },
    /// Refused, for this reason.
    Refuse(RejectCode),
}

impl DeltaVerdict {
    /// A total order key: judges agree on a verdict only when it is the same bit for bit.
    fn key(&self) -> (u8, u32) {
        match self {
            DeltaVerdict::Accept { norm } => (0, norm.to_bits()),
            DeltaVerdict::Refuse(code) => (1, *code as u32),
        }
    }
}

impl PartialEq for DeltaVerdict {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for DeltaVerdict {}

impl PartialOrd for DeltaVerdict {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for DeltaVerdict {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// What a judge found for one shard of a call: its verdict on each delta and the shard's next state from the
/// accepted ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardJudgment {
    /// The shard's new entry (its base entry when no delta is accepted).
    pub entry: ShardEntry,
    /// One verdict per delta of the call's shard, in the call's order.
    pub verdicts: Vec<DeltaVerdict>,
    /// The score of each delta it scored, in the call's order: published in the commit, so that anyone
    /// holding the shard can recompute them.
    pub scores: Vec<DeltaScore>,
}

/// From a judge of shards of a round (a holder, or a drawn verifier): its verdicts on each judged shard's
/// deltas and the shard's next state from the accepted ones, answering the [`AggregationCall`] it names.
/// Signed by the judge, so a wrong verdict or result is on record under its key, and anyone holding the base
/// blobs and the payloads can redo it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardAttestation {
    /// The run.
    pub run: RunId,
    /// The round.
    pub round: u64,
    /// [`AggregationCall::hash`] of the call it answers.
    pub call: ContentHash,
    /// What it found for each shard it judged (at most [`MAX_SHARDS_PER_NODE`]), sorted by shard.
    pub results: Vec<ShardJudgment>,
}

/// From a holder of a shard: the coordinator's commit `commit` of round `round` is wrong for `shard`. Applying
/// the commit's accepted deltas (`accepted`, in the commit's order) to the shard's base state (`base`, its
/// blob hash in the round's base checkpoint) gives `computed`, not the commit's `committed`. Every holder of
/// the shard computes the new state with the same deterministic function, so anyone holding the base blob
/// and the payloads can redo the computation and see who is right. With no accepted delta, `computed` is
/// `base` (the shard must be unchanged). Signed by the holder that found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitDispute {
    /// The run.
    pub run: RunId,
    /// The round of the disputed commit.
    pub round: u64,
    /// [`RoundCommit::hash`] of the disputed commit.
    pub commit: ContentHash,
    /// The shard whose committed hash is wrong.
    pub shard: ShardId,
    /// The shard's blob hash in the round's base checkpoint.
    pub base: ContentHash,
    /// The hash the commit gives the shard.
    pub committed: ContentHash,
    /// The commit's accepted payload hashes for the shard, in the commit's order (at most
    /// [`MAX_DISPUTE_DELTAS`]).
    pub accepted: Vec<ContentHash>,
    /// The hash the holder computed from `base` and `accepted`.
    pub computed: ContentHash,
}

/// Why a [`CommitDispute`] does not describe a given [`RoundCommit`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DisputeMismatch {
    /// The dispute names another run, round or commit id.
    #[error("the dispute is about commit {disputed} of round {round}, not this one ({actual})")]
    OtherCommit {
        /// The commit id the dispute names.
        disputed: ContentHash,
        /// The round the dispute names.
        round: u64,
        /// This commit's id.
        actual: ContentHash,
    },
    /// The commit has no entry for the disputed shard, or another hash for it.
    #[error("the commit does not give {shard} the hash the dispute quotes")]
    OtherEntry {
        /// The shard.
        shard: ShardId,
    },
    /// The commit accepted other payloads for the shard than the dispute lists.
    #[error("the commit accepted other payloads for {shard} than the dispute lists")]
    OtherDeltas {
        /// The shard.
        shard: ShardId,
    },
    /// The dispute agrees with the commit (nothing is disputed).
    #[error("the dispute computes the committed hash itself")]
    NoDisagreement,
}

impl CommitDispute {
    /// Checks that the dispute quotes `commit` faithfully: same run, round and id, the committed entry of its
    /// shard, the accepted payloads of its shard in order, and a computed hash that differs. What remains for
    /// a checker is to redo the computation from `base` and the payloads.
    pub fn matches(&self, commit: &RoundCommit) -> Result<(), DisputeMismatch> {
        let actual = commit.hash().map_err(|_| DisputeMismatch::OtherCommit {
            disputed: self.commit,
            round: self.round,
            actual: ContentHash([0; 32]),
        })?;
        if self.run != commit.run || self.round != commit.round || self.commit != actual {
            return Err(DisputeMismatch::OtherCommit {
                disputed: self.commit,
                round: self.round,
                actual,
            });
        }
        if commit.checkpoint.shard(&self.shard).map(|e| e.hash) != Some(self.committed) {
            return Err(DisputeMismatch::OtherEntry { shard: self.shard });
        }
        let accepted = commit
            .accepted
            .iter()
            .find(|a| a.shard == self.shard)
            .map(|a| a.deltas.as_slice())
            .unwrap_or(&[]);
        if accepted != self.accepted.as_slice() {
            return Err(DisputeMismatch::OtherDeltas { shard: self.shard });
        }
        if self.computed == self.committed {
            return Err(DisputeMismatch::NoDisagreement);
        }
        Ok(())
    }
}

/// One shard of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShardEntry {
    /// The shard.
    pub shard: ShardId,
    /// blake3 of the stored shard blob.
    pub hash: ContentHash,
    /// Size of the blob in bytes.
    pub size: u64,
    /// The round that last changed this shard.
    pub round: u64,
}

/// A whole checkpoint: the blobs that make it up. Addressed by [`CheckpointManifest::hash`], the blake3 of
/// its canonical encoding, so a manifest is itself a content-addressed blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointManifest {
    /// The run.
    pub run: RunId,
    /// The round this checkpoint ends.
    pub round: u64,
    /// Its shards, sorted by shard id, each at most once (at most [`MAX_MANIFEST_SHARDS`]).
    pub shards: Vec<ShardEntry>,
}

impl CheckpointManifest {
    /// The canonical encoding (bincode standard, no version tag), which is also the manifest blob's content.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        crate::wire::encode::<_, { crate::limits::MAX_PARCEL_MESSAGE_BYTES }>(
            self,
            "checkpoint manifest",
        )
    }

    /// Decodes a manifest blob fetched by hash.
    pub fn from_bytes(bytes: &[u8]) -> Result<CheckpointManifest, ProtocolError> {
        let manifest: CheckpointManifest = crate::wire::decode::<
            _,
            { crate::limits::MAX_PARCEL_MESSAGE_BYTES },
        >(bytes, "checkpoint manifest")?;
        manifest.check_limits()?;
        Ok(manifest)
    }

    /// blake3 of [`CheckpointManifest::to_bytes`]: the id of this checkpoint.
    pub fn hash(&self) -> Result<ContentHash, ProtocolError> {
        Ok(ContentHash::of(&self.to_bytes()?))
    }

    /// The entry of `shard`, if the checkpoint has it.
    pub fn shard(&self, shard: &ShardId) -> Option<&ShardEntry> {
        self.shards.iter().find(|e| &e.shard == shard)
    }

    fn check_limits(&self) -> Result<(), ProtocolError> {
        count("manifest shards", self.shards.len(), MAX_MANIFEST_SHARDS)?;
        if !self.shards.windows(2).all(|w| w[0].shard < w[1].shard) {
            return Err(ProtocolError::InvalidField {
                what: "manifest shards",
                detail: "not sorted by shard id, or a shard appears twice".into(),
            });
        }
        Ok(())
    }
}

/// The kind of compute a node offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// CPU only.
    Cpu,
    /// An NVIDIA GPU through CUDA.
    Cuda,
}

/// What a node can take on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// Its compute device.
    pub device: DeviceKind,
    /// Memory available for model shards, in bytes.
    pub memory_bytes: u64,
    /// Measured training throughput, in tokens per second.
    pub tokens_per_second: f32,
    /// Most shards it is willing to host.
    pub max_shards: u32,
}

/// From any node, every few seconds: I am alive, I host these shards, I can do this much.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The run the node serves.
    pub run: RunId,
    /// Increases with every heartbeat from this node, so a stale one can be spotted.
    pub seq: u64,
    /// The shards (experts, trunk) it holds and serves.
    pub hosted: Vec<ShardId>,
    /// Its capacity.
    pub capacity: Capacity,
    /// Its software version (`mana --version`).
    pub software_version: Text,
}

/// Any gossiped message. The bincode variant index (a varint) is the message type tag on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Variant 0: a round starts.
    RoundAnnouncement(RoundAnnouncement),
    /// Variant 1: a node's delta is ready.
    DeltaAnnouncement(DeltaAnnouncement),
    /// Variant 2: a round is closed.
    RoundCommit(RoundCommit),
    /// Variant 3: a checkpoint exists.
    CheckpointManifest(CheckpointManifest),
    /// Variant 4: a node is alive.
    Heartbeat(Heartbeat),
    /// Variant 5: a holder shows that a commit is wrong for one of its shards.
    CommitDispute(CommitDispute),
    /// Variant 6: the coordinator ends the run.
    RunEnd(RunEnd),
    /// Variant 7: a node that holds a whole committed checkpoint reports its validation loss.
    Evaluation(Evaluation),
    /// Variant 8: the coordinator asks a round's judges for each shard's next state.
    AggregationCall(AggregationCall),
    /// Variant 9: a judge signs the next state of the shards it judged.
    ShardAttestation(ShardAttestation),
    /// Variant 10: a coordinator's round message travels as a blob fetched by hash.
    Parcel(Parcel),
}

/// From the coordinator: the header of one of its round messages that travels as a blob rather than in
/// gossip, because it is too large for a gossip message (a large layout's call or commit) or large enough
/// that gossip's copies of it (every mesh peer sends one) cost more than one fetch. The header is gossiped;
/// each node fetches the signed envelope it names from the peer that passed the header on, which holds it (a
/// node passes a header on only once it has fetched and judged the envelope), or from the coordinator. The
/// envelope is then judged as a gossiped one would be, up to [`crate::limits::MAX_PARCEL_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parcel {
    /// The run.
    pub run: RunId,
    /// The round of the message inside (the opened message must name the same).
    pub round: u64,
    /// blake3 of the signed envelope's bytes (the blob's hash).
    pub envelope: ContentHash,
    /// The envelope's length in bytes, 1 to [`crate::limits::MAX_PARCEL_BYTES`]: a provider offering more is
    /// refused before the transfer starts.
    pub size: u32,
}

/// From any node that holds the whole committed checkpoint `checkpoint` of round `round` (a mirror): the mean
/// loss of that model on the run's fixed validation batches `0..batches`, each of the round's batch shape.
/// Metrics that need the whole model come from whoever mirrors it, not from the coordinator (which need not
/// hold the model); anyone with the checkpoint and the run's text recomputes the figure, and the signature says
/// who measured it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The run.
    pub run: RunId,
    /// The committed round whose checkpoint was evaluated.
    pub round: u64,
    /// That checkpoint's manifest hash.
    pub checkpoint: ContentHash,
    /// How many validation batches (indices `0..batches`) the loss is the mean of (1 to
    /// [`MAX_EVALUATION_BATCHES`]).
    pub batches: u32,
    /// The mean validation loss (finite, not negative).
    pub val_loss: f32,
}

/// From the coordinator: the run is over; `round` was its last, and `checkpoint` (the manifest hash of that
/// round's commit) is the final model. Nodes stop waiting for rounds and say so, rather than show the last
/// round as current forever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEnd {
    /// The run.
    pub run: RunId,
    /// The last committed round.
    pub round: u64,
    /// The final checkpoint's manifest hash.
    pub checkpoint: ContentHash,
}

impl Message {
    /// The run the message belongs to.
    pub fn run(&self) -> &RunId {
        match self {
            Message::RoundAnnouncement(m) => &m.run,
            Message::DeltaAnnouncement(m) => &m.run,
            Message::RoundCommit(m) => &m.run,
            Message::CheckpointManifest(m) => &m.run,
            Message::Heartbeat(m) => &m.run,
            Message::CommitDispute(m) => &m.run,
            Message::RunEnd(m) => &m.run,
            Message::Evaluation(m) => &m.run,
            Message::AggregationCall(m) => &m.run,
            Message::ShardAttestation(m) => &m.run,
            Message::Parcel(m) => &m.run,
        }
    }

    /// The round the message is about; `None` for a heartbeat (about no round).
    pub fn round(&self) -> Option<u64> {
        match self {
            Message::RoundAnnouncement(m) => Some(m.round),
            Message::DeltaAnnouncement(m) => Some(m.round),
            Message::RoundCommit(m) => Some(m.round),
            Message::CheckpointManifest(m) => Some(m.round),
            Message::Heartbeat(_) => None,
            Message::CommitDispute(m) => Some(m.round),
            Message::RunEnd(m) => Some(m.round),
            Message::Evaluation(m) => Some(m.round),
            Message::AggregationCall(m) => Some(m.round),
            Message::ShardAttestation(m) => Some(m.round),
            Message::Parcel(m) => Some(m.round),
        }
    }

    /// The gossip topic the message is published on.
    pub fn topic(&self) -> crate::topics::TopicKind {
        use crate::topics::TopicKind;
        match self {
            Message::RoundAnnouncement(_)
            | Message::RoundCommit(_)
            | Message::CheckpointManifest(_)
            | Message::CommitDispute(_)
            | Message::RunEnd(_)
            | Message::Evaluation(_)
            | Message::AggregationCall(_)
            | Message::ShardAttestation(_)
            | Message::Parcel(_) => TopicKind::Rounds,
            Message::DeltaAnnouncement(_) => TopicKind::Deltas,
            Message::Heartbeat(_) => TopicKind::Heartbeats,
        }
    }

    /// A short name of the message type, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::RoundAnnouncement(_) => "round-announcement",
            Message::DeltaAnnouncement(_) => "delta-announcement",
            Message::RoundCommit(_) => "round-commit",
            Message::CheckpointManifest(_) => "checkpoint-manifest",
            Message::Heartbeat(_) => "heartbeat",
            Message::CommitDispute(_) => "commit-dispute",
            Message::RunEnd(_) => "run-end",
            Message::Evaluation(_) => "evaluation",
            Message::AggregationCall(_) => "aggregation-call",
            Message::ShardAttestation(_) => "shard-attestation",
            Message::Parcel(_) => "parcel",
        }
    }

    /// Checks the count bounds that the byte limit alone does not imply; run on every decoded message.
    pub fn check_limits(&self) -> Result<(), ProtocolError> {
        match self {
            Message::RoundAnnouncement(m) => {
                count("participants", m.participants.len(), MAX_PARTICIPANTS)?;
                for p in &m.participants {
                    count("participant shards", p.shards.len(), MAX_SHARDS_PER_NODE)?;
                    count(
                        "participant data seeds",
                        p.data_seeds.len(),
                        MAX_DATA_SEEDS_PER_NODE,
                    )?;
                }
                m.hyper.codec.check()
            }
            Message::DeltaAnnouncement(_) => Ok(()),
            Message::RoundCommit(m) => {
                let accepted: usize = m.accepted.iter().map(|a| a.deltas.len()).sum();
                count(
                    "commit deltas",
                    accepted.saturating_add(m.rejected.len()),
                    MAX_COMMIT_DELTAS,
                )?;
                count("commit scores", m.scores.len(), MAX_COMMIT_DELTAS)?;
                for a in &m.accepted {
                    check_weights(a)?;
                }
                count("commit dissent", m.dissent.len(), MAX_MANIFEST_SHARDS)?;
                if m.dissent.windows(2).any(|w| w[0].shard >= w[1].shard) {
                    return Err(ProtocolError::InvalidField {
                        what: "commit dissent",
                        detail: "not sorted by shard, or a shard twice".into(),
                    });
                }
                for d in &m.dissent {
                    count(
                        "dissenting judges",
                        d.dissenters.len().saturating_add(d.absent.len()),
                        MAX_SHARD_JUDGES,
                    )?;
                }
                m.checkpoint.check_limits()
            }
            Message::CheckpointManifest(m) => m.check_limits(),
            Message::Heartbeat(m) => count("hosted shards", m.hosted.len(), MAX_SHARDS_PER_NODE),
            Message::CommitDispute(m) => {
                count("dispute deltas", m.accepted.len(), MAX_DISPUTE_DELTAS)
            }
            Message::RunEnd(_) => Ok(()),
            Message::Evaluation(m) => {
                if !(1..=MAX_EVALUATION_BATCHES).contains(&m.batches) {
                    return Err(ProtocolError::InvalidField {
                        what: "evaluation batches",
                        detail: format!("{}, must be 1 to {MAX_EVALUATION_BATCHES}", m.batches),
                    });
                }
                if !m.val_loss.is_finite() || m.val_loss < 0.0 {
                    return Err(ProtocolError::InvalidField {
                        what: "evaluation loss",
                        detail: format!("{} is not a finite loss", m.val_loss),
                    });
                }
                Ok(())
            }
            Message::AggregationCall(m) => {
                count("call shards", m.shards.len(), MAX_MANIFEST_SHARDS)?;
                let deltas: usize = m.shards.iter().map(|c| c.deltas.len()).sum();
                count("call deltas", deltas, MAX_COMMIT_DELTAS)?;
                count("call norms", m.norms.len(), MAX_CALL_NORMS)?;
                if !(1..=crate::limits::MAX_NORM_HISTORY).contains(&m.norm_history) {
                    return Err(ProtocolError::InvalidField {
                        what: "call norm history",
                        detail: format!(
                            "{}, must be 1 to {}",
                            m.norm_history,
                            crate::limits::MAX_NORM_HISTORY
                        ),
                    });
                }
                // Records of one shard are together (shard order, checked below): count each run.
                let mut run_of = (None, 0u32);
                for n in &m.norms {
                    run_of = match run_of {
                        (Some(s), k) if s == n.shard => (Some(s), k + 1),
                        _ => (Some(n.shard), 1),
                    };
                    if run_of.1 > m.norm_history {
                        return Err(ProtocolError::InvalidField {
                            what: "call norms",
                            detail: format!(
                                "more than the call's norm history ({}) for {}",
                                m.norm_history, n.shard
                            ),
                        });
                    }
                }
                check_rule(&m.rule)?;
                check_judging(&m.judging)?;
                if let Some(n) = m.norms.iter().find(|n| !n.norm.is_finite() || n.norm < 0.0) {
                    return Err(ProtocolError::InvalidField {
                        what: "call norm",
                        detail: format!("{} for {} is not a norm", n.norm, n.shard),
                    });
                }
                if m.shards.windows(2).any(|w| w[0].shard >= w[1].shard) {
                    return Err(ProtocolError::InvalidField {
                        what: "call shards",
                        detail: "not sorted by shard, or a shard twice".into(),
                    });
                }
                for c in &m.shards {
                    if c.deltas.windows(2).any(|w| {
                        (w[0].payload_hash, w[0].sender) >= (w[1].payload_hash, w[1].sender)
                    }) {
                        return Err(ProtocolError::InvalidField {
                            what: "call deltas",
                            detail: format!(
                                "{}: not sorted by payload and sender, or one twice",
                                c.shard
                            ),
                        });
                    }
                    if let Some(d) = c
                        .deltas
                        .iter()
                        .find(|d| !(1..=MAX_DELTA_WEIGHT).contains(&d.weight))
                    {
                        return Err(ProtocolError::InvalidField {
                            what: "called weight",
                            detail: format!(
                                "{} for {}, must be 1 to {MAX_DELTA_WEIGHT}",
                                d.weight, c.shard
                            ),
                        });
                    }
                    count(
                        "shard judges",
                        c.holders.len().saturating_add(c.verifiers.len()),
                        MAX_SHARD_JUDGES,
                    )?;
                    if let Some(i) = c
                        .holders
                        .iter()
                        .chain(&c.verifiers)
                        .chain(c.deltas.iter().map(|d| &d.sender))
                        .find(|i| **i as usize >= MAX_PARTICIPANTS)
                    {
                        return Err(ProtocolError::InvalidField {
                            what: "participant index",
                            detail: format!("{i}, over the most participants ({MAX_PARTICIPANTS})"),
                        });
                    }
                }
                Ok(())
            }
            Message::ShardAttestation(m) => {
                count("attested shards", m.results.len(), MAX_SHARDS_PER_NODE)?;
                if m.results
                    .windows(2)
                    .any(|w| w[0].entry.shard >= w[1].entry.shard)
                {
                    return Err(ProtocolError::InvalidField {
                        what: "attested shards",
                        detail: "not sorted by shard, or a shard twice".into(),
                    });
                }
                let verdicts: usize = m.results.iter().map(|r| r.verdicts.len()).sum();
                count("attested verdicts", verdicts, MAX_COMMIT_DELTAS)?;
                for r in &m.results {
                    count("attested scores", r.scores.len(), r.verdicts.len())?;
                    let bad_norm = r.verdicts.iter().any(|v| {
                        matches!(v, DeltaVerdict::Accept { norm } if !norm.is_finite() || *norm < 0.0)
                    });
                    if bad_norm {
                        return Err(ProtocolError::InvalidField {
                            what: "accepted norm",
                            detail: format!("{}: not a norm", r.entry.shard),
                        });
                    }
                }
                Ok(())
            }
            Message::Parcel(m) => {
                if !(1..=crate::limits::MAX_PARCEL_BYTES).contains(&(m.size as usize)) {
                    return Err(ProtocolError::InvalidField {
                        what: "parcel size",
                        detail: format!(
                            "{} bytes, must be 1 to {}",
                            m.size,
                            crate::limits::MAX_PARCEL_BYTES
                        ),
                    });
                }
                Ok(())
            }
        }
    }
}

/// A verdict rule's figures: finite, the shares between 0 and 1, the tolerances not negative.
/// A judging rule draws at least one holder and at most [`MAX_SHARD_JUDGES`] judges of a shard, escalated
/// or not.
fn check_judging(j: &JudgingRule) -> Result<(), ProtocolError> {
    if j.max_holder_judges == 0 || j.most_judges() > MAX_SHARD_JUDGES as u64 {
        return Err(ProtocolError::InvalidField {
            what: "call judging rule",
            detail: format!(
                "{} holders and {} verifiers per shard (twice that escalated): at least one holder, at most {MAX_SHARD_JUDGES} judges",
                j.max_holder_judges, j.verifiers_per_shard
            ),
        });
    }
    Ok(())
}

fn check_rule(r: &VerdictRule) -> Result<(), ProtocolError> {
    let fine = [
        r.min_norm_ratio,
        r.score_share,
        r.trunk_min_gain,
        r.trunk_share,
        r.expert_tolerance,
    ]
    .iter()
    .all(|v| v.is_finite())
        && (0.0..=1.0).contains(&r.score_share)
        && r.min_norm_ratio >= 0.0
        && r.expert_tolerance >= 0.0;
    if !fine {
        return Err(ProtocolError::InvalidField {
            what: "verdict rule",
            detail: format!("{r:?}"),
        });
    }
    Ok(())
}

/// The weights of one shard's accepted deltas: one per delta, each from 1 to [`MAX_DELTA_WEIGHT`].
fn check_weights(a: &AcceptedDeltas) -> Result<(), ProtocolError> {
    if a.norms.len() != a.deltas.len() || a.norms.iter().any(|n| !n.is_finite() || *n < 0.0) {
        return Err(ProtocolError::InvalidField {
            what: "accepted norms",
            detail: format!(
                "{} norms for {} deltas of {}, each a finite norm",
                a.norms.len(),
                a.deltas.len(),
                a.shard
            ),
        });
    }
    if a.weights.len() != a.deltas.len()
        || a.weights
            .iter()
            .any(|w| !(1..=MAX_DELTA_WEIGHT).contains(w))
    {
        return Err(ProtocolError::InvalidField {
            what: "accepted weights",
            detail: format!(
                "{} weights for {} deltas of {}, each must be 1 to {MAX_DELTA_WEIGHT}",
                a.weights.len(),
                a.deltas.len(),
                a.shard
            ),
        });
    }
    Ok(())
}

fn count(what: &'static str, n: usize, max: usize) -> Result<(), ProtocolError> {
    if n > max {
        return Err(ProtocolError::InvalidField {
            what,
            detail: format!("{n} entries, over the limit of {max}"),
        });
    }
    Ok(())
}
