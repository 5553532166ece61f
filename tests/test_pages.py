"""Huge-page placement and the array helpers that avoid dpnp's per-call overhead."""

import numpy as np
import pytest
from conftest import needs_device

from dpmoe import arrays, pages

pytestmark = needs_device


def queue():
    return arrays.dpnp.empty(1).sycl_queue


@pytest.mark.parametrize("shape", [(0,), (3, 0), (7,), (5, 3), (pages.MIN_BYTES // 4 + 5,)])
def test_upload_copies_exactly(shape):
    h = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    d = pages.upload(h, queue())
    assert d.shape == h.shape and d.dtype == h.dtype
    np.testing.assert_array_equal(d.asnumpy(), h)


def test_advice_keeps_contents_and_skips_small_arrays():
    big = pages.upload(np.arange(3 * pages.HUGE_PAGE // 4, dtype=np.float32) * 0.5, queue())
    before = big.asnumpy()
    assert isinstance(pages.advise(big, now=True), bool)  # False where Linux says no
    np.testing.assert_array_equal(big.asnumpy(), before)
    assert pages.advise(pages.upload(np.ones(16, np.float32), queue())) is False


def test_flat_is_a_view_of_contiguous_arrays_and_a_copy_otherwise():
    d = pages.upload(np.arange(12, dtype=np.float32).reshape(3, 4), queue())
    line = arrays.flat(d)
    assert line.shape == (12,)
    line[5] = -1.0
    assert float(d[1, 1]) == -1.0
    column = arrays.flat(d[:, 1])  # strided: copied
    np.testing.assert_array_equal(column.asnumpy(), np.array([1.0, -1.0, 9.0], np.float32))


def test_empty_has_the_storage_dtype():
    q = queue()
    assert arrays.empty((2, 3), "float32", q).dtype == np.float32
    assert arrays.empty((2, 3), "bfloat16", q).dtype == np.uint16
    assert arrays.empty((4,), "int32", q).dtype == np.int32
