"""Shared helpers: input makers, per-dtype tolerances, NumPy/dpnp placement."""

import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import dpmoe
from dpmoe import device as dpmoe_device

# Property tests: "ci" is fixed (derandomized) and short; DPMOE_HYPOTHESIS_PROFILE=long
# explores much further with fresh random examples.
_PROPERTY_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=12, derandomize=True, **_PROPERTY_SETTINGS)
settings.register_profile("long", max_examples=400, **_PROPERTY_SETTINGS)
settings.load_profile(os.environ.get("DPMOE_HYPOTHESIS_PROFILE", "ci"))

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]
DTYPE_IDS = ["f32", "f16", "bf16"]

# Allowed max |got - want| in each token row (index along the first axis) as a fraction of
# that row's scale, see row_scales. float32: oneMKL and NumPy sum in different orders (about
# 1e-6 here); 16-bit outputs: the float32 results may round to neighbouring representable
# values, two units in the last place at the row's scale (float16 has 10 fraction bits,
# bfloat16 7).
REL_TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2 * 2.0**-10, BF16: 2 * 2.0**-7}
# A row's scale is its own largest |want|, so that a quiet token beside a loud one is checked
# at its own size (a slot of weight 0.01 dropped from it must not hide under the loud token's
# scale), but at least ROW_FLOOR of the whole output's largest |want|: 16-bit kernels round
# intermediate results to 16 bits, an error that follows the size of the terms summed, which
# a row that cancels to nearly zero no longer shows; and a row of zeros is then held to
# rounding at the output's scale rather than to exact zeros.
ROW_FLOOR = 1 / 16
# A row of fewer values than this can cancel to nearly zero as a whole (rows of 1 to 3 values
# failed the floor of 1/16 in about 1 random bfloat16 fused_moe_forward example in 10): such
# outputs, and 1-D ones, are compared at the whole output's largest magnitude.
ROW_MIN_WIDTH = 8

ABOUT = dpmoe.info()
ON_DEVICE = ABOUT["backend"] == "sycl"
needs_device = pytest.mark.skipif(not ON_DEVICE, reason="no SYCL device: nothing to place dpnp arrays on")


def _rows(a):
    """a as [rows, values]: one row per index of the first axis (a 1-D array is one row)."""
    a = np.asarray(a)
    if a.ndim < 2:
        return a.reshape(1, a.size)
    return a.reshape(a.shape[0], int(np.prod(a.shape[1:])))


def row_scales(want):
    """The scale each token row's error is measured against (see ROW_FLOOR, ROW_MIN_WIDTH)."""
    w = np.abs(_rows(want).astype(np.float32))
    whole = max(float(w.max(initial=0.0)), 1e-30)
    if np.ndim(want) < 2 or w.shape[1] < ROW_MIN_WIDTH:
        return np.full(len(w), whole, np.float32)
    return np.maximum(w.max(axis=1, initial=0.0), np.float32(ROW_FLOOR * whole))


def assert_close(got, want, dtype=None):
    """got matches want (the reference) within REL_TOL[dtype] of each token row's scale."""
    got = dpmoe.arrays.to_host(got)
    dtype = np.dtype(dtype or want.dtype)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(_rows(got).astype(np.float32) - _rows(want).astype(np.float32)).max(axis=1, initial=0.0)
    scale = row_scales(want)
    ok = err <= REL_TOL[dtype] * scale  # a NaN fails
    if not ok.all():
        t = int(np.argmax(np.where(ok, 0.0, np.nan_to_num(err / scale, nan=np.inf))))
        where = f"token row {t}" if np.ndim(want) >= 2 else "output"
        raise AssertionError(
            f"{where}: max error {err[t]:.3e} > {REL_TOL[dtype]:.1e} * {scale[t]:.3e} "
            f"({int((~ok).sum())} of {len(ok)} rows off; the output's largest |want| is "
            f"{float(np.abs(want.astype(np.float32)).max(initial=0.0)):.3e})")


def to_dpnp(a):
    """The array on the default device; 16-bit floats as dpmoe stores them (bf16 as bits)."""
    import dpnp

    if a.dtype == BF16:
        return dpnp.asarray(a.view(np.uint16))
    return dpnp.asarray(a)


def normal(rng, shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(dtype)


def routing(rng, num_tokens, num_experts, top_k, skew=None):
    """(topk_weights f32, topk_ids i32); skew='one' sends everything to one expert,
    'half' leaves the upper half of the experts without tokens."""
    if skew == "one":
        ids = np.full((num_tokens, top_k), num_experts - 1, dtype=np.int32)
        ids[:, 1:] = np.arange(top_k - 1)  # top_k distinct experts per token
        ids[:, 0] = num_experts - 1
    else:
        pool = num_experts // 2 if skew == "half" else num_experts
        pool = max(pool, top_k)
        rows = [rng.permutation(pool)[:top_k] for _ in range(num_tokens)]
        ids = np.array(rows, dtype=np.int32).reshape(num_tokens, top_k)
    weights = rng.random((num_tokens, top_k), dtype=np.float32) + np.float32(0.05)
    return weights, ids


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def fresh_warnings():
    """Forget which fallback reasons were announced, so a test sees its warning."""
    dpmoe_device._warned.clear()
    yield
    dpmoe_device._warned.clear()


def pytest_configure(config):
    # With a SYCL device present, any NumPy fallback inside a test is a bug, not a feature:
    # make its warning an error (tests of the fallback expect it with pytest.warns).
    if ON_DEVICE:
        config.addinivalue_line("filterwarnings", "error:dpmoe.*NumPy reference:RuntimeWarning")
    # Test shapes have no tuned configs by design: the once-per-process notice says nothing
    # about the test (tests of the notice itself catch it with pytest.warns or a subprocess).
    config.addinivalue_line("filterwarnings", "ignore::dpmoe.tuning.DefaultConfigWarning")


# Without a SYCL device every dpmoe call falls back to the NumPy reference, so a test that
# compares dpmoe with the reference compares the reference with itself: such a run must not
# pass quietly as if the kernels had been tested.
NO_DEVICE_BANNER = "NO SYCL DEVICE: {n} tests ran the NumPy reference against itself; no kernel was tested"


def pytest_report_header(config):
    if ON_DEVICE:
        return f"dpmoe: kernels run on {ABOUT['device']} ({ABOUT['filter_string']})"
    return [f"dpmoe: NO SYCL DEVICE ({ABOUT['fallback_reason']})",
            "dpmoe: every call runs the NumPy reference: the tests compare it with itself, no kernel is tested"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if ON_DEVICE:
        return
    ran = sum(1 for outcome in ("passed", "failed", "xfailed", "xpassed")
              for report in terminalreporter.stats.get(outcome, [])
              if getattr(report, "when", "call") == "call")
    terminalreporter.write_sep("!", NO_DEVICE_BANNER.format(n=ran), red=True, bold=True)
    terminalreporter.write_line(f"dpmoe fell back because: {ABOUT['fallback_reason']}", red=True)
    terminalreporter.write_line("Run on a machine with a SYCL device (or fix DPMOE_DEVICE) to test the kernels.",
                                red=True)
