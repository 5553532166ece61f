"""Conversions between expert weight layouts (NumPy or dpnp arrays in, the same kind out).

- dpmoe / the seed (``x @ W``): gate and up [E, H, I], down [E, I, H];
- vLLM / SGLang (``x @ W^T``): w13 [E, 2I, H] (rows [0, I) gate, [I, 2I) up), w2 [E, H, I];
- GPT-OSS (transformers): gate_up_proj [E, H, 2I] with gate and up interleaved along the last
  axis (gate = [..., ::2], up = [..., 1::2]), down_proj [E, I, H].

Every function returns C-contiguous copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import validation
from .device import dpnp, is_device_array


def _contiguous(a: Any) -> Any:
    return dpnp.ascontiguousarray(a) if is_device_array(a) else np.ascontiguousarray(a)


def _t(a: Any) -> Any:
    return _contiguous(a.transpose((0, 2, 1)) if is_device_array(a) else a.transpose(0, 2, 1))


def from_w13(w13: Any, w2: Any, interleaved: bool = False) -> tuple[Any, Any, Any]:
    """vLLM's ``w13`` [E, 2I, H] and ``w2`` [E, H, I] -> (gate, up [E, H, I], down [E, I, H]).

    ``interleaved``: w13's rows alternate gate, up (GPT-OSS's order) instead of halves.
    """
    validation.array("w13", w13, 3)
    validation.array("w2", w2, 3)
    num_experts, two_inter, hidden = w13.shape
    if two_inter % 2:
        raise ValueError(f"w13 must have shape [E, 2I, H] with an even 2I, got {tuple(w13.shape)}")
    inter = two_inter // 2
    validation.shape("w2", w2, (num_experts, hidden, inter), "[E, H, I]")
    gate, up = (w13[:, ::2], w13[:, 1::2]) if interleaved else (w13[:, :inter], w13[:, inter:])
    return _t(gate), _t(up), _t(w2)


def to_w13(gate: Any, up: Any, down: Any, interleaved: bool = False) -> tuple[Any, Any]:
    """(gate, up [E, H, I], down [E, I, H]) -> vLLM's (w13 [E, 2I, H], w2 [E, H, I])."""
    for name, a in (("gate", gate), ("up", up), ("down", down)):
        validation.array(name, a, 3)
    num_experts, hidden, inter = gate.shape
    validation.shape("up", up, (num_experts, hidden, inter), "[E, H, I] like gate")
    validation.shape("down", down, (num_experts, inter, hidden), "[E, I, H]")
    xp = dpnp if is_device_array(gate) else np
    if interleaved:
        w13 = xp.stack((_t(gate), _t(up)), axis=2).reshape(num_experts, 2 * inter, hidden)
    else:
        w13 = xp.concatenate((_t(gate), _t(up)), axis=1)
    return _contiguous(w13), _t(down)


def from_gate_up_proj(gate_up_proj: Any, down_proj: Any) -> tuple[Any, Any, Any]:
    """GPT-OSS's ``gate_up_proj`` [E, H, 2I] (interleaved) and ``down_proj`` [E, I, H] ->
    (gate, up [E, H, I], down [E, I, H])."""
    validation.array("gate_up_proj", gate_up_proj, 3)
    validation.array("down_proj", down_proj, 3)
    num_experts, hidden, two_inter = gate_up_proj.shape
    if two_inter % 2:
        raise ValueError(f"gate_up_proj must have shape [E, H, 2I], got {tuple(gate_up_proj.shape)}")
    validation.shape("down_proj", down_proj, (num_experts, two_inter // 2, hidden), "[E, I, H]")
    return (_contiguous(gate_up_proj[..., ::2]), _contiguous(gate_up_proj[..., 1::2]),
            _contiguous(down_proj))
