"""dtypes and devices that rsoptim routes to torch, mixed groups, and the step dtype.

* float16/bfloat16 CPU params are stepped by the Rust kernels with torch's fused CPU numerics
  (state in the param's dtype, maths in float32, each stored value rounded once): Adam/AdamW
  match ``fused=True`` bit for bit; SGD and RMSprop (torch's fused SGD is broken for half
  params, and there is no fused RMSprop) match the float32 step rounded once per stored value.
* A group may mix dtypes: each param gets the same result as in torch (half-precision params:
  as in a group of their own).
* ``state['step']`` is float64 when the default dtype is float64 (torch's ``_get_scalar_dtype``).
* CUDA params (``@pytest.mark.cuda``, skipped without a GPU) get torch's foreach/fused results.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import rsoptim
from conftest import OPTIMIZERS, assert_optimizers_match, assert_tensor_match, run_side_by_side, seeded_grads

NAMES = list(OPTIMIZERS)

ALL_ON = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
    "Adam": dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1, amsgrad=True, maximize=True),
    "AdamW": dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1, amsgrad=True, maximize=True),
    "RMSprop": dict(lr=0.01, alpha=0.9, eps=1e-3, weight_decay=0.1, momentum=0.5, centered=True, maximize=True),
}
ALL_OFF = {
    "SGD": dict(lr=0.05),
    "Adam": dict(lr=0.05, eps=1e-3),
    "AdamW": dict(lr=0.05, eps=1e-3, weight_decay=0.0),
    "RMSprop": dict(lr=0.01, eps=1e-3),
}
KERNELS = {"SGD": "sgd_step", "Adam": "adam_step", "AdamW": "adam_step", "RMSprop": "rmsprop_step"}

SHAPES = [(), (0,), (1,), (7,), (9,), (33,), (4, 5)]


def _params(dtypes, seed=1):
    def build():
        gen = torch.Generator().manual_seed(seed)
        return [
            torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
            for dtype in dtypes
            for shape in SHAPES
        ]

    return build


@pytest.fixture
def count_kernel_calls(monkeypatch):
    """Counts calls of the Rust step functions (still calling them)."""
    calls = {name: 0 for name in set(KERNELS.values())}
    for fn_name in calls:
        real = getattr(rsoptim._rsoptim, fn_name)

        def counted(*args, _real=real, _name=fn_name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(rsoptim._rsoptim, fn_name, counted)
    return calls


# --- float16 / bfloat16 -------------------------------------------------------------------

HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("flags", ["all_on", "all_off"])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_half_precision_adam_is_torch_fused_bit_for_bit(name, flags, dtype, count_kernel_calls):
    torch_cls, our_cls = OPTIMIZERS[name]
    kwargs = (ALL_ON if flags == "all_on" else ALL_OFF)[name]
    _, ref = run_side_by_side(
        torch_cls,
        our_cls,
        _params([dtype]),
        kwargs,
        steps=4,
        grads=seeded_grads(2, none_at=lambda step, index: index == 3 and step == 1),
        ref_kwargs={"fused": True},
        exact=True,
    )
    assert count_kernel_calls[KERNELS[name]] >= 4, "the half-precision params did not reach the kernels"
    moved = [not torch.equal(p, q) for p, q in zip(ref.param_groups[0]["params"], _params([dtype])()) if p.numel()]
    assert all(moved), "the bitwise comparison compared params that did not move"


def _rounded_float32_run(name, kwargs, dtype, steps, grads, state_dtype=None):
    """The reference of the half-precision rule: rsoptim's float32 step (checked against torch's
    float32 for-loop elsewhere) on float32 copies of the half params and state, every param and
    state value rounded to ``dtype`` after each step (so each stored value is rounded once per
    step, the maths is float32); with ``state_dtype=torch.float32`` the state is kept in
    float32, unrounded."""
    params = [p.detach().float().requires_grad_() for p in _params([dtype])()]
    opt = OPTIMIZERS[name][1](params, **kwargs)
    history = []
    for step in range(steps):
        for index, p in enumerate(params):
            g = grads(step, index, p)
            p.grad = None if g is None else g.to(dtype).float()
        opt.step()
        with torch.no_grad():
            for p in params:
                p.copy_(p.to(dtype))
                for key, value in opt.state[p].items():
                    if key != "step":
                        value.copy_(value.to(state_dtype or dtype))
        history.append(
            [(p.detach().to(dtype, copy=True), {k: v.to(state_dtype or dtype, copy=True) for k, v in opt.state[p].items() if k != "step"}) for p in params]
        )
    return history


def _check_against_rounded_float32_run(name, flags, dtype, state_dtype=None):
    """rsoptim's half-precision steps against ``_rounded_float32_run``, bit for bit."""
    kwargs = (ALL_ON if flags == "all_on" else ALL_OFF)[name]
    grads = seeded_grads(2, none_at=lambda step, index: index == 3 and step == 1)
    expected = _rounded_float32_run(name, kwargs, dtype, 4, grads, state_dtype=state_dtype)
    params = _params([dtype])()
    opt = OPTIMIZERS[name][1](params, **kwargs, **({"state_dtype": state_dtype} if state_dtype else {}))
    for step in range(4):
        for index, p in enumerate(params):
            g = grads(step, index, p)
            p.grad = None if g is None else g.to(dtype)
        opt.step()
        for p, (want, want_state) in zip(params, expected[step]):
            assert p.dtype == dtype
            assert_tensor_match(p.detach(), want, exact=True, msg=f"{name} {dtype} step {step}")
            for key, value in want_state.items():
                # Without state_dtype the state is kept in the param's dtype, as torch keeps it.
                assert opt.state[p][key].dtype == (state_dtype or dtype)
                assert_tensor_match(opt.state[p][key], value, exact=True, msg=f"{key} step {step}")


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("flags", ["all_on", "all_off"])
@pytest.mark.parametrize("name", ["SGD", "RMSprop"])
def test_half_precision_sgd_rmsprop_is_the_float32_step_rounded_once(name, flags, dtype, count_kernel_calls):
    _check_against_rounded_float32_run(name, flags, dtype)
    assert count_kernel_calls[KERNELS[name]] >= 4


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_half_precision_is_at_least_as_accurate_as_torch(name, dtype):
    """Against a float64 run from the same start and grads: as accurate as torch's fused kernel
    (Adam/AdamW), no less accurate than its for-loop (SGD/RMSprop), and finite."""
    gen = torch.Generator().manual_seed(11)
    start = torch.randn(4096, generator=gen, dtype=torch.float64).to(dtype)
    grads = [(torch.randn(4096, generator=gen, dtype=torch.float64) * 0.1).to(dtype) for _ in range(5)]
    kwargs = {"lr": 1e-2}

    def run(module, p_dtype, **extra):
        p = start.to(p_dtype).clone().requires_grad_()
        opt = getattr(module, name)([p], **kwargs, **extra)
        for g in grads:
            p.grad = g.to(p_dtype)
            opt.step()
        return p.detach().double()

    exact = run(torch.optim, torch.float64)
    ours = (run(rsoptim, dtype) - exact).abs()
    assert torch.isfinite(ours).all()
    if name in ("Adam", "AdamW"):
        # The same numbers as torch's fused kernel, so exactly as accurate.
        assert torch.equal(ours, (run(torch.optim, dtype, fused=True) - exact).abs())
    else:
        # No fused reference (torch's fused SGD is broken for half params, RMSprop has none):
        # rounding once per stored value is no less accurate than torch's per-op rounding.
        loop = (run(torch.optim, dtype, foreach=False) - exact).abs().nan_to_num(nan=float("inf"))
        assert ours.mean() <= loop.mean() * 1.001, f"mean error {ours.mean():.3e} vs torch's for-loop {loop.mean():.3e}"


