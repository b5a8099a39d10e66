//! E4M3 and E5M2 conversions, bit for bit against reference vectors generated with ml_dtypes 0.6.0 (copied
//! into `tests/data/fp8/`): decode of all 256 codes of both formats, and ~7000 encode cases (round to
//! nearest even, saturating). For NaN inputs any NaN code of the format is accepted.

use mana_kernels::KernelError;
use mana_kernels::fp8::{E4M3, E5M2};

const DECODE_E4M3: &str = include_str!("data/fp8/decode_e4m3fn.tsv");
const DECODE_E5M2: &str = include_str!("data/fp8/decode_e5m2.tsv");
const ENCODE: &str = include_str!("data/fp8/encode_cases.tsv");

fn hex(s: &str) -> u32 {
    u32::from_str_radix(s.trim_start_matches("0x"), 16).expect("vector files hold hex numbers")
}

/// Rows of a TSV vector file, comment lines skipped, as columns of hex numbers.
fn rows(text: &str, columns: usize) -> Vec<Vec<u32>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split('\t').take(columns).map(hex).collect())
        .collect()
}

#[test]
fn decode_all_codes_bit_exact() {
    for (name, text, decode) in [
        (
            "e4m3",
            DECODE_E4M3,
            (|c: u8| E4M3::from_bits(c).to_f32()) as fn(u8) -> f32,
        ),
        ("e5m2", DECODE_E5M2, |c: u8| E5M2::from_bits(c).to_f32()),
    ] {
        let rows = rows(text, 2);
        assert_eq!(rows.len(), 256, "{name}: one row per code");
        for r in rows {
            let code = u8::try_from(r[0]).expect("codes are bytes");
            assert_eq!(decode(code).to_bits(), r[1], "{name} code {code:#04x}");
        }
    }
}

#[test]
fn decode_slice_equals_scalar_decode() {
    let codes: Vec<u8> = (0..=255).collect();
    let mut out = vec![0.0f32; 256];
    E4M3::decode_slice(E4M3::slice_from_bits(&codes), &mut out).expect("same length");
    for (c, v) in codes.iter().zip(&out) {
        assert_eq!(v.to_bits(), E4M3::from_bits(*c).to_f32().to_bits());
    }
    E5M2::decode_slice(E5M2::slice_from_bits(&codes), &mut out).expect("same length");
    for (c, v) in codes.iter().zip(&out) {
        assert_eq!(v.to_bits(), E5M2::from_bits(*c).to_f32().to_bits());
    }
}

#[test]
fn encode_reference_cases_scalar_and_slice() {
    let rows = rows(ENCODE, 3);
    assert!(
        rows.len() > 7000,
        "expected the full encode vector set, got {}",
        rows.len()
    );
    let inputs: Vec<f32> = rows.iter().map(|r| f32::from_bits(r[0])).collect();
    let mut e4 = vec![E4M3::ZERO; inputs.len()];
    let mut e5 = vec![E5M2::ZERO; inputs.len()];
    E4M3::encode_slice(&inputs, &mut e4).expect("same length");
    E5M2::encode_slice(&inputs, &mut e5).expect("same length");
    for (i, r) in rows.iter().enumerate() {
        let x = inputs[i];
        let (s4, s5) = (E4M3::from_f32(x), E5M2::from_f32(x));
        assert_eq!(s4, e4[i], "slice and scalar E4M3 differ for {x:e}");
        assert_eq!(s5, e5[i], "slice and scalar E5M2 differ for {x:e}");
        if x.is_nan() {
            assert!(
                s4.is_nan(),
                "E4M3 of NaN {:#x} must be NaN, got {:#04x}",
                r[0],
                s4.to_bits()
            );
            assert!(
                s5.is_nan(),
                "E5M2 of NaN {:#x} must be NaN, got {:#04x}",
                r[0],
                s5.to_bits()
            );
        } else {
            assert_eq!(s4.to_bits() as u32, r[1], "E4M3 of {:#010x} ({x:e})", r[0]);
            assert_eq!(s5.to_bits() as u32, r[2], "E5M2 of {:#010x} ({x:e})", r[0]);
        }
    }
}

