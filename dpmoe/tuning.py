"""Execution choices per device, from tuned JSON files, with a documented default.

A file per (E, N = intermediate size, weight dtype, device name), named by
:func:`config_file_name`, maps token counts to choices::

    {"1": {"path": "per-token"}, "128": {"path": "grouped"}, ...}

:func:`get_config` picks the entry with the nearest token count. Without a file the default
is the grouped path when its GEMMs run on oneMKL's host BLAS (CPU devices: it won at every
token count measured), else the per-token path up to :data:`DEFAULT_PER_TOKEN_MAX_TOKENS`
tokens and the grouped path above; with one :class:`DefaultConfigWarning` per shape. ``python -m dpmoe.bench --tune``
measures both paths and writes the files through the same naming function.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from functools import lru_cache
from pathlib import Path

TUNED_DIR = Path(__file__).parent / "tuned"
# Below this many tokens the per-token GEMVs (weights read in place) beat gathering rows for
# dpnp.matmul's GEMMs; measured with the benchmark on the CPU device before host GEMMs.
DEFAULT_PER_TOKEN_MAX_TOKENS = 16
PATHS = ("per-token", "grouped")

_warned: set[tuple] = set()
_lock = threading.Lock()


class DefaultConfigWarning(UserWarning):
    """No tuned config for this shape and device: the heuristic default is used."""


def config_file_name(num_experts: int, inter: int, dtype: str, device_name: str) -> str:
    device = re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")
    return f"E={num_experts},N={inter},dtype={dtype},device={device}.json"


@lru_cache(maxsize=None)
def load_configs(file_name: str, directory: str) -> dict[int, dict] | None:
    path = Path(directory) / file_name
    if not path.exists():
        return None
    with open(path) as f:
        return {int(tokens): choice for tokens, choice in json.load(f).items()}


def default_config(num_tokens: int, host_gemm: bool = False) -> dict:
    per_token = not host_gemm and num_tokens <= DEFAULT_PER_TOKEN_MAX_TOKENS
    return {"path": "per-token" if per_token else "grouped"}


def get_config(num_experts: int, inter: int, dtype: str, device_name: str, num_tokens: int,
               host_gemm: bool = False) -> dict:
    """The choices for a call of ``num_tokens`` tokens: the tuned entry nearest in T.
    ``host_gemm``: whether the grouped GEMMs would run on oneMKL's host BLAS (the default
    then is the grouped path)."""
    name = config_file_name(num_experts, inter, dtype, device_name)
    configs = load_configs(name, str(TUNED_DIR))
    if not configs:
        key = (num_experts, inter, dtype, device_name)
        with _lock:
            first = key not in _warned
            _warned.add(key)
        if first:
            warnings.warn(
                f"dpmoe: no tuned config {name}; using the default (see dpmoe.tuning). "
                "Performance might be sub-optimal: python -m dpmoe.bench --tune writes one.",
                DefaultConfigWarning, stacklevel=3)
        return default_config(num_tokens, host_gemm)
    nearest = min(configs, key=lambda t: (abs(t - num_tokens), t))
    return configs[nearest]


def save_configs(configs: dict[int, dict], num_experts: int, inter: int, dtype: str,
                 device_name: str, directory: Path = TUNED_DIR) -> Path:
    path = Path(directory) / config_file_name(num_experts, inter, dtype, device_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({str(t): configs[t] for t in sorted(configs)}, f, indent=1)
        f.write("\n")
    load_configs.cache_clear()
    return path
