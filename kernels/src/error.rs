//! The one error type of mana's numerics: every kernel entry point validates its input and returns a
//! [`KernelError`] instead of panicking, because shapes and data may come from untrusted peers.

/// Why a kernel refused its input. Every variant names the operation (`op`) that rejected it, so a caller
/// several layers up can still tell which call went wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    /// A buffer's length does not match the shape the caller declared.
    #[error("{op}: {what} has {actual} elements, expected {expected}")]
    ShapeMismatch {
        /// The operation that checked the shape (e.g. `"matmul"`).
        op: &'static str,
        /// Which operand or buffer is wrong (e.g. `"a"`, `"c"`, `"codes"`).
        what: &'static str,
        /// The element count implied by the declared shape.
        expected: usize,
        /// The element count actually passed.
        actual: usize,
    },
    /// The declared shape's element count does not fit in `usize`.
    #[error("{op}: shape {rows}x{cols} overflows usize")]
    SizeOverflow {
        /// The operation that computed the size.
        op: &'static str,
        /// Declared rows (or first dimension).
        rows: usize,
        /// Declared columns (or second dimension).
        cols: usize,
    },
    /// A quantization tile holds NaN or ±infinity, so no finite scale exists for it. FP8 training must stop
    /// or skip the step here rather than silently saturate garbage.
    #[error("{op}: non-finite value (NaN or infinity) at row {row}, column {col}")]
    NonFinite {
        /// The operation that scanned the data.
        op: &'static str,
        /// Row of the first tile found to hold a non-finite value (the tile's first row).
        row: usize,
        /// Column of that tile's first element.
        col: usize,
    },
    /// A stored scale is NaN, infinite or not positive, so the codes it belongs to cannot be dequantized.
    #[error("{op}: scale {index} is {value}, expected a finite positive number")]
    InvalidScale {
        /// The operation that checked the scales.
        op: &'static str,
        /// Index of the bad scale in the scale buffer.
        index: usize,
        /// The bad value.
        value: f32,
    },
    /// A pre-quantized operand uses a tiling the operation does not accept (e.g. a weight for `Form::ABt`
    /// must be in 128×128 blocks).
    #[error("{op}: operand quantized as {actual:?}, expected {expected:?}")]
    GranularityMismatch {
        /// The operation that checked the operand.
        op: &'static str,
        /// The tiling the operation needs.
        expected: crate::quant::Granularity,
        /// The operand's tiling (`None` for an empty tensor).
        actual: Option<crate::quant::Granularity>,
    },
    /// A string did not name a known precision (expected `"f32"` or `"fp8"`).
    #[error("unknown precision {given:?}: expected \"f32\" or \"fp8\"")]
    UnknownPrecision {
        /// The string that was given.
        given: String,
    },
    /// The requested backend or feature is not available in this build or on this machine.
    #[error("{op}: unavailable: {reason}")]
    Unavailable {
        /// The operation that was asked for.
        op: &'static str,
        /// Why it cannot run (e.g. "not compiled with CUDA").
        reason: String,
    },
    /// A routed expert run outside the model ([`crate::model::ExpertRunner`]) gave no answer: no host of it
    /// answered in time, or every one refused.
    #[error("expert {expert} of layer {layer} unavailable: {reason}")]
    ExpertUnavailable {
        /// The MoE layer.
        layer: usize,
        /// The expert's index in its layer.
        expert: usize,
        /// Why (the last failure seen).
        reason: String,
    },
    /// Some token of a step kept fewer than `k_min` of its top-k routed experts: the others got no answer
    /// ([`crate::model::ExpertCall::missing`]). The step did not happen; it may be run again.
    #[error(
        "token {token} of the step kept {kept} of its {top_k} routed experts in layer {layer}, fewer than \
         k_min = {k_min} (no answer from expert(s) {missing:?} of that layer)"
    )]
    TooFewExperts {
        /// The MoE layer.
        layer: usize,
        /// The first such token, counted from the step's first new position.
        token: usize,
        /// Its selected experts that were held or answered.
        kept: usize,
        /// How many it selected.
        top_k: usize,
        /// The fewest it may keep.
        k_min: usize,
        /// The layer's experts that got no answer in this step.
        missing: Vec<usize>,
    },
}
