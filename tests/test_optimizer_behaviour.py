"""rsoptim's optimizers behave as torch.optim's do, beyond the numbers of a single step.

Everything here is compared against the installed torch by running it: state dicts (both ways),
serialization, schedulers, closures, hooks, zero_grad, repr, deepcopy/pickle, construction
errors, sparse grads, the low-level buffer checks of the Rust binding and thread safety.

Self-contained on purpose (no conftest fixtures).

Tolerance: rsoptim's kernels evaluate the same formulas as torch's for-loop but in a different
(SIMD, fused) order, so float64 results differ from torch's by a few ulps (observed <= 2e-15 after
20 steps). ``TOL64`` (rtol 1e-10, atol 1e-12) is five orders of magnitude above that and many
orders below the effect of any real mistake (a stale lr, beta or momentum changes the result at
the 1e-3 level), so the tests compare in float64 whenever they check numbers.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import threading

import pytest
import torch

import rsoptim
from rsoptim import _rsoptim
from rsoptim._columns import pack
from torch.optim.lr_scheduler import CyclicLR, ExponentialLR, OneCycleLR, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

TOL64 = dict(rtol=1e-10, atol=1e-12)
NAMES = ["SGD", "Adam", "AdamW", "RMSprop"]
SHAPES = [(5, 4), (4,), (3, 3, 2)]

# A spread of configurations per optimizer: every state key and every branch of the maths.
CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("SGD", dict(lr=0.1, momentum=0.5, dampening=0.3)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, maximize=True, decoupled_weight_decay=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, amsgrad=True, betas=(0.8, 0.9))),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01, alpha=0.9, maximize=True, momentum=0.5)),
]
CONFIG_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CONFIGS]


# ---------------------------------------------------------------------------------------------
# helpers


def initial(dtype=torch.float64, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def leaves(tensors):
    return [torch.nn.Parameter(t.clone()) for t in tensors]


def grad_for(p, step, index):
    g = torch.Generator().manual_seed(1000 * step + index)
    return torch.randn(p.shape, generator=g, dtype=p.dtype)


def set_grads(params, step, skip=()):
    """Deterministic grads for ``step``; params whose index is in ``skip`` get no grad."""
    for i, p in enumerate(params):
        p.grad = None if i in skip else grad_for(p, step, i)


def skip_at(step):
    # The last param gets no grad on the first two steps: its step count lags its neighbours'.
    return (len(SHAPES) - 1,) if step < 2 else ()


def drive(opt, params, steps, start=0, scheduler=None):
    for i in range(start, start + steps):
        set_grads(params, i, skip_at(i))
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_tensors_close(a, b, tol=TOL64):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x, y, **tol)


def assert_state_close(sa, sb, tol=TOL64):
    """Two optimizers' ``state_dict()``s: same groups, same keys, dtypes, shapes; close values."""
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for index in sa["state"]:
        a, b = sa["state"][index], sb["state"][index]
        assert a.keys() == b.keys(), index
        for key in a:
            x, y = a[key], b[key]
            assert type(x) is type(y), (index, key)
            if isinstance(x, torch.Tensor):
                assert (x.dtype, x.shape, x.device) == (y.dtype, y.shape, y.device), (index, key)
                if key == "step":
                    assert torch.equal(x, y), (index, key, x, y)
                else:
                    torch.testing.assert_close(x, y, **tol)
            else:
                assert x == y, (index, key)


def pair(name, kwargs, dtype=torch.float64, seed=0):
    """The same params and configuration for torch.optim.<name> and rsoptim.<name>."""
    init = initial(dtype, seed)
    pt, pr = leaves(init), leaves(init)
    return pt, getattr(torch.optim, name)(pt, **kwargs), pr, getattr(rsoptim, name)(pr, **kwargs)


def sparse_grad(n, dtype=torch.float64):
    indices = torch.tensor([[0, 2, 2]])
    values = torch.tensor([1.0, 2.0, -0.5], dtype=dtype)
    return torch.sparse_coo_tensor(indices, values, (n,), check_invariants=True)


# ---------------------------------------------------------------------------------------------
# class identity and signatures


@pytest.mark.parametrize("name", NAMES)
def test_is_a_torch_optimizer(name):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = getattr(rsoptim, name)([p])
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt, getattr(torch.optim, name))
    assert type(opt).__name__ == name


#: rsoptim's opt-in arguments beyond torch.optim's: keyword-only, last, off by default.
EXTENSIONS = {
    "state_dtype": None,
    "master_weights": False,
    "stochastic_rounding": False,
    "stochastic_rounding_seed": None,
    "max_grad_norm": None,
    "norm_type": 2.0,
    "error_if_nonfinite": False,
}


def _signatures(name):
    t = inspect.signature(getattr(torch.optim, name).__init__, eval_str=True)
    r = inspect.signature(getattr(rsoptim, name).__init__, eval_str=True)
    extensions = [p for key, p in r.parameters.items() if key in EXTENSIONS]
    assert list(r.parameters)[-len(EXTENSIONS):] == list(EXTENSIONS), "extensions come last"
    for p in extensions:
        assert p.kind == inspect.Parameter.KEYWORD_ONLY and p.default == EXTENSIONS[p.name], p
    return t, r.replace(parameters=[p for key, p in r.parameters.items() if key not in EXTENSIONS])


@pytest.mark.parametrize("name", NAMES)
def test_init_signature_names_kinds_defaults_match_torch(name):
    """What callers see: parameter names, order, kinds (positional / keyword-only) and defaults,
    and the annotations of every argument but ``params`` (compared in full below), besides
    rsoptim's keyword-only extensions."""
    t, r = _signatures(name)
    assert list(t.parameters) == list(r.parameters)
    for key in t.parameters:
        a, b = t.parameters[key], r.parameters[key]
        assert a.kind == b.kind, key
        assert a.default == b.default, key
        if key != "params":
            assert a.annotation == b.annotation, key
    assert t.return_annotation == r.return_annotation


@pytest.mark.parametrize("name", NAMES)
def test_init_signature_fully_equal_to_torch(name):
    t, r = _signatures(name)
    assert t == r


