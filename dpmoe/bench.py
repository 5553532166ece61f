"""``python -m dpmoe.bench``: dpmoe against its baselines, side by side, in one run.

For each (config, dtype, tokens) point, after two warm-up calls, ``--repeats`` timed calls
of: dpmoe's experts on given routing (``MoELayer.experts``, weights resident on the
device, each execution path; the faster is reported with its name, next to the path
``layer.plan`` picks on its own), the NumPy reference (T <= 16, at most 3 calls), a naive
dpnp per-expert loop, and PyTorch on the CPU (a per-expert masked loop and a sorted/grouped
loop, the better reported) when torch is installed (``pip install "dpmoe[bench]"``). Each
call routes the tokens differently. Every time is the median over the calls with its
spread: ``median (min-max)`` in ms in the table; the JSON keeps every sample and quartile.

Two limits are probed before the first point, between points and after the last, the best
probe kept: read bandwidth (a dpnp and a torch sum over 512 MiB) and dense GEMM throughput
(``dpnp.matmul``, oneMKL's host GEMMs and ``torch.matmul`` on one batch of 34 GFLOP).
``roofline_pct`` is the time those limits allow over the time measured; a point faster
than the limits allow (weights served from cache, or no probe reached the device's peak)
is reported as 100 with ``limit_exceeded`` and a note, never above 100.

Prints a table, writes JSON and, with ``--plot``, a PNG of the times of every variant, and
says where. ``--test silu|align|routing`` times one stage on its own, ``--test overhead``
the host cost of a call (meant for ``--config tiny``), ``--test ep`` an expert-parallel layer
over the ranks of an MPI job (launch it with ``mpiexec -n N``; tokens per rank; see
:func:`bench_ep`), and ``--tune`` measures both paths
per token count and writes a tuned config where dpmoe reads it
(``dpmoe.tuning.user_config_dir()``, before the configs shipped in the package).

Examples::

    python -m dpmoe.bench --config mixtral-small --tokens 1 16 --dtype bfloat16 --plot
    python -m dpmoe.bench --test silu
    python -m dpmoe.bench --test overhead --config tiny --tokens 1
    python -m dpmoe.bench --tune --config olmoe --tokens 1 4 16 64 256 1024
    mpiexec -n 2 python -m mpi4py -m dpmoe.bench --test ep --config olmoe --tokens 1 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import info, quant, reference
from .configs import MODEL_CONFIGS, describe
from .peers import PEERS
from .arrays import HOST_DTYPE, to_device
from .tuning import PATHS, DefaultConfigWarning, user_config_dir

TESTS = ("moe", "silu", "align", "routing", "overhead", "ep", "load")
WARMUP = 2
REFERENCE_MAX_TOKENS = 16
REFERENCE_MAX_REPEATS = 3  # the reference takes up to a second a call
OVERHEAD_MIN_REPEATS = 100  # microsecond-scale timings: many more samples
# Each timed call routes the tokens differently (a new draw of logits), so a decode step
# reads weights from memory, not from a last-level cache that still holds the previous
# call's experts (the CPU's cache can hold a whole expert of the smaller configs).
ROUTINGS = 8
# The per-token path re-reads an expert's weights per block of 4 slots: beyond this many
# tokens it cannot win, so neither the benchmark nor the tuner spends time measuring it
# (unless the layer's plan picks it).
TUNE_PER_TOKEN_MAX_TOKENS = 256
READ_PROBE_BYTES = 512 << 20
# weight formats besides the float kinds: experts quantized from float32 draws, bf16 tokens
DTYPES = (*HOST_DTYPE, *quant.FORMATS)


def tokens_dtype(dtype: str) -> str:
    """The tokens' dtype for weights of ``dtype`` (bfloat16 for quantized weights)."""
    return "bfloat16" if dtype in quant.FORMATS else dtype
GEMM_PROBE = (8, 1024, 2048, 1024)  # batch, M, K, N


# ---------------------------------------------------------------------------- timing


def sample_times(fn: Callable[[], Any], repeats: int, warmup: int = WARMUP,
                 teardown: Callable[[], None] | None = None) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``fn``, after ``warmup`` untimed ones;
    each call's result is dropped and ``teardown()`` run, untimed, before the next."""
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        del result
        if teardown is not None:
            teardown()
        if i >= warmup:
            times.append(elapsed)
    return times


def summary(seconds: list[float]) -> dict[str, Any]:
    """Median, min, max, quartiles and every sample of a timing, in ms."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    q1, median, q3 = np.percentile(ms, [25, 50, 75])
    return {"median": float(median), "min": float(ms.min()), "max": float(ms.max()),
            "q1": float(q1), "q3": float(q3), "n": int(ms.size),
            "samples": [float(v) for v in ms]}


def record(row: dict, column: str, seconds: list[float]) -> float:
    """``row[column]`` = the median in ms; ``row["stats"][column]`` = :func:`summary`."""
    stats = summary(seconds)
    row[column] = stats["median"]
    row.setdefault("stats", {})[column] = stats
    return stats["median"]


def copy_stats(row: dict, column: str, source: str) -> None:
    row[column] = row[source]
    row["stats"][column] = row["stats"][source]


class Rotating:
    """Calls ``fn(*args_i)`` with the next of several argument tuples on each call."""

    def __init__(self, fn: Callable, argument_sets: list[tuple]):
        self.fn, self.sets, self.i = fn, argument_sets, 0

    def __call__(self) -> Any:
        self.i = (self.i + 1) % len(self.sets)
        return self.fn(*self.sets[self.i])


# ---------------------------------------------------------------------------- devices


def _dpnp() -> Any:
    import dpnp

    return dpnp


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def cpu_info() -> dict[str, str]:
    """The first processor's ``model name``, ``cpu family`` and ``model`` in /proc/cpuinfo."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in found:
                    found[key] = value.strip()
                if not line.strip() and found:
                    break
    except OSError:
        pass
    return found


def machine_description(device_name: str, filter_string: str = "") -> str:
    """The device's name and filter string, and for CPU devices the host CPU as
    /proc/cpuinfo names it (model name when it differs, family and model numbers)."""
    text = device_name + (f" ({filter_string})" if filter_string else "")
    cpu = cpu_info()
    if cpu and ("cpu" in filter_string or not filter_string):
        model = cpu.get("model name", "")
        ids = " ".join(f"{k} {cpu[k]}" for k in ("cpu family", "model") if k in cpu)
        host = [model if model != device_name else "", ids, f"{os.cpu_count()} logical CPUs"]
        text += "; host CPU: " + ", ".join(h for h in host if h)
    return text


# ---------------------------------------------------------------------------- limits


