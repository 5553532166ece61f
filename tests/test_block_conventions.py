"""The block conventions of the model families as MoELayer options, against the reference:
non-gated experts (relu2), identity experts, routing weights on the input, an output bias,
a renormalization epsilon and SparseMixer routing; and the refusals of each."""

import numpy as np
import pytest

import dpmoe
from dpmoe import reference
from dpmoe.routing import route, routing_spec

from conftest import BF16, assert_close, needs_device

H, I, E = 40, 24, 6  # I and H not multiples of the GEMV blocks
PATHS = ["grouped", "per_token"]


def weights(rng, dtype=np.float32, num_experts=E, gated=True, router_rows=None):
    n = lambda *shape: (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-2])).astype(dtype)  # noqa: E731
    return dict(router=rng.standard_normal((H, router_rows or num_experts)).astype(np.float32),
                gate=n(num_experts, H, I) if gated else None, up=n(num_experts, H, I),
                down=n(num_experts, I, H))


def layer_of(w, top_k=2, renormalize=False, **options):
    return dpmoe.MoELayer.from_numpy(w["router"], w["gate"], w["up"], w["down"], top_k,
                                     renormalize, **options)


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 5, 37])
def test_non_gated_relu2_experts_and_shared_expert(rng, dtype, num_tokens):
    w = weights(rng, dtype, gated=False)
    shared = dict(shared_up_proj=w["up"][0][:, :8].copy(), shared_down_proj=w["down"][0][:8].copy())
    layer = layer_of(w, activation="relu2", scoring="sigmoid", renormalize=True, **shared)
    x = rng.standard_normal((num_tokens, H)).astype(dtype)
    want = layer.reference(x)
    # relu2 by hand: down(relu(x @ up)^2), shared likewise, for the oracle itself
    wts, ids = layer.route(x)
    xf = x.astype(np.float32)
    by_hand = sum(wts[:, j, None] * np.stack([
        np.square(np.maximum(xf[t] @ w["up"][ids[t, j]].astype(np.float32), 0))
        @ w["down"][ids[t, j]].astype(np.float32) for t in range(num_tokens)]) for j in range(2))
    by_hand += np.square(np.maximum(xf @ shared["shared_up_proj"].astype(np.float32), 0)) \
        @ shared["shared_down_proj"].astype(np.float32)
    if dtype == np.float32:
        assert_close(by_hand, want)
    for path in PATHS:
        assert_close(layer(x, path=path), want)


