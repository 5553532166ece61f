"""Property-based tests: random sizes, dtypes and routing skews, every function vs the oracle."""

import numpy as np
import pytest
from conftest import BF16, DTYPES, REL_TOL, ROW_FLOOR, assert_close
from hypothesis import given
from hypothesis import strategies as st

import dpmoe
from dpmoe import reference

sizes = st.integers(1, 300)
dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**32 - 1)


@st.composite
def routings(draw, max_tokens=300):
    """(seed, T, E, k, topk_weights, topk_ids) with a drawn skew."""
    seed = draw(seeds)
    num_tokens = draw(st.integers(0, max_tokens))
    num_experts = draw(st.integers(1, 80))
    top_k = draw(st.integers(1, min(num_experts, 8)))
    skew = draw(st.sampled_from(["uniform", "one-hot", "zipf", "few"]))
    rng = np.random.default_rng(seed)
    if skew == "uniform":
        scores = rng.random((num_tokens, num_experts))
    elif skew == "one-hot":  # one expert wins everywhere, the rest fill in by index
        scores = np.tile(-np.arange(num_experts, dtype=float), (num_tokens, 1))
        scores[:, num_experts - 1] = 1.0
    elif skew == "zipf":
        scores = rng.random((num_tokens, num_experts)) / np.arange(1, num_experts + 1) ** 2
    else:  # only the first top_k + 1 experts ever chosen
        scores = rng.random((num_tokens, num_experts))
        scores[:, top_k + 1:] = -1.0
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :top_k].astype(np.int32)
    weights = rng.random((num_tokens, top_k), dtype=np.float32) + np.float32(0.01)
    return rng, num_tokens, num_experts, top_k, weights, ids


def normal(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(dtype)


@given(routings(), st.integers(1, 300), st.integers(1, 300), dtypes, st.booleans(), st.booleans())
def test_fused_moe_forward(routing, hidden, inter, dtype, grouped, renormalize):
    rng, num_tokens, num_experts, top_k, weights, ids = routing
    x = normal(rng, (num_tokens, hidden), dtype)
    gate = normal(rng, (num_experts, hidden, inter), dtype, hidden**-0.5)
    up = normal(rng, (num_experts, hidden, inter), dtype, hidden**-0.5)
    down = normal(rng, (num_experts, inter, hidden), dtype, inter**-0.5)
    got = dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, top_k, renormalize,
                                  use_grouped_topk=grouped)
    assert_close(got, reference.fused_moe_forward(x, gate, up, down, weights, ids, top_k, renormalize))


@given(routings(), st.integers(1, 128))
def test_moe_align_block_size(routing, block_size):
    _, _, num_experts, _, _, ids = routing
    got = dpmoe.moe_align_block_size(ids, num_experts, block_size)
    for g, w in zip(got, reference.moe_align_block_size(ids, num_experts, block_size)):
        np.testing.assert_array_equal(g, w)


@given(seeds, st.integers(0, 300), st.integers(1, 80), st.data(), dtypes, st.booleans())
def test_topk_softmax(seed, num_tokens, num_experts, data, dtype, renormalize):
    top_k = data.draw(st.integers(1, min(num_experts, 8)))
    logits = normal(np.random.default_rng(seed), (num_tokens, num_experts), dtype, 4.0)
    weights, ids = dpmoe.topk_softmax(logits, top_k, renormalize)
    want_w, want_ids = reference.topk_softmax(logits, top_k, renormalize)
    np.testing.assert_array_equal(ids, want_ids)
    assert_close(weights, want_w)


@given(routings(), sizes, sizes, dtypes, st.booleans(), st.booleans())
def test_grouped_gemm_moe(routing, k_dim, n_dim, dtype, trans_b, bias):
    rng, num_tokens, num_experts, top_k, weights, ids = routing
    A = normal(rng, (num_tokens, k_dim), dtype)
    B = normal(rng, (num_experts, n_dim, k_dim) if trans_b else (num_experts, k_dim, n_dim),
               dtype, k_dim**-0.5)
    C = normal(rng, (num_experts, n_dim), dtype) if bias else None
    D = np.zeros((num_tokens, n_dim), dtype)
    want = D.copy()
    dpmoe.grouped_gemm_moe(A, B, C, D, weights, ids, top_k, trans_b)
    reference.grouped_gemm_moe(A, B, C, want, weights, ids, top_k, trans_b)
    assert_close(D, want)


@given(seeds, st.integers(0, 300), st.integers(1, 8), sizes, dtypes)
def test_moe_sum(seed, num_tokens, top_k, hidden, dtype):
    rng = np.random.default_rng(seed)
    expert_out = normal(rng, (num_tokens, top_k, hidden), dtype)
    weights = rng.random((num_tokens, top_k), dtype=np.float32)
    assert_close(dpmoe.moe_sum(expert_out, weights), reference.moe_sum(expert_out, weights))


