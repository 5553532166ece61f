"""Storage conversions on the device: widening 16-bit floats to float32 and rounding back,
and routing arrays in the form the kernels read (flat int32 ids, flat float32 weights)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..arrays import empty, flat, to_device
from ..device import dpnp, is_device_array
from ..pages import upload


def widen(d: Any, kind: str) -> Any:
    """A float32 copy of a device array in storage form (the array itself when float32)."""
    if kind == "float32":
        return d
    from ..kernels.gather import make_convert_kernel

    out = empty(tuple(d.shape), "float32", d.sycl_queue)
    if d.size:
        make_convert_kernel(kind, "float32")(flat(d), flat(out))
    return out


def narrow(d: Any, kind: str) -> Any:
    """A float32 device array rounded to storage form of ``kind`` (itself when float32)."""
    if kind == "float32":
        return d
    from ..kernels.gather import make_convert_kernel

    out = empty(tuple(d.shape), kind, d.sycl_queue)
    if d.size:
        make_convert_kernel("float32", kind)(flat(d), flat(out))
    return out


def ids_to_device(a: Any, queue: Any) -> Any:
    """Expert ids as a flat int32 dpnp array on ``queue`` (ids were range-checked)."""
    if is_device_array(a):
        if a.dtype == np.int32 and a.flags.c_contiguous:  # dpnp's no-op copies cost ~30 us
            return flat(a)
        return flat(dpnp.ascontiguousarray(a.astype(np.int32, copy=False)))
    return upload(np.ascontiguousarray(a, dtype=np.int32).reshape(-1), queue)


def weights_to_device(a: Any, queue: Any) -> Any:
    """Routing weights as a flat float32 dpnp array on ``queue``."""
    if not is_device_array(a):
        return upload(np.ascontiguousarray(a, dtype=np.float32).reshape(-1), queue)
    if a.dtype == np.uint16:  # bfloat16 bits
        return widen(flat(to_device(a, queue)), "bfloat16")
    if a.dtype == np.float32 and a.flags.c_contiguous:
        return flat(a)
    return flat(dpnp.ascontiguousarray(a.astype(np.float32, copy=False)))
