//! Request/response pairs, sent on libp2p request-response streams (already authenticated by the
//! connection, so not enveloped): fetching a blob by hash in chunks ([`crate::topics::FETCH_PROTOCOL`]) and
//! calling an expert ([`crate::topics::EXPERT_PROTOCOL`]). Every frame starts with the version tag and is
//! decoded under [`MAX_REQUEST_BYTES`] or [`MAX_RESPONSE_BYTES`].
//!
//! Bulk blob streams ([`crate::topics::BLOB_STREAM_PROTOCOL`]) carry [`RangeRequest`]/[`RangeResponse`]
//! headers instead, each a frame under [`MAX_RANGE_FRAME_BYTES`]; the bytes of a range follow its response
//! header raw, so a receiver never decodes (or re-encodes to check) the bulk of a blob.

use serde::{Deserialize, Serialize};

use crate::bytes::Bytes;
use crate::error::ProtocolError;
use crate::ids::{ContentHash, RunId, ShardId, Text};
use crate::limits::{
    MAX_FETCH_CHUNK_BYTES, MAX_RANGE_BYTES, MAX_RANGE_FRAME_BYTES, MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
};
pub use crate::tensor::{Tensor, TensorDtype};
use crate::wire;

/// Ask for bytes `offset..offset + max_len` of the blob with blake3 `hash` (a delta payload, a checkpoint
/// shard or a manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    /// The blob.
    pub hash: ContentHash,
    /// First byte wanted.
    pub offset: u64,
    /// Most bytes wanted; the server sends at most [`MAX_FETCH_CHUNK_BYTES`].
    pub max_len: u32,
}

/// The answer to a [`FetchRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchResponse {
    /// Variant 0: bytes `offset..offset + data.len()` of a blob of `total_size` bytes. An empty chunk at
    /// `offset == total_size` marks the end.
    Chunk {
        /// The blob.
        hash: ContentHash,
        /// Position of `data` in the blob.
        offset: u64,
        /// Length of the whole blob.
        total_size: u64,
        /// The bytes.
        data: Bytes,
    },
    /// Variant 1: this peer does not have the blob.
    NotFound {
        /// The blob asked for.
        hash: ContentHash,
    },
    /// Variant 2: the peer refuses (busy, bad range); the text says why.
    Refused {
        /// Why.
        reason: Text,
    },
}

impl FetchRequest {
    /// The frame's wire bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        wire::encode_frame::<_, MAX_REQUEST_BYTES>(self, "fetch request")
    }
    /// Decodes a frame.
    pub fn decode(bytes: &[u8]) -> Result<FetchRequest, ProtocolError> {
        wire::decode_frame::<_, MAX_REQUEST_BYTES>(bytes, "fetch request")
    }
}

impl FetchResponse {
    /// The frame's wire bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        self.check()?;
        wire::encode_frame::<_, MAX_RESPONSE_BYTES>(self, "fetch response")
    }
    /// Decodes a frame; a chunk over [`MAX_FETCH_CHUNK_BYTES`] or past the blob's end is refused.
    pub fn decode(bytes: &[u8]) -> Result<FetchResponse, ProtocolError> {
        let response: FetchResponse =
            wire::decode_frame::<_, MAX_RESPONSE_BYTES>(bytes, "fetch response")?;
        response.check()?;
        Ok(response)
    }

    fn check(&self) -> Result<(), ProtocolError> {
        if let FetchResponse::Chunk {
            offset,
            total_size,
            data,
            ..
        } = self
        {
            let len = data.0.len() as u64;
            if len > u64::from(MAX_FETCH_CHUNK_BYTES)
                || offset.checked_add(len).is_none_or(|end| end > *total_size)
            {
                return Err(ProtocolError::InvalidField {
                    what: "fetch chunk",
                    detail: format!("{len} bytes at {offset} of a {total_size}-byte blob"),
                });
            }
        }
        Ok(())
    }
}

/// On a bulk stream: ask for bytes `offset..offset + len` of the blob with blake3 `hash`. A `len` of 0 asks
/// only for the header (how a fetcher learns the blob's size before splitting it among providers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    /// The blob.
    pub hash: ContentHash,
    /// First byte wanted.
    pub offset: u64,
    /// Bytes wanted, at most [`MAX_RANGE_BYTES`]; the server may send fewer (it says how many).
    pub len: u64,
}

