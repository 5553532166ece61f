"""Block alignment of routing slots, deterministic (no atomics, so no arrival order).

Three launches: per expert, count its slots and rank them in slot order; one work-item
scans the padded counts into block offsets and block owners; per slot, scatter the slot id
to ``start[expert] + rank``.
"""

import numba_dpex as dpex
from numba_dpex import kernel_api as kapi

from .launch import call


@dpex.kernel
def count_and_rank_kernel(
    item: kapi.Item,
    ids,  # IN  (n_slots) int32 expert of each slot
    counts,  # OUT (E) int32 slots per expert
    ranks,  # OUT (n_slots) int32 position of the slot among its expert's slots
    n_slots,
):
    expert = item.get_id(0)
    seen = 0
    for s in range(n_slots):
        if ids[s] == expert:
            ranks[s] = seen
            seen += 1
    counts[expert] = seen


@dpex.kernel
def block_offsets_kernel(
    item: kapi.Item,
    counts,  # IN  (E) int32
    starts,  # OUT (E) int32 first padded position of each expert
    experts_ids,  # OUT (n_blocks) int32 owner of each block, -1 when unused
    num_tokens_post_pad,  # OUT (1) int32
    num_experts,
    block_size,
    n_blocks,
):
    # a serial scan over E (tens to hundreds): cheaper than a parallel scan's launches
    position = 0
    for e in range(num_experts):
        starts[e] = position
        n_expert_blocks = (counts[e] + block_size - 1) // block_size
        first = position // block_size
        for b in range(n_expert_blocks):
            experts_ids[first + b] = e
        position += n_expert_blocks * block_size
    for b in range(position // block_size, n_blocks):
        experts_ids[b] = -1
    num_tokens_post_pad[0] = position


@dpex.kernel
def scatter_slots_kernel(
    item: kapi.Item,
    ids,  # IN  (n_slots) int32
    ranks,  # IN  (n_slots) int32
    starts,  # IN  (E) int32
    sorted_token_ids,  # OUT (capacity) int32, pre-filled with the sentinel n_slots
    row_of_slot,  # OUT (n_slots) int32 padded position of each slot, -1 for ids < 0
):
    s = item.get_id(0)
    if ids[s] < 0:  # an expert on another device (expert parallelism): no row here
        row_of_slot[s] = -1
    else:
        row = starts[ids[s]] + ranks[s]
        sorted_token_ids[row] = s
        row_of_slot[s] = row


def align_slots(ids, counts, ranks, starts, sorted_token_ids, experts_ids,
                num_tokens_post_pad, row_of_slot, num_experts, block_size):
    """Fill every output of the alignment; ``sorted_token_ids`` must hold the sentinel."""
    n_slots = ids.shape[0]
    call(count_and_rank_kernel, dpex.Range(num_experts), ids, counts, ranks, n_slots)
    call(
        block_offsets_kernel, dpex.Range(1), counts, starts, experts_ids,
        num_tokens_post_pad, num_experts, block_size, experts_ids.shape[0],
    )
    if n_slots == 0:
        return
    call(
        scatter_slots_kernel, dpex.Range(n_slots), ids, ranks, starts,
        sorted_token_ids, row_of_slot,
    )
