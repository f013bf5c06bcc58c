//! The kernels against a plain scalar reference written from the equations of
//! `docs/torch-contract.md` (torch.optim's for-loop implementation), and the kernels against
//! themselves: every SIMD path and every thread count must give the same bits.
//!
//! The reference below is deliberately naive: one element at a time, one tensor at a time,
//! hyperparameters computed in `f64` (as Python floats) and rounded to the tensor's dtype right
//! where torch passes them to a tensor op. It shares no code with the crate: its float helpers,
//! its lerp and its NaN-propagating max are its own.
//!
//! Tolerances (see `REFERENCE_ULPS` and `NORM_RTOL`):
//! * optimizer steps: 0 ulp. The reference performs the same IEEE-754 operations (`+ - * /`,
//!   `sqrt` and fused multiply-add, all correctly rounded) on the same operands in the same
//!   order, with the same constants rounded from the same `f64` values. Fused multiply-adds sit
//!   exactly where ATen's vectorised CPU kernels put them (`add` with `alpha`, `addcmul`, `lerp`;
//!   not `addcdiv`), as measured against torch 2.13; Rust never contracts `a * b + c` on its
//!   own. The bias corrections are computed in `f64` with the
//!   platform's `pow` on both sides. So nothing is left that could differ by even one ulp, and a
//!   single ulp of difference means the kernel computes something else than torch's for-loop.
//!   Only NaN payloads are not compared (IEEE and LLVM leave them unspecified): any NaN equals
//!   any NaN; every other bit, the sign of zero included, must match.
//! * SIMD paths and thread counts: bit for bit (same NaN rule), for every kernel and the norms.
//! * norms: the kernel accumulates `|x|^p`, each term rounded to the tensor's dtype (torch
//!   computes a norm in the tensor's dtype, so float32 squares overflow and underflow as
//!   torch's do), in `f64` in 32 lanes per 64K chunk, and a sum past the dtype's range is inf; the reference
//!   uses compensated (Neumaier) summation, i.e. is nearly exact. The kernel's error is then
//!   bounded by about (n/32 + 64) * 2^-53 relative for positive terms, ~4e-13 for the largest
//!   tensors here (~330K elements), and its expected error is far below that; `1e-12` leaves a
//!   margin of a few for `p = 0.5`, whose final square doubles the relative error. The inf-norm
//!   is a max, which is exact: compared exactly.

#[cfg(unix)]
mod unmapped;

use std::fmt::Debug;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rsoptim_core::raw::{check_buffers, Buffer};
use rsoptim_core::{
    adam_step, rmsprop_step, scale_in_place, sgd_step, tensor_norm, tensor_norms, AdamHyper, AdamTensor, Error,
    Executor, NormType, Real, RmspropHyper, RmspropTensor, Rounding, SgdHyper, SgdTensor, SimdLevel, StepCount, CHUNK,
};

/// Kernel (scalar path, one thread) vs reference, in ulps. See the module docs: exactly 0.
const REFERENCE_ULPS: u64 = 0;
/// Relative tolerance of the norms against the compensated `f64` reference (module docs).
const NORM_RTOL: f64 = 1e-12;

// ------------------------------------------------------------------------------------------
// The reference's own float helpers.
// ------------------------------------------------------------------------------------------

/// What the reference needs of a float type, implemented here without the crate's helpers.
/// (`Real` is only required so the same type can be handed to the kernels.)
trait Ref: Real + Debug {
    const NAME: &'static str;
    const WIDTH: u32;
    /// A Python float passed to a tensor op of this dtype: rounded to nearest.
    fn hp(x: f64) -> Self;
    fn root(self) -> Self;
    /// `self * b + c` with one rounding.
    fn fused(self, b: Self, c: Self) -> Self;
    fn bits(self) -> u64;
    fn wide(self) -> f64;
}

impl Ref for f32 {
    const NAME: &'static str = "f32";
    const WIDTH: u32 = 32;
    fn hp(x: f64) -> Self {
        x as f32
    }
    fn root(self) -> Self {
        f32::sqrt(self)
    }
    fn fused(self, b: Self, c: Self) -> Self {
        f32::mul_add(self, b, c)
    }
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
    fn wide(self) -> f64 {
        f64::from(self)
    }
}

impl Ref for f64 {
    const NAME: &'static str = "f64";
    const WIDTH: u32 = 64;
    fn hp(x: f64) -> Self {
        x
    }
    fn root(self) -> Self {
        f64::sqrt(self)
    }
    fn fused(self, b: Self, c: Self) -> Self {
        f64::mul_add(self, b, c)
    }
    fn bits(self) -> u64 {
        self.to_bits()
    }
    fn wide(self) -> f64 {
        self
    }
}

/// `torch.lerp(start, end, weight)` as ATen's vectorised kernel computes it:
/// `fma(weight, end - start, start)` for |w| < 0.5, else `fma(weight - 1, end - start, end)`.
fn torch_lerp<T: Ref>(start: T, end: T, weight: T) -> T {
    if weight.abs() < T::hp(0.5) {
        weight.fused(end - start, start)
    } else {
        (weight - T::hp(1.0)).fused(end - start, end)
    }
}

/// `input.add(other, alpha=alpha)`: `fma(other, alpha, input)`.
fn torch_add<T: Ref>(input: T, other: T, alpha: T) -> T {
    other.fused(alpha, input)
}

/// `input.addcmul(t1, t2, value=value)`: `fma(value * t1, t2, input)`.
fn torch_addcmul<T: Ref>(input: T, t1: T, t2: T, value: T) -> T {
    (value * t1).fused(t2, input)
}

/// `input.addcdiv(t1, t2, value=value)`: `input + (value * t1) / t2`, nothing fused.
fn torch_addcdiv<T: Ref>(input: T, t1: T, t2: T, value: T) -> T {
    input + (value * t1) / t2
}

/// `torch.maximum`: NaN if either side is NaN.
fn torch_maximum<T: Ref>(a: T, b: T) -> T {
    if a.is_nan() {
        a
    } else if b.is_nan() || b > a {
        b
    } else {
        a
    }
}

/// The same value: identical bits, or both NaN (payloads are unspecified).
fn same<T: Ref>(a: T, b: T) -> bool {
    a.bits() == b.bits() || (a.is_nan() && b.is_nan())
}

/// Distance in units in the last place (sign-magnitude mapped onto a line).
fn ulps<T: Ref>(a: T, b: T) -> u64 {
    let ordered = |x: T| -> i128 {
        let bits = x.bits();
        let sign = 1u64 << (T::WIDTH - 1);
        if bits & sign != 0 {
            -((bits & !sign) as i128)
        } else {
            bits as i128
        }
    };
    (ordered(a) - ordered(b)).unsigned_abs().min(u64::MAX as u128) as u64
}

fn compare<T: Ref>(what: &str, got: &[T], want: &[T], max_ulps: u64) -> Result<(), TestCaseError> {
    if got.len() != want.len() {
        return Err(TestCaseError::fail(format!("{what}: {} elements, expected {}", got.len(), want.len())));
    }
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let ok = same(a, b) || (!a.is_nan() && !b.is_nan() && ulps(a, b) <= max_ulps);
        if !ok {
            return Err(TestCaseError::fail(format!(
                "{what}[{i}] of {}: got {a:?} ({:#x}), expected {b:?} ({:#x}): {} ulps apart (allowed {max_ulps})",
                got.len(),
                a.bits(),
                b.bits(),
                ulps(a, b)
            )));
        }
    }
    Ok(())
}

fn compare_opt<T: Ref>(
    what: &str,
    got: &Option<Vec<T>>,
    want: &Option<Vec<T>>,
    max_ulps: u64,
) -> Result<(), TestCaseError> {
    match (got, want) {
        (Some(g), Some(w)) => compare(what, g, w, max_ulps),
        (None, None) => Ok(()),
        _ => Err(TestCaseError::fail(format!("{what}: present on one side only"))),
    }
}

// ------------------------------------------------------------------------------------------
// Test data.
// ------------------------------------------------------------------------------------------

/// SplitMix64: the data of a case comes from one seed, so proptest only has to shrink sizes,
/// hyperparameters and the seed, never megabytes of values.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A value of varied magnitude: mostly log-uniform in [1e-4, 1e2] with either sign, with
    /// exact zeros of both signs, numbers that are subnormal in f32, and large ones.
    fn value(&mut self) -> f64 {
        let sign = if self.next() & 1 == 0 { 1.0 } else { -1.0 };
        match self.below(32) {
            0 => 0.0,
            1 => -0.0,
            2 => sign * 3e-40 * (1.0 + self.unit()),
            3 => sign * 1e4 * (1.0 + self.unit()),
            4 => sign * 1e-20 * (1.0 + self.unit()),
            _ => sign * 10f64.powf(self.unit() * 6.0 - 4.0),
        }
    }

    fn values<T: Ref>(&mut self, n: usize) -> Vec<T> {
        (0..n).map(|_| T::hp(self.value())).collect()
    }

    fn non_negative<T: Ref>(&mut self, n: usize) -> Vec<T> {
        (0..n).map(|_| T::hp(self.value().abs())).collect()
    }

    /// A per-tensor step count as torch keeps it: an f32 (default) or f64 0-dim tensor.
    fn step(&mut self) -> Step {
        let value = match self.below(6) {
            0 | 1 => 0.0,
            2 => 1.0,
            3 => self.below(20) as f64,
            4 => self.below(100_000) as f64,
            _ => 16_777_216.0, // 2^24: an f32 count no longer moves
        };
        if self.next() & 1 == 0 {
            Step::F32(value as f32)
        } else {
            Step::F64(value)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    F32(f32),
    F64(f64),
}

impl Step {
    fn count(&mut self) -> StepCount<'_> {
        match self {
            Step::F32(s) => StepCount::F32(s),
            Step::F64(s) => StepCount::F64(s),
        }
    }

    /// `state['step'] += 1` in the count's dtype, then `step.item()`.
    fn bump(&mut self) -> f64 {
        match self {
            Step::F32(s) => {
                *s += 1.0f32;
                f64::from(*s)
            }
            Step::F64(s) => {
                *s += 1.0;
                *s
            }
        }
    }

    fn bits(&self) -> u64 {
        match self {
            Step::F32(s) => u64::from(s.to_bits()) | (1 << 63),
            Step::F64(s) => s.to_bits(),
        }
    }
}

