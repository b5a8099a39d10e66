//! Node identities: one ed25519 key per node (ed25519-dalek 3, the version libp2p-identity uses), from which
//! both its message signatures and its libp2p [`PeerId`] are derived, so a signed message and the peer that
//! sent it are bound to each other. Key storage is the caller's job (this crate does no I/O).

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
pub use libp2p_identity::PeerId;
use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ProtocolError;

/// Length of an ed25519 secret seed.
pub const SECRET_KEY_LEN: usize = 32;
/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// A node's signing key. It signs envelopes and, converted with [`Keypair::to_libp2p`], is the node's libp2p
/// identity. `Debug` never prints the secret.
#[derive(Clone)]
pub struct Keypair(SigningKey);

impl Keypair {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<Keypair, ProtocolError> {
        let mut seed = [0u8; SECRET_KEY_LEN];
        getrandom::fill(&mut seed).map_err(|e| ProtocolError::Randomness(e.to_string()))?;
        Ok(Keypair::from_seed(&seed))
    }

    /// The key whose 32-byte ed25519 secret seed is `seed` (as stored in a key file, or fixed in tests).
    pub fn from_seed(seed: &[u8; SECRET_KEY_LEN]) -> Keypair {
        Keypair(SigningKey::from_bytes(seed))
    }

    /// The 32-byte secret seed, for storing the key. Handle with care.
    pub fn seed(&self) -> [u8; SECRET_KEY_LEN] {
        self.0.to_bytes()
    }

    /// The public half, which other nodes see.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// This node's libp2p peer id (the identity-multihash of the ed25519 public key).
    pub fn peer_id(&self) -> PeerId {
        self.public().peer_id_unchecked(&self.0.verifying_key())
    }

    /// The same key as a libp2p identity, for building the swarm.
    pub fn to_libp2p(&self) -> libp2p_identity::Keypair {
        // The ed25519 "keypair bytes" are secret seed || public key, the form libp2p takes.
        let mut bytes = self.0.to_keypair_bytes();
        let kp = libp2p_identity::ed25519::Keypair::try_from_bytes(&mut bytes).expect(
            "invariant: ed25519-dalek's own keypair bytes are a valid ed25519 keypair for libp2p",
        );
        libp2p_identity::Keypair::from(kp)
    }

    /// Signs `message` (raw ed25519, no prehash). Callers add their own domain separation.
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.0.sign(message).to_bytes())
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair(public: {})", self.public())
    }
}

/// An ed25519 public key as it travels on the wire: 32 raw bytes, not yet checked to be a curve point
/// (that happens in [`PublicKey::verify`]). Nodes are named by their public key in messages.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Checks `signature` over `message` with strict ed25519 rules (no small-order keys, canonical `S`), so a
    /// signature cannot be altered into another valid one.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), ProtocolError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| ProtocolError::BadPublicKey)?;
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(message, &sig)
            .map_err(|_| ProtocolError::BadSignature)
    }

    /// The libp2p peer id of the node holding this key, or `BadPublicKey` if the bytes are not a key.
    pub fn peer_id(&self) -> Result<PeerId, ProtocolError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| ProtocolError::BadPublicKey)?;
        Ok(self.peer_id_unchecked(&key))
    }

    fn peer_id_unchecked(&self, key: &VerifyingKey) -> PeerId {
        let ed = libp2p_identity::ed25519::PublicKey::try_from_bytes(key.as_bytes())
            .expect("invariant: a decompressed ed25519-dalek key is a valid libp2p ed25519 key");
        libp2p_identity::PublicKey::from(ed).to_peer_id()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// An ed25519 signature: 64 raw bytes on the wire (a bincode tuple, no length prefix).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; SIGNATURE_LEN]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", hex::encode(self.0))
    }
}

// serde derives arrays only up to 32 elements; 64 bytes are written as a 64-tuple, i.e. 64 raw bytes.
impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(SIGNATURE_LEN)?;
        for byte in &self.0 {
            tuple.serialize_element(byte)?;
        }
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SignatureVisitor;
        impl<'de> Visitor<'de> for SignatureVisitor {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Signature, A::Error> {
                let mut out = [0u8; SIGNATURE_LEN];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| de::Error::invalid_length(i, &self))?;
                }
                Ok(Signature(out))
            }
        }
        deserializer.deserialize_tuple(SIGNATURE_LEN, SignatureVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_matches_libp2p() {
        let kp = Keypair::from_seed(&[7u8; 32]);
        let lp = kp.to_libp2p();
        assert_eq!(lp.public().to_peer_id(), kp.peer_id());
        assert_eq!(kp.public().peer_id().unwrap(), kp.peer_id());
        let ed = lp.public().try_into_ed25519().unwrap();
        assert_eq!(ed.to_bytes(), kp.public().0);
        // A signature made through libp2p verifies with our key: the two stacks are one key.
        let sig = lp.sign(b"hello").unwrap();
        let sig: [u8; 64] = sig.try_into().unwrap();
        kp.public().verify(b"hello", &Signature(sig)).unwrap();
    }

    #[test]
    fn seed_round_trips() {
        let kp = Keypair::generate().unwrap();
        assert_eq!(Keypair::from_seed(&kp.seed()).public(), kp.public());
    }

    #[test]
    fn wrong_message_fails() {
        let kp = Keypair::from_seed(&[1u8; 32]);
        let sig = kp.sign(b"a");
        assert_eq!(
            kp.public().verify(b"b", &sig),
            Err(ProtocolError::BadSignature)
        );
    }
}
