"""vLLM/SGLang-compatible pieces: fused_experts, activations and biases in the fused
forward, expert parallelism (expert_map), and layout conversions."""

import numpy as np
import pytest
from conftest import BF16, ON_DEVICE, assert_close, normal, routing, to_dpnp

import dpmoe
from dpmoe import layouts, reference

T, H, I, E, K = 13, 40, 24, 6, 2


def vllm_problem(rng, dtype=np.float32, bias=False):
    x = normal(rng, (T, H), dtype)
    w13 = normal(rng, (E, 2 * I, H), dtype, H**-0.5)
    w2 = normal(rng, (E, H, I), dtype, I**-0.5)
    b13 = normal(rng, (E, 2 * I), dtype, 0.5) if bias else None
    b2 = normal(rng, (E, H), dtype, 0.5) if bias else None
    weights, ids = routing(rng, T, E, K)
    return x, w13, w2, weights, ids, b13, b2


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "swigluoai"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_experts_matches_the_vllm_reference(rng, dtype, activation, bias):
    x, w13, w2, weights, ids, b13, b2 = vllm_problem(rng, dtype, bias)
    got = dpmoe.fused_experts(x, w13, w2, weights, ids, activation, b13, b2, 1.5)
    want = reference.fused_experts(x, w13, w2, weights, ids, activation, b13, b2, 1.5)
    assert_close(got, want)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-token"])
@pytest.mark.parametrize("activation", ["gelu_tanh", "swigluoai"])
def test_fused_moe_forward_activation_biases_and_scale(rng, grouped, activation):
    x = normal(rng, (T, H))
    gate, up = normal(rng, (E, H, I), scale=H**-0.5), normal(rng, (E, H, I), scale=H**-0.5)
    down = normal(rng, (E, I, H), scale=I**-0.5)
    biases = dict(gate_bias=normal(rng, (E, I)), up_bias=normal(rng, (E, I)),
                  down_bias=normal(rng, (E, H)))
    weights, ids = routing(rng, T, E, K)
    kwargs = dict(activation=activation, routed_scaling_factor=2.0, **biases)
    got = dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, K, True,
                                  use_grouped_topk=grouped, **kwargs)
    want = reference.fused_moe_forward(x, gate, up, down, weights, ids, K, True, **kwargs)
    assert_close(got, want)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-token"])
def test_expert_map_drops_non_local_experts(rng, grouped):
    global_experts = 10
    x = normal(rng, (T, H))
    gate, up = normal(rng, (E, H, I), scale=H**-0.5), normal(rng, (E, H, I), scale=H**-0.5)
    down = normal(rng, (E, I, H), scale=I**-0.5)
    weights, ids = routing(rng, T, global_experts, 3)
    expert_map = np.full(global_experts, -1, np.int32)
    expert_map[[1, 3, 4, 6, 8, 9]] = np.arange(E)  # 6 of the 10 experts live here
    got = dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, 3, False,
                                  use_grouped_topk=grouped, expert_map=expert_map)
    want = reference.fused_moe_forward(x, gate, up, down, weights, ids, 3, False,
                                       expert_map=expert_map)
    assert_close(got, want)
    nothing_here = np.full(global_experts, -1, np.int32)
    empty = dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, 3, False,
                                    use_grouped_topk=grouped, expert_map=nothing_here)
    np.testing.assert_array_equal(empty, np.zeros_like(x))
    if ON_DEVICE:  # expert parallelism keeps its routing on the device
        on_device = dpmoe.fused_moe_forward(
            *[to_dpnp(a) for a in (x, gate, up, down, weights, ids)], 3, False,
            use_grouped_topk=grouped, expert_map=to_dpnp(expert_map))
        assert_close(on_device.asnumpy(), want)


def test_align_with_expert_map(rng):
    _, ids = routing(rng, 17, 8, 2)
    expert_map = np.array([0, -1, 1, -1, 2, 3, -1, 4], np.int32)
    got = dpmoe.moe_align_block_size(ids, 5, 4, expert_map=expert_map)
    want = reference.moe_align_block_size(expert_map[ids], 5, 4)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    sorted_ids = got[0]
    kept = sorted_ids[sorted_ids != ids.size]
    assert set(kept.tolist()) == set(np.flatnonzero(expert_map[ids.reshape(-1)] >= 0).tolist())


@pytest.mark.parametrize("interleaved", [False, True])
def test_layout_conversions_round_trip(rng, interleaved):
    _, w13, w2, *_ = vllm_problem(rng)
    gate, up, down = layouts.from_w13(w13, w2, interleaved)
    assert gate.shape == (E, H, I) and down.shape == (E, I, H)
    back = layouts.to_w13(gate, up, down, interleaved)
    np.testing.assert_array_equal(back[0], w13)
    np.testing.assert_array_equal(back[1], w2)
    x = normal(rng, (1, H))
    half = I
    rows = (slice(0, None, 2), slice(1, None, 2)) if interleaved else (slice(0, half), slice(half, None))
    assert_close(x @ gate[2], x @ w13[2][rows[0]].T)
    assert_close(x @ up[2], x @ w13[2][rows[1]].T)


def test_gate_up_proj_conversion(rng):
    gate_up = normal(rng, (E, H, 2 * I))
    down = normal(rng, (E, I, H))
    gate, up, down2 = layouts.from_gate_up_proj(gate_up, down)
    np.testing.assert_array_equal(gate, gate_up[..., ::2])
    np.testing.assert_array_equal(up, gate_up[..., 1::2])
    np.testing.assert_array_equal(down2, down)


@pytest.mark.parametrize("kwargs, error, names", [
    (dict(activation="relu"), ValueError, "activation"),
    (dict(gate_bias=np.zeros((E, I), np.float32)), ValueError, "together"),
    (dict(gate_bias=np.zeros((E, I + 1), np.float32), up_bias=np.zeros((E, I), np.float32)),
     ValueError, "gate_bias"),
    (dict(down_bias=np.zeros((E, I), np.float32)), ValueError, "down_bias"),
    (dict(routed_scaling_factor=float("inf")), ValueError, "routed_scaling_factor"),
    (dict(expert_map=np.array([0, 1, 2], np.int32)), ValueError, "topk_indices"),
    (dict(expert_map=np.array([0, 1, 2, 3, 4, 9], np.int32)), ValueError, "expert_map"),
    (dict(expert_map=np.array([-2, 1, 2, 3, 4, 5], np.int32)), ValueError, "expert_map"),
    (dict(expert_map=np.zeros(6, np.float32)), TypeError, "expert_map"),
])
def test_extra_arguments_rejected(rng, kwargs, error, names):
    x = normal(rng, (T, H))
    gate, up, down = normal(rng, (E, H, I)), normal(rng, (E, H, I)), normal(rng, (E, I, H))
    weights, ids = routing(rng, T, E, K)
    ids[0, 0] = 5
    with pytest.raises(error, match=names):
        dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, K, **kwargs)
