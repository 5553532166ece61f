"""Reused intermediate buffers: one set per running call, a bounded total kept between
calls, and clear() frees the sets of every thread."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import assert_close, needs_device, normal

import dpmoe
from dpmoe.workspace import Workspace


def queue():
    return dpmoe.device.default_queue()[0]


@needs_device
def test_a_set_reuses_its_buffers_and_grows():
    ws = Workspace()
    with ws.session(queue()) as buffers:
        a = buffers.buffer("gate", (4, 8), "float32")
        b = buffers.buffer("gate", (2, 8), "bfloat16")
        assert b.shape == (2, 8) and b.dtype == np.uint16
        assert b.get_array()._pointer == a.get_array()._pointer  # fits: same memory
        assert buffers.buffer("up", (4, 8), "float32").get_array()._pointer != a.get_array()._pointer
        assert buffers.buffer("gate", (64, 8), "float32").shape == (64, 8)
    with ws.session(queue()) as again:  # the next call gets the kept set back
        assert again is buffers


@needs_device
def test_concurrent_calls_never_share_a_set():
    ws = Workspace()
    inside, release, seen = threading.Barrier(3), threading.Event(), []

    def call():
        with ws.session(queue()) as buffers:
            seen.append(buffers)
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    release.set()
    for t in threads:
        t.join()
    assert seen[0] is not seen[1]


@needs_device
def test_kept_bytes_stay_within_the_limit_and_clear_frees_all_threads():
    ws = Workspace(limit=1 << 20)
    start = threading.Barrier(8)

    def call(i):
        with ws.session(queue()) as buffers:
            buffers.buffer("rows", (256, 256), "float32")  # 256 KiB each
            start.wait()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(8)))
    assert 0 < ws.held_bytes <= 1 << 20  # 4 of the 8 sets kept
    ws.clear()
    assert ws.held_bytes == 0


@needs_device
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pool_threads_leave_no_more_than_the_limit(dtype):
    layer = dpmoe.MoELayer(64, 96, 4, top_k=2, dtype=dtype, seed=0)
    rng = np.random.default_rng(0)
    xs = [normal(rng, (200, 64), layer.weights()["gate"].dtype) for _ in range(8)]
    dpmoe.workspace.clear()
    limit = dpmoe.workspace.WORKSPACE.limit
    dpmoe.workspace.set_limit(1 << 20)  # 2 of the 8 sets of this layer's intermediates
    try:
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(layer, xs))
        assert 0 < dpmoe.workspace.WORKSPACE.held_bytes <= 1 << 20
        for x, out in zip(xs, outs):
            assert_close(out, layer.reference(x))
        dpmoe.workspace.clear()
        assert dpmoe.workspace.WORKSPACE.held_bytes == 0
    finally:
        dpmoe.workspace.set_limit(limit)


def test_set_limit_refuses_nonsense():
    with pytest.raises(ValueError, match="nbytes"):
        dpmoe.workspace.set_limit(-1)
