//! Adam with block-wise 8-bit states (`adam8bit_step`).
//!
//! * The codes against an oracle that knows nothing of bit patterns: the 256 values each code
//!   decodes to, searched for the nearest in exact `f64` arithmetic.
//! * A step against its definition built from parts tested elsewhere: decode the states, run
//!   the float32 `adam_step` (itself checked against torch's for-loop) for the new moments,
//!   update the param with the bias correction folded (written out here), encode by the
//!   block's largest magnitude. Bit for bit, for every SIMD path and thread count, float32/bfloat16/
//!   float16 params, master copies and stochastic rounding, lengths around the block size.
//! * Writes stay inside their slices (buffers fenced by sentinels); a bad length is refused
//!   before anything is written.

mod common;
#[cfg(unix)]
mod unmapped;

use common::{load, to, values};
use half::{bf16, f16};
use rsoptim_core::adam8bit::codes::{decode_signed, decode_unsigned, encode_signed, encode_unsigned};
use rsoptim_core::{
    adam8bit_step, adam_step, quant_blocks, round_into, Adam8bitTensor, AdamHyper, AdamTensor, Element, Error,
    Executor, RoundTensor, Rounding, SimdLevel, StepCount, QUANT_BLOCK,
};
#[cfg(unix)]
use unmapped::BeforeUnmappedPage;

/// The code whose value is nearest to `y` in exact arithmetic, ties away from zero, with the
/// codes' one exception: magnitudes below the smallest non-zero code's lower half-step are zero.
fn nearest_code(y: f32, decode: fn(u8) -> f32) -> u8 {
    let a = (y as f64).abs().min(1.0);
    let smallest = (0..=255u8).map(|c| decode(c) as f64).filter(|&v| v > 0.0).fold(f64::INFINITY, f64::min);
    let next = (0..=255u8).map(|c| decode(c) as f64).filter(|&v| v > smallest).fold(f64::INFINITY, f64::min);
    // Positive second moments (unsigned codes) never become zero.
    let unsigned = decode(0) == 0.0;
    let target = if a < smallest - (next - smallest) / 2.0 {
        if unsigned && y > 0.0 {
            smallest
        } else {
            0.0
        }
    } else {
        a
    };
    let negative = y.is_sign_negative();
    let mut best: Option<(f64, f64, u8)> = None;
    for c in 0..=255u8 {
        let v = decode(c) as f64;
        // Same sign as `y` (zero included), or unsigned codes.
        if v.is_sign_negative() != negative && decode(0) < 0.0 {
            continue;
        }
        let (dist, mag) = ((v.abs() - target).abs(), v.abs());
        let better = match best {
            None => true,
            Some((d, m, _)) => dist < d || (dist == d && mag > m),
        };
        if better {
            best = Some((dist, mag, c));
        }
    }
    best.expect("some code").2
}

#[test]
fn codes_are_the_nearest_values_of_their_maps() {
    let mut checked = 0;
    // Every decoded value, the midpoints between neighbours and their float32 neighbours, and a
    // sweep of magnitudes over the whole range.
    let mut ys: Vec<f32> = Vec::new();
    for decode in [decode_signed as fn(u8) -> f32, decode_unsigned] {
        for c in 0..255u8 {
            let (lo, hi) = (decode(c), decode(c + 1));
            let mid = ((lo as f64 + hi as f64) / 2.0) as f32;
            ys.extend([
                lo,
                hi,
                mid,
                f32::from_bits(mid.to_bits() + 1),
                f32::from_bits(mid.to_bits().saturating_sub(1)),
            ]);
        }
    }
    ys.extend((0..20_000).map(|i| 2f32.powf(-40.0 + 40.0 * i as f32 / 20_000.0)));
    ys.extend([0.0, 1.0, 1.5, f32::INFINITY]);
    for &y in &ys {
        for y in [y, -y] {
            assert_eq!(encode_signed(y), nearest_code(y, decode_signed), "signed {y:e}");
            if y >= 0.0 {
                assert_eq!(encode_unsigned(y), nearest_code(y, decode_unsigned), "unsigned {y:e}");
            }
            checked += 1;
        }
    }
    assert!(checked > 40_000);
    // A NaN (scaled by a non-finite block scale) encodes as the largest magnitude.
    assert_eq!(encode_unsigned(f32::NAN), 255);
}

