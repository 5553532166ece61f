"""Every notebook under notebooks/ runs top to bottom, without an error and without stray
warnings in any cell's output; the files themselves are stored without outputs."""

import re
from pathlib import Path

import pytest

from conftest import ON_DEVICE

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
# Python warnings as the warnings module prints them, tqdm's "IProgress not found",
# transformers' logger notices, and anything else calling itself a warning.
WARNING_TEXT = re.compile(r"\w*Warning\b|warnings\.warn|IProgress|^\[transformers\]|WARNING",
                          re.M)
# Without a SYCL device, dpmoe's one RuntimeWarning about the NumPy fallback is wanted.
# (The warnings module prints "file:line: RuntimeWarning: message" and the source line.)
FALLBACK_WARNING = re.compile(r"^.*RuntimeWarning: dpmoe: .*; running the NumPy reference "
                              r"instead\n(?:[ \t]+.*\n?)?", re.M)


def _texts(output):
    """The text an output cell shows: a stream, a result's or display's plain text, a
    traceback."""
    if output.output_type == "stream":
        yield output.text
    elif output.output_type in ("execute_result", "display_data"):
        yield output.get("data", {}).get("text/plain", "")
    elif output.output_type == "error":
        yield "\n".join(output.get("traceback", []))


def problems(notebook):
    """(cell index, what) for each stderr stream, error or warning text in the outputs."""
    found = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.output_type == "stream" and output.name == "stderr":
                text = FALLBACK_WARNING.sub("", output.text) if not ON_DEVICE else output.text
                if text.strip():
                    found.append((index, f"stderr: {text.strip()[:500]}"))
            if output.output_type == "error":
                found.append((index, f"error: {output.ename}: {output.evalue}"))
            for text in _texts(output):
                if not ON_DEVICE:
                    text = FALLBACK_WARNING.sub("", text)
                match = WARNING_TEXT.search(text)
                if match:
                    found.append((index, f"warning text {match.group(0)!r} in: {text[:500]}"))
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_cleanly(path):
    if path.name == "model_families.ipynb":  # compares with transformers: the compat extra
        pytest.importorskip("transformers")
        pytest.importorskip("torch")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code_cells), "a code cell did not run"
    assert not problems(notebook), "\n".join(f"cell {i}: {what}" for i, what in
                                              problems(notebook))


def test_the_check_finds_stray_warnings():
    nbformat = pytest.importorskip("nbformat")
    v4 = nbformat.v4
    notebook = v4.new_notebook(cells=[
        v4.new_code_cell("x", outputs=[v4.new_output("stream", name="stdout", text="fine\n")]),
        v4.new_code_cell("y", outputs=[v4.new_output(
            "stream", name="stderr",
            text="/tmp/x.py:4: DefaultConfigWarning: dpmoe: no tuned config\n")]),
        v4.new_code_cell("z", outputs=[v4.new_output(
            "stream", name="stdout", text="[transformers] You tried to access ...\n")]),
    ])
    assert [i for i, _ in problems(notebook)] == [1, 1, 2]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    # outputs depend on the machine and go stale; the tests above run the notebooks instead
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"cell {index}"


def test_there_is_a_notebook():
    assert any(p.name == "quickstart.ipynb" for p in NOTEBOOKS)
