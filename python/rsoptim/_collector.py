"""Python's cyclic garbage collector, paused from the checks of a call to its kernel.

A collection runs whatever ``__del__`` (or weakref callback) its garbage has, and it can start
at any allocation, so also between the moment a call has checked a buffer and the moment its
kernel writes there. Such code could shrink a checked storage (``untyped_storage().resize_()``,
``ndarray.resize(refcheck=False)``) and the kernel would write freed memory. While any thread
is between :func:`pause` and :func:`resume` no collection starts; the garbage is collected
after. (``gc.disable`` is process-wide, hence the count over all threads.)
"""

from __future__ import annotations

import gc
import os
import threading
from typing import Any

_lock = threading.Lock()
_acquire, _release = _lock.acquire, _lock.release
_is_enabled, _disable, _enable = gc.isenabled, gc.disable, gc.enable
#: [calls between pause and resume, over all threads; whether the collector was enabled when
#: the first of them paused it (it is enabled again when the last resumes)]
_paused = [0, False]


def pause() -> None:
    _acquire()
    if _paused[0] == 0:
        _paused[1] = _is_enabled()
        _disable()
    _paused[0] += 1
    _release()


def resume() -> None:
    _acquire()
    if _paused[0] > 0:  # (0 in a child forked from inside a pause: see _after_fork_in_child)
        _paused[0] -= 1
        if _paused[0] == 0 and _paused[1]:
            _enable()
    _release()


def _after_fork_in_child() -> None:
    """A forked child has only the thread that forked: the pauses of the others never end
    there, and one of them may have held the lock."""
    global _lock, _acquire, _release
    _lock = threading.Lock()
    _acquire, _release = _lock.acquire, _lock.release
    if _paused[0] and _paused[1]:
        _enable()
    _paused[:] = [0, False]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class collector_paused:
    """No garbage collection starts inside (nests, and works across threads)."""

    __slots__ = ()

    def __enter__(self) -> None:
        pause()

    def __exit__(self, *exc: Any) -> None:
        resume()
