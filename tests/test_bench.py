"""The benchmark runs end to end (on the tiny config); its numbers are not asserted."""

import json

import pytest
from conftest import ON_DEVICE

from dpmoe import bench


@pytest.mark.skipif(not ON_DEVICE, reason="the benchmark needs a SYCL device")
@pytest.mark.parametrize("test", ["moe", "silu", "align", "routing"])
def test_bench_runs_and_writes_json(tmp_path, test, capsys):
    out = tmp_path / "rows.json"
    args = ["--test", test, "--config", "tiny", "--tokens", "1", "5", "--dtype", "bfloat16",
            "--repeats", "1", "--json", str(out)]
    if test == "moe":
        args += ["--plot", str(tmp_path / "speedups.png")]
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [1, 5]
    assert all(r["dpmoe_ms"] > 0 for r in rows)
    assert "dpmoe_ms" in capsys.readouterr().out
