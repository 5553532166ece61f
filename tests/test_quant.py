"""Quantized expert weights (dpmoe.quant): formats, round trips, checkpoint layouts, bad input.

No SYCL device is needed: the module is host-side NumPy. Expected values are computed
independently of dpmoe.quant's lookup tables (ml_dtypes conversions, explicit loops over
tiles and blocks, or numbers worked out by hand).
"""

import dataclasses

import ml_dtypes
import numpy as np
import pytest
from conftest import BF16, normal

from dpmoe import quant
from dpmoe.quant import QuantizedExperts

F8 = np.dtype(ml_dtypes.float8_e4m3fn)
F4 = np.dtype(ml_dtypes.float4_e2m1fn)


def fp8_values(bits):
    """float8_e4m3fn bits -> float32 through ml_dtypes (not through quant's table)."""
    return np.asarray(bits, np.uint8).view(F8).astype(np.float32)


def fp4_values(nibbles):
    """e2m1 codes 0..15 -> float32 through ml_dtypes."""
    return np.asarray(nibbles, np.uint8).view(F4).astype(np.float32)


def tile_scales(scales, k, n, block):
    """Per-value multipliers [E, k, n] from per-tile scales, by explicit loops over tiles."""
    out = np.empty((scales.shape[0], k, n), np.float32)
    for i in range(scales.shape[1]):
        for j in range(scales.shape[2]):
            out[:, i * block:(i + 1) * block, j * block:(j + 1) * block] = scales[:, i, j, None, None]
    return out


def same_bits(a, b):
    """Equal as float32 bit patterns (so -0.0 and 0.0 differ)."""
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


# --- the formats' code tables -------------------------------------------------------------

def test_e4m3_table_matches_ml_dtypes_for_every_finite_byte():
    codes = np.arange(256, dtype=np.uint8)
    finite = (codes & 0x7F) != 0x7F
    same_bits(quant.E4M3_VALUES[finite], fp8_values(codes[finite]))
    assert np.isnan(quant.E4M3_VALUES[~finite]).all()


def test_e2m1_table_matches_ml_dtypes():
    same_bits(quant.FP4_VALUES, fp4_values(np.arange(16)))


# --- round trips within each format's resolution ------------------------------------------

def column_scales_and_error(w, q):
    w32 = w.astype(np.float32)
    return q.scales[:, None, :], np.abs(q.dequantize() - w32), np.abs(w32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["f32", "f16", "bf16"])
def test_int8_round_trip_within_half_a_step(rng, dtype):
    w = normal(rng, (3, 200, 72), dtype, scale=0.05)
    w[1, :, 5] = 0  # a column of zeros gets scale 1.0, never 0
    q = quant.quantize(w, "int8")
    assert q.data.dtype == np.int8 and q.scales.dtype == np.float32 and q.shape == (3, 200, 72)
    amax = np.abs(w.astype(np.float32)).max(axis=1)
    np.testing.assert_array_equal(q.scales, np.where(amax > 0, amax / np.float32(127), 1))
    assert q.data.min() >= -127 and q.data.max() <= 127
    scale, err, magnitude = column_scales_and_error(w, q)
    # half a step, plus float32 rounding of w / scale and of data * scale
    assert (err <= scale * (0.5 + 2.0**-16) + magnitude * 2.0**-23).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 200, 72), (1, 300, 260), (1, 128, 128)],
                         ids=["partial-K-and-N", "partial-both-ends", "one-whole-tile"])
def test_fp8_block_round_trip_within_the_e4m3_grid(rng, dtype, shape):
    w = normal(rng, shape, dtype)
    w[:, :128, :128] *= 1e-4  # tiles of very different magnitude keep their own scales
    q = quant.quantize(w, "fp8_block")
    e, k, n = shape
    w32 = w.astype(np.float32)
    want = np.empty(q.scales.shape, np.float32)
    for i in range(want.shape[1]):
        for j in range(want.shape[2]):
            tile = np.abs(w32[:, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128])
            want[:, i, j] = tile.max(axis=(1, 2)) / np.float32(448)
    np.testing.assert_array_equal(q.scales, want)
    scale = tile_scales(q.scales, k, n, 128)
    err = np.abs(q.dequantize() - w32)
    # relative half-ulp of e4m3 (3 mantissa bits), or half the smallest subnormal step 2^-9
    assert (err <= 2.0**-4 * np.abs(w32) + 2.0**-10 * scale + 2.0**-22 * np.abs(w32)).all()


