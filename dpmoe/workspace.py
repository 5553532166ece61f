"""Intermediate buffers reused from call to call on the host-GEMM path (CPU devices).

A prefill's intermediates are tens of MiB (Mixtral-size T = 1024: 29 MiB each for the gate
and up products). Freshly allocated memory is mapped page by page as the GEMMs first write
it, which made oneMKL's bf16 GEMMs 1.45x slower (611 against 889 GFLOP/s, measured) than
writing into memory a previous call had touched. So a call takes a set of buffers from the
:class:`Workspace` for its duration (:meth:`Workspace.session`), and hands it back after:
concurrent calls never share a set, and sets outlive their threads only within the
workspace's bound on the bytes it keeps (:data:`DEFAULT_LIMIT`; the rest is freed when its
call ends). :func:`clear` frees every kept set, whichever thread used it.
"""

from __future__ import annotations

import numbers

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from . import _fork
from .arrays import empty, view

# Bytes of idle buffers kept between calls, all threads together: one prefill of the
# benchmark's shapes (DeepSeek-lite at T = 1024 needs about 150 MiB) stays warm; beyond it,
# sets are freed when their call ends.
DEFAULT_LIMIT = 256 << 20


class Buffers:
    """One call's named buffers on one queue (see :meth:`buffer`)."""

    def __init__(self, queue: Any):
        self.queue = queue
        self._held: dict[str, Any] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._held.values())

    def buffer(self, name: str, shape: tuple[int, ...], kind: str) -> Any:
        """An uninitialised array for the intermediate ``name``, valid until the next request
        for ``name`` in this set (``kind``: "float32" or a 16-bit kind, as bits)."""
        dtype = np.dtype(np.float32 if kind == "float32" else np.uint16)
        words = -(-int(np.prod(shape)) * dtype.itemsize // 4)
        held = self._held.get(name)
        if held is None or held.size < words:
            self._held.pop(name, None)  # freed before its larger successor is allocated
            held = self._held[name] = empty((max(words, 1),), "float32", self.queue)
        return view(held, tuple(shape), dtype, 0)


class Workspace:
    """Sets of reusable buffers, checked out one per running call, kept within ``limit``."""

    def __init__(self, limit: int = DEFAULT_LIMIT):
        self.limit = int(limit)
        self._idle: list[Buffers] = []
        self._lock = _fork.lock("dpmoe.workspace")
        self._generation = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of the idle sets kept for later calls."""
        with self._lock:
            return sum(s.nbytes for s in self._idle)

    @contextmanager
    def session(self, queue: Any) -> Iterator[Buffers]:
        """A set of buffers for one call on ``queue``, returned to the workspace (or freed)
        when the block ends. Device work writing them must have finished by then."""
        with self._lock:
            found = next((s for s in self._idle if s.queue == queue), None)
            if found is not None:
                self._idle.remove(found)
            generation = self._generation
        buffers = found or Buffers(queue)
        try:
            yield buffers
        finally:
            with self._lock:
                kept = sum(s.nbytes for s in self._idle)
                if generation == self._generation and kept + buffers.nbytes <= self.limit:
                    self._idle.append(buffers)

    def clear(self) -> None:
        """Free every idle set now, and the sets of running calls when they end."""
        with self._lock:
            self._idle = []
            self._generation += 1


WORKSPACE = Workspace()


def clear() -> None:
    """Free the reused intermediate buffers of every thread (see :class:`Workspace`)."""
    WORKSPACE.clear()


def set_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of idle buffers between calls (0: keep none)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__} {nbytes!r}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    nbytes = int(nbytes)
    WORKSPACE.limit = nbytes
    if WORKSPACE.held_bytes > nbytes:
        WORKSPACE.clear()
