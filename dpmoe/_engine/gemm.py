"""The expert GEMMs behind one interface, and the operands they read.

Two backends multiply each expert's rows by its weights:

- ``dpnp.matmul`` (oneMKL's SYCL GEMM, any device): float32 rows and weights, one batched
  GEMM over experts stacked to the same row count, or one GEMM per active expert;
- oneMKL's host CBLAS in place on the device memory (CPU devices only, see
  :mod:`dpmoe.onemkl_host`): float32 through one ``cblas_sgemm_batch`` call, bf16 rows
  with bf16 weights through ``cblas_gemm_bf16bf16f32`` (packed weights for experts with
  several rows).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import onemkl_host
from ..arrays import empty, flat
from ..device import dpnp
from .metadata import GroupedLayout
from .quantized import QUANT_FORMATS


def host_gemm_kind(queue: Any, rows_kind: str, weights_kind: str) -> str | None:
    """The kind the grouped GEMMs run in through oneMKL's host GEMM (None: ``dpnp.matmul``):
    float32 for float32 weights (rows are gathered as float32), bfloat16 when rows and
    weights both are, when the device allows."""
    if weights_kind in QUANT_FORMATS:  # dequantised for the GEMMs to the rows' kind
        kind = "bfloat16" if rows_kind == "bfloat16" else "float32"
    elif weights_kind == "float32":
        kind = "float32"
    elif weights_kind == rows_kind == "bfloat16":
        kind = "bfloat16"
    else:
        return None
    return kind if onemkl_host.available(queue) else None


def intermediate(buffers: Any, name: str, shape: tuple[int, ...], kind: str, queue: Any) -> Any:
    """The named buffer of a workspace set (:mod:`dpmoe.workspace`), or a new array."""
    return buffers.buffer(name, shape, kind) if buffers is not None else empty(shape, kind, queue)


def gather_rows(src: Any, src_kind: str, layout: GroupedLayout, top_k: int,
                rows_kind: str = "float32", buffers: Any = None) -> Any:
    """Token rows [T, K] (any kind) -> rows [n_rows, K] of ``rows_kind`` in ``layout``."""
    from ..kernels.gather import make_gather_rows_kernel

    n_slots, row_len = layout.row_of_slot.shape[0], src.shape[-1]
    rows = intermediate(buffers, "rows", (layout.n_rows, row_len), rows_kind, src.sycl_queue)
    make_gather_rows_kernel(src_kind, rows_kind)(
        flat(src), layout.row_of_slot, flat(rows), n_slots, row_len, top_k
    )
    return rows


def expert_matmul_host(rows: Any, stacks: tuple, layout: GroupedLayout, trans_b: bool = False,
                       packed: tuple | None = None, a_rows: list | None = None,
                       names: tuple | None = None, buffers: Any = None,
                       outs: list | None = None) -> list:
    """Rows [n_rows, K] times each of ``stacks`` ([E, K, N] weights, [E, N, K] with
    ``trans_b``), rows and weights both float32 or both bf16 bits, through oneMKL's host
    GEMMs in place (CPU devices; per-expert layout) -> one float32 [n_rows, N] per stack.

    ``packed``: per stack, per expert, bf16 weights in oneMKL's packed format (used for
    experts with two or more rows: a single row is a GEMV, which reads the bf16 weights
    faster in place than 2.4x their bytes packed). ``a_rows``: per segment, the row of
    ``rows`` it starts at, when not the layout's (see :meth:`GroupedLayout.token_rows`).
    ``names``: per stack, the workspace buffer for its product; ``outs``: the products'
    arrays instead (only the layout's rows are written).
    """
    k_dim = rows.shape[1]
    n_dim = stacks[0].shape[1] if trans_b else stacks[0].shape[2]
    if outs is None:
        outs = [intermediate(buffers, name, (layout.n_rows, n_dim), "float32", rows.sycl_queue)
                for name in (names or ("product",) * len(stacks))]
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


def expert_matmul(rows: Any, stacks: tuple, layout: GroupedLayout, trans_b: bool = False
                  ) -> list:
    """float32 rows [n_rows, K] times each of the float32 ``stacks`` ([E, K, N] weights,
    [E, N, K] with ``trans_b``) in ``layout``, through ``dpnp.matmul`` -> one [n_rows, N]
    per stack."""
    outs = []
    for weights in stacks:
        if trans_b:  # dpnp.matmul reads the transposed view in place (oneMKL's trans flag)
            weights = weights.transpose((0, 2, 1))
        n_cols = weights.shape[2]
        out = empty((layout.n_rows, n_cols), "float32", rows.sycl_queue)
        if layout.rows_per_expert:
            stacked = rows.reshape(weights.shape[0], layout.rows_per_expert, rows.shape[1])
            dpnp.matmul(stacked, weights,
                        out=out.reshape(weights.shape[0], layout.rows_per_expert, n_cols))
        else:
            for expert, first, count in layout.segments:
                dpnp.matmul(rows[first:first + count], weights[expert], out=out[first:first + count])
        outs.append(out)
    return outs


def dense_matmul(a: Any, b: Any) -> Any:
    """float32 ``a`` [M, K] @ ``b`` [K, N] (device arrays) -> [M, N]: oneMKL's host GEMM on
    CPU devices (no SYCL launch: a router's [T, H] @ [H, E] took longer to launch through
    ``dpnp.matmul`` than to compute), else ``dpnp.matmul``."""
    (rows, k_dim), n_dim = a.shape, b.shape[1]
    out = empty((rows, n_dim), "float32", a.sycl_queue)
    contiguous = a.flags.c_contiguous and b.flags.c_contiguous
    if rows == 0 or not contiguous or not onemkl_host.available(a.sycl_queue):
        return dpnp.matmul(a, b, out=out) if rows else out
    a.sycl_queue.wait()
    onemkl_host.gemm_batch(a, [(b, out)], [(0, 0, rows)], n_dim, k_dim)
    return out
