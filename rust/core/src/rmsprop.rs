//! RMSprop, plain and centered, with momentum (`torch.optim.RMSprop`).

use crate::block::{blocks, load_grad_block, scratch, state_block, state_unblock, GradFactor, ParamOut, Rounding};
use crate::element::{lerp, torch_add, torch_addcdiv, torch_addcmul, Element, Real};
use crate::error::{check_len, Error};
use crate::exec::{split_opt, Executor, Splittable};
use crate::simd::{dispatch, Isa, Kernel};
use crate::step::StepCount;
use crate::subnormal::{counted, starts_subnormal, stretches, Arith, Native};

#[derive(Clone, Debug, PartialEq)]
pub struct RmspropHyper {
    pub lr: f64,
    pub alpha: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub centered: bool,
    pub maximize: bool,
    /// What `clip_grad_norm_` would have multiplied the grads by (1: nothing clipped): the step
    /// uses the clipped grads and leaves the grads as they are.
    pub grad_scale: f64,
}

impl Default for RmspropHyper {
    fn default() -> Self {
        Self {
            lr: 1e-2,
            alpha: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            centered: false,
            maximize: false,
            grad_scale: 1.0,
        }
    }
}

/// One param's buffers: `momentum_buffer` exactly when `momentum > 0`, `grad_avg` exactly when
/// `centered`.
/// The state is stored as `S` (see `AdamTensor`), computed in `P::Math`, rounded once;
/// `master_param` and `rounding` as in `AdamTensor`.
pub struct RmspropTensor<'a, P: Element, S: Element<Math = P::Math> = <P as Element>::Math> {
    pub param: &'a mut [P],
    pub grad: &'a [P],
    pub square_avg: &'a mut [S],
    pub momentum_buffer: Option<&'a mut [S]>,
    pub grad_avg: Option<&'a mut [S]>,
    pub step: StepCount<'a>,
    pub master_param: Option<&'a mut [P::Math]>,
    pub rounding: Rounding,
}

#[derive(Clone, Copy, Debug)]
struct RmspropScalars<T> {
    grad: GradFactor<T>,
    weight_decay: T,
    alpha: T,
    one_minus_alpha: T,
    eps: T,
    momentum: T,
    neg_lr: T,
}

impl<T: Real> RmspropScalars<T> {
    fn new(h: &RmspropHyper) -> Self {
        Self {
            grad: GradFactor::new(h.maximize, h.grad_scale),
            weight_decay: T::round_from(h.weight_decay),
            alpha: T::round_from(h.alpha),
            one_minus_alpha: T::round_from(1.0 - h.alpha),
            eps: T::round_from(h.eps),
            momentum: T::round_from(h.momentum),
            neg_lr: T::round_from(-h.lr),
        }
    }
}

struct RmspropJob<'a, P: Element, S: Element<Math = P::Math>> {
    param: ParamOut<'a, P>,
    grad: &'a [P],
    square_avg: &'a mut [S],
    momentum_buffer: Option<&'a mut [S]>,
    grad_avg: Option<&'a mut [S]>,
    k: RmspropScalars<P::Math>,
}

impl<P: Element, S: Element<Math = P::Math>> Splittable for RmspropJob<'_, P, S> {
    fn len(&self) -> usize {
        self.param.len()
    }

    fn split_at(self, mid: usize) -> (Self, Self) {
        let (p0, p1) = self.param.split_at(mid);
        let (g0, g1) = self.grad.split_at(mid);
        let (s0, s1) = self.square_avg.split_at_mut(mid);
        let (b0, b1) = split_opt(self.momentum_buffer, mid);
        let (a0, a1) = split_opt(self.grad_avg, mid);
        let k = self.k;
        (
            Self { param: p0, grad: g0, square_avg: s0, momentum_buffer: b0, grad_avg: a0, k },
            Self { param: p1, grad: g1, square_avg: s1, momentum_buffer: b1, grad_avg: a1, k },
        )
    }
}

struct RmspropKernel<
    'a,
    P: Element,
    S: Element<Math = P::Math>,
    const CENTERED: bool,
    const MOMENTUM: bool,
    const L2: bool,
