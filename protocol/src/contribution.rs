//! A contribution: one sender's delta for one shard in one round of one run. The payload a trainer hosts is
//! a [`Binding`] (run, round, shard, sender), the expert loads its training saw (trunk contributions only:
//! the routed slots each expert received, from which the trunk's holders move the router biases), and the
//! codec's delta payload ([`crate::codec`]); the sender's signed [`DeltaAnnouncement`] commits to that
//! payload's hash, so the loads are signed with the delta. So a payload hash names exactly one
//! (run, round, shard, sender): anyone who re-announces it under another key, in another round or for
//! another shard is refused, alone, and nothing they announce can change the verdict on the original.
//!
//! Layout (integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `MCTB` |
//! | 4 | 1 | version, 2 |
//! | 5 | 2 | `n`, u16: length of the binding, at most [`MAX_BINDING_BYTES`] |
//! | 7 | n | the [`Binding`] in the wire encoding ([`crate::wire`]) |
//! | 7 + n | 4 | `m`, u32: number of expert loads, at most [`MAX_EXPERT_LOADS`] |
//! | 11 + n | 4m | the loads, u32 each |
//! | 11 + n + 4m | … | the delta payload (`MDLT…`) |

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::codec::{CodecError, CodecOptions};
use crate::error::ProtocolError;
use crate::identity::PublicKey;
use crate::ids::{RunId, ShardId};
use crate::messages::DeltaAnnouncement;

/// First bytes of every contribution payload.
pub const CONTRIBUTION_MAGIC: [u8; 4] = *b"MCTB";
/// Version of the contribution layout (2: the expert loads after the binding).
pub const CONTRIBUTION_VERSION: u8 = 2;
/// Most expert loads a contribution carries (one per routed expert of the model: a model of 64 MoE layers
/// of 256 experts has 16,384).
pub const MAX_EXPERT_LOADS: usize = 1 << 16;
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

    /// The contribution payload: this binding, the expert `loads` (empty for an expert's delta), then
    /// `delta_payload` (an encoded delta).
    pub fn wrap(&self, loads: &[u32], delta_payload: &[u8]) -> Result<Vec<u8>, ContributionError> {
        if loads.len() > MAX_EXPERT_LOADS {
            return Err(ContributionError::TooManyLoads(loads.len()));
        }
        let binding = crate::wire::encode::<_, MAX_BINDING_BYTES>(self, "contribution binding")?;
        let mut out = Vec::with_capacity(
            PREFIX_LEN + binding.len() + 4 + 4 * loads.len() + delta_payload.len(),
        );
        out.extend_from_slice(&CONTRIBUTION_MAGIC);
        out.push(CONTRIBUTION_VERSION);
        // At most MAX_BINDING_BYTES (256): fits in u16.
        out.extend_from_slice(&(binding.len() as u16).to_le_bytes());
        out.extend_from_slice(&binding);
        // At most MAX_EXPERT_LOADS: fits in u32.
        out.extend_from_slice(&(loads.len() as u32).to_le_bytes());
        for l in loads {
            out.extend_from_slice(&l.to_le_bytes());
        }
        out.extend_from_slice(delta_payload);
        Ok(out)
    }

    /// Bytes this binding and `loads` expert loads add in front of the delta payload.
    pub fn wrapped_len(&self, loads: usize) -> Result<usize, ContributionError> {
        Ok(PREFIX_LEN
            + crate::wire::encode::<_, MAX_BINDING_BYTES>(self, "contribution binding")?.len()
            + 4
            + 4 * loads)
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
    /// More expert loads than [`MAX_EXPERT_LOADS`].
    #[error("contribution carries {0} expert loads, more than {MAX_EXPERT_LOADS}")]
    TooManyLoads(usize),
    /// The delta after the binding does not decode.
    #[error("contribution delta: {0}")]
    Delta(#[from] CodecError),
}

/// A contribution split into its parts, the delta still encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitContribution<'a> {
    /// Who made it, for which shard and round.
    pub binding: Binding,
    /// The routed slots per expert its training saw (empty for an expert's delta).
    pub loads: Vec<u32>,
    /// The encoded delta (`MDLT…`).
    pub delta: &'a [u8],
}

