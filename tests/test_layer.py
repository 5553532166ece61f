import numpy as np
import pytest
from conftest import assert_close, needs_device, normal, to_dpnp

import dpmoe
from dpmoe import reference


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("num_tokens", [1, 29], ids=["decode", "prefill"])
def test_layer_matches_reference(rng, dtype, num_tokens):
    layer = dpmoe.MoELayer(48, 40, 6, top_k=2, dtype=dtype, seed=3)
    w = layer.weights()
    x = normal(rng, (num_tokens, 48), w["gate"].dtype)
    want = reference.moe_layer(x, w["router"], w["gate"], w["up"], w["down"], 2, True)
    assert_close(layer(x), want)


def test_from_numpy_and_route(rng):
    router = normal(rng, (16, 4))
    gate, up = normal(rng, (4, 16, 8)), normal(rng, (4, 16, 8))
    down = normal(rng, (4, 8, 16))
    layer = dpmoe.MoELayer.from_numpy(router, gate, up, down, top_k=2, renormalize=False)
    x = normal(rng, (10, 16))
    weights, ids = layer.route(x)
    want_w, want_ids = reference.topk_softmax(x @ router, 2, False)
    np.testing.assert_array_equal(ids, want_ids)
    assert_close(weights, want_w)
    assert_close(layer(x), reference.moe_layer(x, router, gate, up, down, 2, False))


def test_layer_rejects_wrong_width(rng):
    layer = dpmoe.MoELayer(16, 8, 4, seed=0)
    with pytest.raises(ValueError, match="hidden_states"):
        layer(normal(rng, (3, 15)))


@needs_device
def test_layer_keeps_dpnp_on_device(rng):
    layer = dpmoe.MoELayer(16, 8, 4, seed=0)
    x = normal(rng, (5, 16))
    out = layer(to_dpnp(x))
    assert out.sycl_queue is not None
    assert_close(out.asnumpy(), layer(x))


def block_weights(rng, dtype, hidden=32, inter=24, experts=8, shared=0):
    w = dict(router=normal(rng, (hidden, experts)), gate=normal(rng, (experts, hidden, inter), dtype, hidden**-0.5),
             up=normal(rng, (experts, hidden, inter), dtype, hidden**-0.5),
             down=normal(rng, (experts, inter, hidden), dtype, inter**-0.5))
    if shared:
        w.update(shared_gate_proj=normal(rng, (hidden, shared), dtype, hidden**-0.5),
                 shared_up_proj=normal(rng, (hidden, shared), dtype, hidden**-0.5),
                 shared_down_proj=normal(rng, (shared, hidden), dtype, shared**-0.5))
    return w


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("num_tokens", [1, 30], ids=["decode", "prefill"])
@pytest.mark.parametrize("family", ["qwen2-shared-gated", "deepseek-grouped-shared", "gpt-oss"])
def test_family_style_layers_match_reference(rng, dtype, num_tokens, family):
    from conftest import BF16

    host = BF16 if dtype == "bfloat16" else np.dtype(np.float32)
    if family == "qwen2-shared-gated":
        w = block_weights(rng, host, shared=40)
        w["shared_expert_gate"] = normal(rng, (32, 1))
        layer = dpmoe.MoELayer.from_numpy(w.pop("router"), w.pop("gate"), w.pop("up"), w.pop("down"),
                                          top_k=2, renormalize=False, **w)
    elif family == "deepseek-grouped-shared":
        w = block_weights(rng, host, shared=24)
        layer = dpmoe.MoELayer.from_numpy(
            w.pop("router"), w.pop("gate"), w.pop("up"), w.pop("down"), top_k=3, renormalize=True,
            scoring="sigmoid", num_expert_group=4, topk_group=2,
            correction_bias=normal(rng, (8,), scale=0.1), routed_scaling_factor=2.5, **w)
    else:
        w = block_weights(rng, host)
        layer = dpmoe.MoELayer.from_numpy(
            w.pop("router"), w.pop("gate"), w.pop("up"), w.pop("down"), top_k=2,
            scoring="softmax_after_topk", router_bias=normal(rng, (8,)), activation="swigluoai",
            gate_bias=normal(rng, (8, 24), host), up_bias=normal(rng, (8, 24), host),
            down_bias=normal(rng, (8, 32), host))
    x = normal(rng, (num_tokens, 32), host)
    assert_close(layer(x), layer.reference(x))


