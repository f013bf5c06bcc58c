"""Parity of rsoptim.SGD/Adam/AdamW/RMSprop with torch.optim's for-loop implementation.

Three parts:

* torch's own configurations (``optim_db``), run through a copy of torch's comparison harness
  (``_compare_between`` in torch's test_optim.py: a small MLP for 7 iterations, no backward at
  i == 2, a layer frozen at i == 3..4);
* our own configurations: every flag combination, Tensor lr, several param groups, odd sizes
  around the SIMD widths and the kernels' chunk boundary, 0-dim, empty and complex params,
  params that skip steps, NaN/inf grads, hyperparameters rewritten by LR schedulers;
* sensitivity: the comparator used everywhere here does flag a wrong formula (eps inside the
  sqrt, bias correction one step off, coupled instead of decoupled weight decay, ...) under the
  hyperparameters of a parity configuration, so these tests can fail.

``differentiable=True`` groups are stepped by torch's own implementation (autograd through the
step); that is tested at the end.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch

from conftest import (
    OPTIMIZERS,
    assert_optimizers_match,
    assert_tensor_match,
    ieee_sqrt,
    run_side_by_side,
    seeded_grads,
    tensor_sizes,
)

DTYPES = [torch.float64, torch.float32]

# -------------------------------------------------------------------------------------------
# torch's own configurations, through torch's own harness
# -------------------------------------------------------------------------------------------

try:
    from torch.testing._internal.common_optimizers import optim_db

    OPTIM_DB_ERROR: Exception | None = None
except ImportError as e:  # common_utils imports expecttest, a test-only dependency of torch
    optim_db = []
    OPTIM_DB_ERROR = e

_TORCH_TO_NAME = {torch_cls: name for name, (torch_cls, _) in OPTIMIZERS.items()}


def _optim_db_cases() -> list[Any]:
    cases = []
    seen: set[tuple[str, str, str]] = set()
    for info in optim_db:
        name = _TORCH_TO_NAME.get(info.optim_cls)
        if name is None:
            continue
        for dtype in DTYPES:
            # The CUDA configurations add Tensor lr / Tensor betas, all with capturable=True,
            # which torch refuses for CPU params; without capturable they are valid CPU
            # configurations, so they run too (as torch would run them on CPU).
            for config_device in ("cpu", "cuda"):
                for oi in info.optim_inputs_func(device=config_device, dtype=dtype):
                    kwargs = dict(oi.kwargs)
                    desc = oi.desc
                    if config_device == "cuda":
                        if not kwargs.pop("capturable", False):
                            continue  # identical to a CPU configuration
                        desc = f"{desc} (cuda config, capturable dropped)"
                    key = (name, str(dtype), repr(sorted((k, repr(v)) for k, v in kwargs.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    cases.append(
                        pytest.param(name, dtype, kwargs, id=f"{name}-{str(dtype)[6:]}-{desc.replace(' ', '_')}")
                    )
    return cases


OPTIM_DB_CASES = _optim_db_cases()


def test_optim_db_is_available():
    """torch's configurations are importable (they need the ``expecttest`` package)."""
    assert OPTIM_DB_ERROR is None, f"cannot import torch's optim_db (pip install expecttest): {OPTIM_DB_ERROR}"
    names = {case.values[0] for case in OPTIM_DB_CASES}
    assert names == set(OPTIMIZERS), f"optim_db has configurations for {sorted(names)} only"
    assert len(OPTIM_DB_CASES) >= 50


def _torch_harness(name: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> None:
    """torch's ``_compare_between``, with torch's for-loop and rsoptim as the two optimizers."""
    torch_cls, our_cls = OPTIMIZERS[name]
    inputs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    models, optimizers, initial = [], [], []
    for cls, extra in ((torch_cls, {"foreach": False}), (our_cls, {})):
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
        ).to(dtype=dtype)
        # torch's harness adds a 0-dim `torch.empty` param with a random grad; a defined value here.
        zero_dim = torch.full((), 0.3, dtype=dtype, requires_grad=True)
        zero_dim.grad = torch.full((), 0.7, dtype=dtype)
        params = list(model.parameters()) + [zero_dim]
        initial = [p.detach().clone() for p in params]
        optimizers.append(cls(params, **copy.deepcopy(kwargs), **extra))
        models.append(model)
    ref, ours = optimizers
    for i in range(7):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)  # frozen: these params get no grad, fall behind
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:  # no backward: every grad is None, step is a no-op
                model(inputs).sum().backward()
            optimizer.step()
        assert_optimizers_match(ours, ref, grads_exact=False, where=f"iteration {i}")
    # The run did something: every model param moved. (The 0-dim param loses its grad to the
    # first zero_grad, as in torch's harness, so it is never stepped and gets no state.)
    params = ref.param_groups[0]["params"]
    for p, p0 in zip(params[:-1], initial[:-1]):
        assert not torch.equal(p.detach(), p0)
    assert len(ref.state.get(params[-1], {})) == 0 and len(ours.state.get(params[-1], {})) == 0
    if name != "SGD":
        steps = [ref.state[p]["step"].item() for p in params[:-1]]
        assert steps == [6, 6, 4, 4], steps  # the frozen layer fell behind


