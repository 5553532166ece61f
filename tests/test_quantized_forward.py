"""Quantized experts (dpmoe.quant) through the fused forward, fused_experts and MoELayer:
the kernels read the quantized bytes; the oracle is the forward on dequantised weights."""

import numpy as np
import pytest
from conftest import BF16, assert_close, needs_device, normal

import dpmoe
from dpmoe import memory, quant, reference

FORMATS = quant.FORMATS
PATHS = ["per_token", "grouped"]
# (E, H, I): N a multiple of 4 or not (word or byte loads), K not a multiple of 128 (partial
# fp8 blocks); mxfp4 needs K (H for gate/up, I for down) a multiple of 32
SHAPES = {"int8": [(4, 64, 96), (3, 72, 38)], "fp8_block": [(4, 160, 200), (3, 72, 38)],
          "mxfp4": [(4, 96, 64), (3, 64, 160)]}


def experts(rng, fmt, shape):
    num_experts, hidden, inter = shape
    w = {k: normal(rng, s, scale=s[1] ** -0.5) for k, s in (
        ("gate", (num_experts, hidden, inter)), ("up", (num_experts, hidden, inter)),
        ("down", (num_experts, inter, hidden)))}
    return {k: quant.quantize(v, fmt) for k, v in w.items()}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_forward_matches_the_forward_on_dequantised_weights(rng, fmt, path):
    for shape in SHAPES[fmt]:
        q = experts(rng, fmt, shape)
        num_experts = shape[0]
        for num_tokens, dtype, skewed in [(1, BF16, False), (7, np.float32, False),
                                          (40, BF16, True)]:
            x = normal(rng, (num_tokens, shape[1]), dtype)
            logits = normal(rng, (num_tokens, num_experts))
            if skewed:  # every token to expert 0 first; the last expert gets nothing
                logits[:, 0] += 100.0
                logits[:, -1] -= 100.0
            weights, ids = reference.topk_softmax(logits, 2, True)
            got = dpmoe.fused_moe_forward(x, q["gate"], q["up"], q["down"], weights, ids, 2,
                                          False, path=path)
            want = reference.fused_moe_forward(x, q["gate"], q["up"], q["down"], weights, ids,
                                               2, False)
            assert_close(got, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_with_quantized_experts_and_a_float_shared_expert(rng, fmt):
    num_experts, hidden, inter = 6, 64, 96
    q = experts(rng, fmt, (num_experts, hidden, inter))
    shared = {k: normal(rng, s, BF16, scale=0.1) for k, s in (
        ("shared_gate_proj", (hidden, 32)), ("shared_up_proj", (hidden, 32)),
        ("shared_down_proj", (32, hidden)))}
    layer = dpmoe.MoELayer.from_numpy(normal(rng, (hidden, num_experts)), q["gate"], q["up"],
                                      q["down"], top_k=2, **shared)
    assert layer.kind == fmt
    x = normal(rng, (9, hidden), BF16)
    for path in PATHS:
        assert_close(layer(x, path=path), layer.reference(x))
    args = layer.arguments()
    assert args["gate"] is q["gate"]
    held = [4, 1]
    shard = dpmoe.MoELayer.from_numpy(**dict(args, gate=q["gate"][held], up=q["up"][held],
                                             down=q["down"][held], held_experts=held))
    assert_close(shard(x, path="per_token"), shard.reference(x))


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_fused_experts_takes_quantized_w13_and_w2(rng, activation):
    """w13 (E, H, 2I) split by columns (halves, or interleaved for swigluoai), w2 (E, I, H)."""
    num_experts, hidden, inter = 4, 64, 32
    w13 = quant.quantize(normal(rng, (num_experts, hidden, 2 * inter), scale=0.1), "mxfp4")
    w2 = quant.quantize(normal(rng, (num_experts, inter, hidden), scale=0.1), "mxfp4")
    b13 = normal(rng, (num_experts, 2 * inter), scale=0.1)
    x = normal(rng, (5, hidden), BF16)
    weights, ids = reference.topk_softmax(normal(rng, (5, num_experts)), 2, True)
    got = dpmoe.fused_experts(x, w13, w2, weights, ids, activation, b13=b13)
    dense = w13.dequantize()
    if activation == "swigluoai":
        gate, up, gb, ub = dense[..., ::2], dense[..., 1::2], b13[:, ::2], b13[:, 1::2]
    else:
        gate, up, gb, ub = dense[..., :inter], dense[..., inter:], b13[:, :inter], b13[:, inter:]
    want = reference.fused_moe_forward(x, gate, up, w2, weights, ids, 2, False,
                                       activation=activation, gate_bias=gb, up_bias=ub)
    assert_close(got, want)
    with pytest.raises(TypeError, match="both be quantized"):
        dpmoe.fused_experts(x, w13, dense, weights, ids)


@needs_device
@pytest.mark.parametrize("gemms", ["onemkl-host", "dpnp.matmul"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_quantized_layer_holds_its_quantized_bytes_on_the_device(rng, fmt, gemms,
                                                                   monkeypatch):
    """At most 1.15x the quantized bytes (with scales) on the device, counted allocation by
    allocation while the layer is built; a call dequantises one group of experts at a time
    (here one expert, the buffer made that small) into one buffer, never all of them, on
    both GEMM backends."""
    from dpmoe._engine import quantized

    if gemms == "dpnp.matmul":
        monkeypatch.setenv("DPMOE_NO_HOST_ONEMKL", "1")

    num_experts, hidden, inter = 8, 512, 384
    q = experts(rng, fmt, (num_experts, hidden, inter))
    quantized_bytes = sum(v.nbytes for v in q.values())
    router = normal(rng, (hidden, num_experts))
    with memory.track_allocations() as built:
        layer = dpmoe.MoELayer.from_numpy(router, q["gate"], q["up"], q["down"], top_k=2)
    assert sum(built) <= 1.15 * quantized_bytes, (sum(built), quantized_bytes)
    monkeypatch.setattr(quantized, "DEQUANT_BUFFER_BYTES", 2 * hidden * inter * 4)
    x = normal(rng, (16, hidden), BF16)
    dpmoe.workspace.clear()
    for path in PATHS:
        with memory.track_allocations() as ran:
            y = layer(x, path=path)
        all_dequantised = 3 * num_experts * hidden * inter * 4
        assert sum(ran) < all_dequantised / 4, (path, sum(ran))
        assert_close(y, layer.reference(x))


def test_mixed_or_mismatched_quantized_experts_are_refused(rng):
    q = experts(rng, "int8", (2, 32, 32))
    f = experts(rng, "fp8_block", (2, 32, 32))
    x = normal(rng, (2, 32))
    weights, ids = reference.topk_softmax(normal(rng, (2, 2)), 1, True)
    call = dpmoe.fused_moe_forward
    with pytest.raises(TypeError, match="up_weights must be quantized like gate_weights"):
        call(x, q["gate"], q["up"].dequantize(), q["down"], weights, ids, 1)
    with pytest.raises(TypeError, match="up_weights is quantized but gate_weights is not"):
        call(x, q["gate"].dequantize(), q["up"], q["down"], weights, ids, 1)
    with pytest.raises(TypeError, match="format"):
        call(x, q["gate"], f["up"], q["down"], weights, ids, 1)
    with pytest.raises(ValueError, match="down_weights must have shape"):
        call(x, q["gate"], q["up"], experts(rng, "int8", (2, 16, 32))["gate"], weights, ids, 1)


def test_models_read_fp8_and_mxfp4_checkpoints_as_stored(rng):
    """DeepSeek-V3's per-expert FP8 tensors (float8 and uint8 bits mixed, an FP8 shared
    expert) and GPT-OSS's MXFP4 blocks/scales give the layer of their dequantised weights."""
    import ml_dtypes

    from dpmoe import models

    num_experts, hidden, inter, shared_inter = 4, 64, 160, 96
    config = {"num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "norm_topk_prob": True,
              "routed_scaling_factor": 2.0}
    fp8 = {}
    dense = {}

    def fp8_matrix(prefix, out_dim, in_dim, bits):
        q = quant.quantize(normal(rng, (in_dim, out_dim), scale=in_dim ** -0.5), "fp8_block")
        codes = np.ascontiguousarray(q.data[0].T)  # the checkpoint's [out, in]
        fp8[f"{prefix}.weight"] = codes if bits else codes.view(ml_dtypes.float8_e4m3fn)
        fp8[f"{prefix}.weight_scale_inv"] = np.ascontiguousarray(q.scales[0].T)
        return q.dequantize()[0].T  # [out, in] float32

    gate_up, down = [], []
    for e in range(num_experts):
        g = fp8_matrix(f"experts.{e}.gate_proj", inter, hidden, e % 2)
        u = fp8_matrix(f"experts.{e}.up_proj", inter, hidden, e % 2)
        down.append(fp8_matrix(f"experts.{e}.down_proj", hidden, inter, e % 2))
        gate_up.append(np.concatenate([g, u]))
    for name, (out_dim, in_dim) in (("gate_proj", (shared_inter, hidden)),
                                    ("up_proj", (shared_inter, hidden)),
                                    ("down_proj", (hidden, shared_inter))):
        dense[f"shared_experts.{name}.weight"] = fp8_matrix(f"shared_experts.{name}", out_dim,
                                                            in_dim, False)
    common = {"gate.weight": normal(rng, (num_experts, hidden)),
              "gate.e_score_correction_bias": normal(rng, (num_experts,), scale=0.1)}
    dense.update(common, **{"experts.gate_up_proj": np.stack(gate_up),
                            "experts.down_proj": np.stack(down)})
    fp8.update(common)
    x = normal(rng, (6, hidden))
    from_fp8 = models.from_state_dict("deepseek_v3", fp8, config)
    assert from_fp8.kind == "fp8_block"
    assert_close(from_fp8(x, path="per_token"),
                 models.from_state_dict("deepseek_v3", dense, config).reference(x))

    # GPT-OSS: gate_up_proj_blocks [E, 2I, H/32, 16] (rows interleaved), down_proj_blocks
    gpt = {"router.weight": normal(rng, (num_experts, hidden)),
           "router.bias": normal(rng, (num_experts,), scale=0.1),
           "experts.gate_up_proj_bias": normal(rng, (num_experts, 2 * inter), scale=0.1),
           "experts.down_proj_bias": normal(rng, (num_experts, hidden), scale=0.1)}
    floats = dict(gpt)
    for name, (out_dim, in_dim) in (("gate_up_proj", (2 * inter, hidden)),
                                    ("down_proj", (hidden, inter))):
        q = quant.quantize(normal(rng, (in_dim, out_dim), scale=in_dim ** -0.5), "mxfp4")
        nibbles = q.data[0].T  # [out, in/2]
        gpt[f"experts.{name}_blocks"] = np.ascontiguousarray(np.broadcast_to(
            nibbles.reshape(out_dim, in_dim // 32, 16), (num_experts, out_dim, in_dim // 32, 16)))
        gpt[f"experts.{name}_scales"] = np.ascontiguousarray(np.broadcast_to(
            q.scales[0].T, (num_experts, out_dim, in_dim // 32)))
        floats[f"experts.{name}"] = np.broadcast_to(q.dequantize()[0],
                                                    (num_experts, in_dim, out_dim)).copy()
    config = {"num_experts_per_tok": 2}
    from_mxfp4 = models.from_state_dict("gpt_oss", gpt, config)
    assert from_mxfp4.kind == "mxfp4"
    assert_close(from_mxfp4(x, path="grouped"),
                 models.from_state_dict("gpt_oss", floats, config).reference(x))
