"""The memory promise: every allocation a call makes is inside its estimate and its chunk
budget, and a call that cannot fit raises MemoryError before it allocates anything."""

import numpy as np
import pytest
from conftest import assert_close, needs_device, normal, routing, to_dpnp

import dpmoe
from dpmoe import memory, reference

# H wide enough for 8 split-K chunks (256 rows each): the per-token path's partial sums are
# 8x its activations, which the old estimate left out.
T, H, I, E, K = 40, 2048, 24, 4, 2


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(5)
    x = normal(rng, (T, H))
    gate, up = normal(rng, (E, H, I), scale=H**-0.5), normal(rng, (E, H, I), scale=H**-0.5)
    down = normal(rng, (E, I, H), scale=I**-0.5)
    weights, ids = routing(rng, T, E, K)
    return x, gate, up, down, weights, ids


@needs_device
@pytest.mark.parametrize("path", ["grouped", "per_token"])
def test_every_allocation_fits_the_plan_and_the_budget(problem, monkeypatch, path):
    budget = 256 << 10
    monkeypatch.setenv("DPMOE_MAX_INTERMEDIATE_BYTES", str(budget))
    device_args = [to_dpnp(a) for a in problem]  # already on the device: nothing uploaded
    plan = dpmoe.explain(T, H, I, E, K, path=path)
    assert 1 <= plan.chunk_tokens < T and plan.chunk_bytes <= budget
    dpmoe.workspace.clear()  # the host path may reuse buffers: count fresh ones
    with memory.track_allocations() as sizes:
        out = dpmoe.fused_moe_forward(*device_args, K, path=path)
    chunks = -(-T // plan.chunk_tokens)
    out_bytes = T * H * 4
    assert max(sizes) <= max(budget, out_bytes), sorted(sizes)[-5:]
    assert sum(sizes) <= out_bytes + chunks * plan.chunk_bytes, (sum(sizes), plan)
    assert_close(out, reference.fused_moe_forward(*problem, K))


@needs_device
def test_plan_counts_the_per_token_partial_sums():
    plan = dpmoe.explain(T, H, I, E, K, path="per_token")
    activations = T * K * I * 4
    assert plan.intermediate_bytes(T) >= 2 * (H // 256) * activations  # gate and up partials


@needs_device
def test_one_token_over_the_budget_is_a_memory_error(problem, monkeypatch):
    monkeypatch.setenv("DPMOE_MAX_INTERMEDIATE_BYTES", "1024")
    with memory.track_allocations() as sizes, pytest.raises(MemoryError, match="DPMOE_MAX_INTERMEDIATE_BYTES"):
        dpmoe.fused_moe_forward(*problem, K, path="per_token")
    assert sizes == []


@needs_device
@pytest.mark.parametrize("path", ["grouped", "per_token"])
def test_deepseek_widths_fail_before_allocating(monkeypatch, path):
    """H=7168, I=2048, k=8, T=8192 bf16 on a device whose free memory holds everything but
    one chunk's intermediates: refused up front, nothing allocated (the arrays are views of
    one small array: nothing that large is ever made)."""
    from conftest import BF16

    experts, hidden, inter, tokens, top_k = 16, 7168, 2048, 8192, 8
    plan = dpmoe.explain(tokens, hidden, inter, experts, top_k, "bfloat16", path=path)
    assert 0 < plan.chunk_bytes <= plan.budget and plan.chunk_tokens < tokens
    tiny = np.zeros((1, 1, 1), BF16)
    weights = [np.broadcast_to(tiny, (experts, hidden, inter)),
               np.broadcast_to(tiny, (experts, hidden, inter)),
               np.broadcast_to(tiny, (experts, inter, hidden))]
    x = np.broadcast_to(np.zeros((1, 1), BF16), (tokens, hidden))
    ids = np.broadcast_to(np.arange(top_k, dtype=np.int32), (tokens, top_k))
    topk = np.ones((tokens, top_k), np.float32)
    rest = sum(w.nbytes for w in weights) + 2 * x.nbytes + topk.nbytes * 2
    free = rest + plan.chunk_bytes - 1
    monkeypatch.setattr(memory, "device_memory", lambda queue: (free, free))
    with memory.track_allocations() as sizes, pytest.raises(MemoryError, match="needs about"):
        dpmoe.fused_moe_forward(x, *weights, topk, ids, top_k, path=path)
    assert sizes == []


def test_layer_construction_checks_memory_before_making_weights():
    with pytest.raises(MemoryError, match="MoELayer needs about"):
        dpmoe.MoELayer(7168, 2048, 256, top_k=8, dtype="bf16")


@needs_device
def test_layer_call_checks_memory_before_copying(monkeypatch):
    layer = dpmoe.MoELayer(16, 8, 4, seed=0)
    monkeypatch.setattr(memory, "device_memory", lambda queue: (1 << 16, 1 << 14))
    x = normal(np.random.default_rng(0), (600, 16))
    with memory.track_allocations() as sizes, pytest.raises(MemoryError, match="MoELayer"):
        layer(x)
    assert sizes == []


@pytest.mark.parametrize("value", ["1e9", "abc", "-5", "0"])
def test_budget_variable_is_named_when_malformed(monkeypatch, value):
    monkeypatch.setenv("DPMOE_MAX_INTERMEDIATE_BYTES", value)
    with pytest.raises(ValueError, match="DPMOE_MAX_INTERMEDIATE_BYTES"):
        memory.intermediate_budget()
