"""Expert weights stored [E, N, K] (``x @ W^T``, each matrix [out, in] as checkpoints and
PyTorch keep them), given as transposed views: the engine keeps them as they lie and every
GEMM reads them so (host oneMKL with trans_b, dpnp.matmul on transposed views, the per-token
GEMV over rows in dpmoe/kernels/gemv_t.py), against the NumPy reference."""

import numpy as np
import pytest

import dpmoe
from dpmoe import reference
from dpmoe.arrays import BFLOAT16
from tests.conftest import BF16, assert_close, needs_device, normal, routing, to_dpnp

PATHS = ["grouped", "per_token"]


def stored_transposed(rng, num_experts, hidden, inter, dtype):
    """gate, up [E, H, I] and down [E, I, H] as transposed views of [out, in] matrices."""
    gate, up = (normal(rng, (num_experts, inter, hidden), dtype, hidden ** -0.5) for _ in range(2))
    down = normal(rng, (num_experts, hidden, inter), dtype, inter ** -0.5)
    return tuple(w.transpose(0, 2, 1) for w in (gate, up, down))


def layer_of(rng, num_experts, hidden, inter, top_k, dtype):
    router = normal(rng, (hidden, num_experts))
    gate, up, down = stored_transposed(rng, num_experts, hidden, inter, dtype)
    return dpmoe.MoELayer.from_numpy(router, gate, up, down, top_k=top_k), (gate, up, down)


def experts_reference(layer, x, weights, ids):
    h = layer.weights()
    return reference.fused_moe_forward(x, h["gate"], h["up"], h["down"], weights, ids,
                                       layer.top_k, False)


@needs_device
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("num_experts, hidden, inter, tokens, top_k", [
    (6, 64, 40, 1, 2),  # K a multiple of 4: 64-bit units, every row of a tile full
    (8, 100, 52, 5, 3),  # 25 and 13 units: a tail of lanes past the last full step
    (5, 30, 18, 7, 3),  # K not a multiple of 4: single elements
    (4, 67, 33, 37, 2),  # odd everything; more slots than experts (blocks of 4 shared)
])
def test_transposed_weights_run_in_place(rng, path, dtype, num_experts, hidden, inter, tokens,
                                         top_k):
    layer, given = layer_of(rng, num_experts, hidden, inter, top_k, dtype)
    assert layer._experts.trans == (True, True)
    x = normal(rng, (tokens, hidden), dtype)
    weights, ids = routing(rng, tokens, num_experts, top_k)
    assert_close(layer.experts(x, weights, ids, path=path), experts_reference(layer, x, weights, ids))
    h = layer.weights()  # handed back in dpmoe's layout, the values given
    for name, w in zip(("gate", "up", "down"), given):
        assert h[name].shape == w.shape and np.array_equal(h[name], w)


@needs_device
@pytest.mark.parametrize("skew", ["one", "half"])
@pytest.mark.parametrize("path", PATHS)
def test_transposed_weights_with_skewed_routing(rng, skew, path):
    layer, _ = layer_of(rng, 8, 64, 48, 2, BF16)
    x = normal(rng, (19, 64), BF16)
    weights, ids = routing(rng, 19, 8, 2, skew=skew)
    assert_close(layer.experts(x, weights, ids, path=path), experts_reference(layer, x, weights, ids))


@needs_device
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
def test_the_dpnp_matmul_path_reads_transposed_weights(rng, monkeypatch, dtype):
    monkeypatch.setenv("DPMOE_NO_HOST_ONEMKL", "1")
    layer, _ = layer_of(rng, 6, 64, 40, 2, dtype)
    x = normal(rng, (23, 64), dtype)
    weights, ids = routing(rng, 23, 6, 2, skew="half")
    got = layer.experts(x, weights, ids, path="grouped")
    assert layer.plan(23, path="grouped").gemm == "dpnp.matmul"
    assert_close(got, experts_reference(layer, x, weights, ids))


