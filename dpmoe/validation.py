"""Checks at the public boundary, done once, before any kernel runs.

Every failure is a ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong shape or
value) whose message starts with the argument's name and states what was expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .arrays import BFLOAT16, float_kind
from .device import dpnp, is_device_array


def array(name: str, a: Any, ndim: int | None = None) -> Any:
    """A NumPy or dpnp array of rank ``ndim``."""
    if not (isinstance(a, np.ndarray) or is_device_array(a)):
        raise TypeError(f"{name} must be a NumPy or dpnp array, got {type(a).__name__}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    return a


def float_array(name: str, a: Any, ndim: int | None = None) -> str:
    """Checks a float32/float16/bfloat16 array; returns its storage kind."""
    array(name, a, ndim)
    return float_kind(name, a)


def shape(name: str, a: Any, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(a.shape)}")


def positive_int(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """An integer in ``[low, high]`` (bools and non-integral floats are refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite integer, got {value}")
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def min_max(a: Any) -> tuple[float, float]:
    if is_device_array(a):
        return float(dpnp.min(a)), float(dpnp.max(a))
    return float(np.min(a)), float(np.max(a))


def expert_ids(name: str, a: Any, expected_shape: tuple[int, ...], num_experts: int) -> None:
    """Integer ids of shape ``expected_shape``, every one in ``[0, num_experts)``.

    An id outside that range would make a kernel read or write out of bounds, so this runs
    before any kernel does.
    """
    array(name, a, len(expected_shape))
    if not np.issubdtype(np.dtype(a.dtype), np.integer):
        raise TypeError(f"{name} must have an integer dtype (int32 or int64), got {a.dtype}")
    shape(name, a, expected_shape, "[num_tokens, top_k]")
    if a.size == 0:
        return
    low, high = min_max(a)
    if low < 0 or high >= num_experts:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name} must hold expert ids in [0, {num_experts}), found {int(bad)}"
        )


def routing_weights(name: str, a: Any, expected_shape: tuple[int, ...]) -> None:
    """Real float weights of shape ``expected_shape`` (converted to float32 by the caller)."""
    array(name, a, len(expected_shape))
    dt = np.dtype(a.dtype)
    if not (np.issubdtype(dt, np.floating) or dt == BFLOAT16 or (is_device_array(a) and dt == np.uint16)):
        raise TypeError(f"{name} must have a float dtype (float32 preferred), got {dt}")
    shape(name, a, expected_shape, "[num_tokens, top_k]")
    finite(name, a)


def finite(name: str, a: Any) -> None:
    """No NaN or inf in a float array (dpnp uint16 arrays are bfloat16 bits)."""
    if a.size == 0:
        return
    if not is_device_array(a):
        ok = bool(np.isfinite(a.astype(np.float32)).all())
    elif a.dtype == np.uint16:
        ok = bool(dpnp.all((a & 0x7F80) != 0x7F80))  # all-ones exponent: inf or NaN
    else:
        ok = bool(dpnp.all(dpnp.isfinite(a)))
    if not ok:
        raise ValueError(f"{name} must be finite (found NaN or inf)")


def output(name: str, out: Any, expected_shape: tuple[int, ...], meaning: str, kind: str,
           numpy_result: bool) -> None:
    """An ``out=`` array: the result's shape and storage kind, writable, and NumPy exactly
    when the result is NumPy (no input was a dpnp array)."""
    if float_array(name, out) != kind:
        raise TypeError(f"{name} must have the result's dtype ({kind}), got {out.dtype}")
    shape(name, out, expected_shape, meaning)
    if is_device_array(out) == numpy_result:
        raise TypeError(f"{name} must be a dpnp array when an input is one, else a NumPy array")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
