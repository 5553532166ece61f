"""Moving rows into the layouts the batched GEMM wants, widened to float32."""

from functools import lru_cache

import numpy as np

import numba_dpex as dpex
from numba_dpex import kernel_api as kapi

from .launch import call

from .numerics import loader, storer


@lru_cache(maxsize=None)
def make_gather_rows_kernel(src_kind: str, dst_kind: str):
    load = loader(src_kind)
    store = storer(dst_kind)

    @dpex.kernel
    def gather_rows_kernel(
        item: kapi.Item,
        src,  # IN  (T * K) any float kind, token rows
        row_of_slot,  # IN  (n_slots) int32 destination row of each slot
        dst,  # OUT (rows * K) dst_kind; rows no slot maps to are left untouched
        row_len,
        top_k,
    ):
        col = item.get_id(0)  # columns along the vector lanes: their loads are contiguous
        slot = item.get_id(1)
        row = row_of_slot[slot]
        if row >= 0:  # -1: the slot's expert is not on this device
            store(dst, row * row_len + col, load(src, (slot // top_k) * row_len + col))

    def launch(src, row_of_slot, dst, n_slots, row_len, top_k):
        call(
            gather_rows_kernel, dpex.Range(row_len, n_slots), src, row_of_slot, dst,
            row_len, top_k,
        )

    return launch


@lru_cache(maxsize=None)
def make_convert_kernel(src_kind: str, dst_kind: str):
    """Elementwise storage conversion (widening 16-bit to float32, or rounding back)."""
    load = loader(src_kind)
    store = storer(dst_kind)

    @dpex.kernel
    def convert_kernel(item: kapi.Item, src, dst):
        i = item.get_id(0)
        store(dst, i, load(src, i))

    def launch(src, dst):
        call(convert_kernel, dpex.Range(src.shape[0]), src, dst)

    return launch


@lru_cache(maxsize=None)
def make_stacked_rows_kernel():
    """Row of each slot in the stacked layout: ``expert * rows_per_expert + rank``, -1 for
    slots of experts on another device."""

    @dpex.kernel
    def stacked_rows_kernel(
        item: kapi.Item,
        ids,  # IN  (n_slots) int32 local expert ids, -1 = not local
        ranks,  # IN  (n_slots) int32 position among the expert's slots
        rows,  # OUT (n_slots) int32
        rows_per_expert,
    ):
        s = item.get_id(0)
        e = ids[s]
        rows[s] = -1 if e < 0 else e * rows_per_expert + ranks[s]

    def launch(ids, ranks, rows, rows_per_expert):
        call(stacked_rows_kernel, dpex.Range(ids.shape[0]), ids, ranks, rows,
             np.int32(rows_per_expert))

    return launch
