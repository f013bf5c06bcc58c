"""What rsoptim's optimizers share: the step loop around the Rust kernels.

Each optimizer subclasses its torch.optim counterpart, so construction, validation messages,
defaults, ``state_dict``/``load_state_dict``, hooks, ``repr``, pickling and scheduler support are
torch's own. Only ``step`` is replaced: CPU float32/float64 (and complex) params of a group go to
one Rust call per dtype; everything else (CUDA and other devices, float16/bfloat16, sparse grads
where torch supports them) goes to torch's own functional implementation, which picks its
foreach or fused kernels as it would for ``torch.optim``.

A group whose params, grads and state are all plain contiguous CPU buffers keeps a
:class:`_Plan` of their addresses, so that later steps only re-read the grads and re-check, per
param, what could have changed (see ``_Plan.kernel_calls``): the per-step Python work is a few
attribute reads per param.
"""

from __future__ import annotations

import operator
from array import array
from dataclasses import dataclass, field, replace
from itertools import chain, compress, repeat
from typing import Any, Callable, ClassVar

import torch
from torch.autograd.graph import increment_version

from ._columns import pack
from . import _rsoptim
from ._layout import KERNEL_DTYPES, BufferTable, is_step_count, runs_on_kernel, same_kind, step_dtype_name
from ._threads import follow_torch


