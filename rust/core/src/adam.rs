//! Adam and AdamW (`torch.optim.Adam`, `torch.optim.AdamW`), in torch's order of operations.

use crate::block::{blocks, load_grad_block, scratch, state_block, state_unblock, GradFactor, ParamOut, Rounding};
use crate::element::{lerp, torch_add, torch_addcdiv, torch_addcmul, Element, Real, Reciprocal};
use crate::error::{check_len, Error};
use crate::exec::{split_opt, Executor, Splittable};
use crate::simd::{dispatch, Isa, Kernel};
use crate::step::StepCount;
use crate::subnormal::{counted, starts_subnormal, stretches, Arith, Native};

/// The hyperparameters of one param group, as torch's Python floats.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
    pub maximize: bool,
    /// AdamW: `param *= 1 - lr * weight_decay` instead of adding `weight_decay * param` to the grad.
    pub decoupled_weight_decay: bool,
    /// torch keeps a Tensor `lr` as a float32 0-dim tensor: `lr / bias_correction1` and
    /// `1 - lr * weight_decay` are then computed in float32, not in Python floats.
    pub lr_in_f32: bool,
    /// What `clip_grad_norm_` would have multiplied the grads by (1: nothing clipped): the step
    /// uses the clipped grads and leaves the grads as they are.
    pub grad_scale: f64,
}

impl Default for AdamHyper {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            maximize: false,
            decoupled_weight_decay: false,
            lr_in_f32: false,
            grad_scale: 1.0,
        }
    }
}

/// One param's buffers. `max_exp_avg_sq` is given exactly when `amsgrad` is set. The state is
/// stored as `S`: by default the maths type (float32 state for float32, bfloat16 or float16
/// params), or the param's own type, as torch.optim keeps it; every value is computed in
/// `P::Math` and rounded once when stored. With a `master_param` (the param's unrounded values)
/// the step updates the master copy and writes the param as its rounding, by `rounding`.
pub struct AdamTensor<'a, P: Element, S: Element<Math = P::Math> = <P as Element>::Math> {
    pub param: &'a mut [P],
    pub grad: &'a [P],
    pub exp_avg: &'a mut [S],
    pub exp_avg_sq: &'a mut [S],
    pub max_exp_avg_sq: Option<&'a mut [S]>,
    pub step: StepCount<'a>,
    pub master_param: Option<&'a mut [P::Math]>,
    pub rounding: Rounding,
}

/// The arithmetic of an update's first-moment operations (its moving average, and the param's
/// step, which scales it) and of its second-moment ones (moving average and square root). A
/// stretch of state with subnormals computes the moment that has them with
/// `Real::SubnormalSafe` (the same bits without the float32 assists, see `subnormal`); the
/// param's and grad's own products are computed natively.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MomentArith<M, V> {
    pub(crate) first: M,
    pub(crate) second: V,
}

/// Both moments computed with the type's own instructions.
pub(crate) const NATIVE: MomentArith<Native, Native> = MomentArith { first: Native, second: Native };

/// The constants of one tensor's update, rounded from `f64` to the maths type as torch rounds a
/// Python float passed to a tensor op.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamScalars<T> {
    pub(crate) grad: GradFactor<T>,
    pub(crate) param_scale: T,
    pub(crate) weight_decay: T,
    pub(crate) lerp_weight: T,
    pub(crate) beta2: T,
    pub(crate) one_minus_beta2: T,
    pub(crate) bias_correction2_sqrt: Reciprocal<T>,
    pub(crate) eps: T,
    pub(crate) neg_step_size: T,
}