@pytest.mark.parametrize("name, dtype, kwargs", OPTIM_DB_CASES)
def test_torch_optim_db_configs(name, dtype, kwargs):
    _torch_harness(name, dtype, kwargs)


# (amsgrad and centered RMSprop fail in torch itself under differentiable=True: in-place state.)
DIFFERENTIABLE_EXTRA = {"SGD": dict(momentum=0.9), "Adam": dict(weight_decay=0.1), "AdamW": {}, "RMSprop": dict(alpha=0.9)}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_differentiable_true_is_torchs_step_with_autograd_through_it(name):
    """differentiable=True: torch's implementation steps the group with autograd on, so the
    updated params and the gradients through the steps are torch.optim's."""
    torch_cls, our_cls = OPTIMIZERS[name]
    results = []
    for cls in (torch_cls, our_cls):
        leaf = torch.linspace(-1, 1, 10, dtype=torch.float64, requires_grad=True)
        g = torch.linspace(1, -1, 10, dtype=torch.float64).add(0.05).requires_grad_()
        p = leaf * 1.5  # not a leaf: a differentiable optimizer may step it
        opt = cls([p], lr=0.1, differentiable=True, **DIFFERENTIABLE_EXTRA[name])
        for i in range(3):
            p.grad = g * (i + 1)  # a grad with a history: the step is differentiated through
            opt.step()
        grads = torch.autograd.grad((p**2).sum(), (leaf, g))
        results.append((p.detach(), *grads))
    (want_p, *want_grads), (got_p, *got_grads) = results
    assert torch.equal(got_p, want_p)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    assert got_grads[1].abs().sum() > 0, "the gradient reached the grads through the steps"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_differentiable_true_refuses_the_half_precision_extensions(name):
    _, our_cls = OPTIMIZERS[name]
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    for extra in (dict(master_weights=True), dict(stochastic_rounding=True), dict(state_dtype=torch.float32)):
        with pytest.raises(ValueError, match="differentiable"):
            our_cls([p], lr=0.1, differentiable=True, **extra)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_fused_true_refuses_params_torchs_fused_kernels_cannot_step(name):
    """torch checks the device and dtype of fused params when it steps them: so does rsoptim."""
    outcomes = []
    for cls in OPTIMIZERS[name]:
        p = torch.zeros(3, device="meta", requires_grad=True)
        p.grad = torch.zeros_like(p)
        opt = cls([p], lr=0.1, fused=True)
        with pytest.raises(RuntimeError) as err:
            opt.step()
        outcomes.append(str(err.value))
    assert outcomes[0] == outcomes[1]


# -------------------------------------------------------------------------------------------
# our own configurations
# -------------------------------------------------------------------------------------------

#: The shapes of the small mixed set: 0-dim, empty, sizes around SIMD widths, 2-D and 3-D.
SMALL_SHAPES = [(), (0,), (1,), (7,), (8,), (9,), (17,), (33,), (4, 5), (2, 3, 4)]


def _none_at(step: int, index: int) -> bool:
    """Which params get no grad: param 3 never (so no state), param 1 not on the first two
    steps (it starts late, its step count lags), param 5 not on step 2 (it skips one)."""
    return index == 3 or (index == 1 and step < 2) or (index == 5 and step == 2)


def small_params(dtype: torch.dtype, seed: int = 7):
    def build():
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in SMALL_SHAPES]

    return build


def _sgd_configs():
    out = []
    for momentum, dampening, nesterov, wd, maximize in itertools.product(
        (0.0, 0.9), (0.0, 0.5), (False, True), (0.0, 0.1), (False, True)
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue  # torch refuses these
        out.append(
            dict(lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd, maximize=maximize)
        )
    return out


def _adam_configs():
    out = []
    for amsgrad, maximize, wd, decoupled in itertools.product((False, True), (False, True), (0.0, 0.1), (False, True)):
        out.append(
            dict(
                lr=0.05,
                betas=(0.8, 0.95),
                eps=1e-6,
                weight_decay=wd,
                amsgrad=amsgrad,
                maximize=maximize,
                decoupled_weight_decay=decoupled,
            )
        )
    return out


def _adamw_configs():
    return [
        dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
        for amsgrad, maximize, wd in itertools.product((False, True), (False, True), (0.0, 0.1))
    ]


def _rmsprop_configs():
    return [
        dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=wd, momentum=momentum, centered=centered, maximize=maximize)
        for centered, momentum, wd, maximize in itertools.product((False, True), (0.0, 0.5), (0.0, 0.1), (False, True))
    ]


