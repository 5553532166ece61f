"""Grouped GEMM: every routing slot's row times its expert's matrix, via oneMKL batched GEMM.

After alignment, slots are gathered into float32 rows grouped by expert, and the products
go through ``dpnp.matmul`` (oneMKL) in one of two layouts:

- stacked: each expert gets M = max slots per expert rows, and one batched GEMM
  ``[E, M, K] @ [E, K, N]`` covers all experts (one launch; computes E*M rows);
- per expert: the block-aligned rows of each expert with slots, one GEMM per expert
  (no wasted rows; one launch per active expert).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import reference, validation, workspace
from .alignment import Alignment, align_on_device, plan_blocks
from .arrays import empty, flat, from_device, ids_to_device, to_device, to_host, weights_to_device, widen
from .device import dpnp, is_device_array, placement
from .pages import upload
from .reduction import weighted_sum

# A stacked batched GEMM is one launch but computes E*M rows; per-expert GEMMs compute only
# the routed rows but cost a launch each (0.1-0.2 ms on the CPU device). Stack while the
# padding at most doubles the rows. Re-tune with the benchmark when the launch cost changes.
STACK_PADDING_LIMIT = 2.0
# Rows per alignment block on the grouped path (only the per-expert layout uses blocks).
DEFAULT_BLOCK_SIZE = 16


@dataclass
class GroupedLayout:
    """Where each routing slot's row lives in the grouped float32 row buffer."""

    row_of_slot: Any  # (n_slots) int32 device array, -1 for slots of non-local experts
    n_rows: int  # rows of the buffer
    rows_per_expert: int  # M when stacked, 0 for the per-expert layout
    segments: list  # per-expert layout: (expert, first row, rows) for experts with slots
    num_experts: int = 0
    token_of_row: np.ndarray | None = None  # host-planned layouts: each row's token

    def token_rows(self) -> list | None:
        """When every expert has one row (decode), the token row each segment reads, so the
        host GEMMs can read the tokens in place instead of a gathered copy; else None."""
        if self.token_of_row is None or any(count != 1 for _, _, count in self.segments):
            return None
        return [int(self.token_of_row[first]) for _, first, _ in self.segments]

    def row_expert(self, queue: Any) -> Any:
        """(n_rows) int32 device array: the expert each row belongs to (padding: 0)."""
        if self.rows_per_expert:
            owners = np.repeat(np.arange(self.num_experts, dtype=np.int32), self.rows_per_expert)
        else:
            owners = np.zeros(max(self.n_rows, 1), dtype=np.int32)
            for expert, first, count in self.segments:
                owners[first:first + count] = expert
        return dpnp.asarray(owners, sycl_queue=queue)


