"""The fused MoE forward, public API: routing metadata -> gate/up GEMM + activation ->
down GEMM -> weighted sum, in one call (:func:`fused_moe_forward`, and
:func:`fused_experts` in vLLM's weight layout).

How a call runs (path, GEMM backend, chunks) is decided by :mod:`dpmoe._engine.plan` and
shown by :func:`explain`; this module validates, places and hands over.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import memory, reference, validation
from ._dispatch import call, host, write_back
from ._engine import forward
from ._engine.experts import ExpertOptions, expert_weights, orientation, widened_bytes
from ._engine.metadata import local_ids
from ._engine.plan import ExecutionPlan, choose
from ._engine.quantized import QUANT_FORMATS
from .arrays import to_device
from .device import default_queue, dpnp, is_device_array


def fused_moe_forward(
    hidden_states: Any,
    gate_weights: Any,
    up_weights: Any,
    down_weights: Any,
    topk_weights: Any,
    topk_indices: Any,
    top_k: int = 2,
    renormalize: bool = True,
    inplace: bool = False,
    use_grouped_topk: bool = True,
    *,
    activation: str = "silu",
    gate_bias: Any = None,
    up_bias: Any = None,
    down_bias: Any = None,
    routed_scaling_factor: float = 1.0,
    expert_map: Any = None,
    alpha: float = 1.702,
    limit: float = 7.0,
    path: str | None = None,
    device: Any = None,
) -> Any:
    """The whole MoE expert computation for routed tokens.

    ``out[t] = s * sum_j w[t, j] * (down_e(act(x_t @ gate_e + bg_e) * (x_t @ up_e + bu_e)) + bd_e)``
    with ``e = topk_indices[t, j]``, ``w`` renormalized to sum 1 per token when
    ``renormalize`` (a token whose weights sum to 0 gets NaN), ``act`` SiLU by default, no
    biases and ``s = 1`` unless given.

    Args:
        hidden_states: [T, H] float32/float16/bfloat16 tokens.
        gate_weights, up_weights: [E, H, I] expert weights; down_weights: [E, I, H]; all
            three of one dtype (float32/float16/bfloat16, may differ from hidden_states').
        topk_weights: [T, top_k] float routing weights.
        topk_indices: [T, top_k] int32/int64 expert ids in ``[0, E)`` (global ids in
            ``[0, len(expert_map))`` with an ``expert_map``).
        top_k: experts per token, 1 <= top_k <= E.
        renormalize: divide each token's weights by their sum.
        inplace: write the result into ``hidden_states`` and return it.
        use_grouped_topk: the seed's name for the execution path: True = grouped, False =
            per-token (used when ``path`` is None). Not vLLM's ``use_grouped_topk``, which
            means DeepSeek's group routing: dpmoe calls that :func:`dpmoe.grouped_topk`.
        activation: "silu", "gelu", "gelu_tanh" or "swigluoai" (with ``alpha``, ``limit``).
        gate_bias, up_bias: optional [E, I] biases (both or neither); down_bias: [E, H].
        routed_scaling_factor: multiplies the output once (finite in float32).
        expert_map: optional [E_global] int map from global expert id to local id, -1 for
            experts on another device (expert parallelism): their slots add nothing.
        path: "auto" (the tuned config for the device, see :func:`dpmoe.explain`),
            "grouped" or "per_token"; both give the same result within float32 rounding.
            None (default): as ``use_grouped_topk`` says.
        device: where NumPy inputs run.

    Returns:
        [T, H] array of hidden_states' dtype (NumPy for NumPy inputs, dpnp otherwise).
    """
    renormalize = validation.flag("renormalize", renormalize)
    inplace = validation.flag("inplace", inplace)
    path = validation.execution_path(path, use_grouped_topk)
    x_kind = validation.float_array("hidden_states", hidden_states, 2)
    w_kind = validation.experts(gate_weights, up_weights, down_weights)
    num_experts, hidden, inter = gate_weights.shape
    num_tokens = hidden_states.shape[0]
    if hidden_states.shape[1] != hidden:
        raise ValueError(f"hidden_states must have shape [T, H] with H = {hidden} "
                         f"(gate_weights' dim 1), got {tuple(hidden_states.shape)}")
    bias_kinds = validation.expert_options(num_experts, hidden, inter, activation, gate_bias,
                                           up_bias, down_bias, routed_scaling_factor, alpha,
                                           limit)
    global_experts = validation.expert_map(expert_map, num_experts)
    top_k = validation.positive_int("top_k", top_k, 1, global_experts)
    validation.routing_weights("topk_weights", topk_weights, (num_tokens, top_k))
    validation.expert_ids("topk_indices", topk_indices, (num_tokens, top_k), global_experts)
    if inplace:
        validation.writable("hidden_states", hidden_states, "inplace=True writes the result there")
    arrays = {"hidden_states": hidden_states, "gate_weights": gate_weights,
              "up_weights": up_weights, "down_weights": down_weights,
              "topk_weights": topk_weights, "topk_indices": topk_indices,
              "gate_bias": gate_bias, "up_bias": up_bias, "down_bias": down_bias,
              "expert_map": expert_map}

    def on_reference() -> np.ndarray:
        return reference.fused_moe_forward(
            host(hidden_states), host(gate_weights), host(up_weights), host(down_weights),
            host(topk_weights), host(topk_indices), top_k, renormalize, activation=activation,
            gate_bias=host(gate_bias), up_bias=host(up_bias), down_bias=host(down_bias),
            routed_scaling_factor=routed_scaling_factor, expert_map=host(expert_map),
            alpha=alpha, limit=limit)

    def on_device(queue: Any) -> Any:
        plan = choose(queue, num_tokens, (num_experts, hidden, inter), top_k, x_kind, w_kind,
                      path, orientation(gate_weights, up_weights, down_weights))
        on_host = [a for a in (gate_weights, up_weights, down_weights, gate_bias, up_bias,
                               down_bias) if a is not None and not is_device_array(a)]
        forward.check_memory(
            plan, queue, "fused_moe_forward",
            weights_copied_to_the_device=sum(a.nbytes for a in on_host),
            float32_copies_of_16_bit_weights=widened_bytes(plan.gemm, w_kind,
                                                           (num_experts, hidden, inter)),
            tokens_in_and_out=2 * hidden_states.size * hidden_states.dtype.itemsize,
            routing=topk_weights.size * 8)
        options = ExpertOptions.on_device(queue, activation, alpha, limit,
                                          routed_scaling_factor, gate_bias, up_bias, down_bias)
        experts = expert_weights(gate_weights, up_weights, down_weights, w_kind, queue,
                                persistent=False)
        return forward.run(plan, to_device(hidden_states, queue), x_kind, experts, topk_weights,
                           local_ids(topk_indices, expert_map), renormalize, options)

    result = call(arrays, {x_kind, w_kind} | bias_kinds, device, on_reference, on_device, x_kind)
    return write_back(hidden_states, result) if inplace else result


def fused_experts(
    hidden_states: Any,
    w13: Any,
    w2: Any,
    topk_weights: Any,
    topk_ids: Any,
    activation: str = "silu",
    b13: Any = None,
    b2: Any = None,
    routed_scaling_factor: float = 1.0,
    expert_map: Any = None,
    inplace: bool = False,
    *,
    path: str | None = None,
    device: Any = None,
) -> Any:
    """The MoE experts with vLLM/SGLang's weight layout (``x @ W^T``).

    Args:
        hidden_states: [T, H] tokens.
        w13: [E, 2I, H]: rows [0, I) are gate, [I, 2I) up (for "swigluoai", GPT-OSS's
            interleaved order: even rows gate, odd rows up).
        w2: [E, H, I] down projection.
        topk_weights, topk_ids: [T, k] routing (weights used as given).
        activation: "silu", "gelu", "gelu_tanh" or "swigluoai".
        b13: optional [E, 2I] bias of w13's rows; b2: optional [E, H].
        routed_scaling_factor: multiplies the output once.
        expert_map: optional global -> local expert ids, -1 = not on this device.
        inplace: write the result into ``hidden_states``.
        path: "auto", "grouped" or "per_token" (see :func:`fused_moe_forward`); None:
            grouped.
        device: where NumPy inputs run.

    Every call copies gate and up out of ``w13`` (rows, not a transpose); ``w2`` is read
    where it lies. The experts run in this ``x @ W^T`` orientation (see the README's
    weight orientation). A model that reuses its weights should build an
    :class:`dpmoe.MoELayer` once (from ``layouts.from_w13`` or from transposed views).

    Quantized ``w13``/``w2`` are :class:`dpmoe.quant.QuantizedExperts`, which always hold
    dpmoe's [E, K, N] layout (their checkpoint constructors transpose): ``w13`` (E, H, 2I),
    ``w2`` (E, I, H); ``w13`` is split into gate and up by columns.
    """
    if validation.quantized(w13) or validation.quantized(w2):
        gate, up, down = _split_quantized(w13, w2, activation)
        num_experts, width = w13.shape[0], w13.shape[2]
    else:
        kind = validation.float_array("w13", w13, 3)
        if validation.float_array("w2", w2, 3) != kind:
            raise TypeError(f"w2 must have w13's dtype ({w13.dtype}), got {w2.dtype}")
        validation.float_array("hidden_states", hidden_states, 2)
        validation.array("topk_ids", topk_ids, 2)
        validation.expert_ids("topk_ids", topk_ids, tuple(topk_ids.shape),
                              validation.expert_map(expert_map, w13.shape[0]))
        validation.routing_weights("topk_weights", topk_weights, tuple(topk_ids.shape))
        # gate and up are copied out of w13 where it lies (host or device): they must fit
        where = w13.sycl_queue if is_device_array(w13) else None
        memory.check_fits(where, "fused_experts", {"gate and up copied out of w13": w13.nbytes})
        gate, up, down = _split_w13(w13, w2, interleaved=activation == "swigluoai")
        num_experts, width = w13.shape[0], w13.shape[1]
    gate_bias = up_bias = None
    if b13 is not None:
        validation.array("b13", b13, 2)
        validation.shape("b13", b13, (num_experts, width), "[E, 2I]")
        gate_bias, up_bias = ((b13[:, ::2], b13[:, 1::2]) if activation == "swigluoai"
                              else (b13[:, :width // 2], b13[:, width // 2:]))
    validation.array("topk_ids", topk_ids, 2)
    return fused_moe_forward(
        hidden_states, gate, up, down, topk_weights, topk_ids, topk_ids.shape[1], False, inplace,
        activation=activation, gate_bias=gate_bias, up_bias=up_bias, down_bias=b2,
        routed_scaling_factor=routed_scaling_factor, expert_map=expert_map, path=path,
        device=device)


def _split_w13(w13: Any, w2: Any, interleaved: bool) -> tuple[Any, Any, Any]:
    """gate, up [E, H, I] and down [E, I, H] as transposed views of w13's halves (copied
    out, contiguous: the rows alternate gate, up when ``interleaved``) and of ``w2``."""
    validation.shape("w2", w2, (w13.shape[0], w13.shape[2], w13.shape[1] // 2), "[E, H, I]")
    if w13.shape[1] % 2:
        raise ValueError(f"w13 must have shape [E, 2I, H] with an even 2I, got {tuple(w13.shape)}")
    inter = w13.shape[1] // 2
    halves = (w13[:, ::2], w13[:, 1::2]) if interleaved else (w13[:, :inter], w13[:, inter:])
    contiguous = dpnp.ascontiguousarray if is_device_array(w13) else np.ascontiguousarray
    gate, up = (contiguous(h) for h in halves)
    return (gate.transpose((0, 2, 1)), up.transpose((0, 2, 1)), w2.transpose((0, 2, 1)))


def _split_quantized(w13: Any, w2: Any, activation: str) -> tuple[Any, Any, Any]:
    """Gate, up and down from quantized ``w13`` (E, H, 2I) and ``w2`` (E, I, H), checked."""
    from . import quant

    if not (validation.quantized(w13) and validation.quantized(w2)):
        raise TypeError("w13 and w2 must both be quantized (dpmoe.quant.QuantizedExperts) or "
                        "both float arrays")
    num_experts, hidden, width = w13.shape
    if width % 2:
        raise ValueError(f"w13 must have an even N = 2I, got shape {w13.shape}")
    if w2.format != w13.format:
        raise TypeError(f"w2 must have w13's format ({w13.format}), got {w2.format}")
    if tuple(w2.shape) != (num_experts, width // 2, hidden):
        raise ValueError(f"w2 must have shape (E, I, H) = {(num_experts, width // 2, hidden)} "
                         f"for w13 of shape {tuple(w13.shape)}, got {tuple(w2.shape)}")
    split = quant.split_interleaved if activation == "swigluoai" else quant.split_halves
    try:
        gate, up = split(w13)
    except ValueError as exc:
        raise ValueError(f"w13: {exc}") from None
    return gate, up, w2


def explain(num_tokens: int, hidden_size: int, intermediate_size: int, num_experts: int,
            top_k: int = 2, dtype: Any = "float32", hidden_dtype: Any = None, *,
            path: str = "auto", device: Any = None) -> ExecutionPlan | None:
    """How :func:`fused_moe_forward` (and :class:`dpmoe.MoELayer`) would run a call of
    ``num_tokens`` tokens through E experts of [H, I] in ``dtype`` weights (tokens in
    ``hidden_dtype``, default the same; ``dtype`` may be a :mod:`dpmoe.quant` format, whose
    tokens default to bfloat16) on ``device``: the path, GEMM backend, row layout,
    chunks and where the choice came from. ``print(dpmoe.explain(...))`` says it in a line.
    None when there is no SYCL device (the NumPy reference would run). ``path="auto"``
    describes :class:`dpmoe.MoELayer` and ``fused_moe_forward(..., path="auto")``; without
    ``path``, ``fused_moe_forward`` follows ``use_grouped_topk`` (grouped by default).
    """
    num_tokens = validation.positive_int("num_tokens", num_tokens, 0)
    shape = tuple(validation.positive_int(n, v) for n, v in (
        ("num_experts", num_experts), ("hidden_size", hidden_size),
        ("intermediate_size", intermediate_size)))
    top_k = validation.positive_int("top_k", top_k, 1, shape[0])
    quantized = isinstance(dtype, str) and dtype in QUANT_FORMATS
    w_kind = dtype if quantized else validation.dtype_name("dtype", dtype)
    x_kind = (("bfloat16" if quantized else w_kind) if hidden_dtype is None
              else validation.dtype_name("hidden_dtype", hidden_dtype))
    path = validation.execution_path(path)
    queue, _ = default_queue(device)
    if queue is None:
        return None
    return choose(queue, num_tokens, shape, top_k, x_kind, w_kind, path)
