//! A warm training step of the model does not allocate (beyond rayon's own queue blocks): activations, gradient scratch and optimizer moments
//! are sized once. Counted with a counting global allocator; allocations made inside the backend's GEMM
//! are excluded (the `gemm` crate packs its operands into small per-call buffers, which is its business and
//! is measured by the GEMM's own tests and benches).
#![allow(clippy::unwrap_used)]

mod model_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use mana_kernels::error::KernelError;
use mana_kernels::gemm::{Dims, Form, Precision};
use mana_kernels::model::ModelConfig;
use mana_kernels::optim::OptimConfig;
use mana_kernels::train::Trainer;
use mana_kernels::{Backend, CpuBackend};
use model_support::{random_batch, tiny_config};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static IN_BACKEND: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

fn count() {
    if COUNTING.load(Ordering::Relaxed) && !IN_BACKEND.load(Ordering::Relaxed) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; it only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The CPU backend, with a flag raised while a GEMM runs (the model calls GEMMs one at a time, and none of
/// its own rayon work runs concurrently with one).
struct FlaggedBackend(CpuBackend);

impl Backend for FlaggedBackend {
    fn name(&self) -> &str {
        "flagged-cpu"
    }
    fn matmul(
        &mut self,
        p: Precision,
        f: Form,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        d: Dims,
        acc: bool,
    ) -> Result<(), KernelError> {
        IN_BACKEND.store(true, Ordering::SeqCst);
        let r = self.0.matmul(p, f, a, b, c, d, acc);
        IN_BACKEND.store(false, Ordering::SeqCst);
        r
    }
}

#[test]
fn warm_training_steps_do_not_allocate_outside_the_gemm() {
    for precision in [Precision::F32, Precision::Fp8] {
        let cfg = ModelConfig {
            precision,
            ..tiny_config()
        };
        let backend = Box::new(FlaggedBackend(CpuBackend::new()));
        let mut tr = Trainer::new(cfg, OptimConfig::default(), 1, backend).unwrap();
        let batches: Vec<_> = (0..8).map(|i| random_batch(i, 2, 8, 32)).collect();
        for b in &batches[..3] {
            tr.model_mut().zero_grads();
            tr.accumulate(b).unwrap();
            tr.apply_update().unwrap();
        }
        ALLOCS.store(0, Ordering::SeqCst);
        COUNTING.store(true, Ordering::SeqCst);
        for b in &batches[3..] {
            tr.model_mut().zero_grads();
            tr.accumulate(b).unwrap();
            tr.apply_update().unwrap();
        }
        COUNTING.store(false, Ordering::SeqCst);
        let n = ALLOCS.load(Ordering::SeqCst);
        // rayon's injector queue (crossbeam) allocates a block every few dozen jobs sent from outside the
        // pool, which shows up as a handful per step; a per-op or per-layer allocation in the model would
        // be dozens per step.
        println!("{precision:?}: {n} allocations in 5 warm steps");
        assert!(n <= 2 * 5, "{precision:?}: {n} allocations in 5 warm steps");
    }
}