# ---------------------------------------------------------------------------------------------
# state dicts


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_state_dict_from_torch_continues_identically(name, kwargs):
    pt, ot, _, _ = pair(name, kwargs)
    drive(ot, pt, 4)
    # Fresh rsoptim optimizer over copies of the trained params, loaded from torch's state dict.
    pr = leaves([p.detach() for p in pt])
    orr = getattr(rsoptim, name)(pr, **kwargs)
    orr.load_state_dict(copy.deepcopy(ot.state_dict()))
    assert_state_close(ot.state_dict(), orr.state_dict(), tol=dict(rtol=0, atol=0))
    drive(ot, pt, 5, start=4)
    drive(orr, pr, 5, start=4)
    assert_tensors_close([p.detach() for p in pr], [p.detach() for p in pt])
    assert_state_close(orr.state_dict(), ot.state_dict())


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_state_dict_from_rsoptim_continues_identically_in_torch(name, kwargs):
    pt, ot, pr, orr = pair(name, kwargs)
    drive(orr, pr, 4)
    drive(ot, pt, 4)
    assert_state_close(orr.state_dict(), ot.state_dict())
    # torch picks up rsoptim's state and continues; rsoptim continues on its own.
    pt2 = leaves([p.detach() for p in pr])
    ot2 = getattr(torch.optim, name)(pt2, **kwargs)
    ot2.load_state_dict(copy.deepcopy(orr.state_dict()))
    drive(ot2, pt2, 5, start=4)
    drive(orr, pr, 5, start=4)
    drive(ot, pt, 5, start=4)
    assert_tensors_close([p.detach() for p in pr], [p.detach() for p in pt2])
    assert_tensors_close([p.detach() for p in pr], [p.detach() for p in pt])
    assert_state_close(orr.state_dict(), ot2.state_dict())


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_torch_save_load_weights_only_round_trip(name, kwargs):
    pt, ot, pr, orr = pair(name, kwargs)
    drive(orr, pr, 3)
    drive(ot, pt, 3)
    buf = io.BytesIO()
    torch.save(orr.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert_state_close(loaded, orr.state_dict(), tol=dict(rtol=0, atol=0))

    # Into a new rsoptim optimizer and into a new torch optimizer: both continue as the original.
    pr2 = leaves([p.detach() for p in pr])
    orr2 = getattr(rsoptim, name)(pr2, **kwargs)
    orr2.load_state_dict(copy.deepcopy(loaded))
    pt2 = leaves([p.detach() for p in pr])
    ot2 = getattr(torch.optim, name)(pt2, **kwargs)
    ot2.load_state_dict(copy.deepcopy(loaded))
    for opt, params in ((orr, pr), (orr2, pr2), (ot2, pt2), (ot, pt)):
        drive(opt, params, 3, start=3)
    assert_tensors_close([p.detach() for p in pr2], [p.detach() for p in pr], tol=dict(rtol=0, atol=0))
    assert_tensors_close([p.detach() for p in pr2], [p.detach() for p in pt2])
    assert_tensors_close([p.detach() for p in pr2], [p.detach() for p in pt])
    assert_state_close(orr2.state_dict(), ot2.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_state_keys_dtypes_shapes_match_torch(name, kwargs, dtype):
    pt, ot, pr, orr = pair(name, kwargs, dtype=dtype)
    drive(ot, pt, 2)
    drive(orr, pr, 2)
    st, sr = ot.state_dict(), orr.state_dict()
    tol = dict(rtol=1.3e-6, atol=1e-5) if dtype != torch.float64 else TOL64  # torch's own float32 tolerances
    assert_state_close(sr, st, tol=tol)
    # The param that had no grad on the first two steps has no state at all (and SGD without
    # momentum keeps none for any param).
    stateless = name == "SGD" and not kwargs.get("momentum")
    assert sorted(sr["state"]) == ([] if stateless else [0, 1])
    for index, state in sr["state"].items():
        p = pr[index]
        if name == "SGD":
            expected = {"momentum_buffer"} if kwargs.get("momentum", 0) != 0 else set()
        elif name in ("Adam", "AdamW"):
            expected = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if kwargs.get("amsgrad") else set())
        else:
            expected = {"step", "square_avg"}
            expected |= {"momentum_buffer"} if kwargs.get("momentum", 0) > 0 else set()
            expected |= {"grad_avg"} if kwargs.get("centered") else set()
        assert set(state) == expected
        for key, value in state.items():
            if key == "step":
                assert value.dtype == torch.float32 and value.dim() == 0 and value.device.type == "cpu"
                assert value.item() == 2.0
            else:
                assert value.dtype == p.dtype and value.shape == p.shape


@pytest.mark.parametrize("name", ["SGD"])
def test_sgd_without_momentum_has_empty_state(name):
    pt, ot, pr, orr = pair(name, dict(lr=0.1, momentum=0))
    drive(ot, pt, 3)
    drive(orr, pr, 3)
    assert ot.state_dict()["state"] == {}
    assert orr.state_dict()["state"] == {}
    assert len(orr.state) == 0


# ---------------------------------------------------------------------------------------------
# schedulers: hyperparameters re-read every step


def _scheduled(name, kwargs, make_scheduler, steps=12, check=None):
    pt, ot, pr, orr = pair(name, kwargs)
    st, sr = make_scheduler(ot), make_scheduler(orr)
    seen = []
    for i in range(steps):
        set_grads(pt, i, skip_at(i))
        set_grads(pr, i, skip_at(i))
        ot.step()
        orr.step()
        st.step()
        sr.step()
        assert_tensors_close([p.detach() for p in pr], [p.detach() for p in pt])
        assert_state_close(orr.state_dict(), ot.state_dict())
        seen.append(copy.deepcopy({k: v for k, v in orr.param_groups[0].items() if k != "params"}))
    if check is not None:
        check(seen)
    return pt, ot, pr, orr


def _varies(key, index=None):
    def check(seen):
        values = [g[key] if index is None else g[key][index] for g in seen]
        values = [float(v) for v in values]
        assert len(set(values)) > 2, f"{key} was not rewritten by the scheduler: {values}"

    return check


@pytest.mark.parametrize(("name", "kwargs"), [c for c in CONFIGS if c[0] != "SGD" or c[1].get("momentum")], ids=[
    i for c, i in zip(CONFIGS, CONFIG_IDS) if c[0] != "SGD" or c[1].get("momentum")
])
def test_step_lr(name, kwargs):
    _scheduled(name, kwargs, lambda o: StepLR(o, step_size=3, gamma=0.5), check=_varies("lr"))


@pytest.mark.parametrize(
    "name",
    ["SGD", "Adam", "AdamW", "RMSprop"],
)
def test_tensor_lr_updated_in_place_by_scheduler(name):
    kwargs = dict(lr=torch.tensor(0.05))
    if name == "SGD":
        kwargs["momentum"] = 0.9

    def make(o):
        return ExponentialLR(o, gamma=0.7)

    # Each optimizer owns its lr tensor (pair() passes the same kwargs, so copy it for torch).
    init = initial()
    pt, pr = leaves(init), leaves(init)
    lr_t, lr_r = torch.tensor(0.05), torch.tensor(0.05)
    ot = getattr(torch.optim, name)(pt, **{**kwargs, "lr": lr_t})
    orr = getattr(rsoptim, name)(pr, **{**kwargs, "lr": lr_r})
    st, sr = make(ot), make(orr)
    for i in range(8):
        set_grads(pt, i)
        set_grads(pr, i)
        ot.step()
        orr.step()
        st.step()
        sr.step()
        assert_tensors_close([p.detach() for p in pr], [p.detach() for p in pt])
    assert orr.param_groups[0]["lr"] is lr_r  # updated with fill_, not replaced
    assert lr_r.item() == pytest.approx(0.05 * 0.7**8)
    assert torch.equal(lr_r, lr_t)


def test_one_cycle_lr_rewrites_adam_betas():
    _scheduled(
        "Adam",
        dict(lr=0.01),
        lambda o: OneCycleLR(o, max_lr=0.05, total_steps=14, cycle_momentum=True),
        check=lambda seen: (_varies("lr")(seen), _varies("betas", 0)(seen)),
    )


def test_one_cycle_lr_rewrites_adamw_betas():
    _scheduled(
        "AdamW",
        dict(lr=0.01, amsgrad=True),
        lambda o: OneCycleLR(o, max_lr=0.05, total_steps=14, cycle_momentum=True),
        check=lambda seen: (_varies("lr")(seen), _varies("betas", 0)(seen)),
    )


def test_one_cycle_lr_rewrites_sgd_momentum():
    _scheduled(
        "SGD",
        dict(lr=0.01, momentum=0.9),
        lambda o: OneCycleLR(o, max_lr=0.1, total_steps=14, cycle_momentum=True),
        check=lambda seen: (_varies("lr")(seen), _varies("momentum")(seen)),
    )


def test_one_cycle_lr_rewrites_rmsprop_momentum():
    _scheduled(
        "RMSprop",
        dict(lr=0.01, momentum=0.9),
        lambda o: OneCycleLR(o, max_lr=0.02, total_steps=14, cycle_momentum=True),
        check=lambda seen: (_varies("lr")(seen), _varies("momentum")(seen)),
    )


def test_cyclic_lr_sgd_cycles_momentum():
    _scheduled(
        "SGD",
        dict(lr=0.01, momentum=0.9, nesterov=True),
        lambda o: CyclicLR(o, base_lr=0.001, max_lr=0.1, step_size_up=3),
        check=lambda seen: (_varies("lr")(seen), _varies("momentum")(seen)),
    )


def test_cyclic_lr_adam_without_momentum_cycling():
    _scheduled(
        "Adam",
        dict(lr=0.01),
        lambda o: CyclicLR(o, base_lr=0.001, max_lr=0.05, step_size_up=3, cycle_momentum=False),
        check=_varies("lr"),
    )


def test_hyperparameters_edited_by_hand_are_read_on_next_step():
    pt, ot, pr, orr = pair("Adam", dict(lr=0.01))
    for i in range(6):
        for opt in (ot, orr):
            g = opt.param_groups[0]
            g["lr"] = 0.01 * (i + 1)
            g["betas"] = (0.9 - 0.05 * i, 0.999 - 0.01 * i)
            g["eps"] = 10.0 ** (-8 + i)
            g["weight_decay"] = 0.01 * i
            g["maximize"] = i % 2 == 1
        set_grads(pt, i)
        set_grads(pr, i)
        ot.step()
        orr.step()
        assert_tensors_close([p.detach() for p in pr], [p.detach() for p in pt])


# ---------------------------------------------------------------------------------------------
# closures, hooks, zero_grad, repr


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_closure_loss_returned_and_run_with_grad(name, kwargs):
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    init = initial(shapes=[(5, 4), (4,)])

    def run(module):
        w, b = leaves(init)
        opt = getattr(module, name)([w, b], **kwargs)
        grad_enabled = []

        def closure():
            grad_enabled.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = torch.tanh(x @ w + b).pow(2).mean()
            loss.backward()
            return loss

        losses = []
        with torch.no_grad():
            for _ in range(5):
                losses.append(opt.step(closure))
        assert grad_enabled == [True] * 5
        return losses, [w.detach(), b.detach()]

    lt, wt = run(torch.optim)
    lr_, wr = run(rsoptim)
    assert all(isinstance(l, torch.Tensor) and l.requires_grad for l in lr_)
    torch.testing.assert_close(torch.stack(lr_), torch.stack(lt), **TOL64)
    assert_tensors_close(wr, wt)


@pytest.mark.parametrize("name", NAMES)
def test_step_without_closure_returns_none(name):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    assert getattr(rsoptim, name)([p], lr=0.1).step() is None


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_fire(name):
    def run(module):
        p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
        opt = getattr(module, name)([p], lr=0.1)
        events = []
        h1 = opt.register_step_pre_hook(lambda o, a, k: events.append(("pre", o is opt, p.detach().clone())))
        h2 = opt.register_step_post_hook(lambda o, a, k: events.append(("post", o is opt, p.detach().clone())))
        g1 = register_optimizer_step_pre_hook(lambda o, a, k: events.append(("gpre", o is opt, None)))
        g2 = register_optimizer_step_post_hook(lambda o, a, k: events.append(("gpost", o is opt, None)))
        try:
            p.grad = torch.full((4,), 2.0, dtype=torch.float64)
            opt.step()
            h1.remove()
            h2.remove()
            opt.step()
        finally:
            g1.remove()
            g2.remove()
        return events

    et, er = run(torch.optim), run(rsoptim)
    assert [e[:2] for e in er] == [e[:2] for e in et]
    assert [e[0] for e in er] == ["gpre", "pre", "post", "gpost", "gpre", "gpost"]
    assert all(e[1] for e in er)
    pre, post = er[1][2], er[2][2]
    assert torch.equal(pre, torch.ones(4, dtype=torch.float64))  # pre hook sees the param before the update
    assert not torch.equal(post, pre)  # post hook sees it after
    for (_, _, a), (_, _, b) in zip(er, et):
        if a is not None:
            torch.testing.assert_close(a, b, **TOL64)


def test_step_pre_hook_can_replace_the_closure():
    """A pre hook may return new (args, kwargs); the replaced closure is the one that runs."""

    def run(module):
        p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        opt = getattr(module, "Adam")([p], lr=0.1)

        def closure():
            opt.zero_grad()
            loss = (p * p).sum()
            loss.backward()
            return loss

        # args holds the optimizer itself (step is a method); keep it, swap in the closure.
        opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": closure}))
        loss = opt.step()
        return loss, p.detach()

    (lt, pt), (lr_, pr) = run(torch.optim), run(rsoptim)
    assert lr_ is not None and torch.equal(lr_, lt)
    torch.testing.assert_close(pr, pt, **TOL64)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks_fire(name):
    def run(module):
        p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)
        opt = getattr(module, name)([p], **kwargs)
        p.grad = torch.ones(3, dtype=torch.float64)
        opt.step()
        events = []
        opt.register_state_dict_pre_hook(lambda o: events.append("sd_pre"))

        def sd_post(o, sd):
            events.append("sd_post")
            sd["extra"] = 1
            return sd

        opt.register_state_dict_post_hook(sd_post)

        def load_pre(o, sd):
            events.append("load_pre")
            sd = dict(sd)
            sd.pop("extra")
            return sd

        opt.register_load_state_dict_pre_hook(load_pre)
        opt.register_load_state_dict_post_hook(lambda o: events.append("load_post"))
        sd = opt.state_dict()
        assert sd["extra"] == 1
        opt.load_state_dict(sd)
        opt.step()
        return events, p.detach()

    (et, pt), (er, pr) = run(torch.optim), run(rsoptim)
    assert er == et == ["sd_pre", "sd_post", "load_pre", "load_post"]
    torch.testing.assert_close(pr, pt, **TOL64)


