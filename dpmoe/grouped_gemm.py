"""Grouped GEMM: every routing slot's row times its expert's matrix, then the weighted sum
of each token's slots (:func:`grouped_gemm_moe`).

The rows are grouped by expert as the fused forward's grouped path groups them, and go
through the same GEMM backends (:mod:`dpmoe._engine.gemm`): oneMKL's host GEMMs in place
on CPU devices, ``dpnp.matmul`` (stacked or per expert) elsewhere.
"""

from __future__ import annotations

from typing import Any

from . import memory, reference, validation
from ._dispatch import call, host, write_back
from ._engine.convert import ids_to_device, weights_to_device, widen
from ._engine.gemm import expert_matmul, expert_matmul_host, gather_rows, host_gemm_kind
from ._engine.metadata import (DEFAULT_BLOCK_SIZE, alignment_bytes, max_grouped_rows,
                               plan_host_layout, plan_layout)
from ._engine.reduce import weighted_sum
from .arrays import empty, to_device
from .device import is_device_array


def grouped_gemm_moe(
    A: Any,
    B: Any,
    C: Any,
    D: Any,
    topk_weights: Any,
    topk_indices: Any,
    top_k: int,
    trans_b: bool = False,
    *,
    device: Any = None,
) -> None:
    """``D[t] = sum_j w[t, j] * (A[t] @ B[e_tj] + C[e_tj])``, written into ``D`` in place.

    Args:
        A: [T, K] float32/float16/bfloat16 token rows.
        B: [E, K, N] expert matrices, or [E, N, K] with ``trans_b=True``.
        C: optional [E, N] bias, or None.
        D: [T, N] output (any of the three float kinds), overwritten.
        topk_weights: [T, top_k] float weights (used as given, not renormalized).
        topk_indices: [T, top_k] int32/int64 expert ids in ``[0, E)``.
        top_k: experts per token.
        trans_b: B is stored [E, N, K].
        device: where NumPy inputs run.
    """
    a_kind = validation.float_array("A", A, 2)
    b_kind = validation.float_array("B", B, 3)
    d_kind = validation.float_array("D", D, 2)
    num_tokens, k_dim = A.shape
    num_experts = B.shape[0]
    n_dim, b_k = (B.shape[1], B.shape[2]) if trans_b else (B.shape[2], B.shape[1])
    if b_k != k_dim:
        layout = "[E, N, K]" if trans_b else "[E, K, N]"
        raise ValueError(f"B must have shape {layout} with K = A.shape[1] = {k_dim}, got {tuple(B.shape)}")
    if num_experts == 0:
        raise ValueError("B must hold at least one expert, got shape " f"{tuple(B.shape)}")
    kinds = {a_kind, b_kind, d_kind}
    c_kind = "float32"
    if C is not None:
        c_kind = validation.float_array("C", C, 2)
        validation.shape("C", C, (num_experts, n_dim), "[E, N]")
        kinds.add(c_kind)
    validation.shape("D", D, (num_tokens, n_dim), "[T, N]")
    validation.writable("D", D, "grouped_gemm_moe writes its result there")
    top_k = validation.positive_int("top_k", top_k, 1, num_experts)
    validation.routing_weights("topk_weights", topk_weights, (num_tokens, top_k))
    validation.expert_ids("topk_indices", topk_indices, (num_tokens, top_k), num_experts)
    arrays = {"A": A, "B": B, "C": C, "D": D, "topk_weights": topk_weights,
              "topk_indices": topk_indices}

    def on_reference() -> Any:
        result = host(D).copy()
        reference.grouped_gemm_moe(host(A), host(B), host(C), result, host(topk_weights),
                                   host(topk_indices), top_k, trans_b)
        return result

    def on_device(queue: Any) -> Any:
        result = empty((num_tokens, n_dim), d_kind, queue)
        if num_tokens == 0:
            return result
        gemm = host_gemm_kind(queue, a_kind, b_kind)
        n_slots = num_tokens * top_k
        n_rows = max_grouped_rows(n_slots, num_experts, gemm is not None)
        uploads = sum(a.nbytes for a in (A, B, C, topk_weights, topk_indices)
                      if a is not None and not is_device_array(a))
        parts = {"inputs copied to the device": uploads,
                 "float32 copy of B": 0 if gemm or b_kind == "float32" else 4 * B.size,
                 "rows and products": 4 * n_rows * (k_dim + n_dim),
                 "routing metadata": 4 * 3 * n_slots
                 + (0 if gemm else alignment_bytes(n_slots, num_experts, DEFAULT_BLOCK_SIZE)),
                 "result": D.nbytes}
        memory.check_fits(queue, "grouped_gemm_moe", parts)
        ids = ids_to_device(topk_indices, queue)
        if gemm is not None:
            layout = plan_host_layout(ids, num_experts, top_k)
            rows = gather_rows(to_device(A, queue), a_kind, layout, top_k, gemm)
            (products,) = expert_matmul_host(rows, (to_device(B, queue),), layout, trans_b)
        else:
            layout = plan_layout(ids, num_experts)
            rows = gather_rows(to_device(A, queue), a_kind, layout, top_k)
            b32 = widen(to_device(B, queue), b_kind)
            (products,) = expert_matmul(rows, (b32.transpose((0, 2, 1)) if trans_b else b32,),
                                        layout)
        weighted_sum(products, "float32", layout.row_of_slot, weights_to_device(topk_weights, queue),
                     ids, result, d_kind, top_k, False,
                     None if C is None else to_device(C, queue), c_kind)
        return result

    write_back(D, call(arrays, kinds, device, on_reference, on_device, d_kind))