#[test]
fn saturation_and_special_values() {
    assert_eq!(E4M3::from_f32(1e30), E4M3::MAX);
    assert_eq!(E4M3::from_f32(f32::INFINITY), E4M3::MAX);
    assert_eq!(E4M3::from_f32(f32::NEG_INFINITY), E4M3::MIN);
    assert_eq!(E4M3::from_f32(464.0), E4M3::MAX); // tie between 448 and 480: even mantissa is 448
    assert_eq!(E4M3::from_f32(-0.0).to_bits(), 0x80);
    assert_eq!(E5M2::from_f32(f32::INFINITY), E5M2::MAX);
    assert_eq!(E5M2::from_f32(-1e9).to_f32(), -57344.0);
    assert!(E4M3::from_f32(f32::NAN).is_nan());
    assert!(E5M2::from_f32(-f32::NAN).is_nan());
    assert!(E5M2::from_bits(0x7C).is_infinite() && !E5M2::MAX.is_infinite());
}

#[test]
fn every_finite_code_round_trips() {
    for c in 0..=255u8 {
        let v = E4M3::from_bits(c);
        if !v.is_nan() {
            assert_eq!(E4M3::from_f32(v.to_f32()), v, "E4M3 {c:#04x}");
        }
        let w = E5M2::from_bits(c);
        if !w.is_nan() && !w.is_infinite() {
            assert_eq!(E5M2::from_f32(w.to_f32()), w, "E5M2 {c:#04x}");
        }
    }
}

#[test]
fn slice_length_mismatch_is_an_error() {
    let mut out = [E4M3::ZERO; 3];
    assert!(matches!(
        E4M3::encode_slice(&[1.0; 4], &mut out),
        Err(KernelError::ShapeMismatch { .. })
    ));
    let mut f = [0.0f32; 2];
    assert!(matches!(
        E5M2::decode_slice(&[E5M2::ZERO; 3], &mut f),
        Err(KernelError::ShapeMismatch { .. })
    ));
}

#[test]
fn byte_views_round_trip() {
    let codes = [E4M3::MAX, E4M3::NAN, E4M3::from_bits(0x12)];
    let bytes = E4M3::slice_as_bits(&codes);
    assert_eq!(bytes, &[0x7E, 0x7F, 0x12]);
    assert_eq!(E4M3::slice_from_bits(bytes), &codes);
}

/// An independent, slow encoder: binary search over the decoded positive codes (which increase with the
/// code), nearest value wins, a tie goes to the even code (the code's lowest bit is the mantissa's lowest
/// bit), beyond max saturates.
fn reference_encode(x: f32, decode: impl Fn(u8) -> f32, max_code: u8) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= decode(max_code) {
        return sign | max_code;
    }
    // Largest code whose value is <= a.
    let (mut lo, mut hi) = (0u8, max_code);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if decode(mid) <= a { lo = mid } else { hi = mid }
    }
    let (below, above) = (a - decode(lo), decode(hi) - a);
    let code = if below < above || (below == above && lo % 2 == 0) {
        lo
    } else {
        hi
    };
    sign | code
}

#[test]
fn encode_matches_an_independent_encoder_on_17_million_inputs() {
    let dec4 = |c: u8| E4M3::from_bits(c).to_f32();
    let dec5 = |c: u8| E5M2::from_bits(c).to_f32();
    let mut checked = 0u64;
    // Every 251st f32 bit pattern (251 is prime, so every exponent/mantissa pattern class is visited).
    for bits in (0..=u32::MAX).step_by(251) {
        let x = f32::from_bits(bits);
        if x.is_nan() {
            continue;
        }
        assert_eq!(
            E4M3::from_f32(x).to_bits(),
            reference_encode(x, dec4, 0x7E),
            "E4M3 of {bits:#010x}"
        );
        assert_eq!(
            E5M2::from_f32(x).to_bits(),
            reference_encode(x, dec5, 0x7B),
            "E5M2 of {bits:#010x}"
        );
        checked += 1;
    }
    assert!(checked > 16_000_000);
}
