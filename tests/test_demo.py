"""``python -m dpmoe`` checks itself and ends with a verdict line: on the device, under the
NumPy fallback (a DPMOE_DEVICE that names no device), and under --strict / DPMOE_STRICT=1."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ON_DEVICE

NO_DEVICE = "level_zero:gpu:7"  # a filter string that names no device here
WARNING_TEXT = re.compile(r"\w*Warning\b|warnings\.warn")


def demo(*args, env=None):
    full_env = dict(os.environ)
    full_env.pop("DPMOE_STRICT", None)
    full_env.update(env or {})
    run = subprocess.run([sys.executable, "-m", "dpmoe", *args], capture_output=True,
                         text=True, timeout=600, env=full_env)
    lines = run.stdout.strip().splitlines()
    return run, lines[-1] if lines else ""


@pytest.mark.skipif(not ON_DEVICE, reason="no SYCL device: the demo falls back")
def test_on_the_device_the_verdict_is_ok():
    import dpmoe

    about = dpmoe.info()
    run, verdict = demo("--tokens", "8", "--repeats", "1")
    assert run.returncode == 0, run.stdout + run.stderr
    for line in ("device:", "layer:", "input:", "output:", "error:", "time:"):
        assert line in run.stdout
    assert verdict.startswith(f"OK: dpmoe on {about['device']} ({about['filter_string']}) "
                              "matches the NumPy reference (max relative error "), verdict
    assert verdict.endswith("<= 1.0e-05, float32)"), verdict
    assert not WARNING_TEXT.search(run.stderr), run.stderr


@pytest.mark.skipif(not ON_DEVICE, reason="no SYCL device: the demo falls back")
def test_an_untuned_shape_is_a_note_line_not_a_raw_warning(tmp_path):
    # tiny has no packaged tuned config; an empty user folder makes sure there is none
    run, verdict = demo("--config", "tiny", "--dtype", "bfloat16", "--tokens", "8",
                        "--repeats", "1", env={"DPMOE_TUNED_CONFIG_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^note: +no tuned config for this shape on this device", run.stdout,
                     re.M), run.stdout
    assert not WARNING_TEXT.search(run.stdout + run.stderr), run.stdout + run.stderr
    assert verdict.startswith("OK: ") and verdict.endswith("<= 1.6e-02, bfloat16)"), verdict


def test_the_fallback_says_that_no_device_was_used_and_why():
    run, verdict = demo("--config", "tiny", "--tokens", "8", "--repeats", "1",
                        env={"DPMOE_DEVICE": NO_DEVICE})
    assert run.returncode == 0, run.stdout + run.stderr
    assert verdict.startswith("FALLBACK: no SYCL device was used, so no kernel was checked "
                              f"(reason: no SYCL device for '{NO_DEVICE}'"), verdict
    assert f"device:  none: no SYCL device for '{NO_DEVICE}'" in run.stdout
    assert "None (None)" not in run.stdout
    assert "kernel compilation" not in run.stdout
    assert "not checked" in run.stdout
    # the fallback is reported in the output, not as a raw RuntimeWarning as well
    assert not WARNING_TEXT.search(run.stdout + run.stderr), run.stdout + run.stderr


@pytest.mark.parametrize("how", ["--strict", "DPMOE_STRICT=1"])
def test_a_strict_fallback_fails(how):
    args = ["--config", "tiny", "--tokens", "8", "--repeats", "1"]
    env = {"DPMOE_DEVICE": NO_DEVICE}
    if how == "--strict":
        args.append("--strict")
    else:
        env["DPMOE_STRICT"] = "1"
    run, verdict = demo(*args, env=env)
    assert run.returncode == 1, run.stdout + run.stderr
    assert verdict.startswith(f"FAILED: no SYCL device was used (reason: no SYCL device for "
                              f"'{NO_DEVICE}'"), verdict
    assert "forbids the NumPy fallback" in verdict
    assert "Traceback" not in run.stderr, run.stderr


@pytest.mark.skipif(not ON_DEVICE, reason="no SYCL device: the demo falls back")
def test_an_error_above_the_tolerance_fails(monkeypatch, capsys):
    from dpmoe import __main__ as demo_module

    monkeypatch.setitem(demo_module.TOLERANCE, "float32", -1.0)  # no error is that small
    code = demo_module.main(["--config", "tiny", "--tokens", "8", "--repeats", "0"])
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 1
    assert verdict.startswith("FAILED: dpmoe on ") and "differs from the NumPy reference" in \
        verdict and verdict.endswith("> -1.0e+00, float32)"), verdict
