"""The safetensors reader (dpmoe.checkpoint) and from_pretrained's memory, without torch:
checkpoints written here byte by byte, as the format's documentation describes them."""

import json
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from dpmoe import memory, models
from dpmoe.checkpoint import Checkpoint, CheckpointError

NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
         np.dtype(np.float16): "F16", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
         np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2",
         np.dtype(np.uint8): "U8", np.dtype(np.int32): "I32"}


def write(path, tensors, header_edit=None, cut=0):
    """A safetensors file of ``tensors``; ``header_edit`` may change the header dict,
    ``cut`` drops bytes from the end."""
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        data = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if header_edit:
        header_edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    body = struct.pack("<Q", len(text)) + text + b"".join(blobs)
    path.write_bytes(body[:len(body) - cut] if cut else body)


def folder_with(tmp_path, tensors, config=None, **edit):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config or {"model_type": "olmoe"}))
    write(tmp_path / "model.safetensors", tensors, **edit)
    return tmp_path


def test_tensors_come_back_bit_for_bit_read_only_and_mapped(tmp_path, rng):
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
               "b": rng.standard_normal((4,)).astype(ml_dtypes.bfloat16),
               "c": rng.standard_normal((2, 2)).astype(np.float16),
               "d": rng.standard_normal((6,)).astype(ml_dtypes.float8_e4m3fn),
               "e": np.zeros((0, 3), np.float32)}
    checkpoint = Checkpoint(folder_with(tmp_path, tensors))
    assert checkpoint.names() == sorted(tensors)
    for name, want in tensors.items():
        got = checkpoint.tensor(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    assert not checkpoint.tensor("a").flags.writeable


def test_sharded_checkpoints_follow_the_index(tmp_path, rng):
    a, b = (rng.standard_normal((2, 3)).astype(np.float32) for _ in range(2))
    write(tmp_path / "model-00001-of-00002.safetensors", {"x.a": a})
    write(tmp_path / "model-00002-of-00002.safetensors", {"x.b": b})
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x.a": "model-00001-of-00002.safetensors", "x.b": "model-00002-of-00002.safetensors"}}))
    checkpoint = Checkpoint(tmp_path)
    assert np.array_equal(checkpoint.tensor("x.b"), b) and "x.a" in checkpoint
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: the shard the "
                                              "index names for 'x.b'"):
        Checkpoint(tmp_path)


def shifted(name, by):
    def edit(header):
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + by, end + by]
    return edit


@pytest.mark.parametrize("edit, message", [
    (dict(cut=3), "tensor 'b': data .* runs past the end of the file"),
    (dict(header_edit=shifted("b", -4)), "tensors 'a' and 'b' overlap"),
    (dict(header_edit=lambda h: h["a"].update(shape=[2, 2])), "tensor 'a': 24 bytes for shape"),
    (dict(header_edit=lambda h: h["a"].update(dtype="Q4")), "tensor 'a': unsupported dtype 'Q4'"),
    (dict(header_edit=lambda h: h.update(a=[1, 2])), "tensor 'a': malformed header entry"),
])
def test_broken_files_are_named_with_their_tensor(tmp_path, edit, message):
    tensors = {"a": np.ones((2, 3), np.float32), "b": np.ones((4,), np.float32)}
    folder = folder_with(tmp_path, tensors, **edit)
    with pytest.raises(CheckpointError, match="model.safetensors: " + message):
        Checkpoint(folder)


