"""dpmoe against transformers' own MoE blocks of five model families (optional: needs
torch and transformers, the ``compat`` extra). Tiny random blocks, no downloads."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dpmoe import models  # noqa: E402
from dpmoe.arrays import BFLOAT16  # noqa: E402

H, I = 64, 48
# the families of these in-memory blocks; every family from its checkpoint: test_pretrained.py
FIVE = ("mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss")


def family_block(family):
    from transformers import DeepseekV3Config, GptOssConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    common = dict(hidden_size=H, num_experts_per_tok=2)
    if family == "mixtral":
        config = MixtralConfig(intermediate_size=I, num_local_experts=4, **common)
        block = MixtralSparseMoeBlock(config)
    elif family == "qwen2_moe":
        config = Qwen2MoeConfig(moe_intermediate_size=I, shared_expert_intermediate_size=80,
                                num_experts=6, norm_topk_prob=False, **common)
        block = Qwen2MoeSparseMoeBlock(config)
    elif family == "olmoe":
        config = OlmoeConfig(intermediate_size=I, num_experts=8, norm_topk_prob=True, **common)
        block = OlmoeSparseMoeBlock(config)
    elif family == "deepseek_v3":
        config = DeepseekV3Config(moe_intermediate_size=I, n_routed_experts=8, n_shared_experts=1,
                                  n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                  norm_topk_prob=True, **{**common, "num_experts_per_tok": 3})
        block = DeepseekV3MoE(config)
    else:
        config = GptOssConfig(intermediate_size=I, num_local_experts=4, **common)
        block = GptOssMLP(config)
    torch.manual_seed(0)
    with torch.no_grad():  # the blocks start from zeros/empty; give every tensor values
        for name, t in list(block.named_parameters()) + list(block.named_buffers()):
            scale = 0.5 if "bias" in name else t.shape[-1] ** -0.5
            t.copy_(torch.randn_like(t, dtype=torch.float32) * scale)
    return block.eval(), config


def run_torch(block, x):
    with torch.no_grad():
        out = block(torch.from_numpy(x)[None])
    return (out[0] if isinstance(out, tuple) else out)[0].float().numpy()


# 3 tokens take the per-token path, 40 the grouped one (without a tuned config)
@pytest.mark.parametrize("num_tokens", [3, 40])
@pytest.mark.parametrize("family", FIVE)
def test_float32_matches_transformers(family, num_tokens):
    block, config = family_block(family)
    state = {k: v.float().numpy() for k, v in block.state_dict().items()}
    layer = models.from_state_dict(family, state, config)
    x = np.random.default_rng(1).standard_normal((num_tokens, H), dtype=np.float32)
    want = run_torch(block, x)
    got = layer(x)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale, np.abs(got - want).max() / scale


@pytest.mark.parametrize("num_tokens", [3, 40])
@pytest.mark.parametrize("family", FIVE)
def test_bfloat16_matches_transformers(family, num_tokens):
    block, config = family_block(family)
    block = block.to(torch.bfloat16)
    if family == "deepseek_v3":  # its router stays float32 in transformers, as here
        block.gate.to(torch.float32)
    state = {k: v.float().numpy().astype(BFLOAT16 if v.dtype == torch.bfloat16 else np.float32)
             for k, v in block.state_dict().items()}
    layer = models.from_state_dict(family, state, config)
    x = np.random.default_rng(2).standard_normal((num_tokens, H), dtype=np.float32).astype(BFLOAT16)
    with torch.no_grad():
        out = block(torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)[None])
    want = (out[0] if isinstance(out, tuple) else out)[0].float().numpy()
    got = layer(x).astype(np.float32)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 2e-2 * scale, np.abs(got - want).max() / scale
