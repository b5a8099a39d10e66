//! Dense tensors of an expert call ([`crate::ExpertRequest`], [`crate::ExpertResponse`]): hidden states going
//! to an expert and its outputs coming back, in one of three element encodings.
//!
//! - [`TensorDtype::F32`], exact.
//! - [`TensorDtype::Bf16`], the top 16 bits of an f32, rounded to nearest, ties to even (8 significant bits).
//! - [`TensorDtype::E4m3Tile128`], E4M3 codes with one f32 scale per 1×128 tile along the last dimension,
//!   `s = amax / 448`: the activation quantization of DeepSeek-V3's dispatch and of the model's own FP8
//!   GEMMs ([`mana_kernels::quant`], whose quantizer and E4M3 code this uses). A quarter of f32's bytes,
//!   plus 4 bytes per 128 values.
//!
//! Shapes: the last dimension is C (columns), the product of the others R (rows); a rank-0 tensor is one
//! row of one column. Decoding checks every bound before anything is allocated from the numbers in it: the
//! rank and element count, the data length the shape and dtype imply, and for E4M3 that no code is a NaN
//! and every scale is finite and positive.

use mana_kernels::fp8::E4M3;
use mana_kernels::quant::{Granularity, QuantizedTensor, ScaleMode};
use serde::{Deserialize, Serialize};

use crate::bytes::Bytes;
use crate::error::ProtocolError;
use crate::limits::{MAX_TENSOR_ELEMENTS, MAX_TENSOR_RANK};

/// Element encoding of a [`Tensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TensorDtype {
    /// Variant 0: IEEE f32, little-endian.
    F32,
    /// Variant 1: bfloat16 (the top 16 bits of an f32, rounded to nearest even), little-endian.
    Bf16,
    /// Variant 2: E4M3 codes (one byte each, row-major, NaN codes refused), then one f32 scale
    /// (little-endian, finite, > 0) per row per 128 columns, tiles in row-major order; value = code · scale.
    E4m3Tile128,
}

impl TensorDtype {
    /// Bytes per element, not counting [`TensorDtype::E4m3Tile128`]'s scales (see [`Tensor::data_len`]).
    pub fn size(self) -> usize {
        match self {
            TensorDtype::F32 => 4,
            TensorDtype::Bf16 => 2,
            TensorDtype::E4m3Tile128 => 1,
        }
    }

    /// The lowercase name used on the command line and in reports: `f32`, `bf16` or `fp8`.
    pub fn as_str(self) -> &'static str {
        match self {
            TensorDtype::F32 => "f32",
            TensorDtype::Bf16 => "bf16",
            TensorDtype::E4m3Tile128 => "fp8",
        }
    }
}

impl std::fmt::Display for TensorDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TensorDtype {
    type Err = ProtocolError;

    /// Parses `f32`, `bf16` or `fp8` (ASCII case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            TensorDtype::F32,
            TensorDtype::Bf16,
            TensorDtype::E4m3Tile128,
        ]
        .into_iter()
        .find(|d| d.as_str().eq_ignore_ascii_case(s))
        .ok_or_else(|| ProtocolError::InvalidField {
            what: "tensor dtype",
            detail: format!("{s:?} is not f32, bf16 or fp8"),
        })
    }
}

/// A dense row-major tensor: hidden states going to an expert, or its outputs coming back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tensor {
    /// Element encoding.
    pub dtype: TensorDtype,
    /// Dimensions, outermost first (at most [`MAX_TENSOR_RANK`]; at most [`MAX_TENSOR_ELEMENTS`] elements).
    pub shape: Vec<u32>,
    /// The elements (and scales), exactly [`Tensor::data_len`] bytes.
    pub data: Bytes,
}

fn invalid(detail: String) -> ProtocolError {
    ProtocolError::InvalidField {
        what: "tensor",
        detail,
    }
}

/// bf16 bits of `x`: round to nearest, ties to even; a NaN stays a (quiet) NaN.
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x0040) as u16;
    }
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

impl Tensor {
    /// An f32 tensor of `shape` holding `values` (exact).
    pub fn from_f32(shape: Vec<u32>, values: &[f32]) -> Result<Tensor, ProtocolError> {
        Tensor::encode(TensorDtype::F32, shape, values)
    }

