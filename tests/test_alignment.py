import numpy as np
import pytest
from conftest import needs_device, routing, to_dpnp

import dpmoe
from dpmoe import reference


def check_invariants(topk_ids, num_experts, block_size, sorted_ids, experts_ids, post_pad):
    """What any correct alignment satisfies, independent of the reference."""
    flat = np.asarray(topk_ids).reshape(-1)
    n = flat.size
    assert sorted_ids.shape == (n + num_experts * (block_size - 1),)
    real = sorted_ids[sorted_ids != n]
    np.testing.assert_array_equal(np.sort(real), np.arange(n))  # every slot exactly once
    assert post_pad[0] % block_size == 0 and post_pad[0] <= sorted_ids.size
    assert np.all(sorted_ids[post_pad[0]:] == n)
    for block in range(post_pad[0] // block_size):
        slots = sorted_ids[block * block_size:(block + 1) * block_size]
        slots = slots[slots != n]
        assert np.all(flat[slots] == experts_ids[block])
        assert np.all(np.diff(slots) > 0)  # ascending inside an expert's region
    assert np.all(experts_ids[post_pad[0] // block_size:] == -1)


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, skew",
    [
        (1, 8, 2, None),  # one token
        (5, 64, 6, None),  # tokens < experts
        (333, 7, 3, None),  # slots not a multiple of the block size
        (40, 9, 1, "one"),  # every token to one expert
        (50, 16, 4, "half"),  # half the experts get nothing
        (6, 4, 4, None),  # top_k = E
    ],
)
def test_matches_reference_and_invariants(rng, num_tokens, num_experts, top_k, skew, block_size):
    _, ids = routing(rng, num_tokens, num_experts, top_k, skew)
    got = dpmoe.moe_align_block_size(ids, num_experts, block_size)
    want = reference.moe_align_block_size(ids, num_experts, block_size)
    for g, w in zip(got, want):
        assert g.dtype == np.int32
        np.testing.assert_array_equal(g, w)
    check_invariants(ids, num_experts, block_size, *got)


def test_docstring_example():
    ids = np.array([[2, 0], [2, 1]], dtype=np.int64)
    sorted_ids, experts_ids, post_pad = dpmoe.moe_align_block_size(ids, 3, 2)
    np.testing.assert_array_equal(sorted_ids, [1, 4, 3, 4, 0, 2, 4])
    np.testing.assert_array_equal(experts_ids, [0, 1, 2, -1])
    np.testing.assert_array_equal(post_pad, [6])


def test_fills_given_buffers_in_place(rng):
    _, ids = routing(rng, 11, 6, 2)
    capacity = 22 + 6 * 15
    buffers = (np.zeros(capacity, np.int32), np.zeros(-(-capacity // 16), np.int32), np.zeros(1, np.int32))
    assert dpmoe.moe_align_block_size(ids, 6, 16, *buffers) is None
    for g, w in zip(buffers, reference.moe_align_block_size(ids, 6, 16)):
        np.testing.assert_array_equal(g, w)


@needs_device
def test_dpnp_buffers_filled_on_device(rng):
    import dpnp

    _, ids = routing(rng, 9, 5, 2)
    ids_d = to_dpnp(ids)
    capacity = 18 + 5 * 31
    buffers = [dpnp.zeros(n, dtype=np.int32, sycl_queue=ids_d.sycl_queue)
               for n in (capacity, -(-capacity // 32), 1)]
    dpmoe.moe_align_block_size(ids_d, 5, 32, *buffers)
    for g, w in zip(buffers, reference.moe_align_block_size(ids, 5, 32)):
        np.testing.assert_array_equal(g.asnumpy(), w)


def test_zero_tokens():
    sorted_ids, experts_ids, post_pad = dpmoe.moe_align_block_size(np.zeros((0, 2), np.int32), 4, 16)
    assert np.all(sorted_ids == 0) and sorted_ids.size == 4 * 15
    assert np.all(experts_ids == -1) and post_pad[0] == 0
