"""Weighted reduction: each token's k expert outputs, summed with its routing weights."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import reference, validation
from .arrays import empty, flat, from_device, to_device, to_host, weights_to_device
from .device import dpnp, placement, returns_numpy


def weighted_sum(rows: Any, rows_kind: str, row_of_slot: Any, weights: Any, ids: Any,
                 out: Any, out_kind: str, top_k: int, renormalize: bool,
                 bias: Any = None, bias_kind: str = "float32", n_parts: int = 1,
                 part_rows: int = 0, scale: float = 1.0) -> None:
    """``out[t] = scale * sum_j w[t, j] / (sum_j w[t, j] if renormalize) * (rows[row(t, j)] + bias[e])``,
    skipping slots whose row is -1 (their expert is on another device).

    With ``n_parts`` > 1, ``rows`` holds that many split-K partial buffers of ``part_rows``
    rows each, summed in order.
    """
    from .kernels.reduction import make_weighted_sum_kernel

    num_tokens, n_cols = out.shape
    has_bias = bias is not None
    make_weighted_sum_kernel(rows_kind, bias_kind, out_kind)(
        flat(rows), row_of_slot, weights, ids,
        flat(bias) if has_bias else weights,  # never read without a bias
        flat(out), num_tokens, n_cols, top_k, has_bias, renormalize, n_parts, part_rows,
        scale,
    )


def moe_sum(expert_out: Any, topk_weights: Any, out: Any = None, *, device: Any = None) -> Any:
    """``out[t] = sum_j topk_weights[t, j] * expert_out[t, j]``, summed in slot order.

    Deterministic: no atomics, each output element is one work-item's sum over j = 0..k-1.

    Args:
        expert_out: [T, k, H] float32/float16/bfloat16.
        topk_weights: [T, k] float weights.
        out: optional [T, H] array of expert_out's dtype to write into.
        device: where NumPy inputs run.

    Returns:
        ``out`` or a new [T, H] array of expert_out's dtype.
    """
    kind = validation.float_array("expert_out", expert_out, 3)
    num_tokens, top_k, hidden = expert_out.shape
    validation.routing_weights("topk_weights", topk_weights, (num_tokens, top_k))
    arrays = {"expert_out": expert_out, "topk_weights": topk_weights}
    if out is not None:
        validation.output("out", out, (num_tokens, hidden), "[T, H]", kind, returns_numpy(arrays))
    queue = placement(arrays if out is None else {**arrays, "out": out}, {kind}, device)
    if queue is None:
        result = reference.moe_sum(to_host(expert_out), to_host(topk_weights))
    else:
        result = empty((num_tokens, hidden), kind, queue)
        if result.size:
            slots = dpnp.arange(num_tokens * top_k, dtype=np.int32, sycl_queue=queue)
            weighted_sum(to_device(expert_out, queue), kind, slots,
                         weights_to_device(topk_weights, queue), slots, result, kind, top_k, False)
        result = from_device(result, kind, returns_numpy(arrays))
    if out is None:
        return result
    out[...] = result
    return out
