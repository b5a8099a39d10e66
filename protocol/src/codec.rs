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
//!
//! ## Version 2: per-block top-k with low-bit values (SparseLoCo)
//!
//! The dense delta is cut into blocks of `block` positions (the last one may be shorter), and each block
//! keeps its own `k` largest-magnitude values (`min(k, positions)` in a short last block; ties broken by the
//! lower position), so the choice is deterministic and spread over the whole shard. Each block has one scale;
//! each kept value is stored as its position inside the block (`log2(block)` bits: 7 or 8) and a code of 2,
//! 4 or 8 bits. With `k == block` every value is kept and no positions are stored (dense low-bit).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `MDLT` |
//! | 4 | 1 | version, 2 |
//! | 5 | 1 | flags: bit 1 power-of-two scales, others 0 |
//! | 6 | 2 | block size, u16: 128 or 256 |
//! | 8 | 4 | `len`, u32: values in the dense delta |
//! | 12 | 2 | `k`, u16: values kept per block, `1..=block` |
//! | 14 | 1 | value bits: 2 (int2), 4 (int4) or 8 (E4M3) |
//! | 15 | 1 | reserved, 0 |
//! | 16 | 4 or 1 per block | one scale per block of positions (`ceil(len/block)` blocks): f32, or i8 exponent `e` for 2^e |
//! | … | `ceil(nnz·p/8)` | positions, `p = log2(block)` bits each, strictly increasing within each block; absent when `k == block` |
//! | … | `ceil(nnz·b/8)` | value codes, `b` bits each |
//!
//! `nnz` is `k` per full block plus `min(k, len mod block)`. Both bit sections are read least-significant bit
//! first: field `j` of width `w` is bits `j·w .. (j+1)·w` of the section read as one little-endian integer;
//! the padding bits at the end of a section are 0. Codes, with `s` the block's scale:
//! - int2: bit 1 sign, bit 0 level: `±s·0.85` or `±s·1.3`; the encoder's scale is the mean |value| of
//!   the block's kept values (better than levels `{amax/2, amax}` at every density we tried, see
//!   [`INT2_LEVELS`]);
//! - int4: bit 3 sign, bits 0..2 `m`: `±s·(m+1)/8`; the encoder's scale is the kept values' amax;
//! - E4M3: `e4m3(code)·s`, scale amax/448 as in version 1.

use mana_kernels::fp8::E4M3;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::limits::MAX_DELTA_VALUES;

/// First bytes of every delta payload.
pub const DELTA_MAGIC: [u8; 4] = *b"MDLT";
/// Version of the payload layout of dense and globally top-k FP8 deltas.
pub const DELTA_VERSION: u8 = 1;
/// Version of the per-block top-k layout with low-bit values (see the module doc); written whenever
/// [`CodecOptions::uses_blocks`] is true.
pub const DELTA_VERSION_BLOCKS: u8 = 2;
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

/// How each stored value is quantized: FP8, or the 4- and 2-bit codes of SparseLoCo-style pseudo-gradients,
/// which cost a quarter or an eighth of FP8's byte (error feedback recovers what they round off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueFormat {
    /// FP8 E4M3, 8 bits, the block's amax mapped to 448.
    Fp8,
    /// Sign and 3 magnitude bits: `±s·(m+1)/8`, `s` the block's amax of the kept values.
    Int4,
    /// Sign and 1 magnitude bit: `±s·0.85` or `±s·1.3`, `s` the mean magnitude of the kept values.
    Int2,
}

impl ValueFormat {
    /// Bits per stored value.
    pub fn bits(self) -> u32 {
        match self {
            ValueFormat::Fp8 => 8,
            ValueFormat::Int4 => 4,
            ValueFormat::Int2 => 2,
        }
    }

    fn from_bits(bits: u8) -> Option<ValueFormat> {
        match bits {
            8 => Some(ValueFormat::Fp8),
            4 => Some(ValueFormat::Int4),
            2 => Some(ValueFormat::Int2),
            _ => None,
        }
    }
}

