import numpy as np
import pytest
from conftest import DTYPE_IDS, DTYPES, assert_close, needs_device, normal, to_dpnp

import dpmoe
from dpmoe import reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_tokens, top_k, hidden", [(1, 2, 1024), (13, 1, 33), (7, 8, 65)])
def test_moe_sum_matches_reference(rng, dtype, num_tokens, top_k, hidden):
    expert_out = normal(rng, (num_tokens, top_k, hidden), dtype)
    weights = rng.random((num_tokens, top_k), dtype=np.float32)
    assert_close(dpmoe.moe_sum(expert_out, weights), reference.moe_sum(expert_out, weights))


def test_moe_sum_into_out_and_bit_identical_repeats(rng):
    expert_out = normal(rng, (31, 4, 47))
    weights = rng.random((31, 4), dtype=np.float32)
    out = np.empty((31, 47), np.float32)
    first = dpmoe.moe_sum(expert_out, weights, out=out).copy()
    np.testing.assert_array_equal(dpmoe.moe_sum(expert_out, weights), first)
    assert_close(first, reference.moe_sum(expert_out, weights))


@needs_device
def test_moe_sum_dpnp(rng):
    expert_out = normal(rng, (5, 3, 20))
    weights = rng.random((5, 3), dtype=np.float32)
    got = dpmoe.moe_sum(to_dpnp(expert_out), to_dpnp(weights))
    assert_close(got.asnumpy(), reference.moe_sum(expert_out, weights))
