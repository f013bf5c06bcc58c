"""The rank side of tests/test_distributed.py: real 2-rank gloo runs on CPU.

``python _distributed_workers.py RANK WORLD_SIZE PORT TOPICS OUT_DIR`` joins a gloo process group
on 127.0.0.1:PORT and runs every case of each of the comma-separated TOPICS (see ``TOPICS``) in
order. After each case it writes ``OUT_DIR/rank{RANK}.json`` ("topic/case" -> None, or the
traceback of its failure), so that
a run cut short still reports the cases it finished; ``OUT_DIR/rank{RANK}.running`` names the
case in progress, and ``OUT_DIR/rank{RANK}.fatal`` holds the traceback of anything outside a case.

Every case runs on both ranks in the same order. Cases do their collective work first (steps,
``full_tensor()``, all-gathers) and their comparisons last, so that a failed comparison on one
rank does not leave the other waiting in a collective. References are torch itself
(torch.optim, torch.nn.utils.clip_grad_norm_) at ``torch.testing.assert_close``'s default
tolerances, or, for rsoptim's half-precision extensions (which torch has no equivalent of),
rsoptim on one process with the same grads, bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import json
import os
import sys
import traceback
from array import array
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

TOPICS: dict[str, dict[str, Callable[[dict[str, Any]], None]]] = {}


def case(topic: str, name: str):
    def register(fn):
        TOPICS.setdefault(topic, {})[name] = fn
        return fn

    return register


# The distributed names are imported lazily (and the registry above stays importable) so that
# the test module can list the cases on a torch without torch.distributed, where it skips.
def _dist_imports():
    global DTensor, Shard, Replicate, Partial, distribute_tensor, init_device_mesh, DeviceMesh, fully_shard
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor


# -------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------

OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop")

# Hyperparameter variety, one config per optimizer where a test loops over all four.
ONE_CONFIG = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "Adam": dict(lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "AdamW": dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99)),
    "RMSprop": dict(lr=1e-2, alpha=0.9, centered=True, momentum=0.9, weight_decay=1e-2),
}


def rank() -> int:
    return dist.get_rank()


_MESHES: dict[Any, Any] = {}


def mesh(shape=(2,), names=None):
    """One DeviceMesh per shape for the whole run (made on both ranks in the same order)."""
    key = (shape, names)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return _MESHES[key]


def local(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of the local shard of a DTensor (of the tensor itself otherwise)."""
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.detach().clone()


def full(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of the full value of a DTensor (collective) or of a plain tensor."""
    t = t.full_tensor() if isinstance(t, DTensor) else t
    return t.detach().clone()


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, exact: bool = False) -> None:
    kwargs = dict(rtol=0.0, atol=0.0, equal_nan=True) if exact else {}
    torch.testing.assert_close(actual, expected, msg=lambda m: f"rank {rank()}: {what}: {m}", **kwargs)


def layout(t: Any) -> Any:
    """What a comparison needs of a tensor's kind: None for a plain tensor, else its mesh,
    placements, global shape and dtype."""
    if isinstance(t, DTensor):
        return ("DTensor", t.device_mesh, tuple(t.placements), tuple(t.shape), t.dtype)
    if isinstance(t, torch.Tensor):
        return ("Tensor", None, None, tuple(t.shape), t.dtype)
    return (type(t).__name__, None, None, None, None)


def same_kind(actual: Any, expected: Any, what: str) -> None:
    la, le = layout(actual), layout(expected)
    assert la[0] == le[0], f"rank {rank()}: {what}: rsoptim has a {la[0]}, torch a {le[0]}"
    if la[0] == "DTensor":
        assert la[1] == le[1], f"rank {rank()}: {what}: device mesh {la[1]} != torch's {le[1]}"
        assert la[2] == le[2], f"rank {rank()}: {what}: placements {la[2]} != torch's {le[2]}"
    assert la[3:] == le[3:], f"rank {rank()}: {what}: shape/dtype {la[3:]} != torch's {le[3:]}"


def snapshot_state(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Per param: state key -> (layout, local copy) (no collectives)."""
    out = []
    for p in params:
        st = opt.state.get(p, {})
        out.append({k: (layout(v), local(v) if isinstance(v, torch.Tensor) else v) for k, v in st.items()})
    return out


def compare_state(actual: list[dict], expected: list[dict], what: str, exact: bool = False) -> None:
    assert len(actual) == len(expected)
    for i, (sa, se) in enumerate(zip(actual, expected)):
        assert set(sa) == set(se), f"rank {rank()}: {what}: param {i} state keys {sorted(sa)} != torch's {sorted(se)}"
        for key in se:
            (la, va), (le, ve) = sa[key], se[key]
            name = f"{what}: param {i} state[{key!r}]"
            assert la[0] == le[0], f"rank {rank()}: {name}: rsoptim has a {la[0]}, torch a {le[0]}"
            assert la[1:] == le[1:], f"rank {rank()}: {name}: (mesh, placements, shape, dtype) {la[1:]} != torch's {le[1:]}"
            if isinstance(ve, torch.Tensor):
                close(va, ve, name, exact)
            else:
                assert va == ve, f"rank {rank()}: {name}: {va!r} != {ve!r}"


def optimizer(lib: str, name: str, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    import rsoptim

    cls = getattr(torch.optim if lib == "torch" else rsoptim, name)
    return cls(params, **kwargs)


@contextlib.contextmanager
def kernel_spy():
    """Counts the calls of rsoptim's step kernels and the elements they were given."""
    from rsoptim import _rsoptim

    seen = {"calls": 0, "numel": 0}
    numel_arg = {"adam_step": 2, "rmsprop_step": 2, "sgd_step": 1}
    saved = {name: getattr(_rsoptim, name) for name in numel_arg}

    def spy(name, fn):
        def call(*args, **kwargs):
            seen["calls"] += 1
            numels = args[numel_arg[name]] if len(args) > numel_arg[name] else kwargs.get("numels", b"")
            seen["numel"] += sum(array("Q", bytes(numels)))
            return fn(*args, **kwargs)

        return call

    for name, fn in saved.items():
        setattr(_rsoptim, name, spy(name, fn))
    try:
        yield seen
    finally:
        for name, fn in saved.items():
            setattr(_rsoptim, name, fn)


# -------------------------------------------------------------------------------------------
# a tiny transformer-ish model, sharded by FSDP2
# -------------------------------------------------------------------------------------------

D_IN, D, H = 5, 7, 10


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)  # (7,): shards of 4 and 3
        self.fc1 = nn.Linear(D, H)  # (10, 7): 5 and 5 rows
        self.fc2 = nn.Linear(H, D)  # (7, 10): 4 and 3 rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, head_out: int = 1) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, D)
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(D, head_out)  # head_out=1: (1, 7) and (1,), rank 1's shards are empty

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.tanh(self.inp(x))))


def plain_net(seed: int = 0, dtype: torch.dtype = torch.float32, head_out: int = 1) -> Net:
    torch.manual_seed(seed)
    return Net(head_out).to(dtype)


def fsdp_net(seed: int = 0, dtype: torch.dtype = torch.float32, on=None, placement_fn=None, head_out: int = 1) -> Net:
    """Net with the same init as ``plain_net(seed)``, each block and the root sharded."""
    model = plain_net(seed, dtype, head_out)
    on = on if on is not None else mesh()
    for block in model.blocks:
        fully_shard(block, mesh=on, shard_placement_fn=placement_fn)
    fully_shard(model, mesh=on, shard_placement_fn=placement_fn)
    return model


def batch(step: int, per_rank: bool = True, dtype: torch.dtype = torch.float32, out: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + (rank() if per_rank else 0))
    x = torch.randn(6, D_IN, generator=g)
    y = torch.randn(6, out, generator=g)
    return x.to(dtype), y.to(dtype)


