//! The one place where a decoded, signature-checked message is judged against its context: the run this
//! node follows, the current round, the clock. Every refusal has its own [`Rejection`] (with the details,
//! for logs) and a stable [`RejectCode`] (short, for the wire and for metrics), so an operator can see why a
//! contribution was refused.
//!
//! The context, including the time, is passed in: this crate has no clock.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::codec::{CodecError, CodecOptions, DeltaHeader, decode_delta, header_for};
use crate::contribution::{Binding, ContributionError, split_contribution};
use crate::envelope::SignedEnvelope;
use crate::error::ProtocolError;
use crate::identity::PublicKey;
use crate::ids::{ContentHash, RunId, ShardId};
use crate::limits::{MAX_DELTA_PAYLOAD_BYTES, MAX_DISPUTE_AGE_ROUNDS};
use crate::messages::{
    CommitDispute, DeltaAnnouncement, Evaluation, Heartbeat, Message, RoundAnnouncement,
    RoundCommit,
};

/// Tolerances of the validator; the defaults suit nodes with NTP-synchronised clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationLimits {
    /// Most a message's timestamp may differ from the receiver's clock, either way.
    pub max_clock_skew_ms: u64,
    /// Largest delta payload accepted, in bytes.
    pub max_delta_payload_bytes: u64,
}

impl Default for ValidationLimits {
    fn default() -> Self {
        ValidationLimits {
            max_clock_skew_ms: 30_000,
            max_delta_payload_bytes: MAX_DELTA_PAYLOAD_BYTES,
        }
    }
}

/// What a message is judged against.
#[derive(Debug, Clone, Copy)]
pub struct ValidationContext<'a> {
    /// The run this node follows.
    pub run: &'a RunId,
    /// The run's coordinator, the only signer of announcements, commits and manifests.
    pub coordinator: &'a PublicKey,
    /// The current round's announcement; `None` before the first one arrived.
    pub current: Option<&'a RoundAnnouncement>,
    /// The receiver's clock, unix milliseconds.
    pub now_ms: u64,
    /// Tolerances.
    pub limits: ValidationLimits,
}

/// The stable short code of a [`Rejection`]: what goes on the wire (in [`RoundCommit`]) and into metrics.
/// Codes are only ever added, never renumbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectCode {
    /// `bad-envelope`: malformed bytes or a bad signature.
    BadEnvelope,
    /// `unknown-run`: the message is for another run.
    UnknownRun,
    /// `clock-skew`: the timestamp is too far from the receiver's clock.
    ClockSkew,
    /// `no-round`: a round-bound message arrived before any round announcement.
    NoRound,
    /// `stale-round`: the round is already over (a replay or a straggler).
    StaleRound,
    /// `future-round`: the round is too far ahead.
    FutureRound,
    /// `not-coordinator`: a coordinator-only message signed by someone else.
    NotCoordinator,
    /// `not-participant`: the signer takes no part in this round.
    NotParticipant,
    /// `shard-not-assigned`: the signer is not assigned this shard this round.
    ShardNotAssigned,
    /// `wrong-base`: the delta was computed from another checkpoint.
    WrongBase,
    /// `late`: signed after the round's delta deadline.
    Late,
    /// `too-large`: a size is over its limit.
    TooLarge,
    /// `non-finite`: a NaN or an infinity where a number is expected.
    NonFinite,
    /// `inconsistent`: fields that contradict each other (duplicate participants, deadlines out of order...).
    Inconsistent,
    /// `norm-too-large`: the delta's norm is over k times the round's median.
    NormTooLarge,
    /// `hash-mismatch`: the payload's blake3 is not the announced one.
    HashMismatch,
    /// `size-mismatch`: the payload's size is not the announced one.
    SizeMismatch,
    /// `bad-payload`: the payload does not decode, or has the wrong length for its shard.
    BadPayload,
    /// `not-bound`: the payload is bound to another sender, round, run or shard than its announcement claims
    /// (someone else's payload re-announced, or an old one replayed).
    NotBound,
    /// `unavailable`: the payload could not be fetched within its budget (withheld, trickled, or its sender
    /// unreachable).
    Unavailable,
    /// `norm-too-small`: the delta's norm is under a share of the reference norm (a zero or near-zero delta:
    /// no work done, nothing to credit).
    NormTooSmall,
    /// `low-score`: applied alone, the delta does not lower the loss on the round's score batch by more than
    /// the run's threshold against a zero delta (a random, sign-flipped or useless delta).
    LowScore,
    /// `not-admitted`: the signer may not take part in the run (not on the allowlist, banned for its record,
    /// or the run or its address is full).
    NotAdmitted,
}

