"""Device choice, the NumPy fallback, and living beside PyTorch."""

import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from conftest import ON_DEVICE, assert_close, needs_device, normal

import dpmoe
from dpmoe import reference


def small_problem():
    rng = np.random.default_rng(7)
    x = normal(rng, (5, 12))
    gate, up, down = normal(rng, (3, 12, 8)), normal(rng, (3, 12, 8)), normal(rng, (3, 8, 12))
    weights = rng.random((5, 2), dtype=np.float32)
    ids = np.array([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0]], np.int32)
    return x, gate, up, down, weights, ids


def test_info_reports_versions_and_backend():
    about = dpmoe.info()
    assert about["backend"] in ("sycl", "numpy-reference")
    assert about["versions"]["numpy"]
    if ON_DEVICE:
        assert about["device"] and about["fallback_reason"] is None


def test_no_device_falls_back_with_one_warning(monkeypatch, fresh_warnings):
    monkeypatch.setenv("DPMOE_DEVICE", "level_zero:gpu:7")
    monkeypatch.delenv("DPMOE_STRICT", raising=False)
    problem = small_problem()
    with pytest.warns(RuntimeWarning, match="level_zero:gpu:7"):
        out = dpmoe.fused_moe_forward(*problem)
    np.testing.assert_array_equal(out, reference.fused_moe_forward(*problem, 2, True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason is announced once
        dpmoe.topk_softmax(problem[0][:, :3].copy(), 2)
    assert dpmoe.info()["backend"] == "numpy-reference"


def test_strict_mode_turns_fallback_into_an_error(monkeypatch, fresh_warnings):
    monkeypatch.setenv("DPMOE_DEVICE", "level_zero:gpu:7")
    monkeypatch.setenv("DPMOE_STRICT", "1")
    with pytest.raises(dpmoe.FallbackError, match="DPMOE_STRICT"):
        dpmoe.fused_moe_forward(*small_problem())


@pytest.mark.skipif(not ON_DEVICE, reason="needs a SYCL device")
def test_device_keyword_selects_the_device():
    problem = small_problem()
    out = dpmoe.fused_moe_forward(*problem, device=dpmoe.info()["filter_string"])
    assert_close(out, reference.fused_moe_forward(*problem, 2, True))


def test_comparison_accepts_another_float32_summation_order():
    # On an AMD EPYC (Zen 4) CPU oneMKL picks other float32 kernels, and an element of the
    # result above came out 1.5e-5 off: two units in the last place at its row's scale, within
    # the README's tolerance, yet rejected by the element-wise rtol=1e-5 this test used.
    want = reference.fused_moe_forward(*small_problem(), 2, True)
    t = int(np.argmax(np.abs(want).max(axis=1)))  # the loudest token: its row reaches 121.8
    h = int(np.argmin(np.abs(want[t])))  # and its quietest value (0.29)
    got = want.copy()
    got[t, h] += 2 * np.spacing(np.abs(want[t]).max())  # 1.5e-5
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_close(got, want)


TORCH_SCRIPT = """
import sys
import numpy as np
{first}
{second}
sys.path.insert(0, {tests!r})
from conftest import assert_close  # the README's tolerances
a = torch.randn(256, 256, dtype=torch.float32)
expected = a.double() @ a.double()
assert torch.allclose((a @ a).double(), expected, rtol=1e-4, atol=1e-3), "torch matmul wrong"
layer = dpmoe.MoELayer(32, 16, 4, seed=0)
x = np.random.default_rng(0).standard_normal((9, 32), dtype=np.float32)
w = layer.weights()
want = dpmoe.reference.moe_layer(x, w["router"], w["gate"], w["up"], w["down"], 2, True)
assert_close(layer(x), want)
assert dpmoe.info()["backend"] == "sycl", dpmoe.info()
bf16 = dpmoe.MoELayer(32, 16, 4, dtype="bfloat16", seed=0)  # loads oneMKL's bf16 GEMM
xb = x.astype(dpmoe.arrays.BFLOAT16)
wb = bf16.weights()
got = dpmoe.fused_moe_forward(xb, wb["gate"], wb["up"], wb["down"], *bf16.route(xb))
assert np.isfinite(got.astype(np.float32)).all()
b = torch.randn(300, 200) @ torch.randn(200, 100)
print("ok", float(b.sum()) == float(b.sum()))
"""


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
@pytest.mark.skipif(not ON_DEVICE, reason="the crash only shows with the SYCL stack loaded")
@pytest.mark.parametrize("order", ["torch-first", "dpmoe-first"])
def test_pytorch_in_the_same_process(order):
    imports = ["import torch", "import dpmoe"]
    if order == "dpmoe-first":
        imports.reverse()
    script = TORCH_SCRIPT.format(first=imports[0], second=imports[1], tests=os.path.dirname(__file__))
    env = {k: v for k, v in os.environ.items() if k not in ("DPMOE_DEVICE", "DPMOE_STRICT")}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
    assert "ok True" in run.stdout


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI promises a SYCL device")
def test_ci_runs_the_kernels_not_the_fallback():
    assert dpmoe.info()["backend"] == "sycl", dpmoe.info()


@pytest.mark.skipif(not ON_DEVICE, reason="needs a SYCL device")
def test_dpnp_imported_before_dpmoe_still_sees_the_device():
    script = "import dpnp, dpmoe; print(dpmoe.info()['backend'], dpnp.ones(2).sycl_device.filter_string)"
    env = {k: v for k, v in os.environ.items() if k not in ("DPMOE_DEVICE", "DPMOE_STRICT")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[0] == "sycl", run.stdout + run.stderr


@needs_device
def test_a_sub_device_is_refused_by_name_not_crashed_on(rng):
    import dpctl

    root = dpmoe.device.default_queue(None)[0].sycl_device
    try:
        sub = root.create_sub_devices(partition=1)[0]
    except Exception:  # noqa: BLE001 - a device that cannot be partitioned has no sub-device
        pytest.skip("the default device cannot be partitioned")
    with pytest.warns(RuntimeWarning, match="is a sub-device; numba-dpex 0.23 launches kernels"):
        layer = dpmoe.MoELayer(16, 8, 4, device=dpctl.SyclQueue(sub), seed=0)
        out = layer(rng.standard_normal((2, 16)).astype(np.float32))
    assert layer.device is None and out.shape == (2, 16)
