//! bfloat16 and float16 params and state: every kernel computes in f32 and rounds each stored
//! value once (torch's fused CPU kernels' rule). So a half-precision step must be, bit for bit,
//! the f32 step on the loaded values followed by one rounding of each stored value, on every
//! SIMD path and thread count.

mod common;

use common::{load, to, values};
use half::{bf16, f16};
use proptest::prelude::*;
use rsoptim_core::{
    adam_step, rmsprop_step, sgd_step, AdamHyper, AdamTensor, Element, Executor, RmspropHyper, RmspropTensor, Rounding,
    SgdHyper, SgdTensor, SimdLevel, StepCount,
};

fn executors() -> Vec<Executor> {
    let mut all = Vec::new();
    for level in SimdLevel::available() {
        for threads in [1, 3] {
            all.push(Executor::new(threads, level).expect("thread pool").with_parallel_min_elements(0));
        }
    }
    all
}

fn same_bits(a: &[f32], b: &[f32], what: &str) -> Result<(), TestCaseError> {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        prop_assert!(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()), "{what}[{i}]: {x} vs {y}");
    }
    Ok(())
}

/// Adam on `P` params with `S` state, against the f32 kernel on the loaded values plus one
/// rounding per stored value.
fn check_adam<P: Element<Math = f32>, S: Element<Math = f32>>(
    n: usize,
    seed: u64,
    hyper: &AdamHyper,
    steps: u32,
) -> Result<(), TestCaseError> {
    let (p0, g, m0, v0) =
        (values(seed, n, true), values(seed + 1, n, true), values(seed + 2, n, false), values(seed + 3, n, false));
    let v0: Vec<f32> = v0.iter().map(|x| x * x).collect();
    check_adam_from::<P, S>(&p0, &g, &m0, &v0, hyper, steps)
}

/// `check_adam` from given float32 params, grads and moments (each stored as `P` or `S`).
fn check_adam_from<P: Element<Math = f32>, S: Element<Math = f32>>(
    p0: &[f32],
    g: &[f32],
    m0: &[f32],
    v0: &[f32],
    hyper: &AdamHyper,
    steps: u32,
) -> Result<(), TestCaseError> {
    for exec in executors() {
        let (mut p, grad, mut m, mut v, mut vmax) = (to::<P>(p0), to::<P>(g), to::<S>(m0), to::<S>(v0), to::<S>(v0));
        let mut step = 0.0f32;
        for _ in 0..steps {
            // The f32 step on the loaded values, each stored value rounded once.
            let (mut pr, gr, mut mr, mut vr, mut xr) = (load(&p), load(&grad), load(&m), load(&v), load(&vmax));
            let mut step_r = step;
            let reference = AdamTensor::<f32> {
                param: &mut pr,
                grad: &gr,
                exp_avg: &mut mr,
                exp_avg_sq: &mut vr,
                max_exp_avg_sq: hyper.amsgrad.then_some(&mut xr[..]),
                step: StepCount::F32(&mut step_r),
                master_param: None,
                rounding: Rounding::Nearest,
            };
            adam_step(vec![reference], hyper, &exec).unwrap();
            let t = AdamTensor::<P, S> {
                param: &mut p,
                grad: &grad,
                exp_avg: &mut m,
                exp_avg_sq: &mut v,
                max_exp_avg_sq: hyper.amsgrad.then_some(&mut vmax[..]),
                step: StepCount::F32(&mut step),
                master_param: None,
                rounding: Rounding::Nearest,
            };
            adam_step(vec![t], hyper, &exec).unwrap();
            same_bits(&load(&p), &load(&to::<P>(&pr)), "param")?;
            same_bits(&load(&m), &load(&to::<S>(&mr)), "exp_avg")?;
            same_bits(&load(&v), &load(&to::<S>(&vr)), "exp_avg_sq")?;
            if hyper.amsgrad {
                same_bits(&load(&vmax), &load(&to::<S>(&xr)), "max_exp_avg_sq")?;
            }
        }
    }
    Ok(())
}

