"""Device memory: estimate what a call needs, refuse what cannot fit, bound intermediates.

The runtime aborts or crawls when a device allocation fails or gets huge (one dpnp array of
4 GiB or more was measured copying at 0.2 GB/s on the CPU device), so the fused forward
estimates its need before it allocates and processes long batches in chunks of tokens whose
float32 intermediates stay under :data:`MAX_INTERMEDIATE_BYTES`.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

# Bound on the float32 intermediates (gathered rows, gate/up/activation, down outputs) of
# one chunk of tokens; well under the 4 GiB single-allocation cliff. Override with the
# DPMOE_MAX_INTERMEDIATE_BYTES environment variable.
MAX_INTERMEDIATE_BYTES = 1 << 30


def intermediate_budget() -> int:
    """The chunk budget in bytes: ``DPMOE_MAX_INTERMEDIATE_BYTES`` when set, else 1 GiB."""
    value = os.environ.get("DPMOE_MAX_INTERMEDIATE_BYTES", "").strip()
    if not value:
        return MAX_INTERMEDIATE_BYTES
    if not (value.isascii() and value.isdigit()) or int(value) == 0:
        raise ValueError("DPMOE_MAX_INTERMEDIATE_BYTES must be a positive whole number of "
                         f"bytes (e.g. 268435456), got {value!r}")
    return int(value)


_tracking = threading.local()


@contextmanager
def track_allocations() -> Iterator[list[int]]:
    """Collects the size in bytes of every device allocation dpmoe makes through
    :func:`dpmoe.arrays.empty` or :func:`dpmoe.pages.upload` in this thread while the block
    runs: every buffer of the engine's runners and uploads of NumPy inputs. (dpnp's own
    temporaries, e.g. a contiguous copy of a strided dpnp input, are not seen.) The tests
    hold calls to their memory estimate with it."""
    outer = getattr(_tracking, "log", None)
    _tracking.log = log = []
    try:
        yield log
    finally:
        _tracking.log = outer
        if outer is not None:
            outer.extend(log)


def note_allocation(nbytes: int) -> None:
    log = getattr(_tracking, "log", None)
    if log is not None:
        log.append(int(nbytes))


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_memory(queue: Any) -> tuple[int, int | None]:
    """(global memory, free memory or None when the device does not say) in bytes.

    A CPU device's memory is the host's, so its free memory is the host's MemAvailable.
    """
    dev = queue.sycl_device
    free = None
    if dev.is_cpu:
        free = _host_available()
    else:
        try:
            free = int(dev.free_memory)  # Level Zero reports it; other backends raise
        except Exception:  # noqa: BLE001 - an unsupported query is not an error here
            free = None
    return int(dev.global_mem_size), free


def size(nbytes: float) -> str:
    """Bytes in readable units (GiB, MiB or KiB)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if nbytes >= scale / 10:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1024:.1f} KiB"


def check_fits(queue: Any, what: str, parts: dict[str, int]) -> None:
    """Raise MemoryError before allocating when ``parts`` (bytes by what they hold) cannot
    fit together on the device (``queue`` None: in the host's memory)."""
    need = sum(parts.values())
    breakdown = ", ".join(f"{name} {size(nbytes)}" for name, nbytes in parts.items() if nbytes)
    if queue is None:
        free = _host_available()
        total, where = free, "the host"
    else:
        total, free = device_memory(queue)
        where = queue.sycl_device.name
    limit = free if free is not None else total
    if limit is not None and need > limit:
        free_text = f", {size(free)} free" if free is not None else ""
        raise MemoryError(
            f"{what} needs about {size(need)} on {where} "
            f"({breakdown}); {'it' if queue is None else 'the device'} has {size(total)} of "
            f"{'memory' if queue is None else 'global memory'}{free_text}"
        )
