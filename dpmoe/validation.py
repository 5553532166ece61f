"""Checks at the public boundary, done once, before any kernel runs.

Every failure is a ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong shape or
value) whose message starts with the argument's name and states what was expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .arrays import BFLOAT16, FLOAT_KINDS, float_kind, host_view
from .device import dpnp, is_device_array

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swigluoai")
# experts without a gate projection: down(act(x @ up)) (Nemotron-H's squared ReLU)
NON_GATED = ("relu2",)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def array(name: str, a: Any, ndim: int | None = None) -> Any:
    """A NumPy or dpnp array of rank ``ndim``."""
    if not (isinstance(a, np.ndarray) or is_device_array(a)):
        if type(a).__module__.split(".")[0] == "torch":
            raise TypeError(
                f"{name} is a torch.Tensor; dpmoe takes NumPy or dpnp arrays: pass "
                f"{name}.numpy() (a CPU tensor; for bfloat16, "
                f"{name}.view(torch.int16).numpy().view(ml_dtypes.bfloat16), or "
                f"{name}.float().numpy())")
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


def finite_number(name: str, value: Any) -> float:
    """A real number that is finite in float32 (the kernels compute in float32)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name} must be finite in float32 (|{name}| <= {FLOAT32_MAX:.4g}), "
                         f"got {value!r}")
    return value


DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "f16": "float16",
                 "fp32": "float32", "f32": "float32", "float": "float32", "single": "float32"}


def dtype_name(name: str, value: Any) -> str:
    """One of FLOAT_KINDS from a dtype, a dtype's name or an alias ("bf16", "fp32", ...)."""
    if isinstance(value, str):
        kind = DTYPE_ALIASES.get(value.lower(), value.lower())
    else:
        try:
            dt = np.dtype(value)
        except TypeError:
            dt = None
        kind = "bfloat16" if dt == BFLOAT16 else (dt.name if dt is not None else None)
    if kind not in FLOAT_KINDS:
        raise TypeError(f"{name} must be one of {FLOAT_KINDS} (aliases: "
                        f"{', '.join(sorted(DTYPE_ALIASES))}), got {value!r}")
    return kind


def writable(name: str, a: Any, what: str) -> None:
    """An array the call may write: not read-only, no two elements in one place."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        raise ValueError(f"{name} is read-only; {what}")
    if any(stride == 0 and size > 1 for stride, size in zip(a.strides, a.shape)):
        raise ValueError(f"{name} has a zero stride (a broadcast view: several elements share "
                         f"memory); {what}")


def quantized(a: Any) -> bool:
    """Whether ``a`` is a :class:`dpmoe.quant.QuantizedExperts`."""
    return getattr(a, "quantized", False) is True


def quantized_experts(gate_weights: Any, up_weights: Any, down_weights: Any) -> str:
    """Gate/up [E, H, I] and down [E, I, H] :class:`dpmoe.quant.QuantizedExperts` of one
    format (each validated when it was made); returns the format."""
    fmt = gate_weights.format
    num_experts, hidden, inter = gate_weights.shape
    for name, w, expected, meaning in (
        ("up_weights", up_weights, (num_experts, hidden, inter), "[E, H, I] like gate_weights"),
        ("down_weights", down_weights, (num_experts, inter, hidden), "[E, I, H]"),
    ):
        if not quantized(w):
            raise TypeError(f"{name} must be quantized like gate_weights ({fmt}), got "
                            f"{type(w).__name__}")
        if w.format != fmt:
            raise TypeError(f"{name} must have gate_weights' format ({fmt}), got {w.format}")
        if tuple(w.shape) != expected:
            raise ValueError(f"{name} must have shape {meaning} = {expected}, got {tuple(w.shape)}")
    return fmt


def experts(gate_weights: Any, up_weights: Any, down_weights: Any) -> str:
    """Gate/up [E, H, I] and down [E, I, H] of one float kind, or quantized experts of one
    format (:mod:`dpmoe.quant`); returns that kind or format."""
    if quantized(gate_weights):
        return quantized_experts(gate_weights, up_weights, down_weights)
    for name, w in (("up_weights", up_weights), ("down_weights", down_weights)):
        if quantized(w):
            raise TypeError(f"{name} is quantized but gate_weights is not: quantize all three")
    kind = float_array("gate_weights", gate_weights, 3)
    num_experts, hidden, inter = gate_weights.shape
    if min(num_experts, hidden, inter) == 0:
        raise ValueError(f"gate_weights must have non-zero [E, H, I], got {tuple(gate_weights.shape)}")
    for name, w, expected, meaning in (
        ("up_weights", up_weights, (num_experts, hidden, inter), "[E, H, I] like gate_weights"),
        ("down_weights", down_weights, (num_experts, inter, hidden), "[E, I, H]"),
    ):
        if float_array(name, w, 3) != kind:
            raise TypeError(f"{name} must have gate_weights' dtype ({gate_weights.dtype}), got {w.dtype}")
        shape(name, w, expected, meaning)
    return kind


def expert_options(num_experts: int, hidden: int, inter: int, activation: Any,
                   gate_bias: Any, up_bias: Any, down_bias: Any, scale: Any, alpha: Any,
                   limit: Any, allowed: tuple[str, ...] = ACTIVATIONS) -> set[str]:
    """The optional expert arguments; returns the float kinds of the biases."""
    if activation not in allowed:
        raise ValueError(f"activation must be one of {allowed}, got {activation!r}")
    for label, value in (("routed_scaling_factor", scale), ("alpha", alpha), ("limit", limit)):
        finite_number(label, value)
    if (gate_bias is None) != (up_bias is None):
        raise ValueError("gate_bias and up_bias must be given together")
    kinds = set()
    for label, bias, expected in (("gate_bias", gate_bias, (num_experts, inter)),
                                  ("up_bias", up_bias, (num_experts, inter)),
                                  ("down_bias", down_bias, (num_experts, hidden))):
        if bias is not None:
            kinds.add(float_array(label, bias, 2))
            shape(label, bias, expected, "[E, I]" if label != "down_bias" else "[E, H]")
    if gate_bias is not None and float_kind("up_bias", up_bias) != float_kind("gate_bias", gate_bias):
        raise TypeError("up_bias must have gate_bias' dtype")
    return kinds


def expert_map(a: Any, num_experts: int) -> int:
    """An expert map (global id -> local id in [-1, E)); returns the number of global ids
    (``num_experts`` without a map)."""
    if a is None:
        return num_experts
    array("expert_map", a, 1)
    if not np.issubdtype(np.dtype(a.dtype), np.integer):
        raise TypeError(f"expert_map must have an integer dtype, got {a.dtype}")
    if a.shape[0] == 0:
        raise ValueError("expert_map must map at least one global expert")
    low, high = min_max(a)
    if low < -1 or high >= num_experts:
        raise ValueError(f"expert_map must hold local ids in [-1, {num_experts}) "
                         f"(-1: not on this device), found {int(low if low < -1 else high)}")
    return a.shape[0]


def options(what: str, given: dict, known: tuple[str, ...]) -> None:
    """Keyword options by name: TypeError naming the unknown ones."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(f"{what} got unknown option(s) {', '.join(unknown)}; it takes "
                        f"{', '.join(known)}")


