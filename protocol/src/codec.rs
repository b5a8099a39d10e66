//! The gradient-delta codec: one shard's f32 delta in, compact bytes out, f32 back.
//!
//! Default: every value in FP8 E4M3 with one scale per block of 128 (or 256) values, the block's amax
//! mapped to 448 (DeepSeek-V3's fine-grained scaling). Options: power-of-two scales (one byte each, and
//! the scaling itself is exact), and top-k sparsification, where only the largest `density` fraction of the
//! values is sent with its index. [`DeltaEncoder`] adds error feedback: what a round's encoding loses is
//! added to the next round's delta, so nothing is lost for good, only delayed.
//!
//! Payload layout (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `MDLT` |
//! | 4 | 1 | version, 1 |
//! | 5 | 1 | flags: bit 0 sparse, bit 1 power-of-two scales, others 0 |
//! | 6 | 2 | block size, u16: 128 or 256 |
//! | 8 | 4 | `len`, u32: values in the dense delta |
//! | 12 | 4 | `nnz`, u32: values stored (`== len` when dense) |
//! | 16 | 4·nnz | sparse only: indices, u32, strictly increasing, `< len` |
//! | … | 4 or 1 per block | one scale per block of `block` stored values (`ceil(nnz/block)` blocks): f32, or i8 exponent `e` for 2^e |
//! | … | nnz | E4M3 codes (never NaN) |
//!
//! Stored value `i` decodes to `e4m3(code[i]) * scale[i / block]`; values not stored are 0.

use mana_kernels::fp8::E4M3;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::limits::MAX_DELTA_VALUES;

/// First bytes of every delta payload.
pub const DELTA_MAGIC: [u8; 4] = *b"MDLT";
/// Version of the payload layout.
pub const DELTA_VERSION: u8 = 1;
/// Length of the fixed header.
pub const DELTA_HEADER_LEN: usize = 16;
/// The E4M3 value a block's amax is scaled to.
const E4M3_MAX: f32 = 448.0;

const FLAG_SPARSE: u8 = 1;
const FLAG_POW2: u8 = 2;

/// How block scales are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScaleFormat {
    /// An f32 per block (4 bytes): amax maps exactly to 448.
    F32,
    /// A power of two per block, stored as its i8 exponent (1 byte): amax maps into (224, 448].
    PowerOfTwo,
}

/// How a delta is encoded; chosen by the coordinator in each round's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CodecOptions {
    /// Values per scale: 128 or 256.
    pub block_size: u16,
    /// How scales are stored.
    pub scale: ScaleFormat,
    /// `Some(d)`: keep only the `ceil(d * len)` largest-magnitude values (`0 < d <= 1`); `None`: dense.
    pub top_k_density: Option<f32>,
}

impl Default for CodecOptions {
    fn default() -> Self {
        CodecOptions {
            block_size: 128,
            scale: ScaleFormat::F32,
            top_k_density: None,
        }
    }
}

impl CodecOptions {
    /// Checks that the options are ones the codec supports.
    pub fn check(&self) -> Result<(), crate::ProtocolError> {
        let bad = |detail: String| crate::ProtocolError::InvalidField {
            what: "codec options",
            detail,
        };
        if !matches!(self.block_size, 128 | 256) {
            return Err(bad(format!(
                "block size {} is not 128 or 256",
                self.block_size
            )));
        }
        if let Some(d) = self.top_k_density
            && !(d > 0.0 && d <= 1.0)
        {
            return Err(bad(format!("top-k density {d} is not in (0, 1]")));
        }
        Ok(())
    }
}

/// Why a delta could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// The options are not supported.
    #[error("bad codec options: {0}")]
    BadOptions(String),
    /// The input delta holds a NaN or an infinity.
    #[error("the delta holds a non-finite value at index {index}")]
    NonFiniteInput {
        /// Where.
        index: usize,
    },
    /// The delta is longer than [`MAX_DELTA_VALUES`] or than the caller allows.
    #[error("delta of {len} values is over the limit of {max}")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The payload is shorter than its header says.
    #[error("payload truncated: {needed} bytes needed, {got} present")]
    Truncated {
        /// Bytes the header implies.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// The payload is longer than its header says.
    #[error("payload has {0} trailing bytes")]
    TrailingBytes(usize),
    /// The payload does not start with [`DELTA_MAGIC`].
    #[error("not a delta payload (bad magic)")]
    BadMagic,
    /// The payload layout version is not [`DELTA_VERSION`].
    #[error("unsupported delta payload version {0}")]
    UnsupportedVersion(u8),
    /// The header's flags or block size are not valid.
    #[error("bad delta header: {0}")]
    BadHeader(String),
    /// Sparse indices are not strictly increasing or not below `len`.
    #[error("bad sparse index {index} at position {position}")]
    BadIndex {
        /// Position in the index list.
        position: usize,
        /// The index found.
        index: u32,
    },
    /// A scale is negative, NaN or infinite, or a code is NaN.
    #[error("non-finite or negative scale or code in block {block}")]
    BadValue {
        /// The block.
        block: usize,
    },
    /// [`DeltaEncoder::encode`] got a delta of another length than before.
    #[error("delta length {got} differs from the residual's {expected}")]
    LengthChanged {
        /// Length of the residual kept from earlier rounds.
        expected: usize,
        /// Length of this delta.
        got: usize,
    },
}

