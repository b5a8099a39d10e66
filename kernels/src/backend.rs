//! One op API over CPU now and CUDA later (candle style): the model calls [`Backend::matmul`] and does not
//! care where or how the product is computed. [`CpuBackend`] is the CPU implementation; a CUDA backend will
//! implement the same trait.

use std::sync::Arc;

use crate::error::KernelError;
use crate::gemm::cpu::{Fp8Workspace, gemm_f32_checked, matmul_fp8, matmul_fp8_quantized_b};
use crate::gemm::rows::{matmul_rows_f32, matmul_rows_fp8, matmul_rows_fp8_rounded_b};
use crate::gemm::{Dims, Form, Precision, check_operands, check_quantized_b};
use crate::quant::{Granularity, QuantizedTensor, ScaleMode, quantize_dequantize};

/// One op API over CPU now and CUDA later (candle style).
pub trait Backend: Send {
    /// Short name for logs and reports (`"cpu"`, later `"cuda:0"`).
    fn name(&self) -> &str;

    /// c = op(a)·op(b) (accumulate=false) or c += op(a)·op(b) (accumulate=true). FP8 quantizes a and b
    /// internally (1×128 tiles along K for activations/gradients, 128×128 blocks for the B operand of
    /// AB/ABt = weights; 128×1 tiles along K for both operands of AtB). Shapes follow [`Form`]; a length
    /// that does not match `dims` is a [`KernelError::ShapeMismatch`], and on any error `c` is untouched.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &mut self,
        precision: Precision,
        form: Form,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        dims: Dims,
        accumulate: bool,
    ) -> Result<(), KernelError>;

    /// c = a·bᵀ ([`Form::ABt`], the Linear forward y = x·Wᵀ; `c` overwritten) where each row of `c` depends
    /// only on the same row of `a` and on `b`, bit for bit, whatever the number of rows. Inference uses it
    /// so that a KV-cached decoder, which runs one or two new positions per pass, and a recomputation of
    /// the whole window give identical logits (see [`crate::gemm::rows`]). This default runs
    /// [`Backend::matmul`] on one row at a time, which is row-invariant for any deterministic backend;
    /// backends override it with something faster.
    fn matmul_rows(
        &mut self,
        precision: Precision,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        dims: Dims,
    ) -> Result<(), KernelError> {
        check_operands("matmul_rows", Form::ABt, dims, a.len(), b.len(), c.len())?;
        if dims.k == 0 || dims.n == 0 {
            c.fill(0.0);
            return Ok(());
        }
        let one = Dims { m: 1, ..dims };
        for (crow, arow) in c.chunks_exact_mut(dims.n).zip(a.chunks_exact(dims.k)) {
            self.matmul(precision, Form::ABt, arow, b, crow, one, false)?;
        }
        Ok(())
    }

    /// Rounds a weight `w` [rows, cols] (stored `[out, in]`) to the values this backend's FP8 products use
    /// for it as B (128×128 blocks), into `out`, so that inference rounds each weight once and then calls
    /// [`Backend::matmul_rows_rounded_b`]. The default uses [`ScaleMode::Amax`], as the default
    /// [`Backend::matmul_quantized_b`] does.
    fn round_weight_fp8(
        &mut self,
        w: &[f32],
        rows: usize,
        cols: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let g = Granularity::Block128x128;
        let mut scales = vec![0.0f32; g.scale_count(rows, cols)];
        quantize_dequantize(w, rows, cols, g, ScaleMode::Amax, out, &mut scales)
    }

    /// [`Backend::matmul_rows`] whose `b` was rounded by [`Backend::round_weight_fp8`]: with FP8 only `a`
    /// is quantized. Bit-identical to [`Backend::matmul_rows`] on the unrounded weight. The default
    /// quantizes `a` with [`ScaleMode::Amax`] and runs the f32 row product.
    fn matmul_rows_rounded_b(
        &mut self,
        precision: Precision,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        dims: Dims,
    ) -> Result<(), KernelError> {
        match precision {
            Precision::F32 => self.matmul_rows(Precision::F32, a, b, c, dims),
            Precision::Fp8 => {
                check_operands(
                    "matmul_rows_rounded_b",
                    Form::ABt,
                    dims,
                    a.len(),
                    b.len(),
                    c.len(),
                )?;
                let g = Form::ABt.a_granularity();
                let mut qa = vec![0.0f32; a.len()];
                let mut sa = vec![0.0f32; g.scale_count(dims.m, dims.k)];
                quantize_dequantize(a, dims.m, dims.k, g, ScaleMode::Amax, &mut qa, &mut sa)?;
                self.matmul_rows(Precision::F32, &qa, b, c, dims)
            }
        }
    }

    /// FP8 GEMM with a weight already held in FP8 (`b`: codes + scales, tiled as `form.b_granularity()`,
    /// i.e. 128×128 blocks for `AB`/`ABt`): only `a` is quantized. Same result as [`Backend::matmul`] with
    /// `Precision::Fp8` on the f32 weight `b` came from. This default works for any backend by dequantizing
    /// into fresh buffers and running the f32 product; backends override it to reuse workspaces or feed the
    /// codes to FP8 hardware directly.
    #[allow(clippy::too_many_arguments)]
    fn matmul_quantized_b(
        &mut self,
        form: Form,
        a: &[f32],
        b: &QuantizedTensor,
        c: &mut [f32],
        dims: Dims,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        check_quantized_b("matmul_quantized_b", form, dims, a.len(), b, c.len())?;
        let (ar, ac) = form.a_shape(dims);
        let ga = form.a_granularity();
        let mut qa = vec![0.0f32; a.len()];
        let mut sa = vec![0.0f32; ga.scale_count(ar, ac)];
        quantize_dequantize(a, ar, ac, ga, ScaleMode::Amax, &mut qa, &mut sa)?;
        self.matmul(
            Precision::F32,
            form,
            &qa,
            &b.dequantize(),
            c,
            dims,
            accumulate,
        )
    }
}

