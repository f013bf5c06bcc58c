//! SGD with momentum, dampening and Nesterov (`torch.optim.SGD`).

use crate::block::{blocks, load_grad_block, scratch, state_block, state_unblock, GradFactor, ParamOut, Rounding};
use crate::element::{torch_add, Element, Real};
use crate::error::{check_len, Error};
use crate::exec::{split_opt, Executor, Splittable};
use crate::simd::{dispatch, Isa, Kernel};
use crate::step::StepCount;
use crate::subnormal::{counted, starts_subnormal, stretches, Arith, Native};

#[derive(Clone, Debug, PartialEq)]
pub struct SgdHyper {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub maximize: bool,
    /// What `clip_grad_norm_` would have multiplied the grads by (1: nothing clipped): the step
    /// uses the clipped grads and leaves the grads as they are.
    pub grad_scale: f64,
}

impl Default for SgdHyper {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
            grad_scale: 1.0,
        }
    }
}

/// One param's buffers. `momentum_buffer` is given exactly when `momentum != 0`; a buffer the
/// caller has just allocated (`momentum_buffer_is_new`) is filled with the grad, as torch's
/// first step clones the grad into it (no dampening).
/// The buffer is stored as `S` (see `AdamTensor`), computed in `P::Math`, rounded once;
/// `master_param` and `rounding` as in `AdamTensor`. torch's SGD counts no steps: a `step`, when
/// given, is incremented and keys stochastic rounding, which needs one.
pub struct SgdTensor<'a, P: Element, S: Element<Math = P::Math> = <P as Element>::Math> {
    pub param: &'a mut [P],
    pub grad: &'a [P],
    pub momentum_buffer: Option<&'a mut [S]>,
    pub momentum_buffer_is_new: bool,
    pub master_param: Option<&'a mut [P::Math]>,
    pub rounding: Rounding,
    pub step: Option<StepCount<'a>>,
}

#[derive(Clone, Copy, Debug)]
struct SgdScalars<T> {
    grad: GradFactor<T>,
    weight_decay: T,
    momentum: T,
    one_minus_dampening: T,
    neg_lr: T,
}

impl<T: Real> SgdScalars<T> {
    fn new(h: &SgdHyper) -> Self {
        Self {
            grad: GradFactor::new(h.maximize, h.grad_scale),
            weight_decay: T::round_from(h.weight_decay),
            momentum: T::round_from(h.momentum),
            one_minus_dampening: T::round_from(1.0 - h.dampening),
            neg_lr: T::round_from(-h.lr),
        }
    }
}

struct SgdJob<'a, P: Element, S: Element<Math = P::Math>> {
    param: ParamOut<'a, P>,
    grad: &'a [P],
    momentum_buffer: Option<&'a mut [S]>,
    first: bool,
    k: SgdScalars<P::Math>,
}

impl<P: Element, S: Element<Math = P::Math>> Splittable for SgdJob<'_, P, S> {
    fn len(&self) -> usize {
        self.param.len()
    }

    fn split_at(self, mid: usize) -> (Self, Self) {
        let (p0, p1) = self.param.split_at(mid);
        let (g0, g1) = self.grad.split_at(mid);
        let (b0, b1) = split_opt(self.momentum_buffer, mid);
        let (first, k) = (self.first, self.k);
        (
            Self { param: p0, grad: g0, momentum_buffer: b0, first, k },
            Self { param: p1, grad: g1, momentum_buffer: b1, first, k },
        )
    }
}

struct SgdKernel<
    'a,
    P: Element,
    S: Element<Math = P::Math>,
    const MOMENTUM: bool,
    const FIRST: bool,
    const NESTEROV: bool,
    const L2: bool,