@given(seeds, st.integers(0, 300), sizes, dtypes)
def test_silu_and_mul_both_forms(seed, rows, d, dtype):
    rng = np.random.default_rng(seed)
    x = normal(rng, (rows, 2 * d), dtype, 4.0)
    assert_close(dpmoe.silu_and_mul(x), reference.silu_and_mul(x))
    gate, up = x[:, :d].copy(), x[:, d:].copy()
    dpmoe.silu_and_mul_moe(gate, up)
    assert_close(gate, reference.silu_and_mul(x))


@given(seeds, st.integers(0, 200), st.integers(1, 8), st.integers(1, 10), st.data(), dtypes,
       st.sampled_from(["softmax", "sigmoid"]), st.booleans(), st.booleans())
def test_grouped_topk(seed, num_tokens, groups, group_size, data, dtype, scoring, bias, renormalize):
    num_experts = groups * group_size
    topk_group = data.draw(st.integers(1, groups))
    top_k = data.draw(st.integers(1, min(8, topk_group * group_size)))
    scale = data.draw(st.sampled_from([1.0, 2.5]))
    rng = np.random.default_rng(seed)
    logits = normal(rng, (num_tokens, num_experts), dtype, 3.0)
    b = normal(rng, (num_experts,), np.float32, 0.2) if bias and (group_size >= 2 or groups == 1) else None
    got = dpmoe.grouped_topk(logits, top_k, groups, topk_group, renormalize, scoring, b, scale)
    want = reference.grouped_topk(logits, top_k, groups, topk_group, renormalize, scoring, b, scale)
    np.testing.assert_array_equal(got[1], want[1])
    assert_close(got[0], want[0])


@given(seeds, st.integers(0, 200), st.integers(1, 80), st.data(), dtypes)
def test_softmax_after_topk_and_sigmoid(seed, num_tokens, num_experts, data, dtype):
    top_k = data.draw(st.integers(1, min(num_experts, 8)))
    logits = normal(np.random.default_rng(seed), (num_tokens, num_experts), dtype, 3.0)
    for got, want in (
        (dpmoe.topk_softmax(logits, top_k, scoring="softmax_after_topk"),
         reference.topk_softmax(logits, top_k, scoring="softmax_after_topk")),
        (dpmoe.topk_sigmoid(logits, top_k, True), reference.topk_sigmoid(logits, top_k, True)),
    ):
        np.testing.assert_array_equal(got[1], want[1])
        assert_close(got[0], want[0])


# The comparison itself: each token row is held to its own scale.


def test_comparison_rejects_a_slot_dropped_from_a_quiet_token():
    # Two tokens with the same hidden state and experts, token 1 weighted 100x more; a kernel
    # that loses slot 1 (weight 0.01) of token 0 is off by about half of token 0's output,
    # under 2^-6 of the largest output (token 1's), which the old bfloat16 rule allowed.
    rng = np.random.default_rng(0)
    hidden, inter, experts = 64, 32, 4
    x = np.repeat(normal(rng, (1, hidden), BF16), 2, axis=0)
    gate = normal(rng, (experts, hidden, inter), BF16, hidden**-0.5)
    up = normal(rng, (experts, hidden, inter), BF16, hidden**-0.5)
    down = normal(rng, (experts, inter, hidden), BF16, inter**-0.5)
    ids = np.array([[0, 1], [0, 1]], np.int32)
    weights = np.array([[0.01, 0.01], [1.0, 1.0]], np.float32)
    want = reference.fused_moe_forward(x, gate, up, down, weights, ids, 2, False)
    dropped = weights.copy()
    dropped[0, 1] = 0.0
    got = reference.fused_moe_forward(x, gate, up, down, dropped, ids, 2, False)

    rows = np.abs(want.astype(np.float32)).max(axis=1)
    assert 95 < rows[1] / rows[0] < 105
    err = np.abs(got.astype(np.float32) - want.astype(np.float32)).max()
    assert err <= REL_TOL[BF16] * rows.max()  # what the old rule, scaled by the largest output, allowed
    with pytest.raises(AssertionError, match="token row 0"):
        assert_close(got, want)
    # rounding to a neighbouring bfloat16 value everywhere still passes
    assert_close((want.view(np.uint16) + np.uint16(1)).view(BF16), want)


def test_comparison_floors_rows_of_zeros_and_keeps_narrow_outputs_whole():
    want = np.zeros((3, 16), np.float32)
    want[1] = 2.0
    got = want.copy()
    got[0] = 0.9 * REL_TOL[want.dtype] * ROW_FLOOR * 2.0  # a row of zeros: at 1/16 of 2.0
    assert_close(got, want)
    got[0] *= 1.2
    with pytest.raises(AssertionError, match="token row 0"):
        assert_close(got, want)
    # one value per row can cancel to nearly zero: narrow outputs keep the whole output's scale
    narrow = np.array([[1e-3], [2.0]], np.float32)
    assert_close(narrow + np.float32(1.5e-5), narrow)
