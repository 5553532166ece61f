"""The one road of every public function: validate -> placement -> reference or device ->
results in the caller's form -> write-back into ``out=`` / ``inplace`` targets.

Validation is the caller's (it knows the arguments); this module does the rest, the same
way for all of them: dpnp inputs fix the queue, NumPy inputs go to the default device and
come back as NumPy, no device means the NumPy reference (announced once per reason).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .arrays import from_device, to_host
from .device import placement, returns_numpy
from .validation import quantized


def call(arrays: dict[str, Any], kinds: set[str], device: Any,
         reference: Callable[[], Any], on_device: Callable[[Any], Any],
         result_kinds: str | tuple[str, ...] | None = None) -> Any:
    """Run a validated call.

    Args:
        arrays: every array argument by name (None entries are ignored): they decide the
            queue, and whether results come back as NumPy.
        kinds: the float storage kinds the call uses (float16 needs the fp16 aspect).
        device: the ``device=`` keyword.
        reference: computes the result on the host (NumPy in, NumPy out).
        on_device: computes the result on the queue it is given, in storage form.
        result_kinds: storage kind of the device result (a tuple for a tuple of results);
            None when ``on_device`` returns nothing or what the caller gets as is.
    """
    arrays = {name: a for name, a in arrays.items() if a is not None}
    queue = placement(arrays, kinds, device)
    if queue is None:
        return reference()
    result = on_device(queue)
    if result_kinds is None or result is None:
        return result
    as_numpy = returns_numpy(arrays)
    if isinstance(result_kinds, tuple):
        return tuple(from_device(r, k, as_numpy) for r, k in zip(result, result_kinds))
    return from_device(result, result_kinds, as_numpy)


def write_back(target: Any, result: Any) -> Any:
    """Copies a complete result into the caller's array (``out=`` or ``inplace``)."""
    if isinstance(target, np.ndarray):
        target[...] = to_host(result)
    else:
        target[...] = result
    return target


def host(a: Any) -> Any:
    """``a`` as a NumPy array for the reference (None stays None; quantized weights, which
    live on the host, as they are)."""
    if a is None or quantized(a):
        return a
    return to_host(a)