>(SgdJob<'a, P, S>);

impl<
        P: Element,
        S: Element<Math = P::Math>,
        const MOMENTUM: bool,
        const FIRST: bool,
        const NESTEROV: bool,
        const L2: bool,
    > Kernel for SgdKernel<'_, P, S, MOMENTUM, FIRST, NESTEROV, L2>
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

impl<
        P: Element,
        S: Element<Math = P::Math>,
        const MOMENTUM: bool,
        const FIRST: bool,
        const NESTEROV: bool,
        const L2: bool,
    > SgdKernel<'_, P, S, MOMENTUM, FIRST, NESTEROV, L2>
{
    /// The update on the buffers themselves, each value loaded and stored with `load`/`store`.
    /// Stretches of momentum buffer with subnormals are stepped with `SubnormalSafe` arithmetic
    /// (the same bits, without the float32 assists: see `subnormal`).
    #[inline(always)]
    fn update_in_place(self) {
        let SgdJob { param, grad, momentum_buffer, k, .. } = self.0;
        let param = param.param;
        let n = param.len();
        let grad = &grad[..n];
        let buf: &mut [S] = match momentum_buffer {
            Some(b) if MOMENTUM => &mut b[..n],
            _ => &mut [],
        };
        if !(MOMENTUM && !FIRST && P::Math::TESTS_SUBNORMALS) {
            return Self::update_range(Native, &k, param, grad, buf);
        }
        let safe = <P::Math as Real>::SubnormalSafe::default();
        for r in stretches(n) {
            let (param, grad, buf) = (&mut param[r.clone()], &grad[r.clone()], &mut buf[r]);
            if counted(starts_subnormal(buf)) {
                Self::update_range(safe, &k, param, grad, buf);
            } else {
                Self::update_range(Native, &k, param, grad, buf);
            }
        }
    }

    /// The update of one stretch of elements, the momentum's operations (and the param's, which
    /// scale it) computed by `arith`'s.
    #[inline(always)]
    fn update_range<A: Arith<P::Math>>(arith: A, k: &SgdScalars<P::Math>, param: &mut [P], grad: &[P], buf: &mut [S]) {
        let n = param.len();
        let grad = &grad[..n];
        let buf = if MOMENTUM { &mut buf[..n] } else { buf };
        for i in 0..n {
            let p = param[i].load();
            let mut g = grad[i].load() * k.grad.in_place();
            if L2 {
                g = torch_add(Native, g, p, k.weight_decay);
            }
            if MOMENTUM {
                // `buf.mul_(momentum).add_(g, alpha=1 - dampening)`; the first step clones g.
                let b = if FIRST {
                    g
                } else {
                    torch_add(arith, arith.mul(buf[i].load(), k.momentum), g, k.one_minus_dampening)
                };
                buf[i] = S::store(b);
                g = if NESTEROV { torch_add(arith, g, b, k.momentum) } else { b };
            }
            param[i] = P::store(torch_add(arith, p, g, k.neg_lr));
        }
    }

    /// The same update over blocks converted to the maths type (see `block`).
    #[inline(always)]
    fn update_by_blocks<I: Isa>(self, isa: I) {
        let SgdJob { mut param, grad, mut momentum_buffer, first, k } = self.0;
        let (mut p, mut g, mut b) = (scratch(), scratch(), scratch());
        for (start, end) in blocks(param.len()) {
            let len = end - start;
            load_grad_block(isa, &grad[start..end], &mut g[..len], k.grad.scale);
            let mut buf = momentum_buffer.as_deref_mut().map(|buf| &mut buf[start..end]);
            let block = SgdJob::<P::Math, P::Math> {
                param: ParamOut::new(param.block(isa, start, end, &mut p[..len]), None, None),
                grad: &g[..len],
                momentum_buffer: match buf.as_deref_mut() {
                    // A new buffer's contents are not read (the loop writes it without reading).
                    Some(_) if FIRST && !S::IS_MATH => Some(&mut b[..len]),
                    Some(buf) => Some(state_block(isa, buf, &mut b[..len])),
                    None => None,
                },
                first,
                k: SgdScalars { grad: k.grad.for_block(), ..k },
            };
            SgdKernel::<P::Math, P::Math, MOMENTUM, FIRST, NESTEROV, L2>(block).update_in_place();
            param.unblock(isa, start, end, &p[..len]);
            if let Some(buf) = buf {
                state_unblock(isa, &b[..len], buf);
            }
        }
    }
}

/// One SGD step over every tensor of a param group. Checks every length before it writes.
pub fn sgd_step<P: Element, S: Element<Math = P::Math>>(
    tensors: Vec<SgdTensor<'_, P, S>>,
    hyper: &SgdHyper,
    exec: &Executor,
) -> Result<(), Error> {
    let momentum = hyper.momentum != 0.0;
    if hyper.nesterov && (!momentum || hyper.dampening != 0.0) {
        return Err(Error::InvalidArgument("Nesterov momentum requires a momentum and zero dampening".into()));
    }
    for (i, t) in tensors.iter().enumerate() {
        check_len(i, "grad", t.param.len(), t.grad.len())?;
        match (&t.momentum_buffer, momentum) {
            (Some(b), true) => check_len(i, "momentum_buffer", t.param.len(), b.len())?,
            (None, false) => {}
            _ => {
                return Err(Error::MissingBuffer { tensor: i, buffer: "momentum_buffer (exactly when momentum != 0)" })
            }
        }
        if let Some(master) = &t.master_param {
            check_len(i, "master_param", t.param.len(), master.len())?;
        }
        if matches!(t.rounding, Rounding::Stochastic { .. }) && t.step.is_none() {
            return Err(Error::MissingBuffer { tensor: i, buffer: "step (stochastic rounding draws by step)" });
        }
    }
    let k = SgdScalars::new(hyper);
    let jobs: Vec<SgdJob<'_, P, S>> = tensors
        .into_iter()
        .map(|t| {
            let step = t.step.map(|mut step| step.increment());
            let key = step.and_then(|step| t.rounding.key(step));
            SgdJob {
                param: ParamOut::new(t.param, t.master_param, key),
                grad: t.grad,
                momentum_buffer: t.momentum_buffer,
                first: t.momentum_buffer_is_new,
                k,
            }
        })
        .collect();
    let (l2, nesterov, simd) = (hyper.weight_decay != 0.0, hyper.nesterov, exec.simd());
    exec.for_each_piece(jobs, |job| match (momentum, job.first, nesterov, l2) {
        (false, _, _, false) => dispatch(simd, SgdKernel::<P, S, false, false, false, false>(job)),
        (false, _, _, true) => dispatch(simd, SgdKernel::<P, S, false, false, false, true>(job)),
        (true, false, false, false) => dispatch(simd, SgdKernel::<P, S, true, false, false, false>(job)),
        (true, false, false, true) => dispatch(simd, SgdKernel::<P, S, true, false, false, true>(job)),
        (true, false, true, false) => dispatch(simd, SgdKernel::<P, S, true, false, true, false>(job)),
        (true, false, true, true) => dispatch(simd, SgdKernel::<P, S, true, false, true, true>(job)),
        (true, true, false, false) => dispatch(simd, SgdKernel::<P, S, true, true, false, false>(job)),
        (true, true, false, true) => dispatch(simd, SgdKernel::<P, S, true, true, false, true>(job)),
        (true, true, true, false) => dispatch(simd, SgdKernel::<P, S, true, true, true, false>(job)),
        (true, true, true, true) => dispatch(simd, SgdKernel::<P, S, true, true, true, true>(job)),
    });
    Ok(())
}
