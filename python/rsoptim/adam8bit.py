"""Adam and AdamW with block-wise 8-bit moments (bitsandbytes' ``Adam8bit``/``AdamW8bit``).

Each param of at least ``min_8bit_size`` elements keeps its two moments as one byte per element
plus a float32 scale per block of :data:`QUANT_BLOCK` elements (about 2.03 bytes per element
instead of torch.optim.Adam's 8 for float32 params), under bitsandbytes' state keys:

- ``state1``/``state2``: uint8 codes (the param's shape) of ``exp_avg / absmax1`` and
  ``exp_avg_sq / absmax2``, per block (see :func:`encode_signed`, :func:`encode_unsigned`);
- ``absmax1``/``absmax2``: float32, one per block: the largest ``|exp_avg|`` and ``exp_avg_sq``;
- ``qmap1``/``qmap2``: float32 (256,): the value of each code for ``absmax == 1``, so that a
  reader that decodes as ``qmap[code] * absmax`` (bitsandbytes) reads the state; one pair of
  tensors shared by every param of a device;
- ``step``: torch.optim.Adam's step count.

Each step decodes a block's moments, updates them exactly as torch.optim.Adam's for-loop does in
float32, updates the param as that loop does with the second moment's bias correction folded into
the step size and eps as bitsandbytes does (one division fewer per element; the same update in
exact arithmetic; bfloat16/float16 params: on a float32 copy, the param rounded once when
written), then encodes the moments against the block's new absmax. Smaller params, and float64 ones, keep
torch.optim.Adam's state (float32 for bfloat16/float16 params) under the keys ``state1``,
``state2`` and ``step``, and are stepped as ``rsoptim.Adam(state_dtype=torch.float32)`` steps
them.

CPU params are stepped by the Rust kernels; everything else (other devices, Tensor betas, a
param listed twice) by :func:`reference_step`, the same arithmetic in torch ops (it runs on any
device; on CPU it gives the kernels' numbers where torch's float32 ``sqrt`` is correctly
rounded, which it is not on every machine).
"""

from __future__ import annotations

import math
import threading
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.autograd.graph import increment_version
from torch.optim.adam import adam as _torch_adam  # torch.optim deletes the module name
from torch.optim.optimizer import ParamsT, _get_scalar_dtype, _to_scalar

from . import _rsoptim
from ._columns import pack
from ._distributed import check_grad, is_dtensor, local, same_layout
from ._layout import (
    HALF_DTYPES,
    KERNEL_DTYPES,
    PLAIN_TENSOR_TYPES,
    ZERO_TENSOR_MESSAGE,
    as_caller,
    check_storage,
    fits_storage,
    is_step_count,
    native_reads,
    step_dtype_name,
)
from ._optimizer import (
    NOTHING_WRITTEN,
    Guard,
    _alias,
    _DTYPE_CODES,
    UINT8_CODE,
    EXTENSION_DEFAULTS,
    KernelOptimizer,
    check_clipping,
    check_extensions,
    extension_options,
    read_options,
    plain_state_map,
    scalar,
    step_groups,
    unmoved,
    with_step_hooks,
)
from ._threads import follow_torch

__all__ = [
    "Adam8bit",
    "AdamW8bit",
    "QUANT_BLOCK",
    "encode_signed",
    "decode_signed",
    "encode_unsigned",
    "decode_unsigned",
    "reference_step",
]

#: Elements per quantization block, counted from each tensor's first element (flattened).
QUANT_BLOCK = 256

#: Param dtypes whose large params get 8-bit state (float64 params keep float64 state).
EIGHT_BIT_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16))

_SPARSE_MESSAGE = "Adam does not support sparse gradients, please consider SparseAdam instead"

# ------------------------------------------------------------------------------------------
# The codes: 8-bit floats with 3 mantissa bits, cut from float32 bit patterns, so that encoding
# is integer arithmetic (the Rust kernels do the same on the same bits).
# ------------------------------------------------------------------------------------------

_ONE_BITS = 0x3F800000  # 1.0f: larger magnitudes (and inf, NaN) encode as 1.0
_HALF_CODE_STEP = 0x80000  # half of the 2^20 a code step spans in the bit pattern: round to nearest
_SIGNED_OFFSET = 889  # (889 + q) << 20 are the bits of magnitude code q; q = 127 is 1.0
_UNSIGNED_OFFSET = 761  # (761 + c) << 20 are the bits of code c; c = 255 is 1.0


def _code_steps(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sign of each float32 in ``y`` and its magnitude's bit pattern rounded to whole code
    steps (exponent and top 3 mantissa bits), magnitudes above 1.0 clamped to 1.0."""
    bits = y.contiguous().view(torch.int32)
    magnitude = (bits & 0x7FFFFFFF).clamp_(max=_ONE_BITS)
    return bits < 0, (magnitude + _HALF_CODE_STEP) >> 20


def encode_signed(y: torch.Tensor) -> torch.Tensor:
    """The uint8 codes of float32 values ``y`` in [-1, 1] (first moments over their absmax).

    Magnitude code ``q`` in 0..127 (0: zero), sign-folded so that the codes are monotone:
    0 is -1.0, 127 is -0.0, 128 is +0.0, 255 is 1.0."""
    negative, steps = _code_steps(y)
    q = (steps - _SIGNED_OFFSET).clamp_(min=0)
    return (q ^ torch.where(negative, 0x7F, 0x80)).to(torch.uint8)


def decode_signed(codes: torch.Tensor) -> torch.Tensor:
    """The float32 values of :func:`encode_signed`'s codes (for ``absmax == 1``)."""
    c = codes.to(torch.int32)
    negative = c < 128
    q = c ^ torch.where(negative, 0x7F, 0x80).to(torch.int32)
    magnitude = torch.where(q == 0, 0, (q + _SIGNED_OFFSET) << 20).to(torch.int32).view(torch.float32)
    return torch.where(negative, -magnitude, magnitude)


def encode_unsigned(y: torch.Tensor) -> torch.Tensor:
    """The uint8 codes of float32 values ``y`` in [0, 1] (second moments over their absmax):
    0 is 0.0, 255 is 1.0 (the sign is dropped: second moments are never negative). A positive
    value never encodes as zero (it takes code 1): a zero second moment under a non-zero first
    moment would make an update of ``lr * m / eps``."""
    _, steps = _code_steps(y)
    codes = (steps - _UNSIGNED_OFFSET).clamp_(min=0)
    return torch.maximum(codes, (y > 0).to(codes.dtype)).to(torch.uint8)


def decode_unsigned(codes: torch.Tensor) -> torch.Tensor:
    """The float32 values of :func:`encode_unsigned`'s codes (for ``absmax == 1``)."""
    c = codes.to(torch.int32)
    return torch.where(c == 0, 0, (c + _UNSIGNED_OFFSET) << 20).to(torch.int32).view(torch.float32)


_ALL_CODES = torch.arange(256, dtype=torch.int32)
#: Every code's value for absmax 1: what state['qmap1'] / state['qmap2'] hold.
QMAP_SIGNED = decode_signed(_ALL_CODES)
QMAP_UNSIGNED = decode_unsigned(_ALL_CODES)


def _blocks(flat: torch.Tensor, fill: float, block: int = QUANT_BLOCK) -> torch.Tensor:
    """A flat tensor as rows of ``block`` elements, the last one padded with ``fill``."""
    pad = -flat.numel() % block
    if pad:
        flat = torch.cat([flat, flat.new_full((pad,), fill)])
    return flat.view(-1, block)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block: int = QUANT_BLOCK) -> torch.Tensor:
    """``qmap[code] * absmax`` of each element's block of ``block`` elements (float32
    products), in ``codes``' shape."""
    values = _blocks(qmap.to(codes.device)[codes.reshape(-1).long()], 0.0, block)
    # Zero stays zero whatever the scale (an infinite one: an element whose square overflowed).
    scaled = torch.where(values == 0, values, values * absmax.reshape(-1, 1))
    return scaled.reshape(-1)[: codes.numel()].view(codes.shape)


def quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes (uint8, ``x``'s shape) and per-block absmax (float32) of float32 moments ``x``:
    absmax is the block's largest ``|x|`` (NaN if the block holds one), and each element is
    encoded as ``x * (1 / absmax)`` (0 where absmax is not > 0: zero, NaN)."""
    flat = x.reshape(-1)
    absmax = _blocks(flat.abs() if signed else flat, -math.inf).amax(dim=1)  # amax keeps NaN
    inverse = torch.where(absmax > 0, absmax.reciprocal(), 0.0)
    scaled = (_blocks(flat, 0.0) * inverse.view(-1, 1)).reshape(-1)[: flat.numel()]
    codes = encode_signed(scaled) if signed else encode_unsigned(scaled)
    return codes.view(x.shape), absmax


# ------------------------------------------------------------------------------------------
# The step in torch ops: the reference the kernels match bit for bit, and the path for params
# the kernels do not take (other devices, strided layouts, Tensor betas).
# ------------------------------------------------------------------------------------------


def is_8bit_state(state: dict[str, Any]) -> bool:
    """Whether a param's state holds 8-bit codes (else float32/float64 moments)."""
    state1 = state.get("state1")
    return isinstance(state1, torch.Tensor) and state1.dtype == torch.uint8


def reference_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float,
    weight_decay: float,
    maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    """One Adam/AdamW step of one param, in place, with torch's own for-loop (``foreach=False``).

    ``param`` and ``grad`` are float32 (a float32 copy of a bfloat16/float16 param and its grad)
    or float64. ``state`` is the param's: 8-bit moments are decoded, updated in float32 and
    encoded again against their blocks' new absmax; float32/float64 moments are updated in
    place. ``state['step']`` is incremented.

    With 8-bit moments, torch's loop updates the moments (and the step count) on a copy of the
    param, and :func:`_folded_param_update` the param itself: the same update in exact
    arithmetic, with one division fewer per element."""
    eight_bit = is_8bit_state(state)
    if eight_bit:
        exp_avg = dequantize(state["state1"], state["absmax1"], QMAP_SIGNED)
        exp_avg_sq = dequantize(state["state2"], state["absmax2"], QMAP_UNSIGNED)
    else:
        exp_avg, exp_avg_sq = state["state1"], state["state2"]
    _torch_adam(
        [param.clone() if eight_bit else param],
        [grad],
        [exp_avg],
        [exp_avg_sq],
        [],
        [state["step"]],
        foreach=False,
        capturable=False,
        differentiable=False,
        fused=False,
        grad_scale=None,
        found_inf=None,
        has_complex=False,
        decoupled_weight_decay=decoupled_weight_decay,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
    )
    if eight_bit:
        _folded_param_update(
            param,
            exp_avg,
            exp_avg_sq,
            state["step"],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay if decoupled_weight_decay else 0.0,
        )
        for codes_key, absmax_key, moment, signed in (
            ("state1", "absmax1", exp_avg, True),
            ("state2", "absmax2", exp_avg_sq, False),
        ):
            codes, absmax = quantize(moment, signed)
            state[codes_key].copy_(codes)
            state[absmax_key].copy_(absmax)


def _folded_param_update(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float,
    weight_decay: float,
) -> None:
    """The param's side of an 8-bit step, after the moments' (``step`` already counted):
    decoupled weight decay as torch's for-loop does it, then the update with the second moment's
    bias correction ``c = sqrt(1 - beta2^step)`` folded into the step size and eps, as
    bitsandbytes' 8-bit Adam has it: ``p - (lr * c / bc1) * m / (sqrt(v) + eps * c)``. That is
    torch's ``p - (lr / bc1) * m / (sqrt(v) / c + eps)`` in exact arithmetic, with one division
    per element instead of two: the divisions and the square root are the kernels' dearest
    operations (about a seventh of an 8-bit step in cache). ``c * eps`` and ``c * lr / bc1`` are
    products of Python floats, rounded once to the param's dtype as the ops take them."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    count = float(step)
    correction = float((1 - beta2**count) ** 0.5)
    step_size = float(lr / (1 - beta1**count)) * correction
    param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps * correction), value=-step_size)


# ------------------------------------------------------------------------------------------
# The optimizers
# ------------------------------------------------------------------------------------------

#: The group options beyond torch.optim.Adam's, and the values torch's implementation flags
#: must keep (other values pick torch implementations that have no 8-bit counterpart).
_GROUP_DEFAULTS: dict[str, Any] = {"min_8bit_size": 4096}
_IMPLEMENTATION_DEFAULTS: dict[str, Any] = {
    "foreach": None,
    "fused": None,
    "capturable": False,
    "differentiable": False,
}

_STATE_INIT_LOCK = threading.RLock()


def _check_adam_arguments(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """torch.optim.Adam's constructor checks, with its messages."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    both_floats = isinstance(betas[0], float) and isinstance(betas[1], float)
    both_tensors = isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor)
    if not (both_floats or both_tensors):
        raise ValueError("betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{index}] must be 1-element")


