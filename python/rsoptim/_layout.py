"""Turning tensors into the flat buffers the Rust kernels walk.

The kernels update element ``i`` of a param from element ``i`` of its grad and state, walking
each buffer linearly in memory. That is right whenever all of them are dense (no gaps, no
overlap) and lay their elements out in the same order, which is what we check; anything else
(a grad whose strides differ from its param's, a param that is a strided view) goes through a
temporary in the param's layout that is copied back after the step. torch 2.13's fused CPU Adam
skips this check and gets such layouts wrong.
"""

from __future__ import annotations

import torch

from ._columns import pack

#: dtypes the Rust kernels compute in; complex params run on their real views.
KERNEL_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.complex64: "float32",
    torch.complex128: "float64",
}


def runs_on_kernel(t: torch.Tensor) -> bool:
    """Whether a param (with its grad) is stepped by the Rust kernels."""
    return t.device.type == "cpu" and t.dtype in KERNEL_DTYPES and t.layout == torch.strided


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
    """Whether ``t`` has ``like``'s dtype, shape and element order (``like`` is dense)."""
    if t.dtype != like.dtype or t.device != like.device or t.shape != like.shape:
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
        self._held: list[torch.Tensor] = []
        self._copy_back: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, param: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
        """Adds one param and its other buffers (grad and state), all of the param's shape."""
        grad = buffers.get("grad")
        if grad is not None and (grad.dtype != param.dtype or grad.device != param.device):
            # torch's ops refuse this too; converting it silently would hide a bug.
            raise RuntimeError(
                f"a grad is {grad.dtype} on {grad.device} but its param is {param.dtype} on {param.device}"
            )
        p = as_real(param)
        if not is_dense(p):
            dense = p.contiguous()
            self._copy_back.append((p, dense))
            p = dense
        self.numels.append(p.numel())
        self.columns["param"].append(p.data_ptr())
        self._held.append(p)
        for role, tensor in buffers.items():
            t = as_real(tensor)
            if not same_layout(t, p):
                if t.shape != p.shape:
                    raise ValueError(f"{role} has shape {tuple(t.shape)} but its param has {tuple(p.shape)}")
                staged = torch.empty_like(p)
                staged.copy_(t)
                if role in self._written:
                    self._copy_back.append((t, staged))
                t = staged
            self.columns[role].append(t.data_ptr())
            self._held.append(t)

    def write_back(self) -> None:
        for target, staged in self._copy_back:
            target.copy_(staged)


def step_dtype_name(step: torch.Tensor) -> str:
    """The dtype of a param's step count, which the kernel increments in place."""
    if not (step.device.type == "cpu" and step.numel() == 1 and step.dtype in (torch.float32, torch.float64)):
        raise ValueError(
            f"state['step'] must be a one-element float32/float64 CPU tensor, got {step.dtype} "
            f"on {step.device} with {step.numel()} elements"
        )
    return KERNEL_DTYPES[step.dtype]