def e2m1_half_step(v):
    """Half the e2m1 grid spacing around |v| <= 6 (0.5 below 2, 1 below 4, 2 up to 6)."""
    return np.where(v <= 2, 0.25, np.where(v <= 4, 0.5, 1.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["f32", "f16", "bf16"])
def test_mxfp4_round_trip_within_half_a_step_of_the_e2m1_grid(rng, dtype):
    w = normal(rng, (2, 96, 40), dtype)
    w[0, 32:64, 3] = 0  # an all-zero block: exponent 127, scale 1
    q = quant.quantize(w, "mxfp4")
    assert q.data.shape == (2, 48, 40) and q.scales.shape == (2, 3, 40)
    w32 = w.astype(np.float32)
    amax = np.abs(w32).reshape(2, 3, 32, 40).max(axis=2)
    exponent = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1).astype(np.float64))) - 2, 0)
    np.testing.assert_array_equal(q.scales, (exponent + 127).astype(np.uint8))
    assert q.scales[0, 1, 3] == 127
    scale = np.repeat(np.exp2(exponent), 32, axis=1)
    v = np.abs(w32) / scale
    bound = np.where(v > 6, v - 6, e2m1_half_step(v)) * scale  # beyond 6: saturation
    assert (np.abs(q.dequantize() - w32) <= bound * (1 + 2.0**-20)).all()


def test_two_dimensional_weights_are_one_expert(rng):
    w = normal(rng, (64, 8))
    for fmt in quant.FORMATS:
        q = quant.quantize(w, fmt)
        assert q.shape == (1, 64, 8)
        same_bits(q.dequantize()[0], quant.quantize(w[None], fmt).dequantize()[0])


# --- exact values on hand-made examples ---------------------------------------------------

def test_int8_exact_codes_ties_to_even():
    # column 0: amax 127 -> scale 1; column 1: zeros -> scale 1; column 2: amax 63.5 -> 0.5
    w = np.array([[127.0, 0.0, 63.5],
                  [2.5, 0.0, 1.25],
                  [-3.5, 0.0, -0.75],
                  [0.5, 0.0, -63.5]], np.float32)
    q = quant.quantize(w, "int8")
    np.testing.assert_array_equal(q.scales, [[1.0, 1.0, 0.5]])
    np.testing.assert_array_equal(q.data[0], [[127, 0, 127], [2, 0, 2], [-4, 0, -2], [0, 0, -127]])
    same_bits(q.dequantize()[0], np.array([[127, 0, 63.5], [2, 0, 1], [-4, 0, -1], [0, 0, -63.5]],
                                          np.float32))


def test_fp8_exact_bytes_subnormals_negative_zero_and_ties():
    values = [448.0, 2.0**-9, 3 * 2.0**-9, 7 * 2.0**-9, 2.0**-6, -0.0, 2.0**-10, 1.0, -2.5,
              1.0625, 1.1875]
    # 2^-9: smallest subnormal; 7 * 2^-9 the largest; 2^-6 the smallest normal; 2^-10 ties
    # to 0; 1.0625 ties to 1.0 (even mantissa), 1.1875 to 1.25
    want = [0x7E, 0x01, 0x03, 0x07, 0x08, 0x80, 0x00, 0x38, 0xC2, 0x38, 0x3A]
    w = np.zeros((1, 1, 16), np.float32)
    w[0, 0, :len(values)] = values
    q = quant.quantize(w, "fp8_block")
    np.testing.assert_array_equal(q.scales, [[[1.0]]])  # amax 448
    np.testing.assert_array_equal(q.data[0, 0, :len(values)], want)
    same_bits(q.dequantize()[0, 0, :len(values)],
              np.array([448, 2.0**-9, 3 * 2.0**-9, 7 * 2.0**-9, 2.0**-6, -0.0, 0, 1, -2.5, 1, 1.25],
                       np.float32))


