"""Turning tensors into the flat buffers the Rust kernels walk.

The kernels update element ``i`` of a param from element ``i`` of its grad and state, walking
each buffer linearly in memory. That is right whenever all of them are dense (no gaps, no
overlap) and lay their elements out in the same order, which is what we check; anything else
(a grad whose strides differ from its param's, a param that is a strided view) goes through a
temporary in the param's layout that is copied back after the step. torch 2.13's fused CPU Adam
skips this check and gets such layouts wrong.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import torch
from torch._ops import _len_torch_dispatch_stack_pre_dispatch
from torch.utils._python_dispatch import _disable_current_modes

from . import _collector

#: dtypes the Rust kernels step; complex params run on their real views. bfloat16 and float16
#: params (and their state, kept in the param's dtype as torch.optim keeps it) are computed in
#: float32 and each stored value is rounded once, as torch's fused CPU kernels do.
KERNEL_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.complex64: "float32",
    torch.complex128: "float64",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}

HALF_DTYPES = frozenset((torch.bfloat16, torch.float16))


#: The tensor types whose sizes and strides the kernels trust: a subclass may override them
#: (``shape``, ``stride``, ``data_ptr``) with values its memory does not have.
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def runs_on_kernel(t: torch.Tensor) -> bool:
    """Whether a tensor is of a kind the Rust kernels walk: a plain (not subclassed) strided CPU
    float32/float64 (or complex) tensor whose values are its memory (no lazy conjugate or
    negative bit, not an efficient zero tensor, which has none). Anything else is torch's to
    step: its ops read the real sizes."""
    return (
        type(t) in PLAIN_TENSOR_TYPES
        and t.device.type == "cpu"
        and t.dtype in KERNEL_DTYPES
        and t.layout == torch.strided
        and not t.is_conj()
        and not t.is_neg()
        and not t._is_zerotensor()
    )


def same_kind(t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether a grad or state tensor ``t`` can be stepped with its param ``like`` by the kernels:
    ``dtype`` (by default the param's), the param's device and shape, and plain memory. Anything
    else torch's own ops handle by promotion or broadcasting, or refuse: such params are left to
    torch."""
    return (
        t.dtype == (dtype or like.dtype) and t.device == like.device and t.shape == like.shape and runs_on_kernel(t)
    )


#: torch's error for an in-place write to an efficient zero tensor (`torch._efficientzerotensor`).
ZERO_TENSOR_MESSAGE = (
    "ZeroTensors are immutable. Please use the materialized zero tensor obtained using .clone() if you want a "
    "mutable tensor."
)


def is_step_count(step: Any) -> bool:
    """Whether a state['step'] is the one-element float32/float64 CPU tensor the kernels
    increment in place (torch accepts other kinds; params with those are left to torch)."""
    return (
        type(step) in PLAIN_TENSOR_TYPES  # (a subclass may answer numel() for memory it has not)
        and step.device.type == "cpu"
        and step.numel() == 1
        and fits_storage(step)
        and step.dtype in (torch.float32, torch.float64)
        and step.layout == torch.strided
        and not step.is_neg()
        and not step._is_zerotensor()  # (no memory: torch refuses to increment it)
    )