class Limits:
    """Read bandwidth (GB/s) and dense GEMM throughput (GFLOP/s), the best of every probe.

    :meth:`probe` runs each probe once more (twice the first time, after a warm-up); the
    benchmark calls it before its first point, between points and after its last, so the
    limits are the best the device showed during the run, interleaved with the work.
    """

    def __init__(self, queue: Any, dtypes: list[str], torch: Any = None) -> None:
        dpnp = _dpnp()
        self.best: dict[str, float] = {}
        self.samples: dict[str, list[float]] = {}
        self.rounds = 0
        self._probes: dict[str, tuple[Callable[[], Any], float]] = {}  # name: (fn, G per call)
        n = READ_PROBE_BYTES // 4
        big = dpnp.ones(n, dtype=np.float32, sycl_queue=queue)
        self._probes["read_dpnp_GBps"] = (lambda: float(dpnp.sum(big)), n * 4 / 1e9)
        batch, m, k, n_ = GEMM_PROBE
        gflop = 2 * batch * m * k * n_ / 1e9
        a = dpnp.ones((batch, m, k), dtype=np.float32, sycl_queue=queue)
        b = dpnp.ones((batch, k, n_), dtype=np.float32, sycl_queue=queue)
        self._probes["gemm_dpnp_GFLOPs"] = (lambda: dpnp.matmul(a, b).sum(), gflop)
        self._add_host_gemms(queue, a, b, "bfloat16" in dtypes, gflop)
        if torch is not None:
            t_big = torch.ones(n, dtype=torch.float32)
            self._probes["read_torch_GBps"] = (lambda: float(t_big.sum()), n * 4 / 1e9)
            ta, tb = torch.ones(batch, m, k), torch.ones(batch, k, n_)
            self._probes["gemm_torch_GFLOPs"] = (lambda: torch.matmul(ta, tb), gflop)
            if "bfloat16" in dtypes:
                ta16, tb16 = ta.to(torch.bfloat16), tb.to(torch.bfloat16)
                self._probes["gemm_bf16_torch_GFLOPs"] = (lambda: torch.matmul(ta16, tb16), gflop)

    def _add_host_gemms(self, queue: Any, a: Any, b: Any, bf16: bool, gflop: float) -> None:
        """oneMKL's host GEMMs, which dpmoe's grouped path runs on CPU devices."""
        try:
            from . import onemkl_host
        except ImportError:
            return
        if not onemkl_host.available(queue):
            return
        dpnp = _dpnp()
        batch, m, k, n = GEMM_PROBE
        c32 = dpnp.empty((batch * m, n), dtype=np.float32, sycl_queue=queue)
        segments = [(e, e * m, m) for e in range(batch)]
        self._probes["gemm_host_GFLOPs"] = (
            lambda: onemkl_host.gemm_batch(a, [(b, c32)], segments, n, k), gflop)
        if not bf16:
            return
        a16 = dpnp.zeros((m, k), dtype=np.uint16, sycl_queue=queue)
        b16 = dpnp.zeros((batch, k, n), dtype=np.uint16, sycl_queue=queue)
        c = dpnp.empty((m, n), dtype=np.float32, sycl_queue=queue)

        def bf16_batch() -> None:
            for e in range(batch):
                onemkl_host.gemm(a16, 0, b16, e * k * n, c, 0, m, n, k)

        self._probes["gemm_bf16_host_GFLOPs"] = (bf16_batch, gflop)
        if hasattr(onemkl_host, "pack"):  # how dpmoe keeps a layer's bf16 weights
            packed = [onemkl_host.pack(b16, e * k * n, n, k) for e in range(batch)]

            def bf16_packed() -> None:
                for p in packed:
                    onemkl_host.gemm_packed(a16, 0, p, c, 0, m, n, k)

            self._probes["gemm_bf16_packed_GFLOPs"] = (bf16_packed, gflop)

    def probe(self) -> None:
        first = self.rounds == 0
        for name, (fn, amount) in self._probes.items():
            for seconds in sample_times(fn, 2 if first else 1, warmup=1 if first else 0):
                rate = amount / seconds
                self.samples.setdefault(name, []).append(rate)
                self.best[name] = max(self.best.get(name, 0.0), rate)
        self.rounds += 1

    @property
    def read_GBps(self) -> float:
        return max(v for k, v in self.best.items() if k.startswith("read_"))

    def gemm_GFLOPs(self, dtype: str) -> float:
        """The fastest dense GEMM measured in ``dtype`` (float32 for float16: dpmoe computes
        16-bit float weights in float32 unless oneMKL's host bf16 GEMM takes them; quantized
        weights are dequantised for the GEMM of their bf16 tokens)."""
        bf16 = [v for k, v in self.best.items() if k.startswith("gemm_bf16_")]
        if tokens_dtype(dtype) == "bfloat16" and bf16:
            return max(bf16)
        return max(v for k, v in self.best.items()
                   if k.startswith("gemm_") and not k.startswith("gemm_bf16_"))

    def as_dict(self, dtypes: list[str]) -> dict[str, float]:
        out = dict(self.best)
        out["read_GBps"] = self.read_GBps
        for dtype in dtypes:
            out[f"gemm_{dtype}_GFLOPs"] = self.gemm_GFLOPs(dtype)
        return out

    def apply(self, row: dict) -> None:
        """Adds :func:`roofline`'s columns to a moe row."""
        row.update(roofline(row["dpmoe_ms"] / 1e3, row["weight_bytes"], row["flops"],
                            self.read_GBps, self.gemm_GFLOPs(row["dtype"])))


def roofline(seconds: float, weight_bytes: float, flops: float, read_GBps: float,
             gemm_GFLOPs: float) -> dict[str, Any]:
    """GB/s, GFLOP/s and ``roofline_pct``: the time the limits allow (reading the weights
    once, or the GEMMs' FLOPs, whichever takes longer) over ``seconds``, in percent. A call
    faster than the limits allow gets ``roofline_pct`` 100 and ``limit_exceeded`` True
    (``roofline_pct_measured`` keeps the uncapped value): never a silent value above 100."""
    memory = weight_bytes / (read_GBps * 1e9)
    compute = flops / (gemm_GFLOPs * 1e9)
    pct = 100 * max(memory, compute) / seconds
    return {"GBps": weight_bytes / seconds / 1e9, "GFLOPs": flops / seconds / 1e9,
            "roofline_bound": "memory" if memory >= compute else "compute",
            "roofline_pct_measured": pct, "limit_exceeded": pct > 100,
            "roofline_pct": min(pct, 100.0)}


# ---------------------------------------------------------------------------- workloads


