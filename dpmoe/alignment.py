"""Block alignment: group the T*k routing slots by expert, padded to whole blocks.

Slot ``i = t*k + j`` is token t's j-th choice. Each expert with n > 0 slots owns
``ceil(n / block_size)`` consecutive blocks, in ascending expert order; inside its region
its slots are in ascending order; padding holds the sentinel ``T*k``. Example
(``topk_ids = [[2, 0], [2, 1]]``, 3 experts, block_size 2)::

    slot:              0  1  2  3
    expert:            2  0  2  1
    sorted_token_ids: [1, 4 | 3, 4 | 0, 2 | 4]     (4 = T*k = padding)
    experts_ids:      [0,   | 1,   | 2,   | -1]
    num_tokens_post_pad: [6]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import reference, validation
from .arrays import ids_to_device, to_host
from .device import dpnp, is_device_array, placement, returns_numpy


def aligned_sizes(n_slots: int, num_experts: int, block_size: int) -> tuple[int, int]:
    """(length of sorted_token_ids, number of blocks) for the worst-case padding."""
    capacity = n_slots + num_experts * (block_size - 1)
    return capacity, -(-capacity // block_size)


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
    """Align flat int32 device ``ids`` (already range-checked); ``out`` are user buffers."""
    from .kernels.alignment import align_slots

    queue = ids.sycl_queue
    n_slots = ids.shape[0]
    capacity, n_blocks = aligned_sizes(n_slots, num_experts, block_size)
    if out is None:
        sorted_ids = dpnp.full(capacity, n_slots, dtype=np.int32, sycl_queue=queue)
        experts_ids = dpnp.empty(n_blocks, dtype=np.int32, sycl_queue=queue)
        post_pad = dpnp.empty(1, dtype=np.int32, sycl_queue=queue)
    else:
        sorted_ids, experts_ids, post_pad = out
        sorted_ids.fill(n_slots)
    counts = dpnp.empty(num_experts, dtype=np.int32, sycl_queue=queue)
    starts = dpnp.empty(num_experts, dtype=np.int32, sycl_queue=queue)
    ranks = dpnp.empty(max(n_slots, 1), dtype=np.int32, sycl_queue=queue)
    row_of_slot = dpnp.empty(max(n_slots, 1), dtype=np.int32, sycl_queue=queue)
    align_slots(ids, counts, ranks, starts, sorted_ids, experts_ids, post_pad, row_of_slot,
                num_experts, block_size)
    return Alignment(sorted_ids, experts_ids, post_pad, row_of_slot[:n_slots], ranks[:n_slots],
                     counts, starts)


def _check_buffer(name: str, buf: Any, length: int) -> None:
    validation.array(name, buf, 1)
    if buf.dtype != np.int32:
        raise TypeError(f"{name} must have dtype int32, got {buf.dtype}")
    validation.shape(name, buf, (length,), "needed length")
    if isinstance(buf, np.ndarray) and not buf.flags.writeable:
        raise ValueError(f"{name} is read-only; it is an output buffer")
    if is_device_array(buf) and not buf.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous to be filled in place")


def moe_align_block_size(
    topk_ids: Any,
    num_experts: int,
    block_size: int,
    sorted_token_ids: Any = None,
    experts_ids: Any = None,
    num_tokens_post_pad: Any = None,
    *,
    expert_map: Any = None,
    device: Any = None,
) -> tuple[Any, Any, Any] | None:
    """Group routing slots by expert, each expert padded to whole blocks (vLLM semantics).

    Args:
        topk_ids: [T, k] int32/int64 expert ids in ``[0, num_experts)``.
        num_experts: E >= 1.
        block_size: rows per block, >= 1.
        sorted_token_ids, experts_ids, num_tokens_post_pad: optional int32 output buffers of
            lengths ``T*k + E*(block_size-1)``, ``ceil(that / block_size)`` and 1; give all
            three (filled in place, returns None) or none (the arrays are returned).
        expert_map: optional [E_global] int map from global to local expert ids (-1: not on
            this device); ``topk_ids`` are then global, ``num_experts`` counts local experts,
            and slots of non-local experts are left out.
        device: where NumPy inputs run.

    Returns:
        ``(sorted_token_ids, experts_ids, num_tokens_post_pad)`` (see the module docstring),
        or None when the buffers were given.
    """
    num_experts = validation.positive_int("num_experts", num_experts)
    block_size = validation.positive_int("block_size", block_size)
    validation.array("topk_ids", topk_ids, 2)
    from .fused_moe import check_expert_map, local_ids

    global_experts = check_expert_map(expert_map, num_experts)
    extra = {} if expert_map is None else {"expert_map": expert_map}
    validation.expert_ids("topk_ids", topk_ids, tuple(topk_ids.shape), global_experts)
    buffers = {"sorted_token_ids": sorted_token_ids, "experts_ids": experts_ids,
               "num_tokens_post_pad": num_tokens_post_pad}
    given = [b is not None for b in buffers.values()]
    if any(given) and not all(given):
        raise ValueError("sorted_token_ids, experts_ids and num_tokens_post_pad must be given "
                         "together (all three output buffers) or not at all")
    capacity, n_blocks = aligned_sizes(topk_ids.size, num_experts, block_size)
    if all(given):
        for (name, buf), length in zip(buffers.items(), (capacity, n_blocks, 1)):
            _check_buffer(name, buf, length)
    arrays = {"topk_ids": topk_ids, **extra, **{k: v for k, v in buffers.items() if v is not None}}
    queue = placement(arrays, set(), device)
    topk_ids = local_ids(topk_ids, expert_map)
    if queue is None:
        result = reference.moe_align_block_size(to_host(topk_ids), num_experts, block_size)
    else:
        device_out = None
        if all(given) and all(is_device_array(b) for b in buffers.values()):
            device_out = tuple(buffers.values())
        aligned = align_on_device(ids_to_device(topk_ids, queue), num_experts, block_size, device_out)
        if device_out is not None:
            return None
        result = (aligned.sorted_token_ids, aligned.experts_ids, aligned.num_tokens_post_pad)
        if returns_numpy(arrays):
            result = tuple(dpnp.asnumpy(r) for r in result)
    if not all(given):
        return result
    for buf, value in zip(buffers.values(), result):
        buf[...] = value if is_device_array(buf) else to_host(value)
    return None


def plan_blocks(ids: np.ndarray, num_experts: int, block: int) -> tuple[np.ndarray, int, int]:
    """Group slots by expert into blocks of ``block`` positions, on the host.

    Returns one int32 array ``[slot_of_pos (n_pos) | block_expert (n_blocks) |
    row_of_slot (n_slots)]`` (one upload instead of three), ``n_pos`` and ``n_blocks``.
    Empty positions hold the sentinel ``n_slots``. The per-token path and the host-GEMM
    layouts (``block`` 1) group on the host; everything else uses the alignment kernels.
    """
    flat = ids.reshape(-1)
    n_slots = flat.size
    local = flat >= 0  # ids < 0: experts on another device, given no position
    counts = np.bincount(flat[local], minlength=num_experts)
    blocks = -(-counts // block)
    n_blocks = int(blocks.sum())
    n_pos = n_blocks * block
    first_pos = np.concatenate(([0], np.cumsum(blocks)[:-1])) * block
    first_sorted = np.concatenate(([0], np.cumsum(counts)[:-1]))
    # local slots by expert, ascending inside each (non-local ones sort first: dropped)
    order = np.argsort(flat, kind="stable")[n_slots - int(local.sum()):]
    experts_sorted = flat[order]
    pos = first_pos[experts_sorted] + (np.arange(order.size) - first_sorted[experts_sorted])
    meta = np.empty(n_pos + n_blocks + n_slots, dtype=np.int32)
    meta[:n_pos] = n_slots
    meta[pos] = order
    meta[n_pos:n_pos + n_blocks] = np.repeat(np.arange(num_experts), blocks)
    meta[n_pos + n_blocks:] = -1
    meta[n_pos + n_blocks + order] = pos
    return meta, n_pos, n_blocks