def test_float16_adam_with_the_default_eps_stays_finite_as_torch_fused():
    # eps=1e-8 is 0 in float16: torch's for-loop divides by zero where grads are small.
    def run(**extra):
        p = torch.zeros(4, dtype=torch.float16, requires_grad=True)
        opt = (extra.pop("cls"))([p], lr=1e-3, **extra)
        p.grad = torch.tensor([1e-3, 1e-4, 0, 1], dtype=torch.float16)
        opt.step()
        return p.detach()

    assert not torch.isfinite(run(cls=torch.optim.Adam, foreach=False)).all()
    ours = run(cls=rsoptim.Adam)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, run(cls=torch.optim.Adam, fused=True))


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("first", ["rsoptim", "torch fused"])
def test_half_precision_state_dicts_interchange_with_torch(dtype, first):
    """Two steps in one implementation, its state dict loaded into the other, two more steps:
    the same params and state, bit for bit, as four steps of torch's fused Adam."""
    grads = [torch.linspace(0.5, -0.5, 100).to(dtype) * (i + 1) for i in range(4)]

    def make(module_name):
        p = torch.linspace(-1, 1, 100).to(dtype).requires_grad_()
        opt = rsoptim.Adam([p], lr=1e-2) if module_name == "rsoptim" else torch.optim.Adam([p], lr=1e-2, fused=True)
        return p, opt

    def steps(p, opt, gs):
        for g in gs:
            p.grad = g.clone()
            opt.step()

    p_ref, ref = make("torch fused")
    steps(p_ref, ref, grads)
    p_a, a = make(first)
    steps(p_a, a, grads[:2])
    p_b, b = make("torch fused" if first == "rsoptim" else "rsoptim")
    with torch.no_grad():
        p_b.copy_(p_a)
    b.load_state_dict(a.state_dict())
    # The loaded param group brings the other implementation's flags (torch's rule for every
    # state dict): torch's optimizer must be told again to run its fused kernel.
    if first == "rsoptim":
        b.param_groups[0]["fused"] = True
    steps(p_b, b, grads[2:])
    assert torch.equal(p_b.detach(), p_ref.detach())
    for key in ("exp_avg", "exp_avg_sq"):
        assert b.state[p_b][key].dtype == dtype
        assert torch.equal(b.state[p_b][key], ref.state[p_ref][key])
    assert torch.equal(b.state[p_b]["step"], ref.state[p_ref]["step"])


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_strided_half_precision_params_are_stepped_as_contiguous_ones(dtype):
    results = []
    for transposed in (False, True):
        base = torch.linspace(-1, 1, 35).reshape(5, 7).to(dtype)
        p = (base.t().contiguous().t() if transposed else base.clone()).requires_grad_()
        opt = rsoptim.Adam([p], lr=1e-2)
        for i in range(3):
            g = torch.linspace(1, -1, 35).reshape(5, 7).to(dtype) * (i + 1)
            p.grad = g.t().contiguous().t() if transposed else g
            opt.step()
        results.append(p.detach().contiguous())
    assert torch.equal(results[0], results[1])


