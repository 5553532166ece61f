"""The per-token path: fused GEMVs that read expert weights where they lie, in their kind.

For a few tokens the GEMMs are matrix-vector products bound by reading the weights; these
kernels read each routed expert's weights in place (no gather, no float32 copy) and widen
16-bit weights in registers. One work-item per output element; neighbouring work-items read
neighbouring columns of the same weight row.
"""

from functools import lru_cache

import numpy as np
import numba_dpex as dpex
from numba_dpex import kernel_api as kapi

from .activation import silu_f32
from .numerics import loader, storer


@lru_cache(maxsize=None)
def make_gate_up_gemv_kernel(x_kind: str, w_kind: str):
    load_x = loader(x_kind)
    load_w = loader(w_kind)

    @dpex.kernel
    def gate_up_gemv_kernel(
        item: kapi.Item,
        x,  # IN  (T * H) tokens
        gate_w,  # IN  (E * H * I)
        up_w,  # IN  (E * H * I)
        ids,  # IN  (T * k) int32
        act,  # OUT (T * k * I) float32 silu(x @ gate) * (x @ up) per slot
        hidden,
        inter,
        top_k,
    ):
        i = item.get_id(0)
        s = i // inter
        col = i - s * inter
        x_base = (s // top_k) * hidden
        w_base = ids[s] * hidden * inter + col
        g = np.float32(0.0)
        u = np.float32(0.0)
        for h in range(hidden):
            xv = load_x(x, x_base + h)
            g += xv * load_w(gate_w, w_base + h * inter)
            u += xv * load_w(up_w, w_base + h * inter)
        act[i] = silu_f32(g) * u

    def launch(x, gate_w, up_w, ids, act, n_slots, hidden, inter, top_k):
        dpex.call_kernel(
            gate_up_gemv_kernel, dpex.Range(n_slots * inter), x, gate_w, up_w, ids, act,
            hidden, inter, top_k,
        )

    return launch


@lru_cache(maxsize=None)
def make_down_gemv_sum_kernel(w_kind: str, out_kind: str):
    load_w = loader(w_kind)
    store = storer(out_kind)

    @dpex.kernel
    def down_gemv_sum_kernel(
        item: kapi.Item,
        act,  # IN  (T * k * I) float32
        down_w,  # IN  (E * I * H)
        weights,  # IN  (T * k) float32
        ids,  # IN  (T * k) int32
        out,  # OUT (T * H)
        hidden,
        inter,
        top_k,
        renormalize,
    ):
        i = item.get_id(0)
        t = i // hidden
        col = i - t * hidden
        total = np.float32(1.0)
        if renormalize != 0:
            total = np.float32(0.0)
            for j in range(top_k):
                total += weights[t * top_k + j]
        acc = np.float32(0.0)
        for j in range(top_k):
            s = t * top_k + j
            w_base = ids[s] * inter * hidden + col
            y = np.float32(0.0)
            for r in range(inter):
                y += act[s * inter + r] * load_w(down_w, w_base + r * hidden)
            acc += (weights[s] / total) * y
        store(out, i, acc)

    def launch(act, down_w, weights, ids, out, num_tokens, hidden, inter, top_k, renormalize):
        dpex.call_kernel(
            down_gemv_sum_kernel, dpex.Range(num_tokens * hidden), act, down_w, weights, ids,
            out, hidden, inter, top_k, int(renormalize),
        )

    return launch
