"""DTensor params and grads (``torch.distributed.tensor``, as FSDP2's ``fully_shard`` makes them).

An element-wise step of a DTensor param is the step of its local shard, when its grad and state
are laid out like it (same device mesh, same placements): each rank steps its own shard with the
kernels, and the state stays a DTensor with the param's placements, as torch.optim creates it.
A grad in a ``Partial`` placement holds addends of the values, not the values, and a grad on
another mesh holds other elements: both are refused before anything is stepped. A grad in another
placement that is not ``Partial`` (say ``Replicate`` for a ``Shard(0)`` param) is left to torch's
own implementation, whose DTensor ops redistribute it.

Everything here works without torch.distributed (some builds have none): then nothing is a DTensor.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise), without autograd."""
    return t._local_tensor if is_dtensor(t) else t


def any_dtensor(tensors: list[torch.Tensor]) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def same_layout(t: Any, like: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor of ``like``'s global shape, device mesh and placements (so that
    its local shard holds the elements of ``like``'s local shard, in the same order)."""
    if not is_dtensor(t):
        return False
    a, b = t._spec, like._spec
    return (
        t.shape == like.shape
        and (a.mesh is b.mesh or a.mesh == b.mesh)
        and a.placements == b.placements
        and getattr(a, "shard_order", None) == getattr(b, "shard_order", None)
    )


def check_grad(p: torch.Tensor, grad: torch.Tensor, index: int) -> None:
    """Refuses, before anything is stepped, a grad that an element-wise step cannot use with its
    DTensor param ``p`` (``index``: its place in its group, for the message)."""
    if not is_dtensor(p):
        if is_dtensor(grad):
            raise RuntimeError(f"param {index} of its group is a plain tensor but its grad is a DTensor")
        return
    if not is_dtensor(grad):
        raise RuntimeError(
            f"param {index} of its group is a DTensor but its grad is a plain {type(grad).__name__}: "
            "a DTensor param needs a DTensor grad"
        )
    if not (grad._spec.mesh is p._spec.mesh or grad._spec.mesh == p._spec.mesh):
        raise RuntimeError(
            f"the grad of param {index} of its group is on device mesh {grad._spec.mesh}, "
            f"its param on {p._spec.mesh}: a step needs both on one mesh"
        )
    if any(placement.is_partial() for placement in grad.placements):
        raise RuntimeError(
            f"the grad of param {index} of its group has placements {tuple(grad.placements)}: a Partial "
            "placement holds addends of the grad, which an element-wise step cannot use; reduce it first "
            "(grad.redistribute(placements=param.placements))"
        )


def shard_index(t: torch.Tensor) -> int:
    """Which shard of its DTensor this rank holds: 0 for a plain tensor or a replicated one, else
    1 + the rank's coordinate over the mesh dims that shard it (ranks that hold replicas of one
    shard share it)."""
    if not is_dtensor(t):
        return 0
    mesh = t._spec.mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return 0
    index, sharded = 0, False
    for dim, placement in enumerate(t.placements):
        if placement.is_shard():
            index, sharded = index * mesh.size(dim) + coordinate[dim], True
    return index + 1 if sharded else 0


def param_version(p: torch.Tensor) -> Any:
    """What changes when anything writes ``p``: its version, and its local shard's for a DTensor
    (a write through the DTensor and one to the local shard each bump their own counter)."""
    return (p._version, p._local_tensor._version) if is_dtensor(p) else p._version


def replicated_like(total: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """``total`` (a value every rank holds) as torch returns it for these tensors: a DTensor
    replicated over the mesh of the first DTensor among them, else the tensor itself."""
    first = next((t for t in tensors if is_dtensor(t)), None)
    if first is None:
        return total
    mesh = first._spec.mesh
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)


def mesh_device(mesh: Any) -> torch.device:
    """Where the mesh's collectives take tensors: the CPU, or this rank's accelerator."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.accelerator.current_device_index())


def agreed_seed(seed: int, tensors: list[torch.Tensor]) -> int:
    """``seed`` where no tensor is a DTensor; else the seed of the first rank of the first
    DTensor's mesh, the same on every rank of the mesh (a collective over it), so that ranks
    seeded apart (``seed + rank``) still round the replicas of one shard alike. Called where a
    group that rounds stochastically gets its default seed, which every rank does together."""
    first = next((t for t in tensors if is_dtensor(t)), None)
    if first is None:
        return seed
    import torch.distributed as dist

    mesh = first._spec.mesh
    if mesh.get_coordinate() is None:
        return seed
    value = torch.tensor([seed - 2**63], dtype=torch.int64, device=mesh_device(mesh))  # a u64 in an i64
    for dim in range(mesh.ndim):  # from coordinate 0 along each dim: every rank ends with (0, 0, ...)'s
        dist.broadcast(value, group=mesh.get_group(dim), group_src=0)
    return int(value.item()) + 2**63
