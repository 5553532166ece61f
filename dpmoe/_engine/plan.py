"""How a fused forward runs, chosen in one place: path, GEMM backend, row layout, chunks.

:func:`choose` is the only reader of the tuned configs (:mod:`dpmoe.tuning`) and the only
place that decides between

- the grouped path: slots grouped by expert, whole-group GEMMs through oneMKL's host
  CBLAS in place (CPU devices; float32, or bf16 tokens with bf16 weights) or through
  ``dpnp.matmul`` (any device; float32 copies of 16-bit weights), then SiLU-mul and the
  weighted reduction kernels; and
- the per-token path: split-K GEMV kernels reading each routed expert's weights in place.

It also sizes the chunks of tokens so that one chunk's intermediates stay within the
budget (:func:`dpmoe.memory.intermediate_budget`), from an upper bound of what the runners
allocate (:func:`intermediate_bytes`, one entry per buffer they make); the tests hold the
runners' allocations to it (:func:`dpmoe.memory.track_allocations`). The row layout is a
policy here; the runners apply it to the routing they get (stacked or blocked rows, blocks
of 1 or PER_TOKEN_BLOCK slots).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import memory, tuning
from ..kernels.sizes import gemv_parts
from .gemm import host_gemm_kind
from .metadata import DEFAULT_BLOCK_SIZE, alignment_bytes, max_grouped_rows, max_positions
from .quantized import QUANT_FORMATS, dequant_group

# Slots per block on the per-token path: an expert's weights are read once per block. When
# no expert has two slots a block of 1 is used: larger blocks cost 1.2-1.6x on a lone slot.
PER_TOKEN_BLOCK = 4


@dataclass(frozen=True)
class ExecutionPlan:
    """How one call runs; ``str(plan)`` says it in a line (see :func:`dpmoe.explain`)."""

    path: str  # "grouped" or "per_token"
    gemm: str  # "onemkl-host-f32", "onemkl-host-bf16", "dpnp.matmul" or "gemv-kernels"
    layout: str  # how slots become rows
    source: str  # where the path came from: "path=...", "tuned (...)" or "default"
    num_tokens: int
    chunk_tokens: int  # tokens per chunk (0: not even one token fits the budget)
    chunk_bytes: int  # intermediates of one full chunk
    budget: int  # the chunk budget it was sized for
    shape: tuple = field(default=(0, 0, 0, 0))  # (E, H, I, top_k)
    kinds: tuple = field(default=("float32", "float32"))  # (tokens, weights)
    trans: tuple = field(default=(False, False))  # ExpertWeights.trans: [E, N, K] weights

    def intermediate_bytes(self, num_tokens: int) -> int:
        """Bytes of the intermediates a chunk of ``num_tokens`` tokens allocates."""
        return intermediate_bytes(self.path, self.gemm, num_tokens, *self.shape, *self.kinds,
                                  self.trans)

    def __str__(self) -> str:
        chunks = -(-self.num_tokens // self.chunk_tokens) if self.chunk_tokens else 0
        return (f"{self.path} path, GEMMs on {self.gemm}, {self.layout}; {self.num_tokens} "
                f"tokens in {chunks} chunk(s) of <= {self.chunk_tokens} "
                f"({memory.size(self.chunk_bytes)} of intermediates each, budget "
                f"{memory.size(self.budget)}); path from {self.source}")



def intermediate_bytes(path: str, gemm: str, num_tokens: int, num_experts: int, hidden: int,
                       inter: int, top_k: int, x_kind: str, w_kind: str,
                       trans: tuple = (False, False)) -> int:
    """Upper bound of what the runners allocate for ``num_tokens`` tokens, by buffer
    (``trans``: the orientation of gate/up and down, see ExpertWeights.trans)."""
    n_slots = num_tokens * top_k
    if n_slots == 0:
        return 0
    ids = 4 * n_slots * 3  # ids, weights, metadata: int32/float32 per slot
    if path == "per_token":
        n_pos = max_positions(n_slots, num_experts, PER_TOKEN_BLOCK)
        per_pos = 4 * (gemv_parts(hidden, trans[0]) * 2 * inter + inter
                       + gemv_parts(inter, trans[1]) * hidden)
        return ids + 4 * n_pos + n_pos * per_pos
    dequantized = 0
    if w_kind in QUANT_FORMATS:  # a group of experts' gate and up (then down) at a time
        kind = "bfloat16" if gemm == "onemkl-host-bf16" else "float32"
        group = min(dequant_group((num_experts, hidden, inter), kind), n_slots)
        dequantized = group * 2 * hidden * inter * (2 if kind == "bfloat16" else 4)
    if gemm.startswith("onemkl-host"):
        rows_item = 2 if gemm == "onemkl-host-bf16" else 4
        act = 2 * inter if gemm == "onemkl-host-bf16" else 0
        per_row = rows_item * hidden + 4 * 2 * inter + act + 4 * hidden
        return ids + n_slots * per_row + dequantized
    n_rows = max_grouped_rows(n_slots, num_experts, host=False)
    alignment = alignment_bytes(n_slots, num_experts, DEFAULT_BLOCK_SIZE) + 4 * (n_slots + n_rows)
    return ids + alignment + n_rows * 4 * (2 * hidden + 2 * inter) + dequantized


def _largest_chunk(path: str, gemm: str, num_tokens: int, sizes: tuple, budget: int) -> int:
    """The most tokens (<= num_tokens) whose intermediates fit ``budget``; 0 if none."""
    low, high = 0, max(num_tokens, 1)
    while low < high:  # the bytes grow with the tokens: bisect
        mid = (low + high + 1) // 2
        if intermediate_bytes(path, gemm, mid, *sizes) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def choose(queue: Any, num_tokens: int, shape: tuple[int, int, int], top_k: int, x_kind: str,
           w_kind: str, path: str = "auto", trans: tuple = (False, False)) -> ExecutionPlan:
    """The plan for ``num_tokens`` tokens of ``x_kind`` through experts of ``shape``
    (E, H, I) in ``w_kind`` on ``queue`` (stored as ``trans`` says, see
    ExpertWeights.trans); ``path`` "auto" asks the tuned config."""
    num_experts, hidden, inter = shape
    host = host_gemm_kind(queue, x_kind, w_kind)
    quantized = w_kind in QUANT_FORMATS
    if path == "auto" and x_kind != w_kind and not quantized:  # tuned with equal kinds
        path = tuning.default_config(num_tokens, host)["path"]
        source = f"default ({x_kind} tokens with {w_kind} weights are not tuned)"
    elif path == "auto":
        # quantized weights are dequantised for every grouped call: untuned, the default
        # keeps decode on the per-token kernels that read them in place
        config, source = tuning.get_config(num_experts, inter, w_kind, queue.sycl_device.name,
                                           num_tokens, None if quantized else host)
        path = config["path"]
    else:
        source = f"path={path!r}"
    if path == "per_token":
        gemm = "gemv-kernels"
        layout = f"blocks of {PER_TOKEN_BLOCK} slots per expert (1 when no expert has two)"
    elif host is not None:
        gemm = "onemkl-host-bf16" if host == "bfloat16" else "onemkl-host-f32"
        layout = "rows grouped by expert on the host, no padding"
    else:
        gemm = "dpnp.matmul"
        layout = (f"rows stacked per expert, or per-expert blocks of {DEFAULT_BLOCK_SIZE} when "
                  "stacking would more than double them")
    sizes = (num_experts, hidden, inter, top_k, x_kind, w_kind, tuple(trans))
    budget = memory.intermediate_budget()
    chunk = _largest_chunk(path, gemm, num_tokens, sizes, budget)
    return ExecutionPlan(path, gemm, layout, source, num_tokens, chunk,
                         intermediate_bytes(path, gemm, chunk, *sizes), budget,
                         (num_experts, hidden, inter, top_k), (x_kind, w_kind), tuple(trans))
