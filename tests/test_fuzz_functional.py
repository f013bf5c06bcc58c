"""Property-based tests of ``rsoptim.functional`` (the NumPy API) under hostile arguments.

Hypothesis draws calls of ``adam_``, ``sgd_``, ``rmsprop_``, ``grad_norms`` and
``clip_grad_norm_`` whose arguments come as lists, tuples, generators, ``map`` objects or single
arrays; whose arrays are sometimes of the wrong dtype or shape, non-contiguous views, Fortran
ordered, read-only, Python lists or torch tensors; that share memory (a param passed as its own
grad or state, overlapping slices of one buffer, step counts inside a param); with step-count
arrays of every wrong kind; and sometimes with arrays of 1-4M elements (a generator yielding
freshly allocated arrays then shows a use-after-free as a crash or as wrong numbers).

The property: a call with valid arguments (as the module's docstring defines them) performs the
same step as torch's own functional optimizers on copies of the inputs; a call with invalid
arguments raises TypeError or ValueError (never another exception, never a crash) and writes
nothing; a call with generators or maps gives the same result, bit for bit, as the same call
with lists. A few calls are left undecided by the docs (no params at all, state given that the
hyperparameters do not use, zero-size arrays inside another array's memory): those may raise
TypeError/ValueError or step correctly.

The same property runs with float16 params, and bfloat16 ones (``ml_dtypes``) where installed:
there a valid call must give, bit for bit, torch's float32 step on float32 copies with every
stored value rounded once to the arrays' dtype (state of the params' dtype or float32).

Runs are deterministic (``derandomize=True``) and bounded; ``FUZZ_EXAMPLES_SCALE`` scales the
example count for longer local runs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.optim.adam import adam as torch_adam
from torch.optim.rmsprop import rmsprop as torch_rmsprop
from torch.optim.sgd import sgd as torch_sgd

from conftest import fuzz_settings, ieee_sqrt
from rsoptim import functional as F

try:
    import ml_dtypes  # NumPy's bfloat16
except ImportError:  # the bfloat16 cases are skipped; the float16 ones still run
    ml_dtypes = None

EPS32 = float(np.finfo(np.float32).eps)
TOL = {np.dtype(np.float64): dict(rtol=1e-7, atol=1e-7), np.dtype(np.float32): dict(rtol=1.3e-6, atol=1e-5)}
FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
#: Half-precision params: float16, and bfloat16 where ml_dtypes is installed (computed in
#: float32, each stored value rounded once; state of the params' dtype or float32).
HALF_NP = {np.dtype(np.float16): torch.float16}
if ml_dtypes is not None:
    HALF_NP[np.dtype(ml_dtypes.bfloat16)] = torch.bfloat16
#: torch's default tolerances for the half types (for what is compared within a tolerance).
TOL.update({np.dtype(np.float16): dict(rtol=1e-3, atol=1e-5)})
if ml_dtypes is not None:
    TOL[np.dtype(ml_dtypes.bfloat16)] = dict(rtol=1.6e-2, atol=1e-5)

# Roles of each function's array arguments: (name, written, when it is used).
ROLES = {
    "adam_": [("params", True, None), ("grads", False, None), ("exp_avgs", True, None), ("exp_avg_sqs", True, None), ("max_exp_avg_sqs", True, "amsgrad")],
    "sgd_": [("params", True, None), ("grads", False, None), ("momentum_buffers", True, "momentum")],
    "rmsprop_": [("params", True, None), ("grads", False, None), ("square_avgs", True, None), ("momentum_buffers", True, "momentum"), ("grad_avgs", True, "centered")],
    "grad_norms": [("grads", False, None)],
    "clip_grad_norm_": [("grads", True, None)],
}
HAS_STEPS = {"adam_", "rmsprop_"}
CONTAINERS = ["list", "list", "list", "tuple", "gen_same", "map_same", "gen_fresh", "map_fresh", "single"]

# -------------------------------------------------------------------------------------------
# strategies
# -------------------------------------------------------------------------------------------

small_shapes = st.one_of(
    st.just(()),
    st.sampled_from([(0,), (1,), (5,), (16,), (17,), (33,)]),
    st.tuples(st.integers(1, 4), st.integers(0, 5)),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4)),
)


@st.composite
def item_specs(draw, extra=(), every=11):
    """How one array argument is spoiled, if at all (about 1 in ``every + 1``; ``extra``: more
    spoils to draw from)."""
    if draw(st.integers(0, every)) != 0:
        return None
    return draw(
        st.sampled_from(
            list(extra) + [
                {"dtype": "float32"},
                {"dtype": "float64"},
                {"dtype": "float16"},
                {"dtype": "int64"},
                {"dtype": "complex128"},
                {"dtype": "object"},
                {"shape": "extra"},
                {"shape": "flat"},
                {"view": True},
                {"fortran": True},
                {"readonly": True},
                {"kind": "pylist"},
                {"kind": "tensor"},
                {"kind": "none"},
            ]
        )
    )


STEP_KINDS = ["float32"] * 4 + ["float64", "int64", "float16", "wrong_shape", "2d", "list", "readonly", "view", "tensor", "scalar"]


@st.composite
def calls(draw, dtypes=("float32", "float64"), big=(14, 4_000_000), extra_specs=(), spoil_every=11, steps_kinds=STEP_KINDS):
    """One call. ``dtypes``: the params' dtypes to draw from; ``big``: (1 in how many calls
    has an array of 1M elements or more, up to how many); ``extra_specs``: more spoils;
    ``spoil_every``: about 1 in ``spoil_every + 1`` arrays is spoiled; ``steps_kinds``: the
    step-count arrays' kinds to draw from."""
    fn = draw(st.sampled_from(list(ROLES)))
    n = draw(st.sampled_from([1, 1, 2, 2, 3, 0]))
    shapes = [draw(small_shapes) for _ in range(n)]
    if n and draw(st.integers(0, big[0])) == 0:
        shapes[draw(st.integers(0, n - 1))] = (draw(st.integers(1_000_000, big[1])),)
    case: dict[str, Any] = {
        "fn": fn,
        "dtype": draw(st.sampled_from(list(dtypes))),
        "shapes": shapes,
        "seed": draw(st.integers(0, 2**16)),
    }
    if np.dtype(case["dtype"]) in HALF_NP and fn in ("adam_", "sgd_", "rmsprop_"):
        # The state: of the params' dtype, or float32 (every state array of the call alike; for
        # sgd_, new buffers are started in float32 when asked with state_dtype=np.float32).
        case["state"] = draw(st.sampled_from(["same", "float32"]))
        if fn == "sgd_":
            case["sgd_state_dtype"] = case["state"] == "float32" and draw(st.booleans())
    hyper: dict[str, Any] = {}
    if fn == "adam_":
        hyper = {
            "lr": draw(st.sampled_from([1e-3, 0.1])),
            "betas": (draw(st.sampled_from([0.9, 0.5, 0.0])), draw(st.sampled_from([0.999, 0.9]))),
            "eps": draw(st.sampled_from([1e-8, 1e-3])),
            "weight_decay": draw(st.sampled_from([0.0, 0.1])),
            "amsgrad": draw(st.booleans()),
            "maximize": draw(st.booleans()),
            "decoupled_weight_decay": draw(st.booleans()),
        }
    elif fn == "sgd_":
        momentum = draw(st.sampled_from([0.0, 0.9, 0.5]))
        dampening = draw(st.sampled_from([0.0, 0.3]))
        hyper = {
            "lr": draw(st.sampled_from([1e-3, 0.1])),
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": draw(st.sampled_from([0.0, 0.1])),
            "nesterov": momentum > 0 and dampening == 0 and draw(st.booleans()),
            "maximize": draw(st.booleans()),
        }
    elif fn == "rmsprop_":
        hyper = {
            "lr": draw(st.sampled_from([1e-2, 0.1])),
            "alpha": draw(st.sampled_from([0.99, 0.5])),
            "eps": draw(st.sampled_from([1e-8, 1e-3])),
            "weight_decay": draw(st.sampled_from([0.0, 0.1])),
            "momentum": draw(st.sampled_from([0.0, 0.9])),
            "centered": draw(st.booleans()),
            "maximize": draw(st.booleans()),
        }
    elif fn == "grad_norms":
        hyper = {"norm_type": draw(st.sampled_from([2.0, 2, 1, 3, 0.5, math.inf, "inf", 0, -1, math.nan]))}
    else:
        hyper = {
            "max_norm": draw(st.sampled_from([1.0, 0.1, 1e6, 0.0])),
            "norm_type": draw(st.sampled_from([2.0, 1, 3, 0.5, math.inf, 0, -math.inf])),
        }
    # Hyperparameters of other kinds than float: numpy scalars, 0-d arrays, lists for betas.
    kind = draw(st.sampled_from(["float"] * 4 + ["np.float32", "np.float64", "0-d"]))
    case["hyper"], case["hyper_kind"] = hyper, kind
    roles = {}
    for role, _, used_when in ROLES[fn]:
        if used_when is not None:
            needed = bool(hyper.get(used_when))
            # Given exactly when needed, mostly; the other way round sometimes.
            present = needed if draw(st.integers(0, 9)) else not needed
            if fn == "sgd_":
                present = draw(st.booleans())  # sgd_ creates missing buffers itself
            if not present:
                roles[role] = None
                continue
        container = draw(st.sampled_from(CONTAINERS))
        items = [draw(item_specs(extra_specs, spoil_every)) for _ in range(n)]
        if role == "momentum_buffers" and fn == "sgd_":
            # None entries are a param's first step.
            items = [draw(st.sampled_from([None, None, {"kind": "none"}])) if s is None else s for s in items]
        roles[role] = {"container": container, "items": items}
    case["roles"] = roles
    written = [r for r, w, _ in ROLES[fn] if w and roles.get(r)]
    everything = [r for r, _, _ in ROLES[fn] if roles.get(r)]
    share = None
    if n and draw(st.integers(0, 4)) == 0:
        what = draw(st.sampled_from(["same", "overlap", "steps_inside"] if fn in HAS_STEPS else ["same", "overlap"]))
        if what == "steps_inside":
            share = ("steps_inside", draw(st.sampled_from(written)), draw(st.integers(0, n - 1)))
        else:
            a = (draw(st.sampled_from(everything)), draw(st.integers(0, n - 1)))
            b = (draw(st.sampled_from(everything)), draw(st.integers(0, n - 1)))
            share = (what, a, b)
    case["share"] = share
    if fn in HAS_STEPS:
        case["steps"] = draw(st.sampled_from(steps_kinds))
        case["step_values"] = [draw(st.integers(0, 5)) for _ in range(n)]
    return case


