"""The fused MoE forward: routing metadata -> gate/up GEMM + SiLU-mul -> down GEMM -> weighted sum.

Two execution paths give the same result (within float32 rounding):

- grouped (``use_grouped_topk=True``): align slots by expert, gather token rows, three
  oneMKL batched GEMMs (gate, up, down) with the SiLU-mul kernel between them, then the
  weighted reduction kernel;
- per-token (``use_grouped_topk=False``): two fused GEMV kernels that read each routed
  expert's weights in place, the second one also doing the weighted reduction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import pages, reference, validation
from .alignment import align_on_device, plan_blocks
from .arrays import as_words, empty, flat, float_kind, from_device, ids_to_device, to_device, to_host, weights_to_device, widen
from .device import dpnp, is_device_array, placement, returns_numpy
from .grouped_gemm import (DEFAULT_BLOCK_SIZE, STACK_PADDING_LIMIT, expert_matmul,
                           expert_matmul_host, gather_rows, host_gemm_kind, intermediate,
                           plan_host_layout, plan_layout)
from .memory import GIB, check_fits, tokens_per_chunk
from .reduction import weighted_sum


@dataclass
class ExpertOptions:
    """What the experts compute besides plain SwiGLU: activation, biases, output scale."""

    activation: str = "silu"
    alpha: float = 1.702  # swigluoai
    limit: float = 7.0  # swigluoai
    gate_bias: Any = None  # (E * I) device storage, with up_bias
    up_bias: Any = None
    bias_kind: str | None = None  # storage kind of gate_bias / up_bias
    down_bias: Any = None  # (E * H) device storage
    down_bias_kind: str = "float32"
    scale: float = 1.0  # routed_scaling_factor


DEFAULT_OPTIONS = ExpertOptions()


class ExpertWeights:
    """Gate [E, H, I], up [E, H, I] and down [E, I, H] weights on one queue, in storage form.

    The grouped path needs float32 matrices for ``dpnp.matmul``; for 16-bit weights they are
    widened on first use. With oneMKL's in-place bf16 GEMM (bf16 on a CPU device) it needs
    nothing, but reused weights run 2-3x faster packed. ``persistent`` (a layer that reuses
    its weights) keeps those derived forms instead of rebuilding them per call.
    """

    def __init__(self, gate: Any, up: Any, down: Any, kind: str, queue: Any, persistent: bool):
        self.gate, self.up, self.down = (to_device(w, queue) for w in (gate, up, down))
        self.kind = kind
        self.persistent = persistent
        if persistent:  # weights read for many calls: worth moving onto huge pages now
            for w in (self.gate, self.up, self.down):
                pages.advise(w, now=True)
        self._float32: tuple | None = None
        self._packed: tuple | None = None
        self._gemv: tuple | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, H, I)."""
        return tuple(self.gate.shape)

    def gemv_operands(self) -> tuple[tuple[Any, Any, int], tuple[Any, Any, int]]:
        """((gate, up, cols), (down, down, cols)) flat, as the per-token kernels read them:
        16-bit rows of even length as uint32 words (two columns per load, cols = 2)."""
        if self._gemv is None:
            def pairable(w: Any) -> tuple[Any, int]:
                line = flat(w)
                if w.shape[-1] % 2:
                    return line, 1
                if self.kind == "float32":
                    return line, 2
                words = as_words(line)
                return (line, 1) if words is None else (words, 2)

            (gate, cols_g), (up, cols_u) = pairable(self.gate), pairable(self.up)
            if cols_g != cols_u:
                (gate, _), (up, _) = (flat(self.gate), 1), (flat(self.up), 1)
                cols_g = 1
            down, cols_d = pairable(self.down)
            self._gemv = ((gate, up, cols_g), (down, down, cols_d))
        return self._gemv

    def derived_bytes(self, grouped: bool, x_kind: str) -> int:
        """Bytes the next grouped call on ``x_kind`` tokens allocates for derived weights."""
        if not grouped or self.kind == "float32":
            return 0
        if host_gemm_kind(self.gate.sycl_queue, x_kind, self.kind):
            if not self.persistent or self._packed is not None:
                return 0
            from . import onemkl_host

            num_experts, hidden, inter = self.shape
            return num_experts * (2 * onemkl_host.packed_size(inter, hidden)
                                  + onemkl_host.packed_size(hidden, inter))
        return 0 if self._float32 is not None else 3 * self.gate.size * 4

    def packed(self) -> tuple[list, list, list] | None:
        """Per expert, gate/up/down in oneMKL's packed bf16 format (persistent weights only)."""
        if not self.persistent:
            return None
        if self._packed is None:
            from . import onemkl_host

            num_experts, hidden, inter = self.shape
            self.gate.sycl_queue.wait()
            self._packed = tuple(
                [onemkl_host.pack(flat(w), e * hidden * inter, n, k) for e in range(num_experts)]
                for w, n, k in ((self.gate, inter, hidden), (self.up, inter, hidden),
                                (self.down, hidden, inter)))
        return self._packed

    def float32(self) -> tuple[Any, Any, Any]:
        if self._float32 is not None:
            return self._float32
        widened = tuple(widen(w, self.kind) for w in (self.gate, self.up, self.down))
        if self.persistent:
            self._float32 = widened
        return widened