#[test]
fn the_maps_cover_their_stated_ranges() {
    let signed: Vec<f32> = (128..=255u8).map(decode_signed).collect();
    assert_eq!((signed[0], signed[1], signed[127]), (0.0, 2f32.powi(-16) * 1.25, 1.0));
    let unsigned: Vec<f32> = (0..=255u8).map(decode_unsigned).collect();
    assert_eq!((unsigned[0], unsigned[1], unsigned[255]), (0.0, 2f32.powi(-32) * 1.25, 1.0));
    for c in 0..128u8 {
        assert_eq!(decode_signed(c), -decode_signed(255 - c), "code {c} mirrors code {}", 255 - c);
    }
}

/// One tensor's 8-bit state.
#[derive(Clone, Debug, PartialEq)]
struct State {
    m_codes: Vec<u8>,
    v_codes: Vec<u8>,
    m_scales: Vec<f32>,
    v_scales: Vec<f32>,
    step: f32,
}

impl State {
    fn zeros(n: usize) -> Self {
        Self {
            m_codes: vec![0; n],
            v_codes: vec![0; n],
            m_scales: vec![0.0; quant_blocks(n)],
            v_scales: vec![0.0; quant_blocks(n)],
            step: 0.0,
        }
    }

    /// A kernel tensor over this state, without a master copy, rounded to nearest.
    fn tensor<'a, P: Element<Math = f32>>(&'a mut self, param: &'a mut [P], grad: &'a [P]) -> Adam8bitTensor<'a, P> {
        Adam8bitTensor {
            param,
            grad,
            exp_avg_codes: &mut self.m_codes,
            exp_avg_sq_codes: &mut self.v_codes,
            exp_avg_scales: &mut self.m_scales,
            exp_avg_sq_scales: &mut self.v_scales,
            step: StepCount::F32(&mut self.step),
            master_param: None,
            rounding: Rounding::Nearest,
        }
    }

    fn decoded(&self) -> (Vec<f32>, Vec<f32>) {
        let decode = |codes: &[u8], scales: &[f32], decode: fn(u8) -> f32| -> Vec<f32> {
            codes.iter().enumerate().map(|(i, &c)| times(decode(c), scales[i / QUANT_BLOCK])).collect()
        };
        (decode(&self.m_codes, &self.m_scales, decode_signed), decode(&self.v_codes, &self.v_scales, decode_unsigned))
    }
}

/// A decoded value times its scale, zero staying zero whatever the scale.
fn times(decoded: f32, scale: f32) -> f32 {
    if decoded == 0.0 {
        decoded
    } else {
        decoded * scale
    }
}

/// The largest magnitude of each block, NaN winning (`torch.max` of the absolute values).
fn block_scales(x: &[f32]) -> Vec<f32> {
    x.chunks(QUANT_BLOCK)
        .map(|b| b.iter().fold(0f32, |acc, &v| if acc.is_nan() || v.is_nan() { f32::NAN } else { acc.max(v.abs()) }))
        .collect()
}

fn encode_by_blocks(x: &[f32], scales: &[f32], encode: fn(f32) -> u8) -> Vec<u8> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let s = scales[i / QUANT_BLOCK];
            encode(v * if s > 0.0 { 1.0 / s } else { 0.0 })
        })
        .collect()
}