def test_fp8_partial_tiles_get_their_own_scales():
    # K = 200 (tiles of 128 and 72), N = 72 (one partial tile): 2 x 1 tiles
    w = np.zeros((1, 200, 72), np.float32)
    w[0, 5, 7] = 896.0     # tile (0, 0): amax 896 -> scale 2
    w[0, 6, 7] = -3.0      # 1.5 * scale
    w[0, 199, 71] = 112.0  # tile (1, 0): amax 112 -> scale 0.25
    w[0, 130, 0] = 0.0390625  # 0.15625 * 0.25 = 5 * 2^-5 * 0.25: exact in e4m3
    q = quant.quantize(w, "fp8_block")
    np.testing.assert_array_equal(q.scales, [[[2.0], [0.25]]])
    same_bits(q.dequantize(), w)


def test_fp8_tile_of_zeros_gets_scale_one():
    w = np.zeros((1, 130, 3), np.float32)
    w[0, 129, 0] = 1.0
    q = quant.quantize(w, "fp8_block")
    np.testing.assert_array_equal(q.scales, np.array([[[1.0], [1.0 / 448]]], np.float32))


def test_mxfp4_exact_nibbles_sign_bit_and_saturation():
    w = np.zeros((1, 64, 3), np.float32)
    # column 0, block 0: amax 6 -> exponent floor(log2 6) - 2 = 0 (byte 127)
    w[0, :6, 0] = [6.0, -6.0, 0.25, 0.75, -0.0, 5.0]   # 0.25 ties to 0, 0.75 to 1, 5 to 4
    # column 0, block 1: amax 7.5 -> exponent 0: 7.5 saturates to 6, -7 to -6
    w[0, 32:34, 0] = [7.5, -7.0]
    # column 1, block 0: amax 3 -> exponent -1 (byte 126): 3 / 0.5 = 6
    w[0, 0:2, 1] = [3.0, -0.25]
    # column 2: zeros -> byte 127
    q = quant.quantize(w, "mxfp4")
    np.testing.assert_array_equal(q.scales[0], [[127, 126, 127], [127, 127, 127]])
    # codes: 6 -> 7, -6 -> 15 (bit 3 is the sign), 0.25 -> 0, 0.75 -> 2, -0 -> 8, 5 -> 6
    np.testing.assert_array_equal(q.data[0, :3, 0], [7 | 15 << 4, 0 | 2 << 4, 8 | 6 << 4])
    np.testing.assert_array_equal(q.data[0, 16, 0], 7 | 15 << 4)
    np.testing.assert_array_equal(q.data[0, 0, 1], 7 | 9 << 4)   # 6, -0.5
    want = np.zeros_like(w)
    want[0, :6, 0] = [6, -6, 0, 1, -0.0, 4]
    want[0, 32:34, 0] = [6, -6]
    want[0, 0:2, 1] = [3, -0.25]
    same_bits(q.dequantize(), want)


def test_mxfp4_exponent_is_clamped_to_e8m0():
    w = np.zeros((1, 32, 2), np.float32)
    w[0, 0, 0] = 2.0**-140  # floor(log2) - 2 = -142 -> clamped to -127 (byte 0)
    w[0, 0, 1] = 2.0**-125  # -127 exactly: 2^-125 / 2^-127 = 4
    q = quant.quantize(w, "mxfp4")
    np.testing.assert_array_equal(q.scales[0, 0], [0, 0])
    same_bits(q.dequantize()[0, :1], np.array([[0.0, 2.0**-125]], np.float32))