def backward(model: nn.Module, step: int, dtype: torch.dtype | None = None) -> None:
    net = getattr(model, "module", model)  # DDP wraps the Net
    dtype = dtype or net.head.bias.dtype
    x, y = batch(step, dtype=dtype, out=net.head.out_features)
    F.mse_loss(model(x), y).backward()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, after_backward=None) -> None:
    for step in steps:
        opt.zero_grad()
        backward(model, step)
        if after_backward is not None:
            after_backward(model, step)
        opt.step()


# -------------------------------------------------------------------------------------------
# topic "fsdp": FSDP2 training with rsoptim equals FSDP2 with torch.optim
# -------------------------------------------------------------------------------------------

FSDP_CONFIGS = {
    "SGD": ("SGD", dict(lr=0.1)),
    "SGD-momentum-nesterov-wd": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "SGD-dampening-maximize": ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3, maximize=True)),
    "Adam": ("Adam", dict(lr=1e-2)),
    "Adam-amsgrad-wd-maximize": ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), amsgrad=True, weight_decay=1e-2, maximize=True)),
    "AdamW": ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    "AdamW-amsgrad-eps": ("AdamW", dict(lr=2e-2, amsgrad=True, eps=1e-6)),
    "RMSprop": ("RMSprop", dict(lr=1e-2)),
    "RMSprop-centered-momentum-wd": ("RMSprop", dict(lr=1e-2, alpha=0.9, centered=True, momentum=0.9, weight_decay=1e-2)),
    "RMSprop-momentum-maximize": ("RMSprop", dict(lr=1e-3, momentum=0.5, maximize=True)),
}
FSDP_STEPS = 4


def fsdp_parity(name: str, kwargs: dict, *, groups=None, placement_fn=None, after_backward=None, steps=FSDP_STEPS, what=""):
    """Trains two FSDP2 copies of Net, one with torch.optim.NAME, one with rsoptim.NAME, and
    compares the local shards of the params after every step, and the state at the end."""
    runs = {}
    for lib in ("torch", "rsoptim"):
        model = fsdp_net(placement_fn=placement_fn)
        params = groups(model) if groups is not None else model.parameters()
        opt = optimizer(lib, name, params, **kwargs)
        history = []
        for step in range(steps):
            train(model, opt, range(step, step + 1), after_backward)
            history.append([local(p) for p in model.parameters()])
        plist = list(model.parameters())
        runs[lib] = (history, [layout(p) for p in plist], snapshot_state(opt, plist))
    compare_runs(runs, what)


def compare_runs(runs: dict, what: str) -> None:
    """rsoptim's run against torch's: (local shards after each step, layouts, state) alike."""
    (th, tl, ts), (rh, rl, rs) = runs["torch"], runs["rsoptim"]
    assert rl == tl, f"rank {rank()}: {what}: params' layouts {rl} != torch's {tl}"
    for step, (t, r) in enumerate(zip(th, rh)):
        for i, (a, e) in enumerate(zip(r, t)):
            close(a, e, f"{what}: param {i} (local shard) after step {step + 1}")
    compare_state(rs, ts, what)


def _register_fsdp_configs():
    for label, (name, kwargs) in FSDP_CONFIGS.items():

        def run(ctx, name=name, kwargs=kwargs, label=label):
            fsdp_parity(name, kwargs, what=f"FSDP2 {label}")

        case("fsdp", label)(run)


_register_fsdp_configs()


@case("fsdp", "Adam-param-groups-grad-None")
def _fsdp_groups(ctx):
    """Two param groups with their own hyperparameters; the head's bias has no grad at step 2
    (so it gets one step less, and its own step count)."""

    def groups(model):
        blocks = list(model.blocks.parameters())
        ids = {id(p) for p in blocks}
        return [
            {"params": blocks, "lr": 2e-2, "betas": (0.85, 0.98)},
            {"params": [p for p in model.parameters() if id(p) not in ids]},
        ]

    def drop(model, step):
        if step == 1:
            model.head.bias.grad = None

    fsdp_parity("Adam", dict(lr=1e-2, weight_decay=1e-3), groups=groups, after_backward=drop, what="FSDP2 Adam groups")


@case("fsdp", "all-optimizers-Shard(1)")
def _fsdp_shard1(ctx):
    """FSDP2 sharding 2-D params on dim 1 (local shards that are not row blocks)."""

    def placement(p):
        # FSDP2 refuses uneven shards on dims other than 0: fc2's (7, 10) weights only.
        return Shard(1) if p.ndim == 2 and p.shape[1] % 2 == 0 else Shard(0)

    for name in OPTIMIZERS:
        fsdp_parity(name, ONE_CONFIG[name], placement_fn=placement, what=f"FSDP2 Shard(1) {name}")


@case("fsdp", "max_grad_norm-clipping-in-the-step")
def _fsdp_clip_in_step(ctx):
    """rsoptim's max_grad_norm (clipping inside the step, across ranks for DTensor grads) equals
    torch.nn.utils.clip_grad_norm_ then torch.optim's step; last_grad_norm is the total that
    clip_grad_norm_ returns; the grads are left as they were."""
    records = []
    for name in OPTIMIZERS:
        for norm_type in (2.0, 1.0, float("inf")):
            runs = {}
            for lib in ("torch", "rsoptim"):
                model = fsdp_net(head_out=2)  # no empty shard: torch's inf norm refuses them
                extra = dict(max_grad_norm=0.05, norm_type=norm_type) if lib == "rsoptim" else {}
                opt = optimizer(lib, name, model.parameters(), **ONE_CONFIG[name], **extra)
                history, norms, untouched = [], [], []
                for step in range(3):
                    opt.zero_grad()
                    backward(model, step)
                    if lib == "torch":
                        norms.append(full(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, norm_type=norm_type)))
                        opt.step()
                    else:
                        grads = [local(p.grad) for p in model.parameters()]
                        opt.step()
                        norms.append(full(opt.last_grad_norm))
                        untouched.append(all(torch.equal(local(p.grad), g) for p, g in zip(model.parameters(), grads)))
                    history.append([local(p) for p in model.parameters()])
                runs[lib] = (history, norms, untouched)
            records.append((f"{name} norm_type={norm_type}", runs))
    for label, runs in records:
        (th, tn, _), (rh, rn, ru) = runs["torch"], runs["rsoptim"]
        assert all(float(n) > 0.05 for n in tn), f"{label}: torch's norms {tn} do not clip at 0.05"
        assert all(ru), f"rank {rank()}: {label}: the step changed the grads"
        for step, (a, e) in enumerate(zip(rn, tn)):
            close(a, e, f"{label}: last_grad_norm at step {step + 1} vs clip_grad_norm_'s total")
        for step, (r, t) in enumerate(zip(rh, th)):
            for i, (a, e) in enumerate(zip(r, t)):
                close(a, e, f"{label}: param {i} (local shard) after step {step + 1}")


@case("fsdp", "kernels-step-the-local-shards")
def _fsdp_kernels(ctx):
    """rsoptim's Rust kernels get every element of the local shards (not torch's DTensor ops)."""
    failures = []
    for name in OPTIMIZERS:
        model = fsdp_net()
        opt = optimizer("rsoptim", name, model.parameters(), **ONE_CONFIG[name])
        expected = 0
        with kernel_spy() as seen:
            for step in range(3):
                opt.zero_grad()
                backward(model, step)
                expected += sum(p.to_local().numel() for p in model.parameters())
                opt.step()
        if seen["numel"] != expected:
            failures.append(f"{name}: kernels stepped {seen['numel']} elements in {seen['calls']} calls, expected {expected}")
    assert not failures, f"rank {rank()}: " + "; ".join(failures)


