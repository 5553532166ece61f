"""Transparent huge pages for large arrays on CPU devices.

On a CPU SYCL device, USM allocations are ordinary anonymous host memory on 4 KiB pages
(NumPy and PyTorch ask Linux for 2 MiB pages on large allocations; the SYCL runtime does
not). A GEMM streaming expert weights then misses the TLB on every page: oneMKL's float32
GEMV over one [1024, 3584] matrix measured 9-12 GB/s on dpnp memory and 22-24 GB/s on the
same memory backed by huge pages. This module asks for huge pages with ``madvise`` where
Linux allows it (``transparent_hugepage`` set to ``madvise`` or ``always``); elsewhere, and
on other devices, it does nothing. Contents never change: only the page size does.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import numpy as np

from .device import dpnp
from .memory import note_allocation

HUGE_PAGE = 2 << 20
# Below this, an array spans too few huge pages to matter.
MIN_BYTES = 8 << 20
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25  # Linux 6.1+: back already-touched pages with huge pages now

_libc: Any = None


def _madvise(address: int, length: int, advice: int) -> bool:
    global _libc
    if _libc is None:
        if not sys.platform.startswith("linux"):
            return False
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise(address, length, advice) == 0


def _huge_range(d: Any) -> tuple[int, int] | None:
    """The whole huge pages inside ``d``'s memory, when ``d`` is large host-side memory."""
    if d.nbytes < MIN_BYTES or not d.sycl_device.is_cpu:
        return None
    start = d.get_array()._pointer
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = (start + d.nbytes) // HUGE_PAGE * HUGE_PAGE
    return (first, last - first) if last > first else None


def advise(d: Any, now: bool = False) -> bool:
    """Ask for huge pages under device array ``d`` (CPU devices, >= 8 MiB).

    Pages not yet touched get huge pages when first written; with ``now``, pages already
    written are moved to huge pages before returning (about 0.1 s per GiB). Returns whether
    Linux accepted the advice (False elsewhere; never raises).
    """
    found = _huge_range(d)
    if found is None:
        return False
    accepted = _madvise(*found, _MADV_HUGEPAGE)
    if accepted and now:
        accepted = _madvise(*found, _MADV_COLLAPSE)
    return accepted


def upload(h: np.ndarray, queue: Any) -> Any:
    """C-contiguous host array -> new dpnp array on ``queue``, on huge pages when it helps."""
    import dpctl.tensor as dpt

    note_allocation(h.nbytes)
    d = dpnp.ndarray._create_from_usm_ndarray(dpt.empty(h.shape, dtype=h.dtype, sycl_queue=queue))
    if h.size == 0:
        return d
    advise(d)  # before the copy: the copy's first touch then maps huge pages
    d.get_array().usm_data.copy_from_host(h.reshape(-1).view(np.uint8))
    return d
