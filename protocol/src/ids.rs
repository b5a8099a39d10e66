//! Typed identifiers that appear in messages: shard ids (`trunk`, `expert/<layer>/<index>`), run ids,
//! content hashes and bounded text. Each one checks its bounds when parsed *and* when decoded from the
//! wire, so a value of these types is always valid.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;
use crate::limits::{MAX_RUN_ID_LEN, MAX_TEXT_LEN};

/// One independently trained and stored part of the model (the trunk, or one routed expert): the kernels'
/// type itself, so the model, the wire and the daemon name a shard with one type. Its wire form (a bincode
/// enum, variant 0 = trunk, 1 = expert with two varint `u16`s) and its bounds check on decoding are defined
/// with it, in [`mana_kernels::model::shard_id`].
pub use mana_kernels::model::{ShardId, ShardIdError};

impl From<ShardIdError> for ProtocolError {
    fn from(e: ShardIdError) -> Self {
        invalid("shard id", e.to_string())
    }
}

/// Names one training run; it appears in gossip topic names (`mana/<run>/rounds`), so it is limited to
/// 1..=[`MAX_RUN_ID_LEN`] bytes of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunId(String);

impl RunId {
    /// Checks and wraps a run id.
    pub fn new(s: impl Into<String>) -> Result<RunId, ProtocolError> {
        let s = s.into();
        if s.is_empty() || s.len() > MAX_RUN_ID_LEN {
            return Err(invalid(
                "run id",
                format!("must be 1..={MAX_RUN_ID_LEN} bytes, got {}", s.len()),
            ));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        {
            return Err(invalid(
                "run id",
                format!("{:?} has characters outside [A-Za-z0-9._-]", truncate(&s)),
            ));
        }
        Ok(RunId(s))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RunId {
    type Error = ProtocolError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        RunId::new(s)
    }
}

impl From<RunId> for String {
    fn from(id: RunId) -> String {
        id.0
    }
}

impl FromStr for RunId {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunId::new(s)
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A free-text field from the network (software version, error detail): at most [`MAX_TEXT_LEN`] bytes
/// and no control characters, so it is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Text(String);

impl Text {
    /// Checks and wraps a text field.
    pub fn new(s: impl Into<String>) -> Result<Text, ProtocolError> {
        let s = s.into();
        if s.len() > MAX_TEXT_LEN {
            return Err(invalid(
                "text",
                format!("{} bytes, over the limit of {MAX_TEXT_LEN}", s.len()),
            ));
        }
        if s.chars().any(char::is_control) {
            return Err(invalid("text", "contains control characters".to_string()));
        }
        Ok(Text(s))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Text {
    type Error = ProtocolError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Text::new(s)
    }
}

impl From<Text> for String {
    fn from(t: Text) -> String {
        t.0
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A blake3 hash: the address of a blob (delta payload, checkpoint shard) and of a checkpoint manifest, on the
/// wire and in the store alike (a blob's file name is its hash in hex). Wire form: 32 raw bytes. Text form: 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// The blake3 hash of `bytes`.
    pub fn of(bytes: &[u8]) -> ContentHash {
        ContentHash(*blake3::hash(bytes).as_bytes())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters (the text form; a stored blob's file name).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses exactly 64 hex characters; `None` for anything else (a file name that is no blob's).
    pub fn from_hex(text: &str) -> Option<ContentHash> {
        if text.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(ContentHash(out))
    }
}

impl From<blake3::Hash> for ContentHash {
    fn from(hash: blake3::Hash) -> Self {
        ContentHash(*hash.as_bytes())
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({self})")
    }
}

impl FromStr for ContentHash {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|e| invalid("content hash", format!("{:?}: {e}", truncate(s))))?;
        Ok(ContentHash(out))
    }
}

fn invalid(what: &'static str, detail: String) -> ProtocolError {
    ProtocolError::InvalidField { what, detail }
}

/// At most 80 bytes of untrusted text, for error messages.
fn truncate(s: &str) -> &str {
    let mut end = s.len().min(80);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ids_parse_and_print() {
        for s in ["trunk", "expert/0/0", "expert/3/17", "expert/1023/4095"] {
            let id: ShardId = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
        }
        for s in [
            "",
            "Trunk",
            "expert",
            "expert/",
            "expert/1",
            "expert/1/",
            "expert/01/2",
            "expert/1/2/3",
            "expert/1024/0",
            "expert/0/4096",
            "expert/+1/2",
            "expert/-1/2",
            "expert/99999999/1",
        ] {
            assert!(s.parse::<ShardId>().is_err(), "{s:?} should not parse");
        }
    }

    #[test]
    fn run_ids_are_bounded() {
        assert!(RunId::new("mana-7b.v2_test").is_ok());
        assert!(RunId::new("").is_err());
        assert!(RunId::new("a/b").is_err());
        assert!(RunId::new("x".repeat(MAX_RUN_ID_LEN + 1)).is_err());
    }

    #[test]
    fn hashes_round_trip_as_hex() {
        let h = ContentHash::of(b"mana");
        assert_eq!(h.to_string().parse::<ContentHash>().unwrap(), h);
        assert!("zz".parse::<ContentHash>().is_err());
    }
}
