//! Fine-grained FP8 scaling (DeepSeek-V3 §3.3): a row-major f32 matrix becomes E4M3 codes plus one f32 scale
//! per tile, so that one outlier only coarsens its own tile.
//!
//! Shapes: the matrix is R×C (rows × columns), row-major. Tiles, with T = [`TILE`] = 128:
//! - [`Granularity::Tile1x128`]: one scale per row per T columns (activations and gradients, quantized along
//!   K when K is the column dimension). Scales: R × ⌈C/T⌉.
//! - [`Granularity::Tile128x1`]: one scale per column per T rows (the backward pass re-quantizes
//!   activations along the token dimension for the weight gradient). Scales: ⌈R/T⌉ × C.
//! - [`Granularity::Block128x128`]: one scale per T×T block (weights). Scales: ⌈R/T⌉ × ⌈C/T⌉.
//!
//! Edge tiles are simply shorter; nothing is padded. Scales are computed online from each tile's amax:
//! `s = amax / 448` ([`ScaleMode::Amax`]) or that rounded up to a power of two ([`ScaleMode::PowerOfTwo`],
//! which makes `code · s` exact). A code is `E4M3::from_f32(x / s)`; dequantization is `code · s`. Division
//! rather than multiplication by `1/s` keeps every value `v·s` with `v` an E4M3 value exact. An all-zero tile
//! gets scale 1 and zero codes. A tile holding NaN or ±inf is an error ([`KernelError::NonFinite`]): there is
//! no honest scale for it.
//!
//! Speed: tiles are processed in parallel (rayon) over rows or 128-row bands, amax is an integer max over
//! the f32 bit patterns (which also flags inf/NaN, whose patterns are the largest), and the per-element loops
//! are branch-free so they vectorise. [`quantize_dequantize`] fuses both directions into one f32 pass for
//! GEMMs that only need the quantized values, not the codes.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::KernelError;
use crate::fp8::{E4M3, E4M3_MAX, round_to_e4m3};
use crate::simd::multiversion;

/// Tile edge length along the quantized dimension (128, as in DeepSeek-V3).
pub const TILE: usize = 128;

/// Absolute-value bit pattern of +inf; any |x| bit pattern at or above it is inf or NaN.
const INF_BITS: u32 = 0x7F80_0000;

/// Roughly how many elements one rayon task should cover, so small tensors are not split to death.
const ELEMS_PER_TASK: usize = 32 * 1024;

/// Which elements share one scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Granularity {
    /// One scale per row per 128 columns (1×128 tiles).
    Tile1x128,
    /// One scale per column per 128 rows (128×1 tiles).
    Tile128x1,
    /// One scale per 128×128 block.
    Block128x128,
}

impl Granularity {
    /// Shape (rows, cols) of the row-major scale grid for an R×C matrix.
    pub fn scale_shape(self, rows: usize, cols: usize) -> (usize, usize) {
        match self {
            Granularity::Tile1x128 => (rows, cols.div_ceil(TILE)),
            Granularity::Tile128x1 => (rows.div_ceil(TILE), cols),
            Granularity::Block128x128 => (rows.div_ceil(TILE), cols.div_ceil(TILE)),
        }
    }

    /// Number of scales for an R×C matrix.
    pub fn scale_count(self, rows: usize, cols: usize) -> usize {
        let (r, c) = self.scale_shape(rows, cols);
        r * c
    }
}

/// How a tile's scale is derived from its amax.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleMode {
    /// `s = amax / 448`: the tile's largest magnitude lands exactly on the E4M3 max (DeepSeek-V3).
    #[default]
    Amax,
    /// `s` = the smallest power of two ≥ `amax / 448`: dequantization `code · s` is exact and scales are
    /// cheap to store as exponents, at the cost of up to one bit of range.
    PowerOfTwo,
}

/// The scale of a tile with the given amax (finite, ≥ 0).
#[inline(always)]
pub fn tile_scale(amax: f32, mode: ScaleMode) -> f32 {
    if amax == 0.0 {
        return 1.0;
    }
    // Clamp to the smallest normal f32 so that x / s never overflows for tiles of tiny values.
    let s = (amax / E4M3_MAX).max(f32::MIN_POSITIVE);
    match mode {
        ScaleMode::Amax => s,
        ScaleMode::PowerOfTwo => {
            let bits = s.to_bits();
            let exp = if bits & 0x7F_FFFF != 0 {
                (bits >> 23) + 1
            } else {
                bits >> 23
            };
            f32::from_bits(exp << 23)
        }
    }
}