impl RejectCode {
    /// The short code, kebab-case, stable.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::BadEnvelope => "bad-envelope",
            RejectCode::UnknownRun => "unknown-run",
            RejectCode::ClockSkew => "clock-skew",
            RejectCode::NoRound => "no-round",
            RejectCode::StaleRound => "stale-round",
            RejectCode::FutureRound => "future-round",
            RejectCode::NotCoordinator => "not-coordinator",
            RejectCode::NotParticipant => "not-participant",
            RejectCode::ShardNotAssigned => "shard-not-assigned",
            RejectCode::WrongBase => "wrong-base",
            RejectCode::Late => "late",
            RejectCode::TooLarge => "too-large",
            RejectCode::NonFinite => "non-finite",
            RejectCode::Inconsistent => "inconsistent",
            RejectCode::NormTooLarge => "norm-too-large",
            RejectCode::HashMismatch => "hash-mismatch",
            RejectCode::SizeMismatch => "size-mismatch",
            RejectCode::BadPayload => "bad-payload",
            RejectCode::NotBound => "not-bound",
            RejectCode::Unavailable => "unavailable",
            RejectCode::NormTooSmall => "norm-too-small",
            RejectCode::LowScore => "low-score",
            RejectCode::NotAdmitted => "not-admitted",
        }
    }
}