# --- state_dtype=torch.float32: float32 state for half-precision params (rsoptim's extension) ---


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("flags", ["all_on", "all_off"])
@pytest.mark.parametrize("name", NAMES)
def test_float32_state_is_the_float32_step_with_the_param_rounded_once(name, flags, dtype):
    _check_against_rounded_float32_run(name, flags, dtype, state_dtype=torch.float32)


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_float32_state_is_more_accurate_than_half_state(dtype):
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(4096, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4096, generator=gen, dtype=torch.float64) * 1e-3 for _ in range(20)]

    def run(p_dtype, **extra):
        p = start.to(p_dtype).clone().requires_grad_()
        opt = rsoptim.AdamW([p], lr=1e-3, **extra)
        for g in grads:
            p.grad = g.to(p_dtype)
            opt.step()
        return p.detach().double()

    exact = run(torch.float64)
    half_state = (run(dtype) - exact).abs().mean()
    float_state = (run(dtype, state_dtype=torch.float32) - exact).abs().mean()
    assert float_state < half_state, (float_state, half_state)


def test_state_dtype_keeps_float32_state_through_state_dicts():
    def fresh(**extra):
        p = torch.linspace(-1, 1, 64).to(torch.bfloat16).requires_grad_()
        return p, rsoptim.Adam([p], lr=1e-2, **extra)

    grads = [torch.linspace(1, -1, 64).to(torch.bfloat16) * (i + 1) for i in range(4)]
    p_ref, ref = fresh(state_dtype=torch.float32)
    for g in grads:
        p_ref.grad = g.clone()
        ref.step()
    # Two steps, a state dict, a fresh optimizer: the same four steps, bit for bit.
    p_a, a = fresh(state_dtype=torch.float32)
    for g in grads[:2]:
        p_a.grad = g.clone()
        a.step()
    saved = copy.deepcopy(a.state_dict())
    assert saved["param_groups"][0]["state_dtype"] == torch.float32
    p_b, b = fresh()  # built without state_dtype: the loaded group brings it
    with torch.no_grad():
        p_b.copy_(p_a)
    b.load_state_dict(saved)
    assert b.state[p_b]["exp_avg"].dtype == torch.float32
    for g in grads[2:]:
        p_b.grad = g.clone()
        b.step()
    assert torch.equal(p_b.detach(), p_ref.detach())
    assert torch.equal(b.state[p_b]["exp_avg_sq"], ref.state[p_ref]["exp_avg_sq"])
    # torch.optim takes the same state dict, casting the state to the param's dtype (its rule).
    p_t = torch.linspace(-1, 1, 64).to(torch.bfloat16).requires_grad_()
    t = torch.optim.Adam([p_t], lr=1e-2)
    t.load_state_dict(copy.deepcopy(saved))
    assert t.state[p_t]["exp_avg"].dtype == torch.bfloat16
    # And a torch.optim state dict (bfloat16 state) loads into an optimizer built with
    # state_dtype=torch.float32 as float32 state.
    p_c, c = fresh(state_dtype=torch.float32)
    c.load_state_dict(t.state_dict())
    assert c.state[p_c]["exp_avg"].dtype == torch.float32 and c.param_groups[0]["state_dtype"] == torch.float32


