"""The per-token path: block GEMVs that read each routed expert's weights in place.

Slots routed to the same expert are grouped into blocks of PER_TOKEN_BLOCK slots, so an
expert's weights are read once per block; the gate/up GEMV writes partial sums (split-K
chunks for [E, K, N] weights, one per lane for [E, N, K] ones, see ExpertWeights.trans), a
kernel sums them and applies the activation, the down GEMV writes its partials, and the
reduction kernel sums those per token in slot order (batch invariant: a token's bits do
not depend on the other tokens).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..arrays import as_words, empty, flat, to_host
from ..kernels.sizes import gemv_parts
from ..pages import upload
from .experts import ExpertOptions, ExpertWeights
from .metadata import plan_blocks
from .plan import PER_TOKEN_BLOCK, ExecutionPlan
from .reduce import weighted_sum


def run_per_token(plan: ExecutionPlan, x: Any, x_kind: str, experts: ExpertWeights,
                  weights: Any, ids: Any, top_k: int, renormalize: bool, out: Any,
                  out_kind: str, options: ExpertOptions, buffers: Any) -> None:
    """One chunk, arguments as :func:`dpmoe._engine.grouped.run_grouped` (no workspace)."""
    from ..kernels.gemv import make_block_gemv_kernel, make_finish_gate_up_kernel
    from ..kernels.gemv_t import make_block_gemv_t_kernel
    from ..kernels.numerics import UNIT_ARRAYS

    num_experts, hidden, inter = experts.shape
    queue = x.sycl_queue
    n_slots = ids.shape[0]
    ids_host = to_host(ids)
    shared = np.bincount(ids_host[ids_host >= 0], minlength=num_experts).max(initial=0) > 1
    block = PER_TOKEN_BLOCK if shared else 1
    meta, n_pos, n_blocks = plan_blocks(ids_host, num_experts, block)
    meta = upload(meta, queue)
    slot_of_pos, block_expert = meta[:n_pos], meta[n_pos:n_pos + n_blocks]
    row_of_slot = meta[n_pos + n_blocks:]
    if experts.quantized:
        from ..kernels.quant import make_quant_gemv_kernel

        (gate, s_gate, cols_gu, *scale_grid_gu), (up, s_up, _, _, _), \
            (down, s_down, cols_d, *scale_grid_d) = experts.gemv_operands()
        gate_up, down_ops = (gate, up, s_gate, s_up), (down, down, s_down, s_down)

        def gemv(in_kind: str, two: bool, by_token: bool, down: bool = False) -> Any:
            cols = cols_d if down else cols_gu
            return make_quant_gemv_kernel(experts.kind, in_kind, block, cols, two, by_token)
    else:
        (gate, up, cols_gu), (down, _, cols_d) = experts.gemv_operands()
        gate_up, down_ops, scale_grid_gu, scale_grid_d = (gate, up), (down, down), (), ()

        def gemv(in_kind: str, two: bool, by_token: bool, down: bool = False) -> Any:
            cols = cols_d if down else cols_gu
            if experts.trans[down]:
                return make_block_gemv_t_kernel(in_kind, experts.kind, block, cols, two,
                                                by_token)
            return make_block_gemv_kernel(in_kind, experts.kind, block, cols, two, by_token)
    if n_pos == 0:  # every slot's expert lives on another device
        weighted_sum(empty((1,), "float32", queue), "float32", row_of_slot, weights, ids, out,
                     out_kind, top_k, renormalize, scale=options.scale)
        return

    inp = flat(x)
    if experts.trans[0]:  # the tokens are read in the weights' units (see gemv_operands)
        inp = as_words(inp, UNIT_ARRAYS[(cols_gu, x_kind)])
        if inp is None:  # a chunk at an offset that splits a word: single elements
            inp, gate_up, cols_gu = flat(x), (flat(experts.gate), flat(experts.up)), 1
    parts_gu = gemv_parts(hidden, experts.trans[0])
    partial = empty((parts_gu * n_pos * 2 * inter,), "float32", queue)
    gemv(x_kind, True, True)(inp, *gate_up, slot_of_pos, block_expert, partial, hidden,
                             inter, top_k, n_slots, *scale_grid_gu)
    act = empty((n_pos * inter,), "float32", queue)
    make_finish_gate_up_kernel(options.activation, options.bias_kind)(
        partial, act, inter, parts_gu, n_pos, block, block_expert, options)

    parts_d = gemv_parts(inter, experts.trans[1])
    if experts.trans[1]:
        act = as_words(act, UNIT_ARRAYS[(cols_d, "float32")])
    partial = empty((parts_d * n_pos * hidden,), "float32", queue)
    gemv("float32", False, False, down=True)(act, *down_ops, slot_of_pos, block_expert, partial,
                                             inter, hidden, top_k, n_slots, *scale_grid_d)
    weighted_sum(partial, "float32", row_of_slot, weights, ids, out, out_kind, top_k, renormalize,
                 options.down_bias, options.down_bias_kind, n_parts=parts_d, part_rows=n_pos,
                 scale=options.scale)
