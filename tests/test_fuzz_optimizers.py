"""Property-based differential tests: rsoptim's optimizers and clipping against the installed torch.

Hypothesis draws whole runs: an optimizer with random (mostly valid, sometimes invalid)
hyperparameters, 1-4 params of random dtypes, shapes and memory layouts, grads in their own
layouts (missing on some steps, non-finite sometimes), hyperparameters rewritten between steps as
LR schedulers do, and state dicts swapped between the two implementations mid-run. torch's
default CPU implementation (the for-loop, ``foreach=False``) and rsoptim run side by side from
identical copies; after every step params, grads, every state tensor, the bytes around strided
views and the state-dict structure must agree, within torch's own tolerances. Where torch raises,
rsoptim must raise an exception of the same type; where torch steps, rsoptim must step.

The second property does the same for ``clip_grad_norm_`` against ``torch.nn.utils``.

Two more do it for bfloat16/float16 params and grads, bit for bit: the optimizers against torch's
fused Adam/AdamW kernel and against torch's float32 for-loop rounded once per stored value (see
"bfloat16 / float16 params" below), and ``clip_grad_norm_`` against torch's. Two more hold
rsoptim's own half-precision options (``master_weights``, ``stochastic_rounding``) to the same
float32 references, bit for bit where the contract is exact (see "master_weights /
stochastic_rounding" below).

Runs are deterministic (``derandomize=True``) and bounded (``max_examples``), so CI sees the same
examples every time. ``FUZZ_EXAMPLES_SCALE`` (a float, default 1) scales the example counts for
longer local runs.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import math
import warnings
from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st

import rsoptim
from conftest import TOLERANCES, assert_optimizers_match, bits, fuzz_settings, ieee_sqrt

CLASSES = {
    "SGD": (torch.optim.SGD, rsoptim.SGD),
    "Adam": (torch.optim.Adam, rsoptim.Adam),
    "AdamW": (torch.optim.AdamW, rsoptim.AdamW),
    "RMSprop": (torch.optim.RMSprop, rsoptim.RMSprop),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "complex64": torch.complex64, "complex128": torch.complex128}
REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64}

# -------------------------------------------------------------------------------------------
# strategies: everything is drawn as plain data (dicts, tuples, ints), so hypothesis prints a
# readable falsifying example and shrinks it; tensors are built from it afterwards.
# -------------------------------------------------------------------------------------------

# A float hyperparameter: mostly ordinary values, the edges of the valid range sometimes, an
# invalid one rarely.
lrs = st.one_of(
    st.sampled_from([1e-3, 0.01, 0.1]),
    st.sampled_from([0.0, 1.0, 1e-6]),
    st.floats(1e-5, 0.5),
    st.sampled_from([-0.1]),  # invalid
)
weight_decays = st.one_of(st.sampled_from([0.0, 0.0, 1e-4, 0.1]), st.floats(0, 1), st.sampled_from([-0.1]))
epss = st.one_of(st.sampled_from([1e-8, 1e-6, 1e-3]), st.sampled_from([0.0, 1.0]), st.sampled_from([-1e-8]))
betas1 = st.one_of(st.sampled_from([0.9, 0.5, 0.0]), st.floats(0, 0.999), st.sampled_from([1.0, -0.1]))
betas2 = st.one_of(st.sampled_from([0.999, 0.9, 0.0]), st.floats(0, 0.9999), st.sampled_from([1.0, -0.1]))
momenta = st.one_of(st.sampled_from([0.0, 0.0, 0.5, 0.9]), st.floats(0, 1), st.sampled_from([-0.5]))
dampenings = st.one_of(st.sampled_from([0.0, 0.0, 0.1, 0.5]), st.floats(0, 1))
alphas = st.one_of(st.sampled_from([0.99, 0.9, 0.5, 0.0]), st.floats(0, 1), st.sampled_from([-0.1]))


@st.composite
def hyperparameters(draw, name: str) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    kw["lr"] = draw(lrs)
    if draw(st.integers(0, 4)) == 0:
        kw["lr"] = ("tensor", abs(kw["lr"]))  # a Tensor lr (made into one when the run starts)
    kw["weight_decay"] = draw(weight_decays)
    kw["maximize"] = draw(st.booleans())
    if name == "SGD":
        kw["momentum"] = draw(momenta)
        kw["dampening"] = draw(dampenings)
        # nesterov is valid only with momentum and no dampening; an invalid combination rarely.
        valid = kw["momentum"] > 0 and kw["dampening"] == 0
        kw["nesterov"] = draw(st.booleans()) if valid else draw(st.integers(0, 9)) == 0
    else:
        kw["eps"] = draw(epss)
        # capturable=True on CPU params: torch refuses it at step (an AssertionError).
        if draw(st.integers(0, 24)) == 0:
            kw["capturable"] = True
    if name in ("Adam", "AdamW"):
        kw["betas"] = (draw(betas1), draw(betas2))
        kw["amsgrad"] = draw(st.booleans())
        if name == "Adam" and draw(st.booleans()):
            kw["decoupled_weight_decay"] = draw(st.booleans())
    if name == "RMSprop":
        kw["alpha"] = draw(alphas)
        kw["momentum"] = draw(momenta)
        kw["centered"] = draw(st.booleans())
        if kw["centered"] and 0 <= kw["alpha"] < 0.1:
            # With alpha ~ 0 the centered variance g*g - lerp(ga, g, 1-alpha)**2 is rounding
            # noise (it is 0 in exact arithmetic), and 1 ulp decides the step: ill-conditioned,
            # not a parity question.
            kw["alpha"] = 0.5
    return kw


SHAPES = st.one_of(
    st.just(()),
    st.sampled_from([(0,), (1,), (7,), (9,), (17,), (33,), (65,), (1025,)]),
    st.tuples(st.integers(1, 5), st.integers(0, 6)),
    st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 5)),
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
    st.sampled_from([(0, 3), (2, 0, 4), (3, 1, 2, 0)]),
)


@st.composite
def layouts(draw, shape: tuple[int, ...], for_grad: bool):
    """A memory layout for a tensor of ``shape``: ('contiguous',), ('permuted', perm),
    ('sliced', dim), ('channels_last',), ('expanded', dims) (stride 0 along ``dims``)."""
    n = len(shape)
    choices = ["contiguous"]
    if n >= 1:
        choices += ["sliced"]
    if n >= 2:
        choices += ["permuted", "permuted"]
    if n == 4:
        choices += ["channels_last"]
    big_dims = [d for d in range(n) if shape[d] > 1]
    if big_dims and (for_grad or draw(st.integers(0, 14)) == 0):
        # Expanded grads are common (the grad of a sum); expanded params are refused by torch's
        # in-place ops (a RuntimeError), rarely drawn.
        choices += ["expanded"]
    kind = draw(st.sampled_from(choices))
    if kind == "permuted":
        return ("permuted", tuple(draw(st.permutations(range(n)))))
    if kind == "sliced":
        return ("sliced", draw(st.integers(0, n - 1)))
    if kind == "expanded":
        return ("expanded", tuple(sorted(draw(st.sets(st.sampled_from(big_dims), min_size=1)))))
    return (kind,)


@st.composite
def grad_plans(draw, shape, dtype_name, param_dtype_name):
    """How one param's grad looks on one step (None: no grad this step)."""
    if draw(st.integers(0, 4)) == 0:
        return None
    plan = {
        "seed": draw(st.integers(0, 2**16)),
        "layout": draw(layouts(shape, for_grad=True)),
        "scale": draw(st.sampled_from([1.0, 1.0, 1e-3, 1e3, 0.0])),
    }
    if draw(st.integers(0, 5)) == 0 and math.prod(shape) > 0:
        plan["nonfinite"] = draw(
            st.lists(st.tuples(st.integers(0, math.prod(shape) - 1), st.sampled_from(["nan", "inf", "-inf"])), min_size=1, max_size=3)
        )
    # A grad of another dtype, set with `p.grad.data = ...` (torch allows it and steps
    # float32 params with float64 grads in SGD/RMSprop).
    if param_dtype_name == "float32" and draw(st.integers(0, 29)) == 0:
        plan["data_dtype"] = "float64"
    return plan


