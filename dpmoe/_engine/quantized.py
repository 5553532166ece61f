"""Quantized expert weights on a queue (:mod:`dpmoe.quant` formats), as the runners read
them: the format's own bytes and scales, nothing dequantised kept.

The per-token path reads them in place (:func:`gemv_operands`); the grouped path
dequantises a group of experts at a time into a reused buffer (:meth:`dequantize_into`),
at most :func:`dequant_group` experts' gate and up (or down) matrices at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import pages
from ..arrays import as_words, flat, view
from ..pages import upload

QUANT_FORMATS = ("int8", "fp8_block", "mxfp4")
# Bytes of dequantised weights the grouped path holds at once (a group of experts' gate
# and up, then their down): big enough for whole experts of the common shapes.
DEQUANT_BUFFER_BYTES = 64 << 20


def dequant_group(shape: tuple[int, int, int], kind: str) -> int:
    """Experts dequantised together on the grouped path for experts of ``shape`` (E, H, I)
    dequantised to ``kind`` (float32 or bfloat16)."""
    num_experts, hidden, inter = shape
    per_expert = 2 * hidden * inter * (4 if kind == "float32" else 2)
    return max(1, min(num_experts, DEQUANT_BUFFER_BYTES // per_expert))


class QuantizedExpertWeights:
    """Gate [E, H, I], up [E, H, I] and down [E, I, H] as :class:`dpmoe.quant.QuantizedExperts`
    of one format, copied to ``queue`` (data as bytes, scales as given)."""

    quantized = True
    trans = (False, False)  # always dpmoe's [E, K, N] (the checkpoint constructors transpose)

    def __init__(self, gate: Any, up: Any, down: Any, queue: Any, persistent: bool):
        self.kind = gate.format
        self.persistent = persistent
        self._shape = tuple(gate.shape)
        self.gated = gate is not up  # non-gated: up serves as gate, one copy
        self._parts = []
        for q in (up, down) if not self.gated else (gate, up, down):
            data = upload(np.ascontiguousarray(q.data).view(np.uint8).reshape(-1), queue)
            scales = upload(np.ascontiguousarray(q.scales).reshape(-1), queue)
            if persistent:
                pages.advise(data, now=True)
            self._parts.append((data, scales, tuple(q.shape), tuple(q.scales.shape)))
        if not self.gated:
            self._parts.insert(0, self._parts[0])
        self._gemv = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, H, I)."""
        return self._shape

    @property
    def queue(self) -> Any:
        return self._parts[0][0].sycl_queue

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes + s.nbytes for d, s, _, _ in self._parts[1 - self.gated:])

    def derived_bytes(self, gemm: str) -> int:
        return 0  # nothing derived is kept (the grouped path's buffers are intermediates)

    def packing_pays(self) -> bool:
        return False

    def gemv_operands(self) -> tuple:
        """Per matrix (gate, up, down): (bytes as the kernel reads them, scales, columns per
        load, scale rows, scale columns); 4 columns per load as uint32 words when N allows."""
        if self._gemv is None:
            from ..kernels.quant import cols_per_load

            operands = []
            for data, scales, shape, scale_shape in self._parts:
                cols = cols_per_load(self.kind, shape[2])
                words = data if cols == 1 else view(data, (data.size // 4,), np.uint32, 0)
                operands.append((words, scales, cols, scale_shape[1],
                                 scale_shape[2] if len(scale_shape) == 3 else shape[2]))
            self._gemv = tuple(operands)
        return self._gemv

    def column_scales(self, which: int) -> Any:
        """int8: matrix ``which``'s per-column scales [E * N] on the device."""
        return self._parts[which][1]

    def dequantize_into(self, which: int, experts: Any, out: Any, out_kind: str,
                        codes_only: bool = False) -> None:
        """``out`` [len(experts), K, N] (storage form of ``out_kind``) <- matrix ``which``
        (0 gate, 1 up, 2 down) of the experts whose ids ``experts`` (int32 device) holds;
        ``codes_only`` (int8): the codes, unscaled (exact in bf16)."""
        from ..kernels.quant import make_dequantize_kernel

        data, scales, shape, scale_shape = self._parts[which]
        _, n_rows, n_cols = shape
        target = flat(out)
        # codes read as uint32 words, bf16 results written as uint64 words: 2.4x (int8) and
        # 1.6x (fp8) faster at olmoe's prefill than bytes; mxfp4's words (two rows of four
        # columns) ran 6x slower than its bytes, which it keeps
        words = n_cols % 4 == 0 and self.kind != "mxfp4"
        if words and out_kind == "bfloat16":
            target = as_words(target, np.uint64)
            words = target is not None
            target = target if words else flat(out)
        if words:
            data = view(data, (data.size // 4,), np.uint32, 0)
        fmt = "int8_codes" if codes_only else self.kind
        make_dequantize_kernel(fmt, out_kind, words)(
            data, scales, experts, target, n_rows, n_cols, scale_shape[1],
            scale_shape[2] if len(scale_shape) == 3 else n_cols)