# -------------------------------------------------------------------------------------------
# topic "dtensor": distribute_tensor params of any placement, mixed with plain tensors
# -------------------------------------------------------------------------------------------


def dtensor_params(gen: torch.Generator) -> list[tuple[torch.Tensor, Any, Any]]:
    """(value, mesh, placements) of params of several layouts; None mesh: a plain tensor."""
    mesh2 = mesh((1, 2))
    return [
        (torch.randn(6, 4, generator=gen), mesh(), [Shard(0)]),
        (torch.randn(5, 3, generator=gen), mesh(), [Shard(1)]),  # uneven: 2 and 1 columns
        (torch.randn(9, generator=gen), mesh(), [Replicate()]),
        (torch.randn(1, 3, generator=gen), mesh(), [Shard(0)]),  # rank 1's shard is empty
        (torch.randn(3, 4, generator=gen), mesh2, [Replicate(), Shard(0)]),  # 2-D mesh
        (torch.randn(4, 2, generator=gen), mesh2, [Shard(1), Replicate()]),
    ]


def make_params(spec, dtype=torch.float32) -> list[torch.Tensor]:
    out = []
    for value, on, placements in spec:
        value = value.clone().to(dtype)  # distribute_tensor keeps Replicate inputs' storage
        t = value if on is None else distribute_tensor(value, on, placements)
        out.append(nn.Parameter(t))
    return out


def grads_for(params: list[torch.Tensor], step: int, grad_placements=None) -> list[torch.Tensor]:
    """The same full grads on every rank (each rank derives them from the step), laid out like
    their params, or in ``grad_placements[i]`` where given."""
    g = torch.Generator().manual_seed(500 + step)
    out = []
    for i, p in enumerate(params):
        value = torch.randn(p.shape, generator=g).to(p.dtype)
        if isinstance(p, DTensor):
            placements = (grad_placements or {}).get(i, p.placements)
            value = distribute_tensor(value, p.device_mesh, placements)
        out.append(value)
    return out


def dtensor_parity(name: str, kwargs: dict, spec_fn, steps: int = 3, grad_placements=None, groups_of=None, what=""):
    runs = {}
    for lib in ("torch", "rsoptim"):
        params = make_params(spec_fn(torch.Generator().manual_seed(7)))
        opt = optimizer(lib, name, groups_of(params) if groups_of else params, **kwargs)
        history = []
        for step in range(steps):
            for p, g in zip(params, grads_for(params, step, grad_placements)):
                p.grad = g
            opt.step()
            history.append([local(p) for p in params])
        runs[lib] = (history, [layout(p) for p in params], snapshot_state(opt, params))
    compare_runs(runs, what)


@case("dtensor", "placements-all-optimizers")
def _dtensor_placements(ctx):
    for name in OPTIMIZERS:
        dtensor_parity(name, ONE_CONFIG[name], dtensor_params, what=f"distribute_tensor {name}")


@case("dtensor", "Replicate-grad-for-Shard-param")
def _dtensor_redistributed(ctx):
    """Grads in another (non-Partial) placement than their params are redistributed, as torch's
    DTensor ops do: a Replicate grad for a Shard(0) param, a Shard(0) grad for a Replicate one."""

    def spec(gen):
        return [
            (torch.randn(6, 4, generator=gen), mesh(), [Shard(0)]),
            (torch.randn(5, generator=gen), mesh(), [Replicate()]),
            (torch.randn(4, 3, generator=gen), mesh(), [Shard(1)]),
        ]

    grad_placements = {0: [Replicate()], 1: [Shard(0)], 2: [Shard(0)]}
    for name in OPTIMIZERS:
        dtensor_parity(name, ONE_CONFIG[name], spec, grad_placements=grad_placements, what=f"redistributed grads {name}")


@case("dtensor", "mixed-dtensor-and-plain-params")
def _dtensor_mixed(ctx):
    def spec(gen):
        return [
            (torch.randn(6, 4, generator=gen), mesh(), [Shard(0)]),
            (torch.randn(3, 3, generator=gen), None, None),
            (torch.randn(5, generator=gen), mesh(), [Replicate()]),
            (torch.randn(2, 5, generator=gen), None, None),
        ]

    def groups_of(params):
        return [{"params": params[:3]}, {"params": params[3:], "lr": 3e-3}]

    for name in OPTIMIZERS:
        dtensor_parity(name, ONE_CONFIG[name], spec, groups_of=groups_of, what=f"mixed {name}")
        dtensor_parity(name, ONE_CONFIG[name], spec, what=f"mixed, one group, {name}")


# -------------------------------------------------------------------------------------------
# topic "errors": Partial grads and grads on another mesh
# -------------------------------------------------------------------------------------------


def _bad_grad_case(name: str, bad_grad, expect: str, where: str, fresh: bool) -> str | None:
    """rsoptim.NAME over a Shard(0) param and a Replicate one (``where``: the Replicate one bad
    and "last" or "first" in one group, or the Shard(0) one bad, in the "second group"): one good
    step (unless ``fresh``), then a step
    where the bad param's grad is ``bad_grad(param)``: expects a RuntimeError whose message
    contains ``expect``, and every param and state as before."""
    gen = torch.Generator().manual_seed(3)
    spec = [(torch.randn(6, 4, generator=gen), mesh(), [Shard(0)]), (torch.randn(4, 3, generator=gen), mesh(), [Replicate()])]
    if where in ("first", "second group"):
        spec = spec[::-1]
    params = make_params(spec)
    bad = 0 if where == "first" else 1
    groups = [{"params": params[:1]}, {"params": params[1:]}] if where == "second group" else params
    opt = optimizer("rsoptim", name, groups, **ONE_CONFIG[name])
    if not fresh:
        for p, g in zip(params, grads_for(params, 0)):
            p.grad = g
        opt.step()
    grads = grads_for(params, 1)
    grads[bad] = bad_grad(params[bad])
    for p, g in zip(params, grads):
        p.grad = g
    before_params = [local(p) for p in params]
    before_state = snapshot_state(opt, params)
    label = f"{name}, bad param {where}, {'fresh optimizer' if fresh else 'after one step'}"
    try:
        opt.step()
    except RuntimeError as e:
        if expect not in str(e):
            return f"{label}: RuntimeError without {expect!r} in its message: {e}"
    except Exception as e:  # noqa: BLE001
        return f"{label}: {type(e).__name__} instead of RuntimeError: {e}"
    else:
        return f"{label}: no error"
    for i, (p, b) in enumerate(zip(params, before_params)):
        if not torch.equal(local(p), b):
            return f"{label}: param {i} changed by the refused step"
    after_state = snapshot_state(opt, params)
    try:
        compare_state(after_state, before_state, f"{label}: state after the refused step", exact=True)
    except AssertionError as e:
        return str(e)
    return None


def _bad_grads(kind: str):
    def partial_grad(p):
        # Each rank holds a full-shape addend: the grad's value is their sum.
        return DTensor.from_local(torch.full(p.shape, 1.0 + rank()), p.device_mesh, [Partial()])

    def other_mesh_grad(p):
        # A mesh with the ranks in the other order: a different DeviceMesh (and different
        # elements on each rank for a Shard placement).
        other = ctx_meshes["reversed"]
        return distribute_tensor(torch.ones(p.shape), other, p.placements)

    def mesh_2d_grad(p):
        return distribute_tensor(torch.ones(p.shape), mesh((1, 2)), [Replicate(), *p.placements])

    return {"Partial": partial_grad, "other-mesh": other_mesh_grad, "2-D-mesh": mesh_2d_grad}[kind]


ctx_meshes: dict[str, Any] = {}


