"""MoE blocks of transformers model families, from a checkpoint directory or a state dict.

- :func:`from_pretrained` reads one decoder layer's MoE block from a safetensors checkpoint
  directory (:mod:`dpmoe.checkpoint`: memory-mapped, no torch), :func:`all_from_pretrained`
  every MoE layer of the model, :func:`moe_layers` says which layers have one;
- :func:`from_state_dict` takes a block's tensors the user already holds (a transformers
  module's ``state_dict()`` as NumPy arrays) and its config.

Each returns an :class:`dpmoe.MoELayer` that computes what the transformers block computes.
Families differ only in data: where the block lives, what its tensors are called, and how
config.json states its routing (:data:`CONVENTIONS`); everything they compute is a general
option of :meth:`dpmoe.MoELayer.from_numpy`. The README's family table lists them.

Expert tensors are recognised by name and shape in any of the layouts the checkpoints and
modules use: per expert (``experts.{e}.gate_proj.weight`` / ``w1``, ``w3``, ``w2``, [out, in]),
fused ``experts.gate_up_proj`` [E, 2I, H] with ``experts.down_proj`` [E, H, I] (or the
``x @ W`` form [E, H, 2I] / [E, I, H] of GPT-OSS and Llama 4), Granite's ``input_linear`` /
``output_linear``, DBRX's flat ``w1`` / ``v1`` / ``w2`` [E * I, H]; quantized checkpoints as
they are stored (GPT-OSS MXFP4 ``*_blocks`` / ``*_scales``, DeepSeek-V3 FP8 with
``weight_scale_inv``; :mod:`dpmoe.quant`). Float experts keep the orientation they are
stored in (``[out, in]`` matrices become the layer's ``x @ W^T`` weights, copied, never
transposed: see the README's weight orientation).
"""

from __future__ import annotations

import numbers
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from . import memory, pages, quant
from .arrays import empty, float_kind, from_device, host_view
from .checkpoint import Checkpoint, CheckpointError
from .device import default_queue
from .layer import MoELayer


def _get(config: Any, name: str, default: Any = None) -> Any:
    """A config value (a dict, or an object with attributes); DBRX nests its MoE keys in
    ``ffn_config``."""
    value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
    if value is None:
        nested = _get(config, "ffn_config") if name != "ffn_config" else None
        if nested is not None:
            value = _get(nested, name)
    return default if value is None else value


def _typed(config: Any, name: str, default: Any, kind: str) -> Any:
    """A config value that must be an "int", a "number" or a "bool" (config.json's own
    types: no coercion of 2.7 to 2 or of "false" to True); ValueError naming the key."""
    value = _get(config, name, default)
    ok = {"int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool)}[kind](value)
    if not ok:
        raise ValueError(f"config.json: {name} must be a{'n' if kind == 'int' else ''} {kind}, "
                         f"got {value!r}")
    return {"int": int, "number": float, "bool": bool}[kind](value)


def _first(config: Any, names: tuple[str, ...], default: Any = None) -> Any:
    for name in names:
        value = _get(config, name)
        if value is not None:
            return value
    return default


# -- routing conventions, read from config.json ----------------------------------------------

def _softmax(renormalize: Callable[[Any], bool]) -> Callable[[Any], dict]:
    return lambda c: dict(renormalize=renormalize(c))


def _norm(default: bool) -> Callable[[Any], bool]:
    return lambda c: _typed(c, "norm_topk_prob", default, "bool")


def _deepseek(norm_default: bool, scale_key: str = "routed_scaling_factor",
              epsilon: float | None = None) -> Callable[[Any], dict]:
    """Sigmoid scores, selection by score + correction bias (when the block has one) in
    the best groups, renormalized, scaled."""
    def routing(c: Any) -> dict:
        return dict(scoring="sigmoid", renormalize=_typed(c, "norm_topk_prob", norm_default, "bool"),
                    num_expert_group=_typed(c, "n_group", 1, "int"),
                    topk_group=_typed(c, "topk_group", 1, "int"),
                    routed_scaling_factor=_typed(c, scale_key, 1.0, "number"), epsilon=epsilon)
    return routing


def _deepseek_v2(c: Any) -> dict:
    grouped = _get(c, "topk_method", "greedy") == "group_limited_greedy"
    if _get(c, "topk_method", "greedy") not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"deepseek_v2: topk_method {_get(c, 'topk_method')!r} is not "
                         "supported (transformers runs 'greedy' and 'group_limited_greedy')")
    return dict(renormalize=False,
                routed_scaling_factor=_typed(c, "routed_scaling_factor", 1.0, "number"),
                num_expert_group=_typed(c, "n_group", 1, "int") if grouped else 1,
                topk_group=_typed(c, "topk_group", 1, "int") if grouped else 1)


