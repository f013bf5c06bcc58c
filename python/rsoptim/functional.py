"""In-place optimizer steps on NumPy arrays, for code that does not use torch optimizers.

Every function takes lists of C-contiguous float32 or float64 arrays (one entry per tensor; a
single array is taken as a list of one), all of one dtype, and updates params and state in place
with the same arithmetic as the torch optimizers. The steps also take float16 params, and
bfloat16 ones (``ml_dtypes.bfloat16``) where ml_dtypes is installed: computed in float32, each
stored value rounded once, with state of the params' dtype or float32. Step counts live in a 1-D
float32/float64 array with one entry per tensor, incremented in place. Arrays that share memory
are refused with ValueError.

Example::

    import numpy as np
    from rsoptim import functional as F

    w = np.zeros(1000, dtype=np.float32)
    m, v = np.zeros_like(w), np.zeros_like(w)
    steps = np.zeros(1, dtype=np.float32)
    for _ in range(100):
        grad = 2 * (w - 3.0)                      # d/dw of (w - 3)^2
        F.adam_([w], [grad], [m], [v], steps, lr=0.1)
    # w is now close to 3
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import _rsoptim
from ._collector import collector_paused
from ._columns import pack

__all__ = ["adam_", "sgd_", "rmsprop_", "grad_norms", "clip_grad_norm_"]

Arrays = np.ndarray | Sequence[np.ndarray]
#: Step counts are float32 or float64.
_STEP_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}
#: Params: float32, float64, float16, and bfloat16 where ml_dtypes (NumPy's bfloat16) is installed.
#: Half-precision params are computed in float32, each stored value rounded once.
_DTYPES = {**_STEP_DTYPES, np.dtype(np.float16): "float16"}
try:
    import ml_dtypes

    _DTYPES[np.dtype(ml_dtypes.bfloat16)] = "bfloat16"
except ImportError:  # bfloat16 arrays need ml_dtypes
    pass
_HALF = {name for name in _DTYPES.values() if name in ("float16", "bfloat16")}


def _as_list(arrays: Arrays | None) -> list[np.ndarray] | None:
    if arrays is None:
        return None
    return list(map(_plain, [arrays] if isinstance(arrays, np.ndarray) else arrays))


def _plain(a: object) -> object:
    """An ndarray subclass as a plain ndarray of the same memory (anything else as it is): a
    subclass may override ``size``, ``shape``, ``flags`` or ``ctypes`` with values its memory
    does not have, and the kernels would write there."""
    return np.ndarray.view(a, np.ndarray) if isinstance(a, np.ndarray) and type(a) is not np.ndarray else a


class _Params:
    """The params of one call, and the packed columns of arrays shaped like them.

    Holds every array whose address it hands out: a column may come from a generator whose
    arrays nothing else references, and the kernel must not read freed memory. Keep the object
    alive until the kernel call returns."""

    def __init__(self, params: Arrays):
        self.held: list[list[np.ndarray]] = []
        self.arrays = _as_list(params) or []
        if not self.arrays:
            raise ValueError("no params given")
        for i, a in enumerate(self.arrays):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"params[{i}] is a {type(a).__name__}, not a numpy array")
        dtype = self.arrays[0].dtype
        if dtype not in _DTYPES:
            names = ", ".join(sorted(_DTYPES.values()))
            raise TypeError(f"params must be numpy arrays of {names}, got {dtype}")
        self.dtype, self.name = dtype, _DTYPES[dtype]
        self.state_dtype: np.dtype | None = None
        self.shapes = [p.shape for p in self.arrays]
        self.numels = pack(p.size for p in self.arrays)

    def column(self, name: str, arrays: Arrays | None, written: bool, dtype: np.dtype | None = None) -> bytes:
        """The addresses of ``arrays``, one per param, each checked against its param (and of
        ``dtype``, by default the params')."""
        dtype = self.dtype if dtype is None else dtype
        arrays = _as_list(arrays) or []
        self.held.append(arrays)
        if len(arrays) != len(self.shapes):
            raise ValueError(f"{name}: {len(arrays)} arrays for {len(self.shapes)} params")
        for i, (a, shape) in enumerate(zip(arrays, self.shapes)):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{name}[{i}] is a {type(a).__name__}, not a numpy array")
            if a.dtype != dtype:
                raise TypeError(f"{name}[{i}] has dtype {a.dtype}, but {dtype} is expected here (params: {self.dtype})")
            if a.shape != shape:
                raise ValueError(f"{name}[{i}] has shape {a.shape}, but its param has {shape}")
            if not a.flags.c_contiguous:
                raise ValueError(f"{name}[{i}] is not C-contiguous")
            if written and not a.flags.writeable:
                raise ValueError(f"{name}[{i}] is read-only")
        return pack(a.ctypes.data for a in arrays)

    def state_column(self, name: str, arrays: Arrays | None) -> bytes:
        """Like ``column``, for optimizer state: of the params' dtype, or float32 for float16 or
        bfloat16 params (every state array of a call alike; the first one decides)."""
        arrays = _as_list(arrays) or []
        if self.state_dtype is None:
            first = arrays[0].dtype if arrays and isinstance(arrays[0], np.ndarray) else self.dtype
            self.state_dtype = first if self.name in _HALF and first == np.float32 else self.dtype
        return self.column(name, arrays, True, self.state_dtype)

    def optional_state_column(self, name: str, arrays: Arrays | None) -> bytes | None:
        return None if arrays is None else self.state_column(name, arrays)

    @property
    def state_dtype_name(self) -> str | None:
        """The binding's ``state_dtype``: None where the state is of the params' dtype."""
        return None if self.state_dtype in (None, self.dtype) else "float32"



def _steps(steps: np.ndarray, count: int) -> tuple[str, bytes]:
    steps = _plain(steps)
    if not isinstance(steps, np.ndarray) or steps.dtype not in _STEP_DTYPES or steps.shape != (count,):
        raise ValueError(f"steps must be a float32 or float64 numpy array of shape ({count},)")
    if not (steps.flags.c_contiguous and steps.flags.writeable):
        raise ValueError("steps must be writeable and C-contiguous")
    return _STEP_DTYPES[steps.dtype], pack(steps.ctypes.data + i * steps.itemsize for i in range(count))


def adam_(
    params: Arrays,
    grads: Arrays,
    exp_avgs: Arrays,
    exp_avg_sqs: Arrays,
    steps: np.ndarray,
    *,
    max_exp_avg_sqs: Arrays | None = None,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> None:
    """One Adam (or AdamW, with ``decoupled_weight_decay=True``) step, in place.
    ``max_exp_avg_sqs`` is required exactly when ``amsgrad``."""
    # User code (a generator, a float subclass) runs here, before any address is read.
    grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = map(_as_list, (grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs))
    lr, beta1, beta2, eps, weight_decay = map(float, (lr, betas[0], betas[1], eps, weight_decay))
    with collector_paused():  # from the first size read to the kernel's return (see _collector)
        ps = _Params(params)
        if amsgrad != (max_exp_avg_sqs is not None):
            raise ValueError("max_exp_avg_sqs must be given exactly when amsgrad=True")
        step_dtype, step_addrs = _steps(steps, len(ps.arrays))
        _rsoptim.adam_step(
            ps.name,
            step_dtype,
            ps.numels,
            ps.column("params", ps.arrays, True),
            ps.column("grads", grads, False),
            ps.state_column("exp_avgs", exp_avgs),
            ps.state_column("exp_avg_sqs", exp_avg_sqs),
            ps.optional_state_column("max_exp_avg_sqs", max_exp_avg_sqs),
            step_addrs,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            state_dtype=ps.state_dtype_name,
        )


def sgd_(
    params: Arrays,
    grads: Arrays,
    momentum_buffers: Sequence[np.ndarray | None] | None = None,
    *,
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    state_dtype: np.dtype | type | None = None,
) -> list[np.ndarray | None]:
    """One SGD step, in place. With momentum, a ``None`` buffer (a param's first step) is
    created from the grad, of the params' dtype or, for float16/bfloat16 params,
    ``state_dtype=np.float32``; returns the buffers (to pass to the next step)."""
    # User code (a generator, a float subclass) runs here, before any address is read.
    grads = _as_list(grads)
    lr, momentum, dampening, weight_decay = map(float, (lr, momentum, dampening, weight_decay))
    given: list[np.ndarray | None] | None = None
    if momentum_buffers is not None:
        given = [momentum_buffers] if isinstance(momentum_buffers, np.ndarray) else list(momentum_buffers)
    with collector_paused():  # from the first size read to the kernel's return (see _collector)
        ps = _Params(params)
        if state_dtype is not None:
            if np.dtype(state_dtype) != np.float32 or ps.name not in _HALF:
                raise TypeError(f"state_dtype: float32 for float16/bfloat16 params, or None; not {state_dtype} for {ps.name} params")
            ps.state_dtype = np.dtype(np.float32)
        buffers = [None] * len(ps.arrays) if given is None else given
        new = [b is None for b in buffers]
        if momentum != 0:
            buffers = [np.empty_like(p, dtype=ps.state_dtype or p.dtype) if b is None else b for p, b in zip(ps.arrays, buffers)]
        _rsoptim.sgd_step(
            ps.name,
            ps.numels,
            ps.column("params", ps.arrays, True),
            ps.column("grads", grads, False),
            ps.optional_state_column("momentum_buffers", buffers if momentum != 0 else None),
            new,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            state_dtype=ps.state_dtype_name,
        )
    return buffers


def rmsprop_(
    params: Arrays,
    grads: Arrays,
    square_avgs: Arrays,
    steps: np.ndarray,
    *,
    momentum_buffers: Arrays | None = None,
    grad_avgs: Arrays | None = None,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> None:
    """One RMSprop step, in place. ``momentum_buffers`` are required exactly when
    ``momentum > 0``, ``grad_avgs`` exactly when ``centered``."""
    # User code (a generator, a float subclass) runs here, before any address is read.
    grads, square_avgs, momentum_buffers, grad_avgs = map(_as_list, (grads, square_avgs, momentum_buffers, grad_avgs))
    lr, alpha, eps, weight_decay, momentum = map(float, (lr, alpha, eps, weight_decay, momentum))
    with collector_paused():  # from the first size read to the kernel's return (see _collector)
        ps = _Params(params)
        step_dtype, step_addrs = _steps(steps, len(ps.arrays))
        _rsoptim.rmsprop_step(
            ps.name,
            step_dtype,
            ps.numels,
            ps.column("params", ps.arrays, True),
            ps.column("grads", grads, False),
            ps.state_column("square_avgs", square_avgs),
            ps.optional_state_column("momentum_buffers", momentum_buffers),
            ps.optional_state_column("grad_avgs", grad_avgs),
            step_addrs,
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            maximize=maximize,
            state_dtype=ps.state_dtype_name,
        )


def grad_norms(grads: Arrays, norm_type: float = 2.0) -> np.ndarray:
    """The ``norm_type``-norm of each array (``p > 0`` or ``inf``), as float64."""
    norm_type = float(norm_type)
    with collector_paused():  # from the first size read to the kernel's return (see _collector)
        gs = _Params(grads)
        return np.array(_rsoptim.tensor_norms(gs.name, gs.numels, gs.column("grads", gs.arrays, False), norm_type))


def clip_grad_norm_(grads: Arrays, max_norm: float, norm_type: float = 2.0) -> float:
    """Scales ``grads`` in place by ``min(max_norm / (total + 1e-6), 1)``, where ``total`` is
    the norm of the per-array norms; returns ``total``. The grads must be writeable and must not
    share memory, whether or not the call clips (``grad_norms`` only reads)."""
    gs = _Params(grads)
    # Each array's norm in its own dtype, as torch returns it (float32 for half precision arrays:
    # NumPy has no bfloat16 arithmetic of its own).
    norms = grad_norms(gs.arrays, norm_type).astype(np.float32 if gs.name in _HALF else gs.dtype)
    norm_type = float(norm_type)
    total = float(norms.max() if norm_type == float("inf") else (np.abs(norms) ** norm_type).sum() ** (1.0 / norm_type))
    factor = min(float(max_norm) / (total + 1e-6), 1.0)
    # Called even with factor 1.0 (the kernel then writes nothing): grads that share memory are
    # refused whether or not this call happens to clip.
    with collector_paused():  # (see _collector; `column` checks the shapes again)
        _rsoptim.scale_(gs.name, gs.numels, gs.column("grads", gs.arrays, True), factor)
    return total
