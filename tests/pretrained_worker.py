"""Loads every family's tiny checkpoint with dpmoe.models.from_pretrained and runs it on
both execution paths, in a process where importing torch fails (run by
test_pretrained.py). Prints one JSON object: {family: {dtype: {path: error}}}, the errors
relative to the largest output of transformers' block."""

import importlib.abc
import json
import os
import sys


class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} was imported while loading a checkpoint")
        return None


sys.meta_path.insert(0, NoTorch())

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from dpmoe import models  # noqa: E402


def main(folder: str) -> None:
    results = {}
    for family in sorted(os.listdir(folder)):
        expected = np.load(os.path.join(folder, family, "expected.npz"))
        layer_index = int(expected["layer"])
        results[family] = {}
        for dtype in ("float32", "bfloat16"):
            x = expected["x"]
            if dtype == "bfloat16":
                x = x.astype(ml_dtypes.bfloat16)
            layer = models.from_pretrained(os.path.join(folder, family, dtype), layer_index)
            want = expected[dtype]
            scale = float(np.abs(want).max())
            results[family][dtype] = {
                path: float(np.abs(layer(x, path=path).astype(np.float32) - want).max() / scale)
                for path in ("grouped", "per_token")}
    assert "torch" not in sys.modules, "torch was imported"
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
