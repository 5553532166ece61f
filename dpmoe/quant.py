"""Quantized expert weights on the host: int8, fp8_block (DeepSeek-V3), mxfp4 (GPT-OSS).

A :class:`QuantizedExperts` holds a stack of expert matrices in dpmoe's layout [E, K, N]
(K the reduction dimension, N the output dimension) as quantized codes (``data``) and their
``scales``. :func:`quantize` makes one from float weights; ``from_*_checkpoint`` make one
from a checkpoint's tensors by moving bytes only (nothing is dequantised on the way);
:func:`dequantize` is the plain NumPy oracle that turns it back into float32.

| format | data | scales | w[e, k, n] |
| --- | --- | --- | --- |
| int8 | int8 [E, K, N] | float32 [E, N] | ``data[e,k,n] * scales[e,n]`` |
| fp8_block | uint8 [E, K, N], float8_e4m3fn bits | float32 [E, ceil(K/128), ceil(N/128)] | ``e4m3(data[e,k,n]) * scales[e,k//128,n//128]`` |
| mxfp4 | uint8 [E, K//2, N], two e2m1 per byte, low nibble = even k | uint8 [E, K//32, N], e8m0 | ``e2m1(nibble) * 2**(scales[e,k//32,n] - 127)`` |

What each format blocks along, in each layout. dpmoe computes ``x @ W`` with gate/up
[E, H, I] (K = H) and down [E, I, H] (K = I); vLLM and the checkpoints compute ``x @ W^T``
with w13 [E, 2I, H] and w2 [E, H, I] (one ``[out, in]`` matrix per expert), where the
reduction is the LAST dimension, so the checkpoint constructors transpose:

| format | dpmoe gate/up [E, H, I] | dpmoe down [E, I, H] | vLLM / checkpoint w13 [E, 2I, H], w2 [E, H, I] |
| --- | --- | --- | --- |
| int8 | one scale per column i, over all H | one per column h, over all I | one per row, over the whole last dim |
| fp8_block | 128 x 128 tiles of (h, i) | 128 x 128 tiles of (i, h) | 128 x 128 tiles of (row, last dim) |
| mxfp4 | 32 consecutive h of one column i | 32 consecutive i of one column h | 32 consecutive values along the last dim of one row |

Tiles at the high ends of K and N may be partial (fp8_block: K = 200 has tiles of 128 and
72); mxfp4 needs K to be a multiple of 32. Every container is checked when it is built
(bad input is a ValueError or TypeError naming the argument), so ``dequantize`` of any
container is finite float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from . import validation

FORMATS = ("int8", "fp8_block", "mxfp4")
FP8_BLOCK = 128   # DeepSeek-V3's weight_block_size, both dimensions
MX_BLOCK = 32     # OCP MX: values that share one e8m0 exponent
FP8_MAX = 448.0   # largest float8_e4m3fn
FP4_MAX = 6.0     # largest e2m1
FP4_EMAX = 2      # exponent of FP4_MAX: the OCP MX scale is 2**(floor(log2(amax)) - FP4_EMAX)
E8M0_BIAS = 127
E8M0_NAN = 255
INT8_MAX = 127    # symmetric: quantize never produces -128
FLOAT32_MAX = float(np.finfo(np.float32).max)

# e2m1 codes 0..15: magnitudes for codes 0..7, bit 3 is the sign.
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


def _e4m3_table() -> np.ndarray:
    """float8_e4m3fn bytes 0..255 -> float32, from the format's definition: 1 sign bit, 4
    exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal; 0x7F/0xFF are NaN."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 0x7
    magnitude = np.where(exponent == 0, mantissa * 2.0**-9,
                         (8 + mantissa) * np.exp2(exponent - 10.0))
    table = (sign * magnitude).astype(np.float32)
    table[(codes & 0x7F) == 0x7F] = np.nan
    return table