/// The step by its definition: decode; the float32 `adam_step` for the new moments (on a copy of
/// the param, which it updates in torch's form); the param's update in the folded form (see
/// `folded_update`) from those moments, rounded into the param as `adam_step` rounds; encode.
fn reference_step<P: Element<Math = f32>>(
    param: &mut [P],
    master: Option<&mut [f32]>,
    grad: &[P],
    state: &mut State,
    h: &AdamHyper,
    rounding: Rounding,
) {
    let (mut m, mut v) = state.decoded();
    let mut param_copy = param.to_vec();
    let mut master_copy = master.as_deref().map(<[f32]>::to_vec);
    let tensor = AdamTensor::<P, f32> {
        param: &mut param_copy,
        grad,
        exp_avg: &mut m,
        exp_avg_sq: &mut v,
        max_exp_avg_sq: None,
        step: StepCount::F32(&mut state.step),
        master_param: master_copy.as_deref_mut(),
        rounding,
    };
    let exec = Executor::new(1, SimdLevel::Scalar).expect("pool");
    adam_step(vec![tensor], h, &exec).expect("reference step");
    let step = f64::from(state.step); // counted by the step
    let unrounded = master.as_deref().map_or_else(|| load(param), <[f32]>::to_vec);
    let updated = folded_update(h, step, &unrounded, &m, &v);
    if let Some(master) = master {
        master.copy_from_slice(&updated);
    }
    let round = RoundTensor { param, source: &updated, rounding, step };
    round_into(vec![round], &exec).expect("rounding");
    state.m_scales = block_scales(&m);
    state.v_scales = block_scales(&v);
    state.m_codes = encode_by_blocks(&m, &state.m_scales, encode_signed);
    state.v_codes = encode_by_blocks(&v, &state.v_scales, encode_unsigned);
}

/// Adam's param update after decoupled decay, with the second moment's bias correction
/// `c = sqrt(bc2)` folded into the step size and eps, as bitsandbytes writes it:
/// `p - (lr c / bc1) m / (sqrt(v) + eps c)`, the constants rounded once from f64 (torch's
/// float32 arithmetic for a Tensor lr's step size and decay, as `adam_step` has them).
fn folded_update(h: &AdamHyper, step: f64, params: &[f32], m: &[f32], v: &[f32]) -> Vec<f32> {
    let bias_correction1 = 1.0 - h.beta1.powf(step);
    let correction = (1.0 - h.beta2.powf(step)).powf(0.5);
    let (step_size, decay) = if h.lr_in_f32 {
        let (lr, wd) = (h.lr as f32, h.weight_decay as f32);
        (f64::from(lr / bias_correction1 as f32), 1.0 - lr * wd)
    } else {
        (h.lr / bias_correction1, (1.0 - h.lr * h.weight_decay) as f32)
    };
    let decay = if h.decoupled_weight_decay && h.weight_decay != 0.0 { decay } else { 1.0 };
    let (eps, neg_step_size) = ((h.eps * correction) as f32, (-step_size * correction) as f32);
    params.iter().zip(m).zip(v).map(|((&p, &m), &v)| p * decay + neg_step_size * m / (v.sqrt() + eps)).collect()
}

fn executors() -> Vec<Executor> {
    let mut all = Vec::new();
    for level in SimdLevel::available() {
        for threads in [1, 3] {
            all.push(Executor::new(threads, level).expect("thread pool").with_parallel_min_elements(0));
        }
    }
    all
}

fn hypers() -> Vec<AdamHyper> {
    vec![
        AdamHyper::default(),
        AdamHyper { lr: 0.01, weight_decay: 0.1, ..AdamHyper::default() },
        AdamHyper {
            weight_decay: 0.05,
            decoupled_weight_decay: true,
            maximize: true,
            beta1: 0.5,
            ..AdamHyper::default()
        },
        AdamHyper { grad_scale: 0.25, eps: 1e-3, beta2: 0.9, ..AdamHyper::default() },
        // The clip factor of a NaN total norm (`max_grad_norm`): every grad becomes NaN.
        AdamHyper { grad_scale: f64::NAN, maximize: true, ..AdamHyper::default() },
        AdamHyper { grad_scale: f64::NAN, ..AdamHyper::default() },
        AdamHyper { grad_scale: -f64::NAN, weight_decay: 0.1, ..AdamHyper::default() },
    ]
}