fn check_sgd<P: Element<Math = f32>, S: Element<Math = f32>>(
    n: usize,
    seed: u64,
    hyper: &SgdHyper,
) -> Result<(), TestCaseError> {
    let (p0, g) = (values(seed, n, true), values(seed + 1, n, true));
    check_sgd_from::<P, S>(&p0, &g, &vec![0.0; n], hyper, &[true, false])
}

/// `check_sgd` from given float32 params, grads and momentum buffers (each stored as `P` or
/// `S`), one step for each of `firsts` (whether the buffer is new at that step).
fn check_sgd_from<P: Element<Math = f32>, S: Element<Math = f32>>(
    p0: &[f32],
    g: &[f32],
    buf0: &[f32],
    hyper: &SgdHyper,
    firsts: &[bool],
) -> Result<(), TestCaseError> {
    let momentum = hyper.momentum != 0.0;
    for exec in executors() {
        let (mut p, grad, mut buf) = (to::<P>(p0), to::<P>(g), to::<S>(buf0));
        for &first in firsts {
            let (mut pr, gr, mut br) = (load(&p), load(&grad), load(&buf));
            let reference = SgdTensor::<f32> {
                param: &mut pr,
                grad: &gr,
                momentum_buffer: momentum.then_some(&mut br[..]),
                momentum_buffer_is_new: first,
                master_param: None,
                rounding: Rounding::Nearest,
                step: None,
            };
            sgd_step(vec![reference], hyper, &exec).unwrap();
            let t = SgdTensor::<P, S> {
                param: &mut p,
                grad: &grad,
                momentum_buffer: momentum.then_some(&mut buf[..]),
                momentum_buffer_is_new: first,
                master_param: None,
                rounding: Rounding::Nearest,
                step: None,
            };
            sgd_step(vec![t], hyper, &exec).unwrap();
            same_bits(&load(&p), &load(&to::<P>(&pr)), "param")?;
            same_bits(&load(&buf), &load(&to::<S>(&br)), "momentum_buffer")?;
        }
    }
    Ok(())
}

fn check_rmsprop<P: Element<Math = f32>, S: Element<Math = f32>>(
    n: usize,
    seed: u64,
    hyper: &RmspropHyper,
) -> Result<(), TestCaseError> {
    let (p0, g) = (values(seed, n, true), values(seed + 1, n, true));
    let zeros = vec![0.0; n];
    check_rmsprop_from::<P, S>(&p0, &g, [&zeros, &zeros, &zeros], hyper)
}

/// `check_rmsprop` from given float32 params, grads and state (square averages, momentum
/// buffers, grad averages; each stored as `P` or `S`).
fn check_rmsprop_from<P: Element<Math = f32>, S: Element<Math = f32>>(
    p0: &[f32],
    g: &[f32],
    [sq0, buf0, ga0]: [&[f32]; 3],
    hyper: &RmspropHyper,
) -> Result<(), TestCaseError> {
    let (momentum, centered) = (hyper.momentum > 0.0, hyper.centered);
    for exec in executors() {
        let (mut p, grad) = (to::<P>(p0), to::<P>(g));
        let (mut sq, mut buf, mut ga) = (to::<S>(sq0), to::<S>(buf0), to::<S>(ga0));
        let mut step = 0.0f32;
        for _ in 0..2 {
            let (mut pr, gr, mut sr, mut br, mut ar) = (load(&p), load(&grad), load(&sq), load(&buf), load(&ga));
            let mut step_r = step;
            let reference = RmspropTensor::<f32> {
                param: &mut pr,
                grad: &gr,
                square_avg: &mut sr,
                momentum_buffer: momentum.then_some(&mut br[..]),
                grad_avg: centered.then_some(&mut ar[..]),
                step: StepCount::F32(&mut step_r),
                master_param: None,
                rounding: Rounding::Nearest,
            };
            rmsprop_step(vec![reference], hyper, &exec).unwrap();
            let t = RmspropTensor::<P, S> {
                param: &mut p,
                grad: &grad,
                square_avg: &mut sq,
                momentum_buffer: momentum.then_some(&mut buf[..]),
                grad_avg: centered.then_some(&mut ga[..]),
                step: StepCount::F32(&mut step),
                master_param: None,
                rounding: Rounding::Nearest,
            };
            rmsprop_step(vec![t], hyper, &exec).unwrap();
            same_bits(&load(&p), &load(&to::<P>(&pr)), "param")?;
            same_bits(&load(&sq), &load(&to::<S>(&sr)), "square_avg")?;
            same_bits(&load(&buf), &load(&to::<S>(&br)), "momentum_buffer")?;
            same_bits(&load(&ga), &load(&to::<S>(&ar)), "grad_avg")?;
        }
    }
    Ok(())
}