def act_placeholder(queue: Any) -> Any:
    """A one-element float32 array for a reduction whose every slot is skipped."""
    return dpnp.zeros(1, dtype=np.float32, sycl_queue=queue)


def _run_grouped(x: Any, x_kind: str, experts: ExpertWeights, weights: Any, ids: Any,
                 top_k: int, renormalize: bool, out: Any, out_kind: str,
                 options: ExpertOptions) -> None:
    from .kernels.activation import make_silu_and_mul_kernel

    num_experts, _, inter = experts.shape
    queue = x.sycl_queue
    host = host_gemm_kind(queue, x_kind, experts.kind)
    bf16 = host == "bfloat16"
    if host is not None:
        layout = plan_host_layout(ids, num_experts, top_k)
    else:
        layout = plan_layout(ids, align_on_device(ids, num_experts, DEFAULT_BLOCK_SIZE),
                             num_experts, DEFAULT_BLOCK_SIZE)
    if layout.n_rows == 0:  # every slot's expert lives on another device
        weighted_sum(act_placeholder(queue), "float32", layout.row_of_slot, weights, ids, out,
                     out_kind, top_k, renormalize, scale=options.scale)
        return
    act_kernel = make_silu_and_mul_kernel("float32", "float32", "bfloat16" if bf16 else "float32",
                                          options.activation, options.bias_kind)
    biases = {}
    if options.gate_bias is not None:
        biases = dict(row_expert=layout.row_expert(queue), gate_bias=options.gate_bias,
                      up_bias=options.up_bias)

    def token_rows(kind: str) -> tuple[Any, list | None]:
        """The first GEMMs' input: the tokens in place when they can be (decode), else the
        slots' rows gathered by expert, as ``kind``."""
        a_rows = layout.token_rows() if host and x_kind == kind else None
        if a_rows is not None:
            return x, a_rows
        return gather_rows(x, x_kind, layout, top_k, kind, into="rows" if host else None), None

    def activate(gate, up, out):
        act_kernel(flat(gate), flat(up), flat(out), layout.n_rows, inter, inter, inter, 0,
                   options.alpha, options.limit, **biases)

    if bf16:
        # bf16 activations in, float32 accumulation out; the activation is rounded to bf16
        # for the down GEMM, as any bf16 GEMM pipeline does
        packed = experts.packed()
        rows, a_rows = token_rows("bfloat16")
        gate, up = expert_matmul_host(rows, (experts.gate, experts.up), layout,
                                      packed=packed and packed[:2], a_rows=a_rows,
                                      into=("gate", "up"))
        act = intermediate("act", (layout.n_rows, inter), "bfloat16", queue)
        activate(gate, up, act)
        (down,) = expert_matmul_host(act, (experts.down,), layout, packed=packed and packed[2:],
                                     into=("down",))
    else:
        gate_w, up_w, down_w = experts.float32()
        rows, a_rows = token_rows("float32")
        if host:
            gate, up = expert_matmul_host(rows, (gate_w, up_w), layout, a_rows=a_rows,
                                          into=("gate", "up"))
            activate(gate, up, gate)
            (down,) = expert_matmul_host(gate, (down_w,), layout, into=("down",))
        else:
            gate, up = expert_matmul(rows, (gate_w, up_w), layout)
            activate(gate, up, gate)
            (down,) = expert_matmul(gate, (down_w,), layout)
    weighted_sum(down, "float32", layout.row_of_slot, weights, ids, out, out_kind, top_k,
                 renormalize, options.down_bias, options.down_bias_kind, scale=options.scale)


