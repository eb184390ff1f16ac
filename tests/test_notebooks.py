"""notebooks/*.ipynb: committed without outputs (fast, json only), and each runs top to bottom (slow, nbclient)."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_denoising", "03_sweeps", "04_detection_segmentation"]


def _code_cells(path: Path) -> list[dict]:
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4, f"{path.name}: nbformat {nb['nbformat']}, expected 4"
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_the_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    for i, cell in enumerate(_code_cells(path)):
        source = "".join(cell["source"])
        assert cell.get("outputs") == [], f"{path.name}, code cell {i}: has outputs (clear them before committing)"
        assert cell.get("execution_count") is None, f"{path.name}, code cell {i}: has an execution count"
        ast.parse(source, filename=f"{path.name}[{i}]")  # the code is Python (no magics, no syntax errors)


def _executor():
    spec = importlib.util.spec_from_file_location("notebook_executor", NOTEBOOK_DIR / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    pytest.importorskip("nbformat", reason="the notebooks extra is not installed: pip install -e '.[notebooks]'")
    pytest.importorskip("nbclient", reason="the notebooks extra is not installed: pip install -e '.[notebooks]'")
    pytest.importorskip("ipykernel", reason="the notebooks extra is not installed: pip install -e '.[notebooks]'")
    pytest.importorskip("matplotlib", reason="the notebooks extra is not installed: pip install -e '.[notebooks]'")
    monkeypatch.setenv("DIFFKD_NOTEBOOK_OUT", str(tmp_path / "runs"))  # the kernel inherits it: runs go there
    nb, _ = _executor().execute(path, out_dir=tmp_path, timeout=1800)
    assert (tmp_path / "runs" / path.stem).is_dir(), f"{path.name} did not write its runs under DIFFKD_NOTEBOOK_OUT"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    assert any(
        o.output_type == "display_data" and "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    ), f"{path.name} drew no figure"
