//! Everything that crosses mana's wire between nodes, coordinators and clients: message types, their
//! canonical encoding, signed envelopes, the FP8 gradient-delta codec and the validation of decoded messages
//! against their context. This crate does no I/O: no sockets, no clock, no files.
//!
//! Receiving a gossip message:
//!
//! ```
//! # use mana_protocol::*;
//! # fn demo(bytes: &[u8], ctx: &validation::ValidationContext<'_>) -> Result<(), Box<dyn std::error::Error>> {
//! let envelope = decode_envelope(bytes)?;                            // bounded, canonical, right version
//! let message = validation::validate_envelope(ctx, &envelope)?;      // signature, then run/round/signer rules
//! # let _ = message; Ok(()) }
//! ```
//!
//! The layout of every message is specified in `docs/protocol.md`, with test vectors.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod bytes;
pub mod codec;
pub mod contribution;
pub mod envelope;
pub mod error;
pub mod identity;
pub mod ids;
pub mod limits;
pub mod messages;
pub mod reqresp;
pub mod tensor;
pub mod topics;
pub mod validation;
pub mod wire;

pub use bytes::Bytes;
pub use codec::{
    CodecError, CodecOptions, DeltaEncoder, ScaleFormat, ValueFormat, decode_delta, encode_delta,
};
pub use contribution::{
    Binding, Contribution, ContributionError, MAX_EXPERT_LOADS, SplitContribution,
    contribution_len, decode_contribution, split_contribution,
};
pub use envelope::{SIGNING_DOMAIN, SignedEnvelope, decode_envelope, decode_parcel};
pub use error::ProtocolError;
pub use identity::{Keypair, PeerId, PublicKey, Signature};
pub use ids::{ContentHash, RunId, ShardId, Text};
pub use limits::PROTOCOL_VERSION;
pub use messages::{
    AcceptedDeltas, AggregationCall, CalledDelta, Capacity, CheckpointManifest, CommitDispute,
    Deadlines, DeltaAnnouncement, DeltaScore, DeltaVerdict, DeviceKind, DisputeMismatch,
    Evaluation, Heartbeat, HyperParams, JudgingRule, MAX_DELTA_WEIGHT, Message, NormRecord, Parcel,
    Participant, RejectedDelta, RoundAnnouncement, RoundCommit, RunEnd, ShardAttestation,
    ShardCall, ShardDissent, ShardEntry, ShardJudgment, TrainingStats, UpdateRule, VerdictRule,
    seed_commitment,
};
pub use reqresp::{
    ExpertRequest, ExpertResponse, FetchRequest, FetchResponse, LaneRequest, LaneResponse,
    RangeRequest, RangeResponse, Tensor, TensorDtype,
};
pub use topics::{
    BLOB_LANE_PROTOCOL, BLOB_STREAM_PROTOCOL, EXPERT_PROTOCOL, FETCH_PROTOCOL, TopicKind, topic,
};
pub use validation::{
    PayloadShape, RejectCode, Rejection, ValidationContext, ValidationLimits, validate_envelope,
    validate_message,
};