/// The CPU backend: f32 GEMM from the `gemm` crate on all cores, FP8 by fine-grained quantization into
/// reused workspaces followed by that GEMM (see [`crate::gemm::cpu`]). Once warm it allocates nothing per
/// call.
#[derive(Debug)]
pub struct CpuBackend {
    /// A private rayon pool when a thread count was asked for; `None` runs on the global pool.
    pool: Option<Arc<rayon::ThreadPool>>,
    /// Threads the GEMM may use (0 = all of the pool's).
    threads: usize,
    /// Dequantized FP8 operands and their scales, reused across calls.
    fp8: Fp8Workspace,
    /// How FP8 tile scales are chosen.
    scale_mode: ScaleMode,
    /// Name reported by [`Backend::name`].
    name: String,
}

impl CpuBackend {
    /// A backend on rayon's global pool (all cores, or `RAYON_NUM_THREADS`).
    pub fn new() -> Self {
        Self {
            pool: None,
            threads: 0,
            fp8: Fp8Workspace::default(),
            scale_mode: ScaleMode::Amax,
            name: "cpu".into(),
        }
    }

    /// A backend with its own pool of `n` threads (`0` = as many as cores). If the OS refuses to start the
    /// threads, it falls back to the global pool, capped at `n` threads for the GEMM.
    pub fn with_threads(n: usize) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .ok()
            .map(Arc::new);
        let threads = pool.as_ref().map_or(n, |p| p.current_num_threads());
        Self {
            pool,
            threads,
            name: format!("cpu({threads} threads)"),
            ..Self::new()
        }
    }

    /// Chooses how FP8 scales are computed (default [`ScaleMode::Amax`]).
    pub fn with_scale_mode(mut self, mode: ScaleMode) -> Self {
        self.scale_mode = mode;
        self
    }

    /// The FP8 scale mode in use.
    pub fn scale_mode(&self) -> ScaleMode {
        self.scale_mode
    }

    /// Bytes held by the FP8 workspace (grows to the largest operands seen, then stays).
    pub fn workspace_bytes(&self) -> usize {
        self.fp8.bytes()
    }
}

