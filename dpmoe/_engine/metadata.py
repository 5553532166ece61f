"""Routing metadata: where each routing slot's row goes, on the device or planned on the host.

Slot ``i = t*k + j`` is token t's j-th choice. Every layout groups slots by expert in
ascending expert order, ascending slots inside each expert; slots whose expert lives on
another device (local id -1, see :func:`local_ids`) get no row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arrays import empty, to_host
from ..device import dpnp, is_device_array
from ..pages import upload

# A stacked batched GEMM is one launch but computes E*M rows; per-expert GEMMs compute only
# the routed rows but cost a launch each (0.1-0.2 ms on the CPU device). Stack while the
# padding at most doubles the rows. Re-tune with the benchmark when the launch cost changes.
STACK_PADDING_LIMIT = 2.0
# Rows per alignment block on the portable grouped path (only its per-expert layout pads).
DEFAULT_BLOCK_SIZE = 16


def aligned_sizes(n_slots: int, num_experts: int, block_size: int) -> tuple[int, int]:
    """(length of sorted_token_ids, number of blocks) for the worst-case padding."""
    capacity = n_slots + num_experts * (block_size - 1)
    return capacity, -(-capacity // block_size)


def alignment_bytes(n_slots: int, num_experts: int, block_size: int) -> int:
    """Bytes :func:`align_on_device` allocates (its int32 arrays)."""
    capacity, n_blocks = aligned_sizes(n_slots, num_experts, block_size)
    return 4 * (capacity + n_blocks + 1 + 2 * num_experts + 2 * max(n_slots, 1))


@dataclass
class Alignment:
    """Device arrays describing where every routing slot goes."""

    sorted_token_ids: Any  # (capacity) int32 slot ids by expert, sentinel n_slots in padding
    experts_ids: Any  # (n_blocks) int32 owner of each block, -1 when unused
    num_tokens_post_pad: Any  # (1) int32 padded total
    row_of_slot: Any  # (n_slots) int32 padded position of each slot
    ranks: Any  # (n_slots) int32 position of each slot among its expert's slots
    counts: Any  # (E) int32 slots per expert
    starts: Any  # (E) int32 first padded position of each expert


def align_on_device(ids: Any, num_experts: int, block_size: int, out: tuple | None = None) -> Alignment:
    """Align flat int32 device ``ids`` (range-checked; -1 = not local) with the alignment
    kernels; ``out``: the caller's (sorted_token_ids, experts_ids, num_tokens_post_pad)."""
    from ..kernels.alignment import align_slots

    queue = ids.sycl_queue
    n_slots = ids.shape[0]
    capacity, n_blocks = aligned_sizes(n_slots, num_experts, block_size)
    if out is None:
        sorted_ids = empty((capacity,), "int32", queue)
        experts_ids = empty((n_blocks,), "int32", queue)
        post_pad = empty((1,), "int32", queue)
    else:
        sorted_ids, experts_ids, post_pad = out
    sorted_ids.fill(n_slots)
    counts = empty((num_experts,), "int32", queue)
    starts = empty((num_experts,), "int32", queue)
    ranks = empty((max(n_slots, 1),), "int32", queue)
    row_of_slot = empty((max(n_slots, 1),), "int32", queue)
    align_slots(ids, counts, ranks, starts, sorted_ids, experts_ids, post_pad, row_of_slot,
                num_experts, block_size)
    return Alignment(sorted_ids, experts_ids, post_pad, row_of_slot[:n_slots], ranks[:n_slots],
                     counts, starts)


