"""Tiny random checkpoints of every supported transformers MoE family (needs torch and
transformers: the ``compat`` extra), and their MoE blocks' outputs computed by transformers.

``make(family, folder)`` saves a float32 and a bfloat16 checkpoint (sharded: several files
and an index) and returns the inputs and transformers' outputs of one MoE layer's block.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL = dict(vocab_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)
DEEPSEEK_ATTENTION = dict(kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
                          v_head_dim=8)
LINEAR_ATTENTION = dict(head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                        linear_key_head_dim=16, linear_value_head_dim=16)

# family -> (config.json model_type, config kwargs, an MoE layer); hidden 32 or 64, 4-8
# experts, expert widths not multiples of 16, a dense layer where the family has them
ZOO = {
    "mixtral": ("mixtral", dict(hidden_size=32, num_hidden_layers=2, intermediate_size=24,
                                num_local_experts=4, num_experts_per_tok=2), 1),
    "qwen2_moe": ("qwen2_moe", dict(hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                                    moe_intermediate_size=20, shared_expert_intermediate_size=40,
                                    num_experts=6, num_experts_per_tok=2, mlp_only_layers=[0],
                                    norm_topk_prob=False), 1),
    "qwen3_moe": ("qwen3_moe", dict(hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                                    moe_intermediate_size=20, num_experts=6, num_experts_per_tok=2,
                                    mlp_only_layers=[0], norm_topk_prob=True, head_dim=8), 1),
    "qwen3_next": ("qwen3_next", dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                                      layer_types=["linear_attention", "full_attention"],
                                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                                      shared_expert_intermediate_size=40, mlp_only_layers=[0],
                                      norm_topk_prob=True, **LINEAR_ATTENTION), 1),
    "qwen3_5_moe": ("qwen3_5_moe_text", dict(hidden_size=64, num_hidden_layers=2,
                                             layer_types=["linear_attention", "full_attention"],
                                             num_experts=8, num_experts_per_tok=2,
                                             moe_intermediate_size=24,
                                             shared_expert_intermediate_size=40,
                                             **LINEAR_ATTENTION), 1),
    "olmoe": ("olmoe", dict(hidden_size=32, num_hidden_layers=2, intermediate_size=20, num_experts=6,
                            num_experts_per_tok=2, norm_topk_prob=False, pad_token_id=1,
                            eos_token_id=2), 0),
    "flex_olmo": ("flex_olmo", dict(hidden_size=32, num_hidden_layers=2, intermediate_size=20,
                                    num_experts=5, num_experts_per_tok=2, norm_topk_prob=True,
                                    pad_token_id=1, eos_token_id=2), 1),
    "deepseek_v2": ("deepseek_v2", dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                                        n_routed_experts=8, num_experts_per_tok=2,
                                        n_shared_experts=2, moe_intermediate_size=24,
                                        first_k_dense_replace=1,
                                        topk_method="group_limited_greedy", n_group=4,
                                        topk_group=2, routed_scaling_factor=1.5,
                                        **DEEPSEEK_ATTENTION), 1),
    "deepseek_v3": ("deepseek_v3", dict(hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                                        moe_intermediate_size=20, n_routed_experts=8,
                                        n_shared_experts=1, num_experts_per_tok=3, n_group=4,
                                        topk_group=2, first_k_dense_replace=1,
                                        routed_scaling_factor=2.5, norm_topk_prob=True,
                                        **DEEPSEEK_ATTENTION), 1),
    "glm4_moe": ("glm4_moe", dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                                  head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                                  moe_intermediate_size=24, n_shared_experts=1, n_group=2,
                                  topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                                  norm_topk_prob=True), 1),
    "dots1": ("dots1", dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                            moe_intermediate_size=20, n_shared_experts=1, n_routed_experts=8,
                            n_group=2, topk_group=1, num_experts_per_tok=2,
                            first_k_dense_replace=1, norm_topk_prob=False,
                            routed_scaling_factor=2.5, sliding_window=None), 1),
    "exaone_moe": ("exaone_moe", dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                      moe_intermediate_size=20, num_experts=8,
                                      num_experts_per_tok=2, num_shared_experts=1,
                                      first_k_dense_replace=1, n_group=2, topk_group=1,
                                      sliding_window=16, sliding_window_pattern=2), 1),
    "minimax_m2": ("minimax_m2", dict(hidden_size=64, num_hidden_layers=1, intermediate_size=24,
                                      head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                                      bos_token_id=1, eos_token_id=2), 0),
    "afmoe": ("afmoe", dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                            moe_intermediate_size=20, num_dense_layers=1, head_dim=8,
                            num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                            route_scale=1.7, global_attn_every_n_layers=2, sliding_window=16), 1),
    "lfm2_moe": ("lfm2_moe", dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                  moe_intermediate_size=20, num_dense_layers=1, num_experts=8,
                                  num_experts_per_tok=2, layer_types=["conv", "full_attention"],
                                  routed_scaling_factor=1.5), 1),
    "ernie4_5_moe": ("ernie4_5_moe", dict(hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                                          moe_intermediate_size=20, moe_num_experts=4, moe_k=2,
                                          moe_num_shared_experts=2, moe_layer_start_index=1,
                                          moe_layer_interval=1, pad_token_id=0), 1),
    "hunyuan_v1_moe": ("hunyuan_v1_moe", dict(hidden_size=32, num_hidden_layers=1,
                                              intermediate_size=20, num_experts=4, moe_topk=2,
                                              head_dim=8), 0),
    "granitemoe": ("granitemoe", dict(hidden_size=32, num_hidden_layers=1, intermediate_size=20,
                                      num_local_experts=4, num_experts_per_tok=2), 0),
    "granitemoeshared": ("granitemoeshared", dict(hidden_size=32, num_hidden_layers=1,
                                                  intermediate_size=20, num_local_experts=4,
                                                  num_experts_per_tok=2,
                                                  shared_intermediate_size=24), 0),
    "jetmoe": ("jetmoe", dict(hidden_size=32, num_hidden_layers=1, kv_channels=8,
                              intermediate_size=20, num_local_experts=4, num_experts_per_tok=2), 0),
    "dbrx": ("dbrx", dict(d_model=64, n_heads=4, n_layers=1, max_seq_len=128,
                          attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
                          ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 8,
                                      "moe_top_k": 2}), 0),
    "nemotron_h": ("nemotron_h", dict(hidden_size=32,
                                      layers_block_type=["full_attention", "moe"], head_dim=8,
                                      intermediate_size=64, ssm_state_size=8, mamba_num_heads=4,
                                      mamba_head_dim=16, n_groups=2, chunk_size=16,
                                      n_routed_experts=8, num_experts_per_tok=2,
                                      moe_intermediate_size=20,
                                      moe_shared_expert_intermediate_size=24, n_group=2,
                                      topk_group=1, routed_scaling_factor=2.5), 1),
    "llama4": ("llama4_text", dict(hidden_size=64, num_hidden_layers=2, intermediate_size=24,
                                   intermediate_size_mlp=96, head_dim=16, num_local_experts=4,
                                   num_experts_per_tok=1, interleave_moe_layer_step=2), 1),
    "longcat_flash": ("longcat_flash", dict(hidden_size=32, num_layers=1, ffn_hidden_size=64,
                                            head_dim=8, moe_topk=2, n_routed_experts=4,
                                            zero_expert_num=2, expert_ffn_hidden_size=20,
                                            routed_scaling_factor=6.0, **DEEPSEEK_ATTENTION), 0),
    "phimoe": ("phimoe", dict(hidden_size=32, num_hidden_layers=1, intermediate_size=20,
                              num_local_experts=6, num_experts_per_tok=2,
                              router_jitter_noise=0.2), 0),
    "gpt_oss": ("gpt_oss", dict(hidden_size=32, num_hidden_layers=1, intermediate_size=20,
                                num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                sliding_window=16), 0),
}
BLOCKS = ("mlp", "block_sparse_moe", "feed_forward", "mixer", "ffn")
TOKENS = 9


def _decoder_layer(model, layer):
    base = getattr(model, "model", None) or model.transformer
    return (base.layers if hasattr(base, "layers") else base.blocks)[layer]


def block_output(model, family, layer, x):
    """The MoE block of ``layer`` (plus a shared expert beside it) on tokens x [T, H]."""
    import torch

    decoder = _decoder_layer(model, layer)
    block = next(getattr(decoder, name) for name in BLOCKS if hasattr(decoder, name))
    with torch.no_grad():
        out = block(x[None])
        out = out[0] if isinstance(out, tuple) else out
        if family == "granitemoeshared":
            out = out + decoder.shared_mlp(x[None])
    return out.reshape(x.shape).float().numpy()


def make(family: str, folder: str) -> dict:
    """Saves ``folder``/float32 and ``folder``/bfloat16 checkpoints of a tiny random model;
    returns {"layer", "x", "float32", "bfloat16"}: the tokens and transformers' block outputs
    (bfloat16: the bf16 model's block on bf16-rounded tokens, computed in float32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs, layer = ZOO[family]
    config = AutoConfig.for_model(model_type, **{**SMALL, **kwargs})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(zlib.crc32(family.encode()))
    with torch.no_grad():  # every tensor random (some start at zeros: biases, routers)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                scale = 0.3 if t.ndim < 2 else t.shape[-1] ** -0.5
                t.copy_(torch.randn(t.shape, generator=generator) * scale)
    hidden = kwargs.get("hidden_size", kwargs.get("d_model"))
    x = torch.randn((TOKENS, hidden), generator=generator)
    result = {"layer": layer, "x": x.numpy(), "float32": block_output(model, family, layer, x)}
    model.save_pretrained(os.path.join(folder, "float32"), safe_serialization=True,
                          max_shard_size="40KB")
    model = model.to(torch.bfloat16)
    model.save_pretrained(os.path.join(folder, "bfloat16"), safe_serialization=True,
                          max_shard_size="40KB")
    x16 = x.to(torch.bfloat16)
    result["bfloat16"] = block_output(model.float(), family, layer, x16.float())
    return result