    /// A tensor of `shape` holding `values` in `dtype`: exact in f32, rounded to nearest even in bf16,
    /// quantized in 1×128 tiles with amax scales in E4M3 (there a NaN or infinity is refused: no scale fits
    /// it). The same values and dtype always give the same bytes.
    pub fn encode(
        dtype: TensorDtype,
        shape: Vec<u32>,
        values: &[f32],
    ) -> Result<Tensor, ProtocolError> {
        let n = elements(&shape)?;
        if values.len() as u64 != n {
            return Err(invalid(format!(
                "shape {shape:?} holds {n} values, got {}",
                values.len()
            )));
        }
        let data = match dtype {
            TensorDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            TensorDtype::Bf16 => values
                .iter()
                .flat_map(|&v| bf16_bits(v).to_le_bytes())
                .collect(),
            TensorDtype::E4m3Tile128 => {
                let (rows, cols) = rows_cols(&shape, n);
                let q = QuantizedTensor::quantize(
                    values,
                    rows,
                    cols,
                    Granularity::Tile1x128,
                    ScaleMode::Amax,
                )
                .map_err(|e| invalid(e.to_string()))?;
                let mut data = Vec::with_capacity(q.storage_bytes());
                data.extend_from_slice(E4M3::slice_as_bits(q.codes()));
                data.extend(q.scales().iter().flat_map(|s| s.to_le_bytes()));
                data
            }
        };
        let tensor = Tensor {
            dtype,
            shape,
            data: Bytes(data),
        };
        tensor.check()?;
        Ok(tensor)
    }

    /// The elements as f32: f32 as they are, bf16 widened exactly, E4M3 as `code · scale`; the tensor is
    /// checked first ([`Tensor::check`]).
    pub fn to_f32(&self) -> Result<Vec<f32>, ProtocolError> {
        self.check_len()?;
        let data = &self.data.0;
        Ok(match self.dtype {
            TensorDtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            TensorDtype::Bf16 => data
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                .collect(),
            TensorDtype::E4m3Tile128 => self.quantized()?.dequantize(),
        })
    }

    /// Number of elements, if the shape is within bounds.
    pub fn elements(&self) -> Result<u64, ProtocolError> {
        elements(&self.shape)
    }

    /// The bytes `data` must hold for this shape and dtype: elements × [`TensorDtype::size`], plus 4 bytes
    /// per 1×128 tile for E4M3.
    pub fn data_len(&self) -> Result<u64, ProtocolError> {
        let n = self.elements()?;
        let values = n * self.dtype.size() as u64;
        Ok(match self.dtype {
            TensorDtype::F32 | TensorDtype::Bf16 => values,
            TensorDtype::E4m3Tile128 => {
                let (rows, cols) = rows_cols(&self.shape, n);
                values + 4 * Granularity::Tile1x128.scale_count(rows, cols) as u64
            }
        })
    }

    /// Checks the shape bounds, that the data length matches the shape and dtype, and for E4M3 that no code
    /// is a NaN and every scale is finite and positive.
    pub fn check(&self) -> Result<(), ProtocolError> {
        self.check_len()?;
        if self.dtype == TensorDtype::E4m3Tile128 {
            self.quantized()?;
        }
        Ok(())
    }

    /// Checks the shape bounds and that the data length matches the shape and dtype.
    fn check_len(&self) -> Result<(), ProtocolError> {
        let want = self.data_len()?;
        if self.data.0.len() as u64 != want {
            return Err(invalid(format!(
                "shape {:?} in {} needs {want} bytes, got {}",
                self.shape,
                self.dtype,
                self.data.0.len()
            )));
        }
        Ok(())
    }

    /// The E4M3 codes and scales of a tensor whose length was checked, themselves checked.
    fn quantized(&self) -> Result<QuantizedTensor, ProtocolError> {
        let n = self.elements()?;
        let (rows, cols) = rows_cols(&self.shape, n);
        let (codes, scales) = self.data.0.split_at(n as usize);
        if let Some(at) = codes.iter().position(|&b| E4M3::from_bits(b).is_nan()) {
            return Err(invalid(format!("E4M3 code {at} is a NaN")));
        }
        let scales = scales
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        QuantizedTensor::from_parts(
            rows,
            cols,
            Granularity::Tile1x128,
            E4M3::slice_from_bits(codes).to_vec(),
            scales,
        )
        .map_err(|e| invalid(e.to_string()))
    }
}