def _dbrx(c: Any) -> dict:
    norm = _get(c, "moe_normalize_expert_weights")
    if norm not in (None, 1, 1.0):
        raise ValueError(f"dbrx: moe_normalize_expert_weights={norm} (an L{norm} norm) is not "
                         "supported; 1 (the sum) and None are")
    return dict(renormalize=norm is not None)


@dataclass(frozen=True)
class Convention:
    """How one family's MoE block is laid out and routed.

    ``blocks``: names of the block inside a decoder layer (checkpoint first, module second);
    ``routing``: config -> routing options of :meth:`MoELayer.from_numpy`; ``activation``:
    the config keys naming it (or a fixed name); ``x_at_w``: fused expert tensors are
    stored for ``x @ W`` ([E, H, 2I], [E, I, H]) instead of ``x @ W^T``; ``interleaved``:
    their gate and up columns alternate; ``sibling_shared``: a shared expert beside the
    block in the decoder layer (its output added to the block's); ``router_bias``,
    ``output_bias``: the names of those tensors in the block, when the family has them.
    """

    blocks: tuple[str, ...]
    routing: Callable[[Any], dict]
    activation: tuple[str, ...] | str = ("hidden_act",)
    x_at_w: bool = False
    interleaved: bool = False
    sibling_shared: str | None = None
    router_bias: str | None = None
    output_bias: str | None = None


_SOFTMAX_AFTER_TOPK = lambda c: dict(scoring="softmax_after_topk")  # noqa: E731
CONVENTIONS: dict[str, Convention] = {
    "mixtral": Convention(("block_sparse_moe", "mlp"), _softmax(lambda c: True)),
    "qwen2_moe": Convention(("mlp",), _softmax(_norm(False))),
    "qwen3_moe": Convention(("mlp",), _softmax(_norm(False))),
    "qwen3_next": Convention(("mlp",), _softmax(_norm(True))),
    "qwen3_5_moe": Convention(("mlp",), _softmax(lambda c: True)),
    "olmoe": Convention(("mlp",), _softmax(_norm(False))),
    "flex_olmo": Convention(("mlp",), _softmax(_norm(False))),
    "hunyuan_v1_moe": Convention(("mlp",), _softmax(lambda c: True)),
    "minimax_m2": Convention(("block_sparse_moe", "mlp"),
                             lambda c: dict(scoring="sigmoid", renormalize=True, epsilon=0.0)),
    "granitemoe": Convention(("block_sparse_moe",), _SOFTMAX_AFTER_TOPK),
    "granitemoeshared": Convention(("block_sparse_moe",), _SOFTMAX_AFTER_TOPK,
                                   sibling_shared="shared_mlp"),
    "jetmoe": Convention(("mlp",), _SOFTMAX_AFTER_TOPK, ("activation_function",),
                         output_bias="bias"),
    "dbrx": Convention(("ffn",), _dbrx, ("ffn_act_fn",)),
    "deepseek_v2": Convention(("mlp",), _deepseek_v2),
    "deepseek_v3": Convention(("mlp",), _deepseek(True)),
    "glm4_moe": Convention(("mlp",), _deepseek(True)),
    "dots1": Convention(("mlp",), _deepseek(False)),
    "exaone_moe": Convention(("mlp",), _deepseek(True)),
    "nemotron_h": Convention(("mixer",), _deepseek(True), ("mlp_hidden_act",)),
    "afmoe": Convention(("mlp",), lambda c: dict(
        scoring="sigmoid", renormalize=True,
        routed_scaling_factor=_typed(c, "route_scale", 1.0, "number"))),
    "lfm2_moe": Convention(("feed_forward",), _deepseek(True, epsilon=1e-6), "silu"),
    "ernie4_5_moe": Convention(("mlp",), lambda c: dict(renormalize=True, epsilon=0.0)),
    "longcat_flash": Convention(("mlp",), lambda c: dict(
        renormalize=False, routed_scaling_factor=_typed(c, "routed_scaling_factor", 1.0, "number"),
        identity_experts=_typed(c, "zero_expert_num", 0, "int"))),
    "llama4": Convention(("feed_forward",), lambda c: dict(
        scoring="sigmoid", renormalize=False, weights_on_input=True), x_at_w=True),
    "phimoe": Convention(("block_sparse_moe", "mlp"), lambda c: dict(
        scoring="sparsemixer", jitter_eps=_typed(c, "router_jitter_noise", 0.01, "number"))),
    "gpt_oss": Convention(("mlp",), lambda c: dict(
        scoring="softmax_after_topk", alpha=_typed(c, "swiglu_alpha", 1.702, "number"),
        limit=_typed(c, "swiglu_limit", 7.0, "number")), "swigluoai", x_at_w=True, interleaved=True,
        router_bias="router.bias"),
}
FAMILIES = tuple(CONVENTIONS)
# config.json model_type -> family (text models of multimodal families)
MODEL_TYPES = {"llama4_text": "llama4", "qwen3_5_moe_text": "qwen3_5_moe"}
# transformers' activation names -> dpmoe's
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "relu2": "relu2", "swigluoai": "swigluoai"}

