"""Kernels that read quantized expert weights (:mod:`dpmoe.quant`) in their own bytes.

Formats, in dpmoe's [E, K, N] layout (K the reduction dimension):

- ``int8``: int8 [E, K, N], float32 scales [E, N] (one per output column);
- ``fp8_block``: float8_e4m3fn bits [E, K, N], float32 scales [E, ceil(K/128), ceil(N/128)];
- ``mxfp4``: uint8 [E, K/2, N], two e2m1 values per byte along K (low nibble = even k),
  e8m0 exponents [E, K/32, N].

Bytes are read four at a time as uint32 words (four neighbouring columns, and for mxfp4
two rows of them) when N allows, so the loads vectorise like the 16-bit path's, and decoded
in registers with integer operations (a 16-entry table for e2m1, read by a gather per
value, measured 10-15% slower). The per-token GEMV multiplies the decoded weights into
float32 accumulators, never writing a dequantised weight; the grouped path dequantises a
group of experts at a time into a reused buffer for the GEMMs
(:func:`make_dequantize_kernel`).
"""

from functools import lru_cache

import numpy as np
import numba_dpex as dpex
from numba_dpex import kernel_api as kapi

from .gemv import GRID_PROLOGUE, kernel_namespace, slot_source, split_k_grid
from .launch import call
from .numerics import bits_as_f32, f32_as_bits, ix, storer

FP8_BLOCK = 128  # fp8_block's scale blocks are 128 x 128
MX_BLOCK = 32  # mxfp4's scale blocks are 32 values along K


# The decoders are branch-free (selects and bit operations): with branches, the OpenCL CPU
# compiler stopped vectorising the GEMV (0.2-1.3 GB/s instead of tens).
@dpex.device_func
def int8_value(byte):
    """An int8 held in the low 8 bits of a uint32, as float32 (truncation keeps the bits)."""
    return np.float32(np.int8(byte))


@dpex.device_func
def fp8_value(byte):
    """float8_e4m3fn bits (low 8 bits) as float32: exponent bias 7, 3 mantissa bits;
    exponent 0 is subnormal (m * 2^-9). NaN bytes are refused when the weights are made."""
    magnitude = byte & np.uint32(0x7F)
    # rebias the exponent 7 -> 127 by adding 120 to it: exact, no denormals involved
    normal = bits_as_f32(np.uint32((magnitude << np.uint32(20)) + np.uint32(120 << 23)))
    v = normal if magnitude >= np.uint32(8) else np.float32(magnitude) * np.float32(1.0 / 512.0)
    return bits_as_f32(f32_as_bits(v) | ((byte & np.uint32(0x80)) << np.uint32(24)))


@dpex.device_func
def fp4_value(nibble):
    """An e2m1 code (low 4 bits) as float32: 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 the sign."""
    code = nibble & np.uint32(7)
    normal = bits_as_f32(np.uint32((code << np.uint32(22)) + np.uint32(126 << 23)))
    v = normal if code >= np.uint32(2) else np.float32(code) * np.float32(0.5)
    return bits_as_f32(f32_as_bits(v) | ((nibble & np.uint32(8)) << np.uint32(28)))


@dpex.device_func
def e8m0_value(byte):
    """An e8m0 exponent (low 8 bits) as 2**(byte - 127); 255 (NaN) is refused earlier."""
    b = byte & np.uint32(0xFF)
    if b == 0:
        return np.float32(2.0 ** -127)
    return bits_as_f32(np.uint32(b << np.uint32(23)))


# Rows between two group barriers of the quantized GEMV: 4 for one code per byte (OLMoE
# decode, int8 5.8 -> 5.1 ms, fp8_block 7.7 -> 7.0 against 8), 8 for mxfp4, whose loop
# steps two rows at a time (4: 7.9 -> 13 ms). Both divide 32 and 128, so a chunk of rows
# never straddles a scale block.
QUANT_ROWS_PER_BARRIER = {"int8": 4, "fp8_block": 4, "mxfp4": 8}

# Columns a work-item takes per row, as uint32 words: more columns per row spread a row's
# loop overhead over more weights (olmoe-sized decode, int8: 16 columns 1.3x faster than 4,
# 32 no faster than 16).
WIDE_COLS = 16


