"""Transposing a matrix on the device: checkpoints store expert matrices for ``x @ W^T``
([out, in]) and dpmoe keeps them for ``x @ W`` ([in, out]), so loading transposes each one.

A work-item moves ``pack`` source rows of one column into one destination word (2 or 4
16-bit values as a uint32/uint64, 2 float32 values as a uint64): the stores are whole
words, and a work-group of (8, 64) items walks a source tile that stays in cache. Measured
on a 2-core Xeon (AMX) VM for a [2048, 1024] bf16 matrix: 0.65 GB/s one element per
item over a plain range, 3.5 GB/s in (32, 32) work-groups, 4.8-5.1 GB/s packed; NumPy's
copy of a transposed view 0.3 GB/s (1.5-2.4 GB/s in blocks).
"""

from functools import lru_cache

import numpy as np

import numba_dpex as dpex
from numba_dpex import kernel_api as kapi

from .launch import call

GROUP = (8, 64)


def packing(itemsize: int, rows: int) -> int:
    """Source rows per destination word for elements of ``itemsize`` bytes (1: none)."""
    for pack in (4, 2):
        if pack * itemsize <= 8 and rows % pack == 0:
            return pack
    return 1


@lru_cache(maxsize=None)
def make_transpose_kernel(itemsize: int, pack: int):
    """``dst[c, r] = src[r, c]`` for a C-contiguous src [rows, cols] of ``itemsize``-byte
    elements (read as unsigned integers of that size) and dst [cols, rows] seen as words of
    ``pack`` elements; rows must be a multiple of ``pack``."""
    word = {4: np.uint32, 8: np.uint64}.get(itemsize * pack, np.dtype(f"u{itemsize}").type)
    shift = 8 * itemsize

    @dpex.kernel
    def transpose_kernel(nd: kapi.NdItem, src, dst, rows, cols, dst_offset):
        p = nd.get_global_id(0)  # a word of dst: source rows pack * p ...
        c = nd.get_global_id(1)
        if p < rows // pack and c < cols:
            at = pack * p * cols + c
            value = word(src[at])
            for j in range(1, pack):  # unrolled: pack is a constant
                value |= word(src[at + j * cols]) << word(j * shift)
            dst[dst_offset + c * (rows // pack) + p] = value

    def launch(src, dst, rows, cols, dst_offset):
        """src flat (rows * cols) uints of ``itemsize``; dst flat words, the matrix starting
        at word ``dst_offset``."""
        groups = [-(-n // g) * g for n, g in zip((rows // pack, cols), GROUP)]
        call(transpose_kernel, dpex.NdRange(dpex.Range(*groups), dpex.Range(*GROUP)),
             src, dst, rows, cols, dst_offset)

    return launch
