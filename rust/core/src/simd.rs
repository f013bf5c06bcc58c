//! Run-time choice of the instruction set the kernels are compiled for.
//!
//! Every kernel is written once as a plain loop (`Kernel::run`, `#[inline(always)]`) and inlined
//! into one trampoline per instruction set, each a `#[target_feature]` function, so LLVM
//! vectorises the same source for AVX-512, AVX2+FMA, NEON and the baseline ISA. Rust never
//! contracts `a * b + c` on its own; the kernels call `mul_add` only where torch's CPU kernels fuse
//! (`element.rs`), and `mul_add` rounds once on every path (an FMA instruction, or libm's `fma` on
//! the baseline one). So every path rounds exactly as the baseline one does: the paths agree bit
//! for bit, which the tests check.
//!
//! We dispatch by hand rather than through `multiversion`/`pulp` because the path must be
//! selectable at run time (`RSOPTIM_SIMD`) so every path can be tested on one machine.

use std::fmt;

use crate::element::{f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits};
use std::sync::OnceLock;

/// The environment variable that forces a path: `scalar`, `avx2`, `avx512`, `neon` or `auto`.
pub const SIMD_ENV_VAR: &str = "RSOPTIM_SIMD";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimdLevel {
    /// The target's baseline ISA (SSE2 on x86-64), always compiled, always available.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (x86-64-v3).
    Avx2,
    /// x86-64 AVX-512 F/VL/BW/DQ (x86-64-v4).
    Avx512,
    /// aarch64 Advanced SIMD.
    Neon,
}

impl SimdLevel {
    pub const ALL: [SimdLevel; 4] = [Self::Scalar, Self::Avx2, Self::Avx512, Self::Neon];

    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
            Self::Neon => "neon",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|level| level.name() == name.trim().to_ascii_lowercase())
    }

    /// Whether this CPU can run the path (checked with the CPU's feature flags).
    pub fn is_available(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "aarch64")]
            Self::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every path this CPU can run, baseline first.
    pub fn available() -> Vec<SimdLevel> {
        Self::ALL.into_iter().filter(|level| level.is_available()).collect()
    }

    /// The fastest path this CPU can run.
    pub fn best() -> SimdLevel {
        [Self::Avx512, Self::Avx2, Self::Neon].into_iter().find(|level| level.is_available()).unwrap_or(Self::Scalar)
    }

    /// The path named by `RSOPTIM_SIMD` (or the best one when unset or `auto`).
    pub fn from_env() -> Result<SimdLevel, SimdError> {
        match std::env::var(SIMD_ENV_VAR) {
            Err(_) => Ok(Self::best()),
            Ok(value) if value.trim().is_empty() || value.trim().eq_ignore_ascii_case("auto") => Ok(Self::best()),
            Ok(value) => {
                let level = Self::parse(&value).ok_or_else(|| SimdError::Unknown(value.clone()))?;
                if level.is_available() {
                    Ok(level)
                } else {
                    Err(SimdError::Unavailable(level))
                }
            }
        }
    }

    /// The path picked once per process from `RSOPTIM_SIMD`.
    pub fn selected() -> Result<SimdLevel, SimdError> {
        static SELECTED: OnceLock<Result<SimdLevel, SimdError>> = OnceLock::new();
        SELECTED.get_or_init(Self::from_env).clone()
    }
}

impl fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimdError {
    Unknown(String),
    Unavailable(SimdLevel),
}

impl fmt::Display for SimdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = SimdLevel::ALL.iter().map(|l| l.name()).collect();
        match self {
            Self::Unknown(value) => {
                write!(f, "{SIMD_ENV_VAR}={value:?} names no SIMD path; use auto or one of {names:?}")
            }
            Self::Unavailable(level) => {
                write!(
                    f,
                    "{SIMD_ENV_VAR}={level} asks for a SIMD path this CPU cannot run; available: {:?}",
                    SimdLevel::available().iter().map(|l| l.name()).collect::<Vec<_>>()
                )
            }
        }
    }
}

