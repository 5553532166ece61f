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

from typing import Any

import numpy as np

from . import memory, reference, validation
from ._dispatch import call, host, write_back
from ._engine.convert import ids_to_device
from ._engine.metadata import align_on_device, aligned_sizes, alignment_bytes, local_ids
from .device import is_device_array

# int32 sizes: sorted_token_ids must be indexable by the kernels' int32 positions.
MAX_CAPACITY = 2**31 - 1


def _check_buffer(name: str, buf: Any, length: int) -> None:
    validation.array(name, buf, 1)
    if buf.dtype != np.int32:
        raise TypeError(f"{name} must have dtype int32, got {buf.dtype}")
    validation.shape(name, buf, (length,), "needed length")
    validation.writable(name, buf, "it is an output buffer")
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
        block_size: rows per block, >= 1, with ``T*k + E*(block_size-1)`` < 2**31.
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
    global_experts = validation.expert_map(expert_map, num_experts)
    validation.expert_ids("topk_ids", topk_ids, tuple(topk_ids.shape), global_experts)
    capacity, n_blocks = aligned_sizes(topk_ids.size, num_experts, block_size)
    if capacity > MAX_CAPACITY:
        raise ValueError(f"block_size must keep T*k + E*(block_size-1) below 2**31, got "
                         f"block_size={block_size} (with E={num_experts}: {capacity})")
    buffers = {"sorted_token_ids": sorted_token_ids, "experts_ids": experts_ids,
               "num_tokens_post_pad": num_tokens_post_pad}
    given = [b is not None for b in buffers.values()]
    if any(given) and not all(given):
        raise ValueError("sorted_token_ids, experts_ids and num_tokens_post_pad must be given "
                         "together (all three output buffers) or not at all")
    if all(given):
        for (name, buf), length in zip(buffers.items(), (capacity, n_blocks, 1)):
            _check_buffer(name, buf, length)
    arrays = {"topk_ids": topk_ids, "expert_map": expert_map, **buffers}

    def on_device(queue: Any) -> tuple[Any, Any, Any] | None:
        memory.check_fits(queue, "moe_align_block_size", {
            "int32 ids and alignment arrays":
                alignment_bytes(topk_ids.size, num_experts, block_size) + 4 * topk_ids.size})
        ids = ids_to_device(local_ids(topk_ids, expert_map), queue)
        in_place = all(given) and all(is_device_array(b) for b in buffers.values())
        aligned = align_on_device(ids, num_experts, block_size,
                                  tuple(buffers.values()) if in_place else None)
        if in_place:
            return None
        return aligned.sorted_token_ids, aligned.experts_ids, aligned.num_tokens_post_pad

    def on_reference() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return reference.moe_align_block_size(host(local_ids(topk_ids, expert_map)),
                                              num_experts, block_size)

    result = call(arrays, set(), device, on_reference, on_device, ("int32",) * 3)
    if not all(given) or result is None:
        return result
    for buf, value in zip(buffers.values(), result):
        write_back(buf, value)
    return None