# tensor names inside a block, first match wins
ROUTER = ("gate.weight", "router.weight", "router.layer.weight", "gate.wg.weight",
          "router.gate.weight", "router.classifier.weight")
CORRECTION_BIAS = ("gate.e_score_correction_bias", "e_score_correction_bias",
                   "moe_statics.e_score_correction_bias",
                   "gate.moe_statics.e_score_correction_bias",
                   "router.e_score_correction_bias", "expert_bias")
PER_EXPERT = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
FUSED = (("experts.gate_up_proj", "experts.down_proj"),
         ("input_linear.weight", "output_linear.weight"))
SHARED = ("shared_expert", "shared_experts", "shared_mlp")


def _activation(convention: Convention, config: Any) -> str:
    if isinstance(convention.activation, str):
        return convention.activation
    name = _first(config, convention.activation, "silu")
    if isinstance(name, Mapping):  # DBRX: {"name": "silu"}
        name = name.get("name", "silu")
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"config.json: activation {name!r} is not supported (dpmoe runs "
                         f"{sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


# -- tensors into dpmoe's layouts --------------------------------------------------------------

class _Block:
    """A block's tensors by relative name (a state dict, or a checkpoint's under a prefix);
    ``where`` names the source in errors."""

    def __init__(self, get: Callable[[str], np.ndarray], names: list[str], where: str) -> None:
        self._get, self.names, self.where = get, set(names), where
        self.label = where.rstrip(". :")  # the block itself, for messages

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise ValueError(f"{self.label}: no tensor {name!r}")
        return np.asarray(self._get(name))

    def first(self, names: tuple[str, ...]) -> str | None:
        return next((n for n in names if n in self.names), None)

    def count(self, pattern: str) -> int:
        """How many ``pattern.format(e)`` exist for e = 0, 1, ..."""
        count = 0
        while pattern.format(count) in self.names:
            count += 1
        return count


def _stack(name: str, mats: list[np.ndarray], queue: Any) -> Any:
    """E matrices [K, N] (host arrays or views, for ``x @ W``) as one [E, K, N] array: on
    ``queue``'s device, filled one expert at a time (no host copy of the whole stack), or on
    the host without a device.

    Checkpoints store each matrix as [N, K] (``x @ W^T``), so the matrices given are mostly
    transposed views: those are copied as stored into an [E, N, K] array, whose transposed
    view is returned (the engine runs on that orientation as it lies: loading is a copy,
    not a transpose)."""
    shapes = {m.shape for m in mats}
    dtypes = {m.dtype for m in mats}
    if len(shapes) != 1 or len(dtypes) != 1:
        raise ValueError(f"{name}: the experts' matrices differ in shape or dtype: "
                         f"{sorted(shapes)}, {sorted(map(str, dtypes))}")
    kind = float_kind(name, mats[0])  # TypeError naming the tensor for other dtypes
    if 0 in mats[0].shape:
        raise ValueError(f"{name}: empty matrices {mats[0].shape}")
    itemsize = mats[0].dtype.itemsize
    rows_contiguous = lambda m: m.strides[-1] == itemsize  # noqa: E731
    if not all(map(rows_contiguous, mats)) and all(rows_contiguous(m.T) for m in mats):
        return _copy_stack([m.T for m in mats], kind, queue).transpose((0, 2, 1))
    return _copy_stack(mats, kind, queue)


