"""MoELayer: a router and experts that live on the device, created once and reused."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import reference, validation
from .arrays import HOST_DTYPE, FLOAT_KINDS, from_device, to_device, to_host, widen
from .device import default_queue, dpnp, fallback, is_device_array
from .fused_moe import ExpertWeights, check_experts, check_memory, run_on_device
from .routing import route_on_device
from .tuning import get_config

class MoELayer:
    """A Mixture-of-Experts block: ``x -> sum_j w_j * expert_{e_j}(x)`` with softmax routing.

    The router ``[H, E]`` (float32) computes logits ``x @ router``; :func:`dpmoe.topk_softmax`
    picks ``top_k`` experts; :func:`dpmoe.fused_moe_forward` runs them. Weights are copied to
    the device once; calling the layer moves only activations.

    Args:
        hidden_size: H.
        intermediate_size: I.
        num_experts: E.
        top_k: experts per token.
        renormalize: scale each token's k routing weights to sum 1 (Mixtral style).
        dtype: expert weight dtype, "float32", "float16" or "bfloat16".
        device: dpctl filter string, SyclDevice or SyclQueue (default device otherwise).
        seed: seed for the random initialisation (normal, scaled by 1/sqrt(fan-in)).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 top_k: int = 2, renormalize: bool = True, dtype: str = "float32",
                 device: Any = None, seed: int | None = None) -> None:
        hidden = validation.positive_int("hidden_size", hidden_size)
        inter = validation.positive_int("intermediate_size", intermediate_size)
        experts = validation.positive_int("num_experts", num_experts)
        dtype_name = np.dtype(dtype).name if str(dtype) != "bfloat16" else "bfloat16"
        if dtype_name not in FLOAT_KINDS:
            raise TypeError(f"dtype must be one of {FLOAT_KINDS}, got {dtype!r}")
        rng = np.random.default_rng(seed)

        def normal(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
            values = rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(fan_in))
            return values.astype(HOST_DTYPE[dtype_name])

        self._setup(normal((hidden, experts), hidden).astype(np.float32),
                    normal((experts, hidden, inter), hidden), normal((experts, hidden, inter), hidden),
                    normal((experts, inter, hidden), inter), top_k, renormalize, device)

    @classmethod
    def from_numpy(cls, router: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                   top_k: int = 2, renormalize: bool = True, device: Any = None) -> "MoELayer":
        """A layer from given weights: router [H, E], gate/up [E, H, I], down [E, I, H]."""
        layer = cls.__new__(cls)
        layer._setup(router, gate, up, down, top_k, renormalize, device)
        return layer

    def _setup(self, router, gate, up, down, top_k, renormalize, device) -> None:
        router_kind = validation.float_array("router", router, 2)
        self.kind = check_experts(gate, up, down)
        num_experts, hidden, inter = gate.shape
        validation.shape("router", router, (hidden, num_experts), "[H, E]")
        self.top_k = validation.positive_int("top_k", top_k, 1, num_experts)
        self.renormalize = bool(renormalize)
        self.hidden_size, self.intermediate_size, self.num_experts = hidden, inter, num_experts
        queue, reason = default_queue(device)
        if queue is not None and self.kind == "float16" and not queue.sycl_device.has_aspect_fp16:
            queue, reason = None, f"{queue.sycl_device.name} has no fp16 support"
        self.queue = queue
        self._fallback_reason = reason
        if queue is None:
            self._host = tuple(to_host(w) for w in (router, gate, up, down))
            return
        self._router = widen(to_device(router, queue), router_kind)
        self._experts = ExpertWeights(gate, up, down, self.kind, queue, persistent=True)

    @property
    def device(self) -> str | None:
        """The filter string of the device the layer computes on (None: NumPy reference)."""
        return None if self.queue is None else self.queue.sycl_device.filter_string

    def weights(self) -> dict[str, np.ndarray]:
        """Host copies of the weights: router, gate, up, down."""
        if self.queue is None:
            return dict(zip(("router", "gate", "up", "down"), self._host))
        e = self._experts
        return {"router": to_host(self._router),
                **{n: from_device(w, self.kind, True) for n, w in zip(("gate", "up", "down"), (e.gate, e.up, e.down))}}

    def route(self, hidden_states: Any) -> tuple[Any, Any]:
        """(topk_weights [T, k] float32, topk_ids [T, k] int32) for ``hidden_states`` [T, H]."""
        x, kind, as_numpy = self._place(hidden_states)
        if self.queue is None:
            logits = x.astype(np.float32) @ self._host[0].astype(np.float32)
            return reference.topk_softmax(logits, self.top_k, self.renormalize)
        weights, ids = self._route(x, kind)
        return (to_host(weights), to_host(ids)) if as_numpy else (weights, ids)

    def __call__(self, hidden_states: Any) -> Any:
        """``hidden_states`` [T, H] (float32/float16/bfloat16) -> [T, H] of the same dtype."""
        x, kind, as_numpy = self._place(hidden_states)
        if self.queue is None:
            h = self._host
            return reference.moe_layer(x, h[0], h[1], h[2], h[3], self.top_k, self.renormalize)
        grouped = get_config(self.num_experts, self.intermediate_size, self.kind,
                             self.queue.sycl_device.name, x.shape[0])["path"] == "grouped"
        check_memory(self.queue, x.shape[0], self._experts.shape, self.top_k, grouped,
                     x_bytes=x.size * x.dtype.itemsize, weight_bytes_to_copy=0,
                     widened_bytes=self._experts.derived_bytes(grouped, kind), what="MoELayer")
        weights, ids = self._route(x, kind)
        # routing already renormalized the weights when asked to
        out = run_on_device(x, kind, self._experts, weights, ids, self.top_k, False, grouped)
        return from_device(out, kind, as_numpy)

    def _place(self, hidden_states: Any) -> tuple[Any, str, bool]:
        """Validated input in storage form where the layer computes, its kind, NumPy-ness."""
        kind = validation.float_array("hidden_states", hidden_states, 2)
        validation.shape("hidden_states", hidden_states,
                         (hidden_states.shape[0], self.hidden_size), "[T, hidden_size]")
        # the routing kernel needs finite logits (NaN compares false with every candidate)
        validation.finite("hidden_states", hidden_states)
        if self.queue is None:
            if is_device_array(hidden_states):
                raise ValueError("hidden_states is a dpnp array but this layer has no device "
                                 f"({self._fallback_reason})")
            fallback(self._fallback_reason)
            return to_host(hidden_states), kind, True
        if is_device_array(hidden_states) and hidden_states.sycl_queue != self.queue:
            raise ValueError(f"hidden_states must be on the layer's queue ({self.device}); "
                             "it is on another queue")
        return to_device(hidden_states, self.queue), kind, not is_device_array(hidden_states)

    def _route(self, x: Any, kind: str) -> tuple[Any, Any]:
        logits = dpnp.matmul(widen(x, kind), self._router)
        return route_on_device(logits, "float32", self.top_k, self.renormalize)
