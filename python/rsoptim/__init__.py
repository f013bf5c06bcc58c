"""rsoptim: torch.optim's SGD, Adam, AdamW and RMSprop and ``clip_grad_norm_``, with the CPU
work done by Rust SIMD kernels spread over a thread pool.

Swap ``torch.optim.Adam`` for ``rsoptim.Adam``: same arguments, same numbers, same state dicts.
``rsoptim.functional`` has in-place steps on NumPy arrays for code without torch optimizers.
"""

from __future__ import annotations

from typing import Any

import glob
import os

from . import functional
from . import _rsoptim
from ._rsoptim import available_simd_levels, parallel_backend, simd_level
from ._threads import follow_torch as _follow_torch
from ._threads import get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "Adam8bit",
    "AdamW8bit",
    "RMSprop",
    "clip_grad_norm_",
    "get_total_norm",
    "clip_grads_with_norm_",
    "functional",
    "set_num_threads",
    "get_num_threads",
    "simd_level",
    "available_simd_levels",
    "parallel_backend",
    "__version__",
]

_TORCH_NAMES = {
    "SGD",
    "Adam",
    "AdamW",
    "Adam8bit",
    "AdamW8bit",
    "RMSprop",
    "clip_grad_norm_",
    "get_total_norm",
    "clip_grads_with_norm_",
}

# A forked child has none of the parent's pool threads: give it a pool of its own.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_rsoptim.reset_after_fork)

try:
    import torch as _torch
except ImportError:  # rsoptim.functional works on NumPy alone
    _torch = None

if _torch is not None:
    from .adam import Adam, AdamW
    from .adam8bit import Adam8bit, AdamW8bit
    from .clip import clip_grad_norm_, clip_grads_with_norm_, get_total_norm
    from .rmsprop import RMSprop
    from .sgd import SGD

    # Run on as many threads as torch's intra-op pool, and on that pool's own threads (torch's
    # OpenMP runtime) where we can, so that the two never compete for the CPU. RSOPTIM_BACKEND=rayon
    # keeps rsoptim on a pool of its own.
    _follow_torch()
    _torch_lib = os.path.join(os.path.dirname(_torch.__file__), "lib")
    if os.environ.get("RSOPTIM_BACKEND", "auto").strip().lower() != "rayon":
        for _runtime in sorted(glob.glob(os.path.join(_torch_lib, "lib*omp*.so*"))):
            if _rsoptim.use_openmp(_runtime):
                break
    # Step plans check their tensors natively through libtorch's stable C shim, where this torch
    # has one that reads what torch reads (see _optimizer.enable_native_checks).
    from ._optimizer import enable_native_checks as _enable_native_checks

    _libtorch = sorted(glob.glob(os.path.join(_torch_lib, "libtorch_cpu.*")))
    _enable_native_checks(_libtorch[0] if _libtorch else None)


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        raise ImportError(f"rsoptim.{name} needs torch: pip install torch (rsoptim.functional works without it)")
    raise AttributeError(f"module 'rsoptim' has no attribute {name!r}")