def plan_blocks(ids: np.ndarray, num_experts: int, block: int) -> tuple[np.ndarray, int, int]:
    """Group slots by expert into blocks of ``block`` positions, on the host.

    Returns one int32 array ``[slot_of_pos (n_pos) | block_expert (n_blocks) |
    row_of_slot (n_slots)]`` (one upload instead of three), ``n_pos`` and ``n_blocks``.
    Empty positions hold the sentinel ``n_slots``.
    """
    ids = ids.reshape(-1)
    n_slots = ids.size
    local = ids >= 0
    counts = np.bincount(ids[local], minlength=num_experts)
    blocks = -(-counts // block)
    n_blocks = int(blocks.sum())
    n_pos = n_blocks * block
    first_pos = np.concatenate(([0], np.cumsum(blocks)[:-1])) * block
    first_sorted = np.concatenate(([0], np.cumsum(counts)[:-1]))
    # local slots by expert, ascending inside each (non-local ones sort first: dropped)
    order = np.argsort(ids, kind="stable")[n_slots - int(local.sum()):]
    experts_sorted = ids[order]
    pos = first_pos[experts_sorted] + (np.arange(order.size) - first_sorted[experts_sorted])
    meta = np.empty(n_pos + n_blocks + n_slots, dtype=np.int32)
    meta[:n_pos] = n_slots
    meta[pos] = order
    meta[n_pos:n_pos + n_blocks] = np.repeat(np.arange(num_experts), blocks)
    meta[n_pos + n_blocks:] = -1
    meta[n_pos + n_blocks + order] = pos
    return meta, n_pos, n_blocks


def max_positions(n_slots: int, num_experts: int, block: int) -> int:
    """Most positions :func:`plan_blocks` can return for ``n_slots`` slots: each expert
    with slots pads its last block."""
    return n_slots + (block - 1) * min(num_experts, n_slots)


@dataclass
class GroupedLayout:
    """Where each routing slot's row lives in the grouped row buffer."""

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
        return upload(owners, queue)


def max_grouped_rows(n_slots: int, num_experts: int, host: bool) -> int:
    """Most rows a grouped layout of ``n_slots`` slots can have: none padded on the host
    path; stacked (at most STACK_PADDING_LIMIT rows per slot) or block-aligned otherwise."""
    if host:
        return n_slots
    stacked = int(STACK_PADDING_LIMIT * n_slots)
    return max(stacked, n_slots + (DEFAULT_BLOCK_SIZE - 1) * min(num_experts, n_slots))


def plan_layout(ids: Any, num_experts: int, stack: bool = True) -> GroupedLayout:
    """The portable layout, built by the alignment kernels: stacked when the padding at
    most doubles the rows (and ``stack``), else per expert padded to DEFAULT_BLOCK_SIZE."""
    from ..kernels.gather import make_stacked_rows_kernel

    aligned = align_on_device(ids, num_experts, DEFAULT_BLOCK_SIZE)
    counts = dpnp.asnumpy(aligned.counts)  # one small copy: layouts are sized on the host
    n_slots = int(counts.sum())
    most = max(int(counts.max()), 1)
    if stack and num_experts * most <= STACK_PADDING_LIMIT * n_slots:
        rows = empty((ids.shape[0],), "int32", ids.sycl_queue)
        if ids.shape[0]:
            make_stacked_rows_kernel()(ids, aligned.ranks, rows, most)
        return GroupedLayout(rows, num_experts * most, most, [], num_experts)
    padded = -(-counts // DEFAULT_BLOCK_SIZE) * DEFAULT_BLOCK_SIZE
    starts = np.concatenate(([0], np.cumsum(padded)[:-1]))
    segments = [(e, int(starts[e]), int(counts[e])) for e in np.flatnonzero(counts)]
    return GroupedLayout(aligned.row_of_slot, int(padded.sum()), 0, segments, num_experts)


def plan_host_layout(ids: Any, num_experts: int, top_k: int) -> GroupedLayout:
    """Per-expert layout without padding rows, planned on the host.

    For host GEMMs: their per-expert segments are needed on the host anyway, and planning
    there from one small copy of the ids replaces the alignment kernels and their launches
    (what dominates a decode step's overhead).
    """
    meta, n_rows, _ = plan_blocks(to_host(ids), num_experts, 1)
    slot_of_row, expert_of_row = meta[:n_rows], meta[n_rows:2 * n_rows]
    counts = np.bincount(expert_of_row, minlength=num_experts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    segments = [(int(e), int(starts[e]), int(counts[e])) for e in np.flatnonzero(counts)]
    return GroupedLayout(upload(meta[2 * n_rows:], ids.sycl_queue), n_rows, 0, segments,
                         num_experts, slot_of_row // top_k)


def local_ids(topk_indices: Any, expert_map: Any) -> Any:
    """Global expert ids mapped through ``expert_map`` (where the ids are); -1 = elsewhere."""
    if expert_map is None:
        return topk_indices
    if is_device_array(topk_indices):
        table = expert_map if is_device_array(expert_map) else dpnp.asarray(
            expert_map, sycl_queue=topk_indices.sycl_queue)
        flat_ids = dpnp.ravel(topk_indices).astype(np.int64)  # dpnp 0.15 takes 1-D indices only
        return dpnp.take(table.astype(np.int32), flat_ids).reshape(topk_indices.shape)
    return to_host(expert_map).astype(np.int32)[topk_indices]
