"""torch's own optimizer test database, run against rsoptim.

torch ships its optimizer test configurations in ``torch.testing._internal.common_optimizers``
(``optim_db``: one ``OptimizerInfo`` per optimizer, with ``optim_inputs_func`` giving the
constructor configurations and ``optim_error_inputs_func`` the ones that must fail), but not
``test/test_optim.py`` (``TestOptimRenewed``), which runs them. This file runs the SGD, Adam,
AdamW and RMSprop entries against rsoptim:

* parity: every CPU configuration, with each implementation flag torch's helper
  (``_get_optim_inputs_including_global_cliquey_kwargs``) adds for the CPU (``fused`` and
  ``differentiable``), plus ``foreach=True`` (torch's for-each implementation runs on the CPU
  too) and the configurations torch keeps for CUDA/MPS (``capturable``, Tensor lr/betas): the
  same kwargs given to torch.optim's class and to rsoptim's, over identical params (a small
  MLP as torch's harness has it; several param groups with params that have no grad, skip
  steps or are not contiguous; complex params mixed with real ones), float32 and float64,
  compared after every step within ``torch.testing.assert_close``'s default tolerances (params,
  grads, every state key; step counts exactly). Where torch raises (capturable on CPU params,
  fused on complex params, differentiable on leaf params), rsoptim must raise the same
  exception with the same message at the same point; where ``differentiable=True`` runs, the
  gradients through the steps must agree too;
* bfloat16: Adam/AdamW against torch's fused CPU kernel (whose numerics rsoptim gives half
  params), SGD/RMSprop against torch's for-loop stepping float32 copies, rounded once (what
  the fused kernels compute), default bfloat16 tolerances;
* the error inputs: every ``ErrorOptimizerInput`` must raise (or warn) the type and message torch
  expects, when torch expects it (construction or step), with the message torch gives;
* a port of the cheap CPU checks of ``TestOptimRenewed`` (in our own words), run on rsoptim's
  classes over torch's configurations, some cross-checked against torch.optim as well.

Two places where torch 2.13 itself is no reference, and rsoptim deliberately differs from it:
its fused CPU kernels step params that are not contiguous wrongly (the reference there is its
for-loop, see ``Scenario.fused_reference_is_forloop``), and its for-each Nesterov SGD writes
into the grads (see ``torch_writes_grads``).
"""

from __future__ import annotations

import copy
import functools
import io
import re
import warnings
from typing import Any, Callable

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import rsoptim
from conftest import TOLERANCES, assert_optimizers_match, seeded_grads

# Importing torch's test helpers freezes torch.backends' global flags for the whole process
# (common_utils calls torch.backends.disable_global_flags()): undo that for the other tests.
_FLAGS_WERE_FROZEN = torch.backends.flags_frozen()
try:
    from torch.testing._internal import common_optimizers as co
except Exception as exc:  # e.g. a wheel without the test helpers, or without expecttest
    pytest.skip(f"torch.testing._internal.common_optimizers cannot be imported: {exc!r}", allow_module_level=True)
finally:
    if not _FLAGS_WERE_FROZEN:  # (torch.backends is a wrapper: set the flag where it lives)
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
        assert not torch.backends.flags_frozen()

RSOPTIM = {
    torch.optim.SGD: rsoptim.SGD,
    torch.optim.Adam: rsoptim.Adam,
    torch.optim.AdamW: rsoptim.AdamW,
    torch.optim.RMSprop: rsoptim.RMSprop,
}
INFOS = [info for info in co.optim_db if info.optim_cls in RSOPTIM]
DTYPES = [torch.float32, torch.float64]
COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def test_optim_db_has_our_four_optimizers():
    assert sorted(info.name for info in INFOS) == ["Adam", "AdamW", "RMSprop", "SGD"]


# -------------------------------------------------------------------------------------------
# configurations
# -------------------------------------------------------------------------------------------


def _key(kwargs: dict[str, Any]) -> str:
    return repr(sorted((k, repr(v)) for k, v in kwargs.items()))


def _with_cliquey_flags(info: Any, dtype: torch.dtype) -> list[Any]:
    """torch's CPU configurations with each global-cliquey flag the CPU supports, through
    torch's own helper where this torch has it."""
    helper = getattr(co, "_get_optim_inputs_including_global_cliquey_kwargs", None)
    if helper is not None:
        return helper("cpu", dtype, info)
    out = []
    flags = [f for f in info.supported_impls if f != "foreach" and (f != "fused" or "cpu" in info.supports_fused_on)]
    for oi in info.optim_inputs_func(device="cpu", dtype=dtype):
        base = {**oi.kwargs, **{f: False for f in flags}}
        out.append(co.OptimizerInput(None, base, oi.desc))
        out += [co.OptimizerInput(None, {**base, f: True}, f"{oi.desc} & {f}") for f in flags]
    return out


def configs(info: Any, dtype: torch.dtype) -> list[tuple[str, dict[str, Any]]]:
    """(description, kwargs) of every configuration the parity tests run for ``info``."""
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()

    def add(desc: str, kwargs: dict[str, Any]) -> None:
        if _key(kwargs) not in seen:
            seen.add(_key(kwargs))
            out.append((desc, kwargs))

    for oi in _with_cliquey_flags(info, dtype):
        add(oi.desc, oi.kwargs)
    for oi in info.optim_inputs_func(device="cpu", dtype=dtype):
        # torch's helper sets each flag it adds to False in the base configuration; as most code
        # constructs optimizers, leave them unset too (torch picks its default implementation).
        add(f"{oi.desc} (flags unset)", oi.kwargs)
        # torch's helper leaves foreach out on the CPU (torch has no foreach kernels for it),
        # but torch.optim runs its for-each implementation on CPU params all the same.
        add(f"{oi.desc} & foreach", {**oi.kwargs, "foreach": True})
    cpu_descs = {oi.desc for oi in info.optim_inputs_func(device="cpu", dtype=dtype)}
    for device in ("cuda", "mps"):
        for oi in info.optim_inputs_func(device=device, dtype=dtype):
            if oi.desc in cpu_descs:
                continue
            # As given (torch refuses capturable=True for CPU params: so must rsoptim), and
            # without capturable (Tensor lr and betas, valid on the CPU).
            add(f"{oi.desc} [{device} config]", oi.kwargs)
            kwargs = {k: v for k, v in oi.kwargs.items() if k != "capturable"}
            tag = f"{device} config, capturable dropped" if "capturable" in oi.kwargs else f"{device} config"
            add(f"{oi.desc} [{tag}]", kwargs)
            # ... and with each flag the CPU configurations get (a Tensor lr or betas with them).
            for flag in ("foreach", "differentiable", "fused"):
                if flag in info.supported_impls and (flag != "fused" or "cpu" in info.supports_fused_on):
                    add(f"{oi.desc} [{tag}] & {flag}", {**kwargs, flag: True})
    return out


