"""The notebooks run top to bottom, and their committed outputs come from their current code.

Each numbered notebook in `notebooks/` is executed from a temporary copy (the committed file is
never touched) on a fresh kernel of this interpreter, with `ELBOJAX_QUICK=1`: the same code at
small sizes. A cell that raises fails its test. The committed notebook must carry the hash of its
code cells that `notebooks/_sync.py` stored when it last executed it at full size, so editing a
code cell without re-running the script fails `test_committed_outputs_match_code`.
"""

import importlib.util
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("notebook_sync", ROOT / "notebooks" / "_sync.py")
sync = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync)

NOTEBOOKS = sync.notebook_paths()
MAX_BYTES = 1_000_000


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _png_count(notebook) -> int:
    return sum("image/png" in out.get("data", {}) for cell in _code_cells(notebook) for out in cell.outputs)


def test_the_first_notebooks_are_there():
    names = {path.name for path in NOTEBOOKS}
    for name in (
        "01_elbo_identity.ipynb",
        "02_naive_mc_vs_importance_sampling.ipynb",
        "03_tighter_bounds.ipynb",
        "05_gradient_estimators.ipynb",
    ):
        assert name in names


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    # Proof that the kernel is this virtual environment's Python and saw the quick flag.
    notebook.cells.append(
        nbformat.v4.new_code_cell(
            "import os, sys\n"
            f"assert sys.prefix == {sys.prefix!r}, sys.prefix\n"
            "assert os.environ['ELBOJAX_QUICK'] == '1'"
        )
    )
    sync.execute(notebook, quick=True, cwd=tmp_path, timeout=240)  # raises if a cell raises
    nbformat.write(notebook, tmp_path / path.name)  # the executed copy, to look at when a test fails
    assert all(cell.execution_count is not None for cell in _code_cells(notebook))
    assert _png_count(notebook) > 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_outputs_match_code(path):
    notebook = nbformat.read(path, as_version=4)
    stored = notebook.metadata.get(sync.METADATA_KEY, {}).get("code_sha256")
    assert stored == sync.code_sha256(notebook), (
        f"{path.name}: the code changed since its outputs were made; "
        f"run `.venv/bin/python notebooks/_sync.py {path.stem}` and commit the result."
    )
    cells = _code_cells(notebook)
    # One top-to-bottom run: execution counts 1, 2, 3, ... and no error output.
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    assert not [out for cell in cells for out in cell.outputs if out.output_type == "error"]
    assert _png_count(notebook) > 0
    assert path.stat().st_size < MAX_BYTES


@pytest.mark.timeout(30)
def test_readme_lists_every_notebook():
    readme = (ROOT / "notebooks" / "README.md").read_text()
    for path in NOTEBOOKS:
        assert path.name in readme


@pytest.mark.timeout(30)
def test_code_hash_sees_code_and_only_code():
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell("# title"), nbformat.v4.new_code_cell("x = 1")]
    )
    reference = sync.code_sha256(notebook)
    notebook.cells[0].source = "# another title"
    notebook.cells[1].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    assert sync.code_sha256(notebook) == reference
    notebook.cells[1].source = "x = 2"
    assert sync.code_sha256(notebook) != reference
    notebook.cells[1].source = "x = 1"
    notebook.cells.append(nbformat.v4.new_code_cell(""))
    assert sync.code_sha256(notebook) != reference
