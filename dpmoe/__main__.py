"""``python -m dpmoe``: run a Mixtral-like MoE layer on the default device and check it.

The last line of the output is the verdict:

- ``OK: dpmoe on <device> (<filter string>) matches the NumPy reference (max relative error
  <e> <= <tol>, <dtype>)``, exit code 0;
- ``FALLBACK: no SYCL device was used, so no kernel was checked (reason: <reason>); ...``:
  dpmoe ran its NumPy reference instead of the kernels; exit code 0 (the fallback is a
  supported mode), or ``FAILED`` with exit code 1 under ``--strict`` or ``DPMOE_STRICT=1``;
- ``FAILED: ...``: the result is off, or the run raised; exit code 1.

The tolerances are the tests' (README, Tests): the largest error may be 1e-5 (float32),
2^-9 (float16) or 2^-6 (bfloat16) of the output's largest magnitude.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import traceback
import warnings

import numpy as np

from . import MoELayer, info, reference
from .arrays import HOST_DTYPE
from .configs import MODEL_CONFIGS
from .device import FallbackError
from .tuning import DefaultConfigWarning

# The tests' tolerances (README, Tests): max |error| as a fraction of the output's scale.
TOLERANCE = {"float32": 1e-5, "float16": 2.0**-9, "bfloat16": 2.0**-6}


def _strict_from_env() -> bool:
    return os.environ.get("DPMOE_STRICT", "") not in ("", "0")


def _notes(caught: list[warnings.WarningMessage]) -> tuple[list[str], str | None]:
    """Warnings raised during the run as short note lines (each once), and the reason of a
    NumPy fallback if dpmoe announced one."""
    notes, fallback_reason, seen = [], None, set()
    for w in caught:
        text = str(w.message)
        if (w.category, text) in seen:
            continue
        seen.add((w.category, text))
        if issubclass(w.category, DefaultConfigWarning):
            # An untuned (shape, device): the execution path came from a default rule.
            found = re.search(r"no tuned config (?:for )?(\S+?\.json)", text)
            shape = f" ({found.group(1)})" if found else ""
            notes.append(f"no tuned config for this shape on this device{shape}: the "
                         "default execution path was used, which is correct but may be "
                         "slower; `python -m dpmoe.bench --tune` measures and writes one")
        elif issubclass(w.category, RuntimeWarning) and "NumPy reference" in text:
            # Reported on the device line and in the verdict instead.
            found = re.match(r"dpmoe: (.*); running the NumPy reference instead", text, re.S)
            fallback_reason = found.group(1) if found else text
        else:
            notes.append(f"{w.category.__name__}: {text}")
    return notes, fallback_reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dpmoe", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mixtral-small", choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=sorted(HOST_DTYPE))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None, help="dpctl filter string, e.g. opencl:cpu")
    parser.add_argument("--strict", action="store_true",
                        help="fail (exit code 1) instead of running the NumPy reference when "
                             "there is no SYCL device; the same as DPMOE_STRICT=1")
    args = parser.parse_args(argv)
    strict = args.strict or _strict_from_env()

    hidden, inter, experts, top_k = MODEL_CONFIGS[args.config]
    about = info(args.device)
    if about["backend"] == "sycl":
        where = f"{about['device']} ({about['filter_string']})"
        print(f"device:  {where}, backend sycl")
    else:
        where = None
        print(f"device:  none: {about['fallback_reason']}")
        print("backend: numpy-reference (dpmoe.reference runs instead of the kernels)")
    print(f"layer:   {args.config}: H={hidden} I={inter} E={experts} top_k={top_k} "
          f"weights {args.dtype}")
    if where is None and strict:
        print(f"FAILED: no SYCL device was used (reason: {about['fallback_reason']}), and "
              "--strict or DPMOE_STRICT=1 forbids the NumPy fallback")
        return 1

    saved_strict = os.environ.get("DPMOE_STRICT")
    if args.strict:  # the library's own check, for fallbacks decided per call (float16)
        os.environ["DPMOE_STRICT"] = "1"
    try:
        with warnings.catch_warnings(record=True) as caught:
            layer = MoELayer(hidden, inter, experts, top_k, dtype=args.dtype,
                             device=args.device, seed=0)
            x = np.random.default_rng(1).standard_normal((args.tokens, hidden),
                                                         dtype=np.float32)
            x = x.astype(HOST_DTYPE[args.dtype])
            print(f"input:   hidden_states {x.shape} {x.dtype}")
            start = time.perf_counter()
            out = layer(x)  # on a device, the first call compiles the kernels
            first = time.perf_counter() - start
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                layer(x)
                times.append(time.perf_counter() - start)
    except FallbackError as exc:
        text = str(exc).removeprefix("dpmoe: ")
        print(f"FAILED: the kernels could not run on the device: {text}")
        return 1
    except Exception as exc:  # noqa: BLE001 - the verdict line must still come last
        traceback.print_exc()
        sys.stderr.flush()
        print(f"FAILED: the layer raised {type(exc).__name__}: {exc}")
        return 1
    finally:
        if args.strict:
            if saved_strict is None:
                os.environ.pop("DPMOE_STRICT", None)
            else:
                os.environ["DPMOE_STRICT"] = saved_strict

    notes, fallback_reason = _notes(caught)
    on_device = layer.device is not None
    median = f"median of {len(times)} {statistics.median(times) * 1e3:.2f} ms" if times else \
        "no repeats"
    print(f"output:  {out.shape} {out.dtype}")
    if on_device:
        w = layer.weights()
        expected = reference.moe_layer(x, w["router"], w["gate"], w["up"], w["down"], top_k,
                                       True)
        got, want = out.astype(np.float32), expected.astype(np.float32)
        error = float(np.abs(got - want).max(initial=0.0))
        scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
        relative = error / scale
        print(f"error:   max |dpmoe - reference| = {error:.3e} (output scale {scale:.3e}, "
              f"relative {relative:.2e})")
        print(f"time:    first call {first * 1e3:.1f} ms (includes kernel compilation), "
              f"{median}")
    else:
        print("error:   not checked: the layer ran on the NumPy reference itself")
        print(f"time:    NumPy reference: first call {first * 1e3:.1f} ms, {median}")
    for note in notes:
        print(f"note:    {note}")
    sys.stdout.flush()

    if not on_device:
        reason = about["fallback_reason"] or fallback_reason or "unknown reason"
        if strict:  # not reached when the library raised FallbackError above
            print(f"FAILED: no SYCL device was used (reason: {reason}), and --strict or "
                  "DPMOE_STRICT=1 forbids the NumPy fallback")
            return 1
        print(f"FALLBACK: no SYCL device was used, so no kernel was checked (reason: "
              f"{reason}); dpmoe ran its NumPy reference instead. --strict or DPMOE_STRICT=1 "
              "makes this a failure")
        return 0
    tolerance = TOLERANCE[args.dtype]
    if not relative <= tolerance:  # also catches NaN
        print(f"FAILED: dpmoe on {where} differs from the NumPy reference "
              f"(max relative error {relative:.1e} > {tolerance:.1e}, {args.dtype})")
        return 1
    print(f"OK: dpmoe on {where} matches the NumPy reference "
          f"(max relative error {relative:.1e} <= {tolerance:.1e}, {args.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