impl std::fmt::Display for RejectCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a message or a delta payload was refused, with the details an operator needs.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Rejection {
    /// The envelope is malformed or its signature is bad.
    #[error("bad-envelope: {0}")]
    BadEnvelope(ProtocolError),
    /// The message is for another run.
    #[error("unknown-run: message for run {got}, this node follows {expected}")]
    UnknownRun {
        /// The message's run.
        got: RunId,
        /// The run followed.
        expected: RunId,
    },
    /// The timestamp is too far from the receiver's clock.
    #[error(
        "clock-skew: signed at {timestamp_ms} ms, now is {now_ms} ms, tolerance {max_skew_ms} ms"
    )]
    ClockSkew {
        /// The envelope's timestamp.
        timestamp_ms: u64,
        /// The receiver's clock.
        now_ms: u64,
        /// The tolerance.
        max_skew_ms: u64,
    },
    /// A round-bound message arrived before any round announcement.
    #[error("no-round: {kind} for round {round} but no round has been announced")]
    NoRound {
        /// The message type.
        kind: &'static str,
        /// Its round.
        round: u64,
    },
    /// The round is over.
    #[error("stale-round: {kind} for round {round}, current round is {current}")]
    StaleRound {
        /// The message type.
        kind: &'static str,
        /// Its round.
        round: u64,
        /// The current round.
        current: u64,
    },
    /// The round is too far ahead.
    #[error("future-round: {kind} for round {round}, current round is {current}")]
    FutureRound {
        /// The message type.
        kind: &'static str,
        /// Its round.
        round: u64,
        /// The current round.
        current: u64,
    },
    /// A coordinator-only message signed by someone else.
    #[error("not-coordinator: {kind} signed by {signer}, not by the coordinator")]
    NotCoordinator {
        /// The message type.
        kind: &'static str,
        /// The signer.
        signer: PublicKey,
    },
    /// The signer takes no part in the round.
    #[error("not-participant: {signer} is not a participant of round {round}")]
    NotParticipant {
        /// The signer.
        signer: PublicKey,
        /// The round.
        round: u64,
    },
    /// The signer is not assigned the shard.
    #[error("shard-not-assigned: {signer} is not assigned {shard} in round {round}")]
    ShardNotAssigned {
        /// The signer.
        signer: PublicKey,
        /// The shard.
        shard: ShardId,
        /// The round.
        round: u64,
    },
    /// The delta was computed from another checkpoint.
    #[error("wrong-base: delta computed from checkpoint {got}, the round starts from {expected}")]
    WrongBase {
        /// The delta's base.
        got: ContentHash,
        /// The round's base.
        expected: ContentHash,
    },
    /// Signed after the delta deadline.
    #[error("late: signed at {timestamp_ms} ms, deltas were due by {deadline_ms} ms")]
    Late {
        /// The envelope's timestamp.
        timestamp_ms: u64,
        /// The deadline.
        deadline_ms: u64,
    },
    /// A size is over its limit.
    #[error("too-large: {what} is {size}, over the limit of {max}")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A NaN or an infinity.
    #[error("non-finite: {field} is not a finite number")]
    NonFinite {
        /// Which field.
        field: &'static str,
    },
    /// Fields contradict each other.
    #[error("inconsistent: {0}")]
    Inconsistent(String),
    /// The delta's norm is too large.
    #[error("norm-too-large: delta norm {norm} is over {ratio} x the round's median {median}")]
    NormTooLarge {
        /// The delta's L2 norm.
        norm: f32,
        /// The round's median norm for the shard.
        median: f32,
        /// The allowed ratio.
        ratio: f32,
    },
    /// The payload's hash is not the announced one.
    #[error("hash-mismatch: payload hashes to {got}, announced {expected}")]
    HashMismatch {
        /// Announced.
        expected: ContentHash,
        /// Computed.
        got: ContentHash,
    },
    /// The payload's size is not the announced one.
    #[error("size-mismatch: payload is {got} bytes, announced {announced}")]
    SizeMismatch {
        /// Announced.
        announced: u64,
        /// Actual.
        got: u64,
    },
    /// The payload does not decode.
    #[error("bad-payload: {0}")]
    BadPayload(CodecError),
    /// The payload decodes to the wrong number of values for its shard.
    #[error("bad-payload: delta has {got} values, the shard has {expected}")]
    WrongLength {
        /// The shard's parameter count.
        expected: usize,
        /// The delta's length.
        got: usize,
    },
    /// The payload carries another number of expert loads than its shard's contributions do (the model's
    /// routed experts for the trunk, none for an expert).
    #[error("bad-payload: {got} expert loads, a contribution to this shard carries {expected}")]
    WrongLoads {
        /// The number the shard's contributions carry.
        expected: usize,
        /// The number in the payload.
        got: usize,
    },
    /// The delta was not encoded with the round's codec (another layout, value format, scale format, block
    /// or density), though it may have its size.
    #[error("bad-payload: the delta's header {got:?} is not the round codec's {expected:?}")]
    WrongCodec {
        /// The header the round's codec writes.
        expected: Box<DeltaHeader>,
        /// The payload's header.
        got: Box<DeltaHeader>,
    },
    /// The payload is not a contribution (no binding, or a malformed one).
    #[error("bad-payload: {0}")]
    BadContribution(ContributionError),
    /// The payload's binding is not what its announcement and signer claim.
    #[error("not-bound: the payload is bound to {bound}, its announcement claims {claimed}")]
    NotBound {
        /// What the announcement and its signer claim.
        claimed: Box<Binding>,
        /// What the payload is bound to.
        bound: Box<Binding>,
    },
}

