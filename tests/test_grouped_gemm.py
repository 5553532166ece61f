import numpy as np
import pytest
from conftest import DTYPE_IDS, DTYPES, assert_close, needs_device, normal, routing, to_dpnp

import dpmoe
from dpmoe import reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "num_tokens, k_dim, n_dim, num_experts, top_k, skew",
    [
        (1, 33, 17, 4, 2, None),  # one token
        (21, 40, 24, 6, 2, "one"),  # all to one expert: per-expert layout
        (50, 16, 9, 8, 3, None),  # balanced: stacked layout
    ],
)
def test_matches_reference(rng, dtype, trans_b, bias, num_tokens, k_dim, n_dim, num_experts, top_k, skew):
    A = normal(rng, (num_tokens, k_dim), dtype)
    B = normal(rng, (num_experts, k_dim, n_dim), dtype, scale=0.2)
    if trans_b:
        B = np.ascontiguousarray(B.transpose(0, 2, 1))
    C = normal(rng, (num_experts, n_dim), dtype) if bias else None
    weights, ids = routing(rng, num_tokens, num_experts, top_k, skew)
    D = np.full((num_tokens, n_dim), 7, dtype)
    want = D.copy()
    reference.grouped_gemm_moe(A, B, C, want, weights, ids, top_k, trans_b)
    assert dpmoe.grouped_gemm_moe(A, B, C, D, weights, ids, top_k, trans_b) is None
    assert_close(D, want)


@needs_device
def test_dpnp_output_written_in_place(rng):
    A = normal(rng, (6, 10))
    B = normal(rng, (3, 10, 5))
    weights, ids = routing(rng, 6, 3, 2)
    D = to_dpnp(np.zeros((6, 5), np.float32))
    dpmoe.grouped_gemm_moe(to_dpnp(A), to_dpnp(B), None, D, to_dpnp(weights), to_dpnp(ids), 2)
    want = np.zeros((6, 5), np.float32)
    reference.grouped_gemm_moe(A, B, None, want, weights, ids, 2)
    assert_close(D.asnumpy(), want)
