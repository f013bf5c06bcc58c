"""SGD with momentum, stepped by the Rust kernels (see ``torch.optim.SGD`` for the algorithm)."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch.optim.sgd import sgd as _torch_sgd  # torch.optim deletes the module name
from torch.optim.optimizer import ParamsT, _device_dtype_check_for_fused

from . import _rsoptim
from ._optimizer import KernelCall, KernelOptimizer, check_clipping, extension_options, scalar

__all__ = ["SGD"]


class SGD(KernelOptimizer, torch.optim.SGD):
    """``torch.optim.SGD`` with its step computed by rsoptim's Rust kernels on CPU.

    Same arguments, defaults, errors and state as ``torch.optim.SGD`` (``momentum_buffer`` only
    with momentum, created on a param's first step); bfloat16/float16 params are computed in
    float32, each stored value rounded once (the rule of torch's fused kernels, whose SGD is
    broken for half params in torch 2.13). Sparse grads and params on other devices are stepped
    by torch, and so are groups with ``differentiable=True`` (autograd through the step).
    """

    _has_step = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
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
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self._init_extensions(**extensions)
        self._init_clipping(max_grad_norm, norm_type, error_if_nonfinite)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _counts_steps(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        # torch's SGD counts no steps; stochastic rounding draws its bits by step.
        return self._rounding_seed(p, group) is not None

    def _needs_state(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        # torch's SGD keeps no state without momentum: `state_dict()['state']` stays empty
        # (unless an extension keeps a master copy or a step count there).
        return group["momentum"] != 0 or self._uses_master(p, group) or self._counts_steps(p, group)

    def _state_is_new(self, state: dict[str, Any]) -> bool:
        return state.get("momentum_buffer") is None

    def _param_runs_on_kernel(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor | None) -> bool:
        # torch's SGD steps complex params in complex arithmetic, where a non-finite component
        # spreads NaN to the other one (Adam and RMSprop step real views): leave them to torch.
        return not p.is_complex() and super()._param_runs_on_kernel(p, group, grad)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        # torch creates the momentum buffer on a param's first step as a clone of the grad (with
        # the grad's strides). Here the kernel is told the buffer is new and writes it; should
        # the step not run on the kernel, the buffer is removed again (see _forget_new_state)
        # and torch creates its own. It is made a copy of the grad all the same, not left
        # uninitialised: another thread stepping this optimizer at the same time may find it
        # before this thread's kernel has written it, and reads it as torch's would, a clone.
        if group["momentum"] != 0 and self._param_runs_on_kernel(p, group, p.grad):
            dtype = self._state_dtype(p, group)
            state["momentum_buffer"] = p.grad.detach().to(dtype, memory_format=torch.preserve_format, copy=True)
            self._new_buffers.add(p)

    def _forget_new_state(self, params: list[torch.Tensor]) -> None:
        new_buffers = self._new_buffers
        for p in params:
            if p in new_buffers:
                self.state[p].pop("momentum_buffer", None)
                new_buffers.discard(p)

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor], grad_scale: float, hyper: dict[str, Any]) -> Any:
        if group["fused"] and params and getattr(self, "_need_device_dtype_check_for_fused", True):
            # As torch's _init_group: once, on the first param with a grad.
            _device_dtype_check_for_fused(params[0])
            self._need_device_dtype_check_for_fused = False
        # The buffers this call made for its kernel to fill, kept per thread: two threads may
        # step this optimizer at once, and each kernel must be told which buffers are its own
        # new ones. (Saved and put back: a caller's mode run while state is made may step it.)
        by_thread = self.__dict__.setdefault("_rsoptim_new_buffers", {})
        thread = threading.get_ident()
        outer = by_thread.get(thread)
        by_thread[thread] = new_buffers = set()
        try:
            return super()._step_group(group, params, grad_scale, hyper)
        except BaseException:
            self._forget_new_state(list(new_buffers))
            raise
        finally:
            if outer is None:
                del by_thread[thread]
            else:
                by_thread[thread] = outer

    @property
    def _new_buffers(self) -> set[torch.Tensor]:
        """The buffers that this thread's ``_step_group`` has made for its kernel to fill."""
        return self.__dict__["_rsoptim_new_buffers"][threading.get_ident()]

    def _new_buffer_flags(self, params: list[torch.Tensor]) -> list[bool]:
        new_buffers = self._new_buffers
        return [p in new_buffers for p in params]

    def _keep_new_state(self, params: list[torch.Tensor]) -> None:
        self._new_buffers.difference_update(params)

    def _kernel_call(self, group: dict[str, Any], call: KernelCall) -> None:
        c = call.columns
        momentum = scalar(group["momentum"])
        _rsoptim.sgd_step(
            call.dtype,
            call.numels,
            c["param"],
            c["grad"],
            c.get("momentum_buffer"),
            call.new_buffers,
            lr=scalar(group["lr"]),
            momentum=momentum,
            dampening=scalar(group["dampening"]),
            weight_decay=scalar(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
            state_dtype=call.state_dtype,
            step_dtype=call.step_dtype if call.rounding_seed is not None else None,
            steps=call.steps if call.rounding_seed is not None else None,
            **call.extensions(),
        )

    def _torch_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        momentum = group["momentum"] != 0
        buffers = [self.state[p].get("momentum_buffer") for p in params] if momentum else []
        _torch_sgd(
            params,
            [p.grad for p in params],
            buffers,
            has_sparse_grad=any(p.grad.is_sparse for p in params),
            foreach=group["foreach"],
            fused=group["fused"],
            grad_scale=None,
            found_inf=None,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if momentum:
            for p, buf in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buf

