"""The benchmark's peers: other CPU MoE kernels, each in a virtual environment of its own
(``python -m dpmoe.bench --setup-peers ipex`` makes it; ``--peers ipex`` times it).

The peers need torch versions dpmoe's environment does not have (IPEX 2.8 wants torch
2.8.*), so each runs :mod:`dpmoe.peer_worker` in a subprocess with its own interpreter, on
the benchmark's own weights, tokens and routings, written to files. Before any of its times
is reported, its output at T = 16 is compared with :func:`dpmoe.reference.fused_moe_forward`
on the same inputs; a peer that disagrees is reported as failing, not timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import reference
from .arrays import BFLOAT16
from .tuning import user_cache_dir

# peer -> what its environment installs (IPEX 2.8's CPU build pairs with torch 2.8.*);
# "pytorch" is plain PyTorch in dpmoe's own environment, the worker protocol's test peer
PEERS: dict[str, list[str]] = {
    "ipex": ["torch==2.8.*", "intel-extension-for-pytorch==2.8.0", "numpy", "psutil"],
    "pytorch": [],
}
# the weight dtypes (dpmoe's names) each peer runs; int8 = dpmoe.quant's "int8" experts
# with bf16 tokens, handed over as codes and per-column scales (IPEX: its weight-only int8
# MoE; pytorch: the loop on the weights dequantised to bf16)
DTYPES: dict[str, tuple[str, ...]] = {"ipex": ("float32", "bfloat16", "int8"),
                                      "pytorch": ("float32", "bfloat16", "int8")}
CHECK_TOKENS = 16
# largest |peer - reference| over the reference's largest magnitude that passes the check
# (int8 runs bf16 tokens)
CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "int8": 2e-2}
WORKER = Path(__file__).with_name("peer_worker.py")


def peers_dir() -> Path:
    """``DPMOE_PEERS_DIR``, else ``$XDG_CACHE_HOME/dpmoe/peers`` (``~/.cache/dpmoe/peers``)."""
    return user_cache_dir("peers", "DPMOE_PEERS_DIR")


def interpreter(peer: str) -> Path:
    """The Python of ``peer``'s environment (dpmoe's own for "pytorch")."""
    if peer not in PEERS:
        raise ValueError(f"peer must be one of {sorted(PEERS)}, got {peer!r}")
    return Path(sys.executable) if peer == "pytorch" else peers_dir() / peer / "bin" / "python"


def setup(peer: str, log: Any = print) -> Path:
    """Creates (or completes) ``peer``'s virtual environment; returns its interpreter."""
    python = interpreter(peer)
    if peer == "pytorch":
        return python
    venv = python.parent.parent
    if not python.exists():
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log(f"installing {' '.join(PEERS[peer])} into {venv} (IPEX: a few GB with torch)")
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS[peer]], check=True)
    return python


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype == BFLOAT16 else a


def _weight_arrays(weights: dict) -> dict[str, np.ndarray]:
    """gate/up/down as the worker reads them: float arrays (bf16 as bits), or a quantized
    container's ``<name>_codes`` and ``<name>_scales``."""
    arrays = {}
    for name in ("gate", "up", "down"):
        w = weights[name]
        if getattr(w, "quantized", False):
            arrays[f"{name}_codes"], arrays[f"{name}_scales"] = w.data, w.scales
        else:
            arrays[name] = _bits(w)
    return arrays


def run(peer: str, weights: dict, inputs: dict[int, dict], dtype: str, repeats: int,
        warmup: int, timeout: float = 1800.0) -> dict:
    """Times ``peer`` on ``weights`` (gate/up/down host arrays, or ``dpmoe.quant`` containers
    for a quantized ``dtype`` of :data:`DTYPES`) for each token count of
    ``inputs`` ({T: make_inputs(...)}, T = 16 among them for the check). Returns {"version",
    "check_error", "passed", "seconds": {T: [...]}} or {"error": text} when the peer's
    environment is missing or its worker failed."""
    python = interpreter(peer)
    if not python.exists():
        return {"error": f"no environment for {peer} at {python.parent.parent} (make it with "
                         f"python -m dpmoe.bench --setup-peers {peer})"}
    with tempfile.TemporaryDirectory(prefix=f"dpmoe-peer-{peer}-") as scratch:
        folder = Path(scratch)
        np.savez(folder / "weights.npz", **_weight_arrays(weights))
        points = []
        for tokens, p in inputs.items():
            arrays = {"x": _bits(p["x"])}
            for i, (w, ids) in enumerate(p["routings"]):
                arrays[f"weights_{i}"], arrays[f"ids_{i}"] = w, ids.astype(np.int32)
            np.savez(folder / f"inputs_{tokens}.npz", **arrays)
            points.append({"tokens": tokens, "inputs": str(folder / f"inputs_{tokens}.npz")})
        request = {"peer": peer, "dtype": dtype, "weights": str(folder / "weights.npz"),
                   "points": points, "repeats": repeats, "warmup": warmup,
                   "check": {"tokens": CHECK_TOKENS, "out": str(folder / "check.npy")}}
        (folder / "request.json").write_text(json.dumps(request))
        done = subprocess.run([str(python), str(WORKER), str(folder / "request.json")],
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            return {"error": f"{peer} worker failed: {done.stderr.strip()[-800:]}"}
        result = json.loads(done.stdout.strip().splitlines()[-1])
        check = inputs[CHECK_TOKENS]
        w, ids = check["routings"][0]
        want = reference.fused_moe_forward(check["x"], weights["gate"], weights["up"],
                                           weights["down"], w, ids, w.shape[1], False)
        want = want.astype(np.float32)
        got = np.load(folder / "check.npy")
        error = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))
    passed = bool(error <= CHECK_TOLERANCE[dtype])
    return {"version": f"{peer} {result['version']} (torch {result['torch']}, "
                       f"{result['threads']} threads)", "check_error": error, "passed": passed,
            "seconds": {p["tokens"]: p["seconds"] for p in result["points"]} if passed else {}}
