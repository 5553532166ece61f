"""Execution choices per device, from tuned JSON files, with a documented default.

A file per (E, N = intermediate size, weight dtype, device name), named by
:func:`config_file_name`, maps token counts to choices::

    {"1": {"path": "per_token"}, "128": {"path": "grouped"}, ...}

:func:`get_config` picks the entry with the nearest token count, from the user's folder
(:func:`user_config_dir`: ``DPMOE_TUNED_CONFIG_DIR``, else ``~/.cache/dpmoe/tuned``) before
the files shipped in the package. ``python -m dpmoe.bench --tune`` measures both paths and
writes there through the same naming function. Without a file, :func:`default_config`
decides, and one :class:`DefaultConfigWarning` per process says so. Only
:mod:`dpmoe._engine.plan` reads this module.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from functools import lru_cache
from pathlib import Path

from . import _fork

PACKAGED_DIR = Path(__file__).parent / "tuned"
PATHS = ("grouped", "per_token")
# Below this many tokens the per-token GEMVs (weights read in place) beat gathering rows,
# where the grouped GEMMs are not oneMKL's host float32 or AMX bf16 GEMMs (measured with
# the benchmark: the CPU device before host GEMMs, and an AMD EPYC without AMX, where a bf16
# OLMoE decode step took 66 ms grouped against 15 ms per-token).
DEFAULT_PER_TOKEN_MAX_TOKENS = 16

_warned = False
_lock = _fork.lock("dpmoe.tuning")


class DefaultConfigWarning(UserWarning):
    """No tuned config for this shape and device: the heuristic default is used."""


def user_cache_dir(name: str, variable: str) -> Path:
    """A folder of this user's dpmoe files: the environment variable ``variable`` if set,
    else ``$XDG_CACHE_HOME/dpmoe/<name>`` (default ``~/.cache/dpmoe/<name>``)."""
    given = os.environ.get(variable)
    if given:
        return Path(given).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "dpmoe" / name


def user_config_dir() -> Path:
    """Where tuned configs of this user live: ``DPMOE_TUNED_CONFIG_DIR`` or
    ``$XDG_CACHE_HOME/dpmoe/tuned`` (default ``~/.cache/dpmoe/tuned``)."""
    return user_cache_dir("tuned", "DPMOE_TUNED_CONFIG_DIR")


def config_file_name(num_experts: int, inter: int, dtype: str, device_name: str) -> str:
    device = re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")
    return f"E={num_experts},N={inter},dtype={dtype},device={device}.json"


@lru_cache(maxsize=None)
def _load(path: Path, modified: float) -> dict[int, dict]:
    try:
        with open(path) as f:
            configs = {int(tokens): dict(choice) for tokens, choice in json.load(f).items()}
        for choice in configs.values():  # files written before the keyword existed
            choice["path"] = str(choice["path"]).replace("-", "_")
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ValueError(f"tuned config {path} is malformed ({exc}); expected "
                         '{"<tokens>": {"path": "grouped" | "per_token"}, ...}: fix or delete it'
                         ) from None
    bad = [c["path"] for c in configs.values() if c["path"] not in PATHS]
    if not configs or bad:
        raise ValueError(f"tuned config {path}: paths must be one of {PATHS} (at least one "
                         f"entry), got {bad or 'no entries'}")
    return configs


def find_configs(file_name: str) -> tuple[dict[int, dict], Path] | None:
    """The configs in ``file_name`` and where they were found (user folder first)."""
    for directory in (user_config_dir(), PACKAGED_DIR):
        path = directory / file_name
        if path.is_file():
            return _load(path, path.stat().st_mtime), path
    return None


@lru_cache(maxsize=None)
def has_amx() -> bool:
    """Whether the host CPU has AMX tiles for bf16 (oneMKL's bf16 GEMMs are fast there)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def default_config(num_tokens: int, host_gemm: str | None = None) -> dict:
    """The untuned choice. ``host_gemm``: the kind oneMKL's host GEMMs would run the grouped
    path in ("float32", "bfloat16"), None when they cannot (then ``dpnp.matmul``)."""
    fast_grouped = host_gemm == "float32" or (host_gemm == "bfloat16" and has_amx())
    per_token = not fast_grouped and num_tokens <= DEFAULT_PER_TOKEN_MAX_TOKENS
    return {"path": "per_token" if per_token else "grouped"}


def _caller_level() -> int:
    """The warnings stack level of the first frame outside dpmoe (the user's call)."""
    package = str(Path(__file__).parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def get_config(num_experts: int, inter: int, dtype: str, device_name: str, num_tokens: int,
               host_gemm: str | None = None) -> tuple[dict, str]:
    """(choice, where it came from) for a call of ``num_tokens`` tokens: the tuned entry
    nearest in T, else :func:`default_config` with one :class:`DefaultConfigWarning` per
    process."""
    global _warned
    name = config_file_name(num_experts, inter, dtype, device_name)
    found = find_configs(name)
    if not found:
        with _lock:
            first, _warned = not _warned, True
        if first:
            warnings.warn(
                f"dpmoe: no tuned config for {name} (and possibly other shapes); using the "
                "default (dpmoe.tuning.default_config). `python -m dpmoe.bench --tune` writes "
                f"configs to {user_config_dir()}. This warning is shown once per process.",
                DefaultConfigWarning, stacklevel=_caller_level())
        return default_config(num_tokens, host_gemm), "default"
    configs, path = found
    nearest = min(configs, key=lambda t: (abs(t - num_tokens), t))
    return configs[nearest], f"tuned ({path}, T={nearest})"


def save_configs(configs: dict[int, dict], num_experts: int, inter: int, dtype: str,
                 device_name: str, directory: str | Path | None = None) -> Path:
    """Writes ``{tokens: {"path": ...}}`` where :func:`get_config` reads it (default: the
    user's folder); returns the file's path."""
    path = Path(directory or user_config_dir()) / config_file_name(num_experts, inter, dtype,
                                                                  device_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")  # a reader never sees half a file
    with open(partial, "w") as f:
        json.dump({str(t): configs[t] for t in sorted(configs)}, f, indent=1)
        f.write("\n")
    os.replace(partial, path)
    return path
