"""Every notebook: committed without outputs, no def/class, one `parameters` cell of literals;
each executed by papermill — run.ipynb and report.ipynb on a real smoke run, compare.ipynb on
the smoke run and a constructed one."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
import runfolder
from plotly.offline import get_plotlyjs

from lab.publish import NOTEBOOKS, execute_notebook

NAMES = ("run", "report", "compare")
PARAMETERS = {
    "run": {"experiment", "inventory", "overrides", "results_dir"},
    "report": {"results_dir"},
    "compare": {"runs"},
}


def test_every_notebook_is_listed() -> None:
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_thin_and_clean(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert not cell.outputs, f"{name}.ipynb is committed with outputs; clear them"
        assert cell.execution_count is None, f"{name}.ipynb has execution counts; clear them"
        for node in ast.walk(ast.parse(cell.source)):
            assert not isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda
            ), f"{name}.ipynb defines {type(node).__name__}: move the logic into lab/"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}.ipynb needs exactly one cell tagged `parameters`"
    assert tagged[0] is code[0], "the parameters cell comes first"
    assigned = set()
    for stmt in ast.parse(tagged[0].source).body:
        assert isinstance(stmt, ast.Assign), "the parameters cell holds assignments only"
        ast.literal_eval(stmt.value)  # literals only: papermill injects the real values
        assigned |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
    assert assigned == PARAMETERS[name]


def _figures(nb_path: Path) -> int:
    nb = nbformat.read(nb_path, as_version=4)
    html = [
        out["data"]["text/html"]
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "text/html" in out.get("data", {})
    ]
    bundle = get_plotlyjs()[:200]
    assert sum(bundle in h for h in html) == 1, "plotly.js must be put into the page exactly once"
    return sum("Plotly.newPlot" in h and bundle not in h for h in html)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return runfolder.smoke_run(tmp_path_factory)


def test_run_notebook_on_the_smoke_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``lab run`` publishes with run.ipynb (results_dir = the finished run: it loads it)."""
    folder = runfolder.published_smoke(tmp_path_factory)
    assert _figures(folder / "run.ipynb") == 11


def test_report_notebook_on_the_smoke_run(smoke: Path, tmp_path: Path) -> None:
    out = execute_notebook("report", tmp_path / "report.ipynb", {"results_dir": str(smoke)})
    assert _figures(out) == 11


def test_compare_notebook(tmp_path_factory: pytest.TempPathFactory) -> None:
    notebook = runfolder.compared(tmp_path_factory).with_suffix(".ipynb")
    assert _figures(notebook) == 6
    executed = nbformat.read(notebook, as_version=4)
    markdown = [
        o["data"].get("text/markdown", "")
        for c in executed.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "data" in o
    ]
    assert any("CPU model differs" in m for m in markdown)
