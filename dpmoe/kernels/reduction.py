"""Weighted reduction of the k expert rows of each token, in slot order (no atomics)."""

from functools import lru_cache

import numpy as np
import numba_dpex as dpex
from numba_dpex import kernel_api as kapi

from .launch import call

from .numerics import loader, storer

# What 0/0 gives. numba turns a float division by zero into a ZeroDivisionError, which in a
# kernel silently ends the work-item before its store (the output kept whatever the memory
# held), so kernels test for a zero denominator and write this instead.
NAN = np.float32(np.nan)


@lru_cache(maxsize=None)
def make_weighted_sum_kernel(rows_kind: str, bias_kind: str, out_kind: str):
    load_row = loader(rows_kind)
    load_bias = loader(bias_kind)
    store = storer(out_kind)

    @dpex.kernel
    def weighted_sum_kernel(
        item: kapi.Item,
        rows,  # IN  (n_parts * part_rows * N) expert outputs, any float kind, summed over parts
        row_of_slot,  # IN  (T * k) int32 row of each slot in ``rows``
        weights,  # IN  (T * k) float32
        ids,  # IN  (T * k) int32 expert of each slot (for the bias)
        bias,  # IN  (E * N) any float kind, read only when has_bias
        out,  # OUT (T * N)
        n_cols,
        top_k,
        has_bias,
        renormalize,
        n_parts,
        part_rows,
        scale,
    ):
        col = item.get_id(0)  # columns along the vector lanes: their loads are contiguous
        t = item.get_id(1)
        total = np.float32(1.0)  # dividing by 1 is exact: one code path for both cases
        if renormalize != 0:
            total = np.float32(0.0)
            for j in range(top_k):
                total += weights[t * top_k + j]
        acc = np.float32(0.0)
        if total == 0:  # weights summing to 0 under renormalize: 0/0 (see NAN)
            total = NAN
        for j in range(top_k):
            s = t * top_k + j
            if row_of_slot[s] < 0:  # expert on another device: contributes nothing here
                continue
            v = np.float32(0.0)
            for p in range(n_parts):  # split-K partial sums, in a fixed order
                v += load_row(rows, (p * part_rows + row_of_slot[s]) * n_cols + col)
            if has_bias != 0:
                v += load_bias(bias, ids[s] * n_cols + col)
            acc += (weights[s] / total) * v
        store(out, t * n_cols + col, acc * scale)

    def launch(rows, row_of_slot, weights, ids, bias, out, num_tokens, n_cols, top_k,
               has_bias, renormalize, n_parts, part_rows, scale):
        call(
            weighted_sum_kernel, dpex.Range(n_cols, num_tokens), rows, row_of_slot,
            weights, ids, bias, out, n_cols, top_k, int(has_bias), int(renormalize),
            n_parts, part_rows, np.float32(scale),
        )

    return launch