/// The header answering a [`RangeRequest`]; after a `Range`, exactly `len` raw bytes follow on the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RangeResponse {
    /// Variant 0: bytes `offset..offset + len` of a blob of `total_size` bytes follow, raw.
    Range {
        /// The blob.
        hash: ContentHash,
        /// Position of the bytes that follow.
        offset: u64,
        /// Length of the whole blob.
        total_size: u64,
        /// How many bytes follow (at most the request's `len` and [`MAX_RANGE_BYTES`]).
        len: u64,
    },
    /// Variant 1: this peer does not have the blob.
    NotFound {
        /// The blob asked for.
        hash: ContentHash,
    },
    /// Variant 2: the peer refuses (busy, bad range); the text says why.
    Refused {
        /// Why.
        reason: Text,
    },
}

impl RangeRequest {
    /// The frame's wire bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        self.check()?;
        wire::encode_frame::<_, MAX_RANGE_FRAME_BYTES>(self, "range request")
    }
    /// Decodes a frame; a range over [`MAX_RANGE_BYTES`] or past `u64::MAX` is refused.
    pub fn decode(bytes: &[u8]) -> Result<RangeRequest, ProtocolError> {
        let request: RangeRequest =
            wire::decode_frame::<_, MAX_RANGE_FRAME_BYTES>(bytes, "range request")?;
        request.check()?;
        Ok(request)
    }

    fn check(&self) -> Result<(), ProtocolError> {
        if self.len > MAX_RANGE_BYTES || self.offset.checked_add(self.len).is_none() {
            return Err(ProtocolError::InvalidField {
                what: "range request",
                detail: format!("{} bytes at {}", self.len, self.offset),
            });
        }
        Ok(())
    }
}

impl RangeResponse {
    /// The frame's wire bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        self.check()?;
        wire::encode_frame::<_, MAX_RANGE_FRAME_BYTES>(self, "range response")
    }
    /// Decodes a frame; a range over [`MAX_RANGE_BYTES`] or past the blob's end is refused.
    pub fn decode(bytes: &[u8]) -> Result<RangeResponse, ProtocolError> {
        let response: RangeResponse =
            wire::decode_frame::<_, MAX_RANGE_FRAME_BYTES>(bytes, "range response")?;
        response.check()?;
        Ok(response)
    }

    fn check(&self) -> Result<(), ProtocolError> {
        if let RangeResponse::Range {
            offset,
            total_size,
            len,
            ..
        } = self
        {
            if *len > MAX_RANGE_BYTES
                || offset.checked_add(*len).is_none_or(|end| end > *total_size)
            {
                return Err(ProtocolError::InvalidField {
                    what: "range response",
                    detail: format!("{len} bytes at {offset} of a {total_size}-byte blob"),
                });
            }
        }
        Ok(())
    }
}

/// On a blob lane setup stream ([`crate::topics::BLOB_LANE_PROTOCOL`]), the fetcher's half of the lane's
/// keys: 32 random bytes, secret because the stream is encrypted and both ends authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneRequest {
    /// The fetcher's random key share.
    pub share: [u8; 32],
}

/// The provider's answer to a [`LaneRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LaneResponse {
    /// Variant 0: connect over TCP to `port` at the address this connection came from, send `ticket`, and
    /// expect an empty sealed record: the lane is open. The ticket is good once, for a few seconds.
    Open {
        /// The provider's lane port.
        port: u16,
        /// Names the lane on the TCP connection (sent in clear; useless without the shares).
        ticket: [u8; 16],
        /// The provider's random key share.
        share: [u8; 32],
    },
    /// Variant 1: no lane (none configured, or too many open); use a blob stream.
    Refused {
        /// Why.
        reason: Text,
    },
}

impl LaneRequest {
    /// The frame's wire bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        wire::encode_frame::<_, MAX_RANGE_FRAME_BYTES>(self, "lane request")
    }
    /// Decodes a frame.
    pub fn decode(bytes: &[u8]) -> Result<LaneRequest, ProtocolError> {
        wire::decode_frame::<_, MAX_RANGE_FRAME_BYTES>(bytes, "lane request")
    }
}

