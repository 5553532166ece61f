import numpy as np
import pytest
from conftest import assert_close, needs_device, normal, to_dpnp

import dpmoe
from dpmoe import reference


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("num_tokens", [1, 29], ids=["decode", "prefill"])
def test_layer_matches_reference(rng, dtype, num_tokens):
    layer = dpmoe.MoELayer(48, 40, 6, top_k=2, dtype=dtype, seed=3)
    w = layer.weights()
    x = normal(rng, (num_tokens, 48), w["gate"].dtype)
    want = reference.moe_layer(x, w["router"], w["gate"], w["up"], w["down"], 2, True)
    assert_close(layer(x), want)


def test_from_numpy_and_route(rng):
    router = normal(rng, (16, 4))
    gate, up = normal(rng, (4, 16, 8)), normal(rng, (4, 16, 8))
    down = normal(rng, (4, 8, 16))
    layer = dpmoe.MoELayer.from_numpy(router, gate, up, down, top_k=2, renormalize=False)
    x = normal(rng, (10, 16))
    weights, ids = layer.route(x)
    want_w, want_ids = reference.topk_softmax(x @ router, 2, False)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_w, rtol=1e-5)
    assert_close(layer(x), reference.moe_layer(x, router, gate, up, down, 2, False))


def test_layer_rejects_wrong_width(rng):
    layer = dpmoe.MoELayer(16, 8, 4, seed=0)
    with pytest.raises(ValueError, match="hidden_states"):
        layer(normal(rng, (3, 15)))


@needs_device
def test_layer_keeps_dpnp_on_device(rng):
    layer = dpmoe.MoELayer(16, 8, 4, seed=0)
    x = normal(rng, (5, 16))
    out = layer(to_dpnp(x))
    assert out.sycl_queue is not None
    assert_close(out.asnumpy(), layer(x))