def fits_storage(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` lies inside its storage. A storage resized in place
    (``untyped_storage().resize_()``) can be smaller than its tensors: torch's own ops then read
    and write out of bounds; rsoptim refuses to hand such memory to the kernels."""
    numel = t.numel()
    if numel == 0:
        return True
    if t.is_contiguous():  # (the common case, without a loop over the dims)
        end = t.storage_offset() + numel
    else:
        end = t.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return end * t.element_size() <= t.untyped_storage().nbytes()


def check_storage(t: torch.Tensor, role: str) -> None:
    if not fits_storage(t):
        raise RuntimeError(
            f"{role} of shape {tuple(t.shape)} reaches past the end of its storage "
            f"({t.untyped_storage().nbytes()} bytes): was the storage resized in place?"
        )


def as_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly ``t.numel()`` consecutive elements, in some dim order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(t: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether ``t`` has ``like``'s shape and element order (``like`` is dense); the dtypes may
    differ (float32 state of a bfloat16 param)."""
    if t.device != like.device or t.shape != like.shape:
        return False
    if t.is_contiguous() and like.is_contiguous():
        return True
    return all(a == b for a, b, n in zip(t.stride(), like.stride(), t.shape) if n != 1)


class BufferTable:
    """The addresses of every buffer of one kernel call, a column per role.

    Holds every tensor whose address it hands out until the call is over, and copies the
    temporaries of written buffers back with :meth:`write_back`.
    """

    def __init__(self, roles: tuple[str, ...], written: frozenset[str]):
        self.numels: list[int] = []
        self.columns: dict[str, list[int]] = {role: [] for role in roles}
        self._written = written
        #: Every tensor whose address a column has, that address and its element count, in the
        #: same order.
        self.held: list[torch.Tensor] = []
        self.addresses: list[int] = []
        self.held_numels: list[int] = []
        self._copy_back: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, param: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
        """Adds one param and its other buffers (grad and state), each of the param's dtype,
        device and shape (see :func:`same_kind`) and inside its storage (checked here: nothing
        is written before every buffer of the call is added)."""
        check_storage(param, "a param")
        p = as_real(param)
        if not is_dense(p):
            dense = p.contiguous()
            self._copy_back.append((p, dense))
            p = dense
        self.numels.append(p.numel())
        self._hand_over("param", p)
        for role, tensor in buffers.items():
            check_storage(tensor, role)
            t = as_real(tensor)
            if not same_layout(t, p):
                staged = torch.empty_like(p, dtype=t.dtype)
                staged.copy_(t)
                if role in self._written:
                    self._copy_back.append((t, staged))
                t = staged
            self._hand_over(role, t)

    def _hand_over(self, role: str, t: torch.Tensor) -> None:
        address = t.data_ptr()
        self.columns[role].append(address)
        self.held.append(t)
        self.addresses.append(address)
        self.held_numels.append(t.numel())

    def write_back(self) -> None:
        for target, staged in self._copy_back:
            target.copy_(staged)


def step_dtype_name(step: torch.Tensor) -> str:
    """The dtype name of a step count that :func:`is_step_count` accepted."""
    return KERNEL_DTYPES[step.dtype]


class _PausedWithUndos:
    """A context manager that pauses the collector first thing and whose ``__exit__`` is its
    resume, which calls the undos ``_change`` registered with :func:`rsoptim._collector.at_resume`.
    Each undo is registered before its change is made, and is harmless where the change was not
    made. So wherever an exception from a signal handler (a Ctrl-C) lands, what C functions
    change and undo (the collector, the torch function state, the stack of entries) is left as
    it was; what Python code changes or undoes (the dispatch modes) can still be interrupted
    halfway."""

    __slots__ = ()

    def __enter__(self) -> None:
        try:
            _collector.pause()  # (first: see rsoptim._collector)
            self._change()
        except BaseException:
            _collector.resume()
            raise

    __exit__ = _collector.resume

    def _change(self) -> None:
        """The subclass's changes, each made after registering its undo."""
        raise NotImplementedError


class native_reads(_PausedWithUndos):
    """Inside: torch function is off (Tensor subclasses' ``__torch_function__`` and any
    ``TorchFunctionMode``) and no ``TorchDispatchMode`` is active, so that what the kernels are
    handed (addresses, element counts, dtypes, sizes, the TensorImpl behind ``_cdata``) is what
    the tensors are, and no user code runs between a check and its kernel. A mode or subclass
    could otherwise answer ``data_ptr()`` or ``numel()`` with any number, or resize a storage
    already checked (in a ``.item()``, say), and the kernels would write there. torch's own
    implementation, where it steps params, runs as the caller would have it (:class:`as_caller`),
    as torch.optim's would. No garbage collection starts inside either (a ``__del__`` could
    resize a checked storage just as well: see :mod:`rsoptim._collector`). Nests.

    An exception from a signal handler (a Ctrl-C) that lands anywhere leaves the torch function
    state and the collector as the caller had them (see :class:`_PausedWithUndos`). Active
    dispatch modes are taken off and put back by torch's Python code (its
    ``_disable_current_modes``): one that lands in there can lose them, as it can around torch's
    own uses of it."""

    __slots__ = ()

    def _change(self) -> None:
        callers = _callers()
        _collector.at_resume(callers.__delitem__, slice(len(callers), None))
        # [torch function state to restore, the context that took the dispatch modes off]
        entry = [_torch_function_state(), None]
        callers.append(entry)
        _collector.at_resume(_set_torch_function_state, entry[0])
        _set_torch_function_state(_ALL_DISABLED)
        if _dispatch_modes_active():
            _collector.at_resume(_put_modes_back, entry)
            _take_modes_off(entry)


class as_caller(_PausedWithUndos):
    """Inside :class:`native_reads`: torch function and dispatch modes as the caller of the
    innermost ``native_reads`` had them (around torch's own implementation, so that subclasses
    and modes see its ops as they would torch.optim's). What it hands the kernels is read again
    afterwards, inside ``native_reads``. (Its pause of the collector nests in that one's: it is
    there for the undos.)"""

    __slots__ = ()

    def _change(self) -> None:
        _collector.at_resume(_set_torch_function_state, _torch_function_state())
        callers = _callers()
        if callers:
            entry = callers[-1]
            _set_torch_function_state(entry[0])
            if _holds_modes_off(entry):
                _collector.at_resume(_take_modes_off_again, entry)
                _put_modes_back(entry)


def _dispatch_modes_active() -> bool:
    return bool(torch._C._len_torch_dispatch_stack() or _len_torch_dispatch_stack_pre_dispatch())


def _take_modes_off(entry: list[Any]) -> None:
    """Takes the dispatch modes off their stacks until :func:`_put_modes_back`."""
    modes_off = _disable_current_modes()
    entry[1] = modes_off
    modes_off.__enter__()


def _holds_modes_off(entry: list[Any]) -> bool:
    """Whether the entry's context holds the dispatch modes off: entered and not exited (an
    interrupt could have come before its generator took them, or after it put them back)."""
    modes_off = entry[1]
    return modes_off is not None and inspect.getgeneratorstate(modes_off.gen) == inspect.GEN_SUSPENDED


def _put_modes_back(entry: list[Any]) -> None:
    """Puts back the modes :func:`_take_modes_off` took off, if they are still off."""
    if _holds_modes_off(entry):
        entry[1].__exit__(None, None, None)


def _take_modes_off_again(entry: list[Any]) -> None:
    """Undoes :func:`_put_modes_back` in :class:`as_caller`, if it put them back."""
    if not _holds_modes_off(entry) and _dispatch_modes_active():
        _take_modes_off(entry)


def _callers() -> list[list[Any]]:
    callers = getattr(_caller, "stack", None)
    if callers is None:
        callers = _caller.stack = []
    return callers


_torch_function_state = torch._C._get_torch_function_state
_set_torch_function_state = torch._C._set_torch_function_state
_ALL_DISABLED = torch._C._TorchFunctionState.ALL_DISABLED
#: Per thread (torch function state and the mode stacks are per thread): an entry per
#: native_reads entered and not left.
_caller = threading.local()
