"""Device memory: estimate what a call needs, refuse what cannot fit, bound intermediates.

The runtime aborts or crawls when a device allocation fails or gets huge (one dpnp array of
4 GiB or more was measured copying at 0.2 GB/s on the CPU device), so the fused forward
estimates its need before it allocates and processes long batches in chunks of tokens whose
float32 intermediates stay under :data:`MAX_INTERMEDIATE_BYTES`.
"""

from __future__ import annotations

import os
from typing import Any

# Bound on the float32 intermediates (gathered rows, gate/up/activation, down outputs) of
# one chunk of tokens; well under the 4 GiB single-allocation cliff. Override with the
# DPMOE_MAX_INTERMEDIATE_BYTES environment variable.
MAX_INTERMEDIATE_BYTES = 1 << 30
GIB = float(1 << 30)


def intermediate_budget() -> int:
    value = os.environ.get("DPMOE_MAX_INTERMEDIATE_BYTES")
    return int(value) if value else MAX_INTERMEDIATE_BYTES


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


def check_fits(queue: Any, need: int, what: str, breakdown: str) -> None:
    """Raise MemoryError before allocating when ``need`` bytes cannot fit on the device."""
    total, free = device_memory(queue)
    limit = free if free is not None else total
    if need > limit:
        free_text = f", {free / GIB:.2f} GiB free" if free is not None else ""
        raise MemoryError(
            f"{what} needs about {need / GIB:.2f} GiB on {queue.sycl_device.name} "
            f"({breakdown}); the device has {total / GIB:.2f} GiB of global memory{free_text}"
        )


def tokens_per_chunk(bytes_per_token: int) -> int:
    """How many tokens one chunk may hold so its intermediates stay within the budget."""
    return max(1, intermediate_budget() // max(bytes_per_token, 1))
