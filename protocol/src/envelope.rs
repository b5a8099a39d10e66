//! Signed envelopes: how every gossiped [`Message`] travels. The signer signs the exact bytes that precede
//! the signature, behind a domain-separation prefix; the receiver checks the signature first and only then
//! decodes the message (which must be canonically encoded).
//!
//! Wire layout (bincode standard: little-endian, varint integers):
//!
//! | field        | encoding                                   |
//! |--------------|--------------------------------------------|
//! | version      | varint u16 = [`PROTOCOL_VERSION`]          |
//! | signer       | 32 raw bytes, ed25519 public key           |
//! | timestamp_ms | varint u64, unix milliseconds              |
//! | payload      | varint length + bincode of the [`Message`] |
//! | signature    | 64 raw bytes                               |
//!
//! The signature is ed25519 over `SIGNING_DOMAIN || <all bytes before the signature>`.

use serde::{Deserialize, Serialize};

use crate::bytes::Bytes;
use crate::error::ProtocolError;
use crate::identity::{Keypair, PublicKey, SIGNATURE_LEN, Signature};
use crate::limits::{
    MAX_ENVELOPE_BYTES, MAX_MESSAGE_BYTES, MAX_PARCEL_BYTES, MAX_PARCEL_MESSAGE_BYTES,
    PROTOCOL_VERSION,
};
use crate::messages::Message;
use crate::wire;

/// Prefix of the signed bytes, so that a mana envelope signature can never be replayed as a signature of
/// anything else made with the same key (such as a libp2p handshake).
pub const SIGNING_DOMAIN: &[u8] = b"mana/signed-envelope/v1\0";

/// A message with its signer, time and signature: the unit of gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    /// Wire version; must be [`PROTOCOL_VERSION`].
    pub version: u16,
    /// The signer's public key; its PeerId derives from it.
    pub signer: PublicKey,
    /// When the signer signed, in unix milliseconds (its clock, checked against the receiver's window).
    pub timestamp_ms: u64,
    /// The canonical encoding of the [`Message`].
    pub payload: Bytes,
    /// ed25519 over [`SIGNING_DOMAIN`] and the encoding of the fields above.
    pub signature: Signature,
}

impl SignedEnvelope {
    /// Encodes `message`, signs it with `keypair` at `timestamp_ms`, and returns the envelope.
    pub fn sign(
        keypair: &Keypair,
        message: &Message,
        timestamp_ms: u64,
    ) -> Result<SignedEnvelope, ProtocolError> {
        message.check_limits()?;
        let payload = Bytes(wire::encode::<_, MAX_PARCEL_MESSAGE_BYTES>(
            message, "message",
        )?);
        let mut envelope = SignedEnvelope {
            version: PROTOCOL_VERSION,
            signer: keypair.public(),
            timestamp_ms,
            payload,
            signature: Signature([0; SIGNATURE_LEN]),
        };
        let signed = envelope.signed_bytes()?;
        envelope.signature = keypair.sign(&signed);
        Ok(envelope)
    }

    /// The envelope's wire bytes (at most [`MAX_PARCEL_BYTES`]; gossip takes them whole only up to
    /// [`MAX_ENVELOPE_BYTES`], larger ones travel as a [`crate::Parcel`]).
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        wire::encode::<_, MAX_PARCEL_BYTES>(self, "envelope")
    }

    /// Checks the version and the signature, then decodes the message and its count bounds. The signer and
    /// time are the envelope's `signer` and `timestamp_ms`; whether they are acceptable for this message is
    /// [`crate::validation`]'s job.
    pub fn verify(&self) -> Result<Message, ProtocolError> {
        if self.version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion {
                got: self.version,
                supported: PROTOCOL_VERSION,
            });
        }
        let signed = self.signed_bytes()?;
        self.signer.verify(&signed, &self.signature)?;
        // The tighter bound wherever it holds: what a gossiped payload's length prefixes may make the
        // decoder allocate stays within the gossip message's size.
        let message: Message = if self.payload.0.len() <= MAX_MESSAGE_BYTES {
            wire::decode::<_, MAX_MESSAGE_BYTES>(&self.payload.0, "message")?
        } else {
            wire::decode::<_, MAX_PARCEL_MESSAGE_BYTES>(&self.payload.0, "message")?
        };
        message.check_limits()?;
        Ok(message)
    }

    /// The PeerId of the signer (fails if `signer` is not a valid key).
    pub fn signer_peer_id(&self) -> Result<crate::PeerId, ProtocolError> {
        self.signer.peer_id()
    }

    /// [`SIGNING_DOMAIN`] followed by the encoding of every field but the signature.
    fn signed_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        let body = wire::encode::<_, MAX_PARCEL_BYTES>(
            &(self.version, &self.signer, self.timestamp_ms, &self.payload),
            "envelope",
        )?;
        let mut signed = Vec::with_capacity(SIGNING_DOMAIN.len() + body.len());
        signed.extend_from_slice(SIGNING_DOMAIN);
        signed.extend_from_slice(&body);
        Ok(signed)
    }
}

/// Decodes an envelope from gossip bytes: at most [`MAX_ENVELOPE_BYTES`], the right version, no trailing
/// bytes, canonical. Does not verify the signature: call [`SignedEnvelope::verify`].
pub fn decode_envelope(bytes: &[u8]) -> Result<SignedEnvelope, ProtocolError> {
    wire::check_version::<MAX_ENVELOPE_BYTES>(bytes, "envelope")?;
    wire::decode::<_, MAX_ENVELOPE_BYTES>(bytes, "envelope")
}

/// Decodes the envelope a [`crate::Parcel`] names, fetched by its hash: as [`decode_envelope`], up to
/// [`MAX_PARCEL_BYTES`]. Also reads envelopes kept in a store (evidence), which may have come either way.
pub fn decode_parcel(bytes: &[u8]) -> Result<SignedEnvelope, ProtocolError> {
    wire::check_version::<MAX_PARCEL_BYTES>(bytes, "envelope")?;
    wire::decode::<_, MAX_PARCEL_BYTES>(bytes, "envelope")
}
