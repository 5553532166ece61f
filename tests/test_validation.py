"""Bad input: a TypeError/ValueError naming the argument, before any kernel runs."""

import numpy as np
import pytest
from conftest import normal

import dpmoe

T, H, I, E, K = 6, 16, 8, 4, 2


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    return {
        "hidden_states": normal(rng, (T, H)),
        "gate_weights": normal(rng, (E, H, I)),
        "up_weights": normal(rng, (E, H, I)),
        "down_weights": normal(rng, (E, I, H)),
        "topk_weights": rng.random((T, K), dtype=np.float32),
        "topk_indices": np.array([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]], np.int32),
        "top_k": K,
    }


def with_(problem, **changes):
    return {**problem, **changes}


FUSED_BAD = [
    # (argument that is wrong, replacement, exception, what the message names)
    ("hidden_states", np.zeros((T, H, 1), np.float32), ValueError, "hidden_states"),
    ("hidden_states", np.zeros((T, H + 1), np.float32), ValueError, "hidden_states"),
    ("hidden_states", np.zeros((T, H), np.float64), TypeError, "hidden_states"),
    ("hidden_states", np.zeros((T, H), np.int32), TypeError, "hidden_states"),
    ("hidden_states", [[0.0] * H] * T, TypeError, "hidden_states"),
    ("gate_weights", np.zeros((E, H), np.float32), ValueError, "gate_weights"),
    ("up_weights", np.zeros((E, H, I + 1), np.float32), ValueError, "up_weights"),
    ("up_weights", np.zeros((E, H, I), np.float16), TypeError, "up_weights"),
    ("down_weights", np.zeros((E, H, I), np.float32), ValueError, "down_weights"),
    ("down_weights", np.zeros((E + 1, I, H), np.float32), ValueError, "down_weights"),
    ("top_k", 0, ValueError, "top_k"),
    ("top_k", E + 1, ValueError, "top_k"),
    ("top_k", 2.0, TypeError, "top_k"),
    ("top_k", float("nan"), ValueError, "top_k"),
    ("top_k", 3, ValueError, "topk_weights"),  # shapes not [T, top_k]
    ("topk_weights", np.ones((T, K + 1), np.float32), ValueError, "topk_weights"),
    ("topk_weights", np.ones((T, K), np.int32), TypeError, "topk_weights"),
    ("topk_indices", np.ones((T + 1, K), np.int32), ValueError, "topk_indices"),
    ("topk_indices", np.ones((T, K), np.float32), TypeError, "topk_indices"),
    ("topk_indices", np.full((T, K), E, np.int32), ValueError, "topk_indices"),
    ("topk_indices", np.full((T, K), -1, np.int64), ValueError, "topk_indices"),
    ("topk_indices", np.full((T, K), 2**40, np.int64), ValueError, "topk_indices"),
    ("topk_indices", np.zeros((T, K), bool), TypeError, "topk_indices"),
    ("topk_indices", [[0, 1]] * T, TypeError, "topk_indices"),
    ("hidden_states", np.zeros((T, H), np.complex64), TypeError, "hidden_states"),
    ("hidden_states", np.zeros((T, H), bool), TypeError, "hidden_states"),
    ("hidden_states", np.zeros((T, H), object), TypeError, "hidden_states"),
    ("hidden_states", None, TypeError, "hidden_states"),
    ("gate_weights", None, TypeError, "gate_weights"),
    ("gate_weights", np.zeros((0, H, I), np.float32), ValueError, "gate_weights"),
    ("gate_weights", np.zeros((E, 0, I), np.float32), ValueError, "gate_weights"),
    ("topk_weights", np.full((T, K), np.nan, np.float32), ValueError, "topk_weights"),
    ("topk_weights", np.full((T, K), np.inf, np.float32), ValueError, "topk_weights"),
    ("topk_weights", None, TypeError, "topk_weights"),
    ("top_k", -1, ValueError, "top_k"),
    ("top_k", True, TypeError, "top_k"),
    ("top_k", "2", TypeError, "top_k"),
    ("top_k", None, TypeError, "top_k"),
]


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-token"])
@pytest.mark.parametrize("name, value, error, names", FUSED_BAD)
def test_fused_moe_forward_rejects(problem, grouped, name, value, error, names):
    before = {k: v.copy() for k, v in problem.items() if isinstance(v, np.ndarray)}
    with pytest.raises(error, match=names):
        dpmoe.fused_moe_forward(**with_(problem, **{name: value}), inplace=True,
                                use_grouped_topk=grouped)
    for k, v in before.items():
        np.testing.assert_array_equal(problem[k], v)


