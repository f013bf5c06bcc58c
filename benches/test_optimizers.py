"""pytest-benchmark comparisons of rsoptim against torch.optim (not part of the test run).

    .venv/bin/python -m pytest benches/ --benchmark-columns=median,ops --benchmark-group-by=group

Each benchmark times one step of one implementation on one workload from rsoptim.bench; compare
rows of the same group. The bench CLI (`python -m rsoptim.bench`) interleaves implementations
and is the better source for ratios; this file gives the same comparisons in pytest form.
"""

from __future__ import annotations

import pytest
import torch

import rsoptim
from rsoptim.bench import WORKLOADS, make_params

WORKLOAD_NAMES = ["seed-mlp", "400x1000", "flat-64m"]

IMPLEMENTATIONS = {
    "rsoptim.Adam": lambda ps: rsoptim.Adam(ps),
    "torch.Adam for-loop": lambda ps: torch.optim.Adam(ps, foreach=False),
    "torch.Adam foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
    "torch.Adam fused": lambda ps: torch.optim.Adam(ps, fused=True),
    "rsoptim.SGD momentum": lambda ps: rsoptim.SGD(ps, lr=0.01, momentum=0.9),
    "torch.SGD momentum foreach": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=True),
    "rsoptim.RMSprop": lambda ps: rsoptim.RMSprop(ps),
    "torch.RMSprop foreach": lambda ps: torch.optim.RMSprop(ps, foreach=True),
}


@pytest.mark.parametrize("workload", WORKLOAD_NAMES)
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_step(benchmark, workload: str, implementation: str) -> None:
    params = make_params(WORKLOADS[workload]())
    optimizer = IMPLEMENTATIONS[implementation](params)
    optimizer.step()  # state created outside the timing
    benchmark.group = f"step / {workload}"
    benchmark(optimizer.step)


# bfloat16/float16 params: torch's fused kernel is the fast reference (its SGD is broken for half
# params in torch 2.13, so none here); rsoptim's extensions beside its default numerics.
HALF_IMPLEMENTATIONS = {
    "rsoptim.Adam": lambda ps: rsoptim.Adam(ps),
    "rsoptim.Adam float32 state": lambda ps: rsoptim.Adam(ps, state_dtype=torch.float32),
    "rsoptim.Adam master weights": lambda ps: rsoptim.Adam(ps, master_weights=True),
    "rsoptim.Adam stochastic rounding": lambda ps: rsoptim.Adam(ps, stochastic_rounding=True),
    "torch.Adam fused": lambda ps: torch.optim.Adam(ps, fused=True),
    "torch.Adam foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("implementation", list(HALF_IMPLEMENTATIONS))
def test_half_precision_step(benchmark, dtype: torch.dtype, implementation: str) -> None:
    params = make_params(WORKLOADS["flat-64m"](), dtype=dtype)
    optimizer = HALF_IMPLEMENTATIONS[implementation](params)
    optimizer.step()
    benchmark.group = f"step / flat-64m / {str(dtype).split('.')[-1]}"
    benchmark(optimizer.step)


@pytest.mark.parametrize("workload", WORKLOAD_NAMES)
@pytest.mark.parametrize("implementation", ["rsoptim", "torch"])
def test_clip_grad_norm(benchmark, workload: str, implementation: str) -> None:
    params = make_params(WORKLOADS[workload]())
    clip = rsoptim.clip_grad_norm_ if implementation == "rsoptim" else torch.nn.utils.clip_grad_norm_
    benchmark.group = f"clip_grad_norm_ / {workload}"
    benchmark(clip, params, 1e9)
