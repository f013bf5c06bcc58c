"""Clipping folded into the step: ``max_grad_norm``/``norm_type``/``error_if_nonfinite``.

A step with ``max_grad_norm`` must leave the params and state bit for bit as rsoptim's
``clip_grad_norm_`` followed by a plain step (NaN compared as equal), leave the grads as they
were, and keep the total norm in ``last_grad_norm``; against torch's ``clip_grad_norm_`` then
torch.optim's step, float32/float64 params agree to torch's default tolerances (the norms are
summed in another order, so the clip factors may differ in the last bit).
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

import rsoptim

OPTIMIZERS = {
    "Adam": dict(lr=1e-2),
    "AdamW": dict(lr=1e-2, amsgrad=True, maximize=True),
    "SGD": dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "RMSprop": dict(lr=1e-3, centered=True, momentum=0.5),
}
SHAPES = [(300,), (17, 5), (1,), (4099,)]
NORM_TYPES = [2.0, float("inf"), 1.0, 3.0]


def bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]


def copies(ps: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in ps]


def grads(ps: list[torch.Tensor], step: int, scale: float = 3.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in ps]


def set_grads(ps: list[torch.Tensor], gs: list[torch.Tensor]) -> None:
    for p, g in zip(ps, gs):
        p.grad = g.clone()


def assert_same_run(fused, fused_params, plain, plain_params) -> None:
    for x, y in zip(fused_params, plain_params):
        bitwise(x.detach(), y.detach())
        for key, value in plain.state[y].items():
            bitwise(fused.state[x][key], value)


def run_both(name, dtype, norm_type, steps=3, max_norm=0.5, grad_scale=3.0, **extra):
    kw = {**OPTIMIZERS[name], **extra}
    base = params(dtype)
    fused_params, plain_params = copies(base), copies(base)
    fused = getattr(rsoptim, name)(fused_params, max_grad_norm=max_norm, norm_type=norm_type, **kw)
    plain = getattr(rsoptim, name)(plain_params, **kw)
    for step in range(steps):
        gs = grads(base, step, grad_scale)
        set_grads(fused_params, gs)
        set_grads(plain_params, gs)
        fused.step()
        total = rsoptim.clip_grad_norm_(plain_params, max_norm, norm_type=norm_type)
        plain.step()
        for p, g in zip(fused_params, gs):
            bitwise(p.grad, g)  # the grads are left as they were
        bitwise(fused.last_grad_norm, total)
    return fused, fused_params, plain, plain_params


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_with_max_grad_norm_is_clip_then_step(name, dtype, norm_type):
    assert_same_run(*run_both(name, dtype, norm_type))


@pytest.mark.parametrize(
    "extra",
    [
        dict(master_weights=True),
        dict(stochastic_rounding=True, stochastic_rounding_seed=3),
        dict(state_dtype=torch.float32),
        dict(master_weights=True, stochastic_rounding=True, stochastic_rounding_seed=4),
    ],
    ids=["master", "stochastic", "fp32-state", "master-stochastic"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_clipping_composes_with_the_half_precision_extensions(name, dtype, extra):
    assert_same_run(*run_both(name, dtype, 2.0, **extra))


def test_clipping_in_a_differentiable_step():
    """torch steps differentiable groups with autograd on: with the clipped grads."""
    base = params(torch.float64)
    leaves = copies(base)
    ours, theirs = [p.clone() for p in leaves], [p.detach().clone() for p in base]
    fused = rsoptim.AdamW(ours, max_grad_norm=0.5, differentiable=True)
    plain = rsoptim.AdamW(theirs, differentiable=True)
    gs = grads(base, 0)
    for p, g in zip(ours, gs):
        p.grad = g.clone()
    set_grads(theirs, gs)
    fused.step()
    rsoptim.clip_grad_norm_(theirs, 0.5)
    with torch.no_grad():
        plain.step()
    for x, y, g in zip(ours, theirs, gs):
        bitwise(x.detach(), y)
        bitwise(x.grad, g)
    assert ours[0].grad_fn is not None  # stepped with autograd
    sum(p.sum() for p in ours).backward()
    assert all(p.grad is not None for p in leaves)


@pytest.mark.parametrize(
    "extra",
    [
        dict(betas=(torch.tensor(0.9), torch.tensor(0.99))),
        dict(master_weights=True, betas=(torch.tensor(0.9), torch.tensor(0.99))),
    ],
    ids=["tensor-betas", "tensor-betas-master"],
)
def test_clipping_on_params_torch_steps(extra):
    """Groups torch's implementation steps (Tensor betas) get the clipped grads too (scaled
    copies; the grads themselves are checked untouched by run_both)."""
    dtype = torch.bfloat16 if extra.get("master_weights") else torch.float32
    assert_same_run(*run_both("Adam", dtype, 2.0, **extra))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_with_max_grad_norm_matches_torch_clip_then_step(name, dtype, norm_type):
    base = params(dtype)
    ours, theirs = copies(base), copies(base)
    opt = getattr(rsoptim, name)(ours, max_grad_norm=0.5, norm_type=norm_type, **OPTIMIZERS[name])
    ref = getattr(torch.optim, name)(theirs, **OPTIMIZERS[name])
    for step in range(4):
        gs = grads(base, step)
        set_grads(ours, gs)
        set_grads(theirs, gs)
        opt.step()
        total = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type=norm_type)
        ref.step()
        torch.testing.assert_close(opt.last_grad_norm, total)
        assert float(total) > 0.5  # clipping was active
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y)


def test_no_clipping_below_the_limit_is_the_plain_step():
    base = params(torch.float32)
    a, b = copies(base), copies(base)
    fused, plain = rsoptim.Adam(a, max_grad_norm=1e6), rsoptim.Adam(b)
    for step in range(2):
        gs = grads(base, step)
        set_grads(a, gs)
        set_grads(b, gs)
        fused.step()
        plain.step()
    assert_same_run(fused, a, plain, b)
    assert float(fused.last_grad_norm) < 1e6


def test_the_norm_covers_every_group():
    base = params(torch.float32)
    a, b = copies(base), copies(base)
    fused = rsoptim.SGD([{"params": a[:2]}, {"params": a[2:], "lr": 0.5}], lr=0.1, max_grad_norm=0.5)
    plain = rsoptim.SGD([{"params": b[:2]}, {"params": b[2:], "lr": 0.5}], lr=0.1)
    gs = grads(base, 0)
    set_grads(a, gs)
    set_grads(b, gs)
    a[1].grad = b[1].grad = None  # a param without a grad counts for nothing
    fused.step()
    total = rsoptim.clip_grad_norm_(b, 0.5)
    plain.step()
    bitwise(fused.last_grad_norm, total)
    assert_same_run(fused, a, plain, b)


def test_error_if_nonfinite_raises_before_anything_is_stepped():
    base = params(torch.float32)
    ps = copies(base)
    opt = rsoptim.Adam(ps, max_grad_norm=1.0, error_if_nonfinite=True)
    gs = grads(base, 0)
    gs[2][0] = float("nan")
    set_grads(ps, gs)
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step()
    for p, q in zip(ps, base):
        bitwise(p.detach(), q.detach())
    assert not opt.state


def test_a_nonfinite_norm_without_the_error_steps_as_clip_then_step():
    base = params(torch.float32)
    a, b = copies(base), copies(base)
    fused, plain = rsoptim.Adam(a, max_grad_norm=1.0), rsoptim.Adam(b)
    gs = grads(base, 0)
    gs[3][7] = float("inf")
    set_grads(a, gs)
    set_grads(b, gs)
    fused.step()
    rsoptim.clip_grad_norm_(b, 1.0)
    plain.step()
    assert_same_run(fused, a, plain, b)
    assert math.isinf(float(fused.last_grad_norm))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(max_grad_norm=0.0), ValueError),
        (dict(max_grad_norm=-1.0), ValueError),
        (dict(max_grad_norm=float("inf")), ValueError),
        (dict(max_grad_norm=float("nan")), ValueError),
        (dict(max_grad_norm="1"), ValueError),
        (dict(max_grad_norm=True), ValueError),
        (dict(max_grad_norm=1.0, norm_type="two"), ValueError),
        (dict(max_grad_norm=1.0, error_if_nonfinite=1), TypeError),
    ],
)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_invalid_clipping_options_raise(name, kwargs, error):
    with pytest.raises(error):
        getattr(rsoptim, name)(params(torch.float32), **kwargs)


def test_options_are_attributes_that_survive_pickle_and_deepcopy_and_stay_out_of_state_dicts():
    ps = params(torch.float32)
    opt = rsoptim.AdamW(ps, max_grad_norm=2.0, norm_type="inf", error_if_nonfinite=True)
    assert (opt.max_grad_norm, opt.norm_type, opt.error_if_nonfinite) == (2.0, float("inf"), True)
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (other.max_grad_norm, other.norm_type, other.error_if_nonfinite) == (2.0, float("inf"), True)
    set_grads(ps, grads(ps, 0))
    opt.step()
    saved = opt.state_dict()
    assert all("max_grad_norm" not in g for g in saved["param_groups"])
    ref = torch.optim.AdamW(copies(ps))
    ref.load_state_dict(saved)
    opt.max_grad_norm = None  # off again
    assert opt.max_grad_norm is None
    with pytest.raises(ValueError):
        opt.max_grad_norm = -3.0
    with pytest.raises(ValueError):
        opt.norm_type = "x"


def test_last_grad_norm_is_none_until_a_clipping_step():
    ps = params(torch.float32)
    assert rsoptim.Adam(ps).last_grad_norm is None
    opt = rsoptim.Adam(ps, max_grad_norm=1.0)
    assert opt.last_grad_norm is None
    opt.step()  # no grads: nothing to measure
    assert opt.last_grad_norm is None
