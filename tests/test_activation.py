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
