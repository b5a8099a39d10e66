//! A contribution: one sender's delta for one shard in one round of one run. The payload a trainer hosts is
//! a [`Binding`] (run, round, shard, sender) followed by the codec's delta payload ([`crate::codec`]), and the
//! sender's signed [`DeltaAnnouncement`] commits to that payload's hash. So a payload hash names exactly one
//! (run, round, shard, sender): anyone who re-announces it under another key, in another round or for
//! another shard is refused, alone, and nothing they announce can change the verdict on the original.
//!
//! Layout (integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `MCTB` |
//! | 4 | 1 | version, 1 |
//! | 5 | 2 | `n`, u16: length of the binding, at most [`MAX_BINDING_BYTES`] |
//! | 7 | n | the [`Binding`] in the wire encoding ([`crate::wire`]) |
//! | 7 + n | … | the delta payload (`MDLT…`) |

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::codec::{CodecError, CodecOptions};
use crate::error::ProtocolError;
use crate::identity::PublicKey;
use crate::ids::{RunId, ShardId};
use crate::messages::DeltaAnnouncement;

/// First bytes of every contribution payload.
pub const CONTRIBUTION_MAGIC: [u8; 4] = *b"MCTB";
/// Version of the contribution layout.
pub const CONTRIBUTION_VERSION: u8 = 1;
/// Most bytes a binding takes in the wire encoding (a run id of 64 bytes, a round, a shard and a key take
/// about 110).
pub const MAX_BINDING_BYTES: usize = 256;
/// Bytes before the binding.
const PREFIX_LEN: usize = 7;

/// Who made a delta, for which shard, in which round of which run: the first part of every contribution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The run.
    pub run: RunId,
    /// The round the delta was trained in.
    pub round: u64,
    /// The shard it updates.
    pub shard: ShardId,
    /// The key that signs its announcement.
    pub sender: PublicKey,
}

impl std::fmt::Display for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} round {} of run {}, sent by {}",
            self.shard, self.round, self.run, self.sender
        )
    }
}

impl Binding {
    /// The binding an announcement signed by `sender` claims for its payload.
    pub fn of(announcement: &DeltaAnnouncement, sender: PublicKey) -> Binding {
        Binding {
            run: announcement.run.clone(),
            round: announcement.round,
            shard: announcement.shard,
            sender,
        }
    }

    /// The contribution payload: this binding, then `delta_payload` (an encoded delta).
    pub fn wrap(&self, delta_payload: &[u8]) -> Result<Vec<u8>, ContributionError> {
        let binding = crate::wire::encode::<_, MAX_BINDING_BYTES>(self, "contribution binding")?;
        let mut out = Vec::with_capacity(PREFIX_LEN + binding.len() + delta_payload.len());
        out.extend_from_slice(&CONTRIBUTION_MAGIC);
        out.push(CONTRIBUTION_VERSION);
        // At most MAX_BINDING_BYTES (256): fits in u16.
        out.extend_from_slice(&(binding.len() as u16).to_le_bytes());
        out.extend_from_slice(&binding);
        out.extend_from_slice(delta_payload);
        Ok(out)
    }

    /// Bytes this binding adds in front of the delta payload.
    pub fn wrapped_len(&self) -> Result<usize, ContributionError> {
        Ok(PREFIX_LEN
            + crate::wire::encode::<_, MAX_BINDING_BYTES>(self, "contribution binding")?.len())
    }
}

