"""Weighted reduction: each token's k expert outputs, summed with its routing weights."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import reference, validation
from ._dispatch import call, host, write_back
from ._engine.convert import weights_to_device
from ._engine.reduce import weighted_sum
from .arrays import empty, to_device
from .device import returns_numpy
from .pages import upload


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
        validation.output("out", out, (num_tokens, hidden), "[T, H]", kind,
                          returns_numpy(arrays))

    def on_device(queue: Any) -> Any:
        result = empty((num_tokens, hidden), kind, queue)
        if result.size:
            slots = upload(np.arange(num_tokens * top_k, dtype=np.int32), queue)
            weighted_sum(to_device(expert_out, queue), kind, slots,
                         weights_to_device(topk_weights, queue), slots, result, kind, top_k, False)
        return result

    result = call({**arrays, "out": out}, {kind}, device,
                  lambda: reference.moe_sum(host(expert_out), host(topk_weights)), on_device, kind)
    return result if out is None else write_back(out, result)
