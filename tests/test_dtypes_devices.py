"""dtypes and devices that rsoptim routes to torch, mixed groups, and the step dtype.

* float16/bfloat16 CPU params are stepped by torch's own functional implementation: the
  results must be torch's for-loop results bit for bit, and the Rust kernels must not be called.
* A group may mix dtypes: each param gets the same result as in torch.
* ``state['step']`` is float64 when the default dtype is float64 (torch's ``_get_scalar_dtype``).
* CUDA params (``@pytest.mark.cuda``, skipped without a GPU) get torch's foreach/fused results.
"""

from __future__ import annotations

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("flags", ["all_on", "all_off"])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_is_torch_exactly(name, flags, dtype, count_kernel_calls):
    torch_cls, our_cls = OPTIMIZERS[name]
    kwargs = (ALL_ON if flags == "all_on" else ALL_OFF)[name]
    _, ref = run_side_by_side(
        torch_cls,
        our_cls,
        _params([dtype]),
        kwargs,
        steps=4,
        grads=seeded_grads(2, none_at=lambda step, index: index == 3 and step == 1),
        exact=True,
    )
    assert count_kernel_calls[KERNELS[name]] == 0, "a float16/bfloat16 param reached the Rust kernels"
    # The run changed the params, so the bitwise comparison compared something.
    moved = [not torch.equal(p, q) for p, q in zip(ref.param_groups[0]["params"], _params([dtype])()) if p.numel()]
    assert all(moved)


# --- mixed dtypes in one group --------------------------------------------------------------

MIXED = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128]


@pytest.mark.parametrize("flags", ["all_on", "all_off"])
@pytest.mark.parametrize("name", NAMES)
def test_mixed_dtypes_in_one_group(name, flags, count_kernel_calls):
    torch_cls, our_cls = OPTIMIZERS[name]
    kwargs = (ALL_ON if flags == "all_on" else ALL_OFF)[name]
    ours, ref = run_side_by_side(
        torch_cls,
        our_cls,
        _params(MIXED, seed=3),
        kwargs,
        steps=4,
        grads=seeded_grads(4, none_at=lambda step, index: index % 5 == 2 and step < 2),
    )
    # The half-precision params, stepped by torch in both, agree bit for bit.
    for p, q in zip(ours.param_groups[0]["params"], ref.param_groups[0]["params"]):
        if p.dtype in (torch.float16, torch.bfloat16):
            assert_tensor_match(p, q, exact=True, msg=f"{p.dtype} param in a mixed group")
            for key in ref.state.get(q, {}):
                assert_tensor_match(ours.state[p][key], ref.state[q][key], exact=True, msg=f"{p.dtype} {key}")
    # The kernels ran (float32/float64/complex), one call per kernel dtype and step at least.
    assert count_kernel_calls[KERNELS[name]] >= 4


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