/// Every executor to run: each available SIMD path with 1, 2 and 3 threads, the multi-threaded
/// ones splitting every step however small. The first is the baseline (scalar, one thread); all
/// others must reproduce its bits.
fn executors() -> &'static [(String, Executor)] {
    static EXECUTORS: OnceLock<Vec<(String, Executor)>> = OnceLock::new();
    EXECUTORS.get_or_init(|| {
        let mut all = Vec::new();
        for level in SimdLevel::available() {
            for threads in [1, 2, 3] {
                let exec = Executor::new(threads, level).expect("thread pool").with_parallel_min_elements(0);
                all.push((format!("{level} x{threads}"), exec));
            }
        }
        assert_eq!(all[0].1.simd(), SimdLevel::Scalar);
        assert_eq!(all[0].1.threads(), 1);
        all
    })
}

fn baseline() -> &'static Executor {
    &executors()[0].1
}

fn bits_of<T: Ref>(xs: &[T]) -> Vec<u64> {
    xs.iter().map(|x| x.bits()).collect()
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

// ------------------------------------------------------------------------------------------
// Adam / AdamW.
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct AdamState<T> {
    p: Vec<T>,
    m: Vec<T>,
    v: Vec<T>,
    vmax: Option<Vec<T>>,
    step: Step,
}

impl<T: Ref> AdamState<T> {
    fn snapshot(&self) -> Vec<u64> {
        let mut s = bits_of(&self.p);
        s.extend(bits_of(&self.m));
        s.extend(bits_of(&self.v));
        s.extend(self.vmax.as_deref().map(bits_of).unwrap_or_default());
        s.push(self.step.bits());
        s
    }
}

/// The reference: torch's `_single_tensor_adam` for one tensor, from the contract.
fn adam_reference<T: Ref>(s: &mut AdamState<T>, grad: &[T], h: &AdamHyper) {
    let step = s.step.bump();
    // Python floats.
    let bias_correction1 = 1.0 - h.beta1.powf(step);
    let bias_correction2 = 1.0 - h.beta2.powf(step);
    // A Tensor lr is a float32 tensor in torch: the two products with it are float32 tensor ops.
    let (step_size, decay) = if h.lr_in_f32 {
        let lr = h.lr as f32;
        ((lr / bias_correction1 as f32) as f64, (1.0f32 - lr * h.weight_decay as f32) as f64)
    } else {
        (h.lr / bias_correction1, 1.0 - h.lr * h.weight_decay)
    };
    let bias_correction2_sqrt = bias_correction2.sqrt();
    for i in 0..s.p.len() {
        let mut g = if h.maximize { -grad[i] } else { grad[i] };
        let mut p = s.p[i];
        if h.weight_decay != 0.0 {
            if h.decoupled_weight_decay {
                p = p * T::hp(decay); // param.mul_(1 - lr*wd)
            } else {
                g = torch_add(g, p, T::hp(h.weight_decay)); // grad.add(param, alpha=wd)
            }
        }
        let m = torch_lerp(s.m[i], g, T::hp(1.0 - h.beta1));
        let v = torch_addcmul(s.v[i] * T::hp(h.beta2), g, g, T::hp(1.0 - h.beta2));
        s.m[i] = m;
        s.v[i] = v;
        let second = match s.vmax.as_mut() {
            Some(vmax) => {
                vmax[i] = torch_maximum(vmax[i], v);
                vmax[i]
            }
            None => v,
        };
        let denom = second.root() / T::hp(bias_correction2_sqrt) + T::hp(h.eps);
        s.p[i] = torch_addcdiv(p, m, denom, T::hp(-step_size)); // param.addcdiv_(m, denom, value=-step_size)
    }
}

fn adam_kernel<T: Ref>(
    states: &mut [AdamState<T>],
    grads: &[Vec<T>],
    h: &AdamHyper,
    exec: &Executor,
) -> Result<(), Error> {
    let tensors: Vec<AdamTensor<'_, T>> = states
        .iter_mut()
        .zip(grads)
        .map(|(s, g)| AdamTensor {
            param: &mut s.p,
            grad: g,
            exp_avg: &mut s.m,
            exp_avg_sq: &mut s.v,
            max_exp_avg_sq: s.vmax.as_deref_mut(),
            step: s.step.count(),
            master_param: None,
            rounding: Rounding::Nearest,
        })
        .collect();
    adam_step(tensors, h, exec)
}

fn adam_setup<T: Ref>(
    sizes: &[usize],
    steps: usize,
    amsgrad: bool,
    seed: u64,
) -> (Vec<AdamState<T>>, Vec<Vec<Vec<T>>>) {
    let mut rng = Rng(seed);
    let states = sizes
        .iter()
        .map(|&n| AdamState {
            p: rng.values(n),
            m: rng.values(n),
            v: rng.non_negative(n),
            vmax: amsgrad.then(|| rng.non_negative(n)),
            step: rng.step(),
        })
        .collect();
    let grads = (0..steps).map(|_| sizes.iter().map(|&n| rng.values(n)).collect()).collect();
    (states, grads)
}

/// Values in runs, as a unit that stopped learning leaves its state: runs of subnormals (the
/// smallest ones, which Adam's moving averages round back to themselves, and any), of zeros, of
/// ordinary values, and of `Rng::value`'s mix. The kernels step stretches of state that start
/// with subnormals in float64 arithmetic (see rsoptim_core's `subnormal` module): runs longer and
/// shorter than a stretch, starting at a stretch's start and inside one.
fn runs(rng: &mut Rng, n: usize, non_negative: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let (len, kind) = (1 + rng.below(700) as usize, rng.below(5));
        for _ in 0..len.min(n - out.len()) {
            let x = match kind {
                0 => f32::from_bits(1 + rng.below(4) as u32),
                1 => f32::from_bits(1 + rng.below(0x007f_ffff) as u32),
                2 => 0.0,
                3 => (rng.value() as f32).abs().max(f32::MIN_POSITIVE),
                _ => rng.value() as f32,
            };
            let negative = !non_negative && rng.next() & 1 == 1;
            out.push(if negative { -x } else { x });
        }
    }
    out
}

/// Each step's grads, in runs (see `runs`).
fn run_grads(rng: &mut Rng, sizes: &[usize], steps: usize) -> Vec<Vec<Vec<f32>>> {
    (0..steps).map(|_| sizes.iter().map(|&n| runs(rng, n, false)).collect()).collect()
}

/// The initial states of a case's tensors and each step's grads.
type Case<State> = (Vec<State>, Vec<Vec<Vec<f32>>>);

fn adam_subnormal_setup(sizes: &[usize], steps: usize, amsgrad: bool, seed: u64) -> Case<AdamState<f32>> {
    let mut rng = Rng(seed);
    let states = sizes
        .iter()
        .map(|&n| AdamState {
            p: rng.values(n),
            m: runs(&mut rng, n, false),
            v: runs(&mut rng, n, true),
            vmax: amsgrad.then(|| runs(&mut rng, n, true)),
            step: rng.step(),
        })
        .collect();
    (states, run_grads(&mut rng, sizes, steps))
}

fn compare_adam<T: Ref>(
    what: &str,
    got: &[AdamState<T>],
    want: &[AdamState<T>],
    max_ulps: u64,
) -> Result<(), TestCaseError> {
    for (t, (g, w)) in got.iter().zip(want).enumerate() {
        compare(&format!("{what} tensor {t} param"), &g.p, &w.p, max_ulps)?;
        compare(&format!("{what} tensor {t} exp_avg"), &g.m, &w.m, max_ulps)?;
        compare(&format!("{what} tensor {t} exp_avg_sq"), &g.v, &w.v, max_ulps)?;
        compare_opt(&format!("{what} tensor {t} max_exp_avg_sq"), &g.vmax, &w.vmax, max_ulps)?;
        if g.step != w.step {
            return Err(fail(format!("{what} tensor {t}: step {:?}, expected {:?}", g.step, w.step)));
        }
    }
    Ok(())
}

/// `steps` consecutive steps of every tensor: reference vs baseline kernel (REFERENCE_ULPS),
/// then every executor vs the baseline, bit for bit.
fn check_adam<T: Ref>(sizes: &[usize], steps: usize, h: &AdamHyper, seed: u64) -> Result<(), TestCaseError> {
    let (init, grads) = adam_setup::<T>(sizes, steps, h.amsgrad, seed);
    check_adam_from(init, &grads, h)
}