# -------------------------------------------------------------------------------------------
# building the arguments
# -------------------------------------------------------------------------------------------


def initial_values(case, role: str, i: int, rng) -> np.ndarray:
    shape = case["shapes"][i]
    x = np.asarray(rng.standard_normal(shape), np.float64).reshape(shape)
    if role in ("exp_avg_sqs", "square_avgs"):
        x = np.abs(x)
    if role == "max_exp_avg_sqs":
        x = np.abs(x) + 1.0
    if role in ("exp_avgs", "grad_avgs", "momentum_buffers"):
        x = 0.1 * x
    dtype = np.float32 if case.get("state") == "float32" and role not in ("params", "grads") else case["dtype"]
    return np.asarray(x.astype(dtype)).reshape(shape)


def spoil(a: np.ndarray, spec) -> Any:
    if spec is None:
        return a
    if "dtype" in spec:
        return a.astype(spec["dtype"])
    if spec.get("shape") == "extra":
        return np.zeros(a.shape + (2,), a.dtype)
    if spec.get("shape") == "flat":
        return np.zeros(a.size + 1, a.dtype)
    if spec.get("view"):
        if a.ndim == 0:
            return a
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        view = big[..., ::2]
        view[...] = a
        return view
    if spec.get("fortran"):
        return np.asfortranarray(a)
    if spec.get("readonly"):
        a.flags.writeable = False
        return a
    kind = spec.get("kind")
    if kind == "pylist":
        return a.tolist()
    if kind == "tensor":
        if ml_dtypes is not None and a.dtype == ml_dtypes.bfloat16:  # torch.from_numpy refuses it
            return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    if kind == "none":
        return None
    raise AssertionError(spec)


