"""Python's cyclic garbage collector, paused from the checks of a call to its kernel.

A collection runs whatever ``__del__`` (or weakref callback) its garbage has, and it can start
at any allocation, so also between the moment a call has checked a buffer and the moment its
kernel writes there. Such code could shrink a checked storage (``untyped_storage().resize_()``,
``ndarray.resize(refcheck=False)``) and the kernel would write freed memory. While any thread
is between :func:`pause` and :func:`resume` no collection starts; the garbage is collected
after.

Both are the extension's (``gc.disable`` is process-wide, so they count the pauses of all
threads): no Python bytecode runs inside them, so an exception from a signal handler (a Ctrl-C)
lands before a pause is counted or after, never between the count and the collector's switch.
A pause from the first call of a ``try`` block is ended by its ``except``/``finally``; a resume
without a pause of its thread's does nothing. A forked child keeps only its own thread's pauses
(``_rsoptim.reset_after_fork``).

:func:`at_resume` has the innermost pause's resume call an undo first. A context manager whose
``__exit__`` is :func:`resume` itself (``collector_paused``, ``native_reads``) thus has its exit
run entirely: a Python ``__exit__`` can be interrupted by such an exception before its first
line, and what it was to restore stays as it was. (It ends the thread's innermost pause, so a
``with`` body must end the pauses it starts, as rsoptim's do.)

What it cannot stop: another thread (or a mode run as the caller's) that calls ``gc.enable()`` or
``gc.collect()`` meanwhile; and the last resume enables the collector if it was enabled at the
first pause, even if another thread disabled it in between.
"""

from __future__ import annotations

from . import _rsoptim

pause = _rsoptim.pause_collector
resume = _rsoptim.resume_collector
at_resume = _rsoptim.at_resume


class collector_paused:
    """No garbage collection starts inside (nests, and works across threads). ``__enter__`` and
    ``__exit__`` are the extension's functions themselves, so that nothing runs between the
    pause and the ``with`` block that ends it."""

    __slots__ = ()
    __enter__ = pause
    __exit__ = resume