/// `check_adam` from given states and grads (a list of each step's).
fn check_adam_from<T: Ref>(init: Vec<AdamState<T>>, grads: &[Vec<Vec<T>>], h: &AdamHyper) -> Result<(), TestCaseError> {
    let mut want = init.clone();
    for step_grads in grads {
        for (s, g) in want.iter_mut().zip(step_grads) {
            adam_reference(s, g, h);
        }
    }
    let mut base: Option<Vec<AdamState<T>>> = None;
    for (name, exec) in executors() {
        let mut got = init.clone();
        for step_grads in grads {
            adam_kernel(&mut got, step_grads, h, exec).map_err(|e| fail(format!("adam {name}: {e}")))?;
        }
        match &base {
            None => compare_adam(&format!("adam {} {name} vs reference", T::NAME), &got, &want, REFERENCE_ULPS)?,
            Some(b) => compare_adam(&format!("adam {} {name} vs baseline", T::NAME), &got, b, 0)?,
        }
        base.get_or_insert(got);
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// SGD.
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct SgdState<T> {
    p: Vec<T>,
    buf: Option<Vec<T>>,
    buf_is_new: bool,
}

impl<T: Ref> SgdState<T> {
    fn snapshot(&self) -> Vec<u64> {
        let mut s = bits_of(&self.p);
        s.extend(self.buf.as_deref().map(bits_of).unwrap_or_default());
        s
    }
}

/// The reference: torch's `_single_tensor_sgd` for one tensor.
fn sgd_reference<T: Ref>(s: &mut SgdState<T>, grad: &[T], h: &SgdHyper) {
    assert_eq!(s.buf.is_some(), h.momentum != 0.0);
    for i in 0..s.p.len() {
        let p = s.p[i];
        let mut g = if h.maximize { -grad[i] } else { grad[i] };
        if h.weight_decay != 0.0 {
            g = torch_add(g, p, T::hp(h.weight_decay));
        }
        if let Some(buf) = s.buf.as_mut() {
            let b = if s.buf_is_new {
                g // torch.clone(grad): no dampening on the first step
            } else {
                torch_add(buf[i] * T::hp(h.momentum), g, T::hp(1.0 - h.dampening))
            };
            buf[i] = b;
            g = if h.nesterov { torch_add(g, b, T::hp(h.momentum)) } else { b };
        }
        s.p[i] = torch_add(p, g, T::hp(-h.lr)); // param.add_(grad, alpha=-lr)
    }
    s.buf_is_new = false;
}

fn sgd_kernel<T: Ref>(
    states: &mut [SgdState<T>],
    grads: &[Vec<T>],
    h: &SgdHyper,
    exec: &Executor,
) -> Result<(), Error> {
    let tensors: Vec<SgdTensor<'_, T>> = states
        .iter_mut()
        .zip(grads)
        .map(|(s, g)| SgdTensor {
            param: &mut s.p,
            grad: g,
            momentum_buffer: s.buf.as_deref_mut(),
            momentum_buffer_is_new: s.buf_is_new,
            master_param: None,
            rounding: Rounding::Nearest,
            step: None,
        })
        .collect();
    sgd_step(tensors, h, exec)?;
    for s in states.iter_mut() {
        s.buf_is_new = false;
    }
    Ok(())
}

fn sgd_setup<T: Ref>(sizes: &[usize], steps: usize, momentum: bool, seed: u64) -> (Vec<SgdState<T>>, Vec<Vec<Vec<T>>>) {
    let mut rng = Rng(seed);
    let states = sizes
        .iter()
        .map(|&n| {
            let p = rng.values(n);
            let buf_is_new = momentum && rng.next() & 1 == 0;
            // A new buffer holds garbage (NaN): the first step must overwrite it with the grad.
            let buf = momentum.then(|| if buf_is_new { vec![T::nan(); n] } else { rng.values(n) });
            SgdState { p, buf, buf_is_new }
        })
        .collect();
    let grads = (0..steps).map(|_| sizes.iter().map(|&n| rng.values(n)).collect()).collect();
    (states, grads)
}

/// SGD states with momentum buffers in runs (see `runs`), the grads too.
fn sgd_subnormal_setup(sizes: &[usize], steps: usize, seed: u64) -> Case<SgdState<f32>> {
    let mut rng = Rng(seed);
    let states = sizes
        .iter()
        .map(|&n| SgdState { p: rng.values(n), buf: Some(runs(&mut rng, n, false)), buf_is_new: false })
        .collect();
    (states, run_grads(&mut rng, sizes, steps))
}

fn compare_sgd<T: Ref>(
    what: &str,
    got: &[SgdState<T>],
    want: &[SgdState<T>],
    max_ulps: u64,
) -> Result<(), TestCaseError> {
    for (t, (g, w)) in got.iter().zip(want).enumerate() {
        compare(&format!("{what} tensor {t} param"), &g.p, &w.p, max_ulps)?;
        compare_opt(&format!("{what} tensor {t} momentum_buffer"), &g.buf, &w.buf, max_ulps)?;
    }
    Ok(())
}

fn check_sgd<T: Ref>(sizes: &[usize], steps: usize, h: &SgdHyper, seed: u64) -> Result<(), TestCaseError> {
    let (init, grads) = sgd_setup::<T>(sizes, steps, h.momentum != 0.0, seed);
    check_sgd_from(init, &grads, h)
}

/// `check_sgd` from given states and grads (a list of each step's).
fn check_sgd_from<T: Ref>(init: Vec<SgdState<T>>, grads: &[Vec<Vec<T>>], h: &SgdHyper) -> Result<(), TestCaseError> {
    let mut want = init.clone();
    for step_grads in grads {
        for (s, g) in want.iter_mut().zip(step_grads) {
            sgd_reference(s, g, h);
        }
    }
    let mut base: Option<Vec<SgdState<T>>> = None;
    for (name, exec) in executors() {
        let mut got = init.clone();
        for step_grads in grads {
            sgd_kernel(&mut got, step_grads, h, exec).map_err(|e| fail(format!("sgd {name}: {e}")))?;
        }
        match &base {
            None => compare_sgd(&format!("sgd {} {name} vs reference", T::NAME), &got, &want, REFERENCE_ULPS)?,
            Some(b) => compare_sgd(&format!("sgd {} {name} vs baseline", T::NAME), &got, b, 0)?,
        }
        base.get_or_insert(got);
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// RMSprop.
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct RmspropState<T> {
    p: Vec<T>,
    sq: Vec<T>,
    buf: Option<Vec<T>>,
    ga: Option<Vec<T>>,
    step: Step,
}

impl<T: Ref> RmspropState<T> {
    fn snapshot(&self) -> Vec<u64> {
        let mut s = bits_of(&self.p);
        s.extend(bits_of(&self.sq));
        s.extend(self.buf.as_deref().map(bits_of).unwrap_or_default());
        s.extend(self.ga.as_deref().map(bits_of).unwrap_or_default());
        s.push(self.step.bits());
        s
    }
}

/// The reference: torch's `_single_tensor_rmsprop` for one tensor.
fn rmsprop_reference<T: Ref>(s: &mut RmspropState<T>, grad: &[T], h: &RmspropHyper) {
    assert_eq!(s.buf.is_some(), h.momentum > 0.0);
    assert_eq!(s.ga.is_some(), h.centered);
    s.step.bump();
    for i in 0..s.p.len() {
        let p = s.p[i];
        let mut g = if h.maximize { -grad[i] } else { grad[i] };
        if h.weight_decay != 0.0 {
            g = torch_add(g, p, T::hp(h.weight_decay));
        }
        let sq = torch_addcmul(s.sq[i] * T::hp(h.alpha), g, g, T::hp(1.0 - h.alpha));
        s.sq[i] = sq;
        let mut avg = match s.ga.as_mut() {
            Some(ga) => {
                ga[i] = torch_lerp(ga[i], g, T::hp(1.0 - h.alpha));
                torch_addcmul(sq, ga[i], ga[i], T::hp(-1.0)).root()
            }
            None => sq.root(),
        };
        avg = avg + T::hp(h.eps);
        s.p[i] = match s.buf.as_mut() {
            Some(buf) => {
                buf[i] = torch_addcdiv(buf[i] * T::hp(h.momentum), g, avg, T::hp(1.0));
                torch_add(p, buf[i], T::hp(-h.lr))
            }
            None => torch_addcdiv(p, g, avg, T::hp(-h.lr)),
        };
    }
}

fn rmsprop_kernel<T: Ref>(
    states: &mut [RmspropState<T>],
    grads: &[Vec<T>],
    h: &RmspropHyper,
    exec: &Executor,
) -> Result<(), Error> {
    let tensors: Vec<RmspropTensor<'_, T>> = states
        .iter_mut()
        .zip(grads)
        .map(|(s, g)| RmspropTensor {
            param: &mut s.p,
            grad: g,
            square_avg: &mut s.sq,
            momentum_buffer: s.buf.as_deref_mut(),
            grad_avg: s.ga.as_deref_mut(),
            step: s.step.count(),
            master_param: None,
            rounding: Rounding::Nearest,
        })
        .collect();
    rmsprop_step(tensors, h, exec)
}

fn rmsprop_setup<T: Ref>(
    sizes: &[usize],
    steps: usize,
    h: &RmspropHyper,
    seed: u64,
) -> (Vec<RmspropState<T>>, Vec<Vec<Vec<T>>>) {
    let mut rng = Rng(seed);
    let states = sizes
        .iter()
        .map(|&n| {
            let p = rng.values(n);
            // A consistent centered state: square_avg >= grad_avg^2, so the variance stays >= 0
            // (up to rounding) and the test does not drown in NaNs.
            let ga: Vec<f64> = (0..n).map(|_| rng.value()).collect();
            let sq = ga.iter().map(|a| T::hp(a * a + rng.value().abs())).collect();
            let ga = h.centered.then(|| ga.iter().map(|&a| T::hp(a)).collect());
            let buf = (h.momentum > 0.0).then(|| rng.values(n));
            RmspropState { p, sq, buf, ga, step: rng.step() }
        })
        .collect();
    let grads = (0..steps).map(|_| sizes.iter().map(|&n| rng.values(n)).collect()).collect();
    (states, grads)
}

fn compare_rmsprop<T: Ref>(
    what: &str,
    got: &[RmspropState<T>],
    want: &[RmspropState<T>],
    max_ulps: u64,
) -> Result<(), TestCaseError> {
    for (t, (g, w)) in got.iter().zip(want).enumerate() {
        compare(&format!("{what} tensor {t} param"), &g.p, &w.p, max_ulps)?;
        compare(&format!("{what} tensor {t} square_avg"), &g.sq, &w.sq, max_ulps)?;
        compare_opt(&format!("{what} tensor {t} momentum_buffer"), &g.buf, &w.buf, max_ulps)?;
        compare_opt(&format!("{what} tensor {t} grad_avg"), &g.ga, &w.ga, max_ulps)?;
        if g.step != w.step {
            return Err(fail(format!("{what} tensor {t}: step {:?}, expected {:?}", g.step, w.step)));
        }
    }
    Ok(())
}

/// RMSprop states in runs (see `runs`), the grads too; each square average at least its grad
/// average's square, as in `rmsprop_setup`.
fn rmsprop_subnormal_setup(sizes: &[usize], steps: usize, h: &RmspropHyper, seed: u64) -> Case<RmspropState<f32>> {
    let mut rng = Rng(seed);
    let states = sizes
        .iter()
        .map(|&n| {
            let p = rng.values(n);
            let ga = runs(&mut rng, n, false);
            let sq = runs(&mut rng, n, true).iter().zip(&ga).map(|(&s, &a)| s.max(a * a)).collect();
            let buf = (h.momentum > 0.0).then(|| runs(&mut rng, n, false));
            RmspropState { p, sq, buf, ga: h.centered.then_some(ga), step: rng.step() }
        })
        .collect();
    (states, run_grads(&mut rng, sizes, steps))
}

fn check_rmsprop<T: Ref>(sizes: &[usize], steps: usize, h: &RmspropHyper, seed: u64) -> Result<(), TestCaseError> {
    let (init, grads) = rmsprop_setup::<T>(sizes, steps, h, seed);
    check_rmsprop_from(init, &grads, h)
}

/// `check_rmsprop` from given states and grads (a list of each step's).
fn check_rmsprop_from<T: Ref>(
    init: Vec<RmspropState<T>>,
    grads: &[Vec<Vec<T>>],
    h: &RmspropHyper,
) -> Result<(), TestCaseError> {
    let mut want = init.clone();
    for step_grads in grads {
        for (s, g) in want.iter_mut().zip(step_grads) {
            rmsprop_reference(s, g, h);
        }
    }
    let mut base: Option<Vec<RmspropState<T>>> = None;
    for (name, exec) in executors() {
        let mut got = init.clone();
        for step_grads in grads {
            rmsprop_kernel(&mut got, step_grads, h, exec).map_err(|e| fail(format!("rmsprop {name}: {e}")))?;
        }
        match &base {
            None => compare_rmsprop(&format!("rmsprop {} {name} vs reference", T::NAME), &got, &want, REFERENCE_ULPS)?,
            Some(b) => compare_rmsprop(&format!("rmsprop {} {name} vs baseline", T::NAME), &got, b, 0)?,
        }
        base.get_or_insert(got);
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Norms and scaling.
// ------------------------------------------------------------------------------------------

/// `sum(|x|^p)^(1/p)` with compensated (Neumaier) summation in f64, each term `|x|^p` rounded
/// to `T` and a sum past `T`'s range inf (torch's norm of a `T` tensor runs in `T`), or the
/// NaN-propagating max of `|x|` for the inf-norm.
fn norm_reference<T: Ref>(data: &[T], p: f64) -> f64 {
    let data: Vec<f64> = data.iter().map(|x| x.wide()).collect();
    if p == f64::INFINITY {
        return data.iter().fold(0.0, |acc, x| torch_maximum(acc, x.abs()));
    }
    if let [x] = data[..] {
        return x.abs(); // torch's norm of one element, for every p
    }
    let (mut sum, mut carry) = (0.0f64, 0.0f64);
    for &x in &data {
        let term = if p == 1.0 {
            x.abs()
        } else if p == 2.0 {
            x * x
        } else {
            x.abs().powf(p)
        };
        let term = T::hp(term).wide();
        let t = sum + term;
        carry += if sum.abs() >= term.abs() { (sum - t) + term } else { (term - t) + sum };
        sum = t;
    }
    // Past an inf term the carry is inf - inf: the sum alone is the answer (inf, or NaN).
    let total = if sum.is_finite() { sum + carry } else { sum };
    let total = if T::hp(total).wide().is_infinite() { f64::INFINITY } else { total };
    if p == 1.0 {
        total
    } else if p == 2.0 {
        total.sqrt()
    } else {
        total.powf(1.0 / p)
    }
}

fn close(got: f64, want: f64, rtol: f64) -> bool {
    if got.is_nan() || want.is_nan() {
        return got.is_nan() && want.is_nan();
    }
    if got == want {
        return true;
    }
    (got - want).abs() <= rtol * want.abs()
}

fn check_norms<T: Ref>(sizes: &[usize], p: f64, seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed);
    let data: Vec<Vec<T>> = sizes.iter().map(|&n| rng.values(n)).collect();
    let views: Vec<&[T]> = data.iter().map(Vec::as_slice).collect();
    let norm = NormType::from_p(p).map_err(|e| fail(e.to_string()))?;
    let want: Vec<f64> = data.iter().map(|d| norm_reference(d, p)).collect();
    let rtol = if p == f64::INFINITY { 0.0 } else { NORM_RTOL };
    let mut base: Option<Vec<f64>> = None;
    for (name, exec) in executors() {
        let got = tensor_norms(&views, norm, exec);
        let single: Vec<f64> = views.iter().map(|v| tensor_norm(v, norm, exec)).collect();
        let what = format!("norm p={p} {} {name}", T::NAME);
        compare(&format!("{what}: tensor_norm vs tensor_norms"), &single, &got, 0)?;
        match &base {
            None => {
                for (t, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    if !close(g, w, rtol) {
                        return Err(fail(format!(
                            "{what} tensor {t} ({} elements): got {g:e}, reference {w:e}, rel err {:e} > {rtol:e}",
                            sizes[t],
                            ((g - w) / w).abs()
                        )));
                    }
                }
            }
            Some(b) => compare(&format!("{what} vs baseline"), &got, b, 0)?,
        }
        base.get_or_insert(got);
    }
    Ok(())
}

fn check_scale<T: Ref>(sizes: &[usize], factor: f64, seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed);
    let init: Vec<Vec<T>> = sizes.iter().map(|&n| rng.values(n)).collect();
    let factor = T::hp(factor);
    let want: Vec<Vec<T>> = init.iter().map(|d| d.iter().map(|&x| x * factor).collect()).collect();
    for (name, exec) in executors() {
        let mut got = init.clone();
        scale_in_place(got.iter_mut().map(Vec::as_mut_slice).collect(), factor, exec);
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            compare(&format!("scale {} {name} tensor {t}", T::NAME), g, w, 0)?;
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Strategies.
// ------------------------------------------------------------------------------------------

/// The sizes that matter: empty, one, around every SIMD width (4/8/16 f32 lanes, 2/4/8 f64),
/// around `CHUNK` (where the executor splits) and a size with an uneven split.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 0usize..40,
        3 => prop::sample::select(vec![0usize, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65]),
        1 => prop::sample::select(vec![CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3]),
    ]
}

fn sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(size(), 1..=4)
}

fn lr() -> impl Strategy<Value = f64> {
    prop_oneof![Just(1e-3), Just(1e-2), Just(1.0), 1e-6f64..2.0]
}

fn weight_decay() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(1e-2), 1e-5f64..1.0]
}

fn eps() -> impl Strategy<Value = f64> {
    prop_oneof![Just(1e-8), 1e-12f64..0.1]
}

prop_compose! {
    fn adam_hyper()(
        lr in lr(),
        // beta1 <= 0.5 puts the lerp weight in its other branch.
        beta1 in prop_oneof![Just(0.9), Just(0.0), Just(0.5), 0.0f64..0.999],
        beta2 in prop_oneof![Just(0.999), Just(0.0), 0.0f64..0.99999],
        eps in eps(),
        weight_decay in weight_decay(),
        amsgrad in any::<bool>(),
        maximize in any::<bool>(),
        decoupled_weight_decay in any::<bool>(),
        lr_in_f32 in any::<bool>(),
    ) -> AdamHyper {
        AdamHyper { lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, lr_in_f32, grad_scale: 1.0 }
    }
}

prop_compose! {
    fn sgd_hyper()(
        lr in lr(),
        momentum in prop_oneof![Just(0.0), Just(0.9), 0.0f64..1.0],
        dampening in prop_oneof![Just(0.0), 0.0f64..1.0],
        weight_decay in weight_decay(),
        nesterov in any::<bool>(),
        maximize in any::<bool>(),
    ) -> SgdHyper {
        // Nesterov needs momentum and no dampening (the invalid case has its own test).
        let (momentum, dampening) = if nesterov {
            (if momentum == 0.0 { 0.9 } else { momentum }, 0.0)
        } else {
            (momentum, dampening)
        };
        SgdHyper { lr, momentum, dampening, weight_decay, nesterov, maximize, grad_scale: 1.0 }
    }
}

prop_compose! {
    fn rmsprop_hyper()(
        lr in lr(),
        // alpha <= 0.5 puts the centered lerp weight in its other branch.
        alpha in prop_oneof![Just(0.99), Just(0.5), 0.0f64..0.9999],
        eps in eps(),
        weight_decay in weight_decay(),
        momentum in prop_oneof![Just(0.0), Just(0.9), 0.0f64..1.0],
        centered in any::<bool>(),
        maximize in any::<bool>(),
    ) -> RmspropHyper {
        RmspropHyper { lr, alpha, eps, weight_decay, momentum, centered, maximize, grad_scale: 1.0 }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn adam_f32_matches_reference(sizes in sizes(), steps in 1usize..=3, h in adam_hyper(), seed in any::<u64>()) {
        check_adam::<f32>(&sizes, steps, &h, seed)?;
    }

    #[test]
    fn adam_f32_with_subnormal_state_matches_reference(
        sizes in prop::collection::vec(1usize..3000, 1..=3),
        steps in 1usize..=3,
        h in adam_hyper(),
        seed in any::<u64>(),
    ) {
        let (init, grads) = adam_subnormal_setup(&sizes, steps, h.amsgrad, seed);
        check_adam_from(init, &grads, &h)?;
    }

    #[test]
    fn sgd_f32_with_subnormal_momentum_matches_reference(
        sizes in prop::collection::vec(1usize..3000, 1..=3),
        steps in 1usize..=3,
        h in sgd_hyper(),
        seed in any::<u64>(),
    ) {
        let h = SgdHyper { momentum: if h.momentum == 0.0 { 0.9 } else { h.momentum }, ..h };
        let (init, grads) = sgd_subnormal_setup(&sizes, steps, seed);
        check_sgd_from(init, &grads, &h)?;
    }

    #[test]
    fn rmsprop_f32_with_subnormal_state_matches_reference(
        sizes in prop::collection::vec(1usize..3000, 1..=3),
        steps in 1usize..=3,
        h in rmsprop_hyper(),
        seed in any::<u64>(),
    ) {
        let (init, grads) = rmsprop_subnormal_setup(&sizes, steps, &h, seed);
        check_rmsprop_from(init, &grads, &h)?;
    }

    #[test]
    fn adam_f64_matches_reference(sizes in sizes(), steps in 1usize..=3, h in adam_hyper(), seed in any::<u64>()) {
        check_adam::<f64>(&sizes, steps, &h, seed)?;
    }

    #[test]
    fn sgd_f32_matches_reference(sizes in sizes(), steps in 1usize..=3, h in sgd_hyper(), seed in any::<u64>()) {
        check_sgd::<f32>(&sizes, steps, &h, seed)?;
    }

    #[test]
    fn sgd_f64_matches_reference(sizes in sizes(), steps in 1usize..=3, h in sgd_hyper(), seed in any::<u64>()) {
        check_sgd::<f64>(&sizes, steps, &h, seed)?;
    }

    #[test]
    fn rmsprop_f32_matches_reference(sizes in sizes(), steps in 1usize..=3, h in rmsprop_hyper(), seed in any::<u64>()) {
        check_rmsprop::<f32>(&sizes, steps, &h, seed)?;
    }

    #[test]
    fn rmsprop_f64_matches_reference(sizes in sizes(), steps in 1usize..=3, h in rmsprop_hyper(), seed in any::<u64>()) {
        check_rmsprop::<f64>(&sizes, steps, &h, seed)?;
    }

    #[test]
    fn norms_match_reference_on_every_path(
        sizes in prop::collection::vec(prop_oneof![4 => size(), 1 => Just(5 * CHUNK + 7)], 1..=4),
        p in prop::sample::select(vec![1.0, 2.0, f64::INFINITY, 3.0, 0.5]),
        seed in any::<u64>(),
    ) {
        check_norms::<f32>(&sizes, p, seed)?;
        check_norms::<f64>(&sizes, p, seed)?;
    }

    #[test]
    fn scale_in_place_is_a_plain_multiply_on_every_path(
        sizes in sizes(),
        factor in prop_oneof![Just(1.0), Just(0.0), 0.0f64..1.0, -2.0f64..2.0],
        seed in any::<u64>(),
    ) {
        check_scale::<f32>(&sizes, factor, seed)?;
        check_scale::<f64>(&sizes, factor, seed)?;
    }
}

// ------------------------------------------------------------------------------------------
// Every flag combination, deterministically (the property tests draw them at random).
// ------------------------------------------------------------------------------------------

/// Sizes around each SIMD width and one tensor past `CHUNK`, so that the step goes parallel.
const GRID_SIZES: [usize; 13] = [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 5, CHUNK + 1];

fn run_case(r: Result<(), TestCaseError>, what: &str) {
    if let Err(e) = r {
        panic!("{what}: {e}");
    }
}

#[test]
fn adam_every_flag_combination() {
    let mut seed = 1;
    for amsgrad in [false, true] {
        for maximize in [false, true] {
            for decoupled_weight_decay in [false, true] {
                for weight_decay in [0.0, 0.1] {
                    for beta1 in [0.9, 0.3] {
                        let h = AdamHyper {
                            lr: 0.01,
                            beta1,
                            beta2: 0.999,
                            eps: 1e-8,
                            weight_decay,
                            amsgrad,
                            maximize,
                            decoupled_weight_decay,
                            lr_in_f32: false,
                            grad_scale: 1.0,
                        };
                        seed += 1;
                        run_case(check_adam::<f32>(&GRID_SIZES, 2, &h, seed), &format!("{h:?}"));
                        run_case(check_adam::<f64>(&GRID_SIZES, 2, &h, seed), &format!("{h:?}"));
                    }
                }
            }
        }
    }
}

#[test]
fn sgd_every_flag_combination() {
    let mut seed = 100;
    for momentum in [0.0, 0.9] {
        for dampening in [0.0, 0.25] {
            for nesterov in [false, true] {
                if nesterov && (momentum == 0.0 || dampening != 0.0) {
                    continue;
                }
                for maximize in [false, true] {
                    for weight_decay in [0.0, 0.1] {
                        let h = SgdHyper {
                            lr: 0.1,
                            momentum,
                            dampening,
                            weight_decay,
                            nesterov,
                            maximize,
                            grad_scale: 1.0,
                        };
                        seed += 1;
                        run_case(check_sgd::<f32>(&GRID_SIZES, 3, &h, seed), &format!("{h:?}"));
                        run_case(check_sgd::<f64>(&GRID_SIZES, 3, &h, seed), &format!("{h:?}"));
                    }
                }
            }
        }
    }
}

#[test]
fn rmsprop_every_flag_combination() {
    let mut seed = 200;
    for centered in [false, true] {
        for momentum in [0.0, 0.9] {
            for maximize in [false, true] {
                for weight_decay in [0.0, 0.1] {
                    for alpha in [0.99, 0.25] {
                        let h = RmspropHyper {
                            lr: 0.01,
                            alpha,
                            eps: 1e-8,
                            weight_decay,
                            momentum,
                            centered,
                            maximize,
                            grad_scale: 1.0,
                        };
                        seed += 1;
                        run_case(check_rmsprop::<f32>(&GRID_SIZES, 2, &h, seed), &format!("{h:?}"));
                        run_case(check_rmsprop::<f64>(&GRID_SIZES, 2, &h, seed), &format!("{h:?}"));
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// The reference itself, on numbers worked out by hand (so that it cannot be wrong the same way
// as the kernel without anyone noticing).
// ------------------------------------------------------------------------------------------

#[test]
fn reference_sanity_adam_first_step_moves_by_lr() {
    // First step, no decay: m = (1-b1) g, v = (1-b2) g^2, so the update is
    // lr * g / (|g| + eps*sqrt(1-b2)/... ) ~= lr * sign(g).
    let h = AdamHyper { lr: 0.01, ..AdamHyper::default() };
    let mut s =
        AdamState { p: vec![1.0f64, 1.0, 1.0], m: vec![0.0; 3], v: vec![0.0; 3], vmax: None, step: Step::F32(0.0) };
    adam_reference(&mut s, &[0.5, -2.0, 0.0], &h);
    assert!((s.p[0] - 0.99).abs() < 1e-9, "{:?}", s.p);
    assert!((s.p[1] - 1.01).abs() < 1e-9, "{:?}", s.p);
    assert_eq!(s.p[2], 1.0);
    assert_eq!(s.step, Step::F32(1.0));
    assert!((s.m[0] - 0.05).abs() < 1e-15 && (s.v[1] - 0.004).abs() < 1e-15);
}

#[test]
fn reference_sanity_sgd_and_rmsprop() {
    // SGD, momentum 0.5, dampening 0.5: first step buf = g, then buf = 0.5*buf + 0.5*g.
    let h = SgdHyper { lr: 0.1, momentum: 0.5, dampening: 0.5, ..SgdHyper::default() };
    let mut s = SgdState { p: vec![1.0f64], buf: Some(vec![f64::NAN]), buf_is_new: true };
    sgd_reference(&mut s, &[2.0], &h);
    assert_eq!((s.p[0], s.buf.as_ref().unwrap()[0]), (0.8, 2.0));
    sgd_reference(&mut s, &[4.0], &h);
    assert_eq!(s.buf.as_ref().unwrap()[0], 3.0);
    assert!((s.p[0] - 0.5).abs() < 1e-15);
    // RMSprop, alpha 0.75, eps 0: sq = 0.25 g^2, p -= lr * g / (|g|/2) = lr * 2 sign(g).
    let h = RmspropHyper { lr: 0.1, alpha: 0.75, eps: 0.0, ..RmspropHyper::default() };
    let mut s = RmspropState { p: vec![1.0f64], sq: vec![0.0], buf: None, ga: None, step: Step::F64(3.0) };
    rmsprop_reference(&mut s, &[-3.0], &h);
    assert!((s.p[0] - 1.2).abs() < 1e-15, "{:?}", s.p);
    assert_eq!(s.step, Step::F64(4.0));
    // Centered, same grads: grad_avg = 0.25 g, variance = 0.25 g^2 - 0.0625 g^2 = 0.1875 g^2.
    let h = RmspropHyper { centered: true, ..h };
    let mut s = RmspropState { p: vec![0.0f64], sq: vec![0.0], buf: None, ga: Some(vec![0.0]), step: Step::F64(0.0) };
    rmsprop_reference(&mut s, &[2.0], &h);
    assert!((s.p[0] + 0.1 * 2.0 / (0.1875f64 * 4.0).sqrt()).abs() < 1e-15, "{:?}", s.p);
}

#[test]
fn reference_lerp_is_exact_at_both_ends() {
    for (a, b) in [(0.1f32, 3.7f32), (-1e30, 1e-30), (5.0, -5.0)] {
        assert_eq!(torch_lerp(a, b, 0.0), a);
        assert_eq!(torch_lerp(a, b, 1.0), b);
    }
}

// ------------------------------------------------------------------------------------------
// Step counts and per-tensor bias corrections.
// ------------------------------------------------------------------------------------------

#[test]
fn step_counts_increment_in_their_own_dtype() {
    for exec in [baseline(), &executors().last().unwrap().1] {
        let steps = [Step::F32(0.0), Step::F64(41.0), Step::F32(16_777_216.0), Step::F64(16_777_216.0)];
        let mut states: Vec<AdamState<f32>> = steps
            .iter()
            .map(|&step| AdamState { p: vec![1.0; 3], m: vec![0.0; 3], v: vec![0.0; 3], vmax: None, step })
            .collect();
        adam_kernel(&mut states, &vec![vec![0.5f32; 3]; 4], &AdamHyper::default(), exec).unwrap();
        let got: Vec<Step> = states.iter().map(|s| s.step).collect();
        // 2^24 + 1 is not an f32: torch's float32 step stays at 2^24.
        assert_eq!(got, [Step::F32(1.0), Step::F64(42.0), Step::F32(16_777_216.0), Step::F64(16_777_217.0)]);

        let h = RmspropHyper::default();
        let mut states: Vec<RmspropState<f64>> = steps
            .iter()
            .map(|&step| RmspropState { p: vec![1.0; 2], sq: vec![0.0; 2], buf: None, ga: None, step })
            .collect();
        rmsprop_kernel(&mut states, &vec![vec![0.5f64; 2]; 4], &h, exec).unwrap();
        let got: Vec<Step> = states.iter().map(|s| s.step).collect();
        assert_eq!(got, [Step::F32(1.0), Step::F64(42.0), Step::F32(16_777_216.0), Step::F64(16_777_217.0)]);
    }
}

#[test]
fn adam_bias_correction_uses_each_tensors_own_step() {
    // Three tensors with the same data: steps 0, 9 and 0. The first and the last must come out
    // identical, the middle one different, and each must match the reference at its own step.
    let h = AdamHyper { lr: 0.1, ..AdamHyper::default() };
    let data = vec![0.3f32, -1.5, 2.0, 1e-3, 0.0, 7.0, -0.25, 4.0, 1.0];
    let grad = vec![0.1f32, 0.2, -0.3, 5.0, -1e-4, 0.0, 1.0, -2.0, 0.5];
    let make = |step| AdamState {
        p: data.clone(),
        m: grad.clone(),
        v: data.iter().map(|x| x * x).collect(),
        vmax: None,
        step,
    };
    let init = vec![make(Step::F32(0.0)), make(Step::F64(9.0)), make(Step::F32(0.0))];
    for (name, exec) in executors() {
        let mut got = init.clone();
        adam_kernel(&mut got, &vec![grad.clone(); 3], &h, exec).unwrap();
        assert_eq!(bits_of(&got[0].p), bits_of(&got[2].p), "{name}");
        assert_ne!(bits_of(&got[0].p), bits_of(&got[1].p), "{name}");
        for (t, s) in init.iter().enumerate() {
            let mut want = s.clone();
            adam_reference(&mut want, &grad, &h);
            run_case(
                compare_adam(&format!("{name} tensor {t}"), &got[t..=t], &[want], REFERENCE_ULPS),
                "bias correction",
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// NaN handling.
// ------------------------------------------------------------------------------------------

#[test]
fn amsgrad_max_propagates_nan_and_keeps_it() {
    // max_exp_avg_sq holds a NaN (f32::max would drop it): it must stay NaN, and so must the
    // param it divides, on every path, step after step. A NaN grad must reach vmax too.
    let n = 37;
    let h = AdamHyper { amsgrad: true, ..AdamHyper::default() };
    for (name, exec) in executors() {
        let mut vmax = vec![0.5f32; n];
        vmax[3] = f32::NAN;
        vmax[n - 1] = f32::NAN;
        let mut states = vec![AdamState {
            p: vec![1.0f32; n],
            m: vec![0.0; n],
            v: vec![0.0; n],
            vmax: Some(vmax),
            step: Step::F32(0.0),
        }];
        let mut grad = vec![0.25f32; n];
        grad[10] = f32::NAN;
        adam_kernel(&mut states, &[grad.clone()], &h, exec).unwrap();
        let mut want = vec![AdamState {
            p: vec![1.0f32; n],
            m: vec![0.0; n],
            v: vec![0.0; n],
            vmax: Some(vec![0.5f32; n]),
            step: Step::F32(0.0),
        }];
        {
            let w = want[0].vmax.as_mut().unwrap();
            w[3] = f32::NAN;
            w[n - 1] = f32::NAN;
        }
        adam_reference(&mut want[0], &grad, &h);
        run_case(compare_adam(name, &states, &want, REFERENCE_ULPS), "amsgrad nan");
        // A finite second step leaves every NaN where it was.
        adam_kernel(&mut states, &[vec![0.25f32; n]], &h, exec).unwrap();
        let s = &states[0];
        for i in [3, 10, n - 1] {
            assert!(s.vmax.as_ref().unwrap()[i].is_nan() && s.p[i].is_nan(), "{name}: element {i} lost its NaN");
        }
        assert!(s.p[0].is_finite() && s.vmax.as_ref().unwrap()[0] == 0.5, "{name}");
    }
}

#[test]
fn inf_norm_propagates_nan_wherever_it_is() {
    let sizes = [1, 2, 33, CHUNK - 1, CHUNK + 5, 3 * CHUNK + 1];
    for &n in &sizes {
        let positions = [0, n / 2, n.saturating_sub(1), n.saturating_sub(2)];
        for &at in &positions {
            let mut data = vec![1.0f32; n];
            data[n / 3] = f32::INFINITY; // an inf before or after must not hide the NaN
            data[at] = f32::NAN;
            let data64: Vec<f64> = data.iter().map(|&x| f64::from(x)).collect();
            for (name, exec) in executors() {
                for norm in [NormType::Inf, NormType::Two, NormType::One, NormType::P(3.0)] {
                    let a = tensor_norms(&[&data[..]], norm, exec);
                    let b = tensor_norm(&data64, norm, exec);
                    assert!(a[0].is_nan() && b.is_nan(), "{name} {norm:?} n={n} nan at {at}: {a:?} {b}");
                }
                // Without the NaN: inf.
                let mut clean = data.clone();
                clean[at] = 2.0;
                if at != n / 3 {
                    assert_eq!(tensor_norm(&clean, NormType::Inf, exec), f64::INFINITY, "{name} n={n}");
                }
            }
        }
    }
    // The largest magnitude, negative or not.
    assert_eq!(tensor_norm(&[-3.0f32, 2.0, -0.0], NormType::Inf, baseline()), 3.0);
    assert_eq!(tensor_norm::<f64>(&[], NormType::Inf, baseline()), 0.0);
    assert_eq!(tensor_norm::<f64>(&[], NormType::Two, baseline()), 0.0);
}

/// The norms of `data` as f32 and as f64 on every path and thread count, checked to agree bit
/// for bit across them; returns (f32 norm, f64 norm).
fn norms_everywhere(data: &[f32], norm: NormType) -> (f64, f64) {
    let wide: Vec<f64> = data.iter().map(|&x| f64::from(x)).collect();
    let base = (tensor_norm(data, norm, baseline()), tensor_norm(&wide, norm, baseline()));
    for (name, exec) in executors() {
        let got = (tensor_norms(&[data], norm, exec)[0], tensor_norms(&[&wide[..]], norm, exec)[0]);
        assert_eq!(
            (got.0.to_bits(), got.1.to_bits()),
            (base.0.to_bits(), base.1.to_bits()),
            "{name} {norm:?} n={}",
            data.len()
        );
    }
    base
}

#[test]
fn f32_norms_overflow_and_underflow_as_torch_does() {
    // Every size puts the extreme values in the lane body, in the tail, and across chunks.
    for n in [2, 4, 33, 1000, CHUNK + 7, 2 * CHUNK + 100] {
        let filled = |x: f32| {
            let mut data = vec![0.0f32; n];
            data[0] = x;
            data[n - 1] = -x;
            data
        };
        // torch.linalg.vector_norm(torch.tensor([3e19, 4e19])) is inf: the squares overflow f32.
        let mut squares_overflow = filled(0.0);
        (squares_overflow[0], squares_overflow[n - 1]) = (3e19, -4e19);
        let (f32_norm, f64_norm) = norms_everywhere(&squares_overflow, NormType::Two);
        assert_eq!(f32_norm, f64::INFINITY, "n={n}");
        assert!(close(f64_norm, 5e19, 1e-7), "f64 is unaffected: {f64_norm}");
        assert_eq!(norms_everywhere(&squares_overflow, NormType::P(3.0)).0, f64::INFINITY);
        // |x| fits: the 1-norm and the inf-norm are finite.
        assert!(close(norms_everywhere(&squares_overflow, NormType::One).0, 7e19, 1e-7));
        assert_eq!(norms_everywhere(&squares_overflow, NormType::Inf).0, f64::from(4e19f32));

        // [1.5e19, 1.5e19]: each square fits f32 (2.25e38 < 3.4e38), their sum does not.
        let sum_overflows = filled(1.5e19);
        assert!((1.5e19f32 * 1.5e19f32).is_finite());
        let (f32_norm, f64_norm) = norms_everywhere(&sum_overflows, NormType::Two);
        assert_eq!(f32_norm, f64::INFINITY, "n={n}");
        assert!(close(f64_norm, 1.5e19 * 2f64.sqrt(), 1e-7));
        // The 1-norm's sum overflows the same way: 2 * 2e38 > f32::MAX.
        let (f32_norm, f64_norm) = norms_everywhere(&filled(2e38), NormType::One);
        assert_eq!(f32_norm, f64::INFINITY);
        assert!(close(f64_norm, 2.0 * f64::from(2e38f32), 1e-12));
        // Just inside the range stays finite: a sum of f32::MAX rounds to f32::MAX.
        let mut at_max = vec![0.0f32; n];
        at_max[n / 2] = f32::MAX;
        assert_eq!(norms_everywhere(&at_max, NormType::One).0, f64::from(f32::MAX));

        // [1e-30] * 4: each square (1e-60) rounds to 0 in f32, so the norm is 0.
        let tiny = vec![1e-30f32; n];
        let (f32_norm, f64_norm) = norms_everywhere(&tiny, NormType::Two);
        assert_eq!(f32_norm, 0.0, "n={n}");
        assert!(close(f64_norm, f64::from(1e-30f32) * (n as f64).sqrt(), 1e-9), "f64 is unaffected: {f64_norm}");
        // A square that is subnormal in f32 keeps only what f32 keeps of it.
        let sub = vec![1e-20f32; n];
        let term = f64::from(1e-20f32 * 1e-20f32);
        assert_ne!(term, f64::from(1e-20f32) * f64::from(1e-20f32));
        assert!(close(norms_everywhere(&sub, NormType::Two).0, (term * n as f64).sqrt(), 1e-12));

        // NaN still wins over an overflowing square and an overflowing sum.
        let mut with_nan = filled(1.5e19);
        with_nan[n / 2] = f32::NAN;
        for norm in [NormType::One, NormType::Two, NormType::Inf, NormType::P(3.0)] {
            let (a, b) = norms_everywhere(&with_nan, norm);
            assert!(a.is_nan() && b.is_nan(), "{norm:?} n={n}: {a} {b}");
        }
    }
}

#[test]
fn the_norm_of_one_element_is_its_magnitude_for_every_p() {
    // torch.linalg.vector_norm of a one-element tensor is |x| for every p: 1e155 stays 1e155 in
    // f64 (its square would overflow), 3e19 stays 3e19 in f32, 1e-200 does not underflow.
    for norm in [NormType::One, NormType::Two, NormType::Inf, NormType::P(3.0), NormType::P(0.5)] {
        assert_eq!(norms_everywhere(&[-3e19f32], norm).0, f64::from(3e19f32), "{norm:?}");
        assert_eq!(norms_everywhere(&[1e-30f32], norm).0, f64::from(1e-30f32), "{norm:?}");
        for x in [-1e155f64, 1e-200] {
            let exec = Executor::new(1, SimdLevel::Scalar).unwrap();
            assert_eq!(tensor_norms(&[&[x][..]], norm, &exec)[0], x.abs(), "{norm:?}");
        }
        assert!(norms_everywhere(&[f32::NAN], norm).0.is_nan());
    }
}

#[test]
fn norms_are_identical_for_1_2_3_threads_on_tensors_of_many_chunks() {
    let mut rng = Rng(77);
    let big: Vec<f32> = rng.values(7 * CHUNK + 123);
    let other: Vec<f64> = rng.values(4 * CHUNK - 1);
    let small: Vec<f32> = rng.values(17);
    for norm in [NormType::One, NormType::Two, NormType::Inf, NormType::P(3.0), NormType::P(0.5)] {
        let base32 = tensor_norms(&[&big[..], &small[..], &big[..CHUNK * 2 + 3]], norm, baseline());
        let base64 = tensor_norms(&[&other[..]], norm, baseline());
        for (name, exec) in executors() {
            assert_eq!(
                bits_of(&tensor_norms(&[&big[..], &small[..], &big[..CHUNK * 2 + 3]], norm, exec)),
                bits_of(&base32),
                "{name} {norm:?}"
            );
            assert_eq!(bits_of(&tensor_norms(&[&other[..]], norm, exec)), bits_of(&base64), "{name} {norm:?}");
            assert_eq!(tensor_norm(&big, norm, exec).to_bits(), base32[0].to_bits(), "{name} {norm:?}");
        }
        let p = match norm {
            NormType::One => 1.0,
            NormType::Two => 2.0,
            NormType::Inf => f64::INFINITY,
            NormType::P(p) => p,
        };
        let want = norm_reference(&big, p);
        assert!(
            close(base32[0], want, if p.is_infinite() { 0.0 } else { NORM_RTOL }),
            "{norm:?}: {} vs {want}",
            base32[0]
        );
    }
}

/// The norm's streams ask for their memory 2 KiB ahead of their reads (prefetch hints): at the
/// end of a tensor that ends where an unmapped page begins, those hints land in that page, and
/// must neither fault nor change the result.
#[cfg(unix)]
#[test]
fn norms_of_tensors_that_end_at_an_unmapped_page() {
    let mut rng = Rng(5);
    for n in [1usize, 31, 33, 500, 4096 + 1, CHUNK + 17] {
        let values: Vec<f32> = rng.values(n);
        norms_before_an_unmapped_page(&values);
        norms_before_an_unmapped_page(&values.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
        norms_before_an_unmapped_page(&values.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>());
    }
}

/// `values` copied to end where an unmapped page begins: the same norms, bit for bit, on every
/// executor.
#[cfg(unix)]
fn norms_before_an_unmapped_page<E: rsoptim_core::Element>(values: &[E]) {
    let mut fenced = unmapped::BeforeUnmappedPage::new(values.len(), values[0]);
    fenced.slice().copy_from_slice(values);
    for norm in [NormType::Two, NormType::Inf] {
        for (name, exec) in executors() {
            let got = tensor_norm(&*fenced.slice(), norm, exec);
            assert_eq!(got.to_bits(), tensor_norm(values, norm, exec).to_bits(), "{name} n={} {norm:?}", values.len());
        }
    }
}

#[test]
fn norm_type_from_p() {
    assert_eq!(NormType::from_p(1.0).unwrap(), NormType::One);
    assert_eq!(NormType::from_p(2.0).unwrap(), NormType::Two);
    assert_eq!(NormType::from_p(f64::INFINITY).unwrap(), NormType::Inf);
    assert_eq!(NormType::from_p(3.0).unwrap(), NormType::P(3.0));
    assert_eq!(NormType::from_p(0.5).unwrap(), NormType::P(0.5));
    for bad in [0.0, -0.0, -1.0, -2.0, f64::NAN, -f64::NAN, f64::NEG_INFINITY, -1e-300] {
        assert!(matches!(NormType::from_p(bad), Err(Error::InvalidArgument(_))), "p = {bad} was accepted");
    }
}

// ------------------------------------------------------------------------------------------
// Errors: nothing is written.
// ------------------------------------------------------------------------------------------

/// Runs `call` on a fresh copy of `states`; it must fail, and leave every buffer and step as it
/// was. Tensor 0 is always valid, so a kernel that updates tensors before checking later ones
/// is caught.
fn assert_rejected<S: Clone>(
    what: &str,
    states: &[S],
    snapshot: impl Fn(&S) -> Vec<u64>,
    call: impl Fn(&mut [S], &Executor) -> Result<(), Error>,
    expect: impl Fn(&Error) -> bool,
) {
    for (name, exec) in [&executors()[0], executors().last().unwrap()] {
        let mut got = states.to_vec();
        match call(&mut got, exec) {
            Ok(()) => panic!("{what} ({name}): accepted"),
            Err(e) => assert!(expect(&e), "{what} ({name}): unexpected error {e:?}"),
        }
        for (t, (g, s)) in got.iter().zip(states).enumerate() {
            assert_eq!(snapshot(g), snapshot(s), "{what} ({name}): tensor {t} was written");
        }
    }
}

fn is_len(tensor: usize) -> impl Fn(&Error) -> bool {
    move |e: &Error| matches!(e, Error::LengthMismatch { tensor: t, .. } if *t == tensor)
}

fn is_missing(tensor: usize) -> impl Fn(&Error) -> bool {
    move |e: &Error| matches!(e, Error::MissingBuffer { tensor: t, .. } if *t == tensor)
}

/// Two valid tensors, big enough to go parallel, with the second one broken by `breakage`.
fn broken<S: Clone>(mut valid: Vec<S>, breakage: impl Fn(&mut S)) -> Vec<S> {
    breakage(&mut valid[1]);
    valid
}

#[test]
fn adam_errors_write_nothing() {
    let n = CHUNK + 1;
    let (base, _) = adam_setup::<f32>(&[n, n], 1, false, 5);
    let (base_ams, _) = adam_setup::<f32>(&[n, n], 1, true, 5);
    let grads = vec![vec![0.5f32; n], vec![0.5f32; n]];
    let short = vec![vec![0.5f32; n], vec![0.5f32; n - 1]];
    let plain = AdamHyper::default();
    let ams = AdamHyper { amsgrad: true, ..plain.clone() };
    let snap = |s: &AdamState<f32>| s.snapshot();
    let run = |h: &AdamHyper, g: &[Vec<f32>]| {
        let (h, g) = (h.clone(), g.to_vec());
        move |s: &mut [AdamState<f32>], e: &Executor| adam_kernel(s, &g, &h, e)
    };
    assert_rejected("grad length", &base, snap, run(&plain, &short), is_len(1));
    let b = broken(base.clone(), |s| s.m.push(0.0));
    assert_rejected("exp_avg length", &b, snap, run(&plain, &grads), is_len(1));
    let b = broken(base.clone(), |s| {
        s.v.pop();
    });
    assert_rejected("exp_avg_sq length", &b, snap, run(&plain, &grads), is_len(1));
    let b = broken(base_ams.clone(), |s| s.vmax.as_mut().unwrap().push(1.0));
    assert_rejected("max_exp_avg_sq length", &b, snap, run(&ams, &grads), is_len(1));
    let b = broken(base_ams.clone(), |s| s.vmax = None);
    assert_rejected("max_exp_avg_sq missing with amsgrad", &b, snap, run(&ams, &grads), is_missing(1));
    let b = broken(base.clone(), |s| s.vmax = Some(vec![0.0; n]));
    assert_rejected("max_exp_avg_sq given without amsgrad", &b, snap, run(&plain, &grads), is_missing(1));
    let b = broken(base_ams.clone(), |s| s.vmax = Some(vec![]));
    assert_rejected("empty max_exp_avg_sq", &b, snap, run(&ams, &grads), is_len(1));
    // The valid configuration goes through (the cases above fail for the reason given).
    let mut ok = base.clone();
    adam_kernel(&mut ok, &grads, &plain, baseline()).unwrap();
    let mut ok = base_ams.clone();
    adam_kernel(&mut ok, &grads, &ams, baseline()).unwrap();
    // No tensors at all is a valid (empty) step.
    adam_kernel::<f32>(&mut [], &[], &plain, baseline()).unwrap();
}

#[test]
fn sgd_errors_write_nothing() {
    let n = CHUNK + 1;
    let (base, _) = sgd_setup::<f64>(&[n, n], 1, false, 6);
    let (base_mom, _) = sgd_setup::<f64>(&[n, n], 1, true, 6);
    let grads = vec![vec![0.5f64; n], vec![0.5f64; n]];
    let short = vec![vec![0.5f64; n], vec![0.5f64; n + 1]];
    let plain = SgdHyper { lr: 0.1, ..SgdHyper::default() };
    let mom = SgdHyper { momentum: 0.9, ..plain.clone() };
    let snap = |s: &SgdState<f64>| s.snapshot();
    let run = |h: &SgdHyper, g: &[Vec<f64>]| {
        let (h, g) = (h.clone(), g.to_vec());
        move |s: &mut [SgdState<f64>], e: &Executor| sgd_kernel(s, &g, &h, e)
    };
    assert_rejected("grad length", &base, snap, run(&plain, &short), is_len(1));
    assert_rejected("grad length with momentum", &base_mom, snap, run(&mom, &short), is_len(1));
    let b = broken(base_mom.clone(), |s| {
        s.buf.as_mut().unwrap().pop();
    });
    assert_rejected("momentum_buffer length", &b, snap, run(&mom, &grads), is_len(1));
    let b = broken(base_mom.clone(), |s| s.buf = None);
    assert_rejected("momentum_buffer missing", &b, snap, run(&mom, &grads), is_missing(1));
    let b = broken(base.clone(), |s| s.buf = Some(vec![0.0; n]));
    assert_rejected("momentum_buffer without momentum", &b, snap, run(&plain, &grads), is_missing(1));
    let invalid = |e: &Error| matches!(e, Error::InvalidArgument(_));
    let nesterov = SgdHyper { nesterov: true, ..plain.clone() };
    assert_rejected("nesterov without momentum", &base, snap, run(&nesterov, &grads), invalid);
    let nesterov = SgdHyper { nesterov: true, dampening: 0.1, ..mom.clone() };
    assert_rejected("nesterov with dampening", &base_mom, snap, run(&nesterov, &grads), invalid);
    let mut ok = base_mom.clone();
    sgd_kernel(&mut ok, &grads, &SgdHyper { nesterov: true, ..mom.clone() }, baseline()).unwrap();
}

#[test]
fn rmsprop_errors_write_nothing() {
    let n = CHUNK + 1;
    let plain = RmspropHyper::default();
    let full = RmspropHyper { momentum: 0.5, centered: true, ..plain.clone() };
    let (base, _) = rmsprop_setup::<f32>(&[n, n], 1, &plain, 7);
    let (base_full, _) = rmsprop_setup::<f32>(&[n, n], 1, &full, 7);
    let grads = vec![vec![0.5f32; n], vec![0.5f32; n]];
    let short = vec![vec![0.5f32; n], vec![]];
    let snap = |s: &RmspropState<f32>| s.snapshot();
    let run = |h: &RmspropHyper, g: &[Vec<f32>]| {
        let (h, g) = (h.clone(), g.to_vec());
        move |s: &mut [RmspropState<f32>], e: &Executor| rmsprop_kernel(s, &g, &h, e)
    };
    assert_rejected("grad length", &base, snap, run(&plain, &short), is_len(1));
    let b = broken(base.clone(), |s| s.sq.push(1.0));
    assert_rejected("square_avg length", &b, snap, run(&plain, &grads), is_len(1));
    let b = broken(base_full.clone(), |s| s.buf.as_mut().unwrap().push(1.0));
    assert_rejected("momentum_buffer length", &b, snap, run(&full, &grads), is_len(1));
    let b = broken(base_full.clone(), |s| {
        s.ga.as_mut().unwrap().pop();
    });
    assert_rejected("grad_avg length", &b, snap, run(&full, &grads), is_len(1));
    let b = broken(base_full.clone(), |s| s.buf = None);
    assert_rejected("momentum_buffer missing", &b, snap, run(&full, &grads), is_missing(1));
    let b = broken(base_full.clone(), |s| s.ga = None);
    assert_rejected("grad_avg missing", &b, snap, run(&full, &grads), is_missing(1));
    let b = broken(base.clone(), |s| s.buf = Some(vec![0.0; n]));
    assert_rejected("momentum_buffer without momentum", &b, snap, run(&plain, &grads), is_missing(1));
    let b = broken(base.clone(), |s| s.ga = Some(vec![0.0; n]));
    assert_rejected("grad_avg without centered", &b, snap, run(&plain, &grads), is_missing(1));
    let mut ok = base_full.clone();
    rmsprop_kernel(&mut ok, &grads, &full, baseline()).unwrap();
}

// ------------------------------------------------------------------------------------------
// raw::check_buffers.
// ------------------------------------------------------------------------------------------

fn f32_buf(addr: usize, len: usize, written: bool) -> Buffer {
    Buffer::of::<f32>("f32", 0, addr, len, written)
}

fn f64_buf(addr: usize, len: usize, written: bool) -> Buffer {
    Buffer::of::<f64>("f64", 1, addr, len, written)
}

/// Refused as a bad buffer on its own (null, misaligned, too big).
fn rejected(buffers: &[Buffer]) -> bool {
    matches!(check_buffers(buffers), Err(Error::InvalidBuffer(_)))
}

/// Refused because a written buffer shares memory with another.
fn overlapping(buffers: &[Buffer]) -> bool {
    matches!(check_buffers(buffers), Err(Error::Overlap(_)))
}

/// Every order of the same buffers must give the same verdict (the check sorts internally).
fn verdict_in_every_rotation(buffers: &[Buffer]) -> bool {
    let first = check_buffers(buffers).is_ok();
    for k in 0..buffers.len() {
        let mut rotated = buffers.to_vec();
        rotated.rotate_left(k);
        assert_eq!(check_buffers(&rotated).is_ok(), first, "order changes the verdict: {rotated:?}");
        rotated.reverse();
        assert_eq!(check_buffers(&rotated).is_ok(), first, "order changes the verdict: {rotated:?}");
    }
    first
}

#[test]
fn check_buffers_rejects_overlapping_written_buffers() {
    let a = 0x1000;
    // Partial overlap, written on both sides or on one.
    assert!(!verdict_in_every_rotation(&[f32_buf(a, 16, true), f32_buf(a + 60, 16, true)]));
    assert!(!verdict_in_every_rotation(&[f32_buf(a, 16, true), f32_buf(a + 60, 16, false)]));
    assert!(!verdict_in_every_rotation(&[f32_buf(a, 16, false), f32_buf(a + 60, 16, true)]));
    // Identical buffers (a param passed as its own grad, or twice).
    assert!(!verdict_in_every_rotation(&[f32_buf(a, 16, true), f32_buf(a, 16, false)]));
    assert!(!verdict_in_every_rotation(&[f32_buf(a, 16, true), f32_buf(a, 16, true)]));
    // A one-element overlap at either end, with mixed element sizes.
    assert!(!verdict_in_every_rotation(&[f64_buf(a, 4, true), f32_buf(a + 28, 4, false)]));
    assert!(!verdict_in_every_rotation(&[f32_buf(a, 4, false), f64_buf(a + 8, 4, true)]));
    assert!(overlapping(&[f32_buf(a, 16, true), f32_buf(a + 60, 16, true)]));
    assert!(overlapping(&[f32_buf(a, 16, true), f32_buf(a, 16, false)]));
    // A bad buffer is reported as such even when buffers also overlap.
    assert!(rejected(&[f32_buf(a, 16, true), f32_buf(a, 16, false), f32_buf(a + 1, 1, false)]));
}

#[test]
fn check_buffers_rejects_a_buffer_inside_another() {
    let a = 0x2000;
    for (outer, inner) in [(true, true), (true, false), (false, true)] {
        assert!(!verdict_in_every_rotation(&[f32_buf(a, 100, outer), f32_buf(a + 40, 3, inner)]), "{outer} {inner}");
        // Inside, past other buffers that end earlier and later.
        assert!(!verdict_in_every_rotation(&[
            f32_buf(a, 100, outer),
            f32_buf(a + 8, 1, false),
            f32_buf(a + 16, 2, false),
            f32_buf(a + 200, 4, inner),
        ]));
        // Sharing the last byte only.
        assert!(!verdict_in_every_rotation(&[f32_buf(a, 100, outer), f32_buf(a + 396, 1, inner)]));
    }
    // A long read-only buffer, a short read-only one starting later, then a written one inside
    // the long one but past the short one: the sweep must remember the furthest end, not the
    // last start.
    assert!(!verdict_in_every_rotation(&[
        f32_buf(a, 1000, false),
        f32_buf(a + 4, 1, false),
        f32_buf(a + 400, 1, true)
    ]));
    // The same with the long one written and the later ones read-only.
    assert!(!verdict_in_every_rotation(&[
        f32_buf(a, 1000, true),
        f32_buf(a + 4000, 1, false),
        f32_buf(a + 400, 1, false)
    ]));
}

#[test]
fn check_buffers_accepts_adjacent_and_read_only_overlaps() {
    let a = 0x3000;
    // Back to back, each ending where the next begins.
    assert!(verdict_in_every_rotation(&[
        f32_buf(a, 4, true),
        f32_buf(a + 16, 4, true),
        f64_buf(a + 32, 2, true),
        f32_buf(a + 48, 1, false)
    ]));
    // Many read-only views of one bucket (grads), params elsewhere.
    assert!(verdict_in_every_rotation(&[
        f32_buf(a, 100, false),
        f32_buf(a, 50, false),
        f32_buf(a + 200, 50, false),
        f32_buf(a, 100, false),
        f32_buf(a + 400, 4, true),
        f32_buf(a + 416, 4, true),
    ]));
    // Empty buffers alias nothing, wherever they point, null included.
    assert!(verdict_in_every_rotation(&[
        f32_buf(a, 4, true),
        f32_buf(a, 0, true),
        f32_buf(0, 0, true),
        f32_buf(a + 4, 0, true)
    ]));
    assert!(check_buffers(&[]).is_ok());
}

#[test]
fn check_buffers_rejects_null_misaligned_and_huge() {
    assert!(rejected(&[f32_buf(0, 1, false)]));
    assert!(rejected(&[f32_buf(0, 1, true)]));
    assert!(rejected(&[f32_buf(0x1002, 1, false)]));
    assert!(rejected(&[f64_buf(0x1004, 1, true)]));
    assert!(check_buffers(&[f64_buf(0x1008, 1, true), f32_buf(0x1004, 1, false)]).is_ok());
    // A bad buffer among good ones is still found.
    assert!(rejected(&[f32_buf(0x1000, 4, true), f64_buf(0x2004, 1, false), f32_buf(0x3000, 4, true)]));
    // Sizes: len * size overflows, the end passes the address space, or more than isize::MAX bytes.
    assert!(rejected(&[f32_buf(0x1000, usize::MAX, false)]));
    assert!(rejected(&[f32_buf(0x1000, usize::MAX / 4 + 1, false)]));
    assert!(rejected(&[f32_buf(usize::MAX - 7, 4, false)]));
    assert!(rejected(&[f32_buf(0x1000, isize::MAX as usize / 4 + 1, false)]));
    assert!(rejected(&[f64_buf(8, (isize::MAX as usize).div_ceil(8), true)]));
    // Just at the isize::MAX limit is a valid size.
    assert!(check_buffers(&[f32_buf(0x1000, isize::MAX as usize / 4, false)]).is_ok());
    // A huge buffer must not swallow an overlap test (no overflowed end).
    assert!(overlapping(&[f32_buf(0x1000, isize::MAX as usize / 4, false), f32_buf(0x2000, 1, true)]));
}

/// A brute-force model of `check_buffers`: every pair, no sweep.
fn check_buffers_model(buffers: &[Buffer]) -> bool {
    let live: Vec<&Buffer> = buffers.iter().filter(|b| b.len > 0).collect();
    for b in &live {
        let bytes = b.len as u128 * b.elem_size as u128;
        if b.addr == 0
            || b.addr % b.align != 0
            || bytes > isize::MAX as u128
            || b.addr as u128 + bytes > usize::MAX as u128
        {
            return false;
        }
    }
    let end = |b: &Buffer| b.addr as u128 + b.len as u128 * b.elem_size as u128;
    for (i, a) in live.iter().enumerate() {
        for b in &live[i + 1..] {
            let overlap = (a.addr as u128) < end(b) && (b.addr as u128) < end(a);
            if overlap && (a.written || b.written) {
                return false;
            }
        }
    }
    true
}

prop_compose! {
    fn any_buffer()(
        wide in any::<bool>(),
        slot in 0usize..48,
        misalign in prop_oneof![8 => Just(0usize), 1 => 1usize..8],
        len in prop_oneof![1 => Just(0usize), 6 => 1usize..12, 1 => Just(usize::MAX / 16)],
        written in prop::bool::weighted(0.4),
        null in prop::bool::weighted(0.03),
    ) -> Buffer {
        let addr = if null { 0 } else { 0x1_0000 + slot * 4 + misalign };
        if wide { f64_buf(addr, len, written) } else { f32_buf(addr, len, written) }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn check_buffers_agrees_with_brute_force(buffers in prop::collection::vec(any_buffer(), 0..8)) {
        prop_assert_eq!(check_buffers(&buffers).is_ok(), check_buffers_model(&buffers), "{:?}", buffers);
    }
}

// ------------------------------------------------------------------------------------------
// The paths themselves.
// ------------------------------------------------------------------------------------------

#[test]
fn every_path_this_cpu_has_is_tested() {
    let levels = SimdLevel::available();
    assert_eq!(levels[0], SimdLevel::Scalar);
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            assert!(levels.contains(&SimdLevel::Avx2));
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
            assert!(levels.contains(&SimdLevel::Avx512) || !is_x86_feature_detected!("avx512dq"));
        }
    }
    assert_eq!(executors().len(), 3 * levels.len());
    eprintln!("SIMD paths tested: {:?}", levels.iter().map(|l| l.name()).collect::<Vec<_>>());
}
