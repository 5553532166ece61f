"""``python -m dpmoe.bench``: dpmoe against its baselines, side by side, in one run.

For each (config, dtype, tokens) point, after a warm-up, the median of ``--repeats`` runs of:
dpmoe (both execution paths; the faster is reported, with its name), the NumPy reference
(small T only), a naive dpnp per-expert loop, and PyTorch on the CPU (a per-expert masked
loop and a sorted/grouped loop, the better reported) when torch is installed (``pip install
"dpmoe[bench]"``). Two limits are measured on the spot: read bandwidth (the best of a dpnp
and a torch sum over 512 MiB) and dense GEMM throughput (``dpnp.matmul`` of one batch with
the same FLOPs). Prints a table, writes JSON, and with ``--plot`` a PNG of speed-ups.
``--test silu|align|routing`` times one stage on its own; ``--test overhead`` the host cost
of a call (:func:`bench_overhead`; meant for the ``tiny`` config).

Examples::

    python -m dpmoe.bench --config mixtral-small --tokens 1 16 --dtype bfloat16
    python -m dpmoe.bench --test silu
    python -m dpmoe.bench --test overhead --config tiny --tokens 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import numpy as np

from . import info, reference
from .arrays import HOST_DTYPE, to_device
from .configs import MODEL_CONFIGS
from .device import default_queue, dpnp

REFERENCE_MAX_TOKENS = 16
# Each timed call routes the tokens differently (a new draw of logits), so a decode step
# reads weights from memory, not from a last-level cache that still holds the previous
# call's experts (the CPU's cache can hold a whole expert of the smaller configs).
ROUTINGS = 8
# The per-token path re-reads an expert's weights per block of 4 slots: beyond this many
# tokens it cannot win, so neither the benchmark nor the tuner spends time measuring it.
TUNE_PER_TOKEN_MAX_TOKENS = 256


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return torch


def measure_limits(repeats: int) -> dict[str, float]:
    """Read bandwidth (GB/s) and dense float32 GEMM throughput (GFLOP/s), measured now."""
    n = (512 << 20) // 4
    big = dpnp.ones(n, dtype=np.float32)
    bandwidth = n * 4 / median_time(lambda: float(dpnp.sum(big)), repeats) / 1e9
    torch = _torch()
    if torch is not None:
        t_big = torch.ones(n, dtype=torch.float32)
        bandwidth = max(bandwidth, n * 4 / median_time(lambda: float(t_big.sum()), repeats) / 1e9)
    a = dpnp.ones((8, 1024, 2048), dtype=np.float32)
    b = dpnp.ones((8, 2048, 1024), dtype=np.float32)
    flops = 2 * 8 * 1024 * 2048 * 1024
    limits = {"read_GBps": bandwidth,
              "gemm_GFLOPs": flops / median_time(lambda: dpnp.matmul(a, b).sum(), repeats) / 1e9}
    from . import onemkl_host

    if onemkl_host.available(a.sycl_queue):  # the host GEMMs dpmoe uses, on the same shapes
        c32 = dpnp.empty((8 * 1024, 1024), dtype=np.float32)
        segments = [(e, e * 1024, 1024) for e in range(8)]
        limits["gemm_host_GFLOPs"] = flops / median_time(
            lambda: onemkl_host.gemm_batch(a, [(b, c32)], segments, 1024, 2048), repeats) / 1e9
        a16 = dpnp.zeros((1024, 2048), dtype=np.uint16)
        b16 = dpnp.zeros((8, 2048, 1024), dtype=np.uint16)
        c = dpnp.empty((1024, 1024), dtype=np.float32)

        def bf16_batch():
            for e in range(8):
                onemkl_host.gemm(a16, 0, b16, e * 2048 * 1024, c, 0, 1024, 1024, 2048)

        limits["gemm_bf16_GFLOPs"] = flops / median_time(bf16_batch, repeats) / 1e9
    return limits


def make_problem(config: str, dtype: str, num_tokens: int, seed: int = 0) -> dict[str, Any]:
    hidden, inter, experts, top_k = MODEL_CONFIGS[config]
    rng = np.random.default_rng(seed)
    host = HOST_DTYPE[dtype]

    def normal(shape, scale):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(host)

    routings = [reference.topk_softmax(rng.standard_normal((num_tokens, experts), dtype=np.float32),
                                       top_k, renormalize=True) for _ in range(ROUTINGS)]
    return {
        "x": normal((num_tokens, hidden), 1.0),
        "gate": normal((experts, hidden, inter), hidden**-0.5),
        "up": normal((experts, hidden, inter), hidden**-0.5),
        "down": normal((experts, inter, hidden), inter**-0.5),
        "routings": routings,
        "weights": routings[0][0],
        "ids": routings[0][1],
        "top_k": top_k,
    }


class Rotating:
    """Calls ``fn(*args_i)`` with the next of several argument tuples on each call."""

    def __init__(self, fn: Callable, argument_sets: list[tuple]):
        self.fn, self.sets, self.i = fn, argument_sets, 0

    def __call__(self) -> Any:
        self.i = (self.i + 1) % len(self.sets)
        return self.fn(*self.sets[self.i])


def naive_dpnp(x, gate, up, down, weights, ids_host, top_k):
    """The obvious dpnp program: per expert, take its tokens, three matmuls, scatter back."""
    out = dpnp.zeros(x.shape, dtype=np.float32, sycl_queue=x.sycl_queue)
    for e in np.unique(ids_host):
        tokens, slots = np.nonzero(ids_host == e)
        idx = dpnp.asarray(tokens, sycl_queue=x.sycl_queue)
        xs = dpnp.take(x, idx, axis=0)
        g = dpnp.matmul(xs, gate[e])
        act = g / (1 + dpnp.exp(-g)) * dpnp.matmul(xs, up[e])
        w = dpnp.asarray(weights[tokens, slots][:, None], sycl_queue=x.sycl_queue)
        y = dpnp.matmul(act, down[e]) * w
        out[idx] += y  # tokens are distinct within one expert
    return out


def time_naive_dpnp(p: dict, queue: Any, repeats: int) -> float:
    """The naive loop on float32 device copies (dpnp has no bfloat16), freed on return."""
    f32 = [dpnp.asarray(a.astype(np.float32), sycl_queue=queue) for a in (p["gate"], p["up"], p["down"])]
    x32 = dpnp.asarray(p["x"].astype(np.float32), sycl_queue=queue)
    return median_time(Rotating(
        lambda w, i: naive_dpnp(x32, *f32, w, i, p["top_k"]).asnumpy(), p["routings"]), repeats)


def torch_variants(torch, x, gate, up, down, weights, ids):
    def masked():
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            xs = x[tok]
            act = torch.nn.functional.silu(xs @ gate[e]) * (xs @ up[e])
            out.index_add_(0, tok, (act @ down[e]) * weights[tok, slot, None].to(x.dtype))
        return out

    def grouped():
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=gate.shape[0]).tolist()
        tok = order // ids.shape[1]
        xs = x[tok]
        w = weights.reshape(-1)[order, None].to(x.dtype)
        ys, start = [], 0
        for e, c in enumerate(counts):
            if c:
                part = xs[start:start + c]
                act = torch.nn.functional.silu(part @ gate[e]) * (part @ up[e])
                ys.append(act @ down[e])
            start += c
        out = torch.zeros_like(x)
        out.index_add_(0, tok, torch.cat(ys) * w)
        return out

    return {"torch-masked": masked, "torch-grouped": grouped}


def bench_moe(config: str, dtype: str, num_tokens: int, limits: dict, repeats: int) -> dict:
    from .fused_moe import ExpertWeights, run_on_device

    queue, _ = default_queue()
    p = make_problem(config, dtype, num_tokens)
    hidden, inter, experts, top_k = MODEL_CONFIGS[config]
    kind = dtype
    experts_w = ExpertWeights(p["gate"], p["up"], p["down"], kind, queue, persistent=True)
    x = to_device(p["x"], queue)
    device_routings = [(dpnp.asarray(w, sycl_queue=queue), dpnp.asarray(i, sycl_queue=queue))
                       for w, i in p["routings"]]
    row = {"test": "moe", "config": config, "dtype": dtype, "tokens": num_tokens}
    times = {}
    for name, grouped in (("grouped", True), ("per-token", False)):
        if not grouped and num_tokens > TUNE_PER_TOKEN_MAX_TOKENS:
            continue
        run = Rotating(lambda w, i: run_on_device(x, kind, experts_w, w, i, top_k, False, grouped),
                       device_routings)
        times[name] = median_time(run, repeats)
    row["dpmoe_path"] = min(times, key=times.get)
    row["dpmoe_ms"] = times[row["dpmoe_path"]] * 1e3
    row.update({f"dpmoe_{k}_ms": v * 1e3 for k, v in times.items()})
    if num_tokens <= REFERENCE_MAX_TOKENS:
        row["reference_ms"] = 1e3 * median_time(lambda: reference.fused_moe_forward(
            p["x"], p["gate"], p["up"], p["down"], p["weights"], p["ids"], top_k, False), 1, 0)
    row["naive_dpnp_ms"] = 1e3 * time_naive_dpnp(p, queue, repeats)
    torch = _torch()
    if torch is not None:
        tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        tw = [torch.from_numpy(a.astype(np.float32)).to(tdt) for a in (p["gate"], p["up"], p["down"])]
        tx = torch.from_numpy(p["x"].astype(np.float32)).to(tdt)
        sets = [(torch.from_numpy(w), torch.from_numpy(i.astype(np.int64))) for w, i in p["routings"]]
        ttimes = {}
        with torch.inference_mode():
            for name in ("torch-masked", "torch-grouped"):
                ttimes[name] = median_time(Rotating(
                    lambda w, i, name=name: torch_variants(torch, tx, *tw, w, i)[name](), sets), repeats)
        row["torch_best"] = min(ttimes, key=ttimes.get)
        row["torch_ms"] = ttimes[row["torch_best"]] * 1e3
        row["speedup_vs_torch"] = row["torch_ms"] / row["dpmoe_ms"]
    itemsize = np.dtype(HOST_DTYPE[dtype]).itemsize
    distinct = statistics.mean(len(np.unique(i)) for _, i in p["routings"])
    touched = distinct * 3 * hidden * inter * itemsize
    flops = 2 * 3 * num_tokens * top_k * hidden * inter
    seconds = row["dpmoe_ms"] / 1e3
    row["GBps"] = touched / seconds / 1e9
    row["GFLOPs"] = flops / seconds / 1e9
    # the best dense GEMM the device offers in the weights' dtype (float32: dpnp.matmul or,
    # on CPU devices, oneMKL's host batch GEMM, whichever was faster just now)
    gemm_limit = limits.get("gemm_bf16_GFLOPs") if dtype == "bfloat16" else None
    gemm_limit = gemm_limit or max(limits["gemm_GFLOPs"], limits.get("gemm_host_GFLOPs", 0.0))
    roofline = max(touched / (limits["read_GBps"] * 1e9), flops / (gemm_limit * 1e9))
    row["roofline_pct"] = 100 * roofline / seconds
    return row


def bench_overhead(config: str, dtype: str, num_tokens: int, repeats: int) -> dict:
    """What a call costs beyond its kernels' work, on a config whose kernels do almost
    nothing (``tiny``): the forward on device arrays by each path, and a whole ``MoELayer``
    call with NumPy in and out (upload, router, routing, forward, download) as dpmoe_ms."""
    from .fused_moe import ExpertWeights, run_on_device
    from .layer import MoELayer

    queue, _ = default_queue()
    p = make_problem(config, dtype, num_tokens)
    hidden, _, experts, top_k = MODEL_CONFIGS[config]
    repeats = max(repeats, 100)  # microsecond-scale timings: many more samples
    weights = ExpertWeights(p["gate"], p["up"], p["down"], dtype, queue, persistent=True)
    x = to_device(p["x"], queue)
    routings = [(dpnp.asarray(w, sycl_queue=queue), dpnp.asarray(i, sycl_queue=queue))
                for w, i in p["routings"]]
    row = {"test": "overhead", "config": config, "dtype": dtype, "tokens": num_tokens}
    for name, grouped in (("grouped", True), ("per_token", False)):
        row[f"{name}_ms"] = 1e3 * median_time(Rotating(
            lambda w, i: run_on_device(x, dtype, weights, w, i, top_k, False, grouped),
            routings), repeats)
    router = np.random.default_rng(1).standard_normal((hidden, experts), dtype=np.float32)
    layer = MoELayer.from_numpy(router, p["gate"], p["up"], p["down"], top_k=top_k)
    row["dpmoe_ms"] = 1e3 * median_time(lambda: layer(p["x"]), repeats)
    return row


def tune(config: str, dtype: str, token_counts: list[int], repeats: int, directory: str | None) -> str:
    """Measure both paths at each token count; save the faster through tuning's naming."""
    from .fused_moe import ExpertWeights, run_on_device
    from .tuning import TUNED_DIR, save_configs

    queue, _ = default_queue()
    hidden, inter, experts, top_k = MODEL_CONFIGS[config]
    choices = {}
    p = make_problem(config, dtype, 1)
    weights = ExpertWeights(p["gate"], p["up"], p["down"], dtype, queue, persistent=True)
    for num_tokens in token_counts:
        p = make_problem(config, dtype, num_tokens)
        x = to_device(p["x"], queue)
        routings = [(dpnp.asarray(w, sycl_queue=queue), dpnp.asarray(i, sycl_queue=queue))
                    for w, i in p["routings"]]
        times = {}
        for path in ("grouped", "per-token"):
            if path == "per-token" and num_tokens > TUNE_PER_TOKEN_MAX_TOKENS:
                continue
            grouped = path == "grouped"
            times[path] = median_time(Rotating(
                lambda w, i: run_on_device(x, dtype, weights, w, i, top_k, False, grouped),
                routings), repeats)
        best = min(times, key=times.get)
        choices[num_tokens] = {"path": best, "ms": {k: round(v * 1e3, 3) for k, v in times.items()}}
    path = save_configs(choices, experts, inter, dtype, queue.sycl_device.name,
                        directory or TUNED_DIR)
    return str(path)