/// Runs 4 steps of the kernel and of the reference on the same inputs and compares every
/// buffer bit for bit (NaN equal to NaN).
fn check_against_reference<P: Element<Math = f32> + PartialEq + std::fmt::Debug>(
    n: usize,
    h: &AdamHyper,
    exec: &Executor,
    with_master: bool,
    rounding: Rounding,
    non_finite: bool,
) {
    check_from_step::<P>(0.0, n, h, exec, with_master, rounding, non_finite);
}

/// As `check_against_reference`, the step counts starting at `first_step`.
fn check_from_step<P: Element<Math = f32> + PartialEq + std::fmt::Debug>(
    first_step: f32,
    n: usize,
    h: &AdamHyper,
    exec: &Executor,
    with_master: bool,
    rounding: Rounding,
    non_finite: bool,
) {
    let bits = |x: &[f32]| x.iter().map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() }).collect::<Vec<_>>();
    let start: Vec<P> = to(&values(n as u64 + 1, n, false));
    let (mut p_kernel, mut p_ref) = (start.clone(), start.clone());
    let mut master_kernel: Option<Vec<f32>> = with_master.then(|| load(&start));
    let mut master_ref = master_kernel.clone();
    let (mut s_kernel, mut s_ref) = (State::zeros(n), State::zeros(n));
    (s_kernel.step, s_ref.step) = (first_step, first_step);
    for step in 0..4u64 {
        let grad: Vec<P> = to(&values(1000 * step + n as u64, n, non_finite && step == 2));
        let tensor = Adam8bitTensor {
            master_param: master_kernel.as_deref_mut(),
            rounding,
            ..s_kernel.tensor(&mut p_kernel, &grad)
        };
        adam8bit_step(vec![tensor], h, exec).expect("kernel step");
        reference_step(&mut p_ref, master_ref.as_deref_mut(), &grad, &mut s_ref, h, rounding);
        let what = format!("n={n} step={step} {h:?} simd={:?} threads={}", exec.simd(), exec.threads());
        assert_eq!(bits(&load(&p_kernel)), bits(&load(&p_ref)), "params, {what}");
        assert_eq!(s_kernel.m_codes, s_ref.m_codes, "exp_avg codes, {what}");
        assert_eq!(s_kernel.v_codes, s_ref.v_codes, "exp_avg_sq codes, {what}");
        assert_eq!(bits(&s_kernel.m_scales), bits(&s_ref.m_scales), "exp_avg scales, {what}");
        assert_eq!(bits(&s_kernel.v_scales), bits(&s_ref.v_scales), "exp_avg_sq scales, {what}");
        assert_eq!(s_kernel.step, s_ref.step);
        if let (Some(a), Some(b)) = (&master_kernel, &master_ref) {
            assert_eq!(bits(a), bits(b), "master, {what}");
        }
    }
}

#[test]
fn a_step_is_the_float32_step_on_the_decoded_state_encoded_by_blocks() {
    for exec in executors() {
        for h in hypers() {
            for n in [0, 1, 7, 255, 256, 257, 1023, 1024, 3000] {
                check_against_reference::<f32>(n, &h, &exec, false, Rounding::Nearest, false);
                check_against_reference::<f32>(n, &h, &exec, false, Rounding::Nearest, true);
            }
        }
    }
}

