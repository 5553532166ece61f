"""MoE block shapes of model families people serve, scaled to what fits a workstation
(the benchmark's and the demo's ``--config``; ``import dpmoe`` does not load this module).

Each entry is (hidden_size H, intermediate_size I per expert, num_experts E, top_k).
"""

MODEL_CONFIGS: dict[str, tuple[int, int, int, int]] = {
    # Mixtral 8x7B routing (8 experts, top-2) at a quarter of its width
    "mixtral-small": (1024, 3584, 8, 2),
    # Qwen1.5-MoE-A2.7B: 60 routed experts, top-4
    "qwen-moe": (2048, 1408, 60, 4),
    # OLMoE-1B-7B: 64 experts, top-8
    "olmoe": (2048, 1024, 64, 8),
    # DeepSeek-V2-Lite: 64 routed experts, top-6
    "deepseek-lite": (2048, 1408, 64, 6),
    # not a model: small enough for smoke tests of the benchmark and the demo
    "tiny": (64, 96, 4, 2),
}


def describe(name: str) -> str:
    """``"H=1024 I=3584 E=8 top_k=2"`` for a config name (for the benchmark's help and plots)."""
    hidden, inter, experts, top_k = MODEL_CONFIGS[name]
    return f"H={hidden} I={inter} E={experts} top_k={top_k}"
