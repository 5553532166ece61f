"""Expert routing: gating logits -> (top-k weights, top-k expert ids)."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import reference, validation
from .arrays import to_device, to_host
from .device import dpnp, placement, returns_numpy


def topk_softmax(
    gating_logits: Any, top_k: int, renormalize: bool = False, *, device: Any = None
) -> tuple[Any, Any]:
    """Softmax over all experts in float32, then the top-k experts of each token.

    Args:
        gating_logits: [T, E] float32, float16 or bfloat16 router logits, finite.
        top_k: experts per token, 1 <= top_k <= E.
        renormalize: divide each token's k weights by their sum.
        device: where NumPy inputs run (dpnp inputs run where they are).

    Returns:
        ``(topk_weights [T, k] float32, topk_ids [T, k] int32)``, NumPy for NumPy input,
        dpnp on the input's queue otherwise. Ties pick the smaller expert index.

    Example: logits [[1, 3, 2]] with top_k=2 gives ids [[1, 2]] and weights
    [[0.665, 0.245]] (softmax over all three experts).
    """
    kind = validation.float_array("gating_logits", gating_logits, ndim=2)
    num_tokens, num_experts = gating_logits.shape
    if num_experts == 0:
        raise ValueError("gating_logits must have at least one expert column, got shape "
                         f"{tuple(gating_logits.shape)}")
    top_k = validation.positive_int("top_k", top_k, 1, num_experts)
    validation.finite("gating_logits", gating_logits)
    arrays = {"gating_logits": gating_logits}
    queue = placement(arrays, {kind}, device)
    if queue is None:
        return reference.topk_softmax(to_host(gating_logits), top_k, renormalize)
    weights, ids = route_on_device(to_device(gating_logits, queue), kind, top_k, renormalize)
    if returns_numpy(arrays):
        return dpnp.asnumpy(weights), dpnp.asnumpy(ids)
    return weights, ids


def route_on_device(logits: Any, kind: str, top_k: int, renormalize: bool) -> tuple[Any, Any]:
    """topk_softmax on validated, finite device ``logits`` [T, E] in storage form."""
    from .kernels.routing import make_topk_softmax_kernel

    num_tokens, num_experts = logits.shape
    queue = logits.sycl_queue
    weights = dpnp.empty((num_tokens, top_k), dtype=np.float32, sycl_queue=queue)
    ids = dpnp.empty((num_tokens, top_k), dtype=np.int32, sycl_queue=queue)
    if num_tokens > 0:
        make_topk_softmax_kernel(kind)(
            logits.reshape(-1), weights.reshape(-1), ids.reshape(-1), num_tokens, num_experts,
            top_k, bool(renormalize),
        )
    return weights, ids