impl std::error::Error for SimdError {}

/// A loop to be compiled once per instruction set. Implementations mark `run`
/// `#[inline(always)]`, so that it is inlined into (and vectorised for) each trampoline; `isa`
/// proves which instruction set that is, for the conversions that need its intrinsics.
pub trait Kernel {
    type Output;
    fn run<I: Isa>(self, isa: I) -> Self::Output;
}

/// An instruction set the running CPU has, as a value: one exists only where the CPU was checked
/// (or for the baseline ISA, which every CPU of the target has), so code holding one may use its
/// intrinsics. Only the block conversions between float16 and float32 differ between ISAs: the
/// other loops are vectorised by LLVM from the same source.
pub trait Isa: Copy {
    /// The AVX2 token where this ISA includes AVX2 (the AVX-512 one does), for the few loops
    /// written with AVX2 intrinsics.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn avx2(self) -> Option<Avx2> {
        None
    }

    /// The AVX-512 token where this ISA is AVX-512, for the loops written with its intrinsics.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn avx512(self) -> Option<Avx512> {
        None
    }

    /// `dst[i] = src[i]` exactly, float16 to float32.
    #[inline(always)]
    fn f16_to_f32(self, src: &[half::f16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f16_bits_to_f32(s.to_bits());
        }
    }

    /// `dst[i] = src[i]` rounded to the nearest float16 (ties to even).
    #[inline(always)]
    fn f32_to_f16(self, src: &[f32], dst: &mut [half::f16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = half::f16::from_bits(f32_to_f16_bits(*s));
        }
    }

    /// `dst[i] = src[i]` rounded to the nearest bfloat16 (ties to even, NaN the quiet NaN).
    #[inline(always)]
    fn f32_to_bf16(self, src: &[f32], dst: &mut [half::bf16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = half::bf16::from_bits(f32_to_bf16_bits(*s));
        }
    }
}

/// The target's baseline ISA (and NEON, whose float16 conversions Rust cannot reach on stable).
#[derive(Clone, Copy, Debug)]
pub struct Baseline;
impl Isa for Baseline {}

/// AVX2 + FMA + F16C; made only by `run_avx2`.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub struct Avx2(());

/// AVX-512 F/VL/BW/DQ (with AVX2, FMA, F16C); made only by `run_avx512`, which records whether
/// the CPU also has AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub struct Avx512 {
    bf16: bool,
}

// F16C's and AVX-512's conversions round to nearest even (as the immediate says) and keep
// float16 subnormals whatever MXCSR says (they are torch's vectorised conversions too); the
// scalar tails take the baseline's, and `tests/half.rs` checks that all give the same bits.
#[cfg(target_arch = "x86_64")]
const ROUND_NEAREST_EVEN: i32 = std::arch::x86_64::_MM_FROUND_TO_NEAREST_INT;
#[cfg(target_arch = "x86_64")]
const ROUND_NEAREST_EVEN_NO_EXC: i32 = ROUND_NEAREST_EVEN | std::arch::x86_64::_MM_FROUND_NO_EXC;

#[cfg(target_arch = "x86_64")]
impl Isa for Avx2 {
    #[inline(always)]
    fn avx2(self) -> Option<Avx2> {
        Some(self)
    }

    #[inline(always)]
    fn f16_to_f32(self, src: &[half::f16], dst: &mut [f32]) {
        use std::arch::x86_64::*;
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: an `Avx2` exists only inside `run_avx2`, whose caller checked F16C and AVX;
            // `i + 8 <= n` keeps the 8-element load and store inside both slices.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i).cast::<__m128i>());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        Baseline.f16_to_f32(&src[i..n], &mut dst[i..n]);
    }

    #[inline(always)]
    fn f32_to_f16(self, src: &[f32], dst: &mut [half::f16]) {
        use std::arch::x86_64::*;
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: as in `f16_to_f32`.
            unsafe {
                let h = _mm256_cvtps_ph::<ROUND_NEAREST_EVEN>(_mm256_loadu_ps(src.as_ptr().add(i)));
                _mm_storeu_si128(dst.as_mut_ptr().add(i).cast::<__m128i>(), h);
            }
            i += 8;
        }
        Baseline.f32_to_f16(&src[i..n], &mut dst[i..n]);
    }
}