def _id(*parts: Any) -> str:
    text = "-".join(str(p).replace("torch.", "") for p in parts)
    return re.sub(r"\s+", "_", text)


# -------------------------------------------------------------------------------------------
# outcomes: torch raising where it raises
# -------------------------------------------------------------------------------------------


def _attempt(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - compared with torch's below
        return None, exc


def _same_failure(ours: BaseException | None, ref: BaseException | None, where: str) -> bool:
    """True if both raised (the same exception type and message), False if neither did."""
    if ref is None and ours is None:
        return False
    if ref is None:
        raise AssertionError(f"{where}: rsoptim raised {type(ours).__name__}: {ours} where torch does not") from ours
    if ours is None:
        raise AssertionError(f"{where}: torch raises {type(ref).__name__}: {ref}; rsoptim did not raise")
    assert type(ours) is type(ref), f"{where}: rsoptim raised {type(ours).__name__}: {ours}; torch {type(ref).__name__}: {ref}"
    assert str(ours) == str(ref), f"{where}: messages differ:\n  rsoptim: {ours}\n  torch:   {ref}"
    return True


# -------------------------------------------------------------------------------------------
# the params the parity tests step
# -------------------------------------------------------------------------------------------


class Scenario:
    """Params built identically on each call, and the grads of each step.

    ``spec`` goes to the optimizer; ``leaves`` are what a ``differentiable=True`` run
    differentiates with respect to (then the params are non-leaf copies of them, which torch
    lets a differentiable optimizer step in place).
    """

    steps = 5
    grads_exact = True  # grads given identically to both sides (not from each side's backward)
    # torch 2.13's fused CPU kernels (SGD, Adam, AdamW) step a param that is not contiguous as
    # if it were (its values paired with the wrong grad and state elements; see
    # test_fused_on_params_that_are_not_contiguous): where a scenario has such params, the
    # reference for fused=True is torch's for-loop, which torch's own test_fused_matches_forloop
    # holds the fused kernels to.
    fused_reference_is_forloop = False

    def __init__(self, dtype: torch.dtype, differentiable: bool) -> None:
        self.dtype = dtype
        self.differentiable = differentiable
        self.gen = torch.Generator().manual_seed(1234)
        self.leaves: list[torch.Tensor] = []
        self.params: list[torch.Tensor] = []

    def make(self, shape: tuple[int, ...], dtype: torch.dtype | None = None, view: Callable | None = None) -> torch.Tensor:
        value = torch.randn(shape, generator=self.gen, dtype=torch.complex128 if (dtype or self.dtype).is_complex else torch.float64)
        value = value.to(dtype or self.dtype)
        if self.differentiable:
            leaf = value.requires_grad_()
            p = leaf.clone()
            p = view(p) if view else p
            p.retain_grad()  # (a non-leaf's .grad is read by the optimizer)
        else:
            leaf = p = (view(value) if view else value).detach().requires_grad_()
        self.leaves.append(leaf)
        self.params.append(p)
        return p

    def before_step(self, i: int) -> None:
        raise NotImplementedError

    def grad(self, g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The grad given to ``p``: ``g``, or with ``differentiable=True`` a grad with a history
        (through ``p``), so that the steps' results depend on the params through the updates
        too (and a step taken without autograd shows)."""
        return g * (1 + 0.1 * p) if self.differentiable else g


class GroupsScenario(Scenario):
    """Two param groups, the second with its own lr and no weight decay (as torch's
    param-group tests); a param that never gets a grad, one that skips steps, one that is not
    contiguous, a 0-dim one."""

    steps = 5
    fused_reference_is_forloop = True

    def __init__(self, dtype: torch.dtype, differentiable: bool) -> None:
        super().__init__(dtype, differentiable)
        first = [
            self.make((10, 5)),
            self.make((10,)),
            self.make((10, 5, 2), view=lambda t: t[..., 0]),  # not contiguous
            self.make((3, 3)),  # never a grad: no state, never moves
            self.make((17,)),  # no grad on steps 1 and 3
            self.make(()),
        ]
        second = [self.make((33,)), self.make((4, 4))]
        self.spec = [{"params": first}, {"params": second, "lr": 0.02, "weight_decay": 0.0}]
        self.grads = seeded_grads(seed=5)

    def before_step(self, i: int) -> None:
        for index, p in enumerate(self.params):
            none = index == 3 or (index == 4 and i in (1, 3))
            p.grad = None if none else self.grad(self.grads(i, index, p), p)


class ComplexScenario(Scenario):
    """Complex params with a real one in the same group (as torch's test_complex)."""

    steps = 4

    def __init__(self, dtype: torch.dtype, differentiable: bool) -> None:
        super().__init__(dtype, differentiable)
        cdtype = COMPLEX[dtype]
        self.spec = [self.make((10, 5), cdtype), self.make((10,), cdtype), self.make((10, 5))]
        self.grads = seeded_grads(seed=9)

    def before_step(self, i: int) -> None:
        for index, p in enumerate(self.params):
            p.grad = self.grad(self.grads(i, index, p), p)


class ModelScenario(Scenario):
    """torch's harness for comparing implementations (``_compare_between``): a small MLP and a
    0-dim param, 7 iterations, no backward at iteration 2 (every grad None), the second linear
    layer frozen at iterations 3 and 4. The grads come from each side's own backward. (Its
    params are leaves, so ``differentiable=True`` must fail in rsoptim as it does in torch.)"""

    steps = 7
    grads_exact = False

    def __init__(self, dtype: torch.dtype, differentiable: bool) -> None:
        super().__init__(dtype, differentiable)
        self.model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
        self.model.to(dtype)
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=self.gen, dtype=torch.float64))
        self.zero_dim = torch.randn((), generator=self.gen, dtype=torch.float64).to(dtype).requires_grad_()
        self.params = [*self.model.parameters(), self.zero_dim]
        self.leaves = list(self.params)
        self.spec = list(self.params)
        self.input = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)

    def before_step(self, i: int) -> None:
        for p in self.params:
            p.grad = None
        self.model[2].requires_grad_(i not in (3, 4))
        if i != 2:
            h = self.input
            for layer in self.model:  # (F.linear on bfloat16 CPU tensors takes milliseconds a call)
                h = h @ layer.weight.t() + layer.bias if isinstance(layer, torch.nn.Linear) else layer(h)
            h.sum().backward()
            self.zero_dim.grad = torch.full((), 0.25 * (i + 1), dtype=self.dtype)


SCENARIOS = {"model": ModelScenario, "groups": GroupsScenario, "complex": ComplexScenario}