@st.composite
def runs(draw):
    name = draw(st.sampled_from(list(CLASSES)))
    kw = draw(hyperparameters(name))
    n_params = draw(st.integers(1, 4))
    mixed = draw(st.integers(0, 3)) == 0
    base_dtype = draw(st.sampled_from(["float32", "float64", "complex64", "float32", "float64"]))
    params = []
    for _ in range(n_params):
        dtype = draw(st.sampled_from(list(DTYPES))) if mixed else base_dtype
        shape = draw(SHAPES)
        params.append({"dtype": dtype, "shape": shape, "layout": draw(layouts(shape, for_grad=False)), "seed": draw(st.integers(0, 2**16))})
    # The same param twice in a group, or two params that are overlapping views of one buffer:
    # torch steps them one after the other.
    extra = draw(st.sampled_from([None] * 14 + ["duplicate", "overlapping"]))
    n_steps = draw(st.integers(1, 4))
    grads = [
        [draw(grad_plans(p["shape"], p["dtype"], p["dtype"])) for p in params]
        for _ in range(n_steps)
    ]
    # Two params sometimes share one grad tensor (read only: fine), or a grad is its own param.
    shared_grad = draw(st.sampled_from([None] * 12 + ["shared", "param_itself"]))
    # A second param group with its own lr and weight decay, sometimes.
    split = draw(st.integers(0, n_params)) if n_params > 1 and draw(st.booleans()) else None
    group2 = {"lr": draw(lrs), "weight_decay": draw(weight_decays)} if split is not None else None
    # Hyperparameters rewritten before a step (as schedulers do), and state dicts swapped
    # between the implementations after a step.
    rewrites = {}
    for s in range(1, n_steps):
        if draw(st.integers(0, 3)) == 0:
            rewrites[s] = draw(rewrite(name))
    swap = draw(st.sampled_from([None, None] + list(range(1, n_steps)))) if n_steps > 1 else None
    swap_step_kind = draw(st.sampled_from(["keep"] * 6 + ["float64", "int64", "python"])) if swap else None
    return {
        "name": name,
        "kwargs": kw,
        "params": params,
        "extra": extra,
        "grads": grads,
        "shared_grad": shared_grad,
        "split": split,
        "group2": group2,
        "rewrites": rewrites,
        "swap_after": swap,
        "swap_step_kind": swap_step_kind,
    }


@st.composite
def rewrite(draw, name):
    key = draw(
        st.sampled_from(
            {
                "SGD": ["lr", "momentum", "weight_decay", "maximize", "dampening"],
                "Adam": ["lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"],
                "AdamW": ["lr", "betas", "eps", "weight_decay", "maximize"],
                "RMSprop": ["lr", "alpha", "momentum", "centered", "eps", "weight_decay"],
            }[name]
        )
    )
    value = {
        "lr": lrs.filter(lambda x: x >= 0),
        "momentum": st.sampled_from([0.0, 0.5, 0.9]),
        "dampening": st.sampled_from([0.0, 0.3]),
        "weight_decay": st.sampled_from([0.0, 0.01]),
        "maximize": st.booleans(),
        "betas": st.tuples(st.sampled_from([0.0, 0.8, 0.9]), st.sampled_from([0.9, 0.99, 0.999])),
        "eps": st.sampled_from([1e-8, 1e-3]),
        "amsgrad": st.booleans(),
        "alpha": st.sampled_from([0.9, 0.99]),
        "centered": st.booleans(),
    }[key]
    return (key, draw(value))


# -------------------------------------------------------------------------------------------
# building tensors from the drawn data
# -------------------------------------------------------------------------------------------


