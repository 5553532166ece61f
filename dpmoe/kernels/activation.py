"""Gated activations ``out = act(gate) * up`` (SiLU, GELU, tanh-GELU, GPT-OSS's clamped
SwiGLU) and the non-gated squared ReLU ``relu(up)**2``, one work-item per output element."""

import math
from functools import lru_cache

import numpy as np
import numba_dpex as dpex
from numba_dpex import kernel_api as kapi

from .launch import call

from .numerics import loader, storer


@dpex.device_func
def silu_f32(g):
    return g / (np.float32(1.0) + math.exp(-g))


@dpex.device_func
def silu_mul(g, u, alpha, limit):
    return silu_f32(g) * u


@dpex.device_func
def gelu_mul(g, u, alpha, limit):
    return np.float32(0.5) * g * (np.float32(1.0) + math.erf(g * np.float32(0.7071067811865476))) * u


@dpex.device_func
def gelu_tanh_mul(g, u, alpha, limit):
    inner = np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)
    return np.float32(0.5) * g * (np.float32(1.0) + math.tanh(inner)) * u


@dpex.device_func
def swigluoai_mul(g, u, alpha, limit):
    g = min(g, limit)
    u = min(max(u, -limit), limit)
    return g / (np.float32(1.0) + math.exp(-alpha * g)) * (u + np.float32(1.0))


@dpex.device_func
def relu2_up(g, u, alpha, limit):
    # non-gated: the layer hands the engine its up weights as gate too, so g == u
    r = max(u, np.float32(0.0))
    return r * r


ACTIVATION_FUNCTIONS = {"silu": silu_mul, "gelu": gelu_mul, "gelu_tanh": gelu_tanh_mul,
                        "swigluoai": swigluoai_mul, "relu2": relu2_up}


@lru_cache(maxsize=None)
def make_silu_and_mul_kernel(gate_kind: str, up_kind: str, out_kind: str,
                             activation: str = "silu", bias_kind: str | None = None,
                             col_stride: int = 1):
    """``out[row, col] = act(gate[row, col] + bg) * (up[row, col] + bu)`` for element
    positions ``row * stride + offset + col * col_stride`` of each input; with ``bias_kind``
    the biases are ``gate_bias/up_bias[row_expert[row], col]`` ([E, d] each), else 0.

    The CPU vectoriser runs neighbouring work-items in lanes and must see the loads as
    contiguous across them, else it gathers: so ``col_stride`` is a compile-time constant
    (a run-time one cost 3.3x), columns are dimension 0 of a 2-D range (the dimension the
    lanes follow; a flat index split into row and column hid the contiguity as soon as a
    row stride differed from d: 3x), and gate/up/out held as plain [rows, d] rows go
    through a 1-D range on the flat index (2x faster again).
    """
    load_gate = loader(gate_kind)
    load_up = loader(up_kind)
    store = storer(out_kind)
    act_mul = ACTIVATION_FUNCTIONS[activation]
    has_bias = bias_kind is not None
    load_bias = loader(bias_kind or "float32")

    @dpex.kernel
    def act_and_mul_rows_kernel(
        item: kapi.Item,
        gate,  # IN  gate values at row * gate_stride + col * col_stride
        up,  # IN  up values at row * up_stride + up_offset + col * col_stride
        out,  # OUT rows of d elements (may be ``gate`` itself: each element is read first)
        d,
        gate_stride,
        up_stride,
        up_offset,
        alpha,
        limit,
        row_expert,  # IN (rows) int32 expert of each row, read only with biases
        gate_bias,  # IN (E * d), read only with biases
        up_bias,  # IN (E * d), read only with biases
    ):
        col = item.get_id(0)
        row = item.get_id(1)
        g = load_gate(gate, row * gate_stride + col * col_stride)
        u = load_up(up, row * up_stride + up_offset + col * col_stride)
        if has_bias:
            at = row_expert[row] * d + col
            g += load_bias(gate_bias, at)
            u += load_bias(up_bias, at)
        store(out, row * d + col, act_mul(g, u, alpha, limit))

    @dpex.kernel
    def act_and_mul_flat_kernel(item: kapi.Item, gate, up, out, alpha, limit):
        i = item.get_id(0)
        store(out, i, act_mul(load_gate(gate, i), load_up(up, i), alpha, limit))

    def launch(gate, up, out, rows, d, gate_stride, up_stride, up_offset,
               alpha=1.702, limit=7.0, row_expert=None, gate_bias=None, up_bias=None):
        alpha, limit = np.float32(alpha), np.float32(limit)
        if not has_bias and col_stride == 1 and gate_stride == up_stride == d and up_offset == 0:
            call(act_and_mul_flat_kernel, dpex.Range(rows * d), gate, up, out, alpha, limit)
            return
        call(
            act_and_mul_rows_kernel, dpex.Range(d, rows), gate, up, out, d,
            gate_stride, up_stride, up_offset, alpha, limit,
            # without biases the arrays are never read: any array of the right kind will do
            gate if row_expert is None else row_expert,
            gate if gate_bias is None else gate_bias, gate if up_bias is None else up_bias,
        )

    return launch