def bench_kernel(test: str, config: str, dtype: str, num_tokens: int, repeats: int) -> dict:
    """Micro-benchmarks of one stage: silu, align or routing."""
    from . import moe_align_block_size, silu_and_mul, topk_softmax

    queue, _ = default_queue()
    hidden, inter, experts, top_k = MODEL_CONFIGS[config]
    rng = np.random.default_rng(0)
    row = {"test": test, "config": config, "dtype": dtype, "tokens": num_tokens}
    torch = _torch()
    if test == "silu":
        h = rng.standard_normal((num_tokens * top_k, 2 * inter), dtype=np.float32).astype(HOST_DTYPE[dtype])
        d = to_device(h, queue)
        row["dpmoe_ms"] = 1e3 * median_time(lambda: silu_and_mul(d), repeats)
        row["reference_ms"] = 1e3 * median_time(lambda: reference.silu_and_mul(h), repeats)
        if torch is not None:
            th = torch.from_numpy(h.astype(np.float32)).to(getattr(torch, dtype))
            row["torch_ms"] = 1e3 * median_time(
                lambda: torch.nn.functional.silu(th[:, :inter]) * th[:, inter:], repeats)
    elif test == "align":
        _, ids = reference.topk_softmax(rng.standard_normal((num_tokens, experts), dtype=np.float32), top_k)
        d = dpnp.asarray(ids, sycl_queue=queue)
        row["dpmoe_ms"] = 1e3 * median_time(lambda: moe_align_block_size(d, experts, 16), repeats)
        row["reference_ms"] = 1e3 * median_time(lambda: reference.moe_align_block_size(ids, experts, 16), repeats)
    elif test == "routing":
        logits = rng.standard_normal((num_tokens, experts), dtype=np.float32)
        d = dpnp.asarray(logits, sycl_queue=queue)
        row["dpmoe_ms"] = 1e3 * median_time(lambda: topk_softmax(d, top_k, True), repeats)
        row["reference_ms"] = 1e3 * median_time(lambda: reference.topk_softmax(logits, top_k, True), repeats)
        if torch is not None:
            tl = torch.from_numpy(logits)
            row["torch_ms"] = 1e3 * median_time(
                lambda: torch.topk(torch.softmax(tl, -1), top_k, -1), repeats)
    if "torch_ms" in row:
        row["speedup_vs_torch"] = row["torch_ms"] / row["dpmoe_ms"]
    return row


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    columns = [c for c in ("test", "config", "dtype", "tokens", "dpmoe_ms", "dpmoe_path",
                           "grouped_ms", "per_token_ms",
                           "torch_ms", "torch_best", "naive_dpnp_ms", "reference_ms", "GFLOPs",
                           "GBps", "roofline_pct", "speedup_vs_torch") if any(c in r for r in rows)]
    table = [columns] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for i, line in enumerate(table):
        print("| " + " | ".join(cell.rjust(w) for cell, w in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "speedup_vs_torch" in r]
    labels = [f"{r['config']}\n{r['dtype']} T={r['tokens']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["speedup_vs_torch"] for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("speed-up vs best torch variant")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpmoe.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", default="moe",
                        choices=["moe", "silu", "align", "routing", "overhead"])
    parser.add_argument("--config", nargs="+", choices=sorted(MODEL_CONFIGS),
                        default=[c for c in sorted(MODEL_CONFIGS) if c != "tiny"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128, 1024])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(HOST_DTYPE))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="bench_results.json", help="where to write the rows")
    parser.add_argument("--tune", action="store_true",
                        help="measure both execution paths and write per-device configs")
    parser.add_argument("--tune-dir", default=None, help="where --tune writes (default: the package's)")
    parser.add_argument("--plot", nargs="?", const="bench_speedups.png", default=None,
                        help="write a PNG chart of speed-ups vs torch")
    args = parser.parse_args(argv)

    about = info()
    if about["backend"] != "sycl":
        print(f"no SYCL device: {about['fallback_reason']}")
        return 1
    if args.tune:
        for config in args.config:
            for dtype in args.dtype:
                print("wrote", tune(config, dtype, args.tokens, args.repeats, args.tune_dir))
        return 0
    points = [(c, d, t) for c in args.config for d in args.dtype for t in args.tokens]
    try:
        from tqdm import tqdm

        points_iter = tqdm(points, desc=f"bench {args.test}")
    except ImportError:
        points_iter = points
    limits = measure_limits(args.repeats) if args.test == "moe" else {}
    rows = []
    for config, dtype, tokens in points_iter:
        if args.test == "moe":
            rows.append(bench_moe(config, dtype, tokens, limits, args.repeats))
        elif args.test == "overhead":
            rows.append(bench_overhead(config, dtype, tokens, args.repeats))
        else:
            rows.append(bench_kernel(args.test, config, dtype, tokens, args.repeats))
    print(f"device: {about['device']} ({about['filter_string']}); limits: "
          + ", ".join(f"{k} {v:.1f}" for k, v in limits.items()))
    print_table(rows)
    with open(args.json, "w") as f:
        json.dump({"device": about["device"], "limits": limits, "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