def build(case):
    """The arrays of one call (role -> list), and the step array."""
    rng = np.random.default_rng(case["seed"])
    arrays: dict[str, list | None] = {}
    for role, spec in case["roles"].items():
        if spec is None:
            arrays[role] = None
            continue
        arrays[role] = [spoil(initial_values(case, role, i, rng), s) for i, s in enumerate(spec["items"])]
    steps = None
    if case["fn"] in HAS_STEPS:
        values = np.array(case["step_values"], np.float64)
        kind = case["steps"]
        if kind in ("float32", "float64", "int64", "float16"):
            steps = values.astype(kind)
        elif kind == "wrong_shape":
            steps = np.append(values, 0.0).astype(np.float32)
        elif kind == "2d":
            steps = values.astype(np.float32).reshape(1, -1)
        elif kind == "list":
            steps = values.tolist()
        elif kind == "readonly":
            steps = values.astype(np.float32)
            steps.flags.writeable = False
        elif kind == "view":
            big = np.zeros(2 * len(values), np.float32)
            steps = big[::2]
            steps[:] = values
        elif kind == "tensor":
            steps = torch.tensor(values, dtype=torch.float32)
        elif kind == "scalar":
            steps = np.float32(values[0]) if len(values) else np.float32(0)
    share = case["share"]
    if share is not None:
        what = share[0]
        if what == "steps_inside":
            role, i = share[1], share[2]
            a = arrays[role][i] if arrays.get(role) else None
            if isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype in FLOATS and a.size >= len(case["shapes"]):
                steps = a[: len(case["shapes"])]
        else:
            (ra, ia), (rb, ib) = share[1], share[2]
            a, b = arrays[ra][ia], arrays[rb][ib]
            if what == "same" and isinstance(a, np.ndarray):
                if (ra, ia) != (rb, ib) or ra == "grads":
                    arrays[rb][ib] = a
            elif what == "overlap" and isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.size and a.shape == b.shape:
                # Two slices of one buffer that overlap by half (at least one element).
                k = max(1, a.size // 2)
                buf = np.concatenate([a.reshape(-1), b.reshape(-1)[k:]]) if a.dtype == b.dtype else None
                if buf is not None and (ra, ia) != (rb, ib):
                    arrays[ra][ia] = buf[: a.size].reshape(a.shape)
                    arrays[rb][ib] = buf[a.size - k : 2 * a.size - k].reshape(b.shape)
    return arrays, steps


def fresh(a):
    return a.copy() if isinstance(a, np.ndarray) else a


def container(kind: str, items: list):
    """The argument as the call receives it. Fresh-copy containers allocate each array as they
    are iterated and drop it right after, as ``(np.ones(n) for _ in ...)`` does."""
    if kind == "tuple":
        return tuple(items)
    if kind == "gen_same":
        return (a for a in items)
    if kind == "map_same":
        return map(lambda a: a, items)
    if kind == "gen_fresh":
        return (fresh(a) for a in items)
    if kind == "map_fresh":
        return map(fresh, items)
    if kind == "single" and len(items) == 1:
        return items[0]
    return list(items)


def hyper_value(x, kind):
    if isinstance(x, bool) or isinstance(x, str) or not isinstance(x, (int, float)):
        return x
    if kind == "np.float32":
        return np.float32(x)
    if kind == "np.float64":
        return np.float64(x)
    if kind == "0-d":
        return np.array(x)
    return x


def call(case, arrays, steps, containers: dict[str, str]):
    fn, h = case["fn"], dict(case["hyper"])
    kind = case["hyper_kind"]
    for key in ("lr", "eps", "weight_decay", "momentum", "dampening", "alpha", "max_norm"):
        if key in h:
            h[key] = hyper_value(h[key], kind)
    if "betas" in h and kind != "float":
        h["betas"] = [hyper_value(b, kind) for b in h["betas"]]
    args = {role: None if a is None else container(containers[role], a) for role, a in arrays.items()}
    if fn == "adam_":
        return F.adam_(args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"], steps, max_exp_avg_sqs=args["max_exp_avg_sqs"], **h)
    if fn == "sgd_":
        if case.get("sgd_state_dtype"):
            h["state_dtype"] = np.float32
        return F.sgd_(args["params"], args["grads"], args["momentum_buffers"], **h)
    if fn == "rmsprop_":
        return F.rmsprop_(args["params"], args["grads"], args["square_avgs"], steps, momentum_buffers=args["momentum_buffers"], grad_avgs=args["grad_avgs"], **h)
    if fn == "grad_norms":
        return F.grad_norms(args["grads"], h["norm_type"])
    return F.clip_grad_norm_(args["grads"], h["max_norm"], h["norm_type"])


# -------------------------------------------------------------------------------------------
# what the call should do
# -------------------------------------------------------------------------------------------


def as_seen(case, arrays):
    """The arrays as the call sees them (fresh-copy containers hand over contiguous, writeable
    private copies)."""
    out = {}
    for role, items in arrays.items():
        if items is None:
            out[role] = None
        elif case["roles"][role]["container"] in ("gen_fresh", "map_fresh"):
            out[role] = [fresh(a) for a in items]
        else:
            out[role] = items
    return out


def verdict(case, arrays, steps) -> tuple[str, str]:
    """('valid' | 'invalid' | 'either', why)."""
    fn, h, n = case["fn"], case["hyper"], len(case["shapes"])
    seen = as_seen(case, arrays)
    if fn in ("grad_norms", "clip_grad_norm_"):
        p = float(h["norm_type"])
        if not (p > 0):
            return "invalid", f"norm_type {h['norm_type']!r}"
    if n == 0:
        return "either", "no params"
    params = seen.get("params") or seen["grads"]
    dtype = params[0].dtype if isinstance(params[0], np.ndarray) else None
    if dtype not in FLOATS and dtype not in HALF_NP:
        return "invalid", "params are not float32/float64/float16/bfloat16 arrays"
    if case.get("sgd_state_dtype") and dtype not in HALF_NP:
        return "invalid", "state_dtype=np.float32 for params that are not float16/bfloat16"
    state_dtype = half_state_dtype(case, seen, dtype) if dtype in HALF_NP else dtype
    written, read = [], []
    shapes: list[tuple[int, ...]] = []
    for role, is_written, used_when in ROLES[fn]:
        items = seen.get(role)
        needed = used_when is None or bool(h.get(used_when))
        if items is None:
            if needed and not (fn == "sgd_" and role == "momentum_buffers"):
                return "invalid", f"{role} missing"
            continue
        if not needed:
            if fn == "sgd_":
                continue  # sgd_ ignores buffers without momentum
            return "either", f"{role} given but not used"
        for i, a in enumerate(items):
            if a is None and fn == "sgd_" and role == "momentum_buffers":
                # Started in the params' dtype, or float32 with state_dtype=np.float32; next to a
                # float32 first buffer a half one is refused (the first array decides).
                if (np.dtype(np.float32) if case.get("sgd_state_dtype") else dtype) != state_dtype:
                    return "invalid", f"{role}[{i}] is started in {dtype}, the first buffer is {state_dtype}"
                continue
            if not isinstance(a, np.ndarray):
                return "invalid", f"{role}[{i}] is a {type(a).__name__}"
            if a.dtype != (dtype if role in ("params", "grads") else state_dtype):
                return "invalid", f"{role}[{i}] dtype {a.dtype}"
            if role == "params":
                shapes.append(a.shape)  # the params' own shapes are the ones to match
            elif fn not in ("grad_norms", "clip_grad_norm_") and a.shape != shapes[i]:
                return "invalid", f"{role}[{i}] shape"
            if not a.flags.c_contiguous:
                return "invalid", f"{role}[{i}] not C-contiguous"
            if is_written and not a.flags.writeable:
                return "invalid", f"{role}[{i}] read-only"
            (written if is_written else read).append((f"{role}[{i}]", a))
    if fn in HAS_STEPS:
        if not (isinstance(steps, np.ndarray) and steps.dtype in FLOATS and steps.shape == (n,)):
            return "invalid", "steps kind"
        if not (steps.flags.c_contiguous and steps.flags.writeable):
            return "invalid", "steps not writeable/contiguous"
        written.append(("steps", steps))
    either = None
    for j, (name_a, a) in enumerate(written):
        for name_b, b in written[j + 1 :] + read:
            if np.shares_memory(a, b):
                return "invalid", f"{name_a} shares memory with {name_b}"
            if np.may_share_memory(a, b):
                either = f"{name_a} and {name_b} are within each other's bounds"
    if fn in ("grad_norms", "clip_grad_norm_") and float(h["norm_type"]) == math.inf:
        if any(a.size == 0 for _, a in written + read):
            return "either", "the inf-norm of an empty array (torch raises, 0 would do)"
    if either:
        return "either", either
    return "valid", ""


def half_state_dtype(case, seen, dtype) -> np.dtype:
    """The state dtype of a call with half-precision params: float32 where asked for
    (``sgd_``'s ``state_dtype``) or where the first array of the first state argument is
    float32, else the params' dtype (a ``None`` first momentum buffer of ``sgd_`` is started
    in the params' dtype)."""
    if case.get("sgd_state_dtype"):
        return np.dtype(np.float32)
    first_role = next((r for r, written, _ in ROLES[case["fn"]] if written and r != "params"), None)
    items = seen.get(first_role) if first_role is not None else None
    first = items[0] if items else None
    if isinstance(first, np.ndarray) and first.dtype == np.float32:
        return np.dtype(np.float32)
    return dtype


def t(a: np.ndarray) -> torch.Tensor:
    """A tensor copy of ``a``; float32 for half-precision arrays (exact)."""
    if a.dtype in HALF_NP:
        return torch.from_numpy(a.astype(np.float32))
    return torch.from_numpy(np.array(a, copy=True))


def reference(case, seen, steps):
    """torch's functional optimizers on copies: the expected arrays, by (role, index), and the
    expected return value.

    Half-precision arrays: the rule of README "Where the work goes" (every value computed in
    float32, each stored value rounded once): torch's float32 for-loop on float32 copies, then
    the params, the scaled grads and (unless the state is float32) the state rounded to the
    arrays' dtype. The expected arrays stay float32 tensors holding those rounded values. The
    for-loop's ``sqrt`` is the IEEE one (``conftest.ieee_sqrt``: torch's float32 CPU sqrt is
    not correctly rounded, the kernels' is)."""
    fn, h = case["fn"], dict(case["hyper"])
    first = (seen.get("params") or seen["grads"])[0]
    half = HALF_NP.get(first.dtype)
    # The values the call was given (an np.float32 lr is 0.1 rounded to float32), as floats.
    for key in ("lr", "eps", "weight_decay", "momentum", "dampening", "alpha", "max_norm"):
        if key in h:
            h[key] = float(hyper_value(h[key], case["hyper_kind"]))
    if "betas" in h:
        h["betas"] = [float(hyper_value(b, case["hyper_kind"])) for b in h["betas"]]
    ts = {role: None if items is None else [None if a is None else t(a) for a in items] for role, items in seen.items()}
    out_steps = None
    if fn in HAS_STEPS:
        # In the steps' own dtype: a float32 count is incremented in float32 (steps inside a
        # state array hold fractions, where that rounds).
        step_ts = [torch.tensor(float(s), dtype=torch.float32 if steps.dtype == np.float32 else torch.float64) for s in steps]
    rounding = ieee_sqrt() if half is not None else contextlib.nullcontext()
    if fn == "adam_":
        with rounding:
            torch_adam(
                ts["params"], ts["grads"], ts["exp_avgs"], ts["exp_avg_sqs"], ts["max_exp_avg_sqs"] or [], step_ts,
                foreach=False, decoupled_weight_decay=h["decoupled_weight_decay"], amsgrad=h["amsgrad"],
                beta1=h["betas"][0], beta2=h["betas"][1], lr=h["lr"], weight_decay=h["weight_decay"], eps=h["eps"],
                maximize=h["maximize"],
            )
        out_steps = [s.item() for s in step_ts]
        ret = None
    elif fn == "rmsprop_":
        with rounding:
            torch_rmsprop(
                ts["params"], ts["grads"], ts["square_avgs"], ts["grad_avgs"] or [], ts["momentum_buffers"] or [], step_ts,
                foreach=False, maximize=h["maximize"], lr=h["lr"], alpha=h["alpha"], eps=h["eps"],
                weight_decay=h["weight_decay"], momentum=h["momentum"], centered=h["centered"],
            )
        out_steps = [s.item() for s in step_ts]
        ret = None
    elif fn == "sgd_":
        bufs = list(ts["momentum_buffers"]) if ts["momentum_buffers"] is not None else [None] * len(ts["params"])
        given_bufs = bufs if h["momentum"] != 0 else []
        torch_sgd(
            ts["params"], ts["grads"], given_bufs, foreach=False, weight_decay=h["weight_decay"],
            momentum=h["momentum"], lr=h["lr"], dampening=h["dampening"], nesterov=h["nesterov"], maximize=h["maximize"],
        )
        ts["momentum_buffers"] = bufs
        ret = bufs
    elif fn == "grad_norms":
        p = float(h["norm_type"])
        ret = np.array([torch.linalg.vector_norm(g.double(), p).item() for g in ts["grads"]])
    else:
        p = float(h["norm_type"])
        norms = torch.tensor([torch.linalg.vector_norm(g.double(), p).item() for g in ts["grads"]], dtype=torch.float64)
        total = torch.linalg.vector_norm(norms, p).item()
        factor = min(float(h["max_norm"]) / (total + 1e-6), 1.0)
        if factor != 1.0:
            ts["grads"] = [g * factor for g in ts["grads"]]
            if half is not None:
                ts["grads"] = [g.to(half).float() for g in ts["grads"]]
        ret = total
    if half is not None and fn in ("adam_", "sgd_", "rmsprop_"):
        # Round what is stored in a half dtype, once (in place: sgd_'s returned buffers are
        # the same tensors).
        state_half = None if half_state_dtype(case, seen, first.dtype) == np.float32 else half
        with torch.no_grad():
            for role, tensors in ts.items():
                dtype = half if role in ("params", "grads") else state_half
                for x in tensors or []:
                    if x is not None and dtype is not None:
                        x.copy_(x.to(dtype))
    return ts, out_steps, ret


#: Arrays written by torch's ``lerp`` (and, for adam_, the params they feed): their zeros are
#: compared without their sign, see ZERO_SIGN_FROM_LERP in test_fuzz_optimizers.py (ATen's lerp
#: signs a zero result differently in its vector body and its scalar remainder).
ZERO_SIGN_FROM_LERP = {"adam_": {"params", "exp_avgs"}, "rmsprop_": {"grad_avgs"}}


def same_half(actual, expected: torch.Tensor, dtype: np.dtype, what: str, zero_sign: bool = True) -> None:
    """A half-precision (or float32 state) array equals the float32 tensor ``expected`` holds:
    bit for bit, but for the sign and payload of NaNs (which must sit in the same places) and,
    unless ``zero_sign``, the sign of zeros. Compared as float32 (exact for half values)."""
    assert isinstance(actual, np.ndarray), f"{what}: got a {type(actual).__name__}"
    assert actual.dtype == dtype and actual.shape == tuple(expected.shape), f"{what}: dtype/shape {actual.dtype} {actual.shape}"
    a = torch.from_numpy(actual.astype(np.float32)).reshape(-1)
    e = expected.detach().float().reshape(-1)
    a_nan, e_nan = a.isnan(), e.isnan()
    bad = (a_nan != e_nan) | (~a_nan & (a.view(torch.int32) != e.view(torch.int32)))
    if not zero_sign:
        bad &= ~((a == 0) & (e == 0))
    if bad.any():
        where = bad.nonzero().reshape(-1)[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements differ, e.g. at {where}: "
            f"{[a[i].item() for i in where]} != expected {[e[i].item() for i in where]}"
        )


def close(actual: np.ndarray, expected: torch.Tensor, what: str, rtol=None) -> None:
    assert isinstance(actual, np.ndarray), f"{what}: got a {type(actual).__name__}"
    assert actual.dtype == expected.numpy().dtype and actual.shape == tuple(expected.shape), f"{what}: dtype/shape"
    tol = dict(TOL[actual.dtype])
    if rtol is not None:
        tol["rtol"] = max(tol["rtol"], rtol)
    torch.testing.assert_close(torch.from_numpy(np.array(actual)), expected, equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


def observable(case, arrays, steps, result):
    """Everything the caller can look at after the call: arrays not handed over as fresh copies,
    the step counts and the return value (copied)."""
    out = {}
    for role, items in arrays.items():
        if items is None or case["roles"][role]["container"] in ("gen_fresh", "map_fresh"):
            continue
        for i, a in enumerate(items):
            if isinstance(a, np.ndarray):
                out[(role, i)] = a.copy()
    if isinstance(steps, np.ndarray):
        out[("steps", 0)] = steps.copy()
    if isinstance(result, list):
        for i, b in enumerate(result):
            out[("returned", i)] = None if b is None else np.array(b, copy=True)
    elif result is not None:
        out[("returned", 0)] = np.array(result, copy=True)
    return out


def same_bits(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), f"{what}: not bit-identical"


def check_call(case) -> None:
    arrays, steps = build(case)
    containers = {role: spec["container"] for role, spec in case["roles"].items() if spec is not None}
    kind, why = verdict(case, arrays, steps)
    seen = as_seen(case, arrays)
    before = observable(case, arrays, steps, None)
    # Copies to replay the call with lists (same sharing between arguments: a copy per object).
    copies: dict[int, np.ndarray] = {}

    def copy_of(a):
        """A copy over a copy of ``a``'s whole buffer, so overlaps between arguments stay."""
        if not isinstance(a, np.ndarray):
            return a
        root = a
        while isinstance(root.base, np.ndarray):
            root = root.base
        if id(root) not in copies:
            copies[id(root)] = root.copy(order="K")
        base = copies[id(root)]
        out = np.ndarray(a.shape, a.dtype, buffer=base, offset=a.ctypes.data - root.ctypes.data, strides=a.strides)
        out.flags.writeable = a.flags.writeable
        return out

    # (Arguments handed over through fresh-copy containers are replayed as fresh copies too.)
    replay = {
        role: None if items is None else [
            fresh(copy_of(a)) if containers[role] in ("gen_fresh", "map_fresh") else copy_of(a) for a in items
        ]
        for role, items in arrays.items()
    }
    replay_steps = copy_of(steps)
    ref = reference(case, seen, steps) if kind == "valid" else None
    try:
        result = call(case, arrays, steps, containers)
    except (TypeError, ValueError) as e:
        assert kind != "valid", f"a valid call raised {type(e).__name__}: {e}"
        after = observable(case, arrays, steps, None)
        for key, a in before.items():
            same_bits(after[key], a, f"{key} was written by a refused call ({type(e).__name__}: {e})")
        return
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"the call raised {type(e).__name__} (not TypeError/ValueError): {e}") from e
    assert kind != "invalid", f"an invalid call ({why}) was accepted"
    if kind == "valid":
        check_against_reference(case, arrays, steps, result, ref)
    # Generators and maps: the same result as lists.
    if any(c in ("gen_same", "map_same", "gen_fresh", "map_fresh") for c in containers.values()):
        lists = {role: "list" for role in containers}
        result2 = call(case, replay, replay_steps, lists)
        got = observable(case, arrays, steps, result)
        want = observable(case, replay, replay_steps, result2)
        for key, a in got.items():
            same_bits(a, want.get(key), f"{key}: generator/map call differs from the list call")


def check_against_reference(case, arrays, steps, result, ref) -> None:
    ts, out_steps, ret = ref
    fn = case["fn"]
    extra_rtol = None
    if fn == "clip_grad_norm_":
        assert isinstance(result, float), f"clip_grad_norm_ returned a {type(result).__name__}"
        dtype = arrays["grads"][0].dtype  # the arrays' own (a spoiled dtype may still be uniform)
        rel = 1e-10 if dtype == np.float64 else 8 * EPS32
        assert result == ret or abs(result - ret) <= rel * abs(ret) or (math.isnan(ret) and math.isnan(result)), (
            f"total norm {result} != {ret}"
        )
        extra_rtol = 1e-10 if dtype == np.float64 else 8 * EPS32
    if fn == "grad_norms":
        assert isinstance(result, np.ndarray) and result.dtype == np.float64 and result.shape == ret.shape
        rel = 1e-10 if arrays["grads"][0].dtype == np.float64 else 8 * EPS32
        np.testing.assert_allclose(result, ret, rtol=rel, atol=0)
        return
    first = (arrays.get("params") or arrays["grads"])[0]
    half = first.dtype in HALF_NP
    if half and fn != "clip_grad_norm_":
        state_dtype = half_state_dtype(case, arrays, first.dtype)
    for role, items in arrays.items():
        if items is None or case["roles"][role]["container"] in ("gen_fresh", "map_fresh"):
            continue
        for i, a in enumerate(items):
            expected = ts[role][i]
            if fn == "sgd_" and role == "momentum_buffers":
                continue  # checked through the returned buffers below
            if half and fn == "clip_grad_norm_":
                # Scaled by a factor from a total computed otherwise than the reference's (to a
                # few float32 ulps): within the half type's tolerance (as for float32).
                tol = dict(TOL[a.dtype])
                tol["rtol"] = max(tol["rtol"], extra_rtol)
                torch.testing.assert_close(t(a), expected, equal_nan=True, msg=lambda m: f"{role}[{i}]: {m}", **tol)
            elif half:
                dtype = first.dtype if role in ("params", "grads") else state_dtype
                same_half(a, expected, dtype, f"{role}[{i}]", zero_sign=role not in ZERO_SIGN_FROM_LERP.get(fn, ()))
            else:
                close(a, expected, f"{role}[{i}]", rtol=extra_rtol)
    if out_steps is not None:
        assert steps.tolist() == out_steps, f"steps {steps.tolist()} != {out_steps}"
    if fn == "sgd_":
        assert isinstance(result, list) and len(result) == len(ts["params"])
        for i, (b, e) in enumerate(zip(result, ts["momentum_buffers"])):
            if case["hyper"]["momentum"] == 0:
                continue  # the buffers are handed back as given
            if half:
                same_half(b, e, state_dtype, f"returned momentum buffer {i}")
            else:
                close(b, e, f"returned momentum buffer {i}")
            given = arrays["momentum_buffers"]
            if given is not None and isinstance(given[i], np.ndarray) and case["roles"]["momentum_buffers"]["container"] not in ("gen_fresh", "map_fresh"):
                assert b is given[i], f"momentum buffer {i}: a given buffer must be updated in place and returned"


@fuzz_settings(700)
@given(case=calls())
def test_functional_hostile_arguments(case):
    check_call(case)


# The same property with float16 params, and bfloat16 ones where ml_dtypes is installed: valid
# calls give the rule's numbers bit for bit (see ``reference``), with state of the params' dtype
# or float32. Fewer arguments are spoiled (so that more calls are valid and step), and arrays of
# 1M elements or more are rarer and smaller (the containers' handling is dtype-blind, and the
# float32 property covers it).


HALF_CALLS = dict(big=(40, 1_500_000), spoil_every=30, steps_kinds=["float32"] * 12 + ["float64"] * 2 + STEP_KINDS[4:])


@fuzz_settings(250)
@given(case=calls(dtypes=("float16",), extra_specs=[{"dtype": "bfloat16"}] if ml_dtypes else [], **HALF_CALLS))
def test_functional_hostile_arguments_float16(case):
    check_call(case)


@pytest.mark.skipif(ml_dtypes is None, reason="bfloat16 arrays need ml_dtypes")
@fuzz_settings(250)
@given(case=calls(dtypes=("bfloat16",), **HALF_CALLS))
def test_functional_hostile_arguments_bfloat16(case):
    check_call(case)


def test_generator_of_fresh_grads_is_read_while_alive():
    """The classic use-after-free: a generator yielding freshly allocated grads (4M elements, so
    a freed buffer goes back to the OS). The step must read the grads' values, not freed memory."""
    n = 4_000_000
    w = np.zeros(n, np.float32)
    m, v = np.zeros_like(w), np.zeros_like(w)
    steps = np.zeros(1, np.float32)
    F.adam_([w], (np.ones(n, np.float32) for _ in range(1)), [m], [v], steps, lr=0.1)
    np.testing.assert_allclose(w, -0.1, rtol=1e-6)
    np.testing.assert_allclose(m, 0.1, rtol=1e-6)
    assert steps.tolist() == [1.0]