def _copy_stack(mats: list[np.ndarray], kind: str, queue: Any) -> Any:
    """Matrices copied as they are into one [E, r, c] array on ``queue`` (on huge pages
    from the first touch), one at a time; NumPy's stack without a device.

    On CPU devices the copies are memcpys into the device memory, one per expert, run on
    as many threads as the process may use (up to 8): a copy into fresh memory is bound by
    the page faults of its destination more than by the bytes, and those run in parallel
    (2 threads loaded a layer at 7.3 against 4.0 GB/s on the project's 2 cores)."""
    if queue is None:
        return np.stack(mats)
    out = empty((len(mats), *mats[0].shape), kind, queue)
    pages.advise(out)
    in_place = host_view(out)
    if in_place is None:
        for e, m in enumerate(mats):
            out.get_array()[e] = np.ascontiguousarray(_bits(m))
        return from_device(out, kind, False)

    def copy(e: int) -> None:
        in_place[e] = _bits(mats[e])

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with ThreadPoolExecutor(max(1, min(cores or 1, 8, len(mats)))) as pool:
        list(pool.map(copy, range(len(mats))))
    return from_device(out, kind, False)


def _bits(m: np.ndarray) -> np.ndarray:
    """A matrix in device storage form (16-bit floats as uint16 bits)."""
    return m.view(np.uint16) if m.dtype.itemsize == 2 else m


def _experts(block: _Block, convention: Convention, num_experts: int | None, queue: Any
             ) -> tuple[Any, Any, Any]:
    """(gate or None, up [E, H, I], down [E, I, H]) of the block."""
    fp8 = "experts.0.gate_proj.weight_scale_inv" in block
    if fp8 or "experts.gate_up_proj_blocks" in block:
        return _quantized_experts(block, fp8)
    for gate_name, up_name, down_name in PER_EXPERT:
        count = block.count("experts.{}.%s.weight" % down_name)
        if count:
            mats = {n: [block[f"experts.{e}.{n}.weight"].T for e in range(count)]
                    for n in (gate_name, up_name, down_name)
                    if f"experts.0.{n}.weight" in block}
            if up_name not in mats:
                raise ValueError(f"{block.label}: experts.0.{down_name}.weight without "
                                 f"experts.0.{up_name}.weight")
            stacked = {n: _stack(f"{block.where}experts.{{e}}.{n}.weight", m, queue)
                       for n, m in mats.items()}
            return stacked.get(gate_name), stacked[up_name], stacked[down_name]
    if "experts.mlp.w1" in block:  # DBRX: [E * I, H] each; w2 is used as h @ w2_e
        w1, v1, w2 = (block[f"experts.mlp.{n}"] for n in ("w1", "v1", "w2"))
        if not w1.ndim == 2 or w1.shape != v1.shape or w1.shape != w2.shape:
            raise ValueError(f"{block.where}experts.mlp.w1, v1 and w2 must have one 2-D shape, "
                             f"got {w1.shape}, {v1.shape}, {w2.shape}")
        if num_experts is None or w1.shape[0] % num_experts:
            raise ValueError(f"{block.label}: experts.mlp.w1 {w1.shape} does not split into "
                             f"{num_experts} experts")
        inter = w1.shape[0] // num_experts
        parts = lambda w: [w[e * inter:(e + 1) * inter] for e in range(num_experts)]  # noqa: E731
        return (_stack(block.where + "experts.mlp.w1", [m.T for m in parts(w1)], queue),
                _stack(block.where + "experts.mlp.v1", [m.T for m in parts(v1)], queue),
                _stack(block.where + "experts.mlp.w2", parts(w2), queue))
    if "experts.up_proj" in block and "experts.gate_up_proj" not in block:  # fused, not gated
        up, down = block["experts.up_proj"], block["experts.down_proj"]
        return (None, _stack(block.where + "experts.up_proj", [w.T for w in up], queue),
                _stack(block.where + "experts.down_proj", [w.T for w in down], queue))
    names = next(((a, b) for a, b in FUSED if a in block), None)
    if names is None:
        raise ValueError(f"{block.label}: no expert tensors found (looked for "
                         f"experts.{{e}}.gate_proj.weight, experts.{{e}}.w1.weight, "
                         f"{', '.join(a for a, _ in FUSED)}, experts.mlp.w1)")
    gate_up, down = block[names[0]], block[names[1]]
    if gate_up.ndim != 3 or down.ndim != 3:
        raise ValueError(f"{block.label}: {names[0]} and {names[1]} must be 3-D, got "
                         f"{gate_up.shape} and {down.shape}")
    if convention.x_at_w:  # [E, H, 2I] and [E, I, H]: already x @ W
        gate_up = gate_up.transpose(0, 2, 1)
        down = down.transpose(0, 2, 1)
    inter = gate_up.shape[1] // 2
    if convention.interleaved:
        gates, ups = gate_up[:, 0::2], gate_up[:, 1::2]
    else:
        gates, ups = gate_up[:, :inter], gate_up[:, inter:]
    return (_stack(block.where + names[0], [w.T for w in gates], queue),
            _stack(block.where + names[0], [w.T for w in ups], queue),
            _stack(block.where + names[1], [w.T for w in down], queue))