/// What a quantizing loop writes per element: an E4M3 code, or (fused) the dequantized f32.
trait QuantSink: Copy + Send + Sync {
    fn store(x: f32, scale: f32) -> Self;
}

impl QuantSink for E4M3 {
    #[inline(always)]
    fn store(x: f32, scale: f32) -> Self {
        E4M3::from_f32(x / scale)
    }
}

impl QuantSink for f32 {
    #[inline(always)]
    fn store(x: f32, scale: f32) -> Self {
        round_to_e4m3(x / scale) * scale
    }
}

/// Largest |x| bit pattern in `xs` (integer max: vectorises, and inf/NaN land at or above [`INF_BITS`]).
#[inline(always)]
fn amax_bits(xs: &[f32]) -> u32 {
    xs.iter()
        .fold(0u32, |m, x| m.max(x.to_bits() & 0x7FFF_FFFF))
}

#[inline(always)]
fn store_tile<T: QuantSink>(src: &[f32], dst: &mut [T], scale: f32) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = T::store(x, scale);
    }
}

fn check_shape(
    op: &'static str,
    what: &'static str,
    rows: usize,
    cols: usize,
    len: usize,
) -> Result<usize, KernelError> {
    let expected = rows
        .checked_mul(cols)
        .ok_or(KernelError::SizeOverflow { op, rows, cols })?;
    if expected != len {
        return Err(KernelError::ShapeMismatch {
            op,
            what,
            expected,
            actual: len,
        });
    }
    Ok(expected)
}

/// Rows per rayon task for a row-wise pass over `cols` columns.
fn rows_per_task(cols: usize) -> usize {
    (ELEMS_PER_TASK / cols.max(1)).max(1)
}

/// Names the tile holding the first non-finite element (in row-major element order), for an error that does
/// not depend on which rayon task noticed first.
fn first_non_finite(op: &'static str, src: &[f32], cols: usize, g: Granularity) -> KernelError {
    let pos = src.iter().position(|x| !x.is_finite()).unwrap_or(0);
    let (row, col) = (
        pos.checked_div(cols).unwrap_or(0),
        pos.checked_rem(cols).unwrap_or(0),
    );
    let (row, col) = match g {
        Granularity::Tile1x128 => (row, col - col % TILE),
        Granularity::Tile128x1 => (row - row % TILE, col),
        Granularity::Block128x128 => (row - row % TILE, col - col % TILE),
    };
    KernelError::NonFinite { op, row, col }
}

/// The shared quantizing pass: fills `dst` (codes or fused f32) and `scales` from `src` (R×C row-major).
/// Lengths were checked by the caller. Each rayon task runs a multiversioned kernel (see [`crate::simd`]).
#[allow(clippy::too_many_arguments)]
fn quantize_generic<T: QuantSink>(
    op: &'static str,
    src: &[f32],
    rows: usize,
    cols: usize,
    g: Granularity,
    mode: ScaleMode,
    dst: &mut [T],
    scales: &mut [f32],
) -> Result<(), KernelError> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let ok = match g {
        Granularity::Tile1x128 => {
            let tiles = cols.div_ceil(TILE);
            let rpt = rows_per_task(cols);
            src.par_chunks(rpt * cols)
                .zip(dst.par_chunks_mut(rpt * cols))
                .zip(scales.par_chunks_mut(rpt * tiles))
                .all(|((s, d), sc)| row_tiles(s, d, sc, cols, mode))
        }
        Granularity::Tile128x1 => src
            .par_chunks(TILE * cols)
            .zip(dst.par_chunks_mut(TILE * cols))
            .zip(scales.par_chunks_mut(cols))
            .all(|((s, d), sc)| column_tiles(s, d, sc, cols, mode)),
        Granularity::Block128x128 => {
            let blocks = cols.div_ceil(TILE);
            src.par_chunks(TILE * cols)
                .zip(dst.par_chunks_mut(TILE * cols))
                .zip(scales.par_chunks_mut(blocks))
                .all(|((s, d), sc)| blocks_of_band(s, d, sc, cols, mode))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(first_non_finite(op, src, cols, g))
    }
}

