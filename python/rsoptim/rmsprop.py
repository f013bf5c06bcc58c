"""RMSprop, stepped by the Rust kernels (see ``torch.optim.RMSprop`` for the algorithm)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.rmsprop import rmsprop as _torch_rmsprop  # torch.optim deletes the module name
from torch.optim.optimizer import ParamsT, _get_scalar_dtype

from . import _rsoptim
from ._optimizer import KernelCall, KernelOptimizer, check_clipping, extension_options, scalar

__all__ = ["RMSprop"]


class RMSprop(KernelOptimizer, torch.optim.RMSprop):
    """``torch.optim.RMSprop`` with its step computed by rsoptim's Rust kernels on CPU.

    Same arguments, defaults, errors and state as ``torch.optim.RMSprop``; bfloat16/float16 params
    are computed in float32, each stored value rounded once (the rule of torch's fused kernels;
    torch has no fused RMSprop). Params on other devices are stepped by torch, and so are groups
    with ``differentiable=True`` (autograd through the step).
    """

    _sparse_message = "RMSprop does not support sparse gradients"

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        stochastic_rounding_seed: int | None = None,
        max_grad_norm: float | None = None,
        norm_type: float | str = 2.0,
        error_if_nonfinite: bool = False,
    ) -> None:
        extensions = extension_options(state_dtype, master_weights, stochastic_rounding, stochastic_rounding_seed)
        check_clipping(max_grad_norm, norm_type, error_if_nonfinite)
        super().__init__(
            params,
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
        )
        self._init_extensions(**extensions)
        self._init_clipping(max_grad_norm, norm_type, error_if_nonfinite)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        keys = ("square_avg",)
        if group["momentum"] > 0:
            keys += ("momentum_buffer",)
        if group["centered"]:
            keys += ("grad_avg",)
        return keys

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if group["capturable"]:
            state["step"] = torch.zeros((), dtype=_get_scalar_dtype(), device=p.device)
        else:
            state["step"] = torch.zeros((), dtype=_get_scalar_dtype())
        dtype = self._state_dtype(p, group)
        state["square_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if group["centered"]:
            state["grad_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _kernel_call(self, group: dict[str, Any], call: KernelCall) -> None:
        c = call.columns
        _rsoptim.rmsprop_step(
            call.dtype,
            call.step_dtype,
            call.numels,
            c["param"],
            c["grad"],
            c["square_avg"],
            c.get("momentum_buffer"),
            c.get("grad_avg"),
            call.steps,
            lr=scalar(group["lr"]),
            alpha=scalar(group["alpha"]),
            eps=scalar(group["eps"]),
            weight_decay=scalar(group["weight_decay"]),
            momentum=scalar(group["momentum"]),
            centered=bool(group["centered"]),
            maximize=bool(group["maximize"]),
            state_dtype=call.state_dtype,
            **call.extensions(),
        )

    def _group_runs_on_kernel(self, group: dict[str, Any]) -> bool:
        return not group["capturable"]  # torch refuses CPU params with capturable=True

    def _torch_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        states = [self.state[p] for p in params]
        _torch_rmsprop(
            params,
            [p.grad for p in params],
            [s["square_avg"] for s in states],
            [s["grad_avg"] for s in states] if group["centered"] else [],
            [s["momentum_buffer"] for s in states] if group["momentum"] > 0 else [],
            [s["step"] for s in states],
            foreach=group["foreach"],
            maximize=group["maximize"],
            differentiable=group["differentiable"],
            capturable=group["capturable"],
            has_complex=any(torch.is_complex(p) for p in params),
            lr=group["lr"],
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            centered=group["centered"],
        )