def _bytes(a: np.ndarray, name: str) -> np.ndarray:
    """float8_e4m3fn (or its uint8 bits) as uint8 bits; other one-byte kinds (e5m2, int8)
    are refused here, others left to the FP8 constructor's refusal."""
    if a.dtype.itemsize != 1:
        return a
    if a.dtype not in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(np.uint8)):
        raise TypeError(f"{name}: FP8 weights with weight_scale_inv must be float8_e4m3fn, got "
                        f"{a.dtype}")
    return a.view(np.uint8)


def _quantized_experts(block: _Block, fp8: bool) -> tuple[Any, Any, Any]:
    """Quantized experts as stored: DeepSeek-V3's FP8 per expert, or GPT-OSS's MXFP4."""
    if not fp8:
        gate, up = quant.split_interleaved(quant.from_mxfp4_checkpoint(
            block["experts.gate_up_proj_blocks"], block["experts.gate_up_proj_scales"]))
        return gate, up, quant.from_mxfp4_checkpoint(block["experts.down_proj_blocks"],
                                                     block["experts.down_proj_scales"])

    def stacked(name: str) -> quant.QuantizedExperts:
        count = block.count("experts.{}.%s.weight" % name)
        # as bytes: stacking uint8 bits with float8 arrays would convert the bits by value
        weights = np.stack([_bytes(block[f"experts.{e}.{name}.weight"],
                                   f"{block.where}experts.{e}.{name}.weight")
                            for e in range(count)])
        scales = np.stack([block[f"experts.{e}.{name}.weight_scale_inv"] for e in range(count)])
        return quant.from_fp8_checkpoint(weights, scales)

    return stacked("gate_proj"), stacked("up_proj"), stacked("down_proj")


def _shared(block: _Block, sibling: _Block | None, queue: Any) -> dict:
    """The shared expert's options, [in, out] float (an FP8 one dequantised: dpmoe keeps
    the shared expert in float), copied to the device like the experts (nothing of the
    layer stays mapped from the file)."""
    def matrix(source: _Block, name: str, rows: slice = slice(None)) -> Any:
        weight = source[f"{name}.weight"]
        if f"{name}.weight_scale_inv" in source:
            scales = source[f"{name}.weight_scale_inv"]
            return quant.from_fp8_checkpoint(_bytes(weight, f"{source.where}{name}.weight"),
                                             scales).dequantize()[0]
        if weight.ndim != 2:
            raise ValueError(f"{source.where}{name}.weight must be 2-D, got {weight.shape}")
        return _stack(f"{source.where}{name}.weight", [weight[rows].T], queue)[0]

    options: dict[str, Any] = {}
    if sibling is not None and "input_linear.weight" in sibling:  # Granite: [2Is, H] fused
        width = sibling["input_linear.weight"].shape[0] // 2
        return dict(shared_gate_proj=matrix(sibling, "input_linear", slice(0, width)),
                    shared_up_proj=matrix(sibling, "input_linear", slice(width, None)),
                    shared_down_proj=matrix(sibling, "output_linear"))
    prefix = next((p for p in SHARED if f"{p}.up_proj.weight" in block), None)
    if prefix is not None:
        if f"{prefix}.gate_proj.weight" in block:
            options["shared_gate_proj"] = matrix(block, f"{prefix}.gate_proj")
        options.update(shared_up_proj=matrix(block, f"{prefix}.up_proj"),
                       shared_down_proj=matrix(block, f"{prefix}.down_proj"))
    if "shared_expert_gate.weight" in block:
        options["shared_expert_gate"] = block["shared_expert_gate.weight"].T.astype(np.float32)
    return options