/// Runs `run` on `pool` when the backend has a pool of its own, on the calling thread (rayon's global
/// pool) otherwise: every product of [`CpuBackend`] goes through here.
fn on_pool<R: Send>(pool: &Option<Arc<rayon::ThreadPool>>, run: impl FnOnce() -> R + Send) -> R {
    match pool {
        Some(pool) => pool.install(run),
        None => run(),
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn matmul(
        &mut self,
        precision: Precision,
        form: Form,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        dims: Dims,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        let threads = self.threads;
        let mode = self.scale_mode;
        let ws = &mut self.fp8;
        let run = move || match precision {
            Precision::F32 => {
                check_operands("matmul", form, dims, a.len(), b.len(), c.len())?;
                gemm_f32_checked(form, a, b, c, dims, accumulate, threads);
                Ok(())
            }
            Precision::Fp8 => matmul_fp8(ws, mode, form, a, b, c, dims, accumulate, threads),
        };
        on_pool(&self.pool, run)
    }

    fn matmul_rows(
        &mut self,
        precision: Precision,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        dims: Dims,
    ) -> Result<(), KernelError> {
        let mode = self.scale_mode;
        let ws = &mut self.fp8;
        let run = move || match precision {
            Precision::F32 => matmul_rows_f32(a, b, c, dims),
            Precision::Fp8 => matmul_rows_fp8(ws, mode, a, b, c, dims),
        };
        on_pool(&self.pool, run)
    }

    fn round_weight_fp8(
        &mut self,
        w: &[f32],
        rows: usize,
        cols: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let g = Granularity::Block128x128;
        let mut scales = vec![0.0f32; g.scale_count(rows, cols)];
        quantize_dequantize(w, rows, cols, g, self.scale_mode, out, &mut scales)
    }

    fn matmul_rows_rounded_b(
        &mut self,
        precision: Precision,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        dims: Dims,
    ) -> Result<(), KernelError> {
        let mode = self.scale_mode;
        let ws = &mut self.fp8;
        let run = move || match precision {
            Precision::F32 => matmul_rows_f32(a, b, c, dims),
            Precision::Fp8 => matmul_rows_fp8_rounded_b(ws, mode, a, b, c, dims),
        };
        on_pool(&self.pool, run)
    }

    fn matmul_quantized_b(
        &mut self,
        form: Form,
        a: &[f32],
        b: &QuantizedTensor,
        c: &mut [f32],
        dims: Dims,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        let (threads, mode, ws) = (self.threads, self.scale_mode, &mut self.fp8);
        let run =
            move || matmul_fp8_quantized_b(ws, mode, form, a, b, c, dims, accumulate, threads);
        on_pool(&self.pool, run)
    }
}

/// A view of a backend for inference whose Linear forwards ([`Form::ABt`] without accumulation) go through
/// [`Backend::matmul_rows`] (or, when the weights it is handed were rounded to FP8 beforehand,
/// [`Backend::matmul_rows_rounded_b`]): the model's forward code runs unchanged on it, and every row it
/// computes is independent of how many rows the pass holds. The KV-cached decoder and the window
/// recomputation it is checked against both run on this view; training never does.
pub struct RowInvariant<'a> {
    backend: &'a mut dyn Backend,
    rounded_weights: bool,
}

impl<'a> RowInvariant<'a> {
    /// The view, for weights as they are.
    pub fn new(backend: &'a mut dyn Backend) -> Self {
        Self {
            backend,
            rounded_weights: false,
        }
    }

    /// The view, for weights the caller rounded with [`Backend::round_weight_fp8`] (every weight an FP8
    /// product will take as B; f32 products take theirs unrounded).
    pub fn with_rounded_weights(backend: &'a mut dyn Backend) -> Self {
        Self {
            backend,
            rounded_weights: true,
        }
    }
}

impl Backend for RowInvariant<'_> {
    fn name(&self) -> &str {
        self.backend.name()
    }

    fn matmul(
        &mut self,
        precision: Precision,
        form: Form,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        dims: Dims,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        match (form, accumulate) {
            (Form::ABt, false) => self.matmul_rows(precision, a, b, c, dims),
            _ => self
                .backend
                .matmul(precision, form, a, b, c, dims, accumulate),
        }
    }

    fn matmul_rows(
        &mut self,
        precision: Precision,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        dims: Dims,
    ) -> Result<(), KernelError> {
        if self.rounded_weights {
            self.backend.matmul_rows_rounded_b(precision, a, b, c, dims)
        } else {
            self.backend.matmul_rows(precision, a, b, c, dims)
        }
    }
}
