"""A test run without a SYCL device says loudly that it tested no kernel (see conftest)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_run_without_a_device_says_that_no_kernel_was_tested():
    env = {k: v for k, v in os.environ.items() if k not in ("DPMOE_STRICT", "PYTEST_ADDOPTS")}
    env["DPMOE_DEVICE"] = "level_zero:gpu:7"  # no such device: dpmoe falls back to the reference
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_device.py",
         "tests/test_properties.py", "-k", "info_reports or test_moe_sum"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    assert "dpmoe: NO SYCL DEVICE (no SYCL device for 'level_zero:gpu:7'" in out  # the header
    passed = int(re.search(r"(\d+) passed", out).group(1))
    assert passed == 2, out[-3000:]
    banner = f"NO SYCL DEVICE: {passed} tests ran the NumPy reference against itself; no kernel was tested"
    assert re.search(r"^!+ " + re.escape(banner) + " !+$", out, re.M), out[-3000:]