def run_parity(info: Any, kwargs: dict[str, Any], scenario: type[Scenario], dtype: torch.dtype) -> str:
    """Steps torch.optim's class and rsoptim's with the same kwargs over identical params and
    compares them after every step; returns 'raised' if torch raised (and rsoptim alike)."""
    differentiable = bool(kwargs.get("differentiable"))
    ref_side, our_side = scenario(dtype, differentiable), scenario(dtype, differentiable)
    ref_kwargs = kwargs
    if kwargs.get("fused") and scenario.fused_reference_is_forloop:
        ref_kwargs = {**kwargs, "fused": False}
    ref, ref_exc = _attempt(lambda: info.optim_cls(ref_side.spec, **copy.deepcopy(ref_kwargs)))
    ours, our_exc = _attempt(lambda: RSOPTIM[info.optim_cls](our_side.spec, **copy.deepcopy(kwargs)))
    if _same_failure(our_exc, ref_exc, "constructing"):
        return "raised"
    assert_optimizers_match(ours, ref, where="before any step")
    for i in range(scenario.steps):
        ref_side.before_step(i)
        our_side.before_step(i)
        given = [None if q.grad is None else q.grad.clone() for q in ref_side.params]
        _, ref_exc = _attempt(ref.step)
        _, our_exc = _attempt(ours.step)
        if _same_failure(our_exc, ref_exc, f"step {i + 1}"):
            return "raised"
        if torch_writes_grads(info, kwargs):
            for q, g in zip(ref_side.params, given):
                q.grad = g  # (torch added to them: see torch_writes_grads)
        assert_optimizers_match(ours, ref, grads_exact=scenario.grads_exact, where=f"after step {i + 1}")
    if differentiable:
        # The gradients through every step, with respect to the params' initial values (or the
        # failure to compute them: torch's in-place state updates break some, e.g. amsgrad's).
        grads, failures = [], []
        for side in (ref_side, our_side):
            weights = torch.Generator().manual_seed(3)
            loss = sum((p * torch.randn(p.shape, generator=weights, dtype=p.dtype)).real.sum() for p in side.params)
            result, exc = _attempt(lambda: torch.autograd.grad(loss, side.leaves))
            grads.append(result)
            failures.append(exc)
        if _same_failure(failures[1], failures[0], "differentiating through the steps"):
            return "stepped"
        for index, (want, got) in enumerate(zip(*grads)):
            rtol, atol = TOLERANCES[want.dtype]
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"d(loss)/d(param {index}): {m}")
    return "stepped"


def torch_writes_grads(info: Any, kwargs: dict[str, Any]) -> bool:
    """torch's for-each SGD with Nesterov momentum adds ``momentum * buf`` into ``p.grad`` in
    place where a group has no weight decay and does not maximize (it writes to the grads
    themselves); its for-loop and fused implementations and rsoptim leave the grads as they are
    (see test_foreach_nesterov_sgd_leaves_the_grads). The parity runs compare rsoptim's grads
    with the grads as given there."""
    return info.optim_cls is torch.optim.SGD and bool(kwargs.get("foreach")) and bool(kwargs.get("nesterov"))


def known_disagreement(info: Any, kwargs: dict[str, Any], scenario: type[Scenario]) -> str | None:
    """Why rsoptim is known to disagree with the reference in this case (None: it must not)."""
    return None


PARITY_CASES = [
    pytest.param(
        info,
        kwargs,
        SCENARIOS[name],
        dtype,
        id=_id(info.name, dtype, desc, name),
        marks=[pytest.mark.xfail(strict=True, reason=reason)] if (reason := known_disagreement(info, kwargs, SCENARIOS[name])) else [],
    )
    for info in INFOS
    for dtype in DTYPES
    for desc, kwargs in configs(info, dtype)
    for name in SCENARIOS
]


#: What each parity case did ('raised' or 'stepped'), by case id.
OUTCOMES: dict[str, str] = {}


@pytest.mark.parametrize("info, kwargs, scenario, dtype", PARITY_CASES)
def test_parity_with_torch(request, info, kwargs, scenario, dtype):
    OUTCOMES[request.node.callspec.id] = run_parity(info, kwargs, scenario, dtype)


def torch_refuses(info: Any, kwargs: dict[str, Any], scenario: type[Scenario]) -> bool:
    """Where torch raises (and so must rsoptim): capturable=True with CPU params; fused=True
    with complex params; a Tensor lr with foreach=True (Adam/AdamW: not capturable);
    differentiable=True stepping leaf params in place (the MLP's)."""
    tensor_lr = isinstance(kwargs.get("lr"), torch.Tensor)
    return bool(
        kwargs.get("capturable")
        or (kwargs.get("fused") and scenario is ComplexScenario)
        or (tensor_lr and kwargs.get("foreach") and info.optim_cls in (torch.optim.Adam, torch.optim.AdamW))
        or (kwargs.get("differentiable") and scenario is ModelScenario)
    )


def test_parity_cases_cover_what_torch_runs():
    """Every flag torch's CPU helper adds is there, and each case raised exactly where torch
    refuses the configuration (the suite does not pass by having everything raise). Uses the
    outcomes of the parity cases that ran before; runs the others."""
    flags = {flag for info in INFOS for _, kwargs in configs(info, torch.float32) for flag in ("fused", "foreach", "differentiable") if kwargs.get(flag)}
    assert flags == {"fused", "foreach", "differentiable"}
    unexpected = []
    for case in PARITY_CASES:
        info, kwargs, scenario, dtype = case.values
        if known_disagreement(info, kwargs, scenario):
            continue
        if case.id not in OUTCOMES:
            OUTCOMES[case.id] = run_parity(info, kwargs, scenario, dtype)
        if OUTCOMES[case.id] != ("raised" if torch_refuses(info, kwargs, scenario) else "stepped"):
            unexpected.append(f"{case.id}: {OUTCOMES[case.id]}")
    assert not unexpected, "\n".join(unexpected)
    assert sum(o == "stepped" for o in OUTCOMES.values()) >= 800


def test_foreach_nesterov_sgd_leaves_the_grads():
    """rsoptim.SGD(foreach=True, nesterov=True) steps as torch's does but leaves the grads as
    they were given (torch 2.13's for-each SGD adds momentum * buf into them, on groups without
    weight decay that do not maximize; its for-loop does not)."""
    results = []
    for cls in (torch.optim.SGD, rsoptim.SGD):
        p = torch.zeros(3, requires_grad=True)
        optimizer = cls([p], lr=0.1, momentum=0.9, nesterov=True, foreach=True)
        for _ in range(2):
            p.grad = torch.ones(3)
            optimizer.step()
        results.append((p.detach().clone(), p.grad.clone()))
    (torch_p, _), (our_p, our_grad) = results
    torch.testing.assert_close(our_p, torch_p)
    assert torch.equal(our_grad, torch.ones(3))


# -------------------------------------------------------------------------------------------
# bfloat16
# -------------------------------------------------------------------------------------------


