"""oneMKL's CBLAS GEMMs on host-addressable device memory (CPU devices).

On a CPU SYCL device, USM allocations are ordinary host memory, so oneMKL's host BLAS can
run on the device arrays in place, threaded by oneMKL itself rather than by the OpenCL CPU
runtime. Two reasons to, measured on the project's machine:

- bfloat16: dpnp has no bfloat16 dtype, so ``dpnp.matmul`` needs float32 copies of bf16
  weights and runs at float32 speed. ``cblas_gemm_bf16bf16f32`` takes bf16 inputs with
  float32 accumulation and output (AMX or AVX512-BF16 where the CPU has them): 610 against
  196 GFLOP/s for ``dpnp.matmul`` in float32.
- float32: kernels run by the OpenCL CPU runtime (``dpnp.matmul``'s oneMKL SYCL GEMM and
  numba-dpex kernels alike) streamed weights at 10-13 GB/s, ``cblas_sgemm`` on the same
  memory at 22-24 GB/s once it sits on huge pages (:mod:`dpmoe.pages`); and
  ``cblas_sgemm_batch`` takes every expert's GEMM in one call, with no launch per expert.

On other devices (GPUs) this module reports itself unavailable and the portable
``dpnp.matmul`` path runs; ``DPMOE_NO_HOST_ONEMKL=1`` forces that path on CPUs too.

The library is loaded with ``RTLD_LOCAL`` (the default of ctypes.CDLL): nothing enters the
global symbol namespace, so PyTorch loaded before or after keeps its own BLAS.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

import numpy as np

from . import _fork

_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162
_GEMM_ARGS = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                   ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
_lock = _fork.lock("dpmoe.onemkl_host")
_lib: Any = None
_load_error: str | None = None


def _load() -> Any:
    global _lib, _load_error
    with _lock:
        if _lib is None and _load_error is None:
            path = os.path.join(sys.prefix, "lib", "libmkl_rt.so.2")
            try:
                lib = ctypes.CDLL(path if os.path.exists(path) else "libmkl_rt.so.2")
                for name in ("cblas_gemm_bf16bf16f32", "cblas_gemm_bf16bf16f32_compute"):
                    getattr(lib, name).restype = None
                    getattr(lib, name).argtypes = _GEMM_ARGS
                lib.cblas_sgemv.restype = None
                lib.cblas_sgemv.argtypes = [ctypes.c_int] * 4 + [
                    ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                    ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
                lib.cblas_sgemm_batch.restype = None
                lib.cblas_sgemm_batch.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 13 + [
                    ctypes.c_int, ctypes.c_void_p]
                lib.cblas_gemm_bf16bf16f32_pack_get_size.restype = ctypes.c_size_t
                lib.cblas_gemm_bf16bf16f32_pack_get_size.argtypes = [ctypes.c_int] * 4
                lib.cblas_gemm_bf16bf16f32_pack.restype = None
                lib.cblas_gemm_bf16bf16f32_pack.argtypes = [ctypes.c_int] * 6 + [
                    ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
            except (OSError, AttributeError) as exc:
                _load_error = str(exc)
                return None
            _lib = lib
    return _lib


def available(queue: Any) -> bool:
    """Whether host GEMMs can run in place on ``queue``'s memory."""
    if os.environ.get("DPMOE_NO_HOST_ONEMKL", "") not in ("", "0"):
        return False
    return bool(queue.sycl_device.is_cpu) and _load() is not None


def _pointer(d: Any) -> int:
    return d.get_array()._pointer


def gemm(a: Any, a_row: int, b: Any, b_offset: int, c: Any, c_row: int,
         m: int, n: int, k: int, trans_b: bool = False) -> None:
    """bf16: ``c[c_row:c_row+m] = a[a_row:a_row+m] @ B`` with B the [k, n] matrix (or [n, k]
    with ``trans_b``) starting at element ``b_offset`` of ``b``.

    ``a`` [*, k] and ``b`` uint16 bf16 bits, ``c`` [*, n] float32, all C-contiguous device
    arrays on a CPU queue with no kernel still writing them.
    """
    _lib.cblas_gemm_bf16bf16f32(_ROW_MAJOR, _NO_TRANS, _TRANS if trans_b else _NO_TRANS, m, n, k,
                                1.0, int(_pointer(a) + 2 * a_row * k), k,
                                int(_pointer(b) + 2 * b_offset), k if trans_b else n, 0.0,
                                int(_pointer(c) + 4 * c_row * n), n)


