"""What rsoptim's optimizers share: the step loop around the Rust kernels.

Each optimizer subclasses its torch.optim counterpart, so construction, validation messages,
defaults, ``state_dict``/``load_state_dict``, hooks, ``repr``, pickling and scheduler support are
torch's own. Only ``step`` is replaced: CPU float32/float64/bfloat16/float16 (and complex) params
of a group go to one Rust call per dtype (half-precision ones with the numerics of torch's fused
CPU kernels); everything else (CUDA and other devices, sparse grads where torch supports them,
the cases ``_param_runs_on_kernel`` and ``_kernel_buffers`` refuse) goes to torch's own
functional implementation, which picks its foreach or fused kernels as it would for
``torch.optim``.

A group whose params, grads and state are all plain contiguous CPU buffers keeps a
:class:`_Plan` of their addresses, so that later steps only re-read the grads and re-check, per
param, what could have changed (see ``_Plan.kernel_calls``): the per-step Python work is a few
attribute reads per param.
"""

from __future__ import annotations

import functools
from collections import defaultdict
import operator
import threading
from array import array
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from typing import Any, Callable, ClassVar

import torch
from torch.autograd.graph import increment_version

from ._columns import pack
from . import _rsoptim
from ._distributed import agreed_seed, any_dtensor, check_grad, is_dtensor, local, param_version, same_layout, shard_index
from torch.optim.optimizer import _get_scalar_dtype, _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from ._layout import HALF_DTYPES, KERNEL_DTYPES, PLAIN_TENSOR_TYPES, ZERO_TENSOR_MESSAGE, BufferTable, as_caller, check_storage, is_step_count, native_reads, runs_on_kernel, same_kind, step_dtype_name
from ._threads import follow_torch


def scalar(x: Any) -> float:
    """A hyperparameter as a Python float (schedulers may store Tensor lrs and betas)."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def check_state_dtype(state_dtype: Any) -> None:
    """rsoptim's extension: ``state_dtype=torch.float32`` keeps the state of bfloat16/float16
    params in float32 (the state of float32/float64 params is in their own dtype already)."""
    if state_dtype is not None and state_dtype != torch.float32:
        raise ValueError(
            f"Invalid state_dtype: {state_dtype} (None keeps each param's state in the param's dtype, "
            "as torch.optim does; torch.float32 keeps the state of bfloat16/float16 params in float32)"
        )


#: rsoptim's keyword-only extensions beyond torch.optim, kept in ``defaults`` and in every
#: group (so that state dicts and ``add_param_group`` carry them) only when they are set.
EXTENSION_DEFAULTS: dict[str, Any] = {
    "state_dtype": None,
    "master_weights": False,
    "stochastic_rounding": False,
    "stochastic_rounding_seed": None,
}


def check_extensions(options: Any) -> None:
    """Validates the extension options of a group (or of a constructor's keywords)."""
    if not isinstance(options, dict):
        return  # torch's add_param_group says what is wrong with it
    check_state_dtype(options.get("state_dtype"))
    # (exact types: an isinstance check reads an object's __class__, which may be a property
    # that lies, and the object's __bool__ or __index__ would then run when a kernel call reads it)
    for key in ("master_weights", "stochastic_rounding"):
        if type(options.get(key, False)) is not bool:
            raise TypeError(f"{key} must be a bool, not {type(options[key]).__name__}")
    seed = options.get("stochastic_rounding_seed")
    if seed is not None:
        if type(seed) is not int or not 0 <= seed < 2**64:
            raise ValueError(f"Invalid stochastic_rounding_seed: {seed!r} (an int in [0, 2**64))")


def check_clipping(max_grad_norm: Any, norm_type: Any, error_if_nonfinite: Any) -> dict[str, Any]:
    """Validates the clipping options (see ``KernelOptimizer.max_grad_norm``); returns them with
    ``norm_type`` as a float."""
    if max_grad_norm is not None:
        valid = isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool)
        if not valid or not 0 < max_grad_norm < float("inf"):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (None, or a finite number > 0)")
    try:
        norm = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid norm_type: {norm_type!r} (a float, or 'inf')") from None
    if not isinstance(error_if_nonfinite, bool):
        raise TypeError(f"error_if_nonfinite must be a bool, not {type(error_if_nonfinite).__name__}")
    return {"max_grad_norm": max_grad_norm, "norm_type": norm, "error_if_nonfinite": error_if_nonfinite}


def read_options(groups: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """Each group's ``plain_hyperparameters``, and whether taking them ran no code of the
    caller's (every group a dict of plain options: else a read may have edited a group, or one
    read after the checks may). ``step`` takes these after the last code of the caller's it runs
    before the checks (a mode in the clipping norm)."""
    plain = [_options_are_plain(group) for group in groups]
    return [dict(group) if is_plain else _plain_copy(group) for group, is_plain in zip(groups, plain)], all(plain)


def plain_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A copy of a group with its options as values of built-in types (and plain tensors), read
    once: reading a subclass's value (a float subclass's ``__float__``, a Tensor subclass's
    ``item()``) may run arbitrary code, and none may run once addresses have been handed over
    (it could free them). The kernel path reads options from this copy only: caller code run
    after it was taken (a mode making state) may edit the group itself."""
    (hyper,), _ = read_options([group])
    return hyper


def _options_are_plain(group: dict[str, Any]) -> bool:
    """Whether ``group`` is a dict whose every option is of a type whose reads run no code, and
    whose every key is a string: looking an option up compares its name with the keys of
    equal hash, which runs another type's __eq__."""
    if type(group) is not dict:
        return False  # (a subclass's reads may run code)
    for key, value in group.items():
        if type(key) is not str:
            return False
        kind = type(value)
        if kind in _PLAIN_SCALAR_TYPE_SET or key == "params" or (kind is tuple and all(type(v) in _PLAIN_SCALAR_TYPE_SET for v in value)):
            continue
        if not _is_plain(value):  # (tensors, and tuples of them)
            return False
    return True


def _params_are_plain(group: dict[str, Any]) -> bool:
    """Whether reading the params of ``group`` (a dict of plain options) and their grads runs
    no code of the caller's: a list (iterating a list subclass may run code) of plain tensors."""
    params = group["params"]
    return type(params) is list and _PLAIN_TENSOR_TYPE_SET.issuperset(map(type, params))


def _overlaps_itself(t: torch.Tensor) -> bool:
    """Whether elements of ``t`` may share memory (an expanded view): a kernel's staged copy of
    it could not be written back."""
    return not t.is_contiguous() and torch._debug_has_internal_overlap(t) != 0


def _plain_copy(group: dict[str, Any]) -> dict[str, Any]:
    """A copy of the group with its options plain and only its keys that are strings, each
    read once, as torch reads it (a dict subclass's through its __getitem__)."""
    # (over a list of the items: reading an option may run code that edits the group)
    items = list(group.items()) if type(group) is dict else [(key, group[key]) for key in list(group)]
    return {key: value if key == "params" else _plain(value, key) for key, value in items if type(key) is str}


#: Option types that run no user code when read (and torch.Tensor, where its ops do not
#: dispatch to Python, see `_is_plain`).
_PLAIN_SCALAR_TYPE_SET = frozenset((bool, int, float, str, type(None), torch.dtype))
_PYTHON_DISPATCH = torch._C.DispatchKey.Python


def _is_plain(value: Any) -> bool:
    """Whether reading ``value`` runs no code of the caller's: a built-in value, a tuple of
    them, or a torch.Tensor whose ops do not dispatch to Python (a plain tensor taken from a
    wrapper subclass's, ``as_subclass(torch.Tensor)``, still runs its ``__torch_dispatch__``)."""
    kind = type(value)
    if kind is torch.Tensor:
        return not torch._C._dispatch_keys(value).has(_PYTHON_DISPATCH)
    return kind in _PLAIN_SCALAR_TYPE_SET or (kind is tuple and all(map(_is_plain, value)))


class _Unreadable:
    """An option whose value could not be read before the checks: the kernel call that reads
    it raises (no code of the caller's runs there)."""

    def __init__(self, error: BaseException):
        self.error = error

    def _refuse(self) -> Any:
        raise TypeError(f"a hyperparameter's value could not be read: {self.error}")

    __float__ = __index__ = __bool__ = __iter__ = _refuse


_PLAIN_TENSOR_TYPE_SET = frozenset(PLAIN_TENSOR_TYPES)
_PLAIN_DICT_SET = frozenset((dict,))


def plain_state_map(state: dict[Any, Any]) -> bool:
    """Whether looking up ``optimizer.state`` and its per-param dicts runs no code of the
    caller's: plain tensors as its keys, plain dicts as its values, and strings as their keys (a
    lookup compares the key it looks for with the keys of equal hash: another type's __eq__,
    or a subclass's __getitem__, would run)."""
    return (
        _PLAIN_TENSOR_TYPE_SET.issuperset(map(type, state))
        and _PLAIN_DICT_SET.issuperset(map(type, state.values()))
        and _STR_SET.issuperset(map(type, chain.from_iterable(state.values())))
    )


_STR_SET = frozenset((str,))


