import subprocess
import sys


def test_python_m_dpmoe_runs_and_checks_itself():
    run = subprocess.run([sys.executable, "-m", "dpmoe", "--tokens", "8", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    for line in ("device:", "layer:", "error:", "time:"):
        assert line in run.stdout