multiversion! {
    /// [`row_tiles_kernel`] for the running CPU.
    fn row_tiles<T: QuantSink>(s: &[f32], d: &mut [T], sc: &mut [f32], cols: usize, mode: ScaleMode) -> bool = row_tiles_kernel;
}
multiversion! {
    /// [`column_tiles_kernel`] for the running CPU.
    fn column_tiles<T: QuantSink>(s: &[f32], d: &mut [T], sc: &mut [f32], cols: usize, mode: ScaleMode) -> bool = column_tiles_kernel;
}
multiversion! {
    /// [`blocks_of_band_kernel`] for the running CPU.
    fn blocks_of_band<T: QuantSink>(s: &[f32], d: &mut [T], sc: &mut [f32], cols: usize, mode: ScaleMode) -> bool = blocks_of_band_kernel;
}

multiversion! {
    /// [`dequantize_rows_kernel`] for the running CPU.
    fn dequantize_rows<>(codes: &[E4M3], out: &mut [f32], scales: &[f32], g: Granularity, cols: usize, row0: usize) -> () = dequantize_rows_kernel;
}

/// Dequantizes whole rows `row0..` of a tensor: `out = code · scale`.
#[inline(always)]
fn dequantize_rows_kernel(
    codes: &[E4M3],
    out: &mut [f32],
    scales: &[f32],
    g: Granularity,
    cols: usize,
    row0: usize,
) {
    let scale_cols = g.scale_shape(1, cols).1;
    for (i, (orow, crow)) in out.chunks_mut(cols).zip(codes.chunks(cols)).enumerate() {
        let r = row0 + i;
        let srow_index = match g {
            Granularity::Tile1x128 => r,
            Granularity::Tile128x1 | Granularity::Block128x128 => r / TILE,
        };
        let srow = &scales[srow_index * scale_cols..(srow_index + 1) * scale_cols];
        if g == Granularity::Tile128x1 {
            for ((o, c), &s) in orow.iter_mut().zip(crow).zip(srow) {
                *o = c.to_f32() * s;
            }
        } else {
            for ((ot, ct), &s) in orow.chunks_mut(TILE).zip(crow.chunks(TILE)).zip(srow) {
                for (o, c) in ot.iter_mut().zip(ct) {
                    *o = c.to_f32() * s;
                }
            }
        }
    }
}

/// 1×128 tiles of whole rows `s` (row-major, `cols` wide). Returns false if a tile is non-finite.
#[inline(always)]
fn row_tiles_kernel<T: QuantSink>(
    s: &[f32],
    d: &mut [T],
    sc: &mut [f32],
    cols: usize,
    mode: ScaleMode,
) -> bool {
    let tiles = cols.div_ceil(TILE);
    let mut worst = 0u32;
    for ((srow, drow), scrow) in s
        .chunks(cols)
        .zip(d.chunks_mut(cols))
        .zip(sc.chunks_mut(tiles))
    {
        for ((st, dt), scale) in srow
            .chunks(TILE)
            .zip(drow.chunks_mut(TILE))
            .zip(scrow.iter_mut())
        {
            let a = amax_bits(st);
            worst = worst.max(a);
            *scale = tile_scale(f32::from_bits(a.min(INF_BITS - 1)), mode);
            store_tile(st, dt, *scale);
        }
    }
    worst < INF_BITS
}

/// 128×1 tiles of one band of up to 128 rows: one scale per column. The column amax is accumulated in the
/// band's scale slots (as bit patterns), then turned into scales in place.
#[inline(always)]
fn column_tiles_kernel<T: QuantSink>(
    s: &[f32],
    d: &mut [T],
    sc: &mut [f32],
    cols: usize,
    mode: ScaleMode,
) -> bool {
    sc.fill(0.0);
    for srow in s.chunks(cols) {
        for (m, x) in sc.iter_mut().zip(srow) {
            *m = f32::from_bits(m.to_bits().max(x.to_bits() & 0x7FFF_FFFF));
        }
    }
    if sc.iter().fold(0u32, |b, m| b.max(m.to_bits())) >= INF_BITS {
        return false;
    }
    for m in sc.iter_mut() {
        *m = tile_scale(*m, mode);
    }
    for (srow, drow) in s.chunks(cols).zip(d.chunks_mut(cols)) {
        for ((o, &x), &scale) in drow.iter_mut().zip(srow).zip(sc.iter()) {
            *o = T::store(x, scale);
        }
    }
    true
}