def _bf16_cases() -> list[Any]:
    cases = []
    for info in INFOS:
        for oi in info.optim_inputs_func(device="cpu", dtype=torch.bfloat16):
            for fused in (False, True) if "cpu" in info.supports_fused_on else (False,):
                cases.append(pytest.param(info, {**oi.kwargs, **({"fused": True} if fused else {})}, id=_id(info.name, oi.desc, f"fused={fused}")))
    return cases


@pytest.mark.parametrize("info, kwargs", _bf16_cases())
def test_bfloat16_like_torch_fused_or_rounded_once(info, kwargs):
    """bfloat16 params (torch's harness, ``_compare_between``). rsoptim steps them with the
    numerics of torch's fused CPU kernels: the step computed in float32 from the bfloat16
    values, each result rounded once to bfloat16. Adam/AdamW are compared with torch's own
    ``fused=True`` as they are. torch's fused SGD is no reference for half params (torch 2.13's
    is off for them) and RMSprop has no fused kernel: for those, each step is compared with
    torch.optim's for-loop stepping float32 copies of the same bfloat16 params, grads and state
    (realigned to rsoptim's before every step), its results rounded to bfloat16. Default
    bfloat16 tolerances throughout."""
    ours_side = ModelScenario(torch.bfloat16, False)
    ours = RSOPTIM[info.optim_cls](ours_side.spec, **copy.deepcopy(kwargs))
    if info.optim_cls in (torch.optim.Adam, torch.optim.AdamW):
        ref_side = ModelScenario(torch.bfloat16, False)
        ref = info.optim_cls(ref_side.spec, **copy.deepcopy({**kwargs, "fused": True}))
        for i in range(ref_side.steps):
            ref_side.before_step(i)
            ours_side.before_step(i)
            ref.step()
            ours.step()
            assert_optimizers_match(ours, ref, grads_exact=False, where=f"after step {i + 1}")
        return
    ref_params = [p.detach().float().requires_grad_() for p in ours_side.params]
    ref = info.optim_cls(ref_params, **{k: v for k, v in copy.deepcopy(kwargs).items() if k != "fused"})
    for i in range(ours_side.steps):
        ours_side.before_step(i)
        with torch.no_grad():
            for p, q in zip(ours_side.params, ref_params):
                q.copy_(p)
                q.grad = None if p.grad is None else p.grad.float()
                if p in ours.state:
                    ref.state[q] = {k: v.clone() if k == "step" else v.float() for k, v in ours.state[p].items()}
        ref.step()
        ours.step()
        for index, (p, q) in enumerate(zip(ours_side.params, ref_params)):
            where = f"after step {i + 1}, param {index}"
            torch.testing.assert_close(p, q.to(torch.bfloat16), msg=lambda m: f"{where}: {m}")
            ref_state = ref.state.get(q, {})
            our_state = ours.state.get(p, {})
            assert set(our_state) == set(ref_state), f"{where}: state keys {sorted(our_state)} != {sorted(ref_state)}"
            for key, value in ref_state.items():
                expected = value if key == "step" else value.to(torch.bfloat16)
                torch.testing.assert_close(our_state[key], expected, msg=lambda m: f"{where} state[{key!r}]: {m}")


# -------------------------------------------------------------------------------------------
# error inputs
# -------------------------------------------------------------------------------------------


def _error_cases() -> list[Any]:
    cases = []
    for info in INFOS:
        if info.optim_error_inputs_func is None:
            continue
        for index, ei in enumerate(info.optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            cases.append(pytest.param(info, index, id=_id(info.name, ei.optimizer_error_input.desc)))
    return cases


def _provoke(cls: type, error_input: Any) -> BaseException:
    """Runs ``error_input`` against ``cls`` and returns what it raised (or warned), checked
    against the type and pattern torch's test_errors expects."""
    oi = error_input.optimizer_error_input
    construction = error_input.error_on == co.OptimizerErrorEnum.CONSTRUCTION_ERROR
    if issubclass(error_input.error_type, Warning):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer = cls(oi.params, **oi.kwargs)
            if not construction:
                optimizer.step()
        matching = [
            w.message
            for w in caught
            if issubclass(w.category, error_input.error_type) and re.search(error_input.error_regex, str(w.message))
        ]
        assert matching, f"{cls.__name__}: no {error_input.error_type.__name__} matching {error_input.error_regex!r}"
        return matching[0]
    with pytest.raises(error_input.error_type, match=error_input.error_regex) as err:
        optimizer = cls(oi.params, **oi.kwargs)
        assert not construction, f"{cls.__name__}: constructed, but torch raises at construction"
        optimizer.step()
    return err.value


@pytest.mark.parametrize("info, index", _error_cases())
def test_error_inputs(info, index):
    """torch's ErrorOptimizerInputs (test_errors): rsoptim raises or warns what torch expects,
    when torch expects it, with torch's own message."""
    make = functools.partial(info.optim_error_inputs_func, device="cpu", dtype=torch.float32)
    ref = _provoke(info.optim_cls, make()[index])
    ours = _provoke(RSOPTIM[info.optim_cls], make()[index])
    assert type(ours) is type(ref) and str(ours) == str(ref), f"rsoptim: {ours!r}\ntorch: {ref!r}"


# torch's error inputs for the fused/foreach/differentiable clashes are built on CUDA tensors;
# the checks themselves are in the constructors, so they are run here with CPU params.
CLASHES = [
    dict(foreach=True, fused=True),
    dict(fused=True, differentiable=True),
    dict(foreach=True, differentiable=True),
    dict(fused=True, capturable=True),
]


@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in INFOS])
@pytest.mark.parametrize("clash", CLASHES, ids=lambda c: "+".join(c))
def test_flag_clashes_fail_like_torch(info, clash):
    def run(cls: type) -> tuple[Any, BaseException | None]:
        p = torch.randn(3, requires_grad=True)
        p.grad = torch.ones_like(p)
        return _attempt(lambda: cls([p], **clash).step())

    _same_failure(run(RSOPTIM[info.optim_cls])[1], run(info.optim_cls)[1], f"{info.name}({clash})")


@pytest.mark.parametrize("layout", ["gaps", "transposed"])
@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in INFOS if "cpu" in i.supports_fused_on])
def test_fused_on_params_that_are_not_contiguous(info, layout):
    """rsoptim's fused=True steps a param that is not contiguous (a strided view; a transposed
    one) as torch's for-loop does, with contiguous grads. (torch 2.13's own fused CPU kernels do
    not: they pair the param's elements with the wrong grad elements, so here torch's fused=True
    is no reference.)"""
    results = []
    for cls, fused in ((info.optim_cls, False), (RSOPTIM[info.optim_cls], True)):
        gen = torch.Generator().manual_seed(0)
        base = torch.randn(4, 3, 2, generator=gen)
        p = (base[..., 0] if layout == "gaps" else base[..., 0].t()).detach().requires_grad_()
        assert not p.is_contiguous()
        extra = {"momentum": 0.9} if info.optim_cls is torch.optim.SGD else {}
        optimizer = cls([p], lr=0.1, fused=fused, **extra)
        for _ in range(3):
            p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
        results.append((p.detach(), optimizer.state[p]))
    (want, want_state), (got, got_state) = results
    torch.testing.assert_close(got, want)
    for key in want_state:
        torch.testing.assert_close(got_state[key], want_state[key], check_dtype=key != "step")


