//! Runtime SIMD dispatch for hand-written loops. The crate is built for the baseline x86-64 target (SSE2),
//! where LLVM cannot vectorise our integer-min/max and float-to-byte loops well. `multiversion!` wraps an
//! `#[inline(always)]` kernel in copies compiled for AVX-512 and AVX2 and picks one at run time from
//! [`simd_level`]. Results are identical at every level — the kernels use only exact integer operations and
//! correctly rounded IEEE arithmetic — only speed differs.

use std::sync::OnceLock;

/// The widest instruction set the dispatcher found on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    /// No wider SIMD than the build target's baseline.
    Baseline,
    /// AVX2 + FMA (x86-64-v3).
    Avx2,
    /// AVX-512 F/BW/DQ/VL (x86-64-v4).
    Avx512,
}

/// The SIMD level of this CPU, detected once.
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> SimdLevel {
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        SimdLevel::Avx512
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        SimdLevel::Avx2
    } else {
        SimdLevel::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> SimdLevel {
    SimdLevel::Baseline
}

/// Defines `fn $name<generics>(args) -> ret` that calls the `#[inline(always)]` function `$kernel` with the
/// same arguments, from a copy compiled for the best SIMD level of the running CPU. Because `$kernel` is
/// inlined into each copy, its loops are vectorised for that level.
macro_rules! multiversion {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident<$($g:ident: $b:path),*>($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $kernel:ident;
    ) => {
        $(#[$meta])*
        $vis fn $name<$($g: $b),*>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn v4<$($g: $b),*>($($arg: $ty),*) -> $ret {
                    $kernel::<$($g),*>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3<$($g: $b),*>($($arg: $ty),*) -> $ret {
                    $kernel::<$($g),*>($($arg),*)
                }
                match $crate::simd::simd_level() {
                    // SAFETY: `simd_level` reports Avx512 only after detecting every feature `v4` enables.
                    $crate::simd::SimdLevel::Avx512 => return unsafe { v4::<$($g),*>($($arg),*) },
                    // SAFETY: `simd_level` reports Avx2 only after detecting AVX2 and FMA.
                    $crate::simd::SimdLevel::Avx2 => return unsafe { v3::<$($g),*>($($arg),*) },
                    $crate::simd::SimdLevel::Baseline => {}
                }
            }
            $kernel::<$($g),*>($($arg),*)
        }
    };
}
pub(crate) use multiversion;
