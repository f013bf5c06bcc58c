"""Tensors whose Python-level metadata lies: a Tensor subclass's ``__torch_function__`` or a
``TorchFunctionMode`` can answer ``data_ptr()``, ``numel()`` or the ``_cdata`` getter with any
number, and a NumPy subclass can override ``size`` or ``ctypes``. What rsoptim hands its kernels
must be what the memory is (each of these crashed rsoptim before it read metadata with torch
function off); where torch steps params, subclasses and modes still see its ops.

Each attack runs in a child process, so that a crash fails its test instead of the whole run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import numpy as np
import torch
from torch.overrides import TorchFunctionMode
import rsoptim
from rsoptim import functional as F

FAR = 0x7F0000000000  # unmapped: a kernel writing there crashes


CDATA = torch._C.TensorBase._cdata  # the getter of the TensorImpl's address


def lie(func):
    # A far address, each time another (no two buffers seem to overlap), where func reads an
    # address; None where it does not.
    if getattr(func, "__name__", "") == "data_ptr" or getattr(func, "__self__", None) is CDATA:
        lie.count += 1
        return FAR + lie.count * (1 << 32)
    return None


lie.count = 0


class LyingMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        address = lie(func)
        return func(*args, **(kwargs or {})) if address is None else address


class LyingTensor(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        address = lie(func)
        return super().__torch_function__(func, types, args, kwargs or {}) if address is None else address


def model(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=g).requires_grad_() for shape in [(33, 7), (7,), (300,)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


OPTIMIZERS = {
    "SGD": dict(lr=0.1, momentum=0.9),
    "Adam": dict(lr=0.01),
    "AdamW": dict(lr=0.01),
    "RMSprop": dict(lr=0.01, momentum=0.5),
}


def check_equal(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.detach().as_subclass(torch.Tensor), e.detach(), rtol=0, atol=0)
"""


def run_child(body: str) -> None:
    source = PRELUDE + textwrap.dedent(body) + "\nprint('child ok')\n"
    done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "child ok" in done.stdout, (
        f"child exited with {done.returncode} (negative: killed by that signal)\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_a_mode_that_lies_about_addresses_and_sizes_changes_nothing(name):
    run_child(
        f"""
        expected, got, torchs = model(), model(), model()
        plain = getattr(rsoptim, "{name}")(expected, **OPTIMIZERS["{name}"])
        opt = getattr(rsoptim, "{name}")(got, **OPTIMIZERS["{name}"])
        ref = getattr(torch.optim, "{name}")(torchs, **OPTIMIZERS["{name}"])
        for step in range(3):  # the first step builds the plan, the next ones use it
            plain.step()
            ref.step()
            with LyingMode():
                opt.step()
        check_equal(got, expected)
        for g, t in zip(got, torchs):
            torch.testing.assert_close(g, t)  # torch's own tolerances, as the parity tests
        """
    )


def test_a_mode_that_lies_changes_nothing_for_adam8bit_and_clipping():
    run_child(
        """
        expected, got = model(), model()
        with LyingMode():
            total = rsoptim.clip_grad_norm_(got, max_norm=0.5)
            norm = rsoptim.get_total_norm([p.grad for p in got])
        ref_total = torch.nn.utils.clip_grad_norm_(expected, max_norm=0.5)
        torch.testing.assert_close(total, ref_total)
        torch.testing.assert_close(norm, torch.nn.utils.get_total_norm([p.grad for p in expected]))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g.grad, e.grad)

        a, b = model(), model()
        plain, lied_to = rsoptim.Adam8bit(a, lr=0.01), rsoptim.Adam8bit(b, lr=0.01)
        clipped = rsoptim.Adam(model(), lr=0.01, max_grad_norm=0.5)
        for step in range(3):
            plain.step()
            with LyingMode():
                lied_to.step()
                clipped.step()
        check_equal(b, a)
        """
    )


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
@pytest.mark.parametrize("target", ["grad", "state"])
def test_a_lying_subclass_swapped_in_after_the_plan_is_stepped_as_torch_does(name, target):
    # A plan reads each step's grads and state tensors: a subclass in their place is torch's to
    # step, and what it says its memory is never reaches a kernel.
    run_child(
        f"""
        key = {{"SGD": "momentum_buffer", "Adam": "exp_avg", "RMSprop": "square_avg"}}["{name}"]
        runs = []
        for module in (torch.optim, rsoptim):
            params = model()
            torch.manual_seed(0)
            opt = getattr(module, "{name}")(params, **OPTIMIZERS["{name}"])
            opt.step()
            opt.step()
            for p in params:
                if "{target}" == "grad":
                    p.grad = p.grad.as_subclass(LyingTensor)
                else:
                    opt.state[p][key] = opt.state[p][key].as_subclass(LyingTensor)
            opt.step()
            runs.append(params)
        for got, expected in zip(runs[1], runs[0]):
            torch.testing.assert_close(got.as_subclass(torch.Tensor), expected.as_subclass(torch.Tensor))
        """
    )


def test_a_subclass_param_still_sees_the_ops_of_torchs_step():
    # Params torch steps (here: a subclass with __torch_function__) run torch's implementation
    # with the caller's torch function state, as under torch.optim.
    run_child(
        """
        class Counting(torch.Tensor):
            seen = 0

            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):
                Counting.seen += 1
                return super().__torch_function__(func, types, args, kwargs or {})

        p = torch.nn.Parameter(torch.ones(5).as_subclass(Counting))
        p.grad = torch.ones(5)
        opt = rsoptim.Adam([p], lr=0.1)
        before = Counting.seen
        opt.step()
        assert Counting.seen > before, "torch's ops on the subclass param were not seen"
        """
    )


def test_functional_steps_numpy_subclasses_by_their_memory():
    run_child(
        """
        class LyingArray(np.ndarray):
            @property
            def size(self):
                return 1 << 30

            @property
            def ctypes(self):
                class Far:
                    data = FAR
                return Far()

        def arrays(cls):
            rng = np.random.default_rng(0)
            p, g = rng.standard_normal(100).astype(np.float32), rng.standard_normal(100).astype(np.float32)
            m, v = np.zeros(100, np.float32), np.zeros(100, np.float32)
            return [a.view(cls) if cls is not np.ndarray else a for a in (p, g, m, v)]

        plain, lying = arrays(np.ndarray), arrays(LyingArray)
        for arrays_ in (plain, lying):
            p, g, m, v = arrays_
            F.adam_([p], [g], [m], [v], np.zeros(1, np.float32), lr=0.1)
            F.sgd_([p], [g], lr=0.1)
        F.clip_grad_norm_([lying[1]], 0.5)
        F.clip_grad_norm_([plain[1]], 0.5)
        for a, b in zip(plain, lying):
            np.testing.assert_array_equal(np.asarray(b).view(np.ndarray), a)
        """
    )


def test_the_profiler_still_sees_each_step():
    # The step's profiler range is entered only while a profiler is on: this checks it is.
    run_child(
        """
        opt = rsoptim.Adam(model(), lr=0.01)
        with torch.profiler.profile() as prof:
            opt.step()
        names = {e.key for e in prof.key_averages()}
        assert "Optimizer.step#Adam.step" in names, sorted(names)[:20]
        """
    )