def test_truncated_headers_and_missing_pieces_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match="header length 10000 runs past the file"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"{ab}")
    with pytest.raises(CheckpointError, match=r"model.safetensors \(its header\): not JSON"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="truncated: 1 bytes"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: cannot read"):
        Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpoint(tmp_path / "nothing")
    folder = folder_with(tmp_path / "ok", {"a": np.ones(2, np.float32)})
    with pytest.raises(CheckpointError, match="no tensor 'b' in the checkpoint"):
        Checkpoint(folder).tensor("b")


def olmoe_checkpoint(folder, num_experts, hidden, inter, dtype, rng, layers=1):
    """An OLMoE-style checkpoint, experts one tensor each ([out, in], x @ W^T)."""
    tensors = {}
    for i in range(layers):
        p = f"model.layers.{i}.mlp."
        tensors[p + "gate.weight"] = rng.standard_normal((num_experts, hidden)).astype(dtype)
        for e in range(num_experts):
            for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                ("down_proj", (hidden, inter))):
                tensors[f"{p}experts.{e}.{name}.weight"] = (
                    rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(dtype)
    config = {"model_type": "olmoe", "num_hidden_layers": layers, "num_experts": num_experts,
              "num_experts_per_tok": 2, "hidden_size": hidden, "intermediate_size": inter}
    return folder_with(folder, tensors, config)


def test_building_a_large_layer_holds_at_most_one_expert_matrix_on_the_host(tmp_path, rng):
    num_experts, hidden, inter = 16, 1024, 2048  # 201 MB of bf16 experts
    folder = olmoe_checkpoint(tmp_path, num_experts, hidden, inter, ml_dtypes.bfloat16, rng)
    expert_bytes = 3 * num_experts * hidden * inter * 2
    assert expert_bytes >= 200e6
    matrix = hidden * inter * 2
    # compiling the loading kernels allocates host memory once per process: not measured
    models.from_pretrained(olmoe_checkpoint(tmp_path / "tiny", 2, 64, 128, ml_dtypes.bfloat16,
                                            rng), 0)
    tracemalloc.start()
    try:
        with memory.track_allocations() as device:
            layer = models.from_pretrained(folder, 0)
        _, host_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert host_peak <= matrix, (host_peak, matrix)
    if layer.device is not None:  # the experts once, copied as stored and kept so
        assert sum(device) <= expert_bytes + 1e6, (sum(device), expert_bytes)
        assert layer._experts.trans == (True, True)
    x = rng.standard_normal((3, hidden)).astype(ml_dtypes.bfloat16)
    want = layer.reference(x).astype(np.float32)
    got = layer(x).astype(np.float32)
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


def test_quantized_checkpoints_load_as_stored(tmp_path, rng):
    """DeepSeek-V3's FP8 experts (F8_E4M3 + weight_scale_inv per expert) and GPT-OSS's MXFP4
    (U8 blocks and e8m0 scales), read from files without dequantising."""
    from dpmoe import quant

    num_experts, hidden, inter = 4, 64, 160  # inter: a partial 128-block
    p = "model.layers.1.mlp."
    tensors = {p + "gate.weight": rng.standard_normal((num_experts, hidden)).astype(np.float32),
               p + "gate.e_score_correction_bias": rng.standard_normal(num_experts).astype(np.float32)}
    for e in range(num_experts):
        for name, (rows, cols) in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                   ("down_proj", (hidden, inter))):
            tensors[f"{p}experts.{e}.{name}.weight"] = (
                rng.standard_normal((rows, cols)) * 0.2).astype(ml_dtypes.float8_e4m3fn)
            tensors[f"{p}experts.{e}.{name}.weight_scale_inv"] = rng.uniform(
                0.5, 2.0, (-(-rows // 128), -(-cols // 128))).astype(np.float32)
    config = {"model_type": "deepseek_v3", "num_hidden_layers": 2, "first_k_dense_replace": 1,
              "n_routed_experts": num_experts, "num_experts_per_tok": 2, "n_group": 1,
              "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5}
    layer = models.from_pretrained(folder_with(tmp_path / "fp8", tensors, config), 1)
    assert layer.kind == "fp8_block"
    want_up = quant.from_fp8_checkpoint(
        np.stack([tensors[f"{p}experts.{e}.up_proj.weight"].view(np.uint8) for e in range(4)]),
        np.stack([tensors[f"{p}experts.{e}.up_proj.weight_scale_inv"] for e in range(4)]))
    assert np.array_equal(layer.weights()["up"].dequantize(), want_up.dequantize())
    x = rng.standard_normal((5, hidden)).astype(ml_dtypes.bfloat16)
    want = layer.reference(x).astype(np.float32)
    assert np.abs(layer(x).astype(np.float32) - want).max() <= 2e-2 * np.abs(want).max()

    p = "model.layers.0.mlp."
    blocks = lambda rows, k: rng.integers(0, 256, (num_experts, rows, k // 32, 16), np.uint8)  # noqa: E731
    scales = lambda rows, k: rng.integers(122, 130, (num_experts, rows, k // 32), np.uint8)  # noqa: E731
    tensors = {p + "router.weight": rng.standard_normal((num_experts, hidden)).astype(np.float32),
               p + "router.bias": rng.standard_normal(num_experts).astype(np.float32),
               p + "experts.gate_up_proj_blocks": blocks(2 * inter, hidden),
               p + "experts.gate_up_proj_scales": scales(2 * inter, hidden),
               p + "experts.gate_up_proj_bias": rng.standard_normal((num_experts, 2 * inter)).astype(np.float32),
               p + "experts.down_proj_blocks": blocks(hidden, inter),
               p + "experts.down_proj_scales": scales(hidden, inter),
               p + "experts.down_proj_bias": rng.standard_normal((num_experts, hidden)).astype(np.float32)}
    config = {"model_type": "gpt_oss", "num_hidden_layers": 1, "num_local_experts": num_experts,
              "num_experts_per_tok": 2}
    layer = models.from_pretrained(folder_with(tmp_path / "mxfp4", tensors, config), 0)
    assert layer.kind == "mxfp4"
    want_down = quant.from_mxfp4_checkpoint(tensors[p + "experts.down_proj_blocks"],
                                            tensors[p + "experts.down_proj_scales"])
    assert np.array_equal(layer.weights()["down"].dequantize(), want_down.dequantize())
    want = layer.reference(x).astype(np.float32)
    assert np.abs(layer(x).astype(np.float32) - want).max() <= 2e-2 * np.abs(want).max()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("rows, cols", [(1, 5), (7, 3), (6, 130)])
def test_stacking_keeps_checkpoint_matrices_as_stored_bit_for_bit(rng, dtype, rows, cols):
    """_stack copies [out, in] matrices as they lie and hands back their transposed view
    (NaN and -0 bits kept); strided slices (GPT-OSS's interleaved gate/up) are copied."""
    from dpmoe.arrays import to_host, transposed_base
    from dpmoe.device import default_queue

    queue, _ = default_queue(None)
    stored = [rng.standard_normal((rows, cols)).astype(dtype) for _ in range(3)]
    stored[0][0, 0], stored[1][-1, -1] = np.nan, -0.0
    got = models._stack("w", [m.T for m in stored], queue)
    want = np.stack([m.T for m in stored])
    assert transposed_base(got) is not None or queue is None or rows == 1
    host = to_host(got)
    assert host.dtype == want.dtype and np.ascontiguousarray(host).tobytes() == want.tobytes()
    fused = np.stack(stored)  # [E, rows, cols]: every other column, as interleaved gate/up
    got = to_host(models._stack("w", [m[:, ::2] for m in fused], queue))
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(fused[:, :, ::2]).tobytes()


def qwen2_like(rng, dtype=np.float32, num_experts=4, hidden=16, inter=8):
    """An OLMoE-style layer plus a gated shared expert, by Qwen2-MoE's names."""
    p = "model.layers.0.mlp."
    shapes = {p + "gate.weight": (num_experts, hidden), p + "shared_expert_gate.weight": (1, hidden)}
    for owner in [f"experts.{e}." for e in range(num_experts)] + ["shared_expert."]:
        for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                            ("down_proj", (hidden, inter))):
            shapes[f"{p}{owner}{name}.weight"] = shape
    tensors = {k: rng.standard_normal(shape).astype(dtype) for k, shape in shapes.items()}
    config = {"model_type": "qwen2_moe", "num_hidden_layers": 1, "num_experts": num_experts,
              "num_experts_per_tok": 2, "norm_topk_prob": False}
    return tensors, config


def test_the_decoder_layers_block_is_taken_not_an_mtp_or_vision_copy(tmp_path, rng):
    tensors, config = qwen2_like(rng)
    copies = {}
    for root in ("mtp.layers.0.", "model.visual.blocks.0.", "mtp."):
        copies.update({root + k[len("model.layers.0."):]: v * 0.5 for k, v in tensors.items()})
    layer = models.from_pretrained(folder_with(tmp_path, {**tensors, **copies}, config), 0)
    assert np.array_equal(layer.weights()["router"], tensors["model.layers.0.mlp.gate.weight"].T)


def test_a_built_layer_keeps_nothing_mapped_from_the_file(tmp_path, rng):
    import mmap

    from dpmoe.device import is_device_array

    def mapped(a):
        while a is not None and not isinstance(a, mmap.mmap):
            a = getattr(a, "base", None) if isinstance(a, np.ndarray) else None
        return a is not None

    tensors, config = qwen2_like(rng)
    layer = models.from_pretrained(folder_with(tmp_path, tensors, config), 0)
    given = layer._given
    assert not any(isinstance(a, np.ndarray) and not is_device_array(a) and mapped(a)
                   for a in given.values())


@pytest.mark.parametrize("edit, error, message", [
    (lambda t, c: t.update({"model.layers.0.mlp.experts.3.up_proj.weight":
                            t["model.layers.0.mlp.experts.3.up_proj.weight"].astype(np.float16)}),
     ValueError, r"experts\.\{e\}\.up_proj\.weight: the experts' matrices differ in shape or dtype"),
    (lambda t, c: t["model.layers.0.mlp.gate.weight"].__setitem__((1, 3), np.nan),
     ValueError, "router"),
    (lambda t, c: t.update({"model.layers.0.mlp.gate.weight": np.ones(4, np.float32)}),
     ValueError, r"gate\.weight must be 2-D"),
    (lambda t, c: c.update(num_experts_per_tok=2.7), ValueError,
     "config.json: num_experts_per_tok must be an int"),
    (lambda t, c: c.update(norm_topk_prob="false"), ValueError,
     "config.json: norm_topk_prob must be a bool"),
    (lambda t, c: c.update(decoder_sparse_step=0), ValueError,
     "config.json: decoder_sparse_step must be >= 1"),
    (lambda t, c: c.update(mlp_only_layers=["0"]), ValueError,
     "config.json: mlp_only_layers must be a list of int"),
])
def test_bad_tensors_and_config_values_are_named(tmp_path, rng, edit, error, message):
    tensors, config = qwen2_like(rng)
    edit(tensors, config)
    with pytest.raises(error, match=message):
        models.from_pretrained(folder_with(tmp_path, tensors, config), 0)


@pytest.mark.parametrize("entry", [
    {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]},
    {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]},
])
def test_malformed_header_values_are_checkpoint_errors(tmp_path, entry):
    folder = folder_with(tmp_path, {"a": np.ones(2, np.float32)},
                         header_edit=lambda h: h.update(a=entry))
    with pytest.raises(CheckpointError, match="tensor 'a'"):
        Checkpoint(folder)


def test_odd_files_are_checkpoint_errors(tmp_path):
    folder = folder_with(tmp_path, {"a": np.ones(2, np.float32)})
    (folder / "config.json").write_bytes(b"[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: not a JSON object"):
        Checkpoint(folder)
    (folder / "config.json").write_bytes(b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}")
    with pytest.raises(CheckpointError, match="config.json: not JSON"):
        Checkpoint(folder)
    (folder / "config.json").write_bytes(b'{"model_type": "olm\xffoe"}')
    with pytest.raises(CheckpointError, match="config.json: not JSON"):
        Checkpoint(folder)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "../model.safetensors"}}))
    with pytest.raises(CheckpointError, match="is not a file name in the model's directory"):
        Checkpoint(folder)


def test_a_layer_that_cannot_fit_is_refused_before_anything_is_copied(tmp_path, rng,
                                                                      monkeypatch):
    tensors, config = qwen2_like(rng)
    folder = folder_with(tmp_path, tensors, config)
    monkeypatch.setattr(memory, "device_memory", lambda queue: (1 << 10, 1 << 10))
    monkeypatch.setattr(memory, "_host_available", lambda: 1 << 10)
    with memory.track_allocations() as made, pytest.raises(MemoryError, match="expert weights"):
        models.from_pretrained(folder, 0)
    assert sum(made) == 0


def test_fp8_weights_of_another_kind_are_refused(tmp_path, rng):
    p = "model.layers.0.mlp."
    tensors = {p + "gate.weight": rng.standard_normal((2, 32)).astype(np.float32)}
    for e in range(2):
        for name, shape in (("gate_proj", (16, 32)), ("up_proj", (16, 32)), ("down_proj", (32, 16))):
            tensors[f"{p}experts.{e}.{name}.weight"] = rng.standard_normal(shape).astype(
                ml_dtypes.float8_e5m2)
            tensors[f"{p}experts.{e}.{name}.weight_scale_inv"] = np.ones((1, 1), np.float32)
    config = {"model_type": "deepseek_v3", "num_hidden_layers": 1, "n_routed_experts": 2,
              "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1}
    with pytest.raises(TypeError, match=r"experts\.0\.gate_proj\.weight: FP8 weights .* float8_e5m2"):
        models.from_pretrained(folder_with(tmp_path, tensors, config), 0)