@pytest.mark.parametrize("bad", [torch.float16, torch.bfloat16, torch.float64, torch.int32, "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dtype_refuses_what_it_does_not_support(name, bad):
    with pytest.raises(ValueError, match="state_dtype"):
        OPTIMIZERS[name][1]([torch.zeros(3, requires_grad=True)], lr=0.1, state_dtype=bad)


@pytest.mark.parametrize("name", NAMES)
def test_state_dtype_float32_leaves_float32_params_as_they_are(name):
    def run(**extra):
        p = torch.linspace(-1, 1, 16).requires_grad_()
        opt = OPTIMIZERS[name][1]([p], lr=0.1, **extra)
        for i in range(3):
            p.grad = torch.linspace(1, -1, 16) * (i + 1)
            opt.step()
        return p.detach(), {k: v for k, v in opt.state[p].items()}

    (a, sa), (b, sb) = run(), run(state_dtype=torch.float32)
    assert torch.equal(a, b)
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


# --- mixed dtypes in one group --------------------------------------------------------------

MIXED = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128]


@pytest.mark.parametrize("flags", ["all_on", "all_off"])
@pytest.mark.parametrize("name", NAMES)
def test_mixed_dtypes_in_one_group(name, flags, count_kernel_calls):
    torch_cls, our_cls = OPTIMIZERS[name]
    kwargs = (ALL_ON if flags == "all_on" else ALL_OFF)[name]
    grads = seeded_grads(4, none_at=lambda step, index: index % 5 == 2 and step < 2)
    # Against torch for every dtype whose reference is torch's for-loop.
    full = [d for d in MIXED if d not in HALF]
    run_side_by_side(torch_cls, our_cls, _params(full, seed=3), kwargs, steps=4, grads=grads)
    assert count_kernel_calls[KERNELS[name]] >= 4
    # The half-precision params of a mixed group step exactly as in a group of their own.
    mixed, alone = _params(MIXED, seed=3)(), _params(MIXED, seed=3)()
    half_alone = [p for p in alone if p.dtype in HALF]
    opt_mixed, opt_alone = our_cls(mixed, **kwargs), our_cls(half_alone, **kwargs)
    for step in range(4):
        for index, (p, q) in enumerate(zip(mixed, alone)):
            g = grads(step, index, p)
            p.grad, q.grad = g, None if g is None else g.clone()
        opt_mixed.step()
        opt_alone.step()
    for p, q in zip(mixed, alone):
        if p.dtype in HALF:
            assert_tensor_match(p, q, exact=True, msg=f"{p.dtype} param in a mixed group")


# --- step dtype -----------------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_step_is_float64_under_float64_default(name, param_dtype, restore_default_dtype):
    torch.set_default_dtype(torch.float64)
    torch_cls, our_cls = OPTIMIZERS[name]
    ours, ref = run_side_by_side(torch_cls, our_cls, _params([param_dtype]), ALL_ON[name], steps=3, grads=seeded_grads(5))
    for p, q in zip(ours.param_groups[0]["params"], ref.param_groups[0]["params"]):
        assert ref.state[q]["step"].dtype == torch.float64  # what torch does...
        assert ours.state[p]["step"].dtype == torch.float64  # ...and rsoptim
        assert ours.state[p]["step"].item() == 3


def test_default_dtype_is_restored():
    """The fixture above put the default dtype back."""
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_step_dtypes_mixed_within_a_group(name, restore_default_dtype):
    """Params that start under a float32 default and others under float64 (as after loading an
    older state dict): one group holds float32 and float64 step counts; each advances as torch's."""
    torch_cls, our_cls = OPTIMIZERS[name]
    build = _params([torch.float64, torch.float32], seed=6)
    ref_params, our_params = build(), build()
    ref = torch_cls(ref_params, foreach=False, **ALL_ON[name])
    ours = our_cls(our_params, **ALL_ON[name])
    grads = seeded_grads(7)
    half = len(ref_params) // 2
    for step in range(4):
        if step == 2:
            torch.set_default_dtype(torch.float64)
        for i, (p, q) in enumerate(zip(our_params, ref_params)):
            # The second half of the params get their first grad only at step 2.
            g = grads(step, i, q) if (i < half or i % 2 == 0 or step >= 2) else None
            q.grad = g
            p.grad = None if g is None else g.clone()
        ref.step()
        ours.step()
        assert_optimizers_match(ours, ref, where=f"after step {step + 1}")
    dtypes = {ours.state[p]["step"].dtype for p in our_params}
    assert dtypes == {torch.float32, torch.float64}


# --- CUDA -----------------------------------------------------------------------------------

CUDA_IMPLS = {
    "SGD": ["foreach", "fused", "forloop"],
    "Adam": ["foreach", "fused", "forloop", "capturable"],
    "AdamW": ["foreach", "fused", "forloop", "capturable"],
    "RMSprop": ["foreach", "forloop", "capturable"],
}
CUDA_CASES = [(name, impl) for name, impls in CUDA_IMPLS.items() for impl in impls]
IMPL_KWARGS = {
    "foreach": {},  # torch's default on CUDA is foreach; rsoptim must pass it on
    "fused": {"fused": True},
    "forloop": {"foreach": False},
    "capturable": {"capturable": True, "foreach": True},
}


def _cuda_params(dtypes, device="cuda", seed=8):
    def build():
        gen = torch.Generator().manual_seed(seed)
        return [
            torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_()
            for dtype in dtypes
            for shape in SHAPES
        ]

    return build


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name, impl", CUDA_CASES)
def test_cuda_params_get_torchs_result(name, impl, dtype, count_kernel_calls):
    """CUDA params go to torch with the group's foreach/fused/capturable: bit for bit the result
    of torch.optim with the same arguments (torch's default on CUDA is foreach)."""
    torch_cls, our_cls = OPTIMIZERS[name]
    kwargs = {**ALL_ON[name], **IMPL_KWARGS[impl]}
    if impl == "fused":
        kwargs.pop("foreach", None)
    run_side_by_side(
        torch_cls,
        our_cls,
        _cuda_params([dtype]),
        kwargs,
        ref_kwargs={"foreach": kwargs.get("foreach")},
        steps=3,
        grads=seeded_grads(9, none_at=lambda step, index: index == 2 and step == 1),
        exact=True,
    )
    assert count_kernel_calls[KERNELS[name]] == 0, "a CUDA param reached the CPU kernels"


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_mixed_cpu_and_cuda_group(name, count_kernel_calls):
    """One group with CPU and CUDA params: torch's for-loop steps all of them (torch does not
    use foreach for a mixed group); rsoptim sends the CPU params to the kernels and the CUDA
    ones to torch's foreach. Same results within torch's tolerances, state on each param's device."""
    torch_cls, our_cls = OPTIMIZERS[name]

    def build():
        cpu = _cuda_params([torch.float32, torch.float64], device="cpu", seed=10)()
        cuda = _cuda_params([torch.float32, torch.float64], device="cuda", seed=11)()
        return [t for pair in zip(cpu, cuda) for t in pair]

    ours, _ = run_side_by_side(torch_cls, our_cls, build, ALL_ON[name], steps=3, grads=seeded_grads(12))
    assert count_kernel_calls[KERNELS[name]] >= 3
    for p in ours.param_groups[0]["params"]:
        for key, value in ours.state[p].items():
            if key != "step":
                assert value.device == p.device, (key, value.device, p.device)


@pytest.mark.cuda
def test_cuda_capturable_step_lives_on_the_gpu():
    p = torch.randn(10, device="cuda", requires_grad=True)
    opt = rsoptim.Adam([p], lr=0.1, capturable=True)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["step"].device.type == "cuda"


# --- state_dtype where torch steps the param, and its checks ----------------------------------


def _float32_state_run(name, edit=None, steps=3, **kwargs):
    """bfloat16 params with float32 state; ``edit(opt, params, step)`` runs before each step."""
    params = [torch.linspace(-1, 1, 32).to(torch.bfloat16).requires_grad_() for _ in range(2)]
    opt = OPTIMIZERS[name][1](params, lr=0.1, state_dtype=torch.float32, **kwargs)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = (torch.linspace(1, -1, 32) * (i + step + 1)).to(torch.bfloat16)
        if edit is not None:
            edit(opt, params, step)
        opt.step()
    return params, opt


@pytest.mark.parametrize("name", NAMES)
def test_float32_state_where_torch_steps_the_param_is_the_kernels_rule(name):
    # A lazy negation bit sends a param to torch's implementation, which refuses mixed dtypes:
    # rsoptim steps a float32 copy there and rounds the param once, as the kernels do.
    def negate_once(opt, params, step):
        if step == 1:
            params[0].grad = torch._neg_view(-params[0].grad)  # the same values, through a neg bit

    kwargs = {"momentum": 0.9} if name == "SGD" else {"centered": True} if name == "RMSprop" else {}
    ours, opt = _float32_state_run(name, negate_once, **kwargs)
    plain, plain_opt = _float32_state_run(name, **kwargs)
    for p, q in zip(ours, plain):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        for key, value in opt.state[p].items():
            assert value.dtype == plain_opt.state[q][key].dtype
            if key != "step":
                assert value.dtype == torch.float32
            torch.testing.assert_close(value, plain_opt.state[q][key])
        assert float(opt.state[p].get("step", torch.tensor(3.0))) == 3.0


def test_float32_state_with_a_param_listed_twice_is_stepped_by_torch_in_float32():
    p = torch.linspace(-1, 1, 16).to(torch.bfloat16).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's duplicate-param warning
        opt = rsoptim.Adam([p, p], lr=0.1, state_dtype=torch.float32)
    for _ in range(2):
        p.grad = torch.linspace(1, -1, 16).to(torch.bfloat16)
        opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert float(opt.state[p]["step"]) == 4.0  # two steps, each stepping it twice (as torch)


@pytest.mark.parametrize("bad", [torch.float16, torch.float64, "float32"])
def test_state_dtype_is_checked_wherever_a_group_gets_one(bad):
    a, b = (torch.zeros(4, requires_grad=True) for _ in range(2))
    with pytest.raises(ValueError, match="state_dtype"):
        rsoptim.Adam([{"params": [a]}, {"params": [b], "state_dtype": bad}])
    opt = rsoptim.Adam([a])
    with pytest.raises(ValueError, match="state_dtype"):
        opt.add_param_group({"params": [b], "state_dtype": bad})
    assert len(opt.param_groups) == 1
    saved = opt.state_dict()
    saved["param_groups"][0]["state_dtype"] = bad
    with pytest.raises(ValueError, match="state_dtype"):
        opt.load_state_dict(saved)
    # A group edited by hand: refused before any group is stepped.
    opt = rsoptim.Adam([{"params": [a]}, {"params": [b]}])
    opt.param_groups[1]["state_dtype"] = bad
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    with pytest.raises(ValueError, match="state_dtype"):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(4))


def test_state_dtype_refuses_half_params_off_the_cpu():
    p = torch.zeros(4, dtype=torch.bfloat16, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="CPU"):
        rsoptim.Adam([p], state_dtype=torch.float32)
    opt = rsoptim.Adam([torch.zeros(4, requires_grad=True)], state_dtype=torch.float32)
    with pytest.raises(ValueError, match="CPU"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1
