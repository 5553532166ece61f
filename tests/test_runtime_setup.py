"""The runtime set-up's footprint: the .pth ships in the wheel (so pip uninstall removes it),
its line is harmless, and the repair notice is one line.

Nothing here touches the running environment's site-packages: wheels are built from a copy
of the sources in a temporary folder and installed into a throw-away virtual environment.
"""

import csv
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from dpmoe import _runtime

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3/lib/libintelocl.so"


def _version(text):
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def _needs_a_wheel_builder():
    """The build runs without isolation (offline), with this environment's setuptools."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("cannot build a wheel here: setuptools is not installed (the test extra has it)")
    version = importlib.metadata.version("setuptools")
    if _version(version) < (70, 1) and not (_version(version) >= (64,) and importlib.util.find_spec("wheel")):
        pytest.skip(f"cannot build dpmoe's wheels offline with setuptools {version}: "
                    "it needs >= 70.1 (or >= 64 with the wheel package); the test extra has it")


def _source_copy(tmp_path):
    """What an sdist holds, copied, so that building leaves the checkout alone."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "dpmoe", src / "dpmoe",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def _run(args, **kwargs):
    run = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert run.returncode == 0, f"{args}: exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return run


def _record(wheel):
    with zipfile.ZipFile(wheel) as archive:
        record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        paths = [row[0] for row in csv.reader(archive.read(record).decode().splitlines())]
        pth = archive.read(_runtime.PTH_NAME).decode() if _runtime.PTH_NAME in paths else None
    return paths, pth


def _fake_broken_icd(prefix, named=PLACEHOLDER):
    (prefix / "lib").mkdir(parents=True, exist_ok=True)
    (prefix / "lib" / "libintelocl.so").write_bytes(b"")
    vendors = prefix / "etc" / "OpenCL" / "vendors"
    vendors.mkdir(parents=True, exist_ok=True)
    (vendors / "intel-cpu.icd").write_text(named + "\n")


