//! The one encoding of the protocol: bincode 2.0.1 with its *standard* configuration (little-endian,
//! variable-length integers), always decoded under a size limit, with no trailing bytes, and only accepted
//! when re-encoding gives back the very same bytes (so every message has exactly one encoding, and hashes
//! and signatures of it are well defined).
//!
//! The limit is a const parameter because bincode's is: it bounds both the input length (checked before
//! decoding starts) and every length prefix inside, so a short hostile input cannot make the decoder
//! allocate more than `LIMIT` bytes for one field.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ProtocolError;
use crate::limits::PROTOCOL_VERSION;

/// bincode's standard configuration (little-endian, varint) with a decode limit of `LIMIT` bytes.
fn config<const LIMIT: usize>() -> Configuration<LittleEndian, Varint, Limit<LIMIT>> {
    bincode::config::standard().with_limit::<LIMIT>()
}

/// Encodes `value` in the wire encoding, refusing results over `LIMIT` bytes.
pub fn encode<T: Serialize, const LIMIT: usize>(
    value: &T,
    what: &'static str,
) -> Result<Vec<u8>, ProtocolError> {
    let bytes = bincode::serde::encode_to_vec(value, config::<LIMIT>()).map_err(|e| {
        ProtocolError::Encode {
            what,
            detail: e.to_string(),
        }
    })?;
    if bytes.len() > LIMIT {
        return Err(ProtocolError::TooLarge {
            what,
            len: bytes.len(),
            max: LIMIT,
        });
    }
    Ok(bytes)
}

/// Decodes one `T` that must fill `bytes` exactly and be canonically encoded; inputs over `LIMIT` bytes are
/// refused before decoding starts.
pub fn decode<T: Serialize + DeserializeOwned, const LIMIT: usize>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, ProtocolError> {
    if bytes.len() > LIMIT {
        return Err(ProtocolError::TooLarge {
            what,
            len: bytes.len(),
            max: LIMIT,
        });
    }
    let (value, used): (T, usize) = bincode::serde::decode_from_slice(bytes, config::<LIMIT>())
        .map_err(|e| ProtocolError::Malformed {
            what,
            detail: e.to_string(),
        })?;
    if used != bytes.len() {
        return Err(ProtocolError::TrailingBytes {
            what,
            extra: bytes.len() - used,
        });
    }
    let again = bincode::serde::encode_to_vec(&value, config::<LIMIT>()).map_err(|e| {
        ProtocolError::Encode {
            what,
            detail: e.to_string(),
        }
    })?;
    if again != bytes {
        return Err(ProtocolError::NonCanonical { what });
    }
    Ok(value)
}

/// Encodes a request/response frame: the version tag ([`PROTOCOL_VERSION`], varint `u16`) then `value`.
pub fn encode_frame<T: Serialize, const LIMIT: usize>(
    value: &T,
    what: &'static str,
) -> Result<Vec<u8>, ProtocolError> {
    encode::<_, LIMIT>(&(PROTOCOL_VERSION, value), what)
}

/// Decodes a frame written by [`encode_frame`], rejecting other versions before looking at the body.
pub fn decode_frame<T: Serialize + DeserializeOwned, const LIMIT: usize>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, ProtocolError> {
    check_version::<LIMIT>(bytes, what)?;
    let (_, value): (u16, T) = decode::<_, LIMIT>(bytes, what)?;
    Ok(value)
}

/// Reads the leading version tag of `bytes` and rejects any version but [`PROTOCOL_VERSION`].
pub fn check_version<const LIMIT: usize>(
    bytes: &[u8],
    what: &'static str,
) -> Result<(), ProtocolError> {
    if bytes.len() > LIMIT {
        return Err(ProtocolError::TooLarge {
            what,
            len: bytes.len(),
            max: LIMIT,
        });
    }
    let (version, _): (u16, usize) = bincode::serde::decode_from_slice(bytes, config::<LIMIT>())
        .map_err(|e| ProtocolError::Malformed {
            what,
            detail: e.to_string(),
        })?;
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion {
            got: version,
            supported: PROTOCOL_VERSION,
        });
    }
    Ok(())
}
