"""The execution plan: one function chooses path, GEMM backend and chunks; it is visible
(dpmoe.explain, MoELayer.plan) and the path keyword reaches it."""

import numpy as np
import pytest
from conftest import assert_close, needs_device, normal, routing

import dpmoe
from dpmoe import reference, tuning


@pytest.fixture
def no_tuned_configs(tmp_path, monkeypatch):
    """An empty user folder and a shape no packaged file has."""
    monkeypatch.setenv("DPMOE_TUNED_CONFIG_DIR", str(tmp_path))
    return tmp_path


@needs_device
def test_explain_says_how_a_call_runs(no_tuned_configs):
    plan = dpmoe.explain(16, 64, 96, 8, 2, "float32", path="per_token")
    assert (plan.path, plan.gemm, plan.source) == ("per_token", "gemv-kernels", "path='per_token'")
    assert "per_token path" in str(plan) and "gemv-kernels" in str(plan)
    grouped = dpmoe.explain(16, 64, 96, 8, 2, "float32", path="grouped")
    assert grouped.gemm in ("onemkl-host-f32", "dpnp.matmul")
    assert grouped.chunk_tokens == 16


@needs_device
def test_portable_gemm_is_chosen_when_host_blas_is_off(monkeypatch):
    monkeypatch.setenv("DPMOE_NO_HOST_ONEMKL", "1")
    assert dpmoe.explain(4, 64, 96, 8, 2, "bfloat16", path="grouped").gemm == "dpnp.matmul"


@needs_device
@pytest.mark.parametrize("amx, want", [(True, "grouped"), (False, "per_token")])
def test_untuned_bf16_default_follows_the_cpu(no_tuned_configs, monkeypatch, amx, want):
    """Without AMX, oneMKL's bf16 GEMM streamed weights at 1.5 GB/s on an AMD EPYC: decode
    goes per-token there by default; with AMX it is grouped."""
    if dpmoe.explain(1, 64, 96, 8, 2, "bfloat16", path="grouped").gemm != "onemkl-host-bf16":
        pytest.skip("oneMKL's host bf16 GEMM is not available on this device")
    monkeypatch.setattr(tuning, "has_amx", lambda: amx)
    plan = dpmoe.explain(1, 64, 96, 8, 2, "bfloat16")
    assert plan.path == want and plan.source == "default"


@needs_device
def test_user_folder_is_read_before_the_packaged_configs(no_tuned_configs):
    queue = dpmoe.device.default_queue()[0]
    name = queue.sycl_device.name
    path = tuning.save_configs({1: {"path": "per_token"}}, 8, 96, "float32", name)
    assert path.parent == no_tuned_configs
    plan = dpmoe.explain(1, 64, 96, 8, 2, "float32")
    assert plan.path == "per_token" and str(no_tuned_configs) in plan.source


@needs_device
@pytest.mark.parametrize("path", ["auto", "grouped", "per_token"])
def test_path_keyword_and_layer_experts_agree_with_the_reference(rng, path):
    x = normal(rng, (9, 32))
    gate, up = normal(rng, (5, 32, 24), scale=0.2), normal(rng, (5, 32, 24), scale=0.2)
    down = normal(rng, (5, 24, 32), scale=0.2)
    weights, ids = routing(rng, 9, 5, 2)
    want = reference.fused_moe_forward(x, gate, up, down, weights, ids, 2, False)
    assert_close(dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, 2, False,
                                         path=path), want)
    layer = dpmoe.MoELayer.from_numpy(normal(rng, (32, 5)), gate, up, down, top_k=2)
    assert_close(layer.experts(x, weights, ids, path=path), want)
    assert layer.plan(9, path=path).path == (path if path != "auto" else layer.plan(9).path)


def test_use_grouped_topk_still_selects_the_path(rng):
    x = normal(rng, (3, 16))
    gate, up, down = normal(rng, (4, 16, 8)), normal(rng, (4, 16, 8)), normal(rng, (4, 8, 16))
    weights, ids = routing(rng, 3, 4, 2)
    a = dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, 2, True, False, False)
    b = dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, 2, True, path="per_token")
    np.testing.assert_array_equal(a, b)  # the per-token path is deterministic


@needs_device
@pytest.mark.parametrize("content", ["{not json", "{}", '{"1": {}}', "[1, 2]", '{"x": {"path": "grouped"}}'])
def test_malformed_tuned_file_is_named(no_tuned_configs, content):
    queue = dpmoe.device.default_queue()[0]
    name = tuning.config_file_name(4, 24, "float32", queue.sycl_device.name)
    (no_tuned_configs / name).write_text(content)
    with pytest.raises(ValueError, match="malformed|paths must be"):
        dpmoe.explain(3, 16, 24, 4)


@needs_device
def test_tiny_bf16_layers_are_not_packed():
    """oneMKL's packed format costs at least ~9 MiB a matrix: not for 12 KiB experts."""
    from conftest import BF16

    layer = dpmoe.MoELayer(64, 96, 4, top_k=2, dtype="bfloat16", seed=0)
    plan = layer.plan(8, path="grouped")
    if plan.gemm != "onemkl-host-bf16":
        pytest.skip("oneMKL's host bf16 GEMM is not available on this device")
    x = normal(np.random.default_rng(0), (8, 64), BF16)
    assert_close(layer(x), layer.reference(x))
    assert layer._experts.packed() is None
