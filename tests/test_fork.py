"""``os.fork()`` in a process that uses dpmoe (dpmoe/_fork.py): the child never hangs.

Each scenario runs in a fresh interpreter (a subprocess with a hard timeout), which forks
children and waits for each with its own timeout, killing it if it hangs. A child forked
after the SYCL runtime started does not use it: NumPy inputs run on the NumPy reference
with a RuntimeWarning naming the fork and the "spawn" start method (FallbackError under
DPMOE_STRICT=1), dpnp inputs get a RuntimeError; numba compiles there, because no thread's
lock is inherited held.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import needs_device

# Shared by the scripts: fork, run `child` in the child, return what it returned (or the
# exception it raised, or "hung" when it outlived `timeout` and was killed).
PRELUDE = textwrap.dedent('''
    import json, os, signal, sys, threading, time, traceback, warnings
    import numpy as np
    import dpmoe

    def fork_and_wait(child, timeout):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                result = {"ok": child()}
            except BaseException:
                result = {"error": traceback.format_exc()}
            os.write(write_end, json.dumps(result).encode())
            os._exit(0)
        os.close(write_end)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                with os.fdopen(read_end, "rb") as f:
                    data = f.read()
                return json.loads(data) if data else {"error": f"exit status {status}"}
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        return {"error": "hung"}

    def recorded(fn):
        """fn()'s result and the messages of the warnings it raised."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
        return result, [str(w.message) for w in caught]

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 8), dtype=np.float32)
    want_w, want_ids = dpmoe.reference.topk_softmax(logits, 3)

    def matches_reference(result):
        w, ids = result
        return bool((ids == want_ids).all() and np.allclose(w, want_w, rtol=1e-5, atol=1e-6))

    def raised(fn, kind):
        try:
            fn()
        except kind as exc:
            return str(exc)
        return None
''')


def run(*parts, timeout=120):
    """Runs PRELUDE and the script ``parts`` in a fresh interpreter; the JSON its last line
    printed."""
    script = PRELUDE + "".join(textwrap.dedent(part) for part in parts)
    try:
        done = subprocess.run([sys.executable, "-c", script],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the scenario did not finish in {timeout} s:\n{exc.stdout}\n{exc.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_refuses_sycl(got):
    """What a child forked after the SYCL runtime started does (see the module docstring)."""
    assert got["numpy_matches_reference"], got
    warned = [m for m in got["warnings"] if "fork" in m]
    assert len(warned) == 1 and "spawn" in warned[0], got["warnings"]
    assert got["backend"] == "numpy-reference" and "fork" in got["reason"], got
    assert got["strict"] and "DPMOE_STRICT" in got["strict"], got
    assert got["dpnp"] and "fork" in got["dpnp"], got


# The child's checks after a fork of a process whose SYCL runtime started.
REFUSING_CHILD = '''
    def child():
        result, caught = recorded(lambda: dpmoe.topk_softmax(logits, 3))
        about = dpmoe.info()
        os.environ["DPMOE_STRICT"] = "1"
        strict = raised(lambda: dpmoe.topk_softmax(logits, 3), dpmoe.FallbackError)
        del os.environ["DPMOE_STRICT"]
        return {"numpy_matches_reference": matches_reference(result), "warnings": caught,
                "backend": about["backend"], "reason": about["fallback_reason"],
                "strict": strict,
                "dpnp": raised(lambda: dpmoe.topk_softmax(on_device, 3), RuntimeError),
                "numba": int(numba.njit(lambda a: a.sum())(np.arange(5))),
                "numpy": float((logits @ logits.T).trace())}
