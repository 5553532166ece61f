"""Build step (``cmdclass`` in setup.cfg), not used at run time: put ``dpmoe-opencl-icd.pth``
at the root of site-packages as a file of the wheel.

Being a file of the wheel, the .pth is listed in the installed RECORD, so
``pip uninstall dpmoe`` removes it. Its one line is :data:`dpmoe._runtime.PTH_LINE`.

- ``pip install .`` / ``pip wheel .``: the file is written into ``build_lib``, whose root
  becomes the root of the (purelib) wheel.
- ``pip install -e .`` (PEP 660): setuptools builds the editable wheel from the files in
  ``install``'s ``install_lib``, which is then the unpacked wheel (``build_lib`` is a
  throw-away folder there), so the file is written into that folder instead.

setuptools loads this file by its path, without importing the ``dpmoe`` package (whose
``__init__`` imports dpctl); ``_runtime.py`` is loaded the same way.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

from setuptools.command.build_py import build_py as _build_py


@functools.lru_cache(maxsize=None)
def pth_file() -> tuple[str, str]:
    """(name, text) of the .pth, from dpmoe/_runtime.py."""
    path = Path(__file__).with_name("_runtime.py")
    name = "_dpmoe_runtime_for_build"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module.PTH_NAME, module.PTH_LINE


class build_py(_build_py):
    """setuptools' build_py, plus ``dpmoe-opencl-icd.pth`` next to the packages."""

    def run(self) -> None:
        super().run()
        name, text = pth_file()
        if self.editable_mode:
            target_dir = self.get_finalized_command("install").install_lib
            if not target_dir or not any(Path(target_dir).glob("*.dist-info")):
                # not the unpacked editable wheel we expect: write nothing rather than
                # something unrecorded
                self.warn(f"{name} not added to the editable install (unknown layout)")
                return
        else:
            target_dir = self.build_lib
        self.mkpath(target_dir)
        target = os.path.join(target_dir, name)
        self.announce(f"writing {target}", level=2)
        if not self.dry_run:
            Path(target).write_text(text)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, pth_file()[0]))
        return outputs