#[test]
fn half_params_master_copies_and_stochastic_rounding_compose_with_8bit_states() {
    let stochastic = Rounding::Stochastic { seed: 7, stream: 3 };
    for exec in executors() {
        let h = AdamHyper { weight_decay: 0.01, decoupled_weight_decay: true, ..AdamHyper::default() };
        for n in [1, 256, 2500] {
            check_against_reference::<bf16>(n, &h, &exec, false, Rounding::Nearest, false);
            check_against_reference::<f16>(n, &h, &exec, false, Rounding::Nearest, false);
            check_against_reference::<bf16>(n, &h, &exec, true, stochastic, false);
            check_against_reference::<f16>(n, &h, &exec, true, Rounding::Nearest, false);
            check_against_reference::<bf16>(n, &h, &exec, false, stochastic, false);
        }
        // Half-precision params rounded to nearest are loaded and stored by the update loop
        // itself, unless the grads are scaled (clipping): every option, both ways; a scale that
        // is not a power of two, so that scaling a grad rounds it.
        let clipped = AdamHyper { grad_scale: 0.3, ..AdamHyper::default() };
        for h in hypers().into_iter().chain([clipped]) {
            for n in [1, 256, 2500] {
                for non_finite in [false, true] {
                    check_against_reference::<bf16>(n, &h, &exec, false, Rounding::Nearest, non_finite);
                    check_against_reference::<f16>(n, &h, &exec, false, Rounding::Nearest, non_finite);
                }
            }
        }
    }
}

#[test]
fn late_steps_whose_bias_correction_is_one_take_the_same_bits() {
    // The second moment's bias correction rounds to 1 in float32 from step 16,628 on with
    // beta2 = 0.999, from 158 with 0.9 (the folded constants are rounded from f64): after and
    // just before.
    let late = [(0.999, 20_000.0), (0.999, 16_000.0), (0.9, 300.0), (0.9, 150.0)];
    for exec in executors() {
        for (beta2, first_step) in late {
            for h in [
                AdamHyper { beta2, ..AdamHyper::default() },
                AdamHyper { beta2, weight_decay: 0.1, ..AdamHyper::default() },
                AdamHyper { beta2, weight_decay: 0.1, decoupled_weight_decay: true, ..AdamHyper::default() },
            ] {
                for n in [1, 256, 3000] {
                    check_from_step::<f32>(first_step, n, &h, &exec, false, Rounding::Nearest, false);
                }
            }
            let h = AdamHyper { beta2, ..AdamHyper::default() };
            check_from_step::<bf16>(first_step, 700, &h, &exec, true, Rounding::Nearest, false);
            check_from_step::<f32>(first_step, 2000, &h, &exec, false, Rounding::Nearest, true);
        }
    }
}

#[test]
fn a_non_finite_grad_gives_the_same_bits_on_every_path() {
    for exec in executors() {
        check_against_reference::<f32>(2000, &AdamHyper::default(), &exec, false, Rounding::Nearest, true);
    }
}

#[test]
fn big_tensors_split_between_threads_at_block_boundaries() {
    let exec = Executor::new(3, SimdLevel::best()).expect("pool").with_parallel_min_elements(0);
    for n in [70_001, 200_000] {
        check_against_reference::<f32>(n, &AdamHyper::default(), &exec, false, Rounding::Nearest, false);
    }
}

#[test]
fn writes_stay_inside_their_slices() {
    // float32 and bfloat16 params: on AVX-512 both are loaded and stored by the update loop's
    // own 16-element vectors (`adam8bit/fused.rs`), a block's last partial one under a mask;
    // float16 params take the generic loop throughout.
    writes_stay_inside::<f32>();
    writes_stay_inside::<bf16>();
    writes_stay_inside::<f16>();
}