impl Rejection {
    /// The stable short code.
    pub fn code(&self) -> RejectCode {
        match self {
            Rejection::BadEnvelope(_) => RejectCode::BadEnvelope,
            Rejection::UnknownRun { .. } => RejectCode::UnknownRun,
            Rejection::ClockSkew { .. } => RejectCode::ClockSkew,
            Rejection::NoRound { .. } => RejectCode::NoRound,
            Rejection::StaleRound { .. } => RejectCode::StaleRound,
            Rejection::FutureRound { .. } => RejectCode::FutureRound,
            Rejection::NotCoordinator { .. } => RejectCode::NotCoordinator,
            Rejection::NotParticipant { .. } => RejectCode::NotParticipant,
            Rejection::ShardNotAssigned { .. } => RejectCode::ShardNotAssigned,
            Rejection::WrongBase { .. } => RejectCode::WrongBase,
            Rejection::Late { .. } => RejectCode::Late,
            Rejection::TooLarge { .. } => RejectCode::TooLarge,
            Rejection::NonFinite { .. } => RejectCode::NonFinite,
            Rejection::Inconsistent(_) => RejectCode::Inconsistent,
            Rejection::NormTooLarge { .. } => RejectCode::NormTooLarge,
            Rejection::HashMismatch { .. } => RejectCode::HashMismatch,
            Rejection::SizeMismatch { .. } => RejectCode::SizeMismatch,
            Rejection::BadPayload(_)
            | Rejection::WrongLength { .. }
            | Rejection::WrongLoads { .. }
            | Rejection::WrongCodec { .. }
            | Rejection::BadContribution(_) => RejectCode::BadPayload,
            Rejection::NotBound { .. } => RejectCode::NotBound,
        }
    }
}

/// Verifies an envelope and judges its message: the entry point for everything received over gossip.
pub fn validate_envelope(
    ctx: &ValidationContext<'_>,
    envelope: &SignedEnvelope,
) -> Result<Message, Rejection> {
    let message = envelope.verify().map_err(Rejection::BadEnvelope)?;
    validate_message(ctx, &envelope.signer, envelope.timestamp_ms, &message)?;
    Ok(message)
}

/// Judges a verified message signed by `signer` at `timestamp_ms` against the context.
pub fn validate_message(
    ctx: &ValidationContext<'_>,
    signer: &PublicKey,
    timestamp_ms: u64,
    message: &Message,
) -> Result<(), Rejection> {
    if message.run() != ctx.run {
        return Err(Rejection::UnknownRun {
            got: message.run().clone(),
            expected: ctx.run.clone(),
        });
    }
    if timestamp_ms.abs_diff(ctx.now_ms) > ctx.limits.max_clock_skew_ms {
        return Err(Rejection::ClockSkew {
            timestamp_ms,
            now_ms: ctx.now_ms,
            max_skew_ms: ctx.limits.max_clock_skew_ms,
        });
    }
    let kind = message.kind();
    let from_coordinator = || {
        if signer == ctx.coordinator {
            Ok(())
        } else {
            Err(Rejection::NotCoordinator {
                kind,
                signer: *signer,
            })
        }
    };
    match message {
        Message::RoundAnnouncement(m) => {
            from_coordinator()?;
            // Any later round is taken: a node that missed announcements (asleep, partitioned, its queue
            // overflowed) catches up from the next one it sees. Only the coordinator signs rounds, and the clock
            // check above keeps an old announcement from being replayed.
            if let Some(current) = ctx.current
                && m.round <= current.round
            {
                return Err(Rejection::StaleRound {
                    kind,
                    round: m.round,
                    current: current.round,
                });
            }
            check_announcement(m)
        }
        Message::DeltaAnnouncement(m) => check_delta_announcement(ctx, signer, timestamp_ms, m),
        Message::RoundCommit(m) => {
            from_coordinator()?;
            current_or_later(ctx, kind, m.round)?;
            check_commit(m)
        }
        Message::CheckpointManifest(m) => {
            from_coordinator()?;
            if let Some(current) = ctx.current
                && m.round > current.round
            {
                return Err(Rejection::FutureRound {
                    kind,
                    round: m.round,
                    current: current.round,
                });
            }
            Ok(())
        }
        Message::Heartbeat(m) => check_heartbeat(m),
        Message::CommitDispute(m) => check_dispute(ctx, m),
        Message::Evaluation(m) => check_evaluation(ctx, m),
        Message::AggregationCall(m) => {
            from_coordinator()?;
            current_or_later(ctx, kind, m.round)
        }
        // From any judge of the round in progress (or of one just committed, still on its way).
        Message::ShardAttestation(m) => recent_round(ctx, "shard-attestation", m.round),
        // Only the coordinator makes nodes fetch a blob for a header; what is inside is judged once opened
        // (its round included: an announcement inside is ahead of the current round).
        Message::Parcel(_) => from_coordinator(),
        // The end of the run, whatever round this node is in: one that missed the last round's announcement
        // (asleep, or its copy lost) must still hear that the run is over, and take the final checkpoint it
        // names. Only the coordinator signs it, and the clock check keeps an old one from being replayed.
        Message::RunEnd(_) => from_coordinator(),
    }
}