def _config_id(kwargs: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("lr", "betas", "eps", "alpha"))


FLAG_CASES = [
    pytest.param(name, kw, id=f"{name}-{_config_id(kw)}")
    for name, configs in (
        ("SGD", _sgd_configs()),
        ("Adam", _adam_configs()),
        ("AdamW", _adamw_configs()),
        ("RMSprop", _rmsprop_configs()),
    )
    for kw in configs
]


def test_flag_cases_cover_every_combination():
    assert len(FLAG_CASES) == 20 + 16 + 8 + 16


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name, kwargs", FLAG_CASES)
def test_flag_combinations(name, kwargs, dtype):
    torch_cls, our_cls = OPTIMIZERS[name]
    run_side_by_side(torch_cls, our_cls, small_params(dtype), kwargs, steps=5, grads=seeded_grads(1, none_at=_none_at))


#: One configuration per optimizer with every option on (and a Tensor lr variant).
ALL_ON = {
    "SGD": dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.1, maximize=True),
    "Adam": dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
    "AdamW": dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
    "RMSprop": dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.5, centered=True, maximize=True),
}
ALL_OFF = {
    "SGD": dict(lr=0.05),
    "Adam": dict(lr=0.05),
    "AdamW": dict(lr=0.05, weight_decay=0.0),
    "RMSprop": dict(lr=0.01),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("flags", ["all_on", "all_off"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tensor_lr(name, flags, dtype):
    """A Tensor lr, updated in place between steps as LR schedulers do (``fill_``)."""
    torch_cls, our_cls = OPTIMIZERS[name]
    kwargs = dict((ALL_ON if flags == "all_on" else ALL_OFF)[name])
    kwargs["lr"] = torch.tensor(kwargs["lr"])

    def rewrite(step, ours, ref):
        for opt in (ours, ref):
            opt.param_groups[0]["lr"].fill_(0.02 * (step + 2))

    run_side_by_side(
        torch_cls,
        our_cls,
        small_params(dtype),
        kwargs,
        steps=4,
        grads=seeded_grads(2, none_at=_none_at),
        between_steps=rewrite,
    )


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_schedulers_rewrite_hyperparameters(name):
    """OneCycleLR rewrites lr and betas/momentum in param_groups every step; both read them."""
    torch_cls, our_cls = OPTIMIZERS[name]
    kwargs = dict(ALL_ON[name])
    if name == "SGD":
        kwargs["nesterov"] = False
    schedulers = {}

    def sched(step, ours, ref):
        for opt in (ours, ref):
            if id(opt) not in schedulers:  # made after the first step; it sets lr and momentum
                schedulers[id(opt)] = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
            else:
                schedulers[id(opt)].step()
        g_ours, g_ref = ours.param_groups[0], ref.param_groups[0]
        assert g_ours["lr"] == g_ref["lr"]
        for key in ("betas", "momentum"):
            assert g_ours.get(key) == g_ref.get(key)

    run_side_by_side(
        torch_cls, our_cls, small_params(torch.float64), kwargs, steps=6, grads=seeded_grads(3), between_steps=sched
    )


def _groups_builder(name: str):
    """Three groups with different hyperparameters (and dtypes), each with several params."""

    def build():
        gen = torch.Generator().manual_seed(11)

        def t(*shape, dtype=torch.float64):
            return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

        if name == "SGD":
            hyper = [
                dict(lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.1),
                dict(lr=torch.tensor(0.05), momentum=0.5, dampening=0.3, maximize=True),
                dict(),
            ]
        elif name in ("Adam", "AdamW"):
            hyper = [
                dict(lr=0.1, betas=(0.5, 0.6), amsgrad=True, weight_decay=0.1),
                dict(lr=torch.tensor(0.01), eps=1e-3, maximize=True, weight_decay=0.0),
                dict(),
            ]
        else:
            hyper = [
                dict(lr=0.03, alpha=0.5, centered=True, momentum=0.9, weight_decay=0.1),
                dict(lr=torch.tensor(0.01), eps=1e-3, maximize=True),
                dict(),
            ]
        return [
            dict(params=[t(5), t(3, 4), t(), t(0)], **hyper[0]),
            dict(params=[t(9, dtype=torch.float32), t(17, dtype=torch.float32)], **hyper[1]),
            dict(params=[t(33), t(2, 2, dtype=torch.float32)], **hyper[2]),
        ]

    return build


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_param_groups_with_different_hyperparameters(name):
    torch_cls, our_cls = OPTIMIZERS[name]
    defaults = {"SGD": dict(lr=0.07), "Adam": dict(lr=0.02), "AdamW": dict(lr=0.02), "RMSprop": dict(lr=0.02)}[name]
    run_side_by_side(
        torch_cls,
        our_cls,
        _groups_builder(name),
        defaults,
        steps=5,
        grads=seeded_grads(4, none_at=lambda step, index: index == 4 and step in (1, 2)),
    )


def _sized_params(dtype: torch.dtype):
    def build():
        gen = torch.Generator().manual_seed(5)
        return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in tensor_sizes()]

    return build


def test_sizes_cover_the_chunk_boundaries():
    numels = {math.prod(s) for s in tensor_sizes()}
    assert {0, 1, 7, 8, 9, 17, 33, 65535, 65537} <= numels
    assert max(numels) > 2 * 65536


def _odd_size_cases():
    cases = []
    for name in OPTIMIZERS:
        for flags in ("all_on", "all_off"):
            for dtype, dtype_id in zip(DTYPES, ("float64", "float32")):
                cases.append(pytest.param(name, flags, dtype, id=f"{name}-{flags}-{dtype_id}"))
    return cases


@pytest.mark.parametrize("name, flags, dtype", _odd_size_cases())
def test_many_tensors_of_odd_sizes(name, flags, dtype):
    torch_cls, our_cls = OPTIMIZERS[name]
    kwargs = (ALL_ON if flags == "all_on" else ALL_OFF)[name]
    run_side_by_side(
        torch_cls,
        our_cls,
        _sized_params(dtype),
        kwargs,
        steps=3,
        grads=seeded_grads(6, none_at=lambda step, index: index == 2 and step == 0),
    )


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64], ids=["complex128", "complex64"])
@pytest.mark.parametrize("flags", ["all_on", "all_off"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_complex_params(name, flags, dtype):
    """Complex params (with a real one in the same group): state stays complex."""
    torch_cls, our_cls = OPTIMIZERS[name]
    kwargs = (ALL_ON if flags == "all_on" else ALL_OFF)[name]
    real = torch.float64 if dtype == torch.complex128 else torch.float32

    def build():
        gen = torch.Generator().manual_seed(9)
        out = []
        for shape in [(), (0,), (1,), (7,), (9,), (3, 5), (33,)]:
            z = torch.complex(
                torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64)
            )
            out.append(z.to(dtype).requires_grad_())
        out.append(torch.randn(6, generator=gen, dtype=torch.float64).to(real).requires_grad_())
        return out

    ours, _ = run_side_by_side(
        torch_cls, our_cls, build, kwargs, steps=4, grads=seeded_grads(8, none_at=lambda s, i: i == 3 and s == 1)
    )
    for p in ours.param_groups[0]["params"]:
        for key, value in ours.state[p].items():
            if key != "step":
                assert value.dtype == p.dtype, (key, value.dtype, p.dtype)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_params_without_grads_get_no_state_and_lag(name):
    torch_cls, our_cls = OPTIMIZERS[name]
    kwargs = ALL_ON[name]
    ours, ref = run_side_by_side(
        torch_cls, our_cls, small_params(torch.float64), kwargs, steps=5, grads=seeded_grads(10, none_at=_none_at)
    )
    params = ours.param_groups[0]["params"]
    assert len(ours.state.get(params[3], {})) == 0  # never had a grad: no state at all
    assert 3 not in ours.state_dict()["state"]
    if name != "SGD":
        steps = [ours.state[p]["step"].item() if p in ours.state and ours.state[p] else None for p in params]
        assert steps == [5, 3, 5, None, 5, 4, 5, 5, 5, 5], steps


@pytest.mark.parametrize(
    "name, kwargs",
    [
        pytest.param("Adam", dict(lr=1e-3, weight_decay=0.1)),
        pytest.param("RMSprop", dict(lr=1e-2, weight_decay=0.1)),
        pytest.param("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    ],
)
def test_weight_decay_rounds_like_torch(name, kwargs):
    """grad = -fl32(0.1 * p): torch's fused ``grad + 0.1 * p`` is the rounding residual
    (~1e-9, nonzero), an unfused one would be exactly 0, and Adam/RMSprop normalise that
    residual into a full-size update (Adam's first step moves by lr * r / (|r| + eps) ~ 1e-4
    vs 0). So this fails unless weight decay is a fused multiply-add, as in torch."""
    torch_cls, our_cls = OPTIMIZERS[name]

    def build():
        gen = torch.Generator().manual_seed(30)
        return [(torch.rand(1000, generator=gen) + 0.5).requires_grad_()]

    def grads(step, index, p):
        return -(p.detach() * torch.tensor(0.1, dtype=torch.float32))

    run_side_by_side(torch_cls, our_cls, build, kwargs, steps=2, grads=grads)


# -------------------------------------------------------------------------------------------
# Subnormal state: units that stopped learning
# -------------------------------------------------------------------------------------------


#: The state keys of a dead unit's stuck values: the smallest subnormals (first moments and
#: momentum buffers, which a decay of 0.9 rounds back to themselves), or the smallest 100 (the
#: averages of squares, which a decay of 0.99 or 0.999 keeps).
_STUCK_FIRST = ("exp_avg", "momentum_buffer", "grad_avg")
_STUCK_SECOND = ("exp_avg_sq", "max_exp_avg_sq", "square_avg")


def _step_dead_rows(name: str, dtype: torch.dtype, kwargs: dict[str, Any], ref_kwargs: dict[str, Any]) -> None:
    """Rows of weights whose grads are zero (dead ReLU units) with the state such units end
    with (``_STUCK_FIRST``, ``_STUCK_SECOND``), stepped by torch (``ref_kwargs``) and rsoptim:
    the same bits after every step. The kernels step stretches of state that start with
    subnormals in float64 arithmetic (rust/core/src/subnormal.rs). Rows of subnormal state
    longer and shorter than a stretch (256 elements), at various offsets."""
    torch_cls, our_cls = OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(40)
    shape = (48, 333)
    start = torch.randn(shape, generator=gen).to(dtype)
    dead = torch.rand(shape[0], generator=gen) < 0.5
    # (bfloat16's subnormals are float32's with 7 mantissa bits: multiples of 2^-133.)
    unit = 2.0**-149 if dtype == torch.float32 else 2.0**-133
    sign = torch.randn(shape, generator=gen).sign().to(dtype)
    first = (torch.randint(1, 5, shape, generator=gen) * unit).to(dtype) * sign
    second = (torch.randint(1, 100, shape, generator=gen) * unit).to(dtype)
    opts, params = [], []
    for cls, extra in ((torch_cls, ref_kwargs), (our_cls, {})):
        p = start.clone().requires_grad_()
        opt = cls([p], **kwargs, **extra)
        p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(41)).to(dtype)
        with ieee_sqrt():
            opt.step()  # makes the state, then the dead rows' is set as training would leave it
        state = opt.state[p]
        for keys, values in ((_STUCK_FIRST, first), (_STUCK_SECOND, second)):
            for key in keys:
                if key in state:
                    state[key][dead] = values[dead]
        opts.append(opt)
        params.append(p)
    stuck = [key for key in (*_STUCK_FIRST, *_STUCK_SECOND) if key in opts[1].state[params[1]]]
    assert stuck, "the case has state to get stuck"
    for step in range(4):
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(42 + step)).to(dtype)
        grad[dead] = 0
        for p, opt in zip(params, opts):
            p.grad = grad.clone()
            with ieee_sqrt():  # (torch's float32 sqrt is not correctly rounded; its fused kernels' is)
                opt.step()
        assert_optimizers_match(opts[1], opts[0], exact=True, where=f"step {step + 2}")
    tiny = torch.finfo(torch.float32).tiny
    for key in stuck:
        state = opts[1].state[params[1]][key][dead].float().abs()
        assert ((state > 0) & (state < tiny)).any(), f"{key} stayed subnormal"


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_subnormal_state_of_dead_units(name, dtype, amsgrad):
    # (Adam's L2 decay would give the dead rows grads, and their moments would leave the
    # subnormals; AdamW's decay is the param's own.) torch's fused kernel is the reference: it
    # computes bfloat16 params in float32, as rsoptim does (the for-loop rounds every op to
    # bfloat16).
    weight_decay = 1e-2 if name == "AdamW" else 0.0
    _step_dead_rows(name, dtype, dict(lr=1e-3, weight_decay=weight_decay, amsgrad=amsgrad), {"fused": True})


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("SGD", dict(lr=1e-2, momentum=0.9)),
        ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True)),
        ("RMSprop", dict(lr=1e-3)),
        ("RMSprop", dict(lr=1e-3, momentum=0.9, centered=True)),
    ],
    ids=["SGD-momentum", "SGD-nesterov", "RMSprop", "RMSprop-centered-momentum"],
)
def test_subnormal_state_of_dead_units_sgd_rmsprop(name, kwargs):
    # float32 only: torch has no fused RMSprop, and its for-loop rounds bfloat16 per op.
    _step_dead_rows(name, torch.float32, kwargs, {"foreach": False})


