"""Block GEMVs over expert matrices stored [E, N, K]: ``x @ W^T``, as checkpoints keep them.

The companion of :mod:`dpmoe.kernels.gemv` (weights [E, K, N]) for weights used in the
orientation they were loaded in, so that loading a layer is a copy, not a transpose.

Each output n is a dot product along row n of W, a contiguous run of K elements. A row is
read by LANES neighbouring work-items (the vector lanes of the CPU device), lane l taking
units l, l + LANES, ... of the row, a unit being the elements of one 64-bit word (4
16-bit or 2 float32 elements; single elements when K or the input's offset does not allow
words). Each lane's sum is written out as a partial (part = lane), and the partials are
summed in lane order by the same kernels that sum split-K partials: the order depends only
on K, so the path stays batch invariant.
"""

from functools import lru_cache

import numba_dpex as dpex

from .gemv import kernel_namespace, slot_source
from .launch import call
from .numerics import unit_loader
from .sizes import T_LANES

# Work-items per row (the partials each output gets). 16 matches AVX-512's float lanes;
# 8 measured 1.8x slower.
LANES = T_LANES
# Rows per work-group: 4-64 measured the same.
ROWS_PER_GROUP = 8
# Rows per work-item, sharing each decoded input unit: 1, 2, 4, 8 took 154, 128, 114,
# 117 ms for a bf16 OLMoE layer at 16 tokens (10.1, 8.7, 8.0, 8.7 ms at 1 token).
ROWS_PER_ITEM = 4

_KERNEL_TEMPLATE = """
def block_gemv_t_kernel(
    nd, inp, w_a, w_b, slot_of_pos, block_expert, partial,
    n_units, n_out, top_k, n_slots, n_tiles, n_pos,
):
    lane = nd.get_local_id(0)
    g = nd.get_group().get_group_id(1)
    tile = g % n_tiles
    blk = g // n_tiles
    # this item's rows: first + j * step for j < ROWS (the group's rows interleave)
    step = nd.get_local_range(1)
    first = tile * step * ROWS + nd.get_local_id(1)
    expert = block_expert[blk]
{init}
    full = n_units - n_units % LANES
    for start in range(0, full, LANES):
        u = start + lane
{body}
    u = full + lane
    if u < n_units:
{body}
    part = lane * n_pos + blk * BLOCK
{store}
"""


def _source(block: int, per_unit: int, two: bool, rows: int) -> str:
    """Kernel source with named accumulators (see :func:`dpmoe.kernels.gemv._block_gemv_source`
    for why not an array), one per (slot, matrix, row). Each item computes ``rows`` rows
    from one load of each input unit: decoding a unit of the input costs about what
    decoding one of the weights does, so it is shared between rows."""
    mats = ("a", "b") if two else ("a",)
    init, body, store = [], [], []
    for j in range(rows):
        init.append(f"    n{j} = min(first + {j} * step, n_out - 1)  # past the end: row n_out-1")
        init.append(f"    w{j} = (expert * n_out + n{j}) * n_units")
        for m in mats:
            loaded = ", ".join(f"{m}{j}w{i}" for i in range(per_unit))
            body.append(f"{loaded} = load_w(w_{m}, w{j} + u)")
    for r in range(block):
        init += [f"    acc{r}{m}{j} = ZERO" for m in mats for j in range(rows)] + slot_source(r)
        xs = ", ".join(f"x{r}_{i}" for i in range(per_unit))
        body.append(f"{xs} = load_x(inp, src{r} * n_units + u)")
        for m in mats:
            for j in range(rows):
                terms = " + ".join(f"x{r}_{i} * {m}{j}w{i}" for i in range(per_unit))
                body.append(f"acc{r}{m}{j} += {terms}")
        for j in range(rows):
            store.append(f"    if first + {j} * step < n_out:")
            for i, m in enumerate(mats):
                store.append(f"        partial[((part + {r}) * WIDTH + {i}) * n_out + n{j}] = "
                             f"acc{r}{m}{j}")
    return _KERNEL_TEMPLATE.format(
        init="\n".join(init), body="\n".join(" " * 8 + line for line in body),
        store="\n".join(store))


@lru_cache(maxsize=None)
def make_block_gemv_t_kernel(in_kind: str, w_kind: str, block: int, per_unit: int,
                             two_matrices: bool, rows_by_token: bool):
    """Partial products of input rows with expert matrices [E, N, K], one per lane.

    Arguments of the launcher: ``inp`` the input rows [*, K] and ``w_a``, ``w_b`` the
    matrices, all flat and seen as :data:`dpmoe.kernels.numerics.UNIT_ARRAYS` says for
    ``per_unit`` and their kind (``w_b`` read only when ``two_matrices``); ``slot_of_pos``,
    ``block_expert``, ``n_slots``, ``top_k``, ``rows_by_token`` as
    :func:`dpmoe.kernels.gemv.make_block_gemv_kernel`; OUT ``partial``
    (LANES * n_pos * width * N) float32; ``k_dim``, ``n_out`` = K, N.
    """
    namespace = dict(kernel_namespace(in_kind, block, per_unit, two_matrices, rows_by_token),
                     load_w=unit_loader(per_unit, w_kind), load_x=unit_loader(per_unit, in_kind),
                     LANES=LANES, ROWS=ROWS_PER_ITEM)
    source = _source(block, per_unit, two_matrices, ROWS_PER_ITEM)
    exec(compile(source, f"<block_gemv_t_kernel block={block} unit={per_unit}>", "exec"),
         namespace)
    kernel = dpex.kernel(namespace["block_gemv_t_kernel"])

    def launch(inp, w_a, w_b, slot_of_pos, block_expert, partial, k_dim, n_out, top_k, n_slots):
        n_blocks = block_expert.shape[0]
        n_tiles = -(-n_out // (ROWS_PER_GROUP * ROWS_PER_ITEM))
        grid = dpex.NdRange(dpex.Range(LANES, n_blocks * n_tiles * ROWS_PER_GROUP),
                            dpex.Range(LANES, ROWS_PER_GROUP))
        call(kernel, grid, inp, w_a, w_b, slot_of_pos, block_expert, partial,
             k_dim // per_unit, n_out, top_k, n_slots, n_tiles, n_blocks * block)

    return launch
