"""How many threads the kernels use: torch's intra-op count, unless set here."""

from __future__ import annotations

import sys

from . import _rsoptim

_follow_torch = True


def set_num_threads(threads: int | None) -> None:
    """Sets how many threads the kernels use. ``None`` (the default) follows
    ``torch.get_num_threads()``, re-read at every step, so that rsoptim and torch's intra-op pool
    never use more threads than torch was told to."""
    global _follow_torch
    if threads is None:
        _follow_torch = True
        follow_torch()
    else:
        _rsoptim.set_num_threads(threads)  # refuses 0 before anything changes
        _follow_torch = False


def get_num_threads() -> int:
    """How many threads the kernels use."""
    return _rsoptim.get_num_threads()


def follow_torch() -> None:
    """Takes torch's current thread count, unless the user set rsoptim's own."""
    torch = sys.modules.get("torch")
    if _follow_torch and torch is not None:
        threads = max(1, torch.get_num_threads())
        if threads != _rsoptim.get_num_threads():
            _rsoptim.set_num_threads(threads)