#[cfg(target_arch = "x86_64")]
impl Isa for Avx512 {
    #[inline(always)]
    fn avx2(self) -> Option<Avx2> {
        Some(Avx2(())) // AVX-512 as checked here includes AVX2 (`is_available`)
    }

    #[inline(always)]
    fn avx512(self) -> Option<Avx512> {
        Some(self)
    }

    #[inline(always)]
    fn f16_to_f32(self, src: &[half::f16], dst: &mut [f32]) {
        use std::arch::x86_64::*;
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: an `Avx512` exists only inside `run_avx512`, whose caller checked
            // AVX-512F; `i + 16 <= n` keeps the 16-element load and store inside both slices.
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr().add(i).cast::<__m256i>());
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
            }
            i += 16;
        }
        Avx2(()).f16_to_f32(&src[i..n], &mut dst[i..n]);
    }

    #[inline(always)]
    fn f32_to_f16(self, src: &[f32], dst: &mut [half::f16]) {
        use std::arch::x86_64::*;
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: as in `f16_to_f32`.
            unsafe {
                let h = _mm512_cvtps_ph::<{ ROUND_NEAREST_EVEN_NO_EXC }>(_mm512_loadu_ps(src.as_ptr().add(i)));
                _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast::<__m256i>(), h);
            }
            i += 16;
        }
        // (AVX-512 includes AVX2 and F16C: `is_available` checks them too.)
        Avx2(()).f32_to_f16(&src[i..n], &mut dst[i..n]);
    }

    #[inline(always)]
    fn f32_to_bf16(self, src: &[f32], dst: &mut [half::bf16]) {
        if self.bf16 {
            // SAFETY: `bf16` is set only where the CPU has AVX-512 BF16 (see `run_avx512`), and
            // an `Avx512` exists only where it has AVX-512 F/BW/DQ.
            unsafe { f32_to_bf16_avx512bf16(src, dst) }
        } else {
            Baseline.f32_to_bf16(src, dst)
        }
    }
}

/// `Isa::f32_to_bf16` with AVX-512 BF16's conversion, 32 values an instruction. It rounds to
/// nearest even as `f32_to_bf16_bits` does, but flushes float32 subnormals to zero and keeps a
/// NaN's sign and payload: a vector holding either takes the baseline's conversion (found with
/// integer compares, which MXCSR's denormals-are-zero cannot affect). (Called once per block,
/// not inlined: the trampolines are not compiled for BF16.)
///
/// # Safety
/// The CPU must have AVX-512 F, BW, DQ and BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
unsafe fn f32_to_bf16_avx512bf16(src: &[f32], dst: &mut [half::bf16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut i = 0;
    // Lanes whose |bits| - 1 is below 0x7fffff are subnormal; above 0x7f800000, NaN.
    let (magnitude, one) = (_mm512_set1_epi32(0x7fff_ffff), _mm512_set1_epi32(1));
    let (subnormal_below, nan_above) = (_mm512_set1_epi32(0x007f_ffff), _mm512_set1_epi32(0x7f80_0000));
    let special = |x: __m512| {
        let abs = _mm512_and_si512(_mm512_castps_si512(x), magnitude);
        _mm512_cmplt_epu32_mask(_mm512_sub_epi32(abs, one), subnormal_below) | _mm512_cmpgt_epu32_mask(abs, nan_above)
    };
    while i + 32 <= n {
        // SAFETY: `i + 32 <= n` keeps the loads and the store inside both slices; the features
        // are this function's contract.
        unsafe {
            let lo = _mm512_loadu_ps(src.as_ptr().add(i));
            let hi = _mm512_loadu_ps(src.as_ptr().add(i + 16));
            if special(lo) | special(hi) == 0 {
                let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.as_mut_ptr().add(i).cast::<__m512i>(), packed);
            } else {
                Baseline.f32_to_bf16(&src[i..i + 32], &mut dst[i..i + 32]);
            }
        }
        i += 32;
    }
    Baseline.f32_to_bf16(&src[i..n], &mut dst[i..n]);
}