/// A contribution with its delta decoded: what an aggregator works from.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    /// Who made it, for which shard and round.
    pub binding: Binding,
    /// The routed slots per expert its training saw (empty for an expert's delta).
    pub loads: Vec<u32>,
    /// The delta's values.
    pub delta: Vec<f32>,
}

/// Splits a contribution payload into its binding, its loads and the encoded delta after them (not decoded
/// here).
pub fn split_contribution(bytes: &[u8]) -> Result<SplitContribution<'_>, ContributionError> {
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
    let Some(count) = bytes.get(end..end + 4) else {
        return Err(ContributionError::Truncated {
            needed: end + 4,
            got: bytes.len(),
        });
    };
    let m = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
    if m > MAX_EXPERT_LOADS {
        return Err(ContributionError::TooManyLoads(m));
    }
    let start = end + 4;
    let stop = start + 4 * m;
    let Some(raw) = bytes.get(start..stop) else {
        return Err(ContributionError::Truncated {
            needed: stop,
            got: bytes.len(),
        });
    };
    let loads = raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(SplitContribution {
        binding,
        loads,
        delta: &bytes[stop..],
    })
}

/// Splits a contribution and decodes its delta (`max_len` values at most): what an aggregator does with a
/// payload that verification already accepted.
pub fn decode_contribution(
    bytes: &[u8],
    max_len: usize,
) -> Result<Contribution, ContributionError> {
    let split = split_contribution(bytes)?;
    Ok(Contribution {
        delta: crate::codec::decode_delta(split.delta, max_len)?,
        binding: split.binding,
        loads: split.loads,
    })
}

/// The exact size of a contribution to a shard of `shard_len` values encoded with `options`, bound by
/// `binding`, carrying `loads` expert loads: the codec's output size is fixed by the length and the options
/// (top-k keeps `ceil(density · len)` values), so an announced size is checked before a byte is fetched,
/// and a fetch never reads past it.
pub fn contribution_len(
    binding: &Binding,
    loads: usize,
    shard_len: usize,
    options: &CodecOptions,
) -> Result<u64, ContributionError> {
    let payload = crate::codec::encoded_len(shard_len, options)?;
    Ok((binding.wrapped_len(loads)? + payload) as u64)
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
        let c = binding().wrap(&[3, 0, 7], &payload).unwrap();
        let split = split_contribution(&c).unwrap();
        assert_eq!(split.binding, binding());
        assert_eq!(split.loads, vec![3, 0, 7]);
        assert_eq!(split.delta, &payload[..]);
        let decoded = decode_contribution(&c, 300).unwrap();
        assert_eq!(decoded.delta.len(), 300);
        assert_eq!(decoded.loads, vec![3, 0, 7]);
        let c = binding().wrap(&[], &payload).unwrap();
        assert!(split_contribution(&c).unwrap().loads.is_empty());
        let too_many = vec![0; MAX_EXPERT_LOADS + 1];
        assert!(binding().wrap(&too_many, &payload).is_err());
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
                            for loads in [&[][..], &[1, 2, 3, 4][..]] {
                                let c = b
                                    .wrap(loads, &encode_delta(&delta, &options).unwrap())
                                    .unwrap();
                                assert_eq!(
                                    contribution_len(&b, loads.len(), len, &options).unwrap(),
                                    c.len() as u64,
                                    "{len} {options:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn hostile_bytes_are_errors() {
        let c = binding()
            .wrap(
                &[5, 6],
                &encode_delta(&[1.0, 2.0], &CodecOptions::default()).unwrap(),
            )
            .unwrap();
        let n = usize::from(u16::from_le_bytes([c[5], c[6]]));
        // Anything cut before the delta starts (the binding, the count, the two loads) is an error.
        for cut in 0..(PREFIX_LEN + n + 4 + 8) {
            assert!(split_contribution(&c[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = c.clone();
        bad[0] = b'X';
        assert_eq!(
            split_contribution(&bad).unwrap_err(),
            ContributionError::BadMagic
        );
        let mut bad = c.clone();
        bad[4] = 1;
        assert_eq!(
            split_contribution(&bad).unwrap_err(),
            ContributionError::UnsupportedVersion(1)
        );
        // A load count past the limit is refused before anything is read or allocated.
        let mut bad = c.clone();
        bad[7 + n..11 + n].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            split_contribution(&bad).unwrap_err(),
            ContributionError::TooManyLoads(u32::MAX as usize)
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
