"""Float storage kinds and moving arrays between the host and a SYCL queue.

dpmoe computes in float32 and stores float32, float16 or bfloat16. Neither NumPy nor dpnp
has bfloat16 (``ml_dtypes.bfloat16`` gives it on the host), and numba-dpex cannot type
float16 inside device functions, so on the device both 16-bit kinds travel as ``uint16``
bit patterns and kernels widen/narrow them in registers (:mod:`dpmoe.kernels.numerics`).
A dpnp ``uint16`` array passed where floats are expected is read as bfloat16 bits.
"""

from __future__ import annotations

import ctypes
from typing import Any

import ml_dtypes
import numpy as np

from .device import dpnp, is_device_array
from .memory import note_allocation
from .pages import upload

FLOAT_KINDS = ("float32", "float16", "bfloat16")
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
HOST_DTYPE = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BFLOAT16}


def float_kind(name: str, a: Any) -> str:
    """The storage kind of a float array; TypeError naming ``name`` otherwise."""
    dt = np.dtype(a.dtype)
    if dt == BFLOAT16 or (is_device_array(a) and dt == np.uint16):
        return "bfloat16"
    if dt in (np.float32, np.float16):
        return dt.name
    raise TypeError(
        f"{name} must have dtype float32, float16 or bfloat16 "
        f"(bfloat16 as ml_dtypes.bfloat16 on the host, uint16 bits in dpnp), got {dt}"
    )


# dpnp's reshape and empty cost 15-25 us a call in Python (a decode step makes dozens of
# such calls); building the dpctl array directly and wrapping it costs 2-10 us.


def view(d: Any, shape: tuple[int, ...], dtype: Any, offset: int) -> Any:
    """A C-contiguous device array ``d`` seen with another shape/dtype (no copy)."""
    import dpctl.tensor as dpt

    usm = d.get_array()
    return dpnp.ndarray._create_from_usm_ndarray(
        dpt.usm_ndarray(shape, dtype=dtype, buffer=usm.usm_data, offset=offset))


def _reinterpret(d: Any, dtype: Any) -> Any:
    """The same device memory seen as another 2-byte dtype (no copy)."""
    return view(d, tuple(d.shape), dtype, d.get_array()._element_offset)


def flat(d: Any) -> Any:
    """A device array as 1-D: a view of C-contiguous arrays, else a copy."""
    if not d.flags.c_contiguous:
        return d.reshape(-1)
    return view(d, (d.size,), d.dtype, d.get_array()._element_offset)


def to_device(a: Any, queue: Any) -> Any:
    """A C-contiguous dpnp array on ``queue``; 16-bit floats become uint16 bits."""
    if is_device_array(a):
        d = dpnp.ascontiguousarray(a)
        return _reinterpret(d, np.uint16) if d.dtype == np.float16 else d
    h = np.ascontiguousarray(a)
    if h.dtype in (np.float16, BFLOAT16):
        h = h.view(np.uint16)
    return upload(h, queue)


def from_device(d: Any, kind: str, as_numpy: bool) -> Any:
    """Back from storage form: a NumPy array of ``kind`` (a float kind, or "int32"), or a
    dpnp array (bf16 stays bits)."""
    if as_numpy:
        h = dpnp.asnumpy(d)
        return h.view(HOST_DTYPE[kind]) if kind in ("float16", "bfloat16") else h
    return _reinterpret(d, np.float16) if kind == "float16" else d


def to_host(a: Any) -> np.ndarray:
    """A NumPy array (dpnp bf16 bits become ml_dtypes.bfloat16)."""
    if not is_device_array(a):
        return np.asarray(a)
    view = host_view(a)
    h = view.copy() if view is not None else dpnp.asnumpy(a)
    return h.view(BFLOAT16) if h.dtype == np.uint16 else h


def empty(shape: tuple[int, ...], kind: str, queue: Any) -> Any:
    """An uninitialised device array in storage form (``kind`` may also be "int32")."""
    import dpctl.tensor as dpt

    dtype = np.dtype({"float32": np.float32, "int32": np.int32}.get(kind, np.uint16))
    note_allocation(int(np.prod(shape)) * dtype.itemsize)
    return dpnp.ndarray._create_from_usm_ndarray(dpt.empty(shape, dtype=dtype, sycl_queue=queue))


def host_view(d: Any) -> np.ndarray | None:
    """A NumPy view of C-contiguous device array ``d`` on a CPU device, once its queue is
    idle (device memory is host memory there: reading it in place costs microseconds, a
    dpnp reduction or copy tens of them); None elsewhere. Read it, don't keep it."""
    if not (d.flags.c_contiguous and d.sycl_device.is_cpu):
        return None
    d.sycl_queue.wait()
    if d.size == 0:
        return np.empty(d.shape, d.dtype)
    buffer = (ctypes.c_char * d.nbytes).from_address(d.get_array()._pointer)
    return np.frombuffer(buffer, dtype=d.dtype).reshape(d.shape)


def as_words(d: Any, dtype: Any = np.uint32) -> Any:
    """A 1-D device array seen as wider unsigned words (uint16 pairs as uint32 by default;
    uint64 for four 16-bit or two float32 elements), or None when it does not divide
    into whole, aligned words."""
    per_word = np.dtype(dtype).itemsize // d.dtype.itemsize
    if per_word == 1:
        return d
    offset = d.get_array()._element_offset
    if d.size % per_word or offset % per_word or not d.flags.c_contiguous:
        return None
    return view(d, (d.size // per_word,), dtype, offset // per_word)


def transposed_base(a: Any) -> Any:
    """The C-contiguous [E, N, K] array that 3-D ``a`` [E, K, N] is a transposed view of
    (NumPy or dpnp: weights as checkpoints and PyTorch store them, for ``x @ W^T``), or
    None when ``a`` is not such a view (or is C-contiguous itself)."""
    if getattr(a, "ndim", 0) != 3 or not hasattr(a, "flags") or a.flags.c_contiguous:
        return None
    base = a.transpose((0, 2, 1))
    return base if base.flags.c_contiguous else None