>(RmspropJob<'a, P, S>);

impl<P: Element, S: Element<Math = P::Math>, const CENTERED: bool, const MOMENTUM: bool, const L2: bool> Kernel
    for RmspropKernel<'_, P, S, CENTERED, MOMENTUM, L2>
{
    type Output = ();

    #[inline(always)]
    fn run<I: Isa>(self, isa: I) {
        if self.0.param.is_plain() && S::IS_MATH {
            self.update_in_place()
        } else {
            self.update_by_blocks(isa)
        }
    }
}

impl<P: Element, S: Element<Math = P::Math>, const CENTERED: bool, const MOMENTUM: bool, const L2: bool>
    RmspropKernel<'_, P, S, CENTERED, MOMENTUM, L2>
{
    /// The update on the buffers themselves, each value loaded and stored with `load`/`store`.
    /// Stretches of state with subnormals are stepped with `SubnormalSafe` arithmetic (the same
    /// bits, without the float32 assists: see `subnormal`).
    #[inline(always)]
    fn update_in_place(self) {
        let RmspropJob { param, grad, square_avg, momentum_buffer, grad_avg, k } = self.0;
        let param = param.param;
        let n = param.len();
        let (grad, sq) = (&grad[..n], &mut square_avg[..n]);
        let buf: &mut [S] = match momentum_buffer {
            Some(b) if MOMENTUM => &mut b[..n],
            _ => &mut [],
        };
        let ga: &mut [S] = match grad_avg {
            Some(a) if CENTERED => &mut a[..n],
            _ => &mut [],
        };
        if !P::Math::TESTS_SUBNORMALS {
            return Self::update_range(Native, &k, param, grad, sq, buf, ga);
        }
        let safe = <P::Math as Real>::SubnormalSafe::default();
        for r in stretches(n) {
            let buf = if MOMENTUM { &mut buf[r.clone()] } else { &mut [] };
            let ga = if CENTERED { &mut ga[r.clone()] } else { &mut [] };
            let (param, grad, sq) = (&mut param[r.clone()], &grad[r.clone()], &mut sq[r]);
            if counted(starts_subnormal(sq) || starts_subnormal(buf) || starts_subnormal(ga)) {
                Self::update_range(safe, &k, param, grad, sq, buf, ga);
            } else {
                Self::update_range(Native, &k, param, grad, sq, buf, ga);
            }
        }
    }

    /// The update of one stretch of elements, the state's operations (and the param's, which
    /// they scale) computed by `arith`'s.
    #[inline(always)]
    fn update_range<A: Arith<P::Math>>(
        arith: A,
        k: &RmspropScalars<P::Math>,
        param: &mut [P],
        grad: &[P],
        sq: &mut [S],
        buf: &mut [S],
        ga: &mut [S],
    ) {
        let n = param.len();
        let (grad, sq) = (&grad[..n], &mut sq[..n]);
        let buf = if MOMENTUM { &mut buf[..n] } else { buf };
        let ga = if CENTERED { &mut ga[..n] } else { ga };
        let one = <P::Math as num_traits::One>::one();
        for i in 0..n {
            let p = param[i].load();
            let mut g = grad[i].load() * k.grad.in_place();
            if L2 {
                g = torch_add(Native, g, p, k.weight_decay);
            }
            // `square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)`
            let sq_new = torch_addcmul(arith, arith.mul(sq[i].load(), k.alpha), g, g, k.one_minus_alpha);
            sq[i] = S::store(sq_new);
            let rms = if CENTERED {
                let ga_new = lerp(arith, ga[i].load(), g, k.one_minus_alpha);
                ga[i] = S::store(ga_new);
                // `square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()`
                arith.sqrt(torch_addcmul(arith, sq_new, ga_new, ga_new, -one))
            } else {
                arith.sqrt(sq_new)
            };
            // eps is added after the sqrt.
            let avg = rms + k.eps;
            let p = if MOMENTUM {
                // `buf.mul_(momentum).addcdiv_(g, avg)`, then `param.add_(buf, alpha=-lr)`
                let b = torch_addcdiv(arith, arith.mul(buf[i].load(), k.momentum), g, avg, one);
                buf[i] = S::store(b);
                torch_add(arith, p, b, k.neg_lr)
            } else {
                // `param.addcdiv_(g, avg, value=-lr)`
                torch_addcdiv(arith, p, g, avg, k.neg_lr)
            };
            param[i] = P::store(p);
        }
    }

    /// The same update over blocks converted to the maths type (see `block`).
    #[inline(always)]
    fn update_by_blocks<I: Isa>(self, isa: I) {
        let RmspropJob { mut param, grad, square_avg, mut momentum_buffer, mut grad_avg, k } = self.0;
        let (mut p, mut g, mut sq, mut b, mut a) = (scratch(), scratch(), scratch(), scratch(), scratch());
        for (start, end) in blocks(param.len()) {
            let len = end - start;
            load_grad_block(isa, &grad[start..end], &mut g[..len], k.grad.scale);
            let mut buf = momentum_buffer.as_deref_mut().map(|buf| &mut buf[start..end]);
            let mut avg = grad_avg.as_deref_mut().map(|avg| &mut avg[start..end]);
            let block = RmspropJob::<P::Math, P::Math> {
                param: ParamOut::new(param.block(isa, start, end, &mut p[..len]), None, None),
                grad: &g[..len],
                square_avg: state_block(isa, &mut square_avg[start..end], &mut sq[..len]),
                momentum_buffer: buf.as_deref_mut().map(|buf| state_block(isa, buf, &mut b[..len])),
                grad_avg: avg.as_deref_mut().map(|avg| state_block(isa, avg, &mut a[..len])),
                k: RmspropScalars { grad: k.grad.for_block(), ..k },
            };
            RmspropKernel::<P::Math, P::Math, CENTERED, MOMENTUM, L2>(block).update_in_place();
            param.unblock(isa, start, end, &p[..len]);
            state_unblock(isa, &sq[..len], &mut square_avg[start..end]);
            if let Some(buf) = buf {
                state_unblock(isa, &b[..len], buf);
            }
            if let Some(avg) = avg {
                state_unblock(isa, &a[..len], avg);
            }
        }
    }
}

/// One RMSprop step over every tensor of a param group: increments each step count and updates
/// params and state in place. Checks every length before it writes anything.
pub fn rmsprop_step<P: Element, S: Element<Math = P::Math>>(
    tensors: Vec<RmspropTensor<'_, P, S>>,
    hyper: &RmspropHyper,
    exec: &Executor,
) -> Result<(), Error> {
    let momentum = hyper.momentum > 0.0;
    for (i, t) in tensors.iter().enumerate() {
        let n = t.param.len();
        check_len(i, "grad", n, t.grad.len())?;
        check_len(i, "square_avg", n, t.square_avg.len())?;
        if let Some(master) = &t.master_param {
            check_len(i, "master_param", n, master.len())?;
        }
        for (buffer, needed, given) in [
            ("momentum_buffer (exactly when momentum > 0)", momentum, &t.momentum_buffer),
            ("grad_avg (exactly when centered)", hyper.centered, &t.grad_avg),
        ] {
            match (given, needed) {
                (Some(b), true) => check_len(i, buffer, n, b.len())?,
                (None, false) => {}
                _ => return Err(Error::MissingBuffer { tensor: i, buffer }),
            }
        }
    }
    let k = RmspropScalars::new(hyper);
    let jobs: Vec<RmspropJob<'_, P, S>> = tensors
        .into_iter()
        .map(|mut t| {
            let step = t.step.increment();
            RmspropJob {
                param: ParamOut::new(t.param, t.master_param, t.rounding.key(step)),
                grad: t.grad,
                square_avg: t.square_avg,
                momentum_buffer: t.momentum_buffer,
                grad_avg: t.grad_avg,
                k,
            }
        })
        .collect();
    let (centered, l2, simd) = (hyper.centered, hyper.weight_decay != 0.0, exec.simd());
    exec.for_each_piece(jobs, |job| match (centered, momentum, l2) {
        (false, false, false) => dispatch(simd, RmspropKernel::<P, S, false, false, false>(job)),
        (false, false, true) => dispatch(simd, RmspropKernel::<P, S, false, false, true>(job)),
        (false, true, false) => dispatch(simd, RmspropKernel::<P, S, false, true, false>(job)),
        (false, true, true) => dispatch(simd, RmspropKernel::<P, S, false, true, true>(job)),
        (true, false, false) => dispatch(simd, RmspropKernel::<P, S, true, false, false>(job)),
        (true, false, true) => dispatch(simd, RmspropKernel::<P, S, true, false, true>(job)),
        (true, true, false) => dispatch(simd, RmspropKernel::<P, S, true, true, false>(job)),
        (true, true, true) => dispatch(simd, RmspropKernel::<P, S, true, true, true>(job)),
    });
    Ok(())
}
