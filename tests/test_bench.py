"""The benchmark runs end to end (on the tiny config); its numbers are not asserted."""

import json

import pytest
from conftest import ON_DEVICE

from dpmoe import bench


@pytest.mark.skipif(not ON_DEVICE, reason="the benchmark needs a SYCL device")
@pytest.mark.parametrize("test", ["moe", "silu", "align", "routing", "overhead"])
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


@pytest.mark.skipif(not ON_DEVICE, reason="the tuner needs a SYCL device")
def test_tune_writes_a_config_that_get_config_reads(tmp_path, monkeypatch):
    from dpmoe import tuning

    assert bench.main(["--tune", "--config", "tiny", "--tokens", "1", "40", "--dtype", "float32",
                       "--repeats", "1", "--tune-dir", str(tmp_path)]) == 0
    files = list(tmp_path.glob("E=4,N=96,dtype=float32,device=*.json"))
    assert len(files) == 1
    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path)
    tuning.load_configs.cache_clear()
    device = files[0].name.split("device=")[1][:-5]
    configs = tuning.load_configs(files[0].name, str(tmp_path))
    assert set(configs) == {1, 40} and all(c["path"] in tuning.PATHS for c in configs.values())
    assert tuning.get_config(4, 96, "float32", device, 30) == configs[40]  # nearest T
    tuning.load_configs.cache_clear()


def test_default_config_warns_once_per_shape(monkeypatch, tmp_path):
    from dpmoe import tuning

    monkeypatch.setattr(tuning, "_warned", set())
    with pytest.warns(tuning.DefaultConfigWarning, match="sub-optimal"):
        assert tuning.get_config(3, 7, "float32", "nowhere", 1) == {"path": "per-token"}
    assert tuning.get_config(3, 7, "float32", "nowhere", 500) == {"path": "grouped"}
    # where the grouped GEMMs run on oneMKL's host BLAS, grouped at any token count
    assert tuning.get_config(3, 7, "float32", "nowhere", 1, host_gemm=True) == {"path": "grouped"}
