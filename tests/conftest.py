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

# Allowed max |got - want| as a fraction of the reference output's largest magnitude.
# float32: oneMKL and NumPy sum in different orders (about 1e-6 here); 16-bit outputs: the
# float32 results may round to neighbouring representable values, two units in the last
# place at the output's scale (float16 has 10 fraction bits, bfloat16 7).
REL_TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2 * 2.0**-10, BF16: 2 * 2.0**-7}

ON_DEVICE = dpmoe.info()["backend"] == "sycl"
needs_device = pytest.mark.skipif(not ON_DEVICE, reason="no SYCL device: nothing to place dpnp arrays on")


def assert_close(got, want, dtype=None):
    got = dpmoe.arrays.to_host(got)
    dtype = np.dtype(dtype or want.dtype)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    g = got.astype(np.float32)
    w = want.astype(np.float32)
    scale = max(float(np.abs(w).max(initial=0.0)), 1e-30)
    err = float(np.abs(g - w).max(initial=0.0))
    assert err <= REL_TOL[dtype] * scale, f"max error {err:.3e} > {REL_TOL[dtype]:.1e} * {scale:.3e}"


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