def gemm_batch(a: Any, products: list, segments: list, n: int, k: int,
               trans_b: bool = False, a_rows: list | None = None) -> None:
    """float32: for each ``(b, c)`` of ``products`` and each ``(expert, first, count)`` of
    ``segments``, ``c[first:first+count] = a[first:first+count] @ B`` with B the expert-th
    [k, n] matrix of ``b`` ([n, k] with ``trans_b``); all in one ``cblas_sgemm_batch`` call.
    ``a_rows``: per segment, the row of ``a`` to start at instead of ``first``. Arrays as in
    :func:`gemm`, float32.

    One call lets oneMKL schedule every GEMM at once (measured 1.1-1.8x faster than one call
    per expert at 16-1024 tokens); oneMKL has no batched bf16 GEMM. Experts with a single row
    go through ``cblas_sgemv`` instead, one call each: the batched GEMM streamed such
    matrix-vector products at about half the bandwidth (qwen-moe's gate and up at 16 tokens,
    about half the experts with one row: 52 -> 45 ms with B as is, 61 -> 31 ms transposed).
    """
    pairs = list(zip(segments, a_rows or [s[1] for s in segments]))
    a_base = _pointer(a)
    if any(m == 1 for (_, _, m), _ in pairs):
        # y = B x for B [n, k], y = B^T x for B [k, n] (row-major, ld = its row length)
        b_rows, b_cols = (n, k) if trans_b else (k, n)
        for b, c in products:
            b_base, c_base = _pointer(b), _pointer(c)
            for (expert, first, m), a_row in pairs:
                if m == 1:
                    _lib.cblas_sgemv(_ROW_MAJOR, _NO_TRANS if trans_b else _TRANS, b_rows,
                                     b_cols, 1.0, b_base + 4 * expert * k * n, b_cols,
                                     a_base + 4 * a_row * k, 1, 0.0, c_base + 4 * first * n, 1)
        pairs = [p for p in pairs if p[0][2] > 1]
    if not pairs:
        return
    count = len(pairs) * len(products)
    # plain ctypes arrays: building them with NumPy cost 90 us a call, more than small GEMMs
    a_ptrs, b_ptrs, c_ptrs, rows = [], [], [], []
    for b, c in products:
        b_base, c_base = _pointer(b), _pointer(c)
        for (expert, first, m), a_row in pairs:
            a_ptrs.append(a_base + 4 * a_row * k)
            b_ptrs.append(b_base + 4 * expert * k * n)
            c_ptrs.append(c_base + 4 * first * n)
            rows.append(m)
    ints, floats, pointers = ctypes.c_int * count, ctypes.c_float * count, ctypes.c_void_p * count
    _lib.cblas_sgemm_batch(
        _ROW_MAJOR, ints(*[_NO_TRANS] * count), ints(*[_TRANS if trans_b else _NO_TRANS] * count),
        ints(*rows), ints(*[n] * count), ints(*[k] * count), floats(*[1.0] * count),
        pointers(*a_ptrs), ints(*[k] * count), pointers(*b_ptrs),
        ints(*[k if trans_b else n] * count), floats(*[0.0] * count), pointers(*c_ptrs),
        ints(*[n] * count), count, ints(*[1] * count))


def packed_size(n: int, k: int) -> int:
    """Bytes of one [k, n] B matrix in oneMKL's packed bf16 format."""
    return int(_lib.cblas_gemm_bf16bf16f32_pack_get_size(_B_MATRIX, 1, n, k))


def pack(b: Any, b_offset: int, n: int, k: int, trans_b: bool = False) -> np.ndarray:
    """The [k, n] matrix at element ``b_offset`` of bf16-bits device array ``b``, packed.

    Packed weights make small-M GEMMs 2-3x faster (no re-formatting of B per call: measured
    0.40 against 1.19 ms for M = 32, K = 1024, N = 3584) at 2.4x the bf16 bytes.
    """
    dest = np.empty(packed_size(n, k), dtype=np.uint8)
    _lib.cblas_gemm_bf16bf16f32_pack(_ROW_MAJOR, _B_MATRIX, _TRANS if trans_b else _NO_TRANS,
                                     1, n, k, int(_pointer(b) + 2 * b_offset),
                                     k if trans_b else n, dest.ctypes.data)
    return dest


def gemm_packed(a: Any, a_row: int, packed: np.ndarray, c: Any, c_row: int,
                m: int, n: int, k: int) -> None:
    """Like :func:`gemm` with B from :func:`pack`."""
    _lib.cblas_gemm_bf16bf16f32_compute(_ROW_MAJOR, _NO_TRANS, _PACKED, m, n, k, 1.0,
                                        int(_pointer(a) + 2 * a_row * k), k, packed.ctypes.data,
                                        n, 0.0, int(_pointer(c) + 4 * c_row * n), n)