def _build(family: str, block: _Block, config: Any, device: Any,
           sibling: _Block | None = None, layer: int | None = None) -> MoELayer:
    """The :class:`MoELayer` of ``family``'s block (tensors in ``block``)."""
    if family not in CONVENTIONS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    convention = CONVENTIONS[family]
    options = dict(convention.routing(config))
    names = [n for n in ("num_experts_per_tok", "moe_topk", "moe_k", "moe_top_k")
             if _get(config, n) is not None]
    if options.get("scoring") == "sparsemixer":
        top_k = 2  # PhiMoE's SparseMixer picks two, whatever num_experts_per_tok says
    elif not names:
        raise ValueError(f"{family}: the config names no num_experts_per_tok")
    else:
        top_k = _get(config, names[0])
        if isinstance(top_k, list):  # Hunyuan: one per layer
            if layer is None or not 0 <= layer < len(top_k):
                raise ValueError(f"config.json: {names[0]} is a list of {len(top_k)}; no entry "
                                 f"for layer {layer}")
            top_k = top_k[layer]
        top_k = _typed({names[0]: top_k}, names[0], None, "int")
    router_name = block.first(ROUTER)
    if router_name is None:
        raise ValueError(f"{block.label}: no router weight (looked for {', '.join(ROUTER)})")
    router = block[router_name]
    if router.ndim != 2:
        raise ValueError(f"{block.where}{router_name} must be 2-D [E, H], got {router.shape}")
    float_kind(f"{block.where}{router_name}", router)
    router = router.astype(np.float32)  # [E (+ identity), H]
    identity = options.get("identity_experts", 0)
    num_experts = router.shape[0] - identity
    configured = [n for n in ("n_routed_experts", "num_local_experts", "num_experts",
                              "moe_num_experts") if _get(config, n) is not None]
    if configured and _typed(config, configured[0], None, "int") != num_experts:
        raise ValueError(f"{block.where}{router_name} has {router.shape[0]} rows, but "
                         f"config.json says {_get(config, configured[0])} experts"
                         + (f" (+ {identity} identity experts)" if identity else ""))
    options["activation"] = _activation(convention, config)
    unsupported = sorted(n for n in block.names if n.endswith("_proj.bias") and "shared" in n
                         or "latent_proj" in n)
    if unsupported:
        raise ValueError(f"{block.where}{unsupported[0]} (shared expert biases, latent "
                         "projections) is not supported")
    bias_name = block.first(CORRECTION_BIAS)
    if bias_name is not None:
        options["correction_bias"] = block[bias_name].reshape(-1).astype(np.float32)
    for option, name in (("router_bias", convention.router_bias),
                         ("output_bias", convention.output_bias)):
        if name is not None and name in block:
            options[option] = block[name].astype(np.float32)
    if "experts.gate_up_proj_bias" in block:
        biases = block["experts.gate_up_proj_bias"]
        if biases.ndim != 2:
            raise ValueError(f"{block.where}experts.gate_up_proj_bias must be 2-D [E, 2I], got "
                             f"{biases.shape}")
        options.update(gate_bias=np.array(biases[:, ::2]), up_bias=np.array(biases[:, 1::2]))
    if "experts.down_proj_bias" in block:
        options["down_bias"] = np.array(block["experts.down_proj_bias"])
    queue, _ = default_queue(device)
    # what the device will hold, checked before the first copy (from_numpy's own check then
    # finds the experts already there)
    memory.check_fits(queue, f"the MoE block {block.label}", {
        "expert weights": sum(block[n].nbytes for n in block.names if n.startswith("experts.")),
        "shared expert": sum(block[n].nbytes for n in block.names if n.startswith(SHARED))})
    gate, up, down = _experts(block, convention, num_experts, queue)
    if up.shape[0] < num_experts:
        raise ValueError(f"{block.label}: {up.shape[0]} experts' weights for {num_experts} "
                         "experts routed")
    if identity and gate is not None and gate.shape[0] > num_experts:
        gate, up = gate[:num_experts], up[:num_experts]  # LongCat stores unused rows
    if up.shape[1] != router.shape[1]:
        raise ValueError(f"{block.label}: the experts' input size {up.shape[1]} is not the "
                         f"router's hidden size {router.shape[1]}")
    options.update(_shared(block, sibling, queue))
    try:
        return MoELayer.from_numpy(router.T, gate, up, down, top_k,
                                   device=device if queue is None else queue,
                                   **{"renormalize": False, **options})
    except (ValueError, TypeError) as e:  # name where the tensors came from
        raise type(e)(f"{block.label}: {e}") from e