def scalar(x: Any) -> float:
    """A hyperparameter as a Python float (schedulers may store Tensor lrs and betas)."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def reject_differentiable(differentiable: bool) -> None:
    if differentiable:
        raise ValueError(
            "rsoptim optimizers do not support differentiable=True (the Rust kernels update "
            "tensors in place outside autograd); use torch.optim for differentiable optimization"
        )


@dataclass
class KernelCall:
    """The buffers of one kernel call: one dtype (and step dtype) of one group. Element counts
    and addresses are packed columns (see ``_layout.pack``)."""

    dtype: str
    step_dtype: str
    params: list[torch.Tensor]
    numels: bytes
    columns: dict[str, bytes]
    steps: bytes = b""
    new_buffers: list[bool] = field(default_factory=list)
    # What keeps alive, while the kernel runs, memory whose address the call uses and that
    # nothing else may hold (another thread may drop a grad or load a new state dict meanwhile).
    held: list[Any] = field(default_factory=list)


class KernelOptimizer:
    """Mixin placed before a ``torch.optim`` class: replaces its ``step``.

    Subclasses set ``_sparse_message`` and ``_has_step`` and implement ``_state_keys``,
    ``_init_state``, ``_kernel_call`` and ``_torch_step``.
    """

    #: The RuntimeError raised for a sparse grad (None: sparse grads go to torch).
    _sparse_message: ClassVar[str | None] = None
    #: Whether each param keeps a ``state['step']`` count.
    _has_step: ClassVar[bool] = True

    param_groups: list[dict[str, Any]]
    state: Any

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """False: GradScaler unscales the grads itself before ``step`` (the kernels take no
        ``grad_scale``/``found_inf``)."""
        return False

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value: bool) -> None:
        pass  # torch's constructors set it for fused=True; here it stays False

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state buffers the kernel reads and writes, besides param and grad."""
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Creates a param's state on its first step, exactly as torch does."""
        raise NotImplementedError

    def _kernel_call(self, group: dict[str, Any], call: KernelCall) -> None:
        """Runs the Rust kernel on the buffers of ``call`` with the group's hyperparameters."""
        raise NotImplementedError

    def _torch_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Steps ``params`` with torch's own functional implementation."""
        raise NotImplementedError

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the
                loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        follow_torch()
        plans: dict[int, _Plan] = self.__dict__.setdefault("_rsoptim_plans", {})
        # Every group is checked before any is stepped, so an error leaves all params as they
        # were.
        work = []
        for index, group in enumerate(self.param_groups):
            plan = plans.get(index)
            calls = plan.kernel_calls(self, group) if plan is not None else None
            work.append((index, group, calls, None if calls is not None else self._params_with_grad(group)))
        for index in [i for i in plans if i >= len(self.param_groups)]:
            del plans[index]  # the group is gone: let its tensors go
        for index, group, calls, params in work:
            if calls is not None:
                for call in calls:
                    self._kernel_call(group, call)
                    # As torch's in-place ops do, so autograd sees the params have changed.
                    increment_version(call.params)
            elif params:
                with torch.no_grad():
                    plans[index] = self._step_group(group, params)  # type: ignore[assignment]
                if plans[index] is None:
                    del plans[index]
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The plans hold aliases of the old state's tensors: let them go with it.
        self.__dict__.pop("_rsoptim_plans", None)
        super().load_state_dict(state_dict)  # type: ignore[misc]

    def _params_with_grad(self, group: dict[str, Any]) -> list[torch.Tensor]:
        params = [p for p in group["params"] if p.grad is not None]
        if self._sparse_message is not None and any(p.grad.is_sparse for p in params):
            raise RuntimeError(self._sparse_message)
        return params

    def _needs_state(self, group: dict[str, Any]) -> bool:
        return True

    def _state_is_new(self, state: dict[str, Any]) -> bool:
        return len(state) == 0

    def _group_runs_on_kernel(self, group: dict[str, Any]) -> bool:
        """Whether the group's hyperparameters let the kernels reproduce torch's arithmetic."""
        return True

    def _param_runs_on_kernel(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether the kernels can step ``p`` with its grad exactly as torch would (before its
        state is looked at). Anything else (another device or dtype, a grad of another dtype or
        shape, a sparse grad) is stepped by torch, which promotes, broadcasts or raises."""
        if p.is_complex() and group["weight_decay"] != 0:
            # torch applies weight decay to complex params in complex arithmetic, where a
            # non-finite component spreads NaN to the other one; the kernels step real views.
            return False
        grad = p.grad
        return grad is not None and runs_on_kernel(p) and same_kind(grad, p)

    def _kernel_buffers(self, p: torch.Tensor, group: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any] | None:
        """The grad, state tensors and step count the kernels would step ``p`` with, each read
        once (so that what was checked is what is stepped and held, whatever other threads
        assign meanwhile), or None if torch must step ``p``: the state tensors must be of the
        param's dtype, device and shape (a state dict may have loaded anything)."""
        if not self._param_runs_on_kernel(p, group):
            return None
        buffers: dict[str, Any] = {"grad": p.grad}
        if keys or self._has_step:
            state = self.state[p]
            for key in keys:
                buffers[key] = state.get(key)
                if not (isinstance(buffers[key], torch.Tensor) and same_kind(buffers[key], p)):
                    return None
            if self._has_step:
                buffers["step"] = state.get("step")
                if not is_step_count(buffers["step"]):
                    return None
        if not same_kind(buffers["grad"], p):
            return None  # replaced by another thread since it was checked
        return buffers

    def _forget_new_state(self, params: list[torch.Tensor]) -> None:
        """Undoes state this step created for ``params`` that torch would create otherwise."""

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> _Plan | None:
        """Steps one group in full generality; returns a plan for the next steps if it can."""
        keys = self._state_keys(group)
        needs_state = self._needs_state(group)
        kernel_ok = self._group_runs_on_kernel(group)
        buckets: dict[tuple[str, str], list[tuple[torch.Tensor, dict[str, Any]]]] = {}
        others: list[torch.Tensor] = []
        for p in params:
            if needs_state:
                state = self.state[p]
                if self._state_is_new(state):
                    self._init_state(p, group, state)
            buffers = self._kernel_buffers(p, group, keys) if kernel_ok else None
            if buffers is not None:
                step_dtype = step_dtype_name(buffers["step"]) if self._has_step else "float32"
                buckets.setdefault((KERNEL_DTYPES[p.dtype], step_dtype), []).append((p, buffers))
            else:
                others.append(p)
        calls = []
        stepped: dict[int, dict[str, Any]] = {}
        for (dtype, step_dtype), entries in buckets.items():
            bucket = [p for p, _ in entries]
            table = BufferTable(("param", "grad", *keys), written=frozenset(("param", *keys)))
            for p, buffers in entries:
                table.add(p, {role: buffers[role] for role in ("grad", *keys)})
            steps = [buffers["step"] for _, buffers in entries] if self._has_step else []
            columns = {role: pack(addrs) for role, addrs in table.columns.items()}
            call = KernelCall(dtype, step_dtype, bucket, pack(table.numels), columns, pack(map(torch.Tensor.data_ptr, steps)))
            call.new_buffers = self._new_buffer_flags(bucket)
            call.held = [table, steps]
            try:
                self._kernel_call(group, call)
            except _rsoptim.BufferOverlapError:
                # Params that share memory (one param twice, overlapping views): torch steps them
                # one after another, and so does its implementation here. Nothing was written.
                self._forget_new_state(bucket)
                others.extend(bucket)
                continue
            finally:
                call.held = []
            table.write_back()
            increment_version(bucket)
            calls.append(call)
            stepped.update((id(p), buffers) for p, buffers in entries)
        if others:
            self._torch_step(group, others)
            return None
        return _Plan.build(self, group, calls, stepped)

    def _plan_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """Every state tensor a kernel call uses: the state buffers, and the step count."""
        keys = self._state_keys(group)
        return (*keys, "step") if self._has_step else keys

    def _new_buffer_flags(self, params: list[torch.Tensor]) -> list[bool]:
        return [False] * len(params)


_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_is_neg = torch.Tensor.is_neg
_untyped_storage = torch.Tensor.untyped_storage
_storage_ptr = torch.UntypedStorage.data_ptr
_storage_nbytes = torch.UntypedStorage.nbytes
_get_grad = operator.attrgetter("grad")
_get_dtype = operator.attrgetter("dtype")
_get_shape = operator.attrgetter("shape")
_get_version = operator.attrgetter("_version")
_get_is_cpu = operator.attrgetter("is_cpu")


@dataclass
class _Plan:
    """The addresses of one group's buffers, reused while nothing they depend on changes.

    Each step re-reads, per param: its grad (a contiguous, plain CPU buffer of the param's dtype
    and shape that lies inside its storage), the param's address, shape and contiguity, and the
    address and version of each state tensor found through ``optimizer.state``. The plan holds an
    alias of every param and state tensor it has seen, and their storages, whose address and size
    it re-checks: so none of that memory can be freed, moved or shrunk without the plan seeing it,
    and an unchanged address means an unchanged buffer. A state tensor reshaped or transposed in
    place has a new version. Anything else that changed (the group's param list, the set of
    params with grads, the optimizer's state dict, the state keys the hyperparameters call for)
    sends the step down the general path, which checks everything and builds a new plan.
    """

    group_params: list[torch.Tensor]
    params: list[torch.Tensor]  # the group's params, as they were
    has_grad: list[bool]
    state: Any
    keys: tuple[str, ...]  # state tensors the kernels use, "step" included where kept
    calls: list[KernelCall]
    shapes: list[torch.Size]  # of each param with a grad (and so of its grad)
    dtypes: list[torch.dtype]  # of each grad, likewise
    grad_nbytes: list[int]  # likewise
    addrs: list[int]  # of each param with a grad, then of its state tensors
    versions: list[int]  # of the state tensors
    storages: list[torch.UntypedStorage]  # of the params, then of the state tensors
    storage_addrs: list[int]
    storage_nbytes: list[int]
    # For each call, which of the group's grads (in order of params with grads) it takes.
    grads_of_call: list[list[int]]
    held: list[torch.Tensor]
    all_have_grads: bool = False
    # Every value of optimizer.state when the plan was made, and the dicts of its params.
    state_dicts_all: list[dict[str, Any]] = field(default_factory=list)
    state_dicts: list[dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def build(
        opt: KernelOptimizer, group: dict[str, Any], calls: list[KernelCall], stepped: dict[int, dict[str, Any]]
    ) -> _Plan | None:
        """A plan from the step just taken: ``stepped`` maps each stepped param (by id) to the
        grad, state tensors and step count its call used. The plan records and holds exactly
        those tensors, whose addresses are in the calls' columns, never a re-read of them (which
        another thread may have replaced meanwhile)."""
        where = {}
        for c, call in enumerate(calls):
            columns = {role: array("Q", column) for role, column in call.columns.items()}
            columns["step"] = array("Q", call.steps)
            for slot, p in enumerate(call.params):
                where[id(p)] = (c, slot, columns)
        keys = opt._plan_keys(group)
        with_grad = [p for p in group["params"] if id(p) in stepped]
        shapes, dtypes, grad_nbytes, addrs, grad_slots, held = [], [], [], [], [], []
        states: list[torch.Tensor] = []
        for p in with_grad:
            buffers = stepped[id(p)]
            grad = buffers["grad"]
            c, slot, columns = where[id(p)]
            # Complex and strided params take the general path every step.
            if p.is_complex() or not (p.is_contiguous() and grad.is_contiguous()):
                return None
            tensors = [buffers[k] for k in keys]
            if not all(t.is_contiguous() for t in tensors):
                return None
            if p.data_ptr() != columns["param"][slot] or any(t.data_ptr() != columns[k][slot] for k, t in zip(keys, tensors)):
                return None  # moved since the call (another thread): the next step checks afresh
            shapes.append(p.shape)
            dtypes.append(grad.dtype)
            grad_nbytes.append(grad.numel() * grad.element_size())
            addrs.append(p.data_ptr())
            states.extend(tensors)
            grad_slots.append((c, slot))
            held.append(p.detach())
        held.extend(t.detach() for t in states)
        storages = [t.untyped_storage() for t in held]
        grads_of_call: list[list[int]] = [[0] * len(call.params) for call in calls]
        for i, (c, slot) in enumerate(grad_slots):
            grads_of_call[c][slot] = i
        for call in calls:
            call.new_buffers = [False] * len(call.params)
        has_grad = [id(p) in stepped for p in group["params"]]
        return _Plan(
            all_have_grads=all(has_grad),
            group_params=group["params"],
            params=list(group["params"]),
            has_grad=has_grad,
            state=opt.state,
            state_dicts_all=list(opt.state.values()),
            state_dicts=[opt.state[p] for p in with_grad] if keys else [],
            keys=keys,
            calls=calls,
            shapes=shapes,
            dtypes=dtypes,
            grad_nbytes=grad_nbytes,
            addrs=addrs + [t.data_ptr() for t in states],
            versions=[t._version for t in states],
            storages=storages,
            storage_addrs=[s.data_ptr() for s in storages],
            storage_nbytes=[s.nbytes() for s in storages],
            grads_of_call=grads_of_call,
            held=held,
        )

    def kernel_calls(self, opt: KernelOptimizer, group: dict[str, Any]) -> list[KernelCall] | None:
        """This step's kernel calls, or None if anything the plan relies on has changed.

        Written as ``map`` over C-level callables: this runs once per step for every param.
        """
        params = group["params"]
        if (
            params is not self.group_params
            or len(params) != len(self.params)
            or not all(map(operator.is_, params, self.params))
            or opt.state is not self.state
            or not opt._group_runs_on_kernel(group)
            or opt._plan_keys(group) != self.keys
        ):
            return None
        grads = list(map(_get_grad, params))
        if self.all_have_grads:
            if not all(map(operator.is_not, grads, repeat(None))):
                return None
            with_grad = params
        else:
            if list(map(operator.is_not, grads, repeat(None))) != self.has_grad:
                return None
            with_grad = list(compress(params, self.has_grad))
            grads = list(compress(grads, self.has_grad))
        if (
            not all(map(_get_is_cpu, grads))
            or not all(map(_is_contiguous, grads))
            or list(map(_get_shape, grads)) != self.shapes
            or not all(map(operator.is_, map(_get_dtype, grads), self.dtypes))
            or any(map(_is_neg, grads))
            or not all(map(_is_contiguous, with_grad))
            or list(map(_get_shape, with_grad)) != self.shapes
        ):
            return None
        addrs = list(map(_data_ptr, with_grad))
        if self.keys:
            # optimizer.state maps each param to its dict: if none was replaced, removed or
            # added since the plan was made, the plan's dicts are the params' (no tensor hashing).
            values = opt.state.values()
            if len(values) != len(self.state_dicts_all) or not all(map(operator.is_, values, self.state_dicts_all)):
                return None
            states = iter(self.state_dicts)
            get = operator.itemgetter(*self.keys)
            # itemgetter of one key gives the item, of several a tuple of them.
            try:
                tensors = list(map(get, states) if len(self.keys) == 1 else chain.from_iterable(map(get, states)))
            except KeyError:  # a state entry was removed
                return None
            addrs.extend(map(_data_ptr, tensors))
            if list(map(_get_version, tensors)) != self.versions:
                return None
        if (
            addrs != self.addrs
            or list(map(_storage_ptr, self.storages)) != self.storage_addrs
            or list(map(_storage_nbytes, self.storages)) != self.storage_nbytes
        ):
            return None
        grad_addrs = list(map(_data_ptr, grads))
        # Each grad must lie inside its storage (one resized in place may be smaller).
        grad_storages = list(map(_untyped_storage, grads))
        ends = map(operator.add, grad_addrs, self.grad_nbytes)
        limits = map(operator.add, map(_storage_ptr, grad_storages), map(_storage_nbytes, grad_storages))
        if not all(map(operator.le, ends, limits)):
            return None
        # This step's calls: the plan's with this step's grads, new objects so that two threads
        # stepping one optimizer never see each other's columns. Each holds its grads and the
        # plan (which holds the params' and state's memory) until its kernel returns.
        held = [grads, self]
        if len(self.calls) == 1:
            return [replace(self.calls[0], columns={**self.calls[0].columns, "grad": pack(grad_addrs)}, held=held)]
        return [
            replace(call, columns={**call.columns, "grad": pack([grad_addrs[i] for i in indices])}, held=held)
            for call, indices in zip(self.calls, self.grads_of_call)
        ]