def values(shape, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if dtype.is_complex:
        x = torch.complex(x, torch.randn(shape, generator=gen, dtype=torch.float64) * scale)
    return x.to(dtype)


def laid_out(v: torch.Tensor, layout: tuple, gap_fill: float) -> torch.Tensor:
    """A tensor equal to ``v`` with the given memory layout (gaps hold ``gap_fill``)."""
    kind = layout[0]
    if kind == "contiguous":
        return v.clone()
    if kind == "permuted":
        perm = list(layout[1])
        inverse = [perm.index(i) for i in range(len(perm))]
        return v.permute(perm).contiguous().permute(inverse)
    if kind == "channels_last":
        return v.contiguous(memory_format=torch.channels_last)
    if kind == "sliced":
        dim = layout[1]
        big_shape = list(v.shape)
        big_shape[dim] = 2 * big_shape[dim] + 1
        big = torch.full(big_shape, gap_fill, dtype=v.dtype)
        index = [slice(None)] * v.dim()
        index[dim] = slice(1, None, 2)
        view = big[tuple(index)]
        view.copy_(v)
        return view
    if kind == "expanded":
        index = [slice(None)] * v.dim()
        for d in layout[1]:
            index[d] = slice(0, 1)
        return v[tuple(index)].clone().expand(v.shape)
    raise AssertionError(layout)


def twin_all(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Copies of ``tensors`` with the same sizes, strides and offsets over copies of their
    storages; tensors that shared a storage share the copy (aliasing is reproduced)."""
    storages: dict[int, Any] = {}
    made: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor | None] = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        if id(t) in made:  # the same tensor twice: the same copy twice
            out.append(made[id(t)])
            continue
        original = t
        t = t.detach()
        key = t.untyped_storage().data_ptr()
        if key not in storages:
            storages[key] = t.untyped_storage().clone()
        copy_ = torch.empty(0, dtype=t.dtype)
        copy_.set_(storages[key], t.storage_offset(), t.size(), t.stride())
        made[id(original)] = copy_
        out.append(copy_)
    return out


def outside_view(t: torch.Tensor) -> torch.Tensor:
    """The elements of ``t``'s storage that ``t`` does not cover (its gaps and margins)."""
    t = t.detach()
    flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (t.untyped_storage().nbytes() // t.element_size(),), (1,))
    if t.numel() == 0:
        return flat
    covered = torch.arange(flat.numel()).as_strided(t.shape, t.stride(), t.storage_offset())
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    mask[covered.reshape(-1)] = False
    return flat[mask]


def build_params(run) -> list[torch.Tensor]:
    params = []
    for spec in run["params"]:
        dtype = DTYPES[spec["dtype"]]
        params.append(laid_out(values(spec["shape"], dtype, spec["seed"]), spec["layout"], gap_fill=12345.0))
    if run["extra"] == "duplicate":
        params.append(params[0])
    elif run["extra"] == "overlapping":
        base = values((12,), DTYPES[run["params"][0]["dtype"]], run["params"][0]["seed"])
        params += [base[:8], base[4:]]
    return [p.requires_grad_() for p in params]


def make_grad(plan, p: torch.Tensor) -> torch.Tensor:
    dtype = p.dtype
    g = values(tuple(p.shape), dtype, plan["seed"], plan["scale"])
    flat = g.view(-1) if g.dim() else g.view(1)
    for index, what in plan.get("nonfinite", []):
        flat[index % max(1, flat.numel())] = float(what)
    return laid_out(g, plan["layout"], gap_fill=float("nan"))


def param_groups(run, params):
    if run["split"] is None:
        return params
    s = run["split"]
    return [{"params": params[:s]}, {"params": params[s:], **run["group2"]}]


def kwargs_for(run, *, ref: bool) -> dict[str, Any]:
    kw = copy.deepcopy(run["kwargs"])
    if isinstance(kw["lr"], tuple):
        kw["lr"] = torch.tensor(kw["lr"][1])
    if ref:
        kw["foreach"] = False
    return kw


def plan_of(run, step, i):
    """The grad plan of param ``i`` (the extra params of 'duplicate'/'overlapping' reuse the
    first param's, in a contiguous layout)."""
    plans = run["grads"][step]
    if i < len(plans):
        return plans[i]
    if plans[0] is None:
        return None
    return {**plans[0], "layout": ("contiguous",), "seed": plans[0]["seed"] + i}


def set_grads(run, step, params):
    """The grads of one step for torch's params; returns them (in param order)."""
    grads: list[torch.Tensor | None] = []
    for i, p in enumerate(params):
        plan = plan_of(run, step, i)
        grads.append(None if plan is None else make_grad(plan, p))
    if run["shared_grad"] == "shared" and len(params) > 1 and grads[0] is not None:
        for i in range(1, len(params)):
            if params[i].shape == params[0].shape and params[i].dtype == params[0].dtype and grads[i] is not None:
                grads[i] = grads[0]
                break
    elif run["shared_grad"] == "param_itself" and grads[0] is not None:
        grads[0] = params[0].detach()
    return grads


def assign_grads(run, step, params, grads):
    for i, (p, g) in enumerate(zip(params, grads)):
        plan = plan_of(run, step, i)
        p.grad = g
        if g is not None and plan is not None and "data_dtype" in plan and p.dtype == torch.float32:
            p.grad.data = g.to(torch.float64)


def assert_state_dicts_match(ours: dict, ref: dict, where: str) -> None:
    assert sorted(ours) == sorted(ref), f"{where}: state_dict keys {sorted(ours)} != {sorted(ref)}"
    assert sorted(ours["state"]) == sorted(ref["state"]), f"{where}: state indices {sorted(ours['state'])} != {sorted(ref['state'])}"
    for index, s_ref in ref["state"].items():
        s_ours = ours["state"][index]
        assert sorted(s_ours) == sorted(s_ref), f"{where}: state[{index}] keys {sorted(s_ours)} != {sorted(s_ref)}"
        for key, v in s_ref.items():
            assert type(s_ours[key]) is type(v), f"{where}: state[{index}][{key!r}] type"
    assert len(ours["param_groups"]) == len(ref["param_groups"]), f"{where}: number of param groups"
    for g_ours, g_ref in zip(ours["param_groups"], ref["param_groups"]):
        assert sorted(g_ours) == sorted(g_ref), f"{where}: param group keys {sorted(g_ours)} != {sorted(g_ref)}"
        for key, v in g_ref.items():
            if key == "foreach":  # torch's side runs with foreach=False on purpose
                continue
            w = g_ours[key]
            if isinstance(v, torch.Tensor):
                assert isinstance(w, torch.Tensor) and w.dtype == v.dtype and torch.equal(w, v), f"{where}: group[{key!r}]"
            else:
                assert w == v or (v != v and w != w), f"{where}: group[{key!r}] {w!r} != {v!r}"


def assert_outside_untouched(ours_tensors, ref_tensors, what: str, where: str) -> None:
    for i, (a, b) in enumerate(zip(ours_tensors, ref_tensors)):
        if a is None or b is None:
            continue
        oa, ob = outside_view(a), outside_view(b)
        assert oa.shape == ob.shape and torch.equal(bits(oa), bits(ob)), (
            f"{where}: the storage of {what} {i} changed outside the view"
        )


def outcome(fn):
    """('ok', result) or ('raised', exception)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok", fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return "raised", e


def same_outcome(ours, ref, what: str) -> bool:
    """Checks that both sides raised the same type or both did not; True if both went on."""
    (o_kind, o_val), (r_kind, r_val) = ours, ref
    if r_kind == "raised":
        assert o_kind == "raised", f"{what}: torch raised {type(r_val).__name__}: {r_val}, but rsoptim did not"
        assert type(o_val) is type(r_val), (
            f"{what}: torch raised {type(r_val).__name__}: {r_val}; rsoptim raised {type(o_val).__name__}: {o_val}"
        )
        return False
    assert o_kind == "ok", f"{what}: torch went on, rsoptim raised {type(o_val).__name__}: {o_val}"
    return True


def retype_steps(sd: dict, kind: str) -> dict:
    """A state dict as another program may have saved it: step counts of another kind."""
    for s in sd["state"].values():
        if "step" in s and isinstance(s["step"], torch.Tensor):
            value = s["step"].item()
            s["step"] = {
                "keep": s["step"],
                "float64": torch.tensor(value, dtype=torch.float64),
                "int64": torch.tensor(int(value), dtype=torch.int64),
                "python": value,
            }[kind]
    return sd


def check_run(run) -> None:
    ref_cls, our_cls = CLASSES[run["name"]]
    ref_params = build_params(run)
    our_params = [t.requires_grad_() for t in twin_all(ref_params)]
    made = [
        outcome(lambda: ref_cls(param_groups(run, ref_params), **kwargs_for(run, ref=True))),
        outcome(lambda: our_cls(param_groups(run, our_params), **kwargs_for(run, ref=False))),
    ]
    if not same_outcome(made[1], made[0], "construction"):
        return
    ref, ours = made[0][1], made[1][1]
    for step in range(len(run["grads"])):
        where = f"step {step + 1}"
        if step in run["rewrites"]:
            key, value = run["rewrites"][step]
            for opt in (ref, ours):
                for group in opt.param_groups:
                    if key == "lr" and isinstance(group["lr"], torch.Tensor):
                        group["lr"].fill_(value)
                    else:
                        group[key] = value
        grads = set_grads(run, step, ref_params)
        our_grads = twin_all(grads)  # before `p.grad.data = ...` retypes torch's
        assign_grads(run, step, ref_params, grads)
        assign_grads(run, step, our_params, our_grads)
        if run["shared_grad"] == "param_itself" and grads[0] is not None:
            our_params[0].grad = our_params[0].detach()
        stepped = [outcome(ref.step), outcome(ours.step)]
        if not same_outcome(stepped[1], stepped[0], where):
            return
        exact_grads = run["shared_grad"] != "param_itself"
        assert_optimizers_match(ours, ref, equal_nan=True, grads_exact=exact_grads, where=where)
        assert_outside_untouched(our_params, ref_params, "param", where)
        assert_outside_untouched([p.grad for p in our_params], [p.grad for p in ref_params], "grad", where)
        assert_state_dicts_match(ours.state_dict(), ref.state_dict(), where)
        if run["swap_after"] == step + 1:
            # Save from each implementation, load into a fresh one of the other, go on.
            from_ours = retype_steps(copy.deepcopy(ours.state_dict()), run["swap_step_kind"])
            from_ref = retype_steps(copy.deepcopy(ref.state_dict()), run["swap_step_kind"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's duplicate-param warning, as in outcome()
                ref = ref_cls(param_groups(run, ref_params), **kwargs_for(run, ref=True))
                ours = our_cls(param_groups(run, our_params), **kwargs_for(run, ref=False))
            loaded = [outcome(lambda: ref.load_state_dict(from_ours)), outcome(lambda: ours.load_state_dict(from_ref))]
            if not same_outcome(loaded[1], loaded[0], f"load_state_dict after {where}"):
                return
            for group in ref.param_groups:
                group["foreach"] = False
            assert_optimizers_match(ours, ref, equal_nan=True, grads_exact=exact_grads, where=f"after the swap at {where}")


@fuzz_settings(400)
@given(run=runs())
def test_optimizers_match_torch(run):
    check_run(run)


# -------------------------------------------------------------------------------------------
# clip_grad_norm_
# -------------------------------------------------------------------------------------------

CLIP_DTYPES = ["float32", "float64", "complex64", "complex128"]
CLIP_SCALES = [1.0, 1.0, 3e19, 1e-30, 1e-20, 1e20, 1e155, 1e-160, 0.0]


@st.composite
def clip_cases(draw, dtypes=CLIP_DTYPES, mixed_dtypes=CLIP_DTYPES, scales=CLIP_SCALES):
    n = draw(st.integers(0, 4))
    base = draw(st.sampled_from(dtypes))
    mixed = draw(st.integers(0, 3)) == 0
    grads = []
    for _ in range(n):
        shape = draw(SHAPES)
        plan = None
        if draw(st.integers(0, 5)) != 0:
            plan = {
                "seed": draw(st.integers(0, 2**16)),
                "layout": draw(layouts(shape, for_grad=True)),
                "scale": draw(st.sampled_from(scales)),
            }
            if draw(st.integers(0, 5)) == 0 and math.prod(shape) > 0:
                plan["nonfinite"] = draw(
                    st.lists(st.tuples(st.integers(0, math.prod(shape) - 1), st.sampled_from(["nan", "inf", "-inf"])), min_size=1, max_size=2)
                )
        grads.append({"dtype": draw(st.sampled_from(mixed_dtypes)) if mixed else base, "shape": shape, "grad": plan})
    return {
        "grads": grads,
        "max_norm": draw(st.sampled_from([1.0, 0.5, 1e-3, 0.0, 1e6, 1e30])),
        "norm_type": draw(st.sampled_from([2.0, 2.0, 1.0, 1, 2, 3.5, math.inf, "inf", 0.5])),
        "error_if_nonfinite": draw(st.booleans()),
        "foreach": draw(st.sampled_from([None, False])),
        "container": draw(st.sampled_from(["list", "list", "tuple", "generator", "single"])),
        "duplicate": draw(st.integers(0, 14)) == 0,  # the same param twice in the list
    }


def clip_params(case) -> list[torch.Tensor]:
    params = []
    for i, spec in enumerate(case["grads"]):
        dtype = {**DTYPES, **HALF}[spec["dtype"]]
        p = torch.zeros(spec["shape"], dtype=dtype, requires_grad=True)
        if spec["grad"] is not None:
            p.grad = make_grad(spec["grad"], p)
        params.append(p)
    if case["duplicate"] and params:
        params.append(params[0])
    return params


def clip_container(case, params):
    kind = case["container"]
    if kind == "single" and len(params) == 1:
        return params[0]
    if kind == "tuple":
        return tuple(params)
    if kind == "generator":
        return (p for p in params)
    return list(params)


def check_clip(case, fn_ours, fn_ref) -> None:
    ref_params = clip_params(case)
    seen: dict[int, torch.Tensor] = {}
    our_params = []
    for p in ref_params:
        if id(p) not in seen:
            q = torch.zeros_like(p).requires_grad_()
            if p.grad is not None:
                q.grad = twin_all([p.grad])[0]
            seen[id(p)] = q
        our_params.append(seen[id(p)])
    args = dict(norm_type=case["norm_type"], error_if_nonfinite=case["error_if_nonfinite"], foreach=case["foreach"])
    before = [None if p.grad is None else p.grad.clone() for p in our_params]
    r = outcome(lambda: fn_ref(clip_container(case, ref_params), case["max_norm"], **args))
    o = outcome(lambda: fn_ours(clip_container(case, our_params), case["max_norm"], **args))
    torch_raised = r[0] == "raised"
    same_totals = False
    if same_outcome(o, r, "clip_grad_norm_"):
        total_ref, total_ours = r[1], o[1]
        assert isinstance(total_ours, torch.Tensor)
        assert total_ours.dtype == total_ref.dtype, f"total norm dtype {total_ours.dtype} != torch's {total_ref.dtype}"
        assert total_ours.shape == total_ref.shape
        # Each group's norms are computed in the group's dtype, so the total is only as precise
        # as the least precise group's norms (a float64 total over float32 grads included).
        grad_dtypes = [p.grad.dtype for p in ref_params if p.grad is not None]
        least_precise = max(grad_dtypes + [total_ref.dtype], key=lambda d: TOLERANCES[d][0])
        rtol, atol = TOLERANCES[least_precise]
        torch.testing.assert_close(total_ours, total_ref, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"total norm: {m}")
        same_totals = bool(torch.equal(bits(total_ours), bits(total_ref)) or (total_ours.isnan() & total_ref.isnan()))
    # The grads: as torch left them (untouched where torch raised before scaling).
    for i, (p, q) in enumerate(zip(our_params, ref_params)):
        if q.grad is None:
            assert p.grad is None
            continue
        rtol, atol = TOLERANCES[q.grad.dtype]
        if torch_raised:
            if "non-finite" in str(r[1]):
                # error_if_nonfinite: refused before any grad is scaled.
                assert torch.equal(bits(p.grad), bits(before[i])), f"grad {i} changed although clipping was refused"
            # Otherwise torch raised part way (an expanded grad it cannot scale in place, say)
            # and which dtype groups it had scaled by then is its own business.
            continue
        torch.testing.assert_close(
            p.grad, q.grad, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"grad {i} after clipping: {m}"
        )
        if q.grad.dtype in HALF.values() and same_totals:
            # Half-precision grads are scaled in float32 and rounded once, as torch's
            # _foreach_mul_ does: with the same total (so the same factor), the same bits.
            same_values(p.grad.contiguous(), q.grad.contiguous(), f"grad {i} ({q.grad.dtype}) after clipping")
        assert_outside_untouched([p.grad], [q.grad], "grad", "clip_grad_norm_")


@fuzz_settings(600)
@given(case=clip_cases())
def test_clip_grad_norm_matches_torch(case):
    check_clip(case, rsoptim.clip_grad_norm_, torch.nn.utils.clip_grad_norm_)


# -------------------------------------------------------------------------------------------
# bfloat16 / float16 params
# -------------------------------------------------------------------------------------------
#
# The contract (README "Where the work goes", docs/torch-contract.md section 2): every value is
# computed in float32 and each stored value is rounded once, to nearest even. The references:
# * Adam/AdamW with state in the param's dtype (the default): torch's fused CPU kernel
#   (``fused=True``), bit for bit. That kernel steps 32 elements (16 without AVX-512) at a time
#   and finishes each tensor with a scalar loop over the last ``numel % 32`` elements, which
#   computes otherwise than the vector body in three ways (see ``FUSED_TAIL_DIFFERENCES``);
#   rsoptim follows the vector body everywhere. So the exact reference runs torch's fused kernel on copies padded
#   to a whole number of vectors (every element of interest in the vector body; the elements
#   are independent), and a second, unpadded fused run must agree bit for bit outside the tail.
# * SGD and RMSprop (torch's fused SGD is broken for half params, RMSprop has none), and every
#   optimizer with ``state_dtype=torch.float32``: torch's own float32 for-loop run on float32
#   copies, one step at a time, with the param (and, without state_dtype, every state tensor)
#   rounded to the half dtype after each step. The next step re-loads the rounded values, exactly
#   as rsoptim re-loads its stored half values, so the reference stays exact over many steps.
#   Two deviations from torch's for-loop, both for a principled reason:
#   - its ``sqrt`` is the IEEE one (``conftest.ieee_sqrt``): torch's float32 CPU ``Tensor.sqrt``
#     is not correctly rounded, torch's fused kernel's and rsoptim's are. After the rounding to
#     a half dtype the 1-ulp float32 difference shows wherever the float32 result lies near a
#     rounding boundary (measured with torch's sqrt: bfloat16 Adam with float32 state, 3 of
#     65569 params one ulp apart after one step, where ``p + update`` cancels);
#   - Adam/AdamW get a Tensor lr as a Python float: rsoptim gives half params the fused kernel's
#     rule (``lr.item<double>()``), where the for-loop would divide the float32 Tensor by the
#     bias correction in float32.
#   And one relaxation: the sign of zeros written by ``lerp`` (``ZERO_SIGN_FROM_LERP``).
# Both references run on contiguous copies (torch's fused kernel walks memory linearly and gets
# other layouts wrong, docs/torch-contract.md 3.1); rsoptim runs on the drawn layouts and must
# give the same values. NaNs must sit in the same places (their sign bits are not compared:
# ``-grad`` and ``grad * -1`` differ there); every other value must be bit for bit equal.

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}

#: torch's fused Adam kernel steps ``Vectorized<half>::size()`` elements at a time (64-byte
#: vectors with AVX-512, 32-byte ones otherwise) and finishes each tensor with a scalar loop over
#: the last ``numel % size`` elements (its parallel chunks are multiples of 64 bytes, so only the
#: end of a tensor is a tail).
FUSED_HALF_VEC = 32 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 16

HALF_SHAPES = st.one_of(
    st.just(()),
    st.sampled_from([(0,), (1,), (7,), (31,), (32,), (33,), (63,), (64,), (65,), (97,), (1025,)]),
    st.tuples(st.integers(1, 6), st.integers(0, 40)),
    st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 9)),
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 5)),
)


def valid_hyperparameters(name: str, kw: dict[str, Any]) -> dict[str, Any]:
    """``hyperparameters(name)`` with the invalid values replaced by valid ones: invalid
    arguments are the float32 property's business, the numbers are this one's."""
    kw = dict(kw)
    kw.pop("capturable", None)
    if isinstance(kw["lr"], tuple):
        kw["lr"] = ("tensor", abs(kw["lr"][1]))
    else:
        kw["lr"] = abs(kw["lr"])
    kw["weight_decay"] = max(kw["weight_decay"], 0.0)
    if "eps" in kw:
        kw["eps"] = max(kw["eps"], 0.0)
    if "betas" in kw:
        b1, b2 = kw["betas"]
        kw["betas"] = (b1 if 0 <= b1 < 1 else 0.9, b2 if 0 <= b2 < 1 else 0.999)
    if "momentum" in kw:
        kw["momentum"] = max(kw["momentum"], 0.0)
    if "alpha" in kw:
        kw["alpha"] = kw["alpha"] if kw["alpha"] >= 0 else 0.99
    if name == "SGD":
        kw["nesterov"] = kw["nesterov"] and kw["momentum"] > 0 and kw["dampening"] == 0
    return kw


@st.composite
def half_grad_plans(draw, shape):
    if draw(st.integers(0, 5)) == 0:
        return None
    plan = {
        "seed": draw(st.integers(0, 2**16)),
        "layout": draw(layouts(shape, for_grad=True)),
        # 1e-5: float16 subnormals; 2e3: float16 squares past its largest value (65504).
        "scale": draw(st.sampled_from([1.0, 1.0, 1e-3, 1e-5, 2e3, 0.0])),
    }
    if draw(st.integers(0, 5)) == 0 and math.prod(shape) > 0:
        plan["nonfinite"] = draw(
            st.lists(st.tuples(st.integers(0, math.prod(shape) - 1), st.sampled_from(["nan", "inf", "-inf"])), min_size=1, max_size=3)
        )
    return plan


HALF_REWRITES = {
    "SGD": ["lr", "weight_decay", "maximize"],
    "Adam": ["lr", "betas", "eps", "weight_decay", "maximize"],
    "AdamW": ["lr", "betas", "eps", "weight_decay", "maximize"],
    "RMSprop": ["lr", "alpha", "eps", "weight_decay", "maximize"],
}


@st.composite
def half_runs(draw):
    name = draw(st.sampled_from(list(CLASSES)))
    kw = valid_hyperparameters(name, draw(hyperparameters(name)))
    base = draw(st.sampled_from(list(HALF)))
    mixed = draw(st.integers(0, 4)) == 0  # bfloat16 and float16 params in one optimizer
    params = []
    for _ in range(draw(st.integers(1, 3))):
        shape = draw(HALF_SHAPES)
        layout = draw(layouts(shape, for_grad=False))
        if layout[0] == "expanded":
            layout = ("contiguous",)  # torch refuses expanded params (the float32 property's case)
        dtype = draw(st.sampled_from(list(HALF))) if mixed else base
        params.append({"dtype": dtype, "shape": shape, "layout": layout, "seed": draw(st.integers(0, 2**16))})
    n_steps = draw(st.integers(1, 4))
    grads = [[draw(half_grad_plans(p["shape"])) for p in params] for _ in range(n_steps)]
    split = draw(st.integers(0, len(params))) if len(params) > 1 and draw(st.booleans()) else None
    group2 = {"lr": abs(draw(lrs)), "weight_decay": max(draw(weight_decays), 0.0)} if split is not None else None
    rewrites = {}
    for s in range(1, n_steps):
        if draw(st.integers(0, 3)) == 0:
            key, value = draw(rewrite(name).filter(lambda kv: kv[0] in HALF_REWRITES[name]))
            rewrites[s] = (key, value)
    return {
        "name": name,
        "kwargs": kw,
        "state_dtype": draw(st.sampled_from([None, None, "float32"])),
        "params": params,
        "grads": grads,
        "split": split,
        "group2": group2,
        "rewrites": rewrites,
    }


def half_grad(plan, shape, dtype) -> torch.Tensor:
    """A grad of the half dtype, before it is laid out."""
    g = values(shape, dtype, plan["seed"], plan["scale"])
    flat = g.view(-1) if g.dim() else g.view(1)
    for index, what in plan.get("nonfinite", []):
        flat[index % max(1, flat.numel())] = float(what)
    return g


#: State keys written by ``lerp`` (and, for Adam, the param it feeds), whose zeros the float32
#: reference's comparison takes without their sign: ATen's lerp computes
#: ``fma(w - 1, end - start, end)`` for a weight ``w >= 0.5`` in its vector body and
#: ``end - (end - start) * (1 - w)`` in its scalar remainder (the same value, but a zero result
#: takes the other sign: grad -0.0 and beta1 0 give -0.0 in the vector body, +0.0 in the
#: remainder). The for-loop's ``lerp_`` thus signs such a zero by where the element falls in its
#: thread's chunk; rsoptim follows the vector body everywhere. A zero of either sign can only
#: become a zero of either sign in later steps (nothing divides by these values), so no non-zero
#: difference can hide here. The padded fused reference needs no such relaxation.
ZERO_SIGN_FROM_LERP = {"Adam": {"param", "exp_avg"}, "AdamW": {"param", "exp_avg"}, "RMSprop": {"grad_avg"}, "SGD": set()}

#: How the scalar tail of torch's fused Adam kernel computes otherwise than its vector body (the
#: padded reference has no tail; the unpadded fused run is compared outside its tail only, and
#: the elements of its tail that differ are counted here, by dtype and key, for inspection):
#: 1. ``exp_avg_sq``: the tail's ``v * beta2`` then ``+ c2 * g * g`` is contracted by the
#:    compiler into ``fma(v, beta2, c2*g*g)``, the vector body's into ``fma(c2*g, g, v*beta2)``
#:    (``v*beta2`` rounded to float32 first): at most a float32 ulp apart, which shows after the
#:    rounding to the half dtype where ``v*beta2`` falls (almost) exactly halfway between two
#:    half values (README: "in float16, ... about once in 100,000 elements"; bfloat16 too:
#:    bf16 Adam lr=0.1, betas=(0.9, 0.9), weight_decay=1e-4, two steps of one 3-element tensor,
#:    at step 2 v=0.0250244140625, p=1.15625, grad 6.18e-07: the tail stores 0.0224609375, the
#:    vector body and rsoptim 0.0225830078125). The param sees the unrounded v, a float32 ulp
#:    apart.
#: 2. amsgrad: the tail's ``std::max(max_exp_avg_sq, v)`` drops a NaN ``v``, the vector body's
#:    ``maximum`` (like the for-loop's ``torch.maximum``) propagates it; a finite ``exp_avg``
#:    then leaves the tail's param finite where the vector body's is NaN (float16, amsgrad,
#:    betas (0.9, 0.0), grads 3000 then 1: exp_avg_sq overflows to inf, then inf * 0 = NaN; the
#:    tail gives p = 0.8999, the vector body and rsoptim NaN).
#: 3. the sign of a zero ``exp_avg`` from lerp with ``1 - beta1 >= 0.5`` (see above).
FUSED_TAIL_DIFFERENCES: collections.Counter = collections.Counter()


def same_values(
    actual: torch.Tensor, expected: torch.Tensor, what: str, only: torch.Tensor | None = None, zero_sign: bool = True
) -> torch.Tensor:
    """Equal bit for bit, but for the sign and payload of NaNs (which must sit in the same
    places), and the sign of zeros unless ``zero_sign``; ``only`` (a flat mask over the elements
    in logical order) restricts the comparison. Returns the flat mask of elements that differ
    (raising if any does, unless ``what`` is None)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().reshape(-1), expected.detach().reshape(-1)
    a_nan, e_nan = a.isnan(), e.isnan()
    bad = (a_nan != e_nan) | (~a_nan & (bits(a) != bits(e)))
    if not zero_sign:
        bad &= ~((a == 0) & (e == 0))
    if only is not None:
        bad &= only
    if what is not None and bad.any():
        where = bad.nonzero().reshape(-1)[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements differ, e.g. at flat indices {where}: "
            f"{[a[i].item() for i in where]} != expected {[e[i].item() for i in where]}"
        )
    return bad


def padded(t: torch.Tensor) -> torch.Tensor:
    """A flat contiguous copy of ``t`` padded with zeros to a whole number of torch's vectors."""
    n = t.numel()
    out = torch.zeros(-(-n // FUSED_HALF_VEC) * FUSED_HALF_VEC, dtype=t.dtype)
    out[:n] = t.detach().reshape(-1)
    return out


def unpadded(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.detach()[: like.numel()].reshape(like.shape)


def half_kwargs(run, *, for_ref: str | None) -> dict[str, Any]:
    """The optimizer's arguments: rsoptim's (``for_ref=None``), torch's fused kernel's
    ('fused') or torch's float32 for-loop's ('float32')."""
    kw = copy.deepcopy(run["kwargs"])
    if isinstance(kw["lr"], tuple):
        kw["lr"] = torch.tensor(kw["lr"][1])
    if for_ref is None:
        if run["state_dtype"] == "float32":
            kw["state_dtype"] = torch.float32
    elif for_ref == "fused":
        kw["fused"] = True
    else:
        kw["foreach"] = False
        if run["name"] in ("Adam", "AdamW") and isinstance(kw["lr"], torch.Tensor):
            kw["lr"] = kw["lr"].item()  # the fused rule: a Tensor lr read as a double (see above)
    return kw


def set_hyperparameter(opt, key, value) -> None:
    for group in opt.param_groups:
        if key == "lr" and isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group[key] = value


def check_half_run(run) -> None:
    name = run["name"]
    ref_cls, our_cls = CLASSES[name]
    fused = name in ("Adam", "AdamW") and run["state_dtype"] is None
    state_dtype = torch.float32 if run["state_dtype"] == "float32" else None
    dtypes = [HALF[spec["dtype"]] for spec in run["params"]]
    starts = [values(spec["shape"], dtype, spec["seed"]) for spec, dtype in zip(run["params"], dtypes)]
    ours_p = [laid_out(v.clone(), spec["layout"], gap_fill=12345.0).requires_grad_() for v, spec in zip(starts, run["params"])]
    outside_before = [outside_view(p).clone() for p in ours_p]
    ours = our_cls(param_groups(run, ours_p), **half_kwargs(run, for_ref=None))
    if fused:
        ref_p = [padded(v).requires_grad_() for v in starts]
        plain_p = [v.clone().requires_grad_() for v in starts]  # torch's fused kernel, tails and all
        plain = ref_cls(param_groups(run, plain_p), **half_kwargs(run, for_ref="fused"))
    else:
        ref_p = [v.float().requires_grad_() for v in starts]
        plain_p, plain = [], None
    ref = ref_cls(param_groups(run, ref_p), **half_kwargs(run, for_ref="fused" if fused else "float32"))
    for step in range(len(run["grads"])):
        where = f"{name} step {step + 1}"
        if step in run["rewrites"]:
            for opt in (ref, ours, plain):
                if opt is not None:
                    set_hyperparameter(opt, *run["rewrites"][step])
        ours_grads = []
        for i, (p, q) in enumerate(zip(ours_p, ref_p)):
            plan = run["grads"][step][i]
            g = None
            if plan is not None:
                g = laid_out(half_grad(plan, tuple(p.shape), p.dtype), plan["layout"], gap_fill=float("nan"))
                ours_grads.append((g, bits(g).clone(), outside_view(g).clone()))
            else:
                ours_grads.append(None)
            p.grad = g
            q.grad = None if g is None else padded(g) if fused else g.float().contiguous()
            if plain is not None:
                plain_p[i].grad = None if g is None else g.contiguous()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fused:
                ref.step()
                plain.step()
            else:
                with ieee_sqrt() as sqrt_calls:
                    ref.step()
                if name != "SGD" and any(q.grad is not None and q.numel() for q in ref_p):
                    assert sqrt_calls[0] > 0, "the reference no longer calls Tensor.sqrt: revisit ieee_sqrt"
            ours.step()
        if not fused:
            # Round what rsoptim stores in a half dtype, once, as it does.
            with torch.no_grad():
                for q, dtype in zip(ref_p, dtypes):
                    q.copy_(q.to(dtype))
                    if state_dtype is None:
                        for key, value in ref.state[q].items():
                            if key != "step":
                                value.copy_(value.to(dtype))
        lerp_keys = set() if fused else ZERO_SIGN_FROM_LERP[name]
        for i, (p, q, dtype) in enumerate(zip(ours_p, ref_p, dtypes)):
            tag = f"{where}, param {i} ({dtype}, shape {tuple(p.shape)}, layout {run['params'][i]['layout']})"
            s_ours, s_ref = ours.state.get(p, {}), ref.state.get(q, {})
            assert set(s_ours) == set(s_ref), f"{tag}: state keys {sorted(s_ours)} != {sorted(s_ref)}"
            expected_p = unpadded(q, p) if fused else q.detach().to(dtype)
            same_values(p.detach().contiguous(), expected_p, f"{tag}: param", zero_sign="param" not in lerp_keys)
            for key, expected in s_ref.items():
                actual = s_ours[key]
                if key == "step":
                    assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{tag}: step"
                    assert actual.item() == expected.item(), f"{tag}: step {actual.item()} != {expected.item()}"
                    continue
                want_dtype = state_dtype or dtype
                assert actual.dtype == want_dtype, f"{tag}: state[{key!r}] dtype {actual.dtype} != {want_dtype}"
                expected = unpadded(expected, p) if fused else expected.to(want_dtype)
                same_values(actual.contiguous(), expected, f"{tag}: state[{key!r}]", zero_sign=key not in lerp_keys)
            if fused:
                check_against_unpadded_fused(p, plain_p[i], s_ours, plain.state.get(plain_p[i], {}), tag)
            assert torch.equal(bits(outside_view(p)), bits(outside_before[i])), f"{tag}: storage changed outside the param"
            if ours_grads[i] is not None:
                grad, grad_bits, grad_outside = ours_grads[i]
                assert p.grad is grad and torch.equal(bits(grad), grad_bits), f"{tag}: the grad was written"
                assert torch.equal(bits(outside_view(grad)), bits(grad_outside)), f"{tag}: storage changed outside the grad"


def check_against_unpadded_fused(p, plain_q, s_ours, s_plain, tag) -> None:
    """torch's fused kernel on the unpadded tensor: bit for bit outside its scalar tail; what
    differs in the tail is counted by kind (``FUSED_TAIL``). Tail differences carry over to later
    steps through the state, but only within the tail (the elements are independent)."""
    n = p.numel()
    body = torch.zeros(n, dtype=torch.bool)
    body[: n - n % FUSED_HALF_VEC] = True
    same_values(p.detach().contiguous(), plain_q.detach(), f"{tag}: param (unpadded fused run)", only=body)
    for key, expected in s_plain.items():
        if key == "step":
            continue
        actual = s_ours[key].contiguous()
        same_values(actual, expected, f"{tag}: state[{key!r}] (unpadded fused run)", only=body)
        differs = same_values(actual, expected, None, only=~body)
        if differs.any():
            FUSED_TAIL_DIFFERENCES[f"{p.dtype} {key}"] += int(differs.sum())
    differs = same_values(p.detach().contiguous(), plain_q.detach(), None, only=~body)
    if differs.any():
        FUSED_TAIL_DIFFERENCES[f"{p.dtype} param"] += int(differs.sum())


@fuzz_settings(300)
@given(run=half_runs())
def test_half_precision_optimizers_match_torch(run):
    check_half_run(run)


# -------------------------------------------------------------------------------------------
# master_weights / stochastic_rounding on bfloat16 / float16 params
# -------------------------------------------------------------------------------------------
#
# The contract (README "Half-precision params", docs/torch-contract.md 2.6): with
# ``master_weights=True`` the step loads the param's float32 copy ``state['master_param']``
# instead of the param, stores it unrounded and the param as its rounding to nearest; with
# ``stochastic_rounding=True`` the param is stored as one of the two values of its dtype around
# the float32 result (keyed by seed, param, step and element, so reproducible and the same for
# any thread count); the state is rounded to nearest either way. float32 params in the same
# optimizer are left exactly as without the options.
#
# The references are the half-precision property's (torch's fused kernel on padded copies for
# Adam/AdamW with state in the param's dtype, the float32 for-loop with ``ieee_sqrt`` and the
# fused Tensor-lr rule otherwise), run on float32 params (the fused kernel's float32 vector body
# computes as its bfloat16/float16 one does, once the values are loaded):
# * with master weights, over the whole run on float32 params that are never rounded (the
#   state rounded to its dtype after each step where it is half): the master copy must equal
#   the reference param bit for bit after every step (the param never feeds back into it);
# * with stochastic rounding alone, one step at a time from rsoptim's own param and state
#   before the step (so that only this step's rounding is tested: later steps start from
#   wherever the random bits took the param).
# Each run also goes a second time with 2 kernel threads instead of 1 (a big param is drawn
# now and then, so that a step is cut into pieces over the threads), its optimizer replaced
# mid-run by a fresh one built without the options that loads a deep copy of the state dict:
# the two runs must agree bit for bit, params and state.

#: Elements of the big param drawn now and then: more than the kernels' threshold for running
#: a step on several threads (``OPENMP_PARALLEL_MIN_ELEMENTS``, 2^16, on torch's OpenMP threads;
#: under RSOPTIM_BACKEND=rayon the threshold is 2^19 and the step stays on one thread).
EXTENSION_BIG = (1 << 16) + 37
EXTENSION_DTYPES = {**HALF, "float32": torch.float32}


@st.composite
def extension_runs(draw, stochastic: bool):
    """A ``half_runs`` run with float32 params mixed in, sometimes a big half param, and the
    options: master weights (always without ``stochastic``, else drawn), stochastic rounding
    with a drawn seed (None: ``torch.initial_seed()``), and the step after which the second
    run's optimizer is replaced through its state dict."""
    run = draw(half_runs())
    params, grads = run["params"], run["grads"]
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        shape = draw(HALF_SHAPES)
        layout = draw(layouts(shape, for_grad=False))
        at = draw(st.integers(0, len(params)))
        params.insert(
            at,
            {
                "dtype": "float32",
                "shape": shape,
                "layout": ("contiguous",) if layout[0] == "expanded" else layout,
                "seed": draw(st.integers(0, 2**16)),
            },
        )
        for step_plans in grads:
            step_plans.insert(at, draw(half_grad_plans(shape)))
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(params)))
        shape = (EXTENSION_BIG,)
        dtype = draw(st.sampled_from(list(HALF)))
        params.insert(at, {"dtype": dtype, "shape": shape, "layout": ("contiguous",), "seed": draw(st.integers(0, 2**16))})
        for step_plans in grads:
            plan = None
            if draw(st.integers(0, 5)) != 0:
                plan = {"seed": draw(st.integers(0, 2**16)), "layout": ("contiguous",), "scale": draw(st.sampled_from([1.0, 1e-3, 1e-5]))}
            step_plans.insert(at, plan)
    run["split"] = draw(st.integers(0, len(params))) if len(params) > 1 and draw(st.booleans()) else None
    run["group2"] = {"lr": abs(draw(lrs)), "weight_decay": max(draw(weight_decays), 0.0)} if run["split"] is not None else None
    run["master_weights"] = draw(st.booleans()) if stochastic else True
    run["stochastic_rounding"] = stochastic
    run["seed"] = draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**64 - 1, None]))) if stochastic else None
    n_steps = len(grads)
    run["swap_after"] = draw(st.sampled_from([None, *range(1, n_steps)])) if n_steps > 1 else None
    return run


