"""Shared helpers for the parity tests: rsoptim against the installed torch.optim.

The reference is always torch itself (its for-loop implementation, ``foreach=False``, on CPU).
Tolerances are torch's own defaults (``torch.testing.assert_close``): float64/complex128
rtol=1e-7 atol=1e-7, float32/complex64 rtol=1.3e-6 atol=1e-5. They are spelled out here so that
a change in torch's defaults cannot silently widen them.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pytest
import torch

import rsoptim
from rsoptim import _rsoptim

# -------------------------------------------------------------------------------------------
# markers and fixtures
# -------------------------------------------------------------------------------------------

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml registers these too; registering here keeps the files self-contained.
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def restore_simd():
    """Puts the SIMD path back after the test, whatever it did: to 'auto' (the best path), or to
    the path RSOPTIM_SIMD chose for this process if that was another one."""
    before = rsoptim.simd_level()
    _rsoptim.set_simd_level("auto")
    auto = rsoptim.simd_level()
    _rsoptim.set_simd_level(before)
    try:
        yield
    finally:
        _rsoptim.set_simd_level("auto" if before == auto else before)
        assert rsoptim.simd_level() == before


@pytest.fixture
def restore_threads():
    before = rsoptim.get_num_threads()
    try:
        yield
    finally:
        rsoptim.set_num_threads(before)


@pytest.fixture
def restore_default_dtype():
    before = torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# -------------------------------------------------------------------------------------------
# tolerances and comparisons
# -------------------------------------------------------------------------------------------

#: torch.testing's default (rtol, atol) per dtype.
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.complex128: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.complex64: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}

OPTIMIZERS = {
    "SGD": (torch.optim.SGD, rsoptim.SGD),
    "Adam": (torch.optim.Adam, rsoptim.Adam),
    "AdamW": (torch.optim.AdamW, rsoptim.AdamW),
    "RMSprop": (torch.optim.RMSprop, rsoptim.RMSprop),
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a floating tensor, as integers (so -0.0 != 0.0 and NaNs compare)."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    ints = {
        torch.float64: torch.int64,
        torch.float32: torch.int32,
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
    }
    if t.dtype in ints:
        return t.contiguous().view(ints[t.dtype])
    return t.contiguous()


def assert_tensor_match(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    exact: bool = False,
    equal_nan: bool = False,
    check_stride: bool = False,
    msg: str = "",
) -> None:
    """``actual`` equals ``expected``: bit for bit if ``exact``, else within torch's default
    tolerances for the dtype. Dtype, device and shape must match; strides too if asked."""
    assert isinstance(actual, torch.Tensor), f"{msg}: expected a Tensor, got {type(actual).__name__}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device == expected.device, f"{msg}: device {actual.device} != {expected.device}"
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if check_stride:
        # Strides of size-1 dims say nothing about the layout; torch itself normalises them.
        a_str = [st for st, n in zip(actual.stride(), actual.shape) if n != 1]
        e_str = [st for st, n in zip(expected.stride(), expected.shape) if n != 1]
        assert a_str == e_str, f"{msg}: strides {actual.stride()} != {expected.stride()}"
    if exact:
        a, e = bits(actual.cpu()), bits(expected.cpu())
        if not torch.equal(a, e):
            diff = (actual.detach().cpu().double() - expected.detach().cpu().double()).abs()
            count = int((a != e).sum())
            raise AssertionError(
                f"{msg}: not bit-identical ({count} of {a.numel()} elements differ, max abs diff "
                f"{diff.nan_to_num(nan=float('inf')).max().item() if diff.numel() else 0})"
            )
        return
    rtol, atol = TOLERANCES[actual.dtype]
    torch.testing.assert_close(
        actual.detach(), expected.detach(), rtol=rtol, atol=atol, equal_nan=equal_nan, msg=lambda m: f"{msg}: {m}"
    )


def _match_value(actual: Any, expected: Any, *, msg: str, **kw: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert_tensor_match(actual, expected, msg=msg, **kw)
    else:
        assert actual == expected, f"{msg}: {actual!r} != {expected!r}"


def assert_optimizers_match(
    ours: torch.optim.Optimizer,
    ref: torch.optim.Optimizer,
    *,
    exact: bool = False,
    equal_nan: bool = False,
    check_stride: bool = False,
    grads_exact: bool = True,
    where: str = "",
) -> None:
    """Params, grads and every state key of two optimizers over identical params agree.

    Params are paired by position over the param groups. Grads must be left as they were: equal
    bit for bit where both sides were given the same grads (``grads_exact``), else within
    tolerance (grads from each side's own backward). A param that torch gave no state must
    have none in ``ours`` either (and the reverse); ``step`` counts must be equal exactly (dtype
    included); every other state tensor within tolerance (or bit for bit with ``exact``).
    """
    assert len(ours.param_groups) == len(ref.param_groups), f"{where}: number of param groups"
    for gi, (g_ours, g_ref) in enumerate(zip(ours.param_groups, ref.param_groups)):
        assert len(g_ours["params"]) == len(g_ref["params"]), f"{where}: group {gi} sizes"
        for pi, (p, q) in enumerate(zip(g_ours["params"], g_ref["params"])):
            tag = f"{where} group {gi} param {pi} (shape {tuple(q.shape)}, {q.dtype})"
            assert_tensor_match(p, q, exact=exact, equal_nan=equal_nan, check_stride=check_stride, msg=f"{tag} param")
            if q.grad is None:
                assert p.grad is None, f"{tag}: ours has a grad, torch's has none"
            else:
                # Neither implementation may change the grad (torch works out of place).
                assert_tensor_match(p.grad, q.grad, exact=grads_exact, equal_nan=equal_nan, msg=f"{tag} grad")
            s_ours = ours.state[p] if p in ours.state else {}
            s_ref = ref.state[q] if q in ref.state else {}
            assert set(s_ours) == set(s_ref), f"{tag}: state keys {sorted(s_ours)} != torch's {sorted(s_ref)}"
            for key, expected in s_ref.items():
                actual = s_ours[key]
                if key == "step":
                    # The step count: same value, dtype, device and shape, exactly.
                    _match_value(actual, expected, msg=f"{tag} state[{key!r}]", exact=True)
                else:
                    _match_value(
                        actual,
                        expected,
                        msg=f"{tag} state[{key!r}]",
                        exact=exact,
                        equal_nan=equal_nan,
                        check_stride=check_stride,
                    )


# -------------------------------------------------------------------------------------------
# running two optimizers side by side
# -------------------------------------------------------------------------------------------

ParamSpec = Any  # a list of tensors, or a list of param-group dicts
GradFn = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]


def twin(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with the same sizes, strides and storage offset, over a copy of its
    storage (so gaps, offsets and broadcast (stride-0) dims are reproduced too)."""
    t = t.detach()
    storage = t.untyped_storage().clone()
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    out.set_(storage, t.storage_offset(), t.size(), t.stride())
    return out


def flat_params(spec: ParamSpec) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for entry in spec:
        if isinstance(entry, dict):
            out.extend(entry["params"])
        else:
            out.append(entry)
    return out


def seeded_grads(seed: int = 0, scale: float = 1.0, none_at: Callable[[int, int], bool] | None = None) -> GradFn:
    """Deterministic grads: ``scale * randn`` from a generator seeded per (step, param)."""

    def make(step: int, index: int, p: torch.Tensor) -> torch.Tensor | None:
        if none_at is not None and none_at(step, index):
            return None
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + index)
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
        if p.is_complex():
            g = torch.complex(g, torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
        return g.to(dtype=p.dtype, device=p.device)

    return make


def run_side_by_side(
    ref_cls: type,
    our_cls: type,
    build: Callable[[], ParamSpec],
    kwargs: dict[str, Any],
    *,
    steps: int = 5,
    grads: GradFn | None = None,
    ref_kwargs: dict[str, Any] | None = None,
    exact: bool = False,
    equal_nan: bool = False,
    check_stride: bool = False,
    between_steps: Callable[[int, torch.optim.Optimizer, torch.optim.Optimizer], None] | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Builds identical params twice, steps ``ref_cls`` (torch, ``foreach=False`` unless
    ``ref_kwargs`` says otherwise) and ``our_cls`` with the same grads, and compares params,
    grads and every state key after every step. Returns (ours, ref)."""
    grads = grads or seeded_grads()
    ref_spec, our_spec = build(), build()
    ref_params, our_params = flat_params(ref_spec), flat_params(our_spec)
    assert len(ref_params) == len(our_params)
    ref_kw = {"foreach": False, **copy.deepcopy(kwargs), **(ref_kwargs or {})}
    ref = ref_cls(ref_spec, **ref_kw)
    ours = our_cls(our_spec, **copy.deepcopy(kwargs))
    assert_optimizers_match(ours, ref, exact=exact, check_stride=check_stride, where="before any step")
    for step in range(steps):
        for index, (p, q) in enumerate(zip(our_params, ref_params)):
            g = grads(step, index, q)
            q.grad = g
            p.grad = None if g is None else twin(g)
        ref.step()
        ours.step()
        assert_optimizers_match(
            ours,
            ref,
            exact=exact,
            equal_nan=equal_nan,
            check_stride=check_stride,
            where=f"after step {step + 1}",
        )
        if between_steps is not None:
            between_steps(step, ours, ref)
    return ours, ref


def tensor_sizes() -> Sequence[tuple[int, ...]]:
    """Odd sizes around SIMD widths and the kernels' chunk boundaries."""
    chunk = int(_rsoptim.CHUNK)
    return [(0,), (1,), (7,), (8,), (9,), (17,), (33,), (chunk - 1,), (chunk + 1,), (2 * chunk + 3,), (3, 0, 2)]


def fuzz_settings(examples: int):
    """Hypothesis settings of the property tests: deterministic (the same examples on every run,
    so CI is reproducible) and bounded; FUZZ_EXAMPLES_SCALE (default 1) scales the example count
    for longer local runs."""
    import os

    from hypothesis import HealthCheck, settings

    scale = float(os.environ.get("FUZZ_EXAMPLES_SCALE", "1"))
    return settings(
        max_examples=max(1, int(examples * scale)),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@contextlib.contextmanager
def ieee_sqrt() -> Iterator[list[int]]:
    """Within the block, ``Tensor.sqrt``/``sqrt_`` of CPU tensors are correctly rounded (NumPy's
    square root), for references built from torch's float32 ops: torch's own float32 CPU
    ``sqrt`` is not correctly rounded (torch 2.13 here: 1 ulp off for about 15% of random
    inputs, e.g. sqrt(0x1.a3e76cp-24) = 0x1.47dd6cp-12 where IEEE gives 0x1.47dd6ep-12), while
    torch's fused Adam kernel and rsoptim's kernels use the IEEE square root. Yields a one-element
    list counting the calls, so that a reference that stops calling them shows."""
    calls = [0]
    saved = {name: torch.Tensor.__dict__.get(name) for name in ("sqrt", "sqrt_")}

    def ieee(t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        with np.errstate(invalid="ignore"):  # sqrt(-x) is NaN, silently, as in torch
            return torch.from_numpy(np.asarray(np.sqrt(t.detach().numpy()))).to(t.dtype)

    torch.Tensor.sqrt = lambda self: ieee(self)  # type: ignore[method-assign]
    torch.Tensor.sqrt_ = lambda self: self.copy_(ieee(self))  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