def from_state_dict(family: str, state_dict: Mapping[str, np.ndarray], config: Any,
                    device: Any = None) -> MoELayer:
    """An :class:`MoELayer` equal to a transformers MoE block of ``family``.

    Args:
        family: one of :data:`FAMILIES`.
        state_dict: the block's tensors by the names of its module (``{name:
            t.float().numpy()}``) or of its checkpoint; NumPy arrays (bf16 as
            ``ml_dtypes.bfloat16``). A shared expert that sits beside the block in the
            decoder layer (Granite-MoE-shared's ``shared_mlp``) is taken by its names with
            the sibling's prefix (``shared_mlp.input_linear.weight``).
        config: the transformers config (object or dict; config.json's keys).
        device: where the layer computes.
    """
    names = list(state_dict)
    block = _Block(lambda n: state_dict[n], names, "state_dict: ")
    sibling_name = CONVENTIONS.get(family, CONVENTIONS["mixtral"]).sibling_shared
    sibling = None
    if sibling_name is not None:
        prefix = sibling_name + "."
        sibling = _Block(lambda n: state_dict[prefix + n],
                         [n[len(prefix):] for n in names if n.startswith(prefix)],
                         f"state_dict: {prefix}")
    return _build(family, block, config, device, sibling)


# -- checkpoints -------------------------------------------------------------------------------

def _text_config(config: dict) -> dict:
    """The language model's config (multimodal checkpoints nest it in text_config)."""
    text = config.get("text_config")
    return dict(text) if isinstance(text, Mapping) else config


def family_of(config: Mapping) -> str:
    """The family of a config.json (its ``model_type``)."""
    model_type = _text_config(dict(config)).get("model_type", config.get("model_type"))
    family = MODEL_TYPES.get(model_type, model_type)
    if family not in CONVENTIONS:
        raise ValueError(f"model_type {model_type!r} is not a supported MoE family "
                         f"({', '.join(FAMILIES)})")
    return family