# Slots per block on the per-token path: an expert's weights are read once per block. When
# no expert has two slots a block of 1 is used: larger blocks cost 1.2-1.6x on a lone slot.
PER_TOKEN_BLOCK = 4


def _run_per_token(x: Any, x_kind: str, experts: ExpertWeights, weights: Any, ids: Any,
                   top_k: int, renormalize: bool, out: Any, out_kind: str,
                   options: ExpertOptions) -> None:
    from .kernels.gemv import make_block_gemv_kernel, make_finish_gate_up_kernel, splits

    num_experts, hidden, inter = experts.shape
    queue = x.sycl_queue
    n_slots = ids.shape[0]
    ids_host = dpnp.asnumpy(ids)
    shared = np.bincount(ids_host[ids_host >= 0], minlength=num_experts).max(initial=0) > 1
    block = PER_TOKEN_BLOCK if shared else 1
    meta, n_pos, n_blocks = plan_blocks(ids_host, num_experts, block)
    meta = pages.upload(meta, queue)
    slot_of_pos, block_expert = meta[:n_pos], meta[n_pos:n_pos + n_blocks]
    row_of_slot = meta[n_pos + n_blocks:]
    (gate, up, cols_gu), (down, _, cols_d) = experts.gemv_operands()
    if n_pos == 0:  # every slot's expert lives on another device
        weighted_sum(act_placeholder(queue), "float32", row_of_slot, weights, ids, out, out_kind,
                     top_k, renormalize, scale=options.scale)
        return

    partial = empty((splits(hidden) * n_pos * 2 * inter,), "float32", queue)
    make_block_gemv_kernel(x_kind, experts.kind, block, cols_gu, True, True)(
        flat(x), gate, up, slot_of_pos, block_expert, partial, hidden, inter, top_k, n_slots)
    act = empty((n_pos * inter,), "float32", queue)
    make_finish_gate_up_kernel(options.activation, options.bias_kind)(
        partial, act, inter, hidden, n_pos, block, block_expert, options)

    partial = empty((splits(inter) * n_pos * hidden,), "float32", queue)
    make_block_gemv_kernel("float32", experts.kind, block, cols_d, False, False)(
        act, down, down, slot_of_pos, block_expert, partial, inter, hidden, top_k, n_slots)
    weighted_sum(partial, "float32", row_of_slot, weights, ids, out, out_kind, top_k, renormalize,
                 options.down_bias, options.down_bias_kind, n_parts=splits(inter), part_rows=n_pos,
                 scale=options.scale)


def chunk_bytes_per_token(top_k: int, hidden: int, inter: int, grouped: bool) -> int:
    """float32 intermediate bytes one token costs: grouped rows (at most
    STACK_PADDING_LIMIT rows per slot) hold x, gate, up and down; per-token holds the
    activation of each slot."""
    if grouped:
        return int(STACK_PADDING_LIMIT * top_k) * (2 * hidden + 2 * inter) * 4
    return top_k * inter * 4