impl<T: Real> AdamScalars<T> {
    /// The scalars of each step count in turn, computed once for a run of tensors with the same
    /// count (a group's tensors usually all have it: the three `powf`s take about as long as the
    /// update of a few hundred elements).
    ///
    /// `folded`: the second moment's bias correction folded into the step size and eps, as
    /// bitsandbytes' 8-bit Adam has it: `p - (lr * c / bc1) * m / (sqrt(v) + eps * c)`,
    /// `c = sqrt(bc2)`, which is torch's `p - (lr / bc1) * m / (sqrt(v) / c + eps)` in exact
    /// arithmetic with one division fewer per element (the divisions and the square root are
    /// the dearest operations of the loop). Such scalars update params with
    /// `folded_param_update`; `c * eps` and `c * step_size` are rounded once, from f64.
    pub(crate) fn per_step(h: &AdamHyper, folded: bool) -> impl FnMut(f64) -> Self + '_ {
        let mut last: Option<(u64, Self)> = None;
        move |step| match last {
            Some((bits, k)) if bits == step.to_bits() => k,
            _ => {
                let k = Self::with_correction(h, step, folded);
                last = Some((step.to_bits(), k));
                k
            }
        }
    }

    fn with_correction(h: &AdamHyper, step: f64, folded: bool) -> Self {
        let bias_correction1 = 1.0 - h.beta1.powf(step);
        let bias_correction2 = 1.0 - h.beta2.powf(step);
        let decoupled = h.decoupled_weight_decay && h.weight_decay != 0.0;
        let (step_size, decay_scale) = if h.lr_in_f32 {
            let (lr, wd) = (h.lr as f32, h.weight_decay as f32);
            ((lr / bias_correction1 as f32) as f64, (1.0 - lr * wd) as f64)
        } else {
            (h.lr / bias_correction1, 1.0 - h.lr * h.weight_decay)
        };
        let bias_correction2_sqrt = bias_correction2.powf(0.5);
        let (divisor, eps, step_size) = if folded {
            (1.0, h.eps * bias_correction2_sqrt, step_size * bias_correction2_sqrt)
        } else {
            (bias_correction2_sqrt, h.eps, step_size)
        };
        Self {
            grad: GradFactor::new(h.maximize, h.grad_scale),
            param_scale: T::round_from(if decoupled { decay_scale } else { 1.0 }),
            weight_decay: T::round_from(h.weight_decay),
            lerp_weight: T::round_from(1.0 - h.beta1),
            beta2: T::round_from(h.beta2),
            one_minus_beta2: T::round_from(1.0 - h.beta2),
            bias_correction2_sqrt: Reciprocal::of(T::round_from(divisor)),
            eps: T::round_from(eps),
            neg_step_size: T::round_from(-step_size),
        }
    }

    /// The first half of one element's update: the param after decoupled decay, and the new
    /// moments from the grad (multiplied by the grad factor, plus L2 decay with `L2`).
    #[inline(always)]
    pub(crate) fn moments<const L2: bool, M: Arith<T>, V: Arith<T>>(
        &self,
        arith: MomentArith<M, V>,
        p: T,
        g: T,
        m: T,
        v: T,
    ) -> (T, T, T) {
        // Decoupled decay first (`param.mul_`); with none the scale is 1, which is exact.
        let p = p * self.param_scale;
        let mut g = g * self.grad.in_place();
        if L2 {
            g = torch_add(Native, g, p, self.weight_decay);
        }
        let m = lerp(arith.first, m, g, self.lerp_weight);
        // `exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)`
        let second = arith.second;
        let v = torch_addcmul(second, second.mul(v, self.beta2), g, g, self.one_minus_beta2);
        (p, m, v)
    }

    /// The second half: the new param from the new first moment and the second moment the
    /// denominator uses (the running maximum with amsgrad).
    #[inline(always)]
    pub(crate) fn param_update<M: Arith<T>, V: Arith<T>>(
        &self,
        arith: MomentArith<M, V>,
        p: T,
        m: T,
        second_moment: T,
    ) -> T {
        // eps is added after the sqrt and the bias correction, as torch does.
        let denominator = self.bias_correction2_sqrt.divide(arith.second.sqrt(second_moment)) + self.eps;
        torch_addcdiv(arith.first, p, m, denominator, self.neg_step_size)
    }

    /// `param_update` for folded scalars (`per_step`): the bias correction is in eps and the step
    /// size, and the second moment is not divided by it.
    #[inline(always)]
    pub(crate) fn folded_param_update(&self, p: T, m: T, second_moment: T) -> T {
        debug_assert!(self.bias_correction2_sqrt.divisor == T::one(), "folded scalars");
        torch_addcdiv(Native, p, m, second_moment.sqrt() + self.eps, self.neg_step_size)
    }

    /// What the grads are multiplied by as `load_grad_block` loads them.
    pub(crate) fn grad_scale(&self) -> T {
        self.grad.scale
    }

    /// The scalars for a block of grads that `load_grad_block` has scaled already.
    pub(crate) fn for_block(self) -> Self {
        Self { grad: self.grad.for_block(), ..self }
    }
}

pub(crate) struct AdamJob<'a, P: Element, S: Element<Math = P::Math>> {
    pub param: ParamOut<'a, P>,
    pub grad: &'a [P],
    pub exp_avg: &'a mut [S],
    pub exp_avg_sq: &'a mut [S],
    pub max_exp_avg_sq: Option<&'a mut [S]>,
    pub k: AdamScalars<P::Math>,
}