/// How a delta is encoded; chosen by the coordinator in each round's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CodecOptions {
    /// Values per scale: 128 or 256.
    pub block_size: u16,
    /// How scales are stored.
    pub scale: ScaleFormat,
    /// `Some(d)`: keep only the largest-magnitude values (`0 < d <= 1`): `ceil(d * len)` over the whole delta,
    /// or `ceil(d * block_size)` in each block with [`CodecOptions::top_k_per_block`]; `None`: dense.
    pub top_k_density: Option<f32>,
    /// How each stored value is quantized. `Int4` needs per-block top-k or no top-k at all (dense int4);
    /// `Int2` needs per-block top-k.
    pub values: ValueFormat,
    /// Top-k is taken in each block of `block_size` positions rather than over the whole delta (version 2
    /// layout: 7- or 8-bit positions instead of 32-bit indices, and the kept values spread over the shard).
    pub top_k_per_block: bool,
}

impl Default for CodecOptions {
    fn default() -> Self {
        CodecOptions {
            block_size: 128,
            scale: ScaleFormat::F32,
            top_k_density: None,
            values: ValueFormat::Fp8,
            top_k_per_block: false,
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
        if self.top_k_per_block && self.top_k_density.is_none() {
            return Err(bad("per-block top-k needs a top-k density".into()));
        }
        if self.values == ValueFormat::Int2 && self.top_k_density.is_none() {
            // Int2 has no zero level: every value of a dense delta would move by at least 0.85 of the mean.
            return Err(bad("int2 values need top-k".into()));
        }
        if self.values != ValueFormat::Fp8 && self.top_k_density.is_some() && !self.top_k_per_block
        {
            return Err(bad(format!(
                "{:?} values need per-block top-k (or no top-k)",
                self.values
            )));
        }
        Ok(())
    }

    /// Whether these options write the version 2 layout (per-block top-k or low-bit values).
    pub fn uses_blocks(&self) -> bool {
        self.top_k_per_block || self.values != ValueFormat::Fp8
    }

    /// Whether these options describe a SparseLoCo-style sparse low-bit codec (per-block top-k with int2 or
    /// int4 values), the setting in which error feedback takes the place of outer momentum.
    pub fn is_sparse_low_bit(&self) -> bool {
        self.top_k_per_block && self.top_k_density.is_some() && self.values != ValueFormat::Fp8
    }

    /// Values kept per block in the version 2 layout: `ceil(density · block)` in `1..=block`, or the whole
    /// block without top-k.
    pub fn per_block_k(&self) -> usize {
        let block = usize::from(self.block_size);
        match self.top_k_density {
            None => block,
            Some(d) => ((f64::from(d) * block as f64).ceil() as usize).clamp(1, block.max(1)),
        }
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
    /// Whether only some values are stored with their position (top-k).
    pub sparse: bool,
    /// How scales are stored.
    pub scale: ScaleFormat,
    /// Values per scale (version 1: stored values; version 2: positions of the dense delta).
    pub block_size: usize,
    /// Values in the dense delta.
    pub len: usize,
    /// Values stored.
    pub nnz: usize,
    /// How stored values are quantized (always FP8 in version 1).
    pub values: ValueFormat,
    /// Version 2 only: values kept per block of positions (`block_size` when dense); `None` in version 1.
    pub block_k: Option<usize>,
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
        let version = bytes[4];
        if version != DELTA_VERSION && version != DELTA_VERSION_BLOCKS {
            return Err(CodecError::UnsupportedVersion(version));
        }
        let flags = bytes[5];
        let known = if version == DELTA_VERSION {
            FLAG_SPARSE | FLAG_POW2
        } else {
            FLAG_POW2
        };
        if flags & !known != 0 {
            return Err(CodecError::BadHeader(format!("unknown flags {flags:#04x}")));
        }
        let block_size = usize::from(u16::from_le_bytes([bytes[6], bytes[7]]));
        if !matches!(block_size, 128 | 256) {
            return Err(CodecError::BadHeader(format!("block size {block_size}")));
        }
        let len = read_u32(bytes, 8) as usize;
        if len > MAX_DELTA_VALUES {
            return Err(CodecError::TooLong {
                len,
                max: MAX_DELTA_VALUES,
            });
        }
        let scale = if flags & FLAG_POW2 != 0 {
            ScaleFormat::PowerOfTwo
        } else {
            ScaleFormat::F32
        };
        let header = if version == DELTA_VERSION {
            let nnz = read_u32(bytes, 12) as usize;
            let sparse = flags & FLAG_SPARSE != 0;
            if (sparse && nnz > len) || (!sparse && nnz != len) {
                return Err(CodecError::BadHeader(format!(
                    "{nnz} stored values for a delta of {len}"
                )));
            }
            DeltaHeader {
                sparse,
                scale,
                block_size,
                len,
                nnz,
                values: ValueFormat::Fp8,
                block_k: None,
            }
        } else {
            let k = usize::from(u16::from_le_bytes([bytes[12], bytes[13]]));
            if k == 0 || k > block_size {
                return Err(CodecError::BadHeader(format!(
                    "{k} values kept per block of {block_size}"
                )));
            }
            let values = ValueFormat::from_bits(bytes[14])
                .ok_or_else(|| CodecError::BadHeader(format!("{} bits per value", bytes[14])))?;
            if bytes[15] != 0 {
                return Err(CodecError::BadHeader(format!(
                    "reserved byte {:#04x}",
                    bytes[15]
                )));
            }
            DeltaHeader {
                sparse: k < block_size,
                scale,
                block_size,
                len,
                nnz: block_nnz(len, block_size, k),
                values,
                block_k: Some(k),
            }
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
        match self.block_k {
            None => self.nnz.div_ceil(self.block_size),
            Some(_) => self.len.div_ceil(self.block_size),
        }
    }

    /// Total payload length this header implies (no overflow: `nnz <= len <= 2^28`).
    pub fn encoded_len(&self) -> usize {
        let scale_bytes = self.blocks() * scale_len(self.scale);
        match self.block_k {
            None => {
                let index_bytes = if self.sparse { 4 * self.nnz } else { 0 };
                DELTA_HEADER_LEN + index_bytes + scale_bytes + self.nnz
            }
            Some(_) => {
                DELTA_HEADER_LEN
                    + scale_bytes
                    + self.position_bytes()
                    + (self.nnz * self.values.bits() as usize).div_ceil(8)
            }
        }
    }

    /// Version 2: bytes of the position section (0 when dense).
    fn position_bytes(&self) -> usize {
        if self.sparse {
            (self.nnz * position_bits(self.block_size) as usize).div_ceil(8)
        } else {
            0
        }
    }
}

/// Values kept in the version 2 layout: `k` per full block plus `min(k, rest)` in a short last one.
fn block_nnz(len: usize, block: usize, k: usize) -> usize {
    (len / block) * k + (len % block).min(k)
}

/// Bits of a position inside a block: log2(block), 7 or 8.
fn position_bits(block: usize) -> u32 {
    block.trailing_zeros()
}

/// The exact payload length [`encode_delta`] produces for a delta of `len` values under `options`: fixed by
/// the length and the options alone, so a receiver can check an announced size before fetching a byte.
pub fn encoded_len(len: usize, options: &CodecOptions) -> Result<usize, CodecError> {
    Ok(header_for(len, options)?.encoded_len())
}

/// The header [`encode_delta`] writes for a delta of `len` values under `options`: a receiver compares a
/// payload's header with it to hold every sender to the round's codec (same layout, value format, scales,
/// block and density), not merely to its size.
pub fn header_for(len: usize, options: &CodecOptions) -> Result<DeltaHeader, CodecError> {
    options
        .check()
        .map_err(|e| CodecError::BadOptions(e.to_string()))?;
    if len > MAX_DELTA_VALUES {
        return Err(CodecError::TooLong {
            len,
            max: MAX_DELTA_VALUES,
        });
    }
    let block_size = usize::from(options.block_size);
    let header = if options.uses_blocks() {
        let k = options.per_block_k();
        DeltaHeader {
            sparse: k < block_size,
            scale: options.scale,
            block_size,
            len,
            nnz: block_nnz(len, block_size, k),
            values: options.values,
            block_k: Some(k),
        }
    } else {
        DeltaHeader {
            sparse: options.top_k_density.is_some(),
            scale: options.scale,
            block_size,
            len,
            nnz: match options.top_k_density {
                None => len,
                Some(d) => global_k(len, d),
            },
            values: ValueFormat::Fp8,
            block_k: None,
        }
    };
    Ok(header)
}

/// Values kept by global top-k: `ceil(density · len)` in `1..=len` (0 for an empty delta).
fn global_k(len: usize, density: f32) -> usize {
    if len == 0 {
        0
    } else {
        ((f64::from(density) * len as f64).ceil() as usize).clamp(1, len)
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
    if options.uses_blocks() {
        return Ok(encode_blocks(delta, options));
    }
    let indices = options.top_k_density.map(|d| top_k_indices(delta, d));
    let header = DeltaHeader {
        sparse: indices.is_some(),
        scale: options.scale,
        block_size: usize::from(options.block_size),
        len: delta.len(),
        nnz: indices.as_ref().map_or(delta.len(), Vec::len),
        values: ValueFormat::Fp8,
        block_k: None,
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
                let e = pow2_exponent(amax, E4M3_MAX);
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

/// Smallest exponent `e` in [-126, 127] with `amax / 2^e <= target`.
fn pow2_exponent(amax: f32, target: f32) -> i8 {
    if amax <= 0.0 {
        return -126;
    }
    let e = (amax / target).log2().ceil();
    let mut e = e.clamp(-126.0, 127.0) as i32;
    // log2 may be off by one ulp around exact powers of two: settle it exactly.
    while e < 127 && amax / pow2(e as i8) > target {
        e += 1;
    }
    while e > -126 && amax / pow2((e - 1) as i8) <= target {
        e -= 1;
    }
    e as i8
}

/// The exponent `e` in [-126, 127] of the power of two nearest to `x` on a log scale (`x >= 0`), computed
/// from the bits, not with `log2`, so every platform picks the same one.
fn pow2_nearest(x: f32) -> i8 {
    if x < f32::MIN_POSITIVE {
        return -126;
    }
    let floor = ((x.to_bits() >> 23) & 0xff) as i32 - 127;
    let e = if x >= pow2(floor as i8) * std::f32::consts::SQRT_2 {
        floor + 1
    } else {
        floor
    };
    e.clamp(-126, 127) as i8
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
    let k = global_k(n, density);
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
    if header.block_k.is_some() {
        return decode_blocks(bytes, &header);
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
        let scale = read_scale(scales, block, header.scale)?;
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

/// Scale `block` of a scale section; refused unless finite and non-negative (an exponent below -126 too).
fn read_scale(scales: &[u8], block: usize, format: ScaleFormat) -> Result<f32, CodecError> {
    let bad = CodecError::BadValue { block };
    let scale = match format {
        ScaleFormat::F32 => {
            let b = scales.get(4 * block..4 * block + 4).ok_or(bad.clone())?;
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
        ScaleFormat::PowerOfTwo => {
            let e = *scales.get(block).ok_or(bad.clone())? as i8;
            if e < -126 {
                return Err(bad);
            }
            pow2(e)
        }
    };
    if !scale.is_finite() || scale < 0.0 {
        return Err(bad);
    }
    Ok(scale)
}

/// The two magnitudes of an int2 code, relative to the block's scale (the mean |value| of its kept
/// values). Chosen by measuring the relative error of the kept values of per-block top-k (block 128 with
/// k = 2, 4, 7 and block 256 with k = 8) on Gaussian, Laplace, Student-t(3) and Gaussian-times-|Gaussian|
/// values: `{0.85, 1.3}·mean` gives 12-30%, the alternative `{0.5, 1}·amax` 9-33% and worse than the mean
/// levels whenever k >= 4 (the densities we use), so the mean levels are the better of the two.
pub const INT2_LEVELS: [f32; 2] = [0.85, 1.3];

/// Largest int2 scale that keeps `INT2_LEVELS[1] · scale` finite.
const INT2_MAX_SCALE: f32 = f32::MAX / 2.0;

/// Writes the version 2 payload (see the module doc). `delta` is finite and `options` valid.
fn encode_blocks(delta: &[f32], options: &CodecOptions) -> Vec<u8> {
    let block = usize::from(options.block_size);
    let k = options.per_block_k();
    let header = DeltaHeader {
        sparse: k < block,
        scale: options.scale,
        block_size: block,
        len: delta.len(),
        nnz: block_nnz(delta.len(), block, k),
        values: options.values,
        block_k: Some(k),
    };
    let mut out = Vec::with_capacity(header.encoded_len());
    out.extend_from_slice(&DELTA_MAGIC);
    out.push(DELTA_VERSION_BLOCKS);
    out.push(if options.scale == ScaleFormat::PowerOfTwo {
        FLAG_POW2
    } else {
        0
    });
    out.extend_from_slice(&options.block_size.to_le_bytes());
    // len <= MAX_DELTA_VALUES = 2^28 and k <= 256: both fit.
    out.extend_from_slice(&(header.len as u32).to_le_bytes());
    out.extend_from_slice(&(k as u16).to_le_bytes());
    out.push(options.values.bits() as u8);
    out.push(0);
    let pbits = position_bits(block);
    let vbits = options.values.bits();
    let mut positions = BitWriter::with_capacity(header.position_bytes());
    let mut codes = BitWriter::with_capacity((header.nnz * vbits as usize).div_ceil(8));
    let mut order: Vec<u16> = Vec::with_capacity(block);
    let mut kept: Vec<f32> = Vec::with_capacity(k);
    for chunk in delta.chunks(block) {
        let kb = k.min(chunk.len());
        order.clear();
        // Positions fit in u16: block <= 256.
        order.extend(0..chunk.len() as u16);
        if kb < chunk.len() {
            let by_magnitude = |a: &u16, b: &u16| {
                chunk[usize::from(*b)]
                    .abs()
                    .total_cmp(&chunk[usize::from(*a)].abs())
                    .then(a.cmp(b))
            };
            order.select_nth_unstable_by(kb - 1, by_magnitude);
            order.truncate(kb);
            order.sort_unstable();
        }
        kept.clear();
        kept.extend(order.iter().map(|&p| chunk[usize::from(p)]));
        if header.sparse {
            for &p in &order {
                positions.push(u32::from(p), pbits);
            }
        }
        let scale = write_block_scale(&mut out, &kept, options.values, options.scale);
        for &v in &kept {
            codes.push(quantize(v, options.values, scale), vbits);
        }
    }
    out.extend_from_slice(&positions.finish());
    out.extend_from_slice(&codes.finish());
    debug_assert_eq!(out.len(), header.encoded_len());
    out
}

/// Chooses a block's scale for `kept` (finite), appends it to `out` in `format`, and returns the value
/// the decoder will read back (codes are chosen against that one, so a power of two's rounding is
/// accounted for).
fn write_block_scale(
    out: &mut Vec<u8>,
    kept: &[f32],
    values: ValueFormat,
    format: ScaleFormat,
) -> f32 {
    let amax = kept.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    match (values, format) {
        (ValueFormat::Fp8, ScaleFormat::F32) => {
            // Keep the scale normal so that v / scale stays finite for every v in the block.
            let s = (amax / E4M3_MAX).max(f32::MIN_POSITIVE);
            out.extend_from_slice(&s.to_le_bytes());
            s
        }
        (ValueFormat::Int4, ScaleFormat::F32) => {
            out.extend_from_slice(&amax.to_le_bytes());
            amax
        }
        (ValueFormat::Int2, ScaleFormat::F32) => {
            let s = mean_magnitude(kept).min(INT2_MAX_SCALE);
            out.extend_from_slice(&s.to_le_bytes());
            s
        }
        (_, ScaleFormat::PowerOfTwo) => {
            let e = match values {
                ValueFormat::Fp8 => pow2_exponent(amax, E4M3_MAX),
                ValueFormat::Int4 => pow2_exponent(amax, 1.0),
                ValueFormat::Int2 => pow2_nearest(mean_magnitude(kept)),
            };
            out.push(e as u8);
            pow2(e)
        }
    }
}

/// Mean |value| of `kept`, accumulated in f64.
fn mean_magnitude(kept: &[f32]) -> f32 {
    if kept.is_empty() {
        return 0.0;
    }
    (kept.iter().map(|v| f64::from(v.abs())).sum::<f64>() / kept.len() as f64) as f32
}

/// The code of `v` (finite) against `scale`: the nearest of the format's values (see the module doc).
fn quantize(v: f32, values: ValueFormat, scale: f32) -> u32 {
    match values {
        ValueFormat::Fp8 => u32::from(E4M3::from_f32(v / scale).to_bits()),
        ValueFormat::Int4 => {
            let sign = if v < 0.0 { 8 } else { 0 };
            if scale <= 0.0 {
                return sign;
            }
            // Levels (m+1)/8: the nearest is round(8|v|/s) - 1, clamped (an f32 to int cast saturates).
            let m = ((v.abs() / scale * 8.0).round() as i64 - 1).clamp(0, 7) as u32;
            sign | m
        }
        ValueFormat::Int2 => {
            let sign = if v < 0.0 { 2 } else { 0 };
            let threshold = 0.5 * (INT2_LEVELS[0] + INT2_LEVELS[1]) * scale;
            sign | u32::from(v.abs() > threshold)
        }
    }
}

/// The value of `code` against `scale` (NaN for an E4M3 NaN code; the caller refuses non-finite values).
fn dequantize(code: u32, values: ValueFormat, scale: f32) -> f32 {
    let (negative, magnitude) = match values {
        ValueFormat::Fp8 => return E4M3::from_bits(code as u8).to_f32() * scale,
        ValueFormat::Int4 => (code & 8 != 0, ((code & 7) + 1) as f32 / 8.0 * scale),
        ValueFormat::Int2 => (code & 2 != 0, INT2_LEVELS[(code & 1) as usize] * scale),
    };
    if negative { -magnitude } else { magnitude }
}

/// Decodes a version 2 payload whose header `parse` accepted (so the sections have their exact lengths).
fn decode_blocks(bytes: &[u8], header: &DeltaHeader) -> Result<Vec<f32>, CodecError> {
    let block = header.block_size;
    let k = header.block_k.unwrap_or(block);
    let scale_end = DELTA_HEADER_LEN + header.blocks() * scale_len(header.scale);
    let position_end = scale_end + header.position_bytes();
    let truncated = || CodecError::Truncated {
        needed: header.encoded_len(),
        got: bytes.len(),
    };
    let scales = bytes
        .get(DELTA_HEADER_LEN..scale_end)
        .ok_or_else(truncated)?;
    let mut positions = BitReader::new(bytes.get(scale_end..position_end).ok_or_else(truncated)?);
    let mut codes = BitReader::new(bytes.get(position_end..).ok_or_else(truncated)?);
    let (pbits, vbits) = (position_bits(block), header.values.bits());
    let mut dense = vec![0.0f32; header.len];
    for (b, chunk) in dense.chunks_mut(block).enumerate() {
        let scale = read_scale(scales, b, header.scale)?;
        let mut prev: Option<usize> = None;
        for j in 0..k.min(chunk.len()) {
            let p = if header.sparse {
                positions.read(pbits).ok_or_else(truncated)? as usize
            } else {
                j
            };
            if p >= chunk.len() || prev.is_some_and(|q| p <= q) {
                return Err(CodecError::BadIndex {
                    // Both fit: b * k + j < nnz <= 2^28, and b * block + p < len + 256.
                    position: b * k + j,
                    index: (b * block + p) as u32,
                });
            }
            prev = Some(p);
            let v = dequantize(
                codes.read(vbits).ok_or_else(truncated)?,
                header.values,
                scale,
            );
            if !v.is_finite() {
                return Err(CodecError::BadValue { block: b });
            }
            chunk[p] = v;
        }
    }
    if !positions.rest_is_zero() || !codes.rest_is_zero() {
        return Err(CodecError::BadHeader("non-zero padding bits".into()));
    }
    Ok(dense)
}

/// Packs fields of up to 32 bits, least-significant bit first (see the module doc).
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    bits: u32,
}

impl BitWriter {
    fn with_capacity(bytes: usize) -> BitWriter {
        BitWriter {
            out: Vec::with_capacity(bytes),
            acc: 0,
            bits: 0,
        }
    }

    /// Appends the low `width` bits of `value` (`width <= 32`).
    fn push(&mut self, value: u32, width: u32) {
        self.acc |= u64::from(value & mask(width)) << self.bits;
        self.bits += width;
        while self.bits >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.bits -= 8;
        }
    }

    /// The bytes, the last one padded with zero bits.
    fn finish(mut self) -> Vec<u8> {
        if self.bits > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// Reads what [`BitWriter`] packs; `None` past the end instead of a panic.
struct BitReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> BitReader<'a> {
        BitReader { bytes, at: 0 }
    }

    /// The next `width` bits (`width <= 32`).
    fn read(&mut self, width: u32) -> Option<u32> {
        let mut value = 0u32;
        let mut got = 0u32;
        while got < width {
            let byte = *self.bytes.get(self.at / 8)?;
            let offset = (self.at % 8) as u32;
            let take = (8 - offset).min(width - got);
            value |= ((u32::from(byte) >> offset) & mask(take)) << got;
            got += take;
            self.at += take as usize;
        }
        Some(value)
    }

    /// Whether every bit not read yet is 0 (the padding of the last byte).
    fn rest_is_zero(&self) -> bool {
        let first = self.at / 8;
        let offset = self.at % 8;
        match self.bytes.get(first) {
            None => true,
            Some(&b) if offset > 0 => {
                (b >> offset) == 0 && self.bytes[first + 1..].iter().all(|&b| b == 0)
            }
            Some(_) => self.bytes[first..].iter().all(|&b| b == 0),
        }
    }
}

/// The low `width` bits set (`width <= 32`).
fn mask(width: u32) -> u32 {
    if width >= 32 {
        u32::MAX
    } else {
        (1u32 << width) - 1
    }
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

    /// Takes the residual out, leaving the encoder as new.
    pub fn into_residual(self) -> Vec<f32> {
        self.residual
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