@pytest.mark.parametrize("name", NAMES)
def test_zero_grad(name):
    ps = leaves(initial())
    opt = getattr(rsoptim, name)(ps, lr=0.1)
    set_grads(ps, 0)
    opt.step()
    opt.zero_grad()  # set_to_none=True is the default
    assert all(p.grad is None for p in ps)
    set_grads(ps, 1)
    grads = [p.grad for p in ps]
    opt.zero_grad(set_to_none=False)
    for p, g in zip(ps, grads):
        assert p.grad is g and torch.equal(g, torch.zeros_like(g))
    assert inspect.signature(type(opt).zero_grad) == inspect.signature(getattr(torch.optim, name).zero_grad)


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_repr_equal_to_torch_except_class_name(name, kwargs):
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    groups = lambda: [{"params": [a]}, {"params": [b], "lr": 0.5}]  # noqa: E731
    t = getattr(torch.optim, name)(groups(), **kwargs)
    r = getattr(rsoptim, name)(groups(), **kwargs)
    assert repr(r).startswith(type(r).__name__ + " (\nParameter Group 0")
    assert repr(r).replace(type(r).__name__, "<cls>", 1) == repr(t).replace(type(t).__name__, "<cls>", 1)


# ---------------------------------------------------------------------------------------------
# deepcopy and pickle


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_deepcopy_keeps_working(name, kwargs):
    pt, ot, pr, orr = pair(name, kwargs)
    drive(ot, pt, 3)
    drive(orr, pr, 3)
    # Copy params and optimizer together, so the copy's groups hold the copied params.
    pr2, orr2 = copy.deepcopy((pr, orr))
    pt2, ot2 = copy.deepcopy((pt, ot))
    assert type(orr2) is type(orr)
    assert all(a is b for a, b in zip(orr2.param_groups[0]["params"], pr2))
    before = [p.detach().clone() for p in pr]
    drive(orr2, pr2, 4, start=3)
    drive(ot2, pt2, 4, start=3)
    assert_tensors_close([p.detach() for p in pr], before, tol=dict(rtol=0, atol=0))  # original untouched
    assert_tensors_close([p.detach() for p in pr2], [p.detach() for p in pt2])
    assert_state_close(orr2.state_dict(), ot2.state_dict())
    # The original goes on as well, to the same place.
    drive(orr, pr, 4, start=3)
    assert_tensors_close([p.detach() for p in pr], [p.detach() for p in pr2], tol=dict(rtol=0, atol=0))


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_pickle_round_trip_keeps_working(name, kwargs):
    pt, ot, pr, orr = pair(name, kwargs)
    drive(ot, pt, 3)
    drive(orr, pr, 3)
    pr2, orr2 = pickle.loads(pickle.dumps((pr, orr)))
    assert type(orr2) is type(orr)
    assert_state_close(orr2.state_dict(), orr.state_dict(), tol=dict(rtol=0, atol=0))
    # Hooks registered after unpickling still fire (step is still wrapped by torch).
    fired = []
    orr2.register_step_post_hook(lambda *a: fired.append(1))
    drive(orr2, pr2, 4, start=3)
    drive(ot, pt, 4, start=3)
    assert fired == [1] * 4
    assert_tensors_close([p.detach() for p in pr2], [p.detach() for p in pt])
    assert_state_close(orr2.state_dict(), ot.state_dict())