def plan_layout(ids: Any, aligned: Alignment, num_experts: int, block_size: int) -> GroupedLayout:
    counts = dpnp.asnumpy(aligned.counts)  # one small copy: layouts are sized on the host
    n_slots = int(counts.sum())
    most = max(int(counts.max()), 1)
    if num_experts * most <= STACK_PADDING_LIMIT * n_slots:
        rows = dpnp.where(ids < 0, -1, ids * most + aligned.ranks)
        return GroupedLayout(rows.astype(np.int32), num_experts * most, most, [], num_experts)
    padded = -(-counts // block_size) * block_size
    starts = np.concatenate(([0], np.cumsum(padded)[:-1]))
    segments = [(e, int(starts[e]), int(counts[e])) for e in np.flatnonzero(counts)]
    return GroupedLayout(aligned.row_of_slot, int(padded.sum()), 0, segments, num_experts)


def plan_host_layout(ids: Any, num_experts: int, top_k: int) -> GroupedLayout:
    """Per-expert layout without padding rows, planned on the host.

    For host GEMMs (:func:`expert_matmul_host`): their per-expert segments are needed on
    the host anyway, and planning there from one small copy of the ids replaces the
    alignment kernels and their launches (what dominates a decode step's overhead).
    """
    from .onemkl_host import host_copy

    meta, n_rows, _ = plan_blocks(host_copy(flat(ids)), num_experts, 1)
    slot_of_row, expert_of_row = meta[:n_rows], meta[n_rows:2 * n_rows]
    counts = np.bincount(expert_of_row, minlength=num_experts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    segments = [(int(e), int(starts[e]), int(counts[e])) for e in np.flatnonzero(counts)]
    return GroupedLayout(upload(meta[2 * n_rows:], ids.sycl_queue), n_rows, 0, segments,
                         num_experts, slot_of_row // top_k)


def intermediate(name: str | None, shape: tuple[int, ...], kind: str, queue: Any) -> Any:
    """A new device array, or with a ``name`` the reused :mod:`dpmoe.workspace` buffer."""
    return workspace.buffer(name, shape, kind, queue) if name else empty(shape, kind, queue)


def gather_rows(src: Any, src_kind: str, layout: GroupedLayout, top_k: int,
                rows_kind: str = "float32", into: str | None = None) -> Any:
    """Token rows [T, K] (any kind) -> rows [n_rows, K] of ``rows_kind`` in ``layout``
    (``into``: the workspace buffer to use, see :func:`intermediate`)."""
    from .kernels.gather import make_gather_rows_kernel

    n_slots, row_len = layout.row_of_slot.shape[0], src.shape[-1]
    rows = intermediate(into, (layout.n_rows, row_len), rows_kind, src.sycl_queue)
    make_gather_rows_kernel(src_kind, rows_kind)(
        flat(src), layout.row_of_slot, flat(rows), n_slots, row_len, top_k
    )
    return rows


def expert_matmul_host(rows: Any, stacks: tuple, layout: GroupedLayout, trans_b: bool = False,
                       packed: tuple | None = None, a_rows: list | None = None,
                       into: tuple | None = None) -> list:
    """Rows [n_rows, K] times each of ``stacks`` ([E, K, N] weights, [E, N, K] with
    ``trans_b``), rows and weights both float32 or both bf16 bits, through oneMKL's host
    GEMMs in place (CPU devices; per-expert layout) -> one float32 [n_rows, N] per stack.

    ``packed``: per stack, per expert, bf16 weights in oneMKL's packed format (used for
    experts with two or more rows: a single row is a GEMV, which reads the bf16 weights
    faster in place than 2.4x their bytes packed). ``a_rows``: per segment, the row of
    ``rows`` it starts at, when not the layout's (see :meth:`GroupedLayout.token_rows`).
    ``into``: per stack, the workspace buffer for its product (see :func:`intermediate`).
    """
    from . import onemkl_host

    k_dim = rows.shape[1]
    n_dim = stacks[0].shape[1] if trans_b else stacks[0].shape[2]
    outs = [intermediate(name, (layout.n_rows, n_dim), "float32", rows.sycl_queue)
            for name in (into or (None,) * len(stacks))]
    rows.sycl_queue.wait()  # the host GEMM reads what device work wrote
    if rows.dtype == np.float32:
        onemkl_host.gemm_batch(rows, list(zip(stacks, outs)), layout.segments, n_dim, k_dim,
                               trans_b, a_rows)
        return outs
    starts = a_rows or [first for _, first, _ in layout.segments]
    for i, (weights, out) in enumerate(zip(stacks, outs)):
        for (expert, first, count), a_row in zip(layout.segments, starts):
            if packed is not None and count > 1:
                onemkl_host.gemm_packed(rows, a_row, packed[i][expert], out, first, count,
                                        n_dim, k_dim)
            else:
                onemkl_host.gemm(rows, a_row, weights, expert * k_dim * n_dim, out, first,
                                 count, n_dim, k_dim, trans_b)
    return outs


def dense_matmul(a: Any, b: Any) -> Any:
    """float32 ``a`` [M, K] @ ``b`` [K, N] (device arrays) -> [M, N]: oneMKL's
    host GEMM on CPU devices (no SYCL launch: a router's [T, H] @ [H, E] took longer to
    launch through ``dpnp.matmul`` than to compute), else ``dpnp.matmul``."""
    from . import onemkl_host

    (rows, k_dim), n_dim = a.shape, b.shape[1]
    contiguous = a.flags.c_contiguous and b.flags.c_contiguous
    if rows == 0 or not contiguous or not onemkl_host.available(a.sycl_queue):
        return dpnp.matmul(a, b)
    out = empty((rows, n_dim), "float32", a.sycl_queue)
    a.sycl_queue.wait()
    onemkl_host.gemm_batch(a, [(b, out)], [(0, 0, rows)], n_dim, k_dim)
    return out


def host_gemm_kind(queue: Any, rows_kind: str, weights_kind: str) -> str | None:
    """The kind the grouped GEMMs run in through oneMKL's host GEMM (None: ``dpnp.matmul``):
    float32 for float32 weights (rows are gathered as float32), bfloat16 when rows and
    weights both are, when the device allows."""
    from . import onemkl_host

    if weights_kind == "float32":
        kind = "float32"
    elif weights_kind == rows_kind == "bfloat16":
        kind = "bfloat16"
    else:
        return None
    return kind if onemkl_host.available(queue) else None


def expert_matmul(rows: Any, stacks: tuple, layout: GroupedLayout) -> list:
    """float32 rows [n_rows, K] times each of the float32 ``stacks`` ([E, K, N] weights) in
    ``layout``, through ``dpnp.matmul`` -> one [n_rows, N] per stack."""
    outs = []
    for weights in stacks:
        n_cols = weights.shape[2]
        if layout.rows_per_expert:
            stacked = rows.reshape(weights.shape[0], layout.rows_per_expert, rows.shape[1])
            outs.append(dpnp.matmul(stacked, weights).reshape(layout.n_rows, n_cols))
            continue
        out = empty((layout.n_rows, n_cols), "float32", rows.sycl_queue)
        for expert, first, count in layout.segments:
            dpnp.matmul(rows[first : first + count], weights[expert], out=out[first : first + count])
        outs.append(out)
    return outs


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
    if C is not None:
        c_kind = validation.float_array("C", C, 2)
        validation.shape("C", C, (num_experts, n_dim), "[E, N]")
        kinds.add(c_kind)
    validation.shape("D", D, (num_tokens, n_dim), "[T, N]")
    if isinstance(D, np.ndarray) and not D.flags.writeable:
        raise ValueError("D is read-only; grouped_gemm_moe writes its result there")
    top_k = validation.positive_int("top_k", top_k, 1, num_experts)
    validation.routing_weights("topk_weights", topk_weights, (num_tokens, top_k))
    validation.expert_ids("topk_indices", topk_indices, (num_tokens, top_k), num_experts)
    arrays = {"A": A, "B": B, "C": C, "D": D, "topk_weights": topk_weights,
              "topk_indices": topk_indices}
    arrays = {k: v for k, v in arrays.items() if v is not None}
    queue = placement(arrays, kinds, device)
    if queue is None:
        reference.grouped_gemm_moe(to_host(A), to_host(B), None if C is None else to_host(C), D,
                                   to_host(topk_weights), to_host(topk_indices), top_k, trans_b)
        return
    if num_tokens == 0:
        return
    ids = ids_to_device(topk_indices, queue)
    host = host_gemm_kind(queue, a_kind, b_kind)
    if host is not None:
        layout = plan_host_layout(ids, num_experts, top_k)
        rows = gather_rows(to_device(A, queue), a_kind, layout, top_k, host)
        (products,) = expert_matmul_host(rows, (to_device(B, queue),), layout, trans_b)
    else:
        layout = plan_layout(ids, align_on_device(ids, num_experts, DEFAULT_BLOCK_SIZE),
                             num_experts, DEFAULT_BLOCK_SIZE)
        rows = gather_rows(to_device(A, queue), a_kind, layout, top_k)
        b32 = widen(to_device(B, queue), b_kind)
        (products,) = expert_matmul(rows, (b32.transpose((0, 2, 1)) if trans_b else b32,), layout)
    result = empty((num_tokens, n_dim), d_kind, queue)
    weighted_sum(products, "float32", layout.row_of_slot, weights_to_device(topk_weights, queue),
                 ids, result, d_kind, top_k, False,
                 None if C is None else to_device(C, queue), c_kind if C is not None else "float32")
    D[...] = from_device(result, d_kind, not is_device_array(D))