impl<P: Element, S: Element<Math = P::Math>> Splittable for AdamJob<'_, P, S> {
    fn len(&self) -> usize {
        self.param.len()
    }

    fn split_at(self, mid: usize) -> (Self, Self) {
        let (p0, p1) = self.param.split_at(mid);
        let (g0, g1) = self.grad.split_at(mid);
        let (m0, m1) = self.exp_avg.split_at_mut(mid);
        let (v0, v1) = self.exp_avg_sq.split_at_mut(mid);
        let (x0, x1) = split_opt(self.max_exp_avg_sq, mid);
        let k = self.k;
        (
            Self { param: p0, grad: g0, exp_avg: m0, exp_avg_sq: v0, max_exp_avg_sq: x0, k },
            Self { param: p1, grad: g1, exp_avg: m1, exp_avg_sq: v1, max_exp_avg_sq: x1, k },
        )
    }
}

/// The update loop, specialised on the flags that change its shape.
pub(crate) struct AdamKernel<'a, P: Element, S: Element<Math = P::Math>, const AMSGRAD: bool, const L2: bool>(
    pub AdamJob<'a, P, S>,
);

impl<P: Element, S: Element<Math = P::Math>, const AMSGRAD: bool, const L2: bool> Kernel
    for AdamKernel<'_, P, S, AMSGRAD, L2>
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

impl<P: Element, S: Element<Math = P::Math>, const AMSGRAD: bool, const L2: bool> AdamKernel<'_, P, S, AMSGRAD, L2> {
    /// The update on the buffers themselves, each value loaded and stored with `load`/`store`.
    /// Stretches of state with subnormals are stepped with `SubnormalSafe` arithmetic (the same
    /// bits, without the float32 assists: see `subnormal`).
    #[inline(always)]
    pub(crate) fn update_in_place(self) {
        let AdamJob { param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, k } = self.0;
        let param = param.param;
        let n = param.len();
        let (grad, m, v) = (&grad[..n], &mut exp_avg[..n], &mut exp_avg_sq[..n]);
        let vmax: &mut [S] = match max_exp_avg_sq {
            Some(x) if AMSGRAD => &mut x[..n],
            _ => &mut [],
        };
        if !P::Math::TESTS_SUBNORMALS {
            return Self::update_range(NATIVE, &k, param, grad, m, v, vmax);
        }
        let safe = <P::Math as Real>::SubnormalSafe::default();
        for r in stretches(n) {
            let vmax = if AMSGRAD { &mut vmax[r.clone()] } else { &mut [] };
            let (param, grad, m, v) = (&mut param[r.clone()], &grad[r.clone()], &mut m[r.clone()], &mut v[r]);
            // (With amsgrad the square root is of the running maximum's.)
            let (first, second) = (starts_subnormal(m), starts_subnormal(v) || (AMSGRAD && starts_subnormal(vmax)));
            counted(first || second);
            match (first, second) {
                (false, false) => Self::update_range(NATIVE, &k, param, grad, m, v, vmax),
                (true, false) => {
                    Self::update_range(MomentArith { first: safe, second: Native }, &k, param, grad, m, v, vmax)
                }
                (false, true) => {
                    Self::update_range(MomentArith { first: Native, second: safe }, &k, param, grad, m, v, vmax)
                }
                (true, true) => {
                    Self::update_range(MomentArith { first: safe, second: safe }, &k, param, grad, m, v, vmax)
                }
            }
        }
    }

    /// The update of one stretch of elements, each moment's operations computed by `arith`'s.
    #[inline(always)]
    fn update_range<M: Arith<P::Math>, V: Arith<P::Math>>(
        arith: MomentArith<M, V>,
        k: &AdamScalars<P::Math>,
        param: &mut [P],
        grad: &[P],
        m: &mut [S],
        v: &mut [S],
        vmax: &mut [S],
    ) {
        let n = param.len();
        let (grad, m, v) = (&grad[..n], &mut m[..n], &mut v[..n]);
        let vmax = if AMSGRAD { &mut vmax[..n] } else { vmax };
        for i in 0..n {
            let (p, m_new, v_new) =
                k.moments::<L2, M, V>(arith, param[i].load(), grad[i].load(), m[i].load(), v[i].load());
            // The state is stored rounded to `S`; this step goes on with the unrounded values.
            m[i] = S::store(m_new);
            v[i] = S::store(v_new);
            let second_moment = if AMSGRAD {
                let x = vmax[i].load().max_propagate_nan(v_new);
                vmax[i] = S::store(x);
                x
            } else {
                v_new
            };
            param[i] = P::store(k.param_update(arith, p, m_new, second_moment));
        }
    }

    /// The same update over blocks converted to the maths type (see `block`): the values the
    /// loop stores unrounded into scratch are rounded once as the block is stored back.
    #[inline(always)]
    fn update_by_blocks<I: Isa>(self, isa: I) {
        let AdamJob { mut param, grad, exp_avg, exp_avg_sq, mut max_exp_avg_sq, k } = self.0;
        let (mut p, mut g, mut m, mut v, mut x) = (scratch(), scratch(), scratch(), scratch(), scratch());
        for (start, end) in blocks(param.len()) {
            let len = end - start;
            load_grad_block(isa, &grad[start..end], &mut g[..len], k.grad_scale());
            let mut vmax = max_exp_avg_sq.as_deref_mut().map(|vmax| &mut vmax[start..end]);
            let block = AdamJob::<P::Math, P::Math> {
                param: ParamOut::new(param.block(isa, start, end, &mut p[..len]), None, None),
                grad: &g[..len],
                exp_avg: state_block(isa, &mut exp_avg[start..end], &mut m[..len]),
                exp_avg_sq: state_block(isa, &mut exp_avg_sq[start..end], &mut v[..len]),
                max_exp_avg_sq: vmax.as_deref_mut().map(|vmax| state_block(isa, vmax, &mut x[..len])),
                k: k.for_block(),
            };
            AdamKernel::<P::Math, P::Math, AMSGRAD, L2>(block).update_in_place();
            param.unblock(isa, start, end, &p[..len]);
            state_unblock(isa, &m[..len], &mut exp_avg[start..end]);
            state_unblock(isa, &v[..len], &mut exp_avg_sq[start..end]);
            if let Some(vmax) = vmax {
                state_unblock(isa, &x[..len], vmax);
            }
        }
    }
}

