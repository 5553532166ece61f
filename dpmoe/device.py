"""Where a call runs: a SYCL queue (compute follows data), or the NumPy reference.

Rules:
- dpnp inputs fix the queue; inputs on two different queues are an error.
- NumPy-only inputs run on the default queue: the ``device=`` keyword (a dpctl filter
  string, ``SyclDevice`` or ``SyclQueue``), else ``DPMOE_DEVICE``, else dpctl's default
  selector; results are copied back to NumPy.
- With no usable SYCL device, or a dtype the device cannot run, NumPy inputs fall back to
  :mod:`dpmoe.reference` with one ``RuntimeWarning`` per reason; ``DPMOE_STRICT=1`` makes
  that a ``RuntimeError`` instead.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import warnings
from typing import Any

from . import _fork, _runtime

_fork.install()  # a fork leaves no lock held; a child does not touch its parent's SYCL runtime

RUNTIME_SETUP = _runtime.prepare()

try:  # the SYCL stack may be missing or unloadable: dpmoe still works on the reference
    import dpctl
    import dpnp

    _STACK_ERROR: str | None = None
except (ImportError, OSError) as exc:  # pragma: no cover - depends on the environment
    dpctl = None
    dpnp = None
    _STACK_ERROR = f"the SYCL stack cannot be imported ({exc})"
    if RUNTIME_SETUP.problem:
        _STACK_ERROR += f"; {RUNTIME_SETUP.problem}"

_lock = _fork.lock("dpmoe.device")
_warned: set[str] = set()


class FallbackError(RuntimeError):
    """Raised instead of falling back to NumPy when ``DPMOE_STRICT=1``."""


def is_device_array(a: Any) -> bool:
    if dpnp is not None and isinstance(a, dpnp.ndarray):
        _fork.check_device_use("dpnp inputs")  # before anything touches it in a forked child
        return True
    return False


# dpctl's filter strings: backend[:type][:n], type[:n] or n. dpctl reads an empty part as
# "any", so a typo such as ":::" would silently select the default device.
_FILTER = re.compile(r"^[A-Za-z_*]+(:[A-Za-z_*]+)?(:\d+)?$|^\d+$")


def _device_spec(device: Any) -> Any:
    if device is not None:
        if isinstance(device, str) and not _FILTER.match(device.strip()):
            raise ValueError(f"device must be a dpctl filter string such as 'opencl:cpu' or "
                             f"'level_zero:gpu:0', got {device!r}")
        return device
    spec = os.environ.get("DPMOE_DEVICE", "").strip()
    if spec and not _FILTER.match(spec):
        raise ValueError(f"DPMOE_DEVICE must be a dpctl filter string such as 'opencl:cpu' or "
                         f"'level_zero:gpu:0', got {spec!r}")
    return spec or None


def _queue_for(spec: Any) -> Any:
    """dpctl's cached queue for ``spec`` (the one dpnp uses for that device, so arrays the
    user makes with dpnp and arrays dpmoe makes share it); ValueError when none matches."""
    from dpctl._sycl_queue_manager import get_device_cached_queue

    if isinstance(spec, dpctl.SyclQueue):
        queue = spec
    elif spec is None:
        queue = get_device_cached_queue(dpctl.select_default_device())
    elif isinstance(spec, (str, dpctl.SyclDevice)):
        queue = get_device_cached_queue(spec)
    else:
        queue = None
    if queue is not None:
        if queue.sycl_device.parent_device is not None:
            raise ValueError(f"{queue.sycl_device.name} is a sub-device; numba-dpex 0.23 "
                             "launches kernels on root devices only")
        return queue
    raise TypeError(
        "device must be a dpctl filter string, dpctl.SyclDevice or dpctl.SyclQueue, "
        f"got {type(spec).__name__}"
    )


def default_queue(device: Any = None) -> tuple[Any, str | None]:
    """The queue NumPy inputs run on, or ``(None, reason)`` when there is none."""
    if _STACK_ERROR is not None:
        return None, _STACK_ERROR
    if _fork.child_problem() is not None:  # a fork of a process whose SYCL runtime had started
        return None, _fork.child_problem()
    spec = _device_spec(device)
    try:
        return _queue_for(spec), None
    except (ValueError, dpctl.SyclDeviceCreationError, dpctl.SyclQueueCreationError) as exc:
        where = repr(spec) if spec is not None else "dpctl's default selector"
        return None, f"no SYCL device for {where} ({exc})"


def fallback(reason: str) -> None:
    """Announce (once per reason) that the NumPy reference runs instead of a kernel."""
    if os.environ.get("DPMOE_STRICT", "") not in ("", "0"):
        raise FallbackError(f"dpmoe: {reason}, and DPMOE_STRICT=1 forbids the NumPy fallback")
    with _lock:
        first = reason not in _warned
        _warned.add(reason)
    if first:
        warnings.warn(
            f"dpmoe: {reason}; running the NumPy reference instead", RuntimeWarning, stacklevel=3
        )


def resolve_queue(arrays: dict[str, Any], device: Any = None) -> tuple[Any, str | None]:
    """The queue a call on ``arrays`` (name -> array or None) runs on, or (None, reason).

    Raises ValueError when the arrays live on different queues, or when ``device`` names
    another device than the one the data is on.
    """
    placed = {name: a.sycl_queue for name, a in arrays.items() if is_device_array(a)}
    if not placed:
        return default_queue(device)
    names = list(placed)
    first = placed[names[0]]
    for name in names[1:]:
        if placed[name] != first:
            raise ValueError(
                f"Input arrays must be allocated on the same SYCL queue: {names[0]} is on "
                f"{first.sycl_device.filter_string}, {name} on another queue "
                f"({placed[name].sycl_device.filter_string})."
            )
    if device is not None:
        wanted = _queue_for(device)
        if wanted.sycl_device != first.sycl_device:
            raise ValueError(
                f"device={device!r} differs from the device {names[0]} is on "
                f"({first.sycl_device.filter_string}); compute follows data."
            )
    return first, None


def info(device: Any = None) -> dict[str, Any]:
    """Where dpmoe computes and with what.

    Returns a dict with ``device`` (name and filter string, or None), ``backend``
    (``"sycl"`` or ``"numpy-reference"``), ``fallback_reason``, the versions of dpctl,
    dpnp, numba-dpex and numpy, and what the runtime set-up did.
    """
    queue, reason = default_queue(device)
    versions = {}
    for dist in ("dpctl", "dpnp", "numba-dpex", "numpy", "ml_dtypes"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    dev = queue.sycl_device if queue is not None else None
    return {
        "backend": "sycl" if queue is not None else "numpy-reference",
        "device": None if dev is None else dev.name,
        "filter_string": None if dev is None else dev.filter_string,
        "fp16": None if dev is None else bool(dev.has_aspect_fp16),
        "fallback_reason": reason,
        "strict": os.environ.get("DPMOE_STRICT", "") not in ("", "0"),
        "versions": versions,
        "runtime_setup": RUNTIME_SETUP.as_dict(),
    }


def placement(arrays: dict[str, Any], kinds: set[str], device: Any = None) -> Any:
    """The queue a call runs on, or None once the NumPy fallback has been announced.

    ``kinds`` are the float storage kinds the call uses; float16 needs the device's fp16
    aspect (NumPy inputs fall back without it, dpnp inputs cannot and raise TypeError).
    """
    queue, reason = resolve_queue(arrays, device)
    if queue is not None and "float16" in kinds and not queue.sycl_device.has_aspect_fp16:
        name = queue.sycl_device.name
        if any(is_device_array(a) for a in arrays.values()):
            raise TypeError(f"float16 arrays given on {name}, which has no fp16 support")
        queue, reason = None, f"{name} has no fp16 support"
    if queue is None:
        fallback(reason)
    return queue


def returns_numpy(arrays: dict[str, Any]) -> bool:
    """NumPy in, NumPy out: results are dpnp only when some input was."""
    return not any(is_device_array(a) for a in arrays.values())
