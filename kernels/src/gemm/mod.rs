//! Matrix products in f32 and FP8, in the three forms a Linear layer needs.
//!
//! Dimension letters: C is M×N, the contraction runs over K. Storage is row-major everywhere.
//!
//! | [`Form`] | A stored | B stored | computes          | Linear use (W stored [out, in]) |
//! |----------|----------|----------|-------------------|---------------------------------|
//! | `AB`     | M×K      | K×N      | C = A·B           | dx = dy·W                       |
//! | `ABt`    | M×K      | N×K      | C = A·Bᵀ          | y = x·Wᵀ                        |
//! | `AtB`    | K×M      | K×N      | C = Aᵀ·B          | dW += dyᵀ·x                     |
//!
//! FP8 numerics (DeepSeek-V3 §3.3), see [`cpu`] for how the CPU realises them: both operands are quantized
//! to E4M3 along K — A in 1×128 tiles; B of `AB`/`ABt` (a weight) in 128×128 blocks; for `AtB` (weight
//! gradient) both operands are activations/gradients stored K-major, quantized in 128×1 tiles — and the
//! products are accumulated in f32 with the scales applied per 128-group of K.
//!
//! Entry points: [`crate::backend::Backend::matmul`] (the op API the model uses), [`matmul_f32`] (a free
//! function for code without a backend), [`rows`] (row-invariant products for inference, where a row's bits
//! must not depend on the batch) and [`reference`](mod@reference) (slow, obvious oracles for tests).

pub mod cpu;
pub mod reference;
pub mod rows;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::KernelError;
use crate::quant::{Granularity, QuantizedTensor, ScaleMode};

pub use cpu::matmul_f32;
pub use rows::matmul_rows_f32;

/// Numeric precision of a GEMM's inputs. Accumulation and output are always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Plain f32 inputs.
    #[default]
    F32,
    /// Inputs quantized to E4M3 with fine-grained scales.
    Fp8,
}

impl Precision {
    /// The lowercase name used in config files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Fp8 => "fp8",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = KernelError;

    /// Parses `"f32"` or `"fp8"` (ASCII case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("f32") {
            Ok(Precision::F32)
        } else if s.eq_ignore_ascii_case("fp8") {
            Ok(Precision::Fp8)
        } else {
            Err(KernelError::UnknownPrecision {
                given: s.to_owned(),
            })
        }
    }
}

/// Which of a Linear layer's GEMMs run in FP8 when the model's precision is [`Precision::Fp8`], and how
/// their tile scales are chosen: the switches of the FP8 ablation (docs/training.md). The default is
/// DeepSeek-V3's recipe: all three GEMM kinds in FP8, `s = amax / 448`. A switch that is off runs that GEMM
/// kind in f32 (inputs not quantized); at [`Precision::F32`] every switch is moot.
///
/// In TOML it is the `[model.fp8]` table; every field is optional.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fp8Recipe {
    /// The forward GEMM y = x·Wᵀ ([`Form::ABt`]): x in 1×128 tiles, W in 128×128 blocks.
    pub forward: bool,
    /// The data-gradient GEMM dx = dy·W ([`Form::AB`]): dy in 1×128 tiles, W in 128×128 blocks.
    pub dgrad: bool,
    /// The weight-gradient GEMM dW += dyᵀ·x ([`Form::AtB`]): dy and x in 128×1 tiles along the tokens.
    pub wgrad: bool,
    /// How tile scales are derived from the tile amax. The scale is the backend's business, so whoever
    /// builds the backend applies it ([`crate::CpuBackend::with_scale_mode`]), as `mana train` does;
    /// inference (`mana generate`, `mana serve`) uses amax scales.
    pub scale: ScaleMode,
}

impl Default for Fp8Recipe {
    fn default() -> Self {
        Self {
            forward: true,
            dgrad: true,
            wgrad: true,
            scale: ScaleMode::Amax,
        }
    }
}

impl Fp8Recipe {
    /// The precision of each Linear GEMM kind for a model of `precision`.
    pub fn linear_precision(self, precision: Precision) -> LinearPrecision {
        let pick = |on: bool| {
            if on && precision == Precision::Fp8 {
                Precision::Fp8
            } else {
                Precision::F32
            }
        };
        LinearPrecision {
            forward: pick(self.forward),
            dgrad: pick(self.dgrad),
            wgrad: pick(self.wgrad),
        }
    }
}

/// The precision of each of the three GEMMs of a Linear layer (see [`crate::model::linear`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinearPrecision {
    /// y = x·Wᵀ ([`Form::ABt`]).
    pub forward: Precision,
    /// dx = dy·W ([`Form::AB`]).
    pub dgrad: Precision,
    /// dW += dyᵀ·x ([`Form::AtB`]).
    pub wgrad: Precision,
}