def cols_per_load(fmt: str, n_cols: int) -> int:
    """Columns one work-item reads per row: WIDE_COLS (four uint32 words) when N is a
    multiple of it, 4 (one word) when N is a multiple of 4, else 1 (a byte)."""
    for cols in (WIDE_COLS, 4):
        if n_cols % cols == 0:
            return cols
    return 1


_GEMV_TEMPLATE = """
def quant_gemv_kernel(
    nd, inp, w_a, w_b, s_a, s_b, slot_of_pos, block_expert, partial,
    n_rows, n_units, n_cols, top_k, n_slots, n_splits, n_tiles, n_pos, n_srows, n_scols,
):
""" + GRID_PROLOGUE + """\
    col = unit * COLS
{init}
    first = split * ROWS_PER_SPLIT
    last = min(first + ROWS_PER_SPLIT, n_rows)
    for base in range(first, last, ROWS_PER_BARRIER):
        if live:
{chunk}
            for h in range(base, min(base + ROWS_PER_BARRIER, last), STEP):
                at = ((expert * (n_rows // STEP) + h // STEP) * n_units + unit) * WORDS
{loads}
{accumulate}
        group_barrier(nd.get_group())
    if live:
{store}
"""


def _gemv_source(fmt: str, block: int, cols: int, two: bool) -> str:
    """Kernel source with named accumulators (one per slot, column and matrix; see
    :mod:`dpmoe.kernels.gemv` for why generated), specialised to the format."""
    mats = ("a", "b") if two else ("a",)
    words = max(1, cols // 4)
    init, chunk, accumulate, store = [], [], [], []
    loads = [f"                w{m}{j} = np.uint32(w_{m}[ix(at + {j})])" for m in mats
             for j in range(words)]
    for r in range(block):
        init += [f"    acc{r}{m}{c} = ZERO" for m in mats for c in range(cols)] + slot_source(r)
    if fmt == "fp8_block":  # one scale per 128 x 128 block; a chunk of rows stays in one
        for m in mats:
            chunk.append(f"            s{m} = s_{m}[(expert * n_srows + base // {FP8_BLOCK}) "
                         f"* n_scols + col // {FP8_BLOCK}]")
    elif fmt == "mxfp4":  # one scale per column per 32 rows; a chunk stays in one block
        for m in mats:
            for c in range(cols):
                chunk.append(f"            s{m}{c} = e8m0_value(np.uint32(s_{m}[(expert * n_srows "
                             f"+ base // {MX_BLOCK}) * n_cols + col + {c}]))")
    for m in mats:
        for c in range(cols):
            shift = f"np.uint32({8 * (c % 4)})"
            byte = f"(w{m}{c // 4} >> {shift})" if cols > 1 else f"w{m}0"
            if fmt == "int8":
                accumulate.append(f"                {m}{c} = int8_value({byte})")
            elif fmt == "fp8_block":
                accumulate.append(f"                {m}{c} = fp8_value({byte}) * s{m}")
            else:  # the low nibble is row h, the high nibble row h + 1
                accumulate.append(f"                {m}{c}l = fp4_value({byte}) * s{m}{c}")
                accumulate.append(f"                {m}{c}h = fp4_value({byte} >> np.uint32(4)) "
                                  f"* s{m}{c}")
    for r in range(block):
        accumulate.append(f"                x{r} = load_in(inp, src{r} * n_rows + h)")
        if fmt == "mxfp4":
            accumulate.append(f"                y{r} = load_in(inp, src{r} * n_rows + h + 1)")
        for m in mats:
            for c in range(cols):
                if fmt == "mxfp4":
                    accumulate.append(f"                acc{r}{m}{c} += x{r} * {m}{c}l + y{r} * {m}{c}h")
                else:
                    accumulate.append(f"                acc{r}{m}{c} += x{r} * {m}{c}")
    for r in range(block):
        store.append(f"        out = ((split * n_pos) + blk * BLOCK + {r}) * WIDTH * n_cols + col")
        for i, m in enumerate(mats):
            for c in range(cols):
                value = f"acc{r}{m}{c}"
                if fmt == "int8":  # per-column scales: applied once to the column's sum
                    value += f" * s_{m}[expert * n_cols + col + {c}]"
                store.append(f"        partial[out + {i} * n_cols + {c}] = {value}")
    return _GEMV_TEMPLATE.format(init="\n".join(init), chunk="\n".join(chunk) or "            pass",
                                 loads="\n".join(loads), accumulate="\n".join(accumulate),
                                 store="\n".join(store))


@lru_cache(maxsize=None)
def make_quant_gemv_kernel(fmt: str, in_kind: str, block: int, cols: int, two_matrices: bool,
                           rows_by_token: bool):
    """Partial products of input rows with quantized expert matrices, per row chunk: the
    quantized counterpart of :func:`dpmoe.kernels.gemv.make_block_gemv_kernel` (same
    arguments and output), plus the scales ``s_a``/``s_b``. ``w_a``/``w_b``: the format's
    bytes as uint32 words when ``cols`` is 4 or more (cols / 4 words per row), else as
    uint8."""
    namespace = dict(kernel_namespace(in_kind, block, cols, two_matrices, rows_by_token),
                     int8_value=int8_value, fp8_value=fp8_value, fp4_value=fp4_value,
                     e8m0_value=e8m0_value, ix=ix, STEP=2 if fmt == "mxfp4" else 1,
                     ROWS_PER_BARRIER=QUANT_ROWS_PER_BARRIER[fmt],
                     WORDS=max(1, cols // 4))
    source = _gemv_source(fmt, block, cols, two_matrices)
    exec(compile(source, f"<quant_gemv_kernel {fmt} block={block} cols={cols}>", "exec"), namespace)
    kernel = dpex.kernel(namespace["quant_gemv_kernel"])

    def launch(inp, w_a, w_b, s_a, s_b, slot_of_pos, block_expert, partial, n_rows, n_cols,
               top_k, n_slots, n_srows, n_scols):
        n_units = n_cols // cols
        grid, n_splits, n_tiles = split_k_grid(n_units, n_rows, block_expert.shape[0])
        call(
            kernel, grid,
            inp, w_a, w_b, s_a, s_b, slot_of_pos, block_expert, partial, n_rows, n_units,
            n_cols, top_k, n_slots, n_splits, n_tiles, block_expert.shape[0] * block, n_srows,
            n_scols,
        )

    return launch


@dpex.device_func
def bf16_bits(v):
    """A finite float32 rounded to nearest even bfloat16, as bits in a uint32 (dequantised
    weights are finite: no NaN case, and no branch)."""
    bits = f32_as_bits(v)
    return (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@lru_cache(maxsize=None)
def make_scale_columns_kernel():
    """``out[r, n] *= scales[row_expert[r], n]``: int8 experts' per-column scales applied to
    a GEMM of their codes (exact in bf16), one multiply per output instead of per weight."""

    @dpex.kernel
    def scale_columns_kernel(item: kapi.Item, out, row_expert, scales, n_cols):
        n = item.get_id(0)
        r = item.get_id(1)
        out[ix(r * n_cols + n)] = out[ix(r * n_cols + n)] * scales[ix(row_expert[r] * n_cols + n)]

    def launch(out, row_expert, scales, n_rows, n_cols):
        call(scale_columns_kernel, dpex.Range(n_cols, n_rows), out, row_expert, scales, n_cols)

    return launch


@lru_cache(maxsize=None)
def make_dequantize_kernel(fmt: str, out_kind: str, words: bool):
    """Dequantises whole experts: ``out[g, k, n]`` (storage form of ``out_kind``) = the
    value of expert ``experts[g]`` at (k, n), for the grouped path's GEMMs.

    ``words`` (N a multiple of 4): one work-item per uint32 word of codes (four columns;
    for mxfp4 two rows of them), bf16 results written four at a time as uint64 words
    (``out`` seen so; 16-bit stores vectorise 4x worse, and pairs of uint32 stores became
    scatters); else one work-item per byte, ``w`` as uint8."""
    store = storer(out_kind)
    mx = fmt == "mxfp4"
    is_fp8 = fmt == "fp8_block"
    is_int8 = fmt == "int8" or fmt == "int8_codes"
    int8_scaled = fmt == "int8"
    bf16 = out_kind == "bfloat16"

    @dpex.device_func
    def value(byte, k, n, e, scales, n_srows, n_scols, n_cols):
        """The format's value of the code in the low bits of ``byte`` at (k, n) of expert e."""
        if is_int8:
            if not int8_scaled:  # codes only: the GEMM's columns are scaled afterwards
                return int8_value(byte)
            return int8_value(byte) * scales[ix(e * n_cols + n)]
        if is_fp8:
            return fp8_value(byte) * scales[ix((e * n_srows + k // FP8_BLOCK) * n_scols
                                               + n // FP8_BLOCK)]
        return fp4_value(byte) * e8m0_value(
            np.uint32(scales[ix((e * n_srows + k // MX_BLOCK) * n_cols + n)]))

    @dpex.device_func
    def put_row(out, at, v0, v1, v2, v3):
        """Four neighbouring results from element ``at`` (a multiple of 4)."""
        if bf16:  # one 64-bit store per work-item: neighbours' stores form one vector
            low = bf16_bits(v0) | (bf16_bits(v1) << np.uint32(16))
            high = bf16_bits(v2) | (bf16_bits(v3) << np.uint32(16))
            out[ix(at // 4)] = np.uint64(low) | (np.uint64(high) << np.uint64(32))
        else:
            out[ix(at)] = v0
            out[ix(at + 1)] = v1
            out[ix(at + 2)] = v2
            out[ix(at + 3)] = v3

    @dpex.kernel
    def dequantize_words_kernel(item: kapi.Item, w, scales, experts, out, n_rows, n_cols,
                                n_srows, n_scols):
        u = item.get_id(0)
        row = item.get_id(1)  # a byte row: for mxfp4 two rows of values
        g = item.get_id(2)
        e = experts[g]
        step = 2 if mx else 1
        word = np.uint32(w[ix((e * (n_rows // step) + row) * (n_cols // 4) + u)])
        k = row * step
        n = u * 4
        b0, b1 = word, word >> np.uint32(8)
        b2, b3 = word >> np.uint32(16), word >> np.uint32(24)
        at = (g * n_rows + k) * n_cols + n
        put_row(out, at, value(b0, k, n, e, scales, n_srows, n_scols, n_cols),
                value(b1, k, n + 1, e, scales, n_srows, n_scols, n_cols),
                value(b2, k, n + 2, e, scales, n_srows, n_scols, n_cols),
                value(b3, k, n + 3, e, scales, n_srows, n_scols, n_cols))
        if mx:  # the high nibbles: row k + 1
            s4 = np.uint32(4)
            put_row(out, at + n_cols,
                    value(b0 >> s4, k, n, e, scales, n_srows, n_scols, n_cols),
                    value(b1 >> s4, k, n + 1, e, scales, n_srows, n_scols, n_cols),
                    value(b2 >> s4, k, n + 2, e, scales, n_srows, n_scols, n_cols),
                    value(b3 >> s4, k, n + 3, e, scales, n_srows, n_scols, n_cols))

    @dpex.kernel
    def dequantize_bytes_kernel(item: kapi.Item, w, scales, experts, out, n_rows, n_cols,
                                n_srows, n_scols):
        n = item.get_id(0)
        row = item.get_id(1)
        g = item.get_id(2)
        e = experts[g]
        step = 2 if mx else 1
        byte = np.uint32(w[ix((e * (n_rows // step) + row) * n_cols + n)])
        k = row * step
        store(out, (g * n_rows + k) * n_cols + n,
              value(byte, k, n, e, scales, n_srows, n_scols, n_cols))
        if mx:
            store(out, (g * n_rows + k + 1) * n_cols + n,
                  value(byte >> np.uint32(4), k, n, e, scales, n_srows, n_scols, n_cols))

    def launch(w, scales, experts, out, n_rows, n_cols, n_srows, n_scols):
        byte_rows = n_rows // 2 if mx else n_rows
        kernel, width = (dequantize_words_kernel, n_cols // 4) if words else (
            dequantize_bytes_kernel, n_cols)
        call(kernel, dpex.Range(width, byte_rows, experts.shape[0]), w, scales, experts, out,
             n_rows, n_cols, n_srows, n_scols)

    return launch
