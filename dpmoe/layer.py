"""MoELayer: a router, experts and an optional shared expert that live on the device.

``x -> sum_j w_j * expert_{e_j}(x) [+ g(x) * shared(x)]``: the router (``x @ router``, plus
a bias for GPT-OSS) gives logits; a :class:`dpmoe.routing.RoutingSpec` turns them into
(weights, ids); the fused forward's engine runs the experts on the plan it chooses
(:meth:`MoELayer.plan`); a shared expert (a dense MLP) is added, scaled by
``sigmoid(x @ shared_expert_gate)`` when that gate exists (Qwen2-MoE) or always
(DeepSeek). Weights are copied to the device once; calls move only activations.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _fork, memory, reference, validation
from ._engine import forward
from ._engine.convert import narrow, widen
from ._engine.experts import ExpertOptions, ExpertWeights, expert_weights
from ._engine.gemm import dense_matmul
from ._engine.metadata import local_ids
from ._engine.plan import ExecutionPlan, choose
from ._engine.quantized import QUANT_FORMATS
from .arrays import HOST_DTYPE, empty, float_kind, from_device, to_device, to_host
from .device import default_queue, dpnp, fallback, is_device_array, returns_numpy
from .routing import RoutingSpec, route, routing_spec


class MoELayer:
    """A Mixture-of-Experts block on the device (see the module docstring).

    Args:
        hidden_size: H.
        intermediate_size: I of each routed expert.
        num_experts: E.
        top_k: experts per token.
        renormalize: scale each token's k routing weights to sum 1 (Mixtral style).
        dtype: weight dtype, "float32", "float16" or "bfloat16" (or a NumPy/ml_dtypes
            dtype, or an alias such as "bf16").
        device: dpctl filter string, SyclDevice or SyclQueue (default device otherwise).
        seed: seed for the random initialisation (normal, scaled by 1/sqrt(fan-in)).
        shared_expert_intermediate_size: adds a shared expert of that width (0: none).
        shared_expert_gate: the shared expert's output is scaled by
            ``sigmoid(x @ shared_expert_gate)`` (Qwen2-MoE); False adds it as is (DeepSeek).
    """

    # the keyword options of from_numpy
    OPTIONS = ("router_bias", "scoring", "num_expert_group", "topk_group", "correction_bias",
               "routed_scaling_factor", "epsilon", "jitter_eps", "activation", "alpha", "limit",
               "gate_bias", "up_bias", "down_bias", "shared_gate_proj", "shared_up_proj",
               "shared_down_proj", "shared_expert_gate", "identity_experts", "weights_on_input",
               "output_bias", "held_experts")

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 top_k: int = 2, renormalize: bool = True, dtype: Any = "float32",
                 device: Any = None, seed: int | None = None,
                 shared_expert_intermediate_size: int = 0, shared_expert_gate: bool = True) -> None:
        hidden = validation.positive_int("hidden_size", hidden_size)
        inter = validation.positive_int("intermediate_size", intermediate_size)
        experts = validation.positive_int("num_experts", num_experts)
        shared = validation.positive_int("shared_expert_intermediate_size",
                                         shared_expert_intermediate_size, 0)
        kind = validation.dtype_name("dtype", dtype)
        routing_spec(experts, top_k, renormalize)  # refuse a bad top_k before allocating
        queue, _ = default_queue(device)
        itemsize = HOST_DTYPE[kind].itemsize
        weights = (3 * experts * inter + 3 * shared) * hidden
        # host arrays (a float32 draw per tensor, then its dtype), plus their device copies
        memory.check_fits(queue, "MoELayer", {
            f"{kind} weights on the host (drawn in float32)": weights * (itemsize + 4),
            "their device copies": 0 if queue is None else weights * itemsize,
            "router": 2 * hidden * experts * 4})
        rng = np.random.default_rng(seed)

        def normal(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
            values = rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(fan_in))
            return values.astype(HOST_DTYPE[kind], copy=False)

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
    def from_numpy(cls, router: np.ndarray, gate: np.ndarray | None, up: np.ndarray,
                   down: np.ndarray, top_k: int = 2, renormalize: bool = True, device: Any = None,
                   **options: Any) -> "MoELayer":
        """A layer from given weights: router [H, E], gate/up [E, H, I], down [E, I, H]
        (NumPy, :class:`dpmoe.quant.QuantizedExperts`, or dpnp arrays on the layer's device,
        used in place).

        Keyword options: ``router_bias`` [E]; ``scoring`` ("softmax", "softmax_after_topk",
        "sigmoid", "sparsemixer" with ``jitter_eps``, PhiMoE); ``num_expert_group``,
        ``topk_group``, ``correction_bias`` [E], ``routed_scaling_factor`` (grouped routing, :func:`dpmoe.grouped_topk`'s rules);
        ``epsilon`` added to the sum that renormalizes (default: 1e-20 for grouped/sigmoid
        routing, else 0); ``activation``, ``alpha``, ``limit``, ``gate_bias``/``up_bias``
        [E, I], ``down_bias`` [E, H] (experts; a non-gated activation such as "relu2",
        ``down(act(x @ up))``, takes ``gate=None``); ``shared_gate_proj``/``shared_up_proj``
        [H, Is], ``shared_down_proj`` [Is, H] and ``shared_expert_gate`` [H, 1] (shared expert,
        with the experts' activation; ``shared_gate_proj`` None when it is not gated);
        ``identity_experts`` Z: the router has E + Z columns and a slot routed to expert
        ``E + z`` adds ``weight * x`` (zero-computation experts, LongCat-Flash);
        ``weights_on_input``: experts run on ``weight * x`` and their outputs add unweighted
        (Llama 4); ``output_bias`` [H] added once to the block's output (JetMoE);
        ``held_experts`` [E_held] int: a shard that holds only these global experts (gate,
        up, down and their biases are theirs, in that order; the router still covers all E):
        slots routed to other experts add nothing, as with ``fused_moe_forward``'s
        ``expert_map`` (expert parallelism, see :mod:`dpmoe.distributed`); a shared expert
        is added by every shard.
        """
        validation.options("MoELayer.from_numpy", options, cls.OPTIONS)
        layer = cls.__new__(cls)
        layer._setup(router, gate, up, down, top_k, renormalize, device, **options)
        return layer

    def _setup(self, router, gate, up, down, top_k, renormalize, device, *, router_bias=None,
               scoring="softmax", num_expert_group=1, topk_group=1, correction_bias=None,
               routed_scaling_factor=1.0, epsilon=None, jitter_eps=0.0, activation="silu",
               alpha=1.702, limit=7.0, gate_bias=None, up_bias=None, down_bias=None,
               shared_gate_proj=None, shared_up_proj=None, shared_down_proj=None,
               shared_expert_gate=None, identity_experts=0, weights_on_input=False,
               output_bias=None, held_experts=None) -> None:
        validation.float_array("router", router, 2)
        validation.finite("router", router)  # NaN logits would route every token nowhere
        gated = activation not in validation.NON_GATED
        if gated and gate is None:
            raise ValueError(f"gate is None, but activation {activation!r} is gated "
                             f"(non-gated: {validation.NON_GATED})")
        if not gated and gate is not None:
            raise ValueError(f"activation {activation!r} is not gated: pass gate=None")
        if not gated and (gate_bias is not None or up_bias is not None):
            raise ValueError(f"activation {activation!r} is not gated: it takes no gate_bias "
                             "or up_bias")
        # a non-gated layer's engine sees its up weights as gate too (the activation reads
        # only up): the same arrays, not a copy
        gate = up if gate is None else gate
        self.kind = validation.experts(gate, up, down)
        quantized = validation.quantized(gate)
        num_held, hidden, inter = gate.shape
        identity = validation.positive_int("identity_experts", identity_experts, 0)
        self.weights_on_input = validation.flag("weights_on_input", weights_on_input)
        if (identity or self.weights_on_input) and held_experts is not None:
            raise ValueError("identity_experts and weights_on_input are not supported for "
                             "expert shards (held_experts)")
        num_experts = num_held if held_experts is None else router.shape[1]
        validation.shape("router", router, (hidden, num_experts + identity),
                         "[H, E + identity_experts]" if identity else "[H, E]")
        self.hidden_size, self.intermediate_size, self.num_experts = hidden, inter, num_experts
        self.identity_experts = identity
        self.held_experts = validation.held_experts(held_experts, num_held, num_experts)
        self.routing: RoutingSpec = routing_spec(
            num_experts + identity, top_k, renormalize, scoring, num_expert_group, topk_group,
            correction_bias, routed_scaling_factor, epsilon, jitter_eps)
        if router_bias is not None:
            validation.routing_weights("router_bias", router_bias, (num_experts + identity,),
                                       "[E]")
        validation.expert_options(num_held, hidden, inter, activation, gate_bias, up_bias,
                                  down_bias, 1.0, alpha, limit,
                                  validation.ACTIVATIONS + validation.NON_GATED)
        if output_bias is not None:
            validation.float_array("output_bias", output_bias, 1)
            validation.shape("output_bias", output_bias, (hidden,), "[H]")
            validation.finite("output_bias", output_bias)
        self.activation = activation
        shared = {"up": shared_up_proj, "down": shared_down_proj}
        if gated:
            shared["gate"] = shared_gate_proj
        elif shared_gate_proj is not None:
            raise ValueError(f"activation {activation!r} is not gated: the shared expert takes "
                             "no shared_gate_proj")
        if any(v is not None for v in shared.values()) or shared_expert_gate is not None:
            if any(v is None for v in shared.values()):
                raise ValueError(f"{', '.join('shared_' + k + '_proj' for k in shared)} go "
                                 "together")
            # with quantized experts the shared expert stays in float, of one dtype
            shared_kind = (validation.float_array("shared_up_proj", shared_up_proj, 2)
                           if quantized else self.kind)
            for name, a in (("shared_gate_proj", shared_gate_proj), ("shared_up_proj", shared_up_proj),
                            ("shared_down_proj", shared_down_proj)):
                if a is not None and validation.float_array(name, a, 2) != shared_kind:
                    owner = "shared_up_proj's" if quantized else "the experts'"
                    raise TypeError(f"{name} must have {owner} dtype ({shared_kind}), got {a.dtype}")
            width = shared_up_proj.shape[1]
            if shared_gate_proj is not None:
                validation.shape("shared_gate_proj", shared_gate_proj, (hidden, width), "[H, Is]")
            validation.shape("shared_up_proj", shared_up_proj, (hidden, width), "[H, Is]")
            validation.shape("shared_down_proj", shared_down_proj, (width, hidden), "[Is, H]")
            if shared_expert_gate is not None:
                validation.float_array("shared_expert_gate", shared_expert_gate, 2)
                validation.shape("shared_expert_gate", shared_expert_gate, (hidden, 1), "[H, 1]")
                validation.finite("shared_expert_gate", shared_expert_gate)
        given = dict(router=router, router_bias=router_bias, correction_bias=correction_bias,
                     gate=gate, up=up, down=down, gate_bias=gate_bias,
                     up_bias=up_bias, down_bias=down_bias, shared_gate=shared_gate_proj,
                     shared_up=shared_up_proj, shared_down=shared_down_proj,
                     shared_expert_gate=shared_expert_gate, output_bias=output_bias)
        self._alpha, self._limit = float(alpha), float(limit)
        queue, reason = default_queue(device)
        if queue is not None and self.kind == "float16" and not queue.sycl_device.has_aspect_fp16:
            queue, reason = None, f"{queue.sycl_device.name} has no fp16 support"
        # the device copies must fit before any is made (dpnp weights on the layer's queue
        # are used as they are; host copies of them are made only when asked for)
        on_device = sum(a.nbytes for a in given.values()
                        if a is not None and not (is_device_array(a) and a.sycl_queue == queue))
        from_device_copies = sum(a.nbytes for a in given.values() if is_device_array(a))
        memory.check_fits(queue, "MoELayer", {
            "weights copied to the device": on_device if queue is not None else 0,
            "host copies of dpnp weights": from_device_copies if queue is None else 0})
        # dpnp expert and shared-expert matrices on the layer's queue are used in place (a
        # loaded checkpoint's weights are not copied again); the rest is copied: the small
        # arrays to the host once (the device gets float32 copies of them), matrices on
        # another queue to the layer's
        in_place = ("gate", "up", "down", "shared_gate", "shared_up", "shared_down")
        for k, v in given.items():
            if v is None or validation.quantized(v) or not is_device_array(v):
                continue
            if queue is None or k not in in_place:
                given[k] = to_host(v)
            elif v.sycl_queue != queue:
                given[k] = dpnp.asarray(v, sycl_queue=queue)
        if not gated:
            given["gate"] = None
        self._given = given
        # global id -> held id, -1 elsewhere (None: the layer holds every expert)
        self._expert_map = None
        if not np.array_equal(self.held_experts, np.arange(num_experts)):
            self._expert_map = np.full(num_experts, -1, np.int32)
            self._expert_map[self.held_experts] = np.arange(num_held, dtype=np.int32)
        # what the engine reads: identity experts have no weights (-1, added separately)
        routed_map = self._expert_map
        if identity:
            routed_map = np.concatenate([np.arange(num_experts, dtype=np.int32),
                                         np.full(identity, -1, np.int32)])
        self.queue = queue
        self._fallback_reason = reason
        if queue is None:
            return
        h = self._given

        def f32(a: Any) -> Any:  # the small arrays, host copies by now
            return None if a is None else to_device(np.ascontiguousarray(a, np.float32), queue)

        self._router, self._router_bias = f32(h["router"]), f32(h["router_bias"])
        self._correction_bias = f32(h["correction_bias"])
        up = h["up"]
        self._experts = expert_weights(up if h["gate"] is None else h["gate"], up, h["down"],
                                       self.kind, queue, persistent=True)
        self._options = ExpertOptions.on_device(
            queue, activation, alpha, limit, gate_bias=f32(h["gate_bias"]),
            up_bias=f32(h["up_bias"]), down_bias=f32(h["down_bias"]))
        self._shared = None
        if h["shared_up"] is not None:
            up_stack = h["shared_up"][None]
            gate_stack = up_stack if h["shared_gate"] is None else h["shared_gate"][None]
            self._shared = ExpertWeights(gate_stack, up_stack, h["shared_down"][None],
                                         float_kind("shared_up_proj", up_stack), queue,
                                         persistent=True)
            self._shared_options = ExpertOptions(activation=activation, alpha=alpha, limit=limit)
        self._shared_gate = f32(h["shared_expert_gate"])
        self._output_bias = f32(h["output_bias"])
        self._device_map = None if routed_map is None else to_device(routed_map, queue)

    @property
    def _host(self) -> dict[str, Any]:
        """The weights as given, dpnp ones copied to the host (on each access)."""
        return {k: v if v is None or validation.quantized(v) else to_host(v)
                for k, v in self._given.items()}

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
        """Host copies of the weights: router, gate, up, down (and any others given; of a
        shard, its held experts')."""
        return {k: v for k, v in self._host.items() if v is not None}

    def arguments(self) -> dict[str, Any]:
        """The arguments of :meth:`from_numpy` that rebuild this layer:
        ``MoELayer.from_numpy(**layer.arguments(), device=...)``. The weights are read-only
        views of the layer's host copies (copy one to change it)."""
        h, r = self._host, self.routing
        names = {"shared_gate": "shared_gate_proj", "shared_up": "shared_up_proj",
                 "shared_down": "shared_down_proj"}

        def read_only(a: np.ndarray) -> np.ndarray:
            view = a.view()
            view.flags.writeable = False
            return view

        given = {names.get(k, k): v if validation.quantized(v) else read_only(v)
                 for k, v in h.items() if v is not None}
        return dict(given, gate=given.get("gate"), top_k=r.top_k, renormalize=r.renormalize,
                    scoring=r.scoring, num_expert_group=r.num_expert_group,
                    topk_group=r.topk_group, routed_scaling_factor=r.routed_scaling_factor,
                    epsilon=r.epsilon, jitter_eps=r.jitter_eps, activation=self.activation,
                    alpha=self._alpha, limit=self._limit,
                    identity_experts=self.identity_experts,
                    weights_on_input=self.weights_on_input,
                    held_experts=None if self._expert_map is None else self.held_experts)

    def plan(self, num_tokens: int, hidden_dtype: Any = None, path: str = "auto"
             ) -> ExecutionPlan | None:
        """How a call on ``num_tokens`` tokens of ``hidden_dtype`` (default: the weights',
        bfloat16 for quantized weights) runs: path, GEMM backend, layout, chunks
        (``print(layer.plan(T))``); None when the layer has no device."""
        num_tokens = validation.positive_int("num_tokens", num_tokens, 0)
        x_kind = self.tokens_kind(hidden_dtype)
        path = validation.execution_path(path)
        if self.queue is None:
            return None
        if self.weights_on_input:  # each slot's row is a token of its own, routed to one expert
            return choose(self.queue, num_tokens * self.top_k, self._experts.shape, 1, x_kind,
                          self.kind, path, self._experts.trans)
        return choose(self.queue, num_tokens, self._experts.shape, self.top_k, x_kind,
                      self.kind, path, self._experts.trans)

    def tokens_kind(self, hidden_dtype: Any = None) -> str:
        """The storage kind of tokens of ``hidden_dtype``; None: the weights' (bfloat16 for
        quantized weights, whose tokens are float)."""
        if hidden_dtype is not None:
            return validation.dtype_name("hidden_dtype", hidden_dtype)
        return "bfloat16" if self.kind in QUANT_FORMATS else self.kind

    def reference(self, hidden_states: np.ndarray) -> np.ndarray:
        """The same block computed by :mod:`dpmoe.reference` (the oracle of the tests)."""
        r, h = self.routing, self._host
        return reference.moe_block(
            to_host(hidden_states), h, r.top_k, r.renormalize, r.scoring, r.num_expert_group,
            r.topk_group, r.routed_scaling_factor, self.activation, self._alpha, self._limit,
            self._expert_map, epsilon=r.epsilon, jitter_eps=r.jitter_eps,
            identity_experts=self.identity_experts, weights_on_input=self.weights_on_input)

    def route(self, hidden_states: Any) -> tuple[Any, Any]:
        """(topk_weights [T, k] float32, topk_ids [T, k] int32) for ``hidden_states`` [T, H]."""
        kind, as_numpy = self._check(hidden_states)
        if self.queue is None:
            return self._reference_route(to_host(hidden_states))
        x = to_device(hidden_states, self.queue)
        weights, ids = self._route(widen(x, kind))
        return (to_host(weights), to_host(ids)) if as_numpy else (weights, ids)

    def __call__(self, hidden_states: Any, *, path: str = "auto") -> Any:
        """``hidden_states`` [T, H] (float32/float16/bfloat16) -> [T, H] of the same dtype.
        ``path``: "auto" (:meth:`plan`), "grouped" or "per_token"."""
        kind, as_numpy = self._check(hidden_states)
        path = validation.execution_path(path)
        if self.queue is None:
            return self.reference(to_host(hidden_states))
        plan, shared_plan = self._checked_plans(hidden_states, kind, path)
        x = to_device(hidden_states, self.queue)
        x32 = widen(x, kind)
        weights, ids = self._route(x32)
        extras = (self._shared is not None or self.identity_experts
                  or self._output_bias is not None)
        if self.weights_on_input:
            out = self._on_weighted_inputs(plan, x32, kind, weights, ids)
        else:
            out = forward.run(plan, x, kind, self._experts, weights, self._held_ids(ids), False,
                              self._options, "float32" if extras else kind)
        if not (extras or self.weights_on_input):
            return from_device(out, kind, as_numpy)
        if self.identity_experts:  # zero-computation experts: their weight times the token
            identity = weights * (ids >= self.num_experts)
            out += dpnp.sum(identity, axis=1, keepdims=True) * x32
        if self._shared is not None:
            out += self._shared_out(x, kind, x32, shared_plan)
        if self._output_bias is not None:
            out += self._output_bias
        return from_device(narrow(out, kind), kind, as_numpy)

    def _on_weighted_inputs(self, plan: ExecutionPlan, x32: Any, kind: str, weights: Any,
                            ids: Any) -> Any:
        """The routed experts run on ``weight * x`` (one row per slot, rounded to ``kind``
        like the tokens), summed unweighted over each token's slots; float32 [T, H]."""
        num_tokens, hidden = x32.shape
        rows = (x32[:, None, :] * weights[:, :, None]).reshape(num_tokens * self.top_k, hidden)
        ones = empty((rows.shape[0], 1), "float32", self.queue)
        ones.fill(1.0)
        out = forward.run(plan, narrow(rows, kind), kind, self._experts, ones,
                          self._held_ids(ids.reshape(-1, 1)), False, self._options, "float32")
        return dpnp.sum(out.reshape(num_tokens, self.top_k, hidden), axis=1)

    def experts(self, hidden_states: Any, topk_weights: Any, topk_ids: Any, *,
                path: str = "auto") -> Any:
        """The routed experts alone on given routing (no router, no shared expert):
        ``out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x_t)``, weights used as
        given.

        Args:
            hidden_states: [T, H] float32/float16/bfloat16.
            topk_weights: [T, top_k] float weights; topk_ids: [T, top_k] int ids in [0, E).
            path: "auto" (:meth:`plan`), "grouped" or "per_token".

        Returns:
            [T, H] in hidden_states' dtype (NumPy for NumPy input, dpnp otherwise).
        """
        kind, _ = self._check(hidden_states, finite=False)
        if self.weights_on_input:
            raise ValueError("layer.experts() weights the experts' outputs; this layer weights "
                             "their inputs (weights_on_input): call the layer")
        num_tokens = hidden_states.shape[0]
        validation.routing_weights("topk_weights", topk_weights, (num_tokens, self.top_k))
        validation.expert_ids("topk_ids", topk_ids, (num_tokens, self.top_k), self.num_experts)
        path = validation.execution_path(path)
        if self.queue is None:
            h = self._host
            return reference.fused_moe_forward(
                to_host(hidden_states), h["gate"], h["up"], h["down"], to_host(topk_weights),
                to_host(topk_ids), self.top_k, False, activation=self.activation,
                expert_map=self._expert_map,
                gate_bias=h["gate_bias"], up_bias=h["up_bias"], down_bias=h["down_bias"],
                alpha=self._alpha, limit=self._limit)
        for name, a in (("topk_weights", topk_weights), ("topk_ids", topk_ids)):
            if is_device_array(a) and a.sycl_queue != self.queue:
                raise ValueError(f"{name} must be on the layer's queue ({self.device})")
        plan, _ = self._checked_plans(hidden_states, kind, path, shared=False)
        out = forward.run(plan, to_device(hidden_states, self.queue), kind, self._experts,
                          topk_weights, self._held_ids(topk_ids), False, self._options)
        return from_device(out, kind, returns_numpy(
            {"hidden_states": hidden_states, "topk_weights": topk_weights, "topk_ids": topk_ids}))

    def _checked_plans(self, hidden_states: Any, kind: str, path: str, shared: bool = True
                       ) -> tuple[ExecutionPlan, ExecutionPlan | None]:
        """The plans of a call (routed experts, shared expert or None), after a memory check
        of all it allocates (before it does)."""
        plan = self.plan(hidden_states.shape[0], kind, path)
        shared_plan = None
        num_tokens, hidden = hidden_states.shape
        tokens = num_tokens * hidden
        parts = dict(
            tokens_on_the_device=0 if is_device_array(hidden_states) else tokens * HOST_DTYPE[kind].itemsize,
            float32_tokens_and_logits=(tokens + num_tokens * self.num_experts) * 4
            + num_tokens * self.top_k * 8,
            outputs=tokens * 4 * (3 if shared and self._shared is not None else 1),
            weighted_input_rows=tokens * self.top_k * 8 if self.weights_on_input else 0,
            derived_weights=self._experts.derived_bytes(plan.gemm))
        if shared and self._shared is not None:
            shared_plan = choose(self.queue, num_tokens, self._shared.shape, 1, kind, self._shared.kind,
                                 plan.path, self._shared.trans)
            parts["shared_expert_intermediates"] = shared_plan.chunk_bytes
            parts["shared_derived_weights"] = self._shared.derived_bytes(shared_plan.gemm)
        forward.check_memory(plan, self.queue, "MoELayer", **parts)
        return plan, shared_plan

    def _held_ids(self, ids: Any) -> Any:
        """Routed (global) expert ids as ids of the held experts, -1 for the others."""
        return ids if self._device_map is None else local_ids(ids, self._device_map)

    def _shared_out(self, x: Any, kind: str, x32: Any, plan: ExecutionPlan) -> Any:
        """The shared expert as a one-expert MoE whose routing weight is its gate, float32."""
        num_tokens = x.shape[0]
        if self._shared_gate is not None:
            weight = dense_matmul(x32, self._shared_gate)  # sigmoid, in place
            dpnp.negative(weight, out=weight)
            dpnp.exp(weight, out=weight)
            weight += 1.0
            dpnp.reciprocal(weight, out=weight)
        else:
            weight = empty((num_tokens, 1), "float32", self.queue)
            weight.fill(1.0)
        ids = empty((num_tokens, 1), "int32", self.queue)
        ids.fill(0)
        return forward.run(plan, x, kind, self._shared, weight, ids, False,
                           self._shared_options, "float32")

    def _check(self, hidden_states: Any, finite: bool = True) -> tuple[str, bool]:
        """Validates ``hidden_states`` for this layer; its kind and NumPy-ness. Announces
        the fallback when the layer has no device."""
        kind = validation.float_array("hidden_states", hidden_states, 2)
        validation.shape("hidden_states", hidden_states,
                         (hidden_states.shape[0], self.hidden_size), "[T, hidden_size]")
        if finite:  # the routing kernels need finite logits (NaN compares false with all)
            validation.finite("hidden_states", hidden_states)
        if self.queue is None:
            if is_device_array(hidden_states):
                raise ValueError("hidden_states is a dpnp array but this layer has no device "
                                 f"({self._fallback_reason})")
            fallback(self._fallback_reason)
            return kind, True
        _fork.check_device_use("an MoELayer whose weights are on a SYCL device")
        if is_device_array(hidden_states) and hidden_states.sycl_queue != self.queue:
            raise ValueError(f"hidden_states must be on the layer's queue ({self.device}); "
                             "it is on another queue")
        return kind, not is_device_array(hidden_states)

    def _reference_route(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = self._host
        logits = x.astype(np.float32) @ h["router"].astype(np.float32)
        if h["router_bias"] is not None:
            logits = logits + h["router_bias"].astype(np.float32)
        return self.routing.reference(logits, h["correction_bias"])

    def _route(self, x32: Any) -> tuple[Any, Any]:
        logits = dense_matmul(x32, self._router)
        if self._router_bias is not None:
            logits += self._router_bias
        return route(self.routing, logits, "float32", self._correction_bias)
