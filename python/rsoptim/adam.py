"""Adam and AdamW, stepped by the Rust kernels (see ``torch.optim.Adam`` for the algorithm)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adam import adam as _torch_adam  # torch.optim deletes the module name
from torch.optim.optimizer import ParamsT, _device_dtype_check_for_fused, _get_scalar_dtype

from . import _rsoptim
from ._optimizer import KernelCall, KernelOptimizer, check_clipping, extension_options, scalar

__all__ = ["Adam", "AdamW"]


class _AdamKernels(KernelOptimizer):
    _sparse_message = "Adam does not support sparse gradients, please consider SparseAdam instead"
    _decoupled_weight_decay = False

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return bool(group.get("decoupled_weight_decay", self._decoupled_weight_decay))

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if group["fused"]:
            _device_dtype_check_for_fused(p)  # as torch's _init_group, on a param's first step
        if group["capturable"] or group["fused"]:
            state["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device)
        else:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
        dtype = self._state_dtype(p, group)
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _kernel_call(self, group: dict[str, Any], call: KernelCall) -> None:
        beta1, beta2 = group["betas"]
        c = call.columns
        _rsoptim.adam_step(
            call.dtype,
            call.step_dtype,
            call.numels,
            c["param"],
            c["grad"],
            c["exp_avg"],
            c["exp_avg_sq"],
            c.get("max_exp_avg_sq"),
            call.steps,
            lr=scalar(group["lr"]),
            beta1=scalar(beta1),
            beta2=scalar(beta2),
            eps=scalar(group["eps"]),
            weight_decay=scalar(group["weight_decay"]),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
            decoupled_weight_decay=self._decoupled(group),
            # torch's for-loop divides a float32 Tensor lr in float32; its fused kernel (the rule
            # for half-precision params) reads it as a double.
            lr_in_f32=call.dtype in ("float32", "float64")
            and isinstance(group["lr"], torch.Tensor)
            and group["lr"].dtype == torch.float32,
            state_dtype=call.state_dtype,
            **call.extensions(),
        )

    def _group_runs_on_kernel(self, group: dict[str, Any]) -> bool:
        # Tensor betas make torch compute the bias corrections and lerp weight as tensors; a
        # Tensor lr of another dtype than float32/float64 rounds through it. Those groups are
        # left to torch, which then gives its own numbers by construction.
        if group["capturable"]:
            return False  # torch refuses CPU params with capturable=True; let it say so
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.dtype not in (torch.float32, torch.float64):
            return False
        return not any(isinstance(b, torch.Tensor) for b in group["betas"])

    def _torch_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        _torch_adam(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s["step"] for s in states],
            foreach=group["foreach"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            fused=group["fused"],
            grad_scale=None,
            found_inf=None,
            has_complex=any(torch.is_complex(p) for p in params),
            decoupled_weight_decay=self._decoupled(group),
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )


class Adam(_AdamKernels, torch.optim.Adam):
    """``torch.optim.Adam`` with its step computed by rsoptim's Rust kernels on CPU.

    Same arguments, defaults, errors and state as ``torch.optim.Adam``; bfloat16/float16 params
    get the numbers of torch's ``fused=True`` kernel. ``foreach``, ``fused`` and ``capturable``
    are accepted and apply to params that torch steps (non-CPU devices); ``fused=True`` refuses
    params of devices and dtypes torch's fused kernel refuses, as torch does. Groups with
    ``differentiable=True`` are stepped by torch's implementation, with autograd through the step.
    """

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
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self._init_extensions(**extensions)
        self._init_clipping(max_grad_norm, norm_type, error_if_nonfinite)


class AdamW(_AdamKernels, torch.optim.AdamW):
    """``torch.optim.AdamW`` (Adam with decoupled weight decay) with its step computed by
    rsoptim's Rust kernels on CPU. See :class:`Adam` for what is supported."""

    _decoupled_weight_decay = True

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
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        self._init_extensions(**extensions)
        self._init_clipping(max_grad_norm, norm_type, error_if_nonfinite)