def make_weights(config: str, dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    """gate/up [E, H, I], down [E, I, H] and router [H, E] (float32) on the host; for a
    :mod:`dpmoe.quant` format, the float32 draws quantized."""
    hidden, inter, experts, _ = MODEL_CONFIGS[config]
    rng = np.random.default_rng(seed)
    if dtype in quant.FORMATS:
        w = make_weights(config, "float32", seed)
        return dict(w, **{k: quant.quantize(w[k], dtype) for k in ("gate", "up", "down")})
    host = HOST_DTYPE[dtype]

    def normal(shape: tuple[int, ...], scale: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(host)

    return {"gate": normal((experts, hidden, inter), hidden**-0.5),
            "up": normal((experts, hidden, inter), hidden**-0.5),
            "down": normal((experts, inter, hidden), inter**-0.5),
            "router": rng.standard_normal((hidden, experts), dtype=np.float32) * hidden**-0.5}


def make_inputs(config: str, dtype: str, num_tokens: int, seed: int = 0) -> dict[str, Any]:
    """x [T, H] and :data:`ROUTINGS` draws of (topk_weights, topk_ids) on the host."""
    hidden, _, experts, top_k = MODEL_CONFIGS[config]
    rng = np.random.default_rng([seed, num_tokens])
    routings = [reference.topk_softmax(rng.standard_normal((num_tokens, experts), dtype=np.float32),
                                       top_k, renormalize=True) for _ in range(ROUTINGS)]
    x = rng.standard_normal((num_tokens, hidden), dtype=np.float32).astype(
        HOST_DTYPE[tokens_dtype(dtype)])
    return {"x": x, "routings": routings, "weights": routings[0][0], "ids": routings[0][1],
            "top_k": top_k}


class Workload:
    """One (config, dtype): host weights and a ``MoELayer`` holding them on the device,
    built once and reused for every token count (as a served model would)."""

    def __init__(self, config: str, dtype: str, layout: str = "x@W") -> None:
        from . import MoELayer

        self.config, self.dtype, self.layout = config, dtype, layout
        self.hidden, self.inter, self.experts, self.top_k = MODEL_CONFIGS[config]
        self.weights = make_weights(config, dtype)
        w = self.weights

        def stored(a: Any) -> Any:  # x@W^T: each matrix [out, in], as checkpoints keep them
            if layout == "x@W" or dtype in quant.FORMATS:
                return a
            return np.ascontiguousarray(a.transpose(0, 2, 1)).transpose(0, 2, 1)

        self.layer = MoELayer.from_numpy(w["router"], *(stored(w[k]) for k in ("gate", "up", "down")),
                                         top_k=self.top_k, renormalize=False)
        self.queue = self.layer.queue
        self._torch_weights = None

    def device_inputs(self, p: dict) -> tuple[Any, list[tuple[Any, Any]]]:
        x = to_device(p["x"], self.queue)
        routings = [(to_device(w, self.queue), to_device(i, self.queue)) for w, i in p["routings"]]
        return x, routings

    def experts_call(self, x: Any, routings: list, path: str) -> Rotating:
        """``layer.experts`` on device arrays along ``path``, waited for, routing rotated."""
        layer, queue = self.layer, self.queue

        def run(w: Any, i: Any) -> None:
            layer.experts(x, w, i, path=path)
            queue.wait()

        return Rotating(run, routings)

    def plan(self, num_tokens: int) -> Any:
        return self.layer.plan(num_tokens)

    def torch_weights(self, torch: Any) -> list:
        if self._torch_weights is None:
            tdt = getattr(torch, self.dtype)
            self._torch_weights = [torch.from_numpy(self.weights[k].astype(np.float32)).to(tdt)
                                   for k in ("gate", "up", "down")]
        return self._torch_weights


def naive_dpnp(x, gate, up, down, weights, ids_host, top_k):
    """The obvious dpnp program: per expert, take its tokens, three matmuls, scatter back."""
    dpnp = _dpnp()
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


def time_naive_dpnp(work: Workload, p: dict, repeats: int) -> list[float]:
    """The naive loop on float32 device copies (dpnp has no bfloat16), freed on return."""
    dpnp = _dpnp()
    f32 = [dpnp.asarray(work.weights[k].astype(np.float32), sycl_queue=work.queue)
           for k in ("gate", "up", "down")]
    x32 = dpnp.asarray(p["x"].astype(np.float32), sycl_queue=work.queue)
    return sample_times(Rotating(
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


def _plan_columns(row: dict, plan: Any) -> None:
    row["plan"] = plan.path
    row["dpmoe_plan"] = str(plan)
    row["plan_source"] = getattr(plan, "source", "")


def bench_moe(work: Workload, num_tokens: int, repeats: int, torch: Any = None) -> dict:
    """One point: dpmoe's paths and every baseline on the same inputs (see the module doc).
    GB/s, GFLOP/s and the roofline are added by :meth:`Limits.apply`."""
    config, dtype, top_k = work.config, work.dtype, work.top_k
    p = make_inputs(config, dtype, num_tokens)
    x, routings = work.device_inputs(p)
    row: dict[str, Any] = {"test": "moe", "config": config, "dtype": dtype, "tokens": num_tokens}
    plan = work.plan(num_tokens)
    _plan_columns(row, plan)
    medians = {}
    for path in PATHS:
        if path == "per_token" and num_tokens > TUNE_PER_TOKEN_MAX_TOKENS and plan.path != path:
            continue
        medians[path] = record(row, f"{path}_ms", sample_times(
            work.experts_call(x, routings, path), repeats))
    row["dpmoe_path"] = min(medians, key=medians.get)
    copy_stats(row, "dpmoe_ms", f"{row['dpmoe_path']}_ms")
    quantized = dtype in quant.FORMATS  # no float baselines: dpmoe's bf16 rows are the baseline
    if num_tokens <= REFERENCE_MAX_TOKENS and not quantized:
        w = work.weights
        record(row, "reference_ms", sample_times(Rotating(
            lambda tw, ti: reference.fused_moe_forward(p["x"], w["gate"], w["up"], w["down"],
                                                       tw, ti, top_k, False),
            p["routings"]), min(repeats, REFERENCE_MAX_REPEATS), warmup=0))
    if not quantized:
        record(row, "naive_dpnp_ms", time_naive_dpnp(work, p, repeats))
    if torch is not None and not quantized:
        tw = work.torch_weights(torch)
        tx = torch.from_numpy(p["x"].astype(np.float32)).to(getattr(torch, dtype))
        sets = [(torch.from_numpy(w), torch.from_numpy(i.astype(np.int64)))
                for w, i in p["routings"]]
        with torch.inference_mode():
            for name in ("torch-masked", "torch-grouped"):
                record(row, name.replace("-", "_") + "_ms", sample_times(Rotating(
                    lambda w, i, name=name: torch_variants(torch, tx, *tw, w, i)[name](), sets),
                    repeats))
        row["torch_best"] = min(("torch-masked", "torch-grouped"),
                                key=lambda n: row[n.replace("-", "_") + "_ms"])
        copy_stats(row, "torch_ms", row["torch_best"].replace("-", "_") + "_ms")
        row["speedup_vs_torch"] = row["torch_ms"] / row["dpmoe_ms"]
    if quantized:  # codes and scales
        itemsize = sum(work.weights[k].nbytes for k in ("gate", "up", "down")) / (
            3 * work.experts * work.hidden * work.inter)
    else:
        itemsize = HOST_DTYPE[dtype].itemsize
    row["bytes_per_weight"] = itemsize
    distinct = float(np.mean([len(np.unique(i)) for _, i in p["routings"]]))
    row["weight_bytes"] = distinct * 3 * work.hidden * work.inter * itemsize
    row["flops"] = 2 * 3 * num_tokens * top_k * work.hidden * work.inter
    return row


def bench_overhead(work: Workload, num_tokens: int, repeats: int) -> dict:
    """What a call costs beyond its kernels' work, on a config whose kernels do almost
    nothing (``tiny``): ``layer.experts`` on device arrays by each path, and a whole
    ``MoELayer`` call with NumPy in and out (upload, router, routing, experts, download)
    as dpmoe_ms."""
    p = make_inputs(work.config, work.dtype, num_tokens)
    x, routings = work.device_inputs(p)
    repeats = max(repeats, OVERHEAD_MIN_REPEATS)
    row: dict[str, Any] = {"test": "overhead", "config": work.config, "dtype": work.dtype,
                           "tokens": num_tokens}
    _plan_columns(row, work.plan(num_tokens))
    for path in PATHS:
        record(row, f"{path}_ms", sample_times(work.experts_call(x, routings, path), repeats))
    record(row, "dpmoe_ms", sample_times(lambda: work.layer(p["x"]), repeats))
    return row


def ep_layer(config: str, dtype: str, comm: Any, replies: str = "float32") -> Any:
    """The benchmark's weights for ``config`` (the same seed on every rank) as an
    :class:`dpmoe.distributed.ExpertParallelMoE` over ``comm``; each rank keeps its experts."""
    from .distributed import ExpertParallelMoE

    w = make_weights(config, dtype)
    return ExpertParallelMoE.from_numpy(w["router"], w["gate"], w["up"], w["down"],
                                        MODEL_CONFIGS[config][3], comm=comm, replies=replies)


def bench_ep(ep: Any, config: str, dtype: str, num_tokens: int, repeats: int) -> dict | None:
    """An :class:`dpmoe.distributed.ExpertParallelMoE` forward (router, exchange, experts,
    shared nothing) with ``num_tokens`` tokens on each rank of ``comm``, device arrays in.
    Each call is timed from a barrier to the slowest rank's return; the row (on rank 0, None
    elsewhere) has that time, tokens/s of the whole job, the share of the ranks' time per
    stage (all-to-all = counts + dispatch + return, waiting for other ranks included) and
    the bytes each token sends to and receives from other ranks."""
    from mpi4py import MPI

    from .distributed import STAGES

    hidden, _, experts, _ = MODEL_CONFIGS[config]
    comm = ep.comm
    rng = np.random.default_rng([comm.rank, num_tokens])
    xs = [to_device(rng.standard_normal((num_tokens, hidden), dtype=np.float32)
                    .astype(HOST_DTYPE[tokens_dtype(dtype)]), ep.queue) for _ in range(ROUTINGS)]
    calls = iter(range(1 << 30))

    def step() -> None:
        comm.Barrier()
        ep(xs[next(calls) % ROUTINGS])
        ep.queue.wait()

    sample_times(step, 0, WARMUP)
    ep.reset_stats()
    mine = sample_times(step, repeats, 0)
    slowest = [comm.allreduce(t, op=MPI.MAX) for t in mine]
    stats = comm.gather(ep.stats, root=0)
    if comm.rank != 0:
        return None
    total = {k: sum(s[k] for s in stats) for k in stats[0]}
    busy = sum(total[k] for k in STAGES) or 1.0
    row: dict[str, Any] = {"test": "ep", "config": config, "dtype": dtype, "tokens": num_tokens,
                           "ranks": comm.size, "replies": ep.replies,
                           "experts_per_rank": -(-experts // comm.size)}
    median = record(row, "ep_ms", slowest)
    row["tokens_per_s"] = comm.size * num_tokens / (median / 1e3)
    row["alltoall_pct"] = 100 * (total["counts"] + total["dispatch"] + total["return"]) / busy
    row["experts_pct"] = 100 * total["experts"] / busy
    row["route_combine_pct"] = 100 * (total["route"] + total["combine"]) / busy
    tokens_done = num_tokens * total["calls"]  # calls summed over the ranks
    row["bytes_per_token"] = total["bytes_sent"] / tokens_done if tokens_done else 0.0
    row["stage_seconds"] = {k: total[k] for k in STAGES}
    return row


def run_ep(args: argparse.Namespace) -> int:
    """``--test ep`` on every rank of MPI.COMM_WORLD; rank 0 prints and writes."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefaultConfigWarning)
        points = [(c, d, r, t) for c in args.config for d in args.dtype for r in args.replies
                  for t in args.tokens]
        ep, built = None, None
        for config, dtype, replies, tokens in (_progress(points, "bench ep") if comm.rank == 0
                                               else points):
            if built != (config, dtype, replies):
                ep = None  # free the previous layer's device memory first
                ep, built = ep_layer(config, dtype, comm, replies), (config, dtype, replies)
            row = bench_ep(ep, config, dtype, tokens, args.repeats)
            if row is not None:
                rows.append(row)
    if comm.rank != 0:
        return 0
    about = info()
    machine = machine_description(about["device"], about["filter_string"])
    print(f"device: {machine}; {comm.size} rank(s), {MPI.Get_library_version().splitlines()[0]}")
    print(f"test ep: ms per forward (barrier to the slowest rank), median (min-max) of "
          f"{args.repeats} calls after {WARMUP} warm-up calls; tokens per rank; shares of the "
          "ranks' summed time; bytes each token sends to and receives from other ranks")
    print_table(rows)
    out = Path(args.json).resolve()
    with open(out, "w") as f:
        json.dump({"test": "ep", "argv": sys.argv[1:], "ranks": comm.size,
                   "mpi": MPI.Get_library_version().splitlines()[0], "machine": machine,
                   "cpu": cpu_info(), "repeats": args.repeats, "warmup": WARMUP,
                   "rows": rows}, f, indent=1)
    print(f"wrote JSON: {out}")
    return 0


def write_checkpoint(folder: Path, config: str, dtype: str, seed: int = 0) -> Path:
    """One OLMoE-style MoE layer of ``config``'s shapes as a safetensors checkpoint (experts
    one [out, in] tensor each, as the Hugging Face checkpoints store them), in ``folder``."""
    hidden, inter, experts, top_k = MODEL_CONFIGS[config]
    rng = np.random.default_rng(seed)
    stored = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
    p = "model.layers.0.mlp."
    shapes = {p + "gate.weight": (experts, hidden)}
    for e in range(experts):
        for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                            ("down_proj", (hidden, inter))):
            shapes[f"{p}experts.{e}.{name}.weight"] = shape
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * HOST_DTYPE[dtype].itemsize
        header[name] = {"dtype": stored, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, shape in shapes.items():  # one tensor at a time: no whole copy in memory
            values = rng.standard_normal(shape, dtype=np.float32) / np.float32(shape[1] ** 0.5)
            f.write(values.astype(HOST_DTYPE[dtype]).tobytes())
    (folder / "config.json").write_text(json.dumps({
        "model_type": "olmoe", "num_hidden_layers": 1, "hidden_size": hidden,
        "intermediate_size": inter, "num_experts": experts, "num_experts_per_tok": top_k}))
    return folder


def bench_load(folder: Path, layer: int, repeats: int, label: dict) -> dict:
    """Building one layer with :func:`dpmoe.models.from_pretrained` (warm page cache) against
    a plain read of the same tensors' bytes (into recycled buffers: ``read_ms``; into new
    arrays held to the end: ``read_kept_ms``). The layer is freed outside the timing."""
    import gc

    from . import models
    from .checkpoint import Checkpoint

    checkpoint = Checkpoint(folder)
    prefix = f"layers.{layer}."
    names = [n for n in checkpoint.names() if prefix in n and ".experts." in n]
    spans = [checkpoint.location(name) for name in names]  # (file, offset, bytes)
    total = sum(n for _, _, n in spans)

    def plain_read(keep: bool = False) -> list:
        """The bytes read into new arrays, each freed before the next is made (malloc hands
        the same, already mapped, memory back: a pure copy out of the page cache) or, with
        ``keep``, all held to the end (new memory, as a loader needs)."""
        kept = []
        for path, offset, size in spans:
            with open(path, "rb", buffering=0) as f:
                f.seek(offset)
                buffer = np.empty(size, np.uint8)
                f.readinto(buffer)
                if keep:
                    kept.append(buffer)
        return kept

    def load() -> Any:
        built = models.from_pretrained(folder, layer)
        if built.queue is not None:
            built.queue.wait()
        return built  # freed outside the timing: freeing is not part of loading

    row = dict(label, test="load", MB=total / 1e6)
    read = record(row, "read_ms", sample_times(plain_read, repeats))
    record(row, "read_kept_ms", sample_times(lambda: plain_read(keep=True), repeats,
                                             teardown=gc.collect))
    built = record(row, "load_ms", sample_times(load, repeats, teardown=gc.collect))
    row["read_GBps"] = total / read / 1e6
    row["load_GBps"] = total / built / 1e6
    row["load_vs_read_pct"] = 100 * read / built
    return row


def run_load(args: argparse.Namespace) -> int:
    """``--test load``: a checkpoint per --config and --dtype written to a temporary folder
    (or --checkpoint), then loaded."""
    import tempfile

    about = info()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dpmoe-bench-") as scratch:
        if args.checkpoint:
            rows.append(bench_load(Path(args.checkpoint), args.layer, args.repeats,
                                   {"config": Path(args.checkpoint).name, "dtype": "as stored"}))
        else:
            for config in args.config:
                for dtype in args.dtype:
                    folder = write_checkpoint(Path(scratch) / f"{config}-{dtype}", config, dtype)
                    rows.append(bench_load(folder, 0, args.repeats,
                                           {"config": config, "dtype": dtype}))
                    for file in folder.iterdir():
                        file.unlink()
    print(f"device: {machine_description(about['device'], about['filter_string'])}")
    print(f"test load: one MoE layer's experts, ms per build (from_pretrained) and per plain "
          f"read of the same bytes (read: buffers recycled by malloc, a pure copy out of the "
          f"page cache; read_kept: new arrays held to the end), median (min-max) of {args.repeats} after "
          f"{WARMUP} warm-up (page cache warm)")
    print_table(rows)
    out = Path(args.json).resolve()
    with open(out, "w") as f:
        json.dump({"test": "load", "argv": sys.argv[1:], "cpu": cpu_info(),
                   "device": about["device"], "repeats": args.repeats, "rows": rows}, f, indent=1)
    print(f"wrote JSON: {out}")
    return 0


def add_peers(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """Each peer's times as ``<peer>_ms`` columns of the float rows (same weights, tokens and
    routings as dpmoe's, through :mod:`dpmoe.peers`), ``speedup_vs_<peer>``; notes on what
    ran where and on any peer that failed or disagreed with the reference."""
    from . import peers

    notes = []
    runs = set().union(*(peers.DTYPES.get(peer, ()) for peer in args.peers))
    groups = dict.fromkeys((r["config"], r["dtype"]) for r in rows if r["dtype"] in runs)
    for config, dtype in _progress(list(groups), "peers"):
        weights = make_weights(config, dtype)
        mine = {r["tokens"]: r for r in rows if (r["config"], r["dtype"]) == (config, dtype)}
        token_counts = sorted(set(mine) | {peers.CHECK_TOKENS})
        inputs = {t: make_inputs(config, dtype, t) for t in token_counts}
        for peer in (p for p in args.peers if dtype in peers.DTYPES.get(p, ())):
            result = peers.run(peer, weights, inputs, dtype, args.repeats, WARMUP)
            if "error" in result:
                notes.append(f"peer {peer}, {config} {dtype}: {result['error']}")
                continue
            if not result["passed"]:
                notes.append(f"peer {peer}, {config} {dtype}: FAILED the check at T="
                             f"{peers.CHECK_TOKENS} (error {result['check_error']:.1e} of the "
                             "output's scale): not timed")
                continue
            notes.append(f"peer {result['version']}, {config} {dtype}: check at T="
                         f"{peers.CHECK_TOKENS} passed (error {result['check_error']:.1e})")
            for tokens, row in mine.items():
                record(row, f"{peer}_ms", result["seconds"][tokens])
                row[f"speedup_vs_{peer}"] = row[f"{peer}_ms"] / row["dpmoe_ms"]
    return notes


def tune(config: str, dtype: str, token_counts: list[int], repeats: int,
         directory: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Measure both paths at each token count; save the faster per count through
    :func:`dpmoe.tuning.save_configs` (default folder: ``dpmoe.tuning.user_config_dir()``).
    Returns the file's absolute path."""
    from . import tuning

    work = Workload(config, dtype)
    choices = {}
    for num_tokens in token_counts:
        p = make_inputs(config, dtype, num_tokens)
        x, routings = work.device_inputs(p)
        stats = {}
        for path in PATHS:
            if path == "per_token" and num_tokens > TUNE_PER_TOKEN_MAX_TOKENS:
                continue
            stats[path] = summary(sample_times(work.experts_call(x, routings, path), repeats))
        best = min(stats, key=lambda k: stats[k]["median"])
        choices[num_tokens] = {
            "path": best,
            "ms": {k: round(s["median"], 3) for k, s in stats.items()},  # medians
            "ms_min_max": {k: f"{s['min']:.3f}-{s['max']:.3f}" for k, s in stats.items()}}
        log(f"  {config} {dtype} T={num_tokens}: "
            + ", ".join(f"{k} {format_spread(s)} ms" for k, s in stats.items()) + f" -> {best}")
    path = tuning.save_configs(choices, work.experts, work.inter, dtype,
                               work.queue.sycl_device.name, directory)
    return Path(path).resolve()


def bench_kernel(test: str, config: str, dtype: str, num_tokens: int, repeats: int,
                 torch: Any = None) -> dict:
    """Micro-benchmarks of one stage: silu, align or routing."""
    from . import moe_align_block_size, silu_and_mul, topk_softmax
    from .device import default_queue

    queue, _ = default_queue()
    hidden, inter, experts, top_k = MODEL_CONFIGS[config]
    rng = np.random.default_rng(0)
    row: dict[str, Any] = {"test": test, "config": config, "dtype": dtype, "tokens": num_tokens}
    if test == "silu":
        h = rng.standard_normal((num_tokens * top_k, 2 * inter), dtype=np.float32)
        dtype = tokens_dtype(dtype)
        h = h.astype(HOST_DTYPE[dtype])
        d = to_device(h, queue)
        record(row, "dpmoe_ms", sample_times(lambda: (silu_and_mul(d), queue.wait()), repeats))
        record(row, "reference_ms", sample_times(lambda: reference.silu_and_mul(h), repeats))
        if torch is not None:
            th = torch.from_numpy(h.astype(np.float32)).to(getattr(torch, dtype))
            record(row, "torch_ms", sample_times(
                lambda: torch.nn.functional.silu(th[:, :inter]) * th[:, inter:], repeats))
    elif test == "align":
        logits = rng.standard_normal((num_tokens, experts), dtype=np.float32)
        _, ids = reference.topk_softmax(logits, top_k)
        d = to_device(ids, queue)
        record(row, "dpmoe_ms", sample_times(
            lambda: (moe_align_block_size(d, experts, 16), queue.wait()), repeats))
        record(row, "reference_ms", sample_times(
            lambda: reference.moe_align_block_size(ids, experts, 16), repeats))
    elif test == "routing":
        logits = rng.standard_normal((num_tokens, experts), dtype=np.float32)
        d = to_device(logits, queue)
        record(row, "dpmoe_ms", sample_times(
            lambda: (topk_softmax(d, top_k, True), queue.wait()), repeats))
        record(row, "reference_ms", sample_times(
            lambda: reference.topk_softmax(logits, top_k, True), repeats))
        if torch is not None:
            tl = torch.from_numpy(logits)
            record(row, "torch_ms", sample_times(
                lambda: torch.topk(torch.softmax(tl, -1), top_k, -1), repeats))
    else:
        raise ValueError(f"unknown test {test!r}")
    if "torch_ms" in row:
        row["speedup_vs_torch"] = row["torch_ms"] / row["dpmoe_ms"]
    return row


# ---------------------------------------------------------------------------- output

TABLE_COLUMNS = ("config", "dtype", "layout", "tokens", "ranks", "replies", "plan", "dpmoe_ms", "dpmoe_path",
                 "grouped_ms", "per_token_ms", "torch_ms", "torch_best", "naive_dpnp_ms",
                 "reference_ms", "GFLOPs", "bytes_per_weight", "GBps", "roofline_pct",
                 "speedup_vs_torch", "ipex_ms", "speedup_vs_ipex", "speedup_vs_bf16", "ep_ms",
                 "tokens_per_s", "alltoall_pct", "experts_pct", "route_combine_pct",
                 "bytes_per_token", "MB", "read_ms", "read_kept_ms", "load_ms", "read_GBps", "load_GBps",
                 "load_vs_read_pct")
# the moe table reports the faster path as dpmoe_ms (the JSON and the plot keep each path)
HIDDEN_IN_MOE_TABLE = ("grouped_ms", "per_token_ms")
# (column, label) of the lines of the plot, dpmoe's first
PLOT_SERIES = (("grouped_ms", "dpmoe grouped"), ("per_token_ms", "dpmoe per_token"),
               ("dpmoe_ms", "dpmoe"), ("torch_masked_ms", "torch masked loop"),
               ("torch_grouped_ms", "torch grouped loop"), ("torch_ms", "torch"),
               ("naive_dpnp_ms", "naive dpnp loop"), ("reference_ms", "NumPy reference"),
               ("ipex_ms", "IPEX 2.8"))


def _fmt_ms(v: float) -> str:
    """Three significant figures (no exponent)."""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def format_spread(stats: dict) -> str:
    return f"{_fmt_ms(stats['median'])} ({_fmt_ms(stats['min'])}-{_fmt_ms(stats['max'])})"


def _cell(row: dict, column: str) -> str:
    if column not in row:
        return ""
    v = row[column]
    if column in row.get("stats", {}):
        return format_spread(row["stats"][column])
    if column == "roofline_pct":
        return f"{v:.1f}" + ("*" if row.get("limit_exceeded") else "")
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def print_table(rows: list[dict], file: Any = None) -> None:
    """A Markdown table; times as ``median (min-max)`` in ms."""
    if not rows:
        return
    moe = all(r.get("test") == "moe" for r in rows)
    columns = [c for c in TABLE_COLUMNS if any(c in r for r in rows)
               and not (moe and c in HIDDEN_IN_MOE_TABLE)]
    table = [columns] + [[_cell(r, c) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for i, line in enumerate(table):
        print("| " + " | ".join(cell.rjust(w) for cell, w in zip(line, widths)) + " |", file=file)
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)


def plot(rows: list[dict], path: str | Path, title: str = "", device: str = "") -> Path:
    """A PNG of the times per call (ms) against the tokens, log-log, one panel per (config,
    dtype), one line per variant measured (median, bars from min to max). Drawn with
    matplotlib's Agg canvas (no display, no pyplot state). Returns the absolute path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    configs = list(dict.fromkeys(r["config"] for r in rows))
    # a panel per dtype (and weight layout, when the run compared them)
    dtypes = list(dict.fromkeys((r["dtype"], r.get("layout")) for r in rows))
    present = [c for c, _ in PLOT_SERIES if any(c in r.get("stats", {}) for r in rows)]
    if {"grouped_ms", "per_token_ms"} & set(present) and rows[0].get("test") == "moe":
        present.remove("dpmoe_ms")  # the faster of the two paths: already drawn
    if "torch_masked_ms" in present:
        present.remove("torch_ms")
    labels = dict(PLOT_SERIES)
    width = max(7.5, 4.2 * len(dtypes) + 1.5)
    fig = Figure(figsize=(width, 3.4 * len(configs) + 1.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(configs), len(dtypes), squeeze=False)
    styles = {c: dict(color=f"C{i}", lw=2.2 if c in ("grouped_ms", "per_token_ms", "dpmoe_ms")
                      else 1.2, marker="os^v<>Dp"[i % 8]) for i, c in enumerate(present)}
    handles = {}
    for (i, config), (j, dtype) in ((a, b) for a in enumerate(configs) for b in enumerate(dtypes)):
        ax = axes[i][j]
        points = sorted((r for r in rows if r["config"] == config
                         and (r["dtype"], r.get("layout")) == dtype), key=lambda r: r["tokens"])
        for column in present:
            pts = [r for r in points if column in r.get("stats", {})]
            if not pts:
                continue
            s = [r["stats"][column] for r in pts]
            med = np.array([x["median"] for x in s])
            err = np.array([med - [x["min"] for x in s], [x["max"] for x in s] - med])
            handles[column] = ax.errorbar([r["tokens"] for r in pts], med, yerr=err, capsize=2,
                                          ms=4, label=labels[column], **styles[column])
        tokens = sorted({r["tokens"] for r in points})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(tokens, [str(t) for t in tokens])
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured token counts
        ax.set_title(f"{config} ({describe(config)}), {' '.join(filter(None, dtype))}",
                     fontsize=9)
        ax.set_xlabel("tokens per call (T)")
        ax.set_ylabel("ms per call")
        ax.grid(True, which="both", alpha=0.3)
    lines = [line for t in (title, device) if t for line in textwrap.wrap(t, int(width * 13))]
    fig.suptitle("\n".join(lines), fontsize=10)
    fig.legend([handles[c] for c in present if c in handles],
               [labels[c] for c in present if c in handles], loc="outside lower center",
               ncol=min(4, len(handles)), fontsize=8)
    path = Path(path).resolve()
    fig.savefig(path, dpi=110)
    return path


def plot_formats(rows: list[dict], path: str | Path, title: str = "", device: str = "") -> Path:
    """A PNG of dpmoe's time per call by weight format (a bar per dtype, bars from min to
    max), one panel per (config, token count): the quantized formats next to bf16. Returns
    the absolute path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows if "dpmoe_ms" in r.get("stats", {})))
    panels = list(dict.fromkeys((r["config"], r["tokens"]) for r in rows))
    columns = min(4, len(panels))
    lines = -(-len(panels) // columns)
    fig = Figure(figsize=(3.2 * columns + 1, 2.9 * lines + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(lines, columns, squeeze=False)
    for ax, (config, tokens) in zip(axes.flat, panels):
        found = {r["dtype"]: r for r in rows if (r["config"], r["tokens"]) == (config, tokens)
                 and "dpmoe_ms" in r.get("stats", {})}
        names = [d for d in dtypes if d in found]
        stats = [found[d]["stats"]["dpmoe_ms"] for d in names]
        med = np.array([x["median"] for x in stats])
        err = np.array([med - [x["min"] for x in stats], [x["max"] for x in stats] - med])
        ax.bar(range(len(names)), med, yerr=err, capsize=3,
               color=[f"C{dtypes.index(d)}" for d in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{config}, T={tokens}", fontsize=9)
        ax.set_ylabel("ms per call")
        ax.grid(True, axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    text = [line for t in (title, device) if t for line in textwrap.wrap(t, 13 * columns * 3)]
    fig.suptitle("\n".join(text), fontsize=10)
    path = Path(path).resolve()
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------- command line


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and ends every option's help with its default
    (lists as space-separated values), like ``ArgumentDefaultsHelpFormatter``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(str(v) for v in default)
        return f"{text} (default: {default})"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dpmoe.bench", description=__doc__, formatter_class=_HelpFormatter,
        epilog="configs (dpmoe/configs.py):\n" + "\n".join(
            f"  {name:<14} {describe(name)}" for name in MODEL_CONFIGS))
    parser.add_argument("--test", default="moe", choices=TESTS,
                        help="what to time: moe = dpmoe's experts against the baselines; "
                             "silu, align, routing = one stage; overhead = the host cost of a "
                             "call, each path and a whole MoELayer call (use --config tiny); "
                             "ep = an expert-parallel layer over the ranks of `mpiexec -n N`; "
                             "load = building a layer from a safetensors checkpoint against a "
                             "plain read of its bytes")
    parser.add_argument("--config", nargs="+", choices=list(MODEL_CONFIGS),
                        default=[c for c in MODEL_CONFIGS if c != "tiny"], metavar="CONFIG",
                        help="model shapes to run, any of: " + ", ".join(MODEL_CONFIGS))
    parser.add_argument("--tokens", nargs="+", type=_positive_int, default=[1, 16, 128, 1024],
                        metavar="T", help="tokens per call (T), one point per count")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                        choices=list(DTYPES), metavar="DTYPE",
                        help="weight and activation dtypes, any of: " + ", ".join(DTYPES)
                             + " (quantized formats with bfloat16 tokens; add bfloat16 for "
                             "their speedup over it)")
    parser.add_argument("--layout", nargs="+", choices=("x@W", "x@W^T"), default=["x@W"],
                        help="how the layer's float expert weights lie on the device (moe, "
                             "overhead): x@W = dpmoe's gate/up [E, H, I], down [E, I, H]; "
                             "x@W^T = each matrix [out, in], as checkpoints store them and "
                             "models.from_pretrained keeps them; both: side by side in one "
                             "run (default: x@W)")
    parser.add_argument("--repeats", type=_positive_int, default=5,
                        help=f"timed calls per measurement, after {WARMUP} warm-up calls; "
                             "times are their median and spread (min-max in the table, all "
                             f"samples and quartiles in the JSON); the reference makes at most "
                             f"{REFERENCE_MAX_REPEATS}, --test overhead at least "
                             f"{OVERHEAD_MIN_REPEATS}")
    parser.add_argument("--json", default="bench_results.json", metavar="PATH",
                        help="where to write the rows (every sample, medians, quartiles, the "
                             "plan per row) and the limits")
    parser.add_argument("--plot", nargs="?", const="bench_results.png", default=None,
                        metavar="PNG",
                        help="also write a PNG of the times per call of every variant (ms "
                             "against tokens, log axes, one panel per config and dtype); "
                             "without a value to %(const)s (default: no plot)")
    parser.add_argument("--replies", nargs="+", default=["float32"], choices=["float32", "tokens"],
                        help="--test ep: the dtype expert outputs travel back in (float32: "
                             "bit-identical to one process; tokens: the tokens' dtype)")
    parser.add_argument("--peers", nargs="+", default=[], metavar="PEER", choices=list(PEERS),
                        help="also time these peers, each in its own virtual environment "
                             "(dpmoe.peers: ipex = IPEX 2.8's fused_experts for bf16 and, "
                             "weight-only, for int8, GatedMLPMOE for float32; pytorch = a plain "
                             "PyTorch loop, float32 and bf16), on the same weights, tokens and "
                             "routings, after checking each against the reference at T=16 "
                             "(--test moe)")
    parser.add_argument("--setup-peers", nargs="+", default=[], metavar="PEER",
                        help="create the peers' virtual environments (under DPMOE_PEERS_DIR, "
                             "default ~/.cache/dpmoe/peers) and exit")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="--test load: time this checkpoint directory (its --layer) instead "
                             "of checkpoints written for --config and --dtype")
    parser.add_argument("--layer", type=int, default=0,
                        help="--test load with --checkpoint: the decoder layer to build")
    parser.add_argument("--tune", action="store_true",
                        help="instead of benchmarking, measure both execution paths at each "
                             "--tokens count and write the faster per count as this device's "
                             "tuned config for each --config and --dtype")
    parser.add_argument("--tune-dir", default=None, metavar="DIR",
                        help="where --tune writes (default: dpmoe.tuning.user_config_dir(), "
                             "here " + str(user_config_dir()).replace("%", "%%") + ": "
                             "DPMOE_TUNED_CONFIG_DIR if set, else the user's cache folder; "
                             "dpmoe reads it before the configs shipped in the package)")
    return parser


def _progress(points: list, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return points
    return tqdm(points, desc=desc, file=sys.stderr)


def run_tune(args: argparse.Namespace) -> int:
    from . import tuning

    written = []
    for config in args.config:
        for dtype in args.dtype:
            path = tune(config, dtype, args.tokens, args.repeats, args.tune_dir)
            print(f"wrote tuned config: {path}")
            written.append(path)
    reads = Path(tuning.user_config_dir()).resolve()
    if any(p.parent != reads for p in written):
        print(f"note: dpmoe reads tuned configs from {reads} (dpmoe.tuning.user_config_dir(); "
              "set DPMOE_TUNED_CONFIG_DIR to change it) and then from the package; files "
              "written elsewhere are not read until you point DPMOE_TUNED_CONFIG_DIR there")
    else:
        print(f"dpmoe reads them from {reads} from now on (before the packaged configs)")
    return 0


def _measure(args: argparse.Namespace, work: Workload | None, config: str, dtype: str,
             tokens: int, limits: Limits | None, torch: Any) -> dict:
    """One point's row (``work``: the (config, dtype) workload of moe and overhead)."""
    if args.test == "moe":
        row = bench_moe(work, tokens, args.repeats, torch)
        limits.probe()  # between points, and after the last
        return row
    if args.test == "overhead":
        return bench_overhead(work, tokens, args.repeats)
    return bench_kernel(args.test, config, dtype, tokens, args.repeats, torch)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    about = info()
    if about["backend"] != "sycl":
        print(f"no SYCL device: {about['fallback_reason']}")
        return 1
    if args.setup_peers:
        from . import peers

        for peer in args.setup_peers:
            print(f"{peer}: {peers.setup(peer)}")
        return 0
    if args.tune:
        return run_tune(args)
    if args.test == "ep":
        return run_ep(args)
    if args.test == "load":
        return run_load(args)
    torch = _torch()
    machine = machine_description(about["device"], about["filter_string"])
    points = [(c, d, lay, t) for c in args.config for d in args.dtype for lay in args.layout
              for t in args.tokens]
    limits = None
    if args.test == "moe":
        from .device import default_queue

        limits = Limits(default_queue()[0], [tokens_dtype(d) for d in args.dtype], torch)
        limits.probe()
    rows: list[dict] = []
    work: Workload | None = None
    with warnings.catch_warnings():  # rows say where each plan came from; a note sums it up
        warnings.simplefilter("ignore", DefaultConfigWarning)
        for config, dtype, layout, tokens in _progress(points, f"bench {args.test}"):
            if args.test in ("moe", "overhead") and (
                    work is None or (work.config, work.dtype, work.layout) != (config, dtype, layout)):
                work = None  # free the previous layer's device memory first
                work = Workload(config, dtype, layout)
            rows.append(_measure(args, work, config, dtype, tokens, limits, torch))
            if work is not None and args.layout != ["x@W"]:
                rows[-1]["layout"] = layout
    work = None
    peer_notes = add_peers(rows, args) if args.peers and args.test == "moe" else []

    print(f"device: {machine}")
    notes = []
    bf16_ms = {(r["config"], r["tokens"]): r["dpmoe_ms"] for r in rows
               if r.get("dtype") == "bfloat16" and "dpmoe_ms" in r}
    for row in rows:  # quantized against dpmoe's own bf16, measured in the same run
        if row.get("dtype") in quant.FORMATS and (row["config"], row["tokens"]) in bf16_ms:
            row["speedup_vs_bf16"] = bf16_ms[row["config"], row["tokens"]] / row["dpmoe_ms"]
    if limits is not None:
        for row in rows:
            limits.apply(row)
        print(f"limits (best of {limits.rounds} probe rounds, interleaved with the points): "
              f"read {limits.read_GBps:.1f} GB/s; GEMM "
              + ", ".join(f"{d} {limits.gemm_GFLOPs(d):.1f}" for d in args.dtype) + " GFLOP/s")
        print("  probes: " + ", ".join(f"{k} {v:.1f}" for k, v in limits.best.items()))
        exceeded = [r for r in rows if r["limit_exceeded"]]
        if exceeded:
            notes.append(
                "* limit exceeded: " + ", ".join(
                    f"{r['config']} {r['dtype']} T={r['tokens']} at "
                    f"{r['roofline_pct_measured']:.0f}%" for r in exceeded)
                + " of the probed limits, reported as 100: the weights were probably read from "
                  "the last-level cache, or no probe reached the device's peak")
    repeats = max(args.repeats, OVERHEAD_MIN_REPEATS) if args.test == "overhead" else args.repeats
    print(f"test {args.test}: times in ms per call, median (min-max) of {repeats} calls after "
          f"{WARMUP} warm-up calls" + (f" (reference: {min(repeats, REFERENCE_MAX_REPEATS)} "
                                       "calls, no warm-up)" if args.test == "moe" else ""))
    print_table(rows)
    untuned = sorted({(r["config"], r["dtype"]) for r in rows if r.get("plan_source") == "default"})
    if untuned:
        notes.append("plan: no tuned config for " + ", ".join(f"{c} {d}" for c, d in untuned)
                     + " on this device, the default chose the path; `--tune` writes one to "
                     + str(str(user_config_dir())))
    for note in peer_notes + notes:
        print(note)
    out = Path(args.json).resolve()
    with open(out, "w") as f:
        json.dump({"test": args.test, "argv": sys.argv[1:] if argv is None else list(argv),
                   "device": about["device"], "filter_string": about["filter_string"],
                   "machine": machine, "cpu": cpu_info(), "versions": about.get("versions"),
                   "repeats": repeats, "warmup": WARMUP,
                   "limits": limits.as_dict(args.dtype) if limits else {},
                   "limit_samples": limits.samples if limits else {},
                   "limit_probe_rounds": limits.rounds if limits else 0,
                   "rows": rows}, f, indent=1)
    print(f"wrote JSON: {out}")
    if args.plot:
        title = (f"python -m dpmoe.bench --test {args.test}: time per call, median of {repeats} "
                 "calls (bars: min-max)")
        print(f"wrote plot: {plot(rows, args.plot, title, machine)}")
        if any(r.get("dtype") in quant.FORMATS for r in rows):  # a bar per weight format
            bars = Path(args.plot).with_name(Path(args.plot).stem + "_formats.png")
            print(f"wrote plot: {plot_formats(rows, bars, title, machine)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