/// Why bytes are not a contribution.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ContributionError {
    /// Shorter than its own header says.
    #[error("contribution truncated: {needed} bytes needed, {got} present")]
    Truncated {
        /// Bytes the header needs.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// Does not start with [`CONTRIBUTION_MAGIC`].
    #[error("not a contribution (bad magic)")]
    BadMagic,
    /// A layout version this build does not know.
    #[error("contribution version {0} is not supported")]
    UnsupportedVersion(u8),
    /// The binding is longer than [`MAX_BINDING_BYTES`] or does not decode.
    #[error("contribution binding: {0}")]
    Binding(#[from] ProtocolError),
    /// The delta after the binding does not decode.
    #[error("contribution delta: {0}")]
    Delta(#[from] CodecError),
}

/// Splits a contribution payload into its binding and the encoded delta after it (not decoded here).
pub fn split_contribution(bytes: &[u8]) -> Result<(Binding, &[u8]), ContributionError> {
    if bytes.len() < PREFIX_LEN {
        return Err(ContributionError::Truncated {
            needed: PREFIX_LEN,
            got: bytes.len(),
        });
    }
    if bytes[0..4] != CONTRIBUTION_MAGIC {
        return Err(ContributionError::BadMagic);
    }
    if bytes[4] != CONTRIBUTION_VERSION {
        return Err(ContributionError::UnsupportedVersion(bytes[4]));
    }
    let n = usize::from(u16::from_le_bytes([bytes[5], bytes[6]]));
    if n > MAX_BINDING_BYTES {
        return Err(ProtocolError::TooLarge {
            what: "contribution binding",
            len: n,
            max: MAX_BINDING_BYTES,
        }
        .into());
    }
    let end = PREFIX_LEN + n;
    if bytes.len() < end {
        return Err(ContributionError::Truncated {
            needed: end,
            got: bytes.len(),
        });
    }
    let binding = crate::wire::decode::<Binding, MAX_BINDING_BYTES>(
        &bytes[PREFIX_LEN..end],
        "contribution binding",
    )?;
    Ok((binding, &bytes[end..]))
}

/// Splits a contribution and decodes its delta (`max_len` values at most): what an aggregator does with a
/// payload that verification already accepted.
pub fn decode_contribution(
    bytes: &[u8],
    max_len: usize,
) -> Result<(Binding, Vec<f32>), ContributionError> {
    let (binding, delta) = split_contribution(bytes)?;
    Ok((binding, crate::codec::decode_delta(delta, max_len)?))
}

/// The exact size of a contribution to a shard of `shard_len` values encoded with `options`, bound by
/// `binding`: the codec's output size is fixed by the length and the options (top-k keeps
/// `ceil(density · len)` values), so an announced size is checked before a byte is fetched, and a fetch
/// never reads past it.
pub fn contribution_len(
    binding: &Binding,
    shard_len: usize,
    options: &CodecOptions,
) -> Result<u64, ContributionError> {
    let payload = crate::codec::encoded_len(shard_len, options)?;
    Ok((binding.wrapped_len()? + payload) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{ScaleFormat, ValueFormat, encode_delta};

    fn binding() -> Binding {
        Binding {
            run: RunId::new("run-1").unwrap(),
            round: 7,
            shard: ShardId::expert(1, 3).unwrap(),
            sender: PublicKey([9; 32]),
        }
    }

    #[test]
    fn wraps_and_splits() {
        let delta: Vec<f32> = (0..300).map(|i| (i as f32 - 150.0) / 1000.0).collect();
        let payload = encode_delta(&delta, &CodecOptions::default()).unwrap();
        let c = binding().wrap(&payload).unwrap();
        let (b, rest) = split_contribution(&c).unwrap();
        assert_eq!(b, binding());
        assert_eq!(rest, &payload[..]);
        let (_, values) = decode_contribution(&c, 300).unwrap();
        assert_eq!(values.len(), 300);
    }

    #[test]
    fn announced_size_is_exact_for_every_codec_option() {
        let b = binding();
        for len in [1usize, 127, 128, 129, 1000] {
            let delta: Vec<f32> = (0..len).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
            for scale in [ScaleFormat::F32, ScaleFormat::PowerOfTwo] {
                for block_size in [128u16, 256] {
                    for top_k_density in [None, Some(0.01), Some(0.03), Some(0.3), Some(1.0)] {
                        for (values, top_k_per_block) in [
                            (ValueFormat::Fp8, false),
                            (ValueFormat::Fp8, true),
                            (ValueFormat::Int4, true),
                            (ValueFormat::Int2, true),
                        ] {
                            if values == ValueFormat::Int2 && top_k_density.is_none() {
                                continue; // refused: int2 has no zero level
                            }
                            let options = CodecOptions {
                                block_size,
                                scale,
                                top_k_density,
                                values,
                                top_k_per_block: top_k_per_block && top_k_density.is_some(),
                            };
                            let c = b.wrap(&encode_delta(&delta, &options).unwrap()).unwrap();
                            assert_eq!(
                                contribution_len(&b, len, &options).unwrap(),
                                c.len() as u64,
                                "{len} {options:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn hostile_bytes_are_errors() {
        let c = binding()
            .wrap(&encode_delta(&[1.0, 2.0], &CodecOptions::default()).unwrap())
            .unwrap();
        for cut in 0..20 {
            assert!(split_contribution(&c[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = c.clone();
        bad[0] = b'X';
        assert_eq!(
            split_contribution(&bad).unwrap_err(),
            ContributionError::BadMagic
        );
        let mut bad = c.clone();
        bad[4] = 2;
        assert_eq!(
            split_contribution(&bad).unwrap_err(),
            ContributionError::UnsupportedVersion(2)
        );
        let mut bad = c.clone();
        bad[5] = 0xff;
        bad[6] = 0xff;
        assert!(matches!(
            split_contribution(&bad).unwrap_err(),
            ContributionError::Binding(ProtocolError::TooLarge { .. })
        ));
        // A raw delta payload (no binding) is not a contribution.
        assert_eq!(
            split_contribution(&encode_delta(&[1.0], &CodecOptions::default()).unwrap())
                .unwrap_err(),
            ContributionError::BadMagic
        );
    }
}