/// An evaluation may come from any node (whoever mirrors the checkpoint; a reader decides whose figures it
/// trusts): about a committed round, so never ahead of the current one, and recent (an old figure has
/// nothing left to tell).
fn check_evaluation(ctx: &ValidationContext<'_>, m: &Evaluation) -> Result<(), Rejection> {
    recent_round(ctx, "evaluation", m.round)
}

/// A dispute may come from any node (a holder of the shard); it must be about a round already committed or
/// being committed (not ahead of the current one), recent, and actually disagree with the commit it quotes.
fn check_dispute(ctx: &ValidationContext<'_>, m: &CommitDispute) -> Result<(), Rejection> {
    recent_round(ctx, "commit-dispute", m.round)?;
    if m.computed == m.committed {
        return Err(Rejection::Inconsistent(
            "the dispute computes the committed hash".into(),
        ));
    }
    if m.accepted.is_empty() && m.computed != m.base {
        return Err(Rejection::Inconsistent(
            "with no accepted delta the computed hash must be the base's".into(),
        ));
    }
    Ok(())
}

/// The message's round must be a recent committed one: not ahead of the current round, and at most
/// [`MAX_DISPUTE_AGE_ROUNDS`] behind it (a current round must exist). Disputes and evaluations speak of
/// rounds just committed.
fn recent_round(
    ctx: &ValidationContext<'_>,
    kind: &'static str,
    round: u64,
) -> Result<(), Rejection> {
    let current = ctx.current.ok_or(Rejection::NoRound { kind, round })?.round;
    if round > current {
        return Err(Rejection::FutureRound {
            kind,
            round,
            current,
        });
    }
    if current - round > MAX_DISPUTE_AGE_ROUNDS {
        return Err(Rejection::StaleRound {
            kind,
            round,
            current,
        });
    }
    Ok(())
}

/// A commit is for the current round or a later one: a node that missed a round's announcement still takes
/// its commit (the checkpoint every holder moves to), and with it catches up. Before any announcement, any
/// round is later.
fn current_or_later(
    ctx: &ValidationContext<'_>,
    kind: &'static str,
    round: u64,
) -> Result<(), Rejection> {
    match ctx.current {
        Some(current) if round < current.round => Err(Rejection::StaleRound {
            kind,
            round,
            current: current.round,
        }),
        _ => Ok(()),
    }
}

/// The message's round must be the current one.
fn exact_round(
    ctx: &ValidationContext<'_>,
    kind: &'static str,
    round: u64,
) -> Result<(), Rejection> {
    let current = ctx.current.ok_or(Rejection::NoRound { kind, round })?.round;
    if round < current {
        return Err(Rejection::StaleRound {
            kind,
            round,
            current,
        });
    }
    if round > current {
        return Err(Rejection::FutureRound {
            kind,
            round,
            current,
        });
    }
    Ok(())
}

fn finite(field: &'static str, v: f32) -> Result<(), Rejection> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Rejection::NonFinite { field })
    }
}

