"""dpmoe.quant against transformers' own dequantisation of GPT-OSS MXFP4 and DeepSeek-V3 FP8
checkpoint tensors (needs the ``compat`` extra: torch and transformers).

What the transformers functions return (transformers 5):

- ``integrations.mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=...)``: blocks
  [E, N, K/32, 16], scales [E, N, K/32] -> [E, K, N], already transposed (GPT-OSS's
  ``gate_up_proj`` [E, H, 2I] and ``down_proj`` [E, I, H], applied as ``x @ W``): dpmoe's
  layout, compared as is.
- ``integrations.finegrained_fp8._dequantize_fp8_weight(weight, weight_scale_inv,
  block_size, dtype)``: weight [..., out, in] -> [..., out, in] (``x @ W^T``), partial tiles
  handled: compared after a transpose. ``Fp8Dequantize._dequantize_one`` (the loader's
  ``dequantize=True`` path) derives the tile size from the scale grid (rows // scale_rows),
  which is 128 only when out and in are multiples of 128, so it is compared on such shapes
  only (out = 200 with 2 tile rows would give tiles of 100 rows there).
"""

import numpy as np
import pytest

from dpmoe import layouts, quant

torch = pytest.importorskip("torch")
mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
finegrained_fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")

convert_moe_packed_tensors = getattr(mxfp4, "convert_moe_packed_tensors", None)
dequantize_fp8_weight = getattr(finegrained_fp8, "_dequantize_fp8_weight", None)
Fp8Dequantize = getattr(finegrained_fp8, "Fp8Dequantize", None)


def same_bits(a, b):
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def mxfp4_checkpoint(rng, num_experts, n, k):
    """Every byte value; exponents over e8m0's whole finite range (0 and 252 included)."""
    blocks = rng.integers(0, 256, (num_experts, n, k // 32, 16), dtype=np.uint8)
    scales = rng.integers(0, 253, (num_experts, n, k // 32), dtype=np.uint8)
    scales.flat[:2] = [0, 252]
    return blocks, scales


def transformers_mxfp4(blocks, scales):
    out = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                     dtype=torch.float32)
    return out.numpy()


@pytest.mark.skipif(convert_moe_packed_tensors is None, reason="transformers has no convert_moe_packed_tensors")
@pytest.mark.parametrize("shape", [(3, 10, 96), (1, 7, 32)], ids=["E3-N10-K96", "E1-N7-K32"])
def test_mxfp4_dequantize_matches_transformers(rng, shape):
    blocks, scales = mxfp4_checkpoint(rng, *shape)
    want = transformers_mxfp4(blocks, scales)
    assert want.shape == (shape[0], shape[2], shape[1])  # [E, K, N]
    same_bits(quant.from_mxfp4_checkpoint(blocks, scales).dequantize(), want)


@pytest.mark.skipif(convert_moe_packed_tensors is None, reason="transformers has no convert_moe_packed_tensors")
def test_mxfp4_gpt_oss_gate_up_split_matches_transformers_layout(rng):
    # gate_up_proj_blocks [E, 2I, H/32, 16] and down_proj_blocks [E, H, I/32, 16]
    num_experts, hidden, inter = 2, 64, 32
    gate_up_blocks, gate_up_scales = mxfp4_checkpoint(rng, num_experts, 2 * inter, hidden)
    down_blocks, down_scales = mxfp4_checkpoint(rng, num_experts, hidden, inter)
    gate_up_proj = transformers_mxfp4(gate_up_blocks, gate_up_scales)    # [E, H, 2I]
    down_proj = transformers_mxfp4(down_blocks, down_scales)             # [E, I, H]
    want_gate, want_up, want_down = layouts.from_gate_up_proj(gate_up_proj, down_proj)
    gate, up = quant.split_interleaved(quant.from_mxfp4_checkpoint(gate_up_blocks, gate_up_scales))
    down = quant.from_mxfp4_checkpoint(down_blocks, down_scales)
    assert gate.shape == up.shape == (num_experts, hidden, inter)
    assert down.shape == (num_experts, inter, hidden)
    same_bits(gate.dequantize(), want_gate)
    same_bits(up.dequantize(), want_up)
    same_bits(down.dequantize(), want_down)


def fp8_checkpoint(rng, num_experts, out, inp):
    bits = rng.integers(0, 256, (num_experts, out, inp), dtype=np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x7E  # NaN -> 448
    scales = np.exp2(rng.uniform(-20, 4, (num_experts, -(-out // 128), -(-inp // 128)))).astype(np.float32)
    return bits, scales


def as_torch_fp8(bits):
    return torch.from_numpy(bits).view(torch.float8_e4m3fn)


@pytest.mark.skipif(dequantize_fp8_weight is None, reason="transformers has no _dequantize_fp8_weight")
@pytest.mark.parametrize("out,inp", [(200, 72), (256, 384), (130, 300), (64, 256)])
def test_fp8_dequantize_matches_transformers(rng, out, inp):
    bits, scales = fp8_checkpoint(rng, 2, out, inp)
    want = dequantize_fp8_weight(as_torch_fp8(bits), torch.from_numpy(scales), [128, 128],
                                 torch.float32).numpy()
    assert want.shape == (2, out, inp)  # the checkpoint's [E, out, in]
    same_bits(quant.from_fp8_checkpoint(bits, scales).dequantize(),
              np.ascontiguousarray(want.transpose(0, 2, 1)))


@pytest.mark.skipif(Fp8Dequantize is None, reason="transformers has no Fp8Dequantize")
@pytest.mark.parametrize("out,inp", [(256, 384), (128, 128)])
def test_fp8_dequantize_matches_transformers_loader_on_whole_tiles(rng, out, inp):
    bits, scales = fp8_checkpoint(rng, 3, out, inp)
    want = Fp8Dequantize(None)._dequantize_one(as_torch_fp8(bits), torch.from_numpy(scales),
                                               output_dtype=torch.float32).numpy()
    same_bits(quant.from_fp8_checkpoint(bits, scales).dequantize(),
              np.ascontiguousarray(want.transpose(0, 2, 1)))


def test_a_torch_tensor_is_told_how_to_convert():
    with pytest.raises(TypeError, match=r"weight is a torch.Tensor.*numpy\(\)"):
        quant.from_fp8_checkpoint(torch.zeros(4, 4, dtype=torch.uint8), np.ones((1, 1), np.float32))
