//! The two OCP 8-bit float formats, written by hand and checked bit for bit against reference vectors.
//!
//! - [`E4M3`] ("E4M3FN"): 1 sign, 4 exponent (bias 7), 3 mantissa bits. Max ±448, no infinity, NaN only at
//!   `0x7F`/`0xFF`. DeepSeek-V3 uses it for every GEMM input.
//! - [`E5M2`]: 1 sign, 5 exponent (bias 15), 2 mantissa bits. Max ±57344, infinities at `0x7C`/`0xFC`, NaN
//!   at `0x7D..=0x7F` and `0xFD..=0xFF`. Kept for gradients or wire formats that want range over precision.
//!
//! Encoding (`from_f32`) rounds to nearest, ties to even, and SATURATES: a finite value beyond the range and
//! ±infinity become ±max (CUDA's `__NV_SATFINITE`); NaN stays NaN. Decoding is a 256-entry table built at
//! compile time. The slice encoders are branch-free per element so the compiler can vectorise them.
//!
//! How the encoder works (E4M3; E5M2 is the same with its constants): on the f32 bit pattern, clamp |x| to
//! max first (rounding is monotonic, so clamping and then rounding equals rounding and then saturating).
//! - Normal range (|x| ≥ 2^-6): add `0x7FFFF + lsb` to the bits and shift out the 20 low mantissa bits. This
//!   is round-to-nearest-even on the 3 kept bits, and a carry rolls into the exponent as it should; the
//!   exponent bias is then moved from 127 to 7.
//! - Subnormal range: add 2^14 as an f32. The sum's ulp is 2^-9, the E4M3 subnormal step, so the FPU's own
//!   ties-to-even rounding yields the code in the low mantissa bits (a result of 8 is code 0x08, the smallest
//!   normal, which is also correct).

use crate::error::KernelError;
use crate::simd::multiversion;

/// Largest finite E4M3 value; the amax of a quantization tile is mapped onto it.
pub const E4M3_MAX: f32 = 448.0;
/// Largest finite E5M2 value.
pub const E5M2_MAX: f32 = 57344.0;

/// An OCP FP8 E4M3FN number (bias 7, max 448, no infinities). Equality is bitwise: `+0 != -0` and a NaN
/// equals itself, because these are storage codes, not arithmetic values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct E4M3(u8);

/// An OCP FP8 E5M2 number (bias 15, max 57344, with infinities). Equality is bitwise, as for [`E4M3`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct E5M2(u8);

// The slice casts below rely on these being exactly one byte.
const _: () = assert!(core::mem::size_of::<E4M3>() == 1 && core::mem::align_of::<E4M3>() == 1);
const _: () = assert!(core::mem::size_of::<E5M2>() == 1 && core::mem::align_of::<E5M2>() == 1);

/// Builds the f32 bit pattern of an FP8 code, for the compile-time decode tables.
/// `mbits`: mantissa bits; `bias`: exponent bias; `has_inf`: whether the all-ones exponent means inf/NaN
/// (E5M2) or only the all-ones code is NaN (E4M3FN).
const fn decode_bits(code: u8, mbits: u32, bias: i32, has_inf: bool) -> u32 {
    let sign = ((code as u32) >> 7) << 31;
    let ebits = 7 - mbits;
    let exp = ((code as u32) >> mbits) & ((1 << ebits) - 1);
    let mant = (code as u32) & ((1 << mbits) - 1);
    let exp_all_ones = exp == (1 << ebits) - 1;
    if has_inf && exp_all_ones {
        return if mant == 0 {
            sign | 0x7F80_0000
        } else {
            sign | 0x7FC0_0000
        };
    }
    if !has_inf && exp_all_ones && mant == (1 << mbits) - 1 {
        return sign | 0x7FC0_0000;
    }
    if exp == 0 {
        if mant == 0 {
            return sign;
        }
        // Subnormal: mant · 2^(1 - bias - mbits). Normalise around the highest set bit p.
        let p = 31 - mant.leading_zeros();
        let fexp = (p as i32 + 1 - bias - mbits as i32 + 127) as u32;
        let fmant = (mant - (1 << p)) << (23 - p);
        return sign | (fexp << 23) | fmant;
    }
    let fexp = (exp as i32 - bias + 127) as u32;
    sign | (fexp << 23) | (mant << (23 - mbits))
}