#[test]
fn half_types_load_exactly_and_store_to_nearest_even() {
    // 1 + 2^-8 lies halfway between two bf16 values: ties go to the even one (1.0).
    assert_eq!(bf16::store(1.0 + 2f32.powi(-8)).load(), 1.0);
    assert_eq!(bf16::store(1.0 + 3.0 * 2f32.powi(-8)).load(), 1.0 + 2f32.powi(-6));
    assert_eq!(f16::store(1.0 + 2f32.powi(-11)).load(), 1.0);
    assert_eq!(f16::store(70000.0).load(), f32::INFINITY); // past f16's range
    assert_eq!(f16::store(1e-8).load(), 0.0); // torch's eps=1e-8 is 0 in float16
    assert!(bf16::store(f32::NAN).load().is_nan() && f16::store(f32::NAN).load().is_nan());
    for x in values(7, 1000, true) {
        let (b, h) = (bf16::store(x), f16::store(x));
        assert!(b.load().to_bits() == bf16::store(b.load()).load().to_bits() || x.is_nan());
        assert!(h.load().to_bits() == f16::store(h.load()).load().to_bits() || x.is_nan());
    }
}

/// Values as dead units leave them: runs of 300 elements (every other run, from a parity the
/// seed picks) whose grads are zero and whose state is made of bfloat16 subnormals (multiples of
/// 2^-133, float32 subnormals too) or zeros.
struct DeadUnits {
    n: usize,
    dead: Vec<bool>,
}

impl DeadUnits {
    fn new(n: usize, seed: u64) -> Self {
        Self { n, dead: (0..n).map(|i| (i / 300 + seed as usize).is_multiple_of(2)).collect() }
    }

    /// Grads from `seed`, zero in the dead runs.
    fn grads(&self, seed: u64) -> Vec<f32> {
        values(seed, self.n, false).iter().zip(&self.dead).map(|(&x, &dead)| if dead { 0.0 } else { x }).collect()
    }

