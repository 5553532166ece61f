"""Expert routing: gating logits -> (top-k weights, top-k expert ids).

Three conventions, all with ties going to the smaller expert index:
- :func:`topk_softmax`: softmax over all experts, then top-k (Mixtral, Qwen-MoE, OLMoE), or
  ``scoring="softmax_after_topk"``: top-k logits, then softmax over those k (GPT-OSS);
- :func:`topk_sigmoid`: sigmoid scores, optional selection bias;
- :func:`grouped_topk`: best expert groups first, then experts inside them (DeepSeek-V3);
- ``scoring="sparsemixer"`` (PhiMoE, :class:`dpmoe.MoELayer` only): two picks, each
  weighted by a softmax over the logits near it (:func:`dpmoe.reference.sparsemixer`).

Each is a :class:`RoutingSpec`, validated once by :func:`routing_spec`; :func:`route` is the
only launcher of the routing kernels (the public functions and :class:`dpmoe.MoELayer` go
through it) and :meth:`RoutingSpec.reference` their fallback. The oracle the tests compare
with (:mod:`dpmoe.reference`, e.g. ``moe_block``) is written separately, on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import reference, validation
from ._dispatch import call, host
from ._engine.convert import weights_to_device
from .arrays import empty, flat, to_device

SCORINGS = ("softmax", "softmax_after_topk", "sigmoid", "sparsemixer")
# vLLM's grouped top-k renormalizes by sum + 1e-20 (no 0/0 for tokens of tiny scores).
GROUPED_EPSILON = 1e-20
# The grouped kernel keeps the chosen groups as bits of a 64-bit mask.
MAX_GROUPS = 64


@dataclass(frozen=True)
class RoutingSpec:
    """A validated routing convention for logits [T, num_experts] (see :func:`routing_spec`)."""

    num_experts: int
    top_k: int
    renormalize: bool = False
    scoring: str = "softmax"  # one of SCORINGS
    num_expert_group: int = 1
    topk_group: int = 1
    has_correction_bias: bool = False  # chosen by score + bias, weighted by the score
    routed_scaling_factor: float = 1.0  # multiplies the weights once
    epsilon: float = 0.0  # renormalization divides by sum + epsilon
    jitter_eps: float = 0.0  # sparsemixer: logits within 2 * jitter_eps (relative) share

    @property
    def grouped(self) -> bool:
        """Whether the grouped top-k kernel (scores, groups, bias, scale, epsilon) runs it;
        plain softmax routing takes the softmax kernel, sparsemixer its own."""
        return not (self.scoring in ("softmax", "softmax_after_topk", "sparsemixer")
                    and self.num_expert_group == 1 and not self.has_correction_bias
                    and self.routed_scaling_factor == 1.0 and self.epsilon == 0.0)

    def reference(self, logits: np.ndarray, correction_bias: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """The NumPy oracle of this routing on host ``logits`` [T, E]."""
        if self.scoring == "sparsemixer":
            return reference.sparsemixer(logits, self.jitter_eps)
        if not self.grouped:
            return reference.topk_softmax(logits, self.top_k, self.renormalize, self.scoring)
        return reference.grouped_topk(
            logits, self.top_k, self.num_expert_group, self.topk_group, self.renormalize,
            self.scoring, correction_bias, self.routed_scaling_factor,
            _epsilon=np.float32(self.epsilon))


def routing_spec(num_experts: int, top_k: Any, renormalize: Any = False, scoring: Any = "softmax",
                 num_expert_group: Any = 1, topk_group: Any = 1, correction_bias: Any = None,
                 routed_scaling_factor: Any = 1.0, epsilon: float | None = None,
                 jitter_eps: Any = 0.0) -> RoutingSpec:
    """Validates a routing convention (errors name the argument); ``correction_bias`` is
    checked for shape [E] and finiteness. ``epsilon`` None: DeepSeek's (1e-20) for sigmoid
    scoring, groups, a bias or a scale, else 0."""
    num_experts = validation.positive_int("num_experts", num_experts)
    top_k = validation.positive_int("top_k", top_k, 1, num_experts)
    renormalize = validation.flag("renormalize", renormalize)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    num_groups = validation.positive_int("num_expert_group", num_expert_group, 1,
                                         min(MAX_GROUPS, num_experts))
    if num_experts % num_groups:
        raise ValueError(f"num_expert_group must divide the number of experts {num_experts}, "
                         f"got {num_groups}")
    topk_group = validation.positive_int("topk_group", topk_group, 1, num_groups)
    group_size = num_experts // num_groups
    if top_k > topk_group * group_size:
        raise ValueError(f"top_k must be at most topk_group * experts per group = "
                         f"{topk_group * group_size}, got {top_k}")
    scale = validation.finite_number("routed_scaling_factor", routed_scaling_factor)
    if correction_bias is not None:
        validation.routing_weights("correction_bias", correction_bias, (num_experts,), "[E]")
        if num_groups > 1 and group_size < 2:
            raise ValueError("correction_bias needs at least 2 experts per group (a group "
                             "scores the sum of its two best biased scores)")
    has_bias = correction_bias is not None
    if scoring in ("softmax_after_topk", "sparsemixer") and (num_groups > 1 or has_bias
                                                            or scale != 1.0):
        raise ValueError(f"scoring={scoring!r} takes no groups, correction_bias or "
                         "routed_scaling_factor")
    jitter = validation.finite_number("jitter_eps", jitter_eps)
    if jitter < 0:
        raise ValueError(f"jitter_eps must be >= 0, got {jitter_eps!r}")
    if jitter and scoring != "sparsemixer":
        raise ValueError(f"jitter_eps is SparseMixer's; scoring={scoring!r} takes none")
    if epsilon and scoring in ("softmax_after_topk", "sparsemixer"):
        raise ValueError(f"epsilon renormalizes; scoring={scoring!r} does not renormalize")
    if scoring == "sparsemixer" and (top_k != 2 or renormalize):
        raise ValueError("scoring='sparsemixer' picks exactly two experts (top_k=2) and does "
                         f"not renormalize, got top_k={top_k}, renormalize={renormalize}")
    if epsilon is None:
        deepseek = scoring == "sigmoid" or num_groups > 1 or has_bias or scale != 1.0
        epsilon = GROUPED_EPSILON if deepseek else 0.0
    elif validation.finite_number("epsilon", epsilon) < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    return RoutingSpec(num_experts, top_k, bool(renormalize), scoring, num_groups, topk_group,
                       has_bias, scale, float(epsilon), float(jitter))


def route(spec: RoutingSpec, logits: Any, kind: str, correction_bias: Any = None
          ) -> tuple[Any, Any]:
    """``spec``'s routing of finite device ``logits`` [T, E] in storage form ``kind`` ->
    (weights [T, k] float32, ids [T, k] int32) on the logits' queue; ``correction_bias``
    a float32 device array [E] when the spec has one."""
    from .kernels.routing import (make_grouped_topk_kernel, make_sparsemixer_kernel,
                                  make_topk_softmax_kernel)

    num_tokens = logits.shape[0]
    queue = logits.sycl_queue
    weights = empty((num_tokens, spec.top_k), "float32", queue)
    ids = empty((num_tokens, spec.top_k), "int32", queue)
    if num_tokens == 0:
        return weights, ids
    if spec.scoring == "sparsemixer":
        make_sparsemixer_kernel(kind)(flat(logits), flat(weights), flat(ids), num_tokens,
                                      spec.num_experts, spec.jitter_eps)
        return weights, ids
    if not spec.grouped:
        make_topk_softmax_kernel(kind, spec.scoring == "softmax_after_topk")(
            flat(logits), flat(weights), flat(ids), num_tokens, spec.num_experts, spec.top_k,
            spec.renormalize)
        return weights, ids
    bias = flat(correction_bias) if spec.has_correction_bias else flat(weights)  # unread
    make_grouped_topk_kernel(kind, spec.scoring == "sigmoid", spec.has_correction_bias)(
        flat(logits), bias, flat(weights), flat(ids), num_tokens, spec.num_experts,
        spec.num_expert_group, spec.topk_group, spec.top_k, spec.renormalize, spec.epsilon,
        spec.routed_scaling_factor)
    return weights, ids


def _route_public(gating_logits: Any, spec_args: dict, correction_bias: Any, device: Any
                  ) -> tuple[Any, Any]:
    """The public functions' road: validate logits and spec, place, route, return."""
    kind = validation.float_array("gating_logits", gating_logits, ndim=2)
    num_experts = gating_logits.shape[1]
    if num_experts == 0:
        raise ValueError("gating_logits must have at least one expert column, got shape "
                         f"{tuple(gating_logits.shape)}")
    spec = routing_spec(num_experts, correction_bias=correction_bias, **spec_args)
    validation.finite("gating_logits", gating_logits)

    def on_device(queue: Any) -> tuple[Any, Any]:
        bias = None if correction_bias is None else weights_to_device(correction_bias, queue)
        return route(spec, to_device(gating_logits, queue), kind, bias)

    return call({"gating_logits": gating_logits, "correction_bias": correction_bias}, {kind},
                device, lambda: spec.reference(host(gating_logits), host(correction_bias)),
                on_device, ("float32", "int32"))


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
    if scoring not in ("softmax", "softmax_after_topk"):
        raise ValueError(f"scoring must be 'softmax' or 'softmax_after_topk', got {scoring!r}")
    return _route_public(gating_logits, dict(top_k=top_k, renormalize=renormalize,
                                              scoring=scoring), None, device)