def step_groups(param_groups: Any) -> list[dict[str, Any]]:
    """``optimizer.param_groups`` as the list one step walks, read once before anything is
    checked: iterating a subclass of list may run code (a generator's), and none may run once
    the kernels' addresses are read (it could free the memory behind them)."""
    return param_groups if type(param_groups) is list else list(param_groups)


def _plain(value: Any, key: str | None = None) -> Any:
    """``value`` itself if it is of a plain type, else its value as one (the option ``key``'s)."""
    if type(value) in _PLAIN_SCALAR_TYPE_SET:
        return value
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        if type(value) in (tuple, list) and all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(items) if type(value) in (tuple, list) else tuple(items)
    for plain_type in (bool, int, float):  # (bool before int: bool is an int)
        if isinstance(value, plain_type):
            return plain_type(value)
    if isinstance(value, torch.Tensor):
        plain = value if type(value) is torch.Tensor else value.detach().as_subclass(torch.Tensor)
        if _is_plain(plain):
            return plain
        # Its ops run the caller's Python (a wrapper subclass's __torch_dispatch__): its value
        # is read now, into a tensor of the same dtype and shape that runs no code.
        try:
            return torch.tensor(plain.item(), dtype=plain.dtype).reshape(plain.shape)
        except Exception as error:  # (not one value, a meta tensor: the kernels have no use for it)
            return _Unreadable(error)
    # Any other object (a numpy scalar, a class with __float__): its value, read now, as the
    # kernel call would read it (float(), bool(), unpacking); read there, its code would run
    # after the addresses were packed, and could free the memory behind them.
    kind = type(value)
    if key == "betas" and hasattr(kind, "__iter__"):
        # (the one option the kernel calls unpack; nothing else is iterated: an option of the
        # caller's may be a generator, which this would consume, or an endless one)
        return tuple(_plain(v) for v in value)
    for method, convert in (("__float__", float), ("__index__", int), ("__bool__", bool), ("__len__", bool)):
        if hasattr(kind, method):
            try:
                return convert(value)
            except (TypeError, ValueError):  # (a numpy array of several values, say)
                pass
    return value


def _refresh_master(param: torch.Tensor, master: torch.Tensor) -> None:
    """Copies into ``master`` the elements of ``param`` that are not a rounding of it (the
    param was written outside the optimizer: its value wins, as torch.optim steps whatever the
    param holds); elements that still are one keep the master's precision."""
    nearest = master.to(param.dtype)
    toward = torch.where(nearest.float() > master, -torch.inf, torch.inf).to(param.dtype)
    rounding = (param == nearest) | (param == torch.nextafter(nearest, toward))
    rounding |= param.isnan() & master.isnan()
    if not bool(rounding.all()):
        torch.where(rounding, master, param.float(), out=master)


def _is_half_state(key: str, value: Any) -> bool:
    """Whether a state entry is a half-precision buffer (not the step count or master copy)."""
    return key not in ("step", "master_param") and isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES


def extension_options(
    state_dtype: torch.dtype | None, master_weights: bool, stochastic_rounding: bool, stochastic_rounding_seed: int | None
) -> dict[str, Any]:
    """A constructor's extension keywords, checked (before torch.optim's constructor runs)."""
    options = {
        "state_dtype": state_dtype,
        "master_weights": master_weights,
        "stochastic_rounding": stochastic_rounding,
        "stochastic_rounding_seed": stochastic_rounding_seed,
    }
    check_extensions(options)
    return options




#: A kernel's last check (see ``unmoved``): tensors a call holds, the packed addresses its
#: columns took from them, and their packed element counts.
Guard = tuple[list[Any], bytes, bytes]


@dataclass
class KernelCall:
    """The buffers of one kernel call: one dtype (and step dtype) of one group. Element counts
    and addresses are packed columns (see ``_layout.pack``)."""

    dtype: str
    step_dtype: str
    # The state's dtype where it is not the params' (float32 state of half-precision params).
    state_dtype: str | None
    params: list[torch.Tensor]
    numels: bytes
    columns: dict[str, bytes]
    steps: bytes = b""
    new_buffers: list[bool] = field(default_factory=list)
    # Stochastic rounding of half-precision params: the group's seed and each param's stream.
    rounding_seed: int | None = None
    streams: bytes | None = None
    # What keeps alive, while the kernel runs, memory whose address the call uses and that
    # nothing else may hold (another thread may drop a grad or load a new state dict meanwhile).
    held: list[Any] = field(default_factory=list)
    # What the grads are multiplied by: clipping folded into the step (1: none).
    grad_scale: float = 1.0
    # The local shards of DTensor params (a write bumps the version of each, and of its DTensor).
    local_params: list[torch.Tensor] = field(default_factory=list)
    # The kernel's last check.
    guard: Guard | None = None

    def extensions(self) -> dict[str, Any]:
        """The kernels' keyword arguments for master copies, stochastic rounding, clipping and
        their last check."""
        return {
            "master_params": self.columns.get("master_param"),
            "stochastic_rounding_seed": self.rounding_seed,
            "streams": self.streams,
            "grad_scale": self.grad_scale,
            **unmoved(self.guard),
        }


def unmoved(guard: Guard | None) -> dict[str, Any]:
    """The kernels' keyword arguments for their last check, made natively right before the
    kernel runs: each tensor of ``guard`` (plain tensors the call holds) still has its data at
    the address packed with it, the one the call's columns took, and the element count packed
    with it inside its storage. Between the checks and the kernel call, Python runs signal
    handlers and lets other threads take the GIL, and code there may resize a storage in place,
    which frees its memory; the kernel then raises ``_rsoptim.MemoryMovedError`` having written
    nothing (see ``NOTHING_WRITTEN``)."""
    if guard is None:
        return {}
    tensors, addresses, numels = guard
    return {"guard_tensors": tensors, "guard_addresses": addresses, "guard_numels": numels}


#: A kernel refused its call and wrote nothing: buffers that share memory, or memory that moved
#: after the checks. Where the general path or clipping meets either, torch's ops take those
#: params (they read every address afresh); a step plan's call that meets moved memory is
#: checked again on the general path first (see ``_step_groups``).
NOTHING_WRITTEN = (_rsoptim.BufferOverlapError, _rsoptim.MemoryMovedError)


