"""``python -m dpmoe``: run a Mixtral-like MoE layer on the default device and check it."""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from . import MoELayer, info, reference
from .arrays import HOST_DTYPE
from .configs import MODEL_CONFIGS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpmoe", description=__doc__)
    parser.add_argument("--config", default="mixtral-small", choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=sorted(HOST_DTYPE))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None, help="dpctl filter string, e.g. opencl:cpu")
    args = parser.parse_args(argv)

    hidden, inter, experts, top_k = MODEL_CONFIGS[args.config]
    about = info(args.device)
    print(f"device:  {about['device']} ({about['filter_string']}), backend {about['backend']}")
    if about["fallback_reason"]:
        print(f"         fallback: {about['fallback_reason']}")
    print(f"layer:   {args.config}: H={hidden} I={inter} E={experts} top_k={top_k} "
          f"weights {args.dtype}")
    layer = MoELayer(hidden, inter, experts, top_k, dtype=args.dtype, device=args.device, seed=0)
    x = np.random.default_rng(1).standard_normal((args.tokens, hidden), dtype=np.float32)
    x = x.astype(HOST_DTYPE[args.dtype])
    print(f"input:   hidden_states {x.shape} {x.dtype}")

    start = time.perf_counter()
    out = layer(x)  # the first call compiles the kernels
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - start)

    w = layer.weights()
    expected = reference.moe_layer(x, w["router"], w["gate"], w["up"], w["down"], top_k, True)
    got, want = out.astype(np.float32), expected.astype(np.float32)
    error = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    print(f"output:  {out.shape} {out.dtype}")
    print(f"error:   max |dpmoe - reference| = {error:.3e} (output scale {scale:.3e}, "
          f"relative {error / scale:.2e})")
    print(f"time:    first call {first * 1e3:.1f} ms (includes kernel compilation), "
          f"median of {args.repeats} {statistics.median(times) * 1e3:.2f} ms")
    tolerance = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}[args.dtype]
    if error > tolerance * scale:
        print(f"FAILED: relative error above {tolerance}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