/// The fixed header of a delta payload, readable without decoding the values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaHeader {
    /// Whether indices are stored (top-k).
    pub sparse: bool,
    /// How scales are stored.
    pub scale: ScaleFormat,
    /// Values per scale.
    pub block_size: usize,
    /// Values in the dense delta.
    pub len: usize,
    /// Values stored.
    pub nnz: usize,
}

impl DeltaHeader {
    /// Parses and checks the header, and that `bytes` has exactly the length it implies.
    pub fn parse(bytes: &[u8]) -> Result<DeltaHeader, CodecError> {
        if bytes.len() < DELTA_HEADER_LEN {
            return Err(CodecError::Truncated {
                needed: DELTA_HEADER_LEN,
                got: bytes.len(),
            });
        }
        if bytes[0..4] != DELTA_MAGIC {
            return Err(CodecError::BadMagic);
        }
        if bytes[4] != DELTA_VERSION {
            return Err(CodecError::UnsupportedVersion(bytes[4]));
        }
        let flags = bytes[5];
        if flags & !(FLAG_SPARSE | FLAG_POW2) != 0 {
            return Err(CodecError::BadHeader(format!("unknown flags {flags:#04x}")));
        }
        let block_size = usize::from(u16::from_le_bytes([bytes[6], bytes[7]]));
        if !matches!(block_size, 128 | 256) {
            return Err(CodecError::BadHeader(format!("block size {block_size}")));
        }
        let len = read_u32(bytes, 8) as usize;
        let nnz = read_u32(bytes, 12) as usize;
        if len > MAX_DELTA_VALUES {
            return Err(CodecError::TooLong {
                len,
                max: MAX_DELTA_VALUES,
            });
        }
        let sparse = flags & FLAG_SPARSE != 0;
        if (sparse && nnz > len) || (!sparse && nnz != len) {
            return Err(CodecError::BadHeader(format!(
                "{nnz} stored values for a delta of {len}"
            )));
        }
        let header = DeltaHeader {
            sparse,
            scale: if flags & FLAG_POW2 != 0 {
                ScaleFormat::PowerOfTwo
            } else {
                ScaleFormat::F32
            },
            block_size,
            len,
            nnz,
        };
        let needed = header.encoded_len();
        if bytes.len() < needed {
            return Err(CodecError::Truncated {
                needed,
                got: bytes.len(),
            });
        }
        if bytes.len() > needed {
            return Err(CodecError::TrailingBytes(bytes.len() - needed));
        }
        Ok(header)
    }

    /// Number of scale blocks.
    pub fn blocks(&self) -> usize {
        self.nnz.div_ceil(self.block_size)
    }

    /// Total payload length this header implies (no overflow: `nnz <= 2^28`).
    pub fn encoded_len(&self) -> usize {
        let index_bytes = if self.sparse { 4 * self.nnz } else { 0 };
        let scale_bytes = self.blocks() * scale_len(self.scale);
        DELTA_HEADER_LEN + index_bytes + scale_bytes + self.nnz
    }
}

fn scale_len(scale: ScaleFormat) -> usize {
    match scale {
        ScaleFormat::F32 => 4,
        ScaleFormat::PowerOfTwo => 1,
    }
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Refuses values an encoder cannot take: more than [`MAX_DELTA_VALUES`], or any not finite.
fn check_values(values: &[f32]) -> Result<(), CodecError> {
    if values.len() > MAX_DELTA_VALUES {
        return Err(CodecError::TooLong {
            len: values.len(),
            max: MAX_DELTA_VALUES,
        });
    }
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(CodecError::NonFiniteInput { index });
    }
    Ok(())
}