E4M3_VALUES = _e4m3_table()
# Magnitude of the largest code of each format: the bound that keeps a scale from making some
# value overflow float32 (int8 data may hold -128 even though quantize never writes it).
LARGEST_CODE = {"int8": 128.0, "fp8_block": FP8_MAX}
MXFP4_MAX_EXPONENT = 125  # 6 * 2**125 < float32's max < 6 * 2**126


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _expected_shapes(format: str,
                     shape: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(data shape, scales shape) of a container of ``format`` standing for [E, K, N]."""
    e, k, n = shape
    if format == "int8":
        return (e, k, n), (e, n)
    if format == "fp8_block":
        return (e, k, n), (e, _cdiv(k, FP8_BLOCK), _cdiv(n, FP8_BLOCK))
    return (e, k // 2, n), (e, k // MX_BLOCK, n)


_SHAPE_MEANING = {
    "int8": ("[E, K, N]", "[E, N]"),
    "fp8_block": ("[E, K, N]", "[E, ceil(K/128), ceil(N/128)]"),
    "mxfp4": ("[E, K//2, N]", "[E, K//32, N]"),
}
_DATA_DTYPE = {"int8": np.dtype(np.int8), "fp8_block": np.dtype(np.uint8),
               "mxfp4": np.dtype(np.uint8)}
_SCALES_DTYPE = {"int8": np.dtype(np.float32), "fp8_block": np.dtype(np.float32),
                 "mxfp4": np.dtype(np.uint8)}


def _format(value: Any) -> str:
    if not isinstance(value, str) or value not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {value!r}")
    return value


def _host_array(name: str, a: Any, ndims: tuple[int, ...]) -> np.ndarray:
    """A NumPy array of one of the ranks ``ndims`` (torch tensors get told how to convert)."""
    if not isinstance(a, np.ndarray):
        validation.array(name, a)  # a torch tensor is told how to convert
        raise TypeError(f"{name} must be a NumPy array (quantized weights are built on the "
                        f"host), got {type(a).__module__}.{type(a).__name__}")
    if a.ndim not in ndims:
        ranks = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {ranks}, got shape {a.shape}")
    return a


def _dtype(name: str, a: np.ndarray, expected: np.dtype, what: str) -> None:
    if a.dtype != expected:
        raise TypeError(f"{name} must have dtype {expected} ({what}), got {a.dtype}")


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _check_values(format: str, data: np.ndarray, scales: np.ndarray, data_name: str,
                  scales_name: str) -> None:
    """Values no weight can have: NaN codes, NaN/inf/non-positive scales, e8m0 NaN, and
    scales so large that a code times its scale overflows float32 (checked against the
    format's largest code: real checkpoints are far below that). Layout-free, so the
    checkpoint constructors run it on their own arrays, under their own names."""
    if format == "fp8_block":
        nan = (data & 0x7F) == 0x7F
        if nan.any():
            at = _first(nan)
            raise ValueError(f"{data_name} must hold finite float8_e4m3fn values, found the NaN "
                             f"byte {int(data[at]):#04x} at {at}")
    if format == "mxfp4":
        highest = E8M0_BIAS + MXFP4_MAX_EXPONENT
        if (scales > highest).any():
            at = _first(scales > highest)
            what = ("NaN in e8m0" if scales[at] == E8M0_NAN
                    else "6 times its scale overflows float32")
            raise ValueError(f"{scales_name} must hold e8m0 exponents in [0, {highest}], found "
                             f"{int(scales[at])} ({what}) at {at}")
        return
    validation.finite(scales_name, scales)
    highest = FLOAT32_MAX / LARGEST_CODE[format]
    bad = ~((scales > 0) & (scales <= highest))
    if bad.any():
        at = _first(bad)
        raise ValueError(f"{scales_name} must be > 0 (each scale multiplies its quantized values) "
                         f"and <= {highest:.4g} (so that {LARGEST_CODE[format]:g} times it is "
                         f"finite in float32), found {float(scales[at])} at {at}")


def _frozen(a: np.ndarray) -> np.ndarray:
    """The container's own C-contiguous, read-only copy of a checked array."""
    copy = np.array(a, order="C", copy=True)
    copy.flags.writeable = False
    return copy


@dataclass(frozen=True, eq=False, repr=False)
class QuantizedExperts:
    """A stack of E quantized [K, N] expert matrices (see the module docstring's table).

    ``QuantizedExperts(format, data, scales, shape)`` checks everything (format name, dtypes
    and exact shapes against ``shape``, K a multiple of 32 for mxfp4, no NaN codes, float
    scales finite and > 0, e8m0 scales not 255, no scale so large that a code times it
    overflows float32), then keeps read-only C-contiguous copies of ``data`` and ``scales``
    (the caller's arrays are never modified, and later writes to them change nothing here).
    """

    format: str          # one of FORMATS
    data: np.ndarray     # the quantized codes, see the table
    scales: np.ndarray   # float32 multipliers (int8, fp8_block) or uint8 e8m0 exponents (mxfp4)
    shape: tuple[int, int, int]  # logical (E, K, N) of the float weights
    # how dpmoe.validation and dpmoe.reference recognise quantized experts without importing
    # this module
    quantized: ClassVar[bool] = True

    def __post_init__(self) -> None:
        format = _format(self.format)
        if not isinstance(self.shape, (tuple, list)) or len(self.shape) != 3:
            raise ValueError(f"shape must be the logical (E, K, N), got {self.shape!r}")
        shape = tuple(validation.positive_int(f"shape[{i}]", v) for i, v in enumerate(self.shape))
        if format == "mxfp4" and shape[1] % MX_BLOCK:
            raise ValueError(f"shape: mxfp4 needs K (shape[1]) to be a multiple of {MX_BLOCK}, "
                             f"got K = {shape[1]}")
        data = _host_array("data", self.data, (3,))
        scales = _host_array("scales", self.scales, (3,) if format != "int8" else (2,))
        data_shape, scales_shape = _expected_shapes(format, shape)
        data_meaning, scales_meaning = _SHAPE_MEANING[format]
        _dtype("data", data, _DATA_DTYPE[format], f"{format} codes")
        validation.shape("data", data, data_shape, data_meaning)
        _dtype("scales", scales, _SCALES_DTYPE[format],
               "e8m0 exponents" if format == "mxfp4" else "multipliers")
        validation.shape("scales", scales, scales_shape, scales_meaning)
        _check_values(format, data, scales, "data", "scales")
        object.__setattr__(self, "format", format)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "data", _frozen(data))
        object.__setattr__(self, "scales", _frozen(scales))

    @property
    def nbytes(self) -> int:
        """Bytes of ``data`` and ``scales`` together."""
        return int(self.data.nbytes + self.scales.nbytes)

    def dequantize(self) -> np.ndarray:
        """The float32 [E, K, N] weights this container stands for (see :func:`dequantize`)."""
        return dequantize(self)

    def __getitem__(self, experts: Any) -> QuantizedExperts:
        """The experts ``experts`` selects along E (an int, a slice, or 1-D integer ids; their
        order is kept), as a container of the same format: the way to shard experts."""
        ids = np.atleast_1d(np.arange(self.shape[0])[experts])
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"experts must select at least one expert along E (1-D), got "
                             f"{experts!r}")
        return QuantizedExperts(self.format, self.data[ids], self.scales[ids],
                                (int(ids.size),) + self.shape[1:])

    def __repr__(self) -> str:
        return (f"QuantizedExperts(format={self.format!r}, shape={self.shape}, "
                f"nbytes={self.nbytes})")


