"""The NumPy oracle: one plain, readable implementation of every dpmoe operation.

Every test compares the SYCL kernels with these functions, and they run instead of the
kernels when there is no SYCL device. They take NumPy arrays (bfloat16 as
``ml_dtypes.bfloat16``), compute in float32 like the kernels, and return the input's dtype.
Inputs are assumed valid: the public functions validate before calling them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

F32 = np.float32


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(F32)


def dequantized(w: Any) -> np.ndarray:
    """Expert weights as float32 when they are :class:`dpmoe.quant.QuantizedExperts` (the
    oracle of the quantized kernels is the forward on dequantised weights); else as given."""
    return w.dequantize() if getattr(w, "quantized", False) is True else w


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) in float32, written as x / (1 + exp(-x)) like the kernels."""
    with np.errstate(over="ignore"):
        return x / (F32(1) + np.exp(-x))


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values per row, ties to the smaller index (stable sort)."""
    return np.argsort(-values, axis=-1, kind="stable")[..., :k].astype(np.int32)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True, dtype=F32)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return F32(1) / (F32(1) + np.exp(-logits))


def topk_softmax(
    gating_logits: np.ndarray, top_k: int, renormalize: bool = False, scoring: str = "softmax"
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over all experts in float32, then the top-k; ties pick the smaller index.

    ``gating_logits`` [T, E] -> (``topk_weights`` [T, k] float32, ``topk_ids`` [T, k] int32).
    Selection uses the logits (softmax is monotonic), so equal probabilities that come from
    different logits still order by logit. ``scoring="softmax_after_topk"`` (GPT-OSS) picks
    the top-k logits first and takes the softmax over those k only.
    """
    logits = _f32(gating_logits)
    ids = _top(logits, top_k)
    if scoring == "softmax_after_topk":
        return softmax(np.take_along_axis(logits, ids, axis=1)).astype(F32), ids
    weights = np.take_along_axis(softmax(logits), ids, axis=1).astype(F32)
    if renormalize:
        weights = weights / weights.sum(axis=1, keepdims=True, dtype=F32)
    return weights, ids