fn check_announcement(m: &RoundAnnouncement) -> Result<(), Rejection> {
    let h = &m.hyper;
    for (field, v) in [
        ("inner_lr", h.inner_lr),
        ("weight_decay", h.weight_decay),
        ("outer_lr", h.outer_lr),
        ("outer_momentum", h.outer_momentum),
        ("router_bias_gamma", h.router_bias_gamma),
        ("max_norm_ratio", m.max_norm_ratio),
    ] {
        finite(field, v)?;
    }
    if !(0.0..=1.0).contains(&h.router_bias_gamma) {
        return Err(Rejection::Inconsistent(format!(
            "router_bias_gamma {} is not in [0, 1]",
            h.router_bias_gamma
        )));
    }
    if let Some(d) = h.codec.top_k_density {
        finite("top_k_density", d)?;
    }
    h.codec
        .check()
        .map_err(|e| Rejection::Inconsistent(e.to_string()))?;
    if m.max_norm_ratio <= 0.0 {
        return Err(Rejection::Inconsistent(format!(
            "max_norm_ratio {} is not positive",
            m.max_norm_ratio
        )));
    }
    if m.deadlines.deltas_by_ms > m.deadlines.commit_by_ms {
        return Err(Rejection::Inconsistent(
            "the delta deadline is after the commit deadline".into(),
        ));
    }
    let mut nodes = HashSet::new();
    for p in &m.participants {
        if !nodes.insert(p.node) {
            return Err(Rejection::Inconsistent(format!(
                "participant {} is listed twice",
                p.node
            )));
        }
        let mut shards = HashSet::new();
        if let Some(dup) = p.shards.iter().find(|s| !shards.insert(**s)) {
            return Err(Rejection::Inconsistent(format!(
                "participant {} is assigned {dup} twice",
                p.node
            )));
        }
    }
    Ok(())
}

fn check_delta_announcement(
    ctx: &ValidationContext<'_>,
    signer: &PublicKey,
    timestamp_ms: u64,
    m: &DeltaAnnouncement,
) -> Result<(), Rejection> {
    exact_round(ctx, "delta-announcement", m.round)?;
    let current = ctx.current.ok_or(Rejection::NoRound {
        kind: "delta-announcement",
        round: m.round,
    })?;
    let participant = current
        .participant(signer)
        .ok_or(Rejection::NotParticipant {
            signer: *signer,
            round: m.round,
        })?;
    if !participant.shards.contains(&m.shard) {
        return Err(Rejection::ShardNotAssigned {
            signer: *signer,
            shard: m.shard,
            round: m.round,
        });
    }
    if m.base_checkpoint != current.base_checkpoint {
        return Err(Rejection::WrongBase {
            got: m.base_checkpoint,
            expected: current.base_checkpoint,
        });
    }
    if timestamp_ms > current.deadlines.deltas_by_ms {
        return Err(Rejection::Late {
            timestamp_ms,
            deadline_ms: current.deadlines.deltas_by_ms,
        });
    }
    if m.payload_size > ctx.limits.max_delta_payload_bytes {
        return Err(Rejection::TooLarge {
            what: "delta payload",
            size: m.payload_size,
            max: ctx.limits.max_delta_payload_bytes,
        });
    }
    finite("loss_before", m.stats.loss_before)?;
    finite("loss_after", m.stats.loss_after)?;
    finite("delta_norm", m.stats.delta_norm)?;
    if m.stats.delta_norm < 0.0 {
        return Err(Rejection::Inconsistent(format!(
            "negative delta norm {}",
            m.stats.delta_norm
        )));
    }
    Ok(())
}

fn check_commit(m: &RoundCommit) -> Result<(), Rejection> {
    if m.checkpoint.run != m.run || m.checkpoint.round != m.round {
        return Err(Rejection::Inconsistent(format!(
            "commit of {}/{} carries the checkpoint of {}/{}",
            m.run, m.round, m.checkpoint.run, m.checkpoint.round
        )));
    }
    Ok(())
}

fn check_heartbeat(m: &Heartbeat) -> Result<(), Rejection> {
    finite("tokens_per_second", m.capacity.tokens_per_second)?;
    if m.capacity.tokens_per_second < 0.0 {
        return Err(Rejection::Inconsistent("negative throughput".into()));
    }
    Ok(())
}