impl LinearPrecision {
    /// Every GEMM in f32 (the router, or a model at [`Precision::F32`]).
    pub const F32: Self = Self::uniform(Precision::F32);

    /// The same precision for all three GEMMs.
    pub const fn uniform(p: Precision) -> Self {
        Self {
            forward: p,
            dgrad: p,
            wgrad: p,
        }
    }
}

impl From<Precision> for LinearPrecision {
    fn from(p: Precision) -> Self {
        Self::uniform(p)
    }
}

/// Which operands are transposed; see the table in the module doc. C is always M×N.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Form {
    /// C = A·B; A is M×K, B is K×N.
    AB,
    /// C = A·Bᵀ; A is M×K, B is N×K.
    ABt,
    /// C = Aᵀ·B; A is K×M, B is K×N.
    AtB,
}

/// GEMM sizes: C is `m`×`n`, the contraction length is `k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dims {
    /// Rows of C.
    pub m: usize,
    /// Contraction length.
    pub k: usize,
    /// Columns of C.
    pub n: usize,
}

impl Dims {
    /// Shorthand constructor.
    pub fn new(m: usize, k: usize, n: usize) -> Self {
        Self { m, k, n }
    }
}

impl Form {
    /// Stored shape (rows, cols) of A.
    pub fn a_shape(self, d: Dims) -> (usize, usize) {
        match self {
            Form::AB | Form::ABt => (d.m, d.k),
            Form::AtB => (d.k, d.m),
        }
    }

    /// Stored shape (rows, cols) of B.
    pub fn b_shape(self, d: Dims) -> (usize, usize) {
        match self {
            Form::AB | Form::AtB => (d.k, d.n),
            Form::ABt => (d.n, d.k),
        }
    }

    /// How FP8 quantizes the stored A: along K, in 1×128 tiles (K is A's column dimension) or 128×1 tiles
    /// (`AtB`, K is A's row dimension).
    pub fn a_granularity(self) -> Granularity {
        match self {
            Form::AB | Form::ABt => Granularity::Tile1x128,
            Form::AtB => Granularity::Tile128x1,
        }
    }

    /// How FP8 quantizes the stored B: 128×128 blocks for weights (`AB`, `ABt`); 128×1 tiles along K for the
    /// weight-gradient form `AtB`, whose B is an activation.
    pub fn b_granularity(self) -> Granularity {
        match self {
            Form::AB | Form::ABt => Granularity::Block128x128,
            Form::AtB => Granularity::Tile128x1,
        }
    }
}

/// Element count `rows·cols`, or a typed overflow error.
pub(crate) fn elems(op: &'static str, rows: usize, cols: usize) -> Result<usize, KernelError> {
    rows.checked_mul(cols)
        .ok_or(KernelError::SizeOverflow { op, rows, cols })
}

/// Checks that `a`, `b` and `c` have the lengths `form` and `dims` imply.
pub fn check_operands(
    op: &'static str,
    form: Form,
    dims: Dims,
    a: usize,
    b: usize,
    c: usize,
) -> Result<(), KernelError> {
    let (ar, ac) = form.a_shape(dims);
    let (br, bc) = form.b_shape(dims);
    for (what, expected, actual) in [
        ("a", elems(op, ar, ac)?, a),
        ("b", elems(op, br, bc)?, b),
        ("c", elems(op, dims.m, dims.n)?, c),
    ] {
        if expected != actual {
            return Err(KernelError::ShapeMismatch {
                op,
                what,
                expected,
                actual,
            });
        }
    }
    Ok(())
}

/// Checks a pre-quantized B operand: its shape must be `form.b_shape(dims)` and its tiling
/// `form.b_granularity()`, and `a`/`c` must fit `dims`.
pub fn check_quantized_b(
    op: &'static str,
    form: Form,
    dims: Dims,
    a: usize,
    b: &QuantizedTensor,
    c: usize,
) -> Result<(), KernelError> {
    let (br, bc) = form.b_shape(dims);
    check_operands(op, form, dims, a, b.rows().saturating_mul(b.cols()), c)?;
    if (b.rows(), b.cols()) != (br, bc) {
        // Same element count, different shape (e.g. transposed): report the row count.
        return Err(KernelError::ShapeMismatch {
            op,
            what: "b rows",
            expected: br,
            actual: b.rows(),
        });
    }
    let expected = form.b_granularity();
    if b.granularity() != Some(expected) {
        return Err(KernelError::GranularityMismatch {
            op,
            expected,
            actual: b.granularity(),
        });
    }
    Ok(())
}
