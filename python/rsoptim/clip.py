"""``clip_grad_norm_`` with the norms and the scale computed by the Rust kernels on CPU.

Same semantics and return value as ``torch.nn.utils.clip_grad_norm_``: grads are grouped by
(device, dtype), each grad's norm is taken, the total is the norm of those norms (its dtype
follows promotion across groups), and every grad is multiplied by
``min(max_norm / (total + 1e-6), 1)``. CPU float32/float64 grads (complex ones for the 2-norm)
use the kernels; the rest use torch's own ops.

DTensor grads (FSDP2): each rank takes the norms of its local shards, and one collective per
device mesh (per mesh dim that shards them) combines them into the norm of the whole grads; the
total is returned replicated over the mesh, as torch returns it, and each rank scales its local
shards. Grads in a ``Partial`` placement are reduced by torch's DTensor ops first.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Callable, Iterable

import torch
from torch.autograd.graph import increment_version

from . import _rsoptim
from ._threads import follow_torch
from ._columns import pack
from ._distributed import is_dtensor, local, mesh_device, replicated_like
from ._optimizer import _DTYPE_CODES, unmoved
from ._layout import KERNEL_DTYPES, as_real, check_storage, is_dense, native_reads, runs_on_kernel

__all__ = ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_"]

Tensors = torch.Tensor | Iterable[torch.Tensor]


def _group_by_device_and_dtype(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


#: What ``_kernel_buffers`` hands a kernel: the element counts and addresses of the memory it
#: walks (packed), the real dtype it walks it in, what holds that memory alive until it has
#: returned (another thread may give a grad other memory meanwhile), and the tensors whose
#: addresses those are (the kernel's last check, see ``unmoved``).
Buffers = tuple[bytes, bytes, torch.dtype, list[Any], list[torch.Tensor]]


def _native_buffers(tensors: list[torch.Tensor]) -> Buffers | None:
    """The buffers of ``tensors`` if all are plain contiguous CPU tensors of one real dtype the
    kernels take, read and checked natively in one call that takes their storages as it reads
    their addresses (about 5 times faster than ``_kernel_ready`` on small grads); None
    otherwise. Called under ``native_reads``."""
    dtype = tensors[0].dtype
    code = _DTYPE_CODES.get(dtype)
    if code is None:
        return None
    count = len(tensors)
    numels = pack(map(torch.Tensor.numel, tensors))
    storages: list[Any] = []
    addrs = _rsoptim.plan_addresses(tensors, numels, bytes([code]) * count, pack(range(count)), storages)
    return None if addrs is None else (numels, addrs, dtype, storages, tensors)


def _kernel_buffers(tensors: list[torch.Tensor]) -> Buffers | None:
    """The buffers of ``tensors`` (of one dtype), or None if some tensor needs torch. Called
    under ``native_reads``."""
    buffers = _native_buffers(tensors)
    return buffers if buffers is not None else _aliased_buffers(tensors)


def _aliased_buffers(tensors: list[torch.Tensor]) -> Buffers | None:
    """The buffers of private aliases of ``tensors``, or None if some tensor needs torch or they
    are not all of one dtype (another thread may have retyped one since they were grouped).
    Another thread giving a grad other memory (``g.data = ...``) leaves an alias's memory where
    it was: a kernel whose last check found memory moved reads them again this way (see
    ``_moved_again``)."""
    views = _kernel_ready(tensors)
    if views is None or any(v.dtype != views[0].dtype for v in views):
        return None
    # (`views` are private aliases: they hold the memory.)
    return pack(map(torch.Tensor.numel, views)), pack(map(torch.Tensor.data_ptr, views)), views[0].dtype, views, views


def _kernel_ready(tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The real dense views the kernels can walk, or None if some tensor needs torch."""
    views = []
    for t in tensors:
        if not runs_on_kernel(t):
            return None
        # A private alias, read once: another thread giving the grad other memory, or another
        # size or dtype, changes neither what is checked here nor the memory the kernel gets.
        real = as_real(t.data)
        if not is_dense(real):
            return None
        check_storage(real, "a grad")
        views.append(real)
    return views