/// 128×128 blocks of one band of up to 128 rows.
#[inline(always)]
fn blocks_of_band_kernel<T: QuantSink>(
    s: &[f32],
    d: &mut [T],
    sc: &mut [f32],
    cols: usize,
    mode: ScaleMode,
) -> bool {
    for (jb, scale) in sc.iter_mut().enumerate() {
        let c0 = jb * TILE;
        let c1 = (c0 + TILE).min(cols);
        let a = s
            .chunks(cols)
            .fold(0u32, |m, srow| m.max(amax_bits(&srow[c0..c1])));
        if a >= INF_BITS {
            return false;
        }
        *scale = tile_scale(f32::from_bits(a), mode);
        for (srow, drow) in s.chunks(cols).zip(d.chunks_mut(cols)) {
            store_tile(&srow[c0..c1], &mut drow[c0..c1], *scale);
        }
    }
    true
}

/// Quantizes `src` (R×C row-major) and immediately dequantizes it into `dst`: `dst = code(x/s) · s` per
/// element, bit-identical to [`QuantizedTensor::quantize`] followed by [`QuantizedTensor::dequantize`], in
/// one pass and without storing codes. `scales` receives the tile scales (see [`Granularity::scale_count`]).
/// This is what the CPU FP8 GEMM feeds to its f32 inner products.
#[allow(clippy::too_many_arguments)]
pub fn quantize_dequantize(
    src: &[f32],
    rows: usize,
    cols: usize,
    granularity: Granularity,
    mode: ScaleMode,
    dst: &mut [f32],
    scales: &mut [f32],
) -> Result<(), KernelError> {
    const OP: &str = "quantize_dequantize";
    check_shape(OP, "src", rows, cols, src.len())?;
    check_shape(OP, "dst", rows, cols, dst.len())?;
    let (sr, sc) = granularity.scale_shape(rows, cols);
    check_shape(OP, "scales", sr, sc, scales.len())?;
    quantize_generic(OP, src, rows, cols, granularity, mode, dst, scales)
}

/// An FP8 (E4M3) matrix with fine-grained scales: what an FP8 weight or activation looks like in memory and
/// on the wire. `codes` is R×C row-major; `scales` is the row-major grid given by
/// [`Granularity::scale_shape`]. Dequantized value: `codes[r·C + c].to_f32() · scale(r, c)`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantizedTensor {
    rows: usize,
    cols: usize,
    granularity: Option<Granularity>,
    codes: Vec<E4M3>,
    scales: Vec<f32>,
}

impl QuantizedTensor {
    /// Quantizes an R×C row-major f32 matrix.
    pub fn quantize(
        src: &[f32],
        rows: usize,
        cols: usize,
        granularity: Granularity,
        mode: ScaleMode,
    ) -> Result<Self, KernelError> {
        let mut q = Self::default();
        q.quantize_from(src, rows, cols, granularity, mode)?;
        Ok(q)
    }

    /// Re-quantizes into this tensor, reusing its buffers (no allocation once they are large enough). On
    /// error the tensor is left empty.
    pub fn quantize_from(
        &mut self,
        src: &[f32],
        rows: usize,
        cols: usize,
        granularity: Granularity,
        mode: ScaleMode,
    ) -> Result<(), KernelError> {
        const OP: &str = "quantize";
        let n = check_shape(OP, "src", rows, cols, src.len())?;
        self.codes.resize(n, E4M3::ZERO);
        self.scales.resize(granularity.scale_count(rows, cols), 0.0);
        match quantize_generic(
            OP,
            src,
            rows,
            cols,
            granularity,
            mode,
            &mut self.codes,
            &mut self.scales,
        ) {
            Ok(()) => {
                self.rows = rows;
                self.cols = cols;
                self.granularity = Some(granularity);
                Ok(())
            }
            Err(e) => {
                self.rows = 0;
                self.cols = 0;
                self.granularity = None;
                self.codes.clear();
                self.scales.clear();
                Err(e)
            }
        }
    }