fn check<P: Element, S: Element<Math = P::Math>>(tensors: &[AdamTensor<'_, P, S>], h: &AdamHyper) -> Result<(), Error> {
    for (i, t) in tensors.iter().enumerate() {
        let n = t.param.len();
        check_len(i, "grad", n, t.grad.len())?;
        check_len(i, "exp_avg", n, t.exp_avg.len())?;
        check_len(i, "exp_avg_sq", n, t.exp_avg_sq.len())?;
        if let Some(master) = &t.master_param {
            check_len(i, "master_param", n, master.len())?;
        }
        match (&t.max_exp_avg_sq, h.amsgrad) {
            (Some(x), true) => check_len(i, "max_exp_avg_sq", n, x.len())?,
            (None, false) => {}
            _ => return Err(Error::MissingBuffer { tensor: i, buffer: "max_exp_avg_sq (exactly when amsgrad)" }),
        }
    }
    Ok(())
}

/// One Adam/AdamW step over every tensor of a param group: increments each tensor's step count
/// and updates its param and state in place. Checks every length before it writes anything.
pub fn adam_step<P: Element, S: Element<Math = P::Math>>(
    tensors: Vec<AdamTensor<'_, P, S>>,
    hyper: &AdamHyper,
    exec: &Executor,
) -> Result<(), Error> {
    check(&tensors, hyper)?;
    let mut scalars = AdamScalars::per_step(hyper, false);
    let jobs: Vec<AdamJob<'_, P, S>> = tensors
        .into_iter()
        .map(|mut t| {
            let step = t.step.increment();
            AdamJob {
                k: scalars(step),
                param: ParamOut::new(t.param, t.master_param, t.rounding.key(step)),
                grad: t.grad,
                exp_avg: t.exp_avg,
                exp_avg_sq: t.exp_avg_sq,
                max_exp_avg_sq: t.max_exp_avg_sq,
            }
        })
        .collect();
    let l2 = hyper.weight_decay != 0.0 && !hyper.decoupled_weight_decay;
    let simd = exec.simd();
    exec.for_each_piece(jobs, |job| match (hyper.amsgrad, l2) {
        (false, false) => dispatch(simd, AdamKernel::<P, S, false, false>(job)),
        (false, true) => dispatch(simd, AdamKernel::<P, S, false, true>(job)),
        (true, false) => dispatch(simd, AdamKernel::<P, S, true, false>(job)),
        (true, true) => dispatch(simd, AdamKernel::<P, S, true, true>(job)),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_per_step_are_each_steps_own_as_the_counts_repeat_and_change() {
        let h = AdamHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            amsgrad: false,
            maximize: false,
            decoupled_weight_decay: true,
            lr_in_f32: false,
            grad_scale: 1.0,
        };
        for folded in [false, true] {
            let mut scalars = AdamScalars::<f32>::per_step(&h, folded);
            for step in [1.0, 1.0, 2.0, 2.0, 1.0, 3.0, 1e6, 1e6, 2.0] {
                let want = AdamScalars::<f32>::with_correction(&h, step, folded);
                assert_eq!(format!("{:?}", scalars(step)), format!("{want:?}"), "step {step}, folded {folded}");
            }
        }
    }
}
