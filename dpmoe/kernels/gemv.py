"""The per-token path: block GEMVs that read each routed expert's weights in place.

For a few tokens the expert GEMMs are matrix-vector products bound by reading the weights.
Slots routed to the same expert are grouped into blocks of ``block`` slots, so each
expert's weights are read once per block (not once per slot), in their own dtype (no gather,
no float32 copy), widened in registers.

How the kernel reads memory on the CPU device: the OpenCL CPU runtime runs a work-group as
a loop over its work-items, vectorised across neighbouring work-items. Neighbouring
work-items take neighbouring column pairs, and a group barrier after every few rows makes the
runtime finish those rows for the whole (wide) work-group before the next ones, so each row
is streamed contiguously instead of being walked down column by column (5 -> 18 GB/s in a
float32 GEMV, measured). The rows are split into fixed-size chunks (split-K) for
parallelism; the chunk size depends only on the matrix shape, so every slot is summed in
the same order whatever else is in the batch (the path is batch invariant).
"""

from functools import lru_cache

import numpy as np
import numba_dpex as dpex
from numba_dpex import kernel_api as kapi

from .launch import call

from .numerics import ix, loader, pair_loader, unit_loader
from .sizes import ROWS_PER_SPLIT, splits

# Rows each work-group streams between two barriers; more rows amortise the barrier, fewer
# keep each region's working set small. 8 measured best (16 no better, 1 half as fast).
ROWS_PER_BARRIER = 8
# Widest work-group used; 1024 and 4096 measured the same, 64-256 were 2-4x slower.
MAX_GROUP_SIZE = 1024


# Where a work-item sits in the grid of (block, split-K chunk, column tile) work-groups,
# for this module's kernels and the quantized ones (see split_k_grid).
GRID_PROLOGUE = """\
    group_size = nd.get_local_range(0)
    g = nd.get_group().get_group_id(0)
    tile = g % n_tiles
    rest = g // n_tiles
    split = rest % n_splits
    blk = rest // n_splits
    unit = tile * group_size + nd.get_local_id(0)
    live = unit < n_units
    expert = block_expert[blk]
"""

_KERNEL_TEMPLATE = """
def block_gemv_kernel(
    nd, inp, w_a, w_b, slot_of_pos, block_expert, partial,
    n_rows, n_units, n_cols, top_k, n_slots, n_splits, n_tiles, n_pos,
):
""" + GRID_PROLOGUE + """{init}
    first = split * ROWS_PER_SPLIT
    last = min(first + ROWS_PER_SPLIT, n_rows)
    for base in range(first, last, ROWS_PER_BARRIER):
        if live:
            for h in range(base, min(base + ROWS_PER_BARRIER, last)):
                w_off = (expert * n_rows + h) * n_units + unit
{accumulate}
        group_barrier(nd.get_group())
    if live:
        col = unit * COLS
{store}
"""


def slot_source(r: int) -> list[str]:
    """Kernel source lines giving block position ``r`` its slot (``slot{r}``) and input row
    (``src{r}``), for the generated GEMVs of this module, the quantized and the [N, K] ones."""
    return [
        f"    slot{r} = slot_of_pos[blk * BLOCK + {r}]",
        # an empty position computes on row 0 (never read): no branch in the hot loop
        f"    src{r} = 0",
        f"    if slot{r} < n_slots:",
        f"        src{r} = slot{r} // top_k if BY_TOKEN else blk * BLOCK + {r}",
    ]


def _block_gemv_source(block: int, cols: int, two: bool) -> str:
    """Kernel source with one named accumulator per (slot, column, matrix) of the block.

    Accumulators indexed at run time (PrivateArray) stay in memory and ran 3-5x slower
    than named scalars, which the compiler keeps in registers; so the source is generated.
    """
    mats = ("a", "b") if two else ("a",)
    init, accumulate, store = [], [], []
    for m in mats:
        accumulate.append(f"                {', '.join(f'{m}{c}' for c in range(cols))}"
                          f" = load_w(w_{m}, w_off)")
    for r in range(block):
        init += [f"    acc{r}{m}{c} = ZERO" for m in mats for c in range(cols)] + slot_source(r)
        accumulate.append(f"                x{r} = load_in(inp, src{r} * n_rows + h)")
        accumulate += [f"                acc{r}{m}{c} += x{r} * {m}{c}"
                       for m in mats for c in range(cols)]
        store.append(f"        out = ((split * n_pos) + blk * BLOCK + {r}) * WIDTH * n_cols + col")
        store += [f"        partial[out + {i} * n_cols + {c}] = acc{r}{m}{c}"
                  for i, m in enumerate(mats) for c in range(cols)]
    return _KERNEL_TEMPLATE.format(init="\n".join(init), accumulate="\n".join(accumulate),
                                   store="\n".join(store))


