"""Where the kernels' parallel regions run: torch's own OpenMP threads (the default where torch
ships an OpenMP runtime rsoptim can share) or rsoptim's rayon pool (RSOPTIM_BACKEND=rayon).
Both must give the same bits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rsoptim
from rsoptim import _rsoptim

SIZES = [(300, 700), (70_000,), (1,), (4096,), (0,), (65_537,)]  # 345,634 elements: parallel on OpenMP


def _run(make_opt, steps=3):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SIZES]
    opt = make_opt(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        rsoptim.clip_grad_norm_(params, max_norm=1.0)
        opt.step()
    state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in params] + [t.clone() for t in state]


OPTIMIZERS = {
    "Adam": lambda ps: rsoptim.Adam(ps, lr=1e-2, weight_decay=0.1),
    "AdamW": lambda ps: rsoptim.AdamW(ps, lr=1e-2, amsgrad=True),
    "SGD": lambda ps: rsoptim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    "RMSprop": lambda ps: rsoptim.RMSprop(ps, lr=1e-2, centered=True, momentum=0.5),
}


def test_backend_is_named():
    backend = rsoptim.parallel_backend()
    assert backend == "rayon" or backend.startswith("openmp:")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_openmp_and_rayon_give_the_same_bits(name):
    backend = rsoptim.parallel_backend()
    if not backend.startswith("openmp:"):
        pytest.skip("torch's OpenMP runtime is not available to share here")
    threads = rsoptim.get_num_threads()
    try:
        rsoptim.set_num_threads(2)
        on_openmp = _run(OPTIMIZERS[name])
        assert _rsoptim.use_openmp(None) is False
        assert rsoptim.parallel_backend() == "rayon"
        on_rayon = _run(OPTIMIZERS[name])
    finally:
        _rsoptim.use_openmp(backend.removeprefix("openmp:"))
        rsoptim.set_num_threads(threads)
    assert rsoptim.parallel_backend() == backend
    assert len(on_openmp) == len(on_rayon)
    for a, b in zip(on_openmp, on_rayon):
        assert torch.equal(_bits(a), _bits(b))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.int32 if t.element_size() == 4 else torch.int64)


def test_rsoptim_backend_rayon_keeps_rsoptim_on_its_own_pool():
    code = "import rsoptim; print(rsoptim.parallel_backend())"
    env = {**os.environ, "RSOPTIM_BACKEND": "rayon"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "rayon"


def test_set_num_threads_keeps_the_backend():
    backend = rsoptim.parallel_backend()
    threads = rsoptim.get_num_threads()
    try:
        rsoptim.set_num_threads(1)
        assert rsoptim.parallel_backend() == backend
    finally:
        rsoptim.set_num_threads(threads)


# The child makes no torch op of its own: after the parent has run parallel torch ops, torch's
# OpenMP runtime hangs in a forked child (torch.optim would too); rsoptim's kernels must not.
FORK_SCRIPT = """
import os, sys, numpy as np, torch, rsoptim
p = torch.zeros(1 << 20, requires_grad=True)
opt = rsoptim.SGD([p], lr=0.1)
p.grad = torch.ones_like(p)
opt.step()  # the parent's threads are up
pid = os.fork()
if pid == 0:
    p.grad = torch.from_numpy(np.ones(1 << 20, dtype=np.float32))
    opt.step()  # big enough to go parallel
    os._exit(0 if p.detach().numpy()[0] == np.float32(-0.2) else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("backend", ["rayon", "auto"])
def test_a_forked_child_can_step(backend):
    env = {**os.environ, "RSOPTIM_BACKEND": backend}
    done = subprocess.run([sys.executable, "-c", FORK_SCRIPT], env=env, timeout=120)
    assert done.returncode == 0


def test_thread_count_follows_torch_until_set():
    before_torch = torch.get_num_threads()
    try:
        rsoptim.set_num_threads(None)
        torch.set_num_threads(1)
        w = torch.zeros(4, requires_grad=True)
        w.grad = torch.ones(4)
        rsoptim.SGD([w], lr=0.1).step()
        assert rsoptim.get_num_threads() == 1
        rsoptim.set_num_threads(3)
        torch.set_num_threads(2)
        rsoptim.SGD([w], lr=0.1).step()
        assert rsoptim.get_num_threads() == 3  # set by the user: no longer follows torch
    finally:
        torch.set_num_threads(before_torch)
        rsoptim.set_num_threads(None)
    assert rsoptim.get_num_threads() == before_torch