    /// Rebuilds a tensor from stored parts (e.g. decoded from the wire), checking that the lengths fit the
    /// shape and that every scale is finite and positive.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        granularity: Granularity,
        codes: Vec<E4M3>,
        scales: Vec<f32>,
    ) -> Result<Self, KernelError> {
        const OP: &str = "QuantizedTensor::from_parts";
        check_shape(OP, "codes", rows, cols, codes.len())?;
        let (sr, sc) = granularity.scale_shape(rows, cols);
        check_shape(OP, "scales", sr, sc, scales.len())?;
        if let Some((index, &value)) = scales
            .iter()
            .enumerate()
            .find(|(_, s)| !(s.is_finite() && **s > 0.0))
        {
            return Err(KernelError::InvalidScale {
                op: OP,
                index,
                value,
            });
        }
        Ok(Self {
            rows,
            cols,
            granularity: Some(granularity),
            codes,
            scales,
        })
    }

    /// Number of rows R.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns C.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The tiling, or `None` for an empty default tensor.
    pub fn granularity(&self) -> Option<Granularity> {
        self.granularity
    }

    /// The E4M3 codes, R×C row-major.
    pub fn codes(&self) -> &[E4M3] {
        &self.codes
    }

    /// The scales, in the row-major grid of [`Granularity::scale_shape`].
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Bytes this tensor holds (codes + scales): about 25% of the f32 matrix for 128×128 blocks.
    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + self.scales.len() * std::mem::size_of::<f32>()
    }

    /// Dequantizes into a new R×C row-major f32 buffer.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.codes.len()];
        self.dequantize_fill(&mut out);
        out
    }

    /// Dequantizes into `out`, which must hold R×C elements.
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<(), KernelError> {
        check_shape("dequantize", "out", self.rows, self.cols, out.len())?;
        self.dequantize_fill(out);
        Ok(())
    }

    fn dequantize_fill(&self, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        let Some(g) = self.granularity else { return };
        if rows == 0 || cols == 0 {
            return;
        }
        let scales = &self.scales;
        let rpt = rows_per_task(cols);
        out.par_chunks_mut(rpt * cols)
            .zip(self.codes.par_chunks(rpt * cols))
            .enumerate()
            .for_each(|(task, (o, c))| dequantize_rows(c, o, scales, g, cols, task * rpt));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIMD copies chosen at run time must give bit-identical results to the plain (baseline) kernels.
    #[test]
    fn dispatched_kernels_equal_baseline_kernels() {
        let (rows, cols) = (130, 300);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.37 - 170.0)
            .collect();
        for mode in [ScaleMode::Amax, ScaleMode::PowerOfTwo] {
            let (mut d1, mut d2) = (vec![E4M3::ZERO; x.len()], vec![E4M3::ZERO; x.len()]);
            let (mut f1, mut f2) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
            let (mut s1, mut s2) = (vec![0.0; 2 * cols * 3], vec![0.0; 2 * cols * 3]);
            assert!(row_tiles(&x, &mut d1, &mut s1[..rows * 3], cols, mode));
            assert!(row_tiles_kernel(
                &x,
                &mut d2,
                &mut s2[..rows * 3],
                cols,
                mode
            ));
            assert!(row_tiles(&x, &mut f1, &mut s1[..rows * 3], cols, mode));
            assert!(row_tiles_kernel(
                &x,
                &mut f2,
                &mut s2[..rows * 3],
                cols,
                mode
            ));
            assert_eq!((&d1, &s1), (&d2, &s2));
            assert_eq!(
                f1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                f2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let band = &x[..TILE * cols];
            assert!(column_tiles(
                band,
                &mut d1[..TILE * cols],
                &mut s1[..cols],
                cols,
                mode
            ));
            assert!(column_tiles_kernel(
                band,
                &mut d2[..TILE * cols],
                &mut s2[..cols],
                cols,
                mode
            ));
            assert!(blocks_of_band(
                band,
                &mut f1[..TILE * cols],
                &mut s1[cols..cols + 3],
                cols,
                mode
            ));
            assert!(blocks_of_band_kernel(
                band,
                &mut f2[..TILE * cols],
                &mut s2[cols..cols + 3],
                cols,
                mode
            ));
            assert_eq!((&d1, &s1), (&d2, &s2));
            assert_eq!(
                f1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                f2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let (mut o1, mut o2) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
            dequantize_rows(
                &d1,
                &mut o1,
                &s1[..rows * 3],
                Granularity::Tile1x128,
                cols,
                0,
            );
            dequantize_rows_kernel(
                &d1,
                &mut o2,
                &s1[..rows * 3],
                Granularity::Tile1x128,
                cols,
                0,
            );
            assert_eq!(o1, o2);
        }
    }
}
