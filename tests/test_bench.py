"""The benchmark's command line, output files and tuner, on the tiny config (1-2 tokens,
1-2 repeats); its numbers are not asserted, only their form."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ON_DEVICE

import dpmoe
from dpmoe import bench

needs_device = pytest.mark.skipif(not ON_DEVICE, reason="the benchmark needs a SYCL device")


def _wrote(out: str, what: str) -> Path:
    """The absolute path the run printed after ``wrote <what>:``."""
    found = re.findall(rf"^wrote {what}: (.+)$", out, flags=re.M)
    assert len(found) == 1, out
    path = Path(found[0])
    assert path.is_absolute() and path.is_file(), path
    return path


def test_help_documents_every_flag_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    usage, _, rest = text.partition("\n\n")
    flags = re.findall(r"\[(--[a-z-]+)", usage)
    assert {"--test", "--config", "--tokens", "--dtype", "--repeats", "--json", "--plot",
            "--tune", "--tune-dir"} <= set(flags)
    assert "dpmoe against its baselines" in rest  # the module docstring is the description
    options = rest[rest.index("options:"):]
    for flag in flags:  # each flag's entry: from its line to the next option's
        entry = re.search(rf"^  {flag}\b.*?(?=^  -|\Z)", options, flags=re.M | re.S)
        assert entry, flag
        assert "(default" in entry.group(0), f"{flag} has no default in --help:\n{entry.group(0)}"
    for default in ("default: moe", "default: 5", "default: bench_results.json",
                    "1 16 128 1024", "float32 bfloat16", "DPMOE_TUNED_CONFIG_DIR"):
        assert default in " ".join(options.split()), default


def test_roofline_is_capped_and_flagged_when_a_point_beats_the_limits():
    # 1 GB read in 10 ms at a 10 GB/s limit: ten times faster than the limit allows
    fast = bench.roofline(0.01, 1e9, 1e9, read_GBps=10.0, gemm_GFLOPs=1000.0)
    assert fast["roofline_pct"] == 100.0 and fast["limit_exceeded"]
    assert fast["roofline_pct_measured"] == pytest.approx(1000.0)
    slow = bench.roofline(0.2, 1e9, 1e9, read_GBps=10.0, gemm_GFLOPs=1000.0)
    assert slow["roofline_pct"] == pytest.approx(50.0) and not slow["limit_exceeded"]
    assert slow["roofline_bound"] == "memory" and slow["GBps"] == pytest.approx(5.0)


def test_timings_keep_median_spread_and_samples():
    row = {}
    median = bench.record(row, "x_ms", [0.003, 0.001, 0.002, 0.010])
    stats = row["stats"]["x_ms"]
    assert median == row["x_ms"] == stats["median"] == pytest.approx(2.5)
    assert (stats["min"], stats["max"], stats["n"]) == (pytest.approx(1.0), pytest.approx(10.0), 4)
    assert stats["q1"] <= stats["median"] <= stats["q3"]
    assert stats["samples"] == pytest.approx([3.0, 1.0, 2.0, 10.0])
    assert bench.format_spread(stats) == "2.50 (1.00-10.0)"


@needs_device
def test_moe_run_writes_json_and_plot_where_it_says(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--config", "tiny", "--tokens", "1", "2", "--dtype", "bfloat16",
                       "--repeats", "2", "--json", "rows.json", "--plot", "times.png"]) == 0
    out = capsys.readouterr().out
    assert _wrote(out, "JSON") == tmp_path / "rows.json"
    assert re.search(r"\| +\d[\d.]* \(\d[\d.]*-\d[\d.]*\) \|", out)  # median (min-max) cells
    result = json.loads((tmp_path / "rows.json").read_text())
    rows = result["rows"]
    assert [r["tokens"] for r in rows] == [1, 2]
    assert result["limit_probe_rounds"] == 3  # before, between and after the points
    for row in rows:
        assert row["plan"] in ("grouped", "per_token") and row["dpmoe_plan"]
        assert row["dpmoe_path"] in ("grouped", "per_token")
        for column in ("dpmoe_ms", "grouped_ms", "per_token_ms", "naive_dpnp_ms", "reference_ms"):
            stats = row["stats"][column]
            assert row[column] == stats["median"] > 0
            assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]
            assert stats["n"] == len(stats["samples"]) == 2
        assert 0 < row["roofline_pct"] <= 100
        assert row["limit_exceeded"] == (row["roofline_pct_measured"] > 100)
    png = _wrote(out, "plot")
    assert png == tmp_path / "times.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_device
@pytest.mark.parametrize("test", ["silu", "align", "routing", "overhead"])
def test_stage_and_overhead_runs(tmp_path, test, capsys):
    out = tmp_path / "rows.json"
    assert bench.main(["--test", test, "--config", "tiny", "--tokens", "1", "--dtype", "float32",
                       "--repeats", "2", "--json", str(out)]) == 0
    assert _wrote(capsys.readouterr().out, "JSON") == out
    (row,) = json.loads(out.read_text())["rows"]
    assert row["dpmoe_ms"] > 0
    for column, stats in row["stats"].items():
        assert stats["min"] <= row[column] == stats["median"] <= stats["max"]
    if test == "overhead":
        assert {"grouped_ms", "per_token_ms"} <= set(row["stats"])
        assert row["stats"]["grouped_ms"]["n"] == bench.OVERHEAD_MIN_REPEATS


@needs_device
def test_tune_writes_to_the_user_folder_and_dpmoe_reads_it(tmp_path, monkeypatch, capsys):
    from dpmoe import tuning

    monkeypatch.setenv("DPMOE_TUNED_CONFIG_DIR", str(tmp_path))
    assert tuning.user_config_dir() == tmp_path
    assert bench.main(["--tune", "--config", "tiny", "--tokens", "1", "40", "--dtype", "float32",
                       "--repeats", "1"]) == 0
    written = _wrote(capsys.readouterr().out, "tuned config")
    assert written.parent == tmp_path
    assert written.name.startswith("E=4,N=96,dtype=float32,device=")
    saved = {int(t): c for t, c in json.loads(written.read_text()).items()}
    assert set(saved) == {1, 40} and all(c["path"] in ("grouped", "per_token")
                                         for c in saved.values())
    device = dpmoe.info()["device"]
    choice, source = tuning.get_config(4, 96, "float32", device, 30)  # nearest T: 40
    assert choice["path"] == saved[40]["path"] and str(written) in source
    hidden, inter, experts, top_k = bench.MODEL_CONFIGS["tiny"]
    w = bench.make_weights("tiny", "float32")
    layer = dpmoe.MoELayer.from_numpy(w["router"], w["gate"], w["up"], w["down"], top_k=top_k)
    plan = layer.plan(30)
    assert plan.path == saved[40]["path"] and str(written) in plan.source


@needs_device
def test_tune_dir_overrides_the_folder_and_says_it_is_not_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPMOE_TUNED_CONFIG_DIR", str(tmp_path / "user"))
    assert bench.main(["--tune", "--config", "tiny", "--tokens", "1", "--dtype", "float32",
                       "--repeats", "1", "--tune-dir", str(tmp_path / "elsewhere")]) == 0
    out = capsys.readouterr().out
    assert _wrote(out, "tuned config").parent == tmp_path / "elsewhere"
    assert "not read" in out and not (tmp_path / "user").exists()


def test_default_config_warns_once_per_process(tmp_path):
    # a fresh process: "once per process" cannot be observed in one that may have warned
    code = """if True:
        import json, warnings
        from dpmoe import tuning
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [tuning.get_config(3, 7, "float32", "nowhere", 1),
                   tuning.get_config(3, 7, "float32", "nowhere", 500),
                   tuning.get_config(5, 9, "float32", "nowhere", 1, "float32")]
        warned = [w for w in caught if issubclass(w.category, tuning.DefaultConfigWarning)]
        print(json.dumps({"got": got, "warned": len(warned),
                          "message": str(warned[0].message) if warned else ""}))
    """
    env = {**os.environ, "DPMOE_TUNED_CONFIG_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["got"] == [[{"path": "per_token"}, "default"], [{"path": "grouped"}, "default"],
                             # grouped GEMMs on oneMKL's host BLAS: grouped at any T
                             [{"path": "grouped"}, "default"]]
    assert result["warned"] == 1
    assert "python -m dpmoe.bench --tune" in result["message"]
    assert str(tmp_path) in result["message"]  # where --tune would write


@needs_device
def test_quantized_formats_get_a_bar_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--config", "tiny", "--tokens", "1", "--dtype", "bfloat16", "int8",
                       "--repeats", "1", "--json", "rows.json", "--plot", "times.png"]) == 0
    out = capsys.readouterr().out
    plots = re.findall(r"wrote plot: (\S+)", out)
    assert [Path(p).name for p in plots] == ["times.png", "times_formats.png"]
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


@needs_device
def test_load_run_compares_a_build_with_a_plain_read(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench.main(["--test", "load", "--config", "tiny", "--dtype", "bfloat16",
                       "--repeats", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["MB"] > 0 and row["read_GBps"] > 0 and row["load_GBps"] > 0
    assert row["load_vs_read_pct"] == pytest.approx(100 * row["read_ms"] / row["load_ms"])


@needs_device
def test_peers_run_in_their_own_interpreter_checked_against_the_reference(tmp_path, capsys,
                                                                           monkeypatch):
    pytest.importorskip("torch")
    from dpmoe import peers

    out = tmp_path / "rows.json"
    argv = ["--config", "tiny", "--tokens", "1", "--dtype", "float32", "--repeats", "1",
            "--peers", "pytorch", "--json", str(out)]
    assert bench.main(argv) == 0
    assert re.search(r"peer pytorch .* tiny float32: check at T=16 passed",
                     capsys.readouterr().out)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["pytorch_ms"] > 0 and row["speedup_vs_pytorch"] > 0
    # a peer whose check fails is named and not timed
    monkeypatch.setitem(peers.CHECK_TOLERANCE, "float32", -1.0)
    assert bench.main(argv) == 0
    assert "peer pytorch, tiny float32: FAILED the check at T=16" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["rows"]
    assert "pytorch_ms" not in row
    # a peer without its environment says how to make it
    monkeypatch.setenv("DPMOE_PEERS_DIR", str(tmp_path / "none"))
    assert bench.main(argv[:-4] + ["--peers", "ipex", "--json", str(out)]) == 0
    assert "python -m dpmoe.bench --setup-peers ipex" in capsys.readouterr().out


@needs_device
def test_a_peer_gets_int8_experts_as_codes_and_scales(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    from dpmoe import peers

    out = tmp_path / "rows.json"
    argv = ["--config", "tiny", "--tokens", "1", "--dtype", "int8", "--repeats", "1",
            "--peers", "pytorch", "--json", str(out)]
    assert bench.main(argv) == 0
    assert re.search(r"peer pytorch .* tiny int8: check at T=16 passed", capsys.readouterr().out)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["pytorch_ms"] > 0 and row["speedup_vs_pytorch"] > 0
    # the check compares with the reference on the same codes and scales: a worker handed
    # down scales off by 2x fails it and is not timed
    written = peers._weight_arrays

    def doubled_down_scales(weights):
        arrays = written(weights)
        arrays["down_scales"] = arrays["down_scales"] * 2
        return arrays
    monkeypatch.setattr(peers, "_weight_arrays", doubled_down_scales)
    assert bench.main(argv) == 0
    assert "peer pytorch, tiny int8: FAILED the check at T=16" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["rows"]
    assert "pytorch_ms" not in row