def _check_group_options(group: dict[str, Any], name: str) -> None:
    """Refuses the options 8-bit state cannot honour (a group's, or a constructor's)."""
    if group.get("amsgrad"):
        raise ValueError(f"amsgrad=True is not supported by {name} (use rsoptim.Adam for AMSGrad)")
    for key, default in _IMPLEMENTATION_DEFAULTS.items():
        value = group.get(key, default)
        # foreach=False / fused=False ask for the for-loop, which is what runs here.
        if value != default and not (default is None and value is False):
            raise ValueError(f"{key}={value!r} is not supported by {name} (only {key}={default!r})")
    if group.get("state_dtype") is not None:
        raise ValueError(f"state_dtype is not an option of {name} (its state is 8-bit, or float32 for small params)")
    size = group.get("min_8bit_size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"Invalid min_8bit_size: {size!r} (an int >= 0)")


def _check_param(p: torch.Tensor, name: str) -> None:
    if p.dtype not in (*EIGHT_BIT_DTYPES, torch.float64):
        raise ValueError(f"{name} steps float32, bfloat16, float16 and float64 params, not {p.dtype}")


def _scales_layout(p: torch.Tensor) -> tuple[int, int, list[Any]]:
    """How a DTensor param's block scales are laid out: (blocks of this rank's shard, scales per
    shard, placements). Blocks run over each local shard, so each shard has its own scales: a
    1-D DTensor sharded like the param over the same mesh dims, every shard padded to as many
    scales as the largest shard needs (under torch.chunk's split, the first one), so that the
    DTensor splits evenly and each rank's scales are the leading ones of its shard."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    largest = list(p.shape)
    placements: list[Any] = []
    for dim, placement in enumerate(p.placements):
        if placement.is_shard():
            largest[placement.dim] = -(-largest[placement.dim] // mesh.size(dim))
            placements.append(Shard(0))
        else:
            placements.append(Replicate())
    per_shard = -(-math.prod(largest) // QUANT_BLOCK)
    return -(-local(p).numel() // QUANT_BLOCK), per_shard, placements


def _zero_scales(p: torch.Tensor) -> torch.Tensor:
    """Zero block scales for ``p``: float32, one per block (a DTensor for a DTensor param, see
    ``_scales_layout``)."""
    if not is_dtensor(p):
        return torch.zeros(-(-p.numel() // QUANT_BLOCK), dtype=torch.float32, device=p.device)
    from torch.distributed.tensor import DTensor

    _, per_shard, placements = _scales_layout(p)
    mesh = p.device_mesh
    shards = math.prod(mesh.size(dim) for dim, pl in enumerate(p.placements) if pl.is_shard())
    scales = torch.zeros(per_shard, dtype=torch.float32, device=local(p).device)
    return DTensor.from_local(scales, mesh, placements, run_check=False, shape=(per_shard * shards,), stride=(1,))


def _local_state(p: torch.Tensor, state: dict[str, Any]) -> dict[str, Any] | None:
    """The tensors of ``p``'s state that this rank steps: for a DTensor param, the local shards
    of its codes, moments and master copy (each laid out like the param) and the leading scales
    of its scales' shard; None if any is not laid out so (a state dict loaded from another mesh).
    For a plain param, the state itself."""
    if not is_dtensor(p):
        return state
    blocks, per_shard, placements = _scales_layout(p)
    out = {"step": state.get("step")}
    for key, value in state.items():
        if key in ("step", "qmap1", "qmap2"):
            out[key] = value
        elif key in ("absmax1", "absmax2"):
            if not (is_dtensor(value) and tuple(value.placements) == tuple(placements) and local(value).numel() == per_shard):
                return None
            out[key] = local(value)[:blocks]
        elif same_layout(value, p):
            out[key] = local(value)
        else:
            return None
    return out


def _written_storages(p: torch.Tensor, state: dict[str, Any]) -> set[int]:
    """The storages a step of ``p`` writes (its local shard's and its state tensors', but the
    code tables, which steps only read): params whose written storages another param's step
    also writes are not stepped on copies, which would hide the overlap from the kernels."""
    tensors = [p, *(v for k, v in state.items() if k not in ("qmap1", "qmap2") and isinstance(v, torch.Tensor))]
    return {local(t).untyped_storage().data_ptr() for t in tensors} - {0}


def _local_grad(p: torch.Tensor) -> torch.Tensor:
    """``p``'s grad as its step reads it: the grad itself, or for a DTensor param the local shard
    of its grad laid out like the param (redistributed where it is not, as torch's DTensor ops
    would; ``check_grad`` has refused Partial grads and other meshes). An efficient zero tensor
    (which has no memory) is stepped as the zeros it stands for, as torch.optim's Adam does."""
    grad = p.grad
    if is_dtensor(p):
        if not same_layout(grad, p):
            grad = grad.redistribute(p.device_mesh, p.placements)
        grad = local(grad)
    return grad.clone() if grad._is_zerotensor() else grad


def _like(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a local shard's values) laid out like ``p`` (for ``_write_params``)."""
    if not is_dtensor(p):
        return value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


class _KernelTensors:
    """The buffers one param hands a kernel call, by role, and the strided tensors that were
    replaced by contiguous copies (the written ones are copied back after the call)."""

    def __init__(self, buffers: dict[str, torch.Tensor]):
        self.buffers = buffers
        self.copied: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, role: str, t: Any, dtype: torch.dtype, shape: Any, *, written: bool, may_copy: bool) -> bool:
        """Adds ``t`` if it is a CPU tensor of ``dtype`` and ``shape`` (False if not, or if it
        needs a copy that ``may_copy`` forbids). What is held is a private alias of ``t``
        (``.data``): its sizes and storage stay those checked here whatever code runs later
        (``p.data = ...``).
        Only plain tensors are handed to the kernels: a subclass may report sizes its memory
        does not have (torch's ops, which read the real ones, step it). That its memory holds
        every element, ``step`` checked (``_check_param_and_state``) before anything ran."""
        if type(t) not in PLAIN_TENSOR_TYPES:
            return False
        t = t.data
        if not (t.is_cpu and t.dtype == dtype and t.shape == shape and t.layout == torch.strided):
            return False
        if t.is_contiguous() and not t.is_neg() and not t.is_conj():
            self.buffers[role] = t
            return True
        if not may_copy or (written and (t.is_neg() or t.is_conj())):
            return False
        copy = t.resolve_neg().resolve_conj().contiguous()
        self.buffers[role] = copy
        if written:
            self.copied.append((t, copy))
        return True

    def write_back(self) -> None:
        for original, copy in self.copied:
            original.copy_(copy)


#: The param dtypes `_native_calls` takes (those `_check_param` accepts), and the state roles
#: after each param's param and grad, in the order of its tensors.
_NATIVE_PARAM_DTYPES = frozenset((*EIGHT_BIT_DTYPES, torch.float64))
_EIGHT_BIT_ROLES = ("state1", "state2", "absmax1", "absmax2", "step")
_FLOAT_ROLES = ("state1", "state2", "step")
#: The dtype codes of an 8-bit param's state1, state2, absmax1 and absmax2.
_EIGHT_BIT_STATE_CODES = bytes((UINT8_CODE, UINT8_CODE, _DTYPE_CODES[torch.float32], _DTYPE_CODES[torch.float32]))
_STEP_DTYPES = frozenset((torch.float32, torch.float64))
_EIGHT_BIT_STATE_KEYS = frozenset((*_EIGHT_BIT_ROLES, "qmap1", "qmap2"))
_FLOAT_STATE_KEYS = frozenset(_FLOAT_ROLES)


@dataclass
class _NativeCall:
    """One kernel call that ``Adam8bit._native_calls`` checked: its params, their sizes and
    buffer addresses by role, and the list that holds every tensor whose address it has."""

    eight_bit: bool
    dtype: str
    step_dtype: str
    held: list[Any]
    # The kernel's last check: every tensor checked, its packed address and size.
    guard: Guard | None = None
    params: list[torch.Tensor] = field(default_factory=list)
    numels: list[int] = field(default_factory=list)
    columns: dict[str, list[int]] = field(default_factory=lambda: {role: [] for role in ("param", "grad", *_EIGHT_BIT_ROLES)})


class Adam8bit(KernelOptimizer, torch.optim.Optimizer):
    """``torch.optim.Adam`` with block-wise 8-bit moments (bitsandbytes' ``Adam8bit``).

    Same arguments, defaults and errors as ``torch.optim.Adam``, except: ``amsgrad=True`` is
    refused (8-bit state keeps no running maximum), and ``foreach``, ``fused``, ``capturable``
    and ``differentiable`` are accepted only at their defaults (``foreach=False`` and
    ``fused=False`` too). Params of at least ``min_8bit_size`` elements (float32, bfloat16,
    float16) keep 8-bit moments; smaller ones, and float64 ones, keep torch.optim.Adam's state
    (float32 for half-precision params) under bitsandbytes' keys ``state1``/``state2``.
    ``master_weights``, ``stochastic_rounding`` (bfloat16/float16 params) and ``max_grad_norm``
    are rsoptim.Adam's extensions. See the module's docstring for the state's format.
    """

    _decoupled_default = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        min_8bit_size: int = 4096,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        stochastic_rounding_seed: int | None = None,
        max_grad_norm: float | None = None,
        norm_type: float | str = 2.0,
        error_if_nonfinite: bool = False,
    ) -> None:
        _check_adam_arguments(lr, betas, eps, weight_decay)
        defaults = {
            "lr": lr,
            "betas": tuple(map(_to_scalar, betas)),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
            "min_8bit_size": min_8bit_size,
        }
        _check_group_options(defaults, type(self).__name__)
        extensions = extension_options(None, master_weights, stochastic_rounding, stochastic_rounding_seed)
        check_clipping(max_grad_norm, norm_type, error_if_nonfinite)
        super().__init__(params, defaults)
        self._init_extensions(**extensions)
        self._init_clipping(max_grad_norm, norm_type, error_if_nonfinite)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in {**_IMPLEMENTATION_DEFAULTS, **_GROUP_DEFAULTS}.items():
                group.setdefault(key, self.defaults.get(key, value))
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", self._decoupled_default)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group_options(group, type(self).__name__)
            for p in group["params"]:
                _check_param(p, type(self).__name__)
        except ValueError:
            self.param_groups.pop()
            raise

    # -- state ------------------------------------------------------------------------------

    def _qmaps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The code tables of ``device``: one pair of tensors shared by all its params' state."""
        tables = self.__dict__.setdefault("_rsoptim_qmaps", {})
        if device not in tables:
            tables[device] = (QMAP_SIGNED.to(device, copy=True), QMAP_UNSIGNED.to(device, copy=True))
        return tables[device]

    def _gets_8bit_state(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return p.dtype in EIGHT_BIT_DTYPES and p.numel() >= group["min_8bit_size"]

    def _moments_dtype(self, p: torch.Tensor) -> torch.dtype:
        """The dtype of a small param's moments: float32 for half-precision params."""
        return torch.float32 if p.dtype in HALF_DTYPES else p.dtype

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
        if self._gets_8bit_state(p, group):
            for key in ("state1", "state2"):
                if is_dtensor(p):  # sharded like the param
                    state[key] = torch.zeros_like(p, dtype=torch.uint8)
                else:  # contiguous whatever the param's layout: blocks are runs of the flattened tensor
                    state[key] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
            for key in ("absmax1", "absmax2"):
                state[key] = _zero_scales(p)
            state["qmap1"], state["qmap2"] = self._qmaps(local(p).device)
        else:
            dtype = self._moments_dtype(p)
            for key in ("state1", "state2"):
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    # -- step -------------------------------------------------------------------------------

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return bool(group.get("decoupled_weight_decay", self._decoupled_default))

    def _group_runs_on_kernel(self, group: dict[str, Any]) -> bool:
        # Tensor betas make torch compute the bias corrections as tensors; a Tensor lr of
        # another dtype than float32/float64 rounds through it: torch's ops step those groups.
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.dtype not in (torch.float32, torch.float64):
            return False
        return not any(isinstance(b, torch.Tensor) for b in group["betas"])

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
        name = type(self).__name__
        groups = step_groups(self.param_groups)
        for group in groups:
            _check_group_options(group, name)  # a group may have been edited
            self._complete_extensions(group)
        # Before anything is checked: the norm runs as the caller's clip_grad_norm_ would, so a
        # caller's mode may run code in it.
        grad_scale = self._grad_scale(groups)
        # The hyperparameters are read after it (the last code of the caller's before the
        # checks): reading one may run code (a float subclass, a Tensor lr), and nothing may
        # run between the checks below and the kernels. The kernels read them from here only
        # (caller code run later, a mode making state, may edit the group).
        options, options_plain = read_options(groups)
        hypers = list(map(self._kernel_hyperparameters, options))
        # Everything is checked before anything is stepped: a group whose tensors all pass the
        # one native check of `_native_calls` needs no other; the others are checked param by
        # param.
        work = []
        for group, hyper in zip(groups, hypers):
            params = [p for p in group["params"] if p.grad is not None]
            calls = self._native_calls(group, params)
            if calls is None:
                self._check_params(group, name)
            work.append((group, params, hyper, calls))
        # Whether checking the groups could run any code of the caller's: not where every group
        # took the native check (plain dicts, states and params), has plain options and its
        # params in a list (iterating a subclass of list may run code), and the state map
        # and its dicts have keys whose lookups run no code (see plain_state_map).
        quiet = (
            options_plain
            and all(calls is not None and type(group["params"]) is list for group, _, _, calls in work)
            and plain_state_map(self.state)
        )
        torch_ran = False
        with torch.no_grad():
            for group, params, hyper, calls in work:
                if calls is not None and (torch_ran or (len(work) > 1 and not quiet)):
                    # Code may have run since this group was checked (the checks of the other
                    # groups, torch's ops stepping one before it, as the caller would run them):
                    # its tensors are read again, right before its kernels.
                    calls = self._native_calls(group, params)
                    if calls is None:
                        self._check_params(group, name)
                if calls is not None:
                    refused = [call for call in calls if not self._run_native_call(call, grad_scale, hyper)]
                    if refused:
                        # Params that share memory (refused before anything was written): as on
                        # the per-param path, torch's ops step them after the kernels.
                        position = {id(p): i for i, p in enumerate(params)}
                        shared = sorted((p for call in refused for p in call.params), key=lambda p: position[id(p)])
                        self._step_params(group, shared, [p.grad for p in shared], grad_scale, hyper)
                        torch_ran = True
                elif params:
                    self._step_params(group, params, [_local_grad(p) for p in params], grad_scale, hyper)
                    torch_ran = True
        if any(g.get("master_weights") for g in groups):
            self._record_master_versions(groups)

    def _check_params(self, group: dict[str, Any], name: str) -> None:
        for index, p in enumerate(group["params"]):
            if p.grad is not None:
                self._check_param_and_state(p, index, group, name)

    def _native_calls(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[_NativeCall] | None:
        """The group's kernel calls, its tensors checked by one native read (as a step plan's
        are, see ``_optimizer._Plan``: plain contiguous CPU tensors of the dtypes and sizes the
        kernels take, each inside its storage, without a negation bit), or None where any param
        needs more: a first step (no state yet), master copies or stochastic rounding, a param
        listed twice, a DTensor or other subclass, a copy of a strided tensor, or whatever the
        per-param checks would refuse. Those go through the checks and ``_step_params``.

        Every step checks afresh (nothing is kept from one step to the next). Measured on 148
        params of 8,192 elements, a step took 36-44 us per param with the per-param checks and
        9-15 us with this one, the kernels included (runs on a noisy 2-core machine)."""
        # A group, state map or state of a subclass of dict may run code when read (as may a
        # param subclass when hashed): between this check and the kernels, nothing may.
        if not params or type(group) is not dict or type(self.state) is not defaultdict:
            return None
        if not self._group_runs_on_kernel(group):
            return None
        if group.get("master_weights") or group.get("stochastic_rounding") or len(set(map(id, params))) != len(params):
            return None
        eight_bit_kernel = hasattr(_rsoptim, "adam8bit_step")  # (the tests take it away)
        count = len(params)
        grads = [p.grad for p in params]
        tensors: list[Any] = [*params, *grads]
        numels, dtypes = [0] * (2 * count), bytearray(2 * count)
        shape_of = [*range(count), *range(count)]  # (a grad has its param's sizes)
        kinds = []
        for i, p in enumerate(params):
            if type(p) not in PLAIN_TENSOR_TYPES:  # (before `self.state` hashes it)
                return None
            state = self.state.get(p)
            if type(state) is not dict or not state or p.dtype not in _NATIVE_PARAM_DTYPES or p.is_inference():
                return None
            step, eight_bit = state.get("step"), is_8bit_state(state)
            if not state.keys() <= (_EIGHT_BIT_STATE_KEYS if eight_bit else _FLOAT_STATE_KEYS):
                return None  # (the per-param checks look at every state tensor, used or not)
            # (Only plain tensors are read: a subclass's own attributes may run code.)
            step_dtype = step.dtype if type(step) in PLAIN_TENSOR_TYPES else None
            numel = p.numel()
            if eight_bit and (p.dtype not in EIGHT_BIT_DTYPES or not eight_bit_kernel):
                return None
            if step_dtype not in _STEP_DTYPES or numel == 0:
                return None  # (an empty param has no address to hand over)
            code = _DTYPE_CODES[p.dtype]
            numels[i] = numels[count + i] = numel
            dtypes[i] = dtypes[count + i] = code
            if eight_bit:
                blocks = -(-numel // QUANT_BLOCK)
                absmax1, absmax2 = state.get("absmax1"), state.get("absmax2")
                if type(absmax1) not in PLAIN_TENSOR_TYPES or type(absmax2) not in PLAIN_TENSOR_TYPES:
                    return None
                if absmax1.shape != (blocks,) or absmax2.shape != (blocks,):
                    return None  # (the per-param checks say what is wrong)
                tensors += [state.get("state1"), state.get("state2"), absmax1, absmax2, step]
                numels += [numel, numel, blocks, blocks, 1]
                dtypes += _EIGHT_BIT_STATE_CODES
                shape_of += [i, i, len(shape_of) + 2, len(shape_of) + 3, len(shape_of) + 4]
            else:
                moments = _DTYPE_CODES[self._moments_dtype(p)]
                tensors += [state.get("state1"), state.get("state2"), step]
                numels += [numel, numel, 1]
                dtypes.extend((moments, moments))
                shape_of += [i, i, len(shape_of) + 2]
            dtypes.append(_DTYPE_CODES[step_dtype])
            kinds.append((eight_bit, KERNEL_DTYPES[p.dtype], step_dtype))
        # The storages are held with the tensors (as the step plans hold theirs).
        storages: list[Any] = []
        packed_numels = pack(numels)
        addresses = _rsoptim.plan_addresses(tensors, packed_numels, bytes(dtypes), pack(shape_of), storages)
        if addresses is None:
            return None
        held = [tensors, storages]
        words = array("Q", addresses)
        calls: dict[tuple[bool, str, torch.dtype], _NativeCall] = {}
        at = 2 * count  # where each param's state tensors start
        for i, (p, kind) in enumerate(zip(params, kinds)):
            roles = _EIGHT_BIT_ROLES if kind[0] else _FLOAT_ROLES
            call = calls.get(kind)
            if call is None:
                call = calls[kind] = _NativeCall(kind[0], kind[1], KERNEL_DTYPES[kind[2]], held=held, guard=(tensors, addresses, packed_numels))
            call.params.append(p)
            call.numels.append(numels[i])
            call.columns["param"].append(words[i])
            call.columns["grad"].append(words[count + i])
            for offset, role in enumerate(roles):
                call.columns[role].append(words[at + offset])
            at += len(roles)
        return list(calls.values())

    def _run_native_call(self, call: _NativeCall, grad_scale: float, hyper: dict[str, Any]) -> bool:
        """Runs ``call`` (see ``_native_calls``); False if the kernel refused buffers that share
        memory, or memory that moved since the checks (it wrote nothing)."""
        columns = {role: pack(words) for role, words in call.columns.items()}
        try:
            self._run_kernel(
                call.eight_bit, call.dtype, call.step_dtype, call.params, columns.__getitem__, pack(call.numels), grad_scale,
                hyper, {}, guard=call.guard,
            )  # fmt: skip
        except NOTHING_WRITTEN:
            return False
        increment_version(call.params)  # as torch's in-place ops do
        return True

    def _kernel_hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        """The hyperparameters of a group (a ``plain_hyperparameters`` copy) as the kernels take
        them (plain floats and bools), and its extension options as ``extensions``."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        return {
            "lr": scalar(lr),
            "beta1": scalar(beta1),
            "beta2": scalar(beta2),
            "eps": scalar(group["eps"]),
            "weight_decay": scalar(group["weight_decay"]),
            "maximize": bool(group["maximize"]),
            "decoupled_weight_decay": self._decoupled(group),
            # torch's for-loop divides a float32 Tensor lr by the bias correction in float32.
            "lr_is_f32_tensor": isinstance(lr, torch.Tensor) and lr.dtype == torch.float32,
            "extensions": {key: group.get(key, default) for key, default in EXTENSION_DEFAULTS.items()},
        }

    def _check_param_and_state(self, p: torch.Tensor, index: int, group: dict[str, Any], name: str) -> None:
        """Refuses, before anything is stepped, what no step of ``p`` may take: torch's errors
        (sparse, inference or internally overlapping params), grads unlike their params, memory
        a storage resized in place no longer holds, and 8-bit state of another layout."""
        _check_param(p, name)
        self._check_extensions_apply(p, group)
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(_SPARSE_MESSAGE)
        check_grad(p, grad, index)  # a DTensor param's grad: a DTensor on its mesh, not Partial
        if grad.dtype != p.dtype or grad.shape != p.shape or grad.device != p.device:
            raise ValueError(
                f"{name}: a grad must match its param's dtype, shape and device: grad "
                f"{grad.dtype} {tuple(grad.shape)} on {grad.device} for a param "
                f"{p.dtype} {tuple(p.shape)} on {p.device}"
            )
        param = local(p)
        if param.is_inference():
            raise RuntimeError("Inplace update to inference tensor outside InferenceMode is not allowed.")
        if param.numel() > 1 and torch._debug_has_internal_overlap(param) == 1:
            raise RuntimeError(
                "unsupported operation: some elements of the input tensor and the written-to tensor refer to a "
                "single memory location. Please clone() the tensor before performing the operation."
            )
        state = self.state.get(p, {})
        for role, t in (("a param", p), ("a grad", grad), *state.items()):
            # (The code tables are read by no step.)
            if isinstance(t, torch.Tensor) and role not in ("qmap1", "qmap2"):
                t = local(t)
                if role != "a grad" and t._is_zerotensor():
                    # (An efficient zero tensor has no memory; a zero grad is stepped as zeros.)
                    raise RuntimeError(ZERO_TENSOR_MESSAGE)
                if t.is_cpu and not fits_storage(t):
                    check_storage(t, role if role in ("a param", "a grad") else f"state[{role!r}]")
        if is_8bit_state(state):
            self._check_8bit_state(p, state, name)

    def _check_8bit_state(self, p: torch.Tensor, state: dict[str, Any], name: str) -> None:
        """8-bit state must be laid out for ``p``: uint8 codes of its (local) shape, one float32
        scale per block, for a float32/bfloat16/float16 param."""
        if p.dtype not in EIGHT_BIT_DTYPES:
            raise ValueError(f"{name}: a {p.dtype} param cannot keep 8-bit state (float32, bfloat16, float16 params can)")
        shard = _local_state(p, state)
        if shard is None:
            return  # a DTensor state of another layout: the step says so
        param = local(p)
        blocks = -(-param.numel() // QUANT_BLOCK)
        for key, dtype, shape in (
            ("state1", torch.uint8, param.shape),
            ("state2", torch.uint8, param.shape),
            ("absmax1", torch.float32, (blocks,)),
            ("absmax2", torch.float32, (blocks,)),
        ):
            t = shard.get(key)
            if not (isinstance(t, torch.Tensor) and t.dtype == dtype and t.shape == shape):
                found = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                # (A RuntimeError, as torch's ops raise for state of the wrong size.)
                raise RuntimeError(
                    f"{name}: state[{key!r}] of a param of shape {tuple(param.shape)} must be {dtype} of shape "
                    f"{tuple(shape)}, not {found}: the size of the state must match the size of its param"
                )

    def _step_params(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        grad_scale: float,
        hyper: dict[str, Any],
    ) -> None:
        """Steps one group's params with grads (``grads``: each one's, the local shard for a
        DTensor): one kernel call per kind of state, dtype and step dtype, then the rest with
        torch's ops, in the group's order. A DTensor param is stepped by its local shard."""
        kernel_ok = self._group_runs_on_kernel(group)
        # A param listed twice is stepped twice, one step after the other; params that share
        # memory are not copied (their copies would hide the overlap from the kernel's check).
        repeated = {i for i, count in Counter(map(id, params)).items() if count > 1}
        for p in params:
            # No thread stepping this optimizer sees a state half made; it is made as torch.optim
            # makes it (a subclass param's of its subclass), and checked afresh below.
            with _STATE_INIT_LOCK, as_caller():
                state = self.state[p]
                if len(state) == 0:
                    self._make_state(p, group, state)
        # Read before anything is checked: reading the group's params may run code.
        streams = dict(zip(map(id, params), self._streams(group, params))) if group.get("stochastic_rounding") else {}
        storages = [_written_storages(p, self.state[p]) for p in params]
        counts = Counter(s for distinct in storages for s in distinct)
        calls: dict[tuple[bool, str, str], list[tuple[torch.Tensor, _KernelTensors]]] = {}
        others = []
        for p, grad, written in zip(params, grads, storages):
            state = self.state[p]
            tensors = None
            if kernel_ok and id(p) not in repeated:
                may_copy = all(counts[s] == 1 for s in written)
                tensors = self._kernel_tensors(p, grad, group, state, may_copy=may_copy)
            if tensors is None:
                others.append((p, grad))
            else:
                key = (is_8bit_state(state), KERNEL_DTYPES[p.dtype], step_dtype_name(tensors.buffers["step"]))
                calls.setdefault(key, []).append((p, tensors))
        for (eight_bit, dtype, step_dtype), entries in calls.items():
            # The sizes of the buffers whose addresses are handed over (a DTensor's local shard).
            numels = pack(tensors.buffers["param"].numel() for _, tensors in entries)
            # (`entries` holds every tensor whose address the call takes until it returns.)
            buffers = [(role, t) for _, tensors in entries for role, t in tensors.buffers.items()]
            # Each buffer's address, read once: the columns and the kernel's last check take it.
            address = {id(t): t.data_ptr() for _, t in buffers}

            def column(role: str) -> bytes:
                return pack(address[id(tensors.buffers[role])] for _, tensors in entries)  # noqa: B023

            guard = ([t for _, t in buffers], pack(address[id(t)] for _, t in buffers), pack(t.numel() for _, t in buffers))
            try:
                self._run_kernel(
                    eight_bit, dtype, step_dtype, [p for p, _ in entries], column, numels, grad_scale, hyper, streams,
                    buffers, guard=guard,
                )  # fmt: skip
            except NOTHING_WRITTEN:
                # Params that share memory (overlapping views): torch's ops step them one after
                # another, as torch.optim would. The kernel wrote nothing. (So they do where
                # memory moved after the checks: see `unmoved`.)
                others.extend((p, tensors.buffers["grad"]) for p, tensors in entries)
                continue
            for _, tensors in entries:
                tensors.write_back()
            stepped = [p for p, _ in entries]
            increment_version(stepped)  # as torch's in-place ops do
            if any(map(is_dtensor, stepped)):
                increment_version([local(p) for p in stepped])
        if others:
            position = {id(p): i for i, p in reversed(list(enumerate(params)))}
            others.sort(key=lambda entry: position[id(entry[0])])
            self._reference_params(group, others, grad_scale)

    def _kernel_tensors(
        self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any], *, may_copy: bool
    ) -> _KernelTensors | None:
        """The tensors a kernel steps ``p`` with (its local shard, for a DTensor), or None where
        torch's ops must step it. All must be CPU tensors of the dtypes and sizes the kernels
        expect; strided ones are passed as contiguous copies (written back after the call where
        the kernel writes them; with ``may_copy`` False, params that share memory with others,
        torch's ops step them)."""
        eight_bit = is_8bit_state(state)
        if eight_bit and not hasattr(_rsoptim, "adam8bit_step"):
            return None
        if p.dtype not in KERNEL_DTYPES or not is_step_count(state.get("step")):
            return None
        if self._uses_master(p, group):
            self._master_copy(p, group, state)  # made, or refreshed from a param written since
        shard = _local_state(p, state)
        param = local(p)
        if shard is None or param.numel() == 0:  # (an empty shard has no address to hand over)
            return None
        if eight_bit:
            blocks = -(-param.numel() // QUANT_BLOCK)
            wanted = {"state1": torch.uint8, "state2": torch.uint8, "absmax1": torch.float32, "absmax2": torch.float32}
        else:
            wanted = {"state1": self._moments_dtype(p), "state2": self._moments_dtype(p)}
        if self._uses_master(p, group):
            wanted["master_param"] = torch.float32
        # The step count is written too: as every other buffer here, a private alias of it, so
        # that another thread giving the state's tensor other memory frees nothing the kernel
        # writes, and its dtype stays the one checked.
        step = _alias(shard["step"])
        if not is_step_count(step):
            return None
        tensors = _KernelTensors({"step": step})
        # The grad is only read: a strided or lazily negated one is passed as a dense copy.
        if not tensors.add("grad", grad, p.dtype, param.shape, written=False, may_copy=True):
            return None
        if not tensors.add("param", param, p.dtype, param.shape, written=True, may_copy=may_copy):
            return None
        for key, dtype in wanted.items():
            shape = (blocks,) if key.startswith("absmax") else param.shape
            if not tensors.add(key, shard.get(key), dtype, shape, written=True, may_copy=may_copy):
                return None
        return tensors

    def _run_kernel(
        self,
        eight_bit: bool,
        dtype: str,
        step_dtype: str,
        params: list[torch.Tensor],
        column: Callable[[str], bytes],
        numels: bytes,
        grad_scale: float,
        hyper: dict[str, Any],
        streams: dict[int, int],
        buffers: list[tuple[str, torch.Tensor]] | tuple[()] = (),
        *,
        guard: Guard | None,
    ) -> None:
        """One Rust call over ``params`` (of one dtype and kind of state), their buffers'
        addresses by role from ``column`` and their sizes in ``numels``; the caller holds every
        tensor whose address the call takes until it returns. ``hyper`` is the group's
        hyperparameters as ``_kernel_hyperparameters`` read them, ``streams`` each param's
        rounding stream (by id, read before the checks). ``buffers`` (by role) are checked
        against their storages right before the call: code run since the params' checks (a
        caller's mode making their state, a dict subclass's group) may have shrunk one."""
        hyper = dict(hyper)  # (read by step() before anything was checked: no user code runs now)
        lr_is_f32_tensor = hyper.pop("lr_is_f32_tensor")
        extensions = hyper.pop("extensions")  # (not the group's: code run since may have edited it)
        seed = self._rounding_seed(params[0], extensions)
        options = {
            **hyper,
            "master_params": column("master_param") if self._uses_master(params[0], extensions) else None,
            "stochastic_rounding_seed": seed,
            "streams": pack(streams[id(p)] for p in params) if seed is not None else None,
            "grad_scale": grad_scale,
            **unmoved(guard),
        }
        for role, t in buffers:  # (plain tensors' private aliases: reading them runs no code)
            check_storage(t, "a param" if role == "param" else "a grad" if role == "grad" else f"state[{role!r}]")
        steps = column("step")
        if eight_bit:
            # The 8-bit step computes in float32 for every param dtype (see reference_step).
            _rsoptim.adam8bit_step(
                dtype, step_dtype, numels, column("param"), column("grad"), column("state1"), column("state2"),
                column("absmax1"), column("absmax2"), steps, lr_in_f32=lr_is_f32_tensor, **options,
            )  # fmt: skip
        else:
            # Small params: rsoptim.Adam(state_dtype=torch.float32)'s step (for half-precision
            # params, the numerics of torch's fused kernel, which reads a Tensor lr as a double).
            _rsoptim.adam_step(
                dtype, step_dtype, numels, column("param"), column("grad"), column("state1"), column("state2"),
                None, steps, amsgrad=False, lr_in_f32=lr_is_f32_tensor and dtype in ("float32", "float64"),
                state_dtype="float32" if dtype in ("bfloat16", "float16") else None, **options,
            )  # fmt: skip

    def _reference_params(
        self, group: dict[str, Any], entries: list[tuple[torch.Tensor, torch.Tensor]], grad_scale: float
    ) -> None:
        """Steps each (param, grad) of ``entries`` one after another with :func:`reference_step`
        (torch's ops; a DTensor param by its local shard and its state's). Half-precision params
        are stepped as float32 copies (their master copies, if any), then written as the kernels
        write them (to nearest, or stochastically with the same bits)."""
        beta1, beta2 = group["betas"]
        options = {
            "lr": group["lr"],
            "beta1": beta1,
            "beta2": beta2,
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "maximize": group["maximize"],
            "decoupled_weight_decay": self._decoupled(group),
        }
        for p, grad in entries:
            state = self.state[p]
            master = self._master_copy(p, group, state) if p.dtype in HALF_DTYPES else None
            shard = _local_state(p, state)
            if shard is None:
                raise RuntimeError(
                    f"{type(self).__name__}: the state of a DTensor param of shape {tuple(p.shape)} is not laid out "
                    f"like it (placements {tuple(p.placements)} on {p.device_mesh}): was it loaded from another mesh?"
                )
            # torch's ops, as the caller would run them; the params are then written (below)
            # with what is read afresh.
            with as_caller():
                # Clipping: the grad as clip_grad_norm_ would have left it (each product rounded
                # once).
                grad = grad if grad_scale == 1.0 else grad * grad_scale
                if p.dtype in HALF_DTYPES:
                    value = local(master) if master is not None else local(p).detach().float()
                    reference_step(value, grad.float(), shard, **options)
                else:
                    reference_step(local(p), grad, shard, **options)
            if p.dtype in HALF_DTYPES:
                self._write_params(group, [p], [master if master is not None else _like(p, value)])
            elif is_dtensor(p):
                increment_version(p)

    # -- state dicts ------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict of this optimizer, of rsoptim.Adam/torch.optim.Adam (its moments
        quantized as a step would store them) or of bitsandbytes (decoded with its ``qmap``s and
        encoded with ours). torch's implementation flags (``foreach``, ``fused``,
        ``capturable``) and rsoptim.Adam's ``state_dtype`` are dropped; ``amsgrad=True`` and
        ``differentiable=True`` raise ValueError, before anything changes."""
        name = type(self).__name__
        state_dict = _unnested(state_dict)
        for saved_group in state_dict["param_groups"]:
            if saved_group.get("differentiable"):
                raise ValueError(f"{name} cannot load a state dict with differentiable=True")
            check_extensions(saved_group)
            _check_group_options({**saved_group, **_IMPLEMENTATION_DEFAULTS, "state_dtype": None}, name)
        # Every param's saved state is checked before torch's load replaces anything.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for p, saved_id in zip(params, saved_ids):
            saved = state_dict["state"].get(saved_id)
            if saved:
                _check_saved_state(p, saved, name)
        torch.optim.Optimizer.load_state_dict(self, state_dict)
        # New master copies: each is checked against its param at the next step.
        self.__dict__.pop("_rsoptim_master_versions", None)
        for group in self.param_groups:
            group.pop("state_dtype", None)
            group.update(_IMPLEMENTATION_DEFAULTS)
            for key, value in _GROUP_DEFAULTS.items():
                group.setdefault(key, self.defaults.get(key, value))
            self._complete_extensions(group)
        # torch cast every floating state tensor to its param's dtype (and the codes with them):
        # each param's state is rebuilt from the saved tensors themselves.
        saved_ids = iter([i for g in state_dict["param_groups"] for i in g["params"]])
        for group in self.param_groups:
            for p in group["params"]:
                saved = state_dict["state"].get(next(saved_ids))
                if saved:
                    self.state[p] = self._state_from_saved(p, group, saved, self.state[p])

    def _state_from_saved(
        self, p: torch.Tensor, group: dict[str, Any], saved: dict[str, Any], loaded: dict[str, Any]
    ) -> dict[str, Any]:
        """A param's state from its saved state (``loaded``: torch's cast of it, whose entries
        this optimizer does not know are kept)."""
        device = p.device
        replaced = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
        state = {k: v for k, v in loaded.items() if k not in replaced}
        step = saved.get("step", 0)  # (bitsandbytes counts steps in a Python int)
        if isinstance(step, torch.Tensor):
            state["step"] = step.clone()
        else:
            state["step"] = torch.tensor(float(step), dtype=_get_scalar_dtype())
        if "exp_avg" in saved:  # torch.optim.Adam's layout
            eight_bit = self._gets_8bit_state(p, group)
            self._set_moments(p, state, saved["exp_avg"], saved["exp_avg_sq"], eight_bit=eight_bit)
        elif saved["state1"].dtype == torch.uint8:
            qmap1, qmap2 = self._qmaps(device)
            ours = _same_table(saved.get("qmap1"), qmap1) and _same_table(saved.get("qmap2"), qmap2)
            # (A DTensor's state is this optimizer's own: blocks of 256 over each local shard.)
            block = QUANT_BLOCK if is_dtensor(p) else _saved_block(p.numel(), saved)
            if ours and block == QUANT_BLOCK and self._gets_8bit_state(p, group):
                # Our codes: kept as they are (a resumed run is bitwise an uninterrupted one).
                for key in ("state1", "state2"):
                    state[key] = saved[key].to(device, copy=True)
                for key in ("absmax1", "absmax2"):
                    state[key] = saved[key].to(device=device, dtype=torch.float32, copy=True)
                state["qmap1"], state["qmap2"] = qmap1, qmap2
            else:
                # Another code table or block size (bitsandbytes'), or a param that keeps plain
                # moments now (a float64 one, or one below min_8bit_size): decoded with its own
                # table and blocks, then stored as this param keeps its state.
                m, v = (
                    dequantize(saved[codes].to(device), saved[absmax].to(device).float(), saved[qmap].float(), block)
                    for codes, absmax, qmap in (("state1", "absmax1", "qmap1"), ("state2", "absmax2", "qmap2"))
                )
                self._set_moments(p, state, m, v, eight_bit=self._gets_8bit_state(p, group))
        else:  # float32 (float64) moments of a small param
            self._set_moments(p, state, saved["state1"], saved["state2"], eight_bit=False)
        master = saved.get("master_param")
        if isinstance(master, torch.Tensor) and master.dtype == torch.float32 and master.shape == p.shape:
            state["master_param"] = master.to(device, copy=True)
        # (Otherwise the next step makes a master copy from the param, where it uses one.)
        return state

    def _set_moments(
        self, p: torch.Tensor, state: dict[str, Any], m: torch.Tensor, v: torch.Tensor, *, eight_bit: bool
    ) -> None:
        """Stores moments ``m``, ``v`` in ``state``, as 8-bit codes or as plain moments."""
        if eight_bit:
            for key, moment, signed in (("1", m, True), ("2", v, False)):
                moment = moment.to(device=p.device, dtype=torch.float32).reshape(p.shape)
                state["state" + key], state["absmax" + key] = quantize(moment, signed)
            state["qmap1"], state["qmap2"] = self._qmaps(p.device)
        else:
            dtype = self._moments_dtype(p)
            state["state1"] = m.to(device=p.device, dtype=dtype, copy=True)
            state["state2"] = v.to(device=p.device, dtype=dtype, copy=True)
            for key in ("absmax1", "absmax2", "qmap1", "qmap2"):
                state.pop(key, None)


#: Where bitsandbytes (>= 0.49.2) nests the tensors of a param's state that it does not cast.
_BITSANDBYTES_NESTED_KEY = "__bnb_optimizer_quant_state__"


def _unnested(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with each param state's bitsandbytes-nested entries moved up beside
    ``step`` (a shallow copy where there are any; the caller's dict is left as it is)."""
    if not any(_BITSANDBYTES_NESTED_KEY in saved for saved in state_dict["state"].values()):
        return state_dict
    state = {}
    for index, saved in state_dict["state"].items():
        nested = saved.get(_BITSANDBYTES_NESTED_KEY, {})
        state[index] = {**{k: v for k, v in saved.items() if k != _BITSANDBYTES_NESTED_KEY}, **nested}
    return {**state_dict, "state": state}


def _saved_block(numel: int, saved: dict[str, Any]) -> int:
    """The block size of saved 8-bit state, read off its number of scales: 256, or 2048
    (bitsandbytes before 0.44)."""
    scales = saved["absmax1"].numel()
    for block in (QUANT_BLOCK, 2048):
        if scales == -(-numel // block) and saved["absmax2"].numel() == scales:
            return block
    raise ValueError(
        f"8-bit state of a param of {numel} elements has {scales} and {saved['absmax2'].numel()} scales: "
        f"neither one per {QUANT_BLOCK} elements nor one per 2048 (bitsandbytes before 0.44)"
    )


def _check_saved_state(p: torch.Tensor, saved: dict[str, Any], name: str) -> None:
    """Refuses a param's saved state that cannot be loaded for ``p``, before anything is loaded."""
    numel = local(p).numel()  # (a DTensor's state is checked shard by shard)

    if "exp_avg" in saved:
        for key in ("exp_avg", "exp_avg_sq"):
            t = saved.get(key)
            if not (isinstance(t, torch.Tensor) and t.is_floating_point() and local(t).numel() == numel):
                raise ValueError(f"{name}: saved state[{key!r}] is not a floating tensor of the param's {numel} elements")
        return
    state1, state2 = saved.get("state1"), saved.get("state2")
    if not (isinstance(state1, torch.Tensor) and isinstance(state2, torch.Tensor)):
        raise ValueError(
            f"{name} cannot load a param state with keys {sorted(saved)}: neither torch.optim.Adam's "
            "(exp_avg, exp_avg_sq) nor its own (state1, state2)"
        )
    counts = local(state1).numel(), local(state2).numel()
    if counts != (numel, numel):
        raise ValueError(f"{name}: saved state1/state2 have {counts[0]}/{counts[1]} elements, the param {numel}")
    if state1.is_floating_point() and state2.is_floating_point():
        return  # plain moments (a small param's)
    if not (state1.dtype == torch.uint8 and state2.dtype == torch.uint8):
        raise ValueError(f"{name}: saved 8-bit codes must be uint8, not {state1.dtype}/{state2.dtype}")
    for key in ("qmap1", "qmap2", "absmax1", "absmax2"):
        t = saved.get(key)
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            raise ValueError(f"{name}: saved 8-bit state has no floating {key!r} tensor")
    for key in ("qmap1", "qmap2"):
        if saved[key].numel() != 256:
            raise ValueError(f"{name}: saved {key!r} has {saved[key].numel()} entries, not one per code (256)")
    if not is_dtensor(p):
        _saved_block(numel, saved)


def _same_table(saved: Any, table: torch.Tensor) -> bool:
    return (
        isinstance(saved, torch.Tensor)
        and saved.dtype == table.dtype
        and saved.shape == table.shape
        and torch.equal(saved.to(table.device), table)
    )


class AdamW8bit(Adam8bit):
    """``torch.optim.AdamW`` (decoupled weight decay) with block-wise 8-bit moments
    (bitsandbytes' ``AdamW8bit``). See :class:`Adam8bit`."""

    _decoupled_default = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        min_8bit_size: int = 4096,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        stochastic_rounding_seed: int | None = None,
        max_grad_norm: float | None = None,
        norm_type: float | str = 2.0,
        error_if_nonfinite: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            min_8bit_size=min_8bit_size,
            master_weights=master_weights,
            stochastic_rounding=stochastic_rounding,
            stochastic_rounding_seed=stochastic_rounding_seed,
            max_grad_norm=max_grad_norm,
            norm_type=norm_type,
            error_if_nonfinite=error_if_nonfinite,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True  # as torch.optim.AdamW