@needs_device
def test_tokens_at_an_offset_that_splits_a_word_fall_back_to_elements(rng):
    """The per-token kernel reads the tokens in 64-bit words; tokens that start mid-word
    (a view one element into a buffer) are read element by element instead."""
    import dpnp

    layer, _ = layer_of(rng, 4, 64, 32, 2, BF16)
    x = normal(rng, (3, 64), BF16)
    buffer = dpnp.zeros(3 * 64 + 1, dtype=np.uint16)
    buffer[1:] = to_dpnp(x.reshape(-1))
    shifted = buffer[1:].reshape(3, 64)
    assert shifted.get_array()._element_offset == 1
    weights, ids = routing(rng, 3, 4, 2)
    got = layer.experts(shifted, to_dpnp(weights), to_dpnp(ids), path="per_token")
    want = experts_reference(layer, x, weights, ids)
    assert_close(dpmoe.arrays.to_host(got).view(BFLOAT16), want)


@needs_device
def test_per_token_outputs_do_not_depend_on_the_batch(rng):
    """A token's bits are the same alone and among others (the lanes' partials are summed
    in a fixed order whatever shares its block)."""
    layer, _ = layer_of(rng, 6, 64, 40, 2, np.float32)
    x = normal(rng, (9, 64))
    weights, ids = routing(rng, 9, 6, 2, skew="half")
    together = layer.experts(x, weights, ids, path="per_token")
    for t in (0, 4, 8):
        alone = layer.experts(x[t:t + 1], weights[t:t + 1], ids[t:t + 1], path="per_token")
        assert np.array_equal(alone[0], together[t])


@needs_device
def test_a_layer_of_mixed_orientations_keeps_each_as_given(rng):
    """Gate and up as checkpoint views, down in dpmoe's layout (DBRX stores its w2 so)."""
    layer, (gate, up, down) = layer_of(rng, 4, 32, 24, 2, BF16)
    mixed = dpmoe.MoELayer.from_numpy(layer.weights()["router"], gate, up,
                                      np.ascontiguousarray(down), top_k=2)
    assert mixed._experts.trans == (True, False)
    x = normal(rng, (5, 32), BF16)
    for path in PATHS:
        assert_close(mixed(x, path=path), mixed.reference(x))


@needs_device
def test_fused_moe_forward_keeps_dpnp_weights_as_they_lie(rng):
    gate, up, down = stored_transposed(rng, 5, 48, 32, np.float32)
    x = normal(rng, (6, 48))
    weights, ids = routing(rng, 6, 5, 2)
    device = [to_dpnp(np.ascontiguousarray(w.transpose(0, 2, 1))).transpose((0, 2, 1))
              for w in (gate, up, down)]
    want = reference.fused_moe_forward(x, gate, up, down, weights, ids, 2, False)
    for grouped in (True, False):
        got = dpmoe.fused_moe_forward(to_dpnp(x), *device, to_dpnp(weights), to_dpnp(ids), 2,
                                      False, use_grouped_topk=grouped)
        assert_close(dpmoe.arrays.to_host(got), want)


@needs_device
def test_per_token_allocations_of_transposed_weights_fit_their_plan(rng, monkeypatch):
    """The lanes' partial sums (16 per output) are in the plan's estimate, which chunks
    the call to the budget."""
    from dpmoe import memory

    budget = 512 << 10
    monkeypatch.setenv("DPMOE_MAX_INTERMEDIATE_BYTES", str(budget))
    layer, _ = layer_of(rng, 4, 256, 64, 2, np.float32)
    tokens = 40
    plan = layer.plan(tokens, path="per_token")
    assert plan.trans == (True, True) and 1 <= plan.chunk_tokens < tokens
    x = normal(rng, (tokens, 256))
    weights, ids = routing(rng, tokens, 4, 2)
    dpmoe.workspace.clear()
    with memory.track_allocations() as sizes:
        got = layer.experts(x, weights, ids, path="per_token")
    chunks = -(-tokens // plan.chunk_tokens)
    assert max(sizes) <= budget
    assert sum(sizes) <= tokens * 256 * 4 * 2 + chunks * plan.chunk_bytes, (sum(sizes), plan)
    assert_close(got, experts_reference(layer, x, weights, ids))
