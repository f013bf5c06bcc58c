//! The kernels step stretches of state that start with subnormals in float64 arithmetic
//! (`rsoptim_core::subnormal`). The results are the same bits either way, so the tests against
//! the reference cannot tell whether that path is taken: this counts the stretches that take it,
//! for every buffer whose subnormals should send a stretch there. (One test in its own binary:
//! the count is per process.)

use half::bf16;
use rsoptim_core::subnormal::{widened_stretches, STRETCH};
use rsoptim_core::{
    adam_step, rmsprop_step, sgd_step, AdamHyper, AdamTensor, Element, Executor, RmspropHyper, RmspropTensor, Rounding,
    SgdHyper, SgdTensor, SimdLevel, StepCount,
};

const STRETCHES: usize = 4;
const N: usize = STRETCHES * STRETCH;
const TINY: f32 = f32::from_bits(3);
/// A bfloat16 subnormal (a float32 one too): 3 * 2^-133.
const BF16_TINY: f32 = f32::from_bits(3 << 16);

/// How many stretches `step` stepped in float64.
fn widened_by(step: impl FnOnce()) -> u64 {
    let before = widened_stretches();
    step();
    widened_stretches() - before
}

/// Adam on one tensor of zero grads, with the given first moments, second moments and (with
/// amsgrad) maxima of the second moments, params and state stored as `P` (half types step in
/// float32 blocks).
fn adam_typed<P: Element<Math = f32>>(m: f32, v: f32, vmax: Option<f32>, exec: &Executor) -> u64 {
    let (mut p, g) = (vec![P::store(0.5); N], vec![P::store(0.0); N]);
    let (mut m, mut v, mut vmax) = (vec![P::store(m); N], vec![P::store(v); N], vmax.map(|x| vec![P::store(x); N]));
    let mut step = 3.0f32;
    let hyper = AdamHyper { amsgrad: vmax.is_some(), ..AdamHyper::default() };
    widened_by(|| {
        let t = AdamTensor::<P, P> {
            param: &mut p,
            grad: &g,
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            max_exp_avg_sq: vmax.as_deref_mut(),
            step: StepCount::F32(&mut step),
            master_param: None,
            rounding: Rounding::Nearest,
        };
        adam_step(vec![t], &hyper, exec).unwrap();
    })
}

fn adam(m: f32, v: f32, vmax: Option<f32>, exec: &Executor) -> u64 {
    adam_typed::<f32>(m, v, vmax, exec)
}

/// SGD with momentum on one tensor of zero grads, with the given momentum buffers, params and
/// state stored as `P`.
fn sgd_typed<P: Element<Math = f32>>(buf: f32, exec: &Executor) -> u64 {
    let (mut p, g, mut buf) = (vec![P::store(0.5); N], vec![P::store(0.0); N], vec![P::store(buf); N]);
    let hyper = SgdHyper { momentum: 0.9, ..SgdHyper::default() };
    widened_by(|| {
        let t = SgdTensor::<P, P> {
            param: &mut p,
            grad: &g,
            momentum_buffer: Some(&mut buf),
            momentum_buffer_is_new: false,
            master_param: None,
            rounding: Rounding::Nearest,
            step: None,
        };
        sgd_step(vec![t], &hyper, exec).unwrap();
    })
}

fn sgd(buf: f32, exec: &Executor) -> u64 {
    sgd_typed::<f32>(buf, exec)
}

/// RMSprop, centered with momentum, with the given square averages, momentum buffers and grad
/// averages, params and state stored as `P`.
fn rmsprop_typed<P: Element<Math = f32>>(sq: f32, buf: f32, ga: f32, exec: &Executor) -> u64 {
    let (mut p, g) = (vec![P::store(0.5); N], vec![P::store(0.0); N]);
    let (mut sq, mut buf, mut ga) = (vec![P::store(sq); N], vec![P::store(buf); N], vec![P::store(ga); N]);
    let mut step = 3.0f32;
    let hyper = RmspropHyper { momentum: 0.9, centered: true, ..RmspropHyper::default() };
    widened_by(|| {
        let t = RmspropTensor::<P, P> {
            param: &mut p,
            grad: &g,
            square_avg: &mut sq,
            momentum_buffer: Some(&mut buf),
            grad_avg: Some(&mut ga),
            step: StepCount::F32(&mut step),
            master_param: None,
            rounding: Rounding::Nearest,
        };
        rmsprop_step(vec![t], &hyper, exec).unwrap();
    })
}

fn rmsprop(sq: f32, buf: f32, ga: f32, exec: &Executor) -> u64 {
    rmsprop_typed::<f32>(sq, buf, ga, exec)
}

#[test]
fn stretches_that_start_with_subnormal_state_are_stepped_in_float64() {
    // Measured on x86 only: elsewhere every stretch is stepped natively.
    let widened = if cfg!(any(target_arch = "x86", target_arch = "x86_64")) { STRETCHES as u64 } else { 0 };
    for level in SimdLevel::available() {
        let exec = Executor::new(1, level).unwrap();
        let cases = [
            ("adam, normal state", adam(0.1, 0.01, None, &exec), 0),
            ("adam, zero state", adam(0.0, 0.0, None, &exec), 0),
            ("adam, subnormal exp_avg", adam(TINY, 0.01, None, &exec), widened),
            ("adam, subnormal exp_avg_sq", adam(0.1, TINY, None, &exec), widened),
            ("adam amsgrad, subnormal max_exp_avg_sq", adam(0.1, 0.0, Some(TINY), &exec), widened),
            ("adam bfloat16, normal state", adam_typed::<bf16>(0.1, 0.01, None, &exec), 0),
            ("adam bfloat16, subnormal exp_avg", adam_typed::<bf16>(BF16_TINY, 0.01, None, &exec), widened),
            ("adam bfloat16, subnormal exp_avg_sq", adam_typed::<bf16>(0.1, BF16_TINY, None, &exec), widened),
            ("sgd, normal momentum", sgd(0.1, &exec), 0),
            ("sgd, subnormal momentum", sgd(-TINY, &exec), widened),
            ("rmsprop, normal state", rmsprop(0.1, 0.1, 0.1, &exec), 0),
            ("rmsprop, subnormal square_avg", rmsprop(TINY, 0.1, 0.1, &exec), widened),
            ("rmsprop, subnormal momentum_buffer", rmsprop(0.1, TINY, 0.1, &exec), widened),
            ("rmsprop, subnormal grad_avg", rmsprop(0.1, 0.1, TINY, &exec), widened),
            ("sgd bfloat16, normal momentum", sgd_typed::<bf16>(0.1, &exec), 0),
            ("sgd bfloat16, subnormal momentum", sgd_typed::<bf16>(-BF16_TINY, &exec), widened),
            ("rmsprop bfloat16, normal state", rmsprop_typed::<bf16>(0.1, 0.1, 0.1, &exec), 0),
            ("rmsprop bfloat16, subnormal square_avg", rmsprop_typed::<bf16>(BF16_TINY, 0.1, 0.1, &exec), widened),
            ("rmsprop bfloat16, subnormal momentum_buffer", rmsprop_typed::<bf16>(0.1, BF16_TINY, 0.1, &exec), widened),
            ("rmsprop bfloat16, subnormal grad_avg", rmsprop_typed::<bf16>(0.1, 0.1, BF16_TINY, &exec), widened),
        ];
        for (case, got, want) in cases {
            assert_eq!(got, want, "{level}: {case}: stretches stepped in float64");
        }
    }
}