fn writes_stay_inside<P: Element<Math = f32>>() {
    const FENCE: usize = 64;
    for exec in executors() {
        for n in [1usize, 15, 17, 255, 257, 1500] {
            // A fence a step would change (a NaN stays NaN through the update, so it would not
            // show a write past the slice).
            let mut param = vec![P::store(3.0); n + 2 * FENCE];
            param[FENCE..FENCE + n].fill(P::store(0.5));
            let grad = vec![P::store(1.0); n];
            let mut m_codes = vec![0xA5u8; n + 2 * FENCE];
            let mut v_codes = vec![0xA5u8; n + 2 * FENCE];
            let blocks = quant_blocks(n);
            let mut m_scales = vec![-7.0f32; blocks + 2 * FENCE];
            let mut v_scales = vec![-7.0f32; blocks + 2 * FENCE];
            m_codes[FENCE..FENCE + n].fill(0);
            v_codes[FENCE..FENCE + n].fill(0);
            m_scales[FENCE..FENCE + blocks].fill(0.0);
            v_scales[FENCE..FENCE + blocks].fill(0.0);
            let mut step = 0.0f32;
            for _ in 0..2 {
                let tensor = Adam8bitTensor {
                    param: &mut param[FENCE..FENCE + n],
                    grad: &grad,
                    exp_avg_codes: &mut m_codes[FENCE..FENCE + n],
                    exp_avg_sq_codes: &mut v_codes[FENCE..FENCE + n],
                    exp_avg_scales: &mut m_scales[FENCE..FENCE + blocks],
                    exp_avg_sq_scales: &mut v_scales[FENCE..FENCE + blocks],
                    step: StepCount::F32(&mut step),
                    master_param: None,
                    rounding: Rounding::Nearest,
                };
                adam8bit_step(vec![tensor], &AdamHyper::default(), &exec).expect("step");
            }
            for fence in [0..FENCE, FENCE + n..n + 2 * FENCE] {
                assert!(param[fence.clone()].iter().all(|x| x.load() == 3.0));
                assert!(m_codes[fence.clone()].iter().chain(&v_codes[fence]).all(|&c| c == 0xA5));
            }
            for fence in [0..FENCE, FENCE + blocks..blocks + 2 * FENCE] {
                assert!(m_scales[fence.clone()].iter().chain(&v_scales[fence]).all(|&s| s == -7.0));
            }
            assert!(param[FENCE..FENCE + n].iter().all(|x| x.load() < 0.5), "every element stepped");
        }
    }
}

/// Every buffer ends at an unmapped page: the AVX-512 loop's last, partial vector is loaded and
/// stored under a mask, and must not touch the lanes past the end (loaded whole, it faults here).
/// The longer tensors' prefetches (1024 elements ahead of the loop) reach into that page and
/// past it: hints, which must not fault either.
#[cfg(unix)]
#[test]
fn tensors_that_end_at_an_unmapped_page_are_stepped() {
    steps_before_an_unmapped_page::<f32>();
    steps_before_an_unmapped_page::<bf16>();
    steps_before_an_unmapped_page::<f16>();
}

#[cfg(unix)]
fn steps_before_an_unmapped_page<P: Element<Math = f32>>() {
    for exec in executors() {
        for n in [1usize, 15, 17, QUANT_BLOCK, QUANT_BLOCK + 17, 3 * QUANT_BLOCK - 1, 1024 + 100, 4096 + 1] {
            let mut param = BeforeUnmappedPage::new(n, P::store(0.5));
            let mut grad = BeforeUnmappedPage::new(n, P::store(1.0));
            let (mut m_codes, mut v_codes) = (BeforeUnmappedPage::new(n, 0u8), BeforeUnmappedPage::new(n, 0u8));
            let blocks = quant_blocks(n);
            let (mut m_scales, mut v_scales) =
                (BeforeUnmappedPage::new(blocks, 0f32), BeforeUnmappedPage::new(blocks, 0f32));
            let mut step = 0.0f32;
            for _ in 0..2 {
                let tensor = Adam8bitTensor {
                    param: param.slice(),
                    grad: grad.slice(),
                    exp_avg_codes: m_codes.slice(),
                    exp_avg_sq_codes: v_codes.slice(),
                    exp_avg_scales: m_scales.slice(),
                    exp_avg_sq_scales: v_scales.slice(),
                    step: StepCount::F32(&mut step),
                    master_param: None,
                    rounding: Rounding::Nearest,
                };
                adam8bit_step(vec![tensor], &AdamHyper::default(), &exec).expect("step");
            }
            assert!(param.slice().iter().all(|x| x.load() < 0.5), "every element stepped");
        }
    }
}