'''


@needs_device
def test_fork_while_another_thread_compiles_and_launches_kernels():
    """5 forks, each while another thread holds numba's compiler lock (it compiles a kernel
    dpmoe has not built yet in this process); without the fork handler the child hung."""
    got = run('''
        import ml_dtypes
        import dpnp
        import numba
        from numba.core.compiler_lock import global_compiler_lock

        on_device = dpnp.asarray(logits)
        dpmoe.topk_softmax(logits, 3)  # the runtime has started
        x = rng.standard_normal((4, 12), dtype=np.float32)
        fresh = [lambda a: dpmoe.topk_softmax(a[:, :8], 2),
                 lambda a: dpmoe.topk_softmax(a[:, :8], 2, scoring="softmax_after_topk"),
                 lambda a: dpmoe.topk_sigmoid(a[:, :8], 2),
                 lambda a: dpmoe.silu_and_mul(a), lambda a: dpmoe.gelu_and_mul(a),
                 lambda a: dpmoe.gelu_tanh_and_mul(a), lambda a: dpmoe.swigluoai_and_mul(a),
                 lambda a: dpmoe.grouped_topk(a[:, :8], 2, num_expert_group=4, topk_group=2)]
        calls = [(f, d) for d in (np.float16, ml_dtypes.bfloat16, np.float32) for f in fresh]
        stop = threading.Event()

        def worker():  # compiles a new kernel per call, then keeps launching them
            index = 0
            while not stop.is_set():
                f, dtype = calls[index % len(calls)]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    f(x.astype(dtype))
                index += 1

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        ''', REFUSING_CHILD, '''
        compiler_lock = global_compiler_lock._lock
        trials = []
        for _ in range(5):
            deadline = time.monotonic() + 10
            while compiler_lock.acquire(blocking=False):  # until the worker compiles
                compiler_lock.release()
                time.sleep(0.002)
                if time.monotonic() > deadline:
                    break
            compiling = time.monotonic() <= deadline
            trials.append({"compiling_at_fork": compiling, **fork_and_wait(child, 20)})
        stop.set()
        thread.join(30)
        print(json.dumps(trials))
    ''')
    for trial in got:
        assert "ok" in trial, trial.get("error")
        assert_refuses_sycl(trial["ok"])
        assert trial["ok"]["numba"] == 10
    assert sum(t["compiling_at_fork"] for t in got) >= 3, got  # the scenario really ran


@needs_device
def test_fork_of_an_idle_process():
    """After its runtime started: the NumPy reference by default (the parent's runtime can
    have work in flight that the child would wait for), the device with DPMOE_FORK_SYCL=1.
    Before it started (``import dpmoe`` alone): the device, as in any process."""
    got = run('''
        import dpnp
        import numba

        def on_its_device():
            result, caught = recorded(lambda: dpmoe.topk_softmax(logits, 3))
            return {"matches_reference": matches_reference(result), "warnings": caught,
                    "backend": dpmoe.info()["backend"]}

        assert dpmoe._fork.installed()
        before_start = fork_and_wait(on_its_device, 60)
        on_device = dpnp.asarray(logits)
        dpmoe.topk_softmax(logits, 3)
        ''', REFUSING_CHILD, '''
        refused = fork_and_wait(child, 20)
        os.environ["DPMOE_FORK_SYCL"] = "1"
        allowed = fork_and_wait(on_its_device, 20)
        print(json.dumps({"before_start": before_start, "refused": refused,
                          "allowed": allowed}))
    ''')
    for case in ("before_start", "allowed"):
        assert "ok" in got[case], got[case].get("error")
        assert got[case]["ok"] == {"matches_reference": True, "warnings": [], "backend": "sycl"}
    assert "ok" in got["refused"], got["refused"].get("error")
    assert_refuses_sycl(got["refused"]["ok"])


def test_no_lock_is_inherited_held():
    """Threads holding dpmoe's locks and numba's compiler lock while the main thread forks:
    the fork waits for them, and the child can take every one at once."""
    got = run('''
        from numba.core.compiler_lock import global_compiler_lock
        from dpmoe import _fork

        ours = _fork.lock("test")
        holding = threading.Barrier(3)

        def hold(lock, seconds):
            with lock:
                holding.wait()
                time.sleep(seconds)

        threads = [threading.Thread(target=hold, args=(global_compiler_lock, 0.5)),
                   threading.Thread(target=hold, args=(ours, 0.3))]
        for t in threads:
            t.start()
        holding.wait()

        def child():
            return [global_compiler_lock._lock.acquire(timeout=5), ours.acquire(timeout=5)]

        started = time.monotonic()
        result = fork_and_wait(child, 20)
        waited = time.monotonic() - started
        for t in threads:
            t.join()
        print(json.dumps({"child": result, "waited": waited}))
    ''')
    assert got["child"] == {"ok": [True, True]}, got
    assert got["waited"] >= 0.25, got  # the fork waited for the holders
