"""Intermediate buffers reused from call to call on the host-GEMM path (CPU devices).

A prefill's intermediates are tens of MiB (Mixtral-size T = 1024: 29 MiB each for the gate
and up products). Freshly allocated memory is mapped page by page as the GEMMs first write
it, which made oneMKL's bf16 GEMMs 1.45x slower (611 against 889 GFLOP/s, measured) than
writing into memory a previous call had touched. So the host path takes its intermediates
from here: one buffer per name, per thread (calls from several threads never share one),
per queue, grown when a call needs more and kept until :func:`clear`. Only code whose
device work has finished when the call returns may use it (the host GEMMs and the kernel
launches of that path are synchronous); results handed to the caller are never from here.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .arrays import _view, empty

_local = threading.local()


def buffer(name: str, shape: tuple[int, ...], kind: str, queue: Any) -> Any:
    """An uninitialised device array for the intermediate ``name``, valid until the next
    request for ``name`` on this thread (``kind``: "float32" or a 16-bit kind, as bits)."""
    store = getattr(_local, "buffers", None)
    if store is None:
        store = _local.buffers = {}
    dtype = np.dtype(np.float32 if kind == "float32" else np.uint16)
    size = int(np.prod(shape))
    words = -(-size * dtype.itemsize // 4)
    held = store.get((name, queue))
    if held is None or held.size < words:
        held = store[(name, queue)] = empty((max(words, 1),), "float32", queue)
    return _view(held, tuple(shape), dtype, 0)


def clear() -> None:
    """Free this thread's buffers (the memory of the largest call so far)."""
    _local.buffers = {}