def with_step_hooks(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` run as torch.optim runs every optimizer's step (``Optimizer.profile_hook_step``):
    the global and the optimizer's own step pre-hooks (which may replace the arguments), then
    the step, then the post-hooks, inside a profiler range ``Optimizer.step#<class>.step``. The
    range is entered only while torch's profiler is on: entering one costs 10-15 us, a third of
    a small model's step. Marked ``hooked`` so that torch's constructor leaves it as it is."""

    @functools.wraps(step)
    def hooked_step(*args: Any, **kwargs: Any) -> Any:
        if type(args[0]).step is not hooked_step:
            # Called from a subclass's own step (`super().step()`), which torch wrapped: its
            # wrapper has run the hooks.
            return step(*args, **kwargs)
        if _profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(args[0]).__name__}.step"):
                return _run_with_hooks(step, args, kwargs)
        return _run_with_hooks(step, args, kwargs)

    hooked_step.hooked = True  # type: ignore[attr-defined]
    return hooked_step


_profiler_enabled = torch._C._autograd._profiler_enabled


def _run_with_hooks(step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """torch's order: global pre-hooks, the optimizer's pre-hooks, the step, the optimizer's
    post-hooks, global post-hooks; ``args`` starts with the optimizer, as torch passes it."""
    opt = args[0]
    # (The hooks are looked for before they are walked: usually there are none.)
    if _global_optimizer_pre_hooks or opt._optimizer_step_pre_hooks:
        for pre_hook in chain(_global_optimizer_pre_hooks.values(), opt._optimizer_step_pre_hooks.values()):
            result = pre_hook(opt, args, kwargs)
            if result is not None:
                if isinstance(result, tuple) and len(result) == 2:
                    args, kwargs = result
                else:
                    raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
    out = step(*args, **kwargs)
    opt._optimizer_step_code()
    if opt._optimizer_step_post_hooks or _global_optimizer_post_hooks:
        for post_hook in chain(opt._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
            post_hook(opt, args, kwargs)
    return out


class KernelOptimizer:
    """Mixin placed before a ``torch.optim`` class: replaces its ``step``.

    Subclasses set ``_sparse_message`` and ``_has_step`` (whether torch's optimizer counts
    steps) and implement ``_state_keys``,
    ``_init_state``, ``_kernel_call`` and ``_torch_step``.
    """

    #: The RuntimeError raised for a sparse grad (None: sparse grads go to torch).
    _sparse_message: ClassVar[str | None] = None
    #: Whether each param keeps a ``state['step']`` count.
    _has_step: ClassVar[bool] = True

    param_groups: list[dict[str, Any]]
    state: Any

    def _init_clipping(self, max_grad_norm: Any, norm_type: Any, error_if_nonfinite: Any) -> None:
        """Records the clipping options (call after ``torch.optim``'s constructor)."""
        self.__dict__["_rsoptim_clipping"] = check_clipping(max_grad_norm, norm_type, error_if_nonfinite)

    def _clipping(self) -> dict[str, Any]:
        options = self.__dict__.get("_rsoptim_clipping")
        if options is None:  # (an optimizer unpickled from an older rsoptim)
            options = self.__dict__["_rsoptim_clipping"] = check_clipping(None, 2.0, False)
        return options

    @property
    def max_grad_norm(self) -> float | None:
        """Clipping folded into the step (rsoptim's extension, None: off, as torch.optim): each
        ``step()`` takes the total ``norm_type`` norm of the grads of all params (as
        ``clip_grad_norm_(model.parameters(), max_grad_norm, norm_type, error_if_nonfinite)``
        would, across ranks for DTensor grads) and steps with the grads multiplied by
        ``min(max_grad_norm / (total + 1e-6), 1)``, leaving the grads as they are. The total is
        kept in :attr:`last_grad_norm`."""
        return self._clipping()["max_grad_norm"]

    @max_grad_norm.setter
    def max_grad_norm(self, value: float | None) -> None:
        self._set_clipping(max_grad_norm=value)

    def _set_clipping(self, **change: Any) -> None:
        self.__dict__["_rsoptim_clipping"] = check_clipping(**{**self._clipping(), **change})

    @property
    def norm_type(self) -> float:
        """The norm ``max_grad_norm`` clips by (2.0; ``inf`` for the largest absolute value)."""
        return self._clipping()["norm_type"]

    @norm_type.setter
    def norm_type(self, value: float | str) -> None:
        self._set_clipping(norm_type=value)

    @property
    def error_if_nonfinite(self) -> bool:
        """Whether a step whose total grad norm is NaN or infinite raises (before anything is
        stepped), as ``clip_grad_norm_(..., error_if_nonfinite=True)`` does."""
        return self._clipping()["error_if_nonfinite"]

    @error_if_nonfinite.setter
    def error_if_nonfinite(self, value: bool) -> None:
        self._set_clipping(error_if_nonfinite=value)

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """The total grad norm the last step clipped by (a tensor, as ``clip_grad_norm_``
        returns it; a replicated DTensor for DTensor grads), or None."""
        return self.__dict__.get("_rsoptim_last_grad_norm")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state["_rsoptim_clipping"] = self._clipping()
        return state

    def _grad_scale(self, groups: list[dict[str, Any]]) -> float:
        """This step's clip factor (1.0 without ``max_grad_norm``), from the grads of every
        group; raises for a non-finite total with ``error_if_nonfinite``."""
        options = self._clipping()
        if options["max_grad_norm"] is None:
            return 1.0
        from .clip import clip_coefficient, get_total_norm

        seen: set[int] = set()
        grads = []
        for group in groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in seen:
                    seen.add(id(p))
                    grads.append(p.grad)
        if not grads:
            self.__dict__["_rsoptim_last_grad_norm"] = None
            return 1.0
        with as_caller():  # as clip_grad_norm_ would run (it reads what it hands the kernels itself)
            total = get_total_norm(grads, options["norm_type"], options["error_if_nonfinite"])
        self.__dict__["_rsoptim_last_grad_norm"] = total
        return float(clip_coefficient(float(options["max_grad_norm"]), total).item())

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

    def _counts_steps(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` keeps a ``state['step']`` count the kernels increment."""
        return self._has_step

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Creates a param's state on its first step, exactly as torch does."""
        raise NotImplementedError

    def _make_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """``_init_state`` and ``_init_extension_state`` into a copy, added to ``state`` in one
        update: an exception raised part-way (a Ctrl-C can land after any call) leaves no
        state half made, which every later step would trip over (a KeyError), nor does another
        thread see one."""
        fresh = dict(state)  # (entries a user put there, a master copy say, are kept)
        self._init_state(p, group, fresh)
        self._init_extension_state(p, group, fresh)
        state.update(fresh)

    def _kernel_call(self, group: dict[str, Any], call: KernelCall) -> None:
        """Runs the Rust kernel on the buffers of ``call`` with the group's hyperparameters."""
        raise NotImplementedError

    def _torch_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Steps ``params`` with torch's own functional implementation."""
        raise NotImplementedError

    def _step_with_torch(self, group: dict[str, Any], params: list[torch.Tensor], grad_scale: float = 1.0) -> None:
        """Steps ``params`` with torch's implementation. Half-precision params that keep float32
        state (``state_dtype``) or a master copy, or that are rounded stochastically, are stepped
        as float32 copies (torch's ops refuse mixed dtypes; a master copy is stepped itself), each
        param then written once as the kernels write it (``round_params``). A param listed twice
        is stepped twice, one occurrence after the other, as torch steps it. With a
        ``grad_scale`` (clipping), torch steps scaled copies of the grads, as ``clip_grad_norm_``
        would have left them (each product rounded once), and the grads are put back."""
        if grad_scale == 1.0:
            return self._step_with_torch_unscaled(group, params)
        originals = {id(p): (p, p.grad) for p in params}
        try:
            with as_caller():  # (a subclass grad stays one, as clip_grad_norm_ leaves it)
                for p, grad in originals.values():
                    p.grad = grad * grad_scale
            self._step_with_torch_unscaled(group, params)
        finally:
            for p, grad in originals.values():
                p.grad = grad

    def _check_storages(self, p: torch.Tensor) -> None:
        """Refuses, as the kernels do, a plain CPU param, grad or state tensor (the step count
        included) of ``p`` that reaches past the end of its storage (shrunk in place), before
        torch's implementation steps ``p``: it would read and write the memory the storage lost
        (torch 2.13 crashes). Subclasses are left to torch, unread."""
        if type(p) not in PLAIN_TENSOR_TYPES:
            return
        state = self.state.get(p, {})
        tensors = [("a param", p), ("a grad", p.grad), *((f"state[{key!r}]", value) for key, value in state.items())]
        for role, t in tensors:
            if type(t) in PLAIN_TENSOR_TYPES and t.device.type == "cpu" and t.layout == torch.strided:
                check_storage(t, role)

    def _step_with_torch_unscaled(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        copied = [self._steps_as_float32(p, group) for p in params]
        own = [p for p, c in zip(params, copied) if not c]
        if own and group.get("fused"):
            # torch 2.13's fused CPU kernels pair the elements of a param with the wrong grad
            # and state elements unless all are contiguous: such params take its for-loop.
            strided = [p for p in own if p.device.type == "cpu" and not self._contiguous_buffers(p)]
            if strided:
                with as_caller():
                    self._torch_step({**group, "fused": False}, strided)
                own = [p for p in own if not any(p is q for q in strided)]
        if own:
            with as_caller():
                self._torch_step(group, own)
        pending = [p for p, c in zip(params, copied) if c]
        while pending:
            # Each round steps every param once (by identity: `==` on tensors compares values).
            batch, repeats, seen = [], [], set()
            for p in pending:
                (repeats if id(p) in seen else batch).append(p)
                seen.add(id(p))
            with _FLOAT32_COPIES_LOCK:
                self._step_float32_copies(group, batch)
            pending = repeats

    def _contiguous_buffers(self, p: torch.Tensor) -> bool:
        """Whether ``p``, its grad and its state tensors are all contiguous."""
        tensors = [p, p.grad, *(v for v in self.state.get(p, {}).values() if isinstance(v, torch.Tensor))]
        return all(t is None or t.is_contiguous() for t in tensors)

    def _step_float32_copies(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """``_step_with_torch`` for distinct half-precision params stepped as float32 copies."""
        for p in params:  # (`step` checked the options apply to them)
            if self._rounding_seed(p, group) is not None and not self._has_step:
                if not is_step_count(self.state[p].get("step")):
                    raise ValueError("state['step'] of a param with stochastic_rounding must be a one-element float tensor")
        copies: list[torch.Tensor] = []
        copy_states: list[dict[str, Any]] = []
        try:
            for p in params:
                state = self.state[p]
                master = self._master_copy(p, group, state)
                if master is None:
                    master = p.detach().float()
                master.grad = p.grad.float()
                # torch updates (or creates) the entries of this dict: float32 views of the state
                # (copies where it is kept in the param's dtype), the step count itself.
                copy_state = {k: v.float() if _is_half_state(k, v) else v for k, v in state.items()}
                self.state[master] = copy_state
                copies.append(master)
                copy_states.append(copy_state)
            with as_caller():
                self._torch_step(group, copies)
            for p, copy_state in zip(params, copy_states):
                state, state_dtype = self.state[p], self._state_dtype(p, group)
                for key, value in copy_state.items():
                    if state.get(key) is value:
                        continue
                    if isinstance(state.get(key), torch.Tensor) and state[key].shape == value.shape:
                        state[key].copy_(value)  # rounded once, to nearest
                    elif isinstance(value, torch.Tensor) and key not in ("step", "master_param"):
                        state[key] = value.to(state_dtype)  # an entry torch created
                    else:
                        state[key] = value
            self._write_params(group, params, copies)
        finally:
            for copy in copies:
                copy.grad = None
                self.state.pop(copy, None)

    def _master_copy(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> torch.Tensor | None:
        """``p``'s float32 master copy (made from the param where it is missing or unusable, or
        where the param was changed outside the optimizer since its last step), or None."""
        if not self._uses_master(p, group):
            return None
        master = state.get("master_param")
        usable = (
            isinstance(master, torch.Tensor)
            and master.dtype == torch.float32
            and master.shape == p.shape
            and master.device == p.device
            and (not is_dtensor(p) or same_layout(master, p))
        )
        if not usable:
            fresh = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
            # setdefault: another thread stepping this optimizer may have just made (and stepped)
            # one; keep that one. An unusable one is replaced.
            master = state.setdefault("master_param", fresh) if master is None else fresh
            if master is fresh:
                state["master_param"] = fresh
        elif self.__dict__.get("_rsoptim_master_versions", {}).get(id(p)) != param_version(p):
            _refresh_master(local(p).detach(), local(master))
        return master

    def _record_master_versions(self, groups: list[dict[str, Any]]) -> None:
        """Remembers the version of every param with a master copy, after a step: until it
        changes, nothing has written the param since (params that are views of one buffer share
        a version, so all are recorded at once)."""
        versions = {}
        for group in groups:
            if group.get("master_weights"):
                versions.update((id(p), param_version(p)) for p in group["params"] if self._uses_master(p, group))
        self.__dict__["_rsoptim_master_versions"] = versions

    def _steps_as_float32(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return p.dtype in HALF_DTYPES and (
            self._state_dtype(p, group) != p.dtype or self._uses_master(p, group) or self._rounding_seed(p, group) is not None
        )

    def _write_params(self, group: dict[str, Any], params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """``p = v`` (float32) for each param, rounded as the kernels round: to nearest, or
        stochastically with the bits a kernel step would draw (keyed by the step torch just
        counted, and by element in memory order, as the kernels walk a dense param)."""
        stochastic = []
        for p, v in zip(params, values):
            if self._rounding_seed(p, group) is None:
                p.copy_(v)
            else:
                stochastic.append((p, v))
        streams = self._streams(group, [p for p, _ in stochastic])
        # (read before any address is: reading a group of a dict subclass runs its code)
        seed = group["stochastic_rounding_seed"] if stochastic else None
        for dtype in {p.dtype for p, _ in stochastic}:
            batch = [(p, v, stream) for (p, v), stream in zip(stochastic, streams) if p.dtype == dtype]
            steps = []
            for p, _, _ in batch:
                if not self._has_step:  # SGD counts steps only for stochastic rounding; torch did not
                    self.state[p]["step"] += 1
                steps.append(float(self.state[p]["step"]))
            # (A DTensor's local shard is rounded: `v` is laid out like `p`, so shard matches shard.)
            sources = [torch.empty_like(local(p), dtype=torch.float32).copy_(local(v)) for p, v, _ in batch]
            outs = [torch.empty_like(local(p)) for p, _, _ in batch]
            source_addrs, out_addrs = list(map(torch.Tensor.data_ptr, sources)), list(map(torch.Tensor.data_ptr, outs))
            numels = [out.numel() for out in outs]
            # (The temporaries are this step's own; only code that finds them, in frames or the
            # collector's lists, could move them: then the step raises rather than write there.)
            _rsoptim.round_params(
                KERNEL_DTYPES[dtype],
                pack(numels),
                pack(source_addrs),
                pack(out_addrs),
                steps,
                stochastic_rounding_seed=seed,
                streams=pack(stream for _, _, stream in batch),
                **unmoved((sources + outs, pack(source_addrs + out_addrs), pack(numels * 2))),
            )
            for (p, _, _), out in zip(batch, outs):
                local(p).copy_(out)
                if is_dtensor(p):
                    increment_version(p)

    def _uses_master(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` keeps a float32 master copy (``master_weights``: half-precision params)."""
        return bool(group.get("master_weights")) and p.dtype in HALF_DTYPES

    def _rounding_seed(self, p: torch.Tensor, group: dict[str, Any]) -> int | None:
        """The stochastic-rounding seed of ``p`` (None: rounded to nearest)."""
        if group.get("stochastic_rounding") and p.dtype in HALF_DTYPES:
            return group["stochastic_rounding_seed"]
        return None

    def _streams(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[int]:
        """The stochastic-rounding stream of each param: its group's index and its index in the
        group (as state dicts number params), so no two params of an optimizer draw alike; and
        for a DTensor, which shard this rank holds (bits 48 and up), so that the shards of one
        param draw apart and the replicas of one shard alike."""
        group_index = next(i for i, g in enumerate(self.param_groups) if g is group)
        index = {id(q): i for i, q in enumerate(group["params"])}
        return [(shard_index(p) << 48) + (group_index << 32 | index[id(p)]) for p in params]

    def _param_keys(self, p: torch.Tensor, group: dict[str, Any]) -> tuple[str, ...]:
        """Every state tensor a kernel call uses for ``p``: the state buffers, the master copy
        where ``p`` keeps one, and the step count where it is counted."""
        keys = self._state_keys(group)
        if self._uses_master(p, group):
            keys = (*keys, "master_param")
        return (*keys, "step") if self._counts_steps(p, group) else keys

    def _plan_signature(self, group: dict[str, Any]) -> tuple[Any, ...]:
        """What decides the state a plan's calls use and how they round: a change sends the next
        step down the general path."""
        return (
            self._state_keys(group),
            bool(group.get("master_weights")),
            bool(group.get("stochastic_rounding")),
            group.get("stochastic_rounding_seed"),
            group.get("state_dtype"),
        )

    def _init_extension_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Creates what the extensions keep in a param's state, where it is missing (a state
        dict from torch.optim has none): the float32 master copy, SGD's step count."""
        if "master_param" not in state:
            self._master_copy(p, group, state)
        if self._counts_steps(p, group) and not self._has_step and "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_extensions(param_group)
        super().add_param_group(param_group)  # type: ignore[misc]
        group = self.param_groups[-1]
        try:
            self._complete_extensions(group)
            for p in group["params"]:
                self._check_extensions_apply(p, group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _complete_extensions(self, group: dict[str, Any]) -> None:
        """Checks a group's extension options (it may have been edited, or have inherited them
        from ``defaults``), and gives one that rounds stochastically without a seed
        ``torch.initial_seed()``."""
        check_extensions(group)
        if group.get("differentiable") and any(group.get(k, v) != v for k, v in EXTENSION_DEFAULTS.items() if k != "stochastic_rounding_seed"):
            raise ValueError(
                "state_dtype, master_weights and stochastic_rounding are not supported with differentiable=True "
                "(torch's implementation steps such groups, with autograd through the step)"
            )
        if group.get("stochastic_rounding") and group.get("stochastic_rounding_seed") is None:
            group["stochastic_rounding_seed"] = agreed_seed(torch.initial_seed(), group["params"])

    @with_step_hooks
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
        with native_reads():
            self._step_groups()
        return loss

    def _step_groups(self) -> None:
        follow_torch()
        groups = step_groups(self.param_groups)
        plans: dict[int, _Plan] = self.__dict__.setdefault("_rsoptim_plans", {})
        for index in [i for i in plans if i >= len(groups)]:
            # The group is gone: let its tensors go, before anything is checked (a finalizer of
            # theirs could run here, and change what the checks would have seen).
            del plans[index]
        # Every group is checked before any is stepped, so an error leaves all params as they
        # were.
        for group in groups:
            self._complete_extensions(group)  # a group may have been edited
        # Before anything is checked: the norm runs as the caller's clip_grad_norm_ would, so a
        # caller's mode may run code in it.
        grad_scale = self._grad_scale(groups)
        # Read after it, before anything is checked or packed (see read_options).
        hypers, options_plain = read_options(groups)
        work = []
        for index, group in enumerate(groups):
            plan = plans.get(index)
            calls = plan.kernel_calls(self, group, hypers[index]) if plan is not None else None
            params = None if calls is not None else self._params_with_grad(group)
            for p in params or ():
                self._check_extensions_apply(p, group)  # e.g. loaded onto params off the CPU
                self._check_writable(p, group)
            if params and any_dtensor(params):
                for i, p in enumerate(group["params"]):
                    if p.grad is not None:
                        check_grad(p, p.grad, i)
            work.append((index, group, calls, params))
        # Whether checking the groups could run any code of the caller's: not where every group
        # is a dict of plain options and a list of plain params, and every state a dict (the
        # usual case). Only asked with more than one group (a type check per param: 10-12 us a
        # step on 400 params).
        quiet = len(work) == 1 or (
            options_plain
            and type(self.state) is defaultdict
            and all(map(_params_are_plain, groups))
            and plain_state_map(self.state)
        )
        torch_ran = False
        for index, group, calls, params in work:
            if calls is not None and (torch_ran or (len(work) > 1 and not quiet)) and index in plans:
                # Code may have run since this group's tensors were checked: the checks of the
                # other groups (a param subclass's attributes, a Tensor lr's), or torch's
                # implementation stepping a group before it as the caller would run it (a
                # caller's mode): they are checked again, right before its kernels.
                calls = plans[index].kernel_calls(self, group, hypers[index])
                params = None if calls is not None else self._params_with_grad(group)
            if calls is not None:
                torch_stepped_a_call = False
                for call in calls:
                    call.grad_scale = grad_scale
                    if torch_stepped_a_call:
                        # torch's implementation stepped an earlier call of this group (below),
                        # running the caller's modes, which may have changed what this call
                        # checked: its params take the general path, which checks them again.
                        with torch.no_grad():
                            self._step_group(group, call.params, grad_scale, hypers[index])
                        continue
                    # As torch's in-place ops do, so autograd sees the params have changed. Bumped
                    # before the kernel, while the checks have just read the params' TensorImpls
                    # (after it, with the kernel's buffers through the caches, it took 35-37 us
                    # on 400 params; here the step is 8-14 us shorter): a call that raises below
                    # writes nothing, and its params are stepped on another path, which bumps them
                    # again (extra bumps are harmless, torch's `increment_version` says).
                    increment_version(call.params)
                    if call.local_params:
                        increment_version(call.local_params)
                    try:
                        self._kernel_call(hypers[index], call)
                    except _rsoptim.MemoryMovedError:
                        # Memory moved since the checks (another thread's `p.data = ...`, or a
                        # storage resized in place by code run in between; nothing was written):
                        # the general path checks these params again, on private aliases that
                        # only a resize in place moves, and the plan is rebuilt.
                        plans.pop(index, None)
                        with torch.no_grad():
                            self._step_group(group, call.params, grad_scale, hypers[index])
                        torch_ran = torch_stepped_a_call = True  # (it may have run torch's implementation)
                        continue
                    except _rsoptim.BufferOverlapError:
                        # A grad now shares memory with a param or state (refused before anything
                        # was written): torch steps these params, and the plan is rebuilt.
                        plans.pop(index, None)
                        with torch.no_grad():
                            self._step_with_torch(group, call.params, grad_scale)
                        torch_ran = torch_stepped_a_call = True
                        continue
            elif params:
                # differentiable=True: torch's implementation steps the group with autograd on, as
                # torch.optim does (see _step_group).
                with torch.set_grad_enabled(bool(group.get("differentiable"))):
                    plan = self._step_group(group, params, grad_scale, hypers[index])
                # (Another thread stepping this optimizer may have dropped the entry meanwhile.)
                if plan is None:
                    plans.pop(index, None)
                else:
                    plans[index] = plan
                torch_ran = True  # (it may have stepped some params with torch's implementation)
        if any(g.get("master_weights") for g in groups):
            self._record_master_versions(groups)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for saved in state_dict["param_groups"]:
            check_extensions(saved)
        # The plans hold aliases of the old state's tensors: let them go with it.
        self.__dict__.pop("_rsoptim_plans", None)
        super().load_state_dict(state_dict)  # type: ignore[misc]
        # New master copies: each is checked against its param's values at the next step.
        self.__dict__.pop("_rsoptim_master_versions", None)
        # torch casts floating state to each param's dtype. Where a group keeps float32 state
        # (state_dtype; a group saved by torch.optim has none, and takes this optimizer's own),
        # take it from the saved tensor itself, not from its rounding to the param's dtype.
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for group in self.param_groups:
            for key in EXTENSION_DEFAULTS:
                if key in self.defaults:
                    group.setdefault(key, self.defaults[key])
            self._complete_extensions(group)
            for p, saved_id in zip(group["params"], saved_ids):
                saved = state_dict["state"].get(saved_id, {})
                state = self.state.get(p, {})
                original = saved.get("master_param")
                if "master_param" in state and not (isinstance(original, torch.Tensor) and original.dtype == torch.float32):
                    # Not a float32 master copy (torch.optim casts it to the param's dtype and
                    # never updates it): the next step makes a new one from the param.
                    del state["master_param"]
                for key, value in state.items():
                    wanted = torch.float32 if key == "master_param" else self._state_dtype(p, group)
                    if key != "step" and isinstance(value, torch.Tensor) and value.dtype != wanted:
                        original = saved.get(key)
                        exact = isinstance(original, torch.Tensor) and original.dtype == wanted
                        state[key] = (original if exact else value).to(dtype=wanted, device=p.device, copy=True)

    def _init_extensions(self, **options: Any) -> None:
        """Records the extension options that are set (``state_dtype``, ``master_weights``,
        ``stochastic_rounding`` and its seed) in ``defaults`` and every group, and checks they
        apply to the params; call after ``torch.optim``'s constructor. Without them the groups
        and state dicts have exactly torch.optim's keys. The stochastic-rounding seed follows
        ``torch.manual_seed`` unless one is given."""
        check_extensions(options)
        if options["stochastic_rounding_seed"] is not None and not options["stochastic_rounding"]:
            raise ValueError("stochastic_rounding_seed is given but stochastic_rounding is off")
        if options["stochastic_rounding"] and options["stochastic_rounding_seed"] is None:
            params = [p for group in self.param_groups for p in group["params"]]
            options["stochastic_rounding_seed"] = agreed_seed(torch.initial_seed(), params)
        for key, value in options.items():
            if value != EXTENSION_DEFAULTS[key]:
                self.defaults[key] = value
                for group in self.param_groups:
                    group.setdefault(key, value)
        for group in self.param_groups:
            self._complete_extensions(group)  # a group given as a dict may set its own
            for p in group["params"]:
                self._check_extensions_apply(p, group)

    def _check_writable(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Refuses, before anything is stepped, a param or state tensor its step would write that
        is an efficient zero tensor (no memory), with the error torch's in-place ops raise on
        it. (A zero-tensor grad is read, not written: torch steps it.)"""
        state = self.state.get(p)
        tensors = [p, *(state.get(key) for key in self._param_keys(p, group))] if state else [p]
        if any(isinstance(t, torch.Tensor) and t._is_zerotensor() for t in tensors):
            raise RuntimeError(ZERO_TENSOR_MESSAGE)

    def _check_extensions_apply(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Refuses extension options for half-precision params the kernels cannot step (not on
        the CPU, or complex). On float32/float64 params they change nothing: such a param is its
        own master copy, and every float32 result is stored exactly."""
        self._state_dtype(p, group)  # refuses state_dtype for params not on the CPU
        for key in ("master_weights", "stochastic_rounding"):
            if group.get(key) and p.dtype in (*HALF_DTYPES, torch.complex32):
                if p.device.type != "cpu" or p.is_complex():
                    raise ValueError(f"{key}=True is supported for bfloat16/float16 CPU params, not {p.dtype} on {p.device}")

    def _state_dtype(self, p: torch.Tensor, group: dict[str, Any]) -> torch.dtype:
        """The dtype of ``p``'s state: the param's (torch.optim's layout), or float32 for a
        bfloat16/float16 CPU param of a group with ``state_dtype=torch.float32``."""
        if group.get("state_dtype") is not None and p.dtype in HALF_DTYPES:
            if p.device.type != "cpu":
                raise ValueError(f"state_dtype={group['state_dtype']} is supported for CPU params, not {p.device}")
            return group["state_dtype"]
        return p.dtype

    def _params_with_grad(self, group: dict[str, Any]) -> list[torch.Tensor]:
        params = [p for p in group["params"] if p.grad is not None]
        if self._sparse_message is not None and any(p.grad.is_sparse for p in params):
            raise RuntimeError(self._sparse_message)
        return params

    def _needs_state(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return True

    def _state_is_new(self, state: dict[str, Any]) -> bool:
        return len(state) == 0

    def _group_runs_on_kernel(self, group: dict[str, Any]) -> bool:
        """Whether the group's hyperparameters let the kernels reproduce torch's arithmetic."""
        return True

    def _param_runs_on_kernel(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor | None) -> bool:
        """Whether the kernels can step ``p`` with ``grad`` exactly as torch would (before its
        state is looked at). Anything else (another device or dtype, a grad of another dtype or
        shape, a sparse grad) is stepped by torch, which promotes, broadcasts or raises. A DTensor
        param is stepped by its local shard, with a grad laid out like it (else torch's DTensor
        ops redistribute it)."""
        if is_dtensor(p) or is_dtensor(grad):
            if not (is_dtensor(p) and same_layout(grad, p)):
                return False
            p, grad = p._local_tensor, grad._local_tensor
        if p.is_complex() and group["weight_decay"] != 0:
            # torch applies weight decay to complex params in complex arithmetic, where a
            # non-finite component spreads NaN to the other one; the kernels step real views.
            return False
        if p.is_inference() and not torch.is_inference_mode_enabled():
            return False  # torch refuses to write an inference tensor here: its step says so
        return grad is not None and runs_on_kernel(p) and same_kind(grad, p)

    def _kernel_buffers(self, p: torch.Tensor, group: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any] | None:
        """The grad, state tensors and step count the kernels would step ``p`` with, each read
        once (so that what was checked is what is stepped and held, whatever other threads
        assign meanwhile), or None if torch must step ``p``: the state tensors must be of the
        param's dtype, device and shape (a state dict may have loaded anything). For a DTensor
        param these are the local shards of its grad and state, each laid out like the param."""
        if not (type(p) in PLAIN_TENSOR_TYPES or is_dtensor(p)):
            return None  # (before its grad is read: a subclass's `grad` may run code)
        grad = p.grad
        if not self._param_runs_on_kernel(p, group, grad):
            return None
        if is_dtensor(p):

            def view(t: Any) -> Any:
                # The local shard of a state tensor laid out like the param (None: not one).
                return t._local_tensor if same_layout(t, p) else None

        else:

            def view(t: Any) -> Any:
                return t

        # Each buffer is a private alias (`.data`, taken under the GIL), read once: another
        # thread that gives the param, grad or a state tensor other memory (`p.data = ...`,
        # `set_`) or another dtype or size cannot change what was checked, and the alias holds
        # the memory the kernel gets.
        target = local(p).data
        buffers: dict[str, Any] = {"param": target, "grad": local(grad).data}
        master, counts_steps = self._uses_master(p, group), self._counts_steps(p, group)
        if keys or master or counts_steps:
            state, state_dtype = self.state[p], self._state_dtype(p, group)
            for key in keys:
                buffers[key] = _alias(view(state.get(key)))
                if not (isinstance(buffers[key], torch.Tensor) and same_kind(buffers[key], target, state_dtype)):
                    return None
                if _overlaps_itself(buffers[key]):
                    return None  # (torch's ops refuse to write it, before the param: so does its step here)
            if master:
                buffers["master_param"] = _alias(view(self._master_copy(p, group, state)))
                if not (isinstance(buffers["master_param"], torch.Tensor) and same_kind(buffers["master_param"], target, torch.float32)):
                    return None
            if counts_steps:
                buffers["step"] = _alias(state.get("step"))
                if not is_step_count(buffers["step"]):
                    return None
        return buffers

    def _forget_new_state(self, params: list[torch.Tensor]) -> None:
        """Undoes state this step created for ``params`` that torch would create otherwise."""

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor], grad_scale: float, hyper: dict[str, Any]) -> _Plan | None:
        """Steps one group in full generality, its grads multiplied by ``grad_scale``; returns a
        plan for the next steps if it can. The kernels take the hyperparameters from ``hyper``
        (``plain_hyperparameters(group)``, read before anything was packed)."""
        # (Options are read from `hyper` from here on: caller code run by making state, say,
        # may edit the group, and its reads would then run code after the checks.)
        keys = self._state_keys(hyper)
        # The kernels update tensors outside autograd: differentiable groups are torch's to step.
        # So are groups of a subclass of dict, whose reads of an option may run code (as torch's
        # implementation reads them).
        kernel_ok = type(group) is dict and self._group_runs_on_kernel(hyper) and not hyper.get("differentiable")
        buckets: dict[tuple[str, str], list[tuple[torch.Tensor, dict[str, Any]]]] = {}
        others: list[torch.Tensor] = []
        for p in params:
            if self._needs_state(p, group):
                # Atomic for threads stepping one optimizer: none sees a state half made.
                with _STATE_INIT_LOCK, as_caller():  # (made as torch.optim makes it: a
                    # subclass param's state is of its subclass; checked afresh below)
                    state = self.state[p]
                    if self._state_is_new(state):
                        self._make_state(p, group, state)
                    else:
                        self._init_extension_state(p, group, state)
        # Every state is made (a caller's mode may run code there) before any param is checked,
        # and so are the rounding streams (reading the group's params may run code).
        rounding = kernel_ok and any(self._rounding_seed(p, hyper) is not None for p in params)
        streams = dict(zip(map(id, params), self._streams(group, params))) if rounding else {}
        for p in params:
            buffers = self._kernel_buffers(p, hyper, keys) if kernel_ok else None
            if buffers is not None:
                step_dtype = step_dtype_name(buffers["step"]) if self._counts_steps(p, hyper) else "float32"
                state_dtype = self._state_dtype(p, hyper)
                state_name = None if state_dtype == p.dtype else KERNEL_DTYPES[state_dtype]
                buckets.setdefault((KERNEL_DTYPES[p.dtype], step_dtype, state_name), []).append((p, buffers))
            else:
                self._check_storages(p)  # (before anything is written, as the kernels' buffers)
                others.append(p)
        calls = []
        stepped: dict[int, dict[str, Any]] = {}
        for (dtype, step_dtype, state_name), entries in buckets.items():
            bucket = [p for p, _ in entries]
            extra = ("master_param",) if self._uses_master(bucket[0], hyper) else ()
            table = BufferTable(("param", "grad", *keys, *extra), written=frozenset(("param", *keys, *extra)))
            for p, buffers in entries:
                table.add(buffers["param"], {role: buffers[role] for role in ("grad", *keys, *extra)})
            steps = [buffers["step"] for _, buffers in entries] if self._counts_steps(bucket[0], hyper) else []
            for step in steps:  # (checked in _kernel_buffers: code may have run since, reading a later param's state)
                check_storage(step, "state['step']")
            columns = {role: pack(addrs) for role, addrs in table.columns.items()}
            # (The buffers and step counts are private aliases, see _kernel_buffers: held here,
            # they hold the memory until the kernels return.)
            step_addrs = list(map(torch.Tensor.data_ptr, steps))
            call = KernelCall(dtype, step_dtype, state_name, bucket, pack(table.numels), columns, pack(step_addrs))
            call.new_buffers = self._new_buffer_flags(bucket)
            call.grad_scale = grad_scale
            call.rounding_seed = self._rounding_seed(bucket[0], hyper)
            if call.rounding_seed is not None:
                call.streams = pack(streams[id(p)] for p in bucket)
            call.held = [table, steps]
            call.guard = (table.held + steps, pack([*table.addresses, *step_addrs]), pack([*table.held_numels, *[1] * len(steps)]))
            try:
                self._kernel_call(hyper, call)
            except NOTHING_WRITTEN:
                # Params that share memory (one param twice, overlapping views): torch steps them
                # one after another, and so does its implementation here. Nothing was written.
                # (So it does where memory moved after the checks: see `unmoved`.)
                self._forget_new_state(bucket)
                others.extend(bucket)
                continue
            finally:
                call.held = []
            table.write_back()
            self._keep_new_state(bucket)
            increment_version(bucket)
            if any_dtensor(bucket):
                call.local_params = [local(p) for p in bucket]
                increment_version(call.local_params)
            calls.append(call)
            stepped.update((id(p), buffers) for p, buffers in entries)
        if others:
            # A buffer made for the kernel to fill (SGD's first momentum) is torch's to make.
            self._forget_new_state(others)
            self._step_with_torch(group, others, grad_scale)
            return None
        return _Plan.build(self, hyper, calls, stepped)  # (the options the calls were made with)

    def _new_buffer_flags(self, params: list[torch.Tensor]) -> list[bool]:
        return [False] * len(params)

    def _keep_new_state(self, params: list[torch.Tensor]) -> None:
        """The kernel has filled (and written back) the buffers made for ``params`` to fill:
        an error raised later in the step (a Ctrl-C) must not remove them (see SGD)."""


#: Serialises steps on float32 copies (a slow path): they move state between dtypes and key
#: ``optimizer.state`` by the master copies, which two threads stepping one optimizer would race on.
_FLOAT32_COPIES_LOCK = threading.RLock()
#: Makes the lazy creation of a param's state atomic (see ``_step_group``).
_STATE_INIT_LOCK = threading.RLock()



def _state_gatherer(param_keys: list[tuple[str, ...]]) -> Callable[[list[dict[str, Any]]], list[Any]]:
    """``state dicts -> [state[k] for each param's dict and each of its keys]``, at C speed where
    every param has the same keys (the usual case); a missing entry raises KeyError."""
    if len(set(param_keys)) == 1:
        get = _tuple_getter(param_keys[0])
        return lambda dicts: list(chain.from_iterable(map(get, dicts)))
    getters = [_tuple_getter(keys) for keys in param_keys]
    return lambda dicts: [t for get, state in zip(getters, dicts) for t in get(state)]


def _tuple_getter(keys: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """``state -> tuple(state[k] for k in keys)``, at C speed (itemgetter of one key gives the
    item itself, not a tuple)."""
    if len(keys) == 1:
        key = keys[0]
        return lambda state: (state[key],)
    if not keys:
        return lambda state: ()
    return operator.itemgetter(*keys)
_get_grad = operator.attrgetter("grad")
# A DTensor's local shard and its layout (see _distributed.same_layout), at C speed.
_get_local = operator.attrgetter("_local_tensor")
_get_mesh_and_placements = operator.attrgetter("_spec.mesh", "_spec.placements")
# The address of a tensor's c10::TensorImpl, through the base class's descriptor: it raises
# TypeError for anything that is not a tensor and ignores a subclass's own `_cdata` (and, read
# inside native_reads, what a subclass's or mode's __torch_function__ would answer).
_get_impl = torch._C.TensorBase._cdata.__get__

#: c10::ScalarType codes of the dtypes a plan checks (see rust/core/src/torch_abi.rs).
_DTYPE_CODES = {torch.float32: 6, torch.float64: 7, torch.float16: 5, torch.bfloat16: 15}
#: The code of uint8 (8-bit optimizer states' codes), and one that matches no tensor's dtype.
UINT8_CODE = 0
NO_DTYPE_CODE = 255
#: The codes of every dtype the native checks read (plans' and 8-bit states').
CHECKED_DTYPE_CODES = {**_DTYPE_CODES, torch.uint8: UINT8_CODE}

#: Whether plans can be checked natively (libtorch's shim, see ``enable_native_checks``);
#: without it every step takes the general path.
_native_checks = False
_fast_reads: dict[str, bool] = {}


def enable_native_checks(libtorch: str | None, *, fast_reads: bool = True) -> bool:
    """Lets step plans check their tensors through the shim of the libtorch at ``libtorch``
    (torch's own, already loaded), after checking on probe tensors that it reads exactly what
    torch's accessors read and refuses what a plan must refuse. ``fast_reads``: read each
    tensor's negation bit through libtorch and its TensorImpl from the tensor object, where
    either is shown to work (see ``native_read_paths``), instead of calling ``is_neg`` and the
    ``_cdata`` getter (tests switch them off to run that path)."""
    global _native_checks, _fast_reads
    _native_checks, _fast_reads = False, {}
    if libtorch is None or not _rsoptim.use_torch_abi(libtorch, fast_reads):
        _rsoptim.use_torch_abi(None)
        return False

    def addresses(tensors, numels, dtypes, shape_of=None):
        shape_of = range(len(tensors)) if shape_of is None else shape_of
        return _rsoptim.tensor_addresses(
            pack(map(_get_impl, tensors)), pack(numels), bytes(CHECKED_DTYPE_CODES.get(d, NO_DTYPE_CODE) for d in dtypes), pack(shape_of)
        )

    base = torch.arange(24.0).reshape(6, 4)
    view = base[2:]  # storage offset 8: the address is not the storage's
    # Tensors made in C++ and in Python, a view and a Parameter: where each holds its TensorImpl.
    samples = [base, view, torch.nn.Parameter(torch.zeros(3)), torch.Tensor(), torch.empty(0).t()]
    reads_objects = _rsoptim.use_tensor_readers(
        list(PLAIN_TENSOR_TYPES),
        vars(torch._C.TensorBase)["_cdata"],
        torch._C.TensorBase.is_neg,
        torch._C._is_torch_function_all_disabled,
        torch._C.TensorBase.untyped_storage,
        samples if fast_reads else [],
    )
    other = torch.zeros(4, 4, dtype=torch.float64)
    shrunk = torch.zeros(64)
    shrunk.untyped_storage().resize_(16)
    f32, f64 = torch.float32, torch.float64
    works = (
        addresses([view, other], [16, 16], [f32, f64]) == pack([view.data_ptr(), other.data_ptr()])
        and addresses([view, base[:4]], [16, 16], [f32, f32], [0, 0]) == pack([view.data_ptr(), base.data_ptr()])
        and addresses([view], [16], [f64]) is None  # another dtype
        and addresses([view], [12], [f32]) is None  # another element count
        and addresses([view, base[:2].reshape(4, 2)], [16, 8], [f32, f32], [0, 0]) is None  # other sizes
        and addresses([view.t()], [16], [f32]) is None  # not contiguous
        and addresses([shrunk], [64], [f32]) is None  # outside its storage
        and addresses([codes := torch.zeros(16, dtype=torch.uint8)], [16], [torch.uint8]) == pack([codes.data_ptr()])
        and addresses([codes], [16], [f32]) is None
        # (where the checks read negation bits natively, they must see this one)
        and (not _rsoptim.torch_abi_reads_neg_bit() or addresses([view._neg_view()], [16], [f32]) is None)
        and _plan_addresses_work(view, other)
    )
    if not works:
        _rsoptim.use_torch_abi(None)
    _native_checks = works
    _fast_reads = {"negation bits": _rsoptim.torch_abi_reads_neg_bit(), "TensorImpls": reads_objects} if works else {}
    return works


def native_read_paths() -> dict[str, bool]:
    """Which of the plan checks' fast reads are in use: "negation bits" (``at::native::is_neg``
    instead of ``Tensor.is_neg``) and "TensorImpls" (read from the tensor objects instead of
    the ``_cdata`` getter)."""
    return dict(_fast_reads)


def _plan_addresses_work(view: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether ``plan_addresses`` reads what torch's accessors read, and refuses subclasses,
    negation bits, and calls with torch function on."""
    f32, f64 = _DTYPE_CODES[torch.float32], _DTYPE_CODES[torch.float64]

    def addresses(tensors: list[Any], dtype_codes: list[int]) -> bytes | None:
        n = len(tensors)
        return _rsoptim.plan_addresses(tensors, pack([16] * n), bytes(dtype_codes), pack(range(n)))

    class Subclass(torch.Tensor):
        pass

    outside = addresses([view], [f32])
    with native_reads():
        return outside is None and (
            addresses([view, other], [f32, f64]) == pack([view.data_ptr(), other.data_ptr()])
            and addresses([torch.nn.Parameter(view)], [f32]) == pack([view.data_ptr()])
            and addresses([view._neg_view()], [f32]) is None
            and addresses([view.as_subclass(Subclass)], [f32]) is None
            and addresses([view, 1.0], [f32, f32]) is None
        )


@dataclass
class _Plan:
    """The addresses of one group's buffers, reused while nothing they depend on changes.

    Each step re-reads, per param: its grad and the state tensors found through
    ``optimizer.state``, and checks natively (one call for the whole group, through libtorch's
    shim) that the params, grads and state tensors are contiguous CPU tensors of the expected
    dtype and element count, each grad and state tensor of its param's sizes, each inside its
    storage (one resized in place may be smaller), and that the params and state tensors are
    where the plan's columns point. Anything else that changed (the group's param list, the set
    of params with grads, the optimizer's state dict, the state keys the hyperparameters call
    for, a grad with a lazy negation bit) sends the step down the general path, which checks
    everything and builds a new plan.
    """

    group_params: list[torch.Tensor]
    params: list[torch.Tensor]  # the group's params, as they were
    has_grad: list[bool]
    state: Any
    signature: tuple[Any, ...]  # the group's `_plan_signature` when the plan was made
    # The params' state dicts (`state_dicts`) -> the state tensors their calls use, in order (see
    # `_param_keys` and `_state_gatherer`).
    state_tensors: Callable[[list[dict[str, Any]]], list[Any]]
    calls: list[KernelCall]
    # What each step's tensors must be, in the order params, grads, then each param's state
    # tensors (see rsoptim._rsoptim.tensor_addresses), and where the params and state tensors are.
    numels: bytes
    dtypes: bytes
    shape_of: bytes
    param_addrs: bytes
    state_addrs: bytes
    # The storages of the params and state tensors at those addresses, taken as they were read.
    # Holding them keeps that memory allocated: no other storage can be at those addresses
    # while it is, so a step that finds its tensors there steps this memory, which stays alive
    # even if another thread gives a tensor other memory (`p.data = ...`) while the kernel
    # writes. (Grads change every step: each step holds its own.)
    storages: list[Any]
    # For each call, which of the group's grads (in order of params with grads) it takes.
    grads_of_call: list[list[int]]
    all_have_grads: bool = False
    # Every value of optimizer.state when the plan was made, and the dicts of its params.
    state_dicts_all: list[dict[str, Any]] = field(default_factory=list)
    state_dicts: list[dict[str, Any]] = field(default_factory=list)
    # The params with master copies: one written since the optimizer wrote it (their versions
    # differ) takes the general path, which copies it into its master.
    master_params: list[torch.Tensor] = field(default_factory=list)
    # A group of DTensor params (none for plain ones): the kernels take the local shards of the
    # params, grads and state tensors (not the step counts, plain tensors), each DTensor on the
    # mesh and in the placements recorded here (in the order grads, then state tensors).
    layouts: list[tuple[Any, Any]] = field(default_factory=list)
    step_slots: list[bool] = field(default_factory=list)
    # The state keys of every param, where the step's tensors are gathered natively: every
    # param of the group (a list) has a grad, all have the same keys in plain dicts, and none is
    # a DTensor.
    gather_keys: tuple[str, ...] | None = None

    @staticmethod
    def build(
        opt: KernelOptimizer, group: dict[str, Any], calls: list[KernelCall], stepped: dict[int, dict[str, Any]]
    ) -> _Plan | None:
        """A plan from the step just taken: ``stepped`` maps each stepped param (by id) to the
        grad, state tensors and step count its call used. The plan records exactly those
        tensors' addresses, which are in the calls' columns, never a re-read of them (which
        another thread may have replaced meanwhile)."""
        if not _native_checks:
            return None
        where = {}
        for c, call in enumerate(calls):
            columns = {role: array("Q", column) for role, column in call.columns.items()}
            columns["step"] = array("Q", call.steps)
            for slot, p in enumerate(call.params):
                where[id(p)] = (c, slot, columns)
        with_grad = [p for p in group["params"] if id(p) in stepped]
        if any(p.dtype not in _DTYPE_CODES for p in with_grad):
            return None  # complex params take the general path every step
        param_keys = [opt._param_keys(p, group) for p in with_grad]
        layouts: list[tuple[Any, Any]] = []
        if any_dtensor(with_grad):
            # Every param a DTensor (stepped by its local shard, so its grad and state tensors
            # are laid out like it), the step counts plain tensors, as torch.optim makes them.
            if not all(map(is_dtensor, with_grad)):
                return None
            layouts = list(map(_get_mesh_and_placements, with_grad))  # the grads'
            for p, keys in zip(with_grad, param_keys):
                layouts += [_get_mesh_and_placements(p)] * sum(k != "step" for k in keys)
        grads = [stepped[id(p)]["grad"] for p in with_grad]
        states = [stepped[id(p)][k] for p, keys in zip(with_grad, param_keys) for k in keys]
        count = len(with_grad)
        numels = [local(p).numel() for p in with_grad] * 2
        dtypes = [_DTYPE_CODES[p.dtype] for p in with_grad] * 2
        shape_of = [*range(count), *range(count)]
        for i, (p, keys) in enumerate(zip(with_grad, param_keys)):
            for k in keys:
                step = k == "step"
                numels.append(1 if step else local(p).numel())
                dtypes.append(_DTYPE_CODES.get(stepped[id(p)][k].dtype, NO_DTYPE_CODE))
                shape_of.append(len(shape_of) if step else i)
        plan_numels, plan_dtypes, plan_shape_of = pack(numels), bytes(dtypes), pack(shape_of)
        # The same native read as every later step's (see kernel_calls), which also takes the
        # storages at these addresses.
        storages: list[Any] = []
        tensors = [*map(local, with_grad), *grads, *states]
        addrs = _rsoptim.plan_addresses(tensors, plan_numels, plan_dtypes, plan_shape_of, storages)
        if addrs is None:
            return None  # e.g. strided params and state take the general path every step
        column_addrs = [where[id(p)][2]["param"][where[id(p)][1]] for p in with_grad]
        column_addrs += [where[id(p)][2][k][where[id(p)][1]] for p, keys in zip(with_grad, param_keys) for k in keys]
        if addrs[: 8 * count] + addrs[16 * count :] != pack(column_addrs):
            return None  # moved since the call (another thread): the next step checks afresh
        grads_of_call: list[list[int]] = [[0] * len(call.params) for call in calls]
        for i, p in enumerate(with_grad):
            c, slot, _ = where[id(p)]
            grads_of_call[c][slot] = i
        for call in calls:
            call.new_buffers = [False] * len(call.params)
        has_grad = [id(p) in stepped for p in group["params"]]
        all_have_grads = all(has_grad)
        # (`opt.state` makes an entry for a param it is asked about: not for keyless ones.)
        state_dicts = [opt.state[p] if keys else {} for p, keys in zip(with_grad, param_keys)] if states else []
        return _Plan(
            all_have_grads=all_have_grads,
            group_params=group["params"],
            params=list(group["params"]),
            has_grad=has_grad,
            state=opt.state,
            state_dicts_all=list(opt.state.values()),
            state_dicts=state_dicts,
            signature=opt._plan_signature(group),
            state_tensors=_state_gatherer(param_keys),
            master_params=[p for p in with_grad if opt._uses_master(p, group)],
            calls=calls,
            numels=plan_numels,
            dtypes=plan_dtypes,
            shape_of=plan_shape_of,
            param_addrs=addrs[: 8 * count],
            state_addrs=addrs[16 * count :],
            storages=storages[:count] + storages[2 * count :],
            grads_of_call=grads_of_call,
            layouts=layouts,
            step_slots=[k == "step" for keys in param_keys for k in keys],
            gather_keys=param_keys[0] if _gathers_natively(group, all_have_grads, layouts, param_keys, state_dicts) else None,
        )

    def kernel_calls(self, opt: KernelOptimizer, group: dict[str, Any], hyper: dict[str, Any]) -> list[KernelCall] | None:
        """This step's kernel calls, or None if anything the plan relies on has changed. The
        options are read from ``hyper`` (see plain_hyperparameters).

        Written as ``map`` over C-level callables and one native check: this runs once per
        step for every param.
        """
        if type(group) is not dict:
            # (replaced by a subclass of dict since the plan was made: its reads may run code,
            # so its params are torch's to step, as `_step_group` leaves them)
            return None
        params = group["params"]
        if (
            params is not self.group_params
            or len(params) != len(self.params)
            or not all(map(operator.is_, params, self.params))
            or opt.state is not self.state
            or not opt._group_runs_on_kernel(hyper)
            or opt._plan_signature(hyper) != self.signature
        ):
            return None
        if self.gather_keys is not None:
            return self._gathered_calls(opt, params)
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
        tensors: list[Any] = []
        if self.state_dicts:
            if not self._same_state_dicts(opt):
                return None
            try:
                tensors = self.state_tensors(self.state_dicts)
            except KeyError:  # a state entry was removed
                return None
        if not self._masters_unwritten(opt):
            return None
        if self.layouts:
            try:
                dtensors = [*grads, *compress(tensors, map(operator.not_, self.step_slots))]
                if list(map(_get_mesh_and_placements, dtensors)) != self.layouts:
                    return None  # (meshes compare by identity first, placements by value)
                with_grad = list(map(_get_local, with_grad))
                grads = list(map(_get_local, grads))
                tensors = [t if step else _get_local(t) for t, step in zip(tensors, self.step_slots)]
            except AttributeError:  # a plain tensor where a DTensor was
                return None
        return self._checked_calls([*with_grad, *grads, *tensors], len(grads))

    def _gathered_calls(self, opt: KernelOptimizer, params: list[torch.Tensor]) -> list[KernelCall] | None:
        """``kernel_calls`` where every param has a grad and the same state keys: the params,
        grads and state tensors gathered in one native call."""
        # (Reading the grads may run code, which may replace state dicts: they are compared after.)
        tensors = _rsoptim.gather_plan_tensors(params, self.state_dicts, self.gather_keys)
        if tensors is None or (self.state_dicts and not self._same_state_dicts(opt)) or not self._masters_unwritten(opt):
            return None
        # (The gather read the params as they were when checked to be the plan's: code run by
        # a grad read may have added some since.)
        return self._checked_calls(tensors, len(self.params))

    def _same_state_dicts(self, opt: KernelOptimizer) -> bool:
        """optimizer.state maps each param to its dict: if none was replaced, removed or added
        since the plan was made, the plan's dicts are the params' (no tensor hashing)."""
        values = opt.state.values()
        return len(values) == len(self.state_dicts_all) and all(map(operator.is_, values, self.state_dicts_all))

    def _masters_unwritten(self, opt: KernelOptimizer) -> bool:
        if not self.master_params:
            return True
        written = opt.__dict__.get("_rsoptim_master_versions", {})
        return list(map(param_version, self.master_params)) == [written.get(id(p)) for p in self.master_params]

    def _checked_calls(self, tensors: list[Any], count: int) -> list[KernelCall] | None:
        """This step's calls, if ``tensors`` (params, grads, then state tensors, ``count`` each
        of the first two) pass the native check and the params and state tensors are where the
        plan's are."""
        # None for anything that is not a plain tensor (a subclass is torch's to step, see
        # runs_on_kernel) or has a lazy negation bit (`_neg_view`, `torch._C._set_neg`: it
        # changes the values, not the memory, and the kernels would step the raw memory).
        # The grads' storages are held as they are read (the plan holds the others'): another
        # thread may give a grad other memory (`g.data = ...`, which frees the old) while its
        # kernel reads the old.
        grad_storages: list[Any] = []
        addrs = _rsoptim.plan_addresses(tensors, self.numels, self.dtypes, self.shape_of, grad_storages, count, 2 * count)
        if addrs is None or addrs[: 8 * count] != self.param_addrs or addrs[16 * count :] != self.state_addrs:
            return None
        grad_addrs = addrs[8 * count : 16 * count]
        # This step's calls: the plan's with this step's grads, new objects so that two threads
        # stepping one optimizer never see each other's columns. Each holds the tensors it was
        # checked with (whose memory its columns point at) until its kernel returns.
        held = [tensors, grad_storages, self.storages]
        guard = (tensors, addrs, self.numels)  # (each call checks them all)
        if len(self.calls) == 1:
            return [_with_grads(self.calls[0], grad_addrs, held, guard)]
        grad_words = array("Q", grad_addrs)
        return [
            _with_grads(call, pack([grad_words[i] for i in indices]), held, guard)
            for call, indices in zip(self.calls, self.grads_of_call)
        ]


def _gathers_natively(
    group: dict[str, Any],
    all_have_grads: bool,
    layouts: list[tuple[Any, Any]],
    param_keys: list[tuple[str, ...]],
    state_dicts: list[dict[str, Any]],
) -> bool:
    """Whether a plan's steps gather their tensors in one native call (``gather_plan_tensors``,
    which takes a list of params and plain dicts): every param of the group has a grad and the
    same state keys, none is a DTensor, the params are a list and the state dicts plain dicts."""
    return (
        type(group["params"]) is list
        and all_have_grads
        and not layouts
        and len(set(param_keys)) == 1
        and all(type(d) is dict for d in state_dicts)
    )


def _alias(t: Any) -> Any:
    """A private alias of a tensor (anything else as it is)."""
    return t.data if isinstance(t, torch.Tensor) else t


def _with_grads(call: KernelCall, grad_addrs: bytes, held: list[Any], guard: Guard) -> KernelCall:
    """A copy of a plan's call with this step's grads and last check (``dataclasses.replace``
    without its re-validation: about 2 us per step on small steps)."""
    copy = object.__new__(KernelCall)
    copy.__dict__.update(call.__dict__)
    copy.columns = {**call.columns, "grad": grad_addrs}
    copy.held = held
    copy.guard = guard
    return copy
