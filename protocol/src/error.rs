//! The errors of decoding, encoding and verifying wire data. Validation against a round's context has its
//! own reasons, in [`crate::validation::Rejection`]; this enum is about bytes that are not a well-formed,
//! authentic message at all.

use thiserror::Error;

/// Why bytes could not be turned into a verified message, or a value into bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    /// The input is longer than the limit for its kind; nothing was decoded.
    #[error("{what} is {len} bytes, over the limit of {max}")]
    TooLarge {
        /// What was being decoded.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a valid bincode encoding of the expected type.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's description of the fault.
        detail: String,
    },
    /// Bytes were left over after a complete value.
    #[error("{what} has {extra} trailing bytes")]
    TrailingBytes {
        /// What was being decoded.
        what: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// The value decoded, but re-encoding it gives other bytes, so two encodings of one message would exist.
    #[error("{what} is not in canonical encoding")]
    NonCanonical {
        /// What was being decoded.
        what: &'static str,
    },
    /// The frame's version tag is not one this build speaks.
    #[error("unsupported protocol version {got} (this build speaks {supported})")]
    UnsupportedVersion {
        /// The version found.
        got: u16,
        /// The version this build speaks.
        supported: u16,
    },
    /// The signer field is not a valid ed25519 public key.
    #[error("the signer is not a valid ed25519 public key")]
    BadPublicKey,
    /// The signature does not verify against the signer's key and the envelope's bytes.
    #[error("bad signature")]
    BadSignature,
    /// A value is too big or otherwise impossible to encode (a bug on the sending side).
    #[error("cannot encode {what}: {detail}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// A typed field (shard id, run id, ...) does not parse or is out of bounds.
    #[error("invalid {what}: {detail}")]
    InvalidField {
        /// Which field.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The operating system's random number generator failed while generating a key.
    #[error("no randomness available to generate a key: {0}")]
    Randomness(String),
}
