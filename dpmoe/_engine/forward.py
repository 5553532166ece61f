"""Running a plan: the memory check, then the chosen path chunk by chunk.

The device runtime aborts or crawls when an allocation fails or gets huge (one dpnp array
of 4 GiB or more was measured copying at 0.2 GB/s on the CPU device), so every call
estimates its need from its :class:`~dpmoe._engine.plan.ExecutionPlan` before it
allocates, and runs long batches in chunks whose intermediates fit the budget.
"""

from __future__ import annotations

from typing import Any

from .. import memory
from ..arrays import empty
from ..workspace import WORKSPACE
from .convert import ids_to_device, weights_to_device
from .experts import DEFAULT_OPTIONS, ExpertOptions, ExpertWeights
from .grouped import run_grouped
from .per_token import run_per_token
from .plan import ExecutionPlan

_RUNNERS = {"grouped": run_grouped, "per_token": run_per_token}


def check_memory(plan: ExecutionPlan, queue: Any, what: str, **parts: int) -> None:
    """MemoryError, before anything is allocated, when the call cannot fit on the device or
    one token's intermediates exceed the chunk budget. ``parts``: other bytes the call
    allocates, by what they are (named with underscores for spaces)."""
    if plan.num_tokens and plan.chunk_tokens == 0:
        one = plan.intermediate_bytes(1)
        raise MemoryError(
            f"{what}: one token's intermediates on the {plan.path} path need "
            f"{memory.size(one)}, more than the chunk budget of {memory.size(plan.budget)} "
            "(DPMOE_MAX_INTERMEDIATE_BYTES)")
    named = {name.replace("_", " "): size for name, size in parts.items()}
    named[f"intermediates of {min(plan.chunk_tokens, plan.num_tokens)} tokens"] = plan.chunk_bytes
    memory.check_fits(queue, what, named)


def run(plan: ExecutionPlan, x: Any, x_kind: str, experts: ExpertWeights, topk_weights: Any,
        topk_indices: Any, renormalize: bool, options: ExpertOptions = DEFAULT_OPTIONS,
        out_kind: str | None = None) -> Any:
    """The forward on validated inputs, memory already checked; ``x`` [T, H] in storage
    form on the experts' queue, ``topk_indices`` local ids (-1: expert elsewhere). Returns
    a new [T, H] device array in storage form of ``out_kind`` (default ``x_kind``)."""
    queue = x.sycl_queue
    num_tokens = x.shape[0]
    top_k = plan.shape[3]
    out_kind = out_kind or x_kind
    out = empty(tuple(x.shape), out_kind, queue)
    if num_tokens == 0:
        return out
    ids = ids_to_device(topk_indices, queue)
    weights = weights_to_device(topk_weights, queue)
    runner = _RUNNERS[plan.path]
    chunk = plan.chunk_tokens
    with WORKSPACE.session(queue) as buffers:
        reuse = buffers if plan.gemm.startswith("onemkl-host") else None
        for first in range(0, num_tokens, chunk):
            last = min(first + chunk, num_tokens)
            runner(plan, x[first:last], x_kind, experts, weights[first * top_k:last * top_k],
                   ids[first * top_k:last * top_k], top_k, renormalize, out[first:last],
                   out_kind, options, reuse)
    return out
