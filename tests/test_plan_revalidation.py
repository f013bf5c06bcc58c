"""rsoptim keeps each group's buffer addresses between steps (python/rsoptim/_optimizer.py,
`_Plan`). Changes a user can make between steps must be seen as torch.optim sees them."""

from __future__ import annotations

import pytest
import torch

import rsoptim
from conftest import assert_tensor_match


def _stepped(cls, w, **kwargs):
    opt = cls([w], lr=0.1, **kwargs)
    w.grad = torch.ones_like(w)
    opt.step()
    return opt


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_a_grad_of_another_dtype_is_refused_like_torch(dtype):
    results = {}
    for module in (torch.optim, rsoptim):
        w = torch.zeros(1000, requires_grad=True)
        opt = _stepped(module.Adam, w)
        w.grad.data = torch.ones(1000, dtype=dtype)  # .data skips the dtype check of .grad =
        with pytest.raises(RuntimeError):
            opt.step()
        results[module.__name__] = w.detach().clone()
    assert torch.equal(results["torch.optim"], results["rsoptim"])


def test_a_grad_of_another_dtype_on_the_first_step_is_refused():
    w = torch.zeros(10, requires_grad=True)
    w.grad = torch.ones(10)
    w.grad.data = torch.ones(10, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        rsoptim.Adam([w]).step()
    assert torch.equal(w.detach(), torch.zeros(10))


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_a_step_bumps_the_params_version_like_torch(name):
    versions = {}
    for module in (torch.optim, rsoptim):
        w = torch.zeros(10, requires_grad=True)
        opt = getattr(module, name)([w], lr=0.1)
        bumped = []
        for _ in range(2):  # the first step takes the general path, the second the plan
            w.grad = torch.ones(10)
            before = w._version
            opt.step()
            bumped.append(w._version > before)
        versions[module.__name__] = bumped
    assert versions == {"torch.optim": [True, True], "rsoptim": [True, True]}


def test_autograd_sees_a_param_stepped_between_two_backwards():
    for module in (torch.optim, rsoptim):
        w = torch.ones(3, requires_grad=True)
        opt = module.SGD([w], lr=0.1)
        for _ in range(2):
            loss = (w * w).sum()
            loss.backward(retain_graph=True)
            opt.step()
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
            w.grad = None


def test_a_param_reshaped_in_place_of_its_storage_is_seen():
    results = []
    for module in (torch.optim, rsoptim):
        w = torch.arange(6.0).reshape(2, 3).requires_grad_()
        opt = module.SGD([w], lr=1.0)
        w.grad = torch.zeros(2, 3)
        opt.step()
        w.data = w.data.t()  # same address, other element order
        w.grad = torch.arange(6.0).reshape(3, 2)
        opt.step()
        results.append(w.detach().clone())
    assert torch.equal(results[0], results[1])


def test_sgd_creates_a_missing_momentum_buffer_like_torch():
    results = []
    for module in (torch.optim, rsoptim):
        w = torch.ones(4, requires_grad=True)
        opt = module.SGD([w], lr=0.1, momentum=0.9)
        opt.state[w]["note"] = "kept by the user"  # a state entry without a momentum buffer
        w.grad = torch.ones(4)
        opt.step()
        results.append((w.detach().clone(), opt.state[w]["momentum_buffer"].clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_removed_param_group_releases_its_tensors():
    import gc
    import weakref

    a, b = torch.zeros(10, requires_grad=True), torch.zeros(10, requires_grad=True)
    opt = rsoptim.Adam([{"params": [a]}, {"params": [b]}])
    for _ in range(2):
        a.grad, b.grad = torch.ones(10), torch.ones(10)
        opt.step()
    gone = weakref.ref(opt.state[b]["exp_avg"])
    del opt.param_groups[1]
    del opt.state[b]
    a.grad = torch.ones(10)
    opt.step()
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("fused", [None, True])
def test_grad_scaler_unscales_then_steps_like_torch(fused):
    results = []
    for module in (torch.optim, rsoptim):
        torch.manual_seed(0)
        w = torch.randn(5, requires_grad=True)
        opt = module.Adam([w], lr=0.1, fused=fused if module is rsoptim else None)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for _ in range(3):
            opt.zero_grad()
            scaler.scale((w * w).sum()).backward()
            scaler.step(opt)
            scaler.update()
        results.append(w.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
@pytest.mark.parametrize("where", ["reading its group", "checking a later group"])
def test_code_run_during_a_step_cannot_make_a_kernel_write_freed_memory(name, where):
    """A step plan reads its tensors' addresses, then the kernels write there. Code that runs
    during the step (a dict subclass's reads of a group's options, a param subclass's ``grad``
    read while a later group is checked) may move a param to other memory (``p.data = ...``),
    freeing the memory it had, at every read. No kernel may write freed memory: here a canary
    tensor is allocated right after each move, where the allocator hands back the freed block,
    so that a stale write shows in it."""
    n = 1 << 14  # 64 KiB: freed blocks of this size go back to the heap and are handed out again
    big = torch.nn.Parameter(torch.zeros(n))
    canaries: list[torch.Tensor] = []
    armed = False

    def move_big() -> None:
        if armed:
            address = big.data_ptr()
            big.data = big.detach().clone()  # (the old memory is freed: nothing else holds it)
            canary = torch.full((n,), 77.0)
            if canary.data_ptr() == address:
                canaries.append(canary)

    class Group(dict):
        def __getitem__(self, key):
            move_big()
            return super().__getitem__(key)

        def get(self, key, default=None):
            move_big()
            return super().get(key, default)

    class Param(torch.nn.Parameter):
        @property
        def grad(self):
            move_big()
            return torch.nn.Parameter.grad.__get__(self)

        @grad.setter
        def grad(self, value):
            torch.nn.Parameter.grad.__set__(self, value)

    kwargs = {"momentum": 0.9} if name == "SGD" else {}
    if where == "reading its group":
        params, groups = [big], [Group(params=[big])]
    else:
        params = [big, Param(torch.zeros(10))]
        groups = [{"params": [big]}, {"params": [params[1]]}]
    opt = getattr(rsoptim, name)(groups, lr=0.1, **kwargs)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    armed = True
    opt.step()
    armed = False
    if not canaries:
        pytest.skip("the allocator did not hand a freed block back: the attack cannot be seen here")
    written = [i for i, canary in enumerate(canaries) if not bool((canary == 77).all())]
    assert not written, f"a kernel wrote freed memory (canaries {written} of {len(canaries)})"


class _StateDict(dict):
    pass


_GATHER_EDITS = {
    "a grad set to None": lambda opt, ws: setattr(ws[1], "grad", None),
    "a state tensor replaced by a copy": lambda opt, ws: opt.state[ws[2]].update(exp_avg=opt.state[ws[2]]["exp_avg"].clone()),
    "a state dict replaced by a dict subclass": lambda opt, ws: opt.state.__setitem__(ws[0], _StateDict(opt.state[ws[0]])),
    "a grad replaced by a transposed one": lambda opt, ws: setattr(ws[2], "grad", torch.ones(4, 3).t()),
    # (Neither of these moves a tensor the plan holds: only the comparisons by identity see them.)
    "a state dict replaced by a plain dict with another exp_avg": lambda opt, ws: opt.state.__setitem__(
        ws[0], {**opt.state[ws[0]], "exp_avg": torch.ones(3, 4)}
    ),
    "a param of the group's list replaced in place by an alias": lambda opt, ws: opt.param_groups[0][
        "params"
    ].__setitem__(1, _with_grad(ws[1].detach().requires_grad_())),
}


def _with_grad(w):
    w.grad = torch.ones_like(w)
    return w


@pytest.mark.parametrize("edit", list(_GATHER_EDITS))
def test_a_plan_that_gathers_its_tensors_natively_sees_edits_between_steps(edit):
    """Where every param has a grad and the same state keys, a plan gathers the grads and state
    tensors in one native call (`gather_plan_tensors`); an edit between steps sends the step
    down the general path, and the params end as torch.optim leaves them (within torch's
    tolerances: torch's for-loop Adam contracts its float32 arithmetic differently)."""
    results = []
    for module in (torch.optim, rsoptim):
        torch.manual_seed(0)
        ws = [torch.randn(3, 4, requires_grad=True) for _ in range(3)]
        opt = module.Adam(ws, lr=0.1)
        for step in range(5):
            for i, w in enumerate(ws):
                w.grad = torch.full((3, 4), float(step + i + 1))
            if step >= 2:  # the plan is made on the first step and used from the second
                _GATHER_EDITS[edit](opt, ws)
            opt.step()
        results.append([w.detach().clone() for w in ws])
    for ours, theirs in zip(results[1], results[0]):
        assert_tensor_match(ours, theirs, msg=edit)


def test_a_state_entry_removed_after_the_plan_is_made_raises_as_in_torch():
    errors = []
    for module in (torch.optim, rsoptim):
        w = torch.zeros(5, requires_grad=True)
        opt = _stepped(module.Adam, w)
        opt.step()
        del opt.state[w]["exp_avg_sq"]
        with pytest.raises(KeyError) as error:
            opt.step()
        errors.append(error.value.args)
    assert errors[0] == errors[1]


def test_a_group_whose_params_are_a_tuple_steps_as_in_torch():
    results = []
    for module in (torch.optim, rsoptim):
        torch.manual_seed(0)
        ws = [torch.randn(8, requires_grad=True) for _ in range(2)]
        opt = module.Adam(ws, lr=0.1)
        opt.param_groups[0]["params"] = tuple(opt.param_groups[0]["params"])
        for step in range(4):
            for w in ws:
                w.grad = torch.full((8,), float(step + 1))
            opt.step()
        results.append([w.detach().clone() for w in ws])
    for ours, theirs in zip(results[1], results[0]):
        assert_tensor_match(ours, theirs)


def test_a_plan_made_over_a_state_dict_subclass_is_kept_from_step_to_step():
    """A plan whose state dicts are not plain dicts checks its tensors as gathered in Python (the
    native gather takes plain dicts only): it is kept, not rebuilt at every step."""
    results, plans = [], []
    for module in (torch.optim, rsoptim):
        torch.manual_seed(0)
        ws = [torch.randn(8, requires_grad=True) for _ in range(2)]
        opt = module.Adam(ws, lr=0.1)
        for step in range(5):
            for w in ws:
                w.grad = torch.full((8,), float(step + 1))
            if step == 1:
                opt.state[ws[0]] = _StateDict(opt.state[ws[0]])
            opt.step()
            if module is rsoptim and step >= 2:
                plans.append(opt._rsoptim_plans[0])
        results.append([w.detach().clone() for w in ws])
    assert plans[1] is plans[0] and plans[2] is plans[0]
    for ours, theirs in zip(results[1], results[0]):
        assert_tensor_match(ours, theirs)
