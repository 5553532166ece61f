"""Gated activations between the two expert GEMMs: ``act(gate) * up`` with SiLU (the
default), exact or tanh GELU, or GPT-OSS's clamped SwiGLU on interleaved gate/up."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import reference, validation
from .arrays import empty, flat, from_device, to_device, to_host
from .device import is_device_array, placement, returns_numpy


def silu_and_mul_moe(gate_output: Any, up_output: Any, *, device: Any = None) -> None:
    """``gate_output <- silu(gate_output) * up_output``, in place (seed signature).

    Args:
        gate_output: [..., I] float32/float16/bfloat16, overwritten with the result.
        up_output: same shape as ``gate_output``, any of the three float kinds.
        device: where NumPy inputs run.
    """
    gate_kind = validation.float_array("gate_output", gate_output)
    up_kind = validation.float_array("up_output", up_output)
    validation.shape("up_output", up_output, tuple(gate_output.shape), "gate_output's shape")
    if gate_output.ndim == 0:
        raise ValueError("gate_output must have at least one dimension [..., I]")
    if isinstance(gate_output, np.ndarray) and not gate_output.flags.writeable:
        raise ValueError("gate_output is read-only; silu_and_mul_moe writes it in place")
    arrays = {"gate_output": gate_output, "up_output": up_output}
    queue = placement(arrays, {gate_kind, up_kind}, device)
    if queue is None:
        reference.silu_and_mul_moe(gate_output, to_host(up_output))
        return
    if gate_output.size == 0:
        return
    from .kernels.activation import make_silu_and_mul_kernel

    d = gate_output.shape[-1]
    gate = to_device(gate_output, queue)
    # a contiguous dpnp gate_output is its own storage: the kernel writes straight into it
    in_place = is_device_array(gate_output) and gate_output.flags.c_contiguous
    result = gate if in_place else empty(gate.shape, gate_kind, queue)
    make_silu_and_mul_kernel(gate_kind, up_kind, gate_kind)(
        flat(gate), flat(to_device(up_output, queue)), flat(result),
        gate_output.size // d, d, d, d, 0,
    )
    if not in_place:
        back = from_device(result, gate_kind, returns_numpy({"gate_output": gate_output}))
        gate_output[...] = back


ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swigluoai")


def act_and_mul(x: Any, activation: str = "silu", out: Any = None, *, alpha: float = 1.702,
                limit: float = 7.0, device: Any = None) -> Any:
    """A gated activation of ``x`` [..., 2d] -> [..., d] in x's dtype.

    "silu", "gelu" (exact, erf) and "gelu_tanh" take gate = ``x[..., :d]`` and up =
    ``x[..., d:]`` (vLLM's convention) and return ``act(gate) * up``. "swigluoai" (GPT-OSS)
    takes them interleaved, gate = ``x[..., ::2]``, up = ``x[..., 1::2]``, and returns
    ``g * sigmoid(alpha * g) * (u + 1)`` with ``g = min(gate, limit)``,
    ``u = clip(up, -limit, limit)``.

    Args:
        x: [..., 2d] float32/float16/bfloat16.
        activation: one of ``ACTIVATIONS``.
        out: optional [..., d] array of x's dtype to write into (same kind of array as x).
        alpha, limit: swigluoai's constants.
        device: where NumPy inputs run.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, value in (("alpha", alpha), ("limit", limit)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    kind = validation.float_array("x", x)
    if x.ndim == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dimension [..., 2d], got shape {tuple(x.shape)}")
    d = x.shape[-1] // 2
    out_shape = tuple(x.shape[:-1]) + (d,)
    if out is not None:
        validation.output("out", out, out_shape, "[..., d]", kind, not is_device_array(x))
    arrays = {"x": x} if out is None else {"x": x, "out": out}
    queue = placement(arrays, {kind}, device)
    if queue is None:
        result = reference.act_and_mul(to_host(x), activation, alpha, limit)
    else:
        from .kernels.activation import make_silu_and_mul_kernel

        src = to_device(x, queue)
        dst = empty(out_shape, kind, queue)
        if dst.size:
            interleaved = activation == "swigluoai"
            make_silu_and_mul_kernel(kind, kind, kind, activation, None, 2 if interleaved else 1)(
                flat(src), flat(src), flat(dst), dst.size // d, d, 2 * d, 2 * d,
                1 if interleaved else d, alpha, limit,
            )
        result = from_device(dst, kind, returns_numpy({"x": x}))
    if out is None:
        return result
    out[...] = result
    return out


def silu_and_mul(x: Any, out: Any = None, *, device: Any = None) -> Any:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` [..., 2d] (vLLM's convention); see
    :func:`act_and_mul` for the arguments."""
    return act_and_mul(x, "silu", out, device=device)


def gelu_and_mul(x: Any, out: Any = None, *, device: Any = None) -> Any:
    """``gelu(x[..., :d]) * x[..., d:]`` with the exact (erf) GELU; see :func:`act_and_mul`."""
    return act_and_mul(x, "gelu", out, device=device)


def gelu_tanh_and_mul(x: Any, out: Any = None, *, device: Any = None) -> Any:
    """``gelu_tanh(x[..., :d]) * x[..., d:]`` (tanh approximation); see :func:`act_and_mul`."""
    return act_and_mul(x, "gelu_tanh", out, device=device)


def swigluoai_and_mul(x: Any, out: Any = None, alpha: float = 1.702, limit: float = 7.0, *,
                      device: Any = None) -> Any:
    """GPT-OSS's clamped SwiGLU on interleaved gate/up; see :func:`act_and_mul`."""
    return act_and_mul(x, "swigluoai", out, alpha=alpha, limit=limit, device=device)
