"""SiLU-and-mul: ``out = silu(gate) * up``, one work-item per output element."""

import math
from functools import lru_cache

import numpy as np
import numba_dpex as dpex
from numba_dpex import kernel_api as kapi

from .numerics import loader, storer


@dpex.device_func
def silu_f32(g):
    return g / (np.float32(1.0) + math.exp(-g))


@lru_cache(maxsize=None)
def make_silu_and_mul_kernel(gate_kind: str, up_kind: str, out_kind: str):
    load_gate = loader(gate_kind)
    load_up = loader(up_kind)
    store = storer(out_kind)

    @dpex.kernel
    def silu_and_mul_kernel(
        item: kapi.Item,
        gate,  # IN  rows of gate_stride elements, gate at [0, d)
        up,  # IN  rows of up_stride elements, up at [up_offset, up_offset + d)
        out,  # OUT rows of d elements (may be ``gate`` itself: each element is read first)
        d,
        gate_stride,
        up_stride,
        up_offset,
    ):
        i = item.get_id(0)
        row = i // d
        col = i - row * d
        g = load_gate(gate, row * gate_stride + col)
        u = load_up(up, row * up_stride + up_offset + col)
        store(out, i, silu_f32(g) * u)

    def launch(gate, up, out, rows, d, gate_stride, up_stride, up_offset):
        dpex.call_kernel(
            silu_and_mul_kernel, dpex.Range(rows * d), gate, up, out, d,
            gate_stride, up_stride, up_offset,
        )

    return launch
