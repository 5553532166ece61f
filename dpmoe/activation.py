"""Gated activations between the two expert GEMMs: ``act(gate) * up`` with SiLU (the
default), exact or tanh GELU, or GPT-OSS's clamped SwiGLU on interleaved gate/up."""

from __future__ import annotations

from typing import Any

from . import reference, validation
from ._dispatch import call, host, write_back
from .arrays import empty, flat, to_device
from .device import is_device_array
from .validation import ACTIVATIONS

__all__ = ["ACTIVATIONS", "act_and_mul", "gelu_and_mul", "gelu_tanh_and_mul", "silu_and_mul",
           "silu_and_mul_moe", "swigluoai_and_mul"]


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
    validation.writable("gate_output", gate_output, "silu_and_mul_moe writes it in place")
    # a contiguous dpnp gate_output is its own storage: the kernel writes straight into it
    in_place = is_device_array(gate_output) and gate_output.flags.c_contiguous

    def on_reference() -> None:
        result = host(gate_output).copy()
        reference.silu_and_mul_moe(result, host(up_output))
        return result

    def on_device(queue: Any) -> Any:
        gate = to_device(gate_output, queue)
        result = gate if in_place else empty(gate.shape, gate_kind, queue)
        if gate_output.size:
            from .kernels.activation import make_silu_and_mul_kernel

            d = gate_output.shape[-1]
            make_silu_and_mul_kernel(gate_kind, up_kind, gate_kind)(
                flat(gate), flat(to_device(up_output, queue)), flat(result),
                gate_output.size // d, d, d, d, 0)
        return None if in_place else result

    result = call({"gate_output": gate_output, "up_output": up_output}, {gate_kind, up_kind},
                  device, on_reference, on_device, gate_kind)
    if result is not None:
        write_back(gate_output, result)


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
        alpha, limit: swigluoai's constants (finite in float32).
        device: where NumPy inputs run.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    alpha = validation.finite_number("alpha", alpha)
    limit = validation.finite_number("limit", limit)
    kind = validation.float_array("x", x)
    if x.ndim == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dimension [..., 2d], got shape {tuple(x.shape)}")
    d = x.shape[-1] // 2
    out_shape = tuple(x.shape[:-1]) + (d,)
    if out is not None:
        validation.output("out", out, out_shape, "[..., d]", kind, not is_device_array(x))

    def on_device(queue: Any) -> Any:
        src = to_device(x, queue)
        dst = empty(out_shape, kind, queue)
        if dst.size:
            from .kernels.activation import make_silu_and_mul_kernel

            interleaved = activation == "swigluoai"
            make_silu_and_mul_kernel(kind, kind, kind, activation, None, 2 if interleaved else 1)(
                flat(src), flat(src), flat(dst), dst.size // d, d, 2 * d, 2 * d,
                1 if interleaved else d, alpha, limit,
            )
        return dst

    result = call({"x": x, "out": out}, {kind}, device,
                  lambda: reference.act_and_mul(host(x), activation, alpha, limit),
                  on_device, kind)
    return result if out is None else write_back(out, result)


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