def _errors(kind: str, expect: str) -> None:
    if "reversed" not in ctx_meshes:
        ctx_meshes["reversed"] = DeviceMesh("cpu", torch.tensor([1, 0]))
    failures = []
    for name in OPTIMIZERS:
        for where in ("last", "first", "second group"):
            for fresh in (False, True):
                failure = _bad_grad_case(name, _bad_grads(kind), expect, where, fresh)
                if failure:
                    failures.append(failure)
    assert not failures, f"rank {rank()}: {len(failures)} failures:\n" + "\n".join(failures)


@case("errors", "Partial-grad")
def _errors_partial(ctx):
    _errors("Partial", "Partial")


@case("errors", "grad-on-other-mesh")
def _errors_mesh(ctx):
    _errors("other-mesh", "mesh")


@case("errors", "grad-on-2-D-mesh")
def _errors_mesh2d(ctx):
    _errors("2-D-mesh", "mesh")


# -------------------------------------------------------------------------------------------
# topic "clip": clip_grad_norm_ / get_total_norm over DTensor grads
# -------------------------------------------------------------------------------------------

NORM_TYPES = (1.0, 2.0, float("inf"), 3.0)


def _any_empty_shard(tensors: list[torch.Tensor]) -> bool:
    """Whether any rank holds an empty local shard of one of ``tensors`` (collective)."""
    flag = torch.tensor([int(any(local(t).numel() == 0 for t in tensors))])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _reference_clip(params, originals, full_grads, max_norm: float | None, norm_type: float, total=None):
    """torch's clip_grad_norm_ (or clip_grads_with_norm_ with ``total``) computed from the full
    grads, for the one case torch cannot run: the inf norm where a rank's shard is empty (its
    _foreach_norm refuses empty tensors for inf, on that rank only, and the other rank hangs)."""
    if total is None:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type) for g in full_grads]), norm_type)
    grads = originals
    if max_norm is not None:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        grads = [g * coef for g in originals]
    on = params[0].grad.device_mesh
    return ("DTensor", on, (Replicate(),) * on.ndim, (), total.dtype), total, grads, [layout(p.grad) for p in params]


def _clip_compare(params: list[torch.Tensor], what: str, norm_types=NORM_TYPES) -> None:
    """rsoptim's clip_grad_norm_, get_total_norm and clip_grads_with_norm_ against torch's, on
    the same DTensor grads (each run starts from a copy of the original grads)."""
    import rsoptim

    originals = [local(p.grad) for p in params]
    full_grads = [full(p.grad) for p in params]
    any_empty = _any_empty_shard([p.grad for p in params])

    def reset():
        for p, g in zip(params, originals):
            p.grad.to_local().copy_(g)

    reset()
    grads_total = float(full(torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)))
    records = {}
    for norm_type in norm_types:
        torch_can = not (norm_type == float("inf") and any_empty)
        for max_norm_factor in (0.3, 10.0):  # clipping, and not
            max_norm = grads_total * max_norm_factor
            for lib in ("torch", "rsoptim"):
                reset()
                key = (norm_type, max_norm_factor, lib, "clip")
                if lib == "torch" and not torch_can:
                    records[key] = _reference_clip(params, originals, full_grads, max_norm, norm_type)
                    continue
                clip = torch.nn.utils.clip_grad_norm_ if lib == "torch" else rsoptim.clip_grad_norm_
                total = clip(params, max_norm, norm_type=norm_type)
                records[key] = (layout(total), full(total), [local(p.grad) for p in params], [layout(p.grad) for p in params])
        for lib in ("torch", "rsoptim"):
            reset()
            if lib == "torch" and not torch_can:
                lay, total, _, _ = _reference_clip(params, originals, full_grads, None, norm_type)
                records[(norm_type, None, lib, "get_total_norm")] = (lay, total, None, None)
                ref = _reference_clip(params, originals, full_grads, grads_total * 0.3, norm_type, total)
                records[(norm_type, None, lib, "clip_grads_with_norm_")] = (None, None, ref[2], ref[3])
                continue
            mod = torch.nn.utils if lib == "torch" else rsoptim
            total = mod.get_total_norm([p.grad for p in params], norm_type)
            records[(norm_type, None, lib, "get_total_norm")] = (layout(total), full(total), None, None)
            mod.clip_grads_with_norm_(params, grads_total * 0.3, total)
            records[(norm_type, None, lib, "clip_grads_with_norm_")] = (None, None, [local(p.grad) for p in params], [layout(p.grad) for p in params])
    reset()
    # comparisons only from here
    for (norm_type, factor, lib, fn), (lay, value, grads, grad_layouts) in records.items():
        if lib != "rsoptim":
            continue
        tlay, tvalue, tgrads, tgrad_layouts = records[(norm_type, factor, "torch", fn)]
        label = f"{what}: {fn}, norm_type={norm_type}" + (f", max_norm=total*{factor}" if factor else "")
        if value is not None:
            assert lay[0] == "DTensor", f"rank {rank()}: {label}: returned a {lay[0]}, torch a DTensor ({tlay[2]})"
            # torch returns Replicate(), but Partial(max) for the inf norm: either is accepted
            # where its full value is torch's.
            assert lay[2] in (tlay[2], (Replicate(),) * len(tlay[2])), f"rank {rank()}: {label}: placements {lay[2]}, torch's {tlay[2]}"
            assert lay[1] == tlay[1], f"rank {rank()}: {label}: mesh {lay[1]} != torch's {tlay[1]}"
            assert lay[3:] == tlay[3:], f"rank {rank()}: {label}: shape/dtype {lay[3:]} != torch's {tlay[3:]}"
            close(value, tvalue, f"{label}: total norm")
        if grads is not None:
            assert grad_layouts == tgrad_layouts, f"rank {rank()}: {label}: grads' layouts {grad_layouts} != torch's {tgrad_layouts}"
            for i, (a, e) in enumerate(zip(grads, tgrads)):
                close(a, e, f"{label}: grad {i} (local shard)")
    # the clipping runs clip (else the comparisons above could not tell torch's scale from none)
    for norm_type in norm_types:
        _, _, clipped, _ = records[(norm_type, 0.3, "torch", "clip")]
        assert any(not torch.equal(c, o) for c, o in zip(clipped, originals) if c.numel()), f"{what}: norm_type={norm_type}: no clipping"


# torch cannot take the inf norm of DTensor grads where a rank's local shard is empty (its
# _foreach_norm refuses empty tensors for inf, on that rank only, and the other rank then waits
# in a collective until gloo's timeout): the cases that compare with torch have no empty shard;
# the last case checks rsoptim there against the norm of the full grads.


@case("clip", "fsdp-grads")
def _clip_fsdp(ctx):
    model = fsdp_net(head_out=2)
    backward(model, 0)
    _clip_compare(list(model.parameters()), "FSDP2 grads")


@case("clip", "distribute_tensor-grads")
def _clip_dtensor(ctx):
    # One mesh only: torch stacks the per-tensor norms, which needs them on one mesh.
    def spec(gen):
        return [
            (torch.randn(6, 4, generator=gen), mesh(), [Shard(0)]),
            (torch.randn(5, 3, generator=gen), mesh(), [Shard(1)]),
            (torch.randn(9, generator=gen), mesh(), [Replicate()]),
            (torch.randn(3, 3, generator=gen), mesh(), [Shard(0)]),
        ]

    params = make_params(spec(torch.Generator().manual_seed(11)))
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    _clip_compare(params, "distribute_tensor grads")


def _clip_nonfinite_outcomes(head_out: int, libs=("torch", "rsoptim"), norm_types=NORM_TYPES):
    import rsoptim

    outcomes = {}
    for bad in (float("inf"), float("nan")):
        for norm_type in norm_types:
            for lib in libs:
                model = fsdp_net(head_out=head_out)
                backward(model, 0)
                params = list(model.parameters())
                if rank() == 1:
                    params[0].grad.to_local().view(-1)[3] = bad
                before = [local(p.grad) for p in params]
                clip = torch.nn.utils.clip_grad_norm_ if lib == "torch" else rsoptim.clip_grad_norm_
                try:
                    clip(params, 1e-3, norm_type=norm_type, error_if_nonfinite=True)
                    error = None
                except RuntimeError as e:
                    error = str(e)
                untouched = all(close_or_nan(local(p.grad), b) for p, b in zip(params, before))
                outcomes[(bad, norm_type, lib)] = (error, untouched)
    return outcomes


