"""What the experts are: their weights on one queue (with the derived forms the GEMM
backends want) and the options of their computation (activation, biases, output scale)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import onemkl_host, pages
from ..arrays import as_words, flat, float_kind, to_device
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

    The portable grouped path needs float32 matrices for ``dpnp.matmul``; 16-bit weights
    are widened on first use. oneMKL's host bf16 GEMM (bf16 on a CPU device) needs nothing,
    but reused weights run 2-3x faster packed. ``persistent`` (a layer that reuses its
    weights) keeps those derived forms instead of rebuilding them per call.
    """

    quantized = False

    def __init__(self, gate: Any, up: Any, down: Any, kind: str, queue: Any, persistent: bool):
        self.up, self.down = (to_device(w, queue) for w in (up, down))
        # non-gated experts pass up as gate: one device copy (and one of each derived form)
        # serves both, and the grouped path skips the gate product
        self.gated = gate is not up
        self.gate = to_device(gate, queue) if self.gated else self.up
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
        return tuple(self.gate.shape)

    @property
    def queue(self) -> Any:
        return self.gate.sycl_queue

    def gemv_operands(self) -> tuple[tuple[Any, Any, int], tuple[Any, Any, int]]:
        """((gate, up, cols), (down, down, cols)) flat, as the per-token kernels read them:
        16-bit rows of even length as uint32 words (two columns per load, cols = 2)."""
        if self._gemv is None:
            def pairable(w: Any) -> tuple[Any, int]:
                line = flat(w)
                if w.shape[-1] % 2:
                    return line, 1
                if self.kind == "float32":
                    return line, 2
                words = as_words(line)
                return (line, 1) if words is None else (words, 2)

            (gate, cols_g), (up, cols_u) = pairable(self.gate), pairable(self.up)
            if cols_g != cols_u:
                (gate, _), (up, _) = (flat(self.gate), 1), (flat(self.up), 1)
                cols_g = 1
            down, cols_d = pairable(self.down)
            self._gemv = ((gate, up, cols_g), (down, down, cols_d))
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
            up, down = (
                [onemkl_host.pack(flat(w), e * hidden * inter, n, k) for e in range(num_experts)]
                for w, n, k in ((self.up, inter, hidden), (self.down, hidden, inter)))
            gate = up if not self.gated else [onemkl_host.pack(flat(self.gate), e * hidden * inter,
                                                               inter, hidden)
                                              for e in range(num_experts)]
            self._packed = (gate, up, down)
        return self._packed

    def float32(self) -> tuple[Any, Any, Any]:
        if self._float32 is not None:
            return self._float32
        # kept for the object's life: a call's chunks widen once (a layer's: once for good)
        up, down = (widen(w, self.kind) for w in (self.up, self.down))
        self._float32 = (widen(self.gate, self.kind) if self.gated else up, up, down)
        return self._float32