def topk_sigmoid(
    gating_logits: Any, top_k: int, renormalize: bool = False, correction_bias: Any = None,
    *, device: Any = None,
) -> tuple[Any, Any]:
    """Sigmoid scores, then the top-k experts (by score + ``correction_bias`` when given).

    Args:
        gating_logits: [T, E] float router logits, finite.
        top_k: experts per token, 1 <= top_k <= E.
        renormalize: divide each token's k weights by their sum (a sum of 0 gives NaN).
        correction_bias: optional [E] float bias added to the scores for selection only.
        device: where NumPy inputs run.

    Returns:
        ``(topk_weights [T, k] float32, topk_ids [T, k] int32)``; weights are the unbiased
        sigmoid scores of the chosen experts.
    """
    return _route_public(gating_logits, dict(top_k=top_k, renormalize=renormalize,
                                              scoring="sigmoid", epsilon=0.0),
                         correction_bias, device)


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
        renormalize, scoring_func ("softmax" or "sigmoid"), correction_bias ([E] float),
            routed_scaling_factor (finite in float32): above.
        device: where NumPy inputs run.

    Returns:
        ``(topk_weights [T, k] float32, topk_ids [T, k] int32)``.
    """
    if scoring_func not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")
    return _route_public(gating_logits, dict(
        top_k=top_k, renormalize=renormalize, scoring=scoring_func,
        num_expert_group=num_expert_group, topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor, epsilon=GROUPED_EPSILON),
        correction_bias, device)