def _kernel_norms(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor | None:
    """Each tensor's norm, computed by the kernels; None where torch must compute them."""
    with native_reads():  # (a subclass or mode could fake the sizes and addresses read here)
        return _native_norms(tensors, norm_type)


def _native_norms(
    tensors: list[torch.Tensor], norm_type: float, read: Callable[[list[torch.Tensor]], Buffers | None] = _kernel_buffers
) -> torch.Tensor | None:
    """Each tensor's norm by the kernels, its buffers read by ``read``; None where torch must
    compute them. Called under ``native_reads``."""
    if not (norm_type > 0) or (tensors[0].is_complex() and norm_type != 2.0):
        return None  # p <= 0, NaN p, and complex |z| norms other than the 2-norm
    if norm_type == float("inf") and any(t.numel() == 0 for t in tensors):
        return None  # torch refuses the inf-norm of an empty tensor (no identity): let it say so
    if tensors[0].is_complex() and any(t.numel() == 1 for t in tensors):
        return None  # torch's norm of one complex element is |z|, which overflows nowhere
    buffers = read(tensors)
    while buffers is not None:
        numels, addrs, dtype, _, checked = buffers  # (`buffers` holds the memory until the kernel returns)
        try:
            norms = _rsoptim.tensor_norms(KERNEL_DTYPES[dtype], numels, addrs, norm_type, **unmoved((checked, addrs, numels)))
        except _rsoptim.MemoryMovedError:
            buffers = _moved_again(buffers)
            continue
        return torch.tensor(norms, dtype=dtype)
    return None


def _moved_again(buffers: Buffers) -> Buffers | None:
    """The buffers to try once more after a kernel's last check found memory moved since the
    checks (another thread's ``g.data = ...``, or a storage resized in place by code run in
    between; the kernel read or wrote nothing): private aliases of the tensors, read again.
    None after aliases moved too (only a resize in place moves those): torch's ops take them,
    reading every address afresh."""
    numels, addrs, dtype, held, checked = buffers
    return None if checked is held else _aliased_buffers(checked)


def _torch_norms(tensors: list[torch.Tensor], norm_type: float, device: torch.device, foreach: bool | None) -> torch.Tensor:
    from torch.utils._foreach_utils import _device_has_foreach_support, _has_foreach_support

    if (foreach is None and _has_foreach_support(tensors, device)) or (foreach and _device_has_foreach_support(device)):
        norms = list(torch._foreach_norm(tensors, norm_type))
    elif foreach:
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
    else:
        norms = [torch.linalg.vector_norm(g, norm_type) for g in tensors]
    return torch.stack(norms)


def _as_list(tensors: Tensors) -> list[torch.Tensor]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


@torch.no_grad()
def get_total_norm(
    tensors: Tensors, norm_type: float | str = 2.0, error_if_nonfinite: bool = False, foreach: bool | None = None
) -> torch.Tensor:
    """The norm of the norms of ``tensors`` (``torch.nn.utils.get_total_norm``)."""
    tensors = _as_list(tensors)
    norm_type = float(norm_type)
    if len(tensors) == 0:
        return torch.tensor(0.0)
    with native_reads():
        # The common case in one native read: plain contiguous CPU grads of one dtype.
        norms_at_once = _native_norms(tensors, norm_type, _native_buffers)
    if norms_at_once is not None:
        return _checked_total(torch.linalg.vector_norm(norms_at_once, norm_type), norm_type, error_if_nonfinite)
    first_device = tensors[0].device
    plain: list[torch.Tensor] = []
    sharded: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if not is_dtensor(t):
            plain.append(t)
        elif norm_type == 0 or any(placement.is_partial() for placement in t.placements):
            # (The 0-"norm" counts nonzero norms, which do not add up over shards.)
            sharded.setdefault(("partial",), []).append(t)
        else:
            # Shards of one mesh, by the mesh dims they are split over: one reduction each.
            dims = tuple(d for d, placement in enumerate(t.placements) if not placement.is_replicate())
            sharded.setdefault((t._spec.mesh, dims), []).append(t)
    norms = [_local_norms(plain, norm_type, foreach).to(first_device)] if plain else []
    for key, group in sharded.items():
        if key == ("partial",):
            # Addends of the grads, or the 0-"norm": torch's DTensor ops (as its clip_grad_norm_).
            for (device, _), same in _group_by_device_and_dtype(group).items():
                norms.append(_torch_norms(same, norm_type, device, foreach).full_tensor().to(first_device))
            continue
        mesh, dims = key
        shards = [local(t) for t in group]
        if abs(norm_type) == float("inf"):
            # An empty shard (FSDP2 gives some ranks none of a small param) has nothing to
            # compare, not torch's error for the inf-norm of nothing.
            shards = [t for t in shards if t.numel()]
        if shards:
            shard_total = torch.linalg.vector_norm(_local_norms(shards, norm_type, foreach), norm_type)
        else:  # the identity of the max (0), or of the min (inf)
            shard_total = torch.tensor(0.0 if norm_type > 0 else float("inf"), dtype=group[0].dtype.to_real())
        norms.append(_reduce_over_mesh(shard_total, norm_type, mesh, dims).to(first_device).reshape(1))
    total_norm = torch.linalg.vector_norm(torch.cat(norms), norm_type)
    return replicated_like(_checked_total(total_norm, norm_type, error_if_nonfinite), tensors)


def _checked_total(total_norm: torch.Tensor, norm_type: float, error_if_nonfinite: bool) -> torch.Tensor:
    if error_if_nonfinite and torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )
    return total_norm