def test_random_layer_with_shared_expert(rng):
    for gated in (True, False):
        layer = dpmoe.MoELayer(32, 16, 4, shared_expert_intermediate_size=24,
                               shared_expert_gate=gated, seed=1)
        assert ("shared_expert_gate" in layer.weights()) == gated
        x = normal(rng, (9, 32))
        assert_close(layer(x), layer.reference(x))


@pytest.mark.parametrize("path", ["grouped", "per_token"])
def test_shards_add_up_to_the_whole_layer(rng, path):
    """Layers holding disjoint sets of experts (held_experts, any order) give partial sums
    that add up to the whole layer; each shard matches its own reference; a shard's
    experts() maps global ids the same way."""
    layer = dpmoe.MoELayer(40, 24, 7, top_k=3, dtype="float32", seed=2,
                           shared_expert_intermediate_size=16)
    args = layer.arguments()
    x = normal(rng, (9, 40))
    x[:4] = x[0]  # tokens that share experts: blocks of slots on the per-token path
    shards = []
    for held in ([5, 0, 3], [1, 2, 4, 6]):
        part = {k: args[k][held] for k in ("gate", "up", "down")}
        shards.append(dpmoe.MoELayer.from_numpy(**dict(args, **part, held_experts=held)))
    for shard in shards:
        assert_close(shard(x, path=path), shard.reference(x))
    shared = reference.shared_expert(x, layer.weights())  # each shard adds it once
    total = sum(s(x, path=path) for s in shards) - shared
    assert_close(total, layer.reference(x))
    weights, ids = layer.route(x)
    routed = sum(s.experts(x, weights, ids, path=path) for s in shards)
    assert_close(routed, layer.experts(x, weights, ids, path=path))


def test_arguments_rebuild_the_layer_and_are_read_only(rng):
    layer = dpmoe.MoELayer(24, 16, 4, top_k=2, dtype="bfloat16", seed=1,
                           shared_expert_intermediate_size=8)
    args = layer.arguments()
    assert args["held_experts"] is None and args["top_k"] == 2
    with pytest.raises(ValueError, match="read-only"):
        args["router"][0, 0] = 1.0
    x = normal(rng, (5, 24), dpmoe.arrays.BFLOAT16)
    rebuilt = dpmoe.MoELayer.from_numpy(**args)
    np.testing.assert_array_equal(rebuilt(x).view(np.uint16), layer(x).view(np.uint16))


def test_held_experts_and_options_are_validated(rng):
    router = normal(rng, (8, 5))
    gate, up, down = normal(rng, (2, 8, 4)), normal(rng, (2, 8, 4)), normal(rng, (2, 4, 8))
    make = dpmoe.MoELayer.from_numpy
    with pytest.raises(ValueError, match="held_experts names 3 experts but gate_weights holds 2"):
        make(router, gate, up, down, held_experts=[0, 1, 2])
    with pytest.raises(ValueError, match=r"held_experts must hold ids in \[0, 5\)"):
        make(router, gate, up, down, held_experts=[0, 5])
    with pytest.raises(ValueError, match="twice"):
        make(router, gate, up, down, held_experts=[3, 3])
    with pytest.raises(TypeError, match="1-D sequence of ints"):
        make(router, gate, up, down, held_experts=[0.0, 1.0])
    with pytest.raises(TypeError, match="unknown option.*held_expert\\b"):
        make(router, gate, up, down, held_expert=[0, 1])
    with pytest.raises(ValueError, match="path must be one of"):
        make(router, gate, up, down, held_experts=[0, 1])(normal(rng, (2, 8)), path="fast")