def check_memory(queue: Any, num_tokens: int, experts_shape: tuple[int, int, int], top_k: int,
                 grouped: bool, x_bytes: int, weight_bytes_to_copy: int, widened_bytes: int,
                 what: str) -> None:
    """MemoryError, before anything is allocated, when the call cannot fit on the device."""
    num_experts, hidden, inter = experts_shape
    per_token = chunk_bytes_per_token(top_k, hidden, inter, grouped)
    chunk = min(num_tokens, tokens_per_chunk(per_token))
    padding = num_experts * DEFAULT_BLOCK_SIZE * (2 * hidden + 2 * inter) * 4 if grouped else 0
    parts = {
        "weights copied to the device": weight_bytes_to_copy,
        "float32 copies of 16-bit weights": widened_bytes,
        "tokens in and out": 2 * x_bytes,
        f"intermediates of {chunk} tokens": chunk * per_token + padding,
    }
    breakdown = ", ".join(f"{name} {size / GIB:.2f} GiB" for name, size in parts.items() if size)
    check_fits(queue, sum(parts.values()), what, breakdown)


def run_on_device(x: Any, x_kind: str, experts: ExpertWeights, topk_weights: Any,
                  topk_indices: Any, top_k: int, renormalize: bool, grouped: bool,
                  options: ExpertOptions = DEFAULT_OPTIONS, out_kind: str | None = None) -> Any:
    """The forward on validated inputs; ``x`` in storage form on the experts' queue.

    Tokens go through in chunks whose float32 intermediates stay under the memory budget
    (:mod:`dpmoe.memory`). Returns a new [T, H] device array in storage form of
    ``out_kind`` (default: ``x_kind``).
    """
    queue = x.sycl_queue
    num_tokens = x.shape[0]
    out_kind = out_kind or x_kind
    out = empty(tuple(x.shape), out_kind, queue)
    if num_tokens == 0:
        return out
    ids = ids_to_device(topk_indices, queue)
    weights = weights_to_device(topk_weights, queue)
    _, hidden, inter = experts.shape
    chunk = tokens_per_chunk(chunk_bytes_per_token(top_k, hidden, inter, grouped))
    run = _run_grouped if grouped else _run_per_token
    for first in range(0, num_tokens, chunk):
        last = min(first + chunk, num_tokens)
        run(x[first:last], x_kind, experts, weights[first * top_k:last * top_k],
            ids[first * top_k:last * top_k], top_k, renormalize, out[first:last], out_kind, options)
    return out


def check_experts(gate_weights: Any, up_weights: Any, down_weights: Any) -> str:
    """Validates the three expert weight stacks; returns their shared storage kind."""
    kind = validation.float_array("gate_weights", gate_weights, 3)
    num_experts, hidden, inter = gate_weights.shape
    if min(num_experts, hidden, inter) == 0:
        raise ValueError(f"gate_weights must have non-zero [E, H, I], got {tuple(gate_weights.shape)}")
    for name, w, expected, meaning in (
        ("up_weights", up_weights, (num_experts, hidden, inter), "[E, H, I] like gate_weights"),
        ("down_weights", down_weights, (num_experts, inter, hidden), "[E, I, H]"),
    ):
        if validation.float_array(name, w, 3) != kind:
            raise TypeError(f"{name} must have gate_weights' dtype ({gate_weights.dtype}), got {w.dtype}")
        validation.shape(name, w, expected, meaning)
    return kind


