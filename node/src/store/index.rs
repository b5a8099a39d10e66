//! The sled half of the store: which rounds exist and which blobs make them up, blob references held by
//! pending work (delta payloads), small records (peers, delta announcements, round state) and the log of
//! rejected messages. Big bytes never go in here.
//!
//! Trees and their keys:
//! - `rounds`: round (u64 big-endian) -> encoded [`RoundManifest`]. The newest key is the current round.
//! - `refs`: round (u64 BE) ++ blob hash (32 bytes) -> empty: "round `r` needs this blob" (delta payloads
//!   of a round being assembled). Dropped with the round when it is pruned.
//! - `rejections`: peer ++ 0x00 ++ reason -> encoded [`RejectionEntry`].
//! - `record/<kind>`: caller key -> caller bytes, one tree per [`RecordKind`].
//!
//! Every encoded value starts with a format byte ([`FORMAT_V1`]) so a later version can read old stores.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use mana_protocol::ShardId;

use super::blobs::ContentHash;
use super::error::{StoreError, StoreResult};

/// The first byte of every value this module encodes.
pub(crate) const FORMAT_V1: u8 = 1;

/// Most entries one round manifest may list (shards of a checkpoint).
pub const MAX_MANIFEST_ENTRIES: usize = 1 << 16;
/// Largest opaque metadata a manifest may carry (an encoded checkpoint header).
pub const MAX_MANIFEST_META_BYTES: usize = 1 << 20;
/// Largest encoded manifest; bounds decoding too.
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;
/// Longest record key.
pub const MAX_RECORD_KEY_BYTES: usize = 512;
/// Largest record value: records are small (peers, announcements, round state); bytes go in blobs.
pub const MAX_RECORD_VALUE_BYTES: usize = 64 << 10;
/// Longest peer name kept in the rejection log; longer ones are truncated.
pub const MAX_REJECTION_PEER_BYTES: usize = 128;
/// Longest reason code kept in the rejection log; longer ones are truncated.
pub const MAX_REJECTION_REASON_BYTES: usize = 64;
/// Longest detail text kept per (peer, reason); longer ones are truncated.
pub const MAX_REJECTION_DETAIL_BYTES: usize = 256;
/// Most distinct (peer, reason) pairs the rejection log keeps; beyond it, new pairs are counted under the
/// peer [`OVERFLOW_PEER`], so a flood of fresh peer ids cannot grow the store without bound.
pub const MAX_REJECTION_KEYS: usize = 1 << 16;
/// The peer name under which rejections are counted once [`MAX_REJECTION_KEYS`] is reached.
pub const OVERFLOW_PEER: &str = "(other peers)";

/// One shard of a round: its name, and the blob holding its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Which shard. Stored in its text form (`trunk`, `expert/<layer>/<index>`, at most 20 bytes), so a
    /// record on disk is readable by eye and a bad name in a damaged record fails to decode.
    #[serde(with = "shard_text")]
    pub shard: ShardId,
    /// The blob holding the shard's bytes.
    pub hash: ContentHash,
    /// The blob's length in bytes (checked against the file at commit).
    pub len: u64,
}

/// What a committed round is made of: its shards, plus opaque metadata (an encoded protocol
/// `CheckpointManifest`, for instance) that the store keeps but does not interpret.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundManifest {
    /// The shards, each by blob hash.
    pub entries: Vec<ManifestEntry>,
    /// Caller's metadata, at most [`MAX_MANIFEST_META_BYTES`].
    pub meta: Vec<u8>,
}

impl RoundManifest {
    /// Checks the size limits.
    pub(crate) fn check_limits(&self) -> StoreResult<()> {
        too_large("manifest entries", self.entries.len(), MAX_MANIFEST_ENTRIES)?;
        too_large(
            "manifest metadata",
            self.meta.len(),
            MAX_MANIFEST_META_BYTES,
        )?;
        Ok(())
    }

    /// Total bytes of the shards (counting a blob listed twice twice).
    pub fn total_len(&self) -> u64 {
        self.entries.iter().map(|e| e.len).sum()
    }
}