def test_read_only_output_refused(problem):
    problem["hidden_states"].flags.writeable = False
    with pytest.raises(ValueError, match="hidden_states"):
        dpmoe.fused_moe_forward(**problem, inplace=True)


@pytest.mark.parametrize(
    "call, error, names",
    [
        (lambda: dpmoe.topk_softmax(np.zeros((3, 4), np.float32), 5), ValueError, "top_k"),
        (lambda: dpmoe.topk_softmax(np.zeros((3, 4), np.float32), 0), ValueError, "top_k"),
        (lambda: dpmoe.topk_softmax(np.zeros(4, np.float32), 1), ValueError, "gating_logits"),
        (lambda: dpmoe.topk_softmax(np.array([[0.0, np.nan]], np.float32), 1), ValueError, "gating_logits"),
        (lambda: dpmoe.topk_softmax(np.zeros((3, 4), np.complex64), 1), TypeError, "gating_logits"),
        (lambda: dpmoe.moe_align_block_size(np.zeros((3, 2), np.int32), 4, float("inf")), ValueError, "block_size"),
        (lambda: dpmoe.moe_align_block_size(np.zeros((3, 2), np.int32), 4, 0), ValueError, "block_size"),
        (lambda: dpmoe.moe_align_block_size(np.full((3, 2), 4, np.int32), 4, 16), ValueError, "topk_ids"),
        (lambda: dpmoe.moe_align_block_size(np.zeros((3, 2), np.int32), 0, 16), ValueError, "num_experts"),
        (lambda: dpmoe.moe_align_block_size(np.zeros((3, 2), np.int32), 4, 16, np.zeros(5, np.int32)),
         ValueError, "together"),
        (lambda: dpmoe.moe_align_block_size(np.zeros((3, 2), np.int32), 4, 16, np.zeros(5, np.int32),
                                            np.zeros(5, np.int32), np.zeros(1, np.int32)),
         ValueError, "sorted_token_ids"),
        (lambda: dpmoe.silu_and_mul(np.zeros((3, 5), np.float32)), ValueError, "x"),
        (lambda: dpmoe.silu_and_mul_moe(np.zeros((3, 4), np.float32), np.zeros((3, 5), np.float32)),
         ValueError, "up_output"),
        (lambda: dpmoe.moe_sum(np.zeros((3, 2, 4), np.float32), np.zeros((3, 3), np.float32)),
         ValueError, "topk_weights"),
        (lambda: dpmoe.moe_sum(np.zeros((3, 4), np.float32), np.zeros((3, 2), np.float32)),
         ValueError, "expert_out"),
        (lambda: dpmoe.grouped_gemm_moe(np.zeros((3, 4), np.float32), np.zeros((2, 5, 6), np.float32), None,
                                        np.zeros((3, 6), np.float32), np.ones((3, 1), np.float32),
                                        np.zeros((3, 1), np.int32), 1), ValueError, "B"),
        (lambda: dpmoe.grouped_gemm_moe(np.zeros((3, 4), np.float32), np.zeros((2, 4, 6), np.float32),
                                        np.zeros((2, 5), np.float32), np.zeros((3, 6), np.float32),
                                        np.ones((3, 1), np.float32), np.zeros((3, 1), np.int32), 1),
         ValueError, "C"),
        (lambda: dpmoe.MoELayer(16, 8, 4, top_k=5), ValueError, "top_k"),
        (lambda: dpmoe.MoELayer(16, 8, 4, dtype="int8"), TypeError, "dtype"),
        (lambda: dpmoe.fused_moe_forward(np.zeros((2, 4), np.float32), np.zeros((2, 4, 3), np.float32),
                                         np.zeros((2, 4, 3), np.float32), np.zeros((2, 3, 4), np.float32),
                                         np.ones((2, 1), np.float32), np.zeros((2, 1), np.int32), 1,
                                         device=3.5), TypeError, "device"),
    ],
)
def test_other_functions_reject(call, error, names):
    with pytest.raises(error, match=names):
        call()


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-token"])
def test_strided_and_reversed_views_work(problem, grouped):
    """Non-contiguous and negative-stride views are valid input, computed correctly."""
    from conftest import assert_close

    from dpmoe import reference

    wide = np.repeat(problem["hidden_states"], 2, axis=1)[:, ::2]  # stride 2
    reversed_rows = problem["hidden_states"][::-1]
    for x in (wide, reversed_rows):
        assert not x.flags.c_contiguous
        args = with_(problem, hidden_states=x)
        got = dpmoe.fused_moe_forward(**args, use_grouped_topk=grouped)
        want = reference.fused_moe_forward(np.ascontiguousarray(x), *[args[k] for k in (
            "gate_weights", "up_weights", "down_weights", "topk_weights", "topk_indices")], K, True)
        assert_close(got, want)