def _nonfinite_failures(outcomes) -> list[str]:
    failures = []
    for (bad, norm_type, lib), (error, untouched) in outcomes.items():
        if lib != "rsoptim":
            continue
        terror = outcomes.get((bad, norm_type, "torch"), ("(torch not run)", True))[0]
        label = f"value {bad} on rank 1, norm_type={norm_type}"
        if bad != bad and norm_type == float("inf"):
            pass  # see the case "inf-norm-NaN-on-rank-1"
        elif terror is None:
            failures.append(f"{label}: torch did not raise (test assumption)")
        elif error is None:
            failures.append(f"{label}: rsoptim did not raise; torch: {terror}")
        elif "non-finite" not in error:
            failures.append(f"{label}: rsoptim's message {error!r}")
        elif not untouched:
            failures.append(f"{label}: grads changed")
    return failures


@case("clip", "error_if_nonfinite")
def _clip_nonfinite(ctx):
    """A non-finite value in rank 1's shard only: every rank raises (the norm is global), as
    torch does, and no grad is scaled."""
    failures = _nonfinite_failures(_clip_nonfinite_outcomes(head_out=2))
    assert not failures, f"rank {rank()}: " + "\n".join(failures)


@case("clip", "inf-norm-NaN-on-rank-1")
def _clip_inf_nan(ctx):
    """A NaN in rank 1's shard: the inf norm of the grads is NaN, as on one process, so
    error_if_nonfinite=True raises. (torch's DTensor inf norm is a Partial(max) reduced by gloo's
    MAX, which drops a NaN that comes from rank 1: torch returns a finite norm and clips, leaving
    the NaN in.)"""
    import rsoptim

    records = []
    for fn in ("get_total_norm", "clip_grad_norm_"):
        model = fsdp_net(head_out=2)
        backward(model, 0)
        params = list(model.parameters())
        if rank() == 1:
            params[0].grad.to_local().view(-1)[3] = float("nan")
        try:
            if fn == "get_total_norm":
                total = full(rsoptim.get_total_norm([p.grad for p in params], float("inf")))
            else:
                total = full(rsoptim.clip_grad_norm_(params, 1e-3, norm_type=float("inf"), error_if_nonfinite=True))
            records.append((fn, total, None))
        except RuntimeError as e:
            records.append((fn, None, str(e)))
    failures = []
    for fn, total, error in records:
        if fn == "get_total_norm" and (total is None or not total.isnan()):
            failures.append(f"get_total_norm(inf) = {total if total is not None else error}, the full grads' inf norm is nan")
        if fn == "clip_grad_norm_" and (error is None or "non-finite" not in error):
            failures.append(f"clip_grad_norm_(inf, error_if_nonfinite=True) returned {total} instead of raising")
    assert not failures, f"rank {rank()}: " + "; ".join(failures)


@case("clip", "inf-norm-with-empty-local-shards")
def _clip_inf_empty(ctx):
    """FSDP2 grads where rank 1 holds empty shards (Net's (1, 7) head): rsoptim's inf norm (and
    clipping by it, and error_if_nonfinite) against the full grads' (torch raises on rank 1)."""
    model = fsdp_net()
    backward(model, 0)
    params = list(model.parameters())
    assert _any_empty_shard([p.grad for p in params])
    _clip_compare(params, "FSDP2 grads with empty shards", norm_types=(float("inf"),))
    failures = _nonfinite_failures(_clip_nonfinite_outcomes(head_out=1, libs=("rsoptim",), norm_types=(float("inf"),)))
    assert not failures, f"rank {rank()}: " + "\n".join(failures)


def close_or_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


# -------------------------------------------------------------------------------------------
# topic "checkpoint": DCP mid-run checkpoints, across rsoptim and torch.optim
# -------------------------------------------------------------------------------------------

CKPT_STEPS, CKPT_AT = 6, 3


