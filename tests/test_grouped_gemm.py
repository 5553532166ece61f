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


@needs_device
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), DTYPES[2]], ids=["f32", "bf16"])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("skew", [None, "one"], ids=["stacked", "per-expert"])
def test_portable_dpnp_matmul_path_matches_reference(rng, monkeypatch, dtype, trans_b, skew):
    # on CPU devices float32 and bf16 go through oneMKL's host GEMM; this forces the
    # dpnp.matmul path every other device takes (stacked when balanced, else per expert)
    monkeypatch.setenv("DPMOE_NO_HOST_ONEMKL", "1")
    A = normal(rng, (40, 24), dtype)
    B = normal(rng, (5, 24, 12), dtype, scale=0.2)
    if trans_b:
        B = np.ascontiguousarray(B.transpose(0, 2, 1))
    weights, ids = routing(rng, 40, 5, 2, skew)
    D = np.zeros((40, 12), dtype)
    want = D.copy()
    reference.grouped_gemm_moe(A, B, None, want, weights, ids, 2, trans_b)
    dpmoe.grouped_gemm_moe(A, B, None, D, weights, ids, 2, trans_b)
    assert_close(D, want)


@needs_device
def test_host_layout_groups_slots_by_expert_without_padding():
    from dpmoe.grouped_gemm import plan_host_layout

    ids = np.array([[3, 0], [-1, 3], [0, 2], [3, -1]], dtype=np.int32)  # -1: not local
    layout = plan_host_layout(to_dpnp(ids), 4, 2)
    row_of_slot = layout.row_of_slot.asnumpy()
    assert layout.n_rows == 6
    assert layout.segments == [(0, 0, 2), (2, 2, 1), (3, 3, 3)]
    assert row_of_slot.tolist() == [3, 0, -1, 4, 1, 2, 5, -1]  # stable within an expert
    assert layout.token_of_row.tolist() == [0, 2, 2, 0, 1, 3]
    assert layout.token_rows() is None  # experts 0 and 3 have several rows
    single = plan_host_layout(to_dpnp(np.array([[2, 0]], np.int32)), 4, 2)
    assert single.token_rows() == [0, 0]  # decode: both experts read token 0 in place