const fn build_table(mbits: u32, bias: i32, has_inf: bool) -> [f32; 256] {
    let mut table = [0.0f32; 256];
    let mut code = 0usize;
    while code < 256 {
        table[code] = f32::from_bits(decode_bits(code as u8, mbits, bias, has_inf));
        code += 1;
    }
    table
}

/// f32 value of every E4M3 code, indexed by the code.
static E4M3_TABLE: [f32; 256] = build_table(3, 7, false);
/// f32 value of every E5M2 code, indexed by the code.
static E5M2_TABLE: [f32; 256] = build_table(2, 15, true);

/// Encodes one f32 as an E4M3 code; branch-free so that slice loops vectorise. See the module doc.
#[inline(always)]
fn encode_e4m3(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = (bits >> 24) & 0x80;
    let abs = bits & 0x7FFF_FFFF;
    let is_nan = abs > 0x7F80_0000;
    let a = abs.min(0x43E0_0000); // 448.0: saturate (inf included) before rounding.
    let normal = (a + 0x7_FFFF + ((a >> 20) & 1)) >> 20;
    let normal = normal.wrapping_sub(120 << 3); // bias 127 -> 7
    let sub = (f32::from_bits(a) + 16384.0).to_bits() - 0x4680_0000; // 16384.0 = 0x46800000
    let mag = if a >= 0x3C80_0000 { normal } else { sub }; // 2^-6: smallest normal
    let code = if is_nan { 0x7F } else { mag };
    (code | sign) as u8
}

/// Encodes one f32 as an E5M2 code; branch-free so that slice loops vectorise. See the module doc.
#[inline(always)]
fn encode_e5m2(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = (bits >> 24) & 0x80;
    let abs = bits & 0x7FFF_FFFF;
    let is_nan = abs > 0x7F80_0000;
    let a = abs.min(0x4760_0000); // 57344.0: saturate (inf included) before rounding.
    let normal = (a + 0xF_FFFF + ((a >> 21) & 1)) >> 21;
    let normal = normal.wrapping_sub(112 << 2); // bias 127 -> 15
    let sub = (f32::from_bits(a) + 128.0).to_bits() - 0x4300_0000; // 128.0 = 0x43000000, ulp 2^-16
    let mag = if a >= 0x3880_0000 { normal } else { sub }; // 2^-14: smallest normal
    let code = if is_nan { 0x7E } else { mag };
    (code | sign) as u8
}

/// Rounds an f32 to the nearest E4M3 value (ties to even, saturating), returned as f32, without going
/// through the code. Used by fused quantize-dequantize loops; equal to `E4M3::from_f32(x).to_f32()` for
/// every non-NaN input (tested over all reference vectors).
#[inline(always)]
pub(crate) fn round_to_e4m3(x: f32) -> f32 {
    let bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    let a = (bits & 0x7FFF_FFFF).min(0x43E0_0000);
    // Normal: round-to-nearest-even on the top 3 mantissa bits, directly in f32 bits.
    let normal = (a + 0x7_FFFF + ((a >> 20) & 1)) & !0xF_FFFF;
    // Subnormal: the f32 add rounds to a multiple of 2^-9; subtracting 2^14 back is exact.
    let sub = ((f32::from_bits(a) + 16384.0) - 16384.0).to_bits();
    let mag = if a >= 0x3C80_0000 { normal } else { sub };
    f32::from_bits(mag | sign)
}

