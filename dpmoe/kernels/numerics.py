"""Loading and storing float32/float16/bfloat16 elements inside kernels.

16-bit floats live in ``uint16`` arrays (see :mod:`dpmoe.arrays`); these device functions
widen them to float32 on load and round to nearest even on store. :func:`loader` and
:func:`storer` pick the pair for a storage kind at factory time, so a kernel is written
once and specialised per kind.
"""

import numpy as np
import numba_dpex as dpex
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def _bits_as_f32(typingctx, bits):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen




@intrinsic
def _f32_as_bits(typingctx, value):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _half_bits_to_f32(typingctx, bits):
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_half_bits(typingctx, value):
    # fptrunc rounds to nearest even, overflows to inf and keeps NaN, like NumPy's cast
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


# public names for kernels that build floats from bits (the quantized formats' decoders)
bits_as_f32 = _bits_as_f32
f32_as_bits = _f32_as_bits


# Every element index goes through ``np.uint64`` (see :func:`ix`): numba turns a signed
# index ``a[i]`` into ``a[i + len(a) if i < 0 else i]``, and that select hides from the
# OpenCL CPU compiler that neighbouring work-items read neighbouring elements, so it emitted
# a gather per load instead of one vector load (a bf16 GEMV: 9.7 -> 7.3 ms for an OLMoE
# decode step once its loads were unsigned). Indices in dpmoe's kernels are never negative.
@dpex.device_func
def ix(i):
    """Index ``i`` as numba indexes without the negative-index wrap-around."""
    return np.uint64(i)


@dpex.device_func
def load_float32(a, i):
    return a[ix(i)]


@dpex.device_func
def store_float32(a, i, v):
    a[ix(i)] = v


@dpex.device_func
def load_float16(a, i):
    return _half_bits_to_f32(a[ix(i)])


@dpex.device_func
def store_float16(a, i, v):
    a[ix(i)] = _f32_to_half_bits(v)


@dpex.device_func
def load_bfloat16(a, i):
    # numba promotes uint16 << 16 to 64 bits; the bitcast needs exactly 32
    return _bits_as_f32(np.uint32(np.uint32(a[ix(i)]) << np.uint32(16)))


@dpex.device_func
def store_bfloat16(a, i, v):
    bits = _f32_as_bits(v)
    if v != v:
        # keep NaN a NaN (a quiet one) instead of letting rounding carry into inf
        a[ix(i)] = np.uint16((bits >> np.uint32(16)) | np.uint32(0x40))
    else:
        rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        a[ix(i)] = np.uint16((bits + rounding) >> np.uint32(16))


@intrinsic
def _low_bfloat16(typingctx, word):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.shl(args[0], ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return sig, codegen


@intrinsic
def _high_bfloat16(typingctx, word):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        masked = builder.and_(args[0], ir.Constant(ir.IntType(32), 0xFFFF0000))
        return builder.bitcast(masked, ir.FloatType())

    return sig, codegen


@intrinsic
def _low_float16(typingctx, word):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        half = builder.bitcast(builder.trunc(args[0], ir.IntType(16)), ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return sig, codegen


@intrinsic
def _high_float16(typingctx, word):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        shifted = builder.lshr(args[0], ir.Constant(ir.IntType(32), 16))
        half = builder.bitcast(builder.trunc(shifted, ir.IntType(16)), ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return sig, codegen


# Pair loaders read two neighbouring elements of a row at once. For 16-bit kinds the row is
# seen as uint32 words: 32-bit loads vectorise across work-items like float32 ones, while
# 16-bit loads measured 4x slower on the CPU device (5 vs 19 GB/s in a GEMV).
@dpex.device_func
def load_pair_float32(a, i):
    return a[ix(2 * i)], a[ix(2 * i + 1)]


@dpex.device_func
def load_pair_bfloat16(words, i):
    w = words[ix(i)]
    return _low_bfloat16(w), _high_bfloat16(w)


@dpex.device_func
def load_pair_float16(words, i):
    w = words[ix(i)]
    return _low_float16(w), _high_float16(w)


# Unit loaders for weights stored [N, K] (the reduction along a row): neighbouring work-items
# read neighbouring 64-bit words of one row, which measured 12.7 GB/s in a bf16 GEMV
# against 5.5 for 32-bit words.
@dpex.device_func
def _low_half(w):
    return np.uint32(w & np.uint64(0xFFFFFFFF))


@dpex.device_func
def _high_half(w):
    return np.uint32(w >> np.uint64(32))


@dpex.device_func
def load_quad_bfloat16(words, i):
    w = words[ix(i)]
    lo, hi = _low_half(w), _high_half(w)
    return _low_bfloat16(lo), _high_bfloat16(lo), _low_bfloat16(hi), _high_bfloat16(hi)


@dpex.device_func
def load_quad_float16(words, i):
    w = words[ix(i)]
    lo, hi = _low_half(w), _high_half(w)
    return _low_float16(lo), _high_float16(lo), _low_float16(hi), _high_float16(hi)


@dpex.device_func
def load_quad_float32(words, i):
    a, b = words[ix(2 * i)], words[ix(2 * i + 1)]
    return (_bits_as_f32(_low_half(a)), _bits_as_f32(_high_half(a)),
            _bits_as_f32(_low_half(b)), _bits_as_f32(_high_half(b)))


_UNIT_LOADERS = {
    (4, "bfloat16"): load_quad_bfloat16, (4, "float16"): load_quad_float16,
    (4, "float32"): load_quad_float32, (1, "float32"): load_float32, (1, "bfloat16"): load_bfloat16, (1, "float16"): load_float16,
}
# the array dtype each unit loader reads
UNIT_ARRAYS = {
    (4, "bfloat16"): np.uint64, (4, "float16"): np.uint64, (4, "float32"): np.uint64,
    (1, "float32"): np.float32, (1, "bfloat16"): np.uint16, (1, "float16"): np.uint16,
}


def unit_loader(per_unit: int, kind: str):
    """``load(a, u)`` -> the ``per_unit`` consecutive elements of unit ``u`` as float32
    (a tuple unless ``per_unit`` is 1), reading ``a`` as :data:`UNIT_ARRAYS` says."""
    return _UNIT_LOADERS[(per_unit, kind)]


_PAIR_LOADERS = {"float32": load_pair_float32, "float16": load_pair_float16, "bfloat16": load_pair_bfloat16}


def pair_loader(kind: str):
    """``load_pair(a, i) -> (a[2i], a[2i+1])`` as float32; 16-bit kinds take uint32 words."""
    return _PAIR_LOADERS[kind]


_LOADERS = {"float32": load_float32, "float16": load_float16, "bfloat16": load_bfloat16}
_STORERS = {"float32": store_float32, "float16": store_float16, "bfloat16": store_bfloat16}


def loader(kind: str):
    """The device function ``load(a, i) -> float32`` for storage kind ``kind``."""
    return _LOADERS[kind]


def storer(kind: str):
    """The device function ``store(a, i, value_f32)`` for storage kind ``kind``."""
    return _STORERS[kind]