def dequantize(q: QuantizedExperts) -> np.ndarray:
    """float32 [E, K, N] weights of ``q``, computed from the module docstring's table with
    plain NumPy lookups (the oracle of the quantized kernels; no ml_dtypes involved)."""
    if not isinstance(q, QuantizedExperts):
        raise TypeError(f"q must be a QuantizedExperts, got {type(q).__name__}")
    e, k, n = q.shape
    if q.format == "int8":
        return q.data.astype(np.float32) * q.scales[:, None, :]
    if q.format == "fp8_block":
        per_value = np.repeat(np.repeat(q.scales, FP8_BLOCK, axis=1), FP8_BLOCK, axis=2)
        return E4M3_VALUES[q.data] * per_value[:, :k, :n]
    # byte [e, j, n] holds k = 2j in its low nibble and k = 2j + 1 in its high nibble
    codes = np.stack((q.data & 0xF, q.data >> 4), axis=2).reshape(e, k, n)
    exponents = np.repeat(q.scales.astype(np.int32) - E8M0_BIAS, MX_BLOCK, axis=1)
    return np.ldexp(FP4_VALUES[codes], exponents)


def _block_amax(a: np.ndarray, axis: int, block: int) -> np.ndarray:
    """max |a| over consecutive blocks of ``block`` along ``axis`` (the last one may be partial)."""
    return np.maximum.reduceat(a, np.arange(0, a.shape[axis], block), axis=axis)