def _local_norms(tensors: list[torch.Tensor], norm_type: float, foreach: bool | None) -> torch.Tensor:
    """The norm of each tensor (by the kernels where they can), in one tensor."""
    first_device = tensors[0].device
    norms = []
    for (device, _), group in _group_by_device_and_dtype(tensors).items():
        group_norms = _kernel_norms(group, norm_type)
        if group_norms is None:
            group_norms = _torch_norms(group, norm_type, device, foreach)
        norms.append(group_norms.to(first_device))
    return torch.cat(norms)


def _reduce_over_mesh(shard_total: torch.Tensor, norm_type: float, mesh, dims: tuple[int, ...]) -> torch.Tensor:
    """The norm of every rank's shards along ``dims`` of ``mesh``, from this rank's norm of its
    own: the sum of p-th powers (the max for inf, the min for -inf), one all-reduce per mesh
    dim, on the mesh's device (a CPU-offloaded grad's norm travels by NCCL on a CUDA mesh)."""
    import torch.distributed as dist

    if norm_type == float("inf"):
        value, op = shard_total, dist.ReduceOp.MAX
    elif norm_type == -float("inf"):
        value, op = shard_total, dist.ReduceOp.MIN
    else:
        value, op = shard_total**norm_type, dist.ReduceOp.SUM
    on_mesh = mesh_device(mesh)
    if op == dist.ReduceOp.SUM:
        value = value.to(on_mesh, copy=True)  # (a NaN spreads through a sum)
    else:
        # A max or min may drop a NaN from another rank (gloo's does): a flag travels beside
        # the value, 1 for NaN (-1 for the min), in the same all-reduce.
        flag = value.isnan().to(value.dtype) * (1 if op == dist.ReduceOp.MAX else -1)
        value = torch.stack([value, flag]).to(on_mesh)
    for dim in dims:
        dist.all_reduce(value, op=op, group=mesh.get_group(dim))
    value = value.to(shard_total.device)
    if op != dist.ReduceOp.SUM:
        return torch.where(value[1] != 0, torch.nan, value[0])
    return value ** (1.0 / norm_type)


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: Tensors, max_norm: float, total_norm: torch.Tensor, foreach: bool | None = None
) -> None:
    """Scales the grads of ``parameters`` by ``min(max_norm / (total_norm + 1e-6), 1)``
    (``torch.nn.utils.clip_grads_with_norm_``)."""
    grads = [p.grad for p in _as_list(parameters) if p.grad is not None]
    if not grads:
        return
    _scale_grads(grads, float(max_norm), total_norm, foreach)


