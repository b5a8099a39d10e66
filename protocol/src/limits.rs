//! Every size bound of the protocol, in one place, so that the decoder, the validator and a compatible
//! implementation in another language enforce the same numbers. Bounds are checked before anything is
//! allocated from untrusted input.

/// The wire version this build speaks; the first field of every envelope and request/response frame.
/// A receiver rejects any other value, so a new incompatible layout must bump it.
pub const PROTOCOL_VERSION: u16 = 11;

/// Largest encoded signed envelope (gossip message) accepted. Gossipsub's `max_transmit_size` must be at
/// least this.
pub const MAX_ENVELOPE_BYTES: usize = 256 * 1024;

/// Largest encoded message inside a gossiped envelope: the envelope less its fixed fields.
pub const MAX_MESSAGE_BYTES: usize = MAX_ENVELOPE_BYTES - 128;

/// Largest signed envelope carried as a [`crate::Parcel`] (fetched by hash rather than gossiped): the
/// ceiling of every round message, since a coordinator sends those over [`MAX_ENVELOPE_BYTES`] (or over its
/// own lower threshold) as parcels. A 1B-parameter layout's largest commit is about 0.7 MiB.
pub const MAX_PARCEL_BYTES: usize = 4 * 1024 * 1024;

/// Largest encoded message inside a parcel's envelope: the envelope less its fixed fields.
pub const MAX_PARCEL_MESSAGE_BYTES: usize = MAX_PARCEL_BYTES - 128;

/// Largest encoded request frame on a request/response protocol.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// Largest encoded response frame on a request/response protocol.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Largest chunk of a blob (delta payload or checkpoint shard) served in one fetch response.
pub const MAX_FETCH_CHUNK_BYTES: u32 = 4 * 1024 * 1024;

/// Largest range of a blob served for one [`crate::RangeRequest`] on a bulk stream (its bytes follow the
/// header raw, so this bounds how long one request holds a stream, not a buffer).
pub const MAX_RANGE_BYTES: u64 = 64 * 1024 * 1024;

/// Largest header frame on a bulk stream ([`crate::RangeRequest`], [`crate::RangeResponse`]); real ones are
/// under 300 bytes.
pub const MAX_RANGE_FRAME_BYTES: usize = 1024;

/// Largest run id, in bytes.
pub const MAX_RUN_ID_LEN: usize = 64;

/// Largest software-version string, in bytes.
pub const MAX_SOFTWARE_VERSION_LEN: usize = 64;

/// Largest free-text field (such as an error detail), in bytes.
pub const MAX_TEXT_LEN: usize = 256;

/// How many layers and experts per layer a shard id may name: defined with [`crate::ShardId`] in the kernels.
pub use mana_kernels::model::{MAX_EXPERTS_PER_LAYER, MAX_LAYERS};

/// Most participants in one round announcement.
pub const MAX_PARTICIPANTS: usize = 1024;

/// Most shards one node may host or be assigned in one round.
pub const MAX_SHARDS_PER_NODE: usize = 1024;

/// Most data-shard seeds assigned to one node in one round.
pub const MAX_DATA_SEEDS_PER_NODE: usize = 256;

/// Most shard entries in a checkpoint manifest.
pub const MAX_MANIFEST_SHARDS: usize = 8192;

/// Most accepted plus rejected delta entries in one round commit.
pub const MAX_COMMIT_DELTAS: usize = 8192;

/// Most accepted payload hashes one commit dispute may list: one shard's deltas, at most one per participant.
pub const MAX_DISPUTE_DELTAS: usize = MAX_PARTICIPANTS;

/// Most judges (holders and verifiers) of one shard in one [`crate::AggregationCall`].
pub const MAX_SHARD_JUDGES: usize = 64;
/// Most accepted norms of one shard a coordinator may keep for the norm bounds ([`crate::AggregationCall`]'s
/// `norm_history`).
pub const MAX_NORM_HISTORY: u32 = 64;
/// Most norm records in one [`crate::AggregationCall`] (its norm bounds' history: a few per shard).
pub const MAX_CALL_NORMS: usize = 16_384;
/// Most validation batches one [`crate::Evaluation`] may average over.
pub const MAX_EVALUATION_BATCHES: u32 = 1024;
/// How many rounds back a commit dispute is still passed on: the one just committed, and the round after it
/// (the next announcement may overtake the dispute).
pub const MAX_DISPUTE_AGE_ROUNDS: u64 = 2;
/// Most values in one gradient delta (one shard): 2^28 f32, 1 GiB dense.
pub const MAX_DELTA_VALUES: usize = 1 << 28;

/// Largest encoded delta payload, in bytes: a dense FP8 encoding of [`MAX_DELTA_VALUES`] plus scales.
pub const MAX_DELTA_PAYLOAD_BYTES: u64 = (MAX_DELTA_VALUES as u64) * 2;

/// Largest checkpoint shard, in bytes (f32 parameters of the biggest shard, with headroom).
pub const MAX_SHARD_BYTES: u64 = 1 << 32;

/// Most dimensions of a tensor in an expert call.
pub const MAX_TENSOR_RANK: usize = 4;

/// Most elements in one tensor of an expert call.
pub const MAX_TENSOR_ELEMENTS: u64 = 4 * 1024 * 1024;