def test_read_only_inputs_are_fine_without_inplace(problem):
    for v in problem.values():
        if isinstance(v, np.ndarray):
            v.flags.writeable = False
    out = dpmoe.fused_moe_forward(**problem)
    assert out.flags.writeable


def test_block_size_too_large_is_named():
    with pytest.raises(ValueError, match="block_size"):
        dpmoe.moe_align_block_size(np.zeros((3, 2), np.int32), 4, 2**31)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-token"])
def test_zero_stride_inplace_target_refused_before_compute(problem, grouped):
    x = np.broadcast_to(problem["hidden_states"][:1], (T, H))
    with pytest.raises(ValueError, match="hidden_states"):
        dpmoe.fused_moe_forward(**with_(problem, hidden_states=x), inplace=True,
                                use_grouped_topk=grouped)


@pytest.mark.parametrize("scale", [1e39, float("inf"), float("nan")])
def test_scaling_must_be_finite_in_float32(problem, scale):
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        dpmoe.fused_moe_forward(**problem, routed_scaling_factor=scale)


@pytest.mark.parametrize("alias, kind", [("bf16", "bfloat16"), ("fp32", "float32"),
                                         ("float16", "float16")])
def test_layer_dtype_aliases(alias, kind):
    assert dpmoe.MoELayer(16, 8, 4, dtype=alias, seed=0).kind == kind


def test_layer_dtype_names_the_choices():
    with pytest.raises(TypeError, match="dtype must be one of .*bfloat16"):
        dpmoe.MoELayer(16, 8, 4, dtype="bfloat17")


@pytest.mark.parametrize("spec", [":::", "opencl::", ":cpu"])
def test_malformed_device_variable_is_named(monkeypatch, spec):
    monkeypatch.setenv("DPMOE_DEVICE", spec)
    with pytest.raises(ValueError, match="DPMOE_DEVICE"):
        dpmoe.topk_softmax(np.zeros((2, 4), np.float32), 1)


def test_torch_tensor_gets_a_conversion_hint():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"\.numpy\(\)"):
        dpmoe.topk_softmax(torch.zeros(2, 4), 1)


def test_path_keyword_is_checked(problem):
    with pytest.raises(ValueError, match="path"):
        dpmoe.fused_moe_forward(**problem, path="fast")


@pytest.mark.parametrize("value", [None, "no", 0.5])
def test_renormalize_must_be_a_bool(problem, value):
    with pytest.raises(TypeError, match="renormalize"):
        dpmoe.fused_moe_forward(**problem, renormalize=value)


def test_float64_weights_must_be_finite_in_float32(problem):
    weights = problem["topk_weights"].astype(np.float64)
    weights[1, 0] = 1e39
    before = problem["hidden_states"].copy()
    with pytest.raises(ValueError, match="topk_weights"):
        dpmoe.fused_moe_forward(**with_(problem, topk_weights=weights), inplace=True)
    np.testing.assert_array_equal(problem["hidden_states"], before)


def test_fused_experts_names_its_own_arguments(problem):
    w13 = np.zeros((E, 2 * I, H), np.float32)
    w2 = np.zeros((E, H, I), np.float32)
    with pytest.raises(ValueError, match="topk_ids"):
        dpmoe.fused_experts(problem["hidden_states"], w13, w2, problem["topk_weights"],
                            np.full((T, K), E, np.int32))
