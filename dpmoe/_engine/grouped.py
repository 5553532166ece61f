"""The grouped path: slots grouped by expert, whole-group GEMMs, SiLU-mul, weighted sum.

Rows of one chunk: gathered token rows (or the tokens in place when every expert has one
row), gate and up products, the activation (in place of gate, or bf16 for the down GEMM
on the bf16 host path), down products; then the reduction kernel sums each token's slots.
"""

from __future__ import annotations

from typing import Any

from dataclasses import replace

import numpy as np

from ..arrays import empty, flat
from ..device import dpnp
from ..pages import upload
from .experts import ExpertOptions, ExpertWeights
from .gemm import expert_matmul, expert_matmul_host, gather_rows, intermediate
from .metadata import plan_host_layout, plan_layout
from .plan import ExecutionPlan
from .quantized import dequant_group
from .reduce import weighted_sum


def run_grouped(plan: ExecutionPlan, x: Any, x_kind: str, experts: ExpertWeights,
                weights: Any, ids: Any, top_k: int, renormalize: bool, out: Any,
                out_kind: str, options: ExpertOptions, buffers: Any) -> None:
    """One chunk: ``x`` [t, H] storage form, flat ``weights``/``ids`` (t*k, local ids),
    result into ``out`` [t, H]; ``buffers``: a workspace set for the host path or None."""
    from ..kernels.activation import make_silu_and_mul_kernel

    num_experts, _, inter = experts.shape
    queue = x.sycl_queue
    host = plan.gemm.startswith("onemkl-host")
    bf16 = plan.gemm == "onemkl-host-bf16"
    # quantized experts are dequantised per expert with rows: no stacked layout (its
    # padded blocks would make every expert look used)
    layout = (plan_host_layout(ids, num_experts, top_k) if host
              else plan_layout(ids, num_experts, stack=not experts.quantized))
    if layout.n_rows == 0:  # every slot's expert lives on another device
        weighted_sum(empty((1,), "float32", queue), "float32", layout.row_of_slot, weights, ids,
                     out, out_kind, top_k, renormalize, scale=options.scale)
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
        return gather_rows(x, x_kind, layout, top_k, kind, buffers), None

    def activate(gate: Any, up: Any, result: Any) -> None:
        act_kernel(flat(gate), flat(up), flat(result), layout.n_rows, inter, inter, inter, 0,
                   options.alpha, options.limit, **biases)

    def gate_and_up(products: list) -> tuple[Any, Any]:
        """(gate, up) products; non-gated experts computed up alone (their activation reads
        only up)."""
        return (products[0], products[-1])

    first = slice(0 if experts.gated else 1, 2)  # which of gate, up the first GEMMs compute
    trans_first, trans_down = experts.trans
    names = ("gate", "up")[first]
    if experts.quantized:
        kind = "bfloat16" if bf16 else "float32"
        rows, a_rows = token_rows(kind)
        gate, up = gate_and_up(_quantized_gemms(experts, (0, 1)[first], rows, a_rows, layout,
                                                kind, host, buffers))
        act = gate
        if bf16:
            act = intermediate(buffers, "act", (layout.n_rows, inter), "bfloat16", queue)
        activate(gate, up, act)
        (down,) = _quantized_gemms(experts, (2,), act, None, layout, kind, host, buffers)
    elif bf16:
        # bf16 activations in, float32 accumulation out; the activation is rounded to bf16
        # for the down GEMM, as any bf16 GEMM pipeline does
        several = any(count > 1 for _, _, count in layout.segments)
        packed = experts.packed() if several else None  # single rows read weights in place
        rows, a_rows = token_rows("bfloat16")
        gate, up = gate_and_up(expert_matmul_host(
            rows, (experts.gate, experts.up)[first], layout, trans_first,
            packed=packed and packed[first], a_rows=a_rows, names=names, buffers=buffers))
        act = intermediate(buffers, "act", (layout.n_rows, inter), "bfloat16", queue)
        activate(gate, up, act)
        (down,) = expert_matmul_host(act, (experts.down,), layout, trans_down,
                                     packed=packed and packed[2:], names=("down",),
                                     buffers=buffers)
    else:
        gate_w, up_w, down_w = experts.float32()
        rows, a_rows = token_rows("float32")
        if host:
            gate, up = gate_and_up(expert_matmul_host(rows, (gate_w, up_w)[first], layout,
                                                      trans_first, a_rows=a_rows, names=names,
                                                      buffers=buffers))
            activate(gate, up, gate)
            (down,) = expert_matmul_host(gate, (down_w,), layout, trans_down, names=("down",),
                                         buffers=buffers)
        else:
            gate, up = gate_and_up(expert_matmul(rows, (gate_w, up_w)[first], layout,
                                                 trans_first))
            activate(gate, up, gate)
            (down,) = expert_matmul(gate, (down_w,), layout, trans_down)
    weighted_sum(down, "float32", layout.row_of_slot, weights, ids, out, out_kind, top_k,
                 renormalize, options.down_bias, options.down_bias_kind, scale=options.scale)


def _quantized_gemms(experts: Any, which: tuple, rows: Any, a_rows: list | None,
                     layout: Any, kind: str, host: bool, buffers: Any) -> list:
    """Rows times matrices ``which`` (0 gate, 1 up, 2 down) of quantized experts: a group
    of experts at a time is dequantised to ``kind`` into one reused buffer per matrix, then
    multiplied like plain weights; float32 [n_rows, N] per matrix. int8 codes are
    multiplied unscaled (exact in bf16) and the products' columns scaled afterwards: one
    multiply per output, and no rounding of the weights."""
    num_experts, hidden, inter = experts.shape
    queue = rows.sycl_queue
    n_dim = hidden if which == (2,) else inter
    k_dim = rows.shape[1]
    names = tuple(("gate", "up", "down")[m] for m in which)
    outs = [intermediate(buffers, name, (layout.n_rows, n_dim), "float32", queue)
            for name in names]
    segments = layout.segments
    starts = a_rows or [first for _, first, _ in segments]
    group = min(dequant_group(experts.shape, kind), len(segments))
    int8 = experts.kind == "int8"
    # one buffer per matrix for the whole call, each group dequantised into its front
    whole = [intermediate(buffers, f"dequantized_{i}", (group, k_dim, n_dim), kind, queue)
             for i in range(len(which))]
    for at in range(0, len(segments), group):
        chunk = segments[at:at + group]
        ids = upload(np.array([e for e, _, _ in chunk], np.int32), queue)
        stacks = [buf[:len(chunk)] for buf in whole]
        for matrix, stack in zip(which, stacks):
            experts.dequantize_into(matrix, ids, stack, kind, codes_only=int8)
        local = [(g, first, count) for g, (_, first, count) in enumerate(chunk)]
        if host:
            sub = replace(layout, segments=local)
            expert_matmul_host(rows, tuple(stacks), sub, a_rows=starts[at:at + group],
                               outs=outs)
        else:
            for stack, out in zip(stacks, outs):
                for g, first, count in local:
                    dpnp.matmul(rows[first:first + count], stack[g], out=out[first:first + count])
            queue.wait()  # these GEMMs read the buffers the next group refills
    if int8:
        from ..kernels.quant import make_scale_columns_kernel

        row_expert = layout.row_expert(queue)
        for matrix, out in zip(which, outs):
            make_scale_columns_kernel()(flat(out), row_expert, experts.column_scales(matrix),
                                        layout.n_rows, n_dim)
    return outs