#[test]
fn bad_lengths_and_amsgrad_are_refused_before_anything_is_written() {
    let exec = Executor::new(1, SimdLevel::Scalar).expect("pool");
    let n = 300;
    let (mut p0, mut p1) = (vec![1.0f32; n], vec![1.0f32; n]);
    let grad = vec![1.0f32; n];
    let (mut m0, mut v0, mut m1, mut v1) = (vec![0u8; n], vec![0u8; n], vec![0u8; n], vec![0u8; n]);
    let (mut ms0, mut vs0) = (vec![0f32; 2], vec![0f32; 2]);
    let (mut ms1, mut vs1) = (vec![0f32; 1], vec![0f32; 2]); // one scale short
    let (mut step0, mut step1) = (0f32, 0f32);
    let tensors = vec![
        Adam8bitTensor {
            param: &mut p0,
            grad: &grad,
            exp_avg_codes: &mut m0,
            exp_avg_sq_codes: &mut v0,
            exp_avg_scales: &mut ms0,
            exp_avg_sq_scales: &mut vs0,
            step: StepCount::F32(&mut step0),
            master_param: None,
            rounding: Rounding::Nearest,
        },
        Adam8bitTensor {
            param: &mut p1,
            grad: &grad,
            exp_avg_codes: &mut m1,
            exp_avg_sq_codes: &mut v1,
            exp_avg_scales: &mut ms1,
            exp_avg_sq_scales: &mut vs1,
            step: StepCount::F32(&mut step1),
            master_param: None,
            rounding: Rounding::Nearest,
        },
    ];
    let err = adam8bit_step(tensors, &AdamHyper::default(), &exec).unwrap_err();
    assert!(matches!(err, Error::LengthMismatch { tensor: 1, .. }), "{err:?}");
    assert!(p0.iter().all(|&x| x == 1.0) && step0 == 0.0 && step1 == 0.0);

    let mut step = 0f32;
    let tensor = Adam8bitTensor {
        param: &mut p0,
        grad: &grad,
        exp_avg_codes: &mut m0,
        exp_avg_sq_codes: &mut v0,
        exp_avg_scales: &mut ms0,
        exp_avg_sq_scales: &mut vs0,
        step: StepCount::F32(&mut step),
        master_param: None,
        rounding: Rounding::Nearest,
    };
    let amsgrad = AdamHyper { amsgrad: true, ..AdamHyper::default() };
    assert!(matches!(adam8bit_step(vec![tensor], &amsgrad, &exec), Err(Error::InvalidArgument(_))));
    assert_eq!(step, 0.0);
}

/// A NaN param whose update is another NaN keeps the param's payload (the final add's first
/// operand) on every path, in a tensor's last, partial vector too: AVX-512 once handed those
/// elements to a generic loop compiled with the add's operands swapped.
#[test]
fn a_nan_param_keeps_its_payload_on_every_path_to_the_last_element() {
    let step = |level: SimdLevel, i: usize, n: usize| {
        let (mut p, mut g) = (vec![1.0f32; n], vec![1.0f32; n]);
        p[i] = f32::from_bits(0x7fc1_2345);
        g[i] = f32::NEG_INFINITY; // the update is inf / inf, the default NaN
        let mut state = State::zeros(n);
        adam8bit_step(vec![state.tensor(&mut p, &g)], &AdamHyper::default(), &Executor::new(1, level).expect("pool"))
            .expect("step");
        p[i].to_bits()
    };
    for (n, i) in [(37, 3), (37, 34), (300, 290), (16, 15)] {
        let want = step(SimdLevel::Scalar, i, n);
        for level in SimdLevel::available() {
            assert_eq!(step(level, i, n), want, "{level} element {i} of {n}");
        }
    }
}
