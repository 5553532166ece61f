"""``os.fork()`` in a process that uses dpmoe: the child inherits no lock held, and does not
touch a SYCL runtime its parent had started.

Two things break in a forked child. Measured on this project's machine (numba 0.59,
numba-dpex 0.23, dpctl 0.17, OpenCL CPU runtime, 2 cores):

1. Locks. A fork copies every lock as it is, but only the forking thread, so a lock another
   thread held at the fork stays held in the child for good. With another thread compiling
   dpmoe kernels at the fork, the child hung at its first compilation, in numba's
   ``global_compiler_lock`` (6 of 7 trials). llvmlite's LLVM lock and dpmoe's own
   locks (made with :func:`lock`) are held for moments only, but could be inherited the
   same way. So, before a fork, the handler :func:`install` registers takes all of them,
   waiting while none of the others is held for any that is busy (the fork waits for a
   compilation in progress, about a second, :data:`LOCK_TIMEOUT` at most), and releases
   them after the fork, in the parent and in the child.
2. The SYCL runtime. Its threads and the work it has queued or running are not copied by a
   fork. Children hung in their first dpmoe call (dpctl's device selection,
   ``SyclQueue.wait``, a copy to the device) in 3 of 3 trials when the parent had one
   kernel running at the fork, submitted asynchronously from its only thread, and in 5 of
   10 when another thread was running dpnp or fused MoE calls. Children of parents whose
   runtime was idle worked in every trial, but whether it is idle cannot be seen from
   Python. So a child forked after the runtime started (a SYCL backend was loaded: any
   device, queue or array had been used, by dpmoe, dpnp or dpctl; or dpctl was imported and
   other threads ran, which could have been starting it) does not use SYCL:
   :func:`child_problem` gives the reason, for which the queue selection runs NumPy inputs
   on :mod:`dpmoe.reference` (one ``RuntimeWarning``; ``FallbackError`` under
   ``DPMOE_STRICT=1``), and :func:`check_device_use` refuses device arrays with a
   ``RuntimeError``. The reason names the fix: multiprocessing's "spawn" or "forkserver"
   start method. ``DPMOE_FORK_SYCL=1`` in the child lets it use the device anyway, for
   parents known to have had no SYCL work queued or running at the fork. A child forked
   before the runtime started (``import dpmoe`` alone does not start it) uses the device as
   any process does.

Normal calls pay one comparison: :func:`child_problem` and :func:`check_device_use` (about
25 ns on a device array) compare one module variable with None. This module
imports neither dpctl nor numba; it finds numba's and llvmlite's locks in ``sys.modules``
when a fork begins, and reads ``/proc/self/maps`` (about 0.2 ms) in a child only.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import weakref
from typing import Any

__all__ = ["LOCK_TIMEOUT", "check_device_use", "child_problem", "install", "installed", "lock"]

# Seconds a fork waits for the locks (a compilation in progress holds numba's about a second
# on this machine). Past it the fork goes ahead; a child that inherits numba's or llvmlite's
# lock held then gets a child_problem, which keeps dpmoe from compiling there.
LOCK_TIMEOUT = 30.0

# Loaded by the SYCL runtime when it first looks for devices (oneAPI 2024: plugins
# libpi_<backend>.so; from 2025: unified-runtime adapters).
_BACKEND_MARKS = ("/libpi_", "/libur_adapter", "/libur_loader")

_ADVICE = ("start worker processes with multiprocessing's \"spawn\" or \"forkserver\" method "
           "(multiprocessing.get_context(\"spawn\")), or fork before the first SYCL call")

_install_lock = threading.Lock()
_installed = False
# dpmoe's own locks by order of making; each entry leaves when its lock is collected
_registered: dict[int, tuple[str, weakref.ref]] = {}
_keys = itertools.count()
# During a fork: (name, lock) of the locks the forking thread took, and of those it could not
_held: list[tuple[str, Any]] = []
_missed: list[tuple[str, Any]] = []
_dpctl_at_fork = False
_threads_at_fork = 1
# In a forked child only: why it must not use SYCL, and whether DPMOE_FORK_SYCL may override
_problem: str | None = None
_overridable = False


def lock(name: str) -> threading.Lock:
    """A new ``threading.Lock`` that no other thread holds across a fork, for dpmoe's modules
    (``name``, e.g. "dpmoe.device", for messages). Held by weak reference only. Never hold
    one while compiling or running a kernel: a fork waits for it."""
    made = threading.Lock()
    key = next(_keys)
    _registered[key] = (name, weakref.ref(made, lambda _, key=key: _registered.pop(key, None)))
    return made


class _CompilerLock:
    """numba's ``global_compiler_lock`` with a timeout, through the RLock it has kept in
    ``_lock`` since numba 0.40 (else through its public, blocking acquire/release)."""

    def __init__(self, gcl: Any):
        self._gcl = gcl
        self._rlock = getattr(gcl, "_lock", None)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._rlock is not None:
            return self._rlock.acquire(blocking, timeout)
        self._gcl.acquire()
        return True

    def release(self) -> None:
        (self._rlock or self._gcl).release()


def _fork_locks() -> list[tuple[str, Any]]:
    """(name, lock) of every lock a fork must not leave held, in the order they are taken:
    numba's compiler lock, llvmlite's LLVM lock, dpmoe's own."""
    found: list[tuple[str, Any]] = []
    compiler_lock = sys.modules.get("numba.core.compiler_lock")
    if compiler_lock is not None:
        found.append(("numba's global compiler lock",
                      _CompilerLock(compiler_lock.global_compiler_lock)))
    ffi = sys.modules.get("llvmlite.binding.ffi")
    llvm = getattr(getattr(getattr(ffi, "lib", None), "_lock", None), "_lock", None)
    if llvm is not None:
        found.append(("llvmlite's LLVM lock", llvm))
    found.extend((f"the lock of {name}", ref()) for name, ref in list(_registered.values()))
    return [(name, obj) for name, obj in found if obj is not None]