/// A contribution payload that passed [`validate_delta_payload`]: its decoded delta and expert loads.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidPayload {
    /// The delta's values (finite, the shard's length).
    pub delta: Vec<f32>,
    /// The routed slots per expert the sender's training saw (the trunk's contributions; empty otherwise).
    pub loads: Vec<u32>,
}

/// What a contribution to one shard in one round must be, known before its payload is fetched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PayloadShape {
    /// The shard's length (the delta's values).
    pub shard_len: usize,
    /// The expert loads a contribution to this shard carries (the model's routed experts for the trunk,
    /// none for an expert).
    pub loads_len: usize,
    /// The round's codec (its announced hyper-parameters): the delta's header must be the one it writes.
    pub codec: CodecOptions,
}

/// Checks a fetched contribution payload against its (already validated) announcement, signed by `sender`:
/// size, hash, the [`Binding`] (this sender, run, round and shard, so nobody can re-announce another's
/// payload or an old one), the [`PayloadShape`] (its expert loads, the delta's length, and a header written
/// by the round's codec), decoding, finiteness, and, when the round's `median_norm` for the shard is known
/// and positive, norm at most `max_norm_ratio` times it. Returns the decoded delta and the loads.
pub fn validate_delta_payload(
    announcement: &DeltaAnnouncement,
    sender: &PublicKey,
    payload: &[u8],
    shape: &PayloadShape,
    median_norm: Option<f32>,
    max_norm_ratio: f32,
) -> Result<ValidPayload, Rejection> {
    let PayloadShape {
        shard_len,
        loads_len,
        codec,
    } = *shape;
    let size = payload.len() as u64;
    if size != announcement.payload_size {
        return Err(Rejection::SizeMismatch {
            announced: announcement.payload_size,
            got: size,
        });
    }
    let got = ContentHash::of(payload);
    if got != announcement.payload_hash {
        return Err(Rejection::HashMismatch {
            expected: announcement.payload_hash,
            got,
        });
    }
    let split = split_contribution(payload).map_err(Rejection::BadContribution)?;
    let claimed = Binding::of(announcement, *sender);
    if split.binding != claimed {
        return Err(Rejection::NotBound {
            claimed: Box::new(claimed),
            bound: Box::new(split.binding),
        });
    }
    if split.loads.len() != loads_len {
        return Err(Rejection::WrongLoads {
            expected: loads_len,
            got: split.loads.len(),
        });
    }
    let encoded = split.delta;
    let header = DeltaHeader::parse(encoded).map_err(Rejection::BadPayload)?;
    if header.len != shard_len {
        return Err(Rejection::WrongLength {
            expected: shard_len,
            got: header.len,
        });
    }
    let expected = header_for(shard_len, &codec).map_err(Rejection::BadPayload)?;
    if header != expected {
        return Err(Rejection::WrongCodec {
            expected: Box::new(expected),
            got: Box::new(header),
        });
    }
    let delta = decode_delta(encoded, shard_len).map_err(Rejection::BadPayload)?;
    if delta.iter().any(|v| !v.is_finite()) {
        return Err(Rejection::NonFinite { field: "delta" });
    }
    let norm = l2_norm(&delta);
    if !norm.is_finite() {
        return Err(Rejection::NonFinite {
            field: "delta norm",
        });
    }
    if let Some(median) = median_norm.filter(|m| m.is_finite() && *m > 0.0)
        && f64::from(norm) > f64::from(max_norm_ratio) * f64::from(median)
    {
        return Err(Rejection::NormTooLarge {
            norm,
            median,
            ratio: max_norm_ratio,
        });
    }
    Ok(ValidPayload {
        delta,
        loads: split.loads,
    })
}

/// The L2 norm of `values`, accumulated in f64.
pub fn l2_norm(values: &[f32]) -> f32 {
    values
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt() as f32
}

/// The median of `norms` (the mean of the middle two for an even count), `None` if empty or not finite.
pub fn median_norm(norms: &[f32]) -> Option<f32> {
    if norms.is_empty() || norms.iter().any(|n| !n.is_finite()) {
        return None;
    }
    let mut sorted = norms.to_vec();
    sorted.sort_by(f32::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}
