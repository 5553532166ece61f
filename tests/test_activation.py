import numpy as np
import pytest
from conftest import DTYPE_IDS, DTYPES, assert_close, needs_device, normal, to_dpnp

import dpmoe
from dpmoe import reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 7), (5, 3, 129), (64, 1408)], ids=["one-row", "3d-odd", "qwen-I"])
def test_silu_and_mul_moe_in_place(rng, dtype, shape):
    gate = normal(rng, shape, dtype, scale=4.0)
    up = normal(rng, shape, dtype)
    want = gate.copy()
    reference.silu_and_mul_moe(want, up)
    up_before = up.copy()
    assert dpmoe.silu_and_mul_moe(gate, up) is None
    assert_close(gate, want)
    np.testing.assert_array_equal(up, up_before)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_silu_and_mul_halves(rng, dtype):
    x = normal(rng, (9, 2 * 37), dtype, scale=3.0)
    assert_close(dpmoe.silu_and_mul(x), reference.silu_and_mul(x))
    out = np.empty((9, 37), dtype)
    assert dpmoe.silu_and_mul(x, out=out) is out
    assert_close(out, reference.silu_and_mul(x))


def test_silu_saturates_without_nan():
    x = np.array([[-200.0, 200.0, 0.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    got = dpmoe.silu_and_mul(x)
    np.testing.assert_allclose(got, [[0.0, 200.0, 0.0]], atol=0)


@needs_device
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dpnp_gate_is_written_in_place(rng, dtype):
    gate = normal(rng, (4, 33), dtype)
    up = normal(rng, (4, 33), dtype)
    want = gate.copy()
    reference.silu_and_mul_moe(want, up)
    gate_d = to_dpnp(gate)
    dpmoe.silu_and_mul_moe(gate_d, to_dpnp(up))
    assert_close(gate_d, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "swigluoai"])
def test_other_gated_activations(rng, dtype, activation):
    x = normal(rng, (7, 2 * 45), dtype, scale=5.0)  # past swigluoai's limit of 7 too
    want = reference.act_and_mul(x, activation)
    assert_close(dpmoe.act_and_mul(x, activation), want)
    named = {"gelu": dpmoe.gelu_and_mul, "gelu_tanh": dpmoe.gelu_tanh_and_mul,
             "swigluoai": dpmoe.swigluoai_and_mul}[activation]
    assert_close(named(x), want)


def test_swigluoai_is_interleaved_and_clamped():
    x = np.array([[1.0, 2.0, 20.0, -30.0]], np.float32)  # gates 1, 20; ups 2, -30
    got = dpmoe.swigluoai_and_mul(x, alpha=1.0, limit=7.0)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    want = [1 * sig(1.0) * 3.0, 7 * sig(7.0) * (-6.0)]
    np.testing.assert_allclose(got[0], want, rtol=1e-6)


@pytest.mark.parametrize("kwargs, error, names", [
    (dict(activation="relu"), ValueError, "activation"),
    (dict(activation="swigluoai", alpha=float("nan")), ValueError, "alpha"),
    (dict(activation="swigluoai", limit=None), ValueError, "limit"),
])
def test_act_and_mul_rejects(kwargs, error, names):
    with pytest.raises(error, match=names):
        dpmoe.act_and_mul(np.zeros((2, 4), np.float32), **kwargs)
