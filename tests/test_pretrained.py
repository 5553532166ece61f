"""Every supported MoE family, loaded from a sharded safetensors checkpoint of a tiny random
model that transformers made, against transformers' own block for that layer (needs the
``compat`` extra to make the checkpoints; the loading itself runs without torch)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import model_zoo  # noqa: E402

from dpmoe import models  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# errors relative to the largest output: float32 rounding, and bf16 weights with bf16
# activations between the GEMMs against transformers in float32 on the same bf16 values
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    for family in model_zoo.ZOO:
        made = model_zoo.make(family, str(folder / family))
        np.savez(folder / family / "expected.npz", **made)
    return folder


@pytest.fixture(scope="module")
def errors(zoo):
    done = subprocess.run([sys.executable, os.path.join(HERE, "pretrained_worker.py"), str(zoo)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_zoo_covers_every_family_and_at_least_twenty():
    assert sorted(model_zoo.ZOO) == sorted(models.FAMILIES)
    assert len(models.FAMILIES) >= 20


@pytest.mark.parametrize("family", sorted(model_zoo.ZOO))
def test_family_from_its_checkpoint_matches_transformers_without_torch(errors, family):
    for dtype, tolerance in TOLERANCE.items():
        for path, error in errors[family][dtype].items():
            assert error <= tolerance, (dtype, path, error)


def test_checkpoints_are_sharded_with_an_index(zoo):
    folder = zoo / "deepseek_v3" / "float32"
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) >= 3


def test_moe_layers_skip_the_dense_ones_as_config_says(zoo):
    from dpmoe.checkpoint import Checkpoint

    expected = {"qwen2_moe": [1], "deepseek_v3": [1], "llama4": [1], "nemotron_h": [1],
                "ernie4_5_moe": [1], "lfm2_moe": [1], "mixtral": [0, 1], "exaone_moe": [1]}
    for family, layers in expected.items():
        assert models.moe_layers(Checkpoint(zoo / family / "float32").config) == layers, family


def test_all_from_pretrained_builds_every_moe_layer_and_refuses_a_dense_one(zoo):
    layers = models.all_from_pretrained(zoo / "qwen2_moe" / "float32")
    assert list(layers) == [1]
    assert layers[1].num_experts == 6 and layers[1].top_k == 2
    with pytest.raises(ValueError, match="layer 0 .* has no MoE block"):
        models.from_pretrained(zoo / "qwen2_moe" / "float32", 0)


def test_a_config_that_disagrees_with_the_tensors_is_named(zoo, tmp_path):
    import shutil

    folder = tmp_path / "olmoe"
    shutil.copytree(zoo / "olmoe" / "float32", folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_experts"] = 7
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp\.gate\.weight has 6 rows, but config.json says 7"):
        models.from_pretrained(folder, 0)
    config["model_type"] = "not_a_moe"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'not_a_moe' is not a supported MoE family"):
        models.from_pretrained(folder, 0)