/// The kinds of small records the store keeps, each in its own sled tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// Known peers (addresses, last seen, reputation), keyed by peer id.
    Peer,
    /// Delta announcements. Round-scoped: keys start with the round as 8 big-endian bytes (see
    /// [`round_key`]) and are pruned with their round.
    DeltaAnnouncement,
    /// Round state (the coordinator's state machine, the trainer's progress), keyed as the caller likes.
    RoundState,
    /// Node-level settings and facts worth keeping across restarts.
    Meta,
}

impl RecordKind {
    /// Every kind, for opening their trees.
    pub const ALL: [RecordKind; 4] = [
        RecordKind::Peer,
        RecordKind::DeltaAnnouncement,
        RecordKind::RoundState,
        RecordKind::Meta,
    ];

    /// The sled tree name.
    pub(crate) fn tree_name(self) -> &'static str {
        match self {
            RecordKind::Peer => "record/peer",
            RecordKind::DeltaAnnouncement => "record/delta-announcement",
            RecordKind::RoundState => "record/round-state",
            RecordKind::Meta => "record/meta",
        }
    }

    /// Whether keys of this kind start with a round number and are pruned with it.
    pub fn is_round_scoped(self) -> bool {
        matches!(self, RecordKind::DeltaAnnouncement)
    }

    /// Index into the store's array of trees.
    pub(crate) fn index(self) -> usize {
        match self {
            RecordKind::Peer => 0,
            RecordKind::DeltaAnnouncement => 1,
            RecordKind::RoundState => 2,
            RecordKind::Meta => 3,
        }
    }
}

/// Builds a key for a round-scoped record: the round as 8 big-endian bytes, then `suffix` (an announcement
/// id, a peer id...). Keys sort by round.
pub fn round_key(round: u64, suffix: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + suffix.len());
    key.extend_from_slice(&round.to_be_bytes());
    key.extend_from_slice(suffix);
    key
}

/// The counts kept for one (peer, reason) pair of the rejection log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectionEntry {
    /// How many messages were rejected.
    pub count: u64,
    /// When the first was rejected (seconds since the Unix epoch).
    pub first_seen_unix: u64,
    /// When the last was rejected.
    pub last_seen_unix: u64,
    /// The detail given with the last one, truncated to [`MAX_REJECTION_DETAIL_BYTES`].
    pub last_detail: String,
}

/// Rejections of one reason from one peer, as listed in a [`RejectionSummary`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    /// The reason code (the protocol's `RejectReason`, as a stable name).
    pub reason: String,
    /// Counts and last detail.
    #[serde(flatten)]
    pub entry: RejectionEntry,
}

/// All rejections from one peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRejections {
    /// The peer.
    pub peer: String,
    /// Its total over all reasons.
    pub total: u64,
    /// Per reason, most frequent first.
    pub reasons: Vec<ReasonCount>,
}

/// What `mana status` shows of the rejection log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectionSummary {
    /// All rejections ever recorded (since the store was created).
    pub total: u64,
    /// Totals per reason code, sorted by code.
    pub by_reason: std::collections::BTreeMap<String, u64>,
    /// Per peer, the peer with most rejections first: at most [`MAX_SUMMARY_PEERS`] of them, so that the
    /// summary (written into `status.json` every few seconds) stays small whatever the log holds.
    pub by_peer: Vec<PeerRejections>,
    /// Peers with rejections beyond those listed in `by_peer`.
    #[serde(default)]
    pub other_peers: u64,
}

/// Largest value of a split record ([`super::Store::put_split_record`]): 64 MiB, the most the coordinator's
/// state decoder takes.
pub const MAX_SPLIT_RECORD_BYTES: usize = 64 << 20;

/// What a split record's header starts with (a plain record never does: the coordinator's state starts with
/// its bincode-encoded run id).
const SPLIT_MAGIC: &[u8; 16] = b"mana/split-rec/1";