def _acquire_all(locks: list[tuple[str, Any]], timeout: float) -> None:
    """Takes every lock into ``_held``, in order; what it cannot take within ``timeout`` goes
    to ``_missed``.

    Cannot deadlock with threads that hold some of the locks and wait for others: a busy
    lock is waited for while holding none of the others, then the rest are tried again.
    """
    deadline = time.monotonic() + timeout
    waited_for = None  # index of the lock waited for, held
    while True:
        busy = None
        for index, (name, obj) in enumerate(locks):
            if index == waited_for:
                continue
            if not obj.acquire(blocking=False):
                busy = index
                break
            _held.append((name, obj))
        if busy is None:
            return
        _release_held()
        name, obj = locks[busy]
        if not obj.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            for other in locks:  # fork without the busy ones, holding the others
                (_held if other[1].acquire(blocking=False) else _missed).append(other)
            return
        _held.append((name, obj))
        waited_for = busy


def _release_held() -> None:
    while _held:
        _held.pop()[1].release()


def _before() -> None:
    global _dpctl_at_fork, _threads_at_fork
    _missed.clear()
    _dpctl_at_fork = "dpctl" in sys.modules
    _threads_at_fork = threading.active_count()
    try:
        _acquire_all(_fork_locks(), LOCK_TIMEOUT)
    except BaseException:  # e.g. KeyboardInterrupt while waiting: the fork goes ahead
        _missed.append(("a lock (the wait for it was interrupted)", None))
        raise


def _after_in_parent() -> None:
    _release_held()
    _missed.clear()


def _backend_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return True  # cannot tell: assume it was
    return any(mark in maps for mark in _BACKEND_MARKS)


def _after_in_child() -> None:
    global _problem, _overridable
    _release_held()
    for name, obj in _missed:
        if name.startswith("the lock of ") and hasattr(obj, "_at_fork_reinit"):
            obj._at_fork_reinit()  # dpmoe's own: guards a few Python objects, nothing more
        elif _problem is None or _overridable:
            _problem, _overridable = (
                f"this process was forked while another thread held {name} for more than "
                f"{LOCK_TIMEOUT:g} s, so it stays held here; " + _ADVICE), False
    _missed.clear()
    if _problem is None and _dpctl_at_fork:
        if _backend_loaded():
            when = "after its parent had started the SYCL runtime"
        elif _threads_at_fork > 1:
            when = "while other threads of its parent could have been starting the SYCL runtime"
        else:
            return
        _problem, _overridable = (
            f"this process was forked (os.fork, or multiprocessing's \"fork\" start method) "
            f"{when}, whose threads and queued work a fork does not copy (SYCL calls can hang "
            f"here); {_ADVICE} (DPMOE_FORK_SYCL=1 allows SYCL here if the parent had no SYCL "
            "work queued or running when it forked)"), True


def install() -> None:
    """Registers the fork handlers, once per process (later calls do nothing)."""
    global _installed
    with _install_lock:
        if not _installed:
            os.register_at_fork(before=_before, after_in_parent=_after_in_parent,
                                after_in_child=_after_in_child)
            _installed = True


def installed() -> bool:
    """Whether :func:`install` has registered the fork handlers in this process."""
    return _installed


def child_problem() -> str | None:
    """Why this process must not use the SYCL runtime, or None. Never None only in a process
    forked from one whose runtime had started (see the module's docstring)."""
    if _problem is None:
        return None
    if _overridable and os.environ.get("DPMOE_FORK_SYCL", "") not in ("", "0"):
        return None
    return _problem


def check_device_use(what: str) -> None:
    """Raises RuntimeError naming :func:`child_problem`, if there is one, for ``what`` (e.g.
    "dpnp inputs"): data already on a device has no NumPy fallback."""
    if _problem is None:  # the normal case, on every device array: one comparison
        return
    problem = child_problem()
    if problem is not None:
        raise RuntimeError(f"dpmoe: {what} cannot be used in this process: {problem}")
