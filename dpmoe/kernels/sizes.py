"""Sizes the kernels are built around, importable without numba-dpex (the memory plan
needs them where no SYCL stack may be loaded)."""

# Rows of the reduction dimension one work-group of the per-token GEMV sums (split-K chunk).
ROWS_PER_SPLIT = 256


def splits(n_rows: int) -> int:
    """Split-K chunks of a reduction over ``n_rows`` rows."""
    return -(-n_rows // ROWS_PER_SPLIT)


# Work-items that share one row of a per-token GEMV over [E, N, K] weights, each leaving a
# partial (see dpmoe.kernels.gemv_t).
T_LANES = 16


def gemv_parts(k_dim: int, trans: bool) -> int:
    """Partial sums per output of a per-token GEMV reducing over ``k_dim``: split-K chunks
    for [E, K, N] weights, lanes for [E, N, K] ones (``trans``)."""
    return T_LANES if trans else splits(k_dim)