def moe_layers(config: Mapping) -> list[int]:
    """The decoder layers that have an MoE block, as config.json says (dense layers by
    ``first_k_dense_replace``, ``mlp_only_layers``/``decoder_sparse_step``,
    ``moe_layers``/``interleave_moe_layer_step``, ``mlp_layer_types``, ``layers_block_type``,
    ``num_dense_layers``, ``moe_layer_interval``/``_start_index``/``_end_index``)."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be config.json's dict, got {type(config).__name__}")
    c = _text_config(dict(config))

    def listed(name: str, kind: type) -> list:
        value = c[name]
        if not (isinstance(value, (list, str)) and all(isinstance(v, kind) and
                                                       not isinstance(v, bool) for v in value)):
            raise ValueError(f"config.json: {name} must be a list of {kind.__name__}, got "
                             f"{value!r}")
        return list(value)

    for name, value in (("mlp_layer_types", "sparse"), ("layers_block_type", "moe"),
                        ("hybrid_override_pattern", "E")):
        if c.get(name) is not None:
            return [i for i, kind in enumerate(listed(name, str)) if kind == value]
    names = [n for n in ("num_hidden_layers", "n_layers", "num_layers") if c.get(n) is not None]
    if not names:
        raise ValueError("config.json gives no number of layers (num_hidden_layers)")
    layers = range(_typed(c, names[0], None, "int"))

    def step(name: str) -> int:
        value = _typed(c, name, 1, "int")
        if value < 1:
            raise ValueError(f"config.json: {name} must be >= 1, got {value}")
        return value

    if c.get("moe_layers") is not None:
        return sorted(set(listed("moe_layers", int)) & set(layers))
    if c.get("interleave_moe_layer_step") is not None:
        every = step("interleave_moe_layer_step")
        return [i for i in layers if (i + 1) % every == 0]
    if c.get("moe_layer_interval") is not None:
        every = step("moe_layer_interval")
        first = _typed(c, "moe_layer_start_index", 0, "int")
        last = _typed(c, "moe_layer_end_index", -1, "int")
        last = len(layers) - 1 if last < 0 else last
        return [i for i in layers if (i + 1) % every == 0 and first <= i <= last]
    if c.get("decoder_sparse_step") is not None or c.get("mlp_only_layers") is not None:
        every = step("decoder_sparse_step")
        dense = set(listed("mlp_only_layers", int)) if c.get("mlp_only_layers") else set()
        return [i for i in layers if i not in dense and (i + 1) % every == 0]
    for name in ("first_k_dense_replace", "num_dense_layers"):
        if c.get(name) is not None:
            return [i for i in layers if i >= _typed(c, name, 0, "int")]
    return list(layers)


# where the decoder layers of a checkpoint live, in the order looked for (a multi-token
# prediction head's `mtp.layers.N.` and a vision tower's blocks are not decoder layers)
LAYER_ROOTS = ("model.layers.", "model.language_model.layers.", "language_model.model.layers.",
               "model.language_model.model.layers.", "backbone.layers.", "transformer.blocks.",
               "model.decoder.layers.", "layers.")


def _block_prefix(checkpoint: Checkpoint, layer: int, blocks: tuple[str, ...]) -> str:
    """Where decoder layer ``layer``'s block lives: ``model.layers.{i}.mlp.``,
    ``backbone.layers.{i}.mixer.``, ``transformer.blocks.{i}.ffn.``,
    ``model.language_model.layers.{i}.mlp.``, ... (:data:`LAYER_ROOTS`, first found)."""
    for root in LAYER_ROOTS:
        for block in blocks:
            prefix = f"{root}{layer}.{block}."
            if checkpoint.names(prefix):
                return prefix
    raise CheckpointError(f"{checkpoint.path}: no {' or '.join(blocks)} tensors of decoder "
                          f"layer {layer} (under {', '.join(LAYER_ROOTS)})")


def from_pretrained(path: str | Checkpoint, layer: int, family: str | None = None,
                    device: Any = None) -> MoELayer:
    """The MoE block of decoder layer ``layer`` of the checkpoint directory ``path``.

    Args:
        path: a directory with config.json and ``model.safetensors`` (or
            ``model.safetensors.index.json`` and its shards).
        layer: the decoder layer (0-based); it must be an MoE layer (:func:`moe_layers`).
        family: one of :data:`FAMILIES` (default: from config.json's ``model_type``).
        device: where the layer computes (default device; NumPy reference without one).

    Only that layer's tensors are read (memory-mapped); the experts go to the device one
    matrix at a time, so building holds at most one expert's matrix besides the layer.
    Errors (a :class:`~dpmoe.checkpoint.CheckpointError` or ``ValueError``) name the
    file and tensor; nothing half-built is returned. No torch is imported.
    """
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint(path)
    config = checkpoint.config
    family = family_of(config) if family is None else family
    if family not in CONVENTIONS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    text = _text_config(config)
    if not isinstance(layer, numbers.Integral) or isinstance(layer, bool):
        raise TypeError(f"layer must be an int, got {layer!r}")
    sparse = moe_layers(config)
    if layer not in sparse:
        raise ValueError(f"layer {layer} of {checkpoint.path} has no MoE block (MoE layers: "
                         f"{sparse})")
    convention = CONVENTIONS[family]
    prefix = _block_prefix(checkpoint, layer, convention.blocks)

    def part(start: str) -> _Block:
        return _Block(lambda n: checkpoint.tensor(start + n),
                      [n[len(start):] for n in checkpoint.names(start)],
                      f"{checkpoint.path}: {start}")

    sibling = None
    if convention.sibling_shared:
        layer_prefix = prefix[:prefix.rstrip(".").rindex(".") + 1]
        sibling = part(f"{layer_prefix}{convention.sibling_shared}.")
    return _build(family, part(prefix), text, device, sibling, layer)


def all_from_pretrained(path: str | Checkpoint, family: str | None = None, device: Any = None
                        ) -> dict[int, MoELayer]:
    """Every MoE block of the checkpoint directory ``path``: {decoder layer: MoELayer}
    (dense layers skipped as config.json says; :func:`from_pretrained` for the rest)."""
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint(path)
    return {i: from_pretrained(checkpoint, i, family, device)
            for i in moe_layers(checkpoint.config)}
