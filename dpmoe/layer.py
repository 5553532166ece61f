"""MoELayer: a router, experts and an optional shared expert that live on the device.

``x -> sum_j w_j * expert_{e_j}(x) [+ g(x) * shared(x)]``: the router (``x @ router``, plus
a bias for GPT-OSS) gives logits; a routing convention turns them into (weights, ids);
:func:`dpmoe.fused_moe_forward`'s machinery runs the experts; a shared expert (a dense MLP)
is added, scaled by ``sigmoid(x @ shared_expert_gate)`` when that gate exists (Qwen2-MoE)
or always (DeepSeek). Weights are copied to the device once; calls move only activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import reference, validation
from .arrays import FLOAT_KINDS, HOST_DTYPE, empty, flat, from_device, narrow, to_device, to_host, widen
from .device import default_queue, dpnp, fallback, is_device_array
from .fused_moe import (DEFAULT_OPTIONS, ExpertOptions, ExpertWeights, check_expert_options,
                        check_experts, check_memory, run_on_device)
from .grouped_gemm import dense_matmul, host_gemm_kind
from .routing import SCORINGS, route_on_device
from .tuning import get_config

ROUTINGS = SCORINGS + ("sigmoid",)


@dataclass(frozen=True)
class Routing:
    """How router logits become (weights, ids).

    ``scoring``: "softmax" (softmax over all, then top-k), "softmax_after_topk" (GPT-OSS) or
    "sigmoid". With groups (``num_expert_group`` > 1), a ``correction_bias`` or a
    ``routed_scaling_factor`` other than 1, routing is :func:`dpmoe.grouped_topk`'s.
    """

    top_k: int
    renormalize: bool = True
    scoring: str = "softmax"
    num_expert_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    has_correction_bias: bool = False

    @property
    def grouped(self) -> bool:
        return (self.scoring == "sigmoid" or self.num_expert_group > 1 or self.has_correction_bias
                or self.routed_scaling_factor != 1.0)


class MoELayer:
    """A Mixture-of-Experts block on the device (see the module docstring).

    Args:
        hidden_size: H.
        intermediate_size: I of each routed expert.
        num_experts: E.
        top_k: experts per token.
        renormalize: scale each token's k routing weights to sum 1 (Mixtral style).
        dtype: weight dtype, "float32", "float16" or "bfloat16".
        device: dpctl filter string, SyclDevice or SyclQueue (default device otherwise).
        seed: seed for the random initialisation (normal, scaled by 1/sqrt(fan-in)).
        shared_expert_intermediate_size: adds a shared expert of that width (0: none).
        shared_expert_gate: the shared expert's output is scaled by
            ``sigmoid(x @ shared_expert_gate)`` (Qwen2-MoE); False adds it as is (DeepSeek).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 top_k: int = 2, renormalize: bool = True, dtype: str = "float32",
                 device: Any = None, seed: int | None = None,
                 shared_expert_intermediate_size: int = 0, shared_expert_gate: bool = True) -> None:
        hidden = validation.positive_int("hidden_size", hidden_size)
        inter = validation.positive_int("intermediate_size", intermediate_size)
        experts = validation.positive_int("num_experts", num_experts)
        shared = validation.positive_int("shared_expert_intermediate_size",
                                         shared_expert_intermediate_size, 0)
        dtype_name = np.dtype(dtype).name if str(dtype) != "bfloat16" else "bfloat16"
        if dtype_name not in FLOAT_KINDS:
            raise TypeError(f"dtype must be one of {FLOAT_KINDS}, got {dtype!r}")
        rng = np.random.default_rng(seed)

        def normal(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
            values = rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(fan_in))
            return values.astype(HOST_DTYPE[dtype_name])

        extra = {}
        if shared:
            extra = dict(shared_gate_proj=normal((hidden, shared), hidden),
                         shared_up_proj=normal((hidden, shared), hidden),
                         shared_down_proj=normal((shared, hidden), shared))
            if shared_expert_gate:
                extra["shared_expert_gate"] = normal((hidden, 1), hidden).astype(np.float32)
        self._setup(normal((hidden, experts), hidden).astype(np.float32),
                    normal((experts, hidden, inter), hidden), normal((experts, hidden, inter), hidden),
                    normal((experts, inter, hidden), inter), top_k, renormalize, device, **extra)

    @classmethod
    def from_numpy(cls, router: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                   top_k: int = 2, renormalize: bool = True, device: Any = None,
                   **options: Any) -> "MoELayer":
        """A layer from given weights: router [H, E], gate/up [E, H, I], down [E, I, H].

        Keyword options: ``router_bias`` [E]; ``scoring`` ("softmax", "softmax_after_topk",
        "sigmoid"); ``num_expert_group``, ``topk_group``, ``correction_bias`` [E],
        ``routed_scaling_factor`` (grouped routing); ``activation``, ``alpha``, ``limit``,
        ``gate_bias``/``up_bias`` [E, I], ``down_bias`` [E, H] (experts);
        ``shared_gate_proj``/``shared_up_proj`` [H, Is], ``shared_down_proj`` [Is, H] and
        ``shared_expert_gate`` [H, 1] (shared expert).
        """
        layer = cls.__new__(cls)
        layer._setup(router, gate, up, down, top_k, renormalize, device, **options)
        return layer

    def _setup(self, router, gate, up, down, top_k, renormalize, device, *, router_bias=None,
               scoring="softmax", num_expert_group=1, topk_group=1, correction_bias=None,
               routed_scaling_factor=1.0, activation="silu", alpha=1.702, limit=7.0,
               gate_bias=None, up_bias=None, down_bias=None, shared_gate_proj=None,
               shared_up_proj=None, shared_down_proj=None, shared_expert_gate=None) -> None:
        validation.float_array("router", router, 2)
        self.kind = check_experts(gate, up, down)
        num_experts, hidden, inter = gate.shape
        validation.shape("router", router, (hidden, num_experts), "[H, E]")
        self.hidden_size, self.intermediate_size, self.num_experts = hidden, inter, num_experts
        if scoring not in ROUTINGS:
            raise ValueError(f"scoring must be one of {ROUTINGS}, got {scoring!r}")
        self.routing = Routing(
            validation.positive_int("top_k", top_k, 1, num_experts), bool(renormalize), scoring,
            validation.positive_int("num_expert_group", num_expert_group, 1, min(64, num_experts)),
            validation.positive_int("topk_group", topk_group, 1, num_expert_group),
            float(routed_scaling_factor), correction_bias is not None)
        if num_experts % num_expert_group:
            raise ValueError(f"num_expert_group must divide num_experts {num_experts}")
        if self.routing.grouped and scoring == "softmax_after_topk":
            raise ValueError("softmax_after_topk routing takes no groups, bias or scaling")
        for name, bias in (("router_bias", router_bias), ("correction_bias", correction_bias)):
            if bias is not None:
                validation.routing_weights(name, bias, (num_experts,))
        check_expert_options(num_experts, hidden, inter, activation, gate_bias, up_bias, down_bias,
                      1.0, None, alpha, limit)
        self.activation = activation
        shared = {"gate": shared_gate_proj, "up": shared_up_proj, "down": shared_down_proj}
        if any(v is not None for v in shared.values()) or shared_expert_gate is not None:
            if any(v is None for v in shared.values()):
                raise ValueError("shared_gate_proj, shared_up_proj and shared_down_proj go together")
            for name, a in (("shared_gate_proj", shared_gate_proj), ("shared_up_proj", shared_up_proj),
                            ("shared_down_proj", shared_down_proj)):
                if validation.float_array(name, a, 2) != self.kind:
                    raise TypeError(f"{name} must have the experts' dtype ({self.kind}), got {a.dtype}")
            width = shared_gate_proj.shape[1]
            validation.shape("shared_gate_proj", shared_gate_proj, (hidden, width), "[H, Is]")
            validation.shape("shared_up_proj", shared_up_proj, (hidden, width), "[H, Is]")
            validation.shape("shared_down_proj", shared_down_proj, (width, hidden), "[Is, H]")
            if shared_expert_gate is not None:
                validation.float_array("shared_expert_gate", shared_expert_gate, 2)
                validation.shape("shared_expert_gate", shared_expert_gate, (hidden, 1), "[H, 1]")
        self._host = {k: None if v is None else to_host(v) for k, v in dict(
            router=router, router_bias=router_bias, correction_bias=correction_bias, gate=gate,
            up=up, down=down, gate_bias=gate_bias, up_bias=up_bias, down_bias=down_bias,
            shared_gate=shared_gate_proj, shared_up=shared_up_proj, shared_down=shared_down_proj,
            shared_expert_gate=shared_expert_gate).items()}
        self._alpha, self._limit = float(alpha), float(limit)
        queue, reason = default_queue(device)
        if queue is not None and self.kind == "float16" and not queue.sycl_device.has_aspect_fp16:
            queue, reason = None, f"{queue.sycl_device.name} has no fp16 support"
        self.queue = queue
        self._fallback_reason = reason
        if queue is None:
            return
        h = self._host

        def f32(a: Any) -> Any:
            return None if a is None else dpnp.asarray(np.ascontiguousarray(a, np.float32), sycl_queue=queue)

        self._router, self._router_bias = f32(h["router"]), f32(h["router_bias"])
        self._correction_bias = f32(h["correction_bias"])
        self._experts = ExpertWeights(gate, up, down, self.kind, queue, persistent=True)
        self._options = ExpertOptions(activation=activation, alpha=self._alpha, limit=self._limit)
        if gate_bias is not None:  # the kernels index biases flat
            self._options.gate_bias = flat(f32(h["gate_bias"]))
            self._options.up_bias = flat(f32(h["up_bias"]))
            self._options.bias_kind = "float32"
        if down_bias is not None:
            self._options.down_bias = flat(f32(h["down_bias"]))
        self._shared = None
        if h["shared_gate"] is not None:
            as_stack = [h["shared_gate"][None], h["shared_up"][None], h["shared_down"][None]]
            self._shared = ExpertWeights(*as_stack, self.kind, queue, persistent=True)
        self._shared_gate = f32(h["shared_expert_gate"])

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def renormalize(self) -> bool:
        return self.routing.renormalize

    @property
    def device(self) -> str | None:
        """The filter string of the device the layer computes on (None: NumPy reference)."""
        return None if self.queue is None else self.queue.sycl_device.filter_string

    def weights(self) -> dict[str, np.ndarray]:
        """Host copies of the weights: router, gate, up, down (and any others given)."""
        return {k: v for k, v in self._host.items() if v is not None}

    def reference(self, hidden_states: np.ndarray) -> np.ndarray:
        """The same block computed by :mod:`dpmoe.reference` (the oracle of the tests)."""
        r, h = self.routing, self._host
        return reference.moe_block(
            to_host(hidden_states), h, r.top_k, r.renormalize, r.scoring, r.num_expert_group,
            r.topk_group, r.routed_scaling_factor, self.activation, self._alpha, self._limit)

    def route(self, hidden_states: Any) -> tuple[Any, Any]:
        """(topk_weights [T, k] float32, topk_ids [T, k] int32) for ``hidden_states`` [T, H]."""
        x, kind, as_numpy = self._place(hidden_states)
        if self.queue is None:
            return reference.route_block(x, self._host, *self._routing_args())
        weights, ids = self._route(widen(x, kind))
        return (to_host(weights), to_host(ids)) if as_numpy else (weights, ids)

    def __call__(self, hidden_states: Any) -> Any:
        """``hidden_states`` [T, H] (float32/float16/bfloat16) -> [T, H] of the same dtype."""
        x, kind, as_numpy = self._place(hidden_states)
        if self.queue is None:
            return self.reference(x)
        num_tokens = x.shape[0]
        grouped = get_config(self.num_experts, self.intermediate_size, self.kind,
                             self.queue.sycl_device.name, num_tokens,
                             host_gemm_kind(self.queue, kind, self.kind) is not None
                             )["path"] == "grouped"
        check_memory(self.queue, num_tokens, self._experts.shape, self.top_k, grouped,
                     x_bytes=x.size * x.dtype.itemsize, weight_bytes_to_copy=0,
                     widened_bytes=self._experts.derived_bytes(grouped, kind), what="MoELayer")
        x32 = widen(x, kind)
        weights, ids = self._route(x32)
        out_kind = kind if self._shared is None else "float32"
        out = run_on_device(x, kind, self._experts, weights, ids, self.top_k, False, grouped,
                            self._options, out_kind)
        if self._shared is not None:
            out = narrow(out + self._shared_out(x, kind, x32, grouped), kind)
        return from_device(out, kind, as_numpy)

    def _routing_args(self) -> tuple:
        r = self.routing
        return (r.top_k, r.renormalize, r.scoring, r.num_expert_group, r.topk_group,
                r.routed_scaling_factor)

    def _shared_out(self, x: Any, kind: str, x32: Any, grouped: bool) -> Any:
        """The shared expert as a one-expert MoE whose routing weight is its gate."""
        num_tokens = x.shape[0]
        if self._shared_gate is not None:
            weight = 1.0 / (1.0 + dpnp.exp(-dense_matmul(x32, self._shared_gate)))
        else:
            weight = dpnp.ones((num_tokens, 1), dtype=np.float32, sycl_queue=self.queue)
        ids = dpnp.zeros((num_tokens, 1), dtype=np.int32, sycl_queue=self.queue)
        return run_on_device(x, kind, self._shared, weight, ids, 1, False, grouped,
                             DEFAULT_OPTIONS, "float32")

    def _place(self, hidden_states: Any) -> tuple[Any, str, bool]:
        """Validated input in storage form where the layer computes, its kind, NumPy-ness."""
        kind = validation.float_array("hidden_states", hidden_states, 2)
        validation.shape("hidden_states", hidden_states,
                         (hidden_states.shape[0], self.hidden_size), "[T, hidden_size]")
        # the routing kernels need finite logits (NaN compares false with every candidate)
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

    def _route(self, x32: Any) -> tuple[Any, Any]:
        from .kernels.routing import make_grouped_topk_kernel

        logits = dense_matmul(x32, self._router)
        if self._router_bias is not None:
            logits = logits + self._router_bias
        r = self.routing
        if not r.grouped:
            return route_on_device(logits, "float32", r.top_k, r.renormalize, r.scoring)
        num_tokens = logits.shape[0]
        weights = empty((num_tokens, r.top_k), "float32", self.queue)
        ids = empty((num_tokens, r.top_k), "int32", self.queue)
        if num_tokens:
            bias = self._correction_bias
            make_grouped_topk_kernel("float32", r.scoring == "sigmoid", bias is not None)(
                flat(logits), flat(weights) if bias is None else bias,
                flat(weights), flat(ids), num_tokens, self.num_experts,
                r.num_expert_group, r.topk_group, r.top_k, r.renormalize, 1e-20,
                r.routed_scaling_factor)
        return weights, ids
