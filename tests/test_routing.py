import numpy as np
import pytest
from conftest import DTYPE_IDS, DTYPES, assert_close, needs_device, normal, to_dpnp

import dpmoe
from dpmoe import reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k",
    [
        (1, 8, 2),  # one token
        (3, 60, 4),  # tokens < experts, qwen-moe width
        (37, 5, 5),  # top_k = E
        (19, 64, 1),  # top_k = 1
    ],
)
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_softmax_matches_reference(rng, dtype, num_tokens, num_experts, top_k, renormalize):
    logits = normal(rng, (num_tokens, num_experts), dtype, scale=3.0)
    weights, ids = dpmoe.topk_softmax(logits, top_k, renormalize)
    want_w, want_ids = reference.topk_softmax(logits, top_k, renormalize)
    assert ids.dtype == np.int32 and weights.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    assert_close(weights, want_w)


def test_ties_pick_the_smaller_expert_index():
    logits = np.array([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    weights, ids = dpmoe.topk_softmax(logits, 3)
    np.testing.assert_array_equal(ids, [[1, 2, 4], [0, 1, 2]])
    np.testing.assert_allclose(weights[1], [0.2, 0.2, 0.2], rtol=1e-6)


def test_docstring_example():
    weights, ids = dpmoe.topk_softmax(np.array([[1.0, 3.0, 2.0]], dtype=np.float32), 2)
    np.testing.assert_array_equal(ids, [[1, 2]])
    np.testing.assert_allclose(weights, [[0.665241, 0.244728]], rtol=1e-5)


def test_renormalized_weights_sum_to_one(rng):
    logits = normal(rng, (50, 16))
    weights, _ = dpmoe.topk_softmax(logits, 4, renormalize=True)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)


def test_zero_tokens():
    weights, ids = dpmoe.topk_softmax(np.zeros((0, 8), np.float32), 2)
    assert weights.shape == (0, 2) and ids.shape == (0, 2)


@needs_device
def test_dpnp_in_dpnp_out_on_the_same_queue(rng):
    logits = to_dpnp(normal(rng, (7, 12)))
    weights, ids = dpmoe.topk_softmax(logits, 3)
    assert weights.sycl_queue == logits.sycl_queue and ids.sycl_queue == logits.sycl_queue
    want_w, want_ids = reference.topk_softmax(logits.asnumpy(), 3)
    np.testing.assert_array_equal(ids.asnumpy(), want_ids)
    assert_close(weights.asnumpy(), want_w)