/// Encodes `delta` once, without error feedback (top-k drops what it does not keep; see [`DeltaEncoder`]).
pub fn encode_delta(delta: &[f32], options: &CodecOptions) -> Result<Vec<u8>, CodecError> {
    options
        .check()
        .map_err(|e| CodecError::BadOptions(e.to_string()))?;
    check_values(delta)?;
    let indices = options.top_k_density.map(|d| top_k_indices(delta, d));
    let header = DeltaHeader {
        sparse: indices.is_some(),
        scale: options.scale,
        block_size: usize::from(options.block_size),
        len: delta.len(),
        nnz: indices.as_ref().map_or(delta.len(), Vec::len),
    };
    let mut out = Vec::with_capacity(header.encoded_len());
    out.extend_from_slice(&DELTA_MAGIC);
    out.push(DELTA_VERSION);
    out.push(
        if header.sparse { FLAG_SPARSE } else { 0 }
            | if header.scale == ScaleFormat::PowerOfTwo {
                FLAG_POW2
            } else {
                0
            },
    );
    out.extend_from_slice(&options.block_size.to_le_bytes());
    // Lengths fit in u32: both are at most MAX_DELTA_VALUES = 2^28.
    out.extend_from_slice(&(header.len as u32).to_le_bytes());
    out.extend_from_slice(&(header.nnz as u32).to_le_bytes());
    let stored: Vec<f32> = match &indices {
        Some(idx) => {
            for &i in idx {
                out.extend_from_slice(&i.to_le_bytes());
            }
            idx.iter().map(|&i| delta[i as usize]).collect()
        }
        None => delta.to_vec(),
    };
    let mut codes = Vec::with_capacity(stored.len());
    for block in stored.chunks(header.block_size) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = match header.scale {
            ScaleFormat::F32 => {
                // Keep the scale normal so that v / scale stays finite for every v in the block.
                let s = amax / E4M3_MAX;
                out.extend_from_slice(&s.max(f32::MIN_POSITIVE).to_le_bytes());
                s.max(f32::MIN_POSITIVE)
            }
            ScaleFormat::PowerOfTwo => {
                let e = pow2_exponent(amax);
                out.push(e as u8);
                pow2(e)
            }
        };
        codes.extend(block.iter().map(|&v| E4M3::from_f32(v / scale).to_bits()));
    }
    out.extend_from_slice(&codes);
    debug_assert_eq!(out.len(), header.encoded_len());
    Ok(out)
}

/// Smallest exponent `e` in [-126, 127] with `amax / 2^e <= 448`.
fn pow2_exponent(amax: f32) -> i8 {
    if amax <= 0.0 {
        return -126;
    }
    let e = (amax / E4M3_MAX).log2().ceil();
    let mut e = e.clamp(-126.0, 127.0) as i32;
    // log2 may be off by one ulp around exact powers of two: settle it exactly.
    while e < 127 && amax / pow2(e as i8) > E4M3_MAX {
        e += 1;
    }
    while e > -126 && amax / pow2((e - 1) as i8) <= E4M3_MAX {
        e -= 1;
    }
    e as i8
}

/// 2^e as an f32, exactly, for e in [-126, 127].
fn pow2(e: i8) -> f32 {
    f32::from_bits(((i32::from(e) + 127) as u32) << 23)
}

/// Indices of the `ceil(density * len)` largest |values|, ascending. Ties are broken by index so the choice is
/// deterministic.
fn top_k_indices(delta: &[f32], density: f32) -> Vec<u32> {
    let n = delta.len();
    if n == 0 {
        return Vec::new();
    }
    let k = ((f64::from(density) * n as f64).ceil() as usize).clamp(1, n);
    // Indices fit in u32: n <= MAX_DELTA_VALUES = 2^28.
    let mut idx: Vec<u32> = (0..n as u32).collect();
    if k < n {
        let by_magnitude = |a: &u32, b: &u32| {
            delta[*b as usize]
                .abs()
                .total_cmp(&delta[*a as usize].abs())
                .then(a.cmp(b))
        };
        idx.select_nth_unstable_by(k - 1, by_magnitude);
        idx.truncate(k);
        idx.sort_unstable();
    }
    idx
}