@pytest.mark.parametrize("cls", [rsoptim.Adam, rsoptim.AdamW])
def test_fused_tensor_betas_on_a_param_that_is_not_contiguous(cls):
    """The same with Tensor betas (an optim_db CUDA configuration without capturable): rsoptim
    leaves such groups to torch, which must not step the strided param with its fused CPU
    kernel (wrong there): it gets the for-loop's numbers."""
    results = []
    for optim_cls, fused in ((getattr(torch.optim, cls.__name__), False), (cls, True)):
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(4, 3, 2, generator=gen)[..., 0].detach().requires_grad_()
        optimizer = optim_cls([p], lr=0.1, betas=(torch.tensor(0.9), torch.tensor(0.99)), fused=fused)
        p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
        results.append(p.detach())
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in INFOS if "cpu" in i.supports_fused_on])
def test_fused_error_on_params_on_meta(info):
    """TestOptimRenewed.test_fused_error_on_params_on_meta: fused=True refuses meta params at
    the step; the same optimizer steps once they are materialised on the CPU."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1))
    optimizer = RSOPTIM[info.optim_cls](model.parameters(), fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point Tensors"):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    optimizer.step()


# -------------------------------------------------------------------------------------------
# TestOptimRenewed's cheap CPU checks, on rsoptim
# -------------------------------------------------------------------------------------------


def _all_inputs(info: Any, skip: tuple[str, ...] = ()) -> list[Any]:
    """Fresh OptimizerInputs (torch's helper: configurations with each cliquey flag), float32."""
    inputs = _with_cliquey_flags(info, torch.float32)
    return [oi for oi in inputs if not any(oi.kwargs.get(f) for f in skip)]


def _each_config(inputs: list[Any], check: Callable[[Any], None]) -> None:
    """Runs ``check`` on every configuration and reports every one that fails."""
    failures = []
    for oi in inputs:
        try:
            check(oi)
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            failures.append(f"[{oi.desc}] {oi.kwargs}: {type(exc).__name__}: {exc}")
    assert not failures, f"{len(failures)} of {len(inputs)} configurations fail:\n" + "\n".join(failures)


INFO_PARAMS = [pytest.param(i, id=i.name) for i in INFOS]


def _fwd_bwd(optimizer: torch.optim.Optimizer, w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad()
    loss = (w.mv(x) + b).pow(2).sum()
    loss.backward()
    return loss


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("info", INFO_PARAMS)
def test_goes_right_direction_and_matches_torch_with_lr_schedulers(info, contiguous):
    """test_forloop_goes_right_direction (with and without each of the OptimizerInfo's LR
    scheduler sets) and test_param_group_with_lrscheduler_goes_right_direction: the loss moves
    the right way, and every step agrees with torch.optim run alongside (schedulers rewrite lr,
    Tensor lrs in place)."""
    cls = RSOPTIM[info.optim_cls]

    def check(oi: Any, schedulers: list[Callable] | None) -> None:
        sides = []
        for optim_cls in (info.optim_cls, cls):
            gen = torch.Generator().manual_seed(0)
            if contiguous:
                w, b = torch.randn(10, 5, generator=gen), torch.randn(10, generator=gen)
            else:
                w, b = torch.randn(10, 5, 2, generator=gen)[..., 0], torch.randn(10, 2, generator=gen)[..., 0]
            w, b = torch.nn.Parameter(w), torch.nn.Parameter(b)
            x = torch.randn(5, generator=gen)
            groups = [{"params": [w]}, {"params": [b], "lr": 0.01}] if schedulers else [w, b]
            optimizer = optim_cls(groups, **copy.deepcopy(oi.kwargs))
            sides.append((optimizer, [s(optimizer) for s in schedulers or []], w, b, x))
        ours, _, w_ours, b_ours, x_ours = sides[1]
        initial = _fwd_bwd(ours, w_ours, b_ours, x_ours).item()
        for i in range(20):
            for optimizer, scheds, w, b, x in sides:
                loss = optimizer.step(functools.partial(_fwd_bwd, optimizer, w, b, x))
                for s in scheds:
                    s.step(loss.detach()) if isinstance(s, ReduceLROnPlateau) else s.step()
            assert_optimizers_match(ours, sides[0][0], grads_exact=False, where=f"step {i + 1}")
        final = _fwd_bwd(ours, w_ours, b_ours, x_ours).item()
        if oi.kwargs.get("maximize", False):
            assert final > initial
        else:
            assert final < initial

    for schedulers in [None, *info.scheduler_inputs]:
        _each_config(info.optim_inputs_func(device="cpu"), functools.partial(check, schedulers=schedulers))


@pytest.mark.parametrize("info", INFO_PARAMS)
def test_tensor_lr(info):
    """test_tensor_lr: a Tensor lr steps exactly as the same float lr does."""
    cls = RSOPTIM[info.optim_cls]

    def check(oi: Any) -> None:
        gen = torch.Generator().manual_seed(0)
        w, b, x = torch.randn(10, 5, generator=gen), torch.randn(10, generator=gen), torch.randn(5, generator=gen)
        w, b = torch.nn.Parameter(w), torch.nn.Parameter(b)
        w_c, b_c = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
        kwargs = {**oi.kwargs, "lr": 1e-3}
        float_lr = cls([w, b], **kwargs)
        try:
            tensor_lr = cls([w_c, b_c], **{**kwargs, "lr": torch.tensor(1e-3)})
        except ValueError as exc:
            assert re.search("lr as a Tensor is not supported", str(exc))
            return
        for _ in range(5):
            _fwd_bwd(float_lr, w, b, x)
            _fwd_bwd(tensor_lr, w_c, b_c, x)
            float_lr.step()
            tensor_lr.step()
            torch.testing.assert_close(w_c, w)
            torch.testing.assert_close(b_c, b)

    _each_config(_all_inputs(info, skip=("differentiable",)), check)


@pytest.mark.parametrize("info", INFO_PARAMS)
def test_param_groups_weight_decay_and_lr(info):
    """test_param_groups_weight_decay and test_param_groups_lr: per-group weight decay and lr
    (a group at lr 1e-28 stays where it is) while the loss moves the right way."""
    cls = RSOPTIM[info.optim_cls]

    def check(oi: Any) -> None:
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(10, 5, generator=gen))
        b = torch.nn.Parameter(torch.randn(10, generator=gen))
        x = torch.randn(5, generator=gen)
        irrelevant = torch.nn.Parameter(torch.randn(2, generator=gen))
        irrelevant_before = irrelevant.detach().clone()
        kwargs = copy.deepcopy(oi.kwargs)
        if kwargs.get("lr", 1) == 0 or "lr" not in kwargs:
            kwargs["lr"] = 1e-3
        wd_opt = cls([{"params": [w], **kwargs}, {"params": [b], **{**kwargs, "weight_decay": 0.0}}])
        lr_opt = cls([{"params": [w, b], **kwargs}, {"params": [irrelevant]}], lr=1e-28)
        for optimizer in (wd_opt, lr_opt):
            initial = _fwd_bwd(optimizer, w, b, x).item()
            for _ in range(20):
                loss = _fwd_bwd(optimizer, w, b, x)
                irrelevant.grad = torch.rand_like(irrelevant)
                optimizer.step()
            assert (loss.item() > initial) if kwargs.get("maximize") else (loss.item() < initial)
        torch.testing.assert_close(irrelevant.detach(), irrelevant_before, rtol=0, atol=0)

    _each_config(_all_inputs(info, skip=("differentiable",)), check)


@pytest.mark.parametrize("info", INFO_PARAMS)
def test_step_is_noop_when_params_have_no_grad(info):
    cls = RSOPTIM[info.optim_cls]
    params = [torch.randn(2, 3) for _ in range(2)]
    before = [p.clone() for p in params]

    def check(oi: Any) -> None:
        optimizer = cls(params, **oi.kwargs)
        assert torch.equal(optimizer.step(lambda: torch.tensor([1.0])), torch.tensor([1.0]))
        for p, p0 in zip(params, before):
            assert torch.equal(p, p0)
        assert len(optimizer.state) == 0

    _each_config(_all_inputs(info), check)


@pytest.mark.parametrize("info", INFO_PARAMS)
def test_step_is_noop_for_zero_grads(info):
    """test_step_is_noop_for_zero_grads (configs without weight decay; AdamW at lr 1e-5, whose
    default decoupled decay still moves params a little)."""
    cls = RSOPTIM[info.optim_cls]
    param = torch.randn(5, 1, requires_grad=True)
    before = param.detach().clone()

    def check(oi: Any) -> None:
        kwargs = copy.deepcopy(oi.kwargs)
        if kwargs.get("weight_decay", 0) != 0:
            return
        if info.optim_cls is torch.optim.AdamW:
            kwargs["lr"] = torch.tensor(1e-5) if isinstance(kwargs.get("lr"), torch.Tensor) else 1e-5
        params = [param.clone()] if kwargs.get("differentiable") else [param]
        optimizer = cls(params, **kwargs)
        params[0].grad = torch.zeros_like(params[0])
        optimizer.step(lambda: torch.tensor([1.0]))
        torch.testing.assert_close(params[0].detach(), before)

    _each_config(_all_inputs(info), check)


def _prime(cls: type, kwargs: dict[str, Any], params: Any, w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, steps: int):
    optimizer = cls(params, **copy.deepcopy(kwargs))
    for _ in range(steps):
        _fwd_bwd(optimizer, w, b, x)
        optimizer.step()
    return optimizer


def _without_names(state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


def assert_state_dicts_equal(actual: Any, expected: Any, where: str = "state_dict") -> None:
    """Nested dicts/lists of state dicts: tensors within torch's default tolerances (dtype,
    device and shape equal), everything else equal."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {actual!r} is not a tensor"
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{where}: {m}")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{where}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}"
        for k in expected:
            assert_state_dicts_equal(actual[k], expected[k], f"{where}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_state_dicts_equal(a, e, f"{where}[{i}]")
    else:
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("named", [(False, False), (True, False), (False, True), (True, True)], ids=str)
@pytest.mark.parametrize("info", INFO_PARAMS)
def test_state_dict_deterministic_and_interchangeable_with_torch(info, named):
    """test_state_dict_deterministic (params named or not on either side): a state dict loaded
    into a new optimizer over cloned params continues identically and gives an equal state dict;
    a repeated param group has the same representation. Also across libraries: rsoptim's state
    dict loaded into torch.optim (and torch's into rsoptim) continues as the original does."""
    cls = RSOPTIM[info.optim_cls]

    def check(oi: Any) -> None:
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(2, 3, generator=gen))
        b = torch.nn.Parameter(torch.randn(2, generator=gen))
        x = torch.randn(3, generator=gen)
        names = lambda ps, is_named: [(f"name{i}", p) for i, p in enumerate(ps)] if is_named else ps  # noqa: E731
        optimizer = _prime(cls, oi.kwargs, names([w, b], named[0]), w, b, x, 10)
        copies = []
        for target_cls in (cls, info.optim_cls):
            with torch.no_grad():
                w_c, b_c = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
            target = target_cls(names([w_c, b_c], named[1]), **copy.deepcopy(oi.kwargs))
            target.load_state_dict(copy.deepcopy(optimizer.state_dict()))
            copies.append((target, w_c, b_c))
        for _ in range(10):
            _fwd_bwd(optimizer, w, b, x)
            optimizer.step()
            for target, w_c, b_c in copies:
                _fwd_bwd(target, w_c, b_c, x)
                target.step()
                torch.testing.assert_close(w_c, w)
                torch.testing.assert_close(b_c, b)
        same, torch_side = copies[0][0], copies[1][0]
        assert_state_dicts_equal(_without_names(same.state_dict()), _without_names(optimizer.state_dict()))
        assert_state_dicts_equal(_without_names(torch_side.state_dict()), _without_names(optimizer.state_dict()))
        same.param_groups.extend(same.param_groups)
        assert _without_names(same.state_dict())["param_groups"][-1] == _without_names(optimizer.state_dict())["param_groups"][-1]

        # torch.optim's state dict into rsoptim.
        with torch.no_grad():
            w_t, b_t = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
            w_r, b_r = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
        ref = _prime(info.optim_cls, oi.kwargs, [w_t, b_t], w_t, b_t, x, 3)
        ours = cls([w_r, b_r], **copy.deepcopy(oi.kwargs))
        with torch.no_grad():
            w_r.copy_(w_t)
            b_r.copy_(b_t)
        ours.load_state_dict(copy.deepcopy(ref.state_dict()))
        for i in range(3):
            _fwd_bwd(ref, w_t, b_t, x)
            _fwd_bwd(ours, w_r, b_r, x)
            ref.step()
            ours.step()
            assert_optimizers_match(ours, ref, grads_exact=False, where=f"step {i + 1} after loading torch's state dict")

    _each_config(_all_inputs(info, skip=("differentiable",)), check)


@pytest.mark.parametrize("info", INFO_PARAMS)
def test_can_load_older_state_dict(info):
    """test_can_load_older_state_dict: a state dict whose param groups predate the flags added
    later (the OptimizerInfo's not_og_supported_flags) loads and steps, as in torch. torch's
    model (a conv and a batch norm) gives the grads; rsoptim steps copies of its params with
    the same grads, side by side with torch.optim. (Summed batch-norm outputs have grads of
    rounding-noise size, which Adam and RMSprop scale up: each side's own backward would make
    two runs a rounding apart diverge.)"""
    cls = RSOPTIM[info.optim_cls]

    def check(oi: Any) -> None:
        gen = torch.Generator().manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        x = torch.rand(1, 4, 16, 16, generator=gen)
        ref = info.optim_cls(model.parameters(), **copy.deepcopy(oi.kwargs))
        copies = [p.detach().clone().requires_grad_() for p in model.parameters()]
        ours = cls(copies, **copy.deepcopy(oi.kwargs))

        def step() -> None:
            ref.zero_grad()
            model(x).sum().backward()
            for c, p in zip(copies, model.parameters()):
                c.grad = p.grad.clone()
            ref.step()
            ours.step()

        for _ in range(3):
            step()
        for optimizer in (ref, ours):
            old = copy.deepcopy(optimizer.state_dict())
            for group in old["param_groups"]:
                for flag in info.not_og_supported_flags:
                    group.pop(flag, None)
            optimizer.load_state_dict(old)
        step()
        assert_optimizers_match(ours, ref, where="after loading the older state dict")
        assert ours.state_dict()["param_groups"] == ref.state_dict()["param_groups"]

    _each_config(_all_inputs(info, skip=("differentiable",)), check)


@pytest.mark.parametrize("info", INFO_PARAMS)
def test_load_nontensor_step_and_named_state_dicts(info):
    """test_load_nontensor_step (a state dict with Python-number steps loads and steps, as in
    torch), test_can_load_from_to_named_state_dict and test_save_load_equality_with_weights_only."""
    cls = RSOPTIM[info.optim_cls]

    def check(oi: Any) -> None:
        sides = []
        for optim_cls in (info.optim_cls, cls):
            gen = torch.Generator().manual_seed(2)
            params = [torch.nn.Parameter(torch.randn(2, 3, generator=gen)) for _ in range(2)]
            for p in params:
                p.grad = torch.rand(p.shape, generator=gen)
            optimizer = optim_cls([("a", params[0]), ("b", params[1])], **copy.deepcopy(oi.kwargs))
            for _ in range(3):
                optimizer.step()
            state_dict = copy.deepcopy(optimizer.state_dict())
            for p_state in state_dict["state"].values():
                if torch.is_tensor(p_state.get("step")):
                    p_state["step"] = p_state["step"].item()
            optimizer.load_state_dict(state_dict)
            optimizer.step()
            sides.append(optimizer)
        assert_optimizers_match(sides[1], sides[0], where="after loading Python-number steps")

        ours = sides[1]
        assert ours.state_dict()["param_groups"][0]["param_names"] == ["a", "b"]
        plain = cls(ours.param_groups[0]["params"], **copy.deepcopy(oi.kwargs))
        plain.load_state_dict(ours.state_dict())  # named into unnamed
        assert plain.state_dict()["param_groups"][0]["param_names"] == ["a", "b"]
        buffer = io.BytesIO()
        torch.save(ours.state_dict(), buffer)
        for weights_only in (False, True):
            buffer.seek(0)
            assert_state_dicts_equal(torch.load(buffer, weights_only=weights_only), ours.state_dict())

    _each_config(_all_inputs(info, skip=("differentiable",)), check)


@pytest.mark.parametrize("info", INFO_PARAMS)
def test_hooks(info):
    """test_step_pre_hook, test_step_post_hook, test_step_all_hooks, test_state_dict_*_hook and
    test_load_state_dict_*_hook: rsoptim's step and load_state_dict fire torch's hooks."""
    cls = RSOPTIM[info.optim_cls]

    def check(oi: Any) -> None:
        params = [torch.tensor([1.0, 1.0])]
        optimizer = cls(params, **copy.deepcopy(oi.kwargs))
        other = torch.optim.SGD(params)
        log: list[int] = []
        handles = [
            register_optimizer_step_pre_hook(lambda *_: log.append(0)),
            register_optimizer_step_post_hook(lambda *_: log.append(5)),
        ]
        try:
            for opt in (optimizer, other):
                handles.append(opt.register_step_pre_hook(lambda *_: log.append(1)))
                handles.append(opt.register_step_post_hook(lambda *_: log.append(2)))
            optimizer.step()
            other.step()
            optimizer.step()
            assert log == [0, 1, 2, 5] * 3
        finally:
            for handle in handles:
                handle.remove()
        optimizer.step()
        other.step()
        assert log == [0, 1, 2, 5] * 3

        # state_dict hooks
        optimizer.register_state_dict_pre_hook(lambda opt: opt.state.__setitem__("test", 1))

        def post(opt: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
            state_dict["ran_pre_hook"] = state_dict["state"].pop("test", None) == 1
            return state_dict

        optimizer.register_state_dict_post_hook(post)
        state_dict = optimizer.state_dict()
        assert state_dict["ran_pre_hook"] and "test" not in state_dict["state"]
        del optimizer.state["test"]

        # load_state_dict hooks: prepended one runs first, the returned dict is the one loaded
        fresh = cls([torch.tensor([1.0, 1.0])], **copy.deepcopy(oi.kwargs))
        state_dict = fresh.state_dict()

        def set_lr(value: float, returns: bool) -> Callable:
            def hook(opt: Any, sd: dict[str, Any]) -> Any:
                if returns:
                    sd = copy.deepcopy(sd)
                sd["param_groups"][0]["lr"] = value
                return sd if returns else None

            return hook

        fresh.register_load_state_dict_pre_hook(set_lr(0.002, returns=False))
        fresh.load_state_dict(state_dict)
        assert fresh.param_groups[0]["lr"] == 0.002
        fresh.register_load_state_dict_pre_hook(set_lr(0.003, returns=True), prepend=True)
        fresh.load_state_dict(state_dict)
        assert fresh.param_groups[0]["lr"] == 0.002
        ran = []
        fresh.register_load_state_dict_post_hook(lambda opt: ran.append(opt.param_groups[0]["lr"]))
        fresh.load_state_dict(state_dict)
        assert ran == [0.002]

    _each_config(_all_inputs(info), check)


@pytest.mark.parametrize("info", INFO_PARAMS)
def test_printed_deepcopied_and_non_empty_state(info):
    """test_optimizer_can_be_printed, test_deepcopy_copies_all_public_attrs, test_non_empty_state."""
    cls = RSOPTIM[info.optim_cls]

    def check(oi: Any) -> None:
        params = [torch.nn.Parameter(torch.randn(2, 3)) for _ in range(2)]
        optimizer = cls(params, **copy.deepcopy(oi.kwargs))
        assert repr(optimizer) == repr(info.optim_cls(params, **copy.deepcopy(oi.kwargs))).replace(
            info.name, cls.__name__, 1
        )
        for p in params:
            p.grad = torch.rand_like(p)
        for _ in range(3):
            optimizer.step()
        public = lambda obj: {k for k in obj.__dict__ if not k.startswith("_")}  # noqa: E731
        assert public(copy.deepcopy(optimizer)) == public(optimizer)
        model = torch.nn.Linear(5, 5)
        opt = cls(model.parameters(), **copy.deepcopy(oi.kwargs))
        model(torch.rand(2, 5)).sum().backward()
        opt.step()
        assert all(len(state) > 0 for state in opt.state.values())

    _each_config(_all_inputs(info, skip=("differentiable",)), check)


class _TestCaseShim:
    """What torch's TensorTracker needs of a unittest.TestCase."""

    def assertGreater(self, a: Any, b: Any, msg: str | None = None) -> None:
        assert a > b, msg

    def assertTrue(self, x: Any, msg: str | None = None) -> None:
        assert x, msg

    def assertEqual(self, actual: Any, expected: Any, **kwargs: Any) -> None:
        torch.testing.assert_close(actual, expected, **kwargs)


def _rosenbrock(t: torch.Tensor) -> torch.Tensor:
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@pytest.mark.parametrize("info", INFO_PARAMS)
def test_complex_matches_view_as_real_and_2d(info):
    """test_complex (complex params step as their view_as_real would, a real param among them)
    and test_complex_2d (a complex param steps as its real and imaginary parts as two real
    params, with torch's TensorTracker), with foreach as well as without."""
    cls = RSOPTIM[info.optim_cls]
    inputs = _all_inputs(info, skip=("differentiable", "fused"))
    inputs += [co.OptimizerInput(None, {**oi.kwargs, "foreach": True}, f"{oi.desc} & foreach") for oi in info.optim_inputs_func(device="cpu")]

    def check(oi: Any) -> None:
        gen = torch.Generator().manual_seed(0)
        complex_params = [
            torch.randn(10, 5, dtype=torch.complex64, generator=gen, requires_grad=True),
            torch.randn(10, dtype=torch.complex64, generator=gen, requires_grad=True),
            torch.randn(10, 5, generator=gen, requires_grad=True),
        ]
        real_params = [
            (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_() for p in complex_params
        ]
        complex_opt = cls(complex_params, **copy.deepcopy(oi.kwargs))
        real_opt = cls(real_params, **copy.deepcopy(oi.kwargs))
        for _ in range(3):
            for p, r in zip(complex_params, real_params):
                r.grad = torch.randn(r.shape, generator=gen)
                p.grad = torch.view_as_complex(r.grad.clone()) if p.is_complex() else r.grad.clone()
            real_opt.step()
            complex_opt.step()
            for p, r in zip(complex_params, real_params):
                torch.testing.assert_close(torch.view_as_real(p) if p.is_complex() else p, r)

        a1 = torch.randn(2, dtype=torch.complex64, generator=gen, requires_grad=True)
        a1_real, a1_imag = a1.real.detach().clone().requires_grad_(), a1.imag.detach().clone().requires_grad_()
        optim1 = cls([a1], **copy.deepcopy(oi.kwargs))
        optim2 = cls([a1_real, a1_imag], **copy.deepcopy(oi.kwargs))
        trackers = [co.TensorTracker() for _ in range(5)]
        tc = _TestCaseShim()
        for _ in range(3):
            optim1.zero_grad()
            loss = _rosenbrock(a1).abs()
            loss.backward()
            for tracker, t in zip(trackers, (a1.real, a1.imag, a1.grad.real, a1.grad.imag, loss)):
                tracker.add(t)
            optim2.zero_grad()
            trackers[0].pop_check_set(a1_real, tc)
            trackers[1].pop_check_set(a1_imag, tc)
            loss2 = _rosenbrock(torch.complex(a1_real, a1_imag)).abs()
            trackers[4].pop_check_set(loss2, tc)
            loss2.backward()
            trackers[2].pop_check_set(a1_real.grad, tc)
            trackers[3].pop_check_set(a1_imag.grad, tc)
            optim1.step()
            optim2.step()
            torch.testing.assert_close(a1.real, a1_real)
            torch.testing.assert_close(a1.imag, a1_imag)
        assert all(t.all_popped() for t in trackers)

    _each_config(inputs, check)


def test_sgd_rosenbrock_sparse_like_torch():
    """test_rosenbrock_sparse for SGD (the optim_db entry that supports sparse grads), shortened:
    uncoalesced sparse grads step as the dense ones do, and as torch.optim.SGD steps them."""
    info = next(i for i in INFOS if i.optim_cls is torch.optim.SGD)
    kwarg_updates, scheduler_makers = info.metadata_for_sparse
    seen, inputs = set(), []
    for oi in _all_inputs(info, skip=("differentiable", "fused")):
        kwargs = {k: v for k, v in oi.kwargs.items() if k not in kwarg_updates}
        if kwargs and _key(kwargs) not in seen:
            seen.add(_key(kwargs))
            inputs.append(co.OptimizerInput(None, {**kwargs, "lr": kwarg_updates.get("lr", 1e-3)}, oi.desc))
    assert inputs

    def grad_of(param: torch.Tensor, sparse: bool, w: int) -> torch.Tensor:
        x, y = param.detach()
        full = torch.stack((-400 * x * (y - x**2) - 2 * (1 - x), 200 * (y - x**2)))
        if not sparse:
            return torch.tensor([full[0], 0.0]) if w else torch.tensor([0.0, full[1]])
        index, v = (0, full[0]) if w else (1, full[1])
        return torch.sparse_coo_tensor(torch.tensor([[index, index]]), torch.stack((v / 4, v - v / 4)), (2,), check_invariants=True)

    def check(oi: Any) -> None:
        runs = {}
        for label, optim_cls, sparse in (("ours sparse", rsoptim.SGD, True), ("ours dense", rsoptim.SGD, False), ("torch sparse", torch.optim.SGD, True)):
            param = torch.nn.Parameter(torch.tensor([1.5, 1.5]))
            optimizer = optim_cls([param], **copy.deepcopy(oi.kwargs))
            schedulers = [s(optimizer) for s in scheduler_makers]
            trajectory = []
            for i in range(300):
                param.grad = grad_of(param, sparse, i % 2)
                optimizer.step()
                for s in schedulers:
                    s.step()
                trajectory.append(param.detach().clone())
            runs[label] = torch.stack(trajectory)
        torch.testing.assert_close(runs["ours sparse"], runs["torch sparse"])
        torch.testing.assert_close(runs["ours sparse"], runs["ours dense"], atol=5e-6, rtol=5e-6)  # torch's own tolerance here
        if not oi.kwargs.get("maximize"):
            solution = torch.tensor([1.0, 1.0])
            assert runs["ours sparse"][-1].dist(solution) <= torch.tensor([1.5, 1.5]).dist(solution)

    _each_config(inputs, check)