/// Elements of `shape`, refusing a rank over [`MAX_TENSOR_RANK`] or over [`MAX_TENSOR_ELEMENTS`] elements
/// (every partial product is bounded too, so nothing overflows).
fn elements(shape: &[u32]) -> Result<u64, ProtocolError> {
    if shape.len() > MAX_TENSOR_RANK {
        return Err(invalid(format!(
            "rank {} over the limit of {MAX_TENSOR_RANK}",
            shape.len()
        )));
    }
    shape
        .iter()
        .try_fold(1u64, |acc, &d| {
            acc.checked_mul(u64::from(d))
                .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
        })
        .ok_or_else(|| {
            invalid(format!(
                "shape {shape:?} has over {MAX_TENSOR_ELEMENTS} elements"
            ))
        })
}

/// (R, C) of a shape of `n` elements: C the last dimension (1 at rank 0), R the product of the others.
fn rows_cols(shape: &[u32], n: u64) -> (usize, usize) {
    let cols = shape.last().map_or(1, |&c| c as usize);
    let rows = match shape.split_last() {
        Some((_, outer)) if cols == 0 => outer.iter().map(|&d| d as usize).product(),
        _ => n as usize / cols,
    };
    (rows, cols)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mana_kernels::quant::TILE;

    fn sample(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i as f32 * 0.37).sin() * (1.0 + (i % 7) as f32)) / 3.0)
            .collect()
    }

    #[test]
    fn every_dtype_round_trips_within_its_precision() {
        let (rows, cols) = (3, 300);
        let x = sample(rows, cols);
        let shape = vec![rows as u32, cols as u32];
        for (dtype, rel) in [
            (TensorDtype::F32, 0.0),
            (TensorDtype::Bf16, 1.0 / 256.0),
            // 3 mantissa bits: half an ulp is 1/16 of the value; subnormals of the tile are coarser.
            (TensorDtype::E4m3Tile128, 1.0 / 16.0),
        ] {
            let t = Tensor::encode(dtype, shape.clone(), &x).unwrap();
            assert_eq!(t.data.0.len() as u64, t.data_len().unwrap());
            let back = t.to_f32().unwrap();
            for (tile, (a, b)) in x.chunks(TILE).zip(back.chunks(TILE)).enumerate() {
                let amax = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (u, v) in a.iter().zip(b) {
                    let bound = rel * u.abs() + amax / 448.0 * 2f32.powi(-9);
                    assert!((u - v).abs() <= bound, "{dtype} tile {tile}: {u} -> {v}");
                }
            }
            // Deterministic: the same values give the same bytes, and decoding then encoding is stable.
            assert_eq!(Tensor::encode(dtype, shape.clone(), &x).unwrap(), t);
            assert_eq!(Tensor::encode(dtype, shape.clone(), &back).unwrap(), t);
        }
        // 3 rows of 3 tiles (128, 128, 44 columns): 900 codes and 9 scales.
        let fp8 = Tensor::encode(TensorDtype::E4m3Tile128, shape, &x).unwrap();
        assert_eq!(fp8.data.0.len(), 900 + 9 * 4);
    }

    /// What makes FP8 dispatch free for an FP8 model: the host's GEMM re-quantizes the decoded input with
    /// the same 1×128 amax tiles, and gets the same codes and scales back, so it computes on exactly the
    /// values it would have computed on from the f32 input. A tile's largest value decodes to
    /// `fl(448 · s)` with `s = fl(amax / 448)`; `fl(fl(448 · s) / 448) = s` for every f32 significand of
    /// amax (checked exhaustively here), and every other code survives because `code · s` is off by at
    /// most one rounding, far inside E4M3's spacing.
    #[test]
    fn requantizing_a_decoded_e4m3_tensor_gives_it_back() {
        for m in 0u32..(1 << 23) {
            let amax = f32::from_bits((127 << 23) | m);
            let s = mana_kernels::quant::tile_scale(amax, ScaleMode::Amax);
            assert_eq!(
                mana_kernels::quant::tile_scale(448.0 * s, ScaleMode::Amax),
                s,
                "amax {amax}"
            );
        }
        let mut state = 7u64;
        for tile_exp in -40..40 {
            let x: Vec<f32> = (0..3 * 200)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    u * 2f32.powi(tile_exp + (state >> 20) as i32 % 8)
                })
                .collect();
            let t = Tensor::encode(TensorDtype::E4m3Tile128, vec![3, 200], &x).unwrap();
            let again =
                Tensor::encode(TensorDtype::E4m3Tile128, vec![3, 200], &t.to_f32().unwrap());
            assert_eq!(again.unwrap(), t, "tiles around 2^{tile_exp}");
        }
    }

    #[test]
    fn e4m3_is_the_kernels_quantization() {
        let x = sample(2, 200);
        let t = Tensor::encode(TensorDtype::E4m3Tile128, vec![2, 200], &x).unwrap();
        let q =
            QuantizedTensor::quantize(&x, 2, 200, Granularity::Tile1x128, ScaleMode::Amax).unwrap();
        assert_eq!(t.to_f32().unwrap(), q.dequantize());
        assert_eq!(&t.data.0[..400], E4M3::slice_as_bits(q.codes()));
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to even (1); 1 + 3·2^-8 goes up.
        let halfway = f32::from_bits(0x3F80_8000);
        let above = f32::from_bits(0x3F81_8000);
        let t = Tensor::encode(TensorDtype::Bf16, vec![3], &[halfway, above, -2.5]).unwrap();
        assert_eq!(
            t.to_f32().unwrap(),
            vec![1.0, f32::from_bits(0x3F82_0000), -2.5]
        );
        assert!(
            Tensor::encode(TensorDtype::Bf16, vec![1], &[f32::NAN])
                .unwrap()
                .to_f32()
                .unwrap()[0]
                .is_nan()
        );
    }

    #[test]
    fn odd_shapes_have_consistent_lengths() {
        for shape in [
            vec![],
            vec![0],
            vec![5, 0],
            vec![0, 5],
            vec![1],
            vec![2, 1, 129],
        ] {
            let n = elements(&shape).unwrap() as usize;
            let x = sample(1, n);
            let t = Tensor::encode(TensorDtype::E4m3Tile128, shape.clone(), &x).unwrap();
            assert_eq!(t.to_f32().unwrap().len(), n, "{shape:?}");
        }
        assert_eq!(
            Tensor::encode(TensorDtype::E4m3Tile128, vec![2, 1, 129], &sample(1, 258))
                .unwrap()
                .data
                .0
                .len(),
            258 + 4 * 4
        );
    }

    #[test]
    fn bad_tensors_are_refused() {
        let good = Tensor::encode(TensorDtype::E4m3Tile128, vec![2, 4], &sample(2, 4)).unwrap();
        let with = |f: &dyn Fn(&mut Tensor)| {
            let mut t = good.clone();
            f(&mut t);
            t
        };
        let scale_at = 8;
        let bad = [
            (
                "short",
                with(&|t| {
                    t.data.0.pop();
                }),
            ),
            ("long", with(&|t| t.data.0.push(0))),
            ("NaN code", with(&|t| t.data.0[3] = 0x7F)),
            ("negative NaN code", with(&|t| t.data.0[0] = 0xFF)),
            (
                "zero scale",
                with(&|t| t.data.0[scale_at..scale_at + 4].copy_from_slice(&0f32.to_le_bytes())),
            ),
            (
                "negative scale",
                with(&|t| t.data.0[scale_at..scale_at + 4].copy_from_slice(&(-1f32).to_le_bytes())),
            ),
            (
                "infinite scale",
                with(&|t| {
                    t.data.0[scale_at + 4..scale_at + 8]
                        .copy_from_slice(&f32::INFINITY.to_le_bytes())
                }),
            ),
            (
                "NaN scale",
                with(&|t| {
                    t.data.0[scale_at + 4..scale_at + 8].copy_from_slice(&f32::NAN.to_le_bytes())
                }),
            ),
            ("rank 5", with(&|t| t.shape = vec![1, 1, 1, 2, 4])),
            ("huge", with(&|t| t.shape = vec![u32::MAX, u32::MAX, 0])),
            ("f32 length", with(&|t| t.dtype = TensorDtype::F32)),
        ];
        for (why, t) in bad {
            assert!(t.check().is_err(), "{why}");
            assert!(t.to_f32().is_err(), "{why}");
        }
        for v in [f32::NAN, f32::INFINITY] {
            assert!(Tensor::encode(TensorDtype::E4m3Tile128, vec![2], &[1.0, v]).is_err());
        }
        assert!(Tensor::encode(TensorDtype::F32, vec![3], &[1.0, 2.0]).is_err());
    }

    #[test]
    fn dtype_names_parse() {
        for d in [
            TensorDtype::F32,
            TensorDtype::Bf16,
            TensorDtype::E4m3Tile128,
        ] {
            assert_eq!(d.as_str().parse::<TensorDtype>().unwrap(), d);
        }
        assert_eq!(
            "FP8".parse::<TensorDtype>().unwrap(),
            TensorDtype::E4m3Tile128
        );
        assert!("e5m2".parse::<TensorDtype>().is_err());
    }
}