# ---------------------------------------------------------------------------------------------
# params without grads


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_params_without_grad_are_skipped(name, kwargs):
    pt, ot, pr, orr = pair(name, kwargs)
    frozen = pr[1].detach().clone()
    for i in range(4):
        set_grads(pt, i, skip=(1,))
        set_grads(pr, i, skip=(1,))
        ot.step()
        orr.step()
    assert torch.equal(pr[1].detach(), frozen)
    assert pr[1] not in orr.state
    stateless = name == "SGD" and not kwargs.get("momentum")
    assert sorted(orr.state_dict()["state"]) == sorted(ot.state_dict()["state"]) == ([] if stateless else [0, 2])
    assert_tensors_close([p.detach() for p in pr], [p.detach() for p in pt])
    assert_state_close(orr.state_dict(), ot.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_step_with_no_grads_at_all_is_a_no_op(name):
    ps = leaves(initial())
    opt = getattr(rsoptim, name)(ps, lr=0.1)
    before = [p.detach().clone() for p in ps]
    opt.step()
    assert len(opt.state) == 0
    assert_tensors_close([p.detach() for p in ps], before, tol=dict(rtol=0, atol=0))


# ---------------------------------------------------------------------------------------------
# construction errors


def _p():
    return torch.nn.Parameter(torch.zeros(3))


def _duplicate(C):
    p = _p()
    return C([{"params": [p]}, {"params": [p]}])


ERROR_CASES = {
    "empty": (NAMES, lambda C: C([])),
    "bare_tensor": (NAMES, lambda C: C(_p())),
    "non_leaf": (NAMES, lambda C: C([_p() * 2])),
    "lr": (NAMES, lambda C: C([_p()], lr=-0.1)),
    "weight_decay": (NAMES, lambda C: C([_p()], weight_decay=-1e-3)),
    "eps": (["Adam", "AdamW", "RMSprop"], lambda C: C([_p()], eps=-1e-8)),
    "beta0": (["Adam", "AdamW"], lambda C: C([_p()], betas=(1.0, 0.999))),
    "beta1": (["Adam", "AdamW"], lambda C: C([_p()], betas=(0.9, -0.5))),
    "momentum": (["SGD", "RMSprop"], lambda C: C([_p()], momentum=-0.9)),
    "alpha": (["RMSprop"], lambda C: C([_p()], alpha=-0.1)),
    "nesterov_no_momentum": (["SGD"], lambda C: C([_p()], nesterov=True)),
    "nesterov_dampening": (["SGD"], lambda C: C([_p()], nesterov=True, momentum=0.9, dampening=0.5)),
    "duplicate_param": (NAMES, lambda C: _duplicate(C)),
}
EXPECTED_MESSAGES = {
    "empty": (ValueError, "optimizer got an empty parameter list"),
    "bare_tensor": (TypeError, None),
    "non_leaf": (ValueError, "can't optimize a non-leaf Tensor"),
    "lr": (ValueError, "Invalid learning rate: -0.1"),
    "weight_decay": (ValueError, "Invalid weight_decay value: -0.001"),
    "eps": (ValueError, "Invalid epsilon value: -1e-08"),
    "beta0": (ValueError, "Invalid beta parameter at index 0: 1.0"),
    "beta1": (ValueError, "Invalid beta parameter at index 1: -0.5"),
    "momentum": (ValueError, "Invalid momentum value: -0.9"),
    "alpha": (ValueError, "Invalid alpha value: -0.1"),
    "nesterov_no_momentum": (ValueError, "Nesterov momentum requires a momentum and zero dampening"),
    "nesterov_dampening": (ValueError, "Nesterov momentum requires a momentum and zero dampening"),
    "duplicate_param": (ValueError, None),
}


@pytest.mark.parametrize(
    ("case", "name"), [(case, name) for case, (names, _) in ERROR_CASES.items() for name in names]
)
def test_construction_errors_match_torch(case, name):
    make = ERROR_CASES[case][1]
    with pytest.raises(Exception) as torch_err:
        make(getattr(torch.optim, name))
    with pytest.raises(Exception) as rs_err:
        make(getattr(rsoptim, name))
    assert type(rs_err.value) is type(torch_err.value)
    assert str(rs_err.value) == str(torch_err.value)
    exc_type, message = EXPECTED_MESSAGES[case]
    assert type(rs_err.value) is exc_type
    if message is not None:
        assert str(rs_err.value) == message


FLAG_CASES = [
    ("SGD", dict(momentum=0.9), dict(foreach=True)),
    ("SGD", dict(momentum=0.9), dict(foreach=False)),
    ("SGD", dict(momentum=0.9), dict(fused=True)),
    ("Adam", dict(), dict(foreach=True)),
    ("Adam", dict(), dict(foreach=False)),
    ("Adam", dict(amsgrad=True), dict(fused=True)),
    ("AdamW", dict(), dict(foreach=True)),
    ("AdamW", dict(), dict(fused=True)),
    ("RMSprop", dict(momentum=0.5), dict(foreach=True)),
    ("RMSprop", dict(centered=True), dict(foreach=False)),
]


@pytest.mark.parametrize(("name", "kwargs", "flags"), FLAG_CASES, ids=[f"{n}-{k}-{f}" for n, k, f in FLAG_CASES])
def test_foreach_fused_accepted_on_cpu(name, kwargs, flags):
    """The flags are accepted and the CPU numbers are torch's for-loop ones (the reference is
    always the default torch optimizer). capturable=True on CPU: see test_reliability.py."""
    kwargs = dict(kwargs, lr=0.01)
    init = initial()
    pt, pr = leaves(init), leaves(init)
    ot = getattr(torch.optim, name)(pt, **kwargs)
    orr = getattr(rsoptim, name)(pr, **kwargs, **flags)
    for key, value in flags.items():
        assert orr.param_groups[0][key] == value
    drive(ot, pt, 4)
    drive(orr, pr, 4)
    assert_tensors_close([p.detach() for p in pr], [p.detach() for p in pt])
    st = ot.state_dict()["state"]
    sr = orr.state_dict()["state"]
    assert sr.keys() == st.keys() and len(sr) > 0
    for index, state in sr.items():
        assert state.keys() == st[index].keys()
        for key, value in state.items():
            if key == "step":
                assert value.dtype == torch.float32 and value.dim() == 0
                assert torch.equal(value, st[index][key])
            else:
                torch.testing.assert_close(value, st[index][key], **TOL64)


# ---------------------------------------------------------------------------------------------
# sparse grads


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Adam", "Adam does not support sparse gradients, please consider SparseAdam instead"),
        ("AdamW", "Adam does not support sparse gradients, please consider SparseAdam instead"),
        ("RMSprop", "RMSprop does not support sparse gradients"),
    ],
)
def test_sparse_grad_raises_before_anything_changes(name, message):
    # torch's exact message first (so this test follows torch if torch changes it).
    q = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    q.grad = sparse_grad(4)
    with pytest.raises(RuntimeError) as torch_err:
        getattr(torch.optim, name)([q]).step()
    assert str(torch_err.value) == message

    first = leaves(initial(shapes=[(3, 2), (5,)]))
    second = [torch.nn.Parameter(torch.arange(4.0, dtype=torch.float64)), torch.nn.Parameter(torch.ones(2, dtype=torch.float64))]
    params = first + second
    opt = getattr(rsoptim, name)([{"params": first}, {"params": second, "lr": 0.5}], lr=0.1)
    # Two good steps, so the first group has state that must not move either.
    for i in range(2):
        set_grads(params, i)
        opt.step()
    set_grads(params, 2)
    second[0].grad = sparse_grad(4)
    snap_params, snap_state = _snapshot(opt, params)
    assert any(p.grad.is_sparse for p in params)
    with pytest.raises(RuntimeError) as rs_err:
        opt.step()
    assert type(rs_err.value) is type(torch_err.value)
    assert str(rs_err.value) == message
    after_params, after_state = _snapshot(opt, params)
    assert_tensors_close(after_params, snap_params, tol=dict(rtol=0, atol=0))
    assert_state_close(after_state, snap_state, tol=dict(rtol=0, atol=0))

    # A param with no state yet that meets the sparse grad gets none.
    fresh = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt2 = getattr(rsoptim, name)([{"params": [torch.nn.Parameter(torch.ones(2, dtype=torch.float64))]}, {"params": [fresh]}])
    opt2.param_groups[0]["params"][0].grad = torch.ones(2, dtype=torch.float64)
    fresh.grad = sparse_grad(4)
    with pytest.raises(RuntimeError, match="sparse"):
        opt2.step()
    assert len(opt2.state) == 0
    assert torch.equal(opt2.param_groups[0]["params"][0].detach(), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_accepts_sparse_grads_like_torch(momentum):
    def run(module):
        p = torch.nn.Parameter(torch.arange(4.0, dtype=torch.float64))
        q = torch.nn.Parameter(torch.arange(3.0, dtype=torch.float64))
        opt = getattr(module, "SGD")([p, q], lr=0.1, momentum=momentum)
        for i in range(3):
            p.grad = sparse_grad(4) * (i + 1)
            q.grad = torch.full((3,), float(i + 1), dtype=torch.float64)
            opt.step()
        return [p.detach(), q.detach()], opt.state_dict()

    (pt, st), (pr, sr) = run(torch.optim), run(rsoptim)
    assert_tensors_close(pr, pt)
    assert sr["state"].keys() == st["state"].keys()
    for index in st["state"]:
        a, b = sr["state"][index]["momentum_buffer"], st["state"][index]["momentum_buffer"]
        assert a.layout == b.layout
        torch.testing.assert_close(a.to_dense(), b.to_dense(), **TOL64)


# ---------------------------------------------------------------------------------------------
# the Rust binding's own buffer checks: nothing is written when a call is refused


class AdamBuffers:
    """Real float32 tensors for a two-tensor adam_step call, and the call itself."""

    def __init__(self, numel=64):
        g = torch.Generator().manual_seed(7)
        self.params = [torch.randn(numel, generator=g) for _ in range(2)]
        self.grads = [torch.randn(numel, generator=g) for _ in range(2)]
        self.exp_avgs = [torch.randn(numel, generator=g).abs() for _ in range(2)]
        self.exp_avg_sqs = [torch.randn(numel, generator=g).abs() for _ in range(2)]
        self.steps = [torch.tensor(3.0), torch.tensor(5.0)]

        self.extra = []  # buffers a case brings in besides these

    def all(self):
        return self.params + self.grads + self.exp_avgs + self.exp_avg_sqs + self.steps + self.extra

    def snapshot(self):
        return [t.clone() for t in self.all()]

    def call(self, numels=None, params=None, grads=None, exp_avgs=None, exp_avg_sqs=None, steps=None, max_sq=None):
        addrs = lambda ts: [t.data_ptr() for t in ts]  # noqa: E731
        _rsoptim.adam_step(
            "float32",
            "float32",
            pack(numels if numels is not None else [p.numel() for p in self.params]),
            pack(params if params is not None else addrs(self.params)),
            pack(grads if grads is not None else addrs(self.grads)),
            pack(exp_avgs if exp_avgs is not None else addrs(self.exp_avgs)),
            pack(exp_avg_sqs if exp_avg_sqs is not None else addrs(self.exp_avg_sqs)),
            None if max_sq is None else pack(max_sq),
            pack(steps if steps is not None else addrs(self.steps)),
            lr=0.1,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            amsgrad=max_sq is not None,
            maximize=False,
            decoupled_weight_decay=False,
        )


def _unchanged(bufs, snapshot):
    return all(torch.equal(a, b) for a, b in zip(bufs.all(), snapshot))


def test_low_level_valid_call_writes():
    """Positive control: the same call with separate buffers does update everything."""
    b = AdamBuffers()
    before = b.snapshot()
    b.call()
    assert not torch.equal(b.params[0], before[0]) and not torch.equal(b.params[1], before[1])
    assert b.steps[0].item() == 4.0 and b.steps[1].item() == 6.0


def _bad_calls():
    def param_as_grad(b):
        b.call(grads=[b.params[0].data_ptr(), b.grads[1].data_ptr()])

    def params_share_memory(b):
        base = torch.randn(96)
        b.params = [base[:64], base[32:]]  # overlapping views of one storage
        b.call()

    def param_is_its_own_state(b):
        b.call(exp_avgs=[b.params[0].data_ptr(), b.exp_avgs[1].data_ptr()])

    def step_inside_a_param(b):
        b.call(steps=[b.params[1].data_ptr() + 8, b.steps[1].data_ptr()])

    def state_overlaps_grad_partially(b):
        b.call(exp_avg_sqs=[b.exp_avg_sqs[0].data_ptr(), b.grads[0].data_ptr() + 4 * 10])

    def misaligned(b):
        # A real address inside a live float32 buffer, 2 bytes off a float32 boundary.
        holder = torch.randn(70)
        b.extra = [holder]
        b.call(numels=[64, 64], params=[b.params[0].data_ptr(), holder.data_ptr() + 2])

    def misaligned_step(b):
        holder = torch.zeros(4)
        b.extra = [holder]
        b.call(steps=[b.steps[0].data_ptr(), holder.data_ptr() + 1])

    def short_grads(b):
        b.call(grads=[b.grads[0].data_ptr()])

    def long_steps(b):
        b.call(steps=[b.steps[0].data_ptr(), b.steps[1].data_ptr(), b.steps[1].data_ptr()])

    def amsgrad_missing_one(b):
        b.extra = [torch.zeros(64)]
        b.call(max_sq=[b.extra[0].data_ptr()])

    def null_param(b):
        b.call(params=[0, b.params[1].data_ptr()])

    return [
        param_as_grad,
        params_share_memory,
        param_is_its_own_state,
        step_inside_a_param,
        state_overlaps_grad_partially,
        misaligned,
        misaligned_step,
        short_grads,
        long_steps,
        amsgrad_missing_one,
        null_param,
    ]


@pytest.mark.parametrize("bad_call", _bad_calls(), ids=lambda f: f.__name__)
def test_low_level_adam_refuses_bad_buffers_and_writes_nothing(bad_call):
    b = AdamBuffers()
    # Snapshot after the case has swapped in its own buffers.
    original_call = b.call
    snapshots = {}

    def call(**kwargs):
        snapshots["before"] = b.snapshot()
        return original_call(**kwargs)

    b.call = call
    with pytest.raises(ValueError):
        bad_call(b)
    assert _unchanged(b, snapshots["before"])


def test_low_level_overlap_message_names_shared_memory():
    b = AdamBuffers()
    with pytest.raises(ValueError, match="share memory"):
        b.call(grads=[b.params[0].data_ptr(), b.grads[1].data_ptr()])
    with pytest.raises(ValueError, match="aligned"):
        b.call(numels=[63, 64], params=[b.params[0].data_ptr() + 2, b.params[1].data_ptr()])


def test_low_level_read_only_grads_may_share_memory():
    """Grads are only read, so two tensors may share one grad buffer; the result is the same as
    with two separate copies of it."""
    b1, b2 = AdamBuffers(), AdamBuffers()
    b1.call(grads=[b1.grads[0].data_ptr(), b1.grads[0].data_ptr()])
    b2.grads[1].copy_(b2.grads[0])
    b2.call()
    assert all(torch.equal(x, y) for x, y in zip(b1.params + b1.exp_avgs + b1.exp_avg_sqs, b2.params + b2.exp_avgs + b2.exp_avg_sqs))


def test_low_level_sgd_and_rmsprop_refuse_overlap_and_write_nothing():
    g = torch.Generator().manual_seed(11)
    p = [torch.randn(32, generator=g) for _ in range(2)]
    gr = [torch.randn(32, generator=g) for _ in range(2)]
    buf = [torch.randn(32, generator=g) for _ in range(2)]
    sq = [torch.rand(32, generator=g) for _ in range(2)]
    steps = [torch.tensor(1.0), torch.tensor(1.0)]
    everything = p + gr + buf + sq + steps
    before = [t.clone() for t in everything]
    with pytest.raises(ValueError, match="share memory"):
        _rsoptim.sgd_step(
            "float32", pack([32, 32]), pack([p[0].data_ptr(), p[1].data_ptr()]), pack([gr[0].data_ptr(), gr[1].data_ptr()]),
            pack([buf[0].data_ptr(), p[0].data_ptr()]), [False, False],
            lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
        )
    with pytest.raises(ValueError):
        _rsoptim.sgd_step(
            "float32", pack([32, 32]), pack([p[0].data_ptr(), p[1].data_ptr()]), pack([gr[0].data_ptr()]),
            None, [False, False],
            lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
        )
    with pytest.raises(ValueError, match="share memory"):
        _rsoptim.rmsprop_step(
            "float32", "float32", pack([32, 32]), pack([p[0].data_ptr(), p[1].data_ptr()]), pack([gr[0].data_ptr(), gr[1].data_ptr()]),
            pack([sq[0].data_ptr(), p[1].data_ptr() + 4]), None, None, pack([steps[0].data_ptr(), steps[1].data_ptr()]),
            lr=0.1, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False,
        )
    assert all(torch.equal(a, b) for a, b in zip(everything, before))
    # And the well-formed RMSprop call does write.
    _rsoptim.rmsprop_step(
        "float32", "float32", pack([32, 32]), pack([p[0].data_ptr(), p[1].data_ptr()]), pack([gr[0].data_ptr(), gr[1].data_ptr()]),
        pack([sq[0].data_ptr(), sq[1].data_ptr()]), None, None, pack([steps[0].data_ptr(), steps[1].data_ptr()]),
        lr=0.1, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False,
    )
    assert not torch.equal(p[0], before[0]) and steps[0].item() == 2.0


# ---------------------------------------------------------------------------------------------
# threads


def _thread_job(name, seed, steps=25):
    """An optimizer on its own params, big enough for the kernels to use their thread pool."""
    init = initial(torch.float32, seed, shapes=[(300, 300), (70001,), (17,)])
    params = leaves(init)
    kwargs = dict(lr=0.01, momentum=0.9) if name in ("SGD", "RMSprop") else dict(lr=0.01)
    opt = getattr(rsoptim, name)(params, **kwargs)

    def run():
        for i in range(steps):
            set_grads(params, i + 100 * seed)
            opt.step()
        return [p.detach().clone() for p in params]

    return run


def test_threads_each_with_own_optimizer_match_sequential():
    jobs = [(name, seed) for seed, name in enumerate(NAMES + NAMES)]
    sequential = [_thread_job(name, seed)() for name, seed in jobs]

    runs = [_thread_job(name, seed) for name, seed in jobs]
    results = [None] * len(runs)
    errors = []
    barrier = threading.Barrier(len(runs))

    def worker(i):
        try:
            barrier.wait()
            results[i] = runs[i]()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (name, seed), seq, par in zip(jobs, sequential, results):
        for a, b in zip(seq, par):
            assert torch.equal(a, b), (name, seed)


# ---------------------------------------------------------------------------------------------
# changes between steps (rsoptim caches each group's buffer addresses between steps; every
# change below must be seen, as torch sees it)


def _mutations():
    def reload_earlier_state(opt, params, i, saved):
        opt.load_state_dict(copy.deepcopy(saved))

    def replace_param_data(opt, params, i, saved):
        params[0].data = params[0].data.clone() * 0.5

    def replace_state_tensor(opt, params, i, saved):
        state = opt.state[params[0]]
        key = next(k for k in state if k != "step")
        state[key] = state[key].clone() * 0.5

    def clear_state(opt, params, i, saved):
        opt.state.clear()

    def freeze_param(opt, params, i, saved):
        params[2].grad = None

    def transposed_grad(opt, params, i, saved):
        params[0].grad = params[0].grad.t().contiguous().t()

    def grad_accumulated_in_place(opt, params, i, saved):
        params[1].grad.mul_(3.0)

    def change_hyperparameters(opt, params, i, saved):
        g = opt.param_groups[0]
        g["lr"] *= 0.5
        # Switching amsgrad / centered off (torch itself raises KeyError switching them on).
        if "amsgrad" in g:
            g["amsgrad"] = False
        if "centered" in g:
            g["centered"] = False
        if "nesterov" in g:
            g["nesterov"] = not g["nesterov"]
        if "maximize" in g:
            g["maximize"] = not g["maximize"]

    def add_param_group(opt, params, i, saved):
        extra = torch.nn.Parameter(torch.full((6,), 0.25, dtype=torch.float64))
        opt.add_param_group({"params": [extra], "lr": 0.02})
        params.append(extra)

    return [
        reload_earlier_state,
        replace_param_data,
        replace_state_tensor,
        clear_state,
        freeze_param,
        transposed_grad,
        grad_accumulated_in_place,
        change_hyperparameters,
        add_param_group,
    ]


MUTATION_CONFIGS = [
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("Adam", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, amsgrad=True)),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
@pytest.mark.parametrize(("name", "kwargs"), MUTATION_CONFIGS, ids=[c[0] for c in MUTATION_CONFIGS])
def test_changes_between_steps_are_seen(name, kwargs, mutate):
    pt, ot, pr, orr = pair(name, kwargs)
    saved = {}
    for i in range(8):
        for opt, params in ((ot, pt), (orr, pr)):
            set_grads(params, i)
            if i == 1:
                saved[id(opt)] = copy.deepcopy(opt.state_dict())
            if i == 4:
                mutate(opt, params, i, saved[id(opt)])
            opt.step()
        assert_tensors_close([p.detach() for p in pr], [p.detach() for p in pt])
        assert_state_close(orr.state_dict(), ot.state_dict())


def test_sgd_first_momentum_buffer_has_torchs_strides():
    def run(module):
        p = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).t())
        q = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)))
        opt = module.SGD([p, q], lr=0.1, momentum=0.9)
        p.grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
        q.grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(3)).t()
        opt.step()
        return [opt.state[x]["momentum_buffer"] for x in (p, q)]

    bt, br = run(torch.optim), run(rsoptim)
    for a, b in zip(br, bt):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the values agree either way
        assert a.stride() == b.stride()


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_state_strides_follow_the_param_like_torch(name):
    """Adam/RMSprop state is zeros_like(param, preserve_format) in torch: the param's strides."""

    def run(module):
        p = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).t())
        opt = getattr(module, name)([p], momentum=0.5, centered=True) if name == "RMSprop" else getattr(module, name)([p])
        p.grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
        opt.step()
        return {k: v.stride() for k, v in opt.state[p].items()}

    assert run(rsoptim) == run(torch.optim)