@pytest.mark.parametrize("num_tokens", [1, 9])
def test_identity_experts_add_their_weight_times_the_token(rng, num_tokens):
    w = weights(rng, router_rows=E + 3)
    bias = np.zeros(E + 3, np.float32)
    layer = layer_of(w, identity_experts=3, correction_bias=bias, routed_scaling_factor=6.0)
    x = rng.standard_normal((num_tokens, H)).astype(np.float32)
    for path in PATHS:
        assert_close(layer(x, path=path), layer.reference(x))
    # every slot on an identity expert: the block is the scaled weights times x
    only_identity = np.concatenate([np.full(E, -100.0, np.float32), np.zeros(3, np.float32)])
    layer = layer_of(w, identity_experts=3, correction_bias=only_identity)
    wts, ids = layer.route(x)
    assert (ids >= E).all()
    np.testing.assert_allclose(layer(x), wts.sum(axis=1, keepdims=True) * x, rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
def test_weights_on_the_input(rng, top_k, dtype):
    w = weights(rng, dtype)
    layer = layer_of(w, top_k, scoring="sigmoid", weights_on_input=True)
    x = rng.standard_normal((7, H)).astype(dtype)
    want = layer.reference(x)
    for path in PATHS:
        assert_close(layer(x, path=path), want)
    # not the same block as weighting the outputs (the experts are not linear)
    assert np.abs(layer_of(w, top_k, scoring="sigmoid").reference(x).astype(np.float32)
                  - want.astype(np.float32)).max() > 1e-3


def test_output_bias_and_epsilon(rng):
    w = weights(rng)
    bias = rng.standard_normal(H).astype(np.float32)
    layer = layer_of(w, 2, True, scoring="sigmoid", epsilon=0.5, output_bias=bias)
    x = rng.standard_normal((4, H)).astype(np.float32)
    for path in PATHS:
        assert_close(layer(x, path=path), layer.reference(x))
    raw, _ = layer_of(w, 2, False, scoring="sigmoid").route(x)
    wts, _ = layer.route(x)
    np.testing.assert_allclose(wts, raw / (raw.sum(axis=1, keepdims=True) + 0.5), rtol=1e-6)


@needs_device
@pytest.mark.parametrize("num_experts", [2, 7])
def test_sparsemixer_kernel_matches_its_reference(rng, num_experts):
    from dpmoe.arrays import to_device, to_host
    from dpmoe.device import default_queue

    queue, _ = default_queue(None)
    logits = rng.standard_normal((33, num_experts)).astype(np.float32)
    logits[0] = 0.0  # all tied, zero factors
    logits[1] = -np.abs(logits[1])  # all negative
    logits[2, :2] = logits[2].max() + 1  # a tie for the first pick
    for eps in (0.0, 0.01, 0.3, 10.0):
        spec = routing_spec(num_experts, 2, scoring="sparsemixer", jitter_eps=eps)
        wts, ids = route(spec, to_device(logits, queue), "float32")
        want_w, want_i = reference.sparsemixer(logits, eps)
        assert np.array_equal(to_host(ids), want_i)
        np.testing.assert_allclose(to_host(wts), want_w, rtol=2e-6)
    assert np.array_equal(want_i[2], [0, 1])  # ties go to the smaller index


@pytest.mark.parametrize("options, error, message", [
    (dict(activation="relu2"), ValueError, "activation 'relu2' is not gated: pass gate=None"),
    (dict(gated=False), ValueError, "gate is None, but activation 'silu' is gated"),
    (dict(gated=False, activation="relu2", gate_bias=np.zeros((E, I), np.float32),
          up_bias=np.zeros((E, I), np.float32)), ValueError, "takes no gate_bias"),
    (dict(identity_experts=2), ValueError, r"router must have shape \[H, E \+ identity_experts\]"),
    (dict(identity_experts=-1), ValueError, "identity_experts"),
    (dict(weights_on_input="yes"), TypeError, "weights_on_input"),
    (dict(output_bias=np.zeros(H + 1, np.float32)), ValueError, r"output_bias must have shape"),
    (dict(scoring="sparsemixer", top_k=3), ValueError, "picks exactly two experts"),
    (dict(scoring="sparsemixer", jitter_eps=-1.0), ValueError, "jitter_eps must be >= 0"),
    (dict(weights_on_input=True, held_experts=np.arange(3)), ValueError,
     "not supported for expert shards"),
    (dict(output_bias=np.full(H, np.nan, np.float32)), ValueError, "output_bias"),
    (dict(scoring="softmax_after_topk", epsilon=1e-6), ValueError, "does not renormalize"),
    (dict(jitter_eps=0.1), ValueError, "jitter_eps is SparseMixer's"),
    (dict(gated=False, activation="relu2", up_bias=np.zeros((E, I), np.float32)), ValueError,
     "takes no gate_bias or up_bias"),
])
def test_conventions_are_validated(rng, options, error, message):
    options = dict(options)
    w = weights(rng, gated=options.pop("gated", True))
    top_k = options.pop("top_k", 2)
    if "held_experts" in options:
        w = dict(w, gate=w["gate"][:3], up=w["up"][:3], down=w["down"][:3])
    with pytest.raises(error, match=message):
        layer_of(w, top_k, **options)


@pytest.mark.parametrize("weights_kind", ["bf16", "int8"])
@pytest.mark.parametrize("gemm", ["host", "portable"])
def test_non_gated_experts_keep_one_up_and_skip_the_gate_product(rng, monkeypatch, weights_kind,
                                                                 gemm):
    from dpmoe import quant

    if gemm == "portable":
        monkeypatch.setenv("DPMOE_NO_HOST_ONEMKL", "1")
    w = weights(rng, BF16, gated=False)
    up, down = w["up"], w["down"]
    if weights_kind == "int8":
        up, down = quant.quantize(up.astype(np.float32), "int8"), quant.quantize(down.astype(np.float32), "int8")
    layer = dpmoe.MoELayer.from_numpy(w["router"], None, up, down, 2, True, activation="relu2")
    x = rng.standard_normal((23, H)).astype(BF16)  # several rows per expert: packed GEMMs
    for path in PATHS:
        assert_close(layer(x, path=path), layer.reference(x))
    experts = layer._experts
    assert experts.gated is False
    if weights_kind == "bf16" and gemm == "host" and experts.packing_pays():
        packed = experts.packed()
        assert packed[0] is packed[1]  # one packed copy of up, not two


@needs_device
def test_dpnp_weights_on_another_queue_are_copied_to_the_layers(rng):
    import dpctl

    from dpmoe.device import default_queue, dpnp

    queue, _ = default_queue(None)
    other = dpctl.SyclQueue(queue.sycl_device)
    w = weights(rng)
    on_other = {k: dpnp.asarray(v, sycl_queue=other) for k, v in w.items()}
    layer = dpmoe.MoELayer.from_numpy(on_other["router"], on_other["gate"], on_other["up"],
                                      on_other["down"], 2, True, device=queue)
    x = rng.standard_normal((3, H)).astype(np.float32)
    want = layer_of(w, 2, True).reference(x)
    for path in PATHS:
        assert_close(layer(x, path=path), want)


def test_expert_parallel_layers_refuse_what_they_do_not_run(rng):
    pytest.importorskip("mpi4py")
    from dpmoe.distributed import ExpertParallelMoE

    w = weights(rng, router_rows=E + 2)
    with pytest.raises(ValueError, match="does not support identity_experts"):
        ExpertParallelMoE.from_numpy(w["router"], w["gate"], w["up"], w["down"], 2,
                                     identity_experts=2)
    w = weights(rng, gated=False)
    with pytest.raises(ValueError, match=r"does not support non-gated experts"):
        ExpertParallelMoE.from_numpy(w["router"], None, w["up"], w["down"], 2,
                                     activation="relu2")
    layer = layer_of(weights(rng), weights_on_input=True)
    with pytest.raises(ValueError, match="does not support weights_on_input"):
        ExpertParallelMoE.from_layer(layer)