/// Asks the CPU to start loading the cache line holding `address` into its first-level cache.
/// Safe for any address: a prefetch is only a hint, which never faults and changes nothing but
/// the caches (an unmapped or foreign address is simply dropped). A no-op off x86-64.
#[inline(always)]
pub fn prefetch(address: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is in every x86-64 CPU (SSE) and reads nothing architecturally: it
    // cannot fault, whatever `address` is.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address.cast())
    };
    let _ = address;
}

/// Prefetches `start + offset` where `offset` begins a 64-byte line (line-aligned from `start`).
/// A loop that advances `offset` by at most a line a turn and calls this every turn asks for
/// each line once. Safe for any address, as `prefetch`.
#[inline(always)]
pub fn prefetch_once_per_line(start: *const u8, offset: usize) {
    if offset.is_multiple_of(64) {
        prefetch(start.wrapping_add(offset));
    }
}

/// Runs `kernel` compiled for `level`. A path the CPU cannot run falls back to the baseline one,
/// so no caller can reach an instruction the CPU lacks.
#[inline]
pub fn dispatch<K: Kernel>(level: SimdLevel, kernel: K) -> K::Output {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if level.is_available() => {
            // SAFETY: `is_available` has just checked that the CPU has every feature
            // `run_avx512` is compiled with.
            unsafe { run_avx512(kernel) }
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if level.is_available() => {
            // SAFETY: as above, for AVX2, FMA and F16C.
            unsafe { run_avx2(kernel) }
        }
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon if level.is_available() => {
            // SAFETY: as above, for NEON.
            unsafe { run_neon(kernel) }
        }
        _ => kernel.run(Baseline),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")]
unsafe fn run_avx512<K: Kernel>(kernel: K) -> K::Output {
    kernel.run(Avx512 { bf16: is_x86_feature_detected!("avx512bf16") })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2<K: Kernel>(kernel: K) -> K::Output {
    kernel.run(Avx2(()))
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn run_neon<K: Kernel>(kernel: K) -> K::Output {
    kernel.run(Baseline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetching_any_address_is_harmless() {
        let value = 7u64;
        let inside = (&value as *const u64).cast::<u8>();
        // Null, the first page (never mapped), a kernel address, the top of the address space,
        // and past the end of a value on the stack.
        for address in
            [std::ptr::null(), 64 as *const u8, 0xffff_8000_0000_0000usize as *const u8, usize::MAX as *const u8]
        {
            prefetch(address);
        }
        prefetch(inside.wrapping_add(1 << 30));
        assert_eq!(value, 7);
    }

    #[test]
    fn names_round_trip() {
        for level in SimdLevel::ALL {
            assert_eq!(SimdLevel::parse(level.name()), Some(level));
        }
        assert_eq!(SimdLevel::parse(" AVX2 "), Some(SimdLevel::Avx2));
        assert_eq!(SimdLevel::parse("sse9"), None);
    }

    #[test]
    fn scalar_is_always_available_and_best_is_available() {
        assert!(SimdLevel::Scalar.is_available());
        assert!(SimdLevel::best().is_available());
        assert!(SimdLevel::available().contains(&SimdLevel::best()));
    }

    struct Sum<'a>(&'a [f32]);
    impl Kernel for Sum<'_> {
        type Output = f32;
        #[inline(always)]
        fn run<I: Isa>(self, _isa: I) -> f32 {
            self.0.iter().sum()
        }
    }

    #[test]
    fn unavailable_level_falls_back_to_baseline() {
        // Whatever this CPU is, every level must run (the unavailable ones on the baseline path).
        let data = [1.0f32, 2.0, 3.0];
        for level in SimdLevel::ALL {
            assert_eq!(dispatch(level, Sum(&data)), 6.0);
        }
    }
}