def check_expert_options(num_experts: int, hidden: int, inter: int, activation: str,
                  gate_bias: Any, up_bias: Any, down_bias: Any, scale: Any,
                  expert_map: Any, alpha: Any, limit: Any) -> tuple[dict, set, int]:
    """Validates the optional expert arguments; returns (arrays by name, float kinds,
    the number of global expert ids)."""
    from .activation import ACTIVATIONS

    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, value in (("routed_scaling_factor", scale), ("alpha", alpha), ("limit", limit)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    arrays, kinds = {}, set()
    if (gate_bias is None) != (up_bias is None):
        raise ValueError("gate_bias and up_bias must be given together")
    for name, bias, expected in (("gate_bias", gate_bias, (num_experts, inter)),
                                 ("up_bias", up_bias, (num_experts, inter)),
                                 ("down_bias", down_bias, (num_experts, hidden))):
        if bias is not None:
            kinds.add(validation.float_array(name, bias, 2))
            validation.shape(name, bias, expected, "[E, I]" if name != "down_bias" else "[E, H]")
            arrays[name] = bias
    if gate_bias is not None and validation.float_array("up_bias", up_bias) != validation.float_array("gate_bias", gate_bias):
        raise TypeError("up_bias must have gate_bias' dtype")
    global_experts = check_expert_map(expert_map, num_experts)
    if expert_map is not None:
        arrays["expert_map"] = expert_map
    return arrays, kinds, global_experts


def check_expert_map(expert_map: Any, num_experts: int) -> int:
    """Validates an expert map (global id -> local id in [-1, E)); returns the number of
    global ids (``num_experts`` without a map)."""
    if expert_map is None:
        return num_experts
    validation.array("expert_map", expert_map, 1)
    if not np.issubdtype(np.dtype(expert_map.dtype), np.integer):
        raise TypeError(f"expert_map must have an integer dtype, got {expert_map.dtype}")
    if expert_map.shape[0] == 0:
        raise ValueError("expert_map must map at least one global expert")
    low, high = validation.min_max(expert_map)
    if low < -1 or high >= num_experts:
        raise ValueError(f"expert_map must hold local ids in [-1, {num_experts}) "
                         f"(-1: not on this device), found {int(low if low < -1 else high)}")
    return expert_map.shape[0]


def local_ids(topk_indices: Any, expert_map: Any) -> Any:
    """Global expert ids mapped through ``expert_map`` (where the ids are)."""
    if expert_map is None:
        return topk_indices
    if is_device_array(topk_indices):
        table = expert_map if is_device_array(expert_map) else dpnp.asarray(
            expert_map, sycl_queue=topk_indices.sycl_queue)
        return dpnp.take(table.astype(np.int32), topk_indices.astype(np.int64))
    return to_host(expert_map).astype(np.int32)[topk_indices]


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
    device: Any = None,
) -> Any:
    """The whole MoE expert computation for routed tokens.

    ``out[t] = s * sum_j w[t, j] * (down_e(act(x_t @ gate_e + bg_e) * (x_t @ up_e + bu_e)) + bd_e)``
    with ``e = topk_indices[t, j]``, ``w`` renormalized to sum 1 per token when
    ``renormalize``, ``act`` SiLU by default, no biases and ``s = 1`` unless given.

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
        use_grouped_topk: True for the grouped (aligned, batched GEMM) path, False for the
            per-token GEMV path; both give the same result.
        activation: "silu", "gelu", "gelu_tanh" or "swigluoai" (with ``alpha``, ``limit``).
        gate_bias, up_bias: optional [E, I] biases (both or neither); down_bias: [E, H].
        routed_scaling_factor: multiplies the output once.
        expert_map: optional [E_global] int map from global expert id to local id, -1 for
            experts on another device (expert parallelism): their slots add nothing.
        device: where NumPy inputs run.

    Returns:
        [T, H] array of hidden_states' dtype (NumPy for NumPy inputs, dpnp otherwise).
    """
    x_kind = validation.float_array("hidden_states", hidden_states, 2)
    w_kind = check_experts(gate_weights, up_weights, down_weights)
    num_experts, hidden, inter = gate_weights.shape
    num_tokens = hidden_states.shape[0]
    if hidden_states.shape[1] != hidden:
        raise ValueError(f"hidden_states must have shape [T, H] with H = {hidden} "
                         f"(gate_weights' dim 1), got {tuple(hidden_states.shape)}")
    extra, bias_kinds, global_experts = check_expert_options(
        num_experts, hidden, inter, activation, gate_bias, up_bias, down_bias,
        routed_scaling_factor, expert_map, alpha, limit)
    top_k = validation.positive_int("top_k", top_k, 1, global_experts)
    validation.routing_weights("topk_weights", topk_weights, (num_tokens, top_k))
    validation.expert_ids("topk_indices", topk_indices, (num_tokens, top_k), global_experts)
    if inplace and isinstance(hidden_states, np.ndarray) and not hidden_states.flags.writeable:
        raise ValueError("hidden_states is read-only; inplace=True writes the result there")
    arrays = {"hidden_states": hidden_states, "gate_weights": gate_weights,
              "up_weights": up_weights, "down_weights": down_weights,
              "topk_weights": topk_weights, "topk_indices": topk_indices, **extra}
    queue = placement(arrays, {x_kind, w_kind} | bias_kinds, device)
    if queue is None:
        host = {k: None if v is None else to_host(v) for k, v in
                (("gate_bias", gate_bias), ("up_bias", up_bias), ("down_bias", down_bias),
                 ("expert_map", expert_map))}
        result = reference.fused_moe_forward(
            to_host(hidden_states), to_host(gate_weights), to_host(up_weights),
            to_host(down_weights), to_host(topk_weights), to_host(topk_indices), top_k,
            renormalize, activation=activation, routed_scaling_factor=routed_scaling_factor,
            alpha=alpha, limit=limit, **host)
    else:
        on_host = [a for a in (gate_weights, up_weights, down_weights) if not is_device_array(a)]
        check_memory(
            queue, num_tokens, gate_weights.shape, top_k, use_grouped_topk,
            x_bytes=hidden_states.size * hidden_states.dtype.itemsize,
            weight_bytes_to_copy=sum(a.nbytes for a in on_host),
            widened_bytes=0 if not use_grouped_topk or w_kind == "float32"
            or host_gemm_kind(queue, x_kind, w_kind) else 3 * gate_weights.size * 4,
            what="fused_moe_forward",
        )
        options = ExpertOptions(
            activation=activation, alpha=float(alpha), limit=float(limit),
            scale=float(routed_scaling_factor))
        if gate_bias is not None:
            options.gate_bias = flat(to_device(gate_bias, queue))
            options.up_bias = flat(to_device(up_bias, queue))
            options.bias_kind = float_kind("gate_bias", gate_bias)
        if down_bias is not None:
            options.down_bias = flat(to_device(down_bias, queue))
            options.down_bias_kind = float_kind("down_bias", down_bias)
        experts = ExpertWeights(gate_weights, up_weights, down_weights, w_kind, queue,
                                persistent=False)
        out = run_on_device(to_device(hidden_states, queue), x_kind, experts, topk_weights,
                            local_ids(topk_indices, expert_map), top_k, renormalize,
                            use_grouped_topk, options)
        result = from_device(out, x_kind, returns_numpy(arrays))
    if not inplace:
        return result
    hidden_states[...] = to_host(result) if isinstance(hidden_states, np.ndarray) else result
    return hidden_states


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
        device: where NumPy inputs run.

    The weights are converted to dpmoe's layout (:func:`dpmoe.layouts.from_w13`) on every
    call, a copy of all expert weights; a model that reuses them should convert once (or
    build an :class:`dpmoe.MoELayer`) and call :func:`fused_moe_forward`.
    """
    from .layouts import from_w13

    gate, up, down = from_w13(w13, w2, interleaved=activation == "swigluoai")
    gate_bias = up_bias = None
    if b13 is not None:
        validation.array("b13", b13, 2)
        validation.shape("b13", b13, (w13.shape[0], w13.shape[1]), "[E, 2I]")
        inter = w13.shape[1] // 2
        gate_bias, up_bias = ((b13[:, ::2], b13[:, 1::2]) if activation == "swigluoai"
                              else (b13[:, :inter], b13[:, inter:]))
    validation.array("topk_ids", topk_ids, 2)
    return fused_moe_forward(
        hidden_states, gate, up, down, topk_weights, topk_ids, topk_ids.shape[1], False, inplace,
        activation=activation, gate_bias=gate_bias, up_bias=up_bias, down_bias=b2,
        routed_scaling_factor=routed_scaling_factor, expert_map=expert_map, device=device)
