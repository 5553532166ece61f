"""topk_sigmoid, grouped_topk and softmax-after-top-k against the reference."""

import numpy as np
import pytest
from conftest import DTYPE_IDS, DTYPES, assert_close, normal

import dpmoe
from dpmoe import reference


def check(got, want):
    np.testing.assert_array_equal(got[1], want[1])
    assert_close(got[0], want[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_softmax_after_topk(rng, dtype):
    logits = normal(rng, (23, 32), dtype, 3.0)
    got = dpmoe.topk_softmax(logits, 4, scoring="softmax_after_topk")
    check(got, reference.topk_softmax(logits, 4, scoring="softmax_after_topk"))
    np.testing.assert_allclose(got[0].sum(axis=1), 1.0, rtol=1e-6)


def test_softmax_after_topk_docstring_example():
    weights, ids = dpmoe.topk_softmax(np.array([[1.0, 3.0, 2.0]], np.float32), 2,
                                      scoring="softmax_after_topk")
    np.testing.assert_array_equal(ids, [[1, 2]])
    np.testing.assert_allclose(weights, [[0.731059, 0.268941]], rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_sigmoid(rng, dtype, bias, renormalize):
    logits = normal(rng, (31, 16), dtype, 2.0)
    b = normal(rng, (16,), np.float32, 0.3) if bias else None
    check(dpmoe.topk_sigmoid(logits, 3, renormalize, b),
          reference.topk_sigmoid(logits, 3, renormalize, b))


@pytest.mark.parametrize(
    "num_tokens, num_experts, groups, topk_group, top_k, scoring, bias, scale",
    [
        (1, 16, 4, 2, 4, "softmax", False, 1.0),  # one token, DeepSeek-V2 style
        (37, 64, 8, 4, 6, "sigmoid", True, 2.5),  # DeepSeek-V3 style, scaled
        (9, 12, 3, 3, 12, "softmax", False, 1.0),  # every group kept, top_k = E
        (20, 32, 8, 1, 2, "sigmoid", True, 1.0),  # a single group kept
    ],
)
def test_grouped_topk(rng, num_tokens, num_experts, groups, topk_group, top_k, scoring, bias, scale):
    logits = normal(rng, (num_tokens, num_experts), np.float32, 2.0)
    b = normal(rng, (num_experts,), np.float32, 0.5) if bias else None
    got = dpmoe.grouped_topk(logits, top_k, groups, topk_group, True, scoring, b, scale)
    want = reference.grouped_topk(logits, top_k, groups, topk_group, True, scoring, b, scale)
    check(got, want)
    group_size = num_experts // groups
    for row in got[1]:  # chosen experts come from at most topk_group groups
        assert len(set((row // group_size).tolist())) <= topk_group


def test_grouped_topk_weights_are_unbiased_and_scaled_once(rng):
    logits = normal(rng, (5, 8), np.float32)
    bias = np.full(8, 0.5, np.float32)  # with one group, a constant bias changes no choice
    plain = dpmoe.grouped_topk(logits, 2, 1, 1, True, "sigmoid", None, 1.0)
    biased = dpmoe.grouped_topk(logits, 2, 1, 1, True, "sigmoid", bias, 3.0)
    np.testing.assert_array_equal(plain[1], biased[1])
    np.testing.assert_allclose(biased[0], 3.0 * plain[0], rtol=1e-6)


@pytest.mark.parametrize(
    "call, names",
    [
        (lambda x: dpmoe.grouped_topk(x, 2, 3, 1), "num_expert_group"),  # 8 % 3
        (lambda x: dpmoe.grouped_topk(x, 2, 4, 5), "topk_group"),
        (lambda x: dpmoe.grouped_topk(x, 5, 4, 2), "top_k"),  # only 4 experts in 2 groups
        (lambda x: dpmoe.grouped_topk(x, 2, 4, 2, scoring_func="relu"), "scoring_func"),
        (lambda x: dpmoe.grouped_topk(x, 2, 4, 2, routed_scaling_factor=float("nan")),
         "routed_scaling_factor"),
        (lambda x: dpmoe.grouped_topk(x, 2, 8, 2, correction_bias=np.zeros(8, np.float32)),
         "correction_bias"),
        (lambda x: dpmoe.topk_sigmoid(x, 2, correction_bias=np.zeros(7, np.float32)), "correction_bias"),
        (lambda x: dpmoe.topk_sigmoid(x, 2, correction_bias=np.full(8, np.nan, np.float32)),
         "correction_bias"),
        (lambda x: dpmoe.topk_softmax(x, 2, scoring="sigmoid"), "scoring"),
    ],
)
def test_routing_variants_reject(call, names):
    with pytest.raises(ValueError, match=names):
        call(np.zeros((3, 8), np.float32))


GROUPED_BAD = [
    # (options, what the message names): one routing spec refuses the same for every caller
    (dict(top_k=3, num_expert_group=4, topk_group=1), "top_k"),  # 2 candidates < top_k
    (dict(top_k=2, num_expert_group=3, topk_group=1), "num_expert_group"),  # 8 % 3
    (dict(top_k=2, num_expert_group=4, topk_group=5), "topk_group"),
    (dict(top_k=2, routed_scaling_factor=float("nan")), "routed_scaling_factor"),
    (dict(top_k=2, routed_scaling_factor=1e39), "routed_scaling_factor"),  # inf in float32
    (dict(top_k=2, routed_scaling_factor="2"), "routed_scaling_factor"),
]


@pytest.mark.parametrize("options, names", GROUPED_BAD)
def test_grouped_topk_and_the_layer_refuse_the_same_routing(rng, options, names):
    logits = normal(rng, (5, 8))
    with pytest.raises(ValueError, match=names):
        dpmoe.grouped_topk(logits, **_grouped_args(options))
    gate, up, down = normal(rng, (8, 6, 4)), normal(rng, (8, 6, 4)), normal(rng, (8, 4, 6))
    with pytest.raises(ValueError, match=names):
        dpmoe.MoELayer.from_numpy(normal(rng, (6, 8)), gate, up, down, scoring="sigmoid",
                                  **_grouped_args(options))


def _grouped_args(options):
    return dict(dict(num_expert_group=1, topk_group=1), **options)


def test_layer_routing_is_the_public_routing(rng):
    """MoELayer.route and grouped_topk on the same logits give the same bits."""
    router, bias = normal(rng, (6, 8)), normal(rng, (8,), scale=0.1)
    gate, up, down = normal(rng, (8, 6, 4)), normal(rng, (8, 6, 4)), normal(rng, (8, 4, 6))
    layer = dpmoe.MoELayer.from_numpy(router, gate, up, down, top_k=3, scoring="sigmoid",
                                      num_expert_group=4, topk_group=2, correction_bias=bias,
                                      routed_scaling_factor=2.5)
    x = normal(rng, (7, 6))
    weights, ids = layer.route(x)
    want = dpmoe.grouped_topk(x @ router, 3, 4, 2, True, "sigmoid", bias, 2.5)
    np.testing.assert_array_equal(ids, want[1])
    assert_close(weights, want[0])
    assert (ids >= 0).all()
