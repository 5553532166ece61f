"""Sizes the kernels are built around, importable without numba-dpex (the memory plan
needs them where no SYCL stack may be loaded)."""

# Rows of the reduction dimension one work-group of the per-token GEMV sums (split-K chunk).
ROWS_PER_SPLIT = 256


def splits(n_rows: int) -> int:
    """Split-K chunks of a reduction over ``n_rows`` rows."""
    return -(-n_rows // ROWS_PER_SPLIT)
