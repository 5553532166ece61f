"""The README's Python example runs as written."""

import re
from pathlib import Path

import numpy as np

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README.md has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    from dpmoe import reference

    want = reference.fused_moe_forward(namespace["x"], namespace["gate"], namespace["up"],
                                       namespace["down"], namespace["topk_weights"],
                                       namespace["topk_ids"], 2, True)
    np.testing.assert_allclose(namespace["out"], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert namespace["y"].shape == (64, 1024)
