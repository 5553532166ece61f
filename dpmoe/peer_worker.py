"""Times a peer MoE kernel in its own virtual environment (run by ``python -m dpmoe.bench
--peers``; never imported by dpmoe, and it imports nothing of dpmoe: the peers need other
torch versions than dpmoe's environment has).

``python peer_worker.py REQUEST.json`` reads a request written by the benchmark::

    {"peer": "ipex" | "pytorch", "dtype": "bfloat16" | "float32", "weights": "w.npz",
     "points": [{"tokens": T, "inputs": "x_T.npz"}, ...], "repeats": n, "warmup": w,
     "check": {"tokens": 16, "out": "check.npy"}}

``w.npz`` holds gate/up [E, H, I] and down [E, I, H] (float32 values, or bfloat16 as uint16
bits; for "int8", ``<name>_codes`` int8 of those shapes and ``<name>_scales`` float32 [E, N],
one per output column, with bf16 tokens); each ``x_T.npz`` the tokens ``x`` [T, H] and routings ``weights_i`` [T, k] float32,
``ids_i`` [T, k] int32. Every timed call uses the next routing, as dpmoe's own timings do.
It prints one JSON line: the peer's version and, per point, the seconds of each timed call;
the check point's output (first routing) is saved as float32 for the benchmark to compare
with dpmoe's reference before any time is reported.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def _tensor(torch, a: np.ndarray, dtype: str):
    """A host array as a torch tensor of ``dtype`` (bfloat16 arrives as uint16 bits)."""
    if a.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a)).to(getattr(torch, dtype))


def _ipex_int8(torch, ipex, w: dict):
    """IPEX's weight-only int8 MoE: ``fused_experts`` with ``is_woq`` on each expert's
    [out, in] codes and per-output scales packed by ``weight_only_qlinear_prepack`` (what
    IPEX's own DeepSeek/Qwen-MoE optimisation does), computing in bf16 (lowp mode BF16)."""
    from intel_extension_for_pytorch.quantization import (WoqActQuantMode, WoqLowpMode,
                                                          WoqWeightDtype)

    def plain(name: str):  # [E, K, N] codes -> [E, N, K], the checkpoints' [out, in]
        return (torch.from_numpy(w[f"{name}_codes"]).transpose(1, 2).contiguous(),
                torch.from_numpy(w[f"{name}_scales"]))

    (gate, s_gate), (up, s_up), (down, s_down) = (plain(k) for k in ("gate", "up", "down"))

    def pack(codes, scales):
        weights, out_scales = [], []
        for e in range(codes.shape[0]):
            context = torch.ops.ipex_prepack.weight_only_qlinear_prepack(
                codes[e], WoqWeightDtype.INT8, list(codes[e].shape), scales[e], None, None,
                None, None, -1, WoqLowpMode.BF16, WoqActQuantMode.NONE, False)
            weights.append(context.get_weight())
            out_scales.append(context.get_scales())
        return torch.stack(weights), torch.stack(out_scales).to(torch.bfloat16)

    w13, s13 = pack(torch.cat((gate, up), dim=1), torch.cat((s_gate, s_up), dim=1))
    w2, s2 = pack(down, s_down)

    def run(x, weights, ids):
        return torch.ops.torch_ipex.fused_experts(
            x, w13, w2, weights, ids, False, True, False, True, int(WoqWeightDtype.INT8), -1,
            int(WoqLowpMode.BF16), s13, None, None, s2, None, None)
    return run, ipex.__version__


def ipex_runner(torch, w: dict, dtype: str):
    """IPEX 2.8: bf16 ``torch.ops.torch_ipex.fused_experts`` on weights packed once by
    ``convert_weight_packed_moe_bf16``; float32 ``ipex.llm.modules.GatedMLPMOE`` with the
    routing passed through ``custom_routing_function``; int8 see :func:`_ipex_int8`."""
    import intel_extension_for_pytorch as ipex

    if dtype == "int8":
        return _ipex_int8(torch, ipex, w)
    gate, up, down = (_tensor(torch, w[k], dtype) for k in ("gate", "up", "down"))
    w13 = torch.cat((gate.transpose(1, 2), up.transpose(1, 2)), dim=1).contiguous()  # [E, 2I, H]
    w2 = down.transpose(1, 2).contiguous()  # [E, H, I]
    if dtype == "bfloat16":
        packed13, packed2 = torch.ops.torch_ipex.convert_weight_packed_moe_bf16(w13, w2)

        def run(x, weights, ids):
            return torch.ops.torch_ipex.fused_experts(
                x, packed13, packed2, weights, ids, False, True, False, False, 0, 0, 0,
                None, None, None, None, None, None)
        return run, ipex.__version__
    module = ipex.llm.modules.GatedMLPMOE(w13, w2, use_prepack=True)
    chosen = {}

    def routing(hidden_states, gating_output, topk, renormalize):
        return chosen["weights"], chosen["ids"]

    def run(x, weights, ids):
        chosen.update(weights=weights, ids=ids)
        logits = torch.zeros((x.shape[0], w13.shape[0]))
        return module(x, False, weights.shape[1], logits, False,
                      custom_routing_function=routing)
    return run, ipex.__version__


def torch_runner(torch, w: dict, dtype: str):
    """Plain PyTorch, experts one by one on their tokens (the protocol's own test peer); int8
    experts dequantised once to bf16 (codes times scales), then the same loop."""
    if dtype == "int8":
        gate, up, down = ((torch.from_numpy(w[f"{k}_codes"]).float()
                           * torch.from_numpy(w[f"{k}_scales"])[:, None, :]).to(torch.bfloat16)
                          for k in ("gate", "up", "down"))
    else:
        gate, up, down = (_tensor(torch, w[k], dtype) for k in ("gate", "up", "down"))

    def run(x, weights, ids):
        out = torch.zeros(x.shape, dtype=torch.float32)
        for e in torch.unique(ids).tolist():
            tokens, slots = torch.nonzero(ids == e, as_tuple=True)
            h = x[tokens]
            y = (torch.nn.functional.silu(h @ gate[e]) * (h @ up[e])) @ down[e]
            out.index_add_(0, tokens, y.float() * weights[tokens, slots, None])
        return out.to(x.dtype)
    return run, torch.__version__


RUNNERS = {"ipex": ipex_runner, "pytorch": torch_runner}


def main(path: str) -> None:
    import torch

    with open(path) as f:
        request = json.load(f)
    dtype = request["dtype"]
    w = dict(np.load(request["weights"]))
    run, version = RUNNERS[request["peer"]](torch, w, dtype)
    result = {"peer": request["peer"], "version": version, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "points": []}
    with torch.inference_mode():
        for point in request["points"]:
            data = np.load(point["inputs"])
            x = _tensor(torch, data["x"], dtype)
            sets = [(torch.from_numpy(data[f"weights_{i}"]), torch.from_numpy(data[f"ids_{i}"]))
                    for i in range(sum(1 for k in data.files if k.startswith("ids_")))]
            if point["tokens"] == request["check"]["tokens"]:
                np.save(request["check"]["out"], run(x, *sets[0]).float().numpy())
            seconds = []
            for i in range(request["warmup"] + request["repeats"]):
                weights, ids = sets[i % len(sets)]
                start = time.perf_counter()
                run(x, weights, ids)
                if i >= request["warmup"]:
                    seconds.append(time.perf_counter() - start)
            result["points"].append({"tokens": point["tokens"], "seconds": seconds})
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