/// Decodes a payload into the dense f32 delta. Refuses deltas longer than `max_len` before allocating, and
/// any malformed payload with an error.
pub fn decode_delta(bytes: &[u8], max_len: usize) -> Result<Vec<f32>, CodecError> {
    let header = DeltaHeader::parse(bytes)?;
    if header.len > max_len {
        return Err(CodecError::TooLong {
            len: header.len,
            max: max_len,
        });
    }
    let mut at = DELTA_HEADER_LEN;
    let indices = if header.sparse {
        let raw = &bytes[at..at + 4 * header.nnz];
        at += 4 * header.nnz;
        let mut prev: Option<u32> = None;
        let mut idx = Vec::with_capacity(header.nnz);
        for (position, c) in raw.chunks_exact(4).enumerate() {
            let index = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if index as usize >= header.len || prev.is_some_and(|p| index <= p) {
                return Err(CodecError::BadIndex { position, index });
            }
            prev = Some(index);
            idx.push(index);
        }
        Some(idx)
    } else {
        None
    };
    let scale_bytes = header.blocks() * scale_len(header.scale);
    let scales = &bytes[at..at + scale_bytes];
    let codes = &bytes[at + scale_bytes..];
    let mut stored = Vec::with_capacity(header.nnz);
    for (block, chunk) in codes.chunks(header.block_size).enumerate() {
        let scale = match header.scale {
            ScaleFormat::F32 => f32::from_le_bytes([
                scales[4 * block],
                scales[4 * block + 1],
                scales[4 * block + 2],
                scales[4 * block + 3],
            ]),
            ScaleFormat::PowerOfTwo => {
                let e = scales[block] as i8;
                if e < -126 {
                    return Err(CodecError::BadValue { block });
                }
                pow2(e)
            }
        };
        if !scale.is_finite() || scale < 0.0 {
            return Err(CodecError::BadValue { block });
        }
        for &code in chunk {
            let q = E4M3::from_bits(code).to_f32();
            let v = q * scale;
            if !v.is_finite() {
                return Err(CodecError::BadValue { block });
            }
            stored.push(v);
        }
    }
    Ok(match indices {
        None => stored,
        Some(idx) => {
            let mut dense = vec![0.0f32; header.len];
            for (&i, v) in idx.iter().zip(stored) {
                dense[i as usize] = v;
            }
            dense
        }
    })
}

/// A sender's encoder with error feedback: it keeps the residual (what the receiver did not get) and adds
/// it to the next delta, so top-k's dropped values and FP8's rounding are delayed, not lost.
#[derive(Debug, Clone)]
pub struct DeltaEncoder {
    options: CodecOptions,
    residual: Vec<f32>,
}

impl DeltaEncoder {
    /// An encoder with no residual yet.
    pub fn new(options: CodecOptions) -> Result<DeltaEncoder, CodecError> {
        options
            .check()
            .map_err(|e| CodecError::BadOptions(e.to_string()))?;
        Ok(DeltaEncoder {
            options,
            residual: Vec::new(),
        })
    }

    /// The options in use.
    pub fn options(&self) -> &CodecOptions {
        &self.options
    }

    /// An encoder that goes on from a residual kept earlier (e.g. one stored with the shard across a restart):
    /// the next [`DeltaEncoder::encode`] adds it to its delta, whose length must then be `residual.len()`. An
    /// empty residual is the same as [`DeltaEncoder::new`].
    pub fn from_residual(
        options: CodecOptions,
        residual: Vec<f32>,
    ) -> Result<DeltaEncoder, CodecError> {
        let mut encoder = DeltaEncoder::new(options)?;
        check_values(&residual)?;
        encoder.residual = residual;
        Ok(encoder)
    }

    /// The residual carried into the next round (empty before the first): what the receivers have not got
    /// yet, top-k's dropped values plus quantization error. Persist it with the shard to keep it across a
    /// restart, and give it back through [`DeltaEncoder::from_residual`].
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Encodes `delta + residual` and keeps the new residual. The length must stay the same across rounds.
    pub fn encode(&mut self, delta: &[f32]) -> Result<Vec<u8>, CodecError> {
        if self.residual.is_empty() {
            self.residual = vec![0.0; delta.len()];
        } else if self.residual.len() != delta.len() {
            return Err(CodecError::LengthChanged {
                expected: self.residual.len(),
                got: delta.len(),
            });
        }
        let corrected: Vec<f32> = delta
            .iter()
            .zip(&self.residual)
            .map(|(d, r)| d + r)
            .collect();
        let payload = encode_delta(&corrected, &self.options)?;
        let sent = decode_delta(&payload, corrected.len())?;
        for ((r, c), s) in self.residual.iter_mut().zip(&corrected).zip(&sent) {
            *r = c - s;
        }
        Ok(payload)
    }
}