def _ckpt_run(lib: str, name: str, kwargs: dict, *, save: str | None = None, load: str | None = None, dtype=torch.float32):
    """FSDP2 Net with LIB's optimizer: steps 0..CKPT_STEPS-1, saving a DCP checkpoint after
    step CKPT_AT (``save``), or loading ``load`` into a fresh model (another init) and optimizer
    and running the steps after CKPT_AT. Returns the local shards of the params at the end, and
    the optimizer state at the end."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = fsdp_net(seed=0 if load is None else 123, dtype=dtype)
    opt = optimizer(lib, name, model.parameters(), **kwargs)
    start = 0
    if load is not None:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=load)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = CKPT_AT
    for step in range(start, CKPT_STEPS):
        train(model, opt, range(step, step + 1))
        if save is not None and step + 1 == CKPT_AT:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=save)
    plist = list(model.parameters())
    return [local(p) for p in plist], snapshot_state(opt, plist)


def _checkpoint_case(ctx, name: str) -> None:
    kwargs = ONE_CONFIG[name]
    root = Path(ctx["out_dir"]) / f"ckpt-{name}"
    r_ckpt, t_ckpt = str(root / "rsoptim"), str(root / "torch")
    r_params, r_state = _ckpt_run("rsoptim", name, kwargs, save=r_ckpt)  # uninterrupted, checkpointed
    rr_params, rr_state = _ckpt_run("rsoptim", name, kwargs, load=r_ckpt)  # rsoptim resumed
    rt_params, rt_state = _ckpt_run("torch", name, kwargs, load=r_ckpt)  # torch.optim resumed
    t_params, t_state = _ckpt_run("torch", name, kwargs, save=t_ckpt)
    tr_params, tr_state = _ckpt_run("rsoptim", name, kwargs, load=t_ckpt)  # rsoptim from torch's
    for i, (a, e) in enumerate(zip(rr_params, r_params)):
        close(a, e, f"{name}: param {i}, rsoptim resumed from its checkpoint vs uninterrupted")
    compare_state(rr_state, r_state, f"{name}: state, rsoptim resumed vs uninterrupted")
    for i, (a, e) in enumerate(zip(r_params, rt_params)):
        close(a, e, f"{name}: param {i}, rsoptim uninterrupted vs torch.optim resumed from rsoptim's checkpoint")
    compare_state(rr_state, rt_state, f"{name}: state, rsoptim resumed vs torch.optim resumed")
    for i, (a, e) in enumerate(zip(tr_params, t_params)):
        close(a, e, f"{name}: param {i}, rsoptim resumed from torch.optim's checkpoint vs torch uninterrupted")
    compare_state(tr_state, t_state, f"{name}: state, rsoptim from torch's checkpoint vs torch uninterrupted")


for _name in OPTIMIZERS:
    case("checkpoint", f"dcp-resume-{_name}")(lambda ctx, _name=_name: _checkpoint_case(ctx, _name))


@case("checkpoint", "dcp-resume-bf16-extensions")
def _checkpoint_bf16(ctx):
    """bfloat16 FSDP2 params with rsoptim's extensions (master copies, float32 state, stochastic
    rounding with a seed): resuming from a mid-run DCP checkpoint gives the uninterrupted run's
    params and state bit for bit."""
    configs = {
        "AdamW-master-stochastic": ("AdamW", dict(lr=1e-3, master_weights=True, stochastic_rounding=True, stochastic_rounding_seed=5)),
        "Adam-state_dtype": ("Adam", dict(lr=1e-3, state_dtype=torch.float32)),
        "SGD-momentum-master": ("SGD", dict(lr=1e-2, momentum=0.9, master_weights=True)),
    }
    results = []
    for label, (name, kwargs) in configs.items():
        ckpt = str(Path(ctx["out_dir"]) / f"ckpt-bf16-{label}")
        params, state = _ckpt_run("rsoptim", name, kwargs, save=ckpt, dtype=torch.bfloat16)
        resumed, resumed_state = _ckpt_run("rsoptim", name, kwargs, load=ckpt, dtype=torch.bfloat16)
        results.append((label, params, state, resumed, resumed_state))
    for label, params, state, resumed, resumed_state in results:
        for i, (a, e) in enumerate(zip(resumed, params)):
            close(a, e, f"{label}: param {i}, resumed vs uninterrupted", exact=True)
        compare_state(resumed_state, state, f"{label}: state, resumed vs uninterrupted", exact=True)
        assert any(k == "master_param" for s in state for k in s) == ("master" in label), f"{label}: master copies {'missing' if 'master' in label else 'unexpected'}"


@case("checkpoint", "optimizer-state-dict-like-torch")
def _state_dicts(ctx):
    """get_optimizer_state_dict of rsoptim and torch.optim after two FSDP2 steps: same keys,
    groups and tensor kinds (sharded DTensors; full tensors with full_state_dict=True), values
    at torch's tolerances; and set_optimizer_state_dict of torch's dict into rsoptim continues
    like torch."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

    def flat(d, prefix=""):
        out = {}
        if isinstance(d, dict):
            for k, v in d.items():
                out.update(flat(v, f"{prefix}/{k}"))
        elif isinstance(d, (list, tuple)) and not all(isinstance(x, (int, float, str, bool)) for x in d):
            for i, v in enumerate(d):
                out.update(flat(v, f"{prefix}[{i}]"))
        else:
            out[prefix] = d
        return out

    records = {}
    for name in OPTIMIZERS:
        for lib in ("torch", "rsoptim"):
            model = fsdp_net()
            opt = optimizer(lib, name, model.parameters(), **ONE_CONFIG[name])
            train(model, opt, range(2))
            for opts in ("sharded", "full"):
                options = StateDictOptions(full_state_dict=True, cpu_offload=True) if opts == "full" else None
                sd = flat(get_optimizer_state_dict(model, opt, options=options))
                records[(name, lib, opts)] = {k: (layout(v), local(v)) if isinstance(v, torch.Tensor) else (None, v) for k, v in sd.items()}
        # torch's (sharded) state dict set into a fresh rsoptim, then two more steps each
        tmodel, rmodel = fsdp_net(), fsdp_net()
        topt = optimizer("torch", name, tmodel.parameters(), **ONE_CONFIG[name])
        train(tmodel, topt, range(2))
        rmodel.load_state_dict(tmodel.state_dict())
        ropt = optimizer("rsoptim", name, rmodel.parameters(), **ONE_CONFIG[name])
        # A deep copy: load_state_dict keeps (aliases) the given tensors where their dtype and
        # device fit, and torch's optimizer goes on updating its own.
        set_optimizer_state_dict(rmodel, ropt, copy.deepcopy(get_optimizer_state_dict(tmodel, topt)))
        train(tmodel, topt, range(2, 4))
        train(rmodel, ropt, range(2, 4))
        records[(name, "continued")] = ([local(p) for p in rmodel.parameters()], [local(p) for p in tmodel.parameters()])
    for name in OPTIMIZERS:
        for opts in ("sharded", "full"):
            r, t = records[(name, "rsoptim", opts)], records[(name, "torch", opts)]
            what = f"{name} {opts} optimizer state dict"
            assert sorted(r) == sorted(t), f"rank {rank()}: {what}: keys {sorted(set(r) ^ set(t))} differ"
            for k in t:
                (la, va), (le, ve) = r[k], t[k]
                assert la == le, f"rank {rank()}: {what}[{k}]: {la} != torch's {le}"
                if isinstance(ve, torch.Tensor):
                    close(va, ve, f"{what}[{k}]")
                else:
                    assert va == ve, f"rank {rank()}: {what}[{k}]: {va!r} != torch's {ve!r}"
        r, t = records[(name, "continued")]
        for i, (a, e) in enumerate(zip(r, t)):
            close(a, e, f"{name}: param {i} two steps after set_optimizer_state_dict(torch's dict)")


# -------------------------------------------------------------------------------------------
# topic "ddp": DistributedDataParallel and ZeroRedundancyOptimizer
# -------------------------------------------------------------------------------------------


def _ddp_run(lib: str, name: str, kwargs: dict, *, zero: bool = False, bucket_views: bool = False, steps: int = 4):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(plain_net(), gradient_as_bucket_view=bucket_views)
    if zero:
        import rsoptim

        cls = getattr(torch.optim if lib == "torch" else rsoptim, name)
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, parameters_as_bucket_view=bucket_views, **kwargs)
    else:
        opt = optimizer(lib, name, model.parameters(), **kwargs)
    history = []
    for step in range(steps):
        train(model, opt, range(step, step + 1))
        history.append([local(p) for p in model.parameters()])
    consolidated = None
    if zero:
        opt.consolidate_state_dict(to=0)
        if rank() == 0:
            consolidated = opt.state_dict()
    return history, consolidated


def _ddp_compare(name, kwargs, what, **run):
    th, tsd = _ddp_run("torch", name, kwargs, **run)
    rh, rsd = _ddp_run("rsoptim", name, kwargs, **run)
    for step, (t, r) in enumerate(zip(th, rh)):
        for i, (a, e) in enumerate(zip(r, t)):
            close(a, e, f"{what}: param {i} after step {step + 1}")
    if tsd is not None:
        assert rsd is not None
        assert sorted(rsd["state"]) == sorted(tsd["state"]), f"{what}: consolidated state's params differ"
        for k, st in tsd["state"].items():
            assert sorted(rsd["state"][k]) == sorted(st), f"{what}: consolidated state {k} keys differ"
            for key, v in st.items():
                close(rsd["state"][k][key], v, f"{what}: consolidated state[{k}][{key!r}]")


for _name in OPTIMIZERS:
    case("ddp", f"DDP-{_name}")(lambda ctx, _name=_name: _ddp_compare(_name, ONE_CONFIG[_name], f"DDP {_name}"))
case("ddp", "DDP-SGD-grads-as-bucket-views")(
    lambda ctx: _ddp_compare("SGD", dict(lr=0.05, momentum=0.9), "DDP SGD bucket views", bucket_views=True)
)
case("ddp", "ZeRO-AdamW")(
    lambda ctx: _ddp_compare("AdamW", dict(lr=1e-2, weight_decay=0.1), "ZeroRedundancyOptimizer(AdamW)", zero=True)
)
case("ddp", "ZeRO-AdamW-bucket-views")(
    lambda ctx: _ddp_compare(
        "AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True), "ZeroRedundancyOptimizer(AdamW) bucket views", zero=True, bucket_views=True
    )
)


# -------------------------------------------------------------------------------------------
# topic "bf16": bfloat16 DTensor params and rsoptim's half-precision extensions
# -------------------------------------------------------------------------------------------

BF16_CONFIGS = {
    "AdamW": ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    "AdamW-master_weights": ("AdamW", dict(lr=1e-3, master_weights=True)),
    "Adam-amsgrad-state_dtype": ("Adam", dict(lr=1e-3, amsgrad=True, state_dtype=torch.float32)),
    "SGD-momentum-master-state_dtype": ("SGD", dict(lr=1e-2, momentum=0.9, master_weights=True, state_dtype=torch.float32)),
    "RMSprop-centered-state_dtype": ("RMSprop", dict(lr=1e-3, centered=True, momentum=0.5, state_dtype=torch.float32)),
}