def test_load_state_dict_lets_the_old_state_go():
    """rsoptim caches buffer addresses between steps; loading a state dict must not keep the
    replaced state tensors alive (a model's worth of memory)."""
    import gc
    import weakref

    p = torch.nn.Parameter(torch.randn(10))
    opt = rsoptim.Adam([p])
    for _ in range(2):
        p.grad = torch.ones(10)
        opt.step()
    old = weakref.ref(opt.state[p]["exp_avg"])
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    gc.collect()
    assert old() is None
    p.grad = torch.ones(10)
    opt.step()
    assert opt.state[p]["step"].item() == 3.0


@pytest.mark.parametrize("name", [*NAMES, "AdamW8bit"])
def test_inference_params_are_refused_outside_inference_mode_as_in_torch(name):
    """torch refuses an in-place write to an inference tensor outside inference mode (after its
    step has written the param: the version bump raises). The kernels wrote such params and
    raised nothing; now torch's implementation steps them, and raises."""

    def run(cls):
        with torch.inference_mode():
            p = torch.linspace(-1, 1, 4096)
            p.grad = torch.linspace(1, 2, 4096)
        with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
            cls([p], lr=0.1, **({"momentum": 0.9} if name == "SGD" else {})).step()
        return p

    ours = run(getattr(rsoptim, name))
    if name != "AdamW8bit":  # (8-bit states write other values than torch's float32 Adam)
        assert torch.equal(run(getattr(torch.optim, name)), ours)


