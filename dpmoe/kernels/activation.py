"""Gated activations ``out = act(gate) * up`` (SiLU, GELU, tanh-GELU, GPT-OSS's clamped
SwiGLU), one work-item per output element."""

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


_ACTIVATIONS = {"silu": silu_mul, "gelu": gelu_mul, "gelu_tanh": gelu_tanh_mul,
                "swigluoai": swigluoai_mul}


@lru_cache(maxsize=None)
def make_silu_and_mul_kernel(gate_kind: str, up_kind: str, out_kind: str,
                             activation: str = "silu", bias_kind: str | None = None):
    """``out[row, col] = act(gate[row, col] + bg) * (up[row, col] + bu)`` for element
    positions ``row * stride + offset + col * col_stride`` of each input; with ``bias_kind``
    the biases are ``gate_bias/up_bias[row_expert[row], col]`` ([E, d] each), else 0."""
    load_gate = loader(gate_kind)
    load_up = loader(up_kind)
    store = storer(out_kind)
    act_mul = _ACTIVATIONS[activation]
    has_bias = bias_kind is not None
    load_bias = loader(bias_kind or "float32")

    @dpex.kernel
    def act_and_mul_kernel(
        item: kapi.Item,
        gate,  # IN  gate values at row * gate_stride + col * col_stride
        up,  # IN  up values at row * up_stride + up_offset + col * col_stride
        out,  # OUT rows of d elements (may be ``gate`` itself: each element is read first)
        d,
        gate_stride,
        up_stride,
        up_offset,
        col_stride,
        alpha,
        limit,
        row_expert,  # IN (rows) int32 expert of each row, read only with biases
        gate_bias,  # IN (E * d), read only with biases
        up_bias,  # IN (E * d), read only with biases
    ):
        i = item.get_id(0)
        row = i // d
        col = i - row * d
        g = load_gate(gate, row * gate_stride + col * col_stride)
        u = load_up(up, row * up_stride + up_offset + col * col_stride)
        if has_bias:
            at = row_expert[row] * d + col
            g += load_bias(gate_bias, at)
            u += load_bias(up_bias, at)
        store(out, i, act_mul(g, u, alpha, limit))

    def launch(gate, up, out, rows, d, gate_stride, up_stride, up_offset, col_stride=1,
               alpha=1.702, limit=7.0, row_expert=None, gate_bias=None, up_bias=None):
        call(
            act_and_mul_kernel, dpex.Range(rows * d), gate, up, out, d,
            gate_stride, up_stride, up_offset, col_stride, np.float32(alpha), np.float32(limit),
            # without biases the arrays are never read: any array of the right kind will do
            gate if row_expert is None else row_expert,
            gate if gate_bias is None else gate_bias, gate if up_bias is None else up_bias,
        )

    return launch
