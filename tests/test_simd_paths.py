"""Every SIMD path and every thread count gives bit-identical results.

The kernels never use fused multiply-adds and reduce norms in fixed lanes and fixed chunks, so
the scalar, AVX2, AVX-512 (and NEON) paths and any thread count must agree bit for bit with the
default path, for every optimizer and for ``clip_grad_norm_``. ``RSOPTIM_SIMD`` picks the path
for a process; a bad value is a clear ValueError, not a crash.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rsoptim
from rsoptim import _rsoptim
from conftest import assert_tensor_match, seeded_grads, tensor_sizes

LEVELS = rsoptim.available_simd_levels()
NAMES = ["SGD", "Adam", "AdamW", "RMSprop"]
CLASSES = {"SGD": rsoptim.SGD, "Adam": rsoptim.Adam, "AdamW": rsoptim.AdamW, "RMSprop": rsoptim.RMSprop}

CONFIGS = {
    "SGD": [
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
        dict(lr=0.05, momentum=0.9, dampening=0.3),
        dict(lr=0.05),
    ],
    "Adam": [
        dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
        dict(lr=0.05),
    ],
    "AdamW": [
        dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
        dict(lr=0.05, weight_decay=0.0),
    ],
    "RMSprop": [
        dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.5, centered=True, maximize=True),
        dict(lr=0.01),
    ],
}
CASES = [pytest.param(name, i, id=f"{name}-config{i}") for name in NAMES for i in range(len(CONFIGS[name]))]


def _params(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    out = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in tensor_sizes()]
    out.append(torch.randn((), generator=gen, dtype=torch.float64).to(dtype).requires_grad_())
    out.append(torch.randn(6, 5, generator=gen, dtype=torch.float64).to(dtype).t().requires_grad_())
    complex_dtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    out.append(torch.randn(37, generator=gen, dtype=complex_dtype).requires_grad_())
    return out


def _run(name: str, config: int, dtype: torch.dtype, steps: int = 3) -> list[torch.Tensor]:
    """Params and every state tensor after ``steps`` steps with seeded grads (NaN/inf included)."""
    params = _params(dtype)
    opt = CLASSES[name](params, **CONFIGS[name][config])
    grads = seeded_grads(3, none_at=lambda step, index: index == 4 and step == 1)
    for step in range(steps):
        for i, p in enumerate(params):
            g = grads(step, i, p)
            if g is not None and step == 2 and g.numel() > 3:
                g.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), float("-inf")]).to(g.dtype)
            p.grad = g
        opt.step()
    out = []
    for p in params:
        out.append(p.detach().clone())
        for key in sorted(opt.state.get(p, {})):
            out.append(opt.state[p][key].clone())
    return out


def _assert_all_bits(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_tensor_match(a, e, exact=True, msg=f"{what}, tensor {i}")


def test_levels_are_known():
    assert "scalar" in LEVELS
    assert set(LEVELS) <= {"scalar", "avx2", "avx512", "neon"}
    assert rsoptim.simd_level() in LEVELS


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name, config", CASES)
def test_every_simd_path_is_bit_identical(name, config, dtype, restore_simd):
    default_level = rsoptim.simd_level()  # the process's path: 'auto' unless RSOPTIM_SIMD says
    expected = _run(name, config, dtype)
    for level in LEVELS:
        _rsoptim.set_simd_level(level)
        assert rsoptim.simd_level() == level
        _assert_all_bits(_run(name, config, dtype), expected, f"{name} config {config} on {level} vs {default_level}")


def _clip_inputs(dtype, norm_type):
    gen = torch.Generator().manual_seed(2)
    params = []
    for s in [*tensor_sizes(), (6, 5)]:
        if norm_type == "inf" and 0 in s:
            continue  # torch refuses the inf-norm of an empty tensor
        p = torch.zeros(s, dtype=dtype, requires_grad=True)
        p.grad = torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) * 3
        params.append(p)
    return params


CLIP_CASES = [(dtype, norm_type) for dtype in (torch.float32, torch.float64) for norm_type in (2.0, 1.0, "inf", 3.0, 0.5)]


def _clip(dtype, norm_type):
    params = _clip_inputs(dtype, norm_type)
    before = [p.grad.clone() for p in params]
    total = rsoptim.clip_grad_norm_(params, max_norm=1.0, norm_type=norm_type)
    grads = [p.grad.clone() for p in params]
    assert any(not torch.equal(g, b) for g, b in zip(grads, before)), "nothing was clipped"
    return [total, *grads]


@pytest.mark.parametrize("dtype, norm_type", CLIP_CASES, ids=[f"{str(d)[6:]}-{n}" for d, n in CLIP_CASES])
def test_clip_grad_norm_every_simd_path_is_bit_identical(dtype, norm_type, restore_simd):
    expected = _clip(dtype, norm_type)
    for level in LEVELS:
        _rsoptim.set_simd_level(level)
        _assert_all_bits(_clip(dtype, norm_type), expected, f"clip_grad_norm_ norm_type={norm_type} on {level}")


def test_set_simd_level_refuses_bad_names(restore_simd):
    with pytest.raises(ValueError):
        _rsoptim.set_simd_level("bogus")
    unavailable = [level for level in ("avx2", "avx512", "neon") if level not in LEVELS]
    for level in unavailable:
        with pytest.raises(ValueError):
            _rsoptim.set_simd_level(level)


# --- threads --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_thread_counts_are_bit_identical(dtype, restore_threads):
    rsoptim.set_num_threads(1)
    expected = {(name, config): _run(name, config, dtype) for name in NAMES for config in range(len(CONFIGS[name]))}
    expected_clip = {n: _clip(dtype, n) for n in (2.0, 1.0, "inf", 3.0)}
    for threads in (2, 3):
        rsoptim.set_num_threads(threads)
        assert rsoptim.get_num_threads() == threads
        for (name, config), want in expected.items():
            _assert_all_bits(_run(name, config, dtype), want, f"{name} config {config} on {threads} threads")
        for n, want in expected_clip.items():
            _assert_all_bits(_clip(dtype, n), want, f"clip_grad_norm_ norm_type={n} on {threads} threads")


def test_set_num_threads_refuses_zero(restore_threads):
    with pytest.raises(ValueError):
        rsoptim.set_num_threads(0)


# --- RSOPTIM_SIMD ---------------------------------------------------------------------------

_PROBE = textwrap.dedent(
    """
    import sys
    try:
        import torch
        import rsoptim
        level = rsoptim.simd_level()
        p = torch.zeros(100, requires_grad=True)
        p.grad = torch.ones(100)
        rsoptim.Adam([p], lr=0.1).step()
        assert float(p[0]) != 0.0
        print("LEVEL", level)
    except ValueError as e:
        print("VALUEERROR", e)
    """
)


def _probe(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RSOPTIM_SIMD": value}
    return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)


def test_rsoptim_simd_env_picks_the_scalar_path():
    out = _probe("scalar")
    assert out.returncode == 0, out.stderr
    assert "LEVEL scalar" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("value", ["bogus", "unavailable"])
def test_rsoptim_simd_env_bad_value_is_a_clear_error(value):
    if value == "unavailable":
        missing = [level for level in ("avx2", "avx512", "neon") if level not in LEVELS]
        if not missing:  # pragma: no cover - every path compiled in is runnable here
            pytest.skip("this CPU runs every SIMD path")
        value = missing[0]
    out = _probe(value)
    # No crash (a signal gives a negative return code), no traceback from an uncaught error:
    assert out.returncode == 0, f"rc={out.returncode}\n{out.stdout}\n{out.stderr}"
    assert "VALUEERROR" in out.stdout, out.stdout + out.stderr
    assert "RSOPTIM_SIMD" in out.stdout, out.stdout
    assert value in out.stdout, out.stdout