def _state_layouts_ok(opt, params, what) -> None:
    """Every state tensor of a DTensor param but ``step`` is a DTensor laid out like the param;
    ``step`` is a plain tensor."""
    for i, p in enumerate(params):
        for key, v in opt.state[p].items():
            if not isinstance(v, torch.Tensor):
                continue
            if key == "step":
                assert not isinstance(v, DTensor), f"rank {rank()}: {what}: param {i} state['step'] is a DTensor"
            else:
                assert isinstance(v, DTensor), f"rank {rank()}: {what}: param {i} state[{key!r}] is a {type(v).__name__}"
                assert v.device_mesh == p.device_mesh and tuple(v.placements) == tuple(p.placements), (
                    f"rank {rank()}: {what}: param {i} state[{key!r}] on {v.device_mesh} {v.placements}, param {p.placements}"
                )
                assert v.shape == p.shape, f"rank {rank()}: {what}: param {i} state[{key!r}] shape {v.shape} != {p.shape}"


@case("bf16", "fsdp-matches-one-process")
def _bf16_fsdp(ctx):
    """FSDP2 bf16 training with rsoptim: each step's full grads are given to rsoptim on an
    unsharded copy of the model too; params and state equal, bit for bit (the step is
    element-wise, so sharding must not change it)."""
    records = []
    for label, (name, kwargs) in BF16_CONFIGS.items():
        model = fsdp_net(dtype=torch.bfloat16)
        ref = plain_net(dtype=torch.bfloat16)
        opt = optimizer("rsoptim", name, model.parameters(), **kwargs)
        ref_opt = optimizer("rsoptim", name, ref.parameters(), **kwargs)
        params, ref_params = list(model.parameters()), list(ref.parameters())
        history = []
        for step in range(3):
            opt.zero_grad()
            ref_opt.zero_grad()
            backward(model, step, torch.bfloat16)
            for p, q in zip(params, ref_params):
                q.grad = full(p.grad)
            opt.step()
            ref_opt.step()
            history.append(([full(p) for p in params], [q.detach().clone() for q in ref_params]))
        state = [{k: full(v) for k, v in opt.state[p].items()} for p in params]
        ref_state = [{k: v.detach().clone() for k, v in ref_opt.state[q].items()} for q in ref_params]
        records.append((label, opt, params, history, state, ref_state))
    for label, opt, params, history, state, ref_state in records:
        _state_layouts_ok(opt, params, label)
        for step, (got, want) in enumerate(history):
            for i, (a, e) in enumerate(zip(got, want)):
                assert a.dtype == torch.bfloat16
                close(a, e, f"{label}: param {i} after step {step + 1}, FSDP2 vs one process", exact=True)
        for i, (s, rs) in enumerate(zip(state, ref_state)):
            assert sorted(s) == sorted(rs), f"{label}: param {i} state keys {sorted(s)} != {sorted(rs)}"
            for k in rs:
                close(s[k], rs[k], f"{label}: param {i} state[{k!r}], FSDP2 vs one process", exact=True)


