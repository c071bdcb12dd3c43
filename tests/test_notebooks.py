"""Every notebook runs end to end (on the tiny trunk) and fails the test when any cell fails."""

import jupytext
import pytest
from nbclient import NotebookClient

from tests.helpers import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("source", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_every_cell(source, tmp_path, monkeypatch, clinc_dir):
    monkeypatch.setenv("MOE_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MOE_NOTEBOOK_OUT", str(tmp_path))
    notebook = jupytext.read(source)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code)
    assert (tmp_path / "bundle" / "manifest.json").is_file()