def extension_kwargs(run, *, options: bool) -> dict[str, Any]:
    """rsoptim's arguments, with the run's options or with none of them (not even state_dtype)."""
    kw = half_kwargs(run, for_ref=None)
    if not options:
        kw.pop("state_dtype", None)
        return kw
    kw["master_weights"] = run["master_weights"]
    if run["stochastic_rounding"]:
        kw["stochastic_rounding"] = True
        if run["seed"] is not None:
            kw["stochastic_rounding_seed"] = run["seed"]
    return kw


def reference_groups(run, ref_params: dict[int, torch.Tensor]) -> list[dict[str, Any]]:
    """The run's param groups over the reference params of its half params (by index in the
    run's param list); groups with none are left out."""
    n = len(run["params"])
    s = run["split"]
    spans = [(range(n), {})] if s is None else [(range(s), {}), (range(s, n), run["group2"])]
    groups = [{"params": [ref_params[i] for i in span if i in ref_params], **options} for span, options in spans]
    return [g for g in groups if g["params"]]


@contextlib.contextmanager
def kernel_threads(n: int):
    """rsoptim's kernels on ``n`` threads within the block (then as before, following torch's
    count if they did)."""
    follow, before = rsoptim._threads._follow_torch, rsoptim.get_num_threads()
    rsoptim.set_num_threads(n)
    try:
        yield
    finally:
        rsoptim.set_num_threads(None if follow else before)