def _gather_locals(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per tensor: the local shards of every rank (collective)."""
    out = []
    for t in tensors:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local(t))
        out.append(parts)
    return out


def _sr_run(kwargs_by_name: dict, *, torch_seed_per_rank: bool, stochastic: bool = True):
    """bf16 params (Replicate, Shard(0), and the 2-D HSDP-like [Replicate, Shard(0)] on a (1, 2)
    mesh) stepped with identical grads on every rank; returns each param's local shards of all
    ranks, per optimizer."""
    out = {}
    for name, kwargs in kwargs_by_name.items():
        gen = torch.Generator().manual_seed(21)
        spec = [
            (1 + 0.1 * torch.randn(40, generator=gen), mesh(), [Replicate()]),
            (1 + 0.1 * torch.randn(8, 5, generator=gen), mesh(), [Replicate()]),
            (1 + 0.1 * torch.randn(8, 5, generator=gen), mesh(), [Shard(0)]),
            (1 + 0.1 * torch.randn(6, 7, generator=gen), mesh((1, 2)), [Shard(0), Replicate()]),
        ]
        params = make_params(spec, torch.bfloat16)
        if torch_seed_per_rank:
            torch.manual_seed(1000 + rank())
        else:
            torch.manual_seed(1000)
        opt = optimizer("rsoptim", name, params, stochastic_rounding=stochastic, **kwargs)
        for step in range(4):
            for p, g in zip(params, grads_for(params, step)):
                p.grad = g
            opt.step()
        _state_layouts_ok(opt, params, f"stochastic rounding {name}")
        out[name] = _gather_locals(params)
    return out


SR_CONFIGS = {
    "AdamW": dict(lr=1e-3, weight_decay=0.1),
    "SGD": dict(lr=1e-3, momentum=0.9, master_weights=True),
    "Adam": dict(lr=1e-3, state_dtype=torch.float32),
    "RMSprop": dict(lr=1e-4, centered=True),
}


def _sr_check(got: dict, nearest: dict, what: str) -> None:
    failures = []
    for name, per_param in got.items():
        for i, parts in enumerate(per_param):
            if i in (0, 1, 3) and not torch.equal(parts[0], parts[1]):
                n = int((parts[0] != parts[1]).sum())
                failures.append(f"{name}: replicated param {i} differs across ranks in {n} of {parts[0].numel()} elements")
        # stochastic rounding did round stochastically somewhere (else this test shows nothing)
        if all(torch.equal(a, b) for parts, near in zip(per_param, nearest[name]) for a, b in zip(parts, near)):
            failures.append(f"{name}: stochastic rounding gave the round-to-nearest result everywhere")
    assert not failures, f"rank {rank()}: {what}:\n" + "\n".join(failures)


@case("bf16", "stochastic-rounding-Replicate-identical-seeded")
def _sr_seeded(ctx):
    """One stochastic_rounding_seed (or one torch seed on every rank): replicated params stay
    identical across ranks."""
    seeded = {n: dict(kw, stochastic_rounding_seed=1234) for n, kw in SR_CONFIGS.items()}
    got = _sr_run(seeded, torch_seed_per_rank=True)
    nearest = _sr_run(SR_CONFIGS, torch_seed_per_rank=False, stochastic=False)
    _sr_check(got, nearest, "explicit stochastic_rounding_seed")
    got = _sr_run(SR_CONFIGS, torch_seed_per_rank=False)
    _sr_check(got, nearest, "no seed, one torch seed on all ranks")


@case("bf16", "stochastic-rounding-Replicate-identical-rank-seeded")
def _sr_rank_seeded(ctx):
    """No stochastic_rounding_seed and torch seeded differently on each rank (seed + rank, as
    data-parallel scripts often do): are replicated params still identical across ranks?"""
    got = _sr_run(SR_CONFIGS, torch_seed_per_rank=True)
    nearest = _sr_run(SR_CONFIGS, torch_seed_per_rank=False, stochastic=False)
    _sr_check(got, nearest, "no seed, torch seeded with seed + rank")


@case("bf16", "hsdp-stochastic-rounding-replicas-identical")
def _sr_hsdp(ctx):
    """FSDP2 HSDP on a (replicate=2, shard=1) mesh: params are [Replicate(), Shard(0)]; bf16
    training with stochastic rounding keeps the two replicas identical."""
    hsdp = mesh((2, 1), ("replicate", "shard"))
    out = {}
    for stochastic in (True, False):
        model = fsdp_net(dtype=torch.bfloat16, on=hsdp)
        torch.manual_seed(77)
        opt = optimizer("rsoptim", "AdamW", model.parameters(), lr=1e-3, master_weights=False, stochastic_rounding=stochastic)
        train_bf16 = range(3)
        for step in train_bf16:
            opt.zero_grad()
            backward(model, step, torch.bfloat16)
            opt.step()
        params = list(model.parameters())
        _state_layouts_ok(opt, params, "HSDP")
        out[stochastic] = _gather_locals(params)
    failures = []
    for i, parts in enumerate(out[True]):
        if not torch.equal(parts[0], parts[1]):
            failures.append(f"param {i} differs across replicas")
    if all(torch.equal(a[0], b[0]) for a, b in zip(out[True], out[False])):
        failures.append("stochastic rounding gave the round-to-nearest result everywhere")
    assert not failures, f"rank {rank()}: " + "; ".join(failures)


# -------------------------------------------------------------------------------------------
# entry point
# -------------------------------------------------------------------------------------------


# -------------------------------------------------------------------------------------------
# topic "eightbit": Adam8bit/AdamW8bit on FSDP2 shards (blocks run over each local shard)
# -------------------------------------------------------------------------------------------

EIGHT_BIT = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=0)  # every param of Net gets 8-bit state


@case("eightbit", "fsdp-shards-step-as-plain-params")
def _eightbit_shards(ctx):
    """FSDP2 Net with AdamW8bit: each rank's local shards step exactly as plain params holding
    the same values and grads step with AdamW8bit on one process (params, codes and scales, bit
    for bit), and the state is sharded with the param (codes laid out like it, scales a 1-D
    DTensor sharded over the same mesh dims)."""
    import rsoptim

    model = fsdp_net()
    opt = rsoptim.AdamW8bit(model.parameters(), **EIGHT_BIT)
    plist = list(model.parameters())
    shards = [nn.Parameter(local(p).detach().clone()) for p in plist]
    plain = rsoptim.AdamW8bit(shards, **EIGHT_BIT)
    history = []
    for step in range(FSDP_STEPS):
        opt.zero_grad()
        backward(model, step)
        for shard, p in zip(shards, plist):
            shard.grad = local(p.grad).detach().clone()
        opt.step()
        plain.step()
        history.append(([local(p).clone() for p in plist], [s.detach().clone() for s in shards]))
    for step, (sharded, one_process) in enumerate(history):
        for i, (a, e) in enumerate(zip(sharded, one_process)):
            close(a, e, f"AdamW8bit: param {i} (local shard) after step {step + 1}", exact=True)
    for i, (p, shard) in enumerate(zip(plist, shards)):
        state, expected = opt.state[p], plain.state[shard]
        for key in ("state1", "state2"):
            assert isinstance(state[key], DTensor) and state[key].placements == p.placements, f"param {i} {key}: {layout(state[key])}"
            close(local(state[key]), expected[key], f"param {i} {key}", exact=True)
        for key in ("absmax1", "absmax2"):
            scales = state[key]
            assert isinstance(scales, DTensor) and all(pl.is_shard(0) or not pp.is_shard() for pl, pp in zip(scales.placements, p.placements))
            blocks = expected[key].numel()
            close(local(scales)[:blocks], expected[key], f"param {i} {key}", exact=True)
            assert not bool(local(scales)[blocks:].any()), f"param {i} {key}: padding written"


@case("eightbit", "dcp-resume")
def _eightbit_resume(ctx):
    """AdamW8bit on FSDP2 (float32; bfloat16 with master copies and stochastic rounding): a run
    resumed from a mid-run DCP checkpoint is the uninterrupted run, bit for bit."""
    configs = {
        "float32": (torch.float32, EIGHT_BIT),
        "bf16-master-stochastic": (torch.bfloat16, dict(EIGHT_BIT, master_weights=True, stochastic_rounding=True, stochastic_rounding_seed=3)),
    }
    results = []
    for label, (dtype, kwargs) in configs.items():
        ckpt = str(Path(ctx["out_dir"]) / f"ckpt-8bit-{label}")
        params, state = _ckpt_run("rsoptim", "AdamW8bit", kwargs, save=ckpt, dtype=dtype)
        resumed, resumed_state = _ckpt_run("rsoptim", "AdamW8bit", kwargs, load=ckpt, dtype=dtype)
        results.append((label, params, state, resumed, resumed_state))
    for label, params, state, resumed, resumed_state in results:
        for i, (a, e) in enumerate(zip(resumed, params)):
            close(a, e, f"{label}: param {i}, resumed vs uninterrupted", exact=True)
        compare_state(resumed_state, state, f"{label}: state, resumed vs uninterrupted", exact=True)


@case("eightbit", "partial-grad-raises")
def _eightbit_partial(ctx):
    """A Partial grad is refused before anything is stepped, as rsoptim.Adam refuses it."""
    import rsoptim

    model = fsdp_net()
    opt = rsoptim.AdamW8bit(model.parameters(), **EIGHT_BIT)
    backward(model, 0)
    p = next(model.parameters())
    before = [local(q).clone() for q in model.parameters()]
    p.grad = DTensor.from_local(local(p.grad), p.device_mesh, [Partial()], run_check=False, shape=p.shape, stride=p.stride())
    try:
        opt.step()
    except RuntimeError as e:
        assert "Partial" in str(e), str(e)
    else:
        raise AssertionError("a Partial grad was stepped")
    for a, e in zip([local(q) for q in model.parameters()], before):
        close(a, e, "params after the refused step", exact=True)
    assert not opt.state, "state made by a refused step"


BARRIER_TIMEOUT = 20.0  # seconds


def _barrier(tag: str) -> None:
    """Waits for every rank to get here, through the rendezvous store, not gloo: a rank whose
    case failed may have left the other waiting in a collective, and this then raises after
    BARRIER_TIMEOUT (sooner than gloo's 60 s), the rank exits, and the test kills the other.
    Cases that failed alike on both ranks just go on."""
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    store.set(f"rsoptim-test/{tag}/{rank()}", "1")
    keys = [f"rsoptim-test/{tag}/{r}" for r in range(dist.get_world_size())]
    try:
        store.wait(keys, timedelta(seconds=BARRIER_TIMEOUT))
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"the other rank did not finish {tag!r} within {BARRIER_TIMEOUT:.0f} s of this one (see its log)") from e


def main(argv: list[str]) -> int:
    rank_, world, port, topic, out_dir = int(argv[0]), int(argv[1]), int(argv[2]), argv[3], Path(argv[4])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank_), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    faulthandler.enable()  # a crash prints the Python stacks to the log
    if os.environ.get("RSOPTIM_TEST_DUMP_STACKS_AFTER"):
        faulthandler.dump_traceback_later(float(os.environ["RSOPTIM_TEST_DUMP_STACKS_AFTER"]), exit=False)
    results: dict[str, str | None] = {}
    result_file = out_dir / f"rank{rank_}.json"
    running_file = out_dir / f"rank{rank_}.running"
    try:
        import rsoptim

        expected = os.environ.get("RSOPTIM_TEST_RSOPTIM_FILE")
        if expected and os.path.realpath(rsoptim.__file__) != os.path.realpath(expected):
            raise RuntimeError(f"the rank imported rsoptim from {rsoptim.__file__}, the test process from {expected}")
        _dist_imports()
        dist.init_process_group("gloo", rank=rank_, world_size=world, timeout=timedelta(seconds=60))
        ctx = {"out_dir": str(out_dir)}
        cases = [(f"{t}/{name}", fn) for t in topic.split(",") for name, fn in TOPICS[t].items()]
        for name, fn in cases:
            running_file.write_text(f"case {name!r}")
            try:
                fn(ctx)
                results[name] = None
            except BaseException:  # noqa: BLE001 - reported, then the next case runs
                results[name] = traceback.format_exc()
            result_file.write_text(json.dumps(results))
            running_file.write_text(f"(the barrier after case {name!r})")
            _barrier(f"after/{name}")
        running_file.unlink(missing_ok=True)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        (out_dir / f"rank{rank_}.fatal").write_text(traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
