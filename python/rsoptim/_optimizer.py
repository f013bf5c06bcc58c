"""What rsoptim's optimizers share: the step loop around the Rust kernels.

Each optimizer subclasses its torch.optim counterpart, so construction, validation messages,
defaults, ``state_dict``/``load_state_dict``, hooks, ``repr``, pickling and scheduler support are
torch's own. Only ``step`` is replaced: CPU float32/float64 (and complex) params of a group go to
one Rust call per dtype; everything else (CUDA and other devices, float16/bfloat16, sparse grads
where torch supports them) goes to torch's own functional implementation, which picks its
foreach or fused kernels as it would for ``torch.optim``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch

from ._layout import KERNEL_DTYPES, BufferTable, runs_on_kernel, step_dtype_name


def scalar(x: Any) -> float:
    """A hyperparameter as a Python float (schedulers may store Tensor lrs and betas)."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def reject_differentiable(differentiable: bool) -> None:
    if differentiable:
        raise ValueError(
            "rsoptim optimizers do not support differentiable=True (the Rust kernels update "
            "tensors in place outside autograd); use torch.optim for differentiable optimization"
        )


class KernelOptimizer:
    """Mixin placed before a ``torch.optim`` class: replaces its ``step``.

    Subclasses set ``_sparse_message`` and ``_has_step`` and implement ``_state_keys``,
    ``_init_state``, ``_kernel_step`` and ``_torch_step``.
    """

    #: The RuntimeError raised for a sparse grad (None: sparse grads go to torch).
    _sparse_message: ClassVar[str | None] = None
    #: Whether each param keeps a ``state['step']`` count.
    _has_step: ClassVar[bool] = True

    param_groups: list[dict[str, Any]]
    state: Any

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state buffers the kernel reads and writes, besides param and grad."""
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Creates a param's state on its first step, exactly as torch does."""
        raise NotImplementedError

    def _kernel_step(
        self, group: dict[str, Any], dtype: str, step_dtype: str, table: BufferTable, params: list[torch.Tensor]
    ) -> None:
        raise NotImplementedError

    def _torch_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        raise NotImplementedError

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
        with torch.no_grad():
            # Every group is checked before any is stepped, so an error leaves all params as
            # they were.
            work = [(group, self._params_with_grad(group)) for group in self.param_groups]
            for group, params in work:
                if params:
                    self._step_group(group, params)
        return loss

    def _params_with_grad(self, group: dict[str, Any]) -> list[torch.Tensor]:
        params = [p for p in group["params"] if p.grad is not None]
        if self._sparse_message is not None and any(p.grad.is_sparse for p in params):
            raise RuntimeError(self._sparse_message)
        return params

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        buckets: dict[tuple[str, str], list[torch.Tensor]] = {}
        others: list[torch.Tensor] = []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, group, state)
            if runs_on_kernel(p) and not p.grad.is_sparse:
                step_dtype = step_dtype_name([state["step"]]) if self._has_step else "float32"
                buckets.setdefault((KERNEL_DTYPES[p.dtype], step_dtype), []).append(p)
            else:
                others.append(p)
        keys = self._state_keys(group)
        for (dtype, step_dtype), bucket in buckets.items():
            table = BufferTable(("param", "grad", *keys), written=frozenset(("param", *keys)))
            for p in bucket:
                state = self.state[p]
                table.add(p, {"grad": p.grad, **{key: state[key] for key in keys}})
            self._kernel_step(group, dtype, step_dtype, table, bucket)
            table.write_back()
        if others:
            self._torch_step(group, others)

    def _steps(self, params: list[torch.Tensor]) -> list[int]:
        return [self.state[p]["step"].data_ptr() for p in params]