# -------------------------------------------------------------------------------------------
# NaN and inf grads
# -------------------------------------------------------------------------------------------


def _nonfinite_grads(seed: int):
    base = seeded_grads(seed)

    def make(step, index, p):
        g = base(step, index, p)
        flat = g.view(-1) if g.is_contiguous() else g.reshape(-1)
        if step == 1 and flat.numel() >= 3:
            flat[0] = float("nan")
            flat[1] = float("inf")
            flat[2] = float("-inf")
        if step == 3 and flat.numel() >= 5:
            flat[4] = float("nan")
        return g

    return make


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("flags", ["all_on", "all_off"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_nonfinite_grads(name, flags, dtype):
    torch_cls, our_cls = OPTIMIZERS[name]
    kwargs = (ALL_ON if flags == "all_on" else ALL_OFF)[name]
    _, ref = run_side_by_side(
        torch_cls, our_cls, small_params(dtype), kwargs, steps=5, grads=_nonfinite_grads(12), equal_nan=True
    )
    # The run did produce non-finite params, so the comparison covered them.
    assert any(not torch.isfinite(p).all() for p in ref.param_groups[0]["params"])


@pytest.mark.parametrize("name, kwargs", [c for c in FLAG_CASES if "amsgrad=True" in c.id or "centered=True" in c.id])
def test_nonfinite_grads_flag_combinations(name, kwargs):
    """The flags whose maths may treat NaN differently (max for amsgrad, sq - ga^2 for centered)."""
    torch_cls, our_cls = OPTIMIZERS[name]
    run_side_by_side(
        torch_cls, our_cls, small_params(torch.float32), kwargs, steps=5, grads=_nonfinite_grads(13), equal_nan=True
    )


# -------------------------------------------------------------------------------------------
# sensitivity: the comparator flags a wrong formula
# -------------------------------------------------------------------------------------------

#: Parity configurations whose hyperparameters make formula slips large: a large eps against
#: small grads, weight decay against small grads. They are run for parity first.
SENSITIVE = {
    "Adam": dict(lr=0.01, betas=(0.9, 0.999), eps=1e-3, weight_decay=0.1),
    "AdamW": dict(lr=0.01, betas=(0.9, 0.999), eps=1e-3, weight_decay=0.1),
    "RMSprop": dict(lr=0.01, alpha=0.99, eps=1e-3, weight_decay=0.0),
    "SGD": dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.0),
    "SGD-nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
}
SENSITIVE_GRAD_SCALE = {"Adam": 1e-3, "AdamW": 1e-3, "RMSprop": 1e-3, "SGD": 1.0, "SGD-nesterov": 1.0}
SENSITIVE_STEPS = 4


def _sensitive_start():
    gen = torch.Generator().manual_seed(21)
    return torch.randn(64, generator=gen, dtype=torch.float64)


def _sensitive_grads(key: str):
    return seeded_grads(22, scale=SENSITIVE_GRAD_SCALE[key])


def _reference(key: str, variant: str, kwargs: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    """The updates written out in NumPy float64: params and state after each step."""
    p = _sensitive_start().numpy().copy()
    grads = _sensitive_grads(key)
    out = []
    if key in ("Adam", "AdamW"):
        b1, b2 = kwargs["betas"]
        lr, eps, wd = kwargs["lr"], kwargs["eps"], kwargs["weight_decay"]
        decoupled = key == "AdamW"
        if variant == "coupled_decay":
            decoupled = False
        m = np.zeros_like(p)
        v = np.zeros_like(p)
        for step in range(1, SENSITIVE_STEPS + 1):
            g = grads(step - 1, 0, torch.from_numpy(p)).numpy()
            if wd:
                if decoupled:
                    p = p * (1 - lr * wd)
                else:
                    g = g + wd * p
            m = m + (1 - b1) * (g - m)
            v = v * b2 + (1 - b2) * g * g
            t = step + 1 if variant == "bias_off_by_one" else step
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            if variant == "eps_inside_sqrt":
                denom = np.sqrt(v / bc2 + eps)
            else:
                denom = np.sqrt(v) / math.sqrt(bc2) + eps
            p = p - (lr / bc1) * m / denom
            out.append({"param": p.copy(), "exp_avg": m.copy(), "exp_avg_sq": v.copy()})
    elif key == "RMSprop":
        alpha, lr, eps = kwargs["alpha"], kwargs["lr"], kwargs["eps"]
        sq = np.zeros_like(p)
        for step in range(1, SENSITIVE_STEPS + 1):
            g = grads(step - 1, 0, torch.from_numpy(p)).numpy()
            sq = sq * alpha + (1 - alpha) * g * g
            avg = np.sqrt(sq + eps) if variant == "eps_inside_sqrt" else np.sqrt(sq) + eps
            p = p - lr * g / avg
            out.append({"param": p.copy(), "square_avg": sq.copy()})
    else:
        lr, mu = kwargs["lr"], kwargs["momentum"]
        damp = kwargs.get("dampening", 0.0)
        nesterov = kwargs.get("nesterov", False)
        buf = None
        for step in range(1, SENSITIVE_STEPS + 1):
            g = grads(step - 1, 0, torch.from_numpy(p)).numpy()
            if buf is None:
                buf = (1 - damp) * g if variant == "dampening_on_first_step" else g.copy()
            else:
                buf = buf * mu + (1 - damp) * g
            if nesterov and variant != "nesterov_ignored":
                d = g + mu * buf
            else:
                d = buf
            p = p - lr * d
            out.append({"param": p.copy(), "momentum_buffer": buf.copy()})
    return out


SENSITIVITY_CASES = [
    ("Adam", "eps_inside_sqrt"),
    ("Adam", "bias_off_by_one"),
    ("AdamW", "eps_inside_sqrt"),
    ("AdamW", "bias_off_by_one"),
    ("AdamW", "coupled_decay"),
    ("RMSprop", "eps_inside_sqrt"),
    ("SGD", "dampening_on_first_step"),
    ("SGD-nesterov", "nesterov_ignored"),
]


def _run_sensitive(key: str, dtype: torch.dtype):
    """The parity run of the sensitive configuration (it must pass), returning torch's and
    rsoptim's params and state after every step."""
    name = key.split("-")[0]
    torch_cls, our_cls = OPTIMIZERS[name]
    history: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def record(step, ours, ref):
        snap = []
        for opt in (ours, ref):
            p = opt.param_groups[0]["params"][0]
            snap.append({"param": p.detach().clone(), **{k: v.clone() for k, v in opt.state[p].items()}})
        history.append(tuple(snap))

    run_side_by_side(
        torch_cls,
        our_cls,
        lambda: [_sensitive_start().to(dtype).requires_grad_()],
        SENSITIVE[key],
        steps=SENSITIVE_STEPS,
        grads=_sensitive_grads(key),
        between_steps=record,
    )
    return history


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("key, variant", SENSITIVITY_CASES, ids=[f"{k}-{v}" for k, v in SENSITIVITY_CASES])
def test_comparator_flags_wrong_formula(key, variant, dtype):
    history = _run_sensitive(key, dtype)
    right = _reference(key, "right", SENSITIVE[key])
    wrong = _reference(key, variant, SENSITIVE[key])
    flagged = []
    for step, ((ours, ref), good, bad) in enumerate(zip(history, right, wrong)):
        for k in good:
            good_t = torch.from_numpy(good[k]).to(dtype)
            bad_t = torch.from_numpy(bad[k]).to(dtype)
            # The NumPy reference of the right formula passes the comparator against torch...
            assert_tensor_match(ref[k], good_t, msg=f"step {step + 1} {k}: reference vs torch")
            assert_tensor_match(ours[k], good_t, msg=f"step {step + 1} {k}: reference vs rsoptim")
            # ...and the wrong formula is flagged, against torch and against rsoptim.
            for actual in (ref[k], ours[k]):
                try:
                    assert_tensor_match(actual, bad_t, msg="wrong formula")
                except AssertionError:
                    flagged.append((step, k))
    # The params must be flagged (on every step for the param itself).
    param_flags = {step for step, k in flagged if k == "param"}
    assert param_flags == set(range(SENSITIVE_STEPS)), f"{variant} flagged only at steps {sorted(param_flags)}"


def test_sensitive_configs_are_in_the_parity_set():
    """The sensitive hyperparameters are parity configurations in their own right: they run
    through the same comparator in test_comparator_flags_wrong_formula (``_run_sensitive``) and
    differ from the defaults in the hyperparameter each slip depends on."""
    assert SENSITIVE["Adam"]["eps"] > 1e-4 and SENSITIVE["RMSprop"]["eps"] > 1e-4
    assert SENSITIVE["AdamW"]["weight_decay"] > 0 and SENSITIVE["SGD"]["dampening"] > 0


# -------------------------------------------------------------------------------------------
# edits between steps: the group's params, the params' storage, the state, the grads' layout
# -------------------------------------------------------------------------------------------


def _edit_params(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in [(5,), (3, 4), (7,), (2, 2)]]


def _replace_param_in_list(opt, spare):
    opt.param_groups[0]["params"][1] = spare[1]  # same list object, another tensor in it


def _append_param_to_list(opt, spare):
    opt.param_groups[0]["params"].append(spare[0])


def _new_params_list(opt, spare):
    opt.param_groups[0]["params"] = list(reversed(opt.param_groups[0]["params"]))


def _add_param_group(opt, spare):
    opt.add_param_group({"params": [spare[2], spare[3]], "lr": 0.02})


def _swap_param_data(opt, spare):
    p = opt.param_groups[0]["params"][0]
    p.data = spare[0].detach().clone()


def _param_data_transposed(opt, spare):
    p = opt.param_groups[0]["params"][1]
    p.data = p.data.t().contiguous().t()  # same values, strides (1, 3)


def _replace_state_tensor(opt, spare):
    p = opt.param_groups[0]["params"][0]
    for key in list(opt.state[p]):
        if key != "step":
            opt.state[p][key] = opt.state[p][key] * 0.5


def _clear_state(opt, spare):
    opt.state[opt.param_groups[0]["params"][2]].clear()  # torch makes it anew on the next step


def _load_own_state_dict(opt, spare):
    sd = copy.deepcopy(opt.state_dict())
    for state in sd["state"].values():
        for key in state:
            if key != "step":
                state[key] = state[key] * 2
    opt.load_state_dict(sd)


def _modify_state_in_place(opt, spare):
    for p in opt.param_groups[0]["params"]:
        for key, value in opt.state[p].items():
            value.mul_(0.25) if key != "step" else value.add_(3)


def _swap_state_data(opt, spare):
    for p in opt.param_groups[0]["params"][:2]:
        for key, value in opt.state[p].items():
            if key != "step":
                value.data = value.data * 0.5  # same tensor object, new storage


def _swap_step_data(opt, spare):
    for p in opt.param_groups[0]["params"][:2]:
        if "step" in opt.state[p]:
            opt.state[p]["step"].data = opt.state[p]["step"].data + 10  # same object, new storage


EDITS = {
    "replace_param_in_list": _replace_param_in_list,
    "append_param_to_list": _append_param_to_list,
    "new_params_list": _new_params_list,
    "add_param_group": _add_param_group,
    "swap_param_data": _swap_param_data,
    "param_data_transposed": _param_data_transposed,
    "replace_state_tensor": _replace_state_tensor,
    "clear_state": _clear_state,
    "load_own_state_dict": _load_own_state_dict,
    "modify_state_in_place": _modify_state_in_place,
    "swap_state_data": _swap_state_data,
    "swap_step_data": _swap_step_data,
    "grads_in_place": None,  # zero_grad(set_to_none=False), then grads written into the same tensors
    "grads_transposed": None,  # from the edit on, 2-D grads have transposed strides
    "grad_missing_once": None,  # one param has no grad on the step after the edit
}
EDIT_CONFIGS = {
    "SGD": dict(lr=0.05, momentum=0.9, weight_decay=0.1),
    "Adam": dict(lr=0.05, amsgrad=True, weight_decay=0.1),
    "AdamW": dict(lr=0.05),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True),
}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_edits_between_steps(name, edit):
    """Whatever is changed between two steps (rsoptim may cache what it learnt about a group),
    the next steps are torch's."""
    torch_cls, our_cls = OPTIMIZERS[name]
    sides = []
    for cls, extra in ((torch_cls, {"foreach": False}), (our_cls, {})):
        sides.append((cls(_edit_params(40), **EDIT_CONFIGS[name], **extra), _edit_params(41)))
    (ref, _), (ours, _) = sides
    grads = seeded_grads(42)
    for step in range(6):
        if step == 3:
            for opt, spare in sides:
                if EDITS[edit] is not None:
                    EDITS[edit](opt, spare)
                if edit == "grads_in_place":
                    opt.zero_grad(set_to_none=False)
        for opt, _ in sides:
            params = [p for group in opt.param_groups for p in group["params"]]
            for i, p in enumerate(params):
                g = grads(step, i, p)
                if edit == "grads_transposed" and step >= 3 and g.dim() == 2:
                    g = g.t().contiguous().t()
                if edit == "grad_missing_once" and step == 3 and i == 1:
                    g = None
                if edit == "grads_in_place" and step > 3:
                    p.grad.copy_(g)
                else:
                    p.grad = g
        ref.step()
        ours.step()
        assert_optimizers_match(ours, ref, where=f"{edit}, after step {step + 1}")