def kernel_namespace(in_kind: str, block: int, cols: int, two_matrices: bool,
                     rows_by_token: bool) -> dict:
    """What the generated GEMV sources (this module's and the quantized ones) read: the
    input loader, the barrier and the constants of one specialisation."""
    return {
        "np": np,
        "load_in": loader(in_kind),
        "group_barrier": kapi.group_barrier,
        "ZERO": np.float32(0.0),
        "BLOCK": block,
        "COLS": cols,
        "TWO": two_matrices,
        "WIDTH": 2 if two_matrices else 1,
        "BY_TOKEN": rows_by_token,
        "ROWS_PER_SPLIT": ROWS_PER_SPLIT,
        "ROWS_PER_BARRIER": ROWS_PER_BARRIER,
    }


def split_k_grid(n_units: int, n_rows: int, n_blocks: int) -> tuple:
    """(NdRange, splits, tiles) of a GEMV over ``n_units`` work-items per row, ``n_rows``
    rows and ``n_blocks`` blocks of slots: one work-group per (block, split, tile)."""
    group_size = min(MAX_GROUP_SIZE, -(-n_units // 16) * 16)
    n_tiles = -(-n_units // group_size)
    n_splits = splits(n_rows)
    n_groups = n_blocks * n_splits * n_tiles
    return (dpex.NdRange(dpex.Range(n_groups * group_size), dpex.Range(group_size)),
            n_splits, n_tiles)


@lru_cache(maxsize=None)
def make_block_gemv_kernel(in_kind: str, w_kind: str, block: int, cols: int,
                           two_matrices: bool, rows_by_token: bool):
    """Partial products of input rows with expert matrices [E, R, N], per row chunk.

    Arguments of the kernel: ``inp`` input rows (any float kind); ``w_a``, ``w_b`` the
    matrices (``w_b`` read only when ``two_matrices``), seen as words of ``cols`` columns
    per work-item: 4 (16-bit kinds as uint64 words), 2 (pairs: float32, or 16-bit as
    uint32 words) or 1; ``slot_of_pos`` (n_pos) int32 slot at each block position,
    ``n_slots`` when empty; ``block_expert`` (n_blocks) int32; OUT ``partial`` (n_splits *
    n_pos * width * N) float32.
    ``rows_by_token``: a slot's input row is its token's (gate/up), else its block position's
    (down, whose input is the activation).
    """
    namespace = dict(kernel_namespace(in_kind, block, cols, two_matrices, rows_by_token),
                     load_w=pair_loader(w_kind) if cols == 2 else unit_loader(cols, w_kind))
    source = _block_gemv_source(block, cols, two_matrices)
    exec(compile(source, f"<block_gemv_kernel block={block} cols={cols}>", "exec"), namespace)
    block_gemv_kernel = dpex.kernel(namespace["block_gemv_kernel"])

    def launch(inp, w_a, w_b, slot_of_pos, block_expert, partial, n_rows, n_cols, top_k, n_slots):
        n_units = n_cols // cols
        grid, n_splits, n_tiles = split_k_grid(n_units, n_rows, block_expert.shape[0])
        call(
            block_gemv_kernel, grid,
            inp, w_a, w_b, slot_of_pos, block_expert, partial, n_rows, n_units, n_cols,
            top_k, n_slots, n_splits, n_tiles, block_expert.shape[0] * block,
        )

    return launch


@lru_cache(maxsize=None)
def make_finish_gate_up_kernel(activation: str, bias_kind: str | None):
    """Sums the ``n_parts`` partials of gate and up and applies the gated activation (with the
    block's expert's biases when ``bias_kind`` is given)."""
    from .activation import ACTIVATION_FUNCTIONS

    act_mul = ACTIVATION_FUNCTIONS[activation]
    has_bias = bias_kind is not None
    load_bias = loader(bias_kind or "float32")

    @dpex.kernel
    def finish_gate_up_kernel(
        item: kapi.Item,
        partial,  # IN  (n_splits * n_pos * 2 * I) float32, gate then up per position
        act,  # OUT (n_pos * I) float32 act(gate) * up
        block_expert,  # IN (n_blocks) int32, read only with biases
        gate_bias,  # IN (E * I), read only with biases
        up_bias,  # IN (E * I), read only with biases
        inter,
        n_splits,
        n_pos,
        block,
        alpha,
        limit,
    ):
        col = item.get_id(0)  # columns along the vector lanes: their loads are contiguous
        pos = item.get_id(1)
        g = np.float32(0.0)
        u = np.float32(0.0)
        for s in range(n_splits):
            base = (s * n_pos + pos) * 2 * inter + col
            g += partial[ix(base)]
            u += partial[ix(base + inter)]
        if has_bias:
            at = block_expert[pos // block] * inter + col
            g += load_bias(gate_bias, at)
            u += load_bias(up_bias, at)
        act[ix(pos * inter + col)] = act_mul(g, u, alpha, limit)

    def launch(partial, act, inter, n_parts, n_pos, block, block_expert, options):
        biased = options.gate_bias is not None
        call(
            finish_gate_up_kernel, dpex.Range(inter, n_pos), partial, act, block_expert,
            options.gate_bias if biased else partial, options.up_bias if biased else partial,
            inter, n_parts, n_pos, block, np.float32(options.alpha),
            np.float32(options.limit),
        )

    return launch