def _int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scales = np.abs(w).max(axis=1) / np.float32(INT8_MAX)
    scales[scales == 0] = 1  # a column of zeros (or so tiny that amax / 127 underflows)
    codes = np.clip(np.rint(w / scales[:, None, :]), -INT8_MAX, INT8_MAX)
    return codes.astype(np.int8), scales


def _fp8_block(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, k, n = w.shape
    amax = _block_amax(_block_amax(np.abs(w), 1, FP8_BLOCK), 2, FP8_BLOCK)
    scales = amax / np.float32(FP8_MAX)
    scales[scales == 0] = 1
    per_value = np.repeat(np.repeat(scales, FP8_BLOCK, axis=1), FP8_BLOCK, axis=2)[:, :k, :n]
    # ml_dtypes turns values beyond 448 into NaN: saturate first
    scaled = np.clip(w / per_value, -FP8_MAX, FP8_MAX)
    return scaled.astype(ml_dtypes.float8_e4m3fn).view(np.uint8), scales


def _mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    amax = _block_amax(np.abs(w), 1, MX_BLOCK)
    _, binary_exponent = np.frexp(amax)  # amax = m * 2**binary_exponent, m in [0.5, 1)
    exponents = np.where(amax > 0, binary_exponent - 1 - FP4_EMAX, 0)
    exponents = np.clip(exponents, -E8M0_BIAS, E8M0_BIAS)
    scaled = np.ldexp(w, -np.repeat(exponents, MX_BLOCK, axis=1))  # exact: a power of two
    codes = np.clip(scaled, -FP4_MAX, FP4_MAX).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, (exponents + E8M0_BIAS).astype(np.uint8)


_QUANTIZERS = {"int8": _int8, "fp8_block": _fp8_block, "mxfp4": _mxfp4}


def quantize(w: np.ndarray, format: str) -> QuantizedExperts:
    """Quantize float weights ``w`` [E, K, N] (or one matrix [K, N], taken as E = 1; float32,
    float16 or ml_dtypes.bfloat16) to ``format``.

    Every scale comes from the absolute maximum of the values it covers, and every value
    (``w / scale`` in float32) is rounded to the nearest code, ties to even:

    - int8: ``scales[e, n] = amax(w[e, :, n]) / 127``, codes in [-127, 127];
    - fp8_block: ``amax`` of each 128 x 128 tile / 448, codes float8_e4m3fn saturated at ±448;
    - mxfp4 (OCP MX): per 32 consecutive k, exponent ``floor(log2(amax)) - 2`` clamped to
      e8m0's range, codes e2m1 saturated at ±6; K must be a multiple of 32.

    A scale the rule would make 0 (a column, tile or block of zeros) is 1.0 (exponent 127).
    """
    format = _format(format)
    _host_array("w", w, (2, 3))
    validation.float_array("w", w)
    if w.ndim == 2:
        w = w[None]
    e, k, n = w.shape
    if min(e, k, n) == 0:
        raise ValueError(f"w must have non-zero [E, K, N], got {w.shape}")
    if format == "mxfp4" and k % MX_BLOCK:
        raise ValueError(f"w: mxfp4 needs K (w's reduction dimension, axis -2) to be a "
                         f"multiple of {MX_BLOCK}, got K = {k}")
    validation.finite("w", w)
    data, scales = _QUANTIZERS[format](w.astype(np.float32))
    return QuantizedExperts(format, data, scales, (e, k, n))


def _stacked(a: np.ndarray, matrix_ndim: int) -> np.ndarray:
    """``a`` with a leading expert axis (one matrix becomes a stack of one)."""
    return a[None] if a.ndim == matrix_ndim else a


def from_fp8_checkpoint(weight: np.ndarray, weight_scale_inv: np.ndarray) -> QuantizedExperts:
    """DeepSeek-V3 FP8 expert weights -> fp8_block [E, K = in, N = out].

    ``weight``: [out, in] or [E, out, in], float8_e4m3fn (``ml_dtypes.float8_e4m3fn``, or its
    bits as uint8: from torch, ``t.view(torch.uint8).numpy()``). ``weight_scale_inv``:
    float32 [ceil(out/128), ceil(in/128)] or [E, ...] likewise, the multiplier of each
    128 x 128 tile. Both are transposed into dpmoe's layout; no value changes.
    """
    _host_array("weight", weight, (2, 3))
    if weight.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
        weight = weight.view(np.uint8)
    if weight.dtype != np.uint8:
        raise TypeError(f"weight must hold float8_e4m3fn values (an ml_dtypes.float8_e4m3fn "
                        f"array, or its bits as uint8), got {weight.dtype}")
    _host_array("weight_scale_inv", weight_scale_inv, (weight.ndim,))
    _dtype("weight_scale_inv", weight_scale_inv, np.dtype(np.float32), "one multiplier per tile")
    *experts, out, inp = weight.shape
    validation.shape("weight_scale_inv", weight_scale_inv,
                     (*experts, _cdiv(out, FP8_BLOCK), _cdiv(inp, FP8_BLOCK)),
                     "[E, ceil(out/128), ceil(in/128)] (without E for one matrix)")
    _check_values("fp8_block", weight, weight_scale_inv, "weight", "weight_scale_inv")
    weight, scales = _stacked(weight, 2), _stacked(weight_scale_inv, 2)
    e = weight.shape[0]
    return QuantizedExperts("fp8_block", weight.transpose(0, 2, 1), scales.transpose(0, 2, 1),
                            (e, inp, out))


def from_mxfp4_checkpoint(blocks: np.ndarray, scales: np.ndarray) -> QuantizedExperts:
    """GPT-OSS MXFP4 expert weights -> mxfp4 [E, K, N].

    ``blocks``: uint8 [E, N, K/32, 16] (or [N, K/32, 16] for one matrix), 16 bytes holding
    32 e2m1 values along K, low nibble first; ``scales``: uint8 [E, N, K/32] e8m0 exponents.
    GPT-OSS's ``gate_up_proj_blocks`` has N = 2I (gate and up rows interleaved: see
    :func:`split_interleaved`) and K = H; ``down_proj_blocks`` has N = H, K = I. The bytes
    are transposed into data [E, K//2, N] (nibble order kept) and scales [E, K//32, N].
    """
    _host_array("blocks", blocks, (3, 4))
    _dtype("blocks", blocks, np.dtype(np.uint8), "two e2m1 values per byte")
    if blocks.shape[-1] != MX_BLOCK // 2:
        raise ValueError(f"blocks must end in a dimension of {MX_BLOCK // 2} bytes ({MX_BLOCK} "
                         f"e2m1 values per block), got shape {blocks.shape}")
    _host_array("scales", scales, (blocks.ndim - 1,))
    _dtype("scales", scales, np.dtype(np.uint8), "e8m0 exponents")
    validation.shape("scales", scales, blocks.shape[:-1], "[E, N, K/32] like blocks")
    _check_values("mxfp4", blocks, scales, "blocks", "scales")
    blocks, scales = _stacked(blocks, 3), _stacked(scales, 2)
    e, n, groups, _ = blocks.shape
    data = blocks.reshape(e, n, groups * MX_BLOCK // 2).transpose(0, 2, 1)
    return QuantizedExperts("mxfp4", data, scales.transpose(0, 2, 1), (e, groups * MX_BLOCK, n))


def from_int8_checkpoint(weight: np.ndarray, weight_scale: np.ndarray) -> QuantizedExperts:
    """Weight-only int8 with one scale per output channel (compressed-tensors' channel
    strategy) -> int8 [E, K = in, N = out].

    ``weight``: int8 [out, in] or [E, out, in]; ``weight_scale``: float32 [out] or [out, 1]
    (with a leading E for a stack). Transposed into dpmoe's layout; no value changes.
    """
    _host_array("weight", weight, (2, 3))
    _dtype("weight", weight, np.dtype(np.int8), "int8 codes")
    _host_array("weight_scale", weight_scale, (weight.ndim - 1, weight.ndim))
    _dtype("weight_scale", weight_scale, np.dtype(np.float32), "one multiplier per output row")
    rows = weight.shape[:-1]
    if weight_scale.shape not in (rows, rows + (1,)):
        raise ValueError(f"weight_scale must have shape [E, out] or [E, out, 1] (without E for "
                         f"one matrix) = {rows} or {rows + (1,)}, got {weight_scale.shape}")
    _check_values("int8", weight, weight_scale, "weight", "weight_scale")
    weight, scales = _stacked(weight, 2), _stacked(weight_scale.reshape(rows), 1)
    e, out, inp = weight.shape
    return QuantizedExperts("int8", weight.transpose(0, 2, 1), scales, (e, inp, out))


def _columns(q: QuantizedExperts, columns: slice) -> QuantizedExperts:
    """The output columns ``columns`` of every expert, scales sliced alike (not for fp8_block)."""
    data = q.data[..., columns]
    scales = q.scales[..., columns]
    return QuantizedExperts(q.format, data, scales, q.shape[:2] + (data.shape[-1],))


def _even_columns(q: QuantizedExperts) -> int:
    if not isinstance(q, QuantizedExperts):
        raise TypeError(f"q must be a QuantizedExperts, got {type(q).__name__}")
    if q.shape[2] % 2:
        raise ValueError(f"q must have an even N (gate and up columns), got shape {q.shape}")
    return q.shape[2] // 2


def split_interleaved(q: QuantizedExperts) -> tuple[QuantizedExperts, QuantizedExperts]:
    """GPT-OSS's fused gate_up [E, H, 2I], columns alternating gate, up -> (gate, up),
    each [E, H, I] in q's format. fp8_block is refused: its 128-column tiles would mix gate
    and up columns under one scale."""
    _even_columns(q)
    if q.format == "fp8_block":
        raise ValueError("q: fp8_block cannot be split into interleaved columns (each "
                         "128-column tile holds gate and up columns under one scale); "
                         "split the checkpoint's rows before from_fp8_checkpoint")
    return _columns(q, slice(0, None, 2)), _columns(q, slice(1, None, 2))


def split_halves(q: QuantizedExperts) -> tuple[QuantizedExperts, QuantizedExperts]:
    """A fused w13 in dpmoe's layout [E, H, 2I], first I columns gate, last I up (vLLM,
    DeepSeek) -> (gate, up), each [E, H, I] in q's format. fp8_block needs I to be a
    multiple of 128, so that the split falls on a tile boundary."""
    half = _even_columns(q)
    if q.format != "fp8_block":
        return _columns(q, slice(0, half)), _columns(q, slice(half, None))
    if half % FP8_BLOCK:
        raise ValueError(f"q: fp8_block can be split only on a {FP8_BLOCK}-column tile "
                         f"boundary; N/2 = {half} is not a multiple of {FP8_BLOCK}")
    tiles = half // FP8_BLOCK
    e, k, _ = q.shape
    return (QuantizedExperts(q.format, q.data[..., :half], q.scales[..., :tiles], (e, k, half)),
            QuantizedExperts(q.format, q.data[..., half:], q.scales[..., tiles:], (e, k, half)))