    /// State from `seed`, subnormal in the dead runs; non-negative with `squares` (second
    /// moments, square averages: squares of the values outside the dead runs).
    fn state(&self, seed: u64, squares: bool) -> Vec<f32> {
        let tiny = |x: f32| {
            if x == 0.0 {
                0.0
            } else {
                x.signum() * ((x.abs() * 1e4) as u32 % 127 + 1) as f32 * 2f32.powi(-133)
            }
        };
        values(seed, self.n, false)
            .iter()
            .zip(&self.dead)
            .map(|(&x, &dead)| match (dead, squares) {
                (true, true) => tiny(x).abs(),
                (true, false) => tiny(x),
                (false, true) => x * x,
                (false, false) => x,
            })
            .collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn adam_on_half_types_is_the_f32_step_rounded_once(
        n in prop_oneof![1usize..40, Just(4099usize)],
        seed in any::<u64>(),
        amsgrad in any::<bool>(),
        wd in prop_oneof![Just(0.0), Just(0.01)],
        decoupled in any::<bool>(),
        maximize in any::<bool>(),
    ) {
        let hyper = AdamHyper { lr: 1e-2, weight_decay: wd, amsgrad, decoupled_weight_decay: decoupled, maximize, ..AdamHyper::default() };
        check_adam::<bf16, bf16>(n, seed, &hyper, 3)?;
        check_adam::<f16, f16>(n, seed, &hyper, 3)?;
        check_adam::<bf16, f32>(n, seed, &hyper, 3)?;
        check_adam::<f16, f32>(n, seed, &hyper, 3)?;
    }

    /// Moments in runs of bfloat16 subnormals (multiples of 2^-133, float32 subnormals too) and
    /// grads in runs of zeros, as dead units leave them: the kernels step the stretches that
    /// start with subnormals in float64 (see rsoptim_core's `subnormal`), in the half types'
    /// blocks as on float32 buffers, with the same bits. (That the float32 step's are the
    /// reference's is tested in reference.rs; that the blocks take the float64 path, in
    /// subnormal_path.rs.)
    #[test]
    fn adam_on_half_types_with_subnormal_state_is_the_f32_step_rounded_once(
        n in prop_oneof![1usize..40, Just(1000usize), Just(4099usize)],
        seed in any::<u64>(),
        amsgrad in any::<bool>(),
    ) {
        let dead = DeadUnits::new(n, seed);
        let (p0, g) = (values(seed, n, false), dead.grads(seed + 1));
        let (m0, v0) = (dead.state(seed + 2, false), dead.state(seed + 3, true));
        let hyper = AdamHyper { lr: 1e-2, amsgrad, ..AdamHyper::default() };
        check_adam_from::<bf16, bf16>(&p0, &g, &m0, &v0, &hyper, 3)?;
        check_adam_from::<bf16, f32>(&p0, &g, &m0, &v0, &hyper, 3)?;
        check_adam_from::<f16, f32>(&p0, &g, &m0, &v0, &hyper, 3)?;
    }

    /// SGD's momentum buffers as dead units leave them (see the Adam test above), stepped as
    /// existing buffers.
    #[test]
    fn sgd_on_half_types_with_subnormal_momentum_is_the_f32_step_rounded_once(
        n in prop_oneof![1usize..40, Just(1000usize), Just(4099usize)],
        seed in any::<u64>(),
        nesterov in any::<bool>(),
    ) {
        let dead = DeadUnits::new(n, seed);
        let (p0, g, buf0) = (values(seed, n, false), dead.grads(seed + 1), dead.state(seed + 2, false));
        let hyper = SgdHyper { lr: 0.1, momentum: 0.9, nesterov, ..SgdHyper::default() };
        check_sgd_from::<bf16, bf16>(&p0, &g, &buf0, &hyper, &[false, false])?;
        check_sgd_from::<bf16, f32>(&p0, &g, &buf0, &hyper, &[false, false])?;
        check_sgd_from::<f16, f32>(&p0, &g, &buf0, &hyper, &[false, false])?;
    }

    /// RMSprop's square averages, momentum buffers and grad averages as dead units leave them
    /// (see the Adam test above).
    #[test]
    fn rmsprop_on_half_types_with_subnormal_state_is_the_f32_step_rounded_once(
        n in prop_oneof![1usize..40, Just(1000usize), Just(4099usize)],
        seed in any::<u64>(),
        momentum in prop_oneof![Just(0.0), Just(0.9)],
        centered in any::<bool>(),
    ) {
        let dead = DeadUnits::new(n, seed);
        let (p0, g) = (values(seed, n, false), dead.grads(seed + 1));
        let (sq0, buf0, ga0) = (dead.state(seed + 2, true), dead.state(seed + 3, false), dead.state(seed + 4, false));
        let hyper = RmspropHyper { lr: 1e-2, momentum, centered, ..RmspropHyper::default() };
        check_rmsprop_from::<bf16, bf16>(&p0, &g, [&sq0, &buf0, &ga0], &hyper)?;
        check_rmsprop_from::<bf16, f32>(&p0, &g, [&sq0, &buf0, &ga0], &hyper)?;
        check_rmsprop_from::<f16, f32>(&p0, &g, [&sq0, &buf0, &ga0], &hyper)?;
    }

    #[test]
    fn sgd_on_half_types_is_the_f32_step_rounded_once(
        n in prop_oneof![1usize..40, Just(4099usize)],
        seed in any::<u64>(),
        momentum in prop_oneof![Just(0.0), Just(0.9)],
        nesterov in any::<bool>(),
        wd in prop_oneof![Just(0.0), Just(0.01)],
    ) {
        let hyper = SgdHyper { lr: 0.1, momentum, nesterov: nesterov && momentum != 0.0, weight_decay: wd, ..SgdHyper::default() };
        check_sgd::<bf16, bf16>(n, seed, &hyper)?;
        check_sgd::<f16, f16>(n, seed, &hyper)?;
        check_sgd::<bf16, f32>(n, seed, &hyper)?;
    }

    #[test]
    fn rmsprop_on_half_types_is_the_f32_step_rounded_once(
        n in prop_oneof![1usize..40, Just(4099usize)],
        seed in any::<u64>(),
        momentum in prop_oneof![Just(0.0), Just(0.9)],
        centered in any::<bool>(),
        wd in prop_oneof![Just(0.0), Just(0.01)],
    ) {
        let hyper = RmspropHyper { lr: 1e-2, momentum, centered, weight_decay: wd, ..RmspropHyper::default() };
        check_rmsprop::<bf16, bf16>(n, seed, &hyper)?;
        check_rmsprop::<f16, f16>(n, seed, &hyper)?;
        check_rmsprop::<bf16, f32>(n, seed, &hyper)?;
    }
}

#[test]
fn float16_loads_match_the_half_crate_for_every_value() {
    for bits in 0..=u16::MAX {
        let (ours, theirs) = (f16::from_bits(bits).load(), f16::from_bits(bits).to_f32());
        assert!(
            ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
            "{bits:#06x}: {ours} vs {theirs}"
        );
    }
}

#[test]
fn float16_stores_match_the_half_crate() {
    let check = |x: f32| {
        let (ours, theirs) = (f16::store(x), f16::from_f32(x));
        assert!(
            ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
            "{x:e} ({:#010x}): {:#06x} vs {:#06x}",
            x.to_bits(),
            ours.to_bits(),
            theirs.to_bits()
        );
    };
    // Every sign, exponent and kept mantissa bit of a normal float16 result, with the 13 dropped
    // bits at the rounding boundaries (zero, just above zero, just below half, half, just above half, all ones).
    for high in 0..(1u32 << 19) {
        for low in [0, 1, 0x0fff, 0x1000, 0x1001, 0x1fff] {
            check(f32::from_bits((high << 13) | low));
        }
    }
    // Every float32 whose float16 is subnormal (from half the smallest subnormal up to the
    // smallest normal), where more than 13 bits are dropped; the sign is one OR.
    for bits in (102u32 << 23)..(113u32 << 23) {
        check(f32::from_bits(bits));
    }
    // And a spread of every other bit pattern.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..4_000_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        check(f32::from_bits(state as u32));
    }
}

#[test]
fn half_norms_and_scales_are_those_of_the_loaded_float32_values() {
    use rsoptim_core::{scale_in_place, tensor_norms, NormType};
    for exec in executors() {
        for n in [0usize, 1, 7, 33, 70_000] {
            let x = values(n as u64 + 3, n, false);
            let (b, h) = (to::<bf16>(&x), to::<f16>(&x));
            for norm in [NormType::One, NormType::Two, NormType::Inf, NormType::P(3.0)] {
                let want_b = tensor_norms(&[&load(&b)[..]], norm, &exec)[0];
                let want_h = tensor_norms(&[&load(&h)[..]], norm, &exec)[0];
                assert_eq!(tensor_norms(&[&b[..]], norm, &exec)[0].to_bits(), want_b.to_bits(), "bf16 {norm:?} n={n}");
                assert_eq!(tensor_norms(&[&h[..]], norm, &exec)[0].to_bits(), want_h.to_bits(), "f16 {norm:?} n={n}");
            }
            let mut scaled = b.clone();
            scale_in_place(vec![&mut scaled[..]], 0.3f32, &exec);
            let want: Vec<f32> = load(&b).iter().map(|v| bf16::store(v * 0.3).load()).collect();
            assert_eq!(
                load(&scaled).iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