@pytest.mark.parametrize("shape", [(40,), (8, 5)], ids=["contiguous grad", "transposed grad"])
def test_an_error_after_sgd_filled_new_momentum_buffers_keeps_them(shape, monkeypatch):
    # SGD's first momentum buffers are made empty and filled by the kernel. An exception raised
    # later in the same step (here a Ctrl-C while the step plan is built) removed them too, so
    # the next step started the momentum afresh; they are kept once filled, as torch keeps the
    # buffers it has written.
    from rsoptim import _optimizer

    def make(module):
        p = torch.linspace(-1, 1, 40).reshape(shape).requires_grad_()
        return p, getattr(module, "SGD")([p], lr=0.1, momentum=0.9, dampening=0.5)

    def grad(p, i):
        g = torch.linspace(0.5, 1.5, 40).reshape(shape[::-1]) * (i + 1)
        return g.t() if len(shape) == 2 else g  # strides unlike the param's: copied back

    ours, opt = make(rsoptim)
    theirs, ref = make(torch.optim)
    build = _optimizer._Plan.build

    def interrupted(*args):
        monkeypatch.setattr(_optimizer._Plan, "build", build)
        raise KeyboardInterrupt

    monkeypatch.setattr(_optimizer._Plan, "build", interrupted)
    for i in range(3):
        ours.grad, theirs.grad = grad(ours, i), grad(theirs, i)
        if i == 0:
            with pytest.raises(KeyboardInterrupt):
                opt.step()
        else:
            opt.step()
        ref.step()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(opt.state[ours]["momentum_buffer"], ref.state[theirs]["momentum_buffer"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# efficient zero tensors


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_an_efficient_zero_tensor_grad_steps_as_in_torch(name, kwargs):
    """A grad that is an efficient zero tensor (``torch._efficientzerotensor``: no memory, all
    zeros) is stepped as torch.optim's for-loop steps it, after steps with real grads and from
    the first step on (the kernels cannot read it: torch's implementation steps its param)."""
    for zero_from in (0, 2):
        pt, opt_t, pr, opt_r = pair(name, {**kwargs, "foreach": False})
        for step in range(4):
            for params in (pt, pr):
                torch.manual_seed(step)
                for i, p in enumerate(params):
                    zero = i == 0 and step >= zero_from
                    p.grad = torch._efficientzerotensor(p.shape, dtype=p.dtype) if zero else torch.randn_like(p)
            opt_t.step()
            opt_r.step()
        assert pr[0].grad._is_zerotensor()  # (left as it was)
        for a, b in zip(pr, pt):
            torch.testing.assert_close(a.detach(), b.detach(), **TOL64)
        assert_state_close(opt_r.state_dict(), opt_t.state_dict())


def _zero_tensor_targets(name, kwargs):
    keys = {"SGD": ["momentum_buffer"] if kwargs.get("momentum") else [], "RMSprop": ["square_avg", "step"]}
    return ["param", *keys.get(name, ["exp_avg", "step"])]


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_a_zero_tensor_param_or_state_raises_torchs_error_before_anything_is_written(name, kwargs):
    """A param or state tensor that is an efficient zero tensor (no memory) cannot be written:
    the step raises torch's own error, and (unlike torch's for-loop, which steps the params
    before it) leaves every param and state as it was."""
    for target in _zero_tensor_targets(name, kwargs):
        errors = []
        for module in (torch.optim, rsoptim):
            ps = [torch.nn.Parameter(torch.randn(6, dtype=torch.float64)) for _ in range(3)]
            if target == "param":
                ps[1] = torch.nn.Parameter(torch._efficientzerotensor(6, dtype=torch.float64))
            opt = getattr(module, name)(ps, **{**kwargs, "foreach": False})
            for p in ps:
                p.grad = torch.ones_like(p)
            if target != "param":
                opt.step()
                state = opt.state[ps[1]]
                state[target] = torch._efficientzerotensor(state[target].shape, dtype=state[target].dtype)
            before = [p.detach().clone() for p in ps]
            with pytest.raises(RuntimeError, match="ZeroTensors are immutable") as error:
                opt.step()
            errors.append(str(error.value))
            if module is rsoptim:
                assert all(torch.equal(a, b) for a, b in zip(before, ps)), target
        assert errors[0] == errors[1], target