/// A split record's header: the magic, the number of parts (u32 BE) and the value's length (u64 BE).
pub(crate) fn encode_split_header(parts: u32, len: u64) -> Vec<u8> {
    let mut out = SPLIT_MAGIC.to_vec();
    out.extend_from_slice(&parts.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// (parts, length) of a split record's header; `None` for any other value.
pub(crate) fn decode_split_header(bytes: &[u8]) -> Option<(u32, u64)> {
    let rest = bytes.strip_prefix(SPLIT_MAGIC.as_slice())?;
    if rest.len() != 12 {
        return None;
    }
    let parts = u32::from_be_bytes(rest[..4].try_into().ok()?);
    let len = u64::from_be_bytes(rest[4..].try_into().ok()?);
    Some((parts, len))
}

/// The key of part `i` of the split record under `key`: the key, a zero byte, `i` (u32 BE).
pub(crate) fn split_part_key(key: &[u8], i: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 5);
    out.extend_from_slice(key);
    out.push(0);
    out.extend_from_slice(&i.to_be_bytes());
    out
}

/// Most peers a [`RejectionSummary`] lists (the rest are counted in `other_peers`).
pub const MAX_SUMMARY_PEERS: usize = 32;

/// Key of a rejection-log entry.
pub(crate) fn rejection_key(peer: &str, reason: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(peer.len() + 1 + reason.len());
    key.extend_from_slice(peer.as_bytes());
    key.push(0);
    key.extend_from_slice(reason.as_bytes());
    key
}

/// Splits a rejection-log key into (peer, reason).
pub(crate) fn split_rejection_key(key: &[u8]) -> Option<(String, String)> {
    let zero = key.iter().position(|&b| b == 0)?;
    let peer = std::str::from_utf8(&key[..zero]).ok()?;
    let reason = std::str::from_utf8(&key[zero + 1..]).ok()?;
    Some((peer.to_owned(), reason.to_owned()))
}

/// Cuts `text` to at most `max` bytes, at a character boundary, and drops NUL bytes (they separate key parts).
pub(crate) fn truncate_text(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].replace('\0', "")
}

/// Key of a blob reference: round then hash.
pub(crate) fn ref_key(round: u64, hash: &ContentHash) -> [u8; 40] {
    let mut key = [0u8; 40];
    key[..8].copy_from_slice(&round.to_be_bytes());
    key[8..].copy_from_slice(hash.as_bytes());
    key
}

/// Reads the round back out of a key that starts with one.
pub(crate) fn key_round(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Reads the hash back out of a blob-reference key.
pub(crate) fn ref_key_hash(key: &[u8]) -> Option<ContentHash> {
    let bytes: [u8; 32] = key.get(8..40)?.try_into().ok()?;
    Some(ContentHash(bytes))
}

/// Encodes a value: the format byte, then bincode (standard configuration).
pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> StoreResult<Vec<u8>> {
    let mut out = vec![FORMAT_V1];
    let body =
        bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|err| {
            StoreError::Encode {
                what,
                detail: err.to_string(),
            }
        })?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes what [`encode`] wrote, reading at most `MAX_MANIFEST_BYTES` (the largest value we store), and
/// rejecting trailing bytes.
pub(crate) fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> StoreResult<T> {
    let decode_err = |detail: String| StoreError::Decode { what, detail };
    let (&format, body) = bytes
        .split_first()
        .ok_or_else(|| decode_err("empty value".into()))?;
    if format != FORMAT_V1 {
        return Err(decode_err(format!("unknown format byte {format}")));
    }
    let config = bincode::config::standard().with_limit::<MAX_MANIFEST_BYTES>();
    let (value, used) = bincode::serde::decode_from_slice(body, config)
        .map_err(|err| decode_err(err.to_string()))?;
    if used != body.len() {
        return Err(decode_err(format!("{} trailing bytes", body.len() - used)));
    }
    Ok(value)
}

/// Fails with [`StoreError::TooLarge`] when `len > limit`.
pub(crate) fn too_large(what: &'static str, len: usize, limit: usize) -> StoreResult<()> {
    if len > limit {
        return Err(StoreError::TooLarge {
            what,
            len: len as u64,
            limit: limit as u64,
        });
    }
    Ok(())
}

/// A [`ShardId`] as its text form in a serialized record (the form every store written so far holds).
mod shard_text {
    use mana_protocol::ShardId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(shard: &ShardId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(shard)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ShardId, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