/// Operations shared by the two FP8 formats, so generic code (quantizers, tests) can take either.
pub trait Fp8Format: Copy + Send + Sync + 'static {
    /// Largest finite value.
    const MAX_F32: f32;
    /// Format name as used in files and logs (`"e4m3"`, `"e5m2"`).
    const NAME: &'static str;
    /// Nearest code, ties to even, saturating at ±max; NaN stays NaN.
    fn from_f32(x: f32) -> Self;
    /// Exact f32 value of the code.
    fn to_f32(self) -> f32;
    /// Wraps a raw code.
    fn from_bits(bits: u8) -> Self;
    /// The raw code.
    fn to_bits(self) -> u8;
}

macro_rules! fp8_impl {
    ($ty:ident, $encode:ident, $table:ident, $max:expr, $max_bits:expr, $min_pos_bits:expr, $name:expr) => {
        impl $ty {
            /// Largest finite value.
            pub const MAX: Self = Self($max_bits);
            /// Most negative finite value.
            pub const MIN: Self = Self($max_bits | 0x80);
            /// Smallest positive normal value.
            pub const MIN_POSITIVE: Self = Self($min_pos_bits);
            /// Positive zero.
            pub const ZERO: Self = Self(0);

            /// Nearest code to `x`, ties to even, saturating: finite overflow and ±inf give ±max; NaN
            /// gives a NaN code.
            #[inline(always)]
            pub fn from_f32(x: f32) -> Self {
                Self($encode(x))
            }

            /// Exact f32 value of this code (a table lookup).
            #[inline(always)]
            pub fn to_f32(self) -> f32 {
                $table[self.0 as usize]
            }

            /// Wraps a raw code; every byte is a valid code.
            #[inline]
            pub const fn from_bits(bits: u8) -> Self {
                Self(bits)
            }

            /// The raw code.
            #[inline]
            pub const fn to_bits(self) -> u8 {
                self.0
            }

            /// Whether this code is a NaN.
            #[inline]
            pub fn is_nan(self) -> bool {
                self.to_f32().is_nan()
            }

            /// Encodes `src` into `dst` element by element (the same rounding as [`Self::from_f32`]), in a
            /// loop the compiler vectorises. Lengths must match.
            pub fn encode_slice(src: &[f32], dst: &mut [Self]) -> Result<(), KernelError> {
                check_len(concat!($name, "::encode_slice"), src.len(), dst.len())?;
                encode_into(src, dst);
                Ok(())
            }

            /// Decodes `src` into `dst` by table lookup. Lengths must match.
            pub fn decode_slice(src: &[Self], dst: &mut [f32]) -> Result<(), KernelError> {
                check_len(concat!($name, "::decode_slice"), src.len(), dst.len())?;
                decode_into(src, dst);
                Ok(())
            }

            /// Views codes as raw bytes (for storage and the wire) without copying.
            pub fn slice_as_bits(codes: &[Self]) -> &[u8] {
                // SAFETY: `Self` is `repr(transparent)` over `u8` (size and alignment 1, asserted above),
                // so a slice of it has exactly the layout of a `u8` slice of the same length.
                unsafe { core::slice::from_raw_parts(codes.as_ptr().cast::<u8>(), codes.len()) }
            }

            /// Views raw bytes as codes without copying; every byte is a valid code.
            pub fn slice_from_bits(bits: &[u8]) -> &[Self] {
                // SAFETY: as in `slice_as_bits`; every `u8` value is a valid `Self`.
                unsafe { core::slice::from_raw_parts(bits.as_ptr().cast::<Self>(), bits.len()) }
            }
        }

        impl Fp8Format for $ty {
            const MAX_F32: f32 = $max;
            const NAME: &'static str = $name;
            #[inline(always)]
            fn from_f32(x: f32) -> Self {
                Self::from_f32(x)
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                Self::to_f32(self)
            }
            #[inline]
            fn from_bits(bits: u8) -> Self {
                Self::from_bits(bits)
            }
            #[inline]
            fn to_bits(self) -> u8 {
                Self::to_bits(self)
            }
        }

        impl From<$ty> for f32 {
            fn from(v: $ty) -> f32 {
                v.to_f32()
            }
        }
    };
}