def snapshot(opt, params) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Copies of each param and its state."""
    return [
        (p.detach().clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state.get(p, {}).items()})
        for p in params
    ]


def assert_identical(actual, expected, what: str, indices=None) -> None:
    """Two snapshots agree bit for bit (NaN payloads included): params, state keys, state
    dtypes and values."""
    for i in range(len(expected)) if indices is None else indices:
        (p, s), (q, t) = actual[i], expected[i]
        assert p.dtype == q.dtype and torch.equal(bits(p), bits(q)), f"{what}: param {i} ({q.dtype}) differs"
        assert set(s) == set(t), f"{what}: param {i} state keys {sorted(s)} != {sorted(t)}"
        for key, value in t.items():
            other = s[key]
            if isinstance(value, torch.Tensor):
                assert isinstance(other, torch.Tensor) and other.dtype == value.dtype and other.shape == value.shape, (
                    f"{what}: param {i} state[{key!r}] is {other!r}, not like {value.dtype} {tuple(value.shape)}"
                )
                assert torch.equal(bits(other), bits(value)), f"{what}: param {i} state[{key!r}] differs"
            else:
                assert other == value, f"{what}: param {i} state[{key!r}] {other!r} != {value!r}"


def assert_rounded_either_way(actual: torch.Tensor, value: torch.Tensor, what: str, zero_sign: bool = True) -> None:
    """Each element of ``actual`` (a half dtype) is one of the two values of its dtype around the
    float32 ``value`` (the value itself where it is one, with its sign if it is a zero unless
    not ``zero_sign``; NaN where it is NaN; the largest finite value or inf past it). Where many
    elements lie between two values, not all may be the nearest one: the chance that unbiased
    stochastic rounding picks the nearest everywhere must be above 1e-13 for that."""
    dtype = actual.dtype
    a, v = actual.detach().reshape(-1), value.detach().reshape(-1)
    assert a.shape == v.shape, f"{what}: shape"
    nearest = v.to(dtype)
    toward = torch.where(nearest.float() > v, -math.inf, math.inf).to(dtype)
    other = torch.where(nearest.float() == v, nearest, torch.nextafter(nearest, toward))
    a_nan, v_nan = a.isnan(), v.isnan()
    ok = (bits(a) == bits(nearest)) | (bits(a) == bits(other))
    if not zero_sign:
        ok |= (a == 0) & (v == 0)
    ok = torch.where(v_nan, a_nan, ok & ~a_nan)
    if not ok.all():
        where = (~ok).nonzero().reshape(-1)[:5].tolist()
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {a.numel()} elements are not a neighbour of the float32 value, e.g. at "
            f"flat indices {where}: {[a[i].item() for i in where]} for {[v[i].item() for i in where]}"
        )
    between = ~v_nan & (nearest != other) & nearest.isfinite() & other.isfinite()
    if between.any():
        near, far, exact = nearest[between].double(), other[between].double(), v[between].double()
        fractions = ((exact - near) / (far - near)).abs()
        log_all_nearest = float(torch.log1p(-fractions).sum())
        if log_all_nearest < math.log(1e-13):
            assert (bits(a[between]) == bits(far.to(dtype))).any(), (
                f"{what}: every one of {int(between.sum())} elements was rounded to nearest "
                f"(probability e^{log_all_nearest:.0f} under stochastic rounding)"
            )


def check_extension_run(run) -> None:
    name = run["name"]
    ref_cls, our_cls = CLASSES[name]
    master, stochastic = run["master_weights"], run["stochastic_rounding"]
    state_dtype = torch.float32 if run["state_dtype"] == "float32" else None
    fused = name in ("Adam", "AdamW") and state_dtype is None
    lerp_keys = set() if fused else ZERO_SIGN_FROM_LERP[name]
    specs = run["params"]
    dtypes = [EXTENSION_DTYPES[spec["dtype"]] for spec in specs]
    starts = [values(spec["shape"], dtype, spec["seed"]) for spec, dtype in zip(specs, dtypes)]
    half = [i for i, dtype in enumerate(dtypes) if dtype in HALF.values()]
    singles = [i for i, dtype in enumerate(dtypes) if dtype == torch.float32]

    def build(options: bool):
        params = [laid_out(v.clone(), spec["layout"], gap_fill=12345.0).requires_grad_() for v, spec in zip(starts, specs)]
        return params, our_cls(param_groups(run, params), **extension_kwargs(run, options=options))

    first_p, first = build(True)  # stepped on 1 thread
    again_p, again = build(True)  # on 2 threads, replaced through its state dict at swap_after
    plain_p, plain = build(False)  # the float32 params' reference: no options
    if stochastic and run["seed"] is None:
        assert all(g["stochastic_rounding_seed"] == torch.initial_seed() for g in first.param_groups)
    outside_before = [outside_view(p).clone() for p in first_p]
    ref_p = {i: (padded(starts[i].float()) if fused else starts[i].float()).requires_grad_() for i in half}
    ref = ref_cls(reference_groups(run, ref_p), **half_kwargs(run, for_ref="fused" if fused else "float32"))
    stepped = [0] * len(specs)  # steps each param took (SGD counts them for stochastic rounding)
    for step in range(len(run["grads"])):
        where = f"{name} step {step + 1}"
        if step in run["rewrites"]:
            for opt in (first, again, plain, ref):
                set_hyperparameter(opt, *run["rewrites"][step])
        # Stochastic rounding alone: the reference steps from rsoptim's param and state.
        before = snapshot(first, first_p) if stochastic and not master else None
        for i, plan in enumerate(run["grads"][step]):
            g = None if plan is None else laid_out(half_grad(plan, specs[i]["shape"], dtypes[i]), plan["layout"], gap_fill=float("nan"))
            for params in (first_p, again_p, plain_p):
                params[i].grad = None if g is None else twin_all([g])[0]
            stepped[i] += g is not None
            if i in ref_p:
                q = ref_p[i]
                q.grad = None if g is None else padded(g.float()) if fused else g.float().contiguous()
                if before is not None:
                    p_before, s_before = before[i]
                    with torch.no_grad():
                        q.copy_(padded(p_before.float()) if fused else p_before.float())
                    ref.state.pop(q, None)
                    if s_before:
                        ref.state[q] = {
                            k: v.clone() if k == "step" else padded(v.float()) if fused else v.float().contiguous()
                            for k, v in s_before.items()
                            if not (name == "SGD" and k == "step")
                        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with kernel_threads(1):
                first.step()
                plain.step()
            with kernel_threads(2):
                again.step()
            if fused:
                ref.step()
            else:
                with ieee_sqrt() as sqrt_calls:
                    ref.step()
                if name != "SGD" and any(q.grad is not None and q.numel() for q in ref_p.values()):
                    assert sqrt_calls[0] > 0, "the reference no longer calls Tensor.sqrt: revisit ieee_sqrt"
        if state_dtype is None:
            with torch.no_grad():  # state kept in the half dtype: rounded once, as rsoptim stores it
                for i, q in ref_p.items():
                    for key, value in ref.state.get(q, {}).items():
                        if key != "step":
                            value.copy_(value.to(dtypes[i]))
        ours = snapshot(first, first_p)
        assert_identical(ours, snapshot(plain, plain_p), f"{where}: float32 params with the options vs without", indices=singles)
        for i, q in ref_p.items():
            p, dtype = first_p[i], dtypes[i]
            tag = f"{where}, param {i} ({dtype}, shape {tuple(p.shape)}, layout {specs[i]['layout']})"
            s_ours, s_ref = first.state.get(p, {}), ref.state.get(q, {})
            extra = set()
            if stepped[i]:
                extra |= {"master_param"} if master else set()
                extra |= {"step"} if name == "SGD" and stochastic else set()
            assert set(s_ours) == set(s_ref) | extra, f"{tag}: state keys {sorted(s_ours)} != {sorted(set(s_ref) | extra)}"
            value = unpadded(q, p) if fused else q.detach()
            if "master_param" in s_ours:
                copy_ = s_ours["master_param"]
                assert copy_.dtype == torch.float32 and copy_.shape == p.shape, f"{tag}: master_param {copy_.dtype} {tuple(copy_.shape)}"
                same_values(copy_.contiguous(), value, f"{tag}: master_param", zero_sign="param" not in lerp_keys)
                value, value_zero_sign = copy_, True  # the param is the rounding of rsoptim's own copy
            else:
                value_zero_sign = "param" not in lerp_keys
            if stochastic:
                assert_rounded_either_way(p.detach().contiguous(), value.contiguous(), f"{tag}: param", zero_sign=value_zero_sign)
            else:
                same_values(p.detach().contiguous(), value.to(dtype), f"{tag}: param (its master copy rounded to nearest)")
            for key, expected in s_ref.items():
                actual = s_ours[key]
                if key == "step":
                    assert actual.dtype == expected.dtype and actual.item() == expected.item(), f"{tag}: step {actual!r} != {expected!r}"
                    continue
                want_dtype = state_dtype or dtype
                assert actual.dtype == want_dtype, f"{tag}: state[{key!r}] dtype {actual.dtype} != {want_dtype}"
                expected = unpadded(expected, p) if fused else expected
                same_values(actual.contiguous(), expected.to(want_dtype), f"{tag}: state[{key!r}]", zero_sign=key not in lerp_keys)
            if "step" in extra:
                count = s_ours["step"]
                assert count.dtype == torch.float32 and count.item() == stepped[i], f"{tag}: SGD's step count {count!r} != {stepped[i]}"
        for i, p in enumerate(first_p):
            assert torch.equal(bits(outside_view(p)), bits(outside_before[i])), f"{where}: param {i}'s storage changed outside it"
        swapped = ""
        if run["swap_after"] is not None and run["swap_after"] <= step:
            swapped = f", its optimizer replaced through a state dict after step {run['swap_after']}"
        assert_identical(snapshot(again, again_p), ours, f"{where}: the run on 2 threads{swapped} vs the run on 1")
        if run["swap_after"] == step + 1:
            saved = copy.deepcopy(again.state_dict())
            again = our_cls(param_groups(run, again_p), **extension_kwargs(run, options=False))
            again.load_state_dict(saved)
            for g_again, g_first in zip(again.param_groups, first.param_groups):
                for key in ("state_dtype", "master_weights", "stochastic_rounding", "stochastic_rounding_seed"):
                    loaded, kept = g_again.get(key), g_first.get(key)
                    assert loaded == kept, f"{where}: loaded group[{key!r}] {loaded!r} != {kept!r}"


@fuzz_settings(350)
@given(run=extension_runs(stochastic=False))
def test_master_weights_match_the_float32_reference(run):
    check_extension_run(run)


@fuzz_settings(350)
@given(run=extension_runs(stochastic=True))
def test_stochastic_rounding_picks_a_neighbour_of_the_float32_reference(run):
    check_extension_run(run)


# -------------------------------------------------------------------------------------------
# clip_grad_norm_ on bfloat16 / float16 grads
# -------------------------------------------------------------------------------------------
#
# The contract of tests/test_clip.py (test_half_precision_grads_are_clipped_as_torch_does): each
# grad's norm comes from float32 terms (torch sums them in float32, rsoptim's kernels in float64)
# and is rounded to the grad's dtype, so a total may differ from torch's in its last bit (within
# torch's default tolerance for the dtype); the grads are scaled in float32 and rounded once, so
# where the totals agree they are bit for bit torch's, and otherwise within that tolerance.
# Scales reach the half types' edges: float16 overflow (3e4 squared, 1e30) and subnormals
# (1e-5), bfloat16's range (1e-30, 1e30); some cases mix in float32/float64 grads.


@fuzz_settings(200)
@given(
    case=clip_cases(
        dtypes=list(HALF),
        mixed_dtypes=list(HALF) + ["float32", "float64"],
        scales=[1.0, 1.0, 1e-3, 1e3, 3e4, 1e-5, 1e-30, 1e30, 0.0],
    )
)
def test_clip_grad_norm_half_precision_matches_torch(case):
    check_clip(case, rsoptim.clip_grad_norm_, torch.nn.utils.clip_grad_norm_)