def held_experts(a: Any, num_held: int, num_experts: int) -> np.ndarray:
    """The global ids of the experts a layer shard holds (int32, in the order given):
    ``num_held`` distinct ids in ``[0, num_experts)``; None means all, in order."""
    if a is None:
        return np.arange(num_experts, dtype=np.int32)
    if is_device_array(a):
        raise TypeError("held_experts must be a host sequence of ints, not a dpnp array")
    ids = np.asarray(a)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise TypeError(f"held_experts must be a 1-D sequence of ints, got {ids.dtype} "
                        f"of shape {ids.shape}")
    if ids.size != num_held:
        raise ValueError(f"held_experts names {ids.size} experts but gate_weights holds "
                         f"{num_held}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"held_experts must hold ids in [0, {num_experts}) (the router's "
                         f"E), found {int(ids.min() if ids.min() < 0 else ids.max())}")
    if np.unique(ids).size != ids.size:
        raise ValueError("held_experts must not name an expert twice")
    return ids.astype(np.int32)


PATHS = ("auto", "grouped", "per_token")


def execution_path(path: Any, use_grouped_topk: Any = True) -> str:
    """One of PATHS; None means the seed's ``use_grouped_topk`` decides (truthy: grouped)."""
    if path is None:
        return "grouped" if use_grouped_topk else "per_token"
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return path


def min_max(a: Any) -> tuple[float, float]:
    if is_device_array(a):
        view = host_view(a)
        if view is None:
            return float(dpnp.min(a)), float(dpnp.max(a))
        a = view
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


def routing_weights(name: str, a: Any, expected_shape: tuple[int, ...],
                    meaning: str = "[num_tokens, top_k]") -> None:
    """Real float weights of shape ``expected_shape``, finite in float32 (the caller
    converts them to float32)."""
    array(name, a, len(expected_shape))
    dt = np.dtype(a.dtype)
    if not (np.issubdtype(dt, np.floating) or dt == BFLOAT16 or (is_device_array(a) and dt == np.uint16)):
        raise TypeError(f"{name} must have a float dtype (float32 preferred), got {dt}")
    shape(name, a, expected_shape, meaning)
    if dt.itemsize > 4 and not is_device_array(a):  # finite in float64 may be inf in float32
        with np.errstate(over="ignore"):
            a = a.astype(np.float32)
    finite(name, a)


def flag(name: str, value: Any) -> bool:
    """A bool (or an int 0/1, NumPy's included)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral)
                                                and int(value) in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def finite(name: str, a: Any) -> None:
    """No NaN or inf in a float array (dpnp uint16 arrays are bfloat16 bits)."""
    if a.size == 0:
        return
    view = host_view(a) if is_device_array(a) else None
    if not is_device_array(a):
        bits = a.view(np.uint16) if a.dtype == BFLOAT16 else None
        ok = bool(np.isfinite(a).all()) if bits is None else bool(((bits & 0x7F80) != 0x7F80).all())
    elif a.dtype == np.uint16:  # all-ones exponent: inf or NaN
        bits = view if view is not None else a
        ok = bool(((bits & 0x7F80) != 0x7F80).all())
    else:
        ok = bool(np.isfinite(view).all()) if view is not None else bool(dpnp.all(dpnp.isfinite(a)))
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
    writable(name, out, "the result is written there")