fp8_impl!(E4M3, encode_e4m3, E4M3_TABLE, E4M3_MAX, 0x7E, 0x08, "E4M3");
fp8_impl!(E5M2, encode_e5m2, E5M2_TABLE, E5M2_MAX, 0x7B, 0x04, "E5M2");

impl E4M3 {
    /// The canonical NaN code (`0x7F`).
    pub const NAN: Self = Self(0x7F);
}

impl E5M2 {
    /// Positive infinity (`0x7C`); `from_f32` never produces it (it saturates), but decoding accepts it.
    pub const INFINITY: Self = Self(0x7C);
    /// Negative infinity (`0xFC`).
    pub const NEG_INFINITY: Self = Self(0xFC);
    /// The canonical NaN code (`0x7E`).
    pub const NAN: Self = Self(0x7E);

    /// Whether this code is ±infinity.
    pub fn is_infinite(self) -> bool {
        self.0 & 0x7F == 0x7C
    }
}

#[inline(always)]
fn encode_kernel<F: Fp8Format>(src: &[f32], dst: &mut [F]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = F::from_f32(s);
    }
}

#[inline(always)]
fn decode_kernel<F: Fp8Format>(src: &[F], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

multiversion! {
    /// Encodes element-wise (lengths checked by the caller), vectorised for the running CPU.
    fn encode_into<F: Fp8Format>(src: &[f32], dst: &mut [F]) -> () = encode_kernel;
}

multiversion! {
    /// Decodes element-wise by table lookup (lengths checked by the caller).
    fn decode_into<F: Fp8Format>(src: &[F], dst: &mut [f32]) -> () = decode_kernel;
}

fn check_len(op: &'static str, src: usize, dst: usize) -> Result<(), KernelError> {
    if src == dst {
        Ok(())
    } else {
        Err(KernelError::ShapeMismatch {
            op,
            what: "dst",
            expected: src,
            actual: dst,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_decode_to_their_values() {
        assert_eq!(E4M3::MAX.to_f32(), 448.0);
        assert_eq!(E4M3::MIN.to_f32(), -448.0);
        assert_eq!(E4M3::MIN_POSITIVE.to_f32(), 2f32.powi(-6));
        assert!(E4M3::NAN.is_nan());
        assert_eq!(E5M2::MAX.to_f32(), 57344.0);
        assert_eq!(E5M2::MIN_POSITIVE.to_f32(), 2f32.powi(-14));
        assert_eq!(E5M2::INFINITY.to_f32(), f32::INFINITY);
        assert!(E5M2::NEG_INFINITY.is_infinite());
        assert!(E5M2::NAN.is_nan());
    }

    #[test]
    fn fused_rounding_matches_encode_decode_on_the_reference_inputs() {
        let text = include_str!("../tests/data/fp8/encode_cases.tsv");
        let mut n = 0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let first = line
                .split('\t')
                .next()
                .expect("split yields at least one field");
            let bits = u32::from_str_radix(first.trim_start_matches("0x"), 16)
                .expect("vector inputs are hex");
            let x = f32::from_bits(bits);
            if x.is_nan() {
                continue;
            }
            assert_eq!(
                round_to_e4m3(x).to_bits(),
                E4M3::from_f32(x).to_f32().to_bits(),
                "x = {x:e}"
            );
            n += 1;
        }
        assert!(n > 7000);
    }

    #[test]
    fn fused_rounding_matches_encode_decode_on_every_code_neighbourhood() {
        // Every code value and the midpoints and near-midpoints between neighbours.
        for code in 0..=255u8 {
            let v = E4M3::from_bits(code).to_f32();
            if v.is_nan() {
                continue;
            }
            for x in [
                v,
                f32::from_bits(v.to_bits().wrapping_add(1)),
                f32::from_bits(v.to_bits().wrapping_sub(1)),
            ] {
                if x.is_nan() {
                    continue;
                }
                assert_eq!(
                    round_to_e4m3(x).to_bits(),
                    E4M3::from_f32(x).to_f32().to_bits(),
                    "x = {x:e}"
                );
            }
        }
    }
}