def test_mxfp4_dequantize_from_hand_made_bytes():
    data = np.zeros((1, 16, 1), np.uint8)
    data[0, 0, 0] = 0x9A   # low nibble 0xA (k = 0): -1.0; high nibble 0x9 (k = 1): -0.5
    data[0, 15, 0] = 0x7F  # k = 30: 0xF = -6; k = 31: 0x7 = 6
    q = QuantizedExperts("mxfp4", data, np.full((1, 1, 1), 130, np.uint8), (1, 32, 1))
    want = np.zeros((1, 32, 1), np.float32)
    want[0, [0, 1, 30, 31], 0] = [-8.0, -4.0, -48.0, 48.0]  # times 2^(130 - 127)
    same_bits(q.dequantize(), want)
    same_bits(quant.dequantize(q), want)


# --- checkpoint constructors ----------------------------------------------------------------

def fp8_checkpoint(rng, num_experts, out, inp):
    bits = rng.integers(0, 256, (num_experts, out, inp), dtype=np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x38  # NaN -> 1.0
    scales = (rng.random((num_experts, -(-out // 128), -(-inp // 128)), dtype=np.float32)
              + np.float32(0.01))
    return bits, scales


@pytest.mark.parametrize("out,inp", [(200, 72), (256, 384), (72, 300)])
def test_from_fp8_checkpoint_transposes_into_dpmoe_layout(rng, out, inp):
    bits, scales = fp8_checkpoint(rng, 2, out, inp)
    q = quant.from_fp8_checkpoint(bits, scales)
    assert q.format == "fp8_block" and q.shape == (2, inp, out)
    np.testing.assert_array_equal(q.data, bits.transpose(0, 2, 1))
    np.testing.assert_array_equal(q.scales, scales.transpose(0, 2, 1))
    # [out, in] with its [ceil(out/128), ceil(in/128)] tiles, then transposed to [in, out]
    want = fp8_values(bits) * tile_scales(scales, out, inp, 128)
    same_bits(q.dequantize(), np.ascontiguousarray(want.transpose(0, 2, 1)))


def test_from_fp8_checkpoint_takes_ml_dtypes_float8_and_one_matrix(rng):
    bits, scales = fp8_checkpoint(rng, 1, 130, 40)
    whole = quant.from_fp8_checkpoint(bits, scales).dequantize()
    same_bits(quant.from_fp8_checkpoint(bits.view(F8), scales).dequantize(), whole)
    one = quant.from_fp8_checkpoint(bits[0], scales[0])
    assert one.shape == (1, 40, 130)
    same_bits(one.dequantize(), whole)


def mxfp4_checkpoint(rng, num_experts, n, k):
    blocks = rng.integers(0, 256, (num_experts, n, k // 32, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (num_experts, n, k // 32), dtype=np.uint8)
    return blocks, scales


def test_from_mxfp4_checkpoint_keeps_the_bytes_and_their_nibble_order(rng):
    blocks, scales = mxfp4_checkpoint(rng, 2, 6, 96)
    q = quant.from_mxfp4_checkpoint(blocks, scales)
    assert q.format == "mxfp4" and q.shape == (2, 96, 6)
    for j in (0, 15, 16, 47):  # byte j along K/2 is byte j % 16 of block j // 16
        np.testing.assert_array_equal(q.data[:, j, :], blocks[:, :, j // 16, j % 16])
    np.testing.assert_array_equal(q.scales, scales.transpose(0, 2, 1))
    # w[e, n, 32g + 2b + t] = e2m1(nibble t of blocks[e, n, g, b]) * 2^(scales[e, n, g] - 127)
    nibbles = np.stack((blocks & 0xF, blocks >> 4), axis=-1)       # [E, N, G, 16, 2]
    values = fp4_values(nibbles).reshape(2, 6, 3, 32) * np.exp2(scales.astype(np.float32) - 127)[..., None]
    same_bits(q.dequantize(), np.ascontiguousarray(values.reshape(2, 6, 96).transpose(0, 2, 1)))


def test_from_mxfp4_checkpoint_takes_one_matrix(rng):
    blocks, scales = mxfp4_checkpoint(rng, 1, 5, 64)
    one = quant.from_mxfp4_checkpoint(blocks[0], scales[0])
    assert one.shape == (1, 64, 5)
    same_bits(one.dequantize(), quant.from_mxfp4_checkpoint(blocks, scales).dequantize())


@pytest.mark.parametrize("scale_shape", ["[E, out]", "[E, out, 1]"])
def test_from_int8_checkpoint(rng, scale_shape):
    weight = rng.integers(-128, 128, (2, 5, 7), dtype=np.int8)
    scale = rng.random((2, 5), dtype=np.float32) + np.float32(0.01)
    q = quant.from_int8_checkpoint(weight, scale if scale_shape == "[E, out]" else scale[..., None])
    assert q.shape == (2, 7, 5)
    want = weight.astype(np.float32) * scale[..., None]
    same_bits(q.dequantize(), np.ascontiguousarray(want.transpose(0, 2, 1)))
    same_bits(quant.from_int8_checkpoint(weight[1], scale[1]).dequantize(), q.dequantize()[1:])


# --- the container ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_subsets_of_experts(rng, fmt):
    q = quant.quantize(normal(rng, (5, 64, 6)), fmt)
    whole = q.dequantize()
    for experts, ids in ((slice(1, 4), [1, 2, 3]), ([4, 0], [4, 0]), (np.array([2]), [2]),
                         (3, [3]), (-1, [4])):
        part = q[experts]
        assert part.format == fmt and part.shape == (len(ids), 64, 6)
        same_bits(part.dequantize(), whole[ids])
    with pytest.raises(ValueError, match="experts"):
        q[2:2]
    with pytest.raises(IndexError):
        q[[5]]


def test_container_is_frozen_and_owns_read_only_copies(rng):
    data = rng.integers(-127, 128, (1, 4, 3), dtype=np.int8)
    scales = np.ones((1, 3), np.float32)
    q = QuantizedExperts("int8", data, scales, (1, 4, 3))
    before = q.dequantize()
    data[:] = 0
    scales[:] = 2
    same_bits(q.dequantize(), before)
    assert not q.data.flags.writeable and not q.scales.flags.writeable
    assert q.data.flags.c_contiguous and q.scales.flags.c_contiguous
    with pytest.raises(ValueError):
        q.data[0, 0, 0] = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.scales = scales


def test_nbytes_and_a_short_repr(rng):
    q = quant.quantize(normal(rng, (2, 64, 10)), "mxfp4")
    assert q.nbytes == 2 * 32 * 10 + 2 * 2 * 10
    assert repr(q) == "QuantizedExperts(format='mxfp4', shape=(2, 64, 10), nbytes=680)"


# --- splitting fused gate/up --------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["int8", "mxfp4"])
def test_split_interleaved_takes_even_and_odd_columns(rng, fmt):
    q = quant.quantize(normal(rng, (2, 64, 10)), fmt)
    gate, up = quant.split_interleaved(q)
    assert gate.shape == up.shape == (2, 64, 5) and gate.format == fmt
    same_bits(gate.dequantize(), np.ascontiguousarray(q.dequantize()[..., 0::2]))
    same_bits(up.dequantize(), np.ascontiguousarray(q.dequantize()[..., 1::2]))


@pytest.mark.parametrize("fmt,n", [("int8", 10), ("mxfp4", 10), ("fp8_block", 512)])
def test_split_halves_takes_the_first_and_last_columns(rng, fmt, n):
    q = quant.quantize(normal(rng, (2, 64, n)), fmt)
    gate, up = quant.split_halves(q)
    assert gate.shape == up.shape == (2, 64, n // 2) and up.format == fmt
    same_bits(gate.dequantize(), np.ascontiguousarray(q.dequantize()[..., :n // 2]))
    same_bits(up.dequantize(), np.ascontiguousarray(q.dequantize()[..., n // 2:]))


# --- bad input: an error naming the argument, inputs unchanged ------------------------------

def valid(fmt):
    """(data, scales, shape) of a valid container of fmt, [E, K, N] = [2, 64, 3]."""
    if fmt == "int8":
        return np.ones((2, 64, 3), np.int8), np.ones((2, 3), np.float32), (2, 64, 3)
    if fmt == "fp8_block":
        return np.full((2, 64, 3), 0x38, np.uint8), np.ones((2, 1, 1), np.float32), (2, 64, 3)
    return np.full((2, 32, 3), 0x22, np.uint8), np.full((2, 2, 3), 127, np.uint8), (2, 64, 3)


def container(fmt, data=None, scales=None, shape=None, format=None):
    d, s, sh = valid(fmt)
    pick = (lambda given, default: default if given is None else given)
    return lambda: QuantizedExperts(pick(format, fmt), pick(data, d), pick(scales, s), pick(shape, sh))


def with_value(a, index, value):
    a = a.copy()
    a[index] = value
    return a


def u8(*shape):
    return np.zeros(shape, np.uint8)


def f32(*shape):
    return np.ones(shape, np.float32)


from_fp8, from_mxfp4, from_int8 = (quant.from_fp8_checkpoint, quant.from_mxfp4_checkpoint,
                                   quant.from_int8_checkpoint)
INT8, FP8, MX = valid("int8"), valid("fp8_block"), valid("mxfp4")
W = f32(2, 64, 3)

BAD = [
    # (case, call, exception, words the message must contain)
    ("format-unknown", container("int8", format="int4"), ValueError, ["format", "int4"]),
    ("format-not-str", container("int8", format=8), ValueError, ["format", "got 8"]),
    ("shape-rank", container("int8", shape=(64, 3)), ValueError, ["shape"]),
    ("shape-zero", container("int8", shape=(0, 64, 3)), ValueError, ["shape[0]"]),
    ("shape-float", container("int8", shape=(2, 64.0, 3)), TypeError, ["shape[1]"]),
    ("data-not-array", container("int8", data=[[[1]]]), TypeError, ["data"]),
    ("data-dtype", container("int8", data=INT8[0].view(np.uint8)), TypeError, ["data", "int8", "uint8"]),
    ("data-shape", container("int8", data=INT8[0][:, :63]), ValueError, ["data", "(2, 64, 3)", "(2, 63, 3)"]),
    ("data-rank", container("int8", data=INT8[0][0]), ValueError, ["data", "3-D"]),
    ("data-fp8-as-float8", container("fp8_block", data=FP8[0].view(F8)), TypeError, ["data", "uint8"]),
    ("data-fp8-nan-7f", container("fp8_block", data=with_value(FP8[0], (1, 5, 2), 0x7F)),
     ValueError, ["data", "NaN", "0x7f", "(1, 5, 2)"]),
    ("data-fp8-nan-ff", container("fp8_block", data=with_value(FP8[0], (0, 0, 0), 0xFF)),
     ValueError, ["data", "NaN", "0xff"]),
    ("data-mxfp4-unpacked", container("mxfp4", data=np.zeros((2, 64, 3), np.uint8)), ValueError,
     ["data", "[E, K//2, N]"]),
    ("scales-int8-dtype", container("int8", scales=INT8[1].astype(np.float64)), TypeError,
     ["scales", "float32", "float64"]),
    ("scales-int8-shape", container("int8", scales=INT8[1][:, :2]), ValueError, ["scales", "[E, N]"]),
    ("scales-int8-zero", container("int8", scales=with_value(INT8[1], (1, 2), 0)), ValueError,
     ["scales", "> 0", "(1, 2)"]),
    ("scales-int8-negative", container("int8", scales=with_value(INT8[1], (0, 0), -1)), ValueError,
     ["scales", "> 0"]),
    ("scales-int8-nan", container("int8", scales=with_value(INT8[1], (0, 1), np.nan)), ValueError,
     ["scales", "finite"]),
    ("scales-int8-overflow", container("int8", scales=with_value(INT8[1], (0, 1), 1e37)), ValueError,
     ["scales", "float32"]),
    ("scales-fp8-inf", container("fp8_block", scales=with_value(FP8[1], (0, 0, 0), np.inf)), ValueError,
     ["scales", "finite"]),
    ("scales-fp8-shape-not-ceil", container("fp8_block", shape=(2, 64, 3), scales=np.ones((2, 2, 1), np.float32)),
     ValueError, ["scales", "ceil(K/128)"]),
    ("scales-mxfp4-dtype", container("mxfp4", scales=MX[1].astype(np.float32)), TypeError,
     ["scales", "uint8", "e8m0"]),
    ("scales-mxfp4-shape", container("mxfp4", scales=MX[1][:, :1]), ValueError, ["scales", "[E, K//32, N]"]),
    ("scales-e8m0-nan", container("mxfp4", scales=with_value(MX[1], (1, 1, 0), 255)), ValueError,
     ["scales", "255", "NaN", "(1, 1, 0)"]),
    ("scales-e8m0-overflow", container("mxfp4", scales=with_value(MX[1], (0, 0, 0), 253)), ValueError,
     ["scales", "253", "overflows"]),
    ("shape-mxfp4-K", container("mxfp4", shape=(2, 48, 3), data=np.zeros((2, 24, 3), np.uint8)),
     ValueError, ["shape", "K", "32", "48"]),
    ("quantize-format", lambda: quant.quantize(W, "fp4"), ValueError, ["format", "fp4"]),
    ("quantize-w-nan", lambda: quant.quantize(with_value(W, (0, 1, 2), np.nan), "int8"),
     ValueError, ["w", "finite"]),
    ("quantize-w-inf-bf16",
     lambda: quant.quantize(with_value(W, (1, 1, 1), np.inf).astype(BF16), "fp8_block"),
     ValueError, ["w", "finite"]),
    ("quantize-w-dtype", lambda: quant.quantize(W.astype(np.float64), "int8"), TypeError,
     ["w", "float64"]),
    ("quantize-w-int", lambda: quant.quantize(W.astype(np.int8), "int8"), TypeError, ["w"]),
    ("quantize-w-rank", lambda: quant.quantize(W[0, 0], "int8"), ValueError, ["w", "2-D or 3-D"]),
    ("quantize-w-empty", lambda: quant.quantize(W[:, :0], "int8"), ValueError, ["w", "non-zero"]),
    ("quantize-mxfp4-K", lambda: quant.quantize(W[:, :40], "mxfp4"), ValueError,
     ["w", "K", "32", "40"]),
    ("quantize-w-list", lambda: quant.quantize([[1.0]], "int8"), TypeError, ["w"]),
    ("fp8-weight-dtype", lambda: from_fp8(f32(4, 4), f32(1, 1)), TypeError,
     ["weight", "float8_e4m3fn", "uint8", "float32"]),
    ("fp8-weight-rank", lambda: from_fp8(u8(4), f32(1)), ValueError, ["weight", "2-D or 3-D"]),
    ("fp8-weight-nan", lambda: from_fp8(with_value(u8(2, 4, 4), (1, 3, 0), 0x7F), f32(2, 1, 1)),
     ValueError, ["weight", "NaN", "(1, 3, 0)"]),
    ("fp8-scale-shape", lambda: from_fp8(u8(2, 200, 72), f32(2, 1, 1)), ValueError,
     ["weight_scale_inv", "ceil(out/128)", "(2, 2, 1)", "(2, 1, 1)"]),
    ("fp8-scale-rank", lambda: from_fp8(u8(2, 4, 4), f32(1, 1)), ValueError,
     ["weight_scale_inv", "3-D"]),
    ("fp8-scale-dtype", lambda: from_fp8(u8(4, 4), f32(1, 1).astype(BF16)), TypeError,
     ["weight_scale_inv", "float32", "bfloat16"]),
    ("fp8-scale-nan", lambda: from_fp8(u8(4, 4), f32(1, 1) * np.nan), ValueError,
     ["weight_scale_inv", "finite"]),
    ("fp8-scale-zero", lambda: from_fp8(u8(4, 4), f32(1, 1) * 0), ValueError,
     ["weight_scale_inv", "> 0"]),
    ("mxfp4-blocks-not-16", lambda: from_mxfp4(u8(2, 3, 2, 8), u8(2, 3, 2)), ValueError,
     ["blocks", "16", "(2, 3, 2, 8)"]),
    ("mxfp4-blocks-dtype", lambda: from_mxfp4(u8(2, 3, 2, 16).view(np.int8), u8(2, 3, 2)),
     TypeError, ["blocks", "uint8", "int8"]),
    ("mxfp4-blocks-rank", lambda: from_mxfp4(u8(3, 16), u8(3)), ValueError,
     ["blocks", "3-D or 4-D"]),
    ("mxfp4-scales-shape", lambda: from_mxfp4(u8(2, 3, 2, 16), u8(2, 3, 1)), ValueError,
     ["scales", "[E, N, K/32]", "(2, 3, 2)"]),
    ("mxfp4-scales-dtype", lambda: from_mxfp4(u8(2, 3, 2, 16), f32(2, 3, 2)), TypeError,
     ["scales", "uint8"]),
    ("mxfp4-scales-255", lambda: from_mxfp4(u8(2, 3, 2, 16), with_value(u8(2, 3, 2), (0, 2, 1), 255)),
     ValueError, ["scales", "255", "(0, 2, 1)"]),
    ("int8-weight-dtype", lambda: from_int8(u8(4, 4), f32(4)), TypeError, ["weight", "int8"]),
    ("int8-scale-shape", lambda: from_int8(u8(4, 5).view(np.int8), f32(5)), ValueError,
     ["weight_scale", "(4,)", "(5,)"]),
    ("int8-scale-zero", lambda: from_int8(u8(4, 5).view(np.int8), f32(4, 1) * 0), ValueError,
     ["weight_scale", "> 0"]),
    ("dequantize-not-container", lambda: quant.dequantize(f32(1, 2, 2)), TypeError, ["q"]),
    ("split-not-container", lambda: quant.split_halves(W), TypeError, ["q"]),
    ("split-odd-N", lambda: quant.split_halves(quant.quantize(W, "int8")), ValueError,
     ["q", "even N"]),
    ("split-interleaved-fp8", lambda: quant.split_interleaved(quant.quantize(f32(1, 8, 4), "fp8_block")),
     ValueError, ["q", "fp8_block", "interleaved"]),
    ("split-halves-fp8-off-tile", lambda: quant.split_halves(quant.quantize(f32(1, 8, 144), "fp8_block")),
     ValueError, ["q", "N/2 = 72", "128"]),
]


def snapshot(*groups):
    """Bytes of every array reachable from the module's shared bad-input arrays."""
    return [a.tobytes() for group in groups for a in group if isinstance(a, np.ndarray)]


@pytest.mark.parametrize("call,error,words", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_names_the_argument_and_changes_nothing(call, error, words):
    before = snapshot(INT8, FP8, MX, [W])
    with pytest.raises(error) as caught:
        call()
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))
    assert snapshot(INT8, FP8, MX, [W]) == before


def test_refused_checkpoint_arrays_are_unchanged():
    refused = [
        (from_mxfp4, np.arange(192, dtype=np.uint8).reshape(2, 3, 2, 16),
         with_value(np.full((2, 3, 2), 127, np.uint8), (1, 1, 1), 255)),
        (from_fp8, with_value(np.full((2, 4, 4), 0x38, np.uint8), (0, 1, 2), 0xFF), f32(2, 1, 1)),
        (from_fp8, np.full((4, 4), 0x38, np.uint8), with_value(f32(1, 1), (0, 0), np.inf)),
        (from_int8, np.ones((4, 5), np.int8), with_value(f32(4, 1), (3, 0), 0)),
    ]
    for build, first, second in refused:
        before = first.tobytes(), second.tobytes()
        with pytest.raises(ValueError):
            build(first, second)
        assert (first.tobytes(), second.tobytes()) == before
    w = with_value(f32(1, 32, 2), (0, 3, 1), np.nan)
    w_before = w.tobytes()
    with pytest.raises(ValueError, match="w must be finite"):
        quant.quantize(w, "mxfp4")
    assert w.tobytes() == w_before


def test_the_package_recognises_the_container(rng):
    from dpmoe import validation

    assert validation.quantized(quant.quantize(normal(rng, (1, 32, 2)), "int8"))
    assert not validation.quantized(normal(rng, (1, 32, 2)))
