"""Expert routing: gating logits -> (top-k weights, top-k expert ids).

Three conventions, all with ties going to the smaller expert index:
- :func:`topk_softmax`: softmax over all experts, then top-k (Mixtral, Qwen-MoE, OLMoE), or
  ``scoring="softmax_after_topk"``: top-k logits, then softmax over those k (GPT-OSS);
- :func:`topk_sigmoid`: sigmoid scores, optional selection bias;
- :func:`grouped_topk`: best expert groups first, then experts inside them (DeepSeek-V3).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import reference, validation
from .arrays import empty, flat, to_device, to_host
from .device import dpnp, placement, returns_numpy

SCORINGS = ("softmax", "softmax_after_topk")
SCORE_FUNCS = ("softmax", "sigmoid")


def _check_logits(gating_logits: Any, top_k: Any) -> tuple[str, int, int, int]:
    kind = validation.float_array("gating_logits", gating_logits, ndim=2)
    num_tokens, num_experts = gating_logits.shape
    if num_experts == 0:
        raise ValueError("gating_logits must have at least one expert column, got shape "
                         f"{tuple(gating_logits.shape)}")
    top_k = validation.positive_int("top_k", top_k, 1, num_experts)
    validation.finite("gating_logits", gating_logits)
    return kind, num_tokens, num_experts, top_k


def _outputs(num_tokens: int, top_k: int, queue: Any) -> tuple[Any, Any]:
    return empty((num_tokens, top_k), "float32", queue), empty((num_tokens, top_k), "int32", queue)


def _returned(arrays: dict, weights: Any, ids: Any) -> tuple[Any, Any]:
    if returns_numpy(arrays):
        return dpnp.asnumpy(weights), dpnp.asnumpy(ids)
    return weights, ids


def topk_softmax(
    gating_logits: Any, top_k: int, renormalize: bool = False, *, scoring: str = "softmax",
    device: Any = None,
) -> tuple[Any, Any]:
    """Softmax over all experts in float32, then the top-k experts of each token.

    Args:
        gating_logits: [T, E] float32, float16 or bfloat16 router logits, finite.
        top_k: experts per token, 1 <= top_k <= E.
        renormalize: divide each token's k weights by their sum.
        scoring: "softmax" (above), or "softmax_after_topk": the top-k logits first, then a
            softmax over those k (GPT-OSS; the weights already sum to 1).
        device: where NumPy inputs run (dpnp inputs run where they are).

    Returns:
        ``(topk_weights [T, k] float32, topk_ids [T, k] int32)``, NumPy for NumPy input,
        dpnp on the input's queue otherwise. Ties pick the smaller expert index.

    Example: logits [[1, 3, 2]] with top_k=2 gives ids [[1, 2]] and weights
    [[0.665, 0.245]] (softmax over all three experts); with "softmax_after_topk" the
    weights are [[0.731, 0.269]].
    """
    kind, num_tokens, _, top_k = _check_logits(gating_logits, top_k)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    arrays = {"gating_logits": gating_logits}
    queue = placement(arrays, {kind}, device)
    if queue is None:
        return reference.topk_softmax(to_host(gating_logits), top_k, renormalize, scoring)
    weights, ids = route_on_device(to_device(gating_logits, queue), kind, top_k, renormalize,
                                   scoring)
    return _returned(arrays, weights, ids)


def route_on_device(logits: Any, kind: str, top_k: int, renormalize: bool,
                    scoring: str = "softmax") -> tuple[Any, Any]:
    """topk_softmax on validated, finite device ``logits`` [T, E] in storage form."""
    from .kernels.routing import make_topk_softmax_kernel

    num_tokens, num_experts = logits.shape
    weights, ids = _outputs(num_tokens, top_k, logits.sycl_queue)
    if num_tokens > 0:
        make_topk_softmax_kernel(kind, scoring == "softmax_after_topk")(
            flat(logits), flat(weights), flat(ids), num_tokens, num_experts,
            top_k, bool(renormalize),
        )
    return weights, ids


def topk_sigmoid(
    gating_logits: Any, top_k: int, renormalize: bool = False, correction_bias: Any = None,
    *, device: Any = None,
) -> tuple[Any, Any]:
    """Sigmoid scores, then the top-k experts (by score + ``correction_bias`` when given).

    Args:
        gating_logits: [T, E] float router logits, finite.
        top_k: experts per token, 1 <= top_k <= E.
        renormalize: divide each token's k weights by their sum.
        correction_bias: optional [E] float bias added to the scores for selection only.
        device: where NumPy inputs run.

    Returns:
        ``(topk_weights [T, k] float32, topk_ids [T, k] int32)``; weights are the unbiased
        sigmoid scores of the chosen experts.
    """
    return _grouped(gating_logits, top_k, 1, 1, renormalize, "sigmoid", correction_bias, 1.0,
                    0.0, device, "topk_sigmoid")


def grouped_topk(
    gating_logits: Any, top_k: int, num_expert_group: int, topk_group: int,
    renormalize: bool = True, scoring_func: str = "softmax", correction_bias: Any = None,
    routed_scaling_factor: float = 1.0, *, device: Any = None,
) -> tuple[Any, Any]:
    """Grouped top-k routing (DeepSeek-V2/V3, vLLM's semantics).

    Scores are softmax or sigmoid of the logits. Experts form ``num_expert_group`` equal
    groups; a group scores its best expert score, or with ``correction_bias`` the sum of its
    two best biased scores. The best ``topk_group`` groups are kept, the top-k experts by
    (biased) score are chosen inside them and weighted by their unbiased scores,
    renormalized by ``sum + 1e-20`` when ``renormalize``, then multiplied by
    ``routed_scaling_factor`` once.

    Args:
        gating_logits: [T, E] float router logits, finite; E divisible by num_expert_group.
        top_k: experts per token, at most ``topk_group * E / num_expert_group``.
        num_expert_group: number of groups G (1 <= G <= 64).
        topk_group: groups kept per token, 1 <= topk_group <= G.
        renormalize, scoring_func, correction_bias ([E] float), routed_scaling_factor: above.
        device: where NumPy inputs run.

    Returns:
        ``(topk_weights [T, k] float32, topk_ids [T, k] int32)``.
    """
    return _grouped(gating_logits, top_k, num_expert_group, topk_group, renormalize,
                    scoring_func, correction_bias, routed_scaling_factor, 1e-20, device,
                    "grouped_topk")


def _grouped(gating_logits, top_k, num_groups, topk_group, renormalize, scoring_func,
             correction_bias, scale, epsilon, device, what) -> tuple[Any, Any]:
    from .kernels.routing import make_grouped_topk_kernel

    kind, num_tokens, num_experts, top_k = _check_logits(gating_logits, top_k)
    # the kernel keeps the chosen groups as bits of a 64-bit mask
    num_groups = validation.positive_int("num_expert_group", num_groups, 1, min(64, num_experts))
    if num_experts % num_groups:
        raise ValueError(f"num_expert_group must divide the number of experts {num_experts}, "
                         f"got {num_groups}")
    topk_group = validation.positive_int("topk_group", topk_group, 1, num_groups)
    group_size = num_experts // num_groups
    if top_k > topk_group * group_size:
        raise ValueError(f"top_k must be at most topk_group * experts per group = "
                         f"{topk_group * group_size}, got {top_k}")
    if scoring_func not in SCORE_FUNCS:
        raise ValueError(f"scoring_func must be one of {SCORE_FUNCS}, got {scoring_func!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not math.isfinite(scale):
        raise ValueError(f"routed_scaling_factor must be a finite number, got {scale!r}")
    arrays = {"gating_logits": gating_logits}
    if correction_bias is not None:
        validation.routing_weights("correction_bias", correction_bias, (num_experts,))
        if what == "grouped_topk" and num_groups > 1 and group_size < 2:
            raise ValueError("correction_bias needs at least 2 experts per group (a group "
                             "scores the sum of its two best biased scores)")
        arrays["correction_bias"] = correction_bias
    queue = placement(arrays, {kind}, device)
    if queue is None:
        bias = None if correction_bias is None else to_host(correction_bias)
        return reference.grouped_topk(to_host(gating_logits), top_k, num_groups, topk_group,
                                      renormalize, scoring_func, bias, scale,
                                      _epsilon=np.float32(epsilon))
    from .arrays import weights_to_device

    weights, ids = _outputs(num_tokens, top_k, queue)
    if num_tokens > 0:
        bias = weights_to_device(correction_bias, queue) if correction_bias is not None else weights
        make_grouped_topk_kernel(kind, scoring_func == "sigmoid", correction_bias is not None)(
            flat(to_device(gating_logits, queue)), flat(bias), flat(weights),
            flat(ids), num_tokens, num_experts, num_groups, topk_group, top_k,
            bool(renormalize), epsilon, scale,
        )
    return _returned(arrays, weights, ids)