def topk_sigmoid(
    gating_logits: np.ndarray, top_k: int, renormalize: bool = False,
    correction_bias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores; top-k by score (+ ``correction_bias`` [E] when given); the weights
    are the unbiased scores of the chosen experts, divided by their sum if ``renormalize``."""
    return grouped_topk(gating_logits, top_k, 1, 1, renormalize, "sigmoid", correction_bias,
                        1.0, _epsilon=F32(0))


def sparsemixer(gating_logits: np.ndarray, jitter_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """PhiMoE's SparseMixer routing at inference: top-2, each pick weighted by a softmax over
    the logits s_j with ``(m - s_j) / max(|s_j|, m) <= 2 * jitter_eps`` (m the pick's
    logit; the first pick is left out of the second softmax); not renormalized."""
    logits = _f32(gating_logits)
    threshold = F32(2 * jitter_eps)
    ids = _top(logits, 2)
    weights = np.empty(ids.shape, F32)
    for t in range(logits.shape[0]):
        s = logits[t]
        for j in range(2):
            best = s[ids[t, j]]
            factor = np.maximum(np.abs(s), best)
            with np.errstate(divide="ignore", invalid="ignore"):
                keep = ~((best - s) / factor > threshold)
            if j == 1:
                keep[ids[t, 0]] = False
            weights[t, j] = F32(1) / np.exp(s[keep] - best).sum(dtype=F32)
    return weights, ids


def grouped_topk(
    gating_logits: np.ndarray, top_k: int, num_expert_group: int, topk_group: int,
    renormalize: bool = True, scoring_func: str = "softmax",
    correction_bias: np.ndarray | None = None, routed_scaling_factor: float = 1.0,
    _epsilon: np.float32 = F32(1e-20),
) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-style routing: experts in ``num_expert_group`` equal groups; keep the best
    ``topk_group`` groups, then the top-k experts inside them.

    Scores are softmax or sigmoid of the logits. A group's score is its best expert score,
    or with ``correction_bias`` the sum of its two best biased scores. Experts are chosen by
    (biased) score, weighted by their unbiased score, renormalized by ``sum + 1e-20`` and
    multiplied by ``routed_scaling_factor`` once. Ties pick the smaller index.
    """
    logits = _f32(gating_logits)
    num_tokens, num_experts = logits.shape
    scores = softmax(logits) if scoring_func == "softmax" else sigmoid(logits)
    chosen_by = scores if correction_bias is None else scores + _f32(correction_bias)
    grouped = chosen_by.reshape(num_tokens, num_expert_group, num_experts // num_expert_group)
    if num_expert_group == 1:  # one group is always kept (and may hold a single expert)
        group_scores = np.zeros((num_tokens, 1), dtype=F32)
    elif correction_bias is None:
        group_scores = grouped.max(axis=-1)
    else:
        best_two = -np.sort(-grouped, axis=-1)[..., :2]
        group_scores = best_two[..., 0] + best_two[..., 1]
    kept = np.zeros((num_tokens, num_expert_group), dtype=bool)
    np.put_along_axis(kept, _top(group_scores, topk_group), True, axis=1)
    masked = np.where(np.repeat(kept, num_experts // num_expert_group, axis=1), chosen_by, -np.inf)
    ids = _top(masked, top_k)
    weights = np.take_along_axis(scores, ids, axis=1).astype(F32)
    if renormalize:
        weights = weights / (weights.sum(axis=1, keepdims=True, dtype=F32) + _epsilon)
    return (weights * F32(routed_scaling_factor)).astype(F32), ids


def moe_align_block_size(
    topk_ids: np.ndarray, num_experts: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group the T*k routing slots by expert, each expert's group padded to whole blocks.

    Returns ``sorted_token_ids`` [T*k + E*(block_size-1)] int32 (slot ids, sentinel T*k in
    padding), ``experts_ids`` [ceil(len(sorted_token_ids)/block_size)] int32 (owner of each
    block, -1 for unused blocks) and ``num_tokens_post_pad`` [1] int32.

    Example: topk_ids = [[2, 0], [2, 1]], E = 3, block_size = 2 gives slots 0..3 with experts
    [2, 0, 2, 1]; expert 0 owns block 0 = [1, 4], expert 1 block 1 = [3, 4], expert 2
    block 2 = [0, 2]; sorted_token_ids = [1, 4, 3, 4, 0, 2, 4] (length 4 + 3*1), experts_ids =
    [0, 1, 2, -1], num_tokens_post_pad = [6].
    """
    flat = np.asarray(topk_ids).reshape(-1)
    n_slots = flat.size
    capacity = n_slots + num_experts * (block_size - 1)
    sorted_ids = np.full(capacity, n_slots, dtype=np.int32)
    experts_ids = np.full(-(-capacity // block_size), -1, dtype=np.int32)
    position = 0
    for expert in range(num_experts):
        slots = np.flatnonzero(flat == expert)
        if slots.size == 0:
            continue
        sorted_ids[position : position + slots.size] = slots
        n_blocks = -(-slots.size // block_size)
        first_block = position // block_size
        experts_ids[first_block : first_block + n_blocks] = expert
        position += n_blocks * block_size
    return sorted_ids, experts_ids, np.array([position], dtype=np.int32)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), erf in float64 (NumPy has none)."""
    erf = np.frompyfunc(math.erf, 1, 1)
    return (0.5 * x * (1.0 + erf(x.astype(np.float64) / math.sqrt(2.0)).astype(np.float64))).astype(F32)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    inner = F32(math.sqrt(2.0 / math.pi)) * (x + F32(0.044715) * x * x * x)
    return F32(0.5) * x * (F32(1) + np.tanh(inner))


def gated(gate: np.ndarray, up: np.ndarray, activation: str = "silu", alpha: float = 1.702,
          limit: float = 7.0) -> np.ndarray:
    """act(gate) * up in float32; swigluoai clamps gate at ``limit`` and up to +-limit and
    returns gate * sigmoid(alpha * gate) * (up + 1); relu2 (not gated) is relu(up)**2."""
    if activation == "relu2":  # not gated: the gate (absent, or equal to up) is not read
        return np.square(np.maximum(up, F32(0)))
    if activation == "swigluoai":
        gate = np.minimum(gate, F32(limit))
        up = np.clip(up, -F32(limit), F32(limit))
        return gate * sigmoid(F32(alpha) * gate) * (up + F32(1))
    return {"silu": silu, "gelu": gelu, "gelu_tanh": gelu_tanh}[activation](gate) * up


def act_and_mul(x: np.ndarray, activation: str = "silu", alpha: float = 1.702,
                limit: float = 7.0) -> np.ndarray:
    """``x`` [..., 2d] -> act(gate) * up, in x's dtype (see dpmoe.activation.act_and_mul);
    gate/up are the halves of x, or its even/odd elements for swigluoai."""
    d = x.shape[-1] // 2
    xf = _f32(x)
    if activation == "swigluoai":
        return gated(xf[..., ::2], xf[..., 1::2], activation, alpha, limit).astype(x.dtype)
    return gated(xf[..., :d], xf[..., d:], activation).astype(x.dtype)


def silu_and_mul(x: np.ndarray) -> np.ndarray:
    """``x`` [..., 2d] -> silu(x[..., :d]) * x[..., d:], in x's dtype."""
    return act_and_mul(x, "silu")


def silu_and_mul_moe(gate_output: np.ndarray, up_output: np.ndarray) -> None:
    """``gate_output <- silu(gate_output) * up_output``, in place."""
    gate_output[...] = (silu(_f32(gate_output)) * _f32(up_output)).astype(gate_output.dtype)


def moe_sum(expert_out: np.ndarray, topk_weights: np.ndarray) -> np.ndarray:
    """``expert_out`` [T, k, H], ``topk_weights`` [T, k] -> sum_j w[t, j] * y[t, j] [T, H]."""
    y = _f32(expert_out)
    w = _f32(topk_weights)
    out = np.zeros((y.shape[0], y.shape[2]), dtype=F32)
    for j in range(y.shape[1]):  # in slot order, like the kernel
        out += w[:, j, None] * y[:, j, :]
    return out.astype(expert_out.dtype)


def grouped_gemm_moe(
    A: np.ndarray,
    B: np.ndarray,
    C: np.ndarray | None,
    D: np.ndarray,
    topk_weights: np.ndarray,
    topk_indices: np.ndarray,
    top_k: int,
    trans_b: bool = False,
) -> None:
    """``D[t] = sum_j w[t, j] * (A[t] @ B[e_tj] + C[e_tj])``, written into ``D`` [T, N].

    ``B`` is [E, K, N] ([E, N, K] with ``trans_b``), ``C`` an optional bias [E, N].
    """
    a = _f32(A)
    b = _f32(B)
    if trans_b:
        b = b.transpose(0, 2, 1)
    w = _f32(topk_weights)
    out = np.zeros((a.shape[0], b.shape[2]), dtype=F32)
    for t in range(a.shape[0]):
        for j in range(top_k):
            e = int(topk_indices[t, j])
            y = a[t] @ b[e]
            if C is not None:
                y = y + _f32(C[e])
            out[t] += w[t, j] * y
    D[...] = out.astype(D.dtype)


def fused_moe_forward(
    hidden_states: np.ndarray,
    gate_weights: np.ndarray,
    up_weights: np.ndarray,
    down_weights: np.ndarray,
    topk_weights: np.ndarray,
    topk_indices: np.ndarray,
    top_k: int = 2,
    renormalize: bool = True,
    *,
    activation: str = "silu",
    gate_bias: np.ndarray | None = None,
    up_bias: np.ndarray | None = None,
    down_bias: np.ndarray | None = None,
    routed_scaling_factor: float = 1.0,
    expert_map: np.ndarray | None = None,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> np.ndarray:
    """``out[t] = s * sum_j w[t, j] * (down_e(act(x_t @ gate_e + bg_e) * (x_t @ up_e + bu_e)) + bd_e)``.

    Shapes: hidden_states [T, H], gate/up [E, H, I], down [E, I, H], topk [T, k], biases
    [E, I], [E, I], [E, H]. ``renormalize`` scales each token's k weights to sum to 1 first;
    ``s`` is ``routed_scaling_factor``. With ``expert_map`` (global id -> local id, -1 when
    the expert lives elsewhere), ids are global and slots of non-local experts add nothing.
    """
    gate_weights, up_weights, down_weights = (
        dequantized(w) for w in (gate_weights, up_weights, down_weights))
    x = _f32(hidden_states)
    w = _f32(topk_weights)
    if renormalize:
        total = w.sum(axis=1, keepdims=True, dtype=F32)
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(total == 0, F32(np.nan), w / total)  # 0/0 for the whole token
    ids = np.asarray(topk_indices) if expert_map is None else np.asarray(expert_map)[topk_indices]
    out = np.zeros(x.shape, dtype=F32)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = int(ids[t, j])
            if e < 0:
                continue
            g = None if gate_weights is None else x[t] @ _f32(gate_weights[e])
            u = x[t] @ _f32(up_weights[e])
            if gate_bias is not None:
                g = g + _f32(gate_bias[e])
                u = u + _f32(up_bias[e])
            y = gated(g, u, activation, alpha, limit) @ _f32(down_weights[e])
            if down_bias is not None:
                y = y + _f32(down_bias[e])
            out[t] += w[t, j] * y
    return (out * F32(routed_scaling_factor)).astype(hidden_states.dtype)


def route_block(
    hidden_states: np.ndarray, w: dict, top_k: int, renormalize: bool, scoring: str,
    num_expert_group: int, topk_group: int, routed_scaling_factor: float,
    epsilon: float | None = None, jitter_eps: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The routing of :class:`dpmoe.MoELayer`: logits = x @ router (+ router_bias), then
    softmax top-k, softmax after top-k, SparseMixer, or grouped top-k (sigmoid, groups,
    bias, scaling);
    ``epsilon`` (None: 1e-20 for the grouped kinds, else 0) is added to the renormalizing sum."""
    logits = _f32(hidden_states) @ _f32(w["router"])
    if w.get("router_bias") is not None:
        logits = logits + _f32(w["router_bias"])
    deepseek = (scoring == "sigmoid" or num_expert_group > 1 or routed_scaling_factor != 1.0
                or w.get("correction_bias") is not None)
    if scoring == "sparsemixer":
        return sparsemixer(logits, jitter_eps)
    if epsilon is None:
        epsilon = 1e-20 if deepseek else 0.0
    if not (deepseek or epsilon):
        return topk_softmax(logits, top_k, renormalize, scoring)
    return grouped_topk(logits, top_k, num_expert_group, topk_group, renormalize,
                        "sigmoid" if scoring == "sigmoid" else "softmax",
                        w.get("correction_bias"), routed_scaling_factor, _epsilon=F32(epsilon))


def shared_expert(hidden_states: np.ndarray, w: dict, activation: str = "silu",
                  alpha: float = 1.702, limit: float = 7.0) -> np.ndarray:
    """The shared expert of :class:`dpmoe.MoELayer` in float32 (zeros when it has none):
    ``down(act(x @ gate) * (x @ up))`` (``down(act(x @ up))`` for a non-gated activation),
    scaled by ``sigmoid(x @ shared_expert_gate)`` when that gate exists."""
    x = _f32(hidden_states)
    if w.get("shared_up") is None:
        return np.zeros(x.shape, F32)
    g = None if w.get("shared_gate") is None else x @ _f32(w["shared_gate"])
    shared = gated(g, x @ _f32(w["shared_up"]), activation, alpha, limit) @ _f32(w["shared_down"])
    if w.get("shared_expert_gate") is not None:
        shared = sigmoid(x @ _f32(w["shared_expert_gate"])) * shared
    return shared


def moe_block(
    hidden_states: np.ndarray, w: dict, top_k: int = 2, renormalize: bool = True,
    scoring: str = "softmax", num_expert_group: int = 1, topk_group: int = 1,
    routed_scaling_factor: float = 1.0, activation: str = "silu", alpha: float = 1.702,
    limit: float = 7.0, expert_map: np.ndarray | None = None, *, epsilon: float | None = None,
    jitter_eps: float = 0.0, identity_experts: int = 0, weights_on_input: bool = False,
) -> np.ndarray:
    """A whole MoE block (see :class:`dpmoe.MoELayer`): routing, routed experts with their
    activation and biases, plus the shared expert (gated by sigmoid(x @ shared_expert_gate)
    when present) and ``w["output_bias"]``, summed in float32 and rounded once to the
    input's dtype. With ``expert_map`` the experts in ``w`` are a shard (see
    :func:`fused_moe_forward`). ``identity_experts`` Z: the router has E + Z columns and
    ids >= E add ``weight * x``. ``weights_on_input``: each slot's expert runs on
    ``weight * x`` (rounded to the input's dtype) and slots add unweighted (Llama 4)."""
    weights, ids = route_block(hidden_states, w, top_k, renormalize, scoring, num_expert_group,
                               topk_group, routed_scaling_factor, epsilon, jitter_eps)
    x = _f32(hidden_states)
    num_experts = w["up"].shape[0] if expert_map is None else len(expert_map)
    routed_map = expert_map
    if identity_experts:
        routed_map = np.concatenate([np.arange(num_experts) if expert_map is None else expert_map,
                                     np.full(identity_experts, -1)])
    slots = [(weights, ids)]
    if weights_on_input:  # one pass per slot j, on its own scaled copy of the tokens
        slots = [(weights[:, j:j + 1], ids[:, j:j + 1]) for j in range(top_k)]
    out = np.zeros(x.shape, F32)
    for slot_weights, slot_ids in slots:
        inputs, routing = x, slot_weights
        if weights_on_input:
            inputs = _f32((slot_weights * x).astype(hidden_states.dtype))
            routing = np.ones_like(slot_weights)
        out += _f32(fused_moe_forward(
            inputs, w.get("gate"), w["up"], w["down"], routing, slot_ids, slot_ids.shape[1],
            False, activation=activation, gate_bias=w.get("gate_bias"), up_bias=w.get("up_bias"),
            down_bias=w.get("down_bias"), expert_map=routed_map, alpha=alpha, limit=limit))
    if identity_experts:
        out += (weights * (ids >= num_experts)).sum(axis=1, keepdims=True, dtype=F32) * x
    out += shared_expert(x, w, activation, alpha, limit)
    if w.get("output_bias") is not None:
        out += _f32(w["output_bias"])
    return out.astype(hidden_states.dtype)


def moe_layer(
    hidden_states: np.ndarray,
    router: np.ndarray,
    gate_weights: np.ndarray,
    up_weights: np.ndarray,
    down_weights: np.ndarray,
    top_k: int = 2,
    renormalize: bool = True,
) -> np.ndarray:
    """A whole MoE block: logits = x @ router [H, E], top-k softmax routing, experts
    (:func:`moe_block` without its options)."""
    weights = {"router": router, "gate": gate_weights, "up": up_weights, "down": down_weights}
    return moe_block(hidden_states, weights, top_k, renormalize)


def fused_experts(
    hidden_states: np.ndarray,
    w13: np.ndarray,
    w2: np.ndarray,
    topk_weights: np.ndarray,
    topk_ids: np.ndarray,
    activation: str = "silu",
    b13: np.ndarray | None = None,
    b2: np.ndarray | None = None,
    routed_scaling_factor: float = 1.0,
    expert_map: np.ndarray | None = None,
) -> np.ndarray:
    """vLLM's layout, written directly: ``h = x @ w13[e].T + b13[e]``,
    ``y = act_and_mul(h) @ w2[e].T + b2[e]``, ``out = s * sum_j w * y`` [T, H]."""
    x = _f32(hidden_states)
    w = _f32(topk_weights)
    ids = np.asarray(topk_ids) if expert_map is None else np.asarray(expert_map)[topk_ids]
    out = np.zeros(x.shape, dtype=F32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            h = x[t] @ _f32(w13[e]).T
            if b13 is not None:
                h = h + _f32(b13[e])
            y = act_and_mul(h, activation) @ _f32(w2[e]).T
            if b2 is not None:
                y = y + _f32(b2[e])
            out[t] += w[t, j] * y
    return (out * F32(routed_scaling_factor)).astype(hidden_states.dtype)
