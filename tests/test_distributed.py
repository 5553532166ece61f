"""Expert parallelism over MPI (dpmoe.distributed), run as real MPI jobs: ``mpiexec -n N``
subprocesses (oversubscribed where the machine has fewer cores), each with a timeout, the
cases in tests/ep_worker.py compared there with the single-process MoELayer."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="the mpi extra is not installed: pip install '.[mpi]'")

from conftest import ON_DEVICE  # noqa: E402
from dpmoe.configs import MODEL_CONFIGS  # noqa: E402

WORKER = Path(__file__).with_name("ep_worker.py")
CASES = ["forward_f32_per_token", "forward_bf16_per_token", "forward_f32_grouped",
         "forward_bf16_grouped", "given_routing_one_rank", "replies_in_token_dtype", "quantized_experts",
         "placement_and_dpnp", "reference",
         "refusals", "bad_construction", "construction_refusals", "row_budget"]
TIMEOUT = 420  # seconds for a whole job: each rank JIT-compiles its kernels on 2 cores


def mpiexec() -> str:
    """The launcher of the MPI that mpi4py loads: the one installed beside this Python."""
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.fail("no mpiexec beside this Python or on PATH (pip install '.[mpi]')")
    return found


def launch(ranks: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mpi4py", str(WORKER), *args]
    if ranks > 1:
        command = [mpiexec(), "-n", str(ranks), *command]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)


_jobs: dict[int, dict[str, str]] = {}


def results(ranks: int) -> dict[str, str]:
    """{case: "OK" or why it failed} of one job running every case on ``ranks`` ranks."""
    if ranks not in _jobs:
        job = launch(ranks, *CASES)
        found = {}
        for line in job.stdout.splitlines():
            if line.startswith("CASE "):
                _, name, verdict = line.split(" ", 2)
                found[name] = verdict
        if job.returncode or set(found) != set(CASES):
            found = {name: found.get(name) or f"job exited {job.returncode}:\n"
                     f"{job.stdout[-3000:]}\n{job.stderr[-3000:]}" for name in CASES}
        _jobs[ranks] = found
    return _jobs[ranks]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_expert_parallel_layer_matches_the_single_process_layer(ranks, case):
    if case == "placement_and_dpnp" and not ON_DEVICE:
        pytest.skip("no SYCL device: nothing to place dpnp arrays on")
    verdict = results(ranks)[case]
    assert verdict == "OK", verdict


def test_a_rank_failing_after_the_agreement_aborts_the_job():
    job = launch(2, "abort")
    assert job.returncode != 0
    assert "injected failure on the last rank" in job.stderr + job.stdout
    assert "UNREACHED" not in job.stdout


def test_a_rank_that_exits_ends_the_job():
    """A rank that dies while the others wait in a collective: mpiexec ends the job."""
    job = launch(2, "exit")
    assert job.returncode != 0
    assert "UNREACHED" not in job.stdout


def test_the_example_script_runs_on_two_ranks():
    example = Path(__file__).parent.parent / "notebooks" / "expert_parallel.py"
    job = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py", str(example)],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert job.returncode == 0, job.stdout + job.stderr
    assert "32 tokens over 2 rank(s): bit-identical to the single-process layer" in job.stdout


def test_the_benchmark_measures_an_expert_parallel_layer(tmp_path):
    if not ON_DEVICE:
        pytest.skip("the benchmark needs a SYCL device")
    out = tmp_path / "ep.json"
    job = subprocess.run(
        [mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py", "-m", "dpmoe.bench", "--test",
         "ep", "--config", "tiny", "--tokens", "1", "9", "--dtype", "bfloat16", "--replies",
         "float32", "tokens", "--repeats", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=TIMEOUT)
    assert job.returncode == 0, job.stdout + job.stderr
    result = json.loads(out.read_text())
    assert result["ranks"] == 2 and len(result["rows"]) == 4
    hidden, _, _, top_k = MODEL_CONFIGS["tiny"]
    for row in result["rows"]:
        assert row["ep_ms"] > 0 and row["tokens_per_s"] > 0
        shares = row["alltoall_pct"] + row["experts_pct"] + row["route_combine_pct"]
        assert abs(shares - 100) < 1e-6
        # every slot leaves its rank at most once and comes back once
        reply = 4 if row["replies"] == "float32" else 2
        assert 0 < row["bytes_per_token"] <= top_k * (hidden * 2 + 4 + hidden * reply)
    assert "ep_ms" in job.stdout and "alltoall_pct" in job.stdout


def test_dpmoe_does_not_need_mpi4py():
    code = ("import sys, dpmoe, dpmoe.distributed; "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; "
            "print(dpmoe.distributed.contiguous_placement(7, 3).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[0, 0, 0, 1, 1, 2, 2]"


def test_contiguous_placement_balances_ranges():
    from dpmoe.distributed import contiguous_placement

    for experts, ranks in [(8, 2), (7, 4), (256, 8), (5, 5), (3, 1)]:
        placement = contiguous_placement(experts, ranks)
        sizes = np.bincount(placement, minlength=ranks)
        assert sizes.sum() == experts and sizes.max() - sizes.min() <= 1
        assert (np.diff(placement) >= 0).all()
    with pytest.raises(ValueError, match="world_size"):
        contiguous_placement(4, 0)
