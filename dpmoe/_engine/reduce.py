"""The weighted reduction launcher shared by both paths and :func:`dpmoe.moe_sum`."""

from __future__ import annotations

from typing import Any

from ..arrays import flat


def weighted_sum(rows: Any, rows_kind: str, row_of_slot: Any, weights: Any, ids: Any,
                 out: Any, out_kind: str, top_k: int, renormalize: bool,
                 bias: Any = None, bias_kind: str = "float32", n_parts: int = 1,
                 part_rows: int = 0, scale: float = 1.0) -> None:
    """``out[t] = scale * sum_j w[t, j] / (sum_j w[t, j] if renormalize) * (rows[row(t, j)] + bias[e])``,
    skipping slots whose row is -1 (their expert is on another device); a token whose
    weights sum to 0 under ``renormalize`` gets NaN (0/0).

    With ``n_parts`` > 1, ``rows`` holds that many split-K partial buffers of ``part_rows``
    rows each, summed in order.
    """
    from ..kernels.reduction import make_weighted_sum_kernel

    num_tokens, n_cols = out.shape
    has_bias = bias is not None
    make_weighted_sum_kernel(rows_kind, bias_kind, out_kind)(
        flat(rows), row_of_slot, weights, ids,
        flat(bias) if has_bias else weights,  # never read without a bias
        flat(out), num_tokens, n_cols, top_k, has_bias, renormalize, n_parts, part_rows,
        scale,
    )