def clip_coefficient(max_norm: float, total_norm: torch.Tensor) -> torch.Tensor:
    """``min(max_norm / (total_norm + 1e-6), 1)``: what clipping multiplies the grads by, in the
    total's dtype (a tensor, so that no value is read back before it is used)."""
    if is_dtensor(total_norm):
        total_norm = total_norm.full_tensor()  # (replicated: no communication)
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def _scale_grads(grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor, foreach: bool | None) -> None:
    from torch.utils._foreach_utils import _device_has_foreach_support, _has_foreach_support

    clip_coef_clamped = clip_coefficient(max_norm, total_norm)
    # Outside inference mode torch refuses to write an inference tensor: its ops say so.
    kernels_may_write = torch.is_inference_mode_enabled() or not any(map(torch.Tensor.is_inference, grads))
    # The kernels' factor, read before any grad's address is: reading it may run code (a
    # subclass total's __torch_dispatch__) that could free a grad. (A total off the CPU is not
    # read back: its grads are torch's to scale.)
    factor = None
    if kernels_may_write and clip_coef_clamped.device.type == "cpu":
        with native_reads():
            factor = float(clip_coef_clamped.item())
    if factor is not None:
        with native_reads():
            # The common case in one native read: plain contiguous CPU grads of one dtype.
            buffers = _native_buffers(grads)
            if buffers is not None and _kernel_scale(buffers, factor):
                increment_version(grads)  # (as torch's in-place multiply does)
                return
    # A DTensor grad is scaled by its local shard (a Partial one by its addends: the same).
    for (device, dtype), group in _group_by_device_and_dtype([local(g) for g in grads]).items():
        # Complex grads are scaled by torch: its complex multiply spreads a non-finite component
        # to the other one, which a scale of the real view would not.
        if factor is not None and not dtype.is_complex:
            with native_reads():
                buffers = _kernel_buffers(group)
                if buffers is not None and _kernel_scale(buffers, factor):
                    increment_version(group)
                    continue
        if (foreach is None and _has_foreach_support(group, device)) or (foreach and _device_has_foreach_support(device)):
            torch._foreach_mul_(group, clip_coef_clamped.to(device))
        elif foreach:
            raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
        else:
            coef = clip_coef_clamped.to(device)
            for g in group:
                g.mul_(coef)


def _kernel_scale(buffers: Buffers, factor: float) -> bool:
    """Scales the grads whose ``buffers`` were read in place by the kernels; False if they share
    memory (torch's foreach multiplies such grads once per appearance, and is left to do so)."""
    # x * 1.0 == x for every float (NaN included), so an unclipped step skips the pass.
    if factor == 1.0:
        return True
    while buffers is not None:
        numels, addrs, dtype, held, checked = buffers  # (`held` keeps the memory alive until scale_ returns)
        try:
            _rsoptim.scale_(KERNEL_DTYPES[dtype], numels, addrs, factor, **unmoved((checked, addrs, numels)))
        except _rsoptim.BufferOverlapError:
            return False  # refused before anything was written
        except _rsoptim.MemoryMovedError:
            buffers = _moved_again(buffers)
            continue
        return True
    return False


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Clips the gradient norm of ``parameters`` in place; returns the total norm before
    clipping. Same arguments and semantics as ``torch.nn.utils.clip_grad_norm_``."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and len(parameters) == 0:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    grads = [p.grad for p in parameters if p.grad is not None]
    follow_torch()
    total_norm = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    if grads:
        _scale_grads(grads, float(max_norm), total_norm, foreach)
    return total_norm