def test_wheel_ships_the_pth_and_pip_uninstall_removes_it(tmp_path):
    _needs_a_wheel_builder()
    src = _source_copy(tmp_path)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(dist), "--no-deps",
          "--no-build-isolation", "--no-index", "-q"])
    (wheel,) = dist.glob("dpmoe-*.whl")
    paths, pth = _record(wheel)
    assert _runtime.PTH_NAME in paths, f"{_runtime.PTH_NAME} is not a file of the wheel: {paths}"
    assert pth == _runtime.PTH_LINE

    # install it into a throw-away venv (no pip of its own: this pip drives it), with an
    # ICD file that names a missing path as the pip wheels' does
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python]
    _run([*pip, "install", "--no-deps", "--no-index", "-q", str(wheel)])
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    assert (purelib / _runtime.PTH_NAME).read_text() == _runtime.PTH_LINE
    _fake_broken_icd(venv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCL_ICD_")}
    show = [python, "-c", "import os; print(os.environ.get('OCL_ICD_FILENAMES'))"]
    assert _run(show, env=env).stdout.strip() == str(venv / "lib" / "libintelocl.so")
    assert _run(show, env={**env, "OCL_ICD_VENDORS": "/somewhere"}).stdout.strip() == "None"

    _run([*pip, "uninstall", "-y", "-q", "dpmoe"])
    assert not (purelib / _runtime.PTH_NAME).exists(), "pip uninstall dpmoe left the .pth behind"
    assert not list(purelib.glob("dpmoe*"))


def test_editable_wheel_ships_the_pth(tmp_path):
    _needs_a_wheel_builder()
    src = _source_copy(tmp_path)
    dist = tmp_path / "dist"
    dist.mkdir()
    script = f"from setuptools import build_meta; print(build_meta.build_editable({str(dist)!r}))"
    name = _run([sys.executable, "-c", script], cwd=src).stdout.strip().splitlines()[-1]
    paths, pth = _record(dist / name)
    assert _runtime.PTH_NAME in paths, f"{_runtime.PTH_NAME} is not a file of the editable wheel: {paths}"
    assert pth == _runtime.PTH_LINE


PTH_CASES = {
    # name: (ICD file names an existing file?, environment, OCL_ICD_FILENAMES expected after)
    "broken-icd": (False, {}, "LIB"),
    "icd-fine": (True, {}, None),
    "user-set-filenames": (False, {"OCL_ICD_FILENAMES": "/mine.so"}, "/mine.so"),
    "user-set-vendors": (False, {"OCL_ICD_VENDORS": "/etc/OpenCL/vendors"}, None),
}


@pytest.mark.parametrize("case", PTH_CASES)
def test_pth_line_only_acts_on_a_broken_icd(case, tmp_path, monkeypatch):
    icd_fine, env, expected = PTH_CASES[case]
    prefix = tmp_path / "prefix"
    lib = prefix / "lib" / "libintelocl.so"
    _fake_broken_icd(prefix, named=str(lib) if icd_fine else PLACEHOLDER)
    script = textwrap.dedent(f"""
        import os, sys
        sys.prefix = {str(prefix)!r}
        exec({_runtime.PTH_LINE!r})
        print(os.environ.get("OCL_ICD_FILENAMES"))
    """)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OCL_ICD_")}
    # -S: without site.py, so that no installed .pth runs first
    run = _run([sys.executable, "-S", "-c", script], env={**clean, **env})
    assert run.stdout.strip() == str(expected).replace("LIB", str(lib))
    assert run.stderr == ""
    # dpmoe's import decides the same way
    monkeypatch.setattr(sys, "prefix", str(prefix))
    assert _runtime._icd_needs_help(prefix / "lib") == (not icd_fine)


def test_pth_line_is_silent_when_nothing_is_there(tmp_path):
    weird = tmp_path / "prefix"
    (weird / "etc" / "OpenCL" / "vendors" / "intel-cpu.icd").mkdir(parents=True)  # a folder
    (weird / "lib" / "libintelocl.so").mkdir(parents=True)
    for prefix in (tmp_path / "nothing", weird):
        script = f"import os, sys; sys.prefix = {str(prefix)!r}; exec({_runtime.PTH_LINE!r}); print(os.environ.get('OCL_ICD_FILENAMES'))"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("OCL_ICD_")}
        run = _run([sys.executable, "-S", "-c", script], env=clean)
        assert (run.stdout.strip(), run.stderr) == ("None", "")
    assert _runtime.PTH_LINE.startswith("import ") and _runtime.PTH_LINE.count("\n") == 1


def _repaired_setup(site):
    files = [str(site / "dpctl" / f"_ext{i}.cpython-311-x86_64-linux-gnu.so") for i in range(20)]
    files += [str(site / "numba_dpex" / "core" / f"_m{i}.so") for i in range(15)]
    setup = _runtime.RuntimeSetup(icd_filenames_set=True, pth_file=str(site / _runtime.PTH_NAME),
                                  repaired_files=files, site_packages=str(site),
                                  runtime_lib=str(site.parent.parent / "lib"))
    setup.undo = _runtime._undo_command(setup)
    return setup


def test_repair_notice_is_one_line(tmp_path, capsys):
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    setup = _repaired_setup(site)
    _runtime._report(setup)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    line = err.rstrip("\n")
    assert line == _runtime.notice(setup)
    assert line.startswith("dpmoe: repaired the RPATH of 35 SYCL extension modules in " + str(site))
    assert "undo: " + setup.undo in line and "DPMOE_NO_RUNTIME_REPAIR=1 prevents it" in line
    assert not any(Path(f).name in line for f in setup.repaired_files)  # details: info()
    # the undo command reinstalls exactly the repaired distributions, without their deps
    assert "--force-reinstall --no-deps" in setup.undo
    assert "dpctl" in setup.undo and "numba-dpex" in setup.undo and "dpnp" not in setup.undo
    details = setup.as_dict()
    assert len(details["repaired_files"]) == 35 and details["pth_file"].endswith(_runtime.PTH_NAME)


def test_no_notice_when_nothing_was_repaired(capsys):
    _runtime._report(_runtime.RuntimeSetup(icd_filenames_set=True, pth_file="/x/dpmoe-opencl-icd.pth"))
    assert capsys.readouterr().err == ""
