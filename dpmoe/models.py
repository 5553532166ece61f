"""MoE blocks of model families, built from a transformers block's ``state_dict``.

``from_state_dict(family, state_dict, config)`` takes the block's tensors as NumPy arrays
(``{name: t.float().numpy()}``, or ``ml_dtypes.bfloat16`` arrays) and its config (the
transformers config object, a dict, or anything with those attributes) and returns an
:class:`dpmoe.MoELayer` that computes what the transformers module computes. dpmoe itself
never imports torch or transformers.

| family | routing | experts | shared expert |
| --- | --- | --- | --- |
| mixtral | softmax, top-k, always renormalized | SiLU, w13 halves | none |
| qwen2_moe | softmax, top-k, ``norm_topk_prob`` | SiLU | gated by sigmoid(x @ shared_expert_gate) |
| olmoe | softmax, top-k, ``norm_topk_prob`` | SiLU | none |
| deepseek_v3 | sigmoid, grouped top-k with ``e_score_correction_bias``, ``n_group``, ``topk_group``, ``norm_topk_prob``, ``routed_scaling_factor`` | SiLU | always added |
| gpt_oss | top-k on logits (router has a bias), then softmax over the k | swigluoai (interleaved gate/up, alpha, limit), biases | none |

Weights layouts in transformers 5: ``experts.gate_up_proj`` [E, 2I, H] (gate rows first) and
``experts.down_proj`` [E, H, I], applied as ``x @ W^T``; GPT-OSS keeps
``gate_up_proj`` [E, H, 2I] (interleaved) and ``down_proj`` [E, I, H], applied as ``x @ W``.

Quantized checkpoints are taken as they are stored (:mod:`dpmoe.quant`, never
dequantised): GPT-OSS's MXFP4 ``experts.gate_up_proj_blocks`` [E, 2I, H/32, 16] with
``experts.gate_up_proj_scales`` [E, 2I, H/32] and ``experts.down_proj_blocks`` /
``_scales`` (instead of ``gate_up_proj`` / ``down_proj``; the biases stay float), and
DeepSeek-V3's FP8 experts per expert, ``experts.{e}.gate_proj.weight`` [I, H]
float8_e4m3fn (or its uint8 bits) with ``experts.{e}.gate_proj.weight_scale_inv``
[ceil(I/128), ceil(H/128)], likewise ``up_proj`` and ``down_proj``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from . import quant
from .layer import MoELayer
from .layouts import from_gate_up_proj, from_w13

FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss")


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _need(state: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in state:
        raise ValueError(f"state_dict has no {name!r} (keys: {sorted(state)})")
    return np.asarray(state[name])


def _bytes(a: np.ndarray) -> np.ndarray:
    """One-byte elements (float8 or uint8) as their uint8 bits; others as they are (and
    refused by the FP8 constructor)."""
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a


def _fp8_experts(state: Mapping[str, np.ndarray], name: str) -> quant.QuantizedExperts:
    """The FP8 experts ``experts.{e}.{name}.weight`` [out, in] with their
    ``weight_scale_inv``, stacked (bytes only) into dpmoe's [E, in, out] layout."""
    count = 0
    while f"experts.{count}.{name}.weight" in state:
        count += 1
    # as bytes: stacking uint8 bits with float8 arrays would convert the bits by value
    weights = np.stack([_bytes(_need(state, f"experts.{e}.{name}.weight"))
                        for e in range(count)])
    scales = np.stack([_need(state, f"experts.{e}.{name}.weight_scale_inv") for e in range(count)])
    return quant.from_fp8_checkpoint(weights, scales)


def from_state_dict(family: str, state_dict: Mapping[str, np.ndarray], config: Any,
                    device: Any = None) -> MoELayer:
    """An :class:`MoELayer` equal to a transformers MoE block of ``family`` (see above)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    top_k = int(_get(config, "num_experts_per_tok"))
    if family == "gpt_oss":
        if "experts.gate_up_proj_blocks" in state_dict:  # MXFP4, as the checkpoint stores it
            gate, up = quant.split_interleaved(quant.from_mxfp4_checkpoint(
                _need(state_dict, "experts.gate_up_proj_blocks"),
                _need(state_dict, "experts.gate_up_proj_scales")))
            down = quant.from_mxfp4_checkpoint(_need(state_dict, "experts.down_proj_blocks"),
                                               _need(state_dict, "experts.down_proj_scales"))
        else:
            gate, up, down = from_gate_up_proj(_need(state_dict, "experts.gate_up_proj"),
                                               _need(state_dict, "experts.down_proj"))
        biases = _need(state_dict, "experts.gate_up_proj_bias")
        return MoELayer.from_numpy(
            _need(state_dict, "router.weight").T, gate, up, down, top_k, device=device,
            router_bias=_need(state_dict, "router.bias"), scoring="softmax_after_topk",
            activation="swigluoai", alpha=float(_get(config, "swiglu_alpha", 1.702)),
            limit=float(_get(config, "swiglu_limit", 7.0)), gate_bias=biases[:, ::2],
            up_bias=biases[:, 1::2], down_bias=_need(state_dict, "experts.down_proj_bias"))

    if "experts.0.gate_proj.weight_scale_inv" in state_dict:  # FP8 experts, one by one
        gate, up, down = (_fp8_experts(state_dict, name)
                          for name in ("gate_proj", "up_proj", "down_proj"))
    else:
        gate, up, down = from_w13(_need(state_dict, "experts.gate_up_proj"),
                                  _need(state_dict, "experts.down_proj"))
    router = _need(state_dict, "gate.weight").T
    renormalize = True if family == "mixtral" else bool(_get(config, "norm_topk_prob", False))
    options: dict[str, Any] = {}
    if family == "qwen2_moe":
        prefix = "shared_expert"
        options["shared_expert_gate"] = _need(state_dict, "shared_expert_gate.weight").T
    elif family == "deepseek_v3":
        prefix = "shared_experts"
        options.update(scoring="sigmoid", num_expert_group=int(_get(config, "n_group", 1)),
                       topk_group=int(_get(config, "topk_group", 1)),
                       correction_bias=_need(state_dict, "gate.e_score_correction_bias"),
                       routed_scaling_factor=float(_get(config, "routed_scaling_factor", 1.0)))
    else:
        prefix = None
    if prefix is not None and f"{prefix}.gate_proj.weight" in state_dict:
        def shared(name: str) -> np.ndarray:
            """[in, out] float; an FP8 shared expert (DeepSeek-V3's checkpoints) dequantised
            to float32: dpmoe keeps the shared expert in float."""
            weight = _need(state_dict, f"{prefix}.{name}.weight")
            if f"{prefix}.{name}.weight_scale_inv" not in state_dict:
                return weight.T
            scales = _need(state_dict, f"{prefix}.{name}.weight_scale_inv")
            return quant.from_fp8_checkpoint(_bytes(weight), scales).dequantize()[0]

        options.update(shared_gate_proj=shared("gate_proj"), shared_up_proj=shared("up_proj"),
                       shared_down_proj=shared("down_proj"))
    return MoELayer.from_numpy(router, gate, up, down, top_k, renormalize, device, **options)