impl LaneResponse {
    /// The frame's wire bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        wire::encode_frame::<_, MAX_RANGE_FRAME_BYTES>(self, "lane response")
    }
    /// Decodes a frame; an `Open` on port 0 is refused.
    pub fn decode(bytes: &[u8]) -> Result<LaneResponse, ProtocolError> {
        let response: LaneResponse =
            wire::decode_frame::<_, MAX_RANGE_FRAME_BYTES>(bytes, "lane response")?;
        if let LaneResponse::Open { port: 0, .. } = response {
            return Err(ProtocolError::InvalidField {
                what: "lane response",
                detail: "port 0".into(),
            });
        }
        Ok(response)
    }
}

/// Run expert `shard` of checkpoint `checkpoint` on `input` (hidden states, `[tokens, d_model]`) and answer
/// in `answer`'s encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertRequest {
    /// The run.
    pub run: RunId,
    /// Which expert.
    pub shard: ShardId,
    /// Hash of the checkpoint manifest whose weights to use.
    pub checkpoint: ContentHash,
    /// The hidden states (the host computes on their decoded values).
    pub input: Tensor,
    /// The encoding the output must come back in (an answer in another is not an answer to this call).
    pub answer: TensorDtype,
}

/// The answer to an [`ExpertRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpertResponse {
    /// Variant 0: the expert's outputs, same shape as the input and in the request's `answer` encoding,
    /// computed from the weights of checkpoint `checkpoint` (the one asked for), which round `round`
    /// committed.
    Output {
        /// The round whose commit made the checkpoint.
        round: u64,
        /// Hash of the checkpoint manifest whose weights were used.
        checkpoint: ContentHash,
        /// The outputs.
        output: Tensor,
    },
    /// Variant 1: this peer cannot serve the call (does not host the expert or checkpoint, overloaded).
    Unavailable {
        /// Why.
        reason: Text,
    },
}

impl ExpertRequest {
    /// The frame's wire bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        self.input.check()?;
        wire::encode_frame::<_, MAX_REQUEST_BYTES>(self, "expert request")
    }
    /// Decodes a frame and checks the tensor.
    pub fn decode(bytes: &[u8]) -> Result<ExpertRequest, ProtocolError> {
        let request: ExpertRequest =
            wire::decode_frame::<_, MAX_REQUEST_BYTES>(bytes, "expert request")?;
        request.input.check()?;
        Ok(request)
    }
}

impl ExpertResponse {
    /// The frame's wire bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        if let ExpertResponse::Output { output, .. } = self {
            output.check()?;
        }
        wire::encode_frame::<_, MAX_RESPONSE_BYTES>(self, "expert response")
    }
    /// Decodes a frame and checks the tensor.
    pub fn decode(bytes: &[u8]) -> Result<ExpertResponse, ProtocolError> {
        let response: ExpertResponse =
            wire::decode_frame::<_, MAX_RESPONSE_BYTES>(bytes, "expert response")?;
        if let ExpertResponse::Output { output, .. } = &response {
            output.check()?;
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_frames_roundtrip_and_refuse_bad_ranges() {
        let hash = ContentHash([5; 32]);
        let req = RangeRequest {
            hash,
            offset: 1 << 40,
            len: MAX_RANGE_BYTES,
        };
        assert_eq!(
            RangeRequest::decode(&req.encode().expect("encodable")).ok(),
            Some(req)
        );
        assert!(
            RangeRequest {
                hash,
                offset: 0,
                len: MAX_RANGE_BYTES + 1
            }
            .encode()
            .is_err()
        );
        assert!(
            RangeRequest {
                hash,
                offset: u64::MAX,
                len: 1
            }
            .encode()
            .is_err()
        );
        let res = RangeResponse::Range {
            hash,
            offset: 10,
            total_size: 20,
            len: 10,
        };
        let frame = res.encode().expect("encodable");
        assert!(frame.len() < MAX_RANGE_FRAME_BYTES);
        assert_eq!(RangeResponse::decode(&frame).ok(), Some(res));
        assert!(
            RangeResponse::Range {
                hash,
                offset: 10,
                total_size: 20,
                len: 11
            }
            .encode()
            .is_err(),
            "past the end"
        );
        for garbage in [vec![], vec![0xff; 10], vec![1u8; MAX_RANGE_FRAME_BYTES + 1]] {
            assert!(RangeResponse::decode(&garbage).is_err());
            assert!(RangeRequest::decode(&garbage).is_err());
        }
    }
}
