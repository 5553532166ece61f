"""What the experts are: their weights on one queue (with the derived forms the GEMM
backends want) and the options of their computation (activation, biases, output scale)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import onemkl_host, pages
from ..arrays import as_words, flat, float_kind, to_device, transposed_base
from .convert import widen
from .quantized import QUANT_FORMATS, QuantizedExpertWeights


@dataclass(frozen=True)
class ExpertOptions:
    """What the experts compute besides plain SwiGLU: activation, biases, output scale.

    Immutable: one instance may be shared by calls and layers.
    """

    activation: str = "silu"
    alpha: float = 1.702  # swigluoai
    limit: float = 7.0  # swigluoai
    gate_bias: Any = None  # (E * I) device storage, with up_bias
    up_bias: Any = None
    bias_kind: str | None = None  # storage kind of gate_bias / up_bias
    down_bias: Any = None  # (E * H) device storage
    down_bias_kind: str = "float32"
    scale: float = 1.0  # routed_scaling_factor

    @classmethod
    def on_device(cls, queue: Any, activation: str = "silu", alpha: float = 1.702,
                  limit: float = 7.0, scale: float = 1.0, gate_bias: Any = None,
                  up_bias: Any = None, down_bias: Any = None) -> "ExpertOptions":
        """Options with the (validated) biases copied to ``queue`` in storage form, flat."""
        fields: dict[str, Any] = {}
        if gate_bias is not None:  # the kernels index biases flat
            fields.update(gate_bias=flat(to_device(gate_bias, queue)),
                          up_bias=flat(to_device(up_bias, queue)),
                          bias_kind=float_kind("gate_bias", gate_bias))
        if down_bias is not None:
            fields.update(down_bias=flat(to_device(down_bias, queue)),
                          down_bias_kind=float_kind("down_bias", down_bias))
        return cls(activation=activation, alpha=float(alpha), limit=float(limit),
                   scale=float(scale), **fields)


DEFAULT_OPTIONS = ExpertOptions()
# Packed bf16 weights larger than this many times their bf16 bytes are not made.
PACKED_MAX_RATIO = 4


def orientation(gate: Any, up: Any, down: Any) -> tuple[bool, bool]:
    """Whether (gate and up, down) are transposed views of C-contiguous [E, N, K] arrays,
    which :class:`ExpertWeights` keeps as they lie (quantized containers: never)."""
    first = all(transposed_base(w) is not None for w in (gate, up))
    return (first, transposed_base(down) is not None)


def t_unit(kind: str, k_dim: int) -> tuple[int, Any]:
    """(elements per load, array dtype) of the per-token GEMV over [E, N, K] weights of
    ``kind``: units of 4 elements read as 64-bit words (one for 16-bit kinds, two for
    float32; 2-element float32 units and single float32 elements measured 4-20% slower)
    when K divides into them, else single elements."""
    from ..kernels.numerics import UNIT_ARRAYS

    unit = 4 if k_dim % 4 == 0 else 1
    return unit, UNIT_ARRAYS[(unit, kind)]


def widened_bytes(gemm: str, kind: str, shape: tuple[int, int, int], matrices: int = 3) -> int:
    """Bytes of the float32 copies of 16-bit weights of ``shape`` (E, H, I), ``matrices``
    of them, that backend ``gemm`` makes (``dpnp.matmul`` has no 16-bit GEMM)."""
    num_experts, hidden, inter = shape
    widened = gemm == "dpnp.matmul" and kind in ("float16", "bfloat16")
    return matrices * num_experts * hidden * inter * 4 if widened else 0


def expert_weights(gate: Any, up: Any, down: Any, kind: str, queue: Any,
                   persistent: bool) -> Any:
    """The experts on ``queue``: :class:`ExpertWeights` for float weights, or
    :class:`~dpmoe._engine.quantized.QuantizedExpertWeights` for quantized ones (``kind`` a
    :mod:`dpmoe.quant` format)."""
    if kind in QUANT_FORMATS:
        return QuantizedExpertWeights(gate, up, down, queue, persistent)
    return ExpertWeights(gate, up, down, kind, queue, persistent)


class ExpertWeights:
    """Gate [E, H, I], up [E, H, I] and down [E, I, H] weights on one queue, in storage form.

    Weights given as transposed views of C-contiguous [E, N, K] arrays (gate/up [E, I, H],
    down [E, H, I]: ``x @ W^T``, as checkpoints and PyTorch store them) are kept in that
    orientation, not transposed: ``trans`` says so for (gate and up, down), and every GEMM
    reads them as they lie (the host GEMMs with ``trans_b``, the per-token path with
    :mod:`dpmoe.kernels.gemv_t`, ``dpnp.matmul`` on transposed views).

    The portable grouped path needs float32 matrices for ``dpnp.matmul``; 16-bit weights
    are widened on first use. oneMKL's host bf16 GEMM (bf16 on a CPU device) needs nothing,
    but reused weights run 2-3x faster packed. ``persistent`` (a layer that reuses its
    weights) keeps those derived forms instead of rebuilding them per call.
    """

    quantized = False

    def __init__(self, gate: Any, up: Any, down: Any, kind: str, queue: Any, persistent: bool):
        # non-gated experts pass up as gate: one device copy (and one of each derived form)
        # serves both, and the grouped path skips the gate product
        self.gated = gate is not up
        self.trans = orientation(gate, up, down)
        first = (gate, up) if self.gated else (up,)
        stored = [to_device(transposed_base(w) if self.trans[0] else w, queue) for w in first]
        self.gate, self.up = (stored[0], stored[-1])
        self.down = to_device(transposed_base(down) if self.trans[1] else down, queue)
        self.kind = kind
        self.persistent = persistent
        if persistent:  # weights read for many calls: worth moving onto huge pages now
            for w in (self.up, self.down) + ((self.gate,) if self.gated else ()):
                pages.advise(w, now=True)
        self._float32: tuple | None = None
        self._packed: tuple | None = None
        self._gemv: tuple | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, H, I)."""
        num_experts, rows, cols = self.up.shape
        return (num_experts, cols, rows) if self.trans[0] else (num_experts, rows, cols)

    @property
    def queue(self) -> Any:
        return self.gate.sycl_queue

    def gemv_operands(self) -> tuple[tuple[Any, Any, int], tuple[Any, Any, int]]:
        """((gate, up, unit), (down, down, unit)) flat, as the per-token kernels read them.
        [E, K, N] weights: 16-bit rows as uint64 words (four columns per load, unit = 4;
        measured 3-7% faster than uint32 pairs for bf16, float32 slower) or, of even length,
        uint32 words (unit = 2). [E, N, K] weights (``trans``): as :func:`t_unit` says."""
        if self._gemv is None:
            def pairable(w: Any) -> tuple[Any, int]:
                line = flat(w)
                if self.kind != "float32" and w.shape[-1] % 4 == 0:
                    words = as_words(line, np.uint64)
                    if words is not None:
                        return words, 4
                if w.shape[-1] % 2:
                    return line, 1
                if self.kind == "float32":
                    return line, 2
                words = as_words(line)
                return (line, 1) if words is None else (words, 2)

            def stage(a: Any, b: Any, trans: bool) -> tuple[Any, Any, int]:
                if trans:
                    unit, dtype = t_unit(self.kind, a.shape[-1])
                    words = [as_words(flat(w), dtype) for w in (a, b)]
                    if all(w is not None for w in words):
                        return (*words, unit)
                    return flat(a), flat(b), 1
                (wa, unit_a), (wb, unit_b) = pairable(a), pairable(b)
                if unit_a != unit_b:
                    return flat(a), flat(b), 1
                return wa, wb, unit_a

            self._gemv = (stage(self.gate, self.up, self.trans[0]),
                          stage(self.down, self.down, self.trans[1]))
        return self._gemv

    def derived_bytes(self, gemm: str) -> int:
        """Bytes the next call through backend ``gemm`` (an :class:`ExecutionPlan`'s)
        allocates for derived weights: packed bf16 or widened float32 copies."""
        if gemm == "onemkl-host-bf16":
            if not self.packing_pays() or self._packed is not None:
                return 0
            num_experts, hidden, inter = self.shape
            return num_experts * ((1 + self.gated) * onemkl_host.packed_size(inter, hidden)
                                  + onemkl_host.packed_size(hidden, inter))
        return 0 if self._float32 is not None else widened_bytes(gemm, self.kind, self.shape,
                                                                 2 + self.gated)

    def packing_pays(self) -> bool:
        """Whether packed copies are worth their bytes: for weights reused over calls, and
        not for tiny experts (oneMKL's packed format took 2.4-2.9x the bf16 bytes at the
        benchmark's shapes, but at least about 9 MiB per matrix)."""
        num_experts, hidden, inter = self.shape
        return self.persistent and (onemkl_host.packed_size(inter, hidden)
                                    <= PACKED_MAX_RATIO * 2 * hidden * inter)

    def packed(self) -> tuple[list, list, list] | None:
        """Per expert, gate/up/down in oneMKL's packed bf16 format (None unless
        :meth:`packing_pays`)."""
        if not self.packing_pays():
            return None
        if self._packed is None:
            num_experts, hidden, inter = self.shape
            self.queue.wait()
            trans_first, trans_down = self.trans

            def pack(w: Any, n: int, k: int, trans: bool) -> list:
                return [onemkl_host.pack(flat(w), e * hidden * inter, n, k, trans)
                        for e in range(num_experts)]

            up, down = pack(self.up, inter, hidden, trans_first), pack(self.down, hidden, inter,
                                                                        trans_down)
            gate = pack(self.gate, inter, hidden, trans_first) if self.gated else up
            self._packed = (gate, up, down)
        return self._packed

    def float32(self) -> tuple[Any, Any, Any]:
        """(gate, up, down) as float32, in their stored orientation (see ``trans``)."""
        if self._float32 is not None:
            return self._float32
        # kept for the object's life: a call's chunks widen once (a layer's: once for good)
        up, down = (widen(w, self.kind) for w in (self.up, self.down))
        self._float32 = (widen(self.gate, self.kind) if self.gated else up, up, down)
        return self._float32
